//! The daemon: opens the store, serves the control API and `/metrics`, and — when external
//! interfaces are given — starts the node-port data plane chosen by `--dataplane` with a
//! [`Reconciler`] keeping it in line with the desired state, until SIGINT or SIGTERM.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Instant,
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::{self, ApiError, ApiState},
    control::{ControlError, ControlPlane, ControlSettings},
    dataplane::{
        ActiveDataplane, DataplaneError,
        select::{SelectSettings, select},
    },
    ingress::{
        Ingress, IngressError, IngressHooks,
        acme::{self, AcmeSettings, Http01Tokens},
        activation::{Activations, Activator, NoActivator},
        certs::{CertError, CertStore},
        routing::{LoadTracker, Routing},
    },
    metrics::{self, Metrics, MetricsError, MetricsState},
    reconcile::Reconciler,
    sandbox::{
        SandboxError, SandboxSettings,
        dns::{DnsError, DnsServer, resolvers_from},
        ipam::Subnet,
        runner::Runner,
    },
    settings::AgentSettings,
    store::{SqliteStore, StoreError},
};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored state could not be loaded.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The API socket could not be bound.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The certificate store could not be opened.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The ingress listeners could not be bound.
    #[error(transparent)]
    Ingress(#[from] IngressError),
    /// The sandboxes' resolver could not start.
    #[error("starting the sandbox DNS resolver: {0}")]
    Dns(#[source] DnsError),
    /// The sandbox bridge or address store could not be set up.
    #[error("setting up sandboxes: {0}")]
    Sandbox(#[from] SandboxError),
    /// The data plane could not start.
    #[error("starting the node-port data plane: {0}")]
    Dataplane(#[from] Box<DataplaneError>),
    /// The settings do not allow a data plane.
    #[error("{0}")]
    Settings(String),
    /// Signal handlers or the API server failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// [`AgentError`] when a component cannot start.
pub async fn run(settings: AgentSettings) -> Result<(), AgentError> {
    let started = Instant::now();
    // First, so a stop request during startup is not lost (the default action would kill the
    // agent before it could remove what it created).
    let signal_error = |source| AgentError::Io {
        op: "installing signal handlers",
        source,
    };
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let store = SqliteStore::open(&settings.state_dir)?;
    let control = Arc::new(ControlPlane::open(
        Box::new(store),
        ControlSettings {
            validation: settings.validation_context(),
            port_range: settings.port_range.clone(),
        },
    )?);
    let api_listener = api::bind(&settings.api_socket).await?;
    let metrics_listener = metrics::bind(settings.metrics_addr).await?;
    let ingress = Ingress::bind(settings.ingress_settings())?;
    let (http_addr, https_addr) = ingress.local_addrs();
    let certs = CertStore::open(&settings.state_dir.join("certs"))?;
    let dataplane = start_dataplane(&settings)?;
    let metrics = Arc::new(Metrics::new(
        dataplane.active.as_ref().map_or("none", |a| a.mode()),
    )?);
    if let Some(active) = &dataplane.active {
        let reconciler = Reconciler::new(
            Arc::clone(&control),
            Arc::clone(active),
            dataplane.node_addrs.clone(),
            Arc::clone(&metrics),
        );
        tokio::spawn(reconciler.run());
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = Arc::new(LoadTracker::default());
    let routing = Arc::new(Routing::new(ROUTE_TIMEOUT, Arc::clone(&load)));
    routing.refresh(&control);
    tokio::spawn(Arc::clone(&routing).follow(Arc::clone(&control), stop_rx.clone()));
    let runner = if settings.run_sandboxes {
        Some(Runner::new(
            Arc::clone(&control),
            SandboxSettings {
                bridge: settings.sandbox_bridge.clone(),
                subnet: Subnet::parse(&settings.sandbox_subnet)?,
                state_dir: settings.state_dir.join("sandbox"),
                keep_running: settings.keep_sandboxes,
            },
            load,
            routing.subscribe(),
        )?)
    } else {
        None
    };
    let api_state = Arc::new(ApiState {
        control: Arc::clone(&control),
        started,
        state_dir: settings.state_dir.clone(),
        dataplane: dataplane.active.clone(),
        no_dataplane_reason: dataplane.reason,
        traffic: api::traffic::TrafficSampler::default(),
        ingress_revision: routing.subscribe(),
        certs: Arc::clone(&certs),
        runner: runner.clone(),
    });
    let ingress_metrics = Arc::clone(&metrics);
    let metrics_state = Arc::new(MetricsState {
        metrics,
        control: Arc::clone(&control),
        dataplane: dataplane.active,
    });
    let activator: Arc<dyn Activator> = match &runner {
        Some(runner) => Arc::clone(runner) as Arc<dyn Activator>,
        None => Arc::new(NoActivator),
    };
    let activations = Arc::new(Activations::new(
        activator,
        Arc::clone(&routing),
        settings.boot_timeout,
    ));
    // HTTP-01 challenges in flight; the ingress's HTTP listener answers them.
    let acme_tokens = Arc::new(Http01Tokens::default());
    let hooks = IngressHooks {
        acme_challenge: {
            let tokens = Arc::clone(&acme_tokens);
            Box::new(move |token| tokens.key_authorization(token))
        },
        has_certificate: {
            let certs = Arc::clone(&certs);
            Box::new(move |host| certs.has_certificate(host))
        },
        cert_resolver: certs.resolver(),
    };
    let io = |op| move |source| AgentError::Io { op, source };
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    if let Some(directory) = &settings.acme_directory {
        tokio::spawn(acme::run(
            AcmeSettings {
                directory: directory.clone(),
                email: settings.acme_email.clone(),
                ca_file: settings.acme_ca_file.clone(),
                account_dir: settings.state_dir.join("acme"),
            },
            control,
            Arc::clone(&certs),
            acme_tokens,
            stop_rx.clone(),
        ));
    }
    tracing::info!(
        socket = %settings.api_socket.display(),
        metrics = %settings.metrics_addr,
        http = %http_addr,
        https = %https_addr,
        state_dir = %settings.state_dir.display(),
        "miren-agent ready"
    );
    let dns = match &runner {
        Some(runner) => Some((start_dns(&settings).await?, Arc::clone(runner))),
        None => None,
    };
    let sandboxes = async {
        if let Some((server, runner)) = dns {
            tokio::spawn(server.serve(runner, stop_rx.clone()));
        }
        if let Some(runner) = runner {
            runner.run(stop_rx.clone()).await;
        }
    };
    let (api_served, metrics_served, ingress_served, ()) = tokio::join!(
        api::serve(api_listener, api_state, stopped(stop_rx.clone())),
        metrics::serve(metrics_listener, metrics_state, stopped(stop_rx.clone())),
        ingress.serve(
            routing,
            activations,
            ingress_metrics,
            hooks,
            stop_rx.clone()
        ),
        sandboxes,
    );
    let _ = std::fs::remove_file(&settings.api_socket);
    ingress_served?;
    api_served.map_err(io("serving the API"))?;
    metrics_served.map_err(io("serving /metrics"))
}

/// Binds the sandboxes' resolver on the bridge address, forwarding to the host's resolvers.
async fn start_dns(settings: &AgentSettings) -> Result<DnsServer, AgentError> {
    let gateway = Subnet::parse(&settings.sandbox_subnet)?.gateway();
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    DnsServer::bind((gateway, 53).into(), resolvers_from(&resolv_conf))
        .await
        .map_err(AgentError::Dns)
}

/// Upstream timeout of routes without their own.
const ROUTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The running data plane (if any), or why there is none.
struct RunningDataplane {
    active: Option<Arc<ActiveDataplane>>,
    node_addrs: Vec<Ipv4Addr>,
    reason: String,
}

/// Starts the data plane `--dataplane` asks for when `--iface` interfaces are given.
fn start_dataplane(settings: &AgentSettings) -> Result<RunningDataplane, AgentError> {
    if settings.ifaces.is_empty() {
        return Ok(RunningDataplane {
            active: None,
            node_addrs: Vec::new(),
            reason: "no --iface given".into(),
        });
    }
    let node_addrs: Vec<Ipv4Addr> = settings
        .node_ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    if node_addrs.is_empty() {
        return Err(AgentError::Settings(
            "node ports need the node's own IPv4 addresses; pass --node-ip ADDR (repeatable)"
                .into(),
        ));
    }
    enable_forwarding()?;
    let selected = select(&SelectSettings {
        choice: settings.dataplane,
        ifaces: &settings.ifaces,
        bpf_pin_dir: &settings.bpf_pin_dir,
        udp_timeout: settings.udp_timeout,
    })
    .map_err(Box::new)?;
    tracing::info!(mode = selected.dataplane.mode(), reason = %selected.reason, "node-port data plane started");
    Ok(RunningDataplane {
        active: Some(Arc::new(ActiveDataplane::new(
            selected.dataplane,
            selected.reason,
        ))),
        node_addrs,
        reason: String::new(),
    })
}

/// Turns on IPv4 forwarding in the agent's network namespace: DNATed packets are routed on
/// to the sandboxes by the kernel.
fn enable_forwarding() -> Result<(), AgentError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| AgentError::Io {
        op: "enabling net.ipv4.ip_forward",
        source,
    })
}
