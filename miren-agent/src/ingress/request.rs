//! What both request paths decide the same way — our HTTP/1 loop ([`super::h1`]) and
//! Pingora's proxy for HTTP/2 ([`super::proxy`]): the request id, the answers that need no
//! backend (400, 404, 308, 413, ACME challenges, 503 when a service cannot start), the
//! headers an upstream request gets, what an upstream failure answers, and the access log
//! line and metrics of a finished request.

use std::{
    fmt::{Display, Write as _},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Method, header};
use pingora::{
    Error, ErrorType,
    http::{RequestHeader, ResponseHeader},
};

use crate::{metrics::UpstreamError, routes::normalize_host_header};

use super::{
    IngressState, access_log,
    activation::Activation,
    framing,
    routing::{InFlight, Route},
};

/// A response the ingress writes itself.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Plain-text body.
    pub body: String,
    /// `Location` of a redirect.
    pub location: Option<String>,
}

impl Reply {
    /// A plain-text answer.
    pub fn new(status: u16, body: String) -> Self {
        Self {
            status,
            body,
            location: None,
        }
    }

    /// Whether the client connection must close after it (the request's framing cannot be
    /// trusted, or its body is not read).
    pub fn closes_connection(&self) -> bool {
        matches!(self.status, 400 | 413)
    }

    /// The response head for `request_id`.
    ///
    /// # Errors
    /// When a header value is not valid (never for the values the ingress writes).
    pub fn header(&self, request_id: &str) -> pingora::Result<ResponseHeader> {
        let mut response = ResponseHeader::build(self.status, Some(4))?;
        response.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        response.insert_header(header::CONTENT_LENGTH, self.body.len().to_string())?;
        response.insert_header("x-request-id", request_id)?;
        if let Some(location) = &self.location {
            response.insert_header(header::LOCATION, location.as_str())?;
        }
        Ok(response)
    }
}

/// What the ingress decided for a request before any upstream is involved.
#[derive(Debug, Default)]
pub struct Admission {
    /// The request's id (the trusted client's, else a new one).
    pub request_id: String,
    /// The normalized host (empty when the request has none).
    pub host: String,
    /// The matched route.
    pub route: Option<Arc<Route>>,
    /// Counts the request for the autoscaler while it lives.
    pub in_flight: Option<InFlight>,
    /// The answer, when the ingress gives it itself.
    pub reply: Option<Reply>,
}

/// What a finished request leaves in the access log and the metrics.
pub struct Finished<'a> {
    /// When the request head was read.
    pub started: Instant,
    /// The request's id.
    pub request_id: &'a str,
    /// The client's address.
    pub client: Option<&'a dyn Display>,
    /// The request head.
    pub request: &'a RequestHeader,
    /// The normalized host.
    pub host: &'a str,
    /// The status sent (0: none).
    pub status: u16,
    /// The matched route.
    pub route: Option<&'a Route>,
    /// The instance the request went to.
    pub upstream: Option<SocketAddr>,
    /// Request body bytes read from the client.
    pub bytes_in: usize,
    /// Response body bytes sent to the client.
    pub bytes_out: usize,
    /// What went wrong, if anything.
    pub error: Option<&'a dyn Display>,
}

