//! [`XdpDataplane`]: node ports in eBPF. The XDP program `miren_nodeport` DNATs node-port
//! traffic on the external interfaces; the TC egress program `miren_reply` reverse-NATs the
//! replies. Userspace owns id allocation and the Maglev tables: a service's new table is
//! written into the inactive generation, then the service entry flips to it in one map update,
//! so a packet never sees a half-written table.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapError, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc::SchedClassifierLink,
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use miren_common::nodeport::{
    self as np, Backend, BackendAddr, BackendStats, Config, Flow, FlowKey, GlobalStat, MaglevKey,
    PortStats, Service, ServiceKey,
};

use super::{
    BackendCounters, Counters, Dataplane, DataplaneError, GlobalCounters, NodePortKey,
    PortCounters, Snapshot, maglev, pins,
};
use crate::{
    bpf::{BpfError, load_object_pinned, load_xdp, xdp, xdp_mut},
    config::Protocol,
};

/// Default idle timeout of UDP sessions.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a TCP flow that saw FIN keeps its backend without packets.
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for packets that read an old Maglev generation before it is deleted.
const GENERATION_GRACE: Duration = Duration::from_millis(2);

/// How the XDP program came to be attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode.
    Native,
    /// Generic (skb) mode, because the driver refused native mode.
    Generic,
    /// A link pinned by an earlier agent was taken over (its mode is kept).
    Adopted,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native XDP",
            Self::Generic => "generic XDP",
            Self::Adopted => "adopted pinned XDP link",
        })
    }
}

/// The state of one node port as written to the kernel.
#[derive(Debug, Default)]
struct ServiceState {
    id: u32,
    generation: u32,
    table: Vec<u32>,
    backends: BTreeMap<SocketAddrV4, u32>,
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

/// The eBPF/XDP node-port data plane.
#[derive(Debug)]
pub struct XdpDataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    node_addrs: BTreeSet<Ipv4Addr>,
    /// Every backend's address, port and protocol, as `MIREN_BACKEND_ADDRS` holds them.
    backend_addrs: BTreeSet<BackendAddr>,
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

/// Removes the objects an earlier XDP data plane pinned under `pin_dir` (its links, which
/// detaches the programs, and its maps); true if there were any.
///
/// # Errors
/// [`DataplaneError::Io`] when a pin cannot be removed.
pub fn remove_pins(pin_dir: &Path) -> Result<bool, DataplaneError> {
    pins::remove_all(pin_dir)
}

impl XdpDataplane {
    /// Loads the programs and fresh maps (not attached yet), with the default UDP idle timeout.
    ///
    /// # Errors
    /// [`DataplaneError::Bpf`] when the kernel refuses the programs.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(None)
    }

    /// Loads the programs with their maps pinned under `pin_dir` (a bpffs directory). Maps
    /// pinned by an earlier agent are adopted with their contents (conntrack, tables,
    /// counters), and [`XdpDataplane::attach`] takes over pinned links, so forwarding never
    /// stops across a restart.
    ///
    /// # Errors
    /// [`DataplaneError::PinDir`] if `pin_dir` is not on a bpffs (under `/sys/fs/bpf`, one is
    /// mounted there first when none is); [`DataplaneError::Bpf`] when the kernel refuses the
    /// programs or pinned maps do not match.
    pub fn load_pinned(pin_dir: &Path) -> Result<Self, DataplaneError> {
        pins::prepare(pin_dir)?;
        Self::load_with(Some(pin_dir.to_owned()))
    }

