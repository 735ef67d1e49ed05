//! The ingress's routing state: Host → route → the target service's ready endpoints, kept in
//! line with the control plane after every revision and swapped in atomically, so requests in
//! flight keep the snapshot they started with and new requests see the change at once. The
//! maps are persistent: a revision that changed only routes costs O(log routes) per changed
//! route (a copy of the snapshot shares every other entry), not a rebuild.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    control::{ControlPlane, IngressRoute, IngressUpdate},
    metrics::{Metrics, ServiceMetrics},
    routes::{Host, RouteTable},
};

/// Where a matched route sends a request.
#[derive(Debug)]
pub struct Route {
    /// The route's host as configured (`*.example.com` for a wildcard).
    pub host: String,
    /// Upstream timeout of this route.
    pub timeout: Duration,
    /// The target service, shared by every route pointing at it.
    pub upstreams: Arc<ServiceUpstreams>,
}

/// The ready endpoints of one app service, balanced round-robin.
#[derive(Debug)]
pub struct ServiceUpstreams {
    /// App name.
    pub app: String,
    /// Service name.
    pub service: String,
    /// Ready endpoints of the service's http port, sorted.
    pub backends: Vec<Backend>,
    /// Requests in flight to this service (shared across snapshots).
    pub in_flight: Arc<AtomicUsize>,
    /// Requests to this service so far (shared across snapshots).
    requests: Arc<AtomicU64>,
    /// Requests in flight to each backend's address, in the order of `backends` (shared with
    /// [`LoadTracker`], which an instance being stopped drains).
    backend_in_flight: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
    /// The service's request metrics, resolved once for every request to it.
    pub metrics: ServiceMetrics,
}

/// What every snapshot is built with: the routes' default timeout, the request counters and
/// the metrics.
#[derive(Debug)]
pub struct SnapshotInputs {
    /// Upstream timeout of routes without their own.
    pub default_timeout: Duration,
    /// Requests per app service and backend.
    pub load: Arc<LoadTracker>,
    /// The agent's metrics.
    pub metrics: Arc<Metrics>,
}

/// Requests per app service (in flight, and so far), kept by the ingress and reported to the
/// cluster as demand for auto services.
#[derive(Debug, Default)]
pub struct LoadTracker {
    /// Requests in flight per app service.
    counters: std::sync::Mutex<HashMap<(String, String), Arc<AtomicUsize>>>,
    /// Requests so far per app service.
    requests: std::sync::Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
    /// Requests in flight per backend address (an instance being stopped drains these).
    backends: std::sync::Mutex<HashMap<IpAddr, Arc<AtomicUsize>>>,
}

/// The counter of `key` in `counters` (created at zero).
fn shared_counter<K: Eq + Hash, T: Default>(
    counters: &std::sync::Mutex<HashMap<K, Arc<T>>>,
    key: K,
) -> Arc<T> {
    let mut counters = counters.lock().unwrap_or_else(|p| p.into_inner());
    Arc::clone(counters.entry(key).or_default())
}

impl LoadTracker {
    /// The counter of `app`'s `service` (created at zero).
    pub fn counter(&self, app: &str, service: &str) -> Arc<AtomicUsize> {
        shared_counter(&self.counters, (app.to_owned(), service.to_owned()))
    }

    /// Requests in flight to `app`'s `service` now.
    pub fn in_flight(&self, app: &str, service: &str) -> usize {
        self.counter(app, service).load(Ordering::Relaxed)
    }

    fn requests_counter(&self, app: &str, service: &str) -> Arc<AtomicU64> {
        shared_counter(&self.requests, (app.to_owned(), service.to_owned()))
    }

    /// Requests to `app`'s `service` since the agent started.
    pub fn requests(&self, app: &str, service: &str) -> u64 {
        self.requests_counter(app, service).load(Ordering::Relaxed)
    }

    fn backend_counter(&self, ip: IpAddr) -> Arc<AtomicUsize> {
        shared_counter(&self.backends, ip)
    }

    /// Requests in flight to the backend at `ip` now.
    pub fn in_flight_to(&self, ip: IpAddr) -> usize {
        self.backend_counter(ip).load(Ordering::Relaxed)
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a request to `upstreams`.
    pub fn new(upstreams: &ServiceUpstreams) -> Self {
        upstreams.requests.fetch_add(1, Ordering::Relaxed);
        upstreams.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(&upstreams.in_flight))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint, with the connection-pool key that keeps its pooled connections apart from
/// those of any other app or service that may later get the same address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Address of the instance's http port.
    pub addr: SocketAddr,
    /// Pool key: hash of (app, service, address).
    pub pool_key: u64,
    /// Its place in its service's backends (and in-flight counters).
    slot: usize,
}

impl ServiceUpstreams {
    fn new(app: &str, service: &str, addrs: &[SocketAddr], inputs: &SnapshotInputs) -> Self {
        let load = &inputs.load;
        let backends = addrs
            .iter()
            .enumerate()
            .map(|(slot, &addr)| Backend {
                addr,
                pool_key: pool_key(app, service, addr),
                slot,
            })
            .collect();
        Self {
            app: app.to_owned(),
            service: service.to_owned(),
            backends,
            in_flight: load.counter(app, service),
            requests: load.requests_counter(app, service),
            backend_in_flight: addrs
                .iter()
                .map(|addr| load.backend_counter(addr.ip()))
                .collect(),
            next: AtomicUsize::new(0),
            metrics: inputs.metrics.service_metrics(app, service),
        }
    }

