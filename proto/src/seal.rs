//! Session seals: the agent's Ed25519 signature over how a session ended.
//!
//! The hash chain alone proves only that chunks link to each other: it is
//! unkeyed and starts from the session id, so whoever can write a copy of a
//! session (the spool, the collector's store) can rewrite a chunk and
//! recompute every link after it, or cut the last chunks off and edit the
//! end. The seal closes that: when a session ends, the agent signs with its
//! host's key the last link of the chain it holds and the number of chunks,
//! the end record, and who it saw open the session. A verifier rebuilds the
//! same [`statement`] from the records it holds and the chain it walked
//! itself; a rewritten chain ends in another hash, a cut one in fewer
//! chunks, and neither verifies.
//!
//! This module is the one place that says what is signed: the agent signs
//! with [`SigningKey::seal`], the collector and `shelltrail verify` check with
//! [`check`], both over [`statement`].
//!
//! # The statement (integers little-endian; `str` = u32 length + UTF-8)
//!
//! ```text
//! b"shelltrail-seal-v1\0"              domain separation: these bytes mean nothing else
//! str session_id, str host              host: the agent's own name (Seal.host)
//! u32 uid, str user, i64 opened_unix_ms who the agent saw open it (SO_PEERCRED), and when
//! u64 chunks, [32] final_hash           the chain the agent holds
//! str cause, i64 closed_unix_ms         the agent's end: "recorder" or "recorder vanished", when
//! i32 exit_status, i64 end_unix_ms      the recorder's Close, every field:
//! u64 last_seq, u64 n, u64 lost_seq*n
//! u64 bytes_out, u64 bytes_in
//! u8 transfer (0 or 1), then if 1: str program, u64 from_client, u64 to_client,
//!                                  str sha256_from_client, str sha256_to_client
//! u32 len, close.final_hash, u64 close.chunks
//! u8 close_check, str close_problem     whether the recorder's Close named the same chain end
//! ```
//!
//! A fixed layout rather than protobuf: a verifier built later, with fields
//! added to `Close`, still rebuilds exactly these bytes; a change of layout
//! takes a new domain string.

use crate::v1::{Close, CloseCheck, Seal, SessionEnd, SessionStart};
use base64::Engine as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// Domain separation of the signed bytes.
pub const DOMAIN: &[u8] = b"shelltrail-seal-v1\0";
/// How a public key is written: `ed25519:` and the 32 bytes in base64.
pub const KEY_PREFIX: &str = "ed25519:";

/// Why a seal, or a key, does not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("not an Ed25519 public key ({0}): expected ed25519:<base64 of 32 bytes>")]
    BadKey(String),
    #[error("not an Ed25519 private key in PKCS#8: {0}")]
    BadPrivateKey(String),
    #[error("cannot generate a key: no system randomness")]
    NoRandomness,
    #[error("the seal's signature is {0} bytes long, not 64: malformed")]
    BadSignature(usize),
    /// The seal is genuine, but the chain it was made over is not the one held now.
    #[error(
        "the chunks are not the ones sealed: the agent signed {signed_chunks} chunks ending in link {signed_hash}, \
         here are {chunks} ending in {hash} (chunks rewritten, cut off or added after the session ended)"
    )]
    Chain {
        signed_chunks: u64,
        signed_hash: String,
        chunks: u64,
        hash: String,
    },
    #[error(
        "the seal does not verify with {key}: the session was signed by another key (another host, or this host \
         before its key changed), or its end record or identity was altered after signing"
    )]
    Signature { key: String },
}

/// A host's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(b: &[u8]) -> Result<PublicKey, SealError> {
        <[u8; 32]>::try_from(b)
            .map(PublicKey)
            .map_err(|_| SealError::BadKey(format!("{} bytes, not 32", b.len())))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SealError;
    fn from_str(s: &str) -> Result<PublicKey, SealError> {
        let s = s.trim();
        let b64 = s
            .strip_prefix(KEY_PREFIX)
            .ok_or_else(|| SealError::BadKey(format!("{s:?} does not start with {KEY_PREFIX}")))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| SealError::BadKey(format!("base64: {e}")))?;
        PublicKey::from_bytes(&bytes)
    }
}

