//! Node-port traffic for `miren ports`: counts read from the data plane's kernel counters at
//! the request, rates against an earlier sample (the previous request's when it is recent,
//! else one taken a second before), in total and per address family.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::types::{NodePortInfo, PortTraffic};
use crate::{
    config::Protocol,
    dataplane::{ActiveDataplane, Counters, DataplaneError, Family, NodePortKey, PortCounters},
};

/// Rates need samples at least this far apart.
const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// An earlier sample older than this is too stale for a current rate.
const MAX_AGE: Duration = Duration::from_secs(30);
/// How long to wait for a second sample when there is no usable earlier one.
const SAMPLE_WAIT: Duration = Duration::from_secs(1);

/// Samples kept between requests.
const KEPT: usize = 4;

/// Remembers recent counter samples between requests.
#[derive(Debug, Default)]
pub struct TrafficSampler {
    samples: Mutex<VecDeque<(Instant, Counters)>>,
}

impl TrafficSampler {
    /// Fills `traffic` of every port in `ports` from `dataplane`'s counters now and the rates
    /// since an earlier sample.
    ///
    /// # Errors
    /// [`DataplaneError`] when the counters cannot be read.
    pub async fn fill(
        &self,
        dataplane: &Arc<ActiveDataplane>,
        ports: &mut [NodePortInfo],
    ) -> Result<(), DataplaneError> {
        // The newest sample at least MIN_INTERVAL old, else the oldest recent one.
        let earlier = {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            samples.retain(|(at, _)| at.elapsed() <= MAX_AGE);
            samples
                .iter()
                .rev()
                .find(|(at, _)| at.elapsed() >= MIN_INTERVAL)
                .or_else(|| samples.front())
                .cloned()
        };
        let earlier = match earlier {
            Some(sample) => sample,
            None => {
                let first = read(dataplane).await?;
                tokio::time::sleep(SAMPLE_WAIT).await;
                first
            }
        };
        let now = read(dataplane).await?;
        let elapsed = now.0.duration_since(earlier.0);
        for port in ports.iter_mut() {
            let Some(protocol) = Protocol::from_name(&port.protocol) else {
                continue;
            };
            let key = NodePortKey {
                port: port.node_port,
                protocol,
            };
            port.traffic = traffic_of(key, &now.1, &earlier.1, elapsed);
        }
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples
            .back()
            .is_none_or(|(at, _)| now.0.duration_since(*at) >= MIN_INTERVAL)
        {
            samples.push_back(now);
            if samples.len() > KEPT {
                samples.pop_front();
            }
        }
        Ok(())
    }
}

/// Reads the counters on a blocking thread (the nft data plane runs a command).
async fn read(dataplane: &Arc<ActiveDataplane>) -> Result<(Instant, Counters), DataplaneError> {
    let dataplane = Arc::clone(dataplane);
    tokio::task::spawn_blocking(move || {
        let counters = dataplane.counters()?;
        Ok((Instant::now(), counters))
    })
    .await
    .map_err(|join| DataplaneError::Io {
        op: "reading counters".into(),
        source: std::io::Error::other(join.to_string()),
    })?
}

/// The traffic of node port `key` in the counters `now` and since `earlier`, `elapsed` before:
/// totals and each family's part; `None` if `now` does not count it.
fn traffic_of(
    key: NodePortKey,
    now: &Counters,
    earlier: &Counters,
    elapsed: Duration,
) -> Option<PortTraffic> {
    let mut traffic = port_traffic(now.ports.get(&key)?, earlier.ports.get(&key), elapsed);
    for family in Family::ALL {
        if let Some(part) = now.families.get(&(key, family)) {
            let part = port_traffic(part, earlier.families.get(&(key, family)), elapsed);
            traffic.by_family.insert(family.label().to_owned(), part);
        }
    }
    Some(traffic)
}

