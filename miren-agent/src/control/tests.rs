//! The control plane over a real SQLite store: several `ControlPlane`s on one store stand for
//! agents of one cluster (each with its own watch-fed view).

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use super::*;
use crate::{
    api::types::{PortsEditRequest, PublishSpec},
    store::{
        SqliteStore,
        records::{AppRecord, RecordKey, encode},
    },
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("miren-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(node: &str) -> ControlSettings {
    ControlSettings {
        validation: ValidationContext {
            reserved_ports: vec![(8080, "the agent's HTTP listener (--http-addr)".into())],
            ..ValidationContext::default()
        },
        port_range: 20000..=20999,
        node: node.into(),
        lease_ttl: Duration::from_secs(10),
    }
}

async fn plane(store: &SqliteStore, node: &str) -> ControlPlane {
    ControlPlane::open(Arc::new(store.clone()), settings(node))
        .await
        .unwrap()
}

fn game(name: &str, node_port: u16) -> String {
    format!(
        r#"name = "{name}"
[services.main]
command = "sleep 1000"
[[services.main.ports]]
name = "game"
port = 27015
type = "udp"
node_port = {node_port}
[[services.main.ports]]
name = "web"
type = "http"
"#
    )
}

async fn deploy(plane: &ControlPlane, toml: &str) -> Result<AppDetail, ControlError> {
    plane.deploy("app.toml", toml, None).await
}

use crate::api::types::AppDetail;

#[tokio::test]
async fn a_command_answers_after_its_own_view_has_the_change() {
    let dir = TempDir::new("ryw");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let plane = plane(&store, "n1").await;
    let detail = deploy(&plane, &game("game", 27015)).await.unwrap();
    assert_eq!(detail.version, 1);
    // The web port got an assigned number, kept by the next deploy.
    let web = &detail.services[0].ports[1];
    assert!(
        web.assigned && (20000..=20999).contains(&web.port),
        "{web:?}"
    );
    assert_eq!(plane.apps().len(), 1);
    let again = deploy(&plane, &game("game", 27015)).await.unwrap();
    assert_eq!(again.version, 2);
    assert_eq!(again.services[0].ports[1].port, web.port);
    let ports = plane.node_ports(None).unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        (ports[0].node_port, ports[0].protocol.as_str()),
        (27015, "udp")
    );
}

#[tokio::test]
async fn a_node_port_race_between_two_agents_has_exactly_one_winner_naming_the_holder() {
    let dir = TempDir::new("race");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let (one, two) = (plane(&store, "n1").await, plane(&store, "n2").await);
    for round in 0..20u16 {
        let port = 30000 + round;
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let (toml_a, toml_b) = (game(&a, port), game(&b, port));
        let (first, second) = tokio::join!(deploy(&one, &toml_a), deploy(&two, &toml_b));
        let (winner, loser) = match (first, second) {
            (Ok(_), Err(err)) => (&a, err),
            (Err(err), Ok(_)) => (&b, err),
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        };
        let message = loser.to_string();
        assert!(
            message.contains(&format!(
                "node_port {port}/udp is already taken by app \"{winner}\" service \"main\""
            )),
            "round {round}: {message}"
        );
        // Both views agree on the holder.
        for plane in [&one, &two] {
            let ports = plane.node_ports(None).unwrap();
            let holder: Vec<&str> = ports
                .iter()
                .filter(|p| p.node_port == port)
                .map(|p| p.app.as_str())
                .collect();
            assert_eq!(holder, [winner.as_str()]);
        }
    }
}

#[tokio::test]
async fn unrelated_apps_deploy_concurrently_without_conflicts() {
    let dir = TempDir::new("unrelated");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let (one, two) = (plane(&store, "n1").await, plane(&store, "n2").await);
    for round in 0..10u16 {
        let toml_x = game(&format!("x{round}"), 31000 + round);
        let toml_y = game(&format!("y{round}"), 32000 + round);
        let (first, second) = tokio::join!(deploy(&one, &toml_x), deploy(&two, &toml_y));
        first.unwrap();
        second.unwrap();
    }
    assert_eq!(one.apps().len(), 20);
}

