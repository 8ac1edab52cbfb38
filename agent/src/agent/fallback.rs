//! Imports the break-glass sessions that recorders wrote to the fallback
//! directory while the agent was away (see `shell::fallback`).
//!
//! A file is imported once its recorder has finished with it (the process
//! is gone), by replaying it to the agent's own connection code over a
//! socket pair, as the recorder that wrote it (the recorder's system user,
//! its pid): the same checks as a live recorder's chunks (chain, size,
//! quotas), the same spool records, the same shipping. A session the agent
//! already holds the start of is resumed from where the agent stands. The
//! file is deleted once the agent has acknowledged the session's end (or,
//! for a file without one, its last chunk); a file the agent refuses is
//! kept aside as `.failed`, and said so loudly.
//!
//! Only files owned by the recorder's user (or root) in a directory the
//! recorded users cannot write are believed: the recorder's own claims
//! about the user are trusted only because that user wrote them.

use crate::agent::Agent;
use crate::agent::conn::Peer;
use crate::shell::fallback::{SUFFIX, parse_name};
use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, RecorderFrame, agent_frame, recorder_frame};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the import waits for the agent's answer to one frame.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Whether a fallback file of `session` is waiting (its recorder may still
/// be writing it): the sweep must not end such a session as vanished.
pub fn pending(agent: &Agent, session: &str) -> bool {
    let Ok(dir) = std::fs::read_dir(agent.cfg.fallback_dir()) else {
        return false;
    };
    dir.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(parse_name)
            .is_some_and(|(id, _)| id == session)
    })
}

/// Imports every finished fallback file.
pub async fn import_all(agent: &Arc<Agent>) {
    let dir = agent.cfg.fallback_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let files: Vec<(PathBuf, String, i32)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let (id, pid) = parse_name(&name)?;
            Some((e.path(), id, pid))
        })
        .collect();
    for (path, id, pid) in files {
        if recorder_running(pid) {
            continue;
        }
        if let Err(why) = trusted(agent, &path) {
            tracing::error!(file = %path.display(), "not importing a fallback file: {why}");
            continue;
        }
        tracing::warn!(session = %id, file = %path.display(), "importing a BREAK-GLASS session recorded while the agent was away");
        match import(agent, &path, &id, pid).await {
            Ok(n) => {
                tracing::warn!(session = %id, chunks = n, "imported the BREAK-GLASS session; its fallback file is deleted");
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::error!(file = %path.display(), "cannot delete the imported fallback file: {e}");
                }
                if let Ok(d) = std::fs::File::open(&dir) {
                    let _ = d.sync_all();
                }
            }
            Err(why) => {
                let aside = path.with_extension(format!("{}.failed", SUFFIX.trim_start_matches('.')));
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(
                    session = %id,
                    file = %aside.display(),
                    "cannot import the BREAK-GLASS session: {why}; the file is kept aside for an administrator"
                );
            }
        }
    }
}

/// Whether process `pid` is a recorder still running (writing its file).
fn recorder_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end().starts_with("shelltrail-she"))
}

/// A regular file owned by the recorder's user (or root), not a link.
fn trusted(agent: &Agent, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !md.file_type().is_file() {
        return Err("not a regular file".into());
    }
    let rec = agent.limits.recorder_uid();
    if md.uid() != 0 && Some(md.uid()) != rec {
        return Err(format!(
            "owned by uid {}, not the recorder's user ({})",
            md.uid(),
            agent.cfg.recorder_user
        ));
    }
    Ok(())
}

/// The frames of a fallback file, in order. A frame torn by a crash ends it.
fn read_frames(path: &Path, max: usize) -> Result<Vec<RecorderFrame>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    loop {
        match framing::split(rest, max) {
            Ok(Some((body, used))) => {
                out.push(framing::decode::<RecorderFrame>(body).map_err(|e| format!("frame {}: {e}", out.len()))?);
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => return Err(format!("frame {}: {e}", out.len())),
        }
    }
    Ok(out)
}

async fn next_frame(s: &mut tokio::net::UnixStream, buf: &mut Vec<u8>) -> Result<AgentFrame, String> {
    loop {
        if let Some(f) = framing::take::<AgentFrame>(buf, 16 << 20).map_err(|e| e.to_string())? {
            return Ok(f);
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(ANSWER_WAIT, s.read(&mut chunk))
            .await
            .map_err(|_| "the agent did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the agent closed the import".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Replays one file; the number of chunks the agent took from it.
async fn import(agent: &Arc<Agent>, path: &Path, id: &str, pid: i32) -> Result<usize, String> {
    let frames = read_frames(path, agent.cfg.agent.max_frame_bytes as usize)?;
    let mut it = frames.into_iter();
    let Some(RecorderFrame {
        body: Some(recorder_frame::Body::Open(mut open)),
    }) = it.next()
    else {
        return Err("it does not start with the session's Open".into());
    };
    if open.meta.as_ref().map(|m| m.session_id.as_str()) != Some(id) {
        return Err("its Open names another session than its file name".into());
    }
    let known = agent.spool.lock().sessions.get(id).map(|s| s.closed());
    match known {
        // Complete already (imported before the file could be deleted).
        Some(true) => return Ok(0),
        Some(false) => open.resume = true,
        None => open.resume = false,
    }
    let uid = agent
        .limits
        .recorder_uid()
        .ok_or_else(|| format!("the recorder's user {:?} does not exist", agent.cfg.recorder_user))?;
    let (mut ours, theirs) = tokio::net::UnixStream::pair().map_err(|e| e.to_string())?;
    tokio::spawn(crate::agent::conn::serve(agent.clone(), theirs, Peer { uid, pid }));
    let mut out = Vec::new();
    let mut inbuf = Vec::new();
    framing::encode(
        &RecorderFrame {
            body: Some(recorder_frame::Body::Open(open)),
        },
        &mut out,
    );
    ours.write_all(&out).await.map_err(|e| e.to_string())?;
    let next_seq = match next_frame(&mut ours, &mut inbuf).await?.body {
        Some(agent_frame::Body::Accepted(a)) => a.next_seq,
        Some(agent_frame::Body::Refused(r)) => return Err(format!("the agent refused it: {}", r.reason)),
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let mut sent = 0usize;
    let mut last = None;
    let mut closed = false;
    for f in it {
        let keep = match &f.body {
            Some(recorder_frame::Body::Chunk(c)) if c.seq >= next_seq => {
                last = Some(c.seq);
                sent += 1;
                true
            }
            Some(recorder_frame::Body::Chunk(_)) => false,
            Some(recorder_frame::Body::Close(_)) => {
                closed = true;
                true
            }
            _ => false,
        };
        if keep {
            out.clear();
            framing::encode(&f, &mut out);
            ours.write_all(&out).await.map_err(|e| e.to_string())?;
        }
    }
    // Until the agent has it all durably.
    loop {
        match next_frame(&mut ours, &mut inbuf).await?.body {
            Some(agent_frame::Body::Ack(a)) if closed && a.closed => break,
            Some(agent_frame::Body::Ack(a)) if !closed && last.is_none_or(|l| a.through_seq >= l) => break,
            Some(agent_frame::Body::Ack(_)) => {}
            Some(agent_frame::Body::Refused(r)) => return Err(format!("the agent refused it: {}", r.reason)),
            Some(agent_frame::Body::Stopped(s)) => return Err(format!("the agent stopped it: {}", s.reason)),
            _ => {}
        }
    }
    Ok(sent)
}