    fn load_with(pin_dir: Option<PathBuf>) -> Result<Self, DataplaneError> {
        let map_pins = pin_dir.as_deref().map(pins::map_paths).unwrap_or_default();
        let mut ebpf = load_object_pinned(&map_pins)?;
        load_xdp(&mut ebpf, np::XDP_PROGRAM)?;
        classifier_mut(&mut ebpf)?
            .load()
            .map_err(|source| BpfError::Program {
                op: format!("loading {}", np::TC_PROGRAM),
                source,
            })?;
        let mut dataplane = Self {
            ebpf,
            pin_dir,
            node_addrs: BTreeSet::new(),
            backend_addrs: BTreeSet::new(),
            services: BTreeMap::new(),
            service_ids: Ids::new(np::MAX_SERVICES),
            backend_ids: Ids::new(np::MAX_BACKENDS),
            draining_backends: BTreeSet::new(),
            config: Config {
                udp_timeout_ns: DEFAULT_UDP_TIMEOUT.as_nanos() as u64,
                tcp_closing_timeout_ns: TCP_CLOSING_TIMEOUT.as_nanos() as u64,
                fake_now_ns: 0,
            },
        };
        dataplane.adopt()?;
        dataplane.write_config()?;
        Ok(dataplane)
    }

    /// Rebuilds the userspace view (addresses, node ports, ids, tables) from maps that already
    /// hold state (pinned by an earlier agent). Fresh maps are empty and leave it empty.
    fn adopt(&mut self) -> Result<(), DataplaneError> {
        let addrs: HashMap<_, u32, u32> = HashMap::try_from(self.map(np::NODE_ADDRS_MAP)?)
            .map_err(map_err("opening the node address map"))?;
        self.node_addrs = addrs
            .keys()
            .filter_map(Result::ok)
            .map(|a| Ipv4Addr::from(u32::from_be(a)))
            .collect();
        let backend_addrs: HashMap<_, BackendAddr, u32> =
            HashMap::try_from(self.map(np::BACKEND_ADDRS_MAP)?)
                .map_err(map_err("opening the backend address map"))?;
        self.backend_addrs = backend_addrs.keys().filter_map(Result::ok).collect();
        let services: HashMap<_, ServiceKey, Service> =
            HashMap::try_from(self.map(np::SERVICES_MAP)?)
                .map_err(map_err("opening the service map"))?;
        let maglev: HashMap<_, MaglevKey, u32> = HashMap::try_from(self.map(np::MAGLEV_MAP)?)
            .map_err(map_err("opening the Maglev map"))?;
        let backends: Array<_, Backend> = Array::try_from(self.map(np::BACKENDS_MAP)?)
            .map_err(map_err("opening the backend map"))?;
        let mut adopted = BTreeMap::new();
        for entry in services.iter() {
            let (key, service) = entry.map_err(map_err("reading the service map"))?;
            let protocol = match key.protocol {
                np::PROTO_TCP => Protocol::Tcp,
                _ => Protocol::Udp,
            };
            let mut state = ServiceState {
                id: service.id,
                generation: service.generation,
                ..ServiceState::default()
            };
            for index in 0..service.table_size {
                let id = maglev
                    .get(&MaglevKey::new(service.id, service.generation, index), 0)
                    .map_err(map_err("reading an adopted Maglev table"))?;
                let backend = backends
                    .get(&id, 0)
                    .map_err(map_err("reading an adopted backend"))?;
                let addr = SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(backend.addr_be)),
                    u16::from_be(backend.port_be),
                );
                state.backends.insert(addr, id);
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
            .referenced_backends()?
            .difference(&backend_ids)
            .copied()
            .collect();
        let used = backend_ids
            .union(&self.draining_backends)
            .copied()
            .collect();
        self.service_ids = Ids::with_used(np::MAX_SERVICES, &service_ids);
        self.backend_ids = Ids::with_used(np::MAX_BACKENDS, &used);
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

    /// Attaches XDP (in generic mode if `generic`, else native) and the TC egress program to
    /// `iface` in the calling thread's network namespace. With a pin
    /// directory, links are pinned, and links pinned by an earlier agent are taken over
    /// atomically (the new programs replace the old ones without a gap).
    ///
    /// # Errors
    /// [`DataplaneError::Bpf`] when attaching fails.
    pub fn attach(&mut self, iface: &str, generic: bool) -> Result<AttachMode, DataplaneError> {
        let pins = self
            .pin_dir
            .as_deref()
            .map(|dir| pins::link_paths(dir, iface));
        if let Some((xdp_pin, tc_pin)) = &pins
            && xdp_pin.exists()
            && tc_pin.exists()
        {
            match self.adopt_links(xdp_pin, tc_pin) {
                Ok(()) => return Ok(AttachMode::Adopted),
                Err(err) => {
                    tracing::warn!(%iface, error = %err, "pinned links are stale; attaching afresh");
                    let _ = std::fs::remove_file(xdp_pin);
                    let _ = std::fs::remove_file(tc_pin);
                }
            }
        }
        let program_err = |op: String| move |source| BpfError::Program { op, source };
        let attach = |ebpf: &mut Ebpf, mode| {
            xdp_mut(ebpf, np::XDP_PROGRAM)?
                .attach(iface, mode)
                .map_err(program_err(format!(
                    "attaching {} to {iface} in {mode:?} mode",
                    np::XDP_PROGRAM
                )))
        };
        let (mode, xdp_mode) = if generic {
            (AttachMode::Generic, XdpMode::Skb)
        } else {
            (AttachMode::Native, XdpMode::Driver)
        };
        let xdp_link = attach(&mut self.ebpf, xdp_mode)?;
        let tc_link = classifier_mut(&mut self.ebpf)?
            .attach(iface, TcAttachType::Egress)
            .map_err(program_err(format!(
                "attaching {} to {iface} egress",
                np::TC_PROGRAM
            )))?;
        if let Some((xdp_pin, tc_pin)) = pins {
            let xdp = xdp_mut(&mut self.ebpf, np::XDP_PROGRAM)?
                .take_link(xdp_link)
                .map_err(program_err(format!("taking the XDP link of {iface}")))?;
            pins::pin_link(FdLink::try_from(xdp), &xdp_pin)?;
            let tc = classifier_mut(&mut self.ebpf)?
                .take_link(tc_link)
                .map_err(program_err(format!("taking the TC link of {iface}")))?;
            pins::pin_link(FdLink::try_from(tc), &tc_pin)?;
        }
        Ok(mode)
    }

    /// Points links pinned by an earlier agent at this agent's programs.
    fn adopt_links(&mut self, xdp_pin: &Path, tc_pin: &Path) -> Result<(), DataplaneError> {
        let program_err = |op: &str| {
            let op = op.to_owned();
            move |source| DataplaneError::Bpf(BpfError::Program { op, source })
        };
        let xdp_link =
            XdpLink::try_from(pins::open_link(xdp_pin)?).map_err(pins::link_err(xdp_pin))?;
        let program = xdp_mut(&mut self.ebpf, np::XDP_PROGRAM)?;
        let id = program
            .attach_to_link(xdp_link)
            .map_err(program_err("replacing the pinned XDP program"))?;
        drop(
            program
                .take_link(id)
                .map_err(program_err("releasing the XDP link"))?,
        );
        let tc_link = SchedClassifierLink::try_from(pins::open_link(tc_pin)?)
            .map_err(pins::link_err(tc_pin))?;
        let program = classifier_mut(&mut self.ebpf)?;
        let id = program
            .attach_to_link(tc_link)
            .map_err(program_err("replacing the pinned TC program"))?;
        drop(
            program
                .take_link(id)
                .map_err(program_err("releasing the TC link"))?,
        );
        Ok(())
    }

    /// The XDP program (for `BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// [`BpfError::Missing`] if the object lacks it.
    pub fn xdp_program(&self) -> Result<&Xdp, BpfError> {
        xdp(&self.ebpf, np::XDP_PROGRAM)
    }

    /// The TC program (for `BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// [`BpfError::Missing`] if the object lacks it.
    pub fn tc_program(&self) -> Result<&SchedClassifier, BpfError> {
        let missing = BpfError::Missing {
            kind: "program",
            name: np::TC_PROGRAM,
        };
        self.ebpf
            .program(np::TC_PROGRAM)
            .ok_or(missing)?
            .try_into()
            .map_err(not_classifier)
    }

    /// Sets the UDP idle timeout.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub fn set_udp_timeout(&mut self, timeout: Duration) -> Result<(), DataplaneError> {
        self.config.udp_timeout_ns = timeout.as_nanos() as u64;
        self.write_config()
    }

