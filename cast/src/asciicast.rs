//! asciicast v3 encoding and decoding.
//!
//! A recording is newline-delimited JSON. The first line is a header object
//! (`"version": 3`, `"term": {"cols", "rows", "type"}` and optional
//! `timestamp`, `command`, `title`, `idle_time_limit`, `env`); every further
//! line is one event `[interval, "code", "data"]`, where `interval` is the
//! number of seconds since the *previous* event. Lines starting with `#` are
//! comments. Codes: `o` output, `i` input, `r` resize (`"COLSxROWS"`),
//! `m` marker, `x` exit status (a decimal string, the last event).
//!
//! # What shelltrail adds
//!
//! * A `"shelltrail"` header attribute carrying our own metadata (session id,
//!   user, client address...). Players ignore unknown header attributes.
//! * A `b` ("bytes") event code. JSON strings must be valid Unicode, but a
//!   terminal emits arbitrary bytes. When an `o` or `i` event's bytes are not
//!   valid UTF-8, the encoder writes the event with the lossy text (invalid
//!   bytes become U+FFFD, so players show something sensible) and immediately
//!   after it a `[0.000, "b", "<base64>"]` event holding the exact bytes, in
//!   standard base64 with padding. A `b` event means "the exact bytes of the
//!   previous `o`/`i` event"; an audit can therefore reconstruct the session
//!   byte for byte (see [`raw_bytes`]). The asciicast spec requires players
//!   to ignore event codes they do not know (asciinema 3 parses them as
//!   "other" and skips them), so such files still play everywhere.
//!
//! # Timing
//!
//! The encoder is given the absolute elapsed time of each event and rounds it
//! to whole milliseconds. Each interval is the difference between two
//! *rounded absolute* times, so the intervals always add up to the rounded
//! absolute time of the last event: there is no cumulative drift however
//! long the session is, which per-interval rounding would suffer from.
//! Intervals are printed with exactly three decimals using integer
//! arithmetic, never through a float.
//!
//! # UTF-8 carry
//!
//! A PTY read may end in the middle of a multi-byte character. Rather than
//! flag the halves as invalid, the encoder holds back (per stream) a trailing
//! incomplete-but-so-far-valid sequence of at most three bytes and prepends
//! it to the next chunk of the same stream.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize};

use crate::json::escape_into;

/// Terminal geometry and type, the `term` object of a v3 header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Term {
    pub cols: u16,
    pub rows: u16,
    /// `$TERM` of the recorded session, when known.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub term_type: Option<String>,
}

/// The header line of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// 3 for what we write; 2 when a v2 file was decoded (see [`Decoder`]).
    pub version: u8,
    pub term: Term,
    /// Start of the recording, in Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_time_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Captured environment variables. Non-string values are dropped when
    /// decoding, because asciinema 2 wrote `null` for unset variables and we
    /// would rather read those files than reject them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "de_env")]
    pub env: BTreeMap<String, String>,
    /// shelltrail's own metadata (session id, user, client...). An attribute
    /// of our own; players ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shelltrail: Option<serde_json::Value>,
}

impl Header {
    /// A v3 header with only the mandatory fields set.
    pub fn new(cols: u16, rows: u16) -> Self {
        Header {
            version: 3,
            term: Term {
                cols,
                rows,
                term_type: None,
            },
            timestamp: None,
            idle_time_limit: None,
            command: None,
            title: None,
            env: BTreeMap::new(),
            shelltrail: None,
        }
    }
}

/// Accepts `null` or an object, keeping only its string values.
fn de_env<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map: Option<BTreeMap<String, serde_json::Value>> = Option::deserialize(d)?;
    Ok(map
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            _ => None,
        })
        .collect())
}

/// An event code.
///
/// Unknown codes are kept as [`Code::Other`] rather than rejected, as the
/// spec asks of players, so newer files stay readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// `o`: bytes the terminal printed.
    Output,
    /// `i`: bytes the user typed.
    Input,
    /// `r`: terminal resized, data `"COLSxROWS"`.
    Resize,
    /// `m`: a marker (chapter) with a label.
    Marker,
    /// `x`: the session's exit status, data a decimal number.
    Exit,
    /// `b`: shelltrail's exact bytes of the previous `o`/`i` event (base64).
    Raw,
    /// Any other code.
    Other(String),
}

impl Code {
    /// The code as written in a file.
    pub fn as_str(&self) -> &str {
        match self {
            Code::Output => "o",
            Code::Input => "i",
            Code::Resize => "r",
            Code::Marker => "m",
            Code::Exit => "x",
            Code::Raw => "b",
            Code::Other(s) => s,
        }
    }

    /// Parses a code; never fails (unknown codes become [`Code::Other`]).
    pub fn parse(s: &str) -> Code {
        match s {
            "o" => Code::Output,
            "i" => Code::Input,
            "r" => Code::Resize,
            "m" => Code::Marker,
            "x" => Code::Exit,
            "b" => Code::Raw,
            other => Code::Other(other.to_owned()),
        }
    }
}

/// A decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Absolute time since the start of the recording, in whole milliseconds
    /// (the file's resolution), regardless of the file's version.
    pub time: Duration,
    pub code: Code,
    pub data: String,
}

