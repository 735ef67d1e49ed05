//! `miren_reply`: TC egress reverse NAT. A reply from a backend to a client of a node-port
//! flow (found as a reverse conntrack entry, IPv4 or IPv6) gets the node's address and node
//! port as its source again. The kernel checksum helpers with the pseudo-header flag keep
//! checksums right also for locally generated, checksum-offloaded packets.
//!
//! A fragmented reply's first fragment is translated like any reply and remembered; its later
//! fragments (no ports) get the same source address ([`crate::fragments`]). An ICMP error an
//! instance sends about a client's packet (e.g. port unreachable: the quoted packet is
//! `client → instance:port`) leaves translated as the node would have sent it: outer source
//! the node address (when it was the instance's), quoted destination `NODE:node_port`, every
//! checksum updated. Other traffic is untouched; so is an IPv6 packet with extension headers
//! other than a fragment header (a backend's reply carries none).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use miren_common::nodeport::{
    Addr6, FLOW_REPLIED, FLOW_REVERSE, FlowKey, FlowKey6, FragKey, FragKey6, GlobalStat, PROTO_TCP,
    PROTO_UDP,
};

use crate::{
    csum,
    family::{Family, V4, V6},
    fragments,
    headers::{
        ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, ICMP_LEN, IP_FRAG_MASK, IP_OFFSET_MASK, IPV6_FRAGMENT,
        IPV6_LEN, IPV6_OFFSET_MASK, PROTO_ICMP, PROTO_ICMPV6, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF,
        icmp_is_error, icmp6_is_error,
    },
    maps::{config, count, now_ns, port_stats_in},
};

/// Offsets in the IPv4 header (from the start of the frame).
const IP_VERSION_IHL: usize = ETH_LEN;
const IP_TOT_LEN: usize = ETH_LEN + 2;
const IP_ID: usize = ETH_LEN + 4;
const IP_FRAG_OFF: usize = ETH_LEN + 6;
const IP_PROTOCOL: usize = ETH_LEN + 9;
const IP_CHECK: usize = ETH_LEN + 10;
const IP_SADDR: usize = ETH_LEN + 12;
const IP_DADDR: usize = ETH_LEN + 16;

/// Offsets in an IPv4 header, from its start (for quoted headers).
const V4_CHECK: usize = 10;
const V4_SADDR: usize = 12;
const V4_DADDR: usize = 16;

/// Offsets in the IPv6 header (from the start of the frame).
const IP6_PAYLOAD_LEN: usize = ETH_LEN + 4;
const IP6_NEXTHDR: usize = ETH_LEN + 6;
const IP6_SADDR: usize = ETH_LEN + 8;
const IP6_DADDR: usize = ETH_LEN + 24;

/// Offsets in an IPv6 header, from its start (for quoted headers).
const V6_NEXTHDR: usize = 6;
const V6_SADDR: usize = 8;
const V6_DADDR: usize = 24;

/// Offset of the ICMP checksum from the ICMP header.
const ICMP_CHECK: usize = 2;

