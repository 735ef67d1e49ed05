//! The reconciler: makes the active data plane match the control plane's desired state (the
//! apps' node ports plus their live endpoints on every node, and the other nodes' subnets for
//! the cross-node masquerade) after every change and every
//! [`RESYNC_INTERVAL`], retries failures with exponential backoff, and records the outcome per
//! node port ([`DataplaneReport`]) and in the reconcile metrics.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    config::DualStack,
    control::{ControlPlane, DataplaneReport},
    dataplane::{ActiveDataplane, Dataplane, Snapshot, peer_nat::PeerSubnets},
    metrics::Metrics,
};

/// How often the kernel state is read back and the desired state re-applied without changes.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// First retry delay after a failure; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Longest retry delay.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What one apply achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What the kernel holds now (as far as the agent knows).
    pub applied: Snapshot,
    /// Why the whole apply failed, if it did.
    pub failure: Option<String>,
    /// Node ports that could not be applied, with the reason.
    pub port_errors: std::collections::BTreeMap<crate::dataplane::NodePortKey, String>,
}

/// Applies `desired` to `plane`. A node port the data plane rejects on its own (e.g. a map is
/// full) keeps its entry from `previous` — or, if that fails too, is left out — and is
/// reported; the other node ports are applied. When the whole apply fails, `previous` is
/// re-applied so the kernel keeps its last working state.
pub fn apply_keeping_previous(
    plane: &mut dyn Dataplane,
    desired: &Snapshot,
    previous: &Snapshot,
) -> Outcome {
    let mut snapshot = desired.clone();
    let mut port_errors = std::collections::BTreeMap::new();
    let failure = loop {
        let Err(err) = plane.apply(&snapshot) else {
            return Outcome {
                applied: snapshot,
                failure: None,
                port_errors,
            };
        };
        let Some(port) = err.port() else {
            break err.to_string();
        };
        if port_errors.contains_key(&port) {
            // Its previous entry was refused too: leave the node port out.
            if snapshot.node_ports.remove(&port).is_none() {
                break err.to_string();
            }
            continue;
        }
        port_errors.insert(port, err.to_string());
        match previous.node_ports.get(&port) {
            Some(endpoints) => snapshot.node_ports.insert(port, endpoints.clone()),
            None => snapshot.node_ports.remove(&port),
        };
    };
    if let Err(err) = plane.apply(previous) {
        tracing::error!(%err, "restoring the previous node-port state failed too");
    }
    Outcome {
        applied: previous.clone(),
        failure: Some(failure),
        port_errors,
    }
}

