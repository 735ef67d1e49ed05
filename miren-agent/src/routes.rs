//! HTTP routes: validated hosts and the Host → app service table.
//!
//! Hosts are case-insensitive and stored lowercase, without a trailing dot,
//! internationalized names as punycode. A wildcard `*` may only be the whole
//! first label with at least two labels after it. Lookup tries the exact host
//! first, then the wildcard one label up; a wildcard matches exactly one extra
//! label and never the bare domain.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::str::FromStr;

use imbl::HashMap;

use crate::config::AppConfig;

/// A validated, normalized route host such as `example.com` or `*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(String);

/// Why a route host was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Nothing to route.
    #[error("host is empty; give a domain name such as \"example.com\"")]
    Empty,
    /// `example.com:8080`.
    #[error("host \"{0}\" must not include a port; routes match on the name only")]
    Port(String),
    /// `*foo.example.com`.
    #[error("host \"{0}\": `*` must be a whole label, as in \"*.example.com\"")]
    PartialWildcard(String),
    /// `foo.*.example.com`, `*.example.*`.
    #[error("host \"{0}\": `*` is only allowed as the first label, as in \"*.example.com\"")]
    WildcardNotFirst(String),
    /// `*.com`, `*.`.
    #[error(
        "host \"{0}\": a wildcard needs at least two labels after `*`, as in \"*.example.com\""
    )]
    WildcardTooBroad(String),
    /// Bad characters, empty labels, or too long.
    #[error(
        "host \"{0}\" is not a valid domain name; use letters, digits and '-' in labels of at most 63 characters, separated by '.'"
    )]
    Invalid(String),
}

impl Host {
    /// Validates and normalizes a route host (lowercase, punycode, no trailing dot).
    ///
    /// # Errors
    ///
    /// A [`HostError`] saying what is wrong with `input`.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        let owned = || input.to_owned();
        if input.is_empty() {
            return Err(HostError::Empty);
        }
        if input.contains(':') {
            return Err(HostError::Port(owned()));
        }
        let name = input.strip_suffix('.').unwrap_or(input);
        let mut labels = name.split('.');
        let first = labels.next().unwrap_or_default();
        if labels.clone().any(|l| l.contains('*')) {
            return Err(HostError::WildcardNotFirst(owned()));
        }
        if first.contains('*') && first != "*" {
            return Err(HostError::PartialWildcard(owned()));
        }
        let (prefix, domain) = match name.strip_prefix("*.") {
            Some(rest) if labels.count() >= 2 => ("*.", rest),
            _ if first == "*" => return Err(HostError::WildcardTooBroad(owned())),
            _ => ("", name),
        };
        if is_plain_dns_name(domain) {
            // Already what IDNA would return (stored routes are): skip its cost.
            return Ok(Self(name.to_owned()));
        }
        let ascii =
            idna::domain_to_ascii_strict(domain).map_err(|_| HostError::Invalid(owned()))?;
        if ascii.is_empty() {
            return Err(HostError::Invalid(owned()));
        }
        Ok(Self(format!("{prefix}{ascii}")))
    }

    /// The normalized host.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `*.` hosts.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

/// True for a lowercase ASCII name that strict IDNA (UTS #46 with hyphen and DNS length
/// checks) maps to itself: labels of 1–63 of `a-z 0-9 -`, no `-` at either end, no `--`
/// anywhere (so no `xn--` label), at most 253 characters.
fn is_plain_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
                && !label.contains("--")
        })
}

