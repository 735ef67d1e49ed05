//! One running instance: `/bin/sh -c COMMAND` in the sandbox's namespace (through `ip netns
//! exec`, which also mounts its resolv.conf), in its own process group, with the service's
//! environment, the app directory as working directory, and stdout/stderr appended to a log
//! file. Stopping sends SIGTERM to the group, then SIGKILL after the shutdown timeout.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::Stdio,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::process::{Child, Command};

use super::{SandboxError, net::SandboxNet};

/// PATH given to every instance.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started process.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: Pid,
}

impl Process {
    /// Starts `command` in `net`'s namespace.
    ///
    /// # Errors
    /// [`SandboxError::Io`] when the log file or the process cannot be created.
    pub fn start(
        command: &str,
        net: &SandboxNet,
        env: &BTreeMap<String, String>,
        dir: &Path,
        log: &Path,
    ) -> Result<Self, SandboxError> {
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| SandboxError::io(format!("opening {}", log.display()), e))
        };
        let stdout = open_log()?;
        let stderr = open_log()?;
        let child = Command::new("ip")
            .args(["netns", "exec", &net.netns, "/bin/sh", "-c", command])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", dir)
            .envs(env)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| SandboxError::io(format!("starting `{command}`"), e))?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
            .ok_or_else(|| {
                SandboxError::io(
                    format!("starting `{command}`"),
                    std::io::Error::other("the process exited at once"),
                )
            })?;
        Ok(Self { child, pid })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Waits until the process exits; a description of how it ended.
    pub async fn wait(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("waiting failed: {e}"),
        }
    }

    /// SIGTERM to the process group, SIGKILL after `timeout`, then reaps.
    pub async fn stop(mut self, timeout: Duration) {
        let _ = killpg(self.pid, Signal::SIGTERM);
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            let _ = killpg(self.pid, Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Children that outlived the shell.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }
}

/// True when every address in `ports` accepts a TCP connection.
pub async fn accepts_connections(ports: &[SocketAddrV4]) -> bool {
    for addr in ports {
        let connect = tokio::net::TcpStream::connect(SocketAddr::V4(*addr));
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(Ok(_)) => {}
            _ => return false,
        }
    }
    true
}
