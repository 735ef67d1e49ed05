//! Hand-built Ethernet frames for packet-level tests (BPF_PROG_TEST_RUN fixtures), with
//! checksums computed here, independently of the code under test.
//!
//! - [`FrameBuilder`] builds Ethernet (optionally 802.1Q-tagged) / IPv4 / UDP, TCP or ICMP echo
//!   frames, correct by default and deliberately malformed on request (bad IHL, `tot_len`
//!   beyond the frame, fragments, disabled UDP checksum, ...).
//! - [`arp_request`] and [`ipv6_frame`] build non-IPv4 frames; [`truncate`] cuts any frame.
//! - [`parse`], [`verify_checksums`] and [`rewrite_expected`] check what the code under test
//!   produced: the expected NAT result is rebuilt with every checksum recomputed from scratch.
//! - [`Frame6Builder`], [`parse6`], [`verify_checksums6`] and [`rewrite_expected6`] do the same
//!   for IPv6 (extension headers, fragment headers, mandatory UDP checksums).
//! - [`fragments`] and [`fragments6`] split a datagram as a router would; [`icmp_error`] and
//!   [`icmp6_error`] build ICMP errors quoting a packet ([`verify_icmp6_checksum`] checks
//!   ICMPv6; [`verify_checksums`] covers ICMPv4).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// 802.1Q tag length (TPID and TCI).
pub const VLAN_LEN: usize = 4;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_LEN: usize = 40;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// TCP header length without options.
pub const TCP_LEN: usize = 20;
/// ICMP echo header length.
pub const ICMP_LEN: usize = 8;
/// ARP payload length (Ethernet/IPv4).
pub const ARP_LEN: usize = 28;

/// Ethernet type of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethernet type of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethernet type of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethernet type (TPID) of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP PSH flag.
pub const TCP_PSH: u8 = 0x08;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REQUEST: u8 = 8;
const IPV4_DF: u16 = 0x4000;
const IPV4_MF: u16 = 0x2000;

/// One end of a flow: MAC, IPv4 address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Ethernet address.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// TCP/UDP port.
    pub port: u16,
}

/// An Ethernet/IPv4/UDP frame from `src` to `dst` carrying `payload`, with a correct IPv4
/// header checksum and UDP checksum (the [`FrameBuilder::udp`] defaults).
pub fn udp_frame(src: Endpoint, dst: Endpoint, payload: &[u8]) -> Vec<u8> {
    FrameBuilder::udp(src, dst).payload(payload).build()
}

