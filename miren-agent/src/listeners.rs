//! Listening sockets this agent did not bind itself, so that they outlive an agent process:
//!
//! - **systemd socket activation**: `LISTEN_PID`/`LISTEN_FDS` (`sd_listen_fds(3)`) name the
//!   descriptors from 3 on that the service manager opened for this process.
//! - **upgrade handover**: `miren-agent run … --upgrade` asks the agent running with the same
//!   `--state-dir` for its listening sockets over `<state-dir>/upgrade.sock` (mode 0600, only
//!   a peer of the same user — root — is served), which sends them with `SCM_RIGHTS`, as
//!   Pingora's graceful upgrade does. The sockets are the same kernel objects, so connections
//!   wait in their backlog while the agents change instead of being refused.
//!
//! Either way the sockets are matched to the agent's settings by their local address (a TCP
//! address for `--http-addr`, `--https-addr`, `--metrics-addr`, a path for `--api-socket`), so
//! neither side needs to agree on an order or on names.
//!
//! The handover protocol (one connection): the new agent sends [`REQUEST`]; the old one gets
//! ready (stops its API and supervisors, saves its instance records) and answers with one
//! message carrying the descriptors; the new agent starts, serves, and sends [`READY`]; the old
//! one then stops accepting, drains its requests and exits.

use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockType, SockaddrLike,
        SockaddrStorage, UnixAddr, getsockname, getsockopt, recvmsg, sendmsg, sockopt,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
};

/// What the new agent sends to ask for the sockets.
const REQUEST: &[u8] = b"miren-upgrade/1\n";
/// The header of the old agent's answer (the descriptors ride along with it).
const HANDOVER: &[u8] = b"miren-sockets/1\n";
/// What the new agent sends once it serves.
const READY: &[u8] = b"ready\n";
/// The most descriptors one handover carries (HTTP, HTTPS, metrics, API, with room to spare).
const MAX_FDS: usize = 16;
/// How long either side waits for the other's next message while the handover is set up.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors taking over listening sockets.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// A `LISTEN_*` variable is not what `sd_listen_fds(3)` describes.
    #[error("invalid {var}={value:?} from the service manager: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A passed descriptor could not be inspected or is not a listening stream socket.
    #[error("descriptor {fd} passed to the agent: {reason}")]
    Descriptor {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// No agent answered on the upgrade socket.
    #[error(
        "no running agent to upgrade: cannot connect to {path}: {source}; start it without --upgrade, or pass the --state-dir of the running agent"
    )]
    NoAgent {
        /// The upgrade socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A step of the handover failed.
    #[error("upgrade handover ({op}, {path}): {source}")]
    Handover {
        /// What was being done.
        op: &'static str,
        /// The upgrade socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The other side broke the protocol (or is not a miren-agent of this version).
    #[error("upgrade handover over {path}: {what}")]
    Protocol {
        /// The upgrade socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

/// The address a listening socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LocalAddr {
    Tcp(SocketAddr),
    Unix(Option<PathBuf>),
}

impl std::fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp {addr}"),
            Self::Unix(Some(path)) => write!(f, "unix {}", path.display()),
            Self::Unix(None) => f.write_str("unix (unnamed)"),
        }
    }
}

/// Listening sockets handed to this process, waiting to be taken by the parts that serve them.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<(OwnedFd, LocalAddr)>,
    source: &'static str,
}

