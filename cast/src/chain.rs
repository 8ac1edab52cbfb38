//! A session's hash chain: [`Chain`], the one link check every component
//! applies as chunks arrive (the agent's connections and start-up, the
//! shipper, the collector's append, re-index and compaction), and
//! [`Walker`], built on it, which every verifier uses (`shelltrail verify`,
//! on a spool or a collector) to walk a stored session and report.
//!
//! Feed it the session's stored bytes in order (recorder's chunks, or runs
//! of them as the collector keeps ended sessions); it checks that every
//! chunk is there once, in order, unaltered, and linked to the one before it
//! from the session's [`chain_seed`], and it counts what it walked: how many
//! chunks, and the link hash of the last one. Those two are what a session's
//! seal signs, so a chain rewritten with recomputed hashes, or cut short,
//! shows as a different count or final hash even where every link holds.
//!
//! Gaps the recorder declared (its `Close.lost_seqs`) are notes, not
//! problems: the chain restarts after them, unchecked across the gap.

use std::collections::{BTreeSet, HashMap};

use crate::chunk::{ChunkError, ChunkHeader, chain_seed};
use crate::run;

/// Where a session's chain stands: the seq it expects next and the link
/// hash that chunk must name as its `prev_hash`. Two words, so it is what
/// the spool stores as a session's resume point and what a stream resumes
/// from, with no chunk decompressed to find it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    last_hash: [u8; 32],
}

/// How a chunk relates to the chain it was offered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The next chunk, linked to the one before: the chain advanced.
    Next,
    /// A chunk after a gap (`missing`): the chain advanced past it, its link
    /// unchecked (nothing to check it against). Whether the gap is allowed
    /// (the recorder declared those chunks lost) is the caller's to judge.
    AfterGap { missing: std::ops::Range<u64> },
    /// A chunk already accepted (a resend): nothing changed.
    Repeat,
}

/// A chunk in the next position that does not name the chain's last link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk {seq} does not continue the hash chain (its prev_hash is not the link hash of chunk {before})", before = seq.wrapping_sub(1))]
pub struct Unlinked {
    pub seq: u64,
}

impl Chain {
    /// A new session's chain: chunk 0 follows the session's seed.
    pub fn new(session_id: &str) -> Chain {
        Chain {
            next_seq: 0,
            last_hash: chain_seed(session_id),
        }
    }

    /// A chain known to stand at `next_seq`, after a chunk whose link hash is `last_hash`.
    pub fn resume(next_seq: u64, last_hash: [u8; 32]) -> Chain {
        Chain { next_seq, last_hash }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The link hash of the last chunk accepted (the seed before any).
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }

    /// Offers the chunk with `header` whose link hash is `hash` (see
    /// [`crate::chunk::link_hash`]): advances the chain if it continues it.
    pub fn accept(&mut self, header: &ChunkHeader, hash: [u8; 32]) -> Result<Step, Unlinked> {
        let seq = header.seq;
        if seq < self.next_seq {
            return Ok(Step::Repeat);
        }
        let step = if seq == self.next_seq {
            if header.prev_hash != self.last_hash {
                return Err(Unlinked { seq });
            }
            Step::Next
        } else {
            Step::AfterGap {
                missing: self.next_seq..seq,
            }
        };
        self.next_seq = seq + 1;
        self.last_hash = hash;
        Ok(step)
    }

    /// Whether `accept` would take the chunk with `header` as the next one
    /// (or as a repeat or after a gap), without advancing.
    pub fn check(&self, header: &ChunkHeader) -> Result<(), Unlinked> {
        if header.seq == self.next_seq && header.prev_hash != self.last_hash {
            return Err(Unlinked { seq: header.seq });
        }
        Ok(())
    }
}

/// Something wrong with the stored chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A chunk's content or header no longer hashes to what was recorded.
    Altered { seq: u64 },
    /// Stored bytes that do not parse or decompress.
    Unreadable { seq: u64, error: String },
    /// Bytes stored as one chunk that say they are another.
    Reordered { stored_as: u64, says: u64 },
    /// A chunk met again, differently, after later ones.
    Duplicated { seq: u64, after: u64 },
    /// Chunks absent that the recorder did not declare lost.
    Missing { first: u64, last: u64 },
    /// A chunk whose prev_hash is not the link hash of the one before it.
    Unlinked { seq: u64 },
    /// Chunks absent at the end, before the session's last one.
    Truncated { first: u64, last: u64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Altered { seq } => write!(f, "chunk {seq} no longer hashes to what was recorded: altered"),
            Problem::Unreadable { seq, error } => write!(f, "chunk {seq}: unreadable: {error}"),
            Problem::Reordered { stored_as, says } => {
                write!(f, "chunk stored as {stored_as} says it is chunk {says}: reordered")
            }
            Problem::Duplicated { seq, after } => {
                write!(
                    f,
                    "chunk {seq} appears again after chunk {after}: duplicated or reordered"
                )
            }
            Problem::Missing { first, last } => write!(f, "chunks {first}..{last} are missing: deleted"),
            Problem::Unlinked { seq } => write!(
                f,
                "chunk {seq} does not follow chunk {}: altered, replaced or reordered",
                seq.wrapping_sub(1)
            ),
            Problem::Truncated { first, last } => {
                write!(f, "chunks {first}..{last} are missing at the end: truncated")
            }
        }
    }
}

