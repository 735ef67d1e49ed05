//! `cargo xtask bench dataplane`: measures the XDP node-port data plane against baselines
//! measured in the same run, and prints a table.
//!
//! 1. ns per packet through BPF_PROG_TEST_RUN (kernel-measured average over many
//!    repetitions): established UDP flow, new UDP flow (idle timeout 0, so every packet
//!    re-creates its flow), non-service pass — against the empty XDP program `miren_empty`.
//! 2. UDP packets per second delivered to a sandbox, flooding from a client namespace over
//!    many flows: through NODE_IP:node_port with XDP (DNAT + TC reverse NAT attached
//!    natively) and with the nftables data plane, vs routing straight to the sandbox address
//!    without NAT (same topology, same run).
//! 3. Update latency (see `update_latency.rs`): from an endpoint change sent to the real agent
//!    until new flows reach the new endpoint, with 1 and with 10,000 node ports configured,
//!    for both data planes.
//!
//! `cargo xtask bench ingress` (see `ingress.rs`): the HTTP ingress against nginx.
//! `cargo xtask bench cluster` (see `cluster.rs`): cluster mode on a real etcd cluster.

mod cluster;
mod ingress;
mod update_latency;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use miren_agent::{
    bpf::PacketCounter,
    config::Protocol,
    dataplane::{
        Dataplane, NodePortKey, Snapshot, Snapshot4, nft::NftDataplane, xdp::XdpDataplane,
    },
};
use miren_tests::{
    packet::{Endpoint, FrameBuilder},
    topology::{Netns, veth},
};

/// The agent's allocator, so the Pingora floor proxy (started from this binary) runs with it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REPEAT: u32 = 2_000_000;
const FLOOD: Duration = Duration::from_secs(3);
const FLOWS: u16 = 64;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 1);
const SANDBOX_IP: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 2);

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        None | Some("dataplane") => {
            dataplane()?;
            update_latency::run()
        }
        Some("ingress") => ingress::run(),
        Some("cluster") => cluster::run(),
        // Started by `ingress` as the Pingora floor row's proxy.
        Some("pingora-floor") => {
            let addr = |n: usize| -> Result<std::net::SocketAddr> {
                let text = std::env::args()
                    .nth(n)
                    .context("usage: pingora-floor LISTEN BACKEND")?;
                text.parse()
                    .with_context(|| format!("{text:?} is not an address"))
            };
            ingress::serve_pingora_floor(addr(2)?, addr(3)?)
        }
        Some(other) => {
            bail!("unknown benchmark {other:?}; available: dataplane, ingress, cluster")
        }
    }
}

fn dataplane() -> Result<()> {
    let test_run = per_packet()?;
    let flood = delivered()?;
    println!("\n## XDP per-packet cost (BPF_PROG_TEST_RUN, {REPEAT} repetitions each)\n");
    println!("| path | ns/packet | ratio to empty XDP |");
    println!("|---|---:|---:|");
    let empty = test_run[0].1;
    for (name, ns) in &test_run {
        println!("| {name} | {ns:.1} | {:.2} |", ns / empty);
    }
    println!(
        "\n## UDP flood delivered to a sandbox ({FLOWS} flows, {} s each)\n",
        FLOOD.as_secs()
    );
    println!("| path | sent pps | delivered pps | ratio to direct routing |");
    println!("|---|---:|---:|---:|");
    let direct = flood[0].2;
    for (name, sent, delivered) in &flood {
        println!(
            "| {name} | {sent:.0} | {delivered:.0} | {:.2} |",
            delivered / direct
        );
    }
    Ok(())
}

/// NODE_IP with UDP node port 7000 forwarding to `backend`.
fn udp_node_port(backend: SocketAddrV4) -> Snapshot {
    let key = NodePortKey {
        port: 7000,
        protocol: Protocol::Udp,
    };
    Snapshot4 {
        node_addrs: vec![NODE_IP],
        node_ports: BTreeMap::from([(key, vec![backend])]),
    }
    .into()
}

/// Average kernel-measured ns per run of `program` on `frame`.
fn ns_per_packet(program: &Xdp, frame: &[u8]) -> Result<f64> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    // The kernel reports the average duration of one repetition.
    Ok(result.duration.as_nanos() as f64)
}

