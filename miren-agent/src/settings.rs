//! Agent settings: command-line flags over `/etc/miren/agent.toml` (same keys as the flags,
//! e.g. `state-dir = "/var/lib/miren"`) over built-in defaults.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    config::{Limits, ValidationContext},
    dataplane::select::DataplaneChoice,
};

pub mod template;

/// The config file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/miren/agent.toml";

/// `--sandbox-subnet6` when not given: a ULA /64 ("mir" "en").
pub const DEFAULT_SANDBOX_SUBNET6: &str = "fd6d:6972:656e::/64";

/// Port of the cluster listener when `--cluster-addr` is not given.
pub const DEFAULT_CLUSTER_PORT: u16 = 7946;

/// Errors reading the settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file could not be read.
    #[error("cannot read the agent config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error(
        "{path}: {message}\n  the keys are the `miren-agent run` flags without dashes in front, e.g. state-dir = \"/var/lib/miren\""
    )]
    Parse {
        /// File.
        path: PathBuf,
        /// What toml said (with line and column).
        message: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// One layer of settings: flags or file. Every field is optional so layers can be merged.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SettingsLayer {
    /// Agent config file [default: /etc/miren/agent.toml if present].
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory for the state store [default: /var/lib/miren].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// External interface carrying node-port traffic (repeatable).
    #[arg(long = "iface")]
    #[serde(default)]
    pub iface: Vec<String>,
    /// The node's own address that node ports answer on (repeatable).
    #[arg(long = "node-ip")]
    #[serde(default)]
    pub node_ip: Vec<IpAddr>,
    /// Node-port data plane: auto, xdp or nft [default: auto].
    #[arg(long)]
    pub dataplane: Option<String>,
    /// bpffs directory for pinned maps, programs and links [default: /sys/fs/bpf/miren].
    #[arg(long)]
    pub bpf_pin_dir: Option<PathBuf>,
    /// HTTP ingress listener [default: 0.0.0.0:80].
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// HTTPS ingress listener [default: 0.0.0.0:443].
    #[arg(long)]
    pub https_addr: Option<SocketAddr>,
    /// Control API Unix socket [default: /run/miren/agent.sock].
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Prometheus /metrics listener [default: 127.0.0.1:9464].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Bridge the sandboxes attach to [default: miren0].
    #[arg(long)]
    pub sandbox_bridge: Option<String>,
    /// Subnet sandbox addresses come from [default: 10.88.0.0/16].
    #[arg(long)]
    pub sandbox_subnet: Option<String>,
    /// IPv6 subnet (/48 to /64) sandbox addresses come from, each mirroring the sandbox's IPv4
    /// address; in cluster mode each node uses the /80 matching its IPv4 subnet
    /// [default: fd6d:6972:656e::/64].
    #[arg(long, value_name = "CIDR")]
    pub sandbox_subnet6: Option<String>,
    /// ACME directory URL; enables automatic certificates.
    #[arg(long)]
    pub acme_directory: Option<String>,
    /// Contact email for the ACME account.
    #[arg(long)]
    pub acme_email: Option<String>,
    /// PEM CA certificate to verify the ACME server's HTTPS with instead of the system roots,
    /// for a private ACME CA such as Pebble.
    #[arg(long, value_name = "PATH")]
    pub acme_ca_file: Option<PathBuf>,
    /// Range for target ports the agent assigns, FIRST-LAST [default: 20000-29999].
    #[arg(long)]
    pub port_range: Option<String>,
    /// Idle time after which a UDP session through a node port may move to another endpoint,
    /// e.g. "60s", "5m" [default: 60s].
    #[arg(long)]
    pub udp_timeout: Option<String>,
    /// Time a client has to send a whole HTTP request head; slower clients get 408
    /// [default: 10s].
    #[arg(long)]
    pub http_head_timeout: Option<String>,
    /// Largest HTTP request body, e.g. "100M", "512K" or bytes; larger bodies get 413
    /// [default: 100M].
    #[arg(long)]
    pub http_max_body: Option<String>,
    /// How long a request waits for a service scaled to zero to start [default: 120s].
    #[arg(long)]
    pub boot_timeout: Option<String>,
    /// Threads serving the HTTP ingress, each with its own event loop [default: the number of
    /// CPUs the agent may run on].
    #[arg(long, value_name = "N")]
    pub http_threads: Option<usize>,
    /// Most services one app may have; a deploy with more is refused [default: 64].
    #[arg(long, value_name = "N")]
    pub max_services_per_app: Option<usize>,
    /// Most ports one service may have; a deploy with more is refused [default: 32].
    #[arg(long, value_name = "N")]
    pub max_ports_per_service: Option<usize>,
    /// Most instances of one service: a larger fixed `num_instances` is refused, and an auto
    /// service scales up to it at most [default: 64].
    #[arg(long, value_name = "N")]
    pub max_instances_per_service: Option<u32>,
    /// Most fixed instances of all apps together on this node; a deploy that would exceed
    /// it is refused [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_instances_per_node: Option<u64>,
    /// Peer (address or CIDR) whose X-Forwarded-* headers the ingress keeps (repeatable);
    /// from anyone else they are replaced.
    #[arg(long = "trusted-proxy")]
    #[serde(default)]
    pub trusted_proxy: Vec<String>,
    /// Do not run sandboxes: endpoints come only from the API (an external orchestrator).
    #[arg(long)]
    #[serde(default)]
    pub no_sandboxes: bool,
    /// How long requests in flight get to complete after SIGTERM/SIGINT (or after an upgrade
    /// took over), e.g. "30s"; the agent exits at the latest a few seconds after it
    /// [default: 30s].
    #[arg(long)]
    pub shutdown_grace: Option<String>,
    /// Take over the listeners, API socket and instances of the agent running with the same
    /// --state-dir, which then drains and exits (zero-downtime restart).
    #[arg(long)]
    #[serde(skip)]
    pub upgrade: bool,
    /// Stop every instance when the agent stops (by default instances outlive the agent and
    /// the next agent adopts them).
    #[arg(long)]
    #[serde(default)]
    pub stop_instances_on_exit: bool,
    /// Memory limit of each instance, e.g. "512M", "2G" [default: 512M].
    #[arg(long, value_name = "SIZE")]
    pub instance_memory: Option<String>,
    /// Most processes and threads of each instance [default: 512].
    #[arg(long, value_name = "N")]
    pub instance_pids: Option<u32>,
    /// CPUs each instance may use, e.g. "0.5", "2" [default: 1].
    #[arg(long, value_name = "CPUS")]
    pub instance_cpu: Option<String>,
    /// Size cap of each of an instance's log files, e.g. "10M", "1MiB"; 3 files are kept in
    /// all (the written one and 2 rotated ones) [default: 10M].
    #[arg(long, value_name = "SIZE")]
    pub instance_log_max: Option<String>,
    /// Largest app code bundle (tar) a deploy may upload, e.g. "256M", "1G" [default: 256M].
    #[arg(long, value_name = "SIZE")]
    pub max_bundle_size: Option<String>,
    /// Where the cluster's shared state lives: sqlite (this node alone, in --state-dir) or
    /// etcd (a cluster, at --etcd-endpoints) [default: sqlite].
    #[arg(long, value_name = "sqlite|etcd")]
    pub store: Option<String>,
    /// etcd client URL, e.g. http://10.0.0.1:2379 (repeatable, or comma-separated).
    #[arg(long = "etcd-endpoints", value_delimiter = ',', value_name = "URL")]
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// PEM CA certificate that signed etcd's server certificates (enables TLS to etcd).
    #[arg(long, value_name = "PATH")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long, value_name = "PATH")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "PATH")]
    pub etcd_key: Option<PathBuf>,
    /// Prefix of every key the cluster keeps in etcd [default: /miren].
    #[arg(long, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// This node's name in the cluster [default: the hostname].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Prefix length of the sandbox subnet each node claims out of --sandbox-subnet in
    /// cluster mode (a single node uses all of it) [default: 24].
    #[arg(long, value_name = "BITS")]
    pub node_subnet_size: Option<u8>,
    /// Listener for the other agents of the cluster (app code bundles, node-port counters),
    /// used with --store etcd [default: the first --node-ip, port 7946; 0.0.0.0:7946 without
    /// --node-ip].
    #[arg(long, value_name = "ADDR")]
    pub cluster_addr: Option<SocketAddr>,
    /// PEM CA certificate that signed every node's --cluster-cert: with --cluster-cert and
    /// --cluster-key, the cluster listener serves HTTPS, wants a client certificate signed by
    /// it, and the agent verifies its peers' certificates (IP SANs) against it.
    #[arg(long, value_name = "PATH")]
    pub cluster_ca: Option<PathBuf>,
    /// PEM certificate of this node for the cluster listener, signed by --cluster-ca with
    /// this node's address as IP SAN; also presented to the peers as client certificate.
    #[arg(long, value_name = "PATH")]
    pub cluster_cert: Option<PathBuf>,
    /// PEM private key of --cluster-cert.
    #[arg(long, value_name = "PATH")]
    pub cluster_key: Option<PathBuf>,
    /// File holding the cluster's shared secret (mode 0600): the agents of one cluster
    /// present it to each other; needed with --store etcd.
    #[arg(long, value_name = "PATH")]
    pub cluster_token_file: Option<PathBuf>,
    /// How long this node's registration and ready endpoints outlive the agent when it stops
    /// renewing them, e.g. "10s" [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub node_lease_ttl: Option<String>,
}