/// What a seal vouches for, as the signer or a verifier knows it: the
/// records every holder of the session keeps, and the chain as this holder
/// counted it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    pub session_id: String,
    /// The uid, user name and open time the agent recorded (SO_PEERCRED):
    /// `SessionStart.verified_uid`, `verified_user`, `opened_unix_ms`.
    pub uid: u32,
    pub user: String,
    pub opened_unix_ms: i64,
    /// Chunks held, and the link hash of the last one (the chain seed of the
    /// session id if none).
    pub chunks: u64,
    pub final_hash: [u8; 32],
    pub close: Close,
    pub cause: String,
    pub closed_unix_ms: i64,
}

impl Facts {
    /// From a session's start and end records (as shipped to and stored by
    /// the collector) and the chain as the caller counted it.
    pub fn of(start: &SessionStart, end: &SessionEnd, chunks: u64, final_hash: [u8; 32]) -> Facts {
        Facts {
            session_id: end.session_id.clone(),
            uid: start.verified_uid,
            user: start.verified_user.clone(),
            opened_unix_ms: start.opened_unix_ms,
            chunks,
            final_hash,
            close: end.close.clone().unwrap_or_default(),
            cause: end.cause.clone(),
            closed_unix_ms: end.closed_unix_ms,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Strings and hashes here are far below 4 GiB; a longer one would be cut
    // at the same length by signer and verifier alike.
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// The bytes a seal signs: `facts`, and the seal's own host name and close
/// check. See the module documentation for the layout.
pub fn statement(facts: &Facts, host: &str, check: CloseCheck, problem: &str) -> Vec<u8> {
    let c = &facts.close;
    let mut out = Vec::with_capacity(256 + 8 * c.lost_seqs.len());
    out.extend_from_slice(DOMAIN);
    put_str(&mut out, &facts.session_id);
    put_str(&mut out, host);
    out.extend_from_slice(&facts.uid.to_le_bytes());
    put_str(&mut out, &facts.user);
    out.extend_from_slice(&facts.opened_unix_ms.to_le_bytes());
    out.extend_from_slice(&facts.chunks.to_le_bytes());
    out.extend_from_slice(&facts.final_hash);
    put_str(&mut out, &facts.cause);
    out.extend_from_slice(&facts.closed_unix_ms.to_le_bytes());
    out.extend_from_slice(&c.exit_status.to_le_bytes());
    out.extend_from_slice(&c.end_unix_ms.to_le_bytes());
    out.extend_from_slice(&c.last_seq.to_le_bytes());
    out.extend_from_slice(&(c.lost_seqs.len() as u64).to_le_bytes());
    for s in &c.lost_seqs {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(&c.bytes_out.to_le_bytes());
    out.extend_from_slice(&c.bytes_in.to_le_bytes());
    match &c.transfer {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            put_str(&mut out, &t.program);
            out.extend_from_slice(&t.bytes_from_client.to_le_bytes());
            out.extend_from_slice(&t.bytes_to_client.to_le_bytes());
            put_str(&mut out, &t.sha256_from_client);
            put_str(&mut out, &t.sha256_to_client);
        }
    }
    put_bytes(&mut out, &c.final_hash);
    out.extend_from_slice(&c.chunks.to_le_bytes());
    out.push(check as i32 as u8);
    put_str(&mut out, problem);
    out
}

/// A host's signing key (Ed25519, through ring).
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// A new random key, and its PKCS#8 (v2) encoding to store.
    pub fn generate() -> Result<(SigningKey, Vec<u8>), SealError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| SealError::NoRandomness)?;
        let key = SigningKey::from_pkcs8(doc.as_ref())?;
        Ok((key, doc.as_ref().to_vec()))
    }

