//! `cargo xtask bench ingress [all|proxy|routes|two-core|large-body]`: the agent's HTTP
//! ingress against nginx as the equivalent reverse proxy, in the same run, on loopback. Each
//! group can run alone (`all`, the default, runs them in this order) and prints its own table:
//!
//! - `proxy`: straight to the backend (the ceiling), nginx and the real `miren-agent` each with
//!   1 route and with 10,000 routes, the 10,000-route agent while routes are added, and the
//!   Pingora floor. Each row is a `wrk` warm-up followed by the measured keep-alive run; the
//!   table shows requests/s, p99 latency, the ratio to nginx, the proxy's CPU use, how many
//!   upstream connections the backend accepted (pool reuse) and the proxy's memory.
//! - `routes` (see [`routes`]): creating 10,000 routes one by one (last 100 vs first 100),
//!   `miren route import` of 10,000 routes, and p99 with vs without a route added every 200 ms.
//! - `two-core`: the agent with 2 HTTP threads vs nginx with 2 workers, nothing pinned.
//! - `large-body` (see [`large_body`]): 1 GiB downloads and uploads through each proxy, and
//!   the agent's peak memory growth while it streams them.
//!
//! CPU placement (2-core machine) outside `two-core`: the proxy under test (1 nginx worker, or
//! the agent) runs alone on [`PROXY_CPU`]; the load (wrk, or the large-body client) and the
//! backend share [`LOAD_CPU`].

mod backend;
mod floor;
mod large_body;
mod load;
mod nginx;
mod routes;

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
    cpu: Some(LOAD_CPU),
};
/// The length of the warm-up run before each measured run.
const WARMUP: Duration = Duration::from_secs(3);
/// The groups of rows, each runnable alone, in the order `all` runs them.
const GROUPS: [&str; 4] = ["proxy", "routes", "two-core", "large-body"];
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

/// Runs the benchmark's `group` (`all` when `None`) and prints its tables.
///
/// # Errors
/// When the group is unknown, a tool is missing, a proxy does not start or route, or a
/// request fails.
pub fn run(group: Option<&str>) -> Result<()> {
    let group = group.unwrap_or("all");
    if group != "all" && !GROUPS.contains(&group) {
        bail!(
            "unknown ingress group {group:?}; available: all, {}",
            GROUPS.join(", ")
        );
    }
    check_tools()?;
    let cpus = std::thread::available_parallelism()?.get();
    if cpus <= LOAD_CPU {
        bail!("this benchmark pins to CPUs {PROXY_CPU} and {LOAD_CPU}; only {cpus} available");
    }
    let wanted = |name: &str| group == "all" || group == name;
    // `all` reuses the proxy group's 10,000-route agent for the routes group.
    let mut many = None;
    if wanted("proxy") {
        many = Some(proxy(cpus)?);
    }
    if wanted("routes") {
        routes::run(many.as_ref())?;
    }
    if wanted("two-core") {
        two_core(cpus)?;
    }
    if wanted("large-body") {
        large_body::run()?;
    }
    Ok(())
}