/// How [`FrameBuilder`] fills the UDP checksum field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UdpChecksum {
    /// The correct checksum (a computed 0 is written as 0xFFFF).
    Computed,
    /// 0: no checksum.
    Disabled,
    /// Payload bytes 0..2 chosen so that the frame after this rewrite has checksum 0xFFFF.
    ForceFfff {
        new_dst: Option<(Ipv4Addr, u16)>,
        new_src: Option<(Ipv4Addr, u16)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L4 {
    Udp(UdpChecksum),
    Tcp { flags: u8, seq: u32, ack: u32 },
    IcmpEcho { id: u16, seq: u16 },
}

/// Builds one Ethernet/IPv4 frame. Defaults: no VLAN tag, IHL 5 (no options), `tot_len`
/// matching the packet, id 0x1234, DF set, not a fragment, TTL 64, correct checksums.
///
/// Checksums always cover the bytes actually built: the IPv4 checksum covers the 20-byte
/// header plus options whatever [`ihl`](Self::ihl) says, and the TCP/UDP checksum's
/// pseudo-header uses the real segment length whatever [`tot_len`](Self::tot_len) says.
#[derive(Debug, Clone)]
pub struct FrameBuilder {
    src: Endpoint,
    dst: Endpoint,
    l4: L4,
    payload: Vec<u8>,
    vlan_id: Option<u16>,
    ip_options: Vec<u8>,
    ihl: Option<u8>,
    tot_len: Option<u16>,
    id: u16,
    ttl: u8,
    flags_fragment: u16,
    trailer: Vec<u8>,
}

impl FrameBuilder {
    fn new(src: Endpoint, dst: Endpoint, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            payload: Vec::new(),
            vlan_id: None,
            ip_options: Vec::new(),
            ihl: None,
            tot_len: None,
            id: 0x1234,
            ttl: 64,
            flags_fragment: IPV4_DF,
            trailer: Vec::new(),
        }
    }

    /// A UDP datagram from `src` to `dst`.
    pub fn udp(src: Endpoint, dst: Endpoint) -> Self {
        Self::new(src, dst, L4::Udp(UdpChecksum::Computed))
    }

    /// A TCP segment from `src` to `dst` with `flags` (`TCP_SYN | TCP_ACK`, ...), sequence
    /// number `seq` and acknowledgment number `ack`; data offset 5, window 65535.
    pub fn tcp(src: Endpoint, dst: Endpoint, flags: u8, seq: u32, ack: u32) -> Self {
        Self::new(src, dst, L4::Tcp { flags, seq, ack })
    }

    /// An ICMP echo request from `src` to `dst` (ports unused) with identifier `id` and
    /// sequence number `seq`.
    pub fn icmp_echo(src: Endpoint, dst: Endpoint, id: u16, seq: u16) -> Self {
        Self::new(src, dst, L4::IcmpEcho { id, seq })
    }

    /// The L4 payload.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Inserts an 802.1Q tag with VLAN id `vlan_id` (priority 0) before the IPv4 ethertype.
    pub fn vlan(mut self, vlan_id: u16) -> Self {
        self.vlan_id = Some(vlan_id & 0x0fff);
        self
    }

    /// IPv4 options appended to the header (e.g. `[1, 1, 1, 0]`: NOP, NOP, NOP, EOL); IHL
    /// grows to match. Panics unless the length is a multiple of 4 and at most 40.
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "IPv4 options must be a multiple of 4 bytes, at most 40, got {}",
            options.len()
        );
        self.ip_options = options.to_vec();
        self
    }

    /// Writes `ihl` (low 4 bits) as the IHL field instead of the real header length in
    /// words; the header bytes built are unchanged.
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl & 0x0f);
        self
    }

    /// Writes `tot_len` as the IPv4 total length instead of the real packet length.
    pub fn tot_len(mut self, tot_len: u16) -> Self {
        self.tot_len = Some(tot_len);
        self
    }

    /// The IPv4 identification.
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    /// The IPv4 time to live.
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Marks the packet as a fragment: clears DF, sets MF if `more_fragments`, and sets the
    /// fragment offset to `offset` (in 8-byte units, low 13 bits). The L4 header is still
    /// built (and checksummed as if the packet were the whole datagram), so a non-first
    /// fragment carries bytes that look like node-port traffic to a careless parser.
    pub fn fragment(mut self, more_fragments: bool, offset: u16) -> Self {
        self.flags_fragment = if more_fragments { IPV4_MF } else { 0 } | (offset & 0x1fff);
        self
    }

    /// Bytes appended after the IPv4 packet (Ethernet padding), not counted in `tot_len`.
    pub fn trailer(mut self, trailer: &[u8]) -> Self {
        self.trailer = trailer.to_vec();
        self
    }

    /// Writes 0 (no checksum) as the UDP checksum. Panics on a non-UDP builder.
    pub fn udp_checksum_disabled(mut self) -> Self {
        self.set_udp_checksum(UdpChecksum::Disabled);
        self
    }

    /// Overwrites payload bytes 0..2 so that the frame's correct UDP checksum is 0xFFFF:
    /// the one's-complement sum over pseudo-header, UDP header and payload becomes 0xFFFF,
    /// so the RFC 1071 checksum computes to 0, which RFC 768 transmits as 0xFFFF.
    /// Same as [`udp_checksum_ffff_after_nat(None, None)`](Self::udp_checksum_ffff_after_nat).
    pub fn udp_checksum_ffff(self) -> Self {
        self.udp_checksum_ffff_after_nat(None, None)
    }

    /// Overwrites payload bytes 0..2 so that once the destination address and port are
    /// rewritten to `new_dst` and/or the source ones to `new_src` (as [`rewrite_expected`]
    /// does), the rewritten frame's correct UDP checksum is 0xFFFF (computes to 0). The
    /// frame as built carries its own correct checksum (usually not 0xFFFF). A NAT that
    /// updates the checksum incrementally (RFC 1624 eqn. 3) gets 0x0000 for this packet and
    /// must write 0xFFFF instead.
    ///
    /// The two bytes are the word `w` = RFC 1071 checksum of the rewritten packet with `w`
    /// zeroed: adding `!S` to a one's-complement sum `S` gives 0xFFFF. They sit at an even
    /// offset of the checksummed data (12-byte pseudo-header + 8-byte UDP header), so they
    /// are one aligned 16-bit word. At build time this panics if the payload is shorter than
    /// 2 bytes or the frame is one [`parse`] rejects (bad IHL or `tot_len`, fragment).
    /// Panics on a non-UDP builder.
    pub fn udp_checksum_ffff_after_nat(
        mut self,
        new_dst: Option<(Ipv4Addr, u16)>,
        new_src: Option<(Ipv4Addr, u16)>,
    ) -> Self {
        self.set_udp_checksum(UdpChecksum::ForceFfff { new_dst, new_src });
        self
    }

    fn set_udp_checksum(&mut self, mode: UdpChecksum) {
        match &mut self.l4 {
            L4::Udp(checksum) => *checksum = mode,
            other => panic!("UDP checksum option on a non-UDP frame: {other:?}"),
        }
    }

    /// The frame.
    pub fn build(&self) -> Vec<u8> {
        let L4::Udp(UdpChecksum::ForceFfff { new_dst, new_src }) = self.l4 else {
            return self.emit();
        };
        assert!(
            self.payload.len() >= 2,
            "forcing a 0xFFFF UDP checksum needs at least 2 payload bytes"
        );
        let mut draft = self.clone();
        draft.l4 = L4::Udp(UdpChecksum::Computed);
        draft.payload[..2].fill(0);
        let rewritten = rewrite_expected(&draft.emit(), new_dst, new_src);
        let parsed = parse(&rewritten).expect("rewrite_expected output parses");
        let word = computed_l4_checksum(&rewritten, &parsed).expect("a UDP frame");
        draft.payload[..2].copy_from_slice(&word.to_be_bytes());
        draft.emit()
    }

    fn emit(&self) -> Vec<u8> {
        let header_len = IPV4_LEN + self.ip_options.len();
        let (protocol, mut segment, checksum_at) = self.segment();
        let mut frame = Vec::with_capacity(ETH_LEN + VLAN_LEN + header_len + segment.len());
        frame.extend_from_slice(&self.dst.mac);
        frame.extend_from_slice(&self.src.mac);
        if let Some(vlan_id) = self.vlan_id {
            frame.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            frame.extend_from_slice(&vlan_id.to_be_bytes());
        }
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

        let ip_start = frame.len();
        let ihl = self.ihl.unwrap_or((header_len / 4) as u8);
        let tot_len = self.tot_len.unwrap_or((header_len + segment.len()) as u16);
        frame.extend_from_slice(&[0x40 | ihl, 0x00]); // version 4; DSCP/ECN 0
        frame.extend_from_slice(&tot_len.to_be_bytes());
        frame.extend_from_slice(&self.id.to_be_bytes());
        frame.extend_from_slice(&self.flags_fragment.to_be_bytes());
        frame.extend_from_slice(&[self.ttl, protocol, 0, 0]); // checksum placeholder
        frame.extend_from_slice(&self.src.ip.octets());
        frame.extend_from_slice(&self.dst.ip.octets());
        frame.extend_from_slice(&self.ip_options);
        let ip_checksum = checksum(&[&frame[ip_start..]]);
        frame[ip_start + 10..ip_start + 12].copy_from_slice(&ip_checksum.to_be_bytes());

        let l4_checksum = match self.l4 {
            L4::Udp(UdpChecksum::Disabled) => 0,
            L4::Udp(_) => {
                udp_wire_checksum(l4_checksum(protocol, self.src.ip, self.dst.ip, &segment))
            }
            _ => l4_checksum(protocol, self.src.ip, self.dst.ip, &segment),
        };
        segment[checksum_at..checksum_at + 2].copy_from_slice(&l4_checksum.to_be_bytes());
        frame.extend_from_slice(&segment);
        frame.extend_from_slice(&self.trailer);
        frame
    }

    /// Protocol, L4 header + payload with a zero checksum, and the checksum's offset.
    fn segment(&self) -> (u8, Vec<u8>, usize) {
        let mut segment = Vec::with_capacity(TCP_LEN + self.payload.len());
        let (protocol, checksum_at) = match self.l4 {
            L4::Udp(_) => {
                segment.extend_from_slice(&self.src.port.to_be_bytes());
                segment.extend_from_slice(&self.dst.port.to_be_bytes());
                segment.extend_from_slice(&((UDP_LEN + self.payload.len()) as u16).to_be_bytes());
                segment.extend_from_slice(&[0, 0]);
                (IPPROTO_UDP, 6)
            }
            L4::Tcp { flags, seq, ack } => {
                segment.extend_from_slice(&self.src.port.to_be_bytes());
                segment.extend_from_slice(&self.dst.port.to_be_bytes());
                segment.extend_from_slice(&seq.to_be_bytes());
                segment.extend_from_slice(&ack.to_be_bytes());
                segment.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                (IPPROTO_TCP, 16)
            }
            L4::IcmpEcho { id, seq } => {
                segment.extend_from_slice(&[ICMP_ECHO_REQUEST, 0, 0, 0]);
                segment.extend_from_slice(&id.to_be_bytes());
                segment.extend_from_slice(&seq.to_be_bytes());
                (IPPROTO_ICMP, 2)
            }
        };
        segment.extend_from_slice(&self.payload);
        (protocol, segment, checksum_at)
    }
}

/// A broadcast ARP request from `src` (MAC and address) asking for `target`.
pub fn arp_request(src: Endpoint, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_LEN + ARP_LEN);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&src.mac);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    frame.extend_from_slice(&src.mac);
    frame.extend_from_slice(&src.ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

/// An Ethernet/IPv6 frame from fd00::1 to fd00::2 (hop limit 64) whose fixed header names
/// `next_header` and is followed by `l4` (e.g. a UDP header and payload, not checksummed).
pub fn ipv6_frame(src_mac: [u8; 6], dst_mac: [u8; 6], next_header: u8, l4: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_LEN + IPV6_LEN + l4.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
    frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[next_header, 64]);
    frame.extend_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets());
    frame.extend_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets());
    frame.extend_from_slice(l4);
    frame
}

/// The first `len` bytes of `frame`. Panics if `len` exceeds the frame.
pub fn truncate(frame: &[u8], len: usize) -> Vec<u8> {
    assert!(
        len <= frame.len(),
        "cannot truncate a {}-byte frame to {len} bytes",
        frame.len()
    );
    frame[..len].to_vec()
}

/// A frame taken apart by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Ethernet header.
    pub eth: EthHeader,
    /// IPv4 header.
    pub ipv4: Ipv4Header,
    /// TCP/UDP/ICMP header.
    pub l4: L4Header,
    /// L4 payload, up to the end of the IPv4 packet (Ethernet padding excluded).
    pub payload: Vec<u8>,
    /// Offset of the IPv4 header in the frame.
    pub ip_offset: usize,
    /// Offset of the L4 header (the end of the IPv4 header).
    pub l4_offset: usize,
    /// Offset of the payload.
    pub payload_offset: usize,
}

