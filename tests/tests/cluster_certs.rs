//! Certificates and ACME in cluster mode: three node namespaces and a client namespace on one
//! fabric, a real 3-member etcd (a member per node), a real agent per node (`--no-sandboxes`:
//! the ingress serves TLS whether or not anything runs behind a route).
//!
//! - `a_certificate_set_on_one_node_is_served_by_every_node`: `miren cert set` through node 0;
//!   nodes 1 and 2 list it and their ingress presents it by SNI (a rustls client in the client
//!   namespace); a replacement set through node 2 reaches node 0's ingress.
//! - `one_node_orders_acme_certificates_and_another_answers_the_challenge`: Pebble and its DNS
//!   in the client namespace, `--acme-directory` on every agent. Only the holder of the `acme`
//!   role (read from etcd) creates an account and an order in Pebble; the routed host resolves
//!   (Pebble's DNS) to another node only, so validation succeeds only if that node's ingress
//!   answers from the challenge the holder published in the shared state; every node then
//!   serves the certificate. After the holder is killed (kill -9), another node takes the role
//!   when its lease ends and orders the next routed host's certificate, again validated through
//!   a node other than itself.
//!
//! Root is needed for the namespaces. Only processes the test started are stopped, by PID.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use miren_agent::api::types::{CertInfo, CertSource};
use miren_tests::{
    apps::write_app,
    cluster::{CLIENT_IP, EtcdCluster, Fabric, node_ip},
    cluster_agents::{ClusterAgents, node_name},
    ingress::ok,
    pebble::Pebble,
    process::TempDir,
    tls::{ServedLeaf, self_signed, served_leaf},
};

/// Nodes (and etcd members).
const NODES: usize = 3;
/// The role's key in etcd (`--etcd-prefix` /miren, `leader/acme`).
const ACME_ROLE_KEY: &str = "/miren/leader/acme";
/// An address on the fabric nobody has: names Pebble's DNS was not told about go nowhere.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 250);
/// How long an ACME certificate or a takeover may take.
const WAIT: Duration = Duration::from_secs(90);

/// The app the routes point at (nothing needs to run: validation and TLS are the ingress's).
const APP: &str = "name = \"web\"\n\n[services.web]\ncommand = \"./web\"\nport = 3000\n";

/// The cluster under test.
struct Cluster {
    // Dropped in this order: agents, Pebble, etcd, the namespaces, the files.
    agents: ClusterAgents,
    pebble: Option<Pebble>,
    etcd: EtcdCluster,
    fabric: Fabric,
    _dir: TempDir,
}

