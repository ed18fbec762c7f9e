//! Test harness: boots the real binary on 127.0.0.1:0 with the fake netlab, and speaks HTTP
//! over plain sockets (so tests control every byte and see every header).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use rustix::process::Pid;
pub use rustix::process::Signal;

pub const BIN: &str = env!("CARGO_BIN_EXE_neops-remote-lab");

pub fn fake_netlab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-netlab/netlab")
}

/// The fake `containerlab` (for `--containerlab`): logs its calls to `containerlab.log` in the
/// fake-netlab dir.
pub fn fake_containerlab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-netlab/containerlab")
}

/// The fake containerlab's calls in the fake-netlab dir `fake`, as (argv joined by spaces,
/// cwd).
pub fn containerlab_calls(fake: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(fake.join("containerlab.log")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let argv: Vec<&str> = v["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            (argv.join(" "), v["cwd"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// `Command::new(BIN)` with the `PATH` the fake netlab (`#!/usr/bin/env python3`) starts
/// fastest with: first the `bin` of a virtual environment of the `python3` on `PATH`, with
/// nothing installed. Its start-up skips what the system's site-packages load (`.pth` files;
/// here one imports certifi, ~20 ms), and past a version manager's shim (pyenv's is a bash
/// script that runs several more, ~45 ms, seconds on a loaded machine), on every one of the
/// hundreds of netlab calls of a run. It also keeps the fake to the standard library.
/// (`python3 -S` in the shebang would save as much, but a flag before the script hides the
/// script from the server's check that an orphaned `up` is netlab's, which looks at the
/// first two words of its command line.)
pub fn server_command() -> Command {
    static PATH: OnceLock<OsString> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        match fake_netlab_python() {
            Some(bin) => {
                std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
                    .unwrap_or(path)
            }
            None => path,
        }
    });
    let mut command = Command::new(BIN);
    command.env("PATH", path);
    command
}

/// The `bin` of the empty virtual environment, made once (and kept in cargo's target/tmp);
/// `None` where `python3 -m venv` is not available (the fake then runs as it is).
fn fake_netlab_python() -> Option<PathBuf> {
    let works = |venv: &Path| {
        Command::new(venv.join("bin/python3"))
            .args(["-c", "import sys; sys.exit(sys.prefix == sys.base_prefix)"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-netlab-python");
    if !works(&venv) {
        // Made aside and renamed into place: another test run may be making it too.
        let fresh = venv.with_extension(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&fresh);
        let made = Command::new("python3")
            .args(["-m", "venv", "--without-pip"])
            .arg(&fresh)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made || !works(&fresh) {
            let _ = std::fs::remove_dir_all(&fresh);
            return None;
        }
        let _ = std::fs::remove_dir_all(&venv);
        if std::fs::rename(&fresh, &venv).is_err() {
            let _ = std::fs::remove_dir_all(&fresh);
        }
    }
    works(&venv).then(|| venv.join("bin"))
}

/// Who runs beside whom. The tests run many at a time (`RUST_TEST_THREADS` in
/// .cargo/config.toml): most start servers that spend their time waiting (on the fake
/// netlab, on timeouts). A test that loads the machine or bounds a latency takes the gate
/// [`alone`], so that it neither spoils another's bound nor has its own spoiled; every
/// [`TestServer`] holds it [`shared`]. A shared holder never waits for a test waiting to be
/// alone (so a test may hold two servers): those wait for a moment with no server up.
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    shared: usize,
    alone: Option<ThreadId>,
}

static GATE: Gate = Gate {
    state: Mutex::new(GateState {
        shared: 0,
        alone: None,
    }),
    changed: Condvar::new(),
};

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by a test that must run alone; see [`Gate`].
pub struct Alone(());

/// Waits until no other test holds the gate, and holds it alone until dropped. The servers
/// this thread starts meanwhile do not wait for it.
pub fn alone() -> Alone {
    let mut state = GATE.lock();
    while state.alone.is_some() || state.shared > 0 {
        state = GATE.wait(state);
    }
    state.alone = Some(std::thread::current().id());
    Alone(())
}

impl Drop for Alone {
    fn drop(&mut self) {
        GATE.lock().alone = None;
        GATE.changed.notify_all();
    }
}

/// Held by whatever runs beside other tests; see [`Gate`].
pub struct Shared {
    counted: bool,
}

/// Waits while a test runs alone (unless it is this thread's), then holds the gate shared
/// until dropped.
pub fn shared() -> Shared {
    let me = std::thread::current().id();
    let mut state = GATE.lock();
    if state.alone == Some(me) {
        return Shared { counted: false };
    }
    while state.alone.is_some() {
        state = GATE.wait(state);
    }
    state.shared += 1;
    Shared { counted: true }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.counted {
            GATE.lock().shared -= 1;
            GATE.changed.notify_all();
        }
    }
}

/// A directory for a server: `state/` (made by the server) and `fake/`, the fake netlab's,
/// with its `control/`.
pub fn test_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("fake/control")).unwrap();
    dir
}

