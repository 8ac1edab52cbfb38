//! The current screen of a live session: a virtual terminal fed with the
//! session's output, and a [`Snapshot`] of it as escape sequences.
//!
//! A responder who joins a live session (`shelltrail tail ID`) needs to see
//! what the user sees right now: vim's buffer, top's table, the last lines
//! of a shell. The output stream from the middle cannot give that: an
//! application draws its screen once and then only sends changes ("move to
//! row 12, write 3 characters"), so the bytes after the join are fragments
//! that mean nothing without the screen they change. So every live session
//! keeps a [`Screen`], fed with every output byte, and a joiner is first sent
//! [`Screen::snapshot`]: a byte stream that paints that screen on a fresh
//! terminal, after which the live bytes apply exactly as on the user's.
//!
//! # The emulator
//!
//! The terminal emulation is [avt](https://crates.io/crates/avt), asciinema's
//! virtual terminal, which asciinema's own player, server and live streaming
//! use for this very purpose: their live stream starts with an "init" event
//! holding the terminal's size and `avt`'s dump, followed by the output that
//! comes after it. Emulating a terminal correctly is a large, subtle job
//! (wide characters, pending wraps, scroll regions, reflow on resize, the
//! alternate screen), so we do none of it here.
//!
//! What avt gives: parsing of the output (a `&str`), the primary and
//! alternate screens, the cursor, pen, scroll region, tab stops, charsets,
//! saved cursors and the modes that change how later output lands (origin,
//! auto-wrap, insert, new line, cursor keys), resizing with reflow, and
//! [`avt::Terminal::dump`]: escape sequences that rebuild all of that on a
//! terminal of the same size, in its initial state, including an escape
//! sequence the parser was in the middle of.
//!
//! What this module adds:
//!
//! * **Bytes in.** avt takes text; a PTY gives bytes, cut anywhere. [`feed`]
//!   decodes UTF-8 itself, keeping the up to 3 bytes of a character cut by
//!   the end of a read for the next call, and replaces invalid sequences by
//!   U+FFFD exactly as [`String::from_utf8_lossy`] would over the whole
//!   stream (so the result never depends on where reads were cut). The cut
//!   bytes are appended to a snapshot, so that the live bytes that follow
//!   complete the character on the joiner's terminal too.
//! * **A defined starting point.** avt's dump assumes a terminal in its
//!   initial state; a joiner's has their shell on it. A snapshot starts with
//!   RIS (`ESC c`, full reset): primary screen, cleared, cursor home, default
//!   pen, modes and tab stops.
//! * **Portable sequences.** avt's dump is meant for avt. Before it goes to
//!   a real terminal, three of its forms are rewritten into ones that every
//!   terminal a responder may use understands, and that avt reads the same:
//!   the 8-bit C1 controls that it uses for an unfinished escape sequence
//!   (U+009B CSI, U+009D OSC…) become their 7-bit `ESC` forms, since a
//!   UTF-8 terminal need not take C1 controls encoded as characters; the
//!   colon form of 256-colour and RGB colours (`38:5:n`, `38:2:r:g:b`)
//!   becomes the semicolon form (`38;5;n`), which every terminal with these
//!   colours reads, where the colon form is not universal; REP (`CSI n b`,
//!   "repeat the last character") is written out as the characters, since
//!   not every terminal implements it and one that does not would drop runs
//!   of characters and shift the rest of the row; and its tab-stop controls
//!   (`CSI 0 W`, `CSI 5 W`) become HTS (`ESC H`) and TBC (`CSI 3 g`).
//! * **Bounded cost.** No scrollback is kept (a snapshot shows the screen
//!   only), and sizes are clamped to 1 ..= [`MAX_COLS`] × [`MAX_ROWS`], so a
//!   session claiming a 65535×65535 terminal cannot make the collector
//!   allocate gigabytes.
//!
//! # Using it for a live session
//!
//! Feed the session's output events (`o`) as they arrive, and call
//! [`Screen::resize`] on its resize events (`r`); input events do not touch
//! the screen. To let someone join, take the snapshot and start forwarding
//! the output that follows it in one step, under the same lock as feeding,
//! so that no byte falls between them or is counted twice: send
//! [`Snapshot::bytes`], then the following output bytes unchanged. A joiner
//! whose terminal is not [`Snapshot::cols`] × [`Snapshot::rows`] sees the
//! screen cut or padded, as the session's own output would be; the client
//! should say so.
//!
//! # Known gaps
//!
//! What avt does not model is not in a snapshot. None of it changes the
//! characters on the screen or where they are:
//!
//! * Attributes beyond bold, faint, italic, underline, blink, inverse,
//!   strikethrough and the 16/256/RGB colours: concealed (SGR 8), overline,
//!   underline styles and colours (`4:3`, SGR 58), hyperlinks (OSC 8).
//! * The window title (OSC 0/2), the palette (OSC 4/10/11), the cursor
//!   shape (DECSCUSR), reverse video (DECSCNM), double-width or
//!   double-height lines (DECDWL/DECDHL), images (sixel, kitty).
//! * Input modes: mouse reporting, bracketed paste, keypad application mode,
//!   focus events, kitty's keyboard protocol. A joiner who only watches does
//!   not want them; one who types through `tail` would have to be told.
//! * Scrollback: the lines that scrolled off the top are not sent.
//! * Character widths are avt's (Unicode's East Asian Width, from the
//!   `unicode-width` crate); a joiner's terminal that draws an emoji one
//!   cell wide shifts the rest of that row, as it would for the user.
//! * With origin mode on and the cursor outside the scroll region, avt
//!   restores the cursor with `CSI u` (SCORC), which some terminals lack.
//!
//! [`feed`]: Screen::feed

