//! JSON bodies of the control API, shared by the agent (server) and the `miren` CLI (client).
//!
//! All paths are under `/v1`. Errors come back as [`ErrorBody`] with a non-2xx status.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

pub use super::nodes::NodeInfo;
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
    /// This node's name.
    #[serde(default)]
    pub node: String,
    /// Where the shared state lives (`sqlite at PATH`, `etcd at URLS`).
    #[serde(default)]
    pub store: String,
    /// The node that places instances now, if any.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Number of deployed apps.
    pub apps: usize,
    /// Number of routes.
    pub routes: usize,
    /// Number of published node ports.
    pub node_ports: usize,
    /// Active data plane and why it was chosen.
    pub dataplane: DataplaneStatus,
    /// The largest app code bundle the agent accepts, in bytes (`--max-bundle-size`).
    #[serde(default)]
    pub max_bundle_bytes: u64,
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
    /// The SHA-256 (hex) of the app's code bundle, uploaded before with
    /// `PUT /v1/bundles/{sha256}`: instances run from the agent's unpacked copy of it. An app
    /// deployed without one runs without `/app`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
}

/// `GET /v1/bundles/{sha256}` (also `HEAD`) and the answer to `PUT /v1/bundles/{sha256}`
/// (body: the tar): a code bundle this agent has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleInfo {
    /// The SHA-256 of the tar, 64 lowercase hex digits.
    pub sha256: String,
    /// Size of the tar in bytes.
    pub size: u64,
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

/// What a secret environment value is shown as.
pub const SECRET_MASK: &str = "********";

/// Parts of an environment variable's name (matched case-insensitively anywhere in it) that
/// mark its value as secret.
pub const SECRET_KEY_PARTS: &[&str] = &[
    "PASSWORD",
    "SECRET",
    "TOKEN",
    "KEY",
    "CREDENTIAL",
    "PRIVATE",
];

/// True when the value of environment variable `key` is a secret (its name contains one of
/// [`SECRET_KEY_PARTS`], in any case), e.g. `DB_PASSWORD`, `api_key`, `GithubToken`.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
}

impl AppDetail {
    /// Replaces the value of every secret environment variable ([`is_secret_key`]) with
    /// [`SECRET_MASK`].
    pub fn mask_secrets(&mut self) {
        for service in &mut self.services {
            for (key, value) in &mut service.env {
                if is_secret_key(key) {
                    SECRET_MASK.clone_into(value);
                }
            }
        }
    }
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
    /// Environment of an instance (app env, service env, PORT, PORT_1..N); secret values
    /// are [`SECRET_MASK`] unless asked for with `?show_secrets=true`.
    pub env: BTreeMap<String, String>,
    /// Its instances, when this agent runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceStatus>,
    /// Where the scheduler placed a fixed service's instances: a node name per instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placed_on: Vec<String>,
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
    /// Why instances cannot be started now (e.g. no free sandbox address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/apps/{app}/logs` answer: new lines since the cursor.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogChunk {
    /// Lines in time order (the instances' lines merged), each with the instance that wrote
    /// it.
    pub lines: Vec<LogLine>,
    /// Pass back as `after` to get only what follows.
    pub cursor: String,
    /// True when the answer stopped at its size limit (about 1 MiB) and more lines are
    /// there: ask again with `after` = `cursor`.
    #[serde(default)]
    pub more: bool,
}

/// One line an instance wrote to stdout or stderr.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    /// Instance name (`SERVICE-ID`).
    pub instance: String,
    /// The line, without its newline.
    pub line: String,
    /// When the agent's log shim read it: RFC 3339 UTC with nanoseconds, fixed width
    /// (`2026-11-30T05:04:57.123456789Z`); absent for logs written before timestamps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
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
    /// Upstream timeout for this route in milliseconds, 1 to [`MAX_ROUTE_TIMEOUT_MS`]
    /// (default: the ingress default, 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `POST /v1/routes`: a route file to import (`miren route import FILE`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteImportRequest {
    /// The file's name, for errors (`FILE:LINE: …`).
    pub file: String,
    /// The file's text: one `HOST APP [SERVICE] [TIMEOUT]` per line.
    pub text: String,
}

/// The answer to a route import: all of the file's routes were set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteImport {
    /// The file's name.
    pub file: String,
    /// Routes set.
    pub routes: usize,
    /// How many of them replaced a route of the same host.
    pub replaced: usize,
}