    /// Replaces the data plane's clock with a fixed time (tests); `None` restores the kernel
    /// clock.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub fn set_clock(&mut self, now: Option<Duration>) -> Result<(), DataplaneError> {
        self.config.fake_now_ns = now.map_or(0, |t| t.as_nanos() as u64);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let config = self.config;
        let mut array: Array<_, Config> = Array::try_from(self.map_mut(np::CONFIG_MAP)?)
            .map_err(map_err("opening the config map"))?;
        array
            .set(0, config, 0)
            .map_err(map_err("writing the config map"))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Bpf(BpfError::Missing { kind: "map", name }))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DataplaneError> {
        self.ebpf
            .map(name)
            .ok_or(DataplaneError::Bpf(BpfError::Missing { kind: "map", name }))
    }

    fn apply_node_addrs(&mut self, wanted: &[Ipv4Addr]) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<Ipv4Addr> = wanted.iter().copied().collect();
        let current = std::mem::take(&mut self.node_addrs);
        let mut map: HashMap<_, u32, u32> = HashMap::try_from(self.map_mut(np::NODE_ADDRS_MAP)?)
            .map_err(map_err("opening the node address map"))?;
        for addr in wanted.difference(&current) {
            map.insert(u32::from(*addr).to_be(), 1, 0)
                .map_err(map_err(format!("adding node address {addr}")))?;
        }
        for addr in current.difference(&wanted) {
            map.remove(&u32::from(*addr).to_be())
                .map_err(map_err(format!("removing node address {addr}")))?;
        }
        self.node_addrs = wanted;
        Ok(())
    }

    /// Makes `MIREN_BACKEND_ADDRS` hold exactly the backends of `snapshot`.
    fn apply_backend_addrs(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<BackendAddr> = snapshot
            .node_ports
            .iter()
            .flat_map(|(key, endpoints)| endpoints.iter().map(|e| backend_addr(key.protocol, *e)))
            .collect();
        let current = std::mem::take(&mut self.backend_addrs);
        let mut map: HashMap<_, BackendAddr, u32> =
            HashMap::try_from(self.map_mut(np::BACKEND_ADDRS_MAP)?)
                .map_err(map_err("opening the backend address map"))?;
        for addr in wanted.difference(&current) {
            map.insert(addr, 1, 0)
                .map_err(map_err("adding a backend address"))?;
        }
        for addr in current.difference(&wanted) {
            map.remove(addr)
                .map_err(map_err("removing a backend address"))?;
        }
        self.backend_addrs = wanted;
        Ok(())
    }

    /// Zeroes the per-CPU stats slot `id` of `map` (ids are reused).
    fn zero_stats<T: aya::Pod + Default>(
        &mut self,
        map: &'static str,
        id: u32,
    ) -> Result<(), DataplaneError> {
        let io = |op: String| move |source| DataplaneError::Io { op, source };
        let cpus = nr_cpus().map_err(|(_, source)| io("counting possible CPUs".into())(source))?;
        let mut array: PerCpuArray<_, T> =
            PerCpuArray::try_from(self.map_mut(map)?).map_err(map_err(format!("opening {map}")))?;
        let zeros = PerCpuValues::try_from(vec![T::default(); cpus])
            .map_err(io(format!("zeroing {map}")))?;
        array
            .set(id, zeros, 0)
            .map_err(map_err(format!("zeroing {map}[{id}]")))
    }
}

