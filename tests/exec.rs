//! Exec sessions (`ssh host CMD`, no terminal): the recorder must be
//! invisible to the program's streams and exact in what it stores.

use base64::Engine as _;
use shelltrail_tests::{World, sha256_hex};

/// stdout and stderr stay separate streams, the exit status passes through,
/// and both streams are recorded.
#[test]
fn stdout_stderr_and_status_pass_through() {
    let w = World::new();
    let out = w.ssh().command("echo out; echo err >&2; exit 3").run();
    assert_eq!(out.stdout, b"out\n", "{out}");
    assert_eq!(out.stderr, b"err\n", "{out}");
    out.assert_code(3);

    let s = w.only_session();
    assert_eq!(s.mode, "exec");
    assert_eq!(s.command, "echo out; echo err >&2; exit 3");
    assert_eq!(s.exit_status, Some(3));
    let cast = w.export(&s.id);
    let text = cast.output();
    assert!(text.contains("out\n") && text.contains("err\n"), "{text:?}");
    assert_eq!((cast.last().code.as_str(), cast.last().data.as_str()), ("x", "3"));
    assert_eq!(cast.meta()["original_command"], "echo out; echo err >&2; exit 3");
}

/// `ssh -n` closes the program's stdin: `cat` ends at once.
#[test]
fn closed_stdin_reaches_the_program() {
    let w = World::new();
    let out = w.ssh().arg("-n").command("cat; echo done").run();
    out.assert_success();
    assert_eq!(out.stdout, b"done\n", "{out}");
    // And stdin that is sent arrives intact and is then closed.
    let out = w.ssh().stdin(b"piped-input\n").command("cat; echo done").run();
    out.assert_success();
    assert_eq!(out.stdout, b"piped-input\ndone\n", "{out}");
}

/// A character split across two writes is stored whole, with no raw-bytes
/// event; invalid UTF-8 is stored as U+FFFD plus a `b` event with the exact bytes.
#[test]
fn utf8_split_across_writes_and_invalid_bytes() {
    let w = World::new();
    let out = w.ssh().command(r"printf '\xe2'; sleep 0.3; printf '\x82\xac\n'").run();
    out.assert_success();
    assert_eq!(out.stdout, "€\n".as_bytes());
    let split = w.only_session();
    let cast = w.export(&split.id);
    assert!(
        cast.of("o").any(|e| e.data.contains('€')),
        "no event holds the whole character: {:?}",
        cast.events
    );
    assert_eq!(cast.of("b").count(), 0, "{:?}", cast.events);
    assert!(!cast.output().contains('\u{fffd}'), "{:?}", cast.events);

    let out = w.ssh().command(r"printf 'bad-\xff-end\n'").run();
    out.assert_success();
    assert_eq!(out.stdout, b"bad-\xff-end\n");
    let id = w
        .sessions()
        .into_iter()
        .find(|r| r.id != split.id)
        .expect("second session")
        .id;
    let cast = w.export(&id);
    let i = cast
        .events
        .iter()
        .position(|e| e.code == "o" && e.data.contains("bad-\u{fffd}-end"))
        .unwrap_or_else(|| panic!("no o event with U+FFFD: {:?}", cast.events));
    let b = &cast.events[i + 1];
    assert_eq!(
        b.code, "b",
        "the o event is not followed by a b event: {:?}",
        cast.events
    );
    assert_eq!(b.time, 0.0);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&b.data)
        .expect("b event data is base64");
    assert_eq!(bytes, b"bad-\xff-end\n");
    assert_eq!(w.export_raw(&id), b"bad-\xff-end\n");
}

/// Random binary output: `export --raw` gives back exactly the bytes the
/// client received, without a terminal and through one.
#[test]
fn binary_output_is_reconstructed_exactly() {
    let w = World::new();
    let file = w.files.join("random.bin");
    let cmd = format!("head -c 200000 /dev/urandom > {f} && cat {f}", f = file.display());
    let out = w.ssh().command(&cmd).run();
    out.assert_success();
    assert_eq!(out.stdout.len(), 200_000);
    assert_eq!(out.stdout, std::fs::read(&file).unwrap());
    let s = w.only_session();
    assert_eq!(s.bytes_out, 200_000);
    let raw = w.export_raw(&s.id);
    assert_eq!(
        (raw.len(), sha256_hex(&raw)),
        (out.stdout.len(), sha256_hex(&out.stdout)),
        "export --raw differs from what ssh received"
    );
    assert!(w.export(&s.id).of("b").count() > 0);

    // Through a PTY (ssh -tt): the line discipline rewrites the bytes
    // (ONLCR), and the recording must hold what was actually sent.
    let out = w
        .ssh()
        .arg("-tt")
        .stdin(b"")
        .command(&format!("cat {}", file.display()))
        .run();
    out.assert_success();
    assert!(out.stdout.len() >= 200_000, "{} bytes", out.stdout.len());
    let id = w
        .sessions()
        .into_iter()
        .find(|r| r.id != s.id)
        .expect("second session")
        .id;
    assert_eq!(w.session(&id).mode, "pty");
    let raw = w.export_raw(&id);
    assert_eq!(
        (raw.len(), sha256_hex(&raw)),
        (out.stdout.len(), sha256_hex(&out.stdout)),
        "export --raw of the PTY session differs from what ssh received"
    );
}
