//! The operator CLI on the host: `sessions`, `export`, `play`, `demo`.
//!
//! The CLI reads the spool files directly (root or the `shelltrail` group),
//! so it works while the agent is down, which is when an incident responder
//! may need it most.

pub mod demo;
pub mod export;
pub mod play;
pub mod sessions;

use crate::agent::spool::{self, Index, SessionEntry};
use crate::config::Config;
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::PathBuf;

/// The spool, opened for reading.
pub struct Store {
    pub dir: PathBuf,
    pub index: Index,
}

impl Store {
    pub fn open(cfg: &Config) -> Result<Store> {
        let index = spool::scan(&cfg.spool_dir, false).map_err(anyhow::Error::from)?;
        Ok(Store {
            dir: cfg.spool_dir.clone(),
            index,
        })
    }

    /// A session by id or by a unique prefix of it (ids are long).
    pub fn find(&self, id: &str) -> Result<&SessionEntry> {
        if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            bail!("{id:?} is not a session id (see `shelltrail sessions`)");
        }
        let mut hits = self
            .index
            .sessions
            .range(id.to_string()..)
            .take_while(|(k, _)| k.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some((_, s)), None) => Ok(s),
            (None, _) => bail!("no session {id} in the spool at {}", self.dir.display()),
            (Some(_), Some(_)) => bail!("{id} matches several sessions; give more of the id"),
        }
    }

    /// The session's recording as asciicast v3 text, decompressed chunk by
    /// chunk (a long session is never held in memory whole). The header line
    /// gains what only the agent knows (the verified uid, the end), and a
    /// missing chunk becomes a visible marker event instead of a silent hole.
    pub fn cast_reader<'a>(&'a self, s: &'a SessionEntry) -> CastReader<'a> {
        CastReader {
            store: self,
            session: s,
            next: 0,
            expect_seq: 0,
            buf: Vec::new(),
            pos: 0,
            patched: false,
        }
    }
}

/// Streams a session's asciicast text out of the spool.
pub struct CastReader<'a> {
    store: &'a Store,
    session: &'a SessionEntry,
    next: usize,
    expect_seq: u64,
    buf: Vec<u8>,
    pos: usize,
    patched: bool,
}

impl CastReader<'_> {
    fn fill(&mut self) -> std::io::Result<bool> {
        let Some(c) = self.session.chunks.get(self.next) else {
            return Ok(false);
        };
        self.next += 1;
        self.buf.clear();
        self.pos = 0;
        if c.seq != self.expect_seq && self.patched {
            let line = format!(
                "[0.000, \"m\", \"shelltrail: gap: chunks {}..{} of this session are missing\"]\n",
                self.expect_seq,
                c.seq - 1
            );
            self.buf.extend_from_slice(line.as_bytes());
        }
        self.expect_seq = c.seq + 1;
        let bytes = spool::read_chunk(&self.store.dir, c.loc).map_err(std::io::Error::other)?;
        let (_, text) = shelltrail_cast::chunk::decompress(&bytes)
            .map_err(|e| std::io::Error::other(format!("chunk {} of session {}: {e}", c.seq, self.session.id())))?;
        if !self.patched {
            self.patched = true;
            if c.seq != 0 {
                return Err(std::io::Error::other(format!(
                    "session {}: the first chunk (with the header) is missing",
                    self.session.id()
                )));
            }
            self.buf.extend_from_slice(&patch_header(&text, self.session));
        } else {
            self.buf.extend_from_slice(&text);
        }
        Ok(true)
    }
}

impl Read for CastReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            if !self.fill()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Adds the agent's facts to the header's `shelltrail` attribute.
fn patch_header(text: &[u8], s: &SessionEntry) -> Vec<u8> {
    let nl = text.iter().position(|&b| b == b'\n').unwrap_or(text.len());
    let Ok(mut header) = serde_json::from_slice::<serde_json::Value>(&text[..nl]) else {
        return text.to_vec();
    };
    if let Some(st) = header.get_mut("shelltrail").and_then(|v| v.as_object_mut()) {
        st.insert("verified_uid".into(), s.open.peer_uid.into());
        st.insert("verified_user".into(), s.open.peer_user.clone().into());
        st.insert("verified_pid".into(), s.open.peer_pid.into());
        if let Some(c) = &s.close {
            st.insert("end_unix_ms".into(), c.close.end_unix_ms.max(0).into());
            st.insert("exit_status".into(), c.close.exit_status.into());
            st.insert("end_cause".into(), c.cause.clone().into());
            if !c.close.lost_seqs.is_empty() {
                st.insert("lost_chunks".into(), c.close.lost_seqs.clone().into());
            }
        }
    }
    let mut out = serde_json::to_vec(&header).unwrap_or_else(|_| text[..nl].to_vec());
    out.extend_from_slice(&text[nl..]);
    out
}

/// Formats unix milliseconds as UTC "YYYY-MM-DD HH:MM:SS".
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Loads the config for the CLI, with a hint when the spool is not readable.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    Config::load(path).context("loading the configuration")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_698_000_000), "2026-11-26 13:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
