//! What the node-port data plane made of the desired state, shown as each node port's status.

use std::collections::BTreeMap;

use crate::dataplane::NodePortKey;

/// The outcome of applying one revision's snapshot to the data plane (from the reconciler),
/// shown as each node port's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataplaneReport {
    /// Revision of the snapshot that was applied or attempted.
    pub revision: u64,
    /// Why the whole apply failed, if it did (the previous state is kept).
    pub failure: Option<String>,
    /// Node ports that could not be applied, with the reason; the others were.
    pub port_errors: BTreeMap<NodePortKey, String>,
}

impl DataplaneReport {
    /// The status of node port `key` when the desired state is at `desired_revision`:
    /// `ok`, `pending: …` or `error: …`.
    pub fn port_status(&self, key: &NodePortKey, desired_revision: u64) -> String {
        if let Some(failure) = &self.failure {
            format!("error: {failure} (the previous state is kept; retrying)")
        } else if let Some(error) = self.port_errors.get(key) {
            format!("error: {error}")
        } else if self.revision < desired_revision {
            format!("pending: revision {desired_revision} not applied yet")
        } else {
            "ok".into()
        }
    }
}
