//! `shelltrail play ID`: replays a recording in the terminal, in real time
//! (or faster), with long pauses cut short.

use crate::cli::Source;
use anyhow::{Context, Result, bail};
use shelltrail_cast::{Code, Decoder};
use std::io::{BufReader, Write};
use std::time::{Duration, Instant};

pub fn run(src: &mut Source, id: &str, speed: f64, idle_limit: Option<f64>, out: &mut impl Write) -> Result<()> {
    if !(speed > 0.0 && speed.is_finite()) {
        bail!("--speed must be a positive number");
    }
    let row = src.find(id)?;
    let dec = Decoder::new(BufReader::new(src.cast_reader(&row)?)).context("reading the recording")?;
    let limit = idle_limit.or(dec.header().idle_time_limit).map(Duration::from_secs_f64);
    let start = Instant::now();
    let mut clock = Duration::ZERO;
    let mut last = Duration::ZERO;
    for ev in dec {
        let ev = ev.context("reading the recording")?;
        let mut gap = ev.time.saturating_sub(last);
        last = ev.time;
        if let Some(l) = limit {
            gap = gap.min(l);
        }
        clock += gap.div_f64(speed);
        if ev.code != Code::Output {
            continue;
        }
        if let Some(wait) = clock.checked_sub(start.elapsed()) {
            out.flush()?;
            std::thread::sleep(wait);
        }
        out.write_all(ev.data.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}
