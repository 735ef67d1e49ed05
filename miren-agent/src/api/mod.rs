//! The control API: JSON over HTTP/1.1 on the agent's Unix socket (see [`types`] for the
//! bodies). [`router`] maps paths onto [`ControlPlane`] operations; [`serve`] binds the socket
//! (mode 0600, parent directory created) and serves until shutdown.
//!
//! Handlers never block the runtime: control-plane calls (its lock, SQLite commits) and file
//! reads run on the blocking pool. Request bodies and query strings that do not fit are 400s
//! whose [`ErrorBody`] names the field.

mod bundles;
mod nodes;
pub mod traffic;
pub mod types;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, FromRequest, FromRequestParts, Path as UrlPath, Query, Request, State,
    },
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::{
    control::{ControlError, ControlPlane},
    dataplane::ActiveDataplane,
    ingress::certs::{CertError, CertPart, CertSource, CertStore},
    routes::{Host, HostError},
    store::StoreError,
};
use types::{
    AppDetail, AppSummary, CertInfo, CertRequest, DataplaneStatus, DeployRequest, ErrorBody,
    LogChunk, MAX_ROUTE_TIMEOUT_MS, NodePortInfo, PortsEditRequest, RouteImport,
    RouteImportRequest, RouteInfo, RouteRequest, ServiceEndpoints, Status,
};

/// What the API handlers share.
#[derive(Debug)]
pub struct ApiState {
    /// The desired-state operations.
    pub control: Arc<ControlPlane>,
    /// When the agent started.
    pub started: Instant,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// The active data plane, if node ports are served on this node.
    pub dataplane: Option<Arc<ActiveDataplane>>,
    /// Why there is no data plane when `dataplane` is `None`.
    pub no_dataplane_reason: String,
    /// Counter samples for the rates of `miren ports`.
    pub traffic: traffic::TrafficSampler,
    /// The control-plane revision the ingress routes with.
    pub ingress_revision: tokio::sync::watch::Receiver<u64>,
    /// TLS certificates of the ingress (`miren cert`).
    pub certs: Arc<CertStore>,
    /// The other agents of the cluster (cluster mode), for their node-port counters.
    pub peers: Option<crate::cluster_link::PeerClient>,
    /// The sandbox runner, when this agent runs instances.
    pub runner: Option<Arc<crate::sandbox::runner::Runner>>,
    /// The app code bundles on this node.
    pub bundles: Arc<crate::bundle::BundleStore>,
}

impl ApiState {
    /// Waits (briefly) until the ingress routes with the current revision, so a client that
    /// changed a route or endpoints sees the change on its next request.
    async fn ingress_caught_up(&self) {
        let target = *self.control.subscribe().borrow();
        let mut applied = self.ingress_revision.clone();
        let wait = applied.wait_for(|revision| *revision >= target);
        if tokio::time::timeout(std::time::Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            tracing::warn!(
                revision = target,
                "the ingress has not applied the revision after 2 s"
            );
        }
    }
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another agent is already listening on the socket.
    #[error(
        "another miren-agent is already serving {path}; stop it first or pass another --api-socket"
    )]
    InUse {
        /// Socket path.
        path: PathBuf,
    },
}

type ApiResult<T> = Result<Json<T>, ControlError>;

/// The API routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/apps", get(apps).post(deploy))
        .route("/v1/apps/{app}", get(app).delete(remove_app))
        .route("/v1/apps/{app}/ports", post(edit_ports))
        .route("/v1/apps/{app}/endpoints", get(app_endpoints))
        .route("/v1/apps/{app}/logs", get(app_logs))
        .route(
            "/v1/apps/{app}/services/{service}/endpoints",
            put(set_endpoints).get(service_endpoints),
        )
        .route(
            "/v1/routes",
            get(routes)
                .post(import_routes)
                .layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT)),
        )
        .route("/v1/routes/{host}", put(set_route).delete(remove_route))
        .route("/v1/ports", get(ports))
        .route("/v1/certs", get(certs))
        .route("/v1/certs/{host}", put(set_cert).post(set_cert))
        .merge(nodes::routes())
        .merge(bundles::routes())
        .with_state(state)
}

