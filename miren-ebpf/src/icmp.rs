//! ICMP errors toward instances (XDP): an error sent to the node about a node-port reply
//! (e.g. fragmentation needed / packet too big on the client's path: the quoted packet is
//! `NODE_IP:node_port → client`) goes to the instance that owns the flow, translated as the
//! instance sent the reply: outer destination and quoted source become the backend's, and
//! every checksum (outer IPv4 header, quoted IPv4 header, quoted TCP/UDP checksum when
//! quoted, ICMP) is updated. Errors that match no flow, that quote too little (no ports) or
//! a later fragment, and all ICMP that is not an error (echo requests to the node) pass
//! untouched.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use miren_common::nodeport::{FLOW_REVERSE, FlowKey, FlowKey6, GlobalStat, PROTO_TCP, PROTO_UDP};

use crate::{
    csum,
    headers::{
        ICMP_LEN, IP_OFFSET_MASK, IPV6_LEN, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Ports, TCP_CHECK_OFF,
        UDP_CHECK_OFF, icmp_is_error, icmp6_is_error,
    },
    maps::{CONNTRACK, CONNTRACK6, count},
};

/// A `T` at `offset`, if it lies before `end` (the end of the IP packet) and in the frame.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize, end: usize) -> Option<*mut T> {
    let size = core::mem::size_of::<T>();
    if offset + size > end || ctx.data() + offset + size > ctx.data_end() {
        return None;
    }
    Some((ctx.data() + offset) as *mut T)
}

/// Counts and passes an ICMPv4 message to a node address at `icmp` (`end`: the end of the
/// IP packet), translated when it is an error about a node-port reply.
#[inline(always)]
pub fn to_instance(ctx: &XdpContext, ip: *mut Ipv4Hdr, icmp: usize, end: usize) -> u32 {
    count(match translate(ctx, ip, icmp, end) {
        Some(()) => GlobalStat::IcmpToInstance,
        None => GlobalStat::Passed,
    });
    xdp_action::XDP_PASS
}

/// IPv6: [`to_instance`] for an ICMPv6 message.
#[inline(always)]
pub fn to_instance6(ctx: &XdpContext, ip: *mut Ipv6Hdr, icmp: usize, end: usize) -> u32 {
    count(match translate6(ctx, ip, icmp, end) {
        Some(()) => GlobalStat::IcmpToInstance,
        None => GlobalStat::Passed,
    });
    xdp_action::XDP_PASS
}

/// Where a quoted TCP/UDP checksum is, relative to its header.
#[inline(always)]
fn check_offset(protocol: u8) -> usize {
    if protocol == PROTO_TCP {
        TCP_CHECK_OFF
    } else {
        UDP_CHECK_OFF
    }
}