/// Something worth saying that is not a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A partial walk started here: the chunks before are elsewhere.
    StartsAt { seq: u64 },
    /// Chunks the recorder declared lost.
    Lost { first: u64, last: u64 },
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::StartsAt { seq } => write!(
                f,
                "chunks before {seq} are not here (shipped and deleted from the spool): verifying from there"
            ),
            Note::Lost { first, last } => {
                write!(f, "chunks {first}..{last} were dropped by the recorder (recorded gap)")
            }
        }
    }
}

/// What a walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    pub problems: Vec<Problem>,
    pub notes: Vec<Note>,
    /// Chunks walked, each counted once.
    pub chunks: u64,
    /// The first chunk walked (0 unless the walk was partial).
    pub first_seq: u64,
    /// The link hash of the last chunk (highest seq) walked; the chain seed
    /// when there was none.
    pub final_hash: [u8; 32],
    lost_before_first: u64,
}

impl Walk {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The chunks the session holds, for its seal: those walked, and for a
    /// partial walk those before the first one walked that were not
    /// declared lost (taken on trust: they are not here to count).
    pub fn sealed_chunks(&self) -> u64 {
        self.chunks + (self.first_seq - self.lost_before_first)
    }
}

/// Walks one session's chain; see the module documentation.
#[derive(Debug)]
pub struct Walker {
    lost: BTreeSet<u64>,
    partial: bool,
    started: bool,
    /// The next seq expected, and the link hash it must follow.
    chain: Chain,
    /// Every chunk's hash, so that one read twice is told from one replaced:
    /// a collector that compacts the session while it is read answers the
    /// next read with a run that starts before it.
    seen: HashMap<u64, [u8; 32]>,
    last: Option<(u64, [u8; 32])>,
    walk: Walk,
}

impl Walker {
    /// A walk of the whole session `session_id` from chunk 0, given the
    /// chunks its recorder declared lost.
    pub fn new(session_id: &str, lost_seqs: &[u64]) -> Walker {
        let seed = chain_seed(session_id);
        Walker {
            lost: lost_seqs.iter().copied().collect(),
            partial: false,
            started: false,
            chain: Chain::new(session_id),
            seen: HashMap::new(),
            last: None,
            walk: Walk {
                problems: Vec::new(),
                notes: Vec::new(),
                chunks: 0,
                first_seq: 0,
                final_hash: seed,
                lost_before_first: 0,
            },
        }
    }

    /// A walk that may start after chunk 0: where the first chunks were
    /// deleted legitimately (a spool, after shipping them). It starts at the
    /// first chunk fed, from that chunk's own prev_hash.
    pub fn partial(session_id: &str, lost_seqs: &[u64]) -> Walker {
        Walker {
            partial: true,
            ..Walker::new(session_id, lost_seqs)
        }
    }

