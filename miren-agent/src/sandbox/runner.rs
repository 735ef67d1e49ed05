//! The sandbox runner: one supervisor task per deployed service keeps as many instances as
//! the scheduler placed on this node (a fixed count, or for auto services the count the
//! cluster's demand asks for), with readiness, restarts, backoff and rolling replacement, and
//! publishes the ready ones as the service's endpoints, which the data planes and the
//! ingress follow.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    SandboxError, SandboxSettings,
    container::{self, ContainerSpec, Ended, Runtime},
    dns::DnsDirectory,
    instance::{Process, accepts_connections},
    ipam::Ipam,
    isolation::{Isolation, IsolationSettings, Member, PeerInstances},
    logs,
    net::{self, SandboxNet},
};
use crate::{
    api::types::{InstanceStatus, LogChunk},
    bundle::{BundleHash, BundleStore, BundleUsers},
    config::PortKind,
    control::{ControlPlane, DeployedService, InstanceExit},
    ingress::routing::LoadTracker,
    metrics::{ExitReason, Metrics},
};

type Key = (String, String);

/// How often a supervisor checks readiness, load and restarts.
const TICK: Duration = Duration::from_millis(100);
/// An instance that ran this long before exiting is not part of a crash loop.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// Instances being created at once (namespace, veth, runc): the rest wait their turn, so a
/// burst of starts neither starves the agent's threads nor delays its shutdown.
const CONCURRENT_STARTS: usize = 2;

/// State shared by the runner and its supervisors.
#[derive(Debug)]
struct Shared {
    control: Arc<ControlPlane>,
    /// The app code bundles instances run from.
    bundles: Arc<BundleStore>,
    settings: SandboxSettings,
    runtime: Arc<Runtime>,
    /// The sandbox firewall: which instance may talk to which.
    isolation: Isolation,
    /// How instances get IPv6 addresses; `None` where the node has IPv6 off.
    dual_stack: Option<crate::config::DualStack>,
    starts: tokio::sync::Semaphore,
    ipam: Mutex<Ipam>,
    load: Arc<LoadTracker>,
    ingress_revision: watch::Receiver<u64>,
    /// Instance counts, restarts and exits per service (`/metrics`).
    metrics: Arc<Metrics>,
    status: Mutex<HashMap<Key, InstanceStatus>>,
    /// Sandbox address → app, and ready addresses per service (for DNS).
    addresses: Mutex<HashMap<Ipv4Addr, Key>>,
    ready: Mutex<HashMap<Key, Vec<Ipv4Addr>>>,
    next_id: AtomicU64,
    /// Instances running on the node (bounded by `--max-instances-per-node`).
    running: std::sync::atomic::AtomicUsize,
    /// Every running instance, persisted for re-adoption by the next agent.
    records: Mutex<BTreeMap<String, InstanceRecord>>,
    /// Instances of an earlier agent to adopt, by service, until its supervisor takes them.
    adopted: Mutex<HashMap<Key, Vec<InstanceRecord>>>,
    /// Set when the agent stops (as opposed to an app being removed).
    shutting_down: std::sync::atomic::AtomicBool,
    /// Leave the instances running when the agent stops (`keep_running`, or a handover).
    keep_instances: std::sync::atomic::AtomicBool,
}

/// A running instance as written to `<state-dir>/sandbox/instances.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct InstanceRecord {
    app: String,
    service: String,
    instance: String,
    /// The runc container id.
    container: String,
    net: SandboxNetRecord,
    pid: u32,
    generation: u64,
    /// The code bundle the instance runs from (its `/app`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bundle: Option<String>,
}

/// [`SandboxNet`] as persisted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SandboxNetRecord {
    netns: String,
    host_veth: String,
    addr: Ipv4Addr,
}

impl Shared {
    fn records_file(&self) -> PathBuf {
        self.settings.state_dir.join("instances.json")
    }

    /// Records (or with `None` forgets) an instance and writes the file.
    fn record(&self, instance: &str, record: Option<InstanceRecord>) {
        {
            let mut records = lock(&self.records);
            match record {
                Some(record) => records.insert(instance.to_owned(), record),
                None => records.remove(instance),
            };
        }
        self.save_records();
    }

