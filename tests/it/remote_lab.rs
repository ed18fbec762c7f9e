//! `remote-lab run` and `remote-lab status` against the real server with the fake netlab.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const CLIENT: &str = env!("CARGO_BIN_EXE_remote-lab");

/// A `remote-lab` process whose stderr is collected as it comes.
struct Run {
    child: Child,
    stderr: Arc<Output>,
}

fn client(args: &[&str], dir: &Path) -> Command {
    let mut command = Command::new(CLIENT);
    command
        .args(args)
        .current_dir(dir)
        .env_remove("REMOTE_LAB_URL")
        .env_remove("REMOTE_LAB_TOKEN")
        .env_remove("CI_JOB_URL")
        .env_remove("BUILD_URL")
        .env("NETRC", dir.join("no-netrc"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

impl Run {
    fn start(args: &[&str], dir: &Path) -> Run {
        let mut child = client(args, dir).spawn().expect("start remote-lab");
        let stderr = Output::collect(child.stderr.take().unwrap());
        Run { child, stderr }
    }

    /// Waits for the exit (at most `limit`); returns the exit code and stderr.
    fn finish(mut self, limit: Duration) -> (i32, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "remote-lab did not exit in {limit:?}; stderr:\n{}",
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader thread takes the last bytes (unless the command lives on, holding
        // the pipe).
        self.stderr.wait_end(Duration::from_secs(2));
        let text = self.stderr.text();
        (
            status.code().expect("remote-lab exits, it is not killed"),
            text,
        )
    }

    fn signal(&self, signal: Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
    }
}

/// Runs to the end; exit code and stderr.
fn run(args: &[&str], dir: &Path) -> (i32, String) {
    Run::start(args, dir).finish(Duration::from_secs(30))
}

fn sessions(server: &TestServer) -> u64 {
    server.get("/debug/health").json()["sessions"]
        .as_u64()
        .unwrap()
}

fn topology(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("topo.yml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Someone else ends the session of `run` once its command has written the session id to
/// `id_file`; `remote-lab` must say so loudly and exit 75 within `limit`.
fn lose_the_session(server: &TestServer, run: Run, id_file: &Path, limit: Duration) {
    wait_until(Duration::from_secs(10), "the command started", || {
        read(id_file).trim().len() == 36
    });
    let id = read(id_file).trim().to_owned();
    server.delete(&format!("/session/{id}")).expect_empty(204);
    let (code, stderr) = run.finish(limit);
    assert_eq!(code, 75, "{stderr}");
    assert!(stderr.contains("SESSION LOST"), "{stderr}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_run_gets_the_lab_and_the_command_its_environment() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(dir.path(), "nodes: [r1, r2]\n");
    std::fs::create_dir(dir.path().join("configs")).unwrap();
    std::fs::write(dir.path().join("configs/r1.cfg"), "hostname r1\n").unwrap();
    let out = dir.path().join("env.txt");
    let script = format!(
        "printf '%s\\n' \"$REMOTE_LAB_URL\" \"$REMOTE_LAB_SESSION_ID\" \"$REMOTE_LAB_REUSED\" > {out}; cat \"$REMOTE_LAB_DEVICES\" >> {out}",
        out = out.display()
    );
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            &server.url(),
            "--topology",
            topo.to_str().unwrap(),
            "--extra-file",
            "configs/r1.cfg",
            "--name",
            "job-1",
            "--",
            "sh",
            "-c",
            &script,
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let text = read(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], server.url());
    assert_eq!(lines[1].len(), 36);
    assert_eq!(lines[2], "false");
    let devices: serde_json::Value = serde_json::from_str(lines[3]).unwrap();
    let names: Vec<&str> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r1", "r2"]);
    // The extra file reached netlab's work directory under its relative path.
    assert!(
        server
            .work_dirs()
            .iter()
            .any(|d| d.join("configs/r1.cfg").is_file()),
        "{:?}",
        server.work_dirs()
    );
    // Released and ended; the lab stays up, idle, for the next run to reuse.
    assert_eq!(sessions(&server), 0);
    let log = server.log_text();
    assert!(log.contains("released the lab (ref_count 0)"), "{log}");
    // The temporary devices file is gone. (Only the client's own warnings count: netlab's
    // live lines, shown as `netlab| ...`, may say "warning", e.g. `netlab status` when no
    // lab is registered.)
    assert!(!stderr.contains("remote-lab: warning"), "{stderr}");
    let second = run(
        &[
            "run",
            "--url",
            &server.url(),
            "--topology",
            topo.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &format!("echo \"$REMOTE_LAB_REUSED\" > {}", out.display()),
        ],
        dir.path(),
    );
    assert_eq!(second.0, 0, "{}", second.1);
    assert_eq!(read(&out), "true\n");
}

#[test]
fn two_runs_queue_and_the_second_starts_after_the_first() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("order.log");
    let log_s = log.display().to_string();
    let first = Run::start(
        &[
            "run",
            "--url",
            &server.url(),
            "--name",
            "first-job",
            "--",
            "sh",
            "-c",
            &format!("echo start1 >> {log_s}; sleep 1.5; echo end1 >> {log_s}"),
        ],
        dir.path(),
    );
    wait_until(Duration::from_secs(10), "the first run started", || {
        read(&log).contains("start1")
    });
    let second = Run::start(
        &[
            "run",
            "--url",
            &server.url(),
            "--name",
            "second-job",
            "--",
            "sh",
            "-c",
            &format!("echo start2 >> {log_s}"),
        ],
        dir.path(),
    );
    let (code, _) = first.finish(Duration::from_secs(20));
    assert_eq!(code, 0);
    let (code, stderr) = second.finish(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&log), "start1\nend1\nstart2\n");
    assert!(stderr.contains("waiting at position 1"), "{stderr}");
    // The server's queue view names the holder (from its X-Client-Name) and for how long.
    assert!(stderr.contains("held by first-job for "), "{stderr}");
    assert_eq!(sessions(&server), 0);
}

#[test]
fn netlab_output_is_followed_while_the_lab_starts() {
    let server = start();
    server.set_control("up.say", "deploying r1\ndeploying r2\n");
    server.set_control("up.sleep", "1.5");
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("lab.yml");
    std::fs::write(&topo, "nodes: [r1, r2]\n").unwrap();
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            &server.url(),
            "--topology",
            topo.to_str().unwrap(),
            "--",
            "true",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    // netlab's own lines, prefixed, each once, in order, before the command ran.
    let first = stderr.find("netlab| deploying r1\n").expect(&stderr);
    let second = stderr.find("netlab| deploying r2\n").expect(&stderr);
    assert!(first < second, "{stderr}");
    assert_eq!(
        stderr.matches("netlab| deploying r1").count(),
        1,
        "{stderr}"
    );
    // The topology itself never shows.
    assert!(!stderr.contains("nodes: [r1, r2]"), "{stderr}");
}

#[test]
fn heartbeats_keep_a_long_command_alive() {
    // The command runs 3× the active timeout without calling the server itself.
    let server = start_with(&[("--active-timeout", "0.5"), ("--waiting-timeout", "0.5")]);
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(dir.path(), "nodes: [r1]\n");
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            &server.url(),
            "--topology",
            topo.to_str().unwrap(),
            "--",
            "sleep",
            "1.5",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let log = server.log_text();
    assert!(!log.contains("reaped"), "{log}");
    assert!(log.contains("released the lab"), "{log}");
}

#[test]
fn a_killed_client_is_reaped_after_the_active_timeout() {
    let server = start_with(&[("--active-timeout", "0.5")]);
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(
        &["run", "--url", &server.url(), "--", "sleep", "3"],
        dir.path(),
    );
    wait_until(Duration::from_secs(10), "a session", || {
        sessions(&server) == 1
    });
    // Heartbeats keep it for longer than the timeout while the client lives: four
    // heartbeats answered (at a third of the 0.5 s timeout apart) span more than it...
    wait_until(Duration::from_secs(10), "four heartbeats", || {
        heartbeats_answered(&server) >= 4
    });
    assert_eq!(sessions(&server), 1);
    // ...and SIGKILL stops them: the server reaps it.
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let killed = Instant::now();
    wait_until(Duration::from_secs(5), "the session reaped", || {
        sessions(&server) == 0
    });
    println!("reaped {:?} after the SIGKILL", killed.elapsed());
    assert!(server.log_text().contains("reaped: active"));
}

#[test]
fn sigterm_reaches_the_command_and_the_lab_is_released_within_a_second() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(dir.path(), "nodes: [r1]\n");
    let marker = dir.path().join("got-term");
    let script = format!(
        "trap 'echo term > {}; exit 143' TERM; echo started > {}.started; mkfifo hold; {{ read _ < hold; }} 2>/dev/null",
        marker.display(),
        marker.display()
    );
    let run = Run::start(
        &[
            "run",
            "--url",
            &server.url(),
            "--topology",
            topo.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
        dir.path(),
    );
    let started = dir.path().join("got-term.started");
    wait_until(Duration::from_secs(10), "the command started", || {
        started.exists()
    });
    let sent = Instant::now();
    run.signal(Signal::TERM);
    let (code, stderr) = run.finish(Duration::from_secs(5));
    let took = sent.elapsed();
    assert_eq!(code, 143, "{stderr}");
    assert_eq!(read(&marker), "term\n");
    assert_eq!(sessions(&server), 0);
    assert!(server.log_text().contains("released the lab (ref_count 0)"));
    println!("SIGTERM to released and ended: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn a_pool_picks_the_free_host_and_skips_an_unreachable_one() {
    let busy = start();
    let free = start();
    busy.create_session();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("url");
    let script = format!("echo \"$REMOTE_LAB_URL\" > {}", out.display());
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            "http://127.0.0.1:1",
            "--url",
            &format!("{},{}", busy.url(), free.url()),
            "--",
            "sh",
            "-c",
            &script,
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&out).trim(), free.url());
    assert!(
        stderr.contains("warning: http://127.0.0.1:1 skipped"),
        "{stderr}"
    );
    assert_eq!(sessions(&busy), 1);
    assert_eq!(sessions(&free), 0);
    // REMOTE_LAB_URL with several hosts works the same; ties go to the first given.
    let other = start();
    let (code, stderr) = {
        let mut command = client(&["run", "--", "sh", "-c", &script], dir.path());
        command.env("REMOTE_LAB_URL", format!("{} {}", other.url(), free.url()));
        let output = command.output().unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&out).trim(), other.url());
}

#[test]
fn exit_statuses() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let cmd = |extra: &[&str], command: &[&str]| -> (i32, String) {
        let mut args = vec!["run", "--url", url.as_str()];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(command);
        run(&args, dir.path())
    };
    // The command's own status, and 128+N for a signal.
    assert_eq!(cmd(&[], &["sh", "-c", "exit 3"]).0, 3);
    assert_eq!(cmd(&[], &["true"]).0, 0);
    assert_eq!(
        cmd(
            &[],
            &[
                "python3",
                "-c",
                "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
            ]
        )
        .0,
        137
    );
    assert_eq!(cmd(&[], &["/nonexistent/command"]).0, 127);
    // 65: netlab rejected the topology.
    let bad = topology(dir.path(), "fake: reject\n");
    let (code, stderr) = cmd(&["--topology", bad.to_str().unwrap()], &["true"]);
    assert_eq!(code, 65, "{stderr}");
    assert!(stderr.contains("netlab rejected the topology"), "{stderr}");
    // 70: netlab up failed.
    server.set_control("up.fail", r#"{"code": 1, "stdout": "", "stderr": "boom"}"#);
    let good = dir.path().join("good.yml");
    std::fs::write(&good, "nodes: [r1]\n").unwrap();
    let (code, stderr) = cmd(&["--topology", good.to_str().unwrap()], &["true"]);
    assert_eq!(code, 70, "{stderr}");
    server.clear_control("up.fail");
    assert_eq!(sessions(&server), 0);
    // 75: the wait timed out; the session is ended.
    let (holder, _) = server.create_session();
    let started = Instant::now();
    let (code, stderr) = cmd(&["--wait-timeout", "0.5"], &["true"]);
    assert_eq!(code, 75, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sessions(&server), 1);
    server
        .delete(&format!("/session/{holder}"))
        .expect_empty(204);
    // 69: nothing reachable, or every host refused a session.
    assert_eq!(
        run(
            &["run", "--url", "http://127.0.0.1:1", "--", "true"],
            dir.path()
        )
        .0,
        69
    );
    let full = start_with(&[("--max-sessions", "1")]);
    full.create_session();
    let (code, stderr) = run(&["run", "--url", &full.url(), "--", "true"], dir.path());
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    // 64: a bad command line.
    assert_eq!(run(&["run", "--url", &url], dir.path()).0, 64);
    assert_eq!(run(&["run", "--", "true"], dir.path()).0, 64);
    assert_eq!(run(&["frobnicate"], dir.path()).0, 64);
    // A topology that cannot be read costs no session.
    let created = server.log_text().matches(" created").count();
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            &url,
            "--topology",
            "missing.yml",
            "--",
            "true",
        ],
        dir.path(),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("missing.yml"), "{stderr}");
    assert_eq!(server.log_text().matches(" created").count(), created);
}

