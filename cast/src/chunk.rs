//! The chunk format: how a recording's event lines are stored and shipped.
//!
//! The recorder cannot wait for a session to end before saving it (sessions
//! last days, machines crash), so the event stream produced by the
//! [`Encoder`](crate::asciicast::Encoder) is cut into chunks of complete
//! lines as it grows. Each chunk is:
//!
//! 1. a zstd *skippable frame* carrying shelltrail's chunk header, then
//! 2. one ordinary, independent zstd frame holding the lines, written with
//!    zstd's content checksum so corruption is detected on decompression.
//!
//! Standard zstd decoders skip skippable frames, so concatenating a
//! session's chunks in order and running `zstd -d` yields the `.cast` file:
//! no shelltrail tool is needed to read a recording.
//!
//! # Layout (all integers little-endian)
//!
//! | offset | size | field      | meaning                                              |
//! |-------:|-----:|------------|------------------------------------------------------|
//! | 0      | 4    | magic      | `0x184D2A5B`, a zstd skippable-frame magic           |
//! | 4      | 4    | frame size | size of the payload below: always 64                 |
//! | 8      | 4    | tag        | `b"STC1"` (shelltrail chunk, layout 1)               |
//! | 12     | 8    | seq        | chunk number within the session, from 0              |
//! | 20     | 32   | prev_hash  | the previous chunk's [`link_hash`], or the seed      |
//! | 52     | 8    | start_ms   | session time of the chunk's first event (ms)         |
//! | 60     | 8    | end_ms     | session time of the chunk's last event (ms)          |
//! | 68     | 4    | raw_len    | uncompressed length of the zstd frame's content      |
//! | 72     | ...  | zstd frame | the event lines, with a content checksum             |
//!
//! # Hash chain
//!
//! Each chunk's `prev_hash` is the [`link_hash`] of the previous chunk:
//! SHA-256 of its 64-byte header payload (tag to `raw_len`) followed by its
//! uncompressed content; chunk 0 uses [`chain_seed`] of the session id. A
//! collector can therefore tell that chunks were dropped, reordered or
//! altered, and whether they belong to the claimed session, without trusting
//! the transport. The zstd checksum guards against accidental corruption;
//! the chain is what makes tampering visible.
//!
//! The chain covers what was recorded, not how it was compressed, so the
//! collector may compress ended sessions again, denser, without breaking it
//! (see [`run`](crate::run)).

use std::io::Cursor;

use sha2::{Digest, Sha256};
use zstd::zstd_safe;

/// The zstd skippable-frame magic number our chunk headers use.
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5B;

/// Refuse chunks claiming more than this when decoding.
///
/// It bounds the memory a hostile or corrupt chunk can make a collector
/// allocate; the recorder cuts chunks far below it.
pub const MAX_RAW_LEN: usize = 16 << 20;

/// Tag identifying the payload layout of our skippable frame.
pub(crate) const TAG: &[u8; 4] = b"STC1";
/// Bytes at the start of stored bytes (a chunk or a
/// [run](crate::run)) that say which seqs they hold.
pub const HEADER_PREFIX: usize = 24;
/// Size of the skippable frame's payload.
pub const PAYLOAD_LEN: usize = 64;
/// Size of the whole skippable frame (magic + size + payload).
const HEADER_LEN: usize = 8 + PAYLOAD_LEN;
/// Magic number of a standard zstd frame.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Domain separation for [`chain_seed`].
const CHAIN_DOMAIN: &[u8] = b"shelltrail-chain-v1\0";

/// The decoded skippable-frame header of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub start_ms: u64,
    pub end_ms: u64,
    pub raw_len: u32,
}

/// One compressed chunk, ready to be stored or sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub seq: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub raw_len: u32,
    /// The whole chunk: skippable frame + zstd frame.
    pub bytes: Vec<u8>,
    /// The chunk's [`link_hash`]; the next chunk's prev_hash.
    pub hash: [u8; 32],
}

