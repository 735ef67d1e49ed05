//! `miren_nodeport`: XDP forward DNAT of node-port traffic.
//!
//! IPv4 TCP/UDP to one of the node's addresses (`MIREN_NODE_ADDRS`) and a configured
//! (protocol, node port) is rewritten to a backend chosen by the node port's Maglev table and
//! pinned by conntrack; everything else passes untouched. Fragments pass untouched (the kernel
//! reassembles them; they are not load-balanced), and so do packets from a backend's own
//! address and port (replies of flows masqueraded to a backend on another node).
//!
//! A TCP packet that misses conntrack without SYN (mid-flow after its entry was evicted, or a
//! stray packet) is counted ([`GlobalStat::TcpNonSynMiss`]) and forwarded to the backend the
//! Maglev table chooses for its flow; it creates the flow's entries again unless it is a RST,
//! which is forwarded and remembered nowhere (it ends the flow at the backend).

use aya_ebpf::{bindings::xdp_action, macros::xdp, maps::PerCpuArray, programs::XdpContext};
use miren_common::nodeport::{
    Addr6, BackendAddr, BackendStats, Config, FLOW_CLOSING, FLOW_REVERSE, Flow, Flow6, FlowKey,
    FlowKey6, GlobalStat, MaglevKey, PROTO_TCP, PROTO_UDP, Service, ServiceKey, flow_hash,
    flow_hash6,
};

use crate::{
    csum,
    headers::{
        ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, EthHdr, IP_FRAG_MASK, IPV6_DSTOPTS, IPV6_HOPOPTS,
        IPV6_LEN, IPV6_ROUTING, Ipv4Hdr, Ipv6ExtHdr, Ipv6Hdr, Ports, TCP_CHECK_OFF, TCP_FIN,
        TCP_RST, TCP_SYN, TcpHdr, UDP_CHECK_OFF, UdpHdr,
    },
    maps::{
        BACKEND_ADDRS, BACKEND_STATS, BACKEND_STATS6, BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK6,
        MAGLEV, NODE_ADDRS, NODE_ADDRS6, SERVICES, config, count, now_ns, port_stats, port_stats6,
    },
};

#[xdp]
pub fn miren_nodeport(ctx: XdpContext) -> u32 {
    match forward(&ctx) {
        Ok(action) => action,
        Err(Malformed) => {
            count(GlobalStat::Malformed);
            xdp_action::XDP_PASS
        }
    }
}

/// A packet too short or invalid to handle; the kernel decides what to do with it.
struct Malformed;

/// A pointer to a `T` at `offset` in the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Malformed> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(Malformed);
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
fn pass() -> Result<u32, Malformed> {
    count(GlobalStat::Passed);
    Ok(xdp_action::XDP_PASS)
}

