//! The certificate store behind the HTTPS listener.
//!
//! Certificates are PEM files under the agent's `<state-dir>/certs`: `<host>.crt` (the chain,
//! leaf first), `<host>.key` (mode 0600) and `<host>.json` (where it came from), wildcards as
//! `_wildcard.<parent>.*`. [`CertStore::set`] validates a pair completely before anything is
//! written, writes each file to a temporary name and renames it into place, then swaps the
//! in-memory table so the next handshake sees the new certificate without a restart.
//!
//! [`CertStore::resolver`] picks a certificate by SNI on every handshake: the exact host, then
//! the one-label wildcard `*.parent`, then a self-signed fallback generated at
//! [`CertStore::open`], so clients with an unknown or missing SNI still complete the handshake
//! and get the ingress's 404. A lookup is one atomic load and at most two hash lookups.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
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

use crate::routes::{Host, RouteTable};

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

impl fmt::Display for CertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::User => "user",
            Self::Acme => "acme",
        })
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

/// Which input of [`CertStore::set`] an error is about.
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
    /// The certificate directory or a file in it could not be created, read or written.
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
    /// An automatic certificate would replace one the operator provided.
    #[error(
        "{host} has a certificate set by the operator; automatic certificates never replace it"
    )]
    UserCertificatePresent {
        /// Host of the certificate.
        host: String,
    },
    /// The self-signed fallback certificate could not be generated.
    #[error("generating the self-signed fallback certificate: {0}")]
    Fallback(String),
}

impl CertError {
    /// Which input of [`CertStore::set`] the error is about, if one: lets callers name the file.
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
            Self::Io { .. } | Self::UserCertificatePresent { .. } | Self::Fallback(_) => None,
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
}

/// Stored certificates by host (exact, then the one-label wildcard), swapped as a whole on
/// every change.
type Table = RouteTable<Arc<Entry>>;

/// The certificate store: stored certificates by host plus the self-signed fallback.
pub struct CertStore {
    dir: PathBuf,
    table: ArcSwap<Table>,
    fallback: Arc<CertifiedKey>,
    /// Serializes writers so two `set`s of one host cannot interleave their renames.
    writer: Mutex<()>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.table.load();
        f.debug_struct("CertStore")
            .field("dir", &self.dir)
            .field("certificates", &table.len())
            .finish_non_exhaustive()
    }
}

/// Stored metadata next to a certificate.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    source: CertSource,
}

impl CertStore {
    /// Loads every stored certificate from `dir` (created if missing, mode 0700; keys written
    /// 0600) and generates the self-signed fallback. A stored pair that no longer loads is
    /// skipped with an error logged, so one bad file does not stop the agent.
    ///
    /// # Errors
    /// [`CertError::Io`] when the directory cannot be created or listed,
    /// [`CertError::Fallback`] when the fallback cannot be generated.
    pub fn open(dir: &Path) -> Result<Arc<Self>, CertError> {
        let io = |op| {
            move |source| CertError::Io {
                op,
                path: dir.to_owned(),
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io("creating the certificate directory"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io("restricting the certificate directory"))?;
        let mut table = Table::default();
        for item in fs::read_dir(dir).map_err(io("listing the certificate directory"))? {
            let path = item
                .map_err(io("listing the certificate directory"))?
                .path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".crt"))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            let host = host_of_stem(stem);
            let Ok(key) = Host::parse(&host) else {
                tracing::error!(host, "skipping a stored certificate not named after a host");
                continue;
            };
            match load_entry(dir, &host) {
                Ok(entry) => {
                    table.insert(key, Arc::new(entry));
                }
                Err(err) => {
                    tracing::error!(host, %err, "skipping a stored certificate that does not load")
                }
            }
        }
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            table: ArcSwap::from_pointee(table),
            fallback: fallback_certificate()?,
            writer: Mutex::new(()),
        }))
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
    /// not expired) and stores it atomically (write temp + rename), then swaps it in for the
    /// next handshake. Nothing changes on error.
    ///
    /// # Errors
    /// A [`CertError`] saying what is wrong with the pair ([`CertError::part`] tells which
    /// input), [`CertError::UserCertificatePresent`] when an ACME certificate would replace an
    /// operator's, or [`CertError::Io`] when it cannot be written.
    pub fn set(
        &self,
        host: &Host,
        cert_pem: &[u8],
        key_pem: &[u8],
        source: CertSource,
    ) -> Result<CertInfo, CertError> {
        let key = host;
        let host = host.as_str();
        let entry = validate(host, cert_pem, key_pem, source)?;
        check_validity_now(host, &entry.stored)?;
        let _writing = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if source == CertSource::Acme
            && self
                .table
                .load()
                .get(key)
                .is_some_and(|e| e.info.source == CertSource::User)
        {
            return Err(CertError::UserCertificatePresent {
                host: host.to_owned(),
            });
        }
        let stem = stem_of_host(host);
        let meta = serde_json::to_vec(&Meta { source }).expect("metadata serializes");
        let files = [
            (format!("{stem}.key"), key_pem, 0o600),
            (format!("{stem}.crt"), cert_pem, 0o644),
            (format!("{stem}.json"), meta.as_slice(), 0o644),
        ];
        let mut temps = Vec::with_capacity(files.len());
        for (name, bytes, mode) in &files {
            let temp = self.dir.join(format!(".{name}.tmp"));
            if let Err(err) = write_file(&temp, bytes, *mode) {
                for written in temps.iter().chain([&temp]) {
                    let _ = fs::remove_file(written);
                }
                return Err(err);
            }
            temps.push(temp);
        }
        for (temp, (name, _, _)) in temps.iter().zip(&files) {
            let path = self.dir.join(name);
            fs::rename(temp, &path).map_err(|source| CertError::Io {
                op: "storing",
                path,
                source,
            })?;
        }
        if let Ok(dir) = fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        let info = entry.info.clone();
        let mut table = Table::clone(&self.table.load());
        table.insert(key.clone(), Arc::new(entry));
        self.table.store(Arc::new(table));
        tracing::info!(host, %source, not_after = %info.not_after, "certificate stored");
        Ok(info)
    }

    /// Every stored certificate, sorted by host.
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

