//! Automatic certificates: ACME (RFC 8555) HTTP-01 with `instant-acme`.
//!
//! One node at a time orders: the holder of the `acme` role ([`ControlPlane::lead`], tried
//! every round, so another node takes over when the holder's lease ends). [`run`] keeps a
//! certificate for every exact routed host: it orders one when a host has none or its
//! certificate is close to expiry, publishes the HTTP-01 key authorization in the shared state
//! ([`ControlPlane::publish_challenge`], under this node's lease) so whichever node's ingress
//! the ACME server reaches answers `GET /.well-known/acme-challenge/TOKEN`
//! ([`ControlPlane::challenge`]), and stores the issued chain with [`CertStore::put`] for every
//! node. Hosts covered by an operator's certificate are left alone; hosts without a route are
//! never requested; wildcard routes cannot be validated over HTTP-01 and are skipped. Failures
//! back off per host, 30 s doubling to 1 h.
//!
//! The account is the cluster's (`acme/account` in the store, written only by the role's
//! holder): a node that takes the role over orders with the same account. An account file an
//! earlier agent kept in `<state-dir>/acme/account.json` is moved into the store once.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::{sync::watch, time::Instant};

use crate::{
    control::{ControlError, ControlPlane},
    ingress::certs::{CertError, CertSource, CertStore, StoredCert},
    metrics::{AcmeOutcome, Metrics},
    routes::Host,
    store::records::{ACME, AcmeAccount},
};

/// Renew when less than this is left (and always with a third of the lifetime left).
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Re-check everything at least this often.
const RECHECK: Duration = Duration::from_secs(3600);
/// First retry delay after a failed order; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// How long one order may wait for validation and for the certificate.
const ORDER_POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));
/// The account file in [`AcmeSettings::account_dir`] of agents before the cluster's shared
/// account (moved into the store when found).
const LEGACY_ACCOUNT_FILE: &str = "account.json";

/// How long a published challenge is given to reach the other nodes' views (they follow the
/// same store watch as this one, which already has it) before the ACME server is told to
/// validate: it may ask any node.
const CHALLENGE_SETTLE: Duration = Duration::from_millis(500);

/// Where and how to get certificates.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The ACME directory URL (`--acme-directory`).
    pub directory: String,
    /// Contact for the account (`--acme-email`).
    pub email: Option<String>,
    /// CA certificate (PEM) to verify the ACME server's HTTPS with instead of the system roots
    /// (`--acme-ca-file`), e.g. Pebble's.
    pub ca_file: Option<PathBuf>,
    /// Directory keeping the account credentials across restarts.
    pub account_dir: PathBuf,
}

