//! `miren doctor` on this machine: a node with a running agent passes (alone, and in a
//! cluster on etcd with its lease, peers and routes); a node missing pieces (tools off
//! `PATH`, a taken listener port, a bad config) gets each miss with what to do.

use std::{
    net::TcpListener,
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use miren_tests::{
    cluster::{EtcdCluster, Fabric},
    cluster_agents::{ClusterAgents, node_name},
    process::{TempDir, binary},
    topology::Netns,
    world::{Plane, World},
};
use serde_json::Value;

/// `miren --socket SOCKET --output json doctor ARGS…` in `ns`, with `path` as its `PATH`
/// when given.
fn doctor(ns: &Netns, socket: &Path, args: &[&str], path: Option<&str>) -> (Output, Vec<Value>) {
    // `env` sets the PATH inside the namespace (nsenter itself is found on the test's).
    let mut command = ns.command("/usr/bin/env");
    if let Some(path) = path {
        command.arg(format!("PATH={path}"));
    }
    command
        .arg(binary("miren"))
        .arg("--socket")
        .arg(socket)
        .args(["--output", "json", "doctor"])
        .args(args);
    let out = command.output().expect("run miren doctor");
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor's JSON: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, checks)
}

/// The check named `name` whose detail contains `detail`.
fn find<'a>(checks: &'a [Value], name: &str, detail: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["check"] == name && c["detail"].as_str().unwrap().contains(detail))
        .unwrap_or_else(|| panic!("no {name} check with {detail:?} in {checks:#?}"))
}

#[test]
fn a_node_with_a_running_agent_passes_every_check() {
    let world = World::new(0);
    let agent = world.start_agent(Plane::Xdp);
    let config = world.dir().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "dataplane = \"xdp\"\nbpf-pin-dir = \"{}\"\n",
            world.pin_dir().display()
        ),
    )
    .unwrap();
    let socket = world.dir().join("agent.sock");
    let (out, checks) = doctor(
        &world.node,
        &socket,
        &["--config", config.to_str().unwrap()],
        None,
    );
    let failed: Vec<&Value> = checks.iter().filter(|c| c["verdict"] == "fail").collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "{failed:#?}\n{}",
        agent.log_text()
    );
    for (name, detail) in [
        ("config", "is valid"),
        ("agent", "answers at"),
        ("ebpf", "the XDP and TC programs load"),
        ("bpffs", "is on a bpffs"),
        ("nftables", "nftables v"),
        ("oci-runtime", "runc"),
        ("cgroups", "memory, pids and cpu"),
        ("port", "the running agent's"),
        ("store", "sqlite"),
        ("dataplane", "xdp"),
    ] {
        assert_eq!(find(&checks, name, detail)["verdict"], "ok", "{name}");
    }
}

#[test]
fn misses_are_reported_with_what_to_do() {
    let ns = Netns::new("doctor").expect("create namespace (needs root)");
    let dir = TempDir::new("doctor");
    let socket = dir.path().join("no-agent.sock");
    // A taken port: something else listens on the configured HTTP address.
    let taken = ns
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "http-addr = \"{taken_addr}\"\nhttps-addr = \"127.0.0.1:0\"\nstate-dir = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    // No nft, conntrack, runc or tini on PATH.
    let (out, checks) = doctor(
        &ns,
        &socket,
        &["--config", config.to_str().unwrap()],
        Some("/nonexistent"),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("doctor check(s) failed"), "{stderr}");
    let expect = |name: &str, detail: &str, verdict: &str, advice: &str| {
        let check = find(&checks, name, detail);
        assert_eq!(check["verdict"], verdict, "{check:#}");
        let text = check["advice"].as_str().unwrap_or_default();
        assert!(text.contains(advice), "{check:#}");
    };
    expect(
        "agent",
        "no agent answers",
        "warn",
        "systemctl start miren-agent",
    );
    expect(
        "nftables",
        "`nft` not found",
        "fail",
        "apt install nftables",
    );
    expect("conntrack", "not found", "warn", "apt install conntrack");
    expect(
        "oci-runtime",
        "`runc` not found",
        "fail",
        "apt install runc",
    );
    expect("init", "`tini` not found", "fail", "apt install tini");
    expect(
        "port",
        &format!("{taken_addr} (http-addr) is taken"),
        "fail",
        "set http-addr in the agent config",
    );
    expect("port", "(https-addr) is free", "ok", "");
    expect("store", "will be created", "ok", "");
    drop(taken);

    // A config the agent would refuse: named, with its line, and the rest still checked.
    std::fs::write(
        &config,
        "state-dir = \"/var/lib/miren\"\nhttp-adr = \"0.0.0.0:80\"\n",
    )
    .unwrap();
    let (out, checks) = doctor(&ns, &socket, &["--config", config.to_str().unwrap()], None);
    assert!(!out.status.success());
    let check = find(&checks, "config", "agent.toml");
    assert_eq!(check["verdict"], "fail", "{check:#}");
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains("line 2") && detail.contains("http-adr"),
        "{detail}"
    );
    find(&checks, "nftables", "nftables v");
}

#[test]
fn in_cluster_mode_the_lease_the_peers_and_the_routes_to_their_subnets_are_checked() {
    let fabric = Fabric::new("doctor", 3, false).expect("fabric");
    let etcd = EtcdCluster::start(&fabric, 3);
    let agents = ClusterAgents::start(&fabric, &etcd, 2, &["--no-sandboxes"]);
    let config = agents.dir().join("doctor.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"etcd\"\netcd-endpoints = {:?}\nnode-name = \"{}\"\ncluster-token-file = \"{}\"\nno-sandboxes = true\n",
            etcd.endpoints(),
            node_name(0),
            agents.token_file().display()
        ),
    )
    .unwrap();
    let socket = agents.node_dir(0).join("agent.sock");
    let args = ["--config", config.to_str().unwrap()];
    // The peer registers, and its subnet is routed, within a few seconds of starting.
    let deadline = Instant::now() + Duration::from_secs(20);
    let checks = loop {
        let (out, checks) = doctor(fabric.node(0), &socket, &args, None);
        if out.status.success() && checks.iter().any(|c| c["check"] == "route") {
            break checks;
        }
        assert!(
            Instant::now() < deadline,
            "{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            agents.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let peer = node_name(1);
    for (name, detail) in [
        ("store", "etcd"),
        ("etcd", "accepts connections"),
        ("lease", &format!("node {} is ready", node_name(0))),
        ("peer", &format!("node {peer} answers at")),
        ("route", &format!("(node {peer}) is routed via the node")),
    ] {
        assert_eq!(find(&checks, name, detail)["verdict"], "ok", "{name}");
    }
}
