//! The HTTP ingress: a Pingora reverse proxy inside the agent's process, on `--http-addr` and
//! `--https-addr`, served by `--http-threads` threads that each run a single-threaded tokio
//! runtime (no work stealing or cross-thread wake-ups on the request path).
//!
//! - [`routing`]: Host → route → ready endpoints, swapped atomically on every revision.
//! - [`activation`]: scale from zero (one start shared by concurrent requests).
//! - `request`: what every request path decides alike (answers of the ingress's own,
//!   forwarding headers, failures, access log and metrics).
//! - `http1`: the listeners' application; our HTTP/1 proxy loop with `upstream_pool`, the
//!   thread-local upstream connections.
//! - `proxy`: HTTP/2 streams on Pingora's `ProxyHttp` (gRPC over h2c to the instance).
//! - `listen`: binding, accept loops, TLS, HTTP/1 + HTTP/2.
//! - `head_guard`, `framing`: slowloris, oversized heads and request smuggling.

mod access_log;
pub mod acme;
pub mod activation;
pub mod certs;
pub mod demand;
mod framing;
mod head_guard;
mod http1;
mod listen;
mod proxy;
mod request;
pub mod routing;
mod upstream_pool;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use pingora::{
    listeners::tls::Acceptor,
    server::configuration::ServerConf,
    tls::{ResolvesServerCert, ServerConfig, version},
};
use tokio::sync::watch;

use crate::{
    listeners::Inherited,
    metrics::{Metrics, ServiceMetrics},
};

use self::{
    activation::Activations,
    head_guard::HeadLimits,
    http1::IngressApp,
    listen::{BoundListener, BoundSocket},
    proxy::MirenProxy,
    routing::Routing,
};

/// Errors starting the ingress.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; free the port or pass another {what}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The flag that set it.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An ingress thread or its event loop could not be created.
    #[error(
        "cannot start the ingress's threads: {0}; lower --http-threads or raise the process limits"
    )]
    Thread(#[source] std::io::Error),
}

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// True when `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("\"{text}\" is not an address or CIDR range such as 10.0.0.0/8");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(invalid)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

/// Ingress settings (from the agent's flags).
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// Plain HTTP listener.
    pub http_addr: SocketAddr,
    /// TLS listener.
    pub https_addr: SocketAddr,
    /// Time a client has to send a whole request head.
    pub head_timeout: Duration,
    /// Largest request head.
    pub max_head_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// How long a request waits for a service to start from zero.
    pub boot_timeout: Duration,
    /// Peers whose X-Forwarded-* headers are kept (appended to).
    pub trusted_proxies: Vec<Cidr>,
    /// Threads serving both listeners (at least 1).
    pub threads: usize,
    /// How long requests in flight get to complete after a stop (`--shutdown-grace`).
    pub shutdown_grace: Duration,
}

/// What the proxy logic needs, shared by both listeners.
pub struct IngressState {
    settings: ProxySettings,
    routing: Arc<Routing>,
    activations: Arc<Activations>,
    metrics: Arc<Metrics>,
    /// The metric handles of requests no route matched.
    unrouted: ServiceMetrics,
    acme_challenge: ChallengeLookup,
    has_certificate: HostCheck,
}

impl std::fmt::Debug for IngressState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressState")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct ProxySettings {
    https_port: u16,
    max_body_bytes: u64,
    trusted_proxies: Vec<Cidr>,
}

/// Looks up the key authorization of a pending ACME HTTP-01 token.
pub type ChallengeLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Answers a yes/no question about a host.
pub type HostCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Hooks from the rest of the agent.
pub struct IngressHooks {
    /// Key authorization for a pending ACME HTTP-01 token.
    pub acme_challenge: ChallengeLookup,
    /// Whether a real certificate covers a host (plain HTTP then redirects to HTTPS).
    pub has_certificate: HostCheck,
    /// Picks the certificate for each TLS handshake by SNI.
    pub cert_resolver: Arc<dyn ResolvesServerCert>,
}

impl std::fmt::Debug for IngressHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressHooks").finish_non_exhaustive()
    }
}

/// The ingress with its listeners bound and its threads' event loops created.
#[derive(Debug)]
pub struct Ingress {
    settings: IngressSettings,
    addrs: (SocketAddr, SocketAddr),
    threads: Vec<IngressThread>,
    /// Handles on both listening sockets for a handover to a new agent (see
    /// [`Ingress::take_listening_fds`]).
    listening: Vec<OwnedFd>,
}

/// An ingress thread's event loop, shut down without waiting when dropped: an ingress dropped
/// before it ran (the agent stopping on a later startup error, inside its own runtime) must
/// not block, which would panic and hide the error.
#[derive(Debug)]
struct ThreadRuntime(Option<tokio::runtime::Runtime>);

impl ThreadRuntime {
    /// Runs `future` to completion on the event loop.
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.0
            .as_ref()
            .expect("taken only when dropped")
            .block_on(future)
    }
}

impl Drop for ThreadRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One ingress thread's runtime with both listeners registered in its event loop.
#[derive(Debug)]
struct IngressThread {
    runtime: ThreadRuntime,
    http: BoundListener,
    https: BoundListener,
}

