//! The nftables data plane in namespaces with real sockets: a client namespace reaches UDP and
//! TCP echo servers in sandbox namespaces through NODE_IP:node_port, DNATed by the rules of
//! `NftDataplane` applied in the node namespace. Counters are checked exactly. The dual-stack
//! world does the same over IPv6 (the node's IPv6 address, the instances' IPv6 endpoints).

use std::{
    io::{Read as _, Write as _},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use miren_agent::{
    config::Protocol,
    dataplane::{Counters, Dataplane, NodePortKey, Snapshot, Snapshot4, nft::NftDataplane},
};
use miren_tests::{
    topology::{Netns, veth},
    world::{CLIENT_IP, NODE_IP, client_and_node},
};

/// IPv4 + UDP headers.
const UDP_OVERHEAD: u64 = 28;
/// IPv6 + UDP headers.
const UDP6_OVERHEAD: u64 = 48;
/// The client's and the node's IPv6 addresses in the dual-stack world.
const CLIENT_IP6: &str = "fd00:5b::1";
const NODE_IP6: &str = "fd00:5b::2";
const TIMEOUT: Duration = Duration::from_secs(5);

const UDP_7000: NodePortKey = NodePortKey {
    port: 7000,
    protocol: Protocol::Udp,
};
const TCP_7000: NodePortKey = NodePortKey {
    port: 7000,
    protocol: Protocol::Tcp,
};
const UDP_7001: NodePortKey = NodePortKey {
    port: 7001,
    protocol: Protocol::Udp,
};

/// The address of sandbox `i`.
fn sandbox(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 89, 0, i as u8 + 2), 9000)
}

/// The IPv6 address of sandbox `i` (dual-stack world).
fn sandbox6(i: usize) -> SocketAddrV6 {
    let addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x656e, 0, 0, 0, 0, i as u16 + 2);
    SocketAddrV6::new(addr, 9000, 0, 0)
}

/// `ip -6 addr add CIDR dev DEV nodad` in `ns`.
fn add_addr6(ns: &Netns, dev: &str, cidr: &str) {
    ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
        .unwrap();
}

/// A namespace with IPv6 on, without duplicate address detection on its interfaces.
fn netns6(tag: &str) -> Netns {
    let ns = Netns::new_with_ipv6(tag).unwrap();
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0").unwrap();
    ns
}

/// Client, node and sandbox namespaces. Each sandbox runs UDP and TCP echo servers on port 9000
/// that answer with their index followed by what they received, and record the peers they see.
struct World {
    client: Netns,
    node: Netns,
    _sandboxes: Vec<Netns>,
    peers: Vec<Arc<Mutex<Vec<SocketAddr>>>>,
}

impl World {
    fn new(sandboxes: usize) -> Self {
        Self::build(sandboxes, false)
    }

    /// IPv6 on everywhere: the client at `CLIENT_IP6`, the node at `NODE_IP6` and each sandbox
    /// at [`sandbox6`] too, its echo servers also listening there.
    fn new_dual_stack(sandboxes: usize) -> Self {
        Self::build(sandboxes, true)
    }

    fn build(sandboxes: usize, dual_stack: bool) -> Self {
        let (client, node) = if dual_stack {
            let client = netns6("nft6-client");
            let node = netns6("nft6-node");
            veth(&client, "eth0", &node, "eth0").unwrap();
            client.addr("eth0", &format!("{CLIENT_IP}/24")).unwrap();
            node.addr("eth0", &format!("{NODE_IP}/24")).unwrap();
            add_addr6(&client, "eth0", &format!("{CLIENT_IP6}/64"));
            add_addr6(&node, "eth0", &format!("{NODE_IP6}/64"));
            node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
            (client, node)
        } else {
            client_and_node("nft").unwrap()
        };
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        node.bridge("br0").unwrap();
        node.addr("br0", "10.89.0.1/24").unwrap();
        if dual_stack {
            add_addr6(&node, "br0", "fd6d:6972:656e::1/64");
        }
        let mut namespaces = Vec::new();
        let mut peers = Vec::new();
        for i in 0..sandboxes {
            let tag = format!("nft-sb{i}");
            let ns = if dual_stack {
                netns6(&tag)
            } else {
                Netns::new(&tag).unwrap()
            };
            let port = format!("sb{i}");
            veth(&node, &port, &ns, "eth0").unwrap();
            node.attach_to_bridge(&port, "br0").unwrap();
            ns.addr("eth0", &format!("{}/24", sandbox(i).ip())).unwrap();
            ns.route(&["default", "via", "10.89.0.1"]).unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            echo_servers(&ns, i, sandbox(i).into(), &seen);
            if dual_stack {
                add_addr6(&ns, "eth0", &format!("{}/64", sandbox6(i).ip()));
                ns.ip(&["-6", "route", "add", "default", "via", "fd6d:6972:656e::1"])
                    .unwrap();
                echo_servers(&ns, i, sandbox6(i).into(), &seen);
            }
            peers.push(seen);
            namespaces.push(ns);
        }
        Self {
            client,
            node,
            _sandboxes: namespaces,
            peers,
        }
    }

