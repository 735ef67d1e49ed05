//! The nftables data plane in namespaces with real sockets: a client namespace reaches UDP and
//! TCP echo servers in sandbox namespaces through NODE_IP:node_port, DNATed by the rules of
//! `NftDataplane` applied in the node namespace. Counters are checked exactly.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
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
        let (client, node) = client_and_node("nft").unwrap();
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        node.bridge("br0").unwrap();
        node.addr("br0", "10.89.0.1/24").unwrap();
        let mut namespaces = Vec::new();
        let mut peers = Vec::new();
        for i in 0..sandboxes {
            let ns = Netns::new(&format!("nft-sb{i}")).unwrap();
            let port = format!("sb{i}");
            veth(&node, &port, &ns, "eth0").unwrap();
            node.attach_to_bridge(&port, "br0").unwrap();
            ns.addr("eth0", &format!("{}/24", sandbox(i).ip())).unwrap();
            ns.route(&["default", "via", "10.89.0.1"]).unwrap();
            peers.push(echo_servers(&ns, i));
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
        let socket = self
            .client
            .run(|| UdpSocket::bind((CLIENT_IP, port)))
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

fn echo_servers(ns: &Netns, index: usize) -> Arc<Mutex<Vec<SocketAddr>>> {
    let peers = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    let addr = sandbox(index);
    let udp = ns.run(|| UdpSocket::bind(addr)).unwrap().unwrap();
    let seen = Arc::clone(&peers);
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
    let seen = Arc::clone(&peers);
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
    peers
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
    let node_port = format!("{NODE_IP}:7000").parse().unwrap();
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
    let out = world
        .node
        .exec("conntrack", &["-L", "-p", "udp", "--orig-port-dst", "7000"])
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
