//! Where services' instances should run: a pure function of the view (and, for auto
//! services, of the instance counts [`super::demand::AutoScaler`] asks for), used by the
//! elected scheduler.
//!
//! - Instances on nodes whose lease ended (lost) are placed again elsewhere.
//! - New instances go to eligible nodes (alive, not cordoned, running instances): spread
//!   first (a node gets a second instance of a service only when every eligible node has one),
//!   then the node with the fewest instances in all, then by name.
//! - Scaling down removes instances from the nodes with the most instances of the service.
//! - A draining node's instances move one at a time: a replacement is placed first, and the
//!   old instance is dropped once every other node of the service reports as many ready
//!   instances as it was given.
//! - Cordoned nodes keep what they run but get nothing new.

use std::collections::{BTreeMap, BTreeSet};

use super::view::State;
use crate::{config::ConcurrencyMode, store::records::Placement};

/// The placements that differ from the stored ones: `None` removes a placement.
pub type PlacementChanges = BTreeMap<(String, String), Option<Placement>>;

/// Whether `node` may get new instances.
fn eligible(state: &State, node: &str) -> bool {
    state.alive.contains_key(node)
        && state
            .nodes
            .get(node)
            .is_some_and(|n| n.value.runs_instances && !n.value.cordoned && !n.value.draining)
}

/// Ready instances of a service on a node, as its endpoints tell.
fn ready_on(state: &State, app: &str, service: &str, node: &str) -> usize {
    let ready: BTreeSet<std::net::IpAddr> = state
        .service_endpoints(app, service)
        .filter(|(n, _)| *n == node)
        .flat_map(|(_, ports)| ports.values().flatten().map(|addr| addr.ip()))
        .collect();
    ready.len()
}

/// The changes that bring every service to its wanted placement: fixed services to their
/// `num_instances`, auto services to their count in `auto` (absent or 0: no placement).
pub fn plan(state: &State, auto: &BTreeMap<(String, String), usize>) -> PlacementChanges {
    // (instances, whether readiness shows in endpoints) by (app, service).
    let mut wanted: BTreeMap<(String, String), (usize, bool)> = BTreeMap::new();
    for (record, config) in state.valid_apps() {
        for service in config.services.values() {
            if service.command.is_none() {
                continue;
            }
            let key = (record.name.clone(), service.name.clone());
            let count = match service.concurrency.mode {
                ConcurrencyMode::Fixed { num_instances } => num_instances as usize,
                ConcurrencyMode::Auto { .. } => auto.get(&key).copied().unwrap_or(0),
            };
            if count > 0 {
                wanted.insert(key, (count, !service.ports.is_empty()));
            }
        }
    }
    let mut changes = PlacementChanges::new();
    for key in state.placements.keys() {
        if !wanted.contains_key(key) {
            changes.insert(key.clone(), None);
        }
    }
    // Instances per node over every service, kept current as the plan places them.
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for placement in state.placements.values() {
        for node in &placement.value.nodes {
            *load.entry(node.clone()).or_default() += 1;
        }
    }
    let candidates: Vec<&String> = state.nodes.keys().filter(|n| eligible(state, n)).collect();
    let mut surge_started = state.placements.iter().any(|((app, service), p)| {
        wanted
            .get(&(app.clone(), service.clone()))
            .is_some_and(|(want, _)| p.value.nodes.len() > *want)
    });
    for ((app, service), (want, has_ports)) in &wanted {
        let key = (app.clone(), service.clone());
        let stored = state.placements.get(&key).map(|p| p.value.nodes.clone());
        let mut nodes: Vec<String> = stored.clone().unwrap_or_default();
        // Lost nodes' instances are gone.
        nodes.retain(|node| {
            let keep = state.alive.contains_key(node);
            if !keep {
                *load.entry(node.clone()).or_default() -= 1;
            }
            keep
        });
        let draining = |node: &String| state.nodes.get(node).is_some_and(|n| n.value.draining);
        let on_draining = nodes.iter().filter(|n| draining(n)).count();
        let best = |nodes: &[String], load: &BTreeMap<String, usize>| -> Option<String> {
            candidates
                .iter()
                .min_by_key(|node| {
                    let of_service = nodes.iter().filter(|n| *n == **node).count();
                    (
                        of_service,
                        load.get(**node).copied().unwrap_or(0),
                        (**node).clone(),
                    )
                })
                .map(|node| (*node).clone())
        };
        let add = |nodes: &mut Vec<String>, load: &mut BTreeMap<String, usize>| -> bool {
            let Some(node) = best(nodes, load) else {
                return false;
            };
            *load.entry(node.clone()).or_default() += 1;
            nodes.push(node);
            true
        };
        if on_draining > 0 {
            if nodes.len() <= *want && !surge_started {
                // Start moving one instance: its replacement first.
                surge_started = add(&mut nodes, &mut load);
            } else if nodes.len() > *want {
                let others_ready = !has_ports
                    || nodes
                        .iter()
                        .filter(|n| !draining(n))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .all(|node| {
                            ready_on(state, app, service, node)
                                >= nodes.iter().filter(|n| *n == node).count()
                        });
                if others_ready && let Some(pos) = nodes.iter().position(draining) {
                    *load.entry(nodes.remove(pos)).or_default() -= 1;
                }
            }
        } else {
            while nodes.len() < *want && add(&mut nodes, &mut load) {}
            while nodes.len() > *want {
                let busiest = nodes
                    .iter()
                    .max_by_key(|node| {
                        let of_service = nodes.iter().filter(|n| n == node).count();
                        (
                            of_service,
                            load.get(*node).copied().unwrap_or(0),
                            (*node).clone(),
                        )
                    })
                    .cloned()
                    .expect("nodes is not empty");
                let pos = nodes.iter().position(|n| *n == busiest).expect("present");
                nodes.remove(pos);
                *load.entry(busiest).or_default() -= 1;
            }
        }
        nodes.sort();
        if stored.as_ref() != Some(&nodes) {
            changes.insert(key, Some(Placement { nodes }));
        }
    }
    changes
}
