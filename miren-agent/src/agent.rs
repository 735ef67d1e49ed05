//! The daemon: opens the store, serves the control API and `/metrics`, and — when external
//! interfaces are given — starts the node-port data plane chosen by `--dataplane` with a
//! [`Reconciler`] keeping it in line with the desired state, until SIGINT or SIGTERM.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    api::{self, ApiError, ApiState},
    bundle::{self, BundleError, BundleStore, BundleUsers},
    cluster_link::{self, ClusterLinkError, ClusterToken, PeerClient},
    control::{ControlError, ControlPlane, ControlSettings, Registration, SubnetPlan},
    dataplane::{
        ActiveDataplane, DataplaneError,
        select::{SelectSettings, select},
    },
    ingress::{
        Ingress, IngressError, IngressHooks,
        acme::{self, AcmeSettings},
        activation::Activations,
        certs::{CertError, CertStore},
        demand::DemandReporter,
        routing::{LoadTracker, Routing, SnapshotInputs},
    },
    listeners::{Inherited, ListenerError, Upgrade, UpgradeListener, upgrade_socket},
    metrics::{self, Metrics, MetricsError, MetricsState},
    reconcile::Reconciler,
    sandbox::{
        SandboxError, SandboxSettings,
        dns::{DnsError, DnsServer, resolvers_from},
        ipam::Subnet,
        runner::Runner,
    },
    settings::{AgentSettings, StoreChoice},
    store::{EtcdOptions, EtcdStore, SqliteStore, Store, StoreError},
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
    /// The cluster token or listener is unusable.
    #[error(transparent)]
    ClusterLink(#[from] ClusterLinkError),
    /// The API socket could not be bound.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The certificate store could not be opened.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// The app code bundle store could not be opened.
    #[error("opening the app code bundles: {0}")]
    Bundles(#[from] BundleError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The ingress listeners could not be bound.
    #[error(transparent)]
    Ingress(#[from] IngressError),
    /// Inherited or handed-over listeners could not be taken.
    #[error(transparent)]
    Listeners(#[from] ListenerError),
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

/// The address other agents reach the cluster listener bound at `addr` on: `addr` itself,
/// or with an unspecified address the node's first IPv4 address.
fn advertised(addr: SocketAddr, node_ips: &[IpAddr]) -> Option<SocketAddr> {
    if !addr.ip().is_unspecified() {
        return Some(addr);
    }
    let ip = node_ips.iter().find(|ip| ip.is_ipv4()).copied();
    if ip.is_none() {
        tracing::warn!(%addr, "the cluster listener has no address other nodes can use: give --node-ip or a specific --cluster-addr");
    }
    Some(SocketAddr::new(ip?, addr.port()))
}

/// How long one request to etcd may take before the store counts as unavailable.
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The store `--store` chose.
async fn open_store(settings: &AgentSettings) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &settings.store {
        StoreChoice::Sqlite => {
            Arc::new(SqliteStore::open(&settings.state_dir, &settings.node_name)?)
        }
        StoreChoice::Etcd {
            endpoints,
            prefix,
            ca,
            cert,
            key,
        } => Arc::new(
            EtcdStore::connect(EtcdOptions {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                request_timeout: ETCD_REQUEST_TIMEOUT,
            })
            .await?,
        ),
    })
}

/// First and longest wait between attempts to reach an unavailable store at start.
const STORE_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));

/// Opens the store, the control plane and registers this node, waiting (with backoff, logged)
/// while the store is unavailable: a node may start before its cluster's etcd has a leader
/// (the cluster booting together, or the node's own member rejoining after an outage).
async fn join(settings: &AgentSettings) -> Result<(Arc<ControlPlane>, Subnet), AgentError> {
    let mut delay = STORE_RETRY.0;
    loop {
        match try_join(settings).await {
            Err(AgentError::Store(err @ StoreError::Unavailable { .. }))
            | Err(AgentError::Control(ControlError::Store(err @ StoreError::Unavailable { .. }))) =>
            {
                tracing::warn!(%err, retry_in = ?delay, "the store is unavailable; the agent starts once it answers");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(STORE_RETRY.1);
            }
            joined => return joined,
        }
    }
}

