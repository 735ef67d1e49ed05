//! The ingress's upstream side with the real agent and hand-made backends in a namespace:
//! kept-alive upstream connections are reused, an upstream connection the backend closed
//! while it idled is never used again, and 100 MiB request and response bodies stream
//! through in both directions with the agent's memory bounded.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use miren_tests::{
    ingress::{Backend, BackendMode, IngressWorld, read_chunk_size, read_response},
    topology::Netns,
};

// ---------------------------------------------------------------------------------------
// 1. Keep-alive: one client connection, one upstream connection.

#[test]
fn a_thousand_requests_on_one_client_connection_use_one_upstream_connection() {
    let world = IngressWorld::new("keepalive");
    let agent = world.start_agent(&[]);
    let backend = Backend::start(&world.ns, "ka", BackendMode::Normal);
    world.serve(&agent, "ka", &[backend.addr], "ka.example.com", &[]);

    let mut conn = world.connect(80);
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    for i in 0..1000 {
        // Every fourth request has a body, which must not keep the upstream from reuse.
        let request = if i % 4 == 3 {
            format!(
                "POST /n/{i} HTTP/1.1\r\nHost: ka.example.com\r\nContent-Length: 100\r\n\r\n{}",
                "b".repeat(100)
            )
        } else {
            format!("GET /n/{i} HTTP/1.1\r\nHost: ka.example.com\r\n\r\n")
        };
        conn.write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("request {i}: writing: {e}"));
        let response = read_response(&mut reader, false)
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", tail(&agent.log_text())));
        assert_eq!(response.status, 200, "request {i}: {response:?}");
        assert_eq!(response.body, "ka", "request {i}: {response:?}");
    }
    assert_eq!(backend.requests(), 1000);
    let accepts = backend.stats.accepts.load(Ordering::Relaxed);
    assert_eq!(
        accepts, 1,
        "1000 sequential requests on one client connection opened {accepts} upstream connections"
    );
}

// ---------------------------------------------------------------------------------------
// 2. An upstream that closes its idle connections.

/// What the half-closing backend saw.
#[derive(Debug, Default)]
struct IdleStats {
    accepts: AtomicUsize,
    requests: AtomicUsize,
    /// Connections it half-closed (FIN sent) after they idled.
    half_closes: AtomicUsize,
    /// Connections on which a byte arrived after that FIN.
    used_after_fin: AtomicUsize,
    /// The bytes that arrived after a FIN, all connections together.
    bytes_after_fin: AtomicU64,
    /// The first bytes that arrived after a FIN, for the failure message.
    first_after_fin: Mutex<Option<String>>,
}

/// How long a kept-alive connection may idle before the backend half-closes it.
const IDLE: Duration = Duration::from_millis(100);

/// A backend that answers each request (`200`, body `idle`, kept alive), and when a
/// connection has idled for [`IDLE`] after a response, half-closes it (`shutdown(Write)`,
/// a FIN) and goes on reading from it, counting whatever still arrives.
fn start_half_closing_backend(ns: &Netns) -> (SocketAddr, Arc<IdleStats>) {
    let listener = ns
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(IdleStats::default());
    let thread_stats = stats.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread_stats.accepts.fetch_add(1, Ordering::Relaxed);
            let stats = thread_stats.clone();
            std::thread::spawn(move || serve_then_half_close(conn, &stats));
        }
    });
    (addr, stats)
}

enum NextHead {
    /// A head of this many bytes is at the start of the buffer.
    Head(usize),
    /// Nothing arrived within the idle time.
    Idle,
    /// The peer closed the connection, or it failed.
    Closed,
}

/// Reads until `buf` holds a request head. With nothing received yet, gives up after the
/// socket's read timeout (`Idle`); a head that has begun is waited for up to 30 s more.
fn next_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> NextHead {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return NextHead::Head(end + 4);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) => return NextHead::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if buf.is_empty() {
                    return NextHead::Idle;
                }
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            }
            Err(_) => return NextHead::Closed,
        }
    }
}

