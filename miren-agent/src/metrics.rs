//! Prometheus metrics on `--metrics-addr` (`GET /metrics`, text exposition). Node-port and
//! backend counters are read from the active data plane's kernel counters at each scrape and
//! labelled with the owning app, service, port name, protocol, node port and address family
//! (`ipv4`, `ipv6`: a node port has a series of each); reconcile health, the data plane
//! mode, the HTTP ingress, the certificates held, ACME orders and the sandboxes' instances
//! live in a registry.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, proto::MetricFamily,
};

use crate::{
    api::types::NodePortInfo,
    control::ControlPlane,
    dataplane::{ActiveDataplane, Counters, DataplaneError, Family, NodePortKey},
    listeners::Inherited,
};

/// Labels of every node-port metric family (`family` is the packets' address family).
const PORT_LABELS: [&str; 6] = [
    "app",
    "service",
    "port_name",
    "protocol",
    "node_port",
    "family",
];

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be bound.
    #[error("cannot listen for /metrics on {addr}: {source}; pass another --metrics-addr")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The data plane's counters could not be read.
    #[error("reading the node-port counters: {0}")]
    Counters(#[from] DataplaneError),
    /// A family could not be built or encoded.
    #[error("encoding metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// The agent's long-lived metrics (reconcile health, data plane mode, HTTP ingress).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Histogram,
    reconcile_errors: IntCounter,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    http_upstream_errors: IntCounterVec,
    http_connections: IntGaugeVec,
    cert_expiry: IntGaugeVec,
    acme_orders: IntCounterVec,
    instances_running: IntGaugeVec,
    instances_ready: IntGaugeVec,
    instance_restarts: IntCounterVec,
    instance_exits: IntCounterVec,
}

/// How an instance ended (`miren_instance_exits_total{reason}`): a closed set, so exit codes
/// and signal numbers never become label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Its process exited with status 0.
    Completed,
    /// Its process exited with a non-zero status.
    Exited,
    /// Its process was killed by a signal (not by the agent stopping it).
    Signaled,
    /// The kernel killed it at its memory limit.
    Oom,
    /// The agent stopped it (scale down, replacement, removal, agent stop).
    Stopped,
    /// It was adopted from an earlier agent, which alone could read its status.
    Unknown,
}

impl ExitReason {
    const ALL: [Self; 6] = [
        Self::Completed,
        Self::Exited,
        Self::Signaled,
        Self::Oom,
        Self::Stopped,
        Self::Unknown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Exited => "exited",
            Self::Signaled => "signaled",
            Self::Oom => "oom",
            Self::Stopped => "stopped",
            Self::Unknown => "unknown",
        }
    }
}

/// How an ACME order ended (`miren_acme_orders_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeOutcome {
    /// The certificate was issued and stored.
    Issued,
    /// The ACME server did not validate the host (its HTTP-01 challenge failed).
    Invalid,
    /// Anything else went wrong (the server, the account, the shared state, the store).
    Failed,
}

impl AcmeOutcome {
    const ALL: [Self; 3] = [Self::Issued, Self::Invalid, Self::Failed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }
}

impl Metrics {
    /// Sets the expiry (Unix seconds) of the certificate stored under `host`.
    pub fn set_cert_expiry(&self, host: &str, not_after: i64) {
        self.cert_expiry.with_label_values(&[host]).set(not_after);
    }

    /// Forgets the certificate stored under `host` (no longer held).
    pub fn remove_cert_expiry(&self, host: &str) {
        let _ = self.cert_expiry.remove_label_values(&[host]);
    }

