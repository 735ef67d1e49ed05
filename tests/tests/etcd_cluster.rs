//! The ground cluster mode stands on: a real 3-member etcd cluster (Debian's `etcd-server`),
//! one member in each node namespace of a fabric, started by the test. A key written through
//! one member is read through the others; a create-if-absent transaction (the node-port claim)
//! succeeds once; with the leader killed the other two serve writes and the restarted member
//! catches up from its own data; without quorum writes fail and resume when members return;
//! a panicking test leaves no member and no namespace behind. Also the fabric's link fault.
//! Talks to etcd through its v3 HTTP/JSON gateway (`miren_tests::cluster`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::ExitStatusExt as _,
    time::{Duration, Instant},
};

use miren_tests::cluster::{Claim, EtcdCluster, Fabric, node_ip};

/// Calls `f` until it answers `Ok` (e.g. while a new leader is elected), for at most
/// `timeout`; panics with the last error after that.
fn retry<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still failing: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A 3-node fabric and a 3-member cluster on it.
fn three_members(tag: &str) -> (Fabric, EtcdCluster) {
    let fabric = Fabric::new(tag, 3, false).unwrap();
    let etcd = EtcdCluster::start(&fabric, 3);
    (fabric, etcd)
}

#[test]
fn three_members_form_one_healthy_cluster() {
    let (_fabric, etcd) = three_members("etcd-form");
    assert_eq!(
        etcd.endpoints(),
        [
            "http://10.95.0.1:2379",
            "http://10.95.0.2:2379",
            "http://10.95.0.3:2379"
        ]
    );
    for i in 0..3 {
        assert!(etcd.member_healthy(i), "member {i}:\n{}", etcd.logs());
        // The PID the cluster signals is etcd's own (nsenter execs it without forking).
        let pid = etcd.member_pid(i).unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "etcd");
    }
    // Every member knows all three, with the peer and client URLs on the node addresses.
    let list = etcd
        .v3(1, "/v3/cluster/member/list", &serde_json::json!({}))
        .unwrap();
    let mut members: Vec<(String, String, String)> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["peerURLs"][0].as_str().unwrap().to_owned(),
                m["clientURLs"][0].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    members.sort();
    let expected: Vec<(String, String, String)> = (0..3)
        .map(|i| {
            let ip = node_ip(i);
            (
                format!("m{i}"),
                format!("http://{ip}:2380"),
                format!("http://{ip}:2379"),
            )
        })
        .collect();
    assert_eq!(members, expected);
    // All three agree on one leader, which is one of them.
    let leaders: Vec<usize> = (0..3).map(|i| etcd.leader(i).unwrap()).collect();
    assert_eq!(leaders, [leaders[0]; 3]);
}

#[test]
fn a_key_written_through_one_member_is_read_through_the_others() {
    let (_fabric, etcd) = three_members("etcd-kv");
    let first = etcd.put(0, "apps/web", "v1").unwrap();
    assert_eq!(etcd.get(1, "apps/web").unwrap().as_deref(), Some("v1"));
    assert_eq!(etcd.get(2, "apps/web").unwrap().as_deref(), Some("v1"));
    let second = etcd.put(2, "apps/web", "v2").unwrap();
    assert_eq!(second, first + 1);
    assert_eq!(etcd.get(0, "apps/web").unwrap().as_deref(), Some("v2"));
    assert_eq!(etcd.get(1, "apps/web").unwrap().as_deref(), Some("v2"));
    assert_eq!(etcd.get(1, "apps/absent").unwrap(), None);
}

#[test]
fn create_if_absent_claims_a_node_port_once() {
    let (_fabric, etcd) = three_members("etcd-claim");
    let key = "nodeports/udp/7000";
    assert_eq!(
        etcd.create_if_absent(0, key, "app-a").unwrap(),
        Claim::Created
    );
    // A second claim of the same port, through another member, fails and names the holder.
    assert_eq!(
        etcd.create_if_absent(1, key, "app-b").unwrap(),
        Claim::Taken {
            holder: "app-a".to_owned()
        }
    );
    assert_eq!(
        etcd.create_if_absent(2, key, "app-a").unwrap(),
        Claim::Taken {
            holder: "app-a".to_owned()
        }
    );
    assert_eq!(etcd.get(2, key).unwrap().as_deref(), Some("app-a"));
    // Another protocol on the same port is another key.
    assert_eq!(
        etcd.create_if_absent(1, "nodeports/tcp/7000", "app-b")
            .unwrap(),
        Claim::Created
    );
    assert_eq!(
        etcd.get(0, "nodeports/tcp/7000").unwrap().as_deref(),
        Some("app-b")
    );
}

