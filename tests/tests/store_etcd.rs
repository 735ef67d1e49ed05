//! The agent's etcd store (`miren_agent::store::EtcdStore`) against a real etcd (Debian's
//! `etcd-server` 3.4): the same contract as the SQLite store's tests — commits and listings
//! with revisions, compares that write nothing when they fail and name the key, watches that
//! replay history in order and say when it is compacted, leases that take their keys along —
//! plus what only a server has: keys outside the prefix, a 3-member cluster losing one member
//! and then its quorum, TLS with client certificates.
//!
//! Single-member tests run etcd on the host's loopback ([`LocalEtcd`]); the cluster test runs
//! one member per node namespace of a fabric and the client inside node 0's namespace.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use miren_agent::store::{
    EtcdOptions, EtcdStore, Event, KeyValue, Listing, Revision, Store, StoreError, Txn,
    WatchMessage,
};
use miren_tests::{
    cluster::{EtcdCluster, Fabric},
    etcd_local::{EtcdTls, LocalEtcd},
};

/// A store on `endpoint` with the default prefix.
async fn store(endpoint: &str) -> EtcdStore {
    EtcdStore::connect(EtcdOptions::new(vec![endpoint.to_owned()]))
        .await
        .expect("connect to etcd")
}

/// A store on `endpoint` under `prefix`.
async fn store_under(endpoint: &str, prefix: &str) -> EtcdStore {
    let mut options = EtcdOptions::new(vec![endpoint.to_owned()]);
    options.prefix = prefix.to_owned();
    EtcdStore::connect(options).await.expect("connect to etcd")
}

/// A raw etcd client, for what the store does not do (compaction, keys outside the prefix).
async fn raw(endpoint: &str) -> etcd_client::Client {
    etcd_client::Client::connect([endpoint], None)
        .await
        .expect("connect a raw etcd client")
}

fn put(key: &str, value: &str) -> Txn {
    let mut txn = Txn::default();
    txn.put(key, value.as_bytes().to_vec());
    txn
}

fn keys(listing: &Listing) -> Vec<(&str, &[u8], Revision)> {
    listing
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision))
        .collect()
}

/// The next message of `watch`, failing the test after 10 s.
async fn next(watch: &mut miren_agent::store::Watch) -> Option<WatchMessage> {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a watch message within 10 s")
}

/// The next `Changes` of `watch` as (revision, events).
async fn changes(watch: &mut miren_agent::store::Watch) -> (Revision, Vec<Event>) {
    match next(watch).await {
        Some(WatchMessage::Changes { revision, events }) => (revision, events),
        other => panic!("expected changes, got {other:?}"),
    }
}

#[tokio::test]
async fn commits_are_listed_with_their_revisions() {
    let etcd = LocalEtcd::start();
    let store = store(&etcd.endpoint()).await;
    assert_eq!(
        store.describe(),
        format!("etcd at {}", etcd.endpoint()),
        "describe"
    );
    // etcd starts at revision 1; the store's revisions are etcd's.
    let base = store.list().await.unwrap();
    assert!(base.kvs.is_empty());
    let r0 = base.revision;
    assert_eq!(store.commit(put("apps/a", "1")).await.unwrap(), r0 + 1);
    let mut txn = put("apps/b", "2");
    txn.put("routes/x", b"3".to_vec());
    assert_eq!(store.commit(txn).await.unwrap(), r0 + 2);
    // A transaction that changes nothing does not move the revision.
    let mut noop = Txn::default();
    noop.delete("apps/none").delete_prefix("nothing/");
    assert_eq!(store.commit(noop).await.unwrap(), r0 + 2);
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r0 + 2);
    assert_eq!(
        keys(&listing),
        [
            ("apps/a", &b"1"[..], r0 + 1),
            ("apps/b", b"2", r0 + 2),
            ("routes/x", b"3", r0 + 2)
        ]
    );
    // Ops that overlap (etcd refuses those in one transaction) have the effect of applying
    // them in order, as in SQLite: replace a node's endpoints under a prefix, write a key twice,
    // put and then delete a key.
    let mut seed = Txn::default();
    seed.put("endpoints/a/web/n1", b"old".to_vec())
        .put("endpoints/a/web/n2", b"old".to_vec());
    let r_seed = store.commit(seed).await.unwrap();
    let mut txn = Txn::default();
    txn.delete_prefix("endpoints/a/")
        .put("endpoints/a/web/n1", b"new".to_vec())
        .put("apps/a", b"x".to_vec())
        .put("apps/a", b"y".to_vec())
        .put("apps/tmp", b"t".to_vec())
        .delete("apps/tmp");
    let r_mixed = store.commit(txn).await.unwrap();
    assert_eq!(r_mixed, r_seed + 1);
    // etcd's limit on the ops of one transaction (--max-txn-ops, 128): refused, nothing written.
    let mut huge = Txn::default();
    for i in 0..129 {
        huge.put(format!("bulk/{i}"), b"x".to_vec());
    }
    let err = store.commit(huge).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Backend { .. }) && err.to_string().contains("too many"),
        "{err}"
    );
    let listing = store.list().await.unwrap();
    assert_eq!(
        keys(&listing),
        [
            ("apps/a", &b"y"[..], r_mixed),
            ("apps/b", b"2", r0 + 2),
            ("endpoints/a/web/n1", b"new", r_mixed),
            ("routes/x", b"3", r0 + 2)
        ]
    );
}

