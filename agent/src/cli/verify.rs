//! `shelltrail verify ID`: checks a stored session end to end, from its
//! bytes and its seal: every chunk present, in order, unaltered (the hash
//! chain from the session id through every chunk), decompressible, and the
//! whole of it the chain the host's agent sealed when the session ended
//! (the same number of chunks, ending in the same link), with the end
//! record and identity it sealed, under the host's key.
//!
//! It runs the same way on the host's spool and against a collector, so a
//! responder can check that what the collector holds is what was recorded.
//! Not OK: any chain problem; an ended session without a seal ("unsigned");
//! a seal that does not verify with the host's key (a chain rewritten with
//! recomputed hashes, a session cut short, an end edited, another host's
//! key); a session the agent sealed as cut short; a session the collector
//! flagged; a live session (nothing is sealed until it ends).
//!
//! The key is the collector's pin for the session's host, or this host's
//! `signing.pub` on a spool; `--host-key` gives one recorded elsewhere, which is
//! what catches someone who can rewrite the collector's store and its pin.

use crate::cli::Source;
use crate::cli::shown::shown;
use anyhow::{Context, Result};
use shelltrail_cast::chain::Walker;
use shelltrail_proto::seal::{self, Facts, PublicKey};
use shelltrail_proto::v1::CloseCheck;
use std::io::Write;

/// The key to check seals with, as given with `--host-key`: `ed25519:<base64>`,
/// or a file holding that (a host's `signing.pub`).
pub fn parse_key(arg: &str) -> Result<PublicKey> {
    if arg.trim_start().starts_with(seal::KEY_PREFIX) {
        return arg.parse().context("--host-key");
    }
    crate::agent::signer::read_public_key(std::path::Path::new(arg))
        .map_err(|e| anyhow::anyhow!("--host-key: {e} (give ed25519:<base64> or a file holding it)"))
}

/// Prints the report; returns whether the session verified.
pub fn run(src: &mut Source, id: &str, key: Option<&PublicKey>, out: &mut impl Write) -> Result<bool> {
    let row = src.find(id)?;
    let chunks = src.chunks(&row)?;
    let evidence = src.evidence(&row)?;
    let mut walker = if src.may_lack_first_chunks() {
        Walker::partial(&row.id, &row.lost_seqs)
    } else {
        Walker::new(&row.id, &row.lost_seqs)
    };
    for (seq, bytes) in &chunks {
        walker.feed(*seq, bytes);
    }
    let walk = walker.finish(row.last_seq);
    let mut problems: Vec<String> = walk.problems.iter().map(ToString::to_string).collect();
    let mut notes: Vec<String> = walk.notes.iter().map(ToString::to_string).collect();
    if !row.quarantine.is_empty() {
        problems.push(format!("the collector flagged this session: {}", row.quarantine));
    }

    // The seal: what the agent signed when the session ended.
    let (key, key_from) = match key {
        Some(k) => (Ok(*k), "given with --host-key".to_string()),
        None => (evidence.key.clone(), evidence.key_from.clone()),
    };
    let mut sealed_by = None;
    match &evidence.end {
        None => {}
        Some(end) => match &end.seal {
            None => problems.push(
                "unsigned: the session has no seal (ended under an agent older than sealing), so nothing proves \
                 its chunks and end are the ones recorded"
                    .into(),
            ),
            Some(s) => match &key {
                Err(why) => problems.push(format!("cannot check the seal: {why}")),
                Ok(key) => {
                    let facts = Facts::of(&evidence.start, end, walk.sealed_chunks(), walk.final_hash);
                    match seal::check(s, &facts, key) {
                        Err(e) => {
                            problems.push(format!("seal: {e}"));
                            if s.key != key.0 {
                                notes.push(format!(
                                    "the seal names key {}",
                                    PublicKey::from_bytes(&s.key).map_or_else(|e| e.to_string(), |k| k.to_string())
                                ));
                            }
                        }
                        Ok(()) => {
                            sealed_by = Some(format!("sealed by the agent of {} with {key} ({key_from})", s.host));
                            match s.close_check() {
                                CloseCheck::Disagreed => problems.push(format!(
                                    "the agent sealed this session as cut short: {}",
                                    s.close_problem
                                )),
                                CloseCheck::Unstated if end.cause != "recorder" => notes.push(format!(
                                    "ended by the agent ({}): the recorder never confirmed its end; sealed as the \
                                     agent held it, and what the recorder had not delivered is not here",
                                    end.cause
                                )),
                                CloseCheck::Unstated => notes.push(format!(
                                    "the recorder's end was not checked against the agent's chain: {}",
                                    s.close_problem
                                )),
                                CloseCheck::Agreed => {}
                            }
                        }
                    }
                }
            },
        },
    }

    // The texts hold what the source says (a collector's flag, the host
    // name a seal carries): shown escaped, like every field the CLI prints.
    for n in &notes {
        writeln!(out, "note: {}", shown(n))?;
    }
    for p in &problems {
        writeln!(out, "FAIL: {}", shown(p))?;
    }
    let parts = walk.chunks;
    match (&evidence.end, problems.is_empty(), sealed_by) {
        (Some(_), true, Some(by)) => {
            writeln!(
                out,
                "OK: session {} (ended): {parts} chunks, hash chain intact, {}",
                shown(&row.id),
                shown(&by)
            )?;
            Ok(true)
        }
        (None, true, _) => {
            writeln!(
                out,
                "NOT VERIFIED: session {} (live): {parts} chunks, hash chain intact so far; unsigned until it \
                 ends (verify it again then)",
                shown(&row.id)
            )?;
            Ok(false)
        }
        _ => {
            let state = if evidence.end.is_some() { "ended" } else { "live" };
            writeln!(
                out,
                "NOT OK: session {} ({state}): {} problem(s) in {parts} chunks",
                shown(&row.id),
                problems.len(),
            )?;
            Ok(false)
        }
    }
}
