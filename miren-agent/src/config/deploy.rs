//! Checks and steps that happen at deploy: runtime support, node-port claims
//! across apps, target-port assignment and instance environments.

use std::collections::{BTreeMap, HashSet};
use std::ops::RangeInclusive;

use super::diagnostic::{ConfigError, Diagnostic};
use super::types::{AppConfig, Protocol, ServiceConfig};
use super::validate::limit_help;

/// The exact message for a service that uses `image`.
pub const IMAGE_UNSUPPORTED: &str =
    "container images are not supported by this node runtime; use `command`";

/// Rejects what this node runtime cannot run: `image`, or no `command`.
///
/// # Errors
///
/// One diagnostic per offending service, in file order.
pub fn check_deployable(app: &AppConfig) -> Result<(), ConfigError> {
    let src = &app.source;
    let mut diags = Vec::new();
    for service in app.services.values() {
        if let Some(span) = &service.image_span {
            diags.push(src.diagnostic(
                span.clone(),
                IMAGE_UNSUPPORTED,
                "replace `image` with command = \"...\" that starts your app",
            ));
        } else if service.command.is_none() {
            diags.push(src.diagnostic(
                service.span.clone(),
                format!("service \"{}\" has no `command`", service.name),
                "add command = \"...\" with the program to run, e.g. command = \"./server\"",
            ));
        }
    }
    ConfigError::check(diags)
}

/// A node port already published by a deployed app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodePortClaim {
    /// The published port.
    pub node_port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// App holding it.
    pub app: String,
    /// Service holding it.
    pub service: String,
}

/// Diagnostics for node ports of `app` already claimed by other apps.
///
/// Claims held by `app` itself (by name) are ignored: a redeploy replaces them.
pub fn check_node_port_claims(
    app: &AppConfig,
    claims: impl IntoIterator<Item = NodePortClaim>,
) -> Vec<Diagnostic> {
    let claims: Vec<_> = claims.into_iter().filter(|c| c.app != app.name).collect();
    let mut diags = Vec::new();
    for service in app.services.values() {
        for port in &service.ports {
            let (Some(node_port), Some(span)) = (port.node_port, &port.node_port_span) else {
                continue;
            };
            let protocol = port.kind.protocol();
            let holder = claims
                .iter()
                .find(|c| c.node_port == node_port && c.protocol == protocol);
            if let Some(c) = holder {
                diags.push(app.source.diagnostic(
                    span.clone(),
                    format!(
                        "node_port {node_port}/{protocol} is already taken by app \"{}\" service \"{}\"",
                        c.app, c.service
                    ),
                    format!(
                        "choose another node_port, or first remove it from app \"{}\" (`miren ports edit {} --service {} --rm-published {node_port}/{protocol}`)",
                        c.app, c.app, c.service
                    ),
                ));
            }
        }
    }
    diags.sort_by_key(|d| (d.line, d.column));
    diags
}

/// The diagnostic for a deploy of `app` that would take the node past `limit` fixed
/// instances (`--max-instances-per-node`) when the other apps run `others`; it points at the
/// service (in file order) whose instances cross the limit.
pub fn check_node_instances(app: &AppConfig, others: u64, limit: u64) -> Option<Diagnostic> {
    let total = others.saturating_add(app.fixed_instances());
    if total <= limit {
        return None;
    }
    let mut services: Vec<&ServiceConfig> = app.services.values().collect();
    services.sort_by_key(|s| s.instances_span.start);
    let mut running = others;
    let crossing = services.into_iter().find(|s| {
        running = running.saturating_add(s.concurrency.mode.fixed_instances());
        running > limit
    })?;
    Some(app.source.diagnostic(
        crossing.instances_span.clone(),
        format!(
            "this deploy would run {total} fixed instances on the node ({others} of other apps), more than the limit of {limit} per node; service \"{}\" crosses it",
            crossing.name
        ),
        limit_help(
            "lower num_instances, use mode = \"auto\", or remove apps you no longer need",
            "max-instances-per-node",
        ),
    ))
}

/// Gives every port without a number the lowest free one from `range`.
///
/// Each service runs in its own network namespace, so a number is free for a
/// port when no other port of the same service uses it with the same protocol
/// and it is not in `taken`. Services are handled by name, ports in
/// declaration order, so the result is deterministic. Nothing changes on error.
///
/// # Errors
///
/// A diagnostic for each port that found no free number.
pub fn assign_ports(
    app: &mut AppConfig,
    range: RangeInclusive<u16>,
    taken: &HashSet<(u16, Protocol)>,
) -> Result<(), ConfigError> {
    let mut assignments = Vec::new();
    let mut diags = Vec::new();
    for (name, service) in &app.services {
        let mut used: HashSet<(u16, Protocol)> = service
            .ports
            .iter()
            .filter_map(|p| Some((p.port?, p.kind.protocol())))
            .collect();
        for (index, port) in service.ports.iter().enumerate() {
            if port.port.is_some() {
                continue;
            }
            let protocol = port.kind.protocol();
            let free = range
                .clone()
                .find(|n| !used.contains(&(*n, protocol)) && !taken.contains(&(*n, protocol)));
            match free {
                Some(n) => {
                    used.insert((n, protocol));
                    assignments.push((name.clone(), index, n));
                }
                None => diags.push(app.source.diagnostic(
                    port.span.clone(),
                    format!(
                        "no free {protocol} port left in {}-{} for port \"{}\" of service \"{name}\"",
                        range.start(),
                        range.end(),
                        port.name
                    ),
                    "set `port` for this entry, or widen the agent's port range",
                )),
            }
        }
    }
    ConfigError::check(diags)?;
    for (service, index, n) in assignments {
        if let Some(port) = app
            .services
            .get_mut(&service)
            .and_then(|s| s.ports.get_mut(index))
        {
            port.port = Some(n);
        }
    }
    Ok(())
}

/// A port that still has no number when an instance environment is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port \"{port}\" of service \"{service}\" has no port number; assign ports first")]
pub struct UnassignedPortError {
    /// Service name.
    pub service: String,
    /// Port name.
    pub port: String,
}

/// The environment of one instance of `service`.
///
/// App `env`, then service `env` (which wins), then `PORT` (first http port,
/// else first port) and, for services with more than one port, `PORT_1..PORT_N`
/// in declaration order.
///
/// # Errors
///
/// If a port has no number (see [`assign_ports`]).
pub fn instance_env(
    app: &AppConfig,
    service: &ServiceConfig,
) -> Result<BTreeMap<String, String>, UnassignedPortError> {
    let number = |port: &super::types::PortSpec| {
        port.port.ok_or_else(|| UnassignedPortError {
            service: service.name.clone(),
            port: port.name.clone(),
        })
    };
    let mut env: BTreeMap<String, String> = app
        .env
        .iter()
        .chain(&service.env)
        .map(|v| (v.key.clone(), v.value.clone()))
        .collect();
    if let Some(primary) = service.primary_port() {
        env.insert("PORT".to_owned(), number(primary)?.to_string());
    }
    if service.ports.len() > 1 {
        for (i, port) in service.ports.iter().enumerate() {
            env.insert(format!("PORT_{}", i + 1), number(port)?.to_string());
        }
    }
    Ok(env)
}