#[tokio::test]
async fn a_failed_compare_writes_nothing_and_names_the_key() {
    let etcd = LocalEtcd::start();
    let store = store(&etcd.endpoint()).await;
    // Claim a key that must be absent: the first claim wins, the second conflicts.
    let claim = |value: &str| {
        let mut txn = put("nodeports/tcp/7000", value);
        txn.compare("nodeports/tcp/7000", 0);
        txn.put(format!("apps/{value}"), b"x".to_vec());
        txn
    };
    let r1 = store.commit(claim("a")).await.unwrap();
    let err = store.commit(claim("b")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, revision } if key == "nodeports/tcp/7000" && *revision == r1),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("nodeports/tcp/7000 changed concurrently")
    );
    let listing = store.list().await.unwrap();
    assert_eq!(
        keys(&listing),
        [("apps/a", &b"x"[..], r1), ("nodeports/tcp/7000", b"a", r1)]
    );
    // A compare on the current mod revision holds.
    let mut txn = put("apps/a", "y");
    txn.compare("apps/a", r1);
    let r2 = store.commit(txn).await.unwrap();
    assert_eq!(r2, r1 + 1);
    // With several compares, the error names the first that failed (not the first compared).
    let mut txn = put("apps/c", "c");
    txn.compare("nodeports/tcp/7000", r1)
        .compare("apps/a", r1)
        .compare("apps/absent", 0);
    let err = store.commit(txn).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, revision } if key == "apps/a" && *revision == r2),
        "{err}"
    );
    assert_eq!(store.list().await.unwrap().revision, r2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_claims_of_a_key_exactly_one_wins() {
    let etcd = LocalEtcd::start();
    let store = Arc::new(store(&etcd.endpoint()).await);
    let claims: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut txn = Txn::default();
                txn.compare("nodeports/udp/27015", 0)
                    .put("nodeports/udp/27015", format!("app-{i}").into_bytes())
                    .put(format!("apps/app-{i}"), b"{}".to_vec());
                store.commit(txn).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, claim) in claims.into_iter().enumerate() {
        match claim.await.unwrap() {
            Ok(revision) => winners.push((i, revision)),
            Err(StoreError::Conflict { key, .. }) => assert_eq!(key, "nodeports/udp/27015"),
            Err(other) => panic!("claim {i}: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (winner, revision) = winners[0];
    let listing = store.list().await.unwrap();
    assert_eq!(
        keys(&listing),
        [
            (format!("apps/app-{winner}").as_str(), &b"{}"[..], revision),
            (
                "nodeports/udp/27015",
                format!("app-{winner}").as_bytes(),
                revision
            )
        ]
    );
}

#[tokio::test]
async fn watches_replay_every_change_in_order_then_follow_live() {
    let etcd = LocalEtcd::start();
    let store = store(&etcd.endpoint()).await;
    let r1 = store.commit(put("apps/a", "1")).await.unwrap();
    let r2 = store.commit(put("endpoints/a/web/n1", "{}")).await.unwrap();
    let r3 = store.commit(put("endpoints/a/web/n2", "{}")).await.unwrap();
    // From r1: the history replays r2 and r3, then live changes follow.
    let mut watch = store.watch(r1).await.unwrap();
    let mut txn = Txn::default();
    txn.delete_prefix("endpoints/a/").delete("apps/a");
    let r4 = store.commit(txn).await.unwrap();
    assert_eq!(r4, r3 + 1);
    let put_event = |key: &str, revision| {
        Event::Put(KeyValue {
            key: key.into(),
            value: b"{}".to_vec(),
            mod_revision: revision,
        })
    };
    assert_eq!(
        changes(&mut watch).await,
        (r2, vec![put_event("endpoints/a/web/n1", r2)])
    );
    assert_eq!(
        changes(&mut watch).await,
        (r3, vec![put_event("endpoints/a/web/n2", r3)])
    );
    let delete = |key: &str| Event::Delete {
        key: key.into(),
        mod_revision: r4,
    };
    assert_eq!(
        changes(&mut watch).await,
        (
            r4,
            vec![
                delete("endpoints/a/web/n1"),
                delete("endpoints/a/web/n2"),
                delete("apps/a")
            ]
        )
    );
    // A watch from the current revision sees only what comes next.
    let mut current = store.watch(r4).await.unwrap();
    let r5 = store.commit(put("apps/b", "{}")).await.unwrap();
    assert_eq!(
        changes(&mut current).await,
        (r5, vec![put_event("apps/b", r5)])
    );
    assert_eq!(
        changes(&mut watch).await,
        (r5, vec![put_event("apps/b", r5)])
    );
    // Many revisions arrive as one message each, in order.
    let mut last = r5;
    for i in 0..50 {
        last = store
            .commit(put(&format!("apps/n{i}"), "{}"))
            .await
            .unwrap();
    }
    for i in 0..50 {
        let (revision, events) = changes(&mut current).await;
        assert_eq!(revision, r5 + 1 + i);
        assert_eq!(events, [put_event(&format!("apps/n{i}"), revision)]);
    }
    assert_eq!(last, r5 + 50);
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_is_told_to_list_again() {
    let etcd = LocalEtcd::start();
    let store = store(&etcd.endpoint()).await;
    let r1 = store.commit(put("apps/a", "1")).await.unwrap();
    store.commit(put("apps/a", "2")).await.unwrap();
    let r3 = store.commit(put("apps/a", "3")).await.unwrap();
    raw(&etcd.endpoint())
        .await
        .compact(
            i64::try_from(r3).unwrap(),
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
    let mut old = store.watch(r1).await.unwrap();
    assert_eq!(next(&mut old).await, Some(WatchMessage::Compacted));
    assert_eq!(next(&mut old).await, None, "the compacted watch ends");
    // Listing again and watching from the listing works.
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r3);
    assert_eq!(keys(&listing), [("apps/a", &b"3"[..], r3)]);
    let mut fresh = store.watch(listing.revision).await.unwrap();
    let r4 = store.commit(put("apps/b", "1")).await.unwrap();
    assert_eq!(changes(&mut fresh).await.0, r4);
}

#[tokio::test]
async fn leased_keys_go_with_their_lease() {
    let etcd = LocalEtcd::start();
    let store = store(&etcd.endpoint()).await;

    // Revoked: its keys are deleted at once, and a watch sees the deletion.
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    let mut txn = Txn::default();
    txn.put_leased("endpoints/a/web/n1", b"{}".to_vec(), Some(lease))
        .put("apps/a", b"{}".to_vec());
    let r1 = store.commit(txn).await.unwrap();
    let mut watch = store.watch(r1).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
    let listing = store.list().await.unwrap();
    assert_eq!(keys(&listing), [("apps/a", &b"{}"[..], r1)]);
    assert_eq!(listing.revision, r1 + 1);
    assert_eq!(
        changes(&mut watch).await,
        (
            r1 + 1,
            vec![Event::Delete {
                key: "endpoints/a/web/n1".into(),
                mod_revision: r1 + 1
            }]
        )
    );
    // Revoking it again, or a lease that never existed, is fine.
    store.revoke_lease(lease).await.unwrap();
    store.revoke_lease(0x7eadbeef).await.unwrap();
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseExpired { lease: l }) if l == lease
    ));

    // Kept alive, a short lease outlives its TTL.
    let kept = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let mut txn = Txn::default();
    txn.put_leased("nodes/kept", b"{}".to_vec(), Some(kept));
    store.commit(txn).await.unwrap();
    // Expired: a 1 s lease (etcd raises it to its minimum TTL, ~2 s) without keep-alives.
    let expiring = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    let mut txn = Txn::default();
    txn.put_leased("nodes/gone", b"{}".to_vec(), Some(expiring));
    store.commit(txn).await.unwrap();
    let started = Instant::now();
    let present = |listing: &Listing, key: &str| listing.kvs.iter().any(|kv| kv.key == key);
    loop {
        store.keep_alive(kept).await.unwrap();
        let listing = store.list().await.unwrap();
        assert!(present(&listing, "nodes/kept"), "kept-alive key vanished");
        if !present(&listing, "nodes/gone") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the expired lease's key is still there after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(matches!(
        store.keep_alive(expiring).await,
        Err(StoreError::LeaseExpired { lease: l }) if l == expiring
    ));
    // Writing under an expired lease fails and writes nothing.
    let mut txn = Txn::default();
    txn.put_leased("nodes/late", b"{}".to_vec(), Some(expiring));
    let before = store.list().await.unwrap();
    assert!(store.commit(txn).await.is_err());
    assert_eq!(store.list().await.unwrap(), before);
}

