//! `cargo xtask bench dataplane`: measures the XDP node-port data plane against baselines
//! measured in the same run, and prints a table.
//!
//! 1. ns per packet through BPF_PROG_TEST_RUN (kernel-measured average over many
//!    repetitions): established UDP flow, new UDP flow (idle timeout 0, so every packet
//!    re-creates its flow), non-service pass — against the empty XDP program `miren_empty`.
//! 2. UDP packets per second delivered to a sandbox, flooding from a client namespace over
//!    many flows: through NODE_IP:node_port with XDP (DNAT + TC reverse NAT attached
//!    natively) and with the nftables data plane, vs routing straight to the sandbox address
//!    without NAT (same topology, same run); once over IPv4 and once over IPv6 (a dual-stack
//!    node, `[NODE_IP6]:node_port`, each family against its own direct-routing baseline).
//! 3. The node-local hook's cost per connection (see `local_hook.rs`): with the real agent on
//!    the XDP data plane, TCP connections from the node itself through NODE_IP:node_port
//!    (DNATed by the nftables companion `inet miren_local`) vs straight to the instance.
//! 4. Update latency (see `update_latency.rs`): from an endpoint change sent to the real agent
//!    until new flows reach the new endpoint, with 1 and with 10,000 node ports configured,
//!    for both data planes.
//!
//! `cargo xtask bench ingress [all|proxy|routes|two-core|large-body]` (see `ingress.rs`): the
//! HTTP ingress against nginx.
//! `cargo xtask bench cluster` (see `cluster.rs`): cluster mode on a real etcd cluster.

mod cluster;
mod ingress;
mod local_hook;
mod update_latency;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
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
        Dataplane, Family, NodePortKey, Snapshot, Snapshot4, nft::NftDataplane, xdp::XdpDataplane,
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
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x91, 0, 0, 0, 0, 0, 2);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x91, 0, 0, 0, 0, 0, 1);
const SANDBOX_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x89, 0, 0, 0, 0, 0, 2);
/// The node's address on the sandbox link, the sandbox's IPv6 gateway.
const SANDBOX_GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x89, 0, 0, 0, 0, 0, 1);

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        None | Some("dataplane") => {
            dataplane()?;
            update_latency::run()
        }
        Some("ingress") => ingress::run(std::env::args().nth(2).as_deref()),
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
    let local = local_hook::run()?;
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
    println!("| path | sent pps | delivered pps | ratio to direct routing (same family) |");
    println!("|---|---:|---:|---:|");
    for row in &flood {
        let direct = flood
            .iter()
            .find(|r| r.family == row.family)
            .map_or(f64::NAN, |r| r.delivered);
        println!(
            "| {} | {:.0} | {:.0} | {:.2} |",
            row.name,
            row.sent,
            row.delivered,
            row.delivered / direct
        );
    }
    local.print();
    Ok(())
}

