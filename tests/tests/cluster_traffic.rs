//! Traffic in cluster mode, the same on both node-port data planes: three node namespaces and
//! a client on one fabric, a real 3-member etcd (a member per node), an agent per node running
//! instances with a data plane on its `eth0`. An app with a UDP node port, a TCP node port and
//! an HTTP route, fixed at 3 instances, is deployed once through node 0 (its directory is then
//! deleted: the code travels as a bundle); the scheduler spreads the instances one per node.
//! Every node answers on its own address for every instance: node ports (flows to another
//! node's instance are masqueraded to the entry node's address, flows to a local one keep the
//! client's address), the ingress, the instances' internal DNS; the nodes route each other's
//! sandbox subnets, and apps stay isolated across nodes.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::Command,
    time::Duration,
};

use miren_agent::config::Subnet;
use miren_tests::{
    apps::{
        HttpClient, WEB_PY, in_netns, sandbox_netns, tcp_connects, udp_exchange, wait_until,
        write_app,
    },
    cluster::{CLIENT_IP, EtcdCluster, Fabric, node_ip},
    cluster_agents::ClusterAgents,
    ingress::ok,
    on_both_planes,
    world::Plane,
};

/// Nodes (and etcd members).
const NODES: usize = 3;
/// The app's UDP and TCP node ports.
const UDP_NODE_PORT: u16 = 30000;
const TCP_NODE_PORT: u16 = 30001;
/// The route to the app's HTTP port.
const HOST: &str = "echo.cluster.test";
/// How long the cluster may take to get somewhere (instances start on three nodes).
const WAIT: Duration = Duration::from_secs(120);
/// Flows per node address and protocol: with 3 instances, the chance that Maglev leaves one
/// out of 48 flows is 3·(2/3)^48 ≈ 1e-8.
const FLOWS: u16 = 48;
/// Extra client addresses for flows whose source port is the node port itself.
const EXTRA_CLIENTS: u8 = 10;

/// Put before [`WEB_PY`]: a UDP echo on 9000 and a TCP echo on 9001 answering `ADDR PEER
/// MESSAGE`, PEER being the address the instance sees the message come from.
const ECHO_PY: &str = r#"import os, socket, threading
addr = os.environ["MIREN_ADDR"]
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9000))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(("%s %s " % (addr, peer[0])).encode() + data, peer)
def tcp_client(conn, peer):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(("%s %s " % (addr, peer[0])).encode() + line)
def tcp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9001))
    s.listen(64)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=tcp_client, args=(conn, peer), daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
"#;

/// App `name` running [`ECHO_PY`] and [`WEB_PY`] in 3 fixed instances, with `node_ports`
/// (UDP, TCP) when given.
fn app_toml(name: &str, node_ports: Option<(u16, u16)>) -> String {
    let (udp, tcp) = node_ports.map_or((String::new(), String::new()), |(udp, tcp)| {
        (
            format!("node_port = {udp}\n"),
            format!("node_port = {tcp}\n"),
        )
    });
    format!(
        "name = \"{name}\"\n\
         [services.echo]\ncommand = \"exec python3 serve.py\"\n\
         [services.echo.concurrency]\nmode = \"fixed\"\nnum_instances = 3\n\
         [[services.echo.ports]]\nname = \"http\"\nport = 8080\ntype = \"http\"\n\
         [[services.echo.ports]]\nname = \"udp\"\nport = 9000\ntype = \"udp\"\n{udp}\
         [[services.echo.ports]]\nname = \"tcp\"\nport = 9001\ntype = \"tcp\"\n{tcp}"
    )
}

/// The cluster under test.
struct Cluster {
    // Dropped in this order: agents (and their instances), etcd, then the namespaces.
    agents: ClusterAgents,
    _etcd: EtcdCluster,
    fabric: Fabric,
}

