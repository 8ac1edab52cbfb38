//! Compaction: an ended session's chunks, merged into runs.
//!
//! Chunks are cut every 100 ms for delivery, and each is compressed on its
//! own at the recorder's cheap level: right for a live session, wasteful
//! for one kept for months. Once a session has ended complete, a background
//! thread merges each stretch of consecutive chunks (up to
//! [`StoreOptions::run_raw_bytes`] of content) into a
//! [run](shelltrail_cast::run), compressed again at
//! [`StoreOptions::compact_level`]. The hash chain covers content, so every
//! recorded chunk can still be verified and named afterwards.
//!
//! # Commit protocol
//! Everything is written beside the session's files under temporary names
//! and synced; then `runs.index` is renamed into place, then `runs.zst`
//! (the commit point), the directory synced, and only then are `chunks.zst`
//! and `index` removed. At start-up [`settle_compaction`](super::settle_compaction)
//! finishes or undoes what a crash interrupted, and readers
//! ([`Files`](super::Files)) always see one consistent pair. Every run is
//! unpacked and checked against the chunks it replaces before the commit:
//! the chunks are the evidence, and they are removed only once the runs are
//! known to hold the same.

use std::sync::mpsc;
use std::thread::JoinHandle;

use super::*;

/// The background thread that compacts sessions one at a time.
#[derive(Debug)]
pub(super) struct Compactor {
    tx: Option<mpsc::Sender<Arc<Slot>>>,
    /// Set when the store closes: the queue is left for the next start.
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Compactor {
    pub(super) fn start(opts: &StoreOptions) -> io::Result<Compactor> {
        let (tx, rx) = mpsc::channel::<Arc<Slot>>();
        let (level, run_raw) = (opts.compact_level, opts.run_raw_bytes);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("compactor".into()).spawn(move || {
            for slot in rx {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                match compact(&slot, level, run_raw) {
                    Ok(Some((before, after))) => {
                        tracing::debug!(session = %slot.id, "compacted: {before} bytes of chunks into {after} bytes of runs");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(session = %slot.id, "cannot compact the session, it stays as its chunks: {e}");
                    }
                }
            }
        })?;
        Ok(Compactor {
            tx: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// Queues `slot`; it is compacted if, by then, it has ended complete.
    pub(super) fn enqueue(&self, slot: Arc<Slot>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(slot);
        }
    }
}

impl Drop for Compactor {
    /// Lets the session being compacted finish (the store's directory lock
    /// must outlive every write) and drops the rest of the queue: start-up
    /// queues every ended session that is not compacted yet.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a session is one to compact.
pub(super) fn wanted(st: &SessionState) -> bool {
    st.end.is_some() && !st.compacted && st.damaged.is_none() && st.quarantine.is_none() && st.records > 0
}

fn corrupt(path: &Path, why: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        why,
    }
}

/// Compacts one session; returns its bytes before and after, or None when
/// there was nothing to do. What a failed attempt wrote is removed (a full
/// disk is the likeliest failure, and live sessions need the room).
pub(super) fn compact(slot: &Slot, level: i32, run_raw: usize) -> Result<Option<(u64, u64)>, StoreError> {
    let result = compact_once(slot, level, run_raw);
    if result.is_err() {
        for name in [RUNS_TMP, RUNS_INDEX_TMP] {
            let _ = fs::remove_file(slot.dir.join(name));
        }
    }
    result
}

fn compact_once(slot: &Slot, level: i32, run_raw: usize) -> Result<Option<(u64, u64)>, StoreError> {
    // Held throughout: nothing else writes an ended session, and a
    // retransmission waits rather than reading files as they change.
    let mut st = lock(&slot.state);
    if !wanted(&st) {
        return Ok(None);
    }
    let dir = &slot.dir;
    let files = Files::open(dir)?;
    if files.runs {
        return Ok(None);
    }
    let records = read_records_from(&files.index, &files.index_path, 0, st.records as usize)?;
    if records.len() as u64 != st.records {
        return Err(corrupt(
            &files.index_path,
            format!("{} records where {} were committed", records.len(), st.records),
        ));
    }

    let runs_tmp = dir.join(RUNS_TMP);
    let mut out = create_file(&runs_tmp).map_err(|e| io_err(&runs_tmp, e))?;
    let mut index = Vec::new();
    let mut offset = 0u64;
    let mut group: Vec<(chunk::ChunkHeader, Vec<u8>)> = Vec::new();
    let mut group_raw = 0usize;
    let mut flush = |group: &mut Vec<(chunk::ChunkHeader, Vec<u8>)>, last_hash: [u8; 32]| -> Result<(), StoreError> {
        let Some((first, _)) = group.first() else {
            return Ok(());
        };
        let parts: Vec<(chunk::ChunkHeader, &[u8])> = group.iter().map(|(h, r)| (h.clone(), &r[..])).collect();
        let bytes = run::merge(&parts, level)
            .map_err(|e| corrupt(&runs_tmp, format!("merging from chunk {}: {e}", first.seq)))?;
        // The check that lets the chunks go: the run gives back every one.
        let back =
            run::unpack(&bytes).map_err(|e| corrupt(&runs_tmp, format!("the run from chunk {}: {e}", first.seq)))?;
        let same = back.parts.len() == group.len()
            && back.last_hash() == Some(last_hash)
            && back
                .parts
                .iter()
                .zip(group.iter())
                .all(|(p, (h, raw))| p.header == *h && back.content(p) == &raw[..]);
        if !same {
            return Err(corrupt(
                &runs_tmp,
                format!("the run from chunk {} does not give back its chunks", first.seq),
            ));
        }
        out.write_all(&bytes).map_err(|e| io_err(&runs_tmp, e))?;
        let len = u32::try_from(bytes.len()).map_err(|_| corrupt(&runs_tmp, "a run larger than 4 GiB".into()))?;
        index.extend_from_slice(
            &IndexRecord {
                seq: first.seq,
                offset,
                len,
                sha256: last_hash,
            }
            .encode(),
        );
        offset += u64::from(len);
        group.clear();
        Ok(())
    };
    let mut chain = Chain::new(&slot.id);
    for rec in &records {
        let bytes = files.read_at(rec.offset, rec.len as usize)?;
        let (header, raw) =
            chunk::decompress(&bytes).map_err(|e| corrupt(&files.data_path, format!("chunk {}: {e}", rec.seq)))?;
        let hash = chunk::link_hash(&header, &raw);
        if hash != rec.sha256 || header.seq != rec.seq {
            return Err(corrupt(
                &files.data_path,
                format!("chunk {} does not match its index record", rec.seq),
            ));
        }
        // A run holds chunks that follow on, linked: after a gap (the chain
        // restarts past chunks the recorder declared lost) a new one starts.
        let group_hash = chain.last_hash();
        let follows = matches!(chain.accept(&header, hash), Ok(Step::Next));
        if !follows {
            chain = Chain::resume(header.seq + 1, hash);
        }
        if !group.is_empty() && (!follows || group_raw + raw.len() > run_raw || group.len() >= run::MAX_PARTS) {
            flush(&mut group, group_hash)?;
            group_raw = 0;
        }
        group_raw += raw.len();
        group.push((header, raw));
    }
    flush(&mut group, chain.last_hash())?;
    out.sync_all().map_err(|e| io_err(&runs_tmp, e))?;
    drop(out);
    let index_tmp = dir.join(RUNS_INDEX_TMP);
    write_synced(&index_tmp, &index)?;

    let runs_index = dir.join(RUNS_INDEX_FILE);
    fs::rename(&index_tmp, &runs_index).map_err(|e| io_err(&runs_index, e))?;
    // runs.index must be in place before runs.zst commits.
    sync_dir(dir)?;
    let runs = dir.join(RUNS_FILE);
    fs::rename(&runs_tmp, &runs).map_err(|e| io_err(&runs, e))?;
    sync_dir(dir)?;
    let before = st.chunks_len;
    st.compacted = true;
    st.records = (index.len() / INDEX_RECORD_LEN) as u64;
    st.chunks_len = offset;
    slot.publish(&st);
    drop(st);
    for name in [CHUNKS_FILE, INDEX_FILE] {
        let p = dir.join(name);
        fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
    }
    sync_dir(dir)?;
    Ok(Some((before, offset)))
}