/// Counts of `now` and rates since `earlier`, `elapsed` before. A node port without an
/// earlier sample (just created) counts from zero.
pub fn port_traffic(
    now: &PortCounters,
    earlier: Option<&PortCounters>,
    elapsed: Duration,
) -> PortTraffic {
    let zero = PortCounters::default();
    let earlier = earlier.unwrap_or(&zero);
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    // A counter that went backwards (the node port was recreated) has no rate.
    let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
    PortTraffic {
        rx_packets: now.rx_packets,
        rx_bytes: now.rx_bytes,
        tx_packets: now.tx_packets,
        tx_bytes: now.tx_bytes,
        flows: now.flows,
        drops: now.drop_no_backend + now.drop_table_miss,
        rx_pps: rate(now.rx_packets, earlier.rx_packets),
        rx_bps: rate(now.rx_bytes, earlier.rx_bytes),
        tx_pps: rate(now.tx_packets, earlier.tx_packets),
        tx_bps: rate(now.tx_bytes, earlier.tx_bytes),
        by_family: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_deltas_per_second() {
        let earlier = PortCounters {
            rx_packets: 100,
            rx_bytes: 10_000,
            tx_packets: 50,
            tx_bytes: 5_000,
            ..PortCounters::default()
        };
        let now = PortCounters {
            rx_packets: 300,
            rx_bytes: 30_000,
            tx_packets: 150,
            tx_bytes: 15_000,
            flows: 7,
            drop_no_backend: 2,
            drop_table_miss: 1,
        };
        let traffic = port_traffic(&now, Some(&earlier), Duration::from_secs(2));
        assert_eq!(
            traffic,
            PortTraffic {
                rx_packets: 300,
                rx_bytes: 30_000,
                tx_packets: 150,
                tx_bytes: 15_000,
                flows: 7,
                drops: 3,
                rx_pps: 100.0,
                rx_bps: 10_000.0,
                tx_pps: 50.0,
                tx_bps: 5_000.0,
                by_family: Default::default(),
            }
        );
    }

    #[test]
    fn each_family_has_its_own_counts_and_rates_beside_the_totals() {
        let key = NodePortKey {
            port: 7000,
            protocol: Protocol::Udp,
        };
        let sample = |v4: u64, v6: u64| {
            let mut counters = Counters::default();
            for (family, packets) in [(Family::V4, v4), (Family::V6, v6)] {
                let part = PortCounters {
                    rx_packets: packets,
                    flows: 1,
                    ..PortCounters::default()
                };
                counters.insert_port(key, family, part);
            }
            counters
        };
        let traffic =
            traffic_of(key, &sample(30, 12), &sample(10, 2), Duration::from_secs(2)).unwrap();
        assert_eq!(
            (traffic.rx_packets, traffic.rx_pps, traffic.flows),
            (42, 15.0, 2)
        );
        let part = |family: &str| {
            let part = &traffic.by_family[family];
            (
                part.rx_packets,
                part.rx_pps,
                part.flows,
                part.by_family.len(),
            )
        };
        assert_eq!(part("ipv4"), (30, 10.0, 1, 0));
        assert_eq!(part("ipv6"), (12, 5.0, 1, 0));
        let other = NodePortKey { port: 7001, ..key };
        assert_eq!(
            traffic_of(other, &sample(1, 1), &sample(1, 1), Duration::from_secs(1)),
            None
        );

        // A cluster's sum adds each family too.
        let mut sum = traffic.clone();
        sum.add(&traffic);
        assert_eq!(sum.by_family["ipv6"].rx_packets, 24);
        assert_eq!(sum.rx_packets, 84);
    }

    #[test]
    fn a_new_port_counts_from_zero_and_a_reset_has_no_rate() {
        let now = PortCounters {
            rx_packets: 10,
            ..PortCounters::default()
        };
        assert_eq!(
            port_traffic(&now, None, Duration::from_millis(500)).rx_pps,
            20.0
        );
        let before_reset = PortCounters {
            rx_packets: 1_000,
            ..PortCounters::default()
        };
        assert_eq!(
            port_traffic(&now, Some(&before_reset), Duration::from_secs(1)).rx_pps,
            0.0
        );
    }
}
