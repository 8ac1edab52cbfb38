//! `shelltrail export ID`: the recording as asciicast v3 (default), v2 for
//! older players, or `--raw`: exactly the bytes the program wrote.

use crate::cli::Source;
use anyhow::{Context, Result};
use shelltrail_cast::{Code, Decoder, raw_bytes, to_v2};
use std::io::{BufReader, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    V3,
    V2,
}

pub fn run(src: &mut Source, id: &str, format: Format, raw: bool, out: &mut impl Write) -> Result<()> {
    let row = src.find(id)?;
    let reader = BufReader::with_capacity(256 << 10, src.cast_reader(&row)?);
    if raw {
        let dec = Decoder::new(reader).context("reading the recording")?;
        raw_bytes(dec, Code::Output, out).context("reconstructing the output bytes")?;
    } else if format == Format::V2 {
        let dec = Decoder::new(reader).context("reading the recording")?;
        to_v2(dec, out).context("converting to asciicast v2")?;
    } else {
        let mut reader = reader;
        std::io::copy(&mut reader, out).context("writing the recording")?;
    }
    out.flush()?;
    Ok(())
}
