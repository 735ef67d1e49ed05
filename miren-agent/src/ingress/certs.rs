//! The certificate store behind the HTTPS listener.
//!
//! The certificates are those of the shared state (`certs/HOST` records,
//! [`ControlPlane::certs`]): one set for the whole cluster, so every node's ingress serves the
//! same ones. [`CertStore::follow`] rebuilds the SNI table after every change of the state;
//! a record that does not validate is logged (once) and skipped. [`CertStore::put`] validates
//! a pair completely before it is stored ([`ControlPlane::put_cert`]) and swaps it in on this
//! node before it returns, so the next handshake here sees it.
//!
//! [`CertStore::resolver`] picks a certificate by SNI on every handshake: the exact host, then
//! the one-label wildcard `*.parent`, then a self-signed fallback generated at
//! [`CertStore::open`], so clients with an unknown or missing SNI still complete the handshake
//! and get the ingress's 404. A lookup is one atomic load and at most two hash lookups.
//!
//! Agents before the shared state kept certificates as files in `<state-dir>/certs`
//! (`HOST.crt`, `HOST.key`, `HOST.json` with the source; wildcards as `_wildcard.PARENT.*`).
//! [`CertStore::open`] imports those the store lacks once, then renames the directory to
//! `certs.imported-UNIXTIME`; files are no longer read or written after that.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use rustls::{
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    control::{ControlError, ControlPlane},
    metrics::Metrics,
    routes::{Host, RouteTable},
    store::records::CertRecord,
};

/// The name in the self-signed certificate served for unknown SNI.
const FALLBACK_NAME: &str = "unknown-host.miren.invalid";

/// Where a stored certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// Given by an operator (`miren cert set`); never replaced automatically.
    User,
    /// Issued by the ACME client and renewed by it.
    Acme,
}

impl CertSource {
    /// The name stored in [`CertRecord::source`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Acme => "acme",
        }
    }

    /// The source named `name` in a [`CertRecord`].
    fn parse(name: &str) -> Option<Self> {
        [Self::User, Self::Acme]
            .into_iter()
            .find(|source| source.as_str() == name)
    }
}

impl fmt::Display for CertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `miren cert list` shows of a stored certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// The host it is stored for (`*.domain` for a wildcard).
    pub host: String,
    /// Who provided it.
    pub source: CertSource,
    /// Expiry of the leaf certificate, RFC 3339 (UTC).
    pub not_after: String,
    /// DNS names of the leaf certificate.
    pub sans: Vec<String>,
}

/// Which input of [`CertStore::put`] an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertPart {
    /// The certificate chain PEM.
    Certificate,
    /// The private key PEM.
    Key,
}

