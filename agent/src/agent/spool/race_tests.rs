//! Retirement against records that are durable but not yet reported
//! (`chunk_durable`, `open`, ...): the writer sends a record's location
//! before the connection's acker notes it in the catalogue, and the writer
//! may already have rolled over to a new segment by then.

use super::*;
use crate::agent::spool::log::tests::open_rec;
use crate::agent::spool::model_tests::noise;
use shelltrail_cast::chunk::Chunker;

#[tokio::test]
async fn an_acked_chunk_not_yet_noted_is_not_retired_with_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::recover(dir.path(), 4 << 10, 0).unwrap();
    let spool = Arc::new(spool);
    let uuid = uuid::Uuid::now_v7();
    let id = uuid.to_string();
    spool.open(open_rec(&id)).await.unwrap();
    let mut chunker = Chunker::new(&id, 1);
    let mut chain = Chain::new(&id);

    // Chunk 0: durable, noted, committed by the collector.
    chunker.buffer().extend_from_slice(&noise(0, 500));
    let c0 = chunker.cut(0, 1).unwrap();
    let q0 = spool.queue(chunk_body(&uuid, 0, &c0.hash, &c0.bytes)).unwrap();
    let loc0 = q0.done.await.unwrap().unwrap();
    chain
        .accept(&shelltrail_cast::chunk::parse(&c0.bytes).unwrap().0, c0.hash)
        .unwrap();
    spool.chunk_durable(&id, 0, chain, loc0, q0.ticket);
    spool.lock().sessions.get_mut(&id).unwrap().commit_through(0);

    // Chunk 1 fills the segment: durable (the writer answered), but its
    // connection's acker has not run chunk_durable yet.
    chunker.buffer().extend_from_slice(&noise(1, 5000));
    let c1 = chunker.cut(1, 2).unwrap();
    let q1 = spool.queue(chunk_body(&uuid, 1, &c1.hash, &c1.bytes)).unwrap();
    let loc1 = q1.done.await.unwrap().unwrap();
    // Anything else: the writer rolls over to a new segment.
    spool.open(open_rec(&uuid::Uuid::now_v7().to_string())).await.unwrap();
    assert!(spool.stats.active_segment.load(Ordering::Relaxed) > loc1.segment);

    // The retirement task runs now (the collector committed something).
    spool.retire().await.unwrap();

    // Then the acker notes the chunk and acks it to the recorder.
    chain
        .accept(&shelltrail_cast::chunk::parse(&c1.bytes).unwrap().0, c1.hash)
        .unwrap();
    spool.chunk_durable(&id, 1, chain, loc1, q1.ticket);
    let loc = spool.lock().sessions[&id].unshipped[&1];
    let back = spool.read_chunk(loc).map_err(|e| e.to_string());
    assert!(
        back.as_ref().is_ok_and(|b| *b == c1.bytes),
        "acked chunk 1, not committed by the collector, must still be in the spool: {:?}",
        back.map(|b| b.len())
    );
}

#[tokio::test]
async fn a_start_record_not_yet_noted_is_not_retired_with_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::recover(dir.path(), 4 << 10, 0).unwrap();
    let spool = Arc::new(spool);
    // A session's start lands at the end of a segment; before `open` notes
    // it, the next record rolls the writer over and retirement runs.
    let filler = uuid::Uuid::now_v7();
    let fid = filler.to_string();
    spool.open(open_rec(&fid)).await.unwrap();
    let mut chunker = Chunker::new(&fid, 1);
    chunker.buffer().extend_from_slice(&noise(7, 3800));
    let c = chunker.cut(0, 1).unwrap();
    let q = spool.queue(chunk_body(&filler, 0, &c.hash, &c.bytes)).unwrap();
    let loc = q.done.await.unwrap().unwrap();
    let mut chain = Chain::new(&fid);
    chain
        .accept(&shelltrail_cast::chunk::parse(&c.bytes).unwrap().0, c.hash)
        .unwrap();
    spool.chunk_durable(&fid, 0, chain, loc, q.ticket);
    spool.lock().sessions.get_mut(&fid).unwrap().commit_through(0);

    let victim = uuid::Uuid::now_v7().to_string();
    // Queued as `open` does: its ticket held until it is noted.
    let queued = spool.queue(open_body(&open_rec(&victim))).unwrap();
    let _ticket = queued.ticket;
    let vloc = queued.done.await.unwrap().unwrap();
    spool.open(open_rec(&uuid::Uuid::now_v7().to_string())).await.unwrap();
    assert!(spool.stats.active_segment.load(Ordering::Relaxed) > vloc.segment);
    spool.retire().await.unwrap();
    let index = scan(dir.path(), false).unwrap();
    assert!(
        index.sessions.contains_key(&victim),
        "a durable start record (session admitted, Accepted sent) was deleted before it was catalogued"
    );
}
