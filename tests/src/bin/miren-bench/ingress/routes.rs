//! The `routes` group: how route changes scale with 10,000 routes.
//!
//! 1. Creating 10,000 routes one by one through the API (each `PUT` returns once the ingress
//!    routes with it): the mean time per route of routes 1–100 and of 9,901–10,000, and their
//!    ratio (target ≤ 2×: a change costs about the same with 10,000 routes as with 100).
//! 2. `miren route import` (the real CLI) of a 10,000-line file on a fresh agent: the CLI's
//!    wall time (target ≤ 2 s), then a few imported hosts must route.
//! 3. p99 of the 10,000-route agent with a route added every 200 ms vs without (target
//!    ≤ 1.2×).
//!
//! Under `all`, 1 and 3 come from the `proxy` group's agent, which measured the same things.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{
    Agent, AgentOptions, Backend, HOST, LOAD, LOAD_CPU, ManyRoutes, PROXY_CPU,
    ROUTE_CHANGE_INTERVAL, WARMUP, backend, http_get, many_routes, mean_ms, met,
};

/// Routes at each end of the creation whose mean times are compared.
const ENDS: usize = 100;
/// Routes in the imported file.
const IMPORTED: usize = 10_000;
/// Target: the last [`ENDS`] routes cost at most this many times the first.
const CREATION_RATIO_TARGET: f64 = 2.0;
/// Target: the import's wall time.
const IMPORT_TARGET: Duration = Duration::from_secs(2);
/// Target: p99 with route changes over p99 without.
const CHURN_P99_TARGET: f64 = 1.2;

/// Runs the group; `earlier` is the `proxy` group's 10,000-route agent's measurements, when
/// it ran in this process.
pub(super) fn run(earlier: Option<&ManyRoutes>) -> Result<()> {
    let backend = Backend::start(Some(LOAD_CPU))?;
    let own;
    let many = match earlier {
        Some(many) => many,
        None => {
            let agent = Agent::start(AgentOptions::PINNED)?;
            let first = agent.deploy_and_route(backend.addr())?;
            own = many_routes(&agent, &backend, first)?;
            &own
        }
    };
    let import = import(&backend)?;
    print(many, &import, earlier.is_some());
    Ok(())
}

/// What the import measured.
#[derive(Debug)]
struct Import {
    /// The CLI's wall time.
    took: Duration,
    /// The CLI's report.
    output: String,
    /// The hosts checked to route afterwards.
    checked: Vec<String>,
    /// The imported file's path.
    file: String,
}

