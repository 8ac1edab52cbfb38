//! Text from recordings, made safe to print on an operator's terminal.
//!
//! A session's metadata comes from the recorded side (`SSH_CONNECTION`,
//! the command, the host name) or from whatever process spoke to the
//! agent's socket: a client address of `\e[2K\e[1A...` would erase and
//! rewrite lines of `shelltrail sessions` on the terminal of whoever reads
//! it. So every field the CLI prints goes through [`shown`]: control
//! characters (C0, DEL and C1, which holds the 8-bit CSI) and the Unicode
//! controls that reorder or split a line (bidirectional overrides and
//! isolates, line and paragraph separators) are shown escaped (`\x1b`,
//! `\u{202e}`), and a backslash as `\\`, so what looks like an escape was
//! one. JSON output keeps every value exactly, the same characters written
//! as `\u` escapes ([`json_for_terminal`], [`SafeLines`]).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;

/// Characters never printed as themselves.
fn is_unsafe(c: char) -> bool {
    // Cc: U+0000-U+001F, U+007F-U+009F.
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}'
        )
}

/// `s` with every unsafe character and backslash escaped.
pub fn shown(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || is_unsafe(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if is_unsafe(c) && u32::from(c) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text with every unsafe character but its own newlines written as a
/// `\u` escape. In JSON they can only be inside strings, where the escape
/// means the same character: the value is unchanged, the terminal safe.
pub fn json_for_terminal(json: &str) -> Cow<'_, str> {
    let escape = |c: char| c != '\n' && is_unsafe(c);
    if !json.chars().any(escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if escape(c) {
            // Every unsafe character is in the Basic Multilingual Plane.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A writer of JSON lines (asciicast) that passes each complete line
/// through [`json_for_terminal`]: `shelltrail export` to a terminal.
pub struct SafeLines<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: Write> SafeLines<W> {
    pub fn new(inner: W) -> Self {
        SafeLines {
            inner,
            pending: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let text = String::from_utf8_lossy(bytes);
        self.inner.write_all(json_for_terminal(&text).as_bytes())
    }
}

impl<W: Write> Write for SafeLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') {
            let rest = self.pending.split_off(last_nl + 1);
            let lines = std::mem::replace(&mut self.pending, rest);
            self.emit(&lines)?;
        }
        Ok(buf.len())
    }

    /// Writes what is pending up to its last whole UTF-8 character.
    fn flush(&mut self) -> std::io::Result<()> {
        let whole = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(whole);
        let done = std::mem::replace(&mut self.pending, rest);
        self.emit(&done)?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_shown_escaped() {
        assert_eq!(shown("10.0.0.1"), "10.0.0.1");
        assert_eq!(shown("\x1b[2K\x1b[1Aroot"), "\\x1b[2K\\x1b[1Aroot");
        assert_eq!(shown("a\u{9b}2Jb\x7f\r\n"), "a\\x9b2Jb\\x7f\\x0d\\x0a");
        assert_eq!(shown("cat \u{202e}txt.exe"), "cat \\u{202e}txt.exe");
        assert_eq!(shown("a\\x1b"), "a\\\\x1b", "a typed escape is not an escape");
        assert_eq!(shown("é😀"), "é😀");
    }

    #[test]
    fn json_keeps_its_value_and_loses_its_controls() {
        let value = serde_json::json!({"c": "\x1b[2K\u{9b}1A\x7f\u{202e}"});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let safe = json_for_terminal(&text);
        assert!(!safe.chars().any(|c| c != '\n' && is_unsafe(c)), "{safe}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), value);
    }

    #[test]
    fn lines_are_escaped_whole_even_when_written_in_pieces() {
        let line = "[0.1, \"o\", \"\u{9b}2J\u{202e}\"]\n".as_bytes();
        let mut out = SafeLines::new(Vec::new());
        for b in line.chunks(1) {
            out.write_all(b).unwrap();
        }
        out.write_all(&line[..3]).unwrap();
        out.flush().unwrap();
        assert_eq!(
            String::from_utf8(out.inner).unwrap(),
            "[0.1, \"o\", \"\\u009b2J\\u202e\"]\n[0."
        );
    }
}
