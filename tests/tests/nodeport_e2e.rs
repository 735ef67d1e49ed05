//! End to end in namespaces with real sockets: a client namespace reaches a UDP and a TCP
//! echo server in a sandbox namespace through NODE_IP:node_port, DNATed by the real agent's
//! XDP program on the node's veth and reverse-NATed by its TC program.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use miren_agent::{api::types::ServiceEndpoints, cli::Client};
use miren_tests::{
    process::{AgentProcess, BpfPinDir, TempDir, binary},
    topology::{Netns, veth},
};

const CLIENT_IP: &str = "10.90.0.1";
const NODE_IP: &str = "10.90.0.2";

const APP: &str = r#"name = "echo"

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

/// Client, node and sandbox namespaces; each sandbox runs UDP and TCP echo servers on
/// port 9000 that record the peers they see.
struct World {
    client: Netns,
    node: Netns,
    _sandboxes: Vec<Netns>,
    peers: Vec<Arc<Mutex<Vec<SocketAddr>>>>,
    dir: TempDir,
    pins: BpfPinDir,
}

/// The address of sandbox `i`.
fn sandbox_ip(i: usize) -> String {
    format!("10.88.0.{}", i + 2)
}

impl World {
    fn new(sandboxes: usize) -> Self {
        let client = Netns::new("e2e-client").unwrap();
        let node = Netns::new("e2e-node").unwrap();
        veth(&client, "eth0", &node, "eth0").unwrap();
        client.addr("eth0", &format!("{CLIENT_IP}/24")).unwrap();
        node.addr("eth0", &format!("{NODE_IP}/24")).unwrap();
        // Locally sent packets on a veth carry partial checksums; real NIC traffic does not.
        client
            .exec("ethtool", &["-K", "eth0", "tx", "off"])
            .unwrap();
        node.bridge("br0").unwrap();
        node.addr("br0", "10.88.0.1/24").unwrap();
        let mut namespaces = Vec::new();
        let mut peers = Vec::new();
        for i in 0..sandboxes {
            let sandbox = Netns::new(&format!("e2e-sandbox{i}")).unwrap();
            let port = format!("sb{i}");
            veth(&node, &port, &sandbox, "eth0").unwrap();
            node.attach_to_bridge(&port, "br0").unwrap();
            sandbox
                .addr("eth0", &format!("{}/24", sandbox_ip(i)))
                .unwrap();
            sandbox.route(&["default", "via", "10.88.0.1"]).unwrap();
            peers.push(echo_servers(&sandbox, &sandbox_ip(i)));
            namespaces.push(sandbox);
        }
        Self {
            client,
            node,
            _sandboxes: namespaces,
            peers,
            dir: TempDir::new("e2e"),
            pins: BpfPinDir::new("e2e"),
        }
    }

    /// Starts the agent in the node namespace with XDP on its external veth.
    fn start_agent(&self) -> AgentProcess {
        let socket = self.dir.path().join("agent.sock");
        let mut command: Command = self.node.command(binary("miren-agent").to_str().unwrap());
        command
            .args([
                "run",
                "--iface",
                "eth0",
                "--node-ip",
                NODE_IP,
                "--dataplane",
                "xdp",
            ])
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--api-socket")
            .arg(&socket)
            .arg("--bpf-pin-dir")
            .arg(self.pins.path());
        AgentProcess::start(command, &socket, &self.dir.path().join("agent.log"))
    }

    /// Deploys the echo app with sandbox 0 as its endpoint.
    fn deploy(&self, agent: &AgentProcess) {
        let app_dir = self.dir.path().join("app");
        std::fs::create_dir_all(app_dir.join(".miren")).unwrap();
        std::fs::write(app_dir.join(".miren/app.toml"), APP).unwrap();
        let out = agent.miren(&["deploy", app_dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        self.set_endpoints(agent, &[0]);
    }

    /// Makes `sandboxes` the endpoints of both node ports and waits until they are applied.
    fn set_endpoints(&self, agent: &AgentProcess, sandboxes: &[usize]) {
        let addrs: Vec<SocketAddr> = sandboxes
            .iter()
            .map(|i| format!("{}:9000", sandbox_ip(*i)).parse().unwrap())
            .collect();
        let endpoints = ServiceEndpoints {
            service: String::new(),
            endpoints: BTreeMap::from([
                ("udp-echo".to_owned(), addrs.clone()),
                ("tcp-echo".to_owned(), addrs),
            ]),
        };
        Client::new(self.dir.path().join("agent.sock"))
            .set_endpoints("echo", "echo", &endpoints)
            .unwrap();
        wait_for_status_ok(agent);
    }

    /// Which sandbox saw `client` as a peer.
    fn served_by(&self, client: SocketAddr) -> Option<usize> {
        self.peers
            .iter()
            .position(|peers| peers.lock().unwrap().contains(&client))
    }
}

/// Starts UDP and TCP echo servers on `ip:9000` inside `sandbox`; returns the peers they see.
fn echo_servers(sandbox: &Netns, ip: &str) -> Arc<Mutex<Vec<SocketAddr>>> {
    let peers = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    let udp = sandbox
        .run(|| UdpSocket::bind((ip, 9000)))
        .unwrap()
        .unwrap();
    let seen = Arc::clone(&peers);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
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
    let seen = Arc::clone(&peers);
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
    peers
}

#[test]
fn clients_reach_a_sandbox_through_the_node_port_with_their_own_address() {
    let world = World::new(1);
    let agent = world.start_agent();
    world.deploy(&agent);
    let link = world.node.ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(
        link.contains("xdp"),
        "XDP expected on the node's eth0: {link}\n{}",
        agent.log_text()
    );

    let (udp_local, udp_reply_from) = world
        .client
        .run(|| {
            let socket = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            socket.send_to(b"ping over udp", (NODE_IP, 7000)).unwrap();
            let mut buf = [0u8; 64];
            let (len, from) = socket
                .recv_from(&mut buf)
                .expect("UDP echo through the node port");
            assert_eq!(&buf[..len], b"ping over udp");
            (socket.local_addr().unwrap(), from)
        })
        .unwrap();
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

    let seen = world.peers[0].lock().unwrap().clone();
    assert!(
        seen.contains(&udp_local),
        "sandbox saw {seen:?}, expected the client's own {udp_local}"
    );
    assert!(
        seen.contains(&tcp_local),
        "sandbox saw {seen:?}, expected the client's own {tcp_local}"
    );
}

#[test]
fn kill_9_and_restart_of_the_agent_loses_no_packet_of_a_udp_stream() {
    const RATE: u64 = 5_000;
    const PACKETS: u64 = 3 * RATE;
    let world = World::new(1);
    let agent = world.start_agent();
    world.deploy(&agent);

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
    let agent = world.start_agent();
    sender.join().unwrap();
    let seen = received.join().unwrap();
    let lost: Vec<usize> = seen
        .iter()
        .enumerate()
        .filter(|(_, ok)| !**ok)
        .map(|(i, _)| i)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {PACKETS} packets lost, first {:?}\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(log.contains("adopted pinned data plane state"), "{log}");
}

/// Waits until the agent reports its data plane applied.
fn wait_for_status_ok(agent: &AgentProcess) {
    for _ in 0..100 {
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

#[test]
fn flows_spread_over_endpoints_and_tcp_connections_survive_scaling() {
    const FLOWS: usize = 3_000;
    let world = World::new(5);
    let agent = world.start_agent();
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
