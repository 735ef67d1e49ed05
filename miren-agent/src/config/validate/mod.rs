//! Raw structs → [`AppConfig`], collecting every rule violation.

mod concurrency;
mod env;
mod limits;
mod ports;

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::de::DeTable;
use toml::{Spanned, Value};

use super::diagnostic::{ConfigError, Diagnostic, Source, Span};
use super::keys::check_keys;
use super::raw::{RawApp, RawService};
use super::types::{AppConfig, EnvVar, ServiceConfig};
pub use limits::Limits;
use limits::check_limits;
pub(crate) use limits::limit_help;

/// Node ports no app may publish, with what holds them.
pub const RESERVED_NODE_PORTS: &[(u16, &str)] = &[
    (80, "the HTTP ingress"),
    (443, "the HTTPS ingress"),
    (8443, "the Miren API"),
];

/// Facts about the node that validation needs.
///
/// The default has no reserved listener ports and the default [`Limits`] (what `miren
/// validate` checks offline).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationContext {
    /// The agent's own listener ports with a description, e.g.
    /// `(9464, "the agent's metrics listener")`; no node port may use them.
    pub reserved_ports: Vec<(u16, String)>,
    /// How large an app may be.
    pub limits: Limits,
}

impl ValidationContext {
    /// Why `port` cannot be published as a node port (reserved by miren or used by one of
    /// the agent's own listeners), as the message for the user; `None` if it can.
    pub fn node_port_conflict(&self, port: u16) -> Option<String> {
        let reserved = RESERVED_NODE_PORTS.iter().find(|(p, _)| *p == port);
        let own = self.reserved_ports.iter().find(|(p, _)| *p == port);
        reserved
            .map(|(_, holder)| format!("node_port {port} is reserved for {holder}"))
            .or_else(|| own.map(|(_, holder)| format!("node_port {port} is used by {holder}")))
    }
}

/// Parses and validates an `app.toml`.
///
/// # Errors
///
/// Every problem found, in file order, each with line, column and a hint.
pub fn parse_app_config(source: Source, ctx: &ValidationContext) -> Result<AppConfig, ConfigError> {
    let mut diags = Vec::new();
    let parts = parse_raw(&source, &ctx.limits, &mut diags).map(|raw| {
        let mut v = Validator {
            src: &source,
            ctx,
            diags: &mut diags,
        };
        v.app(raw)
    });
    match parts {
        Some((Some(name), env, services)) if diags.is_empty() => Ok(AppConfig {
            name,
            env,
            services,
            source,
        }),
        _ => Err(ConfigError::new(diags)),
    }
}

fn parse_raw(src: &Source, limits: &Limits, diags: &mut Vec<Diagnostic>) -> Option<RawApp> {
    let root = match DeTable::parse(src.text()) {
        Ok(root) => root,
        Err(e) => {
            diags.push(toml_error(
                src,
                &e,
                "fix the TOML syntax at the marked position",
            ));
            return None;
        }
    };
    let over_limits = check_limits(root.get_ref(), src, limits);
    if !over_limits.is_empty() {
        diags.extend(over_limits);
        return None;
    }
    check_keys(root.get_ref(), src, diags);
    match RawApp::deserialize(toml::de::Deserializer::from(root)) {
        Ok(raw) => Some(raw),
        Err(e) => {
            diags.push(toml_error(
                src,
                &e,
                "change the marked value to the expected kind",
            ));
            None
        }
    }
}

fn toml_error(src: &Source, e: &toml::de::Error, help: &str) -> Diagnostic {
    src.diagnostic(e.span().unwrap_or(0..0), e.message().trim(), help)
}

/// True for 1–63 lowercase letters, digits or '-', not starting or ending with '-'.
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

const LABEL_HELP: &str =
    "use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit";

type AppParts = (Option<String>, Vec<EnvVar>, BTreeMap<String, ServiceConfig>);

struct Validator<'a> {
    src: &'a Source,
    ctx: &'a ValidationContext,
    diags: &'a mut Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, span: Span, message: impl Into<String>, help: impl Into<String>) {
        let d = self.src.diagnostic(span, message, help);
        self.diags.push(d);
    }

    fn type_error(&mut self, leaf: &Spanned<Value>, key: &str, expected: &str, example: &str) {
        let found = leaf.get_ref().type_str();
        self.error(
            leaf.span(),
            format!("`{key}` must be {expected}, found {found}"),
            format!("write it like {key} = {example}"),
        );
    }

    fn string(&mut self, leaf: &Spanned<Value>, key: &str, example: &str) -> Option<String> {
        match leaf.get_ref() {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.type_error(leaf, key, "a string", example);
                None
            }
        }
    }

    fn integer(&mut self, leaf: &Spanned<Value>, key: &str, example: &str) -> Option<i64> {
        match leaf.get_ref() {
            Value::Integer(n) => Some(*n),
            _ => {
                self.type_error(leaf, key, "an integer", example);
                None
            }
        }
    }

    fn app(&mut self, raw: RawApp) -> AppParts {
        let name = self.app_name(raw.name.as_ref());
        let env = self.env(raw.env.as_ref());
        let services: BTreeMap<_, _> = raw
            .services
            .into_iter()
            .map(|(key, service)| {
                let service = self.service(&key, service);
                (key.into_inner(), service)
            })
            .collect();
        self.node_ports_unique(&services);
        (name, env, services)
    }

    fn app_name(&mut self, leaf: Option<&Spanned<Value>>) -> Option<String> {
        let Some(leaf) = leaf else {
            self.error(
                0..0,
                "missing app `name`",
                "add name = \"my-app\" at the top of the file",
            );
            return None;
        };
        let name = self.string(leaf, "name", "\"my-app\"")?;
        if is_dns_label(&name) {
            return Some(name);
        }
        self.error(
            leaf.span(),
            format!("invalid app name \"{name}\""),
            format!("{LABEL_HELP}, e.g. \"my-app\""),
        );
        None
    }

    fn service(&mut self, key: &Spanned<String>, raw: Spanned<RawService>) -> ServiceConfig {
        let name = key.get_ref();
        if !is_dns_label(name) {
            self.error(
                key.span(),
                format!("invalid service name \"{name}\""),
                format!("{LABEL_HELP}, e.g. [services.web]"),
            );
        }
        let (span, raw) = (raw.span(), raw.into_inner());
        let command = raw
            .command
            .as_ref()
            .and_then(|leaf| self.string(leaf, "command", "\"./server\""));
        let image = raw
            .image
            .as_ref()
            .and_then(|leaf| self.string(leaf, "image", "\"nginx:latest\""));
        ServiceConfig {
            name: name.clone(),
            command,
            image,
            env: self.env(raw.env.as_ref()),
            concurrency: self.concurrency(name, raw.concurrency.as_ref()),
            ports: self.ports(name, &raw),
            image_span: raw.image.as_ref().map(Spanned::span),
            instances_span: raw
                .concurrency
                .as_ref()
                .and_then(|c| c.get_ref().num_instances.as_ref())
                .map_or_else(|| span.clone(), Spanned::span),
            span,
        }
    }
}
