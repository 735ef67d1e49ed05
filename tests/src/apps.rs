//! Apps deployed with the real CLI, for tests whose agent runs instances: writing an app
//! directory and deploying it, waiting for what the agent does, `miren app show`, plain
//! HTTP/1.1 requests to the ingress or to an instance, the network namespace and processes of
//! an instance, and a small web server for instances that answers with its instance's address.

use std::{
    fmt::Display,
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use miren_agent::api::types::AppDetail;

use crate::{
    ingress::{HttpResponse, ok},
    process::AgentProcess,
    world::{NODE_IP, World},
};

/// A Python HTTP server on `PORT` answering every `GET` with its instance's address
/// (`MIREN_ADDR`), `/slow` after `SLOW_SECONDS` (env, default 3) seconds; prints `web listening` once it is about to serve. Code
/// put before it (e.g. a signal handler, another server on a thread) runs first.
pub const WEB_PY: &str = r#"import os, time, http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(float(os.environ.get("SLOW_SECONDS", "3")))
        body = os.environ["MIREN_ADDR"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("web listening", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// The app.toml of app `lazy`: an auto service `web` (running [`WEB_PY`] as `web.py`, after a
/// second) on port 8080, one instance per 100 requests in flight, idle after 3 s.
pub const LAZY_APP_TOML: &str = r#"name = "lazy"
[services.web]
command = "sleep 1; exec python3 web.py"
port = 8080
[services.web.concurrency]
mode = "auto"
requests_per_instance = 100
scale_down_delay = "3s"
"#;

/// The app.toml of app `name` with one service `web` on port 8080, one instance, running
/// `command` (a shell command line without `"` or `\`).
pub fn web_app_toml(name: &str, command: &str) -> String {
    format!(
        r#"name = "{name}"
[services.web]
command = "{command}"
port = 8080
[services.web.concurrency]
mode = "fixed"
num_instances = 1
"#
    )
}

/// Writes app `name` in `dir`: `DIR/NAME/.miren/app.toml` with `toml`, and each of `files`
/// (name, text) in `DIR/NAME`. Returns the app directory.
pub fn write_app(dir: &Path, name: &str, toml: &str, files: &[(&str, &str)]) -> PathBuf {
    let app = dir.join(name);
    std::fs::create_dir_all(app.join(".miren")).unwrap();
    std::fs::write(app.join(".miren/app.toml"), toml).unwrap();
    for (file, text) in files {
        std::fs::write(app.join(file), text).unwrap();
    }
    app
}

/// Writes app `name` in `dir` as [`write_app`] does and deploys it with `miren deploy`,
/// asserting success. Returns the app directory.
pub fn deploy(
    dir: &Path,
    agent: &AgentProcess,
    name: &str,
    toml: &str,
    files: &[(&str, &str)],
) -> PathBuf {
    let app = write_app(dir, name, toml, files);
    ok(agent, &["deploy", app.to_str().unwrap()]);
    app
}

/// Checks every 100 ms until `check` holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    wait(what, timeout, check, String::new);
}

/// [`wait_until`], with `agent`'s log in the panic message.
pub fn wait_until_logging(
    agent: &AgentProcess,
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> bool,
) {
    wait(what, timeout, check, || format!(":\n{}", agent.log_text()));
}

fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `miren app show APP --output json`.
pub fn app_detail(agent: &AgentProcess, app: &str) -> AppDetail {
    serde_json::from_str(&ok(agent, &["app", "show", app, "--output", "json"])).unwrap()
}

/// Addresses of the ready instances of `app`'s `service` on its port `port_name`
/// (`miren endpoints APP SERVICE --output json`).
pub fn endpoints(
    agent: &AgentProcess,
    app: &str,
    service: &str,
    port_name: &str,
) -> Vec<SocketAddr> {
    let text = ok(agent, &["endpoints", app, service, "--output", "json"]);
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = value[0]["endpoints"][port_name]
        .as_array()
        .cloned()
        .or_else(|| value["endpoints"][port_name].as_array().cloned())
        .unwrap_or_default();
    list.iter()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect()
}

/// Why an [`HttpClient`] request got no whole response. Shown as `connect: …`, `send: …` or
/// `receive: …`.
#[derive(Debug)]
pub enum HttpError {
    /// The connection did not open (refused, or not within the connect timeout).
    Connect(std::io::Error),
    /// Sending the request failed.
    Send(std::io::Error),
    /// Reading the response failed (or timed out) before the server closed the connection.
    Receive {
        /// The error.
        error: std::io::Error,
        /// What arrived before it.
        partial: Vec<u8>,
    },
}

impl Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "connect: {error}"),
            Self::Send(error) => write!(f, "send: {error}"),
            Self::Receive { error, .. } => write!(f, "receive: {error}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// How a test's plain HTTP/1.1 requests wait: one `GET` per connection, with
/// `Connection: close`, read until the server closes.
#[derive(Debug, Clone, Copy)]
pub struct HttpClient {
    /// How long connecting may take; `None`: as long as the system lets it.
    pub connect_timeout: Option<Duration>,
    /// How long each read of the response may wait.
    pub read_timeout: Duration,
}

impl HttpClient {
    /// `GET path` with `host` to `addr`, from the calling thread's namespace: the status (0
    /// when the server closed without a response) and the body.
    ///
    /// # Errors
    /// [`HttpError`] when connecting, sending or receiving failed.
    pub fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> Result<(u16, String), HttpError> {
        let mut stream = match self.connect_timeout {
            Some(timeout) => TcpStream::connect_timeout(&addr, timeout),
            None => TcpStream::connect(addr),
        }
        .map_err(HttpError::Connect)?;
        stream.set_read_timeout(Some(self.read_timeout)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .map_err(HttpError::Send)?;
        let mut raw = Vec::new();
        if let Err(error) = stream.read_to_end(&mut raw) {
            return Err(HttpError::Receive {
                error,
                partial: raw,
            });
        }
        let response = HttpResponse::parse(&raw);
        Ok((response.status, response.body))
    }

    /// `GET path` with `host` from the world's client through the node's ingress
    /// (`NODE_IP:80`): the status and body of what arrived, also when reading failed or timed
    /// out (status 0 when no response did).
    ///
    /// # Panics
    /// When the connection does not open or the request cannot be sent.
    pub fn get_via_ingress(&self, world: &World, host: &str, path: &str) -> (u16, String) {
        let ingress = SocketAddr::new(NODE_IP.parse().unwrap(), 80);
        let result = world.client.run(|| self.get(ingress, host, path)).unwrap();
        match result {
            Ok(response) => response,
            Err(HttpError::Receive { partial, .. }) => {
                let response = HttpResponse::parse(&partial);
                (response.status, response.body)
            }
            Err(error) => panic!("a request to the ingress: {error}"),
        }
    }
}

/// The network namespace of the instance with address `ip` that the agent with pid
/// `agent_pid` started (instance namespaces are `miren-s<agent pid in hex>x<n>`).
///
/// # Panics
/// When none of that agent's namespaces holds `ip`.
pub fn sandbox_netns(agent_pid: u32, ip: impl Display) -> String {
    let prefix = format!("miren-s{agent_pid:x}x");
    let inet = format!("inet {ip}/");
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .find(|name| {
            let addrs = Command::new("ip")
                .args(["-n", name, "-4", "addr", "show", "eth0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&addrs.stdout).contains(&inet)
        })
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no sandbox namespace holds {ip}"))
}

/// Pids of the processes in the network namespace `netns` (`ip netns pids`).
pub fn netns_pids(netns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Sends SIGKILL to every process in the network namespace `netns` (an instance dying).
pub fn kill9_netns(netns: &str) {
    for pid in netns_pids(netns) {
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
}

/// Runs `f` on a thread inside the network namespace `/run/netns/NETNS` (as an instance
/// would: the network rules are what is tested, not the container's privileges).
///
/// # Panics
/// When the namespace cannot be entered, or as `f` panics.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(format!("/run/netns/{netns}")).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Whether a TCP connection to `addr` opens within 3 s (from the calling thread's namespace).
pub fn tcp_connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
}

/// One UDP exchange with `addr` from a fresh socket: the reply, or `None` when none came
/// within `wait`.
pub fn udp_exchange(addr: SocketAddr, message: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    socket.send_to(message, addr).unwrap();
    let mut buf = [0u8; 2048];
    socket
        .recv_from(&mut buf)
        .ok()
        .map(|(n, _)| buf[..n].to_vec())
}
