//! What a local user can throw at the agent's socket (every user can
//! connect to it): a flood of connections, frames held half-sent, chunks
//! that are not what they claim; and a spool damaged by an agent that took
//! such a chunk. The agent stays up, its memory bounded, and other users'
//! sessions are accepted and recorded meanwhile.

use shelltrail::agent::spool;
use shelltrail_cast::chunk::Chunker;
use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, Chunk, Open, RecorderFrame, SessionMeta, agent_frame, recorder_frame};
use shelltrail_tests::proc::{run, run_ok};
use shelltrail_tests::{Running, TIMEOUT, TestUser, World, poll_until};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The flood helper, copied where the test user can run it.
fn flood_bin(w: &World) -> PathBuf {
    let to = w.path.join("bin/shelltrail-e2e-flood");
    if !to.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_shelltrail-e2e-flood"), &to).expect("copying the flood helper");
        shelltrail_tests::world::set_mode(&to, 0o755);
    }
    to
}

/// Runs the flood helper as `user` (see its documentation for `args`).
fn flood(w: &World, user: &TestUser, args: &[&str]) -> Running {
    let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(user.uid))
        .expect("passwd")
        .expect("the flood user")
        .gid;
    let mut c = Command::new(flood_bin(w));
    c.arg(&w.socket).args(args).uid(user.uid).gid(gid.as_raw());
    Running::spawn(c, None)
}

/// A `key=value` count from the flood helper's last line.
fn count(out: &str, key: &str) -> u64 {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[track_caller]
fn wait_log(w: &World, text: &str, timeout: Duration) {
    let found = poll_until(timeout, || w.agent_log_text().contains(text).then_some(()));
    assert!(
        found.is_some(),
        "the agent logged nothing about {text:?}:\n{}",
        w.agent_log_text()
    );
}

/// A session of root's, recorded start to end while the test goes on.
#[track_caller]
fn recorded(w: &World, word: &str) {
    let out = run(w.local_recorder(&format!("echo {word}")), TIMEOUT);
    out.assert_success();
    assert_eq!(out.stdout_str(), format!("{word}\n"));
    let all = w.sessions();
    let s = all
        .iter()
        .find(|r| r.command == format!("echo {word}"))
        .unwrap_or_else(|| panic!("no session for {word}: {all:#?}"));
    assert!(!s.live && s.exit_status == Some(0), "{s:#?}");
    assert_eq!(w.export(&s.id).output(), format!("{word}\n"));
}

/// Thousands of connections from one unprivileged user: the agent closes
/// those past the user's cap as it accepts them, so its descriptors stay
/// few; another user's session is recorded during the flood. Then the
/// agent runs out of descriptors (its limit lowered under it) while the
/// flood goes on: accept fails, which is logged and retried, not fatal.
#[test]
fn a_connection_flood_does_not_take_the_agent_down() {
    let user = TestUser::dedicated("shelltrail-e2e-flood");
    let w = World::builder().no_sshd().build();
    let pid = w.agent_pid();
    let base_fds = open_fds(pid);

    let f = flood(&w, &user, &["connect", "3000", "6"]);
    f.wait_stdout_contains("holding", Duration::from_secs(30));
    let fds = open_fds(pid);
    recorded(&w, "during-the-flood");
    let out = f.wait(TIMEOUT);
    out.assert_success();
    let summary = out.stdout_str();
    eprintln!("flood: {summary} agent descriptors: {base_fds} before, {fds} during");
    assert!(
        fds <= base_fds + 64 + 16,
        "the agent holds {fds} descriptors ({base_fds} before the flood): {summary}"
    );
    // Past the cap as they were accepted, the rest for sending no Open.
    assert_eq!(
        count(&summary, "closed_by_agent"),
        count(&summary, "connected"),
        "{summary}"
    );
    wait_log(&w, "max_connections_per_uid", Duration::from_secs(10));

    // Out of descriptors: only a few more than it has now.
    let limit = open_fds(pid) + 8;
    let mut c = Command::new("prlimit");
    c.arg(format!("--pid={pid}")).arg(format!("--nofile={limit}:{limit}"));
    run_ok(c, TIMEOUT);
    let f = flood(&w, &user, &["connect", "200", "4"]);
    wait_log(&w, "cannot accept recorder connections", Duration::from_secs(20));
    f.wait(TIMEOUT).assert_success();
    assert!(w.agent_running(), "the agent exited:\n{}", w.agent_log_text());
    // The flood's connections are closed by now (no Open in 2 s): room again.
    recorded(&w, "after-the-flood");
    assert!(w.agent_running());
}

/// 300 sessions of one user each hold a frame of almost 4 MiB unfinished
/// (the attack that took an agent from 8 MB to 871 MB): the agent reads a
/// frame only when its bytes fit the user's share of the memory budget, so
/// it stays small, and another user's session is recorded meanwhile.
#[test]
fn frames_held_half_sent_do_not_grow_the_agent() {
    let user = TestUser::dedicated("shelltrail-e2e-flood2");
    let w = World::builder()
        .no_sshd()
        .agent_setting("max_connections_per_uid = 400")
        .agent_setting("max_sessions_per_uid = 400")
        .build();
    let pid = w.agent_pid();
    let before = rss_kib(pid);

    let frame = (4 << 20) - 64;
    let f = flood(&w, &user, &["partial", "300", "8", &frame.to_string()]);
    f.wait_stdout_contains("holding", Duration::from_secs(60));
    let mut peak = rss_kib(pid);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(rss_kib(pid));
    }
    recorded(&w, "while-frames-are-held");
    let out = f.wait(TIMEOUT);
    out.assert_success();
    peak = peak.max(rss_kib(pid));
    let summary = out.stdout_str();
    eprintln!(
        "partial frames: {summary} agent VmRSS: {} MiB before, {} MiB at most while held",
        before >> 10,
        peak >> 10
    );
    assert_eq!(count(&summary, "accepted"), 300, "{summary}");
    // The user's share of the 64 MiB budget is 16 MiB.
    assert!(
        peak < before + (48 << 10),
        "the agent grew from {before} KiB to {peak} KiB: {summary}"
    );
    assert!(
        count(&summary, "body_bytes") < 300 * (frame as u64) / 4,
        "the agent read most of the frames: {summary}"
    );
    assert!(w.agent_running());
}