#[classifier]
pub fn miren_reply(ctx: TcContext) -> i32 {
    let _ = reverse_nat(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Result<(), i64> {
    match ctx.load::<u16>(12)? {
        ETH_P_IP_BE => reverse_nat4(ctx),
        ETH_P_IPV6_BE => reverse_nat6(ctx),
        _ => Ok(()),
    }
}

/// Where the L4 checksum is and the flags its updates need: UDP marks a computed 0 as
/// 0xFFFF (`BPF_F_MARK_MANGLED_0`).
#[inline(always)]
fn l4_check(protocol: u8, l4: usize) -> (usize, u64) {
    if protocol == PROTO_TCP {
        (l4 + TCP_CHECK_OFF, 0)
    } else {
        (l4 + UDP_CHECK_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    }
}

/// The reverse entry of a flow, if `key` is a reply's 5-tuple.
#[inline(always)]
fn reverse_flow<F: Family>(key: &F::Key) -> Option<F::Flow> {
    // SAFETY: pointer from a successful lookup.
    let mut flow = unsafe { *F::conntrack().get_ptr(key)? };
    (*F::flags(&mut flow) & FLOW_REVERSE != 0).then_some(flow)
}

/// Marks both entries of a flow answered by its backend, at its first reply (`key` and
/// `flow`: the reply's 5-tuple and reverse entry).
#[inline(always)]
fn mark_replied<F: Family>(key: &F::Key, mut flow: F::Flow) {
    if *F::flags(&mut flow) & FLOW_REPLIED != 0 {
        return;
    }
    let forward_key = F::forward_key(key, &flow);
    for entry_key in [key, &forward_key] {
        if let Some(entry) = F::conntrack().get_ptr_mut(entry_key) {
            // SAFETY: pointer from a successful lookup; racing writers only set flags.
            unsafe { *F::flags(&mut *entry) |= FLOW_REPLIED };
        }
    }
}

/// Counts a reply packet of node port `service_id`.
#[inline(always)]
fn count_tx<F: Family>(service_id: u32, ip_bytes: u64) {
    port_stats_in(F::port_stats(), service_id, |s| {
        s.tx_packets += 1;
        s.tx_bytes += ip_bytes;
    });
}

#[inline(always)]
fn reverse_nat4(ctx: &TcContext) -> Result<(), i64> {
    let protocol: u8 = ctx.load(IP_PROTOCOL)?;
    if protocol != PROTO_TCP && protocol != PROTO_UDP && protocol != PROTO_ICMP {
        return Ok(());
    }
    let ihl = (ctx.load::<u8>(IP_VERSION_IHL)? & 0x0f) as usize;
    if ihl < 5 {
        return Ok(());
    }
    let l4 = ETH_LEN + ihl * 4;
    if protocol == PROTO_ICMP {
        return icmp_from_instance(ctx, l4);
    }
    let saddr: u32 = ctx.load(IP_SADDR)?;
    let daddr: u32 = ctx.load(IP_DADDR)?;
    let ip_bytes = u64::from(u16::from_be(ctx.load::<u16>(IP_TOT_LEN)?));
    let frag_off = u16::from_be(ctx.load::<u16>(IP_FRAG_OFF)?);
    let fragment = FragKey {
        src_addr: saddr,
        dst_addr: daddr,
        id: ctx.load(IP_ID)?,
        protocol,
        pad: 0,
    };
    if frag_off & IP_OFFSET_MASK != 0 {
        if let Some(nat) = fragments::translation::<V4>(&fragment) {
            ctx.l3_csum_replace(IP_CHECK, u64::from(saddr), u64::from(nat.nat_addr), 4)?;
            ctx.store(IP_SADDR, &nat.nat_addr, 0)?;
            count_tx::<V4>(nat.service_id, ip_bytes);
        }
        return Ok(());
    }
    let ports: Ports = ctx.load(l4)?;
    let key = FlowKey {
        src_addr: saddr,
        dst_addr: daddr,
        src_port: ports.src,
        dst_port: ports.dst,
        protocol,
        pad: [0; 3],
    };
    let Some(flow) = reverse_flow::<V4>(&key) else {
        return Ok(());
    };
    mark_replied::<V4>(&key, flow);
    let (check_off, mangled) = l4_check(protocol, l4);
    let udp_unchecked = protocol == PROTO_UDP && ctx.load::<u16>(check_off)? == 0;
    if !udp_unchecked {
        let addr_flags = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
        ctx.l4_csum_replace(
            check_off,
            u64::from(saddr),
            u64::from(flow.nat_addr),
            addr_flags,
        )?;
        ctx.l4_csum_replace(
            check_off,
            u64::from(ports.src),
            u64::from(flow.nat_port),
            mangled | 2,
        )?;
    }
    ctx.l3_csum_replace(IP_CHECK, u64::from(saddr), u64::from(flow.nat_addr), 4)?;
    ctx.store(IP_SADDR, &flow.nat_addr, 0)?;
    ctx.store(l4, &flow.nat_port, 0)?;
    count_tx::<V4>(flow.service_id, ip_bytes);
    if frag_off & IP_FRAG_MASK != 0 {
        let now = now_ns(&config());
        fragments::remember(
            &fragment,
            flow.nat_addr,
            flow.service_id,
            flow.backend_id,
            now,
        );
    }
    Ok(())
}

/// An ICMPv4 error from an instance about a client's packet, at `icmp`.
#[inline(always)]
fn icmp_from_instance(ctx: &TcContext, icmp: usize) -> Result<(), i64> {
    if !icmp_is_error(ctx.load(icmp)?) {
        return Ok(());
    }
    let inner = icmp + ICMP_LEN;
    let version_ihl: u8 = ctx.load(inner)?;
    let quoted_ihl = (version_ihl & 0x0f) as usize;
    let protocol: u8 = ctx.load(inner + 9)?;
    if version_ihl >> 4 != 4
        || quoted_ihl < 5
        || (protocol != PROTO_TCP && protocol != PROTO_UDP)
        || u16::from_be(ctx.load::<u16>(inner + 6)?) & IP_OFFSET_MASK != 0
    {
        return Ok(());
    }
    let quoted_src: u32 = ctx.load(inner + V4_SADDR)?;
    let quoted_dst: u32 = ctx.load(inner + V4_DADDR)?;
    let quoted_l4 = inner + quoted_ihl * 4;
    let ports: Ports = ctx.load(quoted_l4)?;
    // The quoted packet is `client → instance:port`: the reply direction's entry is keyed
    // by `instance:port → client`.
    let key = FlowKey {
        src_addr: quoted_dst,
        dst_addr: quoted_src,
        src_port: ports.dst,
        dst_port: ports.src,
        protocol,
        pad: [0; 3],
    };
    let Some(flow) = reverse_flow::<V4>(&key) else {
        return Ok(());
    };
    let (node, node_port) = (flow.nat_addr, flow.nat_port);
    // Every load before the first store: a packet is translated whole or not at all.
    let outer_src: u32 = ctx.load(IP_SADDR)?;
    let outer_check: u16 = ctx.load(IP_CHECK)?;
    let mut icmp_check: u16 = ctx.load(icmp + ICMP_CHECK)?;
    let old_inner_check: u16 = ctx.load(inner + V4_CHECK)?;
    let (quoted_check_off, _) = l4_check(protocol, quoted_l4);
    let quoted_check: Option<u16> = ctx.load(quoted_check_off).ok();

    let inner_check = csum::replace4(old_inner_check, quoted_dst, node);
    icmp_check = csum::replace4(icmp_check, quoted_dst, node);
    icmp_check = csum::replace2(icmp_check, old_inner_check, inner_check);
    icmp_check = csum::replace2(icmp_check, ports.dst, node_port);
    let quoted_check = quoted_check
        .filter(|old| protocol == PROTO_TCP || *old != 0)
        .map(|old| {
            let mut new = csum::replace4(old, quoted_dst, node);
            new = csum::replace2(new, ports.dst, node_port);
            if protocol == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp_check = csum::replace2(icmp_check, old, new);
            new
        });
    if outer_src == quoted_dst {
        ctx.store(IP_CHECK, &csum::replace4(outer_check, outer_src, node), 0)?;
        ctx.store(IP_SADDR, &node, 0)?;
    }
    ctx.store(inner + V4_DADDR, &node, 0)?;
    ctx.store(inner + V4_CHECK, &inner_check, 0)?;
    ctx.store(quoted_l4 + 2, &node_port, 0)?;
    if let Some(new) = quoted_check {
        ctx.store(quoted_check_off, &new, 0)?;
    }
    ctx.store(icmp + ICMP_CHECK, &icmp_check, 0)?;
    count(GlobalStat::IcmpFromInstance);
    Ok(())
}

#[inline(always)]
fn reverse_nat6(ctx: &TcContext) -> Result<(), i64> {
    let mut protocol: u8 = ctx.load(IP6_NEXTHDR)?;
    let mut l4 = ETH_LEN + IPV6_LEN;
    let saddr: Addr6 = ctx.load(IP6_SADDR)?;
    let daddr: Addr6 = ctx.load(IP6_DADDR)?;
    let ip_bytes = IPV6_LEN as u64 + u64::from(u16::from_be(ctx.load::<u16>(IP6_PAYLOAD_LEN)?));
    if protocol == PROTO_ICMPV6 {
        return icmp6_from_instance(ctx, l4, &saddr);
    }
    // A fragment header right after the fixed header, as the kernel writes it.
    let mut first_fragment = false;
    let mut fragment = FragKey6 {
        src_addr: saddr,
        dst_addr: daddr,
        id: 0,
        protocol,
        pad: [0; 3],
    };
    if protocol == IPV6_FRAGMENT {
        let next: u8 = ctx.load(l4)?;
        let frag_off = u16::from_be(ctx.load::<u16>(l4 + 2)?);
        let key = FragKey6 {
            src_addr: saddr,
            dst_addr: daddr,
            id: ctx.load(l4 + 4)?,
            protocol: next,
            pad: [0; 3],
        };
        if frag_off & IPV6_OFFSET_MASK != 0 {
            if let Some(nat) = fragments::translation::<V6>(&key) {
                ctx.store(IP6_SADDR, &nat.nat_addr, 0)?;
                count_tx::<V6>(nat.service_id, ip_bytes);
            }
            return Ok(());
        }
        protocol = next;
        l4 += 8;
        (first_fragment, fragment) = (true, key);
    }
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Ok(());
    }
    let ports: Ports = ctx.load(l4)?;
    let key = FlowKey6 {
        src_addr: saddr,
        dst_addr: daddr,
        src_port: ports.src,
        dst_port: ports.dst,
        protocol,
        pad: [0; 3],
    };
    let Some(flow) = reverse_flow::<V6>(&key) else {
        return Ok(());
    };
    mark_replied::<V6>(&key, flow);
    // IPv6 has no header checksum; the TCP/UDP one (mandatory for UDP) covers the addresses.
    let (check_off, mangled) = l4_check(protocol, l4);
    let addr_flags = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
    for (old, new) in saddr.iter().zip(flow.nat_addr.iter()) {
        ctx.l4_csum_replace(check_off, u64::from(*old), u64::from(*new), addr_flags)?;
    }
    ctx.l4_csum_replace(
        check_off,
        u64::from(ports.src),
        u64::from(flow.nat_port),
        mangled | 2,
    )?;
    ctx.store(IP6_SADDR, &flow.nat_addr, 0)?;
    ctx.store(l4, &flow.nat_port, 0)?;
    count_tx::<V6>(flow.service_id, ip_bytes);
    if first_fragment {
        let now = now_ns(&config());
        fragments::remember6(
            &fragment,
            &flow.nat_addr,
            flow.service_id,
            flow.backend_id,
            now,
        );
    }
    Ok(())
}

/// An ICMPv6 error from an instance about a client's packet, at `icmp`; `outer_src` is the
/// packet's source.
#[inline(always)]
fn icmp6_from_instance(ctx: &TcContext, icmp: usize, outer_src: &Addr6) -> Result<(), i64> {
    if !icmp6_is_error(ctx.load(icmp)?) {
        return Ok(());
    }
    let inner = icmp + ICMP_LEN;
    let version: u8 = ctx.load(inner)?;
    let protocol: u8 = ctx.load(inner + V6_NEXTHDR)?;
    if version >> 4 != 6 || (protocol != PROTO_TCP && protocol != PROTO_UDP) {
        return Ok(());
    }
    let quoted_src: Addr6 = ctx.load(inner + V6_SADDR)?;
    let quoted_dst: Addr6 = ctx.load(inner + V6_DADDR)?;
    let quoted_l4 = inner + IPV6_LEN;
    let ports: Ports = ctx.load(quoted_l4)?;
    let key = FlowKey6 {
        src_addr: quoted_dst,
        dst_addr: quoted_src,
        src_port: ports.dst,
        dst_port: ports.src,
        protocol,
        pad: [0; 3],
    };
    let Some(flow) = reverse_flow::<V6>(&key) else {
        return Ok(());
    };
    let (node, node_port) = (flow.nat_addr, flow.nat_port);
    let mut icmp_check: u16 = ctx.load(icmp + ICMP_CHECK)?;
    let (quoted_check_off, _) = l4_check(protocol, quoted_l4);
    let quoted_check: Option<u16> = ctx.load(quoted_check_off).ok();

    // The ICMPv6 checksum covers a pseudo-header with the outer addresses.
    let outer_changes = *outer_src == quoted_dst;
    if outer_changes {
        icmp_check = csum::replace_addr6(icmp_check, outer_src, &node);
    }
    icmp_check = csum::replace_addr6(icmp_check, &quoted_dst, &node);
    icmp_check = csum::replace2(icmp_check, ports.dst, node_port);
    let quoted_check = quoted_check.map(|old| {
        let mut new = csum::replace_addr6(old, &quoted_dst, &node);
        new = csum::replace2(new, ports.dst, node_port);
        if protocol == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        icmp_check = csum::replace2(icmp_check, old, new);
        new
    });
    if outer_changes {
        ctx.store(IP6_SADDR, &node, 0)?;
    }
    ctx.store(inner + V6_DADDR, &node, 0)?;
    ctx.store(quoted_l4 + 2, &node_port, 0)?;
    if let Some(new) = quoted_check {
        ctx.store(quoted_check_off, &new, 0)?;
    }
    ctx.store(icmp + ICMP_CHECK, &icmp_check, 0)?;
    count(GlobalStat::IcmpFromInstance);
    Ok(())
}
