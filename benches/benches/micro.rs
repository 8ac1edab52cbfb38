//! Criterion micro-benchmarks of the recording data path:
//!
//! * `encode/*`: `shelltrail_cast::Encoder::output` over 4 KiB reads (what the
//!   recorder thread does with each PTY read), in MB/s of terminal output.
//! * `chunk/*`: `shelltrail_cast::Chunker` cutting chunks of the recorder's
//!   default size (`chunk_bytes`) of encoded asciicast at its default zstd
//!   level, in MB/s of encoded text; the compression ratio is printed.
//! * `check/*`: what the agent spends checking each chunk as it arrives
//!   (`shelltrail_cast::chunk::check`: decompress within the size cap, the
//!   link hash over header and content), on chunks of the recorder's default
//!   size and level, in MB/s of asciicast; the time per chunk is printed.
//! * `run/compact`: what the collector's compaction does per MiB of content:
//!   16 chunks of the default size decompressed and their link hashes
//!   checked, merged into a run at level 3, and the run unpacked again to
//!   check it, in MB/s of asciicast.
//! * `spool/*`: the agent's spool `Writer` (group commit) fed ~1 KiB chunk
//!   records by N concurrent producers that each wait for their record's
//!   fdatasync; in chunks/s, with fsyncs per record printed.
//!
//! Run: `cargo bench -p shelltrail-benches --bench micro`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shelltrail::agent::spool::{self, Append, Stats, Writer};
use shelltrail_benches::{mixed_text, random_bytes, utf8_text};
use shelltrail_cast::{Chunker, Encoder};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Terminal output per iteration of the encode benchmarks.
const ENCODE_BYTES: usize = 1 << 20;
/// Bytes per PTY read.
const READ: usize = 4096;
/// The recorder's default chunk size and level, so the numbers follow it.
fn recorder() -> (usize, i32) {
    let d = shelltrail::config::ShellConfig::default();
    (d.chunk_bytes as usize, d.compression_level)
}

fn inputs() -> [(&'static str, Vec<u8>); 3] {
    [
        ("ascii_escapes", mixed_text(ENCODE_BYTES, 1)),
        ("utf8_heavy", utf8_text(ENCODE_BYTES, 2)),
        ("random_bytes", random_bytes(ENCODE_BYTES, 3)),
    ]
}

/// Encodes `data` as the recorder would: one `output` call per 4 KiB read,
/// 1 ms apart.
fn encode_all(enc: &mut Encoder, data: &[u8], out: &mut Vec<u8>, t0: &mut Duration) {
    for read in data.chunks(READ) {
        *t0 += Duration::from_millis(1);
        enc.output(*t0, read, out);
    }
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (name, data) in inputs() {
        g.throughput(Throughput::Bytes(data.len() as u64));
        let mut enc = Encoder::new();
        let mut out = Vec::with_capacity(data.len() * 3);
        let mut t = Duration::ZERO;
        encode_all(&mut enc, &data, &mut out, &mut t);
        println!(
            "encode/{name}: {} bytes of output become {} bytes of asciicast ({:.2}x)",
            data.len(),
            out.len(),
            out.len() as f64 / data.len() as f64
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_all(&mut enc, black_box(&data), &mut out, &mut t);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn check(c: &mut Criterion) {
    let (chunk_bytes, level) = recorder();
    let mut g = c.benchmark_group("check");
    for (name, data) in inputs() {
        let mut enc = Encoder::new();
        let mut encoded = Vec::new();
        let mut t = Duration::ZERO;
        while encoded.len() < 4 * chunk_bytes {
            encode_all(&mut enc, &data, &mut encoded, &mut t);
        }
        let mut chunker = Chunker::new("00000000-0000-7000-8000-000000000000", level);
        let chunks: Vec<(u64, Vec<u8>)> = encoded
            .chunks(chunk_bytes)
            .filter(|p| p.len() == chunk_bytes)
            .map(|p| {
                chunker.buffer().extend_from_slice(p);
                let ch = chunker.cut(0, 1).expect("a chunk");
                (ch.seq, ch.bytes)
            })
            .collect();
        let n = 200;
        let start = Instant::now();
        for k in 0..n {
            let (seq, bytes) = &chunks[k % chunks.len()];
            black_box(shelltrail_cast::chunk::check(bytes, *seq).expect("a good chunk"));
        }
        println!(
            "check/{name}: {:.0} us per {} KiB chunk ({} bytes compressed)",
            start.elapsed().as_secs_f64() * 1e6 / n as f64,
            chunk_bytes >> 10,
            chunks[0].1.len()
        );
        g.throughput(Throughput::Bytes(chunk_bytes as u64));
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                let (seq, bytes) = &chunks[i % chunks.len()];
                i += 1;
                black_box(shelltrail_cast::chunk::check(bytes, *seq).map(|(_, h)| h[0]))
            })
        });
    }
    g.finish();
}

