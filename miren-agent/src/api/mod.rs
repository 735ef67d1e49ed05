//! The control API: JSON over HTTP/1.1 on the agent's Unix socket (see [`types`] for the
//! bodies). [`router`] maps paths onto [`ControlPlane`] operations; [`serve`] binds the socket
//! (mode 0600, parent directory created) and serves until shutdown.

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
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde::Deserialize;

use crate::{
    control::{ControlError, ControlPlane},
    dataplane::ActiveDataplane,
};
use types::{
    AppDetail, AppSummary, DataplaneStatus, DeployRequest, ErrorBody, NodePortInfo,
    PortsEditRequest, RouteInfo, RouteRequest, ServiceEndpoints, Status,
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
        .route(
            "/v1/apps/{app}/services/{service}/endpoints",
            put(set_endpoints).get(service_endpoints),
        )
        .route("/v1/routes", get(routes))
        .route("/v1/routes/{host}", put(set_route).delete(remove_route))
        .route("/v1/ports", get(ports))
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

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ControlError::InvalidConfig(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"),
            ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ControlError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "API request failed");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
                kind: kind.into(),
            }),
        )
            .into_response()
    }
}

async fn status(State(state): State<Arc<ApiState>>) -> Json<Status> {
    let (apps, routes, node_ports) = state.control.counts();
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: state.started.elapsed().as_secs(),
        state_dir: state.state_dir.display().to_string(),
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
    })
}

async fn apps(State(state): State<Arc<ApiState>>) -> Json<Vec<AppSummary>> {
    Json(state.control.apps())
}

async fn deploy(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<DeployRequest>,
) -> ApiResult<AppDetail> {
    let detail = state.control.deploy(&req.source_name, &req.toml)?;
    tracing::info!(app = %detail.name, version = detail.version, "deployed");
    Ok(Json(detail))
}

async fn app(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
) -> ApiResult<AppDetail> {
    Ok(Json(state.control.app(&app)?))
}

async fn remove_app(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
) -> ApiResult<AppDetail> {
    let detail = state.control.remove_app(&app)?;
    tracing::info!(app = %detail.name, "removed");
    Ok(Json(detail))
}

async fn edit_ports(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
    Json(req): Json<PortsEditRequest>,
) -> ApiResult<Vec<NodePortInfo>> {
    Ok(Json(state.control.edit_node_ports(&app, &req)?))
}

async fn app_endpoints(
    State(state): State<Arc<ApiState>>,
    UrlPath(app): UrlPath<String>,
) -> ApiResult<Vec<ServiceEndpoints>> {
    Ok(Json(state.control.endpoints(&app, None)?))
}

async fn service_endpoints(
    State(state): State<Arc<ApiState>>,
    UrlPath((app, service)): UrlPath<(String, String)>,
) -> Result<Json<ServiceEndpoints>, ControlError> {
    let mut all = state.control.endpoints(&app, Some(&service))?;
    all.pop()
        .map(Json)
        .ok_or_else(|| ControlError::NotFound(format!("no service \"{service}\"")))
}

async fn set_endpoints(
    State(state): State<Arc<ApiState>>,
    UrlPath((app, service)): UrlPath<(String, String)>,
    Json(req): Json<ServiceEndpoints>,
) -> ApiResult<ServiceEndpoints> {
    Ok(Json(state.control.set_endpoints(
        &app,
        &service,
        req.endpoints,
    )?))
}

async fn routes(State(state): State<Arc<ApiState>>) -> Json<Vec<RouteInfo>> {
    Json(state.control.routes())
}

async fn set_route(
    State(state): State<Arc<ApiState>>,
    UrlPath(host): UrlPath<String>,
    Json(req): Json<RouteRequest>,
) -> ApiResult<RouteInfo> {
    Ok(Json(state.control.set_route(
        &host,
        &req.app,
        req.service.as_deref(),
        req.timeout_ms,
    )?))
}

async fn remove_route(
    State(state): State<Arc<ApiState>>,
    UrlPath(host): UrlPath<String>,
) -> ApiResult<RouteInfo> {
    Ok(Json(state.control.remove_route(&host)?))
}

#[derive(Debug, Deserialize)]
struct PortsQuery {
    app: Option<String>,
}

async fn ports(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<PortsQuery>,
) -> ApiResult<Vec<NodePortInfo>> {
    let mut ports = state.control.node_ports(query.app.as_deref())?;
    if let Some(dataplane) = &state.dataplane
        && let Err(err) = state.traffic.fill(dataplane, &mut ports).await
    {
        tracing::warn!(%err, "node-port counters unavailable");
    }
    Ok(Json(ports))
}
