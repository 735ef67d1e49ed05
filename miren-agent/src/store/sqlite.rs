//! [`Store`] on an embedded SQLite database (`STATE_DIR/store.db`, WAL, synchronous=FULL), so
//! state survives restarts and `kill -9`: one `kv` table of keys with their mod revisions, and
//! the store's revision in `meta`. Schema changes are numbered migrations tracked in
//! `PRAGMA user_version`.
//!
//! The watch is in-process: every commit's changes go to the open watches in commit order,
//! and the last [`HISTORY`] commits are kept so a watch can start a little in the past.
//! Single node: a lease lives until it is revoked (the only node cannot be lost while its own
//! store is open), so leased keys survive an agent restart, like every other key; each grant
//! is a new lease, so several views of one store (tests) can each have their own.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};
use tokio::sync::{broadcast, mpsc};

use super::{
    Event, KeyValue, LeaseId, Listing, Op, Revision, Store, StoreError, Txn, Watch, WatchMessage,
};

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
    // The relational tables become keys of the shared layout (`store::records`); endpoints
    // become this node's (`:node` is bound to the node name).
    r"
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        mod_revision INTEGER NOT NULL,
        lease INTEGER
    );
    INSERT INTO kv (key, value, mod_revision)
        SELECT 'apps/' || name,
            CAST(json_object(
                'name', name, 'source_name', source_name, 'toml', toml, 'version', version,
                'deployed_at', deployed_at, 'directory', directory,
                'assigned_ports', (
                    SELECT json_group_array(json_object(
                        'service', service, 'port_name', port_name, 'port', port))
                    FROM assigned_ports WHERE assigned_ports.app = apps.name)
            ) AS BLOB),
            (SELECT value FROM meta WHERE key = 'revision')
        FROM apps;
    INSERT INTO kv (key, value, mod_revision)
        SELECT 'nodeports/' || protocol || '/' || node_port,
            CAST(json_object('node_port', node_port, 'protocol', protocol, 'app', app,
                'service', service, 'port_name', port_name) AS BLOB),
            (SELECT value FROM meta WHERE key = 'revision')
        FROM node_ports;
    INSERT INTO kv (key, value, mod_revision)
        SELECT 'routes/' || host,
            CAST(json_object('host', host, 'app', app, 'service', service,
                'timeout_ms', timeout_ms) AS BLOB),
            (SELECT value FROM meta WHERE key = 'revision')
        FROM routes;
    INSERT INTO kv (key, value, mod_revision)
        SELECT 'endpoints/' || app || '/' || service || '/' || :node,
            CAST(json_group_object(port_name, json(addresses)) AS BLOB),
            (SELECT value FROM meta WHERE key = 'revision')
        FROM (
            SELECT app, service, port_name, json_group_array(address) AS addresses
            FROM (SELECT * FROM endpoints ORDER BY app, service, port_name, address)
            GROUP BY app, service, port_name
        )
        GROUP BY app, service;
    DROP TABLE endpoints;
    DROP TABLE routes;
    DROP TABLE node_ports;
    DROP TABLE assigned_ports;
    DROP TABLE apps;
",
    // Leases: one per agent start; keys of a revoked lease go with it.
    r"
    CREATE TABLE leases (id INTEGER PRIMARY KEY);
    INSERT INTO leases (id) SELECT DISTINCT lease FROM kv WHERE lease IS NOT NULL;
",
];

/// How many recent commits a new watch can start from.
const HISTORY: usize = 4096;
/// Commits buffered per watch before it is told to list again.
const WATCH_BUFFER: usize = 1024;

/// The changes of one commit.
type Batch = Arc<(Revision, Vec<Event>)>;

/// The SQLite store. One connection, serialized by a mutex.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    state: Mutex<State>,
    events: broadcast::Sender<Batch>,
}

#[derive(Debug)]
struct State {
    conn: Connection,
    /// The last [`HISTORY`] commits, oldest first.
    history: VecDeque<Batch>,
}

