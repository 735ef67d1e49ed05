//! Unknown-key detection over the spanned TOML tree, with "did you mean" hints.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Diagnostic, Source};
use super::raw::{APP_KEYS, CONCURRENCY_KEYS, ENV_KEYS, PORT_KEYS, SERVICE_KEYS};

/// The closest candidate within a small edit distance, if any.
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::osa_distance(&word.to_ascii_lowercase(), c), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Reports every key that `app.toml` does not know, in any table.
pub(crate) fn check_keys(root: &DeTable<'_>, src: &Source, out: &mut Vec<Diagnostic>) {
    let mut check = |table: &DeTable<'_>, allowed: &[&str], place: &str| {
        for key in table.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                out.push(unknown_key(src, key, allowed, place));
            }
        }
    };
    check(root, APP_KEYS, "at the top level");
    for entry in array_tables(root.get("env")) {
        check(entry, ENV_KEYS, "in [[env]]");
    }
    let services = root.get("services").and_then(|s| s.get_ref().as_table());
    for (name, service) in services.into_iter().flatten() {
        let Some(service) = service.get_ref().as_table() else {
            continue;
        };
        let name = name.get_ref();
        check(service, SERVICE_KEYS, &format!("in [services.{name}]"));
        for entry in array_tables(service.get("env")) {
            check(entry, ENV_KEYS, &format!("in [[services.{name}.env]]"));
        }
        if let Some(concurrency) = service
            .get("concurrency")
            .and_then(|c| c.get_ref().as_table())
        {
            check(
                concurrency,
                CONCURRENCY_KEYS,
                &format!("in [services.{name}.concurrency]"),
            );
        }
        for entry in array_tables(service.get("ports")) {
            check(entry, PORT_KEYS, &format!("in [[services.{name}.ports]]"));
        }
    }
}

/// The table elements of `value` if it is an array (a table-form `env` has free keys).
fn array_tables<'a, 'i>(value: Option<&'a Spanned<DeValue<'i>>>) -> Vec<&'a DeTable<'i>> {
    match value.map(Spanned::get_ref) {
        Some(DeValue::Array(items)) => items
            .iter()
            .filter_map(|v| v.get_ref().as_table())
            .collect(),
        _ => Vec::new(),
    }
}

fn unknown_key(
    src: &Source,
    key: &Spanned<std::borrow::Cow<'_, str>>,
    allowed: &[&str],
    place: &str,
) -> Diagnostic {
    let name = key.get_ref();
    let help = if let Some(best) = suggest(name, allowed) {
        format!("did you mean `{best}`?")
    } else if allowed == SERVICE_KEYS && PORT_KEYS.contains(&name.as_ref()) {
        format!("`{name}` belongs in a [[services.NAME.ports]] entry")
    } else {
        format!(
            "remove it; the keys allowed here are: {}",
            allowed.join(", ")
        )
    };
    src.diagnostic(key.span(), format!("unknown key `{name}` {place}"), help)
}