/// One attempt of [`join`].
async fn try_join(settings: &AgentSettings) -> Result<(Arc<ControlPlane>, Subnet), AgentError> {
    let store = open_store(settings).await?;
    tracing::info!(store = %store.describe(), node = %settings.node_name, "opened the store");
    let control = Arc::new(
        ControlPlane::open(
            store,
            ControlSettings {
                validation: settings.validation_context(),
                port_range: settings.port_range.clone(),
                node: settings.node_name.clone(),
                lease_ttl: settings.node_lease_ttl,
            },
        )
        .await?,
    );
    let plan = match settings.store {
        StoreChoice::Sqlite => SubnetPlan::Whole(settings.sandbox_subnet),
        StoreChoice::Etcd { .. } => SubnetPlan::Carve {
            cluster: settings.sandbox_subnet,
            prefix: settings.node_subnet_size,
        },
    };
    let node_subnet = control
        .register_node(&Registration {
            addresses: settings.node_ips.clone(),
            runs_instances: settings.run_sandboxes,
            cluster_addr: settings
                .cluster_link
                .as_ref()
                .and_then(|link| advertised(link.addr, &settings.node_ips)),
            subnet: plan,
        })
        .await?;
    Ok((control, node_subnet))
}

/// Runs the agent until SIGINT or SIGTERM (then drains the ingress for up to
/// `--shutdown-grace`), or until an agent started with `--upgrade` took over.
///
/// # Errors
/// [`AgentError`] when a component cannot start.
pub async fn run(settings: AgentSettings) -> Result<(), AgentError> {
    let started = Instant::now();
    // Before anything else: this removes the LISTEN_* variables from the environment.
    let mut inherited = Inherited::from_systemd()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (quiesce_tx, quiesce_rx) = watch::channel(false);
    let stopper = Stopper {
        quiesce: Arc::new(quiesce_tx),
        stop: Arc::new(stop_tx),
        grace: settings.shutdown_grace,
    };
    // Next, so a stop request during startup is not lost (the default action would kill the
    // agent before it could remove what it created).
    watch_signals(stopper.clone())?;
    // The running agent stops its API and supervisors before it answers, so the store and
    // the instance records are final when this one reads them.
    let upgrade = if settings.upgrade {
        tracing::info!(state_dir = %settings.state_dir.display(), "taking over from the running agent (--upgrade)");
        let (sockets, upgrade) = Upgrade::request(&settings.state_dir).await?;
        inherited = sockets;
        Some(upgrade)
    } else {
        None
    };
    // Before the store: a cluster token others may read, or unusable cluster TLS files, stop
    // the agent at once.
    let cluster_token = settings
        .cluster_link
        .as_ref()
        .map(|link| ClusterToken::load(&link.token_file))
        .transpose()?;
    let peer_client = cluster_token
        .clone()
        .map(|token| PeerClient::new(token, settings.cluster_tls()))
        .transpose()?;
    let (control, node_subnet) = join(&settings).await?;
    tracing::info!(node = %settings.node_name, subnet = %node_subnet, "registered the node");
    tokio::spawn(Arc::clone(&control).run_scheduler());
    if matches!(settings.store, StoreChoice::Etcd { .. }) {
        // Instances on other nodes reach this node's instances through it.
        enable_forwarding(&settings.node_ips)?;
    }
    // Dual stack where the node has an IPv6 --node-ip (IPv6 node ports): the same choice as
    // the reconciler's.
    let dual_stack = settings
        .node_ips
        .iter()
        .any(IpAddr::is_ipv6)
        .then(|| settings.dual_stack());
    tokio::spawn(crate::peer_routes::follow(
        Arc::clone(&control),
        dual_stack,
        quiesce_rx.clone(),
    ));
    let io = |op| move |source| AgentError::Io { op, source };
    let metrics_listener = metrics::bind(settings.metrics_addr, &mut inherited).await?;
    let mut ingress = Ingress::bind(settings.ingress_settings(), &mut inherited)?;
    // The API socket after these: once it accepts connections, the ingress and metrics
    // ports are bound (clients and scripts that wait for the socket may connect at once).
    // A socket from systemd stays systemd's: its file is not removed on exit.
    let (api_listener, api_socket_ours) = match inherited.take_unix(&settings.api_socket) {
        Some(listener) => (
            tokio::net::UnixListener::from_std(listener)
                .map_err(io("registering the inherited API socket"))?,
            upgrade.is_some(),
        ),
        None => (api::bind(&settings.api_socket).await?, true),
    };
    inherited.close_unused();
    let (http_addr, https_addr) = ingress.local_addrs();
    // What a later `--upgrade` agent gets.
    let mut handover_fds = ingress.take_listening_fds();
    for fd in [metrics_listener.as_fd(), api_listener.as_fd()] {
        handover_fds.push(
            fd.try_clone_to_owned()
                .map_err(io("keeping the listeners for an upgrade"))?,
        );
    }
    let upgrade_listener = UpgradeListener::bind(&settings.state_dir)?;
    let dataplane = start_dataplane(&settings)?;
    let metrics = Arc::new(Metrics::new(
        dataplane.active.as_ref().map_or("none", |a| a.mode()),
    )?);
    let certs = CertStore::open(
        &settings.state_dir.join("certs"),
        Arc::clone(&control),
        Arc::clone(&metrics),
    )
    .await?;
    tokio::spawn(Arc::clone(&certs).follow(stop_rx.clone()));
    let bundles = Arc::new(BundleStore::open(
        &settings.state_dir.join("bundles"),
        settings.max_bundle_bytes,
    )?);
    if let Some(active) = &dataplane.active {
        let reconciler = Reconciler::new(
            Arc::clone(&control),
            Arc::clone(active),
            settings.node_ips.clone(),
            dual_stack,
            Arc::clone(&metrics),
        );
        // Ends with the handover too: the new agent's reconciler takes over the data plane.
        let mut quiesce = quiesce_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = reconciler.run() => {}
                _ = quiesce.wait_for(|stop| *stop) => {}
            }
        });
    }

    let load = Arc::new(LoadTracker::default());
    let routing = Arc::new(Routing::new(SnapshotInputs {
        default_timeout: ROUTE_TIMEOUT,
        load: Arc::clone(&load),
        metrics: Arc::clone(&metrics),
    }));
    routing.refresh(&control);
    tokio::spawn(Arc::clone(&routing).follow(Arc::clone(&control), stop_rx.clone()));
    let runner = if settings.run_sandboxes {
        Some(Runner::new(
            Arc::clone(&control),
            Arc::clone(&bundles),
            SandboxSettings {
                bridge: settings.sandbox_bridge.clone(),
                subnet: node_subnet,
                dual_stack: settings.dual_stack(),
                state_dir: settings.state_dir.join("sandbox"),
                keep_running: settings.keep_sandboxes,
                limits: settings.instance_limits,
                max_instances: usize::try_from(settings.limits.instances_per_node)
                    .unwrap_or(usize::MAX),
                listener_ports: vec![http_addr.port(), https_addr.port()],
                log_max: settings.instance_log_max,
            },
            Arc::clone(&load),
            routing.subscribe(),
            Arc::clone(&metrics),
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
        peers: peer_client.clone(),
        runner: runner.clone(),
        bundles: Arc::clone(&bundles),
    });
    if let (Some(link), Some(token), Some(peer_client)) =
        (&settings.cluster_link, cluster_token, peer_client)
    {
        cluster_link::serve(
            link.addr,
            token.clone(),
            link.tls.as_ref(),
            Arc::clone(&bundles),
            Arc::clone(&api_state) as Arc<dyn cluster_link::LocalPorts>,
            stop_rx.clone(),
        )
        .await?;
        tokio::spawn(cluster_link::follow_bundles(
            Arc::clone(&control),
            Arc::clone(&bundles),
            peer_client,
        ));
    }
    let bundle_users: Arc<dyn BundleUsers> = match &runner {
        Some(runner) => Arc::clone(runner) as Arc<dyn BundleUsers>,
        None => Arc::clone(&control) as Arc<dyn BundleUsers>,
    };
    tokio::spawn(bundle::collect_unused(
        bundles,
        bundle_users,
        control.subscribe(),
        quiesce_rx.clone(),
    ));
    let ingress_metrics = Arc::clone(&metrics);
    let metrics_state = Arc::new(MetricsState {
        metrics,
        control: Arc::clone(&control),
        dataplane: dataplane.active,
    });
    let demand = DemandReporter::new(Arc::clone(&control), Arc::clone(&load));
    tokio::spawn(Arc::clone(&demand).run(quiesce_rx.clone()));
    let activations = Arc::new(Activations::new(
        demand,
        Arc::clone(&routing),
        settings.boot_timeout,
    ));
    let hooks = IngressHooks {
        acme_challenge: {
            let control = Arc::clone(&control);
            Box::new(move |token| control.challenge(token))
        },
        has_certificate: {
            let certs = Arc::clone(&certs);
            Box::new(move |host| certs.has_certificate(host))
        },
        cert_resolver: certs.resolver(),
    };
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
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
            Arc::clone(&ingress_metrics),
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
        Some(runner) => Some((start_dns(node_subnet).await?, Arc::clone(runner))),
        None => None,
    };
    // The parts that change state (API, supervisors, DNS) end first on a handover
    // ("quiesce"); the listeners keep serving until the new agent does.
    let handover_runner = runner.clone();
    let quiesced = {
        let quiesce_rx = quiesce_rx.clone();
        async move {
            let dns =
                dns.map(|(server, runner)| tokio::spawn(server.serve(runner, quiesce_rx.clone())));
            let (api_served, ()) = tokio::join!(
                api::serve(api_listener, api_state, stopped(quiesce_rx.clone())),
                async {
                    if let Some(runner) = runner {
                        runner.run(quiesce_rx.clone()).await;
                    }
                },
            );
            if let Some(dns) = dns {
                let _ = dns.await;
            }
            api_served
        }
    };
    let (quiesced_tx, quiesced_rx) = watch::channel(false);
    let handed_over = Arc::new(AtomicBool::new(false));
    tokio::spawn(hand_over(
        upgrade_listener,
        handover_fds,
        stopper.clone(),
        quiesced_rx,
        Arc::clone(&handed_over),
        handover_runner,
    ));
    let (api_served, metrics_served, ingress_served, ()) = tokio::join!(
        async {
            let served = quiesced.await;
            quiesced_tx.send_replace(true);
            served
        },
        metrics::serve(metrics_listener, metrics_state, stopped(stop_rx.clone())),
        ingress.serve(
            routing,
            activations,
            ingress_metrics,
            hooks,
            stop_rx.clone()
        ),
        async {
            // Everything is registered and the ingress threads start accepting now (until
            // they do, connections wait in the listeners' backlog): the old agent may stop.
            if let Some(upgrade) = upgrade {
                match upgrade.ready().await {
                    Ok(()) => tracing::info!("took over from the previous agent"),
                    Err(error) => tracing::warn!(%error, "the previous agent is gone"),
                }
            }
        },
    );
    if !handed_over.load(Ordering::SeqCst) {
        // After a handover these name the new agent's sockets.
        if api_socket_ours {
            let _ = std::fs::remove_file(&settings.api_socket);
        }
        let _ = std::fs::remove_file(upgrade_socket(&settings.state_dir));
    }
    ingress_served?;
    api_served.map_err(io("serving the API"))?;
    metrics_served.map_err(io("serving /metrics"))
}