/// Where the shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded SQLite store in the state directory (single node).
    Sqlite,
    /// An etcd cluster.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
        /// CA certificate for TLS.
        ca: Option<PathBuf>,
        /// Client certificate.
        cert: Option<PathBuf>,
        /// Client key.
        key: Option<PathBuf>,
    },
}

/// Resolved settings with every default applied.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// State store directory.
    pub state_dir: PathBuf,
    /// External interfaces.
    pub ifaces: Vec<String>,
    /// The node's own addresses.
    pub node_ips: Vec<IpAddr>,
    /// auto, xdp or nft.
    pub dataplane: DataplaneChoice,
    /// bpffs pin directory.
    pub bpf_pin_dir: PathBuf,
    /// HTTP listener.
    pub http_addr: SocketAddr,
    /// HTTPS listener.
    pub https_addr: SocketAddr,
    /// API socket.
    pub api_socket: PathBuf,
    /// Metrics listener.
    pub metrics_addr: SocketAddr,
    /// Sandbox bridge name.
    pub sandbox_bridge: String,
    /// The cluster's sandbox subnet; each node's is carved out of it.
    pub sandbox_subnet: crate::config::Subnet,
    /// Prefix length of each node's sandbox subnet in cluster mode.
    pub node_subnet_size: u8,
    /// The cluster's IPv6 sandbox subnet, mirroring the IPv4 one.
    pub sandbox_subnet6: crate::config::Subnet6,
    /// ACME directory URL.
    pub acme_directory: Option<String>,
    /// ACME contact.
    pub acme_email: Option<String>,
    /// CA certificate trusted for the ACME server's HTTPS (instead of the system roots).
    pub acme_ca_file: Option<PathBuf>,
    /// Range for assigned target ports.
    pub port_range: RangeInclusive<u16>,
    /// UDP session idle timeout.
    pub udp_timeout: std::time::Duration,
    /// Deadline for a whole HTTP request head.
    pub http_head_timeout: std::time::Duration,
    /// Largest HTTP request body in bytes.
    pub http_max_body: u64,
    /// Scale-from-zero wait.
    pub boot_timeout: std::time::Duration,
    /// Threads serving the HTTP ingress.
    pub http_threads: usize,
    /// Size limits of apps (`--max-*`).
    pub limits: Limits,
    /// Peers whose forwarding headers are kept.
    pub trusted_proxies: Vec<crate::ingress::Cidr>,
    /// Whether the agent runs the services' instances itself.
    pub run_sandboxes: bool,
    /// Time requests in flight get to complete when the agent stops.
    pub shutdown_grace: std::time::Duration,
    /// Whether to take over from the agent running with the same state directory.
    pub upgrade: bool,
    /// Whether instances outlive the agent and are adopted by the next one.
    pub keep_sandboxes: bool,
    /// cgroup limits of every instance.
    pub instance_limits: crate::sandbox::container::InstanceLimits,
    /// Size cap of each instance log file (3 files are kept).
    pub instance_log_max: u64,
    /// Largest app code bundle accepted, in bytes.
    pub max_bundle_bytes: u64,
    /// Where the shared state lives.
    pub store: StoreChoice,
    /// This node's name.
    pub node_name: String,
    /// TTL of this node's lease.
    pub node_lease_ttl: std::time::Duration,
    /// The cluster listener and its token, in cluster mode.
    pub cluster_link: Option<ClusterLinkSettings>,
}

