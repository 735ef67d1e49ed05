//! The real `miren-agent` and the real `miren` CLI: deploy the product-doc examples, reject a
//! conflicting node port without changing anything, edit published ports, supply endpoints,
//! then `kill -9` the agent, restart it, and find everything intact.

use std::{collections::BTreeMap, path::Path};

use miren_agent::{api::types::ServiceEndpoints, cli::Client};
use miren_tests::process::{AgentProcess, TempDir, agent_in_dir, example};

fn start_agent(dir: &Path) -> AgentProcess {
    let (command, socket) = agent_in_dir(dir);
    AgentProcess::start(
        command,
        &socket,
        &dir.join(format!("agent-{}.log", std::process::id())),
    )
}

/// Splits a command line of the tests (no quoting needed) into arguments.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Runs the CLI, asserting success, and returns stdout.
fn ok(agent: &AgentProcess, args: &[&str]) -> String {
    let out = agent.miren(args);
    assert!(
        out.status.success(),
        "miren {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs the CLI, asserting failure, and returns stderr.
fn fails(agent: &AgentProcess, args: &[&str]) -> String {
    let out = agent.miren(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "miren {args:?} should fail with exit 1: {out:?}"
    );
    String::from_utf8(out.stderr).expect("utf-8 output")
}

/// Everything observable through the CLI, as JSON documents.
fn snapshot(agent: &AgentProcess) -> Vec<String> {
    let mut docs = vec![
        ok(agent, &["--output", "json", "apps"]),
        ok(agent, &["--output", "json", "ports"]),
        ok(agent, &["--output", "json", "route", "list"]),
    ];
    for app in ["irc", "dns", "game", "tcp-echo"] {
        docs.push(ok(agent, &["--output", "json", "app", "show", app]));
        docs.push(ok(agent, &["--output", "json", "endpoints", app]));
    }
    docs
}

#[test]
fn deploy_reject_edit_and_survive_kill_9() {
    let dir = TempDir::new("control");
    std::fs::write(
        dir.path().join("agent.toml"),
        "port-range = \"21000-21999\"\nhttp-addr = \"127.0.0.1:0\"\nhttps-addr = \"127.0.0.1:0\"\nmetrics-addr = \"127.0.0.1:0\"\nno-sandboxes = true\n",
    )
    .unwrap();
    let agent = start_agent(dir.path());

    for app in ["irc", "dns", "game", "tcp-echo"] {
        let path = example(app);
        let out = ok(&agent, &["deploy", path.to_str().unwrap()]);
        assert!(
            out.contains(&format!("deployed app {app} version 1")),
            "{out}"
        );
    }
    // The tcp echo port has no `port`: the agent assigned one from the configured range.
    let echo = ok(&agent, &["app", "show", "tcp-echo"]);
    assert!(
        echo.contains("21000 (assigned)") && echo.contains("PORT=21000"),
        "{echo}"
    );

    // A fifth app wanting TCP node port 7000 is rejected, naming the holder and the line.
    let clash = dir.path().join("clash");
    std::fs::create_dir_all(clash.join(".miren")).unwrap();
    std::fs::write(
        clash.join(".miren/app.toml"),
        "name = \"clash\"\n\n[services.main]\ncommand = \"./main\"\n\n[[services.main.ports]]\nname = \"p\"\nport = 9000\ntype = \"tcp\"\nnode_port = 7000\n",
    )
    .unwrap();
    let before = snapshot(&agent);
    let err = fails(&agent, &["deploy", clash.to_str().unwrap()]);
    assert!(
        err.contains("node_port 7000/tcp is already taken by app \"tcp-echo\" service \"echo\""),
        "{err}"
    );
    assert!(err.contains("clash/.miren/app.toml:10:13"), "{err}");
    assert_eq!(snapshot(&agent), before, "a rejected deploy changed state");

    // UDP 7000 is a different node port: the same app with type udp deploys.
    let toml = std::fs::read_to_string(clash.join(".miren/app.toml")).unwrap();
    std::fs::write(
        clash.join(".miren/app.toml"),
        toml.replace("type = \"tcp\"", "type = \"udp\""),
    )
    .unwrap();
    ok(&agent, &["deploy", clash.to_str().unwrap()]);
    ok(&agent, &["app", "rm", "clash"]);

    // Routes: the game's http admin port.
    ok(&agent, &["route", "set", "Admin.Game.Example.COM.", "game"]);
    ok(
        &agent,
        &words("route add *.game.example.com --app game --service server"),
    );
    let err = fails(&agent, &["route", "set", "dns.example.com", "dns"]);
    assert!(err.contains("no service with an HTTP port"), "{err}");
    let routes = ok(&agent, &["route", "list"]);
    assert!(
        routes.contains("admin.game.example.com") && routes.contains("*.game.example.com"),
        "{routes}"
    );

    // Edit published ports: move tcp-echo from 7000 to 7001, publish DNS/TCP on 5353.
    ok(
        &agent,
        &words("ports edit tcp-echo --service echo --add-published 7001 --rm-published 7000"),
    );
    ok(
        &agent,
        &words("ports edit dns --service dns --add-published 5353:1053/tcp"),
    );
    let err = fails(
        &agent,
        &words("ports edit dns --service dns --add-published 6667/tcp"),
    );
    assert!(
        err.contains("already taken by app \"irc\" service \"ircd\""),
        "{err}"
    );
    let err = fails(
        &agent,
        &words("ports edit game --service server --add-published 9000:8080"),
    );
    assert!(err.contains("http"), "{err}");
    let ports = ok(&agent, &["ports"]);
    for expected in ["7001/tcp", "5353/tcp", "53/udp", "27015/udp", "6697/tcp"] {
        assert!(ports.contains(expected), "missing {expected}:\n{ports}");
    }
    assert!(!ports.contains("7000/tcp"), "{ports}");

    // Endpoints from an external orchestrator, through the API.
    let client = Client::new(dir.path().join("agent.sock"));
    let endpoints = ServiceEndpoints {
        service: String::new(),
        endpoints: BTreeMap::from([(
            "game".to_owned(),
            vec![
                "10.88.0.2:27015".parse().unwrap(),
                "10.88.0.3:27015".parse().unwrap(),
            ],
        )]),
        ..ServiceEndpoints::default()
    };
    client
        .set_endpoints("game", "server", &endpoints)
        .expect("PUT endpoints");
    let shown = ok(&agent, &["endpoints", "game"]);
    assert!(
        shown.contains("10.88.0.2:27015") && shown.contains("10.88.0.3:27015"),
        "{shown}"
    );

    // kill -9 and restart: everything is still there.
    let before = snapshot(&agent);
    agent.kill9();
    let agent = start_agent(dir.path());
    assert_eq!(
        snapshot(&agent),
        before,
        "state changed across kill -9 and restart"
    );
    let status = ok(&agent, &["status"]);
    assert!(
        status.contains("apps        4") || status.contains("4"),
        "{status}"
    );
}
