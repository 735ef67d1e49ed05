//! Instances as OCI containers, run by `runc` (Debian's package): the instance's network
//! namespace (made by [`super::net`]) plus its own mount, pid, ipc and uts namespaces; a per-app
//! unprivileged uid, no capabilities, `no_new_privs` and a seccomp filter; the host's `/usr` and
//! `/etc` read-only, the app's code read-only at `/app`, a private writable `/tmp`; cgroup
//! limits for memory, pids and CPU; `tini` as the first process, so the app gets its signals.
//! Containers are started detached, so they outlive the agent;
//! the agent is the child subreaper of their first process and collects its exit status.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    os::{fd::OwnedFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use super::SandboxError;
use crate::metrics::ExitReason;

/// PATH given to every instance.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The app's code inside the container (its working directory).
pub const APP_DIR: &str = "/app";
/// The working directory of an instance without app code (its private, writable `/tmp`).
const NO_APP_DIR_CWD: &str = "/tmp";
/// Host directories visible (read-only) in every container; symlinks (merged /usr) are
/// recreated as symlinks.
const HOST_DIRS: &[&str] = &[
    "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Private, writable tmpfs directories of every container.
const PRIVATE_DIRS: [&str; 2] = ["/tmp", "/run"];
/// Size of the private `/tmp` and `/run`, which count against the memory limit.
const TMP_SIZE: &str = "size=65536k";
/// First uid of the per-app range; an app's uid is this plus a hash of its name.
const APP_UID_BASE: u32 = 100_000;
/// Number of uids in the per-app range.
const APP_UID_COUNT: u32 = 1_000_000;

/// Resource limits of one instance (`--instance-memory`, `--instance-pids`, `--instance-cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Memory (and memory + swap) limit in bytes.
    pub memory_bytes: u64,
    /// Most processes and threads at once.
    pub pids: u32,
    /// CPU quota in thousandths of a CPU.
    pub cpu_millis: u32,
}

impl Default for InstanceLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            pids: 512,
            cpu_millis: 1000,
        }
    }
}

/// What one container runs.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    /// Container id (unique on the node).
    pub id: &'a str,
    /// The app the instance belongs to (picks its uid).
    pub app: &'a str,
    /// Host name inside the container.
    pub hostname: &'a str,
    /// Run as `/bin/sh -c COMMAND`.
    pub command: &'a str,
    /// Environment besides PATH and HOME.
    pub env: &'a BTreeMap<String, String>,
    /// The app's files (the unpacked code bundle), mounted read-only at [`APP_DIR`]; without
    /// them there is no [`APP_DIR`].
    pub app_dir: Option<&'a Path>,
    /// The network namespace to join (`/run/netns/NAME`).
    pub netns_path: PathBuf,
    /// The resolver the instance uses.
    pub nameserver: std::net::Ipv4Addr,
    /// cgroup limits.
    pub limits: InstanceLimits,
}

/// The OCI runtime and where its containers live.
#[derive(Debug)]
pub struct Runtime {
    runc: PathBuf,
    /// The init each container runs as its first process (`tini`): it passes signals on to
    /// the app (a pid 1 without handlers would ignore SIGTERM) and reaps orphans.
    init: PathBuf,
    /// runc's state directory (`--root`), private to this agent's state dir.
    root: PathBuf,
    /// The shared, empty-but-for-mountpoints root filesystem directory.
    rootfs: PathBuf,
    /// One bundle directory per container.
    bundles: PathBuf,
}

