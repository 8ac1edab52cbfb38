//! A fault-injecting TCP proxy between an agent and the collector.
//!
//! The agent's `[ship] collector` points at the proxy's loopback port; the
//! proxy forwards every byte to the collector and back until the test tells
//! it to misbehave:
//!
//! * [`FaultProxy::cut_all`]: close every connection now (both sides see EOF);
//! * [`FaultProxy::cut_after`]: close each connection after it has forwarded
//!   a random number of further bytes (so the cut lands mid-record, mid-frame);
//! * [`FaultProxy::stall`]: stop forwarding, close nothing (a congested link);
//! * [`FaultProxy::blackhole`]: current and new connections are read and
//!   their bytes swallowed, never answered, never closed (a dead route);
//!   a swallowed connection stays swallowed after [`FaultProxy::pass`];
//! * [`FaultProxy::refuse`]: stop listening and drop every connection (the
//!   collector's host is down);
//! * [`FaultProxy::pass`]: forward again (listening again on the same port).
//!
//! It is plain threads on blocking sockets with short read timeouts, so every
//! thread notices a mode change or the end of the proxy within tens of
//! milliseconds. Everything stops when the proxy is dropped, and in any case
//! after [`MAX_LIFETIME`]: a forgotten proxy cannot outlive its test for long.
//! Randomness comes from a seeded [`XorShift`], so a failing run can be replayed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The proxy shuts itself down after this long, whatever the test does.
pub const MAX_LIFETIME: Duration = Duration::from_secs(600);
/// How often blocked threads look at the mode and the stop flag.
const TICK: Duration = Duration::from_millis(10);

/// xorshift64: a tiny deterministic generator for cut points and intervals.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Stall,
    Blackhole,
    Refuse,
}

/// Counters, for assertions and failure messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections the proxy closed on command (cut, refuse).
    pub cut: u64,
    /// Of those, connections that had carried more than a TLS handshake's
    /// worth of bytes: cut in the middle of shipping.
    pub cut_mid_stream: u64,
    /// Connections that were swallowed by a blackhole.
    pub swallowed: u64,
    /// Bytes forwarded agent → collector and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Bytes a connection carries before it is more than a handshake: TLS 1.3
/// with client certificates, the HTTP/2 prefaces and the ingest hellos come
/// to about 2.2 KB both ways with `shelltrail pki` certificates.
const HANDSHAKE_BYTES: u64 = 4 << 10;

struct Conn {
    id: u64,
    client: TcpStream,
    upstream: Option<TcpStream>,
    closed: AtomicBool,
    swallowed: AtomicBool,
    /// Bytes still to forward before the connection is cut (`u64::MAX`: no limit).
    budget: AtomicU64,
    forwarded: AtomicU64,
}

impl Conn {
    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = self.client.shutdown(Shutdown::Both);
            if let Some(u) = &self.upstream {
                let _ = u.shutdown(Shutdown::Both);
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Takes up to `n` bytes from the budget; returns how many may be forwarded.
    fn take_budget(&self, n: u64) -> u64 {
        let mut cur = self.budget.load(Ordering::SeqCst);
        loop {
            if cur == u64::MAX {
                return n;
            }
            let take = cur.min(n);
            match self
                .budget
                .compare_exchange(cur, cur - take, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return take,
                Err(now) => cur = now,
            }
        }
    }
}

struct Inner {
    upstream: SocketAddr,
    port: u16,
    mode: Mutex<Mode>,
    conns: Mutex<Vec<Arc<Conn>>>,
    rng: Mutex<XorShift>,
    stop: AtomicBool,
    deadline: Instant,
    stats: Mutex<ProxyStats>,
    /// What happened, in order (printed when a test fails).
    events: Mutex<Vec<String>>,
    started: Instant,
    next_id: AtomicU64,
}

impl Inner {
    fn mode(&self) -> Mode {
        *self.mode.lock().expect("proxy mode lock")
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || Instant::now() >= self.deadline
    }