/// How long past `--shutdown-grace` the process may take to exit before it is ended anyway
/// (for whatever still runs: a supervisor stopping an instance, a blocking task).
const EXIT_MARGIN: Duration = Duration::from_secs(5);
/// How long the old agent waits for a new one to serve after it sent its sockets.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Stops the agent, in one step (a signal) or two (a handover: first the parts that change
/// state, then the listeners).
#[derive(Debug, Clone)]
struct Stopper {
    quiesce: Arc<watch::Sender<bool>>,
    stop: Arc<watch::Sender<bool>>,
    grace: Duration,
}

impl Stopper {
    /// Stops the API, the sandbox supervisors (instances keep running), the sandboxes'
    /// resolver and the reconciler.
    fn quiesce(&self) {
        self.quiesce.send_replace(true);
    }

    /// Stops everything: the listeners stop accepting and requests in flight get
    /// `--shutdown-grace` to complete. Whatever still runs `grace + EXIT_MARGIN` after the
    /// first call ends with the process.
    fn stop(&self, why: &str) {
        self.quiesce();
        if self.stop.send_replace(true) {
            return;
        }
        tracing::info!(grace = ?self.grace, "{why}: stopping");
        let limit = self.grace + EXIT_MARGIN;
        let deadline = std::thread::Builder::new()
            .name("miren-exit".into())
            .spawn(move || {
                std::thread::sleep(limit);
                tracing::error!(after = ?limit, "the agent did not stop in time: exiting now");
                // Lets the log writer thread write the line.
                std::thread::sleep(Duration::from_millis(100));
                std::process::exit(1);
            });
        if let Err(error) = deadline {
            tracing::error!(%error, "cannot bound the shutdown: no thread for the deadline");
        }
    }
}