#[tokio::test]
async fn removing_an_app_releases_its_node_ports_routes_and_endpoints() {
    let dir = TempDir::new("remove");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let plane = plane(&store, "n1").await;
    deploy(&plane, &game("a", 7000)).await.unwrap();
    plane
        .set_route("a.example.com", "a", None, None)
        .await
        .unwrap();
    plane
        .set_endpoints(
            "a",
            "main",
            BTreeMap::from([("game".into(), vec!["10.88.0.2:27015".parse().unwrap()])]),
        )
        .await
        .unwrap();
    let err = deploy(&plane, &game("b", 7000)).await.unwrap_err();
    assert!(
        err.to_string().contains("already taken by app \"a\""),
        "{err}"
    );
    plane.remove_app("a").await.unwrap();
    assert!(plane.routes().is_empty());
    let keys: Vec<String> = store
        .list()
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert!(keys.is_empty(), "{keys:?}");
    deploy(&plane, &game("b", 7000)).await.unwrap();
}

#[tokio::test]
async fn endpoints_of_every_node_reach_the_data_plane_and_the_ingress() {
    let dir = TempDir::new("endpoints");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let (one, two) = (plane(&store, "n1").await, plane(&store, "n2").await);
    let detail = deploy(&one, &game("a", 7000)).await.unwrap();
    let web_port = detail.services[0].ports[1].port;
    one.set_route("a.example.com", "a", None, None)
        .await
        .unwrap();
    let addr =
        |ip: &str, port: u16| -> std::net::SocketAddr { format!("{ip}:{port}").parse().unwrap() };
    for (plane, ip) in [(&one, "10.88.0.2"), (&two, "10.88.1.2")] {
        plane
            .set_endpoints(
                "a",
                "main",
                BTreeMap::from([
                    ("game".into(), vec![addr(ip, 27015)]),
                    ("web".into(), vec![addr(ip, web_port)]),
                ]),
            )
            .await
            .unwrap();
    }
    // Node two's change reached node one's view through the watch.
    assert!(
        one.view
            .wait_for(*two.subscribe().borrow(), Duration::from_secs(5))
            .await
    );
    let (_, snapshot) = one.dataplane_snapshot(&[], None);
    let backends: Vec<_> = snapshot
        .node_ports
        .values()
        .flatten()
        .map(ToString::to_string)
        .collect();
    assert_eq!(backends, ["10.88.0.2:27015", "10.88.1.2:27015"]);
    let (_, routes) = one.ingress_routes();
    assert_eq!(
        routes[0].endpoints.as_ref(),
        [addr("10.88.0.2", web_port), addr("10.88.1.2", web_port)]
    );
    // Node two withdraws its instances: only node one's remain.
    two.set_endpoints("a", "main", BTreeMap::new())
        .await
        .unwrap();
    assert!(
        one.view
            .wait_for(*two.subscribe().borrow(), Duration::from_secs(5))
            .await
    );
    let listed = one.endpoints("a", Some("main")).unwrap();
    assert_eq!(listed[0].endpoints["game"], [addr("10.88.0.2", 27015)]);
}

#[tokio::test]
async fn the_view_follows_writes_of_other_agents_and_skips_apps_invalid_here() {
    let dir = TempDir::new("follow");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let plane = plane(&store, "n1").await;
    let mut revisions = plane.subscribe();
    // Another agent (with other listener ports) deployed an app publishing 8080, which is
    // this agent's HTTP listener.
    let record = AppRecord {
        name: "other".into(),
        source_name: "app.toml".into(),
        toml: game("other", 8080),
        version: 1,
        deployed_at: 1,
        bundle: None,
        directory: None,
        assigned_ports: BTreeMap::from([(("main".into(), "web".into()), 20000)]),
    };
    let mut txn = Txn::default();
    txn.put(RecordKey::App("other".into()), encode(&record));
    let revision = store.commit(txn).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        revisions.wait_for(|r| *r >= revision),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(plane.apps().is_empty());
    // It can still be replaced and removed from here.
    let err = deploy(&plane, &game("other", 8080)).await.unwrap_err();
    assert!(
        err.to_string().contains("the agent's HTTP listener"),
        "{err}"
    );
    let removed = plane.remove_app("other").await.unwrap();
    assert_eq!(removed.name, "other");
}

