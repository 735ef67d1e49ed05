//! The ingress's application on each listener: HTTP/1 requests go through our own proxy loop,
//! HTTP/2 streams (h2 over TLS, h2c) through Pingora's proxy ([`super::proxy`]).
//!
//! The HTTP/1 loop, per request on a client connection: read the head (Pingora's server
//! session), decide with [`IngressState::admit`], take an idle upstream connection of this
//! thread ([`upstream_pool`]) or connect, write the request head (Pingora's client session),
//! stream the request body while watching for an early response, relay the response head and
//! stream its body, then give both connections back for keep-alive. All of it sequential in
//! the connection's task: no channels, joined futures or tasks per request. An upgrade (101)
//! turns into a two-way copy. A failed connect is retried once on another instance; a reused
//! connection that turns out closed before anything of the response came is retried on a new
//! one when nothing of the request body was consumed yet.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use http::{Method, StatusCode, Version, header};
use pingora::{
    Error, ErrorType,
    apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream},
    connectors::TransportConnector,
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    protocols::http::{
        ServerSession,
        v1::{client::HttpSession as UpstreamSession, server::HttpSession as ClientSession},
    },
    proxy::HttpProxy,
    server::ShutdownWatch,
};
use tokio::sync::Notify;

use super::{
    IngressState,
    head_guard::guard_of,
    proxy::MirenProxy,
    request::{Admission, Finished, Reply, upstream_failure, upstream_timeout},
    routing::{Backend, Route},
    upstream_pool,
};

/// How long a connection to an instance may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Hop-by-hop request headers an upstream request never carries (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The application of one listener (plain HTTP or TLS).
pub struct IngressApp {
    state: Arc<IngressState>,
    tls: bool,
    /// HTTP/2 streams are served by Pingora's proxy.
    h2: Arc<HttpProxy<MirenProxy>>,
    connector: TransportConnector,
    options: HttpServerOptions,
    stopping: AtomicBool,
    stopped: Notify,
}

