//! The packages' pieces agree with each other and with the repository: the
//! maintainer scripts parse, every asset they ship exists, the units'
//! documentation links point at installed files, the scripts never put
//! the recorder in /etc/shells (chsh would then let a recorded user leave it),
//! never touch the service user's directories (systemd makes them), and
//! create the recorder's user without a login shell or home.
//! Building and installing the packages is checked by hand (docs/deployment.md).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scripts() -> Vec<PathBuf> {
    // The maintainer scripts (beside them: the changelog, lintian's overrides).
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("packaging/debian"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            ["preinst", "postinst", "prerm", "postrm"].contains(&n.as_ref())
        })
        .collect();
    for e in std::fs::read_dir(repo().join("packaging/rpm")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "sh") {
            v.push(p);
        }
    }
    v.sort();
    v
}

/// A script's command lines: comments dropped, `\`-continued lines joined.
fn code_lines(script: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(script).unwrap();
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let code = line.trim();
        if code.starts_with('#') {
            continue;
        }
        match code.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(code);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines.push(current);
    lines.retain(|l| !l.is_empty());
    lines
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
        let glob = src
            .to_str()
            .and_then(|s| s.rsplit_once("/*."))
            .map(|(dir, ext)| (dir.to_string(), ext.to_string()));
        if let Some((dir, ext)) = glob {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == ext.as_str()) {
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

/// The service user owns /var/lib/shelltrail and /run/shelltrail, so a
/// script running as root that creates, chowns or chmods anything under
/// them follows whatever link that user planted there (`install -d -o
/// shelltrail .../spool` chowned the target of a link: service user to
/// root). The scripts never name them, not even through a variable; the
/// units' StateDirectory= and RuntimeDirectory= make them, and systemd
/// does not follow such links.
#[test]
fn maintainer_scripts_leave_the_service_directories_to_systemd() {
    for s in scripts() {
        for line in code_lines(&s) {
            for dir in ["/var/lib/shelltrail", "/run/shelltrail"] {
                // The directory or anything in it; /var/lib/shelltrail-breakglass
                // (root's /var/lib, the tmpfiles.d entry's) is another directory.
                let names = line
                    .match_indices(dir)
                    .any(|(i, _)| !line[i + dir.len()..].starts_with(|c: char| c == '-' || c.is_alphanumeric()));
                assert!(!names, "{}: names {dir}: {line}", s.display());
            }
        }
    }
    let unit = |name: &str| std::fs::read_to_string(repo().join("systemd").join(name)).unwrap();
    let agent = unit("shelltrail-agent.service");
    for key in ["StateDirectory=shelltrail", "RuntimeDirectory=shelltrail"] {
        assert!(agent.lines().any(|l| l == key), "the agent's unit lacks {key}");
    }
    assert!(
        unit("shelltrail-collector.service")
            .lines()
            .any(|l| l == "StateDirectory=shelltrail")
    );
}

/// The recorder is set-uid to `shelltrail-rec`: both packages create it as
/// a system user nobody can log in as, with no home.
#[test]
fn the_packages_create_the_recorder_user_without_login_or_home() {
    // adduser never creates /nonexistent (and warns with --no-create-home).
    for (script, tool, no_home) in [
        ("packaging/debian/postinst", "adduser", "--home /nonexistent"),
        ("packaging/rpm/pre-install.sh", "useradd", "--no-create-home"),
    ] {
        let lines = code_lines(&repo().join(script));
        let create = lines
            .iter()
            .find(|l| l.contains(tool) && l.ends_with("shelltrail-rec"))
            .unwrap_or_else(|| panic!("{script}: no {tool} of shelltrail-rec in {lines:#?}"));
        for want in ["--system", "nologin", no_home] {
            assert!(create.contains(want), "{script}: {want} missing from: {create}");
        }
    }
}

/// Both units score 2.0 or lower in `systemd-analyze security --offline`
/// (the bar for a daemon every host runs), and `systemd-analyze
/// verify` finds nothing to say about them (run on copies whose
/// ExecStart= names the binary just built, which verify wants to exist).
#[test]
fn the_units_are_hardened_and_verify_clean() {
    let which = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        which.is_ok_and(|o| o.status.success()),
        "systemd-analyze is needed (apt install systemd; tests/run.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let built = PathBuf::from(env!("CARGO_BIN_EXE_shelltrail"));
    let mut copies = Vec::new();
    for unit in ["shelltrail-agent.service", "shelltrail-collector.service"] {
        let path = repo().join("systemd").join(unit);
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for ").map(|(_, r)| r.to_string()))
            .and_then(|r| {
                r.split_once(": ")
                    .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or_else(|| panic!("{unit}: no overall exposure in:\n{text}"));
        assert!(score <= 2.0, "{unit}: exposure {score} > 2.0:\n{text}");
        let copy = dir.path().join(unit);
        let body = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/bin/shelltrail", &built.display().to_string());
        std::fs::write(&copy, body).unwrap();
        copies.push(copy);
    }
    let socket = dir.path().join("shelltrail-agent.socket");
    std::fs::copy(repo().join("systemd/shelltrail-agent.socket"), &socket).unwrap();
    copies.push(socket);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sysusers.d entry the packages run makes the users the scripts'
/// fallback makes: `shelltrail` and `shelltrail-rec` with no home and no
/// login shell, and the break-glass group (checked by running the real
/// systemd-sysusers on an empty root).
#[test]
fn sysusers_makes_the_service_users_without_login_and_the_break_glass_group() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("packaging/sysusers.d/shelltrail.conf"))
        .output()
        .expect("systemd-sysusers (apt install systemd)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    for user in ["shelltrail", "shelltrail-rec"] {
        let line = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap_or_else(|| panic!("no {user} in {passwd}"));
        assert!(line.ends_with(":/nonexistent:/usr/sbin/nologin"), "{line}");
    }
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("shelltrail-breakglass:")),
        "{group}"
    );
}

/// The man pages and completions the packages install are what the CLI's
/// definitions make now (`shelltrail docs packaging` regenerates them):
/// one page per subcommand, the recorder's, bash and zsh completions.
#[test]
fn man_pages_and_completions_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shelltrail"))
        .arg("docs")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for sub in ["man", "completions"] {
        let made = dir.path().join(sub);
        let kept = repo().join("packaging").join(sub);
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(&made),
            names(&kept),
            "packaging/{sub}: run `shelltrail docs packaging`"
        );
        for n in names(&made) {
            assert_eq!(
                std::fs::read(made.join(&n)).unwrap(),
                std::fs::read(kept.join(&n)).unwrap(),
                "packaging/{sub}/{n} is stale: run `shelltrail docs packaging`"
            );
        }
    }
    let pages = std::fs::read_dir(dir.path().join("man")).unwrap().count();
    assert!(pages >= 15, "{pages} man pages");
    assert!(dir.path().join("man/shelltrail-shell.1").exists());
}
