//! What one local user can make the agent spend, and what happens at the limit.
//!
//! Every user on the host can connect to the agent's socket (it is 0666:
//! identity comes from SO_PEERCRED), so every resource a connection can make
//! the agent spend is bounded here, per user, and the one who reaches a
//! limit is the one who waits or is refused:
//!
//! * descriptors: connections per uid, checked as they are accepted, and in
//!   total ([`Limits::connection`]);
//! * memory: frame bytes read and not yet durable, per connection, per uid
//!   and in total ([`ConnMemory::reserve`]); a connection waiting for room
//!   stops reading, so the kernel's socket buffer, not the agent, holds the rest;
//! * the spool: recording per session and per uid, the spool's cap and its
//!   disk's free-space floor, checked on every chunk ([`Limits::charge`]);
//! * sessions: open sessions per uid ([`Limits::session`]).
//!
//! The recorder's own user (`recorder_user`) carries every user's sessions,
//! so it gets the totals, not a single user's share. Per-uid spool quotas
//! count the session's user (the uid the recorder names), never the
//! recorder's.

use crate::agent::spool::{Holdings, Stats};
use crate::config::AgentConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often the free space of the spool's filesystem is measured; between
/// measurements, what the spool grew by is subtracted.
const DISK_EVERY: Duration = Duration::from_millis(250);
/// A repeated warning (accept errors, refused connections) is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shared limits of one agent.
pub struct Limits {
    cfg: AgentConfig,
    /// Room that must be left for a new session, under the uid's quota and
    /// the spool's cap: one chunk (`shell.chunk_bytes`), or the session
    /// would be held at once.
    headroom: u64,
    /// The uid of `recorder_user`, if that user exists.
    recorder_uid: Option<u32>,
    stats: Arc<Stats>,
    spool_dir: PathBuf,
    /// The cap on connections at once (`max_connections`, lowered to what
    /// the descriptor limit allows).
    max_connections: u32,
    conns: Mutex<Counts>,
    sessions: Mutex<HashMap<u32, u32>>,
    memory: Arc<Semaphore>,
    uid_memory: Mutex<HashMap<u32, Arc<Semaphore>>>,
    /// Chunk checks (decompression and hashing) at once: each may allocate
    /// up to `MAX_RAW_LEN`, so they are few.
    pub checks: Semaphore,
    disk: Mutex<Disk>,
    /// Per key: when it was last logged, and how often it happened since.
    logs: Mutex<HashMap<String, (Option<Instant>, u64)>>,
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_uid: HashMap<u32, u32>,
}

struct Disk {
    measured: Option<Instant>,
    free: u64,
    /// The spool's size when `free` was measured.
    spool_then: u64,
}

