//! Where a break-glass session goes while the agent cannot be reached.
//!
//! A member of the break-glass group must get in when the agent is down
//! (that is the point of break-glass), and the session must still be
//! recorded, never silently not. So the recorder writes what the agent
//! cannot take now to a file in `fallback_dir`: the same frames it would
//! have sent the agent (Open, then Chunks in order, then Close), each
//! flushed to disk as it is written. The agent imports the file when it is
//! back ([`crate::agent::fallback`]) by replaying it through its ordinary
//! connection code, with every check a live recorder gets, and deletes it.
//!
//! Once a session has spilled to the file it stays there to its end: the
//! file and the agent never both hold the later chunks, and the import
//! resumes the session from where the agent stood.
//!
//! The directory belongs to the recorder's system user (group: the
//! agent's, mode 0770), so the recorded user can neither read, write nor
//! delete it; files are created exclusively, mode 0640, never followed
//! through a link.

use shelltrail_proto::framing;
use shelltrail_proto::v1::{Close, Open, RecorderFrame, SessionMeta, recorder_frame};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The suffix of a fallback file: `SESSION.PID.frames`.
pub const SUFFIX: &str = ".frames";

/// The name of the file for `session` recorded by process `pid`.
pub fn file_name(session: &str, pid: u32) -> String {
    format!("{session}.{pid}{SUFFIX}")
}

/// The session id and recorder pid a fallback file's name gives.
pub fn parse_name(name: &str) -> Option<(String, i32)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (session, pid) = stem.rsplit_once('.')?;
    let pid = pid.parse().ok().filter(|&p: &i32| p > 0)?;
    uuid::Uuid::parse_str(session).ok().map(|u| (u.to_string(), pid))
}

/// An open fallback file.
pub struct Fallback {
    path: PathBuf,
    file: File,
}

impl Fallback {
    /// Creates the file for `meta`'s session in `dir` and writes its Open
    /// (`resume`: the agent already holds the session's first chunks).
    pub fn create(dir: &Path, meta: &SessionMeta, resume: bool) -> std::io::Result<Fallback> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(file_name(&meta.session_id, std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)?;
        let mut f = Fallback { path, file };
        f.write(&RecorderFrame {
            body: Some(recorder_frame::Body::Open(Open {
                meta: Some(meta.clone()),
                resume,
            })),
        })?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one chunk, durably.
    pub fn chunk(&mut self, c: &shelltrail_cast::Chunk) -> std::io::Result<()> {
        self.write(&RecorderFrame {
            body: Some(recorder_frame::Body::Chunk(shelltrail_proto::v1::Chunk {
                seq: c.seq,
                data: c.bytes.clone(),
                hash: c.hash.to_vec(),
            })),
        })
    }

    /// Appends the session's end, durably: the file is complete.
    pub fn close(&mut self, c: &Close) -> std::io::Result<()> {
        self.write(&RecorderFrame {
            body: Some(recorder_frame::Body::Close(c.clone())),
        })
    }

    fn write(&mut self, frame: &RecorderFrame) -> std::io::Result<()> {
        let mut buf = Vec::new();
        framing::encode(frame, &mut buf);
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_round_trip_and_hostile_ones_are_refused() {
        let id = uuid::Uuid::now_v7().to_string();
        assert_eq!(super::parse_name(&super::file_name(&id, 42)), Some((id.clone(), 42)));
        for bad in [
            format!("{id}.0.frames"),
            format!("{id}.-1.frames"),
            format!("../{id}.4.frames"),
            format!("{id}.4.frames.tmp"),
            "x.4.frames".to_string(),
        ] {
            assert_eq!(super::parse_name(&bad), None, "{bad}");
        }
    }
}