fn serve_then_half_close(mut conn: TcpStream, stats: &IdleStats) {
    let mut buf = Vec::new();
    // A new connection gets its first request whenever the proxy sends it.
    let mut wait = Duration::from_secs(30);
    loop {
        let _ = conn.set_read_timeout(Some(wait));
        match next_head(&mut conn, &mut buf) {
            NextHead::Closed => return,
            NextHead::Idle => break,
            NextHead::Head(end) => {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = content_length(&head).unwrap_or(0);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                while buf.len() < end + length {
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..end + length);
                stats.requests.fetch_add(1, Ordering::Relaxed);
                if conn
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nidle")
                    .is_err()
                {
                    return;
                }
                wait = IDLE;
            }
        }
    }
    // Idle: send a FIN, keep the read side open, and count what still arrives.
    if conn.shutdown(Shutdown::Write).is_err() {
        return;
    }
    stats.half_closes.fetch_add(1, Ordering::Relaxed);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut first = true;
    let mut chunk = [0u8; 4096];
    while let Ok(n) = conn.read(&mut chunk) {
        if n == 0 {
            return;
        }
        if first {
            first = false;
            stats.used_after_fin.fetch_add(1, Ordering::Relaxed);
            stats
                .first_after_fin
                .lock()
                .unwrap()
                .get_or_insert_with(|| String::from_utf8_lossy(&chunk[..n]).into_owned());
        }
        stats.bytes_after_fin.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[test]
fn an_upstream_connection_closed_while_idle_is_never_reused() {
    let world = IngressWorld::new("idleclose");
    let agent = world.start_agent(&[]);
    let (addr, stats) = start_half_closing_backend(&world.ns);
    world.serve(&agent, "idle", &[addr], "idle.example.com", &[]);
    let pause = Duration::from_millis(500);
    let request = b"GET / HTTP/1.1\r\nHost: idle.example.com\r\n\r\n";
    let mut statuses = Vec::new();

    // Six requests on one kept-alive client connection, pausing between them.
    let mut conn = world.connect(80);
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    for i in 0..6 {
        if i > 0 {
            std::thread::sleep(pause);
        }
        conn.write_all(request).unwrap();
        let response = read_response(&mut reader, false)
            .unwrap_or_else(|e| panic!("kept-alive request {i}: {e}\n{}", tail(&agent.log_text())));
        statuses.push(response.status);
        assert_eq!(response.status, 200, "kept-alive request {i}: {response:?}");
    }
    drop((conn, reader));
    // Six more, each on a new client connection.
    for i in 0..6 {
        std::thread::sleep(pause);
        let mut conn = world.connect(80);
        conn.write_all(request).unwrap();
        let response = read_response(&mut BufReader::new(conn), false).unwrap_or_else(|e| {
            panic!(
                "new-connection request {i}: {e}\n{}",
                tail(&agent.log_text())
            )
        });
        statuses.push(response.status);
        assert_eq!(
            response.status, 200,
            "new-connection request {i}: {response:?}"
        );
    }
    assert_eq!(statuses, [200; 12]);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 12);

    // Every connection that served a request idles and is half-closed in turn.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.half_closes.load(Ordering::Relaxed) < 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let half_closes = stats.half_closes.load(Ordering::Relaxed);
    assert!(
        half_closes >= 12,
        "the backend half-closed only {half_closes} idle connections"
    );
    let used = stats.used_after_fin.load(Ordering::Relaxed);
    assert_eq!(
        used,
        0,
        "the ingress sent {} bytes on {used} upstream connection(s) after the backend's FIN \
         (of {} accepted), first: {:?}",
        stats.bytes_after_fin.load(Ordering::Relaxed),
        stats.accepts.load(Ordering::Relaxed),
        stats.first_after_fin.lock().unwrap(),
    );
}

// ---------------------------------------------------------------------------------------
// 3. 100 MiB bodies stream through both ways in bounded memory.

/// Bytes of each transfer.
const BIG: u64 = 100 << 20;
/// Size of each chunk the sender writes.
const CHUNK: usize = 64 << 10;
/// After this much, the receiver stops reading for [`STALL`]: a proxy that does not pass
/// back-pressure on would buffer what the sender pushes meanwhile.
const STALL_AT: u64 = 16 << 20;
const STALL: Duration = Duration::from_secs(2);
/// Allowed growth of the agent's peak resident memory (VmHWM) over both transfers.
const MAX_GROWTH_KIB: u64 = 64 << 10;

/// FNV-1a (64 bits): the same value however the bytes are split.
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The test stream: bytes `8k..8k+8` are splitmix64(k), little-endian. `offset` and
/// `buf.len()` are multiples of 8.
fn fill(offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let mut z = (offset / 8 + i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn content_length(head: &str) -> Option<usize> {
    header(head, "content-length").and_then(|v| v.parse().ok())
}

fn framing(head: &str, request: bool) -> Framing {
    if header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        Framing::Chunked
    } else if let Some(n) = content_length(head) {
        Framing::Length(n as u64)
    } else if request {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    }
}

/// Reads a head (through the blank line) from `reader`.
fn read_head(reader: &mut impl BufRead) -> io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if reader.read_until(b'\n', &mut head)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed within a head: {:?}", String::from_utf8_lossy(&head)),
            ));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Streams a body to `sink` piece by piece (never whole); returns its length.
