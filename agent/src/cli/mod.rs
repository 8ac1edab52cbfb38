//! The operator CLI: `sessions`, `export`, `play`, `verify`, `demo`.
//!
//! Recordings come from a [`Source`]: this host's spool, read directly (root
//! or the `shelltrail` group; it works while the agent is down, which is
//! when a responder may need it most), or a collector over mutual TLS
//! (`--collector URL`). Both give the same rows and the same asciicast.

pub mod demo;
pub mod export;
pub mod play;
pub mod sessions;
pub mod verify;

use crate::agent::spool::{self, Index};
use crate::config::Config;
use anyhow::{Context, Result, bail};
use sessions::Row;
use shelltrail_proto::v1::{GetSessionRequest, ListSessionsRequest, ReadChunksRequest, query_client::QueryClient};
use std::io::Read;
use std::path::PathBuf;

/// How to reach a collector from the CLI.
#[derive(Debug, Clone, Default)]
pub struct CollectorArgs {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
}

/// Where recordings are read from.
pub enum Source {
    /// This host's spool.
    Spool { dir: PathBuf, index: Index },
    /// A collector's Query service.
    Collector {
        rt: tokio::runtime::Runtime,
        client: QueryClient<tonic::transport::Channel>,
        url: String,
    },
}

/// One chunk of a recording: its sequence number and bytes.
pub type ChunkBytes = (u64, Vec<u8>);

