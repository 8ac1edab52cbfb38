//! File transfers through the recorder: scp (SFTP protocol and legacy),
//! sftp and rsync, 64 MiB each way. The file must arrive intact and the
//! recording must stay tiny: a summary marker (byte counts and SHA-256 of
//! each direction) instead of the payload.

use shelltrail_tests::{Cast, SessionRow, TIMEOUT, World, proc, pseudo_random_bytes, sha256_hex};
use std::path::Path;
use std::sync::OnceLock;

const SIZE: usize = 64 << 20;
/// What a transfer session may cost the spool: header, marker, exit.
const MAX_STORED: u64 = 256 << 10;

/// The 64 MiB test file's content and SHA-256, made once per test process.
fn payload() -> &'static (Vec<u8>, String) {
    static DATA: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    DATA.get_or_init(|| {
        let d = pseudo_random_bytes(SIZE, 0x5eed_1e55);
        let h = sha256_hex(&d);
        (d, h)
    })
}

/// The transfer summary a recording holds.
#[derive(Debug)]
struct Summary {
    program: String,
    from_client: u64,
    sha_from_client: String,
    to_client: u64,
    sha_to_client: String,
    marker: String,
}

/// Parses "shelltrail: PROGRAM transfer, payload not recorded: N bytes from
/// client (sha256 X), M bytes to client (sha256 Y)".
fn summary(cast: &Cast) -> Summary {
    let markers: Vec<&str> = cast
        .markers()
        .into_iter()
        .filter(|m| m.contains("payload not recorded"))
        .collect();
    assert_eq!(markers.len(), 1, "expected one transfer marker: {:?}", cast.events);
    let m = markers[0];
    let parse = || -> Option<Summary> {
        let rest = m.strip_prefix("shelltrail: ")?;
        let (program, rest) = rest.split_once(" transfer, payload not recorded: ")?;
        let (from_client, rest) = rest.split_once(" bytes from client (sha256 ")?;
        let (sha_from_client, rest) = rest.split_once("), ")?;
        let (to_client, rest) = rest.split_once(" bytes to client (sha256 ")?;
        let sha_to_client = rest.strip_suffix(')')?;
        Some(Summary {
            program: program.to_string(),
            from_client: from_client.parse().ok()?,
            sha_from_client: sha_from_client.to_string(),
            to_client: to_client.parse().ok()?,
            sha_to_client: sha_to_client.to_string(),
            marker: m.to_string(),
        })
    };
    parse().unwrap_or_else(|| panic!("unexpected transfer marker {m:?}"))
}

/// The checks every transfer session must pass; returns its summary.
fn check_session(w: &World, s: &SessionRow, program: &str) -> Summary {
    assert_eq!(s.mode, "transfer", "{s:#?}");
    assert!(!s.live, "{s:#?}");
    assert_eq!(s.exit_status, Some(0), "{s:#?}");
    assert_eq!(s.lost_chunks, 0, "{s:#?}");
    assert!(
        s.stored_bytes < MAX_STORED,
        "a transfer session stored {} bytes: the payload was recorded? {s:#?}",
        s.stored_bytes
    );
    let cast = w.export(&s.id);
    assert_eq!(cast.meta()["payload_recorded"], false);
    assert!(cast.output().len() < 1024, "output recorded: {:?}", cast.output());
    let sum = summary(&cast);
    assert_eq!(sum.program, program, "{}", sum.marker);
    for sha in [&sum.sha_from_client, &sum.sha_to_client] {
        assert!(
            sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
            "not a sha256 in {}",
            sum.marker
        );
    }
    assert_eq!((cast.last().code.as_str(), cast.last().data.as_str()), ("x", "0"));
    sum
}

/// Sessions that were not in `before`, in start order.
fn new_sessions(w: &World, before: &[SessionRow]) -> Vec<SessionRow> {
    let mut v: Vec<SessionRow> = w
        .sessions()
        .into_iter()
        .filter(|r| !before.iter().any(|b| b.id == r.id))
        .collect();
    v.sort_by_key(|r| r.start_unix_ms);
    v
}

#[track_caller]
fn assert_same_file(path: &Path) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(got.len(), SIZE, "{} has the wrong size", path.display());
    assert_eq!(sha256_hex(&got), payload().1, "{} differs", path.display());
}

/// A root-owned copy of the payload in the world, for uploads.
fn local_source(w: &World) -> std::path::PathBuf {
    let p = w.path.join("upload-src.bin");
    std::fs::write(&p, &payload().0).unwrap();
    shelltrail_tests::world::set_mode(&p, 0o644);
    p
}

