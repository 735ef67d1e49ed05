//! Size limits of an app ([`Limits`]), checked on the parsed document before anything else,
//! so that neither the work of validation nor the number of diagnostics grows with a file far
//! over a limit.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::config::diagnostic::{Diagnostic, Source};

/// Upper bounds that keep one deploy from overwhelming the node; each is an agent flag (and
/// `agent.toml` key of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Services in one app (`--max-services-per-app`).
    pub services_per_app: usize,
    /// Ports of one service (`--max-ports-per-service`).
    pub ports_per_service: usize,
    /// Instances of one service: the largest fixed `num_instances`, and how far an auto
    /// service scales (`--max-instances-per-service`).
    pub instances_per_service: u32,
    /// Fixed instances of all apps on the node together (`--max-instances-per-node`).
    pub instances_per_node: u64,
}

impl Limits {
    /// `--max-services-per-app` default.
    pub const DEFAULT_SERVICES_PER_APP: usize = 64;
    /// `--max-ports-per-service` default.
    pub const DEFAULT_PORTS_PER_SERVICE: usize = 32;
    /// `--max-instances-per-service` default.
    pub const DEFAULT_INSTANCES_PER_SERVICE: u32 = 64;
    /// `--max-instances-per-node` default.
    pub const DEFAULT_INSTANCES_PER_NODE: u64 = 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            services_per_app: Self::DEFAULT_SERVICES_PER_APP,
            ports_per_service: Self::DEFAULT_PORTS_PER_SERVICE,
            instances_per_service: Self::DEFAULT_INSTANCES_PER_SERVICE,
            instances_per_node: Self::DEFAULT_INSTANCES_PER_NODE,
        }
    }
}

/// The hint of a limit diagnostic: what to do, naming the flag that raises the limit.
pub(crate) fn limit_help(what_to_do: &str, flag: &str) -> String {
    format!(
        "{what_to_do}, or raise the agent's limit with --{flag} (`{flag}` in agent.toml); `miren validate` checks the default limits"
    )
}

/// Checks the size of the parsed document against `limits`: the services (in file order)
/// past `limits.services_per_app`, and in the services up to it the `ports` entries past
/// `limits.ports_per_service`; one diagnostic per limit exceeded, pointing at the first entry
/// over it. When there is any, the caller checks nothing else, so the work and the output
/// stay small however large the file is.
pub(super) fn check_limits(root: &DeTable<'_>, src: &Source, limits: &Limits) -> Vec<Diagnostic> {
    let Some(DeValue::Table(services)) = root.get("services").map(Spanned::get_ref) else {
        return Vec::new();
    };
    let mut in_order: Vec<_> = services.iter().collect();
    in_order.sort_by_key(|(name, _)| name.span().start);
    let mut diags = Vec::new();
    if let Some((first_over, _)) = in_order.get(limits.services_per_app) {
        diags.push(src.diagnostic(
            first_over.span(),
            format!(
                "the app has {} services, more than the limit of {} per app (nothing else was checked)",
                services.len(),
                limits.services_per_app
            ),
            limit_help("split it into several apps", "max-services-per-app"),
        ));
    }
    for (name, service) in in_order.into_iter().take(limits.services_per_app) {
        let ports = match service.get_ref() {
            DeValue::Table(table) => table.get("ports").map(Spanned::get_ref),
            _ => None,
        };
        let Some(DeValue::Array(ports)) = ports else {
            continue;
        };
        if let Some(first_over) = ports.get(limits.ports_per_service) {
            diags.push(src.diagnostic(
                first_over.span(),
                format!(
                    "service \"{}\" has {} ports, more than the limit of {} per service (nothing else was checked)",
                    name.get_ref(),
                    ports.len(),
                    limits.ports_per_service
                ),
                limit_help(
                    "declare fewer ports, or split the service",
                    "max-ports-per-service",
                ),
            ));
        }
    }
    diags
}
