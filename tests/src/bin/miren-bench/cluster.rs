//! `cargo xtask bench cluster`: cluster mode with real agents on a real 3-member etcd
//! cluster, each agent and member in its own node namespace (`miren_tests::cluster`), the
//! nftables data plane on every node's eth0.
//!
//! 1. Deploy → ready: from `miren deploy` of a fixed service with 3 instances (a Python TCP
//!    server) until the endpoints of all 3 — one per node — are listed.
//! 2. Propagation: from an endpoint change sent to node 0 until every node's data plane has
//!    applied it (`/v1/ports` on each node lists the new endpoints with status `ok`), over 50
//!    changes (p50, p99).
//! 3. Both again with 1,000 more apps and 10,000 node ports in the store (each change then
//!    also re-applies 10,000 node ports on every node).
//!
//! The baseline is the same measurement on one agent with the embedded SQLite store, in the
//! same run.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use miren_agent::{
    api::types::{DeployRequest, ServiceEndpoints},
    cli::Client,
};
use miren_tests::{
    cluster::{EtcdCluster, Fabric, node_ip},
    cluster_agents::ClusterAgents,
    process::{AgentProcess, TempDir, binary},
};

/// Endpoint changes measured per configuration.
const CHANGES: usize = 50;
/// Deploys measured per configuration.
const DEPLOYS: usize = 3;
/// Bulk apps and node ports per bulk app.
const BULK_APPS: usize = 1_000;
const PORTS_PER_BULK_APP: u16 = 10;
/// Give up on one measurement after this long.
const DEADLINE: Duration = Duration::from_secs(120);

/// One configuration's numbers, in ms.
#[derive(Debug, Default)]
struct Numbers {
    deploy_ready: Vec<f64>,
    propagation: Vec<f64>,
}

/// Runs the benchmark and prints its tables.
pub fn run() -> Result<()> {
    let mut rows = Vec::new();
    for (label, nodes) in [("1 node, SQLite (baseline)", 1), ("3 nodes, etcd", 3)] {
        let (empty, bulk) = measure(nodes)?;
        rows.push((label, empty, bulk));
    }
    let base = &rows[0];
    println!(
        "\n## Cluster: deploy → all instances ready ({DEPLOYS} deploys), endpoint change → every node's data plane applied ({CHANGES} changes)\n"
    );
    println!(
        "| configuration | store | deploy→ready p50 ms | ratio | change→applied p50 ms | p99 ms | ratio (p50) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (label, empty, bulk) in &rows {
        for (store, numbers, baseline) in [
            ("empty", empty, &base.1),
            ("+1,000 apps / 10,000 node ports", bulk, &base.2),
        ] {
            println!(
                "| {label} | {store} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} |",
                percentile(&numbers.deploy_ready, 50.0),
                percentile(&numbers.deploy_ready, 50.0) / percentile(&baseline.deploy_ready, 50.0),
                percentile(&numbers.propagation, 50.0),
                percentile(&numbers.propagation, 99.0),
                percentile(&numbers.propagation, 50.0) / percentile(&baseline.propagation, 50.0),
            );
        }
    }
    Ok(())
}

/// The numbers on `nodes` nodes (1: SQLite, else etcd), with an empty store and with the bulk.
fn measure(nodes: usize) -> Result<(Numbers, Numbers)> {
    let fabric = Fabric::new("bench-cluster", 3, false).context("fabric")?;
    let etcd = (nodes > 1).then(|| EtcdCluster::start(&fabric, 3));
    let flags = [
        "--iface",
        "eth0",
        "--dataplane",
        "nft",
        "--stop-instances-on-exit",
        "--max-services-per-app",
        "100",
    ];
    let agents = match &etcd {
        Some(etcd) => Agents::Cluster(ClusterAgents::start(&fabric, etcd, nodes, &flags)),
        None => Agents::single(&fabric, &flags),
    };
    let clients = agents.clients(nodes);
    let empty = numbers(&agents, &clients, nodes)?;
    deploy_bulk(&clients[0])?;
    let bulk = numbers(&agents, &clients, nodes)?;
    Ok((empty, bulk))
}

/// The agents measured: a cluster on etcd, or the single-node baseline on SQLite.
enum Agents {
    Cluster(ClusterAgents),
    Single(AgentProcess, TempDir),
}

impl Agents {
    /// One agent with default settings (SQLite) in node 0 of `fabric`.
    fn single(fabric: &Fabric, flags: &[&str]) -> Self {
        let dir = TempDir::new("bench-single");
        let mut command = fabric
            .node(0)
            .command(&binary("miren-agent").to_string_lossy());
        command
            .args(["run", "--node-ip", &node_ip(0).to_string()])
            .args(flags)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--api-socket")
            .arg(dir.path().join("agent.sock"));
        let agent = AgentProcess::start(
            command,
            &dir.path().join("agent.sock"),
            &dir.path().join("agent.log"),
        );
        Self::Single(agent, dir)
    }

    fn clients(&self, nodes: usize) -> Vec<Client> {
        match self {
            Self::Cluster(agents) => (0..nodes)
                .map(|i| Client::new(agents.node_dir(i).join("agent.sock")))
                .collect(),
            Self::Single(_, dir) => vec![Client::new(dir.path().join("agent.sock"))],
        }
    }