#[tokio::test]
async fn keys_outside_the_prefix_are_invisible() {
    let etcd = LocalEtcd::start();
    let mut raw = raw(&etcd.endpoint()).await;
    let miren = store(&etcd.endpoint()).await;
    let other = store_under(&etcd.endpoint(), "/other/").await;
    let mut watch = miren.watch(0).await.unwrap();
    for key in [
        "/other/apps/x",
        "/mirenx/apps/y",
        "/miren",
        "/miren0",
        "apps/a",
    ] {
        raw.put(key, "outside", None).await.unwrap();
    }
    let r_own = miren.commit(put("apps/a", "inside")).await.unwrap();
    let r_other = other.commit(put("apps/a", "other")).await.unwrap();
    assert_eq!(r_other, r_own + 1);
    let listing = miren.list().await.unwrap();
    assert_eq!(keys(&listing), [("apps/a", &b"inside"[..], r_own)]);
    assert_eq!(listing.revision, r_other);
    assert_eq!(
        keys(&other.list().await.unwrap()),
        [
            ("apps/a", &b"other"[..], r_other),
            ("apps/x", b"outside", r_own - 5)
        ]
    );
    // The watch from the beginning saw only its own key.
    assert_eq!(
        changes(&mut watch).await,
        (
            r_own,
            vec![Event::Put(KeyValue {
                key: "apps/a".into(),
                value: b"inside".to_vec(),
                mod_revision: r_own
            })]
        )
    );
    // Deleting everything under the store's prefix leaves the rest alone.
    let mut txn = Txn::default();
    txn.delete_prefix("");
    let r_clear = miren.commit(txn).await.unwrap();
    assert!(miren.list().await.unwrap().kvs.is_empty());
    assert_eq!(other.list().await.unwrap().kvs.len(), 2);
    assert_eq!(
        changes(&mut watch).await,
        (
            r_clear,
            vec![Event::Delete {
                key: "apps/a".into(),
                mod_revision: r_clear
            }]
        )
    );
    let all = raw
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let raw_keys: BTreeSet<&str> = all.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(
        raw_keys,
        BTreeSet::from([
            "/miren",
            "/miren0",
            "/mirenx/apps/y",
            "/other/apps/a",
            "/other/apps/x",
            "apps/a"
        ])
    );
}

