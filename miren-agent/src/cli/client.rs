//! Typed calls to the agent's control API (`/v1/…`, see [`crate::api::types`]).

use std::{path::PathBuf, time::Duration};

use serde::{Serialize, de::DeserializeOwned};

use super::{
    error::CliError,
    http::{self, Method, encode_component as enc},
};
use crate::api::types::{
    AppDetail, AppSummary, BundleInfo, CertInfo, CertRequest, DeployRequest, ErrorBody, LogChunk,
    NodeInfo, NodePortInfo, PortsEditRequest, RouteImport, RouteImportRequest, RouteInfo,
    RouteRequest, ServiceEndpoints, Status,
};
use crate::bundle::BundleHash;

/// How long one read or write on the socket may block.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the answer to a bundle upload may take.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Which lines [`Client::logs`] asks for (the query of `GET /v1/apps/{app}/logs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogsRequest {
    /// Only this service's instances.
    pub service: Option<String>,
    /// The cursor of an earlier answer; empty: start as `tail` and `since` say.
    pub after: String,
    /// Start with the last N lines of the selected instances together.
    pub tail: Option<usize>,
    /// Start with the lines written during this last duration (e.g. `10m`).
    pub since: Option<String>,
    /// Stop before lines written after this log timestamp.
    pub until: Option<String>,
}