/// Why bytes are not a valid chunk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk truncated: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("bad skippable-frame magic {0:#010x} (expected {SKIPPABLE_MAGIC:#010x})")]
    BadMagic(u32),
    #[error("bad chunk header size {0}")]
    BadHeaderSize(u32),
    #[error("bad chunk tag {0:?} (expected \"STC1\")")]
    BadTag([u8; 4]),
    #[error("content {actual} bytes long, but the run's parts add up to {expected}")]
    RunLength { expected: u64, actual: usize },
    #[error("chunk {seq} no longer hashes to what was recorded: altered")]
    Altered { seq: u64 },
    #[error("malformed run header: {0}")]
    BadRun(String),
    #[error("chunk claims {0} uncompressed bytes, more than the limit of {MAX_RAW_LEN}")]
    RawTooLarge(u32),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("decompressed {actual} bytes but the header says {expected}")]
    LengthMismatch { expected: u32, actual: usize },
    #[error("{0} trailing bytes after the chunk's zstd frame")]
    TrailingBytes(usize),
    #[error("chunk sent as seq {sent} says seq {header} in its header")]
    WrongSeq { sent: u64, header: u64 },
}

/// First prev_hash of a session's hash chain: SHA-256 of
/// `b"shelltrail-chain-v1\0"` followed by the session id bytes.
///
/// Seeding with the session id binds chunk 0 to its session, so a chunk
/// cannot be passed off as the start of another session.
pub fn chain_seed(session_id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(session_id.as_bytes());
    h.finalize().into()
}

/// The 64-byte header payload of a chunk: what [`link_hash`] covers
/// besides the content, and what follows the magic and size in its
/// skippable frame.
pub fn payload(h: &ChunkHeader) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    p[0..4].copy_from_slice(TAG);
    p[4..12].copy_from_slice(&h.seq.to_le_bytes());
    p[12..44].copy_from_slice(&h.prev_hash);
    p[44..52].copy_from_slice(&h.start_ms.to_le_bytes());
    p[52..60].copy_from_slice(&h.end_ms.to_le_bytes());
    p[60..64].copy_from_slice(&h.raw_len.to_le_bytes());
    p
}

/// A chunk's link in the hash chain: SHA-256 of its header payload and its
/// uncompressed content. The next chunk's `prev_hash` must equal it.
pub fn link_hash(header: &ChunkHeader, raw: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(payload(header));
    h.update(raw);
    h.finalize().into()
}

/// Decompresses a chunk and returns its [`link_hash`].
pub fn hash(bytes: &[u8]) -> Result<[u8; 32], ChunkError> {
    let (header, raw) = decompress(bytes)?;
    Ok(link_hash(&header, &raw))
}

/// Checks what can be checked of one chunk on its own, as it arrives at the
/// agent or the collector: it is one well-formed chunk numbered `seq`, its
/// zstd frame decodes within [`MAX_RAW_LEN`] to exactly `raw_len` bytes,
/// and its content is what its [`link_hash`] (returned) covers. Whether it
/// links to the chunk before it is the caller's check, with the header's
/// `prev_hash`, since only the caller knows that chunk.
pub fn check(bytes: &[u8], seq: u64) -> Result<(ChunkHeader, [u8; 32]), ChunkError> {
    check_content(bytes, seq).map(|(header, hash, _)| (header, hash))
}

/// [`check`], also returning the content it decompressed (for whoever
/// looks at what was recorded as it arrives: the agent's live view).
pub fn check_content(bytes: &[u8], seq: u64) -> Result<(ChunkHeader, [u8; 32], Vec<u8>), ChunkError> {
    let (header, raw) = decompress(bytes)?;
    if header.seq != seq {
        return Err(ChunkError::WrongSeq {
            sent: seq,
            header: header.seq,
        });
    }
    let hash = link_hash(&header, &raw);
    Ok((header, hash, raw))
}

pub(crate) fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn truncated(needed: usize, have: usize) -> ChunkError {
    ChunkError::Truncated { needed, have }
}