impl Limits {
    pub fn new(
        cfg: &AgentConfig,
        headroom: u64,
        recorder_uid: Option<u32>,
        stats: Arc<Stats>,
        spool_dir: PathBuf,
        max_connections: u32,
    ) -> Arc<Limits> {
        let checks = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Limits {
            cfg: cfg.clone(),
            headroom: headroom.min(cfg.spool_max_bytes_per_uid),
            recorder_uid,
            stats,
            spool_dir,
            max_connections,
            conns: Mutex::new(Counts::default()),
            sessions: Mutex::new(HashMap::new()),
            memory: Arc::new(Semaphore::new(cfg.buffer_bytes as usize)),
            uid_memory: Mutex::new(HashMap::new()),
            checks: Semaphore::new(checks),
            disk: Mutex::new(Disk {
                measured: None,
                free: u64::MAX,
                spool_then: 0,
            }),
            logs: Mutex::new(HashMap::new()),
        })
    }

    /// The uid of `recorder_user`, if that user exists.
    pub fn recorder_uid(&self) -> Option<u32> {
        self.recorder_uid
    }

    /// Whether `uid` is the recorder's own user.
    pub fn is_recorder(&self, uid: u32) -> bool {
        self.recorder_uid == Some(uid)
    }

    /// Takes a connection slot for a peer of `uid`, as the connection is
    /// accepted; the slot is given back when it is dropped.
    pub fn connection(self: &Arc<Self>, uid: u32) -> Result<ConnSlot, String> {
        let mut c = self.conns.lock().expect("conns lock");
        if c.total >= self.max_connections {
            return Err(format!(
                "the agent has {} connections open, its limit (max_connections)",
                c.total
            ));
        }
        let n = c.per_uid.get(&uid).copied().unwrap_or(0);
        let cap = if self.is_recorder(uid) {
            self.max_connections
        } else {
            self.cfg.max_connections_per_uid
        };
        if n >= cap {
            return Err(format!(
                "uid {uid} has {n} connections to the agent open, its limit (max_connections_per_uid)"
            ));
        }
        c.total += 1;
        c.per_uid.insert(uid, n + 1);
        Ok(ConnSlot {
            limits: self.clone(),
            uid,
        })
    }

    /// The memory budget of a new connection of a peer of `uid`.
    pub fn conn_memory(&self, uid: u32) -> ConnMemory {
        let frame = self.cfg.max_frame_bytes as usize;
        let total = self.cfg.buffer_bytes as usize;
        let uid_sem = (!self.is_recorder(uid)).then(|| {
            let share = (total / 4).max(frame).min(total);
            self.uid_memory
                .lock()
                .expect("uid memory lock")
                .entry(uid)
                .or_insert_with(|| Arc::new(Semaphore::new(share)))
                .clone()
        });
        ConnMemory {
            conn: Arc::new(Semaphore::new((2 * frame).min(total))),
            uid: uid_sem,
            total: self.memory.clone(),
        }
    }

    /// Takes one of `uid`'s session slots (`max_sessions_per_uid`), if any is free.
    pub fn session(self: &Arc<Self>, uid: u32) -> Result<SessionSlot, String> {
        let mut s = self.sessions.lock().expect("sessions lock");
        let n = s.get(&uid).copied().unwrap_or(0);
        if n >= self.cfg.max_sessions_per_uid {
            return Err(format!(
                "uid {uid} already has {n} recorded sessions open (max_sessions_per_uid)"
            ));
        }
        s.insert(uid, n + 1);
        Ok(SessionSlot {
            limits: self.clone(),
            uid,
        })
    }

    /// Why a new session of `uid` cannot be taken, if it cannot: less than
    /// one chunk of room is left under the spool's cap, above its disk's
    /// floor, or under the uid's quota (the session would be held at once).
    pub fn admission(&self, uid: u32) -> Option<String> {
        if let Some(why) = self.spool_full(self.headroom) {
            return Some(why);
        }
        let held = self.stats.holdings.lock().expect("holdings lock").uid(uid);
        (held + self.headroom > self.cfg.spool_max_bytes_per_uid).then(|| self.uid_quota(uid, held))
    }

    /// Counts `n` more bytes of recording for session `sid` of `uid` if every
    /// limit allows them, else says which one does not. Charged bytes are
    /// given back with [`refund`](Self::refund) if the write fails.
    ///
    /// Writes are queued before they are counted in the spool's size, so the
    /// spool's cap and free-space floor can be passed by what is queued at
    /// that moment: at most `buffer_bytes`, which holds every queued chunk.
    pub fn charge(&self, uid: u32, sid: &str, n: u64) -> Result<(), String> {
        let mut h = self.stats.holdings.lock().expect("holdings lock");
        self.fits(&h, uid, sid, n)?;
        h.add(uid, sid, n);
        Ok(())
    }

    /// Whether `n` more bytes of session `sid` of `uid` fit every limit.
    fn fits(&self, h: &Holdings, uid: u32, sid: &str, n: u64) -> Result<(), String> {
        if let Some(why) = self.spool_full(n) {
            return Err(why);
        }
        let session = h.session(sid);
        if session + n > self.cfg.spool_max_bytes_per_session {
            return Err(format!(
                "the session holds {session} bytes in the spool; {n} more would pass its limit of {} \
                 (spool_max_bytes_per_session)",
                self.cfg.spool_max_bytes_per_session
            ));
        }
        let user = h.uid(uid);
        if user + n > self.cfg.spool_max_bytes_per_uid {
            return Err(self.uid_quota(uid, user));
        }
        Ok(())
    }

    /// Gives back what [`charge`](Self::charge) counted for a write that failed.
    pub fn refund(&self, uid: u32, sid: &str, n: u64) {
        self.stats.holdings.lock().expect("holdings lock").release(uid, sid, n);
    }

    /// Whether a held session's chunk of `n` bytes would fit now.
    pub fn room(&self, uid: u32, sid: &str, n: u64) -> bool {
        let h = self.stats.holdings.lock().expect("holdings lock");
        self.fits(&h, uid, sid, n).is_ok()
    }

    fn uid_quota(&self, uid: u32, held: u64) -> String {
        format!(
            "uid {uid}'s sessions hold {held} bytes in the spool, their limit is {} (spool_max_bytes_per_uid)",
            self.cfg.spool_max_bytes_per_uid
        )
    }

    /// Why `n` more bytes do not fit the spool's cap or its disk's floor.
    fn spool_full(&self, n: u64) -> Option<String> {
        let used = self.stats.total_bytes.load(Ordering::Relaxed);
        if used + n > self.cfg.spool_max_bytes {
            return Some(format!(
                "the spool is full ({used} of {} bytes, spool_max_bytes)",
                self.cfg.spool_max_bytes
            ));
        }
        let free = self.free_bytes(used);
        if free < self.cfg.min_free_bytes.saturating_add(n) {
            return Some(format!(
                "the spool's disk is nearly full ({free} bytes free, {} required, min_free_bytes)",
                self.cfg.min_free_bytes
            ));
        }
        None
    }

    /// Free bytes on the spool's filesystem (for unprivileged users: the
    /// agent is one), measured at most every [`DISK_EVERY`] and lowered by
    /// what the spool grew since.
    fn free_bytes(&self, spool_now: u64) -> u64 {
        let mut d = self.disk.lock().expect("disk lock");
        if d.measured.is_none_or(|t| t.elapsed() >= DISK_EVERY) {
            d.free = match nix::sys::statvfs::statvfs(&self.spool_dir) {
                // Both are 64-bit on the 64-bit Linux the agent runs on.
                Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
                Err(e) => {
                    drop(d);
                    self.log_every("statvfs", |n| {
                        tracing::warn!(
                            "cannot read the free space of {}: {e} ({n} times); not checking min_free_bytes",
                            self.spool_dir.display()
                        )
                    });
                    return u64::MAX;
                }
            };
            d.spool_then = spool_now;
            d.measured = Some(Instant::now());
        }
        d.free.saturating_sub(spool_now.saturating_sub(d.spool_then))
    }

    /// Runs `log` (with how many times `key` happened since it last ran)
    /// at most once every [`LOG_EVERY`] per key: a flood of the same event
    /// must not become a flood of log lines.
    pub fn log_every(&self, key: &str, log: impl FnOnce(u64)) {
        let mut logs = self.logs.lock().expect("logs lock");
        let e = logs.entry(key.to_string()).or_insert((None, 0));
        e.1 += 1;
        if e.0.is_none_or(|t: Instant| t.elapsed() >= LOG_EVERY) {
            let n = std::mem::take(&mut e.1);
            e.0 = Some(Instant::now());
            drop(logs);
            log(n);
        }
    }
}

