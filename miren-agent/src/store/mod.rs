//! Persistent desired state: apps (with their app.toml text), assigned target ports, published
//! node ports, routes and externally supplied endpoints.
//!
//! [`Store`] is deliberately small — read everything, commit a batch atomically with a
//! revision check — so a distributed backend can replace [`SqliteStore`] without touching
//! callers.

mod sqlite;

pub use sqlite::SqliteStore;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use crate::config::Protocol;

/// A deployed app as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRecord {
    /// App name (primary key).
    pub name: String,
    /// File name shown in diagnostics, as the deploying client named it.
    pub source_name: String,
    /// The app.toml text as deployed.
    pub toml: String,
    /// Deploy counter, starting at 1.
    pub version: u64,
    /// Unix time of the deploy.
    pub deployed_at: u64,
    /// The deployed app directory on this node (instances run there), if the client sent it.
    pub directory: Option<String>,
    /// Target ports the agent assigned to ports that app.toml left without `port`, keyed by
    /// (service, port name).
    pub assigned_ports: BTreeMap<(String, String), u16>,
}

/// A published node port: `(node_port, protocol)` is unique across all apps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePortRecord {
    /// Port on the node's addresses.
    pub node_port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Owning app.
    pub app: String,
    /// Owning service.
    pub service: String,
    /// The service port it forwards to.
    pub port_name: String,
}

/// A route: normalized host → app service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteRecord {
    /// Normalized host.
    pub host: String,
    /// Target app.
    pub app: String,
    /// Target service.
    pub service: String,
    /// Upstream timeout in milliseconds; `None` means the ingress default.
    pub timeout_ms: Option<u64>,
}

/// Endpoints of one service supplied through the API, per port name.
pub type EndpointMap = BTreeMap<String, Vec<SocketAddr>>;

/// Everything in the store at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreState {
    /// Increases with every commit.
    pub revision: u64,
    /// Apps by name.
    pub apps: BTreeMap<String, AppRecord>,
    /// Published node ports, sorted.
    pub node_ports: Vec<NodePortRecord>,
    /// Routes, sorted by host.
    pub routes: Vec<RouteRecord>,
    /// Externally supplied endpoints by (app, service).
    pub endpoints: BTreeMap<(String, String), EndpointMap>,
}

/// One change inside an atomic [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Create or replace an app and set its published node ports to `node_ports`.
    PutApp {
        /// The app.
        app: AppRecord,
        /// All node ports of this app after the write.
        node_ports: Vec<NodePortRecord>,
    },
    /// Remove an app with its node ports, routes and endpoints.
    RemoveApp(String),
    /// Replace the published node ports of an app.
    SetNodePorts {
        /// The app.
        app: String,
        /// All node ports of this app after the write.
        node_ports: Vec<NodePortRecord>,
    },
    /// Create or replace a route.
    PutRoute(RouteRecord),
    /// Remove the route for a host.
    RemoveRoute(String),
    /// Replace the endpoints of one service (empty map: none).
    SetEndpoints {
        /// The app.
        app: String,
        /// The service.
        service: String,
        /// Port name → addresses.
        endpoints: EndpointMap,
    },
}

/// Errors from a store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("opening the store at {path}: {source}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The state directory could not be created.
    #[error("creating the state directory {path}: {source}")]
    StateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state directory or a store file could not be made private to the agent's user.
    #[error("making {path} private (mode {mode:o}): {source}")]
    Permissions {
        /// Directory or file.
        path: PathBuf,
        /// The mode it should have had.
        mode: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer agent.
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
    /// Someone else committed since the state this change was based on.
    #[error("the store changed concurrently (expected revision {expected}, found {found}); retry")]
    Conflict {
        /// Revision the caller read.
        expected: u64,
        /// Revision found.
        found: u64,
    },
    /// A query failed.
    #[error("store {op}: {source}")]
    Query {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value could not be decoded.
    #[error("store holds an invalid {what}: {value}")]
    Corrupt {
        /// Which field.
        what: &'static str,
        /// The value found.
        value: String,
    },
}

/// A backend for the desired state.
pub trait Store: Send + Sync {
    /// Reads the whole state.
    ///
    /// # Errors
    /// [`StoreError`] when the backend cannot be read.
    fn load(&self) -> Result<StoreState, StoreError>;

    /// Applies `writes` atomically if the store is still at `expected_revision`; returns the
    /// new revision. Nothing is written on any error.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the revision moved; other [`StoreError`]s from the backend.
    fn commit(&self, expected_revision: u64, writes: &[Write]) -> Result<u64, StoreError>;
}