use std::fmt;

use avt::Terminal;

/// Widest screen kept, in columns. Wider sessions are cut at the right.
pub const MAX_COLS: u16 = 1000;
/// Tallest screen kept, in rows. Taller sessions are cut at the bottom.
pub const MAX_ROWS: u16 = 500;

/// RIS, "reset to initial state": what a snapshot starts with.
const RESET: &[u8] = b"\x1bc";

/// The virtual terminal of one live session. See the [module](self) docs.
pub struct Screen {
    term: Terminal,
    cols: u16,
    rows: u16,
    /// The start of a UTF-8 character that the last `feed` ended in.
    partial: [u8; 4],
    partial_len: usize,
}

/// A session's screen at one moment, as bytes for a terminal to draw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Columns of the screen, and of the terminal the bytes are meant for.
    pub cols: u16,
    /// Rows of the screen, and of the terminal the bytes are meant for.
    pub rows: u16,
    /// Escape sequences and text that, written to a terminal of this size,
    /// reset it and draw the screen: every cell's character and attributes,
    /// the cursor (position, visibility), the active screen (primary or
    /// alternate, with the primary's content behind the alternate), the
    /// scroll region, the modes avt tracks, and any escape sequence or UTF-8
    /// character that the output was in the middle of.
    pub bytes: Vec<u8>,
}

impl Screen {
    /// A blank terminal of `cols` × `rows`, clamped to 1 ..= [`MAX_COLS`] ×
    /// [`MAX_ROWS`] (a zero size from a broken client must not fail a live
    /// session).
    pub fn new(cols: u16, rows: u16) -> Self {
        let (cols, rows) = clamp(cols, rows);
        let term = Terminal::new(cols.into(), rows.into()).expect("a clamped size is at least 1×1");
        Screen {
            term,
            cols,
            rows,
            partial: [0; 4],
            partial_len: 0,
        }
    }

    /// The size of the screen (after clamping).
    pub fn size(&self) -> (u16, u16) {
        (self.cols, self.rows)
    }

    /// Whether the alternate screen (vim, less, top…) is active.
    pub fn is_alternate(&self) -> bool {
        self.term.active_screen_kind() == avt::ScreenKind::Alternate
    }

