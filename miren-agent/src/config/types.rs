//! The validated app configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::diagnostic::{Source, Span};

/// `requests_per_instance` when `mode = "auto"` leaves it out.
pub const DEFAULT_REQUESTS_PER_INSTANCE: u32 = 10;
/// `scale_down_delay` when `mode = "auto"` leaves it out (15 minutes).
pub const DEFAULT_SCALE_DOWN_DELAY: Duration = Duration::from_secs(15 * 60);
/// `shutdown_timeout` when left out (10 seconds).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A validated `.miren/app.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// App name, a DNS label.
    pub name: String,
    /// Top-level `[[env]]`, in file order.
    pub env: Vec<EnvVar>,
    /// Services by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// The file this was parsed from, for later diagnostics (deploy checks).
    pub source: Source,
}

impl AppConfig {
    /// The instances of the app's fixed services together (auto services count 0: they
    /// start on demand).
    pub fn fixed_instances(&self) -> u64 {
        self.services
            .values()
            .map(|s| s.concurrency.mode.fixed_instances())
            .sum()
    }
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// Variable name.
    pub key: String,
    /// Variable value.
    pub value: String,
}

/// `[services.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Service name, a DNS label.
    pub name: String,
    /// Command line run in the sandbox.
    pub command: Option<String>,
    /// Container image; parsed but rejected by [`check_deployable`](super::check_deployable).
    pub image: Option<String>,
    /// Service `env`, in file order; overrides top-level entries.
    pub env: Vec<EnvVar>,
    /// Scaling settings, defaults applied.
    pub concurrency: Concurrency,
    /// Ports in declaration order.
    pub ports: Vec<PortSpec>,
    pub(crate) span: Span,
    pub(crate) image_span: Option<Span>,
    /// `num_instances` if written, else the service table (for the per-node limit).
    pub(crate) instances_span: Span,
}

impl ServiceConfig {
    /// The first http port, if any (the one routes send traffic to).
    pub fn http_port(&self) -> Option<&PortSpec> {
        self.ports.iter().find(|p| p.kind == PortKind::Http)
    }

    /// The port `PORT` points at: the first http port, else the first port.
    pub fn primary_port(&self) -> Option<&PortSpec> {
        self.http_port().or(self.ports.first())
    }
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Name, unique within the service.
    pub name: String,
    /// Target port inside the sandbox; `None` until [`assign_ports`](super::assign_ports).
    pub port: Option<u16>,
    /// http, tcp or udp.
    pub kind: PortKind,
    /// Published port on the node (tcp/udp only).
    pub node_port: Option<u16>,
    pub(crate) span: Span,
    pub(crate) node_port_span: Option<Span>,
}

/// A port's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortKind {
    /// Reached through HTTP routes.
    Http,
    /// Raw TCP.
    Tcp,
    /// Raw UDP.
    Udp,
}

impl PortKind {
    /// The transport protocol: udp for `Udp`, tcp otherwise.
    pub fn protocol(self) -> Protocol {
        match self {
            Self::Udp => Protocol::Udp,
            Self::Http | Self::Tcp => Protocol::Tcp,
        }
    }

    /// The name used in `app.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol of a port or node port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// `tcp` or `udp` back to the protocol.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[services.NAME.concurrency]` with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    /// Fixed or auto scaling.
    pub mode: ConcurrencyMode,
    /// How long an instance gets to exit after SIGTERM.
    pub shutdown_timeout: Duration,
}

/// How many instances a service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConcurrencyMode {
    /// Always exactly `num_instances`.
    Fixed {
        /// Number of instances, at least 1.
        num_instances: u32,
    },
    /// Started on demand, scaled by load.
    Auto {
        /// Concurrent requests one instance takes before another starts.
        requests_per_instance: u32,
        /// How long an idle instance is kept before it is stopped.
        scale_down_delay: Duration,
    },
}

impl ConcurrencyMode {
    /// `num_instances` of a fixed service, 0 for an auto service.
    pub fn fixed_instances(&self) -> u64 {
        match self {
            Self::Fixed { num_instances } => u64::from(*num_instances),
            Self::Auto { .. } => 0,
        }
    }
}

impl Concurrency {
    /// The default for a service: `web` is auto, everything else fixed with 1 instance.
    pub fn default_for(service: &str) -> Self {
        let mode = if service == "web" {
            ConcurrencyMode::Auto {
                requests_per_instance: DEFAULT_REQUESTS_PER_INSTANCE,
                scale_down_delay: DEFAULT_SCALE_DOWN_DELAY,
            }
        } else {
            ConcurrencyMode::Fixed { num_instances: 1 }
        };
        Self {
            mode,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}
