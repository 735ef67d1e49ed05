//! Exact kernel counts in `/metrics` and `miren ports`: a known number of packets through the
//! node port of the real agent, once per data plane.

use std::{net::UdpSocket, time::Duration};

use miren_agent::api::types::NodePortInfo;
use miren_tests::{
    on_both_planes,
    world::{CLIENT_IP, NODE_IP, Plane, World, sandbox_ip},
};

on_both_planes!(metrics_count_every_packet_exactly);

/// Echoed UDP packets.
const ECHOED: u64 = 100;
/// UDP payload of each packet.
const PAYLOAD: usize = 50;
/// Packets sent while the node port has no endpoints.
const DROPPED: u64 = 5;
/// IPv4 (20) + UDP (8) headers.
const HEADERS: u64 = 28;

fn metrics_count_every_packet_exactly(plane: Plane) {
    let world = World::new(1);
    let agent = world.start_agent(plane);
    world.deploy(&agent);

    world
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            for _ in 0..ECHOED {
                socket.send_to(&[7u8; PAYLOAD], (NODE_IP, 7000)).unwrap();
                let mut buf = [0u8; 128];
                let (len, _) = socket.recv_from(&mut buf).expect("echo");
                assert_eq!(len, PAYLOAD);
            }
        })
        .unwrap();
    // Backend series exist while the backend does.
    let backend = format!(
        r#"miren_backend_rx_packets_total{{app="echo",backend="{}:9000",node_port="7000",port_name="udp-echo",protocol="udp",service="echo"}} {ECHOED}"#,
        sandbox_ip(0)
    );
    let text = world.scrape_metrics();
    assert!(
        text.lines().any(|l| l == backend),
        "{plane:?}: missing `{backend}` in\n{text}"
    );
    world.set_endpoints(&agent, &[]);
    world
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
            for _ in 0..DROPPED {
                socket.send_to(&[7u8; PAYLOAD], (NODE_IP, 7000)).unwrap();
            }
        })
        .unwrap();
    // The dropped packets are counted when the node receives them; give them a moment to
    // cross the veth.
    std::thread::sleep(Duration::from_millis(200));

    let text = world.scrape_metrics();
    let labels =
        r#"app="echo",node_port="7000",port_name="udp-echo",protocol="udp",service="echo""#;
    let bytes = (HEADERS + PAYLOAD as u64) * ECHOED;
    let expected = [
        format!(
            "miren_nodeport_rx_packets_total{{{labels}}} {}",
            ECHOED + DROPPED
        ),
        format!(
            "miren_nodeport_rx_bytes_total{{{labels}}} {}",
            bytes + (HEADERS + PAYLOAD as u64) * DROPPED
        ),
        format!("miren_nodeport_tx_packets_total{{{labels}}} {ECHOED}"),
        format!("miren_nodeport_tx_bytes_total{{{labels}}} {bytes}"),
        format!("miren_nodeport_flows_total{{{labels}}} 1"),
        format!(
            r#"miren_nodeport_drops_total{{app="echo",node_port="7000",port_name="udp-echo",protocol="udp",reason="no_endpoints",service="echo"}} {DROPPED}"#
        ),
        format!(r#"miren_dataplane_info{{mode="{}"}} 1"#, plane.flag()),
        "miren_reconcile_errors_total 0".to_owned(),
    ];
    for line in &expected {
        assert!(
            text.lines().any(|l| l == line),
            "{plane:?}: missing `{line}` in\n{text}\n{}",
            agent.log_text()
        );
    }

    let out = agent.miren(&["ports", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let ports: Vec<NodePortInfo> = serde_json::from_slice(&out.stdout).unwrap();
    let udp = ports.iter().find(|p| p.protocol == "udp").unwrap();
    let traffic = udp.traffic.as_ref().expect("miren ports shows traffic");
    assert_eq!(
        (
            traffic.rx_packets,
            traffic.tx_packets,
            traffic.flows,
            traffic.drops
        ),
        (ECHOED + DROPPED, ECHOED, 1, DROPPED),
        "{plane:?}: {traffic:?}"
    );
}
