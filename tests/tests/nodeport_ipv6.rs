//! IPv6 node ports end to end in namespaces with real sockets: the node has an IPv4 and an
//! IPv6 `--node-ip`, the sandboxes an IPv4 and an IPv6 address (the one the agent mirrors
//! from their IPv4 endpoints); a client reaches them through `[NODE_IP6]:node_port` with its
//! own address, replies come from the node port, flows spread over the instances and stick,
//! and IPv4 keeps working beside it.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use miren_tests::{
    on_both_planes,
    world::{CLIENT_IP6, NODE_IP, NODE_IP6, Plane, World},
};

on_both_planes!(udp_and_tcp_reach_the_instances_over_ipv6_with_the_clients_address);

/// Fresh client sockets for the spread check.
const FLOWS: usize = 24;

fn udp_and_tcp_reach_the_instances_over_ipv6_with_the_clients_address(plane: Plane) {
    let world = World::new_dual_stack(2);
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    world.set_endpoints(&agent, &[0, 1]);
    let node_port: SocketAddr = format!("[{NODE_IP6}]:7000").parse().unwrap();

    // UDP: every reply from the node port; each client seen by exactly one instance, with
    // its own IPv6 address; both instances used.
    let mut served = BTreeSet::new();
    for k in 0..FLOWS {
        let message = format!("ipv6 udp {k}");
        let (client, replier) = world.udp_echo6(message.as_bytes());
        assert_eq!(replier, node_port, "{}", agent.log_text());
        assert_eq!(client.ip().to_string(), CLIENT_IP6);
        let instance = world
            .served_by(client)
            .unwrap_or_else(|| panic!("no instance saw {client}"));
        served.insert(instance);
    }
    assert_eq!(served, BTreeSet::from([0, 1]), "UDP flows spread");
    // A flow sticks: many datagrams of one socket reach one instance.
    let sticky = world
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT_IP6.parse::<IpAddr>().unwrap(), 0)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            for k in 0..10 {
                socket
                    .send_to(format!("sticky {k}").as_bytes(), node_port)
                    .unwrap();
                let mut buf = [0u8; 64];
                socket.recv_from(&mut buf).expect("UDP echo over IPv6");
            }
            socket.local_addr().unwrap()
        })
        .unwrap();
    let seen_by = (0..2)
        .filter(|i| world.peers_of(*i).contains(&sticky))
        .count();
    assert_eq!(seen_by, 1, "one flow, one instance");

    // TCP: a connection through the node port, echoed, the instance sees the client.
    let local = world
        .client
        .run(|| {
            let mut stream =
                TcpStream::connect_timeout(&node_port, Duration::from_secs(5)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(stream.peer_addr().unwrap(), node_port);
            stream.write_all(b"ipv6 tcp").unwrap();
            let mut buf = [0u8; 8];
            stream.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ipv6 tcp");
            stream.local_addr().unwrap()
        })
        .unwrap();
    assert!(world.served_by(local).is_some(), "no instance saw {local}");

    // IPv4 beside it.
    let (_, replier) = world.udp_echo(b"ipv4 still");
    assert_eq!(replier.to_string(), format!("{NODE_IP}:7000"));
}