/// Binds the API socket at `path` (creating its directory; mode 0600). A stale socket file
/// left by a dead agent is replaced; a live agent's is not.
///
/// # Errors
/// [`ApiError`] if the socket cannot be bound or another agent serves it.
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(bind_err)?;
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(ApiError::InUse {
            path: path.to_owned(),
        });
    }
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(bind_err)?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` completes.
///
/// # Errors
/// I/O errors from the accept loop.
pub async fn serve(
    listener: tokio::net::UnixListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An [`ErrorBody`] response; server errors are logged.
fn error_response(status: StatusCode, kind: &str, error: &dyn std::error::Error) -> Response {
    if status.is_server_error() {
        tracing::error!(%error, "API request failed");
    }
    (
        status,
        Json(ErrorBody {
            error: error.to_string(),
            kind: kind.into(),
        }),
    )
        .into_response()
}

/// Runs `work` on tokio's blocking pool: everything a handler does that may block (the
/// control plane's lock and its SQLite commits, file reads, parsing a large app.toml), so
/// that the API's runtime keeps answering other requests meanwhile. A panic in `work` is
/// resumed in the handler.
async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<Json<T>, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map(Json),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// A JSON request body. Unlike axum's [`Json`] (422 with plain text), a body that does not
/// fit `T` is refused with 400 and an [`ErrorBody`] naming the field, e.g.
/// `invalid request body: add[0].node_port: invalid value: integer `70000`, expected a port
/// number from 1 to 65535 at line 1 column 40`.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(input_error(rejection.status(), "request body", &rejection)),
        }
    }
}

/// The query string, refused like [`Body`] when it does not fit `T`.
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(input_error(rejection.status(), "query string", &rejection)),
        }
    }
}

/// An [`ErrorBody`] for a request axum could not extract: the message of the innermost error
/// (which names the field), 400 where axum would answer 422.
fn input_error(status: StatusCode, what: &str, rejection: &dyn std::error::Error) -> Response {
    let detail = rejection
        .source()
        .map_or_else(|| rejection.to_string(), ToString::to_string);
    let status = match status {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        other => other,
    };
    let body = ErrorBody {
        error: format!("invalid {what}: {detail}"),
        kind: "bad_request".into(),
    };
    (status, Json(body)).into_response()
}

/// Refuses a route timeout outside 1 ms to [`MAX_ROUTE_TIMEOUT_MS`].
fn check_route_timeout(timeout_ms: Option<u64>) -> Result<(), ControlError> {
    match timeout_ms {
        Some(ms) if !(1..=MAX_ROUTE_TIMEOUT_MS).contains(&ms) => {
            Err(ControlError::BadRequest(format!(
                "timeout_ms {ms} is out of range; use 1 to {MAX_ROUTE_TIMEOUT_MS} (1 ms to 24 h)"
            )))
        }
        _ => Ok(()),
    }
}