#[inline(always)]
fn forward(ctx: &XdpContext) -> Result<u32, Malformed> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: every dereference below is of a pointer bounds-checked by `ptr_at`.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_IPV6_BE {
        return forward6(ctx);
    }
    if ether_type != ETH_P_IP_BE {
        return pass();
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    let (version_ihl, protocol, daddr, saddr) =
        unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).daddr, (*ip).saddr) };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return pass();
    }
    if NODE_ADDRS.get_ptr(daddr).is_none() {
        return pass();
    }
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Malformed);
    }
    let ip_len = ihl * 4;
    let tot_len = u16::from_be(unsafe { (*ip).tot_len }) as usize;
    if tot_len < ip_len || ETH_LEN + tot_len > ctx.data_end() - ctx.data() {
        return Err(Malformed);
    }
    if u16::from_be(unsafe { (*ip).frag_off }) & IP_FRAG_MASK != 0 {
        return pass();
    }
    let l4_len = if protocol == PROTO_TCP {
        core::mem::size_of::<TcpHdr>()
    } else {
        core::mem::size_of::<UdpHdr>()
    };
    // The L4 header must lie inside the IPv4 packet, not in Ethernet padding after it.
    if ip_len + l4_len > tot_len {
        return Err(Malformed);
    }
    let l4 = ETH_LEN + ip_len;
    let (sport, dport, tcp_flags) = if protocol == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
        unsafe { ((*tcp).src, (*tcp).dst, (*tcp).flags) }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
        unsafe { ((*udp).src, (*udp).dst, 0) }
    };
    let Some(service) = SERVICES.get_ptr(ServiceKey {
        port_be: dport,
        protocol,
        pad: 0,
    }) else {
        return pass();
    };
    // SAFETY: map value pointer from a successful lookup.
    let service: Service = unsafe { *service };
    // Bytes are IP bytes (header and payload), as nftables counts them.
    let ip_bytes = tot_len as u64;

    let key = FlowKey {
        src_addr: saddr,
        dst_addr: daddr,
        src_port: sport,
        dst_port: dport,
        protocol,
        pad: [0; 3],
    };
    // One read of the settings per packet, shared by the clock and the expiry check.
    let config = config();
    let now = now_ns(&config);
    let Some(flow) = established(&key, &config, now, tcp_flags) else {
        // A backend's own address and port is never a client: this is the reply to a flow
        // sent to a backend on another node and masqueraded to this node's address, whose
        // port the kernel picked (it may equal a node port). Conntrack translates it back.
        let source = BackendAddr {
            addr_be: saddr,
            port_be: sport,
            protocol,
            pad: 0,
        };
        if BACKEND_ADDRS.get_ptr(source).is_some() {
            return pass();
        }
        count_rx(&service, ip_bytes);
        return new_flow(ctx, ip, l4, &key, &service, now, ip_bytes, tcp_flags);
    };
    count_rx(&service, ip_bytes);
    count(GlobalStat::ConntrackHit);
    if tcp_flags & TCP_RST != 0 {
        forget(&key, &flow);
    }
    rewrite(ctx, ip, l4, protocol, flow.nat_addr, flow.nat_port)?;
    backend_stats(flow.backend_id, ip_bytes);
    Ok(xdp_action::XDP_PASS)
}

/// Extension headers walked over before giving up (the packet then goes to the kernel).
const MAX_EXT_HEADERS: usize = 4;
/// The L4 header must start within this many bytes of the frame.
const MAX_L4_OFFSET: usize = 512;

/// The offset of the TCP or UDP header of an IPv6 packet after its hop-by-hop, routing and
/// destination options headers, and its protocol; `None` for anything else (a fragment
/// header, ICMPv6, more than [`MAX_EXT_HEADERS`] extension headers, headers too long).
#[inline(always)]
fn ipv6_l4(ctx: &XdpContext, nexthdr: u8, end: usize) -> Result<Option<(usize, u8)>, Malformed> {
    let mut next = nexthdr;
    let mut offset = ETH_LEN + IPV6_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        if next != IPV6_HOPOPTS && next != IPV6_ROUTING && next != IPV6_DSTOPTS {
            break;
        }
        // An extension header must lie inside the IPv6 payload.
        if offset + core::mem::size_of::<Ipv6ExtHdr>() > end {
            return Err(Malformed);
        }
        let ext: *mut Ipv6ExtHdr = ptr_at(ctx, offset)?;
        // SAFETY: bounds-checked by `ptr_at`.
        let (ext_next, ext_len) = unsafe { ((*ext).nexthdr, (*ext).len) };
        next = ext_next;
        offset += (ext_len as usize + 1) * 8;
        if offset > MAX_L4_OFFSET {
            return Ok(None);
        }
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Ok(None);
    }
    Ok(Some((offset, next)))
}