fn read_body(
    reader: &mut impl BufRead,
    framing: Framing,
    mut sink: impl FnMut(&[u8]),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut copy = |reader: &mut dyn BufRead, mut left: u64, until_close: bool| {
        while left > 0 {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                if until_close {
                    return Ok(());
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed {left} bytes short of a body (after {total})"),
                ));
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            sink(&buf[..n]);
            reader.consume(n);
            left -= n as u64;
            total += n as u64;
        }
        Ok::<(), io::Error>(())
    };
    match framing {
        Framing::Length(n) => copy(reader, n, false)?,
        Framing::UntilClose => copy(reader, u64::MAX, true)?,
        Framing::Chunked => {
            while let Some(size) = read_chunk_size(reader)? {
                copy(reader, size, false)?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        }
    }
    Ok(total)
}

/// Writes the [`BIG`]-byte test stream chunked to `out`; returns its hash.
fn write_chunked_stream(out: &mut impl Write) -> io::Result<u64> {
    let mut hash = Fnv::new();
    let mut data = vec![0u8; CHUNK];
    let mut framed = Vec::with_capacity(CHUNK + 16);
    let mut offset = 0;
    while offset < BIG {
        fill(offset, &mut data);
        hash.update(&data);
        framed.clear();
        framed.extend_from_slice(format!("{CHUNK:x}\r\n").as_bytes());
        framed.extend_from_slice(&data);
        framed.extend_from_slice(b"\r\n");
        out.write_all(&framed)?;
        offset += CHUNK as u64;
    }
    out.write_all(b"0\r\n\r\n")?;
    Ok(hash.0)
}

/// Hashes a body while counting it, stalling once at [`STALL_AT`].
struct Receiver {
    hash: Fnv,
    bytes: u64,
    stalled: bool,
}

impl Receiver {
    fn new() -> Self {
        Self {
            hash: Fnv::new(),
            bytes: 0,
            stalled: false,
        }
    }

    fn take(&mut self, piece: &[u8]) {
        self.hash.update(piece);
        self.bytes += piece.len() as u64;
        if !self.stalled && self.bytes >= STALL_AT {
            self.stalled = true;
            std::thread::sleep(STALL);
        }
    }
}

/// What the streaming backend received and sent: (bytes, hash) of each.
#[derive(Debug, Default)]
struct StreamStats {
    uploads: Mutex<Vec<(String, u64, u64)>>,
    downloads: Mutex<Vec<(u64, u64)>>,
}

