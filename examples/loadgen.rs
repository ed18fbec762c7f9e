//! The benchmark's load generator: keep-alive HTTP/1.1 clients on plain threads, driving one
//! or more servers through the same scenarios in the same run and printing one table.
//!
//! Usage (`scripts/bench` starts the servers and calls this):
//!   loadgen --target NAME URL PID FAKE_DIR [--target ...] [--ceiling URL] [--duration S]
//!           [--only SCENARIO,...] [--mix-duration S]
//! Scenarios: throughput, tail (p99 and max when 32 or 128 connections are opened at once,
//! median of five runs), observe (GET /metrics and /queue, memory with a full event
//! history; skipped on servers without GET /queue), queue, handover, mix, ciday (a day of CI
//! in a minute: 16 jobs over three topologies, see [`ciday`]; `scripts/bench --only ciday`
//! starts one server per set of flags and gives each its own column).
//! The first target is "ours"; ratios are given against it. PID is read for resident
//! memory (/proc/PID/status); FAKE_DIR is the fake netlab's control directory of that
//! target (to make `netlab down` slow for the hand-over scenario). `--ceiling` is the bare
//! tiny_http example, driven like the others for the throughput rows. `--auth NAME VALUE`
//! sends `Authorization: VALUE` with every request to target NAME (a server with tokens).
//! `--client PATH` (the `remote-lab` binary) and `--python-client PYTHON` (a Python with the
//! neops-remote-lab 1.4.0 client) add, for the first target, the hand-over as a waiting
//! client sees it: from the holder's `DELETE /session` to the waiter's command starting on
//! the reused lab (scenario `client`), and the memory of 1 000 parked long-polls
//! (scenario `longpoll`).
//! `--fleet NAME D URL,URL,... FAKE_DIR,FAKE_DIR,...` (with `--client`) adds a column to the
//! scenario `fleet`: 12 `remote-lab run --choices D` jobs over those hosts (see [`fleet`]);
//! `scripts/bench --only fleet` starts the servers. The fleet prints its own table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

struct Target {
    name: String,
    addr: SocketAddr,
    pid: Option<u32>,
    fake_dir: Option<PathBuf>,
}

/// `Authorization` values by target address (`--auth`), set once before any load.
static AUTH: OnceLock<BTreeMap<SocketAddr, String>> = OnceLock::new();

/// One keep-alive connection.
struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
    auth: Option<&'static str>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
        Conn {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
            addr,
            auth: AUTH.get().and_then(|a| a.get(&addr)).map(String::as_str),
        }
    }

    /// Sends a request and reads the response; reconnects once if the server closed the
    /// connection. Returns the status and the body.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        match self.try_call(method, path, headers, body) {
            Ok(r) => r,
            Err(_) => {
                *self = Conn::open(self.addr);
                self.try_call(method, path, headers, body)
                    .unwrap_or((0, Vec::new()))
            }
        }
    }

    fn try_call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        if let Some(auth) = self.auth {
            head.push_str("Authorization: ");
            head.push_str(auth);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.writer.write_all(&out)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                match k.as_str() {
                    "content-length" => length = v.parse::<usize>().ok(),
                    "transfer-encoding" => chunked = v.contains("chunked"),
                    "connection" => close = v.contains("close"),
                    _ => {}
                }
            }
        }
        let mut data = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            data.resize(n, 0);
            self.reader.read_exact(&mut data)?;
        }
        if close {
            *self = Conn::open(self.addr);
        }
        Ok((status, data))
    }
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

