//! Tamper evidence: every session is sealed by its host's key when it ends,
//! and `verify` holds what it reads (spool or collector) against that seal.
//!
//! The attacks are the ones the hash chain alone let through: whoever can
//! write the collector's store (or the host's spool) rewrites chunks and
//! recomputes the whole chain, index and CRCs with shelltrail's own code, or
//! cuts the last chunks off and edits the end to match, or strips the seal.
//! Each leaves a chain that links from the seed to its last chunk; `verify`
//! must still say NOT OK, because of the seal. Also: a session sealed with a
//! key other than the one the collector pinned for the host is flagged and
//! fails, as does one checked with another host's key, one whose recorder's
//! end disagrees with what the agent received, and a live one; a session
//! whose recorder was killed is sealed by the agent's sweep and passes.
//!
//! Sessions run through `shelltrail-shell -c` without sshd, as in
//! [`shipping`](crate::shipping); the collector speaks gRPC over mutual TLS.

use shelltrail::agent::spool;
use shelltrail_cast::chunk::{ChunkHeader, Chunker};
use shelltrail_cast::run as runs;
use shelltrail_collector::{Store, StoreOptions};
use shelltrail_proto::framing;
use shelltrail_proto::seal::{Facts, SigningKey};
use shelltrail_proto::v1::{
    AgentFrame, Chunk, Close, Open, RecorderFrame, SessionEnd, SessionMeta, SessionStart, agent_frame, recorder_frame,
};
use shelltrail_tests::proc::{Output, run};
use shelltrail_tests::{Host, SHIP_TIMEOUT, Script, ShipWorld, TIMEOUT};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A session of about ten chunks (cut every 20 ms while it prints).
fn script(tag: &str) -> Script {
    Script::new(tag, 200).paced(20, 50)
}

fn host(w: &ShipWorld, name: &str) -> Host {
    w.host(name).shell("chunk_interval_ms = 20").build()
}

/// Whether verify's verdict (its last line) is OK.
fn verdict_ok(out: &Output) -> bool {
    out.stdout_str().lines().last().is_some_and(|l| l.starts_with("OK: "))
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success() && verdict_ok(out) && !out.stdout_str().contains("FAIL"),
        "{what}: verify should pass; {out}"
    );
}

#[track_caller]
fn assert_not_ok(out: &Output, what: &str, needle: &str) {
    assert!(
        !out.status.success() && !verdict_ok(out) && out.stdout_str().contains(needle),
        "{what}: verify should fail naming {needle:?}; {out}"
    );
}

/// The chain itself holds: no FAIL line about chunks, only about the seal.
#[track_caller]
fn assert_chain_intact(out: &Output, what: &str) {
    let about_the_seal = ["FAIL: seal:", "FAIL: unsigned:", "FAIL: the collector flagged"];
    for line in out.stdout_str().lines().filter(|l| l.starts_with("FAIL:")) {
        assert!(
            about_the_seal.iter().any(|p| line.starts_with(p)),
            "{what}: the forged chain should link from seed to end, the seal alone catching it: {out}"
        );
    }
}

fn public_key(h: &Host) -> String {
    std::fs::read_to_string(h.dir.join("signing.pub"))
        .expect("the agent writes signing.pub beside its key")
        .trim()
        .to_string()
}

// ----- the collector's store, as an intruder with write access edits it -----

fn session_dir(w: &ShipWorld, host: &str, id: &str) -> PathBuf {
    w.collector.data_dir.join("sessions").join(host).join(id)
}

/// A stored session: its start and end records, and each chunk's header
/// and content (unpacked from the runs or chunks it is kept as).
struct Stored {
    start: SessionStart,
    end: SessionEnd,
    parts: Vec<(ChunkHeader, Vec<u8>)>,
}

fn record_field<T: serde::de::DeserializeOwned>(path: &Path, field: &str) -> T {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .expect("a JSON record");
    serde_json::from_value(v[field].clone()).expect("the record's field")
}

