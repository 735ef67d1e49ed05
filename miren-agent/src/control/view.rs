//! This agent's view of the shared state: built from a listing, then kept current by the
//! store's watch ([`follow`]) — the only way it changes. Records are decoded once, apps are
//! validated once per change, and every key keeps its mod revision for the compares of the
//! commands.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    config::{AppConfig, Protocol, Source, ValidationContext, parse_deployable},
    store::{
        Event, KeyValue, Listing, Revision, Store, WatchMessage,
        records::{
            AcmeAccount, AppRecord, CertRecord, Demand, EndpointMap, Heartbeat, Leader,
            NodePortRecord, NodeRecord, Placement, Record, RecordKey, RouteRecord,
        },
    },
};

/// A record with the revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// Its key's mod revision.
    pub mod_revision: Revision,
}

/// A deployed app: its record and the validated config with every port number filled in
/// (`None` when the stored app.toml does not validate on this agent).
#[derive(Debug, Clone)]
pub struct DeployedApp {
    /// As stored.
    pub record: AppRecord,
    /// Validated here, with assigned ports filled in.
    pub config: Option<AppConfig>,
    /// Mod revision of `apps/NAME`.
    pub mod_revision: Revision,
}

/// The state at one revision.
#[derive(Debug, Default)]
pub struct State {
    /// The revision of the last change the consumers follow (heartbeats do not move it).
    pub revision: Revision,
    /// Apps by name, also those that do not validate here.
    pub apps: BTreeMap<String, DeployedApp>,
    /// Node-port claims by (node port, protocol).
    pub node_ports: BTreeMap<(u16, Protocol), Versioned<NodePortRecord>>,
    /// Routes by host.
    pub routes: BTreeMap<String, Versioned<RouteRecord>>,
    /// Endpoints by (app, service), then by node.
    pub endpoints: BTreeMap<(String, String), BTreeMap<String, Versioned<EndpointMap>>>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Versioned<NodeRecord>>,
    /// The heartbeats of the nodes whose lease is alive.
    pub alive: BTreeMap<String, Heartbeat>,
    /// The last heartbeat this agent saw of each node, also after its lease ended.
    pub last_heartbeat: BTreeMap<String, u64>,
    /// Sandbox subnet claims: subnet (`A.B.C.D/N`) → holder.
    pub subnets: BTreeMap<String, Versioned<String>>,
    /// Each node's requests for auto services, by (app, service), then by node.
    pub demand: BTreeMap<(String, String), BTreeMap<String, Demand>>,
    /// Placements of services by (app, service).
    pub placements: BTreeMap<(String, String), Versioned<Placement>>,
    /// Holders of elected roles by role.
    pub leaders: BTreeMap<String, Versioned<Leader>>,
    /// Certificates by host.
    pub certs: BTreeMap<String, Versioned<CertRecord>>,
    /// Pending ACME challenges: token → key authorization.
    pub challenges: BTreeMap<String, String>,
    /// The cluster's ACME account.
    pub acme_account: Option<Versioned<AcmeAccount>>,
    /// What changed for the ingress lately (see [`IngressLog`]).
    pub ingress_log: IngressLog,
}

/// The changes of the last revisions that the ingress's routes depend on, so the ingress
/// applies a route change in O(1) instead of rebuilding from every route.
#[derive(Debug, Default)]
pub struct IngressLog {
    /// (revision, host) of recent route puts and deletes, oldest first.
    changes: std::collections::VecDeque<(Revision, String)>,
    /// Changes up to this revision are not in `changes` (dropped, or anything but a route
    /// changed): a reader at an older revision rebuilds.
    floor: Revision,
}

/// Most route changes [`IngressLog`] keeps; a reader further behind rebuilds.
const INGRESS_LOG: usize = 4096;

impl IngressLog {
    fn route(&mut self, revision: Revision, host: &str) {
        if self.changes.len() == INGRESS_LOG
            && let Some((dropped, _)) = self.changes.pop_front()
        {
            self.floor = self.floor.max(dropped);
        }
        self.changes.push_back((revision, host.to_owned()));
    }