impl std::fmt::Debug for Finished<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished")
            .field("request_id", &self.request_id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// An optional access-log field: the value, or `-`.
struct OrDash<T>(Option<T>);

impl<T: Display> Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl IngressState {
    /// Whether `peer` is a trusted proxy (its forwarding headers and request id are kept).
    pub(super) fn is_trusted(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| self.settings.trusted_proxies.iter().any(|c| c.contains(ip)))
    }

    /// Decides what to do with a request: answer it here (see [`Admission::reply`]) or send
    /// it to the route's service, waiting for the service to start when it has no endpoint.
    /// `raw_head` is an HTTP/1 request's head as received, checked for smuggling shapes.
    pub(super) async fn admit(
        &self,
        tls: bool,
        req: &RequestHeader,
        raw_head: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> Admission {
        // A client's request id is kept only from a trusted proxy, like X-Forwarded-*.
        let mut admission = Admission {
            request_id: req
                .headers
                .get("x-request-id")
                .filter(|_| self.is_trusted(peer))
                .and_then(usable_request_id)
                .unwrap_or_else(new_request_id),
            ..Admission::default()
        };
        admission.reply = self.admit_reply(tls, req, raw_head, &mut admission).await;
        admission
    }

    /// The answer the ingress gives itself, if any; fills the admission's host and route.
    async fn admit_reply(
        &self,
        tls: bool,
        req: &RequestHeader,
        raw_head: Option<&[u8]>,
        admission: &mut Admission,
    ) -> Option<Reply> {
        if let Some(raw_head) = raw_head
            && let Err(error) = framing::check(&req.headers, raw_head)
        {
            return Some(Reply::new(400, format!("bad request: {error}\n")));
        }
        let Some(host) = request_host(req) else {
            let body = "bad request: the Host header is missing\n".to_owned();
            return Some(Reply::new(400, body));
        };
        admission.host = host;
        let host = admission.host.as_str();
        if !tls
            && req.method == Method::GET
            && let Some(token) = req.uri.path().strip_prefix("/.well-known/acme-challenge/")
        {
            return Some(match (self.acme_challenge)(token) {
                Some(key_authorization) => Reply::new(200, key_authorization),
                None => Reply::new(404, format!("no ACME challenge {token}\n")),
            });
        }
        let Some(route) = self.routing.snapshot().lookup(host).cloned() else {
            return Some(Reply::new(404, format!("no route for host {host}\n")));
        };
        let upstreams = Arc::clone(&route.upstreams);
        admission.in_flight = Some(InFlight::new(&upstreams));
        admission.route = Some(route);
        if !tls && (self.has_certificate)(host) {
            let location = self.https_location(host, req);
            let mut reply = Reply::new(308, format!("moved to {location}\n"));
            reply.location = Some(location);
            return Some(reply);
        }
        let declared_length = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let max = self.settings.max_body_bytes;
        if declared_length.is_some_and(|n| n > max) {
            return Some(Reply::new(
                413,
                format!("request body larger than {max} bytes\n"),
            ));
        }
        if !upstreams.backends.is_empty() {
            return None;
        }
        let (app, service) = (&upstreams.app, &upstreams.service);
        match self.activations.wait_ready(app, service).await {
            Activation::Ready => {
                admission.route = self.routing.snapshot().lookup(host).cloned();
                None
            }
            Activation::Failed(reason) => Some(Reply::new(
                503,
                format!("no endpoints for app {app} service {service}: {reason}\n"),
            )),
            Activation::TimedOut(after) => Some(Reply::new(
                503,
                format!(
                    "app {app} service {service} did not become ready within {}s\n",
                    after.as_secs()
                ),
            )),
        }
    }

    /// Where to redirect a plain-HTTP request for a host that has a certificate.
    fn https_location(&self, host: &str, req: &RequestHeader) -> String {
        let port = self.settings.https_port;
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        if port == 443 {
            format!("https://{host}{path}")
        } else {
            format!("https://{host}:{port}{path}")
        }
    }

    /// Sets the forwarding headers of an upstream request: X-Forwarded-For/-Proto/-Host
    /// (appended to or kept only from a trusted proxy), the request id and Host; drops
    /// `Forwarded` and `X-Real-IP` from untrusted peers; merges identical Content-Length
    /// headers (others are refused by [`framing::check`]).
    ///
    /// # Errors
    /// When a header value is not valid.
    pub(super) fn forward_headers(
        &self,
        upstream: &mut RequestHeader,
        peer: Option<IpAddr>,
        tls: bool,
        host: &str,
        request_id: &str,
    ) -> pingora::Result<()> {
        let trusted = self.is_trusted(peer);
        let peer_text = peer.map(|ip| ip.to_string()).unwrap_or_default();
        let forwarded_for = match upstream.headers.get("x-forwarded-for") {
            Some(existing) if trusted => match existing.to_str() {
                Ok(list) => format!("{list}, {peer_text}"),
                Err(_) => peer_text,
            },
            _ => peer_text,
        };
        upstream.insert_header("x-forwarded-for", forwarded_for)?;
        if !(trusted && upstream.headers.contains_key("x-forwarded-proto")) {
            upstream.insert_header("x-forwarded-proto", if tls { "https" } else { "http" })?;
        }
        if !(trusted && upstream.headers.contains_key("x-forwarded-host")) {
            upstream.insert_header("x-forwarded-host", host)?;
        }
        if !trusted {
            upstream.remove_header("forwarded");
            upstream.remove_header("x-real-ip");
        }
        upstream.insert_header("x-request-id", request_id)?;
        let lengths = upstream.headers.get_all(header::CONTENT_LENGTH);
        if let Some(first) = lengths.iter().next().cloned()
            && lengths.iter().count() > 1
        {
            upstream.insert_header(header::CONTENT_LENGTH, first)?;
        }
        if !upstream.headers.contains_key(header::HOST) {
            upstream.insert_header(header::HOST, host)?;
        }
        Ok(())
    }

    /// Counts the finished request and writes its access log line.
    pub(super) fn finish(&self, done: &Finished<'_>) {
        let elapsed = done.started.elapsed();
        let metrics = done
            .route
            .map_or(&self.unrouted, |route| &route.upstreams.metrics);
        metrics.observe_request(&done.request.method, done.status, elapsed);
        if access_log::enabled() {
            let app = done.route.map_or("", |r| r.upstreams.app.as_str());
            access_log::line(|out| {
                write!(
                    out,
                    "request_id={} client={} method={} host={} path={:?} status={} app={app:?} \
                     upstream={} bytes_in={} bytes_out={} duration_us={} error={}",
                    done.request_id,
                    OrDash(done.client),
                    done.request.method,
                    done.host,
                    done.request.uri.path(),
                    done.status,
                    OrDash(done.upstream),
                    done.bytes_in,
                    done.bytes_out,
                    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    OrDash(done.error),
                )
            });
        }
    }
}

/// The answer to a request whose upstream failed with `error`, counted in the route's
/// upstream error metric (connect failures are counted at each attempt, by the caller).
pub fn upstream_failure(error: &Error, route: Option<&Route>) -> Reply {
    let kind = error_kind(error);
    if kind != UpstreamError::Connect
        && let Some(route) = route
    {
        route.upstreams.metrics.observe_upstream_error(kind);
    }
    match kind {
        UpstreamError::Timeout => {
            let after = route.map_or(0, |r| r.timeout.as_secs());
            Reply::new(504, format!("the app did not answer within {after}s\n"))
        }
        UpstreamError::Connect | UpstreamError::Other => {
            Reply::new(502, format!("the app failed: {}\n", error.etype().as_str()))
        }
    }
}

/// The upstream timeout of `route` for a request (none for an upgrade: a websocket may stay
/// idle for long; the route timeout is for responses).
pub fn upstream_timeout(route: &Route, upgrade: bool) -> Option<Duration> {
    (!upgrade).then_some(route.timeout)
}

/// The kind of an upstream failure (its metric label).
pub fn error_kind(error: &Error) -> UpstreamError {
    match error.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError => UpstreamError::Connect,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamError::Timeout,
        _ => UpstreamError::Other,
    }
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
