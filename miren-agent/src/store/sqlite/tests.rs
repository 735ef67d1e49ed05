use std::collections::BTreeMap;

use super::*;
use crate::{
    config::Protocol,
    store::records::{AppRecord, NodePortRecord, Record, RecordKey, RouteRecord, encode},
};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("miren-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
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

#[tokio::test]
async fn commits_are_listed_with_their_revisions_and_survive_reopen() {
    let dir = temp_dir("roundtrip");
    let store = SqliteStore::open(&dir, "n1").unwrap();
    assert_eq!(store.commit(put("apps/a", "1")).await.unwrap(), 1);
    let mut txn = put("apps/b", "2");
    txn.put("routes/x", b"3".to_vec());
    assert_eq!(store.commit(txn).await.unwrap(), 2);
    // A transaction that changes nothing does not move the revision.
    let mut noop = Txn::default();
    noop.delete("apps/none");
    assert_eq!(store.commit(noop).await.unwrap(), 2);
    let before = store.list().await.unwrap();
    assert_eq!(before.revision, 2);
    assert_eq!(
        keys(&before),
        [
            ("apps/a", &b"1"[..], 1),
            ("apps/b", b"2", 2),
            ("routes/x", b"3", 2)
        ]
    );
    drop(store);
    let after = SqliteStore::open(&dir, "n1").unwrap().list().await.unwrap();
    assert_eq!(before, after);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failed_compare_writes_nothing_and_names_the_key() {
    let dir = temp_dir("compare");
    let store = SqliteStore::open(&dir, "n1").unwrap();
    // Claim a key that must be absent: the first claim wins, the second conflicts.
    let claim = |value: &str| {
        let mut txn = put("nodeports/tcp/7000", value);
        txn.compare("nodeports/tcp/7000", 0);
        txn.put(format!("apps/{value}"), b"x".to_vec());
        txn
    };
    assert_eq!(store.commit(claim("a")).await.unwrap(), 1);
    let err = store.commit(claim("b")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key, revision: 1 } if key == "nodeports/tcp/7000"),
        "{err}"
    );
    let listing = store.list().await.unwrap();
    assert_eq!(
        keys(&listing),
        [("apps/a", &b"x"[..], 1), ("nodeports/tcp/7000", b"a", 1)]
    );
    // A compare on the current mod revision holds.
    let mut txn = put("apps/a", "y");
    txn.compare("apps/a", 1);
    assert_eq!(store.commit(txn).await.unwrap(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn watches_see_every_change_in_order_and_old_starts_are_compacted() {
    let dir = temp_dir("watch");
    let store = SqliteStore::open(&dir, "n1").unwrap();
    store.commit(put("apps/a", "1")).await.unwrap();
    store.commit(put("endpoints/a/web/n1", "{}")).await.unwrap();
    store.commit(put("endpoints/a/web/n2", "{}")).await.unwrap();
    // From revision 1: the history replays 2 and 3, then live changes follow.
    let mut watch = store.watch(1).await.unwrap();
    let mut txn = Txn::default();
    txn.delete_prefix("endpoints/a/").delete("apps/a");
    assert_eq!(store.commit(txn).await.unwrap(), 4);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match watch.next().await.unwrap() {
            WatchMessage::Changes { revision, events } => seen.push((revision, events)),
            WatchMessage::Compacted => panic!("compacted"),
        }
    }
    let delete = |key: &str| Event::Delete {
        key: key.into(),
        mod_revision: 4,
    };
    assert_eq!(seen[0].0, 2);
    assert_eq!(seen[1].0, 3);
    assert_eq!(
        seen[2],
        (
            4,
            vec![
                delete("endpoints/a/web/n1"),
                delete("endpoints/a/web/n2"),
                delete("apps/a")
            ]
        )
    );
    // A reopened store has no history: a watch from the past must list again.
    drop((watch, store));
    let store = SqliteStore::open(&dir, "n1").unwrap();
    let mut old = store.watch(2).await.unwrap();
    assert_eq!(old.next().await, Some(WatchMessage::Compacted));
    let mut current = store.watch(4).await.unwrap();
    store.commit(put("apps/b", "1")).await.unwrap();
    assert!(matches!(
        current.next().await,
        Some(WatchMessage::Changes { revision: 5, .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn leased_keys_stay_until_the_lease_is_revoked() {
    let dir = temp_dir("lease");
    let store = SqliteStore::open(&dir, "n1").unwrap();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    let mut txn = Txn::default();
    txn.put_leased("endpoints/a/web/n1", b"{}".to_vec(), Some(lease))
        .put("apps/a", b"{}".to_vec());
    store.commit(txn).await.unwrap();
    drop(store);
    // A restart keeps them: the node is the store's only node.
    let store = SqliteStore::open(&dir, "n1").unwrap();
    assert_eq!(store.list().await.unwrap().kvs.len(), 2);
    let other = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    assert_ne!(other, lease);
    store.revoke_lease(lease).await.unwrap();
    let listing = store.list().await.unwrap();
    assert_eq!(keys(&listing), [("apps/a", &b"{}"[..], 1)]);
    assert_eq!(listing.revision, 2);
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseExpired { .. })
    ));
    store.keep_alive(other).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn state_dir_and_store_files_are_private_also_after_an_older_install() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let dir = temp_dir("modes");
    let store = SqliteStore::open(&dir, "n1").unwrap();
    {
        let mut state = store.inner.lock();
        store.inner.commit(&mut state, &put("apps/a", "1")).unwrap();
    }
    let files = ["store.db", "store.db-wal", "store.db-shm"].map(|f| dir.join(f));
    assert_eq!(mode(&dir), 0o700);
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // An older agent left everything world-readable (the store still open, so the WAL and
    // shared-memory files exist when the next agent opens it).
    chmod(&dir, 0o755);
    for file in &files {
        chmod(file, 0o644);
    }
    let reopened = SqliteStore::open(&dir, "n1").unwrap();
    assert_eq!(mode(&dir), 0o700);
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    drop((store, reopened));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_store_of_the_relational_schema_is_migrated_to_keys() {
    let dir = temp_dir("migrate");
    std::fs::create_dir_all(&dir).unwrap();
    {
        // What an agent of the first wave left behind: schema version 3 at revision 7.
        let conn = Connection::open(dir.join("store.db")).unwrap();
        for migration in &MIGRATIONS[..3] {
            conn.execute_batch(migration).unwrap();
        }
        conn.execute_batch(
            r#"
            PRAGMA user_version = 3;
            UPDATE meta SET value = 7 WHERE key = 'revision';
            INSERT INTO apps VALUES ('game', 'game/.miren/app.toml', 'name = "game"', 2, 1700000000, '/srv/game');
            INSERT INTO apps VALUES ('web', 'app.toml', 'name = "web"', 1, 1700000001, NULL);
            INSERT INTO assigned_ports VALUES ('game', 'main', 'admin', 20001);
            INSERT INTO node_ports VALUES (27015, 'udp', 'game', 'main', 'game');
            INSERT INTO routes VALUES ('game.example.com', 'game', 'main', 1500);
            INSERT INTO routes VALUES ('web.example.com', 'web', 'web', NULL);
            INSERT INTO endpoints VALUES ('game', 'main', 'game', '10.88.0.3:27015');
            INSERT INTO endpoints VALUES ('game', 'main', 'game', '10.88.0.2:27015');
            INSERT INTO endpoints VALUES ('game', 'main', 'admin', '10.88.0.2:20001');
            "#,
        )
        .unwrap();
    }
    let store = SqliteStore::open(&dir, "node-a").unwrap();
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, 7);
    let records: BTreeMap<RecordKey, Record> = listing
        .kvs
        .iter()
        .map(|kv| {
            assert_eq!(kv.mod_revision, 7, "{}", kv.key);
            Record::decode(kv).unwrap().unwrap()
        })
        .collect();
    let game = AppRecord {
        name: "game".into(),
        source_name: "game/.miren/app.toml".into(),
        toml: "name = \"game\"".into(),
        version: 2,
        deployed_at: 1_700_000_000,
        bundle: None,
        directory: Some("/srv/game".into()),
        assigned_ports: BTreeMap::from([(("main".into(), "admin".into()), 20001)]),
    };
    let web = AppRecord {
        name: "web".into(),
        source_name: "app.toml".into(),
        toml: "name = \"web\"".into(),
        version: 1,
        deployed_at: 1_700_000_001,
        bundle: None,
        directory: None,
        assigned_ports: BTreeMap::new(),
    };
    let route = |host: &str, app: &str, service: &str, timeout_ms| RouteRecord {
        host: host.into(),
        app: app.into(),
        service: service.into(),
        timeout_ms,
    };
    let endpoints = BTreeMap::from([
        ("admin".to_owned(), vec!["10.88.0.2:20001".parse().unwrap()]),
        (
            "game".to_owned(),
            vec![
                "10.88.0.2:27015".parse().unwrap(),
                "10.88.0.3:27015".parse().unwrap(),
            ],
        ),
    ]);
    let expected = BTreeMap::from([
        (RecordKey::App("game".into()), Record::App(game)),
        (RecordKey::App("web".into()), Record::App(web)),
        (
            RecordKey::NodePort(Protocol::Udp, 27015),
            Record::NodePort(NodePortRecord {
                node_port: 27015,
                protocol: Protocol::Udp,
                app: "game".into(),
                service: "main".into(),
                port_name: "game".into(),
            }),
        ),
        (
            RecordKey::Route("game.example.com".into()),
            Record::Route(route("game.example.com", "game", "main", Some(1500))),
        ),
        (
            RecordKey::Route("web.example.com".into()),
            Record::Route(route("web.example.com", "web", "web", None)),
        ),
        (
            RecordKey::Endpoints {
                app: "game".into(),
                service: "main".into(),
                node: "node-a".into(),
            },
            Record::Endpoints(endpoints),
        ),
    ]);
    assert_eq!(records, expected);
    // The next commit continues the revision.
    let mut txn = Txn::default();
    txn.put("apps/x", encode(&"x"));
    assert_eq!(store.commit(txn).await.unwrap(), 8);
    let _ = std::fs::remove_dir_all(&dir);
}
