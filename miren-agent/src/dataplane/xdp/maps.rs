//! The node-port maps as one typed interface, [`NodePortMaps`], and its kernel implementation
//! [`KernelMaps`], which takes each map out of the loaded object once. No other file names a
//! map.
//!
//! Keys and values are the kernel layouts of [`miren_common::nodeport`] (network byte order),
//! except node addresses, which are [`IpAddr`]s (IPv4 ones in `MIREN_NODE_ADDRS`, IPv6 ones in
//! `MIREN_NODE_ADDRS6`), and backend addresses, which are [`BackendSource`]s (in
//! `MIREN_BACKEND_ADDRS` / `MIREN_BACKEND_ADDRS6` by family). Errors are aya's [`MapError`]s, as the kernel
//! reports them; callers say what they were doing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use miren_common::nodeport::{
    self as np, Addr6, Backend, Backend6, BackendAddr, BackendAddr6, BackendStats, Config, Flow,
    Flow6, FlowKey, FlowKey6, GlobalStat, MaglevKey, PortStats, Service, ServiceKey,
};

use super::super::DataplaneError;
use crate::bpf::BpfError;

/// A backend as the source of its packets: IP protocol number and address (either family).
pub(super) type BackendSource = (u8, SocketAddr);

/// An iterator over a map's entries; an entry that cannot be read is an `Err`.
pub(super) type Entries<'a, T> = Box<dyn Iterator<Item = Result<T, MapError>> + 'a>;

/// Typed operations on the node-port maps: what applying snapshots and reading counters needs.
pub(super) trait NodePortMaps: Send + std::fmt::Debug {
    /// Number of service ids (`max_entries` of the per-service arrays).
    fn service_capacity(&self) -> u32;

    /// Number of backend ids (`max_entries` of the per-backend arrays).
    fn backend_capacity(&self) -> u32;

    /// The node's addresses of both families.
    fn node_addrs(&self) -> Entries<'_, IpAddr>;

    /// Adds a node address.
    fn insert_node_addr(&mut self, addr: IpAddr) -> Result<(), MapError>;

    /// Removes a node address; an error if it is not there.
    fn remove_node_addr(&mut self, addr: IpAddr) -> Result<(), MapError>;

    /// Every backend's protocol and address (both families).
    fn backend_addrs(&self) -> Entries<'_, BackendSource>;

    /// Adds a backend address.
    fn insert_backend_addr(&mut self, source: BackendSource) -> Result<(), MapError>;

    /// Removes a backend address; an error if it is not there.
    fn remove_backend_addr(&mut self, source: BackendSource) -> Result<(), MapError>;

    /// The configured node ports.
    fn services(&self) -> Entries<'_, (ServiceKey, Service)>;

