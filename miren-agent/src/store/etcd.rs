//! [`Store`] on etcd v3 (cluster mode): every agent of a cluster talks to the same etcd
//! cluster through the `etcd-client` crate (gRPC), under one key prefix (`--etcd-prefix`,
//! `/miren` by default: the trait's `apps/web` is etcd's `/miren/apps/web`).
//!
//! - A [`Txn`] is one etcd transaction: its compares on mod revisions (0 = absent holds for
//!   an absent key, whose mod revision etcd compares as 0), its ops, and, when a compare fails,
//!   a read of every compared key, so the error names the first key that changed.
//! - etcd refuses a transaction that writes a key twice or writes a key inside a range it
//!   deletes; SQLite applies such ops in order. Ops are therefore reduced to their effect
//!   first (a later write of a key replaces an earlier one; a later delete drops earlier puts
//!   and is cut around later puts), which leaves the same keys as applying them in order.
//! - [`Store::list`] reads the prefix in pages pinned to the revision of the first page.
//! - [`Store::watch`] is an etcd watch on the prefix from `after + 1`; its events are grouped by
//!   revision. A compacted start revision gives [`WatchMessage::Compacted`]; a broken stream or
//!   a member without a leader ends the watch.
//! - Every request requires a leader and has a deadline (`request_timeout`): without a quorum,
//!   or without any member answering, calls fail with [`StoreError::Unavailable`] by then
//!   instead of waiting on. Members that say they have no leader are asked again every
//!   200 ms until the deadline, so a request made while the members elect a new leader (the
//!   old one just lost) succeeds.
//! - One connection per endpoint; requests go to the member that answered last and move on to
//!   the next when it cannot be reached or has no leader (within the same request when that
//!   is safe). The client's own balancer over all endpoints is not used: it keeps sending a
//!   share of the requests to a dead member.
//! - A transaction may have at most etcd's `--max-txn-ops` (default 128) compares and as many
//!   ops (after the reduction); a larger one fails with [`StoreError::Backend`] and writes
//!   nothing.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, GetResponse, Identity, PutOptions, ResponseHeader, TlsOptions,
    Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse,
};
use tokio::sync::mpsc;

use super::{
    Event, KeyValue, LeaseId, Listing, Op, Revision, Store, StoreError, Txn, Watch, WatchMessage,
};

/// Messages buffered per watch before the watch waits for its reader.
const WATCH_BUFFER: usize = 1024;
/// Keys per page of a listing.
const LIST_PAGE: i64 = 1000;
/// How often a listing starts again when its revision was compacted between two pages.
const LIST_ATTEMPTS: usize = 3;
/// The largest answer accepted from etcd (pages of a listing, batches of a watch).
const MAX_MESSAGE: usize = 64 << 20;
/// etcd's default `--max-txn-ops`: the most compares, and the most ops, of one transaction.
const MAX_TXN_OPS: usize = 128;
/// The longest a connection attempt to one member may take (at most half the request timeout).
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on connections with open streams (watches), so a dead member is noticed.
/// etcd sends GOAWAY to clients that ping more often than every 5 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// gRPC status codes (the numbers are fixed by the gRPC specification).
mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNAVAILABLE: i32 = 14;
}

/// How to reach etcd (`--etcd-endpoints`, `--etcd-prefix`, `--etcd-ca`, `--etcd-cert`,
/// `--etcd-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client URLs of the members, e.g. `http://10.95.0.1:2379`. Without a scheme an endpoint
    /// is `https://` when [`EtcdOptions::ca`] is set, else `http://`.
    pub endpoints: Vec<String>,
    /// The prefix of every key of this cluster, e.g. `/miren` (a trailing `/` is optional):
    /// several clusters can share one etcd under different prefixes.
    pub prefix: String,
    /// PEM file of the CA that signed etcd's server certificates. Required for `https://`
    /// endpoints (the system's roots are not used); not allowed with `http://` endpoints.
    pub ca: Option<PathBuf>,
    /// PEM file of this client's certificate, for etcd's `--client-cert-auth`; needs
    /// [`EtcdOptions::key`] and [`EtcdOptions::ca`].
    pub cert: Option<PathBuf>,
    /// PEM file of the private key of [`EtcdOptions::cert`].
    pub key: Option<PathBuf>,
    /// The longest any request may take, connecting included; after it the request fails with
    /// [`StoreError::Unavailable`].
    pub request_timeout: Duration,
}