    /// Counts one ACME order that ended with `outcome`.
    pub fn observe_acme_order(&self, outcome: AcmeOutcome) {
        self.acme_orders
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Sets how many instances of `app`'s `service` run on this node and how many of them are
    /// ready; the first call creates the service's series (its exit counters at 0).
    pub fn set_instances(&self, app: &str, service: &str, running: usize, ready: usize) {
        let labels = [app, service];
        let gauge = |vec: &IntGaugeVec, value: usize| {
            vec.with_label_values(&labels)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        gauge(&self.instances_running, running);
        gauge(&self.instances_ready, ready);
        self.instance_restarts.with_label_values(&labels);
        for reason in ExitReason::ALL {
            self.instance_exits
                .with_label_values(&[app, service, reason.as_str()]);
        }
    }

    /// Counts one ended instance of `app`'s `service`; one that ended by itself (any reason
    /// but [`ExitReason::Stopped`]) is restarted, so it counts as a restart too.
    pub fn observe_instance_exit(&self, app: &str, service: &str, reason: ExitReason) {
        self.instance_exits
            .with_label_values(&[app, service, reason.as_str()])
            .inc();
        if reason != ExitReason::Stopped {
            self.instance_restarts
                .with_label_values(&[app, service])
                .inc();
        }
    }

    /// Forgets the instance series of `app`'s `service` (no longer deployed on this node).
    pub fn remove_instances(&self, app: &str, service: &str) {
        let labels = [app, service];
        let _ = self.instances_running.remove_label_values(&labels);
        let _ = self.instances_ready.remove_label_values(&labels);
        let _ = self.instance_restarts.remove_label_values(&labels);
        for reason in ExitReason::ALL {
            let _ = self
                .instance_exits
                .remove_label_values(&[app, service, reason.as_str()]);
        }
    }
}

impl Metrics {
    /// The registry, with `miren_dataplane_info{mode}` set for `mode` (`xdp`, `nft`, `none`).
    ///
    /// # Errors
    /// [`MetricsError::Encode`] if a family cannot be registered (a programming error).
    pub fn new(mode: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "miren_reconcile_duration_seconds",
                "Time to apply the desired node-port state to the data plane.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )?;
        let reconcile_errors = IntCounter::new(
            "miren_reconcile_errors_total",
            "Applies of the node-port state that failed (the previous state was kept).",
        )?;
        let info = IntGaugeVec::new(
            Opts::new("miren_dataplane_info", "The active node-port data plane."),
            &["mode"],
        )?;
        info.with_label_values(&[mode]).set(1);
        let http_requests = IntCounterVec::new(
            Opts::new(
                "miren_http_requests_total",
                "Requests answered by the HTTP ingress, by routed app, service, method (other \
                 for methods outside RFC 9110 and PATCH) and status code.",
            ),
            &["app", "service", "method", "code"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "miren_http_request_duration_seconds",
                "Time from a request's head to the end of its response, by routed app.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
            &["app"],
        )?;
        let http_upstream_errors = IntCounterVec::new(
            Opts::new(
                "miren_http_upstream_errors_total",
                "Failures talking to app instances, by app and kind (connect, timeout, other).",
            ),
            &["app", "kind"],
        )?;
        let http_connections = IntGaugeVec::new(
            Opts::new(
                "miren_http_connections",
                "Client connections the HTTP ingress holds open, by listener (http, https).",
            ),
            &["listener"],
        )?;
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "miren_cert_expiry_timestamp_seconds",
                "Expiry (Unix time) of each certificate the ingress holds, by the host it is \
                 stored under (a wildcard's is *.parent).",
            ),
            &["host"],
        )?;
        let acme_orders = IntCounterVec::new(
            Opts::new(
                "miren_acme_orders_total",
                "ACME certificate orders of this node, by outcome: issued, invalid (the ACME \
                 server did not validate the host), failed (any other error).",
            ),
            &["outcome"],
        )?;
        for outcome in AcmeOutcome::ALL {
            acme_orders.with_label_values(&[outcome.as_str()]);
        }
        let instances_running = IntGaugeVec::new(
            Opts::new(
                "miren_instances_running",
                "Instances of the service running on this node (ready or starting).",
            ),
            &["app", "service"],
        )?;
        let instances_ready = IntGaugeVec::new(
            Opts::new(
                "miren_instances_ready",
                "Instances of the service on this node that pass their readiness check (its \
                 endpoints).",
            ),
            &["app", "service"],
        )?;
        let instance_restarts = IntCounterVec::new(
            Opts::new(
                "miren_instance_restarts_total",
                "Instances of the service on this node that ended by themselves (and were \
                 started again).",
            ),
            &["app", "service"],
        )?;
        let instance_exits = IntCounterVec::new(
            Opts::new(
                "miren_instance_exits_total",
                "Instances of the service on this node that ended, by reason: completed (exit \
                 status 0), exited (non-zero status), signaled (killed by a signal), oom \
                 (killed at the memory limit), stopped (by the agent), unknown (adopted from an \
                 earlier agent).",
            ),
            &["app", "service", "reason"],
        )?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(info))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(http_upstream_errors.clone()))?;
        registry.register(Box::new(http_connections.clone()))?;
        registry.register(Box::new(cert_expiry.clone()))?;
        registry.register(Box::new(acme_orders.clone()))?;
        registry.register(Box::new(instances_running.clone()))?;
        registry.register(Box::new(instances_ready.clone()))?;
        registry.register(Box::new(instance_restarts.clone()))?;
        registry.register(Box::new(instance_exits.clone()))?;
        Ok(Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            http_requests,
            http_duration,
            http_upstream_errors,
            http_connections,
            cert_expiry,
            acme_orders,
            instances_running,
            instances_ready,
            instance_restarts,
            instance_exits,
        })
    }

    /// The ingress's metric handles of `app`'s `service` (both empty for requests no route
    /// matched), resolved once so that a request costs no label lookup.
    pub fn service_metrics(&self, app: &str, service: &str) -> ServiceMetrics {
        ServiceMetrics {
            requests: self.http_requests.clone(),
            app: app.to_owned(),
            service: service.to_owned(),
            by_outcome: std::sync::RwLock::default(),
            duration: self.http_duration.with_label_values(&[app]),
            upstream_errors: UPSTREAM_ERROR_KINDS
                .map(|kind| self.http_upstream_errors.with_label_values(&[app, kind])),
        }
    }

    /// The open-connections gauge of the ingress listener `listener` (`http`, `https`).
    pub fn http_connections(&self, listener: &str) -> IntGauge {
        self.http_connections.with_label_values(&[listener])
    }

    /// Records one reconcile pass.
    pub fn observe_reconcile(&self, elapsed: Duration, ok: bool) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if !ok {
            self.reconcile_errors.inc();
        }
    }

    /// The text exposition: the registry plus node-port families from `counters`, labelled
    /// by `ports`.
    ///
    /// # Errors
    /// [`MetricsError::Encode`] if encoding fails.
    pub fn render(
        &self,
        counters: Option<&Counters>,
        ports: &[NodePortInfo],
    ) -> Result<String, MetricsError> {
        let mut families = self.registry.gather();
        if let Some(counters) = counters {
            families.extend(node_port_families(counters, ports)?);
        }
        let mut text = Vec::new();
        TextEncoder::new().encode(&families, &mut text)?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }
}

