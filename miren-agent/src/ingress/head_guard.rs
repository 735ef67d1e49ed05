//! Slowloris and oversized-head defence below the HTTP parser: a client connection wrapped in
//! [`HeadGuard`] must deliver each request head (up to the blank line) within a deadline and
//! within a size limit. Otherwise the guard answers 408 or 431 itself and closes.
//!
//! The deadline of a connection's first request runs from accept; for a later request on a
//! kept-alive connection it runs from that request's first byte (idle keep-alive is governed
//! by the keep-alive timeout). The proxy re-arms the guard before each HTTP/1 request.

use std::{
    any::Any,
    pin::Pin,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, tls::TlsRef,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Limits every request head must respect.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Time to deliver a whole request head.
    pub timeout: Duration,
    /// Largest request head in bytes.
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of the next head (the deadline is not running).
    Idle,
    /// Inside a head: `seen` bytes so far, `matched` bytes of "\r\n\r\n" at the end.
    Head { seen: usize, matched: u8 },
    /// Past the head: bytes flow untouched.
    Body,
}

/// A client stream that enforces [`HeadLimits`].
#[derive(Debug)]
pub struct HeadGuard {
    inner: Stream,
    limits: HeadLimits,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    rearmed: AtomicBool,
    /// Whether the connection's first request has begun.
    started: AtomicBool,
    /// A rejection being written: the response and how much of it is out.
    rejecting: Option<(&'static [u8], usize)>,
    /// Response bytes not yet written to `inner`.
    write_buf: Vec<u8>,
}

/// Writes smaller than this are gathered until a flush.
const WRITE_BUFFER: usize = 16 * 1024;

/// The 408 the guard writes when a head is not complete within the deadline.
static TIMEOUT_RESPONSE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    rejection(
        "408 Request Timeout",
        "request head not received in time\r\n",
    )
});
/// The 431 the guard writes when a head is larger than the limit.
static TOO_LARGE_RESPONSE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    rejection(
        "431 Request Header Fields Too Large",
        "request header is too large\r\n",
    )
});

/// A `Connection: close` plain-text response whose `Content-Length` is its body's.
fn rejection(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl HeadGuard {
    /// Wraps a freshly accepted client stream; the first head's deadline starts now.
    pub fn new(inner: Stream, limits: HeadLimits) -> Self {
        Self {
            inner,
            limits,
            phase: Phase::Head {
                seen: 0,
                matched: 0,
            },
            deadline: Box::pin(tokio::time::sleep(limits.timeout)),
            rearmed: AtomicBool::new(false),
            started: AtomicBool::new(false),
            rejecting: None,
            write_buf: Vec::new(),
        }
    }

    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.write_buf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.write_buf))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.write_buf.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Called before each HTTP/1 request on this connection: from the second one on, the
    /// next head's deadline starts at its first byte.
    pub fn rearm_unless_first(&self) {
        if self.started.swap(true, Ordering::Relaxed) {
            self.rearmed.store(true, Ordering::Release);
        }
    }

    /// Feeds bytes the parser is about to see; returns a rejection when the head is too big.
    fn scan(&mut self, bytes: &[u8]) -> Option<&'static [u8]> {
        if bytes.is_empty() {
            return None;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Head {
                seen: 0,
                matched: 0,
            };
            self.deadline
                .as_mut()
                .reset(Instant::now() + self.limits.timeout);
        }
        let Phase::Head { seen, matched } = &mut self.phase else {
            return None;
        };
        for (i, &byte) in bytes.iter().enumerate() {
            let expected = if *matched % 2 == 0 { b'\r' } else { b'\n' };
            *matched = match (byte == expected, byte) {
                (true, _) => *matched + 1,
                (false, b'\r') => 1,
                (false, _) => 0,
            };
            if *matched == 4 {
                let head_len = *seen + i + 1;
                self.phase = Phase::Body;
                return (head_len > self.limits.max_bytes).then_some(&TOO_LARGE_RESPONSE[..]);
            }
        }
        *seen += bytes.len();
        (*seen > self.limits.max_bytes).then_some(&TOO_LARGE_RESPONSE[..])
    }

    /// Writes the pending rejection, then fails the read so the parser gives up.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some((response, written)) = &mut self.rejecting {
            while *written < response.len() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &response[*written..]))?;
                if n == 0 {
                    break;
                }
                *written += n;
            }
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "request head rejected",
        )))
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.rejecting.is_some() {
            return this.poll_reject(cx);
        }
        if this.rearmed.swap(false, Ordering::AcqRel) {
            this.phase = Phase::Idle;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if this.phase == Phase::Body => Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => {
                if let Some(response) = this.scan(&buf.filled()[before..]) {
                    buf.set_filled(before);
                    this.rejecting = Some((response, 0));
                    return this.poll_reject(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if matches!(this.phase, Phase::Head { .. })
                    && this.deadline.as_mut().poll(cx).is_ready()
                {
                    this.rejecting = Some((&TIMEOUT_RESPONSE[..], 0));
                    return this.poll_reject(cx);
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for HeadGuard {
    /// Buffers small writes (a response head and a short body go out in one segment and one
    /// TLS record); Pingora flushes at the end of each response.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.write_buf.len() + buf.len() > WRITE_BUFFER {
            ready!(this.poll_drain(cx))?;
        }
        if buf.len() >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.write_buf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeadGuard {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::flush(self).await;
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeadGuard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadGuard {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadGuard {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for HeadGuard {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for HeadGuard {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for HeadGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The guard of a client stream, if it has one.
pub fn guard_of(stream: &Stream) -> Option<&HeadGuard> {
    let any: &dyn Any = stream.as_any();
    any.downcast_ref::<HeadGuard>()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Sends `request` to a real listener whose connection is guarded by `limits` (and read
    /// until the guard gives up), then returns the raw response the client received.
    async fn raw_response(limits: HeadLimits, request: &[u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
            let mut guard = HeadGuard::new(stream, limits);
            let mut buf = vec![0; 4096];
            while guard.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(request).await.unwrap();
        let mut response = Vec::new();
        let _ = client.read_to_end(&mut response).await;
        server.await.unwrap();
        String::from_utf8(response).unwrap()
    }

    /// The status line, and the Content-Length header's value next to the body's length.
    fn status_and_lengths(response: &str) -> (&str, usize, usize) {
        let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .expect("a Content-Length")
            .parse()
            .unwrap();
        (head.lines().next().unwrap(), length, body.len())
    }

    #[tokio::test]
    async fn every_rejection_says_its_body_length() {
        let slow = HeadLimits {
            timeout: Duration::from_millis(50),
            max_bytes: 1024,
        };
        let timed_out = raw_response(slow, b"GET / HTTP/1.1\r\nHost: a").await;
        let (status, length, body) = status_and_lengths(&timed_out);
        assert_eq!(status, "HTTP/1.1 408 Request Timeout", "{timed_out}");
        assert_eq!(length, body, "{timed_out}");

        let small = HeadLimits {
            timeout: Duration::from_secs(60),
            max_bytes: 16,
        };
        let too_large = raw_response(small, b"GET / HTTP/1.1\r\nX-Big: aaaaaaaa\r\n\r\n").await;
        let (status, length, body) = status_and_lengths(&too_large);
        assert_eq!(
            status, "HTTP/1.1 431 Request Header Fields Too Large",
            "{too_large}"
        );
        assert_eq!(length, body, "{too_large}");
    }
}
