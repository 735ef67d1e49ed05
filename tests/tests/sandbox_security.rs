//! Instances in real runc containers, tried as a hostile app would: unprivileged, without
//! capabilities, blind to the node's state and to other apps, unable to mount, unshare or touch
//! the network, held by the pids and memory limits (an OOM kill shows in `miren app show`), and
//! drained before they stop (requests in flight finish, the app's own SIGTERM handler runs).
//! Real agent, CLI, runc, clients.

use std::{path::Path, time::Duration};

use miren_tests::{
    apps::{HttpClient, WEB_PY, app_detail, deploy, wait_until, web_app_toml},
    ingress::ok,
    world::{Plane, World},
};

/// How long to wait for the agent or an instance to get somewhere.
const WAIT: Duration = Duration::from_secs(60);

/// Requests to the ingress: a response may take 60 s.
const HTTP: HttpClient = HttpClient {
    connect_timeout: None,
    read_timeout: Duration::from_secs(60),
};

/// Prints what an instance can see and do, then serves HTTP.
fn probe_script(state_dir: &Path, other_app: &Path) -> String {
    format!(
        r#"echo "uid=$(id -u)"
grep CapEff /proc/self/status
for p in {state} /run/netns {other} /app/secret.txt; do
  if [ -e "$p" ]; then echo "visible $p"; else echo "hidden $p"; fi
done
mkdir -p /tmp/m
if mount -t tmpfs none /tmp/m 2>/dev/null; then echo "mount: allowed"; else echo "mount: refused"; fi
if unshare -U true 2>/dev/null; then echo "unshare: allowed"; else echo "unshare: refused"; fi
if ip link add probe0 type dummy 2>/dev/null; then echo "ip link: allowed"; else echo "ip link: refused"; fi
if touch /app/written 2>/dev/null; then echo "app dir: writable"; else echo "app dir: read-only"; fi
if touch /tmp/written 2>/dev/null; then echo "tmp: writable"; else echo "tmp: read-only"; fi
echo "probe done"
exec python3 -m http.server "$PORT"
"#,
        state = state_dir.display(),
        other = other_app.display(),
    )
}