fn per_packet() -> Result<Vec<(&'static str, f64)>> {
    let mut baseline = PacketCounter::load()?;
    let client = Endpoint {
        mac: [2, 0, 0, 0, 0, 1],
        ip: Ipv4Addr::new(198, 51, 100, 7),
        port: 40_001,
    };
    let node = |port| Endpoint {
        mac: [2, 0, 0, 0, 0, 2],
        ip: NODE_IP,
        port,
    };
    let to_service = FrameBuilder::udp(client, node(7000))
        .payload(&[0u8; 64])
        .build();
    let to_other = FrameBuilder::udp(client, node(7001))
        .payload(&[0u8; 64])
        .build();
    let empty = ns_per_packet(baseline.empty_program()?, &to_service)?;

    let mut dp = XdpDataplane::load()?;
    // BPF_PROG_TEST_RUN repeats on the same buffer, so the program sees its own output again:
    // a backend equal to the node port keeps every repetition on the node-port path (the
    // rewrite and both checksum updates still run each time).
    dp.apply(&udp_node_port(SocketAddrV4::new(NODE_IP, 7000)))?;
    let established = ns_per_packet(dp.xdp_program()?, &to_service)?;
    let pass = ns_per_packet(dp.xdp_program()?, &to_other)?;
    dp.set_udp_timeout(Duration::ZERO)?;
    let new_flow = ns_per_packet(dp.xdp_program()?, &to_service)?;
    let counters = dp.counters()?;
    let flows = counters.ports.values().map(|p| p.flows).sum::<u64>();
    if flows < u64::from(REPEAT) {
        bail!("the new-flow run created only {flows} flows; it did not measure the new-flow path");
    }
    Ok(vec![
        ("empty XDP program (baseline)", empty),
        ("non-service packet (pass)", pass),
        ("established UDP flow (DNAT)", established),
        (
            "new UDP flow (Maglev + 2 conntrack inserts + DNAT)",
            new_flow,
        ),
    ])
}

/// Client → node → sandbox; the node runs the XDP data plane on its client-facing veth.
fn delivered() -> Result<Vec<(&'static str, f64, f64)>> {
    let client = Netns::new("bench-client")?;
    let node = Netns::new("bench-node")?;
    let sandbox = Netns::new("bench-sandbox")?;
    veth(&client, "eth0", &node, "eth0")?;
    client.addr("eth0", &format!("{CLIENT_IP}/24"))?;
    node.addr("eth0", &format!("{NODE_IP}/24"))?;
    client.route(&["10.89.0.0/24", "via", &NODE_IP.to_string()])?;
    client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    veth(&node, "sb0", &sandbox, "eth0")?;
    node.addr("sb0", "10.89.0.1/24")?;
    sandbox.addr("eth0", &format!("{SANDBOX_IP}/24"))?;
    sandbox.route(&["default", "via", "10.89.0.1"])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;

    let snapshot = udp_node_port(SocketAddrV4::new(SANDBOX_IP, 9000));
    let mut xdp = XdpDataplane::load()?;
    node.run(|| xdp.attach("eth0", false))??;
    xdp.apply(&snapshot)?;

    let receiver = sandbox.run(|| UdpSocket::bind((SANDBOX_IP, 9000)))??;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let sockets: Vec<UdpSocket> = client.run(|| {
        (0..FLOWS)
            .map(|_| UdpSocket::bind((CLIENT_IP, 0)))
            .collect::<Result<_, _>>()
    })??;

    let flood = |target: SocketAddrV4| {
        std::thread::sleep(Duration::from_millis(300));
        let before = received.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut sent = 0u64;
        let payload = [0u8; 64];
        while started.elapsed() < FLOOD {
            for socket in &sockets {
                if socket.send_to(&payload, target).is_ok() {
                    sent += 1;
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let delivered = received.load(Ordering::Relaxed) - before;
        (sent as f64 / elapsed, delivered as f64 / elapsed)
    };
    let node_port = SocketAddrV4::new(NODE_IP, 7000);
    let mut results = Vec::new();
    let (sent, delivered) = flood(SocketAddrV4::new(SANDBOX_IP, 9000));
    results.push(("direct routing to the sandbox (no NAT)", sent, delivered));
    let (sent, delivered) = flood(node_port);
    results.push(("XDP node port (DNAT)", sent, delivered));
    report_counters("XDP", &xdp.counters()?);
    drop(xdp);
    if node.ip(&["link", "show", "dev", "eth0"])?.contains("xdp") {
        bail!("XDP is still attached after the XDP data plane was dropped");
    }
    let nft = node.run(|| -> Result<NftDataplane> {
        let mut nft = NftDataplane::open()?;
        nft.apply(&snapshot)?;
        Ok(nft)
    })??;
    let (sent, delivered) = flood(node_port);
    results.push(("nftables node port (DNAT)", sent, delivered));
    report_counters("nftables", &node.run(|| nft.counters())??);
    stop.store(true, Ordering::Relaxed);
    let _ = counter.join();
    Ok(results)
}

/// Prints what the kernel counted for the node port, showing the flood took that path.
fn report_counters(plane: &str, counters: &miren_agent::dataplane::Counters) {
    let port = counters.ports.values().copied().next().unwrap_or_default();
    eprintln!(
        "{plane} kernel counters for the node port: rx {} packets, {} flows",
        port.rx_packets, port.flows
    );
}
