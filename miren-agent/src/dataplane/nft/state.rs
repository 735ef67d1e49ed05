//! [`TableState`]: the contents of the table (`inet miren` or `inet miren_local`), as the
//! kernel holds it or as a snapshot needs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::schema::{BaseChain, ChainDef, Family, Scope, chain_def, endpoints_chain, fingerprint};
use crate::dataplane::{NodePortKey, Snapshot};

/// A chain as the kernel holds it: its hook (base chains) and its rules' fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainState {
    pub(super) base: Option<BaseChain>,
    /// The comment of each rule, in order (`None` for a rule without one).
    pub(super) rules: Vec<Option<String>>,
}

impl From<&ChainDef> for ChainState {
    /// The chain as the kernel holds it once `def` is written.
    fn from(def: &ChainDef) -> Self {
        Self {
            base: def.base.clone(),
            rules: def.rules.iter().map(|r| Some(fingerprint(r))).collect(),
        }
    }
}

/// The contents of the table, as read back or as wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TableState {
    /// The table exists.
    pub(super) exists: bool,
    /// A set or map has another type than this code declares, or holds elements this code
    /// cannot have written: the table must be recreated.
    pub(super) incompatible: bool,
    /// The node's addresses, both families (`node_addrs`, `node_addrs6`).
    pub(super) node_addrs: BTreeSet<IpAddr>,
    pub(super) rx: BTreeSet<NodePortKey>,
    pub(super) flows: BTreeSet<NodePortKey>,
    pub(super) drops: BTreeSet<NodePortKey>,
    pub(super) tx: BTreeSet<NodePortKey>,
    /// (node port, endpoint), both families (`backend_{tcp,udp}[6]`).
    pub(super) backends: BTreeSet<(NodePortKey, SocketAddr)>,
    /// (family, node port) → the chain its element of `nat` (IPv4) or `nat6` jumps to.
    pub(super) nat: BTreeMap<(Family, NodePortKey), String>,
    /// (family, node port, hash slot) → endpoint of that family.
    pub(super) endpoints: BTreeMap<(Family, NodePortKey, u32), SocketAddr>,
    pub(super) chains: BTreeMap<String, ChainState>,
}

impl TableState {
    /// What the kernel must hold for `snapshot` in a table of `scope`. Each family of a node port jumps to the
    /// chain for its own endpoint count (`no_endpoints` without any), and its endpoints take
    /// the slots in address order, so an instance's IPv6 endpoint (which mirrors its IPv4
    /// address, in the same order) has the slot of its IPv4 one.
    pub(super) fn desired(snapshot: &Snapshot, scope: &Scope) -> Self {
        let mut state = Self {
            exists: true,
            node_addrs: snapshot.node_addrs.iter().copied().collect(),
            ..Self::default()
        };
        let mut chains: BTreeSet<String> = scope
            .fixed_chains()
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        for (key, endpoints) in &snapshot.node_ports {
            state.rx.insert(*key);
            state.flows.insert(*key);
            state.drops.insert(*key);
            state.tx.insert(*key);
            for family in Family::ALL {
                let endpoints: BTreeSet<SocketAddr> = endpoints
                    .iter()
                    .filter(|e| Family::of(e.ip()) == family)
                    .copied()
                    .collect();
                let target = if endpoints.is_empty() {
                    "no_endpoints".to_owned()
                } else {
                    endpoints_chain(endpoints.len())
                };
                chains.insert(target.clone());
                state.nat.insert((family, *key), target);
                for (slot, endpoint) in (0u32..).zip(&endpoints) {
                    state.backends.insert((*key, *endpoint));
                    state.endpoints.insert((family, *key, slot), *endpoint);
                }
            }
        }
        state.chains = chains
            .into_iter()
            .filter_map(|name| Some((name.clone(), ChainState::from(&chain_def(&name, scope)?))))
            .collect();
        state
    }

    /// (node port, endpoint) pairs in `self` but not in `next`: their conntrack entries that
    /// would keep new packets on the endpoint are stale (see `exec::purge_conntrack`).
    pub(super) fn removed_backends(&self, next: &Self) -> Vec<(NodePortKey, SocketAddr)> {
        self.backends.difference(&next.backends).copied().collect()
    }

    /// The UDP pairs of [`TableState::removed_backends`].
    #[cfg(test)]
    pub(super) fn removed_udp_backends(&self, next: &Self) -> Vec<(NodePortKey, SocketAddr)> {
        self.removed_backends(next)
            .into_iter()
            .filter(|(key, _)| key.protocol == crate::config::Protocol::Udp)
            .collect()
    }

    /// The number of node ports.
    pub(super) fn node_ports(&self) -> usize {
        self.rx.len()
    }
}
