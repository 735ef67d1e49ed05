//! A node-port test world in namespaces: a client namespace, a node namespace running the
//! real agent (with the data plane of the test's choice on its external veth), and sandbox
//! namespaces behind a bridge, each running UDP and TCP echo servers that record the peers
//! they see.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use miren_agent::{api::types::ServiceEndpoints, cli::Client};

use crate::{
    process::{AgentProcess, BpfPinDir, TempDir, binary},
    topology::{Netns, TopologyError, veth},
};

/// Defines one `#[test]` per data plane (in modules `xdp` and `nft`) for each scenario
/// `fn scenario(plane: Plane)` in the calling file, so both run the same assertions.
#[macro_export]
macro_rules! on_both_planes {
    ($($scenario:ident),* $(,)?) => {
        mod xdp {
            $(#[test] fn $scenario() { super::$scenario($crate::world::Plane::Xdp) })*
        }
        mod nft {
            $(#[test] fn $scenario() { super::$scenario($crate::world::Plane::Nft) })*
        }
    };
}

/// The node-port data plane a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// eBPF/XDP (`--dataplane xdp`).
    Xdp,
    /// nftables (`--dataplane nft`).
    Nft,
}

impl Plane {
    /// The `--dataplane` value.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Nft => "nft",
        }
    }
}

/// The client's address.
pub const CLIENT_IP: &str = "10.90.0.1";
/// The node's address on its external interface.
pub const NODE_IP: &str = "10.90.0.2";

/// The echo app: UDP and TCP node port 7000 to port 9000 of its sandboxes.
pub const APP: &str = r#"name = "echo"

[services.echo]
command = "./echo"

[[services.echo.ports]]
name = "udp-echo"
port = 9000
type = "udp"
node_port = 7000

[[services.echo.ports]]
name = "tcp-echo"
port = 9000
type = "tcp"
node_port = 7000
"#;

/// Creates the client and node namespaces (tags `TAG-client`, `TAG-node`) joined by a veth
/// pair: `CLIENT_IP/24` on the client's eth0, `NODE_IP/24` on the node's, and TX checksum
/// offload off on the client's end (locally sent packets on a veth carry partial checksums,
/// which XDP cannot fix up; real NIC traffic has full ones).
///
/// # Errors
/// [`TopologyError`] if a namespace, the veth pair, an address or ethtool fails.
pub fn client_and_node(tag: &str) -> Result<(Netns, Netns), TopologyError> {
    client_and_node_with(tag, false)
}