    /// Applies output as the terminal received it: bytes of any length, cut
    /// anywhere, UTF-8 or not (invalid sequences show as U+FFFD).
    pub fn feed(&mut self, mut output: &[u8]) {
        // Complete a character that the previous call cut, one byte at a time
        // (at most three), so that we never copy the caller's buffer.
        while self.partial_len > 0 {
            let Some((&byte, rest)) = output.split_first() else {
                return;
            };
            let mut buf = self.partial;
            buf[self.partial_len] = byte;
            let len = self.partial_len + 1;
            match std::str::from_utf8(&buf[..len]) {
                Ok(text) => {
                    self.term.feed(text);
                    self.partial_len = 0;
                    output = rest;
                }
                Err(e) if e.error_len().is_none() => {
                    self.partial = buf;
                    self.partial_len = len;
                    output = rest;
                }
                Err(_) => {
                    // `byte` cannot continue the character: the cut bytes are
                    // an invalid sequence of their own, and `byte` is read
                    // afresh below, as a whole-stream decoder would.
                    self.term.feed('\u{FFFD}');
                    self.partial_len = 0;
                }
            }
        }
        let mut chunks = output.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            if !chunk.valid().is_empty() {
                self.term.feed(chunk.valid());
            }
            let invalid = chunk.invalid();
            if invalid.is_empty() {
                continue;
            }
            let truncated =
                chunks.peek().is_none() && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
            if truncated {
                // The start of a character that the next call completes.
                self.partial[..invalid.len()].copy_from_slice(invalid);
                self.partial_len = invalid.len();
            } else {
                self.term.feed('\u{FFFD}');
            }
        }
    }

    /// Resizes the terminal, as the session's terminal was (clamped like
    /// [`Screen::new`]). The primary screen reflows its lines, as most
    /// terminals do; the alternate screen is cut or padded, and the
    /// application redraws it after its SIGWINCH.
    pub fn resize(&mut self, cols: u16, rows: u16) {
        let (cols, rows) = clamp(cols, rows);
        if (cols, rows) != (self.cols, self.rows) {
            self.term.resize(cols.into(), rows.into());
            self.cols = cols;
            self.rows = rows;
        }
    }

    /// The bytes that draw this screen on a fresh terminal of its size. See
    /// [`Snapshot::bytes`], and the [module](self) docs for what is left out.
    pub fn snapshot(&self) -> Snapshot {
        let dump = self.term.dump();
        let mut bytes = Vec::with_capacity(RESET.len() + dump.len() + 64);
        bytes.extend_from_slice(RESET);
        write_portable(&dump, &mut bytes);
        bytes.extend_from_slice(&self.partial[..self.partial_len]);
        Snapshot {
            cols: self.cols,
            rows: self.rows,
            bytes,
        }
    }
}

impl fmt::Debug for Screen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Screen")
            .field("cols", &self.cols)
            .field("rows", &self.rows)
            .field("alternate", &self.is_alternate())
            .field("cursor", &self.term.cursor())
            .finish_non_exhaustive()
    }
}

fn clamp(cols: u16, rows: u16) -> (u16, u16) {
    (cols.clamp(1, MAX_COLS), rows.clamp(1, MAX_ROWS))
}

/// Copies avt's dump to `out` with the rewrites listed in the module docs:
/// 7-bit controls, semicolon colours, no REP, HTS/TBC for tab stops.
///
/// The dump's text never contains an escape character, so its escape
/// sequences are found exactly; anything not rewritten is copied as is.
fn write_portable(dump: &str, out: &mut Vec<u8>) {
    let mut chars = dump.chars().peekable();
    // The last character printed: what a REP repeats.
    let mut last = None;
    // A CSI's parameters, one buffer for all of them.
    let mut body = String::new();
    let mut utf8 = [0; 4];
    let mut push = |out: &mut Vec<u8>, c: char| out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                write_csi(&mut chars, last, &mut body, out);
            }
            '\u{9b}' => write_csi(&mut chars, last, &mut body, out),
            '\u{1b}' => {
                // ESC, its intermediates (`(`, `#`…) and its final byte.
                out.push(0x1b);
                while let Some(&c) = chars.peek() {
                    chars.next();
                    push(out, c);
                    if !(' '..='/').contains(&c) {
                        break;
                    }
                }
            }
            '\u{80}'..='\u{9f}' => {
                // The other C1 controls (DCS, OSC, SOS…): ESC and their
                // 7-bit final byte.
                out.push(0x1b);
                out.push(c as u8 - 0x40);
            }
            c if c < ' ' || c == '\u{7f}' => out.push(c as u8),
            c => {
                push(out, c);
                last = Some(c);
            }
        }
    }
}

