//! Bounded by design, private files, hidden secrets — with the real agent (no sandboxes) and
//! the real CLI: a deploy over a limit is refused before anything is written, naming the
//! limit and its flag (10,000 services included, and `miren validate` offline too); numbers
//! out of range and ill-typed fields in API requests are 400s with a JSON error naming the
//! field; everything under the state dir is private (0700 directories, 0600 files); `miren
//! app show` masks secret environment values unless `--show-secrets`.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::{Command, Output},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use miren_agent::api::types::ErrorBody;
use miren_tests::{
    apps::write_app,
    process::{AgentProcess, TempDir, agent_in_dir, binary},
};

/// Starts the agent without sandboxes, loopback listeners and `limits` (agent.toml lines).
fn start_agent(dir: &Path, limits: &str) -> AgentProcess {
    std::fs::write(
        dir.join("agent.toml"),
        format!("http-addr = \"127.0.0.1:0\"\nhttps-addr = \"127.0.0.1:0\"\nmetrics-addr = \"127.0.0.1:0\"\nno-sandboxes = true\n{limits}"),
    )
    .unwrap();
    let (command, socket) = agent_in_dir(dir);
    AgentProcess::start(command, &socket, &dir.join("agent.log"))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Runs the CLI, asserting success, and returns stdout.
fn ok(agent: &AgentProcess, args: &[&str]) -> String {
    let out = agent.miren(args);
    assert!(
        out.status.success(),
        "miren {args:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts that the CLI failed with exit 1 and returns stderr.
fn failed(args: &[&str], out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "miren {args:?} should fail with exit 1: {out:?}"
    );
    text(&out.stderr)
}

/// Everything observable through the CLI, as JSON documents.
fn snapshot(agent: &AgentProcess) -> Vec<String> {
    vec![
        ok(agent, &["--output", "json", "apps"]),
        ok(agent, &["--output", "json", "app", "show", "shop"]),
        ok(agent, &["--output", "json", "ports"]),
        ok(agent, &["--output", "json", "route", "list"]),
    ]
}

/// One raw HTTP/1.1 request on the API socket: (status, content type, body).
fn request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head[9..12].parse().expect("a status code");
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Asserts a 400 with a JSON [`ErrorBody`] of kind `bad_request` containing every one of
/// `parts`.
fn bad_request(socket: &Path, method: &str, path: &str, body: &str, parts: &[&str]) {
    let (status, content_type, text) = request(socket, method, path, body);
    assert_eq!(status, 400, "{method} {path} {body}: {text}");
    assert_eq!(content_type, "application/json", "{text}");
    let error: ErrorBody = serde_json::from_str(&text).expect("a JSON error body");
    assert_eq!(error.kind, "bad_request");
    for part in parts {
        assert!(
            error.error.contains(part),
            "{method} {path} {body}: missing {part:?} in {:?}",
            error.error
        );
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every directory under (and including) `dir` is 0700, every regular file 0600, and
/// nothing else there (sockets) is open to group or others — but the unpacked app code
/// bundles (`bundles/<sha256>/`), which the instances' users read through their `/app`
/// mount: only the agent reaches them, through the 0700 `bundles` directory.
fn assert_private(dir: &Path) {
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        let bundle_tree =
            dir.file_name().is_some_and(|name| name == "bundles") && entry.file_name().len() == 64;
        if kind.is_dir() && bundle_tree {
            assert_eq!(mode(&path), 0o755, "{}", path.display());
        } else if kind.is_dir() {
            assert_private(&path);
        } else if kind.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        } else {
            assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
        }
    }
}

/// An app named `big` with `n` fixed services of one instance each.
fn services(n: usize) -> String {
    let mut toml = "name = \"big\"\n".to_owned();
    for i in 0..n {
        toml.push_str(&format!("[services.s{i}]\ncommand = \"sleep 1000\"\n"));
    }
    toml
}

const SHOP: &str = r#"name = "shop"

[[env]]
key = "DB_PASSWORD"
value = "hunter2"

[[env]]
key = "LOG_LEVEL"
value = "info"

[services.worker]
command = "sleep 1000"
concurrency = { num_instances = 3 }
env = [{ key = "stripe_api_key", value = "sk-live-123" }]
"#;

#[test]
fn limits_api_inputs_file_modes_and_secrets() {
    let dir = TempDir::new("limits");
    let agent = start_agent(
        dir.path(),
        "max-instances-per-node = 5\nmax-ports-per-service = 2\n",
    );
    let socket = dir.path().join("agent.sock");
    let shop = write_app(dir.path(), "shop", SHOP, &[]);

    // Secrets: masked in the deploy answer, in `app show` (text and JSON), shown on request.
    let deployed = ok(
        &agent,
        &["--output", "json", "deploy", shop.to_str().unwrap()],
    );
    assert!(
        !deployed.contains("hunter2") && deployed.contains("\"DB_PASSWORD\": \"********\""),
        "{deployed}"
    );
    let shown = ok(&agent, &["app", "show", "shop"]);
    for expected in [
        "    DB_PASSWORD=********\n",
        "    LOG_LEVEL=info\n",
        "    stripe_api_key=********\n",
        "secret values are hidden; show them with `miren app show shop --show-secrets`",
    ] {
        assert!(shown.contains(expected), "missing {expected:?}:\n{shown}");
    }
    let json = ok(&agent, &["--output", "json", "app", "show", "shop"]);
    assert!(
        !json.contains("hunter2") && !json.contains("sk-live-123"),
        "{json}"
    );
    let revealed = ok(&agent, &["app", "show", "shop", "--show-secrets"]);
    assert!(
        revealed.contains("    DB_PASSWORD=hunter2\n")
            && revealed.contains("    stripe_api_key=sk-live-123\n")
            && !revealed.contains("hidden"),
        "{revealed}"
    );

    // Files: the state dir and everything in it are private; the store and its WAL exist.
    let state = dir.path().join("state");
    for file in ["store.db", "store.db-wal", "store.db-shm"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    assert_private(&state);

    // 10,000 services: refused at once with the limit named; nothing written.
    let before = snapshot(&agent);
    let big = write_app(dir.path(), "big", &services(10_000), &[]);
    let args = ["deploy", big.to_str().unwrap()];
    // `miren status` keeps answering while the deploy is refused (each call must succeed).
    let done = AtomicBool::new(false);
    let (out, refused_after, status_calls) = std::thread::scope(|scope| {
        let poller = scope.spawn(|| {
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                ok(&agent, &["status"]);
                latencies.push(started.elapsed());
            }
            latencies
        });
        let started = Instant::now();
        let out = agent.miren(&args);
        let refused_after = started.elapsed();
        done.store(true, Ordering::Relaxed);
        (out, refused_after, poller.join().expect("status poller"))
    });
    println!(
        "`miren status` during the deploy: {} calls, slowest {:?}",
        status_calls.len(),
        status_calls.iter().max()
    );
    let err = failed(&args, &out);
    for expected in [
        "error: the app has 10000 services, more than the limit of 64 per app",
        "big/.miren/app.toml:130:11",
        "--max-services-per-app",
    ] {
        assert!(err.contains(expected), "missing {expected:?}:\n{err}");
    }
    // Measured, not asserted (timing): see the test output with --nocapture.
    println!("a deploy of 10,000 services was refused in {refused_after:?}");
    let started = Instant::now();
    ok(&agent, &["status"]);
    println!(
        "`miren status` after it answered in {:?}",
        started.elapsed()
    );
    // `miren validate` applies the default limits offline.
    let validate = Command::new(binary("miren"))
        .args(["validate", big.to_str().unwrap()])
        .output()
        .unwrap();
    let err = failed(&["validate"], &validate);
    assert!(err.contains("more than the limit of 64 per app"), "{err}");

    // A fixed num_instances over the per-service limit.
    let many = write_app(
        dir.path(),
        "many",
        "name = \"many\"\n[services.w]\ncommand = \"x\"\nconcurrency = { num_instances = 65 }\n",
        &[],
    );
    let args = ["deploy", many.to_str().unwrap()];
    let err = failed(&args, &agent.miren(&args));
    for expected in [
        "num_instances 65 is more than the limit of 64 instances per service",
        "many/.miren/app.toml:4:33",
        "--max-instances-per-service",
    ] {
        assert!(err.contains(expected), "missing {expected:?}:\n{err}");
    }

    // The node's limit (max-instances-per-node = 5 in agent.toml): shop runs 3.
    let other = write_app(
        dir.path(),
        "other",
        "name = \"other\"\n[services.w]\ncommand = \"x\"\nconcurrency = { num_instances = 3 }\n",
        &[],
    );
    let args = ["deploy", other.to_str().unwrap()];
    let err = failed(&args, &agent.miren(&args));
    for expected in [
        "this deploy would run 6 fixed instances on the node (3 of other apps), more than the limit of 5 per node",
        "other/.miren/app.toml:4:33",
        "--max-instances-per-node",
    ] {
        assert!(err.contains(expected), "missing {expected:?}:\n{err}");
    }
    assert_eq!(snapshot(&agent), before, "a refused deploy changed state");

    // API inputs out of range or of the wrong type: 400 naming the field.
    for (method, path, body, parts) in [
        (
            "PUT",
            "/v1/routes/shop.example.com",
            r#"{"app": "shop", "timeout_ms": 18446744073709551615}"#,
            &[
                "timeout_ms 18446744073709551615 is out of range",
                "1 to 86400000",
            ][..],
        ),
        (
            "PUT",
            "/v1/routes/shop.example.com",
            r#"{"app": "shop", "timeout_ms": 0}"#,
            &["timeout_ms 0 is out of range"],
        ),
        (
            "PUT",
            "/v1/routes/shop.example.com",
            r#"{"app": "shop", "timeout_ms": -1}"#,
            &["invalid request body: timeout_ms: invalid value: integer `-1`"],
        ),
        (
            "PUT",
            "/v1/routes/shop.example.com",
            r#"{"app": 5}"#,
            &["invalid request body: app: invalid type: integer `5`, expected a string"],
        ),
        (
            "PUT",
            "/v1/routes/shop.example.com",
            r#"{"app": "#,
            &["invalid request body"],
        ),
        (
            "POST",
            "/v1/apps/shop/ports",
            r#"{"service": "worker", "add": [{"node_port": 70000}], "remove": []}"#,
            &["add[0].node_port", "integer `70000`", "from 1 to 65535"],
        ),
        (
            "POST",
            "/v1/apps/shop/ports",
            r#"{"service": "worker", "add": [], "remove": [{"node_port": 0}]}"#,
            &["remove[0].node_port", "from 1 to 65535"],
        ),
        (
            "PUT",
            "/v1/apps/shop/services/worker/endpoints",
            r#"{"endpoints": {"main": ["10.88.0.2:0"]}}"#,
            &["endpoints.main[0]", "1-65535"],
        ),
        (
            "PUT",
            "/v1/apps/shop/services/worker/endpoints",
            r#"{"endpoints": {"main": ["10.88.0.2:99999"]}}"#,
            &["endpoints.main[0]"],
        ),
        (
            "GET",
            "/v1/apps/shop?show_secrets=maybe",
            "",
            &["invalid query string", "show_secrets"],
        ),
    ] {
        bad_request(&socket, method, path, body, parts);
    }
    assert_eq!(snapshot(&agent), before, "a refused request changed state");

    // Redeploying an app replaces its own instances: shop at 5 fits the node's limit.
    std::fs::write(
        shop.join(".miren/app.toml"),
        SHOP.replace("num_instances = 3", "num_instances = 5"),
    )
    .unwrap();
    ok(&agent, &["deploy", shop.to_str().unwrap()]);
    assert_private(&state);

    // `ports edit` cannot publish more node ports per service than the ports limit (2 here).
    let game = write_app(
        dir.path(),
        "game",
        "name = \"game\"\n[services.server]\ncommand = \"x\"\nconcurrency = { mode = \"auto\" }\nports = [{ name = \"game\", port = 27015, type = \"udp\", node_port = 27015 }]\n",
        &[],
    );
    ok(&agent, &["deploy", game.to_str().unwrap()]);
    let edit = |n: &'static str| {
        let args = [
            "ports",
            "edit",
            "game",
            "--service",
            "server",
            "--add-published",
            n,
        ];
        (args, agent.miren(&args))
    };
    let (args, out) = edit("27016");
    assert!(out.status.success(), "{args:?}: {out:?}");
    let (args, out) = edit("27017");
    let err = failed(&args, &out);
    assert!(
        err.contains(
            "service \"server\" would publish 3 node ports, more than the limit of 2 per service"
        ) && err.contains("--max-ports-per-service"),
        "{err}"
    );
}

/// An app deployed under raised limits stays in the store when the agent restarts with the
/// defaults: it is skipped (with the limit in the log) instead of being run, and the agent
/// serves its API.
#[test]
fn an_app_over_the_limits_in_the_store_is_skipped_at_start() {
    let dir = TempDir::new("limits-restart");
    let raised = "max-services-per-app = 10000\nmax-instances-per-node = 10000\n";
    let mut agent = start_agent(dir.path(), raised);
    let big = write_app(dir.path(), "big", &services(10_000), &[]);
    let started = Instant::now();
    ok(&agent, &["deploy", big.to_str().unwrap()]);
    println!(
        "a deploy of 10,000 services under raised limits took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let apps = ok(&agent, &["apps"]);
    println!(
        "`miren apps` with them deployed answered in {:?}",
        started.elapsed()
    );
    assert!(apps.contains("big"), "{apps}");
    assert!(
        agent.terminate(Duration::from_secs(40)).is_some(),
        "SIGTERM"
    );

    let agent = start_agent(dir.path(), "");
    let apps = ok(&agent, &["--output", "json", "apps"]);
    assert_eq!(apps.trim(), "[]", "{apps}");
    let log = agent.log_text();
    assert!(
        log.contains("stored app no longer validates")
            && log.contains("the app has 10000 services, more than the limit of 64 per app"),
        "{log}"
    );
    ok(&agent, &["status"]);
}
