//! ACME against a real Pebble (Debian package `pebble`), all inside a network namespace this
//! test creates: pebble (its HTTPS directory on a certificate from a CA made here, trusted by
//! the agent through `--acme-ca-file`), pebble-challtestsrv as pebble's DNS resolving every
//! name to 127.0.0.1, and the agent with its HTTP listener on pebble's `httpPort` (80).
//!
//! - `acme_http01_certificate_issued_and_served`: pebble validates HTTP-01 against the agent's
//!   ingress; the issued certificate is served on the next handshake to --https-addr (leaf SAN
//!   and pebble's issuer checked with a rustls client) and the unrouted host still gets the
//!   fallback. Needs the ingress core (HTTP listener answering the challenge, TLS listener on
//!   `CertStore::resolver()`).
//! - `acme_orders_routed_hosts_only_and_reuses_its_account`: pebble with
//!   `PEBBLE_VA_ALWAYS_VALID=1` (no challenge fetch), so it exercises the ACME client alone:
//!   the routed host gets an `acme` certificate, the unrouted one is never ordered, and a
//!   restarted agent reuses the account it stored in the cluster's store. `/metrics` counts
//!   the one issued order and has the certificate's expiry.
//!
//! Root is needed for the namespace. A missing pebble binary fails the test with the reason.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use miren_agent::api::types::{CertInfo, CertSource};
use miren_tests::{
    pebble::Pebble,
    process::{AgentProcess, TempDir, binary},
    tls::served_leaf,
    topology::Netns,
};

const ROUTED: &str = "app.example.com";
const UNROUTED: &str = "other.example.com";
const HTTPS: &str = "127.0.0.1:443";

const APP: &str = "name = \"web\"\n\n[services.web]\ncommand = \"./web\"\nport = 3000\n";

/// Pebble, its DNS and the agent in one namespace.
struct AcmeWorld {
    // Field order is drop order: processes before the namespace.
    agent: Option<AgentProcess>,
    pebble: Pebble,
    netns: Netns,
    dir: TempDir,
}

impl AcmeWorld {
    /// Starts pebble (with `pebble_env`) and its DNS in a new namespace, then the agent.
    fn new(tag: &str, pebble_env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(tag);
        let netns = Netns::new(tag).expect("create the test namespace (run as root)");
        let pebble = Pebble::start(
            &netns,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            dir.path(),
            pebble_env,
        );
        let mut world = Self {
            agent: None,
            pebble,
            netns,
            dir,
        };
        world.start_agent();
        world
    }

    fn start_agent(&mut self) {
        let socket = self.dir.path().join("agent.sock");
        let mut command = self.netns.command(binary("miren-agent").to_str().unwrap());
        command
            .args(["run", "--config", "/dev/null", "--no-sandboxes"])
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--api-socket")
            .arg(&socket)
            .args([
                "--http-addr",
                "127.0.0.1:80",
                "--https-addr",
                HTTPS,
                "--metrics-addr",
                "127.0.0.1:9464",
                "--acme-directory",
                &self.pebble.directory(),
                "--acme-email",
                "ops@example.com",
            ])
            .arg("--acme-ca-file")
            .arg(self.pebble.ca_file())
            .env("RUST_LOG", "info");
        self.agent = None;
        self.agent = Some(AgentProcess::start(
            command,
            &socket,
            &self.dir.path().join("agent.log"),
        ));
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent running")
    }

    /// The logs of everything, for failure messages.
    fn logs(&self) -> String {
        let agent = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        format!("--- agent.log ---\n{agent}{}", self.pebble.logs())
    }