/// Why getting a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server refused or could not be reached.
    #[error("{op}: {source}")]
    Protocol {
        /// What was being done.
        op: &'static str,
        /// instant-acme's error (includes the server's problem document).
        #[source]
        source: instant_acme::Error,
    },
    /// An earlier agent's account file could not be read.
    #[error("{op} {path}: {source}; check that the agent can read its state directory")]
    AccountFile {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The cluster's account could not be read from or written to the store.
    #[error("the cluster's ACME account: {0}")]
    Account(String),
    /// The server offered no HTTP-01 challenge.
    #[error(
        "the ACME server offers no http-01 challenge for {host}; this agent can only answer http-01"
    )]
    NoHttp01 {
        /// The host.
        host: String,
    },
    /// The server did not validate the host.
    #[error(
        "the ACME server did not validate {host}: {reason}; check that {host} resolves to a node of this cluster and that port 80 (--http-addr) is reachable from the ACME server"
    )]
    Invalid {
        /// The host.
        host: String,
        /// The server's problem details, or the final status.
        reason: String,
    },
    /// The challenge could not be published in (or withdrawn from) the shared state.
    #[error("publishing the HTTP-01 challenge in the shared state: {0}")]
    Challenge(#[from] ControlError),
    /// The issued certificate was refused by the store.
    #[error("storing the issued certificate: {0}")]
    Store(#[from] CertError),
}

/// `op` → an [`AcmeError::Protocol`] mapper.
fn protocol(op: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |source| AcmeError::Protocol { op, source }
}

/// Per-host retry state after failures.
#[derive(Debug)]
struct Backoff {
    next_attempt: Instant,
    delay: Duration,
}

/// Runs until `shutdown` turns true. Each round it takes the `acme` role if free
/// ([`ControlPlane::lead`]); a node that does not hold it orders nothing. The holder, for
/// every routed host ([`ControlPlane::routes`], exact hosts only — HTTP-01 cannot issue
/// wildcards; logged once per wildcard route) without a valid certificate or close to expiry
/// (30 days, or a third of the lifetime for short-lived certificates), orders one, answers
/// HTTP-01 through the shared state, and stores it via [`CertStore::put`] with
/// [`CertSource::Acme`]. Rounds run on every control revision ([`ControlPlane::subscribe`],
/// which includes the role's holder leaving) and hourly. Failures per host back off
/// exponentially (30 s doubling to 1 h) and are logged with the reason; hosts without a route
/// are never requested; operator-provided certificates are never replaced. Each order's
/// outcome is counted in `metrics`.
pub async fn run(
    settings: AcmeSettings,
    control: Arc<ControlPlane>,
    certs: Arc<CertStore>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut revisions = control.subscribe();
    let mut account: Option<Account> = None;
    let mut holder_logged: Option<String> = None;
    let mut backoff: HashMap<String, Backoff> = HashMap::new();
    let mut wildcards_logged: HashSet<String> = HashSet::new();
    while !*shutdown.borrow() {
        revisions.borrow_and_update();
        let mut wake = Instant::now() + RECHECK;
        match control.lead(ACME).await {
            Err(err) => {
                tracing::warn!(error = %err, retry_in_secs = FIRST_BACKOFF.as_secs(), "cannot tell which node orders ACME certificates");
                wake = Instant::now() + FIRST_BACKOFF;
            }
            Ok(false) => {
                log_holder(&control, false, &mut holder_logged);
                // A later takeover starts afresh: the account is read again and nothing
                // waits on failures seen while this node held the role before.
                account = None;
                backoff.clear();
            }
            Ok(true) => {
                log_holder(&control, true, &mut holder_logged);
                let active = match account.take() {
                    Some(active) => active,
                    None => {
                        let Some(connected) =
                            connect_account(&settings, &control, &mut shutdown).await
                        else {
                            return;
                        };
                        tracing::info!(directory = %settings.directory, account = connected.id(), "ACME account ready");
                        connected
                    }
                };
                let next = order_due(
                    &active,
                    &control,
                    &certs,
                    &metrics,
                    &mut backoff,
                    &mut wildcards_logged,
                    &mut shutdown,
                )
                .await;
                account = Some(active);
                match next {
                    Some(next) => wake = wake.min(next),
                    None => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            changed = revisions.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Logs which node holds the `acme` role when that changed since `logged`.
fn log_holder(control: &ControlPlane, leading: bool, logged: &mut Option<String>) {
    let holder = control.holder(ACME);
    if holder.is_none() || *logged == holder {
        return;
    }
    if leading {
        tracing::info!(
            node = holder.as_deref(),
            "this node orders the cluster's ACME certificates (acme role)"
        );
    } else {
        tracing::info!(
            node = holder.as_deref(),
            "another node orders the cluster's ACME certificates (acme role)"
        );
    }
    *logged = holder;
}

/// One round of the role's holder: orders what is due; returns when to look again, `None` on
/// shutdown.
async fn order_due(
    account: &Account,
    control: &Arc<ControlPlane>,
    certs: &CertStore,
    metrics: &Metrics,
    backoff: &mut HashMap<String, Backoff>,
    wildcards_logged: &mut HashSet<String>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Instant> {
    let mut wake = Instant::now() + RECHECK;
    let routed: Vec<String> = control.routes().into_iter().map(|r| r.host).collect();
    backoff.retain(|host, _| routed.contains(host));
    wildcards_logged.retain(|host| routed.contains(host));
    for host in routed {
        if *shutdown.borrow() {
            return None;
        }
        if host.starts_with("*.") {
            if wildcards_logged.insert(host.clone()) {
                tracing::warn!(
                    host,
                    "no automatic certificate for a wildcard route: ACME http-01 cannot validate wildcards; set one with `miren cert set`"
                );
            }
            continue;
        }
        let due = match certs.covering(&host) {
            Some(StoredCert {
                source: CertSource::User,
                ..
            }) => continue,
            Some(stored) => renewal_time(&stored),
            None => SystemTime::now(),
        };
        if let Ok(wait) = due.duration_since(SystemTime::now()) {
            wake = wake.min(Instant::now() + wait);
            continue;
        }
        if let Some(retry) = backoff.get(&host)
            && retry.next_attempt > Instant::now()
        {
            wake = wake.min(retry.next_attempt);
            continue;
        }
        let result = tokio::select! {
            result = issue(account, &host, control, certs) => result,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        metrics.observe_acme_order(outcome(&result));
        match result {
            Ok(not_after) => {
                backoff.remove(&host);
                tracing::info!(host, %not_after, "ACME certificate issued");
            }
            Err(err) => {
                let delay = backoff
                    .get(&host)
                    .map_or(FIRST_BACKOFF, |b| (b.delay * 2).min(MAX_BACKOFF));
                let next_attempt = Instant::now() + delay;
                tracing::warn!(host, error = %err, retry_in_secs = delay.as_secs(), "ACME certificate failed");
                backoff.insert(
                    host,
                    Backoff {
                        next_attempt,
                        delay,
                    },
                );
                wake = wake.min(next_attempt);
            }
        }
    }
    Some(wake)
}

/// How an order with `result` counts in `miren_acme_orders_total`.
fn outcome<T>(result: &Result<T, AcmeError>) -> AcmeOutcome {
    match result {
        Ok(_) => AcmeOutcome::Issued,
        Err(AcmeError::Invalid { .. }) => AcmeOutcome::Invalid,
        Err(_) => AcmeOutcome::Failed,
    }
}

/// When a certificate should be renewed: 30 days before expiry, or earlier when a third of a
/// short lifetime is left.
fn renewal_time(stored: &StoredCert) -> SystemTime {
    let lifetime = stored
        .not_after
        .duration_since(stored.not_before)
        .unwrap_or_default();
    stored.not_after - RENEW_BEFORE.min(lifetime / 3)
}

/// Loads the stored account or creates one, retrying with backoff until the ACME server
/// answers; `None` on shutdown.
async fn connect_account(
    settings: &AcmeSettings,
    control: &ControlPlane,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Account> {
    let mut delay = FIRST_BACKOFF;
    loop {
        match load_or_create_account(settings, control).await {
            Ok(account) => return Some(account),
            Err(err) => tracing::warn!(
                directory = %settings.directory,
                error = %err,
                retry_in_secs = delay.as_secs(),
                "ACME account unavailable"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

/// The cluster's account from the store; else the account an agent before the shared
/// account kept in `<state-dir>/acme/account.json` (moved into the store, then the file is
/// removed); else a new one, stored for the next holder of the role.
async fn load_or_create_account(
    settings: &AcmeSettings,
    control: &ControlPlane,
) -> Result<Account, AcmeError> {
    let builder = || match &settings.ca_file {
        Some(ca) => Account::builder_with_root(ca).map_err(protocol("reading --acme-ca-file")),
        None => Account::builder().map_err(protocol("setting up the ACME HTTP client")),
    };
    let legacy = settings.account_dir.join(LEGACY_ACCOUNT_FILE);
    let stored = match control.acme_account() {
        Some(shared) => Some(shared),
        None => read_legacy_account(&legacy)?,
    };
    if let Some(stored) = stored
        && stored.directory == settings.directory
    {
        let credentials: AccountCredentials = serde_json::from_value(stored.credentials.clone())
            .map_err(|err| AcmeError::Account(err.to_string()))?;
        let account = builder()?
            .from_credentials(credentials)
            .await
            .map_err(protocol("restoring the stored ACME account"))?;
        if control.acme_account().is_none() {
            share_account(control, stored).await?;
            let _ = fs::remove_file(&legacy);
            tracing::info!(path = %legacy.display(), "moved this node's ACME account into the cluster's store");
        }
        return Ok(account);
    }
    let contact = settings
        .email
        .as_ref()
        .map(|email| format!("mailto:{email}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await
        .map_err(protocol("creating the ACME account"))?;
    share_account(
        control,
        AcmeAccount {
            directory: settings.directory.clone(),
            credentials: serde_json::to_value(&credentials).expect("credentials serialize"),
        },
    )
    .await?;
    Ok(account)
}

/// Stores `account` as the cluster's.
async fn share_account(control: &ControlPlane, account: AcmeAccount) -> Result<(), AcmeError> {
    control
        .put_acme_account(account)
        .await
        .map_err(|err| AcmeError::Account(err.to_string()))
}

/// The account file an agent before the shared account wrote (`{directory, credentials}`),
/// if any.
fn read_legacy_account(path: &Path) -> Result<Option<AcmeAccount>, AcmeError> {
    match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(stored) => Ok(Some(stored)),
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "ignoring unreadable ACME account file");
                Ok(None)
            }
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AcmeError::AccountFile {
            op: "reading",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Orders, validates and stores a certificate for `host`; returns its expiry (RFC 3339).
async fn issue(
    account: &Account,
    host: &str,
    control: &Arc<ControlPlane>,
    certs: &CertStore,
) -> Result<String, AcmeError> {
    tracing::info!(host, "ordering an ACME certificate");
    let mut published = Published {
        control: Arc::clone(control),
        tokens: Vec::new(),
    };
    let ordered = order(account, host, &mut published).await;
    published.withdraw().await;
    let (cert_pem, key_pem) = ordered?;
    let host = Host::parse(host).map_err(|e| AcmeError::Invalid {
        host: host.to_owned(),
        reason: e.to_string(),
    })?;
    let stored = certs
        .put(&host, cert_pem, key_pem, CertSource::Acme)
        .await?;
    Ok(stored.not_after)
}

/// Runs the order for `host` up to the issued chain and its key (both PEM), publishing its
/// challenges in `published`.
async fn order(
    account: &Account,
    host: &str,
    published: &mut Published,
) -> Result<(String, String), AcmeError> {
    let identifiers = [Identifier::Dns(host.to_owned())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(protocol("creating the ACME order"))?;
    {
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization =
                authorization.map_err(protocol("fetching the ACME authorization"))?;
            match authorization.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Invalid {
                        host: host.to_owned(),
                        reason: format!("authorization is {other:?}"),
                    });
                }
            }
            let mut challenge =
                authorization
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| AcmeError::NoHttp01 {
                        host: host.to_owned(),
                    })?;
            published
                .publish(&challenge.token, challenge.key_authorization().as_str())
                .await?;
            tokio::time::sleep(CHALLENGE_SETTLE).await;
            challenge
                .set_ready()
                .await
                .map_err(protocol("telling the ACME server the challenge is ready"))?;
        }
    }
    let status = order
        .poll_ready(&ORDER_POLL)
        .await
        .map_err(protocol("waiting for the ACME validation"))?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Invalid {
            host: host.to_owned(),
            reason: challenge_problems(&mut order)
                .await
                .unwrap_or_else(|| format!("order is {status:?}")),
        });
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(protocol("finalizing the ACME order"))?;
    let cert_pem = order
        .poll_certificate(&ORDER_POLL)
        .await
        .map_err(protocol("downloading the ACME certificate"))?;
    Ok((cert_pem, key_pem))
}

/// The challenges an order published in the shared state. [`Published::withdraw`] removes
/// them when the order is over; an order cut short (shutdown) has them removed by a task
/// spawned on drop. Either way they also vanish with this node's lease.
struct Published {
    control: Arc<ControlPlane>,
    tokens: Vec<String>,
}

impl Published {
    /// Publishes `token` for every node's ingress.
    async fn publish(&mut self, token: &str, key_authorization: &str) -> Result<(), ControlError> {
        // Kept before the write: a commit whose answer was lost is withdrawn too.
        self.tokens.push(token.to_owned());
        self.control
            .publish_challenge(token, key_authorization)
            .await
    }

    /// Withdraws every published token (a failure is logged: the lease ends it later).
    async fn withdraw(&mut self) {
        for token in std::mem::take(&mut self.tokens) {
            if let Err(err) = self.control.withdraw_challenge(&token).await {
                tracing::warn!(token, error = %err, "withdrawing an ACME challenge failed");
            }
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        if self.tokens.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = Self {
            control: Arc::clone(&self.control),
            tokens: std::mem::take(&mut self.tokens),
        };
        runtime.spawn(async move { rest.withdraw().await });
    }
}

/// The servers' explanations of failed challenges of an order, if it gave any.
async fn challenge_problems(order: &mut instant_acme::Order) -> Option<String> {
    let mut problems = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if authorization.refresh().await.is_err() {
            continue;
        }
        problems.extend(
            authorization
                .challenges
                .iter()
                .filter_map(|c| c.error.as_ref().map(ToString::to_string)),
        );
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn plane(store: &crate::store::SqliteStore, node: &str) -> Arc<ControlPlane> {
        Arc::new(
            ControlPlane::open(
                Arc::new(store.clone()),
                crate::control::ControlSettings {
                    validation: crate::config::ValidationContext::default(),
                    port_range: 20000..=20999,
                    node: node.into(),
                    lease_ttl: Duration::from_secs(10),
                },
            )
            .await
            .unwrap(),
        )
    }

    /// Waits up to 5 s for `node` to see `token`'s challenge as `expected`.
    async fn sees(node: &ControlPlane, token: &str, expected: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while node.challenge(token).as_deref() != expected {
            assert!(Instant::now() < deadline, "{token}: never {expected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn challenges_reach_every_node_and_are_withdrawn_when_the_order_ends() {
        let dir =
            std::env::temp_dir().join(format!("miren-acme-challenges-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = crate::store::SqliteStore::open(&dir, "n1").unwrap();
        let (orderer, other) = (plane(&store, "n1").await, plane(&store, "n2").await);
        let mut published = Published {
            control: Arc::clone(&orderer),
            tokens: Vec::new(),
        };
        published.publish("tok", "tok.thumb").await.unwrap();
        sees(&other, "tok", Some("tok.thumb")).await;
        assert_eq!(other.challenge("other"), None);
        published.withdraw().await;
        sees(&other, "tok", None).await;

        // An order cut short: dropping its challenges withdraws them.
        let mut cut = Published {
            control: Arc::clone(&orderer),
            tokens: Vec::new(),
        };
        cut.publish("cut", "cut.thumb").await.unwrap();
        sees(&other, "cut", Some("cut.thumb")).await;
        drop(cut);
        sees(&other, "cut", None).await;
        drop((orderer, other, store));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn renewal_is_30_days_or_a_third_of_the_lifetime() {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let long = StoredCert {
            source: CertSource::Acme,
            not_before: now,
            not_after: now + 90 * day,
        };
        assert_eq!(renewal_time(&long), now + 60 * day);
        let year = StoredCert {
            not_after: now + 365 * day,
            ..long
        };
        assert_eq!(renewal_time(&year), now + 335 * day);
        let short = StoredCert {
            not_after: now + 6 * day,
            ..long
        };
        assert_eq!(renewal_time(&short), now + 4 * day);
    }

    #[test]
    fn orders_count_as_issued_invalid_or_failed() {
        let invalid: Result<(), AcmeError> = Err(AcmeError::Invalid {
            host: "a.example.com".into(),
            reason: "connection refused".into(),
        });
        let failed: Result<(), AcmeError> = Err(AcmeError::Account("unreadable".into()));
        assert_eq!(outcome(&Ok::<_, AcmeError>(())), AcmeOutcome::Issued);
        assert_eq!(outcome(&invalid), AcmeOutcome::Invalid);
        assert_eq!(outcome(&failed), AcmeOutcome::Failed);
    }
}