/// [`client_and_node`]; with `dual_stack`, IPv6 on in both and `CLIENT_IP6/64`, `NODE_IP6/64`
/// on their eth0s too.
fn client_and_node_with(tag: &str, dual_stack: bool) -> Result<(Netns, Netns), TopologyError> {
    let namespace = |name: String| {
        if dual_stack {
            Netns::new_with_ipv6(&name)
        } else {
            Netns::new(&name)
        }
    };
    let client = namespace(format!("{tag}-client"))?;
    let node = namespace(format!("{tag}-node"))?;
    veth(&client, "eth0", &node, "eth0")?;
    client.addr("eth0", &format!("{CLIENT_IP}/24"))?;
    node.addr("eth0", &format!("{NODE_IP}/24"))?;
    if dual_stack {
        client.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{CLIENT_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    Ok((client, node))
}

/// The client's address in a routed world ([`World::new_routed`]), on its own subnet behind
/// the router.
pub const ROUTED_CLIENT_IP: &str = "10.91.0.1";
/// The router's address on the node's segment in a routed world; the node routes the client's
/// subnet through it.
pub const ROUTER_IP: &str = "10.90.0.3";

/// Creates client, router and node namespaces (tags `TAG-client`, `TAG-router`, `TAG-node`):
/// the client's eth0 (`ROUTED_CLIENT_IP/24`, MTU 1500) is joined to the router's `toclient`
/// (MTU `hop_mtu`), the router's `tonode` (`ROUTER_IP/24`) to the node's eth0 (`NODE_IP/24`); the
/// router forwards between them, so packets from the node to the client larger than `hop_mtu`
/// with DF set make the router send ICMP "fragmentation needed" back to their source. The
/// client's own MTU stays 1500 (its TCP MSS does not fit the hop: path MTU discovery is
/// needed), so it must not send more than `hop_mtu` bytes itself (the router's end drops
/// them). TX checksum offload is off on the client's eth0 and the router's `tonode`.
///
/// # Errors
/// [`TopologyError`] if a namespace, a veth pair, an address, a route or ethtool fails.
pub fn client_router_node(tag: &str, hop_mtu: u32) -> Result<(Netns, Netns, Netns), TopologyError> {
    let client = Netns::new(&format!("{tag}-client"))?;
    let router = Netns::new(&format!("{tag}-router"))?;
    let node = Netns::new(&format!("{tag}-node"))?;
    veth(&client, "eth0", &router, "toclient")?;
    veth(&router, "tonode", &node, "eth0")?;
    client.addr("eth0", &format!("{ROUTED_CLIENT_IP}/24"))?;
    router.addr("toclient", "10.91.0.254/24")?;
    router.addr("tonode", &format!("{ROUTER_IP}/24"))?;
    node.addr("eth0", &format!("{NODE_IP}/24"))?;
    client.route(&["default", "via", "10.91.0.254"])?;
    node.route(&["10.91.0.0/24", "via", ROUTER_IP])?;
    router.sysctl("net.ipv4.ip_forward", "1")?;
    router.mtu("toclient", hop_mtu)?;
    client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    router.exec("ethtool", &["-K", "tonode", "tx", "off"])?;
    Ok((client, router, node))
}

/// `miren-agent run` inside `node` for node ports on its eth0 (`--node-ip NODE_IP`) with
/// `--dataplane DATAPLANE`, state in `DIR/state`, the API on `DIR/agent.sock` and pinned BPF
/// objects under `pins`; callers add their own flags.
pub fn agent_command(node: &Netns, dir: &Path, pins: &Path, dataplane: &str) -> Command {
    let mut command = node.command(&binary("miren-agent").to_string_lossy());
    command
        .args([
            "run",
            "--iface",
            "eth0",
            "--node-ip",
            NODE_IP,
            "--dataplane",
            dataplane,
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--api-socket")
        .arg(dir.join("agent.sock"))
        .arg("--bpf-pin-dir")
        .arg(pins);
    command
}

/// Client, node and sandbox namespaces; each sandbox runs UDP and TCP echo servers on
/// port 9000 that record the peers they see.
#[derive(Debug)]
pub struct World {
    /// The client namespace (`CLIENT_IP` on eth0; [`ROUTED_CLIENT_IP`] in a routed world).
    pub client: Netns,
    /// The node namespace (`NODE_IP` on eth0, sandboxes behind br0).
    pub node: Netns,
    /// The router between client and node in a routed world.
    router: Option<Netns>,
    /// The client's address.
    client_ip: &'static str,
    _sandboxes: Vec<Netns>,
    peers: Vec<Arc<Mutex<Vec<SocketAddr>>>>,
    dir: TempDir,
    pins: BpfPinDir,
    /// IPv6 on everywhere, the node with a second `--node-ip` ([`NODE_IP6`]).
    dual_stack: bool,
    /// The source port of the next [`World::udp_echo`]: each echo a port of its own, so each
    /// is a new flow (a random port may repeat one whose conntrack entry is still alive).
    next_echo_port: AtomicU16,
}

/// The source ports [`World::udp_echo`] takes in turn (below the kernel's ephemeral range).
const ECHO_PORTS: std::ops::Range<u16> = 20_000..30_000;

/// The address of sandbox `i`.
pub fn sandbox_ip(i: usize) -> String {
    format!("10.88.0.{}", i + 2)
}

/// The client's IPv6 address in a dual-stack world.
pub const CLIENT_IP6: &str = "fd00:5a::1";
/// The node's IPv6 address in a dual-stack world (a second `--node-ip`).
pub const NODE_IP6: &str = "fd00:5a::2";

/// The IPv6 address of sandbox `i` in a dual-stack world: the one the agent's default
/// `--sandbox-subnet6` mirrors [`sandbox_ip`] to on a single node.
pub fn sandbox_ip6(i: usize) -> String {
    format!("fd6d:6972:656e::{:x}", i + 2)
}

impl World {
    /// Builds the namespaces with `sandboxes` sandboxes.
    pub fn new(sandboxes: usize) -> Self {
        Self::build(sandboxes, false)
    }

    /// [`World::new`] with IPv6 too: [`CLIENT_IP6`], [`NODE_IP6`] (the agent's second
    /// `--node-ip`) and each sandbox at [`sandbox_ip6`] with its echo servers on both
    /// addresses.
    pub fn new_dual_stack(sandboxes: usize) -> Self {
        Self::build(sandboxes, true)
    }

    /// [`World::new`] with a router between client and node whose hop towards the client
    /// has MTU `hop_mtu` ([`client_router_node`]); the client is at [`ROUTED_CLIENT_IP`].
    pub fn new_routed(sandboxes: usize, hop_mtu: u32) -> Self {
        let (client, router, node) = client_router_node("e2e", hop_mtu).unwrap();
        let mut world = Self::with_sandboxes(client, node, sandboxes, false);
        world.router = Some(router);
        world.client_ip = ROUTED_CLIENT_IP;
        world
    }

    fn build(sandboxes: usize, dual_stack: bool) -> Self {
        let (client, node) = client_and_node_with("e2e", dual_stack).unwrap();
        Self::with_sandboxes(client, node, sandboxes, dual_stack)
    }

    /// Adds br0 and the sandboxes with their echo servers to `node`.
    fn with_sandboxes(client: Netns, node: Netns, sandboxes: usize, dual_stack: bool) -> Self {
        node.bridge("br0").unwrap();
        node.addr("br0", "10.88.0.1/24").unwrap();
        if dual_stack {
            node.ip(&[
                "-6",
                "addr",
                "add",
                "fd6d:6972:656e::1/64",
                "dev",
                "br0",
                "nodad",
            ])
            .unwrap();
        }
        let mut namespaces = Vec::new();
        let mut peers = Vec::new();
        for i in 0..sandboxes {
            let tag = format!("e2e-sandbox{i}");
            let sandbox = if dual_stack {
                Netns::new_with_ipv6(&tag)
            } else {
                Netns::new(&tag)
            }
            .unwrap();
            let port = format!("sb{i}");
            veth(&node, &port, &sandbox, "eth0").unwrap();
            node.attach_to_bridge(&port, "br0").unwrap();
            sandbox
                .addr("eth0", &format!("{}/24", sandbox_ip(i)))
                .unwrap();
            sandbox.route(&["default", "via", "10.88.0.1"]).unwrap();
            let mut addrs = vec![sandbox_ip(i)];
            if dual_stack {
                let cidr = format!("{}/64", sandbox_ip6(i));
                sandbox
                    .ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])
                    .unwrap();
                sandbox
                    .ip(&["-6", "route", "add", "default", "via", "fd6d:6972:656e::1"])
                    .unwrap();
                addrs.push(sandbox_ip6(i));
            }
            peers.push(echo_servers(&sandbox, &addrs));
            namespaces.push(sandbox);
        }
        Self {
            client,
            node,
            router: None,
            client_ip: CLIENT_IP,
            _sandboxes: namespaces,
            peers,
            dir: TempDir::new("e2e"),
            pins: BpfPinDir::new("e2e"),
            dual_stack,
            next_echo_port: AtomicU16::new(ECHO_PORTS.start),
        }
    }

    /// Starts the agent in the node namespace with the `plane` data plane on its external veth.
    pub fn start_agent(&self, plane: Plane) -> AgentProcess {
        self.start_agent_with(plane.flag())
    }

    /// [`World::start_agent`] with `extra` flags (e.g. raised `--max-*` limits).
    pub fn start_agent_with_flags(&self, plane: Plane, extra: &[&str]) -> AgentProcess {
        let mut command =
            agent_command(&self.node, self.dir.path(), self.pins.path(), plane.flag());
        command.arg("--no-sandboxes").args(extra);
        self.start(command)
    }

    /// Starts the agent in the node namespace with `--dataplane DATAPLANE`; endpoints come
    /// from the test (`--no-sandboxes`).
    pub fn start_agent_with(&self, dataplane: &str) -> AgentProcess {
        let mut command = agent_command(&self.node, self.dir.path(), self.pins.path(), dataplane);
        command.arg("--no-sandboxes");
        self.start(command)
    }

    /// Starts the agent in the node namespace running the apps' instances itself, on the
    /// bridge `mrn0` with subnet 10.77.0.0/16 (br0 is the test's own sandboxes'), with `extra`
    /// flags; it stops its instances when it stops (`--stop-instances-on-exit`).
    pub fn start_agent_running_sandboxes(&self, plane: Plane, extra: &[&str]) -> AgentProcess {
        let mut flags = vec!["--stop-instances-on-exit"];
        flags.extend(extra);
        self.start_agent_keeping_instances(plane, &flags)
    }

    /// [`World::start_agent_running_sandboxes`] with the default flags for instances: they
    /// outlive the agent (the world removes what is left when it is dropped).
    pub fn start_agent_keeping_instances(&self, plane: Plane, extra: &[&str]) -> AgentProcess {
        let mut command =
            agent_command(&self.node, self.dir.path(), self.pins.path(), plane.flag());
        command.args(extra);
        command.args(["--sandbox-bridge", "mrn0"]);
        if !extra.contains(&"--sandbox-subnet") {
            command.args(["--sandbox-subnet", "10.77.0.0/16"]);
        }
        command.args(["--http-addr", &format!("{NODE_IP}:80")]);
        self.start(command)
    }

    /// The test's directory (apps, state, logs).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The bpffs directory the world's agents pin their objects in (`--bpf-pin-dir`).
    pub fn pin_dir(&self) -> &std::path::Path {
        self.pins.path()
    }

    fn start(&self, mut command: Command) -> AgentProcess {
        if self.dual_stack {
            command.args(["--node-ip", NODE_IP6]);
        }
        AgentProcess::start(
            command,
            &self.dir.path().join("agent.sock"),
            &self.dir.path().join("agent.log"),
        )
    }

    /// Deploys the echo app with sandbox 0 as its endpoint.
    pub fn deploy(&self, agent: &AgentProcess) {
        let app_dir = self.dir.path().join("app");
        std::fs::create_dir_all(app_dir.join(".miren")).unwrap();
        std::fs::write(app_dir.join(".miren/app.toml"), APP).unwrap();
        let out = agent.miren(&["deploy", app_dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        self.set_endpoints(agent, &[0]);
    }

    /// Makes `sandboxes` the endpoints of both node ports and waits until they are applied.
    pub fn set_endpoints(&self, agent: &AgentProcess, sandboxes: &[usize]) {
        self.put_endpoints(sandboxes);
        wait_for_status_ok(agent);
    }

    /// Sends the endpoint change of [`World::set_endpoints`] without waiting for it to apply.
    pub fn put_endpoints(&self, sandboxes: &[usize]) {
        let addrs: Vec<SocketAddr> = sandboxes
            .iter()
            .map(|i| format!("{}:9000", sandbox_ip(*i)).parse().unwrap())
            .collect();
        self.put_endpoint_addrs(&addrs, &addrs);
    }

    /// Makes `udp` and `tcp` (instance addresses with any port, e.g. a test's own server in a
    /// sandbox) the endpoints of UDP and TCP node port 7000 and waits until they are applied.
    pub fn set_endpoint_addrs(&self, agent: &AgentProcess, udp: &[SocketAddr], tcp: &[SocketAddr]) {
        self.put_endpoint_addrs(udp, tcp);
        wait_for_status_ok(agent);
    }

    fn put_endpoint_addrs(&self, udp: &[SocketAddr], tcp: &[SocketAddr]) {
        let endpoints = ServiceEndpoints {
            service: String::new(),
            endpoints: BTreeMap::from([
                ("udp-echo".to_owned(), udp.to_vec()),
                ("tcp-echo".to_owned(), tcp.to_vec()),
            ]),
            ..ServiceEndpoints::default()
        };
        self.client_api()
            .set_endpoints("echo", "echo", &endpoints)
            .unwrap();
    }

    /// A client of the agent's API.
    pub fn client_api(&self) -> Client {
        Client::new(self.dir.path().join("agent.sock"))
    }

    /// `GET /metrics` from the agent's default metrics address inside the node namespace.
    pub fn scrape_metrics(&self) -> String {
        self.node
            .run(|| {
                let mut stream = TcpStream::connect("127.0.0.1:9464").expect("metrics listener");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).unwrap();
                assert!(response.starts_with("HTTP/1.1 200"), "{response}");
                response
            })
            .unwrap()
    }

    /// `miren_dataplane_packets_total{event="EVENT"}` from `/metrics`: what the XDP programs
    /// did themselves (zero on nftables, where the kernel does it).
    pub fn dataplane_event(&self, event: &str) -> u64 {
        let metrics = self.scrape_metrics();
        let prefix = format!("miren_dataplane_packets_total{{event=\"{event}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}in\n{metrics}"))
            .parse()
            .unwrap()
    }

    /// One UDP echo of `message` from a fresh client socket (on a source port no earlier echo
    /// of this world used) through NODE_IP:7000; returns the client's address and where the
    /// reply came from.
    pub fn udp_echo(&self, message: &[u8]) -> (SocketAddr, SocketAddr) {
        self.udp_echo_between(self.client_ip, NODE_IP, message)
    }

    /// The client's address: [`CLIENT_IP`], or [`ROUTED_CLIENT_IP`] in a routed world.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip.parse().unwrap()
    }

    /// The router namespace of a routed world ([`World::new_routed`]).
    pub fn router(&self) -> Option<&Netns> {
        self.router.as_ref()
    }

    /// [`World::udp_echo`] over IPv6: from [`CLIENT_IP6`] through `[NODE_IP6]:7000`.
    pub fn udp_echo6(&self, message: &[u8]) -> (SocketAddr, SocketAddr) {
        self.udp_echo_between(CLIENT_IP6, NODE_IP6, message)
    }

    fn udp_echo_between(
        &self,
        client: &str,
        node: &str,
        message: &[u8],
    ) -> (SocketAddr, SocketAddr) {
        let client: IpAddr = client.parse().unwrap();
        let node: IpAddr = node.parse().unwrap();
        let port = self
            .next_echo_port
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |port| {
                Some(if port + 1 < ECHO_PORTS.end {
                    port + 1
                } else {
                    ECHO_PORTS.start
                })
            })
            .unwrap();
        self.client
            .run(|| {
                let socket = UdpSocket::bind((client, port)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                socket.send_to(message, (node, 7000)).unwrap();
                let mut buf = vec![0u8; MAX_DATAGRAM];
                let (len, from) = socket
                    .recv_from(&mut buf)
                    .expect("UDP echo through the node port");
                assert_eq!(&buf[..len], message);
                (socket.local_addr().unwrap(), from)
            })
            .unwrap()
    }

    /// The peers sandbox `i` has seen.
    pub fn peers_of(&self, i: usize) -> Vec<SocketAddr> {
        self.peers[i].lock().unwrap().clone()
    }

    /// Which sandbox saw `client` as a peer.
    pub fn served_by(&self, client: SocketAddr) -> Option<usize> {
        self.peers
            .iter()
            .position(|peers| peers.lock().unwrap().contains(&client))
    }
}

impl Drop for World {
    /// Removes the instances agents of this world left running (instances outlive the agent
    /// by default).
    fn drop(&mut self) {
        remove_instances(&self.dir.path().join("state"));
    }
}

/// Removes every instance an agent with state dir `state_dir` left running: its runc
/// container (force-deleted) and its network namespace (`miren-s<container id>`).
pub fn remove_instances(state_dir: &Path) {
    let root = state_dir.join("sandbox/runc");
    if !root.exists() {
        return;
    }
    let runc = |args: &[&str]| {
        Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
    };
    if let Ok(out) = runc(&["list", "--quiet"]) {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = runc(&["delete", "--force", id]);
            let netns = format!("{}{id}", miren_agent::sandbox::net::NETNS_PREFIX);
            let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        }
    }
}

