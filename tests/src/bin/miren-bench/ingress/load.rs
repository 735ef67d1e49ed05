//! The load generator (`wrk`, pinned to a CPU) and what the benchmark reads from /proc
//! around a load run: CPU time of the proxy's processes, per-CPU busy time, memory.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

/// `wrk`'s binary.
pub const WRK: &str = "wrk";

/// One wrk run's settings.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Open connections (keep-alive).
    pub connections: u32,
    /// wrk threads.
    pub threads: u32,
    /// Length of the run.
    pub duration: Duration,
    /// CPU wrk is pinned to (`None`: not pinned).
    pub cpu: Option<usize>,
}

/// What wrk reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkResult {
    /// Completed requests.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// 99th percentile latency in ms.
    pub p99_ms: f64,
}

/// Runs wrk against `target` with `Host: host`.
///
/// # Errors
/// If wrk fails, its output cannot be read, or any request failed (socket errors or non-2xx
/// answers), with wrk's output.
pub fn wrk(load: &Load, target: SocketAddr, host: &str) -> Result<WrkResult> {
    let mut command = pinned(WRK, load.cpu);
    let out = command
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration.as_secs()))
        .args(["--timeout", "5s", "--latency", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://{target}/"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("wrk output:\n{text}"))
}

/// `program` to be run on `cpu` (through `taskset`), or anywhere.
pub fn pinned(program: impl AsRef<std::ffi::OsStr>, cpu: Option<usize>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut command = Command::new("taskset");
            command.args(["-c", &cpu.to_string()]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Reads requests, requests/s and the 99th percentile from wrk's `--latency` output; any
/// failed request is an error.
fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut requests = None;
    let mut rps = None;
    let mut p99_ms = None;
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(value)) => rps = Some(value.parse::<f64>()?),
            (Some("99%"), Some(value)) => p99_ms = Some(duration_ms(value)?),
            (Some(count), Some("requests")) => requests = Some(count.parse::<u64>()?),
            _ if line.starts_with("Non-2xx") || line.starts_with("Socket errors") => {
                bail!("some requests failed: {line}")
            }
            _ => {}
        }
    }
    match (requests, rps, p99_ms) {
        (Some(requests), Some(rps), Some(p99_ms)) => Ok(WrkResult {
            requests,
            rps,
            p99_ms,
        }),
        _ => bail!("no request count, Requests/sec or 99% latency in wrk's output"),
    }
}

/// wrk's durations: `812.00us`, `1.52ms`, `2.01s`, `1.00m`.
fn duration_ms(value: &str) -> Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {value:?}"))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        other => bail!("unknown unit {other:?} in {value:?}"),
    })
}

/// User + system CPU time of process `pid` (all its threads), in seconds.
///
/// # Errors
/// If /proc/PID/stat cannot be read or parsed.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start with field 3 (state);
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse()
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The processes whose parent is `pid` (e.g. nginx's workers).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Busy and total jiffies of one CPU from /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// The current times of CPU `cpu`.
    ///
    /// # Errors
    /// If /proc/stat cannot be read or has no line for `cpu`.
    pub fn read(cpu: usize) -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let name = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|line| line.split_whitespace().next() == Some(name.as_str()))
            .with_context(|| format!("no {name} in /proc/stat"))?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let total: u64 = values.iter().take(8).sum();
        // idle and iowait
        let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
        Ok(Self {
            busy: total - idle,
            total,
        })
    }

    /// Percentage of the time since `earlier` that the CPU was busy.
    pub fn busy_percent_since(self, earlier: Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1);
        100.0 * self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

/// Memory of a process (or the sum over several), in MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    /// VmRSS.
    pub rss_mib: f64,
    /// VmHWM (peak RSS).
    pub hwm_mib: f64,
    /// Proportional set size: shared pages divided among their users, so sums over
    /// processes that share pages (nginx's master and workers) do not count them twice.
    pub pss_mib: f64,
}

impl std::ops::Add for Memory {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            rss_mib: self.rss_mib + other.rss_mib,
            hwm_mib: self.hwm_mib + other.hwm_mib,
            pss_mib: self.pss_mib + other.pss_mib,
        }
    }
}

/// The memory of `pid`, and its thread count.
///
/// # Errors
/// If /proc/PID/status or /proc/PID/smaps_rollup cannot be read or lack the fields.
pub fn memory(pid: u32) -> Result<(Memory, u32)> {
    let status = ProcFile::read(pid, "status")?;
    let rollup = ProcFile::read(pid, "smaps_rollup")?;
    let memory = Memory {
        rss_mib: status.kib("VmRSS:")? as f64 / 1024.0,
        hwm_mib: status.kib("VmHWM:")? as f64 / 1024.0,
        pss_mib: rollup.kib("Pss:")? as f64 / 1024.0,
    };
    Ok((memory, u32::try_from(status.kib("Threads:")?)?))
}

/// A /proc/PID file of `Name: value …` lines.
struct ProcFile {
    path: String,
    text: String,
}

impl ProcFile {
    fn read(pid: u32, name: &str) -> Result<Self> {
        let path = format!("/proc/{pid}/{name}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(Self { path, text })
    }

    /// The first number after `name` (kB for memory fields).
    fn kib(&self, name: &str) -> Result<u64> {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in {}", self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 10s test @ http://127.0.0.1:4000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.34us  100.10us   3.02ms   90.00%
    Req/Sec    60.12k     1.02k   62.00k    70.00%
  Latency Distribution
     50%  490.00us
     75%  520.00us
     90%  600.00us
     99%    1.25ms
  601234 requests in 10.00s, 60.00MB read
Requests/sec:  60123.40
Transfer/sec:      6.00MB
";

    #[test]
    fn reads_wrk_latency_output() {
        assert_eq!(
            parse_wrk(OUTPUT).unwrap(),
            WrkResult {
                requests: 601_234,
                rps: 60_123.4,
                p99_ms: 1.25
            }
        );
        let failed = OUTPUT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        assert!(parse_wrk(&failed).is_err());
        assert_eq!(duration_ms("812.00us").unwrap(), 0.812);
        assert_eq!(duration_ms("2.00s").unwrap(), 2000.0);
    }

    #[test]
    fn reads_own_process() {
        let (memory, threads) = memory(std::process::id()).unwrap();
        assert!(memory.rss_mib > 0.0 && memory.hwm_mib >= memory.rss_mib && threads >= 1);
        assert!(memory.pss_mib > 0.0);
        // VmRSS (status) lags behind the page-table walk of smaps_rollup while other test
        // threads allocate; PSS <= RSS holds within one walk.
        let rollup = ProcFile::read(std::process::id(), "smaps_rollup").unwrap();
        assert!(rollup.kib("Pss:").unwrap() <= rollup.kib("Rss:").unwrap());
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
        assert!(CpuTimes::read(0).is_ok());
    }
}
