//! The collector over real mutual TLS on loopback, with certificates made
//! here: a CA, a server certificate for localhost/127.0.0.1, client
//! certificates with the host role for host-a and host-b, one with the
//! operator role, and one from another CA.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Recording, end_msg, recording, start_msg};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use shelltrail_collector::{
    ClientTlsFiles, CollectorConfig, IdentityError, MAX_MESSAGE_BYTES, Role, TlsFiles, connect, host_from_certificate,
    ingest_client, query_client, serve_on,
};
use shelltrail_proto::v1::ingest_client::IngestClient;
use shelltrail_proto::v1::{
    AgentHello, ChunkData, GetSessionRequest, HostFacts, ListSessionsRequest, ReadChunksRequest, ShipRequest,
    ShipResponse, list_sessions_request, ship_request, ship_response,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status, Streaming};

const WAIT: Duration = Duration::from_secs(15);

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate signed by `ca`: (certificate PEM, key PEM, DER). `roles`
/// go in as `shelltrail:role:` URIs, as `shelltrail pki issue --role` puts them.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    cn: &str,
    eku: ExtendedKeyUsagePurpose,
    roles: &[&str],
) -> (String, String, Vec<u8>) {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    for r in roles {
        let uri = format!("{}{r}", shelltrail_collector::ROLE_URI_PREFIX);
        p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
    }
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// Every file the tests need, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    server: TlsFiles,
    host_a: ClientTlsFiles,
    host_b: ClientTlsFiles,
    /// The operator role, named "operator" (listed in `operators`).
    operator: ClientTlsFiles,
    /// Names host-a, but signed by another CA.
    rogue: ClientTlsFiles,
    ca_pem: String,
    /// The CA, to issue more.
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// Writes a PEM file readable by its owner only, as keys must be.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = new_ca("shelltrail test CA");
    let other_ca = new_ca("some other CA");
    let ca_path = write(d, "ca.pem", &ca.pem());
    let (cert, key, _) = leaf(
        &ca,
        &["localhost", "127.0.0.1"],
        "collector",
        ExtendedKeyUsagePurpose::ServerAuth,
        &[],
    );
    let server = TlsFiles {
        cert: write(d, "server.pem", &cert),
        key: write(d, "server.key", &key),
        client_ca: ca_path,
    };
    Pki {
        host_a: client(d, "host-a", &ca, "host-a", &["host"]),
        host_b: client(d, "host-b", &ca, "host-b", &["host"]),
        operator: client(d, "operator", &ca, "operator", &["operator"]),
        rogue: client(d, "host-a", &other_ca, "rogue", &["host"]),
        server,
        ca_pem: ca.pem(),
        ca,
        dir,
    }
}

/// A client certificate named `name` with `roles`, signed by `issuer`, as
/// `<file>.pem` and `<file>.key` in `dir`.
fn client(
    dir: &Path,
    name: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    file: &str,
    roles: &[&str],
) -> ClientTlsFiles {
    let (cert, key, _) = leaf(issuer, &[name], name, ExtendedKeyUsagePurpose::ClientAuth, roles);
    ClientTlsFiles {
        ca: dir.join("ca.pem"),
        cert: write(dir, &format!("{file}.pem"), &cert),
        key: write(dir, &format!("{file}.key"), &key),
        domain: Some("localhost".into()),
    }
}

struct Running {
    addr: SocketAddr,
    data: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn session_dir(&self, host: &str, id: &str) -> PathBuf {
        self.data.join("sessions").join(host).join(id)
    }

    async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Stops the collector and hands back its data directory.
    async fn stop_keeping_data(mut self) -> (tempfile::TempDir, PathBuf) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.task).await.unwrap().unwrap().unwrap();
        (self._dir, self.data)
    }
}

async fn collector(tls: Option<&TlsFiles>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    collector_at(tls, dir, data).await
}