impl Inherited {
    /// The sockets systemd passed to this process (none when `LISTEN_PID` is not this
    /// process). The `LISTEN_*` variables stay (changing the environment of a process that
    /// already runs threads is unsound); children see a `LISTEN_PID` that is not theirs, which
    /// the protocol says to ignore, and the sockets are close-on-exec. Instances get only the
    /// environment of their container.
    ///
    /// # Errors
    /// [`ListenerError::Env`] for malformed variables; [`ListenerError::Descriptor`] when a
    /// passed descriptor is not a listening TCP or Unix stream socket.
    pub fn from_systemd() -> Result<Self, ListenerError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        let (Some(pid), Some(fds)) = (pid, fds) else {
            return Ok(Self::default());
        };
        let env = |var, value: &str, reason| ListenerError::Env {
            var,
            value: value.to_owned(),
            reason,
        };
        let pid: u32 = pid
            .parse()
            .map_err(|_| env("LISTEN_PID", &pid, "not a process id"))?;
        if pid != std::process::id() {
            return Ok(Self::default());
        }
        let count: RawFd = fds
            .parse()
            .ok()
            .filter(|n| (0..=1024).contains(n))
            .ok_or_else(|| env("LISTEN_FDS", &fds, "not a count of descriptors"))?;
        let mut sockets = Vec::new();
        for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count {
            // SAFETY: sd_listen_fds(3): descriptors 3 .. 3 + LISTEN_FDS are open, belong to
            // this process (LISTEN_PID matched) and nothing else in the agent owns them.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // Not inherited by instances or other children.
            fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|errno| {
                ListenerError::Descriptor {
                    fd,
                    reason: format!("setting close-on-exec: {errno}"),
                }
            })?;
            let addr = inspect(owned.as_fd())?;
            sockets.push((owned, addr));
        }
        Ok(Self {
            sockets,
            source: "systemd socket activation",
        })
    }

    /// The TCP listener bound to `addr`, if one was passed; in non-blocking mode. An IPv4
    /// wildcard address (`0.0.0.0:80`) also takes an IPv6 wildcard socket on the same port
    /// (`[::]:80`, what systemd's `ListenStream=80` creates; it accepts IPv4 too unless
    /// `BindIPv6Only=ipv6-only`), when no exact match was passed.
    pub fn take_tcp(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self
            .take(|local| *local == LocalAddr::Tcp(addr))
            .or_else(|| {
                self.take(
                    |local| matches!(local, LocalAddr::Tcp(l) if serves_v4_wildcard(*l, addr)),
                )
            })?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        tracing::info!(%addr, from = self.source, "listening on an inherited socket");
        Some(listener)
    }

    /// The Unix listener bound to `path`, if one was passed; in non-blocking mode.
    pub fn take_unix(&mut self, path: &Path) -> Option<std::os::unix::net::UnixListener> {
        let fd = self.take(|local| match local {
            LocalAddr::Unix(Some(bound)) => same_path(bound, path),
            _ => false,
        })?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        tracing::info!(path = %path.display(), from = self.source, "listening on an inherited socket");
        Some(listener)
    }

    /// Closes the sockets nobody took, logging each (a passed socket no setting names).
    pub fn close_unused(self) {
        for (_, addr) in self.sockets {
            tracing::warn!(socket = %addr, from = self.source, "no setting names this inherited socket: closed");
        }
    }

    fn take(&mut self, matches: impl Fn(&LocalAddr) -> bool) -> Option<OwnedFd> {
        let index = self.sockets.iter().position(|(_, local)| matches(local))?;
        Some(self.sockets.swap_remove(index).0)
    }
}

/// Whether `local` is the IPv6 wildcard on the port of `wanted`, an IPv4 wildcard address.
fn serves_v4_wildcard(local: SocketAddr, wanted: SocketAddr) -> bool {
    wanted.ip() == std::net::Ipv4Addr::UNSPECIFIED
        && local.ip() == std::net::Ipv6Addr::UNSPECIFIED
        && local.port() == wanted.port()
}

/// The first descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// Whether two socket paths name the same file (literally or after resolving links).
fn same_path(bound: &Path, wanted: &Path) -> bool {
    bound == wanted
        || matches!(
            (bound.canonicalize(), wanted.canonicalize()),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The local address of a listening stream socket.
fn inspect(fd: BorrowedFd<'_>) -> Result<LocalAddr, ListenerError> {
    let raw = fd.as_raw_fd();
    let bad = |reason: String| ListenerError::Descriptor { fd: raw, reason };
    let kind = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(format!("not a socket: {e}")))?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    if kind != SockType::Stream || !listening {
        return Err(bad("not a listening stream socket".into()));
    }
    let addr: SockaddrStorage =
        getsockname(raw).map_err(|e| bad(format!("reading its address: {e}")))?;
    match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            let listener = std::net::TcpListener::from(
                fd.try_clone_to_owned()
                    .map_err(|e| bad(format!("duplicating: {e}")))?,
            );
            let local = listener
                .local_addr()
                .map_err(|e| bad(format!("reading its address: {e}")))?;
            Ok(LocalAddr::Tcp(local))
        }
        Some(AddressFamily::Unix) => Ok(LocalAddr::Unix(
            addr.as_unix_addr()
                .and_then(UnixAddr::path)
                .map(Path::to_owned),
        )),
        other => Err(bad(format!("unsupported address family {other:?}"))),
    }
}

/// The upgrade socket of the agent with state directory `state_dir`.
pub fn upgrade_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade.sock")
}

/// The running agent's side: waits for a `--upgrade` agent to ask for the sockets.
#[derive(Debug)]
pub struct UpgradeListener {
    listener: UnixListener,
    path: PathBuf,
}