/// The listener the agents of a cluster talk to each other on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLinkSettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The token file (read when the agent starts).
    pub token_file: PathBuf,
    /// Mutual TLS between the agents, when configured.
    pub tls: Option<ClusterTlsFiles>,
}

/// The PEM files of the cluster listener's mutual TLS (`--cluster-ca/--cluster-cert/--cluster-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTlsFiles {
    /// CA certificate(s) the nodes' certificates are signed by.
    pub ca: PathBuf,
    /// This node's certificate (chain).
    pub cert: PathBuf,
    /// The certificate's private key.
    pub key: PathBuf,
}

impl SettingsLayer {
    /// Merges the flags (`self`) over the config file (explicit `--config`, else
    /// [`DEFAULT_CONFIG_FILE`] if it exists) over the defaults.
    ///
    /// # Errors
    /// [`SettingsError`] for an unreadable or invalid file or value.
    pub fn resolve(self) -> Result<AgentSettings, SettingsError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => SettingsLayer::default(),
        };
        let store = store_choice(&self, &file)?;
        let sandbox_subnet = crate::config::Subnet::parse(
            &self
                .sandbox_subnet
                .clone()
                .or(file.sandbox_subnet.clone())
                .unwrap_or_else(|| "10.88.0.0/16".into()),
        )
        .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        let sandbox_subnet6 = crate::config::Subnet6::parse(
            &self
                .sandbox_subnet6
                .clone()
                .or(file.sandbox_subnet6.clone())
                .unwrap_or_else(|| DEFAULT_SANDBOX_SUBNET6.into()),
        )
        .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        let node_subnet_size = self
            .node_subnet_size
            .or(file.node_subnet_size)
            .unwrap_or(24);
        if store != StoreChoice::Sqlite && !(sandbox_subnet.prefix..=28).contains(&node_subnet_size)
        {
            return Err(SettingsError::Invalid(format!(
                "--node-subnet-size {node_subnet_size} does not fit --sandbox-subnet {sandbox_subnet}; use a prefix length from {} to 28",
                sandbox_subnet.prefix
            )));
        }
        let dataplane = self
            .dataplane
            .or(file.dataplane)
            .unwrap_or_else(|| "auto".into());
        let dataplane = DataplaneChoice::from_name(&dataplane).ok_or_else(|| {
            SettingsError::Invalid(format!(
                "unknown data plane \"{dataplane}\"; use auto, xdp or nft"
            ))
        })?;
        let port_range = self
            .port_range
            .or(file.port_range)
            .unwrap_or_else(|| "20000-29999".into());
        let node_name = node_name(self.node_name.or(file.node_name))?;
        let node_lease_ttl = duration_setting(
            "--node-lease-ttl",
            self.node_lease_ttl.or(file.node_lease_ttl),
            std::time::Duration::from_secs(10),
        )?;
        if node_lease_ttl < std::time::Duration::from_secs(2) {
            return Err(SettingsError::Invalid(
                "--node-lease-ttl must be at least 2s".into(),
            ));
        }
        let cluster_tls = cluster_tls_files(
            self.cluster_ca.or(file.cluster_ca),
            self.cluster_cert.or(file.cluster_cert),
            self.cluster_key.or(file.cluster_key),
        )?;
        let node_ips = prefer_flags(self.node_ip, file.node_ip);
        let cluster_link = match (&store, self.cluster_token_file.or(file.cluster_token_file)) {
            (StoreChoice::Sqlite, _) => None,
            (StoreChoice::Etcd { .. }, Some(token_file)) => Some(ClusterLinkSettings {
                addr: self.cluster_addr.or(file.cluster_addr).unwrap_or_else(|| {
                    SocketAddr::new(
                        node_ips
                            .first()
                            .copied()
                            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
                        DEFAULT_CLUSTER_PORT,
                    )
                }),
                token_file,
                tls: cluster_tls,
            }),
            (StoreChoice::Etcd { .. }, None) => {
                return Err(SettingsError::Invalid(
                    "--store etcd needs --cluster-token-file: a file (mode 0600) with the secret every agent of the cluster shares, e.g. made with `head -c 32 /dev/urandom | base64 > /etc/miren/cluster-token; chmod 600 /etc/miren/cluster-token`".into(),
                ));
            }
        };
        Ok(AgentSettings {
            max_bundle_bytes: match self.max_bundle_size.or(file.max_bundle_size) {
                None => crate::bundle::DEFAULT_MAX_BUNDLE_BYTES,
                Some(text) => parse_size(&text).filter(|bytes| *bytes > 0).ok_or_else(|| {
                    SettingsError::Invalid(format!(
                        "--max-bundle-size \"{text}\" is not a size; use e.g. 256M or 1G"
                    ))
                })?,
            },
            cluster_link,
            store,
            node_name,
            node_lease_ttl,
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/miren".into()),
            ifaces: prefer_flags(self.iface, file.iface),
            node_ips,
            dataplane,
            bpf_pin_dir: self
                .bpf_pin_dir
                .or(file.bpf_pin_dir)
                .unwrap_or_else(|| "/sys/fs/bpf/miren".into()),
            http_addr: self
                .http_addr
                .or(file.http_addr)
                .unwrap_or(([0, 0, 0, 0], 80).into()),
            https_addr: self
                .https_addr
                .or(file.https_addr)
                .unwrap_or(([0, 0, 0, 0], 443).into()),
            api_socket: self
                .api_socket
                .or(file.api_socket)
                .unwrap_or_else(|| "/run/miren/agent.sock".into()),
            metrics_addr: self
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or(([127, 0, 0, 1], 9464).into()),
            sandbox_bridge: self
                .sandbox_bridge
                .or(file.sandbox_bridge)
                .unwrap_or_else(|| "miren0".into()),
            sandbox_subnet,
            node_subnet_size,
            sandbox_subnet6,
            acme_directory: self.acme_directory.or(file.acme_directory),
            acme_email: self.acme_email.or(file.acme_email),
            acme_ca_file: self.acme_ca_file.or(file.acme_ca_file),
            port_range: parse_port_range(&port_range)?,
            udp_timeout: duration_setting(
                "UDP timeout",
                self.udp_timeout.or(file.udp_timeout),
                crate::dataplane::xdp::DEFAULT_UDP_TIMEOUT,
            )?,
            http_head_timeout: duration_setting(
                "HTTP head timeout",
                self.http_head_timeout.or(file.http_head_timeout),
                std::time::Duration::from_secs(10),
            )?,
            http_max_body: match self.http_max_body.or(file.http_max_body) {
                None => 100 << 20,
                Some(text) => parse_size(&text).ok_or_else(|| {
                    SettingsError::Invalid(format!(
                        "HTTP body limit \"{text}\" is not a size; use e.g. 100M, 512K or a number of bytes"
                    ))
                })?,
            },
            boot_timeout: duration_setting(
                "boot timeout",
                self.boot_timeout.or(file.boot_timeout),
                std::time::Duration::from_secs(120),
            )?,
            http_threads: match self.http_threads.or(file.http_threads) {
                None => std::thread::available_parallelism().map_or(1, usize::from),
                Some(0) => {
                    return Err(SettingsError::Invalid(
                        "--http-threads must be at least 1".into(),
                    ));
                }
                Some(n) => n,
            },
            limits: Limits {
                services_per_app: limit_setting(
                    "max-services-per-app",
                    self.max_services_per_app.or(file.max_services_per_app),
                    Limits::DEFAULT_SERVICES_PER_APP,
                )?,
                ports_per_service: limit_setting(
                    "max-ports-per-service",
                    self.max_ports_per_service.or(file.max_ports_per_service),
                    Limits::DEFAULT_PORTS_PER_SERVICE,
                )?,
                instances_per_service: limit_setting(
                    "max-instances-per-service",
                    self.max_instances_per_service
                        .or(file.max_instances_per_service),
                    Limits::DEFAULT_INSTANCES_PER_SERVICE,
                )?,
                instances_per_node: limit_setting(
                    "max-instances-per-node",
                    self.max_instances_per_node.or(file.max_instances_per_node),
                    Limits::DEFAULT_INSTANCES_PER_NODE,
                )?,
            },
            trusted_proxies: prefer_flags(self.trusted_proxy, file.trusted_proxy)
                .iter()
                .map(|text| {
                    text.parse().map_err(|e: String| {
                        SettingsError::Invalid(format!("trusted proxy {e}"))
                    })
                })
                .collect::<Result<_, _>>()?,
            run_sandboxes: !(self.no_sandboxes || file.no_sandboxes),
            shutdown_grace: duration_setting(
                "shutdown grace",
                self.shutdown_grace.or(file.shutdown_grace),
                std::time::Duration::from_secs(30),
            )?,
            upgrade: self.upgrade,
            keep_sandboxes: !(self.stop_instances_on_exit || file.stop_instances_on_exit),
            instance_limits: instance_limits(
                self.instance_memory.or(file.instance_memory),
                self.instance_pids.or(file.instance_pids),
                self.instance_cpu.or(file.instance_cpu),
            )?,
            instance_log_max: match self.instance_log_max.or(file.instance_log_max) {
                None => 10 << 20,
                Some(text) => parse_size(&text)
                    .filter(|bytes| *bytes >= crate::sandbox::logs::MIN_FILE_BYTES)
                    .ok_or_else(|| {
                        SettingsError::Invalid(format!(
                            "--instance-log-max \"{text}\" is not a size of at least 4K; use e.g. 10M or 512K"
                        ))
                    })?,
            },
        })
    }
}

