//! Hostile and broken clients. Each test checks that the server keeps answering `/healthz`
//! while it happens (no probe waits behind a held worker), and that nothing is written
//! outside its directories. How fast it answers meanwhile is a figure, printed here and
//! measured by `scripts/attack-figures`, not asserted: the machines are shared.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::common::*;

/// Probes `/healthz` every 20 ms until [`Probe::finish`], which asserts every probe was
/// answered 204, none later than [`HELD`].
struct Probe {
    held: Duration,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(usize, Duration, Vec<String>)>>,
}

impl Probe {
    fn start(s: &TestServer, held: Duration) -> Probe {
        let addr = s.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut count = 0;
            let mut failures = Vec::new();
            // At least one probe, however quickly the test's own requests were answered.
            while count == 0 || !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = request(addr, "GET", "/healthz", &[], b"");
                let took = started.elapsed();
                if r.status != 204 {
                    failures.push(format!("status {}", r.status));
                }
                worst = worst.max(took);
                count += 1;
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            (count, worst, failures)
        });
        Probe {
            held,
            stop,
            handle: Some(handle),
        }
    }

    #[track_caller]
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let (count, worst, failures) = self.handle.take().unwrap().join().unwrap();
        assert!(count > 0);
        assert!(failures.is_empty(), "{failures:?}");
        eprintln!("/healthz: {count} probes, the slowest answered in {worst:?}");
        assert!(
            worst < self.held,
            "/healthz waited {worst:?} (over {count} probes): a worker was held"
        );
    }
}

/// Longer than a busy machine delays an answer, shorter than a worker held by an attack
/// would: the attacks here last seconds, or until a configured timeout (then the bound is
/// half of it, see [`Attack::start`]).
const HELD: Duration = Duration::from_millis(1000);

/// Files in the test dir outside the server's and the fake's own.
fn stray_files(s: &TestServer) -> Vec<String> {
    files_under(s.dir.path())
        .into_iter()
        .filter(|f| {
            !f.starts_with("fake/")
                && !f.starts_with("state/labs/")
                && f != "state/neops-remote-lab.lock"
                && f != "state/state.json"
                && f != "state/events.jsonl"
        })
        .collect()
}

/// The set-up and the end of an attack on a server: the test runs [`alone`] (attacks load
/// the machine, and the latency bound would be spoiled by other tests' load), the server's
/// `/healthz` is probed from the start, and [`Attack::finish`] checks the probes and that
/// nothing was written outside the server's directories.
struct Attack {
    held: Duration,
    probe: Option<Probe>,
    s: TestServer,
    _alone: Alone,
}

impl Attack {
    fn start(args: &[(&str, &str)]) -> Attack {
        let mut attack = Attack::start_unprobed(args);
        attack.probe();
        attack
    }

    /// For a test that takes the server's figures before the probes begin ([`Attack::probe`]).
    fn start_unprobed(args: &[(&str, &str)]) -> Attack {
        let alone = alone();
        // A worker held until --upload-timeout or --client-timeout runs out would keep a
        // probe waiting that long.
        let held = args
            .iter()
            .filter(|(flag, _)| matches!(*flag, "--upload-timeout" | "--client-timeout"))
            .map(|(_, secs)| Duration::from_secs_f64(secs.parse::<f64>().unwrap() / 2.0))
            .fold(HELD, Duration::min);
        Attack {
            held,
            probe: None,
            s: start_with(args),
            _alone: alone,
        }
    }

    fn probe(&mut self) {
        self.probe = Some(Probe::start(&self.s, self.held));
    }

    #[track_caller]
    fn finish(&mut self) {
        self.probe.take().expect("probed").finish();
        let stray = stray_files(&self.s);
        assert!(stray.is_empty(), "{stray:?}");
    }
}

impl std::ops::Deref for Attack {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.s
    }
}

fn multipart_head(s: &TestServer, id: &str, form: &Form, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(s.addr).unwrap();
    write!(
        stream,
        "POST /lab HTTP/1.1\r\nHost: x\r\nX-Session-ID: {id}\r\nContent-Type: {}\r\nContent-Length: {length}\r\n\r\n",
        form.content_type()
    )
    .unwrap();
    stream
}