/// Rounds a duration to whole milliseconds, half up (on nanoseconds).
///
/// Saturates at `u64::MAX` ms (half a billion years) instead of wrapping.
pub fn round_ms(t: Duration) -> u64 {
    let ms = (t.as_nanos() + 500_000) / 1_000_000;
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Appends the decimal digits of `n`; avoids the `fmt` machinery on the hot
/// path.
fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `ms` as seconds with exactly three decimals (`12.000`, `0.042`).
fn write_seconds(out: &mut Vec<u8>, ms: u64) {
    write_u64(out, ms / 1000);
    let frac = ms % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// Appends one event line, `[1.234, "o", "data"]\n`.
///
/// The layout (spaces after the commas) is asciinema's, so our files diff
/// cleanly against theirs. `interval_ms` is printed as is: for v3 it is the
/// interval since the previous event, for v2 the absolute time.
pub fn write_event(out: &mut Vec<u8>, interval_ms: u64, code: &str, data: &str) {
    out.push(b'[');
    write_seconds(out, interval_ms);
    out.extend_from_slice(b", ");
    escape_into(code, out);
    out.extend_from_slice(b", ");
    escape_into(data, out);
    out.extend_from_slice(b"]\n");
}

/// Up to three bytes of an incomplete UTF-8 sequence held back from the end
/// of one stream's previous chunk.
#[derive(Debug, Default, Clone, Copy)]
struct Carry {
    buf: [u8; 3],
    len: u8,
}

impl Carry {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// Length of the trailing incomplete-but-valid UTF-8 sequence of `bytes`
/// (0 if the data ends on a character boundary or in garbage).
///
/// Only such a prefix can still become a valid character with the next
/// read; anything already invalid is emitted now, so no byte is held back
/// longer than necessary.
fn incomplete_tail(bytes: &[u8]) -> usize {
    let len = bytes.len();
    // A lead byte is at most 3 bytes before the end for an incomplete
    // sequence (4-byte characters are the longest).
    for p in (len.saturating_sub(3)..len).rev() {
        if bytes[p] & 0xC0 != 0x80 {
            return match std::str::from_utf8(&bytes[p..]) {
                // `error_len() == None` is std's "unexpected end of input":
                // the bytes are a valid prefix of some character.
                Err(e) if e.valid_up_to() == 0 && e.error_len().is_none() => len - p,
                _ => 0,
            };
        }
    }
    0
}

/// Which stream an output/input call belongs to.
#[derive(Clone, Copy)]
enum Stream {
    Output,
    Input,
}

impl Stream {
    fn code(self) -> &'static str {
        match self {
            Stream::Output => "o",
            Stream::Input => "i",
        }
    }
}

/// Streaming encoder. Owns: millisecond rounding without drift, and
/// per-stream UTF-8 carry.
///
/// It writes into a caller-provided `Vec<u8>` so the recorder can append
/// straight into a [`crate::chunk::Chunker`] buffer without copies; every call
/// appends only complete lines.
#[derive(Debug, Default)]
pub struct Encoder {
    /// Rounded absolute time of the last event written (ms).
    last_ms: u64,
    out_carry: Carry,
    in_carry: Carry,
    /// Reused buffer for joining a carry with new data (the rare path).
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns an absolute time into the interval to print, advancing the
    /// clock. Time going backwards (it should not, but clocks and callers
    /// err) gives a zero interval rather than a negative one.
    fn interval(&mut self, t: Duration) -> u64 {
        let ms = round_ms(t);
        let interval = ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(ms);
        interval
    }

    /// Writes the header JSON line followed by `'\n'`.
    pub fn header(&mut self, h: &Header, out: &mut Vec<u8>) {
        // Serializing a `Header` into a Vec cannot fail: every map key is a
        // string and serde_json writes non-finite floats as `null`.
        let start = out.len();
        if serde_json::to_writer(&mut *out, h).is_err() {
            out.truncate(start);
            debug_assert!(false, "header serialization failed");
            return;
        }
        out.push(b'\n');
    }

    /// Records bytes the terminal printed. `t` is the elapsed time since the
    /// session start.
    pub fn output(&mut self, t: Duration, data: &[u8], out: &mut Vec<u8>) {
        self.stream(Stream::Output, t, data, out);
    }

    /// Records bytes the user typed.
    pub fn input(&mut self, t: Duration, data: &[u8], out: &mut Vec<u8>) {
        self.stream(Stream::Input, t, data, out);
    }

    /// Records a terminal resize.
    pub fn resize(&mut self, t: Duration, cols: u16, rows: u16, out: &mut Vec<u8>) {
        let interval = self.interval(t);
        write_event(out, interval, "r", &format!("{cols}x{rows}"));
    }

    /// Records a marker with a label.
    pub fn marker(&mut self, t: Duration, label: &str, out: &mut Vec<u8>) {
        let interval = self.interval(t);
        write_event(out, interval, "m", label);
    }

    /// Flushes any carried incomplete UTF-8 first, then writes the `x` event.
    pub fn exit(&mut self, t: Duration, status: i32, out: &mut Vec<u8>) {
        self.flush_pending(t, out);
        let interval = self.interval(t);
        write_event(out, interval, "x", &status.to_string());
    }

    /// Emits carried incomplete UTF-8 bytes of both streams (as invalid
    /// bytes: an `o`/`i` event with U+FFFD followed by a `b` event).
    ///
    /// Call it when a stream ends without an exit status, so no byte is lost.
    pub fn flush_pending(&mut self, t: Duration, out: &mut Vec<u8>) {
        for stream in [Stream::Output, Stream::Input] {
            let carry = std::mem::take(self.carry_mut(stream));
            if carry.len > 0 {
                self.emit(stream, t, carry.bytes(), out);
            }
        }
    }

    fn carry_mut(&mut self, stream: Stream) -> &mut Carry {
        match stream {
            Stream::Output => &mut self.out_carry,
            Stream::Input => &mut self.in_carry,
        }
    }

    fn stream(&mut self, stream: Stream, t: Duration, data: &[u8], out: &mut Vec<u8>) {
        let carry = std::mem::take(self.carry_mut(stream));
        if carry.len == 0 {
            // Hot path: no copy of `data`.
            self.split_and_emit(stream, t, data, out);
        } else {
            let mut joined = std::mem::take(&mut self.scratch);
            joined.clear();
            joined.extend_from_slice(carry.bytes());
            joined.extend_from_slice(data);
            self.split_and_emit(stream, t, &joined, out);
            self.scratch = joined;
        }
    }

    /// Holds back an incomplete trailing character and emits the rest.
    fn split_and_emit(&mut self, stream: Stream, t: Duration, bytes: &[u8], out: &mut Vec<u8>) {
        let tail = incomplete_tail(bytes);
        let (now, later) = bytes.split_at(bytes.len() - tail);
        let carry = self.carry_mut(stream);
        carry.buf[..tail].copy_from_slice(later);
        carry.len = tail as u8;
        if !now.is_empty() {
            self.emit(stream, t, now, out);
        }
    }

    /// Writes one `o`/`i` event, plus a `b` event if the bytes are not UTF-8.
    fn emit(&mut self, stream: Stream, t: Duration, bytes: &[u8], out: &mut Vec<u8>) {
        let interval = self.interval(t);
        match std::str::from_utf8(bytes) {
            Ok(text) => write_event(out, interval, stream.code(), text),
            Err(_) => {
                let lossy = String::from_utf8_lossy(bytes);
                write_event(out, interval, stream.code(), &lossy);
                write_event(out, 0, "b", &BASE64.encode(bytes));
            }
        }
    }
}

/// Why a recording could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty input: no asciicast header")]
    Empty,
    #[error("line 1: bad asciicast header: {0}")]
    BadHeader(String),
    #[error("line 1: unsupported asciicast version {0} (expected 3 or 2)")]
    UnsupportedVersion(u64),
    #[error("line {line}: bad event: {reason}")]
    BadEvent { line: u64, reason: String },
    #[error("line {line}: bad base64 in raw (b) event: {reason}")]
    BadRaw { line: u64, reason: String },
    #[error("line {line}: raw (b) event not preceded by an output or input event")]
    OrphanRaw { line: u64 },
}

/// The header of an asciicast v2 file; only used to map it to [`Header`].
#[derive(Deserialize)]
struct V2Header {
    width: u16,
    height: u16,
    #[serde(default)]
    timestamp: Option<u64>,
    #[serde(default)]
    idle_time_limit: Option<f64>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default, deserialize_with = "de_env")]
    env: BTreeMap<String, String>,
    #[serde(default)]
    shelltrail: Option<serde_json::Value>,
}