    /// The stored bytes that the store calls chunk `seq` (a chunk, or a run
    /// starting with it), next in order.
    pub fn feed(&mut self, seq: u64, bytes: &[u8]) {
        // A recorder's chunk, or a run of them: unpacking checks a run's
        // inner chain.
        let stored = run::unpack(bytes);
        if !self.started {
            self.started = true;
            if self.partial && seq != 0 {
                self.walk.notes.push(Note::StartsAt { seq });
                self.walk.first_seq = seq;
                self.walk.lost_before_first = self.lost.range(..seq).count() as u64;
                let from = stored.as_ref().ok().and_then(|u| u.parts.first());
                let prev = from.map_or(self.chain.last_hash(), |p| p.header.prev_hash);
                self.chain = Chain::resume(seq, prev);
            }
        }
        let stored = match stored {
            Ok(u) => u,
            Err(ChunkError::Altered { seq: at }) => {
                self.walk.problems.push(Problem::Altered { seq: at });
                self.skip_to(at + 1);
                return;
            }
            Err(e) => {
                self.walk.problems.push(Problem::Unreadable {
                    seq,
                    error: e.to_string(),
                });
                self.skip_to(seq + 1);
                return;
            }
        };
        if let Some(first) = stored.parts.first()
            && first.header.seq != seq
        {
            self.walk.problems.push(Problem::Reordered {
                stored_as: seq,
                says: first.header.seq,
            });
        }
        for part in &stored.parts {
            let seq = part.header.seq;
            if seq < self.chain.next_seq() && self.seen.get(&seq) == Some(&part.hash) {
                continue;
            }
            self.walk.chunks += 1;
            self.seen.insert(seq, part.hash);
            let after = self.chain.next_seq().wrapping_sub(1);
            match self.chain.accept(&part.header, part.hash) {
                Ok(Step::Next) => {}
                Ok(Step::Repeat) => self.walk.problems.push(Problem::Duplicated { seq, after }),
                Ok(Step::AfterGap { missing }) => {
                    let (first, last) = (missing.start, missing.end - 1);
                    if self.lost.range(missing.clone()).count() as u64 == missing.end - missing.start {
                        self.walk.notes.push(Note::Lost { first, last });
                    } else {
                        self.walk.problems.push(Problem::Missing { first, last });
                    }
                }
                Err(Unlinked { seq }) => {
                    self.walk.problems.push(Problem::Unlinked { seq });
                    // Walks on from the chunk as stored: one bad link is one problem.
                    self.chain = Chain::resume(seq + 1, part.hash);
                }
            }
            if self.last.is_none_or(|(s, _)| seq >= s) {
                self.last = Some((seq, part.hash));
            }
        }
    }

    /// Past stored bytes that could not be read, up to `next`: the chunk
    /// after them is checked against the last link read (there is no other).
    fn skip_to(&mut self, next: u64) {
        if next > self.chain.next_seq() {
            self.chain = Chain::resume(next, self.chain.last_hash());
        }
    }