/// Errors of the certificate store.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A certificate file of an earlier agent could not be read, or its directory renamed.
    #[error("{op} {path}: {source}; check that the agent can write its state directory")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The certificate PEM holds no certificate or cannot be decoded.
    #[error(
        "no certificate for {host} could be read from the PEM ({reason}); pass a PEM file with one or more -----BEGIN CERTIFICATE----- blocks, leaf first"
    )]
    CertificatePem {
        /// Host the certificate was for.
        host: String,
        /// What the PEM decoder said.
        reason: String,
    },
    /// The leaf certificate is not valid X.509.
    #[error("the certificate for {host} is not a valid X.509 certificate ({reason})")]
    CertificateParse {
        /// Host the certificate was for.
        host: String,
        /// What the parser said.
        reason: String,
    },
    /// The key PEM holds no private key or cannot be decoded.
    #[error(
        "no private key for {host} could be read from the PEM ({reason}); pass a PEM file with a -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY block"
    )]
    KeyPem {
        /// Host the key was for.
        host: String,
        /// What the PEM decoder said.
        reason: String,
    },
    /// The key type is not supported by rustls' ring provider.
    #[error(
        "the private key for {host} is not usable ({reason}); use an RSA (2048+ bits), ECDSA P-256/P-384 or Ed25519 key"
    )]
    UnsupportedKey {
        /// Host the key was for.
        host: String,
        /// What rustls said.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error(
        "the private key does not match the certificate for {host}; pass the key the certificate was issued for"
    )]
    KeyMismatch {
        /// Host of the pair.
        host: String,
    },
    /// The certificate's names do not include the host.
    #[error(
        "the certificate does not cover {host}: its DNS names are [{}]; use a certificate issued for {host} (or for *.{{parent}})",
        sans.join(", ")
    )]
    NotCovered {
        /// Host the certificate was given for.
        host: String,
        /// The leaf's DNS names.
        sans: Vec<String>,
    },
    /// The certificate has expired.
    #[error("the certificate for {host} expired at {not_after}; renew it first")]
    Expired {
        /// Host of the certificate.
        host: String,
        /// Its expiry, RFC 3339.
        not_after: String,
    },
    /// The certificate is not valid yet.
    #[error(
        "the certificate for {host} is not valid before {not_before}; check the clock or wait until then"
    )]
    NotYetValid {
        /// Host of the certificate.
        host: String,
        /// Its start of validity, RFC 3339.
        not_before: String,
    },
    /// A stored record names a host that is not a valid route host.
    #[error("the stored certificate record for {host:?} does not name a valid host ({reason})")]
    InvalidHost {
        /// The host as stored.
        host: String,
        /// Why it is not a host.
        reason: String,
    },
    /// A stored record names a source other than `user` and `acme`.
    #[error(
        "the stored certificate for {host} has an unknown source {source_name:?} (expected user or acme)"
    )]
    UnknownSource {
        /// Host of the certificate.
        host: String,
        /// The source as stored.
        source_name: String,
    },
    /// An automatic certificate would replace one the operator provided.
    #[error(
        "{host} has a certificate set by the operator; automatic certificates never replace it"
    )]
    UserCertificatePresent {
        /// Host of the certificate.
        host: String,
    },
    /// The shared state refused or failed to store the certificate.
    #[error("storing the certificate for {host}: {source}")]
    Store {
        /// Host of the certificate.
        host: String,
        /// What the control plane said.
        #[source]
        source: ControlError,
    },
    /// The self-signed fallback certificate could not be generated.
    #[error("generating the self-signed fallback certificate: {0}")]
    Fallback(String),
}

impl CertError {
    /// Which input of [`CertStore::put`] the error is about, if one: lets callers name the file.
    pub fn part(&self) -> Option<CertPart> {
        match self {
            Self::CertificatePem { .. }
            | Self::CertificateParse { .. }
            | Self::NotCovered { .. }
            | Self::Expired { .. }
            | Self::NotYetValid { .. } => Some(CertPart::Certificate),
            Self::KeyPem { .. } | Self::UnsupportedKey { .. } | Self::KeyMismatch { .. } => {
                Some(CertPart::Key)
            }
            Self::Io { .. }
            | Self::InvalidHost { .. }
            | Self::UnknownSource { .. }
            | Self::UserCertificatePresent { .. }
            | Self::Store { .. }
            | Self::Fallback(_) => None,
        }
    }
}

/// Source and validity period of a stored certificate (for ACME renewal decisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredCert {
    /// Who provided it.
    pub source: CertSource,
    /// Start of validity of the leaf.
    pub not_before: SystemTime,
    /// Expiry of the leaf.
    pub not_after: SystemTime,
}

/// A stored certificate, ready for handshakes.
#[derive(Debug)]
struct Entry {
    key: Arc<CertifiedKey>,
    info: CertInfo,
    stored: StoredCert,
    /// The record it was built from: an unchanged record is not parsed again.
    record: CertRecord,
}

/// Stored certificates by host (exact, then the one-label wildcard), swapped as a whole on
/// every change.
type Table = RouteTable<Arc<Entry>>;

/// The certificate store: the shared state's certificates by host plus the self-signed
/// fallback.
pub struct CertStore {
    control: Arc<ControlPlane>,
    /// Where each held certificate's expiry is published.
    metrics: Arc<Metrics>,
    table: ArcSwap<Table>,
    fallback: Arc<CertifiedKey>,
    /// Held while the table is rebuilt, so an older listing never replaces a newer one; holds
    /// the records already logged as invalid (by host), so each is logged once.
    rebuild: Mutex<BTreeMap<String, CertRecord>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.table.load();
        f.debug_struct("CertStore")
            .field("certificates", &table.len())
            .finish_non_exhaustive()
    }
}

