//! The certificates the router serves, chosen by SNI: the receiver's (custom
//! domains, obtained by ACME) from the route table, and the operator's
//! `--tls-cert` for every other name.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use nx_protocol::routes::Certificate;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("the certificate for {hosts} holds no PEM certificate: {reason}")]
    Chain { hosts: String, reason: String },
    #[error("the private key for {hosts} is not a PEM private key rustls can use: {reason}")]
    Key { hosts: String, reason: String },
}

/// A certificate chain and key in PEM, ready for handshakes.
pub fn certified_key(hosts: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Chain { hosts: hosts.to_owned(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(CertError::Chain { hosts: hosts.to_owned(), reason: "empty".into() });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| CertError::Key { hosts: hosts.to_owned(), reason: e.to_string() })?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Key { hosts: hosts.to_owned(), reason: e.to_string() })?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// Certificates by host name (lowercase; `*.example.com` for a wildcard),
/// replaced whole with each route table, and the operator's fallback.
#[derive(Debug)]
pub struct CertStore {
    by_host: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(fallback: Option<Arc<CertifiedKey>>) -> CertStore {
        CertStore { by_host: ArcSwap::from_pointee(HashMap::new()), fallback }
    }

    /// Serves `certs` from now on. A certificate that cannot be loaded is
    /// left out (its hosts get the fallback) and said in the log: one bad
    /// certificate must not stop the table that carries every route.
    pub fn replace(&self, certs: &[Certificate]) {
        let mut by_host = HashMap::new();
        for cert in certs {
            let hosts = cert.hosts.join(", ");
            match certified_key(&hosts, cert.chain_pem.as_bytes(), cert.key_pem.as_bytes()) {
                Ok(key) => {
                    for host in &cert.hosts {
                        by_host.insert(host.to_ascii_lowercase(), key.clone());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "certificate left out"),
            }
        }
        self.by_host.store(Arc::new(by_host));
    }

    /// The receiver's certificate for `host`: its own, else a wildcard of its parent.
    fn lookup(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.by_host.load();
        map.get(host).or_else(|| host.split_once('.').and_then(|(_, parent)| map.get(&format!("*.{parent}")))).cloned()
    }

    /// The hosts the receiver gave certificates for, sorted.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.by_host.load().keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// Whether the receiver gave a certificate for `host` (so plain HTTP
    /// requests for it are sent to HTTPS).
    pub fn covers(&self, host: &str) -> bool {
        self.lookup(host).is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello.server_name().and_then(|name| self.lookup(&name.to_ascii_lowercase())).or_else(|| self.fallback.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_clear_error_naming_the_hosts() {
        let e = certified_key("www.example.test", b"nothing", b"nothing").unwrap_err().to_string();
        assert_eq!(e, "the certificate for www.example.test holds no PEM certificate: empty");
    }

    #[test]
    fn a_bad_certificate_is_left_out_and_wildcards_cover_one_level() {
        let store = CertStore::new(None);
        store.replace(&[Certificate { hosts: vec!["a.test".into()], chain_pem: "x".into(), key_pem: "y".into() }]);
        assert!(!store.covers("a.test"));
        let mut map = HashMap::new();
        let fake = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(vec![1u8])],
            rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::from_pem_slice(TEST_KEY).unwrap()).unwrap(),
        ));
        map.insert("*.preview.test".to_owned(), fake);
        store.by_host.store(Arc::new(map));
        // What the receiver asks to tell whether it must send them again.
        assert_eq!(store.hosts(), ["*.preview.test"]);
        assert!(store.covers("abc--web.preview.test"));
        assert!(!store.covers("x.abc--web.preview.test"));
        assert!(!store.covers("preview.test"));
    }

    #[test]
    fn a_name_s_own_certificate_comes_before_the_wildcard() {
        let store = CertStore::new(None);
        let key = |byte: u8| {
            let signer =
                rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::from_pem_slice(TEST_KEY).unwrap())
                    .unwrap();
            Arc::new(CertifiedKey::new(vec![CertificateDer::from(vec![byte])], signer))
        };
        let map = HashMap::from([("*.apps.test".to_owned(), key(1)), ("web.apps.test".to_owned(), key(2))]);
        store.by_host.store(Arc::new(map));
        let served = |host: &str| store.lookup(host).map(|k| k.cert[0].as_ref().to_vec());
        assert_eq!(served("web.apps.test"), Some(vec![2]));
        assert_eq!(served("shop.apps.test"), Some(vec![1]));
        assert_eq!(served("apps.test"), None);
    }

    /// A throwaway P-256 key, for loading only.
    const TEST_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+uUv2s8oM9Y2uKGL
oZcCKEPxFh4qHk42Kv/Mb8es0kihRANCAASR21eFraf4o652LwdGwogsupbzRh9X
GPitJvQLmEy1eww83SfMPTJA+uEKwPH9Q8YXe/cfhu6F782G2MSt+eXM
-----END PRIVATE KEY-----
";
}