impl UpgradeListener {
    /// Creates `<state-dir>/upgrade.sock` (replacing a stale one, or the one of the agent this
    /// one took over from), mode 0600.
    ///
    /// # Errors
    /// [`ListenerError::Handover`] when the socket cannot be created.
    pub fn bind(state_dir: &Path) -> Result<Self, ListenerError> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = upgrade_socket(state_dir);
        let error = |op| {
            let path = path.clone();
            move |source| ListenerError::Handover { op, path, source }
        };
        std::fs::create_dir_all(state_dir).map_err(error("creating the state directory"))?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(error("removing the old socket")(e));
            }
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(error("binding"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(error("restricting its mode"))?;
        Ok(Self { listener, path })
    }

    /// The next valid upgrade request. Peers of another user and connections that do not
    /// speak the protocol are logged and dropped.
    pub async fn accept(&self) -> Handover {
        loop {
            match self.try_accept().await {
                Ok(handover) => return handover,
                Err(error) => tracing::warn!(%error, "refused an upgrade request"),
            }
        }
    }

    async fn try_accept(&self) -> Result<Handover, ListenerError> {
        let io_error = |op| {
            let path = self.path.clone();
            move |source| ListenerError::Handover { op, path, source }
        };
        let (mut stream, _) = self
            .listener
            .accept()
            .await
            .map_err(io_error("accepting"))?;
        let peer = getsockopt(&stream, sockopt::PeerCredentials)
            .map_err(|e| io_error("reading the peer's credentials")(e.into()))?;
        let own = nix::unistd::geteuid().as_raw();
        if peer.uid() != own {
            return Err(self.protocol(format!(
                "peer pid {} runs as uid {}, not {own}",
                peer.pid(),
                peer.uid()
            )));
        }
        let mut request = [0; REQUEST.len()];
        tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read_exact(&mut request))
            .await
            .map_err(|_| self.protocol("no request within 30 s".into()))?
            .map_err(io_error("reading the request"))?;
        if request != REQUEST {
            return Err(self.protocol("not an upgrade request".into()));
        }
        tracing::info!(
            pid = peer.pid(),
            "a new agent asks to take over (--upgrade)"
        );
        Ok(Handover {
            stream,
            path: self.path.clone(),
            peer: peer.pid(),
        })
    }

    fn protocol(&self, what: String) -> ListenerError {
        ListenerError::Protocol {
            path: self.path.clone(),
            what,
        }
    }
}

/// An accepted upgrade request: the running agent sends its sockets, then waits for the new
/// agent to serve.
#[derive(Debug)]
pub struct Handover {
    stream: UnixStream,
    path: PathBuf,
    peer: i32,
}

impl Handover {
    /// The new agent's process id.
    pub fn peer(&self) -> i32 {
        self.peer
    }

