//! `shelltrail verify ID`: checks a stored session end to end, from its
//! bytes alone: every chunk present, in order, unaltered (the hash chain
//! from the session id through every chunk), and decompressible.
//!
//! It runs the same way on the host's spool and against a collector, so a
//! responder can check that what the collector holds is what was recorded.

use crate::cli::Source;
use anyhow::Result;
use shelltrail_cast::chunk;
use std::io::Write;

/// Prints the report; returns whether the session verified.
pub fn run(src: &mut Source, id: &str, out: &mut impl Write) -> Result<bool> {
    let row = src.find(id)?;
    let chunks = src.chunks(&row)?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut expect = 0u64;
    let mut prev = chunk::chain_seed(&row.id);
    if row.first_chunk_missing(&chunks) {
        notes.push(format!(
            "chunks before {} are not here (shipped and deleted from the spool): verifying from there",
            chunks[0].0
        ));
        expect = chunks[0].0;
        prev = chunk::parse(&chunks[0].1).map(|(h, _)| h.prev_hash).unwrap_or(prev);
    }
    for (seq, bytes) in &chunks {
        let (head, _) = match chunk::parse(bytes) {
            Ok(h) => h,
            Err(e) => {
                problems.push(format!("chunk {seq}: unreadable header: {e}"));
                expect = seq + 1;
                continue;
            }
        };
        if head.seq != *seq {
            problems.push(format!(
                "chunk stored as {seq} says it is chunk {}: reordered",
                head.seq
            ));
        }
        if *seq < expect {
            problems.push(format!(
                "chunk {seq} appears again after chunk {}: duplicated or reordered",
                expect - 1
            ));
        } else if *seq > expect {
            let gap: Vec<u64> = (expect..*seq).collect();
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
        if let Err(e) = chunk::decompress(bytes) {
            problems.push(format!("chunk {seq} is corrupt: {e}"));
        }
        prev = chunk::hash(bytes);
        expect = expect.max(seq + 1);
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
            "OK: session {} ({state}): {} chunks, hash chain intact",
            row.id,
            chunks.len()
        )?;
    } else {
        writeln!(
            out,
            "session {} ({state}): {} problem(s) in {} chunks",
            row.id,
            problems.len(),
            chunks.len()
        )?;
    }
    Ok(problems.is_empty())
}