/// Handles SIGINT and SIGTERM on a thread of their own, so a stop is honoured even when every
/// worker of the main runtime is busy: the first stops the agent, a second exits at once.
fn watch_signals(stopper: Stopper) -> Result<(), AgentError> {
    let io = |op| move |source| AgentError::Io { op, source };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("creating the signal thread's event loop"))?;
    let (mut interrupt, mut terminate) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt()).map_err(io("installing signal handlers"))?,
            signal(SignalKind::terminate()).map_err(io("installing signal handlers"))?,
        )
    };
    std::thread::Builder::new()
        .name("miren-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut signalled = false;
                loop {
                    let name = tokio::select! {
                        _ = interrupt.recv() => "SIGINT",
                        _ = terminate.recv() => "SIGTERM",
                    };
                    if signalled {
                        tracing::warn!("{name} again: exiting now");
                        std::thread::sleep(Duration::from_millis(100));
                        std::process::exit(1);
                    }
                    signalled = true;
                    stopper.stop(name);
                }
            });
        })
        .map_err(io("starting the signal thread"))?;
    Ok(())
}

/// Waits for a `--upgrade` agent and hands it `fds` (the listening sockets): first the parts
/// that change state stop (`quiesced` turns true once the API, the supervisors — instances
/// keep running and their records are saved — and the resolver have ended), then the sockets
/// are sent, and once the new agent serves, this one stops accepting and drains. The sockets
/// are closed here when the agent stops without a handover.
async fn hand_over(
    listener: UpgradeListener,
    fds: Vec<OwnedFd>,
    stopper: Stopper,
    mut quiesced: watch::Receiver<bool>,
    handed_over: Arc<AtomicBool>,
    runner: Option<Arc<Runner>>,
) {
    let mut stop = stopper.stop.subscribe();
    let handover = tokio::select! {
        handover = listener.accept() => handover,
        _ = stop.wait_for(|stop| *stop) => return,
    };
    // The new agent adopts the instances, even with --stop-instances-on-exit.
    if let Some(runner) = &runner {
        runner.keep_instances();
    }
    stopper.quiesce();
    let _ = quiesced.wait_for(|done| *done).await;
    // From here on the socket files belong to the new agent.
    handed_over.store(true, Ordering::SeqCst);
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let outcome = match handover.send(&borrowed).await {
        Ok(()) => {
            tracing::info!(
                pid = handover.peer(),
                "listening sockets handed over; waiting for the new agent to serve"
            );
            handover.wait_ready(READY_TIMEOUT).await
        }
        Err(error) => Err(error),
    };
    match outcome {
        Ok(()) => stopper.stop("the new agent serves"),
        Err(error) => {
            tracing::error!(%error, "the upgrade failed after this agent stopped its API and supervisors (instances keep running); start an agent again");
            stopper.stop("upgrade failed");
        }
    }
}

