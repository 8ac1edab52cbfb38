//! The who, where and how of a session, gathered at its start.
//!
//! Values here come from sshd's environment and the passwd database. They are
//! the recorder's claims; the agent adds the uid and pid it learns from the
//! socket (SO_PEERCRED), which cannot be forged. `SSH_USER_AUTH` names a file
//! owned by the user, so its content is parsed as untrusted data: size-capped,
//! and every malformed line is kept verbatim rather than trusted or fatal.

use shelltrail_proto::v1::{AuthInfo, SessionMeta};
use ssh_key::{Certificate, HashAlg, PublicKey};
use std::io::Read;

/// Largest SSH_USER_AUTH file read (a line per auth method; certificates are a few KiB).
const MAX_AUTH_FILE: u64 = 64 << 10;

/// `SSH_CONNECTION`: "client_ip client_port server_ip server_port".
pub fn apply_ssh_connection(meta: &mut SessionMeta, value: &str) {
    let parts: Vec<&str> = value.split_ascii_whitespace().collect();
    if let [cip, cport, sip, sport] = parts[..] {
        meta.client_addr = cip.to_string();
        meta.client_port = cport.parse().unwrap_or(0);
        meta.server_addr = sip.to_string();
        meta.server_port = sport.parse().unwrap_or(0);
    }
}

/// Reads the ExposeAuthInfo file named by `SSH_USER_AUTH`.
pub fn read_auth_file(path: &str) -> Option<AuthInfo> {
    let mut text = String::new();
    let f = std::fs::File::open(path).ok()?;
    // Refuse devices and FIFOs a user might point the variable at.
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    f.take(MAX_AUTH_FILE).read_to_string(&mut text).ok()?;
    Some(parse_auth(&text))
}

/// Parses ExposeAuthInfo lines: `method[/submethod] [keytype base64-blob] [info]`.
/// The last publickey line is the one that completed authentication.
pub fn parse_auth(text: &str) -> AuthInfo {
    let mut info = AuthInfo::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut words = line.split_ascii_whitespace();
        let method = words.next().unwrap_or_default();
        if method == "publickey" {
            let (Some(kt), Some(blob)) = (words.next(), words.next()) else {
                info.other_methods.push(clean(line));
                continue;
            };
            let openssh = format!("{kt} {blob}");
            info.method = "publickey".into();
            info.key_type = clean(kt);
            if kt.contains("-cert-v01@openssh.com") {
                match Certificate::from_openssh(&openssh) {
                    Ok(cert) => {
                        info.key_fingerprint = cert.public_key().fingerprint(HashAlg::Sha256).to_string();
                        info.cert_key_id = clean(cert.key_id());
                        info.cert_principals = cert.valid_principals().iter().map(|p| clean(p)).collect();
                        info.cert_serial = cert.serial().to_string();
                        info.cert_ca_fingerprint = cert.signature_key().fingerprint(HashAlg::Sha256).to_string();
                    }
                    Err(e) => info.other_methods.push(format!("unparsable certificate: {e}")),
                }
            } else {
                match PublicKey::from_openssh(&openssh) {
                    Ok(k) => info.key_fingerprint = k.fingerprint(HashAlg::Sha256).to_string(),
                    Err(e) => info.other_methods.push(format!("unparsable key: {e}")),
                }
            }
        } else {
            if info.method.is_empty() {
                info.method = clean(method);
            }
            info.other_methods.push(clean(line));
        }
    }
    info
}

/// Keeps metadata printable and bounded: control characters would let a user
/// rewrite an operator's terminal when the metadata is listed.
pub fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(1024).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_connection() {
        let mut m = SessionMeta::default();
        apply_ssh_connection(&mut m, "127.0.0.1 50022 127.0.0.1 2222");
        assert_eq!(
            (m.client_addr.as_str(), m.client_port, m.server_port),
            ("127.0.0.1", 50022, 2222)
        );
    }

    #[test]
    fn plain_key_fingerprint() {
        // A throwaway ed25519 public key (all-zero key material is a valid point encoding for parsing).
        let line = "publickey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n";
        let a = parse_auth(line);
        assert_eq!(a.method, "publickey");
        assert!(a.key_fingerprint.starts_with("SHA256:"), "{a:?}");
    }

    #[test]
    fn hostile_content_is_kept_harmless() {
        let a = parse_auth("publickey ssh-ed25519 !!!notbase64\nkeyboard-interactive/pam \x1b[2J\n");
        assert!(a.key_fingerprint.is_empty());
        assert!(a.other_methods.iter().all(|m| !m.contains('\x1b')));
        assert!(a.other_methods.iter().any(|m| m.starts_with("unparsable key")));
    }
}
