//! The control plane: validated operations on the desired state (deploy, routes, published
//! node ports, endpoints), each checked completely before one atomic store commit, so a
//! rejected request changes nothing.
//!
//! [`ControlPlane`] keeps the parsed state in memory, persists through a [`Store`], and
//! announces every new revision on a watch channel for the data planes and the ingress.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use crate::{
    api::types::{
        AppDetail, AppSummary, NodePortInfo, PortInfo, PortsEditRequest, PublishSpec, RouteInfo,
        ServiceDetail, ServiceEndpoints, UnpublishSpec,
    },
    config::{
        AppConfig, ConcurrencyMode, ConfigError, NodePortClaim, PortKind, Protocol, ServiceConfig,
        Source, ValidationContext, assign_ports, check_node_instances, check_node_port_claims,
        instance_env, parse_deployable,
    },
    dataplane::NodePortKey,
    routes::{Host, check_route_target},
    store::{
        AppRecord, EndpointMap, NodePortRecord, RouteRecord, Store, StoreError, StoreState, Write,
    },
};

/// Errors of control operations, each with a message for the user.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The app.toml is invalid; the message holds every diagnostic.
    #[error("{0}")]
    InvalidConfig(#[from] ConfigError),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts existing state (e.g. a port held by another app).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed; nothing was changed.
    #[error("the state store failed: {0}")]
    Store(#[from] StoreError),
}

/// Settings of the control plane that come from the agent's configuration.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The agent's own listener ports (never node ports), with what uses them.
    pub validation: ValidationContext,
    /// Range for target ports the agent assigns when app.toml leaves `port` out.
    pub port_range: RangeInclusive<u16>,
}

/// A deployed app: its record and the validated config with every port number filled in.
#[derive(Debug, Clone)]
struct DeployedApp {
    record: AppRecord,
    config: AppConfig,
}

#[derive(Debug)]
struct Desired {
    revision: u64,
    apps: BTreeMap<String, DeployedApp>,
    node_ports: Vec<NodePortRecord>,
    routes: Vec<RouteRecord>,
    endpoints: BTreeMap<(String, String), EndpointMap>,
}

/// A route as the ingress needs it: host, target, timeout and the target's HTTP endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRoute {
    /// The stored route.
    pub record: RouteRecord,
    /// Ready endpoints of the target service's http port (shared by its routes).
    pub endpoints: Arc<[SocketAddr]>,
}

/// A service to run: what the sandbox runner needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployedService {
    /// App name.
    pub app: String,
    /// App deploy counter.
    pub version: u64,
    /// The app directory, when the deploying client sent it.
    pub directory: Option<String>,
    /// The shell command.
    pub command: String,
    /// Environment: `[[env]]`, service env, `PORT`, `PORT_1..N`.
    pub env: std::collections::BTreeMap<String, String>,
    /// The validated service (ports with numbers, concurrency).
    pub service: ServiceConfig,
    /// The most instances the service may run (`--max-instances-per-service`): an auto
    /// service scales up to it at most.
    pub max_instances: u32,
}

/// Validated operations on the desired state.
pub struct ControlPlane {
    store: Box<dyn Store>,
    settings: ControlSettings,
    desired: Mutex<Desired>,
    revision_tx: watch::Sender<u64>,
    dataplane_report: Mutex<Option<DataplaneReport>>,
}

/// The outcome of applying one revision's snapshot to the data plane (from the reconciler),
/// shown as each node port's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataplaneReport {
    /// Revision of the snapshot that was applied or attempted.
    pub revision: u64,
    /// Why the whole apply failed, if it did (the previous state is kept).
    pub failure: Option<String>,
    /// Node ports that could not be applied, with the reason; the others were.
    pub port_errors: BTreeMap<NodePortKey, String>,
}