impl std::fmt::Debug for IngressApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressApp")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl IngressApp {
    /// The application of the HTTP (`tls == false`, with h2c) or HTTPS listener.
    pub fn new(state: Arc<IngressState>, tls: bool, h2: HttpProxy<MirenProxy>) -> Self {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        Self {
            state,
            tls,
            h2: Arc::new(h2),
            connector: TransportConnector::new(None),
            options,
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
        }
    }

    /// Resolves once [`HttpServerApp::http_cleanup`] was called.
    async fn stop_requested(&self) {
        let notified = self.stopped.notified();
        if !self.stopping.load(Ordering::Acquire) {
            notified.await;
        }
    }

    /// Serves one HTTP/1 request; the connection back when it can take another.
    async fn serve(
        &self,
        mut client: ClientSession,
        persistent: HttpPersistentSettings,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let read = tokio::select! {
            biased;
            read = client.read_request() => read,
            () = self.stop_requested() => return None,
        };
        match read {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(error) => {
                if matches!(error.etype(), ErrorType::InvalidHTTPHeader) {
                    let reply = Reply::new(400, "bad request\n".to_owned());
                    let _ = write_reply(&mut client, &reply, "-").await;
                }
                client.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() || self.stopping.load(Ordering::Acquire) {
            client.set_server_keepalive(None);
        }
        let started = Instant::now();
        let peer = client
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let raw_head = client.get_headers_raw_bytes();
        let admission = self
            .state
            .admit(self.tls, client.req_header(), Some(&raw_head), peer)
            .await;
        let mut request = Request {
            started,
            peer,
            admission,
            upstream: None,
            error: None,
        };
        let reply = match (&request.admission.reply, &request.admission.route) {
            _ if client.req_header().method == Method::CONNECT => {
                Some(Reply::new(405, "CONNECT is not supported\n".to_owned()))
            }
            (Some(_), _) => request.admission.reply.take(),
            (None, None) => Some(Reply::new(503, "no route\n".to_owned())),
            (None, Some(route)) => {
                let route = Arc::clone(route);
                self.forward(&mut client, &route, &mut request).await
            }
        };
        if let Some(reply) = reply {
            if reply.closes_connection() || client.req_header().method == Method::CONNECT {
                client.set_server_keepalive(None);
            }
            if client.response_written().is_none() {
                if let Err(error) =
                    write_reply(&mut client, &reply, &request.admission.request_id).await
                {
                    request.error.get_or_insert(error);
                }
            } else {
                // A response is already under way: the connection cannot carry another.
                client.set_server_keepalive(None);
            }
        }
        self.finish(&client, &request);
        match client.reuse().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, persistent)),
            _ => None,
        }
    }

    /// Counts the request and writes its access log line.
    fn finish(&self, client: &ClientSession, request: &Request) {
        let client_addr = client.client_addr();
        self.state.finish(&Finished {
            started: request.started,
            request_id: &request.admission.request_id,
            client: client_addr.map(|a| a as &dyn std::fmt::Display),
            request: client.req_header(),
            host: &request.admission.host,
            status: client.response_written().map_or(0, |r| r.status.as_u16()),
            route: request.admission.route.as_deref(),
            upstream: request.upstream.map(|b| b.addr),
            bytes_in: client.body_bytes_read(),
            bytes_out: client.body_bytes_sent(),
            error: request.error.as_ref().map(|e| e as &dyn std::fmt::Display),
        });
    }

    /// Sends the request to an instance of `route` and relays the answer; the reply to write
    /// when the ingress answers instead (no instance reachable, a failure before the response).
    async fn forward(
        &self,
        client: &mut ClientSession,
        route: &Route,
        request: &mut Request,
    ) -> Option<Reply> {
        let upgrade = client.is_upgrade_req();
        if upgrade {
            // A websocket may stay idle for long; the route timeout is for responses.
            client.set_read_timeout(None);
        }
        let timeout = upstream_timeout(route, upgrade);
        let upstreams = &route.upstreams;
        let mut failed = None;
        let mut connect_retried = false;
        let mut stale_retried = false;
        loop {
            let Some(backend) = upstreams.pick(failed) else {
                return Some(Reply::new(
                    503,
                    "the service lost its endpoints\n".to_owned(),
                ));
            };
            request.upstream = Some(backend);
            let (stream, reused) = match upstream_pool::take(backend.pool_key) {
                Some(stream) => (stream, true),
                None => match self.connect(&backend).await {
                    Ok(stream) => (stream, false),
                    Err(error) => {
                        upstreams
                            .metrics
                            .observe_upstream_error(crate::metrics::UpstreamError::Connect);
                        if !connect_retried && upstreams.backends.len() > 1 {
                            tracing::debug!(%error, "connect failed; retrying another endpoint");
                            connect_retried = true;
                            failed = Some(backend.addr);
                            continue;
                        }
                        let reply = upstream_failure(&error, Some(route));
                        request.error = Some(error);
                        return Some(reply);
                    }
                },
            };
            let _counted = upstreams.count_to(&backend);
            let mut upstream = UpstreamSession::new(stream);
            upstream.read_timeout = timeout;
            upstream.write_timeout = timeout;
            let head = match self.upstream_request(client, request) {
                Ok(head) => head,
                Err(error) => {
                    request.error = Some(error);
                    return Some(Reply::new(400, "bad request\n".to_owned()));
                }
            };
            let relayed = relay(
                client,
                &mut upstream,
                head,
                self.state.settings.max_body_bytes,
                &request.admission.request_id,
            )
            .await;
            match relayed {
                Ok(request_sent) => {
                    upstream.respect_keepalive();
                    // A request body cut short by an early response leaves the connection
                    // in the middle of a request.
                    if request_sent && let Some(stream) = upstream.reuse().await {
                        upstream_pool::put(backend.pool_key, stream);
                    }
                    return None;
                }
                Err(Failed::Stale(error)) if reused && !stale_retried => {
                    tracing::debug!(%error, "an idle upstream connection was closed; reconnecting");
                    stale_retried = true;
                }
                Err(Failed::Stale(error) | Failed::Upstream(error)) => {
                    let reply = upstream_failure(&error, Some(route));
                    request.error = Some(error);
                    return Some(reply);
                }
                Err(Failed::TooLarge) => {
                    return Some(Reply::new(
                        413,
                        format!(
                            "request body larger than {} bytes\n",
                            self.state.settings.max_body_bytes
                        ),
                    ));
                }
                Err(Failed::Client(error)) => {
                    client.set_server_keepalive(None);
                    request.error = Some(error);
                    return None;
                }
            }
        }
    }

    /// A new connection to `backend`.
    async fn connect(&self, backend: &Backend) -> pingora::Result<pingora::protocols::Stream> {
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        self.connector.new_stream(&peer).await
    }

    /// The request head the instance gets: the client's, without hop-by-hop headers (a
    /// websocket upgrade keeps its two), framed for a body, with the forwarding headers.
    fn upstream_request(
        &self,
        client: &mut ClientSession,
        request: &Request,
    ) -> pingora::Result<Box<RequestHeader>> {
        let has_body = !client.is_body_done();
        let websocket = is_websocket_upgrade(client.req_header());
        let mut head = Box::new(client.req_header().clone());
        remove_hop_by_hop(&mut head)?;
        if websocket {
            head.insert_header(header::CONNECTION, "Upgrade")?;
            head.insert_header(header::UPGRADE, "websocket")?;
        }
        if has_body && !head.headers.contains_key(header::CONTENT_LENGTH) {
            head.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        head.set_version(Version::HTTP_11);
        self.state.forward_headers(
            &mut head,
            request.peer,
            self.tls,
            &request.admission.host,
            &request.admission.request_id,
        )?;
        Ok(head)
    }
}

