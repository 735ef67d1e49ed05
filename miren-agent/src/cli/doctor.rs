//! `miren doctor`: what this node has and lacks for the agent, each miss with what to do.
//!
//! The node's own checks (kernel, eBPF programs, bpffs, BTF, nftables, conntrack, the OCI
//! runtime, cgroups, listener ports, the store's reachability) run in the CLI's process, so
//! they work while the agent cannot start; the agent's own view (its store, the data plane in
//! use and why, in cluster mode its lease, peers and routes) comes from its API when it
//! answers. The settings are the agent's: `--config` (else `/etc/miren/agent.toml`) over the
//! defaults.

use std::{
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::Serialize;

use super::Client;
use crate::{
    api::types::{NodeInfo, Status},
    dataplane::{PinDirPlan, pin_dir_plan, select::DataplaneChoice},
    settings::{AgentSettings, SettingsLayer, StoreChoice},
};

/// How long a reachability probe (etcd, a peer) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Present and working.
    Ok,
    /// Works with less (a fallback, a missing extra).
    Warn,
    /// The agent cannot do its job until this is fixed.
    Fail,
}

/// One check: what was looked at, what was found, what to do about a miss.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name, e.g. `nftables`.
    pub check: &'static str,
    /// The outcome.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do (absent when nothing is to be done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            verdict: Verdict::Ok,
            detail: detail.into(),
            advice: None,
        }
    }

    fn miss(
        check: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        Self {
            check,
            verdict,
            detail: detail.into(),
            advice: Some(advice.into()),
        }
    }
}

/// Every check, in order.
pub fn run(config: Option<PathBuf>, client: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    let layer = SettingsLayer {
        config: config.clone(),
        ..SettingsLayer::default()
    };
    let settings = match layer.resolve() {
        Ok(settings) => {
            checks.push(Check::ok("config", config_source(config.as_deref())));
            settings
        }
        Err(error) => {
            checks.push(Check::miss(
                "config",
                Verdict::Fail,
                error.to_string(),
                "fix the config file (`miren-agent default-config` prints every key with its default); the checks below use the defaults",
            ));
            match SettingsLayer::default().resolve() {
                Ok(settings) => settings,
                Err(_) => return checks,
            }
        }
    };
    let agent = client.status().ok();
    checks.push(agent_check(agent.as_ref(), client));
    checks.push(kernel());
    checks.push(bpf_programs(&settings));
    checks.push(bpffs(&settings.bpf_pin_dir));
    checks.push(btf());
    checks.push(nftables());
    checks.push(conntrack());
    checks.extend(runtime(&settings));
    checks.push(cgroups(&settings));
    checks.extend(ports(&settings, agent.is_some()));
    checks.extend(store(&settings, agent.as_ref()));
    if let Some(status) = &agent {
        checks.push(dataplane(status, &settings));
        if matches!(settings.store, StoreChoice::Etcd { .. }) {
            checks.extend(cluster(&settings, client));
        }
    }
    checks
}

fn config_source(config: Option<&Path>) -> String {
    match config {
        Some(path) => format!("{} is valid", path.display()),
        None if Path::new(crate::settings::DEFAULT_CONFIG_FILE).exists() => {
            format!("{} is valid", crate::settings::DEFAULT_CONFIG_FILE)
        }
        None => format!(
            "no {}: the defaults apply",
            crate::settings::DEFAULT_CONFIG_FILE
        ),
    }
}

fn agent_check(status: Option<&Status>, client: &Client) -> Check {
    match status {
        Some(status) => Check::ok(
            "agent",
            format!(
                "miren-agent {} answers at {} (up {} s)",
                status.version,
                client.socket().display(),
                status.uptime_secs
            ),
        ),
        None => Check::miss(
            "agent",
            Verdict::Warn,
            format!("no agent answers at {}", client.socket().display()),
            "start it (`systemctl start miren-agent`); until it runs, the store, the data plane in use and the cluster are not checked",
        ),
    }
}

/// Linux 5.15 or later (what the XDP data plane is built and tested for).
fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= (5, 15) {
        Check::ok("kernel", format!("Linux {release}"))
    } else {
        Check::miss(
            "kernel",
            Verdict::Warn,
            format!("Linux {release}"),
            "the XDP data plane is tested on Linux 5.15 and later; on older kernels the agent may fall back to nftables: upgrade the kernel",
        )
    }
}