    /// Counts one request sent to `backend` (one of these upstreams') until the guard is
    /// dropped.
    pub fn count_to(&self, backend: &Backend) -> Option<InFlight> {
        let counter = Arc::clone(self.backend_in_flight.get(backend.slot)?);
        counter.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(counter))
    }

    /// True when the backends are exactly `addrs`, in order.
    fn has_addrs(&self, addrs: &[SocketAddr]) -> bool {
        self.backends.len() == addrs.len()
            && self.backends.iter().zip(addrs).all(|(b, a)| b.addr == *a)
    }

    /// The next backend in round-robin order, skipping `avoid` (a backend that just failed)
    /// when there is another one.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Option<Backend> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        // A retry continues from where the failed pick left off.
        let start = match avoid {
            None => self.next.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.next.load(Ordering::Relaxed),
        };
        (0..n)
            .map(|i| self.backends[(start + i) % n])
            .find(|b| Some(b.addr) != avoid)
            .or_else(|| self.backends.first().copied())
    }
}

fn pool_key(app: &str, service: &str, addr: SocketAddr) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (app, service, addr).hash(&mut hasher);
    hasher.finish()
}

/// One immutable view of all routes.
#[derive(Debug, Default)]
pub struct RoutingSnapshot {
    /// Control-plane revision this view reflects.
    pub revision: u64,
    routes: RouteTable<Arc<Route>>,
    services: imbl::HashMap<(String, String), Arc<ServiceUpstreams>>,
}

impl RoutingSnapshot {
    /// Builds the view from the control plane's routes. Services whose endpoints did not change keep their upstreams from
    /// `previous` (and with them their round-robin position).
    pub fn build(
        revision: u64,
        routes: &[IngressRoute],
        inputs: &SnapshotInputs,
        previous: &RoutingSnapshot,
    ) -> Self {
        let mut snapshot = Self {
            revision,
            routes: RouteTable::new(),
            services: imbl::HashMap::new(),
        };
        for route in routes {
            snapshot.insert(route, inputs, previous);
        }
        snapshot
    }

    /// This snapshot with the changed routes of a later revision: each host's route replaced
    /// (`None`: removed). Costs O(log routes) per change; every other entry is shared.
    pub fn with_changes(
        &self,
        revision: u64,
        changes: &[(String, Option<IngressRoute>)],
        inputs: &SnapshotInputs,
    ) -> Self {
        let mut snapshot = Self {
            revision,
            routes: self.routes.clone(),
            services: self.services.clone(),
        };
        for (host, route) in changes {
            match route {
                Some(route) => snapshot.insert(route, inputs, self),
                None => {
                    if let Ok(host) = Host::parse(host) {
                        snapshot.routes.remove(&host);
                    }
                }
            }
        }
        snapshot
    }

    /// Adds (or replaces) `route`, sharing its service's upstreams with the other routes to
    /// it, or with `previous` when the endpoints did not change (round-robin continues).
    fn insert(
        &mut self,
        route: &IngressRoute,
        inputs: &SnapshotInputs,
        previous: &RoutingSnapshot,
    ) {
        let record = &route.record;
        let Ok(host) = Host::parse(&record.host) else {
            tracing::warn!(host = %record.host, "skipping a stored route with an invalid host");
            return;
        };
        let key = (record.app.clone(), record.service.clone());
        let upstreams = match self
            .services
            .get(&key)
            .or_else(|| previous.services.get(&key))
        {
            Some(same) if same.has_addrs(&route.endpoints) => Arc::clone(same),
            _ => Arc::new(ServiceUpstreams::new(
                &record.app,
                &record.service,
                &route.endpoints,
                inputs,
            )),
        };
        self.services.insert(key, Arc::clone(&upstreams));
        let timeout = record
            .timeout_ms
            .map_or(inputs.default_timeout, Duration::from_millis);
        self.routes.insert(
            host,
            Arc::new(Route {
                host: record.host.clone(),
                timeout,
                upstreams,
            }),
        );
    }

