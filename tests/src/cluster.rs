//! Cluster test topologies: a [`Fabric`] (node namespaces, and optionally a client namespace,
//! on one bridge, like machines on one L2 segment) and an [`EtcdCluster`] of real `etcd`
//! members (Debian's `etcd-server`), one per node namespace, started and stopped by the test.
//!
//! Everything runs inside namespaces the test created: the bridge lives in its own fabric
//! namespace, every node talks only over its veth to that bridge, and etcd listens only on
//! the node's fabric address and its own loopback. Members are stopped by the PID of the
//! process this module started (never by name), on drop too, also when the test panics.
//!
//! Until the agent has a client crate, tests talk to etcd through its v3 HTTP/JSON gateway
//! (`/v3/kv/put`, `/v3/kv/range`, `/v3/kv/txn` on the client port; keys and values base64),
//! with [`EtcdCluster::v3`] and the small key-value helpers built on it.

use base64::{Engine as _, prelude::BASE64_STANDARD};
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};

use crate::{
    process::TempDir,
    topology::{Netns, TopologyError, veth},
};

/// The subnet every node (and the client) of a [`Fabric`] has its address on.
pub const FABRIC_SUBNET: &str = "10.95.0.0/24";
/// The client namespace's address on the fabric.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 200);
/// The most nodes a [`Fabric`] holds (their addresses stay below [`CLIENT_IP`]).
pub const MAX_NODES: usize = 100;
/// etcd's client port (the gRPC API and the v3 HTTP/JSON gateway).
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port (raft traffic between members).
pub const ETCD_PEER_PORT: u16 = 2380;
/// The etcd binary of Debian's `etcd-server` package (`cargo xtask setup` installs it).
pub const ETCD_BINARY: &str = "/usr/bin/etcd";

/// The fabric address of node `i`: `10.95.0.(i+1)`.
///
/// # Panics
/// If `i` is not below [`MAX_NODES`].
pub fn node_ip(i: usize) -> Ipv4Addr {
    assert!(i < MAX_NODES, "a fabric holds at most {MAX_NODES} nodes");
    Ipv4Addr::new(10, 95, 0, u8::try_from(i + 1).expect("node index"))
}

/// The IPv6 subnet of a dual-stack [`Fabric`] (see [`Fabric::new_dual_stack`]).
pub const FABRIC_SUBNET6: &str = "fd00:95::/64";
/// The client namespace's IPv6 address on a dual-stack fabric.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x95, 0, 0, 0, 0, 0, 200);

/// The IPv6 fabric address of node `i` on a dual-stack fabric: `fd00:95::(i+1)` (the same
/// last number as [`node_ip`]).
///
/// # Panics
/// If `i` is not below [`MAX_NODES`].
pub fn node_ip6(i: usize) -> Ipv6Addr {
    let last = node_ip(i).octets()[3];
    Ipv6Addr::new(0xfd00, 0x95, 0, 0, 0, 0, 0, u16::from(last))
}

/// Node namespaces (and optionally a client namespace) on one bridge: a fabric namespace
/// holds the bridge `br0`; each node (tag `TAG-nodeI`) and the client (`TAG-client`) has
/// `eth0` with its address on [`FABRIC_SUBNET`], the other end of its veth pair (`nodeI`,
/// `client`) enslaved to the bridge. Every namespace is deleted when the last holder drops
/// (the fabric, or a helper such as [`EtcdCluster`] that shares a node namespace).
#[derive(Debug)]
pub struct Fabric {
    fabric: Netns,
    nodes: Vec<Arc<Netns>>,
    client: Option<Arc<Netns>>,
    dual_stack: bool,
}

impl Fabric {
    /// Builds a fabric with `nodes` node namespaces, plus a client namespace if `with_client`.
    /// TX checksum offload is turned off on every `eth0` (packets sent locally on a veth carry
    /// partial checksums, which XDP programs on another node's interface cannot fix up).
    ///
    /// # Errors
    /// [`TopologyError`] if a namespace, veth pair, address or ethtool fails.
    ///
    /// # Panics
    /// If `nodes` is more than [`MAX_NODES`].
    pub fn new(tag: &str, nodes: usize, with_client: bool) -> Result<Self, TopologyError> {
        Self::build(tag, nodes, with_client, false)
    }