/// One request in the loop.
struct Request {
    started: Instant,
    peer: Option<IpAddr>,
    admission: Admission,
    upstream: Option<Backend>,
    error: Option<Box<Error>>,
}

/// Why relaying a request failed.
enum Failed {
    /// The upstream connection ended before any of the response and before any of the
    /// request body was consumed: a closed idle connection, safe to retry on a new one.
    Stale(Box<Error>),
    /// The instance failed (connect, reset, timeout, malformed response).
    Upstream(Box<Error>),
    /// The client failed or went away.
    Client(Box<Error>),
    /// The request body outgrew the limit.
    TooLarge,
}

/// Sends `head` and the client's body to the instance and relays its response, with the
/// ingress's `request_id`; true when the whole request went out (false: the instance
/// answered before the body was complete).
async fn relay(
    client: &mut ClientSession,
    upstream: &mut UpstreamSession,
    head: Box<RequestHeader>,
    max_body: u64,
    request_id: &str,
) -> Result<bool, Failed> {
    let body_pending = !client.is_body_done();
    upstream.write_request_header(head).await.map_err(|e| {
        if body_pending {
            Failed::Upstream(e)
        } else {
            Failed::Stale(e)
        }
    })?;
    let mut response_started = false;
    if body_pending {
        response_started = send_body(client, upstream, max_body).await?;
    }
    if !response_started {
        read_response_head(client, upstream, client.body_bytes_read() == 0).await?;
    }
    let mut response = response_head(upstream)?;
    prepare_response(&mut response, client.req_header());
    response
        .insert_header("x-request-id", request_id)
        .map_err(Failed::Upstream)?;
    client
        .write_response_header(response)
        .await
        .map_err(Failed::Client)?;
    let upgraded = upstream.was_upgraded() && client.was_upgraded();
    if upgraded {
        upstream.maybe_upgrade_body_writer();
    }
    duplex(client, upstream, upgraded, max_body).await
}

