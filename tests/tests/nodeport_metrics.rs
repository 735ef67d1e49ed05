//! Exact kernel counts in `/metrics` and `miren ports`: known numbers of packets through the
//! node port of the real agent, once per data plane, per address family (`family` label).

use std::{
    net::{IpAddr, UdpSocket},
    time::Duration,
};

use miren_agent::api::types::{NodePortInfo, PortTraffic};
use miren_tests::{
    on_both_planes,
    process::AgentProcess,
    world::{CLIENT_IP, CLIENT_IP6, NODE_IP, NODE_IP6, Plane, World, sandbox_ip, sandbox_ip6},
};

on_both_planes!(
    metrics_count_every_packet_exactly,
    metrics_count_each_family_exactly
);

/// Echoed UDP packets.
const ECHOED: u64 = 100;
/// UDP payload of each packet.
const PAYLOAD: usize = 50;
/// Packets sent while the node port has no endpoints.
const DROPPED: u64 = 5;
/// IPv4 (20) + UDP (8) headers.
const HEADERS: u64 = 28;
/// IPv6 (40) + UDP (8) headers.
const HEADERS6: u64 = 48;

/// Echoed UDP packets over IPv4 and over IPv6 in the dual-stack test (different, so a count
/// in the wrong family shows).
const ECHOED4: u64 = 40;
const ECHOED6: u64 = 25;
/// Packets dropped over IPv4 and over IPv6 (no endpoints).
const DROPPED4: u64 = 3;
const DROPPED6: u64 = 2;

/// The node-port labels of the test app's UDP node port, with `family`.
fn labels(family: &str) -> String {
    format!(
        r#"app="echo",family="{family}",node_port="7000",port_name="udp-echo",protocol="udp",service="echo""#
    )
}

/// The `/metrics` lines of the UDP node port's `family` packets: `rx` received packets of
/// which `tx` were echoed and `dropped` dropped for want of endpoints, `flows` flows,
/// `headers` + [`PAYLOAD`] bytes each.
fn family_lines(
    family: &str,
    rx: u64,
    tx: u64,
    dropped: u64,
    flows: u64,
    headers: u64,
) -> Vec<String> {
    let labels = labels(family);
    let size = headers + PAYLOAD as u64;
    let drops = |reason: &str, n: u64| {
        format!(
            r#"miren_nodeport_drops_total{{app="echo",family="{family}",node_port="7000",port_name="udp-echo",protocol="udp",reason="{reason}",service="echo"}} {n}"#
        )
    };
    vec![
        format!("miren_nodeport_rx_packets_total{{{labels}}} {rx}"),
        format!("miren_nodeport_rx_bytes_total{{{labels}}} {}", size * rx),
        format!("miren_nodeport_tx_packets_total{{{labels}}} {tx}"),
        format!("miren_nodeport_tx_bytes_total{{{labels}}} {}", size * tx),
        format!("miren_nodeport_flows_total{{{labels}}} {flows}"),
        drops("no_endpoints", dropped),
        drops("table_miss", 0),
    ]
}

/// The `/metrics` line of `backend`'s forwarded packets.
fn backend_line(backend: &str, family: &str, packets: u64) -> String {
    format!(
        r#"miren_backend_rx_packets_total{{app="echo",backend="{backend}",family="{family}",node_port="7000",port_name="udp-echo",protocol="udp",service="echo"}} {packets}"#
    )
}

