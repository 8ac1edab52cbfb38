//! asciinema 3, the reference player: if it renders our recordings, people's
//! existing tools play them. Debian's asciinema (2.x) cannot read asciicast
//! v3, so the crates.io one is required (`tests/run.sh` installs it).

use crate::proc::run;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The asciinema 3 binary: on PATH or in ~/.cargo/bin. Panics with the
/// install command if there is none.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut candidates = vec![PathBuf::from("asciinema")];
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(Path::new(&home).join(".cargo/bin/asciinema"));
        }
        candidates.push(PathBuf::from("/root/.cargo/bin/asciinema"));
        let mut seen = Vec::new();
        for c in candidates {
            let Ok(out) = Command::new(&c).arg("--version").output() else {
                continue;
            };
            let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if v.starts_with("asciinema 3") {
                return Ok(c);
            }
            seen.push(format!("{} is {v:?}", c.display()));
        }
        Err(format!(
            "asciinema 3 is required to check that recordings play ({}); install it with \
             `cargo install --locked asciinema --version '^3'` (tests/run.sh does it)",
            if seen.is_empty() {
                "none found".to_string()
            } else {
                seen.join(", ")
            }
        ))
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `asciinema convert -f txt FILE -`: the recording rendered by asciinema's
/// terminal emulator as plain text. Panics if asciinema rejects the file.
pub fn render_txt(cast: &Path) -> String {
    let mut c = Command::new(binary());
    c.args(["convert", "-q", "-f", "txt"]).arg(cast).arg("-");
    let out = run(c, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "asciinema could not render {}; {out}\n--- the file ---\n{}",
        cast.display(),
        crate::proc::excerpt(&std::fs::read(cast).unwrap_or_default())
    );
    out.stdout_str()
}
