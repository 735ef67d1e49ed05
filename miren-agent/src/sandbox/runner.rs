//! The sandbox runner: one supervisor task per deployed service keeps its instances in line
//! with the app config — fixed count with restarts and backoff, or on demand (started by the
//! ingress's activation hook, scaled by in-flight requests, stopped when idle) — and publishes
//! the ready ones as the service's endpoints, which the data planes and the ingress follow.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{
    SandboxError, SandboxSettings,
    dns::DnsDirectory,
    instance::{Process, accepts_connections},
    ipam::Ipam,
    net::{self, SandboxNet},
};
use crate::{
    api::types::{InstanceStatus, LogChunk},
    config::{ConcurrencyMode, PortKind},
    control::{ControlPlane, DeployedService},
    ingress::{activation::Activator, routing::LoadTracker},
};

type Key = (String, String);

/// How often a supervisor checks readiness, load and restarts.
const TICK: Duration = Duration::from_millis(100);
/// An instance that ran this long before exiting is not part of a crash loop.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// State shared by the runner and its supervisors.
#[derive(Debug)]
struct Shared {
    control: Arc<ControlPlane>,
    settings: SandboxSettings,
    ipam: Mutex<Ipam>,
    load: Arc<LoadTracker>,
    ingress_revision: watch::Receiver<u64>,
    status: Mutex<HashMap<Key, InstanceStatus>>,
    /// Sandbox address → app, and ready addresses per service (for DNS).
    addresses: Mutex<HashMap<Ipv4Addr, Key>>,
    ready: Mutex<HashMap<Key, Vec<Ipv4Addr>>>,
    next_id: AtomicU64,
    /// Every running instance, persisted for re-adoption (`--keep-sandboxes`).
    records: Mutex<BTreeMap<String, InstanceRecord>>,
    /// Instances of an earlier agent to adopt, by service, until its supervisor takes them.
    adopted: Mutex<HashMap<Key, Vec<InstanceRecord>>>,
    /// Set when the agent stops (as opposed to an app being removed).
    shutting_down: std::sync::atomic::AtomicBool,
}

/// A running instance as written to `<state-dir>/sandbox/instances.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct InstanceRecord {
    app: String,
    service: String,
    instance: String,
    net: SandboxNetRecord,
    pid: u32,
    generation: u64,
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
    activate: Arc<Notify>,
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
    /// A runner creating sandboxes on `settings.bridge` (which it sets up now).
    ///
    /// # Errors
    /// [`SandboxError`] when the bridge or the address file cannot be set up.
    pub fn new(
        control: Arc<ControlPlane>,
        settings: SandboxSettings,
        load: Arc<LoadTracker>,
        ingress_revision: watch::Receiver<u64>,
    ) -> Result<Arc<Self>, SandboxError> {
        std::fs::create_dir_all(settings.state_dir.join("logs")).map_err(|e| {
            SandboxError::io(format!("creating {}", settings.state_dir.display()), e)
        })?;
        let mut ipam = Ipam::open(&settings.state_dir, settings.subnet)?;
        let records: BTreeMap<String, InstanceRecord> =
            std::fs::read_to_string(settings.state_dir.join("instances.json"))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default();
        let (adopt, stale): (Vec<InstanceRecord>, Vec<InstanceRecord>) = records
            .into_values()
            .partition(|r| settings.keep_running && super::instance::is_running(r.pid));
        let keep: Vec<Ipv4Addr> = adopt.iter().map(|r| r.net.addr).collect();
        remove_leftovers(&mut ipam, &keep);
        for record in &stale {
            SandboxNet::from(&record.net).remove();
        }
        net::ensure_bridge(&settings.bridge, settings.subnet)?;
        let mut adopted: HashMap<Key, Vec<InstanceRecord>> = HashMap::new();
        for record in &adopt {
            tracing::info!(instance = %record.instance, addr = %record.net.addr, pid = record.pid, "adopting an instance of an earlier agent");
            adopted
                .entry((record.app.clone(), record.service.clone()))
                .or_default()
                .push(record.clone());
        }
        let shared = Shared {
            control,
            settings,
            ipam: Mutex::new(ipam),
            load,
            ingress_revision,
            status: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            records: Mutex::new(BTreeMap::new()),
            adopted: Mutex::new(adopted),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
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
        if self.shared.settings.keep_running {
            tracing::info!("leaving the instances running for the next agent (--keep-sandboxes)");
        } else {
            net::remove_bridge(&self.shared.settings.bridge);
        }
    }

    /// Starts, updates and stops supervisors to match the deployed services.
    fn sync(&self) {
        let deployed = self.shared.control.deployed_services();
        let mut supervisors = lock(&self.supervisors);
        let keys: Vec<Key> = deployed
            .iter()
            .map(|d| (d.app.clone(), d.service.name.clone()))
            .collect();
        supervisors.retain(|key, supervisor| {
            let keep = keys.contains(key);
            if !keep {
                supervisor.stop.send_replace(true);
            }
            keep
        });
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
                    let activate = Arc::new(Notify::new());
                    let service = ServiceSupervisor::new(
                        Arc::clone(&self.shared),
                        key.clone(),
                        spec_rx,
                        Arc::clone(&activate),
                    );
                    let task = tokio::spawn(service.run(stop_rx));
                    supervisors.insert(
                        key,
                        Supervisor {
                            spec: spec_tx,
                            activate,
                            stop: stop_tx,
                            task,
                        },
                    );
                }
            }
        }
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

