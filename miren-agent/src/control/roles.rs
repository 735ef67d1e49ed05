//! Elected roles (the scheduler, the ACME client): one agent at a time holds `leader/ROLE`,
//! created only if absent and tied to its lease, so the role passes on when the holder's
//! lease ends. Writes made in a role compare the key's mod revision (fencing).

use super::{ControlError, ControlPlane};
use crate::store::{
    StoreError, Txn,
    records::{Leader, RecordKey, encode},
};

impl ControlPlane {
    /// The node holding `role`, if any.
    pub fn holder(&self, role: &str) -> Option<String> {
        self.view
            .lock()
            .leaders
            .get(role)
            .map(|leader| leader.value.node.clone())
    }

    /// Takes `role` if nobody holds it; whether this node holds it now.
    ///
    /// # Errors
    /// Store errors.
    pub async fn lead(&self, role: &str) -> Result<bool, ControlError> {
        let node = &self.settings.node;
        if let Some(holder) = self.holder(role) {
            return Ok(holder == *node);
        }
        let key = RecordKey::Leader(role.to_owned());
        let mut txn = Txn::default();
        txn.compare(key.clone(), 0).put_leased(
            key,
            encode(&Leader { node: node.clone() }),
            Some(self.lease.id()),
        );
        match self.store.commit(txn).await {
            Ok(revision) => {
                self.caught_up(revision).await?;
                tracing::info!(node = %node, role, "this node holds the role now");
                Ok(true)
            }
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}
