//! The collector's gRPC services: `Ingest` (agents ship sessions) and
//! `Query` (the CLI lists and reads them), over the [`Store`].
//!
//! # Ingest
//!
//! One `Ship` stream per agent connection, one task per stream. Only a
//! certificate with the host role may ship ([`crate::identity`]); the host
//! the stream writes for is the one it names; in insecure mode, the
//! hostname the agent claims in its `AgentHello`. Every store call carries
//! that host, and the store refuses a session that belongs to another host.
//!
//! The task reads the messages that are already there (up to 256 or 16 MiB),
//! groups them by session, and runs each session's operations in order on
//! the blocking pool, sessions in parallel. So a batch of chunks of one
//! session costs one append (two fsyncs) and gets one `Committed`, sent only
//! after the fsync. A problem with one session's data gets a `Rejected` for
//! that session and the stream goes on; a storage failure ends the stream
//! with `UNAVAILABLE`, and the agent reconnects and resumes from the
//! `SessionPosition`s it gets then: nothing uncommitted was acknowledged.
//!
//! The stream also carries the other way what operators ask of the host
//! ([`crate::hosts`]): its agent's orders are merged into the responses.
//!
//! # Query
//!
//! Reads the catalogue and the committed chunks; `ReadChunks` with `follow`
//! and `Tail` ([`crate::tail`]) wait on the session's summary channel for
//! new commits; `Kill` and `Unlock` go to the host's agent. Every call needs
//! a client certificate with the operator role and the role the call needs
//! ([`crate::access`]: view, or respond for `Kill` and `Unlock`); every
//! call, allowed or refused, is written to the audit log
//! ([`crate::audit`]) before it is answered.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use shelltrail_proto::v1::ingest_server::{Ingest, IngestServer};
use shelltrail_proto::v1::query_server::{Query, QueryServer};
use shelltrail_proto::v1::{
    AgentHello, AuditRequest, AuditResponse, ChunkData, CollectorHello, Committed, GetSessionRequest, KillRequest,
    ListSessionsRequest, ListSessionsResponse, OrderReply, ReadChunksRequest, Rejected, SessionEnd, SessionInfo,
    SessionPosition, SessionStart, ShipRequest, ShipResponse, TailRequest, TailUpdate, UnlockRequest, host_order,
    list_sessions_request, order_reply, ship_request, ship_response, tail_request,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{Access, Need};
use crate::audit::{AuditLog, Entry};
use crate::hosts::{Hosts, Outcome};
use crate::identity::{Peer, Role, peer_from_certificate};
use crate::store::keys::KeyPin;
use crate::store::{AppendOutcome, ListFilter, Position, StateFilter, Store, StoreError, valid_host, valid_session_id};

/// Largest message the collector decodes: a bigger one ends its stream with
/// `RESOURCE_EXHAUSTED`. Chunks are cut at 512 KiB by default.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// The first message (AgentHello) must come within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most messages, and bytes, handled as one batch.
const MAX_BATCH_MESSAGES: usize = 256;
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Sessions in one `ListSessions` page, unless the request asks for fewer,
/// and at most.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// A `ListSessions` page token: the start time and id of the last session
/// of the previous page, `"<start_unix_ms>:<session id>"`.
fn parse_page_token(t: &str) -> Option<(i64, String)> {
    let (start, id) = t.split_once(':')?;
    let start = start.parse().ok()?;
    crate::store::valid_session_id(id).then(|| (start, id.to_owned()))
}

/// Bytes of chunks one `ReadChunks` read fetches from disk.
const READ_BATCH_BYTES: usize = 4 << 20;

/// Both services; cheap to clone (one per connection).
#[derive(Clone)]
pub struct Collector {
    store: Arc<Store>,
    insecure: bool,
    /// Who may do what.
    access: Arc<Access>,
    audit: Arc<AuditLog>,
    /// The connected agents, and the orders for them.
    hosts: Arc<Hosts>,
    /// Becomes true at shutdown: long-lived streams end so the server can.
    shutdown: watch::Receiver<bool>,
}

/// Who made a Query call, for the audit log.
struct Caller {
    who: String,
    from: String,
}

/// What a Query call is about, for the audit log.
struct About<'a> {
    action: &'a str,
    session_id: &'a str,
    host: &'a str,
    detail: String,
}

