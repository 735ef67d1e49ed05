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
    process::{AgentProcess, TempDir, binary},
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

#[test]
fn clients_reach_a_sandbox_through_the_node_port_with_their_own_address() {
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

    // Echo servers in the sandbox that record the peers they see.
    let peers = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    let udp = sandbox
        .run(|| UdpSocket::bind((SANDBOX_IP, 9000)))
        .unwrap()
        .unwrap();
    let seen = Arc::clone(&peers);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((len, from)) = udp.recv_from(&mut buf) {
            seen.lock().unwrap().push(from);
            let _ = udp.send_to(&buf[..len], from);
        }
    });
    let tcp = sandbox
        .run(|| TcpListener::bind((SANDBOX_IP, 9000)))
        .unwrap()
        .unwrap();
    let seen = Arc::clone(&peers);
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            seen.lock().unwrap().push(stream.peer_addr().unwrap());
            let mut stream = stream;
            let mut buf = [0u8; 1500];
            while let Ok(len) = stream.read(&mut buf) {
                if len == 0 || stream.write_all(&buf[..len]).is_err() {
                    break;
                }
            }
        }
    });

    // The agent in the node namespace, XDP on its external veth.
    let dir = TempDir::new("e2e");
    let socket = dir.path().join("agent.sock");
    let mut command: Command = node.command(binary("miren-agent").to_str().unwrap());
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
        .arg(dir.path().join("state"))
        .arg("--api-socket")
        .arg(&socket);
    let agent = AgentProcess::start(command, &socket, &dir.path().join("agent.log"));
    let app_dir = dir.path().join("app");
    std::fs::create_dir_all(app_dir.join(".miren")).unwrap();
    std::fs::write(app_dir.join(".miren/app.toml"), APP).unwrap();
    let out = agent.miren(&["deploy", app_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let endpoints = ServiceEndpoints {
        service: String::new(),
        endpoints: BTreeMap::from([
            (
                "udp-echo".to_owned(),
                vec![format!("{SANDBOX_IP}:9000").parse().unwrap()],
            ),
            (
                "tcp-echo".to_owned(),
                vec![format!("{SANDBOX_IP}:9000").parse().unwrap()],
            ),
        ]),
    };
    Client::new(&socket)
        .set_endpoints("echo", "echo", &endpoints)
        .unwrap();
    wait_for_status_ok(&agent);
    let link = node.ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(
        link.contains("xdp "),
        "native XDP expected on the node's eth0: {link}\n{}",
        agent.log_text()
    );

    let (udp_local, udp_reply_from) = client
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

    let tcp_local = client
        .run(|| {
            let mut stream = TcpStream::connect_timeout(
                &format!("{NODE_IP}:7000").parse().unwrap(),
                Duration::from_secs(3),
            )
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

    let seen = peers.lock().unwrap().clone();
    assert!(
        seen.contains(&udp_local),
        "sandbox saw {seen:?}, expected the client's own {udp_local}"
    );
    assert!(
        seen.contains(&tcp_local),
        "sandbox saw {seen:?}, expected the client's own {tcp_local}"
    );
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
