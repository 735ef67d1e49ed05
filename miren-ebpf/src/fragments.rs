//! Fragments of node-port datagrams, shared by the XDP (toward instances) and TC (replies)
//! programs. Only a datagram's first fragment carries the ports: it is translated like any
//! packet of its flow and its translation is remembered by (source, destination, IP id,
//! protocol) for [`FRAG_TIMEOUT_NS`]; the later fragments get the same address translation.
//! A later fragment whose first one was not seen goes to the kernel untouched (counted).

use miren_common::nodeport::{
    Addr6, FRAG_TIMEOUT_NS, FragKey, FragKey6, FragNat, FragNat6, GlobalStat,
};

use crate::{
    family::Family,
    maps::{FRAGS, FRAGS6, config, count, now_ns},
};

/// Remembers how the first fragment of datagram `key` was translated.
#[inline(always)]
pub fn remember(key: &FragKey, nat_addr: u32, service_id: u32, backend_id: u32, now: u64) {
    let nat = FragNat {
        nat_addr,
        service_id,
        backend_id,
        pad: 0,
        last_seen_ns: now,
    };
    // A full map evicts the least recently used datagram; its later fragments then go to
    // the kernel (counted unmatched).
    let _ = FRAGS.insert(key, nat, 0);
}

/// IPv6: [`remember`].
#[inline(always)]
pub fn remember6(key: &FragKey6, nat_addr: &Addr6, service_id: u32, backend_id: u32, now: u64) {
    let nat = FragNat6 {
        nat_addr: *nat_addr,
        service_id,
        backend_id,
        last_seen_ns: now,
    };
    let _ = FRAGS6.insert(key, nat, 0);
}

/// The translation of a later fragment of datagram `key`, refreshed and counted forwarded;
/// `None` (counted unmatched) when its first fragment was not seen or too long ago.
#[inline(always)]
pub fn translation<F: Family>(key: &F::FragKey) -> Option<F::FragNat> {
    let now = now_ns(&config());
    let live = match F::frags().get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup; racing writers only touch the timestamp.
        Some(entry) => {
            let last_seen = F::frag_last_seen(unsafe { &mut *entry });
            if now.saturating_sub(*last_seen) <= FRAG_TIMEOUT_NS {
                *last_seen = now;
                // SAFETY: as above.
                Some(unsafe { *entry })
            } else {
                None
            }
        }
        None => None,
    };
    counted(live)
}

/// Counts a later fragment as forwarded or unmatched.
#[inline(always)]
fn counted<T>(nat: Option<T>) -> Option<T> {
    count(if nat.is_some() {
        GlobalStat::FragmentForwarded
    } else {
        GlobalStat::FragmentUnmatched
    });
    nat
}