/// Exponential retry delays: [`FIRST_RETRY`], doubling, at most [`MAX_RETRY`].
#[derive(Debug, Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// The delay before the next retry.
    fn next(&mut self) -> Duration {
        let delay = self.next.unwrap_or(FIRST_RETRY);
        self.next = Some((delay * 2).min(MAX_RETRY));
        delay
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// Keeps one data plane in line with the control plane.
#[derive(Debug)]
pub struct Reconciler {
    control: Arc<ControlPlane>,
    dataplane: Arc<ActiveDataplane>,
    node_addrs: Vec<IpAddr>,
    /// How instances' IPv6 endpoints mirror their IPv4 ones, when the node has IPv6 node
    /// addresses.
    dual_stack: Option<DualStack>,
    metrics: Arc<Metrics>,
}

impl Reconciler {
    /// A reconciler for `dataplane` serving the node addresses `node_addrs` (with IPv6
    /// endpoints mirrored by `dual_stack`).
    pub fn new(
        control: Arc<ControlPlane>,
        dataplane: Arc<ActiveDataplane>,
        node_addrs: Vec<IpAddr>,
        dual_stack: Option<DualStack>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            control,
            dataplane,
            node_addrs,
            dual_stack,
            metrics,
        }
    }

    /// Applies the desired state now, after every change, every [`RESYNC_INTERVAL`] (reading
    /// the kernel state back first, so drift is repaired) and after failures with backoff.
    pub async fn run(self) {
        let mut changes = self.control.subscribe();
        let mut applied = Snapshot::default();
        let mut backoff = Backoff::default();
        let mut refresh = false;
        loop {
            let (revision, desired) = self
                .control
                .dataplane_snapshot(&self.node_addrs, self.dual_stack);
            let peer_subnets = PeerSubnets::new(
                self.control.peers().iter().map(|peer| peer.subnet),
                self.dual_stack.as_ref(),
            );
            let started = Instant::now();
            let dataplane = Arc::clone(&self.dataplane);
            let previous = applied.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                // First, so a new flow to another node's instance is masqueraded from its first
                // packet on (conntrack keeps a flow's NAT as its first packet set it).
                let peers = dataplane.set_peer_subnets(&peer_subnets);
                let mut plane = dataplane.lock();
                if refresh && let Err(err) = plane.refresh() {
                    return Outcome {
                        applied: previous,
                        failure: Some(format!("reading the kernel state back: {err}")),
                        port_errors: Default::default(),
                    };
                }
                let mut outcome = apply_keeping_previous(&mut **plane, &desired, &previous);
                if let Err(err) = peers {
                    outcome.failure.get_or_insert_with(|| {
                        format!("masquerading flows to other nodes' instances: {err}")
                    });
                }
                outcome
            })
            .await
            .unwrap_or_else(|join| Outcome {
                applied: applied.clone(),
                failure: Some(format!("the apply task failed: {join}")),
                port_errors: Default::default(),
            });
            let failed = outcome.failure.is_some() || !outcome.port_errors.is_empty();
            self.metrics
                .observe_reconcile(started.elapsed(), outcome.failure.is_none());
            if let Some(failure) = &outcome.failure {
                tracing::error!(%failure, "applying the node-port state failed; the previous state is kept");
            }
            for (port, error) in &outcome.port_errors {
                tracing::error!(%port, %error, "node port not applied");
            }
            tracing::debug!(revision, elapsed = ?started.elapsed(), "node-port state applied");
            applied = outcome.applied;
            self.control.set_dataplane_report(DataplaneReport {
                revision,
                failure: outcome.failure.clone(),
                port_errors: outcome.port_errors,
            });
            let wait = if failed {
                backoff.next()
            } else {
                backoff.reset();
                RESYNC_INTERVAL
            };
            refresh = outcome.failure.is_some();
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(wait) => refresh |= !failed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    };

    use super::*;
    use crate::{
        config::Protocol,
        dataplane::{Counters, DataplaneError, NodePortKey, Snapshot4},
    };

    /// The fake's rule for refusing one node port.
    type Refuse = Box<dyn Fn(NodePortKey, &[SocketAddr]) -> bool + Send>;

    /// An in-memory data plane that refuses chosen node ports or everything.
    #[derive(Default)]
    struct FakeDataplane {
        state: Snapshot,
        applies: usize,
        refuse_port: Option<Refuse>,
        refuse_all: bool,
    }

    impl std::fmt::Debug for FakeDataplane {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FakeDataplane")
                .field("state", &self.state)
                .finish_non_exhaustive()
        }
    }

    impl Dataplane for FakeDataplane {
        fn mode(&self) -> &'static str {
            "fake"
        }

        fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
            self.applies += 1;
            if self.refuse_all {
                return Err(DataplaneError::Command {
                    op: "applying".into(),
                    detail: "refused".into(),
                });
            }
            if let Some(refuse) = &self.refuse_port
                && let Some(port) = snapshot
                    .node_ports
                    .iter()
                    .find(|(port, endpoints)| refuse(**port, endpoints))
                    .map(|(port, _)| *port)
            {
                return Err(DataplaneError::Capacity {
                    port,
                    limit: "full".into(),
                });
            }
            self.state = snapshot.clone();
            Ok(())
        }

        fn refresh(&mut self) -> Result<(), DataplaneError> {
            Ok(())
        }

        fn counters(&self) -> Result<Counters, DataplaneError> {
            Ok(Counters::default())
        }
    }

    fn key(port: u16) -> NodePortKey {
        NodePortKey {
            port,
            protocol: Protocol::Udp,
        }
    }

    fn endpoint(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, last), 8080)
    }

    fn snapshot(ports: &[(u16, u8)]) -> Snapshot {
        Snapshot4 {
            node_addrs: vec![Ipv4Addr::new(10, 0, 0, 1)],
            node_ports: ports
                .iter()
                .map(|&(port, last)| (key(port), vec![endpoint(last)]))
                .collect(),
        }
        .into()
    }

    #[test]
    fn a_clean_apply_reports_nothing() {
        let mut plane = FakeDataplane::default();
        let desired = snapshot(&[(7000, 2), (7001, 3)]);
        let outcome = apply_keeping_previous(&mut plane, &desired, &Snapshot::default());
        assert_eq!(outcome.applied, desired);
        assert_eq!(outcome.failure, None);
        assert!(outcome.port_errors.is_empty());
        assert_eq!(plane.state, desired);
    }

    #[test]
    fn a_refused_port_keeps_its_previous_entry_and_the_rest_is_applied() {
        let mut plane = FakeDataplane::default();
        let previous = snapshot(&[(7000, 2), (7001, 3)]);
        plane.apply(&previous).unwrap();
        // Endpoint .9 does not fit: 7000 keeps .2, the new 7002 is left out.
        plane.refuse_port = Some(Box::new(|_, endpoints| {
            endpoints.contains(&SocketAddr::V4(endpoint(9)))
        }));
        let desired = snapshot(&[(7000, 9), (7001, 4), (7002, 9), (7003, 5)]);
        let outcome = apply_keeping_previous(&mut plane, &desired, &previous);
        assert_eq!(outcome.failure, None);
        assert_eq!(
            outcome.port_errors,
            BTreeMap::from([
                (key(7000), "node port 7000/udp: full".to_owned()),
                (key(7002), "node port 7002/udp: full".to_owned()),
            ])
        );
        assert_eq!(
            outcome.applied,
            snapshot(&[(7000, 2), (7001, 4), (7003, 5)])
        );
        assert_eq!(plane.state, outcome.applied);
    }

    #[test]
    fn a_refused_port_whose_previous_entry_is_refused_too_is_left_out() {
        let mut plane = FakeDataplane::default();
        let previous = snapshot(&[(7000, 2), (7001, 3)]);
        plane.apply(&previous).unwrap();
        plane.refuse_port = Some(Box::new(|port, _| port == key(7001)));
        let desired = snapshot(&[(7000, 2), (7001, 9)]);
        let outcome = apply_keeping_previous(&mut plane, &desired, &previous);
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.port_errors.len(), 1);
        assert_eq!(outcome.applied, snapshot(&[(7000, 2)]));
    }

    #[test]
    fn a_failed_apply_restores_the_previous_state() {
        let mut plane = FakeDataplane::default();
        let previous = snapshot(&[(7000, 2)]);
        plane.apply(&previous).unwrap();
        plane.refuse_all = true;
        let outcome = apply_keeping_previous(&mut plane, &snapshot(&[(7000, 3)]), &previous);
        assert_eq!(outcome.failure.as_deref(), Some("applying: refused"));
        assert_eq!(outcome.applied, previous);
        assert_eq!(plane.state, previous);
        // The desired apply and the restoring apply.
        assert_eq!(plane.applies, 3);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_a_limit() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next()).collect();
        assert_eq!(delays[0], FIRST_RETRY);
        assert_eq!(delays[1], FIRST_RETRY * 2);
        assert_eq!(delays[2], FIRST_RETRY * 4);
        assert_eq!(delays[9], MAX_RETRY);
        backoff.reset();
        assert_eq!(backoff.next(), FIRST_RETRY);
    }

    #[test]
    fn a_port_status_follows_the_report() {
        let mut report = DataplaneReport {
            revision: 4,
            ..DataplaneReport::default()
        };
        assert_eq!(report.port_status(&key(7000), 4), "ok");
        assert_eq!(
            report.port_status(&key(7000), 5),
            "pending: revision 5 not applied yet"
        );
        report
            .port_errors
            .insert(key(7000), "node port 7000/udp: full".into());
        assert_eq!(
            report.port_status(&key(7000), 4),
            "error: node port 7000/udp: full"
        );
        assert_eq!(report.port_status(&key(7001), 4), "ok");
        report.failure = Some("nft: boom".into());
        assert_eq!(
            report.port_status(&key(7001), 4),
            "error: nft: boom (the previous state is kept; retrying)"
        );
    }
}