/// Relays the response body to the client while the rest of the request body, if any, goes
/// to the instance (an instance may answer before it read the whole request, and stream
/// both ways), until the response ends; for an upgraded connection, bytes both ways until
/// either side ends. True when the request body ended too (the upstream connection then
/// sits between two requests).
async fn duplex(
    client: &mut ClientSession,
    upstream: &mut UpstreamSession,
    upgraded: bool,
    max_body: u64,
) -> Result<bool, Failed> {
    let mut request_done = !upgraded && client.is_body_done();
    loop {
        tokio::select! {
            from_upstream = upstream.read_body_ref() => {
                match from_upstream.map_err(Failed::Upstream)? {
                    // An empty piece (a chunk's size line alone) written chunked would end
                    // the body.
                    Some([]) => {}
                    Some(data) => client.write_body(data).await.map(drop).map_err(Failed::Client)?,
                    None => {
                        client.finish_body().await.map_err(Failed::Client)?;
                        return Ok(request_done);
                    }
                }
            }
            from_client = client.read_body_bytes(), if !request_done => {
                match from_client.map_err(Failed::Client)? {
                    Some(data) if data.is_empty() => {}
                    Some(data) => {
                        if !upgraded && client.body_bytes_read() as u64 > max_body {
                            return Err(Failed::TooLarge);
                        }
                        upstream.write_body(&data).await.map_err(Failed::Upstream)?;
                    }
                    None => {
                        upstream.finish_body().await.map_err(Failed::Upstream)?;
                        if upgraded {
                            return Ok(false);
                        }
                        request_done = true;
                    }
                }
            }
        }
    }
}

/// Streams the client's request body to the instance until it ends or the instance answers
/// early; true when a final response head arrived first.
async fn send_body(
    client: &mut ClientSession,
    upstream: &mut UpstreamSession,
    max_body: u64,
) -> Result<bool, Failed> {
    loop {
        tokio::select! {
            biased;
            read = upstream.read_response() => {
                read.map_err(Failed::Upstream)?;
                if !forward_informational(client, upstream).await? {
                    return Ok(true);
                }
            }
            body = client.read_body_bytes() => {
                match body.map_err(Failed::Client)? {
                    Some(data) if data.is_empty() => {}
                    Some(data) => {
                        if client.body_bytes_read() as u64 > max_body {
                            return Err(Failed::TooLarge);
                        }
                        upstream.write_body(&data).await.map_err(Failed::Upstream)?;
                    }
                    None => {
                        upstream.finish_body().await.map_err(Failed::Upstream)?;
                        return Ok(false);
                    }
                }
            }
        }
    }
}

/// Reads the instance's response head, relaying informational ones (`100 Continue`); when
/// the connection ends before any response byte and `retryable`, the failure is
/// [`Failed::Stale`].
async fn read_response_head(
    client: &mut ClientSession,
    upstream: &mut UpstreamSession,
    retryable: bool,
) -> Result<(), Failed> {
    let mut first = true;
    loop {
        if let Err(error) = upstream.read_response().await {
            let nothing_came = first
                && matches!(
                    error.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError
                );
            return Err(if retryable && nothing_came {
                Failed::Stale(error)
            } else {
                Failed::Upstream(error)
            });
        }
        first = false;
        if !forward_informational(client, upstream).await? {
            return Ok(());
        }
    }
}

/// Relays the response head just read when it is informational (1xx other than 101); true
/// when it was.
async fn forward_informational(
    client: &mut ClientSession,
    upstream: &mut UpstreamSession,
) -> Result<bool, Failed> {
    let Some(status) = upstream.get_status() else {
        return Ok(false);
    };
    if !status.is_informational() || status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(false);
    }
    let head = response_head(upstream)?;
    client
        .write_response_header(head)
        .await
        .map_err(Failed::Client)?;
    Ok(true)
}

/// A copy of the response head just read.
fn response_head(upstream: &UpstreamSession) -> Result<Box<ResponseHeader>, Failed> {
    upstream
        .resp_header()
        .map(|head| Box::new(head.clone()))
        .ok_or_else(|| {
            Failed::Upstream(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "no response head",
            ))
        })
}