impl DataplaneReport {
    /// The status of node port `key` when the desired state is at `desired_revision`:
    /// `ok`, `pending: …` or `error: …`.
    pub fn port_status(&self, key: &NodePortKey, desired_revision: u64) -> String {
        if let Some(failure) = &self.failure {
            format!("error: {failure} (the previous state is kept; retrying)")
        } else if let Some(error) = self.port_errors.get(key) {
            format!("error: {error}")
        } else if self.revision < desired_revision {
            format!("pending: revision {desired_revision} not applied yet")
        } else {
            "ok".into()
        }
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Loads the state from `store`. Stored apps that no longer validate (e.g. the agent's
    /// listener ports changed) are kept in the store but skipped, with an error logged.
    ///
    /// # Errors
    /// [`ControlError::Store`] when the store cannot be read.
    pub fn open(store: Box<dyn Store>, settings: ControlSettings) -> Result<Self, ControlError> {
        let state = store.load()?;
        let desired = desired_from_store(state, &settings);
        let (revision_tx, _) = watch::channel(desired.revision);
        Ok(Self {
            store,
            settings,
            desired: Mutex::new(desired),
            revision_tx,
            dataplane_report: Mutex::new(None),
        })
    }

    /// A receiver that sees the revision after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Desired> {
        self.desired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits `writes` and updates the in-memory state with `update` only if the commit
    /// succeeded.
    fn commit(
        &self,
        desired: &mut Desired,
        writes: &[Write],
        update: impl FnOnce(&mut Desired),
    ) -> Result<(), ControlError> {
        desired.revision = self.store.commit(desired.revision, writes)?;
        update(desired);
        self.revision_tx.send_replace(desired.revision);
        Ok(())
    }

    /// Deploys (creates or replaces) an app from its app.toml text.
    ///
    /// # Errors
    /// [`ControlError::InvalidConfig`] with file:line:column diagnostics, or
    /// [`ControlError::Conflict`] when a route of the app would lose its target.
    pub fn deploy(
        &self,
        source_name: &str,
        toml: &str,
        directory: Option<&str>,
    ) -> Result<AppDetail, ControlError> {
        let mut config =
            parse_deployable(Source::new(source_name, toml), &self.settings.validation)?;
        let mut desired = self.lock();
        let previous = desired.apps.get(&config.name);
        let assigned_ports = self.fill_ports(&mut config, previous.map(|p| &p.record))?;

        let claims = desired.node_ports.iter().map(|np| NodePortClaim {
            node_port: np.node_port,
            protocol: np.protocol,
            app: np.app.clone(),
            service: np.service.clone(),
        });
        ConfigError::check(check_node_port_claims(&config, claims))?;
        let others: u64 = desired
            .apps
            .values()
            .filter(|app| app.record.name != config.name)
            .map(|app| app.config.fixed_instances())
            .sum();
        let limit = self.settings.validation.limits.instances_per_node;
        if let Some(over) = check_node_instances(&config, others, limit) {
            return Err(ConfigError::new(vec![over]).into());
        }
        for route in desired.routes.iter().filter(|r| r.app == config.name) {
            check_route_target(&config, &route.service).map_err(|err| {
                ControlError::Conflict(format!(
                    "route {} points at {err}; keep the service in app.toml, or remove the route first with `miren route rm {}`",
                    route.host, route.host
                ))
            })?;
        }

        let record = AppRecord {
            name: config.name.clone(),
            source_name: source_name.to_owned(),
            directory: directory.map(str::to_owned),
            toml: toml.to_owned(),
            version: previous.map_or(1, |p| p.record.version + 1),
            deployed_at: now(),
            assigned_ports,
        };
        let node_ports = config_node_ports(&config);
        let write = Write::PutApp {
            app: record.clone(),
            node_ports: node_ports.clone(),
        };
        let name = config.name.clone();
        self.commit(&mut desired, &[write], |d| {
            set_app_node_ports(d, &name, node_ports);
            d.apps.insert(name.clone(), DeployedApp { record, config });
        })?;
        app_detail(&desired, &name)
    }

    /// Gives ports without a number the number assigned by an earlier deploy when it is still
    /// free, else a new one from the port range; returns all assignments.
    fn fill_ports(
        &self,
        config: &mut AppConfig,
        previous: Option<&AppRecord>,
    ) -> Result<BTreeMap<(String, String), u16>, ControlError> {
        let unassigned: Vec<(String, String)> = config
            .services
            .values()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .filter(|p| p.port.is_none())
                    .map(|p| (s.name.clone(), p.name.clone()))
            })
            .collect();
        if let Some(previous) = previous {
            for service in config.services.values_mut() {
                let mut used: HashSet<(u16, Protocol)> = service
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.port?, p.kind.protocol())))
                    .collect();
                for port in service.ports.iter_mut().filter(|p| p.port.is_none()) {
                    let key = (service.name.clone(), port.name.clone());
                    if let Some(&n) = previous.assigned_ports.get(&key)
                        && used.insert((n, port.kind.protocol()))
                    {
                        port.port = Some(n);
                    }
                }
            }
        }
        assign_ports(config, self.settings.port_range.clone(), &HashSet::new())?;
        Ok(unassigned
            .into_iter()
            .filter_map(|(service, port)| {
                let n = config
                    .services
                    .get(&service)?
                    .ports
                    .iter()
                    .find(|p| p.name == port)?
                    .port?;
                Some(((service, port), n))
            })
            .collect())
    }

    /// Removes an app with its node ports, routes and endpoints.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] if there is no such app.
    pub fn remove_app(&self, name: &str) -> Result<AppDetail, ControlError> {
        let mut desired = self.lock();
        let detail = app_detail(&desired, name)?;
        self.commit(&mut desired, &[Write::RemoveApp(name.to_owned())], |d| {
            d.apps.remove(name);
            d.node_ports.retain(|np| np.app != name);
            d.routes.retain(|r| r.app != name);
            d.endpoints.retain(|(app, _), _| app != name);
        })?;
        Ok(detail)
    }

    /// All apps.
    pub fn apps(&self) -> Vec<AppSummary> {
        let desired = self.lock();
        desired
            .apps
            .values()
            .map(|app| AppSummary {
                name: app.record.name.clone(),
                version: app.record.version,
                deployed_at: app.record.deployed_at,
                services: app.config.services.keys().cloned().collect(),
            })
            .collect()
    }

    /// One app in detail.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] if there is no such app.
    pub fn app(&self, name: &str) -> Result<AppDetail, ControlError> {
        app_detail(&self.lock(), name)
    }

    /// Points `host` at a service of `app`: `service`, else the app's `web` service, else its
    /// only service with an http port; `timeout_ms` overrides the ingress upstream timeout.
    ///
    /// # Errors
    /// [`ControlError::BadRequest`] for an invalid host or an ambiguous service;
    /// [`ControlError::NotFound`] for an unknown app or service;
    /// [`ControlError::Conflict`] when the service has no http port.
    pub fn set_route(
        &self,
        host: &str,
        app: &str,
        service: Option<&str>,
        timeout_ms: Option<u64>,
    ) -> Result<RouteInfo, ControlError> {
        let host = Host::parse(host).map_err(|e| ControlError::BadRequest(e.to_string()))?;
        let mut desired = self.lock();
        let deployed = find_app(&desired, app)?;
        let service = match service {
            Some(service) => service.to_owned(),
            None => default_route_service(&deployed.config)?,
        };
        check_route_target(&deployed.config, &service).map_err(|err| {
            match deployed.config.services.get(&service) {
                None => ControlError::NotFound(err.to_string()),
                Some(_) => ControlError::Conflict(format!(
                    "{err}; routes reach a service through its http port"
                )),
            }
        })?;
        let route = RouteRecord {
            host: host.as_str().to_owned(),
            app: app.to_owned(),
            service,
            timeout_ms,
        };
        self.commit(&mut desired, &[Write::PutRoute(route.clone())], |d| {
            d.routes.retain(|r| r.host != route.host);
            d.routes.push(route.clone());
            d.routes.sort();
        })?;
        Ok(route_info(&route))
    }

    /// Removes the route for `host`.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] if there is no such route.
    pub fn remove_route(&self, host: &str) -> Result<RouteInfo, ControlError> {
        let host = Host::parse(host).map_err(|e| ControlError::BadRequest(e.to_string()))?;
        let mut desired = self.lock();
        let route = desired
            .routes
            .iter()
            .find(|r| r.host == host.as_str())
            .cloned()
            .ok_or_else(|| {
                ControlError::NotFound(format!("no route for host {host}; see `miren route list`"))
            })?;
        self.commit(
            &mut desired,
            &[Write::RemoveRoute(route.host.clone())],
            |d| {
                d.routes.retain(|r| r.host != route.host);
            },
        )?;
        Ok(route_info(&route))
    }

    /// All routes, sorted by host.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.lock().routes.iter().map(route_info).collect()
    }

    /// Published node ports, of one app or all.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown app.
    pub fn node_ports(&self, app: Option<&str>) -> Result<Vec<NodePortInfo>, ControlError> {
        let report = self
            .dataplane_report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let desired = self.lock();
        let status = |np: &NodePortRecord| match &report {
            Some(report) => report.port_status(&NodePortKey::from(np), desired.revision),
            None => "pending: no node-port data plane is running".to_owned(),
        };
        if let Some(app) = app {
            find_app(&desired, app)?;
        }
        Ok(desired
            .node_ports
            .iter()
            .filter(|np| app.is_none_or(|a| np.app == a))
            .map(|np| node_port_info(&desired, np, status(np)))
            .collect())
    }

    /// Publishes and unpublishes node ports of a deployed service without redeploying (with
    /// the same validation as a deploy). A later deploy resets them to app.toml.
    ///
    /// # Errors
    /// [`ControlError::BadRequest`] for specs that do not fit the service;
    /// [`ControlError::Conflict`] for node ports held elsewhere or reserved.
    pub fn edit_node_ports(
        &self,
        app: &str,
        edit: &PortsEditRequest,
    ) -> Result<Vec<NodePortInfo>, ControlError> {
        if edit.add.is_empty() && edit.remove.is_empty() {
            return Err(ControlError::BadRequest(
                "nothing to change; give --add-published N[:PORT][/tcp|udp] or --rm-published N[/tcp|udp]".into(),
            ));
        }
        let mut desired = self.lock();
        let deployed = find_app(&desired, app)?;
        let service = find_service(&deployed.config, &edit.service)?;
        let mut ports: Vec<NodePortRecord> = desired
            .node_ports
            .iter()
            .filter(|np| np.app == app)
            .cloned()
            .collect();
        for remove in &edit.remove {
            unpublish(&mut ports, app, service, remove)?;
        }
        for add in &edit.add {
            let record = self.publish(&desired, &ports, app, service, add)?;
            ports.push(record);
        }
        let published = ports.iter().filter(|np| np.service == service.name).count();
        let limit = self.settings.validation.limits.ports_per_service;
        if published > limit {
            return Err(ControlError::BadRequest(format!(
                "service \"{}\" would publish {published} node ports, more than the limit of {limit} per service; unpublish some first, or raise the agent's limit with --max-ports-per-service",
                service.name
            )));
        }
        ports.sort();
        let write = Write::SetNodePorts {
            app: app.to_owned(),
            node_ports: ports.clone(),
        };
        self.commit(&mut desired, &[write], |d| {
            set_app_node_ports(d, app, ports)
        })?;
        drop(desired);
        self.node_ports(Some(app))
    }

    /// Validates one `N[:PORT][/proto]` against the service and every published port.
    fn publish(
        &self,
        desired: &Desired,
        ports: &[NodePortRecord],
        app: &str,
        service: &ServiceConfig,
        spec: &PublishSpec,
    ) -> Result<NodePortRecord, ControlError> {
        let n = spec.node_port;
        let protocol = spec.protocol.as_deref().map(parse_protocol).transpose()?;
        if n == 0 {
            return Err(ControlError::BadRequest(
                "node port 0 is out of range; use 1-65535".into(),
            ));
        }
        if let Some(reason) = self.settings.validation.node_port_conflict(n) {
            return Err(ControlError::Conflict(format!(
                "{reason}; choose another node port"
            )));
        }
        let matches = |kinds_ok: bool| -> Vec<&crate::config::PortSpec> {
            service
                .ports
                .iter()
                .filter(|p| kinds_ok || p.kind != PortKind::Http)
                .filter(|p| spec.port.is_none_or(|want| p.port == Some(want)))
                .filter(|p| protocol.is_none_or(|want| p.kind.protocol() == want))
                .collect()
        };
        let candidates = matches(false);
        let target = match candidates.as_slice() {
            [one] => *one,
            [] if !matches(true).is_empty() => {
                return Err(ControlError::BadRequest(format!(
                    "node ports only reach tcp and udp ports; the matching port of service \"{}\" is http (reach it through `miren route set`)",
                    service.name
                )));
            }
            [] => {
                return Err(ControlError::BadRequest(format!(
                    "service \"{}\" has no tcp or udp port{}; its ports: {}",
                    service.name,
                    describe_wanted(spec.port, protocol),
                    describe_ports(service)
                )));
            }
            _ => {
                return Err(ControlError::BadRequest(format!(
                    "service \"{}\" has several tcp/udp ports ({}); say which with {n}:PORT",
                    service.name,
                    describe_ports(service)
                )));
            }
        };
        let protocol = target.kind.protocol();
        let holder = desired
            .node_ports
            .iter()
            .filter(|np| np.app != app)
            .chain(ports)
            .find(|np| np.node_port == n && np.protocol == protocol);
        if let Some(holder) = holder {
            return Err(ControlError::Conflict(format!(
                "node_port {n}/{protocol} is already taken by app \"{}\" service \"{}\"",
                holder.app, holder.service
            )));
        }
        Ok(NodePortRecord {
            node_port: n,
            protocol,
            app: app.to_owned(),
            service: service.name.clone(),
            port_name: target.name.clone(),
        })
    }

    /// Replaces the endpoints of a service (supplied by an external orchestrator).
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown app, service or port name.
    pub fn set_endpoints(
        &self,
        app: &str,
        service: &str,
        endpoints: EndpointMap,
    ) -> Result<ServiceEndpoints, ControlError> {
        let mut desired = self.lock();
        let deployed = find_app(&desired, app)?;
        let config = find_service(&deployed.config, service)?;
        if let Some(unknown) = endpoints
            .keys()
            .find(|name| !config.ports.iter().any(|p| &p.name == *name))
        {
            return Err(ControlError::NotFound(format!(
                "service \"{service}\" of app \"{app}\" has no port named \"{unknown}\"; its ports: {}",
                describe_ports(config)
            )));
        }
        let endpoints: EndpointMap = endpoints
            .into_iter()
            .map(|(name, mut addrs)| {
                addrs.sort();
                addrs.dedup();
                (name, addrs)
            })
            .collect();
        let write = Write::SetEndpoints {
            app: app.into(),
            service: service.into(),
            endpoints: endpoints.clone(),
        };
        self.commit(&mut desired, &[write], |d| {
            d.endpoints
                .insert((app.to_owned(), service.to_owned()), endpoints.clone());
        })?;
        Ok(ServiceEndpoints {
            service: service.to_owned(),
            endpoints,
        })
    }

    /// Endpoints of one service, or of every service of the app.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown app or service.
    pub fn endpoints(
        &self,
        app: &str,
        service: Option<&str>,
    ) -> Result<Vec<ServiceEndpoints>, ControlError> {
        let desired = self.lock();
        let deployed = find_app(&desired, app)?;
        if let Some(service) = service {
            find_service(&deployed.config, service)?;
        }
        Ok(deployed
            .config
            .services
            .keys()
            .filter(|name| service.is_none_or(|s| s == name.as_str()))
            .map(|name| ServiceEndpoints {
                service: name.clone(),
                endpoints: desired
                    .endpoints
                    .get(&(app.to_owned(), name.clone()))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// Records the outcome of applying a snapshot from [`ControlPlane::dataplane_snapshot`];
    /// shown as each node port's status.
    pub fn set_dataplane_report(&self, report: DataplaneReport) {
        *self
            .dataplane_report
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    /// The revision the node-port data plane last applied without a failure, if there is a
    /// data plane.
    pub fn dataplane_revision(&self) -> Option<u64> {
        self.dataplane_report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|report| report.failure.is_none())
            .map(|report| report.revision)
    }

    /// The data plane's view of the desired state (node ports with their endpoints) and the
    /// revision it reflects.
    pub fn dataplane_snapshot(
        &self,
        node_addrs: &[std::net::Ipv4Addr],
    ) -> (u64, crate::dataplane::Snapshot) {
        let desired = self.lock();
        let node_ports = desired
            .node_ports
            .iter()
            .map(|np| {
                let endpoints = endpoints_of(&desired, np)
                    .iter()
                    .filter_map(|addr| match addr {
                        SocketAddr::V4(v4) => Some(*v4),
                        SocketAddr::V6(_) => None,
                    })
                    .collect();
                (NodePortKey::from(np), endpoints)
            })
            .collect();
        let snapshot = crate::dataplane::Snapshot {
            node_addrs: node_addrs.to_vec(),
            node_ports,
        };
        (desired.revision, snapshot)
    }

    /// The ingress's view of the desired state: every route with the endpoints of its
    /// target service's http port, and the revision it reflects.
    pub fn ingress_routes(&self) -> (u64, Vec<IngressRoute>) {
        let desired = self.lock();
        // Looked up once per target service (many routes usually share one).
        let mut services: HashMap<(&str, &str), Arc<[SocketAddr]>> = HashMap::new();
        let routes = desired
            .routes
            .iter()
            .map(|route| {
                let endpoints = services
                    .entry((&route.app, &route.service))
                    .or_insert_with(|| {
                        let port_name = desired
                            .apps
                            .get(&route.app)
                            .and_then(|app| app.config.services.get(&route.service))
                            .and_then(|service| service.http_port())
                            .map(|port| port.name.as_str());
                        port_name
                            .and_then(|name| {
                                desired
                                    .endpoints
                                    .get(&(route.app.clone(), route.service.clone()))?
                                    .get(name)
                            })
                            .map_or_else(|| Arc::from([]), |addrs| Arc::from(addrs.as_slice()))
                    });
                IngressRoute {
                    record: route.clone(),
                    endpoints: Arc::clone(endpoints),
                }
            })
            .collect();
        (desired.revision, routes)
    }

    /// Every service of every deployed app, as the sandbox runner starts it.
    pub fn deployed_services(&self) -> Vec<DeployedService> {
        let desired = self.lock();
        let mut services = Vec::new();
        for app in desired.apps.values() {
            for service in app.config.services.values() {
                let Some(command) = service.command.clone() else {
                    continue;
                };
                let Ok(env) = instance_env(&app.config, service) else {
                    continue;
                };
                services.push(DeployedService {
                    app: app.record.name.clone(),
                    version: app.record.version,
                    directory: app.record.directory.clone(),
                    command,
                    env,
                    service: service.clone(),
                    max_instances: self.settings.validation.limits.instances_per_service,
                });
            }
        }
        services
    }

    /// Counts for `miren status`: (apps, routes, node ports).
    pub fn counts(&self) -> (usize, usize, usize) {
        let desired = self.lock();
        (
            desired.apps.len(),
            desired.routes.len(),
            desired.node_ports.len(),
        )
    }
}

fn desired_from_store(state: StoreState, settings: &ControlSettings) -> Desired {
    let mut apps = BTreeMap::new();
    for (name, record) in state.apps {
        let parsed = parse_deployable(
            Source::new(&record.source_name, &record.toml),
            &settings.validation,
        );
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
                apps.insert(name, DeployedApp { record, config });
            }
            Err(err) => {
                tracing::error!(app = %name, "stored app no longer validates; redeploy it:\n{err}")
            }
        }
    }
    let node_ports = state
        .node_ports
        .into_iter()
        .filter(|np| apps.contains_key(&np.app))
        .collect();
    Desired {
        revision: state.revision,
        apps,
        node_ports,
        routes: state.routes,
        endpoints: state.endpoints,
    }
}

fn find_app<'a>(desired: &'a Desired, app: &str) -> Result<&'a DeployedApp, ControlError> {
    desired
        .apps
        .get(app)
        .ok_or_else(|| ControlError::NotFound(format!("no app named \"{app}\"; see `miren apps`")))
}