/// A request method as a label: the methods of RFC 9110 and PATCH, else `other` (a client
/// cannot add series at will).
/// How a request to an instance failed (`miren_http_upstream_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// No connection could be made.
    Connect,
    /// The instance did not answer in time.
    Timeout,
    /// Anything else (a reset, a malformed response).
    Other,
}

/// The label values of [`UpstreamError`], in its order.
const UPSTREAM_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "other"];

/// One app service's ingress metric handles (see [`Metrics::service_metrics`]).
#[derive(Debug)]
pub struct ServiceMetrics {
    requests: IntCounterVec,
    app: String,
    service: String,
    /// The request counters met so far, by (method label, status code): a handful per
    /// service, found by a scan under a read lock.
    by_outcome: std::sync::RwLock<Vec<(&'static str, u16, IntCounter)>>,
    duration: Histogram,
    upstream_errors: [IntCounter; 3],
}

impl ServiceMetrics {
    /// Records one answered request (`code` 0: no response was sent).
    pub fn observe_request(&self, method: &http::Method, code: u16, elapsed: Duration) {
        let method = method_label(method);
        let known = self
            .by_outcome
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(m, c, _)| *m == method && *c == code)
            .map(|(_, _, counter)| counter.clone());
        let counter = known.unwrap_or_else(|| {
            // Status codes as static text; 0 = no response sent.
            let status = http::StatusCode::from_u16(code).ok();
            let label = status.as_ref().map_or("0", http::StatusCode::as_str);
            let counter =
                self.requests
                    .with_label_values(&[&self.app, &self.service, method, label]);
            self.by_outcome
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((method, code, counter.clone()));
            counter
        });
        counter.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Records one failure talking to an instance.
    pub fn observe_upstream_error(&self, kind: UpstreamError) {
        self.upstream_errors[kind as usize].inc();
    }
}

fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    static KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    KNOWN
        .iter()
        .find(|known| *known == method)
        .map_or("other", |known| known.as_str())
}