/// Makes the instance's response head fit the client connection: no `Keep-Alive` (the
/// client connection has its own), and a body without length (ended by the instance closing)
/// sent chunked so the client connection survives it.
fn prepare_response(response: &mut ResponseHeader, request: &RequestHeader) {
    response.remove_header(&header::HeaderName::from_static("keep-alive"));
    let no_body = request.method == Method::HEAD
        || matches!(response.status.as_u16(), 101 | 204 | 304)
        || response.status.is_informational();
    if !no_body
        && !response.headers.contains_key(header::TRANSFER_ENCODING)
        && !response.headers.contains_key(header::CONTENT_LENGTH)
    {
        response.set_version(Version::HTTP_11);
        let _ = response.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
fn remove_hop_by_hop(head: &mut RequestHeader) -> pingora::Result<()> {
    // Most requests carry none: one pass over the names instead of a removal per name.
    if !head
        .headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(&name.as_str()))
    {
        return Ok(());
    }
    let named: Vec<String> = head
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        // Names the client made up that are not header names cannot be present either.
        if let Ok(name) = header::HeaderName::from_bytes(name.as_bytes())
            && !is_end_to_end(&name)
        {
            head.remove_header(&name);
        }
    }
    Ok(())
}

/// Headers a `Connection` list may not remove: those the ingress's own routing and framing
/// rely on.
fn is_end_to_end(name: &header::HeaderName) -> bool {
    matches!(
        *name,
        header::HOST | header::CONTENT_LENGTH | header::CONTENT_TYPE
    )
}

/// A valid websocket upgrade: HTTP/1.1 GET with `Upgrade: websocket` named by `Connection`.
fn is_websocket_upgrade(head: &RequestHeader) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        head.headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|list| {
                list.split(',')
                    .any(|item| item.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    head.version == Version::HTTP_11
        && head.method == Method::GET
        && has_token(header::UPGRADE, "websocket")
        && has_token(header::CONNECTION, "upgrade")
}

/// Writes an answer of the ingress's own.
async fn write_reply(
    client: &mut ClientSession,
    reply: &Reply,
    request_id: &str,
) -> pingora::Result<()> {
    client
        .write_response_header(Box::new(reply.header(request_id)?))
        .await?;
    client.write_body(reply.body.as_bytes()).await?;
    client.finish_body().await?;
    Ok(())
}

#[async_trait]
impl HttpServerApp for IngressApp {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if let Some(guard) = session.stream().and_then(guard_of) {
            guard.rearm_unless_first();
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        match session {
            ServerSession::H1(client) => self.serve(client, persistent, shutdown).await,
            other => self.h2.process_new_http(other, shutdown).await,
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.h2.h2_options()
    }

    async fn http_cleanup(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_waiters();
        self.h2.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[(&str, &str)]) -> RequestHeader {
        let mut head = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in lines {
            head.append_header(name.to_string(), *value).unwrap();
        }
        head
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = head(&[
            ("host", "a.example.com"),
            ("connection", "keep-alive, X-Secret, host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("x-kept", "2"),
        ]);
        remove_hop_by_hop(&mut h).unwrap();
        let names: Vec<_> = h.headers.keys().map(|n| n.as_str().to_owned()).collect();
        assert_eq!(names, ["host", "x-kept"]);
    }

    #[test]
    fn only_a_valid_websocket_upgrade_is_one() {
        let ws = head(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_websocket_upgrade(&ws));
        let h2c = head(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        assert!(!is_websocket_upgrade(&h2c));
        let unnamed = head(&[("upgrade", "websocket")]);
        assert!(!is_websocket_upgrade(&unnamed));
    }

    #[test]
    fn a_response_without_length_is_sent_chunked() {
        let get = head(&[]);
        let mut response = ResponseHeader::build(200, None).unwrap();
        response.insert_header("keep-alive", "timeout=5").unwrap();
        prepare_response(&mut response, &get);
        assert_eq!(
            response.headers.get("transfer-encoding").unwrap(),
            "chunked"
        );
        assert!(response.headers.get("keep-alive").is_none());
        let mut sized = ResponseHeader::build(200, None).unwrap();
        sized.insert_header("content-length", "3").unwrap();
        prepare_response(&mut sized, &get);
        assert!(sized.headers.get("transfer-encoding").is_none());
        let mut empty = ResponseHeader::build(204, None).unwrap();
        prepare_response(&mut empty, &get);
        assert!(empty.headers.get("transfer-encoding").is_none());
    }
}
