//! Minimal Ethernet, IPv4, IPv6, TCP and UDP header layouts (fields as stored: network byte order).

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// EtherType IPv4 as stored in the frame (big-endian 0x0800 read as native u16).
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// EtherType IPv6 as stored in the frame.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// IPv6 fixed header.
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class, flow label.
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// IPv6 fixed header length.
pub const IPV6_LEN: usize = 40;

/// The first two bytes of an IPv6 hop-by-hop, routing or destination options header.
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub nexthdr: u8,
    /// Length in 8-byte units, not counting the first 8 bytes.
    pub len: u8,
}

/// IPv6 next-header values of the extension headers walked over.
pub const IPV6_HOPOPTS: u8 = 0;
/// Routing header.
pub const IPV6_ROUTING: u8 = 43;
/// Destination options header.
pub const IPV6_DSTOPTS: u8 = 60;

/// The first 4 bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// UDP header.
#[repr(C)]
pub struct UdpHdr {
    pub src: u16,
    pub dst: u16,
    pub len: u16,
    pub check: u16,
}

/// TCP header without options.
#[repr(C)]
pub struct TcpHdr {
    pub src: u16,
    pub dst: u16,
    pub seq: u32,
    pub ack: u32,
    pub off_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

/// TCP flag bits in `TcpHdr::flags`.
pub const TCP_FIN: u8 = 0x01;
/// TCP RST.
pub const TCP_RST: u8 = 0x04;
/// TCP SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP ACK.
pub const TCP_ACK: u8 = 0x10;

/// Fragment offset and More Fragments bits of `frag_off` (host order mask).
pub const IP_FRAG_MASK: u16 = 0x3fff;
/// Fragment offset bits of `frag_off` (host order mask): non-zero in a later fragment.
pub const IP_OFFSET_MASK: u16 = 0x1fff;

/// IPv6 fragment header.
#[repr(C)]
pub struct Ipv6FragHdr {
    pub nexthdr: u8,
    pub reserved: u8,
    /// Offset (13 bits, in 8-byte units) << 3 | More Fragments (bit 0), network byte order.
    pub frag_off: u16,
    /// Identification, as stored.
    pub id: u32,
}

/// IPv6 next-header value of the fragment header.
pub const IPV6_FRAGMENT: u8 = 44;
/// Offset bits of `Ipv6FragHdr::frag_off` (host order mask).
pub const IPV6_OFFSET_MASK: u16 = 0xfff8;

/// The first 4 bytes of an ICMP or ICMPv6 header (the 4 after them depend on the type).
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
}

/// ICMP and ICMPv6 header length before the quoted packet of an error message.
pub const ICMP_LEN: usize = 8;
/// IP protocol numbers of ICMP and ICMPv6.
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Whether an ICMP message of type `kind` is an error quoting a packet (destination
/// unreachable incl. fragmentation needed, time exceeded, parameter problem).
#[inline(always)]
pub fn icmp_is_error(kind: u8) -> bool {
    kind == 3 || kind == 11 || kind == 12
}

/// Whether an ICMPv6 message of type `kind` is an error quoting a packet (destination
/// unreachable, packet too big, time exceeded, parameter problem).
#[inline(always)]
pub fn icmp6_is_error(kind: u8) -> bool {
    (1..=4).contains(&kind)
}

/// Offset of the checksum field in a UDP header.
pub const UDP_CHECK_OFF: usize = 6;
/// Offset of the checksum field in a TCP header.
pub const TCP_CHECK_OFF: usize = 16;