/// `command` run by `sh` after `ulimit -n nofile` (its arguments, environment and stdio:
/// stderr piped, the rest null, as [`TestServer::command`] sets them).
fn under_limit(command: &Command, nofile: u64) -> Command {
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(command.get_program())
        .args(command.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

/// A running server with its own state dir and fake-netlab dir.
pub struct TestServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: Arc<Output>,
    /// Released after the server is killed (fields drop in order, after `drop`).
    _gate: Shared,
}

#[derive(Default)]
pub struct Options {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Reuse the state and fake dirs of an earlier server (restarts).
    pub dir: Option<tempfile::TempDir>,
    /// Start the server with this open-files limit (soft and hard), through `sh`'s ulimit.
    pub nofile: Option<u64>,
}

impl Options {
    /// On the state and fake dirs in `dir`: what an earlier server left
    /// ([`TestServer::kill_keep_dir`]), or what a test laid out ([`test_dir`]).
    pub fn in_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_owned());
        self
    }
}

pub fn start() -> TestServer {
    TestServer::start(Options::default())
}

/// A server on the state and fake dirs in `dir` (see [`Options::in_dir`]).
pub fn start_in(dir: tempfile::TempDir) -> TestServer {
    TestServer::start(Options::default().in_dir(dir))
}

pub fn start_with(args: &[(&str, &str)]) -> TestServer {
    let mut options = Options::default();
    for (flag, value) in args {
        options = options.arg(flag, value);
    }
    TestServer::start(options)
}

impl TestServer {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn fake_dir(&self) -> PathBuf {
        self.dir.path().join("fake")
    }

