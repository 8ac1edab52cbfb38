//! The shipping path: host agent → collector over gRPC with mutual TLS,
//! through a fault-injecting proxy.
//!
//! Each session a scenario records is checked the same way at the end
//! ([`ShipWorld::assert_shipped`]): it is at the collector, ended, complete;
//! `verify` passes there (hash chain intact, no gap, no duplicate); and
//! `export --raw` from the collector is exactly what the session's program
//! wrote (computed by the test). The fault scenarios then check that the
//! host's spool lists nothing the collector lacks
//! ([`ShipWorld::assert_spool_shipped`]); the spool-cap scenario checks
//! that shipped segments are deleted instead, and that the listing stays
//! true after deletion.
//!
//! Sessions run through `shelltrail-shell -c` without sshd, so these tests
//! need neither root nor sshd. The stalled/black-holed link takes about 20 s
//! (HTTP/2 keepalive: 10 s interval, 10 s timeout); the rest run beside it.

use shelltrail_proto::v1::{
    AgentHello, ChunkData, Close, ListSessionsRequest, SessionEnd, SessionMeta, SessionStart, ShipRequest,
    ingest_client::IngestClient, query_client::QueryClient, ship_request, ship_response,
};
use shelltrail_tests::collector::assert_bytes_eq;
use shelltrail_tests::proc::run;
use shelltrail_tests::{Pki, SHIP_TIMEOUT, Script, ShipWorld, TIMEOUT, XorShift, poll_until, wait_until};
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits until the collector lists the session of `script` (from `host`'s
/// spool) with at least `chunks` chunks: shipping is under way.
#[track_caller]
fn wait_shipping(w: &ShipWorld, host: &shelltrail_tests::Host, script: &Script, chunks: usize) -> String {
    let id = wait_until("the session in the spool", Duration::from_secs(20), || {
        host.sessions().into_iter().find(|r| script.is(r)).map(|r| r.id)
    });
    w.wait_remote(
        &format!("session {id} with {chunks}+ chunks"),
        Duration::from_secs(30),
        |r| r.id == id && r.chunks >= chunks,
    );
    id
}

/// (a) The collector unreachable (connections refused) for the whole of
/// several sessions; then back: every session arrives, whole.
#[test]
fn collector_down_for_whole_sessions_then_back() {
    let w = ShipWorld::new(0xa);
    let h = w.host("host-a").build();
    w.proxy.refuse();
    let scripts: Vec<Script> = (1..=3).map(|i| Script::new(&format!("down-{i}"), 200 * i)).collect();
    let ids: Vec<String> = scripts.iter().map(|s| h.run(s)).collect();
    // Long enough for several failed attempts: the agent's backoff has grown.
    std::thread::sleep(Duration::from_secs(2));
    // Nothing can have reached the collector.
    let early = w.remote_sessions();
    assert!(early.is_empty(), "sessions reached a refused collector: {early:#?}");

    w.proxy.pass();
    for (s, id) in scripts.iter().zip(&ids) {
        w.assert_shipped(&h, id, &s.expected(), SHIP_TIMEOUT);
    }
    let listed = w.remote_sessions();
    assert_eq!(listed.len(), 3);
    // The collector options may follow the subcommand too.
    let out = shelltrail_tests::proc::run_ok(w.remote_after(&["sessions", "--json"]), TIMEOUT);
    let after: Vec<shelltrail_tests::SessionRow> = serde_json::from_slice(&out.stdout).expect("sessions --json");
    assert_eq!(
        after.iter().map(|r| &r.id).collect::<Vec<_>>(),
        listed.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    w.assert_spool_shipped(&h);
    assert!(
        h.agent_log_text().contains("shipping interrupted"),
        "the agent never noticed the refused collector"
    );
}

/// (b) The collector killed with SIGKILL while a session streams, then
/// restarted on the same port and data directory: the session is complete.
#[test]
fn collector_killed_mid_stream_and_restarted() {
    let w = ShipWorld::new(0xb);
    let h = w.host("host-a").build();
    let s = Script::new("collector-crash", 300).paced(10, 100);
    let session = h.spawn(&s);
    let id = wait_shipping(&w, &h, &s, 3);
    assert!(
        h.session_of(&s).live,
        "the session ended before the collector could be killed mid-stream"
    );
    w.collector.kill();
    std::thread::sleep(Duration::from_millis(700));
    w.collector.start();
    assert_eq!(h.finish(session, &s), id);
    w.assert_shipped(&h, &id, &s.expected(), SHIP_TIMEOUT);
    w.assert_spool_shipped(&h);
}

/// (c) The agent killed with SIGKILL mid-session and restarted: the recorder
/// resends to the agent, the agent ships again, and the collector ends up
/// with the whole session once. The segment the agent wrote before the crash
/// is deleted once the collector has all of it.
#[test]
fn agent_killed_mid_session_and_restarted() {
    let w = ShipWorld::new(0xc);
    let h = w.host("host-a").build();
    let s = Script::new("agent-crash", 300).paced(10, 100);
    let session = h.spawn(&s);
    let id = wait_shipping(&w, &h, &s, 3);
    assert!(
        h.session_of(&s).live,
        "the session ended before the agent could be killed mid-session"
    );
    h.kill_agent();
    std::thread::sleep(Duration::from_millis(700));
    h.start_agent();
    assert_eq!(h.finish(session, &s), id);
    w.assert_shipped(&h, &id, &s.expected(), SHIP_TIMEOUT);
    assert!(
        h.agent_log_text().contains("session resumed"),
        "the recorder did not resume its session"
    );
    // A restarted agent writes a new segment; the old one is fully shipped.
    let segs = poll_until(Duration::from_secs(20), || {
        let segs = h.segments();
        (segs.len() == 1).then_some(segs)
    });
    assert!(
        segs.is_some(),
        "shipped segments were not deleted from the spool: {:?}",
        h.segments()
    );
    w.assert_spool_shipped(&h);
}

/// (d) The link cut at random points every 30-50 ms, 100 times and until
/// the proxy has severed at least 25 of the agent's connections, during a
/// busy session: the session arrives complete, each chunk exactly once.
#[test]
fn link_cut_a_hundred_times_during_a_busy_session() {
    let w = ShipWorld::new(0xd);
    // Many small chunks: every cut lands among chunks in flight.
    let h = w.host("host-a").shell("chunk_interval_ms = 20").build();
    let s = Script::new("cuts", 30_000).paced(200, 40);
    let session = h.spawn(&s);
    let id = wait_shipping(&w, &h, &s, 1);

    let mut rng = XorShift::new(0xd0d0);
    let started = Instant::now();
    let mut commands = 0;
    while commands < 100 || w.proxy.stats().cut < 25 {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "in 40 s the agent made only {} connections ({:?}): does it reconnect promptly after a broken stream?",
            w.proxy.stats().accepted,
            w.proxy.stats()
        );
        std::thread::sleep(Duration::from_millis(rng.range(30, 50)));
        if rng.next_u64().is_multiple_of(2) {
            w.proxy.cut_all();
        } else {
            w.proxy.cut_after(64 << 10);
        }
        commands += 1;
    }
    let stats = w.proxy.stats();
    eprintln!(
        "link_cut: {commands} cut commands in {:.1} s; proxy {stats:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        stats.cut_mid_stream >= 10,
        "too few cuts hit a shipping stream: {stats:?}"
    );

    assert_eq!(h.finish(session, &s), id);
    let r = w.assert_shipped(&h, &id, &s.expected(), SHIP_TIMEOUT);
    assert!(r.chunks > 100, "expected a busy session of many chunks: {r:#?}");
    w.assert_spool_shipped(&h);
}

/// (e) The link stalls (nothing forwarded, nothing closed) and later turns
/// into a black hole (bytes swallowed, nothing answered) mid-session; then
/// passes again. The agent must notice the dead connection on its own
/// (HTTP/2 keepalive) and ship the rest over a new one.
#[test]
fn stalled_and_blackholed_link_is_noticed_and_recovered() {
    let w = ShipWorld::new(0xe);
    let h = w.host("host-a").build();
    let s = Script::new("dead-link", 700).paced(10, 100);
    let session = h.spawn(&s);
    let id = wait_shipping(&w, &h, &s, 3);

    w.proxy.stall();
    std::thread::sleep(Duration::from_secs(2));
    w.proxy.pass();
    // A stall that ends in time costs nothing: the same connection goes on.
    let after_stall = w.wait_remote("shipping after the stall", Duration::from_secs(20), |r| {
        r.id == id && r.chunks >= 25
    });
    let accepted_before = w.proxy.stats().accepted;

    w.proxy.blackhole();
    let holed = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    w.proxy.pass();
    assert_eq!(h.finish(session, &s), id);
    w.assert_shipped(&h, &id, &s.expected(), Duration::from_secs(120));
    eprintln!(
        "dead_link: stall survived ({} chunks by then); complete {:.1} s after the black hole began; proxy {:?}",
        after_stall.chunks,
        holed.elapsed().as_secs_f64(),
        w.proxy.stats()
    );
    assert!(
        w.proxy.stats().accepted > accepted_before,
        "the agent never opened a new connection after the black hole"
    );
    w.assert_spool_shipped(&h);
}

/// (f) The spool's cap reached while the collector is away: with the default
/// `deny` policy a new session is refused, naming the full spool. Once the
/// collector is back, shipped segments are deleted, the spool drains below
/// the cap, and sessions are accepted again.
///
/// The cap holds on every chunk, so no session can take the spool past it
/// (see `quotas` for one that tries): the spool is filled to within one
/// chunk (`shell.chunk_bytes`, 512 KiB) of it by a session that fits, which
/// is when new sessions are refused.
#[test]
fn spool_cap_refuses_sessions_until_shipping_drains_it() {
    const CAP: u64 = 2 << 20;
    let w = ShipWorld::new(0xf);
    let h = w
        .host("host-a")
        .agent_setting(&format!("spool_max_bytes = {CAP}"))
        .agent_setting("segment_bytes = \"1MiB\"")
        .build();
    w.proxy.refuse();
    // About 1.8 MiB in the spool: within a chunk of the cap, and below it.
    let big = random_text_session(&w, "spool-filler", (7 << 20) / 4);
    let big_id = h.run(&big);
    assert!(
        (CAP - (512 << 10)..CAP).contains(&h.spool_bytes()),
        "the spool is not within a chunk of its cap: {} bytes",
        h.spool_bytes()
    );
    let marker = w.path.join("ran");
    let out = run(
        h.recorder(&format!(": refused; touch {}; echo should-not-run", marker.display())),
        TIMEOUT,
    );
    out.assert_code(1);
    assert!(out.stdout.is_empty(), "{out}");
    assert!(!marker.exists(), "the refused session's command ran");
    assert!(
        out.stderr_str().contains("spool is full"),
        "the refusal does not name the full spool: {out}"
    );

    w.proxy.pass();
    w.assert_shipped(&h, &big_id, &big.expected(), SHIP_TIMEOUT);
    // Room for a chunk again, by deleting shipped segments.
    let drained = poll_until(Duration::from_secs(30), || {
        (h.spool_bytes() < CAP - (512 << 10) && h.agent_log_text().contains("deleted fully shipped spool segments"))
            .then_some(())
    });
    assert!(
        drained.is_some(),
        "the spool did not drain after shipping: {} bytes in {:?}",
        h.spool_bytes(),
        h.segments()
    );

    let again = Script::new("after-drain", 100);
    let id = h.run(&again);
    w.assert_shipped(&h, &id, &again.expected(), SHIP_TIMEOUT);
    // What the spool still lists of the big session is checked (and fails)
    // in spool_listing_stays_true_after_shipped_segments_are_deleted.
}

/// A session whose recording takes about 3 MiB in the spool (base64 of
/// random bytes barely compresses): it spans several 1 MiB segments.
fn three_mib_session(w: &ShipWorld, tag: &str) -> Script {
    random_text_session(w, tag, 3 << 20)
}

/// A session printing `random` random bytes as base64 lines: it takes about
/// as many bytes in the spool.
fn random_text_session(w: &ShipWorld, tag: &str, random: usize) -> Script {
    let blob: Vec<u8> = shelltrail_tests::pseudo_random_bytes(random, 0xf00d)
        .chunks(57)
        .flat_map(|c| {
            use base64::Engine;
            let mut line = base64::engine::general_purpose::STANDARD.encode(c).into_bytes();
            line.push(b'\n');
            line
        })
        .collect();
    Script::cat(tag, &w.path.join(format!("{tag}.txt")), blob)
}

/// Deleting shipped segments leaves the spool telling the truth about what
/// remains: a session that spanned several segments and ended with exit 0
/// is listed as ended (or not at all, once wholly shipped), without
/// warnings, and an agent restarted on that spool does not declare its
/// recorder vanished.
#[test]
fn spool_listing_stays_true_after_shipped_segments_are_deleted() {
    let w = ShipWorld::new(0x5);
    let h = w.host("host-a").agent_setting("segment_bytes = \"1MiB\"").build();
    let big = three_mib_session(&w, "spanning");
    let id = h.run(&big);
    w.assert_shipped(&h, &id, &big.expected(), SHIP_TIMEOUT);
    wait_until("a shipped segment to be deleted", Duration::from_secs(20), || {
        h.agent_log_text()
            .contains("deleted fully shipped spool segments")
            .then_some(())
    });
    let out = shelltrail_tests::proc::run_ok(h.cli(&["sessions", "--json"]), TIMEOUT);
    assert!(
        out.stderr.is_empty(),
        "the spool reads as damaged after shipping: {out}"
    );
    w.assert_spool_shipped(&h);

    // An agent restarted on this spool must agree (its sweep runs every 5 s).
    h.kill_agent();
    h.start_agent();
    std::thread::sleep(Duration::from_secs(6));
    let log = h.agent_log_text();
    assert!(
        !log.contains("spool recovery:"),
        "the restarted agent found damage:\n{log}"
    );
    assert!(
        !log.contains("vanished"),
        "the restarted agent declared the ended session lost:\n{log}"
    );
    // Fully shipped, the session may be gone from the spool altogether; if
    // it is still listed, it is as it ended.
    for s in h.sessions().iter().filter(|r| big.is(r)) {
        assert_eq!(
            (s.exit_status, s.end_cause.as_deref()),
            (Some(0), Some("recorder")),
            "{s:#?}"
        );
    }
    w.assert_shipped(&h, &id, &big.expected(), SHIP_TIMEOUT);
}

// ----- security -----

/// A raw gRPC channel to the collector: the CLI cannot connect without a
/// client identity, so this is how a client without one is tried.
fn channel(
    rt: &tokio::runtime::Runtime,
    w: &ShipWorld,
    identity: Option<(&Path, &Path)>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(w.pki.ca()).expect("reading the CA");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        let (c, k) = (std::fs::read(cert).expect("cert"), std::fs::read(key).expect("key"));
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let ep = Endpoint::from_shared(w.collector.url())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), ep.connect()).await })
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("{e:?}"))
}

