//! The timer thread. Every `--sweep-interval` it reaps stale sessions, tears down a lab left
//! idle with no session past `--idle-lab-timeout`, and queues the failed teardowns whose
//! retry is due, and answers the long-polls whose client is gone; it answers the long-polls
//! whose wait ran out. It only decides (under the
//! state lock) and queues teardowns for the lab thread; it never runs netlab itself.
//!
//! Under systemd with `WatchdogSec=`, it also pets the watchdog, but only after asking the
//! server itself for `GET /healthz` over loopback and getting the answer: a stuck listener or
//! a pool whose workers are all blocked stops the pings, and systemd restarts the service.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};

use crate::core::state::Shared;
use crate::notify;

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
            shared.health_tick();
            shared.drop_dead_parked(probe.port());
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
        // Long-polls whose wait ran out are answered with the state as it is.
        if let Some(deadline) = shared.expire_parked(false) {
            let left = deadline.saturating_sub(shared.clock.now());
            wake = wake.min(Instant::now() + left);
        }
        select! {
            recv(stop) -> _ => return,
            recv(shared.park_wakes()) -> _ => {}
            default(wake.saturating_duration_since(Instant::now())) => {}
        }
    }
}

/// `GET /healthz` through the listener and the worker pool, within `limit`. An answer other
/// than 204 (or our 503 degraded, draining or unhealthy) is an `InvalidData` error.
fn self_check(addr: SocketAddr, limit: Duration) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, limit)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: watchdog\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    let _ = (&mut stream).take(4096).read_to_end(&mut answer);
    // Degraded (the state file cannot be written) is no reason to restart: a restart cannot
    // write it either, and the server refuses changes meanwhile. Nor is draining (an
    // admin's choice) or unhealthy (netlab's back end fails; a restart keeps draining and
    // mends no back end): the server answered, which is all this checks.
    let says = |what: &[u8]| {
        let needle = [&b"{\"detail\":\""[..], what].concat();
        answer.windows(needle.len()).any(|w| w == needle)
    };
    let alive_but_refusing = answer.starts_with(b"HTTP/1.1 503")
        && (says(b"degraded:") || says(b"draining\"") || says(b"unhealthy:"));
    if answer.starts_with(b"HTTP/1.1 204") || alive_but_refusing {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(12)])
            ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    /// A one-connection server that reads the request and answers `reply` (or nothing).
    fn peer(reply: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            match reply {
                Some(text) => {
                    let _ = (&stream).write_all(text.as_bytes());
                }
                None => std::thread::sleep(Duration::from_secs(5)),
            }
        });
        addr
    }

    #[test]
    fn the_self_check_needs_a_real_204() {
        let limit = Duration::from_millis(300);
        let ok = peer(Some("HTTP/1.1 204 No Content\r\n\r\n"));
        assert!(self_check(ok, limit).is_ok());
        let busy = peer(Some("HTTP/1.1 503 Service Unavailable\r\n\r\n"));
        let busy = self_check(busy, limit).unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::InvalidData);
        assert_eq!(busy.to_string(), r#"unexpected answer "HTTP/1.1 503""#);
        let degraded = peer(Some(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 30\r\n\r\n{\"detail\":\"degraded: no disk\"}",
        ));
        assert!(self_check(degraded, limit).is_ok());
        for body in [
            r#"{"detail":"draining"}"#,
            r#"{"detail":"unhealthy: netlab up failed"}"#,
        ] {
            let text = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let refusing = peer(Some(Box::leak(text.into_boxed_str())));
            assert!(self_check(refusing, limit).is_ok(), "{body}");
        }
        // A listener whose workers never answer: the check gives up within its limit.
        let stuck = peer(None);
        let started = Instant::now();
        assert!(self_check(stuck, limit).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn wildcard_addresses_are_probed_on_loopback() {
        assert_eq!(
            probe_address("0.0.0.0:8000".parse().unwrap()),
            "127.0.0.1:8000".parse().unwrap()
        );
        assert_eq!(
            probe_address("[::]:80".parse().unwrap()),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            probe_address("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse().unwrap()
        );
    }
}
