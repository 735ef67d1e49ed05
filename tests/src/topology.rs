//! Network-namespace topologies: namespaces, veth pairs, bridges, addresses, routes, and
//! running commands or closures inside a namespace.
//!
//! Names are unique per process and call (`mirent<pid>-<seq>-<tag>`), so tests run in parallel.
//! Interfaces are created directly inside their namespaces (never in the host namespace), so a
//! test never touches the machine's own interfaces, and interface names only need to be unique
//! within one namespace. Deleting a namespace removes everything in it; [`Netns`] does that on
//! drop, and namespaces left behind by a killed test process are swept by the next run.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

const NETNS_DIR: &str = "/run/netns";
const NAME_PREFIX: &str = "mirent";

/// Errors from building or using a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Namespaces, veth and XDP need root.
    #[error(
        "network namespace tests need root (CAP_NET_ADMIN, CAP_BPF); run them as root, e.g. `sudo cargo xtask test`"
    )]
    NotRoot,
    /// An external command (ip, nsenter, sysctl …) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A system call or I/O operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Result type of this module.
pub type Result<T, E = TopologyError> = std::result::Result<T, E>;

/// A network namespace created by this process; deleted (with all its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace whose name contains `tag`, with `lo` up and IPv6 disabled (so no
    /// router solicitations or MLD reports disturb exact packet counts).
    ///
    /// # Errors
    /// [`TopologyError::NotRoot`] without root; [`TopologyError::Command`] if `ip` fails.
    pub fn new(tag: &str) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Err(TopologyError::NotRoot);
        }
        sweep_dead_namespaces();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}-{seq}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Self { name };
        netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        netns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Like [`Netns::new`] but with IPv6 left on (for tests of IPv6 itself): interfaces created
    /// in it get link-local addresses and send neighbor discovery, MLD and router
    /// solicitations like on a normal host, so exact packet counts are not for these.
    ///
    /// # Errors
    /// As [`Netns::new`].
    pub fn new_with_ipv6(tag: &str) -> Result<Self> {
        let netns = Self::new(tag)?;
        netns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
        netns.sysctl("net.ipv6.conf.default.disable_ipv6", "0")?;
        Ok(netns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n NS ARGS…` and returns its stdout.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A command that runs `program` inside this namespace (network namespace only, so the
    /// host's /sys and bpffs stay visible).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `program ARGS…` inside the namespace and returns its output; fails if it fails.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if the command fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }

    /// Starts `command` (from [`Netns::command`]); the child is killed when the guard drops.
    ///
    /// # Errors
    /// [`TopologyError::Io`] if it cannot be started.
    pub fn spawn(&self, command: &mut Command) -> Result<ChildGuard> {
        let child = command.spawn().map_err(|source| TopologyError::Io {
            op: format!("starting `{}`", display(command)),
            source,
        })?;
        Ok(ChildGuard(child))
    }

    /// Sets a sysctl inside this namespace only.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `sysctl` fails.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens and interfaces it
    /// names (e.g. for XDP attach) are this namespace's. Panics in `f` propagate.
    ///
    /// # Errors
    /// [`TopologyError::Io`] if the namespace cannot be entered.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path()).map_err(|source| TopologyError::Io {
            op: format!("opening {}", self.path().display()),
            source,
        })?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| TopologyError::Io {
                    op: format!("entering network namespace {}", self.name),
                    source: errno.into(),
                })?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Adds `cidr` (e.g. `10.0.0.1/24`) to `dev` and brings it up.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.up(dev)
    }

    /// Brings `dev` up.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Adds a route, e.g. `route(&["default", "via", "10.0.0.1"])`.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn route(&self, spec: &[&str]) -> Result<()> {
        let mut args = vec!["route", "add"];
        args.extend_from_slice(spec);
        self.ip(&args).map(drop)
    }

    /// Sets the MTU of `dev` (e.g. a smaller hop on a path, for path MTU discovery).
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn mtu(&self, dev: &str, mtu: u32) -> Result<()> {
        self.ip(&["link", "set", dev, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// A counter of the namespace's IP stack, named as `nstat` names them (e.g.
    /// `IcmpOutDestUnreachs`, `IpFragCreates` from /proc/net/snmp, `Ip6FragCreates` from
    /// /proc/net/snmp6); 0 if there is no such counter.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if the files cannot be read.
    pub fn snmp(&self, name: &str) -> Result<u64> {
        let out = self.exec("cat", &["/proc/net/snmp", "/proc/net/snmp6"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if let Some(group) = first.strip_suffix(':') {
                // /proc/net/snmp: a line of names, then a line of values of the same group.
                let values = lines.next().unwrap_or_default().split_whitespace().skip(1);
                for (field, value) in words.zip(values) {
                    if format!("{group}{field}") == name {
                        return Ok(value.parse().unwrap_or(0));
                    }
                }
            } else if first == name {
                return Ok(words.next().and_then(|v| v.parse().ok()).unwrap_or(0));
            }
        }
        Ok(0)
    }

    /// Creates a bridge `name` in this namespace and brings it up.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn bridge(&self, name: &str) -> Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.up(name)
    }

    /// Enslaves `dev` to the bridge `bridge` (both in this namespace).
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn attach_to_bridge(&self, dev: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "master", bridge]).map(drop)
    }

    /// The MAC address of `dev`.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails or prints no address.
    pub fn mac(&self, dev: &str) -> Result<String> {
        let out = self.ip(&["-br", "link", "show", "dev", dev])?;
        out.split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .ok_or_else(|| TopologyError::Command {
                command: format!("ip -n {} -br link show dev {dev}", self.name),
                status: std::process::ExitStatus::default(),
                stderr: format!("no MAC address in {out:?}"),
            })
    }

    /// Adds a permanent neighbour entry so no ARP traffic is needed to reach `ip`.
    ///
    /// # Errors
    /// [`TopologyError::Command`] if `ip` fails.
    pub fn neigh(&self, dev: &str, ip: &str, mac: &str) -> Result<()> {
        self.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces (and the peers of its veth pairs).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates a veth pair with end `a_dev` in `a` and end `b_dev` in `b`, both up.
///
/// # Errors
/// [`TopologyError::Command`] if `ip` fails.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ])?;
    a.up(a_dev)?;
    b.up(b_dev)
}

/// A child process started in a namespace; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// The underlying child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `command`, returning its output if it succeeded.
fn run(command: &mut Command) -> Result<Output> {
    let out = command.output().map_err(|source| TopologyError::Io {
        op: format!("starting `{}`", display(command)),
        source,
    })?;
    if !out.status.success() {
        return Err(TopologyError::Command {
            command: display(command),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Deletes namespaces named by this module for processes that no longer exist (a test run
/// killed before its drops ran).
fn sweep_dead_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}
