//! The `large-body` group: 1 GiB downloads (with a `Content-Length`, and chunked) and 1 GiB
//! uploads straight to the backend (the ceiling), through nginx and through the agent's
//! ingress: throughput, the proxy's CPU time, and the proxy's peak memory growth while it
//! streams (target for the agent: < 64 MiB).
//!
//! The client here is the same for all three paths: plain blocking `TcpStream`s on a thread
//! pinned to [`LOAD_CPU`] (with the backend), one new connection per transfer, reading and
//! writing pieces of ~251 KiB, checking every byte of a download against the backend's
//! pattern as it arrives, never holding a body. An upload's answer says how many bytes the
//! backend received and whether they carried the pattern; a short or wrong body fails the run.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};

use super::{
    Agent, AgentOptions, HOST, LOAD_CPU, NGINX_ACCESS_LOG, PROXY_CPU, cpu_of, free_addr, met,
    rustc_processes,
};
use super::{
    backend::{Backend, BodyCheck, PIECE, pattern},
    load::{self, CpuTimes},
    nginx::{Nginx, NginxConfig},
};

/// Bytes per transfer.
const SIZE: u64 = 1 << 30;
/// Runs of each transfer per path; the table shows the median throughput.
const RUNS: usize = 3;
/// Target: the agent's peak RSS growth over its idle RSS during a transfer.
const GROWTH_TARGET_MIB: f64 = 64.0;
/// Longest wait for any read or write of a transfer.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent's `--http-max-body`: above [`SIZE`].
const AGENT_MAX_BODY: &str = "2G";

/// What is transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `GET /bytes/SIZE`: a response with a `Content-Length`.
    Download,
    /// `GET /chunked/SIZE`: a chunked response.
    DownloadChunked,
    /// `POST` with a `Content-Length` body.
    Upload,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Download, Self::DownloadChunked, Self::Upload];

    fn name(self) -> &'static str {
        match self {
            Self::Download => "1 GiB download (Content-Length)",
            Self::DownloadChunked => "1 GiB download (chunked)",
            Self::Upload => "1 GiB upload (Content-Length)",
        }
    }
}

/// One path's runs of one kind of transfer.
#[derive(Debug)]
struct Row {
    path: &'static str,
    kind: Kind,
    /// MiB/s of each run.
    mib_s: Vec<f64>,
    /// The proxy's CPU seconds per run (mean).
    proxy_cpu: Option<f64>,
    /// Busy % of [`PROXY_CPU`] and [`LOAD_CPU`] over the runs.
    cpu_busy: (f64, f64),
    /// The proxy's RSS just before the first run and its largest peak growth over the RSS
    /// just before a run, in MiB.
    memory: Option<(f64, f64)>,
    /// Whether a build (rustc) ran at the start or the end of a run.
    rustc: bool,
}