    /// [`Fabric::new`] with IPv6 on in the node and client namespaces, each `eth0` also
    /// holding its IPv6 address on [`FABRIC_SUBNET6`] ([`node_ip6`], [`CLIENT_IP6`]).
    ///
    /// # Errors
    /// As [`Fabric::new`].
    ///
    /// # Panics
    /// As [`Fabric::new`].
    pub fn new_dual_stack(
        tag: &str,
        nodes: usize,
        with_client: bool,
    ) -> Result<Self, TopologyError> {
        Self::build(tag, nodes, with_client, true)
    }

    fn build(
        tag: &str,
        nodes: usize,
        with_client: bool,
        dual_stack: bool,
    ) -> Result<Self, TopologyError> {
        assert!(
            nodes <= MAX_NODES,
            "a fabric holds at most {MAX_NODES} nodes"
        );
        let fabric = Netns::new(&format!("{tag}-fabric"))?;
        fabric.bridge("br0")?;
        let namespace = |name: String| {
            if dual_stack {
                Netns::new_with_ipv6(&name)
            } else {
                Netns::new(&name)
            }
        };
        let attach = |ns: &Netns, port: &str, ip: Ipv4Addr, ip6: Ipv6Addr| {
            veth(&fabric, port, ns, "eth0")?;
            fabric.attach_to_bridge(port, "br0")?;
            ns.addr("eth0", &format!("{ip}/24"))?;
            if dual_stack {
                let cidr6 = format!("{ip6}/64");
                ns.ip(&["-6", "addr", "add", &cidr6, "dev", "eth0", "nodad"])?;
            }
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
            Ok::<(), TopologyError>(())
        };
        let mut namespaces = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let node = namespace(format!("{tag}-node{i}"))?;
            attach(&node, &Self::port(i), node_ip(i), node_ip6(i))?;
            namespaces.push(Arc::new(node));
        }
        let client = if with_client {
            let client = namespace(format!("{tag}-client"))?;
            attach(&client, "client", CLIENT_IP, CLIENT_IP6)?;
            Some(Arc::new(client))
        } else {
            None
        };
        Ok(Self {
            fabric,
            nodes: namespaces,
            client,
            dual_stack,
        })
    }

    /// Whether the fabric was built with [`Fabric::new_dual_stack`].
    pub fn dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// The namespace holding the bridge `br0` (it has no address of its own).
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    /// How many node namespaces the fabric has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s namespace ([`node_ip`]`(i)` on its `eth0`).
    pub fn node(&self, i: usize) -> &Netns {
        &self.nodes[i]
    }

    /// A shared handle on node `i`'s namespace, for helpers that must keep it alive.
    pub fn node_shared(&self, i: usize) -> Arc<Netns> {
        Arc::clone(&self.nodes[i])
    }

    /// The client namespace ([`CLIENT_IP`] on its `eth0`), if the fabric was built with one.
    pub fn client(&self) -> Option<&Netns> {
        self.client.as_deref()
    }

    /// Takes node `i`'s link down on the bridge side (its `eth0` loses carrier): the node is
    /// cut off from every other namespace of the fabric until [`Fabric::link_up`].
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn link_down(&self, i: usize) -> Result<(), TopologyError> {
        self.fabric
            .ip(&["link", "set", &Self::port(i), "down"])
            .map(drop)
    }

    /// Brings node `i`'s link back up after [`Fabric::link_down`].
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn link_up(&self, i: usize) -> Result<(), TopologyError> {
        self.fabric.up(&Self::port(i))
    }

    /// The bridge port (in the fabric namespace) of node `i`.
    fn port(i: usize) -> String {
        format!("node{i}")
    }
}

/// The answer to [`EtcdCluster::create_if_absent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key did not exist and now holds the value.
    Created,
    /// The key already existed; nothing was written.
    Taken {
        /// The value the key holds (who holds the claim).
        holder: String,
    },
}