/// A counter family with the node-port labels plus `extra`.
fn family(name: &str, help: &str, extra: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let labels: Vec<&str> = PORT_LABELS.iter().chain(extra).copied().collect();
    IntCounterVec::new(Opts::new(name, help), &labels)
}

/// Builds the node-port and backend families of one scrape.
fn node_port_families(
    counters: &Counters,
    ports: &[NodePortInfo],
) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let rx_packets = family(
        "miren_nodeport_rx_packets_total",
        "Packets received for the node port.",
        &[],
    )?;
    let rx_bytes = family(
        "miren_nodeport_rx_bytes_total",
        "IP bytes received for the node port.",
        &[],
    )?;
    let tx_packets = family(
        "miren_nodeport_tx_packets_total",
        "Reply packets sent from the node port.",
        &[],
    )?;
    let tx_bytes = family(
        "miren_nodeport_tx_bytes_total",
        "Reply IP bytes sent from the node port.",
        &[],
    )?;
    let flows = family(
        "miren_nodeport_flows_total",
        "New flows balanced to an endpoint.",
        &[],
    )?;
    let drops = family(
        "miren_nodeport_drops_total",
        "Packets dropped: no_endpoints (the service has no endpoint), table_miss (XDP only: \
         a balancing table was being replaced).",
        &["reason"],
    )?;
    let backend_rx = family(
        "miren_backend_rx_packets_total",
        "Packets forwarded to one endpoint of the node port.",
        &["backend"],
    )?;
    for port in ports {
        let Some(protocol) = crate::config::Protocol::from_name(&port.protocol) else {
            continue;
        };
        let key = NodePortKey {
            port: port.node_port,
            protocol,
        };
        if !counters.ports.contains_key(&key) {
            continue;
        }
        let node_port = port.node_port.to_string();
        let labels = |family: Family| {
            [
                port.app.as_str(),
                &port.service,
                &port.port_name,
                &port.protocol,
                &node_port,
                family.label(),
            ]
        };
        for family in Family::ALL {
            let c = counters
                .families
                .get(&(key, family))
                .copied()
                .unwrap_or_default();
            let labels = labels(family);
            rx_packets.with_label_values(&labels).inc_by(c.rx_packets);
            rx_bytes.with_label_values(&labels).inc_by(c.rx_bytes);
            tx_packets.with_label_values(&labels).inc_by(c.tx_packets);
            tx_bytes.with_label_values(&labels).inc_by(c.tx_bytes);
            flows.with_label_values(&labels).inc_by(c.flows);
            for (reason, value) in [
                ("no_endpoints", c.drop_no_backend),
                ("table_miss", c.drop_table_miss),
            ] {
                let with_reason: Vec<&str> = labels.iter().copied().chain([reason]).collect();
                drops.with_label_values(&with_reason).inc_by(value);
            }
        }
        for (backend, b) in counters.backends_of(key) {
            let labels = labels(Family::of(backend.ip()));
            let backend = backend.to_string();
            let with_backend: Vec<&str> = labels.iter().copied().chain([&*backend]).collect();
            backend_rx
                .with_label_values(&with_backend)
                .inc_by(b.packets);
        }
    }
    let events = dataplane_events(counters)?;
    Ok([
        rx_packets, rx_bytes, tx_packets, tx_bytes, flows, drops, backend_rx, events,
    ]
    .iter()
    .flat_map(prometheus::core::Collector::collect)
    // The text encoder refuses families without series (e.g. no backends right now).
    .filter(|family| !family.get_metric().is_empty())
    .collect())
}