/// What the previous event was, to validate `b` events.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// An `o` or `i` event, which a `b` event may follow.
    Stream,
    /// Nothing yet, or anything else.
    Other,
}

/// Streaming decoder of asciicast v3 (and v2) files.
///
/// It reads line by line so arbitrarily long recordings are decoded in
/// constant memory. `b` events are validated (their base64 and their
/// position) and yielded as [`Code::Raw`] events with the base64 text as
/// data; [`raw_bytes`] puts them to use.
pub struct Decoder<R: BufRead> {
    reader: R,
    header: Header,
    /// Number of the last line read (1 is the header).
    line: u64,
    buf: Vec<u8>,
    /// Absolute time of the last event (ms).
    abs_ms: u64,
    prev: Prev,
    /// Decoded bytes of the last `b` event.
    raw: Vec<u8>,
    /// Set after an I/O error, which would likely repeat forever.
    done: bool,
}

impl<R: BufRead> std::fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("header", &self.header)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

/// Strips a trailing `\n` or `\r\n`.
fn trim_eol(mut line: &[u8]) -> &[u8] {
    if let Some(rest) = line.strip_suffix(b"\n") {
        line = rest;
    }
    if let Some(rest) = line.strip_suffix(b"\r") {
        line = rest;
    }
    line
}

/// serde_json's message without its " at line 1 column N" suffix, which
/// would be misleading here (it counts within our single line).
fn json_reason(e: &serde_json::Error) -> String {
    let mut s = e.to_string();
    if let Some(i) = s.rfind(" at line ") {
        s.truncate(i);
    }
    format!("{s} (column {})", e.column())
}

/// Parses a JSON number of seconds into whole milliseconds, half up.
///
/// Done on the text rather than through `f64` so that `1.2345` rounds to
/// 1235 ms exactly as written, and large values do not lose precision.
/// `None` means negative or too large.
fn parse_seconds_ms(text: &str) -> Result<u64, String> {
    if text.starts_with('-') {
        return Err(format!("negative time {text}"));
    }
    let too_large = || format!("time {text} is too large");
    if text.contains(['e', 'E']) {
        // Exponent notation is rare; a float is precise enough for it.
        let secs: f64 = text.parse().map_err(|_| format!("bad number {text}"))?;
        let ms = (secs * 1000.0).round();
        if !ms.is_finite() || ms >= u64::MAX as f64 {
            return Err(too_large());
        }
        return Ok(ms.max(0.0) as u64);
    }
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let mut ms: u64 = 0;
    for c in int.bytes() {
        if !c.is_ascii_digit() {
            return Err(format!("bad number {text}"));
        }
        ms = ms
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or_else(too_large)?;
    }
    ms = ms.checked_mul(1000).ok_or_else(too_large)?;
    let digits = frac.as_bytes();
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!("bad number {text}"));
    }
    let digit = |i: usize| digits.get(i).map_or(0, |d| u64::from(d - b'0'));
    let mut frac_ms = digit(0) * 100 + digit(1) * 10 + digit(2);
    if digit(3) >= 5 {
        frac_ms += 1;
    }
    ms.checked_add(frac_ms).ok_or_else(too_large)
}

/// The first element of a JSON array line, as written.
fn first_token(line: &str) -> &str {
    let rest = line.trim_start().trim_start_matches('[').trim_start();
    let end = rest
        .find(|c: char| c == ',' || c == ']' || c.is_ascii_whitespace())
        .unwrap_or(rest.len());
    &rest[..end]
}

