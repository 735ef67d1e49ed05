//! gRPC through the ingress: a real gRPC server (Python grpcio, h2c) as a route's backend
//! and a real grpcio client calling it through the ingress, with HTTP/2 prior knowledge on
//! the plain listener and h2 over TLS on the HTTPS listener. Unary calls, server streaming,
//! and error statuses with their details and trailers must arrive as the server sent them.
//!
//! The scripts are in `tests/grpc/`; they need Debian's `python3-grpcio` (`cargo xtask
//! setup` installs it) and run with Debian's own interpreter, which has it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
};

use miren_tests::{
    ingress::{IngressWorld, ok},
    process::AgentProcess,
    tls::TestCa,
    topology::ChildGuard,
};

/// The interpreter `python3-grpcio` installs into (a `python3` earlier on PATH, e.g. from
/// pyenv, may lack it).
const PYTHON: &str = "/usr/bin/python3";
/// The route served over h2c on the plain listener (no certificate, so no redirect).
const HOST: &str = "grpc.example.com";
/// The route served over TLS (it has a certificate).
const TLS_HOST: &str = "grpcs.example.com";

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("grpc")
        .join(name)
        .display()
        .to_string()
}

/// Fails the test (it does not skip) when grpcio cannot be imported.
fn require_grpcio() {
    let out = Command::new(PYTHON)
        .args(["-c", "import grpc"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PYTHON} ({e}): run `cargo xtask setup`"));
    assert!(
        out.status.success(),
        "python3-grpcio is missing ({PYTHON} cannot import grpc): run `cargo xtask setup`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tests/grpc/server.py` running in the world's namespace; killed on drop.
struct GrpcServer {
    addr: SocketAddr,
    log: PathBuf,
    _child: ChildGuard,
}

impl GrpcServer {
    fn start(world: &IngressWorld) -> Self {
        let log = world.dir().join("grpc-server.log");
        let stderr = std::fs::File::create(&log).expect("create the server's log");
        let mut command = world.ns.command(PYTHON);
        command
            .arg(script("server.py"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = world.ns.spawn(&mut command).expect("start server.py");
        let stdout = child.child_mut().stdout.take().expect("server stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the server's port");
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "server.py printed {line:?}, not its port:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _child: child,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An agent with a route `HOST` (and `TLS_HOST`, with a certificate from a test CA) to a
/// gRPC server. Fields drop in order: server and agent before the namespace.
struct GrpcWorld {
    server: GrpcServer,
    agent: AgentProcess,
    /// The CA that signed `TLS_HOST`'s certificate, PEM file.
    ca_file: String,
    world: IngressWorld,
}

impl GrpcWorld {
    fn new(tag: &str) -> Self {
        require_grpcio();
        let world = IngressWorld::new(tag);
        let agent = world.start_agent(&[]);
        let server = GrpcServer::start(&world);
        world.serve(&agent, "grpc", &[server.addr], HOST, &[]);
        world.route(&agent, TLS_HOST, "grpc", &[]);
        let ca = TestCa::new("grpc test CA");
        let (cert, key) = ca.issue(&[TLS_HOST]).write(world.dir(), "grpcs");
        ok(
            &agent,
            &["cert", "set", TLS_HOST, "--cert", &cert, "--key", &key],
        );
        let ca_file = world.dir().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        Self {
            server,
            agent,
            ca_file: ca_file.display().to_string(),
            world,
        }
    }

    /// Runs `client.py CASE` through the plain listener (h2c, `:authority` `HOST`) or the
    /// TLS one (`TLS_HOST`), and checks it printed `expected` line for line.
    fn expect(&self, tls: bool, case: &str, expected: &[&str]) {
        self.expect_from(if tls { TLS_HOST } else { HOST }, tls, case, expected);
    }

    /// [`GrpcWorld::expect`] with the `:authority` `host`.
    fn expect_from(&self, host: &str, tls: bool, case: &str, expected: &[&str]) {
        let mut command = self.world.ns.command("timeout");
        command.args(["180", PYTHON, &script("client.py")]);
        if tls {
            command.args(["127.0.0.1:443", host, case, &self.ca_file]);
        } else {
            command.args(["127.0.0.1:80", host, case]);
        }
        let out = command.output().expect("run client.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut want = expected.join("\n");
        want.push_str("\ndone\n");
        let listener = if tls { "TLS" } else { "h2c" };
        assert_eq!(
            stdout,
            want,
            "gRPC {case} over {listener} through the ingress\nclient stderr ({}):\n{}\nserver log:\n{}\nagent log (end):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.server.log_text(),
            tail(&self.agent.log_text(), 40),
        );
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

const UNARY: &[&str] = &["echo 5 -> 5 same", "echo 1048576 -> 1048576 same"];
const STREAM: &[&str] = &[
    "message 0",
    "message 1",
    "message 2",
    "message 3",
    "message 4",
    "end OK",
];
/// Messages, then a non-OK status in the trailers that follow them.
const STREAM_FAIL: &[&str] = &[
    "message 0",
    "message 1",
    "message 2",
    "error ABORTED 'stopped after 3'",
];
/// A trailers-only response: status, details and custom trailing metadata.
const FAIL: &[&str] = &[
    "status NOT_FOUND 'no such thing'",
    "x-why 'it-was-never-there'",
];

#[test]
fn grpc_unary_calls_echo_small_and_1mib_messages_over_h2c() {
    let grpc = GrpcWorld::new("grpc-unary");
    grpc.expect(false, "unary", UNARY);
}

#[test]
fn grpc_server_streaming_delivers_every_message_then_the_status_over_h2c() {
    let grpc = GrpcWorld::new("grpc-stream");
    grpc.expect(false, "stream", STREAM);
    grpc.expect(false, "stream-fail", STREAM_FAIL);
}

#[test]
fn grpc_error_code_details_and_trailers_reach_the_client_over_h2c() {
    let grpc = GrpcWorld::new("grpc-status");
    grpc.expect(false, "fail", FAIL);
}

#[test]
fn grpc_unary_streaming_and_errors_work_over_tls() {
    let grpc = GrpcWorld::new("grpc-tls");
    grpc.expect(true, "unary", UNARY);
    grpc.expect(true, "stream", STREAM);
    grpc.expect(true, "stream-fail", STREAM_FAIL);
    grpc.expect(true, "fail", FAIL);
}

/// What the ingress answers itself reaches a gRPC client as a gRPC status with the reason,
/// not as an HTTP error page the client cannot read: no route (UNIMPLEMENTED), an instance
/// that refuses connections (UNAVAILABLE).
#[test]
fn the_ingress_own_answers_reach_grpc_clients_as_grpc_statuses() {
    let grpc = GrpcWorld::new("grpc-ingress-status");
    grpc.expect_from(
        "nowhere.example.com",
        false,
        "fail",
        &[
            "status UNIMPLEMENTED 'no route for host nowhere.example.com'",
            "x-why None",
        ],
    );
    // Nothing listens on this port in the test's namespace.
    let closed: SocketAddr = "127.0.0.1:9".parse().unwrap();
    grpc.world
        .serve(&grpc.agent, "gone", &[closed], "gone.example.com", &[]);
    grpc.expect_from(
        "gone.example.com",
        false,
        "fail",
        &[
            "status UNAVAILABLE 'the app failed: ConnectRefused'",
            "x-why None",
        ],
    );
}
