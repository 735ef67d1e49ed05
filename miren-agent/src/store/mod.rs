//! The shared state of the cluster as a revisioned key-value store, with two backends: the
//! embedded [`SqliteStore`] (single node, the default) and [`EtcdStore`] (cluster mode).
//!
//! The interface is the one etcd v3 offers, so both backends behave alike:
//! - [`Store::list`] reads every key at one revision (a consistent snapshot);
//! - [`Store::watch`] streams every change after a revision, in order, or says the history is
//!   gone ([`WatchMessage::Compacted`]) so the reader lists again;
//! - [`Store::commit`] applies a [`Txn`]: all its puts and deletes if every [`Compare`] on a
//!   key's mod revision holds, else nothing ([`StoreError::Conflict`] names the key);
//! - leases make keys vanish with the node that wrote them.
//!
//! What the keys mean and how values are encoded is [`records`].

mod etcd;
pub mod records;
mod sqlite;

pub use etcd::{EtcdOptions, EtcdStore};
pub use sqlite::SqliteStore;

use std::{path::PathBuf, time::Duration};

use tokio::sync::mpsc;

/// A store revision: increases with every committed transaction; 0 means "before anything".
pub type Revision = u64;

/// A lease: keys written under it are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// One key with its value and the revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Key, relative to the store's prefix (e.g. `apps/web`).
    pub key: String,
    /// Encoded value.
    pub value: Vec<u8>,
    /// Revision of the transaction that last wrote the key.
    pub mod_revision: Revision,
}

/// Every key at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The revision the keys were read at.
    pub revision: Revision,
    /// The keys, sorted.
    pub kvs: Vec<KeyValue>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was created or replaced.
    Put(KeyValue),
    /// A key was deleted (also by lease expiry).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deleting transaction.
        mod_revision: Revision,
    },
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes of one or more transactions, in order, complete up to `revision`.
    Changes {
        /// The store's revision after these changes.
        revision: Revision,
        /// The changes.
        events: Vec<Event>,
    },
    /// The changes since the requested revision are no longer available: list again.
    Compacted,
}

/// A stream of [`WatchMessage`]s; it ends (`None`) when the watch is lost.
#[derive(Debug)]
pub struct Watch {
    receiver: mpsc::Receiver<WatchMessage>,
}

impl Watch {
    /// A watch fed through `receiver`.
    fn new(receiver: mpsc::Receiver<WatchMessage>) -> Self {
        Self { receiver }
    }

    /// The next message, or `None` once the watch is lost (list again).
    pub async fn next(&mut self) -> Option<WatchMessage> {
        self.receiver.recv().await
    }
}

/// A condition of a [`Txn`]: `key`'s mod revision is `mod_revision` (0: the key is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: String,
    /// Its expected mod revision; 0 means it must not exist.
    pub mod_revision: Revision,
}

/// A change in a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace a key, optionally tied to a lease.
    Put {
        /// The key.
        key: String,
        /// Encoded value.
        value: Vec<u8>,
        /// Lease that owns the key, if any.
        lease: Option<LeaseId>,
    },
    /// Delete a key (no error if it is absent).
    Delete {
        /// The key.
        key: String,
    },
    /// Delete every key that starts with `prefix`.
    DeletePrefix {
        /// The prefix.
        prefix: String,
    },
}

/// An atomic change: `ops` are applied if and only if every compare holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions on mod revisions.
    pub compares: Vec<Compare>,
    /// Changes, in order.
    pub ops: Vec<Op>,
}

impl Txn {
    /// Requires `key` to be at `mod_revision` (0: absent).
    pub fn compare(&mut self, key: impl Into<String>, mod_revision: Revision) -> &mut Self {
        self.compares.push(Compare {
            key: key.into(),
            mod_revision,
        });
        self
    }

    /// Writes `value` at `key`.
    pub fn put(&mut self, key: impl Into<String>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            lease: None,
        });
        self
    }

    /// Writes `value` at `key`, owned by `lease` (if any).
    pub fn put_leased(
        &mut self,
        key: impl Into<String>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> &mut Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            lease,
        });
        self
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: impl Into<String>) -> &mut Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Deletes every key under `prefix`.
    pub fn delete_prefix(&mut self, prefix: impl Into<String>) -> &mut Self {
        self.ops.push(Op::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }
}

/// The source of a backend error, whatever the backend.
pub type BackendSource = Box<dyn std::error::Error + Send + Sync>;

/// Errors from a store backend; the same for every backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or has no quorum; nothing was changed.
    #[error("store unavailable ({backend}): {source}")]
    Unavailable {
        /// Which backend, e.g. `etcd at https://10.0.0.1:2379`.
        backend: String,
        /// Cause.
        #[source]
        source: BackendSource,
    },
    /// A compare of the transaction failed: `key` changed since it was read.
    #[error("{key} changed concurrently (the store is at revision {revision}); retry")]
    Conflict {
        /// The first key whose compare failed.
        key: String,
        /// The store's revision when the transaction was refused.
        revision: Revision,
    },
    /// The lease expired or was revoked.
    #[error("lease {lease:x} has expired")]
    LeaseExpired {
        /// The lease.
        lease: LeaseId,
    },
    /// A stored value could not be decoded.
    #[error("the store holds an invalid {what} at {key}: {reason}")]
    Corrupt {
        /// What the value should have been.
        what: &'static str,
        /// Its key.
        key: String,
        /// Why it could not be decoded.
        reason: String,
    },
    /// The store's files or settings are unusable; the message says what to do.
    #[error("{message}")]
    Setup {
        /// What is wrong and what to do.
        message: String,
        /// Cause, if any.
        #[source]
        source: Option<BackendSource>,
    },
    /// The store was written by a newer agent.
    #[error(
        "the store at {path} has schema version {found}, newer than this agent's {supported}; upgrade miren-agent"
    )]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Newest version this agent knows.
        supported: i64,
    },
    /// Any other failure of the backend while doing `op`.
    #[error("store {op}: {source}")]
    Backend {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: BackendSource,
    },
}

/// A backend for the cluster's shared state.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every key at the current revision.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or another backend error.
    async fn list(&self) -> Result<Listing, StoreError>;

    /// Every change after `after` (exclusive), in order. When those changes are gone the
    /// first message is [`WatchMessage::Compacted`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or another backend error.
    async fn watch(&self, after: Revision) -> Result<Watch, StoreError>;

    /// Applies `txn` atomically; returns the revision it committed at. Nothing is written on
    /// any error.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when a compare failed; other [`StoreError`]s from the backend.
    async fn commit(&self, txn: Txn) -> Result<Revision, StoreError>;

    /// A new lease that lives `ttl` unless kept alive.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or another backend error.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews `lease` for its full TTL.
    ///
    /// # Errors
    /// [`StoreError::LeaseExpired`] when it is gone; other backend errors.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends `lease` now, deleting its keys.
    ///
    /// # Errors
    /// Backend errors.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// What the store is, for messages: `sqlite at PATH`, `etcd at ENDPOINTS`.
    fn describe(&self) -> String;

    /// The most compares, and the most ops, one transaction may have (`None`: no limit).
    fn max_txn_ops(&self) -> Option<usize> {
        None
    }
}
