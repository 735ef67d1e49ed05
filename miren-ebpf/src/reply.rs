//! `miren_reply`: TC egress reverse NAT. A reply from a backend to a client of a node-port
//! flow (found as a reverse conntrack entry) gets the node's address and node port as its
//! source again. The kernel checksum helpers with the pseudo-header flag keep checksums right
//! also for locally generated, checksum-offloaded packets. Other traffic is untouched.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use miren_common::nodeport::{FLOW_REVERSE, FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::{ETH_LEN, ETH_P_IP_BE, IP_FRAG_MASK, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF},
    maps::{CONNTRACK, port_stats},
};

/// Offsets in the IPv4 header.
const IP_VERSION_IHL: usize = ETH_LEN;
const IP_TOT_LEN: usize = ETH_LEN + 2;
const IP_FRAG_OFF: usize = ETH_LEN + 6;
const IP_PROTOCOL: usize = ETH_LEN + 9;
const IP_CHECK: usize = ETH_LEN + 10;
const IP_SADDR: usize = ETH_LEN + 12;
const IP_DADDR: usize = ETH_LEN + 16;

#[classifier]
pub fn miren_reply(ctx: TcContext) -> i32 {
    let _ = reverse_nat(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn reverse_nat(ctx: &TcContext) -> Result<(), i64> {
    if ctx.load::<u16>(12)? != ETH_P_IP_BE {
        return Ok(());
    }
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
    let (check_off, mangled) = if protocol == PROTO_TCP {
        (l4 + TCP_CHECK_OFF, 0)
    } else {
        (l4 + UDP_CHECK_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    };
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
