//! Fast JSON string escaping for the event lines.
//!
//! Every byte a recorded terminal prints passes through [`escape_into`], so it
//! is the hot path of the whole recorder: a busy session (a `cat` of a large
//! log, a build) can produce hundreds of megabytes per second. Going through
//! `serde_json` for each event would allocate and dispatch per character; here
//! we scan eight bytes at a time for the few bytes that need an escape and
//! copy the clean runs between them with a single `extend_from_slice`.
//!
//! The output is byte-for-byte what `serde_json::to_string` produces for the
//! same string (a property test checks this), so a line we write and a line
//! serde writes are indistinguishable to any reader.

/// What each byte turns into: `0` means "copy verbatim", `b'u'` means
/// `\u00XX`, anything else is the letter after the backslash.
///
/// A table instead of a `match` keeps the slow path (a byte that does need
/// escaping) branch-light, which matters for output full of control
/// sequences such as `ESC [`.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Broadcasts a byte into all eight lanes of a `u64`.
const fn lanes(b: u8) -> u64 {
    0x0101_0101_0101_0101u64 * b as u64
}

/// Marks the bytes of `w` that need an escape: a control byte (< 0x20), a
/// quote or a backslash, each as the high bit of its lane.
///
/// These are the classic "has a byte less than n" / "has a zero byte" bit
/// tricks. A borrow can propagate upwards and mark a lane above a real match
/// too, but never below one: the lowest marked lane is always a real match,
/// and a word with no match has no mark at all. So the scan below jumps
/// straight to the lowest mark, escapes that byte and rescans from there.
#[inline]
fn escape_marks(w: u64) -> u64 {
    const HIGH: u64 = lanes(0x80);
    let less_than_space = w.wrapping_sub(lanes(0x20)) & !w & HIGH;
    let q = w ^ lanes(b'"');
    let quote = q.wrapping_sub(lanes(1)) & !q & HIGH;
    let b = w ^ lanes(b'\\');
    let backslash = b.wrapping_sub(lanes(1)) & !b & HIGH;
    less_than_space | quote | backslash
}

/// Appends the escape for byte `b`, which needs one.
#[inline]
fn push_escape(b: u8, out: &mut Vec<u8>) {
    let e = ESCAPE[b as usize];
    if e == b'u' {
        out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
    } else {
        out.extend_from_slice(&[b'\\', e]);
    }
}

/// Appends `s` to `out` as a quoted JSON string.
///
/// Escapes `"` and `\`, writes `\n` `\r` `\t` `\b` `\f` for those control
/// characters and `\u00XX` (lowercase hex) for the other bytes below 0x20.
/// Everything else, DEL and all non-ASCII text included, is copied as is:
/// JSON allows it, the input is a `&str` so it is valid UTF-8 already, and
/// escaping it would only make recordings bigger.
pub fn escape_into(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    // The common case is no escapes at all; reserve for that once.
    out.reserve(bytes.len() + 2);
    out.push(b'"');

    let mut start = 0; // first byte not yet copied to `out`
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let marks = escape_marks(u64::from_le_bytes(w));
        if marks == 0 {
            i += 8;
            continue;
        }
        let at = i + (marks.trailing_zeros() / 8) as usize;
        out.extend_from_slice(&bytes[start..at]);
        push_escape(bytes[at], out);
        start = at + 1;
        i = at + 1;
    }
    // The tail, shorter than a word.
    while i < bytes.len() {
        if ESCAPE[bytes[i] as usize] != 0 {
            out.extend_from_slice(&bytes[start..i]);
            push_escape(bytes[i], out);
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn esc(s: &str) -> String {
        let mut out = Vec::new();
        escape_into(s, &mut out);
        String::from_utf8(out).expect("escaped output is UTF-8")
    }

    #[test]
    fn simple_escapes() {
        assert_eq!(esc(""), r#""""#);
        assert_eq!(esc("abc"), r#""abc""#);
        assert_eq!(esc("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(esc("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(esc("\u{1b}[0m"), r#""\u001b[0m""#);
        assert_eq!(esc("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(esc("héllo €😀"), "\"héllo €😀\"");
    }

    #[test]
    fn escapes_at_every_word_offset() {
        // Put the special byte at every position relative to the 8-byte
        // words, so both the fast skip and the tail loop see it.
        for special in ['"', '\\', '\n', '\u{1}', '\u{1f}'] {
            for len in 0..20 {
                for pos in 0..=len {
                    let mut s: String = "x".repeat(len);
                    s.insert(pos, special);
                    assert_eq!(esc(&s), serde_json::to_string(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn all_bytes_below_0x80() {
        let s: String = (0u8..0x80).map(char::from).collect();
        assert_eq!(esc(&s), serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn appends_without_clobbering() {
        let mut out = b"prefix".to_vec();
        escape_into("a\nb", &mut out);
        assert_eq!(out, b"prefix\"a\\nb\"");
    }

    proptest! {
        #[test]
        fn matches_serde_json(s in any::<String>()) {
            prop_assert_eq!(esc(&s), serde_json::to_string(&s).unwrap());
        }

        #[test]
        fn lowest_mark_is_a_real_match(word in any::<[u8; 8]>(), pick in vec(0usize..8, 0..4), special in vec(prop_oneof![0u8..0x20, Just(b'"'), Just(b'\\')], 4)) {
            // Random words rarely hold a byte that needs escaping: plant some.
            let mut w = word;
            for (&at, &b) in pick.iter().zip(&special) {
                w[at] = b;
            }
            let marks = escape_marks(u64::from_le_bytes(w));
            let first = w.iter().position(|&b| ESCAPE[b as usize] != 0);
            match first {
                None => prop_assert_eq!(marks, 0),
                Some(at) => prop_assert_eq!((marks.trailing_zeros() / 8) as usize, at),
            }
        }

        #[test]
        fn matches_serde_json_control_heavy(s in "[\\x00-\\x20\"\\\\a-z\\x7f€😀]{0,64}") {
            prop_assert_eq!(esc(&s), serde_json::to_string(&s).unwrap());
        }
    }
}