/// Refuses endpoints with port 0.
fn check_endpoint_ports(endpoints: &ServiceEndpoints) -> Result<(), ControlError> {
    for (name, addrs) in &endpoints.endpoints {
        if let Some((i, addr)) = addrs.iter().enumerate().find(|(_, a)| a.port() == 0) {
            return Err(ControlError::BadRequest(format!(
                "endpoints.{name}[{i}]: port 0 of {addr} is out of range; use 1-65535"
            )));
        }
    }
    Ok(())
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ControlError::InvalidConfig(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"),
            ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ControlError::Store(StoreError::Unavailable { .. })
            | ControlError::ViewBehind { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ControlError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        error_response(status, kind, &self)
    }
}

/// Errors of the certificate endpoints.
#[derive(Debug, thiserror::Error)]
pub enum CertApiError {
    /// The host is not a valid route host.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The PEM pair was refused; the message names the file it is about when the client
    /// gave file names.
    #[error("{message}")]
    Invalid {
        /// The user-facing message.
        message: String,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(CertError),
}

impl CertApiError {
    /// Classifies a [`CertStore::put`] failure, prefixing input errors with the file name.
    fn from_set(err: CertError, req: &CertRequest) -> Self {
        let file = match err.part() {
            None => return Self::Store(err),
            Some(CertPart::Certificate) => req.cert_file.as_deref(),
            Some(CertPart::Key) => req.key_file.as_deref(),
        };
        Self::Invalid {
            message: match file {
                Some(file) => format!("{file}: {err}"),
                None => err.to_string(),
            },
        }
    }
}

impl IntoResponse for CertApiError {
    fn into_response(self) -> Response {
        if let Self::Store(CertError::Store { source, .. }) = self {
            return source.into_response();
        }
        let (status, kind) = match &self {
            Self::Host(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_certificate"),
            Self::Store(CertError::UserCertificatePresent { .. }) => {
                (StatusCode::CONFLICT, "conflict")
            }
            Self::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        error_response(status, kind, &self)
    }
}

async fn status(State(state): State<Arc<ApiState>>) -> ApiResult<Status> {
    blocking(move || {
        let (apps, routes, node_ports) = state.control.counts();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: state.started.elapsed().as_secs(),
            state_dir: state.state_dir.display().to_string(),
            node: state.control.node_name().to_owned(),
            store: state.control.store_description(),
            scheduler: state.control.scheduler(),
            apps,
            routes,
            node_ports,
            dataplane: match &state.dataplane {
                Some(active) => DataplaneStatus {
                    mode: active.mode().into(),
                    reason: active.reason().into(),
                },
                None => DataplaneStatus {
                    mode: "none".into(),
                    reason: state.no_dataplane_reason.clone(),
                },
            },
            max_bundle_bytes: state.bundles.max_bytes(),
        })
    })
    .await
}

async fn apps(State(state): State<Arc<ApiState>>) -> ApiResult<Vec<AppSummary>> {
    blocking(move || Ok(state.control.apps())).await
}

async fn deploy(
    State(state): State<Arc<ApiState>>,
    Body(req): Body<DeployRequest>,
) -> ApiResult<AppDetail> {
    let bundle = match req.bundle.as_deref() {
        Some(text) => Some(bundles::for_deploy(&state.bundles, text).await?),
        None => None,
    };
    let mut detail = state
        .control
        .deploy(
            &req.source_name,
            &req.toml,
            bundle.as_ref().map(crate::bundle::BundleHash::as_str),
        )
        .await?;
    state.ingress_caught_up().await;
    tracing::info!(app = %detail.name, version = detail.version, "deployed");
    detail.mask_secrets();
    Ok(Json(detail))
}

#[derive(Debug, Deserialize)]
struct AppQuery {
    /// Show secret environment values instead of masking them.
    #[serde(default)]
    show_secrets: bool,
}

async fn app(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
    Params(query): Params<AppQuery>,
) -> ApiResult<AppDetail> {
    blocking(move || {
        let mut detail = state.control.app(&app)?;
        if let Some(runner) = &state.runner {
            let mut status = runner.status(&app);
            for service in &mut detail.services {
                service.instances = Some(status.remove(&service.name).unwrap_or_default());
            }
        }
        if !query.show_secrets {
            detail.mask_secrets();
        }
        Ok(detail)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    service: Option<String>,
    /// The cursor of an earlier answer; empty: start as `tail` and `since` say.
    #[serde(default)]
    after: String,
    /// Start with the last N lines of the selected instances together.
    tail: Option<usize>,
    /// Start with the lines written during this last duration, e.g. `10m` or `1h30m`.
    since: Option<String>,
    /// Stop before lines written after this log timestamp (`2026-11-30T05:04:57.123456789Z`).
    until: Option<String>,
}

async fn app_logs(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
    Params(query): Params<LogsQuery>,
) -> Result<Json<LogChunk>, LogsError> {
    blocking(move || logs(&state, &app, query)).await
}

/// Why `GET /v1/apps/{app}/logs` failed.
#[derive(Debug, thiserror::Error)]
enum LogsError {
    /// No such app or service, or a bad query.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The log files could not be read.
    #[error(transparent)]
    Read(#[from] crate::sandbox::SandboxError),
}

impl IntoResponse for LogsError {
    fn into_response(self) -> Response {
        match self {
            Self::Control(e) => e.into_response(),
            Self::Read(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e),
        }
    }
}

/// The log lines of `app` the query selects (reads the instances' log files).
fn logs(state: &ApiState, app: &str, query: LogsQuery) -> Result<LogChunk, LogsError> {
    let detail = state.control.app(app)?;
    if let Some(service) = &query.service
        && !detail.services.iter().any(|s| &s.name == service)
    {
        return Err(
            ControlError::NotFound(format!("app \"{app}\" has no service \"{service}\"")).into(),
        );
    }
    let Some(runner) = &state.runner else {
        return Err(ControlError::NotFound(
            "this agent does not run instances (--no-sandboxes), so it has no logs".into(),
        )
        .into());
    };
    let since = match query.since.as_deref() {
        None => None,
        Some(text) => Some(crate::config::parse_duration(text).ok_or_else(|| {
            ControlError::BadRequest(format!(
                "since \"{text}\" is not a duration; use e.g. 90s, 10m or 1h30m"
            ))
        })?),
    };
    if let Some(until) = &query.until
        && !crate::sandbox::logs::is_log_time(until.as_bytes())
    {
        return Err(ControlError::BadRequest(format!(
            "until \"{until}\" is not a log timestamp like 2026-11-30T05:04:57.123456789Z"
        ))
        .into());
    }
    let query = crate::sandbox::logs::LogQuery {
        service: query.service,
        after: query.after,
        tail: query.tail,
        since,
        until: query.until,
    };
    Ok(runner.logs(app, &query)?)
}

async fn remove_app(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
) -> ApiResult<AppDetail> {
    let mut detail = state.control.remove_app(&app).await?;
    state.ingress_caught_up().await;
    tracing::info!(app = %detail.name, "removed");
    detail.mask_secrets();
    Ok(Json(detail))
}

async fn edit_ports(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
    Body(req): Body<PortsEditRequest>,
) -> ApiResult<Vec<NodePortInfo>> {
    Ok(Json(state.control.edit_node_ports(&app, &req).await?))
}

async fn app_endpoints(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
) -> ApiResult<Vec<ServiceEndpoints>> {
    blocking(move || state.control.endpoints(&app, None)).await
}

async fn service_endpoints(
    State(state): State<Arc<ApiState>>,
    UrlPath((app, service)): UrlPath<(String, String)>,
) -> ApiResult<ServiceEndpoints> {
    blocking(move || {
        let mut all = state.control.endpoints(&app, Some(&service))?;
        all.pop()
            .ok_or_else(|| ControlError::NotFound(format!("no service \"{service}\"")))
    })
    .await
}

async fn set_endpoints(
    State(state): State<Arc<ApiState>>,
    UrlPath((app, service)): UrlPath<(String, String)>,
    Body(req): Body<ServiceEndpoints>,
) -> ApiResult<ServiceEndpoints> {
    check_endpoint_ports(&req)?;
    let endpoints = Json(
        state
            .control
            .set_endpoints(&app, &service, req.endpoints)
            .await?,
    );
    state.ingress_caught_up().await;
    Ok(endpoints)
}

async fn routes(State(state): State<Arc<ApiState>>) -> ApiResult<Vec<RouteInfo>> {
    blocking(move || Ok(state.control.routes())).await
}

async fn set_route(
    State(state): State<Arc<ApiState>>,
    UrlPath(host): UrlPath<String>,
    Body(req): Body<RouteRequest>,
) -> ApiResult<RouteInfo> {
    check_route_timeout(req.timeout_ms)?;
    let route = Json(
        state
            .control
            .set_route(&host, &req.app, req.service.as_deref(), req.timeout_ms)
            .await?,
    );
    state.ingress_caught_up().await;
    Ok(route)
}

/// The largest `POST /v1/routes` body: a route file of the largest size, even with every
/// byte escaped in JSON.
const IMPORT_BODY_LIMIT: usize = 6 * crate::routes::MAX_IMPORT_BYTES;

async fn import_routes(
    State(state): State<Arc<ApiState>>,
    Body(req): Body<RouteImportRequest>,
) -> ApiResult<RouteImport> {
    let imported = Json(state.control.import_routes(&req.file, &req.text).await?);
    state.ingress_caught_up().await;
    Ok(imported)
}

async fn remove_route(
    State(state): State<Arc<ApiState>>,
    UrlPath(host): UrlPath<String>,
) -> ApiResult<RouteInfo> {
    let route = Json(state.control.remove_route(&host).await?);
    state.ingress_caught_up().await;
    Ok(route)
}

#[derive(Debug, Deserialize)]
struct PortsQuery {
    app: Option<String>,
}

async fn ports(
    State(state): State<Arc<ApiState>>,
    Params(query): Params<PortsQuery>,
) -> ApiResult<Vec<NodePortInfo>> {
    let mut ports = state.control.node_ports(query.app.as_deref())?;
    if let Some(dataplane) = &state.dataplane
        && let Err(err) = state.traffic.fill(dataplane, &mut ports).await
    {
        tracing::warn!(%err, "node-port counters unavailable");
    }
    if let Some(client) = &state.peers {
        add_peer_traffic(&state.control, client, &mut ports).await;
    }
    Ok(Json(ports))
}

/// Adds every live peer's counters to `ports`: each node's own under `by_node`, the sum as
/// `traffic`. A peer that does not answer in time is left out (and logged).
async fn add_peer_traffic(
    control: &ControlPlane,
    client: &crate::cluster_link::PeerClient,
    ports: &mut [NodePortInfo],
) {
    let mut asked = tokio::task::JoinSet::new();
    for peer in control.peers().into_iter().filter(|peer| peer.alive) {
        let client = client.clone();
        asked.spawn(async move { (peer.name.clone(), client.ports(&peer).await) });
    }
    let node = control.node_name().to_owned();
    for port in ports.iter_mut() {
        if let Some(traffic) = &port.traffic {
            port.by_node.insert(node.clone(), traffic.clone());
        }
    }
    while let Some(Ok((peer, answer))) = asked.join_next().await {
        let theirs = match answer {
            Ok(theirs) => theirs,
            Err(err) => {
                tracing::warn!(%err, "a node's node-port counters are missing from this answer");
                continue;
            }
        };
        for their in theirs {
            let Some(traffic) = their.traffic else {
                continue;
            };
            if let Some(port) = ports
                .iter_mut()
                .find(|p| p.node_port == their.node_port && p.protocol == their.protocol)
            {
                port.by_node.insert(peer.clone(), traffic);
            }
        }
    }
    for port in ports.iter_mut().filter(|p| !p.by_node.is_empty()) {
        let mut sum = types::PortTraffic::default();
        for traffic in port.by_node.values() {
            sum.add(traffic);
        }
        port.traffic = Some(sum);
    }
}

#[async_trait::async_trait]
impl crate::cluster_link::LocalPorts for ApiState {
    async fn local_ports(&self) -> Vec<NodePortInfo> {
        let mut ports = self.control.node_ports(None).unwrap_or_default();
        if let Some(dataplane) = &self.dataplane
            && let Err(err) = self.traffic.fill(dataplane, &mut ports).await
        {
            tracing::warn!(%err, "node-port counters unavailable for a peer");
        }
        ports
    }
}

async fn certs(State(state): State<Arc<ApiState>>) -> Json<Vec<CertInfo>> {
    Json(state.certs.list())
}

async fn set_cert(
    State(state): State<Arc<ApiState>>,
    UrlPath(host): UrlPath<String>,
    Body(req): Body<CertRequest>,
) -> Result<Json<CertInfo>, CertApiError> {
    let host = Host::parse(&host)?;
    // Stored for every node's ingress; served here before the answer.
    let info = state
        .certs
        .put(
            &host,
            req.cert_pem.clone(),
            req.key_pem.clone(),
            CertSource::User,
        )
        .await
        .map_err(|err| CertApiError::from_set(err, &req))?;
    tracing::info!(host = %info.host, not_after = %info.not_after, "certificate set by the operator");
    Ok(Json(info))
}
