//! Size limits of an app ([`Limits`]), enforced on the parsed document before anything else
//! is checked, so that neither the work of validation nor the number of diagnostics grows
//! with a file far over a limit.

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

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

/// Drops the services past `limits.services_per_app` (in file order) and, in the services
/// kept, the `ports` entries past `limits.ports_per_service`, with one diagnostic per limit
/// exceeded pointing at the first entry over it. What was dropped is not checked further.
pub(super) fn trim_to_limits(
    root: &mut DeTable<'_>,
    src: &Source,
    limits: &Limits,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(DeValue::Table(services)) = root.get_mut("services").map(Spanned::get_mut) else {
        return;
    };
    if services.len() > limits.services_per_app {
        let mut starts: Vec<usize> = services.keys().map(|k| k.span().start).collect();
        starts.sort_unstable();
        let cutoff = starts[limits.services_per_app];
        if let Some(first_over) = services.keys().find(|k| k.span().start == cutoff) {
            diags.push(src.diagnostic(
                first_over.span(),
                format!(
                    "the app has {} services, more than the limit of {} per app; services from \"{}\" on were not checked",
                    services.len(),
                    limits.services_per_app,
                    first_over.get_ref()
                ),
                limit_help("split it into several apps", "max-services-per-app"),
            ));
        }
        let over: Vec<String> = services
            .keys()
            .filter(|key| key.span().start >= cutoff)
            .map(|key| key.get_ref().to_string())
            .collect();
        for name in over {
            services.remove(name.as_str());
        }
    }
    for (name, service) in services.iter_mut() {
        let Some(DeValue::Array(ports)) = (match service.get_mut() {
            DeValue::Table(table) => table.get_mut("ports").map(Spanned::get_mut),
            _ => None,
        }) else {
            continue;
        };
        if ports.len() <= limits.ports_per_service {
            continue;
        }
        diags.push(src.diagnostic(
            ports[limits.ports_per_service].span(),
            format!(
                "service \"{}\" has {} ports, more than the limit of {} per service; the ports from here on were not checked",
                name.get_ref(),
                ports.len(),
                limits.ports_per_service
            ),
            limit_help(
                "declare fewer ports, or split the service",
                "max-ports-per-service",
            ),
        ));
        *ports = std::mem::replace(ports, DeArray::new())
            .into_iter()
            .take(limits.ports_per_service)
            .collect();
    }
}