    /// Writes the running instances to [`Shared::records_file`].
    fn save_records(&self) {
        let text = serde_json::to_string_pretty(&*lock(&self.records)).unwrap_or_default();
        let file = self.records_file();
        let tmp = file.with_extension("json.tmp");
        if let Err(error) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &file)) {
            tracing::warn!(%error, file = %file.display(), "could not record the running instances");
        }
    }
}

#[derive(Debug)]
struct Supervisor {
    spec: watch::Sender<DeployedService>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs every deployed service's instances.
#[derive(Debug)]
pub struct Runner {
    shared: Arc<Shared>,
    supervisors: Mutex<HashMap<Key, Supervisor>>,
}

impl Runner {
    /// A runner creating sandboxes on `settings.bridge` (which it sets up now), whose
    /// instances run from the unpacked bundles of `bundles` and are counted in `metrics`.
    ///
    /// # Errors
    /// [`SandboxError`] when the bridge or the address file cannot be set up.
    pub fn new(
        control: Arc<ControlPlane>,
        bundles: Arc<BundleStore>,
        settings: SandboxSettings,
        load: Arc<LoadTracker>,
        ingress_revision: watch::Receiver<u64>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, SandboxError> {
        std::fs::create_dir_all(settings.state_dir.join("logs")).map_err(|e| {
            SandboxError::io(format!("creating {}", settings.state_dir.display()), e)
        })?;
        let runtime = Arc::new(Runtime::open(&settings.state_dir)?);
        container::become_subreaper()?;
        let mut ipam = Ipam::open(&settings.state_dir, settings.subnet)?;
        let records: BTreeMap<String, InstanceRecord> =
            std::fs::read_to_string(settings.state_dir.join("instances.json"))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default();
        let (adopt, stale): (Vec<InstanceRecord>, Vec<InstanceRecord>) = records
            .into_values()
            .partition(|r| super::instance::is_running(r.pid));
        let keep: Vec<Ipv4Addr> = adopt.iter().map(|r| r.net.addr).collect();
        for record in &stale {
            runtime.delete(&record.container);
            SandboxNet::from(&record.net).remove();
        }
        // Containers no record names (an agent killed between starting one and recording it).
        for id in runtime.list() {
            if !adopt.iter().any(|r| r.container == id) {
                runtime.delete(&id);
            }
        }
        remove_leftovers(&mut ipam, &keep);
        let dual_stack = net::ipv6_enabled().then_some(settings.dual_stack);
        if dual_stack.is_none() {
            tracing::warn!(
                "IPv6 is off in the agent's network namespace (net.ipv6.conf.all/default.disable_ipv6): sandboxes get IPv4 addresses only"
            );
        }
        net::ensure_bridge(
            &settings.bridge,
            settings.subnet,
            dual_stack.map(|dual| dual.node_subnet6(settings.subnet)),
        )?;
        let isolation = Isolation::open(&IsolationSettings {
            bridge: settings.bridge.clone(),
            subnet: settings.subnet,
            dual_stack,
            listener_ports: settings.listener_ports.clone(),
        })?;
        let members: Vec<Member> = adopt.iter().map(InstanceRecord::member).collect();
        isolation.retain(&members)?;
        isolation.set_peers(&PeerInstances::of_cluster(&control))?;
        let mut adopted: HashMap<Key, Vec<InstanceRecord>> = HashMap::new();
        for record in &adopt {
            tracing::info!(instance = %record.instance, addr = %record.net.addr, pid = record.pid, "adopting an instance of an earlier agent");
            adopted
                .entry((record.app.clone(), record.service.clone()))
                .or_default()
                .push(record.clone());
        }
        let keep_instances = std::sync::atomic::AtomicBool::new(settings.keep_running);
        let shared = Shared {
            control,
            bundles,
            settings,
            runtime,
            isolation,
            dual_stack,
            starts: tokio::sync::Semaphore::new(CONCURRENT_STARTS),
            ipam: Mutex::new(ipam),
            load,
            ingress_revision,
            metrics,
            status: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            running: std::sync::atomic::AtomicUsize::new(0),
            records: Mutex::new(BTreeMap::new()),
            adopted: Mutex::new(adopted),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            keep_instances,
        };
        lock(&shared.records).extend(adopt.into_iter().map(|r| (r.instance.clone(), r)));
        shared.save_records();
        Ok(Arc::new(Self {
            shared: Arc::new(shared),
            supervisors: Mutex::new(HashMap::new()),
        }))
    }

    /// Follows the deployed services until `shutdown`, then stops every instance.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut revisions = self.shared.control.subscribe();
        loop {
            self.sync();
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { break },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let supervisors: Vec<Supervisor> =
            lock(&self.supervisors).drain().map(|(_, s)| s).collect();
        for supervisor in &supervisors {
            supervisor.stop.send_replace(true);
        }
        for supervisor in supervisors {
            let _ = supervisor.task.await;
        }
        if self.shared.keep_instances.load(Ordering::SeqCst) {
            tracing::info!(
                "leaving the instances running for the next agent (--stop-instances-on-exit stops them)"
            );
        } else {
            if let Err(error) = self.shared.isolation.teardown() {
                tracing::warn!(%error, "could not remove the sandbox firewall");
            }
            net::remove_bridge(&self.shared.settings.bridge);
        }
    }

    /// Starts, updates and stops supervisors to match the deployed services, and tells the
    /// sandbox firewall the other nodes' instances.
    fn sync(&self) {
        let peers = PeerInstances::of_cluster(&self.shared.control);
        if let Err(error) = self.shared.isolation.set_peers(&peers) {
            tracing::warn!(%error, "the sandbox firewall does not know the other nodes' instances yet");
        }
        let deployed = self.shared.control.deployed_services();
        let mut supervisors = lock(&self.supervisors);
        let keys: Vec<Key> = deployed
            .iter()
            .map(|d| (d.app.clone(), d.service.name.clone()))
            .collect();
        let removed: Vec<(Key, Supervisor)> = supervisors
            .extract_if(|key, _| !keys.contains(key))
            .collect();
        for ((app, _), supervisor) in removed {
            supervisor.stop.send_replace(true);
            if keys.iter().any(|(a, _)| *a == app) {
                continue;
            }
            // The app is gone: its logs go once its instances have stopped (unless it was
            // deployed again meanwhile).
            let logs_dir = self.shared.settings.state_dir.join("logs");
            let control = Arc::clone(&self.shared.control);
            tokio::spawn(async move {
                let _ = supervisor.task.await;
                if control.deployed_services().iter().any(|d| d.app == app) {
                    return;
                }
                let removed =
                    tokio::task::spawn_blocking(move || logs::remove_app_logs(&logs_dir, &app))
                        .await;
                if let Ok(Err(error)) = removed {
                    tracing::warn!(%error, "could not remove the logs of a removed app");
                }
            });
        }
        for (key, spec) in keys.into_iter().zip(deployed) {
            match supervisors.get(&key) {
                Some(supervisor) => {
                    supervisor.spec.send_if_modified(|current| {
                        let changed = *current != spec;
                        *current = spec;
                        changed
                    });
                }
                None => {
                    let (spec_tx, spec_rx) = watch::channel(spec);
                    let (stop_tx, stop_rx) = watch::channel(false);
                    let service =
                        ServiceSupervisor::new(Arc::clone(&self.shared), key.clone(), spec_rx);
                    let task = tokio::spawn(service.run(stop_rx));
                    supervisors.insert(
                        key,
                        Supervisor {
                            spec: spec_tx,
                            stop: stop_tx,
                            task,
                        },
                    );
                }
            }
        }
    }

    /// Leaves the instances running when the agent stops, whatever `keep_running` says: a
    /// new agent taking over (`--upgrade`) adopts them.
    pub fn keep_instances(&self) {
        self.shared.keep_instances.store(true, Ordering::SeqCst);
    }

    /// The instance status of every service of `app`.
    pub fn status(&self, app: &str) -> BTreeMap<String, InstanceStatus> {
        lock(&self.shared.status)
            .iter()
            .filter(|((a, _), _)| a == app)
            .map(|((_, service), status)| (service.clone(), status.clone()))
            .collect()
    }

    /// The lines of `app`'s instances that `query` selects, about 1 MiB at most per call
    /// (see [`super::logs::read`]; blocking file reads).
    ///
    /// # Errors
    /// [`SandboxError::Io`] when the log files cannot be read.
    pub fn logs(&self, app: &str, query: &super::logs::LogQuery) -> Result<LogChunk, SandboxError> {
        super::logs::read(&self.shared.settings.state_dir.join("logs"), app, query)
    }
}

impl BundleUsers for Runner {
    /// The bundles of the deployed apps and of every running instance (an instance of a
    /// replaced bundle keeps its `/app` until it has stopped).
    fn bundles_in_use(&self) -> HashSet<BundleHash> {
        let mut in_use = self.shared.control.bundles_in_use();
        in_use.extend(
            lock(&self.shared.records)
                .values()
                .filter_map(|record| record.bundle.as_deref()?.parse().ok()),
        );
        in_use
    }
}

impl DnsDirectory for Runner {
    fn app_of(&self, ip: Ipv4Addr) -> Option<String> {
        lock(&self.shared.addresses)
            .get(&ip)
            .map(|(app, _)| app.clone())
    }