impl Source {
    /// The collector when `collector` is given (TLS files default to the
    /// config's `[ship]` ones), else the spool named in the config.
    pub fn open(cfg: &Config, collector: Option<&CollectorArgs>) -> Result<Source> {
        let Some(c) = collector else {
            let index = spool::scan(&cfg.spool_dir, false).map_err(anyhow::Error::from)?;
            return Ok(Source::Spool {
                dir: cfg.spool_dir.clone(),
                index,
            });
        };
        let mut ship = cfg.ship.clone();
        ship.collector = c.url.clone();
        ship.insecure |= c.insecure;
        if let Some(p) = &c.ca {
            ship.ca = p.clone();
        }
        if let Some(p) = &c.cert {
            ship.cert = p.clone();
        }
        if let Some(p) = &c.key {
            ship.key = p.clone();
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let channel = rt
            .block_on(crate::agent::collector_channel(&ship))
            .with_context(|| format!("connecting to the collector at {}", c.url))?;
        let client = QueryClient::new(channel).max_decoding_message_size(64 << 20);
        Ok(Source::Collector {
            rt,
            client,
            url: c.url.clone(),
        })
    }

    /// Every session, oldest first.
    pub fn list(&mut self) -> Result<Vec<Row>> {
        match self {
            Source::Spool { index, .. } => {
                for p in &index.problems {
                    eprintln!("warning: {p}");
                }
                Ok(index.sessions.values().map(sessions::from_spool).collect())
            }
            Source::Collector { rt, client, .. } => {
                let resp = rt
                    .block_on(client.list_sessions(ListSessionsRequest::default()))?
                    .into_inner();
                let mut rows: Vec<Row> = resp.sessions.iter().map(sessions::from_collector).collect();
                rows.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(rows)
            }
        }
    }

    /// A session by id, or by a unique prefix of it (ids are long).
    pub fn find(&mut self, id: &str) -> Result<Row> {
        if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            bail!("{id:?} is not a session id (see `shelltrail sessions`)");
        }
        if let Source::Collector { rt, client, .. } = self
            && id.len() == 36
        {
            let info = rt
                .block_on(client.get_session(GetSessionRequest {
                    session_id: id.to_string(),
                }))
                .with_context(|| format!("session {id}"))?
                .into_inner();
            return Ok(sessions::from_collector(&info));
        }
        let rows = self.list()?;
        let mut hits = rows.into_iter().filter(|r| r.id.starts_with(id));
        match (hits.next(), hits.next()) {
            (Some(r), None) => Ok(r),
            (None, _) => bail!("no session {id} in {}", self.describe()),
            (Some(_), Some(_)) => bail!("{id} matches several sessions; give more of the id"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Spool { dir, .. } => format!("the spool at {}", dir.display()),
            Source::Collector { url, .. } => format!("the collector at {url}"),
        }
    }

    /// The session's chunks in order.
    pub fn chunks(&mut self, row: &Row) -> Result<Vec<ChunkBytes>> {
        match self {
            Source::Spool { dir, index } => {
                let s = index.sessions.get(&row.id).context("session vanished from the spool")?;
                s.chunks
                    .iter()
                    .map(|c| Ok((c.seq, spool::read_chunk(dir, c.loc)?)))
                    .collect()
            }
            Source::Collector { rt, client, .. } => rt.block_on(async {
                let req = ReadChunksRequest {
                    session_id: row.id.clone(),
                    from_seq: 0,
                    follow: false,
                };
                let mut stream = client.read_chunks(req).await?.into_inner();
                let mut out = Vec::new();
                while let Some(c) = stream.message().await? {
                    out.push((c.seq, c.data));
                }
                Ok(out)
            }),
        }
    }

    /// The session's recording as asciicast v3 text. The header line gains
    /// what only the agent knows (the verified uid, the end), and a missing
    /// chunk becomes a visible marker event instead of a silent hole.
    pub fn cast_reader(&mut self, row: &Row) -> Result<CastReader> {
        let chunks = self.chunks(row)?;
        if row.first_chunk_missing(&chunks) {
            bail!(
                "session {}: its first chunks are no longer in {} (shipped to the collector?): use --collector",
                row.id,
                self.describe()
            );
        }
        Ok(CastReader {
            row: row.clone(),
            chunks: chunks.into_iter(),
            expect_seq: 0,
            buf: Vec::new(),
            pos: 0,
        })
    }
}

/// Streams a session's asciicast text, decompressing chunk by chunk.
pub struct CastReader {
    row: Row,
    chunks: std::vec::IntoIter<ChunkBytes>,
    expect_seq: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl CastReader {
    fn fill(&mut self) -> std::io::Result<bool> {
        let Some((seq, bytes)) = self.chunks.next() else {
            return Ok(false);
        };
        self.buf.clear();
        self.pos = 0;
        if seq != self.expect_seq && seq > 0 {
            let why = if (self.expect_seq..seq).all(|s| self.row.lost_seqs.contains(&s)) {
                "dropped by the recorder while the agent was away"
            } else {
                "missing"
            };
            let line = format!(
                "[0.000, \"m\", \"shelltrail: gap: chunks {}..{} of this session are {why}\"]\n",
                self.expect_seq,
                seq - 1
            );
            self.buf.extend_from_slice(line.as_bytes());
        }
        self.expect_seq = seq + 1;
        let (_, text) = shelltrail_cast::chunk::decompress(&bytes)
            .map_err(|e| std::io::Error::other(format!("chunk {seq} of session {}: {e}", self.row.id)))?;
        if seq == 0 {
            self.buf.extend_from_slice(&patch_header(&text, &self.row));
        } else {
            self.buf.extend_from_slice(&text);
        }
        Ok(true)
    }
}

impl Read for CastReader {
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

/// Adds what the agent verified and how the session ended to the header's
/// `shelltrail` attribute.
fn patch_header(text: &[u8], r: &Row) -> Vec<u8> {
    let nl = text.iter().position(|&b| b == b'\n').unwrap_or(text.len());
    let Ok(mut header) = serde_json::from_slice::<serde_json::Value>(&text[..nl]) else {
        return text.to_vec();
    };
    if let Some(st) = header.get_mut("shelltrail").and_then(|v| v.as_object_mut()) {
        st.insert("verified_uid".into(), r.uid.into());
        st.insert("verified_user".into(), r.user.clone().into());
        st.insert("verified_pid".into(), r.pid.into());
        if let Some(end) = r.end_unix_ms {
            st.insert("end_unix_ms".into(), end.into());
        }
        if let Some(code) = r.exit_status {
            st.insert("exit_status".into(), code.into());
        }
        if let Some(cause) = &r.end_cause {
            st.insert("end_cause".into(), cause.clone().into());
        }
        if !r.lost_seqs.is_empty() {
            st.insert("lost_chunks".into(), r.lost_seqs.clone().into());
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

/// Loads the config for the CLI.
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