/// The longest route timeout, in milliseconds (24 hours).
pub const MAX_ROUTE_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

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
    /// Traffic from the data plane's kernel counters (in a cluster: summed over the nodes
    /// that answered); absent without a data plane or before the node port is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<PortTraffic>,
    /// Each node's own counts, when the agent asked the other nodes of a cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_node: BTreeMap<String, PortTraffic>,
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
    /// The same per address family of the packets (`ipv4`, `ipv6`), the parts of the
    /// totals above; absent from agents without per-family counters. Its entries have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_family: BTreeMap<String, PortTraffic>,
}

impl PortTraffic {
    /// Adds another node's counts and rates, in total and per family.
    pub fn add(&mut self, other: &Self) {
        for (family, traffic) in &other.by_family {
            self.by_family
                .entry(family.clone())
                .or_default()
                .add(traffic);
        }
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.flows += other.flows;
        self.drops += other.drops;
        self.rx_pps += other.rx_pps;
        self.rx_bps += other.rx_bps;
        self.tx_pps += other.tx_pps;
        self.tx_bps += other.tx_bps;
    }
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
    /// Node port, 1-65535.
    #[serde(deserialize_with = "port_number")]
    pub node_port: u16,
    /// Target port, 1-65535; when absent, the service's only tcp/udp port (of `protocol`, if
    /// given).
    #[serde(default, deserialize_with = "optional_port_number")]
    pub port: Option<u16>,
    /// `tcp` or `udp`; when absent, taken from the target port.
    pub protocol: Option<String>,
}

/// `N[/tcp|udp]`: unpublish node port N.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnpublishSpec {
    /// Node port, 1-65535.
    #[serde(deserialize_with = "port_number")]
    pub node_port: u16,
    /// `tcp` or `udp`; needed only when the service publishes N for both.
    pub protocol: Option<String>,
}

/// Deserializes a port number, refusing anything but an integer from 1 to 65535 with a
/// message saying so.
fn port_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    struct PortVisitor;

    impl serde::de::Visitor<'_> for PortVisitor {
        type Value = u16;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a port number from 1 to 65535")
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u16, E> {
            u16::try_from(n)
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u16, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
            }
        }
    }

    deserializer.deserialize_u64(PortVisitor)
}

/// [`port_number`] for an optional port (`null` or absent is `None`).
fn optional_port_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    struct Port(#[serde(deserialize_with = "port_number")] u16);

    Ok(Option::<Port>::deserialize(deserializer)?.map(|Port(n)| n))
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
    /// The node each instance address runs on (answers only; ignored in `PUT`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_of: BTreeMap<std::net::IpAddr, String>,
}

/// Error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The full, user-facing message (may span lines, e.g. config diagnostics).
    pub error: String,
    /// Machine-readable kind: `invalid_config`, `not_found`, `conflict`, `bad_request`,
    /// `too_large`, `internal`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_match_anywhere_in_any_case() {
        for key in [
            "DB_PASSWORD",
            "password",
            "AWS_SECRET_ACCESS_KEY",
            "GithubToken",
            "API_KEY",
            "GOOGLE_CREDENTIALS",
            "private_pem",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["PORT", "LOG_LEVEL", "DATABASE_URL", "PUBLIC_HOST"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn port_numbers_outside_1_to_65535_are_refused_with_the_range() {
        let publish = |json: &str| serde_json::from_str::<PublishSpec>(json);
        let spec = publish(r#"{"node_port": 7000, "port": null, "protocol": "udp"}"#).unwrap();
        assert_eq!((spec.node_port, spec.port), (7000, None));
        let spec = publish(r#"{"node_port": 65535, "port": 1}"#).unwrap();
        assert_eq!((spec.node_port, spec.port), (65535, Some(1)));
        for (json, found) in [
            (r#"{"node_port": 70000}"#, "integer `70000`"),
            (r#"{"node_port": 0}"#, "integer `0`"),
            (r#"{"node_port": -1}"#, "integer `-1`"),
            (r#"{"node_port": 80, "port": 65536}"#, "integer `65536`"),
            (r#"{"node_port": 1.5}"#, "floating point `1.5`"),
        ] {
            let err = publish(json).unwrap_err().to_string();
            assert!(
                err.contains(found) && err.contains("expected a port number from 1 to 65535"),
                "{json}: {err}"
            );
        }
        let err = serde_json::from_str::<UnpublishSpec>(r#"{"node_port": 99999}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("from 1 to 65535"), "{err}");
    }
}
