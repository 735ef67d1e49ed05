//! Auto services, cluster-wide: each node reports the requests its ingress has for them
//! (`demand/APP/SERVICE/NODE`, under the node's lease, present while the node saw a request
//! within the service's `scale_down_delay`), and the scheduler sizes every auto service from
//! the sum over the nodes ([`AutoScaler`]): one instance per `requests_per_instance`
//! requests in flight, at least one while any node has demand, and one fewer per
//! `scale_down_delay` once no node has any.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use super::{ControlError, ControlPlane, view::State};
use crate::{
    config::ConcurrencyMode,
    store::{
        Txn,
        records::{Demand, RecordKey, encode},
    },
};

type Key = (String, String);

/// An instance on this node that exited by itself (not stopped on request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceExit {
    /// Its app.
    pub app: String,
    /// Its service.
    pub service: String,
    /// How it ended (e.g. "exit status: 3", "killed by SIGKILL").
    pub how: String,
}

impl ControlPlane {
    /// Tells whoever waits for `exit`'s service (the ingress's activations) that one of its
    /// instances on this node exited.
    pub fn report_instance_exit(&self, exit: InstanceExit) {
        // Nobody listening is fine: no activation is waiting.
        let _ = self.instance_exits.send(exit);
    }

    /// The exits of this node's instances reported from now on.
    pub fn instance_exits(&self) -> tokio::sync::broadcast::Receiver<InstanceExit> {
        self.instance_exits.subscribe()
    }

    /// The auto services (with a command) of the apps, with their `scale_down_delay`: what
    /// the ingress reports demand for.
    pub fn auto_services(&self) -> BTreeMap<Key, Duration> {
        let state = self.view.lock();
        state
            .valid_apps()
            .flat_map(|(record, config)| {
                config.services.values().filter_map(|service| {
                    match (&service.command, &service.concurrency.mode) {
                        (
                            Some(_),
                            ConcurrencyMode::Auto {
                                scale_down_delay, ..
                            },
                        ) => Some((
                            (record.name.clone(), service.name.clone()),
                            *scale_down_delay,
                        )),
                        _ => None,
                    }
                })
            })
            .collect()
    }

    /// This node's demand for every service, as the view has it.
    pub fn reported_demand(&self) -> BTreeMap<Key, u32> {
        let state = self.view.lock();
        state
            .demand
            .iter()
            .filter_map(|(key, nodes)| {
                Some((key.clone(), nodes.get(&self.settings.node)?.in_flight))
            })
            .collect()
    }

    /// Reports this node's demand for `app`'s `service` (`None`: it has none).
    ///
    /// # Errors
    /// The store's.
    pub async fn report_demand(
        &self,
        app: &str,
        service: &str,
        demand: Option<u32>,
    ) -> Result<(), ControlError> {
        let key = RecordKey::Demand {
            app: app.to_owned(),
            service: service.to_owned(),
            node: self.settings.node.clone(),
        };
        let lease = self.lease.id();
        self.run(|_| {
            let mut txn = Txn::default();
            match demand {
                Some(in_flight) => {
                    txn.put_leased(key.clone(), encode(&Demand { in_flight }), Some(lease))
                }
                None => txn.delete(key.clone()),
            };
            Ok((txn, ()))
        })
        .await
    }

    /// Whether asking for an instance of `app`'s `service` can lead anywhere; the reason
    /// when not (it has no command, or no node of the cluster runs instances).
    ///
    /// # Errors
    /// The reason, for the waiting requests' 503.
    pub fn can_activate(&self, app: &str, service: &str) -> Result<(), String> {
        let state = self.view.lock();
        let Some((_, config)) = state.app(app) else {
            return Err(format!("app {app} is not deployed"));
        };
        let Some(service_config) = config.services.get(service) else {
            return Err(format!("app {app} has no service {service} to start"));
        };
        if service_config.command.is_none() {
            return Err("none are set and the service has no command to start".into());
        }
        let runs_instances = state
            .nodes
            .values()
            .any(|node| node.value.runs_instances && state.alive.contains_key(&node.value.name));
        if !runs_instances {
            return Err("none are set and no node of the cluster runs instances".into());
        }
        Ok(())
    }
}

/// The scheduler's memory for auto services: when each may next lose an instance once idle.
/// A service it has not seen yet (a new scheduler) waits a whole `scale_down_delay` first; a
/// service whose demand just ended may lose one at once (its nodes already waited that long
/// before withdrawing their demand).
#[derive(Debug, Default)]
pub struct AutoScaler {
    next_step: HashMap<Key, Instant>,
}

impl AutoScaler {
    /// How many instances each auto service should have at `now`, from the demand in
    /// `state` and the instances placed, with no service above `max_instances`.
    pub fn targets(
        &mut self,
        state: &State,
        max_instances: usize,
        now: Instant,
    ) -> BTreeMap<Key, usize> {
        let mut targets = BTreeMap::new();
        for (record, config) in state.valid_apps() {
            for service in config.services.values() {
                let (
                    Some(_),
                    ConcurrencyMode::Auto {
                        requests_per_instance,
                        scale_down_delay,
                    },
                ) = (&service.command, &service.concurrency.mode)
                else {
                    continue;
                };
                let key = (record.name.clone(), service.name.clone());
                let placed = state
                    .placements
                    .get(&key)
                    .map_or(0, |p| p.value.nodes.len());
                let demand = state.demand.get(&key).filter(|nodes| !nodes.is_empty());
                let target = if let Some(nodes) = demand {
                    self.next_step.insert(key.clone(), now);
                    let in_flight: usize = nodes.values().map(|d| d.in_flight as usize).sum();
                    let wanted = in_flight
                        .div_ceil((*requests_per_instance).max(1) as usize)
                        .max(1);
                    placed.max(wanted).min(max_instances)
                } else if placed == 0 {
                    self.next_step.remove(&key);
                    0
                } else {
                    match self.next_step.get(&key).copied() {
                        None => {
                            self.next_step.insert(key.clone(), now + *scale_down_delay);
                            placed
                        }
                        Some(at) if now < at => placed,
                        Some(_) => {
                            // No node saw a request for a whole scale_down_delay.
                            self.next_step.insert(key.clone(), now + *scale_down_delay);
                            tracing::info!(
                                app = %key.0,
                                service = %key.1,
                                instances = placed - 1,
                                "idle; scaling down"
                            );
                            placed - 1
                        }
                    }
                };
                targets.insert(key, target);
            }
        }
        self.next_step.retain(|key, _| targets.contains_key(key));
        targets
    }
}