impl EtcdOptions {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "/miren";
    /// The default request timeout.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// Plain-HTTP options for `endpoints` with the default prefix and request timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            ca: None,
            cert: None,
            key: None,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// The etcd store. Cheap to clone (the connections are shared).
///
/// It keeps one gRPC connection per endpoint and sends each request to one member: the one
/// that answered last. A member that cannot be reached, or has no leader, is passed over for
/// the next one, within the same request when that is safe (reads and idempotent requests
/// always; writes only when they surely were not applied: no connection, or no leader).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// One client per endpoint, in the order given.
    members: Vec<Client>,
    /// The index of the member requests go to first.
    preferred: AtomicUsize,
    /// The prefix with its trailing `/` (e.g. `/miren/`): the first byte of every key.
    key_prefix: String,
    /// The end of the prefix's key range (exclusive).
    key_end: Vec<u8>,
    timeout: Duration,
    describe: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("at", &self.inner.describe)
            .field("prefix", &self.inner.key_prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// When a failed request may be sent again, to the next member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and idempotent requests: after any failure that means "unavailable".
    Idempotent,
    /// Writes: only when the request surely was not applied (no connection to the member,
    /// or the member has no leader and refused it).
    NotApplied,
}

/// How a member failed a request, least telling first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    /// It could not be reached.
    Unreachable,
    /// It did not answer in time (e.g. waiting for a leader).
    Silent,
    /// It answered with an error (e.g. "no leader").
    Said,
}

/// The pause before asking the members again when they said they have no leader.
const ELECTION_PAUSE: Duration = Duration::from_millis(200);

/// The cause of a failed etcd request, as text (the client's own errors print gRPC metadata
/// and hide their causes).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct EtcdFailure(String);

