//! `shelltrail pki`: a small certificate authority for a fleet, so that
//! mutual TLS between agents, operators and the collector needs no other
//! tool. One CA signs the collector's server certificate, one client
//! certificate per host (its name is the host's identity at the collector)
//! and one per operator. `shelltrail demo` and the tests use it too.
//!
//! Every certificate says what it is for ([`CertRole`]): a client
//! certificate carries its role (host or operator) as the URI the collector
//! checks (see `shelltrail_collector::identity`), and the extended key usage
//! keeps each certificate to its side of a connection: client certificates
//! cannot serve as the collector, the collector's cannot be a client.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use shelltrail_collector::Role;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What a certificate is for (`pki issue --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertRole {
    /// An agent: ships its host's sessions, never reads any.
    Host,
    /// A person: lists and reads sessions, never ships; what else they may
    /// do comes from the collector's `[collector.roles]`.
    Operator,
    /// An operator whose certificate itself grants the view role: list,
    /// export, play, verify, tail.
    View,
    /// An operator whose certificate itself grants the respond role: also
    /// kill, lock, unlock.
    Respond,
    /// The collector's server certificate.
    Collector,
}

/// A CA on disk: `ca.pem` and `ca.key` in a directory.
pub struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new CA in `dir` (which must not hold one already).
    pub fn create(dir: &Path, name: &str) -> Result<Ca> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        write(&dir.join("ca.pem"), cert.pem().as_bytes(), 0o644)?;
        write(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Ca> {
        let pem =
            std::fs::read_to_string(dir.join("ca.pem")).with_context(|| format!("reading {}/ca.pem", dir.display()))?;
        let key =
            std::fs::read_to_string(dir.join("ca.key")).with_context(|| format!("reading {}/ca.key", dir.display()))?;
        let key = KeyPair::from_pem(&key)?;
        let issuer = Issuer::from_ca_cert_pem(&pem, key)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            issuer,
        })
    }

    /// The CA certificate's path.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate for `names` (DNS names or IP addresses; the first
    /// is also the common name) as `<file>.pem` and `<file>.key` in the CA's
    /// directory. Returns the two paths.
    pub fn issue(&self, file: &str, names: &[String], role: CertRole) -> Result<(PathBuf, PathBuf)> {
        self.issue_for(file, names, role, None)
    }

    /// [`issue`](Self::issue), valid for `days` from now when given (else
    /// without a practical end): short-lived certificates are how a fleet
    /// without a revocation list limits what a leaked key is worth.
    pub fn issue_for(
        &self,
        file: &str,
        names: &[String],
        role: CertRole,
        days: Option<u32>,
    ) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let client_role = match role {
            CertRole::Host => Some(Role::Host),
            CertRole::Operator | CertRole::View | CertRole::Respond => Some(Role::Operator),
            CertRole::Collector => None,
        };
        params.extended_key_usages = vec![match client_role {
            Some(_) => ExtendedKeyUsagePurpose::ClientAuth,
            None => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        if let Some(r) = client_role {
            params.subject_alt_names.push(SanType::URI(r.uri().try_into()?));
        }
        let grant = match role {
            CertRole::View => Some("view"),
            CertRole::Respond => Some("respond"),
            _ => None,
        };
        if let Some(g) = grant {
            let uri = format!("{}{g}", shelltrail_collector::ROLE_URI_PREFIX);
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        if let Some(days) = days {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now
                .checked_add(time::Duration::days(i64::from(days)))
                .with_context(|| format!("{days} days from now is past the last date a certificate can hold"))?;
        }
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first.as_str());
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        write(&c, cert.pem().as_bytes(), 0o644)?;
        write(&k, key.serialize_pem().as_bytes(), 0o600)?;
        Ok((c, k))
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_certificates_that_name_the_host_and_carry_their_role() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), "test CA").unwrap();
        let (cert, key) = ca.issue("host-a", &["host-a".into()], CertRole::Host).unwrap();
        let der = rustls_pemfile_der(&std::fs::read(&cert).unwrap());
        let peer = shelltrail_collector::peer_from_certificate(&der).unwrap();
        assert_eq!((peer.name.as_str(), peer.role), ("host-a", Role::Host));
        let eku = |der: &[u8]| {
            use x509_parser::prelude::{FromDer, X509Certificate};
            let (_, x) = X509Certificate::from_der(der).unwrap();
            let e = x.extended_key_usage().unwrap().unwrap().value;
            (e.client_auth, e.server_auth)
        };
        assert_eq!(eku(&der), (true, false), "a host's certificate is a client's only");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
        let (cert, _) = ca.issue("alice", &["alice".into()], CertRole::Operator).unwrap();
        let der = rustls_pemfile_der(&std::fs::read(&cert).unwrap());
        let peer = shelltrail_collector::peer_from_certificate(&der).unwrap();
        assert_eq!((peer.name.as_str(), peer.role), ("alice", Role::Operator));
        // Reopened, it still signs; the collector's certificate is no client.
        let again = Ca::open(dir.path()).unwrap();
        let (cert, _) = again
            .issue(
                "collector",
                &["localhost".into(), "127.0.0.1".into()],
                CertRole::Collector,
            )
            .unwrap();
        let der = rustls_pemfile_der(&std::fs::read(&cert).unwrap());
        assert!(matches!(
            shelltrail_collector::peer_from_certificate(&der),
            Err(shelltrail_collector::IdentityError::NoRole { .. })
        ));
        assert_eq!(
            eku(&der),
            (false, true),
            "the collector's certificate is a server's only"
        );
    }

    #[test]
    fn a_certificate_can_be_short_lived() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path(), "test CA").unwrap();
        let (cert, _) = ca
            .issue_for("host-a", &["host-a".into()], CertRole::Host, Some(30))
            .unwrap();
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = rustls_pemfile_der(&std::fs::read(&cert).unwrap());
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let end = x.validity().not_after.timestamp();
        assert!((end - now - 30 * 86_400).abs() < 120, "not_after {end}, now {now}");
        assert!(x.validity().not_before.timestamp() <= now);
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(pem).unwrap();
        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
    }
}
