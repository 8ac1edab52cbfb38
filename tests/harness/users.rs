//! Test users: real accounts, because sshd, SO_PEERCRED and /proc
//! permissions only mean something for a real, unprivileged uid.
//!
//! Users are created on first use and kept: creating them is idempotent, so
//! reruns and tests running in parallel threads (or processes) share them.
//! Tests that look at "every process of the user" get a user of their own.

use crate::proc::{describe, run};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// An account sessions log in as.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
}

/// The account most tests use.
pub const SHARED_USER: &str = "shelltrail-e2e";

impl TestUser {
    /// The shared test user (`shelltrail-e2e`, login shell bash).
    pub fn shared() -> TestUser {
        ensure(SHARED_USER, Path::new("/bin/bash"))
    }

    /// A user for one test only (login shell bash), for checks such as
    /// "nothing of this user is left running" that other tests' sessions
    /// would disturb.
    pub fn dedicated(name: &str) -> TestUser {
        ensure(name, Path::new("/bin/bash"))
    }

    /// A user whose passwd login shell is `shell`.
    pub fn with_login_shell(name: &str, shell: &Path) -> TestUser {
        ensure(name, shell)
    }

    /// A user whose login shell is the recorder, at a stable path outside
    /// any test world ([`RECORDER_LOGIN_SHELL`]): the passwd entry outlives
    /// the worlds. The copy there is refreshed from the build on every call.
    pub fn with_recorder_as_login_shell(name: &str) -> TestUser {
        ensure(name, &install_recorder())
    }

    /// Pids of this user's processes right now.
    pub fn processes(&self) -> Vec<u32> {
        let out = run(
            {
                let mut c = Command::new("pgrep");
                c.arg("-u").arg(&self.name);
                c
            },
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// `ps` lines of this user's processes, for failure messages.
    pub fn process_listing(&self) -> String {
        let mut c = Command::new("ps");
        c.arg("-o").arg("pid,ppid,pgid,sid,stat,args").arg("-u");
        c.arg(&self.name);
        run(c, Duration::from_secs(10)).stdout_str()
    }
}

/// The system user the tests' recorders are set-uid to (`recorder_user`).
pub const RECORDER_USER: &str = "shelltrail-e2e-rec";

/// The recorder's own system user (no login, no home), created on first use.
pub fn recorder_user() -> u32 {
    crate::require_root();
    let _lock = lock();
    if let Some(u) = nix::unistd::User::from_name(RECORDER_USER).expect("reading the passwd database") {
        return u.uid.as_raw();
    }
    let mut c = Command::new("useradd");
    c.args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        RECORDER_USER,
    ]);
    must(c);
    nix::unistd::User::from_name(RECORDER_USER)
        .expect("reading the passwd database")
        .unwrap_or_else(|| panic!("user {RECORDER_USER} missing right after useradd"))
        .uid
        .as_raw()
}

/// Makes the group `group` (once per machine) with `user` among its members.
pub fn ensure_group_with(group: &str, user: &str) {
    crate::require_root();
    let _lock = lock();
    let found = nix::unistd::Group::from_name(group).expect("reading the group database");
    if found.as_ref().is_some_and(|g| g.mem.iter().any(|m| m == user)) {
        return;
    }
    if found.is_none() {
        let mut c = Command::new("groupadd");
        c.arg(group);
        must(c);
    }
    let mut c = Command::new("gpasswd");
    c.args(["-a", user, group]);
    must(c);
}

/// Installs the recorder at `to` as the packages do: owned by the recorder
/// user, set-uid, with the capabilities to take the terminal.
pub fn install_setuid_recorder(to: &Path) {
    let uid = recorder_user();
    nix::unistd::chown(to, Some(nix::unistd::Uid::from_raw(uid)), None::<nix::unistd::Gid>)
        .unwrap_or_else(|e| panic!("chown {}: {e}", to.display()));
    // After chown, which clears the set-uid bit and capabilities.
    crate::world::set_mode(to, 0o4755);
    let mut c = Command::new("setcap");
    c.arg("cap_chown,cap_sys_tty_config+ep").arg(to);
    must(c);
}

/// Where [`TestUser::with_recorder_as_login_shell`] installs the recorder.
pub const RECORDER_LOGIN_SHELL: &str = "/usr/local/libexec/shelltrail-e2e/shelltrail-shell";

fn install_recorder() -> PathBuf {
    let target = PathBuf::from(RECORDER_LOGIN_SHELL);
    let dir = target.parent().expect("a directory");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    crate::world::set_mode(dir, 0o755);
    // Copy, then rename over: a login starting meanwhile never sees half a binary.
    let tmp = dir.join(format!(".shelltrail-shell.{}", std::process::id()));
    std::fs::copy(crate::bin_dir().join("shelltrail-shell"), &tmp).expect("copying the recorder");
    install_setuid_recorder(&tmp);
    std::fs::rename(&tmp, &target).expect("installing the recorder");
    target
}

/// Serialises account changes: `useradd`/`usermod` take /etc/passwd's lock
/// and fail rather than wait if another one holds it.
fn lock() -> (std::sync::MutexGuard<'static, ()>, nix::fcntl::Flock<std::fs::File>) {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let guard = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all("/run/lock").expect("creating /run/lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/shelltrail-e2e-users.lock")
        .expect("opening /run/lock/shelltrail-e2e-users.lock");
    let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking /run/lock/shelltrail-e2e-users.lock");
    (guard, flock)
}

fn ensure(name: &str, shell: &Path) -> TestUser {
    crate::require_root();
    let _lock = lock();
    match nix::unistd::User::from_name(name).expect("reading the passwd database") {
        None => {
            let mut c = Command::new("useradd");
            c.args(["-m", "-s"]).arg(shell).arg(name);
            must(c);
        }
        Some(u) if u.shell != shell => {
            let mut c = Command::new("usermod");
            c.arg("-s").arg(shell).arg(name);
            must(c);
        }
        Some(_) => {}
    }
    // useradd locks the password with "!", and sshd without PAM refuses
    // locked accounts even for key logins; "*" means "no password" instead.
    if shadow_password(name).as_deref() != Some("*") {
        let mut c = Command::new("usermod");
        c.args(["-p", "*", name]);
        must(c);
    }
    let u = nix::unistd::User::from_name(name)
        .expect("reading the passwd database")
        .unwrap_or_else(|| panic!("user {name} missing right after useradd"));
    if !u.dir.is_dir() {
        // Someone removed the home directory: sshd needs it to chdir into.
        std::fs::create_dir_all(&u.dir).expect("creating the home directory");
        nix::unistd::chown(&u.dir, Some(u.uid), Some(u.gid)).expect("chown home");
    }
    TestUser {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        home: u.dir,
    }
}

fn shadow_password(name: &str) -> Option<String> {
    let shadow = std::fs::read_to_string("/etc/shadow").ok()?;
    shadow.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.next().unwrap_or_default().to_string())
    })
}

fn must(c: Command) {
    let what = describe(&c);
    let out = run(c, Duration::from_secs(30));
    assert!(out.status.success(), "{what} failed; {out}");
}