    /// Deploys a one-service app and routes ROUTED to it.
    fn route(&self) {
        let app_dir = self.dir.path().join("app");
        std::fs::create_dir_all(app_dir.join(".miren")).unwrap();
        std::fs::write(app_dir.join(".miren/app.toml"), APP).unwrap();
        let out = self.agent().miren(&["deploy", app_dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let out = self.agent().miren(&["route", "set", ROUTED, "web"]);
        assert!(out.status.success(), "{out:?}");
    }

    fn certs(&self) -> Vec<CertInfo> {
        let out = self.agent().miren(&["--output", "json", "cert", "list"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits up to 60 s for an ACME certificate for ROUTED.
    fn wait_for_acme_cert(&self) -> CertInfo {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(info) = self.certs().into_iter().find(|c| c.host == ROUTED) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "no ACME certificate for {ROUTED} within 60 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The agent's `/metrics`, scraped from inside the namespace.
    fn metrics(&self) -> String {
        let out = self
            .netns
            .command("curl")
            .args(["-sS", "http://127.0.0.1:9464/metrics"])
            .output()
            .expect("run curl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn agent_log(&self) -> String {
        self.agent().log_text()
    }

    fn account_dir(&self) -> PathBuf {
        self.dir.path().join("state/acme")
    }
}

/// The account URL of the agent's "ACME account ready" log line.
fn account_id(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("ACME account ready"))?;
    let rest = &line[line.find("account=")? + "account=".len()..];
    Some(rest.split_whitespace().next()?.to_owned())
}

/// Seconds since the Unix epoch of a UTC RFC 3339 time as `miren cert list` shows it
/// (`2026-03-01T12:00:00Z`).
fn unix_of_rfc3339(text: &str) -> i64 {
    let number = |range: std::ops::Range<usize>| -> i64 { text[range].parse().unwrap() };
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let (hour, minute, second) = (number(11..13), number(14..16), number(17..19));
    // Days from civil (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + hour * 3_600 + minute * 60 + second
}

fn assert_only_routed(world: &AcmeWorld, info: &CertInfo) {
    assert_eq!(info.source, CertSource::Acme);
    assert_eq!(info.sans, [ROUTED]);
    let hosts: Vec<String> = world.certs().into_iter().map(|c| c.host).collect();
    assert_eq!(hosts, [ROUTED], "only the routed host has a certificate");
    let log = world.agent_log();
    assert!(
        !log.contains(UNROUTED),
        "the unrouted host was mentioned (requested?):\n{log}"
    );
}

#[test]
fn acme_orders_routed_hosts_only_and_reuses_its_account() {
    let mut world = AcmeWorld::new("acme-client", &[("PEBBLE_VA_ALWAYS_VALID", "1")]);
    world.route();
    let info = world.wait_for_acme_cert();
    assert_only_routed(&world, &info);
    let log = world.agent_log();
    let account = account_id(&log).unwrap_or_else(|| panic!("no account in the log:\n{log}"));
    assert!(log.contains("ACME certificate issued"), "{log}");
    // One order, issued; the certificate the ingress holds has its expiry series.
    let metrics = world.metrics();
    let expiry = format!(
        "miren_cert_expiry_timestamp_seconds{{host=\"{ROUTED}\"}} {}",
        unix_of_rfc3339(&info.not_after)
    );
    for line in [
        "miren_acme_orders_total{outcome=\"issued\"} 1",
        "miren_acme_orders_total{outcome=\"invalid\"} 0",
        "miren_acme_orders_total{outcome=\"failed\"} 0",
        &expiry,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line} in\n{metrics}"
        );
    }
    assert!(!metrics.contains(UNROUTED), "{metrics}");

    // A restart keeps the certificate and the account: nothing new is ordered or created.
    world.start_agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !world.agent_log().contains("ACME account ready") {
        assert!(Instant::now() < deadline, "{}", world.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(world.certs(), vec![info]);
    // The account is the cluster's, in the store: the restarted agent uses the same one.
    assert_eq!(account_id(&world.agent_log()), Some(account));
    assert!(
        !world.account_dir().join("account.json").exists(),
        "the account is kept in the store, not in a file"
    );
    std::thread::sleep(Duration::from_secs(1));
    let log = world.agent_log();
    assert!(!log.contains("ordering an ACME certificate"), "{log}");
}

#[test]
fn acme_http01_certificate_issued_and_served() {
    let world = AcmeWorld::new("acme-http01", &[]);
    world.route();
    let info = world.wait_for_acme_cert();
    assert_only_routed(&world, &info);

    let https: SocketAddr = HTTPS.parse().unwrap();
    let (routed, unrouted) = world
        .netns
        .run(|| (served_leaf(https, ROUTED), served_leaf(https, UNROUTED)))
        .unwrap();
    let routed = routed.unwrap_or_else(|e| panic!("handshake for {ROUTED}: {e}\n{}", world.logs()));
    assert_eq!(routed.dns_names, [ROUTED]);
    assert!(
        routed.issuer.contains("Pebble Intermediate CA"),
        "issuer {}",
        routed.issuer
    );
    assert!(routed.chain_len >= 2, "the intermediate is sent too");
    let unrouted = unrouted.unwrap_or_else(|e| panic!("handshake for {UNROUTED}: {e}"));
    assert!(
        !unrouted.dns_names.contains(&UNROUTED.to_owned()) && !unrouted.issuer.contains("Pebble"),
        "{unrouted:?}"
    );
}