impl FromStr for Host {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for Host {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Host → target, with lookups that cost O(labels) whatever the number of routes. The maps
/// are persistent (hash array mapped tries): a clone costs O(1) and shares every entry, so a
/// changed copy costs O(log routes) per changed route, not a rebuild.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    exact: HashMap<Host, T>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, (Host, T)>,
}

impl<T: Clone> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T: Clone> RouteTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table for about `routes` routes (a persistent map reserves no room, so this
    /// is [`RouteTable::new`]).
    pub fn with_capacity(_routes: usize) -> Self {
        Self::new()
    }

    /// Adds or replaces a route, returning the previous target.
    pub fn insert(&mut self, host: Host, target: T) -> Option<T> {
        match host.0.strip_prefix("*.") {
            Some(suffix) => self
                .wildcard
                .insert(suffix.to_owned(), (host, target))
                .map(|(_, old)| old),
            None => self.exact.insert(host, target),
        }
    }

    /// The target stored under exactly `host` (for `*.parent`, the wildcard entry itself).
    pub fn get(&self, host: &Host) -> Option<&T> {
        match host.0.strip_prefix("*.") {
            Some(suffix) => self.wildcard.get(suffix).map(|(_, t)| t),
            None => self.exact.get(host.as_str()),
        }
    }

    /// Removes a route, returning its target.
    pub fn remove(&mut self, host: &Host) -> Option<T> {
        match host.0.strip_prefix("*.") {
            Some(suffix) => self.wildcard.remove(suffix).map(|(_, t)| t),
            None => self.exact.remove(host.as_str()),
        }
    }

    /// The target for a raw `Host` header value (any case, optional `:port`
    /// and trailing dot): the exact route, else the wildcard one label up.
    pub fn lookup(&self, host: &str) -> Option<&T> {
        let host = normalize_host_header(host)?;
        if let Some(target) = self.exact.get(host.as_ref()) {
            return Some(target);
        }
        let (first, parent) = host.split_once('.')?;
        if first.is_empty() || first == "*" {
            return None;
        }
        self.wildcard.get(parent).map(|(_, t)| t)
    }

    /// All routes, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Host, &T)> {
        self.exact
            .iter()
            .chain(self.wildcard.values().map(|(h, t)| (h, t)))
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `Host` header value (or URI authority) as the route table keys it: `:port` and a
/// trailing dot stripped, lowercased, international names as punycode; `None` when empty.
/// Allocates only when needed.
pub fn normalize_host_header(raw: &str) -> Option<Cow<'_, str>> {
    let host = match raw.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => raw,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        None
    } else if !host.is_ascii() {
        idna::domain_to_ascii(host).ok().map(Cow::Owned)
    } else if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// Why a route cannot point at an app service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The app has no such service.
    #[error("app service \"{service}\" does not exist in app \"{app}\"")]
    NoSuchService {
        /// App name.
        app: String,
        /// Requested service.
        service: String,
    },
    /// The service has no http port to send requests to.
    #[error("app service \"{service}\" has no HTTP port")]
    NoHttpPort {
        /// Service name.
        service: String,
    },
}

/// Checks that `service` exists in `app` and has an http port.
///
/// # Errors
///
/// [`RouteError::NoSuchService`] or [`RouteError::NoHttpPort`].
pub fn check_route_target(app: &AppConfig, service: &str) -> Result<(), RouteError> {
    let Some(svc) = app.services.get(service) else {
        return Err(RouteError::NoSuchService {
            app: app.name.clone(),
            service: service.to_owned(),
        });
    };
    if svc.http_port().is_none() {
        return Err(RouteError::NoHttpPort {
            service: service.to_owned(),
        });
    }
    Ok(())
}

/// Most routes one `miren route import` takes.
pub const MAX_IMPORT_ROUTES: usize = 20_000;
/// Largest route file `miren route import` takes, in bytes.
pub const MAX_IMPORT_BYTES: usize = 2 << 20;
/// Most line errors an import error lists (the rest are counted).
const MAX_LISTED_ERRORS: usize = 100;

/// One route of a route file (`HOST APP [SERVICE] [TIMEOUT]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLine {
    /// 1-based line number in the file.
    pub line: usize,
    /// The route's host.
    pub host: Host,
    /// Target app.
    pub app: String,
    /// Target service, when the line names one.
    pub service: Option<String>,
    /// Upstream timeout in milliseconds, when the line sets one.
    pub timeout_ms: Option<u64>,
}