/// A real etcd cluster, one member per node namespace of a [`Fabric`]: member `i` is named
/// `mI`, runs in node `i`'s namespace and listens on [`node_ip`]`(i)` (client port
/// [`ETCD_CLIENT_PORT`], peer port [`ETCD_PEER_PORT`]) and on that namespace's loopback.
/// Data directories and logs live in a temporary directory removed on drop, after every
/// running member has been killed (SIGKILL by PID) and reaped.
///
/// Members are started with `PR_SET_PDEATHSIG` = SIGKILL, so they also die if the test process
/// is killed before its drops run; that signal follows the *thread* that started a member,
/// so start and restart members from the test's own thread.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: TempDir,
}

/// One member: where it runs and, while it runs, its process.
#[derive(Debug)]
struct Member {
    name: String,
    ip: Ipv4Addr,
    netns: Arc<Netns>,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// How long starting a cluster or a member may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a member may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Read timeout of a gateway request: longer than etcd's own request timeout (5 s + 2 ×
/// election timeout), so a request without quorum gets etcd's error, not ours.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

impl EtcdCluster {
    /// Starts a `members`-member cluster on nodes `0..members` of `fabric` (a static initial
    /// cluster over their addresses, `--initial-cluster-state new`, a token unique to this
    /// cluster) and waits until every member reports itself healthy.
    ///
    /// # Panics
    /// If `fabric` has fewer nodes, a member cannot be started or exits, or the cluster is not
    /// healthy within a minute (with the members' logs).
    pub fn start(fabric: &Fabric, members: usize) -> Self {
        assert!(
            (1..=fabric.node_count()).contains(&members),
            "{members} members need as many nodes; the fabric has {}",
            fabric.node_count()
        );
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let token = format!("miren-test-{}-{seq}", std::process::id());
        let dir = TempDir::new("etcd");
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                ip: node_ip(i),
                netns: fabric.node_shared(i),
                data_dir: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{ETCD_PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            token,
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for i in 0..cluster.members.len() {
            cluster.wait_member_healthy(i, deadline);
        }
        cluster
    }

    /// How many members the cluster has (running or not).
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The client URLs of all members (`http://IP:2379`), running or not: what a client of
    /// the cluster is configured with.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.members[i].ip)
    }

    /// The process id of member `i` (the `etcd` process itself), if it runs.
    pub fn member_pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Whether member `i` runs (started by this cluster and not yet exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i]
            .child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops member `i` gracefully: SIGTERM to its PID, then waits for it (SIGKILL after 15 s).
    /// Returns how it ended.
    ///
    /// # Panics
    /// If the member is not running.
    pub fn stop_member(&mut self, i: usize) -> ExitStatus {
        let member = &mut self.members[i];
        let mut child = member
            .child
            .take()
            .unwrap_or_else(|| panic!("etcd member {} is not running", member.name));
        signal(&child, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&child, Signal::SIGKILL);
        child.wait().expect("reap etcd member")
    }

    /// Kills member `i` with SIGKILL to its PID (no chance to clean up) and reaps it.
    ///
    /// # Panics
    /// If the member is not running.
    pub fn kill_member(&mut self, i: usize) -> ExitStatus {
        let member = &mut self.members[i];
        let mut child = member
            .child
            .take()
            .unwrap_or_else(|| panic!("etcd member {} is not running", member.name));
        signal(&child, Signal::SIGKILL);
        child.wait().expect("reap etcd member")
    }

    /// Starts member `i` again on its existing data directory (`--initial-cluster-state
    /// existing`) and waits until it reports itself healthy (it has rejoined and has a leader).
    ///
    /// # Panics
    /// If it runs already, cannot be started, exits, or is not healthy within a minute.
    pub fn start_member(&mut self, i: usize) {
        assert!(
            self.members[i].child.is_none(),
            "etcd member {} runs already",
            self.members[i].name
        );
        self.spawn(i, "existing");
        self.wait_member_healthy(i, Instant::now() + START_TIMEOUT);
    }

    /// Whether member `i` answers `GET /health` with `{"health":"true"}` (it is connected to a
    /// leader and can serve a quorum read).
    pub fn member_healthy(&self, i: usize) -> bool {
        self.request(i, "GET", "/health", None)
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .is_some_and(|v| v["health"] == "true")
    }