fn setup(message: String) -> StoreError {
    StoreError::Setup {
        message,
        source: None,
    }
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers (a count of the prefix's keys, which needs
    /// a leader).
    ///
    /// # Errors
    /// [`StoreError::Setup`] for unusable options (no endpoints, a TLS file that cannot be
    /// read, `https://` without `--etcd-ca`, a certificate without its key, a TLS handshake
    /// etcd refuses); [`StoreError::Unavailable`] when no member answers with a leader within
    /// the request timeout.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        if options.request_timeout.is_zero() {
            return Err(setup("the etcd request timeout must be more than 0".into()));
        }
        let tls = tls_options(&options)?;
        let without_identity = tls.is_some() && options.cert.is_none();
        let endpoints = endpoints(&options.endpoints, tls.is_some())?;
        let describe = format!("etcd at {}", endpoints.join(","));
        // A connection attempt gets part of a request's time, so an unreachable member leaves
        // time to try the next.
        let connect_timeout = (options.request_timeout / 2).min(MAX_CONNECT_TIMEOUT);
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, options.request_timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some(tls) = tls {
            connect = connect.with_tls(tls);
        }
        // Connecting is lazy (the probe below makes the first connection): this only checks
        // the endpoints and the TLS material.
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let client = Client::connect([endpoint], Some(connect.clone()))
                .await
                .map_err(|err| StoreError::Setup {
                    message: format!(
                        "setting up the etcd client for {endpoint}: check --etcd-endpoints and \
                         the TLS files"
                    ),
                    source: Some(Box::new(EtcdFailure(detail(&err)))),
                })?;
            members.push(client);
        }
        let key_prefix = key_prefix(&options.prefix);
        let store = Self {
            inner: Arc::new(Inner {
                members,
                preferred: AtomicUsize::new(0),
                key_end: prefix_end(key_prefix.as_bytes()),
                key_prefix,
                timeout: options.request_timeout,
                describe,
            }),
        };
        let range = store.prefix_range().with_count_only();
        let key = store.inner.key_prefix.clone();
        let probe = store
            .call("connect", Retry::Idempotent, |client| {
                let (key, range) = (key.clone(), range.clone());
                async move { client.kv_client().get(key, Some(range)).await }
            })
            .await;
        match probe {
            Ok(_) => Ok(store),
            // etcd with --client-cert-auth closes a TLS connection without a client
            // certificate right after the handshake; whether its alert reaches the client
            // first (then the error says so and is a Setup one already) is a race.
            Err(StoreError::Unavailable { source, .. })
                if without_identity && closed_after_handshake(&source.to_string()) =>
            {
                Err(StoreError::Setup {
                    message: format!(
                        "{} closed the TLS connection before answering: it probably requires a \
                         client certificate (etcd --client-cert-auth); give --etcd-cert and \
                         --etcd-key",
                        store.describe()
                    ),
                    source: Some(source),
                })
            }
            Err(err) => Err(err),
        }
    }

    /// Sends `request` to the preferred member, and on a failure `retry` allows to the next
    /// ones, all within one request timeout; maps the errors.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        mut request: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let count = self.inner.members.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % count;
        // The most telling failure so far: what a member said (e.g. "no leader") over a member
        // that did not answer in time over one that could not be reached.
        let mut worst: Option<(StoreError, Failure)> = None;
        let note =
            |worst: &mut Option<(StoreError, Failure)>, err: StoreError, failure: Failure| {
                if worst.as_ref().is_none_or(|(_, was)| failure > *was) {
                    *worst = Some((err, failure));
                }
            };
        loop {
            for attempt in 0..count {
                let index = (first + attempt) % count;
                let client = self.inner.members[index].clone();
                // A member that lost its leader holds a request until a new one is elected (or
                // its own timeout, longer than ours): give one member at most half the time, then
                // try the next (the last one gets what is left). A request that timed out may
                // still be applied later; sending it again is safe for the agent's transactions
                // (guarded by compares, or writing what it wrote before) and leases (an extra one
                // expires unused).
                let started = tokio::time::Instant::now();
                let attempt_deadline = if attempt + 1 < count {
                    deadline.min(started + self.inner.timeout / 2)
                } else {
                    deadline
                };
                let err = match tokio::time::timeout_at(attempt_deadline, request(client)).await {
                    Ok(Ok(answer)) => {
                        self.inner.preferred.store(index, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    Ok(Err(err)) => err,
                    Err(_) => {
                        self.pass_over(index);
                        note(
                            &mut worst,
                            self.timed_out(op, started.elapsed()),
                            Failure::Silent,
                        );
                        if tokio::time::Instant::now() >= deadline {
                            break;
                        }
                        continue;
                    }
                };
                let mapped = self.error(op, &err);
                if !matches!(mapped, StoreError::Unavailable { .. }) {
                    return Err(mapped);
                }
                self.pass_over(index);
                if retry == Retry::NotApplied && !not_applied(&err) {
                    return Err(mapped);
                }
                let failure = if connect_failed(&err) {
                    Failure::Unreachable
                } else {
                    Failure::Said
                };
                note(&mut worst, mapped, failure);
            }
            // Every member failed. One that said it has no leader may be electing one (the leader
            // was just lost, a quorum is left): go around again until the deadline.
            let electing = worst
                .as_ref()
                .is_some_and(|(_, failure)| *failure == Failure::Said);
            if !electing || tokio::time::Instant::now() + ELECTION_PAUSE >= deadline {
                break;
            }
            tokio::time::sleep(ELECTION_PAUSE).await;
        }
        Err(worst.map_or_else(|| self.timed_out(op, self.inner.timeout), |(err, _)| err))
    }

    /// Makes the member after `index` the preferred one, unless another request did already.
    fn pass_over(&self, index: usize) {
        let next = (index + 1) % self.inner.members.len();
        let _ = self.inner.preferred.compare_exchange(
            index,
            next,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A member gave no answer to `op` within `waited`.
    fn timed_out(&self, op: &str, waited: Duration) -> StoreError {
        StoreError::Unavailable {
            backend: self.describe(),
            source: Box::new(EtcdFailure(format!(
                "no answer within {:.1}s to {op} (no member reachable, or no quorum)",
                waited.as_secs_f64()
            ))),
        }
    }

    /// Maps an etcd error: unreachable members and lost quorum are
    /// [`StoreError::Unavailable`], a refused TLS handshake is [`StoreError::Setup`], the rest
    /// [`StoreError::Backend`].
    fn error(&self, op: &'static str, err: &etcd_client::Error) -> StoreError {
        let text = detail(err);
        if tls_refused(&text) {
            return StoreError::Setup {
                message: format!(
                    "the TLS handshake with {} failed: check --etcd-ca (the CA of etcd's server \
                     certificates) and --etcd-cert/--etcd-key (a client certificate etcd \
                     trusts, needed when etcd runs with --client-cert-auth)",
                    self.describe()
                ),
                source: Some(Box::new(EtcdFailure(text))),
            };
        }
        let unavailable = match err {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(status) => match i32::from(status.code()) {
                code::UNAVAILABLE | code::DEADLINE_EXCEEDED => true,
                // A connection that broke under the request (a member killed).
                code::UNKNOWN | code::CANCELLED => {
                    std::error::Error::source(status).is_some()
                        || status.message().contains("transport")
                }
                _ => false,
            },
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable {
                backend: self.describe(),
                source: Box::new(EtcdFailure(text)),
            }
        } else {
            StoreError::Backend {
                op,
                source: Box::new(EtcdFailure(text)),
            }
        }
    }

    /// The etcd key of `key`.
    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.inner.key_prefix).into_bytes()
    }

    /// `key` without the prefix, as text.
    fn relative_key(&self, key: &[u8]) -> Result<String, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            what: "key",
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_owned(),
        };
        let relative = key
            .strip_prefix(self.inner.key_prefix.as_bytes())
            .ok_or_else(|| corrupt("outside the store's prefix"))?;
        String::from_utf8(relative.to_vec()).map_err(|_| corrupt("not UTF-8"))
    }

    /// Options selecting every key of the prefix (with the prefix as the key).
    fn prefix_range(&self) -> GetOptions {
        GetOptions::new().with_range(self.inner.key_end.clone())
    }

    /// One listing attempt: `None` if its revision was compacted between pages.
    async fn list_once(&self) -> Result<Option<Listing>, StoreError> {
        let mut kvs = Vec::new();
        let mut start = self.inner.key_prefix.clone().into_bytes();
        let mut revision = None;
        loop {
            let mut range = self.prefix_range().with_limit(LIST_PAGE);
            if let Some(revision) = revision {
                range = range.with_revision(revision);
            }
            let pinned = revision.is_some();
            let page = self
                .call("list keys", Retry::Idempotent, |client| {
                    let (key, range) = (start.clone(), range.clone());
                    async move {
                        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
                        match kv.get(key, Some(range)).await {
                            Ok(answer) => Ok(Some(answer)),
                            Err(err) if pinned && is_compacted(&err) => Ok(None),
                            Err(err) => Err(err),
                        }
                    }
                })
                .await?;
            let Some(answer) = page else {
                return Ok(None);
            };
            let page_revision = header_revision(answer.header())?;
            let revision = *revision.get_or_insert(page_revision);
            let more = answer.more();
            for kv in answer.kvs() {
                kvs.push(KeyValue {
                    key: self.relative_key(kv.key())?,
                    value: kv.value().to_vec(),
                    mod_revision: to_revision(kv.mod_revision()),
                });
            }
            match answer.kvs().last() {
                Some(last) if more => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => {
                    return Ok(Some(Listing {
                        revision: to_revision(revision),
                        kvs,
                    }));
                }
            }
        }
    }

    /// The etcd transaction of `txn`.
    fn etcd_txn(&self, txn: &Txn) -> EtcdTxn {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|compare| {
                EtcdCompare::mod_revision(
                    self.full_key(&compare.key),
                    CompareOp::Equal,
                    i64::try_from(compare.mod_revision).unwrap_or(i64::MAX),
                )
            })
            .collect();
        let ops: Vec<TxnOp> = reduce(&self.inner.key_prefix, &txn.ops)
            .into_iter()
            .map(|write| match write {
                Write::Put { key, value, lease } => {
                    let options = lease.map(|lease| PutOptions::new().with_lease(lease));
                    TxnOp::put(key, value, options)
                }
                Write::Delete { start, end } => {
                    TxnOp::delete(start, Some(DeleteOptions::new().with_range(end)))
                }
            })
            .collect();
        let reads: Vec<TxnOp> = txn
            .compares
            .iter()
            .map(|compare| TxnOp::get(self.full_key(&compare.key), None))
            .collect();
        EtcdTxn::new().when(compares).and_then(ops).or_else(reads)
    }

    /// The messages of one watch answer (one [`WatchMessage::Changes`] per revision), and
    /// whether the watch goes on after them.
    fn messages(&self, answer: &WatchResponse) -> (Vec<WatchMessage>, bool) {
        if answer.compact_revision() > 0 {
            return (vec![WatchMessage::Compacted], false);
        }
        let mut messages = Vec::new();
        let mut batch: Option<(Revision, Vec<Event>)> = None;
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            let Ok(key) = self.relative_key(kv.key()) else {
                // Not a key this store writes: end the watch; the reader lists again and
                // gets the error from the listing.
                return (messages, false);
            };
            let revision = to_revision(kv.mod_revision());
            let event = match event.event_type() {
                EventType::Put => Event::Put(KeyValue {
                    key,
                    value: kv.value().to_vec(),
                    mod_revision: revision,
                }),
                EventType::Delete => Event::Delete {
                    key,
                    mod_revision: revision,
                },
            };
            match &mut batch {
                Some((current, events)) if *current == revision => events.push(event),
                _ => {
                    if let Some((revision, events)) = batch.take() {
                        messages.push(WatchMessage::Changes { revision, events });
                    }
                    batch = Some((revision, vec![event]));
                }
            }
        }
        if let Some((revision, events)) = batch {
            messages.push(WatchMessage::Changes { revision, events });
        }
        (messages, !answer.canceled())
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn list(&self) -> Result<Listing, StoreError> {
        for _ in 0..LIST_ATTEMPTS {
            if let Some(listing) = self.list_once().await? {
                return Ok(listing);
            }
        }
        Err(StoreError::Backend {
            op: "list keys",
            source: Box::new(EtcdFailure(format!(
                "the listing's revision was compacted {LIST_ATTEMPTS} times while it was read"
            ))),
        })
    }

    async fn watch(&self, after: Revision) -> Result<Watch, StoreError> {
        let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
        let options = WatchOptions::new()
            .with_range(self.inner.key_end.clone())
            .with_start_revision(start);
        let key = self.inner.key_prefix.clone();
        let (requests, mut answers, first) = self
            .call("start a watch", Retry::Idempotent, |client| {
                let (key, options) = (key.clone(), options.clone());
                async move {
                    let mut watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
                    let (requests, mut answers) = watch.watch(key, Some(options)).await?.split();
                    // The first answer confirms the watch (or says its start is compacted).
                    let first = answers.message().await?.ok_or_else(|| {
                        etcd_client::Error::IoError(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the watch stream ended before the watch was created",
                        ))
                    })?;
                    Ok((requests, answers, first))
                }
            })
            .await?;
        if first.canceled() && first.compact_revision() == 0 {
            return Err(StoreError::Backend {
                op: "start a watch",
                source: Box::new(EtcdFailure(format!(
                    "etcd canceled the watch: {}",
                    first.cancel_reason()
                ))),
            });
        }
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let store = self.clone();
        tokio::spawn(async move {
            // Keeps the request side of the stream open while the watch runs.
            let _requests = requests;
            let mut answer = first;
            loop {
                let (messages, more) = store.messages(&answer);
                for message in messages {
                    if sender.send(message).await.is_err() {
                        return;
                    }
                }
                if !more {
                    return;
                }
                answer = tokio::select! {
                    () = sender.closed() => return,
                    next = answers.message() => match next {
                        Ok(Some(next)) => next,
                        // The stream ended or broke: the reader sees the end and lists again.
                        Ok(None) | Err(_) => return,
                    },
                };
            }
        });
        Ok(Watch::new(receiver))
    }

    async fn commit(&self, txn: Txn) -> Result<Revision, StoreError> {
        let request = self.etcd_txn(&txn);
        let answer = self
            .call("commit a transaction", Retry::NotApplied, |client| {
                let request = request.clone();
                async move { client.kv_client().txn(request).await }
            })
            .await?;
        let revision = to_revision(header_revision(answer.header())?);
        if answer.succeeded() {
            return Ok(revision);
        }
        // The reads of the failure branch are at the revision the compares were evaluated at.
        let reads = answer.op_responses();
        let changed = txn
            .compares
            .iter()
            .zip(&reads)
            .find(|(compare, read)| match read {
                TxnOpResponse::Get(get) => current_mod_revision(get) != compare.mod_revision,
                _ => false,
            })
            .or_else(|| txn.compares.first().zip(reads.first()))
            .map(|(compare, _)| compare.key.clone());
        match changed {
            Some(key) => Err(StoreError::Conflict { key, revision }),
            None => Err(StoreError::Backend {
                op: "commit a transaction",
                source: Box::new(EtcdFailure(
                    "etcd refused the transaction without a failed compare".into(),
                )),
            }),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut seconds = ttl.as_secs();
        if ttl.subsec_nanos() > 0 {
            seconds += 1;
        }
        let seconds = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
        let answer = self
            .call("grant a lease", Retry::NotApplied, |client| async move {
                client.lease_client().grant(seconds, None).await
            })
            .await?;
        if !answer.error().is_empty() {
            return Err(StoreError::Backend {
                op: "grant a lease",
                source: Box::new(EtcdFailure(answer.error().to_owned())),
            });
        }
        Ok(answer.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let alive = self
            .call("renew a lease", Retry::Idempotent, |client| async move {
                // One request and its answer; the stream closes when the keeper drops.
                match client.lease_client().keep_alive(lease).await {
                    Ok(_) => Ok(true),
                    // An answer with TTL 0: the lease is gone.
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                    Err(err) if grpc_code(&err) == Some(code::NOT_FOUND) => Ok(false),
                    Err(err) => Err(err),
                }
            })
            .await?;
        if alive {
            Ok(())
        } else {
            Err(StoreError::LeaseExpired { lease })
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call("revoke a lease", Retry::Idempotent, |client| async move {
            match client.lease_client().revoke(lease).await {
                Ok(_) => Ok(()),
                // Gone already (expired or revoked): its keys are gone too.
                Err(err) if grpc_code(&err) == Some(code::NOT_FOUND) => Ok(()),
                Err(err) => Err(err),
            }
        })
        .await
    }

    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    fn max_txn_ops(&self) -> Option<usize> {
        Some(MAX_TXN_OPS)
    }
}

/// The TLS settings of `options`, `None` for plain HTTP.
fn tls_options(options: &EtcdOptions) -> Result<Option<TlsOptions>, StoreError> {
    let identity = match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(setup(
                "--etcd-cert and --etcd-key go together: give both (the client certificate and \
                 its private key) or neither"
                    .into(),
            ));
        }
    };
    let Some(ca) = &options.ca else {
        if identity.is_some() {
            return Err(setup(
                "--etcd-cert and --etcd-key need --etcd-ca (the CA that signed etcd's server \
                 certificates) and https:// endpoints"
                    .into(),
            ));
        }
        return Ok(None);
    };
    let mut tls =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(ca, "--etcd-ca")?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            read_pem(cert, "--etcd-cert")?,
            read_pem(key, "--etcd-key")?,
        ));
    }
    Ok(Some(tls))
}

