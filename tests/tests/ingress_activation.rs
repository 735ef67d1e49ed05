//! Scale from zero when the service cannot start: a real agent running instances, an auto
//! service whose command exits at once, and the first request through the ingress, which is
//! answered as soon as the instance exits (not after the boot timeout) with its exit status.

use std::time::Duration;

use miren_tests::{
    apps::{self, HttpClient, LAZY_APP_TOML, endpoints},
    ingress::ok,
    world::{Plane, World},
};

/// Waits well past the time an instance takes to start, and short of the boot timeout
/// (120 s): a request still waiting for the boot timeout ends with status 0.
const HTTP: HttpClient = HttpClient {
    connect_timeout: None,
    read_timeout: Duration::from_secs(60),
};

#[test]
fn an_instance_exiting_while_starting_fails_the_first_request_with_its_exit_status() {
    let world = World::new(0);
    let agent = world.start_agent_running_sandboxes(Plane::Xdp, &[]);
    // The auto service of `lazy`, whose command exits with status 3 before listening.
    let crashing = LAZY_APP_TOML.replace("sleep 1; exec python3 web.py", "echo starting; exit 3");
    assert_ne!(crashing, LAZY_APP_TOML);
    apps::deploy(world.dir(), &agent, "lazy", &crashing, &[]);
    ok(&agent, &["route", "set", "lazy.example.com", "lazy"]);
    assert!(endpoints(&agent, "lazy", "web", "http").is_empty());

    let (status, body) = HTTP.get_via_ingress(&world, "lazy.example.com", "/");
    let log = agent.log_text();
    assert_eq!(status, 503, "{body}\n{log}");
    assert!(
        body.contains("app lazy service web")
            && body.contains("exited while starting (exit status: 3)"),
        "{body}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("the instance exited while starting")
                && l.contains("exit status: 3")),
        "{log}"
    );
}
