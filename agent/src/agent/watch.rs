//! Recorders stopped before they took their terminal.
//!
//! The one window the privilege separation leaves (docs/design.md,
//! "Security"): between the exec of the set-uid recorder and its taking of
//! sshd's terminal, a few microseconds, its real uid is still the user's, so
//! a process of the user can stop it with SIGSTOP there and use the terminal
//! for as long as it keeps it stopped. Such a recorder has not yet connected
//! to the agent, so no session shows it. This finds it: a process named
//! `shelltrail-shel` whose effective uid is the recorder's but whose real uid
//! is still someone else's (it never got past the take-over), stopped. The
//! agent logs it with the terminal the user may be using unrecorded.
//!
//! Only the kernel's word counts: /proc/PID/stat and /proc/PID/status are
//! readable for every process (even non-dumpable ones), and a user cannot
//! give their own process the recorder's effective uid, so a process that
//! merely calls itself `shelltrail-shel` is never reported.

use std::collections::HashSet;

/// What the recorder's executable name looks like in /proc (15 bytes).
const COMM: &str = "shelltrail-shel";

/// A recorder stopped before it took its terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub pid: i32,
    /// The real uid: the user the recorder was started for.
    pub uid: u32,
    /// The controlling terminal (`/dev/pts/N`), when it has one.
    pub tty: Option<String>,
}

/// The fields of /proc/PID/stat this module reads.
#[derive(Debug, PartialEq, Eq)]
struct Stat<'a> {
    comm: &'a str,
    state: char,
    tty_nr: u64,
}

fn parse_stat(text: &str) -> Option<Stat<'_>> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?;
    let mut rest = text.get(close + 2..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    // After the state: ppid, pgrp, session, tty_nr.
    let tty_nr = rest.nth(3)?.parse().ok()?;
    Some(Stat { comm, state, tty_nr })
}

/// Real and effective uid from /proc/PID/status's `Uid:` line.
fn parse_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let mut f = line.split_ascii_whitespace().skip(1);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// `/dev/pts/N` for a pseudo-terminal device number (majors 136-143).
fn pts_name(tty_nr: u64) -> Option<String> {
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    (136..=143)
        .contains(&major)
        .then(|| format!("/dev/pts/{}", (major - 136) * 256 + minor))
}

/// Recorders (effective uid `recorder_uid`) that are stopped and still hold
/// another real uid.
pub fn stalled(recorder_uid: u32) -> Vec<Stalled> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(stat) = parse_stat(&text) else {
            continue;
        };
        if stat.comm != COMM || !matches!(stat.state, 'T' | 't') {
            continue;
        }
        let Some((real, effective)) = std::fs::read_to_string(entry.path().join("status"))
            .ok()
            .and_then(|s| parse_uids(&s))
        else {
            continue;
        };
        if effective == recorder_uid && real != recorder_uid {
            out.push(Stalled {
                pid,
                uid: real,
                tty: pts_name(stat.tty_nr),
            });
        }
    }
    out
}

/// Reports each stalled recorder once it has been seen stopped on two
/// consecutive looks (a recorder caught stopped for a moment is not one).
#[derive(Default)]
pub struct Watch {
    suspects: HashSet<i32>,
    reported: HashSet<i32>,
}

impl Watch {
    /// The recorders to report now, given what [`stalled`] found this time.
    pub fn look(&mut self, found: Vec<Stalled>) -> Vec<Stalled> {
        let now: HashSet<i32> = found.iter().map(|s| s.pid).collect();
        let report: Vec<Stalled> = found
            .into_iter()
            .filter(|s| self.suspects.contains(&s.pid) && !self.reported.contains(&s.pid))
            .collect();
        self.reported.extend(report.iter().map(|s| s.pid));
        self.reported.retain(|p| now.contains(p));
        self.suspects = now;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_last_parenthesis() {
        let text = "4242 (shelltrail-shel) T 4200 4242 4242 34817 4242 4194560 120 0 0 0 0 0 0 0 20 0 1 0 9000 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                comm: "shelltrail-shel",
                state: 'T',
                tty_nr: 34817
            })
        );
        // A command name with spaces and parentheses cannot shift the fields.
        let odd = "7 (a) b) c) S 1 7 7 0 -1 0";
        assert_eq!(parse_stat(odd).map(|s| (s.comm, s.state)), Some(("a) b) c", 'S')));
    }

    #[test]
    fn pseudo_terminals_are_named_from_their_device_number() {
        // 34817 = major 136, minor 1.
        assert_eq!(pts_name(34817).as_deref(), Some("/dev/pts/1"));
        // Major 137, minor 4: pts 260.
        assert_eq!(pts_name((137 << 8) | 4).as_deref(), Some("/dev/pts/260"));
        // A minor above 255 lives in the high bits.
        assert_eq!(pts_name((136 << 8) | (1 << 20) | 2).as_deref(), Some("/dev/pts/258"));
        assert_eq!(pts_name(0), None);
        assert_eq!(pts_name(4 << 8 | 1), None);
    }

    #[test]
    fn uids_come_from_the_status_uid_line() {
        let status =
            "Name:\tshelltrail-shel\nState:\tT (stopped)\nUid:\t1001\t999\t999\t999\nGid:\t1001\t1001\t1001\t1001\n";
        assert_eq!(parse_uids(status), Some((1001, 999)));
    }

    #[test]
    fn a_recorder_is_reported_once_after_two_looks() {
        let s = |pid| Stalled {
            pid,
            uid: 1000,
            tty: None,
        };
        let mut w = Watch::default();
        assert!(w.look(vec![s(10)]).is_empty());
        assert_eq!(w.look(vec![s(10), s(11)]), vec![s(10)]);
        assert_eq!(w.look(vec![s(10), s(11)]), vec![s(11)]);
        assert!(w.look(vec![s(10), s(11)]).is_empty());
        // Continued, then stopped again later: a new episode.
        assert!(w.look(vec![]).is_empty());
        assert!(w.look(vec![s(10)]).is_empty());
        assert_eq!(w.look(vec![s(10)]), vec![s(10)]);
    }
}
