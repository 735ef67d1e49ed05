//! The control plane, in two halves over the shared [`Store`]:
//! - the **view** ([`view`]): this agent's copy of the state, fed only by the store's watch
//!   (a listing at revision R, then every change after R; listed again when the watch is
//!   compacted or lost). Data planes, the ingress and the runner read it and follow its
//!   revision ([`ControlPlane::subscribe`]).
//! - the **commands** ([`commands`]): each reads the view, validates the request completely
//!   and turns it into one store transaction whose compares cover every key the decision
//!   rested on. When another writer changed one of them the command waits for the view to
//!   see that change, decides again, and gives up after [`MAX_ATTEMPTS`] with a 409. A command
//!   returns once the view has reached its commit (read-your-writes).
//!
//! Desired state (apps, node-port claims, routes) is shared by every node; observed state
//! (this node's ready endpoints, its ingress's demand for auto services ([`demand`])) is
//! written under this node's lease ([`lease`]).

mod certs;
mod commands;
mod demand;
mod lease;
mod nodes;
mod placement;
mod queries;
mod report;
mod roles;
mod scheduler;
mod view;

#[cfg(test)]
mod tests;

use std::{
    ops::RangeInclusive,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

pub use demand::InstanceExit;
pub use nodes::{NodeMode, Registration, SubnetPlan};
pub use queries::{DeployedService, IngressRoute, IngressUpdate, Peer};
pub use report::DataplaneReport;

use crate::{
    config::{ConfigError, ValidationContext},
    store::{Revision, Store, StoreError, Txn},
};

/// How often a command decides again after a concurrent change before it answers 409.
pub const MAX_ATTEMPTS: usize = 5;
/// How long a command waits for the view to reach its commit.
const CATCH_UP: Duration = Duration::from_secs(10);
/// How long a command waits for the view to see a concurrent change before deciding again.
const CONFLICT_WAIT: Duration = Duration::from_secs(2);

/// Errors of control operations, each with a message for the user.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The app.toml is invalid; the message holds every diagnostic.
    #[error("{0}")]
    InvalidConfig(#[from] ConfigError),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts existing state (e.g. a port held by another app), or the
    /// state kept changing under it.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed; nothing was changed.
    #[error("the state store failed: {0}")]
    Store(#[from] StoreError),
    /// The change was committed but this agent's view has not seen it yet.
    #[error(
        "the change was saved at revision {revision}, but this agent's view of the store has not reached it after {} s; its watch of the store is behind (see the agent's log)",
        CATCH_UP.as_secs()
    )]
    ViewBehind {
        /// The commit's revision.
        revision: Revision,
    },
}

/// Settings of the control plane that come from the agent's configuration.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The agent's own listener ports (never node ports), with what uses them.
    pub validation: ValidationContext,
    /// Range for target ports the agent assigns when app.toml leaves `port` out.
    pub port_range: RangeInclusive<u16>,
    /// This node's name: its observed state is stored under it.
    pub node: String,
    /// How long this node's observed state outlives the agent without keep-alives.
    pub lease_ttl: Duration,
}

/// Validated operations on the shared state, and this agent's view of it.
pub struct ControlPlane {
    store: Arc<dyn Store>,
    settings: ControlSettings,
    view: Arc<view::View>,
    lease: Arc<lease::NodeLease>,
    dataplane_report: Mutex<Option<DataplaneReport>>,
    /// The scheduler's memory of idle auto services.
    autoscaler: Mutex<demand::AutoScaler>,
    /// This node's instances that exited by themselves, for the activations waiting on them.
    instance_exits: tokio::sync::broadcast::Sender<InstanceExit>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("store", &self.store.describe())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ControlPlane {
    /// Lists the store, takes this node's lease and starts following the store. Stored apps
    /// that no longer validate here (e.g. the agent's listener ports changed) are kept in
    /// the store but left out of the view, with an error logged.
    ///
    /// # Errors
    /// [`ControlError::Store`] when the store cannot be read.
    pub async fn open(
        store: Arc<dyn Store>,
        settings: ControlSettings,
    ) -> Result<Self, ControlError> {
        let listing = store.list().await?;
        let after = listing.revision;
        let view = Arc::new(view::View::new(listing, settings.validation.clone()));
        let lease = Arc::new(lease::NodeLease::grant(&*store, settings.lease_ttl).await?);
        let tasks = vec![
            tokio::spawn(view::follow(Arc::clone(&store), Arc::clone(&view), after)),
            tokio::spawn(lease::keep_alive(
                Arc::clone(&store),
                Arc::clone(&lease),
                settings.node.clone(),
                settings.lease_ttl,
            )),
        ];
        Ok(Self {
            store,
            settings,
            view,
            lease,
            dataplane_report: Mutex::new(None),
            autoscaler: Mutex::default(),
            instance_exits: tokio::sync::broadcast::channel(64).0,
            tasks,
        })
    }

    /// A receiver that sees the view's revision after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.view.subscribe()
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.settings.node
    }

    /// What the store is, for `miren status` and messages.
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    /// Runs a command: `plan` decides on the current view and returns the transaction with
    /// the command's answer; the transaction is committed and the view followed up to it.
    /// On a concurrent change `plan` runs again on the newer view, at most [`MAX_ATTEMPTS`]
    /// times.
    async fn run<T>(
        &self,
        mut plan: impl FnMut(&view::State) -> Result<(Txn, T), ControlError>,
    ) -> Result<T, ControlError> {
        let mut changed = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let (txn, answer) = plan(&self.view.lock())?;
            if txn.compares.is_empty() && txn.ops.is_empty() {
                return Ok(answer);
            }
            match self.store.commit(txn).await {
                Ok(revision) => {
                    self.caught_up(revision).await?;
                    return Ok(answer);
                }
                Err(StoreError::Conflict { key, revision }) => {
                    tracing::info!(%key, revision, "concurrent change; deciding again");
                    // The store's revision may be one of keys outside this cluster's prefix
                    // (a shared etcd), which the view never sees: wait briefly, not for sure.
                    self.view.wait_for(revision, CONFLICT_WAIT).await;
                    changed.push(key);
                }
                Err(err) => return Err(err.into()),
            }
        }
        changed.dedup();
        Err(ControlError::Conflict(format!(
            "the state kept changing while this request was applied ({MAX_ATTEMPTS} attempts; changed: {}); retry",
            changed.join(", ")
        )))
    }

    /// Waits until the view has reached `revision`.
    async fn caught_up(&self, revision: Revision) -> Result<(), ControlError> {
        if self.view.wait_for(revision, CATCH_UP).await {
            Ok(())
        } else {
            Err(ControlError::ViewBehind { revision })
        }
    }
}