/// The source file next to a certificate of an earlier agent.
#[derive(Debug, Deserialize)]
struct Meta {
    source: CertSource,
}

impl CertStore {
    /// Imports the certificate files an earlier agent left in `legacy_dir` (see the module
    /// documentation), generates the self-signed fallback and loads the shared state's
    /// certificates. [`CertStore::follow`] keeps them current.
    ///
    /// # Errors
    /// [`CertError::Io`] when `legacy_dir` cannot be read or renamed, [`CertError::Store`]
    /// when an imported certificate cannot be stored (the files are then kept for the next
    /// start), [`CertError::Fallback`] when the fallback cannot be generated. Each held
    /// certificate's expiry is published in `metrics`.
    pub async fn open(
        legacy_dir: &Path,
        control: Arc<ControlPlane>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, CertError> {
        import_files(legacy_dir, &control).await?;
        let store = Arc::new(Self {
            control,
            metrics,
            table: ArcSwap::from_pointee(Table::default()),
            fallback: fallback_certificate()?,
            rebuild: Mutex::new(BTreeMap::new()),
        });
        store.refresh();
        Ok(store)
    }

    /// Rebuilds the table after every change of the shared state until `stop` turns true.
    pub async fn follow(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut revisions = self.control.subscribe();
        loop {
            self.refresh();
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Rebuilds the table from [`ControlPlane::certs`]: unchanged records keep their entry,
    /// new or changed ones are validated (expired ones are kept, to be listed and renewed), an
    /// invalid one is logged once and skipped.
    fn refresh(&self) {
        let mut rejected = self
            .rebuild
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let records = self.control.certs();
        let old = self.table.load();
        let mut table = Table::with_capacity(records.len());
        let mut still_rejected = BTreeMap::new();
        for record in records {
            if let Some(known) = rejected.remove(&record.host)
                && known == record
            {
                still_rejected.insert(record.host.clone(), record);
                continue;
            }
            let host = match Host::parse(&record.host) {
                Ok(host) => host,
                Err(err) => {
                    let err = CertError::InvalidHost {
                        host: record.host.clone(),
                        reason: err.to_string(),
                    };
                    tracing::error!(%err, "skipping a stored certificate");
                    still_rejected.insert(record.host.clone(), record);
                    continue;
                }
            };
            if let Some(entry) = old.get(&host).filter(|entry| entry.record == record) {
                table.insert(host, Arc::clone(entry));
                continue;
            }
            match entry_of(&host, record.clone()) {
                Ok(entry) => {
                    tracing::debug!(host = %host, source = %entry.info.source, not_after = %entry.info.not_after, "serving a stored certificate");
                    table.insert(host, Arc::new(entry));
                }
                Err(err) => {
                    tracing::error!(%err, "skipping a stored certificate that does not load");
                    still_rejected.insert(record.host.clone(), record);
                }
            }
        }
        *rejected = still_rejected;
        publish_expiry(&self.metrics, &old, &table);
        self.table.store(Arc::new(table));
    }

    /// rustls resolver: SNI exact host → `*.parent` wildcard cert → the self-signed fallback
    /// (so clients with an unknown SNI or no SNI still complete the handshake and see the 404).
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(SniResolver(Arc::clone(self)))
    }

    /// True when an unexpired user or ACME certificate covers `host` (already lowercase, no
    /// port): exact or one-label wildcard. Used for the HTTP→HTTPS 308 redirect.
    pub fn has_certificate(&self, host: &str) -> bool {
        self.table
            .load()
            .lookup(host)
            .is_some_and(|entry| entry.stored.not_after > SystemTime::now())
    }

    /// Validates the PEM pair (parses, key matches cert, cert covers host incl. wildcard SANs,
    /// valid now), stores it in the shared state for every node and serves it here before
    /// returning. Nothing changes on error.
    ///
    /// # Errors
    /// A [`CertError`] saying what is wrong with the pair ([`CertError::part`] tells which
    /// input), [`CertError::UserCertificatePresent`] when an ACME certificate would replace an
    /// operator's, or [`CertError::Store`] when the shared state cannot store it.
    pub async fn put(
        &self,
        host: &Host,
        cert_pem: String,
        key_pem: String,
        source: CertSource,
    ) -> Result<CertInfo, CertError> {
        let record = CertRecord {
            host: host.as_str().to_owned(),
            cert_pem,
            key_pem,
            source: source.as_str().to_owned(),
        };
        // Parsing keys and certificates is CPU work: off the runtime.
        let (record, info) = {
            let host = host.clone();
            tokio::task::spawn_blocking(move || {
                let entry = entry_of(&host, record)?;
                check_validity_now(host.as_str(), &entry.stored)?;
                Ok::<_, CertError>((entry.record, entry.info))
            })
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))?
        };
        // The shared state's record decides (this node's table may skip an invalid one).
        if source == CertSource::Acme
            && self.control.certs().iter().any(|stored| {
                stored.host == record.host && stored.source == CertSource::User.as_str()
            })
        {
            return Err(CertError::UserCertificatePresent { host: record.host });
        }
        self.control
            .put_cert(record)
            .await
            .map_err(|source| CertError::Store {
                host: info.host.clone(),
                source,
            })?;
        self.refresh();
        tracing::info!(host = %info.host, %source, not_after = %info.not_after, "certificate stored");
        Ok(info)
    }