#[tokio::test]
async fn editing_node_ports_claims_and_releases_in_one_transaction() {
    let dir = TempDir::new("edit");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let plane = plane(&store, "n1").await;
    deploy(&plane, &game("a", 7000)).await.unwrap();
    deploy(&plane, &game("b", 7001)).await.unwrap();
    let edit = |add: u16, remove: Option<u16>| PortsEditRequest {
        service: "main".into(),
        add: vec![PublishSpec {
            node_port: add,
            port: None,
            protocol: None,
        }],
        remove: remove
            .map(|node_port| crate::api::types::UnpublishSpec {
                node_port,
                protocol: None,
            })
            .into_iter()
            .collect(),
    };
    let err = plane
        .edit_node_ports("a", &edit(7001, Some(7000)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already taken by app \"b\""),
        "{err}"
    );
    let ports = plane
        .edit_node_ports("a", &edit(7002, Some(7000)))
        .await
        .unwrap();
    assert_eq!(
        ports.iter().map(|p| p.node_port).collect::<Vec<_>>(),
        [7002]
    );
    // 7000 is free again.
    deploy(&plane, &game("c", 7000)).await.unwrap();
}

/// Three agents of one cluster (one store), registered as nodes with their own subnets.
async fn cluster(store: &SqliteStore) -> Vec<ControlPlane> {
    let cluster = crate::config::Subnet::parse("10.88.0.0/16").unwrap();
    let mut planes = Vec::new();
    for i in 0..3 {
        let plane = plane(store, &format!("n{i}")).await;
        let subnet = plane
            .register_node(&Registration {
                addresses: Vec::new(),
                runs_instances: true,
                cluster_addr: None,
                subnet: SubnetPlan::Carve {
                    cluster,
                    prefix: 24,
                },
            })
            .await
            .unwrap();
        assert_eq!(subnet.to_string(), format!("10.88.{i}.0/24"));
        planes.push(plane);
    }
    planes
}

fn fixed(name: &str, instances: u32) -> String {
    format!(
        "name = \"{name}\"\n[services.main]\ncommand = \"sleep 1000\"\nport = 9000\nport_type = \"tcp\"\n[services.main.concurrency]\nmode = \"fixed\"\nnum_instances = {instances}\n"
    )
}

/// Instances of `app`'s service `main` each plane runs.
fn local_instances(planes: &[ControlPlane], app: &str) -> Vec<u64> {
    planes
        .iter()
        .map(|p| {
            p.deployed_services()
                .iter()
                .find(|d| d.app == app)
                .map_or(0, |d| d.instances as u64)
        })
        .collect()
}

/// Runs scheduling rounds on every plane (each after its view caught up with the store)
/// until nothing changes any more.
async fn settle(store: &SqliteStore, planes: &[ControlPlane]) {
    for _ in 0..10 {
        for plane in planes {
            let revision = store.list().await.unwrap().revision;
            plane.caught_up(revision).await.unwrap();
            plane.schedule_once().await.unwrap();
        }
    }
}

