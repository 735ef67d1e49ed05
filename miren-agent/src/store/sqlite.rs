//! [`Store`] on an embedded SQLite database (`STATE_DIR/store.db`, WAL, synchronous=FULL), so
//! state survives restarts and `kill -9`. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};

use super::{AppRecord, NodePortRecord, RouteRecord, Store, StoreError, StoreState, Write};
use crate::config::Protocol;

/// Schema migrations; entry N brings the schema from version N to N+1.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);
    CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        source_name TEXT NOT NULL,
        toml TEXT NOT NULL,
        version INTEGER NOT NULL,
        deployed_at INTEGER NOT NULL
    );
    CREATE TABLE assigned_ports (
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        service TEXT NOT NULL,
        port_name TEXT NOT NULL,
        port INTEGER NOT NULL,
        PRIMARY KEY (app, service, port_name)
    );
    CREATE TABLE node_ports (
        node_port INTEGER NOT NULL CHECK (node_port BETWEEN 1 AND 65535),
        protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        service TEXT NOT NULL,
        port_name TEXT NOT NULL,
        PRIMARY KEY (node_port, protocol)
    );
    CREATE TABLE routes (
        host TEXT PRIMARY KEY,
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        service TEXT NOT NULL
    );
    CREATE TABLE endpoints (
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        service TEXT NOT NULL,
        port_name TEXT NOT NULL,
        address TEXT NOT NULL,
        PRIMARY KEY (app, service, port_name, address)
    );
",
    r"
    ALTER TABLE routes ADD COLUMN timeout_ms INTEGER;
",
    r"
    ALTER TABLE apps ADD COLUMN directory TEXT;
",
];

/// The SQLite store. One connection, serialized by a mutex: the agent is the only writer.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) `state_dir/store.db` and migrates it to the current schema.
    ///
    /// The store holds the apps' environment (secrets among it), so the state directory is
    /// made 0700 and the database with its `-wal` and `-shm` files 0600, also when an older
    /// agent created them with wider modes (SQLite gives new `-wal`/`-shm` files the mode of
    /// the database).
    ///
    /// # Errors
    /// [`StoreError::StateDir`], [`StoreError::Permissions`], [`StoreError::Open`], or
    /// [`StoreError::TooNew`].
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        make_private(state_dir, 0o700)?;
        let path = state_dir.join("store.db");
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        for file in ["store.db", "store.db-wal", "store.db-shm"] {
            let file = state_dir.join(file);
            if file.exists() {
                make_private(&file, 0o600)?;
            }
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(open_err)?;
        migrate(&mut conn, &path)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied transaction (it rolls
        // back on drop), so the connection is still usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sets the permission bits of `path` to `mode`.
fn make_private(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        StoreError::Permissions {
            path: path.to_owned(),
            mode,
            source,
        }
    })
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open {
        path: PathBuf::from(path),
        source,
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(open_err)?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            supported,
        });
    }
    let tx = conn.transaction().map_err(open_err)?;
    for migration in &MIGRATIONS[version as usize..] {
        tx.execute_batch(migration).map_err(open_err)?;
    }
    tx.pragma_update(None, "user_version", supported)
        .map_err(open_err)?;
    tx.commit().map_err(open_err)
}