/// IPv6: the same as [`forward`] for IPv4, after the extension headers.
#[inline(always)]
fn forward6(ctx: &XdpContext) -> Result<u32, Malformed> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: every dereference below is of a pointer bounds-checked by `ptr_at`.
    let (version, daddr, nexthdr) = unsafe { ((*ip).vtc_flow[0] >> 4, (*ip).daddr, (*ip).nexthdr) };
    if NODE_ADDRS6.get_ptr(daddr).is_none() {
        return pass();
    }
    if version != 6 {
        return Err(Malformed);
    }
    let payload_len = u16::from_be(unsafe { (*ip).payload_len }) as usize;
    // The end of the IPv6 packet (Ethernet padding may follow).
    let end = ETH_LEN + IPV6_LEN + payload_len;
    if end > ctx.data_end() - ctx.data() {
        return Err(Malformed);
    }
    let Some((l4, protocol)) = ipv6_l4(ctx, nexthdr, end)? else {
        return pass();
    };
    let l4_len = if protocol == PROTO_TCP {
        core::mem::size_of::<TcpHdr>()
    } else {
        core::mem::size_of::<UdpHdr>()
    };
    if l4 + l4_len > end {
        return Err(Malformed);
    }
    let (sport, dport, tcp_flags) = if protocol == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
        unsafe { ((*tcp).src, (*tcp).dst, (*tcp).flags) }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
        // The UDP checksum is mandatory in IPv6: the kernel drops a datagram without one.
        if unsafe { (*udp).check } == 0 {
            return Err(Malformed);
        }
        unsafe { ((*udp).src, (*udp).dst, 0) }
    };
    let Some(service) = SERVICES.get_ptr(ServiceKey {
        port_be: dport,
        protocol,
        pad: 0,
    }) else {
        return pass();
    };
    // SAFETY: map value pointer from a successful lookup.
    let service: Service = unsafe { *service };
    let ip_bytes = (IPV6_LEN + payload_len) as u64;
    let saddr = unsafe { (*ip).saddr };
    let key = FlowKey6 {
        src_addr: saddr,
        dst_addr: daddr,
        src_port: sport,
        dst_port: dport,
        protocol,
        pad: [0; 3],
    };
    let config = config();
    let now = now_ns(&config);
    count_rx6(&service, ip_bytes);
    let Some(flow) = established6(&key, &config, now, tcp_flags) else {
        return new_flow6(ctx, ip, l4, &key, &service, now, ip_bytes, tcp_flags);
    };
    count(GlobalStat::ConntrackHit);
    if tcp_flags & TCP_RST != 0 {
        let reverse_key = FlowKey6 {
            src_addr: flow.nat_addr,
            dst_addr: key.src_addr,
            src_port: flow.nat_port,
            dst_port: key.src_port,
            protocol,
            pad: [0; 3],
        };
        let _ = CONNTRACK6.remove(key);
        let _ = CONNTRACK6.remove(reverse_key);
    }
    rewrite6(ctx, ip, l4, protocol, &flow.nat_addr, flow.nat_port)?;
    stats_add(&BACKEND_STATS6, flow.backend_id, ip_bytes);
    Ok(xdp_action::XDP_PASS)
}

