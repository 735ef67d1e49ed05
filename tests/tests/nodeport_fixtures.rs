//! The node-port programs, loaded for real, driven through BPF_PROG_TEST_RUN on crafted
//! frames: verdicts, every output byte, and checksums verified independently.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::programs::{TestRun, TestRunOptions};
use miren_agent::{
    config::Protocol,
    dataplane::{Dataplane, NodePortKey, Snapshot, xdp::XdpDataplane},
};
use miren_tests::packet::{Endpoint, FrameBuilder, rewrite_expected, verify_checksums};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 1],
    ip: Ipv4Addr::new(198, 51, 100, 7),
    port: 40_001,
};

fn node(port: u16) -> Endpoint {
    Endpoint {
        mac: [2, 0, 0, 0, 0, 2],
        ip: NODE,
        port,
    }
}

fn key(port: u16, protocol: Protocol) -> NodePortKey {
    NodePortKey { port, protocol }
}

fn snapshot(ports: &[(NodePortKey, &[SocketAddrV4])]) -> Snapshot {
    Snapshot {
        node_addrs: vec![NODE],
        node_ports: ports
            .iter()
            .map(|(k, e)| (*k, e.to_vec()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Runs the XDP program once; returns the verdict and the output frame.
fn run_xdp(dataplane: &XdpDataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = dataplane
        .xdp_program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
fn udp_and_tcp_to_a_node_port_are_dnated_to_the_backend() {
    let mut dp = XdpDataplane::load().expect("load node-port programs");
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 2), 8000);
    dp.apply(&snapshot(&[
        (key(7000, Protocol::Udp), &[backend]),
        (key(7000, Protocol::Tcp), &[backend]),
    ]))
    .unwrap();

    let udp = FrameBuilder::udp(CLIENT, node(7000))
        .payload(b"hello")
        .build();
    let (verdict, out) = run_xdp(&dp, &udp);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        rewrite_expected(&udp, Some((*backend.ip(), backend.port())), None)
    );
    verify_checksums(&out).unwrap();

    let tcp = FrameBuilder::tcp(CLIENT, node(7000), 0x02, 1000, 0).build();
    let (verdict, out) = run_xdp(&dp, &tcp);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        rewrite_expected(&tcp, Some((*backend.ip(), backend.port())), None)
    );
    verify_checksums(&out).unwrap();
}

#[test]
fn a_node_port_without_endpoints_drops_and_counts() {
    let mut dp = XdpDataplane::load().expect("load node-port programs");
    dp.apply(&snapshot(&[(key(9000, Protocol::Udp), &[])]))
        .unwrap();
    let udp = FrameBuilder::udp(CLIENT, node(9000)).payload(b"x").build();
    assert_eq!(run_xdp(&dp, &udp).0, XDP_DROP);
    let counters = dp.counters().unwrap();
    let port = counters.ports[&key(9000, Protocol::Udp)];
    assert_eq!(
        (port.rx_packets, port.drop_no_backend, port.flows),
        (1, 1, 0)
    );
}