fn find_service<'a>(
    config: &'a AppConfig,
    service: &str,
) -> Result<&'a ServiceConfig, ControlError> {
    config.services.get(service).ok_or_else(|| {
        let names: Vec<&str> = config.services.keys().map(String::as_str).collect();
        ControlError::NotFound(format!(
            "app \"{}\" has no service \"{service}\"; its services: {}",
            config.name,
            names.join(", ")
        ))
    })
}

fn default_route_service(config: &AppConfig) -> Result<String, ControlError> {
    let http: Vec<&String> = config
        .services
        .iter()
        .filter(|(_, s)| s.http_port().is_some())
        .map(|(name, _)| name)
        .collect();
    if config
        .services
        .get("web")
        .is_some_and(|s| s.http_port().is_some())
    {
        return Ok("web".into());
    }
    match http.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ControlError::Conflict(format!(
            "app \"{}\" has no service with an HTTP port; add a port with type = \"http\" to a service",
            config.name
        ))),
        several => Err(ControlError::BadRequest(format!(
            "app \"{}\" has several HTTP services ({}); choose one with --service",
            config.name,
            several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn unpublish(
    ports: &mut Vec<NodePortRecord>,
    app: &str,
    service: &ServiceConfig,
    spec: &UnpublishSpec,
) -> Result<(), ControlError> {
    let protocol = spec.protocol.as_deref().map(parse_protocol).transpose()?;
    let matching = |np: &NodePortRecord| {
        np.service == service.name
            && np.node_port == spec.node_port
            && protocol.is_none_or(|p| np.protocol == p)
    };
    match ports.iter().filter(|np| matching(np)).count() {
        0 => Err(ControlError::NotFound(format!(
            "service \"{}\" of app \"{app}\" does not publish node port {}{}; see `miren ports --app {app}`",
            service.name,
            spec.node_port,
            protocol.map(|p| format!("/{p}")).unwrap_or_default()
        ))),
        1 => {
            ports.retain(|np| !matching(np));
            Ok(())
        }
        _ => Err(ControlError::BadRequest(format!(
            "node port {n} is published for both tcp and udp; say {n}/tcp or {n}/udp",
            n = spec.node_port
        ))),
    }
}

fn parse_protocol(value: &str) -> Result<Protocol, ControlError> {
    Protocol::from_name(value).ok_or_else(|| {
        ControlError::BadRequest(format!("unknown protocol \"{value}\"; use tcp or udp"))
    })
}

fn describe_wanted(port: Option<u16>, protocol: Option<Protocol>) -> String {
    match (port, protocol) {
        (Some(p), Some(proto)) => format!(" {p}/{proto}"),
        (Some(p), None) => format!(" {p}"),
        (None, Some(proto)) => format!(" of protocol {proto}"),
        (None, None) => String::new(),
    }
}

fn describe_ports(service: &ServiceConfig) -> String {
    let ports: Vec<String> = service
        .ports
        .iter()
        .map(|p| {
            format!(
                "{} {}/{}",
                p.name,
                p.port.map_or("?".into(), |n| n.to_string()),
                p.kind
            )
        })
        .collect();
    if ports.is_empty() {
        "none".into()
    } else {
        ports.join(", ")
    }
}

fn config_node_ports(config: &AppConfig) -> Vec<NodePortRecord> {
    let mut ports: Vec<NodePortRecord> = config
        .services
        .values()
        .flat_map(|service| {
            service.ports.iter().filter_map(|port| {
                Some(NodePortRecord {
                    node_port: port.node_port?,
                    protocol: port.kind.protocol(),
                    app: config.name.clone(),
                    service: service.name.clone(),
                    port_name: port.name.clone(),
                })
            })
        })
        .collect();
    ports.sort();
    ports
}

fn set_app_node_ports(desired: &mut Desired, app: &str, ports: Vec<NodePortRecord>) {
    desired.node_ports.retain(|np| np.app != app);
    desired.node_ports.extend(ports);
    desired
        .node_ports
        .sort_by_key(|np| (np.node_port, np.protocol));
}

fn app_detail(desired: &Desired, name: &str) -> Result<AppDetail, ControlError> {
    let app = find_app(desired, name)?;
    let services = app
        .config
        .services
        .values()
        .map(|service| ServiceDetail {
            name: service.name.clone(),
            command: service.command.clone(),
            concurrency: match &service.concurrency.mode {
                ConcurrencyMode::Fixed { num_instances } => format!("fixed {num_instances}"),
                ConcurrencyMode::Auto {
                    requests_per_instance,
                    ..
                } => {
                    format!("auto ({requests_per_instance} requests per instance)")
                }
            },
            ports: service
                .ports
                .iter()
                .map(|port| PortInfo {
                    name: port.name.clone(),
                    kind: port.kind.as_str().to_owned(),
                    port: port.port.unwrap_or_default(),
                    assigned: app
                        .record
                        .assigned_ports
                        .contains_key(&(service.name.clone(), port.name.clone())),
                    node_ports: desired
                        .node_ports
                        .iter()
                        .filter(|np| {
                            np.app == name
                                && np.service == service.name
                                && np.port_name == port.name
                        })
                        .map(|np| np.node_port)
                        .collect(),
                })
                .collect(),
            env: instance_env(&app.config, service).unwrap_or_default(),
            instances: None,
        })
        .collect();
    Ok(AppDetail {
        name: app.record.name.clone(),
        version: app.record.version,
        deployed_at: app.record.deployed_at,
        source_name: app.record.source_name.clone(),
        services,
        routes: desired
            .routes
            .iter()
            .filter(|r| r.app == name)
            .map(route_info)
            .collect(),
    })
}

fn route_info(route: &RouteRecord) -> RouteInfo {
    RouteInfo {
        host: route.host.clone(),
        app: route.app.clone(),
        service: route.service.clone(),
        timeout_ms: route.timeout_ms,
    }
}

/// The endpoints supplied for the service port a node port forwards to.
fn endpoints_of<'a>(desired: &'a Desired, np: &NodePortRecord) -> &'a [SocketAddr] {
    desired
        .endpoints
        .get(&(np.app.clone(), np.service.clone()))
        .and_then(|ports| ports.get(&np.port_name))
        .map_or(&[], Vec::as_slice)
}

fn node_port_info(desired: &Desired, np: &NodePortRecord, status: String) -> NodePortInfo {
    let target_port = desired
        .apps
        .get(&np.app)
        .and_then(|app| app.config.services.get(&np.service))
        .and_then(|service| service.ports.iter().find(|p| p.name == np.port_name))
        .and_then(|port| port.port)
        .unwrap_or_default();
    NodePortInfo {
        node_port: np.node_port,
        protocol: np.protocol.as_str().to_owned(),
        app: np.app.clone(),
        service: np.service.clone(),
        port_name: np.port_name.clone(),
        target_port,
        endpoints: endpoints_of(desired, np).to_vec(),
        status,
        traffic: None,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