/// `miren_dataplane_packets_total{event}`: what the XDP programs did with packets that are
/// not one node port's (the nftables data plane leaves these to the kernel: all zero).
fn dataplane_events(counters: &Counters) -> Result<IntCounterVec, prometheus::Error> {
    let events = IntCounterVec::new(
        Opts::new(
            "miren_dataplane_packets_total",
            "Packets by what the XDP data plane did: passed (not for a node port), malformed, \
             conntrack_hit, conntrack_miss, tcp_non_syn_miss (forwarded by the balancing \
             choice), fragment_forwarded (a later fragment translated like its first), \
             fragment_unmatched (a later fragment whose first was not seen: to the kernel), \
             icmp_to_instance and icmp_from_instance (ICMP errors translated). Zero on nft.",
        ),
        &["event"],
    )?;
    let g = &counters.global;
    for (event, value) in [
        ("passed", g.passed),
        ("malformed", g.malformed),
        ("conntrack_hit", g.conntrack_hits),
        ("conntrack_miss", g.conntrack_misses),
        ("tcp_non_syn_miss", g.tcp_non_syn_misses),
        ("fragment_forwarded", g.fragments_forwarded),
        ("fragment_unmatched", g.fragments_unmatched),
        ("icmp_to_instance", g.icmp_to_instance),
        ("icmp_from_instance", g.icmp_from_instance),
    ] {
        events.with_label_values(&[event]).inc_by(value);
    }
    Ok(events)
}

/// What the `/metrics` handler reads.
#[derive(Debug)]
pub struct MetricsState {
    /// The registry.
    pub metrics: Arc<Metrics>,
    /// Node ports and their labels.
    pub control: Arc<ControlPlane>,
    /// The kernel counters' source, if node ports are served.
    pub dataplane: Option<Arc<ActiveDataplane>>,
}

