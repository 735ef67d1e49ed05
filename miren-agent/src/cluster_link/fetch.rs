//! Fetching what this node lacks from the other agents of the cluster: the code bundles of
//! the deployed apps, verified against their hash before they are kept.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{AUTHORIZATION, AbortOnDrop, ClusterLinkError, ClusterToken};
use crate::{
    api::types::NodePortInfo,
    bundle::{BundleHash, BundleStore, BundleUsers as _},
    control::{ControlPlane, Peer},
    settings::ClusterTlsFiles,
};

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one bundle download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// How often missing bundles are looked for again without a change.
const RETRY: Duration = Duration::from_secs(5);
/// How long a peer gets to send its node-port counters.
pub const PORTS_TIMEOUT: Duration = Duration::from_secs(2);

/// A peer's answer (status 200) and the task driving its connection until the body is read.
type Answer = (
    hyper::Response<hyper::body::Incoming>,
    tokio::task::JoinHandle<()>,
);

/// A client of the other agents' cluster listeners.
#[derive(Clone)]
pub struct PeerClient {
    token: ClusterToken,
    /// With the cluster's TLS: verifies the peers and presents this node's certificate.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("token", &self.token)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl PeerClient {
    /// A client presenting `token`; with `tls`, over mutual TLS (each peer's certificate must
    /// be signed by the cluster's CA and name the peer's IP address).
    ///
    /// # Errors
    /// [`ClusterLinkError::Tls`] when a TLS file is unusable.
    pub fn new(
        token: ClusterToken,
        tls: Option<&ClusterTlsFiles>,
    ) -> Result<Self, ClusterLinkError> {
        Ok(Self {
            token,
            tls: tls
                .map(super::tls::client_config)
                .transpose()?
                .map(tokio_rustls::TlsConnector::from),
        })
    }

    /// Downloads bundle `hash` from `peer` into `bundles` (verified and unpacked there).
    ///
    /// # Errors
    /// [`ClusterLinkError::Peer`] when the peer cannot be reached, does not have it, or sends
    /// something else.
    pub async fn fetch_bundle(
        &self,
        peer: &Peer,
        hash: &BundleHash,
        bundles: &Arc<BundleStore>,
    ) -> Result<(), ClusterLinkError> {
        let addr = peer.cluster_addr.ok_or_else(|| ClusterLinkError::Peer {
            peer: peer.name.clone(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            what: format!("bundle {}", hash.short()),
            problem: "it has no cluster listener".into(),
        })?;
        let fail = |problem: String| ClusterLinkError::Peer {
            peer: peer.name.clone(),
            addr,
            what: format!("bundle {}", hash.short()),
            problem,
        };
        let download = async {
            let (response, driver) = self
                .get(addr, &format!("/cluster/v1/bundles/{}", hash.as_str()))
                .await
                .map_err(&fail)?;
            let _driver = AbortOnDrop(driver);
            let mut incoming = bundles
                .receive(hash.clone())
                .map_err(|e| fail(e.to_string()))?;
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| fail(e.to_string()))?;
                if let Some(chunk) = frame.data_ref() {
                    incoming.write(chunk).map_err(|e| fail(e.to_string()))?;
                }
            }
            let bundles = Arc::clone(bundles);
            tokio::task::spawn_blocking(move || bundles.put_verified(incoming))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(e.to_string()))
        };
        tokio::time::timeout(FETCH_TIMEOUT, download)
            .await
            .map_err(|_| fail("the download took longer than 5 minutes".into()))?
            .map(drop)
    }

    /// `peer`'s node ports with its own counters.
    ///
    /// # Errors
    /// [`ClusterLinkError::Peer`] when the peer cannot be reached in [`PORTS_TIMEOUT`] or
    /// answers something else.
    pub async fn ports(&self, peer: &Peer) -> Result<Vec<NodePortInfo>, ClusterLinkError> {
        let addr = peer
            .cluster_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let fail = |problem: String| ClusterLinkError::Peer {
            peer: peer.name.clone(),
            addr,
            what: "its node-port counters".into(),
            problem,
        };
        if peer.cluster_addr.is_none() {
            return Err(fail("it has no cluster listener".into()));
        }
        let fetch = async {
            let (response, driver) = self.get(addr, "/cluster/v1/ports").await.map_err(&fail)?;
            let _driver = AbortOnDrop(driver);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| fail(e.to_string()))
        };
        tokio::time::timeout(PORTS_TIMEOUT, fetch)
            .await
            .map_err(|_| fail(format!("no answer within {} s", PORTS_TIMEOUT.as_secs())))?
    }

    /// Sends `GET path` with the token to `addr` (over TLS when the cluster has it); an answer
    /// other than 200 is an error. The returned task drives the connection until the body is
    /// read.
    async fn get(&self, addr: SocketAddr, path: &str) -> Result<Answer, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| "no connection within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let Some(connector) = &self.tls else {
            return self.send(stream, addr, path).await;
        };
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connector.connect(ServerName::IpAddress(addr.ip().into()), stream),
        )
        .await
        .map_err(|_| "no TLS handshake within 5 s".to_owned())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
        self.send(stream, addr, path).await
    }

    /// Sends `GET path` with the token over the connection `io` to `addr`.
    async fn send(
        &self,
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        addr: SocketAddr,
        path: &str,
    ) -> Result<Answer, String> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = hyper::Request::get(path)
            .header("host", addr.to_string())
            .header(AUTHORIZATION, self.token.header())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != hyper::StatusCode::OK {
            driver.abort();
            return Err(format!("it answered {}", response.status()));
        }
        Ok((response, driver))
    }
}

/// Keeps every deployed app's bundle on this node: after every change of the desired state
/// and every [`RETRY`], each missing bundle is fetched from the first peer that has it.
/// Runs until aborted.
pub async fn follow_bundles(
    control: Arc<ControlPlane>,
    bundles: Arc<BundleStore>,
    client: PeerClient,
) {
    let mut revisions = control.subscribe();
    loop {
        let missing: Vec<BundleHash> = control
            .bundles_in_use()
            .into_iter()
            .filter(|hash| bundles.path(hash).is_none())
            .collect();
        for hash in missing {
            let mut problems = Vec::new();
            let mut fetched = false;
            for peer in control.peers() {
                match client.fetch_bundle(&peer, &hash, &bundles).await {
                    Ok(()) => {
                        tracing::info!(bundle = hash.short(), peer = %peer.name, "fetched an app's code bundle");
                        fetched = true;
                        break;
                    }
                    Err(error) => problems.push(error.to_string()),
                }
            }
            if !fetched {
                tracing::warn!(bundle = hash.short(), problems = ?problems, "no peer could send an app's code bundle; retrying");
            }
        }
        let _ = tokio::time::timeout(RETRY, revisions.changed()).await;
    }
}
