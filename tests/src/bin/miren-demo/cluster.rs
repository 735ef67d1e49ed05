//! `cargo xtask demo --cluster`: three nodes and a client in network namespaces on one bridge,
//! a real 3-member etcd cluster (one member per node) and a real agent per node with
//! `--store etcd` and a node-port data plane. It deploys the example apps through node 0,
//! shows where the scheduler placed them, UDP through every node's address and HTTP through
//! every node's ingress, then kills one agent with SIGKILL and shows its instance placed
//! again elsewhere and the traffic still answered. Every command is printed with its real
//! output, every step is checked.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use miren_tests::{
    cluster::{CLIENT_IP, EtcdCluster, Fabric, node_ip},
    cluster_agents::{ClusterAgents, node_name},
    process::miren,
};

use crate::{
    Stop,
    node::{heading, quote_all, shown},
    showcase::{HOST, UDP_NODE_PORT, example, round_trip},
};

/// Nodes of the demo cluster.
const NODES: usize = 3;
/// How long deployed instances get to become endpoints, and lost ones to be replaced.
const WAIT: Duration = Duration::from_secs(90);

/// The running cluster; dropping it stops the agents (their instances with them), the etcd
/// members and deletes the namespaces.
struct Cluster {
    agents: ClusterAgents,
    _etcd: EtcdCluster,
    fabric: Fabric,
}

impl Cluster {
    /// `miren ARGS` against node `i`, printed with its output.
    fn miren(&self, i: usize, args: &[&str]) -> Result<String> {
        println!(
            "\n{}$ miren {}",
            node_name(i),
            quote_all(args.iter().copied())
        );
        shown(
            miren(&self.agents.node_dir(i).join("agent.sock"), args),
            "miren",
        )
    }

