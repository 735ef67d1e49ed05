//! The cluster listener's server: TLS (when configured) and the token check first, then the
//! routes.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Path as UrlPath, Request, State, connect_info::Connected},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse as _, Response},
    routing::get,
    serve::{IncomingStream, Listener},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::either::Either;

use super::{AUTHORIZATION, AbortOnDrop, ClusterLinkError, ClusterToken, LocalPorts};
use crate::{
    bundle::{BundleHash, BundleStore},
    settings::ClusterTlsFiles,
};

/// How long a client gets to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed TLS handshakes are logged at most once per this interval (with the number of those
/// not logged in between), so a scanner cannot flood the log.
const HANDSHAKE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const HANDSHAKEN_QUEUE: usize = 64;
/// TLS handshakes in progress at once; further connections wait to be accepted.
const CONCURRENT_HANDSHAKES: usize = 128;

/// What the routes share.
#[derive(Debug)]
struct LinkState {
    token: ClusterToken,
    bundles: Arc<BundleStore>,
    ports: Arc<dyn LocalPorts>,
}

/// Binds `addr` and serves the other agents of the cluster until `shutdown` turns true; with
/// `tls`, only over mutual TLS (a client certificate signed by the cluster's CA is required).
///
/// # Errors
/// [`ClusterLinkError::Tls`] when a TLS file is unusable, [`ClusterLinkError::Bind`] when the
/// address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    token: ClusterToken,
    tls: Option<&ClusterTlsFiles>,
    bundles: Arc<BundleStore>,
    ports: Arc<dyn LocalPorts>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ClusterLinkError> {
    let tls = tls.map(super::tls::server_config).transpose()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ClusterLinkError::Bind { addr, source })?;
    let listener = LinkListener::new(listener, tls.map(TlsAcceptor::from))
        .map_err(|source| ClusterLinkError::Bind { addr, source })?;
    let state = Arc::new(LinkState {
        token,
        bundles,
        ports,
    });
    let router = Router::new()
        .route("/cluster/v1/bundles/{hash}", get(bundle))
        .route("/cluster/v1/ports", get(node_ports))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state);
    tracing::info!(%addr, tls = listener.is_tls(), "serving the cluster listener");
    Ok(tokio::spawn(async move {
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<PeerAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
        if let Err(error) = served {
            tracing::error!(%error, "the cluster listener failed");
        }
    }))
}

/// The cluster listener's connections: plain TCP, or TLS connections whose handshake
/// (including the client's certificate) succeeded.
struct LinkListener {
    local: SocketAddr,
    incoming: Incoming,
}

/// Where [`LinkListener`]'s connections come from.
enum Incoming {
    /// Accepted directly.
    Plain(TcpListener),
    /// Handshaken by the acceptor task, which accepts and runs each handshake in a task of
    /// its own (a slow client delays no other).
    Tls {
        handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        _acceptor: AbortOnDrop,
    },
}

impl LinkListener {
    fn new(listener: TcpListener, tls: Option<TlsAcceptor>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let incoming = match tls {
            None => Incoming::Plain(listener),
            Some(acceptor) => {
                let (sender, handshaken) = mpsc::channel(HANDSHAKEN_QUEUE);
                Incoming::Tls {
                    handshaken,
                    _acceptor: AbortOnDrop(tokio::spawn(accept_tls(listener, acceptor, sender))),
                }
            }
        };
        Ok(Self { local, incoming })
    }

    fn is_tls(&self) -> bool {
        matches!(self.incoming, Incoming::Tls { .. })
    }
}

