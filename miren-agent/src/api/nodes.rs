//! `/v1/nodes`: the nodes of the cluster (`miren nodes`, `miren node …`).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    routing::{delete, get, post},
};
use serde::{Deserialize, Serialize};

use super::{ApiResult, ApiState};
use crate::control::{ControlError, NodeMode};

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// The node's own addresses.
    pub addresses: Vec<String>,
    /// `ready`, `cordoned`, `draining` or `lost` (its lease expired).
    pub status: String,
    /// Whether new instances are kept off the node.
    pub cordoned: bool,
    /// Ready instances on the node.
    pub instances: usize,
    /// The node's sandbox subnet.
    pub subnet: String,
    /// Where the other agents reach its cluster listener (cluster mode).
    #[serde(default)]
    pub cluster_addr: Option<String>,
    /// Unix time of the last heartbeat this agent saw, if any.
    pub last_heartbeat: Option<u64>,
}

/// The node routes.
pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{node}", get(node).merge(delete(remove)))
        .route("/v1/nodes/{node}/{action}", post(set_mode))
}

async fn nodes(State(state): State<Arc<ApiState>>) -> Json<Vec<NodeInfo>> {
    Json(state.control.nodes())
}

async fn node(
    State(state): State<Arc<ApiState>>,
    UrlPath(node): UrlPath<String>,
) -> ApiResult<NodeInfo> {
    Ok(Json(state.control.node(&node)?))
}

/// `POST /v1/nodes/{node}/{action}` with `cordon`, `drain` or `uncordon`.
async fn set_mode(
    State(state): State<Arc<ApiState>>,
    UrlPath((node, action)): UrlPath<(String, String)>,
) -> ApiResult<NodeInfo> {
    let mode = match action.as_str() {
        "cordon" => NodeMode::Cordoned,
        "drain" => NodeMode::Draining,
        "uncordon" => NodeMode::Uncordoned,
        other => {
            return Err(ControlError::NotFound(format!(
                "no node action \"{other}\"; use cordon, drain or uncordon"
            )));
        }
    };
    Ok(Json(state.control.set_node_mode(&node, mode).await?))
}

async fn remove(
    State(state): State<Arc<ApiState>>,
    UrlPath(node): UrlPath<String>,
) -> ApiResult<NodeInfo> {
    let info = state.control.remove_node(&node).await?;
    tracing::info!(node = %info.name, "removed a lost node");
    Ok(Json(info))
}