/// Ethernet header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthHeader {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// VLAN id of an 802.1Q tag, if any.
    pub vlan_id: Option<u16>,
    /// Ethernet type of the payload (after any VLAN tag).
    pub ethertype: u16,
}

/// IPv4 header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Header length in 32-bit words.
    pub ihl: u8,
    /// Total length.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// DF flag.
    pub dont_fragment: bool,
    /// MF flag.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub protocol: u8,
    /// Header checksum as found.
    pub checksum: u16,
    /// Option bytes (`(ihl - 5) * 4` of them).
    pub options: Vec<u8>,
}

/// L4 header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Header {
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// UDP length.
        len: u16,
        /// Checksum as found (0: none).
        checksum: u16,
    },
    /// TCP.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// Flags (`TCP_SYN`, ...).
        flags: u8,
        /// Checksum as found.
        checksum: u16,
    },
    /// ICMP.
    Icmp {
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
        /// Checksum as found.
        checksum: u16,
    },
    /// Not parsed: a non-first fragment or another protocol; the payload is the whole
    /// IPv4 payload.
    Unparsed,
}

impl L4Header {
    /// Source and destination port of a TCP or UDP header.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            Self::Udp {
                src_port, dst_port, ..
            }
            | Self::Tcp {
                src_port, dst_port, ..
            } => Some((src_port, dst_port)),
            _ => None,
        }
    }
}

/// Parses an Ethernet (optionally 802.1Q-tagged) / IPv4 frame. Errors on anything else:
/// other ethertypes, a truncated header, IHL < 5, `tot_len` shorter than the header or
/// beyond the frame, an L4 header cut short by `tot_len` (TCP: data offset < 5 or beyond).
/// Bytes after `tot_len` are ignored. Non-first fragments are [`L4Header::Unparsed`].
pub fn parse(frame: &[u8]) -> Result<Parsed, String> {
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(frame[at..at + 4].try_into().unwrap());
    let addr = |at: usize| Ipv4Addr::from(be32(at));

    if frame.len() < ETH_LEN {
        return Err(format!("{}-byte frame: no Ethernet header", frame.len()));
    }
    let mut ip = ETH_LEN;
    let mut ethertype = be16(12);
    let mut vlan_id = None;
    if ethertype == ETHERTYPE_VLAN {
        if frame.len() < ETH_LEN + VLAN_LEN {
            return Err(format!("{}-byte frame: truncated VLAN tag", frame.len()));
        }
        vlan_id = Some(be16(14) & 0x0fff);
        ethertype = be16(16);
        ip += VLAN_LEN;
    }
    let eth = EthHeader {
        dst: frame[..6].try_into().unwrap(),
        src: frame[6..12].try_into().unwrap(),
        vlan_id,
        ethertype,
    };
    if ethertype != ETHERTYPE_IPV4 {
        return Err(format!("ethertype {ethertype:#06x} is not IPv4"));
    }
    if frame.len() < ip + IPV4_LEN {
        return Err(format!("{}-byte frame: truncated IPv4 header", frame.len()));
    }
    if frame[ip] >> 4 != 4 {
        return Err(format!("IP version {} is not 4", frame[ip] >> 4));
    }
    let ihl = frame[ip] & 0x0f;
    let header_len = usize::from(ihl) * 4;
    if ihl < 5 {
        return Err(format!("IHL {ihl} is below 5"));
    }
    let tot_len = be16(ip + 2);
    let ip_end = ip + usize::from(tot_len);
    if usize::from(tot_len) < header_len {
        return Err(format!(
            "tot_len {tot_len} is shorter than the {header_len}-byte header"
        ));
    }
    if ip_end > frame.len() {
        return Err(format!(
            "tot_len {tot_len} goes beyond the {}-byte frame",
            frame.len()
        ));
    }
    let flags_fragment = be16(ip + 6);
    let ipv4 = Ipv4Header {
        src: addr(ip + 12),
        dst: addr(ip + 16),
        ihl,
        tot_len,
        id: be16(ip + 4),
        dont_fragment: flags_fragment & IPV4_DF != 0,
        more_fragments: flags_fragment & IPV4_MF != 0,
        frag_offset: flags_fragment & 0x1fff,
        ttl: frame[ip + 8],
        protocol: frame[ip + 9],
        checksum: be16(ip + 10),
        options: frame[ip + IPV4_LEN..ip + header_len].to_vec(),
    };

    let l4 = ip + header_len;
    let need = |len: usize, what: &str| {
        if l4 + len > ip_end {
            Err(format!(
                "{}-byte IPv4 payload: truncated {what} header",
                ip_end - l4
            ))
        } else {
            Ok(l4 + len)
        }
    };
    let (l4_header, payload_offset) = match ipv4.protocol {
        _ if ipv4.frag_offset != 0 => (L4Header::Unparsed, l4),
        IPPROTO_UDP => {
            let payload_offset = need(UDP_LEN, "UDP")?;
            let header = L4Header::Udp {
                src_port: be16(l4),
                dst_port: be16(l4 + 2),
                len: be16(l4 + 4),
                checksum: be16(l4 + 6),
            };
            (header, payload_offset)
        }
        IPPROTO_TCP => {
            need(TCP_LEN, "TCP")?;
            let data_offset = usize::from(frame[l4 + 12] >> 4) * 4;
            if data_offset < TCP_LEN {
                return Err(format!("TCP data offset {} is below 5", data_offset / 4));
            }
            let header = L4Header::Tcp {
                src_port: be16(l4),
                dst_port: be16(l4 + 2),
                seq: be32(l4 + 4),
                ack: be32(l4 + 8),
                flags: frame[l4 + 13],
                checksum: be16(l4 + 16),
            };
            (header, need(data_offset, "TCP")?)
        }
        IPPROTO_ICMP => {
            let payload_offset = need(ICMP_LEN, "ICMP")?;
            let header = L4Header::Icmp {
                icmp_type: frame[l4],
                code: frame[l4 + 1],
                checksum: be16(l4 + 2),
            };
            (header, payload_offset)
        }
        _ => (L4Header::Unparsed, l4),
    };
    Ok(Parsed {
        eth,
        ipv4,
        l4: l4_header,
        payload: frame[payload_offset..ip_end].to_vec(),
        ip_offset: ip,
        l4_offset: l4,
        payload_offset,
    })
}

/// Recomputes the IPv4 header checksum and the TCP, UDP or ICMP checksum of a frame that
/// [`parse`] accepts and compares them with the ones found. The error names the wrong one
/// ("IPv4 header checksum ...", "UDP checksum ...", "TCP checksum ...", "ICMP checksum ...").
/// A UDP checksum of 0 (none) is accepted; a UDP length that disagrees with the IPv4 packet
/// is an error. The L4 checksum of fragments is not checked (it covers the whole datagram).
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let parsed = parse(frame)?;
    let mut header = frame[parsed.ip_offset..parsed.l4_offset].to_vec();
    header[10..12].fill(0);
    let expected = checksum(&[&header]);
    if parsed.ipv4.checksum != expected {
        return Err(format!(
            "IPv4 header checksum is {:#06x}, expected {expected:#06x}",
            parsed.ipv4.checksum
        ));
    }
    if parsed.ipv4.more_fragments || parsed.ipv4.frag_offset != 0 {
        return Ok(());
    }
    let segment_len = usize::from(parsed.ipv4.tot_len) - usize::from(parsed.ipv4.ihl) * 4;
    let (name, found, expected) = match parsed.l4 {
        L4Header::Udp { len, .. } if usize::from(len) != segment_len => {
            return Err(format!(
                "UDP length {len} but the IPv4 payload is {segment_len} bytes"
            ));
        }
        L4Header::Udp { checksum: 0, .. } | L4Header::Unparsed => return Ok(()),
        L4Header::Udp { checksum, .. } => (
            "UDP",
            checksum,
            udp_wire_checksum(computed_l4_checksum(frame, &parsed).unwrap()),
        ),
        L4Header::Tcp { checksum, .. } => (
            "TCP",
            checksum,
            computed_l4_checksum(frame, &parsed).unwrap(),
        ),
        L4Header::Icmp { checksum, .. } => (
            "ICMP",
            checksum,
            computed_l4_checksum(frame, &parsed).unwrap(),
        ),
    };
    if found != expected {
        return Err(format!(
            "{name} checksum is {found:#06x}, expected {expected:#06x}"
        ));
    }
    Ok(())
}