/// Checks the skippable frame's magic and size; returns the total length of
/// the skippable frame: [`HEADER_LEN`] for a recorder's chunk (`STC1`), or
/// up to [`run::MAX_HEADER`](crate::run::MAX_HEADER) for a run (`STC2`).
pub(crate) fn skippable_len(bytes: &[u8]) -> Result<usize, ChunkError> {
    if bytes.len() < 12 {
        return Err(truncated(12, bytes.len()));
    }
    let magic = read_u32(bytes, 0);
    if magic != SKIPPABLE_MAGIC {
        return Err(ChunkError::BadMagic(magic));
    }
    let size = read_u32(bytes, 4);
    let fits = match &bytes[8..12] {
        t if t == TAG => size as usize == PAYLOAD_LEN,
        t if t == crate::run::TAG => (4..=crate::run::MAX_HEADER as u32).contains(&size),
        _ => size as usize == PAYLOAD_LEN,
    };
    if !fits {
        return Err(ChunkError::BadHeaderSize(size));
    }
    Ok(8 + size as usize)
}

pub(crate) fn zstd_error(code: zstd_safe::ErrorCode) -> ChunkError {
    ChunkError::Zstd(zstd_safe::get_error_name(code).to_owned())
}

/// Length of the zstd frame at the start of `bytes`, refusing anything but
/// a standard frame (no skippable or legacy frames where ours should be).
pub(crate) fn frame_len(bytes: &[u8]) -> Result<usize, ChunkError> {
    if bytes.len() < 4 {
        return Err(truncated(4, bytes.len()));
    }
    if read_u32(bytes, 0) != ZSTD_MAGIC {
        return Err(ChunkError::Zstd("not a zstd frame".into()));
    }
    zstd_safe::find_frame_compressed_size(bytes).map_err(zstd_error)
}

/// Parses a chunk's header and returns it with the zstd frame bytes (all
/// the bytes after the header; [`decompress`] checks they form one frame).
pub fn parse(bytes: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
    let start = skippable_len(bytes)?;
    if bytes.len() < start {
        return Err(truncated(start, bytes.len()));
    }
    let tag: [u8; 4] = [bytes[8], bytes[9], bytes[10], bytes[11]];
    if &tag != TAG || start != HEADER_LEN {
        return Err(ChunkError::BadTag(tag));
    }
    let mut prev_hash = [0u8; 32];
    prev_hash.copy_from_slice(&bytes[20..52]);
    let header = ChunkHeader {
        seq: read_u64(bytes, 12),
        prev_hash,
        start_ms: read_u64(bytes, 52),
        end_ms: read_u64(bytes, 60),
        raw_len: read_u32(bytes, 68),
    };
    Ok((header, &bytes[start..]))
}

/// Parses and decompresses one chunk.
///
/// Checks that what follows the header is exactly one zstd frame (a second
/// frame would otherwise be silently decompressed too), refuses `raw_len`
/// above [`MAX_RAW_LEN`] before allocating, and that the content has exactly
/// `raw_len` bytes.
pub fn decompress(bytes: &[u8]) -> Result<(ChunkHeader, Vec<u8>), ChunkError> {
    let (header, frame) = parse(bytes)?;
    if header.raw_len as usize > MAX_RAW_LEN {
        return Err(ChunkError::RawTooLarge(header.raw_len));
    }
    let len = frame_len(frame)?;
    if len < frame.len() {
        return Err(ChunkError::TrailingBytes(frame.len() - len));
    }
    let data = with_decompressor(|d| d.decompress(frame, header.raw_len as usize))
        .map_err(|e| ChunkError::Zstd(e.to_string()))?;
    if data.len() != header.raw_len as usize {
        return Err(ChunkError::LengthMismatch {
            expected: header.raw_len,
            actual: data.len(),
        });
    }
    Ok((header, data))
}

/// Runs `f` with this thread's zstd decompression context: creating one
/// costs more than decompressing a typical chunk of an interactive session,
/// and the agent and the collector check every chunk they receive.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        f(slot.as_mut().expect("just made"))
    })
}

/// Length of the chunk at the start of `bytes` (header frame plus zstd
/// frame), from the framing alone; an error if `bytes` does not start with a
/// complete chunk. Lets a reader walk stored chunks one at a time and stop
/// at a torn tail.
pub fn chunk_len(bytes: &[u8]) -> Result<usize, ChunkError> {
    let header = skippable_len(bytes)?;
    if bytes.len() < header {
        return Err(truncated(header, bytes.len()));
    }
    Ok(header + frame_len(&bytes[header..])?)
}