    /// `miren --output json ARGS` against node `i`, parsed, not printed.
    fn json(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = miren(&self.agents.node_dir(i).join("agent.sock"), &all);
        ensure!(
            out.status.success(),
            "miren {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A fresh UDP socket in the client namespace (3 s read timeout).
    fn client_socket(&self) -> Result<UdpSocket> {
        let socket = self
            .fabric
            .client()
            .context("the client namespace")?
            .run(|| UdpSocket::bind((CLIENT_IP, 0)))
            .context("entering the client namespace")??;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(socket)
    }

    /// Ready endpoints of `app`, as node `i` lists them.
    fn ready(&self, i: usize, app: &str) -> Result<usize> {
        let services = self.json(i, &["endpoints", app])?;
        Ok(services
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_object().into_iter().flatten())
            .map(|(_, addrs)| addrs.as_array().map_or(0, Vec::len))
            .sum())
    }
}

/// One showcase step.
type Step = fn(&mut Cluster, &Stop) -> Result<()>;

/// Sets up, shows, waits (unless `once`) and cleans up; returns the failed steps.
///
/// # Errors
/// When the cluster cannot be set up or the apps do not become ready.
pub fn run(once: bool, stop: &Stop) -> Result<Vec<String>> {
    heading("setting up 3 nodes and a client on one bridge, etcd on every node");
    let fabric = Fabric::new("demo", NODES, true).context("creating the namespaces")?;
    for i in 0..NODES {
        println!(
            "node namespace {} (eth0 {})",
            fabric.node(i).name(),
            node_ip(i)
        );
    }
    println!("client namespace (eth0 {CLIENT_IP})");
    stop.check()?;
    let etcd = EtcdCluster::start(&fabric, NODES);
    println!("etcd members: {}", etcd.endpoints().join(", "));
    stop.check()?;
    let agents = ClusterAgents::start_with_dataplane(
        &fabric,
        &etcd,
        NODES,
        "auto",
        &["--stop-instances-on-exit"],
    );
    println!(
        "agents running: miren-agent run --store etcd --etcd-endpoints … --node-name nodeI --node-ip 10.95.0.I --iface eth0 --dataplane auto --cluster-token-file … (logs in {})",
        agents.dir().display()
    );
    let mut cluster = Cluster {
        agents,
        _etcd: etcd,
        fabric,
    };
    deploy(&cluster, stop)?;
    let mut failures = Vec::new();
    let steps: [(&str, Step); 3] = [
        ("UDP through every node's address", |c, _| udp_everywhere(c)),
        ("HTTP through every node's ingress", |c, _| {
            http_everywhere(c)
        }),
        ("a node dies", failover),
    ];
    for (name, step) in steps {
        if stop.requested() {
            failures.push(format!("{name}: interrupted"));
            continue;
        }
        heading(name);
        if let Err(e) = step(&mut cluster, stop) {
            println!("FAILED: {e:#}");
            failures.push(format!("{name}: {e:#}"));
        }
    }
    if !once && !stop.requested() {
        heading("try it yourself");
        println!(
            "every node's API: MIREN_SOCKET={}/nodeI/agent.sock miren nodes; Ctrl-C stops and removes everything",
            cluster.agents.dir().display()
        );
        stop.wait();
    }
    heading("cleaning up");
    Ok(failures)
}

/// Deploys both examples through node 0 and waits until their instances are endpoints.
fn deploy(cluster: &Cluster, stop: &Stop) -> Result<()> {
    heading("the cluster");
    cluster.miren(0, &["nodes"])?;
    cluster.miren(0, &["status"])?;
    heading("deploying examples/hello-web and examples/udp-echo through node0");
    for name in ["hello-web", "udp-echo"] {
        stop.check()?;
        cluster.miren(0, &["deploy", &example(name)?.to_string_lossy()])?;
    }
    cluster.miren(0, &["route", "set", HOST, "hello-web"])?;
    let started = Instant::now();
    while cluster.ready(0, "udp-echo")? < 2 || cluster.ready(0, "hello-web")? < 1 {
        stop.check()?;
        if started.elapsed() > WAIT {
            bail!(
                "the instances were not ready in time:\n{}",
                cluster.agents.logs()
            );
        }
        stop.sleep(Duration::from_millis(200));
    }
    println!("ready after {:.1} s", started.elapsed().as_secs_f64());
    cluster.miren(1, &["app", "show", "udp-echo"])?;
    cluster.miren(2, &["endpoints", "udp-echo"])?;
    cluster.miren(0, &["nodes"])?;
    Ok(())
}

/// UDP from fresh client sockets to every node's address: replies come from the address
/// used; over all of them both instances answer.
fn udp_everywhere(cluster: &mut Cluster) -> Result<()> {
    let mut instances = BTreeSet::new();
    for i in 0..NODES {
        let to: SocketAddr = (node_ip(i), UDP_NODE_PORT).into();
        for k in 1..=3 {
            let socket = cluster.client_socket()?;
            let message = format!("ping {k} via {}", node_name(i));
            let (from, reply) = round_trip(&socket, &message, to)?;
            println!("client -> {to} {message:?}   reply from {from}: {reply:?}");
            ensure!(from == to, "the reply came from {from}, not from {to}");
            if let Some((instance, _)) = reply.split_once(": ") {
                instances.insert(instance.to_owned());
            }
        }
    }
    println!(
        "--> every reply came from the address the client used; instances that answered: {}",
        instances.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// curl through every node's ingress.
fn http_everywhere(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.fabric.client().context("the client namespace")?;
    for i in 0..NODES {
        let url = format!("http://{}/", node_ip(i));
        let args = ["-s", "-H", &format!("Host: {HOST}"), url.as_str()];
        println!("\nclient$ curl {}", quote_all(args.iter().copied()));
        let out = client.command("curl").args(args).output()?;
        let body = shown(out, "curl")?;
        ensure!(
            body.starts_with("hello from hello-web"),
            "unexpected answer {body:?}"
        );
    }
    Ok(())
}

/// Kills the agent of a node (not node 0) that runs a udp-echo instance, then shows the
/// instance placed elsewhere once the node's lease ended, and traffic still answered.
fn failover(cluster: &mut Cluster, stop: &Stop) -> Result<()> {
    let placed = cluster.json(0, &["app", "show", "udp-echo"])?["services"][0]["placed_on"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let victim = (1..NODES)
        .find(|i| placed.contains(&node_name(*i)))
        .context("no udp-echo instance outside node0")?;
    println!(
        "\n$ kill -9 <miren-agent of {}>   # its lease (3 s) then ends",
        node_name(victim)
    );
    cluster.agents.kill9(victim);
    let killed = Instant::now();
    loop {
        stop.check()?;
        let placed =
            cluster.json(0, &["app", "show", "udp-echo"])?["services"][0]["placed_on"].to_string();
        if !placed.contains(&node_name(victim)) && cluster.ready(0, "udp-echo")? >= 2 {
            break;
        }
        if killed.elapsed() > WAIT {
            bail!("udp-echo was not placed again:\n{}", cluster.agents.logs());
        }
        stop.sleep(Duration::from_millis(200));
    }
    println!(
        "--> placed again and ready {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    cluster.miren(0, &["nodes"])?;
    cluster.miren(0, &["app", "show", "udp-echo"])?;
    let survivors: Vec<usize> = (0..NODES).filter(|i| *i != victim).collect();
    for i in survivors {
        let to: SocketAddr = (node_ip(i), UDP_NODE_PORT).into();
        let socket = cluster.client_socket()?;
        let (from, reply) = round_trip(&socket, "after the failover", to)?;
        println!("client -> {to} \"after the failover\"   reply from {from}: {reply:?}");
        ensure!(from == to, "the reply came from {from}, not from {to}");
    }
    Ok(())
}