    /// Opens the data plane in the node namespace.
    fn open(&self) -> NftDataplane {
        self.node.run(NftDataplane::open).unwrap().unwrap()
    }

    fn apply(&self, plane: &mut NftDataplane, snapshot: &Snapshot) {
        self.node
            .run(|| plane.apply(snapshot))
            .unwrap()
            .unwrap_or_else(|err| panic!("apply: {err}"));
    }

    fn counters(&self, plane: &NftDataplane) -> Counters {
        self.node.run(|| plane.counters()).unwrap().unwrap()
    }

    /// `nft -j list table inet miren` in the node namespace (handles, elements, counters).
    fn listing(&self) -> String {
        nft(&self.node, &["-j", "list", "table", "inet", "miren"])
    }

    /// A UDP socket in the client namespace, bound to `port` (0: any).
    fn client_udp(&self, port: u16) -> UdpSocket {
        self.client_udp_at(CLIENT_IP, port)
    }

    /// A UDP socket in the client namespace, bound to `addr` and `port` (0: any).
    fn client_udp_at(&self, addr: &str, port: u16) -> UdpSocket {
        let addr: IpAddr = addr.parse().unwrap();
        let socket = self
            .client
            .run(|| UdpSocket::bind((addr, port)))
            .unwrap()
            .unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket
    }

    /// Whether sandbox `i` saw `peer`.
    fn saw(&self, i: usize, peer: SocketAddr) -> bool {
        self.peers[i].lock().unwrap().contains(&peer)
    }
}

fn nft(ns: &Netns, args: &[&str]) -> String {
    String::from_utf8(ns.exec("nft", args).unwrap().stdout).unwrap()
}

/// A snapshot with the node's address and `ports`.
fn snapshot(ports: &[(NodePortKey, &[usize])]) -> Snapshot {
    Snapshot4 {
        node_addrs: vec![NODE_IP.parse().unwrap()],
        node_ports: ports
            .iter()
            .map(|(key, sandboxes)| (*key, sandboxes.iter().map(|i| sandbox(*i)).collect()))
            .collect(),
    }
    .into()
}

/// [`snapshot`] on a dual-stack node: also `NODE_IP6` and each sandbox's IPv6 endpoint.
fn snapshot_dual_stack(ports: &[(NodePortKey, &[usize])]) -> Snapshot {
    let mut snapshot = snapshot(ports);
    snapshot.node_addrs.push(NODE_IP6.parse().unwrap());
    for (key, sandboxes) in ports {
        let endpoints = snapshot.node_ports.get_mut(key).unwrap();
        endpoints.extend(sandboxes.iter().map(|i| SocketAddr::V6(sandbox6(*i))));
    }
    snapshot
}