#[tokio::test]
async fn one_scheduler_spreads_instances_and_replaces_those_of_a_lost_node() {
    let dir = TempDir::new("schedule");
    let store = SqliteStore::open(&dir.0, "n0").unwrap();
    let planes = cluster(&store).await;
    deploy(&planes[0], &fixed("a", 3)).await.unwrap();
    deploy(&planes[0], &fixed("b", 4)).await.unwrap();
    settle(&store, &planes).await;
    // Exactly one scheduler, the same for everyone.
    let leaders: Vec<Option<String>> = planes.iter().map(|p| p.scheduler()).collect();
    assert!(
        leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]),
        "{leaders:?}"
    );
    assert_eq!(local_instances(&planes, "a"), [1, 1, 1]);
    let mut b = local_instances(&planes, "b");
    b.sort_unstable();
    assert_eq!(b, [1, 1, 2]);
    // n2 is lost (its lease ends): its instances go to the other nodes.
    let lease = planes[2].lease.id();
    store.revoke_lease(lease).await.unwrap();
    settle(&store, &planes[..2]).await;
    let a = local_instances(&planes[..2], "a");
    assert_eq!(a.iter().sum::<u64>(), 3, "{a:?}");
    assert!(a.iter().all(|n| *n >= 1), "{a:?}");
    let nodes = planes[0].nodes();
    assert_eq!(nodes[2].status, "lost");
    assert_eq!(nodes[2].instances, 0);
    // Scaling down takes from the busiest node first.
    deploy(&planes[0], &fixed("a", 2)).await.unwrap();
    settle(&store, &planes[..2]).await;
    assert_eq!(local_instances(&planes[..2], "a"), [1, 1]);
    // Removing the app removes its placements.
    planes[0].remove_app("a").await.unwrap();
    settle(&store, &planes[..2]).await;
    assert!(
        !planes[0]
            .view
            .lock()
            .placements
            .keys()
            .any(|(app, _)| app == "a")
    );
}

#[tokio::test]
async fn a_drain_moves_one_instance_at_a_time_once_its_replacement_is_ready() {
    let dir = TempDir::new("drain");
    let store = SqliteStore::open(&dir.0, "n0").unwrap();
    let planes = cluster(&store).await;
    deploy(&planes[0], &fixed("a", 2)).await.unwrap();
    deploy(&planes[0], &fixed("b", 2)).await.unwrap();
    settle(&store, &planes).await;
    let before = [local_instances(&planes, "a"), local_instances(&planes, "b")];
    // Drain a node that runs something of both apps.
    let busy = (0..3)
        .find(|&i| before[0][i] > 0 && before[1][i] > 0)
        .expect("a node running both apps");
    let name = format!("n{busy}");
    let info = planes[0]
        .set_node_mode(&name, NodeMode::Draining)
        .await
        .unwrap();
    assert_eq!(info.status, "draining");
    settle(&store, &planes).await;
    // One replacement was placed; nothing left the draining node yet.
    let placed: u64 = local_instances(&planes, "a").iter().sum::<u64>()
        + local_instances(&planes, "b").iter().sum::<u64>();
    assert_eq!(placed, 5, "one surge instance at a time");
    assert_eq!(
        local_instances(&planes, "a")[busy] + local_instances(&planes, "b")[busy],
        2
    );
    // Every node reports its instances ready: the drain goes on until the node is empty.
    for _ in 0..6 {
        for (i, plane) in planes.iter().enumerate() {
            for app in ["a", "b"] {
                let n = local_instances(&planes, app)[i];
                let addrs = (0..n)
                    .map(|k| format!("10.88.{i}.{}:9000", k + 2).parse().unwrap())
                    .collect();
                plane
                    .set_endpoints(app, "main", BTreeMap::from([("tcp".into(), addrs)]))
                    .await
                    .unwrap();
            }
        }
        settle(&store, &planes).await;
    }
    for app in ["a", "b"] {
        let local = local_instances(&planes, app);
        assert_eq!(local[busy], 0, "{app}: {local:?}");
        assert_eq!(local.iter().sum::<u64>(), 2, "{app}: {local:?}");
    }
    // Uncordoned, it takes new instances again.
    planes[0]
        .set_node_mode(&name, NodeMode::Uncordoned)
        .await
        .unwrap();
    deploy(&planes[0], &fixed("c", 3)).await.unwrap();
    settle(&store, &planes).await;
    assert_eq!(local_instances(&planes, "c"), [1, 1, 1]);
}