    fn addr6(&self, addr: Ipv4Addr) -> Option<std::net::Ipv6Addr> {
        self.shared.dual_stack?.addr6(addr)
    }

    /// The service's ready instances here first, then its endpoints on the other nodes.
    fn service_addrs(&self, app: &str, service: &str) -> Option<Vec<Ipv4Addr>> {
        let key = (app.to_owned(), service.to_owned());
        if !lock(&self.supervisors).contains_key(&key) {
            return None;
        }
        let mut addrs = lock(&self.shared.ready)
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let cluster = self.shared.control.endpoints(app, Some(service));
        let endpoints = cluster.iter().flatten().flat_map(|s| s.endpoints.values());
        for addr in endpoints.flatten() {
            if let IpAddr::V4(v4) = addr.ip()
                && !addrs.contains(&v4)
            {
                addrs.push(v4);
            }
        }
        Some(addrs)
    }
}

/// Removes the sandboxes an earlier agent left behind (it was killed without stopping them):
/// their processes, namespaces and addresses.
fn remove_leftovers(ipam: &mut Ipam, keep: &[Ipv4Addr]) {
    let leftovers: Vec<(Ipv4Addr, String)> = ipam
        .allocated()
        .iter()
        .filter(|(addr, _)| !keep.contains(addr))
        .map(|(addr, owner)| (*addr, owner.clone()))
        .collect();
    for (addr, owner) in leftovers {
        // Owners are `APP/SERVICE-ID`; the namespace is `miren-sID`.
        if let Some((_, id)) = owner.rsplit_once('-') {
            let netns = SandboxNet {
                netns: format!("{}{id}", net::NETNS_PREFIX),
                host_veth: format!("{}{id}", net::VETH_PREFIX),
                addr,
            };
            netns.kill_processes();
            netns.remove();
            tracing::info!(sandbox = %owner, %addr, "removed a sandbox left by an earlier agent");
        }
        if let Err(error) = ipam.release(addr) {
            tracing::warn!(%error, "could not release a leftover sandbox address");
        }
    }
}

/// True when a socket in the namespace of process `pid` is bound to UDP `port` (read from
/// `/proc/PID/net/udp`, which shows that process's network namespace).
fn udp_port_bound(pid: u32, port: u16) -> bool {
    let wanted = format!(":{port:04X}");
    ["udp", "udp6"].iter().any(|table| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(1))
            .any(|local| local.ends_with(&wanted))
    })
}

