//! Node-port data planes. A [`Dataplane`] takes a complete desired [`Snapshot`] (node
//! addresses, node ports, their endpoints) and makes the kernel match it, writing only what
//! changed; it reports the kernel's counters. [`xdp::XdpDataplane`] is the eBPF/XDP one.

pub mod companion;
mod hygiene;
pub mod maglev;
pub mod nft;
pub mod peer_nat;
mod pins;
pub mod select;
pub mod xdp;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
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

impl From<&crate::store::records::NodePortRecord> for NodePortKey {
    /// The (port, protocol) the data planes match for a published node port.
    fn from(record: &crate::store::records::NodePortRecord) -> Self {
        Self {
            port: record.node_port,
            protocol: record.protocol,
        }
    }
}

impl std::fmt::Display for NodePortKey {
    /// `7000/udp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// Everything a data plane needs: the node's addresses and each node port's endpoints, in
/// both families (an instance's IPv6 endpoint serves the IPv6 clients its IPv4 one serves for
/// IPv4). Both data planes apply both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The node's own addresses; only traffic to these is load-balanced.
    pub node_addrs: Vec<IpAddr>,
    /// Node port → its endpoints (sandbox address and target port). No endpoints: dropped.
    pub node_ports: BTreeMap<NodePortKey, Vec<SocketAddr>>,
}

/// An IPv4-only snapshot, the shorter way to write one (`.into()` makes it a [`Snapshot`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot4 {
    /// The node's own IPv4 addresses.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Node port → its IPv4 endpoints.
    pub node_ports: BTreeMap<NodePortKey, Vec<SocketAddrV4>>,
}

impl From<Snapshot4> for Snapshot {
    fn from(v4: Snapshot4) -> Self {
        Self {
            node_addrs: v4.node_addrs.into_iter().map(IpAddr::V4).collect(),
            node_ports: v4
                .node_ports
                .into_iter()
                .map(|(key, endpoints)| (key, endpoints.into_iter().map(SocketAddr::V4).collect()))
                .collect(),
        }
    }
}

/// An address family of node-port traffic (the client's, and so the backend's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Self; 2] = [Self::V4, Self::V6];

    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// `ipv4` or `ipv6`: the `family` label of `/metrics`, the key in `miren ports`, and
    /// nftables' `meta nfproto` value.
    pub fn label(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

/// Counters of one node port (summed over CPUs); the kernel's own layout.
pub use miren_common::nodeport::PortStats as PortCounters;
pub use pins::{PinDirPlan, pin_dir_plan};

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
    /// TCP conntrack misses without SYN (forwarded by the Maglev choice; a RST creates no
    /// entry, anything else creates the flow's entries again).
    pub tcp_non_syn_misses: u64,
    /// Later fragments of node-port datagrams translated like their first fragment.
    pub fragments_forwarded: u64,
    /// Later fragments to a node address whose first fragment was not seen (to the kernel).
    pub fragments_unmatched: u64,
    /// ICMP errors about node-port replies translated to the instance owning the flow.
    pub icmp_to_instance: u64,
    /// ICMP errors from instances translated to come from the node port.
    pub icmp_from_instance: u64,
}

/// All counters of a data plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Per node port, both families together: the sum of its entries in
    /// [`Counters::families`] (write both through [`Counters::insert_port`]).
    pub ports: BTreeMap<NodePortKey, PortCounters>,
    /// Per (node port, family of the packets).
    pub families: BTreeMap<(NodePortKey, Family), PortCounters>,
    /// Per (node port, IPv4 backend).
    pub backends: BTreeMap<(NodePortKey, SocketAddrV4), BackendCounters>,
    /// Per (node port, IPv6 backend).
    pub backends6: BTreeMap<(NodePortKey, SocketAddrV6), BackendCounters>,
    /// Global.
    pub global: GlobalCounters,
}

impl Counters {
    /// Records the counters of `port`'s `family` packets, and its total over both families.
    pub fn insert_port(&mut self, port: NodePortKey, family: Family, counters: PortCounters) {
        self.families.insert((port, family), counters);
        let mut total = PortCounters::default();
        for family in Family::ALL {
            if let Some(part) = self.families.get(&(port, family)) {
                total.add(part);
            }
        }
        self.ports.insert(port, total);
    }

    /// Adds `other`'s counters to these (of a plane counting other packets).
    pub fn add(&mut self, other: &Self) {
        for ((port, family), counters) in &other.families {
            let mut sum = self
                .families
                .get(&(*port, *family))
                .copied()
                .unwrap_or_default();
            sum.add(counters);
            self.insert_port(*port, *family, sum);
        }
        for (key, counters) in &other.backends {
            self.backends.entry(*key).or_default().add(counters);
        }
        for (key, counters) in &other.backends6 {
            self.backends6.entry(*key).or_default().add(counters);
        }
        let (sum, other) = (&mut self.global, &other.global);
        sum.passed += other.passed;
        sum.malformed += other.malformed;
        sum.conntrack_hits += other.conntrack_hits;
        sum.conntrack_misses += other.conntrack_misses;
        sum.tcp_non_syn_misses += other.tcp_non_syn_misses;
        sum.fragments_forwarded += other.fragments_forwarded;
        sum.fragments_unmatched += other.fragments_unmatched;
        sum.icmp_to_instance += other.icmp_to_instance;
        sum.icmp_from_instance += other.icmp_from_instance;
    }

