//! Fragmented UDP through a node port, end to end on both planes: 4,000-byte datagrams, which
//! the client's 1,500-byte link MTU splits into IPv4 fragments (or IPv6 fragment headers),
//! sent to NODE_IP:node_port are echoed whole by the instances behind it (the instances'
//! replies are fragmented too), 100 times over 20 flows; all datagrams of a flow reach one
//! instance, and the flows spread over both instances. The client's fragment counter proves the
//! datagrams really left as fragments.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use miren_tests::{
    on_both_planes,
    world::{CLIENT_IP6, MAX_DATAGRAM, NODE_IP, NODE_IP6, Plane, World},
};

on_both_planes!(
    fragmented_udp_datagrams_are_echoed_whole_and_each_flow_sticks,
    fragmented_udp_datagrams_over_ipv6_are_echoed_whole_and_each_flow_sticks,
);

/// The size of every datagram (larger than the 1,500-byte MTU: 3 fragments).
const SIZE: usize = 4_000;
/// Client sockets (flows).
const FLOWS: usize = 20;
/// Datagrams per flow.
const PER_FLOW: usize = 5;
/// How long one echo may take (generous: shared machine).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Datagram `k` of flow `flow`: its name, then bytes that differ per position and datagram.
fn datagram(flow: usize, k: usize) -> Vec<u8> {
    let mut data = format!("flow {flow} datagram {k} ").into_bytes();
    let seed = flow * 131 + k * 17;
    data.extend((data.len()..SIZE).map(|i| ((i * 7 + seed) % 251) as u8));
    data
}

/// Sends every datagram of `FLOWS` fresh client sockets at `client` to `node_port` and checks
/// each echo (whole, from the node port); returns the sockets' addresses.
fn echo_flows(world: &World, client: IpAddr, node_port: SocketAddr) -> Vec<SocketAddr> {
    let result = world
        .client
        .run(|| {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let mut flows = Vec::new();
            for flow in 0..FLOWS {
                let socket = UdpSocket::bind((client, 0)).unwrap();
                socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                for k in 0..PER_FLOW {
                    let sent = datagram(flow, k);
                    socket.send_to(&sent, node_port).unwrap();
                    let (len, from) = socket.recv_from(&mut buf).map_err(|err| {
                        format!(
                            "flow {flow} ({}) datagram {k}: no echo ({err})",
                            socket.local_addr().unwrap()
                        )
                    })?;
                    assert_eq!(from, node_port, "flow {flow} datagram {k}: replier");
                    assert!(
                        buf[..len] == sent[..],
                        "flow {flow} datagram {k}: echo of {len} bytes differs from the \
                         {SIZE} sent"
                    );
                }
                flows.push(socket.local_addr().unwrap());
            }
            Ok::<_, String>(flows)
        })
        .unwrap();
    result.unwrap_or_else(|failure| {
        let counters = |ns: &miren_tests::topology::Netns| {
            [
                "IpReasmReqds",
                "IpReasmOKs",
                "IpReasmFails",
                "UdpNoPorts",
                "Ip6ReasmReqds",
                "Ip6ReasmOKs",
                "Udp6NoPorts",
            ]
            .map(|name| format!("{name} {}", ns.snmp(name).unwrap()))
            .join(", ")
        };
        panic!(
            "{failure}\ninstances' peers: {:?} / {:?}\nnode: {}\ninstance 0: {}\ninstance 1: {}",
            world.peers_of(0),
            world.peers_of(1),
            counters(&world.node),
            counters(world.sandbox(0)),
            counters(world.sandbox(1)),
        )
    })
}

/// Asserts that each flow was seen by exactly one of the two instances and that both served.
fn assert_sticky_and_spread(world: &World, flows: &[SocketAddr]) {
    let mut served = BTreeSet::new();
    for flow in flows {
        let seen_by: Vec<usize> = (0..2)
            .filter(|i| world.peers_of(*i).contains(flow))
            .collect();
        assert_eq!(
            seen_by.len(),
            1,
            "flow {flow} seen by instances {seen_by:?}"
        );
        served.insert(seen_by[0]);
    }
    assert_eq!(served, BTreeSet::from([0, 1]), "flows spread over both");
}

/// The scenario in `world` from `client` to `node_port`; `fragments_counter` names the
/// client's counter of fragments created.
fn echo_fragmented(
    world: &World,
    plane: Plane,
    client: IpAddr,
    node_port: SocketAddr,
    fragments_counter: &str,
) {
    let agent = world.start_agent(plane);
    world.deploy(&agent);
    world.set_endpoints(&agent, &[0, 1]);
    let fragments_before = world.client.snmp(fragments_counter).unwrap();
    let flows = echo_flows(world, client, node_port);
    let fragments = world.client.snmp(fragments_counter).unwrap() - fragments_before;
    assert!(
        fragments >= (FLOWS * PER_FLOW * 3) as u64,
        "the client sent {fragments} fragments"
    );
    assert_sticky_and_spread(world, &flows);
    if plane == Plane::Xdp {
        // The XDP programs translated the later fragments themselves (at least those toward
        // the instances: 2 per datagram).
        let forwarded = world.dataplane_event("fragment_forwarded");
        assert!(
            forwarded >= (FLOWS * PER_FLOW * 2) as u64,
            "{forwarded} fragments forwarded by XDP/TC"
        );
    }
}

fn fragmented_udp_datagrams_are_echoed_whole_and_each_flow_sticks(plane: Plane) {
    let world = World::new(2);
    let node_port = format!("{NODE_IP}:7000").parse().unwrap();
    echo_fragmented(&world, plane, world.client_ip(), node_port, "IpFragCreates");
}

fn fragmented_udp_datagrams_over_ipv6_are_echoed_whole_and_each_flow_sticks(plane: Plane) {
    let world = World::new_dual_stack(2);
    let node_port = format!("[{NODE_IP6}]:7000").parse().unwrap();
    let client = CLIENT_IP6.parse().unwrap();
    echo_fragmented(&world, plane, client, node_port, "Ip6FragCreates");
}