    /// The command line a server of this test dir is started with.
    pub fn command(dir: &Path, options: &Options) -> Command {
        let mut command = server_command();
        command
            .args(["--host", "127.0.0.1", "--port", "0"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--netlab")
            .arg(fake_netlab())
            .args(["--sweep-interval", "0.1"])
            .args(&options.args)
            .env("FAKE_NETLAB_DIR", dir.join("fake"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &options.env {
            command.env(k, v);
        }
        command
    }

    pub fn start(mut options: Options) -> TestServer {
        let gate = shared();
        let dir = options.dir.take().unwrap_or_else(test_dir);
        std::fs::create_dir_all(dir.path().join("fake/control")).unwrap();
        let mut command = Self::command(dir.path(), &options);
        if let Some(nofile) = options.nofile {
            command = under_limit(&command, nofile);
        }
        let mut child = command.spawn().expect("start the server");
        let (addr, log) = wait_for_listening(&mut child);
        TestServer {
            child,
            addr,
            dir,
            log,
            _gate: gate,
        }
    }

    /// For `remote-lab --url`.
    #[cfg(feature = "client")]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.addr, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    pub fn post(&self, path: &str) -> Resp {
        self.request("POST", path, &[], b"")
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, &[], b"")
    }

    /// `POST /session`; returns the new id and its position.
    pub fn create_session(&self) -> (String, u64) {
        let r = self.post("/session");
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        (
            v["session_id"].as_str().unwrap().to_owned(),
            v["position"].as_u64().unwrap(),
        )
    }

    /// `GET /session/{id}` answers `{"status":STATUS,"position":POSITION}`.
    #[track_caller]
    pub fn expect_session(&self, id: &str, status: &str, position: u64) {
        self.get(&format!("/session/{id}")).expect(
            200,
            &format!(r#"{{"status":"{status}","position":{position}}}"#),
        );
    }

    /// `GET /session/{id}` answers that there is no such session.
    #[track_caller]
    pub fn expect_no_session(&self, id: &str) {
        self.get(&format!("/session/{id}"))
            .expect(404, SESSION_NOT_FOUND);
    }

    /// A gated `/lab*` call as session `id`.
    pub fn lab(&self, method: &str, path: &str, id: &str) -> Resp {
        self.request(method, path, &[("X-Session-ID", id)], b"")
    }

    /// `POST /lab` with a multipart body.
    pub fn acquire(&self, id: &str, form: &Form) -> Resp {
        post_lab(self.addr, id, form)
    }

    /// Sends `POST /lab` of `form` as session `id` on a thread of its own and returns once
    /// the fake netlab has started `up` (set `up.sleep` first to keep it running).
    pub fn acquire_during_up(&self, id: &str, form: Form) -> std::thread::JoinHandle<Resp> {
        let (addr, id) = (self.addr, id.to_owned());
        let handle = std::thread::spawn(move || post_lab(addr, &id, &form));
        wait_until(Duration::from_secs(5), "netlab up to start", || {
            self.call_lines().iter().any(|l| l.starts_with("up "))
        });
        handle
    }

    /// Makes every fake `up` wait, once it wrote the snapshot, at a gate of its own (see
    /// [`TestServer::open_up_gates`]).
    pub fn gate_ups(&self) {
        std::fs::create_dir(self.fake_dir().join("control/up.gates")).unwrap();
    }

    /// Waits until `count` fake `up`s wait at their gates, then lets them all go on.
    pub fn open_up_gates(&self, count: usize) {
        let dir = self.fake_dir().join("control/up.gates");
        let gates = || -> Vec<PathBuf> {
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        };
        wait_until(Duration::from_secs(20), "the ups at their gates", || {
            gates().len() >= count
        });
        for gate in gates() {
            open_gate(&gate);
        }
    }

    pub fn set_control(&self, name: &str, content: &str) {
        std::fs::write(self.fake_dir().join("control").join(name), content).unwrap();
    }

    pub fn clear_control(&self, name: &str) {
        let _ = std::fs::remove_file(self.fake_dir().join("control").join(name));
    }

    /// The fake netlab's calls as it logs them: `argv`, `cwd`, `pid`, `t` (when it began)
    /// and `env` (the multilab variables it was given).
    pub fn call_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.fake_dir().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The fake netlab's calls, as (argv, cwd).
    pub fn calls(&self) -> Vec<(Vec<String>, String)> {
        self.call_records()
            .into_iter()
            .map(|v| {
                let argv = v["argv"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect();
                (argv, v["cwd"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    /// The calls as "argv joined by spaces", for compact assertions.
    pub fn call_lines(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .map(|(argv, _)| argv.join(" "))
            .collect()
    }

    pub fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.fake_dir().join("calls.log"));
    }

    /// The directory netlab's `default` instance is registered in, if any.
    pub fn registered(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.fake_dir().join("instance.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(v["dir"].as_str()?.to_owned())
    }

    /// Work directories currently under the state dir.
    pub fn work_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state_dir().join("labs")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Signals the server process itself (never a group): its pid is still ours, since
    /// `self.child` has not been reaped.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits for the process to exit, at most `limit`, and for its log to be read to the end.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.log.wait_end(Duration::from_secs(5));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server and hands back its directory, for a restart on the same state.
    pub fn kill_keep_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.take_dir()
    }

    /// The directory of a server that has exited, for a restart on the same state.
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads stderr until the `listening on http://ADDR` line; keeps collecting it afterwards.
pub fn wait_for_listening(child: &mut Child) -> (SocketAddr, Arc<Output>) {
    let log = Output::collect(child.stderr.take().expect("piped stderr"));
    let addr = log.wait_for(Duration::from_secs(20), |text| {
        text.lines()
            .find_map(|l| l.strip_prefix("listening on http://"))
            .map(|rest| rest.trim().parse::<SocketAddr>().unwrap())
    });
    match addr {
        Some(addr) => (addr, log),
        None => {
            let _ = child.kill();
            panic!(
                "server did not print its listening line; stderr:\n{}",
                log.text()
            );
        }
    }
}

/// What a child process writes on a pipe, collected by a thread of its own as it comes.
/// The text shows whole lines only, until the pipe ends.
pub struct Output {
    /// The bytes so far, and whether the pipe has ended (every writer closed it).
    state: Mutex<(Vec<u8>, bool)>,
    changed: Condvar,
}

impl Output {
    pub fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Output> {
        let output = Arc::new(Output {
            state: Mutex::new((Vec::new(), false)),
            changed: Condvar::new(),
        });
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = match pipe.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let mut state = sink.lock();
                if n == 0 {
                    state.1 = true;
                } else {
                    state.0.extend_from_slice(&buf[..n]);
                }
                drop(state);
                sink.changed.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        output
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<u8>, bool)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shown((bytes, ended): &(Vec<u8>, bool)) -> String {
        let whole = match bytes.iter().rposition(|b| *b == b'\n') {
            _ if *ended => bytes.len(),
            Some(end) => end + 1,
            None => 0,
        };
        String::from_utf8_lossy(&bytes[..whole]).into_owned()
    }

    pub fn text(&self) -> String {
        Self::shown(&self.lock())
    }

    /// Waits until `found` finds what it looks for in the text, at most `limit` (or until
    /// the pipe ends without it).
    pub fn wait_for<T>(
        &self,
        limit: Duration,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        loop {
            if let Some(t) = found(&Self::shown(&state)) {
                return Some(t);
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until the pipe ends, at most `limit`: once the process has exited, until the
    /// thread has taken its last bytes. Whether it ended.
    pub fn wait_end(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        while !state.1 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts status and exact body text.
    #[track_caller]
    pub fn expect(&self, status: u16, body: &str) {
        assert_eq!(
            (self.status, self.text().as_str()),
            (status, body),
            "unexpected response"
        );
    }

    /// Asserts an empty response: no body, no content type.
    #[track_caller]
    pub fn expect_empty(&self, status: u16) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert!(self.body.is_empty(), "body: {:?}", self.text());
        assert_eq!(self.header("content-type"), None);
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer before reading the body (the gate): ignore a reset here.
    let _ = stream.write_all(body);
    read_response(&mut stream, method == "HEAD")
}

/// `POST /lab` of `form` as session `id`.
pub fn post_lab(addr: SocketAddr, id: &str, form: &Form) -> Resp {
    let content_type = form.content_type();
    request(
        addr,
        "POST",
        "/lab",
        &[("X-Session-ID", id), ("Content-Type", &content_type)],
        &form.body(),
    )
}

pub fn read_response(stream: &mut impl Read, head_only: bool) -> Resp {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().unwrap());
    let mut body = Vec::new();
    if !head_only && status != 204 {
        match length {
            Some(n) => {
                body.resize(n, 0);
                reader.read_exact(&mut body).unwrap();
            }
            None => {
                let chunked = headers.iter().any(|(k, v)| {
                    k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")
                });
                if chunked {
                    loop {
                        let mut size = String::new();
                        reader.read_line(&mut size).unwrap();
                        let n = usize::from_str_radix(size.trim(), 16).unwrap();
                        if n == 0 {
                            break;
                        }
                        let mut chunk = vec![0; n + 2];
                        reader.read_exact(&mut chunk).unwrap();
                        body.extend_from_slice(&chunk[..n]);
                    }
                } else {
                    reader.read_to_end(&mut body).unwrap();
                }
            }
        }
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// A multipart/form-data body: the tests' one builder, for the uploads clients send and for
/// what broken ones do (raw bytes in a file name, a header smuggled into one, a body cut
/// short: see [`Form::raw_file`] and [`Form::parts`]).
pub struct Form {
    pub boundary: String,
    parts: Vec<Part>,
}

struct Part {
    name: String,
    /// The `filename` parameter, as raw bytes (none for a text field).
    filename: Option<Vec<u8>>,
    /// A `Content-Type` line after the disposition.
    content_type: Option<&'static str>,
    data: Vec<u8>,
}

impl Default for Form {
    fn default() -> Self {
        Self::new()
    }
}

impl Form {
    pub fn new() -> Self {
        Form {
            boundary: "----neopsTestBoundary7MA4YWxkTrZu0gW".into(),
            parts: Vec::new(),
        }
    }

    pub fn with_boundary(mut self, boundary: &str) -> Self {
        self.boundary = boundary.into();
        self
    }

    /// A file part, as a browser sends it (with a `Content-Type`).
    pub fn file(mut self, name: &str, filename: &str, data: &[u8]) -> Self {
        self.parts.push(Part {
            name: name.into(),
            filename: Some(filename.as_bytes().to_vec()),
            content_type: Some("application/x-yaml"),
            data: data.to_vec(),
        });
        self
    }

    /// A file part whose name is put between the quotes byte for byte (not necessarily
    /// UTF-8, nor free of quotes and line ends), with no `Content-Type`.
    pub fn raw_file(mut self, name: &str, filename: &[u8], data: &[u8]) -> Self {
        self.parts.push(Part {
            name: name.into(),
            filename: Some(filename.to_vec()),
            content_type: None,
            data: data.to_vec(),
        });
        self
    }

    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.parts.push(Part {
            name: name.into(),
            filename: None,
            content_type: None,
            data: value.as_bytes().to_vec(),
        });
        self
    }

    /// A form with just a topology file.
    pub fn topology(filename: &str, data: &str) -> Self {
        Form::new().file("topology", filename, data.as_bytes())
    }

    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The parts without the closing delimiter: a body that has not ended.
    pub fn parts(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for part in &self.parts {
            out.extend_from_slice(
                format!(
                    "--{}\r\nContent-Disposition: form-data; name=\"{}\"",
                    self.boundary, part.name
                )
                .as_bytes(),
            );
            if let Some(filename) = &part.filename {
                out.extend_from_slice(b"; filename=\"");
                out.extend_from_slice(filename);
                out.extend_from_slice(b"\"");
            }
            if let Some(content_type) = part.content_type {
                out.extend_from_slice(format!("\r\nContent-Type: {content_type}").as_bytes());
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(&part.data);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    pub fn body(&self) -> Vec<u8> {
        let mut out = self.parts();
        out.extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        out
    }
}

/// Polls `check` every 20 ms until it returns true, at most `limit`.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const MISSING_SESSION_HEADER: &str = r#"{"detail":[{"type":"missing","loc":["header","X-Session-ID"],"msg":"Field required","input":null}]}"#;
pub const MISSING_TOPOLOGY: &str = r#"{"detail":[{"type":"missing","loc":["body","topology"],"msg":"Field required","input":null}]}"#;
pub const SESSION_NOT_FOUND: &str = r#"{"detail":"Session not found"}"#;
pub const NOT_ACTIVE: &str = r#"{"detail":"Session is not active"}"#;
pub const NO_LAB: &str = r#"{"detail":"No lab running"}"#;
pub const LAB_BUSY: &str = r#"{"detail":"Lab currently busy"}"#;
pub const NOT_RUNNING: &str =
    r#"{"running":false,"topology":null,"ref_count":0,"devices":[],"netlab_status":null}"#;

/// Sends raw bytes on a fresh connection and reads one response.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Resp {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = stream.write_all(bytes);
    read_response(&mut stream, false)
}

/// A `POST /lab` sent with `Transfer-Encoding: chunked` (no Content-Length).
pub fn chunked_acquire(addr: SocketAddr, id: &str, form: &Form) -> Resp {
    let body = form.body();
    let mut bytes = format!(
        "POST /lab HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Session-ID: {id}\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        form.content_type()
    )
    .into_bytes();
    for chunk in body.chunks(64 * 1024) {
        bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    raw_request(addr, &bytes)
}

/// Every file under `dir`, relative to it (sorted).
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else {
                    out.push(path.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A keep-alive connection for tests that send many requests.
pub struct KeepAlive {
    stream: BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn open(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        KeepAlive {
            stream: BufReader::new(stream),
        }
    }

    pub fn call(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.get_mut().write_all(head.as_bytes()).unwrap();
        read_response(&mut self.stream, method == "HEAD")
    }
}

/// Resident memory (KiB), threads and open file descriptors of a process.
pub fn process_figures(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (field("VmRSS:"), field("Threads:"), fds)
}

/// Lets the command waiting at `gate` go on: opening the FIFO for writing succeeds once the
/// command has it open for reading, and closing it gives the command its end of file.
pub fn open_gate(gate: &Path) {
    use rustix::fs::{Mode, OFlags};
    wait_until(Duration::from_secs(10), "the command at its gate", || {
        rustix::fs::open(
            gate,
            OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .is_ok()
    });
}