impl Runtime {
    /// Finds `runc` and prepares `state_dir/{runc,rootfs,bundles}`.
    ///
    /// # Errors
    /// [`SandboxError::Runtime`] when runc is missing, [`SandboxError::Io`] for the directories.
    pub fn open(state_dir: &Path) -> Result<Self, SandboxError> {
        let runc = find_in_path("runc").ok_or_else(|| SandboxError::Runtime {
            op: "finding the OCI runtime".into(),
            detail: "`runc` is not installed (on Debian: apt install runc); instances run in \
                     runc containers"
                .into(),
        })?;
        let init = find_in_path("tini").ok_or_else(|| SandboxError::Runtime {
            op: "finding the containers' init".into(),
            detail: "`tini` is not installed (on Debian: apt install tini); it runs as each \
                     instance's first process"
                .into(),
        })?;
        let runtime = Self {
            runc,
            init,
            root: state_dir.join("runc"),
            rootfs: state_dir.join("rootfs"),
            bundles: state_dir.join("bundles"),
        };
        let io = |what: &Path| {
            let what = what.display().to_string();
            move |e| SandboxError::io(format!("preparing {what}"), e)
        };
        std::fs::create_dir_all(&runtime.root).map_err(io(&runtime.root))?;
        std::fs::create_dir_all(&runtime.bundles).map_err(io(&runtime.bundles))?;
        std::fs::create_dir_all(&runtime.rootfs).map_err(io(&runtime.rootfs))?;
        // The container's `/`: searchable by the unprivileged instance users.
        std::fs::set_permissions(&runtime.rootfs, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&runtime.rootfs))?;
        // runc gives a tmpfs the mode of the directory it is mounted on, when that exists.
        for dir in PRIVATE_DIRS {
            let inside = runtime.rootfs.join(dir.trim_start_matches('/'));
            std::fs::create_dir_all(&inside)
                .and_then(|()| {
                    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o1777))
                })
                .map_err(io(&inside))?;
        }
        for dir in HOST_DIRS {
            let host = Path::new(dir);
            let inside = runtime.rootfs.join(dir.trim_start_matches('/'));
            if inside.symlink_metadata().is_ok() {
                continue;
            }
            match std::fs::read_link(host) {
                Ok(target) => std::os::unix::fs::symlink(target, &inside).map_err(io(&inside))?,
                Err(_) if host.is_dir() => std::fs::create_dir(&inside).map_err(io(&inside))?,
                Err(_) => {}
            }
        }
        Ok(runtime)
    }

    /// The OCI `config.json` of `spec`.
    pub fn config(&self, spec: &ContainerSpec<'_>) -> Value {
        let uid = app_uid(spec.app);
        let mut env: Vec<String> = vec![format!("PATH={PATH}"), "HOME=/tmp".into()];
        env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
        ];
        for dir in HOST_DIRS {
            let host = Path::new(dir);
            if host.is_dir() && std::fs::read_link(host).is_err() {
                mounts.push(read_only_bind(host, dir));
            }
        }
        mounts.push(read_only_bind(
            &self.bundle(spec.id).join("resolv.conf"),
            "/etc/resolv.conf",
        ));
        if let Some(app_dir) = spec.app_dir {
            mounts.push(read_only_bind(app_dir, APP_DIR));
        }
        for dir in PRIVATE_DIRS {
            mounts.push(
                json!({"destination": dir, "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777", TMP_SIZE]}),
            );
        }
        let memory = i64::try_from(spec.limits.memory_bytes).unwrap_or(i64::MAX);
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": uid, "gid": uid},
                "args": [self.init.to_string_lossy(), "--", "/bin/sh", "-c", spec.command],
                "env": env,
                "cwd": if spec.app_dir.is_some() { APP_DIR } else { NO_APP_DIR_CWD },
                "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                                 "permitted": [], "ambient": []},
                "noNewPrivileges": true,
                "oomScoreAdj": 500,
            },
            "root": {"path": self.rootfs, "readonly": true},
            "hostname": spec.hostname.chars().take(63).collect::<String>(),
            "mounts": mounts,
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                    {"type": "network", "path": spec.netns_path},
                ],
                "cgroupsPath": format!("/miren/{}", spec.id),
                "resources": {
                    "devices": [{"allow": false, "access": "rwm"}],
                    "memory": {"limit": memory, "swap": memory},
                    "pids": {"limit": spec.limits.pids},
                    "cpu": {"quota": i64::from(spec.limits.cpu_millis) * 100, "period": 100_000},
                },
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                ],
                "readonlyPaths": [
                    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                ],
                "seccomp": seccomp_profile(),
            },
        })
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.bundles.join(id)
    }

    /// Writes the bundle of `spec` and starts it detached, its stdout and stderr on `output`;
    /// the pid of the container's first process (a child of this process, which is the
    /// subreaper).
    ///
    /// # Errors
    /// [`SandboxError::Io`] for the bundle, [`SandboxError::Runtime`] when runc fails.
    pub fn run(&self, spec: &ContainerSpec<'_>, output: OwnedFd) -> Result<u32, SandboxError> {
        let bundle = self.bundle(spec.id);
        let io = |what: &str| {
            let what = format!("{what} {}", bundle.display());
            move |e| SandboxError::io(what, e)
        };
        std::fs::create_dir_all(&bundle).map_err(io("creating"))?;
        let resolv = bundle.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {}\n", spec.nameserver))
            .and_then(|()| {
                std::fs::set_permissions(&resolv, std::fs::Permissions::from_mode(0o644))
            })
            .map_err(io("writing resolv.conf in"))?;
        let config = serde_json::to_vec_pretty(&self.config(spec)).unwrap_or_default();
        std::fs::write(bundle.join("config.json"), config).map_err(io("writing config.json in"))?;
        let pid_file = bundle.join("pid");
        let runc_log = bundle.join("runc.log");
        let stderr = output.try_clone().map_err(io("sharing the log of"))?;
        let started = self.runc_with(
            &[
                "--log",
                &runc_log.to_string_lossy(),
                "run",
                "--detach",
                "--pid-file",
                &pid_file.to_string_lossy(),
                "--bundle",
                &bundle.to_string_lossy(),
                spec.id,
            ],
            Stdio::from(output),
            Stdio::from(stderr),
        );
        if let Err(mut e) = started {
            // runc's own error (its stderr is the instance's output).
            if let (SandboxError::Runtime { detail, .. }, Some(error)) =
                (&mut e, last_runc_error(&runc_log))
            {
                *detail = error;
            }
            self.delete(spec.id);
            return Err(e);
        }
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| SandboxError::Runtime {
                op: format!("starting container {}", spec.id),
                detail: "runc wrote no pid file".into(),
            })
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to every process of container `id`.
    ///
    /// # Errors
    /// [`SandboxError::Runtime`] when runc fails (e.g. the container is gone).
    pub fn signal_all(&self, id: &str, signal: &str) -> Result<(), SandboxError> {
        self.runc(&["kill", "--all", id, signal]).map(drop)
    }

    /// Sends SIGTERM to the app's processes in container `id`: every process but the
    /// container's first (`tini`, host pid `init`) and the `/bin/sh -c` wrapper tini started.
    /// Were the wrapper terminated, tini would exit with it and the kernel would SIGKILL the
    /// whole pid namespace before the app's own SIGTERM handler ran; this way the wrapper
    /// exits once the app did.
    ///
    /// # Errors
    /// [`SandboxError::Runtime`] when runc cannot list the container's processes.
    pub fn terminate_app(&self, id: &str, init: u32) -> Result<(), SandboxError> {
        let listed = self.runc(&["ps", "--format", "json", id])?;
        let pids: Vec<u32> = serde_json::from_str(&listed).map_err(|e| SandboxError::Runtime {
            op: format!("listing the processes of container {id}"),
            detail: format!("runc ps printed {listed:?}: {e}"),
        })?;
        for pid in pids {
            if pid == init || is_wrapper_shell(pid, init) {
                continue;
            }
            if let Ok(raw) = i32::try_from(pid) {
                // Gone meanwhile (ESRCH) is fine.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        Ok(())
    }

    /// True when the memory cgroup of container `id` recorded an OOM kill (read it before
    /// [`Runtime::delete`]).
    pub fn oom_killed(&self, id: &str) -> bool {
        let v1 = format!("/sys/fs/cgroup/memory/miren/{id}/memory.oom_control");
        let v2 = format!("/sys/fs/cgroup/miren/{id}/memory.events");
        [v1, v2].iter().any(|file| {
            std::fs::read_to_string(file).is_ok_and(|text| {
                text.lines()
                    .filter_map(|l| l.strip_prefix("oom_kill "))
                    .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
            })
        })
    }

    /// Removes container `id` (killing what is left of it), its cgroups and its bundle.
    pub fn delete(&self, id: &str) {
        if let Err(error) = self.runc(&["delete", "--force", id]) {
            tracing::debug!(%error, container = id, "runc delete");
        }
        let _ = std::fs::remove_dir_all(self.bundle(id));
    }

    /// The ids of every container in this agent's runc state.
    pub fn list(&self) -> Vec<String> {
        let out = Command::new(&self.runc)
            .arg("--root")
            .arg(&self.root)
            .args(["list", "--quiet"])
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Runs runc with `args`: what it printed on stdout.
    fn runc(&self, args: &[&str]) -> Result<String, SandboxError> {
        self.runc_with(args, Stdio::piped(), Stdio::piped())
    }

    fn runc_with(
        &self,
        args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<String, SandboxError> {
        let mut command = Command::new(&self.runc);
        command
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // The agent's umask (0077, for its state) would make the device nodes and mount
        // points runc creates inaccessible to the instance's user.
        // SAFETY: umask is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            });
        }
        let failed = |detail: String| SandboxError::Runtime {
            op: format!("runc {}", args.join(" ")),
            detail,
        };
        let out = command
            .output()
            .map_err(|e| failed(format!("could not run {}: {e}", self.runc.display())))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if detail.is_empty() {
            detail = out.status.to_string();
        }
        Err(failed(detail))
    }
}

/// The message of the last error runc logged to `log` (logrus text lines:
/// `time=… level=error msg="…"`).
fn last_runc_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("level=error"))?;
    let msg = line.split_once("msg=")?.1;
    let msg = msg
        .strip_prefix('"')
        .map_or(msg, |m| m.rsplit_once('"').map_or(m, |(m, _)| m));
    Some(msg.replace("\\\"", "\""))
}