    fn event(&self, what: String) {
        let t = self.started.elapsed().as_secs_f64();
        self.events
            .lock()
            .expect("proxy events lock")
            .push(format!("{t:8.3}s {what}"));
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, ProxyStats> {
        self.stats.lock().expect("proxy stats lock")
    }

    /// Closes a connection on command and counts it.
    fn cut(&self, c: &Conn, why: &str) {
        if c.is_closed() {
            return;
        }
        c.close();
        let fwd = c.forwarded.load(Ordering::SeqCst);
        {
            let mut s = self.stats();
            s.cut += 1;
            if fwd > HANDSHAKE_BYTES {
                s.cut_mid_stream += 1;
            }
        }
        self.event(format!("conn {} cut ({why}) after {fwd} bytes", c.id));
    }

    fn live_conns(&self) -> Vec<Arc<Conn>> {
        let mut conns = self.conns.lock().expect("proxy conns lock");
        conns.retain(|c| !c.is_closed());
        conns.clone()
    }
}

/// See the module documentation. Dropping it stops every thread and closes
/// every connection.
pub struct FaultProxy {
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a new loopback port forwarding to `upstream`, passing
    /// traffic. `seed` drives every random choice it makes.
    pub fn start(upstream: SocketAddr, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let inner = Arc::new(Inner {
            upstream,
            port,
            mode: Mutex::new(Mode::Pass),
            conns: Mutex::new(Vec::new()),
            rng: Mutex::new(XorShift::new(seed)),
            stop: AtomicBool::new(false),
            deadline: Instant::now() + MAX_LIFETIME,
            stats: Mutex::new(ProxyStats::default()),
            events: Mutex::new(Vec::new()),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
        });
        let acceptor = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("faultproxy-{port}"))
                .spawn(move || accept_loop(inner, Some(listener)))
                .expect("starting the proxy thread")
        };
        FaultProxy {
            inner,
            acceptor: Some(acceptor),
        }
    }

    /// The port agents connect to.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.inner.port)
    }

    fn set_mode(&self, m: Mode) {
        *self.inner.mode.lock().expect("proxy mode lock") = m;
        self.inner.event(format!("mode {m:?}"));
    }

    /// Forward traffic (and listen) again.
    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }

    /// Stop forwarding without closing anything.
    pub fn stall(&self) {
        self.set_mode(Mode::Stall);
    }

    /// Swallow every byte of every current and new connection.
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    /// Stop listening (new connections are refused) and drop every connection.
    pub fn refuse(&self) {
        self.set_mode(Mode::Refuse);
        self.cut_all();
    }

    /// Closes every current connection now.
    pub fn cut_all(&self) {
        for c in self.inner.live_conns() {
            self.inner.cut(&c, "cut now");
        }
    }

    /// Closes each current connection after it has forwarded a random number
    /// of further bytes, up to `max_bytes`. Returns how many connections were armed.
    pub fn cut_after(&self, max_bytes: u64) -> usize {
        let conns = self.inner.live_conns();
        for c in &conns {
            let n = self.inner.rng.lock().expect("proxy rng lock").range(0, max_bytes);
            c.budget.store(n, Ordering::SeqCst);
            if n == 0 {
                self.inner.cut(c, "cut after 0 bytes");
            }
        }
        conns.len()
    }

    /// Connections currently open (forwarding, stalled or swallowed).
    pub fn open_connections(&self) -> usize {
        self.inner.live_conns().len()
    }

    pub fn stats(&self) -> ProxyStats {
        *self.inner.stats()
    }

    /// What the proxy did, one line per event.
    pub fn events(&self) -> String {
        self.inner.events.lock().expect("proxy events lock").join("\n")
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        for c in self.inner.conns.lock().map(|c| c.clone()).unwrap_or_default() {
            c.close();
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(inner: Arc<Inner>, mut listener: Option<TcpListener>) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    while !inner.stopping() {
        pumps.retain(|t| !t.is_finished());
        if inner.mode() == Mode::Refuse {
            if listener.take().is_some() {
                inner.event("stopped listening".into());
            }
            std::thread::sleep(TICK);
            continue;
        }
        if listener.is_none() {
            // The same port again (std sets SO_REUSEADDR); retried until free.
            match TcpListener::bind(("127.0.0.1", inner.port)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => {
                    inner.event("listening again".into());
                    listener = Some(l);
                }
                Err(_) => {
                    std::thread::sleep(TICK);
                    continue;
                }
            }
        }
        let Some(l) = &listener else { continue };
        match l.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                pumps.extend(connection(&inner, client));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(e) => {
                inner.event(format!("accept failed: {e}"));
                std::thread::sleep(TICK);
            }
        }
    }
    for c in inner.conns.lock().map(|c| c.clone()).unwrap_or_default() {
        c.close();
    }
    for t in pumps {
        let _ = t.join();
    }
}