/// The `proxy` group: today's req/s rows. Returns its 10,000-route measurements for the
/// `routes` group.
fn proxy(cpus: usize) -> Result<ManyRoutes> {
    let backend = Backend::start(Some(LOAD_CPU))?;
    let direct = measure(
        "direct to the backend (ceiling)",
        backend.addr(),
        &[],
        &backend,
        &LOAD,
    )?;

    let one = vec![HOST.to_owned()];
    let many: Vec<String> = std::iter::once(HOST.to_owned())
        .chain(extra_hosts())
        .collect();
    let nginx_one = measure_nginx("nginx, 1 route", &one, &backend, 1, &LOAD)?;
    let nginx_many = measure_nginx("nginx, 10,000 routes", &many, &backend, 1, &LOAD)?;

    let floor = {
        let process = FloorProcess::start(free_addr()?, backend.addr())?;
        measure(
            "Pingora alone (floor), no routing",
            process.listen(),
            &[process.pid()],
            &backend,
            &LOAD,
        )?
    };

    let agent = Agent::start(AgentOptions::PINNED)?;
    let first = agent.deploy_and_route(backend.addr())?;
    let ingress_one = measure(
        "ingress, 1 route",
        agent.http,
        &[agent.pid()],
        &backend,
        &LOAD,
    )?;
    let ingress_many = many_routes(&agent, &backend, first)?;
    drop(agent);
    // What the access log costs, within this run.
    let quiet = Agent::start(AgentOptions {
        access_log: false,
        ..AgentOptions::PINNED
    })?;
    quiet.deploy_and_route(backend.addr())?;
    let ingress_quiet = measure(
        "ingress, 1 route, access log off",
        quiet.http,
        &[quiet.pid()],
        &backend,
        &LOAD,
    )?;
    drop(quiet);

    print_method(cpus, &ingress_many);
    print_rows(&[
        (&nginx_one, &nginx_one),
        (&ingress_one, &nginx_one),
        (&ingress_quiet, &nginx_one),
        (&nginx_many, &nginx_many),
        (&ingress_many.steady, &nginx_many),
        (&ingress_many.churn, &nginx_many),
        (&floor, &nginx_one),
        (&direct, &nginx_one),
    ]);
    println!(
        "\nThe floor and direct rows' ratios are against nginx with 1 route. The floor is \
         Pingora's own server (1 thread) with a proxy that only names the backend: no Host \
         routing, no headers, no access log, no metrics. {ROW_NOTES}"
    );
    Ok(ingress_many)
}

/// The hosts of the 10,000-route rows besides [`HOST`].
fn extra_hosts() -> impl Iterator<Item = String> {
    (0..EXTRA_ROUTES).map(|i| format!("r{i}.bench.test"))
}

/// An agent with 10,000 routes, measured without and with route changes.
#[derive(Debug)]
struct ManyRoutes {
    /// How long each route's `PUT` took (the API returns once the ingress routes with it), in
    /// the order they were created; the first is [`HOST`] on the fresh agent.
    per_route: Vec<Duration>,
    /// wrk against the 10,000-route agent.
    steady: Row,
    /// The same while a thread adds a route every [`ROUTE_CHANGE_INTERVAL`].
    churn: Row,
    /// How many routes that thread added.
    churn_changes: usize,
    /// The agent's thread count.
    threads: u32,
}

/// Adds routes 2–10,000 to `agent` (routing [`HOST`] already; that route took `first`) one by
/// one through the API, timing each, then measures it without and with route changes.
fn many_routes(agent: &Agent, backend: &Backend, first: Duration) -> Result<ManyRoutes> {
    let mut per_route = vec![first];
    for (i, host) in extra_hosts().enumerate() {
        per_route.push(agent.route(&host)?);
        let routes = i + 2;
        if routes % ROUTE_BATCH == 1 {
            let batch = &per_route[routes - ROUTE_BATCH..];
            eprintln!(
                "routes {}–{routes}: {:.2} ms per route",
                routes + 1 - ROUTE_BATCH,
                mean_ms(batch)
            );
        }
    }
    check_routing("the ingress", agent.http)?;
    let steady = measure(
        "ingress, 10,000 routes",
        agent.http,
        &[agent.pid()],
        backend,
        &LOAD,
    )?;
    let (churn, churn_changes) = measure_with_route_changes(agent, backend)?;
    let (_, threads) = load::memory(agent.pid())?;
    Ok(ManyRoutes {
        per_route,
        steady,
        churn,
        churn_changes,
        threads,
    })
}

/// The mean of `durations` in ms.
fn mean_ms(durations: &[Duration]) -> f64 {
    durations.iter().sum::<Duration>().as_secs_f64() * 1000.0 / durations.len().max(1) as f64
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
            &LOAD,
        );
        stop.store(true, Ordering::Relaxed);
        let added = changes
            .join()
            .map_err(|_| anyhow::anyhow!("the route-changing thread panicked"))??;
        Ok((row?, added))
    })
}