/// True when `pid` is a child of `init` running `/bin/sh -c …` (the wrapper of the app's
/// command; an app that was `exec`ed in its place runs something else).
fn is_wrapper_shell(pid: u32, init: u32) -> bool {
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(") ")?;
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        });
    parent == Some(init)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.starts_with(b"/bin/sh\0-c\0"))
}

/// How a container's first process ended: the metric's reason and the words for people
/// (e.g. "exit status: 3", "killed by SIGKILL").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The reason as a closed set (`miren_instance_exits_total{reason}`).
    pub reason: ExitReason,
    /// The description shown by `miren app show` and logged.
    pub how: String,
}

impl Ended {
    fn new(reason: ExitReason, how: impl Into<String>) -> Self {
        Self {
            reason,
            how: how.into(),
        }
    }
}

/// How the container's first process ended, waiting without blocking (polls every 100 ms).
/// A process that is not this agent's child (adopted from an earlier agent) is watched until
/// it is gone; its status is then unknown.
pub async fn wait_exit(pid: u32) -> Ended {
    let Ok(raw) = i32::try_from(pid) else {
        return Ended::new(ExitReason::Unknown, "invalid pid");
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on one pid only writes `status`.
        let reaped = unsafe { libc::waitpid(raw, &raw mut status, libc::WNOHANG) };
        if reaped == raw {
            return describe_status(status);
        }
        if reaped < 0 && !super::instance::is_running(pid) {
            return Ended::new(
                ExitReason::Unknown,
                "exited (adopted from an earlier agent, status unknown)",
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn describe_status(status: i32) -> Ended {
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        let reason = if code == 0 {
            ExitReason::Completed
        } else {
            ExitReason::Exited
        };
        Ended::new(reason, format!("exit status: {code}"))
    } else if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        let name = nix::sys::signal::Signal::try_from(signal)
            .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned());
        Ended::new(ExitReason::Signaled, format!("killed by {name}"))
    } else {
        Ended::new(ExitReason::Unknown, format!("status {status}"))
    }
}

/// Makes this process the reaper of its orphaned descendants, so the first process of every
/// detached container (whose runc exits at once) stays its child.
///
/// # Errors
/// [`SandboxError::Io`] when the kernel refuses.
pub fn become_subreaper() -> Result<(), SandboxError> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SandboxError::io(
            "becoming the child subreaper of the instances".into(),
            std::io::Error::last_os_error(),
        ))
    }
}