/// Sets up one accepted connection; returns its threads.
fn connection(inner: &Arc<Inner>, client: TcpStream) -> Vec<JoinHandle<()>> {
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    inner.stats().accepted += 1;
    let swallow = inner.mode() == Mode::Blackhole;
    let upstream = if swallow {
        None
    } else {
        match TcpStream::connect_timeout(&inner.upstream, Duration::from_secs(2)) {
            Ok(u) => Some(u),
            Err(e) => {
                // The collector is down: the agent sees its connection closed at once.
                inner.event(format!("conn {id}: upstream unreachable ({e}); closed"));
                let _ = client.shutdown(Shutdown::Both);
                return Vec::new();
            }
        }
    };
    for s in std::iter::once(&client).chain(upstream.as_ref()) {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(TICK * 2));
    }
    let conn = Arc::new(Conn {
        id,
        client,
        upstream,
        closed: AtomicBool::new(false),
        swallowed: AtomicBool::new(swallow),
        budget: AtomicU64::new(u64::MAX),
        forwarded: AtomicU64::new(0),
    });
    if swallow {
        inner.stats().swallowed += 1;
    }
    inner.event(format!(
        "conn {id} accepted{}",
        if swallow { " into the blackhole" } else { "" }
    ));
    inner.conns.lock().expect("proxy conns lock").push(conn.clone());
    let mut threads = Vec::new();
    let pairs: Vec<(bool, &TcpStream, Option<&TcpStream>)> = match &conn.upstream {
        Some(u) => vec![(true, &conn.client, Some(u)), (false, u, Some(&conn.client))],
        None => vec![(true, &conn.client, None)],
    };
    for (up, from, to) in pairs {
        let (Ok(from), to) = (from.try_clone(), to.map(|t| t.try_clone())) else {
            conn.close();
            break;
        };
        let to = match to {
            Some(Ok(t)) => Some(t),
            Some(Err(_)) => {
                conn.close();
                break;
            }
            None => None,
        };
        let (inner, mine) = (inner.clone(), conn.clone());
        match std::thread::Builder::new()
            .name(format!("faultproxy-conn-{id}"))
            .spawn(move || pump(&inner, &mine, from, to, up))
        {
            Ok(t) => threads.push(t),
            Err(_) => conn.close(),
        }
    }
    threads
}

/// Copies `from` → `to` according to the mode until the connection closes.
fn pump(inner: &Inner, conn: &Conn, mut from: TcpStream, mut to: Option<TcpStream>, up: bool) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if inner.stopping() || conn.is_closed() {
            conn.close();
            return;
        }
        let mode = inner.mode();
        if mode == Mode::Refuse {
            // Also a connection accepted just before the refusal, which
            // `refuse` could not see yet: the collector's host is down.
            inner.cut(conn, "refused");
            return;
        }
        if mode == Mode::Blackhole && !conn.swallowed.swap(true, Ordering::SeqCst) {
            inner.stats().swallowed += 1;
            inner.event(format!("conn {} swallowed by the blackhole", conn.id));
        }
        let swallowing = conn.swallowed.load(Ordering::SeqCst);
        if mode == Mode::Stall && !swallowing {
            // Nothing read, nothing written: the kernel buffers fill and both ends wait.
            std::thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                conn.close();
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => {
                conn.close();
                return;
            }
        };
        if swallowing {
            continue;
        }
        let Some(to) = to.as_mut() else { continue };
        let allowed = conn.take_budget(n as u64) as usize;
        if allowed > 0 && to.write_all(&buf[..allowed]).is_err() {
            conn.close();
            return;
        }
        conn.forwarded.fetch_add(allowed as u64, Ordering::SeqCst);
        {
            let mut s = inner.stats();
            if up {
                s.bytes_up += allowed as u64;
            } else {
                s.bytes_down += allowed as u64;
            }
        }
        if allowed < n || conn.budget.load(Ordering::SeqCst) == 0 {
            inner.cut(conn, "byte budget spent");
            return;
        }
    }
}