impl AgentSettings {
    /// How sandboxes get their IPv6 addresses (one node takes the whole sandbox subnet, a
    /// cluster's nodes one /`--node-subnet-size` each).
    pub fn dual_stack(&self) -> crate::config::DualStack {
        crate::config::DualStack {
            v4: self.sandbox_subnet,
            node_prefix: match self.store {
                StoreChoice::Sqlite => self.sandbox_subnet.prefix,
                StoreChoice::Etcd { .. } => self.node_subnet_size,
            },
            v6: self.sandbox_subnet6,
        }
    }

    /// The files of the cluster listener's mutual TLS, when configured (cluster mode only).
    pub fn cluster_tls(&self) -> Option<&ClusterTlsFiles> {
        self.cluster_link.as_ref()?.tls.as_ref()
    }

    /// The ingress's part of the settings.
    pub fn ingress_settings(&self) -> crate::ingress::IngressSettings {
        crate::ingress::IngressSettings {
            http_addr: self.http_addr,
            https_addr: self.https_addr,
            head_timeout: self.http_head_timeout,
            max_head_bytes: 64 << 10,
            max_body_bytes: self.http_max_body,
            boot_timeout: self.boot_timeout,
            trusted_proxies: self.trusted_proxies.clone(),
            threads: self.http_threads,
            shutdown_grace: self.shutdown_grace,
        }
    }