fn create_session(conn: &mut Conn) -> String {
    let (status, body) = conn.call("POST", "/session", &[], b"");
    assert_eq!(
        status,
        201,
        "POST /session: {}",
        String::from_utf8_lossy(&body)
    );
    json(&body)["session_id"].as_str().unwrap().to_owned()
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Clone, Copy, Default)]
struct Stats {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    errors: u64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// `clients` keep-alive connections hammering one request for `duration`. The connections
/// are opened back to back before any is used, as wrk opens its own: a server that cannot
/// take a burst of new connections shows it in the first request of each (in `max_us`).
fn hammer(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    expect: u16,
) -> Stats {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let errors = Arc::new(AtomicU64::new(0));
    let conns: Vec<Conn> = (0..clients).map(|_| Conn::open(addr)).collect();
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let barrier = Arc::clone(&barrier);
            let errors = Arc::clone(&errors);
            let path = path.clone();
            let headers = headers.clone();
            thread::spawn(move || {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut lat = Vec::with_capacity(100_000);
                barrier.wait();
                let end = Instant::now() + duration;
                while Instant::now() < end {
                    let t = Instant::now();
                    let (status, _) = conn.call(method, &path, &h, b"");
                    lat.push(t.elapsed().as_micros() as u32);
                    if status != expect {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                lat
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut all: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    Stats {
        rps: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        max_us: all.last().map_or(f64::NAN, |&m| m as f64),
        errors: errors.load(Ordering::Relaxed),
    }
}

fn multipart(topology: &str, reuse: bool) -> (String, Vec<u8>) {
    let b = "benchboundary0123";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"topology\"; filename=\"bench.yml\"\r\nContent-Type: application/x-yaml\r\n\r\n{topology}\r\n--{b}\r\nContent-Disposition: form-data; name=\"reuse\"\r\n\r\n{reuse}\r\n--{b}--\r\n"
    );
    (
        format!("multipart/form-data; boundary={b}"),
        body.into_bytes(),
    )
}

/// Waits until no session is left (the previous scenario's are ended).
fn end_sessions(conn: &mut Conn, ids: &[String]) {
    for id in ids {
        conn.call("DELETE", &format!("/session/{id}"), &[], b"");
    }
}

/// Results: scenario name → value per target, and the unit and whether lower is better.
struct Table {
    rows: Vec<(String, &'static str, bool, BTreeMap<usize, f64>)>,
}

impl Table {
    fn put(
        &mut self,
        row: &str,
        unit: &'static str,
        lower_better: bool,
        target: usize,
        value: f64,
    ) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.0 == row) {
            r.3.insert(target, value);
        } else {
            let mut m = BTreeMap::new();
            m.insert(target, value);
            self.rows.push((row.to_owned(), unit, lower_better, m));
        }
    }
}

fn main() {
    let mut targets: Vec<Target> = Vec::new();
    let mut ceiling: Option<SocketAddr> = None;
    let mut duration = Duration::from_secs(5);
    let mut only: Option<Vec<String>> = None;
    let mut mix_duration: Option<Duration> = None;
    let mut auth: Vec<(String, String)> = Vec::new();
    let mut client: Option<PathBuf> = None;
    let mut python_client: Option<PathBuf> = None;
    let mut fleets: Vec<FleetColumn> = Vec::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let addr_of = |url: &str| -> SocketAddr {
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_socket_addrs()
            .expect("address")
            .next()
            .expect("address")
    };
    while i < args.len() {
        match args[i].as_str() {
            "--target" => {
                targets.push(Target {
                    name: args[i + 1].clone(),
                    addr: addr_of(&args[i + 2]),
                    pid: args[i + 3].parse().ok(),
                    fake_dir: Some(PathBuf::from(&args[i + 4])).filter(|p| p.is_dir()),
                });
                i += 5;
            }
            "--ceiling" => {
                ceiling = Some(addr_of(&args[i + 1]));
                i += 2;
            }
            "--duration" => {
                duration = Duration::from_secs_f64(args[i + 1].parse().expect("seconds"));
                i += 2;
            }
            "--mix-duration" => {
                mix_duration = Some(Duration::from_secs_f64(
                    args[i + 1].parse().expect("seconds"),
                ));
                i += 2;
            }
            "--only" => {
                only = Some(args[i + 1].split(',').map(str::to_owned).collect());
                i += 2;
            }
            "--auth" => {
                auth.push((args[i + 1].clone(), args[i + 2].clone()));
                i += 3;
            }
            "--client" => {
                client = Some(PathBuf::from(&args[i + 1]));
                i += 2;
            }
            "--fleet" => {
                let split = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
                fleets.push(FleetColumn {
                    name: args[i + 1].clone(),
                    choices: args[i + 2].parse().expect("--fleet: choices"),
                    urls: split(&args[i + 3]),
                    fake_dirs: split(&args[i + 4]).into_iter().map(PathBuf::from).collect(),
                });
                i += 5;
            }
            "--python-client" => {
                python_client = Some(PathBuf::from(&args[i + 1]));
                i += 2;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let by_addr = auth
        .iter()
        .map(|(name, value)| {
            let target = targets
                .iter()
                .find(|t| &t.name == name)
                .expect("--auth names a target");
            (target.addr, value.clone())
        })
        .collect();
    AUTH.set(by_addr).expect("set once");
    let wants = |s: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));
    if wants("fleet") && !fleets.is_empty() {
        let client = client
            .as_ref()
            .expect("--fleet needs --client (remote-lab)");
        fleet(client, &fleets);
        if targets.is_empty() {
            return;
        }
    }
    assert!(!targets.is_empty(), "give at least one --target");
    let mut table = Table { rows: Vec::new() };
    const CEILING: usize = usize::MAX;

    for (t, target) in targets.iter().enumerate() {
        eprintln!("== {} ({})", target.name, target.addr);
        let mut conn = Conn::open(target.addr);
        if let Some(kib) = rss_kib(target.pid) {
            table.put("resident memory, idle", "MiB", true, t, kib as f64 / 1024.0);
        }

        if wants("throughput") {
            let id = create_session(&mut conn);
            for clients in [1, 32, 128] {
                for (label, method, path, headers, expect) in [
                    (
                        "POST /session/heartbeat",
                        "POST",
                        "/session/heartbeat".to_owned(),
                        vec![("X-Session-ID", id.clone())],
                        204,
                    ),
                    (
                        "GET /session/{id}",
                        "GET",
                        format!("/session/{id}"),
                        vec![],
                        200,
                    ),
                ] {
                    eprintln!("   {label} x{clients}");
                    let s = hammer(
                        target.addr,
                        clients,
                        duration,
                        method,
                        path,
                        headers,
                        expect,
                    );
                    table.put(
                        &format!("{label} c={clients}: req/s"),
                        "req/s",
                        false,
                        t,
                        s.rps,
                    );
                    table.put(
                        &format!("{label} c={clients}: p50"),
                        "ms",
                        true,
                        t,
                        s.p50_us / 1000.0,
                    );
                    table.put(
                        &format!("{label} c={clients}: p99"),
                        "ms",
                        true,
                        t,
                        s.p99_us / 1000.0,
                    );
                    table.put(
                        &format!("{label} c={clients}: errors"),
                        "",
                        true,
                        t,
                        s.errors as f64,
                    );
                }
            }
            end_sessions(&mut conn, &[id]);
        }

        if wants("tail") {
            let id = create_session(&mut conn);
            tail_rows(
                &mut table,
                t,
                target.addr,
                vec![("X-Session-ID", id.clone())],
            );
            end_sessions(&mut conn, &[id]);
        }

        // The read-only views (`/queue`, `/events`, `/metrics`), on servers that have them: GET /metrics and
        // GET /queue at 10, 1000 and 10 000 sessions (one client, as a scraper or a status
        // page is), and resident memory with 10 000 sessions and a full event history.
        let has_views = conn.call("GET", "/queue?limit=0", &[], b"").0 == 200;
        if wants("observe") && has_views {
            let mut ids: Vec<String> = Vec::new();
            for depth in [10usize, 1000, 10_000] {
                while ids.len() < depth {
                    ids.push(create_session(&mut conn));
                }
                for path in ["/metrics", "/queue"] {
                    eprintln!("   GET {path} with {depth} sessions");
                    let s = hammer(
                        target.addr,
                        1,
                        duration / 2,
                        "GET",
                        path.to_owned(),
                        vec![],
                        200,
                    );
                    for (what, v) in [("p50", s.p50_us), ("p99", s.p99_us)] {
                        table.put(
                            &format!("GET {path}, {depth} sessions: {what}"),
                            "ms",
                            true,
                            t,
                            v / 1000.0,
                        );
                    }
                    table.put(
                        &format!("GET {path}, {depth} sessions: errors"),
                        "",
                        true,
                        t,
                        s.errors as f64,
                    );
                }
            }
            // One event per session created so far, plus the server's own: the in-memory
            // history (10 000 events) is full.
            let (_, body) = conn.call("GET", "/events?limit=1", &[], b"");
            let events = json(&body)["last_id"].as_u64().unwrap_or(0);
            eprintln!("   {events} events recorded");
            if let Some(kib) = rss_kib(target.pid) {
                table.put(
                    "resident memory, 10 000 sessions, full event history",
                    "MiB",
                    true,
                    t,
                    kib as f64 / 1024.0,
                );
            }
            end_sessions(&mut conn, &ids);
        }

        if wants("queue") {
            let mut ids: Vec<String> = Vec::new();
            for depth in [10usize, 1000, 10_000] {
                while ids.len() < depth {
                    ids.push(create_session(&mut conn));
                }
                let last = ids.last().unwrap().clone();
                eprintln!("   GET /session/{{id}} with {depth} queued");
                let s = hammer(
                    target.addr,
                    1,
                    duration / 2,
                    "GET",
                    format!("/session/{last}"),
                    vec![],
                    200,
                );
                table.put(
                    &format!("GET /session/{{id}}, {depth} queued: p50"),
                    "ms",
                    true,
                    t,
                    s.p50_us / 1000.0,
                );
                table.put(
                    &format!("GET /session/{{id}}, {depth} queued: p99"),
                    "ms",
                    true,
                    t,
                    s.p99_us / 1000.0,
                );
            }
            if let Some(kib) = rss_kib(target.pid) {
                table.put(
                    "resident memory, 10 000 sessions",
                    "MiB",
                    true,
                    t,
                    kib as f64 / 1024.0,
                );
            }
            end_sessions(&mut conn, &ids);
            if let Some(kib) = rss_kib(target.pid) {
                table.put(
                    "resident memory, after they ended",
                    "MiB",
                    true,
                    t,
                    kib as f64 / 1024.0,
                );
            }
        }

        if wants("handover") && target.fake_dir.is_some() {
            let fake = target.fake_dir.clone().unwrap();
            let a = create_session(&mut conn);
            let (ct, body) = multipart("name: handover\nnodes: [r1]\n", true);
            let (status, text) = conn.call(
                "POST",
                "/lab",
                &[("X-Session-ID", &a), ("Content-Type", &ct)],
                &body,
            );
            if status == 200 {
                let b = create_session(&mut conn);
                std::fs::write(fake.join("control/down.sleep"), "5").unwrap();
                let mut poller = Conn::open(target.addr);
                let started = Instant::now();
                let deleter = thread::spawn({
                    let addr = target.addr;
                    let a = a.clone();
                    move || Conn::open(addr).call("DELETE", &format!("/session/{a}"), &[], b"")
                });
                loop {
                    let (_, body) = poller.call("GET", &format!("/session/{b}"), &[], b"");
                    if json(&body)["status"] == "active" {
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    thread::sleep(Duration::from_micros(200));
                }
                let took = started.elapsed();
                let _ = deleter.join();
                // The slow `netlab down` reads its control file when it starts: remove the
                // file only once it has surely run.
                thread::sleep(Duration::from_secs(7));
                let _ = std::fs::remove_file(fake.join("control/down.sleep"));
                table.put(
                    "hand-over with a 5 s netlab down",
                    "ms",
                    true,
                    t,
                    took.as_secs_f64() * 1000.0,
                );
                end_sessions(&mut conn, &[b]);
            } else {
                eprintln!(
                    "   hand-over skipped: POST /lab answered {status}: {}",
                    String::from_utf8_lossy(&text)
                );
                end_sessions(&mut conn, &[a]);
            }
        }

        if wants("mix") {
            if let Some(kib) = rss_kib(target.pid) {
                table.put(
                    "mix: resident memory at the start",
                    "MiB",
                    true,
                    t,
                    kib as f64 / 1024.0,
                );
            }
            let active = create_session(&mut conn);
            let stop = Arc::new(AtomicBool::new(false));
            let errors = Arc::new(AtomicU64::new(0));
            let polls = Arc::new(AtomicU64::new(0));
            let waiting: Vec<_> = (0..200)
                .map(|_| {
                    let (stop, errors, polls) =
                        (Arc::clone(&stop), Arc::clone(&errors), Arc::clone(&polls));
                    let addr = target.addr;
                    thread::spawn(move || {
                        let mut c = Conn::open(addr);
                        let id = create_session(&mut c);
                        while !stop.load(Ordering::SeqCst) {
                            let (s1, _) = c.call("GET", &format!("/session/{id}"), &[], b"");
                            let (s2, _) =
                                c.call("POST", "/session/heartbeat", &[("X-Session-ID", &id)], b"");
                            polls.fetch_add(2, Ordering::Relaxed);
                            if s1 != 200 || s2 != 204 {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            thread::sleep(Duration::from_millis(100));
                        }
                        c.call("DELETE", &format!("/session/{id}"), &[], b"");
                    })
                })
                .collect();
            let (ct, body) = multipart("name: mix\nnodes: [r1, r2]\n", true);
            let mut acquire = Vec::new();
            let mut release = Vec::new();
            let mut active_errors = 0u64;
            let end = Instant::now() + mix_duration.unwrap_or(duration * 2);
            while Instant::now() < end {
                let t0 = Instant::now();
                let (s, _) = conn.call(
                    "POST",
                    "/lab",
                    &[("X-Session-ID", &active), ("Content-Type", &ct)],
                    &body,
                );
                acquire.push(t0.elapsed().as_micros() as u32);
                let t1 = Instant::now();
                let (r, _) = conn.call("POST", "/lab/release", &[("X-Session-ID", &active)], b"");
                release.push(t1.elapsed().as_micros() as u32);
                if s != 200 || r != 204 {
                    active_errors += 1;
                }
            }
            stop.store(true, Ordering::SeqCst);
            for w in waiting {
                let _ = w.join();
            }
            acquire.sort_unstable();
            release.sort_unstable();
            table.put(
                "mix: errors (200 pollers + active client)",
                "",
                true,
                t,
                (errors.load(Ordering::Relaxed) + active_errors) as f64,
            );
            table.put(
                "mix: POST /lab (reuse) p50",
                "ms",
                true,
                t,
                percentile(&acquire, 0.5) / 1000.0,
            );
            table.put(
                "mix: POST /lab (reuse) p99",
                "ms",
                true,
                t,
                percentile(&acquire, 0.99) / 1000.0,
            );
            table.put(
                "mix: POST /lab/release p99",
                "ms",
                true,
                t,
                percentile(&release, 0.99) / 1000.0,
            );
            table.put(
                "mix: acquire+release cycles",
                "",
                false,
                t,
                acquire.len() as f64,
            );
            if let Some(kib) = rss_kib(target.pid) {
                table.put(
                    "mix: resident memory at the end",
                    "MiB",
                    true,
                    t,
                    kib as f64 / 1024.0,
                );
            }
            // Leave no lab behind for the next target's runs.
            conn.call("DELETE", "/lab", &[("X-Session-ID", &active)], b"");
            end_sessions(&mut conn, &[active]);
        }
    }

    if wants("ciday") {
        for (t, target) in targets.iter().enumerate() {
            ciday(target, t, &mut table);
        }
    }
    if wants("longpoll") {
        parked_memory(&targets[0], &mut table);
    }
    if wants("client") {
        if let Some(client) = &client {
            let times = client_handover(&targets[0], Waiter::RemoteLab(client), 20);
            put_handover(&mut table, "remote-lab run", &times);
        }
        if let Some(python) = &python_client {
            let times = client_handover(&targets[0], Waiter::Python(python), 8);
            put_handover(&mut table, "Python client", &times);
        }
    }

    if let Some(addr) = ceiling.filter(|_| wants("tail")) {
        eprintln!("== bare tiny_http ceiling, tail ({addr})");
        tail_rows(&mut table, CEILING, addr, vec![]);
    }
    if let Some(addr) = ceiling.filter(|_| wants("throughput")) {
        eprintln!("== bare tiny_http ceiling ({addr})");
        for clients in [1, 32, 128] {
            let s = hammer(
                addr,
                clients,
                duration,
                "POST",
                "/session/heartbeat".into(),
                vec![],
                204,
            );
            table.put(
                &format!("POST /session/heartbeat c={clients}: req/s"),
                "req/s",
                false,
                CEILING,
                s.rps,
            );
            table.put(
                &format!("POST /session/heartbeat c={clients}: p99"),
                "ms",
                true,
                CEILING,
                s.p99_us / 1000.0,
            );
            let s = hammer(
                addr,
                clients,
                duration,
                "GET",
                "/session/x".into(),
                vec![],
                204,
            );
            table.put(
                &format!("GET /session/{{id}} c={clients}: req/s"),
                "req/s",
                false,
                CEILING,
                s.rps,
            );
            table.put(
                &format!("GET /session/{{id}} c={clients}: p99"),
                "ms",
                true,
                CEILING,
                s.p99_us / 1000.0,
            );
        }
    }

    // The table: one column per target, then each other target's ratio to ours, then the
    // ceiling and ours as a share of it.
    let mut header = format!("| {:<48} |", "measure");
    for t in &targets {
        header.push_str(&format!(" {:>12} |", t.name));
    }
    for t in targets.iter().skip(1) {
        header.push_str(&format!(" {:>14} |", format!("ours vs {}", t.name)));
    }
    if ceiling.is_some() {
        header.push_str(&format!(" {:>12} | {:>12} |", "ceiling", "% of ceiling"));
    }
    println!("{header}");
    println!(
        "|{}|",
        header[1..header.len() - 1]
            .split('|')
            .map(|c| "-".repeat(c.len()))
            .collect::<Vec<_>>()
            .join("|")
    );
    for (row, unit, lower_better, values) in &table.rows {
        let label = if unit.is_empty() {
            row.clone()
        } else {
            format!("{row} ({unit})")
        };
        let mut line = format!("| {label:<48} |");
        let fmt = |v: Option<&f64>| match v {
            Some(v) if *v >= 100.0 => format!("{v:.0}"),
            Some(v) => format!("{v:.3}"),
            None => "-".into(),
        };
        for t in 0..targets.len() {
            line.push_str(&format!(" {:>12} |", fmt(values.get(&t))));
        }
        let ours = values.get(&0).copied();
        for t in 1..targets.len() {
            let ratio = match (ours, values.get(&t)) {
                (Some(o), Some(v)) if o > 0.0 && *v > 0.0 => {
                    if *lower_better {
                        format!("{:.1}x better", v / o)
                    } else {
                        format!("{:.1}x", o / v)
                    }
                }
                _ => "-".into(),
            };
            line.push_str(&format!(" {ratio:>14} |"));
        }
        if ceiling.is_some() {
            let c = values.get(&CEILING);
            let share = match (ours, c) {
                (Some(o), Some(c)) if !*lower_better && *c > 0.0 => {
                    format!("{:.0} %", 100.0 * o / c)
                }
                _ => "-".into(),
            };
            line.push_str(&format!(" {:>12} | {share:>12} |", fmt(c)));
        }
        println!("{line}");
    }
}

/// Runs of each cell of the tail rows; the median is shown.
const TAIL_RUNS: usize = 5;

/// How long each run of the tail rows lasts.
const TAIL_RUN: Duration = Duration::from_secs(2);

/// The tail under a burst of new connections: `POST /session/heartbeat` on 32 and on 128
/// connections opened back to back and driven flat out (as wrk does), [`TAIL_RUNS`] runs
/// of [`TAIL_RUN`] each; the median p99 and max, and the worst max. A connection the server
/// accepts but leaves unserved shows in the max (and, if long enough, the p99).
fn tail_rows(
    table: &mut Table,
    column: usize,
    addr: SocketAddr,
    headers: Vec<(&'static str, String)>,
) {
    for clients in [32, 128] {
        eprintln!("   burst of {clients} connections x{TAIL_RUNS}");
        let runs: Vec<Stats> = (0..TAIL_RUNS)
            .map(|_| {
                hammer(
                    addr,
                    clients,
                    TAIL_RUN,
                    "POST",
                    "/session/heartbeat".into(),
                    headers.clone(),
                    204,
                )
            })
            .collect();
        let median = |f: fn(&Stats) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let worst = runs.iter().map(|s| s.max_us).fold(0.0, f64::max);
        let label = format!("heartbeat, burst of {clients} conns");
        table.put(
            &format!("{label}: p99"),
            "ms",
            true,
            column,
            median(|s| s.p99_us) / 1000.0,
        );
        table.put(
            &format!("{label}: max"),
            "ms",
            true,
            column,
            median(|s| s.max_us) / 1000.0,
        );
        table.put(
            &format!("{label}: worst max of {TAIL_RUNS}"),
            "ms",
            true,
            column,
            worst / 1000.0,
        );
    }
}

/// Resident memory of the server with 1 000 long-polls parked (`GET ?wait=60`).
fn parked_memory(target: &Target, table: &mut Table) {
    eprintln!("== 1000 parked long-polls ({})", target.addr);
    // 1 000 connections of ours: the soft descriptor limit up to the hard one.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    let mut conn = Conn::open(target.addr);
    let holder = create_session(&mut conn);
    let waiter = create_session(&mut conn);
    let before = rss_kib(target.pid);
    let streams: Vec<TcpStream> = (0..1000)
        .map(|_| {
            let mut s = TcpStream::connect(target.addr).expect("connect");
            let head = format!(
                "GET /session/{waiter}?wait=60 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
            );
            s.write_all(head.as_bytes()).expect("send");
            s
        })
        .collect();
    let started = Instant::now();
    loop {
        let (_, body) = conn.call("GET", "/debug/health", &[], b"");
        let parked = json(&body)["long_polls"].as_u64();
        if parked == Some(1000) || started.elapsed() > Duration::from_secs(30) {
            if parked != Some(1000) {
                eprintln!("   only {parked:?} parked after 30 s (a server without long-poll?)");
                return;
            }
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let with = rss_kib(target.pid);
    let t = Instant::now();
    let (status, _) = conn.call(
        "POST",
        "/session/heartbeat",
        &[("X-Session-ID", &waiter)],
        b"",
    );
    let heartbeat = t.elapsed();
    assert_eq!(status, 204);
    table.put(
        "heartbeat with 1000 parked long-polls",
        "ms",
        true,
        0,
        heartbeat.as_secs_f64() * 1000.0,
    );
    if let (Some(before), Some(with)) = (before, with) {
        table.put(
            "resident memory, 1000 long-polls parked",
            "MiB",
            true,
            0,
            with as f64 / 1024.0,
        );
        table.put(
            "memory per parked long-poll",
            "KiB",
            true,
            0,
            (with as f64 - before as f64) / 1000.0,
        );
    }
    // Ending the holder promotes the waiter: every parked request is answered at once.
    let t = Instant::now();
    end_sessions(&mut conn, &[holder]);
    for mut s in streams {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    table.put(
        "1000 parked answered at a promotion",
        "ms",
        true,
        0,
        t.elapsed().as_secs_f64() * 1000.0,
    );
    end_sessions(&mut conn, &[waiter]);
}

enum Waiter<'a> {
    RemoteLab(&'a PathBuf),
    Python(&'a PathBuf),
}

const PYTHON_WAITER: &str = r#"
import pathlib, sys, time
from neops_remote_lab.client import RemoteLabClient
client = RemoteLabClient(sys.argv[1])
client.acquire(pathlib.Path(sys.argv[2]), reuse=True)
pathlib.Path(sys.argv[3]).write_text(str(time.time_ns()))
client.release()
client.close()
"#;

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The hand-over as the waiting client sees it, `rounds` times: a holder with the lab up
/// (released, so the waiter reuses it) ends its session; the time until the waiter's command
/// starts on the reused lab, in ms.
fn client_handover(target: &Target, waiter: Waiter<'_>, rounds: usize) -> Vec<f64> {
    let dir = std::env::temp_dir().join(format!("loadgen-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let topology = dir.join("handover.yml");
    std::fs::write(&topology, "name: clienthand\nnodes: [r1]\n").expect("topology");
    let marker = dir.join("started");
    let url = format!("http://{}", target.addr);
    let mut conn = Conn::open(target.addr);
    let mut times = Vec::new();
    let name = match waiter {
        Waiter::RemoteLab(_) => "remote-lab run",
        Waiter::Python(_) => "Python client",
    };
    eprintln!("== hand-over seen by {name} ({})", target.addr);
    for round in 0..rounds {
        let holder = create_session(&mut conn);
        let (ct, body) = multipart("name: clienthand\nnodes: [r1]\n", true);
        let (status, text) = conn.call(
            "POST",
            "/lab",
            &[("X-Session-ID", &holder), ("Content-Type", &ct)],
            &body,
        );
        if status != 200 {
            eprintln!(
                "   skipped: POST /lab answered {status}: {}",
                String::from_utf8_lossy(&text)
            );
            end_sessions(&mut conn, &[holder]);
            break;
        }
        conn.call("POST", "/lab/release", &[("X-Session-ID", &holder)], b"");
        let _ = std::fs::remove_file(&marker);
        let mut command = match waiter {
            Waiter::RemoteLab(bin) => {
                let mut c = std::process::Command::new(bin);
                c.args(["run", "--url", &url, "--topology"])
                    .arg(&topology)
                    .args(["--", "sh", "-c", "date +%s%N > \"$0\""])
                    .arg(&marker);
                c
            }
            Waiter::Python(python) => {
                let mut c = std::process::Command::new(python);
                c.args(["-c", PYTHON_WAITER, &url])
                    .arg(&topology)
                    .arg(&marker);
                c
            }
        };
        command
            .env_remove("REMOTE_LAB_TOKEN")
            .env("NETRC", dir.join("no-netrc"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = command.spawn().expect("start the waiting client");
        // Queued behind the holder (and, for remote-lab, parked in its long-poll).
        let queued = Instant::now();
        loop {
            let (_, body) = conn.call("GET", "/debug/health", &[], b"");
            let v = json(&body);
            let ready = match waiter {
                Waiter::RemoteLab(_) => v["long_polls"].as_u64() == Some(1),
                Waiter::Python(_) => v["sessions"].as_u64() == Some(2),
            };
            if ready || queued.elapsed() > Duration::from_secs(30) {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        // The Python client polls every 5 s: end the holder at a different point of its
        // cycle each round, as a real hand-over would.
        if matches!(waiter, Waiter::Python(_)) {
            thread::sleep(Duration::from_millis(500 + (round as u64 * 613) % 5000));
        }
        let t0 = now_ns();
        end_sessions(&mut conn, &[holder]);
        let started = Instant::now();
        let t1 = loop {
            if let Some(t1) = std::fs::read_to_string(&marker)
                .ok()
                .and_then(|t| t.trim().parse::<u128>().ok())
            {
                break Some(t1);
            }
            if started.elapsed() > Duration::from_secs(30) {
                break None;
            }
            thread::sleep(Duration::from_micros(500));
        };
        let _ = child.wait();
        match t1 {
            Some(t1) => times.push(t1.saturating_sub(t0) as f64 / 1e6),
            None => eprintln!("   round {round}: the waiter's command never started"),
        }
    }
    // Leave no lab behind.
    let id = create_session(&mut conn);
    conn.call("DELETE", "/lab", &[("X-Session-ID", &id)], b"");
    end_sessions(&mut conn, &[id]);
    let _ = std::fs::remove_dir_all(&dir);
    times
}

fn put_handover(table: &mut Table, who: &str, times: &[f64]) {
    if times.is_empty() {
        return;
    }
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    table.put(
        &format!("hand-over seen by {who}: p50"),
        "ms",
        true,
        0,
        at(0.5),
    );
    table.put(
        &format!("hand-over seen by {who}: max"),
        "ms",
        true,
        0,
        at(1.0),
    );
}

/// The day-of-CI mix: topologies A, B and C for half, a third and the rest of 16 jobs, in this
/// fixed shuffled order.
const CIDAY_ORDER: &[u8; 16] = b"ABACABBACABACBAA";
/// One job every this often.
const CIDAY_ARRIVAL: Duration = Duration::from_millis(250);
/// `netlab up` takes this long (the fake netlab's `up.sleep`), a test this long.
const CIDAY_UP_S: &str = "2";
const CIDAY_TEST: Duration = Duration::from_secs(1);

fn ciday_topology(kind: u8) -> String {
    match kind {
        b'A' => "nodes: [a1, a2]\n".into(),
        b'B' => "nodes: [b1, b2, b3]\n".into(),
        _ => "nodes: [c1]\n".into(),
    }
}

fn hex_sha256(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `netlab up` calls in a fake netlab's call log.
fn up_calls(fake_dir: &std::path::Path) -> usize {
    std::fs::read_to_string(fake_dir.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| json(l.as_bytes())["argv"][0] == "up")
        .count()
}

/// A day of CI in a minute against one server (a fresh one: `scripts/bench` starts one per
/// set of flags). Each job is a thread: `POST /session` with its name and its declared
/// topology, long-poll until active (a server without long-poll answers at once: then it
/// polls every 50 ms), `POST /lab` with `reuse=true` (423 retried every 50 ms), a heartbeat,
/// the test, release, end. Rows: the makespan, the mean and p95 wait for a lab (from
/// `POST /session` to the lab's devices in hand) and the `netlab up` calls.
fn ciday(target: &Target, t: usize, table: &mut Table) {
    let Some(fake) = &target.fake_dir else {
        eprintln!("   ciday needs the fake netlab's directory: skipped");
        return;
    };
    eprintln!(
        "   ciday: 16 jobs, one every {CIDAY_ARRIVAL:?}, up {CIDAY_UP_S} s, test {CIDAY_TEST:?}"
    );
    std::fs::write(fake.join("control").join("up.sleep"), CIDAY_UP_S).expect("up.sleep");
    let ups_before = up_calls(fake);
    let start = Instant::now();
    let mut jobs = Vec::new();
    for (n, &kind) in CIDAY_ORDER.iter().enumerate() {
        let due = start + CIDAY_ARRIVAL * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let addr = target.addr;
        jobs.push(thread::spawn(move || ciday_job(addr, n, kind)));
    }
    let waits: Vec<f64> = jobs
        .into_iter()
        .map(|j| j.join().expect("a ciday job panicked"))
        .collect();
    let makespan = start.elapsed().as_secs_f64();
    let ups = up_calls(fake) - ups_before;
    let _ = std::fs::remove_file(fake.join("control").join("up.sleep"));
    let mut sorted = waits.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = waits.iter().sum::<f64>() / waits.len() as f64;
    let p95 = sorted[((sorted.len() as f64 * 0.95).ceil() as usize).clamp(1, sorted.len()) - 1];
    table.put("ciday: makespan", "s", true, t, makespan);
    table.put("ciday: mean wait for a lab", "s", true, t, mean);
    table.put("ciday: p95 wait for a lab", "s", true, t, p95);
    table.put("ciday: netlab up calls", "", true, t, ups as f64);
    // Leave no lab behind for whatever runs next on this server.
    let mut conn = Conn::open(target.addr);
    let id = create_session(&mut conn);
    conn.call("DELETE", "/lab", &[("X-Session-ID", &id)], b"");
    end_sessions(&mut conn, &[id]);
}

/// One job of [`ciday`]; returns its wait for a lab, in seconds.
fn ciday_job(addr: SocketAddr, n: usize, kind: u8) -> f64 {
    let topology = ciday_topology(kind);
    let declared = hex_sha256(&topology);
    let name = format!("ciday-{n}-{}", kind as char);
    let mut conn = Conn::open(addr);
    let began = Instant::now();
    let (status, body) = conn.call(
        "POST",
        "/session",
        &[("X-Client-Name", &name), ("X-Topology-SHA256", &declared)],
        b"",
    );
    assert_eq!(status, 201, "{name}: POST /session");
    let id = json(&body)["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();
    loop {
        let asked = Instant::now();
        let (status, body) = conn.call("GET", &format!("/session/{id}?wait=30"), &[], b"");
        assert_eq!(status, 200, "{name}: GET /session");
        if json(&body)["status"] == "active" {
            break;
        }
        if asked.elapsed() < Duration::from_millis(20) {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let (content_type, form) = multipart(&topology, true);
    loop {
        let (status, _) = conn.call(
            "POST",
            "/lab",
            &[("X-Session-ID", &id), ("Content-Type", &content_type)],
            &form,
        );
        match status {
            200 => break,
            423 => thread::sleep(Duration::from_millis(50)),
            other => panic!("{name}: POST /lab answered {other}"),
        }
    }
    let waited = began.elapsed().as_secs_f64();
    conn.call("POST", "/session/heartbeat", &[("X-Session-ID", &id)], b"");
    thread::sleep(CIDAY_TEST);
    conn.call("POST", "/lab/release", &[("X-Session-ID", &id)], b"");
    conn.call("DELETE", &format!("/session/{id}"), &[], b"");
    waited
}

/// One column of the fleet scenario: `remote-lab run --choices D` over these hosts.
struct FleetColumn {
    name: String,
    choices: usize,
    urls: Vec<String>,
    /// Each host's fake netlab directory (for its `netlab up` calls).
    fake_dirs: Vec<PathBuf>,
}

/// The fleet's jobs, in arrival order: `L` tests for 4 s, `S` for 1 s (six of each, in this
/// fixed shuffled order).
const FLEET_ORDER: &[u8; 12] = b"LSSLSLLSSLSL";
/// One job every this often.
const FLEET_ARRIVAL: Duration = Duration::from_millis(250);

/// What one fleet job saw: launched and ended (ns since the epoch), its command's start (the
/// marker it wrote) and the host it ran on; `None` when it did not run.
struct FleetJob {
    launched: u128,
    ended: u128,
    started: Option<(u128, String)>,
}

/// A fleet of lab hosts as CI uses it: for each column, 12 jobs (`FLEET_ORDER`, one every
/// `FLEET_ARRIVAL`), each a `remote-lab run --choices D --topology T -- sh -c 'mark; sleep N'`
/// process over the column's hosts. Prints, per column, the makespan (first launch to the
/// last job's end), the mean and max wait (launch to the command's start), the
/// jobs and long jobs on each host and the `netlab up` calls. Columns run one after another,
/// each on its own fresh servers.
fn fleet(client: &PathBuf, columns: &[FleetColumn]) {
    let dir = std::env::temp_dir().join(format!("loadgen-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let topology = dir.join("fleet.yml");
    std::fs::write(&topology, "name: fleet\nnodes: [r1, r2]\n").expect("topology");
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut put = |row: &str, col: usize, value: String| {
        if let Some(r) = rows.iter_mut().find(|r| r.0 == row) {
            r.1.resize(col + 1, "-".into());
            r.1[col] = value;
        } else {
            let mut values = vec!["-".to_owned(); col];
            values.push(value);
            rows.push((row.to_owned(), values));
        }
    };
    for (c, column) in columns.iter().enumerate() {
        eprintln!(
            "== fleet {}: 12 jobs (6 x 4 s, 6 x 1 s) one every {FLEET_ARRIVAL:?}, --choices {} over {}",
            column.name,
            column.choices,
            column.urls.join(" ")
        );
        let ups_before: usize = column.fake_dirs.iter().map(|d| up_calls(d)).sum();
        let mut jobs = Vec::new();
        let begin = Instant::now();
        for (n, &kind) in FLEET_ORDER.iter().enumerate() {
            let due = begin + FLEET_ARRIVAL * n as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let marker = dir.join(format!("{}-{n}", column.name));
            let _ = std::fs::remove_file(&marker);
            let mut command = std::process::Command::new(client);
            command.arg("run");
            for url in &column.urls {
                command.args(["--url", url]);
            }
            command
                .args(["--choices", &column.choices.to_string(), "--topology"])
                .arg(&topology)
                .args(["--name", &format!("fleet-{}-{n}-{}", column.name, kind as char)])
                .args([
                    "--",
                    "sh",
                    "-c",
                    "printf '%s %s\\n' \"$(date +%s%N)\" \"$REMOTE_LAB_URL\" > \"$0\"; exec sleep \"$1\"",
                ])
                .arg(&marker)
                .arg(if kind == b'L' { "4" } else { "1" })
                .env_remove("REMOTE_LAB_TOKEN")
                .env_remove("REMOTE_LAB_URL")
                .env("NETRC", dir.join("no-netrc"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            jobs.push(thread::spawn(move || {
                let launched = now_ns();
                let status = command.status().expect("start remote-lab run");
                let ended = now_ns();
                let started = std::fs::read_to_string(&marker).ok().and_then(|text| {
                    let (t, url) = text.trim().split_once(' ')?;
                    Some((t.parse().ok()?, url.to_owned()))
                });
                if !status.success() {
                    eprintln!("   job {n}: remote-lab run exited with {status}");
                }
                FleetJob {
                    launched,
                    ended,
                    started: started.filter(|_| status.success()),
                }
            }));
        }
        let jobs: Vec<FleetJob> = jobs
            .into_iter()
            .map(|j| j.join().expect("a fleet job panicked"))
            .collect();
        let first = jobs.iter().map(|j| j.launched).min().unwrap_or(0);
        let last = jobs.iter().map(|j| j.ended).max().unwrap_or(0);
        let mut waits: Vec<f64> = jobs
            .iter()
            .filter_map(|j| {
                j.started
                    .as_ref()
                    .map(|(t, _)| t.saturating_sub(j.launched) as f64 / 1e9)
            })
            .collect();
        waits.sort_by(f64::total_cmp);
        let failed = jobs.len() - waits.len();
        put(
            "makespan (s)",
            c,
            format!("{:.1}", (last - first) as f64 / 1e9),
        );
        if !waits.is_empty() {
            let mean = waits.iter().sum::<f64>() / waits.len() as f64;
            put("mean wait (s)", c, format!("{mean:.1}"));
            // With 12 jobs the p95 is the maximum.
            put("max wait (s)", c, format!("{:.1}", waits[waits.len() - 1]));
        }
        for (h, url) in column.urls.iter().enumerate() {
            let on = |long: bool| {
                jobs.iter()
                    .zip(FLEET_ORDER)
                    .filter(|(j, k)| {
                        j.started.as_ref().is_some_and(|(_, u)| u == url) && (!long || **k == b'L')
                    })
                    .count()
            };
            put(
                &format!("jobs (4 s jobs) on host {}", h + 1),
                c,
                format!("{} ({})", on(false), on(true)),
            );
        }
        let ups: usize = column.fake_dirs.iter().map(|d| up_calls(d)).sum();
        put("netlab up calls", c, (ups - ups_before).to_string());
        put("failed jobs", c, failed.to_string());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut header = format!("| {:<26} |", "fleet: 12 jobs");
    for column in columns {
        header.push_str(&format!(" {:>12} |", column.name));
    }
    println!("{header}");
    println!(
        "|{}|",
        header[1..header.len() - 1]
            .split('|')
            .map(|c| "-".repeat(c.len()))
            .collect::<Vec<_>>()
            .join("|")
    );
    for (row, values) in rows {
        let mut line = format!("| {row:<26} |");
        for c in 0..columns.len() {
            line.push_str(&format!(
                " {:>12} |",
                values.get(c).map_or("-", String::as_str)
            ));
        }
        println!("{line}");
    }
}
