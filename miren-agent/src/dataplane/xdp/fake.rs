//! [`FakeMaps`]: the node-port maps in memory, for unit tests of [`super::apply`] without root.
//!
//! It keeps the kernel semantics the logic relies on: a full hash map refuses a new key with
//! `E2BIG`, deleting a missing key fails with `ENOENT`, a missing hash key reads as
//! [`MapError::KeyNotFound`], an array index past `max_entries` is
//! [`MapError::OutOfBounds`], per-CPU slots hold one value per CPU. Every successful write is
//! counted in [`FakeMaps::writes`].

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use aya::{maps::MapError, sys::SyscallError};
use miren_common::nodeport::{
    self as np, Backend, Backend6, BackendStats, Config, Flow, Flow6, FlowKey, FlowKey6,
    GlobalStat, MaglevKey, PortStats, Service, ServiceKey,
};

use super::maps::{BackendSource, Entries, NodePortMaps};

/// `max_entries` of `MIREN_NODE_ADDRS` (and of `MIREN_NODE_ADDRS6`) in the eBPF program.
const MAX_NODE_ADDRS: usize = 256;

/// The node-port maps in memory.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FakeMaps {
    /// `MIREN_NODE_ADDRS` and `MIREN_NODE_ADDRS6`.
    pub(super) node_addrs: BTreeSet<IpAddr>,
    /// `MIREN_BACKEND_ADDRS` and `MIREN_BACKEND_ADDRS6`.
    pub(super) backend_addrs: BTreeSet<BackendSource>,
    /// `MIREN_SERVICES`.
    pub(super) services: HashMap<ServiceKey, Service>,
    /// `MIREN_MAGLEV`.
    pub(super) maglev: HashMap<MaglevKey, u32>,
    /// `MIREN_BACKENDS`, indexed by backend id.
    pub(super) backends: Vec<Backend>,
    /// `MIREN_CT`.
    pub(super) conntrack: HashMap<FlowKey, Flow>,
    /// `MIREN_BACKENDS6`, indexed by backend id.
    pub(super) backends6: Vec<Backend6>,
    /// `MIREN_CT6`.
    pub(super) conntrack6: HashMap<FlowKey6, Flow6>,
    /// `MIREN_BACKEND_STATS6`: `[backend id][cpu]`.
    pub(super) backend_stats6: Vec<Vec<BackendStats>>,
    /// `MIREN_PORT_STATS` (IPv4 packets): `[service id][cpu]`.
    pub(super) port_stats: Vec<Vec<PortStats>>,
    /// `MIREN_PORT_STATS6` (IPv6 packets): `[service id][cpu]`.
    pub(super) port_stats6: Vec<Vec<PortStats>>,
    /// `MIREN_BACKEND_STATS`: `[backend id][cpu]`.
    pub(super) backend_stats: Vec<Vec<BackendStats>>,
    /// `MIREN_GLOBAL_STATS`: `[stat][cpu]`.
    pub(super) global_stats: Vec<Vec<u64>>,
    /// `MIREN_CONFIG`.
    pub(super) config: Config,
    /// Successful writes and deletes so far.
    pub(super) writes: usize,
}

impl FakeMaps {
    /// Empty maps with room for `services` node ports and `backends` backends, on `cpus` CPUs.
    pub(super) fn new(services: u32, backends: u32, cpus: usize) -> Self {
        Self {
            node_addrs: BTreeSet::new(),
            backend_addrs: BTreeSet::new(),
            services: HashMap::new(),
            maglev: HashMap::new(),
            backends: vec![Backend::default(); backends as usize],
            conntrack: HashMap::new(),
            backends6: vec![Backend6::default(); backends as usize],
            conntrack6: HashMap::new(),
            backend_stats6: vec![vec![BackendStats::default(); cpus]; backends as usize],
            port_stats: vec![vec![PortStats::default(); cpus]; services as usize],
            port_stats6: vec![vec![PortStats::default(); cpus]; services as usize],
            backend_stats: vec![vec![BackendStats::default(); cpus]; backends as usize],
            global_stats: vec![vec![0; cpus]; np::GLOBAL_STATS as usize],
            config: Config::default(),
            writes: 0,
        }
    }

