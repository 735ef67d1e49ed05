//! The benchmark's upstream: a minimal HTTP/1.1 keep-alive server answering every request
//! with `200` and a 13-byte body, on one thread (a current-thread tokio runtime), pinned to a
//! chosen CPU or not. It counts the connections it accepts and the requests it answers, so a
//! run can tell how well a proxy reuses its upstream connections.
//!
//! For the large-body rows it also streams and takes large bodies without holding them in
//! memory: `GET /bytes/N` answers N bytes with a `Content-Length`, `GET /chunked/N` the same
//! bytes chunked, and a request with a `Content-Length` body has the body read, counted and
//! checked, and is answered `received N bytes, pattern ok` (or where the pattern broke). Every
//! large body carries [`pattern`]: byte i is `i % 251`, so a lost, repeated or reordered piece
//! shows.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    sync::{
        Arc, LazyLock,
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
/// The period of the large bodies' byte pattern (a prime, so no power-of-two piece size
/// lines up with it).
pub const PATTERN_PERIOD: usize = 251;
/// Large bodies are written (and the upload side read) in pieces of this many bytes, a
/// multiple of [`PATTERN_PERIOD`] so every piece starts the pattern over (~251 KiB).
pub const PIECE: usize = PATTERN_PERIOD * 1024;

/// One [`PIECE`] of the pattern: byte i is `i % 251`.
pub fn pattern() -> &'static [u8] {
    static PATTERN: LazyLock<Vec<u8>> = LazyLock::new(|| {
        (0..PIECE)
            .map(|i| u8::try_from(i % PATTERN_PERIOD).unwrap_or(0))
            .collect()
    });
    &PATTERN
}

/// Checks a large body against [`pattern`] as its pieces arrive, and counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyCheck {
    /// Bytes seen so far.
    pub received: u64,
    /// The offset of the first byte that broke the pattern, if one did.
    pub first_wrong: Option<u64>,
}

impl BodyCheck {
    /// Takes the next `data` of the body.
    pub fn feed(&mut self, data: &[u8]) {
        if self.first_wrong.is_none() {
            let pattern = pattern();
            let mut start = (self.received % PATTERN_PERIOD as u64) as usize;
            let mut offset = self.received;
            // start < PATTERN_PERIOD, so start + piece.len() <= PIECE.
            for piece in data.chunks(PIECE - PATTERN_PERIOD) {
                let expected = &pattern[start..start + piece.len()];
                if piece != expected {
                    let at = piece
                        .iter()
                        .zip(expected)
                        .take_while(|(a, b)| a == b)
                        .count();
                    self.first_wrong = Some(offset + at as u64);
                    break;
                }
                offset += piece.len() as u64;
                start = (start + piece.len()) % PATTERN_PERIOD;
            }
        }
        self.received += data.len() as u64;
    }

    /// `received N bytes, pattern ok` or `… pattern wrong from byte X`.
    pub fn summary(&self) -> String {
        match self.first_wrong {
            None => format!("received {} bytes, pattern ok", self.received),
            Some(at) => format!(
                "received {} bytes, pattern wrong from byte {at}",
                self.received
            ),
        }
    }
}

/// What the backend has done since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendCounts {
    /// Connections accepted.
    pub accepts: u64,
    /// Requests answered.
    pub requests: u64,
    /// Request body bytes read (and checked against the pattern).
    pub body_in: u64,
    /// Large response body bytes written.
    pub body_out: u64,
}

