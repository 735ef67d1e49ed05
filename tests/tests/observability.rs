//! Observability checked by the real tools: `promtool` on the alert rules of
//! `contrib/prometheus` and their unit tests, and on a scrape of a real agent running real
//! instances after node-port and HTTP traffic; a real Prometheus, in the agent's network
//! namespace, scraping that agent until every query of `contrib/grafana/miren.json` has an
//! answer.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use miren_tests::{
    apps::{
        self, HttpClient, WEB_PY, app_detail, endpoints, kill9_netns, sandbox_netns, udp_exchange,
        wait_until_logging, web_app_toml,
    },
    ingress::ok,
    process::{AgentProcess, example, workspace_root},
    prometheus::{Prometheus, promtool},
    tls,
    world::{NODE_IP, Plane, World, wait_for_status_ok},
};
use serde_json::Value;

fn contrib(path: &str) -> PathBuf {
    workspace_root().join("contrib").join(path)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = contrib("prometheus");
    let check = promtool(&dir, &["check", "rules", "miren-rules.yml"], b"");
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("SUCCESS: 6 rules found"),
        "{}",
        text(&check)
    );
    let test = promtool(&dir, &["test", "rules", "miren-rules.test.yml"], b"");
    assert!(test.status.success(), "{}", text(&test));
    assert!(text(&test).contains("SUCCESS"), "{}", text(&test));
}

/// Every alert of the rules file has a unit test showing it firing and one showing it silent.
#[test]
fn every_alert_has_a_firing_and_a_silent_unit_test() {
    let rules = std::fs::read_to_string(contrib("prometheus/miren-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(contrib("prometheus/miren-rules.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in alerts {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        let silent = cases
            .iter()
            .filter(|c| c.contains("exp_alerts: []"))
            .count();
        let firing = cases.iter().filter(|c| c.contains("- exp_labels:")).count();
        assert!(
            silent >= 1 && firing >= 1,
            "{alert}: {silent} silent and {firing} firing cases"
        );
    }
}

/// The dashboard's templating variables other than the data source (replaced by `.*`, their
/// "All" value, in queries).
fn dashboard_variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] != "datasource")
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Every query of the dashboard's panels (rows' nested panels too), as Prometheus gets it:
/// the variables at their "All" value `.*` and `$__rate_interval` 30s.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(contrib("grafana/miren.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("miren.json is JSON");
    let variables = dashboard_variables(&dashboard);
    let mut panels: Vec<Value> = dashboard["panels"].as_array().unwrap().clone();
    let nested: Vec<Value> = panels
        .iter()
        .filter_map(|p| p["panels"].as_array())
        .flatten()
        .cloned()
        .collect();
    panels.extend(nested);
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().expect("a panel's targets");
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let mut expr = target["expr"].as_str().expect("a target's expr").to_owned();
            expr = expr.replace("$__rate_interval", "30s");
            for name in &variables {
                expr = expr
                    .replace(&format!("${{{name}}}"), ".*")
                    .replace(&format!("${name}"), ".*");
            }
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            queries.push(expr);
        }
    }
    queries
}