/// The frame a NAT should produce from the TCP or UDP `frame`: destination address and port
/// replaced by `new_dst`, source ones by `new_src` (`None`: unchanged), and then the IPv4
/// header checksum and the TCP/UDP checksum recomputed from scratch over the new bytes (not
/// updated incrementally), a computed UDP 0 written as 0xFFFF. A UDP checksum of 0 (none)
/// stays 0. Everything else (MACs, TTL, options, Ethernet padding) is kept. Panics if
/// [`parse`] rejects the frame or it is not an unfragmented TCP or UDP packet.
pub fn rewrite_expected(
    frame: &[u8],
    new_dst: Option<(Ipv4Addr, u16)>,
    new_src: Option<(Ipv4Addr, u16)>,
) -> Vec<u8> {
    let parsed = parse(frame).unwrap_or_else(|e| panic!("rewrite_expected: {e}"));
    assert!(
        parsed.l4.ports().is_some() && !parsed.ipv4.more_fragments && parsed.ipv4.frag_offset == 0,
        "rewrite_expected needs an unfragmented TCP or UDP packet, got {:?}",
        parsed.l4
    );
    let (ip, l4) = (parsed.ip_offset, parsed.l4_offset);
    let mut out = frame.to_vec();
    if let Some((addr, port)) = new_src {
        out[ip + 12..ip + 16].copy_from_slice(&addr.octets());
        out[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    }
    if let Some((addr, port)) = new_dst {
        out[ip + 16..ip + 20].copy_from_slice(&addr.octets());
        out[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
    }
    out[ip + 10..ip + 12].fill(0);
    let ip_checksum = checksum(&[&out[ip..l4]]);
    out[ip + 10..ip + 12].copy_from_slice(&ip_checksum.to_be_bytes());

    let rewritten = parse(&out).expect("a rewritten frame parses");
    let (at, value) = match parsed.l4 {
        L4Header::Udp { checksum: 0, .. } => return out,
        L4Header::Udp { .. } => (
            l4 + 6,
            udp_wire_checksum(computed_l4_checksum(&out, &rewritten).unwrap()),
        ),
        _ => (l4 + 16, computed_l4_checksum(&out, &rewritten).unwrap()),
    };
    out[at..at + 2].copy_from_slice(&value.to_be_bytes());
    out
}

/// The RFC 1071 checksum of a parsed frame's L4 segment with its checksum field taken as
/// zero (before the UDP 0 → 0xFFFF rule); `None` for [`L4Header::Unparsed`].
fn computed_l4_checksum(frame: &[u8], parsed: &Parsed) -> Option<u16> {
    let checksum_at = match parsed.l4 {
        L4Header::Udp { .. } => 6,
        L4Header::Tcp { .. } => 16,
        L4Header::Icmp { .. } => 2,
        L4Header::Unparsed => return None,
    };
    let end = parsed.ip_offset + usize::from(parsed.ipv4.tot_len);
    let mut segment = frame[parsed.l4_offset..end].to_vec();
    segment[checksum_at..checksum_at + 2].fill(0);
    let ipv4 = &parsed.ipv4;
    Some(l4_checksum(ipv4.protocol, ipv4.src, ipv4.dst, &segment))
}

/// The RFC 1071 checksum of an L4 `segment` (checksum field zero): with the pseudo-header
/// for TCP and UDP, without for ICMP.
fn l4_checksum(protocol: u8, src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    if protocol == IPPROTO_ICMP {
        return checksum(&[segment]);
    }
    let pseudo = pseudo_header(src, dst, protocol, segment.len() as u16);
    checksum(&[&pseudo, segment])
}

/// RFC 768: a computed zero UDP checksum is sent as all ones (0 means "no checksum").
fn udp_wire_checksum(computed: u16) -> u16 {
    if computed == 0 { 0xffff } else { computed }
}

/// The IPv4 pseudo-header that TCP and UDP checksums cover.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u16) -> [u8; 12] {
    let mut header = [0u8; 12];
    header[..4].copy_from_slice(&src.octets());
    header[4..8].copy_from_slice(&dst.octets());
    header[9] = protocol;
    header[10..].copy_from_slice(&l4_len.to_be_bytes());
    header
}

/// RFC 1071 Internet checksum over the concatenation of `parts` (each part may have odd
/// length only if it is the last one).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for pair in &mut chunks {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One end of an IPv6 flow: MAC, IPv6 address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint6 {
    /// Ethernet address.
    pub mac: [u8; 6],
    /// IPv6 address.
    pub ip: Ipv6Addr,
    /// TCP/UDP port.
    pub port: u16,
}

/// IPv6 next-header values of the extension headers [`Frame6Builder`] adds.
pub const IPV6_HOPOPTS: u8 = 0;
/// Routing header.
pub const IPV6_ROUTING: u8 = 43;
/// Fragment header.
pub const IPV6_FRAGMENT: u8 = 44;
/// Destination options header.
pub const IPV6_DSTOPTS: u8 = 60;
/// ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Builds one Ethernet/IPv6 frame with TCP or UDP, optionally after extension headers.
/// Defaults: hop limit 64, `payload_len` matching the packet, a correct TCP/UDP checksum
/// (over the IPv6 pseudo-header: source, destination, upper-layer length, next header).
#[derive(Debug, Clone)]
pub struct Frame6Builder {
    src: Endpoint6,
    dst: Endpoint6,
    tcp: Option<(u8, u32, u32)>,
    payload: Vec<u8>,
    /// (next-header value of this header, its bytes after the first two).
    ext: Vec<(u8, Vec<u8>)>,
    payload_len: Option<u16>,
    udp_checksum_zero: bool,
    trailer: Vec<u8>,
}

impl Frame6Builder {
    fn new(src: Endpoint6, dst: Endpoint6, tcp: Option<(u8, u32, u32)>) -> Self {
        Self {
            src,
            dst,
            tcp,
            payload: Vec::new(),
            ext: Vec::new(),
            payload_len: None,
            udp_checksum_zero: false,
            trailer: Vec::new(),
        }
    }

    /// A UDP datagram from `src` to `dst`.
    pub fn udp(src: Endpoint6, dst: Endpoint6) -> Self {
        Self::new(src, dst, None)
    }

    /// A TCP segment with `flags`, `seq` and `ack` (data offset 5, window 65535).
    pub fn tcp(src: Endpoint6, dst: Endpoint6, flags: u8, seq: u32, ack: u32) -> Self {
        Self::new(src, dst, Some((flags, seq, ack)))
    }

    /// The L4 payload.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Appends a hop-by-hop (0), routing (43) or destination options (60) header of
    /// `8 * (units + 1)` bytes (PadN options; a routing header of type 0 with segments left 0).
    pub fn ext_header(mut self, kind: u8, units: u8) -> Self {
        let mut body = vec![0u8; 8 * (usize::from(units) + 1) - 2];
        if kind == IPV6_ROUTING {
            body[0] = 0; // routing type 0, segments left 0, reserved
        } else {
            body[0] = 1; // PadN
            body[1] = (body.len() - 2) as u8;
        }
        self.ext.push((kind, body));
        self
    }

