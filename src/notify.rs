//! The systemd notification protocol (`sd_notify`): a datagram to `$NOTIFY_SOCKET`.
//! Silent when the variable is not set (the server was not started by systemd).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends one notification such as `READY=1`. Errors are logged, never fatal.
pub fn notify(message: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = socket.to_string_lossy().into_owned();
    let sent = UnixDatagram::unbound().and_then(|s| match path.strip_prefix('@') {
        // An abstract socket (Linux): the name without the '@'.
        Some(name) => {
            let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
            s.send_to_addr(message.as_bytes(), &addr)
        }
        None => s.send_to(message.as_bytes(), &path),
    });
    if let Err(e) = sent {
        log::warn!("cannot notify the service manager at {path}: {e}");
    }
}

/// The watchdog interval asked for by systemd (`WATCHDOG_USEC`), if it is meant for us.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_string_lossy() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}
