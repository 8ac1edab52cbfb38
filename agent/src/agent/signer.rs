//! The host's signing key, and the seal the agent puts on each session as
//! it ends (see `shelltrail_proto::seal` for what is signed and why).
//!
//! The key is created by the agent at its first start (`[agent]
//! signing_key`, by default `signing.key` beside the spool directory: the
//! agent's state directory, the one place its unit lets it write), mode 0400
//! and owned by the agent's user, never readable by the `shelltrail` group
//! that reads recordings. Its public half goes beside it as `signing.pub`,
//! rewritten at every start, for `shelltrail verify` on this host and for
//! the operator to record (the collector pins the key on first contact).
//!
//! When a session ends the agent seals what it holds: the chain's last link
//! and the number of chunks, as it checked them on arrival, not as the
//! recorder says. The recorder's Close names its own chain end; the seal
//! says whether the two agree, so a session cut short between recorder and
//! agent is marked as such rather than sealed as whole.

use crate::agent::spool::{CloseRecord, OpenRecord};
use shelltrail_proto::seal::{Facts, PublicKey, SealError, SigningKey, short_hex};
use shelltrail_proto::v1::{Close, CloseCheck};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(
        "cannot create the signing key {path}: {error}. The agent creates it at its first start: its directory \
         must be writable by the agent's user (or set [agent] signing_key)"
    )]
    Create { path: PathBuf, error: std::io::Error },
    #[error("signing key {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("signing key {path}: {error}")]
    Key { path: PathBuf, error: SealError },
    #[error("cannot write the public key {path}: {error}")]
    Public { path: PathBuf, error: std::io::Error },
}

/// Who the agent saw open a session (its open record): part of the seal.
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub uid: u32,
    pub user: String,
    pub opened_unix_ms: i64,
}

impl Who {
    pub fn of(open: &OpenRecord) -> Who {
        Who {
            uid: open.peer_uid,
            user: open.peer_user.clone(),
            opened_unix_ms: open.opened_unix_ms,
        }
    }
}

/// The chain as the agent holds it: the first seq it does not have, and the
/// link hash of the last one it has (the chain seed if none).
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub next_seq: u64,
    pub last_hash: [u8; 32],
}

/// The host's key, and the name it signs as.
#[derive(Debug)]
pub struct Signer {
    key: SigningKey,
    host: String,
}

/// Where the public half of the key at `key` is written: `signing.pub` for
/// `signing.key`.
pub fn public_key_path(key: &Path) -> PathBuf {
    key.with_extension("pub")
}

