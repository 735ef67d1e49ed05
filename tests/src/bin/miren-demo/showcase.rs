//! What the demo does on the running node: deploy the two example apps and wait until they
//! are ready, then show traffic through the route and the node port, the CLI's views and the
//! agent's metrics. Every step prints its command and real output, and is checked.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use miren_tests::world::{CLIENT_IP, NODE_IP};

use crate::{
    Stop,
    node::{DemoNode, heading},
};

/// The route to the HTTP example.
pub const HOST: &str = "hello.example.com";
/// The UDP example's node port (examples/udp-echo/.miren/app.toml).
pub const UDP_NODE_PORT: u16 = 7777;
/// Client sockets and datagrams per socket in the UDP showcase.
const UDP_SOCKETS: usize = 8;
const UDP_ROUNDS: usize = 2;
/// HTTP requests through the route.
const HTTP_REQUESTS: usize = 3;
/// How long deployed instances get to become endpoints.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `examples/NAME` of this repository.
pub fn example(name: &str) -> Result<PathBuf> {
    let path = miren_tests::process::example(name);
    path.canonicalize()
        .with_context(|| format!("example {}", path.display()))
}

/// Shows the data plane, deploys both examples, sets the route and waits until every
/// instance is an endpoint and every node port is applied.
///
/// # Errors
/// When a command fails, the instances do not become ready in time, or on Ctrl-C.
pub fn deploy(node: &DemoNode, stop: &Stop) -> Result<()> {
    heading("the agent");
    let status = node.miren(&["status"])?;
    let mode = status
        .lines()
        .find_map(|l| l.trim().strip_prefix("dataplane"))
        .map_or("unknown", str::trim);
    println!("--> node-port data plane chosen by --dataplane auto: {mode}");

    heading("deploying examples/hello-web and examples/udp-echo");
    for name in ["hello-web", "udp-echo"] {
        stop.check()?;
        node.miren(&["deploy", &example(name)?.to_string_lossy()])?;
    }
    node.miren(&["route", "set", HOST, "hello-web"])?;

    let wanted = [("hello-web", 1), ("udp-echo", 2)];
    println!(
        "\nwaiting until the sandboxes run and are endpoints ({})…",
        wanted
            .iter()
            .map(|(app, n)| format!("{app}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let started = Instant::now();
    let api = node.api();
    loop {
        stop.check()?;
        let mut ready = true;
        for (app, n) in wanted {
            let have: usize = api
                .endpoints(app)
                .map(|services| {
                    services
                        .iter()
                        .flat_map(|s| s.endpoints.values())
                        .map(Vec::len)
                        .sum()
                })
                .unwrap_or(0);
            ready &= have >= n;
        }
        ready &= api
            .ports(None)
            .is_ok_and(|ports| !ports.is_empty() && ports.iter().all(|p| p.status == "ok"));
        if ready {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "the instances were not ready within {} s; the agent's log ends with:\n{}",
                READY_TIMEOUT.as_secs(),
                node.agent_log_tail(30)
            );
        }
        stop.sleep(Duration::from_millis(200));
    }
    println!("ready after {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One showcase step.
type Step = fn(&DemoNode) -> Result<()>;

/// The showcase proper; returns the steps that failed (each already reported).
pub fn run(node: &DemoNode, stop: &Stop) -> Vec<String> {
    let steps: [(&str, Step); 5] = [
        ("HTTP through the route", http),
        ("UDP through the node port", udp),
        ("miren ports", ports),
        ("miren endpoints", endpoints),
        ("metrics", metrics),
    ];
    let mut failures = Vec::new();
    for (name, step) in steps {
        if stop.requested() {
            failures.push(format!("{name}: interrupted"));
            continue;
        }
        heading(name);
        if let Err(e) = step(node) {
            println!("FAILED: {e:#}");
            failures.push(format!("{name}: {e:#}"));
        }
    }
    failures
}

/// curl from the client through the ingress on NODE_IP:80 to hello-web's instance.
fn http(node: &DemoNode) -> Result<()> {
    let host = format!("Host: {HOST}");
    let url = format!("http://{NODE_IP}/");
    for _ in 0..HTTP_REQUESTS {
        let body = node.exec(&node.client, "client", "curl", &["-s", "-H", &host, &url])?;
        ensure!(
            body.starts_with("hello from hello-web"),
            "unexpected answer {body:?}"
        );
    }
    Ok(())
}

/// UDP round trips from several client sockets to NODE_IP:7777: every reply must come from
/// NODE_IP:7777 (reverse NAT), and each socket sticks to one instance.
fn udp(node: &DemoNode) -> Result<()> {
    println!(
        "(the demo sends these itself from the client namespace: {UDP_SOCKETS} sockets × \
         {UDP_ROUNDS} datagrams to {NODE_IP}:{UDP_NODE_PORT}; each instance prefixes its reply \
         with its own address)"
    );
    let node_port: SocketAddr = format!("{NODE_IP}:{UDP_NODE_PORT}").parse()?;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for socket_no in 1..=UDP_SOCKETS {
        // A socket stays in the namespace it was created in.
        let socket = node
            .client
            .run(|| UdpSocket::bind((CLIENT_IP, 0)))
            .context("entering the client namespace")??;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let local = socket.local_addr()?;
        let mut instances = Vec::new();
        for round in 1..=UDP_ROUNDS {
            let message = format!("ping {round} from socket {socket_no}");
            let (from, reply) = round_trip(&socket, &message, node_port)?;
            println!("{local} -> {node_port} {message:?}   reply from {from}: {reply:?}");
            ensure!(
                from == node_port,
                "the reply came from {from}, not from the node port {node_port}"
            );
            let instance = reply
                .strip_suffix(&format!(": {message}"))
                .with_context(|| format!("the reply {reply:?} does not echo {message:?}"))?;
            instances.push(instance.to_owned());
            *served.entry(instance.to_owned()).or_default() += 1;
        }
        instances.dedup();
        ensure!(
            instances.len() == 1,
            "socket {socket_no}'s datagrams went to different instances: {instances:?}"
        );
    }
    let summary: Vec<String> = served
        .iter()
        .map(|(instance, n)| format!("{instance} answered {n}"))
        .collect();
    println!(
        "--> every reply came from {node_port}; each socket stuck to one instance; {}",
        summary.join(", ")
    );
    Ok(())
}

/// Sends `message` from `socket` to `to`; the reply's source and the reply.
pub fn round_trip(
    socket: &UdpSocket,
    message: &str,
    to: SocketAddr,
) -> Result<(SocketAddr, String)> {
    socket.send_to(message.as_bytes(), to)?;
    let mut buf = [0u8; 1500];
    let (len, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no reply to {message:?} within 3 s"))?;
    Ok((from, String::from_utf8_lossy(&buf[..len]).into_owned()))
}

/// `miren ports`: the node port with its endpoints, status and counts.
fn ports(node: &DemoNode) -> Result<()> {
    let out = node.miren(&["ports"])?;
    ensure!(
        out.contains(&UDP_NODE_PORT.to_string()),
        "node port {UDP_NODE_PORT} is not listed"
    );
    Ok(())
}

/// `miren endpoints` of both apps.
fn endpoints(node: &DemoNode) -> Result<()> {
    for app in ["hello-web", "udp-echo"] {
        let out = node.miren(&["endpoints", app])?;
        ensure!(out.contains("10.88."), "{app} has no sandbox endpoint");
    }
    Ok(())
}

/// The node-port and HTTP request counters from the agent's /metrics.
fn metrics(node: &DemoNode) -> Result<()> {
    println!(
        "\nnode$ curl -s http://127.0.0.1:9464/metrics | grep -E '^miren_(nodeport_|http_requests_total)'"
    );
    let out = node
        .node
        .command("curl")
        .args(["-s", "http://127.0.0.1:9464/metrics"])
        .output()
        .context("starting curl")?;
    ensure!(out.status.success(), "curl failed ({})", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let excerpt: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("miren_nodeport_") || l.starts_with("miren_http_requests_total"))
        .collect();
    for line in &excerpt {
        println!("{line}");
    }
    let value = |family: &str, labels: &[&str]| -> f64 {
        excerpt
            .iter()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter(|l| labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let port_label = format!("node_port=\"{UDP_NODE_PORT}\"");
    let rx = value("miren_nodeport_rx_packets_total", &[&port_label]);
    let datagrams = (UDP_SOCKETS * UDP_ROUNDS) as f64;
    ensure!(
        rx >= datagrams,
        "miren_nodeport_rx_packets_total for {UDP_NODE_PORT} is {rx}, expected at least {datagrams}"
    );
    let requests = value(
        "miren_http_requests_total",
        &["app=\"hello-web\"", "code=\"200\""],
    );
    ensure!(
        requests >= HTTP_REQUESTS as f64,
        "miren_http_requests_total for hello-web is {requests}, expected at least {HTTP_REQUESTS}"
    );
    Ok(())
}

/// What to try by hand while the demo stays up.
pub fn try_it_yourself(node: &DemoNode) {
    heading("the node stays up until Ctrl-C; try it from another shell");
    let client = node.client.name();
    println!("ip netns exec {client} curl -H 'Host: {HOST}' http://{NODE_IP}/");
    println!(
        "ip netns exec {client} python3 -c \"import socket; s = socket.socket(socket.AF_INET, \
         socket.SOCK_DGRAM); s.sendto(b'hi', ('{NODE_IP}', {UDP_NODE_PORT})); print(s.recvfrom(99))\""
    );
    println!(
        "MIREN_SOCKET={} {} ports --watch",
        node.socket().display(),
        miren_tests::process::binary("miren").display()
    );
}
