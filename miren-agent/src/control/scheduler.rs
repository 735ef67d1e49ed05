//! The scheduler: the holder of the `scheduler` role ([`super::roles`]) writes the placements
//! [`placement::plan`] asks for, each write fenced by a compare on the role's key. When the
//! holder's lease ends the key vanishes and the next agent to see that takes over.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{ControlError, ControlPlane, placement, view::State};
use crate::store::{
    Txn,
    records::{RecordKey, SCHEDULER, encode},
};

/// How often the scheduler looks again without a change (a placement waiting for a
/// replacement to become ready, a failed write).
const RECHECK: Duration = Duration::from_secs(1);

impl ControlPlane {
    /// The node holding the scheduler role, if any.
    pub fn scheduler(&self) -> Option<String> {
        self.holder(SCHEDULER)
    }

    /// One round: take the role if nobody holds it; as the holder, write the placements the
    /// plan changes. Returns whether this node holds the role.
    pub(super) async fn schedule_once(&self) -> Result<bool, ControlError> {
        if !self.lead(SCHEDULER).await? {
            return Ok(false);
        }
        let node = self.settings.node.clone();
        let max_instances = self.settings.validation.limits.instances_per_service as usize;
        let auto = self
            .autoscaler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .targets(&self.view.lock(), max_instances, Instant::now());
        self.run(|state| Ok((placement_txn(state, &node, &auto), ())))
            .await?;
        Ok(true)
    }
}

/// The transaction writing the plan's placements (auto services sized as `auto` says),
/// fenced on `node` still holding the role (empty when it does not, or when nothing changes).
fn placement_txn(state: &State, node: &str, auto: &BTreeMap<(String, String), usize>) -> Txn {
    let mut txn = Txn::default();
    let Some(leader) = state
        .leaders
        .get(SCHEDULER)
        .filter(|leader| leader.value.node == node)
    else {
        return txn;
    };
    let changes = placement::plan(state, auto);
    if changes.is_empty() {
        return txn;
    }
    txn.compare(RecordKey::Leader(SCHEDULER.into()), leader.mod_revision);
    for ((app, service), placement) in changes {
        let key = RecordKey::Placement {
            app: app.clone(),
            service: service.clone(),
        };
        let current = state
            .placements
            .get(&(app, service))
            .map_or(0, |p| p.mod_revision);
        txn.compare(key.clone(), current);
        match placement {
            Some(placement) => txn.put(key, encode(&placement)),
            None => txn.delete(key),
        };
    }
    txn
}

impl ControlPlane {
    /// Takes part in the scheduler election and, while holding the role, places instances:
    /// after every change of the state (heartbeats and lease ends included) and every
    /// [`RECHECK`]. Runs until the task is dropped.
    pub async fn run_scheduler(self: Arc<Self>) {
        let mut changes = self.view.subscribe_all();
        loop {
            if let Err(err) = self.schedule_once().await {
                tracing::warn!(%err, "scheduling failed; retrying");
            }
            let _ = tokio::time::timeout(RECHECK, changes.changed()).await;
        }
    }
}
