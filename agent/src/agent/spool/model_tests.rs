//! The spool's lifecycle against a model (as Vector tests its disk buffer):
//! random interleavings of open, append, ship-ack, close, ship-end, retire,
//! restart and kill -9 (a torn record at the end of the newest segment) on
//! a real spool in a temporary directory, each step checked against a
//! plain in-memory model of what the recorder and the collector know.
//!
//! Invariants after every step:
//! * every acknowledged chunk the collector does not hold is readable, byte
//!   for byte, and the chain stands where the model says;
//! * the listing (a fresh scan, as the CLI reads it) equals the model: every
//!   session not shipped is there, ended exactly when the model ended it,
//!   with its resume point; shipped ones are listed as shipped or absent;
//!   nothing else is listed and the scan reports no problem;
//! * after a retirement, every segment left but the active one holds
//!   something the collector lacks: what is shipped takes no disk beyond
//!   the active segment and one small state per session.

use super::*;
use crate::agent::spool::log::tests::open_rec;
use proptest::prelude::*;
use shelltrail_cast::chunk::Chunker;
use shelltrail_proto::v1::Close;

const SEGMENT_BYTES: u64 = 8 << 10;
const SESSIONS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Open,
    Append {
        s: usize,
        bytes: usize,
    },
    /// The collector commits through a fraction (of 256) of what is acked.
    Commit {
        s: usize,
        frac: u8,
    },
    Close {
        s: usize,
    },
    /// The collector commits the end.
    ShipEnd {
        s: usize,
    },
    Retire,
    Restart,
    /// kill -9 with `torn` bytes of a record half-written.
    Kill {
        torn: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Open),
        8 => (0..SESSIONS, 1..3000usize).prop_map(|(s, bytes)| Op::Append { s, bytes }),
        4 => (0..SESSIONS, any::<u8>()).prop_map(|(s, frac)| Op::Commit { s, frac }),
        1 => (0..SESSIONS).prop_map(|s| Op::Close { s }),
        2 => (0..SESSIONS).prop_map(|s| Op::ShipEnd { s }),
        4 => Just(Op::Retire),
        1 => Just(Op::Restart),
        1 => any::<u16>().prop_map(|torn| Op::Kill { torn }),
    ]
}

struct Model {
    id: String,
    uuid: uuid::Uuid,
    chunker: Chunker,
    /// Acknowledged chunks by seq: bytes and link hash.
    chunks: Vec<(Vec<u8>, [u8; 32])>,
    committed: Option<u64>,
    closed: bool,
    shipped: bool,
}

impl Model {
    fn chain(&self) -> Chain {
        match self.chunks.last() {
            Some((_, h)) => Chain::resume(self.chunks.len() as u64, *h),
            None => Chain::new(&self.id),
        }
    }
    fn all_committed(&self) -> bool {
        self.chunks.is_empty() || self.committed == Some(self.chunks.len() as u64 - 1)
    }
}

/// Bytes that do not compress, so segments fill and roll over.
pub(super) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b' ' + (x % 90) as u8
        })
        .collect()
}

struct Harness {
    dir: tempfile::TempDir,
    spool: Option<Arc<Spool>>,
    models: Vec<Model>,
}

impl Harness {
    fn spool(&self) -> &Arc<Spool> {
        self.spool.as_ref().expect("running")
    }

    fn model(&mut self, s: usize) -> Option<&mut Model> {
        let n = self.models.len();
        (n > 0).then(|| &mut self.models[s % n])
    }

