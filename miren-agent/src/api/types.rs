//! JSON bodies of the control API, shared by the agent (server) and the `miren` CLI (client).
//!
//! All paths are under `/v1`. Errors come back as [`ErrorBody`] with a non-2xx status.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

pub use crate::ingress::certs::{CertInfo, CertSource};

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Agent version.
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// State directory holding the store.
    pub state_dir: String,
    /// Number of deployed apps.
    pub apps: usize,
    /// Number of routes.
    pub routes: usize,
    /// Number of published node ports.
    pub node_ports: usize,
    /// Active data plane and why it was chosen.
    pub dataplane: DataplaneStatus,
}

/// Which data plane forwards node ports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataplaneStatus {
    /// `xdp`, `nft`, or `none`.
    pub mode: String,
    /// Why this mode is active.
    pub reason: String,
}

/// `POST /v1/apps`: deploy (create or replace) an app from its app.toml text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeployRequest {
    /// The file name to show in error messages, e.g. `./.miren/app.toml`.
    pub source_name: String,
    /// The app.toml text.
    pub toml: String,
    /// Absolute path of the app directory on this node: instances run there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
}

/// `GET /v1/apps` items.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppSummary {
    /// App name.
    pub name: String,
    /// Deploy counter, 1 for the first deploy.
    pub version: u64,
    /// Unix time of the last deploy.
    pub deployed_at: u64,
    /// Service names.
    pub services: Vec<String>,
}

/// `GET /v1/apps/{name}` and the answer to a deploy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppDetail {
    /// App name.
    pub name: String,
    /// Deploy counter.
    pub version: u64,
    /// Unix time of the last deploy.
    pub deployed_at: u64,
    /// Where the app.toml came from.
    pub source_name: String,
    /// Services with their ports.
    pub services: Vec<ServiceDetail>,
    /// Routes pointing at this app.
    pub routes: Vec<RouteInfo>,
}

/// A service of a deployed app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceDetail {
    /// Service name.
    pub name: String,
    /// Command run in each instance.
    pub command: Option<String>,
    /// `fixed N` or `auto`.
    pub concurrency: String,
    /// Ports in declaration order.
    pub ports: Vec<PortInfo>,
    /// Environment of an instance (app env, service env, PORT, PORT_1..N).
    pub env: BTreeMap<String, String>,
    /// Its instances, when this agent runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceStatus>,
}

/// The instances of a service run by the agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Instances whose process runs.
    pub running: usize,
    /// Instances that are endpoints.
    pub ready: usize,
    /// Restarts after an exit.
    pub restarts: u64,
    /// How the last instance exit ended.
    pub last_exit: Option<String>,
    /// True when instances keep exiting soon after they start.
    pub crash_loop: bool,
}

/// `GET /v1/apps/{app}/logs` answer: new lines since the cursor.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogChunk {
    /// Lines in instance order, each with the instance that wrote it.
    pub lines: Vec<LogLine>,
    /// Pass back as `after` to get only what follows.
    pub cursor: String,
}

/// One line an instance wrote to stdout or stderr.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    /// Instance name (`SERVICE-ID`).
    pub instance: String,
    /// The line, without its newline.
    pub line: String,
}

/// One port of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortInfo {
    /// Port name.
    pub name: String,
    /// `http`, `tcp` or `udp`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Target port inside the sandbox.
    pub port: u16,
    /// True when the agent picked `port` because app.toml left it out.
    pub assigned: bool,
    /// Published node ports of this port.
    pub node_ports: Vec<u16>,
}

/// A route: host → app service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteInfo {
    /// Normalized host (lowercase, punycode), possibly `*.domain`.
    pub host: String,
    /// Target app.
    pub app: String,
    /// Target service (has an http port).
    pub service: String,
    /// Upstream timeout in milliseconds when set for this route (else the ingress default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `PUT /v1/routes/{host}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteRequest {
    /// Target app.
    pub app: String,
    /// Target service; when absent the app's `web` service, else its only http service.
    pub service: Option<String>,
    /// Upstream timeout for this route in milliseconds (default: the ingress default, 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `GET /v1/ports[?app=APP]` items: a published node port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodePortInfo {
    /// Port on the node's addresses.
    pub node_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Owning app.
    pub app: String,
    /// Owning service.
    pub service: String,
    /// Service port name it forwards to.
    pub port_name: String,
    /// Target port inside the sandboxes.
    pub target_port: u16,
    /// Current endpoints (address:target_port).
    pub endpoints: Vec<SocketAddr>,
    /// `ok`, `pending: …` or `error: reason` from the data plane.
    pub status: String,
    /// Traffic from the data plane's kernel counters; absent without a data plane or before
    /// the node port is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<PortTraffic>,
}

/// Counts since the node port was created and per-second rates over the last sampling
/// interval (about a second).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PortTraffic {
    /// Packets received.
    pub rx_packets: u64,
    /// IP bytes received.
    pub rx_bytes: u64,
    /// Reply packets sent.
    pub tx_packets: u64,
    /// Reply IP bytes sent.
    pub tx_bytes: u64,
    /// New flows.
    pub flows: u64,
    /// Packets dropped (no endpoints, or a balancing table being replaced).
    pub drops: u64,
    /// Received packets per second.
    pub rx_pps: f64,
    /// Received bytes per second.
    pub rx_bps: f64,
    /// Sent packets per second.
    pub tx_pps: f64,
    /// Sent bytes per second.
    pub tx_bps: f64,
}

/// `POST /v1/apps/{app}/ports`: publish or unpublish node ports without redeploying.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortsEditRequest {
    /// Service to edit.
    pub service: String,
    /// Node ports to publish.
    pub add: Vec<PublishSpec>,
    /// Node ports to unpublish.
    pub remove: Vec<UnpublishSpec>,
}

/// `N[:PORT][/tcp|udp]`: publish node port N for the service port with target PORT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishSpec {
    /// Node port.
    pub node_port: u16,
    /// Target port; when absent, the service's only tcp/udp port (of `protocol`, if given).
    pub port: Option<u16>,
    /// `tcp` or `udp`; when absent, taken from the target port.
    pub protocol: Option<String>,
}

/// `N[/tcp|udp]`: unpublish node port N.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnpublishSpec {
    /// Node port.
    pub node_port: u16,
    /// `tcp` or `udp`; needed only when the service publishes N for both.
    pub protocol: Option<String>,
}

/// Endpoints of one service: instance addresses per port name. `GET` and `PUT
/// /v1/apps/{app}/services/{service}/endpoints`; `GET /v1/apps/{app}/endpoints` lists all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ServiceEndpoints {
    /// Service name (ignored in `PUT`, taken from the path).
    #[serde(default)]
    pub service: String,
    /// Port name → instance addresses (`ip:target_port`).
    pub endpoints: BTreeMap<String, Vec<SocketAddr>>,
}

/// Error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The full, user-facing message (may span lines, e.g. config diagnostics).
    pub error: String,
    /// Machine-readable kind: `invalid_config`, `not_found`, `conflict`, `bad_request`,
    /// `internal`.
    pub kind: String,
}

/// `PUT /v1/certs/{host}`: a user-provided certificate for HOST (exact or `*.domain`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRequest {
    /// The certificate chain, PEM, leaf first.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
    /// The certificate file's name to show in errors, e.g. `./site.crt`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// The key file's name to show in errors.
    #[serde(default)]
    pub key_file: Option<String>,
}
