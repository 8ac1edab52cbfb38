//! The packages' pieces agree with each other and with the repository: the
//! maintainer scripts parse, every asset they ship exists, the units'
//! documentation links point at installed files, and the scripts never put
//! the recorder in /etc/shells (chsh would then let a recorded user leave it).
//! Building and installing the packages is checked by hand (docs/deployment.md).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scripts() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("packaging/debian"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for e in std::fs::read_dir(repo().join("packaging")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "sh") {
            v.push(p);
        }
    }
    v.sort();
    v
}

fn manifest() -> toml::Value {
    toml::from_str(&std::fs::read_to_string(repo().join("agent/Cargo.toml")).unwrap()).unwrap()
}

/// The files a package installs, as (source in the repository, destination):
/// built binaries excluded, globs expanded.
fn assets() -> Vec<(PathBuf, String)> {
    let m = manifest();
    let meta = &m["package"]["metadata"];
    let mut out = Vec::new();
    let mut add = |src: &str, dest: &str| {
        if src.starts_with("target/") {
            return;
        }
        let src = repo().join("agent").join(src);
        if let Some(dir) = src.to_str().and_then(|s| s.strip_suffix("/*.md")) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "md") {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    out.push((p, format!("{}{name}", dest.trim_start_matches('/'))));
                }
            }
        } else {
            out.push((src, dest.trim_start_matches('/').to_string()));
        }
    };
    for a in meta["deb"]["assets"].as_array().unwrap() {
        add(a[0].as_str().unwrap(), a[1].as_str().unwrap());
    }
    for a in meta["generate-rpm"]["assets"].as_array().unwrap() {
        add(a["source"].as_str().unwrap(), a["dest"].as_str().unwrap());
    }
    out
}

#[test]
fn maintainer_scripts_parse() {
    let all = scripts();
    assert!(all.len() >= 4, "{all:?}");
    for s in all {
        let out = Command::new("sh").arg("-n").arg(&s).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            s.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_recorder_is_never_made_a_listed_shell() {
    for s in scripts() {
        let text = std::fs::read_to_string(&s).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !line.contains("add-shell") && !line.contains("/etc/shells"),
                "{}: {line}",
                s.display()
            );
        }
    }
}

#[test]
fn every_asset_exists_and_unit_documentation_is_installed() {
    let assets = assets();
    for (src, _) in &assets {
        assert!(src.is_file(), "{} is packaged but missing", src.display());
    }
    for unit in ["shelltrail-agent.service", "shelltrail-collector.service"] {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        let docs = text
            .lines()
            .find_map(|l| l.strip_prefix("Documentation="))
            .unwrap_or_else(|| panic!("{unit}: no Documentation="));
        for d in docs.split_whitespace() {
            let path = d
                .strip_prefix("file:///")
                .unwrap_or_else(|| panic!("{unit}: {d} is not a file:// link (no man page is shipped)"));
            // The .deb installs the README explicitly and docs/*.md by glob.
            assert!(
                assets.iter().any(|(_, dest)| dest == path),
                "{unit}: {d} is not installed by the packages"
            );
        }
    }
}
