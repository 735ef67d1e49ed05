//! The HTTP ingress under test: a network namespace of its own with the real agent listening
//! on 127.0.0.1:80/443 inside it, HTTP backends bound in the same namespace, and raw HTTP
//! clients (plus curl for HTTP/2) that speak to it from there.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use miren_agent::cli::Client;

use crate::{
    process::{AgentProcess, TempDir, binary},
    topology::Netns,
};

/// A namespace with the agent's ingress on 127.0.0.1:80 and :443.
#[derive(Debug)]
pub struct IngressWorld {
    /// The namespace everything runs in.
    pub ns: Netns,
    dir: TempDir,
}

/// A parsed HTTP/1 response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code (0 when the connection closed without a response).
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Parses a whole response (the connection was closed after it).
    pub fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Self {
            status,
            headers,
            body: body.to_owned(),
        }
    }
}

impl IngressWorld {
    /// A fresh namespace (loopback up) and state directory.
    pub fn new(tag: &str) -> Self {
        Self {
            ns: Netns::new(tag).expect("create namespace (needs root)"),
            dir: TempDir::new(tag),
        }
    }

    /// The test's directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts the agent in the namespace (no node-port data plane) with `extra` flags.
    pub fn start_agent(&self, extra: &[&str]) -> AgentProcess {
        let mut command: Command = self.ns.command(binary("miren-agent").to_str().unwrap());
        command.args(self.agent_args(extra));
        let log = self.dir.path().join("agent.log");
        AgentProcess::start(command, &self.api_socket(), &log)
    }

