//! The operator CLI: `sessions`, `export`, `play`, `verify`, `demo`.
//!
//! Recordings come from a [`Source`]: this host's spool, read directly (root
//! or the `shelltrail` group; it works while the agent is down, which is
//! when a responder may need it most), or a collector over mutual TLS
//! (`--collector URL`). Both give the same rows and the same asciicast.

pub mod demo;
pub mod doctor;
pub mod export;
pub mod fleet;
pub mod live;
pub mod play;
pub mod sessions;
pub mod shown;
pub mod sshd;
pub mod verify;

use crate::agent::spool::{self, Index};
use crate::config::Config;
use anyhow::{Context, Result, bail};
use sessions::Row;
use shelltrail_proto::seal::PublicKey;
use shelltrail_proto::v1::{
    GetSessionRequest, ListSessionsRequest, ReadChunksRequest, SessionEnd, SessionStart, query_client::QueryClient,
};
use std::error::Error;
use std::io::Read;
use std::path::PathBuf;

/// The fewest characters of an id that `find` takes: fewer would match by accident.
const MIN_ID_PART: usize = 4;

/// What the user typed for a session, checked and lowercased.
fn id_part(id: &str) -> Result<String> {
    if !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        bail!("{id:?} is not a session id: ids are hexadecimal with dashes (see `shelltrail sessions`)");
    }
    if id.len() < MIN_ID_PART {
        bail!(
            "{id:?} is too short to name a session: give at least {MIN_ID_PART} characters of its id, \
             from anywhere in it"
        );
    }
    Ok(id.to_ascii_lowercase())
}

/// Whether `part` (from [`id_part`]) names the session `id`: any part of it
/// (the caller checks that it names only one).
fn names(id: &str, part: &str) -> bool {
    id.contains(part)
}

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
    /// This host's spool, and the collector it ships to (`[ship] collector`),
    /// where the sessions it has shipped (and deleted) now are.
    Spool {
        dir: PathBuf,
        index: Index,
        ships_to: Option<String>,
        /// This host's public signing key (`signing.pub` beside the key).
        public_key: PathBuf,
        /// The agent's socket: it writes each read to its audit log.
        socket: PathBuf,
        /// What the chunks are read for.
        purpose: &'static str,
    },
    /// A collector's Query service.
    Collector {
        rt: tokio::runtime::Runtime,
        client: QueryClient<tonic::transport::Channel>,
        url: String,
        /// What the chunks are read for, for the collector's audit log.
        purpose: &'static str,
    },
}

/// One chunk of a recording: its sequence number and bytes.
pub type ChunkBytes = (u64, Vec<u8>);

/// What a session's seal is checked against, as a source holds it.
pub struct Evidence {
    /// The start, with what the agent verified.
    pub start: SessionStart,
    /// The end, with its seal; None while the session is live.
    pub end: Option<SessionEnd>,
    /// The host's signing key as this source knows it (the collector's pin,
    /// or this host's `signing.pub`), or why there is none.
    pub key: Result<PublicKey, String>,
    /// Where the key came from, to print beside it.
    pub key_from: String,
}

