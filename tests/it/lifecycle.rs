//! Start-up, shutdown, the state-dir lock and the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const TOPO: &str = "nodes: [r1, r2]\n";

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn help_and_version() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--host",
        "--port",
        "--workers",
        "--state-dir",
        "--active-timeout",
        "--waiting-timeout",
        "--sweep-interval",
        "--max-sessions",
        "--log-level",
        "--log-file",
        "--debug",
        "--log-config",
        "--netlab",
        "--netlab-timeout",
        "--max-upload-bytes",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        let var = format!(
            "NEOPS_REMOTE_LAB_{}",
            flag[2..].to_uppercase().replace('-', "_")
        );
        assert!(help.contains(&var), "{var} missing from --help");
    }
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("neops-remote-lab {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_values_exit_2_naming_the_flag() {
    for (args, needle) in [
        (vec!["--port", "eighty"], "--port"),
        (vec!["--active-timeout", "0"], "--active-timeout"),
        (vec!["--log-level", "chatty"], "--log-level"),
        (vec!["--frobnicate"], "--frobnicate"),
        (vec!["--max-sessions", "-3"], "--max-sessions"),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = Command::new(BIN)
        .env("NEOPS_REMOTE_LAB_PORT", "99999")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NEOPS_REMOTE_LAB_PORT (--port)"));
}

#[test]
fn environment_variables_configure_the_server() {
    let dir = test_dir();
    let mut child = server_command()
        .env("NEOPS_REMOTE_LAB_HOST", "127.0.0.1")
        .env("NEOPS_REMOTE_LAB_PORT", "0")
        .env("NEOPS_REMOTE_LAB_STATE_DIR", dir.path().join("state"))
        .env("NEOPS_REMOTE_LAB_NETLAB", fake_netlab())
        .env("NEOPS_REMOTE_LAB_MAX_SESSIONS", "1")
        .env("FAKE_NETLAB_DIR", dir.path().join("fake"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _log) = wait_for_listening(&mut child);
    assert_eq!(request(addr, "POST", "/session", &[], b"").status, 201);
    assert_eq!(request(addr, "POST", "/session", &[], b"").status, 503);
    assert!(dir.path().join("state/neops-remote-lab.lock").exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_second_instance_on_the_same_state_dir_is_refused() {
    let s = start();
    let out = TestServer::command(s.dir.path(), &Options::default())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!("pid {}", s.child.id())),
        "stderr: {err}"
    );
    // The first one is unharmed.
    s.get("/healthz").expect_empty(204);
}

#[test]
fn a_lock_left_by_a_killed_server_does_not_block_a_restart() {
    let s = start();
    let dir = s.kill_keep_dir();
    let s = start_in(dir);
    s.get("/healthz").expect_empty(204);
}

#[test]
fn a_missing_netlab_stops_the_start_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--netlab",
            "/nonexistent/netlab",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("netlab is missing or broken"), "{err}");
    assert!(err.contains("pip install networklab"), "{err}");
    assert!(!err.contains("listening on"), "{err}");
}

#[test]
fn a_broken_netlab_stops_the_start() {
    let dir = test_dir();
    std::fs::write(
        dir.path().join("fake/control/version.fail"),
        r#"{"code": 1, "stderr": "ModuleNotFoundError: No module named 'netsim'"}"#,
    )
    .unwrap();
    let out = TestServer::command(dir.path(), &Options::default())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("No module named 'netsim'"), "{err}");
}

