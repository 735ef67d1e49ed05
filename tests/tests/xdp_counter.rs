//! The packet counter XDP program, loaded for real: attached natively to a veth in namespaces
//! and driven by real traffic, and run through BPF_PROG_TEST_RUN on a hand-built frame.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions, XdpMode};
use miren_agent::bpf::{PacketCounter, PacketCounts};
use miren_tests::{
    packet::{ETH_LEN, Endpoint, IPV4_LEN, UDP_LEN, udp_frame},
    topology::{Netns, veth},
};

const XDP_PASS: u32 = 2;

#[test]
fn counts_every_packet_received_on_a_native_xdp_veth() {
    let client = Netns::new("client").expect("client namespace");
    let node = Netns::new("node").expect("node namespace");
    veth(&client, "eth0", &node, "eth0").expect("veth pair");
    client.addr("eth0", "10.77.0.1/24").expect("client address");
    node.addr("eth0", "10.77.0.2/24").expect("node address");
    // Static neighbours: no ARP traffic, so the only packets on the wire are ours.
    client
        .neigh("eth0", "10.77.0.2", &node.mac("eth0").unwrap())
        .unwrap();
    node.neigh("eth0", "10.77.0.1", &client.mac("eth0").unwrap())
        .unwrap();

    let mut counter = PacketCounter::load().expect("load miren_count");
    node.run(|| counter.attach("eth0", XdpMode::Driver))
        .unwrap()
        .expect("native (driver mode) XDP attach on veth");
    let link = node.ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(
        link.contains("xdp "),
        "expected native XDP on eth0, got: {link}"
    );

    let server = node
        .run(|| UdpSocket::bind("10.77.0.2:7000"))
        .unwrap()
        .expect("bind server socket in node namespace");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    const PACKETS: u64 = 25;
    const PAYLOAD: &[u8] = b"miren packet counter";
    client
        .run(|| {
            let socket = UdpSocket::bind("10.77.0.1:0").expect("bind client socket");
            for _ in 0..PACKETS {
                socket.send_to(PAYLOAD, "10.77.0.2:7000").expect("send");
            }
        })
        .unwrap();

    let mut buf = [0u8; 64];
    for i in 0..PACKETS {
        let (len, from) = server
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("packet {i}: {e}"));
        assert_eq!(&buf[..len], PAYLOAD);
        assert_eq!(from.ip().to_string(), "10.77.0.1");
    }

    let frame_len = (ETH_LEN + IPV4_LEN + UDP_LEN + PAYLOAD.len()) as u64;
    assert_eq!(
        counter.counts().unwrap(),
        PacketCounts {
            packets: PACKETS,
            bytes: PACKETS * frame_len
        }
    );
}

#[test]
fn test_run_passes_a_udp_frame_unchanged_and_counts_it() {
    let counter = PacketCounter::load().expect("load miren_count");
    let src = Endpoint {
        mac: [2, 0, 0, 0, 0, 1],
        ip: Ipv4Addr::new(192, 0, 2, 1),
        port: 40000,
    };
    let dst = Endpoint {
        mac: [2, 0, 0, 0, 0, 2],
        ip: Ipv4Addr::new(192, 0, 2, 2),
        port: 27015,
    };
    let frame = udp_frame(src, dst, b"hello, xdp");
    let mut out = vec![0u8; frame.len() + 64];

    let result = counter
        .program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            repeat: 3,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");

    assert_eq!(result.return_value, XDP_PASS);
    assert_eq!(result.data_size_out as usize, frame.len());
    assert_eq!(&out[..frame.len()], &frame[..]);
    assert_eq!(
        counter.counts().unwrap(),
        PacketCounts {
            packets: 3,
            bytes: 3 * frame.len() as u64
        }
    );
}
