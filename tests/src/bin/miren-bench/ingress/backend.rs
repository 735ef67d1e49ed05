//! The benchmark's upstream: a minimal HTTP/1.1 keep-alive server answering every request
//! with `200` and a 13-byte body, on one thread pinned to a chosen CPU (a current-thread tokio
//! runtime). It counts the connections it accepts and the requests it answers, so a run can
//! tell how well a proxy reuses its upstream connections.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

/// The body of every answer.
pub const BODY: &[u8] = b"hello, world\n";
const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello, world\n";
const OK_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: close\r\n\r\nhello, world\n";
const UNSUPPORTED: &[u8] =
    b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
/// Largest request head accepted.
const HEAD_LIMIT: usize = 16 * 1024;

/// What the backend has done since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendCounts {
    /// Connections accepted.
    pub accepts: u64,
    /// Requests answered.
    pub requests: u64,
}

impl std::ops::Sub for BackendCounts {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            accepts: self.accepts - earlier.accepts,
            requests: self.requests - earlier.requests,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepts: AtomicU64,
    requests: AtomicU64,
}

/// A running backend; stopped (and its thread joined) on drop.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Binds 127.0.0.1 on a free port and serves on a thread pinned to `cpu`.
    ///
    /// # Errors
    /// If the socket cannot be bound or the thread cannot start.
    pub fn start(cpu: usize) -> Result<Self> {
        let listener = StdListener::bind("127.0.0.1:0").context("binding the backend")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let mut cpus = CpuSet::new();
        cpus.set(cpu).context("backend CPU")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("backend runtime")?;
        let thread = {
            let counters = Arc::clone(&counters);
            std::thread::Builder::new()
                .name("bench-backend".into())
                .spawn(move || {
                    // Pid 0: the calling thread.
                    if let Err(err) = sched_setaffinity(Pid::from_raw(0), &cpus) {
                        eprintln!("backend: could not pin to CPU {cpu}: {err}");
                    }
                    runtime.block_on(accept_loop(listener, counters, stopped));
                })
                .context("backend thread")?
        };
        Ok(Self {
            addr,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted and requests answered so far.
    pub fn counts(&self) -> BackendCounts {
        BackendCounts {
            accepts: self.counters.accepts.load(Ordering::Relaxed),
            requests: self.counters.requests.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: StdListener,
    counters: Arc<Counters>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("backend: {err}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    counters.accepts.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, Arc::clone(&counters)));
                }
                Err(err) => eprintln!("backend accept: {err}"),
            },
        }
    }
}

/// Answers the requests of one connection until the peer closes it, asks to close it, or
/// sends something this backend does not handle (a request body).
async fn serve(mut stream: TcpStream, counters: Arc<Counters>) {
    let mut buf = vec![0u8; HEAD_LIMIT];
    let mut filled = 0;
    let mut out = Vec::with_capacity(4 * OK.len());
    loop {
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        // Answer every complete head in the buffer (pipelined requests) with one write.
        let mut start = 0;
        let mut close = false;
        while !close {
            match parse_head(&buf[start..filled]) {
                Head::Complete { len, answer } => {
                    start += len;
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(answer);
                    close = answer != OK;
                }
                Head::Partial => break,
                Head::Invalid => {
                    out.extend_from_slice(UNSUPPORTED);
                    close = true;
                }
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
        if close || (start == 0 && filled == buf.len()) {
            return;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}

enum Head {
    Complete { len: usize, answer: &'static [u8] },
    Partial,
    Invalid,
}

/// Parses one request head at the start of `bytes` and chooses its answer.
fn parse_head(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Invalid,
    };
    let mut close = request.version == Some(0);
    for header in request.headers.iter() {
        let value = header.value;
        if header.name.eq_ignore_ascii_case("content-length") && value != b"0"
            || header.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Head::Invalid;
        }
        if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    let answer = if close { OK_CLOSE } else { OK };
    Head::Complete { len, answer }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use super::*;

    #[test]
    fn answers_pipelined_keep_alive_requests_and_counts_them() {
        let backend = Backend::start(0).unwrap();
        let mut stream = TcpStream::connect(backend.addr()).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let mut got = vec![0u8; 2 * OK.len()];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(got, [OK, OK].concat());
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, OK_CLOSE);
        assert!(OK.ends_with(BODY));
        assert_eq!(
            backend.counts(),
            BackendCounts {
                accepts: 1,
                requests: 3
            }
        );
    }

    #[test]
    fn refuses_request_bodies() {
        assert!(matches!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Head::Invalid
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Head::Partial
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.0\r\n\r\n"),
            Head::Complete {
                answer: OK_CLOSE,
                ..
            }
        ));
    }
}
