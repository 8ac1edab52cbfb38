//! Runs: consecutive chunks of an ended session compressed again as one
//! zstd frame, the form in which the collector keeps a session for good.
//!
//! The recorder cuts a chunk at least every 100 ms so that live output
//! reaches the agent and the people following it in time, and each chunk is
//! an independent zstd frame. Short frames compress poorly on their own: a
//! busy interactive session's chunks take over twice what `zstd -3` makes of
//! the whole file. Once a session has ended nobody needs that granularity
//! for delivery, so the collector merges each stretch of consecutive chunks
//! into a run: one frame over their content, preceded by a small table of
//! the parts, so that every recorded chunk can still be checked and named.
//!
//! The hash chain covers each chunk's header payload and content, not its
//! compressed bytes ([`link_hash`]), so the parts of a run link exactly as
//! the recorder's chunks did. A run keeps the first part's `prev_hash`, the
//! last part's link hash, and the first 4 bytes of every part's link hash:
//! a verifier recomputes the chain through the run and names the first part
//! that no longer matches.
//!
//! Like a chunk, a run is a zstd skippable frame followed by one ordinary
//! zstd frame, so a stored session is still a valid `.cast.zst`.
//!
//! # Layout (integers little-endian)
//!
//! | offset | size | field      | meaning                                               |
//! |-------:|-----:|------------|-------------------------------------------------------|
//! | 0      | 4    | magic      | `0x184D2A5B`, a zstd skippable-frame magic            |
//! | 4      | 4    | frame size | 80 + the length of the parts table                    |
//! | 8      | 4    | tag        | `b"STC2"` (shelltrail run, layout 2)                  |
//! | 12     | 8    | first_seq  | seq of the first part; the others follow one by one   |
//! | 20     | 4    | count      | number of parts, 1 to [`MAX_PARTS`]                   |
//! | 24     | 32   | prev_hash  | the first part's prev_hash                            |
//! | 56     | 32   | last_hash  | the last part's link hash                             |
//! | 88     | ...  | parts      | per part: start_ms (zigzag delta from the previous part's start, LEB128), end_ms - start_ms (zigzag, LEB128), raw_len (LEB128), the first 4 bytes of its link hash |
//! | ...    | ...  | zstd frame | the parts' content, concatenated, with a checksum     |

use std::ops::Range;

use crate::chain::{Chain, Step};
use crate::chunk::{self, ChunkError, ChunkHeader, link_hash};

/// Tag of a run's skippable frame.
pub const TAG: &[u8; 4] = b"STC2";
/// Most parts in one run.
pub const MAX_PARTS: usize = 1 << 16;
/// Most uncompressed bytes in one run: bounds what a decoder allocates.
pub const MAX_RAW: usize = 64 << 20;
/// Fixed part of the skippable frame's payload (tag to last_hash).
const FIXED: usize = 80;
/// Longest parts-table entry: two 64-bit and one 32-bit LEB128, 4 hash bytes.
const MAX_ENTRY: usize = 10 + 10 + 5 + 4;
/// Largest skippable-frame payload of a run.
pub const MAX_HEADER: usize = FIXED + MAX_PARTS * MAX_ENTRY;
/// Bytes of a part's link hash kept in the table.
const HASH_PREFIX: usize = 4;

/// One recorded chunk inside stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The chunk's header as the recorder wrote it.
    pub header: ChunkHeader,
    /// Its link hash (what the next chunk's prev_hash is).
    pub hash: [u8; 32],
    /// Where its content is in [`Unpacked::raw`].
    pub raw: Range<usize>,
}

/// Stored bytes (a chunk or a run), decompressed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub parts: Vec<Part>,
    pub raw: Vec<u8>,
}

impl Unpacked {
    /// The content of `part`.
    pub fn content(&self, part: &Part) -> &[u8] {
        &self.raw[part.raw.clone()]
    }

    /// The last part's link hash: what the next stored bytes must link to.
    pub fn last_hash(&self) -> Option<[u8; 32]> {
        self.parts.last().map(|p| p.hash)
    }
}

