//! Traffic in cluster mode, the same on both node-port data planes: three node namespaces and
//! a client on one fabric, a real 3-member etcd (a member per node), an agent per node running
//! instances with a data plane on its `eth0`. An app with a UDP node port, a TCP node port and
//! an HTTP route, fixed at 3 instances, is deployed once through node 0 (its directory is then
//! deleted: the code travels as a bundle); the scheduler spreads the instances one per node.
//! Every node answers on its own address for every instance: node ports (flows to another
//! node's instance are masqueraded to the entry node's address, flows to a local one keep the
//! client's address), the ingress, the instances' internal DNS; the nodes route each other's
//! sandbox subnets, and apps stay isolated across nodes. On a dual-stack fabric (every node
//! also with an IPv6 `--node-ip`) the same node ports answer on every node's IPv6 address:
//! the nodes route each other's IPv6 /80s, and flows to another node's instance are
//! masqueraded to the entry node's IPv6 address, as IPv4 ones are.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use miren_agent::{
    config::{DualStack, Subnet, Subnet6},
    settings::DEFAULT_SANDBOX_SUBNET6,
};
use miren_tests::{
    apps::{
        HttpClient, WEB_PY, in_netns, sandbox_netns, tcp_connects, udp_exchange, wait_until,
        write_app,
    },
    cluster::{CLIENT_IP, CLIENT_IP6, EtcdCluster, Fabric, node_ip, node_ip6},
    cluster_agents::ClusterAgents,
    cluster_checks::{
        Cluster, ECHO_PY, FLOWS, NODES, WAIT, app_toml, parse_echo, tcp_to, tcp_via, udp_to,
        udp_via,
    },
    ingress::ok,
    on_both_planes,
    world::Plane,
};

/// The app's UDP and TCP node ports.
const UDP_NODE_PORT: u16 = 30000;
const TCP_NODE_PORT: u16 = 30001;
/// The route to the app's HTTP port.
const HOST: &str = "echo.cluster.test";
/// Extra client addresses for flows whose source port is the node port itself.
const EXTRA_CLIENTS: u8 = 10;
/// How long one flow may wait for its answer.
const FLOW_WAIT: Duration = Duration::from_secs(5);

