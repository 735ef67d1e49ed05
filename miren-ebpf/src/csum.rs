//! Incremental Internet checksum updates (RFC 1624, eqn. 3) on raw header words: the values
//! are used exactly as stored in the packet, which keeps the arithmetic byte-order neutral.

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// The checksum after a 32-bit field (e.g. an address) changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// The checksum after each 32-bit word of an IPv6 address changed from `old` to `new`.
#[inline(always)]
pub fn replace_addr6(mut check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    for i in 0..4 {
        check = replace4(check, old[i], new[i]);
    }
    check
}