impl InstanceRecord {
    /// The instance as the sandbox firewall sees it.
    fn member(&self) -> Member {
        Member {
            veth: self.net.host_veth.clone(),
            addr: self.net.addr,
            app: self.app.clone(),
        }
    }
}

impl From<&SandboxNet> for SandboxNetRecord {
    fn from(net: &SandboxNet) -> Self {
        Self {
            netns: net.netns.clone(),
            host_veth: net.host_veth.clone(),
            addr: net.addr,
        }
    }
}

impl From<&SandboxNetRecord> for SandboxNet {
    fn from(record: &SandboxNetRecord) -> Self {
        Self {
            netns: record.netns.clone(),
            host_veth: record.host_veth.clone(),
            addr: record.addr,
        }
    }
}

/// What an instance runs: a redeploy replaces the instances of a service only when this
/// changes (command, environment, code bundle or directory, ports), not for other services of
/// the app.
fn generation(spec: &DeployedService) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&spec.command, &spec.env, &spec.directory).hash(&mut hasher);
    // Hashed only when there is one: instances started before bundles keep their generation.
    if let Some(bundle) = &spec.bundle {
        bundle.hash(&mut hasher);
    }
    for port in &spec.service.ports {
        (&port.name, port.port, port.kind == PortKind::Udp).hash(&mut hasher);
    }
    hasher.finish()
}

