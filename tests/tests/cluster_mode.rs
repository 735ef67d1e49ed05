//! Cluster mode with real agents on a real 3-member etcd cluster, each agent and member in
//! its own node namespace on one bridge, driven through the real CLI.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use miren_tests::{
    apps::write_app,
    cluster::{EtcdCluster, Fabric},
    cluster_agents::ClusterAgents,
    process::binary,
};

/// An app with one UDP port published as `node_port`.
fn udp_app(name: &str, node_port: u16) -> String {
    format!(
        r#"name = "{name}"
[services.game]
command = "sleep 1000"
[[services.game.ports]]
name = "game"
port = 27015
type = "udp"
node_port = {node_port}
"#
    )
}

/// `miren deploy DIR` against `socket`, started but not waited for.
fn start_deploy(socket: &Path, dir: &Path) -> std::process::Child {
    Command::new(binary("miren"))
        .arg("--socket")
        .arg(socket)
        .arg("deploy")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run miren deploy")
}

/// Two agents on different nodes deploy apps claiming the same node port at the same
/// instant, 20 rounds: the store's transaction lets exactly one win each round, and the
/// loser's error names the winner as the holder.
#[test]
fn a_node_port_is_claimed_by_exactly_one_of_two_racing_deploys_on_different_nodes() {
    let fabric = Fabric::new("race", 3, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 3);
    let agents = ClusterAgents::start(&fabric, &etcd, 2, &["--no-sandboxes"]);
    for round in 0..20u16 {
        let port = 30000 + round;
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let dir_a = write_app(agents.dir(), &a, &udp_app(&a, port), &[]);
        let dir_b = write_app(agents.dir(), &b, &udp_app(&b, port), &[]);
        let first = start_deploy(&agents.node_dir(0).join("agent.sock"), &dir_a);
        let second = start_deploy(&agents.node_dir(1).join("agent.sock"), &dir_b);
        let (first, second) = (
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        );
        let (winner, loser) = match (first.status.success(), second.status.success()) {
            (true, false) => (&a, second),
            (false, true) => (&b, first),
            outcome => panic!(
                "round {round}: expected exactly one winner, got {outcome:?}\nfirst: {first:?}\nsecond: {second:?}\n{}",
                agents.logs()
            ),
        };
        let err = String::from_utf8_lossy(&loser.stderr);
        assert!(
            err.contains(&format!(
                "node_port {port}/udp is already taken by app \"{winner}\" service \"game\""
            )),
            "round {round}: {err}"
        );
        // Both nodes see the winner as the holder.
        for node in 0..2 {
            let out = agents.miren(node, &["ports"]);
            let listing = String::from_utf8_lossy(&out.stdout);
            let line = listing
                .lines()
                .find(|l| l.split_whitespace().next() == Some(&format!("{port}/udp")))
                .unwrap_or_else(|| panic!("node{node} lists no {port}: {listing}"));
            assert!(line.contains(winner.as_str()), "node{node}: {line}");
        }
    }
}

