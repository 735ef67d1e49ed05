//! The daemon: opens the store, serves the control API, and — when external interfaces are
//! given — runs the XDP node-port data plane on them, re-applying the desired state after every
//! change and every [`RESYNC_INTERVAL`], until SIGINT or SIGTERM.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::{self, ApiError, ApiState},
    control::{ControlError, ControlPlane, ControlSettings},
    dataplane::{ActiveDataplane, DataplaneError, xdp::XdpDataplane},
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
    let store = SqliteStore::open(&settings.state_dir)?;
    let control = Arc::new(ControlPlane::open(
        Box::new(store),
        ControlSettings {
            validation: settings.validation_context(),
            port_range: settings.port_range.clone(),
        },
    )?);
    let dataplane = start_dataplane(&settings, &control)?;

    let listener = api::bind(&settings.api_socket).await?;
    let state = Arc::new(ApiState {
        control,
        started,
        state_dir: settings.state_dir.clone(),
        dataplane: dataplane.active,
        no_dataplane_reason: dataplane.reason,
    });
    let io = |op| move |source| AgentError::Io { op, source };
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(io("installing signal handlers"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(io("installing signal handlers"))?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    };
    tracing::info!(socket = %settings.api_socket.display(), state_dir = %settings.state_dir.display(), "miren-agent ready");
    let served = api::serve(listener, state, shutdown).await;
    let _ = std::fs::remove_file(&settings.api_socket);
    served.map_err(io("serving the API"))
}

/// How often the desired state is re-applied even without changes.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// The running data plane (if any), or why there is none.
struct RunningDataplane {
    active: Option<Arc<ActiveDataplane>>,
    reason: String,
}

/// Starts the XDP data plane on `--iface` interfaces and a task that applies every change.
fn start_dataplane(
    settings: &AgentSettings,
    control: &Arc<ControlPlane>,
) -> Result<RunningDataplane, AgentError> {
    if settings.ifaces.is_empty() {
        return Ok(RunningDataplane {
            active: None,
            reason: "no --iface given".into(),
        });
    }
    if settings.dataplane == "nft" {
        return Err(AgentError::Settings(
            "--dataplane nft is not available in this agent version; use auto or xdp".into(),
        ));
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
    let mut dataplane = XdpDataplane::load_pinned(&settings.bpf_pin_dir).map_err(Box::new)?;
    dataplane
        .set_udp_timeout(settings.udp_timeout)
        .map_err(Box::new)?;
    let mut modes = Vec::new();
    for iface in &settings.ifaces {
        let mode = dataplane
            .attach(iface, settings.dataplane == "auto")
            .map_err(Box::new)?;
        tracing::info!(%iface, %mode, "node-port data plane attached");
        modes.push(format!("{iface}: {mode}"));
    }
    let reason = format!("XDP on {}", modes.join(", "));
    let dataplane = Arc::new(ActiveDataplane::new(Box::new(dataplane), reason));
    let active = Arc::clone(&dataplane);
    let control = Arc::clone(control);
    tokio::spawn(async move {
        let mut changes = control.subscribe();
        loop {
            let (revision, snapshot) = control.dataplane_snapshot(&node_addrs);
            let dataplane = Arc::clone(&dataplane);
            let started = Instant::now();
            let applied = tokio::task::spawn_blocking(move || {
                dataplane.lock().apply(&snapshot)
            })
            .await;
            let status = match applied {
                Ok(Ok(())) => "ok".to_owned(),
                Ok(Err(err)) => format!("error: {err}"),
                Err(join) => format!("error: the apply task failed: {join}"),
            };
            if status != "ok" {
                tracing::error!(%status, "applying the node-port data plane failed; retrying at the next change or resync");
            }
            tracing::debug!(elapsed = ?started.elapsed(), "data plane applied");
            control.set_dataplane_status(revision, status);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(RESYNC_INTERVAL) => {}
            }
        }
    });
    Ok(RunningDataplane {
        active: Some(active),
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