    fn wrote<T>(&mut self, result: Result<T, MapError>) -> Result<T, MapError> {
        if result.is_ok() {
            self.writes += 1;
        }
        result
    }
}

/// The error of a failed `bpf()` map command.
fn syscall(call: &'static str, errno: i32) -> MapError {
    MapError::SyscallError(SyscallError {
        call,
        io_error: std::io::Error::from_raw_os_error(errno),
    })
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY` on a hash map of `max_entries`.
fn hash_insert<K: Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    max_entries: usize,
    key: K,
    value: V,
) -> Result<(), MapError> {
    if !map.contains_key(&key) && map.len() >= max_entries {
        return Err(syscall("bpf_map_update_elem", libc::E2BIG));
    }
    map.insert(key, value);
    Ok(())
}

/// [`hash_insert`] for a set standing for two hash maps of `max_entries` each, one per address
/// family (`is_ipv4` says which an entry is in).
fn insert_per_family<K: Ord>(
    set: &mut BTreeSet<K>,
    key: K,
    max_entries: usize,
    is_ipv4: impl Fn(&K) -> bool,
) -> Result<(), MapError> {
    let same_family = set.iter().filter(|k| is_ipv4(k) == is_ipv4(&key)).count();
    if !set.contains(&key) && same_family >= max_entries {
        return Err(syscall("bpf_map_update_elem", libc::E2BIG));
    }
    set.insert(key);
    Ok(())
}

/// `BPF_MAP_DELETE_ELEM`.
fn deleted(found: bool) -> Result<(), MapError> {
    if found {
        Ok(())
    } else {
        Err(syscall("bpf_map_delete_elem", libc::ENOENT))
    }
}

/// Slot `index` of an array map.
fn slot<T>(array: &[T], index: u32) -> Result<&T, MapError> {
    array.get(index as usize).ok_or(MapError::OutOfBounds {
        index,
        max_entries: array.len() as u32,
    })
}

/// Slot `index` of an array map, mutably.
fn slot_mut<T>(array: &mut [T], index: u32) -> Result<&mut T, MapError> {
    let max_entries = array.len() as u32;
    array
        .get_mut(index as usize)
        .ok_or(MapError::OutOfBounds { index, max_entries })
}

/// Entries of a map as `Ok`s.
fn entries<'a, T: 'a>(items: impl Iterator<Item = T> + 'a) -> Entries<'a, T> {
    Box::new(items.map(Ok))
}

impl NodePortMaps for FakeMaps {
    fn service_capacity(&self) -> u32 {
        self.port_stats.len() as u32
    }

    fn backend_capacity(&self) -> u32 {
        self.backends.len() as u32
    }

    fn node_addrs(&self) -> Entries<'_, IpAddr> {
        entries(self.node_addrs.iter().copied())
    }

    fn insert_node_addr(&mut self, addr: IpAddr) -> Result<(), MapError> {
        let result = insert_per_family(&mut self.node_addrs, addr, MAX_NODE_ADDRS, IpAddr::is_ipv4);
        self.wrote(result)
    }

    fn remove_node_addr(&mut self, addr: IpAddr) -> Result<(), MapError> {
        let result = deleted(self.node_addrs.remove(&addr));
        self.wrote(result)
    }

    fn backend_addrs(&self) -> Entries<'_, BackendSource> {
        entries(self.backend_addrs.iter().copied())
    }

    fn insert_backend_addr(&mut self, source: BackendSource) -> Result<(), MapError> {
        let max_entries = self.backend_capacity() as usize;
        let result = insert_per_family(&mut self.backend_addrs, source, max_entries, |(_, a)| {
            a.is_ipv4()
        });
        self.wrote(result)
    }

    fn remove_backend_addr(&mut self, source: BackendSource) -> Result<(), MapError> {
        let result = deleted(self.backend_addrs.remove(&source));
        self.wrote(result)
    }

    fn services(&self) -> Entries<'_, (ServiceKey, Service)> {
        entries(self.services.iter().map(|(k, v)| (*k, *v)))
    }

    fn insert_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), MapError> {
        let max_entries = self.service_capacity() as usize;
        let result = hash_insert(&mut self.services, max_entries, *key, *service);
        self.wrote(result)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        let result = deleted(self.services.remove(key).is_some());
        self.wrote(result)
    }

    fn maglev_slot(&self, key: &MaglevKey) -> Result<u32, MapError> {
        self.maglev.get(key).copied().ok_or(MapError::KeyNotFound)
    }

    fn insert_maglev_slot(&mut self, key: &MaglevKey, backend_id: u32) -> Result<(), MapError> {
        let result = hash_insert(
            &mut self.maglev,
            np::MAGLEV_ENTRIES as usize,
            *key,
            backend_id,
        );
        self.wrote(result)
    }

    fn remove_maglev_slot(&mut self, key: &MaglevKey) -> Result<(), MapError> {
        let result = deleted(self.maglev.remove(key).is_some());
        self.wrote(result)
    }

    fn backend(&self, id: u32) -> Result<Backend, MapError> {
        slot(&self.backends, id).copied()
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError> {
        let result = slot_mut(&mut self.backends, id).map(|slot| *slot = *backend);
        self.wrote(result)
    }

    fn backend6(&self, id: u32) -> Result<Backend6, MapError> {
        slot(&self.backends6, id).copied()
    }

    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), MapError> {
        let result = slot_mut(&mut self.backends6, id).map(|slot| *slot = *backend);
        self.wrote(result)
    }

    fn flows6(&self) -> Entries<'_, (FlowKey6, Flow6)> {
        entries(self.conntrack6.iter().map(|(k, v)| (*k, *v)))
    }

    fn remove_flow6(&mut self, key: &FlowKey6) -> Result<(), MapError> {
        let result = deleted(self.conntrack6.remove(key).is_some());
        self.wrote(result)
    }

    fn backend_stats6(&self, id: u32) -> Result<Vec<BackendStats>, MapError> {
        slot(&self.backend_stats6, id).cloned()
    }

    fn zero_backend_stats6(&mut self, id: u32) -> Result<(), MapError> {
        let result =
            slot_mut(&mut self.backend_stats6, id).map(|cpus| cpus.fill(BackendStats::default()));
        self.wrote(result)
    }

    fn flows(&self) -> Entries<'_, (FlowKey, Flow)> {
        entries(self.conntrack.iter().map(|(k, v)| (*k, *v)))
    }

    fn remove_flow(&mut self, key: &FlowKey) -> Result<(), MapError> {
        let result = deleted(self.conntrack.remove(key).is_some());
        self.wrote(result)
    }

    fn port_stats(&self, id: u32) -> Result<Vec<PortStats>, MapError> {
        slot(&self.port_stats, id).cloned()
    }

    fn zero_port_stats(&mut self, id: u32) -> Result<(), MapError> {
        let result = slot_mut(&mut self.port_stats, id).map(|cpus| cpus.fill(PortStats::default()));
        self.wrote(result)
    }

    fn port_stats6(&self, id: u32) -> Result<Vec<PortStats>, MapError> {
        slot(&self.port_stats6, id).cloned()
    }

    fn zero_port_stats6(&mut self, id: u32) -> Result<(), MapError> {
        let result =
            slot_mut(&mut self.port_stats6, id).map(|cpus| cpus.fill(PortStats::default()));
        self.wrote(result)
    }

    fn backend_stats(&self, id: u32) -> Result<Vec<BackendStats>, MapError> {
        slot(&self.backend_stats, id).cloned()
    }

    fn zero_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        let result =
            slot_mut(&mut self.backend_stats, id).map(|cpus| cpus.fill(BackendStats::default()));
        self.wrote(result)
    }

    fn global_stat(&self, stat: GlobalStat) -> Result<Vec<u64>, MapError> {
        slot(&self.global_stats, stat as u32).cloned()
    }

    fn set_config(&mut self, config: &Config) -> Result<(), MapError> {
        self.config = *config;
        self.wrote(Ok(()))
    }
}
