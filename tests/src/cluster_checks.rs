//! A 3-node cluster with data planes and sandboxes, and an echo app to send traffic through
//! it: the pieces `cluster_traffic` and `cluster_faults` share. The app answers UDP and TCP
//! with the instance's address and the peer it saw, so a test knows which instance a flow
//! reached and whether its source was kept or masqueraded.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use miren_agent::{api::types::AppDetail, config::Subnet};

use crate::{
    apps::{app_detail, wait_until},
    cluster::{EtcdCluster, Fabric, node_ip, node_ip6},
    cluster_agents::ClusterAgents,
    ingress::ok,
    world::Plane,
};

/// Nodes (and etcd members).
pub const NODES: usize = 3;
/// How long the cluster may take to get somewhere (instances start on three nodes).
pub const WAIT: Duration = Duration::from_secs(120);
/// Flows per node address and protocol: with 3 instances, the chance that Maglev leaves one
/// out of 48 flows is 3·(2/3)^48 ≈ 1e-8.
pub const FLOWS: u16 = 48;

/// Put before [`crate::apps::WEB_PY`]: a UDP echo on 9000 and a TCP echo on 9001 answering
/// `ADDR PEER MESSAGE`, PEER being the address the instance sees the message come from. Both
/// listen on IPv4 and IPv6 where the instance has IPv6 (PEER of an IPv4 client stays
/// `A.B.C.D`), else on IPv4.
pub const ECHO_PY: &str = r#"import os, socket, threading
addr = os.environ["MIREN_ADDR"]
def listen(kind, port):
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host, port))
            return s
        except OSError:
            s.close()
    raise OSError("cannot listen on port %d" % port)
def seen(peer):
    p = peer[0]
    return p[7:] if p.startswith("::ffff:") else p
def udp():
    s = listen(socket.SOCK_DGRAM, 9000)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(("%s %s " % (addr, seen(peer))).encode() + data, peer)
