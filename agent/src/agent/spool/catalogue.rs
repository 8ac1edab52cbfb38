//! The agent's one catalogue of sessions: what the spool holds of each, where
//! its chain stands, whether its recorder is connected, and how far the
//! collector has it. The connection loop, the shipper and retirement all
//! read and change this one map (under the spool's lock); nothing keeps a
//! second view in step by hand.
//!
//! Retirement ([`Catalogue::plan_retire`]) is decided here, as a pure
//! function of the catalogue, so the model test can drive it directly.

use super::log::{Index, Loc, SegmentUse};
use super::records::{CloseRecord, OpenRecord, StateRecord};
use shelltrail_cast::chain::Chain;
use std::collections::{BTreeMap, BTreeSet};

/// One session.
#[derive(Debug)]
pub struct Session {
    pub open: OpenRecord,
    /// Where the session's durable chain stands.
    pub chain: Chain,
    /// Durable chunks the collector has not committed, by seq.
    pub unshipped: BTreeMap<u64, Loc>,
    /// Highest seq the collector committed, if any.
    pub committed: Option<u64>,
    pub close: Option<CloseRecord>,
    /// The collector holds the whole session, end included.
    pub shipped: bool,
    /// Why the session is quarantined as damaged in the spool.
    pub damaged: Option<String>,
    /// Why the collector refused it (quarantined: kept, never retried).
    pub rejected: Option<String>,
    /// The segment holding its newest start or state record.
    pub head_segment: u64,
    /// A recorder connection is attached to it now.
    pub connected: bool,
    /// That connection's ear for an administrator ending the session.
    pub control: Option<tokio::sync::mpsc::UnboundedSender<crate::agent::control::ToSession>>,
    /// What the agent saw of it lately, for the live listing.
    pub activity: Activity,
    /// The shipper's cursor on the current stream (reset on every connection).
    pub stream: Stream,
}

/// When the agent last received a chunk of the session (its clock), and
/// the recording's content so far (uncompressed), counted as chunks arrive.
#[derive(Debug, Default, Clone, Copy)]
pub struct Activity {
    pub last_unix_ms: i64,
    pub bytes: u64,
}

/// Where one session stands on the current stream to the collector.
#[derive(Debug, Default)]
pub struct Stream {
    pub announced: bool,
    /// The collector's answer to the announcement: the next seq it needs.
    pub position: Option<u64>,
    pub next_to_send: u64,
    pub end_sent: bool,
    /// Bytes of each chunk sent and not yet committed.
    pub in_flight: BTreeMap<u64, u64>,
}

impl Session {
    pub fn new(open: OpenRecord, head_segment: u64) -> Session {
        let chain = Chain::new(open.id());
        Session {
            open,
            chain,
            unshipped: BTreeMap::new(),
            committed: None,
            close: None,
            shipped: false,
            damaged: None,
            rejected: None,
            head_segment,
            connected: false,
            control: None,
            activity: Activity::default(),
            stream: Stream::default(),
        }
    }

    pub fn id(&self) -> &str {
        self.open.id()
    }

    /// The session's user: the uid its quotas count against.
    pub fn uid(&self) -> u32 {
        self.open.peer_uid
    }

    /// The uid of the connection that opened it (the recorder's own, for a
    /// set-uid recorder): only that uid and pid may resume it.
    pub fn connection_uid(&self) -> u32 {
        self.open.via_recorder_uid.unwrap_or(self.open.peer_uid)
    }

    pub fn closed(&self) -> bool {
        self.close.is_some()
    }

    /// Quarantined: never shipped, its segments kept.
    pub fn quarantine(&self) -> Option<&str> {
        self.damaged.as_deref().or(self.rejected.as_deref())
    }

    /// The collector committed everything through `through`: those chunks
    /// are no longer the spool's to ship. Returns the in-flight bytes freed.
    pub fn commit_through(&mut self, through: u64) -> u64 {
        self.committed = Some(self.committed.map_or(through, |c| c.max(through)));
        self.unshipped = self.unshipped.split_off(&(through + 1));
        let rest = self.stream.in_flight.split_off(&(through + 1));
        std::mem::replace(&mut self.stream.in_flight, rest).values().sum()
    }

    /// The small state that replaces the session's older records when their segment goes.
    pub fn state(&self) -> StateRecord {
        StateRecord {
            open: OpenRecord {
                resume: None,
                ..self.open.clone()
            },
            resume: (self.chain.next_seq(), hex::encode(self.chain.last_hash())),
            close: self.close.clone(),
            shipped: self.shipped,
        }
    }
}

/// What the next retirement does.
#[derive(Debug, Default, PartialEq)]
pub struct Retire {
    /// Closed segments whose every record the collector has: deleted.
    pub segments: Vec<u64>,
    /// State records to write (durably) before they are deleted.
    pub carry: Vec<StateRecord>,
}

