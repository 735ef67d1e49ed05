//! Network isolation of sandboxes, with the real agent and CLI on both node-port data planes:
//! instances of one app reach each other, not another app's instances (TCP and UDP); on the
//! node they reach only the DNS resolver on the bridge address and the ingress (not the
//! metrics port nor other listeners); a packet with a spoofed source never leaves the
//! instance's veth. Acting "from inside an instance" means entering its network namespace as
//! root from the test: the network rules are what is tested, not the container's privileges.
//! Plus the [`Isolation`] API itself against nftables in a namespace of its own, and its IPv6
//! rules with real traffic between namespaces that have IPv6 on.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    process::Command,
    time::Duration,
};

use miren_agent::sandbox::{
    SandboxError,
    ipam::Subnet,
    isolation::{Isolation, IsolationSettings, Member, PeerInstances},
};
use miren_tests::{
    apps::{
        self, HttpClient, WEB_PY, in_netns, kill9_netns, sandbox_netns, tcp_connects, udp_exchange,
        wait_until_logging,
    },
    ingress::ok,
    on_both_planes,
    process::AgentProcess,
    topology::Netns,
    world::{CLIENT_IP, NODE_IP, Plane, World},
};

/// The sandbox bridge's address (`World::start_agent_running_sandboxes` uses 10.77.0.0/16).
const GATEWAY: &str = "10.77.0.1";
/// Where the agent serves metrics in these tests: on every address, so only the rules keep
/// instances from it.
const METRICS_PORT: u16 = 9464;
/// A TCP port the test listens on in the node namespace (like ssh): nothing of the instances.
const NODE_SERVICE_PORT: u16 = 2222;

/// Put before [`WEB_PY`] (the HTTP server on `PORT` answering the instance's address): a UDP
/// echo on 9000 answering `ADDR MESSAGE` and logging `udp MESSAGE`.
const UDP_ECHO_PY: &str = r#"import os, socket, threading
addr = os.environ["MIREN_ADDR"]
def echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9000))
    while True:
        data, peer = s.recvfrom(2048)
        print("udp", data.decode(errors="replace"), flush=True)
        s.sendto(addr.encode() + b" " + data, peer)
threading.Thread(target=echo, daemon=True).start()
"#;

/// Sends one IPv4/UDP packet from `SRC` to `DST:PORT` carrying `MESSAGE` through a raw
/// socket (the kernel fills in the IP checksum; UDP checksum 0 means none).
const SEND_RAW_PY: &str = r#"import socket, struct, sys
src, dst, port, message = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 5555, port, 8 + len(message), 0) + message
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip + udp, (dst, 0))
"#;

fn app_toml(name: &str) -> String {
    format!(
        "name = \"{name}\"\n\
         [services.web]\ncommand = \"exec python3 serve.py\"\n\
         [services.web.concurrency]\nmode = \"fixed\"\nnum_instances = 2\n\
         [[services.web.ports]]\nname = \"http\"\nport = 8080\ntype = \"http\"\n\
         [[services.web.ports]]\nname = \"echo\"\nport = 9000\ntype = \"udp\"\n"
    )
}

/// Writes app `name` and deploys it.
fn deploy(world: &World, agent: &AgentProcess, name: &str) {
    apps::deploy(
        world.dir(),
        agent,
        name,
        &app_toml(name),
        &[("serve.py", &format!("{UDP_ECHO_PY}{WEB_PY}"))],
    );
}

/// Addresses of `app`'s ready `web` instances on port `port_name`.
fn endpoints(agent: &AgentProcess, app: &str, port_name: &str) -> Vec<SocketAddr> {
    apps::endpoints(agent, app, "web", port_name)
}

/// How long to wait for the agent to get somewhere.
const WAIT: Duration = Duration::from_secs(60);

/// `GET /` from the calling thread's namespace: a connection the rules drop fails after 3 s.
const HTTP: HttpClient = HttpClient {
    connect_timeout: Some(Duration::from_secs(3)),
    read_timeout: Duration::from_secs(30),
};

/// The answer to a DNS query for `name` type A.
fn dns_query(name: &str) -> Vec<u8> {
    let mut query = vec![0x6d, 0x69, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).unwrap());
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

