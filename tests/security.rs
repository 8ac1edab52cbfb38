//! Attempts to escape or confuse the recording: the recorder as both login
//! shell and ForceCommand, a user attacking their own recorder, a config
//! swapped under the recorder, and hostile bytes on the agent's socket.

use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, Chunk, Open, RecorderFrame, SessionMeta, agent_frame, recorder_frame};
use shelltrail_tests::{Running, TIMEOUT, TestUser, World, poll_until};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The recorder is the user's login shell and sshd's ForceCommand (the
/// configuration that closes the ~/.bashrc bypass): every login is
/// recorded exactly once, exec, interactive and sftp alike.
#[test]
fn login_shell_and_force_command_record_once() {
    let user = TestUser::with_recorder_as_login_shell("shelltrail-e2e-ls");
    let w = World::builder().user(user).build();

    let out = w.ssh().command("echo once-$((1+1))").run();
    out.assert_success();
    assert_eq!(out.stdout, b"once-2\n", "{out}");
    let all = w.sessions();
    assert_eq!(all.len(), 1, "one exec login, {} sessions: {all:#?}", all.len());
    assert_eq!(all[0].mode, "exec");
    assert_eq!(all[0].command, "echo once-$((1+1))");
    let cast = w.export(&all[0].id);
    assert_eq!(cast.output(), "once-2\n");
    // The real shell ran the command, not the recorder again.
    assert_eq!(cast.meta()["command"], "/bin/bash -c echo once-$((1+1))");

    let mut t = w.ssh().term(80, 24);
    t.line("echo tty-$((2+3))");
    t.expect("tty-5");
    t.line("exit");
    assert_eq!(t.wait_exit(Duration::from_secs(30)), 0, "{}", t.transcript());
    let all = w.sessions();
    assert_eq!(
        all.len(),
        2,
        "one interactive login added {} sessions: {all:#?}",
        all.len() - 1
    );
    let pty = all.iter().find(|r| r.mode == "pty").expect("the pty session");
    assert_eq!(w.export(&pty.id).output().matches("tty-5").count(), 1);

    shelltrail_tests::proc::run_ok(w.sftp_batch("ls /\n"), TIMEOUT);
    let all = w.sessions();
    assert_eq!(
        all.len(),
        3,
        "one sftp login added {} sessions: {all:#?}",
        all.len() - 2
    );
    assert!(all.iter().any(|r| r.mode == "transfer"), "{all:#?}");
}

/// What sshd gave the recorder stays with the recorder: inside a session,
/// `$SHELL` is the real shell and `SSH_ORIGINAL_COMMAND` is gone, so a
/// program that starts `$SHELL` (script, an editor's shell escape) gets a
/// shell, and a shelltrail-shell started by hand does not find the
/// session's command and run it again (a walkthrough found that loop: each
/// round a new recorded login, up to `max_sessions_per_uid`).
#[test]
fn the_session_command_does_not_leak_into_the_session() {
    let user = TestUser::with_recorder_as_login_shell("shelltrail-e2e-env");
    let w = World::builder().user(user).build();
    let recorder = format!(
        "{} --config {}",
        shelltrail_tests::users::RECORDER_LOGIN_SHELL,
        w.config.display()
    );

    let out = w
        .ssh()
        .command(&format!(
            "echo top; echo \"echo via-stdin\" | $SHELL; echo \"shell=$SHELL orig=${{SSH_ORIGINAL_COMMAND-unset}}\"; \
             echo 'echo by-hand' | {recorder}; true"
        ))
        .run();
    out.assert_success();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "top\nvia-stdin\nshell=/bin/bash orig=unset\nby-hand\n",
        "{out}"
    );
    // The login, and the recorder started by hand (a session of its own,
    // recording what it ran), no more.
    let all = w.sessions();
    assert_eq!(all.len(), 2, "{all:#?}");
    let login = all
        .iter()
        .find(|r| r.command.starts_with("echo top"))
        .expect("the login");
    let cast = w.export(&login.id);
    assert_eq!(cast.header["env"]["SHELL"], "/bin/bash");
    assert!(cast.output().contains("via-stdin"), "{}", cast.output());
}

