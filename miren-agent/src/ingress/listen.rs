//! The ingress listeners: bound by the agent at startup (so a taken port is a clear startup
//! error), then an accept loop per listener on each ingress thread that wraps each
//! connection in a [`HeadGuard`], completes TLS when the listener has it, and hands the
//! stream to Pingora's HTTP/1 and HTTP/2 (h2 over TLS, h2c) server, until shutdown.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
    time::Duration,
};

use pingora::{
    apps::{HttpServerApp, ServerApp},
    listeners::tls::Acceptor,
    protocols::{Stream, l4::listener::Listener},
};
use prometheus::IntGauge;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::listeners::Inherited;

use super::{
    IngressError,
    head_guard::{HeadGuard, HeadLimits},
    http1::IngressApp,
};

/// A bound listening socket, not yet registered with an event loop.
#[derive(Debug)]
pub struct BoundSocket {
    socket: std::net::TcpListener,
    local_addr: SocketAddr,
    what: &'static str,
}

impl BoundSocket {
    /// Binds `addr` for `what` (e.g. "--http-addr").
    ///
    /// # Errors
    /// [`IngressError::Bind`] naming the address and the flag.
    pub fn bind(addr: SocketAddr, what: &'static str) -> Result<Self, IngressError> {
        let bind_error = |source| IngressError::Bind { addr, what, source };
        let socket = std::net::TcpListener::bind(addr).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        Self::adopt(socket, addr, what)
    }

    /// `addr`'s listener from `inherited` (systemd socket activation or the agent being
    /// upgraded), else a fresh bind of `addr`.
    ///
    /// # Errors
    /// [`IngressError::Bind`] naming the address and the flag.
    pub fn inherit_or_bind(
        inherited: &mut Inherited,
        addr: SocketAddr,
        what: &'static str,
    ) -> Result<Self, IngressError> {
        match inherited.take_tcp(addr) {
            Some(socket) => Self::adopt(socket, addr, what),
            None => Self::bind(addr, what),
        }
    }

    /// Wraps a non-blocking listening socket.
    fn adopt(
        socket: std::net::TcpListener,
        addr: SocketAddr,
        what: &'static str,
    ) -> Result<Self, IngressError> {
        let local_addr =
            socket
                .local_addr()
                .map_err(|source| IngressError::Bind { addr, what, source })?;
        Ok(Self {
            socket,
            local_addr,
            what,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The listening socket, to hand over to a new agent.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// A handle on the socket registered with the event loop of the runtime entered now
    /// (one per ingress thread; the kernel hands each connection to one of them).
    ///
    /// # Errors
    /// [`IngressError::Bind`] when the descriptor cannot be duplicated or registered.
    pub fn register(&self) -> Result<BoundListener, IngressError> {
        let error = |source| IngressError::Bind {
            addr: self.local_addr,
            what: self.what,
            source,
        };
        let socket = self.socket.try_clone().map_err(error)?;
        let listener = tokio::net::TcpListener::from_std(socket).map_err(error)?;
        Ok(BoundListener {
            listener: listener.into(),
            local_addr: self.local_addr,
        })
    }
}

/// A listener registered with one ingress thread's event loop, not yet accepting.
#[derive(Debug)]
pub struct BoundListener {
    listener: Listener,
    local_addr: SocketAddr,
}

/// How long connections accepted just before a stop get to send their first request before
/// the idle ones (no request yet, or kept alive between requests) are closed.
const SETTLE: Duration = Duration::from_secs(1);

/// One open client connection, counted in its listener's gauge until dropped.
struct Counted(IntGauge);

impl Counted {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts connections on `bound` until `shutdown` turns true; each connection is served by a
/// task on the calling thread's runtime and counted in `open` until its task ends. Then
/// drains: requests in flight get up to `grace` to complete (kept-alive connections are closed
/// after their current request, idle ones after [`SETTLE`]); what is still running after
/// `grace` is cut when the thread's runtime ends.
pub async fn serve(
    bound: BoundListener,
    app: Arc<IngressApp>,
    tls: Option<Arc<Acceptor>>,
    limits: HeadLimits,
    open: IntGauge,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = bound.listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let mut stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(listener = %bound.local_addr, %error, "accept failed");
                // Out of file descriptors: give others time to close theirs.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let counted = Counted::new(&open);
        let _ = stream.set_nodelay();
        let app = Arc::clone(&app);
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _counted = counted;
            let stream: Stream = match tls {
                None => Box::new(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(limits.timeout, acceptor.tls_handshake(stream)).await
                    {
                        Ok(Ok(tls_stream)) => Box::new(tls_stream),
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let guarded: Stream = Box::new(HeadGuard::new(stream, limits));
            ServerApp::process_new(&app, guarded, &shutdown).await;
        });
    }
    let deadline = tokio::time::Instant::now() + grace;
    let listener = bound.local_addr;
    // This thread's handle on the listening socket; the socket itself stays open as long as
    // another handle does (other threads, a new agent it was handed to).
    drop(bound);
    connections.close();
    let _ = tokio::time::timeout(SETTLE.min(grace), connections.wait()).await;
    // Ends the waits for a next request on kept-alive connections.
    app.http_cleanup().await;
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            %listener,
            connections = connections.len(),
            "shutdown grace over: closing connections with requests still in flight"
        );
    }
}