fn stored(dir: &Path) -> Stored {
    let data = ["runs.zst", "chunks.zst"]
        .iter()
        .find_map(|f| std::fs::read(dir.join(f)).ok())
        .expect("the session's data");
    let mut parts = Vec::new();
    for bytes in shelltrail_cast::chunk::split(&data).expect("stored chunks") {
        let u = runs::unpack(bytes).expect("a stored run or chunk");
        for p in &u.parts {
            parts.push((p.header.clone(), u.content(p).to_vec()));
        }
    }
    Stored {
        start: record_field(&dir.join("start.json"), "start"),
        end: record_field(&dir.join("end.json"), "end"),
        parts,
    }
}

/// The session's chunks cut again from `parts` (chunk `i`'s content edited
/// by `edit(i, ..)`) into a new chain from the session's seed: every link,
/// hash and length consistent, as a careful intruder makes them.
fn recut(id: &str, parts: &[(ChunkHeader, Vec<u8>)], edit: impl Fn(usize, &mut Vec<u8>)) -> Vec<(u64, Vec<u8>)> {
    let mut c = Chunker::new(id, 3);
    parts
        .iter()
        .enumerate()
        .map(|(i, (h, raw))| {
            let mut raw = raw.clone();
            edit(i, &mut raw);
            c.buffer().extend_from_slice(&raw);
            let chunk = c.cut(h.start_ms, h.end_ms).expect("content to cut");
            (chunk.seq, chunk.bytes)
        })
        .collect()
}