/// Waits until `user` has no processes; panics with a `ps` listing if some remain.
#[track_caller]
fn assert_no_processes_left(user: &TestUser, timeout: Duration) {
    let gone = poll_until(timeout, || user.processes().is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "processes of {} are still running:\n{}",
        user.name,
        user.process_listing()
    );
}

/// Starts a terminal session, waits until its shell answers, and returns
/// it with the session id.
fn started_pty_session(w: &World) -> (shelltrail_tests::Term, String) {
    let mut t = w.ssh().term(80, 24);
    t.line("echo up-$((1+1))");
    t.expect("up-2");
    let id = w
        .sessions()
        .into_iter()
        .find(|r| r.mode == "pty" && r.live)
        .expect("a live pty session")
        .id;
    (t, id)
}

/// From inside the session, the user can neither read the recorder's
/// memory or environment (it is non-dumpable from exec: set-uid) nor stop or
/// kill it (it runs as its own user): the session goes on being recorded.
#[test]
fn recorder_resists_its_user() {
    let user = TestUser::dedicated("shelltrail-e2e-kill");
    assert_no_processes_left(&user, Duration::from_secs(10));
    let w = World::builder().user(user.clone()).build();

    // Exec: bash -c runs the command in place, so $PPID is the recorder.
    let out = w
        .ssh()
        .command("cat /proc/$PPID/environ; kill -STOP $PPID; echo stop-rc=$?")
        .run();
    assert!(out.stderr_str().contains("Permission denied"), "{out}");
    assert!(out.stderr_str().contains("Operation not permitted"), "{out}");
    assert!(out.stdout_str().contains("stop-rc=1"), "{out}");
    assert!(!out.stdout_str().contains("SSH_CONNECTION"), "{out}");

    let (mut t, id) = started_pty_session(&w);
    t.line("cat /proc/$PPID/environ; echo rc=$?");
    let seen = t.expect("rc=1");
    assert!(seen.contains("Permission denied"), "{seen:?}");
    t.line("kill -9 $PPID; kill -STOP $PPID; echo kill-rc=$?");
    let seen = t.expect("kill-rc=1");
    assert!(seen.contains("Operation not permitted"), "{seen:?}");
    t.line("echo still-recorded-$((40+2))");
    t.expect("still-recorded-42");
    t.line("exit 3");
    assert_eq!(t.wait_exit(Duration::from_secs(30)), 3, "{}", t.transcript());
    assert_no_processes_left(&user, Duration::from_secs(15));

    let s = w.wait_closed(&id, Duration::from_secs(30));
    assert_eq!(s.end_cause.as_deref(), Some("recorder"), "{s:#?}");
    assert_eq!(s.exit_status, Some(3), "{s:#?}");
    let out = w.export(&id).output();
    assert!(out.contains("kill-rc=1") && out.contains("still-recorded-42"), "{out}");
}

// ----- the config swap -----

/// Removes a file or directory tree when dropped (one a test made outside its world).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::fs::remove_file(&self.0).is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Flips `link` between `a` and `b` (a new link renamed over it, so it
/// always exists) until the returned flag is set.
fn flip_link(
    link: std::path::PathBuf,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let tmp = link.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut flips = 0u64;
        while !flag.load(Ordering::Relaxed) {
            for target in [&a, &b] {
                if std::os::unix::fs::symlink(target, &tmp)
                    .and_then(|()| std::fs::rename(&tmp, &link))
                    .is_err()
                {
                    return flips;
                }
                flips += 1;
            }
        }
        flips
    });
    (stop, handle)
}