    /// Starts the spool again and tells it what the collector says on
    /// reconnection (its positions, and which sessions it holds whole).
    async fn recover(&mut self) {
        let (spool, _) = Spool::recover(self.dir.path(), SEGMENT_BYTES, 0).expect("recovery");
        let spool = Arc::new(spool);
        for m in &self.models {
            if let Some(c) = m.committed
                && let Some(s) = spool.lock().sessions.get_mut(&m.id)
            {
                s.commit_through(c);
            }
            if m.shipped
                && let Some(h) = spool.shipped(&m.id, 0)
            {
                h.await.unwrap();
            }
        }
        self.spool = Some(spool);
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Open => {
                if self.models.len() < SESSIONS {
                    let uuid = uuid::Uuid::now_v7();
                    let id = uuid.to_string();
                    self.spool().open(open_rec(&id)).await.unwrap();
                    self.models.push(Model {
                        chunker: Chunker::new(&id, 1),
                        id,
                        uuid,
                        chunks: Vec::new(),
                        committed: None,
                        closed: false,
                        shipped: false,
                    });
                }
            }
            Op::Append { s, bytes } => {
                let spool = self.spool().clone();
                let Some(m) = self.model(s) else { return };
                if m.closed {
                    return;
                }
                let seq = m.chunks.len() as u64;
                m.chunker.buffer().extend_from_slice(&noise(seq, bytes));
                let c = m.chunker.cut(seq, seq + 1).expect("a chunk");
                let q = spool.queue(chunk_body(&m.uuid, seq, &c.hash, &c.bytes)).unwrap();
                let loc = q.done.await.unwrap().unwrap();
                m.chunks.push((c.bytes, c.hash));
                spool.chunk_durable(&m.id, seq, m.chain(), loc, q.ticket);
            }
            Op::Commit { s, frac } => {
                let spool = self.spool().clone();
                let Some(m) = self.model(s) else { return };
                if m.chunks.is_empty() || m.shipped {
                    return;
                }
                let through = (frac as u64 * m.chunks.len() as u64 / 256).min(m.chunks.len() as u64 - 1);
                if m.committed.is_some_and(|c| c >= through) {
                    return;
                }
                m.committed = Some(through);
                if let Some(s) = spool.lock().sessions.get_mut(&m.id) {
                    s.commit_through(through);
                }
                spool.committed();
            }
            Op::Close { s } => {
                let spool = self.spool().clone();
                let Some(m) = self.model(s) else { return };
                if m.closed {
                    return;
                }
                let rec = CloseRecord {
                    session_id: m.id.clone(),
                    close: Close {
                        last_seq: (m.chunks.len() as u64).saturating_sub(1),
                        ..Default::default()
                    },
                    cause: "recorder".into(),
                    closed_unix_ms: 2,
                    seal: None,
                };
                let q = spool.queue(close_body(&rec)).unwrap();
                let loc = q.done.await.unwrap().unwrap();
                spool.close_durable(&rec, loc, q.ticket);
                m.closed = true;
            }
            Op::ShipEnd { s } => {
                let spool = self.spool().clone();
                let Some(m) = self.model(s) else { return };
                if !m.closed || m.shipped || !m.all_committed() {
                    return;
                }
                m.shipped = true;
                if let Some(h) = spool.shipped(&m.id, 3) {
                    h.await.unwrap();
                }
            }
            Op::Retire => {
                self.spool().retire().await.expect("retirement");
                self.check_retired();
            }
            Op::Restart => {
                self.spool = None;
                self.recover().await;
            }
            Op::Kill { torn } => {
                self.spool = None;
                // The record being written when the process died: a prefix of it.
                let body = chunk_body(&uuid::Uuid::now_v7(), 0, &[0; 32], &noise(99, 600));
                let mut record = (body.len() as u32).to_le_bytes().to_vec();
                record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
                record.extend_from_slice(&body);
                let cut = 1 + torn as usize % (record.len() - 1);
                let newest = *segments(self.dir.path()).unwrap().last().expect("a segment");
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(segment_path(self.dir.path(), newest))
                    .unwrap();
                std::io::Write::write_all(&mut f, &record[..cut]).unwrap();
                drop(f);
                self.recover().await;
            }
        }
    }

    fn check(&self) {
        let spool = self.spool();
        let cat = spool.lock();
        for m in &self.models {
            let Some(s) = cat.sessions.get(&m.id) else {
                assert!(m.shipped, "session {} forgotten before it was shipped", m.id);
                continue;
            };
            if m.shipped {
                assert!(s.shipped, "session {} shipped, not known so", m.id);
                continue;
            }
            assert_eq!(s.chain, m.chain(), "session {}: chain", m.id);
            assert_eq!(s.closed(), m.closed, "session {}: ended", m.id);
            let from = m.committed.map_or(0, |c| c + 1);
            for seq in from..m.chunks.len() as u64 {
                let loc = s
                    .unshipped
                    .get(&seq)
                    .unwrap_or_else(|| panic!("session {}: acked chunk {seq} not shipped and not in the spool", m.id));
                assert_eq!(
                    spool.read_chunk(*loc).unwrap(),
                    m.chunks[seq as usize].0,
                    "session {}: chunk {seq}",
                    m.id
                );
            }
        }
        drop(cat);

        let index = scan(self.dir.path(), false).unwrap();
        assert!(index.problems.is_empty(), "{:?}", index.problems);
        for (id, e) in &index.sessions {
            let m = self
                .models
                .iter()
                .find(|m| &m.id == id)
                .unwrap_or_else(|| panic!("listed session {id} is not in the model"));
            if m.shipped {
                // Shipped: listed as such until its records are all gone.
                assert!(e.shipped, "session {id} listed, not as shipped");
                continue;
            }
            assert_eq!(e.close.is_some(), m.closed, "session {id}: listed as ended?");
            assert_eq!(e.chain().unwrap(), m.chain(), "session {id}: resume point");
            assert_eq!(e.next_seq(), m.chunks.len() as u64, "session {id}: next seq");
        }
        for m in self.models.iter().filter(|m| !m.shipped) {
            assert!(index.sessions.contains_key(&m.id), "session {} not listed", m.id);
        }
    }

    /// After a retirement every segment but the active one holds a record
    /// the collector lacks.
    fn check_retired(&self) {
        let active = self.spool().stats.active_segment.load(Ordering::Relaxed);
        let index = scan(self.dir.path(), false).unwrap();
        for (seg, uses) in index.segments.range(..active) {
            let needed = uses.iter().any(|(id, u)| {
                let Some(m) = self.models.iter().find(|m| &m.id == id) else {
                    return false;
                };
                !m.shipped && (u.max_seq.is_some_and(|x| m.committed.is_none_or(|c| x > c)) || u.close)
            });
            assert!(needed, "segment {seg} holds nothing unshipped but was kept: {uses:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn spool_lifecycle_matches_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut h = Harness {
                dir: tempfile::tempdir().unwrap(),
                spool: None,
                models: Vec::new(),
            };
            h.recover().await;
            for op in &ops {
                h.apply(op).await;
                h.check();
            }
            // Every session ends and ships: the spool shrinks to its active
            // segment and forgets them all.
            for s in 0..h.models.len() {
                h.apply(&Op::Close { s }).await;
                if !h.models[s].chunks.is_empty() {
                    h.apply(&Op::Commit { s, frac: 255 }).await;
                }
                h.apply(&Op::ShipEnd { s }).await;
                h.check();
            }
            for _ in 0..3 {
                h.apply(&Op::Retire).await;
            }
            h.check();
            let left = segments(h.dir.path()).unwrap();
            prop_assert!(left.len() <= 2, "segments left after everything shipped: {left:?}");
            // Kept only while the active segment (never deleted) holds their records.
            prop_assert!(
                h.spool().lock().sessions.values().all(|s| s.shipped),
                "sessions catalogued as not shipped"
            );
            Ok(())
        })?;
    }
}