/// The `two-core` group: the agent with 2 HTTP threads vs nginx with 2 workers, 1 route,
/// with nothing pinned: proxy, wrk and backend share both CPUs.
fn two_core(cpus: usize) -> Result<()> {
    let load = Load { cpu: None, ..LOAD };
    let backend = Backend::start(None)?;
    let direct = measure(
        "direct to the backend (ceiling)",
        backend.addr(),
        &[],
        &backend,
        &load,
    )?;
    let one = vec![HOST.to_owned()];
    let nginx = measure_nginx("nginx, 2 workers, 1 route", &one, &backend, 2, &load)?;
    let agent = Agent::start(AgentOptions {
        cpu: None,
        http_threads: Some(2),
        ..AgentOptions::PINNED
    })?;
    agent.deploy_and_route(backend.addr())?;
    let ingress = measure(
        "ingress, 2 HTTP threads, 1 route",
        agent.http,
        &[agent.pid()],
        &backend,
        &load,
    )?;
    let (_, agent_threads) = load::memory(agent.pid())?;
    println!("\n## HTTP ingress vs nginx on two cores (loopback, keep-alive, 13-byte responses)\n");
    println!(
        "Method: {cpus} CPUs, nothing pinned: the proxy (nginx: worker_processes 2; agent: \
         --http-threads 2, {agent_threads} threads in all), wrk (-t{} -c{}, {} s measured after \
         a {} s warm-up, keep-alive) and the backend (one thread) all share both CPUs, so the \
         proxy competes with its own load for CPU time (the scheduler places the threads); \
         otherwise as the single-core table (same backend, nginx config, access logs, routing \
         checks). The proxy's CPU % is of one CPU (up to 200).\n",
        load.threads,
        load.connections,
        load.duration.as_secs(),
        WARMUP.as_secs(),
    );
    print_rows(&[(&nginx, &nginx), (&ingress, &nginx), (&direct, &nginx)]);
    println!("\nThe direct row's ratio is against nginx. {ROW_NOTES}");
    println!(
        "\n- No target for this group; the ingress reaches {:.2} of nginx's req/s with p99 {:.2} ms vs {:.2} ms.",
        ingress.wrk.rps / nginx.wrk.rps,
        ingress.wrk.p99_ms,
        nginx.wrk.p99_ms
    );
    Ok(())
}