    /// Which member is the raft leader, as member `i` sees it (`/v3/maintenance/status`).
    ///
    /// # Errors
    /// The request's error, or a message if the leader is not one of this cluster's members.
    pub fn leader(&self, i: usize) -> Result<usize, String> {
        let status = self.v3(i, "/v3/maintenance/status", &json!({}))?;
        let leader = id_string(&status["leader"]);
        (0..self.members.len())
            .find(|&j| self.member_id(j).is_ok_and(|id| id == leader))
            .ok_or_else(|| format!("no running member has the leader's id {leader}: {status}"))
    }

    /// Member `i`'s raft member id (as a decimal string, as the gateway prints it). It stays
    /// the same across restarts on the same data directory.
    ///
    /// # Errors
    /// The request's error.
    pub fn member_id(&self, i: usize) -> Result<String, String> {
        let status = self.v3(i, "/v3/maintenance/status", &json!({}))?;
        Ok(id_string(&status["header"]["member_id"]))
    }

    /// POSTs `body` (JSON) to the v3 gateway path `path` (e.g. `/v3/kv/put`) of member `i`,
    /// from inside its node namespace; returns the decoded answer of a 200 response.
    ///
    /// # Errors
    /// A connection error, or the status and body of any other response.
    pub fn v3(&self, i: usize, path: &str, body: &Value) -> Result<Value, String> {
        let (status, text) = self.request(i, "POST", path, Some(&body.to_string()))?;
        if status != 200 {
            return Err(format!(
                "{} {path}: HTTP {status}: {text}",
                self.members[i].name
            ));
        }
        serde_json::from_str(&text).map_err(|e| format!("{path}: bad JSON ({e}): {text}"))
    }

    /// Writes `key` = `value` through member `i`; returns the revision of the write.
    ///
    /// # Errors
    /// As [`EtcdCluster::v3`] (e.g. no quorum).
    pub fn put(&self, i: usize, key: &str, value: &str) -> Result<i64, String> {
        let answer = self.v3(
            i,
            "/v3/kv/put",
            &json!({ "key": base64_encode(key.as_bytes()), "value": base64_encode(value.as_bytes()) }),
        )?;
        revision(&answer)
    }

    /// Reads `key` through member `i` with a linearizable read (it reflects every write
    /// committed before it, whichever member took it).
    ///
    /// # Errors
    /// As [`EtcdCluster::v3`].
    pub fn get(&self, i: usize, key: &str) -> Result<Option<String>, String> {
        self.range(i, key, false)
    }

    /// Reads `key` from member `i`'s own copy of the data (a serializable read: no round trip
    /// to the leader, so it shows what this member has applied).
    ///
    /// # Errors
    /// As [`EtcdCluster::v3`].
    pub fn get_local(&self, i: usize, key: &str) -> Result<Option<String>, String> {
        self.range(i, key, true)
    }

    /// Creates `key` = `value` through member `i` only if the key does not exist, in one
    /// transaction (compare `create_revision == 0`; on failure, read the key): the claim
    /// primitive of node ports. Exactly one of concurrent claims of a key gets
    /// [`Claim::Created`]; the others learn the holder.
    ///
    /// # Errors
    /// As [`EtcdCluster::v3`].
    pub fn create_if_absent(&self, i: usize, key: &str, value: &str) -> Result<Claim, String> {
        let key64 = base64_encode(key.as_bytes());
        let answer = self.v3(
            i,
            "/v3/kv/txn",
            &json!({
                "compare": [{
                    "key": key64,
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": "0",
                }],
                "success": [{
                    "request_put": { "key": key64, "value": base64_encode(value.as_bytes()) },
                }],
                "failure": [{ "request_range": { "key": key64 } }],
            }),
        )?;
        // The gateway leaves out fields with default values: no `succeeded` means false.
        if answer["succeeded"].as_bool().unwrap_or(false) {
            return Ok(Claim::Created);
        }
        let range = &answer["responses"][0]["response_range"];
        let holder = first_value(range)?
            .ok_or_else(|| format!("the claim of {key} failed but the key is absent: {answer}"))?;
        Ok(Claim::Taken { holder })
    }