/// What an instance of `spec` sees at `/app`: the unpacked tree of its code bundle, the
/// directory of an app deployed by an agent before bundles, or nothing.
///
/// # Errors
/// [`SandboxError::MissingBundle`] when the bundle is not on this node.
fn app_dir(bundles: &BundleStore, spec: &DeployedService) -> Result<Option<PathBuf>, SandboxError> {
    match (&spec.bundle, &spec.directory) {
        (Some(bundle), _) => bundle
            .parse::<BundleHash>()
            .ok()
            .and_then(|hash| bundles.path(&hash))
            .map(Some)
            .ok_or_else(|| SandboxError::MissingBundle(bundle.chars().take(12).collect())),
        (None, Some(directory)) => Ok(Some(PathBuf::from(directory))),
        (None, None) => Ok(None),
    }
}

/// Resolves once `stop` turns true (without holding its borrow guard).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An instance the supervisor knows about.
#[derive(Debug)]
struct Instance {
    /// Process id of the instance's shell (its process group).
    pid: u32,
    id: String,
    /// [`generation`] of the spec it was started with.
    generation: u64,
    net: SandboxNet,
    started: Instant,
    ready: bool,
    /// Taken when the instance is being stopped.
    stop: Option<oneshot::Sender<Duration>>,
}

/// Events from the tasks that own the processes.
#[derive(Debug)]
enum Event {
    /// The process ended by itself.
    Exited { id: String, ended: Ended },
    /// The process was stopped on request.
    Stopped { id: String },
}

/// Keeps one service's instances in line.
#[derive(Debug)]
struct ServiceSupervisor {
    shared: Arc<Shared>,
    key: Key,
    spec: watch::Receiver<DeployedService>,
    instances: Vec<Instance>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Desired number of instances: as many as are placed on this node.
    target: usize,
    /// Instances in a row that exited soon after starting.
    failures: u32,
    /// Starts in a row that failed (backoff; shown as the status's error).
    start_failures: u32,
    /// The service left the desired state: its instances are being stopped.
    removed: bool,
    next_start: Instant,
    published: Option<BTreeMap<String, Vec<SocketAddr>>>,
}