impl Store for SqliteStore {
    fn load(&self) -> Result<StoreState, StoreError> {
        let mut conn = self.conn();
        let q = |op| move |source| StoreError::Query { op, source };
        // One read transaction: a consistent snapshot.
        let tx = conn.transaction().map_err(q("begin read"))?;
        let mut state = StoreState {
            revision: revision(&tx)?,
            ..StoreState::default()
        };

        let mut stmt = tx
            .prepare("SELECT name, source_name, toml, version, deployed_at, directory FROM apps")
            .map_err(q("read apps"))?;
        let apps = stmt
            .query_map([], |row| {
                Ok(AppRecord {
                    name: row.get(0)?,
                    source_name: row.get(1)?,
                    directory: row.get(5)?,
                    toml: row.get(2)?,
                    version: row.get(3)?,
                    deployed_at: row.get(4)?,
                    assigned_ports: Default::default(),
                })
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(q("read apps"))?;
        state.apps = apps
            .into_iter()
            .map(|app| (app.name.clone(), app))
            .collect();
        drop(stmt);

        let mut stmt = tx
            .prepare("SELECT app, service, port_name, port FROM assigned_ports")
            .map_err(q("read assigned ports"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get::<_, u16>(3)?,
                ))
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(q("read assigned ports"))?;
        for (app, service, port_name, port) in rows {
            if let Some(app) = state.apps.get_mut(&app) {
                app.assigned_ports.insert((service, port_name), port);
            }
        }
        drop(stmt);

        let mut stmt = tx
            .prepare(
                "SELECT node_port, protocol, app, service, port_name FROM node_ports
                 ORDER BY node_port, protocol",
            )
            .map_err(q("read node ports"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, u16>(0)?,
                    row.get::<_, String>(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(q("read node ports"))?;
        for (node_port, protocol, app, service, port_name) in rows {
            let protocol = parse_protocol(&protocol)?;
            state.node_ports.push(NodePortRecord {
                node_port,
                protocol,
                app,
                service,
                port_name,
            });
        }
        drop(stmt);

        let mut stmt = tx
            .prepare("SELECT host, app, service, timeout_ms FROM routes ORDER BY host")
            .map_err(q("read routes"))?;
        state.routes = stmt
            .query_map([], |row| {
                Ok(RouteRecord {
                    host: row.get(0)?,
                    app: row.get(1)?,
                    service: row.get(2)?,
                    timeout_ms: row.get(3)?,
                })
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(q("read routes"))?;
        drop(stmt);

        let mut stmt = tx
            .prepare("SELECT app, service, port_name, address FROM endpoints ORDER BY 1, 2, 3, 4")
            .map_err(q("read endpoints"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(q("read endpoints"))?;
        for (app, service, port_name, address) in rows {
            let address = address.parse().map_err(|_| StoreError::Corrupt {
                what: "endpoint address",
                value: address.clone(),
            })?;
            state
                .endpoints
                .entry((app, service))
                .or_default()
                .entry(port_name)
                .or_default()
                .push(address);
        }
        Ok(state)
    }

    fn commit(&self, expected_revision: u64, writes: &[Write]) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let q = |op| move |source| StoreError::Query { op, source };
        let tx = conn.transaction().map_err(q("begin"))?;
        let found = revision(&tx)?;
        if found != expected_revision {
            return Err(StoreError::Conflict {
                expected: expected_revision,
                found,
            });
        }
        for write in writes {
            apply(&tx, write)?;
        }
        let next = found + 1;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", [next])
            .map_err(q("bump revision"))?;
        tx.commit().map_err(q("commit"))?;
        Ok(next)
    }
}

fn revision(tx: &Transaction<'_>) -> Result<u64, StoreError> {
    tx.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |row| {
        row.get(0)
    })
    .optional()
    .map_err(|source| StoreError::Query {
        op: "read revision",
        source,
    })
    .map(Option::unwrap_or_default)
}

fn apply(tx: &Transaction<'_>, write: &Write) -> Result<(), StoreError> {
    let q = |op| move |source| StoreError::Query { op, source };
    match write {
        Write::PutApp { app, node_ports } => {
            tx.execute(
                "INSERT INTO apps (name, source_name, toml, version, deployed_at, directory)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET source_name = ?2, toml = ?3, version = ?4,
                    deployed_at = ?5, directory = ?6",
                params![
                    app.name,
                    app.source_name,
                    app.toml,
                    app.version,
                    app.deployed_at,
                    app.directory
                ],
            )
            .map_err(q("write app"))?;
            tx.execute("DELETE FROM assigned_ports WHERE app = ?1", [&app.name])
                .map_err(q("clear assigned ports"))?;
            for ((service, port_name), port) in &app.assigned_ports {
                tx.execute(
                    "INSERT INTO assigned_ports (app, service, port_name, port) VALUES (?1, ?2, ?3, ?4)",
                    params![app.name, service, port_name, port],
                )
                .map_err(q("write assigned port"))?;
            }
            set_node_ports(tx, &app.name, node_ports)
        }
        Write::RemoveApp(name) => tx
            .execute("DELETE FROM apps WHERE name = ?1", [name])
            .map(drop)
            .map_err(q("remove app")),
        Write::SetNodePorts { app, node_ports } => set_node_ports(tx, app, node_ports),
        Write::PutRoute(route) => tx
            .execute(
                "INSERT INTO routes (host, app, service, timeout_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (host) DO UPDATE SET app = ?2, service = ?3, timeout_ms = ?4",
                params![route.host, route.app, route.service, route.timeout_ms],
            )
            .map(drop)
            .map_err(q("write route")),
        Write::RemoveRoute(host) => tx
            .execute("DELETE FROM routes WHERE host = ?1", [host])
            .map(drop)
            .map_err(q("remove route")),
        Write::SetEndpoints {
            app,
            service,
            endpoints,
        } => {
            tx.execute(
                "DELETE FROM endpoints WHERE app = ?1 AND service = ?2",
                [app, service],
            )
            .map_err(q("clear endpoints"))?;
            for (port_name, addresses) in endpoints {
                for address in addresses {
                    tx.execute(
                        "INSERT OR IGNORE INTO endpoints (app, service, port_name, address)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![app, service, port_name, address.to_string()],
                    )
                    .map_err(q("write endpoint"))?;
                }
            }
            Ok(())
        }
    }
}

fn set_node_ports(
    tx: &Transaction<'_>,
    app: &str,
    node_ports: &[NodePortRecord],
) -> Result<(), StoreError> {
    let q = |op| move |source| StoreError::Query { op, source };
    tx.execute("DELETE FROM node_ports WHERE app = ?1", [app])
        .map_err(q("clear node ports"))?;
    for np in node_ports {
        tx.execute(
            "INSERT INTO node_ports (node_port, protocol, app, service, port_name)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                np.node_port,
                np.protocol.as_str(),
                np.app,
                np.service,
                np.port_name
            ],
        )
        .map_err(q("write node port"))?;
    }
    Ok(())
}

fn parse_protocol(value: &str) -> Result<Protocol, StoreError> {
    Protocol::from_name(value).ok_or_else(|| StoreError::Corrupt {
        what: "protocol",
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("miren-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn app(name: &str, version: u64) -> AppRecord {
        AppRecord {
            name: name.into(),
            source_name: format!("{name}/.miren/app.toml"),
            directory: None,
            toml: format!("name = \"{name}\"\n"),
            version,
            deployed_at: 1_700_000_000 + version,
            assigned_ports: BTreeMap::from([(("main".into(), "admin".into()), 20001)]),
        }
    }

    fn node_port(app: &str, node_port: u16, protocol: Protocol) -> NodePortRecord {
        NodePortRecord {
            node_port,
            protocol,
            app: app.into(),
            service: "main".into(),
            port_name: "game".into(),
        }
    }

    #[test]
    fn state_round_trips_and_survives_reopen() {
        let dir = temp_dir("roundtrip");
        let store = SqliteStore::open(&dir).unwrap();
        let writes = [
            Write::PutApp {
                app: app("game", 1),
                node_ports: vec![node_port("game", 27015, Protocol::Udp)],
            },
            Write::PutRoute(RouteRecord {
                host: "game.example.com".into(),
                app: "game".into(),
                service: "main".into(),
                timeout_ms: Some(1500),
            }),
            Write::SetEndpoints {
                app: "game".into(),
                service: "main".into(),
                endpoints: BTreeMap::from([(
                    "game".into(),
                    vec!["10.88.0.2:27015".parse().unwrap()],
                )]),
            },
        ];
        assert_eq!(store.commit(0, &writes).unwrap(), 1);
        let before = store.load().unwrap();
        drop(store);
        let after = SqliteStore::open(&dir).unwrap().load().unwrap();
        assert_eq!(before, after);
        assert_eq!(after.revision, 1);
        assert_eq!(after.apps["game"], app("game", 1));
        assert_eq!(
            after.node_ports,
            vec![node_port("game", 27015, Protocol::Udp)]
        );
        assert_eq!(after.routes.len(), 1);
        assert_eq!(
            after.endpoints[&("game".into(), "main".into())]["game"].len(),
            1
        );
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
        let store = SqliteStore::open(&dir).unwrap();
        store
            .commit(
                0,
                &[Write::PutApp {
                    app: app("game", 1),
                    node_ports: vec![],
                }],
            )
            .unwrap();
        let files = ["store.db", "store.db-wal", "store.db-shm"].map(|f| dir.join(f));
        assert_eq!(mode(&dir), 0o700);
        for file in &files {
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
        // An older agent left everything world-readable (the store still open, so the WAL
        // and shared-memory files exist when the next agent opens it).
        chmod(&dir, 0o755);
        for file in &files {
            chmod(file, 0o644);
        }
        let reopened = SqliteStore::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for file in &files {
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
        drop((store, reopened));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_batch_writes_nothing() {
        let dir = temp_dir("atomic");
        let store = SqliteStore::open(&dir).unwrap();
        store
            .commit(
                0,
                &[Write::PutApp {
                    app: app("a", 1),
                    node_ports: vec![node_port("a", 7000, Protocol::Tcp)],
                }],
            )
            .unwrap();
        // b's first write is fine, its node port collides with a's: the whole batch fails.
        let err = store
            .commit(
                1,
                &[Write::PutApp {
                    app: app("b", 1),
                    node_ports: vec![node_port("b", 7000, Protocol::Tcp)],
                }],
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Query {
                    op: "write node port",
                    ..
                }
            ),
            "{err}"
        );
        let state = store.load().unwrap();
        assert_eq!(state.revision, 1);
        assert!(!state.apps.contains_key("b"));
        // Same number, other protocol: fine.
        store
            .commit(
                1,
                &[Write::PutApp {
                    app: app("b", 1),
                    node_ports: vec![node_port("b", 7000, Protocol::Udp)],
                }],
            )
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_revision_is_a_conflict_and_removing_an_app_cascades() {
        let dir = temp_dir("cascade");
        let store = SqliteStore::open(&dir).unwrap();
        store
            .commit(
                0,
                &[
                    Write::PutApp {
                        app: app("a", 1),
                        node_ports: vec![node_port("a", 7000, Protocol::Tcp)],
                    },
                    Write::PutRoute(RouteRecord {
                        host: "a.example.com".into(),
                        app: "a".into(),
                        service: "main".into(),
                        timeout_ms: None,
                    }),
                ],
            )
            .unwrap();
        assert!(matches!(
            store.commit(0, &[]),
            Err(StoreError::Conflict {
                expected: 0,
                found: 1
            })
        ));
        store.commit(1, &[Write::RemoveApp("a".into())]).unwrap();
        let state = store.load().unwrap();
        assert!(state.apps.is_empty() && state.node_ports.is_empty() && state.routes.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
