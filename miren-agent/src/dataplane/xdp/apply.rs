//! [`NodePorts`]: the userspace view of the node-port maps and the logic that brings them in
//! line with a [`Snapshot`] (id allocation, Maglev generations, conntrack cleanup) and reads
//! their counters, over any [`NodePortMaps`] — the kernel's, or an in-memory fake in tests.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use aya::maps::MapError;
use miren_common::nodeport::{
    self as np, Backend, Backend6, Config, GlobalStat, MaglevKey, Service, ServiceKey,
};

use super::{
    super::{
        BackendCounters, Counters, DataplaneError, Family, GlobalCounters, NodePortKey,
        PortCounters, Snapshot, maglev,
    },
    maps::{BackendSource, NodePortMaps},
};
use crate::{bpf::BpfError, config::Protocol};

/// Time allowed for packets that read an old Maglev generation before it is deleted.
const GENERATION_GRACE: Duration = Duration::from_millis(2);

/// The state of one node port as written to the kernel.
#[derive(Debug, Default)]
struct ServiceState {
    id: u32,
    generation: u32,
    table: Vec<u32>,
    backends: BTreeMap<SocketAddrV4, u32>,
    /// Backend id → its IPv6 twin, as `MIREN_BACKENDS6` holds it.
    twins: BTreeMap<u32, SocketAddrV6>,
    /// Whether `MIREN_SERVICES` holds its entry (not yet when it did not fit).
    written: bool,
}

impl ServiceState {
    /// The keys of its Maglev table as written.
    fn slots(&self) -> impl Iterator<Item = MaglevKey> + use<> {
        let (id, generation) = (self.id, self.generation);
        (0..self.table.len() as u32).map(move |i| MaglevKey::new(id, generation, i))
    }
}

/// Hands out small integer ids, reusing freed ones.
#[derive(Debug)]
struct Ids {
    next: u32,
    free: Vec<u32>,
    max: u32,
}

impl Ids {
    fn new(max: u32) -> Self {
        Self {
            next: 0,
            free: Vec::new(),
            max,
        }
    }

    fn take(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < self.max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }

    /// An id for a node port, or [`DataplaneError::Capacity`] for it when all `what` are
    /// taken.
    fn take_for(&mut self, port: NodePortKey, what: &str) -> Result<u32, DataplaneError> {
        let max = self.max;
        self.take().ok_or_else(|| DataplaneError::Capacity {
            port,
            limit: format!("more than {max} {what}"),
        })
    }

    fn give_back(&mut self, id: u32) {
        self.free.push(id);
    }

    /// An allocator where `used` are taken already.
    fn with_used(max: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(0, |last| last + 1);
        let free = (0..next).rev().filter(|id| !used.contains(id)).collect();
        Self { next, free, max }
    }
}

/// The node-port maps `M` with what userspace believes they hold.
#[derive(Debug)]
pub(super) struct NodePorts<M> {
    maps: M,
    /// The node's addresses of both families.
    node_addrs: BTreeSet<IpAddr>,
    /// Every backend's protocol and address, as `MIREN_BACKEND_ADDRS(6)` hold them.
    backend_addrs: BTreeSet<BackendSource>,
    services: BTreeMap<NodePortKey, ServiceState>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Ids of removed TCP backends still referenced by established flows.
    draining_backends: BTreeSet<u32>,
    config: Config,
}

fn map_err(op: impl Into<String>) -> impl FnOnce(MapError) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Bpf(BpfError::Map { op, source })
}

impl<M: NodePortMaps> NodePorts<M> {
    /// Takes over `maps`, adopting what they hold, and writes `config`.
    ///
    /// # Errors
    /// When the maps cannot be read or the config cannot be written.
    pub(super) fn open(maps: M, config: Config) -> Result<Self, DataplaneError> {
        let mut ports = Self {
            service_ids: Ids::new(maps.service_capacity()),
            backend_ids: Ids::new(maps.backend_capacity()),
            maps,
            node_addrs: BTreeSet::new(),
            backend_addrs: BTreeSet::new(),
            services: BTreeMap::new(),
            draining_backends: BTreeSet::new(),
            config,
        };
        ports.adopt()?;
        ports.write_config()?;
        Ok(ports)
    }