#[test]
fn the_dashboard_reads_a_prometheus_data_source_variable() {
    let text = std::fs::read_to_string(contrib("grafana/miren.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("miren.json is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(datasource["query"], "prometheus");
    let uid = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = Vec::new();
    for panel in panels {
        ids.push(panel["id"].as_u64().expect("a panel id"));
        let grid = &panel["gridPos"];
        assert!(
            grid["w"].as_u64().is_some() && grid["h"].as_u64().is_some(),
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["type"], "prometheus", "{panel}");
        assert_eq!(panel["datasource"]["uid"], uid.as_str(), "{panel}");
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    // Every metric family a query reads is one the agent exports.
    let exported = std::fs::read_to_string(workspace_root().join("miren-agent/src/metrics.rs"))
        .expect("the agent's metrics");
    for query in dashboard_queries() {
        for name in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("miren_"))
        {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                exported.contains(&format!("\"{family}\"")),
                "{family} (in {query}) is not a family of metrics.rs"
            );
        }
    }
}

/// An app whose UDP node port 7100 never gets an endpoint: its instance runs but never binds
/// the port, so it never becomes ready.
const IDLE_APP: &str = r#"name = "idle"
[services.idle]
command = "exec sleep 3600"
[services.idle.concurrency]
mode = "fixed"
num_instances = 1
[[services.idle.ports]]
name = "game"
port = 9000
type = "udp"
node_port = 7100
"#;

/// Requests to the ingress; the flaky app's route times out first.
const HTTP: HttpClient = HttpClient {
    connect_timeout: None,
    read_timeout: Duration::from_secs(30),
};

const WAIT: Duration = Duration::from_secs(60);

/// The scripted load: the udp-echo and hello-web examples, an app that times out and one whose
/// node port has no endpoint; UDP through the node ports, HTTP requests (answered, unrouted,
/// timed out), a certificate, and an instance killed.
fn scripted_load(world: &World, agent: &AgentProcess) {
    for name in ["udp-echo", "hello-web"] {
        ok(agent, &["deploy", &example(name).to_string_lossy()]);
    }
    ok(agent, &["route", "set", "hello.example.com", "hello-web"]);
    let flaky = web_app_toml("flaky", "exec python3 web.py");
    apps::deploy(world.dir(), agent, "flaky", &flaky, &[("web.py", WEB_PY)]);
    ok(
        agent,
        &[
            "route",
            "set",
            "flaky.example.com",
            "flaky",
            "--timeout",
            "1s",
        ],
    );
    apps::deploy(world.dir(), agent, "idle", IDLE_APP, &[]);
    wait_until_logging(agent, "the examples' and flaky's endpoints", WAIT, || {
        endpoints(agent, "udp-echo", "echo", "game").len() == 2
            && endpoints(agent, "hello-web", "web", "http").len() == 1
            && endpoints(agent, "flaky", "web", "http").len() == 1
    });
    wait_for_status_ok(agent);

    // Node ports: echoes from the udp-echo instances; datagrams to idle's are dropped.
    let echo: SocketAddr = format!("{NODE_IP}:7777").parse().unwrap();
    let idle: SocketAddr = format!("{NODE_IP}:7100").parse().unwrap();
    world
        .client
        .run(|| {
            for i in 0..10 {
                let message = format!("ping {i}");
                let reply = udp_exchange(echo, message.as_bytes(), Duration::from_secs(3))
                    .expect("an echo through node port 7777");
                assert!(reply.ends_with(message.as_bytes()), "{reply:?}");
            }
            for _ in 0..5 {
                let reply = udp_exchange(idle, b"anyone?", Duration::from_millis(200));
                assert_eq!(reply, None, "node port 7100 has no endpoint");
            }
        })
        .unwrap();

    // HTTP: answered, unrouted (404) and timed out at the instance (504).
    for _ in 0..5 {
        let (status, body) = HTTP.get_via_ingress(world, "hello.example.com", "/");
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("hello from hello-web"), "{body}");
    }
    assert_eq!(
        HTTP.get_via_ingress(world, "nobody.example.com", "/").0,
        404
    );
    for _ in 0..2 {
        assert_eq!(
            HTTP.get_via_ingress(world, "flaky.example.com", "/slow").0,
            504
        );
    }

    // A certificate (after the HTTP requests: its host is redirected to HTTPS from now on).
    let pem = tls::self_signed(&["hello.example.com"]);
    let (cert, key) = pem.write(world.dir(), "hello");
    ok(
        agent,
        &[
            "cert",
            "set",
            "hello.example.com",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
    );

    // An instance killed: restarted, counted.
    let victim = endpoints(agent, "udp-echo", "echo", "game")[0];
    kill9_netns(&sandbox_netns(agent.pid(), victim.ip()));
    wait_until_logging(agent, "the killed instance replaced", WAIT, || {
        let now = endpoints(agent, "udp-echo", "echo", "game");
        now.len() == 2
            && !now.contains(&victim)
            && app_detail(agent, "udp-echo").services[0]
                .instances
                .as_ref()
                .is_some_and(|i| i.restarts == 1 && i.ready == 2)
    });
}

/// The body of a `/metrics` response.
fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body)
}

