//! The nodes of the cluster: each agent registers its node at start (addresses, sandbox
//! subnet) and keeps a heartbeat under its lease; `miren nodes` shows them with their status,
//! `miren node cordon|uncordon|rm` changes them.
//!
//! A node claims its sandbox subnet out of the cluster's `--sandbox-subnet` by creating the
//! subnet's key (so two nodes never get the same one) and keeps it across restarts. On the
//! single-node SQLite store the node takes the whole subnet and is the store's only node.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use super::{ControlError, ControlPlane, commands::now, view::State};
use crate::{
    api::types::NodeInfo,
    config::Subnet,
    store::{
        Txn,
        records::{Heartbeat, NodeRecord, RecordKey, SubnetClaim, encode},
    },
};

/// What a node tells the cluster about itself when its agent starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Its own addresses (`--node-ip`).
    pub addresses: Vec<IpAddr>,
    /// Whether its agent runs instances.
    pub runs_instances: bool,
    /// Where the other agents reach its cluster listener.
    pub cluster_addr: Option<SocketAddr>,
    /// How its sandbox subnet is chosen.
    pub subnet: SubnetPlan,
}

/// What a node may run, set with `miren node cordon|drain|uncordon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    /// New instances may be placed on it.
    Uncordoned,
    /// No new instances; it keeps what it runs.
    Cordoned,
    /// No new instances, and its instances move to other nodes one at a time.
    Draining,
}

/// How this node's sandbox subnet is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubnetPlan {
    /// The store's only node: the whole cluster subnet; other nodes' records are stale.
    Whole(Subnet),
    /// One subnet of this prefix length out of the cluster subnet.
    Carve {
        /// The cluster's sandbox subnet.
        cluster: Subnet,
        /// Prefix length of a node's subnet.
        prefix: u8,
    },
}

impl ControlPlane {
    /// Registers this node as `registration` describes it, with its sandbox subnet (claimed
    /// now, or kept from an earlier start), and writes its first heartbeat; returns the subnet.
    ///
    /// # Errors
    /// [`ControlError::Conflict`] when no subnet is free; store errors.
    pub async fn register_node(&self, registration: &Registration) -> Result<Subnet, ControlError> {
        let plan = registration.subnet;
        let node = self.settings.node.clone();
        let lease = self.lease.id();
        let registered_at = now();
        self.run(|state| {
            let subnet = node_subnet(state, &node, plan)?;
            let mut txn = Txn::default();
            let subnet_key = RecordKey::Subnet(subnet.to_string());
            let held = state
                .subnets
                .get(&subnet.to_string())
                .filter(|claim| claim.value == node)
                .map_or(0, |claim| claim.mod_revision);
            txn.compare(subnet_key.clone(), held)
                .put(subnet_key, encode(&SubnetClaim { node: node.clone() }));
            let existing = state.nodes.get(&node);
            let record = NodeRecord {
                name: node.clone(),
                addresses: registration.addresses.clone(),
                cluster_addr: registration.cluster_addr,
                subnet: subnet.to_string(),
                cordoned: existing.is_some_and(|n| n.value.cordoned),
                draining: existing.is_some_and(|n| n.value.draining),
                runs_instances: registration.runs_instances,
                registered_at: existing.map_or(registered_at, |n| n.value.registered_at),
            };
            let key = RecordKey::Node(node.clone());
            txn.compare(key.clone(), existing.map_or(0, |n| n.mod_revision))
                .put(key, encode(&record))
                .put_leased(
                    RecordKey::Alive(node.clone()),
                    encode(&Heartbeat { at: registered_at }),
                    Some(lease),
                );
            if matches!(plan, SubnetPlan::Whole(_)) {
                let others: BTreeSet<&String> = state
                    .nodes
                    .keys()
                    .chain(state.alive.keys())
                    .chain(state.subnets.values().map(|claim| &claim.value))
                    .filter(|name| **name != node)
                    .collect();
                for other in others {
                    forget_node(&mut txn, state, other);
                }
            }
            Ok((txn, subnet))
        })
        .await
    }

    /// Cordons, drains or uncordons a node: a cordoned node gets no new instances; a
    /// draining one also has its instances moved off, one at a time.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown node.
    pub async fn set_node_mode(
        &self,
        name: &str,
        mode: NodeMode,
    ) -> Result<NodeInfo, ControlError> {
        self.run(|state| {
            let node = find_node(state, name)?;
            let record = NodeRecord {
                cordoned: mode != NodeMode::Uncordoned,
                draining: mode == NodeMode::Draining,
                ..node.value.clone()
            };
            let key = RecordKey::Node(name.to_owned());
            let mut txn = Txn::default();
            txn.compare(key.clone(), node.mod_revision)
                .put(key, encode(&record));
            Ok((txn, ()))
        })
        .await?;
        self.node(name)
    }

