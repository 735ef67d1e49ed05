//! The agent running apps by itself: instances in their own namespaces behind its bridge,
//! reached through a node port (XDP) and a route, restarted when killed, started from zero by
//! the first HTTP requests and stopped when idle, resolving each other by name within an app,
//! and kept across a redeploy that does not change them. Real agent, CLI, processes, clients.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use miren_tests::{
    apps::{
        self, HttpClient, LAZY_APP_TOML, WEB_PY, app_detail, endpoints, kill9_netns, netns_pids,
        sandbox_netns, wait_until, web_app_toml,
    },
    ingress::ok,
    process::AgentProcess,
    world::{NODE_IP, Plane, World, wait_for_status_ok},
};

/// A UDP echo server answering `ADDR MESSAGE`.
const ECHO_PY: &str = r#"import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(os.environ["PORT"])))
print("echo listening on", os.environ["MIREN_ADDR"], flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(os.environ["MIREN_ADDR"].encode() + b" " + data, peer)
"#;

/// Writes app `name` (app.toml plus the two scripts) and deploys it.
fn deploy(world: &World, agent: &AgentProcess, name: &str, toml: &str) {
    let files = [("echo.py", ECHO_PY), ("web.py", WEB_PY)];
    apps::deploy(world.dir(), agent, name, toml, &files);
}

/// How long to wait for the agent to get somewhere.
const WAIT: Duration = Duration::from_secs(30);

/// One UDP round trip through the node port from a fresh client socket: (reply source, the
/// instance address that answered).
fn udp_round_trip(world: &World, socket: &UdpSocket) -> (SocketAddr, String) {
    let _ = world;
    socket.send(b"ping").unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).expect("echo reply");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (addr, message) = text.split_once(' ').unwrap();
    assert_eq!(message, "ping");
    (from, addr.to_owned())
}

fn client_socket(world: &World) -> UdpSocket {
    let socket = world
        .client
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    socket
        .connect((NODE_IP, 7000))
        .expect("connect to the node port");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket
}

/// Requests to the ingress: a response may take 30 s (an instance starting from zero).
const HTTP: HttpClient = HttpClient {
    connect_timeout: None,
    read_timeout: Duration::from_secs(30),
};

const GAME: &str = r#"name = "game"
[services.udp]
command = "exec python3 echo.py"
[services.udp.concurrency]
mode = "fixed"
num_instances = 2
[[services.udp.ports]]
name = "game"
port = 9000
type = "udp"
node_port = 7000

[services.web]
command = "exec python3 web.py"
port = 8080
[services.web.concurrency]
mode = "fixed"
num_instances = 1
"#;

#[test]
fn deployed_instances_serve_node_port_and_route_and_are_restarted_when_killed() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    deploy(&world, &agent, "game", GAME);
    ok(
        &agent,
        &[
            "route",
            "set",
            "game.example.com",
            "game",
            "--service",
            "web",
        ],
    );
    wait_until("2 udp and 1 web endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game").len() == 2
            && endpoints(&agent, "game", "web", "http").len() == 1
    });
    wait_for_status_ok(&agent);
    let udp = endpoints(&agent, "game", "udp", "game");

    // Node port: replies come from the node address; flows spread over both instances.
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..16 {
        let socket = client_socket(&world);
        let (from, instance) = udp_round_trip(&world, &socket);
        assert_eq!(from, format!("{NODE_IP}:7000").parse().unwrap());
        *answered.entry(instance).or_default() += 1;
    }
    let expected: Vec<String> = udp.iter().map(|a| a.ip().to_string()).collect();
    assert_eq!(
        answered.keys().cloned().collect::<Vec<_>>(),
        expected,
        "{answered:?}"
    );

    // Route: the web instance answers through the ingress.
    let web = endpoints(&agent, "game", "web", "http")[0];
    assert_eq!(
        HTTP.get_via_ingress(&world, "game.example.com", "/"),
        (200, web.ip().to_string())
    );

    // Kill one udp instance: it is replaced, endpoints follow, traffic continues.
    let victim = udp[0].ip().to_string();
    kill9_netns(&sandbox_netns(agent.pid(), &victim));
    wait_until("a restarted instance", WAIT, || {
        let now = endpoints(&agent, "game", "udp", "game");
        now.len() == 2
            && !now.contains(&udp[0])
            && app_detail(&agent, "game").services[0]
                .instances
                .as_ref()
                .is_some_and(|i| i.restarts >= 1)
    });
    wait_for_status_ok(&agent);
    for _ in 0..8 {
        let socket = client_socket(&world);
        let (from, _) = udp_round_trip(&world, &socket);
        assert_eq!(from.ip().to_string(), NODE_IP);
    }
    let show = ok(&agent, &["app", "show", "game"]);
    assert!(
        show.contains("instances: 2 running, 2 ready, 1 restarts"),
        "{show}"
    );
    let logs = ok(&agent, &["logs", "game", "--service", "udp"]);
    assert!(logs.matches("echo listening on").count() >= 3, "{logs}");
}

