//! A host's life over time: one interactive session left open and idle (as
//! a session can be for days) while many others come, write megabytes, end
//! and ship, and the agent is restarted (SIGTERM, SIGKILL, SIGTERM) in
//! between. Issue 11: the idle session must not pin the spool (every shipped
//! segment is deleted, whatever the idle session's start record was written
//! in), and the host's listing must stay true (no ghost: no ended session
//! shown live, none declared vanished, no "start record is missing").
//!
//! The host is a [`World`] (real sshd, real `ssh`) whose agent ships to a
//! [`ShipWorld`]'s collector over mutual TLS, with the smallest spool
//! segments the agent accepts (1 MiB), so each wave spans many segments.

use shelltrail_tests::proc::{Output, run_ok};
use shelltrail_tests::world::files_bytes;
use shelltrail_tests::{SHIP_TIMEOUT, SessionRow, ShipWorld, TIMEOUT, World};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The host's name at the collector (its certificate names it).
const HOST: &str = "lifecycle-host";
/// Waves of sessions; the agent is restarted between consecutive waves.
const WAVES: usize = 4;
/// How the agent is restarted before waves 1, 2 and 3: stopped (SIGTERM)
/// or killed (SIGKILL), then started on the same spool.
const RESTARTS: [&str; WAVES - 1] = ["SIGTERM", "SIGKILL", "SIGTERM"];
/// Sessions per wave, run at once.
const PER_WAVE: usize = 2;
/// What a drained spool may still hold: the active segment and the one or
/// two the open session's records were last carried into.
const DRAINED_SEGMENTS: usize = 3;
const DRAINED_BYTES: u64 = 3 << 20;
/// Once the collector holds everything, how long the spool may go without
/// losing a segment while it is still above the drained size: a pinned
/// spool stops shrinking; a draining one deletes a segment every few seconds.
const DRAIN_STALL: Duration = Duration::from_secs(10);

fn drained(segs: &[PathBuf]) -> bool {
    segs.len() <= DRAINED_SEGMENTS || files_bytes(segs) <= DRAINED_BYTES
}

