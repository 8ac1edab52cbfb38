//! Log lines from the recorder go to the system log (`/dev/log`, facility
//! authpriv, like sshd's own), not to the user's terminal: the recorder's
//! stderr belongs to the session. Where no syslog daemon listens (containers,
//! tests) the line is lost, so nothing that matters is reported here alone:
//! refusals are also printed to the user, and gaps are also recorded in the
//! session's Close message and by the agent.

use std::os::unix::net::UnixDatagram;

const LOG_AUTHPRIV: u8 = 10 << 3;
const LOG_WARNING: u8 = 4;
const LOG_INFO: u8 = 6;
const LOG_ERR: u8 = 3;

fn send(severity: u8, msg: &str) {
    let line = format!(
        "<{}>shelltrail-shell[{}]: {}",
        LOG_AUTHPRIV | severity,
        std::process::id(),
        msg.replace('\n', " ")
    );
    if let Ok(sock) = UnixDatagram::unbound() {
        let _ = sock.send_to(line.as_bytes(), "/dev/log");
    }
}

pub fn info(msg: &str) {
    send(LOG_INFO, msg);
}

pub fn warning(msg: &str) {
    send(LOG_WARNING, msg);
}

pub fn error(msg: &str) {
    send(LOG_ERR, msg);
}