impl<R: BufRead> Decoder<R> {
    /// Reads and parses the header line.
    ///
    /// Accepts version 3 and version 2. A v2 header (`width`/`height`
    /// instead of `term`, and absolute event times) is mapped to the same
    /// [`Header`] with `version: 2`, its `env.TERM` becoming `term.type`;
    /// events are then converted so that [`Event::time`] is absolute in
    /// both cases.
    pub fn new(mut reader: R) -> Result<Self, DecodeError> {
        let mut buf = Vec::new();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Err(DecodeError::Empty);
        }
        let line = std::str::from_utf8(trim_eol(&buf)).map_err(|_| DecodeError::BadHeader("not valid UTF-8".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| DecodeError::BadHeader(json_reason(&e)))?;
        let version = match value.get("version") {
            None => return Err(DecodeError::BadHeader("no \"version\" attribute".into())),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| DecodeError::BadHeader(format!("bad version {v}")))?,
        };
        let bad = |e: serde_json::Error| DecodeError::BadHeader(e.to_string());
        let header = match version {
            3 => serde_json::from_value::<Header>(value).map_err(bad)?,
            2 => {
                let v2 = serde_json::from_value::<V2Header>(value).map_err(bad)?;
                Header {
                    version: 2,
                    term: Term {
                        cols: v2.width,
                        rows: v2.height,
                        term_type: v2.env.get("TERM").cloned(),
                    },
                    timestamp: v2.timestamp,
                    idle_time_limit: v2.idle_time_limit,
                    command: v2.command,
                    title: v2.title,
                    env: v2.env,
                    shelltrail: v2.shelltrail,
                }
            }
            other => return Err(DecodeError::UnsupportedVersion(other)),
        };
        buf.clear();
        Ok(Decoder {
            reader,
            header,
            line: 1,
            buf,
            abs_ms: 0,
            prev: Prev::Other,
            raw: Vec::new(),
            done: false,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn parse_event(&mut self, line: &str) -> Result<Event, DecodeError> {
        let line_no = self.line;
        let bad = |reason: String| DecodeError::BadEvent { line: line_no, reason };
        // serde checks the shape ([number, string, string]); the number is
        // then re-read from its text for exact rounding.
        let (_, code, data): (f64, String, String) = serde_json::from_str(line).map_err(|e| bad(json_reason(&e)))?;
        let ms = parse_seconds_ms(first_token(line)).map_err(bad)?;
        let abs_ms = if self.header.version == 2 {
            ms
        } else {
            self.abs_ms
                .checked_add(ms)
                .ok_or_else(|| bad("time overflows".into()))?
        };
        let code = Code::parse(&code);
        match code {
            Code::Raw => {
                if self.prev != Prev::Stream {
                    return Err(DecodeError::OrphanRaw { line: line_no });
                }
                self.raw.clear();
                BASE64
                    .decode_vec(data.as_bytes(), &mut self.raw)
                    .map_err(|e| DecodeError::BadRaw {
                        line: line_no,
                        reason: e.to_string(),
                    })?;
                self.prev = Prev::Other;
            }
            Code::Output | Code::Input => self.prev = Prev::Stream,
            _ => self.prev = Prev::Other,
        }
        self.abs_ms = abs_ms;
        Ok(Event {
            time: Duration::from_millis(abs_ms),
            code,
            data,
        })
    }
}

impl<R: BufRead> Iterator for Decoder<R> {
    type Item = Result<Event, DecodeError>;

    /// The next event; empty lines and `#` comments are skipped. A bad line
    /// yields an error and decoding may continue with the next line.
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    self.buf = buf;
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
            }
            self.line += 1;
            let result = match std::str::from_utf8(trim_eol(&buf)) {
                Err(_) => Some(Err(DecodeError::BadEvent {
                    line: self.line,
                    reason: "not valid UTF-8".into(),
                })),
                Ok(line) => {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        None
                    } else {
                        Some(self.parse_event(line))
                    }
                }
            };
            self.buf = buf;
            if result.is_some() {
                return result;
            }
        }
    }
}

/// Reconstructs the exact bytes of one stream (`Code::Output` or
/// `Code::Input`): each event's data as UTF-8 bytes, except that an event
/// immediately followed by a `b` raw event is replaced by the raw event's
/// decoded bytes.
///
/// This is what an audit or a replay into a real terminal wants: the bytes
/// the PTY actually carried, not their lossy text.
pub fn raw_bytes<R: BufRead>(mut decoder: Decoder<R>, code: Code, out: &mut impl Write) -> Result<(), DecodeError> {
    // The last matching event's data, held until we know whether a `b`
    // event replaces it.
    let mut held: Option<String> = None;
    while let Some(event) = decoder.next() {
        let event = event?;
        if event.code == Code::Raw {
            // The decoder guarantees a `b` follows an `o`/`i`; if that was
            // the other stream, `held` is None and the bytes are not ours.
            if held.take().is_some() {
                out.write_all(&decoder.raw)?;
            }
            continue;
        }
        if let Some(data) = held.take() {
            out.write_all(data.as_bytes())?;
        }
        if event.code == code {
            held = Some(event.data);
        }
    }
    if let Some(data) = held {
        out.write_all(data.as_bytes())?;
    }
    Ok(())
}

/// The header of a v2 file, as written by [`to_v2`].
#[derive(Serialize)]
struct V2HeaderOut<'a> {
    version: u8,
    width: u16,
    height: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_time_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shelltrail: Option<&'a serde_json::Value>,
}