impl Cluster {
    fn start(tag: &str, plane: Plane) -> Self {
        let fabric = Fabric::new(tag, NODES, true).expect("fabric");
        let etcd = EtcdCluster::start(&fabric, NODES);
        let agents = ClusterAgents::start_with_dataplane(
            &fabric,
            &etcd,
            NODES,
            plane.flag(),
            &["--stop-instances-on-exit"],
        );
        Self {
            agents,
            _etcd: etcd,
            fabric,
        }
    }

    /// `miren ARGS` on node `i`, asserting success: its stdout.
    fn ok(&self, i: usize, args: &[&str]) -> String {
        ok(self.agents.agent(i), args)
    }

    /// `miren --output json nodes` on node `i`.
    fn nodes(&self, i: usize) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(i, &["--output", "json", "nodes"])).expect("nodes JSON")
    }

    /// Each node's sandbox subnet, as node 0 sees them.
    fn subnets(&self) -> Vec<Subnet> {
        let nodes = self.nodes(0);
        (0..NODES)
            .map(|i| {
                let node = nodes
                    .iter()
                    .find(|n| n["name"] == format!("node{i}"))
                    .unwrap_or_else(|| panic!("node{i} is not registered: {nodes:?}"));
                Subnet::parse(node["subnet"].as_str().unwrap()).unwrap()
            })
            .collect()
    }

    /// The addresses of `app`'s ready instances on `port_name`, as node `i` sees them.
    fn endpoints(&self, i: usize, app: &str, port_name: &str) -> BTreeSet<Ipv4Addr> {
        miren_tests::apps::endpoints(self.agents.agent(i), app, "echo", port_name)
            .iter()
            .map(|addr| match addr.ip() {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(v6) => panic!("IPv6 endpoint {v6}"),
            })
            .collect()
    }

    /// The routes of protocol 109 (the agent's) in node `i`'s namespace.
    fn peer_routes(&self, i: usize) -> String {
        routes_of(&self.fabric, i)
    }

    /// Waits until every node sees `app`'s 3 instances, one in each node's subnet, on each of
    /// its ports, and every node's data plane applied what it sees; returns the instances in
    /// node order.
    fn wait_for_instances(&self, app: &str, subnets: &[Subnet]) -> Vec<Ipv4Addr> {
        let one_per_node = |addrs: &BTreeSet<Ipv4Addr>| {
            addrs.len() == NODES
                && subnets
                    .iter()
                    .all(|s| addrs.iter().filter(|a| s.contains(**a)).count() == 1)
        };
        wait_until(&format!("{app}: one ready instance per node"), WAIT, || {
            (0..NODES).all(|i| {
                ["http", "udp", "tcp"]
                    .iter()
                    .all(|port| one_per_node(&self.endpoints(i, app, port)))
            })
        });
        let addrs = self.endpoints(0, app, "udp");
        subnets
            .iter()
            .map(|s| *addrs.iter().find(|a| s.contains(**a)).unwrap())
            .collect()
    }

    /// Waits until every node reports its node ports applied.
    fn wait_for_dataplanes(&self) {
        wait_until("every node's data plane applied", WAIT, || {
            (0..NODES).all(|i| {
                let ports = self.ok(i, &["ports"]);
                let mut lines = ports.lines().skip(1).peekable();
                lines.peek().is_some() && lines.all(|l| l.trim_end().ends_with("ok"))
            })
        });
    }
}

/// A reply `ADDR PEER MESSAGE` of an echo: the instance and the peer it saw.
fn parse_echo(reply: &str, message: &str) -> (Ipv4Addr, Ipv4Addr) {
    let mut parts = reply.trim_end().splitn(3, ' ');
    let (Some(addr), Some(peer), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("unexpected echo {reply:?}");
    };
    assert_eq!(rest, message, "echo of {message:?}: {reply:?}");
    (addr.parse().unwrap(), peer.parse().unwrap())
}