/// All sessions and what each segment holds.
#[derive(Debug, Default)]
pub struct Catalogue {
    pub sessions: BTreeMap<String, Session>,
    /// Per segment, per session: what deleting the segment needs shipped.
    segments: BTreeMap<u64, BTreeMap<String, SegmentUse>>,
    /// The shipper's: bytes in flight over all sessions, and its round-robin cursor.
    pub in_flight: u64,
    pub cursor: Option<String>,
}

impl Catalogue {
    /// From a recovered index. `chains` gives each session's chain (the
    /// spool computed it from its records); damaged sessions are marked.
    pub fn from_index(index: &Index, chains: &BTreeMap<String, Chain>) -> Catalogue {
        let mut cat = Catalogue {
            segments: index.segments.clone(),
            ..Default::default()
        };
        for (id, e) in &index.sessions {
            let mut s = Session::new(e.open.clone(), e.head_segment);
            if let Some(c) = chains.get(id) {
                s.chain = *c;
            }
            s.unshipped = e.chunks.iter().map(|c| (c.seq, c.loc)).collect();
            s.close = e.close.clone();
            s.shipped = e.shipped;
            s.damaged = e.damaged.clone();
            if s.shipped {
                // Nothing of it is the spool's to ship any more.
                s.unshipped.clear();
            }
            cat.sessions.insert(id.clone(), s);
        }
        cat
    }

    /// Notes that a record of session `id` is durable at `loc`.
    pub fn note(&mut self, id: &str, loc: Loc, edit: impl FnOnce(&mut SegmentUse)) {
        let u = self
            .segments
            .entry(loc.segment)
            .or_default()
            .entry(id.to_string())
            .or_default();
        edit(u);
    }

    /// Segments the catalogue knows records in.
    pub fn segment_ids(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// What can be retired now: every segment before `active` whose records
    /// the collector all holds (each session's chunks in it committed, its
    /// end in it shipped, nothing of a quarantined session), and, for each
    /// session with records in them that must outlive them (not yet shipped
    /// whole, or with records in a segment that stays), its state to carry
    /// forward.
    pub fn plan_retire(&self, active: u64) -> Retire {
        let mut plan = Retire::default();
        for (&seg, uses) in self.segments.range(..active) {
            if uses.iter().all(|(id, u)| self.retirable(id, u)) {
                plan.segments.push(seg);
            }
        }
        let gone: BTreeSet<u64> = plan.segments.iter().copied().collect();
        let mut touched = BTreeSet::new();
        for seg in &plan.segments {
            touched.extend(self.segments[seg].keys().map(String::as_str));
        }
        for id in touched {
            let Some(s) = self.sessions.get(id) else { continue };
            // Whatever of it goes (its start or last state, its newest
            // chunks and with them where its chain stands, its end, the
            // word that it was shipped) is summed up in one state record,
            // unless nothing of it is left to need one.
            let stays = self
                .segments
                .iter()
                .any(|(seg, u)| !gone.contains(seg) && u.contains_key(id));
            if !s.shipped || stays {
                plan.carry.push(s.state());
            }
        }
        plan
    }

    fn retirable(&self, id: &str, u: &SegmentUse) -> bool {
        let Some(s) = self.sessions.get(id) else {
            // Records of a session already forgotten (shipped whole).
            return true;
        };
        if s.quarantine().is_some() {
            return false;
        }
        if s.shipped {
            return true;
        }
        if let Some(m) = u.max_seq
            && s.committed.is_none_or(|c| c < m)
        {
            return false;
        }
        !u.close
    }

    /// Applies a retirement whose carried states are durable at `carried`
    /// and whose segments are deleted. Returns, per session, the chunk bytes
    /// the deleted segments held (to give back to the quotas) with its uid.
    pub fn retired(&mut self, plan: &Retire, carried: &[Loc]) -> Vec<(u32, String, u64)> {
        for (st, loc) in plan.carry.iter().zip(carried) {
            let id = st.open.id().to_string();
            self.note(&id, *loc, |u| u.head = true);
            if let Some(s) = self.sessions.get_mut(&id) {
                s.head_segment = s.head_segment.max(loc.segment);
            }
        }
        let mut released = Vec::new();
        let mut touched = BTreeSet::new();
        for seg in &plan.segments {
            for (id, u) in self.segments.remove(seg).unwrap_or_default() {
                if let Some(s) = self.sessions.get(&id) {
                    released.push((s.uid(), id.clone(), u.bytes));
                }
                touched.insert(id);
            }
        }
        // A session shipped whole with no record left anywhere is forgotten.
        for id in touched {
            let referenced = self.segments.values().any(|u| u.contains_key(&id));
            if !referenced
                && self.sessions.get(&id).is_some_and(|s| s.shipped)
                && let Some(s) = self.sessions.remove(&id)
            {
                let freed: u64 = s.stream.in_flight.values().sum();
                self.in_flight = self.in_flight.saturating_sub(freed);
            }
        }
        released
    }
}
