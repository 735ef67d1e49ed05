//! The node-port data plane: map names, map key/value layouts, counters and the flow hash,
//! shared by the XDP/TC programs and the agent.
//!
//! Addresses and ports are kept in network byte order (as they appear in packets) in every
//! map key and value, so the kernel side never converts.

/// XDP program: forward DNAT of node-port traffic.
pub const XDP_PROGRAM: &str = "miren_nodeport";
/// TC egress program: reverse NAT of replies.
pub const TC_PROGRAM: &str = "miren_reply";

/// `HashMap<u32 addr (be), u32 1>`: the node's own IPv4 addresses.
pub const NODE_ADDRS_MAP: &str = "MIREN_NODE_ADDRS";
/// `HashMap<ServiceKey, Service>`: configured node ports.
pub const SERVICES_MAP: &str = "MIREN_SERVICES";
/// `HashMap<MaglevKey, u32 backend id>`: Maglev lookup tables, two generations per service.
pub const MAGLEV_MAP: &str = "MIREN_MAGLEV";
/// `Array<Backend>` indexed by backend id.
pub const BACKENDS_MAP: &str = "MIREN_BACKENDS";
/// `LruHashMap<FlowKey, Flow>`: shared conntrack, forward and reverse entries.
pub const CONNTRACK_MAP: &str = "MIREN_CT";
/// `PerCpuArray<PortStats>` indexed by service id.
pub const PORT_STATS_MAP: &str = "MIREN_PORT_STATS";
/// `PerCpuArray<BackendStats>` indexed by backend id.
pub const BACKEND_STATS_MAP: &str = "MIREN_BACKEND_STATS";
/// `PerCpuArray<u64>` indexed by [`GlobalStat`].
pub const GLOBAL_STATS_MAP: &str = "MIREN_GLOBAL_STATS";
/// `Array<Config>` with one entry.
pub const CONFIG_MAP: &str = "MIREN_CONFIG";
/// `HashMap<BackendAddr, u32 1>`: the address, port and protocol of every backend. A packet
/// from one of them is never a new node-port flow: it is the reply to a flow this node sent to
/// a backend on another node, masqueraded to this node's address (so its destination port can
/// be any port, a node port too), which the kernel's conntrack translates back.
pub const BACKEND_ADDRS_MAP: &str = "MIREN_BACKEND_ADDRS";
/// `HashMap<BackendAddr6, u32 1>`: [`BACKEND_ADDRS_MAP`] for the backends' IPv6 twins.
pub const BACKEND_ADDRS6_MAP: &str = "MIREN_BACKEND_ADDRS6";

/// `HashMap<Addr6, u32 1>`: the node's own IPv6 addresses.
pub const NODE_ADDRS6_MAP: &str = "MIREN_NODE_ADDRS6";
/// `Array<Backend6>` indexed by backend id: the IPv6 twin of each backend (the same instance's
/// IPv6 address and port; all zeroes when it has none). IPv6 flows use the same Maglev tables
/// and backend ids as IPv4 ones and take the address from here.
pub const BACKENDS6_MAP: &str = "MIREN_BACKENDS6";
/// `LruHashMap<FlowKey6, Flow6>`: IPv6 conntrack, forward and reverse entries.
pub const CONNTRACK6_MAP: &str = "MIREN_CT6";
/// `PerCpuArray<BackendStats>` indexed by backend id: packets forwarded to its IPv6 twin.
pub const BACKEND_STATS6_MAP: &str = "MIREN_BACKEND_STATS6";
/// `PerCpuArray<PortStats>` indexed by service id: the node port's IPv6 packets
/// ([`PORT_STATS_MAP`] counts its IPv4 ones).
pub const PORT_STATS6_MAP: &str = "MIREN_PORT_STATS6";
/// `LruHashMap<FragKey, FragNat>`: IPv4 datagrams whose first fragment was translated, so
/// their later fragments (no ports) are translated the same way (both directions).
pub const FRAGS_MAP: &str = "MIREN_FRAGS";
/// `LruHashMap<FragKey6, FragNat6>`: [`FRAGS_MAP`] for IPv6.
pub const FRAGS6_MAP: &str = "MIREN_FRAGS6";

/// Most node ports (service ids are `0..MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 16_384;
/// Most backends (backend ids are `0..MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 65_536;
/// Capacity of [`MAGLEV_MAP`] (all tables of all services, both generations).
pub const MAGLEV_ENTRIES: u32 = 4 << 20;
/// Capacity of [`CONNTRACK_MAP`] (two entries per flow).
pub const CONNTRACK_ENTRIES: u32 = 1 << 18;
/// Capacity of [`CONNTRACK6_MAP`] (two entries per flow).
pub const CONNTRACK6_ENTRIES: u32 = 1 << 17;

/// Capacity of [`FRAGS_MAP`] and [`FRAGS6_MAP`] (datagrams in flight as fragments).
pub const FRAGS_ENTRIES: u32 = 8_192;
/// A fragmented datagram's later fragments are translated for this long after the last
/// fragment seen (the kernel's reassembly waits 30 s; fragments of one datagram arrive
/// together).
pub const FRAG_TIMEOUT_NS: u64 = 5_000_000_000;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
/// IP protocol numbers.
pub const PROTO_UDP: u8 = 17;

