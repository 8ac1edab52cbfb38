//! The hosts whose agents are connected now, and what operators ask of them.
//!
//! Every agent keeps one `Ship` stream open; this is where the collector
//! finds it again to hand it a [`HostOrder`]: end a session, unlock a user,
//! or watch a session (cut its chunks every few milliseconds while someone
//! tails it here). An order for a host whose agent is not connected waits
//! here, in memory, until that agent reconnects or the order expires
//! ([`ORDER_TTL`]); a collector restart forgets it, and the audit log says
//! it was queued and never says it was done. The agent answers an order
//! with an [`OrderResult`]: the operator waiting gets it, and a result that
//! comes after the operator stopped waiting (a queued order) goes into the
//! audit log.

use crate::audit::{AuditLog, Entry};
use shelltrail_proto::v1::{HostOrder, OrderResult, ShipResponse, WatchSession, host_order, ship_response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a queued order waits for its host's agent.
pub const ORDER_TTL: Duration = Duration::from_secs(3600);
/// How long an operator waits for a connected agent's answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(20);

/// What became of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The agent answered.
    Done { ok: bool, message: String },
    /// Sent to the connected agent, which did not answer in time.
    NoAnswer,
    /// The host's agent is not connected: sent when it reconnects, if it
    /// does before this time.
    Queued { expires_unix_ms: i64 },
}

/// Where a connected agent's orders go: merged into its `Ship` response stream.
pub type OrderSender = mpsc::UnboundedSender<Result<ShipResponse, tonic::Status>>;

struct Link {
    epoch: u64,
    tx: OrderSender,
}

struct Queued {
    order: HostOrder,
    expires_unix_ms: i64,
    audit: Entry,
}

struct Waiter {
    reply: Option<oneshot::Sender<OrderResult>>,
    audit: Entry,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    next_epoch: u64,
    links: HashMap<String, Link>,
    queued: HashMap<String, Vec<Queued>>,
    waiting: HashMap<u64, Waiter>,
    /// Sessions tailed here: their host and how many tailers.
    watched: HashMap<String, (String, usize)>,
}

/// The registry; one per collector.
pub struct Hosts {
    inner: Mutex<Inner>,
    audit: Arc<AuditLog>,
}

fn order(id: u64, by: &str, body: host_order::Body) -> HostOrder {
    HostOrder {
        id,
        by: by.to_owned(),
        body: Some(body),
    }
}

fn wrap(o: HostOrder) -> Result<ShipResponse, tonic::Status> {
    Ok(ShipResponse {
        body: Some(ship_response::Body::Order(o)),
    })
}

fn watch_order(session: &str, watching: bool) -> HostOrder {
    order(
        0,
        "",
        host_order::Body::Watch(WatchSession {
            session_id: session.to_owned(),
            watching,
        }),
    )
}