/// Binds the sandboxes' resolver on the bridge address, forwarding to the host's resolvers.
async fn start_dns(subnet: Subnet) -> Result<DnsServer, AgentError> {
    let gateway = subnet.gateway();
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
    reason: String,
}

/// Starts the data plane `--dataplane` asks for when `--iface` interfaces are given.
fn start_dataplane(settings: &AgentSettings) -> Result<RunningDataplane, AgentError> {
    if settings.ifaces.is_empty() {
        return Ok(RunningDataplane {
            active: None,
            reason: "no --iface given".into(),
        });
    }
    if !settings.node_ips.iter().any(IpAddr::is_ipv4) {
        return Err(AgentError::Settings(
            "node ports need the node's own IPv4 addresses; pass --node-ip ADDR (repeatable)"
                .into(),
        ));
    }
    enable_forwarding(&settings.node_ips)?;
    let selected = select(&SelectSettings {
        choice: settings.dataplane,
        ifaces: &settings.ifaces,
        bpf_pin_dir: &settings.bpf_pin_dir,
        udp_timeout: settings.udp_timeout,
    })
    .map_err(Box::new)?;
    tracing::info!(mode = selected.dataplane.mode(), reason = %selected.reason, "node-port data plane started");
    Ok(RunningDataplane {
        active: Some(Arc::new(ActiveDataplane::new(selected))),
        reason: String::new(),
    })
}

/// Turns on forwarding in the agent's network namespace: DNATed packets are routed on to the
/// sandboxes by the kernel. IPv6 forwarding only when the node has an IPv6 `--node-ip` (IPv6
/// node ports): with it on, the kernel ignores router advertisements on interfaces whose
/// `accept_ra` is 1 (a node configured by SLAAC needs `accept_ra=2`, which the agent does not
/// set).
fn enable_forwarding(node_ips: &[IpAddr]) -> Result<(), AgentError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| AgentError::Io {
        op: "enabling net.ipv4.ip_forward",
        source,
    })?;
    if node_ips.iter().any(IpAddr::is_ipv6) && crate::sandbox::net::ipv6_enabled() {
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").map_err(|source| {
            AgentError::Io {
                op: "enabling net.ipv6.conf.all.forwarding",
                source,
            }
        })?;
    }
    Ok(())
}