    /// Every stored certificate that validates, sorted by host.
    pub fn list(&self) -> Vec<CertInfo> {
        let table = self.table.load();
        let mut all: Vec<CertInfo> = table.iter().map(|(_, entry)| entry.info.clone()).collect();
        all.sort_by(|a, b| a.host.cmp(&b.host));
        all
    }

    /// Source and validity period of the certificate a handshake for `host` gets (exact, then
    /// one-label wildcard; expired ones included), `None` when only the fallback would be
    /// served.
    pub fn covering(&self, host: &str) -> Option<StoredCert> {
        self.table.load().lookup(host).map(|entry| entry.stored)
    }
}

/// Sets `miren_cert_expiry_timestamp_seconds` for every certificate of `new`, and removes the
/// series of those of `old` that `new` no longer holds.
fn publish_expiry(metrics: &Metrics, old: &Table, new: &Table) {
    for (_, entry) in new.iter() {
        metrics.set_cert_expiry(&entry.info.host, unix_seconds(entry.stored.not_after));
    }
    for (host, entry) in old.iter() {
        if new.get(host).is_none() {
            metrics.remove_cert_expiry(&entry.info.host);
        }
    }
}

/// The rustls side of [`CertStore`].
#[derive(Debug)]
struct SniResolver(Arc<CertStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = &self.0;
        let found = client_hello
            .server_name()
            .and_then(|name| Some(Arc::clone(&store.table.load().lookup(name)?.key)));
        Some(found.unwrap_or_else(|| Arc::clone(&store.fallback)))
    }
}

