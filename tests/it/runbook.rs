//! The commands of the operator guide's runbook and of the README run as printed.
//!
//! Shell blocks marked ```` ```sh test:<scenario> ```` in docs/operator-guide.md and
//! README.md are extracted, joined per scenario in document order, and run with bash
//! (`set -eu`) against a server with the fake netlab. Only three things are replaced: the
//! address `127.0.0.1:8000` (by the test server's), `/var/lib/neops-remote-lab` (by a
//! temporary state directory), `/etc/neops-remote-lab/tokens` (by a token file of its own,
//! `ci` and `admin` as the package makes it: the guide's scenarios run with tokens on, as
//! the package sets the service up), `/opt/netlab/bin` (by a directory holding a `netlab`
//! that runs the fake) and `/usr/sbin/neops-remote-lab` (by the binary under test).
//! `systemctl`, `docker` and `containerlab` are small stand-ins first on `PATH`;
//! `systemctl stop|start|status neops-remote-lab` really stops and starts the server. A
//! decoy `neops-remote-lab` is first on `PATH` and in the netlab directory (where netlab's
//! virtual environment can hold the Python server): a command that runs it instead of the
//! full path fails.
//!
//! A command that fails fails the test; so does one whose output differs from what its
//! `# → …` comment shows (`…` matches anything).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// How long one scenario's commands may take.
const SCRIPT_LIMIT: Duration = Duration::from_secs(90);

const TOPO: &str = "nodes: [r1, r2]\n";

/// The shell blocks marked `sh test:<scenario>`, in document order.
fn blocks(scenario: &str) -> Vec<String> {
    let mut out = Vec::new();
    for doc in ["docs/operator-guide.md", "README.md"] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)).unwrap();
        let mut current: Option<String> = None;
        for line in text.lines() {
            match &mut current {
                None => {
                    if line.trim() == format!("```sh test:{scenario}") {
                        current = Some(String::new());
                    }
                }
                Some(block) => {
                    if line.trim() == "```" {
                        out.push(std::mem::take(block));
                        current = None;
                    } else {
                        block.push_str(line);
                        block.push('\n');
                    }
                }
            }
        }
        assert!(current.is_none(), "{doc}: unterminated block");
    }
    out
}

/// A line's expected output: the text after `# → `, if any.
fn expectation(line: &str) -> Option<&str> {
    line.split_once("# → ").map(|(_, want)| want.trim())
}

/// Whether `text` matches `pattern`, where `…` matches any text (also none).
fn matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn ellipses_match_anything() {
    assert!(matches("a…c", "abbbc"));
    assert!(matches("a…c", "ac"));
    assert!(matches("…x…", "1x2"));
    assert!(!matches("a…c", "abd"));
    assert!(!matches("abc", "abcd"));
    assert!(!matches("a…b…c", "acb"));
}

/// A free port for a service that restarts on it (the docs' commands name it). Not one of
/// the kernel's ephemeral range: that is where the other tests' servers, which ask for port
/// 0, get theirs, and one of them could take a port found free there before this service
/// binds it (the runbook then talked to a server of another test).
fn fixed_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral_low.saturating_sub(10_000).max(1));
    // Apart from the other tests of this run (the counter) and from other runs (the pid).
    let first =
        std::process::id() * 97 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 7919;
    (0..span)
        .map(|i| low + (first + i) % span)
        .find_map(|port| {
            let port = u16::try_from(port).ok()?;
            std::net::TcpListener::bind(("127.0.0.1", port))
                .ok()
                .map(|_| port)
        })
        .expect("a free port below the ephemeral range")
}

/// The lab host of a scenario: a state dir, the fake netlab's dir, the stand-ins.
struct Host {
    dir: tempfile::TempDir,
    port: u16,
    /// The `ci` token, when the service runs with `--token-file` like the package's.
    token: Option<String>,
}

/// What the Python server (`neops-remote-lab` of a netlab virtual environment) answers to
/// the Rust server's subcommands.
const DECOY: &str = "#!/bin/sh
    echo 'usage: neops-remote-lab [-h] [--host HOST] [--port PORT]' >&2
    echo \"neops-remote-lab: error: unrecognized arguments: $*\" >&2
    exit 2
";

impl Host {
    /// A host whose service runs as the package sets it up: with a token file.
    fn packaged() -> Host {
        Host::new(true)
    }

    /// A server started by hand, as in the README: no tokens.
    fn by_hand() -> Host {
        Host::new(false)
    }