fn classifier_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, BpfError> {
    let missing = BpfError::Missing {
        kind: "program",
        name: np::TC_PROGRAM,
    };
    ebpf.program_mut(np::TC_PROGRAM)
        .ok_or(missing)?
        .try_into()
        .map_err(not_classifier)
}

fn not_classifier(source: aya::programs::ProgramError) -> BpfError {
    BpfError::Program {
        op: format!("treating {} as a classifier", np::TC_PROGRAM),
        source,
    }
}

/// The IP protocol number of `protocol`.
fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => np::PROTO_TCP,
        Protocol::Udp => np::PROTO_UDP,
    }
}

fn service_key(key: NodePortKey) -> ServiceKey {
    ServiceKey {
        port_be: key.port.to_be(),
        protocol: protocol_number(key.protocol),
        pad: 0,
    }
}

fn backend_addr(protocol: Protocol, addr: SocketAddrV4) -> BackendAddr {
    BackendAddr {
        addr_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
        protocol: protocol_number(protocol),
        pad: 0,
    }
}

fn backend_value(addr: SocketAddrV4) -> Backend {
    Backend {
        addr_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
        pad: 0,
    }
}

impl Dataplane for XdpDataplane {
    fn mode(&self) -> &'static str {
        "xdp"
    }

    fn refresh(&mut self) -> Result<(), DataplaneError> {
        self.adopt()
    }

    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
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
            HashMap::<_, ServiceKey, Service>::try_from(self.map_mut(np::SERVICES_MAP)?)
                .map_err(map_err("opening the service map"))?
                .remove(&service_key(key))
                .map_err(map_err(format!(
                    "removing node port {}/{}",
                    key.port, key.protocol
                )))?;
            retired.extend(
                (0..state.table.len() as u32)
                    .map(|i| MaglevKey::new(state.id, state.generation, i)),
            );
            for id in state.backends.values() {
                dead_backends.insert(*id);
                self.backend_ids.give_back(*id);
            }
            dead_services.insert(state.id);
            self.service_ids.give_back(state.id);
        }

        for (key, endpoints) in &snapshot.node_ports {
            let mut state = match self.services.remove(key) {
                Some(state) => state,
                None => {
                    let id = self
                        .service_ids
                        .take()
                        .ok_or_else(|| DataplaneError::Capacity {
                            port: *key,
                            limit: format!("more than {} node ports", np::MAX_SERVICES),
                        })?;
                    self.zero_stats::<PortStats>(np::PORT_STATS_MAP, id)?;
                    ServiceState {
                        id,
                        ..ServiceState::default()
                    }
                }
            };
            let result = self.apply_service(
                *key,
                &mut state,
                endpoints,
                &mut retired,
                &mut dead_backends,
            );
            self.services.insert(*key, state);
            result?;
        }

        if !retired.is_empty() {
            std::thread::sleep(GENERATION_GRACE);
            let mut maglev: HashMap<_, MaglevKey, u32> =
                HashMap::try_from(self.map_mut(np::MAGLEV_MAP)?)
                    .map_err(map_err("opening the Maglev map"))?;
            for key in retired {
                let _ = maglev.remove(&key);
            }
        }
        if !dead_backends.is_empty() || !dead_services.is_empty() {
            self.forget_flows(&dead_backends, &dead_services)?;
        }
        self.release_drained_backends()
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        let ports: PerCpuArray<_, PortStats> = PerCpuArray::try_from(self.map(np::PORT_STATS_MAP)?)
            .map_err(map_err("opening port stats"))?;
        let backends: PerCpuArray<_, BackendStats> =
            PerCpuArray::try_from(self.map(np::BACKEND_STATS_MAP)?)
                .map_err(map_err("opening backend stats"))?;
        let global: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(np::GLOBAL_STATS_MAP)?)
            .map_err(map_err("opening global stats"))?;
        let mut counters = Counters::default();
        for (key, state) in &self.services {
            let per_cpu = ports
                .get(&state.id, 0)
                .map_err(map_err("reading port stats"))?;
            let mut sum = PortCounters::default();
            per_cpu.iter().for_each(|cpu| sum.add(cpu));
            counters.ports.insert(*key, sum);
            for (addr, id) in &state.backends {
                let per_cpu = backends
                    .get(id, 0)
                    .map_err(map_err("reading backend stats"))?;
                let mut sum = BackendCounters::default();
                per_cpu.iter().for_each(|cpu| sum.add(cpu));
                counters.backends.insert((*key, *addr), sum);
            }
        }
        let read = |stat: GlobalStat| -> Result<u64, DataplaneError> {
            Ok(global
                .get(&(stat as u32), 0)
                .map_err(map_err("reading global stats"))?
                .iter()
                .sum())
        };
        counters.global = GlobalCounters {
            passed: read(GlobalStat::Passed)?,
            malformed: read(GlobalStat::Malformed)?,
            conntrack_hits: read(GlobalStat::ConntrackHit)?,
            conntrack_misses: read(GlobalStat::ConntrackMiss)?,
        };
        Ok(counters)
    }
}

