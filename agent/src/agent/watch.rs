//! SSH sessions that are not being recorded.
//!
//! Every program sshd starts for a session is a child of sshd's per-connection
//! process (`sshd: USER@pts/N` or `USER@notty`, running as the user, under
//! the root `sshd: USER [priv]`). With shelltrail installed, that child is
//! the recorder, or a shell that goes on to exec it. This module looks in
//! /proc for session children that are neither a recorder with a session at
//! this agent (nor the ancestor of one), nor a recorder still starting:
//!
//! * a recorder stopped before it took its terminal: the one window the
//!   privilege separation leaves (between exec and the take-over, its real
//!   uid is still the user's, so the user can SIGSTOP it there and use the
//!   terminal while it stays stopped);
//! * a session process the user stopped before it exec'd the recorder (a
//!   process of the user's own, like any sshd session child before exec);
//! * a login script that never reached the recorder (`exec bash` in
//!   ~/.bashrc, which Debian's bash reads before running a ForceCommand).
//!
//! The agent logs each one with the user and the terminal. Only the kernel's
//! word counts: /proc/PID/stat and status are readable for every process, a
//! user cannot start a root process named `sshd: ...`, nor give their own
//! process the recorder's effective uid.

use std::collections::HashSet;

/// What the recorder's executable name looks like in /proc (15 bytes).
const COMM: &str = "shelltrail-shel";

/// A session child that is not being recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrecorded {
    pub pid: i32,
    /// The real uid: the user whose session it is.
    pub uid: u32,
    /// Its controlling terminal (`/dev/pts/N`), when it has one.
    pub tty: Option<String>,
    /// Its command name, as /proc shows it.
    pub comm: String,
    /// A recorder stopped before it took its terminal (else: a session
    /// program that is not, or not yet, the recorder).
    pub stopped_recorder: bool,
}

/// One process, as this module needs it.
struct Proc {
    pid: i32,
    ppid: i32,
    comm: String,
    state: char,
    tty_nr: u64,
    /// Clock ticks after boot.
    start: u64,
}

/// The fields of /proc/PID/stat this module reads.
#[derive(Debug, PartialEq, Eq)]
struct Stat<'a> {
    comm: &'a str,
    state: char,
    ppid: i32,
    tty_nr: u64,
    start: u64,
}