/// One UDP exchange from `from` to node `node`'s UDP node port: the reply must come from the
/// address and port the client used. Returns the instance that answered.
fn udp_flow(subnets: &[Subnet], node: usize, from: SocketAddr, message: &str) -> Ipv4Addr {
    udp_via(subnets, node, UDP_NODE_PORT, from, message, FLOW_WAIT)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One TCP connection to node `node`'s TCP node port, one line echoed. Returns the instance
/// that answered.
fn tcp_flow(subnets: &[Subnet], node: usize, message: &str) -> Ipv4Addr {
    tcp_via(subnets, node, TCP_NODE_PORT, message, FLOW_WAIT).unwrap_or_else(|e| panic!("{e}"))
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

/// Writes app `name` ([`app_toml`] with `node_ports`, running [`ECHO_PY`] and [`WEB_PY`]) and
/// deploys it through node 0. Returns the app directory.
fn deploy_echo_app(cluster: &Cluster, name: &str, node_ports: Option<(u16, u16)>) -> PathBuf {
    let dir = write_app(
        cluster.agents.dir(),
        name,
        &app_toml(name, node_ports),
        &[("serve.py", &format!("{ECHO_PY}{WEB_PY}"))],
    );
    cluster.ok(0, &["deploy", dir.to_str().unwrap()]);
    dir
}

const HTTP: HttpClient = HttpClient {
    connect_timeout: Some(Duration::from_secs(5)),
    read_timeout: Duration::from_secs(10),
};

fn every_node_serves_every_instance(plane: Plane) {
    let cluster = Cluster::start(&format!("ct{}", plane.flag()), plane);
    let subnets = cluster.subnets();

    // Deploy once, through node 0, and remove the directory: the code travels as a bundle.
    let dir = deploy_echo_app(&cluster, "echo", Some((UDP_NODE_PORT, TCP_NODE_PORT)));
    std::fs::remove_dir_all(&dir).unwrap();
    cluster.ok(0, &["route", "set", HOST, "echo"]);
    // Another app, to check that apps stay apart across nodes.
    deploy_echo_app(&cluster, "other", None);

    let echo = cluster.wait_for_instances("echo", &subnets);
    let others = cluster.wait_for_instances("other", &subnets);
    cluster.wait_for_dataplanes();
    let all: BTreeSet<Ipv4Addr> = echo.iter().copied().collect();
    for (i, node) in cluster.nodes(0).iter().enumerate() {
        assert_eq!(node["instances"], 2, "node{i}: {node}");
    }

    // Every node routes the other two nodes' subnets via their addresses, and only those.
    wait_until("routes to the other nodes' subnets", WAIT, || {
        (0..NODES).all(|i| routes_of(&cluster.fabric, i).lines().count() == NODES - 1)
    });
    for i in 0..NODES {
        let routes = routes_of(&cluster.fabric, i);
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

/// A dual-stack cluster (tag `tag`, data plane `plane`) running the echo app with both node
/// ports, one instance per node: the cluster, each node's subnet and the instances.
fn ipv6_cluster(tag: &str, plane: Plane) -> (Cluster, Vec<Subnet>, BTreeSet<Ipv4Addr>) {
    let cluster = Cluster::start_dual_stack(&format!("{tag}{}", plane.flag()), plane);
    let subnets = cluster.subnets();
    deploy_echo_app(&cluster, "echo", Some((UDP_NODE_PORT, TCP_NODE_PORT)));
    let echo = cluster.wait_for_instances("echo", &subnets);
    cluster.wait_for_dataplanes();
    (cluster, subnets, echo.into_iter().collect())
}

/// The same node ports over IPv6, through every node's IPv6 address: UDP and TCP reach every
/// instance, replies come from `[NODE_IP6]:node_port`, a local instance sees the client's
/// IPv6 address and another node's instance the entry node's (masqueraded, as for IPv4); the
/// nodes route each other's /80s via their IPv6 addresses. IPv4 keeps working beside it.
fn every_node_serves_every_instance_over_ipv6(plane: Plane) {
    let (cluster, subnets, all) = ipv6_cluster("c6", plane);

    // Every node routes the other two nodes' /80s via their IPv6 addresses, and only those.
    let dual = DualStack {
        // The agents' default --sandbox-subnet and --node-subnet-size.
        v4: Subnet::parse("10.88.0.0/16").unwrap(),
        node_prefix: 24,
        v6: Subnet6::parse(DEFAULT_SANDBOX_SUBNET6).unwrap(),
    };
    wait_until("routes to the other nodes' /80s", WAIT, || {
        (0..NODES).all(|i| routes6_of(&cluster.fabric, i).lines().count() == NODES - 1)
    });
    for i in 0..NODES {
        let routes = routes6_of(&cluster.fabric, i);
        for j in (0..NODES).filter(|j| *j != i) {
            let line = format!(
                "{} via {} dev eth0",
                dual.node_subnet6(subnets[j]),
                node_ip6(j)
            );
            assert!(routes.contains(&line), "node{i} lacks {line}: {routes}");
        }
    }

    let client = cluster.fabric.client().expect("client namespace");
    client
        .run(|| {
            for node in 0..NODES {
                let udp_target = SocketAddr::from((node_ip6(node), UDP_NODE_PORT));
                let udp: BTreeSet<Ipv4Addr> = (0..FLOWS)
                    .map(|k| {
                        let from = SocketAddr::from((CLIENT_IP6, 0));
                        udp_to(
                            &subnets,
                            node,
                            udp_target,
                            from,
                            &format!("udp6 {k}"),
                            FLOW_WAIT,
                        )
                        .unwrap_or_else(|e| panic!("{e}"))
                    })
                    .collect();
                assert_eq!(udp, all, "UDP through node{node}'s IPv6 address");
                let tcp_target = SocketAddr::from((node_ip6(node), TCP_NODE_PORT));
                let tcp: BTreeSet<Ipv4Addr> = (0..FLOWS)
                    .map(|k| {
                        tcp_to(&subnets, node, tcp_target, &format!("tcp6 {k}"), FLOW_WAIT)
                            .unwrap_or_else(|e| panic!("{e}"))
                    })
                    .collect();
                assert_eq!(tcp, all, "TCP through node{node}'s IPv6 address");

                // IPv4 beside it.
                let from = SocketAddr::from((CLIENT_IP, 0));
                udp_flow(&subnets, node, from, "udp4");
                tcp_flow(&subnets, node, "tcp4");
            }
        })
        .unwrap();
}

/// IPv6 clients whose source port is the UDP node port itself: a flow masqueraded to another
/// node keeps that port, so the instance's reply comes back to `[NODE_IP6]:node_port`, which
/// the data plane must leave to conntrack (as `every_node_serves_every_instance` checks for
/// IPv4; on XDP `MIREN_BACKEND_ADDRS6` says a backend's own address and port is never a
/// client).
fn same_port_ipv6_clients_reach_other_nodes(plane: Plane) {
    let (cluster, subnets, _) = ipv6_cluster("c6port", plane);
    let client = cluster.fabric.client().expect("client namespace");
    let extra: Vec<Ipv6Addr> = (1..=u16::from(EXTRA_CLIENTS))
        .map(|k| Ipv6Addr::new(0xfd00, 0x95, 0, 0, 0, 0, 0, 200 + k))
        .collect();
    for addr in &extra {
        let cidr = format!("{addr}/64");
        client
            .ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])
            .unwrap();
    }
    client
        .run(|| {
            for node in 0..NODES {
                let target = SocketAddr::from((node_ip6(node), UDP_NODE_PORT));
                let remote = extra
                    .iter()
                    .map(|addr| {
                        let from = SocketAddr::from((*addr, UDP_NODE_PORT));
                        let message = format!("same port from {addr}");
                        udp_to(&subnets, node, target, from, &message, FLOW_WAIT)
                            .unwrap_or_else(|e| panic!("{e}"))
                    })
                    .filter(|instance| !subnets[node].contains(*instance))
                    .count();
                assert!(
                    remote > 0,
                    "no same-port IPv6 flow through node{node} went to another node"
                );
            }
        })
        .unwrap();
}

on_both_planes!(
    every_node_serves_every_instance,
    every_node_serves_every_instance_over_ipv6,
    same_port_ipv6_clients_reach_other_nodes
);

/// The IPv4 routes of protocol 109 in node `i`'s namespace, one per line.
fn routes_of(fabric: &Fabric, i: usize) -> String {
    family_routes_of(fabric, i, "-4")
}

/// The IPv6 routes of protocol 109 in node `i`'s namespace, one per line.
fn routes6_of(fabric: &Fabric, i: usize) -> String {
    family_routes_of(fabric, i, "-6")
}

/// The routes of protocol 109 of `family` (`-4`, `-6`) in node `i`'s namespace.
fn family_routes_of(fabric: &Fabric, i: usize, family: &str) -> String {
    fabric
        .node(i)
        .ip(&[family, "route", "show", "proto", "109"])
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