/// A backend for big bodies: `POST /upload` reads the body (any framing), stalls once at
/// [`STALL_AT`], and answers `BYTES HASH`; `GET /download` answers the [`BIG`]-byte test
/// stream chunked; anything else gets `200 ok`.
fn start_stream_backend(ns: &Netns) -> (SocketAddr, Arc<StreamStats>) {
    let listener = ns
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(StreamStats::default());
    let thread_stats = stats.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let stats = thread_stats.clone();
            std::thread::spawn(move || {
                let _ = serve_streams(conn, &stats);
            });
        }
    });
    (addr, stats)
}

fn serve_streams(mut conn: TcpStream, stats: &StreamStats) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    conn.set_write_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::with_capacity(CHUNK, conn.try_clone()?);
    loop {
        let head = read_head(&mut reader)?;
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let body_framing = framing(&head, true);
        if target == "/upload" {
            let mut received = Receiver::new();
            read_body(&mut reader, body_framing, |piece| received.take(piece))?;
            let te = header(&head, "transfer-encoding").unwrap_or("-").to_owned();
            stats
                .uploads
                .lock()
                .unwrap()
                .push((te, received.bytes, received.hash.0));
            let body = format!("{} {:016x}", received.bytes, received.hash.0);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes())?;
        } else if target == "/echo" {
            // Answers at once and echoes each piece of the body as it arrives (full duplex).
            conn.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            let mut out = conn.try_clone()?;
            let mut failed = None;
            read_body(&mut reader, body_framing, |piece| {
                let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
                framed.extend_from_slice(piece);
                framed.extend_from_slice(b"\r\n");
                if let Err(error) = out.write_all(&framed) {
                    failed.get_or_insert(error);
                }
            })?;
            if let Some(error) = failed {
                return Err(error);
            }
            conn.write_all(b"0\r\n\r\n")?;
        } else if target == "/download" {
            read_body(&mut reader, body_framing, |_| {})?;
            conn.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            let hash = write_chunked_stream(&mut conn)?;
            stats.downloads.lock().unwrap().push((BIG, hash));
        } else {
            read_body(&mut reader, body_framing, |_| {})?;
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
        }
    }
}

/// The agent's peak resident memory (VmHWM), KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in\n{status}"))
}

/// A client connection for a big transfer: generous timeouts, with a buffered reader.
fn big_connection(world: &IngressWorld) -> (TcpStream, BufReader<TcpStream>) {
    let conn = world.connect(80);
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let reader = BufReader::with_capacity(CHUNK, conn.try_clone().unwrap());
    (conn, reader)
}