    fn new(tokens: bool) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let port = fixed_port();
        let token = tokens.then(|| uuid::Uuid::new_v4().simple().to_string());
        let host = Host { dir, port, token };
        for sub in ["bin", "sbin", "netlab-bin", "fake/control", "home"] {
            std::fs::create_dir_all(host.path(sub)).unwrap();
        }
        if let Some(token) = &host.token {
            let admin = uuid::Uuid::new_v4().simple().to_string();
            std::fs::write(
                host.path("tokens"),
                format!("# as the package makes it\nci:{token}\nadmin:{admin}:admin\n"),
            )
            .unwrap();
            std::fs::set_permissions(host.path("tokens"), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        host.write_tools();
        host
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn executable(&self, sub: &str, text: &str) {
        let path = self.path(sub);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn write_tools(&self) {
        let fake = fake_netlab();
        let fake_dir = self.path("fake");
        self.executable(
            "netlab-bin/netlab",
            &format!(
                "#!/bin/sh\nFAKE_NETLAB_DIR='{}' exec '{}' \"$@\"\n",
                fake_dir.display(),
                fake.display()
            ),
        );
        std::os::unix::fs::symlink(BIN, self.path("sbin/neops-remote-lab")).unwrap();
        self.executable("bin/neops-remote-lab", DECOY);
        self.executable("netlab-bin/neops-remote-lab", DECOY);
        // systemctl: the service is the real binary, started the way the unit starts it
        // (netlab found on PATH, HOME = the state dir, --on-exit keep).
        self.executable(
            "bin/systemctl",
            &format!(
                r#"#!/usr/bin/env python3
import os, signal, subprocess, sys, time, urllib.request
BIN = {bin:?}
STATE = {state:?}
PORT = {port}
PIDFILE = {pidfile:?}
LOG = {log:?}
NETLAB_BIN = {netlab_bin:?}
EXTRA = {extra}

def running():
    try:
        pid = int(open(PIDFILE).read())
    except (OSError, ValueError):
        return None
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return pid if state != "Z" else None

def healthy():
    try:
        return urllib.request.urlopen("http://127.0.0.1:%d/healthz" % PORT, timeout=2).status == 204
    except Exception:
        return False

action, unit = sys.argv[1], sys.argv[-1]
assert unit == "neops-remote-lab", unit
if action == "start":
    if running() is None:
        env = {{"PATH": NETLAB_BIN + ":/usr/local/bin:/usr/bin:/bin", "HOME": STATE}}
        with open(LOG, "a") as log:
            child = subprocess.Popen(
                [BIN, "--host", "127.0.0.1", "--port", str(PORT), "--state-dir", STATE,
                 "--on-exit", "keep", "--sweep-interval", "0.1"] + EXTRA,
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        open(PIDFILE, "w").write(str(child.pid))
        deadline = time.time() + 20
        while not healthy():
            if child.poll() is not None or time.time() > deadline:
                sys.exit("systemctl (test stand-in): the service did not start")
            time.sleep(0.05)
elif action == "stop":
    pid = running()
    if pid is not None and pid > 1:
        # Pinned by a pidfd, then checked to be our server, then signalled through the pidfd:
        # a pid from the file that was reused meanwhile is never signalled.
        fd = os.pidfd_open(pid)
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                ours = f.read().split(b"\0")[0] == BIN.encode()
            if ours:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
        finally:
            os.close(fd)
        deadline = time.time() + 20
        while running() is not None:
            if time.time() > deadline:
                sys.exit("systemctl (test stand-in): the service did not stop")
            time.sleep(0.05)
elif action == "status":
    pid = running()
    print("neops-remote-lab.service - neops-remote-lab (test stand-in)")
    print("     Active: " + ("active (running), pid %d" % pid if pid else "inactive (dead)"))
    sys.exit(0 if pid else 3)
else:
    sys.exit("systemctl (test stand-in): unsupported: " + " ".join(sys.argv[1:]))
"#,
                bin = BIN,
                state = self.path("state").display().to_string(),
                port = self.port,
                pidfile = self.path("service.pid").display().to_string(),
                log = self.path("service.log").display().to_string(),
                netlab_bin = self.path("netlab-bin").display().to_string(),
                extra = match &self.token {
                    Some(_) => format!(
                        "[\"--token-file\", {:?}]",
                        self.path("tokens").display().to_string()
                    ),
                    None => "[]".to_owned(),
                },
            ),
        );
        self.executable(
            "bin/docker",
            "#!/bin/sh\necho \"docker $*\" >>\"$(dirname \"$0\")/../backend.log\"\n\
             echo 'CONTAINER ID   IMAGE     COMMAND   CREATED   STATUS    PORTS     NAMES'\n",
        );
        self.executable(
            "bin/containerlab",
            "#!/bin/sh\necho \"containerlab $*\" >>\"$(dirname \"$0\")/../backend.log\"\n\
             if [ \"$1\" = destroy ] && [ \"$2\" = -t ]; then\n\
             \x20 [ -f \"$3\" ] || { echo \"Error: topology file $3 does not exist\" >&2; exit 1; }\n\
             \x20 echo \"INFO Destroying lab\"\nfi\n",
        );
    }

    fn systemctl(&self, action: &str) {
        let status = Command::new(self.path("bin/systemctl"))
            .args([action, "neops-remote-lab"])
            .status()
            .unwrap();
        assert!(status.success(), "systemctl {action}");
    }

    fn set_control(&self, name: &str, content: &str) {
        std::fs::write(self.path("fake/control").join(name), content).unwrap();
    }

    fn service_log(&self) -> String {
        std::fs::read_to_string(self.path("service.log")).unwrap_or_default()
    }

    fn work_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.path("state/labs")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A CI job that opened a session, took the lab and vanished.
    fn vanished_client_holding_a_lab(&self) -> String {
        let r = self.call("POST", "/session", &[], b"");
        assert_eq!(r.status, 201, "{}", r.text());
        let sid = r.json()["session_id"].as_str().unwrap().to_owned();
        let form = Form::topology("lab.yml", TOPO);
        let r = self.call(
            "POST",
            "/lab",
            &[
                ("X-Session-ID", &sid),
                ("Content-Type", &form.content_type()),
            ],
            &form.body(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        sid
    }

    /// A request as a CI job sends it (with the `ci` token when tokens are on).
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &auth {
            all.push(("Authorization", auth));
        }
        request(self.addr(), method, path, &all, body)
    }

    fn replace_paths(&self, text: &str) -> String {
        text.replace("127.0.0.1:8000", &format!("127.0.0.1:{}", self.port))
            .replace(
                "/usr/sbin/neops-remote-lab",
                &self.path("sbin/neops-remote-lab").display().to_string(),
            )
            .replace(
                "/var/lib/neops-remote-lab",
                &self.path("state").display().to_string(),
            )
            .replace(
                "/etc/neops-remote-lab/tokens",
                &self.path("tokens").display().to_string(),
            )
            .replace(
                "/opt/netlab/bin",
                &self.path("netlab-bin").display().to_string(),
            )
    }

    /// Runs the scenario's blocks as one script; checks every command's exit status and
    /// every shown output.
    fn run(&self, scenario: &str) -> String {
        let blocks = blocks(scenario);
        assert!(!blocks.is_empty(), "no block marked test:{scenario}");
        let mut script = String::from("set -eu\n");
        let mut expected: Vec<(String, String)> = Vec::new();
        let mut continued = false;
        for block in &blocks {
            for line in block.lines() {
                let starts_command = !continued;
                continued = line.ends_with('\\');
                match expectation(line) {
                    Some(want) => {
                        assert!(starts_command, "an expectation on a continued line: {line}");
                        let n = expected.len();
                        script.push_str(&format!("printf '\\n@@begin {n}\\n'\n"));
                        script.push_str(&self.replace_paths(line));
                        script.push_str(&format!("\nprintf '\\n@@end {n}\\n'\n"));
                        expected.push((line.to_owned(), self.replace_paths(want)));
                    }
                    None => {
                        script.push_str(&self.replace_paths(line));
                        script.push('\n');
                    }
                }
            }
        }
        std::fs::write(self.path(&format!("{scenario}.sh")), &script).unwrap();
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("bash")
            .arg(self.path(&format!("{scenario}.sh")))
            .current_dir(self.path("home"))
            .env("PATH", path)
            .env("HOME", self.path("home"))
            .env_remove("COLUMNS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + SCRIPT_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("test:{scenario} took longer than {SCRIPT_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = out_reader.join().unwrap();
        let err = err_reader.join().unwrap();
        let context = || {
            format!(
                "--- script\n{script}--- stdout\n{out}--- stderr\n{err}--- service log\n{}",
                self.service_log()
            )
        };
        assert!(
            status.success(),
            "test:{scenario}: a command failed ({status})\n{}",
            context()
        );
        for (n, (line, want)) in expected.iter().enumerate() {
            let begin = format!("\n@@begin {n}\n");
            let end = format!("\n@@end {n}\n");
            let start = out.find(&begin).unwrap() + begin.len();
            let stop = start + out[start..].find(&end).unwrap();
            // What a terminal shows: without the carriage returns of HTTP header lines.
            let got = out[start..stop]
                .trim_end_matches('\n')
                .replace("\r\n", "\n")
                .trim_end_matches('\r')
                .to_owned();
            assert!(
                matches(want, &got),
                "test:{scenario}: `{line}`\n  printed {got:?}\n  the docs show {want:?}\n{}",
                context()
            );
        }
        out
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new(self.path("bin/systemctl"))
            .args(["stop", "neops-remote-lab"])
            .status();
    }
}

/// The runbook, steps 1 to 5, on a host where a vanished CI job holds the lab.
#[test]
fn the_runbook_runs_as_printed() {
    let host = Host::packaged();
    host.systemctl("start");
    let sid = host.vanished_client_holding_a_lab();
    let work = host.work_dirs().pop().unwrap();
    let out = host.run("runbook");
    // Step 2 shows the whole directory (netlab's table is cut at 80 columns without COLUMNS).
    assert!(
        out.contains(&format!("default   started  {}\n", work.display())),
        "{out}"
    );
    // The lab is gone, the queue is free, the service runs again with a clean state.
    assert!(host.work_dirs().is_empty(), "{}", host.service_log());
    assert!(!host.path("fake/instance.json").exists());
    let r = host.call("GET", &format!("/session/{sid}"), &[], b"");
    assert_eq!(r.status, 404);
    let r = host.call("GET", "/active-session", &[], b"");
    r.expect(404, r#"{"detail":"No active session"}"#);
}

/// Step 6: a teardown netlab keeps failing (a plain `down` stops at an error; `--force`
/// gets through); netlab by hand, then `cleanup`.
#[test]
fn runbook_step_6_netlab_by_hand_runs_as_printed() {
    let host = Host::packaged();
    host.systemctl("start");
    let sid = host.vanished_client_holding_a_lab();
    host.set_control(
        "down.fail",
        r#"{"code": 1, "stderr": "Error: containers of the lab could not be removed\n", "unless_force": true}"#,
    );
    let r = host.call("DELETE", "/lab", &[("X-Session-ID", &sid)], b"");
    assert_eq!(r.status, 202);
    wait_until(Duration::from_secs(10), "the failed teardown", || {
        host.service_log().contains("[ERROR] teardown of")
    });
    let dir = host.work_dirs().pop().expect("the work dir is kept");
    host.run("netlab-by-hand");
    assert!(!dir.exists());
    assert!(host.work_dirs().is_empty());
    assert!(!host.path("fake/instance.json").exists());
    let health = host.call("GET", "/debug/health", &[], b"").json();
    assert_eq!(health["teardowns"], serde_json::json!([]));
}

/// Step 7: netlab cannot tear down at all; containerlab destroys the lab by the kept
/// `clab.yml`, then netlab's registration and the directory go, and `cleanup` agrees.
#[test]
fn runbook_step_7_backend_by_hand_runs_as_printed() {
    let host = Host::packaged();
    host.systemctl("start");
    let sid = host.vanished_client_holding_a_lab();
    host.set_control(
        "down.fail",
        r#"{"code": 1, "stderr": "Fatal error in netlab: cannot reach the Docker daemon\n"}"#,
    );
    let r = host.call("DELETE", "/lab", &[("X-Session-ID", &sid)], b"");
    assert_eq!(r.status, 202);
    wait_until(Duration::from_secs(10), "the failed teardown", || {
        host.service_log().contains("[ERROR] teardown of")
    });
    let dir = host.work_dirs().pop().expect("the work dir is kept");
    host.run("backend-by-hand");
    let backend = std::fs::read_to_string(host.path("backend.log")).unwrap();
    assert!(
        backend.contains(&format!(
            "containerlab destroy -t {}/clab.yml --cleanup",
            dir.display()
        )),
        "{backend}"
    );
    assert!(!dir.exists());
    assert!(!host.path("fake/instance.json").exists());
    let health = host.call("GET", "/debug/health", &[], b"").json();
    assert_eq!(health["teardowns"], serde_json::json!([]));
}

/// The README's curl session.
#[test]
fn the_readme_runs_as_printed() {
    let host = Host::by_hand();
    host.systemctl("start");
    host.run("readme");
    let r = host.call("GET", "/debug/health", &[], b"");
    assert_eq!(r.json()["sessions"], 0);
    // The released lab stays up, idle, for the next session.
    assert_eq!(host.work_dirs().len(), 1);
}