#[inline(always)]
fn translate(ctx: &XdpContext, ip: *mut Ipv4Hdr, icmp_off: usize, end: usize) -> Option<()> {
    let icmp: *mut IcmpHdr = at(ctx, icmp_off, end)?;
    // SAFETY: every pointer dereferenced below was bounds-checked by `at` (or by the caller).
    if !icmp_is_error(unsafe { (*icmp).kind }) {
        return None;
    }
    let inner_off = icmp_off + ICMP_LEN;
    let inner: *mut Ipv4Hdr = at(ctx, inner_off, end)?;
    let (version_ihl, protocol, frag_off, quoted_src, quoted_dst) = unsafe {
        (
            (*inner).version_ihl,
            (*inner).protocol,
            (*inner).frag_off,
            (*inner).saddr,
            (*inner).daddr,
        )
    };
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4
        || ihl < 5
        || (protocol != PROTO_TCP && protocol != PROTO_UDP)
        || u16::from_be(frag_off) & IP_OFFSET_MASK != 0
    {
        return None;
    }
    let quoted_l4 = inner_off + ihl * 4;
    let ports: *mut Ports = at(ctx, quoted_l4, end)?;
    let (quoted_sport, quoted_dport) = unsafe { ((*ports).src, (*ports).dst) };
    // The quoted packet is a reply `NODE:node_port → client`; its flow's forward entry is
    // keyed by the client's packets `client → NODE:node_port`.
    let key = FlowKey {
        src_addr: quoted_dst,
        dst_addr: quoted_src,
        src_port: quoted_dport,
        dst_port: quoted_sport,
        protocol,
        pad: [0; 3],
    };
    // SAFETY: pointer from a successful lookup.
    let flow = unsafe { *CONNTRACK.get_ptr(key)? };
    if flow.flags & FLOW_REVERSE != 0 {
        return None;
    }
    let (backend, backend_port) = (flow.nat_addr, flow.nat_port);
    unsafe {
        let node = (*ip).daddr;
        (*ip).check = csum::replace4((*ip).check, node, backend);
        (*ip).daddr = backend;

        let mut icmp_check = csum::replace4((*icmp).check, quoted_src, backend);
        let old_inner_check = (*inner).check;
        let inner_check = csum::replace4(old_inner_check, quoted_src, backend);
        icmp_check = csum::replace2(icmp_check, old_inner_check, inner_check);
        (*inner).check = inner_check;
        (*inner).saddr = backend;

        if let Some(check) = at::<u16>(ctx, quoted_l4 + check_offset(protocol), end) {
            let old = *check;
            if protocol == PROTO_TCP || old != 0 {
                let mut new = csum::replace4(old, quoted_src, backend);
                new = csum::replace2(new, quoted_sport, backend_port);
                if protocol == PROTO_UDP && new == 0 {
                    new = 0xffff;
                }
                icmp_check = csum::replace2(icmp_check, old, new);
                *check = new;
            }
        }
        icmp_check = csum::replace2(icmp_check, quoted_sport, backend_port);
        (*ports).src = backend_port;
        (*icmp).check = icmp_check;
    }
    Some(())
}

#[inline(always)]
fn translate6(ctx: &XdpContext, ip: *mut Ipv6Hdr, icmp_off: usize, end: usize) -> Option<()> {
    let icmp: *mut IcmpHdr = at(ctx, icmp_off, end)?;
    // SAFETY: every pointer dereferenced below was bounds-checked by `at` (or by the caller).
    if !icmp6_is_error(unsafe { (*icmp).kind }) {
        return None;
    }
    let inner_off = icmp_off + ICMP_LEN;
    let inner: *mut Ipv6Hdr = at(ctx, inner_off, end)?;
    let (version, protocol, quoted_src, quoted_dst) = unsafe {
        (
            (*inner).vtc_flow[0] >> 4,
            (*inner).nexthdr,
            (*inner).saddr,
            (*inner).daddr,
        )
    };
    // A quoted packet with extension headers is not a reply this data plane sent.
    if version != 6 || (protocol != PROTO_TCP && protocol != PROTO_UDP) {
        return None;
    }
    let quoted_l4 = inner_off + IPV6_LEN;
    let ports: *mut Ports = at(ctx, quoted_l4, end)?;
    let (quoted_sport, quoted_dport) = unsafe { ((*ports).src, (*ports).dst) };
    let key = FlowKey6 {
        src_addr: quoted_dst,
        dst_addr: quoted_src,
        src_port: quoted_dport,
        dst_port: quoted_sport,
        protocol,
        pad: [0; 3],
    };
    // SAFETY: pointer from a successful lookup.
    let flow = unsafe { *CONNTRACK6.get_ptr(key)? };
    if flow.flags & FLOW_REVERSE != 0 {
        return None;
    }
    let (backend, backend_port) = (flow.nat_addr, flow.nat_port);
    unsafe {
        // The ICMPv6 checksum covers a pseudo-header with the outer addresses.
        let node = (*ip).daddr;
        let mut icmp_check = csum::replace_addr6((*icmp).check, &node, &backend);
        (*ip).daddr = backend;

        icmp_check = csum::replace_addr6(icmp_check, &quoted_src, &backend);
        (*inner).saddr = backend;

        if let Some(check) = at::<u16>(ctx, quoted_l4 + check_offset(protocol), end) {
            let old = *check;
            let mut new = csum::replace_addr6(old, &quoted_src, &backend);
            new = csum::replace2(new, quoted_sport, backend_port);
            if protocol == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp_check = csum::replace2(icmp_check, old, new);
            *check = new;
        }
        icmp_check = csum::replace2(icmp_check, quoted_sport, backend_port);
        (*ports).src = backend_port;
        (*icmp).check = icmp_check;
    }
    Some(())
}
