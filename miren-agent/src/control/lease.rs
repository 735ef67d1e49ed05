//! This node's lease: the observed state the node writes (its ready endpoints) lives under
//! it, so the store drops that state when the node stops renewing it. The lease is renewed
//! every third of its TTL; when it was lost anyway (the store was unreachable for longer than
//! the TTL) a new one is granted and the node's endpoints are written again under it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::store::{
    LeaseId, Store, StoreError, Txn,
    records::{EndpointMap, Heartbeat, RecordKey, encode},
};

/// The lease and what this node wrote under it.
#[derive(Debug)]
pub struct NodeLease {
    id: Mutex<LeaseId>,
    /// This node's endpoints as last committed, by (app, service).
    published: Mutex<BTreeMap<(String, String), EndpointMap>>,
}

impl NodeLease {
    /// Grants a new lease of `ttl`.
    ///
    /// # Errors
    /// The store's error.
    pub async fn grant(store: &dyn Store, ttl: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            id: Mutex::new(store.grant_lease(ttl).await?),
            published: Mutex::default(),
        })
    }

    /// The current lease.
    pub fn id(&self) -> LeaseId {
        *self.id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers this node's endpoints of a service after they were committed.
    pub fn record(&self, app: &str, service: &str, endpoints: EndpointMap) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let key = (app.to_owned(), service.to_owned());
        if endpoints.is_empty() {
            published.remove(&key);
        } else {
            published.insert(key, endpoints);
        }
    }

    /// Forgets every endpoint of `app` (it was removed).
    pub fn forget_app(&self, app: &str) {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, _), _| a != app);
    }

    /// A new lease after the old one expired, with this node's endpoints written under it.
    async fn renew(&self, store: &dyn Store, node: &str, ttl: Duration) -> Result<(), StoreError> {
        let id = store.grant_lease(ttl).await?;
        let mut txn = Txn::default();
        let published = self
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((app, service), endpoints) in published {
            let key = RecordKey::Endpoints {
                app,
                service,
                node: node.to_owned(),
            };
            txn.put_leased(key, encode(&endpoints), Some(id));
        }
        txn.put_leased(
            RecordKey::Alive(node.to_owned()),
            encode(&Heartbeat {
                at: super::commands::now(),
            }),
            Some(id),
        );
        store.commit(txn).await?;
        *self.id.lock().unwrap_or_else(|p| p.into_inner()) = id;
        Ok(())
    }
}

/// Writes this node's heartbeat under its lease.
async fn heartbeat(store: &dyn Store, lease: &NodeLease, node: &str) -> Result<(), StoreError> {
    let mut txn = Txn::default();
    txn.put_leased(
        RecordKey::Alive(node.to_owned()),
        encode(&Heartbeat {
            at: super::commands::now(),
        }),
        Some(lease.id()),
    );
    store.commit(txn).await.map(drop)
}

/// Renews `lease` every third of `ttl`, and writes a heartbeat every `ttl`, until aborted.
pub async fn keep_alive(store: Arc<dyn Store>, lease: Arc<NodeLease>, node: String, ttl: Duration) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    for round in 1u64.. {
        tokio::time::sleep(period).await;
        match store.keep_alive(lease.id()).await {
            Ok(()) if round % 3 == 0 => {
                if let Err(err) = heartbeat(&*store, &lease, &node).await {
                    tracing::warn!(%err, "cannot write this node's heartbeat; retrying");
                }
            }
            Ok(()) => {}
            Err(StoreError::LeaseExpired { lease: old }) => {
                tracing::warn!(
                    lease = old,
                    "this node's lease expired (the store was out of reach for longer than its TTL); taking a new one"
                );
                if let Err(err) = lease.renew(&*store, &node, ttl).await {
                    tracing::warn!(%err, "cannot take a new lease; retrying");
                }
            }
            Err(err) => tracing::warn!(%err, "cannot renew this node's lease; retrying"),
        }
    }
}
