//! Minimal Ethernet, IPv4, TCP and UDP header layouts (fields as stored: network byte order).

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// EtherType IPv4 as stored in the frame (big-endian 0x0800 read as native u16).
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

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

/// Fragment offset and More Fragments bits of `frag_off` (host order mask).
pub const IP_FRAG_MASK: u16 = 0x3fff;

/// Offset of the checksum field in a UDP header.
pub const UDP_CHECK_OFF: usize = 6;
/// Offset of the checksum field in a TCP header.
pub const TCP_CHECK_OFF: usize = 16;