    /// A key from PKCS#8 DER: ours (v2), or v1 as `openssl genpkey
    /// -algorithm ed25519` writes it.
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, SealError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| SigningKey { pair })
            .map_err(|e| SealError::BadPrivateKey(e.to_string()))
    }

    pub fn public_key(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    /// Seals a session: signs [`statement`] of `facts` as `host`, with the
    /// outcome of comparing the recorder's Close with the chain held.
    pub fn seal(&self, facts: &Facts, host: &str, check: CloseCheck, problem: &str) -> Seal {
        let signature = self.pair.sign(&statement(facts, host, check, problem));
        Seal {
            host: host.to_owned(),
            final_hash: facts.final_hash.to_vec(),
            chunks: facts.chunks,
            close_check: check as i32,
            close_problem: problem.to_owned(),
            signature: signature.as_ref().to_vec(),
            key: self.public_key().0.to_vec(),
        }
    }
}

/// Checks `seal` against `facts` (what the caller holds) with `key` (the
/// host's key as the caller knows it, never the one the seal carries).
///
/// When the chain held is not the one sealed, says whether the seal itself
/// is genuine ([`SealError::Chain`]: the chunks changed after sealing) or
/// not ([`SealError::Signature`]).
pub fn check(seal: &Seal, facts: &Facts, key: &PublicKey) -> Result<(), SealError> {
    if seal.signature.len() != 64 {
        return Err(SealError::BadSignature(seal.signature.len()));
    }
    let check = seal.close_check();
    let verifies = |f: &Facts| {
        UnparsedPublicKey::new(&ED25519, &key.0)
            .verify(&statement(f, &seal.host, check, &seal.close_problem), &seal.signature)
            .is_ok()
    };
    if verifies(facts) {
        return Ok(());
    }
    let claimed = Facts {
        chunks: seal.chunks,
        final_hash: <[u8; 32]>::try_from(&seal.final_hash[..]).unwrap_or([0; 32]),
        ..facts.clone()
    };
    if claimed != *facts && verifies(&claimed) {
        return Err(SealError::Chain {
            signed_chunks: seal.chunks,
            signed_hash: short_hex(&seal.final_hash),
            chunks: facts.chunks,
            hash: short_hex(&facts.final_hash),
        });
    }
    Err(SealError::Signature { key: key.to_string() })
}

