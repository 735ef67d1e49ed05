//! `[services.NAME.concurrency]`: modes, their settings, durations.

use std::time::Duration;

use toml::{Spanned, Value};

use super::{Validator, limit_help};
use crate::config::duration::parse_duration;
use crate::config::keys::suggest;
use crate::config::raw::{Leaf, RawConcurrency};
use crate::config::types::{
    Concurrency, ConcurrencyMode, DEFAULT_REQUESTS_PER_INSTANCE, DEFAULT_SCALE_DOWN_DELAY,
    DEFAULT_SHUTDOWN_TIMEOUT,
};

enum Mode {
    Fixed,
    Auto,
}

impl Validator<'_> {
    pub(super) fn concurrency(
        &mut self,
        service: &str,
        raw: Option<&Spanned<RawConcurrency>>,
    ) -> Concurrency {
        let default = Concurrency::default_for(service);
        let Some(raw) = raw.map(Spanned::get_ref) else {
            return default;
        };
        let (mode, label) = match &raw.mode {
            None => {
                let mode = match default.mode {
                    ConcurrencyMode::Fixed { .. } => Mode::Fixed,
                    ConcurrencyMode::Auto { .. } => Mode::Auto,
                };
                let name = mode_name(&mode);
                let label = format!("mode = \"{name}\" (the default for service \"{service}\")");
                (Some(mode), label)
            }
            Some(leaf) => {
                let mode = self.mode(leaf);
                let label = mode
                    .as_ref()
                    .map_or(String::new(), |m| format!("mode = \"{}\"", mode_name(m)));
                (mode, label)
            }
        };
        let shutdown_timeout = self
            .duration(&raw.shutdown_timeout, "shutdown_timeout")
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        let mode = match mode {
            None => default.mode,
            Some(Mode::Fixed) => {
                self.forbid(
                    &raw.requests_per_instance,
                    "requests_per_instance",
                    &label,
                    "auto",
                );
                self.forbid(&raw.scale_down_delay, "scale_down_delay", &label, "auto");
                ConcurrencyMode::Fixed {
                    num_instances: self.num_instances(&raw.num_instances).unwrap_or(1),
                }
            }
            Some(Mode::Auto) => {
                self.forbid(&raw.num_instances, "num_instances", &label, "fixed");
                ConcurrencyMode::Auto {
                    requests_per_instance: self
                        .count(&raw.requests_per_instance, "requests_per_instance")
                        .unwrap_or(DEFAULT_REQUESTS_PER_INSTANCE),
                    scale_down_delay: self
                        .duration(&raw.scale_down_delay, "scale_down_delay")
                        .unwrap_or(DEFAULT_SCALE_DOWN_DELAY),
                }
            }
        };
        Concurrency {
            mode,
            shutdown_timeout,
        }
    }

    fn mode(&mut self, leaf: &Spanned<Value>) -> Option<Mode> {
        match self.string(leaf, "mode", "\"fixed\"")?.as_str() {
            "fixed" => Some(Mode::Fixed),
            "auto" => Some(Mode::Auto),
            other => {
                let help = match suggest(other, &["fixed", "auto"]) {
                    Some(best) => {
                        format!("did you mean \"{best}\"? the modes are \"fixed\" and \"auto\"")
                    }
                    None => "use \"fixed\" or \"auto\"".to_owned(),
                };
                self.error(
                    leaf.span(),
                    format!("unknown concurrency mode \"{other}\""),
                    help,
                );
                None
            }
        }
    }

    fn forbid(&mut self, leaf: &Leaf, key: &str, label: &str, other_mode: &str) {
        if let Some(leaf) = leaf {
            self.error(
                leaf.span(),
                format!("`{key}` cannot be used with {label}"),
                format!("it only applies to mode = \"{other_mode}\"; remove it, or set mode = \"{other_mode}\""),
            );
        }
    }

    fn count(&mut self, leaf: &Leaf, key: &str) -> Option<u32> {
        let leaf = leaf.as_ref()?;
        let n = self.integer(leaf, key, "2")?;
        if n < 1 {
            self.error(
                leaf.span(),
                format!("{key} must be at least 1, found {n}"),
                format!("set {key} to 1 or more"),
            );
            return None;
        }
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(
                    leaf.span(),
                    format!("{key} {n} is too large"),
                    format!("set {key} to at most {}", u32::MAX),
                );
                None
            }
        }
    }

    /// A fixed `num_instances`: at least 1, at most the per-service limit.
    fn num_instances(&mut self, leaf: &Leaf) -> Option<u32> {
        let n = self.count(leaf, "num_instances")?;
        let limit = self.ctx.limits.instances_per_service;
        if n > limit {
            self.error(
                leaf.as_ref()?.span(),
                format!(
                    "num_instances {n} is more than the limit of {limit} instances per service"
                ),
                limit_help("lower num_instances", "max-instances-per-service"),
            );
            return None;
        }
        Some(n)
    }

    fn duration(&mut self, leaf: &Leaf, key: &str) -> Option<Duration> {
        let leaf = leaf.as_ref()?;
        let text = self.string(leaf, key, "\"15m\"")?;
        let parsed = parse_duration(&text);
        if parsed.is_none() {
            self.error(
                leaf.span(),
                format!("invalid duration \"{text}\" for `{key}`"),
                "write whole numbers with units h, m, s or ms, e.g. \"15m\", \"10s\", \"1h30m\" or \"500ms\"",
            );
        }
        parsed
    }
}

fn mode_name(mode: &Mode) -> &'static str {
    match mode {
        Mode::Fixed => "fixed",
        Mode::Auto => "auto",
    }
}