fn auto(name: &str, requests_per_instance: u32) -> String {
    format!(
        "name = \"{name}\"\n[services.main]\ncommand = \"sleep 1000\"\nport = 9000\n[services.main.concurrency]\nmode = \"auto\"\nrequests_per_instance = {requests_per_instance}\nscale_down_delay = \"1m\"\n"
    )
}

#[tokio::test]
async fn an_auto_service_is_sized_by_the_demand_of_every_node() {
    let dir = TempDir::new("auto");
    let store = SqliteStore::open(&dir.0, "n0").unwrap();
    let planes = cluster(&store).await;
    deploy(&planes[0], &auto("lazy", 100)).await.unwrap();
    settle(&store, &planes).await;
    assert_eq!(local_instances(&planes, "lazy"), [0, 0, 0]);
    // First requests on two nodes at once: one instance in the whole cluster.
    planes[1]
        .report_demand("lazy", "main", Some(40))
        .await
        .unwrap();
    planes[2]
        .report_demand("lazy", "main", Some(55))
        .await
        .unwrap();
    settle(&store, &planes).await;
    assert_eq!(local_instances(&planes, "lazy").iter().sum::<u64>(), 1);
    // More requests in flight over the cluster: one instance per 100, spread.
    planes[0]
        .report_demand("lazy", "main", Some(120))
        .await
        .unwrap();
    settle(&store, &planes).await;
    assert_eq!(local_instances(&planes, "lazy"), [1, 1, 1]);
    // Less demand never scales down while there is any.
    planes[0].report_demand("lazy", "main", None).await.unwrap();
    planes[2].report_demand("lazy", "main", None).await.unwrap();
    settle(&store, &planes).await;
    assert_eq!(local_instances(&planes, "lazy"), [1, 1, 1]);
    assert_eq!(planes[0].view.lock().demand.len(), 1);
    // A node's demand ends with its lease.
    store.revoke_lease(planes[1].lease.id()).await.unwrap();
    settle(&store, &planes[..1]).await;
    assert!(planes[0].view.lock().demand.is_empty());
}

#[tokio::test]
async fn an_idle_auto_service_loses_one_instance_per_scale_down_delay() {
    let dir = TempDir::new("idle");
    let store = SqliteStore::open(&dir.0, "n0").unwrap();
    let planes = cluster(&store).await;
    deploy(&planes[0], &auto("lazy", 1)).await.unwrap();
    planes[0]
        .report_demand("lazy", "main", Some(3))
        .await
        .unwrap();
    settle(&store, &planes).await;
    assert_eq!(local_instances(&planes, "lazy"), [1, 1, 1]);
    let key = ("lazy".to_owned(), "main".to_owned());
    let start = std::time::Instant::now();
    let minute = Duration::from_secs(60);
    let at = |seconds| start + Duration::from_secs(seconds);
    // A scheduler that saw the demand end: one fewer at once, the next only a
    // scale_down_delay later.
    let mut scaler = demand::AutoScaler::default();
    assert_eq!(scaler.targets(&planes[0].view.lock(), 64, start)[&key], 3);
    planes[0].report_demand("lazy", "main", None).await.unwrap();
    let mut targets_at = |at| scaler.targets(&planes[0].view.lock(), 64, at)[&key];
    assert_eq!(targets_at(at(1)), 2);
    assert_eq!(targets_at(at(30)), 3);
    assert_eq!(targets_at(at(61)), 2);
    // A new scheduler first waits a whole scale_down_delay.
    let mut fresh = demand::AutoScaler::default();
    assert_eq!(fresh.targets(&planes[0].view.lock(), 64, start)[&key], 3);
    assert_eq!(
        fresh.targets(&planes[0].view.lock(), 64, start + minute)[&key],
        2
    );
    // Limits hold over demand.
    planes[0]
        .report_demand("lazy", "main", Some(500))
        .await
        .unwrap();
    let revision = store.list().await.unwrap().revision;
    planes[0].caught_up(revision).await.unwrap();
    assert_eq!(
        scaler.targets(&planes[0].view.lock(), 5, start + minute)[&key],
        5
    );
}

