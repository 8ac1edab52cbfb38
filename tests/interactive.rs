//! Interactive sessions: `ssh -tt` in a pseudo-terminal, typed into like a
//! person would.

use shelltrail_tests::{World, asciinema};
use std::time::Duration;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Typed commands are recorded, the recording is exactly what the terminal
/// showed, and asciinema 3 renders both the v3 export and the v2 one.
#[test]
fn typed_commands_are_recorded_and_play_in_asciinema() {
    let w = World::new();
    let mut t = w.ssh().term(80, 24);
    t.wait_prompt();
    // Markers are computed by the shell so that the echo of the typed
    // command line cannot match them.
    t.line("echo hello-$((40+2))");
    t.expect("hello-42");
    t.line("ls -1 --color=never /");
    t.expect("proc\r\n");
    t.line("printf 'pf-%s\\n' alpha beta");
    t.expect("pf-beta");
    t.line("exit");
    assert_eq!(t.wait_exit(EXIT_TIMEOUT), 0, "{}", t.transcript());

    let s = w.only_session();
    assert_eq!(s.mode, "pty");
    assert_eq!(s.command, "(shell)");
    assert!(!s.live);
    assert_eq!(s.exit_status, Some(0));
    assert_eq!(s.user, w.user.name);
    assert_eq!(s.uid, w.user.uid);

    let cast = w.export(&s.id);
    assert_eq!(cast.header["version"], 3);
    assert_eq!(cast.header["term"]["cols"], 80);
    assert_eq!(cast.header["term"]["rows"], 24);
    let out = cast.output();
    for needle in ["hello-42", "pf-alpha", "pf-beta", "proc\r\n", "usr\r\n"] {
        assert!(out.contains(needle), "{needle:?} missing from {out:?}");
    }
    assert_eq!((cast.last().code.as_str(), cast.last().data.as_str()), ("x", "0"));
    // ssh keeps the local terminal raw, so what our terminal received is
    // byte for byte what the program wrote: the recording must be that.
    assert_eq!(
        String::from_utf8_lossy(&w.export_raw(&s.id)),
        t.transcript(),
        "export --raw differs from what the terminal showed"
    );

    let v3 = w.export_to_file(&s.id, "v3");
    let text = asciinema::render_txt(&v3);
    for needle in ["hello-42", "pf-alpha", "pf-beta"] {
        assert!(
            text.contains(needle),
            "asciinema's rendering of the v3 export lacks {needle:?}:\n{text}"
        );
    }
    let v2 = w.export_to_file(&s.id, "v2");
    let header: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&v2).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert_eq!(
        (header["width"].clone(), header["height"].clone()),
        (80.into(), 24.into())
    );
    let text = asciinema::render_txt(&v2);
    for needle in ["hello-42", "pf-alpha", "pf-beta"] {
        assert!(
            text.contains(needle),
            "asciinema's rendering of the v2 export lacks {needle:?}:\n{text}"
        );
    }
}

/// A window resize reaches the program and is recorded as an `r` event;
/// `exit 7` is ssh's exit status, the recording's last event and the
/// listed exit status.
#[test]
fn resize_and_exit_status() {
    let w = World::new();
    let mut t = w.ssh().term(80, 24);
    t.line("stty size; echo sz-$((1+1))");
    let before = t.expect("sz-2");
    assert!(before.contains("24 80"), "initial size not 80x24: {before:?}");

    t.resize(100, 30);
    // The resize travels ssh -> sshd -> recorder asynchronously: wait until
    // the live recording has it before asking the shell.
    let id = w.only_session().id;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let cast = w.export(&id);
        if cast.of("r").any(|e| e.data == "100x30") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no r event 100x30 in the live recording: {:?}",
            cast.events
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.line("stty size; echo sz-$((2+2))");
    let after = t.expect("sz-4");
    assert!(after.contains("30 100"), "the program does not see 100x30: {after:?}");

    t.line("exit 7");
    assert_eq!(t.wait_exit(EXIT_TIMEOUT), 7, "{}", t.transcript());

    let s = w.session(&id);
    assert_eq!(s.exit_status, Some(7));
    assert!(!s.live);
    let cast = w.export(&id);
    assert_eq!(cast.header["term"]["cols"], 80);
    let resizes: Vec<&str> = cast.of("r").map(|e| e.data.as_str()).collect();
    assert_eq!(resizes, vec!["100x30"]);
    let last = cast.last();
    assert_eq!((last.code.as_str(), last.data.as_str()), ("x", "7"));
    assert_eq!(cast.meta()["exit_status"], 7);
}

/// With `record_input = true`, what is typed at an echo-off prompt (a
/// password) is never stored anywhere; a marker says input was withheld;
/// keystrokes typed with echo on are recorded as `i` events.
#[test]
fn password_typed_with_echo_off_is_not_recorded() {
    const SECRET: &str = "hunter2-Zq8-s3cr3t";
    let w = World::builder().shell("record_input = true").build();
    let mut t = w.ssh().term(80, 24);
    // Typed at bash's prompt: readline edits with echo off too, and that is
    // input to record, not to hide.
    t.wait_prompt();
    t.line("echo visible-$((2+3))");
    t.expect("visible-5");
    // The prompt text is assembled by printf so that the echoed command
    // line does not already contain it.
    t.line("read -s -p \"$(printf 'Pass%s: ' word)\" pw; echo; echo len=${#pw}");
    t.expect("Password: ");
    t.line(SECRET);
    t.expect(&format!("len={}", SECRET.len()));
    t.line("echo after-$((3+4))");
    t.expect("after-7");
    t.line("exit");
    assert_eq!(t.wait_exit(EXIT_TIMEOUT), 0, "{}", t.transcript());
    assert!(!t.transcript().contains(SECRET), "the terminal echoed the secret");

    let s = w.only_session();
    let v3 = String::from_utf8(w.export_bytes(&s.id, &[])).unwrap();
    let v2 = String::from_utf8(w.export_bytes(&s.id, &["--format", "v2"])).unwrap();
    let raw = w.export_raw(&s.id);
    assert!(!v3.contains(SECRET), "the secret is in the v3 export");
    assert!(!v2.contains(SECRET), "the secret is in the v2 export");
    assert!(
        !String::from_utf8_lossy(&raw).contains(SECRET),
        "the secret is in the raw export"
    );

    let cast = w.export(&s.id);
    assert_eq!(cast.meta()["input_recorded"], true);
    let input = cast.input();
    assert!(!input.contains(SECRET), "the secret is in the i events");
    for typed in ["echo visible-$((2+3))", "echo after-$((3+4))", "exit"] {
        assert!(
            input.contains(typed),
            "keystrokes {typed:?} missing from the i events: {input:?}"
        );
    }
    assert!(
        cast.markers()
            .iter()
            .any(|m| m.contains("input not recorded while terminal echo is off")),
        "no redaction marker: {:?}",
        cast.markers()
    );
}