/// Writes one CSI sequence whose introducer has been read from `chars`.
fn write_csi(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    last: Option<char>,
    body: &mut String,
    out: &mut Vec<u8>,
) {
    // Parameters and intermediates: 0x20..=0x3F. The dump holds only ASCII here.
    body.clear();
    while let Some(&c) = chars.peek() {
        if !(' '..='?').contains(&c) {
            break;
        }
        body.push(c);
        chars.next();
    }
    let Some(fin) = chars.next_if(|c| ('@'..='~').contains(c)) else {
        // An escape sequence that the output was in the middle of: the live
        // bytes finish it.
        out.extend_from_slice(b"\x1b[");
        out.extend_from_slice(body.as_bytes());
        return;
    };
    match (fin, body.as_str()) {
        ('m', _) => {
            out.extend_from_slice(b"\x1b[");
            out.extend(body.bytes().map(|b| if b == b':' { b';' } else { b }));
            out.push(b'm');
        }
        ('b', count) if count.bytes().all(|b| b.is_ascii_digit()) => {
            let n = count.parse::<usize>().unwrap_or(1).max(1);
            if let Some(c) = last {
                let mut utf8 = [0; 4];
                let c = c.encode_utf8(&mut utf8).as_bytes();
                for _ in 0..n {
                    out.extend_from_slice(c);
                }
            }
        }
        ('W', "0") => out.extend_from_slice(b"\x1bH"),
        ('W', "5") => out.extend_from_slice(b"\x1b[3g"),
        _ => {
            out.extend_from_slice(b"\x1b[");
            out.extend_from_slice(body.as_bytes());
            out.push(fin as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PROMPT: &str = "\x1b[01;32malice@web1\x1b[00m:\x1b[01;34m~/src\x1b[00m$ ";

    /// Both screens hold the same state: size, active screen, cursor, every
    /// cell (character, width, attributes) and soft wrap of both screens,
    /// and, through avt's dump, the pen, modes, margins and saved cursors.
    fn assert_same(a: &Screen, b: &Screen) {
        assert_eq!(a.size(), b.size());
        assert_eq!(a.term.active_screen_kind(), b.term.active_screen_kind());
        assert_eq!(a.term.cursor(), b.term.cursor());
        for (which, sa, sb) in [
            ("active", a.term.screen(), b.term.screen()),
            ("primary", a.term.primary_screen(), b.term.primary_screen()),
        ] {
            assert_eq!(sa.visible_lines().len(), sb.visible_lines().len());
            for (row, (la, lb)) in sa.visible_lines().zip(sb.visible_lines()).enumerate() {
                assert_eq!(la.text(), lb.text(), "{which} screen, row {row}");
                for (col, (ca, cb)) in la.cells().iter().zip(lb.cells()).enumerate() {
                    assert_eq!(ca, cb, "{which} screen, row {row}, column {col}");
                }
                assert_eq!(la.is_wrapped(), lb.is_wrapped(), "{which} screen, row {row}: wrap");
            }
        }
        assert_eq!(a.term.dump(), b.term.dump());
        assert_eq!(a.partial[..a.partial_len], b.partial[..b.partial_len]);
    }

    /// Only 7-bit controls, semicolon colours, no REP in what we send.
    fn assert_portable(bytes: &[u8]) {
        let text = std::str::from_utf8(bytes).expect("a snapshot without a cut character is UTF-8");
        assert!(
            !text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
            "C1 control in {text:?}"
        );
        for seq in text.split('\x1b').skip(1) {
            let Some(body) = seq.strip_prefix('[') else { continue };
            // The last one may be unfinished: the live bytes finish it.
            let Some(end) = body.find(|c: char| ('@'..='~').contains(&c)) else {
                continue;
            };
            let (params, fin) = (&body[..end], &body[end..end + 1]);
            assert_ne!(fin, "b", "REP in {text:?}");
            assert_ne!(fin, "W", "CTC in {text:?}");
            if fin == "m" {
                assert!(!params.contains(':'), "colon SGR {params:?}");
            }
        }
    }

    /// Draws `screen`'s snapshot on a fresh screen of its size, checks that
    /// the two are the same, and that they stay the same under `more` output.
    fn roundtrip(screen: &mut Screen, more: &[u8]) -> Screen {
        let snap = screen.snapshot();
        assert_eq!((snap.cols, snap.rows), screen.size());
        assert!(snap.bytes.starts_with(RESET));
        if screen.partial_len == 0 {
            assert_portable(&snap.bytes);
        }
        let mut joined = Screen::new(snap.cols, snap.rows);
        joined.feed(&snap.bytes);
        assert_same(screen, &joined);
        // A reset in front changes nothing: a joiner's terminal is not fresh.
        let mut dirty = Screen::new(snap.cols, snap.rows);
        dirty.feed(b"\x1b[?1049h\x1b[31;1mjunk\x1b[5;10r\x1b[?25l\x1b[?6h\x1b(0");
        dirty.feed(&snap.bytes);
        assert_same(screen, &dirty);
        screen.feed(more);
        joined.feed(more);
        assert_same(screen, &joined);
        joined
    }

    fn row_text(screen: &Screen, row: usize) -> String {
        screen
            .term
            .screen()
            .line(row)
            .expect("row on screen")
            .text()
            .trim_end()
            .to_owned()
    }

    /// `ls --color`-like lines, a prompt, and more lines than the screen has.
    fn shell_session(lines: usize) -> Vec<u8> {
        let mut s = format!("{PROMPT}ls -l --color=auto\r\n");
        for i in 0..lines {
            let (color, name) = match i % 4 {
                0 => ("01;34", format!("dir{i}")),
                1 => ("01;32", format!("run{i}.sh")),
                2 => ("01;36", format!("link{i} -> target")),
                _ => ("00", format!("notes-{i}.txt")),
            };
            s += &format!(
                "-rw-r--r-- 1 alice staff {:>6} Mar  3 10:{:02} \x1b[{color}m{name}\x1b[0m\r\n",
                i * 37,
                i % 60
            );
        }
        s += PROMPT;
        s.into_bytes()
    }

    #[test]
    fn shell_output_that_scrolled_past_the_screen() {
        let mut screen = Screen::new(80, 24);
        screen.feed(&shell_session(100));
        assert!(!screen.is_alternate());
        assert_eq!(row_text(&screen, 23), "alice@web1:~/src$");
        assert!(row_text(&screen, 0).ends_with("run77.sh"), "{}", row_text(&screen, 0));
        let joined = roundtrip(&mut screen, b"echo done\r\ndone\r\n");
        assert_eq!(row_text(&joined, 22), "done");
        // A line longer than the screen soft-wraps, and keeps doing so.
        let mut screen = Screen::new(20, 5);
        screen.feed(format!("{PROMPT}{}\r\nshort\r\n{}", "x".repeat(45), "y".repeat(20)).as_bytes());
        roundtrip(&mut screen, b"z\r\n");
    }

    /// What vim sends when it starts, draws a file and moves the cursor.
    fn vim_start() -> Vec<u8> {
        let mut s = String::from(
            "\x1b[?1049h\x1b[22;0;0t\x1b[>4;2m\x1b[?1h\x1b=\x1b[?2004h\x1b[1;24r\x1b[?12h\x1b[?12l\x1b[27m\x1b[29m\x1b[m\
             \x1b[H\x1b[2J\x1b[?25l\x1b[24;1H\"main.rs\" 3L, 45B\x1b[1;1H",
        );
        s += "\x1b[38;5;130mfn\x1b[m \x1b[38;5;33mmain\x1b[m() {\r\n";
        s += "    \x1b[38;5;130mprintln!\x1b[m(\x1b[38;5;160m\"héllo, 世界\"\x1b[m);\r\n}\r\n";
        for _ in 3..23 {
            s += "\x1b[94m~                                                                               \x1b[m\r\n";
        }
        s += "\x1b[24;63H1,1\x1b[11CAll\x1b[2;5H\x1b[?25h";
        s.into_bytes()
    }

    #[test]
    fn alternate_screen_app_vim() {
        let mut screen = Screen::new(80, 24);
        screen.feed(&shell_session(30));
        screen.feed(b"vim main.rs\r\n");
        screen.feed(&vim_start());
        assert!(screen.is_alternate());
        assert_eq!(row_text(&screen, 0), "fn main() {");
        // The joiner ends up in the alternate screen, and vim's exit brings
        // back the same shell screen, with the cursor where it was.
        let joined = roundtrip(
            &mut screen,
            b"\x1b[2;13H\x1b[?25l\x1b[24;1H\x1b[K\x1b[?2004l\x1b[?1l\x1b>\x1b[?1049l\x1b[23;0;0t",
        );
        assert!(!joined.is_alternate());
        assert!(
            row_text(&joined, 22).ends_with("vim main.rs"),
            "{}",
            row_text(&joined, 22)
        );
    }

    #[test]
    fn alternate_screen_app_top_and_less() {
        let mut screen = Screen::new(100, 30);
        screen.feed(&shell_session(10));
        screen.feed(b"top\r\n\x1b[?1049h\x1b[?1h\x1b=\x1b[?25l\x1b[H\x1b[2J");
        for tick in 0..3 {
            let mut s = format!(
                "\x1b[Htop - 10:0{tick}:11 up 3 days,  1 user,  load average: 0.{tick}2, 0.10, 0.05\x1b[K\r\n\
                 Tasks: \x1b[1m123 \x1b[m\x1b[39;49mtotal,\x1b[1m   1 \x1b[mrunning\x1b[K\r\n\x1b[K\r\n\
                 \x1b[7m    PID USER      PR  NI    VIRT    RES  %CPU  %MEM     TIME+ COMMAND      \x1b[m\x1b[K\r\n"
            );
            for p in 0..20 {
                let bold = if p == tick { "\x1b[1m" } else { "" };
                s += &format!(
                    "{bold}{:>7} alice     20   0  {:>6}  {:>5}  {:>4}.0   0.{p}   0:0{p}.00 proc{p}\x1b[m\x1b[K\r\n",
                    1000 + p,
                    p * 4096,
                    p * 300,
                    p % 7
                );
            }
            s += "\x1b[J\x1b[4;1H";
            screen.feed(s.as_bytes());
        }
        roundtrip(&mut screen, b"\x1b[?1l\x1b>\x1b[?25h\x1b[30;1H\x1b[?1049l\r\n");

        // less uses the same switch, and scrolls with the scroll region set.
        let mut screen = Screen::new(60, 10);
        screen.feed(format!("{PROMPT}less log\r\n\x1b[?1049h\x1b[?1h\x1b=\r").as_bytes());
        for i in 0..9 {
            screen.feed(format!("line {i}\r\n").as_bytes());
        }
        screen.feed(b"\x1b[7mlog (END)\x1b[27m\x1b[K\r\x1b[K\x1b[2;9r\x1b[9;1H\nline 9\x1b[r\x1b[10;1H:");
        roundtrip(&mut screen, b"\r\x1b[K\x1b[?1l\x1b>\x1b[?1049l");
    }

    #[test]
    fn colors_16_256_rgb_and_attributes() {
        let mut screen = Screen::new(120, 40);
        let mut s = String::new();
        for c in 30..38 {
            s += &format!("\x1b[{c}mf{c}\x1b[{}mF\x1b[{}mb\x1b[{}mB", c + 60, c + 10, c + 70);
        }
        s += "\x1b[0m\r\n";
        for n in 0..=255u16 {
            s += &format!("\x1b[38;5;{n}m\x1b[48;5;{}m#", 255 - n);
            if n % 64 == 63 {
                s += "\x1b[m\r\n";
            }
        }
        // Colon forms, as some applications send them.
        s += "\x1b[38:5:208mo\x1b[48:2::10:20:30mc\x1b[38:2:1:2:3mr\x1b[m\r\n";
        for r in (0..=255u16).step_by(15) {
            s += &format!("\x1b[38;2;{r};{};{}m\x1b[48;2;{};{r};7m@", 255 - r, r / 2, 255 - r);
        }
        s += "\x1b[m\r\n";
        for (sgr, name) in [
            ("1", "bold"),
            ("2", "faint"),
            ("3", "italic"),
            ("4", "underline"),
            ("5", "blink"),
            ("7", "inverse"),
            ("9", "strike"),
            ("1;3;4;7;38;5;196;48;2;0;0;95", "all"),
        ] {
            s += &format!("\x1b[{sgr}m{name}\x1b[m ");
        }
        // Erasing with a background colour colours the erased cells.
        s += "\r\n\x1b[44mblue to the end\x1b[K\x1b[m\r\n\x1b[1;33m";
        screen.feed(s.as_bytes());
        let joined = roundtrip(&mut screen, b"still bold yellow\x1b[m plain");
        let cells = joined.term.screen().line(0).expect("row 0").cells().to_vec();
        assert_eq!(cells[0].pen().foreground(), Some(avt::Color::Indexed(0)));
        assert_eq!(cells[3].pen().foreground(), Some(avt::Color::Indexed(8)));
        let cells = joined.term.screen().line(5).expect("row 5").cells().to_vec();
        assert_eq!(cells[0].pen().foreground(), Some(avt::Color::Indexed(208)));
        assert_eq!(cells[1].pen().background(), Some(avt::Color::rgb(10, 20, 30)));
    }

    #[test]
    fn wide_characters() {
        let mut screen = Screen::new(20, 8);
        screen.feed("日本語のテキスト\r\n🦀 crab 👍🏽 ok\r\n".as_bytes());
        // A wide character that does not fit in the last column wraps.
        screen.feed("abcdefghijklmnopqrs漢字\r\n".as_bytes());
        // Overwriting half of a wide character, and a run of wide ones.
        screen.feed("中中中中中中中中\r\x1b[1Cx\r\n".as_bytes());
        // Combining marks and a wide character in the last two columns (a
        // pending wrap after a wide character).
        screen.feed("e\u{301}\u{0327} ok\r\n\x1b[19G界".as_bytes());
        let joined = roundtrip(&mut screen, "!".as_bytes());
        assert_eq!(row_text(&joined, 0), "日本語のテキスト");
    }

    #[test]
    fn resize_in_the_middle() {
        let mut screen = Screen::new(40, 10);
        screen.feed(&shell_session(12));
        screen.feed(b"a long command line that will need to wrap once the terminal narrows");
        screen.resize(25, 8);
        screen.feed(b"\r\nafter the first resize\r\n");
        roundtrip(&mut screen, b"x");
        screen.resize(60, 12);
        screen.feed(&shell_session(3));
        roundtrip(&mut screen, b"y");
        // Resized while the alternate screen is on, then vim redraws.
        screen.feed(&vim_start());
        screen.resize(50, 20);
        screen.feed(b"\x1b[1;20r\x1b[H\x1b[2Jredrawn\x1b[20;1H\"main.rs\"\x1b[1;1H");
        assert_eq!(screen.snapshot().cols, 50);
        roundtrip(&mut screen, b"\x1b[?1049l");
    }

    #[test]
    fn cursor_modes_and_partial_state() {
        // A full last column leaves a pending wrap; hidden cursor; origin mode
        // in a scroll region; insert mode; tab stops; DEC line drawing.
        let mut screen = Screen::new(30, 8);
        screen.feed(b"\x1b[3g\x1b[5G\x1bH\x1b[17G\x1bH\r\ta\tb\r\n");
        screen.feed(b"\x1b(0lqqqqk\x1b(B box\r\n");
        screen.feed(b"\x1b[2;6r\x1b[?6h\x1b[3;4Hin region\x1b[4h\x1b[1;1Hins\x1b[?25l");
        screen.feed(&[b'#'; 27]);
        roundtrip(&mut screen, b"\tZ\x1b[?6l\x1b[4l\x1b[r\x1b[?25hwrapped!");

        let mut screen = Screen::new(10, 3);
        screen.feed(b"0123456789");
        roundtrip(&mut screen, b"next row");

        // The snapshot is taken in the middle of an escape sequence, of an
        // OSC string, and of a UTF-8 character: the live bytes finish them.
        for (head, tail) in [
            (&b"red: \x1b[3"[..], &b"1mred\x1b[m"[..]),
            (b"\x1b[?104", b"9hin alt"),
            (b"\x1b", b"[1mbold"),
            (b"title\x1b]0;my ti", b"tle\x07after"),
            (
                "emoji \u{1F980}".as_bytes().split_at(8).0,
                "emoji \u{1F980} ok".as_bytes().split_at(8).1,
            ),
            (
                "\u{4e16}".as_bytes().split_at(1).0,
                "\u{4e16}x".as_bytes().split_at(1).1,
            ),
        ] {
            let mut screen = Screen::new(20, 4);
            screen.feed(head);
            roundtrip(&mut screen, tail);
        }
    }

    #[test]
    fn sizes_are_clamped() {
        let screen = Screen::new(0, 0);
        assert_eq!(screen.size(), (1, 1));
        let mut screen = Screen::new(u16::MAX, 3);
        assert_eq!(screen.size(), (MAX_COLS, 3));
        screen.resize(80, u16::MAX);
        assert_eq!(screen.size(), (80, MAX_ROWS));
        screen.resize(0, 24);
        assert_eq!(screen.snapshot().cols, 1);
    }

    /// A stream with everything a read can cut: escape sequences, 2-, 3- and
    /// 4-byte characters, an alternate-screen switch.
    fn mixed_stream() -> Vec<u8> {
        let mut s = shell_session(3);
        s.extend_from_slice("héllo wörld — 日本 🦀\x1b[1;38;2;255;100;0mRGB\x1b[m\r\n".as_bytes());
        s.extend_from_slice(&vim_start()[..200]);
        s.extend_from_slice("\x1b[5;5Hµ€😀\x1b]0;title\x07end".as_bytes());
        s
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_screen() {
        let stream = mixed_stream();
        let mut whole = Screen::new(40, 12);
        whole.feed(&stream);
        for at in 0..=stream.len() {
            let mut split = Screen::new(40, 12);
            split.feed(&stream[..at]);
            split.feed(&stream[at..]);
            assert_same(&whole, &split);
        }
        // One byte at a time.
        let mut bytewise = Screen::new(40, 12);
        for b in &stream {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_same(&whole, &bytewise);
    }

    #[test]
    fn invalid_utf8_shows_as_replacement_characters() {
        let cases: [&[u8]; 10] = [
            b"a\x80b",                   // lone continuation byte
            b"a\xe2\x82b",               // truncated 3-byte sequence before ASCII
            b"\xf0\x9f\x98",             // truncated at the very end
            b"\xc0\x80",                 // overlong NUL
            b"\xed\xa0\x80",             // UTF-16 surrogate
            b"\xf4\x90\x80\x80",         // above U+10FFFF
            b"\xff\xfe",                 // never valid
            b"\x9b31mnot CSI",           // a raw 8-bit C1 byte is not UTF-8
            b"\xf0\x80\xe2\x82\xac",     // bad 4-byte start, then a valid euro sign
            b"\xe2\x82\xe2\x82\xac\xe2", // a cut, a euro, and a cut at the end
        ];
        for case in cases {
            let mut whole = Screen::new(20, 3);
            whole.feed(case);
            // Same as decoding the whole stream lossily, the last cut aside.
            let mut lossy = Terminal::new(20, 3).expect("size");
            let (complete, cut) = match case.utf8_chunks().last() {
                Some(c) if std::str::from_utf8(c.invalid()).is_err_and(|e| e.error_len().is_none()) => {
                    case.split_at(case.len() - c.invalid().len())
                }
                _ => (case, &b""[..]),
            };
            lossy.feed(String::from_utf8_lossy(complete).as_ref());
            assert_eq!(whole.term.dump(), lossy.dump(), "{case:?}");
            assert_eq!(&whole.partial[..whole.partial_len], cut, "{case:?}");
            for at in 0..=case.len() {
                let mut split = Screen::new(20, 3);
                split.feed(&case[..at]);
                split.feed(&case[at..]);
                assert_same(&whole, &split);
            }
            roundtrip(&mut whole, b"x");
        }
    }

    proptest! {
        #[test]
        fn prop_split_feeds_match_one_feed(
            data in prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    prop::sample::select(b"\x1b[;?0123456789mHJKhl\r\n".to_vec()),
                    prop::sample::select(vec![0xe4u8, 0xb8, 0x96, 0xf0, 0x9f, 0xa6, 0x80, 0xc3, 0xa9]),
                ],
                0..200,
            ),
            cut1 in any::<prop::sample::Index>(),
            cut2 in any::<prop::sample::Index>(),
        ) {
            let mut whole = Screen::new(16, 5);
            whole.feed(&data);
            let (mut a, mut b) = (cut1.index(data.len() + 1), cut2.index(data.len() + 1));
            if a > b {
                std::mem::swap(&mut a, &mut b);
            }
            let mut split = Screen::new(16, 5);
            split.feed(&data[..a]);
            split.feed(&data[a..b]);
            split.feed(&data[b..]);
            assert_same(&whole, &split);
            roundtrip(&mut whole, b"\x1b[mok");
        }
    }

    /// Not a test: the cost of feeding and of a snapshot, printed. Run with
    /// `cargo test -p shelltrail-cast --release -- --ignored --nocapture screen::tests::timing`.
    #[test]
    #[ignore = "timing figures, not a check"]
    fn timing() {
        use std::time::Instant;
        const MIB: usize = 1 << 20;
        // Shell output, a full-screen application redrawing, and UTF-8 text.
        let mut shell = Vec::new();
        while shell.len() < MIB {
            shell.extend_from_slice(&shell_session(50));
        }
        let mut app = Vec::new();
        let mut tick = 0;
        while app.len() < MIB {
            app.extend_from_slice(b"\x1b[H");
            for row in 1..=60 {
                app.extend_from_slice(
                    format!(
                        "\x1b[{row};1H\x1b[38;5;{}m{:>6} \x1b[1mproc{tick}\x1b[m {:<170}\x1b[K",
                        row + tick % 200,
                        row * tick,
                        "x".repeat(row % 170)
                    )
                    .as_bytes(),
                );
            }
            tick += 1;
        }
        let utf8 = "Привет, мир! 日本語のテキスト 🦀 ok\r\n".repeat(MIB / 60).into_bytes();
        for (name, data) in [
            ("shell ls --color", &shell),
            ("full-screen redraws", &app),
            ("UTF-8 text", &utf8),
        ] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let mut screen = Screen::new(200, 60);
                let t = Instant::now();
                for read in data.chunks(4096) {
                    screen.feed(read);
                }
                best = best.min(t.elapsed().as_secs_f64() / (data.len() as f64 / MIB as f64));
            }
            println!("feed, {name}: {:.1} ms per MiB ({:.0} MiB/s)", best * 1e3, 1.0 / best);
        }
        // Snapshots of 200×60: a busy coloured screen, and every cell different.
        let mut busy = Screen::new(200, 60);
        busy.feed(&app[..app.len() / 2]);
        let mut motley = Screen::new(200, 60);
        let mut s = String::from("\x1b[?1049h");
        for i in 0..200 * 60 {
            s += &format!(
                "\x1b[38;2;{};{};{}m\x1b[48;5;{}m{}",
                i % 256,
                i / 7 % 256,
                i / 3 % 256,
                i % 256,
                char::from(b'!' + (i % 90) as u8)
            );
        }
        motley.feed(s.as_bytes());
        for (name, screen) in [("busy", &busy), ("every cell different", &motley)] {
            let n = 200;
            let t = Instant::now();
            let mut len = 0;
            for _ in 0..n {
                len = std::hint::black_box(screen.snapshot()).bytes.len();
            }
            let per = t.elapsed().as_secs_f64() / n as f64;
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(screen.term.dump());
            }
            let dump = t.elapsed().as_secs_f64() / n as f64;
            println!(
                "snapshot 200x60, {name}: {:.3} ms ({:.3} ms of it avt's dump), {len} bytes",
                per * 1e3,
                dump * 1e3
            );
        }
        println!("size of one cell: {} bytes", std::mem::size_of::<avt::Cell>());
    }
}