/// Which instance a node-port flow through node `node` from `client` reached, checking the
/// address the instance saw: the client's for an instance on `node`, `node`'s own address
/// (masqueraded) for an instance on another node.
fn check_source(
    subnets: &[Subnet],
    node: usize,
    client: Ipv4Addr,
    (instance, peer): (Ipv4Addr, Ipv4Addr),
) -> Ipv4Addr {
    let expected = if subnets[node].contains(instance) {
        client
    } else {
        node_ip(node)
    };
    assert_eq!(
        peer, expected,
        "instance {instance} saw the flow through node{node} from {peer}"
    );
    instance
}

/// One UDP exchange from `from` to node `node`'s UDP node port: the reply must come from the
/// address and port the client used. Returns the instance that answered.
fn udp_flow(subnets: &[Subnet], node: usize, from: SocketAddr, message: &str) -> Ipv4Addr {
    let socket = UdpSocket::bind(from).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let target = SocketAddr::from((node_ip(node), UDP_NODE_PORT));
    socket.send_to(message.as_bytes(), target).unwrap();
    let mut buf = [0u8; 2048];
    let (len, replier) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no UDP reply through node{node} to {from}: {e}"));
    assert_eq!(replier, target, "the reply to {from} came from {replier}");
    let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
    let client = match from.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => unreachable!(),
    };
    check_source(subnets, node, client, parse_echo(&reply, message))
}

