//! End to end in namespaces with real sockets: a client namespace reaches a UDP and a TCP
//! echo server in a sandbox namespace through NODE_IP:node_port, forwarded by the real agent's
//! data plane — every scenario runs once with XDP (DNAT in XDP, reverse NAT in TC) and once
//! with nftables, with the same assertions.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

use miren_tests::{
    on_both_planes,
    process::AgentProcess,
    world::{CLIENT_IP, NODE_IP, Plane, World},
};

on_both_planes!(
    clients_reach_a_sandbox_through_the_node_port_with_their_own_address,
    kill_9_and_restart_of_the_agent_loses_no_packet_of_a_udp_stream,
    flows_spread_over_endpoints_and_tcp_connections_survive_scaling,
);

/// Asserts that `plane` (and only it) carries the node ports in the node namespace.
fn assert_active(world: &World, plane: Plane, agent: &AgentProcess) {
    let link = world.node.ip(&["link", "show", "dev", "eth0"]).unwrap();
    let nft = world
        .node
        .command("nft")
        .args(["list", "table", "inet", "miren"])
        .output()
        .unwrap()
        .status
        .success();
    let xdp = link.contains("xdp");
    assert_eq!(
        (xdp, nft),
        (plane == Plane::Xdp, plane == Plane::Nft),
        "{plane:?} expected: XDP on eth0 {xdp}, nft table {nft}\n{link}\n{}",
        agent.log_text()
    );
}

fn clients_reach_a_sandbox_through_the_node_port_with_their_own_address(plane: Plane) {
    let world = World::new(1);
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    assert_active(&world, plane, &agent);

    let (udp_local, udp_reply_from) = world.udp_echo(b"ping over udp");
    assert_eq!(
        udp_reply_from.to_string(),
        format!("{NODE_IP}:7000"),
        "replies come from the node port"
    );

    let tcp_local = world
        .client
        .run(|| {
            let node_port = format!("{NODE_IP}:7000").parse().unwrap();
            let mut stream = TcpStream::connect_timeout(&node_port, Duration::from_secs(3))
                .expect("TCP connect through the node port");
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            stream.write_all(b"ping over tcp").unwrap();
            let mut buf = [0u8; 13];
            stream.read_exact(&mut buf).expect("TCP echo");
            assert_eq!(&buf, b"ping over tcp");
            assert_eq!(
                stream.peer_addr().unwrap().to_string(),
                format!("{NODE_IP}:7000")
            );
            stream.local_addr().unwrap()
        })
        .unwrap();

    let seen = world.peers_of(0);
    assert!(
        seen.contains(&udp_local),
        "sandbox saw {seen:?}, expected the client's own {udp_local}"
    );
    assert!(
        seen.contains(&tcp_local),
        "sandbox saw {seen:?}, expected the client's own {tcp_local}"
    );
}

fn kill_9_and_restart_of_the_agent_loses_no_packet_of_a_udp_stream(plane: Plane) {
    const RATE: u64 = 5_000;
    const PACKETS: u64 = 3 * RATE;
    let world = World::new(1);
    let agent = world.start_agent(plane);
    world.deploy(&agent);

    // Datagrams a starved receiver (client or echo server) could not take: the machine is
    // shared, and a socket buffer that overflows is not the data plane losing packets.
    let overflows = || {
        let client = world.client.snmp("UdpRcvbufErrors").unwrap();
        client + world.sandbox(0).snmp("UdpRcvbufErrors").unwrap()
    };
    let overflows_before = overflows();
    let socket = world
        .client
        .run(|| UdpSocket::bind((CLIENT_IP, 0)))
        .unwrap()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let receiver = socket.try_clone().unwrap();
    let received = std::thread::spawn(move || {
        let mut seen = vec![false; PACKETS as usize];
        let mut buf = [0u8; 64];
        while let Ok((len, from)) = receiver.recv_from(&mut buf) {
            assert_eq!(from.to_string(), format!("{NODE_IP}:7000"));
            let seq = u64::from_be_bytes(buf[..len].try_into().unwrap());
            seen[seq as usize] = true;
        }
        seen
    });
    let sender = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        for seq in 0..PACKETS {
            let due = start + Duration::from_micros(seq * 1_000_000 / RATE);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            socket.send_to(&seq.to_be_bytes(), (NODE_IP, 7000)).unwrap();
        }
    });

    std::thread::sleep(Duration::from_millis(800));
    agent.kill9();
    std::thread::sleep(Duration::from_millis(400));
    let agent = world.start_agent(plane);
    sender.join().unwrap();
    let seen = received.join().unwrap();
    let lost: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, ok)| !**ok)
        .map(|(i, _)| i)
        .collect();
    let overflowed = overflows() - overflows_before;
    assert!(
        lost.len() as u64 <= overflowed,
        "{} of {PACKETS} packets lost ({overflowed} socket buffer overflows), first {:?}\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        agent.log_text()
    );
    let log = agent.log_text();
    match plane {
        Plane::Xdp => assert!(log.contains("adopted pinned data plane state"), "{log}"),
        Plane::Nft => assert!(log.contains("adopted nftables table inet miren"), "{log}"),
    }
    assert_active(&world, plane, &agent);
}