fn parse_stat(text: &str) -> Option<Stat<'_>> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?;
    let f: Vec<&str> = text.get(close + 2..)?.split_ascii_whitespace().collect();
    // Fields 3.. of proc(5): state, ppid, pgrp, session, tty_nr, ... starttime (22).
    Some(Stat {
        comm,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        tty_nr: f.get(4)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
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

fn read_procs() -> Vec<Proc> {
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
        if let Some(st) = parse_stat(&text) {
            out.push(Proc {
                pid,
                ppid: st.ppid,
                comm: st.comm.to_string(),
                state: st.state,
                tty_nr: st.tty_nr,
                start: st.start,
            });
        }
    }
    out
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

fn uids(pid: i32) -> Option<(u32, u32)> {
    parse_uids(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// sshd's per-connection process of a user (`sshd: USER@pts/N`, or
/// `sshd-session: ...` on newer OpenSSH), under its root monitor.
fn is_sshd_connection(p: &Proc, by_pid: &std::collections::HashMap<i32, &Proc>) -> bool {
    if !p.comm.starts_with("sshd") {
        return false;
    }
    let title = cmdline(p.pid);
    let Some(rest) = title
        .strip_prefix("sshd: ")
        .or_else(|| title.strip_prefix("sshd-session: "))
    else {
        return false;
    };
    if !rest.contains('@') {
        return false;
    }
    by_pid
        .get(&p.ppid)
        .is_some_and(|parent| parent.comm.starts_with("sshd") && uids(parent.pid).is_some_and(|(r, _)| r == 0))
}

/// Session children older than `grace_ticks` that are not being recorded:
/// neither a pid in `recorded` (live sessions at this agent, by their
/// recorder's pid) nor an ancestor of one, nor a running recorder (effective
/// uid `recorder_uid`) that has not connected yet.
pub fn unrecorded(recorder_uid: u32, recorded: &HashSet<i32>, grace_ticks: u64) -> Vec<Unrecorded> {
    let procs = read_procs();
    let by_pid: std::collections::HashMap<i32, &Proc> = procs.iter().map(|p| (p.pid, p)).collect();
    // Every recorded pid and its ancestors are covered.
    let mut covered = HashSet::new();
    for &pid in recorded {
        let mut at = Some(pid);
        while let Some(p) = at.filter(|p| *p > 1 && covered.insert(*p)) {
            at = by_pid.get(&p).map(|x| x.ppid);
        }
    }
    let now = uptime_ticks();
    let connections: HashSet<i32> = procs
        .iter()
        .filter(|p| is_sshd_connection(p, &by_pid))
        .map(|p| p.pid)
        .collect();
    let mut out = Vec::new();
    for p in procs.iter().filter(|p| connections.contains(&p.ppid)) {
        if covered.contains(&p.pid) || now.is_some_and(|n| n.saturating_sub(p.start) < grace_ticks) {
            continue;
        }
        let Some((real, effective)) = uids(p.pid) else {
            continue;
        };
        // The recorder runs as its own user (effective uid), or is shielding
        // itself (real uid its own, effective the user's, for a moment).
        let recorder = p.comm == COMM && (effective == recorder_uid || real == recorder_uid);
        let stopped = matches!(p.state, 'T' | 't');
        if recorder && !stopped {
            continue; // still starting: asking for a reason, connecting
        }
        out.push(Unrecorded {
            pid: p.pid,
            uid: real,
            tty: pts_name(p.tty_nr),
            comm: p.comm.clone(),
            stopped_recorder: recorder && stopped,
        });
    }
    out
}

/// Clock ticks since boot now, as /proc/PID/stat's start time counts them.
fn uptime_ticks() -> Option<u64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??.max(1) as f64;
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    Some((secs * hz) as u64)
}

/// Reports each unrecorded session child once (again if it goes and comes).
#[derive(Default)]
pub struct Watch {
    reported: HashSet<i32>,
}

impl Watch {
    /// The ones to report now, given what [`unrecorded`] found this time.
    pub fn look(&mut self, found: Vec<Unrecorded>) -> Vec<Unrecorded> {
        let now: HashSet<i32> = found.iter().map(|s| s.pid).collect();
        let report: Vec<Unrecorded> = found.into_iter().filter(|s| !self.reported.contains(&s.pid)).collect();
        self.reported.retain(|p| now.contains(p));
        self.reported.extend(report.iter().map(|s| s.pid));
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
                ppid: 4200,
                tty_nr: 34817,
                start: 9000,
            })
        );
        // A command name with spaces and parentheses cannot shift the fields.
        let odd = "7 (a) b) c) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0";
        assert_eq!(
            parse_stat(odd).map(|s| (s.comm, s.state, s.start)),
            Some(("a) b) c", 'S', 55))
        );
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
    fn each_unrecorded_child_is_reported_once() {
        let s = |pid| Unrecorded {
            pid,
            uid: 1000,
            tty: None,
            comm: "bash".into(),
            stopped_recorder: false,
        };
        let mut w = Watch::default();
        assert_eq!(w.look(vec![s(10)]), vec![s(10)]);
        assert_eq!(w.look(vec![s(10), s(11)]), vec![s(11)]);
        assert!(w.look(vec![s(10), s(11)]).is_empty());
        // Gone, then back (a pid reused): a new one.
        assert!(w.look(vec![]).is_empty());
        assert_eq!(w.look(vec![s(10)]), vec![s(10)]);
    }
}
