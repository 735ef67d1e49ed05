//! `cargo xtask bench ingress`: the agent's HTTP ingress against nginx as the equivalent
//! reverse proxy, in the same run, on loopback.
//!
//! One backend (see [`backend`]) serves both proxies. Rows: straight to the backend (the
//! ceiling), nginx and the real `miren-agent` each with 1 route and with 10,000 routes. Each
//! row is a `wrk` warm-up followed by the measured keep-alive run; the table shows
//! requests/s, p99 latency, the ratio to nginx, the proxy's CPU use, how many upstream
//! connections the backend accepted (pool reuse) and the proxy's memory.
//!
//! CPU placement (2-core machine): the proxy under test (1 nginx worker, or the agent) runs
//! alone on [`PROXY_CPU`]; wrk and the backend share [`LOAD_CPU`].

mod backend;
mod floor;
mod load;
mod nginx;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use backend::{Backend, BackendCounts};
use floor::FloorProcess;
use load::{CpuTimes, Load, Memory, WRK, WrkResult};
use miren_agent::{
    api::types::{DeployRequest, RouteRequest, ServiceEndpoints},
    cli::Client,
};
use miren_tests::process::{AgentProcess, TempDir, binary};
use nginx::{Nginx, NginxConfig};

pub use floor::serve as serve_pingora_floor;

/// The CPU the proxy under test runs on.
const PROXY_CPU: usize = 0;
/// The CPU wrk and the backend run on.
const LOAD_CPU: usize = 1;
/// The measured run.
const LOAD: Load = Load {
    connections: 32,
    threads: 1,
    duration: Duration::from_secs(10),
    cpu: LOAD_CPU,
};
/// The warm-up run before each measured run.
const WARMUP: Load = Load {
    duration: Duration::from_secs(3),
    ..LOAD
};
/// The host every request names.
const HOST: &str = "app.bench.test";
/// Routes besides [`HOST`] in the 10,000-route rows.
const EXTRA_ROUTES: usize = 9_999;
/// How often a route is added during the route-change row.
const ROUTE_CHANGE_INTERVAL: Duration = Duration::from_millis(200);
/// Route creation time is reported per this many routes.
const ROUTE_BATCH: usize = 1000;
/// Whether nginx writes an access log line per request (to a file), like the agent's
/// per-request access log at its default log level.
const NGINX_ACCESS_LOG: bool = true;
/// The benchmark app: one http service whose endpoint the benchmark supplies.
const APP: &str = r#"name = "bench"

[services.web]
command = "./serve"
port = 8080
"#;

/// One measured row.
#[derive(Debug)]
struct Row {
    label: &'static str,
    wrk: WrkResult,
    /// CPU time of the proxy's processes during the measured run, in seconds.
    proxy_cpu: Option<f64>,
    /// Length of the measured run, in seconds.
    elapsed: f64,
    /// Busy % of [`PROXY_CPU`] and [`LOAD_CPU`] during the measured run.
    cpu_busy: (f64, f64),
    /// Backend connections and requests during the warm-up.
    warmup: BackendCounts,
    /// Backend connections and requests during the measured run.
    backend: BackendCounts,
    /// The proxy's memory after the measured run (summed over nginx's processes).
    memory: Option<Memory>,
    /// rustc processes running when the measured run started or ended.
    rustc: usize,
}