/// One row of the flood table.
struct FloodRow {
    name: &'static str,
    /// The family of the flood; the first row of a family is its direct-routing baseline.
    family: Family,
    sent: f64,
    delivered: f64,
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

/// Client → node → sandbox, dual-stack; the node runs the XDP data plane on its
/// client-facing veth.
fn delivered() -> Result<Vec<FloodRow>> {
    // IPv6 on (for the IPv6 rows): the namespaces' few neighbor discovery, MLD and router
    // solicitation packets do not matter at these rates.
    let client = Netns::new_with_ipv6("bench-client")?;
    let node = Netns::new_with_ipv6("bench-node")?;
    let sandbox = Netns::new_with_ipv6("bench-sandbox")?;
    let addr6 = |ns: &Netns, dev: &str, ip: Ipv6Addr| {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            dev,
            "nodad",
        ])
    };
    veth(&client, "eth0", &node, "eth0")?;
    client.addr("eth0", &format!("{CLIENT_IP}/24"))?;
    node.addr("eth0", &format!("{NODE_IP}/24"))?;
    addr6(&client, "eth0", CLIENT_IP6)?;
    addr6(&node, "eth0", NODE_IP6)?;
    client.route(&["10.89.0.0/24", "via", &NODE_IP.to_string()])?;
    client.ip(&[
        "-6",
        "route",
        "add",
        "fd00:89::/64",
        "via",
        &NODE_IP6.to_string(),
    ])?;
    client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    veth(&node, "sb0", &sandbox, "eth0")?;
    node.addr("sb0", "10.89.0.1/24")?;
    addr6(&node, "sb0", SANDBOX_GW6)?;
    sandbox.addr("eth0", &format!("{SANDBOX_IP}/24"))?;
    addr6(&sandbox, "eth0", SANDBOX_IP6)?;
    sandbox.route(&["default", "via", "10.89.0.1"])?;
    sandbox.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &SANDBOX_GW6.to_string(),
    ])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.sysctl("net.ipv6.conf.all.forwarding", "1")?;

    // Dual-stack node port 7000: the sandbox's IPv6 endpoint is its IPv4 one's twin.
    let key = NodePortKey {
        port: 7000,
        protocol: Protocol::Udp,
    };
    let snapshot = Snapshot {
        node_addrs: vec![IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)],
        node_ports: BTreeMap::from([(
            key,
            vec![
                SocketAddr::from((SANDBOX_IP, 9000)),
                SocketAddr::from((SANDBOX_IP6, 9000)),
            ],
        )]),
    };
    let mut xdp = XdpDataplane::load()?;
    node.run(|| xdp.attach("eth0", false))??;
    xdp.apply(&snapshot)?;

    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut counters = Vec::new();
    for ip in [IpAddr::V4(SANDBOX_IP), IpAddr::V6(SANDBOX_IP6)] {
        let receiver = sandbox.run(|| UdpSocket::bind((ip, 9000)))??;
        receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        counters.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let sockets = |ip: IpAddr| -> Result<Vec<UdpSocket>> {
        Ok(client.run(|| {
            (0..FLOWS)
                .map(|_| UdpSocket::bind((ip, 0)))
                .collect::<Result<_, _>>()
        })??)
    };
    let sockets4 = sockets(IpAddr::V4(CLIENT_IP))?;
    let sockets6 = sockets(IpAddr::V6(CLIENT_IP6))?;

    let flood = |name: &'static str, target: SocketAddr| {
        let (family, sockets) = match target {
            SocketAddr::V4(_) => (Family::V4, &sockets4),
            SocketAddr::V6(_) => (Family::V6, &sockets6),
        };
        std::thread::sleep(Duration::from_millis(300));
        let before = received.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut sent = 0u64;
        let payload = [0u8; 64];
        while started.elapsed() < FLOOD {
            for socket in sockets {
                if socket.send_to(&payload, target).is_ok() {
                    sent += 1;
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let delivered = received.load(Ordering::Relaxed) - before;
        FloodRow {
            name,
            family,
            sent: sent as f64 / elapsed,
            delivered: delivered as f64 / elapsed,
        }
    };
    let node_port = SocketAddr::from((NODE_IP, 7000));
    let node_port6 = SocketAddr::from((NODE_IP6, 7000));
    // Each family's first row is its baseline.
    let mut results = vec![
        flood(
            "direct routing to the sandbox (no NAT)",
            SocketAddr::from((SANDBOX_IP, 9000)),
        ),
        flood("XDP node port (DNAT)", node_port),
        flood(
            "IPv6: direct routing to the sandbox (no NAT)",
            SocketAddr::from((SANDBOX_IP6, 9000)),
        ),
        flood("IPv6: XDP node port (DNAT)", node_port6),
    ];
    report_counters("XDP", &xdp.counters()?, key);
    drop(xdp);
    if node.ip(&["link", "show", "dev", "eth0"])?.contains("xdp") {
        bail!("XDP is still attached after the XDP data plane was dropped");
    }
    let nft = node.run(|| -> Result<NftDataplane> {
        let mut nft = NftDataplane::open()?;
        nft.apply(&snapshot)?;
        Ok(nft)
    })??;
    results.push(flood("nftables node port (DNAT)", node_port));
    results.push(flood("IPv6: nftables node port (DNAT)", node_port6));
    report_counters("nftables", &node.run(|| nft.counters())??, key);
    stop.store(true, Ordering::Relaxed);
    for counter in counters {
        let _ = counter.join();
    }
    Ok(results)
}

/// Prints what the kernel counted for the node port per family, showing the floods took
/// that path.
fn report_counters(plane: &str, counters: &miren_agent::dataplane::Counters, key: NodePortKey) {
    for (family, name) in [(Family::V4, "IPv4"), (Family::V6, "IPv6")] {
        let port = counters
            .families
            .get(&(key, family))
            .copied()
            .unwrap_or_default();
        eprintln!(
            "{plane} kernel counters for the node port, {name}: rx {} packets, {} flows",
            port.rx_packets, port.flows
        );
    }
}
