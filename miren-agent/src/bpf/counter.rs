//! The packet counter XDP program (`miren_count`): counts every packet and byte per CPU.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
};
use miren_common::counter;

use super::{BpfError, load_object, load_xdp, xdp, xdp_mut};

/// Totals summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketCounts {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, whole frames from the Ethernet header on.
    pub bytes: u64,
}

/// A loaded `miren_count` program; detached from every interface when dropped.
#[derive(Debug)]
pub struct PacketCounter {
    ebpf: Ebpf,
}

impl PacketCounter {
    /// Loads the program and its counter map into the kernel.
    ///
    /// # Errors
    /// [`BpfError`] when the object is missing or the kernel refuses it.
    pub fn load() -> Result<Self, BpfError> {
        let mut ebpf = load_object()?;
        load_xdp(&mut ebpf, counter::PROGRAM)?;
        Ok(Self { ebpf })
    }

    /// Attaches the program to `iface` in the calling thread's network namespace.
    ///
    /// # Errors
    /// [`BpfError::Program`] when the interface does not exist or refuses `mode`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), BpfError> {
        let op = || format!("attaching {} to {iface} in {mode:?} mode", counter::PROGRAM);
        xdp_mut(&mut self.ebpf, counter::PROGRAM)?
            .attach(iface, mode)
            .map(drop)
            .map_err(|source| BpfError::Program { op: op(), source })
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    ///
    /// # Errors
    /// [`BpfError::Missing`] if the object lacks the program.
    pub fn program(&self) -> Result<&Xdp, BpfError> {
        xdp(&self.ebpf, counter::PROGRAM)
    }

    /// The loaded `miren_empty` program (passes everything; a benchmark baseline).
    ///
    /// # Errors
    /// [`BpfError`] if the object lacks it or the kernel refuses it.
    pub fn empty_program(&mut self) -> Result<&Xdp, BpfError> {
        if xdp(&self.ebpf, counter::EMPTY_PROGRAM)?.fd().is_err() {
            load_xdp(&mut self.ebpf, counter::EMPTY_PROGRAM)?;
        }
        xdp(&self.ebpf, counter::EMPTY_PROGRAM)
    }

    /// Reads the counters, summed over all CPUs.
    ///
    /// # Errors
    /// [`BpfError::Map`] when the map cannot be read.
    pub fn counts(&self) -> Result<PacketCounts, BpfError> {
        let map = self.ebpf.map(counter::MAP).ok_or(BpfError::Missing {
            kind: "map",
            name: counter::MAP,
        })?;
        let map_err = |source| BpfError::Map {
            op: format!("reading {}", counter::MAP),
            source,
        };
        let array = PerCpuArray::<_, u64>::try_from(map).map_err(map_err)?;
        let sum = |slot: u32| -> Result<u64, BpfError> {
            Ok(array.get(&slot, 0).map_err(map_err)?.iter().sum())
        };
        Ok(PacketCounts {
            packets: sum(counter::PACKETS)?,
            bytes: sum(counter::BYTES)?,
        })
    }
}