/// Runs the benchmark and prints its tables.
///
/// # Errors
/// When a tool is missing, a proxy does not start or route, or a request fails.
pub fn run() -> Result<()> {
    check_tools()?;
    let cpus = std::thread::available_parallelism()?.get();
    if cpus <= LOAD_CPU {
        bail!("this benchmark pins to CPUs {PROXY_CPU} and {LOAD_CPU}; only {cpus} available");
    }
    let backend = Backend::start(LOAD_CPU)?;
    let direct = measure(
        "direct to the backend (ceiling)",
        backend.addr(),
        &[],
        &backend,
    )?;

    let one = vec![HOST.to_owned()];
    let many: Vec<String> = std::iter::once(HOST.to_owned())
        .chain((0..EXTRA_ROUTES).map(|i| format!("r{i}.bench.test")))
        .collect();
    let nginx_one = measure_nginx("nginx, 1 route", &one, &backend)?;
    let nginx_many = measure_nginx("nginx, 10,000 routes", &many, &backend)?;

    let floor = {
        let process = FloorProcess::start(free_addr()?, backend.addr())?;
        measure(
            "Pingora alone (floor), no routing",
            process.listen(),
            &[process.pid()],
            &backend,
        )?
    };

    let agent = Agent::start()?;
    agent.deploy(backend.addr())?;
    agent.route(HOST)?;
    agent.wait_until_serving()?;
    check_routing("the ingress", agent.http)?;
    let ingress_one = measure("ingress, 1 route", agent.http, &[agent.pid()], &backend)?;
    let started = Instant::now();
    let mut batch_started = Instant::now();
    for (i, host) in many.iter().enumerate().skip(1) {
        agent.route(host)?;
        let routes = i + 1;
        if routes % ROUTE_BATCH == 1 {
            eprintln!(
                "routes {}–{routes}: {:.2} ms per route",
                routes + 1 - ROUTE_BATCH,
                batch_started.elapsed().as_secs_f64() * 1000.0 / ROUTE_BATCH as f64
            );
            batch_started = Instant::now();
        }
    }
    let routes_took = started.elapsed();
    check_routing("the ingress", agent.http)?;
    let ingress_many = measure(
        "ingress, 10,000 routes",
        agent.http,
        &[agent.pid()],
        &backend,
    )?;
    let (ingress_churn, churn_changes) = measure_with_route_changes(&agent, &backend)?;
    let (_, agent_threads) = load::memory(agent.pid())?;

    print_method(cpus, agent_threads, routes_took, churn_changes);
    print_table(&[
        (&nginx_one, &nginx_one),
        (&ingress_one, &nginx_one),
        (&nginx_many, &nginx_many),
        (&ingress_many, &nginx_many),
        (&ingress_churn, &nginx_many),
        (&floor, &nginx_one),
        (&direct, &nginx_one),
    ]);
    Ok(())
}

/// Measures the agent (with its 10,000 routes) while another thread adds a route every
/// [`ROUTE_CHANGE_INTERVAL`]; returns the row and how many routes were added.
fn measure_with_route_changes(agent: &Agent, backend: &Backend) -> Result<(Row, usize)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let changes = scope.spawn(|| {
            let mut added = 0;
            while !stop.load(Ordering::Relaxed) {
                agent.route(&format!("change{added}.bench.test"))?;
                added += 1;
                std::thread::sleep(ROUTE_CHANGE_INTERVAL);
            }
            anyhow::Ok(added)
        });
        let row = measure(
            "ingress, 10,000 routes, a route added every 200 ms",
            agent.http,
            &[agent.pid()],
            backend,
        );
        stop.store(true, Ordering::Relaxed);
        let added = changes
            .join()
            .map_err(|_| anyhow::anyhow!("the route-changing thread panicked"))??;
        Ok((row?, added))
    })
}

/// Starts nginx routing `hosts` to `backend`, checks its routing and measures it.
fn measure_nginx(label: &'static str, hosts: &[String], backend: &Backend) -> Result<Row> {
    let listen = free_addr()?;
    let started = Instant::now();
    let nginx = Nginx::start(
        &NginxConfig {
            listen,
            backend: backend.addr(),
            hosts,
            workers: 1,
            access_log: NGINX_ACCESS_LOG,
        },
        PROXY_CPU,
    )?;
    eprintln!("{label}: nginx started in {:.2?}", started.elapsed());
    check_routing("nginx", listen)?;
    measure(label, listen, &nginx.pids(), backend)
}

/// Fails with the package to install when nginx, wrk or taskset is missing.
fn check_tools() -> Result<()> {
    // wrk exits 1 even for --version; only whether the program starts matters.
    let found = |program: &str, arg: &str| Command::new(program).arg(arg).output().is_ok();
    if !found(nginx::NGINX, "-v") {
        bail!(
            "{} is missing: install the Debian package nginx-light (cargo xtask setup installs it)",
            nginx::NGINX
        );
    }
    if !found(WRK, "--version") {
        bail!("wrk is missing: install the Debian package wrk (cargo xtask setup installs it)");
    }
    if !found("taskset", "--version") {
        bail!("taskset is missing: install the Debian package util-linux");
    }
    Ok(())
}