#[test]
fn hundred_mib_chunked_upload_and_download_stream_through_in_bounded_memory() {
    let world = IngressWorld::new("bigbody");
    // The body limit (default 100 MiB) well above the upload.
    let agent = world.start_agent(&["--http-max-body", "1G"]);
    let (addr, stats) = start_stream_backend(&world.ns);
    world.serve(&agent, "big", &[addr], "big.example.com", &[]);
    let host = "big.example.com";

    // A first request warms up the agent's steady state (connections, buffers).
    let (mut conn, mut reader) = big_connection(&world);
    conn.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let warm = read_response(&mut reader, false).expect("warm-up response");
    assert_eq!(warm.status, 200, "{warm:?}");
    drop((conn, reader));
    let before = vm_hwm_kib(agent.pid());

    // Upload: the client streams 100 MiB chunked, the backend hashes what arrives.
    let (mut conn, mut reader) = big_connection(&world);
    conn.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let sent = match write_chunked_stream(&mut conn) {
        Ok(hash) => hash,
        Err(e) => {
            let answer = read_response(&mut reader, false);
            panic!(
                "writing the upload failed ({e}); the ingress answered {answer:?}\n{}",
                tail(&agent.log_text())
            );
        }
    };
    let response = read_response(&mut reader, false).expect("the upload's response");
    assert_eq!(
        response.status,
        200,
        "{response:?}\n{}",
        tail(&agent.log_text())
    );
    assert_eq!(
        response.body,
        format!("{BIG} {sent:016x}"),
        "what the backend received (bytes, hash) differs from what the client sent"
    );
    drop((conn, reader));
    let uploads = stats.uploads.lock().unwrap().clone();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let after_upload = vm_hwm_kib(agent.pid());

    // Download: the backend streams 100 MiB chunked, the client hashes what arrives.
    let (mut conn, mut reader) = big_connection(&world);
    conn.write_all(format!("GET /download HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut reader).expect("the download's head");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head}\n{}",
        tail(&agent.log_text())
    );
    let mut received = Receiver::new();
    let length = read_body(&mut reader, framing(&head, false), |piece| {
        received.take(piece);
    })
    .unwrap_or_else(|e| {
        panic!(
            "reading the download failed after {} bytes: {e}\n{head}\n{}",
            received.bytes,
            tail(&agent.log_text())
        )
    });
    // The backend records the download once its last write returned, which may be after
    // the client has read it all through the ingress.
    let deadline = Instant::now() + Duration::from_secs(30);
    let downloads = loop {
        let downloads = stats.downloads.lock().unwrap().clone();
        if !downloads.is_empty() || Instant::now() > deadline {
            break downloads;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    assert_eq!(
        (length, received.hash.0),
        downloads[0],
        "what the client received (bytes, hash) differs from what the backend sent; head:\n{head}"
    );
    let after = vm_hwm_kib(agent.pid());

    let growth = after.saturating_sub(before);
    assert!(
        growth < MAX_GROWTH_KIB,
        "the agent's peak memory grew by {growth} KiB (VmHWM {before} KiB before, {after_upload} \
         KiB after the upload, {after} KiB after the download); bodies must stream, not buffer"
    );
}

/// The end of an agent log, for failure messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "agent log (end):\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}

/// An instance that answers before the request body is complete and streams its response
/// while the body still arrives (full duplex): the ingress keeps relaying both ways, so each
/// piece the client sends comes back before it sends the next.
#[test]
fn a_response_streamed_while_the_request_body_arrives_flows_both_ways() {
    let world = IngressWorld::new("duplex");
    let agent = world.start_agent(&[]);
    let (addr, _stats) = start_stream_backend(&world.ns);
    world.serve(&agent, "echo", &[addr], "echo.example.com", &[]);
    let (mut conn, mut reader) = big_connection(&world);
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(
        b"POST /echo HTTP/1.1\r\nHost: echo.example.com\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut reader)
        .unwrap_or_else(|e| panic!("no response head: {e}\n{}", tail(&agent.log_text())));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(framing(&head, false), Framing::Chunked, "{head}");
    for i in 0..20 {
        let piece = format!("piece {i}");
        write!(conn, "{:x}\r\n{piece}\r\n", piece.len()).unwrap();
        let mut size = String::new();
        reader.read_line(&mut size).unwrap_or_else(|e| {
            panic!(
                "piece {i} did not come back while the body was still open: {e}\n{}",
                tail(&agent.log_text())
            )
        });
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut echoed = vec![0u8; size + 2];
        reader.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed[..size], piece.as_bytes());
    }
    conn.write_all(b"0\r\n\r\n").unwrap();
    let mut last = String::new();
    reader.read_line(&mut last).unwrap();
    assert_eq!(last, "0\r\n");
}

/// An answer of the ingress's own to a request whose body has not arrived (here a 404 for a
/// 50 MB upload) closes the client connection: reading the rest just to keep the connection
/// would let a client make the ingress take in bodies nothing uses. (pingora-core's server
/// session does it: `close_on_response_before_downstream_finish`, on by default.)
#[test]
fn an_answer_of_the_ingress_to_a_request_with_an_unread_body_closes_the_connection() {
    let world = IngressWorld::new("unread");
    let _agent = world.start_agent(&[]);
    let mut conn = world.connect(80);
    conn.write_all(
        b"POST / HTTP/1.1\r\nHost: nowhere.example.com\r\nContent-Length: 50000000\r\n\r\npartial",
    )
    .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let response = read_response(&mut reader, false).expect("the 404");
    assert_eq!(response.status, 404, "{response:?}");
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("the ingress closes the connection after its answer");
    assert!(rest.is_empty(), "{rest:?}");
}