/// Key of [`SERVICES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Node port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Zero.
    pub pad: u8,
}

/// Value of [`SERVICES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into the stats maps and part of [`MaglevKey`].
    pub id: u32,
    /// Maglev table size (a prime); 0 when the service has no endpoints (traffic dropped).
    pub table_size: u32,
    /// Which of the two table generations is active (0 or 1).
    pub generation: u32,
    /// Number of backends (informational).
    pub backends: u32,
}

/// Key of [`MAGLEV_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevKey {
    /// Service id.
    pub service_id: u32,
    /// `generation << 31 | index`.
    pub slot: u32,
}

impl MaglevKey {
    /// The key of entry `index` of generation `generation` of a service's table.
    pub const fn new(service_id: u32, generation: u32, index: u32) -> Self {
        Self {
            service_id,
            slot: (generation << 31) | index,
        }
    }
}

/// Value of [`BACKENDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Sandbox address, network byte order.
    pub addr_be: u32,
    /// Target port, network byte order.
    pub port_be: u16,
    /// Zero.
    pub pad: u16,
}

/// Key of [`BACKEND_ADDRS_MAP`]: a backend as the source of its packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    /// Sandbox address, network byte order.
    pub addr_be: u32,
    /// Target port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Zero.
    pub pad: u8,
}

/// Key of [`BACKEND_ADDRS6_MAP`]: an IPv6 backend as the source of its packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr6 {
    /// Sandbox IPv6 address (words as stored).
    pub addr: Addr6,
    /// Target port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Zero.
    pub pad: u8,
}

/// Key of [`CONNTRACK_MAP`]: the packet's own 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address (be).
    pub src_addr: u32,
    /// Destination address (be).
    pub dst_addr: u32,
    /// Source port (be).
    pub src_port: u16,
    /// Destination port (be).
    pub dst_port: u16,
    /// IP protocol.
    pub protocol: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// Value of [`CONNTRACK_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Forward entry: the backend address; reverse entry: the node address (be).
    pub nat_addr: u32,
    /// Forward entry: the backend port; reverse entry: the node port (be).
    pub nat_port: u16,
    /// [`FLOW_REVERSE`], [`FLOW_CLOSING`].
    pub flags: u16,
    /// Service id (for stats).
    pub service_id: u32,
    /// Backend id (for stats and for removing flows of removed backends).
    pub backend_id: u32,
    /// Last packet seen (forward direction), ns on the data plane's clock.
    pub last_seen_ns: u64,
}

/// An IPv6 address as stored in packets: four 32-bit words in network byte order.
pub type Addr6 = [u32; 4];

/// Value of [`BACKENDS6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend6 {
    /// Sandbox IPv6 address (words as stored); all zeroes: the backend has none.
    pub addr: Addr6,
    /// Target port, network byte order.
    pub port_be: u16,
    /// Zero.
    pub pad: u16,
}

/// Key of [`CONNTRACK6_MAP`]: [`FlowKey`] with IPv6 addresses (ports be, pad zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub struct FlowKey6 {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// Value of [`CONNTRACK6_MAP`]; the fields mean what they mean in [`Flow`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow6 {
    /// Forward entry: the backend address; reverse entry: the node address.
    pub nat_addr: Addr6,
    /// Forward entry: the backend port; reverse entry: the node port (be).
    pub nat_port: u16,
    /// [`FLOW_REVERSE`], [`FLOW_CLOSING`].
    pub flags: u16,
    /// Service id (for stats).
    pub service_id: u32,
    /// Backend id (for stats and for removing flows of removed backends).
    pub backend_id: u32,
    /// Zero.
    pub pad: u32,
    /// Last packet seen (forward direction), ns on the data plane's clock.
    pub last_seen_ns: u64,
}

/// Key of [`FRAGS_MAP`]: what the fragments of one IPv4 datagram share, as they arrive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address (be).
    pub src_addr: u32,
    /// Destination address (be).
    pub dst_addr: u32,
    /// IP identification, as stored.
    pub id: u16,
    /// IP protocol.
    pub protocol: u8,
    /// Zero.
    pub pad: u8,
}

/// Value of [`FRAGS_MAP`]: how the datagram's first fragment was translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragNat {
    /// Toward an instance: the backend address (new destination); a reply: the node address
    /// (new source).
    pub nat_addr: u32,
    /// Service id (for stats).
    pub service_id: u32,
    /// Backend id (for stats).
    pub backend_id: u32,
    /// Zero.
    pub pad: u32,
    /// Last fragment seen, ns on the data plane's clock.
    pub last_seen_ns: u64,
}

/// Key of [`FRAGS6_MAP`] (the fragment header's 32-bit identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub struct FragKey6 {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    pub id: u32,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// Value of [`FRAGS6_MAP`]; the fields mean what they mean in [`FragNat`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct FragNat6 {
    pub nat_addr: Addr6,
    pub service_id: u32,
    pub backend_id: u32,
    pub last_seen_ns: u64,
}