impl std::ops::Sub for BackendCounts {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            accepts: self.accepts - earlier.accepts,
            requests: self.requests - earlier.requests,
            body_in: self.body_in - earlier.body_in,
            body_out: self.body_out - earlier.body_out,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepts: AtomicU64,
    requests: AtomicU64,
    body_in: AtomicU64,
    body_out: AtomicU64,
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
    /// Binds 127.0.0.1 on a free port and serves on a thread pinned to `cpu` (`None`: not
    /// pinned).
    ///
    /// # Errors
    /// If the socket cannot be bound or the thread cannot start.
    pub fn start(cpu: Option<usize>) -> Result<Self> {
        let listener = StdListener::bind("127.0.0.1:0").context("binding the backend")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let cpus = match cpu {
            Some(cpu) => {
                let mut cpus = CpuSet::new();
                cpus.set(cpu).context("backend CPU")?;
                Some((cpu, cpus))
            }
            None => None,
        };
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
                    if let Some((cpu, cpus)) = cpus
                        && let Err(err) = sched_setaffinity(Pid::from_raw(0), &cpus)
                    {
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
            body_in: self.counters.body_in.load(Ordering::Relaxed),
            body_out: self.counters.body_out.load(Ordering::Relaxed),
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
/// sends something this backend does not handle (a chunked request body).
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
                Head::Complete {
                    len,
                    answer,
                    close: last,
                } => {
                    start += len;
                    close = last;
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    match answer {
                        Answer::Fixed(answer) => out.extend_from_slice(answer),
                        Answer::Download { len, chunked } => {
                            if flush(&mut stream, &mut out).await.is_err()
                                || download(&mut stream, len, chunked, close, &counters)
                                    .await
                                    .is_err()
                            {
                                return;
                            }
                        }
                        Answer::Upload { len } => {
                            // The body's first bytes may have come with the head.
                            let buffered =
                                (filled - start).min(usize::try_from(len).unwrap_or(usize::MAX));
                            let mut check = BodyCheck::default();
                            check.feed(&buf[start..start + buffered]);
                            start += buffered;
                            if upload(&mut stream, len, &mut check).await.is_err() {
                                return;
                            }
                            counters
                                .body_in
                                .fetch_add(check.received, Ordering::Relaxed);
                            let body = format!("{}\n", check.summary());
                            out.extend_from_slice(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
                                    body.len(),
                                    if close { "Connection: close\r\n" } else { "" }
                                )
                                .as_bytes(),
                            );
                        }
                    }
                }
                Head::Partial => break,
                Head::Invalid => {
                    out.extend_from_slice(UNSUPPORTED);
                    close = true;
                }
            }
        }
        if flush(&mut stream, &mut out).await.is_err() {
            return;
        }
        if close || (start == 0 && filled == buf.len()) {
            return;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}