/// IPv6: [`new_flow`], with the backend's IPv6 twin from `MIREN_BACKENDS6` (same Maglev
/// table, same backend ids); a backend without one drops the packet (counted no backend).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn new_flow6(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    l4: usize,
    key: &FlowKey6,
    service: &Service,
    now: u64,
    ip_bytes: u64,
    tcp_flags: u8,
) -> Result<u32, Malformed> {
    count(GlobalStat::ConntrackMiss);
    if service.table_size == 0 {
        port_stats6(service.id, |s| s.drop_no_backend += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    let hash = flow_hash6(&key.src_addr, key.src_port, key.dst_port, key.protocol);
    let slot = MaglevKey::new(service.id, service.generation, hash % service.table_size);
    let backend = MAGLEV.get_ptr(slot).and_then(|id| {
        // SAFETY: pointer from a successful lookup.
        let id = unsafe { *id };
        BACKENDS6.get(id).map(|backend| (id, *backend))
    });
    let Some((backend_id, backend)) = backend else {
        port_stats6(service.id, |s| s.drop_table_miss += 1);
        return Ok(xdp_action::XDP_DROP);
    };
    if backend.addr == [0; 4] {
        port_stats6(service.id, |s| s.drop_no_backend += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    if remembers(key.protocol, tcp_flags) {
        let forward = Flow6 {
            nat_addr: backend.addr,
            nat_port: backend.port_be,
            flags: 0,
            service_id: service.id,
            backend_id,
            pad: 0,
            last_seen_ns: now,
        };
        let reverse_key = FlowKey6 {
            src_addr: backend.addr,
            dst_addr: key.src_addr,
            src_port: backend.port_be,
            dst_port: key.src_port,
            protocol: key.protocol,
            pad: [0; 3],
        };
        let reverse = Flow6 {
            nat_addr: key.dst_addr,
            nat_port: key.dst_port,
            flags: FLOW_REVERSE,
            ..forward
        };
        let _ = CONNTRACK6.insert(key, forward, 0);
        let _ = CONNTRACK6.insert(reverse_key, reverse, 0);
        port_stats6(service.id, |s| s.flows += 1);
    }
    rewrite6(ctx, ip, l4, key.protocol, &backend.addr, backend.port_be)?;
    stats_add(&BACKEND_STATS6, backend_id, ip_bytes);
    Ok(xdp_action::XDP_PASS)
}

/// Rewrites the IPv6 destination address and port, updating the L4 checksum (IPv6 has no
/// header checksum; a UDP result of 0 is written as 0xFFFF).
#[inline(always)]
fn rewrite6(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    l4: usize,
    protocol: u8,
    addr: &Addr6,
    port: u16,
) -> Result<(), Malformed> {
    let offset = if protocol == PROTO_TCP {
        TCP_CHECK_OFF
    } else {
        UDP_CHECK_OFF
    };
    let check: *mut u16 = ptr_at(ctx, l4 + offset)?;
    let ports: *mut Ports = ptr_at(ctx, l4)?;
    // SAFETY: `ip` was bounds-checked by the caller, the others here.
    unsafe {
        let old = (*ip).daddr;
        let mut sum = *check;
        for i in 0..4 {
            sum = csum::replace4(sum, old[i], addr[i]);
        }
        sum = csum::replace2(sum, (*ports).dst, port);
        *check = if protocol == PROTO_UDP && sum == 0 {
            0xffff
        } else {
            sum
        };
        (*ip).daddr = *addr;
        (*ports).dst = port;
    }
    Ok(())
}

/// The live conntrack entry of `key`, refreshed; `None` if missing or expired.
#[inline(always)]
fn established(key: &FlowKey, config: &Config, now: u64, tcp_flags: u8) -> Option<Flow> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; racing updates only touch timestamps/flags.
    let flow = unsafe { &mut *entry };
    let live = refresh(
        &mut flow.last_seen_ns,
        &mut flow.flags,
        key.protocol,
        config,
        now,
        tcp_flags,
    );
    live.then_some(*flow)
}

/// IPv6: [`established`].
#[inline(always)]
fn established6(key: &FlowKey6, config: &Config, now: u64, tcp_flags: u8) -> Option<Flow6> {
    let entry = CONNTRACK6.get_ptr_mut(key)?;
    // SAFETY: as in `established`.
    let flow = unsafe { &mut *entry };
    let live = refresh(
        &mut flow.last_seen_ns,
        &mut flow.flags,
        key.protocol,
        config,
        now,
        tcp_flags,
    );
    live.then_some(*flow)
}

/// Whether a conntrack entry seen last at `last_seen` is still live; if so, it is refreshed
/// (and marked closing on FIN).
#[inline(always)]
fn refresh(
    last_seen: &mut u64,
    flags: &mut u16,
    protocol: u8,
    config: &Config,
    now: u64,
    tcp_flags: u8,
) -> bool {
    let idle = now.saturating_sub(*last_seen);
    let expired = if protocol == PROTO_UDP {
        idle > config.udp_timeout_ns
    } else {
        *flags & FLOW_CLOSING != 0 && idle > config.tcp_closing_timeout_ns
    };
    if expired {
        return false;
    }
    *last_seen = now;
    if tcp_flags & TCP_FIN != 0 {
        *flags |= FLOW_CLOSING;
    }
    true
}

/// Counts a received packet of `service`.
#[inline(always)]
fn count_rx(service: &Service, ip_bytes: u64) {
    port_stats(service.id, |s| {
        s.rx_packets += 1;
        s.rx_bytes += ip_bytes;
    });
}

/// Counts a received IPv6 packet of `service`.
#[inline(always)]
fn count_rx6(service: &Service, ip_bytes: u64) {
    port_stats6(service.id, |s| {
        s.rx_packets += 1;
        s.rx_bytes += ip_bytes;
    });
}

/// Picks a backend for a new flow, records the forward and reverse entries, and rewrites.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn new_flow(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    l4: usize,
    key: &FlowKey,
    service: &Service,
    now: u64,
    ip_bytes: u64,
    tcp_flags: u8,
) -> Result<u32, Malformed> {
    count(GlobalStat::ConntrackMiss);
    if service.table_size == 0 {
        port_stats(service.id, |s| s.drop_no_backend += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    let hash = flow_hash(key.src_addr, key.src_port, key.dst_port, key.protocol);
    let slot = MaglevKey::new(service.id, service.generation, hash % service.table_size);
    let backend = MAGLEV.get_ptr(slot).and_then(|id| {
        // SAFETY: pointer from a successful lookup.
        let id = unsafe { *id };
        BACKENDS.get(id).map(|backend| (id, *backend))
    });
    let Some((backend_id, backend)) = backend else {
        port_stats(service.id, |s| s.drop_table_miss += 1);
        return Ok(xdp_action::XDP_DROP);
    };
    if remembers(key.protocol, tcp_flags) {
        let forward = Flow {
            nat_addr: backend.addr_be,
            nat_port: backend.port_be,
            flags: 0,
            service_id: service.id,
            backend_id,
            last_seen_ns: now,
        };
        let reverse_key = FlowKey {
            src_addr: backend.addr_be,
            dst_addr: key.src_addr,
            src_port: backend.port_be,
            dst_port: key.src_port,
            protocol: key.protocol,
            pad: [0; 3],
        };
        let reverse = Flow {
            nat_addr: key.dst_addr,
            nat_port: key.dst_port,
            flags: FLOW_REVERSE,
            ..forward
        };
        // Without entries the flow still works (every packet re-hashes to the same backend while
        // the backend set is unchanged), so a full map is not a reason to drop.
        let _ = CONNTRACK.insert(key, forward, 0);
        let _ = CONNTRACK.insert(reverse_key, reverse, 0);
        port_stats(service.id, |s| s.flows += 1);
    }
    rewrite(ctx, ip, l4, key.protocol, backend.addr_be, backend.port_be)?;
    backend_stats(backend_id, ip_bytes);
    Ok(xdp_action::XDP_PASS)
}

/// Whether a packet that missed conntrack starts (or picks up again) a flow worth remembering:
/// counts a TCP miss without SYN, and says no for a RST (forwarded, remembered nowhere).
#[inline(always)]
fn remembers(protocol: u8, tcp_flags: u8) -> bool {
    if protocol != PROTO_TCP || tcp_flags & TCP_SYN != 0 {
        return true;
    }
    count(GlobalStat::TcpNonSynMiss);
    tcp_flags & TCP_RST == 0
}

/// Removes the forward and reverse entries of a flow (after RST).
#[inline(always)]
fn forget(key: &FlowKey, flow: &Flow) {
    let reverse_key = FlowKey {
        src_addr: flow.nat_addr,
        dst_addr: key.src_addr,
        src_port: flow.nat_port,
        dst_port: key.src_port,
        protocol: key.protocol,
        pad: [0; 3],
    };
    let _ = CONNTRACK.remove(key);
    let _ = CONNTRACK.remove(reverse_key);
}

/// Rewrites the destination address and port, updating the IPv4 and L4 checksums.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    l4: usize,
    protocol: u8,
    addr: u32,
    port: u16,
) -> Result<(), Malformed> {
    // SAFETY: `ip` was bounds-checked by the caller; L4 headers are checked here.
    unsafe {
        let old_addr = (*ip).daddr;
        (*ip).check = csum::replace4((*ip).check, old_addr, addr);
        (*ip).daddr = addr;
        if protocol == PROTO_TCP {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
            let check = csum::replace4((*tcp).check, old_addr, addr);
            (*tcp).check = csum::replace2(check, (*tcp).dst, port);
            (*tcp).dst = port;
        } else {
            let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
            if (*udp).check != 0 {
                let check = csum::replace4((*udp).check, old_addr, addr);
                let check = csum::replace2(check, (*udp).dst, port);
                (*udp).check = if check == 0 { 0xffff } else { check };
            }
            (*udp).dst = port;
        }
    }
    Ok(())
}

#[inline(always)]
fn backend_stats(id: u32, ip_bytes: u64) {
    stats_add(&BACKEND_STATS, id, ip_bytes);
}

/// Counts a forwarded packet in slot `id` of a per-backend stats map.
#[inline(always)]
fn stats_add(map: &PerCpuArray<BackendStats>, id: u32, ip_bytes: u64) {
    if let Some(stats) = map.get_ptr_mut(id) {
        // SAFETY: per-CPU slot from a successful lookup.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += ip_bytes;
        }
    }
}
