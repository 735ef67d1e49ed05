//! [`WithCompanion`]: the XDP data plane plus the nftables companion for the traffic XDP
//! cannot see.
//!
//! XDP sees only packets arriving on its interfaces (`--iface`). Two kinds of node-port
//! traffic never do: connections from the node itself to `NODE_IP:node_port` (they leave
//! through the output hook and loop back without crossing an XDP interface) and an instance
//! calling a node port through the node address (it arrives on the sandbox bridge). The
//! companion is the nftables data plane's own code in [`Scope::Companion`]: its table
//! `inet miren_local` DNATs the output hook's connections and prerouting packets from any
//! interface that is not an XDP one, and masquerades the latter (hairpin). Packets arriving on
//! an XDP interface are never DNATed nor counted by it, and XDP's DNAT leaves no `ct status
//! dnat` for its reply and backend rules to match, so each packet is counted by one plane
//! only and [`Dataplane::counters`] sums the two.
//!
//! [`Scope::Companion`]: super::nft::Scope::Companion

use super::{Counters, Dataplane, DataplaneError, Snapshot};

/// A data plane (XDP) and its companion (nftables), applied from the same [`Snapshot`].
#[derive(Debug)]
pub struct WithCompanion {
    /// The data plane whose mode is reported (XDP).
    main: Box<dyn Dataplane>,
    /// The companion for the traffic `main` cannot see.
    companion: Box<dyn Dataplane>,
}

impl WithCompanion {
    /// `main` with `companion`.
    pub fn new(main: Box<dyn Dataplane>, companion: Box<dyn Dataplane>) -> Self {
        Self { main, companion }
    }
}

impl Dataplane for WithCompanion {
    /// The main data plane's mode (`xdp`).
    fn mode(&self) -> &'static str {
        self.main.mode()
    }

    /// Applies `snapshot` to the main data plane, then to the companion. An error of the main
    /// one is returned before the companion is touched: the reconciler's retry (e.g. with a
    /// node port over capacity kept at its previous entry) applies both again.
    fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
        self.main.apply(snapshot)?;
        self.companion.apply(snapshot)
    }

    fn refresh(&mut self) -> Result<(), DataplaneError> {
        self.main.refresh()?;
        self.companion.refresh()
    }

    /// The sum of both planes' counters (they count disjoint packets).
    fn counters(&self) -> Result<Counters, DataplaneError> {
        let mut sum = self.main.counters()?;
        sum.add(&self.companion.counters()?);
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::{
        config::Protocol,
        dataplane::{BackendCounters, Family, GlobalCounters, NodePortKey, PortCounters},
    };

    /// A plane recording what it is asked into a shared log, with fixed counters.
    #[derive(Debug)]
    struct Recording {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        fail_apply: bool,
        counters: Counters,
    }

    impl Dataplane for Recording {
        fn mode(&self) -> &'static str {
            self.name
        }

        fn apply(&mut self, snapshot: &Snapshot) -> Result<(), DataplaneError> {
            self.log.lock().unwrap().push(format!(
                "{} apply {}",
                self.name,
                snapshot.node_ports.len()
            ));
            if self.fail_apply {
                return Err(DataplaneError::Capacity {
                    port: port(),
                    limit: "full".into(),
                });
            }
            Ok(())
        }

        fn refresh(&mut self) -> Result<(), DataplaneError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} refresh", self.name));
            Ok(())
        }

        fn counters(&self) -> Result<Counters, DataplaneError> {
            Ok(self.counters.clone())
        }
    }

    fn port() -> NodePortKey {
        NodePortKey {
            port: 7000,
            protocol: Protocol::Udp,
        }
    }

    fn backend() -> SocketAddr {
        "10.88.0.2:9000".parse().unwrap()
    }

    fn counters(rx: u64, backend_packets: u64, passed: u64) -> Counters {
        let mut counters = Counters::default();
        counters.insert_port(
            port(),
            Family::V4,
            PortCounters {
                rx_packets: rx,
                rx_bytes: rx * 100,
                flows: 1,
                ..PortCounters::default()
            },
        );
        counters.insert_backend(
            port(),
            backend(),
            BackendCounters {
                packets: backend_packets,
                bytes: backend_packets * 100,
            },
        );
        counters.global = GlobalCounters {
            passed,
            ..GlobalCounters::default()
        };
        counters
    }

    fn planes(main_fails: bool) -> (WithCompanion, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let plane = |name, fail_apply, counters| {
            Box::new(Recording {
                name,
                log: log.clone(),
                fail_apply,
                counters,
            })
        };
        let both = WithCompanion::new(
            plane("xdp", main_fails, counters(10, 8, 3)),
            plane("nft", false, counters(2, 2, 0)),
        );
        (both, log)
    }

    #[test]
    fn both_planes_get_the_snapshot_and_the_mode_is_the_main_one() {
        let (mut both, log) = planes(false);
        let mut snapshot = Snapshot::default();
        snapshot.node_ports.insert(port(), vec![backend()]);
        both.apply(&snapshot).unwrap();
        both.refresh().unwrap();
        assert_eq!(both.mode(), "xdp");
        assert_eq!(
            *log.lock().unwrap(),
            ["xdp apply 1", "nft apply 1", "xdp refresh", "nft refresh"]
        );
    }

    #[test]
    fn an_error_of_the_main_plane_is_returned_before_the_companion_applies() {
        let (mut both, log) = planes(true);
        let err = both.apply(&Snapshot::default()).unwrap_err();
        assert_eq!(err.port(), Some(port()));
        assert_eq!(*log.lock().unwrap(), ["xdp apply 0"]);
    }

    #[test]
    fn counters_are_summed() {
        let (both, _) = planes(false);
        let sum = both.counters().unwrap();
        let ports = &sum.ports[&port()];
        assert_eq!(
            (ports.rx_packets, ports.rx_bytes, ports.flows),
            (12, 1200, 2)
        );
        assert_eq!(sum.families[&(port(), Family::V4)], *ports);
        let backends: Vec<_> = sum.backends_of(port()).collect();
        assert_eq!(
            backends,
            [(
                backend(),
                &BackendCounters {
                    packets: 10,
                    bytes: 1000
                }
            )]
        );
        assert_eq!(sum.global.passed, 3);
    }
}