/// The config swap (issue 10): when the recorder is the login shell without
/// a ForceCommand, a user can send `shelltrail-shell --config LINK` as an
/// exec request, LINK flipping between a root-owned file and their own. Run
/// 200 times that way (as the user, with SSH_CONNECTION set) while a thread
/// flips LINK, the recorder loads the user's file 0 times: a path outside
/// /etc/shelltrail is refused outright, and one under it through a directory
/// the user owns (an administrator's slip) is refused at that directory.
#[test]
fn a_config_swapped_under_the_recorder_is_never_loaded() {
    let w = World::builder().no_sshd().agent_down().build();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(w.user.uid))
        .unwrap()
        .expect("the test user");
    // Root's file and the user's, told apart by the error each gives (an
    // unknown key names itself): what matters is which file was read.
    let root_file = w.path.join("root.toml");
    std::fs::write(&root_file, "root_file_marker = 1\n").unwrap();
    let user_file = w.files.join("mine.toml");
    std::fs::write(&user_file, "user_file_marker = 1\n").unwrap();
    nix::unistd::chown(&user_file, Some(user.uid), Some(user.gid)).unwrap();
    // A directory of the user's under /etc/shelltrail.
    let world_name = w.path.file_name().unwrap().to_string_lossy().into_owned();
    let slip = Path::new(shelltrail_tests::world::CONFIG_DIR).join(format!("{world_name}-user"));
    std::fs::create_dir(&slip).unwrap();
    let _slip = RemoveOnDrop(slip.clone());
    nix::unistd::chown(&slip, Some(user.uid), Some(user.gid)).unwrap();
    // The same user reads a root file named directly under /etc/shelltrail:
    // the refusals below are not the user being unable to read anything.
    let direct = Path::new(shelltrail_tests::world::CONFIG_DIR).join(format!("{world_name}-direct.toml"));
    std::fs::copy(&root_file, &direct).unwrap();
    let _direct = RemoveOnDrop(direct.clone());

    let recorder = |config: &Path| {
        let mut c = Command::new(&w.shell_bin);
        c.arg("--config").arg(config).args(["-c", "true"]);
        c.env("SSH_CONNECTION", "127.0.0.1 40000 127.0.0.1 22");
        c.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        shelltrail_tests::proc::run(c, TIMEOUT)
    };
    let out = recorder(&direct);
    assert!(out.stderr_str().contains("root_file_marker"), "{out}");

    let (mut loaded_user, mut loaded_root, mut other) = (0, 0, Vec::new());
    for (dir, why) in [
        (w.files.clone(), "only from /etc/shelltrail/"),
        (slip.clone(), "is owned by uid"),
    ] {
        let link = dir.join("LINK");
        let (stop, flipper) = flip_link(link.clone(), root_file.clone(), user_file.clone());
        for _ in 0..100 {
            let out = recorder(&link);
            let err = out.stderr_str();
            if err.contains("user_file_marker") {
                loaded_user += 1;
            } else if err.contains("root_file_marker") {
                loaded_root += 1;
            } else if !err.contains(why) {
                other.push(format!("{why:?} expected: {out}"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.join().unwrap();
        eprintln!("{}: link flipped {flips} times", dir.display());
    }
    assert_eq!(
        (loaded_user, loaded_root),
        (0, 0),
        "of 200 runs, the recorder loaded the user's file {loaded_user} times and root's {loaded_root} times"
    );
    assert!(other.is_empty(), "refused for another reason: {other:#?}");
}

// ----- hostile bytes on the agent socket -----

fn frame(body: recorder_frame::Body) -> Vec<u8> {
    let mut buf = Vec::new();
    framing::encode(&RecorderFrame { body: Some(body) }, &mut buf);
    buf
}

fn open_frame(session_id: &str) -> Vec<u8> {
    frame(recorder_frame::Body::Open(Open {
        meta: Some(SessionMeta {
            session_id: session_id.to_string(),
            mode: "exec".into(),
            ..Default::default()
        }),
        resume: false,
    }))
}

/// Sends `bytes` on a new connection and reads until the agent closes it
/// (panics if it does not within 10 s). Returns the frames it sent back.
fn send_and_wait_close(w: &World, bytes: &[u8]) -> Vec<AgentFrame> {
    let mut s = UnixStream::connect(&w.socket).expect("connecting to the agent");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The agent may close before reading everything: a failed write is fine.
    let _ = s.write_all(bytes);
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

#[track_caller]
fn wait_log(w: &World, text: &str) {
    let found = poll_until(Duration::from_secs(10), || {
        w.agent_log_text().contains(text).then_some(())
    });
    assert!(
        found.is_some(),
        "the agent logged nothing about {text:?}:\n{}",
        w.agent_log_text()
    );
}

/// Oversized frames, garbage protobuf, an empty frame, a path as session id
/// and a malformed chunk each close only their own connection, with a log
/// line; a session recording at the same time is not disturbed, and the
/// agent takes new sessions afterwards.
#[test]
fn hostile_agent_clients_only_lose_their_own_connection() {
    let w = World::builder().no_sshd().build();
    let good = Running::spawn(
        w.local_recorder("for i in $(seq 1 20); do echo good-$i; sleep 0.1; done"),
        None,
    );
    good.wait_stdout_contains("good-1\n", Duration::from_secs(20));

    // A length prefix far above max_frame_bytes: refused before any body arrives.
    let frames = send_and_wait_close(&w, &u32::MAX.to_be_bytes());
    assert!(frames.is_empty(), "{frames:?}");
    wait_log(&w, "exceeds the limit");

    // A well-sized frame of garbage.
    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend(std::iter::repeat_n(0xffu8, 64));
    send_and_wait_close(&w, &garbage);
    wait_log(&w, "malformed protobuf");

    send_and_wait_close(&w, &0u32.to_be_bytes());
    wait_log(&w, "empty frame");

    // A session id that is a path.
    let frames = send_and_wait_close(&w, &open_frame("../../etc/passwd"));
    let refused = frames.iter().find_map(|f| match &f.body {
        Some(agent_frame::Body::Refused(r)) => Some(r.reason.clone()),
        _ => None,
    });
    assert!(
        refused.as_deref().is_some_and(|r| r.contains("UUID")),
        "no refusal for a path as session id: {frames:?}"
    );
    wait_log(&w, "canonical UUID");

    // A valid Open, then a chunk that is not a chunk.
    let mut bytes = open_frame("01900000-0000-7000-8000-000000000001");
    bytes.extend(frame(recorder_frame::Body::Chunk(Chunk {
        seq: 0,
        data: b"this is not a zstd chunk".to_vec(),
        hash: Vec::new(),
    })));
    send_and_wait_close(&w, &bytes);
    wait_log(&w, "malformed chunk");

    // The honest session did not notice.
    let out = good.wait(TIMEOUT);
    out.assert_success();
    let expected: String = (1..=20).map(|i| format!("good-{i}\n")).collect();
    assert_eq!(out.stdout_str(), expected);
    let all = w.sessions();
    let s = all
        .iter()
        .find(|r| r.command.contains("good-"))
        .unwrap_or_else(|| panic!("the honest session is missing: {all:#?}"));
    assert!(!s.live && s.exit_status == Some(0) && s.lost_chunks == 0, "{s:#?}");
    assert_eq!(w.export(&s.id).output(), expected);
    assert!(!all.iter().any(|r| r.id.contains("passwd")), "{all:#?}");
    for e in std::fs::read_dir(&w.spool).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".seg") || name == shelltrail::agent::spool::log::LOCK_FILE,
            "unexpected file {name} in the spool"
        );
    }

    // And the agent still takes new sessions.
    let out = shelltrail_tests::proc::run(w.local_recorder("echo after-attack"), TIMEOUT);
    out.assert_success();
    assert!(
        w.sessions()
            .iter()
            .any(|r| r.command == "echo after-attack" && r.exit_status == Some(0)),
        "{:#?}",
        w.sessions()
    );
}

// ----- what the CLI prints -----

/// Characters that must never reach an operator's terminal as themselves
/// (other than line ends): C0, DEL, C1, bidirectional controls.
fn terminal_unsafe(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| c != '\n' && c != '\r')
        .filter(|&c| {
            c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

/// A session whose metadata is hostile and whose claims are false lists
/// cleanly: escapes from SSH_CONNECTION (a real recorder's session) and
/// from a forged Open on the agent's socket (claimed user, claimed time,
/// C1 and bidi controls in host, mode and command) are shown escaped; the
/// start shown is when the agent saw the session open, not the claimed
/// 2001; `--user` matches the user the agent verified, not the claimed one;
/// and `export` to a terminal writes the same JSON with the controls as
/// `\u` escapes.
#[test]
fn hostile_and_claimed_fields_list_cleanly() {
    let w = World::builder().no_sshd().build();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    // A real recorder under a hostile SSH_CONNECTION.
    let mut c = w.local_recorder("echo hostile-$((6*7))");
    c.env("SSH_CONNECTION", "\u{1b}[2K\u{1b}[1A\u{9b}2J10.9.9.9 4242 127.0.0.1 22");
    let out = shelltrail_tests::proc::run(c, TIMEOUT);
    out.assert_success();

    // A forged Open: it claims alice and 2001-09-09, and carries controls.
    let claimed_ms = 1_000_000_000_000i64;
    let forged_id = "00e8d4a5-1000-7000-8000-00000000beef";
    let mut bytes = frame(recorder_frame::Body::Open(Open {
        meta: Some(SessionMeta {
            session_id: forged_id.into(),
            host: "web\u{1b}]0;owned\u{7}".into(),
            user: "alice".into(),
            mode: "pty\u{9b}2J".into(),
            client_addr: "\u{1b}[2K\u{1b}[1A10.6.6.6".into(),
            client_port: 22,
            original_command: "cat \u{202e}txt.exe\u{7f}".into(),
            start_unix_ms: claimed_ms,
            ..Default::default()
        }),
        resume: false,
    }));
    bytes.extend(frame(recorder_frame::Body::Close(
        shelltrail_proto::v1::Close::default(),
    )));
    let mut s = UnixStream::connect(&w.socket).expect("connecting to the agent");
    s.write_all(&bytes).unwrap();
    w.wait_closed(forged_id, Duration::from_secs(20));
    drop(s);

    let table = shelltrail_tests::proc::run_ok(w.cli(&["sessions"]), TIMEOUT).stdout_str();
    assert_eq!(terminal_unsafe(&table), Vec::<char>::new(), "{table:?}");
    assert!(table.contains("\\x1b[2K\\x1b[1A\\x9b2J10.9.9.9"), "{table}");
    let forged_line = table
        .lines()
        .find(|l| l.starts_with(forged_id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        !forged_line.contains("2001-"),
        "the claimed start is shown: {forged_line}"
    );
    assert!(forged_line.contains(" root "), "{forged_line}");

    let json = shelltrail_tests::proc::run_ok(w.cli(&["sessions", "--json"]), TIMEOUT).stdout_str();
    assert_eq!(terminal_unsafe(&json), Vec::<char>::new(), "{json}");
    let forged = w.session(forged_id);
    assert!(forged.start_unix_ms >= before, "{forged:#?}");
    assert_eq!(forged.claimed_start_unix_ms, claimed_ms);
    assert_eq!(forged.user, "root");
    assert_eq!(forged.command, "cat \u{202e}txt.exe\u{7f}", "the JSON keeps the value");

    let only = |user: &str| {
        let rows = shelltrail_tests::world::sessions_json(w.cli(&["sessions", "--json", "--user", user]));
        rows.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    assert_eq!(only("alice"), Vec::<String>::new(), "the claimed user matched");
    assert_eq!(only("root").len(), 2);

    // export on a terminal; to a pipe, the header alone is escaped.
    let hostile = w
        .sessions()
        .into_iter()
        .find(|r| r.command.contains("hostile-"))
        .expect("the recorder's session");
    let mut term = shelltrail_tests::Term::spawn(&w.cli(&["export", &hostile.id]), 200, 50);
    assert_eq!(term.wait_exit(TIMEOUT), 0);
    let shown = term.transcript();
    assert_eq!(terminal_unsafe(&shown), Vec::<char>::new(), "{shown:?}");
    assert!(shown.contains("\\u001b[2K\\u001b[1A\\u009b2J10.9.9.9"), "{shown}");
    assert!(shown.contains("hostile-42"), "{shown}");
    let piped = w.export_bytes(&hostile.id, &[]);
    let header = String::from_utf8_lossy(piped.split(|&b| b == b'\n').next().unwrap()).into_owned();
    assert_eq!(terminal_unsafe(&header), Vec::<char>::new(), "{header}");
}
