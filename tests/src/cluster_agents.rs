//! Real agents in cluster mode: one `miren-agent run --store etcd` in each node namespace of
//! a [`Fabric`], all on one [`EtcdCluster`], each with its own state directory and API
//! socket (a Unix socket, so the test reaches every agent's API from its own namespace).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::{
    cluster::{EtcdCluster, Fabric, node_ip, node_ip6},
    process::{AgentProcess, BpfPinDir, TempDir, binary},
    tls::TestCa,
    world::remove_instances,
};

/// The cluster token file's name in the test's directory.
const TOKEN_FILE: &str = "cluster-token";

/// The TTL of the nodes' leases in tests: short, so lost nodes are noticed quickly.
pub const TEST_LEASE_TTL: &str = "3s";

/// The name of node `i`'s agent.
pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// One agent per node of a fabric, in cluster mode. On drop the agents are stopped (SIGTERM
/// by PID), the instances they left are removed, then their pin directories unmounted.
#[derive(Debug)]
pub struct ClusterAgents {
    agents: Vec<Option<AgentProcess>>,
    commands: Vec<Vec<String>>,
    dir: TempDir,
    /// Each node's private bpffs (`--bpf-pin-dir`), when the agents run a data plane.
    pins: Vec<BpfPinDir>,
}

impl ClusterAgents {
    /// Starts an agent in each of the first `nodes` node namespaces of `fabric`, with
    /// `--store etcd` on every member of `etcd`, `--node-name nodeI`, `--node-ip` its fabric
    /// address (on a dual-stack fabric a second one, its IPv6 address) and `extra` flags.
    ///
    /// # Panics
    /// If an agent does not start (with its log).
    pub fn start(fabric: &Fabric, etcd: &EtcdCluster, nodes: usize, extra: &[&str]) -> Self {
        Self::launch(fabric, etcd, nodes, Vec::new(), None, extra)
    }

    /// [`ClusterAgents::start`] with a node-port data plane on every node (`--iface eth0
    /// --dataplane DATAPLANE`), each agent pinning its eBPF objects in a bpffs of its own.
    ///
    /// # Panics
    /// If a bpffs cannot be mounted or an agent does not start (with its log).
    pub fn start_with_dataplane(
        fabric: &Fabric,
        etcd: &EtcdCluster,
        nodes: usize,
        dataplane: &str,
        extra: &[&str],
    ) -> Self {
        Self::launch_with_dataplane(fabric, etcd, nodes, dataplane, None, extra)
    }

    /// [`ClusterAgents::start_with_dataplane`] with mutual TLS on the cluster listener: every
    /// node gets `--cluster-ca` (the certificate of `ca`), and node `i` a `--cluster-cert` and
    /// `--cluster-key` issued by `ca` for its fabric address (as IP SAN), in its directory as
    /// `cluster.crt` and `cluster.key`.
    ///
    /// # Panics
    /// As [`ClusterAgents::start_with_dataplane`], or if a certificate cannot be written.
    pub fn start_with_cluster_tls(
        fabric: &Fabric,
        etcd: &EtcdCluster,
        nodes: usize,
        dataplane: &str,
        ca: &TestCa,
        extra: &[&str],
    ) -> Self {
        Self::launch_with_dataplane(fabric, etcd, nodes, dataplane, Some(ca), extra)
    }

    /// Starts the agents with a data plane (each with a bpffs of its own) and, with `tls`,
    /// certificates from that CA.
    fn launch_with_dataplane(
        fabric: &Fabric,
        etcd: &EtcdCluster,
        nodes: usize,
        dataplane: &str,
        tls: Option<&TestCa>,
        extra: &[&str],
    ) -> Self {
        let pins = (0..nodes).map(|i| BpfPinDir::new(&node_name(i))).collect();
        let mut flags = vec!["--iface", "eth0", "--dataplane", dataplane];
        flags.extend(extra);
        Self::launch(fabric, etcd, nodes, pins, tls, &flags)
    }