/// `miren route import` of [`IMPORTED`] routes on a fresh agent; checks some of them route.
fn import(backend: &Backend) -> Result<Import> {
    let agent = Agent::start(AgentOptions::PINNED)?;
    agent.deploy(backend.addr())?;
    let host = |i: usize| format!("i{i}.import.bench.test");
    let mut text = String::new();
    for i in 0..IMPORTED {
        let _ = writeln!(text, "{} bench", host(i));
    }
    let file = agent.dir.path().join("routes.txt");
    std::fs::write(&file, text)?;
    let started = Instant::now();
    let out = agent
        .process
        .miren(&["route", "import", &file.to_string_lossy()]);
    let took = started.elapsed();
    let output = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !output.contains(&format!("imported {IMPORTED} routes")) {
        bail!(
            "miren route import failed ({}): {output}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("miren route import took {took:.2?}: {output}");
    let checked: Vec<String> = [0, 1, IMPORTED / 2, IMPORTED - 2, IMPORTED - 1]
        .into_iter()
        .map(host)
        .collect();
    for host in &checked {
        let (status, body) = http_get(agent.http, host)?;
        if status != 200 || !body.ends_with(backend::BODY) {
            bail!(
                "after the import the ingress answered {status} {:?} for {host}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    if http_get(agent.http, HOST)?.0 != 404 {
        bail!("after the import the ingress routes {HOST}, which the file does not name");
    }
    Ok(Import {
        took,
        output,
        checked,
        file: file.display().to_string(),
    })
}

/// `n` with a comma between thousands (10,000).
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn print(many: &ManyRoutes, import: &Import, reused: bool) {
    let count = many.per_route.len();
    let routes = thousands(count);
    let imported = thousands(IMPORTED);
    let last_start = thousands(count - ENDS + 1);
    let first = mean_ms(&many.per_route[..ENDS]);
    let last = mean_ms(&many.per_route[count - ENDS..]);
    let creation_ratio = last / first;
    let all: Duration = many.per_route.iter().sum();
    let (steady, churn) = (&many.steady, &many.churn);
    let churn_ratio = churn.wrk.p99_ms / steady.wrk.p99_ms;
    println!("\n## Route changes with 10,000 routes (loopback)\n");
    println!(
        "Method: the agent alone on CPU {PROXY_CPU} (1 ingress thread, --no-sandboxes, the \
         app's endpoint PUT through the API as in the other groups); the benchmark's API \
         client and the backend on CPU {LOAD_CPU}. Route creation: {routes} routes created \
         one by one with PUT /v1/routes/HOST (what `miren route set` does), each timed from \
         request to answer (the API answers once the ingress routes with the new route); \
         route 1 is the first route of a fresh agent{}. Import: `miren route import FILE` \
         (the real CLI binary, `--socket`) of a {imported}-line file (`HOST APP` per line) \
         on a fresh agent with the app deployed and no routes, timed from starting the CLI \
         to its exit (the API answers once the ingress routes with the new table); then {} \
         imported hosts ({}) must answer 200 with the backend's body through the ingress. \
         p99: wrk (-t{} -c{}, {} s after a {} s warm-up, on CPU {LOAD_CPU}) against the \
         {routes}-route agent, without route changes and while a thread adds a route \
         through the API every {} ms ({} added during warm-up and run){}.\n",
        if reused {
            "; routes 2–100 came after the 1-route wrk runs of the proxy group, on the same \
             agent, whose 10,000-route rows are reused here"
        } else {
            ""
        },
        import.checked.len(),
        import.checked.join(", "),
        LOAD.threads,
        LOAD.connections,
        LOAD.duration.as_secs(),
        WARMUP.as_secs(),
        ROUTE_CHANGE_INTERVAL.as_millis(),
        many.churn_changes,
        if steady.rustc > 0 || churn.rustc > 0 {
            "; a build (rustc) was running during the wrk runs"
        } else {
            ""
        },
    );
    println!("| measurement | value | target |");
    println!("|---|---:|---:|");
    println!("| creating routes one by one: mean per route, routes 1–{ENDS} | {first:.2} ms | |");
    println!(
        "| creating routes one by one: mean per route, routes {last_start}–{routes} | {last:.2} ms | |"
    );
    println!(
        "| ratio (routes {last_start}–{routes} / 1–{ENDS}) | {creation_ratio:.2}× | ≤ {CREATION_RATIO_TARGET}× |"
    );
    println!(
        "| all {routes} routes one by one | {:.1} s ({:.2} ms per route) | |",
        all.as_secs_f64(),
        mean_ms(&many.per_route)
    );
    println!(
        "| `miren route import` of {imported} routes, fresh agent | {:.2} s | ≤ {} s |",
        import.took.as_secs_f64(),
        IMPORT_TARGET.as_secs()
    );
    println!(
        "| p99, {routes} routes, no route changes | {:.2} ms ({:.0} req/s) | |",
        steady.wrk.p99_ms, steady.wrk.rps
    );
    println!(
        "| p99, {routes} routes, a route added every {} ms | {:.2} ms ({:.0} req/s) | |",
        ROUTE_CHANGE_INTERVAL.as_millis(),
        churn.wrk.p99_ms,
        churn.wrk.rps
    );
    println!(
        "| p99 ratio (with / without route changes) | {churn_ratio:.2}× | ≤ {CHURN_P99_TARGET}× |"
    );
    println!();
    println!(
        "- Target: creating a route with {routes} routes costs ≤ {CREATION_RATIO_TARGET}× one \
         with 100 (last {ENDS} / first {ENDS}): **{}** ({creation_ratio:.2}×: {last:.2} ms vs \
         {first:.2} ms).",
        met(creation_ratio <= CREATION_RATIO_TARGET)
    );
    println!(
        "- Target: importing {imported} routes takes ≤ {} s: **{}** ({:.2} s; the CLI said \
         \"{}\").",
        IMPORT_TARGET.as_secs(),
        met(import.took <= IMPORT_TARGET),
        import.took.as_secs_f64(),
        import
            .output
            .replace('\n', " ")
            .replace(&import.file, "FILE")
    );
    println!(
        "- Target: p99 with a route added every {} ms ≤ {CHURN_P99_TARGET}× p99 without: \
         **{}** ({churn_ratio:.2}×: {:.2} ms vs {:.2} ms).",
        ROUTE_CHANGE_INTERVAL.as_millis(),
        met(churn_ratio <= CHURN_P99_TARGET),
        churn.wrk.p99_ms,
        steady.wrk.p99_ms
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_get_commas() {
        assert_eq!(super::thousands(10_000), "10,000");
        assert_eq!(super::thousands(9_901), "9,901");
        assert_eq!(super::thousands(100), "100");
        assert_eq!(super::thousands(1_234_567), "1,234,567");
    }
}