    /// What app validation must know about this agent: its own listener ports.
    pub fn validation_context(&self) -> ValidationContext {
        ValidationContext {
            reserved_ports: vec![
                (
                    self.http_addr.port(),
                    "the agent's HTTP listener (--http-addr)".into(),
                ),
                (
                    self.https_addr.port(),
                    "the agent's HTTPS listener (--https-addr)".into(),
                ),
                (
                    self.metrics_addr.port(),
                    "the agent's metrics listener (--metrics-addr)".into(),
                ),
            ]
            .into_iter()
            .chain(self.cluster_link.as_ref().map(|link| {
                (
                    link.addr.port(),
                    "the agent's cluster listener (--cluster-addr)".into(),
                )
            }))
            .collect(),
            limits: self.limits,
        }
    }
}

/// `--cluster-ca`, `--cluster-cert` and `--cluster-key`: all three or none.
fn cluster_tls_files(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<ClusterTlsFiles>, SettingsError> {
    match (ca, cert, key) {
        (None, None, None) => Ok(None),
        (Some(ca), Some(cert), Some(key)) => Ok(Some(ClusterTlsFiles { ca, cert, key })),
        (ca, cert, key) => {
            let missing: Vec<&str> = [
                (ca.is_none(), "--cluster-ca"),
                (cert.is_none(), "--cluster-cert"),
                (key.is_none(), "--cluster-key"),
            ]
            .into_iter()
            .filter_map(|(absent, flag)| absent.then_some(flag))
            .collect();
            Err(SettingsError::Invalid(format!(
                "TLS on the cluster listener needs --cluster-ca, --cluster-cert and --cluster-key together; {} missing: give the CA that signed every node's certificate, this node's certificate (with its node address as IP SAN) and its key, or none of the three",
                missing.join(" and ")
            )))
        }
    }
}

/// The store flags of the command line (`flags`) over the config file.
fn store_choice(flags: &SettingsLayer, file: &SettingsLayer) -> Result<StoreChoice, SettingsError> {
    let kind = flags
        .store
        .clone()
        .or_else(|| file.store.clone())
        .unwrap_or_else(|| "sqlite".into());
    let endpoints = prefer_flags(flags.etcd_endpoints.clone(), file.etcd_endpoints.clone());
    match kind.as_str() {
        "sqlite" => {
            if !endpoints.is_empty() {
                return Err(SettingsError::Invalid(
                    "--etcd-endpoints is set but the store is sqlite; add --store etcd to use etcd"
                        .into(),
                ));
            }
            Ok(StoreChoice::Sqlite)
        }
        "etcd" => {
            if endpoints.is_empty() {
                return Err(SettingsError::Invalid(
                    "--store etcd needs --etcd-endpoints, e.g. --etcd-endpoints http://10.0.0.1:2379,http://10.0.0.2:2379".into(),
                ));
            }
            let prefix = flags
                .etcd_prefix
                .clone()
                .or_else(|| file.etcd_prefix.clone())
                .unwrap_or_else(|| "/miren".into());
            if !prefix.starts_with('/') || prefix.len() < 2 {
                return Err(SettingsError::Invalid(format!(
                    "--etcd-prefix \"{prefix}\" must start with '/' and name something, e.g. /miren"
                )));
            }
            Ok(StoreChoice::Etcd {
                endpoints,
                prefix: prefix.trim_end_matches('/').to_owned(),
                ca: flags.etcd_ca.clone().or_else(|| file.etcd_ca.clone()),
                cert: flags.etcd_cert.clone().or_else(|| file.etcd_cert.clone()),
                key: flags.etcd_key.clone().or_else(|| file.etcd_key.clone()),
            })
        }
        other => Err(SettingsError::Invalid(format!(
            "unknown store \"{other}\"; use sqlite or etcd"
        ))),
    }
}

/// `--node-name`, else the hostname, lowercased: letters, digits, '-' and '.'.
fn node_name(name: Option<String>) -> Result<String, SettingsError> {
    let name = match name {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .ok_or_else(|| {
                SettingsError::Invalid(
                    "cannot read the hostname for the node name; give --node-name".into(),
                )
            })?,
    }
    .to_ascii_lowercase();
    let valid = (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if valid {
        Ok(name)
    } else {
        Err(SettingsError::Invalid(format!(
            "node name \"{name}\" is not valid; use --node-name with letters, digits, '-' and '.' (like a hostname)"
        )))
    }
}

/// A `--max-*` limit, or `default` when unset; 0 is refused (nothing could be deployed).
fn limit_setting<T: Copy + PartialEq + From<u8>>(
    flag: &str,
    value: Option<T>,
    default: T,
) -> Result<T, SettingsError> {
    match value {
        None => Ok(default),
        Some(n) if n == T::from(0) => Err(SettingsError::Invalid(format!(
            "--{flag} must be at least 1"
        ))),
        Some(n) => Ok(n),
    }
}

/// A duration setting, or `default` when unset.
fn duration_setting(
    what: &str,
    value: Option<String>,
    default: std::time::Duration,
) -> Result<std::time::Duration, SettingsError> {
    match value {
        None => Ok(default),
        Some(text) => crate::config::parse_duration(&text).ok_or_else(|| {
            SettingsError::Invalid(format!(
                "{what} \"{text}\" is not a duration; use e.g. 60s, 5m or 1h"
            ))
        }),
    }
}

/// `--instance-memory`, `--instance-pids` and `--instance-cpu` over the defaults.
fn instance_limits(
    memory: Option<String>,
    pids: Option<u32>,
    cpu: Option<String>,
) -> Result<crate::sandbox::container::InstanceLimits, SettingsError> {
    let mut limits = crate::sandbox::container::InstanceLimits::default();
    if let Some(text) = memory {
        limits.memory_bytes = parse_size(&text).filter(|b| *b >= 16 << 20).ok_or_else(|| {
            SettingsError::Invalid(format!(
                "--instance-memory \"{text}\" is not a size of at least 16M; use e.g. 512M or 2G"
            ))
        })?;
    }
    if let Some(n) = pids {
        if n < 8 {
            return Err(SettingsError::Invalid(format!(
                "--instance-pids {n} is too small for a shell and an app; use at least 8"
            )));
        }
        limits.pids = n;
    }
    if let Some(text) = cpu {
        limits.cpu_millis = text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|cpus| (0.01..=1024.0).contains(cpus))
            .map(|cpus| (cpus * 1000.0).round() as u32)
            .ok_or_else(|| {
                SettingsError::Invalid(format!(
                    "--instance-cpu \"{text}\" is not a number of CPUs from 0.01 to 1024; use e.g. 0.5 or 2"
                ))
            })?;
    }
    Ok(limits)
}

/// `100M`, `512K`, `1G` (binary multiples, also written `100MiB`) or a number of bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = match text.strip_suffix("iB") {
        Some(unit) if unit.ends_with(['k', 'K', 'm', 'M', 'g', 'G']) => unit,
        _ => text,
    };
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Repeatable flags replace the file's list when given at all.
fn prefer_flags<T>(flags: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flags.is_empty() { file } else { flags }
}

