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
    Addr6, BackendAddr, BackendAddr6, BackendStats, Config, FLOW_CLOSING, FLOW_REPLIED,
    FLOW_REVERSE, Flow, Flow6, FlowKey, FlowKey6, FragKey, FragKey6, GlobalStat, MaglevKey,
    PROTO_TCP, PROTO_UDP, Service, ServiceKey, flow_hash, flow_hash6,
};

use crate::{
    csum,
    family::{Family, V4, V6},
    fragments,
    headers::{
        ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, EthHdr, IP_FRAG_MASK, IP_OFFSET_MASK, IPV6_DSTOPTS,
        IPV6_FRAGMENT, IPV6_HOPOPTS, IPV6_LEN, IPV6_OFFSET_MASK, IPV6_ROUTING, Ipv4Hdr, Ipv6ExtHdr,
        Ipv6FragHdr, Ipv6Hdr, PROTO_ICMP, PROTO_ICMPV6, Ports, TCP_ACK, TCP_CHECK_OFF, TCP_FIN,
        TCP_RST, TCP_SYN, TcpHdr, UDP_CHECK_OFF, UdpHdr,
    },
    icmp,
    maps::{
        BACKEND_ADDRS, BACKEND_ADDRS6, BACKEND_STATS, BACKEND_STATS6, BACKENDS, BACKENDS6,
        CONNTRACK, CONNTRACK6, MAGLEV, NODE_ADDRS, NODE_ADDRS6, SERVICES, config, count, now_ns,
        port_stats, port_stats_in, port_stats6,
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
    if protocol != PROTO_TCP && protocol != PROTO_UDP && protocol != PROTO_ICMP {
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
    let l4 = ETH_LEN + ip_len;
    if protocol == PROTO_ICMP {
        return Ok(icmp::to_instance(ctx, ip, l4, ETH_LEN + tot_len));
    }
    let frag_off = u16::from_be(unsafe { (*ip).frag_off });
    // Every field set whether or not the packet is a fragment: the verifier refuses
    // uninitialised stack bytes.
    let fragment = FragKey {
        src_addr: saddr,
        dst_addr: daddr,
        // SAFETY: `ip` bounds-checked above.
        id: unsafe { (*ip).id },
        protocol,
        pad: 0,
    };
    if frag_off & IP_OFFSET_MASK != 0 {
        return Ok(later_fragment(ip, &fragment, tot_len as u64));
    }
    let first_fragment = frag_off & IP_FRAG_MASK != 0;
    let l4_len = if protocol == PROTO_TCP {
        core::mem::size_of::<TcpHdr>()
    } else {
        core::mem::size_of::<UdpHdr>()
    };
    // The L4 header must lie inside the IPv4 packet, not in Ethernet padding after it.
    if ip_len + l4_len > tot_len {
        return Err(Malformed);
    }
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
    let (backend_id, nat_addr, nat_port) = match established::<V4>(&key, &config, now, tcp_flags) {
        Some(flow) => {
            count_rx::<V4>(service.id, ip_bytes);
            count(GlobalStat::ConntrackHit);
            if tcp_flags & TCP_RST != 0 {
                forget::<V4>(&key, &flow);
            }
            (flow.backend_id, flow.nat_addr, flow.nat_port)
        }
        None => {
            // A backend's own address and port is never a client: this is the reply to a
            // flow sent to a backend on another node and masqueraded to this node's address,
            // whose port the kernel picked (it may equal a node port). Conntrack translates
            // it back.
            let source = BackendAddr {
                addr_be: saddr,
                port_be: sport,
                protocol,
                pad: 0,
            };
            if BACKEND_ADDRS.get_ptr(source).is_some() {
                return pass();
            }
            count_rx::<V4>(service.id, ip_bytes);
            let Some(chosen) = new_flow(&key, &service, now, tcp_flags) else {
                return Ok(xdp_action::XDP_DROP);
            };
            chosen
        }
    };
    rewrite(ctx, ip, l4, protocol, nat_addr, nat_port)?;
    backend_stats(backend_id, ip_bytes);
    if first_fragment {
        fragments::remember(&fragment, nat_addr, service.id, backend_id, now);
    }
    Ok(xdp_action::XDP_PASS)
}

/// A later fragment of a node-port datagram: its destination address translated as its first
/// fragment's was; to the kernel untouched when that was not seen.
#[inline(always)]
fn later_fragment(ip: *mut Ipv4Hdr, key: &FragKey, ip_bytes: u64) -> u32 {
    let Some(nat) = fragments::translation::<V4>(key) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: `ip` was bounds-checked by the caller.
    unsafe {
        (*ip).check = csum::replace4((*ip).check, (*ip).daddr, nat.nat_addr);
        (*ip).daddr = nat.nat_addr;
    }
    count_rx::<V4>(nat.service_id, ip_bytes);
    backend_stats(nat.backend_id, ip_bytes);
    xdp_action::XDP_PASS
}

/// IPv6: [`later_fragment`] (no header checksum).
#[inline(always)]
fn later_fragment6(ip: *mut Ipv6Hdr, key: &FragKey6, ip_bytes: u64) -> u32 {
    let Some(nat) = fragments::translation::<V6>(key) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: `ip` was bounds-checked by the caller.
    unsafe { (*ip).daddr = nat.nat_addr };
    count_rx::<V6>(nat.service_id, ip_bytes);
    stats_add(&BACKEND_STATS6, nat.backend_id, ip_bytes);
    xdp_action::XDP_PASS
}

/// Extension headers walked over before giving up (the packet then goes to the kernel).
const MAX_EXT_HEADERS: usize = 4;
/// The L4 header must start within this many bytes of the frame.
const MAX_L4_OFFSET: usize = 512;

/// What follows an IPv6 packet's extension headers.
enum Upper6 {
    /// A TCP or UDP header at `offset`; when `first_fragment`, of the datagram `fragment_id`.
    Transport {
        offset: usize,
        protocol: u8,
        first_fragment: bool,
        fragment_id: u32,
    },
    /// A later fragment of a TCP or UDP datagram (no ports).
    LaterFragment { id: u32, protocol: u8 },
    /// An ICMPv6 header at `offset`.
    Icmp { offset: usize },
    /// Anything else: more than [`MAX_EXT_HEADERS`] extension headers, headers too long,
    /// other protocols.
    Other,
}

/// Walks an IPv6 packet's hop-by-hop, routing, destination options and fragment headers
/// (bounded) to what follows them.
#[inline(always)]
fn ipv6_upper(ctx: &XdpContext, nexthdr: u8, end: usize) -> Result<Upper6, Malformed> {
    let mut next = nexthdr;
    let mut offset = ETH_LEN + IPV6_LEN;
    let (mut first_fragment, mut fragment_id) = (false, 0);
    for _ in 0..MAX_EXT_HEADERS {
        if next == IPV6_FRAGMENT {
            if offset + core::mem::size_of::<Ipv6FragHdr>() > end {
                return Err(Malformed);
            }
            let frag: *mut Ipv6FragHdr = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by `ptr_at`.
            let (frag_next, frag_off, id) =
                unsafe { ((*frag).nexthdr, (*frag).frag_off, (*frag).id) };
            if frag_next != PROTO_TCP && frag_next != PROTO_UDP {
                return Ok(Upper6::Other);
            }
            if u16::from_be(frag_off) & IPV6_OFFSET_MASK != 0 {
                return Ok(Upper6::LaterFragment {
                    id,
                    protocol: frag_next,
                });
            }
            (first_fragment, fragment_id) = (true, id);
            next = frag_next;
            offset += core::mem::size_of::<Ipv6FragHdr>();
            continue;
        }
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
            return Ok(Upper6::Other);
        }
    }
    Ok(match next {
        PROTO_TCP | PROTO_UDP => Upper6::Transport {
            offset,
            protocol: next,
            first_fragment,
            fragment_id,
        },
        PROTO_ICMPV6 if !first_fragment => Upper6::Icmp { offset },
        _ => Upper6::Other,
    })
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
    let ip_bytes = (IPV6_LEN + payload_len) as u64;
    let saddr = unsafe { (*ip).saddr };
    let (l4, protocol, first_fragment, fragment_id) = match ipv6_upper(ctx, nexthdr, end)? {
        Upper6::Transport {
            offset,
            protocol,
            first_fragment,
            fragment_id,
        } => (offset, protocol, first_fragment, fragment_id),
        Upper6::LaterFragment { id, protocol } => {
            let key = FragKey6 {
                src_addr: saddr,
                dst_addr: daddr,
                id,
                protocol,
                pad: [0; 3],
            };
            return Ok(later_fragment6(ip, &key, ip_bytes));
        }
        Upper6::Icmp { offset } => return Ok(icmp::to_instance6(ctx, ip, offset, end)),
        Upper6::Other => return pass(),
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
    let (backend_id, nat_addr, nat_port) = match established::<V6>(&key, &config, now, tcp_flags) {
        Some(flow) => {
            count_rx::<V6>(service.id, ip_bytes);
            count(GlobalStat::ConntrackHit);
            if tcp_flags & TCP_RST != 0 {
                forget::<V6>(&key, &flow);
            }
            (flow.backend_id, flow.nat_addr, flow.nat_port)
        }
        None => {
            // As for IPv4: a backend's own address and port is never a client.
            let source = BackendAddr6 {
                addr: saddr,
                port_be: sport,
                protocol,
                pad: 0,
            };
            if BACKEND_ADDRS6.get_ptr(source).is_some() {
                return pass();
            }
            count_rx::<V6>(service.id, ip_bytes);
            let Some(chosen) = new_flow6(&key, &service, now, tcp_flags) else {
                return Ok(xdp_action::XDP_DROP);
            };
            chosen
        }
    };
    rewrite6(ctx, ip, l4, protocol, &nat_addr, nat_port)?;
    stats_add(&BACKEND_STATS6, backend_id, ip_bytes);
    if first_fragment {
        let key = FragKey6 {
            src_addr: saddr,
            dst_addr: daddr,
            id: fragment_id,
            protocol,
            pad: [0; 3],
        };
        fragments::remember6(&key, &nat_addr, service.id, backend_id, now);
    }
    Ok(xdp_action::XDP_PASS)
}

/// IPv6: [`new_flow`], with the backend's IPv6 twin from `MIREN_BACKENDS6` (same Maglev
/// table, same backend ids); a backend without one drops the packet (counted no backend).
#[inline(always)]
fn new_flow6(
    key: &FlowKey6,
    service: &Service,
    now: u64,
    tcp_flags: u8,
) -> Option<(u32, Addr6, u16)> {
    count(GlobalStat::ConntrackMiss);
    if service.table_size == 0 {
        port_stats6(service.id, |s| s.drop_no_backend += 1);
        return None;
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
        return None;
    };
    if backend.addr == [0; 4] {
        port_stats6(service.id, |s| s.drop_no_backend += 1);
        return None;
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
        let reverse_key = V6::reverse_key(key, &forward);
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
    Some((backend_id, backend.addr, backend.port_be))
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
        let mut sum = csum::replace_addr6(*check, &(*ip).daddr, addr);
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
fn established<F: Family>(
    key: &F::Key,
    config: &Config,
    now: u64,
    tcp_flags: u8,
) -> Option<F::Flow> {
    let entry = F::conntrack().get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; racing updates only touch timestamps/flags.
    let flow = unsafe { &mut *entry };
    if retried_syn(*F::flags(flow), tcp_flags) {
        return None;
    }
    let mut flags = *F::flags(flow);
    let live = refresh(
        F::last_seen(flow),
        &mut flags,
        F::protocol(key),
        config,
        now,
        tcp_flags,
    );
    *F::flags(flow) = flags;
    live.then_some(*flow)
}

/// Whether a SYN (without ACK) meets a flow its backend never answered: a new attempt to
/// connect, which picks a backend again (the entries are overwritten).
#[inline(always)]
fn retried_syn(flow_flags: u16, tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && flow_flags & FLOW_REPLIED == 0
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

/// Counts a received packet of node port `service_id`.
#[inline(always)]
fn count_rx<F: Family>(service_id: u32, ip_bytes: u64) {
    port_stats_in(F::port_stats(), service_id, |s| {
        s.rx_packets += 1;
        s.rx_bytes += ip_bytes;
    });
}

/// Picks a backend for a new flow and records its forward and reverse entries: the backend's
/// id, address and port; `None` when the packet is to be dropped (counted).
#[inline(always)]
fn new_flow(key: &FlowKey, service: &Service, now: u64, tcp_flags: u8) -> Option<(u32, u32, u16)> {
    count(GlobalStat::ConntrackMiss);
    if service.table_size == 0 {
        port_stats(service.id, |s| s.drop_no_backend += 1);
        return None;
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
        return None;
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
        let reverse_key = V4::reverse_key(key, &forward);
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
    Some((backend_id, backend.addr_be, backend.port_be))
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
fn forget<F: Family>(key: &F::Key, flow: &F::Flow) {
    let _ = F::conntrack().remove(F::reverse_key(key, flow));
    let _ = F::conntrack().remove(key);
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
