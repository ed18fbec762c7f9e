//! `GET /session/{id}?wait=S`: parked without a worker, answered by whichever thread changes
//! the queue, by the timer, or at shutdown.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::*;

/// Sends a long-poll without reading its answer yet.
fn send_wait(addr: SocketAddr, id: &str, wait: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(70)))
        .unwrap();
    let head =
        format!("GET /session/{id}?wait={wait} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

fn read(stream: TcpStream) -> Resp {
    read_response(&mut BufReader::new(stream), false)
}

/// Waits until `n` long-polls are parked, as `GET /debug/health` counts them.
#[track_caller]
fn wait_parked(server: &TestServer, n: u64) {
    wait_until(Duration::from_secs(20), &format!("{n} parked"), || {
        server.get("/debug/health").json()["long_polls"] == n
    });
}

/// A bound that tells an answer woken by a change from one sent because the wait ran out:
/// half the wait. Not a latency bound (the figure is printed; the machines are shared).
fn before_the_wait_ran_out(wait_secs: u64) -> Duration {
    Duration::from_secs(wait_secs) / 2
}

#[test]
fn bad_wait_values_are_422() {
    let server = start();
    let (id, _) = server.create_session();
    for (wait, kind, msg) in [
        ("0", "greater_than", "Input should be greater than 0"),
        ("-1", "greater_than", "Input should be greater than 0"),
        (
            "61",
            "less_than_equal",
            "Input should be less than or equal to 60",
        ),
        (
            "abc",
            "float_parsing",
            "Input should be a valid number, unable to parse string as a number",
        ),
    ] {
        server.get(&format!("/session/{id}?wait={wait}")).expect(
            422,
            &format!(
                "{{\"detail\":[{{\"type\":\"{kind}\",\"loc\":[\"query\",\"wait\"],\"msg\":\"{msg}\",\"input\":\"{wait}\"}}]}}"
            ),
        );
    }
    // An active session is answered at once; an unknown one is 404.
    let started = Instant::now();
    server
        .get(&format!("/session/{id}?wait=30"))
        .expect(200, "{\"status\":\"active\",\"position\":0}");
    assert!(started.elapsed() < before_the_wait_ran_out(30));
    server
        .get("/session/00000000-0000-4000-8000-000000000000?wait=30")
        .expect(404, "{\"detail\":\"Session not found\"}");
}

#[test]
fn a_parked_wait_is_answered_at_the_promotion() {
    let server = start_with(&[("--workers", "1")]);
    let (first, _) = server.create_session();
    let (second, _) = server.create_session();
    let waiting = send_wait(server.addr, &second, "30");
    wait_parked(&server, 1);
    let ended = Instant::now();
    server
        .delete(&format!("/session/{first}"))
        .expect_empty(204);
    let answer = read(waiting);
    let latency = ended.elapsed();
    answer.expect(200, "{\"status\":\"active\",\"position\":0}");
    println!("promotion answered after {latency:?} (from the start of the DELETE)");
    assert!(latency < before_the_wait_ran_out(30), "{latency:?}");
}

#[test]
fn a_position_change_or_a_removal_answers_and_the_wait_runs_out() {
    let server = start();
    let (_first, _) = server.create_session();
    let (second, _) = server.create_session();
    let (third, _) = server.create_session();
    // The session ahead of it leaves: position 2 → 1.
    let waiting = send_wait(server.addr, &third, "30");
    wait_parked(&server, 1);
    server
        .delete(&format!("/session/{second}"))
        .expect_empty(204);
    read(waiting).expect(200, "{\"status\":\"waiting\",\"position\":1}");
    // Its own session is ended: 404.
    let waiting = send_wait(server.addr, &third, "30");
    wait_parked(&server, 1);
    server
        .delete(&format!("/session/{third}"))
        .expect_empty(204);
    read(waiting).expect(404, "{\"detail\":\"Session not found\"}");
    // Nothing changes: answered with the state as it is when S runs out.
    let (fourth, _) = server.create_session();
    let started = Instant::now();
    server
        .get(&format!("/session/{fourth}?wait=0.5"))
        .expect(200, "{\"status\":\"waiting\",\"position\":1}");
    let took = started.elapsed();
    println!("a wait of 0.5 s answered after {took:?}");
    assert!(took >= Duration::from_millis(450), "{took:?}");
}

#[test]
fn parking_keeps_the_session_alive_at_park_and_at_answer() {
    // Waiting timeout 1.5 s, a wait of 1 s: refreshed when parked, and again when answered
    // (GET /queue, which refreshes nothing, shows it seen less than the wait ago).
    let server = start_with(&[("--waiting-timeout", "1.5")]);
    let (_first, _) = server.create_session();
    let (second, _) = server.create_session();
    server
        .get(&format!("/session/{second}?wait=1"))
        .expect(200, "{\"status\":\"waiting\",\"position\":1}");
    let queue = server.get("/queue").json();
    let seen = queue["sessions"][1]["last_seen_ago"].as_f64().unwrap();
    assert_eq!(queue["sessions"][1]["id"], second[..8]);
    assert!(
        seen < 1.0,
        "last seen {seen} s ago: at the park, not the answer"
    );
    // And without polls it is reaped: the timeout is real.
    // (Read from the log: a poll would keep it alive.)
    wait_until(Duration::from_secs(10), "the silent session reaped", || {
        server
            .log_text()
            .contains(&format!("session {second} reaped"))
    });
    server.expect_no_session(&second);
}

/// 1 000 connections on each side: raise the soft descriptor limit to the hard one, for
/// this process and the server it starts (limits are inherited).
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        soft >= 2100,
        "the descriptor limit is {soft}: too low for this test"
    );
}