#[test]
fn first_requests_start_one_instance_and_idle_scales_to_zero() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    deploy(&world, &agent, "lazy", LAZY_APP_TOML);
    ok(&agent, &["route", "set", "lazy.example.com", "lazy"]);
    assert!(endpoints(&agent, "lazy", "web", "http").is_empty());

    let world = std::sync::Arc::new(world);
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let world = world.clone();
            std::thread::spawn(move || HTTP.get_via_ingress(&world, "lazy.example.com", "/"))
        })
        .collect();
    let results: Vec<(u16, String)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let instance = endpoints(&agent, "lazy", "web", "http")[0].ip().to_string();
    for result in &results {
        assert_eq!(result, &(200, instance.clone()));
    }
    let log = agent.log_text();
    assert_eq!(log.matches("instance started").count(), 1, "{log}");

    wait_until("scale down to zero", WAIT, || {
        endpoints(&agent, "lazy", "web", "http").is_empty()
            && app_detail(&agent, "lazy").services[0]
                .instances
                .as_ref()
                .is_some_and(|i| i.running == 0)
    });
    assert!(agent.log_text().contains("idle; scaling down"));
}

#[test]
fn dns_answers_within_the_app_and_not_across_apps() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    let two_services = |name: &str| {
        format!(
            "name = \"{name}\"\n[services.web]\ncommand = \"exec python3 web.py\"\nport = 8080\n\
             [services.web.concurrency]\nmode = \"fixed\"\nnum_instances = 1\n\
             [services.api]\ncommand = \"exec python3 web.py\"\nport = 8081\n\
             [services.api.concurrency]\nmode = \"fixed\"\nnum_instances = 1\n"
        )
    };
    deploy(&world, &agent, "alpha", &two_services("alpha"));
    deploy(
        &world,
        &agent,
        "beta",
        &web_app_toml("beta", "exec python3 web.py"),
    );
    wait_until("all endpoints", WAIT, || {
        endpoints(&agent, "alpha", "web", "http").len() == 1
            && endpoints(&agent, "alpha", "api", "http").len() == 1
            && endpoints(&agent, "beta", "web", "http").len() == 1
    });
    let ip = |app: &str, service: &str| endpoints(&agent, app, service, "http")[0].ip().to_string();
    // Inside the instance's container (its id is the namespace's `PIDxN` part).
    let runc_root = world.dir().join("state/sandbox/runc");
    let resolve = |from_ip: &str, name: &str| {
        let netns = sandbox_netns(agent.pid(), from_ip);
        let out = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args([
                "exec",
                netns.trim_start_matches("miren-s"),
                "getent",
                "hosts",
                name,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .map(str::to_owned)
    };
    let alpha_web = ip("alpha", "web");
    let beta_web = ip("beta", "web");
    assert_eq!(
        resolve(&alpha_web, "api.app.miren"),
        Some(ip("alpha", "api"))
    );
    assert_eq!(
        resolve(&alpha_web, "web.app.miren"),
        Some(alpha_web.clone())
    );
    assert_eq!(resolve(&beta_web, "web.app.miren"), Some(beta_web.clone()));
    assert_eq!(
        resolve(&beta_web, "api.app.miren"),
        None,
        "beta must not see alpha's api"
    );
}

#[test]
fn redeploy_keeps_established_flows_to_instances_it_does_not_replace() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    deploy(&world, &agent, "game", GAME);
    wait_until("2 udp endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game").len() == 2
            && endpoints(&agent, "game", "web", "http").len() == 1
    });
    wait_for_status_ok(&agent);
    let sockets: Vec<UdpSocket> = (0..8).map(|_| client_socket(&world)).collect();
    let before: Vec<String> = sockets
        .iter()
        .map(|s| udp_round_trip(&world, s).1)
        .collect();
    let web_before = endpoints(&agent, "game", "web", "http");

    // Change only the web service: its instance is replaced, the udp ones stay.
    let changed = GAME.replace(
        "command = \"exec python3 web.py\"",
        "command = \"exec python3 web.py\"\nenv = [{ key = \"COLOR\", value = \"blue\" }]",
    );
    deploy(&world, &agent, "game", &changed);
    wait_until("the web instance replaced", WAIT, || {
        let now = endpoints(&agent, "game", "web", "http");
        now.len() == 1 && now != web_before
    });
    let after: Vec<String> = sockets
        .iter()
        .map(|s| udp_round_trip(&world, s).1)
        .collect();
    assert_eq!(before, after, "established flows moved");
}

