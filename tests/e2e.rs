//! End-to-end tests of shelltrail: a real OpenSSH sshd whose ForceCommand is
//! the recorder, real `ssh`/`scp`/`sftp`/`rsync` clients, a real agent, and
//! the operator CLI to look at what was recorded. The harness (this
//! package's library, `tests/harness/`) gives every test a private world;
//! see its documentation.
//!
//! Run with `tests/run.sh`, or as root: `cargo build --bins && cargo test -p shelltrail-tests`.
//!
//! Modules:
//! * [`interactive`]: `ssh -tt` sessions typed into a pseudo-terminal: output
//!   recorded and playable by asciinema 3 (v3 and v2 exports), window
//!   resizes, exit status, keystrokes typed at an echo-off password prompt
//!   never recorded.
//! * [`exec`]: `ssh host CMD`: stdout, stderr and exit status pass through
//!   unchanged, closed stdin (`ssh -n`), UTF-8 split across writes, invalid
//!   UTF-8 and binary output reconstructed byte for byte by `export --raw`.
//! * [`transfer`]: scp (SFTP and legacy protocols), sftp and rsync of a
//!   64 MiB file in both directions: the file arrives intact and the
//!   recording holds a summary marker instead of the payload.
//! * [`durability`]: the agent killed with SIGKILL mid-session and
//!   restarted loses nothing and duplicates nothing; the agent down at login
//!   (`on_agent_unavailable` deny and allow, and an agent that comes back
//!   during an allowed session).
//! * [`identity`]: who and why: key fingerprints and OpenSSH certificate
//!   details from ExposeAuthInfo, the reason required by `require_reason`.
//! * [`security`]: the recorder as login shell and ForceCommand records once,
//!   and what sshd told it (`SSH_ORIGINAL_COMMAND`, `$SHELL`) does not leak to the session;
//!   the user cannot read the recorder's memory, stop it or kill it;
//!   hostile bytes on the agent socket close only that connection.
//! * [`privsep`]: the recorded user against the privilege separation: a
//!   login script that stops the recorder and runs a shell on `$SSH_TTY`, a
//!   process holding sshd's terminal from before the recorder started,
//!   another session of the user reaching for the terminal or the recorder.
//! * [`agent_limits`]: what a local user can throw at the agent's socket: a
//!   flood of connections (and the agent out of descriptors), 300 frames held
//!   half-sent, chunks that are not what they claim; and a spool damaged by
//!   such a chunk. The agent stays up and small; other users are recorded.
//! * [`quotas`]: a `base64 /dev/urandom` hog held at its user's spool quota,
//!   ended with a message under `deny`, its gap recorded under `allow`,
//!   while another user logs in and is recorded.
//! * [`install`]: what a fleet rollout must not get wrong: a second agent
//!   on the same spool refuses to start, naming the first; root does not
//!   run the agent on the service's spool; a break-glass login gets in with
//!   the agent down, is recorded to a fallback file and imported (or
//!   resumed) when the agent returns; others cannot claim break-glass.
//! * [`lifecycle`]: an interactive session left open and idle while waves
//!   of megabyte sessions come, end and ship, and the agent is restarted
//!   (SIGTERM, SIGKILL, SIGTERM): the spool drains back to a few segments
//!   after every wave, the host lists no ghost, and the idle session, ended
//!   at last, is whole at the collector.
//! * [`live`]: live response on a host: `sessions --live`, `kill` (the
//!   user told, the recording and the end record say who and why, audited),
//!   `--lock` until `unlock` (across an agent restart), and the recorded
//!   user refused all of it while a member of `admin_group` is not.
//! * [`fleet_live`]: live response through the collector: the fleet's live
//!   sessions, a tail that draws the user's screen and survives a link cut
//!   again and again with no gap and no repeat, `kill --lock` and `unlock
//!   --host` by the respond role (a kill for an offline host queued and
//!   done when it returns), refusals for the view role and host
//!   certificates, and all of it in `shelltrail audit`.
//! * [`shipping`]: host agent → collector over gRPC with mutual TLS, through
//!   a fault-injecting proxy: collector refused, killed and restarted, agent
//!   killed, link cut a hundred times, stalled and black-holed, the spool
//!   cap reached while the collector is away, and who may ship or read
//!   (other CAs, no certificate, another host's sessions, certificate roles:
//!   an operator's certificate cannot ship, a host's cannot read, one
//!   without a role does neither). No sshd.
//! * [`sealing`]: sessions sealed by their host's key: a chain rewritten with
//!   recomputed hashes, a session cut short, an unsigned one, one sealed with
//!   another key, one the collector flagged and one whose recorder's end
//!   disagrees with the agent all fail `verify`, at the collector and on the
//!   spool; a good one passes, and so does one whose recorder was killed
//!   (sealed by the agent's sweep). No sshd.

mod agent_limits;
mod durability;
mod exec;
mod fleet_live;
mod identity;
mod install;
mod interactive;
mod lifecycle;
mod live;
mod privsep;
mod quotas;
mod sealing;
mod security;
mod shipping;
mod transfer;