#[test]
fn a_thousand_parked_waits_hold_no_worker_and_shutdown_answers_them() {
    // Two thousand connections and a latency bound: alone.
    let _alone = alone();
    raise_fd_limit();
    let mut server = start_with(&[("--workers", "2")]);
    let (first, _) = server.create_session();
    let (second, _) = server.create_session();
    let parked: Vec<TcpStream> = (0..1000)
        .map(|_| send_wait(server.addr, &second, "60"))
        .collect();
    // Every one of them reached the server and was parked: a new poll still comes back at
    // once, and so does a heartbeat, through a pool of two workers.
    wait_parked(&server, 1000);
    let (rss, threads, fds) = process_figures(server.child.id());
    println!(
        "server with 1000 parked long-polls: {rss} KiB resident, {threads} threads, {fds} fds"
    );
    let started = Instant::now();
    server
        .request(
            "POST",
            "/session/heartbeat",
            &[("X-Session-ID", &second)],
            b"",
        )
        .expect_empty(204);
    let heartbeat = started.elapsed();
    println!("heartbeat with 1000 parked long-polls: {heartbeat:?}");
    assert!(heartbeat < Duration::from_secs(1), "{heartbeat:?}");
    server.expect_session(&first, "active", 0);
    // SIGTERM: every parked request gets its answer before the server exits.
    server.signal(Signal::TERM);
    let started = Instant::now();
    for stream in parked {
        read(stream).expect(200, "{\"status\":\"waiting\",\"position\":1}");
    }
    println!(
        "1000 parked answered at shutdown within {:?}",
        started.elapsed()
    );
    assert!(server.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn the_sweep_answers_a_parked_wait_when_it_reaps_the_session_ahead() {
    let server = start_with(&[("--active-timeout", "0.5")]);
    let (_silent, _) = server.create_session();
    let (second, _) = server.create_session();
    let started = Instant::now();
    // The session ahead never polls: reaped after 0.5 s, and the sweep answers.
    server
        .get(&format!("/session/{second}?wait=30"))
        .expect(200, "{\"status\":\"active\",\"position\":0}");
    let took = started.elapsed();
    println!("answered by the sweep after {took:?}");
    assert!(took < before_the_wait_ran_out(30), "{took:?}");
    assert!(server.log_text().contains("reaped: active"));
}

#[test]
fn a_wait_on_a_session_of_another_token_is_404() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "ci:ci-token-0123456789abcdef\nother:other-token-0123456789ab\n",
    )
    .unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let server = start_with(&[("--token-file", tokens.to_str().unwrap())]);
    let ci = [("Authorization", "Bearer ci-token-0123456789abcdef")];
    let other = [("Authorization", "Bearer other-token-0123456789ab")];
    server.request("POST", "/session", &ci, b"").json();
    let second = server.request("POST", "/session", &ci, b"").json()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/session/{second}?wait=30");
    let started = Instant::now();
    server
        .request("GET", &path, &other, b"")
        .expect(404, "{\"detail\":\"Session not found\"}");
    assert!(started.elapsed() < before_the_wait_ran_out(30));
    server
        .request("GET", &format!("/session/{second}?wait=0.2"), &ci, b"")
        .expect(200, "{\"status\":\"waiting\",\"position\":1}");
    server
        .request("GET", &path, &[], b"")
        .expect(401, "{\"detail\":\"Not authenticated\"}");
}

