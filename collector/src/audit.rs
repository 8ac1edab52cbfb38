//! The collector's audit log: every read of a recording and every action on
//! a session, allowed or refused, one JSON line each, appended and synced
//! before the call is answered (a read is not served unless it is on record).
//!
//! The file is `audit.log` in the data directory, mode 0600, only ever
//! appended to (`O_APPEND`); `shelltrail audit` reads it through the Query
//! service. Each entry also goes to the collector's log (target
//! `shelltrail::audit`), so a journal or a log shipper has it too.

use serde::{Deserialize, Serialize};
use shelltrail_proto::v1::AuditEntry;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file's name in the data directory.
pub const FILE: &str = "audit.log";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub unix_ms: i64,
    pub who: String,
    pub from: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    pub allowed: bool,
}

impl Entry {
    pub fn to_proto(&self) -> AuditEntry {
        AuditEntry {
            unix_ms: self.unix_ms,
            who: self.who.clone(),
            from: self.from.clone(),
            action: self.action.clone(),
            session_id: self.session_id.clone(),
            host: self.host.clone(),
            detail: self.detail.clone(),
            allowed: self.allowed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

/// The open log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating) `audit.log` in `dir`.
    pub fn open(dir: &Path) -> Result<AuditLog, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| AuditError {
                path: path.clone(),
                source,
            })?;
        // A line torn by a crash is ended, so the next entry starts a line
        // of its own rather than being glued to it and lost.
        let mut file = file;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8];
            let torn = file
                .read_at(&mut last, len - 1)
                .is_ok_and(|n| n == 1 && last[0] != b'\n');
            if torn {
                file.write_all(b"\n").map_err(|source| AuditError {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        Ok(AuditLog {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends `e` and syncs it. Blocking: call from a blocking context.
    pub fn append(&self, e: &Entry) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(e).expect("an audit entry serialises");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(|source| AuditError {
                path: self.path.clone(),
                source,
            })?;
        drop(f);
        tracing::info!(
            target: "shelltrail::audit",
            who = %e.who,
            from = %e.from,
            action = %e.action,
            session = %e.session_id,
            host = %e.host,
            allowed = e.allowed,
            "{}",
            e.detail
        );
        Ok(())
    }

    /// The latest `limit` entries about `session` (all sessions if empty),
    /// oldest first. A line that does not parse (a torn last write) is
    /// skipped.
    pub fn read(&self, session: &str, limit: usize) -> std::io::Result<Vec<Entry>> {
        let f = File::open(&self.path)?;
        let mut out = std::collections::VecDeque::with_capacity(limit.min(4096));
        for line in BufReader::new(f).split(b'\n') {
            let Ok(e) = serde_json::from_slice::<Entry>(&line?) else {
                continue;
            };
            if session.is_empty() || e.session_id == session {
                if out.len() == limit {
                    out.pop_front();
                }
                out.push_back(e);
            }
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str, session: &str) -> Entry {
        Entry {
            unix_ms: 1,
            who: "alice".into(),
            from: "127.0.0.1:1".into(),
            action: action.into(),
            session_id: session.into(),
            host: String::new(),
            detail: String::new(),
            allowed: true,
        }
    }

    #[test]
    fn appends_survive_reopening_and_filter_by_session_latest_last() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append(&entry("list", "")).unwrap();
        log.append(&entry("tail", "a")).unwrap();
        log.append(&entry("kill", "a")).unwrap();
        drop(log);
        // A torn last line (a crash mid-write) is skipped, not fatal.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap()
            .write_all(b"{\"unix_ms\":")
            .unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append(&entry("export", "b")).unwrap();
        let all = log.read("", 10).unwrap();
        assert_eq!(
            all.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["list", "tail", "kill", "export"],
            "the torn line is skipped, the entry after it kept"
        );
        let a = log.read("a", 1).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].action, "kill");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
