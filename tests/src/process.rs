//! Running the real `miren-agent` and `miren` binaries from tests, and temporary directories.

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The workspace's root directory (where `examples/`, `contrib/` and `target/tools/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// `examples/NAME` of this repository.
pub fn example(name: &str) -> PathBuf {
    workspace_root().join("examples").join(name)
}

/// Path of a binary of this workspace, built next to the running test executable
/// (`target/<profile>/NAME`). `cargo xtask test` builds all binaries before the tests.
///
/// # Panics
/// If the binary is missing, with the command that builds it.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>/<name>
    let mut dir = exe.parent().expect("target directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing; build it with `cargo build --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// `miren-agent run` in the caller's namespaces with its state in `dir/state`, its API on
/// `dir/agent.sock` (also returned) and its settings in `dir/agent.toml`.
pub fn agent_in_dir(dir: &Path) -> (Command, PathBuf) {
    let socket = dir.join("agent.sock");
    let mut command = Command::new(binary("miren-agent"));
    command
        .arg("run")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--config")
        .arg(dir.join("agent.toml"));
    (command, socket)
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, unique directory whose name contains `tag`.
    pub fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("miren-test-{}-{seq}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `miren-agent run`; SIGKILLed and reaped on drop. Its output goes to a log file
/// that is shown when it fails to start.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `command` (a `miren-agent run …` whose API socket is `socket`), logging to `log`,
    /// and waits up to 20 s until the API answers.
    ///
    /// # Panics
    /// If the agent exits or does not answer in time (with its log).
    pub fn start(mut command: Command, socket: &Path, log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("create agent log");
        let child = command
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file)
            .spawn()
            .expect("start miren-agent");
        let mut agent = Self {
            child,
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return agent;
            }
            if let Some(status) = agent.child.try_wait().expect("poll miren-agent") {
                panic!("miren-agent exited early ({status}):\n{}", agent.log_text());
            }
            if Instant::now() > deadline {
                panic!(
                    "miren-agent did not serve {} within 20 s:\n{}",
                    socket.display(),
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent gracefully: SIGTERM (it then stops its instances and removes their
    /// namespaces and its bridge), waits up to `timeout`, then SIGKILL. Returns how it ended,
    /// `None` if it had to be killed. Once the agent has exited, returns its status at once.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Waits up to `timeout` for the agent to exit on its own (no signal sent); its status,
    /// or `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs the `miren` CLI against this agent.
    pub fn miren(&self, args: &[&str]) -> Output {
        miren(&self.socket, args)
    }

    /// What the agent has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    /// SIGTERM first, so an agent running sandboxes removes them; SIGKILL after 15 s.
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

/// Runs `miren --socket SOCKET ARGS…` and returns its output.
pub fn miren(socket: &Path, args: &[&str]) -> Output {
    Command::new(binary("miren"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run miren")
}

/// A private bpffs mounted at a fresh temporary directory, for pinned objects; unmounted
/// (which drops everything pinned in it) and removed on drop.
#[derive(Debug)]
pub struct BpfPinDir(TempDir);

impl BpfPinDir {
    /// Mounts a bpffs at a fresh, unique directory whose name contains `tag`.
    ///
    /// # Panics
    /// If the mount fails (bpffs support and root are needed).
    pub fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("bpffs-{tag}"));
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a bpffs at {} failed ({status})",
            dir.path().display()
        );
        Self(dir)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for BpfPinDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}
