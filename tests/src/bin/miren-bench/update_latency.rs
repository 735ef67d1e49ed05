//! Update latency of the node-port data planes with the real agent: the time from an
//! endpoint change sent to the agent's API until new flows reach the new endpoint, with 1 and
//! with 10,000 node ports configured, for XDP and nftables.
//!
//! A probe sends one UDP datagram per new flow (a fresh client socket each time, so the flow
//! is balanced anew) to NODE_IP:7000 and checks which sandbox echoed it; the endpoint flips
//! between sandbox 0 and 1. The latency of one flip is the time from sending the change to
//! the first probe, sent after it, served by the new endpoint.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use miren_agent::api::types::{DeployRequest, ServiceEndpoints};
use miren_tests::world::{CLIENT_IP, NODE_IP, Plane, World, sandbox_ip};

/// Flips measured per configuration.
const FLIPS: usize = 10;
/// Extra node ports: services × ports per service.
const SERVICES: usize = 100;
const PORTS_PER_SERVICE: usize = 100;
/// Give up on one flip after this long.
const FLIP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs the benchmark and prints its table.
pub fn run() -> Result<()> {
    let mut rows = Vec::new();
    for plane in [Plane::Xdp, Plane::Nft] {
        let one = measure(plane, false)?;
        let many = measure(plane, true)?;
        rows.push((plane, one, many));
    }
    println!(
        "\n## Update latency: endpoint change sent to the agent → new flows reach the new endpoint ({FLIPS} flips each)\n"
    );
    println!(
        "| data plane | 1 node port: median ms | max ms | {n} node ports: median ms | max ms | ratio (median) |",
        n = SERVICES * PORTS_PER_SERVICE + 1
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (plane, one, many) in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            plane.flag(),
            median(&one),
            max(&one),
            median(&many),
            max(&many),
            median(&many) / median(&one)
        );
    }
    Ok(())
}

/// Latencies in ms of [`FLIPS`] endpoint flips on `plane`, with or without 10,000 other node
/// ports configured.
fn measure(plane: Plane, with_bulk: bool) -> Result<Vec<f64>> {
    let world = World::new(2);
    // The bulk app is far over the default app limits (64 services, 32 ports per service).
    let limits = [
        "--max-services-per-app",
        "100",
        "--max-ports-per-service",
        "100",
    ];
    let agent = world.start_agent_with_flags(plane, &limits);
    world.deploy(&agent);
    if with_bulk {
        deploy_bulk(&world)?;
    }
    miren_tests::world::wait_for_status_ok(&agent);
    let mut latencies = Vec::new();
    for flip in 0..FLIPS {
        let target = (flip + 1) % 2;
        let sent = Instant::now();
        world.put_endpoints(&[target]);
        let latency = loop {
            let probe_sent = Instant::now();
            if probe(&world)? == Some(target) {
                break probe_sent.duration_since(sent);
            }
            if sent.elapsed() > FLIP_DEADLINE {
                bail!(
                    "{plane:?}: the endpoint change was not applied within {FLIP_DEADLINE:?}\n{}",
                    agent.log_text()
                );
            }
        };
        latencies.push(latency.as_secs_f64() * 1000.0);
        // Let the status settle so the next flip starts from an applied state.
        miren_tests::world::wait_for_status_ok(&agent);
    }
    eprintln!(
        "{plane:?} with{} the 10,000 extra node ports: {latencies:.1?} ms",
        if with_bulk { "" } else { "out" }
    );
    Ok(latencies)
}

/// One new UDP flow to the node port; which sandbox echoed it (None if no echo in time).
fn probe(world: &World) -> Result<Option<usize>> {
    let local: Option<SocketAddr> = world.client.run(|| -> Result<Option<SocketAddr>> {
        let socket = UdpSocket::bind((CLIENT_IP, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        socket.send_to(b"probe", (NODE_IP, 7000))?;
        let mut buf = [0u8; 16];
        Ok(socket
            .recv_from(&mut buf)
            .ok()
            .map(|_| socket.local_addr())
            .transpose()?)
    })??;
    Ok(local.and_then(|local| world.served_by(local)))
}

/// Deploys an app with [`SERVICES`] × [`PORTS_PER_SERVICE`] UDP node ports (40000…) and
/// gives every service an endpoint.
fn deploy_bulk(world: &World) -> Result<()> {
    let mut toml = String::from("name = \"bulk\"\n");
    for s in 0..SERVICES {
        toml.push_str(&format!("\n[services.s{s}]\ncommand = \"./serve\"\n"));
        for p in 0..PORTS_PER_SERVICE {
            toml.push_str(&format!(
                "\n[[services.s{s}.ports]]\nname = \"p{p}\"\nport = {}\ntype = \"udp\"\nnode_port = {}\n",
                10_000 + p,
                40_000 + s * PORTS_PER_SERVICE + p
            ));
        }
    }
    let api = world.client_api();
    let started = Instant::now();
    api.deploy(&DeployRequest {
        source_name: "bulk/.miren/app.toml".into(),
        toml,
        bundle: None,
    })
    .context("deploying 10,000 node ports")?;
    eprintln!("deployed 10,000 node ports in {:?}", started.elapsed());
    for s in 0..SERVICES {
        let endpoints = (0..PORTS_PER_SERVICE)
            .map(|p| {
                let addr: SocketAddr = format!("{}:{}", sandbox_ip(0), 10_000 + p).parse()?;
                Ok((format!("p{p}"), vec![addr]))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        api.set_endpoints(
            "bulk",
            &format!("s{s}"),
            &ServiceEndpoints {
                service: String::new(),
                endpoints,
                ..ServiceEndpoints::default()
            },
        )?;
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}