fn chunk(c: &mut Criterion) {
    let (chunk_bytes, default_level) = recorder();
    let mut g = c.benchmark_group("chunk");
    // The default level on the three inputs, then a denser and a faster
    // level on the terminal-like text, to show what each would cost.
    let cases: [(&str, &str, i32); 5] = [
        ("ascii_escapes", "ascii_escapes", default_level),
        ("utf8_heavy", "utf8_heavy", default_level),
        ("random_bytes", "random_bytes", default_level),
        ("ascii_escapes_level_3", "ascii_escapes", 3),
        ("ascii_escapes_level_-1", "ascii_escapes", -1),
    ];
    let mut encoded_by_input = std::collections::HashMap::new();
    for (id, input, level) in cases {
        // 8 MiB of encoded asciicast to cut chunks from, in turn.
        let encoded: &Vec<u8> = encoded_by_input.entry(input).or_insert_with(|| {
            let mut enc = Encoder::new();
            let mut encoded = Vec::new();
            let mut t = Duration::ZERO;
            let mut seed = 10;
            while encoded.len() < 8 << 20 {
                let more = match input {
                    "ascii_escapes" => mixed_text(ENCODE_BYTES, seed),
                    "utf8_heavy" => utf8_text(ENCODE_BYTES, seed),
                    _ => random_bytes(ENCODE_BYTES, seed),
                };
                seed += 1;
                encode_all(&mut enc, &more, &mut encoded, &mut t);
            }
            encoded
        });
        let pieces: Vec<&[u8]> = encoded.chunks(chunk_bytes).filter(|p| p.len() == chunk_bytes).collect();

        // The ratio, over every piece once.
        let mut chunker = Chunker::new("00000000-0000-7000-8000-000000000000", level);
        let (mut raw, mut packed) = (0usize, 0usize);
        for p in &pieces {
            chunker.buffer().extend_from_slice(p);
            let ch = chunker.cut(0, 1).expect("a chunk");
            raw += p.len();
            packed += ch.bytes.len();
        }
        println!(
            "chunk/{id}: {} KiB chunks at level {level}: {raw} -> {packed} bytes, ratio {:.2}:1 ({:.1}% of the encoded size)",
            chunk_bytes >> 10,
            raw as f64 / packed as f64,
            100.0 * packed as f64 / raw as f64
        );

        g.throughput(Throughput::Bytes(chunk_bytes as u64));
        let mut i = 0;
        g.bench_function(id, |b| {
            b.iter(|| {
                let p = pieces[i % pieces.len()];
                i += 1;
                chunker.buffer().extend_from_slice(p);
                black_box(chunker.cut(0, 1).map(|c| c.bytes.len()))
            })
        });
    }
    g.finish();
}