/// Pids of the processes in the namespace of the sandbox with address `ip`.
fn sandbox_pids(agent_pid: u32, ip: &str) -> Vec<String> {
    netns_pids(&sandbox_netns(agent_pid, ip))
}

#[test]
fn a_udp_stream_survives_kill_9_and_a_restart_of_the_agent_with_default_flags() {
    const RATE: u64 = 5_000;
    const PACKETS: u64 = 25_000;
    let world = World::new(0);
    let agent = world.start_agent_keeping_instances(Plane::Xdp, &[]);
    deploy(&world, &agent, "game", GAME);
    wait_until("endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game").len() == 2
    });
    wait_for_status_ok(&agent);
    let before = endpoints(&agent, "game", "udp", "game");
    let pids: Vec<Vec<String>> = before
        .iter()
        .map(|addr| sandbox_pids(agent.pid(), &addr.ip().to_string()))
        .collect();
    let first_agent = agent.pid();
    let socket = client_socket(&world);
    let (_, instance) = udp_round_trip(&world, &socket);
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let receiver = socket.try_clone().unwrap();
    let replies = std::thread::spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        let mut answered_by = std::collections::BTreeSet::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = receiver.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (addr, seq) = text.split_once(' ').unwrap();
            answered_by.insert(addr.to_owned());
            seen.insert(seq.parse::<u64>().unwrap());
        }
        (seen, answered_by)
    });
    // 5,000 packets a second for 5 s; the agent is killed after one second and restarted.
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        for seq in 0..PACKETS {
            let due = Duration::from_micros(seq * 1_000_000 / RATE);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            socket.send(seq.to_string().as_bytes()).unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    agent.kill9();
    let agent = world.start_agent_keeping_instances(Plane::Xdp, &[]);
    wait_until("adopted endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game") == before
    });
    sender.join().unwrap();
    let (seen, answered_by) = replies.join().unwrap();
    let lost = PACKETS - seen.len() as u64;
    // Where the losses are (contiguous runs of sequence numbers) tells a gap in forwarding
    // from scattered drops.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for seq in (0..PACKETS).filter(|seq| !seen.contains(seq)) {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => runs.push((seq, seq)),
        }
    }
    // Datagrams dropped by full socket buffers (a starved process, not the data plane).
    let rcvbuf_errors = |snmp: String| {
        let udp: Vec<Vec<String>> = snmp
            .lines()
            .filter(|l| l.starts_with("Udp:"))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        udp.first()
            .and_then(|names| names.iter().position(|n| n == "RcvbufErrors"))
            .and_then(|i| udp.get(1)?.get(i)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let instances: Vec<u64> = pids
        .iter()
        .filter_map(|p| p.first())
        .map(|pid| {
            rcvbuf_errors(
                std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).unwrap_or_default(),
            )
        })
        .collect();
    let client = world
        .client
        .run(|| {
            rcvbuf_errors(std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default())
        })
        .unwrap();
    // Every lost datagram must be one a starved process's full socket buffer dropped (on a
    // loaded machine the echo instance falls behind): none may be lost in forwarding.
    let overflowed = instances.iter().sum::<u64>() + client;
    assert_eq!(
        lost.saturating_sub(overflowed),
        0,
        "{lost} of {PACKETS} packets got no reply, in runs {:?}; UDP RcvbufErrors: instances {instances:?}, client {client}\n{}",
        &runs[..runs.len().min(20)],
        agent.log_text()
    );
    assert_eq!(
        answered_by,
        std::collections::BTreeSet::from([instance]),
        "the stream moved"
    );
    let log = agent.log_text();
    assert_eq!(
        log.matches("adopting an instance of an earlier agent")
            .count(),
        3,
        "{log}"
    );
    assert!(!log.contains("instance started"), "{log}");
    for (addr, pids) in before.iter().zip(&pids) {
        assert_eq!(
            &sandbox_pids(first_agent, &addr.ip().to_string()),
            pids,
            "{addr}"
        );
    }
}

