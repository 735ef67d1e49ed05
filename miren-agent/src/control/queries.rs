//! Reads of the view: the API's answers, and what the data planes, the ingress and the
//! sandbox runner follow.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{ControlError, ControlPlane, DataplaneReport, view::State};
use crate::{
    api::types::{
        AppDetail, AppSummary, NodePortInfo, PortInfo, RouteInfo, ServiceDetail, ServiceEndpoints,
    },
    config::{AppConfig, ConcurrencyMode, ServiceConfig, instance_env},
    dataplane::NodePortKey,
    store::records::{AppRecord, NodePortRecord, RouteRecord},
};

/// A route as the ingress needs it: host, target, timeout and the target's HTTP endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRoute {
    /// The stored route.
    pub record: RouteRecord,
    /// Ready endpoints of the target service's http port (shared by its routes).
    pub endpoints: Arc<[SocketAddr]>,
}

/// What changed for the ingress since the revision it routes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressUpdate {
    /// Every route (rebuild).
    Full(Vec<IngressRoute>),
    /// Only these hosts' routes changed; each with its route now (`None`: removed, or its
    /// app does not validate here).
    Routes(Vec<(String, Option<IngressRoute>)>),
}

/// Target endpoints looked up once per (app, service) (many routes usually share one).
type EndpointCache<'a> = HashMap<(&'a str, &'a str), Arc<[SocketAddr]>>;

/// Every live route for the ingress.
fn all_ingress_routes(state: &State) -> Vec<IngressRoute> {
    let mut endpoints = HashMap::new();
    state
        .live_routes()
        .map(|route| ingress_route(state, route, &mut endpoints))
        .collect()
}

/// `route` with the endpoints of its target service's http port on every node.
fn ingress_route<'a>(
    state: &State,
    route: &'a RouteRecord,
    endpoints: &mut EndpointCache<'a>,
) -> IngressRoute {
    let endpoints = endpoints
        .entry((&route.app, &route.service))
        .or_insert_with(|| {
            let port = state
                .app(&route.app)
                .and_then(|(_, config)| config.services.get(&route.service))
                .and_then(|service| service.http_port());
            port.map_or_else(
                || Arc::from([]),
                |port| Arc::from(state.endpoints_of(&route.app, &route.service, &port.name)),
            )
        });
    IngressRoute {
        record: route.clone(),
        endpoints: Arc::clone(endpoints),
    }
}

/// Another node of the cluster, as routing to its instances needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Its addresses (`--node-ip`).
    pub addresses: Vec<IpAddr>,
    /// Its sandbox subnet.
    pub subnet: crate::config::Subnet,
    /// Its cluster listener.
    pub cluster_addr: Option<SocketAddr>,
    /// Whether its lease is alive (false: lost).
    pub alive: bool,
}

/// A service to run: what the sandbox runner needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployedService {
    /// App name.
    pub app: String,
    /// App deploy counter.
    pub version: u64,
    /// The SHA-256 of the app's code bundle, when the client uploaded one.
    pub bundle: Option<String>,
    /// The app directory of a record from an agent before bundles.
    pub directory: Option<String>,
    /// The shell command.
    pub command: String,
    /// Environment: `[[env]]`, service env, `PORT`, `PORT_1..N`.
    pub env: std::collections::BTreeMap<String, String>,
    /// The validated service (ports with numbers, concurrency).
    pub service: ServiceConfig,
    /// The instances the scheduler placed on this node.
    pub instances: usize,
}

impl ControlPlane {
    /// All apps.
    pub fn apps(&self) -> Vec<AppSummary> {
        self.view
            .lock()
            .valid_apps()
            .map(|(record, config)| AppSummary {
                name: record.name.clone(),
                version: record.version,
                deployed_at: record.deployed_at,
                services: config.services.keys().cloned().collect(),
            })
            .collect()
    }

    /// One app in detail.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] if there is no such app.
    pub fn app(&self, name: &str) -> Result<AppDetail, ControlError> {
        app_detail(&self.view.lock(), name)
    }