fn frame(body: recorder_frame::Body) -> Vec<u8> {
    let mut buf = Vec::new();
    framing::encode(&RecorderFrame { body: Some(body) }, &mut buf);
    buf
}

/// Opens a session as root and sends `chunk`; returns what the agent said
/// until it closed the connection.
fn open_and_send(w: &World, id: &str, chunk: Chunk) -> Vec<AgentFrame> {
    let mut s = UnixStream::connect(&w.socket).expect("connecting to the agent");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = frame(recorder_frame::Body::Open(Open {
        meta: Some(SessionMeta {
            session_id: id.to_string(),
            mode: "exec".into(),
            ..Default::default()
        }),
        resume: false,
    }));
    bytes.extend(frame(recorder_frame::Body::Chunk(chunk)));
    let _ = s.write_all(&bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the agent did not close the connection: {e}"),
        }
    }
    let mut frames = Vec::new();
    while let Some(f) = framing::take::<AgentFrame>(&mut got, 1 << 20).expect("agent frames") {
        frames.push(f);
    }
    frames
}

/// A chunk with a real header whose body is not a zstd frame (an agent
/// used to ack and spool it, and then could not start again), and a chunk
/// whose claimed link hash is not its content's: each refused with the
/// reason, never acknowledged, never in the spool.
#[test]
fn chunks_that_are_not_what_they_claim_are_refused() {
    let w = World::builder().no_sshd().build();

    let id = uuid::Uuid::now_v7().to_string();
    let mut c = Chunker::new(&id, 1);
    c.buffer().extend_from_slice(b"[0.1, \"o\", \"hello\"]\n");
    let good = c.cut(0, 100).expect("a chunk");
    let mut poisoned = good.bytes[..72].to_vec();
    poisoned.extend_from_slice(b"not a zstd frame at all");
    let frames = open_and_send(
        &w,
        &id,
        Chunk {
            seq: 0,
            data: poisoned,
            hash: good.hash.to_vec(),
        },
    );
    let refusal = |frames: &[AgentFrame]| {
        assert!(
            !frames.iter().any(|f| matches!(f.body, Some(agent_frame::Body::Ack(_)))),
            "acknowledged: {frames:?}"
        );
        frames
            .iter()
            .find_map(|f| match &f.body {
                Some(agent_frame::Body::Refused(r)) => Some(r.reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("not refused: {frames:?}"))
    };
    let why = refusal(&frames);
    assert!(why.contains("malformed chunk 0") && why.contains("zstd"), "{why}");

    let id2 = uuid::Uuid::now_v7().to_string();
    let mut c = Chunker::new(&id2, 1);
    c.buffer().extend_from_slice(b"[0.1, \"o\", \"hello\"]\n");
    let good = c.cut(0, 100).expect("a chunk");
    let frames = open_and_send(
        &w,
        &id2,
        Chunk {
            seq: 0,
            data: good.bytes.clone(),
            hash: vec![7; 32],
        },
    );
    let why = refusal(&frames);
    assert!(why.contains("link hash"), "{why}");

    for id in [&id, &id2] {
        assert_eq!(w.session(id).chunks, 0, "{:#?}", w.session(id));
    }
    // Nothing poisoned is left for the next start.
    w.restart_agent();
    recorded(&w, "after-the-poison");
}

/// A spool holding a chunk that does not decode as its session's last one
/// (what an agent that did not check chunks took from a hostile recorder):
/// the agent starts anyway, quarantines that session (listed as damaged,
/// persistently), and the other sessions and new ones are fine.
#[test]
fn a_session_damaged_in_the_spool_is_quarantined_at_start() {
    let w = World::builder().no_sshd().build();
    recorded(&w, "intact");
    recorded(&w, "victim");
    let victim = w
        .sessions()
        .into_iter()
        .find(|r| r.command == "echo victim")
        .expect("the victim session");
    w.kill_agent();

    // Appended as the old agent would have: a well-formed record (its
    // checksum is right) holding a chunk whose body is not zstd.
    let next = victim.chunks as u64;
    let mut c = Chunker::new(&victim.id, 1);
    c.buffer().extend_from_slice(b"x\n");
    let mut poisoned = c.cut(0, 1).expect("a chunk").bytes[..72].to_vec();
    poisoned[12..20].copy_from_slice(&next.to_le_bytes());
    poisoned.extend_from_slice(b"not a zstd frame");
    let last = spool::segments(&w.spool).unwrap().last().copied().unwrap_or(0);
    let mut writer =
        spool::Writer::create(&w.spool, last, 64 << 20, Default::default()).expect("a segment for the poison");
    let uuid = uuid::Uuid::parse_str(&victim.id).unwrap();
    writer
        .write_now(vec![spool::chunk_body(&uuid, next, &[0; 32], &poisoned)])
        .expect("writing the poisoned chunk");
    drop(writer);

    w.start_agent();
    wait_log(&w, "damaged in the spool", Duration::from_secs(10));
    let v = w.session(&victim.id);
    assert!(
        v.damaged.contains(&format!("last spooled chunk {next} is unreadable")),
        "{v:#?}"
    );
    let listing = run_ok(w.cli(&["sessions"]), TIMEOUT).stdout_str();
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&victim.id) && l.contains("damaged")),
        "{listing}"
    );
    let intact = w
        .sessions()
        .into_iter()
        .find(|r| r.command == "echo intact")
        .expect("the intact session");
    assert!(intact.damaged.is_empty(), "{intact:#?}");
    assert_eq!(w.export(&intact.id).output(), "intact\n");
    recorded(&w, "after-restart");

    // The quarantine is recorded: a second start finds it without looking again.
    w.restart_agent();
    assert!(!w.session(&victim.id).damaged.is_empty());
    let log = w.agent_log_text();
    assert_eq!(log.matches("session damaged in the spool").count(), 1, "{log}");
    assert!(log.contains("damaged=1"), "{log}");
    recorded(&w, "after-second-restart");
}