/// A reverse (reply-direction) conntrack entry.
pub const FLOW_REVERSE: u16 = 1;
/// A TCP flow that has seen FIN: it expires after [`Config::tcp_closing_timeout_ns`].
pub const FLOW_CLOSING: u16 = 2;
/// A flow whose backend has answered (set on both entries by the first reply). A SYN that
/// meets a flow without it is a new connection attempt and picks its backend again, so a
/// client retrying from the same port after its backend was removed reaches a live one.
pub const FLOW_REPLIED: u16 = 4;

/// Per node-port counters, value of [`PORT_STATS_MAP`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortStats {
    /// Packets received for the node port.
    pub rx_packets: u64,
    /// IP bytes received (header and payload, as nftables counts).
    pub rx_bytes: u64,
    /// New flows (conntrack misses that created an entry).
    pub flows: u64,
    /// Reply packets reverse-NATed.
    pub tx_packets: u64,
    /// Reply IP bytes.
    pub tx_bytes: u64,
    /// Dropped: the node port has no endpoints.
    pub drop_no_backend: u64,
    /// Dropped: the Maglev table was being replaced and the slot was missing.
    pub drop_table_miss: u64,
}

impl PortStats {
    /// Adds `other` field by field (summing per-CPU values).
    pub fn add(&mut self, other: &Self) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.flows += other.flows;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.drop_no_backend += other.drop_no_backend;
        self.drop_table_miss += other.drop_table_miss;
    }
}

/// Per backend counters, value of [`BACKEND_STATS_MAP`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Packets forwarded to the backend.
    pub packets: u64,
    /// IP bytes forwarded.
    pub bytes: u64,
}

impl BackendStats {
    /// Adds `other` field by field (summing per-CPU values).
    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Indices of [`GLOBAL_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalStat {
    /// Packets passed untouched (not for a node port).
    Passed = 0,
    /// Truncated or invalid packets (passed to the kernel, which drops them).
    Malformed = 1,
    /// Conntrack hits.
    ConntrackHit = 2,
    /// Conntrack misses.
    ConntrackMiss = 3,
    /// TCP conntrack misses without SYN (mid-flow after an eviction, a stray RST, …).
    TcpNonSynMiss = 4,
    /// Later fragments (no ports) of a node-port datagram translated like its first one,
    /// toward an instance or back to the client.
    FragmentForwarded = 5,
    /// Later TCP/UDP fragments to a node address whose first fragment was not seen (or too
    /// long ago): passed to the kernel.
    FragmentUnmatched = 6,
    /// ICMP errors about a node-port reply (e.g. fragmentation needed, packet too big)
    /// translated to the instance that owns the flow.
    IcmpToInstance = 7,
    /// ICMP errors from an instance about a client's packet (e.g. port unreachable)
    /// translated to come from the node port.
    IcmpFromInstance = 8,
}

/// Number of [`GlobalStat`] slots.
pub const GLOBAL_STATS: u32 = 9;

/// Value of [`CONFIG_MAP`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// UDP sessions idle this long start over (new backend choice).
    pub udp_timeout_ns: u64,
    /// TCP flows that saw FIN expire after this long without packets.
    pub tcp_closing_timeout_ns: u64,
    /// When non-zero, the data plane's clock (tests); otherwise `bpf_ktime_get_ns`.
    pub fake_now_ns: u64,
}

/// The hash that picks a flow's Maglev slot: a mix of the client's address and port, the
/// node port and the protocol (the node address is left out so every node address of a
/// node port shares one placement).
pub const fn flow_hash(src_addr: u32, src_port: u16, dst_port: u16, protocol: u8) -> u32 {
    let mut h = src_addr ^ 0x9e37_79b9;
    h = mix(h ^ ((src_port as u32) << 16 | dst_port as u32));
    mix(h ^ protocol as u32)
}

/// [`flow_hash`] of an IPv6 client: its address folded to 32 bits (XOR of its words).
pub const fn flow_hash6(src_addr: &Addr6, src_port: u16, dst_port: u16, protocol: u8) -> u32 {
    let folded = src_addr[0] ^ src_addr[1] ^ src_addr[2] ^ src_addr[3];
    flow_hash(folded, src_port, dst_port, protocol)
}

/// murmur3's 32-bit finalizer.
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 4);
    assert!(core::mem::size_of::<Service>() == 16);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<BackendAddr>() == 8);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<Flow>() == 24);
    assert!(core::mem::size_of::<PortStats>() == 56);
    assert!(core::mem::size_of::<BackendStats>() == 16);
    assert!(core::mem::size_of::<Config>() == 24);
    assert!(core::mem::size_of::<Backend6>() == 20);
    assert!(core::mem::size_of::<FlowKey6>() == 40);
    assert!(core::mem::size_of::<Flow6>() == 40);
    assert!(core::mem::size_of::<BackendAddr6>() == 20);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragNat>() == 24);
    assert!(core::mem::size_of::<FragKey6>() == 40);
    assert!(core::mem::size_of::<FragNat6>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C) with only integer fields and explicit padding (sizes asserted).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendAddr {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for Flow6 {}
    unsafe impl aya::Pod for BackendAddr6 {}
}