/// Converts a v3 (or v2) recording into asciicast v2 for older tools.
///
/// The header becomes `{"version": 2, "width", "height", "timestamp",
/// "command", "title", "env", "idle_time_limit"}` (plus our `"shelltrail"`
/// attribute; v2 has no terminal type, so it goes to `env.TERM` if that is
/// not set). Events get ABSOLUTE times (three decimals). `o`, `i`, `r` and
/// `m` events are kept. `x` is dropped because v2 has no exit event (the
/// status is lost), `b` because v2 has no place for exact bytes (the lossy
/// text of the preceding `o`/`i` event remains), and unknown codes because
/// v2 tools may not tolerate them.
pub fn to_v2<R: BufRead, W: Write>(decoder: Decoder<R>, out: &mut W) -> Result<(), DecodeError> {
    let h = decoder.header().clone();
    let mut env: BTreeMap<&str, &str> = h.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if let Some(term) = &h.term.term_type {
        env.entry("TERM").or_insert(term);
    }
    let v2 = V2HeaderOut {
        version: 2,
        width: h.term.cols,
        height: h.term.rows,
        timestamp: h.timestamp,
        idle_time_limit: h.idle_time_limit,
        command: h.command.as_deref(),
        title: h.title.as_deref(),
        env,
        shelltrail: h.shelltrail.as_ref(),
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    serde_json::to_writer(&mut buf, &v2).map_err(std::io::Error::from)?;
    buf.push(b'\n');
    for event in decoder {
        let event = event?;
        match event.code {
            Code::Output | Code::Input | Code::Resize | Code::Marker => {
                write_event(&mut buf, round_ms(event.time), event.code.as_str(), &event.data);
            }
            Code::Exit | Code::Raw | Code::Other(_) => {}
        }
        if buf.len() >= 64 * 1024 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn decode(file: &[u8]) -> (Header, Vec<Event>) {
        let dec = Decoder::new(file).expect("header");
        let header = dec.header().clone();
        let events = dec.collect::<Result<Vec<_>, _>>().expect("events");
        (header, events)
    }

    fn stream_bytes(file: &[u8], code: Code) -> Vec<u8> {
        let mut out = Vec::new();
        raw_bytes(Decoder::new(file).unwrap(), code, &mut out).unwrap();
        out
    }

    fn assert_lines_are_json(file: &[u8]) {
        let text = std::str::from_utf8(file).expect("file is UTF-8");
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        }
    }

    #[test]
    fn writes_asciinema_layout() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        let mut h = Header::new(80, 24);
        h.term.term_type = Some("xterm-256color".into());
        h.timestamp = Some(1_700_000_000);
        enc.header(&h, &mut out);
        enc.output(ms(123), b"hi\r\n", &mut out);
        enc.input(ms(1357), b"ls\r", &mut out);
        enc.resize(ms(13_357), 100, 40, &mut out);
        enc.marker(ms(13_357), "step \"1\"", &mut out);
        enc.exit(ms(14_000), -1, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"version":3,"term":{"cols":80,"rows":24,"type":"xterm-256color"},"timestamp":1700000000}"#,
                "\n",
                "[0.123, \"o\", \"hi\\r\\n\"]\n",
                "[1.234, \"i\", \"ls\\r\"]\n",
                "[12.000, \"r\", \"100x40\"]\n",
                "[0.000, \"m\", \"step \\\"1\\\"\"]\n",
                "[0.643, \"x\", \"-1\"]\n",
            )
        );
    }

    #[test]
    fn header_round_trip() {
        let mut h = Header::new(120, 50);
        h.timestamp = Some(42);
        h.idle_time_limit = Some(2.5);
        h.command = Some("bash -l".into());
        h.title = Some("t".into());
        h.env.insert("SHELL".into(), "/bin/bash".into());
        h.shelltrail = Some(serde_json::json!({"session": "abc", "user": "root"}));
        let mut out = Vec::new();
        Encoder::new().header(&h, &mut out);
        assert_eq!(decode(&out).0, h);
    }

    #[test]
    fn split_euro_joins_into_one_event() {
        let euro = "€".as_bytes();
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        enc.output(ms(1), &euro[..1], &mut out);
        enc.output(ms(2), &euro[1..], &mut out);
        let (_, events) = decode(&out);
        assert_eq!(
            events,
            vec![Event {
                time: ms(2),
                code: Code::Output,
                data: "€".into()
            }]
        );
    }

    #[test]
    fn carry_is_per_stream() {
        let euro = "€".as_bytes();
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        enc.output(ms(1), &euro[..2], &mut out);
        enc.input(ms(2), b"a", &mut out);
        enc.output(ms(3), &euro[2..], &mut out);
        let (_, events) = decode(&out);
        let codes: Vec<_> = events.iter().map(|e| (e.code.clone(), e.data.as_str())).collect();
        assert_eq!(codes, vec![(Code::Input, "a"), (Code::Output, "€")]);
    }

    #[test]
    fn valid_text_split_at_every_position() {
        let text = "a€😀é\u{800}\u{10ffff}b";
        let bytes = text.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut enc = Encoder::new();
                let mut out = Vec::new();
                enc.header(&Header::new(80, 24), &mut out);
                enc.output(ms(1), &bytes[..i], &mut out);
                enc.output(ms(2), &bytes[i..j], &mut out);
                enc.output(ms(3), &bytes[j..], &mut out);
                enc.flush_pending(ms(4), &mut out);
                let (_, events) = decode(&out);
                assert!(events.iter().all(|e| e.code == Code::Output), "{i} {j}");
                let joined: String = events.iter().map(|e| e.data.as_str()).collect();
                assert_eq!(joined, text);
            }
        }
    }

    #[test]
    fn invalid_bytes_get_a_raw_event() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        enc.output(ms(5), b"a\xffb", &mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let mut lines = text.lines().skip(1);
        assert_eq!(lines.next(), Some("[0.005, \"o\", \"a\u{fffd}b\"]"));
        assert_eq!(lines.next(), Some("[0.000, \"b\", \"Yf9i\"]"));
        assert_eq!(lines.next(), None);
        assert_eq!(stream_bytes(&out, Code::Output), b"a\xffb");
    }

    #[test]
    fn incomplete_tail_is_flushed_as_raw() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        enc.output(ms(1), b"ok\xe2\x82", &mut out);
        enc.input(ms(1), b"\xf0", &mut out);
        // Nothing to emit for input yet: no event at all.
        assert_eq!(decode(&out).1.len(), 1);
        enc.exit(ms(9), 0, &mut out);
        let (_, events) = decode(&out);
        let codes: Vec<_> = events.iter().map(|e| e.code.as_str().to_owned()).collect();
        assert_eq!(codes, ["o", "o", "b", "i", "b", "x"]);
        assert_eq!(stream_bytes(&out, Code::Output), b"ok\xe2\x82");
        assert_eq!(stream_bytes(&out, Code::Input), b"\xf0");
    }

    #[test]
    fn carry_followed_by_garbage() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        enc.output(ms(1), b"\xe2\x82", &mut out);
        enc.output(ms(2), b"x", &mut out);
        enc.output(ms(3), b"\xed\xa0", &mut out); // surrogate prefix: invalid at once
        enc.flush_pending(ms(4), &mut out);
        assert_lines_are_json(&out);
        assert_eq!(stream_bytes(&out, Code::Output), b"\xe2\x82x\xed\xa0");
    }

    #[test]
    fn incomplete_tail_detection() {
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(b"a\xe2"), 1);
        assert_eq!(incomplete_tail(b"a\xe2\x82"), 2);
        assert_eq!(incomplete_tail("a€".as_bytes()), 0);
        assert_eq!(incomplete_tail(b"\xf0\x9f\x98"), 3);
        assert_eq!(incomplete_tail(b"\xf0\x9f\x98\x80"), 0);
        assert_eq!(incomplete_tail(b"\x82"), 0);
        assert_eq!(incomplete_tail(b"\xe0\x80"), 0); // overlong, already invalid
        assert_eq!(incomplete_tail(b"\xed\xa0"), 0); // surrogate
        assert_eq!(incomplete_tail(b"\xf5"), 0);
        assert_eq!(incomplete_tail(b"\xf4\x90"), 0); // above U+10FFFF
        assert_eq!(incomplete_tail(b"\xf4\x8f"), 2);
    }

    #[test]
    fn time_going_backwards_gives_zero_interval() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        enc.marker(ms(1000), "a", &mut out);
        enc.marker(ms(500), "b", &mut out);
        enc.marker(ms(1500), "c", &mut out);
        let times: Vec<_> = decode(&out).1.iter().map(|e| e.time).collect();
        assert_eq!(times, [ms(1000), ms(1000), ms(1500)]);
    }

    #[test]
    fn rounding_is_half_up() {
        assert_eq!(round_ms(Duration::from_nanos(499_999)), 0);
        assert_eq!(round_ms(Duration::from_nanos(500_000)), 1);
        assert_eq!(round_ms(Duration::from_nanos(1_499_999)), 1);
        assert_eq!(round_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn no_drift_over_100k_events() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.header(&Header::new(80, 24), &mut out);
        let mut expected = Vec::with_capacity(100_000);
        let mut t: u64 = 0;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            // xorshift: arbitrary sub-millisecond-ish nanosecond steps.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            t += seed % 3_000_000;
            let d = Duration::from_nanos(t);
            expected.push(ms(round_ms(d)));
            enc.output(d, b".", &mut out);
        }
        let times: Vec<_> = decode(&out).1.iter().map(|e| e.time).collect();
        assert_eq!(times, expected);
    }

    #[test]
    fn parses_numbers_exactly() {
        assert_eq!(parse_seconds_ms("0"), Ok(0));
        assert_eq!(parse_seconds_ms("0.5"), Ok(500));
        assert_eq!(parse_seconds_ms("1"), Ok(1000));
        assert_eq!(parse_seconds_ms("1.234567"), Ok(1235));
        assert_eq!(parse_seconds_ms("1.2345"), Ok(1235));
        assert_eq!(parse_seconds_ms("1.2344999"), Ok(1234));
        assert_eq!(parse_seconds_ms("0.0005"), Ok(1));
        assert_eq!(parse_seconds_ms("1.5e-3"), Ok(2));
        assert_eq!(parse_seconds_ms("2E1"), Ok(20_000));
        assert!(parse_seconds_ms("-1").is_err());
        assert!(parse_seconds_ms("99999999999999999999").is_err());
        assert!(parse_seconds_ms("1e300").is_err());
    }

    #[test]
    fn decoder_skips_comments_and_blank_lines() {
        let file = b"{\"version\":3,\"term\":{\"cols\":80,\"rows\":24},\"future\":1}\n\
            # a comment\n\
            \n\
            [0.5, \"o\", \"a\"]\r\n\
            [1, \"zz\", \"?\"]\n\
            [1.2345, \"i\", \"b\"]";
        let (h, events) = decode(file);
        assert_eq!(h, Header::new(80, 24));
        assert_eq!(
            events,
            vec![
                Event {
                    time: ms(500),
                    code: Code::Output,
                    data: "a".into()
                },
                Event {
                    time: ms(1500),
                    code: Code::Other("zz".into()),
                    data: "?".into()
                },
                Event {
                    time: ms(2735),
                    code: Code::Input,
                    data: "b".into()
                },
            ]
        );
    }

    #[test]
    fn decoder_header_errors() {
        assert!(matches!(Decoder::new(&b""[..]), Err(DecodeError::Empty)));
        for bad in [
            &b"not json\n"[..],
            b"[1, 2]\n",
            b"{\"term\":{\"cols\":80,\"rows\":24}}\n",
            b"{\"version\":\"3\"}\n",
            b"{\"version\":3}\n",
            b"{\"version\":3,\"term\":{\"cols\":-1,\"rows\":24}}\n",
            b"{\"version\":2,\"width\":80}\n",
            b"\xff\n",
        ] {
            let err = Decoder::new(bad).unwrap_err();
            assert!(matches!(err, DecodeError::BadHeader(_)), "{err}");
            assert!(err.to_string().starts_with("line 1:"), "{err}");
        }
        let err = Decoder::new(&b"{\"version\":4}\n"[..]).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedVersion(4)), "{err}");
    }

    #[test]
    fn decoder_event_errors_name_the_line() {
        let head = "{\"version\":3,\"term\":{\"cols\":80,\"rows\":24}}\n# c\n";
        for (event, want) in [
            ("[0.1, \"o\", 5]", "line 3: bad event: invalid type"),
            ("[0.1, \"o\"]", "line 3: bad event"),
            ("[0.1, \"o\", \"a\", \"b\"]", "line 3: bad event"),
            ("{}", "line 3: bad event"),
            ("[-1, \"o\", \"a\"]", "line 3: bad event: negative"),
            ("[\"1\", \"o\", \"a\"]", "line 3: bad event"),
            ("[0, \"b\", \"AA==\"]", "line 3: raw (b) event not preceded"),
        ] {
            let file = format!("{head}{event}\n");
            let err = Decoder::new(file.as_bytes()).unwrap().next().unwrap().unwrap_err();
            assert!(err.to_string().starts_with(want), "{event}: {err}");
        }
        let file = format!("{head}[0, \"o\", \"a\"]\n[0, \"b\", \"!!\"]\n");
        let mut dec = Decoder::new(file.as_bytes()).unwrap();
        assert!(dec.next().unwrap().is_ok());
        let err = dec.next().unwrap().unwrap_err();
        assert!(matches!(err, DecodeError::BadRaw { line: 4, .. }), "{err}");
        // Two raw events in a row: the second has nothing to describe.
        let file = format!("{head}[0, \"o\", \"a\"]\n[0, \"b\", \"YQ==\"]\n[0, \"b\", \"YQ==\"]\n");
        let results: Vec<_> = Decoder::new(file.as_bytes()).unwrap().collect();
        assert!(matches!(results[2], Err(DecodeError::OrphanRaw { line: 5 })));
        // Decoding goes on after a bad line.
        let file = format!("{head}garbage\n[1, \"o\", \"a\"]\n");
        let results: Vec<_> = Decoder::new(file.as_bytes()).unwrap().collect();
        assert!(results[0].is_err());
        assert_eq!(results[1].as_ref().unwrap().data, "a");
    }

    #[test]
    fn decodes_v2() {
        let file = b"{\"version\": 2, \"width\": 100, \"height\": 30, \"timestamp\": 7, \
            \"env\": {\"TERM\": \"xterm\", \"SHELL\": null}}\n\
            [0.5, \"o\", \"a\"]\n[1.25, \"o\", \"b\"]\n";
        let (h, events) = decode(file);
        assert_eq!(h.version, 2);
        assert_eq!(h.term.cols, 100);
        assert_eq!(h.term.rows, 30);
        assert_eq!(h.term.term_type.as_deref(), Some("xterm"));
        assert_eq!(h.timestamp, Some(7));
        assert_eq!(h.env.len(), 1);
        let times: Vec<_> = events.iter().map(|e| e.time).collect();
        assert_eq!(times, [ms(500), ms(1250)]);
    }

    #[test]
    fn converts_to_v2() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        let mut h = Header::new(80, 24);
        h.term.term_type = Some("xterm".into());
        h.timestamp = Some(1000);
        h.shelltrail = Some(serde_json::json!({"session": "s"}));
        enc.header(&h, &mut out);
        enc.output(ms(100), b"a\xff", &mut out);
        enc.input(ms(1100), b"q", &mut out);
        enc.resize(ms(2000), 90, 20, &mut out);
        enc.marker(ms(2500), "m", &mut out);
        enc.exit(ms(3000), 0, &mut out);

        let mut v2 = Vec::new();
        to_v2(Decoder::new(&out[..]).unwrap(), &mut v2).unwrap();
        let text = String::from_utf8(v2.clone()).unwrap();
        let mut lines = text.lines();
        let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"version": 2, "width": 80, "height": 24, "timestamp": 1000,
                "env": {"TERM": "xterm"}, "shelltrail": {"session": "s"}})
        );
        let rest: Vec<_> = lines.collect();
        assert_eq!(
            rest,
            [
                "[0.100, \"o\", \"a\u{fffd}\"]",
                "[1.100, \"i\", \"q\"]",
                "[2.000, \"r\", \"90x20\"]",
                "[2.500, \"m\", \"m\"]",
            ]
        );
        // And our decoder reads it back as v2 with the same absolute times.
        let (h2, events) = decode(&v2);
        assert_eq!(h2.version, 2);
        assert_eq!(h2.term.term_type.as_deref(), Some("xterm"));
        let times: Vec<_> = events.iter().map(|e| e.time).collect();
        assert_eq!(times, [ms(100), ms(1100), ms(2000), ms(2500)]);
    }

    /// One encoder call in a generated session.
    #[derive(Debug, Clone)]
    enum Op {
        Out(Vec<u8>),
        In(Vec<u8>),
        Resize(u16, u16),
        Marker(String),
        Flush,
    }

    /// Bytes that are interesting for the carry: garbage, valid text, and
    /// fragments of multi-byte characters.
    fn chunk_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            vec(any::<u8>(), 0..10),
            "\\PC{0,6}".prop_map(String::into_bytes),
            (
                prop::sample::select(vec!["é", "€", "😀", "\u{800}", "\u{10ffff}", "\u{fffd}"]),
                0usize..4,
                any::<bool>()
            )
                .prop_map(|(c, cut, head)| {
                    let b = c.as_bytes();
                    let cut = cut.min(b.len());
                    if head { b[..cut].to_vec() } else { b[cut..].to_vec() }
                }),
            vec(
                prop::sample::select(vec![0x80u8, 0xbf, 0xc2, 0xe2, 0xed, 0xf0, 0xf4, 0xff, b'a']),
                0..5
            ),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => chunk_bytes().prop_map(Op::Out),
            3 => chunk_bytes().prop_map(Op::In),
            1 => (any::<u16>(), any::<u16>()).prop_map(|(c, r)| Op::Resize(c, r)),
            1 => "\\PC{0,5}|[\\x00-\\x1f\"\\\\]{0,3}".prop_map(Op::Marker),
            1 => Just(Op::Flush),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            ops in vec((op(), 0u64..2_000_000_000), 0..40),
            exit in prop::option::of(any::<i32>()),
        ) {
            let mut enc = Encoder::new();
            let mut file = Vec::new();
            enc.header(&Header::new(80, 24), &mut file);
            let (mut want_out, mut want_in) = (Vec::new(), Vec::new());
            let mut want_other = Vec::new();
            let mut t = Duration::ZERO;
            for (op, dt) in &ops {
                t += Duration::from_nanos(*dt);
                match op {
                    Op::Out(b) => { enc.output(t, b, &mut file); want_out.extend_from_slice(b) }
                    Op::In(b) => { enc.input(t, b, &mut file); want_in.extend_from_slice(b) }
                    Op::Resize(c, r) => {
                        enc.resize(t, *c, *r, &mut file);
                        want_other.push((Code::Resize, format!("{c}x{r}")));
                    }
                    Op::Marker(m) => {
                        enc.marker(t, m, &mut file);
                        want_other.push((Code::Marker, m.clone()));
                    }
                    Op::Flush => enc.flush_pending(t, &mut file),
                }
            }
            match exit {
                Some(status) => {
                    enc.exit(t, status, &mut file);
                    want_other.push((Code::Exit, status.to_string()));
                }
                None => enc.flush_pending(t, &mut file),
            }

            assert_lines_are_json(&file);
            prop_assert_eq!(stream_bytes(&file, Code::Output), want_out);
            prop_assert_eq!(stream_bytes(&file, Code::Input), want_in);

            let (_, events) = decode(&file);
            let other: Vec<_> = events
                .iter()
                .filter(|e| matches!(e.code, Code::Resize | Code::Marker | Code::Exit))
                .map(|e| (e.code.clone(), e.data.clone()))
                .collect();
            prop_assert_eq!(other, want_other);
            prop_assert!(events.windows(2).all(|w| w[0].time <= w[1].time));
            if exit.is_some() {
                prop_assert_eq!(&events.last().unwrap().code, &Code::Exit);
            }
            for (i, e) in events.iter().enumerate() {
                if e.code == Code::Raw {
                    prop_assert!(matches!(events[i - 1].code, Code::Output | Code::Input));
                    prop_assert_eq!(e.time, events[i - 1].time);
                }
            }
        }

        #[test]
        fn valid_text_never_needs_raw_events(
            text in "\\PC{0,24}",
            cuts in vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut enc = Encoder::new();
            let mut file = Vec::new();
            enc.header(&Header::new(80, 24), &mut file);
            for (k, w) in cuts.windows(2).enumerate() {
                enc.output(ms(k as u64), &bytes[w[0]..w[1]], &mut file);
            }
            enc.exit(ms(99), 0, &mut file);
            let (_, events) = decode(&file);
            prop_assert!(events.iter().all(|e| e.code != Code::Raw));
            let joined: String = events
                .iter()
                .filter(|e| e.code == Code::Output)
                .map(|e| e.data.as_str())
                .collect();
            prop_assert_eq!(joined, text);
        }

        #[test]
        fn decoded_times_are_rounded_absolute_times(
            steps in vec(0u64..5_000_000_000, 1..300),
        ) {
            let mut enc = Encoder::new();
            let mut file = Vec::new();
            enc.header(&Header::new(80, 24), &mut file);
            let mut t = 0u64;
            let mut want = Vec::new();
            for (k, dt) in steps.iter().enumerate() {
                t += dt;
                let d = Duration::from_nanos(t);
                want.push(ms(round_ms(d)));
                if k % 2 == 0 {
                    enc.output(d, b"x", &mut file);
                } else {
                    enc.marker(d, "", &mut file);
                }
            }
            let times: Vec<_> = decode(&file).1.iter().map(|e| e.time).collect();
            prop_assert_eq!(times, want);
        }

        #[test]
        fn to_v2_is_valid_v2(
            ops in vec((op(), 0u64..2_000_000_000), 0..30),
        ) {
            let mut enc = Encoder::new();
            let mut file = Vec::new();
            enc.header(&Header::new(132, 43), &mut file);
            let mut t = Duration::ZERO;
            for (op, dt) in &ops {
                t += Duration::from_nanos(*dt);
                match op {
                    Op::Out(b) => enc.output(t, b, &mut file),
                    Op::In(b) => enc.input(t, b, &mut file),
                    Op::Resize(c, r) => enc.resize(t, *c, *r, &mut file),
                    Op::Marker(m) => enc.marker(t, m, &mut file),
                    Op::Flush => enc.flush_pending(t, &mut file),
                }
            }
            enc.exit(t, 3, &mut file);
            let mut v2 = Vec::new();
            to_v2(Decoder::new(&file[..]).unwrap(), &mut v2).unwrap();

            let text = std::str::from_utf8(&v2).unwrap();
            let mut lines = text.lines();
            let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
            prop_assert_eq!(&header["version"], 2);
            prop_assert_eq!(&header["width"], 132);
            prop_assert_eq!(&header["height"], 43);
            let mut last = 0.0f64;
            for line in lines {
                let (time, code, _): (f64, String, String) = serde_json::from_str(line).unwrap();
                prop_assert!(["o", "i", "r", "m"].contains(&code.as_str()), "{}", code);
                prop_assert!(time >= last);
                last = time;
            }
            // Same events as the v3 file minus x/b, at the same absolute times.
            let (_, v3_events) = decode(&file);
            let v3_events: Vec<_> = v3_events
                .into_iter()
                .filter(|e| !matches!(e.code, Code::Exit | Code::Raw))
                .collect();
            prop_assert_eq!(decode(&v2).1, v3_events);
        }
    }
}
