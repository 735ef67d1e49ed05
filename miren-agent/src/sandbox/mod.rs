//! Sandboxes: each service instance runs its command in its own network namespace behind the
//! agent's bridge, and the ready ones become the service's endpoints.
//!
//! - [`ipam`]: persisted address allocation from `--sandbox-subnet`.
//! - [`net`]: the bridge and the per-instance namespace and veth (iproute2).
//! - [`container`]: the OCI container (runc) an instance runs in: namespaces, user, seccomp,
//!   filesystem, cgroup limits.
//! - [`instance`]: the container's process, its log and its stop.
//! - [`dns`]: the resolver on the bridge address (`<service>.app.miren` within an app).
//! - [`logs`]: the per-instance log shim (rotated, size-capped files) and reading them back.
//! - [`isolation`]: the nftables rules isolating apps on the bridge (no spoofing, no traffic
//!   across apps, only DNS and the public listeners on the node).
//! - [`runner`]: one supervisor per service (fixed or auto concurrency, readiness, restarts,
//!   rolling replacement) and the endpoints it publishes.

pub mod container;
pub mod dns;
pub mod instance;
pub mod ipam;
pub mod isolation;
pub mod logs;
pub mod net;
pub mod runner;

use std::path::PathBuf;

/// Errors of the sandbox runner.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--sandbox-subnet` is not usable.
    #[error(transparent)]
    Subnet(#[from] crate::config::SubnetError),
    /// A node's sandbox address outside the cluster's `--sandbox-subnet` (the node's subnet
    /// was claimed with other settings).
    #[error(
        "sandbox address {0} is outside --sandbox-subnet; every agent of a cluster needs the same --sandbox-subnet and --node-subnet-size"
    )]
    OutsideSubnet(std::net::Ipv4Addr),
    /// Every address of the subnet is taken.
    #[error("no free sandbox address left in the /{0} subnet; pass a larger --sandbox-subnet")]
    SubnetFull(u8),
    /// An `ip` command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The app's code bundle (named by its short hash) is not on this node.
    #[error("the app's code bundle {0} is not on this node")]
    MissingBundle(String),
    /// The node runs as many instances as it may.
    #[error(
        "the node already runs its limit of {0} instances; raise --max-instances-per-node or remove apps"
    )]
    NodeFull(usize),
    /// The OCI runtime (runc) failed.
    #[error("{op}: {detail}")]
    Runtime {
        /// What was being done.
        op: String,
        /// What runc said, or why it could not run.
        detail: String,
    },
    /// The sandbox firewall (nftables) refused a change or a name; nothing of it was applied.
    #[error("{op}: {detail}")]
    Firewall {
        /// What was being done.
        op: String,
        /// What nft said, or what is wrong with the name.
        detail: String,
    },
    /// A file or process operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    pub(crate) fn io(op: String, source: std::io::Error) -> Self {
        Self::Io { op, source }
    }
}

/// Where sandboxes live.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Bridge name (`--sandbox-bridge`).
    pub bridge: String,
    /// This node's IPv4 sandbox subnet; its first address is the bridge's.
    pub subnet: ipam::Subnet,
    /// How sandboxes' IPv6 addresses mirror their IPv4 ones (this node's /80 of
    /// `--sandbox-subnet6`: `dual_stack.node_subnet6(subnet)`), used unless the node has
    /// IPv6 off.
    pub dual_stack: crate::config::DualStack,
    /// `<state-dir>/sandbox`: addresses, logs, containers.
    pub state_dir: PathBuf,
    /// Leave instances running when the agent stops, and adopt them when it starts (the
    /// default; `--stop-instances-on-exit` turns it off).
    pub keep_running: bool,
    /// cgroup limits of every instance.
    pub limits: container::InstanceLimits,
    /// Most instances on this node (`--max-instances-per-node`).
    pub max_instances: usize,
    /// TCP ports of the node's public listeners (the ingress) that instances may reach.
    pub listener_ports: Vec<u16>,
    /// Size cap of each of an instance's log files (`--instance-log-max`); the log keeps
    /// [`logs::DEFAULT_KEEP_FILES`] files in all.
    pub log_max: u64,
}