    /// The arguments of `miren-agent` that [`IngressWorld::start_agent`] runs: loopback
    /// listeners, no sandboxes, state and API socket in the world's directory, then `extra`.
    pub fn agent_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--http-addr",
            "127.0.0.1:80",
            "--https-addr",
            "127.0.0.1:443",
            "--metrics-addr",
            "127.0.0.1:9464",
            "--no-sandboxes",
            "--state-dir",
        ]
        .map(String::from)
        .into();
        args.push(self.dir.path().join("state").display().to_string());
        args.push("--api-socket".into());
        args.push(self.api_socket().display().to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// The agent's API socket.
    pub fn api_socket(&self) -> std::path::PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Deploys app `name` with one http service `web`.
    pub fn deploy_web(&self, agent: &AgentProcess, name: &str) {
        let app_dir = self.dir.path().join(name);
        std::fs::create_dir_all(app_dir.join(".miren")).unwrap();
        std::fs::write(
            app_dir.join(".miren/app.toml"),
            format!("name = \"{name}\"\n[services.web]\ncommand = \"true\"\nport = 8080\n"),
        )
        .unwrap();
        ok(agent, &["deploy", app_dir.to_str().unwrap()]);
    }

    /// `miren route set HOST APP EXTRA…`.
    pub fn route(&self, agent: &AgentProcess, host: &str, app: &str, extra: &[&str]) {
        let mut args = vec!["route", "set", host, app];
        args.extend(extra);
        ok(agent, &args);
    }

    /// Makes `backends` the endpoints of `app`'s web service.
    pub fn set_endpoints(&self, app: &str, backends: &[SocketAddr]) {
        let client = Client::new(self.dir.path().join("agent.sock"));
        let endpoints = miren_agent::api::types::ServiceEndpoints {
            service: "web".into(),
            endpoints: [("http".to_owned(), backends.to_vec())].into(),
            ..Default::default()
        };
        client
            .set_endpoints(app, "web", &endpoints)
            .expect("set endpoints");
    }

    /// Deploys app `name` with `backends` as its endpoints and routes `host` to it
    /// (`route_flags` go to `miren route set`).
    pub fn serve(
        &self,
        agent: &AgentProcess,
        name: &str,
        backends: &[SocketAddr],
        host: &str,
        route_flags: &[&str],
    ) {
        self.deploy_web(agent, name);
        self.set_endpoints(name, backends);
        self.route(agent, host, name, route_flags);
    }

    /// A TCP connection from inside the namespace to 127.0.0.1:`port`.
    pub fn connect(&self, port: u16) -> TcpStream {
        let stream = self
            .ns
            .run(|| TcpStream::connect(("127.0.0.1", port)))
            .unwrap()
            .expect("connect to the ingress");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
    }

    /// Sends `raw` to port 80 and reads the response until the connection closes.
    pub fn send(&self, raw: &[u8]) -> HttpResponse {
        let mut stream = self.connect(80);
        stream.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        HttpResponse::parse(&out)
    }

    /// `GET PATH` for `host` on port 80 with `extra` header lines.
    pub fn get(&self, host: &str, path: &str, extra: &[&str]) -> HttpResponse {
        let mut raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for line in extra {
            raw.push_str(line);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        self.send(raw.as_bytes())
    }

    /// Runs curl inside the namespace.
    pub fn curl(&self, args: &[&str]) -> Output {
        self.ns
            .command("curl")
            .args(args)
            .output()
            .expect("run curl (package curl)")
    }

    /// The agent's /metrics text.
    pub fn metrics(&self) -> String {
        let out = self.curl(&["-sS", "http://127.0.0.1:9464/metrics"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs the CLI, asserting success (else failing with the agent's log); returns stdout.
pub fn ok(agent: &AgentProcess, args: &[&str]) -> String {
    let out = agent.miren(args);
    assert!(
        out.status.success(),
        "miren {args:?} failed:\n{}\nthe agent's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How a test backend behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMode {
    /// Answers every request with its name; `/slow` waits 3 s first; an `Upgrade` request
    /// gets 101 and then every byte echoed.
    Normal,
    /// Reads requests and never answers.
    Silent,
}

/// What a backend saw.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections accepted.
    pub accepts: AtomicUsize,
    /// Requests answered or swallowed.
    pub requests: AtomicUsize,
    /// Every request head received, in order.
    pub heads: Mutex<Vec<String>>,
}

/// An HTTP/1.1 backend on 127.0.0.1 inside a namespace, on its own threads.
#[derive(Debug)]
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<BackendStats>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Starts a backend called `name` in `ns`.
    pub fn start(ns: &Netns, name: &str, mode: BackendMode) -> Self {
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BackendStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (name, thread_stats, thread_stop) = (name.to_owned(), stats.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if thread_stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                thread_stats.accepts.fetch_add(1, Ordering::Relaxed);
                let (name, stats) = (name.clone(), thread_stats.clone());
                std::thread::spawn(move || serve_connection(conn, &name, mode, &stats));
            }
        });
        Self { addr, stats, stop }
    }

    /// Requests seen so far.
    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// The request heads seen so far.
    pub fn heads(&self) -> Vec<String> {
        self.stats.heads.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An address in `ns` where nothing listens (connections are refused).
pub fn refused_addr(ns: &Netns) -> SocketAddr {
    ns.run(|| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    })
    .unwrap()
}

fn serve_connection(mut conn: TcpStream, name: &str, mode: BackendMode, stats: &BackendStats) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut conn, &mut buf) else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.heads.lock().unwrap().push(head.clone());
        if mode == BackendMode::Silent {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        if head.to_ascii_lowercase().contains("\r\nupgrade: websocket") {
            let _ = conn.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            );
            let _ = conn.write_all(&buf);
            let mut chunk = [0u8; 4096];
            while let Ok(n) = conn.read(&mut chunk) {
                if n == 0 || conn.write_all(&chunk[..n]).is_err() {
                    return;
                }
            }
            return;
        }
        if path == "/slow" {
            std::thread::sleep(Duration::from_secs(3));
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\r\n{name}",
            name.len()
        );
        if conn.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads until `buf` holds a whole request head; returns its length (with the blank line).
fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one HTTP/1 response from a kept-alive connection: the head, then a body framed by
/// `Content-Length` or chunked encoding (none for 1xx, 204 and 304, and for a `HEAD` when
/// `head_request`), leaving `reader` at the start of the next response. A response framed by
/// neither is read until the connection closes.
///
/// # Errors
/// Read errors, or [`std::io::ErrorKind::UnexpectedEof`] if the connection closes before a
/// whole response arrived.
pub fn read_response(
    reader: &mut impl std::io::BufRead,
    head_request: bool,
) -> std::io::Result<HttpResponse> {
    use std::io::{Error, ErrorKind};
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if reader.read_until(b'\n', &mut head)? == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {:?} of a response head",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
    }
    let mut response = HttpResponse::parse(&head);
    let no_body = head_request || matches!(response.status, 100..=199 | 204 | 304);
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    let mut body = Vec::new();
    if no_body {
    } else if chunked {
        while let Some(size) = read_chunk_size(reader)? {
            let size = usize::try_from(size)
                .map_err(|_| Error::new(ErrorKind::InvalidData, "chunk too large"))?;
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    response.body = String::from_utf8_lossy(&body).into_owned();
    Ok(response)
}

/// Reads a chunked body's next chunk-size line; `None` at the last chunk, whose trailer
/// fields (up to the blank line) are read too.
///
/// # Errors
/// When reading fails or the line is not a chunk size.
pub fn read_chunk_size(reader: &mut impl std::io::BufRead) -> std::io::Result<Option<u64>> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let size =
        u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("chunk size {line:?}"),
            )
        })?;
    if size > 0 {
        return Ok(Some(size));
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            return Ok(None);
        }
    }
}
