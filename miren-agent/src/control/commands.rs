//! The commands: each plans one store transaction from the view — validating the request
//! completely first, so a rejected request changes nothing — with a compare on every key the
//! decision rested on. [`ControlPlane::run`] commits it and decides again on a conflict.

use std::{
    collections::{BTreeMap, HashSet},
    ops::RangeInclusive,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{ControlError, ControlPlane, ControlSettings, queries, view::State};
use crate::{
    api::types::{
        AppDetail, NodePortInfo, PortsEditRequest, PublishSpec, RouteImport, RouteInfo,
        ServiceEndpoints, UnpublishSpec,
    },
    config::{
        AppConfig, ConfigError, NodePortClaim, PortKind, PortSpec, Protocol, ServiceConfig, Source,
        assign_ports, check_node_instances, check_node_port_claims, parse_deployable,
    },
    routes::{Host, ImportError, LineError, check_route_target, parse_route_file},
    store::{
        Txn,
        records::{
            AppRecord, EndpointMap, NodePortRecord, RecordKey, RouteRecord, app_endpoints_prefix,
            encode,
        },
    },
};

impl ControlPlane {
    /// Deploys (creates or replaces) an app from its app.toml text and the hash of its
    /// uploaded code bundle.
    ///
    /// # Errors
    /// [`ControlError::InvalidConfig`] with file:line:column diagnostics (a node port held by
    /// another app among them), or [`ControlError::Conflict`] when a route of the app would
    /// lose its target.
    pub async fn deploy(
        &self,
        source_name: &str,
        toml: &str,
        bundle: Option<&str>,
    ) -> Result<AppDetail, ControlError> {
        let deployed_at = now();
        let name = self
            .run(|state| {
                plan_deploy(
                    state,
                    &self.settings,
                    source_name,
                    toml,
                    bundle,
                    deployed_at,
                )
            })
            .await?;
        self.app(&name)
    }

    /// Removes an app with its node ports, routes and endpoints.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] if there is no such app.
    pub async fn remove_app(&self, name: &str) -> Result<AppDetail, ControlError> {
        let detail = self.run(|state| plan_remove_app(state, name)).await?;
        self.lease.forget_app(name);
        Ok(detail)
    }

    /// Points `host` at a service of `app`: `service`, else the app's `web` service, else its
    /// only service with an http port; `timeout_ms` overrides the ingress upstream timeout.
    ///
    /// # Errors
    /// [`ControlError::BadRequest`] for an invalid host or an ambiguous service;
    /// [`ControlError::NotFound`] for an unknown app or service;
    /// [`ControlError::Conflict`] when the service has no http port.
    pub async fn set_route(
        &self,
        host: &str,
        app: &str,
        service: Option<&str>,
        timeout_ms: Option<u64>,
    ) -> Result<RouteInfo, ControlError> {
        let host = Host::parse(host).map_err(|e| ControlError::BadRequest(e.to_string()))?;
        self.run(|state| {
            let route = route_record(state, &host, app, service, timeout_ms)?;
            let mut txn = Txn::default();
            txn.compare(RecordKey::App(app.to_owned()), state.app_revision(app))
                .put(RecordKey::Route(route.host.clone()), encode(&route));
            Ok((txn, queries::route_info(&route)))
        })
        .await
    }

    /// Sets every route of a route file (`file` names it in errors) in one transaction, or
    /// none: every bad line is reported with its number before anything is applied.
    ///
    /// # Errors
    /// [`ControlError::BadRequest`] with every bad line (syntax, unknown app or service, no
    /// http port), for a file over the limits, or for more routes than the store takes in one
    /// transaction (etcd's `--max-txn-ops`).
    pub async fn import_routes(&self, file: &str, text: &str) -> Result<RouteImport, ControlError> {
        let bad = |err: ImportError| ControlError::BadRequest(err.to_string());
        let lines = parse_route_file(file, text).map_err(bad)?;
        let max_ops = self.store.max_txn_ops();
        self.run(|state| {
            let mut txn = Txn::default();
            let mut errors = Vec::new();
            let mut apps = BTreeMap::new();
            let mut replaced = 0;
            for line in &lines {
                let route = match route_record(
                    state,
                    &line.host,
                    &line.app,
                    line.service.as_deref(),
                    line.timeout_ms,
                ) {
                    Ok(route) => route,
                    Err(err) => {
                        errors.push((line.line, LineError::Target(err.to_string())));
                        continue;
                    }
                };
                apps.entry(line.app.as_str())
                    .or_insert_with(|| state.app_revision(&line.app));
                replaced += usize::from(state.routes.contains_key(line.host.as_str()));
                txn.put(RecordKey::Route(route.host.clone()), encode(&route));
            }
            if !errors.is_empty() {
                return Err(bad(ImportError::Lines {
                    file: file.to_owned(),
                    errors,
                }));
            }
            for (app, revision) in apps {
                txn.compare(RecordKey::App(app.to_owned()), revision);
            }
            if let Some(max) = max_ops.filter(|max| txn.ops.len().max(txn.compares.len()) > *max) {
                return Err(ControlError::BadRequest(format!(
                    "{file}: {} routes are more than the store takes in one transaction ({max} operations, etcd's default --max-txn-ops); split the file into files of at most {max} routes (each is imported all-or-nothing), or raise --max-txn-ops on every etcd member",
                    txn.ops.len()
                )));
            }
            Ok((
                txn,
                RouteImport {
                    file: file.to_owned(),
                    routes: lines.len(),
                    replaced,
                },
            ))
        })
        .await
    }

    /// Removes the route for `host`.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] if there is no such route.
    pub async fn remove_route(&self, host: &str) -> Result<RouteInfo, ControlError> {
        let host = Host::parse(host).map_err(|e| ControlError::BadRequest(e.to_string()))?;
        self.run(|state| {
            let route = state.routes.get(host.as_str()).ok_or_else(|| {
                ControlError::NotFound(format!("no route for host {host}; see `miren route list`"))
            })?;
            let key = RecordKey::Route(route.value.host.clone());
            let mut txn = Txn::default();
            txn.compare(key.clone(), route.mod_revision).delete(key);
            Ok((txn, queries::route_info(&route.value)))
        })
        .await
    }

    /// Publishes and unpublishes node ports of a deployed service without redeploying (with
    /// the same validation as a deploy). A later deploy resets them to app.toml.
    ///
    /// # Errors
    /// [`ControlError::BadRequest`] for specs that do not fit the service;
    /// [`ControlError::Conflict`] for node ports held elsewhere or reserved.
    pub async fn edit_node_ports(
        &self,
        app: &str,
        edit: &PortsEditRequest,
    ) -> Result<Vec<NodePortInfo>, ControlError> {
        if edit.add.is_empty() && edit.remove.is_empty() {
            return Err(ControlError::BadRequest(
                "nothing to change; give --add-published N[:PORT][/tcp|udp] or --rm-published N[/tcp|udp]".into(),
            ));
        }
        self.run(|state| plan_edit_node_ports(state, &self.settings, app, edit))
            .await?;
        self.node_ports(Some(app))
    }

    /// Replaces this node's endpoints of a service (its ready instances, or addresses an
    /// external orchestrator supplies). They live under this node's lease.
    ///
    /// # Errors
    /// [`ControlError::NotFound`] for an unknown app, service or port name.
    pub async fn set_endpoints(
        &self,
        app: &str,
        service: &str,
        endpoints: EndpointMap,
    ) -> Result<ServiceEndpoints, ControlError> {
        let endpoints: EndpointMap = endpoints
            .into_iter()
            .map(|(name, mut addrs)| {
                addrs.sort();
                addrs.dedup();
                (name, addrs)
            })
            .collect();
        let lease = self.lease.id();
        self.run(|state| {
            let (_, config) = queries::find_app(state, app)?;
            let config = queries::find_service(config, service)?;
            if let Some(unknown) = endpoints
                .keys()
                .find(|name| !config.ports.iter().any(|p| &p.name == *name))
            {
                return Err(ControlError::NotFound(format!(
                    "service \"{service}\" of app \"{app}\" has no port named \"{unknown}\"; its ports: {}",
                    describe_ports(config)
                )));
            }
            let key = RecordKey::Endpoints {
                app: app.to_owned(),
                service: service.to_owned(),
                node: self.settings.node.clone(),
            };
            let mut txn = Txn::default();
            txn.compare(RecordKey::App(app.to_owned()), state.app_revision(app));
            if endpoints.values().all(Vec::is_empty) {
                txn.delete(key);
            } else {
                txn.put_leased(key, encode(&endpoints), Some(lease));
            }
            Ok((txn, ()))
        })
        .await?;
        self.lease.record(app, service, endpoints.clone());
        Ok(ServiceEndpoints {
            service: service.to_owned(),
            node_of: endpoints
                .values()
                .flatten()
                .map(|addr| (addr.ip(), self.settings.node.clone()))
                .collect(),
            endpoints,
        })
    }
}

/// The transaction of a deploy, and the app's name.
fn plan_deploy(
    state: &State,
    settings: &ControlSettings,
    source_name: &str,
    toml: &str,
    bundle: Option<&str>,
    deployed_at: u64,
) -> Result<(Txn, String), ControlError> {
    let mut config = parse_deployable(Source::new(source_name, toml), &settings.validation)?;
    let name = config.name.clone();
    let previous = state.apps.get(&name).map(|app| &app.record);
    let assigned_ports = fill_ports(&mut config, previous, settings.port_range.clone())?;

    let claims = state.node_ports.values().map(|np| NodePortClaim {
        node_port: np.value.node_port,
        protocol: np.value.protocol,
        app: np.value.app.clone(),
        service: np.value.service.clone(),
    });
    ConfigError::check(check_node_port_claims(&config, claims))?;
    let others: u64 = state
        .valid_apps()
        .filter(|(record, _)| record.name != name)
        .map(|(_, config)| config.fixed_instances())
        .sum();
    let limit = settings.validation.limits.instances_per_node;
    if let Some(over) = check_node_instances(&config, others, limit) {
        return Err(ConfigError::new(vec![over]).into());
    }
    let mut txn = Txn::default();
    for route in state.routes.values().filter(|r| r.value.app == name) {
        let route_host = &route.value.host;
        check_route_target(&config, &route.value.service).map_err(|err| {
            ControlError::Conflict(format!(
                "route {route_host} points at {err}; keep the service in app.toml, or remove the route first with `miren route rm {route_host}`"
            ))
        })?;
        txn.compare(RecordKey::Route(route_host.clone()), route.mod_revision);
    }

    let record = AppRecord {
        name: name.clone(),
        source_name: source_name.to_owned(),
        bundle: bundle.map(str::to_owned),
        directory: None,
        toml: toml.to_owned(),
        version: previous.map_or(1, |p| p.version + 1),
        deployed_at,
        assigned_ports,
    };
    let key = RecordKey::App(name.clone());
    txn.compare(key.clone(), state.app_revision(&name))
        .put(key, encode(&record));
    claim_node_ports(&mut txn, state, &name, &config_node_ports(&config));
    Ok((txn, name))
}

/// The transaction removing an app, and its detail before the removal.
fn plan_remove_app(state: &State, name: &str) -> Result<(Txn, AppDetail), ControlError> {
    let app = state
        .apps
        .get(name)
        .ok_or_else(|| queries::no_such_app(name))?;
    let detail = queries::app_detail(state, name).unwrap_or_else(|_| AppDetail {
        name: app.record.name.clone(),
        version: app.record.version,
        deployed_at: app.record.deployed_at,
        source_name: app.record.source_name.clone(),
        services: Vec::new(),
        routes: Vec::new(),
    });
    let key = RecordKey::App(name.to_owned());
    let mut txn = Txn::default();
    txn.compare(key.clone(), app.mod_revision).delete(key);
    claim_node_ports(&mut txn, state, name, &[]);
    for route in state.routes.values().filter(|r| r.value.app == name) {
        let key = RecordKey::Route(route.value.host.clone());
        txn.compare(key.clone(), route.mod_revision).delete(key);
    }
    txn.delete_prefix(app_endpoints_prefix(name));
    Ok((txn, detail))
}

/// Adds to `txn` what makes `ports` the node ports of `app`: claims it no longer holds are
/// released, new ones are created only if nobody holds them (the store refuses a second
/// claim), kept ones only if they are still the app's.
fn claim_node_ports(txn: &mut Txn, state: &State, app: &str, ports: &[NodePortRecord]) {
    let wanted: HashSet<(u16, Protocol)> =
        ports.iter().map(|np| (np.node_port, np.protocol)).collect();
    for ((port, protocol), claim) in &state.node_ports {
        if claim.value.app == app && !wanted.contains(&(*port, *protocol)) {
            let key = RecordKey::NodePort(*protocol, *port);
            txn.compare(key.clone(), claim.mod_revision).delete(key);
        }
    }
    for np in ports {
        let held = state
            .node_ports
            .get(&(np.node_port, np.protocol))
            .filter(|claim| claim.value.app == app)
            .map_or(0, |claim| claim.mod_revision);
        let key = RecordKey::node_port(np);
        txn.compare(key.clone(), held).put(key, encode(np));
    }
}

fn plan_edit_node_ports(
    state: &State,
    settings: &ControlSettings,
    app: &str,
    edit: &PortsEditRequest,
) -> Result<(Txn, ()), ControlError> {
    let (_, config) = queries::find_app(state, app)?;
    let service = queries::find_service(config, &edit.service)?;
    let mut ports: Vec<NodePortRecord> = state
        .node_ports
        .values()
        .map(|np| &np.value)
        .filter(|np| np.app == app)
        .cloned()
        .collect();
    for remove in &edit.remove {
        unpublish(&mut ports, app, service, remove)?;
    }
    for add in &edit.add {
        let record = publish(state, settings, &ports, app, service, add)?;
        ports.push(record);
    }
    let published = ports.iter().filter(|np| np.service == service.name).count();
    let limit = settings.validation.limits.ports_per_service;
    if published > limit {
        return Err(ControlError::BadRequest(format!(
            "service \"{}\" would publish {published} node ports, more than the limit of {limit} per service; unpublish some first, or raise the agent's limit with --max-ports-per-service",
            service.name
        )));
    }
    let mut txn = Txn::default();
    txn.compare(RecordKey::App(app.to_owned()), state.app_revision(app));
    claim_node_ports(&mut txn, state, app, &ports);
    Ok((txn, ()))
}

/// Gives ports without a number the number assigned by an earlier deploy when it is still
/// free, else a new one from `range`; returns all assignments.
fn fill_ports(
    config: &mut AppConfig,
    previous: Option<&AppRecord>,
    range: RangeInclusive<u16>,
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
    assign_ports(config, range, &HashSet::new())?;
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

/// The route of `host` to `app`'s `service` (default: [`default_route_service`]), checked
/// against the view: the app exists here and the service has an http port.
fn route_record(
    state: &State,
    host: &Host,
    app: &str,
    service: Option<&str>,
    timeout_ms: Option<u64>,
) -> Result<RouteRecord, ControlError> {
    let (_, config) = queries::find_app(state, app)?;
    let service = match service {
        Some(service) => service.to_owned(),
        None => default_route_service(config)?,
    };
    queries::find_service(config, &service)?;
    check_route_target(config, &service).map_err(|err| {
        ControlError::Conflict(format!(
            "{err}; routes reach a service through its http port"
        ))
    })?;
    Ok(RouteRecord {
        host: host.as_str().to_owned(),
        app: app.to_owned(),
        service,
        timeout_ms,
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

/// Validates one `N[:PORT][/proto]` against the service and every published port.
fn publish(
    state: &State,
    settings: &ControlSettings,
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
    if let Some(reason) = settings.validation.node_port_conflict(n) {
        return Err(ControlError::Conflict(format!(
            "{reason}; choose another node port"
        )));
    }
    let matches = |kinds_ok: bool| -> Vec<&PortSpec> {
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
    let holder = state
        .node_ports
        .values()
        .map(|np| &np.value)
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

/// Unix time now, in seconds.
pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
