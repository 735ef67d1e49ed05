//! Command-line arguments of `miren-agent` (clap derive), and the files a package ships that
//! come from them: man pages, shell completions and the commented default config.

use std::{io, path::Path};

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::settings::SettingsLayer;

/// `miren-agent`: the node daemon.
#[derive(Debug, Parser)]
#[command(name = "miren-agent", version, about = "miren node agent")]
pub struct AgentCli {
    /// What to do.
    #[command(subcommand)]
    pub command: AgentCommand,
}

/// The subcommands of `miren-agent`.
#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once, at start")]
pub enum AgentCommand {
    /// Run the agent until SIGINT or SIGTERM.
    Run(SettingsLayer),
    /// Print a config file (`/etc/miren/agent.toml`) listing every key, commented out, with
    /// its meaning and default.
    DefaultConfig,
    /// Write an instance's output (stdin) to size-capped, rotated log files until EOF (started
    /// by the agent for each instance).
    #[command(hide = true)]
    LogShim(crate::sandbox::logs::LogFiles),
    /// Write the man pages and shell completions of `miren-agent` and `miren` into DIR (for
    /// packaging: DIR/man1, DIR/man8, DIR/completions).
    #[command(hide = true)]
    PackageFiles {
        /// Output directory.
        dir: std::path::PathBuf,
    },
}

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes `miren`'s completion script for `shell` to `out`.
pub fn miren_completion(shell: Shell, out: &mut dyn io::Write) {
    clap_complete::generate(shell, &mut crate::cli::Cli::command(), "miren", out);
}

/// Writes into `dir` the man pages (`man1/miren*.1`, `man8/miren-agent*.8`: one page per
/// command and per subcommand) and the completions of both binaries for [`SHELLS`]
/// (`completions/<shell>/<file>` with each shell's usual file name).
///
/// # Errors
/// When a file cannot be written.
pub fn write_package_files(dir: &Path) -> io::Result<()> {
    let commands = [
        (crate::cli::Cli::command(), "1"),
        (AgentCli::command(), "8"),
    ];
    for (command, section) in commands {
        let man_dir = dir.join(format!("man{section}"));
        std::fs::create_dir_all(&man_dir)?;
        write_man_pages(&command, section, &man_dir)?;
        let name = command.get_name().to_owned();
        for shell in SHELLS {
            let file = match shell {
                Shell::Bash => name.clone(),
                Shell::Zsh => format!("_{name}"),
                _ => format!("{name}.{shell}"),
            };
            let shell_dir = dir.join("completions").join(shell.to_string());
            std::fs::create_dir_all(&shell_dir)?;
            let mut out = std::fs::File::create(shell_dir.join(file))?;
            clap_complete::generate(shell, &mut command.clone(), name.clone(), &mut out);
        }
    }
    Ok(())
}

/// The page of `command` (named `command`'s name, e.g. `miren-route`, its synopsis showing
/// how it is invoked, `miren route`) and of each visible subcommand below it, in `section`.
fn write_man_pages(command: &clap::Command, section: &'static str, dir: &Path) -> io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section(section)
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{}.{section}", command.get_name())), page)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        // Named `miren-route-set` (the page), invoked as `miren route set` (its synopsis).
        let invoked = command.get_bin_name().unwrap_or(command.get_name());
        let full = sub
            .clone()
            .name(format!("{}-{}", command.get_name(), sub.get_name()))
            .bin_name(format!("{invoked} {}", sub.get_name()));
        write_man_pages(&full, section, dir)?;
    }
    Ok(())
}