/// The contents of the PEM file `path` given as `flag`.
fn read_pem(path: &Path, flag: &str) -> Result<Vec<u8>, StoreError> {
    let pem = std::fs::read(path).map_err(|source| StoreError::Setup {
        message: format!("reading {flag} {}", path.display()),
        source: Some(source.into()),
    })?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(setup(format!(
            "{flag} {} is not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(pem)
}

/// The endpoints with their schemes: `https://` exactly when TLS is configured.
fn endpoints(given: &[String], tls: bool) -> Result<Vec<String>, StoreError> {
    if given.is_empty() {
        return Err(setup(
            "no etcd endpoints: give --etcd-endpoints, e.g. http://10.0.0.1:2379".into(),
        ));
    }
    given
        .iter()
        .map(|endpoint| {
            let endpoint = endpoint.trim();
            if endpoint.is_empty() {
                Err(setup("an empty etcd endpoint in --etcd-endpoints".into()))
            } else if endpoint.starts_with("http://") {
                if tls {
                    Err(setup(format!(
                        "etcd endpoint {endpoint} is plain http:// but --etcd-ca is set: give \
                         the endpoints as https://"
                    )))
                } else {
                    Ok(endpoint.to_owned())
                }
            } else if endpoint.starts_with("https://") {
                if tls {
                    Ok(endpoint.to_owned())
                } else {
                    Err(setup(format!(
                        "etcd endpoint {endpoint} uses TLS: give --etcd-ca (the CA that signed \
                         etcd's server certificates; the system's roots are not used)"
                    )))
                }
            } else if endpoint.contains("://") {
                Err(setup(format!(
                    "etcd endpoint {endpoint}: only http:// and https:// are supported"
                )))
            } else if tls {
                Ok(format!("https://{endpoint}"))
            } else {
                Ok(format!("http://{endpoint}"))
            }
        })
        .collect()
}

/// `prefix` with exactly one trailing `/` (`/miren` → `/miren/`; empty → `/`).
fn key_prefix(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
}

/// The first key after every key starting with `prefix` (etcd's prefix range end); `\0` (all
/// keys from the start) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The key right after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// One write of an etcd transaction, with the prefix applied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    /// Delete every key in `start..end`.
    Delete { start: Vec<u8>, end: Vec<u8> },
}

/// `ops` as etcd accepts them, with the effect of applying them in order: no key is put twice
/// and no put key lies in a deleted range. An earlier put of a key that is put or deleted
/// again is dropped; a put cuts its key out of the earlier deletes. The writes that remain
/// keep their order.
fn reduce(key_prefix: &str, ops: &[Op]) -> Vec<Write> {
    let mut writes: Vec<Write> = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                let key = format!("{key_prefix}{key}").into_bytes();
                let mut kept = Vec::with_capacity(writes.len() + 1);
                for write in writes {
                    match write {
                        Write::Put { key: ref put, .. } if *put == key => {}
                        Write::Delete { start, end } if start <= key && key < end => {
                            if start < key {
                                kept.push(Write::Delete {
                                    start,
                                    end: key.clone(),
                                });
                            }
                            let after = successor(&key);
                            if after < end {
                                kept.push(Write::Delete { start: after, end });
                            }
                        }
                        other => kept.push(other),
                    }
                }
                kept.push(Write::Put {
                    key,
                    value: value.clone(),
                    lease: *lease,
                });
                writes = kept;
            }
            Op::Delete { key } => {
                let start = format!("{key_prefix}{key}").into_bytes();
                let end = successor(&start);
                delete(&mut writes, start, end);
            }
            Op::DeletePrefix { prefix } => {
                let start = format!("{key_prefix}{prefix}").into_bytes();
                let end = prefix_end(&start);
                delete(&mut writes, start, end);
            }
        }
    }
    writes
}