/// A collector on the data directory `data` (inside `dir`, kept alive).
async fn collector_at(tls: Option<&TlsFiles>, dir: tempfile::TempDir, data: PathBuf) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = CollectorConfig {
        listen: addr,
        data_dir: data.clone(),
        tls: tls.cloned(),
        insecure: tls.is_none(),
        operators: vec!["operator".into()],
        roles: Default::default(),
        denied: vec![],
        compact_level: 3,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(cfg, listener, async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        data,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

async fn channel(server: &Running, files: &ClientTlsFiles) -> Channel {
    connect(&server.url(), Some(files)).await.expect("connect")
}

fn hello(hostname: &str) -> ShipRequest {
    ShipRequest {
        body: Some(ship_request::Body::Hello(AgentHello {
            agent_version: "test".into(),
            facts: Some(HostFacts {
                hostname: hostname.into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// One agent's Ship stream.
struct Agent {
    tx: mpsc::Sender<ShipRequest>,
    rx: Streaming<ShipResponse>,
    /// The host the collector says this stream writes for.
    host: String,
}

impl Agent {
    async fn open(client: IngestClient<Channel>, claimed_hostname: &str) -> Result<Agent, Status> {
        let (tx, rx) = mpsc::channel(256);
        tx.send(hello(claimed_hostname)).await.unwrap();
        let mut client = client;
        let mut responses = client.ship(ReceiverStream::new(rx)).await?.into_inner();
        let first = tokio::time::timeout(WAIT, responses.message()).await.unwrap()?;
        let Some(ShipResponse {
            body: Some(ship_response::Body::Hello(h)),
        }) = first
        else {
            panic!("expected CollectorHello, got {first:?}");
        };
        Ok(Agent {
            tx,
            rx: responses,
            host: h.host,
        })
    }

    async fn send(&self, body: ship_request::Body) {
        self.tx.send(ShipRequest { body: Some(body) }).await.unwrap();
    }

    async fn start(&self, rec: &Recording, user: &str) {
        self.send(ship_request::Body::Start(start_msg(&rec.id, "claimed", user, 1_000)))
            .await;
    }

    async fn chunks(&self, rec: &Recording, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            let c = &rec.chunks[s as usize];
            self.send(ship_request::Body::Chunk(ChunkData {
                session_id: rec.id.clone(),
                seq: c.seq,
                data: c.bytes.clone(),
            }))
            .await;
        }
    }

    async fn next(&mut self) -> Result<Option<ship_response::Body>, Status> {
        let m = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("collector answered in time")?;
        Ok(m.map(|m| m.body.expect("a response body")))
    }

    async fn recv(&mut self) -> ship_response::Body {
        self.next().await.expect("stream ok").expect("stream open")
    }

    /// Waits for Committed through `seq` (batching may commit in steps).
    async fn committed(&mut self, id: &str, seq: u64, ended: bool) {
        loop {
            match self.recv().await {
                ship_response::Body::Committed(c) if c.session_id == id => {
                    if c.through_seq == seq && c.ended == ended {
                        return;
                    }
                    assert!(c.through_seq <= seq && !c.ended, "unexpected {c:?} waiting for {seq}");
                }
                ship_response::Body::Rejected(r) => panic!("rejected: {r:?}"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn position(&mut self, id: &str) -> (u64, bool) {
        match self.recv().await {
            ship_response::Body::Position(p) if p.session_id == id => (p.next_seq, p.ended),
            other => panic!("expected SessionPosition, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_resumes_deduplicates_and_reads_back() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let rec = recording(8);
    let ch = channel(&server, &pki.host_a).await;

    let mut agent = Agent::open(ingest_client(ch.clone()), "whatever-it-claims")
        .await
        .unwrap();
    assert_eq!(agent.host, "host-a", "the host comes from the certificate");
    agent.start(&rec, "alice").await;
    assert_eq!(agent.position(&rec.id).await, (0, false));
    agent.chunks(&rec, 0..5).await;
    agent.committed(&rec.id, 4, false).await;
    drop(agent);

    // Reconnect: the collector says where to resume; the agent resends
    // from before that (it never saw some Committed), then the rest.
    let mut agent = Agent::open(ingest_client(ch.clone()), "host-a").await.unwrap();
    agent.start(&rec, "alice").await;
    assert_eq!(agent.position(&rec.id).await, (5, false));
    let dir = server.session_dir("host-a", &rec.id);
    let index_len = std::fs::metadata(dir.join("index")).unwrap().len();
    agent.chunks(&rec, 2..5).await;
    agent.committed(&rec.id, 4, false).await;
    assert_eq!(
        std::fs::metadata(dir.join("index")).unwrap().len(),
        index_len,
        "duplicates stored again"
    );
    agent.chunks(&rec, 5..8).await;
    agent.send(ship_request::Body::End(end_msg(&rec.id, 7, vec![]))).await;
    agent.committed(&rec.id, 7, true).await;

    // On disk: a plain zstd stream of exactly the encoded lines.
    let file = common::stored_file(&dir);
    assert_eq!(zstd::stream::decode_all(&file[..]).unwrap(), rec.text);
    let report = shelltrail_collector::verify_dir(&dir).unwrap();
    assert!(report.is_ok(), "{report}");

    // Query it back, as an operator.
    let mut q = query_client(channel(&server, &pki.operator).await);
    let info = q
        .get_session(GetSessionRequest {
            session_id: rec.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.host.as_str(), info.next_seq, info.end.is_some()),
        ("host-a", 8, true)
    );
    assert_eq!(info.start.unwrap().verified_user, "alice");
    let listed = q
        .list_sessions(ListSessionsRequest {
            host: "host-a".into(),
            state: list_sessions_request::State::Ended as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    let none = q
        .list_sessions(ListSessionsRequest {
            state: list_sessions_request::State::Live as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.sessions.is_empty());
    let mut read = q
        .read_chunks(ReadChunksRequest {
            session_id: rec.id.clone(),
            from_seq: 0,
            follow: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(c) = read.message().await.unwrap() {
        got.push((c.seq, c.data));
    }
    // The chunks as sent, or, once the collector has compacted the ended
    // session, a run holding the same chunks.
    let mut parts = Vec::new();
    for (_, data) in &got {
        let u = shelltrail_cast::run::unpack(data).unwrap();
        parts.extend(u.parts.iter().map(|p| (p.header.seq, p.hash, u.content(p).to_vec())));
    }
    let want: Vec<_> = rec
        .chunks
        .iter()
        .map(|c| (c.seq, c.hash, zstd::stream::decode_all(&c.bytes[..]).unwrap()))
        .collect();
    assert_eq!(parts, want);
    let err = q
        .get_session(GetSessionRequest {
            session_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = q
        .get_session(GetSessionRequest {
            session_id: "../../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_writes_only_its_own_hosts_sessions() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let rec = recording(3);
    let mut a = Agent::open(ingest_client(channel(&server, &pki.host_a).await), "host-a")
        .await
        .unwrap();
    a.start(&rec, "alice").await;
    assert_eq!(a.position(&rec.id).await, (0, false));
    a.chunks(&rec, 0..1).await;
    a.committed(&rec.id, 0, false).await;

    // host-b, even claiming to be host-a.
    let mut b = Agent::open(ingest_client(channel(&server, &pki.host_b).await), "host-a")
        .await
        .unwrap();
    assert_eq!(b.host, "host-b");
    b.start(&rec, "mallory").await;
    match b.recv().await {
        ship_response::Body::Rejected(r) => {
            assert_eq!(r.session_id, rec.id);
            assert!(r.reason.contains("belongs to another host"), "{}", r.reason);
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    b.chunks(&rec, 1..2).await;
    match b.recv().await {
        ship_response::Body::Rejected(r) => assert!(r.reason.contains("another host"), "{}", r.reason),
        other => panic!("expected Rejected, got {other:?}"),
    }
    b.send(ship_request::Body::End(end_msg(&rec.id, 0, vec![]))).await;
    assert!(matches!(b.recv().await, ship_response::Body::Rejected(_)));
    // A chunk of a session nobody started.
    let stray = recording(1);
    b.chunks(&stray, 0..1).await;
    match b.recv().await {
        ship_response::Body::Rejected(r) => assert!(r.reason.contains("unknown session"), "{}", r.reason),
        other => panic!("expected Rejected, got {other:?}"),
    }
    // The stream goes on for host-b's own sessions.
    let own = recording(1);
    b.start(&own, "bob").await;
    assert_eq!(b.position(&own.id).await, (0, false));
    b.chunks(&own, 0..1).await;
    b.committed(&own.id, 0, false).await;
    assert!(server.session_dir("host-b", &own.id).is_dir());
    assert!(!server.session_dir("host-b", &rec.id).exists());

    // host-a's session is intact and not quarantined.
    a.chunks(&rec, 1..3).await;
    a.committed(&rec.id, 2, false).await;
    let dir = server.session_dir("host-a", &rec.id);
    assert!(!dir.join("quarantine").exists());
    assert!(shelltrail_collector::verify_dir(&dir).unwrap().is_ok());

    // A malformed chunk is rejected for its session only.
    a.send(ship_request::Body::Chunk(ChunkData {
        session_id: rec.id.clone(),
        seq: 3,
        data: b"garbage".to_vec(),
    }))
    .await;
    match a.recv().await {
        ship_response::Body::Rejected(r) => assert!(r.reason.contains("malformed"), "{}", r.reason),
        other => panic!("expected Rejected, got {other:?}"),
    }
    b.chunks(&own, 0..1).await;
    b.committed(&own.id, 0, false).await;
    drop((a, b));
    server.stop().await;
}

/// Calls ListSessions over `endpoint`; any failure (handshake or call).
async fn try_list(endpoint: Endpoint) -> anyhow::Result<()> {
    let ch = endpoint.connect().await?;
    query_client(ch).list_sessions(ListSessionsRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_unknown_and_missing_client_certificates() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;

    // Signed by another CA.
    let rogue = shelltrail_collector::endpoint(&server.url(), Some(&pki.rogue)).unwrap();
    assert!(try_list(rogue).await.is_err());
    let rogue_ch = shelltrail_collector::endpoint(&server.url(), Some(&pki.rogue))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = rogue_ch {
        assert!(Agent::open(ingest_client(ch), "host-a").await.is_err());
    }

    // No client certificate at all.
    let anonymous = Endpoint::from_shared(server.url())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&pki.ca_pem))
                .domain_name("localhost"),
        )
        .unwrap();
    assert!(try_list(anonymous).await.is_err());

    // Plaintext to a TLS collector.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", server.addr.port())).unwrap();
    assert!(try_list(plain).await.is_err());

    // Nothing was stored, and a good client still gets in.
    assert_eq!(std::fs::read_dir(server.data.join("sessions")).unwrap().count(), 0);
    let good = shelltrail_collector::endpoint(&server.url(), Some(&pki.operator)).unwrap();
    try_list(good).await.unwrap();

    // The client helper refuses to mix TLS files with a plaintext URL.
    let plain_url = format!("http://127.0.0.1:{}", server.addr.port());
    assert!(shelltrail_collector::endpoint(&plain_url, Some(&pki.host_a)).is_err());
    assert!(shelltrail_collector::endpoint(&server.url(), None).is_err());
    let _ = pki.dir.path();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_only_its_own_stream() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let ch = channel(&server, &pki.host_a).await;
    let rec_a = recording(2);
    let rec_b = recording(2);

    // No client-side limit: the collector must enforce its own.
    let unlimited = IngestClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    let mut big = Agent::open(unlimited, "host-a").await.unwrap();
    let other_ch = channel(&server, &pki.host_a).await;
    let mut other = Agent::open(ingest_client(other_ch), "host-a").await.unwrap();
    big.start(&rec_a, "alice").await;
    assert_eq!(big.position(&rec_a.id).await, (0, false));
    other.start(&rec_b, "alice").await;
    assert_eq!(other.position(&rec_b.id).await, (0, false));

    big.send(ship_request::Body::Chunk(ChunkData {
        session_id: rec_a.id.clone(),
        seq: 0,
        data: vec![0u8; MAX_MESSAGE_BYTES + 1024],
    }))
    .await;
    let status = match big.next().await {
        Err(status) => status,
        Ok(Some(m)) => panic!("unexpected {m:?}"),
        Ok(None) => panic!("stream ended without a status"),
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");

    // The other agent, and a new stream on the same connection, carry on.
    other.chunks(&rec_b, 0..2).await;
    other.committed(&rec_b.id, 1, false).await;
    let mut again = Agent::open(ingest_client(ch), "host-a").await.unwrap();
    again.start(&rec_a, "alice").await;
    assert_eq!(again.position(&rec_a.id).await, (0, false));
    again.chunks(&rec_a, 0..2).await;
    again.committed(&rec_a.id, 1, false).await;
    drop((big, other, again));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_chunks_follows_a_live_session() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let rec = recording(4);
    let ch = channel(&server, &pki.host_a).await;
    let mut agent = Agent::open(ingest_client(ch), "host-a").await.unwrap();
    agent.start(&rec, "alice").await;
    agent.position(&rec.id).await;
    agent.chunks(&rec, 0..2).await;
    agent.committed(&rec.id, 1, false).await;

    // The CLI's side, with its own certificate (host-b's will do).
    let mut q = query_client(channel(&server, &pki.operator).await);
    let mut tail = q
        .read_chunks(ReadChunksRequest {
            session_id: rec.id.clone(),
            from_seq: 1,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(WAIT, tail.message())
            .await
            .expect("chunk in time")
            .unwrap()
    };
    assert_eq!(next().await.unwrap().seq, 1);

    // Committed after the call started.
    agent.chunks(&rec, 2..3).await;
    agent.committed(&rec.id, 2, false).await;
    let c = next().await.unwrap();
    assert_eq!((c.seq, &c.data), (2, &rec.chunks[2].bytes));

    agent.chunks(&rec, 3..4).await;
    agent.send(ship_request::Body::End(end_msg(&rec.id, 3, vec![]))).await;
    agent.committed(&rec.id, 3, true).await;
    assert_eq!(next().await.unwrap().seq, 3);
    // The session ended: so does the stream.
    assert!(next().await.is_none());

    let err = q
        .read_chunks(ReadChunksRequest {
            session_id: uuid::Uuid::now_v7().to_string(),
            from_seq: 0,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_and_reflection() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let ch = channel(&server, &pki.host_a).await;

    // A stream that does not start with AgentHello.
    let rec = recording(1);
    let (tx, rx) = mpsc::channel(4);
    tx.send(ShipRequest {
        body: Some(ship_request::Body::Start(start_msg(&rec.id, "host-a", "alice", 1))),
    })
    .await
    .unwrap();
    let err = match ingest_client(ch.clone()).ship(ReceiverStream::new(rx)).await {
        Err(status) => status,
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // AgentHello twice.
    let mut agent = Agent::open(ingest_client(ch.clone()), "host-a").await.unwrap();
    agent.tx.send(hello("host-a")).await.unwrap();
    let err = agent.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Reflection lists the services.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["shelltrail.v1.Ingest", "shelltrail.v1.Query"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_level_that_is_not_one_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = CollectorConfig {
        listen: listener.local_addr().unwrap(),
        data_dir: dir.path().join("data"),
        tls: None,
        insecure: true,
        operators: vec![],
        roles: Default::default(),
        denied: vec![],
        compact_level: 25,
    };
    let err = serve_on(cfg, listener, std::future::ready(())).await.unwrap_err();
    assert!(err.to_string().contains("compact_level = 25"), "{err:#}");
}

/// A private key other users can read is refused, on both sides, with what
/// to do about it: an operator in the service's group could otherwise take
/// the host's key and write sessions in its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_other_users_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let pki = pki();
    for key in [&pki.server.key, &pki.host_a.key] {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let err = shelltrail_collector::tls::server_tls_config(&pki.server).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("server.key is open to other users (mode 0640"), "{text}");
    assert!(text.contains("chmod 0400"), "{text}");
    let err = shelltrail_collector::tls::connect("https://127.0.0.1:1", Some(&pki.host_a))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("host-a.key is open to other users"), "{err}");
}

/// The documented layout, the key the service user's own at mode 0400, passes
/// for that user, and for root, who checks it with `agent --check-config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_of_the_service_user_is_accepted() {
    use std::os::unix::fs::PermissionsExt;
    let pki = pki();
    if nix::unistd::geteuid().is_root() {
        let service_user = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&pki.server.key, Some(service_user), None).unwrap();
    }
    std::fs::set_permissions(&pki.server.key, std::fs::Permissions::from_mode(0o400)).unwrap();
    shelltrail_collector::tls::server_tls_config(&pki.server).expect("the key's owner, or root, may use it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_takes_the_agents_claim() {
    let server = collector(None).await;
    let url = format!("http://127.0.0.1:{}", server.addr.port());
    let ch = connect(&url, None).await.unwrap();
    let agent = Agent::open(ingest_client(ch.clone()), "Dev-Box").await.unwrap();
    assert_eq!(agent.host, "dev-box");
    let err = Agent::open(ingest_client(ch), "../etc").await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let rec = recording(2);
    let ch = channel(&server, &pki.host_a).await;
    let mut agent = Agent::open(ingest_client(ch.clone()), "host-a").await.unwrap();
    agent.start(&rec, "alice").await;
    agent.position(&rec.id).await;
    let mut tail = query_client(channel(&server, &pki.operator).await)
        .read_chunks(ReadChunksRequest {
            session_id: rec.id.clone(),
            from_seq: 0,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(agent.next().await.is_err());
    assert!(tail.message().await.is_err());
}

#[test]
fn host_identity_comes_from_the_certificate() {
    let ca = new_ca("ca");
    let (_, _, der) = leaf(
        &ca,
        &["Web01.Example.com", "other"],
        "ignored",
        ExtendedKeyUsagePurpose::ClientAuth,
        &[],
    );
    assert_eq!(host_from_certificate(&der).unwrap(), "web01.example.com");
    let (_, _, der) = leaf(&ca, &[], "Host-C", ExtendedKeyUsagePurpose::ClientAuth, &[]);
    assert_eq!(host_from_certificate(&der).unwrap(), "host-c");
    let (_, _, der) = leaf(&ca, &["*.example.com"], "x", ExtendedKeyUsagePurpose::ClientAuth, &[]);
    assert!(matches!(
        host_from_certificate(&der),
        Err(IdentityError::InvalidName(_))
    ));
    let (_, _, der) = leaf(&ca, &["10.0.0.1"], "../../x", ExtendedKeyUsagePurpose::ClientAuth, &[]);
    assert!(matches!(
        host_from_certificate(&der),
        Err(IdentityError::InvalidName(_))
    ));
    assert!(matches!(host_from_certificate(b"junk"), Err(IdentityError::Parse(_))));
}

#[test]
fn a_certificate_has_exactly_one_role() {
    use shelltrail_collector::peer_from_certificate;
    let ca = new_ca("ca");
    let cert = |roles: &[&str]| leaf(&ca, &["web01"], "web01", ExtendedKeyUsagePurpose::ClientAuth, roles).2;
    let peer = peer_from_certificate(&cert(&["host"])).unwrap();
    assert_eq!((peer.name.as_str(), peer.role), ("web01", Role::Host));
    assert_eq!(
        peer_from_certificate(&cert(&["operator"])).unwrap().role,
        Role::Operator
    );
    assert_eq!(
        peer_from_certificate(&cert(&["host", "host"])).unwrap().role,
        Role::Host
    );
    let none = peer_from_certificate(&cert(&[])).unwrap_err();
    assert!(matches!(none, IdentityError::NoRole { .. }), "{none}");
    assert!(none.to_string().contains("--role host"), "{none}");
    assert!(matches!(
        peer_from_certificate(&cert(&["host", "operator"])),
        Err(IdentityError::TwoRoles { .. })
    ));
    assert!(matches!(
        peer_from_certificate(&cert(&["admin"])),
        Err(IdentityError::UnknownRole { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_reported_and_lost_chunks_end_the_session() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let rec = recording(5);
    let mut agent = Agent::open(ingest_client(channel(&server, &pki.host_a).await), "host-a")
        .await
        .unwrap();
    agent.start(&rec, "alice").await;
    agent.position(&rec.id).await;
    agent.chunks(&rec, [0]).await;
    agent.committed(&rec.id, 0, false).await;
    // The recorder lost 1 and 2: the collector holds 3 and says it waits for 1.
    agent.chunks(&rec, [3]).await;
    loop {
        match agent.recv().await {
            ship_response::Body::Committed(c) => assert_eq!(c.through_seq, 0),
            ship_response::Body::Position(p) => {
                assert_eq!((p.next_seq, p.ended), (1, false));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    agent.chunks(&rec, [4]).await;
    // The end names the lost chunks: the held ones are stored after them.
    agent
        .send(ship_request::Body::End(end_msg(&rec.id, 4, vec![1, 2])))
        .await;
    loop {
        match agent.recv().await {
            ship_response::Body::Committed(c) if c.ended => {
                assert_eq!(c.through_seq, 4);
                break;
            }
            ship_response::Body::Committed(_) | ship_response::Body::Position(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let info = query_client(channel(&server, &pki.operator).await)
        .get_session(GetSessionRequest {
            session_id: rec.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.next_seq, info.missing_seqs), (5, vec![1, 2]));
    let report = shelltrail_collector::verify_dir(&server.session_dir("host-a", &rec.id)).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.chain_restarts, vec![3]);
    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_collector_resumes_where_it_was() {
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let rec = recording(4);
    let mut agent = Agent::open(ingest_client(channel(&server, &pki.host_a).await), "host-a")
        .await
        .unwrap();
    agent.start(&rec, "alice").await;
    agent.position(&rec.id).await;
    agent.chunks(&rec, 0..2).await;
    agent.committed(&rec.id, 1, false).await;
    let (dir, data) = server.stop_keeping_data().await;
    assert!(agent.next().await.is_err());

    let server = collector_at(Some(&pki.server), dir, data).await;
    let mut agent = Agent::open(ingest_client(channel(&server, &pki.host_a).await), "host-a")
        .await
        .unwrap();
    agent.start(&rec, "alice").await;
    assert_eq!(agent.position(&rec.id).await, (2, false));
    agent.chunks(&rec, 2..4).await;
    agent.send(ship_request::Body::End(end_msg(&rec.id, 3, vec![]))).await;
    agent.committed(&rec.id, 3, true).await;
    let file = common::stored_file(&server.session_dir("host-a", &rec.id));
    assert_eq!(zstd::stream::decode_all(&file[..]).unwrap(), rec.text);
    drop(agent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_agents_at_once() {
    const STREAMS: usize = 100;
    let pki = pki();
    let server = collector(Some(&pki.server)).await;
    let mut channels = Vec::new();
    for files in [&pki.host_a, &pki.host_b, &pki.host_a, &pki.host_b] {
        channels.push(channel(&server, files).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let ch = channels[i % channels.len()].clone();
        tasks.spawn(async move {
            let rec = recording(5);
            let mut agent = Agent::open(ingest_client(ch), "x").await.unwrap();
            agent.start(&rec, "alice").await;
            assert_eq!(agent.position(&rec.id).await, (0, false));
            agent.chunks(&rec, 0..5).await;
            agent.send(ship_request::Body::End(end_msg(&rec.id, 4, vec![]))).await;
            agent.committed(&rec.id, 4, true).await;
            (agent.host.clone(), rec)
        });
    }
    let mut done = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(120), tasks.join_next())
        .await
        .unwrap()
    {
        done.push(r.unwrap());
    }
    assert_eq!(done.len(), STREAMS);
    for (host, rec) in &done {
        let file = common::stored_file(&server.session_dir(host, &rec.id));
        assert_eq!(&zstd::stream::decode_all(&file[..]).unwrap(), &rec.text);
    }
    let operator = channel(&server, &pki.operator).await;
    let listed = query_client(operator.clone())
        .list_sessions(ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), STREAMS);
    assert!(listed.next_page_token.is_empty());

    // In pages of 7: every session once, newest first, then no token.
    let mut q = query_client(operator);
    let (mut paged, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = q
            .list_sessions(ListSessionsRequest {
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.sessions.len() <= 7);
        paged.extend(page.sessions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, STREAMS.div_ceil(7));
    let id = |s: &shelltrail_proto::v1::SessionInfo| {
        let meta = s.start.as_ref().and_then(|st| st.meta.as_ref());
        meta.map(|m| m.session_id.clone()).unwrap_or_default()
    };
    let ids: Vec<String> = paged.iter().map(id).collect();
    let all: Vec<String> = listed.sessions.iter().map(id).collect();
    assert_eq!(all.iter().collect::<std::collections::HashSet<_>>().len(), STREAMS);
    assert_eq!(ids, all, "pages are the one listing, in order");
    let err = q
        .list_sessions(ListSessionsRequest {
            page_token: "../etc/passwd".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    server.stop().await;
}

/// A host's certificate (clientAuth only, as `pki issue --role host` makes
/// it) cannot pose as the collector, even for the collector's own names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_cannot_serve_as_the_collector() {
    let pki = pki();
    let (cert, key, _) = leaf(
        &pki.ca,
        &["localhost", "127.0.0.1"],
        "localhost",
        ExtendedKeyUsagePurpose::ClientAuth,
        &["host"],
    );
    let d = pki.dir.path();
    let impostor = TlsFiles {
        cert: write(d, "impostor.pem", &cert),
        key: write(d, "impostor.key", &key),
        client_ca: pki.server.client_ca.clone(),
    };
    let server = collector(Some(&impostor)).await;
    let err = match connect(&server.url(), Some(&pki.operator)).await {
        Err(e) => shelltrail_collector::tls::with_causes(&e),
        Ok(ch) => {
            let listed = query_client(ch).list_sessions(ListSessionsRequest::default()).await;
            format!(
                "{:?}",
                listed.expect_err("a host's certificate served as the collector")
            )
        }
    };
    assert!(err.contains("certificate"), "{err}");
    server.stop().await;
}

/// Ingest takes host certificates only and Query operator certificates
/// only, whatever their names; a certificate without a role gets neither,
/// and is told to reissue with --role; an operator certificate must also
/// be listed in `operators`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_a_certificate_may_do() {
    let pki = pki();
    let (d, ca) = (pki.dir.path(), &pki.ca);
    // A host named like the listed operator, an operator named like a host
    // (and listed), one without a role, and an operator nobody listed.
    let host_named_operator = client(d, "operator", ca, "host-named-operator", &["host"]);
    let operator_named_host = client(d, "host-a", ca, "operator-named-host", &["operator"]);
    let no_role = client(d, "operator", ca, "no-role", &[]);
    let unlisted = client(d, "bob", ca, "bob", &["operator"]);
    let server = collector(Some(&pki.server)).await;
    let list = |files: ClientTlsFiles| {
        let url = server.url();
        async move {
            let ch = connect(&url, Some(&files)).await.unwrap();
            query_client(ch).list_sessions(ListSessionsRequest::default()).await
        }
    };

    let err = list(host_named_operator.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("has the host role"), "{err}");
    let err = list(pki.host_a.clone()).await.unwrap_err();
    assert!(
        err.message()
            .contains("Query (reading sessions) takes operator certificates only"),
        "{err}"
    );
    let err = list(no_role.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("--role"), "{err}");
    let err = list(unlisted).await.unwrap_err();
    assert!(err.message().contains("has no role at this collector"), "{err}");
    // The operator reads.
    list(pki.operator.clone()).await.unwrap();

    // Shipping: the operator's certificate, even one naming a real host, and
    // one without a role are refused before any message is read.
    let rec = recording(2);
    for (files, want) in [
        (&operator_named_host, "has the operator role"),
        (&pki.operator, "Ingest (shipping sessions) takes host certificates only"),
        (&no_role, "--role"),
    ] {
        let ch = connect(&server.url(), Some(files)).await.unwrap();
        let err = match Agent::open(ingest_client(ch), "host-a").await {
            Err(e) => e,
            Ok(mut agent) => {
                agent.start(&rec, "alice").await;
                agent
                    .next()
                    .await
                    .expect_err("the collector took a Ship stream from a non-host")
            }
        };
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
        assert!(err.message().contains(want), "{want:?} not in {err}");
    }
    assert_eq!(std::fs::read_dir(server.data.join("sessions")).unwrap().count(), 0);
    // A host ships.
    let ch = connect(&server.url(), Some(&host_named_operator)).await.unwrap();
    let mut agent = Agent::open(ingest_client(ch), "x").await.unwrap();
    assert_eq!(agent.host, "operator");
    agent.start(&rec, "alice").await;
    assert_eq!(agent.position(&rec.id).await, (0, false));
    drop(agent);
    server.stop().await;
}
