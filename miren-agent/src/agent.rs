//! The daemon: opens the store, serves the control API, and (for now) attaches the packet
//! counter to `--iface` interfaces, until SIGINT or SIGTERM.

use std::{sync::Arc, time::Instant};

use aya::programs::XdpMode;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::{self, ApiError, ApiState, types::DataplaneStatus},
    bpf::{BpfError, PacketCounter},
    control::{ControlError, ControlPlane, ControlSettings},
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
    /// eBPF loading or attaching failed.
    #[error("{op}")]
    Bpf {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: Box<BpfError>,
    },
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
    let _counter = attach_counter(&settings.ifaces)?;

    let listener = api::bind(&settings.api_socket).await?;
    let state = Arc::new(ApiState {
        control,
        started,
        state_dir: settings.state_dir.clone(),
        dataplane: DataplaneStatus {
            mode: "none".into(),
            reason: "the node-port data plane is not part of this agent version yet".into(),
        },
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

/// Attaches the packet counter to each interface: native XDP, generic if native is refused.
fn attach_counter(ifaces: &[String]) -> Result<Option<PacketCounter>, AgentError> {
    if ifaces.is_empty() {
        return Ok(None);
    }
    let bpf = |op: String| {
        move |source| AgentError::Bpf {
            op,
            source: Box::new(source),
        }
    };
    let mut counter = PacketCounter::load().map_err(bpf("loading the eBPF programs".into()))?;
    for iface in ifaces {
        let mode = match counter.attach(iface, XdpMode::Driver) {
            Ok(()) => "native",
            Err(native) => {
                tracing::warn!(%iface, error = %native, "native XDP refused; trying generic");
                counter
                    .attach(iface, XdpMode::Skb)
                    .map_err(bpf(format!("attaching to {iface}")))?;
                "generic"
            }
        };
        tracing::info!(%iface, mode, "packet counter attached");
    }
    Ok(Some(counter))
}
