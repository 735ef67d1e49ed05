//! Pingora's proxy logic for HTTP/2 streams (h2 over TLS, h2c): the decisions of
//! [`super::request`] in Pingora's `ProxyHttp` hooks. gRPC (`content-type: application/grpc*`)
//! reaches the instance over h2c (prior knowledge) with its trailers; other requests over
//! HTTP/1.1. HTTP/1 clients are served by our own loop ([`super::http1`]).

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Version, header};
use pingora::{
    Error, ErrorSource, ErrorType, Result,
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    protocols::{ALPN, http::HttpTask},
    proxy::{FailToProxy, ProxyHttp, Session},
};

use super::{
    IngressState,
    request::{Admission, Finished, Reply, upstream_failure, upstream_timeout},
    routing::{Backend, InFlight},
};

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    admission: Admission,
    backend: Option<Backend>,
    failed_backend: Option<std::net::SocketAddr>,
    connect_retries: u8,
    /// Counts the request against the backend it is sent to (drained before a stop).
    backend_in_flight: Option<InFlight>,
    /// The status of the ingress's own answer (a gRPC client gets it as a gRPC status).
    replied: Option<u16>,
}

/// The HTTP/2 proxy of one listener (plain HTTP or TLS).
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

    /// Answers the request directly; a gRPC client gets the answer as a gRPC status.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reply: &Reply,
    ) -> Result<bool> {
        ctx.replied = Some(reply.status);
        let request_id = &ctx.admission.request_id;
        if is_grpc(session.req_header()) {
            let response = grpc_status(reply, request_id)?;
            session
                .as_downstream_mut()
                .response_duplex_vec(vec![HttpTask::Header(Box::new(response), true)])
                .await?;
            return Ok(true);
        }
        let response = reply.header(request_id)?;
        session
            .as_downstream_mut()
            .write_error_response(response, Bytes::from(reply.body.clone()))
            .await?;
        Ok(true)
    }
}

/// The downstream peer's IP address.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The ingress's own answer as a gRPC trailers-only response: HTTP 200 with `grpc-status`
/// mapped from the HTTP status as gRPC's own HTTP mapping does, and the text as
/// `grpc-message` (percent-encoded).
fn grpc_status(reply: &Reply, request_id: &str) -> Result<ResponseHeader> {
    const UNKNOWN: u8 = 2;
    const RESOURCE_EXHAUSTED: u8 = 8;
    const UNIMPLEMENTED: u8 = 12;
    const INTERNAL: u8 = 13;
    const UNAVAILABLE: u8 = 14;
    let code = match reply.status {
        400 => INTERNAL,
        404 => UNIMPLEMENTED,
        413 => RESOURCE_EXHAUSTED,
        308 | 429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    };
    let mut message = String::new();
    for byte in reply.body.trim_end().bytes() {
        if (b' '..=b'~').contains(&byte) && byte != b'%' {
            message.push(char::from(byte));
        } else {
            message.push_str(&format!("%{byte:02X}"));
        }
    }
    let mut response = ResponseHeader::build(200, Some(4))?;
    response.insert_header(header::CONTENT_TYPE, "application/grpc")?;
    response.insert_header("grpc-status", code.to_string())?;
    response.insert_header("grpc-message", message)?;
    response.insert_header("x-request-id", request_id)?;
    Ok(response)
}

/// A gRPC request (its instance is spoken to over HTTP/2).
fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
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
            admission: Admission::default(),
            backend: None,
            failed_backend: None,
            connect_retries: 0,
            backend_in_flight: None,
            replied: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let peer = peer_ip(session);
        ctx.admission = self
            .state
            .admit(self.tls, session.req_header(), None, peer)
            .await;
        if let Some(reply) = ctx.admission.reply.take() {
            return self.respond(session, ctx, &reply).await;
        }
        if session.is_upgrade_req() {
            // A websocket may stay idle for long; the route timeout is for responses.
            session.set_read_timeout(None);
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
            .admission
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no route"))?;
        let Some(backend) = route.upstreams.pick(ctx.failed_backend) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "the service lost its endpoints");
        };
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.group_key = backend.pool_key;
        if is_grpc(session.req_header()) {
            // h2c with prior knowledge: no TLS, so no ALPN to negotiate it.
            peer.options.alpn = ALPN::H2;
        }
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        let timeout = upstream_timeout(route, session.is_upgrade_req());
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
        let route = ctx.admission.route.as_ref();
        if let Some(route) = route {
            route
                .upstreams
                .metrics
                .observe_upstream_error(crate::metrics::UpstreamError::Connect);
        }
        let others = route.is_some_and(|r| r.upstreams.backends.len() > 1);
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
        self.state.forward_headers(
            upstream,
            peer_ip(session),
            self.tls,
            &ctx.admission.host,
            &ctx.admission.request_id,
        )?;
        if upstream.version == Version::HTTP_2 && !is_grpc(upstream) {
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
        response.insert_header("x-request-id", ctx.admission.request_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let route = ctx.admission.route.as_deref();
        let reply = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => Some(Reply::new(
                *code,
                format!(
                    "{}\n",
                    e.context
                        .as_ref()
                        .map_or_else(String::new, |c| c.as_str().to_owned())
                ),
            )),
            (_, ErrorSource::Upstream) => Some(upstream_failure(e, route)),
            (
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => None,
            (_, ErrorSource::Downstream) => Some(Reply::new(400, "bad request\n".to_owned())),
            _ => Some(Reply::new(500, "internal error\n".to_owned())),
        };
        let code = reply.as_ref().map_or(0, |r| r.status);
        if let Some(reply) = reply
            && let Err(error) = self.respond(session, ctx, &reply).await
        {
            tracing::debug!(%error, "could not send the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let client = session.client_addr();
        self.state.finish(&Finished {
            started: ctx.started,
            request_id: &ctx.admission.request_id,
            client: client.map(|a| a as &dyn std::fmt::Display),
            request: session.req_header(),
            host: &ctx.admission.host,
            status: ctx
                .replied
                .or_else(|| session.response_written().map(|r| r.status.as_u16()))
                .unwrap_or(0),
            route: ctx.admission.route.as_deref(),
            upstream: ctx.backend.map(|b| b.addr),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            error: error.map(|e| e as &dyn std::fmt::Display),
        });
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // The access log line carries the error.
        true
    }
}