    /// Appends a fragment header (offset in 8-byte units, M flag, identification 0x1234).
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        let mut body = vec![0u8; 6];
        body[..2].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        body[2..].copy_from_slice(&0x1234u32.to_be_bytes());
        self.ext.push((IPV6_FRAGMENT, body));
        self
    }

    /// Overrides the IPv6 payload length.
    pub fn payload_len(mut self, len: u16) -> Self {
        self.payload_len = Some(len);
        self
    }

    /// Writes UDP checksum 0 (invalid in IPv6).
    pub fn udp_checksum_zero(mut self) -> Self {
        self.udp_checksum_zero = true;
        self
    }

    /// Bytes after the IPv6 packet (Ethernet padding).
    pub fn trailer(mut self, trailer: &[u8]) -> Self {
        self.trailer = trailer.to_vec();
        self
    }

    /// The frame.
    pub fn build(&self) -> Vec<u8> {
        let mut segment = Vec::new();
        segment.extend_from_slice(&self.src.port.to_be_bytes());
        segment.extend_from_slice(&self.dst.port.to_be_bytes());
        let (protocol, checksum_at) = match self.tcp {
            None => {
                segment.extend_from_slice(&((UDP_LEN + self.payload.len()) as u16).to_be_bytes());
                segment.extend_from_slice(&[0, 0]);
                (IPPROTO_UDP, 6)
            }
            Some((flags, seq, ack)) => {
                segment.extend_from_slice(&seq.to_be_bytes());
                segment.extend_from_slice(&ack.to_be_bytes());
                segment.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                (IPPROTO_TCP, 16)
            }
        };
        segment.extend_from_slice(&self.payload);
        let sum = l4_checksum6(protocol, self.src.ip, self.dst.ip, &segment);
        let sum = match protocol {
            IPPROTO_UDP if self.udp_checksum_zero => 0,
            IPPROTO_UDP => udp_wire_checksum(sum),
            _ => sum,
        };
        segment[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());

        let mut headers = Vec::new();
        for (i, (_, body)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(protocol, |(kind, _)| *kind);
            let units = if body.len() == 6 && self.ext[i].0 == IPV6_FRAGMENT {
                0
            } else {
                ((body.len() + 2) / 8 - 1) as u8
            };
            headers.extend_from_slice(&[next, units]);
            headers.extend_from_slice(body);
        }
        let first = self.ext.first().map_or(protocol, |(kind, _)| *kind);
        let payload_len = self
            .payload_len
            .unwrap_or((headers.len() + segment.len()) as u16);
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst.mac);
        frame.extend_from_slice(&self.src.mac);
        frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&payload_len.to_be_bytes());
        frame.extend_from_slice(&[first, 64]);
        frame.extend_from_slice(&self.src.ip.octets());
        frame.extend_from_slice(&self.dst.ip.octets());
        frame.extend_from_slice(&headers);
        frame.extend_from_slice(&segment);
        frame.extend_from_slice(&self.trailer);
        frame
    }
}

/// An Ethernet/IPv6 frame taken apart by [`parse6`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed6 {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Payload length.
    pub payload_len: u16,
    /// The protocol after the extension headers (44 for a fragment).
    pub protocol: u8,
    /// TCP/UDP header; [`L4Header::Unparsed`] after a fragment header or for other protocols.
    pub l4: L4Header,
    /// Offset of the L4 header.
    pub l4_offset: usize,
    /// Offset of the end of the IPv6 packet.
    pub end: usize,
}

/// Parses an Ethernet/IPv6 frame, walking hop-by-hop, routing and destination options
/// headers. Errors on other ethertypes, truncated headers and a `payload_len` beyond the
/// frame.
pub fn parse6(frame: &[u8]) -> Result<Parsed6, String> {
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(frame[at..at + 4].try_into().unwrap());
    if frame.len() < ETH_LEN + IPV6_LEN {
        return Err(format!("{}-byte frame: truncated IPv6 header", frame.len()));
    }
    if be16(12) != ETHERTYPE_IPV6 {
        return Err(format!("ethertype {:#06x} is not IPv6", be16(12)));
    }
    let ip = ETH_LEN;
    if frame[ip] >> 4 != 6 {
        return Err(format!("IP version {} is not 6", frame[ip] >> 4));
    }
    let payload_len = be16(ip + 4);
    let end = ip + IPV6_LEN + usize::from(payload_len);
    if end > frame.len() {
        return Err(format!("payload_len {payload_len} goes beyond the frame"));
    }
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).unwrap());
    let mut protocol = frame[ip + 6];
    let mut at = ip + IPV6_LEN;
    while matches!(protocol, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS) {
        if at + 2 > end {
            return Err("truncated extension header".into());
        }
        protocol = frame[at];
        at += (usize::from(frame[at + 1]) + 1) * 8;
    }
    let need = |len: usize| {
        if at + len > end {
            Err(format!("truncated L4 header at {at}"))
        } else {
            Ok(())
        }
    };
    let l4 = match protocol {
        IPPROTO_UDP => {
            need(UDP_LEN)?;
            L4Header::Udp {
                src_port: be16(at),
                dst_port: be16(at + 2),
                len: be16(at + 4),
                checksum: be16(at + 6),
            }
        }
        IPPROTO_TCP => {
            need(TCP_LEN)?;
            L4Header::Tcp {
                src_port: be16(at),
                dst_port: be16(at + 2),
                seq: be32(at + 4),
                ack: be32(at + 8),
                flags: frame[at + 13],
                checksum: be16(at + 16),
            }
        }
        _ => L4Header::Unparsed,
    };
    Ok(Parsed6 {
        src: addr(ip + 8),
        dst: addr(ip + 24),
        payload_len,
        protocol,
        l4,
        l4_offset: at,
        end,
    })
}

/// Recomputes the TCP or UDP checksum of an IPv6 frame and compares it with the one found.
/// UDP checksum 0 is an error (mandatory in IPv6), and so is a UDP length that disagrees
/// with the packet.
pub fn verify_checksums6(frame: &[u8]) -> Result<(), String> {
    let parsed = parse6(frame)?;
    let (name, found, at) = match parsed.l4 {
        L4Header::Udp { len, .. } if usize::from(len) != parsed.end - parsed.l4_offset => {
            return Err(format!("UDP length {len} disagrees with the IPv6 packet"));
        }
        L4Header::Udp { checksum: 0, .. } => return Err("UDP checksum 0 in IPv6".into()),
        L4Header::Udp { checksum, .. } => ("UDP", checksum, 6),
        L4Header::Tcp { checksum, .. } => ("TCP", checksum, 16),
        _ => return Err("not TCP or UDP".into()),
    };
    let mut segment = frame[parsed.l4_offset..parsed.end].to_vec();
    segment[at..at + 2].fill(0);
    let expected = l4_checksum6(parsed.protocol, parsed.src, parsed.dst, &segment);
    let expected = if name == "UDP" {
        udp_wire_checksum(expected)
    } else {
        expected
    };
    if found != expected {
        return Err(format!(
            "{name} checksum is {found:#06x}, expected {expected:#06x}"
        ));
    }
    Ok(())
}