/// What is wrong with one line of a route file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Fewer than 2 or more than 4 fields.
    #[error(
        "expected `HOST APP [SERVICE] [TIMEOUT]`, found {found} fields; put one route per line (`#` starts a comment)"
    )]
    Fields {
        /// Fields found.
        found: usize,
    },
    /// The host is not a valid route host.
    #[error("invalid host \"{host}\": {source}")]
    Host {
        /// The host as written.
        host: String,
        /// Why.
        #[source]
        source: HostError,
    },
    /// The timeout is not a duration from 1 ms to 24 h.
    #[error("\"{text}\" is not a timeout; use a positive duration of at most 24h, e.g. 30s or 5m")]
    Timeout {
        /// The timeout as written.
        text: String,
    },
    /// The host is routed on an earlier line too.
    #[error("host {host} is already routed on line {first}; keep only one of the two lines")]
    Duplicate {
        /// The host.
        host: String,
        /// The earlier line.
        first: usize,
    },
    /// The line is fine, but the route cannot be set (unknown app or service, no http port).
    #[error("{0}")]
    Target(String),
}

/// Why a route file was not imported (nothing of it was applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The file is over [`MAX_IMPORT_BYTES`].
    #[error(
        "{file}: {bytes} bytes is over the limit of {MAX_IMPORT_BYTES} bytes per import; split it into several files (each is imported all-or-nothing)"
    )]
    TooLarge {
        /// The file's name.
        file: String,
        /// Its size.
        bytes: usize,
    },
    /// The file has more than [`MAX_IMPORT_ROUTES`] routes.
    #[error(
        "{file}: {count} routes is over the limit of {MAX_IMPORT_ROUTES} routes per import; split it into several files (each is imported all-or-nothing)"
    )]
    TooMany {
        /// The file's name.
        file: String,
        /// Routes in it.
        count: usize,
    },
    /// Lines with errors, in file order.
    #[error("{}", render_line_errors(file, errors))]
    Lines {
        /// The file's name.
        file: String,
        /// (line number, error) of every bad line.
        errors: Vec<(usize, LineError)>,
    },
}

/// `FILE:LINE: error` per bad line (at most [`MAX_LISTED_ERRORS`]), then what to do.
fn render_line_errors(file: &str, errors: &[(usize, LineError)]) -> String {
    let mut text = String::new();
    for (line, error) in errors.iter().take(MAX_LISTED_ERRORS) {
        text.push_str(&format!("{file}:{line}: {error}\n"));
    }
    if errors.len() > MAX_LISTED_ERRORS {
        text.push_str(&format!(
            "… and {} more lines with errors\n",
            errors.len() - MAX_LISTED_ERRORS
        ));
    }
    text.push_str(&format!(
        "nothing was imported: fix the {} line(s) above and import {file} again",
        errors.len()
    ));
    text
}

/// Parses a route file: one `HOST APP [SERVICE] [TIMEOUT]` per line (fields separated by
/// blanks; a third field starting with a digit is the timeout), blank lines and `#` comments
/// ignored. `file` names the file in errors.
///
/// # Errors
/// [`ImportError::TooLarge`] or [`ImportError::TooMany`] over the limits, else
/// [`ImportError::Lines`] with every bad line.
pub fn parse_route_file(file: &str, text: &str) -> Result<Vec<ImportLine>, ImportError> {
    if text.len() > MAX_IMPORT_BYTES {
        return Err(ImportError::TooLarge {
            file: file.to_owned(),
            bytes: text.len(),
        });
    }
    let mut routes = Vec::new();
    let mut errors = Vec::new();
    let mut seen: std::collections::HashMap<Host, usize> = std::collections::HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split_once('#').map_or(raw, |(before, _)| before);
        let fields: Vec<&str> = content.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        match parse_route_line(line, &fields) {
            Ok(route) => match seen.get(&route.host) {
                Some(&first) => errors.push((
                    line,
                    LineError::Duplicate {
                        host: route.host.to_string(),
                        first,
                    },
                )),
                None => {
                    seen.insert(route.host.clone(), line);
                    routes.push(route);
                }
            },
            Err(error) => errors.push((line, error)),
        }
    }
    if routes.len() + errors.len() > MAX_IMPORT_ROUTES {
        return Err(ImportError::TooMany {
            file: file.to_owned(),
            count: routes.len() + errors.len(),
        });
    }
    if errors.is_empty() {
        Ok(routes)
    } else {
        Err(ImportError::Lines {
            file: file.to_owned(),
            errors,
        })
    }
}