impl SqliteStore {
    /// Opens (creating if needed) `state_dir/store.db` and migrates it to the current schema;
    /// endpoints stored by an agent before the key layout are taken over as `node`'s.
    ///
    /// The store holds the apps' environment (secrets among it), so the state directory is
    /// made 0700 and the database with its `-wal` and `-shm` files 0600, also when an older
    /// agent created them with wider modes (SQLite gives new `-wal`/`-shm` files the mode of
    /// the database).
    ///
    /// # Errors
    /// [`StoreError::Setup`] or [`StoreError::TooNew`].
    pub fn open(state_dir: &Path, node: &str) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Setup {
            message: format!("creating the state directory {}", state_dir.display()),
            source: Some(source.into()),
        })?;
        make_private(state_dir, 0o700)?;
        let path = state_dir.join("store.db");
        let open_err = |source: rusqlite::Error| open_error(&path, source);
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
        migrate(&mut conn, &path, node)?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new(State {
                    conn,
                    history: VecDeque::new(),
                }),
                events,
            }),
        })
    }

    /// Runs `f` on the connection in the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut State) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut state = inner.lock();
            f(&inner, &mut state)
        })
        .await
        .map_err(|err| StoreError::Backend {
            op: "run a store operation",
            source: err.into(),
        })?
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied transaction (it rolls
        // back on drop), so the connection is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn open_error(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Setup {
        message: format!(
            "opening the store at {}; check the file, or move it away to start empty",
            path.display()
        ),
        source: Some(source.into()),
    }
}

fn query(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Backend {
        op,
        source: source.into(),
    }
}

/// Sets the permission bits of `path` to `mode`.
fn make_private(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        StoreError::Setup {
            message: format!("making {} private (mode {mode:o})", path.display()),
            source: Some(source.into()),
        }
    })
}

fn migrate(conn: &mut Connection, path: &Path, node: &str) -> Result<(), StoreError> {
    let open_err = |source| open_error(path, source);
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
        if migration.contains(":node") {
            // execute_batch cannot bind parameters: run the statements one by one.
            for statement in migration.split(';').filter(|s| !s.trim().is_empty()) {
                let mut stmt = tx.prepare(statement).map_err(open_err)?;
                if stmt.parameter_count() > 0 {
                    stmt.execute(rusqlite::named_params! { ":node": node })
                } else {
                    stmt.execute([])
                }
                .map_err(open_err)?;
            }
        } else {
            tx.execute_batch(migration).map_err(open_err)?;
        }
    }
    tx.pragma_update(None, "user_version", supported)
        .map_err(open_err)?;
    tx.commit().map_err(open_err)
}

fn revision(tx: &Transaction<'_>) -> Result<Revision, StoreError> {
    tx.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |row| {
        row.get(0)
    })
    .optional()
    .map_err(query("read the revision"))
    .map(Option::unwrap_or_default)
}

fn mod_revision(tx: &Transaction<'_>, key: &str) -> Result<Revision, StoreError> {
    tx.query_row("SELECT mod_revision FROM kv WHERE key = ?1", [key], |row| {
        row.get(0)
    })
    .optional()
    .map_err(query("read a key"))
    .map(Option::unwrap_or_default)
}

/// Applies `ops` at revision `next`; returns the changes (deleting an absent key is none).
fn apply(tx: &Transaction<'_>, next: Revision, ops: &[Op]) -> Result<Vec<Event>, StoreError> {
    let mut events = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                tx.execute(
                    "INSERT INTO kv (key, value, mod_revision, lease) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key) DO UPDATE SET value = ?2, mod_revision = ?3, lease = ?4",
                    params![key, value, next, lease],
                )
                .map_err(query("write a key"))?;
                events.push(Event::Put(KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    mod_revision: next,
                }));
            }
            Op::Delete { key } => {
                let deleted = tx
                    .execute("DELETE FROM kv WHERE key = ?1", [key])
                    .map_err(query("delete a key"))?;
                if deleted > 0 {
                    events.push(Event::Delete {
                        key: key.clone(),
                        mod_revision: next,
                    });
                }
            }
            Op::DeletePrefix { prefix } => {
                let mut stmt = tx
                    .prepare("DELETE FROM kv WHERE substr(key, 1, length(?1)) = ?1 RETURNING key")
                    .map_err(query("delete keys"))?;
                let keys = stmt
                    .query_map([prefix], |row| row.get::<_, String>(0))
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(query("delete keys"))?;
                events.extend(keys.into_iter().map(|key| Event::Delete {
                    key,
                    mod_revision: next,
                }));
            }
        }
    }
    Ok(events)
}

impl Inner {
    /// Commits `events` at `next` and announces them to the watches (under the lock, so in
    /// commit order).
    fn publish(&self, state: &mut State, next: Revision, events: Vec<Event>) {
        let batch: Batch = Arc::new((next, events));
        if state.history.len() == HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(Arc::clone(&batch));
        // No receiver is fine: nobody watches yet.
        let _ = self.events.send(batch);
    }