/// The data plane's XDP and TC programs load into this kernel (its verifier accepts them).
fn bpf_programs(settings: &AgentSettings) -> Check {
    match crate::dataplane::xdp::XdpDataplane::load() {
        Ok(_) => Check::ok(
            "ebpf",
            "the XDP and TC programs load (the kernel's verifier accepts them)",
        ),
        Err(error) => {
            let verdict = if settings.dataplane == DataplaneChoice::Xdp {
                Verdict::Fail
            } else {
                Verdict::Warn
            };
            Check::miss(
                "ebpf",
                verdict,
                format!("the XDP programs do not load: {error}"),
                "run as root (or with CAP_BPF and CAP_NET_ADMIN) on a kernel with BPF and XDP; with `dataplane = \"auto\"` node ports use nftables meanwhile",
            )
        }
    }
}

/// The pin directory is on a bpffs (or the agent can mount one at /sys/fs/bpf): the agent's
/// own decision ([`pin_dir_plan`]).
fn bpffs(pin_dir: &Path) -> Check {
    match pin_dir_plan(pin_dir) {
        PinDirPlan::Ready => Check::ok("bpffs", format!("{} is on a bpffs", pin_dir.display())),
        PinDirPlan::MountRoot => Check::miss(
            "bpffs",
            Verdict::Warn,
            "no bpffs at /sys/fs/bpf",
            "the agent mounts one there when it starts; to have it at boot: `mount -t bpf bpf /sys/fs/bpf` (systemd does this by default)",
        ),
        plan @ PinDirPlan::NotBpffs { .. } => Check::miss(
            "bpffs",
            Verdict::Fail,
            format!(
                "{} (bpf-pin-dir): {}",
                pin_dir.display(),
                plan.not_bpffs_reason().unwrap_or_default()
            ),
            format!(
                "mount one: `mount -t bpf bpf {}`, or leave bpf-pin-dir at its default",
                pin_dir.display()
            ),
        ),
    }
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::ok("btf", "/sys/kernel/btf/vmlinux is present")
    } else {
        Check::miss(
            "btf",
            Verdict::Warn,
            "the kernel exposes no BTF (/sys/kernel/btf/vmlinux)",
            "the agent's programs do not need it, but bpftool and tracing tools do: use a kernel built with CONFIG_DEBUG_INFO_BTF",
        )
    }
}

fn nftables() -> Check {
    match crate::nft_cli::run(&["list", "tables"], None) {
        Ok(Ok(_)) => Check::ok(
            "nftables",
            version("nft").unwrap_or_else(|| "nft works".into()),
        ),
        Ok(Err(refused)) => Check::miss(
            "nftables",
            Verdict::Fail,
            format!("`nft list tables` failed: {refused}"),
            "run as root; the kernel needs nf_tables (modprobe nf_tables)",
        ),
        Err(error) => Check::miss(
            "nftables",
            Verdict::Fail,
            format!("{}: {}", error.what, error.source),
            "install nftables (`apt install nftables`): the sandboxes' firewall and the nft data plane need `nft`",
        ),
    }
}

fn conntrack() -> Check {
    match version("conntrack") {
        Some(found) => Check::ok("conntrack", found),
        None => Check::miss(
            "conntrack",
            Verdict::Warn,
            "`conntrack` not found",
            "install conntrack (`apt install conntrack`): without it the UDP flows of removed instances are not flushed and wait for their timeout",
        ),
    }
}

/// runc and tini, unless the agent runs no sandboxes.
fn runtime(settings: &AgentSettings) -> Vec<Check> {
    if !settings.run_sandboxes {
        return vec![Check::ok(
            "oci-runtime",
            "not needed: no-sandboxes is set (endpoints come from the API)",
        )];
    }
    [("runc", "oci-runtime"), ("tini", "init")]
        .into_iter()
        .map(|(tool, check)| match version(tool) {
            Some(found) => Check::ok(check, found),
            None => Check::miss(
                check,
                Verdict::Fail,
                format!("`{tool}` not found"),
                format!("install it (`apt install {tool}`): every instance runs in a container started by runc with tini as its first process"),
            ),
        })
        .collect()
}

/// The cgroup controllers the instances' limits need.
fn cgroups(settings: &AgentSettings) -> Check {
    let table = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let enabled: Vec<&str> = table
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(3) == Some(&"1")).then(|| fields[0])
        })
        .collect();
    let mode = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "v1 (hybrid)"
    } else {
        "v1"
    };
    let missing: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| !enabled.contains(c))
        .collect();
    if missing.is_empty() {
        Check::ok(
            "cgroups",
            format!("{mode}: memory, pids and cpu controllers"),
        )
    } else {
        Check::miss(
            "cgroups",
            if settings.run_sandboxes {
                Verdict::Fail
            } else {
                Verdict::Warn
            },
            format!("{mode}: no {} controller", missing.join(", ")),
            format!(
                "enable them at boot (kernel command line `cgroup_enable={}`): instance limits need them",
                missing.join(",")
            ),
        )
    }
}