impl Row {
    fn median(&self) -> f64 {
        let mut sorted = self.mib_s.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
}

/// Runs the group and prints its table.
pub(super) fn run() -> Result<()> {
    let backend = Backend::start(Some(LOAD_CPU))?;
    let mut rows = Vec::new();
    // Whether /proc/PID/clear_refs reset the peak RSS before each run.
    let mut peak_reset = true;
    rows.extend(transfers(
        "direct to the backend (ceiling)",
        backend.addr(),
        &[],
        &backend,
        &mut peak_reset,
    )?);
    {
        let listen = free_addr()?;
        let hosts = [HOST.to_owned()];
        let nginx = Nginx::start(
            &NginxConfig {
                listen,
                backend: backend.addr(),
                hosts: &hosts,
                workers: 1,
                access_log: NGINX_ACCESS_LOG,
                streaming: true,
            },
            Some(PROXY_CPU),
        )?;
        super::check_routing("nginx", listen)?;
        rows.extend(transfers(
            "nginx",
            listen,
            &nginx.pids(),
            &backend,
            &mut peak_reset,
        )?);
    }
    let agent = Agent::start(AgentOptions {
        max_body: Some(AGENT_MAX_BODY),
        ..AgentOptions::PINNED
    })?;
    agent.deploy_and_route(backend.addr())?;
    rows.extend(transfers(
        "ingress",
        agent.http,
        &[agent.pid()],
        &backend,
        &mut peak_reset,
    )?);
    print(&rows, peak_reset);
    Ok(())
}

/// [`RUNS`] runs of each [`Kind`] against `target`; `pids` are the proxy's processes.
fn transfers(
    path: &'static str,
    target: SocketAddr,
    pids: &[u32],
    backend: &Backend,
    peak_reset: &mut bool,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        let mut mib_s = Vec::new();
        let mut cpu = 0.0;
        let mut idle_first = None;
        let mut growth: f64 = 0.0;
        let mut rustc = false;
        let busy_before = (CpuTimes::read(PROXY_CPU)?, CpuTimes::read(LOAD_CPU)?);
        for run in 1..=RUNS {
            // The peak since the last reset is the peak of this run.
            for pid in pids {
                *peak_reset &= std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
            }
            let idle = pids
                .iter()
                .map(|pid| Ok(load::memory(*pid)?.0.rss_mib))
                .sum::<Result<f64>>()?;
            idle_first.get_or_insert(idle);
            let counts = backend.counts();
            let cpu_before = cpu_of(pids)?;
            rustc |= rustc_processes() > 0;
            let took = on_load_cpu(|| transfer(kind, target, SIZE))
                .with_context(|| format!("{path}: {} (run {run})", kind.name()))?;
            rustc |= rustc_processes() > 0;
            cpu += cpu_of(pids)? - cpu_before;
            let peak = pids
                .iter()
                .map(|pid| Ok(load::memory(*pid)?.0.hwm_mib))
                .sum::<Result<f64>>()?;
            growth = growth.max(peak - idle);
            let moved = backend.counts() - counts;
            let backend_bytes = match kind {
                Kind::Upload => moved.body_in,
                Kind::Download | Kind::DownloadChunked => moved.body_out,
            };
            if backend_bytes != SIZE {
                bail!(
                    "{path}: {}: the backend moved {backend_bytes} body bytes, not {SIZE}",
                    kind.name()
                );
            }
            let speed = SIZE as f64 / (1 << 20) as f64 / took.as_secs_f64();
            let memory = if pids.is_empty() {
                String::new()
            } else {
                format!(", proxy RSS {idle:.1} MiB idle, peak {peak:.1} MiB")
            };
            eprintln!(
                "{path}: {} run {run}: {took:.2?}, {speed:.0} MiB/s{memory}",
                kind.name()
            );
            mib_s.push(speed);
        }
        let cpu_busy = (
            CpuTimes::read(PROXY_CPU)?.busy_percent_since(busy_before.0),
            CpuTimes::read(LOAD_CPU)?.busy_percent_since(busy_before.1),
        );
        let proxied = !pids.is_empty();
        rows.push(Row {
            path,
            kind,
            mib_s,
            proxy_cpu: proxied.then_some(cpu / RUNS as f64),
            cpu_busy,
            memory: idle_first.filter(|_| proxied).map(|idle| (idle, growth)),
            rustc,
        });
    }
    Ok(rows)
}

/// Runs `f` on a thread of its own pinned to [`LOAD_CPU`], with the backend.
fn on_load_cpu<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut cpus = CpuSet::new();
                cpus.set(LOAD_CPU)?;
                // Pid 0: the calling thread.
                sched_setaffinity(Pid::from_raw(0), &cpus)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the transfer thread panicked"))?
    })
}