fn flows_spread_over_endpoints_and_tcp_connections_survive_scaling(plane: Plane) {
    const FLOWS: usize = 3_000;
    let world = World::new(5);
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    world.set_endpoints(&agent, &[0, 1, 2]);

    // UDP flows from fixed client ports (the placement is deterministic). The issue asks for
    // ±15 % over 300 flows, but that is only ~1.9 standard deviations of a uniform hash
    // (fails ~15 % of port ranges); 3,000 flows make ±15 % a real test of the spread.
    let locals = world
        .client
        .run(|| {
            (0..FLOWS as u16)
                .map(|i| {
                    let socket = UdpSocket::bind((CLIENT_IP, 41_000 + i)).unwrap();
                    socket
                        .set_read_timeout(Some(Duration::from_secs(3)))
                        .unwrap();
                    socket.send_to(b"spread", (NODE_IP, 7000)).unwrap();
                    let mut buf = [0u8; 16];
                    socket.recv_from(&mut buf).expect("UDP echo");
                    socket.local_addr().unwrap()
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut per_backend = [0usize; 3];
    for local in &locals {
        let backend = world
            .served_by(*local)
            .expect("some sandbox served the flow");
        per_backend[backend] += 1;
    }
    for (i, n) in per_backend.iter().enumerate() {
        let (low, high) = (FLOWS * 85 / 300, FLOWS * 115 / 300);
        assert!(
            (low..=high).contains(n),
            "backend {i} got {n} of {FLOWS} flows (±15 % allows {low}..={high}): {per_backend:?}"
        );
    }

    // TCP connections to each of the 3 backends, then scale 3 → 5 → 2.
    let mut streams: Vec<(TcpStream, usize)> = world
        .client
        .run(|| {
            (0..30)
                .map(|_| {
                    let node_port = format!("{NODE_IP}:7000").parse().unwrap();
                    let stream =
                        TcpStream::connect_timeout(&node_port, Duration::from_secs(3)).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(3)))
                        .unwrap();
                    stream
                })
                .collect::<Vec<_>>()
        })
        .unwrap()
        .into_iter()
        .map(|stream| {
            let local = stream.local_addr().unwrap();
            let mut backend = None;
            for _ in 0..100 {
                backend = world.served_by(local);
                if backend.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (stream, backend.expect("a sandbox accepted the connection"))
        })
        .collect();
    let echo = |stream: &mut TcpStream, message: &[u8]| {
        stream.write_all(message).unwrap();
        let mut buf = vec![0u8; message.len()];
        stream
            .read_exact(&mut buf)
            .expect("echo on an established connection");
        assert_eq!(buf, message);
    };
    world.set_endpoints(&agent, &[0, 1, 2, 3, 4]);
    for (stream, _) in &mut streams {
        echo(stream, b"after scaling to 5");
    }
    world.set_endpoints(&agent, &[0, 1]);
    let mut survivors = 0;
    for (stream, backend) in &mut streams {
        if *backend < 2 {
            echo(stream, b"after scaling to 2");
            survivors += 1;
        }
    }
    assert!(survivors > 0, "no connection was on a surviving backend");
}
