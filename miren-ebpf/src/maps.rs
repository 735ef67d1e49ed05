//! Maps of the node-port data plane (layouts in `miren_common::nodeport`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use miren_common::nodeport::{
    Addr6, Backend, Backend6, BackendAddr, BackendAddr6, BackendStats, CONNTRACK_ENTRIES,
    CONNTRACK6_ENTRIES, Config, FRAGS_ENTRIES, Flow, Flow6, FlowKey, FlowKey6, FragKey, FragKey6,
    FragNat, FragNat6, GLOBAL_STATS, GlobalStat, MAGLEV_ENTRIES, MAX_BACKENDS, MAX_SERVICES,
    MaglevKey, PortStats, Service, ServiceKey,
};

/// Upper bound on node addresses.
const MAX_NODE_ADDRS: u32 = 256;

#[map(name = "MIREN_NODE_ADDRS")]
pub static NODE_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NODE_ADDRS, 0);

#[map(name = "MIREN_NODE_ADDRS6")]
pub static NODE_ADDRS6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_NODE_ADDRS, 0);

#[map(name = "MIREN_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "MIREN_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, u32> =
    HashMap::with_max_entries(MAGLEV_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "MIREN_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "MIREN_BACKEND_ADDRS")]
pub static BACKEND_ADDRS: HashMap<BackendAddr, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "MIREN_BACKEND_ADDRS6")]
pub static BACKEND_ADDRS6: HashMap<BackendAddr6, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "MIREN_CT")]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

#[map(name = "MIREN_BACKENDS6")]
pub static BACKENDS6: Array<Backend6> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "MIREN_CT6")]
pub static CONNTRACK6: LruHashMap<FlowKey6, Flow6> =
    LruHashMap::with_max_entries(CONNTRACK6_ENTRIES, 0);

#[map(name = "MIREN_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragNat> = LruHashMap::with_max_entries(FRAGS_ENTRIES, 0);

#[map(name = "MIREN_FRAGS6")]
pub static FRAGS6: LruHashMap<FragKey6, FragNat6> = LruHashMap::with_max_entries(FRAGS_ENTRIES, 0);

#[map(name = "MIREN_BACKEND_STATS6")]
pub static BACKEND_STATS6: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "MIREN_PORT_STATS")]
pub static PORT_STATS: PerCpuArray<PortStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per node port, the IPv6 packets ([`PORT_STATS`] counts the IPv4 ones).
#[map(name = "MIREN_PORT_STATS6")]
pub static PORT_STATS6: PerCpuArray<PortStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "MIREN_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "MIREN_GLOBAL_STATS")]
pub static GLOBAL_STATS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_STATS, 0);

#[map(name = "MIREN_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Adds one to a global counter on this CPU.
#[inline(always)]
pub fn count(stat: GlobalStat) {
    if let Some(counter) = GLOBAL_STATS_MAP.get_ptr_mut(stat as u32) {
        // SAFETY: pointer from a successful lookup; per-CPU slot, no concurrent writer.
        unsafe { *counter += 1 };
    }
}

/// Runs `f` on this CPU's IPv4 stats of service `id`.
#[inline(always)]
pub fn port_stats(id: u32, f: impl FnOnce(&mut PortStats)) {
    port_stats_in(&PORT_STATS, id, f);
}

/// Runs `f` on this CPU's IPv6 stats of service `id`.
#[inline(always)]
pub fn port_stats6(id: u32, f: impl FnOnce(&mut PortStats)) {
    port_stats_in(&PORT_STATS6, id, f);
}

/// Runs `f` on this CPU's slot `id` of a per-node-port stats map.
#[inline(always)]
pub fn port_stats_in(map: &PerCpuArray<PortStats>, id: u32, f: impl FnOnce(&mut PortStats)) {
    if let Some(stats) = map.get_ptr_mut(id) {
        // SAFETY: as in `count`.
        f(unsafe { &mut *stats });
    }
}

/// The data plane's settings (zeroes until the agent writes them).
#[inline(always)]
pub fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// The data plane's clock: `Config::fake_now_ns` when set (tests), else the kernel's.
#[inline(always)]
pub fn now_ns(config: &Config) -> u64 {
    if config.fake_now_ns != 0 {
        config.fake_now_ns
    } else {
        // SAFETY: helper without arguments.
        unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
    }
}