/// `line` is one of the exposition's lines.
fn assert_line(metrics: &str, line: &str) {
    assert!(
        metrics.lines().any(|l| l == line),
        "missing {line} in\n{metrics}"
    );
}

/// The queries that still have no series after asking again for up to [`WAIT`] (the latest
/// scrape may predate the last event).
fn unanswered<'q>(prometheus: &Prometheus<'_>, queries: &'q [String]) -> Vec<&'q String> {
    let deadline = Instant::now() + WAIT;
    let mut empty: Vec<&String> = queries.iter().collect();
    while !empty.is_empty() && Instant::now() < deadline {
        empty.retain(|query| prometheus.query(query).is_empty());
        std::thread::sleep(Duration::from_millis(500));
    }
    empty
}

#[test]
fn a_loaded_agent_passes_promtool_and_prometheus_answers_every_dashboard_query() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    let prometheus = Prometheus::start(
        &world.node,
        "127.0.0.1:9464",
        &[contrib("prometheus/miren-rules.yml")],
    );
    scripted_load(&world, &agent);

    // promtool's lint of the exposition finds nothing.
    let scrape = world.scrape_metrics();
    let metrics = body(&scrape);
    let lint = promtool(Path::new("."), &["check", "metrics"], metrics.as_bytes());
    assert!(
        lint.status.success() && text(&lint).trim().is_empty(),
        "promtool check metrics:\n{}\non\n{metrics}",
        text(&lint)
    );
    // The instance families, per service.
    let exits = |reason: &str, n: u64| {
        format!(
            r#"miren_instance_exits_total{{app="udp-echo",reason="{reason}",service="echo"}} {n}"#
        )
    };
    for line in [
        r#"miren_instances_running{app="udp-echo",service="echo"} 2"#.to_owned(),
        r#"miren_instances_ready{app="udp-echo",service="echo"} 2"#.to_owned(),
        r#"miren_instance_restarts_total{app="udp-echo",service="echo"} 1"#.to_owned(),
        exits("signaled", 1),
        exits("exited", 0),
        exits("stopped", 0),
        r#"miren_instances_running{app="idle",service="idle"} 1"#.to_owned(),
        r#"miren_instances_ready{app="idle",service="idle"} 0"#.to_owned(),
    ] {
        assert_line(metrics, &line);
    }

    // Prometheus: every dashboard query answers with at least one series.
    let queries = dashboard_queries();
    let empty = unanswered(&prometheus, &queries);
    assert!(
        empty.is_empty(),
        "dashboard queries without an answer: {empty:#?}\nPrometheus's log:\n{}",
        prometheus.log_text()
    );
    // The events of the load are in what Prometheus scraped.
    let events = [
        r#"miren_nodeport_drops_total{app="idle",reason="no_endpoints"} > 0"#,
        r#"miren_nodeport_rx_packets_total{app="udp-echo"} > 0"#,
        r#"miren_backend_rx_packets_total{app="udp-echo"} > 0"#,
        r#"miren_instance_restarts_total{app="udp-echo"} == 1"#,
        r#"miren_instance_exits_total{app="udp-echo",reason="signaled"} == 1"#,
        r#"miren_http_upstream_errors_total{app="flaky",kind="timeout"} == 2"#,
        r#"miren_http_requests_total{app="flaky",code="504"} == 2"#,
        r#"miren_http_requests_total{app="hello-web",code="200"} == 5"#,
        r#"miren_http_requests_total{app="",code="404"} == 1"#,
        r#"miren_http_request_duration_seconds_count{app="hello-web"} == 5"#,
        r#"miren_cert_expiry_timestamp_seconds{host="hello.example.com"} > time()"#,
        r#"miren_reconcile_duration_seconds_count > 0"#,
    ]
    .map(str::to_owned);
    let empty = unanswered(&prometheus, &events);
    assert!(
        empty.is_empty(),
        "events Prometheus did not see: {empty:#?}\nthe agent's metrics:\n{metrics}"
    );
    // The alert rules load and evaluate against the agent's series.
    let groups = prometheus.api("rules", &[]);
    let rules: Vec<&Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), 6, "{groups}");
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
}
