//! One running instance: its container (see [`super::container`]), how it ended, and its stop:
//! SIGTERM to the app's own processes (not to the shell wrapping its command), SIGKILL to every
//! process of the container after the shutdown timeout, then the container is deleted.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    SandboxError,
    container::{ContainerSpec, Ended, Runtime, wait_exit},
};
use crate::metrics::ExitReason;

/// A started (or adopted) container.
#[derive(Debug)]
pub struct Process {
    runtime: Arc<Runtime>,
    container: String,
    pid: u32,
    /// The memory limit, named when the instance is OOM-killed.
    memory_limit: u64,
}

impl Process {
    /// Starts `spec` with its stdout and stderr on `output` (blocking: runs runc).
    ///
    /// # Errors
    /// [`SandboxError`] when the bundle cannot be written or runc fails.
    pub fn start(
        runtime: &Arc<Runtime>,
        spec: &ContainerSpec<'_>,
        output: OwnedFd,
    ) -> Result<Self, SandboxError> {
        let pid = runtime.run(spec, output)?;
        Ok(Self {
            runtime: Arc::clone(runtime),
            container: spec.id.to_owned(),
            pid,
            memory_limit: spec.limits.memory_bytes,
        })
    }

    /// The container `container` with first process `pid`, started by an earlier agent, if it
    /// still runs.
    pub fn adopt(
        runtime: &Arc<Runtime>,
        container: &str,
        pid: u32,
        memory_limit: u64,
    ) -> Option<Self> {
        is_running(pid).then(|| Self {
            runtime: Arc::clone(runtime),
            container: container.to_owned(),
            pid,
            memory_limit,
        })
    }

    /// The host pid of the container's first process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the container's first process exits, removes the container, and tells
    /// how it ended (an OOM kill at the memory limit named as such).
    pub async fn wait(&mut self) -> Ended {
        let ended = wait_exit(self.pid).await;
        if self.remove().await {
            Ended {
                reason: ExitReason::Oom,
                how: format!(
                    "out of memory: killed at the memory limit of {} MiB (--instance-memory); {}",
                    self.memory_limit >> 20,
                    ended.how
                ),
            }
        } else {
            ended
        }
    }

    /// SIGTERM to the app's processes ([`Runtime::terminate_app`]), SIGKILL to every process
    /// of the container when it still runs after `timeout`, then removes the container.
    pub async fn stop(self, timeout: Duration) {
        let (runtime, container, init) =
            (Arc::clone(&self.runtime), self.container.clone(), self.pid);
        let sent =
            tokio::task::spawn_blocking(move || runtime.terminate_app(&container, init)).await;
        if let Ok(Err(error)) = sent {
            tracing::debug!(%error, "sending SIGTERM to an instance");
        }
        let deadline = Instant::now() + timeout;
        let exited = tokio::time::timeout_at(deadline.into(), wait_exit(self.pid)).await;
        if exited.is_err() {
            tracing::info!(container = %self.container, "instance still running after its shutdown timeout; killing it");
            self.signal("KILL").await;
            let _ = tokio::time::timeout(Duration::from_secs(5), wait_exit(self.pid)).await;
        }
        self.remove().await;
    }

    async fn signal(&self, signal: &'static str) {
        let runtime = Arc::clone(&self.runtime);
        let container = self.container.clone();
        let sent =
            tokio::task::spawn_blocking(move || runtime.signal_all(&container, signal)).await;
        if let Ok(Err(error)) = sent {
            tracing::debug!(%error, "signalling an instance");
        }
    }

    /// Deletes the container; true when its memory cgroup saw an OOM kill.
    async fn remove(&self) -> bool {
        let runtime = Arc::clone(&self.runtime);
        let container = self.container.clone();
        tokio::task::spawn_blocking(move || {
            let oom = runtime.oom_killed(&container);
            runtime.delete(&container);
            oom
        })
        .await
        .unwrap_or(false)
    }
}

/// True when process `pid` exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
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
