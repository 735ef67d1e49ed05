//! The node's own traffic and hairpin (issue 15), once per data plane with the same
//! assertions: a process in the node namespace and processes inside sandbox namespaces (an
//! instance calling its own app's node port, also landing on itself) reach an instance through
//! `NODE_IP:7000` over TCP and UDP, with the replies from `NODE_IP:7000` — bridged (with
//! br_netfilter's `bridge-nf-call-iptables`, this kernel's default) and routed (without it,
//! where the data plane masquerades hairpin flows); external clients
//! keep working, and every packet is counted once (with XDP: XDP's counters plus its nftables
//! companion's).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use miren_agent::api::types::{NodePortInfo, PortTraffic};
use miren_tests::{
    on_both_planes,
    process::AgentProcess,
    topology::Netns,
    world::{NODE_IP, Plane, World, sandbox_ip},
};

on_both_planes!(the_node_and_instances_reach_node_ports_counted_once);

/// The node's address on the sandboxes' bridge (br0).
const BRIDGE_IP: &str = "10.88.0.1";

/// UDP echoes per caller.
const ECHOES: u64 = 3;

/// The node port's traffic (`protocol` 7000) from `miren ports`.
fn traffic(agent: &AgentProcess, protocol: &str) -> PortTraffic {
    let out = agent.miren(&["ports", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let ports: Vec<NodePortInfo> = serde_json::from_slice(&out.stdout).unwrap();
    ports
        .into_iter()
        .find(|p| p.node_port == 7000 && p.protocol == protocol)
        .and_then(|p| p.traffic)
        .unwrap_or_else(|| panic!("no {protocol} traffic in miren ports"))
}

/// `ECHOES` UDP echoes from one socket in `ns` through NODE_IP:7000; the socket's address.
fn udp_echoes(ns: &Netns, what: &str) -> SocketAddr {
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        for i in 0..ECHOES {
            let message = format!("{what} udp {i}");
            socket.send_to(message.as_bytes(), (NODE_IP, 7000)).unwrap();
            let mut buf = [0u8; 256];
            let (len, from) = socket
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("{what}: UDP echo through NODE_IP:7000: {e}"));
            assert_eq!(&buf[..len], message.as_bytes(), "{what}");
            assert_eq!(from.to_string(), format!("{NODE_IP}:7000"), "{what}");
        }
        socket.local_addr().unwrap()
    })
    .unwrap()
}

/// One TCP echo from `ns` through NODE_IP:7000.
fn tcp_echo(ns: &Netns, what: &str) {
    ns.run(|| {
        let addr: SocketAddr = format!("{NODE_IP}:7000").parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{what}: TCP connect to NODE_IP:7000: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let message = format!("{what} over tcp");
        stream.write_all(message.as_bytes()).unwrap();
        let mut buf = vec![0u8; message.len()];
        stream
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: TCP echo: {e}"));
        assert_eq!(buf, message.as_bytes(), "{what}");
    })
    .unwrap();
}

/// UDP (rx, tx, flows) counted since `before`.
fn udp_delta(agent: &AgentProcess, before: &PortTraffic) -> (u64, u64, u64) {
    let now = traffic(agent, "udp");
    (
        now.rx_packets - before.rx_packets,
        now.tx_packets - before.tx_packets,
        now.flows - before.flows,
    )
}

/// Waits until the UDP counters since `before` reach `expected` (replies are counted as they
/// cross the node; a scrape right after the echo may just precede the count), then checks
/// they stay there.
fn assert_udp_counted(
    agent: &AgentProcess,
    before: &PortTraffic,
    expected: (u64, u64, u64),
    what: &str,
) {
    let mut delta = udp_delta(agent, before);
    for _ in 0..20 {
        if delta == expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        delta = udp_delta(agent, before);
    }
    std::thread::sleep(Duration::from_millis(200));
    let delta = udp_delta(agent, before);
    assert_eq!(
        delta,
        expected,
        "{what}: UDP (rx, tx, flows) counted once\n{}",
        agent.log_text()
    );
}

/// Sandbox `sandbox` calls NODE_IP:7000 over UDP and TCP; the UDP echoes are one flow,
/// counted once.
fn hairpin(world: &World, agent: &AgentProcess, sandbox: usize) {
    let what = format!("sandbox {sandbox}");
    let before = traffic(agent, "udp");
    udp_echoes(world.sandbox(sandbox), &what);
    assert_udp_counted(agent, &before, (ECHOES, ECHOES, 1), &what);
    tcp_echo(world.sandbox(sandbox), &what);
}

fn the_node_and_instances_reach_node_ports_counted_once(plane: Plane) {
    let world = World::new(2);
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    let one_flow = (ECHOES, ECHOES, 1);

    // (3) External clients: served by XDP (or nft), counted once.
    let before = traffic(&agent, "udp");
    let (client, from) = world.udp_echo(b"external 0");
    assert_eq!(from.to_string(), format!("{NODE_IP}:7000"));
    for i in 1..ECHOES {
        // Each from a fresh socket: a flow per echo.
        world.udp_echo(format!("external {i}").as_bytes());
    }
    assert_eq!(
        world.served_by(client),
        Some(0),
        "the client's address is kept"
    );
    assert_udp_counted(&agent, &before, (ECHOES, ECHOES, ECHOES), "external");

    // (1) A process on the node itself.
    let before = traffic(&agent, "udp");
    udp_echoes(&world.node, "node");
    assert_udp_counted(&agent, &before, one_flow, "node");
    tcp_echo(&world.node, "node");

    // (2) Hairpin: sandbox 1 calls the node port, served by sandbox 0. This kernel has
    // br_netfilter, so the DNATed packet is bridged back to sandbox 0 and the reply passes
    // conntrack on the bridge.
    hairpin(&world, &agent, 1);
    // Without it (`bridge-nf-call-iptables` 0 in the node namespace, as on a node without
    // br_netfilter) the packets are routed, and the data plane masquerades them (else
    // sandbox 0 would answer sandbox 1 directly); an instance landing on itself works too.
    for key in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        world
            .node
            .sysctl(&format!("net.bridge.{key}"), "0")
            .unwrap();
    }
    for sandbox in [1, 0] {
        hairpin(&world, &agent, sandbox);
    }
    let peers: Vec<String> = world
        .peers_of(0)
        .iter()
        .map(|p| p.ip().to_string())
        .collect();
    assert!(
        peers.iter().any(|p| p == BRIDGE_IP) && !peers.iter().any(|p| *p == sandbox_ip(0)),
        "routed hairpin callers are masqueraded: {peers:?}"
    );

    // External traffic after the local flows: still forwarded, still counted once.
    let before = traffic(&agent, "udp");
    let before_tcp = traffic(&agent, "tcp");
    for i in 0..ECHOES {
        world.udp_echo(format!("external again {i}").as_bytes());
    }
    assert_udp_counted(&agent, &before, (ECHOES, ECHOES, ECHOES), "external again");
    tcp_echo(&world.client, "external");
    let tcp = traffic(&agent, "tcp");
    assert_eq!(tcp.flows - before_tcp.flows, 1, "one TCP flow counted once");
}