fn bad(why: impl Into<String>) -> ChunkError {
    ChunkError::BadRun(why.into())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint in its one shortest encoding: stored bytes that
/// mean the same thing are the same bytes.
fn get_varint(b: &[u8], pos: &mut usize) -> Result<u64, ChunkError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or_else(|| bad("parts table cut short"))?;
        *pos += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(bad("varint longer than 64 bits"));
        }
        v |= bits << shift;
        if byte & 0x80 == 0 {
            if byte == 0 && shift > 0 {
                return Err(bad("varint not in its shortest form"));
            }
            return Ok(v);
        }
    }
    Err(bad("varint longer than 64 bits"))
}

/// Merges consecutive chunks, given as their headers and contents in seq
/// order, into one run compressed at zstd `level`.
///
/// Refuses chunks that are not consecutive or do not link by hash (a run
/// never spans a gap or a chain restart), contents that do not match their
/// header's length, and more than [`MAX_PARTS`] parts or [`MAX_RAW`] bytes.
pub fn merge(chunks: &[(ChunkHeader, &[u8])], level: i32) -> Result<Vec<u8>, ChunkError> {
    let (Some(first), Some(_)) = (chunks.first(), chunks.last()) else {
        return Err(bad("a run needs at least one chunk"));
    };
    if chunks.len() > MAX_PARTS {
        return Err(bad(format!("{} chunks, more than {MAX_PARTS}", chunks.len())));
    }
    let total: usize = chunks.iter().map(|(_, raw)| raw.len()).sum();
    if total > MAX_RAW {
        return Err(ChunkError::RawTooLarge(total.min(u32::MAX as usize) as u32));
    }
    let mut table = Vec::with_capacity(chunks.len() * 8);
    let mut content = Vec::with_capacity(total);
    let mut chain = Chain::resume(first.0.seq, first.0.prev_hash);
    let mut prev_start = 0u64;
    for (h, raw) in chunks {
        let want = chain.next_seq();
        let hash = link_hash(h, raw);
        match chain.accept(h, hash) {
            Ok(Step::Next) => {}
            Ok(Step::AfterGap { .. } | Step::Repeat) => {
                return Err(bad(format!("chunk {} where chunk {want} should follow", h.seq)));
            }
            Err(_) => return Err(bad(format!("chunk {} does not link to the chunk before it", h.seq))),
        }
        if h.raw_len as usize != raw.len() {
            return Err(ChunkError::LengthMismatch {
                expected: h.raw_len,
                actual: raw.len(),
            });
        }
        put_varint(&mut table, zigzag(h.start_ms.wrapping_sub(prev_start) as i64));
        put_varint(&mut table, zigzag(h.end_ms.wrapping_sub(h.start_ms) as i64));
        put_varint(&mut table, u64::from(h.raw_len));
        table.extend_from_slice(&hash[..HASH_PREFIX]);
        content.extend_from_slice(raw);
        prev_start = h.start_ms;
    }
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(|e| ChunkError::Zstd(e.to_string()))?;
    compressor
        .include_checksum(true)
        .map_err(|e| ChunkError::Zstd(e.to_string()))?;
    let frame = compressor
        .compress(&content)
        .map_err(|e| ChunkError::Zstd(e.to_string()))?;

    let mut out = Vec::with_capacity(8 + FIXED + table.len() + frame.len());
    out.extend_from_slice(&chunk::SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&((FIXED + table.len()) as u32).to_le_bytes());
    out.extend_from_slice(TAG);
    out.extend_from_slice(&first.0.seq.to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    out.extend_from_slice(&first.0.prev_hash);
    out.extend_from_slice(&chain.last_hash());
    out.extend_from_slice(&table);
    out.extend_from_slice(&frame);
    Ok(out)
}

/// The seqs stored bytes hold (first and last), from the header alone: the
/// first [`chunk::HEADER_PREFIX`] bytes are enough.
pub fn seqs(bytes: &[u8]) -> Result<(u64, u64), ChunkError> {
    if bytes.len() < chunk::HEADER_PREFIX {
        return Err(chunk::truncated(chunk::HEADER_PREFIX, bytes.len()));
    }
    let magic = chunk::read_u32(bytes, 0);
    if magic != chunk::SKIPPABLE_MAGIC {
        return Err(ChunkError::BadMagic(magic));
    }
    let first = chunk::read_u64(bytes, 12);
    match &bytes[8..12] {
        t if t == TAG => {
            let count = u64::from(chunk::read_u32(bytes, 20));
            if count == 0 || count > MAX_PARTS as u64 {
                return Err(bad(format!("{count} parts")));
            }
            let last = first.checked_add(count - 1).ok_or_else(|| bad("seqs overflow"))?;
            Ok((first, last))
        }
        t if t == chunk::TAG => Ok((first, first)),
        t => Err(ChunkError::BadTag([t[0], t[1], t[2], t[3]])),
    }
}

/// Decompresses stored bytes, a recorder's chunk or a run, into its parts,
/// and checks a run's parts against its table and its last hash.
///
/// For a chunk this is [`chunk::decompress`] and [`link_hash`]: whether it
/// links to the chunk before it is for the caller to check, with the first
/// part's `prev_hash`. For a run, the chain inside it is checked here; an
/// altered part is named by [`ChunkError::Altered`].
pub fn unpack(bytes: &[u8]) -> Result<Unpacked, ChunkError> {
    let header_len = chunk::skippable_len(bytes)?;
    if bytes.len() < header_len {
        return Err(chunk::truncated(header_len, bytes.len()));
    }
    if &bytes[8..12] != TAG {
        let (header, raw) = chunk::decompress(bytes)?;
        let hash = link_hash(&header, &raw);
        let len = raw.len();
        return Ok(Unpacked {
            parts: vec![Part {
                header,
                hash,
                raw: 0..len,
            }],
            raw,
        });
    }
    if header_len < 8 + FIXED {
        return Err(bad("header too short"));
    }
    let (first_seq, _) = seqs(bytes)?;
    let count = chunk::read_u32(bytes, 20) as usize;
    let mut prev_hash = [0u8; 32];
    prev_hash.copy_from_slice(&bytes[24..56]);
    let mut last_hash = [0u8; 32];
    last_hash.copy_from_slice(&bytes[56..88]);
    let table = &bytes[88..header_len];

    let mut pos = 0usize;
    let mut entries = Vec::with_capacity(count);
    let mut start = 0u64;
    let mut total = 0u64;
    for _ in 0..count {
        start = start.wrapping_add(unzigzag(get_varint(table, &mut pos)?) as u64);
        let end = start.wrapping_add(unzigzag(get_varint(table, &mut pos)?) as u64);
        let raw_len = u32::try_from(get_varint(table, &mut pos)?).map_err(|_| bad("part longer than 4 GiB"))?;
        let prefix = table
            .get(pos..pos + HASH_PREFIX)
            .ok_or_else(|| bad("parts table cut short"))?;
        pos += HASH_PREFIX;
        total += u64::from(raw_len);
        entries.push((start, end, raw_len, [prefix[0], prefix[1], prefix[2], prefix[3]]));
    }
    if pos != table.len() {
        return Err(bad(format!("{} bytes after the parts table", table.len() - pos)));
    }
    if total > MAX_RAW as u64 {
        return Err(ChunkError::RawTooLarge(total.min(u64::from(u32::MAX)) as u32));
    }
    let frame = &bytes[header_len..];
    let len = chunk::frame_len(frame)?;
    if len < frame.len() {
        return Err(ChunkError::TrailingBytes(frame.len() - len));
    }
    let raw = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress(frame, total as usize))
        .map_err(|e| ChunkError::Zstd(e.to_string()))?;
    if raw.len() as u64 != total {
        return Err(ChunkError::RunLength {
            expected: total,
            actual: raw.len(),
        });
    }

    let mut parts = Vec::with_capacity(count);
    let mut at = 0usize;
    for (i, (start_ms, end_ms, raw_len, prefix)) in entries.into_iter().enumerate() {
        let header = ChunkHeader {
            seq: first_seq + i as u64,
            prev_hash,
            start_ms,
            end_ms,
            raw_len,
        };
        let range = at..at + raw_len as usize;
        let hash = link_hash(&header, &raw[range.clone()]);
        if hash[..HASH_PREFIX] != prefix {
            return Err(ChunkError::Altered { seq: header.seq });
        }
        prev_hash = hash;
        at = range.end;
        parts.push(Part {
            header,
            hash,
            raw: range,
        });
    }
    if prev_hash != last_hash {
        return Err(ChunkError::Altered {
            seq: first_seq + count as u64 - 1,
        });
    }
    Ok(Unpacked { parts, raw })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{Chunk, Chunker, chain_seed, decompress};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn session(batches: &[Vec<u8>]) -> Vec<Chunk> {
        let mut c = Chunker::new("sess", 1);
        batches
            .iter()
            .enumerate()
            .map(|(k, b)| {
                c.buffer().extend_from_slice(b);
                c.cut(k as u64 * 100, k as u64 * 100 + 40).unwrap()
            })
            .collect()
    }

    fn opened(chunks: &[Chunk]) -> Vec<(ChunkHeader, Vec<u8>)> {
        chunks.iter().map(|c| decompress(&c.bytes).unwrap()).collect()
    }

    fn run_of(opened: &[(ChunkHeader, Vec<u8>)]) -> Vec<u8> {
        let refs: Vec<(ChunkHeader, &[u8])> = opened.iter().map(|(h, r)| (h.clone(), &r[..])).collect();
        merge(&refs, 3).unwrap()
    }

    fn lines(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("[0.1, \"o\", \"line {i} of a busy session\\r\\n\"]\n").into_bytes())
            .collect()
    }

    #[test]
    fn a_run_holds_the_chunks_it_merged() {
        let chunks = session(&lines(50));
        let open = opened(&chunks);
        let run = run_of(&open);
        assert_eq!(&run[8..12], b"STC2");
        let u = unpack(&run).unwrap();
        assert_eq!(u.parts.len(), 50);
        for (p, (c, (h, raw))) in u.parts.iter().zip(chunks.iter().zip(&open)) {
            assert_eq!(&p.header, h);
            assert_eq!(p.hash, c.hash);
            assert_eq!(u.content(p), &raw[..]);
        }
        assert_eq!(u.parts[0].header.prev_hash, chain_seed("sess"));
        assert_eq!(seqs(&run).unwrap(), (0, 49));
        // Still a .cast.zst for plain zstd, and smaller than the chunks.
        let all: Vec<u8> = open.iter().flat_map(|(_, r)| r.clone()).collect();
        assert_eq!(zstd::stream::decode_all(&run[..]).unwrap(), all);
        let chunked: usize = chunks.iter().map(|c| c.bytes.len()).sum();
        assert!(run.len() * 4 < chunked, "{} vs {chunked}", run.len());
    }

    #[test]
    fn a_chunk_unpacks_to_one_part() {
        let chunks = session(&lines(1));
        let u = unpack(&chunks[0].bytes).unwrap();
        assert_eq!(u.parts.len(), 1);
        assert_eq!(u.parts[0].hash, chunks[0].hash);
        assert_eq!(seqs(&chunks[0].bytes).unwrap(), (0, 0));
    }

    #[test]
    fn merge_refuses_what_is_not_one_stretch_of_the_chain() {
        let open = opened(&session(&lines(4)));
        let refs: Vec<(ChunkHeader, &[u8])> = open.iter().map(|(h, r)| (h.clone(), &r[..])).collect();
        assert!(merge(&[], 3).is_err());
        // A gap.
        assert!(merge(&[refs[0].clone(), refs[2].clone()], 3).is_err());
        // A part whose content is not what its successor linked to.
        let mut altered = refs.clone();
        altered[1].1 = &open[0].1;
        altered[1].0.raw_len = open[0].1.len() as u32;
        assert!(merge(&altered, 3).is_err());
        // A run may start anywhere in the chain.
        let u = unpack(&merge(&refs[1..], 3).unwrap()).unwrap();
        assert_eq!(u.parts[0].header.seq, 1);
    }

    #[test]
    fn an_altered_part_is_named() {
        let open = opened(&session(&lines(20)));
        let run = run_of(&open);
        let frame_at = chunk::skippable_len(&run).unwrap();
        // One byte of part 12's content changed, recompressed consistently
        // (checksum and all): the chain through the run names part 12.
        let mut all: Vec<u8> = open.iter().flat_map(|(_, r)| r.clone()).collect();
        let at: usize = open[..12].iter().map(|(_, r)| r.len()).sum::<usize>() + 3;
        all[at] ^= 1;
        let mut spliced = run[..frame_at].to_vec();
        spliced.extend(zstd::bulk::compress(&all, 3).unwrap());
        assert!(matches!(unpack(&spliced), Err(ChunkError::Altered { seq: 12 })));
        // A part dropped from the content: the lengths no longer add up.
        let mut spliced = run[..frame_at].to_vec();
        spliced.extend(zstd::bulk::compress(&all[..all.len() - open[19].1.len()], 3).unwrap());
        assert!(matches!(unpack(&spliced), Err(ChunkError::RunLength { .. })));
    }

    #[test]
    fn varints_have_one_encoding() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
        // 1 written in two bytes, and 2^64 + 1.
        assert!(get_varint(&[0x81, 0x00], &mut 0).is_err());
        assert!(get_varint(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02], &mut 0).is_err());
    }

    #[test]
    fn truncated_runs_are_errors() {
        let run = run_of(&opened(&session(&lines(5))));
        for len in 0..run.len() {
            assert!(unpack(&run[..len]).is_err(), "len {len}");
        }
        let mut longer = run.clone();
        longer.push(0);
        assert!(matches!(unpack(&longer), Err(ChunkError::TrailingBytes(1))));
        // The framing walks runs like chunks.
        let mut two = run.clone();
        two.extend_from_slice(&run);
        assert_eq!(chunk::split(&two).unwrap().len(), 2);
    }

    proptest! {
        #[test]
        fn merge_then_unpack_round_trips(batches in vec(vec(any::<u8>(), 0..300), 1..20), from in 0usize..20) {
            let batches: Vec<Vec<u8>> = batches.into_iter().map(|mut b| { b.push(b'\n'); b }).collect();
            let chunks = session(&batches);
            let open = opened(&chunks);
            let from = from % open.len();
            let run = run_of(&open[from..]);
            let u = unpack(&run).unwrap();
            prop_assert_eq!(u.parts.len(), open.len() - from);
            for (p, (c, (h, raw))) in u.parts.iter().zip(chunks[from..].iter().zip(&open[from..])) {
                prop_assert_eq!(&p.header, h);
                prop_assert_eq!(p.hash, c.hash);
                prop_assert_eq!(u.content(p), &raw[..]);
            }
        }

        #[test]
        fn flipped_bits_never_pass_as_other_content(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let open = opened(&session(&lines(8)));
            let run = run_of(&open);
            let mut b = run.clone();
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
            if let Ok(u) = unpack(&b) {
                let orig = unpack(&run).unwrap();
                prop_assert_eq!(u.last_hash(), orig.last_hash());
                prop_assert_eq!(u.raw, orig.raw);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in vec(any::<u8>(), 0..300)) {
            let mut b = chunk::SKIPPABLE_MAGIC.to_le_bytes().to_vec();
            b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            b.extend_from_slice(TAG);
            b.extend_from_slice(&bytes);
            let _ = unpack(&b);
            let _ = seqs(&b);
            let _ = unpack(&bytes);
        }
    }
}