    /// The upstreams of an app service that some route points at.
    pub fn service(&self, app: &str, service: &str) -> Option<&Arc<ServiceUpstreams>> {
        self.services.get(&(app.to_owned(), service.to_owned()))
    }

    /// The route for a raw Host header value (any case, optional port).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        self.routes.lookup(host)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
impl SnapshotInputs {
    /// A 60 s default timeout, fresh counters and metrics.
    pub fn for_tests() -> Self {
        Self {
            default_timeout: Duration::from_secs(60),
            load: Arc::default(),
            metrics: Arc::new(Metrics::new("none").expect("metrics")),
        }
    }
}

/// The current [`RoutingSnapshot`], kept in line with the control plane.
#[derive(Debug)]
pub struct Routing {
    current: ArcSwap<RoutingSnapshot>,
    changed: watch::Sender<u64>,
    inputs: SnapshotInputs,
}

impl Routing {
    /// An empty routing state building its snapshots with `inputs`; call
    /// [`Routing::refresh`] or [`Routing::follow`] to fill it.
    pub fn new(inputs: SnapshotInputs) -> Self {
        Self {
            current: ArcSwap::from_pointee(RoutingSnapshot::default()),
            changed: watch::channel(0).0,
            inputs,
        }
    }

    /// The snapshot to route a request with.
    pub fn snapshot(&self) -> Arc<RoutingSnapshot> {
        self.current.load_full()
    }

    /// A receiver told after every new snapshot (its value is the revision).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Brings the snapshot to the control plane's current state: applies the changed routes
    /// when only routes changed since the current snapshot, else rebuilds from every route.
    pub fn refresh(&self, control: &ControlPlane) {
        let current = self.current.load_full();
        let (revision, update) = control.ingress_changes(current.revision);
        let next = match update {
            IngressUpdate::Routes(changes)
                if changes.is_empty() && revision == current.revision =>
            {
                return;
            }
            IngressUpdate::Routes(changes) => {
                current.with_changes(revision, &changes, &self.inputs)
            }
            IngressUpdate::Full(routes) => {
                RoutingSnapshot::build(revision, &routes, &self.inputs, &current)
            }
        };
        self.publish(next);
    }

    /// Makes `snapshot` the current one and tells the subscribers.
    pub(crate) fn publish(&self, snapshot: RoutingSnapshot) {
        let revision = snapshot.revision;
        self.current.store(Arc::new(snapshot));
        self.changed.send_replace(revision);
    }