/// Reads a public key file (`ed25519:<base64>`, as written beside the key).
pub fn read_public_key(path: &Path) -> Result<PublicKey, SignerError> {
    let text = std::fs::read_to_string(path).map_err(|e| SignerError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    text.parse().map_err(|error| SignerError::Key {
        path: path.to_path_buf(),
        error,
    })
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

/// The key at `path`, checked as the agent loads it (private to its owner,
/// PKCS#8 Ed25519); None if there is none yet.
fn load(path: &Path) -> Result<Option<SigningKey>, SignerError> {
    match shelltrail_collector::tls::read_pkcs8_key(path) {
        Ok(der) => SigningKey::from_pkcs8(&der)
            .map(Some)
            .map_err(|error| SignerError::Key {
                path: path.to_path_buf(),
                error,
            }),
        Err(shelltrail_collector::tls::TlsError::Read { error, .. })
            if error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(SignerError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        }),
    }
}

/// What `agent --check-config` says about the key at `path`, without
/// creating it: its public half, or that the agent will create it. An
/// unusable key is an error: the agent would not start with it.
pub fn describe(path: &Path) -> Result<String, SignerError> {
    Ok(match load(path)? {
        Some(k) => format!("sessions are sealed with {} (key {})", k.public_key(), path.display()),
        None => format!(
            "no signing key at {} yet: the agent creates it at its first start",
            path.display()
        ),
    })
}

impl Signer {
    /// Loads the key at `path`, creating it first if there is none, and
    /// (re)writes its public half beside it. `host` is the name seals carry.
    pub fn load_or_create(path: &Path, host: String) -> Result<Signer, SignerError> {
        let key = match load(path)? {
            Some(k) => k,
            None => Self::create(path)?,
        };
        let signer = Signer { key, host };
        signer.write_public(&public_key_path(path))?;
        Ok(signer)
    }

    /// A new key, written once: never over an existing file or through a link.
    fn create(path: &Path) -> Result<SigningKey, SignerError> {
        let err = |error| SignerError::Create {
            path: path.to_path_buf(),
            error,
        };
        let (key, der) = SigningKey::generate().map_err(|error| SignerError::Key {
            path: path.to_path_buf(),
            error,
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(err)?;
        f.write_all(pem(&der).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        tracing::info!(path = %path.display(), key = %key.public_key(), "created this host's session-signing key");
        Ok(key)
    }

    /// `signing.pub`: readable by whoever may read the spool (the file
    /// takes the directory's protection), replaced atomically.
    fn write_public(&self, path: &Path) -> Result<(), SignerError> {
        let err = |error| SignerError::Public {
            path: path.to_path_buf(),
            error,
        };
        let tmp = path.with_extension("pub.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(format!("{}\n", self.public_key()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Seals an end record: signs what the agent holds of the chain (`view`)
    /// with the end and `who`, after comparing the chain end the recorder's
    /// Close states (if it does) with the agent's own.
    pub fn seal(&self, rec: &mut CloseRecord, who: &Who, view: View) {
        let (check, problem) = if rec.cause == "recorder" {
            check_close(&rec.close, view)
        } else {
            (CloseCheck::Unstated, String::new())
        };
        if check == CloseCheck::Disagreed {
            tracing::error!(session = %rec.session_id, "sealing a session cut short: {problem}");
        }
        let facts = Facts {
            session_id: rec.session_id.clone(),
            uid: who.uid,
            user: who.user.clone(),
            opened_unix_ms: who.opened_unix_ms,
            chunks: held_chunks(&rec.close, view),
            final_hash: view.last_hash,
            close: rec.close.clone(),
            cause: rec.cause.clone(),
            closed_unix_ms: rec.closed_unix_ms,
        };
        rec.seal = Some(self.key.seal(&facts, &self.host, check, &problem));
    }
}

/// Chunks the agent holds: every seq below its next one, but those the
/// recorder declared lost (the only gaps the agent lets through).
fn held_chunks(close: &Close, view: View) -> u64 {
    let lost: std::collections::BTreeSet<u64> = close.lost_seqs.iter().copied().collect();
    view.next_seq - lost.range(..view.next_seq).count() as u64
}

/// Whether the recorder's Close names the chain end the agent holds.
fn check_close(close: &Close, view: View) -> (CloseCheck, String) {
    let Ok(theirs) = <[u8; 32]>::try_from(&close.final_hash[..]) else {
        return (
            CloseCheck::Unstated,
            "the recorder's Close does not say where its chain ends (a recorder older than the agent, or one \
             whose recording thread failed)"
                .into(),
        );
    };
    let disagree = |why: String| (CloseCheck::Disagreed, why);
    if close.chunks != close.last_seq + 1 && !(close.chunks == 0 && close.last_seq == 0) {
        return disagree(format!(
            "the recorder's Close says {} chunks but last chunk {}",
            close.chunks, close.last_seq
        ));
    }
    if view.next_seq > close.chunks {
        return disagree(format!(
            "the agent holds chunks up to {} but the recorder says it cut {}",
            view.next_seq - 1,
            close.chunks
        ));
    }
    if view.next_seq < close.chunks {
        let lost: std::collections::BTreeSet<u64> = close.lost_seqs.iter().copied().collect();
        let undeclared = (view.next_seq..close.chunks).find(|s| !lost.contains(s));
        return match undeclared {
            Some(s) => disagree(format!(
                "the recorder cut {} chunks but chunk {s} (and maybe more) never reached the agent, which holds \
                 {}: the session was cut short between them",
                close.chunks, view.next_seq
            )),
            // The last chunks were dropped at the recorder and say so.
            None => (CloseCheck::Agreed, String::new()),
        };
    }
    if theirs != view.last_hash {
        return disagree(format!(
            "the recorder's chain ends in {} but the agent's in {}: a chunk was replaced between them",
            short_hex(&theirs),
            short_hex(&view.last_hash)
        ));
    }
    (CloseCheck::Agreed, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn close(chunks: u64, hash: [u8; 32], lost: Vec<u64>) -> Close {
        Close {
            last_seq: chunks.saturating_sub(1),
            chunks,
            final_hash: hash.to_vec(),
            lost_seqs: lost,
            ..Default::default()
        }
    }

    #[test]
    fn the_recorders_close_is_held_against_the_agents_chain() {
        let view = View {
            next_seq: 5,
            last_hash: [1; 32],
        };
        assert_eq!(check_close(&close(5, [1; 32], vec![]), view).0, CloseCheck::Agreed);
        // Two more cut than arrived: cut short.
        let (c, why) = check_close(&close(7, [2; 32], vec![]), view);
        assert_eq!(c, CloseCheck::Disagreed);
        assert!(why.contains("chunk 5"), "{why}");
        // ...unless the recorder dropped them and said so.
        assert_eq!(check_close(&close(7, [2; 32], vec![5, 6]), view).0, CloseCheck::Agreed);
        // Same count, another end.
        assert_eq!(check_close(&close(5, [2; 32], vec![]), view).0, CloseCheck::Disagreed);
        assert_eq!(check_close(&close(4, [1; 32], vec![]), view).0, CloseCheck::Disagreed);
        // An old recorder says nothing.
        assert_eq!(check_close(&Close::default(), view).0, CloseCheck::Unstated);
        assert_eq!(held_chunks(&close(7, [2; 32], vec![2, 5, 6, 2]), view), 4);
    }

    #[test]
    fn the_key_is_created_private_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let a = Signer::load_or_create(&path, "h".into()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        let pub_path = public_key_path(&path);
        assert_eq!(pub_path, dir.path().join("signing.pub"));
        assert_eq!(read_public_key(&pub_path).unwrap(), a.public_key());
        let b = Signer::load_or_create(&path, "h".into()).unwrap();
        assert_eq!(a.public_key(), b.public_key());

        // A key others can read is refused, not used.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        let e = Signer::load_or_create(&path, "h".into()).unwrap_err();
        assert!(e.to_string().contains("open to other users"), "{e}");
        // A link where the key should be is not followed to create one.
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        assert!(Signer::load_or_create(&link, "h".into()).is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }

    #[test]
    fn seals_check_out_with_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(&dir.path().join("k.key"), "web01".into()).unwrap();
        let mut rec = CloseRecord {
            session_id: "0190a5f0-1c2d-7e3f-8a9b-0c1d2e3f4a5b".into(),
            close: close(3, [9; 32], vec![]),
            cause: "recorder".into(),
            closed_unix_ms: 5,
            seal: None,
        };
        let who = Who {
            uid: 1000,
            user: "alice".into(),
            opened_unix_ms: 1,
        };
        s.seal(
            &mut rec,
            &who,
            View {
                next_seq: 3,
                last_hash: [9; 32],
            },
        );
        let seal = rec.seal.clone().unwrap();
        assert_eq!(seal.close_check(), CloseCheck::Agreed);
        assert_eq!((seal.host.as_str(), seal.chunks), ("web01", 3));
        let facts = Facts {
            session_id: rec.session_id.clone(),
            uid: 1000,
            user: "alice".into(),
            opened_unix_ms: 1,
            chunks: 3,
            final_hash: [9; 32],
            close: rec.close.clone(),
            cause: "recorder".into(),
            closed_unix_ms: 5,
        };
        shelltrail_proto::seal::check(&seal, &facts, &s.public_key()).unwrap();
    }
}
