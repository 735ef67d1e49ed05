//! A real ACME server for tests: Pebble and its DNS, pebble-challtestsrv (Debian package
//! `pebble`), started in a network namespace the test created. Pebble serves its directory
//! over HTTPS on a certificate from a CA made here (agents trust it with `--acme-ca-file`),
//! resolves names through pebble-challtestsrv and validates HTTP-01 on port 80 of the address
//! a name resolves to. Both processes are killed by PID on drop.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::{
    tls::TestCa,
    topology::{ChildGuard, Netns},
};

/// The Pebble binary.
pub const PEBBLE: &str = "/usr/bin/pebble";
/// Pebble's DNS (and challenge) test server.
pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";
/// Pebble's ACME port.
const ACME_PORT: u16 = 14000;
/// pebble-challtestsrv's DNS port.
const DNS_PORT: u16 = 8053;
/// pebble-challtestsrv's management port (`/add-a`).
const DNS_MANAGEMENT_PORT: u16 = 8055;

/// Pebble and its DNS, running in one namespace.
#[derive(Debug)]
pub struct Pebble {
    // Field order is drop order: processes first.
    _pebble: ChildGuard,
    _dns: ChildGuard,
    ip: Ipv4Addr,
    dir: PathBuf,
}

impl Pebble {
    /// Starts pebble-challtestsrv (answering every name with `default_ip` unless
    /// [`Pebble::add_a`] says otherwise) and pebble, both listening on `ip` in `netns`, with
    /// `pebble_env` added to pebble's environment; files and logs go to `dir`. Waits until
    /// both listen.
    ///
    /// # Panics
    /// If the `pebble` package is missing or a process does not start or listen within 20 s.
    pub fn start(
        netns: &Netns,
        ip: Ipv4Addr,
        default_ip: Ipv4Addr,
        dir: &Path,
        pebble_env: &[(&str, &str)],
    ) -> Self {
        for tool in [PEBBLE, CHALLTESTSRV] {
            assert!(
                Path::new(tool).is_file(),
                "{tool} is missing: this test needs the Debian package `pebble` (cargo xtask setup installs it)"
            );
        }
        let ca = TestCa::new("miren test ACME server CA");
        let server = ca.issue(&[&ip.to_string(), "localhost"]);
        std::fs::write(dir.join("acme-ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("pebble.crt"), &server.cert).unwrap();
        std::fs::write(dir.join("pebble.key"), &server.key).unwrap();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{ip}:{ACME_PORT}"),
                "managementListenAddress": format!("{ip}:15000"),
                "certificate": dir.join("pebble.crt"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": 80,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        std::fs::write(
            dir.join("pebble.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        let log =
            |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).expect("create log"));

        let mut dns = netns.command(CHALLTESTSRV);
        dns.args(["-dns01", &format!("{ip}:{DNS_PORT}")])
            .args(["-defaultIPv4", &default_ip.to_string(), "-defaultIPv6", ""])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("{ip}:{DNS_MANAGEMENT_PORT}")])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"));
        let dns = netns.spawn(&mut dns).expect("start pebble-challtestsrv");
        let mut pebble = netns.command(PEBBLE);
        pebble
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("{ip}:{DNS_PORT}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .envs(pebble_env.iter().copied())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"));
        let pebble = netns.spawn(&mut pebble).expect("start pebble");
        let started = Self {
            _pebble: pebble,
            _dns: dns,
            ip,
            dir: dir.to_owned(),
        };
        for (port, what) in [
            (ACME_PORT, "pebble"),
            (DNS_MANAGEMENT_PORT, "pebble-challtestsrv"),
        ] {
            let addr = SocketAddr::from((ip, port));
            let up = netns
                .run(|| {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while Instant::now() < deadline {
                        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                            return true;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    false
                })
                .unwrap();
            assert!(
                up,
                "{what} did not listen on {addr} within 20 s\n{}",
                started.logs()
            );
        }
        started
    }

    /// The ACME directory URL (`--acme-directory`).
    pub fn directory(&self) -> String {
        format!("https://{}:{ACME_PORT}/dir", self.ip)
    }

    /// The CA certificate Pebble's HTTPS is verified with (`--acme-ca-file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("acme-ca.pem")
    }

    /// Makes pebble's DNS resolve `host` to `addr` (run from `netns`, pebble's namespace).
    ///
    /// # Panics
    /// If pebble-challtestsrv does not accept it.
    pub fn add_a(&self, netns: &Netns, host: &str, addr: Ipv4Addr) {
        let body = serde_json::json!({ "host": host, "addresses": [addr.to_string()] }).to_string();
        let management = SocketAddr::from((self.ip, DNS_MANAGEMENT_PORT));
        let answer = netns
            .run(|| -> std::io::Result<String> {
                let mut stream = TcpStream::connect_timeout(&management, Duration::from_secs(5))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(
                    stream,
                    "POST /add-a HTTP/1.1\r\nHost: {management}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer)?;
                Ok(answer)
            })
            .unwrap()
            .expect("ask pebble-challtestsrv");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "add-a {host} {addr}: {answer}"
        );
    }

    /// The highest count in pebble's `There are now N WHAT` lines (`WHAT`: `accounts in
    /// memory`, `orders in the db`): how many Pebble created.
    pub fn created(&self, what: &str) -> usize {
        let suffix = format!(" {what}");
        self.logs()
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once("There are now ")?;
                rest.strip_suffix(&suffix)?.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// Pebble's and its DNS's logs, for failure messages.
    pub fn logs(&self) -> String {
        ["pebble.log", "pebble.err", "challtestsrv.err"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
                format!("--- {name} ---\n{text}")
            })
            .collect()
    }
}
