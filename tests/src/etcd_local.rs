//! A single etcd member (Debian's `etcd-server`) on the host's loopback, for tests of the
//! agent's etcd store that need no topology: free random client and peer ports on
//! `127.0.0.1`, a temporary data directory, plain HTTP or TLS with client certificates.
//!
//! The member is started with `PR_SET_PDEATHSIG` = SIGKILL (it dies with the thread that
//! started it if the test process is killed) and killed by its PID on drop, also when the
//! test panics; never by name.

use std::{
    io,
    net::{Ipv4Addr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{cluster::ETCD_BINARY, process::TempDir, tls::TestCa};

/// How long the member may take to serve clients.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a start is retried when a picked port was taken in the meantime.
const START_ATTEMPTS: usize = 3;

/// TLS material for a member that requires client certificates, written as PEM files: a
/// throwaway CA, the server's certificate (for `127.0.0.1` and `localhost`) and a client
/// certificate, both signed by the CA.
#[derive(Debug)]
pub struct EtcdTls {
    dir: TempDir,
}

impl EtcdTls {
    /// Makes a CA, a server and a client certificate in a new temporary directory.
    ///
    /// # Panics
    /// If a file cannot be written.
    pub fn new() -> Self {
        let dir = TempDir::new("etcd-tls");
        let ca = TestCa::new("miren test etcd CA");
        let server = ca.issue(&["127.0.0.1", "localhost"]);
        let client = ca.issue(&["miren-agent"]);
        let tls = Self { dir };
        for (path, pem) in [
            (tls.ca(), ca.cert_pem()),
            (tls.server_cert(), server.cert),
            (tls.server_key(), server.key),
            (tls.client_cert(), client.cert),
            (tls.client_key(), client.key),
        ] {
            std::fs::write(&path, pem)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        tls
    }

    /// The CA certificate (what clients and the server trust).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server's certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// A client certificate the server accepts.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// The client certificate's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
}

impl Default for EtcdTls {
    fn default() -> Self {
        Self::new()
    }
}

/// One etcd member on loopback; killed by PID and reaped on drop.
#[derive(Debug)]
pub struct LocalEtcd {
    child: Option<Child>,
    endpoint: String,
    log: PathBuf,
    dir: TempDir,
}

impl LocalEtcd {
    /// Starts a member serving plain HTTP and waits until it serves clients.
    ///
    /// # Panics
    /// If etcd cannot be started or does not serve within 30 s (with its log).
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a member serving only HTTPS with `tls`'s server certificate, requiring client
    /// certificates signed by `tls`'s CA (`--client-cert-auth`).
    ///
    /// # Panics
    /// As [`LocalEtcd::start`].
    pub fn start_tls(tls: &EtcdTls) -> Self {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&EtcdTls>) -> Self {
        let dir = TempDir::new("etcd-local");
        let mut last_log = String::new();
        for attempt in 0..START_ATTEMPTS {
            let (mut child, endpoint, log) = spawn(dir.path(), attempt, tls);
            match wait_serving(&mut child, &log) {
                Ok(()) => {
                    return Self {
                        child: Some(child),
                        endpoint,
                        log,
                        dir,
                    };
                }
                Err(text) => {
                    stop(child);
                    last_log = text;
                    // Another process took a picked port before etcd bound it: pick others.
                    if !last_log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("etcd did not start serving clients:\n{last_log}");
    }

    /// The client URL (`http://127.0.0.1:PORT`, or `https://` with TLS).
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// The etcd process's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of the member's log, for failure messages.
    pub fn logs(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The temporary directory with the data directory and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the member (SIGKILL to its PID) and reaps it.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child);
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts attempt `attempt` of a member with its data and log in `dir`; returns the process,
/// its client URL and its log file.
fn spawn(dir: &Path, attempt: usize, tls: Option<&EtcdTls>) -> (Child, String, PathBuf) {
    let (client_port, peer_port) = free_ports();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let log = dir.join(format!("etcd-{attempt}.log"));
    let mut command = Command::new(ETCD_BINARY);
    command
        .args(["--name", "local"])
        .arg("--data-dir")
        .arg(dir.join(format!("data-{attempt}")))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("local={peer}")])
        .args(["--initial-cluster-state", "new"])
        .args(["--logger", "zap", "--log-outputs", "stderr"]);
    if let Some(tls) = tls {
        command
            .arg("--cert-file")
            .arg(tls.server_cert())
            .arg("--key-file")
            .arg(tls.server_key())
            .arg("--trusted-ca-file")
            .arg(tls.ca())
            .arg("--client-cert-auth");
    }
    let file = std::fs::File::create(&log).expect("create etcd log");
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone etcd log"))
        .stderr(file);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {ETCD_BINARY} (apt-get install etcd-server): {e}"));
    (child, endpoint, log)
}

/// Waits until `log` says the member serves clients (it has elected itself leader by then);
/// the log's tail if it exits or takes too long.
fn wait_serving(child: &mut Child, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("serving client traffic") {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("etcd exited ({status}):\n{}", tail(&text)));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "etcd did not serve within {START_TIMEOUT:?}:\n{}",
                tail(&text)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills `child` (SIGKILL to its PID; it is not reaped yet, so the PID is still its own) and
/// reaps it.
fn stop(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// Two ports free on loopback right now (both bound at once, so they differ).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local address").port();
    (port(&a), port(&b))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