    /// Refreshes after every control-plane revision until `shutdown` turns true.
    pub async fn follow(
        self: Arc<Self>,
        control: Arc<ControlPlane>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut revisions = control.subscribe();
        loop {
            self.refresh(&control);
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::RouteRecord;

    fn route(host: &str, app: &str, timeout_ms: Option<u64>, endpoints: &[&str]) -> IngressRoute {
        IngressRoute {
            record: RouteRecord {
                host: host.into(),
                app: app.into(),
                service: "web".into(),
                timeout_ms,
            },
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn routes_share_their_service_and_keep_their_timeout() {
        let routes = [
            route(
                "a.example.com",
                "a",
                Some(1500),
                &["10.0.0.1:80", "10.0.0.2:80"],
            ),
            route("*.example.com", "a", None, &["10.0.0.1:80", "10.0.0.2:80"]),
            route("b.example.com", "b", None, &[]),
        ];
        let inputs = SnapshotInputs::for_tests();
        let build = |revision, routes: &[IngressRoute], previous: &RoutingSnapshot| {
            RoutingSnapshot::build(revision, routes, &inputs, previous)
        };
        let snapshot = build(7, &routes, &RoutingSnapshot::default());
        assert_eq!(snapshot.len(), 3);
        let exact = snapshot.lookup("A.example.com:8080").unwrap();
        let wild = snapshot.lookup("x.example.com").unwrap();
        assert_eq!(exact.timeout, Duration::from_millis(1500));
        assert_eq!(wild.timeout, Duration::from_secs(60));
        assert_eq!(wild.host, "*.example.com");
        assert!(Arc::ptr_eq(&exact.upstreams, &wild.upstreams));
        assert!(snapshot.lookup("example.com").is_none());
        let b = snapshot.lookup("b.example.com").unwrap();
        assert_eq!(b.upstreams.pick(None), None);

        // The next revision keeps the upstreams of a service whose endpoints did not change
        // (round-robin continues) and replaces those of one whose endpoints did.
        assert_eq!(
            exact.upstreams.pick(None).unwrap().addr.to_string(),
            "10.0.0.1:80"
        );
        let next = [
            route("a.example.com", "a", None, &["10.0.0.1:80", "10.0.0.2:80"]),
            route("b.example.com", "b", None, &["10.0.0.3:80"]),
        ];
        let rebuilt = build(8, &next, &snapshot);
        let a = rebuilt.lookup("a.example.com").unwrap();
        assert!(Arc::ptr_eq(&a.upstreams, &exact.upstreams));
        assert_eq!(
            a.upstreams.pick(None).unwrap().addr.to_string(),
            "10.0.0.2:80"
        );
        let b = rebuilt.lookup("b.example.com").unwrap();
        assert_eq!(
            b.upstreams.pick(None).unwrap().addr.to_string(),
            "10.0.0.3:80"
        );
        assert!(rebuilt.lookup("x.example.com").is_none());
    }

    #[test]
    fn requests_are_counted_per_backend_address_until_they_end() {
        let inputs = SnapshotInputs::for_tests();
        let load = &inputs.load;
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let upstreams = ServiceUpstreams::new("shop", "web", &[a, b], &inputs);
        let to_a = upstreams.backends[0];
        let first = upstreams.count_to(&to_a).unwrap();
        let second = upstreams.count_to(&to_a).unwrap();
        assert_eq!(load.in_flight_to(a.ip()), 2);
        assert_eq!(load.in_flight_to(b.ip()), 0);
        drop(first);
        assert_eq!(load.in_flight_to(a.ip()), 1);
        drop(second);
        assert_eq!(load.in_flight_to(a.ip()), 0);
    }

    #[test]
    fn pick_rotates_and_avoids_a_failed_backend() {
        let upstreams = ServiceUpstreams::new(
            "a",
            "web",
            &[
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
                "10.0.0.3:80".parse().unwrap(),
            ],
            &SnapshotInputs::for_tests(),
        );
        let picked: Vec<_> = (0..6)
            .map(|_| upstreams.pick(None).unwrap().addr.to_string())
            .collect();
        assert_eq!(
            picked,
            [
                "10.0.0.1:80",
                "10.0.0.2:80",
                "10.0.0.3:80",
                "10.0.0.1:80",
                "10.0.0.2:80",
                "10.0.0.3:80"
            ]
        );
        let failed: SocketAddr = "10.0.0.1:80".parse().unwrap();
        for _ in 0..6 {
            assert_ne!(upstreams.pick(Some(failed)).unwrap().addr, failed);
        }
        let single = ServiceUpstreams::new("a", "web", &[failed], &SnapshotInputs::for_tests());
        assert_eq!(single.pick(Some(failed)).unwrap().addr, failed);
    }

    #[test]
    fn pool_keys_differ_per_app_for_the_same_address() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let a = ServiceUpstreams::new("a", "web", &[addr], &SnapshotInputs::for_tests());
        let b = ServiceUpstreams::new("b", "web", &[addr], &SnapshotInputs::for_tests());
        assert_ne!(a.backends[0].pool_key, b.backends[0].pool_key);
        let a_again = ServiceUpstreams::new("a", "web", &[addr], &SnapshotInputs::for_tests());
        assert_eq!(a.backends[0].pool_key, a_again.backends[0].pool_key);
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;
    use crate::store::records::RouteRecord;

    fn route(host: &str, app: &str) -> IngressRoute {
        IngressRoute {
            record: RouteRecord {
                host: host.into(),
                app: app.into(),
                service: "web".into(),
                timeout_ms: None,
            },
            endpoints: Arc::from(["10.0.0.1:80".parse().unwrap()]),
        }
    }

    #[test]
    fn changes_replace_add_and_remove_routes_and_keep_the_rest() {
        let inputs = SnapshotInputs::for_tests();
        let routes: Vec<_> = (0..100)
            .map(|i| route(&format!("h{i}.example.com"), "a"))
            .collect();
        let first = RoutingSnapshot::build(1, &routes, &inputs, &RoutingSnapshot::default());
        let changes: Vec<_> = (0..100)
            .map(|i| {
                (
                    format!("h{i}.example.com"),
                    Some(route(&format!("h{i}.example.com"), "b")),
                )
            })
            .chain([
                ("h5.example.com".to_owned(), None),
                (
                    "new.example.com".to_owned(),
                    Some(route("new.example.com", "a")),
                ),
            ])
            .collect();
        let next = first.with_changes(2, &changes, &inputs);
        assert_eq!(next.revision, 2);
        assert_eq!(next.len(), 100);
        assert_eq!(next.lookup("h0.example.com").unwrap().upstreams.app, "b");
        assert_eq!(next.lookup("new.example.com").unwrap().upstreams.app, "a");
        assert!(next.lookup("h5.example.com").is_none());
        // The earlier snapshot is untouched.
        assert_eq!(first.lookup("h0.example.com").unwrap().upstreams.app, "a");
        assert_eq!(first.len(), 100);
    }
}