impl DnsDirectory for Runner {
    fn app_of(&self, ip: Ipv4Addr) -> Option<String> {
        lock(&self.shared.addresses)
            .get(&ip)
            .map(|(app, _)| app.clone())
    }

    fn service_addrs(&self, app: &str, service: &str) -> Option<Vec<Ipv4Addr>> {
        let key = (app.to_owned(), service.to_owned());
        if !lock(&self.supervisors).contains_key(&key) {
            return None;
        }
        Some(
            lock(&self.shared.ready)
                .get(&key)
                .cloned()
                .unwrap_or_default(),
        )
    }
}

impl Activator for Runner {
    fn ensure_starting(&self, app: &str, service: &str) -> Result<(), String> {
        match lock(&self.supervisors).get(&(app.to_owned(), service.to_owned())) {
            Some(supervisor) => {
                supervisor.activate.notify_one();
                Ok(())
            }
            None => Err(format!("app {app} has no service {service} to start")),
        }
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
/// changes (command, environment, directory, ports), not for other services of the app.
fn generation(spec: &DeployedService) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&spec.command, &spec.env, &spec.directory).hash(&mut hasher);
    for port in &spec.service.ports {
        (&port.name, port.port, port.kind == PortKind::Udp).hash(&mut hasher);
    }
    hasher.finish()
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
    Exited { id: String, how: String },
    /// The process was stopped on request.
    Stopped { id: String },
}

/// Keeps one service's instances in line.
#[derive(Debug)]
struct ServiceSupervisor {
    shared: Arc<Shared>,
    key: Key,
    spec: watch::Receiver<DeployedService>,
    activate: Arc<Notify>,
    instances: Vec<Instance>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Desired number of instances.
    target: usize,
    failures: u32,
    next_start: Instant,
    last_busy: Instant,
    published: Option<BTreeMap<String, Vec<SocketAddr>>>,
}

