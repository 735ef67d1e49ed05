//! The two address families as types, so what the programs do alike for IPv4 and IPv6 is
//! written once: [`V4`] and [`V6`] name each family's conntrack, fragment and per-port stats
//! maps and how to read their entries (the layouts themselves differ and are fixed by pinned
//! maps, see `miren_common::nodeport`).

use aya_ebpf::maps::{LruHashMap, PerCpuArray};
use miren_common::nodeport::{
    Flow, Flow6, FlowKey, FlowKey6, FragKey, FragKey6, FragNat, FragNat6, PortStats,
};

use crate::maps::{CONNTRACK, CONNTRACK6, FRAGS, FRAGS6, PORT_STATS, PORT_STATS6};

/// An address family's maps and entry layouts.
pub trait Family {
    /// Conntrack key (a packet's 5-tuple).
    type Key: 'static;
    /// Conntrack entry.
    type Flow: Copy + 'static;
    /// Fragment tracking key.
    type FragKey: 'static;
    /// Fragment tracking entry.
    type FragNat: Copy + 'static;

    /// The conntrack map.
    fn conntrack() -> &'static LruHashMap<Self::Key, Self::Flow>;
    /// The fragment tracking map.
    fn frags() -> &'static LruHashMap<Self::FragKey, Self::FragNat>;
    /// The per-node-port stats of this family's packets.
    fn port_stats() -> &'static PerCpuArray<PortStats>;
    /// A conntrack entry's flags.
    fn flags(flow: &mut Self::Flow) -> &mut u16;
    /// When a conntrack entry's flow was seen last.
    fn last_seen(flow: &mut Self::Flow) -> &mut u64;
    /// A conntrack key's IP protocol.
    fn protocol(key: &Self::Key) -> u8;
    /// When a fragment of a tracked datagram was seen last.
    fn frag_last_seen(nat: &mut Self::FragNat) -> &mut u64;
    /// The forward entry's key of the flow whose reply has 5-tuple `reply` and reverse entry
    /// `flow` (the client's packets: client → node address and node port).
    fn forward_key(reply: &Self::Key, flow: &Self::Flow) -> Self::Key;
    /// The reverse entry's key of the flow whose client packets have 5-tuple `forward` and
    /// forward entry `flow` (the backend's replies: backend → client).
    fn reverse_key(forward: &Self::Key, flow: &Self::Flow) -> Self::Key;
}

/// IPv4.
pub struct V4;
/// IPv6.
pub struct V6;

impl Family for V4 {
    type Key = FlowKey;
    type Flow = Flow;
    type FragKey = FragKey;
    type FragNat = FragNat;

    fn conntrack() -> &'static LruHashMap<FlowKey, Flow> {
        &CONNTRACK
    }
    fn frags() -> &'static LruHashMap<FragKey, FragNat> {
        &FRAGS
    }
    fn port_stats() -> &'static PerCpuArray<PortStats> {
        &PORT_STATS
    }
    fn flags(flow: &mut Flow) -> &mut u16 {
        &mut flow.flags
    }
    fn last_seen(flow: &mut Flow) -> &mut u64 {
        &mut flow.last_seen_ns
    }
    fn protocol(key: &FlowKey) -> u8 {
        key.protocol
    }
    fn frag_last_seen(nat: &mut FragNat) -> &mut u64 {
        &mut nat.last_seen_ns
    }
    fn forward_key(reply: &FlowKey, flow: &Flow) -> FlowKey {
        FlowKey {
            src_addr: reply.dst_addr,
            dst_addr: flow.nat_addr,
            src_port: reply.dst_port,
            dst_port: flow.nat_port,
            protocol: reply.protocol,
            pad: [0; 3],
        }
    }
    fn reverse_key(forward: &FlowKey, flow: &Flow) -> FlowKey {
        FlowKey {
            src_addr: flow.nat_addr,
            dst_addr: forward.src_addr,
            src_port: flow.nat_port,
            dst_port: forward.src_port,
            protocol: forward.protocol,
            pad: [0; 3],
        }
    }
}

impl Family for V6 {
    type Key = FlowKey6;
    type Flow = Flow6;
    type FragKey = FragKey6;
    type FragNat = FragNat6;

    fn conntrack() -> &'static LruHashMap<FlowKey6, Flow6> {
        &CONNTRACK6
    }
    fn frags() -> &'static LruHashMap<FragKey6, FragNat6> {
        &FRAGS6
    }
    fn port_stats() -> &'static PerCpuArray<PortStats> {
        &PORT_STATS6
    }
    fn flags(flow: &mut Flow6) -> &mut u16 {
        &mut flow.flags
    }
    fn last_seen(flow: &mut Flow6) -> &mut u64 {
        &mut flow.last_seen_ns
    }
    fn protocol(key: &FlowKey6) -> u8 {
        key.protocol
    }
    fn frag_last_seen(nat: &mut FragNat6) -> &mut u64 {
        &mut nat.last_seen_ns
    }
    fn forward_key(reply: &FlowKey6, flow: &Flow6) -> FlowKey6 {
        FlowKey6 {
            src_addr: reply.dst_addr,
            dst_addr: flow.nat_addr,
            src_port: reply.dst_port,
            dst_port: flow.nat_port,
            protocol: reply.protocol,
            pad: [0; 3],
        }
    }
    fn reverse_key(forward: &FlowKey6, flow: &Flow6) -> FlowKey6 {
        FlowKey6 {
            src_addr: flow.nat_addr,
            dst_addr: forward.src_addr,
            src_port: flow.nat_port,
            dst_port: forward.src_port,
            protocol: forward.protocol,
            pad: [0; 3],
        }
    }
}