    /// Adds or replaces a node port (one atomic map update).
    fn insert_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), MapError>;

    /// Removes a node port; an error if it is not there.
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;

    /// The backend id in one Maglev slot; [`MapError::KeyNotFound`] if the slot is empty.
    fn maglev_slot(&self, key: &MaglevKey) -> Result<u32, MapError>;

    /// Writes one Maglev slot.
    fn insert_maglev_slot(&mut self, key: &MaglevKey, backend_id: u32) -> Result<(), MapError>;

    /// Deletes one Maglev slot; an error if it is not there.
    fn remove_maglev_slot(&mut self, key: &MaglevKey) -> Result<(), MapError>;

    /// The backend with id `id`.
    fn backend(&self, id: u32) -> Result<Backend, MapError>;

    /// Writes the backend with id `id`.
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError>;

    /// The IPv6 twin of backend `id` (all zeroes: none).
    fn backend6(&self, id: u32) -> Result<Backend6, MapError>;

    /// Writes the IPv6 twin of backend `id`.
    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), MapError>;

    /// The IPv6 conntrack entries (forward and reverse).
    fn flows6(&self) -> Entries<'_, (FlowKey6, Flow6)>;

    /// Deletes an IPv6 conntrack entry; an error if it is not there.
    fn remove_flow6(&mut self, key: &FlowKey6) -> Result<(), MapError>;

    /// The counters of backend `id`'s IPv6 twin, one per possible CPU.
    fn backend_stats6(&self, id: u32) -> Result<Vec<BackendStats>, MapError>;

    /// Zeroes the counters of backend `id`'s IPv6 twin on every CPU.
    fn zero_backend_stats6(&mut self, id: u32) -> Result<(), MapError>;

    /// The conntrack entries (forward and reverse).
    fn flows(&self) -> Entries<'_, (FlowKey, Flow)>;

    /// Deletes a conntrack entry; an error if it is not there.
    fn remove_flow(&mut self, key: &FlowKey) -> Result<(), MapError>;

    /// The counters of service `id`'s IPv4 packets, one per possible CPU.
    fn port_stats(&self, id: u32) -> Result<Vec<PortStats>, MapError>;

    /// Zeroes the counters of service `id`'s IPv4 packets on every CPU.
    fn zero_port_stats(&mut self, id: u32) -> Result<(), MapError>;

    /// The counters of service `id`'s IPv6 packets, one per possible CPU.
    fn port_stats6(&self, id: u32) -> Result<Vec<PortStats>, MapError>;

    /// Zeroes the counters of service `id`'s IPv6 packets on every CPU.
    fn zero_port_stats6(&mut self, id: u32) -> Result<(), MapError>;

    /// The counters of backend `id`, one per possible CPU.
    fn backend_stats(&self, id: u32) -> Result<Vec<BackendStats>, MapError>;

    /// Zeroes the counters of backend `id` on every CPU.
    fn zero_backend_stats(&mut self, id: u32) -> Result<(), MapError>;

    /// A global counter, one value per possible CPU.
    fn global_stat(&self, stat: GlobalStat) -> Result<Vec<u64>, MapError>;

    /// Writes the data plane's configuration.
    fn set_config(&mut self, config: &Config) -> Result<(), MapError>;
}

/// The node-port maps of a loaded object, each taken out of it once.
pub(super) struct KernelMaps {
    node_addrs: HashMap<MapData, u32, u32>,
    node_addrs6: HashMap<MapData, Addr6, u32>,
    services: HashMap<MapData, ServiceKey, Service>,
    maglev: HashMap<MapData, MaglevKey, u32>,
    backends: Array<MapData, Backend>,
    backend_addrs: HashMap<MapData, BackendAddr, u32>,
    backend_addrs6: HashMap<MapData, BackendAddr6, u32>,
    conntrack: HashMap<MapData, FlowKey, Flow>,
    backends6: Array<MapData, Backend6>,
    conntrack6: HashMap<MapData, FlowKey6, Flow6>,
    backend_stats6: PerCpuArray<MapData, BackendStats>,
    port_stats: PerCpuArray<MapData, PortStats>,
    port_stats6: PerCpuArray<MapData, PortStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    global_stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    /// Number of possible CPUs (the length of per-CPU values).
    cpus: usize,
}

impl std::fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMaps")
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

impl KernelMaps {
    /// Takes the node-port maps out of `ebpf` (after its programs are loaded).
    ///
    /// # Errors
    /// [`BpfError::Missing`] when the object lacks a map, [`BpfError::Map`] when one has
    /// another type or layout, [`DataplaneError::Io`] when the CPUs cannot be counted.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let cpus = nr_cpus().map_err(|(_, source)| DataplaneError::Io {
            op: "counting possible CPUs".into(),
            source,
        })?;
        Ok(Self {
            node_addrs: take(ebpf, np::NODE_ADDRS_MAP, "the node address map")?,
            node_addrs6: take(ebpf, np::NODE_ADDRS6_MAP, "the IPv6 node address map")?,
            services: take(ebpf, np::SERVICES_MAP, "the service map")?,
            maglev: take(ebpf, np::MAGLEV_MAP, "the Maglev map")?,
            backends: take(ebpf, np::BACKENDS_MAP, "the backend map")?,
            backend_addrs: take(ebpf, np::BACKEND_ADDRS_MAP, "the backend address map")?,
            backend_addrs6: take(ebpf, np::BACKEND_ADDRS6_MAP, "the IPv6 backend address map")?,
            conntrack: take(ebpf, np::CONNTRACK_MAP, "conntrack")?,
            backends6: take(ebpf, np::BACKENDS6_MAP, "the IPv6 backend map")?,
            conntrack6: take(ebpf, np::CONNTRACK6_MAP, "IPv6 conntrack")?,
            backend_stats6: take(ebpf, np::BACKEND_STATS6_MAP, "IPv6 backend stats")?,
            port_stats: take(ebpf, np::PORT_STATS_MAP, "port stats")?,
            port_stats6: take(ebpf, np::PORT_STATS6_MAP, "IPv6 port stats")?,
            backend_stats: take(ebpf, np::BACKEND_STATS_MAP, "backend stats")?,
            global_stats: take(ebpf, np::GLOBAL_STATS_MAP, "global stats")?,
            config: take(ebpf, np::CONFIG_MAP, "the config map")?,
            cpus,
        })
    }

    /// `cpus` default values, to zero a per-CPU slot.
    fn zeros<T: Pod + Default>(&self) -> Result<PerCpuValues<T>, MapError> {
        PerCpuValues::try_from(vec![T::default(); self.cpus]).map_err(MapError::IoError)
    }
}