def tcp_client(conn, peer):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(("%s %s " % (addr, seen(peer))).encode() + line)
def tcp():
    s = listen(socket.SOCK_STREAM, 9001)
    s.listen(64)
    while True:
        conn, peer = s.accept()
        threading.Thread(target=tcp_client, args=(conn, peer), daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
"#;

/// App `name` running [`ECHO_PY`] and [`crate::apps::WEB_PY`] in 3 fixed instances (service
/// `echo`: ports `http` 8080, `udp` 9000, `tcp` 9001), with `node_ports` (UDP, TCP) when
/// given.
pub fn app_toml(name: &str, node_ports: Option<(u16, u16)>) -> String {
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

/// The cluster under test: [`NODES`] node namespaces and a client on one fabric, an etcd
/// member and an agent (with a data plane on `eth0` and sandboxes) in each node.
#[derive(Debug)]
pub struct Cluster {
    // Dropped in this order: agents (and their instances), etcd, then the namespaces.
    /// The agents, `node0`..
    pub agents: ClusterAgents,
    /// The etcd members, one per node.
    pub etcd: EtcdCluster,
    /// The namespaces.
    pub fabric: Fabric,
}

impl Cluster {
    /// Starts the fabric (tag `tag`), etcd and the agents with data plane `plane` and
    /// `--stop-instances-on-exit`.
    ///
    /// # Panics
    /// If any of them does not start.
    pub fn start(tag: &str, plane: Plane) -> Self {
        Self::start_on(Fabric::new(tag, NODES, true).expect("fabric"), plane)
    }

    /// [`Cluster::start`] on a dual-stack fabric ([`Fabric::new_dual_stack`]): every agent
    /// also has its IPv6 fabric address as a `--node-ip`.
    ///
    /// # Panics
    /// As [`Cluster::start`].
    pub fn start_dual_stack(tag: &str, plane: Plane) -> Self {
        Self::start_on(
            Fabric::new_dual_stack(tag, NODES, true).expect("fabric"),
            plane,
        )
    }

    fn start_on(fabric: Fabric, plane: Plane) -> Self {
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
            etcd,
            fabric,
        }
    }

    /// `miren ARGS` on node `i`, asserting success: its stdout.
    ///
    /// # Panics
    /// If the command fails.
    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        ok(self.agents.agent(i), args)
    }

    /// `miren --output json nodes` on node `i`.
    ///
    /// # Panics
    /// If the command fails.
    pub fn nodes(&self, i: usize) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(i, &["--output", "json", "nodes"])).expect("nodes JSON")
    }

    /// Each node's sandbox subnet, as node 0 sees them.
    ///
    /// # Panics
    /// If a node is not registered.
    pub fn subnets(&self) -> Vec<Subnet> {
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
    ///
    /// # Panics
    /// If the command fails or lists an IPv6 endpoint.
    pub fn endpoints(&self, i: usize, app: &str, port_name: &str) -> BTreeSet<Ipv4Addr> {
        crate::apps::endpoints(self.agents.agent(i), app, "echo", port_name)
            .iter()
            .map(|addr| match addr.ip() {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => panic!("IPv6 endpoint {v6}"),
            })
            .collect()
    }

    /// `miren app show APP` on node `i`.
    pub fn app(&self, i: usize, app: &str) -> AppDetail {
        app_detail(self.agents.agent(i), app)
    }

    /// Where `app`'s service is placed, as node `i` sees it: a node name per instance.
    pub fn placed_on(&self, i: usize, app: &str) -> Vec<String> {
        self.app(i, app).services[0].placed_on.clone()
    }

    /// How many instances of `app` node `i`'s own agent has running.
    pub fn running_on(&self, i: usize, app: &str) -> usize {
        self.app(i, app).services[0]
            .instances
            .as_ref()
            .map_or(0, |status| status.running)
    }

    /// Waits until every node sees `app`'s 3 instances, one in each node's subnet, on each of
    /// its ports, and every node's data plane applied what it sees; returns the instances in
    /// node order.
    pub fn wait_for_instances(&self, app: &str, subnets: &[Subnet]) -> Vec<Ipv4Addr> {
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
    pub fn wait_for_dataplanes(&self) {
        wait_until("every node's data plane applied", WAIT, || {
            (0..NODES).all(|i| {
                let ports = self.ok(i, &["ports"]);
                let mut lines = ports.lines().skip(1).peekable();
                lines.peek().is_some() && lines.all(|l| l.trim_end().ends_with("ok"))
            })
        });
    }
}

/// A reply `ADDR PEER MESSAGE` of an echo from an IPv4 client: the instance and the peer it
/// saw.
///
/// # Panics
/// If the reply is not an echo of `message` or the peer is not an IPv4 address.
pub fn parse_echo(reply: &str, message: &str) -> (Ipv4Addr, Ipv4Addr) {
    match parse_echo_any(reply, message) {
        (instance, IpAddr::V4(peer)) => (instance, peer),
        (_, IpAddr::V6(peer)) => panic!("IPv6 peer {peer} in {reply:?}"),
    }
}

/// A reply `ADDR PEER MESSAGE` of an echo: the instance (named by its IPv4 address) and the
/// peer it saw, of either family.
///
/// # Panics
/// If the reply is not an echo of `message`.
pub fn parse_echo_any(reply: &str, message: &str) -> (Ipv4Addr, IpAddr) {
    let mut parts = reply.trim_end().splitn(3, ' ');
    let (Some(addr), Some(peer), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("unexpected echo {reply:?}");
    };
    assert_eq!(rest, message, "echo of {message:?}: {reply:?}");
    (addr.parse().unwrap(), peer.parse().unwrap())
}

/// Node `node`'s fabric address of `family`'s family.
fn node_addr(node: usize, family: IpAddr) -> IpAddr {
    match family {
        IpAddr::V4(_) => node_ip(node).into(),
        IpAddr::V6(_) => node_ip6(node).into(),
    }
}

/// Which instance a node-port flow through node `node` from `client` reached, checking the
/// address the instance saw: the client's for an instance on `node`, `node`'s own address of
/// the client's family (masqueraded) for an instance on another node.
///
/// # Panics
/// If the instance saw another address.
pub fn check_source(
    subnets: &[Subnet],
    node: usize,
    client: IpAddr,
    (instance, peer): (Ipv4Addr, IpAddr),
) -> Ipv4Addr {
    let expected = if subnets[node].contains(instance) {
        client
    } else {
        node_addr(node, client)
    };
    assert_eq!(
        peer, expected,
        "instance {instance} saw the flow through node{node} from {peer}"
    );
    instance
}

/// One UDP exchange from `from` to node `node`'s UDP node port `node_port` on its IPv4
/// address, waiting up to `timeout` for the reply. Returns the instance that answered
/// ([`check_source`] checked).
///
/// # Errors
/// When no reply came.
///
/// # Panics
/// If `from` cannot be bound, the reply comes from another address than the one the client
/// used, or the echo or the source the instance saw is wrong.
pub fn udp_via(
    subnets: &[Subnet],
    node: usize,
    node_port: u16,
    from: SocketAddr,
    message: &str,
    timeout: Duration,
) -> Result<Ipv4Addr, String> {
    let target = SocketAddr::from((node_ip(node), node_port));
    udp_to(subnets, node, target, from, message, timeout)
}

/// One UDP exchange from `from` to `target`, node `node`'s node port on one of its addresses
/// (e.g. `[`[`node_ip6`]`]:node_port`), as [`udp_via`] checks it.
///
/// # Errors
/// As [`udp_via`].
///
/// # Panics
/// As [`udp_via`].
pub fn udp_to(
    subnets: &[Subnet],
    node: usize,
    target: SocketAddr,
    from: SocketAddr,
    message: &str,
    timeout: Duration,
) -> Result<Ipv4Addr, String> {
    let socket = UdpSocket::bind(from).unwrap();
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket
        .send_to(message.as_bytes(), target)
        .map_err(|e| format!("UDP send to {target} (node{node}): {e}"))?;
    let mut buf = [0u8; 2048];
    let (len, replier) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no UDP reply through {target} (node{node}) to {from}: {e}"))?;
    assert_eq!(replier, target, "the reply to {from} came from {replier}");
    let reply = String::from_utf8_lossy(&buf[..len]);
    let client = socket.local_addr().unwrap().ip();
    Ok(check_source(
        subnets,
        node,
        client,
        parse_echo_any(&reply, message),
    ))
}

/// One TCP connection from the calling thread's namespace (the client, [`CLIENT_IP`]) to node
/// `node`'s TCP node port `node_port` on its IPv4 address, one line echoed, each step waiting
/// up to `timeout`. Returns the instance that answered ([`check_source`] checked).
///
/// # Errors
/// When the connection does not open or no whole line comes back.
///
/// # Panics
/// If the echo or the source the instance saw is wrong.
///
/// [`CLIENT_IP`]: crate::cluster::CLIENT_IP
pub fn tcp_via(
    subnets: &[Subnet],
    node: usize,
    node_port: u16,
    message: &str,
    timeout: Duration,
) -> Result<Ipv4Addr, String> {
    let target = SocketAddr::from((node_ip(node), node_port));
    tcp_to(subnets, node, target, message, timeout)
}

/// One TCP connection to `target`, node `node`'s node port on one of its addresses, one line
/// echoed, as [`tcp_via`] checks it.
///
/// # Errors
/// As [`tcp_via`].
///
/// # Panics
/// As [`tcp_via`].
pub fn tcp_to(
    subnets: &[Subnet],
    node: usize,
    target: SocketAddr,
    message: &str,
    timeout: Duration,
) -> Result<Ipv4Addr, String> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("TCP to {target} (node{node}): {e}"))?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    assert_eq!(stream.peer_addr().unwrap(), target);
    writeln!(&stream, "{message}").map_err(|e| format!("TCP send to {target}: {e}"))?;
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply).map_err(|e| {
        let client = stream
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        format!("no TCP reply through {target} (node{node}) to {client}: {e}")
    })?;
    if read == 0 {
        return Err(format!(
            "TCP through {target} (node{node}): closed without a reply"
        ));
    }
    let client = stream.local_addr().unwrap().ip();
    Ok(check_source(
        subnets,
        node,
        client,
        parse_echo_any(&reply, message),
    ))
}