impl Collector {
    /// Services over `store`, writing every query to `audit`. With
    /// `insecure`, callers are not authenticated and an agent's host is
    /// what it claims (development only). Streams end when `shutdown`
    /// turns true.
    pub fn new(
        store: Arc<Store>,
        audit: AuditLog,
        insecure: bool,
        access: Access,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let audit = Arc::new(audit);
        Collector {
            store,
            insecure,
            access: Arc::new(access),
            hosts: Hosts::new(audit.clone()),
            audit,
            shutdown,
        }
    }

    /// The Ingest service, refusing messages over [`MAX_MESSAGE_BYTES`].
    pub fn ingest_service(&self) -> IngestServer<Collector> {
        IngestServer::new(self.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The Query service.
    pub fn query_service(&self) -> QueryServer<Collector> {
        QueryServer::new(self.clone()).max_decoding_message_size(64 << 10)
    }

    /// The caller's verified name and role, if it may act as `role`:
    /// Ingest takes host certificates only, Query operator certificates
    /// only, whatever their names. `None` in insecure mode.
    fn peer<T>(&self, req: &Request<T>, role: Role) -> Result<Option<Peer>, Status> {
        if self.insecure {
            return Ok(None);
        }
        let leaf = req
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let peer = peer_from_certificate(leaf.as_ref()).map_err(|e| {
            tracing::warn!(peer = %addr(req.remote_addr()), "refused a client certificate: {e}");
            Status::permission_denied(e.to_string())
        })?;
        if peer.role != role {
            let service = match role {
                Role::Host => "Ingest (shipping sessions) takes host certificates only",
                Role::Operator => "Query (reading sessions) takes operator certificates only",
            };
            let name = &peer.name;
            tracing::warn!(peer = %addr(req.remote_addr()), %name, role = %peer.role, "refused: {service}");
            return Err(Status::permission_denied(format!(
                "certificate {name:?} has the {} role, and {service}: use a certificate issued with \
                 `shelltrail pki issue --role {role}`",
                peer.role
            )));
        }
        Ok(Some(peer))
    }

    /// Query calls: an operator certificate (see [`Self::peer`]) with the
    /// role `need` ([`crate::access`]). Who, from where, and `about`, go to
    /// the audit log, allowed or not; an allowed call whose entry cannot be
    /// written is refused (nothing is read off the record).
    async fn authorize<T>(&self, req: &Request<T>, need: Need, about: About<'_>) -> Result<Caller, Status> {
        let from = addr(req.remote_addr());
        let checked = match self.peer(req, Role::Operator) {
            Ok(None) => {
                tracing::warn!(peer = %from, "INSECURE collector: unauthenticated query");
                Ok("insecure (unauthenticated)".to_string())
            }
            Ok(Some(peer)) => match self.access.check(&peer, need) {
                Ok(()) => Ok(peer.name),
                Err(why) => Err((peer.name, Status::permission_denied(why))),
            },
            Err(status) => {
                let name = req.peer_certs().and_then(|c| {
                    c.first()
                        .and_then(|leaf| crate::identity::host_from_certificate(leaf).ok())
                });
                let who = match name {
                    Some(n) => format!("{n} (refused certificate)"),
                    None => "(refused certificate)".to_string(),
                };
                Err((who, status))
            }
        };
        let (who, refusal) = match checked {
            Ok(who) => (who, None),
            Err((who, status)) => (who, Some(status)),
        };
        let entry = Entry {
            unix_ms: crate::hosts::now_ms(),
            who: who.clone(),
            from: from.clone(),
            action: about.action.to_owned(),
            session_id: about.session_id.to_owned(),
            host: about.host.to_owned(),
            detail: match &refusal {
                Some(status) => format!("refused: {}", status.message()),
                None => about.detail,
            },
            allowed: refusal.is_none(),
        };
        let written = self.record(entry).await;
        if let Some(status) = refusal {
            return Err(status);
        }
        written.map_err(|e| {
            tracing::error!("{e}");
            Status::unavailable(format!(
                "the collector cannot record this in its audit log, so it refuses it: {e}"
            ))
        })?;
        Ok(Caller { who, from })
    }

    /// Appends an audit entry (on the blocking pool: it syncs).
    async fn record(&self, e: Entry) -> Result<(), String> {
        let audit = self.audit.clone();
        match tokio::task::spawn_blocking(move || audit.append(&e)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("audit task failed: {e}")),
        }
    }
}

fn response(body: ship_response::Body) -> ShipResponse {
    ShipResponse { body: Some(body) }
}

fn rejected(session_id: &str, reason: String) -> ShipResponse {
    response(ship_response::Body::Rejected(Rejected {
        session_id: session_id.to_owned(),
        reason,
    }))
}

fn position(session_id: &str, p: Position) -> ShipResponse {
    response(ship_response::Body::Position(SessionPosition {
        session_id: session_id.to_owned(),
        next_seq: p.next_seq,
        ended: p.ended,
    }))
}

/// Committed for what is durable, SessionPosition when the collector waits
/// for an earlier chunk.
fn outcome_responses(session_id: &str, out: &AppendOutcome, out_responses: &mut Vec<ShipResponse>) {
    if out.next_seq > 0 || out.ended {
        out_responses.push(response(ship_response::Body::Committed(Committed {
            session_id: session_id.to_owned(),
            through_seq: out.next_seq.saturating_sub(1),
            ended: out.ended,
        })));
    }
    if let Some(next_seq) = out.resend_from {
        out_responses.push(position(session_id, Position { next_seq, ended: false }));
    }
}

/// One session's operations in a batch, in arrival order.
enum Op {
    Start(Box<SessionStart>),
    Chunks(Vec<(u64, Vec<u8>)>),
    End(Box<SessionEnd>),
}

/// Groups a batch by session, keeping each session's order and merging
/// consecutive chunks into one append.
fn plan(batch: Vec<ShipRequest>) -> Result<Vec<(String, Vec<Op>)>, Status> {
    let mut plan: Vec<(String, Vec<Op>)> = Vec::new();
    let mut push = |sid: String, op: Op| {
        let ops = match plan.iter_mut().position(|(s, _)| *s == sid) {
            Some(i) => &mut plan[i].1,
            None => {
                plan.push((sid, Vec::new()));
                let last = plan.len() - 1;
                &mut plan[last].1
            }
        };
        match (ops.last_mut(), op) {
            (Some(Op::Chunks(chunks)), Op::Chunks(more)) => chunks.extend(more),
            (_, op) => ops.push(op),
        }
    };
    for msg in batch {
        match msg.body {
            Some(ship_request::Body::Hello(_)) => {
                return Err(Status::invalid_argument("AgentHello may only be the first message"));
            }
            Some(ship_request::Body::Start(s)) => {
                let sid = s.meta.as_ref().map(|m| m.session_id.clone()).unwrap_or_default();
                push(sid, Op::Start(Box::new(s)));
            }
            Some(ship_request::Body::Chunk(c)) => push(c.session_id, Op::Chunks(vec![(c.seq, c.data)])),
            Some(ship_request::Body::End(e)) => push(e.session_id.clone(), Op::End(Box::new(e))),
            // Taken out of the batch before it is planned.
            Some(ship_request::Body::Result(_)) => {}
            // A kind of message added after this collector was built.
            None => tracing::debug!("ignoring a ShipRequest of an unknown kind"),
        }
    }
    Ok(plan)
}

/// Runs one session's operations; stops at the first refusal (answered with
/// Rejected) or storage failure (returned, ending the stream).
fn run_ops(store: &Store, host: &str, sid: &str, ops: Vec<Op>) -> (Vec<ShipResponse>, Option<StoreError>) {
    let mut out = Vec::new();
    for op in ops {
        let result = match op {
            Op::Start(start) => {
                if let Some(claim) = start.meta.as_ref().map(|m| m.host.as_str())
                    && !claim.eq_ignore_ascii_case(host)
                {
                    tracing::info!(session = %sid, host, claim, "agent's host claim differs from its certificate");
                }
                store.start(host, &start).map(|p| out.push(position(sid, p)))
            }
            Op::Chunks(chunks) => store
                .append(host, sid, chunks)
                .map(|o| outcome_responses(sid, &o, &mut out)),
            Op::End(end) => store.end(host, &end).map(|o| outcome_responses(sid, &o, &mut out)),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.is_session_refusal() => {
                tracing::warn!(session = %sid, host, "refused: {e}");
                out.push(rejected(sid, e.to_string()));
                break;
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Waits for the first message; then takes whatever else is already
/// there. Returns the batch and, if the stream ended, how.
async fn next_batch(inbound: &mut Streaming<ShipRequest>) -> (Vec<ShipRequest>, Option<Result<(), Status>>) {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    match inbound.message().await {
        Ok(Some(m)) => {
            bytes += prost_len(&m);
            batch.push(m);
        }
        Ok(None) => return (batch, Some(Ok(()))),
        Err(status) => return (batch, Some(Err(status))),
    }
    while batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
        let ready = poll_fn(|cx| match Pin::new(&mut *inbound).poll_next(cx) {
            Poll::Ready(item) => Poll::Ready(Some(item)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match ready {
            None => break,
            Some(Some(Ok(m))) => {
                bytes += prost_len(&m);
                batch.push(m);
            }
            Some(Some(Err(status))) => return (batch, Some(Err(status))),
            Some(None) => return (batch, Some(Ok(()))),
        }
    }
    (batch, None)
}

fn prost_len(m: &ShipRequest) -> usize {
    shelltrail_proto::Message::encoded_len(m)
}

/// The status to end a stream with after reading from it failed.
///
/// tonic 0.14 reports a message over the decoding limit as `OUT_OF_RANGE`
/// (its only use of that code when decoding: the length prefix is checked
/// before the body is buffered). gRPC's status code guide names
/// `RESOURCE_EXHAUSTED` for it, which is what agents are told to expect.
fn inbound_error(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange {
        Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

/// One agent's stream after the hello.
struct ShipTask {
    store: Arc<Store>,
    host: String,
    tx: mpsc::Sender<Result<ShipResponse, Status>>,
    shutdown: watch::Receiver<bool>,
    hosts: Arc<Hosts>,
    /// This stream's registration in `hosts`.
    epoch: u64,
}

impl ShipTask {
    async fn run(self, inbound: Streaming<ShipRequest>) {
        let (hosts, host, epoch) = (self.hosts.clone(), self.host.clone(), self.epoch);
        self.serve(inbound).await;
        hosts.disconnect(&host, epoch);
    }

    async fn serve(mut self, mut inbound: Streaming<ShipRequest>) {
        loop {
            let (batch, ended) = tokio::select! {
                b = next_batch(&mut inbound) => b,
                () = stopped(&mut self.shutdown) => {
                    let _ = self.tx.send(Err(Status::unavailable("the collector is shutting down"))).await;
                    return;
                }
            };
            // Answers to operators' orders go to whoever waits for them.
            let batch: Vec<ShipRequest> = batch
                .into_iter()
                .filter_map(|m| match m.body {
                    Some(ship_request::Body::Result(r)) => {
                        self.hosts.result(&self.host, r);
                        None
                    }
                    body => Some(ShipRequest { body }),
                })
                .collect();
            if !batch.is_empty() {
                match self.handle(batch).await {
                    Ok(responses) => {
                        for r in responses {
                            if self.tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err((responses, status)) => {
                        for r in responses {
                            let _ = self.tx.send(Ok(r)).await;
                        }
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                }
            }
            match ended {
                None => {}
                Some(Ok(())) => return,
                Some(Err(status)) => {
                    let status = inbound_error(status);
                    tracing::warn!(host = %self.host, "agent stream failed: {status}");
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
            }
        }
    }

    /// Runs a batch: sessions in parallel on the blocking pool.
    async fn handle(&self, batch: Vec<ShipRequest>) -> Result<Vec<ShipResponse>, (Vec<ShipResponse>, Status)> {
        let plan = plan(batch).map_err(|s| (Vec::new(), s))?;
        let handles: Vec<_> = plan
            .into_iter()
            .map(|(sid, ops)| {
                let store = self.store.clone();
                let host = self.host.clone();
                tokio::task::spawn_blocking(move || run_ops(&store, &host, &sid, ops))
            })
            .collect();
        let mut responses = Vec::new();
        let mut failure = None;
        for h in handles {
            match h.await {
                Ok((r, err)) => {
                    responses.extend(r);
                    if let Some(e) = err {
                        tracing::error!(host = %self.host, "storage failure: {e}");
                        failure.get_or_insert(Status::unavailable(format!("collector storage failure: {e}")));
                    }
                }
                Err(e) => {
                    tracing::error!(host = %self.host, "session task failed: {e}");
                    failure.get_or_insert(Status::internal("collector task failed"));
                }
            }
        }
        match failure {
            None => Ok(responses),
            Some(status) => Err((responses, status)),
        }
    }
}

/// Completes when the shutdown flag turns true; never if its sender is
/// dropped without that.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // (The guard `wait_for` returns is not Send: it must not live across
    // an await.)
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Ingest for Collector {
    type ShipStream = BoxStream<ShipResponse>;

    async fn ship(&self, req: Request<Streaming<ShipRequest>>) -> Result<Response<Self::ShipStream>, Status> {
        let peer = req.remote_addr();
        let cert_host = self.peer(&req, Role::Host)?.map(|p| p.name);
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no AgentHello within 30 s"))??;
        let Some(ShipRequest {
            body: Some(ship_request::Body::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be AgentHello"));
        };
        let host = match cert_host {
            Some(h) => h,
            None => insecure_host(&hello)?,
        };
        if self.insecure {
            tracing::warn!(peer = %addr(peer), %host, "INSECURE collector: unauthenticated agent, host taken from its own claim");
        }
        tracing::info!(peer = %addr(peer), %host, agent_version = %hello.agent_version, "agent connected");
        pin_signing_key(&self.store, &host, &hello.signing_key).await;

        let (tx, rx) = mpsc::channel(64);
        let hello = response(ship_response::Body::Hello(CollectorHello { host: host.clone() }));
        tx.send(Ok(hello))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))?;
        // Operators' orders for this host join the responses after the hello.
        let (orders_tx, orders_rx) = mpsc::unbounded_channel();
        let epoch = self.hosts.connect(&host, orders_tx);
        let task = ShipTask {
            store: self.store.clone(),
            host,
            tx,
            shutdown: self.shutdown.clone(),
            hosts: self.hosts.clone(),
            epoch,
        };
        tokio::spawn(task.run(inbound));
        let responses = tokio_stream::StreamExt::merge(
            ReceiverStream::new(rx),
            tokio_stream::wrappers::UnboundedReceiverStream::new(orders_rx),
        );
        Ok(Response::new(Box::pin(responses)))
    }
}

/// Pins the session-signing key the agent announced, if it is the host's
/// first (see [`crate::store::keys`]). A different key is not an error of
/// the stream: the host's sessions keep coming, and those it seals with the
/// new key are flagged, until an operator removes the pin.
async fn pin_signing_key(store: &Arc<Store>, host: &str, key: &[u8]) {
    if key.is_empty() {
        tracing::warn!(%host, "the agent announces no signing key (older than sealing): its sessions arrive unsigned");
        return;
    }
    let key = match shelltrail_proto::seal::PublicKey::from_bytes(key) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(%host, "the agent announces a malformed signing key: {e}");
            return;
        }
    };
    let (store, h) = (store.clone(), host.to_owned());
    match tokio::task::spawn_blocking(move || store.pin_host_key(&h, &key)).await {
        Ok(Ok(KeyPin::New)) => tracing::info!(%host, %key, "pinned the host's session-signing key (first use)"),
        Ok(Ok(KeyPin::Same)) => {}
        Ok(Ok(KeyPin::Different { pinned })) => tracing::error!(
            %host,
            presented = %key,
            %pinned,
            "the host presents another session-signing key than the one pinned: the sessions it seals with it \
             will be flagged. If the host was reinstalled or its key replaced on purpose, remove \
             host-keys/{host} in the collector's data directory; otherwise its certificate may be in other hands"
        ),
        Ok(Err(e)) => tracing::error!(%host, "cannot pin the host's signing key: {e}"),
        Err(e) => tracing::error!(%host, "pinning the host's signing key failed: {e}"),
    }
}

/// In insecure mode, the agent's own hostname, held to the same rules.
fn insecure_host(hello: &AgentHello) -> Result<String, Status> {
    let claim = hello
        .facts
        .as_ref()
        .map(|f| f.hostname.to_ascii_lowercase())
        .unwrap_or_default();
    if valid_host(&claim) {
        Ok(claim)
    } else {
        Err(Status::invalid_argument(
            "insecure mode: AgentHello.facts.hostname must be a valid host name",
        ))
    }
}

fn check_session_id(id: &str) -> Result<(), Status> {
    if valid_session_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument("session id must be a canonical UUID"))
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl Query for Collector {
    async fn list_sessions(&self, req: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        let r = req.get_ref();
        if r.page_token.is_empty() {
            let detail = format!(
                "host={:?} user={:?} since={} until={} state={:?}",
                r.host,
                r.user,
                r.since_unix_ms,
                r.until_unix_ms,
                r.state()
            );
            let about = About {
                action: "list",
                session_id: "",
                host: "",
                detail,
            };
            self.authorize(&req, Need::View, about).await?;
        } else {
            // Further pages of a listing already on record.
            self.check_only(&req, Need::View)?;
        }
        let r = req.into_inner();
        let state = match r.state() {
            list_sessions_request::State::Any => StateFilter::Any,
            list_sessions_request::State::Live => StateFilter::Live,
            list_sessions_request::State::Ended => StateFilter::Ended,
        };
        let filter = ListFilter {
            host: non_empty(r.host),
            user: non_empty(r.user),
            since_unix_ms: (r.since_unix_ms != 0).then_some(r.since_unix_ms),
            until_unix_ms: (r.until_unix_ms != 0).then_some(r.until_unix_ms),
            state,
        };
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let after = match r.page_token.as_str() {
            "" => None,
            t => Some(parse_page_token(t).ok_or_else(|| {
                Status::invalid_argument("page_token is not one this collector issued: list again without it")
            })?),
        };
        let all = self.store.list(&filter);
        // Newest first: (start, id) descending; a page starts after the token's session.
        let from = after.map_or(0, |(start, id)| {
            all.partition_point(|s| (s.start_unix_ms(), s.session_id.as_str()) >= (start, id.as_str()))
        });
        let page = &all[from.min(all.len())..(from + size).min(all.len())];
        let next_page_token = match (page.last(), from + size < all.len()) {
            (Some(last), true) => format!("{}:{}", last.start_unix_ms(), last.session_id),
            _ => String::new(),
        };
        let sessions = page
            .iter()
            .map(|s| {
                let mut info = s.to_proto();
                info.host_connected = self.hosts.connected(&s.host);
                info
            })
            .collect();
        Ok(Response::new(ListSessionsResponse {
            sessions,
            next_page_token,
        }))
    }

    async fn get_session(&self, req: Request<GetSessionRequest>) -> Result<Response<SessionInfo>, Status> {
        let id = req.get_ref().session_id.clone();
        check_session_id(&id)?;
        let found = self.store.info(&id);
        let host = found.as_ref().map(|s| s.host.clone()).unwrap_or_default();
        let about = About {
            action: "info",
            session_id: &id,
            host: &host,
            detail: String::new(),
        };
        self.authorize(&req, Need::View, about).await?;
        let Some(s) = found else {
            return Err(Status::not_found(format!("no session {id}")));
        };
        let mut info = s.to_proto();
        info.host_connected = self.hosts.connected(&s.host);
        // The key its seal must verify with, for `verify` to check and print.
        match self.store.host_key(&s.host) {
            Ok(k) => info.host_key = k.map_or_else(Vec::new, |k| k.0.to_vec()),
            Err(e) => tracing::warn!(host = %s.host, "cannot read the pinned key: {e}"),
        }
        Ok(Response::new(info))
    }

    type ReadChunksStream = BoxStream<ChunkData>;

    async fn read_chunks(&self, req: Request<ReadChunksRequest>) -> Result<Response<Self::ReadChunksStream>, Status> {
        let r = req.get_ref();
        check_session_id(&r.session_id)?;
        let host = self.store.info(&r.session_id).map(|s| s.host).unwrap_or_default();
        let action = match r.purpose.as_str() {
            p @ ("export" | "play" | "verify") => p,
            _ => "read",
        };
        let about = About {
            action,
            session_id: &r.session_id,
            host: &host,
            detail: format!("from chunk {}{}", r.from_seq, if r.follow { ", following" } else { "" }),
        };
        self.authorize(&req, Need::View, about).await?;
        let r = req.into_inner();
        let updates = self
            .store
            .subscribe(&r.session_id)
            .ok_or_else(|| Status::not_found(format!("no session {}", r.session_id)))?;
        let (tx, rx) = mpsc::channel(16);
        let reader = ChunkReader {
            store: self.store.clone(),
            session_id: r.session_id,
            next: r.from_seq,
            follow: r.follow,
            tx,
            updates,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(reader.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TailStream = BoxStream<TailUpdate>;

    async fn tail(&self, req: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        let r = req.get_ref();
        check_session_id(&r.session_id)?;
        let host = self.store.info(&r.session_id).map(|s| s.host).unwrap_or_default();
        let start = match r.start() {
            tail_request::Start::Screen => crate::tail::Start::Screen,
            tail_request::Start::FromStart => crate::tail::Start::From(0),
            tail_request::Start::Resume => crate::tail::Start::From(r.from_seq),
        };
        let detail = match start {
            crate::tail::Start::Screen => "from the current screen".to_string(),
            crate::tail::Start::From(0) => "from the start".to_string(),
            crate::tail::Start::From(n) => format!("resumed at chunk {n}"),
        };
        let about = About {
            action: "tail",
            session_id: &r.session_id,
            host: &host,
            detail: format!("{detail}{}", if r.raw { ", raw" } else { "" }),
        };
        self.authorize(&req, Need::View, about).await?;
        let r = req.into_inner();
        let updates = self
            .store
            .subscribe(&r.session_id)
            .ok_or_else(|| Status::not_found(format!("no session {}", r.session_id)))?;
        let live = !updates.borrow().is_ended();
        let watching = live.then(|| self.hosts.watch(&host, &r.session_id));
        let (tx, rx) = mpsc::channel(64);
        let task = crate::tail::TailTask {
            store: self.store.clone(),
            session_id: r.session_id,
            start,
            raw: r.raw,
            tx,
            updates,
            shutdown: self.shutdown.clone(),
            watching,
        };
        tokio::spawn(task.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn kill(&self, req: Request<KillRequest>) -> Result<Response<OrderReply>, Status> {
        let r = req.get_ref();
        check_session_id(&r.session_id)?;
        let reason = r.reason.trim().to_string();
        let found = self.store.info(&r.session_id);
        let host = found.as_ref().map(|s| s.host.clone()).unwrap_or_default();
        let action = if r.lock { "lock" } else { "kill" };
        let lock = match (r.lock, r.lock_secs) {
            (false, _) => String::new(),
            (true, 0) => ", and lock the user out until unlocked".to_string(),
            (true, n) => format!(", and lock the user out for {n} s"),
        };
        let about = About {
            action,
            session_id: &r.session_id,
            host: &host,
            detail: format!("reason: {reason}{lock}"),
        };
        let caller = self.authorize(&req, Need::Respond, about).await?;
        let r = req.into_inner();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "say why: a reason is required (it is shown to the user and recorded)",
            ));
        }
        let Some(s) = found else {
            return Err(Status::not_found(format!("no session {}", r.session_id)));
        };
        if s.is_ended() {
            return Err(Status::failed_precondition(format!(
                "session {} has already ended",
                r.session_id
            )));
        }
        let body = host_order::Body::Kill(shelltrail_proto::v1::Kill {
            session: r.session_id.clone(),
            reason,
            lock: r.lock,
            lock_secs: r.lock_secs,
        });
        let reply = self.order(&caller, &host, action, &r.session_id, body).await;
        Ok(Response::new(reply))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<OrderReply>, Status> {
        let r = req.get_ref();
        let host = r.host.to_ascii_lowercase();
        if !valid_host(&host) {
            return Err(Status::invalid_argument("host must be a host name (--host)"));
        }
        let user: String = r.user.chars().take(64).collect();
        let about = About {
            action: "unlock",
            session_id: "",
            host: &host,
            detail: format!("user {user:?}"),
        };
        let caller = self.authorize(&req, Need::Respond, about).await?;
        if user.is_empty() {
            return Err(Status::invalid_argument("name the user to unlock"));
        }
        let body = host_order::Body::Unlock(shelltrail_proto::v1::Unlock { user });
        Ok(Response::new(self.order(&caller, &host, "unlock", "", body).await))
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        let r = req.get_ref();
        if !r.session_id.is_empty() {
            check_session_id(&r.session_id)?;
        }
        let about = About {
            action: "audit",
            session_id: &r.session_id,
            host: "",
            detail: String::new(),
        };
        self.authorize(&req, Need::View, about).await?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n => (n as usize).min(100_000),
        };
        let audit = self.audit.clone();
        let entries = tokio::task::spawn_blocking(move || audit.read(&r.session_id, limit))
            .await
            .map_err(|e| Status::internal(format!("audit reader failed: {e}")))?
            .map_err(|e| Status::unavailable(format!("cannot read the audit log: {e}")))?;
        Ok(Response::new(AuditResponse {
            entries: entries.iter().map(Entry::to_proto).collect(),
        }))
    }
}

impl Collector {
    /// The role check of [`Self::authorize`] without an audit entry, for
    /// the further pages of a listing whose first page is on record.
    fn check_only<T>(&self, req: &Request<T>, need: Need) -> Result<(), Status> {
        match self.peer(req, Role::Operator)? {
            None => Ok(()),
            Some(peer) => self.access.check(&peer, need).map_err(Status::permission_denied),
        }
    }

    /// Hands an order to `host`'s agent and says what became of it, in the
    /// reply and in the audit log.
    async fn order(
        &self,
        caller: &Caller,
        host: &str,
        action: &str,
        session_id: &str,
        body: host_order::Body,
    ) -> OrderReply {
        let by = format!("{} (operator, from {}) via the collector", caller.who, caller.from);
        let entry = |detail: String| Entry {
            unix_ms: crate::hosts::now_ms(),
            who: caller.who.clone(),
            from: caller.from.clone(),
            action: action.to_owned(),
            session_id: session_id.to_owned(),
            host: host.to_owned(),
            detail,
            allowed: true,
        };
        let outcome = self.hosts.order(host, &by, body, entry(String::new())).await;
        let reply = match outcome {
            Outcome::Done { ok, message } => OrderReply {
                state: order_reply::State::Delivered.into(),
                ok,
                message,
                expires_unix_ms: 0,
            },
            Outcome::NoAnswer => OrderReply {
                state: order_reply::State::Delivered.into(),
                ok: false,
                message: format!(
                    "sent to the agent of {host}, which did not answer within {} s; its answer will be in the audit log",
                    crate::hosts::ANSWER_WAIT.as_secs()
                ),
                expires_unix_ms: 0,
            },
            Outcome::Queued { expires_unix_ms } => OrderReply {
                state: order_reply::State::Queued.into(),
                ok: false,
                message: format!(
                    "the agent of {host} is not connected: the order is queued and goes to it when it reconnects \
                     (for {} minutes, while this collector runs); `shelltrail audit` shows when it was done",
                    crate::hosts::ORDER_TTL.as_secs() / 60
                ),
                expires_unix_ms,
            },
        };
        let detail = match (reply.state(), reply.ok) {
            (order_reply::State::Queued, _) => format!("queued: {}", reply.message),
            (_, true) => format!("done: {}", reply.message),
            (_, false) => format!("failed: {}", reply.message),
        };
        if let Err(e) = self.record(entry(detail)).await {
            tracing::error!("{e}");
        }
        reply
    }
}

/// Streams a session's chunks; with `follow`, waits for new commits until
/// the session ends.
struct ChunkReader {
    store: Arc<Store>,
    session_id: String,
    next: u64,
    follow: bool,
    tx: mpsc::Sender<Result<ChunkData, Status>>,
    updates: watch::Receiver<crate::store::SessionSummary>,
    shutdown: watch::Receiver<bool>,
}

impl ChunkReader {
    async fn run(mut self) {
        loop {
            // Marks this state seen before reading, so a commit made during
            // the read wakes the wait below.
            let summary = self.updates.borrow_and_update().clone();
            let store = self.store.clone();
            let id = self.session_id.clone();
            let next = self.next;
            let read = tokio::task::spawn_blocking(move || store.read_chunks(&id, next, READ_BATCH_BYTES)).await;
            let chunks = match read {
                Ok(Ok(chunks)) => chunks,
                Ok(Err(e)) => {
                    tracing::error!(session = %self.session_id, "cannot read chunks: {e}");
                    let _ = self.tx.send(Err(Status::data_loss(e.to_string()))).await;
                    return;
                }
                Err(e) => {
                    tracing::error!(session = %self.session_id, "chunk reader failed: {e}");
                    let _ = self.tx.send(Err(Status::internal("chunk reader failed"))).await;
                    return;
                }
            };
            if !chunks.is_empty() {
                for c in chunks {
                    self.next = c.last_seq + 1;
                    let msg = ChunkData {
                        session_id: self.session_id.clone(),
                        seq: c.seq,
                        data: c.bytes,
                    };
                    if self.tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            // Caught up with everything committed when `summary` was taken.
            if !self.follow || summary.is_ended() {
                return;
            }
            if let Some(reason) = summary.quarantine.as_ref().or(summary.damaged.as_ref()) {
                let status = Status::failed_precondition(format!("session stopped: {reason}"));
                let _ = self.tx.send(Err(status)).await;
                return;
            }
            tokio::select! {
                changed = self.updates.changed() => if changed.is_err() { return },
                _ = self.tx.closed() => return,
                () = stopped(&mut self.shutdown) => {
                    let _ = self.tx.send(Err(Status::unavailable("the collector is shutting down"))).await;
                    return;
                }
            }
        }
    }
}

/// A socket address for a log line: `127.0.0.1:39188`, not `Some(127.0.0.1:39188)`.
pub(crate) fn addr(a: Option<std::net::SocketAddr>) -> String {
    a.map_or_else(|| "unknown".to_string(), |a| a.to_string())
}
