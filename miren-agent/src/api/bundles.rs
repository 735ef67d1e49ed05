//! `/v1/bundles/{sha256}`: app code bundles (`miren deploy` uploads the app directory before
//! it deploys). `PUT` streams the raw tar into the [`BundleStore`] — the size limit is
//! enforced while reading (and from `Content-Length` before), the hash checked at the end —;
//! `GET`/`HEAD` say whether the agent has a bundle, so the CLI uploads only what is missing.
//! The route reads its body itself, so the JSON endpoints' body limit does not apply to it.

use std::{future::poll_fn, pin::Pin, sync::Arc};

use axum::{
    Json, Router,
    body::{Bytes, HttpBody as _},
    extract::{Path as UrlPath, Request, State},
    http::{StatusCode, header::CONTENT_LENGTH},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{ApiState, error_response, types::BundleInfo};
use crate::{
    bundle::{BundleError, BundleHash, BundleStore},
    control::ControlError,
};

/// Chunks of an upload waiting to be written.
const QUEUED_CHUNKS: usize = 8;

/// The bundle routes.
pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/bundles/{sha256}", get(bundle).put(upload))
}

/// Why a bundle request failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum BundleApiError {
    /// The agent does not have the bundle.
    #[error(
        "this agent has no bundle {0}; upload it first with PUT /v1/bundles/{0} (`miren deploy` does)"
    )]
    NotFound(BundleHash),
    /// Refused or failed in the store.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The request body could not be read.
    #[error("reading the uploaded bundle failed: {0}")]
    Body(axum::Error),
}

impl IntoResponse for BundleApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Bundle(BundleError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            }
            Self::Bundle(e) if e.is_client_error() => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Body(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Bundle(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        error_response(status, kind, &self)
    }
}

/// Whether the agent has bundle `hash` (and keeps it for a deploy naming it, see
/// [`BundleStore::keep`]): its size.
///
/// # Errors
/// [`BundleApiError::NotFound`] when it is missing.
async fn present(
    bundles: &Arc<BundleStore>,
    hash: &BundleHash,
) -> Result<BundleInfo, BundleApiError> {
    let (store, wanted) = (Arc::clone(bundles), hash.clone());
    let size = tokio::task::spawn_blocking(move || {
        store
            .keep(&wanted)
            .then(|| store.blob(&wanted))
            .flatten()
            .and_then(|blob| std::fs::metadata(blob).ok())
            .map(|meta| meta.len())
    })
    .await
    .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
    match size {
        Some(size) => Ok(BundleInfo {
            sha256: hash.to_string(),
            size,
        }),
        None => Err(BundleApiError::NotFound(hash.clone())),
    }
}

/// The bundle a deploy names, which the agent must have (it is then kept for the deploy).
///
/// # Errors
/// [`ControlError::BadRequest`] for a text that is not a SHA-256 and for a bundle the agent
/// does not have ("upload it first").
pub(super) async fn for_deploy(
    bundles: &Arc<BundleStore>,
    text: &str,
) -> Result<BundleHash, ControlError> {
    let hash: BundleHash = text
        .parse()
        .map_err(|e: BundleError| ControlError::BadRequest(format!("bundle: {e}")))?;
    present(bundles, &hash)
        .await
        .map_err(|e| ControlError::BadRequest(e.to_string()))?;
    Ok(hash)
}

async fn bundle(
    State(state): State<Arc<ApiState>>,
    UrlPath(hash): UrlPath<String>,
) -> Result<Json<BundleInfo>, BundleApiError> {
    let hash: BundleHash = hash.parse()?;
    Ok(Json(present(&state.bundles, &hash).await?))
}

async fn upload(
    State(state): State<Arc<ApiState>>,
    UrlPath(hash): UrlPath<String>,
    request: Request,
) -> Result<Json<BundleInfo>, BundleApiError> {
    let hash: BundleHash = hash.parse()?;
    let limit = state.bundles.max_bytes();
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit) {
        return Err(BundleError::TooLarge { limit }.into());
    }
    if let Ok(info) = present(&state.bundles, &hash).await {
        return Ok(Json(info));
    }
    // The bytes go to the store on a blocking thread as they arrive.
    let (chunks, mut queue) = tokio::sync::mpsc::channel::<Bytes>(QUEUED_CHUNKS);
    let store = Arc::clone(&state.bundles);
    let expected = hash.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut incoming = store.receive(expected)?;
        while let Some(chunk) = queue.blocking_recv() {
            incoming.write(&chunk)?;
        }
        store.put_verified(incoming)
    });
    let mut body = request.into_body();
    let mut failed = None;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        match frame {
            Ok(frame) => {
                // A send fails once the writer stopped (too large, or a write failed).
                if let Ok(data) = frame.into_data()
                    && chunks.send(data).await.is_err()
                {
                    break;
                }
            }
            Err(error) => {
                failed = Some(error);
                break;
            }
        }
    }
    drop(chunks);
    let stored = match writer.await {
        Ok(stored) => stored,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };
    if let Some(error) = failed {
        return Err(BundleApiError::Body(error));
    }
    stored?;
    tracing::info!(bundle = %hash, "received an app code bundle");
    Ok(Json(present(&state.bundles, &hash).await?))
}
