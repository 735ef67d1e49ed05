//! The HTTP ingress with the real agent, real backends and real clients, inside a network
//! namespace: routing, balancing, retries and upstream failures, websockets, HTTP/2, abuse
//! limits, forwarding headers and metrics (requests by method, open connections).

use std::{
    io::{Read, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use miren_tests::ingress::{Backend, BackendMode, IngressWorld, refused_addr};

/// The backend name a 200 response came from.
fn served_by(world: &IngressWorld, host: &str) -> String {
    let response = world.get(host, "/", &[]);
    assert_eq!(response.status, 200, "{host}: {response:?}");
    response.body
}

/// Scrapes `/metrics` until it has `line` (a gauge catching up with connections that the
/// agent has yet to accept or to finish closing); fails after 10 s.
fn wait_for_metric(world: &IngressWorld, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = world.metrics();
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "never {line} in\n{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn routes_by_exact_wildcard_and_apex_host_and_counts_requests() {
    let world = IngressWorld::new("routing");
    let agent = world.start_agent(&[]);
    let (exact, wild, apex) = (
        Backend::start(&world.ns, "exact", BackendMode::Normal),
        Backend::start(&world.ns, "wild", BackendMode::Normal),
        Backend::start(&world.ns, "apex", BackendMode::Normal),
    );
    for (app, backend) in [("exact", &exact), ("wild", &wild), ("apex", &apex)] {
        world.deploy_web(&agent, app);
        world.set_endpoints(app, &[backend.addr]);
    }
    world.route(&agent, "www.example.com", "exact", &[]);
    world.route(&agent, "*.example.com", "wild", &[]);
    world.route(&agent, "example.com", "apex", &[]);

    assert_eq!(served_by(&world, "www.example.com"), "exact");
    assert_eq!(served_by(&world, "WWW.Example.com:80"), "exact");
    assert_eq!(served_by(&world, "shop.example.com"), "wild");
    assert_eq!(served_by(&world, "example.com"), "apex");
    // A wildcard matches exactly one label.
    let deep = world.get("a.b.example.com", "/", &[]);
    assert_eq!(deep.status, 404, "{deep:?}");
    assert_eq!(deep.body, "no route for host a.b.example.com\n");
    let unknown = world.get("other.test", "/", &[]);
    assert_eq!(unknown.status, 404);
    assert!(unknown.header("x-request-id").is_some());
    let no_host = world.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(no_host.status, 400, "{no_host:?}");
    assert!(
        no_host.body.contains("Host header is missing"),
        "{no_host:?}"
    );
    // No backend was contacted for the 404 and 400.
    assert_eq!(exact.requests() + wild.requests() + apex.requests(), 4);

    let post = world.send(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(post.status, 200, "{post:?}");
    // A client connection held open (no request yet) is counted; closed, it is not.
    let held = world.connect(80);
    let connections = |open: usize| format!("miren_http_connections{{listener=\"http\"}} {open}");
    wait_for_metric(&world, &connections(1));
    let metrics = world.metrics();
    for line in [
        "miren_http_requests_total{app=\"exact\",code=\"200\",method=\"GET\",service=\"web\"} 2",
        "miren_http_requests_total{app=\"wild\",code=\"200\",method=\"GET\",service=\"web\"} 1",
        "miren_http_requests_total{app=\"apex\",code=\"200\",method=\"GET\",service=\"web\"} 1",
        "miren_http_requests_total{app=\"apex\",code=\"200\",method=\"POST\",service=\"web\"} 1",
        "miren_http_requests_total{app=\"\",code=\"404\",method=\"GET\",service=\"\"} 2",
        "miren_http_requests_total{app=\"\",code=\"400\",method=\"GET\",service=\"\"} 1",
        "miren_http_request_duration_seconds_count{app=\"apex\"} 2",
        "miren_http_connections{listener=\"https\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    drop(held);
    wait_for_metric(&world, &connections(0));
    let log = agent.log_text();
    assert!(
        log.contains("miren::access") && log.contains("request_id"),
        "no access log line:\n{log}"
    );
    // Each line has the body bytes received and sent (the 404's body here).
    let deep_line = log
        .lines()
        .find(|l| l.contains("miren::access") && l.contains("host=a.b.example.com"))
        .unwrap_or_else(|| panic!("no access line for a.b.example.com:\n{log}"));
    let sent = format!("bytes_out={}", deep.body.len());
    assert!(
        deep_line.contains("bytes_in=0") && deep_line.contains(&sent),
        "{deep_line}"
    );
}

#[test]
fn balances_over_three_backends_and_follows_route_changes_under_load() {
    let world = IngressWorld::new("balance");
    // Three ingress threads share the routes, the round-robin and the connection pool.
    let agent = world.start_agent(&["--http-threads", "3"]);
    let ingress_threads = || {
        std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
            .expect("list the agent's threads")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("miren-http-"))
            .count()
    };
    // The threads start as the agent starts serving (its API may answer a moment earlier).
    let started = Instant::now();
    while ingress_threads() < 3 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ingress_threads(), 3, "threads named miren-http-N");
    let backends: Vec<Backend> = ["b0", "b1", "b2"]
        .iter()
        .map(|name| Backend::start(&world.ns, name, BackendMode::Normal))
        .collect();
    world.deploy_web(&agent, "one");
    world.set_endpoints("one", &backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    world.route(&agent, "app.example.com", "one", &[]);
    for _ in 0..30 {
        served_by(&world, "app.example.com");
    }
    for backend in &backends {
        assert_eq!(backend.requests(), 10, "round-robin over 3 backends");
    }

    // Load from 4 clients while the route moves to another app: no request fails.
    let other = Backend::start(&world.ns, "other", BackendMode::Normal);
    world.deploy_web(&agent, "two");
    world.set_endpoints("two", &[other.addr]);
    let world = Arc::new(world);
    let stop = Arc::new(AtomicBool::new(false));
    let served_by_two = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (world, stop, two) = (world.clone(), stop.clone(), served_by_two.clone());
            std::thread::spawn(move || {
                let mut count = 0;
                while !stop.load(Ordering::Relaxed) {
                    if served_by(&world, "app.example.com") == "other" {
                        two.fetch_add(1, Ordering::Relaxed);
                    }
                    count += 1;
                }
                count
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    world.route(&agent, "app.example.com", "two", &[]);
    let switched = Instant::now();
    while served_by(&world, "app.example.com") != "other" {
        assert!(
            switched.elapsed() < Duration::from_secs(5),
            "route change not applied"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let total: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(total > 20, "only {total} requests under load");
    assert!(served_by_two.load(Ordering::Relaxed) > 0);
}

#[test]
fn refused_backend_is_retried_once_then_502_and_silent_backend_gives_504() {
    let world = IngressWorld::new("failures");
    let agent = world.start_agent(&[]);
    let good = Backend::start(&world.ns, "good", BackendMode::Normal);
    let refused = refused_addr(&world.ns);
    world.serve(
        &agent,
        "mixed",
        &[refused, good.addr],
        "mixed.example.com",
        &[],
    );
    for _ in 0..6 {
        assert_eq!(served_by(&world, "mixed.example.com"), "good");
    }

    world.serve(&agent, "down", &[refused], "down.example.com", &[]);
    let down = world.get("down.example.com", "/", &[]);
    assert_eq!(down.status, 502, "{down:?}");

    let silent = Backend::start(&world.ns, "silent", BackendMode::Silent);
    world.serve(
        &agent,
        "slow",
        &[silent.addr],
        "slow.example.com",
        &["--timeout", "1s"],
    );
    let started = Instant::now();
    let timed_out = world.get("slow.example.com", "/", &[]);
    assert_eq!(timed_out.status, 504, "{timed_out:?}");
    assert!(started.elapsed() < Duration::from_secs(15));

    world.deploy_web(&agent, "empty");
    world.route(&agent, "empty.example.com", "empty", &[]);
    let empty = world.get("empty.example.com", "/", &[]);
    assert_eq!(empty.status, 503, "{empty:?}");
    assert!(
        empty.body.contains("no endpoints for app empty"),
        "{empty:?}"
    );

    let metrics = world.metrics();
    for line in [
        "miren_http_upstream_errors_total{app=\"mixed\",kind=\"connect\"} 3",
        "miren_http_upstream_errors_total{app=\"down\",kind=\"connect\"} 1",
        "miren_http_upstream_errors_total{app=\"slow\",kind=\"timeout\"} 1",
    ] {
        assert!(
            metrics.contains(line),
            "missing {line} in\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("miren_http_upstream"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn websocket_echoes_over_http_and_stays_open_past_the_route_timeout() {
    let world = IngressWorld::new("websocket");
    let agent = world.start_agent(&[]);
    let backend = Backend::start(&world.ns, "ws", BackendMode::Normal);
    world.serve(
        &agent,
        "chat",
        &[backend.addr],
        "chat.example.com",
        &["--timeout", "1s"],
    );

    websocket_echo(world.connect(80));
    let tls = world
        .ns
        .run(|| miren_tests::tls::connect("127.0.0.1:443".parse().unwrap(), "chat.example.com"))
        .unwrap()
        .expect("TLS connection");
    websocket_echo(tls);
    assert_eq!(backend.stats.accepts.load(Ordering::Relaxed), 2);
}

/// Upgrades `stream` to a websocket through the ingress, then checks that a frame comes back
/// byte for byte, also after idling past the route's 1 s timeout.
fn websocket_echo(mut stream: impl Read + Write) {
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // A masked text frame "hello", echoed byte for byte; again after idling past 1 s.
    let frame = [
        0x81,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for pause in [Duration::ZERO, Duration::from_millis(2500)] {
        std::thread::sleep(pause);
        stream.write_all(&frame).unwrap();
        let mut echoed = [0u8; 11];
        stream.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, frame);
    }
}

#[test]
fn http2_serves_concurrent_streams_over_tls_and_h2c() {
    let world = IngressWorld::new("h2");
    let agent = world.start_agent(&[]);
    let backend = Backend::start(&world.ns, "h2", BackendMode::Normal);
    world.serve(&agent, "h2", &[backend.addr], "h2.example.com", &[]);
    // h2 over TLS (ALPN): ten concurrent streams on one connection.
    let mut args = vec![
        "-sk",
        "-v",
        "--http2",
        "--parallel",
        "--resolve",
        "h2.example.com:443:127.0.0.1",
        "-w",
        "%{http_version} %{http_code}\\n",
    ];
    for _ in 0..10 {
        args.extend(["-o", "/dev/null", "https://h2.example.com/"]);
    }
    let out = world.curl(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert_eq!(text, "2 200\n".repeat(10), "{verbose}");
    // One connection, ten streams on it (curl's "Multiplexed connection found" line is not
    // printed for every reuse, so streams are counted).
    let connects = verbose.matches("* Connected to").count();
    let streams = verbose.matches("* Using Stream ID: ").count();
    assert_eq!((connects, streams), (1, 10), "{verbose}");
    // h2c with prior knowledge on the plain listener (curl 7.88 stalls further streams on
    // a reused h2c connection, so one request per connection here).
    for _ in 0..3 {
        let out = world.curl(&[
            "-s",
            "--http2-prior-knowledge",
            "-H",
            "Host: h2.example.com",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "http://127.0.0.1/",
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{out:?}");
    }
    assert_eq!(backend.requests(), 13);
}

#[test]
fn slowloris_is_closed_by_the_head_deadline_and_limits_give_413_and_431() {
    let world = IngressWorld::new("abuse");
    let agent = world.start_agent(&["--http-head-timeout", "2s", "--http-max-body", "1K"]);
    let backend = Backend::start(&world.ns, "b", BackendMode::Normal);
    world.serve(&agent, "limits", &[backend.addr], "limits.example.com", &[]);

    let mut slow = world.connect(80);
    let started = Instant::now();
    let mut closed_after = None;
    for byte in b"GET / HTTP/1.1\r\nHost: limits.example.com\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*byte]).is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut response = Vec::new();
    let _ = slow.read_to_end(&mut response);
    let closed_after = closed_after.unwrap_or(started.elapsed());
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        closed_after < Duration::from_secs(8),
        "closed after {closed_after:?}"
    );

    let big_body = world.send(
        b"POST / HTTP/1.1\r\nHost: limits.example.com\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(big_body.status, 413, "{big_body:?}");
    let huge_header = format!("X-Big: {}", "a".repeat(70 * 1024));
    let big_head = world.get("limits.example.com", "/", &[&huge_header]);
    assert_eq!(big_head.status, 431, "{big_head:?}");
    assert_eq!(backend.requests(), 0, "nothing may reach the backend");
    // Without a Content-Length, a body is cut off with 413 once it passes the limit.
    let mut chunked = b"POST / HTTP/1.1\r\nHost: limits.example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", "a".repeat(1024)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let cut = world.send(&chunked);
    assert_eq!(cut.status, 413, "{cut:?}");
}

#[test]
fn smuggling_shapes_are_refused_with_nothing_forwarded() {
    let world = IngressWorld::new("smuggle");
    let agent = world.start_agent(&[]);
    let backend = Backend::start(&world.ns, "b", BackendMode::Normal);
    world.serve(&agent, "victim", &[backend.addr], "victim.example.com", &[]);
    let shapes: [&[u8]; 6] = [
        b"POST / HTTP/1.1\r\nHost: victim.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: victim.example.com\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: victim.example.com\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: victim.example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: victim.example.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: victim.example.com\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: victim.example.com\r\nHost: other.example.com\r\n\r\n",
    ];
    for (i, shape) in shapes.iter().enumerate() {
        let response = world.send(shape);
        assert_eq!(response.status, 400, "shape {i}: {response:?}");
    }
    assert_eq!(backend.requests(), 0, "{:?}", backend.heads());
    // Identical Content-Length headers are one length: forwarded as one header.
    let doubled = world.send(
        b"POST / HTTP/1.1\r\nHost: victim.example.com\r\nContent-Length: 4\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
    );
    assert_eq!(doubled.status, 200, "{doubled:?}");
    let head = backend.heads().pop().unwrap().to_ascii_lowercase();
    assert_eq!(head.matches("content-length:").count(), 1, "{head}");
}

#[test]
fn forwarding_headers_are_replaced_unless_the_peer_is_trusted() {
    let world = IngressWorld::new("forwarded");
    let agent = world.start_agent(&[]);
    let backend = Backend::start(&world.ns, "b", BackendMode::Normal);
    world.serve(&agent, "fw", &[backend.addr], "fw.example.com", &[]);
    let spoofed = [
        "X-Forwarded-For: 6.6.6.6",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: evil.example",
        "Forwarded: for=6.6.6.6",
        "X-Request-Id: client-id-1",
    ];
    let response = world.get("fw.example.com", "/", &spoofed);
    assert_eq!(response.status, 200);
    // The client's request id is not trusted either: a new one is made.
    let id = response.header("x-request-id").unwrap().to_owned();
    assert!(id.len() == 16 && id != "client-id-1", "{id}");
    let head = backend.heads().pop().unwrap().to_ascii_lowercase();
    for want in [
        "x-forwarded-for: 127.0.0.1\r\n",
        "x-forwarded-proto: http\r\n",
        "x-forwarded-host: fw.example.com\r\n",
        &format!("x-request-id: {id}\r\n"),
    ] {
        assert!(head.contains(want), "missing {want:?} in {head}");
    }
    assert!(!head.contains("client-id-1"), "{head}");
    assert!(
        !head.contains("6.6.6.6") && !head.contains("evil"),
        "{head}"
    );
    drop(agent);

    let agent = world.start_agent(&["--trusted-proxy", "127.0.0.0/8"]);
    let generated = world.get("fw.example.com", "/", &spoofed[..3]);
    assert_eq!(generated.status, 200);
    assert_eq!(generated.header("x-request-id").map(str::len), Some(16));
    let head = backend.heads().pop().unwrap().to_ascii_lowercase();
    for want in [
        "x-forwarded-for: 6.6.6.6, 127.0.0.1\r\n",
        "x-forwarded-proto: https\r\n",
        "x-forwarded-host: evil.example\r\n",
    ] {
        assert!(head.contains(want), "missing {want:?} in {head}");
    }
    // A trusted proxy's request id is kept.
    let kept = world.get("fw.example.com", "/", &spoofed);
    assert_eq!(kept.header("x-request-id"), Some("client-id-1"));
    let head = backend.heads().pop().unwrap().to_ascii_lowercase();
    assert!(head.contains("x-request-id: client-id-1\r\n"), "{head}");
    drop(agent);
}

#[test]
fn sni_picks_exact_and_wildcard_certificates_swaps_them_live_and_redirects_to_https() {
    use miren_tests::tls::{TestCa, served_leaf};
    let world = IngressWorld::new("sni");
    let agent = world.start_agent(&[]);
    let backend = Backend::start(&world.ns, "tls", BackendMode::Normal);
    world.serve(&agent, "site", &[backend.addr], "a.example.com", &[]);
    let ca = TestCa::new("sni test CA");
    let set = |host: &str, names: &[&str], tag: &str| {
        let pem = ca.issue(names);
        let cert = world.dir().join(format!("{tag}.crt"));
        let key = world.dir().join(format!("{tag}.key"));
        std::fs::write(&cert, &pem.cert).unwrap();
        std::fs::write(&key, &pem.key).unwrap();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        miren_tests::ingress::ok(&agent, &["cert", "set", host, "--cert", cert, "--key", key]);
    };
    let leaf = |sni: &str| {
        world
            .ns
            .run(|| served_leaf("127.0.0.1:443".parse().unwrap(), sni))
            .unwrap()
            .expect("TLS handshake")
            .dns_names
    };
    set("a.example.com", &["a.example.com"], "a");
    set("b.example.com", &["b.example.com"], "b");
    set("*.wild.example.com", &["*.wild.example.com"], "wild");
    assert_eq!(leaf("a.example.com"), ["a.example.com"]);
    assert_eq!(leaf("b.example.com"), ["b.example.com"]);
    assert_eq!(leaf("x.wild.example.com"), ["*.wild.example.com"]);
    // Unknown names still complete the handshake (self-signed fallback) and see the 404.
    let fallback = leaf("unknown.test");
    assert!(
        !fallback.iter().any(|n| n.ends_with("example.com")),
        "{fallback:?}"
    );
    let out = world.curl(&[
        "-sk",
        "--resolve",
        "unknown.test:443:127.0.0.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "https://unknown.test/",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // Replaced while the agent runs: the next handshake gets the new certificate.
    set(
        "a.example.com",
        &["a.example.com", "alt.a.example.com"],
        "a2",
    );
    assert_eq!(
        leaf("a.example.com"),
        ["a.example.com", "alt.a.example.com"]
    );

    // A host with a certificate is redirected from plain HTTP and served over HTTPS.
    let redirect = world.get("a.example.com", "/path?q=1", &[]);
    assert_eq!(redirect.status, 308, "{redirect:?}");
    assert_eq!(
        redirect.header("location"),
        Some("https://a.example.com/path?q=1")
    );
    let out = world.curl(&[
        "-sk",
        "--resolve",
        "a.example.com:443:127.0.0.1",
        "https://a.example.com/",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tls", "{out:?}");
}

#[test]
fn a_taken_listener_port_is_a_clear_startup_error() {
    let world = IngressWorld::new("taken");
    let _holder = world
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:80"))
        .unwrap()
        .expect("hold port 80");
    let out = world
        .ns
        .command(
            miren_tests::process::binary("miren-agent")
                .to_str()
                .unwrap(),
        )
        .args([
            "run",
            "--config",
            "/dev/null",
            "--no-sandboxes",
            "--http-addr",
            "127.0.0.1:80",
        ])
        .arg("--state-dir")
        .arg(world.dir().join("state"))
        .arg("--api-socket")
        .arg(world.dir().join("agent.sock"))
        .output()
        .expect("run miren-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot listen on 127.0.0.1:80 (--http-addr)")
            && stderr.contains("pass another --http-addr")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}