/// The collector's compaction of one run: chunks as shipped in, a checked
/// run out (see `collector/src/store/compact.rs`).
fn run_compact(c: &mut Criterion) {
    let (chunk_bytes, level) = recorder();
    let mut enc = Encoder::new();
    let mut encoded = Vec::new();
    let mut t = Duration::ZERO;
    let mut seed = 40;
    while encoded.len() < 16 * chunk_bytes {
        encode_all(&mut enc, &mixed_text(ENCODE_BYTES, seed), &mut encoded, &mut t);
        seed += 1;
    }
    let mut chunker = Chunker::new("00000000-0000-7000-8000-000000000000", level);
    let chunks: Vec<Vec<u8>> = encoded
        .chunks(chunk_bytes)
        .take(16)
        .map(|p| {
            chunker.buffer().extend_from_slice(p);
            chunker.cut(0, 1).expect("a chunk").bytes
        })
        .collect();
    let content: usize = encoded.chunks(chunk_bytes).take(16).map(<[u8]>::len).sum();
    let shipped: usize = chunks.iter().map(Vec::len).sum();
    let compact = || {
        let opened: Vec<_> = chunks
            .iter()
            .map(|b| {
                let (h, raw) = shelltrail_cast::chunk::decompress(b).expect("a chunk");
                black_box(shelltrail_cast::chunk::link_hash(&h, &raw));
                (h, raw)
            })
            .collect();
        let parts: Vec<_> = opened.iter().map(|(h, r)| (h.clone(), &r[..])).collect();
        let run = shelltrail_cast::run::merge(&parts, 3).expect("a run");
        let back = shelltrail_cast::run::unpack(&run).expect("the run unpacks");
        (run.len(), back.parts.len())
    };
    let (run_len, _) = compact();
    println!(
        "run/compact: {} chunks, {content} bytes of asciicast: {shipped} bytes as shipped (level {level}) -> \
         {run_len} bytes as a run (level 3), {:.1}% of the chunks",
        chunks.len(),
        100.0 * run_len as f64 / shipped as f64
    );
    let mut g = c.benchmark_group("run");
    g.throughput(Throughput::Bytes(content as u64));
    g.bench_function("compact", |b| b.iter(|| black_box(compact())));
    g.finish();
}

/// N producers, each appending `per` chunk records and waiting for each one's
/// fdatasync before sending the next, as a session's ack window of one would.
/// Returns the number of records written (`total` rounded up to a multiple of N).
fn spool_round(tx: &std::sync::mpsc::Sender<Append>, producers: u64, total: u64, body: &[u8]) -> u64 {
    let per = total.div_ceil(producers).max(1);
    std::thread::scope(|s| {
        for p in 0..producers {
            let tx = tx.clone();
            s.spawn(move || {
                let id = uuid::Uuid::from_u64_pair(0x0190_0000_0000_7000, p);
                for seq in 0..per {
                    let (done, wait) = tokio::sync::oneshot::channel();
                    tx.send(Append {
                        body: spool::chunk_body(&id, seq, &[0; 32], body),
                        done,
                    })
                    .expect("writer running");
                    wait.blocking_recv().expect("writer answers").expect("append ok");
                }
            });
        }
    });
    per * producers
}

fn spool_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("spool");
    // A ~1 KiB record: what a compressed chunk of an interactive session weighs.
    let body = random_bytes(1000, 4);
    for producers in [1u64, 16, 256] {
        // On the real disk (the spool's), not tmpfs: fdatasync must cost what it costs.
        let dir = tempfile::Builder::new()
            .prefix("shelltrail-spool-bench-")
            .tempdir_in(std::env::temp_dir())
            .expect("tempdir");
        let stats = Arc::new(Stats::default());
        let writer = Writer::create(dir.path(), 0, 64 << 20, stats.clone()).expect("writer");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(rx));
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("producers", producers), &producers, |b, &n| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                let done = spool_round(&tx, n, iters, &body);
                // Scaled to `iters` records, as criterion divides by `iters`.
                t.elapsed().mul_f64(iters as f64 / done as f64)
            })
        });
        drop(tx);
        let _ = thread.join();
        let records = stats.records.load(Ordering::Relaxed);
        let fsyncs = stats.fsyncs.load(Ordering::Relaxed);
        if records == 0 {
            continue; // filtered out
        }
        println!(
            "spool/producers/{producers}: {records} records in {fsyncs} group commits: {:.3} fsyncs per record ({:.1} records per fsync)",
            fsyncs as f64 / records.max(1) as f64,
            records as f64 / fsyncs.max(1) as f64
        );
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode, chunk, check, run_compact, spool_writes
}
criterion_main!(benches);