    /// The maps.
    #[cfg(test)]
    pub(super) fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, mutably (tests change them behind the logic's back).
    #[cfg(test)]
    pub(super) fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Changes the configuration and writes it.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub(super) fn configure(
        &mut self,
        change: impl FnOnce(&mut Config),
    ) -> Result<(), DataplaneError> {
        change(&mut self.config);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        self.maps
            .set_config(&self.config)
            .map_err(map_err("writing the config map"))
    }

    /// Rebuilds the userspace view (addresses, node ports, ids, tables) from maps that already
    /// hold state (pinned by an earlier agent). Empty maps leave it empty.
    ///
    /// # Errors
    /// When a node port's table or backends cannot be read.
    pub(super) fn adopt(&mut self) -> Result<(), DataplaneError> {
        self.node_addrs = self.maps.node_addrs().filter_map(Result::ok).collect();
        self.backend_addrs = self.maps.backend_addrs().filter_map(Result::ok).collect();
        let mut adopted = BTreeMap::new();
        for entry in self.maps.services() {
            let (key, service) = entry.map_err(map_err("reading the service map"))?;
            let protocol = match key.protocol {
                np::PROTO_TCP => Protocol::Tcp,
                _ => Protocol::Udp,
            };
            let mut state = ServiceState {
                id: service.id,
                generation: service.generation,
                written: true,
                ..ServiceState::default()
            };
            for index in 0..service.table_size {
                let id = self
                    .maps
                    .maglev_slot(&MaglevKey::new(service.id, service.generation, index))
                    .map_err(map_err("reading an adopted Maglev table"))?;
                let backend = self
                    .maps
                    .backend(id)
                    .map_err(map_err("reading an adopted backend"))?;
                let addr = SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(backend.addr_be)),
                    u16::from_be(backend.port_be),
                );
                state.backends.insert(addr, id);
                if let Some(twin) = self.maps.backend6(id).ok().and_then(from_backend6) {
                    state.twins.insert(id, twin);
                }
                state.table.push(id);
            }
            adopted.insert(
                NodePortKey {
                    port: u16::from_be(key.port_be),
                    protocol,
                },
                state,
            );
        }
        let service_ids: BTreeSet<u32> = adopted.values().map(|s| s.id).collect();
        let backend_ids: BTreeSet<u32> = adopted
            .values()
            .flat_map(|s| s.backends.values().copied())
            .collect();
        // Flows of backends removed before the restart still hold their ids.
        self.draining_backends = self
            .referenced_backends()
            .difference(&backend_ids)
            .copied()
            .collect();
        let used = backend_ids
            .union(&self.draining_backends)
            .copied()
            .collect();
        self.service_ids = Ids::with_used(self.maps.service_capacity(), &service_ids);
        self.backend_ids = Ids::with_used(self.maps.backend_capacity(), &used);
        if !adopted.is_empty() {
            tracing::info!(
                node_ports = adopted.len(),
                backends = backend_ids.len(),
                "adopted pinned data plane state"
            );
        }
        self.services = adopted;
        Ok(())
    }

    fn apply_node_addrs(&mut self, wanted: &[IpAddr]) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<IpAddr> = wanted.iter().copied().collect();
        let current = std::mem::take(&mut self.node_addrs);
        for addr in wanted.difference(&current) {
            self.maps
                .insert_node_addr(*addr)
                .map_err(map_err(format!("adding node address {addr}")))?;
        }
        for addr in current.difference(&wanted) {
            self.maps
                .remove_node_addr(*addr)
                .map_err(map_err(format!("removing node address {addr}")))?;
        }
        self.node_addrs = wanted;
        Ok(())
    }

    /// Makes `MIREN_BACKEND_ADDRS(6)` hold exactly the backends of `snapshot`.
    fn apply_backend_addrs(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<BackendSource> = snapshot
            .node_ports
            .iter()
            .flat_map(|(key, endpoints)| {
                let protocol = protocol_number(key.protocol);
                endpoints.iter().map(move |endpoint| (protocol, *endpoint))
            })
            .collect();
        let current = std::mem::take(&mut self.backend_addrs);
        for source in wanted.difference(&current) {
            self.maps
                .insert_backend_addr(*source)
                .map_err(map_err(format!("adding backend address {}", source.1)))?;
        }
        for source in current.difference(&wanted) {
            self.maps
                .remove_backend_addr(*source)
                .map_err(map_err(format!("removing backend address {}", source.1)))?;
        }
        self.backend_addrs = wanted;
        Ok(())
    }

    /// Makes the maps match `snapshot`, writing only what changed.
    ///
    /// # Errors
    /// [`DataplaneError::Capacity`] when a node port does not fit (the node ports before it
    /// are applied); [`DataplaneError::Bpf`] when a map refuses a change.
    pub(super) fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        self.apply_node_addrs(&snapshot.node_addrs)?;
        self.apply_backend_addrs(snapshot)?;
        let mut retired: Vec<MaglevKey> = Vec::new();
        let mut dead_backends: HashSet<u32> = HashSet::new();
        let mut dead_services: HashSet<u32> = HashSet::new();

        let removed: Vec<NodePortKey> = self
            .services
            .keys()
            .filter(|k| !snapshot.node_ports.contains_key(k))
            .copied()
            .collect();
        for key in removed {
            let Some(state) = self.services.remove(&key) else {
                continue;
            };
            // A node port that did not fit was never written.
            if state.written {
                self.maps
                    .remove_service(&service_key(key))
                    .map_err(map_err(format!(
                        "removing node port {}/{}",
                        key.port, key.protocol
                    )))?;
            }
            retired.extend(state.slots());
            for id in state.backends.values() {
                dead_backends.insert(*id);
                self.backend_ids.give_back(*id);
            }
            dead_services.insert(state.id);
            self.service_ids.give_back(state.id);
        }

        // A node port that does not fit stops the loop, but what was removed is still
        // cleaned up, so no freed id keeps old slots or flows.
        let mut result = Ok(());
        for (key, endpoints) in &snapshot.node_ports {
            let endpoints = with_twins(*key, endpoints);
            result = self.apply_node_port(*key, &endpoints, &mut retired, &mut dead_backends);
            if result.is_err() {
                break;
            }
        }

        self.keep_reused_slots(&mut retired, &dead_services);
        if !retired.is_empty() {
            std::thread::sleep(GENERATION_GRACE);
            for key in retired {
                let _ = self.maps.remove_maglev_slot(&key);
            }
        }
        if !dead_backends.is_empty() || !dead_services.is_empty() {
            self.forget_flows(&dead_backends, &dead_services);
        }
        self.release_drained_backends();
        result
    }

    /// Applies one node port of the snapshot, taking an id for it if it is new.
    fn apply_node_port(
        &mut self,
        key: NodePortKey,
        endpoints: &BTreeMap<SocketAddrV4, Option<SocketAddrV6>>,
        retired: &mut Vec<MaglevKey>,
        dead_backends: &mut HashSet<u32>,
    ) -> Result<(), DataplaneError> {
        let mut state = match self.services.remove(&key) {
            Some(state) => state,
            None => {
                let id = self.service_ids.take_for(key, "node ports")?;
                self.maps
                    .zero_port_stats(id)
                    .and_then(|()| self.maps.zero_port_stats6(id))
                    .map_err(map_err(format!("zeroing port stats[{id}]")))?;
                ServiceState {
                    id,
                    ..ServiceState::default()
                }
            }
        };
        let result = self.apply_service(key, &mut state, endpoints, retired, dead_backends);
        // Kept even when unwritten: it holds its ids until applied or removed.
        self.services.insert(key, state);
        result
    }

    /// Takes out of `retired` the slots of a removed node port whose id went to a new one in
    /// the same apply: they hold the new table now.
    fn keep_reused_slots(&self, retired: &mut Vec<MaglevKey>, removed: &HashSet<u32>) {
        let reused: BTreeMap<u32, (u32, usize)> = self
            .services
            .values()
            .filter(|state| state.written && removed.contains(&state.id))
            .map(|state| (state.id, (state.generation, state.table.len())))
            .collect();
        if reused.is_empty() {
            return;
        }
        retired.retain(|key| {
            let (generation, index) = (key.slot >> 31, key.slot & !(1 << 31));
            reused
                .get(&key.service_id)
                .is_none_or(|(live, len)| *live != generation || index as usize >= *len)
        });
    }

    /// Reads the counters of every node port and backend, and the global ones, summed over
    /// CPUs.
    ///
    /// # Errors
    /// When a stats map cannot be read.
    pub(super) fn counters(&self) -> Result<Counters, DataplaneError> {
        let mut counters = Counters::default();
        for (key, state) in &self.services {
            for (family, per_cpu) in [
                (Family::V4, self.maps.port_stats(state.id)),
                (Family::V6, self.maps.port_stats6(state.id)),
            ] {
                let per_cpu = per_cpu.map_err(map_err(format!(
                    "reading the {} port stats of {key}",
                    family.label()
                )))?;
                let mut sum = PortCounters::default();
                per_cpu.iter().for_each(|cpu| sum.add(cpu));
                counters.insert_port(*key, family, sum);
            }
            for (addr, id) in &state.backends {
                let per_cpu = self
                    .maps
                    .backend_stats(*id)
                    .map_err(map_err("reading backend stats"))?;
                let mut sum = BackendCounters::default();
                per_cpu.iter().for_each(|cpu| sum.add(cpu));
                counters.backends.insert((*key, *addr), sum);
            }
            for (id, twin) in &state.twins {
                let per_cpu = self
                    .maps
                    .backend_stats6(*id)
                    .map_err(map_err("reading IPv6 backend stats"))?;
                let mut sum = BackendCounters::default();
                per_cpu.iter().for_each(|cpu| sum.add(cpu));
                counters.backends6.insert((*key, *twin), sum);
            }
        }
        let read = |stat: GlobalStat| -> Result<u64, DataplaneError> {
            match self.maps.global_stat(stat) {
                Ok(per_cpu) => Ok(per_cpu.iter().sum()),
                // A global stats map pinned by an earlier agent, before this stat existed: the
                // kernel side cannot count it either until the pins are made again.
                Err(MapError::OutOfBounds { .. }) => Ok(0),
                Err(err) => Err(map_err("reading global stats")(err)),
            }
        };
        counters.global = GlobalCounters {
            passed: read(GlobalStat::Passed)?,
            malformed: read(GlobalStat::Malformed)?,
            conntrack_hits: read(GlobalStat::ConntrackHit)?,
            conntrack_misses: read(GlobalStat::ConntrackMiss)?,
            tcp_non_syn_misses: read(GlobalStat::TcpNonSynMiss)?,
            fragments_forwarded: read(GlobalStat::FragmentForwarded)?,
            fragments_unmatched: read(GlobalStat::FragmentUnmatched)?,
            icmp_to_instance: read(GlobalStat::IcmpToInstance)?,
            icmp_from_instance: read(GlobalStat::IcmpFromInstance)?,
        };
        Ok(counters)
    }

    /// Brings one node port's backends and Maglev table in line with `endpoints`.
    fn apply_service(
        &mut self,
        key: NodePortKey,
        state: &mut ServiceState,
        endpoints: &BTreeMap<SocketAddrV4, Option<SocketAddrV6>>,
        retired: &mut Vec<MaglevKey>,
        dead_backends: &mut HashSet<u32>,
    ) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<SocketAddrV4> = endpoints.keys().copied().collect();
        let gone: Vec<SocketAddrV4> = state
            .backends
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(id) = state.backends.remove(&addr) {
                state.twins.remove(&id);
                // Only UDP sessions move to live endpoints; TCP connections to a removed
                // backend keep their entry until they end.
                // Their id is held back while conntrack still refers to it, so a new backend
                // never inherits their packets in its counters.
                if key.protocol == Protocol::Udp {
                    dead_backends.insert(id);
                    self.backend_ids.give_back(id);
                } else {
                    self.draining_backends.insert(id);
                }
            }
        }
        for addr in &wanted {
            if state.backends.contains_key(addr) {
                continue;
            }
            let id = self.backend_ids.take_for(key, "backends")?;
            self.maps
                .zero_backend_stats(id)
                .and_then(|()| self.maps.zero_backend_stats6(id))
                .map_err(map_err(format!("zeroing backend stats[{id}]")))?;
            // The id's previous holder may have left its twin.
            self.maps
                .set_backend6(id, &Backend6::default())
                .map_err(map_err(format!("clearing the IPv6 twin of backend {id}")))?;
            self.maps
                .set_backend(id, &backend_value(*addr))
                .map_err(map_err(format!("writing backend {addr}")))?;
            state.backends.insert(*addr, id);
        }

        for (addr, twin) in endpoints {
            let id = state.backends[addr];
            if state.twins.get(&id) == twin.as_ref() {
                continue;
            }
            let value = twin.map(backend6_value).unwrap_or_default();
            self.maps
                .set_backend6(id, &value)
                .map_err(map_err(format!("writing the IPv6 twin of backend {addr}")))?;
            match twin {
                Some(twin) => state.twins.insert(id, *twin),
                None => state.twins.remove(&id),
            };
        }

        let ids: Vec<u32> = state.backends.values().copied().collect();
        let table = maglev::build(&ids, maglev::table_size(ids.len()));
        if table == state.table && state.written {
            return Ok(());
        }
        let generation = if state.table.is_empty() {
            state.generation
        } else {
            1 - state.generation
        };
        for (index, backend) in table.iter().enumerate() {
            self.maps
                .insert_maglev_slot(
                    &MaglevKey::new(state.id, generation, index as u32),
                    *backend,
                )
                .map_err(map_err(format!(
                    "writing the Maglev table of {}/{}",
                    key.port, key.protocol
                )))?;
        }
        let service = Service {
            id: state.id,
            table_size: table.len() as u32,
            generation,
            backends: ids.len() as u32,
        };
        self.maps
            .insert_service(&service_key(key), &service)
            .map_err(map_err(format!(
                "writing node port {}/{}",
                key.port, key.protocol
            )))?;
        retired.extend(state.slots());
        state.written = true;
        state.generation = generation;
        state.table = table;
        Ok(())
    }

    /// The backend ids conntrack entries refer to.
    fn referenced_backends(&self) -> BTreeSet<u32> {
        let v4 = self
            .maps
            .flows()
            .filter_map(Result::ok)
            .map(|(_, flow)| flow.backend_id);
        let v6 = self
            .maps
            .flows6()
            .filter_map(Result::ok)
            .map(|(_, flow)| flow.backend_id);
        v4.chain(v6).collect()
    }

    /// Gives back the ids of removed TCP backends that no conntrack entry refers to anymore.
    fn release_drained_backends(&mut self) {
        if self.draining_backends.is_empty() {
            return;
        }
        let referenced = self.referenced_backends();
        let drained: Vec<u32> = self
            .draining_backends
            .iter()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in drained {
            self.draining_backends.remove(&id);
            self.backend_ids.give_back(id);
        }
    }

    /// Deletes conntrack entries of removed backends and node ports.
    fn forget_flows(&mut self, backends: &HashSet<u32>, services: &HashSet<u32>) {
        let stale: Vec<_> = self
            .maps
            .flows()
            .filter_map(Result::ok)
            .filter(|(_, flow)| {
                backends.contains(&flow.backend_id) || services.contains(&flow.service_id)
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = self.maps.remove_flow(&key);
        }
        let stale6: Vec<_> = self
            .maps
            .flows6()
            .filter_map(Result::ok)
            .filter(|(_, flow)| {
                backends.contains(&flow.backend_id) || services.contains(&flow.service_id)
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale6 {
            let _ = self.maps.remove_flow6(&key);
        }
    }
}

/// The IP protocol number of `protocol`.
fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => np::PROTO_TCP,
        Protocol::Udp => np::PROTO_UDP,
    }
}

