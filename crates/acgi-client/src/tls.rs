//! TLS to a bridge's `listen.tls` (feature `tls`): rustls with the ring provider, for the
//! blocking client (`StreamOwned`) and the async one (tokio-rustls).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::{CallError, ConnectOptions};

/// The blocking client's TLS stream.
pub(crate) type BlockingTls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// How a client verifies a bridge over TLS, and proves who it is: the CA certificates the
/// bridge's certificate must chain to, an optional client certificate and key (for a bridge
/// with `listen.tls_client_ca`), and optionally the name to check the bridge's certificate
/// against (by default the host of the address).
#[derive(Clone, Debug)]
pub struct TlsConfig {
    roots: Option<Arc<rustls::RootCertStore>>,
    config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(what: String) -> CallError {
    CallError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CallError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| {
            bad(format!(
                "reading certificates from {}: {error}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(bad(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Trust bridges whose certificate chains to a CA certificate in the PEM file `ca`.
    pub fn new(ca: impl AsRef<Path>) -> Result<TlsConfig, CallError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca.as_ref())? {
            roots.add(cert).map_err(|error| {
                bad(format!(
                    "{}: not a usable CA certificate: {error}",
                    ca.as_ref().display()
                ))
            })?;
        }
        let roots = Arc::new(roots);
        let config = Self::builder()?
            .with_root_certificates(Arc::clone(&roots))
            .with_no_client_auth();
        Ok(TlsConfig {
            roots: Some(roots),
            config: Arc::new(config),
            server_name: None,
        })
    }

    fn builder(
    ) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, CallError> {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| bad(format!("the TLS provider: {error}")))
    }

    /// Present the certificate chain in the PEM file `cert` (leaf first), with its private key
    /// from the PEM file `key`: mutual TLS.
    pub fn client_cert(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig, CallError> {
        let roots = self.roots.clone().ok_or_else(|| {
            bad(
                "client_cert needs a TlsConfig made by TlsConfig::new (build a rustls \
                 ClientConfig with the client certificate for from_rustls instead)"
                    .into(),
            )
        })?;
        let chain = read_certs(cert.as_ref())?;
        let key_der = PrivateKeyDer::from_pem_file(key.as_ref()).map_err(|error| {
            bad(format!(
                "reading a private key from {}: {error}",
                key.as_ref().display()
            ))
        })?;
        let config = Self::builder()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|error| {
                bad(format!(
                    "{} does not go with {}: {error}",
                    key.as_ref().display(),
                    cert.as_ref().display()
                ))
            })?;
        Ok(TlsConfig {
            config: Arc::new(config),
            ..self
        })
    }

    /// Use a rustls configuration built elsewhere (its roots, client certificate, versions).
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> TlsConfig {
        TlsConfig {
            roots: None,
            config,
            server_name: None,
        }
    }

    /// Check the bridge's certificate against `name` (a DNS name or an IP address) instead of
    /// the host of the address.
    pub fn server_name(self, name: &str) -> Result<TlsConfig, CallError> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| bad(format!("{name:?} is not a DNS name or an IP address")))?;
        Ok(TlsConfig {
            server_name: Some(name),
            ..self
        })
    }
}

/// The host of a `host:port` (`[v6]:port` too).
fn host_of(host_port: &str) -> &str {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl ConnectOptions {
    /// The TLS configuration and the name to verify for `host_port`.
    pub(crate) fn tls_for(
        &self,
        host_port: &str,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), CallError> {
        let tls = self.tls.as_ref().ok_or_else(|| {
            bad(
                "a tls: address needs ConnectOptions::tls (the CA to verify the bridge with)"
                    .into(),
            )
        })?;
        let name = match &tls.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host_of(host_port).to_string()).map_err(|_| {
                bad(format!(
                    "{host_port:?}: its host is not a DNS name or an IP address to verify \
                     (set TlsConfig::server_name)"
                ))
            })?,
        };
        Ok((Arc::clone(&tls.config), name))
    }
}

/// A failed handshake, as the caller's error (the bridge's alert or ours).
pub(crate) fn handshake_error(error: std::io::Error) -> CallError {
    CallError::Io(std::io::Error::new(
        error.kind(),
        format!("TLS handshake with the bridge: {error}"),
    ))
}

/// Connect and finish the handshake now, so that a refused certificate fails the connect.
pub(crate) fn connect_blocking(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mut tcp: std::net::TcpStream,
) -> Result<BlockingTls, CallError> {
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|error| bad(format!("TLS: {error}")))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(handshake_error)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address_is_what_the_certificate_is_checked_against() {
        assert_eq!(host_of("bridge.example:7879"), "bridge.example");
        assert_eq!(host_of("127.0.0.1:7879"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7879"), "::1");
    }
}