#[test]
fn scp_default_protocol_both_ways() {
    let w = World::new();
    let src = local_source(&w);
    let up = w.files.join("scp-up.bin");
    let mut c = w.scp();
    c.arg(&src).arg(w.remote(&up));
    proc::run_ok(c, TIMEOUT);
    assert_same_file(&up);
    let sessions = new_sessions(&w, &[]);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert_eq!(sessions[0].command, "internal-sftp");
    let sum = check_session(&w, &sessions[0], "sftp-server");
    assert!(sum.from_client > SIZE as u64, "{}", sum.marker);

    let down = w.path.join("scp-down.bin");
    let mut c = w.scp();
    c.arg(w.remote(&up)).arg(&down);
    proc::run_ok(c, TIMEOUT);
    assert_same_file(&down);
    let sessions = new_sessions(&w, &sessions);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    let sum = check_session(&w, &sessions[0], "sftp-server");
    assert!(sum.to_client > SIZE as u64, "{}", sum.marker);
}

/// Legacy scp (`scp -O`): besides the usual checks, the stream hashes are
/// verified exactly, since the legacy protocol's bytes are predictable:
/// `C<mode> <size> <name>\n`, the file, and a NUL.
#[test]
fn scp_legacy_protocol_both_ways() {
    let w = World::new();
    let (data, _) = payload();
    let src = local_source(&w);
    let up = w.files.join("legacy-up.bin");
    let mut c = w.scp();
    c.arg("-O").arg(&src).arg(w.remote(&up));
    proc::run_ok(c, TIMEOUT);
    assert_same_file(&up);
    let sessions = new_sessions(&w, &[]);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert!(sessions[0].command.starts_with("scp "), "{sessions:#?}");
    assert!(sessions[0].command.contains(" -t "), "{sessions:#?}");
    let sum = check_session(&w, &sessions[0], "scp");
    let mut stream = format!("C0644 {SIZE} upload-src.bin\n").into_bytes();
    stream.extend_from_slice(data);
    stream.push(0);
    assert_eq!(sum.from_client, stream.len() as u64, "{}", sum.marker);
    assert_eq!(sum.sha_from_client, sha256_hex(&stream), "{}", sum.marker);

    let down = w.path.join("legacy-down.bin");
    let mut c = w.scp();
    c.arg("-O").arg(w.remote(&up)).arg(&down);
    proc::run_ok(c, TIMEOUT);
    assert_same_file(&down);
    let sessions = new_sessions(&w, &sessions);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert!(sessions[0].command.contains(" -f "), "{sessions:#?}");
    let sum = check_session(&w, &sessions[0], "scp");
    let mut stream = format!("C0644 {SIZE} legacy-up.bin\n").into_bytes();
    stream.extend_from_slice(data);
    stream.push(0);
    assert_eq!(sum.to_client, stream.len() as u64, "{}", sum.marker);
    assert_eq!(sum.sha_to_client, sha256_hex(&stream), "{}", sum.marker);
}

/// sftp in batch mode: one session uploads and downloads.
#[test]
fn sftp_batch_both_ways() {
    let w = World::new();
    let src = local_source(&w);
    let up = w.files.join("sftp-up.bin");
    let down = w.path.join("sftp-down.bin");
    let batch = format!(
        "put {} {}\nget {} {}\n",
        src.display(),
        up.display(),
        up.display(),
        down.display()
    );
    proc::run_ok(w.sftp_batch(&batch), TIMEOUT);
    assert_same_file(&up);
    assert_same_file(&down);
    let s = w.only_session();
    assert_eq!(s.command, "internal-sftp");
    let sum = check_session(&w, &s, "sftp-server");
    assert!(sum.from_client > SIZE as u64, "{}", sum.marker);
    assert!(sum.to_client > SIZE as u64, "{}", sum.marker);
}

#[test]
fn rsync_both_ways() {
    let w = World::new();
    let src = local_source(&w);
    let up = w.files.join("rsync-up.bin");
    let mut c = w.rsync();
    c.arg(&src).arg(w.remote(&up));
    proc::run_ok(c, TIMEOUT);
    assert_same_file(&up);
    let sessions = new_sessions(&w, &[]);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert!(sessions[0].command.starts_with("rsync --server "), "{sessions:#?}");
    let sum = check_session(&w, &sessions[0], "rsync");
    assert!(sum.from_client > SIZE as u64, "{}", sum.marker);

    let down = w.path.join("rsync-down.bin");
    let mut c = w.rsync();
    c.arg(w.remote(&up)).arg(&down);
    proc::run_ok(c, TIMEOUT);
    assert_same_file(&down);
    let sessions = new_sessions(&w, &sessions);
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert!(sessions[0].command.contains("--sender"), "{sessions:#?}");
    let sum = check_session(&w, &sessions[0], "rsync");
    assert!(sum.to_client > SIZE as u64, "{}", sum.marker);
}