/// Adds the deletion of `start..end` to `writes`, dropping the earlier puts it undoes.
fn delete(writes: &mut Vec<Write>, start: Vec<u8>, end: Vec<u8>) {
    writes.retain(|write| match write {
        Write::Put { key, .. } => !(start <= *key && *key < end),
        Write::Delete { .. } => true,
    });
    writes.push(Write::Delete { start, end });
}

/// The mod revision of the key a read found (0: absent).
fn current_mod_revision(get: &GetResponse) -> Revision {
    get.kvs()
        .first()
        .map_or(0, |kv| to_revision(kv.mod_revision()))
}

fn header_revision(header: Option<&ResponseHeader>) -> Result<i64, StoreError> {
    header
        .map(ResponseHeader::revision)
        .ok_or_else(|| StoreError::Backend {
            op: "read etcd's answer",
            source: Box::new(EtcdFailure("etcd answered without a header".into())),
        })
}

/// An etcd revision (never negative) as a [`Revision`].
fn to_revision(revision: i64) -> Revision {
    Revision::try_from(revision).unwrap_or(0)
}

fn grpc_code(err: &etcd_client::Error) -> Option<i32> {
    match err {
        etcd_client::Error::GRpcStatus(status) => Some(status.code().into()),
        _ => None,
    }
}