/// The frame a NAT should produce from the IPv6 TCP or UDP `frame`: destination and/or source
/// address and port replaced, the TCP/UDP checksum recomputed from scratch (a computed UDP 0
/// written as 0xFFFF). Panics unless [`parse6`] finds TCP or UDP.
pub fn rewrite_expected6(
    frame: &[u8],
    new_dst: Option<(Ipv6Addr, u16)>,
    new_src: Option<(Ipv6Addr, u16)>,
) -> Vec<u8> {
    let parsed = parse6(frame).unwrap_or_else(|e| panic!("rewrite_expected6: {e}"));
    let at = match parsed.l4 {
        L4Header::Udp { .. } => 6,
        L4Header::Tcp { .. } => 16,
        other => panic!("rewrite_expected6 needs TCP or UDP, got {other:?}"),
    };
    let (ip, l4) = (ETH_LEN, parsed.l4_offset);
    let mut out = frame.to_vec();
    if let Some((addr, port)) = new_src {
        out[ip + 8..ip + 24].copy_from_slice(&addr.octets());
        out[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    }
    if let Some((addr, port)) = new_dst {
        out[ip + 24..ip + 40].copy_from_slice(&addr.octets());
        out[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
    }
    let (src, dst) = (
        new_src.map_or(parsed.src, |(a, _)| a),
        new_dst.map_or(parsed.dst, |(a, _)| a),
    );
    let mut segment = out[l4..parsed.end].to_vec();
    segment[at..at + 2].fill(0);
    let sum = l4_checksum6(parsed.protocol, src, dst, &segment);
    let sum = if at == 6 { udp_wire_checksum(sum) } else { sum };
    out[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
    out
}

/// The RFC 1071 checksum of a TCP or UDP `segment` (checksum field zero) with the IPv6
/// pseudo-header (RFC 8200 section 8.1).
fn l4_checksum6(protocol: u8, src: Ipv6Addr, dst: Ipv6Addr, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo[39] = protocol;
    checksum(&[&pseudo, segment])
}

/// Splits an unfragmented Ethernet/IPv4 `frame` (IHL 5, no VLAN tag) into fragments as a
/// router would: each carries at most `chunk` bytes of the IP payload (`chunk` a multiple of
/// 8), the identification is kept, DF cleared, MF set on all but the last, offsets set and
/// each header checksum computed here. The L4 header (and its checksum over the whole
/// datagram) is in the first fragment only.
pub fn fragments(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    assert!(
        chunk > 0 && chunk.is_multiple_of(8),
        "fragment payloads are multiples of 8"
    );
    let ip = ETH_LEN;
    assert_eq!(frame[ip] & 0x0f, 5, "fragments() needs IHL 5");
    let end = ip + usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
    let payload = &frame[ip + IPV4_LEN..end];
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut out = frame[..ip + IPV4_LEN].to_vec();
            out[ip + 2..ip + 4].copy_from_slice(&((IPV4_LEN + piece.len()) as u16).to_be_bytes());
            let more = if i + 1 < pieces.len() { IPV4_MF } else { 0 };
            let offset = (i * chunk / 8) as u16;
            out[ip + 6..ip + 8].copy_from_slice(&(more | offset).to_be_bytes());
            out[ip + 10..ip + 12].fill(0);
            let sum = checksum(&[&out[ip..]]);
            out[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(piece);
            out
        })
        .collect()
}

/// IPv6: splits an unfragmented Ethernet/IPv6 `frame` without extension headers into
/// fragments with a fragment header (identification `id`), each carrying at most `chunk`
/// bytes of the upper-layer packet (`chunk` a multiple of 8).
pub fn fragments6(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(
        chunk > 0 && chunk.is_multiple_of(8),
        "fragment payloads are multiples of 8"
    );
    let ip = ETH_LEN;
    let protocol = frame[ip + 6];
    assert!(
        protocol == IPPROTO_TCP || protocol == IPPROTO_UDP,
        "fragments6() needs TCP or UDP right after the fixed header"
    );
    let end = ip + IPV6_LEN + usize::from(u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]));
    let upper = &frame[ip + IPV6_LEN..end];
    let pieces: Vec<&[u8]> = upper.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut out = frame[..ip + IPV6_LEN].to_vec();
            out[ip + 4..ip + 6].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
            out[ip + 6] = IPV6_FRAGMENT;
            let more = u16::from(i + 1 < pieces.len());
            let offset = (i * chunk / 8) as u16;
            out.extend_from_slice(&[protocol, 0]);
            out.extend_from_slice(&((offset << 3) | more).to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(piece);
            out
        })
        .collect()
}

