//! Hosts' session-signing keys, pinned on first use.
//!
//! An agent announces its host's Ed25519 public key in every `AgentHello`.
//! The first key a host (the name in its client certificate) presents is
//! written to `DATA/host-keys/<host>` and from then on is the only key its
//! seals are checked against. The collector never replaces a pin by itself:
//! a host that presents another key (reinstalled, its key file lost, or an
//! impostor holding its certificate) is logged, and its sessions are flagged
//! as badly sealed until an operator, having checked the host, removes the
//! file; the next connection pins the key it then presents.
//!
//! What this gives: sessions shipped after the first contact are bound to
//! that key, and the key can be exported (`GetSession` returns it, `verify`
//! prints it) and kept off the collector. What it does not: the pin lives in
//! the store, so someone who can write the store can replace it and re-seal
//! with a key of their own; `shelltrail verify --host-key` with the key recorded
//! elsewhere is what catches that. And the first contact is trusted: a host
//! whose certificate was stolen before its agent ever shipped can be pinned
//! to the thief's key.
//!
//! File: `ed25519:<base64 of the 32 bytes>` and a newline; written to a
//! temporary name, synced, and linked into place, which fails if a pin
//! appeared meanwhile (two streams of one host at once).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use shelltrail_proto::seal::PublicKey;

use super::{StoreError, check_host, io_err, make_dir, sync_dir};

const DIR: &str = "host-keys";

/// What pinning a presented key found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPin {
    /// No key was pinned for the host: this one is now.
    New,
    /// The pinned key.
    Same,
    /// Another key is pinned; it stays.
    Different { pinned: PublicKey },
}

fn path(root: &Path, host: &str) -> PathBuf {
    root.join(DIR).join(host.to_ascii_lowercase())
}

/// The key pinned for `host`, if any.
pub(super) fn pinned(root: &Path, host: &str) -> Result<Option<PublicKey>, StoreError> {
    check_host(host)?;
    let p = path(root, host);
    match fs::read_to_string(&p) {
        Ok(text) => text.parse().map(Some).map_err(|e| StoreError::Corrupt {
            path: p,
            why: format!("not a pinned key ({e}): remove it to pin the host's key again"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&p, e)),
    }
}

/// Pins `key` for `host` unless a key is pinned already.
pub(super) fn pin(root: &Path, host: &str, key: &PublicKey) -> Result<KeyPin, StoreError> {
    if let Some(k) = pinned(root, host)? {
        return Ok(if k == *key {
            KeyPin::Same
        } else {
            KeyPin::Different { pinned: k }
        });
    }
    let dir = root.join(DIR);
    make_dir(&dir, true).map_err(|e| io_err(&dir, e))?;
    let dest = path(root, host);
    let tmp = dir.join(format!(".{}.{}.tmp", host.to_ascii_lowercase(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{key}\n").as_bytes())?;
            f.sync_all()
        });
    let linked = written.and_then(|()| fs::hard_link(&tmp, &dest));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(&dir)?;
            Ok(KeyPin::New)
        }
        // Another stream of the same host pinned first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => pin(root, host, key),
        Err(e) => Err(io_err(&dest, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        assert_eq!(pinned(dir.path(), "web01").unwrap(), None);
        assert_eq!(pin(dir.path(), "web01", &a).unwrap(), KeyPin::New);
        assert_eq!(pin(dir.path(), "WEB01", &a).unwrap(), KeyPin::Same);
        assert_eq!(pin(dir.path(), "web01", &b).unwrap(), KeyPin::Different { pinned: a });
        assert_eq!(pinned(dir.path(), "web01").unwrap(), Some(a));
        assert_eq!(pin(dir.path(), "web02", &b).unwrap(), KeyPin::New);
        // The operator's action: remove the pin; the next key is pinned.
        fs::remove_file(dir.path().join("host-keys/web01")).unwrap();
        assert_eq!(pin(dir.path(), "web01", &b).unwrap(), KeyPin::New);
        assert!(pinned(dir.path(), "../etc").is_err());
        fs::write(dir.path().join("host-keys/web03"), "garbage").unwrap();
        assert!(pinned(dir.path(), "web03").is_err());
    }
}