/// Waits until the spool is down to a drained size, as long as it keeps
/// shrinking: fails once no segment has been deleted for [`DRAIN_STALL`]
/// (or after [`SHIP_TIMEOUT`] in all). Returns the time it took.
fn wait_drained(w: &World) -> Result<Duration, String> {
    let start = Instant::now();
    let mut seen = w.segments();
    let mut progress = start;
    loop {
        let segs = w.segments();
        if drained(&segs) {
            return Ok(start.elapsed());
        }
        if seen.iter().any(|p| !segs.contains(p)) {
            progress = Instant::now();
        }
        seen = segs;
        if progress.elapsed() >= DRAIN_STALL || start.elapsed() >= SHIP_TIMEOUT {
            return Err(format!(
                "no segment deleted for {:.1} s ({:.1} s after the collector held everything): {}",
                progress.elapsed().as_secs_f64(),
                start.elapsed().as_secs_f64(),
                describe_segments(&seen)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number in a segment file's name (`00000000000000000042.seg`).
fn segment_number(p: &Path) -> u64 {
    p.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected segment file name {}", p.display()))
}

fn describe_segments(segs: &[PathBuf]) -> String {
    let names: Vec<String> = segs
        .iter()
        .map(|p| {
            format!(
                "{}({} B)",
                segment_number(p),
                std::fs::metadata(p).map_or(0, |m| m.len())
            )
        })
        .collect();
    format!(
        "{} segments, {} bytes: [{}]",
        segs.len(),
        files_bytes(segs),
        names.join(", ")
    )
}

/// `sessions --json` on the host: its rows, the same rows as plain JSON
/// (for fields the row type may not have yet, such as `shipped`), and the
/// command's output (for its stderr).
fn listing(w: &World) -> (Vec<SessionRow>, Vec<serde_json::Value>, Output) {
    let out = run_ok(w.cli(&["sessions", "--json"]), TIMEOUT);
    let rows: Vec<SessionRow> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("sessions --json is not the expected JSON: {e}; {out}"));
    let values: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("sessions --json is JSON");
    // Other tests' sshd sessions show up as unrecorded gaps of their users
    // (see `World::sessions`): not this host's business.
    let (rows, values) = rows
        .into_iter()
        .zip(values)
        .filter(|(r, _)| r.mode != "unrecorded" || r.user == w.user.name)
        .unzip();
    (rows, values, out)
}

/// Checks the host's listing for ghosts; returns what is wrong (empty: nothing).
/// `idle`: the open session; `ended`: every wave session so far, each held
/// whole by the collector.
fn ghosts(w: &World, when: &str, idle: &str, ended: &[String]) -> Vec<String> {
    let (rows, values, out) = listing(w);
    let mut bad = Vec::new();
    let stderr = out.stderr_str();
    if !stderr.trim().is_empty() {
        bad.push(format!("{when}: `sessions --json` warned on stderr: {}", stderr.trim()));
    }
    match rows.iter().find(|r| r.id == idle) {
        None => bad.push(format!("{when}: the open idle session {idle} is not listed")),
        Some(r) if !r.live => bad.push(format!(
            "{when}: the open idle session is listed as ended (end_cause {:?}, exit {:?})",
            r.end_cause, r.exit_status
        )),
        Some(_) => {}
    }
    for (r, v) in rows.iter().zip(&values) {
        if let Some(cause) = &r.end_cause
            && cause.contains("vanished")
        {
            bad.push(format!(
                "{when}: session {} ({:?}) has end_cause {cause:?}",
                r.id, r.command
            ));
        }
        if ended.contains(&r.id) {
            if r.live {
                bad.push(format!(
                    "{when}: ended wave session {} ({:?}) is listed live",
                    r.id, r.command
                ));
            }
            // `shipped` (when the listing has it): the collector holds it whole.
            if let Some(shipped) = v.get("shipped")
                && shipped != &serde_json::Value::Bool(true)
            {
                bad.push(format!(
                    "{when}: wave session {} is at the collector whole but listed with shipped = {shipped}",
                    r.id
                ));
            }
        }
    }
    bad
}

/// What wave session `i` runs: 3 MiB of random bytes as base64 (4 MiB of
/// output that barely compresses), at once (a burst that ends before the
/// agent's next look at its spool) or, for odd `i`, in six parts a second
/// apart (a session still live while its first segments ship and go).
fn wave_command(tag: &str, i: usize) -> String {
    if i.is_multiple_of(2) {
        format!(": {tag}; head -c 3M /dev/urandom | base64")
    } else {
        format!(": {tag}; for p in 1 2 3 4 5 6; do head -c 512K /dev/urandom | base64; sleep 1; done")
    }
}

/// Runs one wave: `PER_WAVE` exec sessions at once (see [`wave_command`]),
/// to their end. Checks each at the collector (ended, complete, verify OK,
/// byte-exact with what the client received). Returns their ids.
fn wave(w: &World, ship: &ShipWorld, n: usize) -> Vec<String> {
    let tags: Vec<String> = (0..PER_WAVE).map(|i| format!("wave-{n}-{i}")).collect();
    let running: Vec<_> = tags
        .iter()
        .enumerate()
        .map(|(i, t)| w.ssh().command(&wave_command(t, i)).spawn())
        .collect();
    let outs: Vec<Output> = running.into_iter().map(|r| r.wait(TIMEOUT)).collect();
    let mut ids = Vec::new();
    for (t, out) in tags.iter().zip(&outs) {
        out.assert_success();
        assert!(out.stderr.is_empty(), "{t}: {out}");
        assert!(out.stdout.len() > 4 << 20, "{t}: base64 of 3 MiB is over 4 MiB: {out}");
        let needle = format!(": {t};");
        let r = ship.wait_remote(&format!("{t} at the collector"), SHIP_TIMEOUT, |r| {
            r.command.contains(&needle) && !r.live
        });
        ship.assert_shipped_from(HOST, &r.id, &out.stdout, SHIP_TIMEOUT);
        ids.push(r.id);
    }
    ids
}

/// An interactive session stays open and idle through four waves of
/// sessions writing 8 MiB each and three agent restarts (SIGTERM, SIGKILL,
/// SIGTERM). After every wave, once the collector holds it, the spool
/// drains back to a few segments and the host lists no ghost; at the end
/// the idle session, typed into again and ended, is at the collector whole
/// and verifies.
#[test]
fn an_idle_session_open_for_days_never_pins_the_spool() {
    let started = Instant::now();
    let ship = ShipWorld::new(0x11);
    let w = World::builder()
        .agent_setting("segment_bytes = \"1MiB\"")
        .ship_to(&ship, HOST)
        .build();

    let mut t = w.ssh().term(100, 30);
    t.wait_prompt();
    // Typed `$((6*7))`, shown `42`: the output, not the echo of the typing.
    t.line("echo FIRST-$((6*7))-idle");
    t.expect("FIRST-42-idle\r\n");
    t.wait_prompt();
    let idle = w
        .wait_session("the idle interactive session", Duration::from_secs(20), |r| {
            r.live && r.mode == "pty"
        })
        .id;
    ship.wait_remote("the idle session at the collector", SHIP_TIMEOUT, |r| r.id == idle);

    let mut problems: Vec<String> = Vec::new();
    let mut ended: Vec<String> = Vec::new();
    let mut deleted_before = 0;
    let mut report = Vec::new();
    for n in 0..WAVES {
        let when = if n == 0 {
            "wave 0".to_string()
        } else {
            let how = RESTARTS[n - 1];
            if how == "SIGKILL" {
                w.restart_agent();
            } else {
                w.stop_agent();
                w.start_agent();
            }
            format!("wave {n} (after agent restart {n}, {how})")
        };
        let newest_before = w.segments().last().map_or(0, |p| segment_number(p));
        let ids = wave(&w, &ship, n);
        ended.extend(ids);

        // The premise: the wave was cut into 1 MiB segments (8 MiB of output
        // that barely compresses: the newest segment number moved on by
        // several), and the collector holds every session so far.
        let newest_after = w.segments().last().map_or(0, |p| segment_number(p));
        assert!(
            newest_after >= newest_before + 4,
            "{when}: expected the wave to fill several 1 MiB segments; newest segment went {newest_before} -> {newest_after}"
        );
        let remote = ship.remote_sessions();
        for id in &ended {
            assert!(
                remote.iter().any(|r| &r.id == id && !r.live),
                "{when}: session {id} is not at the collector ended"
            );
        }

        // The spool drains back to a few segments.
        let drain = wait_drained(&w);
        let segs = w.segments();
        let log = w.agent_log_text();
        let deleted = log.matches("deleted a fully shipped spool segment").count();
        let line = format!(
            "{when}: segments {newest_before} -> {newest_after} written; {}; spool now {}; {} segments deleted since the previous check",
            match &drain {
                Ok(took) => format!("drained in {:.1} s", took.as_secs_f64()),
                Err(_) => "not drained".to_string(),
            },
            describe_segments(&segs),
            deleted - deleted_before
        );
        eprintln!("lifecycle: {line}");
        report.push(line);
        deleted_before = deleted;
        if let Err(e) = drain {
            problems.push(format!(
                "{when}: the spool stopped draining although the collector holds everything: {e}"
            ));
        }
        problems.extend(ghosts(&w, &when, &idle, &ended));
    }

    // The idle session wakes up, types again and ends normally.
    t.line("echo LAST-$((7*8))-idle");
    t.expect("LAST-56-idle\r\n");
    t.wait_prompt();
    t.line("exit 0");
    assert_eq!(t.wait_exit(Duration::from_secs(30)), 0, "{}", t.transcript());
    let transcript = t.transcript();

    let r = ship.wait_remote("the idle session ended at the collector", SHIP_TIMEOUT, |r| {
        r.id == idle && !r.live
    });
    let complete = r.lost_chunks == 0
        && r.quarantine.is_empty()
        && r.last_seq.is_some_and(|last| r.chunks as u64 == last + 1)
        && r.exit_status == Some(0);
    if !complete {
        problems.push(format!("the idle session at the collector is not complete: {r:#?}"));
    }
    let v = ship.remote_verify(&idle);
    if !(v.status.success() && v.stdout_str().starts_with("OK: ") && !v.stdout_str().contains("FAIL")) {
        problems.push(format!("verify of the idle session at the collector failed: {v}"));
    }
    let raw = ship.remote_export_raw(&idle);
    let text = String::from_utf8_lossy(&raw);
    for needle in ["FIRST-42-idle", "LAST-56-idle"] {
        if !text.contains(needle) {
            problems.push(format!("the idle session's recording at the collector lacks {needle}"));
        }
    }
    if raw != transcript.as_bytes() {
        problems.push(format!(
            "the idle session's recording at the collector ({} bytes) differs from what its terminal showed ({} bytes)",
            raw.len(),
            transcript.len()
        ));
    }
    // Every wave session is still whole at the collector, as it ended: no
    // later end (a sweep's "recorder vanished") has replaced the real one.
    let remote = ship.remote_sessions();
    for id in &ended {
        let r = remote
            .iter()
            .find(|r| &r.id == id)
            .unwrap_or_else(|| panic!("session {id} left the collector"));
        assert!(!r.live && r.lost_chunks == 0, "{r:#?}");
        if (r.exit_status, r.end_cause.as_deref()) != (Some(0), Some("recorder")) {
            problems.push(format!(
                "at the end: wave session {id} ({:?}) at the collector ended with exit {:?}, cause {:?}",
                r.command, r.exit_status, r.end_cause
            ));
        }
        let v = ship.remote_verify(id);
        if !(v.status.success() && v.stdout_str().starts_with("OK: ") && !v.stdout_str().contains("FAIL")) {
            problems.push(format!(
                "at the end: verify of wave session {id} at the collector failed: {v}"
            ));
        }
    }
    // The host's listing after the idle session ended: nothing live, no ghost.
    let (rows, _, out) = listing(&w);
    for r in rows.iter().filter(|r| r.live) {
        problems.push(format!(
            "at the end: session {} ({:?}) still listed live",
            r.id, r.command
        ));
    }
    if !out.stderr_str().trim().is_empty() {
        problems.push(format!(
            "at the end: `sessions --json` warned: {}",
            out.stderr_str().trim()
        ));
    }

    eprintln!(
        "lifecycle: {} waves, 3 agent restarts, {:.1} s",
        WAVES,
        started.elapsed().as_secs_f64()
    );
    assert!(
        problems.is_empty(),
        "an idle session pinned the spool or left ghosts ({} problems):\n  {}\nspool after each wave:\n  {}",
        problems.len(),
        problems.join("\n  "),
        report.join("\n  ")
    );
}