    fn range(&self, i: usize, key: &str, serializable: bool) -> Result<Option<String>, String> {
        let answer = self.v3(
            i,
            "/v3/kv/range",
            &json!({ "key": base64_encode(key.as_bytes()), "serializable": serializable }),
        )?;
        first_value(&answer)
    }

    /// Starts member `i`'s process with `--initial-cluster-state STATE`, output to its log.
    fn spawn(&mut self, i: usize, state: &str) {
        let member = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .expect("create etcd log");
        let client_url = format!("http://{}:{ETCD_CLIENT_PORT}", member.ip);
        let peer_url = format!("http://{}:{ETCD_PEER_PORT}", member.ip);
        let mut command = member.netns.command(ETCD_BINARY);
        command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args([
                "--listen-client-urls",
                &format!("{client_url},http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            ])
            .args(["--advertise-client-urls", &client_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone etcd log"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // nsenter execs etcd without forking, so the child's PID is etcd's.
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("starting {ETCD_BINARY} (apt-get install etcd-server): {e}")
        });
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` is healthy; panics with the logs if it exits or the deadline
    /// passes.
    fn wait_member_healthy(&mut self, i: usize, deadline: Instant) {
        loop {
            if self.member_healthy(i) {
                return;
            }
            if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(Child::try_wait) {
                self.members[i].child = None;
                panic!(
                    "etcd member {} exited ({status}):\n{}",
                    self.members[i].name,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} was not healthy within {START_TIMEOUT:?}:\n{}",
                self.members[i].name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for member in &self.members {
            let text = std::fs::read_to_string(&member.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out.push_str(&format!(
                "--- {} ({}) ---\n{}\n",
                member.name,
                member.log.display(),
                tail.join("\n")
            ));
        }
        out
    }

    /// The directory holding the members' data directories and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// One HTTP/1.0 request (so the answer is never chunked) to member `i`'s client port,
    /// made from inside its node namespace; returns the status code and the body.
    fn request(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        let member = &self.members[i];
        let addr = SocketAddr::from((member.ip, ETCD_CLIENT_PORT));
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let exchange = || -> io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
            stream.write_all(request.as_bytes())?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response)?;
            Ok(String::from_utf8_lossy(&response).into_owned())
        };
        let response = member
            .netns
            .run(exchange)
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{method} {path} on {} ({addr}): {e}", member.name))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{method} {path}: incomplete response: {response:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{method} {path}: no status line: {head:?}"))?;
        Ok((status, body.to_owned()))
    }
}

impl Drop for EtcdCluster {
    /// Kills every running member by its PID and reaps it; the node namespaces go when their
    /// last holder drops, the data directories with the temporary directory.
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                signal(&child, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

/// Sends `sig` to `child` by its PID. Only called before the child is reaped, so the PID is
/// still this child's (an exited, unreaped child keeps it as a zombie).
fn signal(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// A uint64 the gateway printed (as a JSON string, or a number) as a decimal string.
fn id_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `header.revision` of a gateway answer.
fn revision(answer: &Value) -> Result<i64, String> {
    let revision = &answer["header"]["revision"];
    revision
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| revision.as_i64())
        .ok_or_else(|| format!("no revision in {answer}"))
}

/// The value of the first key of a range answer (`kvs[0].value`), `None` if there is none.
fn first_value(range: &Value) -> Result<Option<String>, String> {
    let Some(kv) = range["kvs"].get(0) else {
        return Ok(None);
    };
    // An empty value is left out like every default.
    let value = kv["value"].as_str().unwrap_or("");
    let bytes = base64_decode(value).ok_or_else(|| format!("bad base64 in {range}"))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| format!("value is not UTF-8 in {range}"))
}

/// Standard base64 with padding (how the gateway encodes `bytes` fields).
pub fn base64_encode(bytes: &[u8]) -> String {
    BASE64_STANDARD.encode(bytes)
}

/// Decodes standard base64; `None` if `text` is not base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    BASE64_STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_on_the_fabric_subnet() {
        assert_eq!(node_ip(0), Ipv4Addr::new(10, 95, 0, 1));
        assert_eq!(node_ip(2), Ipv4Addr::new(10, 95, 0, 3));
    }
}