/// Splits a concatenation of chunks (as stored) into the individual chunk
/// byte slices, so a stored session file can be verified or iterated.
///
/// Only the framing is checked here (magics, sizes, frame boundaries);
/// [`decompress`] each slice to check its content.
pub fn split(stream: &[u8]) -> Result<Vec<&[u8]>, ChunkError> {
    let mut chunks = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let len = chunk_len(&stream[pos..])?;
        chunks.push(&stream[pos..pos + len]);
        pos += len;
    }
    Ok(chunks)
}

/// Accumulates complete event lines and compresses them into chunks.
///
/// Keeps one zstd compression context, reused for every chunk (creating one
/// allocates megabytes at higher levels), and the hash chain state.
pub struct Chunker {
    compressor: zstd::bulk::Compressor<'static>,
    pending: Vec<u8>,
    next_seq: u64,
    prev_hash: [u8; 32],
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker")
            .field("pending_len", &self.pending.len())
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// A compressor at `level` (clamped to zstd's range) with checksums on.
///
/// Neither step can fail for an in-range level, but if zstd ever refused
/// we would rather record at its default level than not at all.
fn make_compressor(level: i32) -> zstd::bulk::Compressor<'static> {
    let range = zstd::compression_level_range();
    let level = level.clamp(*range.start(), *range.end());
    let mut compressor = zstd::bulk::Compressor::new(level).unwrap_or_default();
    // Without the flag frames still decode, only less safely; not worth
    // failing a recording over.
    let _ = compressor.include_checksum(true);
    compressor
}

impl Chunker {
    /// A chunker for a new session: seq 0, chain seeded from the session id.
    /// `level` is the zstd level (clamped to the valid range).
    pub fn new(session_id: &str, level: i32) -> Self {
        Self::with_state(level, 0, chain_seed(session_id))
    }

    /// Resume numbering/chain (used after a restart): next seq and prev hash.
    pub fn with_state(level: i32, next_seq: u64, prev_hash: [u8; 32]) -> Self {
        Chunker {
            compressor: make_compressor(level),
            pending: Vec::new(),
            next_seq,
            prev_hash,
        }
    }