impl Listener for LinkListener {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.incoming {
            Incoming::Plain(listener) => {
                let (stream, peer) = Listener::accept(listener).await;
                (Either::Left(stream), peer)
            }
            Incoming::Tls { handshaken, .. } => match handshaken.recv().await {
                Some((stream, peer)) => (Either::Right(stream), peer),
                // The acceptor only ends when aborted, which drops this listener first.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The address of the node (or anyone) that sent a request, for the log.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

impl Connected<IncomingStream<'_, LinkListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, LinkListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// Accepts TCP connections on `listener` and hands those whose TLS handshake succeeds to
/// `handshaken`; failed handshakes are logged (rate-limited). Runs until aborted.
async fn accept_tls(
    mut listener: TcpListener,
    acceptor: TlsAcceptor,
    handshaken: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let failures = Arc::new(Mutex::new(FailedHandshakes::default()));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_HANDSHAKES));
    loop {
        let Ok(turn) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (stream, peer) = Listener::accept(&mut listener).await;
        let (acceptor, handshaken, failures) =
            (acceptor.clone(), handshaken.clone(), Arc::clone(&failures));
        tokio::spawn(async move {
            let _turn = turn;
            let problem =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = handshaken.send((stream, peer)).await;
                        return;
                    }
                    Ok(Err(error)) => error.to_string(),
                    Err(_) => format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                };
            failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(peer, &problem);
        });
    }
}

/// Failed TLS handshakes: one is logged (warn) per [`HANDSHAKE_LOG_INTERVAL`], the others
/// counted into the next message.
#[derive(Debug, Default)]
struct FailedHandshakes {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl FailedHandshakes {
    fn record(&mut self, peer: SocketAddr, problem: &str) {
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < HANDSHAKE_LOG_INTERVAL)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            %peer,
            problem,
            unlogged_failures_before = self.unlogged,
            "refused a cluster connection whose TLS handshake failed (not TLS, or no client certificate of --cluster-ca)"
        );
        self.last_logged = Some(now);
        self.unlogged = 0;
    }
}

/// Lets a request through only with the cluster's token; anything else gets 401, logged.
async fn authorize(
    State(state): State<Arc<LinkState>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if state.token.admits(header) {
        return next.run(request).await;
    }
    tracing::warn!(
        %peer,
        path = %request.uri().path(),
        presented = header.is_some(),
        "refused a cluster request without the cluster token"
    );
    (
        StatusCode::UNAUTHORIZED,
        "the cluster token is missing or wrong; every agent of a cluster needs the same --cluster-token-file\n",
    )
        .into_response()
}

/// `GET /cluster/v1/bundles/{hash}`: the bundle's tar as received.
async fn bundle(State(state): State<Arc<LinkState>>, UrlPath(hash): UrlPath<String>) -> Response {
    let Some(blob) = hash
        .parse::<BundleHash>()
        .ok()
        .and_then(|hash| state.bundles.blob(&hash))
    else {
        return (StatusCode::NOT_FOUND, "no such bundle on this node\n").into_response();
    };
    match tokio::fs::File::open(&blob).await {
        Ok(file) => Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response(),
        Err(error) => {
            tracing::warn!(%error, blob = %blob.display(), "cannot read a bundle for a peer");
            (StatusCode::NOT_FOUND, "no such bundle on this node\n").into_response()
        }
    }
}

/// `GET /cluster/v1/ports`: this node's node ports with its own counters.
async fn node_ports(State(state): State<Arc<LinkState>>) -> Response {
    axum::Json(state.ports.local_ports().await).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_handshakes_are_logged_once_per_interval_and_the_rest_counted() {
        let peer = SocketAddr::from(([10, 0, 0, 9], 40000));
        let mut failures = FailedHandshakes::default();
        failures.record(peer, "first");
        let logged = failures.last_logged.expect("the first one is logged");
        failures.record(peer, "second");
        failures.record(peer, "third");
        assert_eq!((failures.last_logged, failures.unlogged), (Some(logged), 2));
        failures.last_logged = Some(logged - HANDSHAKE_LOG_INTERVAL);
        failures.record(peer, "after the interval");
        assert_eq!(failures.unlogged, 0);
        assert!(failures.last_logged > Some(logged - HANDSHAKE_LOG_INTERVAL));
    }
}