    fn commit(&self, state: &mut State, txn: &Txn) -> Result<Revision, StoreError> {
        let tx = state.conn.transaction().map_err(query("begin"))?;
        let current = revision(&tx)?;
        for compare in &txn.compares {
            if mod_revision(&tx, &compare.key)? != compare.mod_revision {
                return Err(StoreError::Conflict {
                    key: compare.key.clone(),
                    revision: current,
                });
            }
        }
        let next = current + 1;
        let events = apply(&tx, next, &txn.ops)?;
        if events.is_empty() {
            return Ok(current);
        }
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", [next])
            .map_err(query("bump the revision"))?;
        tx.commit().map_err(query("commit"))?;
        self.publish(state, next, events);
        Ok(next)
    }
}

fn list(state: &mut State) -> Result<Listing, StoreError> {
    // One read transaction: a consistent snapshot.
    let tx = state.conn.transaction().map_err(query("begin a read"))?;
    let revision = revision(&tx)?;
    let mut stmt = tx
        .prepare("SELECT key, value, mod_revision FROM kv ORDER BY key")
        .map_err(query("list keys"))?;
    let kvs = stmt
        .query_map([], |row| {
            Ok(KeyValue {
                key: row.get(0)?,
                value: row.get(1)?,
                mod_revision: row.get(2)?,
            })
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(query("list keys"))?;
    Ok(Listing { revision, kvs })
}

/// Forwards the commits after `after` to a new watch: first from the history, then live.
fn start_watch(inner: &Inner, state: &mut State, after: Revision) -> Result<Watch, StoreError> {
    let current = {
        let tx = state.conn.transaction().map_err(query("begin a read"))?;
        revision(&tx)?
    };
    let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
    let mut live = inner.events.subscribe();
    let covered = after >= current
        || state
            .history
            .front()
            .is_some_and(|oldest| oldest.0 <= after + 1);
    let replay: Vec<Batch> = state
        .history
        .iter()
        .filter(|batch| batch.0 > after)
        .cloned()
        .collect();
    tokio::spawn(async move {
        if !covered {
            let _ = sender.send(WatchMessage::Compacted).await;
            return;
        }
        for batch in replay {
            if sender.send(changes(&batch)).await.is_err() {
                return;
            }
        }
        loop {
            let message = match live.recv().await {
                Ok(batch) if batch.0 <= after => continue,
                Ok(batch) => changes(&batch),
                Err(broadcast::error::RecvError::Lagged(_)) => WatchMessage::Compacted,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let compacted = message == WatchMessage::Compacted;
            if sender.send(message).await.is_err() || compacted {
                return;
            }
        }
    });
    Ok(Watch::new(receiver))
}

fn changes(batch: &Batch) -> WatchMessage {
    WatchMessage::Changes {
        revision: batch.0,
        events: batch.1.clone(),
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn list(&self) -> Result<Listing, StoreError> {
        self.blocking(|_, state| list(state)).await
    }

    async fn watch(&self, after: Revision) -> Result<Watch, StoreError> {
        // Subscribing and reading the history under the store lock: no commit falls between.
        let mut state = self.inner.lock();
        start_watch(&self.inner, &mut state, after)
    }

    async fn commit(&self, txn: Txn) -> Result<Revision, StoreError> {
        self.blocking(move |inner, state| inner.commit(state, &txn))
            .await
    }

    async fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(|_, state| {
            state
                .conn
                .query_row(
                    "INSERT INTO leases (id) VALUES (NULL) RETURNING id",
                    [],
                    |row| row.get(0),
                )
                .map_err(query("grant a lease"))
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |_, state| {
            let found: Option<LeaseId> = state
                .conn
                .query_row("SELECT id FROM leases WHERE id = ?1", [lease], |row| {
                    row.get(0)
                })
                .optional()
                .map_err(query("renew a lease"))?;
            found.map(drop).ok_or(StoreError::LeaseExpired { lease })
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner, state| {
            let tx = state.conn.transaction().map_err(query("begin"))?;
            let next = revision(&tx)? + 1;
            let mut stmt = tx
                .prepare("DELETE FROM kv WHERE lease = ?1 RETURNING key")
                .map_err(query("revoke a lease"))?;
            let keys = stmt
                .query_map([lease], |row| row.get::<_, String>(0))
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(query("revoke a lease"))?;
            drop(stmt);
            tx.execute("DELETE FROM leases WHERE id = ?1", [lease])
                .map_err(query("revoke a lease"))?;
            if keys.is_empty() {
                tx.commit().map_err(query("commit"))?;
                return Ok(());
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", [next])
                .map_err(query("bump the revision"))?;
            tx.commit().map_err(query("commit"))?;
            let events = keys
                .into_iter()
                .map(|key| Event::Delete {
                    key,
                    mod_revision: next,
                })
                .collect();
            inner.publish(state, next, events);
            Ok(())
        })
        .await
    }

    fn describe(&self) -> String {
        format!("sqlite at {}", self.inner.path.display())
    }
}

#[cfg(test)]
mod tests;
