//! Faults in cluster mode, with traffic: three node namespaces and a client on one fabric, an
//! etcd member and an agent (a data plane, both planes in turn, and sandboxes) in each node,
//! and an echo app fixed at 3 instances (one per node) with a UDP and a TCP node port and a
//! route. Traffic goes from the client through the node addresses while
//! - a node is lost: its agent killed with -9 and its link taken down (its instance keeps
//!   running in the dark). Its instance must be placed on the other nodes within the lease
//!   TTL + 5 s, and traffic through the survivors recovers; the node then comes back and stops
//!   its old instance (no duplicates), and traffic through all three nodes works again;
//! - etcd members are lost: with one down deploys and traffic still work; with two down a
//!   deploy fails with "store unavailable" while traffic keeps flowing from the last known
//!   state for several lease TTLs (no data plane is flushed, no instance stopped).
//!
//! The times measured (re-placement, endpoints, traffic recovery) are printed; the only one
//! asserted is the bound on re-placement.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use miren_agent::config::Subnet;
use miren_tests::{
    apps::{HttpClient, WEB_PY, netns_pids, sandbox_netns, write_app},
    cluster::{CLIENT_IP, node_ip},
    cluster_agents::{TEST_LEASE_TTL, node_name},
    cluster_checks::{Cluster, ECHO_PY, FLOWS, NODES, WAIT, app_toml, tcp_via, udp_via},
    on_both_planes,
    topology::Netns,
    world::Plane,
};

/// The echo app's node ports and host.
const ECHO: App = App {
    name: "echo",
    udp: 30000,
    tcp: 30001,
    host: "echo.faults.test",
};
/// The app deployed with one etcd member down.
const SECOND: App = App {
    name: "second",
    udp: 30002,
    tcp: 30003,
    host: "second.faults.test",
};
/// The lease TTL the agents run with ([`TEST_LEASE_TTL`]).
const TTL: Duration = Duration::from_secs(3);
/// The bound on re-placing a lost node's instances: the lease TTL + 5 s.
const REPLACE_BOUND: Duration = Duration::from_secs(3 + 5);
/// How long a probe during a fault waits for its answer.
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// How long a flow of a full check (nothing is failing) waits for its answer.
const FLOW_WAIT: Duration = Duration::from_secs(3);
/// Probes in a row answered in every stream that count as "traffic recovered".
const STREAK: usize = 30;
/// Exchanges of a full check (per node and probe) that may stall past [`FLOW_WAIT`] if the
/// next one is answered: 1. Seen twice in about 85 runs of the quorum test with both CPUs
/// saturated by other processes, and once in CI (a TCP connection opened, its line not echoed within 3 s,
/// the instance's TCP stack answering the client's FIN later: a transient stall, not a lost
/// path); never in 10,000 probes at a 500 ms limit through instance starts and an etcd
/// quorum's loss and return on an idle machine.
const STALLS_ALLOWED: usize = 1;
/// How long traffic must keep flowing without an etcd quorum: several lease TTLs.
const WITHOUT_QUORUM: Duration = Duration::from_secs(12);

/// An echo app ([`app_toml`]) with its node ports and route.
#[derive(Debug, Clone, Copy)]
struct App {
    name: &'static str,
    udp: u16,
    tcp: u16,
    host: &'static str,
}