/// Whether `err` says the request never reached a member's raft log: the connection could
/// not be made, or the member has no leader (etcd refuses requests with the require-leader
/// flag before proposing them).
fn not_applied(err: &etcd_client::Error) -> bool {
    let status = match err {
        etcd_client::Error::TransportError(_) => return true,
        etcd_client::Error::GRpcStatus(status) => status,
        _ => return false,
    };
    status.message().contains("no leader") || connect_failed(err)
}

/// Whether `err` says no connection to the member could be made.
fn connect_failed(err: &etcd_client::Error) -> bool {
    let status = match err {
        etcd_client::Error::TransportError(_) => return true,
        etcd_client::Error::GRpcStatus(status) => status,
        _ => return false,
    };
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{
                AddrNotAvailable, ConnectionRefused, HostUnreachable, NetworkUnreachable, TimedOut,
            };
            if matches!(
                io.kind(),
                ConnectionRefused
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
            ) {
                return true;
            }
        }
        if cause.to_string().contains("tcp connect error") {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether a read at a pinned revision failed because that revision was compacted.
fn is_compacted(err: &etcd_client::Error) -> bool {
    grpc_code(err) == Some(code::OUT_OF_RANGE)
}

/// The message of `err` with its causes.
fn detail(err: &etcd_client::Error) -> String {
    let (mut text, mut source): (String, Option<&(dyn std::error::Error + 'static)>) = match err {
        etcd_client::Error::GRpcStatus(status) => (
            status.message().to_owned(),
            std::error::Error::source(status),
        ),
        etcd_client::Error::TransportError(err) => {
            (err.to_string(), std::error::Error::source(err))
        }
        etcd_client::Error::IoError(err) => (err.to_string(), std::error::Error::source(err)),
        other => (other.to_string(), None),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if text.is_empty() {
        text = err.to_string();
    }
    text
}

/// Whether an error text says the member closed the connection (not: refused it).
fn closed_after_handshake(text: &str) -> bool {
    ["connection closed", "broken pipe", "connection reset"]
        .iter()
        .any(|sign| text.to_lowercase().contains(sign))
}

/// Whether an error text says the TLS handshake was refused (by either side).
fn tls_refused(text: &str) -> bool {
    const SIGNS: &[&str] = &[
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "UnknownIssuer",
        "invalid peer certificate",
        "certificate required",
        "bad certificate",
        "unknown certificate authority",
        "NotValidForName",
        "HandshakeFailure",
    ];
    SIGNS.iter().any(|sign| text.contains(sign))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            lease: None,
        }
    }

    fn wput(key: &str, value: &str) -> Write {
        Write::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease: None,
        }
    }

    fn wdel(start: &[u8], end: &[u8]) -> Write {
        Write::Delete {
            start: start.to_vec(),
            end: end.to_vec(),
        }
    }

    #[test]
    fn prefixes_and_their_ends() {
        assert_eq!(key_prefix("/miren"), "/miren/");
        assert_eq!(key_prefix("/miren/"), "/miren/");
        assert_eq!(key_prefix(""), "/");
        assert_eq!(prefix_end(b"/miren/"), b"/miren0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn ops_without_overlap_stay_as_they_are() {
        let ops = [
            put("apps/a", "1"),
            Op::Delete {
                key: "apps/b".into(),
            },
            Op::DeletePrefix {
                prefix: "endpoints/a/".into(),
            },
        ];
        assert_eq!(
            reduce("/p/", &ops),
            [
                wput("/p/apps/a", "1"),
                wdel(b"/p/apps/b", b"/p/apps/b\0"),
                wdel(b"/p/endpoints/a/", b"/p/endpoints/a0"),
            ]
        );
    }

    #[test]
    fn the_last_write_of_a_key_wins_and_puts_cut_earlier_deletes() {
        let ops = [
            put("apps/a", "1"),
            put("apps/a", "2"),
            Op::DeletePrefix {
                prefix: "endpoints/a/".into(),
            },
            put("endpoints/a/web/n1", "x"),
            put("routes/r", "1"),
            Op::Delete {
                key: "routes/r".into(),
            },
            Op::Delete {
                key: "apps/z".into(),
            },
            put("apps/z", "z"),
        ];
        assert_eq!(
            reduce("/p/", &ops),
            [
                wput("/p/apps/a", "2"),
                wdel(b"/p/endpoints/a/", b"/p/endpoints/a/web/n1"),
                wdel(b"/p/endpoints/a/web/n1\0", b"/p/endpoints/a0"),
                wput("/p/endpoints/a/web/n1", "x"),
                wdel(b"/p/routes/r", b"/p/routes/r\0"),
                wput("/p/apps/z", "z"),
            ]
        );
    }

    #[test]
    fn endpoints_get_their_scheme_and_tls_needs_a_ca() {
        let given = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            endpoints(&given(&["10.0.0.1:2379", "http://10.0.0.2:2379"]), false).unwrap(),
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(
            endpoints(&given(&["10.0.0.1:2379"]), true).unwrap(),
            ["https://10.0.0.1:2379"]
        );
        let err = endpoints(&given(&["https://10.0.0.1:2379"]), false).unwrap_err();
        assert!(err.to_string().contains("--etcd-ca"), "{err}");
        let err = endpoints(&given(&["http://10.0.0.1:2379"]), true).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        assert!(endpoints(&[], false).is_err());
    }

    #[test]
    fn a_certificate_needs_its_key_and_a_ca() {
        let mut options = EtcdOptions::new(vec!["https://10.0.0.1:2379".into()]);
        options.cert = Some("/nonexistent/client.pem".into());
        let err = tls_options(&options).unwrap_err();
        assert!(
            err.to_string()
                .contains("--etcd-cert and --etcd-key go together"),
            "{err}"
        );
        options.key = Some("/nonexistent/client.key".into());
        let err = tls_options(&options).unwrap_err();
        assert!(err.to_string().contains("need --etcd-ca"), "{err}");
        options.ca = Some("/nonexistent/ca.pem".into());
        let err = tls_options(&options).unwrap_err();
        assert!(
            err.to_string()
                .contains("reading --etcd-ca /nonexistent/ca.pem"),
            "{err}"
        );
    }
}