/// The node table of `miren --output json nodes` on node `i`.
fn nodes(agents: &ClusterAgents, i: usize) -> Vec<serde_json::Value> {
    let out = agents.miren(i, &["--output", "json", "nodes"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("nodes JSON")
}

/// `(name, status, subnet)` of every node as node `i` sees them.
fn node_states(agents: &ClusterAgents, i: usize) -> Vec<(String, String, String)> {
    nodes(agents, i)
        .iter()
        .map(|n| {
            let field = |key: &str| n[key].as_str().unwrap_or_default().to_owned();
            (field("name"), field("status"), field("subnet"))
        })
        .collect()
}

/// Waits up to `timeout` until `check` holds for what node `i` sees.
fn eventually(
    agents: &ClusterAgents,
    i: usize,
    timeout: std::time::Duration,
    check: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let seen = node_states(agents, i);
        if check(&seen) {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node{i} still sees {seen:?}\n{}",
            agents.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Every agent registers its node with its own /24 of the sandbox subnet (kept across a
/// restart); cordoning shows on every node; a killed node turns lost after its lease TTL and
/// can then be removed, a live one cannot.
#[test]
fn nodes_register_with_their_own_subnets_and_lost_nodes_can_be_removed() {
    let fabric = Fabric::new("nodes", 3, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 3);
    let mut agents = ClusterAgents::start(&fabric, &etcd, 3, &["--no-sandboxes"]);
    let seen = eventually(&agents, 0, std::time::Duration::from_secs(10), |n| {
        n.len() == 3 && n.iter().all(|(_, status, _)| status == "ready")
    });
    let mut subnets: Vec<&str> = seen.iter().map(|(_, _, s)| s.as_str()).collect();
    subnets.sort_unstable();
    subnets.dedup();
    assert_eq!(subnets.len(), 3, "{seen:?}");
    for subnet in &subnets {
        assert!(
            subnet.starts_with("10.88.") && subnet.ends_with(".0/24"),
            "{seen:?}"
        );
    }
    let subnet_of = |seen: &[(String, String, String)], node: &str| {
        seen.iter()
            .find(|(name, _, _)| name == node)
            .map(|(_, _, s)| s.clone())
            .unwrap()
    };
    let node1_subnet = subnet_of(&seen, "node1");

    let out = agents.miren(0, &["node", "cordon", "node1"]);
    assert!(out.status.success(), "{out:?}");
    eventually(&agents, 2, std::time::Duration::from_secs(10), |n| {
        n.iter()
            .any(|(name, status, _)| name == "node1" && status == "cordoned")
    });

    // A live node cannot be removed.
    let out = agents.miren(0, &["node", "rm", "node2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("node \"node2\" is alive"),
        "{err}"
    );

    // node1 restarts: same subnet, still cordoned.
    agents.stop(1);
    agents.restart(&fabric, 1);
    let seen = eventually(&agents, 0, std::time::Duration::from_secs(10), |n| {
        n.iter()
            .any(|(name, status, _)| name == "node1" && status == "cordoned")
    });
    assert_eq!(subnet_of(&seen, "node1"), node1_subnet);

    // node2 dies: lost after its lease (3 s), then removable.
    agents.kill9(2);
    eventually(&agents, 0, std::time::Duration::from_secs(15), |n| {
        n.iter()
            .any(|(name, status, _)| name == "node2" && status == "lost")
    });
    let out = agents.miren(1, &["node", "rm", "node2"]);
    assert!(out.status.success(), "{out:?}");
    eventually(&agents, 0, std::time::Duration::from_secs(10), |n| {
        n.len() == 2 && n.iter().all(|(name, _, _)| name != "node2")
    });
    let text = String::from_utf8_lossy(&agents.miren(0, &["nodes"]).stdout).into_owned();
    assert!(
        text.starts_with("NAME") && text.contains("LAST HEARTBEAT") && text.contains("node0"),
        "{text}"
    );
}

/// A cluster token file others may read stops the agent before it does anything, saying how
/// to fix it.
#[test]
fn an_agent_refuses_a_cluster_token_file_others_may_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = miren_tests::process::TempDir::new("token-mode");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "").unwrap();
    let out = Command::new(binary("miren-agent"))
        .args([
            "run",
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:9",
        ])
        .arg("--cluster-token-file")
        .arg(&token)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--api-socket")
        .arg(dir.path().join("agent.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("has mode 640") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "it opened the store first"
    );
}

/// An app deployed through one node with its code bundle reaches the other nodes over the
/// cluster listener (verified by hash); a request without the cluster token gets 401 and is
/// logged.
#[test]
fn bundles_travel_between_nodes_and_the_cluster_listener_wants_the_token() {
    let fabric = Fabric::new("bundles", 2, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 1);
    let agents = ClusterAgents::start(&fabric, &etcd, 2, &["--no-sandboxes"]);
    let dir = write_app(
        agents.dir(),
        "code",
        &udp_app("code", 31999),
        &[("data.txt", "the app's own data\n")],
    );
    let out = agents.miren(0, &["--output", "json", "deploy", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let bundles = |node: usize| -> Vec<String> {
        std::fs::read_dir(agents.node_dir(node).join("state/bundles"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| name.len() == 64)
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while bundles(1).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "node1 did not fetch the bundle\n{}",
            agents.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let hash = &bundles(1)[0];
    assert_eq!(bundles(0), std::slice::from_ref(hash));
    let data = agents
        .node_dir(1)
        .join("state/bundles")
        .join(hash)
        .join("data.txt");
    assert_eq!(
        std::fs::read_to_string(data).unwrap(),
        "the app's own data\n"
    );

    // Without the token, node0's cluster listener serves nothing.
    let ask = |token: &str| -> String {
        let request = format!(
            "GET /cluster/v1/bundles/{hash} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        fabric
            .node(1)
            .run(|| {
                use std::io::{Read as _, Write as _};
                let mut stream = std::net::TcpStream::connect(("10.95.0.1", 7946)).unwrap();
                stream.write_all(request.as_bytes()).unwrap();
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                answer
            })
            .unwrap()
    };
    let answer = ask("wrong-token-0123456789");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The agent's log is written asynchronously.
    wait(
        &agents,
        "the refusal in node0's log",
        std::time::Duration::from_secs(5),
        || {
            agents
                .agent(0)
                .log_text()
                .contains("refused a cluster request without the cluster token")
        },
    );
}

/// `miren --output json ARGS` on node `i`, parsed.
fn json(agents: &ClusterAgents, i: usize, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = agents.miren(i, &all);
    assert!(out.status.success(), "miren {args:?} on node{i}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Where `app`'s service `main` is placed, as node `i` sees it (sorted node names).
fn placed_on(agents: &ClusterAgents, i: usize, app: &str) -> Vec<String> {
    let detail = json(agents, i, &["app", "show", app]);
    detail["services"][0]["placed_on"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Instances of `app` node `i`'s own runner has running.
fn running_on(agents: &ClusterAgents, i: usize, app: &str) -> u64 {
    json(agents, i, &["app", "show", app])["services"][0]["instances"]["running"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits up to `timeout` for `check`, failing with `what` and the agents' logs.
fn wait(
    agents: &ClusterAgents,
    what: &str,
    timeout: std::time::Duration,
    check: impl Fn() -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            agents.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn fixed_app(name: &str, instances: u32) -> String {
    format!(
        "name = \"{name}\"\n[services.main]\ncommand = \"sleep 100000\"\n[services.main.concurrency]\nmode = \"fixed\"\nnum_instances = {instances}\n"
    )
}

/// The scheduler spreads a fixed service over the nodes; a node killed with -9 has its
/// instances placed elsewhere within its lease TTL + 5 s, and when it comes back it stops what
/// is no longer placed on it. Killing the scheduler hands the role to another node, which
/// places a deploy made afterwards.
#[test]
fn instances_are_spread_replaced_after_a_node_is_lost_and_the_scheduler_fails_over() {
    let fabric = Fabric::new("sched", 3, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 3);
    let mut agents = ClusterAgents::start(&fabric, &etcd, 3, &["--stop-instances-on-exit"]);
    let dir = write_app(agents.dir(), "spread", &fixed_app("spread", 3), &[]);
    let out = agents.miren(0, &["deploy", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let all = ["node0", "node1", "node2"].map(String::from).to_vec();
    wait(
        &agents,
        "one instance per node",
        std::time::Duration::from_secs(30),
        || {
            placed_on(&agents, 0, "spread") == all
                && (0..3).all(|i| running_on(&agents, i, "spread") == 1)
        },
    );

    // Kill a node that is not the scheduler: its instance moves within TTL (3 s) + 5 s.
    let scheduler = json(&agents, 0, &["status"])["scheduler"]
        .as_str()
        .expect("a scheduler")
        .to_owned();
    let victim = (0..3)
        .find(|i| format!("node{i}") != scheduler)
        .expect("a node that does not schedule");
    agents.kill9(victim);
    let killed = std::time::Instant::now();
    let survivor = (0..3).find(|i| *i != victim).unwrap();
    wait(
        &agents,
        "re-placement",
        std::time::Duration::from_secs(8),
        || {
            let placed = placed_on(&agents, survivor, "spread");
            placed.len() == 3 && !placed.contains(&format!("node{victim}"))
        },
    );
    println!("re-placed {:?} after the kill", killed.elapsed());

    // It comes back: what it ran is no longer placed on it, so it stops it.
    agents.restart(&fabric, victim);
    wait(
        &agents,
        "the returned node to stop its instance",
        std::time::Duration::from_secs(30),
        || running_on(&agents, victim, "spread") == 0,
    );
    let placed = placed_on(&agents, victim, "spread");
    assert_eq!(placed.len(), 3, "{placed:?}");

    // Kill the scheduler: another node takes the role and places a new deploy.
    let scheduler_index: usize = scheduler.trim_start_matches("node").parse().unwrap();
    agents.kill9(scheduler_index);
    let other = (0..3).find(|i| *i != scheduler_index).unwrap();
    wait(
        &agents,
        "a new scheduler",
        std::time::Duration::from_secs(10),
        || {
            json(&agents, other, &["status"])["scheduler"]
                .as_str()
                .is_some_and(|s| s != scheduler)
        },
    );
    let dir = write_app(agents.dir(), "later", &fixed_app("later", 2), &[]);
    let out = agents.miren(other, &["deploy", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    wait(
        &agents,
        "the later app placed",
        std::time::Duration::from_secs(15),
        || {
            let placed = placed_on(&agents, other, "later");
            placed.len() == 2 && !placed.contains(&scheduler)
        },
    );
}

/// With one etcd member down (the leader) deploys still work; with two of three down a deploy fails with
/// "store unavailable" and every agent keeps answering from its last known state; when the
/// members return, deploys work again.
#[test]
fn deploys_survive_one_lost_etcd_member_and_fail_clearly_without_quorum() {
    let fabric = Fabric::new("quorum", 3, false).expect("fabric");
    let mut etcd = EtcdCluster::start(&fabric, 3);
    let agents = ClusterAgents::start(&fabric, &etcd, 3, &["--no-sandboxes"]);
    let deploy = |node: usize, name: &str, port: u16| {
        let dir = write_app(agents.dir(), name, &udp_app(name, port), &[]);
        agents.miren(node, &["deploy", dir.to_str().unwrap()])
    };
    let out = deploy(0, "first", 31001);
    assert!(out.status.success(), "{out:?}");

    // The hardest member to lose: the leader (the others hold requests until they elect a
    // new one).
    let leader = etcd.leader(0).expect("the cluster's leader");
    etcd.kill_member(leader);
    let out = deploy(0, "second", 31002);
    assert!(
        out.status.success(),
        "one member down: {out:?}\n{}",
        agents.logs()
    );

    let second = (0..3).find(|i| *i != leader).unwrap();
    etcd.stop_member(second);
    let started = std::time::Instant::now();
    let out = deploy(0, "third", 31003);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a deploy without quorum succeeded");
    assert!(err.contains("store unavailable"), "{err}");
    println!(
        "a deploy without quorum failed after {:?}: {err}",
        started.elapsed()
    );
    // The last known state is still served, on every node.
    for node in 0..3 {
        let listing = String::from_utf8_lossy(&agents.miren(node, &["ports"]).stdout).into_owned();
        assert!(
            listing.contains("first") && listing.contains("second") && !listing.contains("third"),
            "node{node}: {listing}"
        );
    }

    etcd.start_member(second);
    etcd.start_member(leader);
    wait(
        &agents,
        "a deploy after quorum returned",
        std::time::Duration::from_secs(60),
        || deploy(1, "fourth", 31004).status.success(),
    );
    wait(
        &agents,
        "every node to see it",
        std::time::Duration::from_secs(20),
        || {
            (0..3).all(|node| {
                String::from_utf8_lossy(&agents.miren(node, &["ports"]).stdout).contains("fourth")
            })
        },
    );
}

/// With `--cluster-ca/--cluster-cert/--cluster-key` the cluster listener (on its default
/// address, NODE_IP:7946) speaks only mutual TLS: an app deployed through node0 runs on node1
/// from the bundle node1 fetched over it, and `miren ports` on node0 sums node1's counters it
/// asked for over it. From node1's namespace, a plain HTTP request, a TLS request without a
/// client certificate and one with a certificate of another CA are refused at the handshake
/// (which node0 logs); node1's own certificate without the token gets 401.
#[test]
fn the_cluster_listener_speaks_mutual_tls_and_still_wants_the_token() {
    use miren_tests::{
        apps::{udp_exchange, wait_until},
        cluster::{CLIENT_IP, node_ip},
        tls::TestCa,
    };
    use std::{collections::BTreeSet, net::SocketAddr, time::Duration};
    const UDP_NODE_PORT: u16 = 30100;
    const FLOWS: usize = 16;
    // A UDP echo answering `INSTANCE_ADDRESS MESSAGE`, one instance per node.
    const ECHO_PY: &str = r#"import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(os.environ["MIREN_ADDR"].encode() + b" " + data, peer)
"#;

    let fabric = Fabric::new("ctls", 2, true).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 1);
    let ca = TestCa::new("miren cluster test CA");
    let agents = ClusterAgents::start_with_cluster_tls(
        &fabric,
        &etcd,
        2,
        "nft",
        &ca,
        &["--stop-instances-on-exit"],
    );
    let dir = write_app(
        agents.dir(),
        "tlsecho",
        &format!(
            "name = \"tlsecho\"\n[services.echo]\ncommand = \"exec python3 echo.py\"\n\
             [services.echo.concurrency]\nmode = \"fixed\"\nnum_instances = 2\n\
             [[services.echo.ports]]\nname = \"udp\"\nport = 9000\ntype = \"udp\"\n\
             node_port = {UDP_NODE_PORT}\n"
        ),
        &[("echo.py", ECHO_PY)],
    );
    let out = agents.miren(0, &["deploy", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();

    // node1 runs the app from the bundle it fetched from node0 over TLS.
    wait(
        &agents,
        "instances running on both nodes",
        Duration::from_secs(120),
        || running_on(&agents, 0, "tlsecho") >= 1 && running_on(&agents, 1, "tlsecho") >= 1,
    );
    assert!(
        agents
            .agent(1)
            .log_text()
            .contains("fetched an app's code bundle"),
        "{}",
        agents.logs()
    );

    // UDP through each node's address reaches the instances of both nodes.
    let client = fabric.client().expect("client namespace");
    let through = |node: usize| -> BTreeSet<std::net::Ipv4Addr> {
        client
            .run(|| {
                let target = SocketAddr::from((node_ip(node), UDP_NODE_PORT));
                (0..FLOWS)
                    .filter_map(|k| {
                        let message = format!("flow {k} from {CLIENT_IP}");
                        let reply =
                            udp_exchange(target, message.as_bytes(), Duration::from_secs(2))?;
                        let reply = String::from_utf8_lossy(&reply).into_owned();
                        let (instance, echoed) = reply.split_once(' ')?;
                        assert_eq!(echoed, message, "{reply}");
                        instance.parse().ok()
                    })
                    .collect()
            })
            .unwrap()
    };
    for node in 0..2 {
        wait_until(
            &format!("UDP through node{node} reaching instances on both nodes"),
            Duration::from_secs(60),
            || through(node).len() >= 2,
        );
    }

    // node0 sums its own counters and node1's, which it asked node1 for over TLS.
    let ports = json(&agents, 0, &["ports"]);
    let udp = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_port"] == UDP_NODE_PORT && p["protocol"] == "udp")
        .unwrap_or_else(|| panic!("no UDP node port in {ports}"))
        .clone();
    let by_node = udp["by_node"].as_object().expect("by_node");
    assert_eq!(
        by_node.keys().map(String::as_str).collect::<Vec<_>>(),
        ["node0", "node1"],
        "{udp}\n{}",
        agents.logs()
    );
    let per_node: Vec<u64> = by_node
        .values()
        .map(|t| t["rx_packets"].as_u64().unwrap())
        .collect();
    assert!(per_node.iter().all(|rx| *rx > 0), "{udp}");
    assert_eq!(
        udp["traffic"]["rx_packets"].as_u64().unwrap(),
        per_node.iter().sum::<u64>(),
        "{udp}"
    );

    // What node0's listener says to other clients, asked from node1's namespace.
    let token = std::fs::read_to_string(agents.token_file()).unwrap();
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let node1 = agents.node_dir(1);
    let path = |name: &str| node1.join(name).to_string_lossy().into_owned();
    let foreign = TestCa::new("another CA")
        .issue(&[&node_ip(1).to_string()])
        .write(agents.dir(), "foreign");
    let curl = |args: &[&str]| -> (bool, String, String) {
        let out = fabric
            .node(1)
            .command("curl")
            .args(["-sS", "-m", "10", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let https = format!("https://{}:7946/cluster/v1/ports", node_ip(0));
    let (ca_file, cert, key) = (
        path("cluster-ca.crt"),
        path("cluster.crt"),
        path("cluster.key"),
    );

    // (a) Plain HTTP, with the token: no answer.
    let plain = curl(&[
        "-H",
        &bearer,
        &format!("http://{}:7946/cluster/v1/ports", node_ip(0)),
    ]);
    assert!(!plain.0 && !plain.1.contains("node_port"), "{plain:?}");
    // (b) TLS trusting the cluster's CA, with the token, but no client certificate.
    let anonymous = curl(&["--cacert", &ca_file, "-H", &bearer, &https]);
    assert!(
        !anonymous.0 && anonymous.2.contains("certificate required"),
        "{anonymous:?}"
    );
    // A client certificate of another CA.
    let stranger = curl(&[
        "--cacert", &ca_file, "--cert", &foreign.0, "--key", &foreign.1, "-H", &bearer, &https,
    ]);
    assert!(
        !stranger.0 && stranger.2.contains("unknown ca"),
        "{stranger:?}"
    );
    wait(
        &agents,
        "node0 logging a failed TLS handshake",
        Duration::from_secs(5),
        || {
            agents
                .agent(0)
                .log_text()
                .contains("refused a cluster connection whose TLS handshake failed")
        },
    );
    // (c) node1's own certificate without the token: 401.
    let tokenless = curl(&["--cacert", &ca_file, "--cert", &cert, "--key", &key, &https]);
    assert!(
        tokenless.0 && tokenless.1.ends_with("\n401"),
        "{tokenless:?}"
    );
    // With both: the counters.
    let member = curl(&[
        "--cacert", &ca_file, "--cert", &cert, "--key", &key, "-H", &bearer, &https,
    ]);
    assert!(
        member.0 && member.1.ends_with("\n200") && member.1.contains("node_port"),
        "{member:?}"
    );
}

/// An agent that starts while its etcd has no quorum (the cluster booting together, or the
/// node's own member rejoining) waits for the store, saying so, and starts once it answers.
#[test]
fn an_agent_started_without_etcd_quorum_waits_for_the_store() {
    let fabric = Fabric::new("wait", 3, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 3);
    // Two members frozen: the third has no leader, and answers nothing.
    let frozen: Vec<String> = [1, 2]
        .iter()
        .map(|i| etcd.member_pid(*i).expect("member pid").to_string())
        .collect();
    let signal = |signal: &str, pids: &[String]| {
        let status = Command::new("kill")
            .arg(signal)
            .args(pids)
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pids:?}");
    };
    signal("-STOP", &frozen);
    let thaw = {
        let frozen = frozen.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(7));
            signal("-CONT", &frozen);
        })
    };
    let agents = ClusterAgents::start(&fabric, &etcd, 1, &["--no-sandboxes"]);
    thaw.join().unwrap();
    let logs = agents.logs();
    assert!(
        logs.contains("the store is unavailable; the agent starts once it answers"),
        "{logs}"
    );
    assert_eq!(
        node_states(&agents, 0),
        [("node0".into(), "ready".into(), "10.88.0.0/24".into())]
    );
}
