//! Hairpin with the agent's real sandboxes (issue 15), once per data plane: an instance
//! connecting over UDP and TCP to `NODE_IP:node_port` (and `[NODE_IP6]:node_port`) of its own
//! app, whose only instance is itself, lands on itself and gets the replies from the node
//! port.
//!
//! With br_netfilter's `bridge-nf-call-iptables` on (this kernel's default; per network
//! namespace, so the test sets it in the node namespace it owns) the kernel bridges the DNATed
//! packet back out of the port it came in on, which the bridge allows only on a port in
//! hairpin mode (set by the agent on every instance's bridge port), and the flow must be
//! masqueraded (else the instance, seeing its own address as the source, answers itself over
//! loopback). Without br_netfilter the packets are routed. Both ways the instance sees the
//! bridge's address as the source.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use miren_tests::{
    apps::{self, WEB_PY, in_netns, sandbox_netns, wait_until_logging},
    cluster_checks::{ECHO_PY, parse_echo_any},
    ingress::ok,
    on_both_planes,
    process::AgentProcess,
    world::{NODE_IP, NODE_IP6, Plane, World},
};

/// The UDP and TCP node ports of the app.
const UDP_NODE_PORT: u16 = 7100;
const TCP_NODE_PORT: u16 = 7101;
/// The sandbox bridge's address (`World::start_agent_running_sandboxes` uses 10.77.0.0/16).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The sandbox bridge's IPv6 address: the first of the single node's /80 of the default
/// `--sandbox-subnet6`.
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x656e, 0, 0, 0, 0, 1);
/// How long one exchange may wait.
const EXCHANGE_WAIT: Duration = Duration::from_secs(5);

/// One instance of [`ECHO_PY`] (UDP 9000, TCP 9001) behind the two node ports.
fn app_toml() -> String {
    format!(
        "name = \"loop\"\n\
         [services.echo]\ncommand = \"exec python3 serve.py\"\n\
         [services.echo.concurrency]\nmode = \"fixed\"\nnum_instances = 1\n\
         [[services.echo.ports]]\nname = \"http\"\nport = 8080\ntype = \"http\"\n\
         [[services.echo.ports]]\nname = \"udp\"\nport = 9000\ntype = \"udp\"\nnode_port = {UDP_NODE_PORT}\n\
         [[services.echo.ports]]\nname = \"tcp\"\nport = 9001\ntype = \"tcp\"\nnode_port = {TCP_NODE_PORT}\n"
    )
}

/// Sets br_netfilter's `bridge-nf-call-iptables` and `-ip6tables` in `world`'s node namespace.
fn bridge_netfilter(world: &World, on: bool) {
    for key in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        world
            .node
            .sysctl(&format!("net.bridge.{key}"), if on { "1" } else { "0" })
            .unwrap();
    }
}

/// From inside the instance at `instance`: UDP (two datagrams from one socket) and TCP (one
/// line) through `node_ip`'s node ports. Asserts the replies come from the node port and the
/// instance itself answered; returns the sources it saw (UDP, TCP).
fn through_own_node_port(
    agent: &AgentProcess,
    instance: Ipv4Addr,
    node_ip: IpAddr,
    what: &str,
) -> (IpAddr, IpAddr) {
    let netns = sandbox_netns(agent.pid(), instance);
    let any = SocketAddr::new(
        match node_ip {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        },
        0,
    );
    in_netns(&netns, || {
        let udp_target = SocketAddr::new(node_ip, UDP_NODE_PORT);
        let socket = UdpSocket::bind(any).unwrap();
        socket.set_read_timeout(Some(EXCHANGE_WAIT)).unwrap();
        let mut udp_peer = None;
        for i in 0..2 {
            let message = format!("{what} udp {i}");
            socket.send_to(message.as_bytes(), udp_target).unwrap();
            let mut buf = [0u8; 2048];
            let (len, from) = socket.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "{what}: no UDP reply through {udp_target}: {e}\n{}",
                    agent.log_text()
                )
            });
            assert_eq!(from, udp_target, "{what}: the UDP reply's source");
            let reply = String::from_utf8_lossy(&buf[..len]);
            let (answered, peer) = parse_echo_any(&reply, &message);
            assert_eq!(
                answered, instance,
                "{what}: UDP landed on the instance itself"
            );
            udp_peer = Some(peer);
        }

        let tcp_target = SocketAddr::new(node_ip, TCP_NODE_PORT);
        let stream = TcpStream::connect_timeout(&tcp_target, EXCHANGE_WAIT).unwrap_or_else(|e| {
            panic!(
                "{what}: TCP connect to {tcp_target}: {e}\n{}",
                agent.log_text()
            )
        });
        stream.set_read_timeout(Some(EXCHANGE_WAIT)).unwrap();
        assert_eq!(stream.peer_addr().unwrap(), tcp_target);
        let message = format!("{what} tcp");
        writeln!(&stream, "{message}").unwrap();
        let mut reply = String::new();
        BufReader::new(&stream)
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("{what}: no TCP reply through {tcp_target}: {e}"));
        let (answered, tcp_peer) = parse_echo_any(&reply, &message);
        assert_eq!(
            answered, instance,
            "{what}: TCP landed on the instance itself"
        );
        (udp_peer.expect("two UDP exchanges"), tcp_peer)
    })
}

fn an_instance_reaches_itself_through_its_node_port(plane: Plane) {
    let world = World::new_dual_stack(0);
    bridge_netfilter(&world, true);
    let agent = world.start_agent_running_sandboxes(plane, &[]);
    apps::deploy(
        world.dir(),
        &agent,
        "loop",
        &app_toml(),
        &[("serve.py", &format!("{ECHO_PY}{WEB_PY}"))],
    );
    wait_until_logging(
        &agent,
        "the instance ready on both ports",
        Duration::from_secs(60),
        || {
            ["udp", "tcp"]
                .iter()
                .all(|port| apps::endpoints(&agent, "loop", "echo", port).len() == 1)
        },
    );
    wait_until_logging(
        &agent,
        "node ports applied",
        Duration::from_secs(30),
        || {
            let text = ok(&agent, &["ports"]);
            text.lines().skip(1).count() == 2
                && text.lines().skip(1).all(|l| l.trim_end().ends_with("ok"))
        },
    );
    let IpAddr::V4(instance) = apps::endpoints(&agent, "loop", "echo", "udp")[0].ip() else {
        panic!("an IPv6 endpoint")
    };

    // Bridged (br_netfilter), then routed (without it), over IPv4 and IPv6: masqueraded to the
    // bridge's address of the family.
    let node_ip: IpAddr = NODE_IP.parse().unwrap();
    let node_ip6: IpAddr = NODE_IP6.parse().unwrap();
    for (how, netfilter) in [("bridged", true), ("routed", false)] {
        bridge_netfilter(&world, netfilter);
        let seen = through_own_node_port(&agent, instance, node_ip, &format!("{how} IPv4"));
        let gateway = IpAddr::V4(GATEWAY);
        assert_eq!(
            seen,
            (gateway, gateway),
            "{how} IPv4 hairpin is masqueraded"
        );
        let seen = through_own_node_port(&agent, instance, node_ip6, &format!("{how} IPv6"));
        let gateway6 = IpAddr::V6(GATEWAY6);
        assert_eq!(
            seen,
            (gateway6, gateway6),
            "{how} IPv6 hairpin is masqueraded"
        );
    }
}

on_both_planes!(an_instance_reaches_itself_through_its_node_port);