/// Takes the map `name` out of `ebpf` as a typed map.
fn take<M: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
    what: &str,
) -> Result<M, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(BpfError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|source| {
        DataplaneError::Bpf(BpfError::Map {
            op: format!("opening {what}"),
            source,
        })
    })
}

/// An IPv6 address as the kernel stores it (words in network byte order).
/// A backend as `MIREN_BACKEND_ADDRS` keys it.
fn backend_addr(protocol: u8, addr: SocketAddrV4) -> BackendAddr {
    BackendAddr {
        addr_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
        protocol,
        pad: 0,
    }
}

/// A backend as `MIREN_BACKEND_ADDRS6` keys it.
fn backend_addr6(protocol: u8, addr: SocketAddrV6) -> BackendAddr6 {
    BackendAddr6 {
        addr: addr6(*addr.ip()),
        port_be: addr.port().to_be(),
        protocol,
        pad: 0,
    }
}

pub(super) fn addr6(addr: Ipv6Addr) -> Addr6 {
    let o = addr.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The IPv6 address of a kernel [`Addr6`].
pub(super) fn from_addr6(words: Addr6) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

/// The values of a per-CPU slot.
fn per_cpu<T: Pod>(values: PerCpuValues<T>) -> Vec<T> {
    values.iter().copied().collect()
}

impl NodePortMaps for KernelMaps {
    fn service_capacity(&self) -> u32 {
        np::MAX_SERVICES
    }

    fn backend_capacity(&self) -> u32 {
        np::MAX_BACKENDS
    }

    fn node_addrs(&self) -> Entries<'_, IpAddr> {
        let v4 = self
            .node_addrs
            .keys()
            .map(|key| key.map(|a| IpAddr::from(Ipv4Addr::from(u32::from_be(a)))));
        let v6 = self
            .node_addrs6
            .keys()
            .map(|key| key.map(|a| IpAddr::from(from_addr6(a))));
        Box::new(v4.chain(v6))
    }

    fn insert_node_addr(&mut self, addr: IpAddr) -> Result<(), MapError> {
        match addr {
            IpAddr::V4(v4) => self.node_addrs.insert(u32::from(v4).to_be(), 1, 0),
            IpAddr::V6(v6) => self.node_addrs6.insert(addr6(v6), 1, 0),
        }
    }

    fn remove_node_addr(&mut self, addr: IpAddr) -> Result<(), MapError> {
        match addr {
            IpAddr::V4(v4) => self.node_addrs.remove(&u32::from(v4).to_be()),
            IpAddr::V6(v6) => self.node_addrs6.remove(&addr6(v6)),
        }
    }

    fn backend_addrs(&self) -> Entries<'_, BackendSource> {
        let v4 = self.backend_addrs.keys().map(|key| {
            key.map(|k| {
                let addr = Ipv4Addr::from(u32::from_be(k.addr_be));
                (
                    k.protocol,
                    SocketAddr::from((addr, u16::from_be(k.port_be))),
                )
            })
        });
        let v6 = self.backend_addrs6.keys().map(|key| {
            key.map(|k| {
                let addr = from_addr6(k.addr);
                (
                    k.protocol,
                    SocketAddr::from((addr, u16::from_be(k.port_be))),
                )
            })
        });
        Box::new(v4.chain(v6))
    }

    fn insert_backend_addr(&mut self, (protocol, addr): BackendSource) -> Result<(), MapError> {
        match addr {
            SocketAddr::V4(v4) => self.backend_addrs.insert(backend_addr(protocol, v4), 1, 0),
            SocketAddr::V6(v6) => self
                .backend_addrs6
                .insert(backend_addr6(protocol, v6), 1, 0),
        }
    }

    fn remove_backend_addr(&mut self, (protocol, addr): BackendSource) -> Result<(), MapError> {
        match addr {
            SocketAddr::V4(v4) => self.backend_addrs.remove(&backend_addr(protocol, v4)),
            SocketAddr::V6(v6) => self.backend_addrs6.remove(&backend_addr6(protocol, v6)),
        }
    }

    fn services(&self) -> Entries<'_, (ServiceKey, Service)> {
        Box::new(self.services.iter())
    }

    fn insert_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), MapError> {
        self.services.insert(key, service, 0)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.services.remove(key)
    }

    fn maglev_slot(&self, key: &MaglevKey) -> Result<u32, MapError> {
        self.maglev.get(key, 0)
    }

    fn insert_maglev_slot(&mut self, key: &MaglevKey, backend_id: u32) -> Result<(), MapError> {
        self.maglev.insert(key, backend_id, 0)
    }

    fn remove_maglev_slot(&mut self, key: &MaglevKey) -> Result<(), MapError> {
        self.maglev.remove(key)
    }

    fn backend(&self, id: u32) -> Result<Backend, MapError> {
        self.backends.get(&id, 0)
    }

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError> {
        self.backends.set(id, backend, 0)
    }

    fn backend6(&self, id: u32) -> Result<Backend6, MapError> {
        self.backends6.get(&id, 0)
    }

    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), MapError> {
        self.backends6.set(id, backend, 0)
    }

    fn flows6(&self) -> Entries<'_, (FlowKey6, Flow6)> {
        Box::new(self.conntrack6.iter())
    }

    fn remove_flow6(&mut self, key: &FlowKey6) -> Result<(), MapError> {
        self.conntrack6.remove(key)
    }

    fn backend_stats6(&self, id: u32) -> Result<Vec<BackendStats>, MapError> {
        self.backend_stats6.get(&id, 0).map(per_cpu)
    }

    fn zero_backend_stats6(&mut self, id: u32) -> Result<(), MapError> {
        let zeros = self.zeros()?;
        self.backend_stats6.set(id, zeros, 0)
    }

    fn flows(&self) -> Entries<'_, (FlowKey, Flow)> {
        Box::new(self.conntrack.iter())
    }

    fn remove_flow(&mut self, key: &FlowKey) -> Result<(), MapError> {
        self.conntrack.remove(key)
    }

    fn port_stats(&self, id: u32) -> Result<Vec<PortStats>, MapError> {
        self.port_stats.get(&id, 0).map(per_cpu)
    }

    fn zero_port_stats(&mut self, id: u32) -> Result<(), MapError> {
        let zeros = self.zeros()?;
        self.port_stats.set(id, zeros, 0)
    }

    fn port_stats6(&self, id: u32) -> Result<Vec<PortStats>, MapError> {
        self.port_stats6.get(&id, 0).map(per_cpu)
    }

    fn zero_port_stats6(&mut self, id: u32) -> Result<(), MapError> {
        let zeros = self.zeros()?;
        self.port_stats6.set(id, zeros, 0)
    }

    fn backend_stats(&self, id: u32) -> Result<Vec<BackendStats>, MapError> {
        self.backend_stats.get(&id, 0).map(per_cpu)
    }

    fn zero_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        let zeros = self.zeros()?;
        self.backend_stats.set(id, zeros, 0)
    }

    fn global_stat(&self, stat: GlobalStat) -> Result<Vec<u64>, MapError> {
        self.global_stats.get(&(stat as u32), 0).map(per_cpu)
    }

    fn set_config(&mut self, config: &Config) -> Result<(), MapError> {
        self.config.set(0, config, 0)
    }
}