/// A test dir where netlab's `default` instance, of node r1, is registered in `lab_dir`
/// (left by a crash, as far as the next server can tell).
fn registered_leftover(lab_dir: impl Fn(&Path) -> PathBuf, name: &str) -> tempfile::TempDir {
    let dir = test_dir();
    std::fs::write(
        dir.path().join("fake/instance.json"),
        serde_json::json!({"dir": lab_dir(dir.path()), "nodes": ["r1"], "name": name}).to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn start_up_clears_a_leftover_default_instance_and_old_work_dirs() {
    let dir = registered_leftover(|dir| dir.join("state/labs/old"), "old");
    let old_lab = dir.path().join("state/labs/old");
    std::fs::create_dir_all(&old_lab).unwrap();
    std::fs::write(old_lab.join("t.yml"), TOPO).unwrap();
    // What `netlab up` leaves in a lab's directory, and netlab's `down` needs.
    std::fs::write(old_lab.join("netlab.snapshot.pickle"), "fake").unwrap();
    std::fs::write(old_lab.join("clab.yml"), "name: old\n").unwrap();
    let s = start_in(dir);
    // The leftover is in our labs/: ours to tear down.
    assert_eq!(
        s.call_lines(),
        [
            "version",
            "status --all --format json",
            "down --instance default --cleanup"
        ]
    );
    assert_eq!(s.registered(), None);
    assert!(s.work_dirs().is_empty());
}

#[test]
fn start_up_resets_a_registration_whose_directory_is_gone() {
    let dir = registered_leftover(|_| PathBuf::from("/nonexistent/lab"), "gone");
    let s = start_in(dir);
    assert_eq!(
        s.call_lines(),
        [
            "version",
            "status --all --format json",
            "down --instance default --cleanup",
            "status --reset"
        ]
    );
    assert_eq!(s.registered(), None);
    // And the lab works.
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
}

#[test]
fn sigterm_with_a_lab_up_tears_it_down_and_exits_0() {
    let mut s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let work = s.work_dirs();
    assert_eq!(work.len(), 1);
    s.clear_calls();
    s.signal(Signal::TERM);
    let status = s.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert_eq!(s.call_lines(), ["down --cleanup"]);
    assert_eq!(s.calls()[0].1, work[0].display().to_string());
    assert_eq!(s.registered(), None);
    assert!(s.work_dirs().is_empty());
}

#[test]
fn sigterm_during_netlab_up_cuts_it_short_and_cleans_up() {
    let mut s = start();
    let (a, _) = s.create_session();
    s.set_control("up.sleep", "30");
    let acquire = s.acquire_during_up(&a, Form::topology("t.yml", TOPO));
    s.signal(Signal::INT);
    // The request in flight gets a clear answer before the server exits.
    acquire
        .join()
        .unwrap()
        .expect(503, r#"{"detail":"Server is shutting down"}"#);
    let status = s.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    // `up` was cut short before netlab made anything: nothing to tear down, and no
    // `down --force` that could only fail.
    assert!(
        !s.call_lines()
            .iter()
            .any(|l| l.starts_with("down --cleanup")),
        "{:?}",
        s.call_lines()
    );
    assert!(s.work_dirs().is_empty());
    assert!(s.log_text().contains("cut short"), "{}", s.log_text());
}

#[test]
fn sigterm_with_only_sessions_exits_promptly() {
    let mut s = start();
    s.create_session();
    s.create_session();
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    // No lab, so no teardown ran.
    assert!(!s.call_lines().iter().any(|l| l == "down --cleanup"));
}

#[test]
fn log_file_gets_the_events_with_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let s = start_with(&[("--log-file", log.to_str().unwrap())]);
    let (a, _) = s.create_session();
    s.delete(&format!("/session/{a}")).expect_empty(204);
    wait_until(Duration::from_secs(5), "the log file", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&format!("session {a} ended")))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("created and active"))
        .unwrap();
    // RFC 3339 timestamp first.
    assert!(line.starts_with("20"), "{line}");
    assert!(
        !s.log_text().contains('\u{1b}'),
        "no colour escapes on a pipe"
    );
}

/// Every line of the log is an event with time and level, a `netlab| ` line quoting
/// netlab, or the start-up contract line `listening on http://…` (which is also logged as
/// an event). netlab's chatter is debug-level; counts are spelled right.
#[test]
fn the_log_is_one_event_per_line_and_netlab_output_is_marked() {
    for level in ["info", "debug"] {
        let mut s = start_with(&[("--log-level", level), ("--workers", "1")]);
        let (a, _) = s.create_session();
        s.set_control(
            "up.fail",
            r#"{"code": 1, "stderr": "first line\nsecond line\n"}"#,
        );
        assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 500);
        s.signal(Signal::TERM);
        assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
        let log = s.log_text();
        let listening = format!("listening on http://{}", s.addr);
        for line in log.lines() {
            let event = line.len() > 9
                && line.as_bytes()[2] == b':'
                && ["[ERROR] ", "[WARN] ", "[INFO] ", "[DEBUG] ", "[TRACE] "]
                    .iter()
                    .any(|l| line[9..].starts_with(l));
            assert!(
                event || line.starts_with("netlab| ") || line == listening,
                "{level}: unmarked line {line:?} in\n{log}"
            );
        }
        assert!(log.contains(&format!("[INFO] {listening}\n")), "{log}");
        assert!(
            log.contains("[INFO] using netlab version 26.10 (fake) ("),
            "{log}"
        );
        assert!(log.contains("serving with 1 worker;"), "{log}");
        assert!(
            log.contains("first line\nnetlab| second line\n"),
            "{level}: {log}"
        );
        assert_eq!(
            log.contains("[DEBUG] netlab| networklab 26.10 (fake)"),
            level == "debug",
            "{log}"
        );
        assert!(!log.contains("[INFO] netlab|"), "{log}");
    }
}
