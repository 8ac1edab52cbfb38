//! The recorder sshd runs for every session (`ForceCommand /usr/bin/shelltrail-shell`).
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(shelltrail::shell::main());
}