fn ship_msg(body: ship_request::Body) -> ShipRequest {
    ShipRequest { body: Some(body) }
}

/// Opens an Ingest stream, sends `msgs` after the hello, and collects the
/// responses for a moment. `Err` when the stream is refused or fails.
fn ship_raw(
    rt: &tokio::runtime::Runtime,
    ch: tonic::transport::Channel,
    msgs: Vec<ShipRequest>,
) -> Result<Vec<ship_response::Body>, tonic::Status> {
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(ship_msg(ship_request::Body::Hello(AgentHello {
            agent_version: "test".into(),
            ..Default::default()
        })))
        .await
        .expect("queueing the hello");
        for m in msgs {
            tx.send(m).await.expect("queueing a message");
        }
        let mut client = IngestClient::new(ch);
        let call = tokio::time::timeout(
            Duration::from_secs(20),
            client.ship(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("test: no response to Ship"))?;
        let mut inbound = call?.into_inner();
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(2), inbound.message()).await {
                Err(_) | Ok(Ok(None)) => break,
                Ok(Ok(Some(m))) => got.extend(m.body),
                Ok(Err(status)) => return Err(status),
            }
        }
        drop(tx);
        Ok(got)
    })
}

/// (g) Who may ship and read: an agent with a certificate from another CA,
/// a client without a certificate, and a host shipping another host's
/// session (a replay of host-a's spool under host-b's identity, and forged
/// chunks and end) are all refused, and host-a's session stays intact; a
/// host's certificate cannot read; the CLI with an operator certificate from
/// another CA fails with a clear error.
#[test]
fn only_certified_hosts_ship_and_only_their_own_sessions() {
    let w = ShipWorld::new(0x9);
    let a = w.host("host-a").build();
    let sa = Script::new("sec-a", 50);
    let id_a = a.run(&sa);
    w.assert_shipped(&a, &id_a, &sa.expected(), SHIP_TIMEOUT);
    let intact = |why: &str| {
        let all = w.remote_sessions();
        assert_eq!(all.len(), 1, "{why}: the collector holds other sessions: {all:#?}");
        w.assert_shipped(&a, &id_a, &sa.expected(), SHIP_TIMEOUT);
    };

    // An agent whose certificate (naming host-a, even) comes from another CA.
    let evil = Pki::init(&w.path.join("evil-pki"), "another CA");
    let (ec, ek) = evil.issue("host-a", "host", &["host-a"]);
    let x = w.host("impostor").identity(&ec, &ek).build();
    let sx = Script::new("sec-x", 20);
    x.run(&sx);
    wait_until("the impostor's shipping to fail twice", Duration::from_secs(20), || {
        (x.agent_log_text().matches("shipping interrupted").count() >= 2).then_some(())
    });
    intact("after the impostor agent");
    // The collector says so, with where the connection came from.
    wait_until(
        "the collector to log the refused handshakes",
        Duration::from_secs(10),
        || {
            let log = w.collector.log_text();
            log.lines()
                .any(|l| l.contains("refused a TLS connection") && l.contains("127.0.0.1") && l.contains("certificate"))
                .then_some(())
        },
    );
    drop(x);

    // No client certificate at all: neither Ingest nor Query answers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let forged = SessionStart {
        meta: Some(SessionMeta {
            session_id: "0190a0a0-0000-7000-8000-000000000001".into(),
            host: "host-a".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    match channel(&rt, &w, None) {
        Err(e) => eprintln!("no certificate: refused at connect: {e}"),
        Ok(ch) => {
            let shipped = ship_raw(
                &rt,
                ch.clone(),
                vec![ship_msg(ship_request::Body::Start(forged.clone()))],
            );
            assert!(
                shipped.is_err(),
                "Ingest answered a client without a certificate: {shipped:?}"
            );
            let listed = rt.block_on(QueryClient::new(ch).list_sessions(ListSessionsRequest::default()));
            assert!(
                listed.is_err(),
                "Query answered a client without a certificate: {listed:?}"
            );
        }
    }
    intact("after the client without a certificate");
    let refused = w.collector.log_text().matches("refused a TLS connection").count();
    assert!(
        refused >= 3,
        "the refused handshakes are not all in the collector's log ({refused})"
    );

    // host-a's spool replayed by an agent certified as host-b: refused.
    // Replayed as it stood before the collector confirmed the session (the
    // copy leaves out that it was shipped, or host-b would not send it).
    a.kill_agent();
    let b = w.host("host-b").spool_copy_of(&a).agent_down().build();
    forget_shipping(&b.spool);
    b.start_agent();
    wait_until("host-b's agent to be refused", Duration::from_secs(30), || {
        let log = b.agent_log_text();
        (log.contains("rejected the session") && log.contains(&id_a)).then_some(())
    });
    intact("after host-b replayed host-a's spool");

    // host-b forging a chunk and an end for host-a's session: refused, and
    // host-a's session is neither altered nor quarantined by it.
    let (bc, bk) = w.pki.files("host-b");
    let forgeries = [
        ship_request::Body::Chunk(ChunkData {
            session_id: id_a.clone(),
            seq: 0,
            data: b"not a chunk".to_vec(),
        }),
        ship_request::Body::End(SessionEnd {
            session_id: id_a.clone(),
            close: Some(Close::default()),
            cause: "recorder".into(),
            closed_unix_ms: 1,
            ..Default::default()
        }),
    ];
    // One stream each: the collector stops a session's batch at its first refusal.
    for forged in forgeries {
        let ch = channel(&rt, &w, Some((&bc, &bk))).expect("host-b connects");
        let got = ship_raw(&rt, ch, vec![ship_msg(forged.clone())]).expect("host-b's stream");
        let rejected = got.iter().any(|b| {
            matches!(b, ship_response::Body::Rejected(r) if r.session_id == id_a && r.reason.contains("another host"))
        });
        assert!(rejected, "host-b's forged {forged:?} was not rejected: {got:?}");
        assert!(
            !got.iter().any(|b| matches!(b, ship_response::Body::Committed(_))),
            "{got:?}"
        );
    }
    intact("after host-b forged a chunk and an end");

    // A host's certificate ships but never reads.
    let (ac, ak) = w.pki.files("host-a");
    let out = run(w.remote_as(&ac, &ak, &["sessions"]), TIMEOUT);
    out.assert_code(1);
    assert!(out.stdout.is_empty(), "a host read the collector: {out}");
    assert!(out.stderr_str().contains("operator"), "{out}");

    // The CLI with an operator certificate from another CA.
    let (oc, ok) = evil.issue("operator", "operator", &["operator"]);
    let out = run(w.remote_as(&oc, &ok, &["sessions"]), TIMEOUT);
    out.assert_code(1);
    let err = out.stderr_str();
    assert!(
        err.contains("certificate") && err.contains(&w.collector.url()),
        "the refusal does not explain itself: {out}"
    );
    assert!(out.stdout.is_empty(), "{out}");
    eprintln!("wrong-CA operator: {}", err.trim());
    assert_bytes_eq(
        &w.remote_export_raw(&id_a),
        &sa.expected(),
        "host-a's session at the end",
    );
}

/// A client certificate made with openssl from the world's CA, as a fleet's
/// certificates were before they had roles: the name, nothing else.
fn certificate_without_role(w: &ShipWorld, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (
        w.path.join(format!("{name}-old.pem")),
        w.path.join(format!("{name}-old.key")),
    );
    let csr = w.path.join(format!("{name}-old.csr"));
    let mut req = std::process::Command::new("openssl");
    req.args([
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ])
    .arg("-keyout")
    .arg(&key)
    .args([
        "-subj",
        &format!("/CN={name}"),
        "-addext",
        &format!("subjectAltName=DNS:{name}"),
    ])
    .arg("-out")
    .arg(&csr);
    shelltrail_tests::proc::run_ok(req, TIMEOUT);
    let mut sign = std::process::Command::new("openssl");
    sign.args(["x509", "-req", "-days", "1", "-copy_extensions", "copy", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(w.pki.ca())
        .arg("-CAkey")
        .arg(w.pki.dir.join("ca.key"))
        .arg("-out")
        .arg(&cert);
    shelltrail_tests::proc::run_ok(sign, TIMEOUT);
    shelltrail_tests::world::set_mode(&key, 0o600);
    (cert, key)
}

/// (h) Roles: every certificate comes from the one CA, and its role, not its
/// name, decides what it may do. An agent shipping with the operator's
/// certificate is refused (its session stays in its spool), and so is one
/// with a certificate from before roles, told to reissue with --role; a
/// host certificate named like the listed operator cannot read. Reissued
/// with `--role host`, the old host ships what it kept.
#[test]
fn hosts_ship_and_operators_read_never_the_other_way_round() {
    let w = ShipWorld::new(0xa);

    // The operator's certificate in an agent's [ship] table.
    let x = w
        .host("op-agent")
        .identity(&w.operator.0, &w.operator.1)
        .direct()
        .build();
    let sx = Script::new("role-x", 10);
    let id_x = x.run(&sx);
    wait_until(
        "the agent with an operator's certificate to be refused twice",
        Duration::from_secs(30),
        || (x.agent_log_text().matches("has the operator role").count() >= 2).then_some(()),
    );
    assert!(
        w.collector
            .log_text()
            .contains("Ingest (shipping sessions) takes host certificates only"),
        "{}",
        w.collector.log_text()
    );
    assert!(w.remote_sessions().is_empty(), "{:#?}", w.remote_sessions());
    assert!(
        x.sessions().iter().any(|r| r.id == id_x),
        "the refused session left the spool"
    );
    drop(x);

    // A host certificate whose name is the listed operator's.
    let (hc, hk) = w.pki.issue("host-named-operator", "host", &["operator"]);
    let out = run(w.remote_as(&hc, &hk, &["sessions"]), TIMEOUT);
    out.assert_code(1);
    assert!(out.stdout.is_empty(), "a host certificate read the collector: {out}");
    assert!(out.stderr_str().contains("has the host role"), "{out}");

    // A certificate from before roles: neither ships nor reads, and says how to fix it.
    let (oc, ok) = certificate_without_role(&w, "old-host");
    let out = run(w.remote_as(&oc, &ok, &["sessions"]), TIMEOUT);
    out.assert_code(1);
    assert!(out.stderr_str().contains("--role operator"), "{out}");
    let old = w.host("old-host").identity(&oc, &ok).direct().build();
    let so = Script::new("role-old", 10);
    let id_old = old.run(&so);
    wait_until(
        "the agent with a certificate without role to be refused",
        Duration::from_secs(30),
        || old.agent_log_text().contains("--role host").then_some(()),
    );
    assert!(w.remote_sessions().is_empty(), "{:#?}", w.remote_sessions());

    // The migration: the same files, reissued with a role; the agent restarted.
    old.kill_agent();
    let (nc, nk) = w.pki.issue("old-host-reissued", "host", &["old-host"]);
    std::fs::copy(&nc, &oc).expect("replacing the certificate");
    std::fs::copy(&nk, &ok).expect("replacing the key");
    old.start_agent();
    w.assert_shipped(&old, &id_old, &so.expected(), SHIP_TIMEOUT);
}

/// Rewrites a spool as one segment holding each session's start, chunks
/// and end: what it held before the collector confirmed anything.
fn forget_shipping(dir: &std::path::Path) {
    use shelltrail::agent::spool;
    let index = spool::scan(dir, false).expect("reading the spool");
    let mut bodies = Vec::new();
    for (id, s) in &index.sessions {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        bodies.push(spool::open_body(&s.open));
        for c in &s.chunks {
            let data = spool::read_chunk(dir, c.loc).expect("a spooled chunk");
            let hash = c.hash.expect("a chunk record with its hash");
            bodies.push(spool::chunk_body(&uuid, c.seq, &hash, &data));
        }
        if let Some(close) = &s.close {
            bodies.push(spool::close_body(close));
        }
    }
    for seg in spool::segments(dir).expect("listing the spool") {
        std::fs::remove_file(spool::segment_path(dir, seg)).expect("removing a segment");
    }
    let stats = std::sync::Arc::new(spool::Stats::default());
    let mut w = spool::Writer::create(dir, 0, 64 << 20, stats).expect("a spool writer");
    w.write_now(bodies).expect("writing the spool");
}
