//! The cluster listener (`--cluster-addr`): what the agents of a cluster ask each other for
//! — app code bundles a node lacks, each node's node-port counters (`miren ports` on any node
//! sums them). Every request carries the
//! cluster's shared token (`--cluster-token-file`, mode 0600); without it nothing is served
//! (401, logged). With `--cluster-ca/--cluster-cert/--cluster-key` the listener speaks mutual
//! TLS only (the token is still required inside it).

mod fetch;
mod server;
mod tls;

pub use fetch::{PeerClient, follow_bundles};
pub use server::serve;

/// This node's own node-port counters, which the other nodes' `miren ports` add up.
#[async_trait::async_trait]
pub trait LocalPorts: Send + Sync + std::fmt::Debug {
    /// The node ports with this node's traffic filled in.
    async fn local_ports(&self) -> Vec<crate::api::types::NodePortInfo>;
}

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// The HTTP header carrying the token: `Authorization: Bearer TOKEN`.
const AUTHORIZATION: &str = "authorization";
/// Shortest token accepted.
const MIN_TOKEN_BYTES: usize = 16;

/// Errors of the cluster listener and its clients.
#[derive(Debug, thiserror::Error)]
pub enum ClusterLinkError {
    /// The token file is unusable; the message says what to do.
    #[error("cluster token file {path}: {problem}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The listener could not be bound.
    #[error("cannot listen for the cluster on {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of the cluster's TLS is unusable; the message says what to do.
    #[error("cluster TLS file {path}: {problem}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A request to a peer failed.
    #[error("asking node {peer} ({addr}) for {what}: {problem}")]
    Peer {
        /// Peer node.
        peer: String,
        /// Its cluster listener.
        addr: std::net::SocketAddr,
        /// What was asked for.
        what: String,
        /// What went wrong.
        problem: String,
    },
}

/// The cluster's shared secret.
#[derive(Clone)]
pub struct ClusterToken(String);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(…)")
    }
}

impl ClusterToken {
    /// Reads the token from `path`, which must be a regular file only its owner may read or
    /// write (mode 0600 or stricter) holding at least [`MIN_TOKEN_BYTES`] bytes.
    ///
    /// # Errors
    /// [`ClusterLinkError::Token`] saying what to fix.
    pub fn load(path: &Path) -> Result<Self, ClusterLinkError> {
        let problem = |problem: String| ClusterLinkError::Token {
            path: path.to_owned(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(problem("is not a regular file".into()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(problem(format!(
                "has mode {mode:03o}, so others may read the cluster's secret; make it private with `chmod 600 {}`",
                path.display()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_BYTES || token.contains(char::is_whitespace) {
            return Err(problem(format!(
                "must hold one secret of at least {MIN_TOKEN_BYTES} characters without spaces, e.g. from `head -c 32 /dev/urandom | base64`"
            )));
        }
        Ok(Self(token.to_owned()))
    }

    /// Whether an `Authorization` header value presents this token (compared in constant
    /// time).
    fn admits(&self, header: Option<&str>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let (a, b) = (presented.as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The `Authorization` header value presenting this token.
    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_readable_by_others_is_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("miren-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterToken::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("has mode 644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = ClusterToken::load(&file).unwrap();
        assert!(token.admits(Some("Bearer 0123456789abcdef0123")));
        assert!(!token.admits(Some("Bearer 0123456789abcdef0124")));
        assert!(!token.admits(Some("0123456789abcdef0123")));
        assert!(!token.admits(None));
        std::fs::write(&file, "short").unwrap();
        let err = ClusterToken::load(&file).unwrap_err().to_string();
        assert!(err.contains("at least 16 characters"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