/// The `MIREN_SERVICES` key of a node port.
fn service_key(key: NodePortKey) -> ServiceKey {
    ServiceKey {
        port_be: key.port.to_be(),
        protocol: protocol_number(key.protocol),
        pad: 0,
    }
}

/// A node port's IPv4 endpoints, each with its IPv6 twin. The snapshot lists an instance's
/// IPv4 endpoint and its IPv6 twin in the same position of each family; when the families
/// do not pair up (other counts or ports), no endpoint gets a twin (IPv6 clients of the node
/// port are dropped, counted as no backend) and a warning says so.
fn with_twins(
    key: NodePortKey,
    endpoints: &[SocketAddr],
) -> BTreeMap<SocketAddrV4, Option<SocketAddrV6>> {
    let v4: Vec<SocketAddrV4> = endpoints
        .iter()
        .filter_map(|e| match e {
            SocketAddr::V4(v4) => Some(*v4),
            SocketAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<SocketAddrV6> = endpoints
        .iter()
        .filter_map(|e| match e {
            SocketAddr::V6(v6) => Some(*v6),
            SocketAddr::V4(_) => None,
        })
        .collect();
    let paired = v4.len() == v6.len() && v4.iter().zip(&v6).all(|(a, b)| a.port() == b.port());
    if !paired && !v6.is_empty() {
        tracing::warn!(node_port = %key, ipv4 = v4.len(), ipv6 = v6.len(),
            "IPv4 and IPv6 endpoints do not pair up; IPv6 clients of this node port are dropped");
    }
    v4.iter()
        .enumerate()
        .map(|(i, addr)| (*addr, v6.get(i).copied().filter(|_| paired)))
        .collect()
}

fn backend6_value(addr: SocketAddrV6) -> Backend6 {
    Backend6 {
        addr: super::maps::addr6(*addr.ip()),
        port_be: addr.port().to_be(),
        pad: 0,
    }
}

/// The IPv6 twin a `MIREN_BACKENDS6` entry holds; `None` when empty.
fn from_backend6(backend: Backend6) -> Option<SocketAddrV6> {
    (backend.addr != [0; 4]).then(|| {
        let ip = super::maps::from_addr6(backend.addr);
        SocketAddrV6::new(ip, u16::from_be(backend.port_be), 0, 0)
    })
}

fn backend_value(addr: SocketAddrV4) -> Backend {
    Backend {
        addr_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
        pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use miren_common::nodeport::{BackendStats, Flow, Flow6, FlowKey, FlowKey6, PortStats};

    use super::{super::fake::FakeMaps, *};
    use crate::dataplane::Snapshot4;
    use crate::{dataplane::Dataplane, reconcile};

    const CPUS: usize = 3;

    fn tcp(port: u16) -> NodePortKey {
        NodePortKey {
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn udp(port: u16) -> NodePortKey {
        NodePortKey {
            port,
            protocol: Protocol::Udp,
        }
    }

    /// Endpoint `10.1.0.last:8080`.
    fn ep(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, last), 8080)
    }

    fn snapshot(ports: &[(NodePortKey, &[SocketAddrV4])]) -> Snapshot {
        Snapshot4 {
            node_addrs: vec![Ipv4Addr::new(192, 0, 2, 1)],
            node_ports: ports.iter().map(|(k, e)| (*k, e.to_vec())).collect(),
        }
        .into()
    }

    fn open(services: u32, backends: u32) -> NodePorts<FakeMaps> {
        NodePorts::open(FakeMaps::new(services, backends, CPUS), Config::default()).unwrap()
    }

    /// The kernel's entry for `key`: service id and active table as backend addresses (what
    /// the XDP program would pick from).
    fn lookup(maps: &FakeMaps, key: NodePortKey) -> Option<(u32, Vec<SocketAddrV4>)> {
        let service = maps.services.get(&service_key(key))?;
        let table = (0..service.table_size)
            .map(|i| {
                let id = maps.maglev[&MaglevKey::new(service.id, service.generation, i)];
                let backend = maps.backends[id as usize];
                SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(backend.addr_be)),
                    u16::from_be(backend.port_be),
                )
            })
            .collect();
        Some((service.id, table))
    }

    /// The backend id the kernel holds for `addr` in `key`'s active table.
    fn backend_id(maps: &FakeMaps, key: NodePortKey, addr: SocketAddrV4) -> Option<u32> {
        let service = maps.services.get(&service_key(key))?;
        (0..service.table_size)
            .map(|i| maps.maglev[&MaglevKey::new(service.id, service.generation, i)])
            .find(|id| maps.backends[*id as usize] == backend_value(addr))
    }

    /// A forward conntrack entry of a client of `key` pinned to `backend_id`.
    fn add_flow(maps: &mut FakeMaps, key: NodePortKey, client_port: u16, backend_id: u32) {
        let service_id = maps.services[&service_key(key)].id;
        maps.conntrack.insert(
            FlowKey {
                src_addr: u32::from(Ipv4Addr::new(198, 51, 100, 7)).to_be(),
                dst_addr: u32::from(Ipv4Addr::new(192, 0, 2, 1)).to_be(),
                src_port: client_port.to_be(),
                dst_port: key.port.to_be(),
                protocol: protocol_number(key.protocol),
                pad: [0; 3],
            },
            Flow {
                nat_addr: 0,
                nat_port: 0,
                flags: 0,
                service_id,
                backend_id,
                last_seen_ns: 0,
            },
        );
    }

    fn flow_backends(maps: &FakeMaps) -> BTreeSet<u32> {
        maps.conntrack.values().map(|f| f.backend_id).collect()
    }

    #[test]
    fn ids_are_reused_and_bounded() {
        let mut ids = Ids::new(2);
        assert_eq!(
            (ids.take(), ids.take(), ids.take()),
            (Some(0), Some(1), None)
        );
        ids.give_back(0);
        assert_eq!(ids.take(), Some(0));
    }

    #[test]
    fn applying_the_same_snapshot_twice_writes_nothing() {
        let mut ports = open(8, 16);
        let snap = snapshot(&[
            (tcp(7000), &[ep(1), ep(2)]),
            (udp(7000), &[ep(3)]),
            (tcp(7001), &[]),
        ]);
        ports.apply(&snap).unwrap();
        let before = ports.maps().clone();
        ports.apply(&snap).unwrap();
        assert!(
            *ports.maps() == before,
            "the second apply changed the maps ({} writes)",
            ports.maps().writes - before.writes
        );
        // A restarted agent adopting the maps writes nothing either (besides its config).
        let mut adopted = NodePorts::open(before.clone(), Config::default()).unwrap();
        let config_writes = adopted.maps().writes;
        adopted.apply(&snap).unwrap();
        assert_eq!(adopted.maps().writes, config_writes);
        assert_eq!(adopted.counters().unwrap(), ports.counters().unwrap());
    }

    #[test]
    fn a_removed_node_port_frees_its_service_and_backend_ids() {
        let mut ports = open(2, 4);
        let full = snapshot(&[(tcp(7000), &[ep(1), ep(2)]), (udp(7001), &[ep(3)])]);
        ports.apply(&full).unwrap();
        let (udp_id, _) = lookup(ports.maps(), udp(7001)).unwrap();
        let udp_backend = backend_id(ports.maps(), udp(7001), ep(3)).unwrap();
        add_flow(ports.maps_mut(), udp(7001), 40000, udp_backend);
        // Counts of the port that goes, in both families: not inherited by the next holder.
        ports.maps_mut().port_stats[udp_id as usize][0].rx_packets = 9;
        ports.maps_mut().port_stats6[udp_id as usize][0].rx_packets = 9;
        let tables = ports.maps().maglev.len();

        // No room for another node port.
        let more = snapshot(&[
            (tcp(7000), &[ep(1), ep(2)]),
            (udp(7001), &[ep(3)]),
            (udp(7002), &[ep(3)]),
        ]);
        assert!(matches!(
            ports.apply(&more),
            Err(DataplaneError::Capacity { port, .. }) if port == udp(7002)
        ));

        ports
            .apply(&snapshot(&[(tcp(7000), &[ep(1), ep(2)])]))
            .unwrap();
        let replaced = snapshot(&[(tcp(7000), &[ep(1), ep(2)]), (udp(7002), &[ep(4)])]);
        ports.apply(&replaced).unwrap();
        let maps = ports.maps();
        assert!(!maps.services.contains_key(&service_key(udp(7001))));
        assert!(maps.conntrack.is_empty(), "flows of the removed port");
        assert_eq!(maps.maglev.len(), tables, "the old table is deleted");
        let (new_id, table) = lookup(maps, udp(7002)).unwrap();
        assert_eq!(new_id, udp_id);
        assert!(table.iter().all(|addr| *addr == ep(4)));
        assert_eq!(backend_id(maps, udp(7002), ep(4)), Some(udp_backend));
        assert_eq!(
            maps.port_stats[new_id as usize],
            vec![PortStats::default(); CPUS]
        );
        assert_eq!(
            maps.port_stats6[new_id as usize],
            vec![PortStats::default(); CPUS]
        );
    }

    #[test]
    fn a_backend_removed_from_a_udp_node_port_is_forgotten() {
        let mut ports = open(4, 4);
        let key = udp(7000);
        ports.apply(&snapshot(&[(key, &[ep(1), ep(2)])])).unwrap();
        let (one, two) = (
            backend_id(ports.maps(), key, ep(1)).unwrap(),
            backend_id(ports.maps(), key, ep(2)).unwrap(),
        );
        add_flow(ports.maps_mut(), key, 40001, one);
        add_flow(ports.maps_mut(), key, 40002, two);

        ports.apply(&snapshot(&[(key, &[ep(1)])])).unwrap();
        let maps = ports.maps();
        assert_eq!(flow_backends(maps), BTreeSet::from([one]));
        let (_, table) = lookup(maps, key).unwrap();
        assert!(table.iter().all(|addr| *addr == ep(1)));
        assert!(
            !maps
                .backend_addrs
                .contains(&(np::PROTO_UDP, SocketAddr::V4(ep(2))))
        );
        // Its id is free again at once.
        ports.apply(&snapshot(&[(key, &[ep(1), ep(3)])])).unwrap();
        assert_eq!(backend_id(ports.maps(), key, ep(3)), Some(two));
    }

    #[test]
    fn a_backend_removed_from_a_tcp_node_port_keeps_its_flows_and_id_until_they_end() {
        let mut ports = open(4, 3);
        let key = tcp(7000);
        ports.apply(&snapshot(&[(key, &[ep(1), ep(2)])])).unwrap();
        let two = backend_id(ports.maps(), key, ep(2)).unwrap();
        add_flow(ports.maps_mut(), key, 40002, two);

        ports.apply(&snapshot(&[(key, &[ep(1)])])).unwrap();
        assert_eq!(flow_backends(ports.maps()), BTreeSet::from([two]));
        let (_, table) = lookup(ports.maps(), key).unwrap();
        assert!(table.iter().all(|addr| *addr == ep(1)));
        // Its id is held back while the flow lasts: a new backend gets another one.
        ports.apply(&snapshot(&[(key, &[ep(1), ep(3)])])).unwrap();
        let three = backend_id(ports.maps(), key, ep(3)).unwrap();
        assert_ne!(three, two);
        // The same holds across a restart.
        let mut adopted = NodePorts::open(ports.maps().clone(), Config::default()).unwrap();
        assert!(matches!(
            adopted.apply(&snapshot(&[(key, &[ep(1), ep(3), ep(4)])])),
            Err(DataplaneError::Capacity { .. })
        ));
        // Once the flow is gone, the id is reused.
        ports.maps_mut().conntrack.clear();
        ports.apply(&snapshot(&[(key, &[ep(1), ep(3)])])).unwrap();
        ports
            .apply(&snapshot(&[(key, &[ep(1), ep(3), ep(4)])]))
            .unwrap();
        assert_eq!(backend_id(ports.maps(), key, ep(4)), Some(two));
    }

    #[test]
    fn node_addresses_follow_the_snapshot() {
        let mut ports = open(4, 4);
        let addrs = |last: &[u8]| -> Vec<IpAddr> {
            last.iter()
                .flat_map(|l| {
                    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(*l));
                    [Ipv4Addr::new(192, 0, 2, *l).into(), v6.into()]
                })
                .collect()
        };
        for wanted in [addrs(&[1, 2]), addrs(&[2, 3]), addrs(&[]), addrs(&[4])] {
            let snap = Snapshot {
                node_addrs: wanted.clone(),
                ..Snapshot::default()
            };
            ports.apply(&snap).unwrap();
            assert_eq!(
                ports.maps().node_addrs,
                wanted.into_iter().collect::<BTreeSet<_>>()
            );
        }
        // Removed behind the agent's back: put back after a refresh.
        ports.maps_mut().node_addrs.clear();
        ports.adopt().unwrap();
        ports
            .apply(&Snapshot {
                node_addrs: addrs(&[4]),
                ..Snapshot::default()
            })
            .unwrap();
        assert_eq!(
            ports.maps().node_addrs,
            addrs(&[4]).into_iter().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn ipv6_twins_follow_the_snapshot_and_are_adopted() {
        let mut ports = open(4, 4);
        let key = udp(7000);
        let twin = |last: u16| {
            SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last), 8080, 0, 0)
        };
        let dual = |v4: &[u8], v6: &[u16]| Snapshot {
            node_addrs: vec![],
            node_ports: BTreeMap::from([(
                key,
                v4.iter()
                    .map(|l| SocketAddr::V4(ep(*l)))
                    .chain(v6.iter().map(|l| SocketAddr::V6(twin(*l))))
                    .collect(),
            )]),
        };
        ports.apply(&dual(&[1, 2], &[1, 2])).unwrap();
        let twin_of = |maps: &FakeMaps, l: u8| {
            let id = backend_id(maps, key, ep(l)).unwrap();
            from_backend6(maps.backends6[id as usize])
        };
        assert_eq!(twin_of(ports.maps(), 1), Some(twin(1)));
        assert_eq!(twin_of(ports.maps(), 2), Some(twin(2)));
        // Both families' addresses are backend addresses (never clients).
        let sources = |maps: &FakeMaps| {
            maps.backend_addrs
                .iter()
                .map(|(_, a)| *a)
                .collect::<BTreeSet<SocketAddr>>()
        };
        let expected: BTreeSet<SocketAddr> =
            [ep(1).into(), ep(2).into(), twin(1).into(), twin(2).into()].into();
        assert_eq!(sources(ports.maps()), expected);
        // Same snapshot again, also after adoption: nothing written.
        let before = ports.maps().clone();
        ports.apply(&dual(&[1, 2], &[1, 2])).unwrap();
        assert_eq!(ports.maps().writes, before.writes);
        let mut adopted = NodePorts::open(before.clone(), Config::default()).unwrap();
        let writes = adopted.maps().writes;
        adopted.apply(&dual(&[1, 2], &[1, 2])).unwrap();
        assert_eq!(adopted.maps().writes, writes);
        // Families that do not pair up: no twins.
        ports.apply(&dual(&[1, 2], &[1])).unwrap();
        assert_eq!(twin_of(ports.maps(), 1), None);
        assert_eq!(twin_of(ports.maps(), 2), None);
        // A removed UDP backend's IPv6 flows are forgotten.
        ports.apply(&dual(&[1, 2], &[1, 2])).unwrap();
        let two = backend_id(ports.maps(), key, ep(2)).unwrap();
        let flow_key = FlowKey6 {
            src_addr: [1; 4],
            dst_addr: [2; 4],
            src_port: 1,
            dst_port: 7000u16.to_be(),
            protocol: np::PROTO_UDP,
            pad: [0; 3],
        };
        ports.maps_mut().conntrack6.insert(
            flow_key,
            Flow6 {
                nat_addr: [3; 4],
                nat_port: 0,
                flags: 0,
                service_id: 0,
                backend_id: two,
                pad: 0,
                last_seen_ns: 0,
            },
        );
        ports.apply(&dual(&[1], &[1])).unwrap();
        assert!(ports.maps().conntrack6.is_empty());
        let expected: BTreeSet<SocketAddr> = [ep(1).into(), twin(1).into()].into();
        assert_eq!(sources(ports.maps()), expected);
    }

    #[test]
    fn a_maglev_table_matches_dataplane_maglev_and_changes_generation() {
        let mut ports = open(4, 8);
        let key = tcp(7000);
        let check = |maps: &FakeMaps, endpoints: &[SocketAddrV4]| -> u32 {
            let service = maps.services[&service_key(key)];
            let ids: Vec<u32> = endpoints
                .iter()
                .map(|e| backend_id(maps, key, *e).expect("every endpoint is in the table"))
                .collect();
            let size = maglev::table_size(ids.len());
            assert_eq!(service.table_size, size);
            assert_eq!(service.backends, ids.len() as u32);
            let table: Vec<u32> = (0..size)
                .map(|i| maps.maglev[&MaglevKey::new(service.id, service.generation, i)])
                .collect();
            assert_eq!(table, maglev::build(&ids, size));
            // Only the active generation remains.
            assert_eq!(maps.maglev.len(), size as usize);
            service.generation
        };
        let first = [ep(1), ep(2), ep(3)];
        ports.apply(&snapshot(&[(key, &first)])).unwrap();
        let generation = check(ports.maps(), &first);
        let second = [ep(1), ep(3), ep(4), ep(5)];
        ports.apply(&snapshot(&[(key, &second)])).unwrap();
        assert_eq!(check(ports.maps(), &second), 1 - generation);
        // No endpoints: an entry with an empty table (traffic dropped).
        ports.apply(&snapshot(&[(key, &[])])).unwrap();
        check(ports.maps(), &[]);
    }

    #[test]
    fn a_node_port_replaced_in_one_apply_gets_a_whole_table() {
        let mut ports = open(1, 4);
        ports.apply(&snapshot(&[(udp(7000), &[ep(1)])])).unwrap();
        add_flow(ports.maps_mut(), udp(7000), 40000, 0);
        // The new node port takes the freed service id, and so the old table's slots.
        ports.apply(&snapshot(&[(tcp(7001), &[ep(2)])])).unwrap();
        let maps = ports.maps();
        let (_, table) = lookup(maps, tcp(7001)).expect("every slot of the table is there");
        assert_eq!(table, vec![ep(2); 101]);
        assert_eq!(maps.maglev.len(), 101);
        assert!(maps.conntrack.is_empty());
        assert!(lookup(maps, udp(7000)).is_none());
    }

    #[test]
    fn a_node_port_that_does_not_fit_still_lets_removals_be_cleaned_up() {
        let mut ports = open(4, 3);
        ports
            .apply(&snapshot(&[(udp(7000), &[ep(1)]), (tcp(7002), &[ep(1)])]))
            .unwrap();
        add_flow(ports.maps_mut(), udp(7000), 40000, 0);
        // 5 backend ids wanted, 3 exist.
        let result = ports.apply(&snapshot(&[
            (tcp(7001), &[ep(1), ep(2)]),
            (tcp(7002), &[ep(1)]),
            (tcp(7003), &[ep(1), ep(2)]),
        ]));
        assert!(matches!(
            result,
            Err(DataplaneError::Capacity { port, .. }) if port == tcp(7003)
        ));
        let maps = ports.maps();
        assert!(maps.conntrack.is_empty(), "flows of the removed node port");
        assert!(lookup(maps, udp(7000)).is_none());
        assert!(lookup(maps, tcp(7001)).is_some());
        assert!(lookup(maps, tcp(7003)).is_none());
        assert_eq!(maps.maglev.len(), 211 + 101, "the removed table is deleted");
    }

    /// A data plane over the fake maps, for the reconciler.
    #[derive(Debug)]
    struct FakePlane(NodePorts<FakeMaps>);

    impl Dataplane for FakePlane {
        fn mode(&self) -> &'static str {
            "fake"
        }

        fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
            self.0.apply(snapshot)
        }

        fn refresh(&mut self) -> Result<(), DataplaneError> {
            self.0.adopt()
        }

        fn counters(&self) -> Result<Counters, DataplaneError> {
            self.0.counters()
        }
    }

    #[test]
    fn a_node_port_over_capacity_is_reported_and_the_others_are_applied() {
        // Room for 4 backend ids; the same endpoint on two node ports takes two.
        let mut plane = FakePlane(open(8, 4));
        let previous = snapshot(&[(tcp(7000), &[ep(1)])]);
        plane.apply(&previous).unwrap();
        let desired = snapshot(&[
            (tcp(7000), &[ep(1), ep(2)]),
            (tcp(7001), &[ep(1), ep(2), ep(3)]),
            (tcp(7002), &[ep(3)]),
        ]);
        let outcome = reconcile::apply_keeping_previous(&mut plane, &desired, &previous);
        assert_eq!(outcome.failure, None);
        assert_eq!(
            outcome.port_errors.keys().copied().collect::<Vec<_>>(),
            vec![tcp(7001)]
        );
        let maps = plane.0.maps();
        assert_eq!(lookup(maps, tcp(7000)).unwrap().1.len(), 211);
        assert!(lookup(maps, tcp(7001)).is_none());
        assert_eq!(lookup(maps, tcp(7002)).unwrap().1, vec![ep(3); 101]);
        let mut expected = desired.clone();
        expected.node_ports.remove(&tcp(7001));
        assert_eq!(outcome.applied, expected);
    }

    #[test]
    fn a_global_stats_map_pinned_before_a_stat_existed_reads_it_as_zero() {
        let mut ports = open(4, 4);
        let maps = ports.maps_mut();
        maps.global_stats
            .truncate(GlobalStat::TcpNonSynMiss as usize);
        maps.global_stats[GlobalStat::ConntrackMiss as usize][0] = 7;
        let global = ports.counters().unwrap().global;
        assert_eq!((global.conntrack_misses, global.tcp_non_syn_misses), (7, 0));
    }

    #[test]
    fn counters_are_summed_over_cpus() {
        let mut ports = open(4, 4);
        let key = udp(7000);
        ports.apply(&snapshot(&[(key, &[ep(1), ep(2)])])).unwrap();
        let (service, _) = lookup(ports.maps(), key).unwrap();
        let one = backend_id(ports.maps(), key, ep(1)).unwrap();
        let maps = ports.maps_mut();
        for cpu in 0..CPUS {
            let n = cpu as u64 + 1;
            maps.port_stats[service as usize][cpu] = PortStats {
                rx_packets: n,
                rx_bytes: 100 * n,
                flows: 1,
                tx_packets: 2 * n,
                tx_bytes: 200 * n,
                drop_no_backend: 0,
                drop_table_miss: n,
            };
            maps.backend_stats[one as usize][cpu] = BackendStats {
                packets: n,
                bytes: 10 * n,
            };
            for (stat, values) in maps.global_stats.iter_mut().enumerate() {
                values[cpu] = (stat as u64 + 1) * n;
            }
        }
        let counters = ports.counters().unwrap();
        assert_eq!(
            counters.ports[&key],
            PortCounters {
                rx_packets: 6,
                rx_bytes: 600,
                flows: 3,
                tx_packets: 12,
                tx_bytes: 1200,
                drop_no_backend: 0,
                drop_table_miss: 6,
            }
        );
        assert_eq!(
            counters.backends[&(key, ep(1))],
            BackendCounters {
                packets: 6,
                bytes: 60
            }
        );
        assert_eq!(counters.backends[&(key, ep(2))], BackendCounters::default());
        assert_eq!(
            counters.global,
            GlobalCounters {
                passed: 6,
                malformed: 12,
                conntrack_hits: 18,
                conntrack_misses: 24,
                tcp_non_syn_misses: 30,
                fragments_forwarded: 36,
                fragments_unmatched: 42,
                icmp_to_instance: 48,
                icmp_from_instance: 54,
            }
        );
    }

    #[test]
    fn each_family_is_read_from_its_own_port_stats_map() {
        let mut ports = open(4, 4);
        let key = udp(7000);
        ports.apply(&snapshot(&[(key, &[ep(1)])])).unwrap();
        let (service, _) = lookup(ports.maps(), key).unwrap();
        let maps = ports.maps_mut();
        for cpu in 0..CPUS {
            maps.port_stats[service as usize][cpu] = PortStats {
                rx_packets: 10,
                rx_bytes: 1_000,
                flows: 1,
                ..PortStats::default()
            };
            maps.port_stats6[service as usize][cpu] = PortStats {
                rx_packets: 2,
                rx_bytes: 240,
                tx_packets: 1,
                drop_no_backend: 1,
                ..PortStats::default()
            };
        }
        let counters = ports.counters().unwrap();
        let n = CPUS as u64;
        let v4 = PortCounters {
            rx_packets: 10 * n,
            rx_bytes: 1_000 * n,
            flows: n,
            ..PortCounters::default()
        };
        let v6 = PortCounters {
            rx_packets: 2 * n,
            rx_bytes: 240 * n,
            tx_packets: n,
            drop_no_backend: n,
            ..PortCounters::default()
        };
        assert_eq!(counters.families[&(key, Family::V4)], v4);
        assert_eq!(counters.families[&(key, Family::V6)], v6);
        let mut total = v4;
        total.add(&v6);
        assert_eq!(counters.ports[&key], total);
    }
}
