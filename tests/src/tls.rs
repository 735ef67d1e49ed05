//! TLS helpers for the ingress and cluster tests: certificates made on the spot (self-signed
//! or from a throwaway CA; names that parse as IP addresses become IP SANs) and a client that
//! reports which certificate a server presents for an SNI.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use x509_parser::extensions::GeneralName;

/// A certificate chain and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate (chain), PEM.
    pub cert: String,
    /// The private key, PEM.
    pub key: String,
}

impl Pem {
    /// Writes the pair as `NAME.crt` and `NAME.key` in `dir`; returns both paths.
    ///
    /// # Panics
    /// If a file cannot be written.
    pub fn write(&self, dir: &Path, name: &str) -> (String, String) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert).expect("write the certificate");
        std::fs::write(&key, &self.key).expect("write the key");
        (
            cert.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
        )
    }
}

fn params(names: &[&str]) -> rcgen::CertificateParams {
    rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .expect("valid certificate names")
}

/// A self-signed certificate for `names` (DNS names or IP addresses), valid now.
pub fn self_signed(names: &[&str]) -> Pem {
    let key = rcgen::KeyPair::generate().expect("generate key");
    let cert = params(names).self_signed(&key).expect("self-sign");
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// A throwaway certificate authority.
#[derive(Debug)]
pub struct TestCa(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl TestCa {
    /// A new self-signed CA whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("generate CA key");
        Self(rcgen::CertifiedIssuer::self_signed(params, key).expect("self-sign CA"))
    }

    /// The CA certificate, PEM (what clients trust).
    pub fn cert_pem(&self) -> String {
        self.0.pem()
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Pem {
        let key = rcgen::KeyPair::generate().expect("generate key");
        let cert = params(names).signed_by(&key, &self.0).expect("sign");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// What a server presented in a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedLeaf {
    /// The leaf's DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// The leaf's issuer distinguished name, e.g. `CN=Pebble Intermediate CA 1a2b3c`.
    pub issuer: String,
    /// How many certificates the server sent.
    pub chain_len: usize,
}

/// A TLS connection to `addr` with SNI `server_name`, handshake done. The chain is not
/// verified (tests inspect it instead); the handshake signature is.
///
/// # Errors
/// Connection or handshake failures.
pub fn connect(
    addr: SocketAddr,
    server_name: &str,
) -> io::Result<rustls::StreamOwned<ClientConnection, TcpStream>> {
    let provider = Arc::new(ring::default_provider());
    let verifier = Arc::new(InspectOnly(provider.signature_verification_algorithms));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned()).map_err(io::Error::other)?;
    let mut conn = ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
    let mut socket = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.set_write_timeout(Some(Duration::from_secs(5)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut socket)?;
    }
    Ok(rustls::StreamOwned::new(conn, socket))
}

/// Completes a TLS handshake with the server at `addr` sending SNI `server_name` and returns
/// the leaf it presented.
///
/// # Errors
/// Connection, handshake or parse failures.
pub fn served_leaf(addr: SocketAddr, server_name: &str) -> io::Result<ServedLeaf> {
    let stream = connect(addr, server_name)?;
    let conn = &stream.conn;
    let chain = conn
        .peer_certificates()
        .ok_or_else(|| io::Error::other("the server sent no certificate"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| io::Error::other("empty certificate chain"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(io::Error::other)?;
    let dns_names = cert
        .subject_alternative_name()
        .map_err(io::Error::other)?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ServedLeaf {
        dns_names,
        issuer: cert.issuer().to_string(),
        chain_len: chain.len(),
    })
}

/// Accepts any chain (the test looks at it), but checks handshake signatures.
#[derive(Debug)]
struct InspectOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for InspectOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