/// An Ethernet/IPv4 ICMP error from `src` to `dst` (MACs and addresses; ports unused):
/// `kind`, `code`, the 4 header bytes after the checksum (`rest`: unused, or the next-hop
/// MTU of "fragmentation needed"), then `quoted` (the IP packet the error is about, as much
/// of it as the sender quotes). Header and ICMP checksums computed here.
pub fn icmp_error(
    src: Endpoint,
    dst: Endpoint,
    (kind, code): (u8, u8),
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut message = icmp_message((kind, code), rest, quoted);
    let sum = checksum(&[&message]);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(ETH_LEN + IPV4_LEN + message.len());
    frame.extend_from_slice(&dst.mac);
    frame.extend_from_slice(&src.mac);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let tot_len = (IPV4_LEN + message.len()) as u16;
    frame.extend_from_slice(&[0x45, 0xc0]);
    frame.extend_from_slice(&tot_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    frame.extend_from_slice(&src.ip.octets());
    frame.extend_from_slice(&dst.ip.octets());
    let sum = checksum(&[&frame[ETH_LEN..]]);
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

/// An ICMP or ICMPv6 error message with a zero checksum: type, code, 4 more header bytes,
/// the quoted packet.
fn icmp_message((kind, code): (u8, u8), rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0];
    message.extend_from_slice(&rest);
    message.extend_from_slice(quoted);
    message
}

/// IPv6: [`icmp_error`] for ICMPv6 (its checksum covers the IPv6 pseudo-header).
pub fn icmp6_error(
    src: Endpoint6,
    dst: Endpoint6,
    (kind, code): (u8, u8),
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut message = icmp_message((kind, code), rest, quoted);
    let sum = l4_checksum6(IPPROTO_ICMPV6, src.ip, dst.ip, &message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(ETH_LEN + IPV6_LEN + message.len());
    frame.extend_from_slice(&dst.mac);
    frame.extend_from_slice(&src.mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(message.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[IPPROTO_ICMPV6, 64]);
    frame.extend_from_slice(&src.ip.octets());
    frame.extend_from_slice(&dst.ip.octets());
    frame.extend_from_slice(&message);
    frame
}

/// The IP packet of an Ethernet frame (without Ethernet padding), to quote in an ICMP error.
pub fn ip_packet(frame: &[u8]) -> &[u8] {
    let be16 = |at: usize| usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    match be16(12) as u16 {
        ETHERTYPE_IPV4 => &frame[ETH_LEN..ETH_LEN + be16(ETH_LEN + 2)],
        ETHERTYPE_IPV6 => &frame[ETH_LEN..ETH_LEN + IPV6_LEN + be16(ETH_LEN + 4)],
        other => panic!("ethertype {other:#06x} is neither IPv4 nor IPv6"),
    }
}

/// Recomputes the ICMPv6 checksum of an Ethernet/IPv6 frame whose next header is ICMPv6
/// and compares it with the one found.
pub fn verify_icmp6_checksum(frame: &[u8]) -> Result<(), String> {
    let parsed = parse6(frame)?;
    if parsed.protocol != IPPROTO_ICMPV6 {
        return Err(format!("next header {} is not ICMPv6", parsed.protocol));
    }
    let mut message = frame[parsed.l4_offset..parsed.end].to_vec();
    let found = u16::from_be_bytes([message[2], message[3]]);
    message[2..4].fill(0);
    let expected = l4_checksum6(IPPROTO_ICMPV6, parsed.src, parsed.dst, &message);
    if found != expected {
        return Err(format!(
            "ICMPv6 checksum is {found:#06x}, expected {expected:#06x}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Endpoint = Endpoint {
        mac: [2, 0, 0, 0, 0, 1],
        ip: Ipv4Addr::new(10, 0, 0, 1),
        port: 40000,
    };
    const NODE: Endpoint = Endpoint {
        mac: [2, 0, 0, 0, 0, 2],
        ip: Ipv4Addr::new(10, 0, 0, 2),
        port: 30080,
    };
    const BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 1, 7), 8080);

    fn udp_checksum_of(frame: &[u8]) -> u16 {
        match parse(frame).unwrap().l4 {
            L4Header::Udp { checksum, .. } => checksum,
            other => panic!("not UDP: {other:?}"),
        }
    }

    /// Flips one bit of `frame[at]`.
    fn flipped(frame: &[u8], at: usize) -> Vec<u8> {
        let mut frame = frame.to_vec();
        frame[at] ^= 0x01;
        frame
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: the one's complement sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }

    #[test]
    fn built_udp_frame_verifies() {
        let frame = udp_frame(CLIENT, NODE, b"hello");
        assert_eq!(frame.len(), ETH_LEN + IPV4_LEN + UDP_LEN + 5);
        // A correct header checksums to zero when the checksum field is included.
        assert_eq!(checksum(&[&frame[ETH_LEN..ETH_LEN + IPV4_LEN]]), 0);
        let udp = &frame[ETH_LEN + IPV4_LEN..];
        let pseudo = pseudo_header(CLIENT.ip, NODE.ip, IPPROTO_UDP, udp.len() as u16);
        assert_eq!(checksum(&[&pseudo, udp]), 0);
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn udp_round_trip_with_options_vlan_and_trailer() {
        let frame = FrameBuilder::udp(CLIENT, NODE)
            .payload(b"odd")
            .ip_options(&[1, 1, 1, 0])
            .vlan(100)
            .ttl(7)
            .id(0xbeef)
            .trailer(&[0xee; 6])
            .build();
        let p = parse(&frame).unwrap();
        assert_eq!(
            p.eth,
            EthHeader {
                dst: NODE.mac,
                src: CLIENT.mac,
                vlan_id: Some(100),
                ethertype: ETHERTYPE_IPV4
            }
        );
        assert_eq!(p.ip_offset, ETH_LEN + VLAN_LEN);
        assert_eq!(p.l4_offset, p.ip_offset + 24);
        assert_eq!(p.ipv4.src, CLIENT.ip);
        assert_eq!(p.ipv4.dst, NODE.ip);
        assert_eq!(p.ipv4.ihl, 6);
        assert_eq!(usize::from(p.ipv4.tot_len), 24 + UDP_LEN + 3);
        assert_eq!(
            (p.ipv4.ttl, p.ipv4.id, p.ipv4.protocol),
            (7, 0xbeef, IPPROTO_UDP)
        );
        assert!(p.ipv4.dont_fragment && !p.ipv4.more_fragments);
        assert_eq!(p.ipv4.options, [1, 1, 1, 0]);
        assert!(matches!(
            p.l4,
            L4Header::Udp {
                src_port: 40000,
                dst_port: 30080,
                len: 11,
                ..
            }
        ));
        assert_eq!(p.payload, b"odd");
        assert_eq!(frame.len(), p.ip_offset + usize::from(p.ipv4.tot_len) + 6);
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn tcp_round_trip() {
        let flags = TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST | TCP_PSH;
        let frame = FrameBuilder::tcp(CLIENT, NODE, flags, 0xdead_beef, 7)
            .payload(b"GET /")
            .build();
        let p = parse(&frame).unwrap();
        let L4Header::Tcp {
            src_port,
            dst_port,
            seq,
            ack,
            flags: found,
            ..
        } = p.l4
        else {
            panic!("not TCP: {:?}", p.l4)
        };
        assert_eq!(
            (src_port, dst_port, seq, ack, found),
            (40000, 30080, 0xdead_beef, 7, 0x1f)
        );
        assert_eq!(p.l4.ports(), Some((40000, 30080)));
        assert_eq!(p.payload_offset, p.l4_offset + TCP_LEN);
        assert_eq!(p.payload, b"GET /");
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn icmp_echo_round_trip() {
        let frame = FrameBuilder::icmp_echo(CLIENT, NODE, 1, 2)
            .payload(b"ping")
            .build();
        let p = parse(&frame).unwrap();
        assert!(matches!(
            p.l4,
            L4Header::Icmp {
                icmp_type: 8,
                code: 0,
                ..
            }
        ));
        assert_eq!(p.l4.ports(), None);
        assert_eq!(&frame[p.l4_offset + 4..p.l4_offset + 8], [0, 1, 0, 2]);
        assert_eq!(p.payload, b"ping");
        verify_checksums(&frame).unwrap();
    }

    #[test]
    fn odd_and_even_payload_lengths_verify() {
        for len in 0..=9 {
            let payload: Vec<u8> = (0..len).map(|i| 0xf0 | i).collect();
            let frames = [
                FrameBuilder::udp(CLIENT, NODE).payload(&payload).build(),
                FrameBuilder::tcp(CLIENT, NODE, TCP_ACK, 1, 2)
                    .payload(&payload)
                    .build(),
                FrameBuilder::icmp_echo(CLIENT, NODE, 3, 4)
                    .payload(&payload)
                    .build(),
            ];
            for frame in frames {
                verify_checksums(&frame).unwrap_or_else(|e| panic!("length {len}: {e}"));
                assert_eq!(parse(&frame).unwrap().payload, payload);
            }
        }
    }

    #[test]
    fn verify_names_the_wrong_checksum() {
        let ip_ttl = ETH_LEN + 8;
        let payload_at = |frame: &[u8]| parse(frame).unwrap().payload_offset;
        let udp = udp_frame(CLIENT, NODE, b"data");
        let tcp = FrameBuilder::tcp(CLIENT, NODE, TCP_SYN, 1, 0)
            .payload(b"data")
            .build();
        let icmp = FrameBuilder::icmp_echo(CLIENT, NODE, 1, 1)
            .payload(b"data")
            .build();
        for (frame, name) in [(&udp, "UDP"), (&tcp, "TCP"), (&icmp, "ICMP")] {
            let err = verify_checksums(&flipped(frame, ip_ttl)).unwrap_err();
            assert!(err.starts_with("IPv4 header checksum"), "{err}");
            let err = verify_checksums(&flipped(frame, payload_at(frame) + 3)).unwrap_err();
            assert!(err.starts_with(&format!("{name} checksum")), "{err}");
        }
        // The IPv4 header checksum field itself, and the L4 one.
        let err = verify_checksums(&flipped(&udp, ETH_LEN + 11)).unwrap_err();
        assert!(err.starts_with("IPv4 header checksum"), "{err}");
        let err = verify_checksums(&flipped(&udp, ETH_LEN + IPV4_LEN + 7)).unwrap_err();
        assert!(err.starts_with("UDP checksum"), "{err}");
        // Addresses are covered by both (IPv4 reported first) ...
        let err = verify_checksums(&flipped(&udp, ETH_LEN + 19)).unwrap_err();
        assert!(err.starts_with("IPv4 header checksum"), "{err}");
        // ... and ports by the L4 one.
        let err = verify_checksums(&flipped(&tcp, ETH_LEN + IPV4_LEN + 3)).unwrap_err();
        assert!(err.starts_with("TCP checksum"), "{err}");
    }

    #[test]
    fn ip_options_are_covered_by_the_header_checksum() {
        let frame = FrameBuilder::udp(CLIENT, NODE)
            .ip_options(&[1, 1, 1, 0, 1, 1, 1, 0])
            .payload(b"x")
            .build();
        verify_checksums(&frame).unwrap();
        let options = ETH_LEN + IPV4_LEN;
        for at in options..options + 8 {
            let err = verify_checksums(&flipped(&frame, at)).unwrap_err();
            assert!(err.starts_with("IPv4 header checksum"), "byte {at}: {err}");
        }
        // The options are not part of the UDP checksum: a frame without them has the same.
        assert_eq!(
            udp_checksum_of(&frame),
            udp_checksum_of(&udp_frame(CLIENT, NODE, b"x"))
        );
    }

    #[test]
    fn disabled_udp_checksum_is_zero_accepted_and_kept_by_nat() {
        let frame = FrameBuilder::udp(CLIENT, NODE)
            .payload(b"abc")
            .udp_checksum_disabled()
            .build();
        assert_eq!(udp_checksum_of(&frame), 0);
        verify_checksums(&frame).unwrap();
        let natted = rewrite_expected(&frame, Some(BACKEND), None);
        assert_eq!(udp_checksum_of(&natted), 0);
        verify_checksums(&natted).unwrap();
    }

    #[test]
    fn forced_ffff_checksum_is_correct_and_ffff() {
        for len in 2..=7 {
            let payload = vec![0x5a; len];
            let frame = FrameBuilder::udp(CLIENT, NODE)
                .payload(&payload)
                .udp_checksum_ffff()
                .build();
            assert_eq!(udp_checksum_of(&frame), 0xffff, "length {len}");
            verify_checksums(&frame).unwrap();
            let p = parse(&frame).unwrap();
            assert_eq!(p.payload[2..], payload[2..], "only bytes 0..2 change");
            // The one's complement sum is negative zero: the checksum computes to 0.
            let segment = &frame[p.l4_offset..];
            let mut zeroed = segment.to_vec();
            zeroed[6..8].fill(0);
            let pseudo = pseudo_header(CLIENT.ip, NODE.ip, IPPROTO_UDP, segment.len() as u16);
            assert_eq!(checksum(&[&pseudo, &zeroed]), 0);
        }
    }

    /// RFC 1624 eqn. 3, as a NAT would update a checksum: HC' = ~(~HC + ~m + m').
    fn incremental(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
        let mut sum = u32::from(!checksum);
        for (m, m2) in old.chunks(2).zip(new.chunks(2)) {
            sum += u32::from(!u16::from_be_bytes([m[0], m[1]]));
            sum += u32::from(u16::from_be_bytes([m2[0], m2[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn forced_ffff_after_dnat_hits_the_zero_case() {
        for payload in [&b"ab"[..], b"abc", b"abcdefgh"] {
            let frame = FrameBuilder::udp(CLIENT, NODE)
                .payload(payload)
                .udp_checksum_ffff_after_nat(Some(BACKEND), None)
                .build();
            verify_checksums(&frame).unwrap();
            let before = udp_checksum_of(&frame);
            assert_ne!(before, 0xffff);

            let natted = rewrite_expected(&frame, Some(BACKEND), None);
            assert_eq!(udp_checksum_of(&natted), 0xffff);
            verify_checksums(&natted).unwrap();

            // An incremental update yields 0x0000, which must be sent as 0xFFFF.
            let old: Vec<u8> = [&NODE.ip.octets()[..], &NODE.port.to_be_bytes()].concat();
            let new: Vec<u8> = [&BACKEND.0.octets()[..], &BACKEND.1.to_be_bytes()].concat();
            assert_eq!(incremental(before, &old, &new), 0);
        }
    }

    #[test]
    fn forced_ffff_after_snat() {
        let reply = FrameBuilder::udp(
            Endpoint {
                ip: BACKEND.0,
                port: BACKEND.1,
                ..NODE
            },
            CLIENT,
        )
        .payload(b"pong")
        .udp_checksum_ffff_after_nat(None, Some((NODE.ip, NODE.port)))
        .build();
        let natted = rewrite_expected(&reply, None, Some((NODE.ip, NODE.port)));
        assert_eq!(udp_checksum_of(&natted), 0xffff);
        verify_checksums(&natted).unwrap();
    }

    #[test]
    fn rewrite_matches_a_frame_built_for_the_new_endpoints() {
        let backend = Endpoint {
            ip: BACKEND.0,
            port: BACKEND.1,
            ..NODE
        };
        let server = Endpoint {
            ip: Ipv4Addr::new(192, 168, 9, 9),
            port: 53,
            ..CLIENT
        };
        for payload in [&b""[..], b"a", b"abcdefg"] {
            let udp = |src, dst| FrameBuilder::udp(src, dst).payload(payload).build();
            let tcp = |src, dst| {
                FrameBuilder::tcp(src, dst, TCP_PSH | TCP_ACK, 9, 10)
                    .payload(payload)
                    .ip_options(&[1, 1, 1, 0])
                    .build()
            };
            for build in [&udp as &dyn Fn(Endpoint, Endpoint) -> Vec<u8>, &tcp] {
                let frame = build(CLIENT, NODE);
                assert_eq!(
                    rewrite_expected(&frame, Some(BACKEND), None),
                    build(CLIENT, backend)
                );
                assert_eq!(
                    rewrite_expected(&frame, Some(BACKEND), Some((server.ip, server.port))),
                    build(server, backend)
                );
                assert_eq!(rewrite_expected(&frame, None, None), frame);
            }
        }
    }

    #[test]
    fn malformed_headers_are_rejected_by_parse() {
        let bad_ihl = FrameBuilder::udp(CLIENT, NODE).ihl(4).payload(b"x").build();
        assert_eq!(bad_ihl.len(), ETH_LEN + IPV4_LEN + UDP_LEN + 1);
        assert_eq!(bad_ihl[ETH_LEN], 0x44);
        assert!(parse(&bad_ihl).unwrap_err().contains("IHL 4"));

        let long = FrameBuilder::udp(CLIENT, NODE)
            .tot_len(200)
            .payload(b"x")
            .build();
        assert_eq!(long.len(), ETH_LEN + IPV4_LEN + UDP_LEN + 1);
        assert!(parse(&long).unwrap_err().contains("beyond"));

        let short = FrameBuilder::udp(CLIENT, NODE)
            .tot_len(IPV4_LEN as u16 + 4)
            .build();
        assert!(parse(&short).unwrap_err().contains("truncated UDP"));

        let frame = FrameBuilder::tcp(CLIENT, NODE, TCP_SYN, 0, 0).build();
        for len in 0..frame.len() {
            assert!(parse(&truncate(&frame, len)).is_err(), "length {len}");
        }
        assert_eq!(truncate(&frame, 20), frame[..20]);
    }

    #[test]
    fn fragments() {
        let first = FrameBuilder::udp(CLIENT, NODE)
            .payload(b"part")
            .fragment(true, 0)
            .build();
        let p = parse(&first).unwrap();
        assert!(p.ipv4.more_fragments && !p.ipv4.dont_fragment);
        assert_eq!(p.ipv4.frag_offset, 0);
        assert_eq!(p.l4.ports(), Some((40000, 30080)));
        verify_checksums(&first).unwrap();

        let later = FrameBuilder::udp(CLIENT, NODE)
            .payload(b"part")
            .fragment(false, 185)
            .build();
        let p = parse(&later).unwrap();
        assert!(!p.ipv4.more_fragments);
        assert_eq!(p.ipv4.frag_offset, 185);
        assert_eq!(p.l4, L4Header::Unparsed);
        assert_eq!(p.payload.len(), UDP_LEN + 4);
        verify_checksums(&later).unwrap();
    }

    #[test]
    fn non_ipv4_frames() {
        let arp = arp_request(CLIENT, NODE.ip);
        assert_eq!(arp.len(), ETH_LEN + ARP_LEN);
        assert_eq!(arp[12..14], ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(arp[38..42], NODE.ip.octets());
        assert!(parse(&arp).unwrap_err().contains("0x0806"));

        let udp = [
            &40000u16.to_be_bytes()[..],
            &30080u16.to_be_bytes(),
            &[0, 8, 0, 0],
        ]
        .concat();
        let v6 = ipv6_frame(CLIENT.mac, NODE.mac, IPPROTO_UDP, &udp);
        assert_eq!(v6.len(), ETH_LEN + IPV6_LEN + UDP_LEN);
        assert_eq!(v6[12..14], ETHERTYPE_IPV6.to_be_bytes());
        assert_eq!(v6[ETH_LEN] >> 4, 6);
        assert_eq!(v6[ETH_LEN + 6], IPPROTO_UDP);
        assert!(parse(&v6).unwrap_err().contains("0x86dd"));
    }
}