#[tokio::test]
async fn ten_thousand_keys_are_listed_at_one_revision() {
    let etcd = LocalEtcd::start();
    let store = store(&etcd.endpoint()).await;
    let value = vec![b'v'; 512];
    let mut last = 0;
    for batch in 0..100 {
        let mut txn = Txn::default();
        for i in 0..100 {
            txn.put(format!("apps/{:05}", batch * 100 + i), value.clone());
        }
        last = store.commit(txn).await.unwrap();
    }
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, last);
    assert_eq!(listing.kvs.len(), 10_000);
    for (i, kv) in listing.kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("apps/{i:05}"));
        assert_eq!(kv.value, value);
    }
    assert_eq!(listing.kvs.last().unwrap().mod_revision, last);
}

#[tokio::test]
async fn an_unreachable_etcd_fails_fast_with_unavailable() {
    let mut etcd = LocalEtcd::start();
    let mut options = EtcdOptions::new(vec![etcd.endpoint()]);
    options.request_timeout = Duration::from_secs(2);
    let store = EtcdStore::connect(options.clone()).await.unwrap();
    store.commit(put("apps/a", "1")).await.unwrap();
    etcd.stop();
    let started = Instant::now();
    let err = store.commit(put("apps/b", "1")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { backend, .. } if *backend == store.describe()),
        "{err}"
    );
    assert!(err.to_string().starts_with("store unavailable"), "{err}");
    assert!(matches!(
        store.list().await,
        Err(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        store.watch(0).await,
        Err(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        EtcdStore::connect(options).await,
        Err(StoreError::Unavailable { .. })
    ));
    eprintln!("unreachable etcd: {err} (after {:?})", started.elapsed());
}

#[tokio::test]
async fn a_member_that_never_answers_fails_with_unavailable_after_the_timeout() {
    // A black hole on loopback: it accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut options = EtcdOptions::new(vec![endpoint]);
    options.request_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = EtcdStore::connect(options).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("no answer within 1.0s"), "{err}");
    eprintln!("black hole: {err} (after {:?})", started.elapsed());
    hole.abort();
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let tls = EtcdTls::new();
    let etcd = LocalEtcd::start_tls(&tls);
    let options = |ca: bool, identity: bool| {
        let mut options = EtcdOptions::new(vec![etcd.endpoint()]);
        if ca {
            options.ca = Some(tls.ca());
        }
        if identity {
            options.cert = Some(tls.client_cert());
            options.key = Some(tls.client_key());
        }
        options
    };
    let store = EtcdStore::connect(options(true, true)).await.unwrap();
    assert!(store.describe().starts_with("etcd at https://127.0.0.1:"));
    let revision = store.commit(put("apps/a", "1")).await.unwrap();
    assert_eq!(
        keys(&store.list().await.unwrap()),
        [("apps/a", &b"1"[..], revision)]
    );

    // Without a client certificate etcd refuses the handshake.
    let err = EtcdStore::connect(options(true, false)).await.unwrap_err();
    eprintln!(
        "without a client certificate: {err}: {:?}",
        std::error::Error::source(&err).map(ToString::to_string)
    );
    assert!(matches!(err, StoreError::Setup { .. }), "{err:?}");
    assert!(err.to_string().contains("--etcd-cert"), "{err}");

    // A CA that did not sign the server's certificate.
    let mut wrong = options(true, true);
    let other = EtcdTls::new();
    wrong.ca = Some(other.ca());
    let err = EtcdStore::connect(wrong).await.unwrap_err();
    eprintln!(
        "with the wrong CA: {err}: {:?}",
        std::error::Error::source(&err).map(ToString::to_string)
    );
    assert!(matches!(err, StoreError::Setup { .. }), "{err:?}");
    assert!(err.to_string().contains("--etcd-ca"), "{err}");

    // https:// without a CA, a certificate without its key, files that cannot be read.
    let err = EtcdStore::connect(options(false, false)).await.unwrap_err();
    assert!(matches!(err, StoreError::Setup { .. }), "{err:?}");
    assert!(err.to_string().contains("give --etcd-ca"), "{err}");
    let mut half = options(true, true);
    half.key = None;
    let err = EtcdStore::connect(half).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("--etcd-cert and --etcd-key go together"),
        "{err}"
    );
    let mut missing = options(true, true);
    missing.key = Some(tls.ca().with_file_name("absent.key"));
    let err = EtcdStore::connect(missing).await.unwrap_err();
    assert!(matches!(err, StoreError::Setup { .. }), "{err:?}");
    assert!(
        err.to_string().contains("reading --etcd-key") && err.to_string().contains("absent.key"),
        "{err}"
    );
    let mut not_pem = options(true, true);
    not_pem.ca = Some(etcd.dir().to_path_buf());
    let err = EtcdStore::connect(not_pem).await.unwrap_err();
    assert!(err.to_string().contains("--etcd-ca"), "{err}");
    // Plain http:// to a TLS member with a CA configured is refused before connecting.
    let mut plain = options(true, true);
    plain.endpoints = vec![etcd.endpoint().replace("https://", "http://")];
    let err = EtcdStore::connect(plain).await.unwrap_err();
    assert!(
        err.to_string().contains("give the endpoints as https://"),
        "{err}"
    );
}