/// Sends `count` datagrams of [`PAYLOAD`] bytes from one socket at `client` to `node`:7000,
/// each waiting for its echo when `echoed`.
fn send(world: &World, client: &str, node: &str, count: u64, echoed: bool) {
    let client: IpAddr = client.parse().unwrap();
    let node: IpAddr = node.parse().unwrap();
    world
        .client
        .run(|| {
            let socket = UdpSocket::bind((client, 0)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            for _ in 0..count {
                socket.send_to(&[7u8; PAYLOAD], (node, 7000)).unwrap();
                if echoed {
                    let mut buf = [0u8; 128];
                    let (len, _) = socket.recv_from(&mut buf).expect("echo");
                    assert_eq!(len, PAYLOAD);
                }
            }
        })
        .unwrap();
}

/// Scrapes `/metrics` until every line of `expected` is there (packets sent without echo are
/// counted when the node receives them, a moment later); panics with what is missing after
/// a few seconds.
fn expect_lines(world: &World, agent: &AgentProcess, plane: Plane, expected: &[String]) {
    let mut text = String::new();
    for _ in 0..50 {
        text = world.scrape_metrics();
        if expected.iter().all(|line| text.lines().any(|l| l == line)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|line| !text.lines().any(|l| l == *line))
        .collect();
    panic!(
        "{plane:?}: missing {missing:#?} in\n{text}\n{}",
        agent.log_text()
    );
}

/// The UDP node port's traffic from `miren ports --output json`.
fn udp_traffic(agent: &AgentProcess) -> PortTraffic {
    let out = agent.miren(&["ports", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let ports: Vec<NodePortInfo> = serde_json::from_slice(&out.stdout).unwrap();
    let udp = ports.into_iter().find(|p| p.protocol == "udp").unwrap();
    udp.traffic.expect("miren ports shows traffic")
}

/// `(rx packets, tx packets, flows, drops)` of `traffic`.
fn counts(traffic: &PortTraffic) -> (u64, u64, u64, u64) {
    (
        traffic.rx_packets,
        traffic.tx_packets,
        traffic.flows,
        traffic.drops,
    )
}

fn metrics_count_every_packet_exactly(plane: Plane) {
    let world = World::new(1);
    let agent = world.start_agent(plane);
    world.deploy(&agent);

    send(&world, CLIENT_IP, NODE_IP, ECHOED, true);
    // Backend series exist while the backend does.
    expect_lines(
        &world,
        &agent,
        plane,
        &[backend_line(
            &format!("{}:9000", sandbox_ip(0)),
            "ipv4",
            ECHOED,
        )],
    );
    world.set_endpoints(&agent, &[]);
    send(&world, CLIENT_IP, NODE_IP, DROPPED, false);

    // An IPv4-only node counts everything as IPv4; its IPv6 series stay 0.
    let mut expected = family_lines("ipv4", ECHOED + DROPPED, ECHOED, DROPPED, 1, HEADERS);
    expected.extend(family_lines("ipv6", 0, 0, 0, 0, HEADERS6));
    expected.push(format!(
        r#"miren_dataplane_info{{mode="{}"}} 1"#,
        plane.flag()
    ));
    expected.push("miren_reconcile_errors_total 0".to_owned());
    expect_lines(&world, &agent, plane, &expected);

    let traffic = udp_traffic(&agent);
    assert_eq!(
        counts(&traffic),
        (ECHOED + DROPPED, ECHOED, 1, DROPPED),
        "{plane:?}: {traffic:?}"
    );
    assert_eq!(
        counts(&traffic.by_family["ipv4"]),
        (ECHOED + DROPPED, ECHOED, 1, DROPPED),
        "{plane:?}: {traffic:?}"
    );
    assert_eq!(
        counts(&traffic.by_family["ipv6"]),
        (0, 0, 0, 0),
        "{plane:?}: {traffic:?}"
    );
}

/// The same node port over both families: each family's packets, bytes, flows, drops and
/// backend packets are counted in its own series, exactly, and `miren ports` splits them.
fn metrics_count_each_family_exactly(plane: Plane) {
    let world = World::new_dual_stack(1);
    let agent = world.start_agent(plane);
    world.deploy(&agent);

    send(&world, CLIENT_IP, NODE_IP, ECHOED4, true);
    send(&world, CLIENT_IP6, NODE_IP6, ECHOED6, true);
    expect_lines(
        &world,
        &agent,
        plane,
        &[
            backend_line(&format!("{}:9000", sandbox_ip(0)), "ipv4", ECHOED4),
            backend_line(&format!("[{}]:9000", sandbox_ip6(0)), "ipv6", ECHOED6),
        ],
    );

    world.set_endpoints(&agent, &[]);
    send(&world, CLIENT_IP, NODE_IP, DROPPED4, false);
    send(&world, CLIENT_IP6, NODE_IP6, DROPPED6, false);
    let mut expected = family_lines("ipv4", ECHOED4 + DROPPED4, ECHOED4, DROPPED4, 1, HEADERS);
    expected.extend(family_lines(
        "ipv6",
        ECHOED6 + DROPPED6,
        ECHOED6,
        DROPPED6,
        1,
        HEADERS6,
    ));
    expect_lines(&world, &agent, plane, &expected);

    let traffic = udp_traffic(&agent);
    assert_eq!(
        counts(&traffic),
        (
            ECHOED4 + DROPPED4 + ECHOED6 + DROPPED6,
            ECHOED4 + ECHOED6,
            2,
            DROPPED4 + DROPPED6
        ),
        "{plane:?}: {traffic:?}"
    );
    assert_eq!(
        traffic.rx_bytes,
        (HEADERS + PAYLOAD as u64) * (ECHOED4 + DROPPED4)
            + (HEADERS6 + PAYLOAD as u64) * (ECHOED6 + DROPPED6),
        "{plane:?}: {traffic:?}"
    );
    let family = |name: &str| {
        traffic
            .by_family
            .get(name)
            .unwrap_or_else(|| panic!("{plane:?}: no {name} part in {traffic:?}"))
    };
    assert_eq!(
        counts(family("ipv4")),
        (ECHOED4 + DROPPED4, ECHOED4, 1, DROPPED4),
        "{plane:?}: {traffic:?}"
    );
    assert_eq!(
        counts(family("ipv6")),
        (ECHOED6 + DROPPED6, ECHOED6, 1, DROPPED6),
        "{plane:?}: {traffic:?}"
    );
    assert_eq!(
        family("ipv6").tx_bytes,
        (HEADERS6 + PAYLOAD as u64) * ECHOED6,
        "{plane:?}: {traffic:?}"
    );
}