impl Source {
    /// The collector when `collector` is given (TLS files default to the
    /// config's `[ship]` ones), else the spool named in the config.
    pub fn open(cfg: &Config, collector: Option<&CollectorArgs>) -> Result<Source> {
        let Some(c) = collector else {
            let index = spool::scan(&cfg.spool_dir, false).map_err(anyhow::Error::from)?;
            return Ok(Source::Spool {
                dir: cfg.spool_dir.clone(),
                index,
                ships_to: Some(cfg.ship.collector.clone()).filter(|u| !u.is_empty()),
                public_key: crate::agent::signer::public_key_path(&cfg.signing_key()),
                socket: cfg.socket.clone(),
                purpose: "read",
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
            .map_err(|e| collector_failure(&c.url, e.chain()))?;
        let client = QueryClient::new(channel).max_decoding_message_size(64 << 20);
        Ok(Source::Collector {
            rt,
            client,
            url: c.url.clone(),
            purpose: "read",
        })
    }

    /// Every session, oldest first by the agent's clock (ids are UUIDv7,
    /// whose time is the recorder's claim).
    pub fn list(&mut self) -> Result<Vec<Row>> {
        let mut rows = self.list_unordered()?;
        rows.sort_by(|a, b| (a.start_unix_ms, &a.id).cmp(&(b.start_unix_ms, &b.id)));
        Ok(rows)
    }

    fn list_unordered(&mut self) -> Result<Vec<Row>> {
        match self {
            Source::Spool {
                index, socket, purpose, ..
            } => {
                // `sessions`; a read of one session is noted with its id.
                if *purpose == "read" {
                    note_read(socket, "list", "");
                }
                for p in &index.problems {
                    eprintln!("warning: {}", shown::shown(p));
                }
                Ok(index.sessions.values().map(sessions::from_spool).collect())
            }
            Source::Collector { rt, client, url, .. } => {
                let mut rows: Vec<Row> = list_pages(rt, client, url, ListSessionsRequest::default())?
                    .iter()
                    .map(sessions::from_collector)
                    .collect();
                rows.sort_by(|a, b| a.id.cmp(&b.id));
                rows.dedup_by(|a, b| a.id == b.id);
                Ok(rows)
            }
        }
    }

    /// The collector this host ships to, when reading its spool: sessions
    /// already shipped are no longer here but there.
    pub fn ships_to(&self) -> Option<&str> {
        match self {
            Source::Spool { ships_to, .. } => ships_to.as_deref(),
            Source::Collector { .. } => None,
        }
    }

    /// A session by id, or by a unique part of it at either end: ids are
    /// UUIDv7, whose beginning is the start time, shared by the sessions of
    /// the same minutes, so the random end is often the shorter handle.
    pub fn find(&mut self, id: &str) -> Result<Row> {
        let id = id_part(id)?;
        if let Source::Collector { rt, client, url, .. } = self
            && id.len() == 36
        {
            let info = rt
                .block_on(client.get_session(GetSessionRequest {
                    session_id: id.to_string(),
                }))
                .map_err(|s| status_failure(url, &s))
                .with_context(|| format!("session {id}"))?
                .into_inner();
            return Ok(sessions::from_collector(&info));
        }
        let rows = self.list()?;
        // The beginning first: a prefix that matches is what was meant, even
        // if the same characters end another id.
        let (mut hits, ends): (Vec<Row>, Vec<Row>) = rows
            .into_iter()
            .filter(|r| names(&r.id, &id))
            .partition(|r| r.id.starts_with(&id));
        if hits.is_empty() {
            hits = ends;
        }
        match hits.len() {
            1 => Ok(hits.remove(0)),
            0 => match self.ships_to() {
                Some(url) => bail!(
                    "no session {id} in {}. This host ships to {url}, and a session it has shipped is kept \
                     there only: shelltrail --collector {url} ...",
                    self.describe()
                ),
                None => bail!("no session {id} in {}", self.describe()),
            },
            n => {
                let shown: Vec<&str> = hits.iter().take(5).map(|r| r.id.as_str()).collect();
                bail!(
                    "{id} matches {n} sessions ({}{}); give more of the id",
                    shown.join(", "),
                    if n > shown.len() { ", ..." } else { "" }
                )
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Spool { dir, .. } => format!("the spool at {}", dir.display()),
            Source::Collector { url, .. } => format!("the collector at {url}"),
        }
    }

    /// Whether the session's first chunks may be missing legitimately:
    /// a spool deletes them once shipped; a collector never does.
    pub fn may_lack_first_chunks(&self) -> bool {
        matches!(self, Source::Spool { .. })
    }

    /// The session's start and end records and its host's signing key.
    pub fn evidence(&mut self, row: &Row) -> Result<Evidence> {
        match self {
            Source::Spool { index, public_key, .. } => {
                let s = index.sessions.get(&row.id).context("session vanished from the spool")?;
                let key = crate::agent::signer::read_public_key(public_key).map_err(|e| {
                    format!("{e} (this host's public key, written by the agent at start; or give --host-key)")
                });
                Ok(Evidence {
                    start: s.open.to_start(),
                    end: s.close.as_ref().map(|c| c.to_end()),
                    key,
                    key_from: format!("this host's {}", public_key.display()),
                })
            }
            Source::Collector { rt, client, url, .. } => {
                let info = rt
                    .block_on(client.get_session(GetSessionRequest {
                        session_id: row.id.clone(),
                    }))
                    .map_err(|s| status_failure(url, &s))
                    .with_context(|| format!("session {}", row.id))?
                    .into_inner();
                let key = if info.host_key.is_empty() {
                    Err(format!(
                        "the collector has no signing key pinned for host {}",
                        info.host
                    ))
                } else {
                    PublicKey::from_bytes(&info.host_key).map_err(|e| e.to_string())
                };
                Ok(Evidence {
                    start: info.start.unwrap_or_default(),
                    end: info.end,
                    key,
                    key_from: format!("pinned for host {} at the collector", info.host),
                })
            }
        }
    }

    /// The collector's runtime, client and URL, when reading from one.
    pub fn collector(
        &mut self,
    ) -> Option<(
        &tokio::runtime::Runtime,
        &mut QueryClient<tonic::transport::Channel>,
        &str,
    )> {
        match self {
            Source::Collector { rt, client, url, .. } => Some((rt, client, url.as_str())),
            Source::Spool { .. } => None,
        }
    }

    /// Says what the chunks are read for (export, play, verify): a
    /// collector keeps it in its audit log, the agent in its own (for a
    /// spool). Empty: not noted (a read on behalf of something audited
    /// already, such as `tail --from-start`).
    pub fn read_for(&mut self, what: &'static str) {
        match self {
            Source::Collector { purpose, .. } | Source::Spool { purpose, .. } => *purpose = what,
        }
    }

    /// The session's chunks in order.
    pub fn chunks(&mut self, row: &Row) -> Result<Vec<ChunkBytes>> {
        match self {
            Source::Spool {
                dir,
                index,
                socket,
                purpose,
                ..
            } => {
                if !purpose.is_empty() {
                    note_read(socket, purpose, &row.id);
                }
                let s = index.sessions.get(&row.id).context("session vanished from the spool")?;
                s.chunks
                    .iter()
                    .map(|c| Ok((c.seq, spool::read_chunk(dir, c.loc)?)))
                    .collect()
            }
            Source::Collector {
                rt,
                client,
                url,
                purpose,
            } => rt.block_on(async {
                let req = ReadChunksRequest {
                    session_id: row.id.clone(),
                    from_seq: 0,
                    follow: false,
                    purpose: purpose.to_string(),
                };
                let fail = |s: tonic::Status| status_failure(url, &s);
                let mut stream = client.read_chunks(req).await.map_err(fail)?.into_inner();
                let mut out = Vec::new();
                while let Some(c) = stream.message().await.map_err(fail)? {
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
                "session {}: its first chunks are no longer in {} (shipped to the collector?): read it there with `shelltrail --collector URL ...`",
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

/// Every session a collector lists for `filter`, following its pages (the
/// filter's own page_token is where the first page starts).
pub(crate) fn list_pages(
    rt: &tokio::runtime::Runtime,
    client: &mut QueryClient<tonic::transport::Channel>,
    url: &str,
    filter: ListSessionsRequest,
) -> Result<Vec<shelltrail_proto::v1::SessionInfo>> {
    let mut out = Vec::new();
    let mut req = filter;
    loop {
        let resp = rt
            .block_on(client.list_sessions(req.clone()))
            .map_err(|s| status_failure(url, &s))?
            .into_inner();
        out.extend(resp.sessions);
        if resp.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = resp.next_page_token;
    }
}

/// Tells the agent that this user read recordings from the spool, for its
/// audit log (who, by SO_PEERCRED). Best effort: the files are readable
/// without the agent, so a read goes on, with a warning, if it cannot be
/// noted.
fn note_read(socket: &std::path::Path, action: &str, session: &str) {
    use shelltrail_proto::v1::{Control, Read, control};
    let req = Control {
        request: Some(control::Request::Read(Read {
            action: action.to_string(),
            session: session.to_string(),
        })),
    };
    match crate::shell::link::control(socket, req) {
        Ok(r) if r.ok => {}
        Ok(r) => eprintln!(
            "warning: the agent did not record this read: {}",
            shown::shown(&r.message)
        ),
        Err(e) => eprintln!("warning: the agent did not record this read (is it running?): {e}"),
    }
}

/// A failed call to the collector, as a [`collector_failure`].
pub(crate) fn status_failure(url: &str, status: &tonic::Status) -> anyhow::Error {
    if status.source().is_none() {
        // The collector answered: its own words are the clear ones ("no session ...").
        return anyhow::anyhow!("the collector at {url}: {}", status.message());
    }
    let first: &(dyn Error + 'static) = status;
    collector_failure(url, std::iter::successors(Some(first), |&e| e.source()))
}

/// Explains a failed exchange with the collector in words an operator can
/// act on, from the error and its sources.
///
/// The result is plain text on purpose, not the underlying error chain: a
/// collector that refuses this client's certificate says so only after a
/// TLS 1.3 client considers the handshake done, so the first request fails
/// with the collector's alert or, if the client was still writing, with a
/// broken pipe, and `main` takes a broken pipe in the chain for a closed
/// stdout (`shelltrail export | head`) and exits without a word.
fn collector_failure<'a>(url: &str, chain: impl Iterator<Item = &'a (dyn Error + 'static)>) -> anyhow::Error {
    use std::io::ErrorKind;
    let mut messages: Vec<String> = Vec::new();
    let mut closed = false;
    for e in chain {
        let m = match e.downcast_ref::<tonic::Status>() {
            // Its Display repeats every source in Debug form; they follow anyway.
            Some(status) => status.message().to_string(),
            None => e.to_string(),
        };
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            closed |= matches!(
                io.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            );
            // An io::Error's source() skips the error it wraps (rustls's, here).
            if let Some(inner) = io.get_ref() {
                messages.push(inner.to_string());
            }
        }
        // hyper's words for a connection the peer closed under a request.
        closed |= m == "connection closed";
        if !m.is_empty() && !messages.contains(&m) {
            messages.push(m);
        }
    }
    let alert = messages.iter().filter(|m| m.contains("alert")).min_by_key(|m| m.len());
    let untrusted = messages.iter().find(|m| m.contains("invalid peer certificate"));
    let about_certificate = |m: &str| m.contains("Certificate") || m.contains("CA") || m.contains("AccessDenied");
    if let Some(alert) = alert.filter(|a| about_certificate(a)) {
        anyhow::anyhow!(
            "the collector at {url} refused this client's TLS certificate ({alert}): use a certificate \
             and key (--cert, --key) issued by the collector's client CA"
        )
    } else if let Some(alert) = alert {
        anyhow::anyhow!("the collector at {url} refused the TLS connection ({alert})")
    } else if let Some(bad) = untrusted {
        anyhow::anyhow!("the collector at {url} presented a certificate that the CA in --ca does not vouch for ({bad})")
    } else if closed {
        anyhow::anyhow!(
            "the collector at {url} closed the connection ({}); it does so at once when it does not accept \
             this client's TLS certificate: use a certificate and key (--cert, --key) issued by the \
             collector's client CA",
            messages.last().map_or("", String::as_str)
        )
    } else {
        anyhow::anyhow!("cannot talk to the collector at {url}: {}", messages.join(": "))
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
        // A recorder's chunk, or a run of them as the collector keeps ended sessions.
        let stored = shelltrail_cast::run::unpack(&bytes)
            .map_err(|e| std::io::Error::other(format!("chunk {seq} of session {}: {e}", self.row.id)))?;
        for part in &stored.parts {
            let seq = part.header.seq;
            if seq < self.expect_seq {
                continue;
            }
            if seq != self.expect_seq {
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
            let text = stored.content(part);
            if seq == 0 {
                self.buf.extend_from_slice(&patch_header(text, &self.row));
            } else {
                self.buf.extend_from_slice(text);
            }
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
    // Written with the recorder's claims as `\u` escapes: the header is
    // the line most likely to be read on a terminal.
    let mut out = match serde_json::to_string(&header) {
        Ok(json) => shown::json_for_terminal(&json).into_owned().into_bytes(),
        Err(_) => text[..nl].to_vec(),
    };
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
/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    crate::agent::server::now_ms()
}

pub fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    Config::load(path).context("loading the configuration")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_session_is_named_by_any_part_of_its_id() {
        let id = "019ac2f1-5b3e-7c41-9a2d-3e5f60718293";
        assert!(super::names(id, &super::id_part("019a").unwrap()));
        assert!(super::names(id, &super::id_part("18293").unwrap()));
        assert!(super::names(id, &super::id_part("60718293").unwrap()));
        assert!(
            super::names(id, &super::id_part("3E5F60718293").unwrap()),
            "case does not matter"
        );
        assert!(
            super::names(id, &super::id_part("5b3e").unwrap()),
            "from the middle too"
        );
        assert!(!super::names(id, &super::id_part("ffff").unwrap()));
        let short = super::id_part("019").unwrap_err().to_string();
        assert!(short.contains("too short") && short.contains("at least 4"), "{short}");
        let bad = super::id_part("../etc").unwrap_err().to_string();
        assert!(bad.contains("not a session id"), "{bad}");
    }

    #[test]
    fn a_refused_certificate_is_explained_not_taken_for_a_closed_stdout() {
        use std::error::Error;
        use std::io::{Error as IoError, ErrorKind};
        let url = "https://collector:7443";
        // The collector closed the connection while the request was being written.
        let pipe = IoError::new(ErrorKind::BrokenPipe, "stream closed because of a broken pipe");
        let e = super::collector_failure(url, std::iter::once(&pipe as &(dyn Error + 'static)));
        assert!(e.chain().all(|c| c.downcast_ref::<IoError>().is_none()), "{e:?}");
        assert!(e.to_string().contains("--cert"), "{e}");
        // The collector's alert arrived first.
        let alert = IoError::new(ErrorKind::InvalidData, "received fatal alert: UnknownCA");
        let e = super::collector_failure(url, std::iter::once(&alert as &(dyn Error + 'static)));
        assert!(
            e.to_string()
                .contains("refused this client's TLS certificate (received fatal alert: UnknownCA)"),
            "{e}"
        );
        // Other failures keep their own words.
        let refused = IoError::new(ErrorKind::ConnectionRefused, "Connection refused");
        let e = super::collector_failure(url, std::iter::once(&refused as &(dyn Error + 'static)));
        assert_eq!(
            e.to_string(),
            "cannot talk to the collector at https://collector:7443: Connection refused"
        );
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_698_000_000), "2026-11-26 13:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
