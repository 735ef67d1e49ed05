//! Node-port data planes. A [`Dataplane`] takes a complete desired [`Snapshot`] (node
//! addresses, node ports, their endpoints) and makes the kernel match it, writing only what
//! changed; it reports the kernel's counters. [`xdp::XdpDataplane`] is the eBPF/XDP one.

pub mod maglev;
mod pins;
pub mod xdp;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use crate::config::Protocol;

/// A node port as the kernel sees it: (port, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePortKey {
    /// The port on the node's addresses.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// Everything a data plane needs: the node's addresses and each node port's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The node's own IPv4 addresses; only traffic to these is load-balanced.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Node port → its endpoints (sandbox address and target port). No endpoints: dropped.
    pub node_ports: BTreeMap<NodePortKey, Vec<SocketAddrV4>>,
}

/// Counters of one node port (summed over CPUs); the kernel's own layout.
pub use miren_common::nodeport::PortStats as PortCounters;

/// Counters of one backend (summed over CPUs); the kernel's own layout.
pub use miren_common::nodeport::BackendStats as BackendCounters;

/// Data plane-wide counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Packets passed untouched.
    pub passed: u64,
    /// Malformed packets (passed to the kernel).
    pub malformed: u64,
    /// Conntrack hits.
    pub conntrack_hits: u64,
    /// Conntrack misses.
    pub conntrack_misses: u64,
}

/// All counters of a data plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Per node port.
    pub ports: BTreeMap<NodePortKey, PortCounters>,
    /// Per (node port, backend).
    pub backends: BTreeMap<(NodePortKey, SocketAddrV4), BackendCounters>,
    /// Global.
    pub global: GlobalCounters,
}

/// Errors of a data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Loading or attaching eBPF programs failed.
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    /// A system call outside the maps failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A limit of the kernel maps was reached.
    #[error("{0}")]
    Capacity(String),
}

/// A node-port data plane.
pub trait Dataplane: Send {
    /// `xdp` or `nft`.
    fn mode(&self) -> &'static str;

    /// Makes the kernel match `snapshot`; idempotent, writes only what changed.
    ///
    /// # Errors
    /// [`DataplaneError`] when the kernel refuses a change.
    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError>;

    /// Reads the kernel's counters.
    ///
    /// # Errors
    /// [`DataplaneError`] when the counters cannot be read.
    fn counters(&self) -> Result<Counters, DataplaneError>;
}