    /// Removes a lost node: its record, subnet and endpoints.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown node; [`ControlError::Conflict`] while the
    /// node is alive.
    pub async fn remove_node(&self, name: &str) -> Result<NodeInfo, ControlError> {
        self.run(|state| {
            find_node(state, name)?;
            if state.alive.contains_key(name) {
                return Err(ControlError::Conflict(format!(
                    "node \"{name}\" is alive (its agent renews its lease); stop its agent first"
                )));
            }
            let info = node_info(state, name).expect("the node exists");
            let mut txn = Txn::default();
            forget_node(&mut txn, state, name);
            Ok((txn, info))
        })
        .await
    }

    /// Every node of the cluster.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let state = self.view.lock();
        state
            .nodes
            .keys()
            .filter_map(|name| node_info(&state, name))
            .collect()
    }

    /// One node.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown node.
    pub fn node(&self, name: &str) -> Result<NodeInfo, ControlError> {
        node_info(&self.view.lock(), name).ok_or_else(|| no_such_node(name))
    }
}

fn no_such_node(name: &str) -> ControlError {
    ControlError::NotFound(format!("no node named \"{name}\"; see `miren nodes`"))
}

fn find_node<'a>(
    state: &'a State,
    name: &str,
) -> Result<&'a super::view::Versioned<NodeRecord>, ControlError> {
    state.nodes.get(name).ok_or_else(|| no_such_node(name))
}

/// The subnet `node` holds (inside the cluster subnet), else the first free one.
fn node_subnet(state: &State, node: &str, plan: SubnetPlan) -> Result<Subnet, ControlError> {
    let (cluster, prefix) = match plan {
        SubnetPlan::Whole(subnet) => return Ok(subnet),
        SubnetPlan::Carve { cluster, prefix } => (cluster, prefix),
    };
    let held = state
        .subnets
        .iter()
        .filter(|(_, claim)| claim.value == node)
        .filter_map(|(subnet, _)| Subnet::parse(subnet).ok())
        .find(|subnet| cluster.contains(subnet.network) && subnet.prefix >= cluster.prefix);
    if let Some(subnet) = held {
        return Ok(subnet);
    }
    cluster
        .split(prefix)
        .find(|subnet| !state.subnets.contains_key(&subnet.to_string()))
        .ok_or_else(|| {
            ControlError::Conflict(format!(
                "no free /{prefix} sandbox subnet is left in {cluster} for node \"{node}\"; remove lost nodes with `miren node rm`, or use a larger --sandbox-subnet"
            ))
        })
}

/// Adds the deletion of everything `node` owns to `txn`.
fn forget_node(txn: &mut Txn, state: &State, node: &str) {
    if let Some(record) = state.nodes.get(node) {
        let key = RecordKey::Node(node.to_owned());
        txn.compare(key.clone(), record.mod_revision).delete(key);
    }
    txn.delete(RecordKey::Alive(node.to_owned()));
    for (role, leader) in state.leaders.iter().filter(|(_, l)| l.value.node == node) {
        let key = RecordKey::Leader(role.clone());
        txn.compare(key.clone(), leader.mod_revision).delete(key);
    }
    for (subnet, claim) in state.subnets.iter().filter(|(_, c)| c.value == node) {
        let key = RecordKey::Subnet(subnet.clone());
        txn.compare(key.clone(), claim.mod_revision).delete(key);
    }
    for ((app, service), nodes) in &state.endpoints {
        if nodes.contains_key(node) {
            txn.delete(RecordKey::Endpoints {
                app: app.clone(),
                service: service.clone(),
                node: node.to_owned(),
            });
        }
    }
}

fn node_info(state: &State, name: &str) -> Option<NodeInfo> {
    let node = &state.nodes.get(name)?.value;
    let status = match (state.alive.contains_key(name), node.draining, node.cordoned) {
        (false, _, _) => "lost",
        (true, true, _) => "draining",
        (true, false, true) => "cordoned",
        (true, false, false) => "ready",
    };
    let instances: BTreeSet<IpAddr> = state
        .endpoints
        .values()
        .filter_map(|nodes| nodes.get(name))
        .flat_map(|endpoints| endpoints.value.values().flatten().map(|addr| addr.ip()))
        .collect();
    Some(NodeInfo {
        name: name.to_owned(),
        addresses: node.addresses.iter().map(ToString::to_string).collect(),
        status: status.into(),
        cordoned: node.cordoned,
        instances: instances.len(),
        subnet: node.subnet.clone(),
        cluster_addr: node.cluster_addr.map(|addr| addr.to_string()),
        last_heartbeat: state.last_heartbeat.get(name).copied(),
    })
}
