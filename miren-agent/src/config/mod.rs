//! `.miren/app.toml`: raw serde structs → validated [`AppConfig`].
//!
//! Every problem becomes a [`Diagnostic`] with file, line, column, the
//! offending line and a hint; all of them are reported at once, in file order.
//!
//! Defaults: a service named `web` scales with `mode = "auto"`
//! ([`DEFAULT_REQUESTS_PER_INSTANCE`] requests per instance, idle instances
//! stopped after [`DEFAULT_SCALE_DOWN_DELAY`]); other services run `mode =
//! "fixed"` with one instance. `shutdown_timeout` defaults to
//! [`DEFAULT_SHUTDOWN_TIMEOUT`]. Port `type` defaults to `http`; with the simple
//! fields, `port_name` defaults to the port type.

mod deploy;
mod diagnostic;
mod duration;
mod keys;
mod raw;
mod subnet;
mod types;
mod validate;

#[cfg(test)]
mod tests;

pub use deploy::{
    IMAGE_UNSUPPORTED, NodePortClaim, UnassignedPortError, assign_ports, check_deployable,
    check_node_instances, check_node_port_claims, instance_env,
};
pub use diagnostic::{ConfigError, Diagnostic, Source, Span};
pub use duration::parse_duration;
pub use subnet::{DualStack, NODE_PREFIX6, Subnet, Subnet6, Subnet6Error, SubnetError};
pub use types::{
    AppConfig, Concurrency, ConcurrencyMode, DEFAULT_REQUESTS_PER_INSTANCE,
    DEFAULT_SCALE_DOWN_DELAY, DEFAULT_SHUTDOWN_TIMEOUT, EnvVar, PortKind, PortSpec, Protocol,
    ServiceConfig,
};
pub use validate::{
    Limits, RESERVED_NODE_PORTS, ValidationContext, is_dns_label, parse_app_config,
};

/// Parses, validates and checks that this node runtime can run the app (what both
/// `miren validate` and a deploy do before touching any state).
///
/// # Errors
/// All diagnostics, in file order.
pub fn parse_deployable(source: Source, ctx: &ValidationContext) -> Result<AppConfig, ConfigError> {
    let app = parse_app_config(source, ctx)?;
    check_deployable(&app)?;
    Ok(app)
}