    /// Where the encoder appends complete lines.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.pending
    }

    /// Bytes waiting for the next [`cut`](Self::cut).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The seq the next chunk will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The prev_hash the next chunk will get (to persist for
    /// [`with_state`](Self::with_state)).
    pub fn prev_hash(&self) -> [u8; 32] {
        self.prev_hash
    }

    /// Compresses the pending lines into the next chunk (None if nothing is
    /// pending) and advances seq and the chain.
    ///
    /// A chunk holds at most [`MAX_RAW_LEN`] bytes, since decoders refuse
    /// bigger ones. If more is pending, only the lines that fit are cut (at
    /// the last newline within the limit, or at the limit itself for a
    /// single giant line) and the rest stays pending: check
    /// [`pending_len`](Self::pending_len) and cut again. Callers normally
    /// cut long before that.
    ///
    /// Also returns None, leaving everything pending, should zstd fail,
    /// which it cannot do with the worst-case-sized buffer used here.
    pub fn cut(&mut self, start_ms: u64, end_ms: u64) -> Option<Chunk> {
        if self.pending.is_empty() {
            return None;
        }
        let take = if self.pending.len() <= MAX_RAW_LEN {
            self.pending.len()
        } else {
            match self.pending[..MAX_RAW_LEN].iter().rposition(|&b| b == b'\n') {
                Some(nl) => nl + 1,
                None => MAX_RAW_LEN,
            }
        };
        let raw = &self.pending[..take];
        // `take <= MAX_RAW_LEN`, which fits a u32.
        let raw_len = take as u32;

        let mut bytes = Vec::with_capacity(HEADER_LEN + zstd_safe::compress_bound(take));
        bytes.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&(PAYLOAD_LEN as u32).to_le_bytes());
        bytes.extend_from_slice(TAG);
        bytes.extend_from_slice(&self.next_seq.to_le_bytes());
        bytes.extend_from_slice(&self.prev_hash);
        bytes.extend_from_slice(&start_ms.to_le_bytes());
        bytes.extend_from_slice(&end_ms.to_le_bytes());
        bytes.extend_from_slice(&raw_len.to_le_bytes());
        debug_assert_eq!(bytes.len(), HEADER_LEN);

        // Compress straight after the header, without an intermediate copy.
        let mut cursor = Cursor::new(bytes);
        cursor.set_position(HEADER_LEN as u64);
        if self.compressor.compress_to_buffer(raw, &mut cursor).is_err() {
            return None;
        }
        let mut bytes = cursor.into_inner();
        // The buffer was sized for incompressible input; a chunk may wait in
        // memory until it is acknowledged, so give back what compression saved.
        bytes.shrink_to_fit();

        let mut h = Sha256::new();
        h.update(&bytes[8..HEADER_LEN]);
        h.update(raw);
        let hash: [u8; 32] = h.finalize().into();
        let chunk = Chunk {
            seq: self.next_seq,
            start_ms,
            end_ms,
            raw_len,
            bytes,
            hash,
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        self.prev_hash = hash;
        if take == self.pending.len() {
            // Keeps the allocation for the next chunk's lines.
            self.pending.clear();
        } else {
            self.pending.drain(..take);
        }
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn lines(n: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend_from_slice(format!("[0.{i:03}, \"o\", \"line {seed} {i}\\r\\n\"]\n").as_bytes());
        }
        out
    }

    fn one_chunk() -> (Chunk, Vec<u8>) {
        let mut c = Chunker::new("session-1", 3);
        let raw = lines(5, 7);
        c.buffer().extend_from_slice(&raw);
        (c.cut(10, 20).unwrap(), raw)
    }

    #[test]
    fn layout_is_as_documented() {
        let (chunk, raw) = one_chunk();
        let b = &chunk.bytes;
        assert_eq!(&b[0..4], &[0x5B, 0x2A, 0x4D, 0x18]);
        assert_eq!(&b[4..8], &64u32.to_le_bytes());
        assert_eq!(&b[8..12], b"STC1");
        assert_eq!(&b[12..20], &0u64.to_le_bytes());
        assert_eq!(&b[20..52], &chain_seed("session-1"));
        assert_eq!(&b[52..60], &10u64.to_le_bytes());
        assert_eq!(&b[60..68], &20u64.to_le_bytes());
        assert_eq!(&b[68..72], &(raw.len() as u32).to_le_bytes());
        assert_eq!(&b[72..76], &[0x28, 0xB5, 0x2F, 0xFD]);
        // The content checksum flag (bit 2 of the frame header descriptor).
        assert_ne!(b[76] & 0b100, 0);
        assert_eq!(chunk.hash, hash(b).unwrap());
        assert_eq!(chunk.hash, link_hash(&parse(b).unwrap().0, &raw));
        assert_eq!(&payload(&parse(b).unwrap().0)[..], &b[8..72]);
        assert_eq!(chunk.raw_len as usize, raw.len());
    }

    #[test]
    fn cut_then_decompress() {
        let (chunk, raw) = one_chunk();
        let (header, data) = decompress(&chunk.bytes).unwrap();
        assert_eq!(data, raw);
        assert_eq!(
            header,
            ChunkHeader {
                seq: 0,
                prev_hash: chain_seed("session-1"),
                start_ms: 10,
                end_ms: 20,
                raw_len: raw.len() as u32,
            }
        );
    }

    #[test]
    fn nothing_pending_means_no_chunk() {
        let mut c = Chunker::new("s", 3);
        assert!(c.cut(0, 0).is_none());
        assert_eq!(c.next_seq(), 0);
        assert_eq!(c.prev_hash(), chain_seed("s"));
    }

    #[test]
    fn seed_depends_on_session() {
        assert_ne!(chain_seed("a"), chain_seed("b"));
        let mut h = Sha256::new();
        h.update(b"shelltrail-chain-v1\0abc");
        assert_eq!(chain_seed("abc"), <[u8; 32]>::from(h.finalize()));
    }

    #[test]
    fn resume_continues_the_chain() {
        let mut a = Chunker::new("s", 3);
        a.buffer().extend_from_slice(&lines(2, 0));
        let first = a.cut(0, 1).unwrap();
        let mut b = Chunker::with_state(3, a.next_seq(), a.prev_hash());
        b.buffer().extend_from_slice(&lines(2, 1));
        let second = b.cut(2, 3).unwrap();
        let (h, _) = parse(&second.bytes).unwrap();
        assert_eq!(h.seq, 1);
        assert_eq!(h.prev_hash, first.hash);
    }

    #[test]
    fn levels_are_clamped() {
        for level in [i32::MIN, -1_000_000, 0, 1, 22, 1000, i32::MAX] {
            let mut c = Chunker::new("s", level);
            c.buffer().extend_from_slice(&lines(3, 0));
            let chunk = c.cut(0, 0).unwrap();
            assert_eq!(decompress(&chunk.bytes).unwrap().1, lines(3, 0));
        }
    }

    #[test]
    fn check_returns_the_link_hash_and_refuses_what_is_not_the_chunk_sent() {
        let (chunk, _) = one_chunk();
        let (header, hash) = check(&chunk.bytes, chunk.seq).unwrap();
        assert_eq!(hash, chunk.hash);
        assert_eq!(header.seq, chunk.seq);
        assert!(matches!(
            check(&chunk.bytes, chunk.seq + 1),
            Err(ChunkError::WrongSeq { sent: 1, header: 0 })
        ));
        // A valid header in front of something that is not a zstd frame.
        let mut poisoned = chunk.bytes[..HEADER_LEN].to_vec();
        poisoned.extend_from_slice(b"this is not a zstd frame");
        assert!(matches!(check(&poisoned, 0), Err(ChunkError::Zstd(_))));
        // A frame that decodes to more than the header admits.
        let mut long = chunk.bytes[..HEADER_LEN].to_vec();
        long.extend(zstd::bulk::compress(&vec![b'x'; 10_000], 1).unwrap());
        assert!(check(&long, 0).is_err());
    }

    #[test]
    fn truncation_is_an_error() {
        let (chunk, _) = one_chunk();
        for len in 0..chunk.bytes.len() {
            let cut = &chunk.bytes[..len];
            assert!(decompress(cut).is_err(), "len {len}");
            assert!(len == 0 || split(cut).is_err(), "len {len}");
        }
    }

    #[test]
    fn bit_flips_are_detected() {
        let (chunk, raw) = one_chunk();
        let (orig, _) = parse(&chunk.bytes).unwrap();
        for i in 0..chunk.bytes.len() {
            for bit in 0..8 {
                let mut b = chunk.bytes.clone();
                b[i] ^= 1 << bit;
                match decompress(&b) {
                    Err(_) => {}
                    Ok((h, data)) => {
                        // Never silently different content.
                        assert_eq!(data, raw, "flip at {i}.{bit}");
                        if (12..68).contains(&i) {
                            // A field zstd does not cover: the header shows it.
                            assert_ne!(h, orig, "flip at {i}.{bit}");
                        } else {
                            // Some bits of zstd's frame header descriptor
                            // only change how the same content is framed
                            // (the "unused" bit, the single-segment flag):
                            // the same recording, and the chain says so.
                            assert_eq!(i, 76, "flip at {i}.{bit} undetected");
                            assert_eq!(h, orig);
                            assert_eq!(hash(&b).unwrap(), chunk.hash);
                        }
                    }
                }
                let _ = split(&b);
            }
        }
    }

    #[test]
    fn decode_errors() {
        let (chunk, raw) = one_chunk();
        let mut b = chunk.bytes.clone();
        b[68..72].copy_from_slice(&(MAX_RAW_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(decompress(&b), Err(ChunkError::RawTooLarge(_))));

        let mut b = chunk.bytes.clone();
        b[68..72].copy_from_slice(&(raw.len() as u32 + 1).to_le_bytes());
        assert!(matches!(decompress(&b), Err(ChunkError::LengthMismatch { .. })));

        let mut b = chunk.bytes.clone();
        b[8] = b'X';
        assert!(matches!(decompress(&b), Err(ChunkError::BadTag(_))));

        let mut b = chunk.bytes.clone();
        b[0] = 0x50;
        assert!(matches!(decompress(&b), Err(ChunkError::BadMagic(_))));

        let mut b = chunk.bytes.clone();
        b[4] = 65;
        assert!(matches!(decompress(&b), Err(ChunkError::BadHeaderSize(65))));

        let mut b = chunk.bytes.clone();
        b.push(0);
        assert!(matches!(decompress(&b), Err(ChunkError::TrailingBytes(1))));

        // Two chunks glued together are not one chunk.
        let mut b = chunk.bytes.clone();
        b.extend_from_slice(&chunk.bytes);
        assert!(matches!(decompress(&b), Err(ChunkError::TrailingBytes(_))));

        // A skippable frame where the zstd frame should be.
        let mut b = chunk.bytes[..72].to_vec();
        b.extend_from_slice(&chunk.bytes);
        assert!(matches!(decompress(&b), Err(ChunkError::Zstd(_))));

        assert!(matches!(decompress(&[]), Err(ChunkError::Truncated { .. })));
        assert!(split(&[]).unwrap().is_empty());
        assert!(split(&chunk.bytes[..40]).is_err());
    }

    #[test]
    fn oversized_pending_is_cut_at_a_line() {
        let mut c = Chunker::new("s", 1);
        let line = b"[0.000, \"o\", \"0123456789abcdef0123456789abcdef0123456789abcdef\"]\n";
        let n = MAX_RAW_LEN / line.len() + 10;
        for _ in 0..n {
            c.buffer().extend_from_slice(line);
        }
        let total = c.pending_len();
        let first = c.cut(0, 1).unwrap();
        assert!(first.raw_len as usize <= MAX_RAW_LEN);
        assert_eq!(first.raw_len as usize % line.len(), 0);
        assert_eq!(c.pending_len(), total - first.raw_len as usize);
        let second = c.cut(1, 2).unwrap();
        assert_eq!(c.pending_len(), 0);
        assert_eq!((first.raw_len + second.raw_len) as usize, total,);
        let (_, data) = decompress(&second.bytes).unwrap();
        assert!(data.starts_with(line));
    }

    proptest! {
        #[test]
        fn chunks_chain_split_and_concatenate(
            batches in vec(vec(any::<u8>(), 1..300), 1..8),
            level in -5i32..8,
        ) {
            let mut c = Chunker::new("sess", level);
            let mut chunks = Vec::new();
            let mut all_raw = Vec::new();
            for (k, batch) in batches.iter().enumerate() {
                c.buffer().extend_from_slice(batch);
                prop_assert_eq!(c.pending_len(), batch.len());
                let chunk = c.cut(k as u64 * 10, k as u64 * 10 + 5).unwrap();
                prop_assert_eq!(c.pending_len(), 0);
                prop_assert_eq!(chunk.seq, k as u64);
                prop_assert_eq!(c.next_seq(), k as u64 + 1);
                all_raw.extend_from_slice(batch);
                chunks.push(chunk);
            }

            let mut stored = Vec::new();
            for (k, chunk) in chunks.iter().enumerate() {
                let (h, data) = decompress(&chunk.bytes).unwrap();
                prop_assert_eq!(&data, &batches[k]);
                prop_assert_eq!(h.seq, k as u64);
                prop_assert_eq!(h.start_ms, k as u64 * 10);
                prop_assert_eq!(h.end_ms, k as u64 * 10 + 5);
                let want_prev = if k == 0 { chain_seed("sess") } else { chunks[k - 1].hash };
                prop_assert_eq!(h.prev_hash, want_prev);
                prop_assert_eq!(chunk.hash, hash(&chunk.bytes).unwrap());
                stored.extend_from_slice(&chunk.bytes);
            }

            // A standard zstd decoder skips our header frames.
            prop_assert_eq!(zstd::stream::decode_all(&stored[..]).unwrap(), all_raw);

            let parts = split(&stored).unwrap();
            prop_assert_eq!(parts.len(), chunks.len());
            for (part, chunk) in parts.iter().zip(&chunks) {
                prop_assert_eq!(*part, &chunk.bytes[..]);
            }
        }

        #[test]
        fn random_flips_never_alter_content(
            batch in vec(any::<u8>(), 1..400),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut c = Chunker::new("s", 3);
            c.buffer().extend_from_slice(&batch);
            let mut bytes = c.cut(0, 1).unwrap().bytes;
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            if let Ok((_, data)) = decompress(&bytes) {
                prop_assert_eq!(data, batch);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in vec(any::<u8>(), 0..200)) {
            let _ = decompress(&bytes);
            let _ = split(&bytes);
            let mut with_header = one_chunk().0.bytes[..72].to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = decompress(&with_header);
            let _ = split(&with_header);
        }
    }
}