/// One accepted connection's place in the counts.
pub struct ConnSlot {
    limits: Arc<Limits>,
    uid: u32,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.limits.conns.lock().expect("conns lock");
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// One open session's place in its uid's count.
pub struct SessionSlot {
    limits: Arc<Limits>,
    uid: u32,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut s = self.limits.sessions.lock().expect("sessions lock");
        if let Some(n) = s.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(&self.uid);
            }
        }
    }
}

/// A connection's memory budget: its own, its uid's share (none for the
/// recorder's user) and the agent's total.
pub struct ConnMemory {
    conn: Arc<Semaphore>,
    uid: Option<Arc<Semaphore>>,
    total: Arc<Semaphore>,
}

/// Bytes of one frame held in memory; given back when dropped (once the
/// frame is durable, refused or discarded).
pub struct Reservation {
    _conn: OwnedSemaphorePermit,
    _uid: Option<OwnedSemaphorePermit>,
    _total: OwnedSemaphorePermit,
}

impl ConnMemory {
    /// Waits until `n` bytes fit every budget and takes them. `n` is at most
    /// `max_frame_bytes`, which fits each budget whole, so the wait ends as
    /// soon as enough frames before it are durable. Always in the same
    /// order (connection, uid, total), so waits cannot deadlock.
    pub async fn reserve(&self, n: usize) -> Reservation {
        let n = u32::try_from(n).expect("frames are at most 4 GiB");
        let closed = "the agent's memory budgets are never closed";
        let conn = self.conn.clone().acquire_many_owned(n).await.expect(closed);
        let uid = match &self.uid {
            Some(s) => Some(s.clone().acquire_many_owned(n).await.expect(closed)),
            None => None,
        };
        let total = self.total.clone().acquire_many_owned(n).await.expect(closed);
        Reservation {
            _conn: conn,
            _uid: uid,
            _total: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cfg: AgentConfig, recorder: Option<u32>) -> (Arc<Limits>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let l = Limits::new(&cfg, 100, recorder, Arc::new(Stats::default()), dir.path().into(), 5);
        (l, dir)
    }

    #[test]
    fn connections_are_capped_per_uid_and_the_recorder_gets_the_total() {
        let cfg = AgentConfig {
            max_connections_per_uid: 2,
            ..Default::default()
        };
        let (l, _d) = limits(cfg, Some(999));
        let a = l.connection(1000).unwrap();
        let _b = l.connection(1000).unwrap();
        let e = l.connection(1000).err().unwrap();
        assert!(e.contains("max_connections_per_uid"), "{e}");
        drop(a);
        let _c = l.connection(1000).unwrap();
        // The recorder's user may hold the rest of the total (5).
        let _r1 = l.connection(999).unwrap();
        let _r2 = l.connection(999).unwrap();
        let _r3 = l.connection(999).unwrap();
        let e = l.connection(999).err().unwrap();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn quotas_hold_the_session_that_would_pass_them() {
        let cfg = AgentConfig {
            spool_max_bytes_per_uid: 1000,
            spool_max_bytes_per_session: 600,
            min_free_bytes: 0,
            ..Default::default()
        };
        let (l, _d) = limits(cfg, None);
        l.charge(1, "a", 500).unwrap();
        let e = l.charge(1, "a", 200).unwrap_err();
        assert!(e.contains("spool_max_bytes_per_session"), "{e}");
        l.charge(1, "b", 500).unwrap();
        let e = l.charge(1, "c", 1).unwrap_err();
        assert!(e.contains("spool_max_bytes_per_uid"), "{e}");
        assert!(!l.room(1, "c", 1));
        assert!(l.admission(1).is_some());
        // Another user is not affected, until less than one chunk (100) is left.
        l.charge(2, "d", 500).unwrap();
        l.charge(2, "e", 400).unwrap();
        assert!(l.admission(2).is_none());
        l.charge(2, "f", 1).unwrap();
        assert!(l.admission(2).is_some());
        l.refund(1, "b", 500);
        assert!(l.room(1, "c", 500));
        assert!(!l.room(1, "c", 501));
    }

    #[tokio::test]
    async fn a_uid_gets_a_quarter_of_the_memory_and_the_recorder_all_of_it() {
        let cfg = AgentConfig {
            buffer_bytes: 4000,
            max_frame_bytes: 500,
            ..Default::default()
        };
        let (l, _d) = limits(cfg, Some(999));
        let user = l.conn_memory(1000);
        let a = user.reserve(500).await;
        let _b = user.reserve(500).await; // the connection's own cap: 2 frames
        let other = l.conn_memory(1000);
        // The uid's share (1000 bytes) is used up: a second connection waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.reserve(1))
                .await
                .is_err()
        );
        // The recorder's connections are not held back by that uid.
        let rec = l.conn_memory(999);
        let _c = rec.reserve(500).await;
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), other.reserve(1))
            .await
            .unwrap();
    }
}
