//! The Pingora proxy logic: route by Host, answer what needs no backend (404, 400, 413, 308,
//! ACME challenges), wait for an activation when a service has no endpoint, pick a backend
//! round-robin with one retry on connect failure, set the forwarding headers, map upstream
//! failures to 502/503/504, and record metrics and an access log line per request.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, Version, header};
use pingora::{
    Error, ErrorSource, ErrorType, Result,
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    proxy::{FailToProxy, ProxyHttp, Session},
};

use crate::routes::normalize_host_header;

use super::{
    IngressState,
    activation::Activation,
    framing,
    routing::{Backend, InFlight, Route},
};

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    host: String,
    route: Option<Arc<Route>>,
    backend: Option<Backend>,
    failed_backend: Option<SocketAddr>,
    connect_retries: u8,
    /// Counts this request for the autoscaler while it lives.
    in_flight: Option<InFlight>,
    /// Counts the request against the backend it is sent to (drained before a stop).
    backend_in_flight: Option<InFlight>,
}

/// The proxy of one listener (plain HTTP or TLS).
#[derive(Debug)]
pub struct MirenProxy {
    state: Arc<IngressState>,
    tls: bool,
}

impl MirenProxy {
    /// The proxy for the HTTP (`tls == false`) or HTTPS listener.
    pub fn new(state: Arc<IngressState>, tls: bool) -> Self {
        Self { state, tls }
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// Answers the request directly with a short text body.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        body: String,
        extra: Option<(header::HeaderName, String)>,
    ) -> Result<bool> {
        let mut response = ResponseHeader::build(status, Some(4))?;
        response.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        response.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        response.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some((name, value)) = extra {
            response.insert_header(name, value)?;
        }
        if status == 400 || status == 413 {
            session.set_keepalive(None);
        }
        session
            .as_downstream_mut()
            .write_error_response(response, Bytes::from(body))
            .await?;
        Ok(true)
    }

    /// Where to redirect a plain-HTTP request for a host that has a certificate.
    fn https_location(&self, host: &str, req: &RequestHeader) -> String {
        let port = self.state.settings.https_port;
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        if port == 443 {
            format!("https://{host}{path}")
        } else {
            format!("https://{host}:{port}{path}")
        }
    }

    fn is_trusted(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| {
            self.state
                .settings
                .trusted_proxies
                .iter()
                .any(|c| c.contains(ip))
        })
    }
}

/// The downstream peer's IP address.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The request's host: the Host header, else the URI authority (HTTP/2), normalized as the
/// route table keys it.
fn request_host(req: &RequestHeader) -> Option<String> {
    let raw = match req.headers.get(header::HOST) {
        Some(value) => value.to_str().ok(),
        None => req.uri.authority().map(|a| a.as_str()),
    }?;
    normalize_host_header(raw).map(std::borrow::Cow::into_owned)
}

/// A client-supplied request id worth keeping: short, visible ASCII.
fn usable_request_id(value: &HeaderValue) -> Option<String> {
    let bytes = value.as_bytes();
    (!bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic()))
        .then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// A new request id: 16 hex digits from a per-process random seed and a counter.
fn new_request_id() -> String {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(std::process::id())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // A bijective mix so consecutive ids do not look alike.
    let mut x = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{:016x}", x ^ (x >> 31))
}

/// An optional access-log field: the value, or `-`.
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The metric label of an upstream failure.
fn error_kind(error: &Error) -> &'static str {
    match error.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError => "connect",
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
        _ => "other",
    }
}

