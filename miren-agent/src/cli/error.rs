//! What can go wrong in `miren`, and how each problem is shown to the user.

use std::{io, path::PathBuf};

use crate::config::ConfigError;

/// An error of a `miren` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The agent's socket does not exist, refuses connections, or may not be opened.
    #[error("cannot reach the miren agent at {}: {}\n  {}", .socket.display(), connect_reason(.source), connect_hint(.source))]
    Connect {
        /// Socket path tried.
        socket: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// Sending the request or reading the response failed after connecting.
    #[error("talking to the miren agent at {}: {source}", .socket.display())]
    Io {
        /// Socket path.
        socket: PathBuf,
        /// The I/O error (a timeout shows as "timed out" / "would block").
        source: io::Error,
    },
    /// The agent's answer is not valid HTTP.
    #[error("malformed HTTP response from the miren agent: {0}")]
    Http(#[from] HttpError),
    /// The agent reported an error; `message` is its user-facing text.
    #[error("{message}")]
    Agent {
        /// HTTP status code.
        status: u16,
        /// The agent's message, printed verbatim.
        message: String,
        /// Machine-readable kind, e.g. `invalid_config` or `not_found`.
        kind: String,
    },
    /// A non-2xx answer without the agent's JSON error body (e.g. an API version mismatch).
    #[error("the miren agent answered {method} {path} with HTTP {status}: {body}")]
    UnexpectedStatus {
        /// Request method.
        method: &'static str,
        /// Request path.
        path: String,
        /// HTTP status code.
        status: u16,
        /// The response body (lossily decoded), possibly empty.
        body: String,
    },
    /// A 2xx answer whose JSON does not have the expected shape.
    #[error("unexpected answer from the miren agent to {method} {path}: {source}")]
    Decode {
        /// Request method.
        method: &'static str,
        /// Request path.
        path: String,
        /// What serde did not like.
        source: serde_json::Error,
    },
    /// No `.miren/app.toml` at the given place.
    #[error(
        "no app config at {}\n  create .miren/app.toml in the app directory, or pass the app directory (the one containing .miren/app.toml)",
        .path.display()
    )]
    MissingAppConfig {
        /// The file looked for.
        path: PathBuf,
    },
    /// The app config exists but cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    ReadAppConfig {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The route file of `miren route import` cannot be read.
    #[error("cannot read the route file {}: {source}", .path.display())]
    ReadRouteFile {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The route file of `miren route import` is over a limit.
    #[error(transparent)]
    RouteFile(#[from] crate::routes::ImportError),
    /// A certificate or key file given to `miren cert set` cannot be read.
    #[error("cannot read the {what} file {}: {source}", .path.display())]
    ReadPem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why reading failed (not UTF-8 shows as invalid data).
        source: io::Error,
    },
    /// The app directory cannot be packed into a bundle (too large, a symlink leaving it,
    /// unreadable files).
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    /// `miren validate` found problems (already rendered rustc-style).
    #[error("{0}")]
    InvalidConfig(#[from] ConfigError),
    /// `miren doctor` found checks that failed (already printed with what to do).
    #[error("{failed} doctor check(s) failed: the node is not ready for the agent")]
    Unhealthy {
        /// How many.
        failed: usize,
    },
    /// Encoding JSON for stdout failed.
    #[error("encoding JSON output: {0}")]
    Encode(#[source] serde_json::Error),
    /// Writing to stdout failed.
    #[error("writing output: {0}")]
    Stdout(#[source] io::Error),
}

impl CliError {
    /// The text to print on stderr: agent-reported and config errors verbatim (config
    /// diagnostics carry their own `error:` lines), everything else prefixed with `error: `.
    pub fn report(&self) -> String {
        match self {
            Self::Agent { message, .. } if message.starts_with("error") => message.clone(),
            Self::Agent { message, .. } => format!("error: {message}"),
            Self::InvalidConfig(err) => err.to_string(),
            other => format!("error: {other}"),
        }
    }
}

/// A response from the agent that is not valid HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The connection closed before a complete response arrived.
    #[error("the connection closed before the response was complete")]
    Truncated,
    /// The status line is not `HTTP/1.x CODE REASON`.
    #[error("bad status line {0:?}")]
    StatusLine(String),
    /// A header line has no `:` or is not UTF-8.
    #[error("bad header line {0:?}")]
    Header(String),
    /// `Content-Length` is not a number.
    #[error("bad Content-Length {0:?}")]
    ContentLength(String),
    /// A chunk of a chunked body is malformed.
    #[error("bad chunk in chunked body: {0}")]
    Chunk(&'static str),
}

fn connect_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "no such socket".to_owned(),
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => err.to_string(),
    }
}

fn connect_hint(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::PermissionDenied {
        "the API socket is accessible only to its owner; run miren as that user (usually root)"
    } else {
        "is it running? start it with `miren-agent run`, or point --socket / MIREN_SOCKET at its API socket"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_say_what_to_do() {
        let err = CliError::Connect {
            socket: PathBuf::from("/run/miren/agent.sock"),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(
            err.report(),
            "error: cannot reach the miren agent at /run/miren/agent.sock: connection refused\n  is it running? start it with `miren-agent run`, or point --socket / MIREN_SOCKET at its API socket"
        );
        let err = CliError::Connect {
            socket: PathBuf::from("/s"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(
            err.report()
                .contains("/s: permission denied\n  the API socket")
        );
    }

    #[test]
    fn agent_errors_are_verbatim() {
        let message = "error: node_port 7000/tcp is already published\n --> a.toml:3:1".to_owned();
        let err = CliError::Agent {
            status: 409,
            message: message.clone(),
            kind: "conflict".to_owned(),
        };
        assert_eq!(err.report(), message);
    }
}
