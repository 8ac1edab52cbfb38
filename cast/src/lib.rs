//! Recording format of shelltrail: asciicast v3 lines, cut into zstd chunks.
//!
//! The data path of a session is:
//!
//! 1. The recorder reads bytes from the PTY (and from the user) and feeds
//!    them, with their elapsed time, to an [`Encoder`], which appends
//!    asciicast v3 event lines to a [`Chunker`]'s buffer.
//! 2. Every so often (size or time), the recorder [`Chunker::cut`]s the
//!    pending lines into a [`Chunk`]: a zstd skippable frame with our header
//!    (sequence number, hash chain, time span) followed by a zstd frame.
//! 3. The agent stores and ships chunks as opaque bytes; the collector
//!    checks them with [`chunk::decompress`] and the hash chain, and once a
//!    session has ended merges its chunks into denser [`run`]s. Verifiers
//!    walk a stored session's chain with the one [`chain::Walker`].
//! 4. Anyone can concatenate a session's chunks and run `zstd -d` to get a
//!    plain `.cast` file that asciinema plays; our tools read it back with
//!    a [`Decoder`], and [`raw_bytes`] recovers the exact bytes of a stream.
//!
//! For live sessions, a [`Screen`] keeps the terminal's current screen, so
//! that someone joining one is first shown what the user sees.
//!
//! This crate is pure code, with no I/O of its own beyond `Read`/`Write`
//! arguments and no async runtime, so every component can share it.

#![forbid(unsafe_code)]

pub mod asciicast;
pub mod chain;
pub mod chunk;
pub mod feed;
pub mod json;
pub mod run;
pub mod screen;

pub use asciicast::{Code, DecodeError, Decoder, Encoder, Event, Header, Term, raw_bytes, round_ms, to_v2};
pub use chunk::{Chunk, ChunkError, ChunkHeader, Chunker};
pub use screen::{Screen, Snapshot};
