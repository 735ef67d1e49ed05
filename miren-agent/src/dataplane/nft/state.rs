//! [`TableState`]: the contents of `table inet miren`, as the kernel holds it or as a snapshot
//! needs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use super::schema::{BaseChain, ChainDef, FIXED_CHAINS, chain_def, endpoints_chain, fingerprint};
use crate::{
    config::Protocol,
    dataplane::{NodePortKey, Snapshot},
};

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

/// The contents of `table inet miren`, as read back or as wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TableState {
    /// The table exists.
    pub(super) exists: bool,
    /// A set or map has another type than this code declares, or holds elements this code
    /// cannot have written: the table must be recreated.
    pub(super) incompatible: bool,
    pub(super) node_addrs: BTreeSet<Ipv4Addr>,
    pub(super) rx: BTreeSet<NodePortKey>,
    pub(super) flows: BTreeSet<NodePortKey>,
    pub(super) drops: BTreeSet<NodePortKey>,
    pub(super) tx: BTreeSet<NodePortKey>,
    pub(super) backends: BTreeSet<(NodePortKey, SocketAddrV4)>,
    /// Node port → the chain its `nat` element jumps to.
    pub(super) nat: BTreeMap<NodePortKey, String>,
    /// (node port, hash slot) → endpoint.
    pub(super) endpoints: BTreeMap<(NodePortKey, u32), SocketAddrV4>,
    pub(super) chains: BTreeMap<String, ChainState>,
}

impl TableState {
    /// What the kernel must hold for `snapshot`.
    pub(super) fn desired(snapshot: &Snapshot) -> Self {
        let snapshot = &snapshot.v4();
        let mut state = Self {
            exists: true,
            node_addrs: snapshot.node_addrs.iter().copied().collect(),
            ..Self::default()
        };
        let mut chains: BTreeSet<String> = FIXED_CHAINS.iter().map(|c| (*c).to_owned()).collect();
        for (key, endpoints) in &snapshot.node_ports {
            let endpoints: BTreeSet<SocketAddrV4> = endpoints.iter().copied().collect();
            state.rx.insert(*key);
            state.flows.insert(*key);
            state.drops.insert(*key);
            state.tx.insert(*key);
            let target = if endpoints.is_empty() {
                "no_endpoints".to_owned()
            } else {
                endpoints_chain(endpoints.len())
            };
            chains.insert(target.clone());
            state.nat.insert(*key, target);
            for (slot, endpoint) in (0u32..).zip(&endpoints) {
                state.backends.insert((*key, *endpoint));
                state.endpoints.insert((*key, slot), *endpoint);
            }
        }
        state.chains = chains
            .into_iter()
            .filter_map(|name| Some((name.clone(), ChainState::from(&chain_def(&name)?))))
            .collect();
        state
    }

    /// UDP (node port, endpoint) pairs in `self` but not in `next`: their conntrack entries
    /// are stale.
    pub(super) fn removed_udp_backends(&self, next: &Self) -> Vec<(NodePortKey, SocketAddrV4)> {
        self.backends
            .difference(&next.backends)
            .filter(|(key, _)| key.protocol == Protocol::Udp)
            .copied()
            .collect()
    }
}