#[async_trait]
impl ProxyHttp for MirenProxy {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a (disabled) compression module that
    /// still costs allocations on every request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            host: String::new(),
            route: None,
            backend: None,
            failed_backend: None,
            connect_retries: 0,
            in_flight: None,
            backend_in_flight: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A client's request id is kept only from a trusted proxy, like X-Forwarded-*.
        let trusted = self.is_trusted(peer_ip(session));
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get("x-request-id")
            .filter(|_| trusted)
            .and_then(usable_request_id)
            .unwrap_or_else(new_request_id);
        if let Some(h1) = session.as_downstream().as_http1()
            && let Err(error) = framing::check(&req.headers, &h1.get_headers_raw_bytes())
        {
            let body = format!("bad request: {error}\n");
            return self.respond(session, ctx, 400, body, None).await;
        }
        let Some(host) = request_host(req) else {
            let body = "bad request: the Host header is missing\n".to_owned();
            return self.respond(session, ctx, 400, body, None).await;
        };
        ctx.host = host;
        let req = session.req_header();
        if !self.tls
            && req.method == Method::GET
            && let Some(token) = req.uri.path().strip_prefix("/.well-known/acme-challenge/")
        {
            let (status, body) = match (self.state.acme_challenge)(token) {
                Some(key_authorization) => (200, key_authorization),
                None => (404, format!("no ACME challenge {token}\n")),
            };
            return self.respond(session, ctx, status, body, None).await;
        }
        let snapshot = self.state.routing.snapshot();
        let Some(route) = snapshot.lookup(&ctx.host).cloned() else {
            let body = format!("no route for host {}\n", ctx.host);
            return self.respond(session, ctx, 404, body, None).await;
        };
        let upstreams = Arc::clone(&route.upstreams);
        ctx.in_flight = Some(InFlight::new(&upstreams));
        ctx.route = Some(route);
        if !self.tls && (self.state.has_certificate)(&ctx.host) {
            let location = self.https_location(&ctx.host, session.req_header());
            let body = format!("moved to {location}\n");
            return self
                .respond(session, ctx, 308, body, Some((header::LOCATION, location)))
                .await;
        }
        let declared_length = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared_length.is_some_and(|n| n > self.state.settings.max_body_bytes) {
            let body = format!(
                "request body larger than {} bytes\n",
                self.state.settings.max_body_bytes
            );
            return self.respond(session, ctx, 413, body, None).await;
        }
        if session.is_upgrade_req() {
            // A websocket may stay idle for long; the route timeout is for responses.
            session.set_read_timeout(None);
        }
        if upstreams.backends.is_empty() {
            match self
                .state
                .activations
                .wait_ready(&upstreams.app, &upstreams.service)
                .await
            {
                Activation::Ready => {
                    ctx.route = self.state.routing.snapshot().lookup(&ctx.host).cloned();
                }
                Activation::Failed(reason) => {
                    let body = format!(
                        "no endpoints for app {} service {}: {reason}\n",
                        upstreams.app, upstreams.service
                    );
                    return self.respond(session, ctx, 503, body, None).await;
                }
                Activation::TimedOut(after) => {
                    let body = format!(
                        "app {} service {} did not become ready within {}s\n",
                        upstreams.app,
                        upstreams.service,
                        after.as_secs()
                    );
                    return self.respond(session, ctx, 503, body, None).await;
                }
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if session.body_bytes_read() as u64 > self.state.settings.max_body_bytes {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no route"))?;
        let Some(backend) = route.upstreams.pick(ctx.failed_backend) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "the service lost its endpoints");
        };
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.group_key = backend.pool_key;
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        let timeout = (!session.is_upgrade_req()).then_some(route.timeout);
        peer.options.read_timeout = timeout;
        peer.options.write_timeout = timeout;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        ctx.backend_in_flight = route.upstreams.count_to(&backend);
        ctx.backend = Some(backend);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let app = ctx.route.as_ref().map_or("", |r| r.upstreams.app.as_str());
        self.state.metrics.observe_upstream_error(app, "connect");
        let others = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.upstreams.backends.len() > 1);
        let retry = ctx.connect_retries == 0 && others;
        if retry {
            ctx.connect_retries += 1;
            ctx.failed_backend = ctx.backend.map(|b| b.addr);
            tracing::debug!(peer = %peer, "connect failed; retrying another endpoint");
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer_ip = peer_ip(session);
        let trusted = self.is_trusted(peer_ip);
        let peer_text = peer_ip.map(|ip| ip.to_string()).unwrap_or_default();
        let forwarded_for = match upstream.headers.get("x-forwarded-for") {
            Some(existing) if trusted => match existing.to_str() {
                Ok(list) => format!("{list}, {peer_text}"),
                Err(_) => peer_text,
            },
            _ => peer_text,
        };
        upstream.insert_header("x-forwarded-for", forwarded_for)?;
        if !(trusted && upstream.headers.contains_key("x-forwarded-proto")) {
            upstream.insert_header("x-forwarded-proto", self.scheme())?;
        }
        if !(trusted && upstream.headers.contains_key("x-forwarded-host")) {
            upstream.insert_header("x-forwarded-host", ctx.host.as_str())?;
        }
        if !trusted {
            upstream.remove_header("forwarded");
            upstream.remove_header("x-real-ip");
        }
        upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
        // Identical Content-Length headers (others are refused by `framing::check`) are
        // forwarded as one (RFC 9110 §8.6).
        let lengths = upstream.headers.get_all(header::CONTENT_LENGTH);
        if let Some(first) = lengths.iter().next().cloned()
            && lengths.iter().count() > 1
        {
            upstream.insert_header(header::CONTENT_LENGTH, first)?;
        }
        if !upstream.headers.contains_key(header::HOST) {
            upstream.insert_header(header::HOST, ctx.host.as_str())?;
        }
        if upstream.version == Version::HTTP_2 {
            upstream.set_version(Version::HTTP_11);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        response.insert_header("x-request-id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let app = ctx.route.as_ref().map_or("", |r| r.upstreams.app.as_str());
        let (code, body) = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => (
                *code,
                format!(
                    "{}\n",
                    e.context
                        .as_ref()
                        .map_or_else(String::new, |c| c.as_str().to_owned())
                ),
            ),
            (_, ErrorSource::Upstream) => {
                let kind = error_kind(e);
                if kind != "connect" {
                    self.state.metrics.observe_upstream_error(app, kind);
                }
                if kind == "timeout" {
                    let after = ctx.route.as_ref().map_or(0, |r| r.timeout.as_secs());
                    (504, format!("the app did not answer within {after}s\n"))
                } else {
                    (502, format!("the app failed: {}\n", e.etype().as_str()))
                }
            }
            (
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => (0, String::new()),
            (_, ErrorSource::Downstream) => (400, "bad request\n".to_owned()),
            _ => (500, "internal error\n".to_owned()),
        };
        if code > 0
            && let Err(error) = self.respond(session, ctx, code, body, None).await
        {
            tracing::debug!(%error, "could not send the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let code = session.response_written().map_or(0, |r| r.status.as_u16());
        let (app, service) = ctx.route.as_ref().map_or(("", ""), |r| {
            (r.upstreams.app.as_str(), r.upstreams.service.as_str())
        });
        let elapsed = ctx.started.elapsed();
        self.state.metrics.observe_http_request(
            app,
            service,
            &session.req_header().method,
            code,
            elapsed,
        );
        let req = session.req_header();
        // Fields are formatted straight into the line (no intermediate Strings).
        tracing::info!(
            target: "miren::access",
            request_id = %ctx.request_id,
            client = %OrDash(session.client_addr()),
            method = %req.method,
            host = %ctx.host,
            path = req.uri.path(),
            status = code,
            app,
            upstream = %OrDash(ctx.backend.map(|b| b.addr)),
            bytes_in = session.body_bytes_read(),
            bytes_out = session.body_bytes_sent(),
            duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            error = %OrDash(error),
        );
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // The access log line carries the error.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: Option<&str>, uri: &str) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.set_uri(uri.parse().unwrap());
        if let Some(host) = host {
            req.insert_header("host", host).unwrap();
        }
        req
    }

    #[test]
    fn host_is_lowercased_without_port() {
        assert_eq!(
            request_host(&req(Some("A.Example.COM:8080"), "/")).as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            request_host(&req(Some("a.example.com."), "/")).as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            request_host(&req(Some("[::1]:80"), "/")).as_deref(),
            Some("[::1]")
        );
        assert_eq!(
            request_host(&req(None, "https://b.example.com/x")).as_deref(),
            Some("b.example.com")
        );
        assert_eq!(request_host(&req(None, "/")), None);
        assert_eq!(request_host(&req(Some(""), "/")), None);
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            usable_request_id(&HeaderValue::from_static("abc-123")).as_deref(),
            Some("abc-123")
        );
        assert_eq!(
            usable_request_id(&HeaderValue::from_static("has space")),
            None
        );
    }
}