/// A free port on 127.0.0.1 (bound and released).
fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET /` with `Host: host` on a new connection; the status code and the body.
fn http_get(target: SocketAddr, host: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(target)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(invalid)?;
    let status = std::str::from_utf8(&response[..head_end])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(invalid)?;
    Ok((status, response[head_end + 4..].to_vec()))
}

/// Checks that `proxy` at `target` proxies [`HOST`] to the backend and answers 404 for a host
/// without a route, so both proxies do the same routing work.
fn check_routing(proxy: &str, target: SocketAddr) -> Result<()> {
    let (status, body) = http_get(target, HOST)?;
    if status != 200 || !body.ends_with(backend::BODY) {
        bail!(
            "{proxy} answered {status} {:?} for {HOST}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _) = http_get(target, "unrouted.bench.test")?;
    if status != 404 {
        bail!("{proxy} answered {status} for a host without a route, not 404");
    }
    Ok(())
}

/// A warm-up run and a measured run of wrk against `target`; `pids` are the proxy's processes.
fn measure(
    label: &'static str,
    target: SocketAddr,
    pids: &[u32],
    backend: &Backend,
) -> Result<Row> {
    let cpu_of =
        |pids: &[u32]| -> Result<f64> { pids.iter().map(|pid| load::cpu_seconds(*pid)).sum() };
    let counts_before = backend.counts();
    load::wrk(&WARMUP, target, HOST).with_context(|| format!("{label}: warm-up"))?;
    let measured_before = backend.counts();
    let rustc_before = rustc_processes();
    let proxy_before = cpu_of(pids)?;
    let cpu_before = (CpuTimes::read(PROXY_CPU)?, CpuTimes::read(LOAD_CPU)?);
    let started = Instant::now();
    let wrk = load::wrk(&LOAD, target, HOST).with_context(|| label)?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_busy = (
        CpuTimes::read(PROXY_CPU)?.busy_percent_since(cpu_before.0),
        CpuTimes::read(LOAD_CPU)?.busy_percent_since(cpu_before.1),
    );
    let proxy_cpu = if pids.is_empty() {
        None
    } else {
        Some(cpu_of(pids)? - proxy_before)
    };
    let rustc = rustc_before.max(rustc_processes());
    let served = backend.counts() - measured_before;
    if served.requests < wrk.requests {
        bail!(
            "{label}: wrk completed {} requests but the backend answered only {}",
            wrk.requests,
            served.requests
        );
    }
    let memory = pids
        .iter()
        .map(|pid| Ok(load::memory(*pid)?.0))
        .reduce(|a: Result<Memory>, b| Ok(a? + b?))
        .transpose()?;
    let row = Row {
        label,
        wrk,
        proxy_cpu,
        elapsed,
        cpu_busy,
        warmup: measured_before - counts_before,
        backend: served,
        memory,
        rustc,
    };
    eprintln!("{row:?}");
    Ok(row)
}

/// How many rustc processes run now (another build competing for the CPUs).
fn rustc_processes() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "rustc")
        })
        .count()
}

fn print_method(cpus: usize, agent_threads: u32, routes_took: Duration, churn_changes: usize) {
    println!("\n## HTTP ingress vs nginx (loopback, keep-alive, 13-byte responses)\n");
    println!(
        "Method: {cpus} CPUs. The proxy under test runs alone on CPU {PROXY_CPU} (nginx: \
         worker_processes 1; agent: {agent_threads} threads); wrk (-t{} -c{}, {} s measured \
         after a {} s warm-up, keep-alive) and the backend (one pinned thread) share CPU \
         {LOAD_CPU}. nginx access_log {}; agent RUST_LOG {}. Creating {EXTRA_ROUTES} more \
         routes through the API took {:.1} s ({:.2} ms each). In the route-change row a \
         thread added {churn_changes} routes through the API during warm-up and run, one \
         every {} ms (each call returns once the ingress routes with it).\n",
        LOAD.threads,
        LOAD.connections,
        LOAD.duration.as_secs(),
        WARMUP.duration.as_secs(),
        if NGINX_ACCESS_LOG {
            "on (a file)"
        } else {
            "off"
        },
        std::env::var("RUST_LOG").unwrap_or_else(|_| "unset (info)".into()),
        routes_took.as_secs_f64(),
        routes_took.as_secs_f64() * 1000.0 / EXTRA_ROUTES as f64,
        ROUTE_CHANGE_INTERVAL.as_millis(),
    );
}

/// Prints the table; each row with the nginx row its ratio is against.
fn print_table(rows: &[(&Row, &Row)]) {
    println!(
        "| path | req/s | p99 ms | ratio to nginx (req/s) | proxy CPU %, µs/req | CPU{PROXY_CPU} / CPU{LOAD_CPU} busy % | backend conns: warm-up + run (req/conn) | proxy memory MiB: RSS (peak), PSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (row, baseline) in rows {
        let cpu = row.proxy_cpu.map_or("–".to_owned(), |seconds| {
            format!(
                "{:.0}, {:.1}",
                100.0 * seconds / row.elapsed,
                1e6 * seconds / row.wrk.requests as f64
            )
        });
        let memory = row.memory.map_or("–".to_owned(), |m| {
            format!("{:.1} ({:.1}), {:.1}", m.rss_mib, m.hwm_mib, m.pss_mib)
        });
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.0} / {:.0} | {} + {} ({:.0}) | {memory} |",
            row.label,
            row.wrk.rps,
            row.wrk.p99_ms,
            row.wrk.rps / baseline.wrk.rps,
            cpu,
            row.cpu_busy.0,
            row.cpu_busy.1,
            row.warmup.accepts,
            row.backend.accepts,
            (row.warmup.requests + row.backend.requests) as f64
                / (row.warmup.accepts + row.backend.accepts).max(1) as f64,
        );
    }
    let busy: Vec<&str> = rows
        .iter()
        .filter(|(row, _)| row.rustc > 0)
        .map(|(row, _)| row.label)
        .collect();
    println!(
        "\nThe floor and direct rows' ratios are against nginx with 1 route. The floor is \
         Pingora's own server (1 thread) with a proxy that only names the backend: no Host \
         routing, no headers, no access log, no metrics. Proxy CPU: user + system time \
         of the proxy's processes over the measured run, as % of one CPU and per request. \
         Backend conns: connections the backend accepted during the warm-up and during the \
         measured run (req/conn: requests per connection over both). Memory after the measured \
         run, summed over nginx's master and worker (PSS counts their shared pages once)."
    );
    if !busy.is_empty() {
        println!("A build (rustc) was running during: {}.", busy.join(", "));
    }
}

/// The real agent on loopback listeners, pinned to [`PROXY_CPU`], without a node-port data
/// plane or sandboxes; killed on drop.
#[derive(Debug)]
struct Agent {
    process: AgentProcess,
    api: Client,
    http: SocketAddr,
    _dir: TempDir,
}

impl Agent {
    fn start() -> Result<Self> {
        let dir = TempDir::new("bench-ingress");
        let socket = dir.path().join("agent.sock");
        let http = free_addr()?;
        let mut command = Command::new("taskset");
        command
            .args(["-c", &PROXY_CPU.to_string()])
            .arg(binary("miren-agent"))
            .arg("run")
            .arg("--http-addr")
            .arg(http.to_string())
            .arg("--https-addr")
            .arg(free_addr()?.to_string())
            .arg("--metrics-addr")
            .arg(free_addr()?.to_string())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--api-socket")
            .arg(&socket)
            // Endpoints come from the benchmark through the API, not from sandboxes.
            .arg("--no-sandboxes");
        let process = AgentProcess::start(command, &socket, &dir.path().join("agent.log"));
        Ok(Self {
            process,
            api: Client::new(socket),
            http,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Deploys [`APP`] with `backend` as the only endpoint of its http port.
    fn deploy(&self, backend: SocketAddr) -> Result<()> {
        self.api
            .deploy(&DeployRequest {
                source_name: "bench/.miren/app.toml".into(),
                toml: APP.into(),
                bundle: None,
            })
            .context("deploying the bench app")?;
        self.api
            .set_endpoints(
                "bench",
                "web",
                &ServiceEndpoints {
                    service: String::new(),
                    endpoints: BTreeMap::from([("http".to_owned(), vec![backend])]),
                    ..ServiceEndpoints::default()
                },
            )
            .context("setting the bench app's endpoint")?;
        Ok(())
    }

    /// `miren route set HOST bench`.
    fn route(&self, host: &str) -> Result<()> {
        self.api
            .set_route(
                host,
                &RouteRequest {
                    app: "bench".into(),
                    service: None,
                    timeout_ms: None,
                },
            )
            .with_context(|| format!("setting the route {host}"))?;
        Ok(())
    }

    /// Waits until the ingress proxies [`HOST`] to the backend.
    fn wait_until_serving(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = http_get(self.http, HOST);
            match &answer {
                Ok((200, _)) => return Ok(()),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => bail!(
                    "the agent does not accept connections on --http-addr {}: this build has no \
                     HTTP ingress (issue 6)\n{}",
                    self.http,
                    self.process.log_text()
                ),
                _ => bail!(
                    "the ingress did not proxy {HOST} within 30 s (last answer {answer:?}):\n{}",
                    self.process.log_text()
                ),
            }
        }
    }
}