/// Calls `f` until it succeeds, for at most `timeout` (e.g. while a new leader is elected).
async fn retry<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(value) => return value,
            Err(err) if Instant::now() >= deadline => panic!("{what}: still failing: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[test]
fn a_three_member_cluster_serves_without_one_member_and_fails_fast_without_quorum() {
    let fabric = Fabric::new("store-etcd", 3, false).unwrap();
    let mut etcd = EtcdCluster::start(&fabric, 3);
    let endpoints = etcd.endpoints();
    let leader = etcd.leader(0).unwrap();
    // The client runs inside node 0's namespace (the members listen on the fabric addresses).
    fabric
        .node(0)
        .run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut options = EtcdOptions::new(endpoints.clone());
                options.request_timeout = Duration::from_secs(3);
                let store = EtcdStore::connect(options).await.unwrap();
                assert_eq!(
                    store.describe(),
                    "etcd at http://10.95.0.1:2379,http://10.95.0.2:2379,http://10.95.0.3:2379"
                );
                let r1 = store.commit(put("apps/a", "1")).await.unwrap();
                let mut watch = store.watch(r1).await.unwrap();

                // The leader killed: after the election every request works, whichever
                // member the client's balancer picks.
                etcd.kill_member(leader);
                let r2 = retry(
                    "commit without the old leader",
                    Duration::from_secs(30),
                    || store.commit(put("apps/b", "2")),
                )
                .await;
                let mut failures = Vec::new();
                let mut last = r2;
                for i in 0..30 {
                    match store.commit(put(&format!("apps/c{i}"), "3")).await {
                        Ok(revision) => last = revision,
                        Err(err) => failures.push(format!("commit {i}: {err}")),
                    }
                    if let Err(err) = store.list().await {
                        failures.push(format!("list {i}: {err}"));
                    }
                }
                assert!(
                    failures.is_empty(),
                    "with two of three members: {failures:#?}"
                );
                let listing = store.list().await.unwrap();
                assert_eq!(listing.revision, last);
                assert_eq!(listing.kvs.len(), 32);
                let mut txn = put("nodeports/tcp/7000", "a");
                txn.compare("nodeports/tcp/7000", 0);
                store.commit(txn.clone()).await.unwrap();
                assert!(matches!(
                    store.commit(txn).await,
                    Err(StoreError::Conflict { .. })
                ));
                // The watch either followed the writes or ended (it was on the killed member):
                // it never stalls silently.
                match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
                    Ok(Some(WatchMessage::Changes { revision, .. })) => assert!(revision > r1),
                    Ok(None) => eprintln!("the watch ended with the killed member"),
                    other => panic!("watch after the kill: {other:?}"),
                }

                // Two of three gone: no quorum. Requests fail with Unavailable, they return.
                let survivor = (0..3).find(|&i| i != leader).unwrap();
                let other = (0..3).find(|&i| i != leader && i != survivor).unwrap();
                etcd.stop_member(other);
                // At once (the connection to the stopped member breaks, or the survivor
                // cannot commit), and once the survivor knows it has no leader (its election
                // timeout is 1 s): every commit fails, and returns.
                for round in 0..4 {
                    if round == 1 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    let started = Instant::now();
                    let err = store.commit(put("apps/d", "4")).await.unwrap_err();
                    let took = started.elapsed();
                    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
                    assert!(err.to_string().contains("store unavailable"), "{err}");
                    if round > 0 {
                        assert!(err.to_string().contains("no leader"), "{err}");
                    }
                    eprintln!("without quorum, commit {round}: {err} (after {took:?})");
                }
                let err = store.list().await.unwrap_err();
                assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
                let err = store.grant_lease(Duration::from_secs(5)).await.unwrap_err();
                assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
                let err = store.watch(last).await.unwrap_err();
                assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
            });
        })
        .unwrap();
    // With the members back (started from the test's thread), the same endpoints serve again.
    for i in 0..3 {
        if !etcd.is_running(i) {
            etcd.start_member(i);
        }
    }
    fabric
        .node(0)
        .run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let store = EtcdStore::connect(EtcdOptions::new(endpoints.clone()))
                    .await
                    .unwrap();
                retry("commit with quorum back", Duration::from_secs(30), || {
                    store.commit(put("apps/e", "5"))
                })
                .await;
                let listing = store.list().await.unwrap();
                assert!(listing.kvs.iter().any(|kv| kv.key == "apps/e"));
                assert!(listing.kvs.iter().any(|kv| kv.key == "nodeports/tcp/7000"));
            });
        })
        .unwrap();
}