/// The listener ports: free (the agent can bind them) or held by the running agent.
fn ports(settings: &AgentSettings, agent_runs: bool) -> Vec<Check> {
    [
        ("http-addr", settings.http_addr),
        ("https-addr", settings.https_addr),
        ("metrics-addr", settings.metrics_addr),
    ]
    .into_iter()
    .map(|(key, addr)| {
        if agent_runs {
            return Check::ok("port", format!("{addr} ({key}): the running agent's"));
        }
        match TcpListener::bind(addr) {
            Ok(_) => Check::ok("port", format!("{addr} ({key}) is free")),
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => Check::miss(
                "port",
                Verdict::Fail,
                format!("{addr} ({key}) is taken by another process"),
                format!(
                    "stop what listens there (`ss -ltnp 'sport = :{}'` names it) or set {key} in the agent config",
                    addr.port()
                ),
            ),
            Err(error) => Check::miss(
                "port",
                Verdict::Fail,
                format!("{addr} ({key}) cannot be bound: {error}"),
                format!("run as root for ports below 1024, or set {key} to an address of this node"),
            ),
        }
    })
    .collect()
}

/// The store the agent uses (when it answers), else the state directory; and etcd's
/// endpoints, each reachable from this node.
fn store(settings: &AgentSettings, agent: Option<&Status>) -> Vec<Check> {
    let mut checks = match agent {
        Some(status) => vec![Check::ok("store", status.store.clone())],
        None if settings.store == StoreChoice::Sqlite => vec![state_dir(&settings.state_dir)],
        None => Vec::new(),
    };
    if let StoreChoice::Etcd { endpoints, .. } = &settings.store {
        checks.extend(endpoints.iter().map(|endpoint| match probe(endpoint) {
            Ok(addr) => Check::ok("etcd", format!("{endpoint} accepts connections ({addr})")),
            Err(error) => Check::miss(
                "etcd",
                Verdict::Fail,
                format!("{endpoint}: {error}"),
                "start etcd there, or fix etcd-endpoints in the agent config",
            ),
        }));
    }
    checks
}

/// The nearest existing directory at or above `dir` is writable.
fn state_dir(dir: &Path) -> Check {
    let existing = dir
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    match nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK) {
        Ok(()) if existing == dir => Check::ok("store", format!("{} is writable", dir.display())),
        Ok(()) => Check::ok(
            "store",
            format!(
                "{} will be created (in {})",
                dir.display(),
                existing.display()
            ),
        ),
        Err(error) => Check::miss(
            "store",
            Verdict::Fail,
            format!("{} is not writable: {error}", existing.display()),
            "run the agent as root, or set state-dir to a writable directory",
        ),
    }
}

fn dataplane(status: &Status, settings: &AgentSettings) -> Check {
    let detail = format!("{}: {}", status.dataplane.mode, status.dataplane.reason);
    match status.dataplane.mode.as_str() {
        "none" => Check::miss(
            "dataplane",
            Verdict::Warn,
            detail,
            "node ports are not forwarded: name the node's external interfaces (`iface = [\"eth0\"]` in the agent config) and restart the agent",
        ),
        "nft" if settings.dataplane == DataplaneChoice::Auto => Check::miss(
            "dataplane",
            Verdict::Warn,
            detail,
            "node ports run on nftables; for XDP, fix the reason above (see the ebpf check) and restart the agent",
        ),
        _ => Check::ok("dataplane", detail),
    }
}

/// Cluster mode: this node's lease, its peers' cluster listeners and the routes to their
/// sandbox subnets.
fn cluster(settings: &AgentSettings, client: &Client) -> Vec<Check> {
    let nodes = match client.nodes() {
        Ok(nodes) => nodes,
        Err(error) => {
            return vec![Check::miss(
                "cluster",
                Verdict::Fail,
                format!("the agent did not list the nodes: {error}"),
                "see the agent's log (`journalctl -u miren-agent`)",
            )];
        }
    };
    let mut checks = Vec::new();
    match nodes.iter().find(|n| n.name == settings.node_name) {
        Some(node) if node.status != "lost" => checks.push(Check::ok(
            "lease",
            format!("node {} is {} in the cluster", node.name, node.status),
        )),
        Some(node) => checks.push(Check::miss(
            "lease",
            Verdict::Fail,
            format!("node {} is lost: its lease expired", node.name),
            "the agent cannot renew its lease in etcd: check the etcd check above and the agent's log",
        )),
        None => checks.push(Check::miss(
            "lease",
            Verdict::Fail,
            format!("node {} is not registered", settings.node_name),
            "the agent has not registered: see its log (`journalctl -u miren-agent`)",
        )),
    }
    for peer in nodes.iter().filter(|n| n.name != settings.node_name) {
        checks.push(peer_link(peer));
        checks.push(peer_route(peer));
    }
    checks
}