/// A client of the agent's API socket; every call opens a new connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the agent listening on `socket`, with [`DEFAULT_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The API socket this client talks to.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// `GET /v1/status`.
    ///
    /// # Errors
    /// Connection, protocol and agent-reported errors, see [`CliError`].
    pub fn status(&self) -> Result<Status, CliError> {
        self.call(Method::Get, "/v1/status", None::<&()>)
    }

    /// `GET /v1/apps`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn apps(&self) -> Result<Vec<AppSummary>, CliError> {
        self.call(Method::Get, "/v1/apps", None::<&()>)
    }

    /// `GET /v1/bundles/{sha256}`: the agent's copy of the bundle, `None` when it has none.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn bundle(&self, hash: &BundleHash) -> Result<Option<BundleInfo>, CliError> {
        match self.call(Method::Get, &format!("/v1/bundles/{hash}"), None::<&()>) {
            Ok(info) => Ok(Some(info)),
            Err(CliError::Agent { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `PUT /v1/bundles/{sha256}` with the tar of a packed app directory. The answer may take
    /// up to [`UPLOAD_TIMEOUT`] (the agent unpacks the bundle before it answers).
    ///
    /// # Errors
    /// See [`Client::status`]; a bundle over the agent's limit comes back as
    /// [`CliError::Agent`] with status 413 naming the limit.
    pub fn upload_bundle(&self, hash: &BundleHash, tar: &[u8]) -> Result<BundleInfo, CliError> {
        let path = format!("/v1/bundles/{hash}");
        let timeout = self.timeout.max(UPLOAD_TIMEOUT);
        let body = Some(("application/x-tar", tar));
        let response = http::request(&self.socket, timeout, Method::Put, &path, body)?;
        decode(Method::Put, &path, response)
    }

    /// `POST /v1/apps`: deploy an app.toml.
    ///
    /// # Errors
    /// See [`Client::status`]; an invalid config comes back as [`CliError::Agent`].
    pub fn deploy(&self, request: &DeployRequest) -> Result<AppDetail, CliError> {
        self.call(Method::Post, "/v1/apps", Some(request))
    }

    /// `GET /v1/apps/{name}`, with the values of secret environment variables masked unless
    /// `show_secrets`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn app(&self, name: &str, show_secrets: bool) -> Result<AppDetail, CliError> {
        let query = if show_secrets {
            "?show_secrets=true"
        } else {
            ""
        };
        self.call(
            Method::Get,
            &format!("/v1/apps/{}{query}", enc(name)),
            None::<&()>,
        )
    }

    /// `DELETE /v1/apps/{name}`: the removed app.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn remove_app(&self, name: &str) -> Result<AppDetail, CliError> {
        self.call(
            Method::Delete,
            &format!("/v1/apps/{}", enc(name)),
            None::<&()>,
        )
    }

    /// `GET /v1/routes`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn routes(&self) -> Result<Vec<RouteInfo>, CliError> {
        self.call(Method::Get, "/v1/routes", None::<&()>)
    }

    /// `PUT /v1/routes/{host}`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn set_route(&self, host: &str, request: &RouteRequest) -> Result<RouteInfo, CliError> {
        self.call(
            Method::Put,
            &format!("/v1/routes/{}", enc(host)),
            Some(request),
        )
    }

    /// `POST /v1/routes`: imports a route file, all or nothing.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn import_routes(&self, request: &RouteImportRequest) -> Result<RouteImport, CliError> {
        self.call(Method::Post, "/v1/routes", Some(request))
    }

    /// `DELETE /v1/routes/{host}`: the removed route.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn remove_route(&self, host: &str) -> Result<RouteInfo, CliError> {
        self.call(
            Method::Delete,
            &format!("/v1/routes/{}", enc(host)),
            None::<&()>,
        )
    }

    /// `GET /v1/nodes`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, CliError> {
        self.call(Method::Get, "/v1/nodes", None::<&()>)
    }

    /// `GET /v1/nodes/{name}`, or `DELETE` it with `remove`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn node(&self, name: &str, remove: bool) -> Result<NodeInfo, CliError> {
        let method = if remove { Method::Delete } else { Method::Get };
        self.call(method, &format!("/v1/nodes/{}", enc(name)), None::<&()>)
    }

    /// `POST /v1/nodes/{name}/ACTION` with `cordon`, `drain` or `uncordon`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn node_action(&self, name: &str, action: &str) -> Result<NodeInfo, CliError> {
        self.call(
            Method::Post,
            &format!("/v1/nodes/{}/{action}", enc(name)),
            None::<&()>,
        )
    }

    /// `GET /v1/certs`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn certs(&self) -> Result<Vec<CertInfo>, CliError> {
        self.call(Method::Get, "/v1/certs", None::<&()>)
    }

    /// `PUT /v1/certs/{host}`; a refused pair comes back as [`CliError::Agent`] naming the file.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn set_cert(&self, host: &str, request: &CertRequest) -> Result<CertInfo, CliError> {
        self.call(
            Method::Put,
            &format!("/v1/certs/{}", enc(host)),
            Some(request),
        )
    }

    /// `GET /v1/ports[?app=APP]`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn ports(&self, app: Option<&str>) -> Result<Vec<NodePortInfo>, CliError> {
        let path = match app {
            Some(app) => format!("/v1/ports?app={}", enc(app)),
            None => "/v1/ports".to_owned(),
        };
        self.call(Method::Get, &path, None::<&()>)
    }

    /// `POST /v1/apps/{app}/ports`: the app's node ports after the edit.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn edit_ports(
        &self,
        app: &str,
        request: &PortsEditRequest,
    ) -> Result<Vec<NodePortInfo>, CliError> {
        self.call(
            Method::Post,
            &format!("/v1/apps/{}/ports", enc(app)),
            Some(request),
        )
    }

    /// `GET /v1/apps/{app}/endpoints`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn endpoints(&self, app: &str) -> Result<Vec<ServiceEndpoints>, CliError> {
        self.call(
            Method::Get,
            &format!("/v1/apps/{}/endpoints", enc(app)),
            None::<&()>,
        )
    }

    /// `GET /v1/apps/{app}/logs`: the lines `request` selects, about 1 MiB at most (see
    /// [`LogChunk::more`]).
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn logs(&self, app: &str, request: &LogsRequest) -> Result<LogChunk, CliError> {
        let mut path = format!("/v1/apps/{}/logs?after={}", enc(app), enc(&request.after));
        let params = [
            ("service", request.service.clone()),
            ("tail", request.tail.map(|n| n.to_string())),
            ("since", request.since.clone()),
            ("until", request.until.clone()),
        ];
        for (name, value) in params {
            if let Some(value) = value {
                path.push_str(&format!("&{name}={}", enc(&value)));
            }
        }
        self.call(Method::Get, &path, None::<&()>)
    }

    /// `GET /v1/apps/{app}/services/{service}/endpoints`.
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn service_endpoints(
        &self,
        app: &str,
        service: &str,
    ) -> Result<ServiceEndpoints, CliError> {
        let path = format!("/v1/apps/{}/services/{}/endpoints", enc(app), enc(service));
        self.call(Method::Get, &path, None::<&()>)
    }

    /// `PUT /v1/apps/{app}/services/{service}/endpoints`: replace the endpoints an external
    /// orchestrator supplies (no `miren` command uses this; it is for orchestrators and tests).
    ///
    /// # Errors
    /// See [`Client::status`].
    pub fn set_endpoints(
        &self,
        app: &str,
        service: &str,
        endpoints: &ServiceEndpoints,
    ) -> Result<ServiceEndpoints, CliError> {
        let path = format!("/v1/apps/{}/services/{}/endpoints", enc(app), enc(service));
        self.call(Method::Put, &path, Some(endpoints))
    }

    /// Sends `body` as JSON and decodes the answer ([`decode`]).
    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CliError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(CliError::Encode)?;
        let body = body.as_deref().map(|bytes| ("application/json", bytes));
        let response = http::request(&self.socket, self.timeout, method, path, body)?;
        decode(method, path, response)
    }
}

