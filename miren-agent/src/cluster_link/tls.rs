//! Mutual TLS between the agents of a cluster (`--cluster-ca/--cluster-cert/--cluster-key`):
//! every node serves its cluster listener with its own certificate, wants a client certificate
//! signed by the cluster's CA, and verifies the peers it asks by their IP address (IP SAN).

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use super::ClusterLinkError;
use crate::settings::ClusterTlsFiles;

/// The only protocol the cluster listener speaks inside TLS.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The three files, read and checked.
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
}

/// The cluster listener's TLS: a certificate for this node and client certificates required.
///
/// # Errors
/// [`ClusterLinkError::Tls`] naming the file that is unreadable, empty or does not fit.
pub(super) fn server_config(
    files: &ClusterTlsFiles,
) -> Result<Arc<ServerConfig>, ClusterLinkError> {
    let material = Material::read(files)?;
    let clients =
        WebPkiClientVerifier::builder_with_provider(material.roots, Arc::clone(&material.provider))
            .build()
            .map_err(|e| tls_error(&files.ca, format!("cannot verify clients with it: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(material.provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&files.cert, e.to_string()))?
        .with_client_cert_verifier(clients)
        .with_single_cert(material.chain, material.key)
        .map_err(|e| mismatch(files, &e))?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// The peers' client: verifies a peer's certificate against the CA and its address, and
/// presents this node's certificate.
///
/// # Errors
/// [`ClusterLinkError::Tls`] naming the file that is unreadable, empty or does not fit.
pub(super) fn client_config(
    files: &ClusterTlsFiles,
) -> Result<Arc<ClientConfig>, ClusterLinkError> {
    let material = Material::read(files)?;
    let mut config = ClientConfig::builder_with_provider(material.provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&files.cert, e.to_string()))?
        .with_root_certificates(material.roots)
        .with_client_auth_cert(material.chain, material.key)
        .map_err(|e| mismatch(files, &e))?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

impl Material {
    fn read(files: &ClusterTlsFiles) -> Result<Self, ClusterLinkError> {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&files.ca, "--cluster-ca")? {
            roots.add(cert).map_err(|e| {
                tls_error(
                    &files.ca,
                    format!("holds a certificate that cannot be a CA ({e}); give the PEM certificate of the CA that signed every node's certificate"),
                )
            })?;
        }
        let chain = certificates(&files.cert, "--cluster-cert")?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            tls_error(
                &files.key,
                format!("is not a readable PEM private key ({e}); give the key of --cluster-cert"),
            )
        })?;
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key,
            provider: Arc::new(ring::default_provider()),
        })
    }
}

/// Every certificate of the PEM file `path` (at least one).
fn certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, ClusterLinkError> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        tls_error(
            path,
            format!("is not a readable PEM certificate file ({e}); check {flag}"),
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certs.is_empty() {
        return Err(tls_error(
            path,
            format!("holds no PEM certificate (-----BEGIN CERTIFICATE-----); check {flag}"),
        ));
    }
    Ok(certs)
}

/// The certificate and key do not belong together (or the key is of an unusable kind).
fn mismatch(files: &ClusterTlsFiles, error: &rustls::Error) -> ClusterLinkError {
    tls_error(
        &files.cert,
        format!(
            "cannot be used with the key {} ({error}); give --cluster-key the private key of this certificate",
            files.key.display()
        ),
    )
}

fn tls_error(path: &Path, problem: String) -> ClusterLinkError {
    ClusterLinkError::Tls {
        path: path.to_owned(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named_with_what_to_do() {
        let dir =
            std::env::temp_dir().join(format!("miren-cluster-tls-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["10.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let files = ClusterTlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        std::fs::write(&files.ca, cert.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        assert!(server_config(&files).is_ok());
        assert!(client_config(&files).is_ok());

        std::fs::write(&files.key, other_key.serialize_pem()).unwrap();
        let err = server_config(&files).unwrap_err().to_string();
        assert!(
            err.contains("node.pem") && err.contains("give --cluster-key the private key"),
            "{err}"
        );

        std::fs::write(&files.ca, "not a certificate\n").unwrap();
        let err = client_config(&files).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("holds no PEM certificate"),
            "{err}"
        );

        std::fs::remove_file(&files.ca).unwrap();
        let err = client_config(&files).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("check --cluster-ca"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
