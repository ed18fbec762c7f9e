//! The systemd notification protocol, against a socket the test listens on (there is no
//! systemd here to start the unit).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::common::*;

/// systemd's side: a socket (in a directory of its own), and a server started with
/// `NOTIFY_SOCKET` naming it and `env` besides. Reads time out after `wait`.
fn notified_server(wait: Duration, env: &[(&str, &str)]) -> (TestServer, UnixDatagram) {
    let dir = test_dir();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut options = Options::default().in_dir(dir);
    options
        .env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    options
        .env
        .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    (TestServer::start(options), socket)
}

fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_watchdog_and_stopping_are_sent() {
    let (mut s, socket) = notified_server(Duration::from_secs(10), &[("WATCHDOG_USEC", "400000")]);
    assert_eq!(next_message(&socket), "READY=1");
    // Pings every half interval, each after a real request through the listener.
    for _ in 0..3 {
        assert_eq!(next_message(&socket), "WATCHDOG=1");
    }
    s.signal(Signal::TERM);
    let mut rest = Vec::new();
    while let Ok(n) = {
        let mut buf = [0u8; 256];
        socket
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    } {
        rest.push(n);
        if rest.last().map(String::as_str) == Some("STOPPING=1") {
            break;
        }
    }
    assert_eq!(
        rest.last().map(String::as_str),
        Some("STOPPING=1"),
        "{rest:?}"
    );
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn no_watchdog_pings_for_another_process() {
    let (_s, socket) = notified_server(
        Duration::from_millis(800),
        &[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")],
    );
    assert_eq!(next_message(&socket), "READY=1");
    let mut buf = [0u8; 64];
    assert!(socket.recv(&mut buf).is_err(), "no WATCHDOG=1 expected");
}