/// Writes and clears `out`, if it holds anything.
async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Streams `len` pattern bytes as a response, with a `Content-Length` or chunked, a piece at
/// a time.
async fn download(
    stream: &mut TcpStream,
    len: u64,
    chunked: bool,
    close: bool,
    counters: &Counters,
) -> std::io::Result<()> {
    let framing = if chunked {
        "Transfer-Encoding: chunked\r\n".to_owned()
    } else {
        format!("Content-Length: {len}\r\n")
    };
    let connection = if close { "Connection: close\r\n" } else { "" };
    stream
        .write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{framing}{connection}\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let pattern = pattern();
    let chunk = |n: usize| [format!("{n:x}\r\n").as_bytes(), &pattern[..n], b"\r\n"].concat();
    let full_chunk = if chunked { chunk(PIECE) } else { Vec::new() };
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(PIECE, |left| left.min(PIECE));
        match (chunked, n == PIECE) {
            (false, _) => stream.write_all(&pattern[..n]).await?,
            (true, true) => stream.write_all(&full_chunk).await?,
            (true, false) => stream.write_all(&chunk(n)).await?,
        }
        left -= n as u64;
        counters.body_out.fetch_add(n as u64, Ordering::Relaxed);
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Reads the rest of a `len`-byte request body into `check` (which has seen its first bytes),
/// never past its end.
async fn upload(stream: &mut TcpStream, len: u64, check: &mut BodyCheck) -> std::io::Result<()> {
    let mut buf = vec![0u8; PIECE];
    while check.received < len {
        let want = usize::try_from(len - check.received).map_or(PIECE, |left| left.min(PIECE));
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        check.feed(&buf[..n]);
    }
    Ok(())
}

/// What a request gets.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A fixed answer: the 13-byte body.
    Fixed(&'static [u8]),
    /// `GET /bytes/N` (`Content-Length`) or `GET /chunked/N`: N pattern bytes.
    Download { len: u64, chunked: bool },
    /// A request with a `Content-Length` body of `len` bytes: read, counted and checked.
    Upload { len: u64 },
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    Complete {
        len: usize,
        answer: Answer,
        /// Whether the connection closes after the answer.
        close: bool,
    },
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
    let mut body = 0;
    for header in request.headers.iter() {
        let value = header.value;
        if header.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) => body = n,
                None => return Head::Invalid,
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Head::Invalid;
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    let download = |prefix: &str| {
        request
            .path?
            .strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };
    let answer = if body > 0 {
        Answer::Upload { len: body }
    } else if request.method != Some("GET") {
        Answer::Fixed(if close { OK_CLOSE } else { OK })
    } else if let Some(len) = download("/bytes/") {
        Answer::Download {
            len,
            chunked: false,
        }
    } else if let Some(len) = download("/chunked/") {
        Answer::Download { len, chunked: true }
    } else {
        Answer::Fixed(if close { OK_CLOSE } else { OK })
    };
    Head::Complete { len, answer, close }
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
        let backend = Backend::start(Some(0)).unwrap();
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
                requests: 3,
                ..BackendCounts::default()
            }
        );
    }

    #[test]
    fn parses_heads() {
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Head::Complete {
                len: 38,
                answer: Answer::Upload { len: 3 },
                close: false
            }
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Head::Invalid
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n"), Head::Partial);
        assert!(matches!(
            parse_head(b"GET / HTTP/1.0\r\n\r\n"),
            Head::Complete {
                answer: Answer::Fixed(OK_CLOSE),
                close: true,
                ..
            }
        ));
        assert!(matches!(
            parse_head(b"GET /chunked/77 HTTP/1.1\r\n\r\n"),
            Head::Complete {
                answer: Answer::Download {
                    len: 77,
                    chunked: true
                },
                ..
            }
        ));
    }

    #[test]
    fn the_body_check_finds_the_first_wrong_byte_across_pieces() {
        let body: Vec<u8> = pattern().iter().chain(pattern()).copied().collect();
        let mut check = BodyCheck::default();
        for piece in body.chunks(1000) {
            check.feed(piece);
        }
        assert_eq!(
            check.summary(),
            format!("received {} bytes, pattern ok", 2 * PIECE)
        );
        let mut lost = body.clone();
        lost.remove(300_000);
        let mut check = BodyCheck::default();
        for piece in lost.chunks(7777) {
            check.feed(piece);
        }
        assert_eq!(check.first_wrong, Some(300_000));
    }

    /// Reads a whole answer to `request` (sent on a new connection that the backend closes).
    fn exchange(backend: &Backend, request: &[u8], body: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(backend.addr()).unwrap();
        stream.write_all(request).unwrap();
        stream.write_all(body).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        answer
    }

    #[test]
    fn streams_large_bodies_both_ways() {
        let backend = Backend::start(None).unwrap();
        let len = PIECE + 10;
        let answer = exchange(
            &backend,
            format!("GET /bytes/{len} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
            b"",
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(&answer[..head.len()], head.as_bytes());
        let mut check = BodyCheck::default();
        check.feed(&answer[head.len()..]);
        assert_eq!((check.received, check.first_wrong), (len as u64, None));

        let answer = exchange(
            &backend,
            format!("GET /chunked/{len} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
            b"",
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.contains("Transfer-Encoding: chunked\r\n"),
            "{text:.200}"
        );
        assert!(
            text.contains(&format!("\r\n\r\n{PIECE:x}\r\n")),
            "{text:.200}"
        );
        assert!(answer.ends_with(b"\r\na\r\n\0\x01\x02\x03\x04\x05\x06\x07\x08\x09\r\n0\r\n\r\n"));

        let mut body: Vec<u8> = pattern().iter().chain(&pattern()[..10]).copied().collect();
        let answer = exchange(
            &backend,
            format!("PUT /up HTTP/1.1\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            &body,
        );
        assert!(
            answer.ends_with(format!("\r\n\r\nreceived {len} bytes, pattern ok\n").as_bytes()),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        body[5] = 0;
        let answer = exchange(
            &backend,
            format!("POST /up HTTP/1.1\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            &body,
        );
        assert!(
            answer
                .ends_with(format!("received {len} bytes, pattern wrong from byte 5\n").as_bytes())
        );
        let counts = backend.counts();
        assert_eq!(
            (counts.body_in, counts.body_out),
            (2 * len as u64, 2 * len as u64)
        );
    }
}