    /// Ends the walk. `last_seq`: the session's last chunk, from its end
    /// record (None while it is live); missing chunks before it, not
    /// declared lost, are a truncation.
    pub fn finish(mut self, last_seq: Option<u64>) -> Walk {
        let next = self.chain.next_seq();
        if let Some(last) = last_seq
            && next <= last
        {
            // Walks the declared seqs, not the range: a forged huge last_seq costs nothing.
            let tail_lost = self.lost.range(next..=last).count() as u64 == (last - next).saturating_add(1);
            // An ended session with no chunk at all says last_seq 0 (its
            // seal says 0 chunks: one whose only chunk was deleted fails there).
            let empty = !self.started && last == 0;
            if tail_lost {
                self.walk.notes.push(Note::Lost { first: next, last });
            } else if !empty {
                self.walk.problems.push(Problem::Truncated { first: next, last });
            }
        }
        if let Some((_, h)) = self.last {
            self.walk.final_hash = h;
        }
        self.walk
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    fn header(seq: u64, prev: [u8; 32]) -> ChunkHeader {
        ChunkHeader {
            seq,
            prev_hash: prev,
            start_ms: 0,
            end_ms: 0,
            raw_len: 0,
        }
    }

    #[test]
    fn chain_advances_repeats_gaps_and_refuses_a_broken_link() {
        let mut c = Chain::new("s");
        assert_eq!(c.accept(&header(0, chain_seed("s")), [1; 32]), Ok(Step::Next));
        assert_eq!(c.accept(&header(0, chain_seed("s")), [1; 32]), Ok(Step::Repeat));
        assert_eq!(c.accept(&header(1, [9; 32]), [2; 32]), Err(Unlinked { seq: 1 }));
        assert_eq!(c, Chain::resume(1, [1; 32]), "a refused chunk changes nothing");
        assert_eq!(c.accept(&header(1, [1; 32]), [2; 32]), Ok(Step::Next));
        assert_eq!(
            c.accept(&header(5, [7; 32]), [5; 32]),
            Ok(Step::AfterGap { missing: 2..5 })
        );
        assert_eq!((c.next_seq(), c.last_hash()), (6, [5; 32]));
        assert!(c.check(&header(6, [0; 32])).is_err());
        assert!(c.check(&header(6, [5; 32])).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{self, Chunk, Chunker};

    fn session(id: &str, n: usize) -> Vec<Chunk> {
        let mut c = Chunker::new(id, 1);
        (0..n)
            .map(|i| {
                c.buffer()
                    .extend_from_slice(format!("[0.1, \"o\", \"line {i}\\r\\n\"]\n").as_bytes());
                c.cut(i as u64, i as u64).unwrap()
            })
            .collect()
    }

    fn walk(id: &str, chunks: &[&Chunk], lost: &[u64], last: Option<u64>) -> Walk {
        let mut w = Walker::new(id, lost);
        for c in chunks {
            w.feed(c.seq, &c.bytes);
        }
        w.finish(last)
    }

    #[test]
    fn a_whole_session_walks_clean_and_ends_in_its_last_hash() {
        let s = session("s", 5);
        let w = walk("s", &s.iter().collect::<Vec<_>>(), &[], Some(4));
        assert!(w.is_ok(), "{w:?}");
        assert_eq!((w.chunks, w.sealed_chunks(), w.final_hash), (5, 5, s[4].hash));
        // No chunk at all: the seed.
        let w = Walker::new("s", &[]).finish(Some(0));
        assert!(w.is_ok(), "{w:?}");
        assert_eq!((w.chunks, w.final_hash), (0, chunk::chain_seed("s")));
    }

    #[test]
    fn cut_short_ends_elsewhere() {
        let s = session("s", 5);
        // The end edited to match: the chain still holds, but it is shorter
        // and ends in another hash than the whole session's.
        let w = walk("s", &s[..3].iter().collect::<Vec<_>>(), &[], Some(2));
        assert!(w.is_ok());
        assert_eq!((w.chunks, w.final_hash), (3, s[2].hash));
        // The end left alone: truncated.
        let w = walk("s", &s[..3].iter().collect::<Vec<_>>(), &[], Some(4));
        assert_eq!(w.problems, vec![Problem::Truncated { first: 3, last: 4 }]);
    }

    #[test]
    fn gaps_deletions_and_reorders_are_named() {
        let s = session("s", 6);
        let w = walk("s", &[&s[0], &s[1], &s[3], &s[4], &s[5]], &[2], Some(5));
        assert!(w.is_ok(), "{w:?}");
        assert_eq!(w.notes, vec![Note::Lost { first: 2, last: 2 }]);
        assert_eq!(w.chunks, 5);
        let w = walk("s", &[&s[0], &s[1], &s[3], &s[4], &s[5]], &[], Some(5));
        assert_eq!(w.problems, vec![Problem::Missing { first: 2, last: 2 }]);
        let w = walk("s", &[&s[0], &s[2], &s[1]], &[], Some(2));
        assert!(w.problems.contains(&Problem::Missing { first: 1, last: 1 }), "{w:?}");
        assert!(w.problems.contains(&Problem::Duplicated { seq: 1, after: 2 }), "{w:?}");
        // A chunk met again leaves the chain where it was: the next one links.
        let w = walk("s", &[&s[0], &s[1], &s[3], &s[2], &s[4], &s[5]], &[], Some(5));
        assert_eq!(
            w.problems,
            vec![
                Problem::Missing { first: 2, last: 2 },
                Problem::Duplicated { seq: 2, after: 3 }
            ]
        );
        // Lost at the tail: a note, and the final hash is the last one held.
        let w = walk("s", &s[..4].iter().collect::<Vec<_>>(), &[4, 5], Some(5));
        assert!(w.is_ok(), "{w:?}");
        assert_eq!(w.final_hash, s[3].hash);
        // Another session's chunk 0.
        let other = session("t", 1);
        let w = walk("s", &[&other[0]], &[], Some(0));
        assert_eq!(w.problems, vec![Problem::Unlinked { seq: 0 }]);
    }

    #[test]
    fn a_missing_start_is_a_problem_unless_the_walk_is_partial() {
        let s = session("s", 5);
        let w = walk("s", &s[2..].iter().collect::<Vec<_>>(), &[], Some(4));
        assert_eq!(w.problems, vec![Problem::Missing { first: 0, last: 1 }]);
        let mut p = Walker::partial("s", &[0]);
        for c in &s[2..] {
            p.feed(c.seq, &c.bytes);
        }
        let w = p.finish(Some(4));
        assert!(w.is_ok(), "{w:?}");
        assert_eq!(w.notes, vec![Note::StartsAt { seq: 2 }]);
        assert_eq!((w.chunks, w.first_seq, w.sealed_chunks()), (3, 2, 4));
    }

    #[test]
    fn runs_walk_like_their_chunks_and_reads_twice_are_not_duplicates() {
        let s = session("s", 8);
        let open: Vec<_> = s.iter().map(|c| chunk::decompress(&c.bytes).unwrap()).collect();
        let refs: Vec<_> = open.iter().map(|(h, r)| (h.clone(), &r[..])).collect();
        let run = run::merge(&refs, 3).unwrap();
        let mut w = Walker::new("s", &[]);
        // Chunks 0..3 read, then the session compacted: the run again from 0.
        for c in &s[..3] {
            w.feed(c.seq, &c.bytes);
        }
        w.feed(0, &run);
        let w = w.finish(Some(7));
        assert!(w.is_ok(), "{w:?}");
        assert_eq!((w.chunks, w.final_hash), (8, s[7].hash));
    }
}