    fn logs(&self) -> String {
        match self {
            Self::Cluster(agents) => agents.logs(),
            Self::Single(agent, _) => agent.log_text(),
        }
    }
}

fn numbers(agents: &Agents, clients: &[Client], nodes: usize) -> Result<Numbers> {
    let mut out = Numbers::default();
    for round in 0..DEPLOYS {
        out.deploy_ready
            .push(deploy_ready(agents, &clients[0], nodes, round)?);
    }
    out.propagation = propagation(clients)?;
    eprintln!("{nodes} node(s): {out:.1?}");
    Ok(out)
}

/// Deploys a fixed service with 3 instances and waits until all are endpoints; then removes
/// it. Returns the ms until ready.
fn deploy_ready(agents: &Agents, client: &Client, nodes: usize, round: usize) -> Result<f64> {
    let name = format!("ready{round}");
    let toml = format!(
        "name = \"{name}\"\n[services.srv]\ncommand = \"exec python3 -m http.server $PORT\"\nport = 8000\nport_type = \"tcp\"\n[services.srv.concurrency]\nmode = \"fixed\"\nnum_instances = 3\n"
    );
    let started = Instant::now();
    client.deploy(&DeployRequest {
        source_name: format!("{name}/.miren/app.toml"),
        toml,
        bundle: None,
    })?;
    loop {
        let ready = client
            .endpoints(&name)?
            .iter()
            .flat_map(|s| s.endpoints.values().flatten())
            .count();
        if ready == 3 {
            break;
        }
        if started.elapsed() > DEADLINE {
            bail!("{name} not ready on {nodes} node(s)\n{}", agents.logs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    client.remove_app(&name)?;
    Ok(ms)
}

/// Endpoint changes sent to node 0 until every node's data plane applied them.
fn propagation(clients: &[Client]) -> Result<Vec<f64>> {
    // An auto service that never gets traffic runs no instances: its endpoints are ours.
    let toml = "name = \"flip\"\n[services.udp]\ncommand = \"sleep 1\"\nconcurrency = { mode = \"auto\" }\n[[services.udp.ports]]\nname = \"udp\"\nport = 9000\ntype = \"udp\"\nnode_port = 7000\n";
    clients[0].deploy(&DeployRequest {
        source_name: "flip/.miren/app.toml".into(),
        toml: toml.into(),
        bundle: None,
    })?;
    // Each node's runner publishes the (empty) endpoints of its instances once when the
    // service appears, under the same key: let that happen before the changes.
    std::thread::sleep(Duration::from_secs(3));
    let mut latencies = Vec::with_capacity(CHANGES);
    for change in 0..CHANGES {
        let mut addrs: Vec<SocketAddr> = (0..2)
            .map(|k| format!("10.88.0.{}:9000", 2 + (change + k) % 50).parse())
            .collect::<Result<_, _>>()?;
        // The agents list endpoints sorted.
        addrs.sort();
        let sent = Instant::now();
        clients[0].set_endpoints(
            "flip",
            "udp",
            &ServiceEndpoints {
                service: "udp".into(),
                endpoints: BTreeMap::from([("udp".to_owned(), addrs.clone())]),
                ..ServiceEndpoints::default()
            },
        )?;
        for client in clients {
            wait_applied(client, &addrs, sent)?;
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    clients[0].remove_app("flip")?;
    Ok(latencies)
}

/// Waits until `client`'s node lists node port 7000 with exactly `addrs`, applied.
fn wait_applied(client: &Client, addrs: &[SocketAddr], sent: Instant) -> Result<()> {
    loop {
        let ports = client.ports(Some("flip"))?;
        if ports
            .iter()
            .any(|p| p.node_port == 7000 && p.endpoints == addrs && p.status == "ok")
        {
            return Ok(());
        }
        if sent.elapsed() > DEADLINE {
            bail!("an endpoint change was not applied within {DEADLINE:?}: {ports:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// [`BULK_APPS`] apps with [`PORTS_PER_BULK_APP`] TCP node ports each (20000…), auto
/// services that never get traffic, so no instances.
fn deploy_bulk(client: &Client) -> Result<()> {
    for app in 0..BULK_APPS {
        let mut toml = format!(
            "name = \"bulk{app}\"\n[services.svc]\ncommand = \"sleep 1\"\nconcurrency = {{ mode = \"auto\" }}\n"
        );
        for port in 0..PORTS_PER_BULK_APP {
            let node_port = 20000 + app as u16 * PORTS_PER_BULK_APP + port;
            toml.push_str(&format!(
                "[[services.svc.ports]]\nname = \"p{port}\"\nport = {}\ntype = \"tcp\"\nnode_port = {node_port}\n",
                1000 + port
            ));
        }
        client
            .deploy(&DeployRequest {
                source_name: format!("bulk{app}/.miren/app.toml"),
                toml,
                bundle: None,
            })
            .with_context(|| format!("deploying bulk{app}"))?;
    }
    Ok(())
}

/// The `p`th percentile (nearest rank) of `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
