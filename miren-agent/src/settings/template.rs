//! The commented default config file (`miren-agent default-config`), made from the `run`
//! flags themselves so it always lists every key with its meaning and default.

use clap::Args as _;

use super::SettingsLayer;

/// Flags that are not config keys (`#[serde(skip)]` in [`SettingsLayer`]).
const FLAG_ONLY: [&str; 2] = ["config", "upgrade"];

/// Width the comments are wrapped at.
const WIDTH: usize = 92;

/// The text of `/etc/miren/agent.toml` as packaged: a header, then each key commented out at
/// its default (or, where the default is not a fixed value, a `<VALUE>` placeholder).
pub fn default_config() -> String {
    let mut out = String::from(
        "# miren-agent configuration, read from /etc/miren/agent.toml (or --config FILE).\n\
         # The keys are the `miren-agent run` flags without their leading dashes; a flag on\n\
         # the command line wins over this file. Every key is listed, commented out at its\n\
         # default: uncomment and edit the ones to change.\n",
    );
    let command = SettingsLayer::augment_args(clap::Command::new("run"));
    for arg in command.get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        if FLAG_ONLY.contains(&key) {
            continue;
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        out.push('\n');
        for line in wrap(&help, WIDTH - 2) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str(&format!("# {key} = {}\n", value(arg, key, &help)));
    }
    out
}

/// The TOML value of `key` at its default, as the config file's parser reads it.
fn value(arg: &clap::Arg, key: &str, help: &str) -> String {
    match arg.get_action() {
        clap::ArgAction::SetTrue => return "false".into(),
        clap::ArgAction::Append => return "[]".into(),
        _ => {}
    }
    let placeholder = || {
        let name = arg
            .get_value_names()
            .and_then(|names| names.first())
            .map_or_else(|| key.to_uppercase(), ToString::to_string);
        format!("<{name}>")
    };
    // A default in words ("the hostname") is described in the comment, not a value.
    let Some(default) = help
        .rsplit_once("[default: ")
        .and_then(|(_, rest)| rest.strip_suffix(']'))
        .filter(|default| !default.contains(' '))
    else {
        return placeholder();
    };
    [default.to_owned(), format!("{default:?}")]
        .into_iter()
        .find(|candidate| toml::from_str::<SettingsLayer>(&format!("{key} = {candidate}")).is_ok())
        .unwrap_or_else(placeholder)
}

/// `text` as lines of at most `width` characters (longer words stay whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `key = value` lines, uncommented, except the placeholders.
    fn uncommented(text: &str) -> String {
        text.lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter(|line| line.contains(" = ") && !line.contains(" = <"))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    #[test]
    fn every_key_is_listed_once_and_the_file_uncommented_is_a_valid_config_of_defaults() {
        let text = default_config();
        let command = SettingsLayer::augment_args(clap::Command::new("run"));
        for arg in command.get_arguments() {
            let key = arg.get_long().unwrap();
            let listed = text
                .lines()
                .filter(|line| line.starts_with(&format!("# {key} = ")))
                .count();
            let expected = usize::from(!FLAG_ONLY.contains(&key));
            assert_eq!(listed, expected, "{key} in\n{text}");
        }
        // Every value, uncommented, is what the agent uses without the file.
        let dir = std::env::temp_dir().join(format!("miren-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let resolve = |name: &str, text: &str| {
            let file = dir.join(name);
            std::fs::write(&file, text).unwrap();
            let layer = SettingsLayer {
                config: Some(file),
                ..SettingsLayer::default()
            };
            format!("{:?}", layer.resolve().unwrap())
        };
        let from_file = resolve("uncommented.toml", &uncommented(&text));
        let defaults = resolve("empty.toml", "");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(from_file, defaults);
    }

    #[test]
    fn values_are_typed_as_the_parser_wants_them() {
        let text = default_config();
        for expected in [
            "# state-dir = \"/var/lib/miren\"",
            "# max-services-per-app = 64",
            "# no-sandboxes = false",
            "# iface = []",
            "# http-threads = <N>",
            "# acme-directory = <ACME_DIRECTORY>",
            "# node-name = <NAME>",
        ] {
            assert!(
                text.lines().any(|line| line == expected),
                "{expected} in\n{text}"
            );
        }
        assert!(text.lines().all(|line| line.len() <= WIDTH), "{text}");
    }
}