#[test]
fn instances_outlive_a_stopped_agent_and_the_next_one_adopts_them() {
    let world = World::new(0);
    let mut agent = world.start_agent_keeping_instances(Plane::Xdp, &[]);
    deploy(&world, &agent, "game", GAME);
    wait_until("endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game").len() == 2
    });
    wait_for_status_ok(&agent);
    let socket = client_socket(&world);
    let (_, first) = udp_round_trip(&world, &socket);
    let before = endpoints(&agent, "game", "udp", "game");
    let pids: Vec<Vec<String>> = before
        .iter()
        .map(|addr| sandbox_pids(agent.pid(), &addr.ip().to_string()))
        .collect();
    let old_pid = agent.pid();
    assert!(
        agent
            .terminate(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );

    // While no agent runs, the instances keep serving through the kernel's data plane.
    let (_, during) = udp_round_trip(&world, &socket);
    assert_eq!(during, first);

    let agent = world.start_agent_keeping_instances(Plane::Xdp, &[]);
    wait_until("adopted endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game") == before
    });
    let log = agent.log_text();
    assert_eq!(
        log.matches("adopting an instance of an earlier agent")
            .count(),
        3,
        "{log}"
    );
    assert!(!log.contains("instance started"), "{log}");
    for (addr, pids) in before.iter().zip(&pids) {
        let prefix = format!("miren-s{old_pid:x}x");
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&netns.stdout).contains(&prefix),
            "{addr}"
        );
        for pid in pids {
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "{pid} gone"
            );
        }
    }
    let (_, after) = udp_round_trip(&world, &socket);
    assert_eq!(after, first, "the flow moved");
    drop(agent);
    // An agent with --stop-instances-on-exit takes over and removes everything when it stops.
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    wait_until("new endpoints", WAIT, || {
        endpoints(&agent, "game", "udp", "game").len() == 2
    });
    drop(agent);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&format!("miren-s{old_pid:x}x")),
        "adopted sandboxes left behind"
    );
}

#[test]
fn a_crash_looping_service_shows_in_app_show_with_its_output_in_logs() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    deploy(
        &world,
        &agent,
        "broken",
        &web_app_toml("broken", "echo boom; exit 3"),
    );
    wait_until("a crash loop", WAIT, || {
        app_detail(&agent, "broken").services[0]
            .instances
            .as_ref()
            .is_some_and(|i| i.crash_loop && i.restarts >= 3)
    });
    let show = ok(&agent, &["app", "show", "broken"]);
    assert!(
        show.contains("CRASH LOOP") && show.contains("last exit: exit status: 3"),
        "{show}"
    );
    assert!(endpoints(&agent, "broken", "web", "http").is_empty());
    let logs = ok(&agent, &["logs", "broken"]);
    assert!(logs.matches("| boom").count() >= 3, "{logs}");
}