#[test]
fn an_instance_is_contained_and_held_by_its_limits() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(
        Plane::Xdp,
        &["--instance-memory", "128M", "--instance-pids", "64"],
    );
    // Another app with a file the probe must not see.
    deploy(
        world.dir(),
        &agent,
        "other",
        &web_app_toml("other", "exec python3 -m http.server $PORT"),
        &[("secret.txt", "other app's secret\n")],
    );
    let probe = probe_script(&world.dir().join("state"), &world.dir().join("other"));
    deploy(
        world.dir(),
        &agent,
        "probe",
        &web_app_toml("probe", "sh probe.sh"),
        &[("probe.sh", &probe)],
    );
    ok(&agent, &["route", "set", "probe.test", "probe"]);
    ok(&agent, &["route", "set", "other.test", "other"]);
    let mut logs = String::new();
    wait_until("the probe's report", WAIT, || {
        logs = ok(&agent, &["logs", "probe"]);
        logs.contains("probe done")
    });
    let uid = logs
        .lines()
        .find_map(|l| l.split("uid=").nth(1))
        .expect("uid line");
    assert_ne!(uid.trim(), "0", "{logs}");
    assert!(logs.contains("CapEff:\t0000000000000000"), "{logs}");
    for hidden in [
        world.dir().join("state").display().to_string(),
        "/run/netns".into(),
        world.dir().join("other").display().to_string(),
        "/app/secret.txt".into(),
    ] {
        assert!(
            logs.contains(&format!("hidden {hidden}")),
            "{hidden}: {logs}"
        );
    }
    for line in [
        "mount: refused",
        "unshare: refused",
        "ip link: refused",
        "app dir: read-only",
        "tmp: writable",
    ] {
        assert!(logs.contains(line), "{line}: {logs}");
    }
    wait_until("the probe serving", WAIT, || {
        HTTP.get_via_ingress(&world, "probe.test", "/").0 == 200
    });

    // A fork bomb stops at the pids limit; the node and the other app stay responsive.
    deploy(
        world.dir(),
        &agent,
        "bomb",
        &web_app_toml("bomb", "f() { f | f & }; f; sleep 1000"),
        &[],
    );
    // This agent's containers are `<agent pid in hex>x<n>`; the bomb's is the one whose forks
    // were refused at the limit.
    let prefix = format!("{:x}x", agent.pid());
    let mut refused = 0;
    wait_until("forks refused at the pids limit", WAIT, || {
        refused = std::fs::read_dir("/sys/fs/cgroup/pids/miren")
            .unwrap()
            .flatten()
            .filter(|dir| dir.file_name().to_string_lossy().starts_with(&prefix))
            .map(|dir| {
                let current: usize = std::fs::read_to_string(dir.path().join("pids.current"))
                    .ok()
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                assert!(current <= 64, "an instance holds {current} processes");
                std::fs::read_to_string(dir.path().join("pids.events"))
                    .ok()
                    .and_then(|text| text.trim().strip_prefix("max ")?.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum::<u64>();
        refused > 0
    });
    ok(&agent, &["status"]);
    assert_eq!(HTTP.get_via_ingress(&world, "other.test", "/").0, 200);
    ok(&agent, &["app", "rm", "bomb"]);

    // 2 GiB in an instance limited to 128 MiB: OOM-killed, and `miren app show` says so.
    deploy(
        world.dir(),
        &agent,
        "hog",
        &web_app_toml("hog", "python3 -c 'x = bytearray(2 * 1024**3)'"),
        &[],
    );
    wait_until("the OOM kill in app show", WAIT, || {
        app_detail(&agent, "hog").services[0]
            .instances
            .as_ref()
            .and_then(|i| i.last_exit.clone())
            .is_some_and(|exit| exit.contains("out of memory"))
    });
    let show = ok(&agent, &["app", "show", "hog"]);
    assert!(
        show.contains("out of memory") && show.contains("128 MiB"),
        "{show}"
    );
}

#[test]
fn exhausting_the_subnet_is_one_status_line_and_sigterm_still_stops_the_agent() {
    let world = World::new(0);
    // A /28 holds 13 instances besides the bridge's address; the app wants 20.
    let mut agent =
        world.start_agent_running_sandboxes(Plane::Xdp, &["--sandbox-subnet", "10.66.0.0/28"]);
    deploy(
        world.dir(),
        &agent,
        "many",
        &web_app_toml("many", "exec python3 -m http.server $PORT")
            .replace("num_instances = 1", "num_instances = 20"),
        &[],
    );
    wait_until("the subnet exhausted", WAIT, || {
        app_detail(&agent, "many").services[0]
            .instances
            .as_ref()
            .and_then(|i| i.error.clone())
            .is_some_and(|error| error.contains("no free sandbox address"))
    });
    let show = ok(&agent, &["app", "show", "many"]);
    assert!(
        show.contains("cannot start instances: no free sandbox address"),
        "{show}"
    );
    ok(&agent, &["status"]);
    // Retries go on with backoff, without a log line each.
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log_text();
    let lines = log.matches("could not start an instance").count();
    assert_eq!(lines, 1, "{log}");
    let running = app_detail(&agent, "many").services[0]
        .instances
        .as_ref()
        .map_or(0, |i| i.running);
    assert_eq!(running, 13);
    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent did not stop within 10 s of SIGTERM: {status:?}\n{}",
        agent.log_text()
    );
}

/// Put before [`WEB_PY`] (whose `/slow` answers after 3 s): a SIGTERM handler that logs,
/// finishes and exits.
const ON_SIGTERM_PY: &str = r#"import signal, sys
def on_term(signum, frame):
    print("SIGTERM received; shutting down", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
"#;

fn slow_toml(version: &str) -> String {
    slow_toml_with(version, 1)
}

/// The slow app with `instances` fixed instances.
fn slow_toml_with(version: &str, instances: u32) -> String {
    format!(
        r#"name = "slow"
[[env]]
key = "VERSION"
value = "{version}"
[[env]]
key = "SLOW_SECONDS"
value = "15"
[services.web]
command = "python3 slow.py"
port = 8080
[services.web.concurrency]
mode = "fixed"
num_instances = {instances}
shutdown_timeout = "20s"
"#
    )
}

#[test]
fn an_instance_being_replaced_finishes_its_requests_and_gets_sigterm() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    deploy(
        world.dir(),
        &agent,
        "slow",
        &slow_toml("1"),
        &[("slow.py", &format!("{ON_SIGTERM_PY}{WEB_PY}"))],
    );
    ok(&agent, &["route", "set", "slow.test", "slow"]);
    wait_until("the first instance", WAIT, || {
        HTTP.get_via_ingress(&world, "slow.test", "/").0 == 200
    });
    let (_, old_addr) = HTTP.get_via_ingress(&world, "slow.test", "/");
    let world = std::sync::Arc::new(world);
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let world = std::sync::Arc::clone(&world);
            std::thread::spawn(move || HTTP.get_via_ingress(&world, "slow.test", "/slow"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A redeploy that changes the instance's environment replaces it: the new one starts,
    // the old one leaves the endpoints and is stopped while its 6 requests are in flight.
    deploy(world.dir(), &agent, "slow", &slow_toml("2"), &[]);
    wait_until("the new instance serving", WAIT, || {
        let (status, body) = HTTP.get_via_ingress(&world, "slow.test", "/");
        status == 200 && body != old_addr
    });
    if requests.iter().any(|r| r.is_finished()) {
        let ended: Vec<_> = requests
            .into_iter()
            .filter(|r| r.is_finished())
            .map(|r| r.join().unwrap())
            .collect();
        panic!(
            "slow requests ended before the old instance was replaced: {ended:?}\n{}",
            agent.log_text()
        );
    }
    for request in requests {
        let (status, body) = request.join().unwrap();
        assert_eq!(status, 200, "{body}\n{}", ok(&agent, &["logs", "slow"]));
        assert_eq!(body, old_addr, "a request went to the new instance");
    }
    wait_until("the old instance's SIGTERM handler", WAIT, || {
        ok(&agent, &["logs", "slow"]).contains("SIGTERM received; shutting down")
    });
    eprintln!(
        "DEBUG done at {:?}\n{}\n{}",
        std::time::SystemTime::now(),
        ok(&agent, &["logs", "slow", "-t"]),
        agent.log_text()
    );
}

#[test]
fn scaling_down_lets_the_stopped_instance_finish_its_requests() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    let script = format!("{ON_SIGTERM_PY}{WEB_PY}");
    deploy(
        world.dir(),
        &agent,
        "slow",
        &slow_toml_with("1", 2),
        &[("slow.py", &script)],
    );
    ok(&agent, &["route", "set", "slow.test", "slow"]);
    wait_until("two ready instances", WAIT, || {
        app_detail(&agent, "slow").services[0]
            .instances
            .as_ref()
            .is_some_and(|i| i.ready == 2)
    });
    // 12 slow requests, balanced round-robin: 6 to each instance.
    let world = std::sync::Arc::new(world);
    let requests: Vec<_> = (0..12)
        .map(|_| {
            let world = std::sync::Arc::clone(&world);
            let request =
                std::thread::spawn(move || HTTP.get_via_ingress(&world, "slow.test", "/slow"));
            std::thread::sleep(Duration::from_millis(50));
            request
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The same app with one instance: the newest is stopped while its 6 requests run.
    deploy(
        world.dir(),
        &agent,
        "slow",
        &slow_toml_with("1", 2).replace("num_instances = 2", "num_instances = 1"),
        &[],
    );
    wait_until("one instance left", WAIT, || {
        app_detail(&agent, "slow").services[0]
            .instances
            .as_ref()
            .is_some_and(|i| i.ready == 1)
    });
    assert!(
        requests.iter().all(|r| !r.is_finished()),
        "slow requests ended before the scale-down"
    );
    let mut by_instance = std::collections::BTreeMap::<String, usize>::new();
    for request in requests {
        let (status, body) = request.join().unwrap();
        assert_eq!(status, 200, "{body}\n{}", ok(&agent, &["logs", "slow"]));
        *by_instance.entry(body).or_default() += 1;
    }
    assert_eq!(
        by_instance.values().copied().collect::<Vec<_>>(),
        [6, 6],
        "{by_instance:?}"
    );
    wait_until("the stopped instance's SIGTERM handler", WAIT, || {
        ok(&agent, &["logs", "slow"]).contains("SIGTERM received; shutting down")
    });
}
