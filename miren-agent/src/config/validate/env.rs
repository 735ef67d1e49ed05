//! `env` entries: key rules (no `PORT`, no `PORT_n`) and values.

use toml::{Spanned, Value};

use super::Validator;
use crate::config::diagnostic::Span;
use crate::config::raw::RawEnv;
use crate::config::types::EnvVar;

impl Validator<'_> {
    pub(super) fn env(&mut self, raw: Option<&Spanned<RawEnv>>) -> Vec<EnvVar> {
        let mut vars = Vec::new();
        match raw.map(Spanned::get_ref) {
            None => {}
            Some(RawEnv::List(entries)) => {
                for entry in entries {
                    let (span, entry) = (entry.span(), entry.get_ref());
                    let key = match &entry.key {
                        Some(leaf) => self
                            .string(leaf, "key", "\"DATABASE_URL\"")
                            .filter(|k| self.env_key(k, leaf.span())),
                        None => {
                            let help = "add key = \"NAME\" to this entry";
                            self.error(span.clone(), "env entry has no `key`", help);
                            None
                        }
                    };
                    let value = match &entry.value {
                        Some(leaf) => self.env_value(leaf),
                        None => {
                            let help = "add value = \"...\" to this entry";
                            self.error(span, "env entry has no `value`", help);
                            None
                        }
                    };
                    if let (Some(key), Some(value)) = (key, value) {
                        vars.push(EnvVar { key, value });
                    }
                }
            }
            Some(RawEnv::Table(pairs)) => {
                for (key, leaf) in pairs {
                    let ok = self.env_key(key.get_ref(), key.span());
                    if let Some(value) = self.env_value(leaf).filter(|_| ok) {
                        vars.push(EnvVar {
                            key: key.get_ref().clone(),
                            value,
                        });
                    }
                }
            }
        }
        vars
    }

    /// Checks an env key; false if it was rejected.
    fn env_key(&mut self, key: &str, span: Span) -> bool {
        let numbered = key
            .strip_prefix("PORT_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if key == "PORT" {
            self.error(
                span,
                "`PORT` cannot be set in env",
                "the agent sets PORT to the service's first http port (else its first port); remove this entry",
            );
        } else if numbered {
            self.error(
                span,
                format!("`{key}` cannot be set in env"),
                "the agent sets PORT_1..PORT_N to a multi-port service's ports in declaration order; remove this entry",
            );
        } else if !is_env_name(key) {
            self.error(
                span,
                format!("invalid env key \"{key}\""),
                "use letters, digits and '_', not starting with a digit, e.g. \"DATABASE_URL\"",
            );
        } else {
            return true;
        }
        false
    }

    fn env_value(&mut self, leaf: &Spanned<Value>) -> Option<String> {
        match leaf.get_ref() {
            Value::String(s) => Some(s.clone()),
            Value::Integer(n) => Some(n.to_string()),
            Value::Float(n) => Some(n.to_string()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => {
                self.type_error(leaf, "value", "a string", "\"...\"");
                None
            }
        }
    }
}

fn is_env_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