impl Ingress {
    /// Takes both listeners from `inherited` (systemd socket activation, or the agent being
    /// upgraded) or binds them, and creates the event loop of every ingress thread.
    ///
    /// # Errors
    /// [`IngressError::Bind`] when an address is taken or not allowed;
    /// [`IngressError::Thread`] when an event loop cannot be created.
    pub fn bind(
        settings: IngressSettings,
        inherited: &mut Inherited,
    ) -> Result<Self, IngressError> {
        let http = BoundSocket::inherit_or_bind(inherited, settings.http_addr, "--http-addr")?;
        let https = BoundSocket::inherit_or_bind(inherited, settings.https_addr, "--https-addr")?;
        let listening = [&http, &https]
            .iter()
            .map(|socket| {
                socket
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| IngressError::Bind {
                        addr: socket.local_addr(),
                        what: "a handle for upgrades",
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        let threads = (0..settings.threads.max(1))
            .map(|_| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    // Access-log lines leave in one write whenever the loop goes idle.
                    .on_thread_park(access_log::flush)
                    .build()
                    .map_err(IngressError::Thread)?;
                let (http, https) = {
                    let _entered = runtime.enter();
                    (http.register()?, https.register()?)
                };
                Ok(IngressThread {
                    runtime: ThreadRuntime(Some(runtime)),
                    http,
                    https,
                })
            })
            .collect::<Result<_, IngressError>>()?;
        Ok(Self {
            settings,
            addrs: (http.local_addr(), https.local_addr()),
            threads,
            listening,
        })
    }

    /// Handles on the HTTP and HTTPS listening sockets, for a handover to a new agent
    /// (`--upgrade`). Taken before [`Ingress::serve`]; whoever holds them keeps the sockets
    /// open, so drop them when no handover can come any more.
    pub fn take_listening_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.listening)
    }

    /// The bound (HTTP, HTTPS) addresses.
    pub fn local_addrs(&self) -> (SocketAddr, SocketAddr) {
        self.addrs
    }

    /// Serves both listeners on the ingress threads until `shutdown` turns true, then drains
    /// (requests in flight get up to the settings' `shutdown_grace`).
    ///
    /// # Errors
    /// [`IngressError::Thread`] when a thread cannot be started.
    pub async fn serve(
        self,
        routing: Arc<Routing>,
        activations: Arc<Activations>,
        metrics: Arc<Metrics>,
        hooks: IngressHooks,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), IngressError> {
        let state = Arc::new(IngressState {
            settings: ProxySettings {
                https_port: self.addrs.1.port(),
                max_body_bytes: self.settings.max_body_bytes,
                trusted_proxies: self.settings.trusted_proxies.clone(),
            },
            routing,
            activations,
            unrouted: metrics.service_metrics("", ""),
            metrics,
            acme_challenge: hooks.acme_challenge,
            has_certificate: hooks.has_certificate,
        });
        let limits = HeadLimits {
            timeout: self.settings.head_timeout,
            max_bytes: self.settings.max_head_bytes,
        };
        let conf = Arc::new(ServerConf::default());
        let app = |tls| {
            let h2 = pingora::proxy::http_proxy(&conf, MirenProxy::new(Arc::clone(&state), tls));
            Arc::new(IngressApp::new(Arc::clone(&state), tls, h2))
        };
        // Shared by the threads, and with them Pingora's upstream connection pool (HTTP/2).
        let (http_app, https_app) = (app(false), app(true));
        let acceptor = Arc::new(tls_acceptor(hooks.cert_resolver));
        let grace = self.settings.shutdown_grace;
        let open = (
            state.metrics.http_connections("http"),
            state.metrics.http_connections("https"),
        );
        // Not kept open while draining: after a stop, new connections are refused at once.
        drop(self.listening);
        // Upstream connections are pooled across the threads, each registered with the event
        // loop of the thread that opened it: every loop runs until all threads have drained.
        let drained = Arc::new(tokio::sync::Barrier::new(self.threads.len()));
        let mut finished = Vec::new();
        for (i, thread) in self.threads.into_iter().enumerate() {
            let (http_app, https_app) = (Arc::clone(&http_app), Arc::clone(&https_app));
            let acceptor = Arc::clone(&acceptor);
            let (http_open, https_open) = open.clone();
            let shutdown = shutdown.clone();
            let drained = Arc::clone(&drained);
            let (done, finished_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("miren-http-{i}"))
                .spawn(move || {
                    thread.runtime.block_on(async {
                        tokio::join!(
                            listen::serve(
                                thread.http,
                                http_app,
                                None,
                                limits,
                                http_open,
                                shutdown.clone(),
                                grace
                            ),
                            listen::serve(
                                thread.https,
                                https_app,
                                Some(acceptor),
                                limits,
                                https_open,
                                shutdown,
                                grace
                            ),
                        );
                        drained.wait().await;
                    });
                    access_log::flush();
                    drop(done);
                })
                .map_err(IngressError::Thread)?;
            finished.push(finished_rx);
        }
        for finished_rx in finished {
            // Closed (never sent) when the thread's accept loops end.
            let _ = finished_rx.await;
        }
        Ok(())
    }
}

/// TLS 1.2 and 1.3 with the certificate picked by `resolver`, offering h2 and HTTP/1.1.
fn tls_acceptor(resolver: Arc<dyn ResolvesServerCert>) -> Acceptor {
    pingora::tls::install_default_crypto_provider();
    let mut config =
        ServerConfig::builder_with_protocol_versions(&[&version::TLS12, &version::TLS13])
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Acceptor::from_server_config(Arc::new(config))
}
