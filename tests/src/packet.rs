//! Hand-built Ethernet/IPv4 frames for packet-level tests, with checksums computed here,
//! independently of the code under test.

use std::net::Ipv4Addr;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;

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
/// header checksum and UDP checksum.
pub fn udp_frame(src: Endpoint, dst: Endpoint, payload: &[u8]) -> Vec<u8> {
    let udp_len = UDP_LEN + payload.len();
    let total_len = IPV4_LEN + udp_len;
    let mut frame = Vec::with_capacity(ETH_LEN + total_len);
    frame.extend_from_slice(&dst.mac);
    frame.extend_from_slice(&src.mac);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

    let ip_start = frame.len();
    frame.extend_from_slice(&[0x45, 0x00]); // version 4, IHL 5; DSCP/ECN 0
    frame.extend_from_slice(&(total_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, flags DF, fragment offset 0
    frame.extend_from_slice(&[64, IPPROTO_UDP, 0, 0]); // TTL, protocol, checksum placeholder
    frame.extend_from_slice(&src.ip.octets());
    frame.extend_from_slice(&dst.ip.octets());
    let ip_checksum = checksum(&[&frame[ip_start..ip_start + IPV4_LEN]]);
    frame[ip_start + 10..ip_start + 12].copy_from_slice(&ip_checksum.to_be_bytes());

    let udp_start = frame.len();
    frame.extend_from_slice(&src.port.to_be_bytes());
    frame.extend_from_slice(&dst.port.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    let pseudo = pseudo_header(src.ip, dst.ip, IPPROTO_UDP, udp_len as u16);
    let udp_checksum = match checksum(&[&pseudo, &frame[udp_start..]]) {
        0 => 0xffff, // RFC 768: a computed zero is sent as all ones
        sum => sum,
    };
    frame[udp_start + 6..udp_start + 8].copy_from_slice(&udp_checksum.to_be_bytes());
    frame
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: the one's complement sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }

    #[test]
    fn built_udp_frame_verifies() {
        let src = Endpoint {
            mac: [2, 0, 0, 0, 0, 1],
            ip: Ipv4Addr::new(10, 0, 0, 1),
            port: 40000,
        };
        let dst = Endpoint {
            mac: [2, 0, 0, 0, 0, 2],
            ip: Ipv4Addr::new(10, 0, 0, 2),
            port: 7000,
        };
        let frame = udp_frame(src, dst, b"hello");
        assert_eq!(frame.len(), ETH_LEN + IPV4_LEN + UDP_LEN + 5);
        // A correct header checksums to zero when the checksum field is included.
        assert_eq!(checksum(&[&frame[ETH_LEN..ETH_LEN + IPV4_LEN]]), 0);
        let udp = &frame[ETH_LEN + IPV4_LEN..];
        let pseudo = pseudo_header(src.ip, dst.ip, IPPROTO_UDP, udp.len() as u16);
        assert_eq!(checksum(&[&pseudo, udp]), 0);
    }
}