/// Decodes a 2xx answer as `T`; a non-2xx answer becomes [`CliError::Agent`] (or
/// [`CliError::UnexpectedStatus`] without an [`ErrorBody`]).
fn decode<T: DeserializeOwned>(
    method: Method,
    path: &str,
    response: http::Response,
) -> Result<T, CliError> {
    if (200..300).contains(&response.status) {
        return serde_json::from_slice(&response.body).map_err(|source| CliError::Decode {
            method: method.as_str(),
            path: path.to_owned(),
            source,
        });
    }
    Err(match serde_json::from_slice::<ErrorBody>(&response.body) {
        Ok(ErrorBody { error, kind }) => CliError::Agent {
            status: response.status,
            message: error,
            kind,
        },
        Err(_) => CliError::UnexpectedStatus {
            method: method.as_str(),
            path: path.to_owned(),
            status: response.status,
            body: String::from_utf8_lossy(&response.body).trim().to_owned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, Read, Write},
        os::unix::net::UnixListener,
        path::Path,
        sync::atomic::{AtomicUsize, Ordering},
        thread,
    };

    use super::*;
    use crate::api::types::PublishSpec;

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("miren-cli-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Serves one connection on `socket` with `response` and returns the raw request.
    fn serve_once(socket: &Path, response: Vec<u8>) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(socket).expect("bind");
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut request = Vec::new();
            let mut buf = [0_u8; 1024];
            while !request_complete(&request) {
                let n = conn.read(&mut buf).expect("read request");
                assert_ne!(n, 0, "client closed early");
                request.extend_from_slice(&buf[..n]);
            }
            // Written in two parts to exercise reassembly.
            let (a, b) = response.split_at(response.len() / 2);
            conn.write_all(a).expect("write");
            conn.flush().expect("flush");
            thread::sleep(Duration::from_millis(20));
            conn.write_all(b).expect("write");
            String::from_utf8(request).expect("utf-8 request")
        })
    }

    fn request_complete(request: &[u8]) -> bool {
        let text = String::from_utf8_lossy(request);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= length
    }

    fn http_response(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn edit_ports_round_trip() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let body = r#"[{"node_port":27015,"protocol":"udp","app":"game","service":"server","port_name":"game","target_port":27015,"endpoints":["10.88.0.2:27015"],"status":"ok"}]"#;
        let server = serve_once(&socket, http_response("200 OK", body));
        let request = PortsEditRequest {
            service: "server".to_owned(),
            add: vec![PublishSpec {
                node_port: 27015,
                port: None,
                protocol: Some("udp".to_owned()),
            }],
            remove: vec![],
        };
        let ports = Client::new(&socket)
            .edit_ports("game", &request)
            .expect("edit ok");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].endpoints[0].to_string(), "10.88.0.2:27015");

        let raw = server.join().expect("server thread");
        let (head, sent) = raw.split_once("\r\n\r\n").expect("head");
        assert!(
            head.starts_with("POST /v1/apps/game/ports HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nHost: localhost"));
        assert!(head.contains("\r\nContent-Type: application/json"));
        let sent: PortsEditRequest = serde_json::from_str(sent).expect("json body");
        assert_eq!(sent, request);
    }

    #[test]
    fn chunked_answer_and_encoded_host() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let json = r#"{"host":"*.example.com","app":"web","service":"web"}"#;
        let (a, b) = json.split_at(10);
        let raw = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        let server = serve_once(&socket, raw.into_bytes());
        let route = Client::new(&socket)
            .remove_route("*.example.com")
            .expect("ok");
        assert_eq!(route.host, "*.example.com");
        let raw = server.join().expect("server thread");
        assert!(
            raw.starts_with("DELETE /v1/routes/%2A.example.com HTTP/1.1\r\n"),
            "{raw}"
        );
    }

    #[test]
    fn set_endpoints_puts_json() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let body = r#"{"service":"server","endpoints":{"game":["10.88.0.2:27015"]}}"#;
        let server = serve_once(&socket, http_response("200 OK", body));
        let endpoints: ServiceEndpoints = serde_json::from_str(body).expect("json");
        let answer = Client::new(&socket)
            .set_endpoints("game", "server", &endpoints)
            .expect("ok");
        assert_eq!(answer, endpoints);
        let raw = server.join().expect("server thread");
        assert!(
            raw.starts_with("PUT /v1/apps/game/services/server/endpoints HTTP/1.1\r\n"),
            "{raw}"
        );
        assert!(raw.ends_with(body), "{raw}");
    }

    #[test]
    fn agent_error_is_kept_verbatim() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let message = "error: node_port 7000/tcp is already published by app \"echo\" service \"echo\"\n --> ./.miren/app.toml:5:13";
        let body = serde_json::to_string(&ErrorBody {
            error: message.to_owned(),
            kind: "conflict".to_owned(),
        })
        .expect("json");
        let server = serve_once(&socket, http_response("409 Conflict", &body));
        let err = Client::new(&socket)
            .deploy(&DeployRequest {
                source_name: "./.miren/app.toml".to_owned(),
                toml: "name = \"x\"\n".to_owned(),
                bundle: None,
            })
            .expect_err("conflict");
        server.join().expect("server thread");
        assert!(
            matches!(&err, CliError::Agent { status: 409, kind, .. } if kind == "conflict"),
            "{err:?}"
        );
        assert_eq!(err.report(), message);
    }

    #[test]
    fn status_without_error_body() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let server = serve_once(&socket, http_response("404 Not Found", ""));
        let err = Client::new(&socket).status().expect_err("404");
        server.join().expect("server thread");
        assert_eq!(
            err.report(),
            "error: the miren agent answered GET /v1/status with HTTP 404: "
        );
    }

    #[test]
    fn query_is_encoded_and_bad_json_reported() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let server = serve_once(&socket, http_response("200 OK", "{}"));
        let err = Client::new(&socket)
            .ports(Some("a b"))
            .expect_err("bad json");
        let raw = server.join().expect("server thread");
        assert!(
            raw.starts_with("GET /v1/ports?app=a%20b HTTP/1.1\r\n"),
            "{raw}"
        );
        assert!(
            err.report()
                .starts_with("error: unexpected answer from the miren agent to GET /v1/ports?app=a%20b: invalid type"),
            "{}",
            err.report()
        );
    }

    #[test]
    fn missing_socket_and_refused_connection() {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let err = Client::new(&socket).status().expect_err("no socket");
        assert!(
            matches!(&err, CliError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(
            err.report()
                .contains("agent.sock: no such socket\n  is it running?")
        );

        // A socket file nobody listens on any more.
        drop(UnixListener::bind(&socket).expect("bind"));
        let err = Client::new(&socket).status().expect_err("refused");
        assert!(
            err.report().contains(
                "agent.sock: connection refused\n  is it running? start it with `miren-agent run`"
            ),
            "{}",
            err.report()
        );
    }
}
