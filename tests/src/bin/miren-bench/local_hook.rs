//! The node-local hook's cost per connection: XDP sees only packets arriving on its
//! interfaces, so a process on the node itself connecting to `NODE_IP:node_port` is DNATed in
//! the output hook by the XDP data plane's nftables companion (table `inet miren_local`).
//!
//! The real agent (release binary) runs with `--dataplane xdp` in the test world (node
//! namespace, one sandbox with a TCP echo server behind br0). From a process in the node
//! namespace, sequential TCP connections (connect, 1-byte echo, close) go through
//! NODE_IP:7000 and, as the baseline, straight to the instance's address, interleaved in
//! rounds after a warm-up round; the median per-connection time of each is reported. The
//! agent's TCP flow counter for the node port must have counted every connection through
//! NODE_IP:7000 (the companion's count rules), showing they took that path.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use miren_agent::api::types::NodePortInfo;
use miren_tests::{
    process::AgentProcess,
    world::{NODE_IP, Plane, World, sandbox_ip},
};

/// Measured rounds (after one warm-up round), each timing both paths.
const ROUNDS: usize = 7;
/// Sequential connections per path and round.
const CONNECTIONS: usize = 1_000;

/// Median µs per connection through the node port and straight to the instance.
pub struct LocalHook {
    through: f64,
    straight: f64,
}

impl LocalHook {
    /// Prints the table.
    pub fn print(&self) {
        println!(
            "\n## Node-local hook (XDP's nftables companion): TCP connection from the node (connect, 1-byte echo, close), median of {ROUNDS} rounds of {CONNECTIONS}\n"
        );
        println!("| path | µs/connection | ratio to the instance directly |");
        println!("|---|---:|---:|");
        println!(
            "| to the instance directly (baseline) | {:.1} | 1.00 |",
            self.straight
        );
        println!(
            "| through NODE_IP:7000 (companion DNAT, output hook) | {:.1} | {:.2} |",
            self.through,
            self.through / self.straight
        );
        println!(
            "\n(node-local hook cost: {:+.1} µs per connection)",
            self.through - self.straight
        );
    }
}

/// The TCP flows the agent counted for node port 7000.
fn tcp_flows(agent: &AgentProcess) -> Result<u64> {
    let out = agent.miren(&["ports", "--output", "json"]);
    if !out.status.success() {
        bail!("miren ports: {out:?}");
    }
    let ports: Vec<NodePortInfo> = serde_json::from_slice(&out.stdout)?;
    ports
        .into_iter()
        .find(|p| p.node_port == 7000 && p.protocol == "tcp")
        .and_then(|p| p.traffic)
        .map(|t| t.flows)
        .context("no TCP traffic for node port 7000 in miren ports")
}

/// Runs the measurement.
pub fn run() -> Result<LocalHook> {
    let world = World::new(1);
    let agent = world.start_agent(Plane::Xdp);
    world.deploy(&agent);
    let node_port: SocketAddr = format!("{NODE_IP}:7000").parse()?;
    let direct: SocketAddr = format!("{}:9000", sandbox_ip(0)).parse()?;
    // µs per connection over CONNECTIONS sequential connections to `to`.
    let connect = |to: SocketAddr| -> Result<f64> {
        world.node.run(|| -> Result<f64> {
            let start = Instant::now();
            for _ in 0..CONNECTIONS {
                let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                    .with_context(|| format!("connecting to {to}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.write_all(b"x")?;
                let mut buf = [0u8; 1];
                stream
                    .read_exact(&mut buf)
                    .with_context(|| format!("echo from {to}"))?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e6 / CONNECTIONS as f64)
        })?
    };
    let before = tcp_flows(&agent)?;
    connect(direct)?;
    connect(node_port)?;
    let mut through = Vec::new();
    let mut straight = Vec::new();
    for _ in 0..ROUNDS {
        through.push(connect(node_port)?);
        straight.push(connect(direct)?);
    }
    // The last flows' counts may trail the connections slightly.
    let expected = ((ROUNDS + 1) * CONNECTIONS) as u64;
    let mut counted = tcp_flows(&agent)? - before;
    for _ in 0..20 {
        if counted >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        counted = tcp_flows(&agent)? - before;
    }
    eprintln!(
        "companion: {counted} TCP flows counted for node port 7000 ({expected} connections made)"
    );
    if counted < expected {
        bail!(
            "only {counted} of {expected} connections through NODE_IP:7000 were counted by the companion"
        );
    }
    Ok(LocalHook {
        through: median(&mut through),
        straight: median(&mut straight),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