#[test]
fn with_the_leader_killed_the_others_serve_writes_and_it_catches_up_on_restart() {
    let (_fabric, mut etcd) = three_members("etcd-kill");
    etcd.put(0, "before", "written with all three").unwrap();
    let leader = etcd.leader(0).unwrap();
    let id = etcd.member_id(leader).unwrap();
    let (a, b) = match leader {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };

    let status = etcd.kill_member(leader);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!etcd.is_running(leader));
    // The survivors elect a new leader among themselves and take writes and claims.
    retry(
        "write without the old leader",
        Duration::from_secs(60),
        || etcd.put(a, "during", "written with two"),
    );
    assert_eq!(
        etcd.get(b, "during").unwrap().as_deref(),
        Some("written with two")
    );
    assert_eq!(
        etcd.create_if_absent(b, "nodeports/tcp/8080", "app-c")
            .unwrap(),
        Claim::Created
    );
    let new_leader = etcd.leader(a).unwrap();
    assert!(new_leader == a || new_leader == b, "leader {new_leader}");

    // Restarted on its data directory, it is the same member and catches up on its own copy.
    etcd.start_member(leader);
    assert_eq!(etcd.member_id(leader).unwrap(), id);
    retry(
        "the restarted member applies what it missed",
        Duration::from_secs(60),
        || match etcd.get_local(leader, "during")? {
            Some(value) => Ok(value),
            None => Err("not yet".to_owned()),
        },
    );
    assert_eq!(
        etcd.get_local(leader, "during").unwrap().as_deref(),
        Some("written with two")
    );
    assert_eq!(
        etcd.get_local(leader, "before").unwrap().as_deref(),
        Some("written with all three")
    );
    assert_eq!(
        etcd.get(leader, "nodeports/tcp/8080").unwrap().as_deref(),
        Some("app-c")
    );
    // And it takes writes again.
    etcd.put(leader, "after", "written with three again")
        .unwrap();
    assert_eq!(
        etcd.get(a, "after").unwrap().as_deref(),
        Some("written with three again")
    );
}

#[test]
fn without_quorum_writes_fail_and_resume_when_members_return() {
    let (_fabric, mut etcd) = three_members("etcd-quorum");
    etcd.put(0, "before", "one").unwrap();
    let stopped = etcd.stop_member(1);
    // etcd re-raises SIGTERM after its own cleanup, so it ends by that signal.
    assert!(
        stopped.signal() == Some(libc::SIGTERM) || stopped.success(),
        "{stopped}"
    );
    etcd.kill_member(2);
    // One of three is no quorum: the write is refused (it may still commit later, once a
    // quorum is back, as etcd does not promise it did not).
    // etcd answers with gRPC code 14 (unavailable), which the gateway maps to HTTP 503.
    let refused = etcd.put(0, "no-quorum", "x").unwrap_err();
    assert!(
        refused.contains("HTTP 503") && refused.contains("etcdserver: "),
        "{refused}"
    );
    assert!(!etcd.member_healthy(0));

    etcd.start_member(1);
    etcd.start_member(2);
    retry("write with quorum back", Duration::from_secs(60), || {
        etcd.put(0, "after", "two")
    });
    for i in 0..3 {
        assert_eq!(etcd.get(i, "before").unwrap().as_deref(), Some("one"));
        assert_eq!(etcd.get(i, "after").unwrap().as_deref(), Some("two"));
    }
}

#[test]
fn a_node_with_its_link_down_is_cut_off_from_the_fabric() {
    let fabric = Fabric::new("fabric-link", 2, true).unwrap();
    let listener = fabric
        .node(1)
        .run(|| TcpListener::bind((node_ip(1), 9000)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"node1");
        }
    });
    let reach = |ns: &miren_tests::topology::Netns| {
        ns.run(|| {
            let addr = SocketAddr::from((node_ip(1), 9000));
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| e.to_string())?;
            let mut answer = String::new();
            stream
                .read_to_string(&mut answer)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(answer)
        })
        .unwrap()
    };
    let client = fabric.client().unwrap();
    assert_eq!(reach(fabric.node(0)).unwrap(), "node1");
    assert_eq!(reach(client).unwrap(), "node1");

    fabric.link_down(1).unwrap();
    assert!(reach(fabric.node(0)).is_err());
    assert!(reach(client).is_err());

    fabric.link_up(1).unwrap();
    let answer = retry("reach node 1 again", Duration::from_secs(30), || {
        reach(fabric.node(0))
    });
    assert_eq!(answer, "node1");
}

#[test]
fn members_are_killed_and_namespaces_removed_when_a_test_panics() {
    let mut pids = Vec::new();
    let mut namespaces = Vec::new();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (fabric, etcd) = three_members("etcd-panic");
        pids.extend((0..3).map(|i| etcd.member_pid(i).unwrap()));
        namespaces.push(fabric.fabric().path());
        namespaces.extend((0..3).map(|i| fabric.node(i).path()));
        panic!("the test fails with the cluster running");
    }));
    assert!(panicked.is_err());
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "etcd", "member {pid} survived the panic");
    }
    for path in namespaces {
        assert!(!path.exists(), "{} survived the panic", path.display());
    }
}