impl Hosts {
    pub fn new(audit: Arc<AuditLog>) -> Arc<Hosts> {
        Arc::new(Hosts {
            inner: Mutex::new(Inner::default()),
            audit,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An agent of `host` connected: its stream takes orders from now on,
    /// starting with those queued for it and the watches of its sessions.
    /// Returns the link's epoch, for [`disconnect`](Self::disconnect).
    pub fn connect(&self, host: &str, tx: OrderSender) -> u64 {
        let now = now_ms();
        let mut expired = Vec::new();
        let epoch = {
            let mut g = self.lock();
            let inner = &mut *g;
            inner.next_epoch += 1;
            let epoch = inner.next_epoch;
            for (session, (h, _)) in &inner.watched {
                if h == host {
                    let _ = tx.send(wrap(watch_order(session, true)));
                }
            }
            for q in inner.queued.remove(host).unwrap_or_default() {
                if q.expires_unix_ms <= now {
                    expired.push(q.audit);
                    continue;
                }
                let id = q.order.id;
                if tx.send(wrap(q.order)).is_ok() {
                    inner.waiting.insert(
                        id,
                        Waiter {
                            reply: None,
                            audit: q.audit,
                        },
                    );
                }
            }
            inner.links.insert(host.to_owned(), Link { epoch, tx });
            epoch
        };
        for mut e in expired {
            e.unix_ms = now;
            e.detail = format!("expired undelivered: {}", e.detail);
            self.record(e);
        }
        epoch
    }

    /// The stream of `epoch` ended (a newer one of the same host stays).
    pub fn disconnect(&self, host: &str, epoch: u64) {
        let mut g = self.lock();
        if g.links.get(host).is_some_and(|l| l.epoch == epoch) {
            g.links.remove(host);
        }
    }

    /// Whether `host`'s agent is connected now.
    pub fn connected(&self, host: &str) -> bool {
        self.lock().links.contains_key(host)
    }

    /// Hands `body` to `host`'s agent, on behalf of `by`, and waits for its
    /// answer; queues it if the agent is not connected. `audit` describes
    /// the order for a late answer's audit entry.
    pub async fn order(&self, host: &str, by: &str, body: host_order::Body, audit: Entry) -> Outcome {
        let (tx, rx) = oneshot::channel();
        {
            let mut g = self.lock();
            let inner = &mut *g;
            inner.next_id += 1;
            let o = order(inner.next_id, by, body);
            let id = o.id;
            let sent = inner
                .links
                .get(host)
                .is_some_and(|l| l.tx.send(wrap(o.clone())).is_ok());
            if !sent {
                let expires_unix_ms = now_ms() + ORDER_TTL.as_millis() as i64;
                inner.queued.entry(host.to_owned()).or_default().push(Queued {
                    order: o,
                    expires_unix_ms,
                    audit,
                });
                return Outcome::Queued { expires_unix_ms };
            }
            inner.waiting.insert(id, Waiter { reply: Some(tx), audit });
        }
        match tokio::time::timeout(ANSWER_WAIT, rx).await {
            Ok(Ok(r)) => Outcome::Done {
                ok: r.ok,
                message: r.message,
            },
            _ => Outcome::NoAnswer,
        }
    }

    /// An agent of `host` answered an order.
    pub fn result(&self, host: &str, r: OrderResult) {
        let w = {
            let mut g = self.lock();
            match g.waiting.get(&r.id) {
                None => None,
                // Only the host the order went to may answer it.
                Some(w) if w.audit.host != host => {
                    tracing::warn!(%host, id = r.id, "an answer from another host than the order's; ignored");
                    return;
                }
                Some(_) => g.waiting.remove(&r.id),
            }
        };
        let Some(w) = w else {
            tracing::warn!(%host, id = r.id, "an answer to no order of this collector");
            return;
        };
        let late = match w.reply {
            Some(reply) => reply.send(r.clone()).is_err(),
            None => true,
        };
        if late {
            let mut e = w.audit;
            e.unix_ms = now_ms();
            e.allowed = true;
            e.detail = format!(
                "{} (delivered later): {}",
                if r.ok { "done" } else { "failed" },
                r.message
            );
            self.record(e);
        }
    }

    /// Someone tails `session` of `host` here: while the guard lives, its
    /// agent is asked to cut the session's chunks fast.
    pub fn watch(self: &Arc<Self>, host: &str, session: &str) -> WatchGuard {
        let mut g = self.lock();
        let inner = &mut *g;
        let n = &mut inner
            .watched
            .entry(session.to_owned())
            .or_insert((host.to_owned(), 0))
            .1;
        *n += 1;
        if *n == 1
            && let Some(l) = inner.links.get(host)
        {
            let _ = l.tx.send(wrap(watch_order(session, true)));
        }
        WatchGuard {
            hosts: self.clone(),
            session: session.to_owned(),
        }
    }

    fn unwatch(&self, session: &str) {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some((host, n)) = inner.watched.get_mut(session) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            let host = host.clone();
            inner.watched.remove(session);
            if let Some(l) = inner.links.get(&host) {
                let _ = l.tx.send(wrap(watch_order(session, false)));
            }
        }
    }

    fn record(&self, e: Entry) {
        let audit = self.audit.clone();
        let write = move || {
            if let Err(err) = audit.append(&e) {
                tracing::error!("{err}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}

/// Keeps a session watched; see [`Hosts::watch`].
pub struct WatchGuard {
    hosts: Arc<Hosts>,
    session: String,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.hosts.unwatch(&self.session);
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shelltrail_proto::v1::{Kill, host_order::Body};

    fn entry(host: &str) -> Entry {
        Entry {
            unix_ms: 0,
            who: "alice".into(),
            from: "here".into(),
            action: "kill".into(),
            session_id: "s".into(),
            host: host.into(),
            detail: "why".into(),
            allowed: true,
        }
    }

    fn kill() -> Body {
        Body::Kill(Kill {
            session: "s".into(),
            reason: "why".into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn an_order_for_an_absent_host_waits_for_it_and_its_late_answer_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(AuditLog::open(dir.path()).unwrap());
        let hosts = Hosts::new(audit.clone());
        let out = hosts.order("web-1", "alice", kill(), entry("web-1")).await;
        assert!(matches!(out, Outcome::Queued { .. }), "{out:?}");

        let (tx, mut rx) = mpsc::unbounded_channel();
        let epoch = hosts.connect("web-1", tx);
        let Some(Ok(ShipResponse {
            body: Some(ship_response::Body::Order(o)),
        })) = rx.recv().await
        else {
            panic!("the queued order is sent on connect");
        };
        assert!(matches!(o.body, Some(Body::Kill(_))));
        // Another host cannot answer it.
        hosts.result(
            "web-2",
            OrderResult {
                id: o.id,
                ok: true,
                message: "forged".into(),
            },
        );
        hosts.result(
            "web-1",
            OrderResult {
                id: o.id,
                ok: true,
                message: "ended".into(),
            },
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = audit.read("s", 10).unwrap();
        assert_eq!(log.len(), 1, "{log:?}");
        assert!(
            log[0].detail.contains("delivered later") && log[0].detail.contains("ended"),
            "{log:?}"
        );
        hosts.disconnect("web-1", epoch);
        assert!(!hosts.connected("web-1"));
    }

    #[tokio::test]
    async fn watches_are_sent_once_per_session_and_again_on_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = Hosts::new(Arc::new(AuditLog::open(dir.path()).unwrap()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let epoch = hosts.connect("h", tx);
        let a = hosts.watch("h", "s");
        let b = hosts.watch("h", "s");
        let watching = |r: Option<Result<ShipResponse, tonic::Status>>| match r {
            Some(Ok(ShipResponse {
                body:
                    Some(ship_response::Body::Order(HostOrder {
                        body: Some(Body::Watch(w)),
                        ..
                    })),
            })) => w.watching,
            other => panic!("{other:?}"),
        };
        assert!(watching(rx.recv().await));
        drop(a);
        assert!(rx.try_recv().is_err(), "one tailer left: still watched");
        hosts.disconnect("h", epoch);
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        hosts.connect("h", tx2);
        assert!(watching(rx2.recv().await), "a reconnected agent is told again");
        drop(b);
        assert!(!watching(rx2.recv().await));
    }
}