/// The hosts of an [`IngressUpdate::Routes`], with whether each has a route now; `None` for
/// a full update.
fn changed_hosts(update: &IngressUpdate) -> Option<Vec<(String, bool)>> {
    match update {
        IngressUpdate::Routes(changes) => Some(
            changes
                .iter()
                .map(|(host, route)| (host.clone(), route.is_some()))
                .collect(),
        ),
        IngressUpdate::Full(_) => None,
    }
}

#[tokio::test]
async fn the_ingress_gets_only_the_changed_routes_after_route_changes() {
    let dir = TempDir::new("ingresschanges");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let plane = plane(&store, "n1").await;
    deploy(&plane, &game("a", 7000)).await.unwrap();
    plane
        .set_route("a.example.com", "a", None, None)
        .await
        .unwrap();
    let at = *plane.subscribe().borrow();
    // Behind an app change: everything.
    assert!(changed_hosts(&plane.ingress_changes(0).1).is_none());
    assert_eq!(changed_hosts(&plane.ingress_changes(at).1), Some(vec![]));

    plane
        .set_route("b.example.com", "a", None, Some(5000))
        .await
        .unwrap();
    plane.remove_route("a.example.com").await.unwrap();
    let imported = plane
        .import_routes("r.txt", "c.example.com a\nb.example.com a\n")
        .await
        .unwrap();
    assert_eq!((imported.routes, imported.replaced), (2, 1));
    let (revision, update) = plane.ingress_changes(at);
    assert_eq!(revision, *plane.subscribe().borrow());
    assert_eq!(
        changed_hosts(&update),
        Some(vec![
            ("a.example.com".into(), false),
            ("b.example.com".into(), true),
            ("c.example.com".into(), true),
        ])
    );
    // A bad file changes nothing and names every bad line.
    let err = plane
        .import_routes("r.txt", "d.example.com a\nx.example.com nope\n*.com a\n")
        .await
        .unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("r.txt:3: invalid host \"*.com\""), "{shown}");
    let err = plane
        .import_routes("r.txt", "d.example.com a\nx.example.com nope\n")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("r.txt:2: no app named \"nope\""),
        "{err}"
    );
    assert_eq!(
        plane.ingress_changes(revision).1,
        IngressUpdate::Routes(vec![])
    );

    // Endpoints change what every route of the service reaches: everything again.
    plane
        .set_endpoints(
            "a",
            "main",
            BTreeMap::from([("web".into(), vec!["10.88.0.2:8080".parse().unwrap()])]),
        )
        .await
        .unwrap();
    assert!(changed_hosts(&plane.ingress_changes(revision).1).is_none());
}

/// A command returns only once its change is announced to the view's subscribers (the API
/// then waits for the ingress to reach the announced revision; announcing after returning
/// let a client's next request miss its own route). Many commits on a multi-threaded runtime,
/// where the view's follower and the caller run on different threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_announced_before_its_command_returns() {
    let dir = TempDir::new("announce");
    let store = SqliteStore::open(&dir.0, "n1").unwrap();
    let plane = plane(&store, "n1").await;
    deploy(&plane, &game("a", 7000)).await.unwrap();
    for i in 0..300 {
        let host = format!("h{i}.example.com");
        plane.set_route(&host, "a", None, None).await.unwrap();
        let announced = *plane.subscribe().borrow();
        let (routed, _) = plane.ingress_routes();
        assert!(
            announced >= routed,
            "{host}: announced revision {announced}, the view is at {routed}"
        );
    }
}