    /// Sends `fds` (listening sockets) to the new agent.
    ///
    /// # Errors
    /// [`ListenerError::Handover`] when the message cannot be sent.
    pub async fn send(&self, fds: &[BorrowedFd<'_>]) -> Result<(), ListenerError> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let socket = self.stream.as_raw_fd();
        let sent = self
            .stream
            .async_io(Interest::WRITABLE, || {
                sendmsg::<UnixAddr>(
                    socket,
                    &[IoSlice::new(HANDOVER)],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await
            .map_err(|source| ListenerError::Handover {
                op: "sending the sockets",
                path: self.path.clone(),
                source,
            })?;
        if sent != HANDOVER.len() {
            return Err(ListenerError::Protocol {
                path: self.path.clone(),
                what: format!("sent {sent} of {} bytes", HANDOVER.len()),
            });
        }
        Ok(())
    }

    /// Waits until the new agent says it serves (up to `timeout`).
    ///
    /// # Errors
    /// [`ListenerError::Protocol`] when it closes the connection or says anything else
    /// first, or does not answer in time.
    pub async fn wait_ready(mut self, timeout: Duration) -> Result<(), ListenerError> {
        let mut answer = [0; READY.len()];
        let read = tokio::time::timeout(timeout, self.stream.read_exact(&mut answer)).await;
        match read {
            Ok(Ok(_)) if answer == READY => Ok(()),
            Ok(Ok(_)) => Err(self.protocol("the new agent answered something else than ready")),
            Ok(Err(error)) => Err(self.protocol(&format!(
                "the new agent went away before it served ({error})"
            ))),
            Err(_) => Err(self.protocol("the new agent did not serve in time")),
        }
    }

    fn protocol(&self, what: &str) -> ListenerError {
        ListenerError::Protocol {
            path: self.path.clone(),
            what: what.to_owned(),
        }
    }
}

/// The new agent's side of an upgrade: tells the old agent when it serves.
#[derive(Debug)]
pub struct Upgrade {
    stream: UnixStream,
    path: PathBuf,
}

impl Upgrade {
    /// Asks the agent running with `state_dir` for its listening sockets and waits for them
    /// (the old agent first stops its API and supervisors, which can take a few seconds).
    ///
    /// # Errors
    /// [`ListenerError::NoAgent`] when no agent listens there; other variants when the
    /// exchange fails.
    pub async fn request(state_dir: &Path) -> Result<(Inherited, Self), ListenerError> {
        let path = upgrade_socket(state_dir);
        let mut stream =
            UnixStream::connect(&path)
                .await
                .map_err(|source| ListenerError::NoAgent {
                    path: path.clone(),
                    source,
                })?;
        let io_error = |op| {
            let path = path.clone();
            move |source| ListenerError::Handover { op, path, source }
        };
        stream
            .write_all(REQUEST)
            .await
            .map_err(io_error("sending the request"))?;
        let socket = stream.as_raw_fd();
        let receive = stream.async_io(Interest::READABLE, || receive_fds(socket));
        let (header, fds) = tokio::time::timeout(EXCHANGE_TIMEOUT, receive)
            .await
            .map_err(|_| ListenerError::Protocol {
                path: path.clone(),
                what: "the running agent did not hand over its sockets within 30 s".into(),
            })?
            .map_err(io_error("receiving the sockets"))?;
        if header != HANDOVER {
            return Err(ListenerError::Protocol {
                path,
                what: "the running agent answered without its sockets".into(),
            });
        }
        let sockets = fds
            .into_iter()
            .map(|fd| inspect(fd.as_fd()).map(|addr| (fd, addr)))
            .collect::<Result<_, _>>()?;
        Ok((
            Inherited {
                sockets,
                source: "the upgraded agent",
            },
            Self { stream, path },
        ))
    }

    /// Tells the old agent that this one serves, so it stops accepting and drains.
    ///
    /// # Errors
    /// [`ListenerError::Handover`] when the old agent is gone.
    pub async fn ready(mut self) -> Result<(), ListenerError> {
        self.stream
            .write_all(READY)
            .await
            .map_err(|source| ListenerError::Handover {
                op: "telling the old agent that this one serves",
                path: self.path,
                source,
            })
    }
}

/// One `recvmsg` of the handover message: its bytes and the descriptors it carried
/// (close-on-exec).
fn receive_fds(socket: RawFd) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = [0; 64];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let message = recvmsg::<UnixAddr>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for this
            // message; nothing else refers to them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = message.bytes;
    Ok((buf[..len].to_vec(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handover between two "agents" in one process: the sockets arrive, are matched by
    /// their addresses, and are the same kernel objects (a connection queued on the old
    /// handle is accepted on the new one).
    #[tokio::test]
    async fn handover_passes_listeners_matched_by_address() {
        let dir = std::env::temp_dir().join(format!("miren-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let unix_path = dir.join("api.sock");
        std::fs::create_dir_all(&dir).unwrap();
        let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();

        let listener = UpgradeListener::bind(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(upgrade_socket(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let old = tokio::spawn(async move {
            let handover = listener.accept().await;
            handover.send(&[tcp.as_fd(), unix.as_fd()]).await.unwrap();
            handover.wait_ready(Duration::from_secs(5)).await
        });
        let (mut inherited, upgrade) = Upgrade::request(&dir).await.unwrap();
        assert!(inherited.take_tcp("127.0.0.1:1".parse().unwrap()).is_none());
        let taken = inherited.take_tcp(tcp_addr).expect("the TCP listener");
        let api = inherited.take_unix(&unix_path).expect("the Unix listener");
        assert!(inherited.sockets.is_empty());
        upgrade.ready().await.unwrap();
        old.await.unwrap().unwrap();

        let _client = std::net::TcpStream::connect(tcp_addr).unwrap();
        taken.set_nonblocking(false).unwrap();
        taken.accept().unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&unix_path).unwrap();
        api.set_nonblocking(false).unwrap();
        api.accept().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_ipv4_wildcard_setting_takes_an_ipv6_wildcard_socket_on_its_port() {
        let wanted: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert!(serves_v4_wildcard("[::]:80".parse().unwrap(), wanted));
        assert!(!serves_v4_wildcard("[::]:81".parse().unwrap(), wanted));
        assert!(!serves_v4_wildcard("[::1]:80".parse().unwrap(), wanted));
        let specific: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(!serves_v4_wildcard("[::]:80".parse().unwrap(), specific));
    }

    /// A new agent that goes away before it serves is reported, not waited for.
    #[tokio::test]
    async fn a_new_agent_that_leaves_early_fails_the_handover() {
        let dir = std::env::temp_dir().join(format!("miren-handover-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let listener = UpgradeListener::bind(&dir).unwrap();
        let old = tokio::spawn(async move {
            let handover = listener.accept().await;
            handover.send(&[]).await.unwrap();
            handover.wait_ready(Duration::from_secs(5)).await
        });
        let (_, upgrade) = Upgrade::request(&dir).await.unwrap();
        drop(upgrade);
        let error = old.await.unwrap().unwrap_err().to_string();
        assert!(error.contains("went away before it served"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
