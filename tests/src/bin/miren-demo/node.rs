//! The demo's node: client and node namespaces, the real agent in the node namespace, and
//! running commands with their command line and real output printed. Dropping it stops the
//! agent with SIGTERM (it removes its sandboxes and bridge), removes any sandbox the agent
//! left behind, then deletes the namespaces, the state directory and the private bpffs.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use miren_agent::{cli::Client, sandbox::net::NETNS_PREFIX};
use miren_tests::{
    process::{AgentProcess, BpfPinDir, TempDir, miren},
    topology::Netns,
    world::{CLIENT_IP, NODE_IP, agent_command, client_and_node, remove_instances},
};

use crate::Stop;

/// How long the agent gets to stop its instances after SIGTERM before it is killed.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The running demo topology. Field order is drop order: the agent (already stopped by
/// [`Drop`]), the namespaces, then the directories.
#[derive(Debug)]
pub struct DemoNode {
    agent: AgentProcess,
    /// The client namespace (`CLIENT_IP` on eth0).
    pub client: Netns,
    /// The node namespace: the agent, its ingress on `NODE_IP:80` and its sandbox bridge.
    pub node: Netns,
    dir: TempDir,
    _pins: BpfPinDir,
    stopped: bool,
}

impl DemoNode {
    /// Builds the namespaces and starts the agent in the node namespace.
    ///
    /// # Errors
    /// When a namespace, interface or the agent cannot be set up, or on Ctrl-C.
    pub fn start(stop: &Stop) -> Result<Self> {
        heading("setting up a node and a client in network namespaces");
        let (client, node) =
            client_and_node("demo").context("creating the client and node namespaces")?;
        println!(
            "client namespace {} (eth0 {CLIENT_IP}), node namespace {} (eth0 {NODE_IP}), joined by a veth pair",
            client.name(),
            node.name(),
        );
        stop.check()?;
        let pins = BpfPinDir::new("demo");
        let dir = TempDir::new("demo");
        let mut command = agent_command(&node, dir.path(), pins.path(), "auto");
        command.args(["--http-addr", &format!("{NODE_IP}:80")]);
        // Instances outlive an agent by default; the demo's leave with it.
        command.arg("--stop-instances-on-exit");
        // Its own process group: Ctrl-C reaches only the demo, which stops the agent with
        // SIGTERM after the showcase's current step.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let log = dir.path().join("agent.log");
        println!("\n$ {}   # log: {}", command_line(&command), log.display());
        let agent = AgentProcess::start(command, &dir.path().join("agent.sock"), &log);
        println!("agent running (pid {}), API answering", agent.pid());
        println!(
            "$ export MIREN_SOCKET={}   # what the `miren` commands below talk to",
            dir.path().join("agent.sock").display()
        );
        Ok(Self {
            agent,
            client,
            node,
            dir,
            _pins: pins,
            stopped: false,
        })
    }

    /// A client of the agent's API (for polling without printing).
    pub fn api(&self) -> Client {
        Client::new(self.socket())
    }

    /// The agent's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Runs `miren ARGS…`, printing the command line and its output.
    ///
    /// # Errors
    /// When it exits non-zero (its stderr is in the error).
    pub fn miren(&self, args: &[&str]) -> Result<String> {
        println!("\n$ miren {}", quote_all(args.iter().copied()));
        shown(miren(&self.socket(), args), "miren")
    }

    /// Runs `PROGRAM ARGS…` in `ns` (labelled `label` in the printed prompt), printing the
    /// command line and its output.
    ///
    /// # Errors
    /// When it cannot start or exits non-zero.
    pub fn exec(&self, ns: &Netns, label: &str, program: &str, args: &[&str]) -> Result<String> {
        println!("\n{label}$ {program} {}", quote_all(args.iter().copied()));
        let out = ns
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("starting {program}"))?;
        shown(out, program)
    }

    /// The last `lines` lines of the agent's log, for diagnosing a failed step.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        let log = self.agent.log_text();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the agent and removes everything (what dropping does), with a heading.
    ///
    /// # Errors
    /// When the agent did not exit cleanly on SIGTERM or left sandboxes behind.
    pub fn shut_down(mut self) -> Result<()> {
        heading("cleaning up");
        self.stop_agent()
    }

    /// SIGTERM to the agent, then removes the sandboxes it left behind (only after a crash or
    /// when it had to be killed). Does nothing the second time.
    fn stop_agent(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        let pid = self.agent.pid();
        println!(
            "$ kill -TERM {pid}   # the agent stops its instances, removes their namespaces and its bridge"
        );
        let status = self.agent.terminate(AGENT_STOP_TIMEOUT);
        match status {
            Some(status) => println!("agent exited ({status})"),
            None => println!(
                "agent did not stop within {} s; killed it",
                AGENT_STOP_TIMEOUT.as_secs()
            ),
        }
        let left = remove_leftover_sandboxes(pid);
        remove_instances(&self.dir.path().join("state"));
        if left > 0 {
            println!("removed {left} sandbox namespace(s) the agent left behind");
        }
        ensure!(
            status.is_some_and(|s| s.success()) && left == 0,
            "the agent did not shut down cleanly; its log ends with:\n{}",
            self.agent_log_tail(20)
        );
        Ok(())
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        if let Err(e) = self.stop_agent() {
            println!("{e:#}");
        }
        println!(
            "removing namespaces {} and {}, {} and the private bpffs",
            self.client.name(),
            self.node.name(),
            self.dir.path().display()
        );
    }
}

/// Deletes the sandbox namespaces of agent `pid` that still exist (only after a crash or a
/// SIGKILL), killing the processes in them first; returns how many there were.
fn remove_leftover_sandboxes(pid: u32) -> usize {
    let prefix = format!("{NETNS_PREFIX}{pid:x}x");
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return 0;
    };
    let mut removed = 0;
    for name in entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
    {
        if !name.starts_with(&prefix) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        removed += 1;
    }
    removed
}

/// Prints a section heading.
pub fn heading(title: &str) {
    println!("\n==== {title} ====");
}

/// Prints what a command wrote; its stdout if it succeeded.
pub fn shown(out: Output, program: &str) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    if !stdout.is_empty() && !stdout.ends_with('\n') {
        println!();
    }
    if !stderr.trim().is_empty() {
        println!("{}", stderr.trim_end());
    }
    if !out.status.success() {
        bail!("{program} failed ({}): {}", out.status, stderr.trim());
    }
    Ok(stdout)
}

/// `command` as a shell line.
fn command_line(command: &Command) -> String {
    format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        quote_all(command.get_args().filter_map(|a| a.to_str()))
    )
}

/// Joins arguments into a shell line, quoting those that need it.
pub fn quote_all<'a>(args: impl Iterator<Item = &'a str>) -> String {
    args.map(|arg| {
        if !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_./:=@%+-,".contains(c))
        {
            arg.to_owned()
        } else {
            format!("'{}'", arg.replace('\'', r"'\''"))
        }
    })
    .collect::<Vec<_>>()
    .join(" ")
}