impl Cluster {
    /// Starts the fabric, etcd and, with `acme`, Pebble in the client namespace, then the
    /// agents (pointed at Pebble with `acme`).
    fn start(tag: &str, acme: bool) -> Self {
        let dir = TempDir::new(tag);
        let fabric = Fabric::new(tag, NODES, true).expect("fabric");
        let etcd = EtcdCluster::start(&fabric, NODES);
        let pebble = acme.then(|| {
            Pebble::start(
                fabric.client().expect("client namespace"),
                CLIENT_IP,
                NOWHERE,
                dir.path(),
                &[],
            )
        });
        let mut flags = vec!["--no-sandboxes".to_owned()];
        if let Some(pebble) = &pebble {
            flags.extend([
                "--acme-directory".to_owned(),
                pebble.directory(),
                "--acme-email".to_owned(),
                "ops@example.com".to_owned(),
                "--acme-ca-file".to_owned(),
                pebble.ca_file().to_string_lossy().into_owned(),
            ]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agents = ClusterAgents::start(&fabric, &etcd, NODES, &flags);
        Self {
            agents,
            pebble,
            etcd,
            fabric,
            _dir: dir,
        }
    }

    fn pebble(&self) -> &Pebble {
        self.pebble.as_ref().expect("started with ACME")
    }

    /// Every running agent's log and Pebble's, for failure messages.
    fn logs(&self) -> String {
        let pebble = self.pebble.as_ref().map(Pebble::logs).unwrap_or_default();
        format!("{}{pebble}", self.agents.logs())
    }

    /// Node `i`'s agent log.
    fn log(&self, i: usize) -> String {
        self.agents.agent(i).log_text()
    }

    /// `miren cert list` on node `i`.
    fn certs(&self, i: usize) -> Vec<CertInfo> {
        let listed = ok(self.agents.agent(i), &["--output", "json", "cert", "list"]);
        serde_json::from_str(&listed).expect("cert list JSON")
    }

    /// The leaf node `i`'s ingress presents for SNI `host`, from the client namespace.
    fn served(&self, i: usize, host: &str) -> Result<ServedLeaf, String> {
        let addr = SocketAddr::from((node_ip(i), 443));
        let client = self.fabric.client().expect("client namespace");
        client
            .run(|| served_leaf(addr, host))
            .expect("run in the client namespace")
            .map_err(|err| format!("handshake with node{i} for {host}: {err}"))
    }

    /// Waits until node `i`'s ingress presents a leaf for `host` that `check` accepts.
    fn wait_served(&self, i: usize, host: &str, check: impl Fn(&ServedLeaf) -> bool) -> ServedLeaf {
        eventually(
            &format!("node{i} to serve {host}"),
            WAIT,
            || self.logs(),
            || self.served(i, host).ok().filter(|leaf| check(leaf)),
        )
    }

    /// The node holding the `acme` role, as etcd has it.
    fn acme_holder(&self) -> Option<usize> {
        let value = self.etcd.get(0, ACME_ROLE_KEY).ok()??;
        let leader: serde_json::Value = serde_json::from_str(&value).ok()?;
        let node = leader["node"].as_str()?;
        (0..NODES).find(|&i| node_name(i) == node)
    }

    /// Routes `host` to the app through node `i`.
    fn route(&self, i: usize, host: &str) {
        ok(self.agents.agent(i), &["route", "set", host, "web"]);
    }

    /// How many times node `i` logged that it orders a certificate for `host`.
    fn orders_logged(&self, i: usize, host: &str) -> usize {
        self.log(i)
            .lines()
            .filter(|line| line.contains("ordering an ACME certificate") && line.contains(host))
            .count()
    }

    /// How many HTTP-01 requests node `i`'s ingress answered with the key authorization.
    fn challenges_answered(&self, i: usize) -> usize {
        self.log(i)
            .lines()
            .filter(|line| {
                line.contains("miren::access")
                    && line.contains("/.well-known/acme-challenge/")
                    && line.contains("status=200")
            })
            .count()
    }
}

/// Polls `check` every 200 ms until it gives a value; panics naming `what` with `logs()`
/// after `timeout`.
fn eventually<T>(
    what: &str,
    timeout: Duration,
    logs: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_certificate_set_on_one_node_is_served_by_every_node() {
    let cluster = Cluster::start("ccert-set", false);
    let host = "shop.example.com";
    let first = self_signed(&[host]);
    let (cert, key) = first.write(cluster.agents.dir(), "first");
    ok(
        cluster.agents.agent(0),
        &["cert", "set", host, "--cert", &cert, "--key", &key],
    );
    for i in 1..NODES {
        let leaf = cluster.wait_served(i, host, |leaf| leaf.dns_names == [host]);
        assert_eq!(leaf.chain_len, 1);
        let listed = cluster.certs(i);
        assert_eq!(listed.len(), 1, "node{i}: {listed:?}");
        assert_eq!(listed[0].host, host);
        assert_eq!(listed[0].source, CertSource::User);
        // An unknown name still gets the self-signed fallback.
        let other = cluster.served(i, "other.example.com").unwrap();
        assert!(!other.dns_names.contains(&host.to_owned()), "{other:?}");
    }

    // Replaced through node 2: node 0's ingress swaps to it without a restart.
    let second = self_signed(&[host, "www.shop.example.com"]);
    let (cert, key) = second.write(cluster.agents.dir(), "second");
    ok(
        cluster.agents.agent(2),
        &["cert", "set", host, "--cert", &cert, "--key", &key],
    );
    cluster.wait_served(0, host, |leaf| {
        leaf.dns_names == [host, "www.shop.example.com"]
    });
    assert_eq!(
        cluster.certs(0)[0].sans,
        [host, "www.shop.example.com"],
        "node0 lists the replacement"
    );
}

/// Waits until every node in `nodes` lists an ACME certificate for `host` and serves it by
/// SNI with Pebble as the issuer.
fn wait_everywhere(cluster: &Cluster, nodes: &[usize], host: &str) {
    for &i in nodes {
        let info = eventually(
            &format!("node{i} to list an ACME certificate for {host}"),
            WAIT,
            || cluster.logs(),
            || cluster.certs(i).into_iter().find(|c| c.host == host),
        );
        assert_eq!(info.source, CertSource::Acme);
        assert_eq!(info.sans, [host]);
        let leaf = cluster.wait_served(i, host, |leaf| leaf.dns_names == [host]);
        assert!(
            leaf.issuer.contains("Pebble Intermediate CA"),
            "node{i}: issuer {}",
            leaf.issuer
        );
    }
}

/// Asserts that of `nodes`, only `holder` ordered `host` (once), and only `answerer` answered
/// HTTP-01 requests since `before` (each node's count then, in the order of `nodes`).
fn assert_roles(
    cluster: &Cluster,
    nodes: &[usize],
    host: &str,
    holder: usize,
    answerer: usize,
    before: &[usize],
) {
    for (&i, before) in nodes.iter().zip(before) {
        assert_eq!(
            cluster.orders_logged(i, host),
            usize::from(i == holder),
            "node{i}'s orders of {host} (holder node{holder})\n{}",
            cluster.logs()
        );
        let answered = cluster.challenges_answered(i) - before;
        assert!(
            (i == answerer) == (answered >= 1),
            "node{i} answered {answered} challenges for {host} (answerer node{answerer})\n{}",
            cluster.logs()
        );
    }
}

#[test]
fn one_node_orders_acme_certificates_and_another_answers_the_challenge() {
    let mut cluster = Cluster::start("ccert-acme", true);
    let holder = eventually(
        "a node to take the acme role",
        WAIT,
        || cluster.logs(),
        || cluster.acme_holder(),
    );
    // The host resolves (for Pebble) to another node only: the holder never sees the
    // validation request.
    let answerer = (holder + 1) % NODES;
    let host = "app.example.com";
    let client = cluster.fabric.client().expect("client namespace");
    cluster.pebble().add_a(client, host, node_ip(answerer));
    let app = write_app(cluster.agents.dir(), "web", APP, &[]);
    ok(cluster.agents.agent(0), &["deploy", app.to_str().unwrap()]);
    cluster.route(0, host);

    let all: Vec<usize> = (0..NODES).collect();
    wait_everywhere(&cluster, &all, host);
    assert_eq!(cluster.acme_holder(), Some(holder), "the role stayed put");
    assert_roles(&cluster, &all, host, holder, answerer, &[0; NODES]);
    assert_eq!(
        cluster.pebble().created("accounts in memory"),
        1,
        "only the holder has an account\n{}",
        cluster.logs()
    );
    assert_eq!(cluster.pebble().created("orders in the db"), 1);

    // The holder dies: another node takes the role when its lease ends and orders the next
    // host, validated through the remaining other node.
    cluster.agents.kill9(holder);
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != holder).collect();
    let successor = eventually(
        "another node to take the acme role",
        WAIT,
        || cluster.logs(),
        || cluster.acme_holder().filter(|&i| i != holder),
    );
    let answerer = survivors
        .iter()
        .copied()
        .find(|&i| i != successor)
        .expect("a survivor other than the new holder");
    let before: Vec<usize> = survivors
        .iter()
        .map(|&i| cluster.challenges_answered(i))
        .collect();
    let next = "next.example.com";
    cluster.pebble().add_a(client, next, node_ip(answerer));
    cluster.route(survivors[0], next);
    wait_everywhere(&cluster, &survivors, next);
    assert_roles(&cluster, &survivors, next, successor, answerer, &before);
    // The first host's certificate is still served by the survivors, and was not ordered
    // again.
    for &i in &survivors {
        cluster.wait_served(i, host, |leaf| leaf.dns_names == [host]);
        assert_eq!(cluster.orders_logged(i, host), 0);
    }
    assert_eq!(cluster.pebble().created("orders in the db"), 2);
    // The successor ordered with the cluster's account from the store: still one account.
    assert_eq!(
        cluster.pebble().created("accounts in memory"),
        1,
        "the new holder created an account of its own\n{}",
        cluster.logs()
    );
}
