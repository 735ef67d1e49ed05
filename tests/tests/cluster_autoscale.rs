//! Auto services across a cluster: the ingress of every node can start a service at zero,
//! the first requests arriving at all three nodes at once start exactly one instance in the
//! whole cluster, and the instance is kept while any node's ingress has requests for it —
//! wherever it runs — and stopped once the whole cluster was idle for `scale_down_delay`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use miren_tests::{
    apps::{HttpClient, LAZY_APP_TOML, WEB_PY, wait_until, write_app},
    cluster::node_ip,
    cluster_checks::{Cluster, NODES, WAIT},
    world::Plane,
};

const HOST: &str = "lazy.cluster.test";
/// Concurrent first requests per node.
const FIRST_REQUESTS: usize = 8;
/// How long the service stays busy through the nodes that do not run it.
const BUSY: Duration = Duration::from_secs(8);

const HTTP: HttpClient = HttpClient {
    connect_timeout: Some(Duration::from_secs(5)),
    read_timeout: Duration::from_secs(60),
};

/// `GET /` through node `node`'s ingress, from the client namespace's thread: the status and
/// body, retried while the node's ingress does not know the route yet (404, which starts
/// nothing).
fn get(node: usize) -> (u16, String) {
    let ingress = SocketAddr::from((node_ip(node), 80));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = HTTP.get(ingress, HOST, "/").unwrap();
        if status != 404 || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn instances_started(cluster: &Cluster) -> usize {
    cluster.agents.logs().matches("instance started").count()
}

#[test]
fn first_requests_on_every_node_start_one_instance_and_cluster_wide_idleness_stops_it() {
    let cluster = Cluster::start("cauto", Plane::Nft);
    let dir = write_app(
        cluster.agents.dir(),
        "lazy",
        LAZY_APP_TOML,
        &[("web.py", WEB_PY)],
    );
    cluster.ok(0, &["deploy", dir.to_str().unwrap()]);
    cluster.ok(0, &["route", "set", HOST, "lazy"]);
    assert!(cluster.placed_on(0, "lazy").is_empty());
    let client = cluster.fabric.client().expect("client namespace");

    // The first requests arrive at every node at once: one instance starts, and every
    // request is answered by it.
    let answers: Vec<(u16, String)> = client
        .run(|| {
            std::thread::scope(|scope| {
                let requests: Vec<_> = (0..NODES * FIRST_REQUESTS)
                    .map(|k| scope.spawn(move || get(k % NODES)))
                    .collect();
                requests.into_iter().map(|r| r.join().unwrap()).collect()
            })
        })
        .unwrap();
    let bodies: BTreeSet<&str> = answers.iter().map(|(_, body)| body.as_str()).collect();
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}\n{}",
        cluster.agents.logs()
    );
    assert_eq!(bodies.len(), 1, "one instance answered: {bodies:?}");
    let placed = cluster.placed_on(0, "lazy");
    assert_eq!(placed.len(), 1, "{placed:?}");
    assert_eq!(instances_started(&cluster), 1, "{}", cluster.agents.logs());
    let home: usize = placed[0].trim_start_matches("node").parse().unwrap();
    println!("the instance runs on node{home}: {bodies:?}");

    // Requests keep coming, only through the nodes that do not run it, for longer than the
    // scale-down delay: the cluster's demand keeps the one instance.
    let others: Vec<usize> = (0..NODES).filter(|n| *n != home).collect();
    client
        .run(|| {
            let start = Instant::now();
            let mut k = 0;
            while start.elapsed() < BUSY {
                let (status, body) = get(others[k % others.len()]);
                assert_eq!(status, 200, "{body}");
                assert!(bodies.contains(body.as_str()), "{body}");
                k += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .unwrap();
    assert_eq!(cluster.placed_on(home, "lazy"), placed);
    assert_eq!(instances_started(&cluster), 1, "{}", cluster.agents.logs());

    // Idle everywhere: scaled to zero on every node.
    wait_until("the idle service scaled to zero", WAIT, || {
        (0..NODES).all(|i| {
            cluster.placed_on(i, "lazy").is_empty()
                && cluster.running_on(i, "lazy") == 0
                && cluster.app(i, "lazy").services[0]
                    .instances
                    .as_ref()
                    .is_none_or(|status| status.ready == 0)
        })
    });
    assert!(cluster.agents.logs().contains("idle; scaling down"));

    // And started again by the next request, wherever it arrives.
    let (status, _) = client.run(|| get(others[0])).unwrap();
    assert_eq!(status, 200, "{}", cluster.agents.logs());
    assert_eq!(instances_started(&cluster), 2);
}