/// `*.example.com` ↔ `_wildcard.example.com` (a `*` in a file name invites shell accidents).
fn stem_of_host(host: &str) -> String {
    match host.strip_prefix("*.") {
        Some(parent) => format!("_wildcard.{parent}"),
        None => host.to_owned(),
    }
}

fn host_of_stem(stem: &str) -> String {
    match stem.strip_prefix("_wildcard.") {
        Some(parent) => format!("*.{parent}"),
        None => stem.to_owned(),
    }
}

/// Reads and validates the stored files of `host` (expired certificates are loaded too so
/// they can be listed and renewed).
fn load_entry(dir: &Path, host: &str) -> Result<Entry, CertError> {
    let stem = stem_of_host(host);
    let read = |ext: &str| {
        let path = dir.join(format!("{stem}.{ext}"));
        fs::read(&path).map_err(|source| CertError::Io {
            op: "reading",
            path,
            source,
        })
    };
    let source = match read("json") {
        Ok(bytes) => serde_json::from_slice::<Meta>(&bytes)
            .map(|m| m.source)
            .unwrap_or(CertSource::User),
        Err(_) => CertSource::User,
    };
    validate(host, &read("crt")?, &read("key")?, source)
}

/// Parses and checks a PEM pair for `host` (everything but the validity period).
fn validate(
    host: &str,
    cert_pem: &[u8],
    key_pem: &[u8],
    source: CertSource,
) -> Result<Entry, CertError> {
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
    Ok(Entry {
        key: Arc::new(certified),
        info,
        stored: StoredCert {
            source,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        },
    })
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

/// RFC 3339 in UTC, e.g. `2026-05-01T12:00:00Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let unix = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        op: "writing",
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
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
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn host(name: &str) -> Host {
        Host::parse(name).unwrap()
    }

    fn set(store: &CertStore, name: &str, pair: &(String, String)) -> Result<CertInfo, CertError> {
        store.set(
            &host(name),
            pair.0.as_bytes(),
            pair.1.as_bytes(),
            CertSource::User,
        )
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

    #[test]
    fn exact_then_wildcard_then_fallback() {
        let dir = TempDir::new("select");
        let store = CertStore::open(&dir.0).unwrap();
        set(&store, "app.example.com", &valid(&["app.example.com"])).unwrap();
        set(&store, "*.example.com", &valid(&["*.example.com"])).unwrap();
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

    #[test]
    fn a_wildcard_certificate_covers_an_exact_host() {
        let dir = TempDir::new("wildcard-san");
        let store = CertStore::open(&dir.0).unwrap();
        let info = set(&store, "shop.example.org", &valid(&["*.example.org"])).unwrap();
        assert_eq!(info.sans, ["*.example.org"]);
        assert_eq!(info.source, CertSource::User);
        assert!(store.has_certificate("shop.example.org"));
        assert!(!store.has_certificate("blog.example.org"));
    }

    #[test]
    fn invalid_pairs_are_refused_and_change_nothing() {
        let dir = TempDir::new("refuse");
        let store = CertStore::open(&dir.0).unwrap();
        let good = valid(&["a.example.com"]);
        let other = valid(&["a.example.com"]);
        let err = set(&store, "a.example.com", &(good.0.clone(), other.1)).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        assert_eq!(err.part(), Some(CertPart::Key));

        let err = set(&store, "b.example.com", &good).unwrap_err();
        assert!(matches!(err, CertError::NotCovered { .. }), "{err}");
        assert!(err.to_string().contains("a.example.com"), "{err}");
        let err = set(&store, "*.example.com", &valid(&["a.example.com"])).unwrap_err();
        assert!(matches!(err, CertError::NotCovered { .. }), "{err}");

        let err = set(
            &store,
            "a.example.com",
            &generate(&["a.example.com"], -30, -1),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::Expired { .. }), "{err}");
        let err = set(
            &store,
            "a.example.com",
            &generate(&["a.example.com"], 2, 30),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::NotYetValid { .. }), "{err}");

        let err = set(&store, "a.example.com", &("junk".into(), good.1.clone())).unwrap_err();
        assert_eq!(err.part(), Some(CertPart::Certificate), "{err}");
        let err = set(&store, "a.example.com", &(good.0.clone(), "junk".into())).unwrap_err();
        assert!(matches!(err, CertError::KeyPem { .. }), "{err}");

        assert!(store.list().is_empty());
        assert!(!store.has_certificate("a.example.com"));
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 0, "nothing written");
    }

    #[test]
    fn acme_never_replaces_a_user_certificate() {
        let dir = TempDir::new("acme-user");
        let store = CertStore::open(&dir.0).unwrap();
        let pair = valid(&["a.example.com"]);
        set(&store, "a.example.com", &pair).unwrap();
        let err = store
            .set(
                &host("a.example.com"),
                pair.0.as_bytes(),
                pair.1.as_bytes(),
                CertSource::Acme,
            )
            .unwrap_err();
        assert!(
            matches!(err, CertError::UserCertificatePresent { .. }),
            "{err}"
        );
        assert_eq!(store.list()[0].source, CertSource::User);
    }

    #[test]
    fn store_survives_reopen_and_swaps_in_place() {
        let dir = TempDir::new("reopen");
        {
            let store = CertStore::open(&dir.0).unwrap();
            set(&store, "a.example.com", &valid(&["a.example.com"])).unwrap();
            let pair = valid(&["*.example.net"]);
            store
                .set(
                    &host("*.example.net"),
                    pair.0.as_bytes(),
                    pair.1.as_bytes(),
                    CertSource::Acme,
                )
                .unwrap();
        }
        let mode =
            |name: &str| fs::metadata(dir.0.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("a.example.com.key"), 0o600);
        assert_eq!(mode("_wildcard.example.net.key"), 0o600);
        assert_eq!(
            fs::metadata(&dir.0).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let store = CertStore::open(&dir.0).unwrap();
        let list = store.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].host, "*.example.net");
        assert_eq!(list[0].source, CertSource::Acme);
        assert_eq!(list[1].host, "a.example.com");
        assert_eq!(list[1].source, CertSource::User);
        // Stored under exactly the host (a wildcard covers x.example.net but is not its own).
        let not_after = |host: &str| {
            let table = store.table.load();
            table
                .get(&Host::parse(host).unwrap())
                .map(|entry| entry.stored.not_after)
        };
        assert!(not_after("a.example.com").unwrap() > SystemTime::now());
        assert!(not_after("b.example.com").is_none());
        assert!(not_after("x.example.net").is_none());
        let covering = store.covering("x.example.net").unwrap();
        assert_eq!(covering.source, CertSource::Acme);
        assert!(covering.not_before < SystemTime::now());
        assert!(store.covering("example.net").is_none());

        // Replacing swaps the served certificate with no reopen.
        let before = Arc::clone(&store.table.load().lookup("a.example.com").unwrap().key);
        set(
            &store,
            "a.example.com",
            &valid(&["a.example.com", "www.a.example.com"]),
        )
        .unwrap();
        let after = Arc::clone(&store.table.load().lookup("a.example.com").unwrap().key);
        assert_ne!(before.cert, after.cert);
        assert_eq!(store.list()[1].sans, ["a.example.com", "www.a.example.com"]);
    }

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02T00:00:00Z"
        );
    }
}