/// Imports the certificates of an earlier agent's `dir` that the shared state lacks (source
/// kept; a pair that does not load is logged and left out), then renames `dir` to
/// `<dir>.imported-UNIXTIME` so it is imported once. Nothing to do when `dir` does not exist.
async fn import_files(dir: &Path, control: &ControlPlane) -> Result<(), CertError> {
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io { op, path, source }
    };
    let items = match fs::read_dir(dir) {
        Ok(items) => items,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io("listing the certificate directory", dir)(err)),
    };
    let stored: Vec<String> = control.certs().into_iter().map(|c| c.host).collect();
    for item in items {
        let path = item
            .map_err(io("listing the certificate directory", dir))?
            .path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".crt"))
            .filter(|n| !n.starts_with('.'))
        else {
            continue;
        };
        let name = match stem.strip_prefix("_wildcard.") {
            Some(parent) => format!("*.{parent}"),
            None => stem.to_owned(),
        };
        let Ok(host) = Host::parse(&name) else {
            tracing::error!(file = %path.display(), "not importing a certificate file not named after a host");
            continue;
        };
        if stored.iter().any(|h| h == host.as_str()) {
            tracing::info!(host = %host, "not importing the certificate file: the shared state has one");
            continue;
        }
        let record = match read_files(dir, stem, &host) {
            Ok(record) => record,
            Err(err) => {
                tracing::error!(file = %path.display(), %err, "not importing a certificate file that does not load");
                continue;
            }
        };
        let source = record.source.clone();
        control
            .put_cert(record)
            .await
            .map_err(|source| CertError::Store {
                host: host.as_str().to_owned(),
                source,
            })?;
        tracing::info!(host = %host, source, "imported a certificate file into the shared state");
    }
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // A name not taken yet (an earlier import in the same second).
    let imported = (0..)
        .map(|n| {
            let mut name = dir.as_os_str().to_owned();
            name.push(format!(".imported-{unix}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            PathBuf::from(name)
        })
        .find(|path| !path.exists())
        .expect("an unused name");
    fs::rename(dir, &imported).map_err(io("renaming the imported certificate directory", dir))?;
    tracing::info!(
        from = %dir.display(),
        to = %imported.display(),
        "certificate files imported; the shared state holds the certificates now (the old files may be deleted)"
    );
    Ok(())
}

/// The record of an earlier agent's files `STEM.crt`, `STEM.key`, `STEM.json` (no JSON:
/// `user`), validated (expired ones included).
fn read_files(dir: &Path, stem: &str, host: &Host) -> Result<CertRecord, CertError> {
    let read = |ext: &str| {
        let path = dir.join(format!("{stem}.{ext}"));
        fs::read_to_string(&path).map_err(|source| CertError::Io {
            op: "reading",
            path,
            source,
        })
    };
    let source = read("json")
        .ok()
        .and_then(|json| serde_json::from_str::<Meta>(&json).ok())
        .map_or(CertSource::User, |meta| meta.source);
    let record = CertRecord {
        host: host.as_str().to_owned(),
        cert_pem: read("crt")?,
        key_pem: read("key")?,
        source: source.as_str().to_owned(),
    };
    Ok(entry_of(host, record)?.record)
}

/// Validates a stored record for `host` (everything but the validity period).
fn entry_of(host: &Host, record: CertRecord) -> Result<Entry, CertError> {
    let source = CertSource::parse(&record.source).ok_or_else(|| CertError::UnknownSource {
        host: record.host.clone(),
        source_name: record.source.clone(),
    })?;
    let (key, info, stored) = validate(
        host.as_str(),
        record.cert_pem.as_bytes(),
        record.key_pem.as_bytes(),
        source,
    )?;
    Ok(Entry {
        key,
        info,
        stored,
        record,
    })
}

/// Parses and checks a PEM pair for `host` (everything but the validity period).
fn validate(
    host: &str,
    cert_pem: &[u8],
    key_pem: &[u8],
    source: CertSource,
) -> Result<(Arc<CertifiedKey>, CertInfo, StoredCert), CertError> {
    let owned = || host.to_owned();
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::CertificatePem {
            host: owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::CertificatePem {
            host: owned(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    let leaf = Leaf::parse(host, &chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::KeyPem {
        host: owned(),
        reason: e.to_string(),
    })?;
    let signing_key = any_supported_type(&key).map_err(|e| CertError::UnsupportedKey {
        host: owned(),
        reason: e.to_string(),
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch { host: owned() });
        }
        Err(e) => {
            return Err(CertError::UnsupportedKey {
                host: owned(),
                reason: e.to_string(),
            });
        }
    }
    if !leaf.sans.iter().any(|san| covers(san, host)) {
        return Err(CertError::NotCovered {
            host: owned(),
            sans: leaf.sans,
        });
    }
    let info = CertInfo {
        host: owned(),
        source,
        not_after: rfc3339(leaf.not_after),
        sans: leaf.sans,
    };
    let stored = StoredCert {
        source,
        not_before: leaf.not_before,
        not_after: leaf.not_after,
    };
    Ok((Arc::new(certified), info, stored))
}

/// Refuses a certificate outside its validity period.
fn check_validity_now(host: &str, stored: &StoredCert) -> Result<(), CertError> {
    let now = SystemTime::now();
    if stored.not_after <= now {
        return Err(CertError::Expired {
            host: host.to_owned(),
            not_after: rfc3339(stored.not_after),
        });
    }
    if stored.not_before > now {
        return Err(CertError::NotYetValid {
            host: host.to_owned(),
            not_before: rfc3339(stored.not_before),
        });
    }
    Ok(())
}

/// The fields of a leaf certificate the store needs.
struct Leaf {
    sans: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Leaf {
    fn parse(host: &str, der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let invalid = |reason: String| CertError::CertificateParse {
            host: host.to_owned(),
            reason,
        };
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| invalid(e.to_string()))?;
        let sans = match cert
            .subject_alternative_name()
            .map_err(|e| invalid(e.to_string()))?
        {
            Some(ext) => ext
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        Some(dns.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        let validity = cert.validity();
        Ok(Self {
            sans,
            not_before: system_time(validity.not_before.timestamp()),
            not_after: system_time(validity.not_after.timestamp()),
        })
    }
}

/// True when the certificate name `san` is valid for `host`: equal, or a one-label wildcard
/// over an exact host. A wildcard host needs the same wildcard name.
fn covers(san: &str, host: &str) -> bool {
    if san == host {
        return true;
    }
    match (san.strip_prefix("*."), host.split_once('.')) {
        (Some(parent), Some((label, rest))) => label != "*" && !label.is_empty() && rest == parent,
        _ => false,
    }
}

fn system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}

/// Whole seconds from the Unix epoch to `at` (negative before it).
fn unix_seconds(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 in UTC, e.g. `2026-05-01T12:00:00Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let unix = unix_seconds(at);
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

/// A fresh self-signed certificate for clients whose SNI matches nothing.
fn fallback_certificate() -> Result<Arc<CertifiedKey>, CertError> {
    let generated = rcgen::generate_simple_self_signed(vec![FALLBACK_NAME.to_owned()])
        .map_err(|e| CertError::Fallback(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let signing_key = any_supported_type(&key).map_err(|e| CertError::Fallback(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![generated.cert.der().clone()],
        signing_key,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::ValidationContext,
        control::ControlSettings,
        store::{SqliteStore, Store},
    };

    /// A self-signed certificate for `names` valid from `from` to `until` (days from now).
    fn generate(names: &[&str], from: i64, until: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(until);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn valid(names: &[&str]) -> (String, String) {
        generate(names, -1, 90)
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "miren-certs-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The shared state of a test: SQLite in `dir/store`.
    fn sqlite(dir: &TempDir) -> SqliteStore {
        SqliteStore::open(&dir.0.join("store"), "n1").unwrap()
    }

    /// The control plane and certificate store of node `node` on `store`; `dir/certs` is the
    /// earlier agent's directory.
    async fn node(
        dir: &TempDir,
        store: &SqliteStore,
        node: &str,
    ) -> (Arc<ControlPlane>, Arc<CertStore>) {
        let control = Arc::new(
            ControlPlane::open(
                Arc::new(store.clone()) as Arc<dyn Store>,
                ControlSettings {
                    validation: ValidationContext::default(),
                    port_range: 20000..=20999,
                    node: node.into(),
                    lease_ttl: Duration::from_secs(10),
                },
            )
            .await
            .unwrap(),
        );
        let metrics = Arc::new(crate::metrics::Metrics::new("none").unwrap());
        let certs = CertStore::open(&dir.0.join("certs"), Arc::clone(&control), metrics)
            .await
            .unwrap();
        (control, certs)
    }

    fn host(name: &str) -> Host {
        Host::parse(name).unwrap()
    }

    async fn set(
        store: &CertStore,
        name: &str,
        pair: &(String, String),
    ) -> Result<CertInfo, CertError> {
        store
            .put(
                &host(name),
                pair.0.clone(),
                pair.1.clone(),
                CertSource::User,
            )
            .await
    }

    /// The leaf's first DNS name the store would hand to a client sending `sni`.
    fn served(store: &CertStore, sni: Option<&str>) -> String {
        let table = store.table.load();
        let key = sni
            .and_then(|name| table.lookup(name))
            .map_or_else(|| Arc::clone(&store.fallback), |e| Arc::clone(&e.key));
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        let ext = cert.subject_alternative_name().unwrap().unwrap();
        match &ext.value.general_names[0] {
            x509_parser::extensions::GeneralName::DNSName(name) => (*name).to_owned(),
            other => panic!("unexpected name {other:?}"),
        }
    }

    #[tokio::test]
    async fn exact_then_wildcard_then_fallback() {
        let dir = TempDir::new("select");
        let (_control, store) = node(&dir, &sqlite(&dir), "n1").await;
        set(&store, "app.example.com", &valid(&["app.example.com"]))
            .await
            .unwrap();
        set(&store, "*.example.com", &valid(&["*.example.com"]))
            .await
            .unwrap();
        assert_eq!(served(&store, Some("app.example.com")), "app.example.com");
        assert_eq!(served(&store, Some("other.example.com")), "*.example.com");
        // A wildcard covers one label only and never the bare domain.
        assert_eq!(served(&store, Some("a.b.example.com")), FALLBACK_NAME);
        assert_eq!(served(&store, Some("example.com")), FALLBACK_NAME);
        assert_eq!(served(&store, None), FALLBACK_NAME);
        assert!(store.has_certificate("app.example.com"));
        assert!(store.has_certificate("x.example.com"));
        assert!(!store.has_certificate("example.com"));
        assert!(!store.has_certificate("a.b.example.com"));
        let hosts: Vec<_> = store.list().into_iter().map(|i| i.host).collect();
        assert_eq!(hosts, ["*.example.com", "app.example.com"]);
    }

    #[tokio::test]
    async fn every_held_certificate_has_an_expiry_series_until_it_is_removed() {
        let dir = TempDir::new("expiry-metric");
        let (control, store) = node(&dir, &sqlite(&dir), "n1").await;
        let name = "expiry-metric.example.com";
        set(&store, name, &valid(&[name])).await.unwrap();
        let not_after = store.covering(name).unwrap().not_after;
        let unix = not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let line = format!("miren_cert_expiry_timestamp_seconds{{host=\"{name}\"}} {unix}");
        let scrape = || store.metrics.render(None, &[]).unwrap();
        let text = scrape();
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        control.remove_cert(name).await.unwrap();
        store.refresh();
        let text = scrape();
        assert!(!text.contains(name), "{text}");
    }

    #[tokio::test]
    async fn a_wildcard_certificate_covers_an_exact_host() {
        let dir = TempDir::new("wildcard-san");
        let (_control, store) = node(&dir, &sqlite(&dir), "n1").await;
        let info = set(&store, "shop.example.org", &valid(&["*.example.org"]))
            .await
            .unwrap();
        assert_eq!(info.sans, ["*.example.org"]);
        assert_eq!(info.source, CertSource::User);
        assert!(store.has_certificate("shop.example.org"));
        assert!(!store.has_certificate("blog.example.org"));
    }

    #[tokio::test]
    async fn invalid_pairs_are_refused_and_change_nothing() {
        let dir = TempDir::new("refuse");
        let (control, store) = node(&dir, &sqlite(&dir), "n1").await;
        let good = valid(&["a.example.com"]);
        let other = valid(&["a.example.com"]);
        let err = set(&store, "a.example.com", &(good.0.clone(), other.1))
            .await
            .unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        assert_eq!(err.part(), Some(CertPart::Key));

        let err = set(&store, "b.example.com", &good).await.unwrap_err();
        assert!(matches!(err, CertError::NotCovered { .. }), "{err}");
        assert!(err.to_string().contains("a.example.com"), "{err}");
        let err = set(&store, "*.example.com", &valid(&["a.example.com"]))
            .await
            .unwrap_err();
        assert!(matches!(err, CertError::NotCovered { .. }), "{err}");

        let expired = generate(&["a.example.com"], -30, -1);
        let err = set(&store, "a.example.com", &expired).await.unwrap_err();
        assert!(matches!(err, CertError::Expired { .. }), "{err}");
        let early = generate(&["a.example.com"], 2, 30);
        let err = set(&store, "a.example.com", &early).await.unwrap_err();
        assert!(matches!(err, CertError::NotYetValid { .. }), "{err}");

        let err = set(&store, "a.example.com", &("junk".into(), good.1.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.part(), Some(CertPart::Certificate), "{err}");
        let err = set(&store, "a.example.com", &(good.0.clone(), "junk".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, CertError::KeyPem { .. }), "{err}");

        assert!(store.list().is_empty());
        assert!(!store.has_certificate("a.example.com"));
        assert!(control.certs().is_empty(), "nothing stored");
    }

    #[tokio::test]
    async fn acme_never_replaces_a_user_certificate() {
        let dir = TempDir::new("acme-user");
        let (control, store) = node(&dir, &sqlite(&dir), "n1").await;
        let pair = valid(&["a.example.com"]);
        set(&store, "a.example.com", &pair).await.unwrap();
        let err = store
            .put(&host("a.example.com"), pair.0, pair.1, CertSource::Acme)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CertError::UserCertificatePresent { .. }),
            "{err}"
        );
        assert_eq!(store.list()[0].source, CertSource::User);
        assert_eq!(control.certs()[0].source, "user");
    }

    #[tokio::test]
    async fn every_node_serves_the_shared_certificates_and_skips_invalid_records() {
        let dir = TempDir::new("shared");
        let shared = sqlite(&dir);
        let (_one, first) = node(&dir, &shared, "n1").await;
        let (two, second) = node(&dir, &shared, "n2").await;
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(Arc::clone(&second).follow(stop));

        set(&first, "a.example.com", &valid(&["a.example.com"]))
            .await
            .unwrap();
        // Written by another node with no validation: skipped, the rest still served.
        let (cert_pem, _) = valid(&["bad.example.com"]);
        two.put_cert(CertRecord {
            host: "bad.example.com".into(),
            cert_pem,
            key_pem: "junk".into(),
            source: "acme".into(),
        })
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !second.has_certificate("a.example.com") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node 2 never served it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(served(&second, Some("a.example.com")), "a.example.com");
        assert_eq!(served(&second, Some("bad.example.com")), FALLBACK_NAME);
        let hosts: Vec<_> = second.list().into_iter().map(|i| i.host).collect();
        assert_eq!(hosts, ["a.example.com"]);
        stop_tx.send(true).unwrap();
    }

    #[tokio::test]
    async fn files_of_an_earlier_agent_are_imported_once() {
        let dir = TempDir::new("import");
        let legacy = dir.0.join("certs");
        fs::create_dir_all(&legacy).unwrap();
        let write = |stem: &str, pair: &(String, String), meta: Option<&str>| {
            fs::write(legacy.join(format!("{stem}.crt")), &pair.0).unwrap();
            fs::write(legacy.join(format!("{stem}.key")), &pair.1).unwrap();
            if let Some(meta) = meta {
                fs::write(legacy.join(format!("{stem}.json")), meta).unwrap();
            }
        };
        write(
            "a.example.com",
            &valid(&["a.example.com"]),
            Some(r#"{"source":"user"}"#),
        );
        write(
            "_wildcard.example.net",
            &valid(&["*.example.net"]),
            Some(r#"{"source":"acme"}"#),
        );
        // No metadata: an operator's; expired: imported all the same (to be renewed).
        write(
            "old.example.org",
            &generate(&["old.example.org"], -30, -1),
            None,
        );
        write("broken.example.org", &("junk".into(), "junk".into()), None);
        fs::write(legacy.join(".a.example.com.key.tmp"), "partial").unwrap();

        let (control, store) = node(&dir, &sqlite(&dir), "n1").await;
        let listed: Vec<_> = store
            .list()
            .into_iter()
            .map(|i| (i.host, i.source))
            .collect();
        assert_eq!(
            listed,
            [
                ("*.example.net".to_owned(), CertSource::Acme),
                ("a.example.com".to_owned(), CertSource::User),
                ("old.example.org".to_owned(), CertSource::User),
            ]
        );
        assert_eq!(control.certs().len(), 3);
        assert!(!legacy.exists(), "the directory is renamed");
        let renamed: Vec<PathBuf> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("certs.imported-"))
            .collect();
        assert_eq!(renamed.len(), 1, "{renamed:?}");
        assert!(
            renamed[0].join("broken.example.org.crt").exists(),
            "files are left as they were"
        );
        drop((control, store));

        // Files that reappear do not replace what the shared state holds.
        fs::create_dir_all(&legacy).unwrap();
        write(
            "a.example.com",
            &valid(&["a.example.com", "www.a.example.com"]),
            Some(r#"{"source":"user"}"#),
        );
        let (_control, store) = node(&dir, &sqlite(&dir), "n1").await;
        let a = store
            .list()
            .into_iter()
            .find(|i| i.host == "a.example.com")
            .unwrap();
        assert_eq!(a.sans, ["a.example.com"]);
    }

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02T00:00:00Z"
        );
    }
}