fn peer_link(peer: &NodeInfo) -> Check {
    let Some(addr) = &peer.cluster_addr else {
        return Check::miss(
            "peer",
            Verdict::Warn,
            format!("node {} has no cluster address", peer.name),
            "its agent runs without cluster-addr: bundles and counters cannot be exchanged with it",
        );
    };
    match probe(addr) {
        Ok(_) => Check::ok("peer", format!("node {} answers at {addr}", peer.name)),
        Err(error) => Check::miss(
            "peer",
            Verdict::Fail,
            format!("node {} at {addr}: {error}", peer.name),
            "let this node reach the peer's cluster-addr (firewall, routing), and check its agent runs",
        ),
    }
}

/// The route to `peer`'s sandbox subnet goes through one of its addresses.
fn peer_route(peer: &NodeInfo) -> Check {
    let Some(gateway) = crate::config::Subnet::parse(&peer.subnet)
        .ok()
        .map(|subnet| subnet.gateway().to_string())
    else {
        return Check::miss(
            "route",
            Verdict::Warn,
            format!("node {}: unreadable subnet {:?}", peer.name, peer.subnet),
            "see `miren nodes`",
        );
    };
    let route = Command::new("ip")
        .args(["route", "get", &gateway])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    if peer
        .addresses
        .iter()
        .any(|addr| route.contains(&format!("via {addr} ")))
    {
        Check::ok(
            "route",
            format!(
                "{} (node {}) is routed via the node",
                peer.subnet, peer.name
            ),
        )
    } else {
        Check::miss(
            "route",
            Verdict::Fail,
            format!(
                "{} (node {}) is not routed via {}: {}",
                peer.subnet,
                peer.name,
                peer.addresses.join(" or "),
                route.trim()
            ),
            "the agent adds these routes itself: check its log; nodes must share an L2 segment",
        )
    }
}

/// A TCP connection to `target` (`URL` or `HOST:PORT`) opens within [`PROBE_TIMEOUT`].
fn probe(target: &str) -> Result<SocketAddr, String> {
    let host_port = target
        .split_once("://")
        .map_or(target, |(_, rest)| rest)
        .trim_end_matches('/');
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host_port} has no address"))?;
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .map(|_| addr)
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

/// The first line `tool --version` prints, if it runs and succeeds.
fn version(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let first = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_owned();
    Some(first)
}

/// The report as aligned text: one line per check, advice indented under a miss, then a
/// summary.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    for check in checks {
        let mark = match check.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        out.push_str(&format!(
            "{mark}  {:width$}  {}\n",
            check.check, check.detail
        ));
        if let Some(advice) = &check.advice {
            out.push_str(&format!("      {:width$}  → {advice}\n", ""));
        }
    }
    let count = |v| checks.iter().filter(|c| c.verdict == v).count();
    out.push_str(&format!(
        "\n{} checks: {} ok, {} warnings, {} failed\n",
        checks.len(),
        count(Verdict::Ok),
        count(Verdict::Warn),
        count(Verdict::Fail)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_are_rendered_with_their_advice_and_counted() {
        let checks = vec![
            Check::ok("kernel", "Linux 6.18"),
            Check::miss(
                "nftables",
                Verdict::Fail,
                "`nft` not found",
                "install nftables",
            ),
            Check::miss("btf", Verdict::Warn, "no BTF", "use a BTF kernel"),
        ];
        let text = render(&checks);
        assert_eq!(
            text,
            "ok    kernel    Linux 6.18\n\
             FAIL  nftables  `nft` not found\n\
             \x20               → install nftables\n\
             WARN  btf       no BTF\n\
             \x20               → use a BTF kernel\n\
             \n3 checks: 1 ok, 1 warnings, 1 failed\n"
        );
    }

    #[test]
    fn probes_take_urls_and_host_ports() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(probe(&format!("http://{addr}/")), Ok(addr));
        assert_eq!(probe(&addr.to_string()), Ok(addr));
        drop(listener);
        assert!(
            probe(&addr.to_string())
                .unwrap_err()
                .contains("connecting to")
        );
    }
}