/// UDP and TCP echo servers of sandbox `index` on `addr`, recording their peers in `peers`.
fn echo_servers(ns: &Netns, index: usize, addr: SocketAddr, peers: &Arc<Mutex<Vec<SocketAddr>>>) {
    let udp = ns.run(|| UdpSocket::bind(addr)).unwrap().unwrap();
    let seen = Arc::clone(peers);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((len, from)) = udp.recv_from(&mut buf[1..]) {
            let mut peers = seen.lock().unwrap();
            if !peers.contains(&from) {
                peers.push(from);
            }
            drop(peers);
            buf[0] = index as u8;
            let _ = udp.send_to(&buf[..=len], from);
        }
    });
    let tcp = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    let seen = Arc::clone(peers);
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            seen.lock().unwrap().push(stream.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 1500];
                if stream.write_all(&[index as u8]).is_err() {
                    return;
                }
                while let Ok(len) = stream.read(&mut buf) {
                    if len == 0 || stream.write_all(&buf[..len]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Sends `payload` to `to` and returns (serving sandbox, reply source); panics without reply.
fn udp_echo(socket: &UdpSocket, to: &str, payload: &[u8]) -> (usize, SocketAddr) {
    socket.send_to(payload, to).unwrap();
    let mut buf = [0u8; 1500];
    let (len, from) = socket
        .recv_from(&mut buf)
        .expect("UDP echo through the node port");
    assert_eq!(&buf[1..len], payload);
    (usize::from(buf[0]), from)
}

/// Connects to `NODE_IP:7000`, exchanges `payload`; returns (serving sandbox, local address,
/// peer address).
fn tcp_echo(payload: &[u8]) -> (usize, SocketAddr, SocketAddr) {
    tcp_echo_to(format!("{NODE_IP}:7000").parse().unwrap(), payload)
}

/// [`tcp_echo`] to `node_port`.
fn tcp_echo_to(node_port: SocketAddr, payload: &[u8]) -> (usize, SocketAddr, SocketAddr) {
    let mut stream = TcpStream::connect_timeout(&node_port, TIMEOUT).expect("TCP connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut index = [0u8; 1];
    stream.read_exact(&mut index).unwrap();
    stream.write_all(payload).unwrap();
    let mut echo = vec![0u8; payload.len()];
    stream.read_exact(&mut echo).unwrap();
    assert_eq!(echo, payload);
    (
        usize::from(index[0]),
        stream.local_addr().unwrap(),
        stream.peer_addr().unwrap(),
    )
}

/// Polls the counters until `done` holds (packets are processed asynchronously to `send`).
fn wait_for_counters(
    world: &World,
    plane: &NftDataplane,
    done: impl Fn(&Counters) -> bool,
) -> Counters {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let counters = world.counters(plane);
        if done(&counters) || Instant::now() > deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn udp_and_tcp_reach_sandboxes_with_the_client_address_and_exact_counters() {
    const PACKETS: u64 = 5;
    const PAYLOAD: &[u8] = b"ping over the nft data plane";
    let world = World::new(2);
    let mut plane = world.open();
    world.apply(
        &mut plane,
        &snapshot(&[(UDP_7000, &[0, 1]), (TCP_7000, &[0, 1])]),
    );

    let socket = world.client_udp(0);
    let local = socket.local_addr().unwrap();
    let mut served = Vec::new();
    for _ in 0..PACKETS {
        let (index, from) = udp_echo(&socket, &format!("{NODE_IP}:7000"), PAYLOAD);
        assert_eq!(from.to_string(), format!("{NODE_IP}:7000"), "reply source");
        served.push(index);
    }
    let index = served[0];
    assert!(
        served.iter().all(|i| *i == index),
        "one flow, one endpoint: {served:?}"
    );
    assert!(
        world.saw(index, local),
        "sandbox saw the client's own address {local}"
    );

    let counters = world.counters(&plane);
    let port = counters.ports[&UDP_7000];
    let bytes = PACKETS * (UDP_OVERHEAD + PAYLOAD.len() as u64);
    assert_eq!(port.rx_packets, PACKETS);
    assert_eq!(port.rx_bytes, bytes);
    assert_eq!(port.flows, 1);
    assert_eq!(port.tx_packets, PACKETS);
    assert_eq!(
        port.tx_bytes,
        bytes + PACKETS,
        "replies carry one extra byte"
    );
    assert_eq!(port.drop_no_backend, 0);
    let served_by = counters.backends[&(UDP_7000, sandbox(index))];
    assert_eq!((served_by.packets, served_by.bytes), (PACKETS, bytes));
    let other = counters.backends[&(UDP_7000, sandbox(1 - index))];
    assert_eq!((other.packets, other.bytes), (0, 0));

    let (index, tcp_local, tcp_peer) = world.client.run(|| tcp_echo(PAYLOAD)).unwrap();
    assert_eq!(tcp_peer.to_string(), format!("{NODE_IP}:7000"));
    assert!(
        world.saw(index, tcp_local),
        "sandbox saw the client's own {tcp_local}"
    );
    // The client closed; wait until the sandbox's FIN/ACK exchange is counted on both sides.
    let counters = wait_for_counters(&world, &plane, |c| {
        let port = c.ports[&TCP_7000];
        let backend = c.backends[&(TCP_7000, sandbox(index))];
        port.rx_packets == backend.packets && port.rx_packets >= 5
    });
    let port = counters.ports[&TCP_7000];
    let backend = counters.backends[&(TCP_7000, sandbox(index))];
    assert_eq!(port.flows, 1);
    assert_eq!(
        (port.rx_packets, port.rx_bytes),
        (backend.packets, backend.bytes),
        "every received packet was forwarded to the endpoint"
    );
    assert!(port.tx_packets >= 3, "SYN/ACK, index and echo: {port:?}");
    let other = counters.backends[&(TCP_7000, sandbox(1 - index))];
    assert_eq!(other.packets, 0);
}

#[test]
fn flows_spread_over_endpoints_and_stay_on_theirs() {
    const FLOWS: usize = 60;
    let world = World::new(3);
    let mut plane = world.open();
    world.apply(
        &mut plane,
        &snapshot(&[(UDP_7000, &[0, 1, 2]), (TCP_7000, &[0, 1, 2])]),
    );

    let sockets: Vec<UdpSocket> = (0..FLOWS).map(|_| world.client_udp(0)).collect();
    let to = format!("{NODE_IP}:7000");
    let first: Vec<usize> = sockets.iter().map(|s| udp_echo(s, &to, b"a").0).collect();
    for i in 0..3 {
        assert!(
            first.contains(&i),
            "endpoint {i} got no UDP flow: {first:?}"
        );
    }
    for (socket, index) in sockets.iter().zip(&first) {
        for _ in 0..3 {
            assert_eq!(udp_echo(socket, &to, b"b").0, *index, "the flow moved");
        }
    }
    let counters = world.counters(&plane);
    assert_eq!(counters.ports[&UDP_7000].flows, FLOWS as u64);
    for i in 0..3 {
        let packets = counters.backends[&(UDP_7000, sandbox(i))].packets;
        let flows = first.iter().filter(|f| **f == i).count() as u64;
        assert_eq!(packets, 4 * flows, "endpoint {i}");
    }

    let tcp: Vec<usize> = world
        .client
        .run(|| (0..FLOWS).map(|_| tcp_echo(b"c").0).collect())
        .unwrap();
    for i in 0..3 {
        assert!(
            tcp.contains(&i),
            "endpoint {i} got no TCP connection: {tcp:?}"
        );
    }
}

#[test]
fn a_node_port_without_endpoints_drops_and_counts() {
    const PACKETS: u64 = 4;
    let world = World::new(1);
    let mut plane = world.open();
    world.apply(&mut plane, &snapshot(&[(UDP_7000, &[0]), (UDP_7001, &[])]));
    // A server on the node itself would answer if the packets were not dropped.
    let local = world
        .node
        .run(|| UdpSocket::bind((NODE_IP, 7001)))
        .unwrap()
        .unwrap();
    local.set_nonblocking(true).unwrap();

    let socket = world.client_udp(0);
    for _ in 0..PACKETS {
        socket.send_to(b"nobody", (NODE_IP, 7001)).unwrap();
    }
    let counters = wait_for_counters(&world, &plane, |c| {
        c.ports[&UDP_7001].drop_no_backend >= PACKETS
    });
    let port = counters.ports[&UDP_7001];
    assert_eq!(port.drop_no_backend, PACKETS);
    assert_eq!(port.rx_packets, PACKETS);
    assert_eq!(port.rx_bytes, PACKETS * (UDP_OVERHEAD + 6));
    assert_eq!((port.flows, port.tx_packets), (0, 0));
    let mut buf = [0u8; 64];
    assert!(
        local.recv_from(&mut buf).is_err(),
        "a dropped packet reached the node's own socket"
    );
    // The other node port is unaffected.
    assert_eq!(udp_echo(&socket, &format!("{NODE_IP}:7000"), b"x").0, 0);
}

#[test]
fn connections_from_the_node_itself_reach_the_node_port() {
    let world = World::new(2);
    let mut plane = world.open();
    world.apply(
        &mut plane,
        &snapshot(&[(UDP_7000, &[0, 1]), (TCP_7000, &[0, 1])]),
    );
    let (udp_index, udp_from) = world
        .node
        .run(|| {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            udp_echo(&socket, &format!("{NODE_IP}:7000"), b"local")
        })
        .unwrap();
    assert_eq!(udp_from.to_string(), format!("{NODE_IP}:7000"));
    let (_, _, tcp_peer) = world.node.run(|| tcp_echo(b"local tcp")).unwrap();
    assert_eq!(tcp_peer.to_string(), format!("{NODE_IP}:7000"));

    let counters = world.counters(&plane);
    let port = counters.ports[&UDP_7000];
    assert_eq!((port.rx_packets, port.flows, port.tx_packets), (1, 1, 1));
    assert_eq!(
        counters.backends[&(UDP_7000, sandbox(udp_index))].packets,
        1
    );
}

/// Conntrack entries of UDP flows to `NODE_IP:7000` in the node namespace.
fn udp_conntrack(world: &World) -> String {
    udp_conntrack_of(world, "ipv4")
}

/// Conntrack entries of UDP flows of `family` (`ipv4`, `ipv6`) to port 7000 of the node.
fn udp_conntrack_of(world: &World, family: &str) -> String {
    let out = world
        .node
        .exec(
            "conntrack",
            &["-L", "-f", family, "-p", "udp", "--orig-port-dst", "7000"],
        )
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn removing_a_udp_endpoint_moves_its_sessions_to_the_others() {
    let world = World::new(2);
    let mut plane = world.open();
    world.apply(&mut plane, &snapshot(&[(UDP_7000, &[0, 1])]));
    let socket = world.client_udp(0);
    let to = format!("{NODE_IP}:7000");
    let (first, _) = udp_echo(&socket, &to, b"before");
    let survivor = 1 - first;
    let gone = format!("src={} ", sandbox(first).ip());
    assert!(udp_conntrack(&world).contains(&gone));

    world.apply(&mut plane, &snapshot(&[(UDP_7000, &[survivor])]));
    assert!(
        !udp_conntrack(&world).contains(&gone),
        "stale entries left: {}",
        udp_conntrack(&world)
    );
    // The removed sandbox still runs: without the deletion the flow would stay on it.
    assert_eq!(udp_echo(&socket, &to, b"after").0, survivor);

    // Removing the node port deletes the entries of its endpoints too.
    world.apply(&mut plane, &snapshot(&[]));
    assert!(
        udp_conntrack(&world).is_empty(),
        "{}",
        udp_conntrack(&world)
    );
}

#[test]
fn ipv6_node_ports_reach_the_instances_ipv6_endpoints_like_ipv4_ones() {
    const FLOWS: usize = 30;
    const PAYLOAD: &[u8] = b"ping over IPv6";
    let world = World::new_dual_stack(3);
    let mut plane = world.open();
    let all: &[usize] = &[0, 1, 2];
    world.apply(
        &mut plane,
        &snapshot_dual_stack(&[(UDP_7000, all), (TCP_7000, all), (UDP_7001, &[])]),
    );
    let to = format!("[{NODE_IP6}]:7000");
    let node_port: SocketAddr = to.parse().unwrap();

    // UDP: replies from the node port, the client's address seen, flows spread and stick.
    let sockets: Vec<UdpSocket> = (0..FLOWS)
        .map(|_| world.client_udp_at(CLIENT_IP6, 0))
        .collect();
    let mut served = Vec::new();
    for socket in &sockets {
        let (index, from) = udp_echo(socket, &to, PAYLOAD);
        assert_eq!(from, node_port, "reply source");
        let local = socket.local_addr().unwrap();
        assert!(world.saw(index, local), "sandbox {index} saw {local}");
        served.push(index);
    }
    for i in 0..3 {
        assert!(served.contains(&i), "endpoint {i} got no flow: {served:?}");
    }
    for (socket, index) in sockets.iter().zip(&served) {
        for _ in 0..2 {
            assert_eq!(udp_echo(socket, &to, PAYLOAD).0, *index, "the flow moved");
        }
    }
    let counters = world.counters(&plane);
    let port = counters.ports[&UDP_7000];
    let packets = 3 * FLOWS as u64;
    let bytes = packets * (UDP6_OVERHEAD + PAYLOAD.len() as u64);
    assert_eq!(
        (port.rx_packets, port.rx_bytes, port.flows),
        (packets, bytes, FLOWS as u64)
    );
    assert_eq!((port.tx_packets, port.tx_bytes), (packets, bytes + packets));
    for i in 0..3 {
        let flows = served.iter().filter(|s| **s == i).count() as u64;
        let backend = counters.backends6[&(UDP_7000, sandbox6(i))];
        assert_eq!(backend.packets, 3 * flows, "endpoint {i}");
        assert_eq!(counters.backends[&(UDP_7000, sandbox(i))].packets, 0);
    }

    // A node port without endpoints drops IPv6 too.
    let dropped = world.client_udp_at(CLIENT_IP6, 0);
    for _ in 0..2 {
        dropped
            .send_to(b"nobody", format!("[{NODE_IP6}]:7001"))
            .unwrap();
    }
    let counters = wait_for_counters(&world, &plane, |c| c.ports[&UDP_7001].drop_no_backend >= 2);
    assert_eq!(counters.ports[&UDP_7001].drop_no_backend, 2);
    assert_eq!(counters.ports[&UDP_7001].rx_packets, 2);

    // TCP: the same, connection by connection.
    let tcp: Vec<(usize, SocketAddr, SocketAddr)> = world
        .client
        .run(|| {
            (0..FLOWS)
                .map(|_| tcp_echo_to(node_port, b"tcp over IPv6"))
                .collect()
        })
        .unwrap();
    for (index, local, peer) in &tcp {
        assert_eq!(*peer, node_port);
        assert!(world.saw(*index, *local), "sandbox {index} saw {local}");
    }
    for i in 0..3 {
        assert!(
            tcp.iter().any(|t| t.0 == i),
            "endpoint {i} got no connection"
        );
    }
    let forwarded = |c: &Counters| -> u64 {
        (0..3)
            .map(|i| c.backends6[&(TCP_7000, sandbox6(i))].packets)
            .sum()
    };
    let counters = wait_for_counters(&world, &plane, |c| {
        c.ports[&TCP_7000].rx_packets == forwarded(c)
    });
    let port = counters.ports[&TCP_7000];
    assert_eq!(port.flows, FLOWS as u64);
    assert_eq!(port.rx_packets, forwarded(&counters), "all forwarded");
    assert!(port.tx_packets >= 3 * FLOWS as u64, "{port:?}");

    // IPv4 on the same node port, and both families from the node itself.
    let (_, from) = udp_echo(&world.client_udp(0), &format!("{NODE_IP}:7000"), b"v4");
    assert_eq!(from.to_string(), format!("{NODE_IP}:7000"));
    let (_, from) = world
        .node
        .run(|| {
            let socket = UdpSocket::bind(("::", 0)).unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            udp_echo(&socket, &to, b"local")
        })
        .unwrap();
    assert_eq!(from, node_port);
    let (_, _, peer) = world
        .node
        .run(|| tcp_echo_to(node_port, b"local tcp"))
        .unwrap();
    assert_eq!(peer, node_port);

    // A removed UDP endpoint's flows move; the others' stay.
    let (moved, gone) = (&sockets[0], served[0]);
    let (stays, kept) = sockets
        .iter()
        .zip(&served)
        .find(|(_, s)| **s != gone)
        .unwrap();
    let entry = format!("src={} ", sandbox6(gone).ip());
    assert!(udp_conntrack_of(&world, "ipv6").contains(&entry));
    let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != gone).collect();
    world.apply(
        &mut plane,
        &snapshot_dual_stack(&[(UDP_7000, &survivors), (TCP_7000, all)]),
    );
    assert!(
        !udp_conntrack_of(&world, "ipv6").contains(&entry),
        "stale entries left: {}",
        udp_conntrack_of(&world, "ipv6")
    );
    let now = udp_echo(moved, &to, b"after").0;
    assert!(survivors.contains(&now), "still on the removed {gone}");
    assert_eq!(udp_echo(stays, &to, b"after").0, *kept);
    let counters = world.counters(&plane);
    assert!(!counters.backends6.contains_key(&(UDP_7000, sandbox6(gone))));
}

#[test]
fn counters_survive_a_new_dataplane_and_the_same_snapshot_writes_nothing() {
    let world = World::new(2);
    let wanted = snapshot(&[(UDP_7000, &[0, 1]), (TCP_7000, &[1]), (UDP_7001, &[])]);
    let mut plane = world.open();
    world.apply(&mut plane, &wanted);
    let socket = world.client_udp(0);
    let to = format!("{NODE_IP}:7000");
    for _ in 0..3 {
        udp_echo(&socket, &to, b"count me");
    }
    let before = world.counters(&plane);
    let listing = world.listing();

    world.apply(&mut plane, &wanted);
    assert_eq!(world.listing(), listing, "a second apply changed the table");

    // An agent restart: a new data plane adopts the table.
    drop(plane);
    let mut plane = world.open();
    assert_eq!(world.counters(&plane), before);
    world.apply(&mut plane, &wanted);
    assert_eq!(
        world.listing(),
        listing,
        "the adopting apply changed the table"
    );

    // Changing one endpoint keeps every other counter.
    world.apply(
        &mut plane,
        &snapshot(&[(UDP_7000, &[0, 1]), (TCP_7000, &[0]), (UDP_7001, &[])]),
    );
    let after = world.counters(&plane);
    assert_eq!(after.ports, before.ports);
    assert_eq!(
        after.backends[&(UDP_7000, sandbox(0))],
        before.backends[&(UDP_7000, sandbox(0))]
    );
    assert_eq!(
        after.backends[&(UDP_7000, sandbox(1))],
        before.backends[&(UDP_7000, sandbox(1))]
    );
    assert!(after.backends.contains_key(&(TCP_7000, sandbox(0))));
    assert!(!after.backends.contains_key(&(TCP_7000, sandbox(1))));
    udp_echo(&socket, &to, b"count me");
    let more = world.counters(&plane);
    assert_eq!(
        more.ports[&UDP_7000].rx_packets,
        before.ports[&UDP_7000].rx_packets + 1
    );
}

#[test]
fn the_table_is_owned_alone_removed_and_repaired() {
    let node = Netns::new("nft-own").unwrap();
    let foreign = "table inet other {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 1.2.3.4 }\n\t}\n\n\tchain c {\n\t\ttype filter hook input priority 0; policy accept;\n\t\ttcp dport 22 accept\n\t}\n}\n";
    let mut child = node
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(foreign.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let other = || nft(&node, &["list", "table", "inet", "other"]);
    let original = other();

    let wanted = snapshot(&[(UDP_7000, &[0, 1]), (TCP_7000, &[2])]);
    let mut plane = node.run(NftDataplane::open).unwrap().unwrap();
    node.run(|| plane.apply(&wanted)).unwrap().unwrap();
    assert_eq!(other(), original);
    let ports = |plane: &NftDataplane| {
        node.run(|| plane.counters())
            .unwrap()
            .unwrap()
            .ports
            .keys()
            .copied()
            .collect::<Vec<_>>()
    };
    assert_eq!(ports(&plane), vec![TCP_7000, UDP_7000]);

    // Someone deletes the table: refresh sees it, the next apply restores it.
    nft(&node, &["delete", "table", "inet", "miren"]);
    assert!(ports(&plane).is_empty());
    node.run(|| plane.refresh()).unwrap().unwrap();
    node.run(|| plane.apply(&wanted)).unwrap().unwrap();
    assert_eq!(ports(&plane), vec![TCP_7000, UDP_7000]);

    // Someone deletes an element the data plane believes in: the apply that would delete it
    // fails once, re-reads the table and succeeds.
    nft(
        &node,
        &[
            "delete",
            "element",
            "inet",
            "miren",
            "backend_udp",
            "{ 7000 . 10.89.0.3 . 9000 }",
        ],
    );
    node.run(|| plane.apply(&snapshot(&[(UDP_7000, &[0]), (TCP_7000, &[2])])))
        .unwrap()
        .unwrap();
    let backends: Vec<_> = node
        .run(|| plane.counters())
        .unwrap()
        .unwrap()
        .backends
        .into_keys()
        .collect();
    assert_eq!(
        backends,
        vec![(TCP_7000, sandbox(2)), (UDP_7000, sandbox(0))]
    );

    assert!(node.run(NftDataplane::remove_table).unwrap().unwrap());
    assert!(!node.run(NftDataplane::remove_table).unwrap().unwrap());
    assert_eq!(other(), original);
    let tables = nft(&node, &["list", "tables"]);
    assert_eq!(tables.trim(), "table inet other");
}

#[test]
fn without_a_table_there_are_no_counters() {
    let node = Netns::new("nft-empty").unwrap();
    let plane = node.run(NftDataplane::open).unwrap().unwrap();
    let counters = node.run(|| plane.counters()).unwrap().unwrap();
    assert_eq!(counters, Counters::default());
}