impl XdpDataplane {
    /// Brings one node port's backends and Maglev table in line with `endpoints`.
    fn apply_service(
        &mut self,
        key: NodePortKey,
        state: &mut ServiceState,
        endpoints: &[SocketAddrV4],
        retired: &mut Vec<MaglevKey>,
        dead_backends: &mut HashSet<u32>,
    ) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<SocketAddrV4> = endpoints.iter().copied().collect();
        let gone: Vec<SocketAddrV4> = state
            .backends
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(id) = state.backends.remove(&addr) {
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
            let id = self
                .backend_ids
                .take()
                .ok_or_else(|| DataplaneError::Capacity {
                    port: key,
                    limit: format!("more than {} backends", np::MAX_BACKENDS),
                })?;
            self.zero_stats::<BackendStats>(np::BACKEND_STATS_MAP, id)?;
            Array::<_, Backend>::try_from(self.map_mut(np::BACKENDS_MAP)?)
                .map_err(map_err("opening the backend map"))?
                .set(id, backend_value(*addr), 0)
                .map_err(map_err(format!("writing backend {addr}")))?;
            state.backends.insert(*addr, id);
        }

        let ids: Vec<u32> = state.backends.values().copied().collect();
        let table = maglev::build(&ids, maglev::table_size(ids.len()));
        let first_write = state.table.is_empty() && ids.is_empty();
        if table == state.table && !first_write {
            return Ok(());
        }
        let generation = if state.table.is_empty() {
            state.generation
        } else {
            1 - state.generation
        };
        {
            let mut maglev: HashMap<_, MaglevKey, u32> =
                HashMap::try_from(self.map_mut(np::MAGLEV_MAP)?)
                    .map_err(map_err("opening the Maglev map"))?;
            for (index, backend) in table.iter().enumerate() {
                maglev
                    .insert(
                        MaglevKey::new(state.id, generation, index as u32),
                        backend,
                        0,
                    )
                    .map_err(map_err(format!(
                        "writing the Maglev table of {}/{}",
                        key.port, key.protocol
                    )))?;
            }
        }
        let service = Service {
            id: state.id,
            table_size: table.len() as u32,
            generation,
            backends: ids.len() as u32,
        };
        HashMap::<_, ServiceKey, Service>::try_from(self.map_mut(np::SERVICES_MAP)?)
            .map_err(map_err("opening the service map"))?
            .insert(service_key(key), service, 0)
            .map_err(map_err(format!(
                "writing node port {}/{}",
                key.port, key.protocol
            )))?;
        if !state.table.is_empty() {
            retired.extend(
                (0..state.table.len() as u32)
                    .map(|i| MaglevKey::new(state.id, state.generation, i)),
            );
        }
        state.generation = generation;
        state.table = table;
        Ok(())
    }

    /// The backend ids conntrack entries refer to.
    fn referenced_backends(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        let conntrack: HashMap<_, FlowKey, Flow> = HashMap::try_from(self.map(np::CONNTRACK_MAP)?)
            .map_err(map_err("opening conntrack"))?;
        Ok(conntrack
            .iter()
            .filter_map(Result::ok)
            .map(|(_, flow)| flow.backend_id)
            .collect())
    }

    /// Gives back the ids of removed TCP backends that no conntrack entry refers to anymore.
    fn release_drained_backends(&mut self) -> Result<(), DataplaneError> {
        if self.draining_backends.is_empty() {
            return Ok(());
        }
        let referenced = self.referenced_backends()?;
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
        Ok(())
    }

    /// Deletes conntrack entries of removed backends and node ports.
    fn forget_flows(
        &mut self,
        backends: &HashSet<u32>,
        services: &HashSet<u32>,
    ) -> Result<(), DataplaneError> {
        let mut conntrack: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(self.map_mut(np::CONNTRACK_MAP)?)
                .map_err(map_err("opening conntrack"))?;
        let stale: Vec<FlowKey> = conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flow)| {
                backends.contains(&flow.backend_id) || services.contains(&flow.service_id)
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = conntrack.remove(&key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
