//! The TLS server configuration: certificates and keys read from their files, the one that new
//! handshakes use (installed at startup and by a reload), and the caller's identity taken from
//! its verified certificate.

use super::*;

/// The TLS server configuration built at config load (a cheap clone), and a fingerprint of the
/// files it was built from (a reload installs it when that differs from the running one's).
#[derive(Clone)]
pub struct ServerConfigHandle(pub Arc<rustls::ServerConfig>, pub u64);

/// The configuration new handshakes use, and its generation (bumped by each [`install`]).
pub(super) static CURRENT: std::sync::RwLock<Option<Arc<rustls::ServerConfig>>> =
    std::sync::RwLock::new(None);
pub(super) static GENERATION: AtomicU64 = AtomicU64::new(0);

/// From now on, new TLS handshakes use `handle`'s configuration (sessions open keep theirs).
pub fn install(handle: &ServerConfigHandle) {
    let mut current = CURRENT.write().unwrap_or_else(|p| p.into_inner());
    *current = Some(Arc::clone(&handle.0));
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// A fingerprint of the certificate, key and CA (DER), to tell whether a reload changed them
/// (not a security measure: SipHash with fixed keys).
pub(super) fn fingerprint(parts: &[&[u8]]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.hash(&mut hasher);
    }
    hasher.finish()
}

impl std::fmt::Debug for ServerConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerConfigHandle")
    }
}

/// The ring provider: it builds with no system library (no cmake, no OpenSSL).
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `path`, or why not (naming the file).
pub fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("cannot read certificates from {}: {error}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

/// Build the server configuration from `listen.tls_cert`, `tls_key` and `tls_client_ca`;
/// `Err`: the key at fault and why.
pub fn server_config(listen: &Listen) -> Result<ServerConfigHandle, (&'static str, String)> {
    let cert_path = listen
        .tls_cert
        .as_deref()
        .ok_or(("listen.tls_cert", "must be set".to_string()))?;
    let key_path = listen
        .tls_key
        .as_deref()
        .ok_or(("listen.tls_key", "must be set".to_string()))?;
    let certs = read_certs(cert_path).map_err(|reason| ("listen.tls_cert", reason))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
        (
            "listen.tls_key",
            format!(
                "cannot read a PEM private key (PKCS#8, PKCS#1 or SEC1) from {}: {error}",
                key_path.display()
            ),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ("listen.tls", format!("the TLS provider: {error}")))?;
    let mut parts: Vec<Vec<u8>> = certs.iter().map(|c| c.to_vec()).collect();
    parts.push(key.secret_der().to_vec());
    let builder = match &listen.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca_path).map_err(|reason| ("listen.tls_client_ca", reason))? {
                parts.push(cert.to_vec());
                roots.add(cert).map_err(|error| {
                    (
                        "listen.tls_client_ca",
                        format!(
                            "{}: not a usable CA certificate: {error}",
                            ca_path.display()
                        ),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .map_err(|error| ("listen.tls_client_ca", error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|error| {
        (
            "listen.tls_key",
            format!(
                "{} does not go with the certificate in {}: {error}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(ServerConfigHandle(Arc::new(config), fingerprint(&parts)))
}

/// The identity a verified client certificate gives: its first DNS subject alternative name,
/// else its subject's common name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    if let Some(name) = cert.valid_dns_names().next() {
        return Some(name.to_string());
    }
    common_name(cert.subject())
}

/// The first common name (OID 2.5.4.3) in a DER `Name`'s contents (a sequence of sets of
/// type-and-value sequences).
pub(super) fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, set, rest) = der(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        let mut set = set;
        while !set.is_empty() {
            let (tag, pair, rest) = der(set)?;
            set = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der(pair)?;
            if oid_tag != 0x06 || oid != CN {
                continue;
            }
            let (kind, text, _) = der(value)?;
            // UTF8String, PrintableString, T61String (Latin-1 in practice), IA5String.
            return match kind {
                0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok().map(str::to_string),
                0x14 => Some(text.iter().map(|&b| char::from(b)).collect()),
                _ => None,
            };
        }
    }
    None
}

/// One DER element at the start of `bytes`: (tag, contents, what follows). Single-byte tags
/// and lengths up to 4 bytes (what a certificate's names use).
pub(super) fn der(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_elements_and_common_names_are_read_and_bounded() {
        // Proves the small DER reader: a Name with an O and a CN gives the CN; a truncated
        // one gives nothing rather than reading past its end.
        let o = [
            0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x01, b'x',
        ];
        let cn = [
            0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'a', b'l', b'i',
            b'c', b'e',
        ];
        let name: Vec<u8> = o.iter().chain(cn.iter()).copied().collect();
        assert_eq!(common_name(&name).as_deref(), Some("alice"));
        assert_eq!(common_name(&o), None);
        assert_eq!(common_name(&name[..name.len() - 2]), None);
        assert_eq!(der(&[0x04, 0x82, 0x01]), None);
        assert_eq!(
            der(&[0x04, 0x81, 0x01, 0xff, 0x00]),
            Some((0x04, &[0xff][..], &[0x00][..]))
        );
    }
}
