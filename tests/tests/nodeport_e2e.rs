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
const SANDBOX_IP: &str = "10.88.0.2";

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

/// Client, node and sandbox namespaces with UDP and TCP echo servers in the sandbox that
/// record the peers they see.
struct World {
    client: Netns,
    node: Netns,
    _sandbox: Netns,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    dir: TempDir,
    pins: BpfPinDir,
}

impl World {
    fn new() -> Self {
        let client = Netns::new("e2e-client").unwrap();
        let node = Netns::new("e2e-node").unwrap();
        let sandbox = Netns::new("e2e-sandbox").unwrap();
        veth(&client, "eth0", &node, "eth0").unwrap();
        client.addr("eth0", &format!("{CLIENT_IP}/24")).unwrap();
        node.addr("eth0", &format!("{NODE_IP}/24")).unwrap();
        // Locally sent packets on a veth carry partial checksums; real NIC traffic does not.
        client
            .exec("ethtool", &["-K", "eth0", "tx", "off"])
            .unwrap();
        node.bridge("br0").unwrap();
        node.addr("br0", "10.88.0.1/24").unwrap();
        veth(&node, "sb0", &sandbox, "eth0").unwrap();
        node.attach_to_bridge("sb0", "br0").unwrap();
        sandbox.addr("eth0", &format!("{SANDBOX_IP}/24")).unwrap();
        sandbox.route(&["default", "via", "10.88.0.1"]).unwrap();

        let peers = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
        let udp = sandbox
            .run(|| UdpSocket::bind((SANDBOX_IP, 9000)))
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
            .run(|| TcpListener::bind((SANDBOX_IP, 9000)))
            .unwrap()
            .unwrap();
        let seen = Arc::clone(&peers);
        std::thread::spawn(move || {
            for mut stream in tcp.incoming().flatten() {
                seen.lock().unwrap().push(stream.peer_addr().unwrap());
                let mut buf = [0u8; 1500];
                while let Ok(len) = stream.read(&mut buf) {
                    if len == 0 || stream.write_all(&buf[..len]).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            client,
            node,
            _sandbox: sandbox,
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

    /// Deploys the echo app and supplies the sandbox as its endpoint.
    fn deploy(&self, agent: &AgentProcess) {
        let app_dir = self.dir.path().join("app");
        std::fs::create_dir_all(app_dir.join(".miren")).unwrap();
        std::fs::write(app_dir.join(".miren/app.toml"), APP).unwrap();
        let out = agent.miren(&["deploy", app_dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let sandbox: SocketAddr = format!("{SANDBOX_IP}:9000").parse().unwrap();
        let endpoints = ServiceEndpoints {
            service: String::new(),
            endpoints: BTreeMap::from([
                ("udp-echo".to_owned(), vec![sandbox]),
                ("tcp-echo".to_owned(), vec![sandbox]),
            ]),
        };
        Client::new(self.dir.path().join("agent.sock"))
            .set_endpoints("echo", "echo", &endpoints)
            .unwrap();
        wait_for_status_ok(agent);
    }
}

#[test]
fn clients_reach_a_sandbox_through_the_node_port_with_their_own_address() {
    let world = World::new();
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

    let seen = world.peers.lock().unwrap().clone();
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
    let world = World::new();
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