    /// Records the counters of `backend` of `port`, in [`Counters::backends`] or
    /// [`Counters::backends6`] by its family.
    pub fn insert_backend(
        &mut self,
        port: NodePortKey,
        backend: SocketAddr,
        counters: BackendCounters,
    ) {
        match backend {
            SocketAddr::V4(v4) => self.backends.insert((port, v4), counters),
            SocketAddr::V6(v6) => self.backends6.insert((port, v6), counters),
        };
    }

    /// The counters of each backend of `port`, both families (IPv4 first).
    pub fn backends_of(
        &self,
        port: NodePortKey,
    ) -> impl Iterator<Item = (SocketAddr, &BackendCounters)> {
        let v4 = self
            .backends
            .range((port, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))..)
            .take_while(move |((key, _), _)| *key == port)
            .map(|((_, addr), c)| (SocketAddr::V4(*addr), c));
        let v6 = self
            .backends6
            .range((port, SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0))..)
            .take_while(move |((key, _), _)| *key == port)
            .map(|((_, addr), c)| (SocketAddr::V6(*addr), c));
        v4.chain(v6)
    }
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
    /// A limit of the kernel maps was reached while applying one node port.
    #[error("node port {port}: {limit}")]
    Capacity {
        /// The node port that did not fit.
        port: NodePortKey,
        /// Which limit.
        limit: String,
    },
    /// The pin directory is not on a bpffs and none could be mounted for it.
    #[error("{} cannot hold pinned eBPF objects: {why}; {hint}", dir.display())]
    PinDir {
        /// The `--bpf-pin-dir`.
        dir: PathBuf,
        /// Why not.
        why: String,
        /// What the operator can do.
        hint: String,
    },
    /// A program that is not miren's holds XDP on an interface; miren never touches it.
    #[error(
        "{iface} already runs the XDP program {name:?} (id {id}), which is not miren's and is left alone; detach it (`ip link set dev {iface} xdp off`) or use --dataplane nft"
    )]
    ForeignXdp {
        /// The interface.
        iface: String,
        /// The program's name.
        name: String,
        /// The program's id.
        id: u32,
    },
    /// A stale program of miren's is attached without a link, which the agent cannot detach.
    #[error(
        "{iface} runs a stale {name} (program id {id}, {hook}) attached without a link; remove it (`{remedy}`) and restart the agent"
    )]
    StaleWithoutLink {
        /// The interface.
        iface: String,
        /// The program's name.
        name: String,
        /// The program's id.
        id: u32,
        /// Where it is attached.
        hook: crate::bpf::attached::Hook,
        /// The command that removes it.
        remedy: String,
    },
    /// The `nft` or `conntrack` command failed or printed something unexpected.
    #[error("{op}: {detail}")]
    Command {
        /// What was being done.
        op: String,
        /// The command's error output, or what was wrong with its output.
        detail: String,
    },
}

impl DataplaneError {
    /// The node port this error is about, when it concerns only one: the others can still be
    /// applied.
    pub fn port(&self) -> Option<NodePortKey> {
        match self {
            Self::Capacity { port, .. } => Some(*port),
            _ => None,
        }
    }
}

/// A node-port data plane.
pub trait Dataplane: Send + std::fmt::Debug {
    /// `xdp` or `nft`.
    fn mode(&self) -> &'static str;

    /// Makes the kernel match `snapshot`; idempotent, writes only what changed.
    ///
    /// # Errors
    /// [`DataplaneError`] when the kernel refuses a change.
    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError>;

    /// Forgets what it believes the kernel holds and reads it back, so the next
    /// [`Dataplane::apply`] also repairs changes made behind the agent's back.
    ///
    /// # Errors
    /// [`DataplaneError`] when the kernel state cannot be read.
    fn refresh(&mut self) -> Result<(), DataplaneError>;

    /// Reads the kernel's counters.
    ///
    /// # Errors
    /// [`DataplaneError`] when the counters cannot be read.
    fn counters(&self) -> Result<Counters, DataplaneError>;
}

/// The data plane the agent runs, shared by the reconciler (which applies snapshots and the
/// other nodes' subnets), the API and `/metrics` (which read counters), with the mode and why
/// it was chosen.
pub struct ActiveDataplane {
    mode: &'static str,
    reason: String,
    plane: Mutex<Box<dyn Dataplane>>,
    peer_nat: peer_nat::PeerNat,
}

impl std::fmt::Debug for ActiveDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveDataplane")
            .field("mode", &self.mode)
            .field("reason", &self.reason)
            .finish()
    }
}

impl ActiveDataplane {
    /// Wraps the data plane [`select::select`] started (its reason is shown by `miren
    /// status`).
    pub fn new(selected: select::Selected) -> Self {
        Self {
            mode: selected.dataplane.mode(),
            reason: selected.reason,
            plane: Mutex::new(selected.dataplane),
            peer_nat: selected.peer_nat,
        }
    }

    /// Makes `subnets` the other nodes' sandbox subnets (IPv4 and their IPv6 /80s): node-port
    /// flows leaving toward them are masqueraded to this node's address ([`peer_nat`]).
    ///
    /// # Errors
    /// [`DataplaneError`] when `nft` refuses or cannot run.
    pub fn set_peer_subnets(&self, subnets: &peer_nat::PeerSubnets) -> Result<(), DataplaneError> {
        self.peer_nat.set_peer_subnets(subnets)
    }

    /// `xdp` or `nft`.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Why this data plane is active.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Exclusive access (apply, refresh); blocks while another caller holds it.
    pub fn lock(&self) -> MutexGuard<'_, Box<dyn Dataplane>> {
        self.plane.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the kernel's counters.
    ///
    /// # Errors
    /// [`DataplaneError`] when the counters cannot be read.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        self.lock().counters()
    }
}