/// A route timeout as written (`30s`, `5m`): a duration from 1 ms to 24 h.
pub fn parse_route_timeout(text: &str) -> Option<std::time::Duration> {
    let max = std::time::Duration::from_millis(crate::api::types::MAX_ROUTE_TIMEOUT_MS);
    crate::config::parse_duration(text).filter(|d| !d.is_zero() && *d <= max)
}

/// One non-empty line's fields as a route.
fn parse_route_line(line: usize, fields: &[&str]) -> Result<ImportLine, LineError> {
    let (host, app, rest) = match fields {
        [host, app, rest @ ..] if rest.len() <= 2 => (*host, *app, rest),
        _ => {
            return Err(LineError::Fields {
                found: fields.len(),
            });
        }
    };
    let host = Host::parse(host).map_err(|source| LineError::Host {
        host: host.to_owned(),
        source,
    })?;
    let (service, timeout) = match rest {
        [] => (None, None),
        [one] if one.starts_with(|c: char| c.is_ascii_digit()) => (None, Some(*one)),
        [service] => (Some(*service), None),
        [service, timeout] => (Some(*service), Some(*timeout)),
        _ => unreachable!("at most 2 fields after HOST APP"),
    };
    let timeout_ms = timeout
        .map(|text| {
            parse_route_timeout(text)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .ok_or_else(|| LineError::Timeout {
                    text: text.to_owned(),
                })
        })
        .transpose()?;
    Ok(ImportLine {
        line,
        host,
        app: app.to_owned(),
        service: service.map(str::to_owned),
        timeout_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Source, ValidationContext, parse_app_config};

    /// A route target as the tests use it.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct RouteTarget {
        /// App name.
        app: String,
        /// Service name within the app.
        service: String,
    }

    fn target(app: &str) -> RouteTarget {
        RouteTarget {
            app: app.to_owned(),
            service: "web".to_owned(),
        }
    }

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parse_normalizes_valid_hosts() {
        let cases = [
            ("example.com", "example.com"),
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("*.example.com", "*.example.com"),
            ("*.Example.com.", "*.example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("*.bücher.de", "*.xn--bcher-kva.de"),
            ("a-b.c1.example.org", "a-b.c1.example.org"),
            ("localhost", "localhost"),
        ];
        for (input, want) in cases {
            assert_eq!(host(input).as_str(), want, "{input}");
        }
        assert!(host("*.example.com").is_wildcard());
        assert!(!host("example.com").is_wildcard());
    }

    #[test]
    fn plain_names_skip_idna_with_the_same_result() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let too_long_name = ["a".repeat(60).as_str(); 5].join(".");
        let names = [
            "example.com",
            "a-b.c1.example.org",
            "0.example",
            long_label.as_str(),
            too_long_label.as_str(),
            too_long_name.as_str(),
            "-a.example",
            "a-.example",
            "ab--cd.example",
            "xn--bcher-kva.example",
            "xn--zz.example",
            "a..example",
        ];
        for name in names {
            let fast = is_plain_dns_name(name);
            let idna = idna::domain_to_ascii_strict(name);
            if fast {
                assert_eq!(idna.as_deref().ok(), Some(name), "{name}");
            }
            assert_eq!(
                Host::parse(name).ok().map(|h| h.0),
                idna.ok(),
                "{name} (plain: {fast})"
            );
        }
        assert!(is_plain_dns_name("a-b.c1.example.org"));
        assert!(!is_plain_dns_name("xn--bcher-kva.example"));
    }

    #[test]
    fn parse_rejects_invalid_hosts_with_distinct_messages() {
        let cases = [
            (
                "",
                "host is empty; give a domain name such as \"example.com\"",
            ),
            (
                "example.com:8080",
                "host \"example.com:8080\" must not include a port; routes match on the name only",
            ),
            (
                "*.com",
                "host \"*.com\": a wildcard needs at least two labels after `*`, as in \"*.example.com\"",
            ),
            (
                "*.",
                "host \"*.\": a wildcard needs at least two labels after `*`, as in \"*.example.com\"",
            ),
            (
                "*",
                "host \"*\": a wildcard needs at least two labels after `*`, as in \"*.example.com\"",
            ),
            (
                "foo.*.example.com",
                "host \"foo.*.example.com\": `*` is only allowed as the first label, as in \"*.example.com\"",
            ),
            (
                "*.example.*",
                "host \"*.example.*\": `*` is only allowed as the first label, as in \"*.example.com\"",
            ),
            (
                "*foo.example.com",
                "host \"*foo.example.com\": `*` must be a whole label, as in \"*.example.com\"",
            ),
            (
                "foo..com",
                "host \"foo..com\" is not a valid domain name; use letters, digits and '-' in labels of at most 63 characters, separated by '.'",
            ),
            (
                "under_score.com",
                "host \"under_score.com\" is not a valid domain name; use letters, digits and '-' in labels of at most 63 characters, separated by '.'",
            ),
            (
                ".",
                "host \".\" is not a valid domain name; use letters, digits and '-' in labels of at most 63 characters, separated by '.'",
            ),
        ];
        for (input, want) in cases {
            let err = Host::parse(input).err().map(|e| e.to_string());
            assert_eq!(err.as_deref(), Some(want), "{input}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert_eq!(Host::parse(&long), Err(HostError::Invalid(long.clone())));
    }

    #[test]
    fn lookup_table() {
        let mut table = RouteTable::new();
        for (h, app) in [
            ("example.com", "bare"),
            ("www.example.com", "www"),
            ("*.example.com", "wild"),
            ("*.api.example.com", "api-wild"),
            ("exact.api.example.com", "api-exact"),
            ("*.bücher.de", "idn-wild"),
            ("straße.de", "idn"),
            ("*.sub.test.org", "test-wild"),
        ] {
            assert_eq!(table.insert(host(h), target(app)), None);
        }
        let cases: &[(&str, Option<&str>)] = &[
            ("example.com", Some("bare")),
            ("EXAMPLE.COM", Some("bare")),
            ("example.com.", Some("bare")),
            ("example.com:80", Some("bare")),
            ("Example.Com.:8080", Some("bare")),
            ("www.example.com", Some("www")),
            ("WWW.example.com:443", Some("www")),
            ("foo.example.com", Some("wild")),
            ("FOO.Example.Com", Some("wild")),
            ("foo.example.com.", Some("wild")),
            ("foo.example.com:8443", Some("wild")),
            ("a.b.example.com", None),
            ("x.api.example.com", Some("api-wild")),
            ("api.example.com", Some("wild")),
            ("exact.api.example.com", Some("api-exact")),
            ("a.x.api.example.com", None),
            ("com", None),
            ("", None),
            (":80", None),
            (".", None),
            (".example.com", None),
            ("*.example.com", None),
            ("example.org", None),
            ("notexample.com", None),
            ("example.com.evil.net", None),
            ("shop.bücher.de", Some("idn-wild")),
            ("shop.xn--bcher-kva.de", Some("idn-wild")),
            ("bücher.de", None),
            ("xn--strae-oqa.de", Some("idn")),
            ("STRASSE.de", None),
            ("x.sub.test.org", Some("test-wild")),
            ("sub.test.org", None),
            ("test.org", None),
            ("x.test.org", None),
            ("[::1]:80", None),
            ("example.com:http", None),
        ];
        assert!(cases.len() >= 30);
        for (input, want) in cases {
            let got = table.lookup(input).map(|t| t.app.as_str());
            assert_eq!(got, *want, "lookup({input:?})");
        }
    }

    #[test]
    fn insert_replace_remove() {
        let mut table = RouteTable::new();
        assert!(table.is_empty());
        assert_eq!(table.insert(host("*.example.com"), target("a")), None);
        assert_eq!(
            table.insert(host("*.EXAMPLE.com"), target("b")),
            Some(target("a"))
        );
        assert_eq!(table.insert(host("example.com"), target("c")), None);
        assert_eq!(table.len(), 2);
        let mut listed: Vec<_> = table
            .iter()
            .map(|(h, t)| (h.to_string(), t.app.clone()))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("*.example.com".to_owned(), "b".to_owned()),
                ("example.com".to_owned(), "c".to_owned())
            ]
        );
        assert_eq!(table.remove(&host("*.example.com")), Some(target("b")));
        assert_eq!(table.lookup("x.example.com"), None);
        assert_eq!(table.remove(&host("example.com")), Some(target("c")));
        assert_eq!(table.remove(&host("example.com")), None);
        assert!(table.is_empty());
    }

    #[test]
    fn route_target_must_be_a_service_with_an_http_port() {
        let text = r#"
name = "game"
[services.web]
command = "./web"
port = 8080

[services.server]
command = "./server"
[[services.server.ports]]
name = "game"
port = 27015
type = "udp"
node_port = 27015
"#;
        let app = parse_app_config(Source::new("app.toml", text), &ValidationContext::default());
        let app = app.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(check_route_target(&app, "web"), Ok(()));
        assert_eq!(
            check_route_target(&app, "server").map_err(|e| e.to_string()),
            Err("app service \"server\" has no HTTP port".to_owned())
        );
        assert_eq!(
            check_route_target(&app, "api").map_err(|e| e.to_string()),
            Err("app service \"api\" does not exist in app \"game\"".to_owned())
        );
    }

    #[test]
    fn route_file_lines_parse_with_comments_blanks_service_and_timeout() {
        let text = "# routes\n\na.example.com shop\n*.example.com shop api 30s # wildcard\nB.example.com  shop\t5m\n";
        let routes = parse_route_file("r.txt", text).unwrap();
        let got: Vec<_> = routes
            .iter()
            .map(|r| {
                (
                    r.line,
                    r.host.as_str(),
                    r.app.as_str(),
                    r.service.as_deref(),
                    r.timeout_ms,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (3, "a.example.com", "shop", None, None),
                (4, "*.example.com", "shop", Some("api"), Some(30_000)),
                (5, "b.example.com", "shop", None, Some(300_000)),
            ]
        );
    }

    #[test]
    fn route_file_reports_every_bad_line_with_its_number() {
        let text = "ok.example.com shop\njustahost\n*.com shop\na.example.com shop web 0s\n\
                    b.example.com shop web 5m extra\nok.example.com other\nc.example.com shop 9zz\n";
        let err = parse_route_file("routes.txt", text).unwrap_err();
        let ImportError::Lines { file, errors } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(file, "routes.txt");
        let lines: Vec<usize> = errors.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7]);
        assert_eq!(errors[0].1, LineError::Fields { found: 1 });
        assert!(matches!(errors[1].1, LineError::Host { .. }));
        assert_eq!(errors[2].1, LineError::Timeout { text: "0s".into() });
        assert_eq!(errors[3].1, LineError::Fields { found: 5 });
        assert_eq!(
            errors[4].1,
            LineError::Duplicate {
                host: "ok.example.com".into(),
                first: 1
            }
        );
        assert_eq!(errors[5].1, LineError::Timeout { text: "9zz".into() });
        let shown = err.to_string();
        assert!(
            shown.starts_with("routes.txt:2: expected `HOST APP"),
            "{shown}"
        );
        assert!(
            shown.contains("routes.txt:6: host ok.example.com is already routed on line 1"),
            "{shown}"
        );
        assert!(
            shown.ends_with(
                "nothing was imported: fix the 6 line(s) above and import routes.txt again"
            ),
            "{shown}"
        );
    }

    #[test]
    fn route_file_limits_name_the_limit() {
        let big = "a".repeat(MAX_IMPORT_BYTES + 1);
        let err = parse_route_file("big.txt", &big).unwrap_err();
        assert!(matches!(err, ImportError::TooLarge { .. }));
        assert!(
            err.to_string()
                .contains(&format!("limit of {MAX_IMPORT_BYTES} bytes"))
        );
        let many: String = (0..=MAX_IMPORT_ROUTES)
            .map(|i| format!("h{i}.example.com app\n"))
            .collect();
        let err = parse_route_file("many.txt", &many).unwrap_err();
        assert_eq!(
            err,
            ImportError::TooMany {
                file: "many.txt".into(),
                count: MAX_IMPORT_ROUTES + 1
            }
        );
        assert!(err.to_string().contains("limit of 20000 routes per import"));
    }
}