/// Starts nginx with `workers` workers routing `hosts` to `backend` (on [`PROXY_CPU`] when
/// `load` is pinned, else anywhere), checks its routing and measures it with `load`.
fn measure_nginx(
    label: &'static str,
    hosts: &[String],
    backend: &Backend,
    workers: u32,
    load: &Load,
) -> Result<Row> {
    let listen = free_addr()?;
    let started = Instant::now();
    let nginx = Nginx::start(
        &NginxConfig {
            listen,
            backend: backend.addr(),
            hosts,
            workers,
            access_log: NGINX_ACCESS_LOG,
            streaming: false,
        },
        load.cpu.map(|_| PROXY_CPU),
    )?;
    eprintln!("{label}: nginx started in {:.2?}", started.elapsed());
    check_routing("nginx", listen)?;
    measure(label, listen, &nginx.pids(), backend, load)
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

/// A warm-up run and a measured run of wrk (`load`) against `target`; `pids` are the proxy's
/// processes.
fn measure(
    label: &'static str,
    target: SocketAddr,
    pids: &[u32],
    backend: &Backend,
    load: &Load,
) -> Result<Row> {
    let counts_before = backend.counts();
    let warmup = Load {
        duration: WARMUP,
        ..*load
    };
    load::wrk(&warmup, target, HOST).with_context(|| format!("{label}: warm-up"))?;
    let measured_before = backend.counts();
    let rustc_before = rustc_processes();
    let proxy_before = cpu_of(pids)?;
    let cpu_before = (CpuTimes::read(PROXY_CPU)?, CpuTimes::read(LOAD_CPU)?);
    let started = Instant::now();
    let wrk = load::wrk(load, target, HOST).with_context(|| label)?;
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

/// User + system CPU seconds of `pids` so far.
fn cpu_of(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|pid| load::cpu_seconds(*pid)).sum()
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

fn print_method(cpus: usize, many: &ManyRoutes) {
    let routes_took: Duration = many.per_route[1..].iter().sum();
    println!("\n## HTTP ingress vs nginx (loopback, keep-alive, 13-byte responses)\n");
    println!(
        "Method: {cpus} CPUs. The proxy under test runs alone on CPU {PROXY_CPU} (nginx: \
         worker_processes 1; agent: {} threads); wrk (-t{} -c{}, {} s measured after a {} s \
         warm-up, keep-alive) and the backend (one pinned thread) share CPU {LOAD_CPU}. nginx \
         access_log {}; agent RUST_LOG {} (the access-log-off row adds miren::access=off). Creating {EXTRA_ROUTES} more routes through the \
         API took {:.1} s ({:.2} ms each). In the route-change row a thread added {} routes \
         through the API during warm-up and run, one every {} ms (each call returns once the \
         ingress routes with it).\n",
        many.threads,
        LOAD.threads,
        LOAD.connections,
        LOAD.duration.as_secs(),
        WARMUP.as_secs(),
        if NGINX_ACCESS_LOG {
            "on (a file)"
        } else {
            "off"
        },
        std::env::var("RUST_LOG").unwrap_or_else(|_| "unset (info)".into()),
        routes_took.as_secs_f64(),
        routes_took.as_secs_f64() * 1000.0 / EXTRA_ROUTES as f64,
        many.churn_changes,
        ROUTE_CHANGE_INTERVAL.as_millis(),
    );
}

/// What the columns of [`print_rows`] mean.
const ROW_NOTES: &str = "Proxy CPU: user + system time of the proxy's processes over the \
    measured run, as % of one CPU and per request. Backend conns: connections the backend \
    accepted during the warm-up and during the measured run (req/conn: requests per \
    connection over both). Memory after the measured run, summed over nginx's master and \
    workers (PSS counts their shared pages once).";

/// Prints a table of rows, each with the nginx row its ratio is against, and which rows
/// overlapped a build.
fn print_rows(rows: &[(&Row, &Row)]) {
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
    if !busy.is_empty() {
        println!("\nA build (rustc) was running during: {}.", busy.join(", "));
    }
}

/// `met` or `NOT met`.
fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// How the benchmark starts the agent.
#[derive(Debug, Clone, Copy)]
struct AgentOptions {
    /// The CPU it runs on (`None`: not pinned).
    cpu: Option<usize>,
    /// `--http-threads` (`None`: the agent's default, the CPUs it may run on).
    http_threads: Option<usize>,
    /// `--http-max-body` (`None`: the default, 100M).
    max_body: Option<&'static str>,
    /// Whether the access log is on (off: `miren::access=off` added to the agent's
    /// `RUST_LOG`).
    access_log: bool,
}

impl AgentOptions {
    /// On [`PROXY_CPU`] (so the ingress has 1 thread), default settings.
    const PINNED: Self = Self {
        cpu: Some(PROXY_CPU),
        http_threads: None,
        max_body: None,
        access_log: true,
    };
}

/// The real agent on loopback listeners, without a node-port data plane or sandboxes; killed
/// on drop.
#[derive(Debug)]
struct Agent {
    process: AgentProcess,
    api: Client,
    http: SocketAddr,
    dir: TempDir,
}

impl Agent {
    fn start(options: AgentOptions) -> Result<Self> {
        let dir = TempDir::new("bench-ingress");
        let socket = dir.path().join("agent.sock");
        let http = free_addr()?;
        let mut command = load::pinned(binary("miren-agent"), options.cpu);
        command
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
        if let Some(threads) = options.http_threads {
            command.arg("--http-threads").arg(threads.to_string());
        }
        if let Some(max_body) = options.max_body {
            command.arg("--http-max-body").arg(max_body);
        }
        if !options.access_log {
            let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
            command.env("RUST_LOG", format!("{filter},miren::access=off"));
        }
        let process = AgentProcess::start(command, &socket, &dir.path().join("agent.log"));
        Ok(Self {
            process,
            api: Client::new(socket),
            http,
            dir,
        })
    }

    /// Deploys [`APP`] with `backend` as its endpoint, routes [`HOST`] to it, waits until the
    /// ingress serves it and checks its routing; returns how long the route's `PUT` took.
    fn deploy_and_route(&self, backend: SocketAddr) -> Result<Duration> {
        self.deploy(backend)?;
        let took = self.route(HOST)?;
        self.wait_until_serving()?;
        check_routing("the ingress", self.http)?;
        Ok(took)
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

    /// `miren route set HOST bench`; returns how long the API took (it answers once the
    /// ingress routes with the new route).
    fn route(&self, host: &str) -> Result<Duration> {
        let started = Instant::now();
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
        Ok(started.elapsed())
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
