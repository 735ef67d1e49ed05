//! `miren_reply`: TC egress reverse NAT. A reply from a backend to a client of a node-port
//! flow (found as a reverse conntrack entry, IPv4 or IPv6) gets the node's address and node
//! port as its source again. The kernel checksum helpers with the pseudo-header flag keep
//! checksums right also for locally generated, checksum-offloaded packets. Other traffic is
//! untouched; so is an IPv6 packet with extension headers (a backend's reply carries none).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use miren_common::nodeport::{Addr6, FLOW_REVERSE, FlowKey, FlowKey6, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::{
        ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IP_FRAG_MASK, IPV6_LEN, Ports, TCP_CHECK_OFF,
        UDP_CHECK_OFF,
    },
    maps::{CONNTRACK, CONNTRACK6, port_stats, port_stats6},
};

/// Offsets in the IPv4 header.
const IP_VERSION_IHL: usize = ETH_LEN;
const IP_TOT_LEN: usize = ETH_LEN + 2;
const IP_FRAG_OFF: usize = ETH_LEN + 6;
const IP_PROTOCOL: usize = ETH_LEN + 9;
const IP_CHECK: usize = ETH_LEN + 10;
const IP_SADDR: usize = ETH_LEN + 12;
const IP_DADDR: usize = ETH_LEN + 16;

/// Offsets in the IPv6 header.
const IP6_PAYLOAD_LEN: usize = ETH_LEN + 4;
const IP6_NEXTHDR: usize = ETH_LEN + 6;
const IP6_SADDR: usize = ETH_LEN + 8;
const IP6_DADDR: usize = ETH_LEN + 24;

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

#[inline(always)]
fn reverse_nat4(ctx: &TcContext) -> Result<(), i64> {
    let protocol: u8 = ctx.load(IP_PROTOCOL)?;
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Ok(());
    }
    if u16::from_be(ctx.load::<u16>(IP_FRAG_OFF)?) & IP_FRAG_MASK != 0 {
        return Ok(());
    }
    let ihl = (ctx.load::<u8>(IP_VERSION_IHL)? & 0x0f) as usize;
    if ihl < 5 {
        return Ok(());
    }
    let l4 = ETH_LEN + ihl * 4;
    let ports: Ports = ctx.load(l4)?;
    let saddr: u32 = ctx.load(IP_SADDR)?;
    let key = FlowKey {
        src_addr: saddr,
        dst_addr: ctx.load(IP_DADDR)?,
        src_port: ports.src,
        dst_port: ports.dst,
        protocol,
        pad: [0; 3],
    };
    let Some(flow) = CONNTRACK.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup.
    let flow = unsafe { *flow };
    if flow.flags & FLOW_REVERSE == 0 {
        return Ok(());
    }
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
    let ip_bytes = u64::from(u16::from_be(ctx.load::<u16>(IP_TOT_LEN)?));
    port_stats(flow.service_id, |s| {
        s.tx_packets += 1;
        s.tx_bytes += ip_bytes;
    });
    Ok(())
}

#[inline(always)]
fn reverse_nat6(ctx: &TcContext) -> Result<(), i64> {
    let protocol: u8 = ctx.load(IP6_NEXTHDR)?;
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Ok(());
    }
    let l4 = ETH_LEN + IPV6_LEN;
    let ports: Ports = ctx.load(l4)?;
    let saddr: Addr6 = ctx.load(IP6_SADDR)?;
    let key = FlowKey6 {
        src_addr: saddr,
        dst_addr: ctx.load(IP6_DADDR)?,
        src_port: ports.src,
        dst_port: ports.dst,
        protocol,
        pad: [0; 3],
    };
    let Some(flow) = CONNTRACK6.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup.
    let flow = unsafe { *flow };
    if flow.flags & FLOW_REVERSE == 0 {
        return Ok(());
    }
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
    let ip_bytes = IPV6_LEN as u64 + u64::from(u16::from_be(ctx.load::<u16>(IP6_PAYLOAD_LEN)?));
    port_stats6(flow.service_id, |s| {
        s.tx_packets += 1;
        s.tx_bytes += ip_bytes;
    });
    Ok(())
}