/// One transfer of `size` bytes on a new connection; the time from connecting until the last
/// byte of the download, or the upload's answer, arrived.
fn transfer(kind: Kind, target: SocketAddr, size: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut conn = Conn::connect(target)?;
    let (status, body) = match kind {
        Kind::Download | Kind::DownloadChunked => {
            let path = if kind == Kind::Download {
                "bytes"
            } else {
                "chunked"
            };
            write!(
                conn.stream,
                "GET /{path}/{size} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
            )?;
            let mut check = BodyCheck::default();
            let status = conn.response(|data| check.feed(data))?;
            if status == 200 && (check.received != size || check.first_wrong.is_some()) {
                bail!("the download arrived wrong: {}", check.summary());
            }
            (status, check.summary())
        }
        Kind::Upload => {
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {size}\r\n\
                 Connection: close\r\n\r\n"
            );
            if let Err(err) = conn.send_body(head.as_bytes(), size) {
                // A proxy that refused the body may have answered why before it closed.
                let mut answer = Vec::new();
                let _ = conn.response(|data| answer.extend_from_slice(data));
                bail!(
                    "sending the upload failed: {err}; the answer: {:?}",
                    String::from_utf8_lossy(&answer)
                );
            }
            let mut answer = Vec::new();
            let status = conn.response(|data| answer.extend_from_slice(data))?;
            let answer = String::from_utf8_lossy(&answer).trim().to_owned();
            if status == 200 && answer != format!("received {size} bytes, pattern ok") {
                bail!("the backend received the upload wrong: {answer}");
            }
            (status, answer)
        }
    };
    let took = started.elapsed();
    if status != 200 {
        bail!("answered {status}: {body:.200}");
    }
    Ok(took)
}

