//! `app.toml` as written: serde structs whose leaves keep their spans.
//!
//! Leaves are untyped [`Value`]s so that every type mismatch becomes its own
//! diagnostic in `validate` instead of aborting deserialization.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use toml::{Spanned, Value};

/// A scalar as written, with its span.
pub(crate) type Leaf = Option<Spanned<Value>>;

/// Keys allowed at the top level (keep in sync with [`RawApp`]).
pub(crate) const APP_KEYS: &[&str] = &["name", "env", "services"];
/// Keys allowed in `[services.NAME]` (keep in sync with [`RawService`]).
pub(crate) const SERVICE_KEYS: &[&str] = &[
    "command",
    "image",
    "env",
    "concurrency",
    "port",
    "port_name",
    "port_type",
    "ports",
];
/// Keys allowed in `[services.NAME.concurrency]`.
pub(crate) const CONCURRENCY_KEYS: &[&str] = &[
    "mode",
    "num_instances",
    "requests_per_instance",
    "scale_down_delay",
    "shutdown_timeout",
];
/// Keys allowed in `[[services.NAME.ports]]`.
pub(crate) const PORT_KEYS: &[&str] = &["port", "name", "type", "node_port"];
/// Keys allowed in an `[[env]]` entry.
pub(crate) const ENV_KEYS: &[&str] = &["key", "value"];

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a table")]
pub(crate) struct RawApp {
    pub name: Leaf,
    pub env: Option<Spanned<RawEnv>>,
    #[serde(default)]
    pub services: BTreeMap<Spanned<String>, Spanned<RawService>>,
}

/// `[services.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a table of service settings")]
pub(crate) struct RawService {
    pub command: Leaf,
    pub image: Leaf,
    pub env: Option<Spanned<RawEnv>>,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub port: Leaf,
    pub port_name: Leaf,
    pub port_type: Leaf,
    pub ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
}

/// `[services.NAME.concurrency]`.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a table with `mode` and its settings")]
pub(crate) struct RawConcurrency {
    pub mode: Leaf,
    pub num_instances: Leaf,
    pub requests_per_instance: Leaf,
    pub scale_down_delay: Leaf,
    pub shutdown_timeout: Leaf,
}

/// One `[[services.NAME.ports]]` entry.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a table with `port`, `name`, `type` and `node_port`")]
pub(crate) struct RawPort {
    pub port: Leaf,
    pub name: Leaf,
    #[serde(rename = "type")]
    pub kind: Leaf,
    pub node_port: Leaf,
}

/// One `[[env]]` entry.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a table with `key` and `value`")]
pub(crate) struct RawEnvEntry {
    pub key: Leaf,
    pub value: Leaf,
}

/// `env` as an array of `{ key, value }` tables or, liberally, a plain table.
#[derive(Debug)]
pub(crate) enum RawEnv {
    /// `[[env]]` entries, each spanning its table.
    List(Vec<Spanned<RawEnvEntry>>),
    /// `[env]` with `KEY = "value"` pairs.
    Table(Vec<(Spanned<String>, Spanned<Value>)>),
}

impl<'de> Deserialize<'de> for RawEnv {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EnvVisitor)
    }
}

struct EnvVisitor;

impl<'de> Visitor<'de> for EnvVisitor {
    type Value = RawEnv;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of { key, value } tables")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawEnv, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = seq.next_element()? {
            entries.push(entry);
        }
        Ok(RawEnv::List(entries))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnv, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(RawEnv::Table(entries))
    }
}
