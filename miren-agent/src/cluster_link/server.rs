//! The cluster listener's server: token check first, then the routes.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Path as UrlPath, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse as _, Response},
    routing::get,
};
use tokio::sync::watch;

use super::{AUTHORIZATION, ClusterLinkError, ClusterToken, LocalPorts};
use crate::bundle::{BundleHash, BundleStore};

/// What the routes share.
#[derive(Debug)]
struct LinkState {
    token: ClusterToken,
    bundles: Arc<BundleStore>,
    ports: Arc<dyn LocalPorts>,
}

/// Binds `addr` and serves the other agents of the cluster until `shutdown` turns true.
///
/// # Errors
/// [`ClusterLinkError::Bind`] when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    token: ClusterToken,
    bundles: Arc<BundleStore>,
    ports: Arc<dyn LocalPorts>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ClusterLinkError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ClusterLinkError::Bind { addr, source })?;
    let state = Arc::new(LinkState {
        token,
        bundles,
        ports,
    });
    let router = Router::new()
        .route("/cluster/v1/bundles/{hash}", get(bundle))
        .route("/cluster/v1/ports", get(node_ports))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state);
    tracing::info!(%addr, "serving the cluster listener");
    Ok(tokio::spawn(async move {
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
        if let Err(error) = served {
            tracing::error!(%error, "the cluster listener failed");
        }
    }))
}

/// Lets a request through only with the cluster's token; anything else gets 401, logged.
async fn authorize(
    State(state): State<Arc<LinkState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if state.token.admits(header) {
        return next.run(request).await;
    }
    tracing::warn!(
        %peer,
        path = %request.uri().path(),
        presented = header.is_some(),
        "refused a cluster request without the cluster token"
    );
    (
        StatusCode::UNAUTHORIZED,
        "the cluster token is missing or wrong; every agent of a cluster needs the same --cluster-token-file\n",
    )
        .into_response()
}

/// `GET /cluster/v1/bundles/{hash}`: the bundle's tar as received.
async fn bundle(State(state): State<Arc<LinkState>>, UrlPath(hash): UrlPath<String>) -> Response {
    let Some(blob) = hash
        .parse::<BundleHash>()
        .ok()
        .and_then(|hash| state.bundles.blob(&hash))
    else {
        return (StatusCode::NOT_FOUND, "no such bundle on this node\n").into_response();
    };
    match tokio::fs::File::open(&blob).await {
        Ok(file) => Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response(),
        Err(error) => {
            tracing::warn!(%error, blob = %blob.display(), "cannot read a bundle for a peer");
            (StatusCode::NOT_FOUND, "no such bundle on this node\n").into_response()
        }
    }
}

/// `GET /cluster/v1/ports`: this node's node ports with its own counters.
async fn node_ports(State(state): State<Arc<LinkState>>) -> Response {
    axum::Json(state.ports.local_ports().await).into_response()
}