/// One TCP connection to node `node`'s TCP node port, one line echoed. Returns the instance
/// that answered.
fn tcp_flow(subnets: &[Subnet], node: usize, message: &str) -> Ipv4Addr {
    let target = SocketAddr::from((node_ip(node), TCP_NODE_PORT));
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("TCP through node{node}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(stream.peer_addr().unwrap(), target);
    writeln!(stream, "{message}").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    check_source(subnets, node, CLIENT_IP, parse_echo(&reply, message))
}

/// The addresses `getent ahostsv4 NAME` gives inside the container at `addr` on node `node`.
fn resolve_inside(cluster: &Cluster, node: usize, addr: Ipv4Addr, name: &str) -> BTreeSet<String> {
    let netns = sandbox_netns(cluster.agents.agent(node).pid(), addr);
    let runc_root = cluster.agents.node_dir(node).join("state/sandbox/runc");
    let out = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["exec", netns.trim_start_matches("miren-s")])
        .args(["getent", "ahostsv4", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "getent in {addr}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

const HTTP: HttpClient = HttpClient {
    connect_timeout: Some(Duration::from_secs(5)),
    read_timeout: Duration::from_secs(10),
};

fn every_node_serves_every_instance(plane: Plane) {
    let cluster = Cluster::start(&format!("ct{}", plane.flag()), plane);
    let subnets = cluster.subnets();

    // Deploy once, through node 0, and remove the directory: the code travels as a bundle.
    let dir = write_app(
        cluster.agents.dir(),
        "echo",
        &app_toml("echo", Some((UDP_NODE_PORT, TCP_NODE_PORT))),
        &[("serve.py", &format!("{ECHO_PY}{WEB_PY}"))],
    );
    cluster.ok(0, &["deploy", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    cluster.ok(0, &["route", "set", HOST, "echo"]);
    // Another app, to check that apps stay apart across nodes.
    let other = write_app(
        cluster.agents.dir(),
        "other",
        &app_toml("other", None),
        &[("serve.py", &format!("{ECHO_PY}{WEB_PY}"))],
    );
    cluster.ok(0, &["deploy", other.to_str().unwrap()]);

    let echo = cluster.wait_for_instances("echo", &subnets);
    let others = cluster.wait_for_instances("other", &subnets);
    cluster.wait_for_dataplanes();
    let all: BTreeSet<Ipv4Addr> = echo.iter().copied().collect();
    for (i, node) in cluster.nodes(0).iter().enumerate() {
        assert_eq!(node["instances"], 2, "node{i}: {node}");
    }

    // Every node routes the other two nodes' subnets via their addresses, and only those.
    wait_until("routes to the other nodes' subnets", WAIT, || {
        (0..NODES).all(|i| cluster.peer_routes(i).lines().count() == NODES - 1)
    });
    for i in 0..NODES {
        let routes = cluster.peer_routes(i);
        assert_eq!(routes.lines().count(), NODES - 1, "node{i}: {routes}");
        for j in (0..NODES).filter(|j| *j != i) {
            let line = format!("{} via {} dev eth0", subnets[j], node_ip(j));
            assert!(routes.contains(&line), "node{i} lacks {line}: {routes}");
        }
    }

    let client = cluster.fabric.client().expect("client namespace");
    let extra: Vec<Ipv4Addr> = (1..=EXTRA_CLIENTS)
        .map(|k| Ipv4Addr::new(10, 95, 0, 200 + k))
        .collect();
    for addr in &extra {
        client.addr("eth0", &format!("{addr}/24")).unwrap();
    }
    client
        .run(|| {
            for node in 0..NODES {
                // UDP and TCP through each node's address reach every instance, and the
                // replies come from the address the client used.
                let udp: BTreeSet<Ipv4Addr> = (0..FLOWS)
                    .map(|k| {
                        let from = SocketAddr::from((CLIENT_IP, 0));
                        udp_flow(&subnets, node, from, &format!("udp{k}"))
                    })
                    .collect();
                assert_eq!(udp, all, "UDP through node{node}");
                let tcp: BTreeSet<Ipv4Addr> = (0..FLOWS)
                    .map(|k| tcp_flow(&subnets, node, &format!("tcp{k}")))
                    .collect();
                assert_eq!(tcp, all, "TCP through node{node}");

                // A client whose source port is the node port: a flow masqueraded to another
                // node keeps that port, so the instance's reply comes back to NODE_IP and the
                // node port, which the data plane must leave to conntrack.
                let remote = extra
                    .iter()
                    .map(|addr| {
                        let from = SocketAddr::from((*addr, UDP_NODE_PORT));
                        udp_flow(&subnets, node, from, &format!("same port from {addr}"))
                    })
                    .filter(|instance| !subnets[node].contains(*instance))
                    .count();
                assert!(
                    remote > 0,
                    "no same-port flow through node{node} went to another node"
                );
            }
        })
        .unwrap();

    // `miren ports` on any node sums every node's counters; `by_node` keeps each node's own.
    let out = cluster.agents.miren(1, &["--output", "json", "ports"]);
    assert!(out.status.success(), "{out:?}");
    let ports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let udp = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_port"] == UDP_NODE_PORT && p["protocol"] == "udp")
        .unwrap_or_else(|| panic!("no UDP node port in {ports}"));
    let by_node = udp["by_node"].as_object().expect("by_node");
    assert_eq!(by_node.len(), NODES, "{udp}");
    let per_node: Vec<u64> = by_node
        .values()
        .map(|t| t["rx_packets"].as_u64().unwrap())
        .collect();
    assert!(
        per_node.iter().all(|rx| *rx > 0),
        "every node received UDP: {udp}"
    );
    assert_eq!(
        udp["traffic"]["rx_packets"].as_u64().unwrap(),
        per_node.iter().sum::<u64>(),
        "{udp}"
    );
    let text = cluster.ok(0, &["ports", "--by-node"]);
    assert!(
        text.contains("by node:") && text.contains("node2"),
        "{text}"
    );

    // The route answers on every node's ingress, from every instance.
    client
        .run(|| {
            for node in 0..NODES {
                let ingress = SocketAddr::from((node_ip(node), 80));
                let seen: BTreeSet<Ipv4Addr> = (0..12)
                    .map(|_| {
                        let (status, body) = HTTP.get(ingress, HOST, "/").unwrap();
                        assert_eq!(status, 200, "node{node}: {body}");
                        body.parse().unwrap()
                    })
                    .collect();
                assert_eq!(seen, all, "HTTP through node{node}");
            }
        })
        .unwrap();

    // Inside every instance, the service's name resolves to the instances on every node.
    let names: BTreeSet<String> = all.iter().map(ToString::to_string).collect();
    for (node, addr) in echo.iter().enumerate() {
        assert_eq!(
            resolve_inside(&cluster, node, *addr, "echo.app.miren"),
            names,
            "DNS inside {addr} on node{node}"
        );
    }

    // Across nodes, an instance reaches its own app's instances (with its own address as the
    // source), not another app's, and on other nodes only the ingress.
    let netns = sandbox_netns(cluster.agents.agent(0).pid(), echo[0]);
    let etcd = SocketAddr::from((node_ip(1), 2379));
    assert!(
        cluster.fabric.node(0).run(|| tcp_connects(etcd)).unwrap(),
        "node0 reaches node1's etcd"
    );
    in_netns(&netns, || {
        let wait = Duration::from_secs(5);
        for peer in &echo[1..] {
            let reply = udp_exchange((*peer, 9000).into(), b"sibling", wait)
                .unwrap_or_else(|| panic!("{} got no UDP reply from {peer}", echo[0]));
            let reply = String::from_utf8(reply).unwrap();
            assert_eq!(parse_echo(&reply, "sibling"), (*peer, echo[0]));
            assert!(tcp_connects((*peer, 9001).into()), "TCP to {peer}");
        }
        for stranger in &others[1..] {
            let wait = Duration::from_secs(2);
            let reply = udp_exchange((*stranger, 9000).into(), b"stranger", wait);
            assert_eq!(reply, None, "{} reached {stranger} over UDP", echo[0]);
            assert!(!tcp_connects((*stranger, 9001).into()), "TCP to {stranger}");
        }
        assert!(tcp_connects((node_ip(1), 80).into()), "node1's ingress");
        assert!(!tcp_connects(etcd), "an instance reached node1's etcd");
    });
}

on_both_planes!(every_node_serves_every_instance);

/// The routes of protocol 109 in node `i`'s namespace, one per line.
fn routes_of(fabric: &Fabric, i: usize) -> String {
    fabric
        .node(i)
        .ip(&["-4", "route", "show", "proto", "109"])
        .unwrap()
}

/// The routes to the other nodes' subnets stay when an agent stops, are repaired by the next
/// one, and go when a node is removed.
#[test]
fn routes_follow_the_nodes_and_outlive_the_agent() {
    let fabric = Fabric::new("routes", NODES, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, NODES);
    let mut agents = ClusterAgents::start(&fabric, &etcd, NODES, &["--no-sandboxes"]);
    wait_until("every node routes the two others", WAIT, || {
        (0..NODES).all(|i| routes_of(&fabric, i).lines().count() == NODES - 1)
    });
    let before = routes_of(&fabric, 0);
    let node2_subnet = before
        .lines()
        .find(|l| l.contains(&format!("via {} ", node_ip(2))))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("node0 has no route via node2: {before}"))
        .to_owned();

    // Stopped, the agent leaves its routes; a route lost meanwhile is back with the next one.
    agents.stop(0);
    assert_eq!(routes_of(&fabric, 0), before);
    fabric
        .node(0)
        .ip(&["route", "del", &node2_subnet, "proto", "109"])
        .unwrap();
    agents.restart(&fabric, 0);
    wait_until("node0's route to node2 repaired", WAIT, || {
        routes_of(&fabric, 0) == before
    });

    // node2 is lost, then removed: the others delete their routes to it.
    agents.kill9(2);
    wait_until("node2 lost", WAIT, || {
        let nodes: Vec<serde_json::Value> =
            serde_json::from_str(&ok(agents.agent(0), &["--output", "json", "nodes"])).unwrap();
        nodes
            .iter()
            .any(|n| n["name"] == "node2" && n["status"] == "lost")
    });
    ok(agents.agent(0), &["node", "rm", "node2"]);
    wait_until("the routes to node2 deleted", WAIT, || {
        (0..2).all(|i| {
            let routes = routes_of(&fabric, i);
            routes.lines().count() == 1 && !routes.contains(&node2_subnet)
        })
    });
}