/// The uid (and gid) the instances of `app` run as: stable, unprivileged, and different for
/// different apps (a hash of the name into a range of a million ids above 100000).
pub fn app_uid(app: &str) -> u32 {
    // FNV-1a: stable across builds and platforms.
    let hash = app.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    APP_UID_BASE + hash % APP_UID_COUNT
}

fn read_only_bind(source: &Path, destination: &str) -> Value {
    json!({"destination": destination, "type": "bind", "source": source,
           "options": ["rbind", "ro", "nosuid", "nodev"]})
}

/// Like the default profile of container engines, as a deny list: no mounts or new
/// namespaces, no kernel modules, keyrings, BPF, ptrace, clock or swap changes, reboot; `clone3`
/// answers ENOSYS so libc falls back to `clone`, whose namespace flags are refused.
fn seccomp_profile() -> Value {
    const EPERM: u32 = 1;
    const ENOSYS: u32 = 38;
    const DENIED: &[&str] = &[
        "mount",
        "umount",
        "umount2",
        "unshare",
        "setns",
        "pivot_root",
        "chroot",
        "mount_setattr",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "keyctl",
        "add_key",
        "request_key",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "kcmp",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "create_module",
        "reboot",
        "swapon",
        "swapoff",
        "acct",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "syslog",
        "quotactl",
        "open_by_handle_at",
        "name_to_handle_at",
        "iopl",
        "ioperm",
        "vhangup",
        "lookup_dcookie",
        "uselib",
        "nfsservctl",
    ];
    // CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
    const NAMESPACE_FLAGS: [u64; 7] = [
        0x0002_0000,
        0x0200_0000,
        0x0400_0000,
        0x0800_0000,
        0x1000_0000,
        0x2000_0000,
        0x4000_0000,
    ];
    let mut syscalls = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    for flag in NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": seccomp_architectures(),
        "syscalls": syscalls,
    })
}