    /// Something else that routes depend on (an app, endpoints) changed at `revision`.
    fn everything(&mut self, revision: Revision) {
        self.changes.clear();
        self.floor = revision;
    }

    /// The hosts whose route changed after `after`, `None` when the reader must rebuild.
    pub fn hosts_since(&self, after: Revision) -> Option<impl Iterator<Item = &str>> {
        (after >= self.floor).then(|| {
            self.changes
                .iter()
                .filter(move |(revision, _)| *revision > after)
                .map(|(_, host)| host.as_str())
        })
    }
}

impl State {
    /// The app `name` if it validates here.
    pub fn app(&self, name: &str) -> Option<(&AppRecord, &AppConfig)> {
        let app = self.apps.get(name)?;
        Some((&app.record, app.config.as_ref()?))
    }

    /// The mod revision of `apps/NAME` (0: absent).
    pub fn app_revision(&self, name: &str) -> Revision {
        self.apps.get(name).map_or(0, |app| app.mod_revision)
    }

    /// Apps that validate here.
    pub fn valid_apps(&self) -> impl Iterator<Item = (&AppRecord, &AppConfig)> {
        self.apps
            .values()
            .filter_map(|app| Some((&app.record, app.config.as_ref()?)))
    }

    /// Node-port claims of apps that validate here, sorted by (node port, protocol).
    pub fn live_node_ports(&self) -> impl Iterator<Item = &NodePortRecord> {
        self.node_ports
            .values()
            .map(|np| &np.value)
            .filter(|np| self.app(&np.app).is_some())
    }

    /// Routes whose app validates here, sorted by host.
    pub fn live_routes(&self) -> impl Iterator<Item = &RouteRecord> {
        self.routes
            .values()
            .map(|route| &route.value)
            .filter(|route| self.app(&route.app).is_some())
    }

