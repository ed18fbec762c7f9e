//! Hostile and broken clients. Each test checks that the server keeps answering `/healthz`
//! promptly while it happens, and that nothing is written outside its directories.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

/// The tests here load the machine; they run one at a time so that the latency bound of
/// one is not spoiled by another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Probes `/healthz` every 20 ms until dropped; [`Probe::finish`] asserts every probe was
/// answered 204 within 100 ms.
struct Probe {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(usize, Duration, Vec<String>)>>,
}

impl Probe {
    fn start(s: &TestServer) -> Probe {
        let addr = s.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut count = 0;
            let mut failures = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = request(addr, "GET", "/healthz", &[], b"");
                let took = started.elapsed();
                if r.status != 204 {
                    failures.push(format!("status {}", r.status));
                }
                worst = worst.max(took);
                count += 1;
                thread::sleep(Duration::from_millis(20));
            }
            (count, worst, failures)
        });
        Probe {
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
        assert!(
            worst < Duration::from_millis(100),
            "/healthz took {worst:?} at worst over {count} probes"
        );
    }
}

/// Files in the test dir outside the server's and the fake's own.
fn stray_files(s: &TestServer) -> Vec<String> {
    files_under(s.dir.path())
        .into_iter()
        .filter(|f| {
            !f.starts_with("fake/")
                && !f.starts_with("state/labs/")
                && f != "state/neops-remote-lab.lock"
                && f != "state/state.json"
        })
        .collect()
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
    let _serial = serial();
    let s = start_with(&[("--upload-timeout", "1"), ("--workers", "2")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let probe = Probe::start(&s);
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
        s.get(&format!("/session/{b}"))
            .expect(200, r#"{"status":"waiting","position":1}"#);
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
    probe.finish();
    assert!(stray_files(&s).is_empty(), "{:?}", stray_files(&s));
}

#[test]
fn a_trickling_upload_is_bounded_in_time_too() {
    let _serial = serial();
    let s = start_with(&[("--upload-timeout", "0.5")]);
    let (a, _) = s.create_session();
    let probe = Probe::start(&s);
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
        r#"{"detail":"Upload not received within 0.5 s (--upload-timeout)"}"#,
    );
    assert!(s.work_dirs().is_empty());
    probe.finish();
}

#[test]
fn absurd_content_lengths_do_not_take_the_server_down() {
    let _serial = serial();
    let s = start();
    let (a, _) = s.create_session();
    let probe = Probe::start(&s);
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
    probe.finish();
}

#[test]
fn oversize_bodies_are_refused_with_and_without_content_length() {
    let _serial = serial();
    let s = start_with(&[("--max-upload-bytes", "100000")]);
    let (a, _) = s.create_session();
    let probe = Probe::start(&s);
    let form = Form::topology("t.yml", "nodes: [r1]\n").file("extra_files", "x", &[b'x'; 300_000]);
    let expected =
        r#"{"detail":"Upload too large: the limit is 100000 bytes (--max-upload-bytes)"}"#;
    s.acquire(&a, &form).expect(413, expected);
    chunked_acquire(s.addr, &a, &form).expect(413, expected);
    assert!(s.work_dirs().is_empty());
    probe.finish();
}