/// The listener for `/metrics` on `addr`: taken from `inherited` (systemd socket activation,
/// or the agent being upgraded) when it holds one, else bound.
///
/// # Errors
/// [`MetricsError::Bind`] when the address cannot be bound.
pub async fn bind(
    addr: SocketAddr,
    inherited: &mut Inherited,
) -> Result<tokio::net::TcpListener, MetricsError> {
    let bind_error = |source| MetricsError::Bind { addr, source };
    match inherited.take_tcp(addr) {
        Some(listener) => tokio::net::TcpListener::from_std(listener).map_err(bind_error),
        None => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error),
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
///
/// # Errors
/// The server's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<MetricsState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(state): State<Arc<MetricsState>>) -> axum::response::Response {
    let rendered = tokio::task::spawn_blocking(move || {
        let counters = state
            .dataplane
            .as_ref()
            .map(|dataplane| dataplane.counters())
            .transpose()?;
        let ports = state.control.node_ports(None).unwrap_or_default();
        state.metrics.render(counters.as_ref(), &ports)
    })
    .await;
    match rendered {
        Ok(Ok(text)) => (
            [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            text,
        )
            .into_response(),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
        Err(join) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the scrape task failed: {join}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::{config::Protocol, dataplane::PortCounters};

    fn info(node_port: u16, protocol: &str) -> NodePortInfo {
        NodePortInfo {
            node_port,
            protocol: protocol.into(),
            app: "game".into(),
            service: "server".into(),
            port_name: "play".into(),
            target_port: 8080,
            endpoints: vec![],
            status: "ok".into(),
            traffic: None,
            by_node: Default::default(),
        }
    }

    #[test]
    fn node_port_counters_are_exposed_with_their_labels() {
        let key = NodePortKey {
            port: 7000,
            protocol: Protocol::Udp,
        };
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 2), 8080);
        let mut counters = Counters::default();
        counters.insert_port(
            key,
            Family::V4,
            PortCounters {
                rx_packets: 10,
                rx_bytes: 320,
                flows: 2,
                tx_packets: 9,
                tx_bytes: 288,
                drop_no_backend: 1,
                ..PortCounters::default()
            },
        );
        counters.insert_port(
            key,
            Family::V6,
            PortCounters {
                rx_packets: 4,
                rx_bytes: 200,
                flows: 1,
                tx_packets: 3,
                tx_bytes: 150,
                drop_table_miss: 2,
                ..PortCounters::default()
            },
        );
        counters.backends.insert(
            (key, backend),
            crate::dataplane::BackendCounters {
                packets: 9,
                bytes: 288,
            },
        );
        counters.insert_backend(
            key,
            "[fd6d:6972:656e::2]:8080".parse().unwrap(),
            crate::dataplane::BackendCounters {
                packets: 4,
                bytes: 200,
            },
        );
        counters.global.fragments_forwarded = 5;
        counters.global.icmp_from_instance = 2;
        let metrics = Metrics::new("xdp").unwrap();
        metrics.observe_reconcile(Duration::from_millis(3), true);
        metrics.observe_reconcile(Duration::from_millis(3), false);
        let text = metrics
            .render(Some(&counters), &[info(7000, "udp"), info(7001, "tcp")])
            .unwrap();
        let labels = |family: &str| {
            format!(
                r#"app="game",family="{family}",node_port="7000",port_name="play",protocol="udp",service="server""#
            )
        };
        let (v4, v6) = (labels("ipv4"), labels("ipv6"));
        for line in [
            format!("miren_nodeport_rx_packets_total{{{v4}}} 10"),
            format!("miren_nodeport_rx_bytes_total{{{v4}}} 320"),
            format!("miren_nodeport_tx_packets_total{{{v4}}} 9"),
            format!("miren_nodeport_tx_bytes_total{{{v4}}} 288"),
            format!("miren_nodeport_flows_total{{{v4}}} 2"),
            format!("miren_nodeport_rx_packets_total{{{v6}}} 4"),
            format!("miren_nodeport_rx_bytes_total{{{v6}}} 200"),
            format!("miren_nodeport_tx_packets_total{{{v6}}} 3"),
            format!("miren_nodeport_tx_bytes_total{{{v6}}} 150"),
            format!("miren_nodeport_flows_total{{{v6}}} 1"),
            r#"miren_nodeport_drops_total{app="game",family="ipv4",node_port="7000",port_name="play",protocol="udp",reason="no_endpoints",service="server"} 1"#.to_owned(),
            r#"miren_nodeport_drops_total{app="game",family="ipv4",node_port="7000",port_name="play",protocol="udp",reason="table_miss",service="server"} 0"#.to_owned(),
            r#"miren_nodeport_drops_total{app="game",family="ipv6",node_port="7000",port_name="play",protocol="udp",reason="no_endpoints",service="server"} 0"#.to_owned(),
            r#"miren_nodeport_drops_total{app="game",family="ipv6",node_port="7000",port_name="play",protocol="udp",reason="table_miss",service="server"} 2"#.to_owned(),
            r#"miren_backend_rx_packets_total{app="game",backend="10.88.0.2:8080",family="ipv4",node_port="7000",port_name="play",protocol="udp",service="server"} 9"#.to_owned(),
            r#"miren_backend_rx_packets_total{app="game",backend="[fd6d:6972:656e::2]:8080",family="ipv6",node_port="7000",port_name="play",protocol="udp",service="server"} 4"#.to_owned(),
            "miren_dataplane_info{mode=\"xdp\"} 1".to_owned(),
            "miren_dataplane_packets_total{event=\"fragment_forwarded\"} 5".to_owned(),
            "miren_dataplane_packets_total{event=\"icmp_from_instance\"} 2".to_owned(),
            "miren_dataplane_packets_total{event=\"tcp_non_syn_miss\"} 0".to_owned(),
            "miren_reconcile_errors_total 1".to_owned(),
            "miren_reconcile_duration_seconds_count 2".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        // A node port without kernel counters (not applied yet) has no series; each series of
        // a node port has its family.
        assert!(!text.contains("node_port=\"7001\""), "{text}");
        let port_lines = text.lines().filter(|l| l.contains("node_port=")).count();
        let with_family = text.lines().filter(|l| l.contains(",family=\"ipv")).count();
        assert_eq!((port_lines, with_family), (16, 16), "{text}");
    }

    #[test]
    fn http_requests_have_a_bounded_method_label_and_connections_a_gauge() {
        let metrics = Metrics::new("none").unwrap();
        let elapsed = Duration::from_millis(1);
        let web = metrics.service_metrics("a", "web");
        web.observe_request(&http::Method::GET, 200, elapsed);
        web.observe_request(&http::Method::POST, 200, elapsed);
        web.observe_request(&http::Method::POST, 200, elapsed);
        // Handles of the same service resolved again (a new route snapshot) count on.
        metrics
            .service_metrics("a", "web")
            .observe_request(&http::Method::GET, 200, elapsed);
        web.observe_upstream_error(UpstreamError::Timeout);
        let odd = http::Method::from_bytes(b"BREW").unwrap();
        metrics
            .service_metrics("", "")
            .observe_request(&odd, 404, elapsed);
        let http = metrics.http_connections("http");
        http.inc();
        http.inc();
        http.dec();
        metrics.http_connections("https").inc();
        let text = metrics.render(None, &[]).unwrap();
        for line in [
            r#"miren_http_requests_total{app="a",code="200",method="GET",service="web"} 2"#,
            r#"miren_http_upstream_errors_total{app="a",kind="timeout"} 1"#,
            r#"miren_http_request_duration_seconds_count{app="a"} 4"#,
            r#"miren_http_requests_total{app="a",code="200",method="POST",service="web"} 2"#,
            r#"miren_http_requests_total{app="",code="404",method="other",service=""} 1"#,
            r#"miren_http_connections{listener="http"} 1"#,
            r#"miren_http_connections{listener="https"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn certificate_expiry_and_acme_outcomes_are_exposed() {
        let metrics = Metrics::new("none").unwrap();
        let expiry = 1_900_000_000;
        metrics.set_cert_expiry("a.example.com", expiry);
        metrics.set_cert_expiry("gone.example.com", expiry);
        metrics.remove_cert_expiry("gone.example.com");
        metrics.observe_acme_order(AcmeOutcome::Invalid);
        let text = metrics.render(None, &[]).unwrap();
        for line in [
            r#"miren_cert_expiry_timestamp_seconds{host="a.example.com"} 1900000000"#,
            r#"miren_acme_orders_total{outcome="issued"} 0"#,
            r#"miren_acme_orders_total{outcome="invalid"} 1"#,
            r#"miren_acme_orders_total{outcome="failed"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("gone.example.com"), "{text}");
    }

    #[test]
    fn instance_counts_restarts_and_exit_reasons_are_exposed_per_service() {
        let metrics = Metrics::new("none").unwrap();
        metrics.set_instances("game", "udp", 2, 1);
        metrics.set_instances("game", "udp", 2, 2);
        metrics.observe_instance_exit("game", "udp", ExitReason::Signaled);
        metrics.observe_instance_exit("game", "udp", ExitReason::Exited);
        metrics.observe_instance_exit("game", "udp", ExitReason::Stopped);
        metrics.set_instances("gone", "web", 1, 1);
        metrics.observe_instance_exit("gone", "web", ExitReason::Oom);
        metrics.remove_instances("gone", "web");
        let text = metrics.render(None, &[]).unwrap();
        let exits = |reason: &str, n: u64| {
            format!(
                r#"miren_instance_exits_total{{app="game",reason="{reason}",service="udp"}} {n}"#
            )
        };
        for line in [
            r#"miren_instances_running{app="game",service="udp"} 2"#.to_owned(),
            r#"miren_instances_ready{app="game",service="udp"} 2"#.to_owned(),
            // Stopped by the agent: not a restart.
            r#"miren_instance_restarts_total{app="game",service="udp"} 2"#.to_owned(),
            exits("signaled", 1),
            exits("exited", 1),
            exits("stopped", 1),
            exits("completed", 0),
            exits("oom", 0),
            exits("unknown", 0),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("app=\"gone\""), "{text}");
        let exit_series = text
            .lines()
            .filter(|l| l.starts_with("miren_instance_exits_total{"))
            .count();
        assert_eq!(exit_series, ExitReason::ALL.len(), "{text}");
    }
}
