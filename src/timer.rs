//! The timer thread: every `--sweep-interval` it reaps stale sessions. It only decides (under
//! the state lock) and queues teardowns; it never runs netlab itself.
//!
//! Under systemd with `WatchdogSec=`, it also pets the watchdog, but only after asking the
//! server itself for `GET /healthz` over loopback and getting the answer: a stuck listener or
//! a pool whose workers are all blocked stops the pings, and systemd restarts the service.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::notify;
use crate::state::Shared;

/// Runs until `stop` receives a message or is disconnected. `probe` is where the server can
/// be reached from here, for the watchdog's self-check.
pub fn run(shared: &Shared, stop: Receiver<()>, probe: SocketAddr) {
    let watchdog = notify::watchdog_interval().map(|interval| interval / 2);
    let mut next_sweep = Instant::now() + shared.config.sweep_interval;
    let mut next_ping = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_sweep {
            shared.sweep();
            next_sweep = now + shared.config.sweep_interval;
        }
        if let Some(every) = watchdog
            && now >= next_ping
        {
            match self_check(probe, every) {
                Ok(()) => notify::notify("WATCHDOG=1"),
                Err(e) => log::error!("watchdog self-check failed, not pinging systemd: {e}"),
            }
            next_ping = now + every;
        }
        let mut wake = next_sweep;
        if watchdog.is_some() {
            wake = wake.min(next_ping);
        }
        match stop.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// `GET /healthz` through the listener and the worker pool, within `limit`.
pub fn self_check(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(limit))
        .and_then(|_| stream.set_write_timeout(Some(limit)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: watchdog\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head == b"HTTP/1.1 204" {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&head)
        ))
    }
}

/// Where to reach a server bound to `bound`: the wildcard addresses mean loopback.
pub fn probe_address(bound: SocketAddr) -> SocketAddr {
    let mut addr = bound;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}