#[test]
fn a_session_ended_by_someone_else_terminates_the_command_and_exits_75() {
    let server = start_with(&[("--active-timeout", "0.6")]);
    let dir = tempfile::tempdir().unwrap();
    let id_file = dir.path().join("id");
    let marker = dir.path().join("got-term");
    let script = format!(
        "trap 'echo term > {}; exit 143' TERM; echo \"$REMOTE_LAB_SESSION_ID\" > {}; mkfifo hold; {{ read _ < hold; }} 2>/dev/null",
        marker.display(),
        id_file.display()
    );
    let run = Run::start(
        &["run", "--url", &server.url(), "--", "sh", "-c", &script],
        dir.path(),
    );
    lose_the_session(&server, run, &id_file, Duration::from_secs(5));
    assert_eq!(read(&marker), "term\n");
}

#[test]
fn status_shows_each_host() {
    let server = start();
    let r = server.request("POST", "/session", &[("X-Client-Name", "nightly-42")], b"");
    assert_eq!(r.status, 201);
    let holder = r.json()["session_id"].as_str().unwrap().to_owned();
    let r = server.acquire(&holder, &Form::topology("ospf.yml", "nodes: [r1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    server.create_session();
    let dir = tempfile::tempdir().unwrap();
    let output = client(
        &[
            "status",
            "--url",
            &server.url(),
            "--url",
            "http://127.0.0.1:1",
            "--json",
        ],
        dir.path(),
    )
    .stdout(Stdio::piped())
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(69));
    let hosts: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(hosts[0]["url"], server.url());
    assert_eq!(hosts[0]["reachable"], true);
    assert_eq!(hosts[0]["queue"]["total"], 2);
    assert_eq!(
        hosts[0]["queue"]["sessions"][0]["client_name"],
        "nightly-42"
    );
    assert_eq!(hosts[1]["reachable"], false);
    let output = client(&["status", "--url", &server.url()], dir.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8(output.stdout).unwrap();
    let row = text.lines().nth(1).unwrap();
    assert!(row.starts_with(&server.url()), "{text}");
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[1..5], ["ok", "2", "1", "nightly-42"], "{text}");
    assert!(row.ends_with("up (ospf.yml, 1 ref)"), "{text}");
}

#[test]
fn tokens_and_netrc_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ci:s3cret-token-value-0123456789\n").unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let server = start_with(&[("--token-file", tokens.to_str().unwrap())]);
    let url = server.url();
    // No credentials: the host answers 401, is named, and no host is left: 77.
    let (code, stderr) = run(&["run", "--url", &url, "--", "true"], dir.path());
    assert_eq!(code, 77, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{url} REJECTED THE CREDENTIALS (401 Not authenticated)"
        )),
        "{stderr}"
    );
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            &url,
            "--token",
            "s3cret-token-value-0123456789",
            "--",
            "true",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    std::fs::write(
        dir.path().join("no-netrc"),
        "machine 127.0.0.1 login ci password s3cret-token-value-0123456789\n",
    )
    .unwrap();
    let (code, stderr) = run(&["run", "--url", &url, "--", "true"], dir.path());
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let output = client(&["--help"], dir.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).unwrap();
    for code in ["64", "65", "69", "70", "75", "128+N"] {
        assert!(help.contains(code), "{code}");
    }
    let output = client(&["--version"], dir.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("remote-lab {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn on_lost_warn_lets_the_command_finish_and_still_exits_75() {
    let server = start_with(&[("--active-timeout", "0.6")]);
    let dir = tempfile::tempdir().unwrap();
    let id_file = dir.path().join("id");
    let done = dir.path().join("done");
    let script = format!(
        "echo \"$REMOTE_LAB_SESSION_ID\" > {}; sleep 1; echo finished > {}",
        id_file.display(),
        done.display()
    );
    let run = Run::start(
        &[
            "run",
            "--url",
            &server.url(),
            "--on-lost",
            "warn",
            "--",
            "sh",
            "-c",
            &script,
        ],
        dir.path(),
    );
    lose_the_session(&server, run, &id_file, Duration::from_secs(10));
    assert_eq!(read(&done), "finished\n");
}

#[test]
fn a_signal_while_waiting_ends_the_session() {
    let server = start();
    server.create_session();
    let dir = tempfile::tempdir().unwrap();
    let run = Run::start(&["run", "--url", &server.url(), "--", "true"], dir.path());
    wait_until(Duration::from_secs(10), "queued", || sessions(&server) == 2);
    wait_until(Duration::from_secs(10), "its long-poll parked", || {
        long_polls(&server) >= 1
    });
    let sent = Instant::now();
    run.signal(Signal::TERM);
    let (code, stderr) = run.finish(Duration::from_secs(5));
    assert_eq!(code, 128 + 15, "{stderr}");
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(sessions(&server), 1);
}

/// A server of the Python kind for the parts the client uses: no long-poll (it answers
/// `GET /session/{id}` at once, whatever `wait` says), no `GET /queue`. The session is
/// waiting for its first `waiting_polls` polls. Returns the URL and the poll times.
fn server_without_long_poll(waiting_polls: usize) -> (String, Arc<Mutex<Vec<Instant>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let polls = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&polls);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let (method, path) = {
                        let mut parts = line.split_whitespace();
                        (
                            parts.next().unwrap_or("").to_owned(),
                            parts.next().unwrap_or("").to_owned(),
                        )
                    };
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).unwrap();
                        if header.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    std::io::Read::read_exact(&mut reader, &mut vec![0; length]).unwrap();
                    let (status, body) = match (method.as_str(), path.as_str()) {
                        ("GET", "/debug/health") => {
                            (200, r#"{"status":"ok","queue_length":1}"#.to_owned())
                        }
                        ("POST", "/session") => (
                            201,
                            r#"{"session_id":"00000000-0000-4000-8000-000000000001","position":1}"#
                                .to_owned(),
                        ),
                        ("GET", p) if p.starts_with("/session/00000000") => {
                            let mut seen = seen.lock().unwrap();
                            seen.push(Instant::now());
                            if seen.len() <= waiting_polls {
                                (200, r#"{"status":"waiting","position":1}"#.to_owned())
                            } else {
                                (200, r#"{"status":"active","position":0}"#.to_owned())
                            }
                        }
                        ("POST", "/session/heartbeat") | ("DELETE", _) => (204, String::new()),
                        _ => (404, r#"{"detail":"Not Found"}"#.to_owned()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n",
                        body.len()
                    );
                    if writer.write_all(head.as_bytes()).is_err()
                        || writer.write_all(body.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, polls)
}

#[test]
fn against_a_server_without_long_poll_it_polls_every_two_seconds_and_prints_once() {
    let (url, polls) = server_without_long_poll(2);
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run(&["run", "--url", &url, "--", "true"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let polls = polls.lock().unwrap().clone();
    assert_eq!(polls.len(), 3, "{stderr}");
    for pair in polls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1900) && gap < Duration::from_millis(3000),
            "{gap:?}"
        );
    }
    // One line for the position, not one per poll.
    assert_eq!(
        stderr.matches("waiting at position 1").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn on_a_terminal_the_progress_line_is_updated_in_place() {
    // util-linux `script` gives remote-lab a terminal; its output is the terminal's.
    if Command::new("script").arg("--version").output().is_err() {
        panic!("this test needs util-linux's `script` (apt-get install bsdutils)");
    }
    let server = start();
    let (holder, _) = server.create_session();
    let dir = tempfile::tempdir().unwrap();
    let typescript = dir.path().join("typescript");
    let inner = format!("{CLIENT} run --url {} --name tty-job -- true", server.url());
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &inner])
        .arg(&typescript)
        .current_dir(dir.path())
        .env_remove("REMOTE_LAB_URL")
        .env("NETRC", dir.path().join("no-netrc"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "queued", || sessions(&server) == 2);
    wait_until(Duration::from_secs(10), "its long-poll parked", || {
        long_polls(&server) >= 1
    });
    server
        .delete(&format!("/session/{holder}"))
        .expect_empty(204);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "remote-lab under script did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let text = read(&typescript);
    // The waiting line and the "active" line share one terminal line: rewritten with
    // carriage return and erase-line, then ended by one newline.
    let waiting = text
        .find("\r\x1b[Kremote-lab: waiting at position 1")
        .expect(&text);
    let active = text.find("\r\x1b[Kremote-lab: session ").expect(&text);
    assert!(waiting < active, "{text:?}");
    assert!(!text[waiting..active].contains('\n'), "{text:?}");
}

// ------------------------------------------------------------------------------ hostile hosts

/// `tests/hostile-lab/server.py MODE`: a lab host that attacks its client.
struct Hostile {
    child: Child,
    url: String,
}

impl Hostile {
    fn start(mode: &str) -> Hostile {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile-lab/server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the hostile server's port");
        Hostile {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nothing a terminal would act on: no ESC, BEL, C1 control, DEL, bidi override, and
/// valid UTF-8.
fn assert_inert(bytes: &[u8], what: &str) {
    let text = std::str::from_utf8(bytes).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"));
    for (at, c) in text.char_indices() {
        let bad = (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        assert!(
            !bad,
            "{what}: {c:?} at {at}: {:?}",
            &text[at.saturating_sub(60)..(at + 60).min(text.len())]
        );
    }
}

/// Runs `remote-lab ARGS` under a Python parent that reports its peak memory: exit code,
/// stderr (from a file: it may be large), peak RSS in KiB.
fn run_measured(args: &[&str], dir: &Path) -> (i32, Vec<u8>, u64) {
    let err = dir.join("stderr");
    let wrapper = "import resource, subprocess, sys\n\
                   with open(sys.argv[1], 'wb') as err:\n\
                   \x20   code = subprocess.run(sys.argv[2:], stderr=err, stdin=subprocess.DEVNULL).returncode\n\
                   print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n";
    let output = Command::new("python3")
        .arg("-c")
        .arg(wrapper)
        .arg(&err)
        .arg(CLIENT)
        .args(args)
        .current_dir(dir)
        .env_remove("REMOTE_LAB_URL")
        .env_remove("REMOTE_LAB_TOKEN")
        .env("NETRC", dir.join("no-netrc"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let mut words = text.split_whitespace();
    let code = words.next().unwrap().parse().unwrap();
    let rss = words.next().unwrap().parse().unwrap();
    (code, std::fs::read(&err).unwrap(), rss)
}

#[test]
fn a_hostile_server_reaches_the_terminal_with_nothing_raw_and_memory_stays_bounded() {
    let hostile = Hostile::start("escapes");
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(dir.path(), "nodes: [r1]\n");
    let (code, stderr, rss_kib) = run_measured(
        &[
            "run",
            "--url",
            &hostile.url,
            "--topology",
            topo.to_str().unwrap(),
            "--",
            "true",
        ],
        dir.path(),
    );
    let head = String::from_utf8_lossy(&stderr[..stderr.len().min(3000)]).into_owned();
    assert_eq!(code, 0, "{head}");
    assert_inert(&stderr, "run's stderr");
    let text = String::from_utf8(stderr).unwrap();
    // Every hostile field was printed, cleaned: the holder, netlab's lines (the invalid
    // UTF-8 decoded lossily, the live log going on after it), the release's detail.
    assert!(text.contains("held by holder\u{FFFD}]0;pwned"), "{head}");
    assert!(text.contains("netlab| deploying \u{FFFD}"), "{head}");
    assert!(
        text.contains("netlab| bad \u{FFFD}\u{FFFD} bytes \u{FFFD}\n"),
        "{head}"
    );
    assert!(
        text.contains("releasing the lab: 500 release failed\u{FFFD}"),
        "{head}"
    );
    // The endless line: cut into bounded pieces (how many arrive before the read's
    // timeout depends on the machine's load).
    let cut = text.matches(" [line cut at 64 KiB]\n").count();
    assert!(cut >= 1, "{head}");
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest <= 64 * 1024 + 100, "{longest}");
    println!("peak RSS of remote-lab reading a 24 MiB line: {rss_kib} KiB");
    assert!(rss_kib < 40 * 1024, "{rss_kib} KiB");

    // `status`: the table and the JSON.
    let unhealthy = Hostile::start("unhealthy");
    for json in [false, true] {
        let mut args = vec!["status", "--url", &hostile.url, "--url", &unhealthy.url];
        if json {
            args.push("--json");
        }
        let output = client(&args, dir.path())
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0));
        assert_inert(&output.stdout, "status");
        assert_inert(&output.stderr, "status's stderr");
        let out = String::from_utf8(output.stdout).unwrap();
        if json {
            let hosts: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(hosts[1]["state"], "unhealthy", "{out}");
            // The server's strings arrive whole, escaped.
            assert!(
                hosts[0]["queue"]["sessions"][0]["client_name"]
                    .as_str()
                    .unwrap()
                    .starts_with("holder\x1b]0;pwned\x07"),
                "{out}"
            );
        } else {
            let rows: Vec<&str> = out.lines().collect();
            assert!(rows[1].starts_with(&hostile.url), "{out}");
            assert!(rows[1].contains(" ok "), "{out}");
            assert!(rows[1].contains("holder\u{FFFD}]0;pwned"), "{out}");
            assert!(
                out.contains("unhealthy: containerlab failed\u{FFFD}"),
                "{out}"
            );
            assert!(out.contains("slot 1 (1\u{FFFD}"), "{out}");
        }
    }
}

#[test]
fn heartbeats_refused_past_the_active_timeout_lose_the_session_and_stop_the_command() {
    // Every heartbeat answered 429: the server would reap the session after its active
    // timeout (0.5 s) while the command still ran.
    let hostile = Hostile::start("heartbeat429");
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("got-term");
    let script = format!(
        "trap 'echo term > {}; exit 143' TERM; mkfifo hold; {{ read _ < hold; }} 2>/dev/null",
        marker.display()
    );
    let (code, stderr) = Run::start(
        &["run", "--url", &hostile.url, "--", "sh", "-c", &script],
        dir.path(),
    )
    .finish(Duration::from_secs(20));
    assert_eq!(code, 75, "{stderr}");
    assert!(
        stderr.contains("SESSION LOST: heartbeats failed for"),
        "{stderr}"
    );
    assert!(stderr.contains("429 Too many failures\u{FFFD}"), "{stderr}");
    assert_eq!(read(&marker), "term\n");
    assert_inert(stderr.as_bytes(), "stderr");
}

// ------------------------------------------------------------------------------ the command

#[test]
fn sigkill_of_remote_lab_leaves_no_command_running() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // The command waits at a gate nobody opens (no timer): only a signal ends it.
    let never = gate(dir.path(), "never");
    let script = format!(
        "echo $$ > {}.tmp; mv {0}.tmp {0}; exec cat {}",
        pid_file.display(),
        never.display()
    );
    let mut run = Run::start(
        &["run", "--url", &server.url(), "--", "sh", "-c", &script],
        dir.path(),
    );
    wait_until(Duration::from_secs(10), "the command started", || {
        pid_file.exists()
    });
    let pid: u32 = read(&pid_file).trim().parse().unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    // Gone, or a zombie waiting for its new parent to reap it: not running.
    wait_until(
        Duration::from_secs(5),
        "the command gone",
        || match std::fs::read_to_string(proc_dir.join("stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        },
    );
}

#[test]
fn the_devices_file_is_private_and_not_at_a_predictable_path() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let topo = topology(dir.path(), "nodes: [r1]\n");
    let out = dir.path().join("out");
    let script = format!(
        "stat -c '%a %F' \"$REMOTE_LAB_DEVICES\" >> {o}; echo \"$REMOTE_LAB_DEVICES\" >> {o}",
        o = out.display()
    );
    let mut paths = Vec::new();
    for _ in 0..2 {
        let output = client(
            &[
                "run",
                "--url",
                &server.url(),
                "--topology",
                topo.to_str().unwrap(),
                "--",
                "sh",
                "-c",
                &script,
            ],
            dir.path(),
        )
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = read(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[lines.len() - 2], "600 regular file", "{text}");
        let path = PathBuf::from(lines[lines.len() - 1]);
        assert_eq!(path.parent(), Some(tmp.as_path()), "{text}");
        // Removed at the end.
        assert!(!path.exists());
        paths.push(path);
    }
    assert_ne!(paths[0], paths[1]);
    let name = paths[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("remote-lab-") && name.ends_with("-devices.json"));
    // Nothing of the name is the pid: it is random.
    let middle = &name["remote-lab-".len()..name.len() - "-devices.json".len()];
    assert!(middle.parse::<u32>().is_err(), "{name}");
}

#[test]
fn a_non_ascii_name_arrives_percent_encoded_and_the_server_shows_it_decoded() {
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let go = gate(dir.path(), "go");
    let script = format!(
        "touch {}; cat {} > /dev/null",
        started.display(),
        go.display()
    );
    let name = "café ☕ job 100%";
    let run = Run::start(
        &[
            "run",
            "--url",
            &server.url(),
            "--name",
            name,
            "--",
            "sh",
            "-c",
            &script,
        ],
        dir.path(),
    );
    wait_until(Duration::from_secs(10), "the command started", || {
        started.exists()
    });
    let queue = server.get("/queue").json();
    assert_eq!(queue["sessions"][0]["client_name"], name);
    open_gate(&go);
    let (code, stderr) = run.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
}

// ------------------------------------------------------------------------------ credentials

/// A server with its own token file (`ci:TOKEN`).
fn server_with_token(dir: &Path, name: &str, token: &str) -> TestServer {
    let tokens = dir.join(name);
    std::fs::write(&tokens, format!("ci:{token}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    start_with(&[("--token-file", tokens.to_str().unwrap())])
}

#[test]
fn credentials_per_host_from_netrc_and_a_host_that_rejects_them() {
    let dir = tempfile::tempdir().unwrap();
    let one = server_with_token(dir.path(), "tokens1", "token-of-host-one-0123456789");
    let two = server_with_token(dir.path(), "tokens2", "token-of-host-two-0123456789");
    // The same machine under two names: the netrc tells them apart.
    let url_one = one.url();
    let url_two = two.url().replace("127.0.0.1", "localhost");
    let netrc = |password_two: &str| {
        std::fs::write(
            dir.path().join("no-netrc"),
            format!(
                "# one token per host\n\
                 machine 127.0.0.1 login ci password \"token-of-host-one-0123456789\"\n\
                 machine localhost\n  login ci\n  password {password_two}\n"
            ),
        )
        .unwrap();
    };
    netrc("token-of-host-two-0123456789");
    let urls = format!("{url_one},{url_two}");
    // Two jobs held at once: one on each host.
    let job = |n: u32| {
        let script = format!(
            "echo \"$REMOTE_LAB_URL\" > {d}/url{n}; cat {g} > /dev/null",
            d = dir.path().display(),
            g = gate(dir.path(), &format!("go{n}")).display()
        );
        Run::start(
            &["run", "--url", &urls, "--", "sh", "-c", &script],
            dir.path(),
        )
    };
    let first = job(1);
    wait_until(Duration::from_secs(10), "job 1 started", || {
        read(&dir.path().join("url1")).ends_with('\n')
    });
    let second = job(2);
    wait_until(Duration::from_secs(10), "job 2 started", || {
        read(&dir.path().join("url2")).ends_with('\n')
    });
    for n in [1, 2] {
        open_gate(&dir.path().join(format!("go{n}")));
    }
    for run in [first, second] {
        let (code, stderr) = run.finish(Duration::from_secs(10));
        assert_eq!(code, 0, "{stderr}");
        assert!(!stderr.contains("REJECTED"), "{stderr}");
    }
    let mut used = [
        read(&dir.path().join("url1")),
        read(&dir.path().join("url2")),
    ];
    used.sort();
    let mut expected = [format!("{url_one}\n"), format!("{url_two}\n")];
    expected.sort();
    assert_eq!(used, expected);

    // Host two's token is wrong: the run names it and uses host one.
    netrc("wrong-token-000000000000000000");
    let out = dir.path().join("url");
    let script = format!("echo \"$REMOTE_LAB_URL\" > {}", out.display());
    let (code, stderr) = run(
        &["run", "--url", &urls, "--", "sh", "-c", &script],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&out).trim(), url_one);
    assert!(
        stderr.contains(&format!(
            "{url_two} REJECTED THE CREDENTIALS (401 Not authenticated) of its ~/.netrc entry"
        )),
        "{stderr}"
    );
    // `status` names it too, and fails.
    let output = client(&["status", "--url", &urls], dir.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(77));
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&url_two) && l.contains("rejected credentials: 401")),
        "{table}"
    );

    // Both wrong: 77. The token of the URL beats the netrc; --token only fills in.
    let (code, stderr) = run(
        &[
            "run",
            "--url",
            &format!(
                "{},{url_two}",
                url_one.replace("://", "://ci:bad-token-00000000000@")
            ),
            "--",
            "true",
        ],
        dir.path(),
    );
    assert_eq!(code, 77, "{stderr}");
    assert!(stderr.contains("given in its URL"), "{stderr}");
    assert!(!stderr.contains("bad-token"), "{stderr}");
}

// ------------------------------------------------------------------------------ late binding

/// The sessions a host's `/queue` lists, by client name (`None`: unnamed).
fn queue_names(server: &TestServer) -> Vec<Option<String>> {
    server.get("/queue").json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["client_name"].as_str().map(str::to_owned))
        .collect()
}

/// A late-binding job queued on both hosts, each held by the test.
fn queued_on_both(one: &TestServer, two: &TestServer, dir: &Path, out: &Path) -> Run {
    let script = format!("echo \"$REMOTE_LAB_URL\" > {}", out.display());
    let run = Run::start(
        &[
            "run",
            "--url",
            &format!("{},{}", one.url(), two.url()),
            "--choices",
            "2",
            "--name",
            "late",
            "--",
            "sh",
            "-c",
            &script,
        ],
        dir,
    );
    wait_until(Duration::from_secs(10), "queued on both hosts", || {
        one.get("/debug/health").json()["long_polls"] == 1
            && two.get("/debug/health").json()["long_polls"] == 1
    });
    run
}

#[test]
fn late_binding_starts_on_the_host_that_frees_first_and_leaves_nothing_on_the_other() {
    let (one, two) = (start(), start());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("url");
    let (long, _) = one.create_session();
    let (short, _) = two.create_session();
    let run = queued_on_both(&one, &two, dir.path(), &out);
    assert_eq!(queue_names(&one), [None, Some("late".to_owned())]);
    assert_eq!(queue_names(&two), [None, Some("late".to_owned())]);
    // Host two's test ends first.
    two.delete(&format!("/session/{short}")).expect_empty(204);
    let (code, stderr) = run.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&out).trim(), two.url());
    // Its place on host one was given up at once: only the long test is there.
    assert_eq!(queue_names(&one), [None]);
    assert_eq!(sessions(&two), 0);
    assert!(one.log_text().contains(" ended"), "{}", one.log_text());
    one.delete(&format!("/session/{long}")).expect_empty(204);

    // Both free at the same moment: one is kept, the other ended.
    let (a, _) = one.create_session();
    let (b, _) = two.create_session();
    let run = queued_on_both(&one, &two, dir.path(), &out);
    let ends = [
        (&one, format!("/session/{a}")),
        (&two, format!("/session/{b}")),
    ];
    std::thread::scope(|scope| {
        for (server, path) in &ends {
            scope.spawn(move || server.delete(path).expect_empty(204));
        }
    });
    let (code, stderr) = run.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    let chosen = read(&out).trim().to_owned();
    assert!(chosen == one.url() || chosen == two.url(), "{chosen}");
    assert_eq!(sessions(&one) + sessions(&two), 0);
}

#[test]
fn sigterm_while_queued_on_two_hosts_ends_both_sessions() {
    let (one, two) = (start(), start());
    let dir = tempfile::tempdir().unwrap();
    one.create_session();
    two.create_session();
    let run = queued_on_both(&one, &two, dir.path(), &dir.path().join("url"));
    run.signal(Signal::TERM);
    let (code, stderr) = run.finish(Duration::from_secs(10));
    assert_eq!(code, 128 + 15, "{stderr}");
    assert_eq!(queue_names(&one), [None]);
    assert_eq!(queue_names(&two), [None]);
}

/// Heartbeats the server has answered 2xx (from `/metrics`).
fn heartbeats_answered(server: &TestServer) -> u64 {
    let metrics = server.get("/metrics").text();
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"neops_remote_lab_http_requests_total{route="/session/heartbeat",code="2xx"} "#,
            )
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Long-polls parked in the server right now (from `/debug/health`).
fn long_polls(server: &TestServer) -> u64 {
    server.get("/debug/health").json()["long_polls"]
        .as_u64()
        .unwrap_or(0)
}

/// A FIFO in `dir` that a command waits at with `cat GATE` (no polling), until
/// [`open_gate`].
fn gate(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let made = Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
    path
}