/// Replaces a session in the store (the collector stopped) by one written
/// through the store's own code: index, CRCs and chain all consistent. The
/// store flags what does not match its seal; the intruder removes the flag.
fn replace(w: &ShipWorld, host: &str, start: &SessionStart, chunks: Vec<(u64, Vec<u8>)>, end: &SessionEnd) {
    let id = &end.session_id;
    std::fs::remove_dir_all(session_dir(w, host, id)).expect("removing the stored session");
    // The previous replace's store released its lock when dropped, but a
    // process this test binary forked meanwhile (tests run in parallel) may
    // hold a copy of the lock's descriptor until it execs: retry briefly.
    let open = || {
        Store::open_with(
            &w.collector.data_dir,
            StoreOptions {
                compact: false,
                ..StoreOptions::default()
            },
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let store = loop {
        match open() {
            Err(shelltrail_collector::store::StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.expect("opening the collector's store"),
        }
    };
    store.start(host, start).expect("start");
    store.append(host, id, chunks).expect("append");
    assert!(
        store.end(host, end).expect("end").ended,
        "the forged session is complete"
    );
    drop(store);
    let _ = std::fs::remove_file(session_dir(w, host, id).join("flagged"));
}

/// A session that ran and reached the collector whole, with its verify OK.
fn shipped(w: &ShipWorld, h: &Host, tag: &str) -> String {
    let s = script(tag);
    let id = h.run(&s);
    let row = w.assert_shipped(h, &id, &s.expected(), SHIP_TIMEOUT);
    assert!(row.chunks >= 4, "a session of several chunks: {row:#?}");
    id
}

/// A good session verifies at the collector and on the spool, sealed by its
/// host's key, which `verify` prints (the key is exported that way and in
/// `signing.pub`); checked with another host's key it fails. The key is
/// private to the agent's user.
#[test]
fn a_sealed_session_verifies_with_its_hosts_key_only() {
    let w = ShipWorld::new(0x5ea1);
    let a = host(&w, "host-a");
    let b = host(&w, "host-b");
    let id = shipped(&w, &a, "sealed");

    let at_collector = w.remote_verify(&id);
    assert_ok(&at_collector, "at the collector");
    let text = at_collector.stdout_str();
    assert!(
        text.contains("sealed by") && text.contains(&public_key(&a)) && text.contains("pinned for host host-a"),
        "verify names the host's key: {at_collector}"
    );
    let on_spool = run(a.cli(&["verify", &id]), TIMEOUT);
    assert_ok(&on_spool, "on host-a's spool");
    assert!(on_spool.stdout_str().contains(&public_key(&a)), "{on_spool}");
    // The exported key, given explicitly, checks the same.
    let explicit = run(w.remote(&["verify", &id, "--host-key", &public_key(&a)]), TIMEOUT);
    assert_ok(&explicit, "with --host-key");

    let wrong = run(w.remote(&["verify", &id, "--host-key", &public_key(&b)]), TIMEOUT);
    assert_not_ok(&wrong, "with host-b's key", "does not verify with");
    let from_file = b.dir.join("signing.pub");
    let wrong = run(
        w.remote(&["verify", &id, "--host-key", &from_file.display().to_string()]),
        TIMEOUT,
    );
    assert_not_ok(&wrong, "with host-b's key file", "does not verify with");

    use std::os::unix::fs::MetadataExt;
    let key = std::fs::metadata(a.dir.join("signing.key")).expect("the signing key");
    assert_eq!(key.mode() & 0o777, 0o400, "the signing key is private to the agent");

    // Nothing is sealed before the end: a live session is not verified.
    let long = Script::new("live", 100).paced(1, 100);
    let session = a.spawn(&long);
    let live = shelltrail_tests::wait_until("the live session", Duration::from_secs(20), || {
        a.sessions().into_iter().find(|r| long.is(r) && r.live).map(|r| r.id)
    });
    let v = run(a.cli(&["verify", &live]), TIMEOUT);
    assert!(
        !v.status.success() && v.stdout_str().contains("NOT VERIFIED") && v.stdout_str().contains("(live)"),
        "{v}"
    );
    a.finish(session, &long);
    assert_ok(&run(a.cli(&["verify", &live]), TIMEOUT), "the same session once ended");
}

/// Sessions edited in the collector's store while it is stopped, each into
/// a chain that links from seed to end: one chunk rewritten and every hash
/// after it recomputed; the last chunks cut off and the end edited to say
/// so; the seal stripped. Each fails verify, because of the seal; the
/// untouched session beside them still passes. And an intruder who also
/// replaces the host's pinned key with his own and seals his rewrite with
/// it passes verify at the collector (which prints his key), but not with
/// the host's key recorded elsewhere (`--host-key`).
#[test]
fn rewritten_cut_short_and_unsigned_sessions_fail_verify() {
    let w = ShipWorld::new(0x5ea2);
    let h = host(&w, "host-a");
    let rewritten = shipped(&w, &h, "rewritten");
    let cut = shipped(&w, &h, "cut");
    let unsigned = shipped(&w, &h, "unsigned");
    let untouched = shipped(&w, &h, "untouched");
    let resealed = shipped(&w, &h, "resealed");
    w.collector.kill();

    // Rewritten: "rewritten" becomes "REWRITTEN" in chunk 2's output, and
    // the chain is cut again from the seed.
    let s = stored(&session_dir(&w, "host-a", &rewritten));
    let chunks = recut(&rewritten, &s.parts, |i, raw| {
        if i == 2 {
            let text = String::from_utf8(raw.clone()).expect("asciicast text");
            assert!(text.contains("rewritten "), "chunk 2 holds output: {text}");
            *raw = text.replace("rewritten ", "REWRITTEN ").into_bytes();
        }
    });
    replace(&w, "host-a", &s.start, chunks, &s.end);

    // Cut short: the last two chunks gone, the end's last chunk edited to match.
    let s = stored(&session_dir(&w, "host-a", &cut));
    let keep = s.parts.len() - 2;
    let chunks = recut(&cut, &s.parts[..keep], |_, _| {});
    let mut end = s.end.clone();
    end.close.as_mut().expect("the close").last_seq = keep as u64 - 1;
    replace(&w, "host-a", &s.start, chunks, &end);

    // Unsigned: the same chunks, the seal removed from the end.
    let s = stored(&session_dir(&w, "host-a", &unsigned));
    let chunks = recut(&unsigned, &s.parts, |_, _| {});
    let mut end = s.end.clone();
    end.seal = None;
    replace(&w, "host-a", &s.start, chunks, &end);

    // Rewritten and sealed again with the intruder's key, pinned in place
    // of the host's.
    let s = stored(&session_dir(&w, "host-a", &resealed));
    let chunks = recut(&resealed, &s.parts, |i, raw| {
        if i == 1 {
            let text = String::from_utf8(raw.clone()).expect("asciicast text");
            *raw = text.replace("resealed ", "RESEALED ").into_bytes();
        }
    });
    let last = chunks
        .last()
        .map(|(_, b)| shelltrail_cast::chunk::hash(b).unwrap())
        .unwrap();
    let (intruder, _) = SigningKey::generate().unwrap();
    let mut end = s.end.clone();
    let old = end.seal.take().expect("sealed");
    let facts = Facts::of(&s.start, &end, chunks.len() as u64, last);
    end.seal = Some(intruder.seal(&facts, &old.host, old.close_check(), &old.close_problem));
    std::fs::write(
        w.collector.data_dir.join("host-keys").join("host-a"),
        format!("{}\n", intruder.public_key()),
    )
    .expect("replacing the pin");
    replace(&w, "host-a", &s.start, chunks, &end);

    w.collector.start();
    let v = w.remote_verify(&resealed);
    assert_ok(&v, "resealed, checked with the replaced pin");
    assert!(v.stdout_str().contains(&intruder.public_key().to_string()), "{v}");
    let v = run(w.remote(&["verify", &resealed, "--host-key", &public_key(&h)]), TIMEOUT);
    assert_not_ok(&v, "resealed, checked with the host's own key", "does not verify with");
    // The host's own key from here on.
    let host_key = public_key(&h);
    let verify = |id: &str| run(w.remote(&["verify", id, "--host-key", &host_key]), TIMEOUT);

    let v = verify(&rewritten);
    assert_chain_intact(&v, "rewritten");
    assert_not_ok(&v, "rewritten", "the chunks are not the ones sealed");
    let export = run(w.remote(&["export", &rewritten]), TIMEOUT);
    assert!(
        String::from_utf8_lossy(&export.stdout).contains("REWRITTEN "),
        "the forged content is what the collector now serves: {export}"
    );

    let v = verify(&cut);
    assert_chain_intact(&v, "cut short");
    assert_not_ok(&v, "cut short", "FAIL: seal:");

    let v = verify(&unsigned);
    assert_chain_intact(&v, "unsigned");
    assert_not_ok(&v, "unsigned", "unsigned");

    assert_ok(&verify(&untouched), "the untouched session");
}

/// A host whose key changes (here: another host's key put in its place)
/// gets its new sessions flagged at the collector, which keeps the first
/// key pinned; verify fails for them. Once an operator removes the pin, the
/// host's next connection pins the new key and its later sessions verify;
/// the flagged one stays flagged. A session the collector quarantined fails
/// verify too.
#[test]
fn sessions_sealed_with_another_key_are_flagged_until_the_operator_acts() {
    let w = ShipWorld::new(0x5ea3);
    let a = host(&w, "host-a");
    let b = host(&w, "host-b");
    let before = shipped(&w, &a, "before");
    let key_a = public_key(&a);

    a.kill_agent();
    for f in ["signing.key", "signing.pub"] {
        std::fs::remove_file(a.dir.join(f)).expect("removing host-a's key");
    }
    std::fs::copy(b.dir.join("signing.key"), a.dir.join("signing.key")).expect("copying host-b's key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(a.dir.join("signing.key"), std::fs::Permissions::from_mode(0o400)).unwrap();
    a.start_agent();
    assert_eq!(public_key(&a), public_key(&b));

    let s = script("after");
    let after = a.run(&s);
    let row = w.wait_remote("the session sealed with host-b's key", SHIP_TIMEOUT, |r| {
        r.id == after && !r.live
    });
    assert!(
        row.quarantine.contains("seal:") && row.quarantine.contains(&key_a),
        "flagged, naming the pinned key: {row:#?}"
    );
    assert!(
        w.collector.log_text().contains("presents another session-signing key"),
        "the collector logs the new key"
    );
    let v = w.remote_verify(&after);
    assert_not_ok(&v, "sealed with another key", "the collector flagged this session");
    assert!(v.stdout_str().contains("does not verify with"), "{v}");
    assert_ok(&w.remote_verify(&before), "the session sealed before the change");

    // The operator checks the host and removes the pin.
    std::fs::remove_file(w.collector.data_dir.join("host-keys").join("host-a")).expect("removing the pin");
    a.kill_agent();
    a.start_agent();
    let later = shipped(&w, &a, "later");
    assert!(w.remote_verify(&later).stdout_str().contains(&public_key(&b)));
    assert_not_ok(&w.remote_verify(&after), "still flagged", "the collector flagged");

    // A quarantined session.
    w.collector.kill();
    let store = Store::open_with(
        &w.collector.data_dir,
        StoreOptions {
            compact: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.quarantine(&later, "held for investigation").unwrap();
    drop(store);
    w.collector.start();
    assert_not_ok(
        &w.remote_verify(&later),
        "quarantined",
        "the collector flagged this session: held for investigation",
    );
}

// ----- the host's side -----

fn frame(body: recorder_frame::Body) -> Vec<u8> {
    let mut buf = Vec::new();
    framing::encode(&RecorderFrame { body: Some(body) }, &mut buf);
    buf
}

/// A recorder whose Close names another chain end than the chunks the agent
/// received (its last chunk replaced on the way): the agent seals the session
/// as cut short, and verify fails on the spool and at the collector, which
/// flags it.
#[test]
fn a_close_that_disagrees_with_the_agents_chain_is_sealed_as_cut_short() {
    let w = ShipWorld::new(0x5ea4);
    let h = host(&w, "host-a");
    let id = uuid::Uuid::now_v7().to_string();
    let mut chunker = Chunker::new(&id, 1);
    let mut chunks = Vec::new();
    for i in 0..3u64 {
        chunker
            .buffer()
            .extend_from_slice(format!("[0.1, \"o\", \"line {i}\\r\\n\"]\n").as_bytes());
        chunks.push(chunker.cut(i, i).unwrap());
    }
    // The recorder's own last chunk, which is not the one the agent gets.
    let mut other = Chunker::with_state(1, 2, chunks[1].hash);
    other
        .buffer()
        .extend_from_slice(b"[0.1, \"o\", \"what was really typed\\r\\n\"]\n");
    let real_last = other.cut(2, 2).unwrap();

    let mut s = std::os::unix::net::UnixStream::connect(&h.socket).expect("the agent's socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = frame(recorder_frame::Body::Open(Open {
        meta: Some(SessionMeta {
            session_id: id.clone(),
            mode: "exec".into(),
            command: ": disagree".into(),
            original_command: ": disagree".into(),
            ..Default::default()
        }),
        resume: false,
    }));
    for c in &chunks {
        out.extend(frame(recorder_frame::Body::Chunk(Chunk {
            seq: c.seq,
            data: c.bytes.clone(),
            hash: c.hash.to_vec(),
        })));
    }
    out.extend(frame(recorder_frame::Body::Close(Close {
        last_seq: 2,
        chunks: 3,
        final_hash: real_last.hash.to_vec(),
        ..Default::default()
    })));
    s.write_all(&out).expect("sending the session");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match framing::take::<AgentFrame>(&mut got, 1 << 20).expect("agent frames") {
            Some(AgentFrame {
                body: Some(agent_frame::Body::Ack(a)),
            }) if a.closed => break true,
            Some(_) => continue,
            None => {}
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    assert!(closed, "the agent acknowledged the Close");
    let log = h.agent_log_text();
    assert!(log.contains("sealing a session cut short"), "the agent logs it: {log}");

    assert_not_ok(
        &run(h.cli(&["verify", &id]), TIMEOUT),
        "on the spool",
        "the agent sealed this session as cut short",
    );
    let row = w.wait_remote("the session at the collector", SHIP_TIMEOUT, |r| r.id == id && !r.live);
    assert!(row.quarantine.contains("cut short"), "{row:#?}");
    assert_not_ok(&w.remote_verify(&id), "at the collector", "cut short");
}

/// The spool rewritten while the agent is stopped: a chunk's content
/// changed and the chain recomputed, records and CRCs all consistent, the
/// original start and (sealed) end kept. Verify on the spool fails on the
/// seal.
#[test]
fn a_rewritten_spool_fails_verify() {
    let w = ShipWorld::new(0x5ea5);
    let h = host(&w, "host-a");
    let s = script("spooled");
    let id = h.run(&s);
    assert_ok(&run(h.cli(&["verify", &id]), TIMEOUT), "the spool as recorded");
    h.kill_agent();

    let index = spool::scan(&h.spool, false).expect("reading the spool");
    let entry = index.sessions.get(&id).expect("the session in the spool").clone();
    assert_eq!(
        entry.chunks.first().map(|c| c.seq),
        Some(0),
        "the whole session is still in the spool"
    );
    let parts: Vec<(ChunkHeader, Vec<u8>)> = entry
        .chunks
        .iter()
        .map(|c| {
            shelltrail_cast::chunk::decompress(&spool::read_chunk(&h.spool, c.loc).expect("a spooled chunk"))
                .expect("a chunk")
        })
        .collect();
    let forged = recut(&id, &parts, |_, raw| {
        let text = String::from_utf8(raw.clone()).expect("asciicast text");
        *raw = text.replace("spooled 00007", "spooled 99999").into_bytes();
    });
    assert_ne!(
        forged.last().map(|(_, b)| shelltrail_cast::chunk::hash(b).unwrap()),
        parts.last().map(|(h, raw)| shelltrail_cast::chunk::link_hash(h, raw)),
        "the forgery changes the chain's end"
    );
    let close = entry.close.clone().expect("the session ended");
    assert!(close.seal.is_some(), "the agent sealed the session");

    for seg in h.segments() {
        std::fs::remove_file(seg).expect("removing a segment");
    }
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    let mut bodies = vec![spool::open_body(&entry.open)];
    bodies.extend(forged.iter().map(|(seq, bytes)| {
        let hash = shelltrail_cast::chunk::hash(bytes).expect("a forged chunk");
        spool::chunk_body(&uuid, *seq, &hash, bytes)
    }));
    bodies.push(spool::close_body(&close));
    write_segment(&h.spool, bodies);

    let v = run(h.cli(&["verify", &id]), TIMEOUT);
    assert_chain_intact(&v, "the rewritten spool");
    assert_not_ok(&v, "the rewritten spool", "the chunks are not the ones sealed");
}

/// Writes `bodies` as the spool's only segment, with the agent's own writer.
fn write_segment(dir: &Path, bodies: Vec<Vec<u8>>) {
    let stats = std::sync::Arc::new(spool::Stats::default());
    let w = spool::Writer::create(dir, 0, 64 << 20, stats).expect("a spool writer");
    let (tx, rx) = std::sync::mpsc::channel();
    let waits: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let (done, wait) = tokio::sync::oneshot::channel();
            tx.send(spool::Append { body, done }).unwrap();
            wait
        })
        .collect();
    drop(tx);
    w.run(rx);
    for wait in waits {
        wait.blocking_recv().unwrap().expect("a record written");
    }
}

/// A recorder killed with SIGKILL mid-session: the agent's sweep ends the
/// session as "recorder vanished" and seals what it holds. Verify passes on
/// the spool and at the collector, and says the recorder never confirmed
/// its end.
#[test]
fn a_session_whose_recorder_vanished_is_sealed_as_the_agent_holds_it() {
    let w = ShipWorld::new(0x5ea6);
    let h = host(&w, "host-a");
    let long = Script::new("vanish", 300).paced(1, 100);
    let session = h.spawn(&long);
    let row = shelltrail_tests::wait_until("the live session's first chunks", Duration::from_secs(20), || {
        h.sessions().into_iter().find(|r| long.is(r) && r.live && r.chunks >= 2)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(row.pid), nix::sys::signal::Signal::SIGKILL)
        .expect("killing the recorder");
    let _ = session.wait(TIMEOUT);
    let ended = shelltrail_tests::wait_until("the agent's sweep", Duration::from_secs(30), || {
        h.sessions()
            .into_iter()
            .find(|r| r.id == row.id && !r.live && r.end_cause.is_some())
    });
    assert_eq!(ended.end_cause.as_deref(), Some("recorder vanished"), "{ended:#?}");
    let v = run(h.cli(&["verify", &row.id]), TIMEOUT);
    assert_ok(&v, "on the spool");
    assert!(v.stdout_str().contains("the recorder never confirmed its end"), "{v}");
    w.wait_remote("the session ended at the collector", SHIP_TIMEOUT, |r| {
        r.id == row.id && !r.live
    });
    let v = w.remote_verify(&row.id);
    assert_ok(&v, "at the collector");
    assert!(v.stdout_str().contains("recorder vanished"), "{v}");
}
