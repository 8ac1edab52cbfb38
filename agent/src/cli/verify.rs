//! `shelltrail verify ID`: checks a stored session end to end, from its
//! bytes alone: every chunk present, in order, unaltered (the hash chain
//! from the session id through every chunk), and decompressible.
//!
//! It runs the same way on the host's spool and against a collector, so a
//! responder can check that what the collector holds is what was recorded.

use crate::cli::Source;
use crate::cli::shown::shown;
use anyhow::Result;
use shelltrail_cast::chunk::{self, ChunkError};
use shelltrail_cast::run;
use std::io::Write;

/// Prints the report; returns whether the session verified.
pub fn run(src: &mut Source, id: &str, out: &mut impl Write) -> Result<bool> {
    let row = src.find(id)?;
    let chunks = src.chunks(&row)?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut expect = 0u64;
    let mut prev = chunk::chain_seed(&row.id);
    let mut parts = 0usize;
    // Every chunk's hash, so that one read twice is told from one replaced:
    // a collector that compacts the session while it is read here answers
    // the next read with a run that starts before it.
    let mut seen: std::collections::HashMap<u64, [u8; 32]> = std::collections::HashMap::new();
    if row.first_chunk_missing(&chunks) {
        notes.push(format!(
            "chunks before {} are not here (shipped and deleted from the spool): verifying from there",
            chunks[0].0
        ));
        expect = chunks[0].0;
        if let Ok(u) = run::unpack(&chunks[0].1)
            && let Some(p) = u.parts.first()
        {
            prev = p.header.prev_hash;
        }
    }
    for (seq, bytes) in &chunks {
        // A recorder's chunk, or a run of them (how the collector keeps
        // ended sessions): unpacking checks a run's inner chain.
        let stored = match run::unpack(bytes) {
            Ok(u) => u,
            Err(ChunkError::Altered { seq: at }) => {
                problems.push(format!("chunk {at} no longer hashes to what was recorded: altered"));
                expect = expect.max(at + 1);
                continue;
            }
            Err(e) => {
                problems.push(format!("chunk {seq}: unreadable: {e}"));
                expect = expect.max(seq + 1);
                continue;
            }
        };
        if stored.parts.first().is_some_and(|p| p.header.seq != *seq) {
            problems.push(format!(
                "chunk stored as {seq} says it is chunk {}: reordered",
                stored.parts[0].header.seq
            ));
        }
        for part in &stored.parts {
            let (seq, head) = (part.header.seq, &part.header);
            if seq < expect && seen.get(&seq) == Some(&part.hash) {
                continue;
            }
            parts += 1;
            seen.insert(seq, part.hash);
            if seq < expect {
                problems.push(format!(
                    "chunk {seq} appears again after chunk {}: duplicated or reordered",
                    expect - 1
                ));
            } else if seq > expect {
                let gap: Vec<u64> = (expect..seq).collect();
                if gap.iter().all(|s| row.lost_seqs.contains(s)) {
                    notes.push(format!(
                        "chunks {expect}..{} were dropped by the recorder (recorded gap)",
                        seq - 1
                    ));
                } else {
                    problems.push(format!("chunks {expect}..{} are missing: deleted", seq - 1));
                }
            } else if head.prev_hash != prev {
                problems.push(format!(
                    "chunk {seq} does not follow chunk {}: altered, replaced or reordered",
                    seq.wrapping_sub(1)
                ));
            }
            prev = part.hash;
            expect = expect.max(seq + 1);
        }
    }
    if let Some(last) = row.last_seq
        && expect <= last
    {
        problems.push(format!("chunks {expect}..{last} are missing at the end: truncated"));
    }
    for n in &notes {
        writeln!(out, "note: {n}")?;
    }
    for p in &problems {
        writeln!(out, "FAIL: {p}")?;
    }
    let state = if row.live { "live" } else { "ended" };
    if problems.is_empty() {
        writeln!(
            out,
            "OK: session {} ({state}): {parts} chunks, hash chain intact",
            shown(&row.id),
        )?;
    } else {
        writeln!(
            out,
            "session {} ({state}): {} problem(s) in {parts} chunks",
            shown(&row.id),
            problems.len(),
        )?;
    }
    Ok(problems.is_empty())
}
