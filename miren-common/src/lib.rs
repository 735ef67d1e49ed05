//! Types and names shared by the miren eBPF programs (kernel side) and the agent (userspace).
//!
//! Everything here is `no_std`, `repr(C)` with fixed-width integers, so both sides agree on
//! the exact memory layout of map keys and values.
#![no_std]

/// The packet counter XDP program: counts every packet and byte it sees, per CPU.
pub mod counter {
    /// Name of the XDP program in the eBPF object.
    pub const PROGRAM: &str = "miren_count";
    /// Name of the per-CPU array map holding the counters.
    pub const MAP: &str = "MIREN_PKT_COUNT";
    /// Slot holding the number of packets seen.
    pub const PACKETS: u32 = 0;
    /// Slot holding the number of bytes seen (whole frames, from the Ethernet header).
    pub const BYTES: u32 = 1;
    /// Number of slots in [`MAP`].
    pub const SLOTS: u32 = 2;
    /// An XDP program that only returns `XDP_PASS` (benchmark baseline).
    pub const EMPTY_PROGRAM: &str = "miren_empty";
}

pub mod nodeport;