fn read_file(path: &Path) -> Result<SettingsLayer, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn parse_port_range(value: &str) -> Result<RangeInclusive<u16>, SettingsError> {
    let invalid = || {
        SettingsError::Invalid(format!(
            "port range \"{value}\" is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535, e.g. 20000-29999"
        ))
    };
    let (first, last) = value.split_once('-').ok_or_else(invalid)?;
    let first: u16 = first.trim().parse().map_err(|_| invalid())?;
    let last: u16 = last.trim().parse().map_err(|_| invalid())?;
    if first == 0 || first > last {
        return Err(invalid());
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("miren-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "state-dir = \"/srv/miren\"\nmetrics-addr = \"127.0.0.1:9100\"\niface = [\"eth1\"]\nacme-ca-file = \"/etc/miren/pebble.pem\"\n",
        )
        .unwrap();
        let flags = SettingsLayer {
            config: Some(file.clone()),
            metrics_addr: Some("127.0.0.1:9200".parse().unwrap()),
            ..SettingsLayer::default()
        };
        let settings = flags.resolve().unwrap();
        assert_eq!(settings.state_dir, PathBuf::from("/srv/miren"));
        assert_eq!(settings.metrics_addr.port(), 9200);
        assert_eq!(settings.ifaces, vec!["eth1".to_owned()]);
        assert_eq!(
            settings.acme_ca_file,
            Some(PathBuf::from("/etc/miren/pebble.pem"))
        );
        assert_eq!(settings.api_socket, PathBuf::from("/run/miren/agent.sock"));
        assert_eq!(settings.port_range, 20000..=29999);
        assert_eq!(settings.udp_timeout, std::time::Duration::from_secs(60));

        std::fs::write(&file, "state_dir = \"/srv\"\n").unwrap();
        let err = SettingsLayer {
            config: Some(file),
            ..SettingsLayer::default()
        }
        .resolve()
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("agent.toml") && message.contains("state_dir"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn http_threads_default_to_the_cpus_and_zero_is_refused() {
        let with = |threads: Option<usize>| SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            http_threads: threads,
            ..SettingsLayer::default()
        };
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(with(None).resolve().unwrap().http_threads, cpus);
        assert_eq!(with(Some(3)).resolve().unwrap().http_threads, 3);
        let err = with(Some(0)).resolve().unwrap_err().to_string();
        assert!(err.contains("--http-threads must be at least 1"), "{err}");
    }

    #[test]
    fn limits_have_defaults_file_keys_and_flags() {
        let defaults = SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            ..SettingsLayer::default()
        };
        let limits = defaults.resolve().unwrap().limits;
        assert_eq!(
            (
                limits.services_per_app,
                limits.ports_per_service,
                limits.instances_per_service,
                limits.instances_per_node
            ),
            (64, 32, 64, 1024)
        );
        assert_eq!(limits, Limits::default());

        let dir = std::env::temp_dir().join(format!("miren-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "max-services-per-app = 5\nmax-instances-per-node = 7\n",
        )
        .unwrap();
        let layer = SettingsLayer {
            config: Some(file.clone()),
            max_instances_per_node: Some(9),
            max_ports_per_service: Some(2),
            ..SettingsLayer::default()
        };
        let settings = layer.resolve().unwrap();
        assert_eq!(settings.limits.services_per_app, 5);
        assert_eq!(settings.limits.ports_per_service, 2);
        assert_eq!(settings.limits.instances_per_node, 9);
        assert_eq!(settings.validation_context().limits, settings.limits);

        let zero = SettingsLayer {
            config: Some(file),
            max_instances_per_service: Some(0),
            ..SettingsLayer::default()
        };
        let err = zero.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--max-instances-per-service must be at least 1"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn udp_timeout_is_a_duration() {
        let with = |text: &str| SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            udp_timeout: Some(text.into()),
            ..SettingsLayer::default()
        };
        assert_eq!(with("5m").resolve().unwrap().udp_timeout.as_secs(), 300);
        let err = with("soon").resolve().unwrap_err().to_string();
        assert!(
            err.contains("UDP timeout \"soon\" is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn shutdown_grace_defaults_to_30s_and_is_a_duration() {
        let with = |text: Option<&str>| SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            shutdown_grace: text.map(Into::into),
            ..SettingsLayer::default()
        };
        assert_eq!(with(None).resolve().unwrap().shutdown_grace.as_secs(), 30);
        assert_eq!(
            with(Some("5s")).resolve().unwrap().shutdown_grace.as_secs(),
            5
        );
        let err = with(Some("later")).resolve().unwrap_err().to_string();
        assert!(
            err.contains("shutdown grace \"later\" is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn instance_log_max_has_a_default_and_a_floor() {
        let with = |size: Option<&str>| SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            instance_log_max: size.map(str::to_owned),
            ..SettingsLayer::default()
        };
        assert_eq!(with(None).resolve().unwrap().instance_log_max, 10 << 20);
        assert_eq!(
            with(Some("1MiB")).resolve().unwrap().instance_log_max,
            1 << 20
        );
        let err = with(Some("1K")).resolve().unwrap_err().to_string();
        assert!(
            err.contains("--instance-log-max \"1K\" is not a size of at least 4K"),
            "{err}"
        );
    }

    #[test]
    fn sizes_and_trusted_proxies_parse() {
        assert_eq!(parse_size("100M"), Some(100 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("1234"), Some(1234));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("5iB"), None);
        let layer = SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            trusted_proxy: vec!["10.0.0.0/8".into(), "not-an-ip".into()],
            ..SettingsLayer::default()
        };
        let err = layer.resolve().unwrap_err().to_string();
        assert!(err.contains("\"not-an-ip\" is not an address"), "{err}");
    }

    #[test]
    fn cluster_tls_takes_all_three_files_or_none_and_the_listener_defaults_to_the_node_ip() {
        let etcd = |tls: [Option<&str>; 3], node_ip: Vec<IpAddr>| SettingsLayer {
            config: Some(PathBuf::from("/dev/null")),
            store: Some("etcd".into()),
            etcd_endpoints: vec!["http://10.0.0.1:2379".into()],
            cluster_token_file: Some("/etc/miren/cluster-token".into()),
            node_name: Some("node0".into()),
            node_ip,
            cluster_ca: tls[0].map(PathBuf::from),
            cluster_cert: tls[1].map(PathBuf::from),
            cluster_key: tls[2].map(PathBuf::from),
            ..SettingsLayer::default()
        };
        let link = |layer: SettingsLayer| layer.resolve().unwrap().cluster_link.unwrap();

        let plain = link(etcd([None; 3], vec!["10.0.0.7".parse().unwrap()]));
        assert_eq!(plain.addr, "10.0.0.7:7946".parse().unwrap());
        assert_eq!(plain.tls, None);
        let anywhere = link(etcd([None; 3], Vec::new()));
        assert_eq!(anywhere.addr, "0.0.0.0:7946".parse().unwrap());

        let all = link(etcd(
            [Some("ca.pem"), Some("n.pem"), Some("n.key")],
            Vec::new(),
        ));
        assert_eq!(
            all.tls,
            Some(ClusterTlsFiles {
                ca: "ca.pem".into(),
                cert: "n.pem".into(),
                key: "n.key".into(),
            })
        );

        let err = etcd([Some("ca.pem"), Some("n.pem"), None], Vec::new())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "--cluster-ca, --cluster-cert and --cluster-key together; --cluster-key missing"
            ),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("miren-cluster-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "cluster-cert = \"/etc/miren/node.pem\"\ncluster-key = \"/etc/miren/node.key\"\n",
        )
        .unwrap();
        let from_file = link(SettingsLayer {
            config: Some(file),
            ..etcd([Some("/etc/miren/ca.pem"), None, None], Vec::new())
        });
        assert_eq!(
            from_file.tls.map(|tls| tls.key),
            Some(PathBuf::from("/etc/miren/node.key"))
        );
        let _ = std::fs::remove_dir_all(&dir);

        let err = etcd([Some("ca.pem"), None, None], Vec::new())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--cluster-cert and --cluster-key missing"),
            "{err}"
        );
    }

    #[test]
    fn port_range_is_checked() {
        assert_eq!(parse_port_range("100-200").unwrap(), 100..=200);
        for bad in ["", "100", "200-100", "0-5", "1-70000", "a-b"] {
            let err = parse_port_range(bad).unwrap_err().to_string();
            assert!(err.contains("FIRST-LAST"), "{bad}: {err}");
        }
    }
}