/// The first 8 bytes of a hash, in hex: enough to tell two apart in a message.
pub fn short_hex(h: &[u8]) -> String {
    hex::encode(&h[..h.len().min(8)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::TransferSummary;

    fn facts() -> Facts {
        Facts {
            session_id: "0190a5f0-1c2d-7e3f-8a9b-0c1d2e3f4a5b".into(),
            uid: 1000,
            user: "alice".into(),
            opened_unix_ms: 1_700_000_000_000,
            chunks: 12,
            final_hash: [7; 32],
            close: Close {
                exit_status: 3,
                last_seq: 12,
                lost_seqs: vec![5],
                end_unix_ms: 1_700_000_100_000,
                bytes_out: 4096,
                bytes_in: 17,
                transfer: None,
                final_hash: vec![7; 32],
                chunks: 13,
            },
            cause: "recorder".into(),
            closed_unix_ms: 1_700_000_100_002,
        }
    }

    #[test]
    fn a_seal_verifies_with_its_key_only() {
        let (key, _) = SigningKey::generate().unwrap();
        let seal = key.seal(&facts(), "web01", CloseCheck::Agreed, "");
        assert_eq!(check(&seal, &facts(), &key.public_key()), Ok(()));
        assert_eq!(seal.key, key.public_key().0.to_vec());
        let (other, _) = SigningKey::generate().unwrap();
        assert!(matches!(
            check(&seal, &facts(), &other.public_key()),
            Err(SealError::Signature { .. })
        ));
    }

    #[test]
    fn every_field_is_signed() {
        let (key, _) = SigningKey::generate().unwrap();
        let seal = key.seal(&facts(), "web01", CloseCheck::Agreed, "");
        let pk = key.public_key();
        type Change = fn(&mut Facts);
        let changes: &[(&str, Change)] = &[
            ("session_id", |f| f.session_id.push('0')),
            ("uid", |f| f.uid = 0),
            ("user", |f| f.user = "root".into()),
            ("opened", |f| f.opened_unix_ms += 1),
            ("cause", |f| f.cause = "recorder vanished".into()),
            ("closed", |f| f.closed_unix_ms -= 1),
            ("exit", |f| f.close.exit_status = 0),
            ("end", |f| f.close.end_unix_ms -= 1),
            ("last_seq", |f| f.close.last_seq = 11),
            ("lost", |f| f.close.lost_seqs.push(6)),
            ("lost order", |f| f.close.lost_seqs = vec![]),
            ("bytes_out", |f| f.close.bytes_out = 0),
            ("bytes_in", |f| f.close.bytes_in = 0),
            ("transfer", |f| {
                f.close.transfer = Some(TransferSummary::default());
            }),
            ("close hash", |f| f.close.final_hash = vec![8; 32]),
            ("close chunks", |f| f.close.chunks = 12),
        ];
        for (what, change) in changes {
            let mut f = facts();
            change(&mut f);
            assert!(
                matches!(check(&seal, &f, &pk), Err(SealError::Signature { .. })),
                "{what} is not covered"
            );
        }
        // The seal's own fields.
        for tamper in [
            |s: &mut Seal| s.host = "web02".into(),
            |s: &mut Seal| s.close_check = CloseCheck::Unstated as i32,
            |s: &mut Seal| s.close_problem = "x".into(),
        ] {
            let mut s = seal.clone();
            tamper(&mut s);
            assert!(matches!(check(&s, &facts(), &pk), Err(SealError::Signature { .. })));
        }
    }

    #[test]
    fn a_different_chain_is_named_as_such() {
        let (key, _) = SigningKey::generate().unwrap();
        let seal = key.seal(&facts(), "web01", CloseCheck::Agreed, "");
        let mut f = facts();
        f.chunks = 10;
        f.final_hash = [9; 32];
        match check(&seal, &f, &key.public_key()) {
            Err(SealError::Chain {
                signed_chunks: 12,
                chunks: 10,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // Claims edited to match a rewritten chain: the signature says no.
        let mut forged = seal.clone();
        forged.chunks = 10;
        forged.final_hash = vec![9; 32];
        assert!(matches!(
            check(&forged, &f, &key.public_key()),
            Err(SealError::Signature { .. })
        ));
        let mut short = seal;
        short.signature.pop();
        assert_eq!(
            check(&short, &facts(), &key.public_key()),
            Err(SealError::BadSignature(63))
        );
    }

    #[test]
    fn the_layout_is_stable() {
        // A statement is what every verifier rebuilds: its bytes must not
        // change without a new domain string.
        let s = statement(&facts(), "web01", CloseCheck::Agreed, "");
        assert!(s.starts_with(DOMAIN));
        assert_eq!(
            s.len(),
            19 + 40 + 9 + 4 + 9 + 8 + 8 + 32 + 12 + 8 + 4 + 8 + 8 + 16 + 8 + 8 + 1 + 36 + 8 + 1 + 4
        );
        assert_eq!(
            short_hex(ring::digest::digest(&ring::digest::SHA256, &s).as_ref()),
            "e074496c9da0351d"
        );
    }

    #[test]
    fn keys_round_trip_as_text_and_pkcs8() {
        let (key, der) = SigningKey::generate().unwrap();
        let text = key.public_key().to_string();
        assert!(text.starts_with("ed25519:"), "{text}");
        assert_eq!(text.parse::<PublicKey>().unwrap(), key.public_key());
        assert_eq!(SigningKey::from_pkcs8(&der).unwrap().public_key(), key.public_key());
        for bad in ["", "ed25519:", "ssh-ed25519 AAAA", "ed25519:AAAA", "ed25519:!!"] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
        assert!(SigningKey::from_pkcs8(b"not a key").is_err());
    }
}