/// A client connection with a read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Conn {
    fn connect(target: SocketAddr) -> Result<Self> {
        let stream =
            TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self {
            stream,
            buf: vec![0; PIECE],
            pos: 0,
            end: 0,
        })
    }

    /// Writes `head` and `size` pattern bytes, a piece at a time.
    fn send_body(&mut self, head: &[u8], size: u64) -> std::io::Result<()> {
        self.stream.write_all(head)?;
        let pattern = pattern();
        let mut left = size;
        while left > 0 {
            // Every piece starts the pattern over (PIECE is a multiple of its period).
            let n = usize::try_from(left).map_or(PIECE, |left| left.min(PIECE));
            self.stream.write_all(&pattern[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Reads more into the buffer, after what is unread; fails at the end of the stream.
    fn fill(&mut self) -> Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            bail!("a line longer than {} bytes", self.buf.len());
        }
        match self.stream.read(&mut self.buf[self.end..])? {
            0 => bail!("the connection closed early"),
            n => self.end += n,
        }
        Ok(())
    }

    /// The next line, without its CRLF.
    fn line(&mut self) -> Result<String> {
        loop {
            let unread = &self.buf[self.pos..self.end];
            if let Some(at) = unread.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&unread[..at]).into_owned();
                self.pos += at + 2;
                return Ok(line);
            }
            self.fill()?;
        }
    }

    /// Passes the next `len` bytes to `body`, as they arrive.
    fn take(&mut self, mut len: u64, body: &mut impl FnMut(&[u8])) -> Result<()> {
        while len > 0 {
            if self.pos == self.end {
                self.fill()?;
            }
            let n = usize::try_from(len)
                .map_or(self.end - self.pos, |len| len.min(self.end - self.pos));
            body(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            len -= n as u64;
        }
        Ok(())
    }

    /// Reads a response: its status; its body goes to `body` as it arrives (framed by
    /// `Content-Length`, chunked, or by the end of the connection).
    fn response(&mut self, mut body: impl FnMut(&[u8])) -> Result<u16> {
        let status_line = self.line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let line = self.line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<u64>().context("Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        if chunked {
            loop {
                let line = self.line()?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size, 16)
                    .with_context(|| format!("not a chunk size: {line:?}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.line()?.is_empty() {}
                    return Ok(status);
                }
                self.take(size, &mut body)?;
                if !self.line()?.is_empty() {
                    bail!("no CRLF after a chunk");
                }
            }
        }
        match length {
            Some(length) => self.take(length, &mut body)?,
            None => {
                body(&self.buf[self.pos..self.end]);
                self.pos = self.end;
                loop {
                    let n = self.stream.read(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    body(&self.buf[..n]);
                }
            }
        }
        Ok(status)
    }
}

fn print(rows: &[Row], peak_reset: bool) {
    println!("\n## Large bodies: 1 GiB through the ingress vs nginx (loopback)\n");
    println!(
        "Method: one backend thread and the client share CPU {LOAD_CPU}; the proxy runs alone \
         on CPU {PROXY_CPU} (nginx: worker_processes 1; the agent: 1 ingress thread, \
         --http-max-body {AGENT_MAX_BODY}), as in the single-core req/s table. Each transfer \
         is {SIZE} bytes on a new connection (`Connection: close`), {RUNS} runs per kind and \
         path, the median shown. The backend streams downloads from one ~251 KiB buffer of a \
         byte pattern (`Content-Length`, or 251 KiB chunks) and reads uploads a piece at a \
         time, checking and counting every byte; the client (Rust, blocking `TcpStream`, \
         ~251 KiB reads and writes, the same code for every path) checks every downloaded \
         byte. A short or wrong body fails the run. Time: from connect until the last body \
         byte (download) or the backend's answer to the upload arrived. nginx: \
         `proxy_buffering off`, `proxy_request_buffering off` (streams both ways, no temp \
         files), `proxy_buffer_size 64k` and `client_body_buffer_size 64k` (reads of at most \
         64 KiB, like Pingora's body buffer), `client_max_body_size 0`, upstream keepalive, \
         access log on as in the other tables. Proxy CPU: user + system seconds of the \
         proxy's processes per transfer (mean). Memory: before each run the proxy's peak RSS \
         is reset to its current RSS (`echo 5 > /proc/PID/clear_refs`){}; growth = VmHWM after \
         the run − VmRSS just before it, the largest of the runs (nginx: summed over master \
         and worker); \"idle\" is VmRSS before the first run.\n",
        if peak_reset {
            ""
        } else {
            " — this FAILED on this machine, so the peak may be older than the run"
        }
    );
    println!(
        "| path | transfer | MiB/s (median; runs) | ratio to nginx | proxy CPU s per GiB | CPU{PROXY_CPU} / CPU{LOAD_CPU} busy % | proxy RSS MiB: idle, peak growth |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let nginx = |kind: Kind| {
        rows.iter()
            .find(|row| row.path == "nginx" && row.kind == kind)
            .map_or(f64::NAN, Row::median)
    };
    for row in rows {
        let runs: Vec<String> = row.mib_s.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "| {} | {} | {:.0} ({}) | {:.2} | {} | {:.0} / {:.0} | {} |",
            row.path,
            row.kind.name(),
            row.median(),
            runs.join(", "),
            row.median() / nginx(row.kind),
            row.proxy_cpu
                .map_or("–".to_owned(), |cpu| format!("{cpu:.2}")),
            row.cpu_busy.0,
            row.cpu_busy.1,
            row.memory.map_or("–".to_owned(), |(idle, growth)| format!(
                "{idle:.1}, +{growth:.1}"
            )),
        );
    }
    let busy: Vec<String> = rows
        .iter()
        .filter(|row| row.rustc)
        .map(|row| format!("{}: {}", row.path, row.kind.name()))
        .collect();
    if busy.len() == rows.len() {
        println!("\nA build (rustc) was running during every row.");
    } else if !busy.is_empty() {
        println!("\nA build (rustc) was running during: {}.", busy.join("; "));
    }
    let (worst, growth) = rows
        .iter()
        .filter(|row| row.path == "ingress")
        .filter_map(|row| Some((row.kind, row.memory?.1)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((Kind::Download, f64::NAN));
    println!(
        "\n- Target: the agent's peak RSS grows by < {GROWTH_TARGET_MIB} MiB over its idle RSS \
         while it streams 1 GiB: **{}** (largest growth +{growth:.1} MiB, {}).",
        met(growth < GROWTH_TARGET_MIB),
        worst.name()
    );
    println!(
        "- No throughput target; the ingress reaches {} of nginx's MiB/s.",
        Kind::ALL
            .iter()
            .map(|kind| {
                let ingress = rows
                    .iter()
                    .find(|row| row.path == "ingress" && row.kind == *kind)
                    .map_or(f64::NAN, Row::median);
                format!("{:.2} ({})", ingress / nginx(*kind), kind.name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_moves_and_checks_every_kind_of_body() {
        let backend = Backend::start(None).unwrap();
        let size = 2 * PIECE as u64 + 5;
        for kind in Kind::ALL {
            transfer(kind, backend.addr(), size).unwrap();
        }
        let counts = backend.counts();
        assert_eq!((counts.body_in, counts.body_out), (size, 2 * size));
    }
}