    /// All routes, sorted by host.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.view.lock().live_routes().map(route_info).collect()
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
        let state = self.view.lock();
        let status = |np: &NodePortRecord| match &report {
            Some(report) => report.port_status(&NodePortKey::from(np), state.revision),
            None => "pending: no node-port data plane is running".to_owned(),
        };
        if let Some(app) = app {
            find_app(&state, app)?;
        }
        Ok(state
            .live_node_ports()
            .filter(|np| app.is_none_or(|a| np.app == a))
            .map(|np| node_port_info(&state, np, status(np)))
            .collect())
    }

    /// Endpoints of one service, or of every service of the app, on every node.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown app or service.
    pub fn endpoints(
        &self,
        app: &str,
        service: Option<&str>,
    ) -> Result<Vec<ServiceEndpoints>, ControlError> {
        let state = self.view.lock();
        let (_, config) = find_app(&state, app)?;
        if let Some(service) = service {
            find_service(config, service)?;
        }
        Ok(config
            .services
            .values()
            .filter(|s| service.is_none_or(|name| name == s.name))
            .map(|s| ServiceEndpoints {
                service: s.name.clone(),
                endpoints: s
                    .ports
                    .iter()
                    .map(|port| {
                        (
                            port.name.clone(),
                            state.endpoints_of(app, &s.name, &port.name),
                        )
                    })
                    .filter(|(_, addrs)| !addrs.is_empty())
                    .collect(),
                node_of: state
                    .service_endpoints(app, &s.name)
                    .flat_map(|(node, ports)| {
                        ports
                            .values()
                            .flatten()
                            .map(move |addr| (addr.ip(), node.to_owned()))
                    })
                    .collect(),
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

    /// The data plane's view of the desired state (node ports with their endpoints on every
    /// node, each IPv4 endpoint with its IPv6 twin when `dual_stack` is given) and the
    /// revision it reflects.
    pub fn dataplane_snapshot(
        &self,
        node_addrs: &[std::net::IpAddr],
        dual_stack: Option<crate::config::DualStack>,
    ) -> (u64, crate::dataplane::Snapshot) {
        let state = self.view.lock();
        let node_ports = state
            .live_node_ports()
            .map(|np| {
                let v4 = state.endpoints_of(&np.app, &np.service, &np.port_name);
                let v6 = dual_stack.into_iter().flat_map(|dual| {
                    v4.iter().filter_map(move |endpoint| match endpoint {
                        SocketAddr::V4(v4) => dual
                            .addr6(*v4.ip())
                            .map(|addr6| SocketAddr::new(addr6.into(), v4.port())),
                        SocketAddr::V6(_) => None,
                    })
                });
                let endpoints = v4.iter().copied().chain(v6).collect();
                (NodePortKey::from(np), endpoints)
            })
            .collect();
        let snapshot = crate::dataplane::Snapshot {
            node_addrs: node_addrs.to_vec(),
            node_ports,
        };
        (state.revision, snapshot)
    }

    /// The ingress's view of the desired state: every route with the endpoints of its
    /// target service's http port on every node, and the revision it reflects.
    pub fn ingress_routes(&self) -> (u64, Vec<IngressRoute>) {
        let state = self.view.lock();
        (state.revision, all_ingress_routes(&state))
    }

    /// What changed for an ingress that routes with revision `after`: only the routes of the
    /// hosts changed since (O(changes)) when nothing else they depend on changed and the
    /// view still remembers, else every route; and the revision it reflects.
    pub fn ingress_changes(&self, after: u64) -> (u64, IngressUpdate) {
        let state = self.view.lock();
        let update = match state.ingress_log.hosts_since(after) {
            Some(hosts) => {
                let mut endpoints = HashMap::new();
                let mut changed: Vec<(String, Option<IngressRoute>)> = hosts
                    .map(|host| {
                        let route = state
                            .routes
                            .get(host)
                            .filter(|route| state.app(&route.value.app).is_some())
                            .map(|route| ingress_route(&state, &route.value, &mut endpoints));
                        (host.to_owned(), route)
                    })
                    .collect();
                // A host changed twice counts once, with its route now.
                changed.sort_by(|a, b| a.0.cmp(&b.0));
                changed.dedup_by(|a, b| a.0 == b.0);
                IngressUpdate::Routes(changed)
            }
            None => IngressUpdate::Full(all_ingress_routes(&state)),
        };
        (state.revision, update)
    }

    /// Every service of every deployed app, as the sandbox runner starts it.
    pub fn deployed_services(&self) -> Vec<DeployedService> {
        let state = self.view.lock();
        let mut services = Vec::new();
        for (record, config) in state.valid_apps() {
            for service in config.services.values() {
                let Some(command) = service.command.clone() else {
                    continue;
                };
                // This node runs the instances placed on it.
                let placed = state
                    .placements
                    .get(&(record.name.clone(), service.name.clone()))
                    .map_or(0, |p| {
                        p.value
                            .nodes
                            .iter()
                            .filter(|n| **n == self.settings.node)
                            .count()
                    });
                let Ok(env) = instance_env(config, service) else {
                    continue;
                };
                services.push(DeployedService {
                    app: record.name.clone(),
                    version: record.version,
                    bundle: record.bundle.clone(),
                    directory: record.directory.clone(),
                    command,
                    env,
                    service: service.clone(),
                    instances: placed,
                });
            }
        }
        services
    }

    /// The other nodes of the cluster (lost ones included, until removed) with their
    /// addresses, sandbox subnets and cluster listeners.
    pub fn peers(&self) -> Vec<Peer> {
        let state = self.view.lock();
        state
            .nodes
            .values()
            .filter(|node| node.value.name != self.settings.node)
            .filter_map(|node| {
                Some(Peer {
                    name: node.value.name.clone(),
                    addresses: node.value.addresses.clone(),
                    subnet: crate::config::Subnet::parse(&node.value.subnet).ok()?,
                    cluster_addr: node.value.cluster_addr,
                    alive: state.alive.contains_key(&node.value.name),
                })
            })
            .collect()
    }

    /// The ready instance addresses of every app on every node.
    pub fn app_addresses(&self) -> BTreeMap<String, BTreeSet<IpAddr>> {
        let state = self.view.lock();
        let mut apps: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for ((app, _), nodes) in &state.endpoints {
            let addrs = nodes
                .values()
                .flat_map(|endpoints| endpoints.value.values().flatten().map(|a| a.ip()));
            apps.entry(app.clone()).or_default().extend(addrs);
        }
        apps
    }

    /// Counts for `miren status`: (apps, routes, node ports).
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.view.lock();
        (
            state.valid_apps().count(),
            state.live_routes().count(),
            state.live_node_ports().count(),
        )
    }
}

/// The message for an app that does not exist.
pub(super) fn no_such_app(app: &str) -> ControlError {
    ControlError::NotFound(format!("no app named \"{app}\"; see `miren apps`"))
}

/// The app `app` as validated here.
pub(super) fn find_app<'a>(
    state: &'a State,
    app: &str,
) -> Result<(&'a AppRecord, &'a AppConfig), ControlError> {
    state.app(app).ok_or_else(|| no_such_app(app))
}

/// A service of an app.
pub(super) fn find_service<'a>(
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

/// The detail of app `name`.
pub(super) fn app_detail(state: &State, name: &str) -> Result<AppDetail, ControlError> {
    let (record, config) = find_app(state, name)?;
    let services = config
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
                    assigned: record
                        .assigned_ports
                        .contains_key(&(service.name.clone(), port.name.clone())),
                    node_ports: state
                        .live_node_ports()
                        .filter(|np| {
                            np.app == name
                                && np.service == service.name
                                && np.port_name == port.name
                        })
                        .map(|np| np.node_port)
                        .collect(),
                })
                .collect(),
            env: instance_env(config, service).unwrap_or_default(),
            instances: None,
            placed_on: state
                .placements
                .get(&(name.to_owned(), service.name.clone()))
                .map(|p| p.value.nodes.clone())
                .unwrap_or_default(),
        })
        .collect();
    Ok(AppDetail {
        name: record.name.clone(),
        version: record.version,
        deployed_at: record.deployed_at,
        source_name: record.source_name.clone(),
        services,
        routes: state
            .live_routes()
            .filter(|r| r.app == name)
            .map(route_info)
            .collect(),
    })
}

/// A route as the API shows it.
pub(super) fn route_info(route: &RouteRecord) -> RouteInfo {
    RouteInfo {
        host: route.host.clone(),
        app: route.app.clone(),
        service: route.service.clone(),
        timeout_ms: route.timeout_ms,
    }
}

fn node_port_info(state: &State, np: &NodePortRecord, status: String) -> NodePortInfo {
    let target_port = state
        .app(&np.app)
        .and_then(|(_, config)| config.services.get(&np.service))
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
        endpoints: state.endpoints_of(&np.app, &np.service, &np.port_name),
        status,
        traffic: None,
        by_node: BTreeMap::new(),
    }
}