/// The native architecture and its compat ABIs (a filter that omits them lets a process
/// escape it through the 32-bit syscall entry).
fn seccomp_architectures() -> &'static [&'static str] {
    if cfg!(target_arch = "x86_64") {
        &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    } else if cfg!(target_arch = "aarch64") {
        &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    } else {
        &[]
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_else(|| PATH.split(':').map(PathBuf::from).collect())
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime {
            runc: "/usr/sbin/runc".into(),
            init: "/usr/bin/tini".into(),
            root: "/state/runc".into(),
            rootfs: "/state/rootfs".into(),
            bundles: "/state/bundles".into(),
        }
    }

    #[test]
    fn config_contains_the_instance_unprivileged_and_limited() {
        let env = BTreeMap::from([("PORT".to_owned(), "8080".to_owned())]);
        let spec = ContainerSpec {
            id: "1x2",
            app: "shop",
            hostname: "web-1x2",
            command: "python3 app.py",
            env: &env,
            app_dir: Some(Path::new("/srv/shop")),
            netns_path: "/run/netns/miren-s1x2".into(),
            nameserver: "10.88.0.1".parse().unwrap(),
            limits: InstanceLimits {
                memory_bytes: 256 << 20,
                pids: 64,
                cpu_millis: 500,
            },
        };
        let config = runtime().config(&spec);
        let process = &config["process"];
        assert_eq!(
            process["args"],
            json!(["/usr/bin/tini", "--", "/bin/sh", "-c", "python3 app.py"])
        );
        assert_eq!(process["user"]["uid"], json!(app_uid("shop")));
        assert!(app_uid("shop") >= APP_UID_BASE);
        assert_ne!(app_uid("shop"), app_uid("shop2"));
        assert_eq!(process["noNewPrivileges"], json!(true));
        assert_eq!(process["capabilities"]["effective"], json!([]));
        assert_eq!(process["capabilities"]["bounding"], json!([]));
        assert!(
            process["env"]
                .as_array()
                .unwrap()
                .contains(&json!("PORT=8080"))
        );
        assert_eq!(config["root"]["readonly"], json!(true));
        let linux = &config["linux"];
        assert_eq!(linux["resources"]["memory"]["limit"], json!(256 << 20));
        assert_eq!(linux["resources"]["pids"]["limit"], json!(64));
        assert_eq!(linux["resources"]["cpu"]["quota"], json!(50_000));
        assert_eq!(linux["cgroupsPath"], json!("/miren/1x2"));
        let namespaces = linux["namespaces"].as_array().unwrap();
        for kind in ["pid", "ipc", "uts", "mount", "network"] {
            assert!(namespaces.iter().any(|n| n["type"] == kind), "{kind}");
        }
        assert!(
            namespaces
                .iter()
                .any(|n| n["path"] == json!("/run/netns/miren-s1x2"))
        );
        let mounts = config["mounts"].as_array().unwrap();
        let app = mounts.iter().find(|m| m["destination"] == APP_DIR).unwrap();
        assert_eq!(app["source"], json!("/srv/shop"));
        assert!(app["options"].as_array().unwrap().contains(&json!("ro")));
        assert_eq!(process["cwd"], json!(APP_DIR));

        // Without app code: no /app, and the instance starts in its private /tmp.
        let config = runtime().config(&ContainerSpec {
            app_dir: None,
            ..spec
        });
        let mounts = config["mounts"].as_array().unwrap();
        assert!(!mounts.iter().any(|m| m["destination"] == APP_DIR));
        assert_eq!(config["process"]["cwd"], json!("/tmp"));
        let tmp = mounts.iter().find(|m| m["destination"] == "/tmp").unwrap();
        assert_eq!(tmp["type"], json!("tmpfs"));
        // Nothing of the host's /var, /run or /root.
        for hidden in ["/var", "/root", "/home"] {
            assert!(!mounts.iter().any(|m| m["destination"] == hidden));
        }
    }

    #[test]
    fn seccomp_denies_mounts_namespaces_and_modules() {
        let profile = seccomp_profile();
        let denied = profile["syscalls"][0]["names"].as_array().unwrap();
        for name in ["mount", "unshare", "setns", "init_module", "bpf", "ptrace"] {
            assert!(denied.contains(&json!(name)), "{name}");
        }
        let clone_rules = profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["names"] == json!(["clone"]))
            .count();
        assert_eq!(clone_rules, 7);
    }

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(
            describe_status(3 << 8),
            Ended::new(ExitReason::Exited, "exit status: 3")
        );
        assert_eq!(
            describe_status(0),
            Ended::new(ExitReason::Completed, "exit status: 0")
        );
        assert_eq!(
            describe_status(9),
            Ended::new(ExitReason::Signaled, "killed by SIGKILL")
        );
    }
}