/// The A records of a DNS reply.
fn a_records(reply: &[u8]) -> BTreeSet<Ipv4Addr> {
    let skip_name = |mut pos: usize| {
        while reply[pos] != 0 {
            if reply[pos] & 0xc0 == 0xc0 {
                return pos + 2;
            }
            pos += 1 + usize::from(reply[pos]);
        }
        pos + 1
    };
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    let mut pos = skip_name(12) + 4;
    let mut records = BTreeSet::new();
    for _ in 0..answers {
        pos = skip_name(pos);
        let kind = u16::from_be_bytes([reply[pos], reply[pos + 1]]);
        let len = usize::from(u16::from_be_bytes([reply[pos + 8], reply[pos + 9]]));
        pos += 10;
        if kind == 1 && len == 4 {
            records.insert(Ipv4Addr::new(
                reply[pos],
                reply[pos + 1],
                reply[pos + 2],
                reply[pos + 3],
            ));
        }
        pos += len;
    }
    records
}

fn ips(addrs: &[SocketAddr]) -> Vec<Ipv4Addr> {
    addrs
        .iter()
        .map(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(ip) => panic!("IPv6 endpoint {ip}"),
        })
        .collect()
}

fn apps_are_isolated_from_each_other_and_from_the_node(plane: Plane) {
    let world = World::new(0);
    let metrics_addr = format!("0.0.0.0:{METRICS_PORT}");
    let agent = world.start_agent_running_sandboxes(plane, &["--metrics-addr", &metrics_addr]);
    deploy(&world, &agent, "alpha");
    deploy(&world, &agent, "beta");
    ok(
        &agent,
        &[
            "route",
            "set",
            "beta.example.com",
            "beta",
            "--service",
            "web",
        ],
    );
    wait_until_logging(&agent, "2 ready instances of each app", WAIT, || {
        ["alpha", "beta"].iter().all(|app| {
            endpoints(&agent, app, "http").len() == 2 && endpoints(&agent, app, "echo").len() == 2
        })
    });
    let alpha = ips(&endpoints(&agent, "alpha", "http"));
    let beta = ips(&endpoints(&agent, "beta", "http"));
    let alpha_ns = sandbox_netns(agent.pid(), alpha[0]);
    let beta_ns = sandbox_netns(agent.pid(), beta[0]);
    let http = |ip: Ipv4Addr| SocketAddr::from((ip, 8080));
    let udp = |ip: Ipv4Addr| SocketAddr::from((ip, 9000));
    let gateway: Ipv4Addr = GATEWAY.parse().unwrap();
    let node_ip: Ipv4Addr = NODE_IP.parse().unwrap();
    let _node_service = world
        .node
        .run(|| TcpListener::bind(("0.0.0.0", NODE_SERVICE_PORT)))
        .unwrap()
        .unwrap();

    // The node reaches every instance, and the client the node's metrics and other
    // listeners: what the instances are refused below is there.
    world
        .node
        .run(|| {
            for ip in alpha.iter().chain(&beta) {
                assert_eq!(
                    HTTP.get(http(*ip), "x", "/").unwrap(),
                    (200, ip.to_string())
                );
                let reply = udp_exchange(udp(*ip), b"hi", Duration::from_secs(10));
                assert_eq!(reply, Some(format!("{ip} hi").into_bytes()));
            }
        })
        .unwrap();
    world
        .client
        .run(|| {
            for port in [METRICS_PORT, NODE_SERVICE_PORT] {
                assert!(
                    tcp_connects((node_ip, port).into()),
                    "client -> node:{port}"
                );
            }
        })
        .unwrap();

    in_netns(&alpha_ns, || {
        // Within the app: TCP and UDP.
        assert_eq!(
            HTTP.get(http(alpha[1]), "x", "/").unwrap(),
            (200, alpha[1].to_string())
        );
        let reply = udp_exchange(udp(alpha[1]), b"sibling", Duration::from_secs(10));
        assert_eq!(reply, Some(format!("{} sibling", alpha[1]).into_bytes()));

        // Across apps: neither.
        for ip in &beta {
            assert!(!tcp_connects(http(*ip)), "alpha reached beta {ip} over TCP");
            let reply = udp_exchange(udp(*ip), b"stranger", Duration::from_secs(2));
            assert_eq!(reply, None, "alpha reached beta {ip} over UDP");
        }

        // The node: DNS on the bridge address answers with the app's own instances; the
        // ingress routes to another app (that is how apps reach each other).
        let reply = udp_exchange(
            SocketAddr::from((gateway, 53)),
            &dns_query("web.app.miren"),
            Duration::from_secs(10),
        )
        .expect("a DNS answer from the bridge address");
        assert_eq!(a_records(&reply), alpha.iter().copied().collect());
        let (status, body) = HTTP
            .get((node_ip, 80).into(), "beta.example.com", "/")
            .unwrap();
        assert_eq!(status, 200);
        assert!(beta.iter().any(|ip| body == ip.to_string()), "{body}");

        // Nothing else on the node, on any of its addresses.
        for ip in [gateway, node_ip] {
            for port in [METRICS_PORT, NODE_SERVICE_PORT] {
                assert!(
                    !tcp_connects((ip, port).into()),
                    "alpha reached {ip}:{port}"
                );
            }
        }
    });
    // And the other way round.
    in_netns(&beta_ns, || {
        assert!(!tcp_connects(http(alpha[0])), "beta reached alpha over TCP");
        assert_eq!(
            udp_exchange(udp(alpha[0]), b"stranger", Duration::from_secs(2)),
            None
        );
    });

    // Routed through the host (a route via the bridge address) instead of bridged: still not.
    let route = |op: &str| {
        let out = Command::new("ip")
            .args([
                "-n",
                &alpha_ns,
                "route",
                op,
                &format!("{}/32", beta[0]),
                "via",
                GATEWAY,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    route("add");
    in_netns(&alpha_ns, || {
        assert!(
            !tcp_connects(http(beta[0])),
            "alpha reached beta through the host"
        );
        let reply = udp_exchange(udp(beta[0]), b"hairpin", Duration::from_secs(2));
        assert_eq!(reply, None, "alpha reached beta through the host over UDP");
    });
    route("del");

    // No probe of the other app arrived at all (not only its answer was lost): a marker sent
    // after them from the node arrives, they never do.
    world
        .node
        .run(|| {
            for ip in alpha.iter().chain(&beta) {
                let reply = udp_exchange(udp(*ip), b"marker", Duration::from_secs(10));
                assert_eq!(reply, Some(format!("{ip} marker").into_bytes()));
            }
        })
        .unwrap();
    for app in ["alpha", "beta"] {
        wait_until_logging(&agent, "the markers in the logs", WAIT, || {
            ok(&agent, &["logs", app]).matches("udp marker").count() == 2
        });
        let logs = ok(&agent, &["logs", app]);
        assert!(
            !logs.contains("udp stranger") && !logs.contains("udp hairpin"),
            "{app} received another app's packets:\n{logs}"
        );
    }

    // Spoofing: a packet with another source never reaches the client; the same packet with
    // the instance's own source does (so the path is there).
    let listener = world
        .client
        .run(|| UdpSocket::bind((CLIENT_IP, 6000)))
        .unwrap()
        .unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let send_raw = |src: &str, message: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{alpha_ns}"))
            .args([
                "python3",
                "-c",
                SEND_RAW_PY,
                src,
                CLIENT_IP,
                "6000",
                message,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    send_raw("203.0.113.7", "spoofed");
    send_raw(&beta[0].to_string(), "spoofed-as-beta");
    send_raw(&alpha[0].to_string(), "genuine");
    let mut received = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = listener.recv_from(&mut buf) {
        received.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
        if received.iter().any(|(_, m)| m == "genuine") {
            break;
        }
    }
    assert_eq!(
        received,
        [(SocketAddr::from((alpha[0], 5555)), "genuine".to_owned())]
    );
}

/// From the namespace `from_ns`: `sibling` answers over TCP, none of `others` does. A failure
/// names `step` and shows the node's sandbox firewall.
fn assert_reaches_only(
    world: &World,
    step: &str,
    from_ns: &str,
    sibling: Ipv4Addr,
    others: &[Ipv4Addr],
) {
    let web = |ip: Ipv4Addr| SocketAddr::from((ip, 8080));
    let (answer, reached) = in_netns(from_ns, || {
        let answer = HTTP.get(web(sibling), "x", "/");
        let reached: Vec<Ipv4Addr> = others
            .iter()
            .copied()
            .filter(|ip| tcp_connects(web(*ip)))
            .collect();
        (answer, reached)
    });
    let firewall = || {
        world
            .node
            .run(|| {
                let out = Command::new("nft")
                    .args(["list", "table", "bridge", "miren_sandbox"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .unwrap()
    };
    match answer {
        Ok(answer) => assert_eq!(answer, (200, sibling.to_string()), "{step}"),
        Err(error) => panic!(
            "{step}: {from_ns} did not reach its sibling {sibling}: {error:?}\n{}",
            firewall()
        ),
    }
    assert!(reached.is_empty(), "{step}: {from_ns} reached {reached:?}");
}

fn adopted_instances_stay_isolated_across_a_kill_9_of_the_agent(plane: Plane) {
    let world = World::new(0);
    let agent = world.start_agent_keeping_instances(plane, &[]);
    deploy(&world, &agent, "alpha");
    deploy(&world, &agent, "beta");
    let ready = |agent: &AgentProcess| {
        ["alpha", "beta"].iter().all(|app| {
            endpoints(agent, app, "http").len() == 2 && endpoints(agent, app, "echo").len() == 2
        })
    };
    wait_until_logging(&agent, "2 ready instances of each app", WAIT, || {
        ready(&agent)
    });
    let alpha = ips(&endpoints(&agent, "alpha", "http"));
    let beta = ips(&endpoints(&agent, "beta", "http"));
    let alpha_ns: Vec<String> = alpha
        .iter()
        .map(|ip| sandbox_netns(agent.pid(), *ip))
        .collect();
    let beta_ns = sandbox_netns(agent.pid(), beta[0]);
    assert_reaches_only(&world, "before the kill", &alpha_ns[0], alpha[1], &beta);
    let members = world.node.run(app_ids).unwrap();
    assert_eq!(members.len(), 4, "{members:?}");

    // No agent: the kernel keeps the rules and the members.
    agent.kill9();
    assert_reaches_only(&world, "no agent", &alpha_ns[0], alpha[1], &beta);
    assert_reaches_only(&world, "no agent", &beta_ns, beta[1], &alpha);

    // The next agent adopts the instances and keeps them members, with their apps.
    let agent = world.start_agent_keeping_instances(plane, &[]);
    wait_until_logging(&agent, "the adopted endpoints", WAIT, || {
        ips(&endpoints(&agent, "alpha", "http")) == alpha
            && ips(&endpoints(&agent, "beta", "http")) == beta
    });
    assert_eq!(world.node.run(app_ids).unwrap().len(), 4);
    assert_reaches_only(&world, "adopted", &alpha_ns[0], alpha[1], &beta);
    assert_reaches_only(&world, "adopted", &beta_ns, beta[1], &alpha);

    // An instance it starts itself joins its app's adopted instances, and no other app.
    kill9_netns(&alpha_ns[1]);
    wait_until_logging(&agent, "a replacement alpha instance", WAIT, || {
        let now = ips(&endpoints(&agent, "alpha", "http"));
        now.len() == 2 && now.contains(&alpha[0]) && !now.contains(&alpha[1])
    });
    let replacement = *ips(&endpoints(&agent, "alpha", "http"))
        .iter()
        .find(|ip| **ip != alpha[0])
        .unwrap();
    let replacement_ns = sandbox_netns(agent.pid(), replacement);
    let step = "a replacement";
    assert_reaches_only(&world, step, &alpha_ns[0], replacement, &beta);
    assert_reaches_only(&world, step, &replacement_ns, alpha[0], &beta);
    assert_reaches_only(&world, step, &beta_ns, beta[1], &[alpha[0], replacement]);
    assert_eq!(world.node.run(app_ids).unwrap().len(), 4);
}

on_both_planes!(
    apps_are_isolated_from_each_other_and_from_the_node,
    adopted_instances_stay_isolated_across_a_kill_9_of_the_agent,
);

/// The elements (key, value) of the map `FAMILY miren_sandbox NAME` in the calling thread's
/// namespace.
fn map_elements(family: &str, name: &str) -> Vec<(serde_json::Value, u64)> {
    let out = Command::new("nft")
        .args(["-j", "list", "map", family, "miren_sandbox", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value["nftables"][1]["map"]["elem"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| (e[0].clone(), e[1].as_u64().unwrap()))
        .collect()
}

/// Members of the bridge table's `veth_app` map in the calling thread's namespace: veth → id.
fn app_ids() -> Vec<(String, u64)> {
    map_elements("bridge", "veth_app")
        .into_iter()
        .map(|(veth, id)| (veth.as_str().unwrap().to_owned(), id))
        .collect()
}

fn tables() -> String {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn member(veth: &str, addr: &str, app: &str) -> Member {
    Member {
        veth: veth.to_owned(),
        addr: addr.parse().unwrap(),
        app: app.to_owned(),
    }
}

/// The IPv6 addressing of a single node whose sandbox subnet is `subnet`.
fn dual_stack(subnet: &str) -> miren_agent::config::DualStack {
    let v4 = Subnet::parse(subnet).unwrap();
    miren_agent::config::DualStack {
        v4,
        node_prefix: v4.prefix,
        v6: miren_agent::config::Subnet6::parse(miren_agent::settings::DEFAULT_SANDBOX_SUBNET6)
            .unwrap(),
    }
}

#[test]
fn isolation_keeps_members_across_a_reopen_and_applies_each_change_whole() {
    let ns = Netns::new("isolation").unwrap();
    ns.run(|| {
        let settings = IsolationSettings {
            bridge: "mrn0".to_owned(),
            subnet: Subnet::parse("10.77.0.0/16").unwrap(),
            dual_stack: Some(dual_stack("10.77.0.0/16")),
            listener_ports: vec![80, 443],
        };
        let isolation = Isolation::open(&settings).unwrap();
        assert!(tables().contains("table bridge miren_sandbox"));
        assert!(tables().contains("table inet miren_sandbox"));
        isolation
            .admit(&member("mvs1", "10.77.0.2", "alpha"))
            .unwrap();
        isolation
            .admit(&member("mvs2", "10.77.0.3", "alpha"))
            .unwrap();
        isolation
            .admit(&member("mvs3", "10.77.0.4", "beta"))
            .unwrap();
        let ids = app_ids();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[0].1, ids[1].1);
        assert_ne!(ids[0].1, ids[2].1);

        // A restarted agent keeps them (the rules are rewritten, the members stay), and
        // rebuilds their IPv6 elements from the IPv4 ones.
        let isolation = Isolation::open(&settings).unwrap();
        assert_eq!(app_ids(), ids);
        let dual = settings.dual_stack.unwrap();
        let mirrored: std::collections::BTreeMap<String, u64> = addr_app()
            .into_iter()
            .map(|(addr, id)| (dual.addr6(addr).unwrap().to_string(), id))
            .collect();
        let addr_app6: std::collections::BTreeMap<String, u64> = map_elements("inet", "addr_app6")
            .into_iter()
            .map(|(addr, id)| (addr.as_str().unwrap().to_owned(), id))
            .collect();
        assert_eq!(addr_app6.len(), 3);
        assert_eq!(addr_app6, mirrored);
        // A new app does not get an id that an earlier agent's member holds.
        isolation
            .admit(&member("mvs4", "10.77.0.5", "gamma"))
            .unwrap();
        let gamma = app_ids().into_iter().find(|(v, _)| v == "mvs4").unwrap().1;
        assert!(ids.iter().all(|(_, id)| *id != gamma), "{ids:?} {gamma}");

        // A change nft refuses (an address already held) changes nothing at all.
        let err = isolation
            .admit(&member("mvs5", "10.77.0.2", "delta"))
            .unwrap_err();
        assert!(matches!(err, SandboxError::Firewall { .. }), "{err}");
        assert_eq!(app_ids().len(), 4);

        // The exact set at start, then removal.
        isolation
            .retain(&[
                member("mvs1", "10.77.0.2", "alpha"),
                member("mvs3", "10.77.0.4", "beta"),
            ])
            .unwrap();
        let names: Vec<String> = app_ids().into_iter().map(|(v, _)| v).collect();
        assert_eq!(names, ["mvs1", "mvs3"]);
        isolation.remove("mvs1").unwrap();
        isolation.remove("mvs-unknown").unwrap();
        assert_eq!(app_ids().len(), 1);

        isolation.teardown().unwrap();
        assert!(!tables().contains("miren_sandbox"), "{}", tables());
        // A bridge name that would break out of the script is refused before nft runs.
        let err = Isolation::open(&IsolationSettings {
            bridge: "x\" accept".to_owned(),
            ..settings
        })
        .unwrap_err();
        assert!(err.to_string().contains("not an interface name"), "{err}");
    })
    .unwrap();
}

/// The `addr_app` map of `inet miren_sandbox`: address → app id.
fn addr_app() -> std::collections::BTreeMap<Ipv4Addr, u64> {
    map_elements("inet", "addr_app")
        .into_iter()
        .map(|(addr, id)| (addr.as_str().unwrap().parse().unwrap(), id))
        .collect()
}

/// The `peer_subnets` set of `inet miren_sandbox`.
fn peer_subnets() -> Vec<String> {
    let out = Command::new("nft")
        .args(["-j", "list", "set", "inet", "miren_sandbox", "peer_subnets"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    miren_agent::nft_cli::set_prefixes(&listing)
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn isolation_maps_other_nodes_instances_of_local_apps_only_and_keeps_peer_subnets() {
    let ns = Netns::new("isolation-peers").unwrap();
    ns.run(|| {
        let settings = IsolationSettings {
            bridge: "mrn0".to_owned(),
            subnet: Subnet::parse("10.77.0.0/24").unwrap(),
            dual_stack: Some(dual_stack("10.77.0.0/24")),
            listener_ports: vec![80, 443],
        };
        let isolation = Isolation::open(&settings).unwrap();
        isolation
            .admit(&member("mvs1", "10.77.0.2", "alpha"))
            .unwrap();
        let peers = PeerInstances {
            subnets: [Subnet::parse("10.77.1.0/24").unwrap()].into(),
            apps: [
                ("alpha", &["10.77.0.2", "10.77.1.5"][..]),
                ("beta", &["10.77.1.6"][..]),
            ]
            .iter()
            .map(|(app, addrs)| {
                let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
                ((*app).to_owned(), addrs)
            })
            .collect(),
        };
        isolation.set_peers(&peers).unwrap();
        let alpha = addr_app()[&"10.77.0.2".parse().unwrap()];
        // beta has no instance here: its remote instance is in no set, so it reaches nothing.
        assert_eq!(
            addr_app(),
            [("10.77.0.2", alpha), ("10.77.1.5", alpha)]
                .iter()
                .map(|(a, id)| (a.parse().unwrap(), *id))
                .collect()
        );
        assert_eq!(peer_subnets(), ["10.77.1.0/24"]);
        // An instance of beta arrives: beta's remote instance joins it, in the same change.
        isolation
            .admit(&member("mvs2", "10.77.0.3", "beta"))
            .unwrap();
        let beta = addr_app()[&"10.77.0.3".parse().unwrap()];
        assert_eq!(addr_app()[&"10.77.1.6".parse().unwrap()], beta);
        // The last alpha instance here goes: so does alpha's remote instance.
        isolation.remove("mvs1").unwrap();
        assert!(!addr_app().contains_key(&"10.77.1.5".parse().unwrap()));
        // A restarted agent keeps restricting the peer subnets until it names them again.
        let _reopened = Isolation::open(&settings).unwrap();
        assert_eq!(peer_subnets(), ["10.77.1.0/24"]);
    })
    .unwrap();
}

/// The sandbox bridge of the IPv6 test.
const BRIDGE6: &str = "mrn0";
/// A public listener port of the IPv6 test's node (the ingress's, for the rules).
const LISTENER6: u16 = 8443;

/// Sends, from the calling namespace, an unsolicited neighbor advertisement (override flag,
/// hop limit 255) from `SRC` to all nodes on `eth0`, saying `TARGET` is at `MAC`. The kernel
/// fills in the ICMPv6 checksum.
const SEND_NA_PY: &str = r#"import socket, struct, sys
src, target, mac = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.bind((src, 0))
na = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target)
na += bytes([2, 1]) + bytes.fromhex(mac.replace(":", ""))
s.sendto(na, ("ff02::1", 0, 0, socket.if_nametoindex("eth0")))
"#;

/// An instance of the IPv6 test: a namespace with IPv6 on, its `eth0` on the node's bridge
/// through host veth `veth`, with `addr6/80` (nodad, as the agent does) and a default route
/// via the bridge's address. It ignores redirects, so a route via the node stays one.
fn instance6(node: &Netns, tag: &str, veth: &str, addr6: Ipv6Addr, gateway6: Ipv6Addr) -> Netns {
    let ns = Netns::new_with_ipv6(tag).unwrap();
    miren_tests::topology::veth(node, veth, &ns, "eth0").unwrap();
    node.attach_to_bridge(veth, BRIDGE6).unwrap();
    ns.sysctl("net.ipv6.conf.eth0.accept_redirects", "0")
        .unwrap();
    let cidr = format!("{addr6}/80");
    ns.ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])
        .unwrap();
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &gateway6.to_string(),
    ])
    .unwrap();
    ns
}

/// Whether a TCP connection to `addr` opens within 1.5 s from the calling thread's namespace
/// (a dropped SYN times out; every port tried here has a listener).
fn tcp6_connects(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok()
}

/// `ip -6 neigh show ADDR` in `ns`.
fn neighbor(ns: &Netns, addr: Ipv6Addr) -> String {
    ns.ip(&["-6", "neigh", "show", &addr.to_string()]).unwrap()
}

#[test]
fn isolation_applies_to_ipv6_instances_with_real_traffic() {
    let node = Netns::new_with_ipv6("iso6-node").unwrap();
    let dual = dual_stack("10.77.0.0/24");
    let subnet = Subnet::parse("10.77.0.0/24").unwrap();
    let gateway6 = dual.node_subnet6(subnet).gateway();
    node.bridge(BRIDGE6).unwrap();
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{gateway6}/80"),
        "dev",
        BRIDGE6,
        "nodad",
    ])
    .unwrap();
    node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    let members = [
        member("mvs1", "10.77.0.2", "alpha"),
        member("mvs2", "10.77.0.3", "alpha"),
        member("mvs3", "10.77.0.4", "beta"),
    ];
    let addr6: Vec<Ipv6Addr> = members
        .iter()
        .map(|m| dual.addr6(m.addr).unwrap())
        .collect();
    let [alpha1, alpha2, beta] = [0, 1, 2].map(|i| {
        let tag = format!("iso6-{}", members[i].veth);
        instance6(&node, &tag, &members[i].veth, addr6[i], gateway6)
    });
    let isolation = node
        .run(|| {
            let isolation = Isolation::open(&IsolationSettings {
                bridge: BRIDGE6.to_owned(),
                subnet,
                dual_stack: Some(dual),
                listener_ports: vec![LISTENER6],
            })?;
            isolation.retain(&members)?;
            Ok::<_, SandboxError>(isolation)
        })
        .unwrap()
        .unwrap();
    // Listeners everywhere: an instance's web port, the node's public listener and another
    // service of the node (like ssh).
    let web = |i: usize| SocketAddr::from((addr6[i], 8080));
    let _webs: Vec<TcpListener> = [&alpha1, &alpha2, &beta]
        .iter()
        .map(|ns| ns.run(|| TcpListener::bind("[::]:8080")).unwrap().unwrap())
        .collect();
    let _node_listeners: Vec<TcpListener> = [LISTENER6, NODE_SERVICE_PORT]
        .iter()
        .map(|port| {
            node.run(|| TcpListener::bind(("::", *port)))
                .unwrap()
                .unwrap()
        })
        .collect();

    // Within the app, bridged: the first exchange needs neighbor discovery both ways.
    assert!(
        alpha1.run(|| tcp6_connects(web(1))).unwrap(),
        "alpha -> alpha"
    );
    let mac2 = alpha2.mac("eth0").unwrap();
    assert!(
        neighbor(&alpha1, addr6[1]).contains(&mac2),
        "{}",
        neighbor(&alpha1, addr6[1])
    );
    // The node reaches every instance (and so learns their addresses).
    for addr in &addr6 {
        let to = SocketAddr::from((*addr, 8080));
        assert!(node.run(|| tcp6_connects(to)).unwrap(), "node -> {addr}");
    }
    // Across apps: neither way.
    assert!(
        !beta.run(|| tcp6_connects(web(0))).unwrap(),
        "beta reached alpha"
    );
    assert!(
        !alpha1.run(|| tcp6_connects(web(2))).unwrap(),
        "alpha reached beta"
    );
    // Routed through the node instead of bridged: within the app yes, across apps no.
    for i in [1, 2] {
        let route = format!("{}/128", addr6[i]);
        alpha1
            .ip(&["-6", "route", "add", &route, "via", &gateway6.to_string()])
            .unwrap();
    }
    assert!(
        alpha1.run(|| tcp6_connects(web(1))).unwrap(),
        "alpha -> alpha via the node"
    );
    assert!(
        !alpha1.run(|| tcp6_connects(web(2))).unwrap(),
        "alpha reached beta through the node"
    );
    // The node: its public listener only.
    let on_node = |port: u16| SocketAddr::from((gateway6, port));
    assert!(alpha1.run(|| tcp6_connects(on_node(LISTENER6))).unwrap());
    assert!(
        !alpha1
            .run(|| tcp6_connects(on_node(NODE_SERVICE_PORT)))
            .unwrap(),
        "alpha reached the node's port {NODE_SERVICE_PORT} over IPv6"
    );

    // Spoofing: alpha1 sends to its sibling and to a client beyond the node from its own
    // address, from an address nobody has and from beta's; only its own arrive (the
    // neighbors are known by then, so the spoofed ones do leave alpha1). Beyond the node
    // only the bridge's source check stops them.
    let client = Netns::new_with_ipv6("iso6-client").unwrap();
    miren_tests::topology::veth(&node, "eth1", &client, "eth0").unwrap();
    node.ip(&["-6", "addr", "add", "fd00:77::1/64", "dev", "eth1", "nodad"])
        .unwrap();
    client
        .ip(&["-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"])
        .unwrap();
    client
        .ip(&[
            "-6",
            "route",
            "add",
            "fd6d:6972:656e::/80",
            "via",
            "fd00:77::1",
        ])
        .unwrap();
    let client_addr: Ipv6Addr = "fd00:77::2".parse().unwrap();
    let spoofed: Ipv6Addr = "fd6d:6972:656e::99".parse().unwrap();
    for extra in [spoofed, addr6[2]] {
        let cidr = format!("{extra}/80");
        alpha1
            .ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])
            .unwrap();
    }
    let inboxes = [(&alpha2, addr6[1]), (&client, client_addr)].map(|(ns, addr)| {
        let inbox = ns.run(|| UdpSocket::bind("[::]:9001")).unwrap().unwrap();
        inbox
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (inbox, addr)
    });
    let send_from = |src: Ipv6Addr, message: &str| {
        alpha1
            .run(|| {
                let socket = UdpSocket::bind((src, 0)).unwrap();
                for (_, to) in &inboxes {
                    socket.send_to(message.as_bytes(), (*to, 9001)).unwrap();
                }
            })
            .unwrap();
    };
    let mut received = [Vec::new(), Vec::new()];
    let mut receive = |until: &str| {
        for ((inbox, _), received) in inboxes.iter().zip(&mut received) {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = inbox.recv_from(&mut buf) {
                received.push((from.ip(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                if received.last().is_some_and(|(_, m)| m == until) {
                    break;
                }
            }
        }
    };
    send_from(addr6[0], "genuine-1");
    receive("genuine-1");
    send_from(spoofed, "spoofed");
    send_from(addr6[2], "spoofed-as-beta");
    send_from(addr6[0], "genuine-2");
    receive("genuine-2");
    let own = std::net::IpAddr::V6(addr6[0]);
    let genuine = [(own, "genuine-1".to_owned()), (own, "genuine-2".to_owned())];
    assert_eq!(received, [genuine.clone(), genuine]);

    // Neighbor advertisements: beta may not announce alpha2's address (the node keeps
    // alpha2's MAC), but may announce its own (the same packet then changes the node's entry).
    let mac3 = beta.mac("eth0").unwrap();
    let before = neighbor(&node, addr6[1]);
    assert!(before.contains(&mac2), "{before}");
    let announce = |target: Ipv6Addr, mac: &str| {
        let args = [
            "-c",
            SEND_NA_PY,
            &addr6[2].to_string(),
            &target.to_string(),
            mac,
        ];
        beta.exec("python3", &args).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    };
    announce(addr6[1], &mac3);
    let after = neighbor(&node, addr6[1]);
    assert!(after.contains(&mac2) && !after.contains(&mac3), "{after}");
    let fake_mac = "02:00:00:00:00:99";
    assert!(!neighbor(&node, addr6[2]).contains(fake_mac));
    announce(addr6[2], fake_mac);
    let own_entry = neighbor(&node, addr6[2]);
    assert!(own_entry.contains(fake_mac), "{own_entry}");
    drop(isolation);
}