/// The largest UDP datagram the echo servers take (and echo whole).
pub const MAX_DATAGRAM: usize = 65_535;

/// Starts UDP and TCP echo servers on `ip:9000` inside `sandbox`; returns the peers they see.
fn echo_servers(sandbox: &Netns, ips: &[String]) -> Arc<Mutex<Vec<SocketAddr>>> {
    let peers = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    for ip in ips {
        serve_echo(sandbox, ip, &peers);
    }
    peers
}

/// UDP and TCP echo servers on `ip`:9000 in `sandbox`, recording their peers in `peers`.
fn serve_echo(sandbox: &Netns, ip: &str, peers: &Arc<Mutex<Vec<SocketAddr>>>) {
    let ip: IpAddr = ip.parse().unwrap();
    let udp = sandbox
        .run(|| UdpSocket::bind((ip, 9000)))
        .unwrap()
        .unwrap();
    let seen = Arc::clone(peers);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok((len, from)) = udp.recv_from(&mut buf) {
            let mut seen = seen.lock().unwrap();
            if !seen.contains(&from) {
                seen.push(from);
            }
            drop(seen);
            let _ = udp.send_to(&buf[..len], from);
        }
    });
    let tcp = sandbox
        .run(|| TcpListener::bind((ip, 9000)))
        .unwrap()
        .unwrap();
    let seen = Arc::clone(peers);
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            seen.lock().unwrap().push(stream.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 1500];
                while let Ok(len) = stream.read(&mut buf) {
                    if len == 0 || stream.write_all(&buf[..len]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Waits (up to a minute) until the agent reports every node port applied.
pub fn wait_for_status_ok(agent: &AgentProcess) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let out = agent.miren(&["ports"]);
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .all(|l| l.trim_end().ends_with("ok"))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("data plane never reported ok:\n{}", agent.log_text());
}

impl World {
    /// The network namespace of sandbox `i` (to run a process "inside an instance").
    pub fn sandbox(&self, i: usize) -> &Netns {
        &self._sandboxes[i]
    }
}

/// Connects a TCP socket bound to `local` (with `SO_REUSEADDR`, so a test can reuse a client
/// port whose earlier connection attempt was abandoned) to `remote`, waiting up to `timeout`;
/// call it inside the client's namespace.
///
/// # Errors
/// The socket calls' errors; [`io::ErrorKind::TimedOut`] if no answer came within `timeout`.
pub fn tcp_connect_from(
    local: SocketAddr,
    remote: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let check = |ret: libc::c_int| {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor this function owns, with buffers of the
    // sizes passed.
    unsafe {
        let fd = check(libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let (addr, len) = sockaddr(local);
        check(libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len))?;
        let (addr, len) = sockaddr(remote);
        if let Err(err) = check(libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len))
            && err.raw_os_error() != Some(libc::EINPROGRESS)
        {
            return Err(err);
        }
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        if check(libc::poll(&raw mut poll, 1, millis))? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting {local} to {remote}: no answer within {timeout:?}"),
            ));
        }
        let mut error: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        check(libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut error).cast(),
            &raw mut len,
        ))?;
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error));
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

/// `addr` as a C socket address and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; it is large and aligned enough for both
    // families' addresses written into it.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                std::ptr::write((&raw mut storage).cast(), sin);
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                std::ptr::write((&raw mut storage).cast(), sin6);
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }
}