    /// The endpoints of one port of a service on every node, sorted.
    pub fn endpoints_of(&self, app: &str, service: &str, port_name: &str) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = self
            .service_endpoints(app, service)
            .flat_map(|(_, ports)| ports.get(port_name).into_iter().flatten().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Every node's endpoints of a service.
    pub fn service_endpoints(
        &self,
        app: &str,
        service: &str,
    ) -> impl Iterator<Item = (&str, &EndpointMap)> {
        self.endpoints
            .get(&(app.to_owned(), service.to_owned()))
            .into_iter()
            .flatten()
            .map(|(node, endpoints)| (node.as_str(), &endpoints.value))
    }

    fn put(&mut self, kv: &KeyValue, validation: &ValidationContext) {
        let (key, record) = match Record::decode(kv) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return,
            Err(err) => {
                tracing::error!(%err, "ignoring a record this agent cannot read");
                return;
            }
        };
        let mod_revision = kv.mod_revision;
        match (key, record) {
            (RecordKey::App(name), Record::App(record)) => {
                self.ingress_log.everything(mod_revision);
                let config = validate(&record, validation);
                self.apps.insert(
                    name,
                    DeployedApp {
                        record,
                        config,
                        mod_revision,
                    },
                );
            }
            (RecordKey::NodePort(protocol, port), Record::NodePort(value)) => {
                self.node_ports.insert(
                    (port, protocol),
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Route(host), Record::Route(value)) => {
                self.ingress_log.route(mod_revision, &host);
                self.routes.insert(
                    host,
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Endpoints { app, service, node }, Record::Endpoints(value)) => {
                self.ingress_log.everything(mod_revision);
                self.endpoints.entry((app, service)).or_default().insert(
                    node,
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Node(name), Record::Node(value)) => {
                self.nodes.insert(
                    name,
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Alive(name), Record::Alive(beat)) => {
                self.last_heartbeat.insert(name.clone(), beat.at);
                self.alive.insert(name, beat);
            }
            (RecordKey::Subnet(subnet), Record::Subnet(claim)) => {
                self.subnets.insert(
                    subnet,
                    Versioned {
                        value: claim.node,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Demand { app, service, node }, Record::Demand(demand)) => {
                self.demand
                    .entry((app, service))
                    .or_default()
                    .insert(node, demand);
            }
            (RecordKey::Placement { app, service }, Record::Placement(value)) => {
                self.placements.insert(
                    (app, service),
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Leader(role), Record::Leader(value)) => {
                self.leaders.insert(
                    role,
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Cert(host), Record::Cert(value)) => {
                self.certs.insert(
                    host,
                    Versioned {
                        value,
                        mod_revision,
                    },
                );
            }
            (RecordKey::Challenge(token), Record::Challenge(challenge)) => {
                self.challenges.insert(token, challenge.key_authorization);
            }
            (RecordKey::AcmeAccount, Record::AcmeAccount(value)) => {
                self.acme_account = Some(Versioned {
                    value,
                    mod_revision,
                });
            }
            (key, _) => tracing::error!(%key, "record of the wrong kind; ignored"),
        }
    }

    fn delete(&mut self, key: &str, revision: Revision) {
        match RecordKey::parse(key) {
            Some(RecordKey::App(name)) => {
                self.ingress_log.everything(revision);
                self.apps.remove(&name);
            }
            Some(RecordKey::NodePort(protocol, port)) => {
                self.node_ports.remove(&(port, protocol));
            }
            Some(RecordKey::Route(host)) => {
                self.ingress_log.route(revision, &host);
                self.routes.remove(&host);
            }
            Some(RecordKey::Endpoints { app, service, node }) => {
                self.ingress_log.everything(revision);
                let key = (app, service);
                if let Some(nodes) = self.endpoints.get_mut(&key) {
                    nodes.remove(&node);
                    if nodes.is_empty() {
                        self.endpoints.remove(&key);
                    }
                }
            }
            Some(RecordKey::Node(name)) => {
                self.nodes.remove(&name);
                self.last_heartbeat.remove(&name);
            }
            Some(RecordKey::Alive(name)) => {
                self.alive.remove(&name);
            }
            Some(RecordKey::Subnet(subnet)) => {
                self.subnets.remove(&subnet);
            }
            Some(RecordKey::Demand { app, service, node }) => {
                let key = (app, service);
                if let Some(nodes) = self.demand.get_mut(&key) {
                    nodes.remove(&node);
                    if nodes.is_empty() {
                        self.demand.remove(&key);
                    }
                }
            }
            Some(RecordKey::Placement { app, service }) => {
                self.placements.remove(&(app, service));
            }
            Some(RecordKey::Leader(role)) => {
                self.leaders.remove(&role);
            }
            Some(RecordKey::Cert(host)) => {
                self.certs.remove(&host);
            }
            Some(RecordKey::Challenge(token)) => {
                self.challenges.remove(&token);
            }
            Some(RecordKey::AcmeAccount) => self.acme_account = None,
            None => {}
        }
    }
}

/// Whether an event changes what the data planes, the ingress or the runner follow
/// (heartbeats and demand, which only the scheduler reads, do not).
fn followed(event: &Event) -> bool {
    let key = match event {
        Event::Put(kv) => kv.key.as_str(),
        Event::Delete { key, .. } => key.as_str(),
    };
    !key.starts_with("alive/") && !key.starts_with("demand/")
}

/// Validates a stored app as this agent would at deploy, filling in its assigned ports.
fn validate(record: &AppRecord, validation: &ValidationContext) -> Option<AppConfig> {
    let parsed = parse_deployable(Source::new(&record.source_name, &record.toml), validation);
    match parsed {
        Ok(mut config) => {
            for service in config.services.values_mut() {
                for port in service.ports.iter_mut().filter(|p| p.port.is_none()) {
                    port.port = record
                        .assigned_ports
                        .get(&(service.name.clone(), port.name.clone()))
                        .copied();
                }
            }
            Some(config)
        }
        Err(err) => {
            tracing::error!(app = %record.name, "stored app no longer validates on this agent; redeploy it:\n{err}");
            None
        }
    }
}

/// The view: the state behind a lock, and its revision announced on a watch channel.
#[derive(Debug)]
pub struct View {
    state: Mutex<State>,
    /// The revision of the last applied change, whatever it was.
    applied: watch::Sender<Revision>,
    /// The revision of the last change the consumers follow.
    revision: watch::Sender<Revision>,
    validation: ValidationContext,
}

impl View {
    /// A view of `listing`.
    pub fn new(listing: Listing, validation: ValidationContext) -> Self {
        let mut state = State::default();
        for kv in &listing.kvs {
            state.put(kv, &validation);
        }
        state.revision = listing.revision;
        state.ingress_log.everything(listing.revision);
        Self {
            state: Mutex::new(state),
            applied: watch::channel(listing.revision).0,
            revision: watch::channel(listing.revision).0,
            validation,
        }
    }

    /// The current state (hold the guard briefly: the watch waits for it).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A receiver of the revision after every change the consumers follow (all but
    /// heartbeats and demand).
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// A receiver of the revision after every change, heartbeats, demand and lease ends
    /// included.
    pub fn subscribe_all(&self) -> watch::Receiver<Revision> {
        self.applied.subscribe()
    }

    /// Waits up to `timeout` until the view is at `revision` or later; false on timeout.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut receiver = self.applied.subscribe();
        let reached = receiver.wait_for(|current| *current >= revision);
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }

    /// Applies the changes of the transactions up to `revision`.
    fn apply(&self, revision: Revision, events: &[Event]) {
        let followed = events.iter().any(followed);
        {
            let mut state = self.lock();
            for event in events {
                match event {
                    Event::Put(kv) => state.put(kv, &self.validation),
                    Event::Delete { key, mod_revision } => state.delete(key, *mod_revision),
                }
            }
            if followed {
                state.revision = state.revision.max(revision);
            }
        }
        // `revision` before `applied`: a command returns once `applied` reaches its commit,
        // and its caller may then wait for the consumers to reach `revision` (the API waits for
        // the ingress), which must already include the commit.
        if followed {
            announce(&self.revision, revision);
        }
        announce(&self.applied, revision);
    }

    /// Replaces the state with a new listing.
    fn replace(&self, listing: Listing) {
        let revision = listing.revision;
        let fresh = Self::new(listing, self.validation.clone());
        {
            let mut state = self.lock();
            let last_heartbeat = std::mem::take(&mut state.last_heartbeat);
            *state = fresh.state.into_inner().unwrap_or_else(|p| p.into_inner());
            for (node, at) in last_heartbeat {
                state.last_heartbeat.entry(node).or_insert(at);
            }
        }
        // As in `apply`: `revision` first.
        announce(&self.revision, revision);
        announce(&self.applied, revision);
    }
}

/// Moves `channel` to `revision` if that is newer.
fn announce(channel: &watch::Sender<Revision>, revision: Revision) {
    channel.send_if_modified(|current| {
        let newer = revision > *current;
        *current = (*current).max(revision);
        newer
    });
}

/// First and longest delay before listing the store again after a failure.
const RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Keeps `view` current from revision `after` on: applies the watch's changes, and lists the
/// store again when the watch is compacted or lost (retrying while the store is
/// unavailable; the view keeps its last state meanwhile). Runs until aborted.
pub async fn follow(store: Arc<dyn Store>, view: Arc<View>, mut after: Revision) {
    let mut delay = RETRY.0;
    loop {
        match store.watch(after).await {
            Ok(mut watch) => {
                let mut delivered = false;
                while let Some(WatchMessage::Changes { revision, events }) = watch.next().await {
                    view.apply(revision, &events);
                    after = revision;
                    delivered = true;
                }
                tracing::info!(after, "store watch compacted or lost; listing again");
                if delivered {
                    delay = RETRY.0;
                }
            }
            Err(err) => tracing::warn!(%err, "cannot watch the store; retrying"),
        }
        // A watch that keeps failing at once must not spin.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY.1);
        loop {
            match store.list().await {
                Ok(listing) => {
                    after = listing.revision;
                    view.replace(listing);
                    break;
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot list the store; keeping the last known state");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