    /// Starts the agents; with `pins`, node `i`'s gets `--bpf-pin-dir` `pins[i]`; with `tls`,
    /// node `i`'s gets the cluster listener's TLS flags with a certificate from that CA.
    fn launch(
        fabric: &Fabric,
        etcd: &EtcdCluster,
        nodes: usize,
        pins: Vec<BpfPinDir>,
        tls: Option<&TestCa>,
        extra: &[&str],
    ) -> Self {
        let dir = TempDir::new("cluster-agents");
        let endpoints = etcd.endpoints().join(",");
        let token = dir.path().join(TOKEN_FILE);
        std::fs::write(
            &token,
            format!("test-token-{}-0123456789", std::process::id()),
        )
        .expect("cluster token");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
            .expect("cluster token mode");
        let mut agents = Self {
            agents: Vec::new(),
            commands: Vec::new(),
            dir,
            pins,
        };
        for i in 0..nodes {
            let node_dir = agents.node_dir(i);
            std::fs::create_dir_all(&node_dir).expect("node directory");
            std::fs::write(node_dir.join("agent.toml"), "").expect("agent.toml");
            let mut args: Vec<String> = [
                "run",
                "--store",
                "etcd",
                "--etcd-endpoints",
                &endpoints,
                "--node-name",
                &node_name(i),
                "--node-lease-ttl",
                TEST_LEASE_TTL,
                "--node-ip",
                &node_ip(i).to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            for (flag, path) in [
                ("--state-dir", node_dir.join("state")),
                ("--api-socket", node_dir.join("agent.sock")),
                ("--config", node_dir.join("agent.toml")),
                ("--cluster-token-file", token.clone()),
            ] {
                args.push(flag.into());
                args.push(path.to_string_lossy().into_owned());
            }
            if fabric.dual_stack() {
                args.extend(["--node-ip".into(), node_ip6(i).to_string()]);
            }
            if let Some(ca) = tls {
                let ca_file = node_dir.join("cluster-ca.crt");
                std::fs::write(&ca_file, ca.cert_pem()).expect("write the cluster CA");
                let (cert, key) = ca
                    .issue(&[&node_ip(i).to_string()])
                    .write(&node_dir, "cluster");
                args.extend([
                    "--cluster-ca".into(),
                    ca_file.to_string_lossy().into_owned(),
                    "--cluster-cert".into(),
                    cert,
                    "--cluster-key".into(),
                    key,
                ]);
            }
            if let Some(pins) = agents.pins.get(i) {
                args.push("--bpf-pin-dir".into());
                args.push(pins.path().to_string_lossy().into_owned());
            }
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let mut command = fabric
                .node(i)
                .command(&binary("miren-agent").to_string_lossy());
            command.args(&args);
            agents.commands.push(args);
            agents.agents.push(Some(Self::spawn(command, &node_dir)));
        }
        agents
    }

    fn spawn(command: Command, node_dir: &Path) -> AgentProcess {
        AgentProcess::start(
            command,
            &node_dir.join("agent.sock"),
            &node_dir.join("agent.log"),
        )
    }

    /// Node `i`'s directory: `state/`, `agent.sock`, `agent.log`.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(node_name(i))
    }

    /// The cluster token file every agent was given (mode 0600).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join(TOKEN_FILE)
    }

    /// The temporary directory of the whole test (for app directories).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s running agent.
    ///
    /// # Panics
    /// If it is not running.
    pub fn agent(&self, i: usize) -> &AgentProcess {
        self.agents[i].as_ref().expect("agent is running")
    }

    /// Runs `miren ARGS` against node `i`'s agent.
    pub fn miren(&self, i: usize, args: &[&str]) -> Output {
        self.agent(i).miren(args)
    }

    /// Every running agent's log, for failure messages.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, agent)| Some(format!("--- node{i}:\n{}", agent.as_ref()?.log_text())))
            .collect()
    }

    /// Kills node `i`'s agent with SIGKILL (its lease then expires after the TTL).
    pub fn kill9(&mut self, i: usize) {
        if let Some(agent) = self.agents[i].take() {
            agent.kill9();
        }
    }

    /// Stops node `i`'s agent with SIGTERM.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut agent) = self.agents[i].take() {
            agent.terminate(Duration::from_secs(40));
        }
    }

    /// Starts node `i`'s agent again with the same flags and state directory.
    ///
    /// # Panics
    /// If it is still running or does not start.
    pub fn restart(&mut self, fabric: &Fabric, i: usize) {
        assert!(self.agents[i].is_none(), "node{i}'s agent is still running");
        let mut command = fabric
            .node(i)
            .command(&binary("miren-agent").to_string_lossy());
        command.args(&self.commands[i]);
        self.agents[i] = Some(Self::spawn(command, &self.node_dir(i)));
    }
}

impl Drop for ClusterAgents {
    /// Stops every agent, then removes the instances they left running (the pin directories
    /// are unmounted after, as the fields drop).
    fn drop(&mut self) {
        for agent in &mut self.agents {
            if let Some(mut agent) = agent.take() {
                agent.terminate(Duration::from_secs(40));
            }
        }
        for i in 0..self.commands.len() {
            remove_instances(&self.node_dir(i).join("state"));
        }
    }
}