impl App {
    /// Deploys it through node `node` (the directory is removed afterwards: the code travels
    /// as a bundle) and routes its host to it.
    fn deploy(self, cluster: &Cluster, node: usize) {
        let dir = write_app(
            cluster.agents.dir(),
            self.name,
            &app_toml(self.name, Some((self.udp, self.tcp))),
            &[("serve.py", &format!("{ECHO_PY}{WEB_PY}"))],
        );
        let out = cluster
            .agents
            .miren(node, &["deploy", dir.to_str().unwrap()]);
        if !out.status.success() {
            fail(
                cluster,
                &format!("deploying {} through node{node}: {out:?}", self.name),
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        cluster.ok(node, &["route", "set", self.host, self.name]);
    }

    /// The three ways into it: its UDP and TCP node ports, its route.
    fn probes(self) -> [Probe; 3] {
        [
            Probe::Udp(self.udp),
            Probe::Tcp(self.tcp),
            Probe::Http(self.host),
        ]
    }
}

/// One way into an app through a node's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Probe {
    /// A UDP exchange with this node port.
    Udp(u16),
    /// A TCP connection to this node port, one line echoed.
    Tcp(u16),
    /// `GET /` with this host through the node's ingress.
    Http(&'static str),
}

/// One probe through node `node` from the client (the calling thread must be in the client's
/// namespace), each step waiting up to `wait`: the instance that answered.
fn probe(
    subnets: &[Subnet],
    node: usize,
    probe: Probe,
    message: &str,
    wait: Duration,
) -> Result<Ipv4Addr, String> {
    match probe {
        Probe::Udp(port) => udp_via(
            subnets,
            node,
            port,
            SocketAddr::from((CLIENT_IP, 0)),
            message,
            wait,
        ),
        Probe::Tcp(port) => tcp_via(subnets, node, port, message, wait),
        Probe::Http(host) => {
            let http = HttpClient {
                connect_timeout: Some(wait),
                read_timeout: wait * 4,
            };
            let ingress = SocketAddr::from((node_ip(node), 80));
            match http.get(ingress, host, "/") {
                Ok((200, body)) => body
                    .parse()
                    .map_err(|e| format!("HTTP {host} through node{node}: {body:?}: {e}")),
                Ok((status, body)) => {
                    Err(format!("HTTP {host} through node{node}: {status} {body:?}"))
                }
                Err(e) => Err(format!("HTTP {host} through node{node}: {e}")),
            }
        }
    }
}

/// Sends [`FLOWS`] of each of `probes` through each of `nodes` from the client: every one
/// must be answered (after at most [`STALLS_ALLOWED`] stalls, each followed by an answered
/// exchange), and through every node each probe must reach exactly `instances`.
///
/// # Panics
/// If one is not, with the agents' logs.
fn every_instance_answers(
    cluster: &Cluster,
    subnets: &[Subnet],
    nodes: &[usize],
    probes: &[Probe],
    instances: &BTreeSet<Ipv4Addr>,
) {
    let client = cluster.fabric.client().expect("client namespace");
    let result = client
        .run(|| -> Result<(), String> {
            for &node in nodes {
                for &p in probes {
                    let mut seen = BTreeSet::new();
                    let mut stalls = Vec::new();
                    for k in 0..FLOWS {
                        let message = format!("flow{k}");
                        let mut answer = probe(subnets, node, p, &message, FLOW_WAIT);
                        // A stalled exchange (see STALLS_ALLOWED): the next one, from a fresh
                        // client port, must be answered.
                        while let Err(stall) = answer {
                            stalls.push(stall);
                            if stalls.len() > STALLS_ALLOWED {
                                return Err(stalls.join("; "));
                            }
                            println!("{p:?} through node{node}: {}", stalls.join("; "));
                            answer =
                                probe(subnets, node, p, &format!("{message}-again"), FLOW_WAIT);
                        }
                        seen.insert(answer?);
                    }
                    if seen != *instances {
                        return Err(format!(
                            "{p:?} through node{node} reached {seen:?}, not {instances:?}"
                        ));
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    if let Err(e) = result {
        fail(cluster, &e);
    }
}

/// Panics with `failure` after the agents' logs, so that the failure is the last thing the
/// output says (CI shows an output's tail).
fn fail(cluster: &Cluster, failure: &str) -> ! {
    panic!("the agents' logs:\n{}\n{failure}", cluster.agents.logs())
}

/// Waits up to `timeout` (checking every 100 ms) until `check` holds; returns how long it
/// took since `since`.
///
/// # Panics
/// After `timeout`, naming `what`, with the agents' logs.
fn wait_since(
    cluster: &Cluster,
    since: Instant,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Duration {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            fail(cluster, &format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    since.elapsed()
}

/// One probe of a stream: when it started (since the fault) and what answered.
#[derive(Debug)]
struct Sample {
    node: usize,
    probe: Probe,
    at: Duration,
    result: Result<Ipv4Addr, String>,
}

/// Sets the flag when dropped (also when the test panics), so the probing threads end.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Probes from the client through each of `nodes` with each of `probes`, a thread (a stream)
/// per pair, each probing again 50 ms after its last probe ended, until `stop` is set; every
/// probe is appended to `samples`.
///
/// # Panics
/// As a probe does (a wrong answer, not a missing one), after stopping the other streams.
fn probe_streams(
    client: &Netns,
    subnets: &[Subnet],
    nodes: &[usize],
    probes: &[Probe],
    since: Instant,
    stop: &AtomicBool,
    samples: &Mutex<Vec<Sample>>,
) {
    client
        .run(|| {
            // Threads spawned here are in the client's namespace too.
            std::thread::scope(|scope| {
                for &node in nodes {
                    for &p in probes {
                        scope.spawn(move || {
                            let _stop = StopOnDrop(stop);
                            let mut k = 0u64;
                            while !stop.load(Ordering::SeqCst) {
                                k += 1;
                                let at = since.elapsed();
                                let message = format!("probe{k}");
                                let result = probe(subnets, node, p, &message, PROBE_WAIT);
                                samples.lock().unwrap().push(Sample {
                                    node,
                                    probe: p,
                                    at,
                                    result,
                                });
                                // Pacing, so a healthy stream does not turn into a load test.
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        });
                    }
                }
            });
        })
        .unwrap();
}

/// When traffic had recovered for good: for every stream of `streams` (node, probe), the run
/// of answered probes that ends it must be at least [`STREAK`] long; the latest start of such
/// a run after a failure (zero if no probe failed).
fn recovered_at(samples: &[Sample], streams: &[(usize, Probe)]) -> Option<Duration> {
    let mut recovered = Duration::ZERO;
    for &(node, p) in streams {
        let stream: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.node == node && s.probe == p)
            .collect();
        let clean = stream.iter().rev().take_while(|s| s.result.is_ok()).count();
        if clean < STREAK {
            return None;
        }
        if clean < stream.len() {
            recovered = recovered.max(stream[stream.len() - clean].at);
        }
    }
    Some(recovered)
}

/// The addresses node `i` lists as `app`'s endpoints on every port, if they agree.
fn all_endpoints(cluster: &Cluster, i: usize, app: &str) -> Option<BTreeSet<Ipv4Addr>> {
    let udp = cluster.endpoints(i, app, "udp");
    (cluster.endpoints(i, app, "tcp") == udp && cluster.endpoints(i, app, "http") == udp)
        .then_some(udp)
}

/// A node that is not the scheduler has its agent killed with -9 and its link taken down
/// (its instance keeps running in the dark): the instance is placed on the survivors within
/// the lease TTL + 5 s, their endpoints drop the lost one, and UDP, TCP and HTTP through the
/// survivors recover. The node comes back: it stops its old instance (3 placed, 3 running in
/// the whole cluster, no endpoint on it) and traffic through all three nodes works again.
fn a_lost_node_cut_off_the_network_has_its_instance_placed_elsewhere_and_rejoins_without_duplicates(
    plane: Plane,
) {
    assert_eq!(TEST_LEASE_TTL, "3s", "TTL follows the agents' lease TTL");
    let mut cluster = Cluster::start(&format!("cfnode{}", plane.flag()), plane);
    let subnets = cluster.subnets();
    ECHO.deploy(&cluster, 0);
    let echo = cluster.wait_for_instances(ECHO.name, &subnets);
    cluster.wait_for_dataplanes();
    let all: BTreeSet<Ipv4Addr> = echo.iter().copied().collect();
    let every_node: Vec<usize> = (0..NODES).collect();
    every_instance_answers(&cluster, &subnets, &every_node, &ECHO.probes(), &all);

    // The victim: a node that does not schedule (so this measures re-placement, not also a
    // scheduler failover).
    let status: serde_json::Value =
        serde_json::from_str(&cluster.ok(0, &["--output", "json", "status"])).unwrap();
    let scheduler = status["scheduler"]
        .as_str()
        .expect("a scheduler")
        .to_owned();
    let victim = (0..NODES)
        .rev()
        .find(|i| node_name(*i) != scheduler)
        .expect("a node that does not schedule");
    let survivors: Vec<usize> = (0..NODES).filter(|i| *i != victim).collect();
    let lost = echo[victim];
    let lost_netns = sandbox_netns(cluster.agents.agent(victim).pid(), lost);
    println!("scheduler {scheduler}; losing node{victim} and its instance {lost}");

    cluster.agents.kill9(victim);
    let killed = Instant::now();
    cluster.fabric.link_down(victim).expect("link down");

    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let streams: Vec<(usize, Probe)> = survivors
        .iter()
        .flat_map(|&node| ECHO.probes().map(|p| (node, p)))
        .collect();
    let client = cluster.fabric.client().expect("client namespace");
    let recovered = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            probe_streams(
                client,
                &subnets,
                &survivors,
                &ECHO.probes(),
                killed,
                &stop,
                &samples,
            );
        });
        let _stop = StopOnDrop(&stop);
        let prober_runs = || {
            assert!(
                !prober.is_finished(),
                "the probes ended early (the panic is above)"
            );
        };

        // Placed again: three placements, none on the lost node, as both survivors see it.
        let replaced = wait_since(&cluster, killed, "re-placement", WAIT, || {
            prober_runs();
            survivors.iter().all(|&s| {
                let placed = cluster.placed_on(s, ECHO.name);
                placed.len() == 3 && !placed.contains(&node_name(victim))
            })
        });
        println!(
            "re-placed {replaced:?} after the kill (bound: TTL {TTL:?} + 5 s = {REPLACE_BOUND:?})"
        );
        if replaced > REPLACE_BOUND {
            fail(
                &cluster,
                &format!("re-placement took {replaced:?}, more than {REPLACE_BOUND:?}"),
            );
        }

        // The survivors' endpoints: three live instances, none on the lost node.
        let endpoints_left = wait_since(&cluster, killed, "the survivors' endpoints", WAIT, || {
            prober_runs();
            let seen: Vec<_> = survivors
                .iter()
                .map(|&s| all_endpoints(&cluster, s, ECHO.name))
                .collect();
            seen.iter().all(|e| {
                e.as_ref().is_some_and(|e| {
                    e.len() == 3 && e.iter().all(|a| !subnets[victim].contains(*a))
                })
            }) && seen.windows(2).all(|w| w[0] == w[1])
        });
        println!(
            "the survivors' endpoints left the lost instance {endpoints_left:?} after the kill"
        );

        // Traffic through the survivors: every stream answered STREAK times in a row.
        wait_since(
            &cluster,
            killed,
            "traffic through the survivors",
            WAIT,
            || {
                prober_runs();
                recovered_at(&samples.lock().unwrap(), &streams).is_some()
            },
        );
        stop.store(true, Ordering::SeqCst);
        prober
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        recovered_at(&samples.lock().unwrap(), &streams).unwrap()
    });
    let samples = samples.into_inner().unwrap();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.result.is_err()).collect();
    println!(
        "traffic through the survivors recovered {recovered:?} after the kill: {} of {} probes \
         failed, from {:?} to {:?}",
        failed.len(),
        samples.len(),
        failed.iter().map(|s| s.at).min(),
        failed.iter().map(|s| s.at).max(),
    );
    for &(node, p) in &streams {
        let stream: Vec<&&Sample> = failed
            .iter()
            .filter(|s| s.node == node && s.probe == p)
            .collect();
        if let Some(last) = stream.last() {
            println!(
                "  node{node} {p:?}: {} failed, the last one started at {:?} ({}); answered \
                 from {:?} on",
                stream.len(),
                last.at,
                last.result.as_ref().unwrap_err(),
                recovered_at(&samples, &[(node, p)]).unwrap()
            );
        }
    }

    // Every survivor reaches every live instance; the lost one still runs in the dark.
    let live = all_endpoints(&cluster, survivors[0], ECHO.name).unwrap();
    every_instance_answers(&cluster, &subnets, &survivors, &ECHO.probes(), &live);
    assert!(
        !netns_pids(&lost_netns).is_empty(),
        "the lost node's instance {lost} did not keep running in the dark"
    );

    // The node comes back: it stops its old instance, and nothing is placed or runs twice.
    // As a machine comes back: its network, then its etcd member rejoins (it has a leader
    // again), then the agent starts (an agent does not wait for the store at startup).
    cluster.fabric.link_up(victim).expect("link up");
    let back = Instant::now();
    let rejoined = wait_since(
        &cluster,
        back,
        "node{victim}'s etcd member to rejoin",
        WAIT,
        || cluster.etcd.member_healthy(victim),
    );
    println!("node{victim}'s etcd member had a leader again {rejoined:?} after the link came up");
    cluster.agents.restart(&cluster.fabric, victim);
    let mut duplicates = BTreeMap::new();
    let settled = wait_since(&cluster, back, "the returned node to settle", WAIT, || {
        let mut settled = true;
        for i in 0..NODES {
            let endpoints = all_endpoints(&cluster, i, ECHO.name);
            if let Some(dup) = endpoints
                .iter()
                .flatten()
                .find(|a| subnets[victim].contains(**a))
            {
                duplicates.insert(i, (*dup, back.elapsed()));
            }
            settled &= endpoints.as_ref() == Some(&live);
        }
        let placed = cluster.placed_on(victim, ECHO.name);
        let running: Vec<usize> = (0..NODES)
            .map(|i| cluster.running_on(i, ECHO.name))
            .collect();
        settled
            && placed.len() == 3
            && !placed.contains(&node_name(victim))
            && running[victim] == 0
            && running.iter().sum::<usize>() == 3
            && netns_pids(&lost_netns).is_empty()
    });
    println!(
        "node{victim} back: its old instance stopped and every view agreed {settled:?} after the restart"
    );
    if !duplicates.is_empty() {
        fail(
            &cluster,
            &format!(
                "a node listed an endpoint on the returned node{victim} (node: (address, \
                 when)): {duplicates:?}"
            ),
        );
    }
    cluster.wait_for_dataplanes();
    every_instance_answers(&cluster, &subnets, &every_node, &ECHO.probes(), &live);
}

/// With the etcd leader killed, a deploy works and traffic reaches both apps through every
/// node; with a second member stopped (no quorum), a deploy fails with "store unavailable"
/// while UDP, TCP and HTTP to both apps keep flowing through every node, to every instance,
/// for several lease TTLs; with the members back, a deploy works again.
fn traffic_keeps_flowing_from_the_last_known_state_without_etcd_quorum(plane: Plane) {
    let mut cluster = Cluster::start(&format!("cfquorum{}", plane.flag()), plane);
    let subnets = cluster.subnets();
    let every_node: Vec<usize> = (0..NODES).collect();
    ECHO.deploy(&cluster, 0);
    let echo: BTreeSet<Ipv4Addr> = cluster
        .wait_for_instances(ECHO.name, &subnets)
        .into_iter()
        .collect();
    cluster.wait_for_dataplanes();
    every_instance_answers(&cluster, &subnets, &every_node, &ECHO.probes(), &echo);

    // One member down, the leader: a deploy works, traffic reaches both apps.
    let leader = cluster.etcd.leader(0).expect("the etcd leader");
    cluster.etcd.kill_member(leader);
    let started = Instant::now();
    SECOND.deploy(&cluster, 0);
    println!(
        "with etcd member m{leader} (the leader) killed, a deploy and a route took {:?}",
        started.elapsed()
    );
    let second: BTreeSet<Ipv4Addr> = cluster
        .wait_for_instances(SECOND.name, &subnets)
        .into_iter()
        .collect();
    cluster.wait_for_dataplanes();
    every_instance_answers(&cluster, &subnets, &every_node, &ECHO.probes(), &echo);
    every_instance_answers(&cluster, &subnets, &every_node, &SECOND.probes(), &second);

    // Two members down: no quorum. A deploy fails clearly.
    let other = (0..NODES).find(|i| *i != leader).unwrap();
    cluster.etcd.stop_member(other);
    let lost_quorum = Instant::now();
    let dir = write_app(
        cluster.agents.dir(),
        "third",
        &app_toml("third", Some((30004, 30005))),
        &[("serve.py", &format!("{ECHO_PY}{WEB_PY}"))],
    );
    let out = cluster.agents.miren(1, &["deploy", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        fail(&cluster, "a deploy without quorum succeeded");
    }
    assert!(err.contains("store unavailable"), "{err}");
    println!(
        "without quorum a deploy failed after {:?}: {}",
        lost_quorum.elapsed(),
        err.trim()
    );

    // Traffic keeps flowing through every node to both apps, from every instance, for
    // several lease TTLs: every probe answered.
    let client = cluster.fabric.client().expect("client namespace");
    let apps = [(ECHO, &echo), (SECOND, &second)];
    let flowing = Instant::now();
    let outcome = client
        .run(|| -> Result<usize, String> {
            let mut seen: BTreeMap<(usize, Probe), BTreeSet<Ipv4Addr>> = BTreeMap::new();
            let mut k = 0usize;
            while flowing.elapsed() < WITHOUT_QUORUM {
                for node in 0..NODES {
                    for (app, _) in &apps {
                        for p in app.probes() {
                            k += 1;
                            let instance =
                                probe(&subnets, node, p, &format!("probe{k}"), FLOW_WAIT).map_err(
                                    |e| {
                                        format!(
                                            "{e} ({:?} after losing quorum)",
                                            lost_quorum.elapsed()
                                        )
                                    },
                                )?;
                            seen.entry((node, p)).or_default().insert(instance);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            for node in 0..NODES {
                for (app, instances) in &apps {
                    for p in app.probes() {
                        let reached = &seen[&(node, p)];
                        if reached != *instances {
                            return Err(format!(
                                "{p:?} through node{node} reached only {reached:?} of \
                                 {instances:?} without quorum"
                            ));
                        }
                    }
                }
            }
            Ok(k)
        })
        .unwrap();
    let probes = outcome.unwrap_or_else(|e| fail(&cluster, &e));
    println!(
        "without quorum, {probes} probes over {:?} (until {:?} after losing quorum, lease TTL \
         {TTL:?}) were all answered",
        flowing.elapsed(),
        lost_quorum.elapsed()
    );
    // Every node still runs its instances and lists every endpoint.
    for node in 0..NODES {
        for (app, instances) in &apps {
            assert_eq!(
                cluster.running_on(node, app.name),
                1,
                "node{node} {}",
                app.name
            );
            assert_eq!(
                all_endpoints(&cluster, node, app.name).as_ref(),
                Some(*instances),
                "node{node}'s endpoints of {}",
                app.name
            );
        }
    }

    // The members come back: a deploy works again, and traffic still does.
    cluster.etcd.start_member(other);
    cluster.etcd.start_member(leader);
    let back = Instant::now();
    let dir = dir.to_str().unwrap().to_owned();
    let deployed = wait_since(
        &cluster,
        back,
        "a deploy after quorum returned",
        WAIT,
        || cluster.agents.miren(1, &["deploy", &dir]).status.success(),
    );
    println!("with quorum back, a deploy succeeded {deployed:?} after the members were healthy");
    every_instance_answers(&cluster, &subnets, &every_node, &ECHO.probes(), &echo);
    every_instance_answers(&cluster, &subnets, &every_node, &SECOND.probes(), &second);
}

on_both_planes!(
    a_lost_node_cut_off_the_network_has_its_instance_placed_elsewhere_and_rejoins_without_duplicates,
    traffic_keeps_flowing_from_the_last_known_state_without_etcd_quorum,
);