/// Opens a long-poll whose answer is never read.
fn park_raw(addr: SocketAddr, id: &str) -> TcpStream {
    send_wait(addr, id, "60")
}

#[test]
fn long_polls_of_clients_that_went_away_free_their_slots() {
    // The timer looks for dead clients every --sweep-interval (0.1 s in tests).
    let server = start();
    let (first, _) = server.create_session();
    let (second, _) = server.create_session();
    let reset: Vec<TcpStream> = (0..10).map(|_| park_raw(server.addr, &second)).collect();
    let closed: Vec<TcpStream> = (0..5).map(|_| park_raw(server.addr, &second)).collect();
    let alive: Vec<TcpStream> = (0..5).map(|_| park_raw(server.addr, &second)).collect();
    wait_parked(&server, 20);
    // Reset: SO_LINGER 0, then close, sends an RST.
    for stream in reset {
        rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO)).unwrap();
        drop(stream);
    }
    wait_parked(&server, 10);
    // Closed the ordinary way (a FIN; the server's side is left in CLOSE_WAIT).
    drop(closed);
    wait_parked(&server, 5);
    // The live ones stay parked (the wait is 60 s) and are answered at the promotion.
    assert_eq!(server.get("/debug/health").json()["long_polls"], 5);
    server
        .delete(&format!("/session/{first}"))
        .expect_empty(204);
    for stream in alive {
        read(stream).expect(200, "{\"status\":\"active\",\"position\":0}");
    }
    wait_parked(&server, 0);
}

#[test]
fn the_long_poll_cap_follows_the_open_files_limit() {
    // 1 280 descriptors: (1 280 - 256) / 4 = 256 long-polls at most.
    let server = TestServer::start(Options {
        nofile: Some(1280),
        ..Options::default()
    });
    assert_eq!(server.get("/debug/health").json()["long_poll_cap"], 256);
    assert!(
        server
            .log_text()
            .contains("open files limit 1280 (long-polls parked at most 256)"),
        "{}",
        server.log_text()
    );
    let (_first, _) = server.create_session();
    let (second, _) = server.create_session();
    let parked: Vec<TcpStream> = (0..256).map(|_| park_raw(server.addr, &second)).collect();
    wait_parked(&server, 256);
    // Beyond the cap, `wait` is ignored: answered at once.
    let started = Instant::now();
    server
        .get(&format!("/session/{second}?wait=30"))
        .expect(200, "{\"status\":\"waiting\",\"position\":1}");
    assert!(started.elapsed() < before_the_wait_ran_out(30));
    assert_eq!(server.get("/debug/health").json()["long_polls"], 256);
    drop(parked);
    wait_parked(&server, 0);
}