impl ServiceSupervisor {
    fn new(shared: Arc<Shared>, key: Key, spec: watch::Receiver<DeployedService>) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let target = spec.borrow().instances;
        Self {
            shared,
            key,
            spec,
            instances: Vec::new(),
            events_tx,
            events,
            target,
            failures: 0,
            start_failures: 0,
            removed: false,
            next_start: Instant::now(),
            published: None,
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let adopted = lock(&self.shared.adopted)
            .remove(&self.key)
            .unwrap_or_default();
        let memory = self.shared.settings.limits.memory_bytes;
        for record in adopted {
            match Process::adopt(&self.shared.runtime, &record.container, record.pid, memory) {
                Some(process) => self.watch(process, record),
                None => {
                    self.shared.runtime.delete(&record.container);
                    let _ = self.shared.isolation.remove(&record.net.host_veth);
                    SandboxNet::from(&record.net).remove();
                }
            }
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                Some(event) = self.events.recv() => self.on_event(event),
                changed = self.spec.changed() => {
                    if changed.is_err() { break }
                    self.on_spec_change();
                }
                _ = tick.tick() => {
                    // A start waiting for its turn gives way to a stop request.
                    tokio::select! {
                        () = self.reconcile() => {}
                        () = stopped(&mut stop) => break,
                    }
                }
                () = stopped(&mut stop) => break,
            }
        }
        if self.shared.keep_instances.load(Ordering::SeqCst)
            && self.shared.shutting_down.load(Ordering::SeqCst)
        {
            return;
        }
        self.target = 0;
        // Removed from the desired state (not an agent stop): no endpoints left to publish.
        self.removed = !self.shared.shutting_down.load(Ordering::SeqCst);
        let timeout = self.spec.borrow().service.concurrency.shutdown_timeout;
        let ids: Vec<String> = self.instances.iter().map(|i| i.id.clone()).collect();
        self.begin_stop(&ids, timeout).await;
        while !self.instances.is_empty() {
            match self.events.recv().await {
                Some(event) => self.on_event(event),
                None => break,
            }
        }
        lock(&self.shared.status).remove(&self.key);
        lock(&self.shared.ready).remove(&self.key);
        self.shared
            .metrics
            .remove_instances(&self.key.0, &self.key.1);
    }

    fn on_spec_change(&mut self) {
        self.target = self.spec.borrow().instances;
    }

    fn on_event(&mut self, event: Event) {
        let (id, exit) = match event {
            Event::Exited { id, ended } => (id, Some(ended)),
            Event::Stopped { id } => (id, None),
        };
        let Some(pos) = self.instances.iter().position(|i| i.id == id) else {
            return;
        };
        let instance = self.instances.remove(pos);
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        self.shared.record(&instance.id, None);
        self.release(&instance);
        let (app, service) = &self.key;
        let live: Vec<&str> = self.instances.iter().map(|i| i.id.as_str()).collect();
        let logs_dir = self.shared.settings.state_dir.join("logs");
        if let Err(error) = logs::prune(&logs_dir, app, service, &live) {
            tracing::warn!(app, service, %error, "could not prune the logs of stopped instances");
        }
        let reason = exit
            .as_ref()
            .map_or(ExitReason::Stopped, |ended| ended.reason);
        self.shared
            .metrics
            .observe_instance_exit(app, service, reason);
        if let Some(Ended { how, .. }) = exit {
            tracing::warn!(app, service, instance = %instance.id, exit = %how, "instance exited; restarting");
            self.shared.control.report_instance_exit(InstanceExit {
                app: app.clone(),
                service: service.clone(),
                how: how.clone(),
            });
            if instance.started.elapsed() < STABLE_RUN {
                self.failures += 1;
            } else {
                self.failures = 0;
            }
            let backoff = Duration::from_millis(250) * 2u32.saturating_pow(self.failures.min(7));
            self.next_start = Instant::now() + backoff.min(Duration::from_secs(30));
            let mut status = lock(&self.shared.status);
            let status = status.entry(self.key.clone()).or_default();
            status.restarts += 1;
            status.last_exit = Some(how);
        }
    }

    fn release(&self, instance: &Instance) {
        if let Err(error) = self.shared.isolation.remove(&instance.net.host_veth) {
            tracing::warn!(%error, "could not remove an instance from the sandbox firewall");
        }
        instance.net.remove();
        lock(&self.shared.addresses).remove(&instance.net.addr);
        if let Err(error) = lock(&self.shared.ipam).release(instance.net.addr) {
            tracing::warn!(%error, "could not release a sandbox address");
        }
    }

    async fn reconcile(&mut self) {
        let spec = self.spec.borrow().clone();
        // Readiness.
        for instance in self
            .instances
            .iter_mut()
            .filter(|i| !i.ready && i.stop.is_some())
        {
            let tcp: Vec<SocketAddrV4> = spec
                .service
                .ports
                .iter()
                .filter(|p| p.kind != PortKind::Udp)
                .filter_map(|p| p.port)
                .map(|port| SocketAddrV4::new(instance.net.addr, port))
                .collect();
            let udp_bound = spec
                .service
                .ports
                .iter()
                .filter(|p| p.kind == PortKind::Udp)
                .filter_map(|p| p.port)
                .all(|port| udp_port_bound(instance.pid, port));
            if udp_bound && accepts_connections(&tcp).await {
                instance.ready = true;
            }
        }
        // Rolling replacement and scaling: start one when short, stop one when over.
        let generation = generation(&spec);
        let current = |i: &&Instance| i.generation == generation && i.stop.is_some();
        let starting = self
            .instances
            .iter()
            .filter(current)
            .filter(|i| !i.ready)
            .count();
        let current_count = self.instances.iter().filter(current).count();
        let current_ready = current_count - starting;
        let old: Vec<String> = self
            .instances
            .iter()
            .filter(|i| i.generation != generation && i.stop.is_some())
            .map(|i| i.id.clone())
            .collect();
        let timeout = spec.service.concurrency.shutdown_timeout;
        if current_count < self.target && starting == 0 && Instant::now() >= self.next_start {
            match self.start(&spec).await {
                Ok(()) => {
                    self.start_failures = 0;
                    self.set_error(None);
                }
                Err(error) => {
                    self.start_failures += 1;
                    self.next_start =
                        Instant::now() + Duration::from_secs(1) * self.start_failures.min(30);
                    self.set_error(Some(error.to_string()));
                }
            }
        } else if let Some(id) = old
            .first()
            .filter(|_| current_ready + old.len() > self.target)
        {
            let id = id.clone();
            self.begin_stop(&[id], timeout).await;
        } else if current_count > self.target {
            let newest = self
                .instances
                .iter()
                .filter(current)
                .max_by_key(|i| i.started)
                .map(|i| i.id.clone());
            if let Some(id) = newest {
                self.begin_stop(&[id], timeout).await;
            }
        }
        self.publish().await;
        self.report();
    }

    /// Creates one instance: an address, its network namespace, its container (waiting for a
    /// turn among [`CONCURRENT_STARTS`]; the blocking work runs off the async threads).
    async fn start(&mut self, spec: &DeployedService) -> Result<(), SandboxError> {
        let shared = Arc::clone(&self.shared);
        let (app, service) = self.key.clone();
        let _turn = shared.starts.acquire().await;
        let limit = shared.settings.max_instances;
        if shared.running.load(Ordering::SeqCst) >= limit {
            return Err(SandboxError::NodeFull(limit));
        }
        let dir = app_dir(&shared.bundles, spec)?;
        let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Unique among agents (pid) and short enough for a veth name (mvs + 12).
        let id = format!("{:x}x{:x}", std::process::id(), n % 0x1_0000);
        let instance_name = format!("{service}-{id}");
        let addr = lock(&shared.ipam).allocate(&format!("{app}/{instance_name}"))?;
        let log = shared
            .settings
            .state_dir
            .join("logs")
            .join(&app)
            .join(format!("{instance_name}.log"));
        let mut env = spec.env.clone();
        env.insert("MIREN_APP".into(), app.clone());
        env.insert("MIREN_SERVICE".into(), service.clone());
        env.insert("MIREN_INSTANCE".into(), instance_name.clone());
        env.insert("MIREN_ADDR".into(), addr.to_string());
        let command = spec.command.clone();
        let container_id = id.clone();
        let blocking = Arc::clone(&shared);
        let (app_name, name) = (app.clone(), instance_name.clone());
        let created = tokio::task::spawn_blocking(move || {
            let shared = blocking;
            let settings = &shared.settings;
            let v6 = match shared.dual_stack {
                Some(dual) => Some((
                    dual.node_subnet6(settings.subnet),
                    dual.addr6(addr).ok_or(SandboxError::OutsideSubnet(addr))?,
                )),
                None => None,
            };
            let at = net::Placement {
                subnet: settings.subnet,
                addr,
                v6,
            };
            let net = SandboxNet::create(&id, &settings.bridge, at)?;
            let member = Member {
                veth: net.host_veth.clone(),
                addr,
                app: app_name.clone(),
            };
            if let Err(e) = shared.isolation.admit(&member) {
                net.remove();
                return Err(e);
            }
            let container = ContainerSpec {
                id: &id,
                app: &app_name,
                hostname: &name,
                command: &command,
                env: &env,
                app_dir: dir.as_deref(),
                netns_path: net.netns_path(),
                nameserver: settings.subnet.gateway(),
                limits: settings.limits,
            };
            let started = logs::spawn_shim(
                Path::new("/proc/self/exe"),
                &log,
                settings.log_max,
                logs::DEFAULT_KEEP_FILES,
            )
            .and_then(|output| Process::start(&shared.runtime, &container, output));
            match started {
                Ok(process) => Ok((net, process)),
                Err(e) => {
                    let _ = shared.isolation.remove(&net.host_veth);
                    net.remove();
                    Err(e)
                }
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(SandboxError::io(
                "starting an instance".into(),
                std::io::Error::other(e.to_string()),
            ))
        });
        let (net, process) = match created {
            Ok(created) => created,
            Err(e) => {
                let _ = lock(&shared.ipam).release(addr);
                return Err(e);
            }
        };
        tracing::info!(app, service, instance = %instance_name, %addr, pid = process.pid(), "instance started");
        let record = InstanceRecord {
            app,
            service,
            instance: instance_name,
            container: container_id,
            net: SandboxNetRecord::from(&net),
            pid: process.pid(),
            generation: generation(spec),
            bundle: spec.bundle.clone(),
        };
        self.watch(process, record);
        Ok(())
    }

    /// Records why the service's instances cannot start (`None`: they can again): one status
    /// line shown by `miren app show`, and one log line when it changes — not one per attempt.
    fn set_error(&self, error: Option<String>) {
        let mut status = lock(&self.shared.status);
        let status = status.entry(self.key.clone()).or_default();
        if status.error == error {
            return;
        }
        let (app, service) = &self.key;
        match &error {
            Some(error) => tracing::warn!(app, service, %error, "could not start an instance"),
            None if status.error.is_some() => {
                tracing::info!(app, service, "instances start again");
            }
            None => {}
        }
        status.error = error;
    }

    /// Tracks a running instance: its task waits for the process or stops it on request.
    fn watch(&mut self, mut process: Process, record: InstanceRecord) {
        self.shared.record(&record.instance, Some(record.clone()));
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        let net = SandboxNet::from(&record.net);
        lock(&self.shared.addresses).insert(net.addr, self.key.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<Duration>();
        let events = self.events_tx.clone();
        let event_id = record.instance.clone();
        let load = Arc::clone(&self.shared.load);
        let ip = IpAddr::V4(net.addr);
        tokio::spawn(async move {
            tokio::select! {
                ended = process.wait() => { let _ = events.send(Event::Exited { id: event_id, ended }); }
                Ok(timeout) = stop_rx => {
                    // Out of the endpoints already: let the requests in flight to it finish.
                    let drained = async {
                        while load.in_flight_to(ip) > 0 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    let _ = tokio::time::timeout(timeout, drained).await;
                    process.stop(timeout).await;
                    let _ = events.send(Event::Stopped { id: event_id });
                }
            }
        });
        self.instances.push(Instance {
            pid: record.pid,
            id: record.instance,
            generation: record.generation,
            net,
            started: Instant::now(),
            ready: false,
            stop: Some(stop_tx),
        });
    }

    /// Takes the instances out of the endpoints, waits until the ingress no longer routes to
    /// them, then asks their tasks to stop them: once the requests in flight to one are done (up to
    /// the shutdown timeout), SIGTERM, then SIGKILL after the shutdown timeout.
    async fn begin_stop(&mut self, ids: &[String], timeout: Duration) {
        let stops: Vec<oneshot::Sender<Duration>> = self
            .instances
            .iter_mut()
            .filter(|i| ids.contains(&i.id))
            .filter_map(|instance| {
                instance.ready = false;
                instance.stop.take()
            })
            .collect();
        if stops.is_empty() {
            return;
        }
        self.publish().await;
        for stop in stops {
            let _ = stop.send(timeout);
        }
    }

    /// Publishes the ready instances as the service's endpoints when they changed.
    async fn publish(&mut self) {
        if self.removed {
            return;
        }
        let spec = self.spec.borrow().clone();
        let ready: Vec<Ipv4Addr> = self
            .instances
            .iter()
            .filter(|i| i.ready)
            .map(|i| i.net.addr)
            .collect();
        let endpoints: BTreeMap<String, Vec<SocketAddr>> = spec
            .service
            .ports
            .iter()
            .filter_map(|p| {
                let port = p.port?;
                let addrs = ready
                    .iter()
                    .map(|ip| SocketAddr::V4(SocketAddrV4::new(*ip, port)))
                    .collect();
                Some((p.name.clone(), addrs))
            })
            .collect();
        if self.published.as_ref() == Some(&endpoints) {
            return;
        }
        lock(&self.shared.ready).insert(self.key.clone(), ready);
        let (app, service) = &self.key;
        match self
            .shared
            .control
            .set_endpoints(app, service, endpoints.clone())
            .await
        {
            Ok(_) => {
                self.published = Some(endpoints);
                // Both the ingress and the node-port data plane route with the new endpoints
                // before anything is stopped (bounded: a stuck data plane delays, not blocks).
                let target = *self.shared.control.subscribe().borrow();
                let mut applied = self.shared.ingress_revision.clone();
                let control = &self.shared.control;
                let both = async {
                    let _ = applied.wait_for(|r| *r >= target).await;
                    while control.dataplane_revision().is_some_and(|r| r < target) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), both).await;
            }
            Err(error) => tracing::warn!(app, service, %error, "could not publish endpoints"),
        }
    }

    fn report(&self) {
        let mut status = lock(&self.shared.status);
        let status = status.entry(self.key.clone()).or_default();
        status.running = self.instances.iter().filter(|i| i.stop.is_some()).count();
        status.ready = self.instances.iter().filter(|i| i.ready).count();
        status.crash_loop = self.failures >= 3;
        let (app, service) = &self.key;
        self.shared
            .metrics
            .set_instances(app, service, status.running, status.ready);
    }
}