#[test]
fn a_stalled_upload_is_given_up_and_cleaned_without_hurting_anyone() {
    let mut s = Attack::start(&[("--upload-timeout", "1"), ("--workers", "2")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let form =
        Form::topology("t.yml", "nodes: [r1]\n").file("extra_files", "big.cfg", &[b'x'; 100_000]);
    let body = form.body();
    let mut stalled = multipart_head(&s, &a, &form, body.len());
    stalled.write_all(&body[..60_000]).unwrap();
    // The partial upload is on disk while it runs...
    wait_until(Duration::from_secs(5), "the partial upload", || {
        s.work_dirs().len() == 1
    });
    // ...and the others are served meanwhile (more requests than workers).
    for _ in 0..20 {
        s.expect_session(&b, "waiting", 1);
    }
    s.acquire(&a, &Form::topology("t.yml", "nodes: [r1]\n"))
        .expect(423, LAB_BUSY);
    // Given up after --upload-timeout: files removed, the slot free again.
    wait_until(Duration::from_secs(5), "the upload to be given up", || {
        s.log_text().contains("upload not received within 1 s")
    });
    assert!(s.work_dirs().is_empty());
    let r = s.acquire(&a, &Form::topology("t.yml", "nodes: [r1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    // The stalled client learns it when it sends again.
    let _ = stalled.write_all(&body[60_000..]);
    let r = read_response(&mut stalled, false);
    r.expect(
        408,
        r#"{"detail":"Upload not received within 1 s (--upload-timeout)"}"#,
    );
    s.finish();
}

#[test]
fn a_trickling_upload_is_bounded_in_time_too() {
    let mut s = Attack::start(&[("--upload-timeout", "1")]);
    let (a, _) = s.create_session();
    // Over 1 KiB: tiny_http reads smaller bodies itself before handing the request over.
    let form = Form::topology("t.yml", "nodes: [r1]\n").file("extra_files", "c.cfg", &[b'y'; 2000]);
    let body = form.body();
    let mut stream = multipart_head(&s, &a, &form, body.len());
    let started = Instant::now();
    // One byte every 50 ms: each read makes progress, the whole never arrives in time.
    let mut sent = 0;
    while sent < body.len() && started.elapsed() < Duration::from_secs(5) {
        if stream.write_all(&body[sent..sent + 1]).is_err() {
            break;
        }
        sent += 1;
        thread::sleep(Duration::from_millis(50));
        if s.log_text().contains("given up") {
            break;
        }
    }
    assert!(sent < body.len(), "the upload should have been cut short");
    let _ = stream.write_all(&body[sent..]);
    read_response(&mut stream, false).expect(
        408,
        r#"{"detail":"Upload not received within 1 s (--upload-timeout)"}"#,
    );
    assert!(s.work_dirs().is_empty());
    s.finish();
}

#[test]
fn absurd_content_lengths_do_not_take_the_server_down() {
    let mut s = Attack::start(&[]);
    let (a, _) = s.create_session();
    for (method, path, session) in [
        ("GET", "/healthz", None),
        ("POST", "/session", None),
        ("POST", "/lab", Some(a.as_str())),
    ] {
        let mut stream = TcpStream::connect(s.addr).unwrap();
        let header = session
            .map(|id| format!("X-Session-ID: {id}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{header}Content-Length: 1000000000000\r\n\r\nabc"
        )
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 413");
    }
    s.get("/healthz").expect_empty(204);
    s.finish();
}

#[test]
fn oversize_bodies_are_refused_with_and_without_content_length() {
    let mut s = Attack::start(&[("--max-upload-bytes", "100000")]);
    let (a, _) = s.create_session();
    let form = Form::topology("t.yml", "nodes: [r1]\n").file("extra_files", "x", &[b'x'; 300_000]);
    let expected =
        r#"{"detail":"Upload too large: the limit is 100000 bytes (--max-upload-bytes)"}"#;
    s.acquire(&a, &form).expect(413, expected);
    chunked_acquire(s.addr, &a, &form).expect(413, expected);
    assert!(s.work_dirs().is_empty());
    s.finish();
}

#[test]
fn a_thousand_idle_connections() {
    let mut s = Attack::start(&[]);
    // Opened at about 1 000 a second: std's listen backlog is 128, and a much faster burst
    // overflows it in the kernel (connects then wait for SYN retries), whoever the server is.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| {
            thread::sleep(Duration::from_millis(1));
            TcpStream::connect(s.addr).unwrap()
        })
        .collect();
    // Every one of them is accepted and held (tiny_http keeps one or two descriptors a
    // connection), and the server still answers.
    let pid = s.child.id();
    wait_until(Duration::from_secs(10), "1000 connections accepted", || {
        fd_count(pid) >= 1000
    });
    s.get("/healthz").expect_empty(204);
    drop(idle);
    s.finish();
}

#[test]
fn headers_byte_by_byte_and_ten_thousand_headers() {
    let mut s = Attack::start(&[]);
    let slow = thread::spawn({
        let addr = s.addr;
        move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            for byte in b"GET /healthz HTTP/1.1\r\nHost: slow\r\nConnection: close\r\n\r\n" {
                stream.write_all(&[*byte]).unwrap();
                thread::sleep(Duration::from_millis(5));
            }
            read_response(&mut stream, false).status
        }
    });
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..10_000 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(raw_request(s.addr, many.as_bytes()).status, 431);
    assert_eq!(slow.join().unwrap(), 204);
    s.finish();
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_endless_header_line() {
    let mut s = Attack::start_unprobed(&[]);
    let pid = s.child.id();
    let before = rss_kib(pid);
    s.probe();
    // 8 MB without a line end: tiny_http keeps reading it (it has no header size limit, so
    // this costs memory in proportion to what the client sends; the unit's MemoryMax bounds
    // it), and everyone else is served.
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        .unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut peak = before;
    for _ in 0..128 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
        peak = peak.max(rss_kib(pid));
    }
    s.get("/healthz").expect_empty(204);
    peak = peak.max(rss_kib(pid));
    drop(stream);
    // Once the client is gone, the memory goes back (at least half of what it took).
    wait_until(Duration::from_secs(10), "the memory to fall back", || {
        rss_kib(pid) < before + (peak - before) / 2
    });
    eprintln!(
        "endless header line: {before} KiB before, peak {peak} KiB, {} KiB after",
        rss_kib(pid)
    );
    s.finish();
}

#[test]
fn odd_bytes_in_headers_and_file_names() {
    let mut s = Attack::start(&[]);
    let (a, _) = s.create_session();
    // Control characters in a header value reach us: the id is simply not a session.
    let bytes = b"POST /session/heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Session-ID: \x01\x02\x7f\r\nContent-Length: 0\r\n\r\n";
    raw_request(s.addr, bytes).expect(404, SESSION_NOT_FOUND);
    // Bytes that are not ASCII: tiny_http refuses the header and closes the connection
    // without an answer; nothing else happens.
    for bytes in [
        &b"POST /session/heartbeat HTTP/1.1\r\nHost: x\r\nX-Session-ID: \xff\xfe\r\n\r\n"[..],
        b"GET /session/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(s.addr).unwrap();
        stream.write_all(bytes).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{text}"
        );
    }
    s.expect_session(&a, "active", 0);
    // File names with control characters and non-UTF-8 bytes.
    for name in [&b"t\x01.yml"[..], b"\xff\xfe.yml", b"configs/\x00x.yml"] {
        let r = s.acquire(&a, &Form::new().raw_file("topology", name, b"nodes: [r1]"));
        assert!(
            (400..500).contains(&r.status),
            "{:?}: {} {}",
            name,
            r.status,
            r.text()
        );
        assert!(r.json()["detail"].is_string() || r.json()["detail"].is_array());
    }
    for name in [
        &b"x\x01/y.cfg"[..],
        b"\xff/../../z.cfg",
        b"\\\\server\\share",
    ] {
        let form = Form::new()
            .raw_file("topology", b"t.yml", b"nodes: [r1]")
            .raw_file("extra_files", name, b"x");
        let r = s.acquire(&a, &form);
        assert_eq!(r.status, 400, "{:?}: {}", name, r.text());
    }
    assert!(s.work_dirs().is_empty());
    s.finish();
}

#[test]
fn ten_thousand_multipart_parts() {
    let mut s = Attack::start(&[]);
    let (a, _) = s.create_session();
    let mut form = Form::topology("t.yml", "nodes: [r1]\n");
    for i in 0..10_000 {
        form = form.text("filler", &i.to_string());
    }
    s.acquire(&a, &form).expect(
        413,
        r#"{"detail":"Too many parts in the upload: the limit is 256"}"#,
    );
    assert!(s.work_dirs().is_empty());
    s.finish();
}

#[test]
fn a_flood_of_sessions_past_the_limit() {
    let mut s = Attack::start(&[("--max-sessions", "500")]);
    let mut conn = KeepAlive::open(s.addr);
    let mut created = 0;
    let mut refused = 0;
    for _ in 0..3000 {
        let r = conn.call("POST", "/session", &[]);
        match r.status {
            201 => created += 1,
            503 => {
                assert_eq!(r.header("Retry-After"), Some("5"));
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((created, refused), (500, 2500));
    assert_eq!(s.get("/debug/health").json()["sessions"], 500);
    s.finish();
}

#[test]
fn create_delete_cycles_leak_nothing() {
    // Every create and delete is fsynced to the state file; on a tmpfs that costs nothing,
    // so the 200 000 requests measure leaks, not the disk.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let mut s = Attack::start_unprobed(&[("--state-dir", shm.path().to_str().unwrap())]);
    let pid = s.child.id();
    let cycles = |n: usize| {
        let mut conn = KeepAlive::open(s.addr);
        for _ in 0..n {
            let r = conn.call("POST", "/session", &[]);
            assert_eq!(r.status, 201);
            let id = r.json()["session_id"].as_str().unwrap().to_owned();
            assert_eq!(
                conn.call("DELETE", &format!("/session/{id}"), &[]).status,
                204
            );
        }
    };
    // Warm up (allocator pools, the state file, and the in-memory event history, which is
    // bounded at 10 000 events: two per cycle fill it), then measure across 100 000 cycles.
    cycles(5_000);
    let before = process_figures(pid);
    s.probe();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let addr = s.addr;
            thread::spawn(move || {
                let mut conn = KeepAlive::open(addr);
                for _ in 0..25_000 {
                    let r = conn.call("POST", "/session", &[]);
                    assert_eq!(r.status, 201);
                    let id = r.json()["session_id"].as_str().unwrap().to_owned();
                    assert_eq!(
                        conn.call("DELETE", &format!("/session/{id}"), &[]).status,
                        204
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    s.finish();
    // The connections the cycles used are closed; tiny_http's thread for each ends once it
    // sees that, and its descriptors go with it.
    let mut after = process_figures(pid);
    wait_until(
        Duration::from_secs(10),
        "the cycles' connection threads to end",
        || {
            after = process_figures(pid);
            after.1 <= before.1 + 2 && after.2 <= before.2 + 2
        },
    );
    assert_eq!(s.get("/debug/health").json()["sessions"], 0);
    assert!(
        after.0 < before.0 + 2048,
        "resident memory grew from {} to {} KiB",
        before.0,
        after.0
    );
}

#[test]
fn a_netlab_that_crashes_or_floods_its_output() {
    let mut s = Attack::start(&[]);
    let (a, _) = s.create_session();
    s.set_control("up.crash", "");
    s.acquire(&a, &Form::topology("t.yml", "nodes: [r1]\n"))
        .expect(
            500,
            r#"{"detail":"netlab up failed (killed by signal 9): deploying r1"}"#,
        );
    assert!(s.work_dirs().is_empty());
    s.clear_control("up.crash");
    // 64 MB on each of stdout and stderr: kept bounded, and the lab still starts.
    let before = process_figures(s.child.id()).0;
    s.set_control("up.spam", &(64 * 1024 * 1024).to_string());
    let r = s.acquire(&a, &Form::topology("t.yml", "nodes: [r1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    let after = process_figures(s.child.id()).0;
    assert!(
        after < before + 24 * 1024,
        "resident memory grew from {before} to {after} KiB"
    );
    s.finish();
}

// ------------------------------------------------------------------ no client can
// freeze or kill the server

/// Descriptors the process holds now.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Threads of the process whose name is `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

/// Sends a request head declaring a body it never sends; returns the open connection.
fn silent_body(addr: std::net::SocketAddr, method: &str, path: &str, length: u64) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection; how long that took.
fn time_to_close(mut stream: TcpStream) -> Duration {
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    loop {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[test]
fn silent_bodies_never_hold_a_worker_and_are_closed_within_the_client_timeout() {
    let _alone = alone();
    let timeout = Duration::from_secs(2);
    let s = start_with(&[("--workers", "2"), ("--client-timeout", "2")]);
    // /healthz latencies while the attack goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = thread::spawn({
        let (addr, stop) = (s.addr, Arc::clone(&stop));
        move || {
            let mut times = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = request(addr, "GET", "/healthz", &[], b"");
                assert_eq!(r.status, 204);
                times.push(started.elapsed());
                thread::sleep(Duration::from_millis(10));
            }
            times
        }
    });
    // 4 × workers silent bodies, then 200 more: each is answered, and closed by the server
    // within --client-timeout of its answer although the client never sends nor closes.
    let closers: Vec<JoinHandle<Duration>> = (0..4 * 2 + 200)
        .map(|i| {
            let method = if i % 2 == 0 { "GET" } else { "POST" };
            let path = if i % 2 == 0 {
                "/healthz"
            } else {
                "/session/heartbeat"
            };
            let mut stream = silent_body(s.addr, method, path, 100_000);
            let r = read_response(&mut stream, false);
            assert!(matches!(r.status, 204 | 422), "{r:?}");
            thread::spawn(move || time_to_close(stream))
        })
        .collect();
    // New requests are answered meanwhile (the workers are free).
    s.get("/debug/health").json();
    let closed: Vec<Duration> = closers.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::SeqCst);
    let mut times = prober.join().unwrap();
    times.sort();
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    let slowest_close = closed.iter().max().unwrap();
    eprintln!(
        "{} probes, p99 {p99:?}; slowest close of a silent connection {slowest_close:?}",
        times.len()
    );
    // A worker held by a silent body would keep a probe waiting for up to the timeout.
    assert!(
        times.last().is_some_and(|worst| *worst < timeout / 2),
        "/healthz waited {:?}: a worker was held",
        times.last()
    );
    // The promised bound: closed within --client-timeout (each of two reads waits half).
    assert!(
        *slowest_close <= timeout + Duration::from_millis(500),
        "a silent connection stayed open {slowest_close:?}"
    );
    wait_until(Duration::from_secs(5), "the dropper threads to end", || {
        threads_named(s.child.id(), "dropper") == 0
    });
}

/// Starts a server under `ulimit -n limit` (soft and hard).
fn start_with_fd_limit(
    limit: u32,
    args: &[&str],
) -> (
    std::process::Child,
    std::net::SocketAddr,
    Arc<Output>,
    tempfile::TempDir,
) {
    let dir = test_dir();
    let mut options = Options::default();
    for a in args {
        options.args.push((*a).to_owned());
    }
    let inner = TestServer::command(dir.path(), &options);
    let mut command = std::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
        .arg(inner.get_program())
        .args(inner.get_args())
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            command.env(k, v);
        }
    }
    let mut child = command.spawn().unwrap();
    let (addr, log) = wait_for_listening(&mut child);
    (child, addr, log, dir)
}

#[test]
fn out_of_descriptors_the_server_exits_instead_of_staying_up_deaf() {
    // Two limits of either parity: tiny_http takes two descriptors per connection (the
    // accepted socket and a clone). When `accept` gets the last one, cloning fails and its
    // accept thread panics (the listener is gone, nothing is reported); otherwise `accept`
    // itself fails (reported through `recv`).
    for limit in [64, 65] {
        out_of_descriptors_under(limit);
    }
}

fn out_of_descriptors_under(limit: u32) {
    let (mut child, addr, log, _dir) = start_with_fd_limit(limit, &["--workers", "2"]);
    assert_eq!(request(addr, "GET", "/healthz", &[], b"").status, 204);
    // Idle connections past the limit.
    let mut idle = Vec::new();
    for _ in 0..80 {
        if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            idle.push(stream);
        }
    }
    let started = Instant::now();
    let answers = |addr| {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 204"
    };
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            log.wait_end(Duration::from_secs(5));
            let log = log.text();
            assert_eq!(status.code(), Some(75), "ulimit -n {limit}: {log}");
            assert!(
                log.contains("so that the service manager restarts the server"),
                "{log}"
            );
            eprintln!(
                "ulimit -n {limit}: exited 75 {:?} after the descriptors ran out: {}",
                started.elapsed(),
                log.lines().last().unwrap_or("")
            );
            break;
        }
        if answers(addr) {
            eprintln!("ulimit -n {limit}: still serving with the descriptors exhausted");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ulimit -n {limit}: the server is up but deaf; log:\n{}",
            log.text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
}

/// Like systemd: a server that exited (status 75) to get its resources back is started again.
fn restart_if_gone(mut s: TestServer, restarts: &mut usize) -> TestServer {
    if s.child.try_wait().unwrap().is_none() {
        return s;
    }
    let status = s.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(75), "{}", s.log_text());
    assert!(
        s.log_text().contains("abandoned on purpose"),
        "{}",
        s.log_text()
    );
    *restarts += 1;
    start_in(s.kill_keep_dir())
}

/// The server's bound on connections abandoned on purpose: one more and it exits 75.
const MAX_ABANDONED: usize = 100;

/// A deliberate exit (status 75) from the thread that abandoned one connection too many is
/// the last event in the file, with its reason; what the event writer had queued is not
/// lost with the process.
#[test]
fn a_deliberate_restart_is_the_last_event_written() {
    let mut s = start();
    let (a, _) = s.create_session();
    let mut abandoned = Vec::new();
    for i in 0..=MAX_ABANDONED {
        let mut stream = TcpStream::connect(s.addr).unwrap();
        write!(
            stream,
            "POST /session HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = [0u8; 12];
        // The last one's answer may be cut off by the exit.
        if i < MAX_ABANDONED {
            stream.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 413", "request {i}");
        }
        abandoned.push(stream);
    }
    let status = s.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(75), "{}", s.log_text());
    let text = std::fs::read_to_string(s.state_dir().join("events.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["server_started", "session_created", "server_stopping"],
        "{text}"
    );
    assert_eq!(events[1]["session"], a[..8]);
    let last = &events[2];
    assert_eq!(last["exit_status"], 75, "{text}");
    assert!(
        last["reason"].as_str().unwrap().contains(&format!(
            "{} connections were abandoned on purpose",
            MAX_ABANDONED + 1
        )),
        "{text}"
    );
    drop(abandoned);
}

#[test]
fn oversize_bodies_cost_nothing_once_their_clients_are_gone() {
    // A thousand connections and restarts: a load the others should not run beside.
    let _alone = alone();
    let mut s = start();
    let (a, _) = s.create_session();
    let baseline = fd_count(s.child.id());
    let mut restarts = 0;
    // Requests the server now running has taken: past MAX_ABANDONED it exits.
    let mut taken = 0;
    for i in 0..1000 {
        let before = restarts;
        s = restart_if_gone(s, &mut restarts);
        if restarts != before {
            taken = 0;
        }
        let Ok(mut stream) = TcpStream::connect(s.addr) else {
            continue;
        };
        if write!(
            stream,
            "POST /session HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        .is_ok()
        {
            taken += 1;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut head = [0u8; 12];
        if stream.read_exact(&mut head).is_ok() {
            assert_eq!(&head, b"HTTP/1.1 413", "request {i}");
        }
        // The client goes away at once.
    }
    // The last server serves, the session created before is still there, and what the
    // abandoned connections held is bounded (the server restarts past the bound). One that
    // took its last request past the bound is on its way out: wait for that.
    if taken > MAX_ABANDONED {
        s.wait_exit(Duration::from_secs(10));
    }
    s = restart_if_gone(s, &mut restarts);
    s.expect_session(&a, "active", 0);
    s.get("/healthz").expect_empty(204);
    let now = fd_count(s.child.id());
    eprintln!("{restarts} restarts; descriptors {baseline} before, {now} after");
    assert!(restarts >= 1);
    assert!(
        now <= baseline + 2 * (MAX_ABANDONED + 1) + 10,
        "{now} descriptors, {baseline} before"
    );
}

#[test]
fn a_request_line_cannot_forge_log_lines() {
    let s = start();
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .write_all(
            b"POST /x\n[ERROR]\x1b[31mFORGED HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    wait_until(Duration::from_secs(5), "the log line", || {
        s.log_text().contains("FORGED")
    });
    let log = s.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("FORGED")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("[WARN] POST /x\\n[ERROR]\\u{1b}[31mFORGED"),
        "{}",
        lines[0]
    );
    assert!(!log.contains('\u{1b}'), "{log}");
}

#[test]
fn stalled_uploads_end_and_never_block_a_legitimate_one() {
    // Given up after 0.2 s; the client timeout (reads wait 1 s) then ends the thread.
    let s = start_with(&[("--upload-timeout", "0.2"), ("--client-timeout", "2")]);
    let (a, _) = s.create_session();
    let form = Form::topology("t.yml", "nodes: [r1]\n").file("extra_files", "big", &[b'x'; 50_000]);
    let body = form.body();
    let mut stalled = Vec::new();
    // More stalled uploads, one after another, than the 16 upload threads there may be.
    for i in 0..17 {
        let mut stream = multipart_head(&s, &a, &form, body.len());
        stream.write_all(&body[..10_000]).unwrap();
        wait_until(Duration::from_secs(5), "the upload to be given up", || {
            s.log_text().matches("upload not received within").count() > i
        });
        // The client never sends the rest, nor closes: its thread ends within the client
        // timeout all the same.
        stalled.push(stream);
    }
    wait_until(Duration::from_secs(5), "the upload threads to end", || {
        threads_named(s.child.id(), "upload") == 0
    });
    let r = s.acquire(&a, &Form::topology("t.yml", "nodes: [r1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(stalled);
}

#[test]
fn unreadable_part_headers_get_clear_answers() {
    let s = start();
    let (a, _) = s.create_session();
    s.acquire(&a, &Form::new().raw_file("topology", b"a\x00b.yml", b"nodes: [r1]")).expect(
        400,
        r#"{"detail":"Malformed multipart body: a part header contains bytes not allowed in a header (such as NUL or other control characters)"}"#,
    );
    s.acquire(&a, &Form::new().raw_file("topology", b"\xff\xfe.yml", b"nodes: [r1]")).expect(
        400,
        r#"{"detail":"Malformed multipart body: a part header is not valid UTF-8 (file names must be UTF-8)"}"#,
    );
    // A 200 KB part header.
    let long = format!("t.yml\"\r\nX-Pad: {}", "a".repeat(200_000));
    s.acquire(&a, &Form::new().raw_file("topology", long.as_bytes(), b"nodes: [r1]")).expect(
        400,
        r#"{"detail":"Malformed multipart body: a part's headers are too long or not ended by an empty line"}"#,
    );
    assert!(s.work_dirs().is_empty());
}

#[test]
fn a_semicolon_in_a_quoted_file_name_is_part_of_the_name() {
    let s = start();
    let (a, _) = s.create_session();
    let r = s.acquire(
        &a,
        &Form::new().raw_file("topology", b"a;b.yml", b"nodes: [r1]"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let lab = s.lab("GET", "/lab", &a).json();
    assert_eq!(lab["topology"], "a;b.yml", "{lab}");
    assert!(
        s.call_lines().contains(&"up a;b.yml".to_owned()),
        "{:?}",
        s.call_lines()
    );
}

/// A request line over 8 KiB is 414, more than 100 header fields or 32 KiB of them 431,
/// answered before the request reaches any route (no token check, no event).
#[test]
fn oversize_request_lines_and_headers_get_414_and_431() {
    let s = start();
    let long = format!("/session/{}", "a".repeat(9000));
    s.get(&long).expect(
        414,
        r#"{"detail":"Request line too long: the limit is 8192 bytes"}"#,
    );
    let limits = r#"{"detail":"Request header fields too large: the limits are 100 fields and 32768 bytes"}"#;
    let big = "b".repeat(33 * 1024);
    s.request("GET", "/healthz", &[("X-Big", &big)], b"")
        .expect(431, limits);
    let names: Vec<String> = (0..101).map(|n| format!("X-H{n}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    s.request("POST", "/session", &headers, b"")
        .expect(431, limits);
    // Just under the limits: served.
    let ok = format!("/session/{}", "a".repeat(8000));
    s.get(&ok).expect(404, SESSION_NOT_FOUND);
    let r = s.get("/queue");
    assert_eq!(r.json()["sessions"], serde_json::json!([]), "{}", r.text());
    let events = s.get("/events").json();
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "session_created"),
        "{events}"
    );
}

/// A web page of another site cannot make a browser open a session (or end one): a foreign
/// `Origin` is refused, and so are the body types a form sends without a preflight; the
/// status page runs only its own script.
#[test]
fn a_cross_site_origin_is_refused() {
    let s = start();
    let host = s.addr.to_string();
    let evil = [("Origin", "https://evil.example")];
    s.request("POST", "/session", &evil, b"").expect(
        403,
        r#"{"detail":"Cross-site request refused: the Origin is not this server"}"#,
    );
    s.request("POST", "/session", &[("Origin", "null")], b"")
        .expect(
            403,
            r#"{"detail":"Cross-site request refused: the Origin is not this server"}"#,
        );
    for form in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let r = s.request("POST", "/session", &[("Content-Type", form)], b"a=b");
        assert_eq!(r.status, 415, "{form}: {}", r.text());
    }
    assert_eq!(s.get("/queue").json()["sessions"], serde_json::json!([]));
    // Its own origin, and no origin at all (every non-browser client), are served.
    let own = format!("http://{host}");
    let (id, _) = s.create_session();
    let r = s.request("POST", "/session", &[("Origin", &own)], b"");
    assert_eq!(r.status, 201, "{}", r.text());
    s.request("DELETE", &format!("/session/{id}"), &evil, b"")
        .expect(
            403,
            r#"{"detail":"Cross-site request refused: the Origin is not this server"}"#,
        );
    s.expect_session(&id, "active", 0);
    let page = s.get("/");
    let csp = page.header("content-security-policy").unwrap();
    let script = csp
        .split(';')
        .find(|d| d.trim().starts_with("script-src"))
        .unwrap();
    assert!(
        script.contains("'sha256-") && !script.contains("unsafe-inline"),
        "{csp}"
    );
}

/// Opens `count` connections back to back, sends `GET /healthz` on each, and returns how
/// many were answered 204 by `deadline`, with the connections (open).
fn answered_of_a_burst(s: &TestServer, count: usize, deadline: Instant) -> (usize, Vec<TcpStream>) {
    // Connected at the same moment from a thread each, as close together as wrk's
    // non-blocking connects: one thread connecting in turn gives the pool time between.
    let start = Arc::new(std::sync::Barrier::new(count));
    let mut conns: Vec<TcpStream> = (0..count)
        .map(|_| {
            let (addr, start) = (s.addr, Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                TcpStream::connect(addr).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for c in &mut conns {
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: burst\r\n\r\n")
            .unwrap();
    }
    let mut answered = 0;
    for c in &mut conns {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        c.set_read_timeout(Some(left)).unwrap();
        let mut head = [0u8; 12];
        if c.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 204" {
            answered += 1;
        }
    }
    (answered, conns)
}

#[test]
fn every_connection_of_a_burst_is_served_while_the_others_stay_open() {
    // tiny_http's pool can queue connections that arrive back to back for threads that stay
    // busy with their own keep-alive connections (see `listener::rescue`): without the
    // rescue, those wait for the once-a-second watch, one per second, so most of a burst
    // would still be waiting at the deadline. It happens when a burst is larger than the
    // pool's idle threads and the threads the pool wakes do not get the CPU at once: so
    // threads of ours keep both CPUs busy meanwhile, and each burst is larger than the one
    // before (whose threads are idle by then).
    let s = start();
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<JoinHandle<()>> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for (round, count) in [32, 64, 128].into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (answered, _open) = answered_of_a_burst(&s, count, deadline);
        assert_eq!(answered, count, "connections of burst {round} answered");
    }
    stop.store(true, Ordering::SeqCst);
    for b in busy {
        b.join().unwrap();
    }
}