impl ServiceSupervisor {
    fn new(
        shared: Arc<Shared>,
        key: Key,
        spec: watch::Receiver<DeployedService>,
        activate: Arc<Notify>,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let target = match spec.borrow().service.concurrency.mode {
            ConcurrencyMode::Fixed { num_instances } => num_instances as usize,
            ConcurrencyMode::Auto { .. } => 0,
        };
        Self {
            shared,
            key,
            spec,
            activate,
            instances: Vec::new(),
            events_tx,
            events,
            target,
            failures: 0,
            next_start: Instant::now(),
            last_busy: Instant::now(),
            published: None,
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let adopted = lock(&self.shared.adopted)
            .remove(&self.key)
            .unwrap_or_default();
        for record in adopted {
            match Process::adopt(record.pid) {
                Some(process) => self.watch(process, record),
                None => SandboxNet::from(&record.net).remove(),
            }
        }
        let mut tick = tokio::time::interval(TICK);
        let activate = Arc::clone(&self.activate);
        loop {
            tokio::select! {
                Some(event) = self.events.recv() => self.on_event(event),
                _ = activate.notified() => {
                    self.last_busy = Instant::now();
                    if self.target == 0 {
                        self.target = 1;
                    }
                }
                changed = self.spec.changed() => {
                    if changed.is_err() { break }
                    self.on_spec_change();
                }
                _ = tick.tick() => self.reconcile().await,
                () = stopped(&mut stop) => break,
            }
        }
        if self.shared.settings.keep_running && self.shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        self.target = 0;
        let timeout = self.spec.borrow().service.concurrency.shutdown_timeout;
        let ids: Vec<String> = self.instances.iter().map(|i| i.id.clone()).collect();
        for id in ids {
            self.begin_stop(&id, timeout).await;
        }
        while !self.instances.is_empty() {
            match self.events.recv().await {
                Some(event) => self.on_event(event),
                None => break,
            }
        }
        lock(&self.shared.status).remove(&self.key);
        lock(&self.shared.ready).remove(&self.key);
    }

    fn on_spec_change(&mut self) {
        if let ConcurrencyMode::Fixed { num_instances } =
            self.spec.borrow().service.concurrency.mode
        {
            self.target = num_instances as usize;
        }
    }

    fn on_event(&mut self, event: Event) {
        let (id, exit) = match event {
            Event::Exited { id, how } => (id, Some(how)),
            Event::Stopped { id } => (id, None),
        };
        let Some(pos) = self.instances.iter().position(|i| i.id == id) else {
            return;
        };
        let instance = self.instances.remove(pos);
        self.shared.record(&instance.id, None);
        self.release(&instance);
        if let Some(how) = exit {
            let (app, service) = &self.key;
            tracing::warn!(app, service, instance = %instance.id, exit = %how, "instance exited; restarting");
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
        self.autoscale(&spec);
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
            if let Err(error) = self.start(&spec) {
                let (app, service) = &self.key;
                tracing::warn!(app, service, %error, "could not start an instance");
                self.failures += 1;
                self.next_start = Instant::now() + Duration::from_secs(1) * self.failures.min(30);
            }
        } else if let Some(id) = old
            .first()
            .filter(|_| current_ready + old.len() > self.target)
        {
            let id = id.clone();
            self.begin_stop(&id, timeout).await;
        } else if current_count > self.target {
            let newest = self
                .instances
                .iter()
                .filter(current)
                .max_by_key(|i| i.started)
                .map(|i| i.id.clone());
            if let Some(id) = newest {
                self.begin_stop(&id, timeout).await;
            }
        }
        self.publish().await;
        self.report();
    }

    /// Auto mode: one instance per `requests_per_instance` in-flight requests; down by one
    /// after `scale_down_delay` without requests.
    fn autoscale(&mut self, spec: &DeployedService) {
        let ConcurrencyMode::Auto {
            requests_per_instance,
            scale_down_delay,
        } = spec.service.concurrency.mode
        else {
            return;
        };
        let in_flight = self.shared.load.in_flight(&self.key.0, &self.key.1);
        if in_flight > 0 {
            self.last_busy = Instant::now();
            let wanted = in_flight.div_ceil(requests_per_instance.max(1) as usize);
            self.target = self.target.max(wanted);
        } else if self.target > 0 && self.last_busy.elapsed() >= scale_down_delay {
            self.target -= 1;
            self.last_busy = Instant::now();
            let (app, service) = &self.key;
            tracing::info!(app, service, instances = self.target, "idle; scaling down");
        }
    }

    fn start(&mut self, spec: &DeployedService) -> Result<(), SandboxError> {
        let shared = &self.shared;
        let (app, service) = &self.key;
        let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Unique among agents (pid) and short enough for a veth name (mvs + 12).
        let id = format!("{:x}x{:x}", std::process::id(), n % 0x1_0000);
        let instance_name = format!("{service}-{id}");
        let addr = lock(&shared.ipam).allocate(&format!("{app}/{instance_name}"))?;
        let net =
            match SandboxNet::create(&id, &shared.settings.bridge, shared.settings.subnet, addr) {
                Ok(net) => net,
                Err(e) => {
                    let _ = lock(&shared.ipam).release(addr);
                    return Err(e);
                }
            };
        let dir = spec.directory.clone().map_or_else(
            || shared.settings.state_dir.join("apps").join(app),
            PathBuf::from,
        );
        let _ = std::fs::create_dir_all(&dir);
        let log_dir = shared.settings.state_dir.join("logs").join(app);
        let _ = std::fs::create_dir_all(&log_dir);
        let log = log_dir.join(format!("{instance_name}.log"));
        let mut env = spec.env.clone();
        env.insert("MIREN_APP".into(), app.clone());
        env.insert("MIREN_SERVICE".into(), service.clone());
        env.insert("MIREN_INSTANCE".into(), instance_name.clone());
        env.insert("MIREN_ADDR".into(), addr.to_string());
        let process = match Process::start(&spec.command, &net, &env, &dir, &log) {
            Ok(process) => process,
            Err(e) => {
                net.remove();
                let _ = lock(&shared.ipam).release(addr);
                return Err(e);
            }
        };
        tracing::info!(app, service, instance = %instance_name, %addr, "instance started");
        let record = InstanceRecord {
            app: app.clone(),
            service: service.clone(),
            instance: instance_name,
            net: SandboxNetRecord::from(&net),
            pid: process.pid(),
            generation: generation(spec),
        };
        self.watch(process, record);
        Ok(())
    }

    /// Tracks a running instance: its task waits for the process or stops it on request.
    fn watch(&mut self, mut process: Process, record: InstanceRecord) {
        self.shared.record(&record.instance, Some(record.clone()));
        let net = SandboxNet::from(&record.net);
        lock(&self.shared.addresses).insert(net.addr, self.key.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<Duration>();
        let events = self.events_tx.clone();
        let event_id = record.instance.clone();
        tokio::spawn(async move {
            tokio::select! {
                how = process.wait() => { let _ = events.send(Event::Exited { id: event_id, how }); }
                Ok(timeout) = stop_rx => {
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

    /// Takes the instance out of the endpoints, waits until the ingress no longer routes to
    /// it, then asks its task to stop the process.
    async fn begin_stop(&mut self, id: &str, timeout: Duration) {
        let Some(instance) = self.instances.iter_mut().find(|i| i.id == id) else {
            return;
        };
        let Some(stop) = instance.stop.take() else {
            return;
        };
        instance.ready = false;
        self.publish().await;
        let _ = stop.send(timeout);
    }

    /// Publishes the ready instances as the service's endpoints when they changed.
    async fn publish(&mut self) {
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
    }
}
