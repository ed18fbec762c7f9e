//! Restarts lose nothing: the state file, re-adoption of the lab, `--on-exit`, `cleanup`.
//! Most tests `kill -9` the server (no clean stop) and start it again on the same state dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const TOPO: &str = "nodes: [r1, r2]\n";

fn restart(dir: tempfile::TempDir, args: &[(&str, &str)]) -> TestServer {
    let mut options = Options::default().in_dir(dir);
    for (flag, value) in args {
        options = options.arg(flag, value);
    }
    TestServer::start(options)
}

fn state_file(s: &TestServer) -> serde_json::Value {
    let text = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn session_ids_in_file(s: &TestServer) -> Vec<String> {
    state_file(s)["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_queue_survives_kill_9() {
    let s = start();
    let ids: Vec<String> = (0..3).map(|_| s.create_session().0).collect();
    let s = restart(s.kill_keep_dir(), &[]);
    s.expect_session(&ids[0], "active", 0);
    s.expect_session(&ids[1], "waiting", 1);
    s.expect_session(&ids[2], "waiting", 2);
    // They promote normally, and new sessions queue behind them.
    s.delete(&format!("/session/{}", ids[0])).expect_empty(204);
    s.expect_session(&ids[1], "active", 0);
    assert_eq!(s.create_session().1, 2);
}

#[test]
fn a_state_write_happens_before_the_answer() {
    let s = start();
    for _ in 0..20 {
        let (id, _) = s.create_session();
        assert!(session_ids_in_file(&s).contains(&id));
        s.delete(&format!("/session/{id}")).expect_empty(204);
        assert!(!session_ids_in_file(&s).contains(&id));
    }
    let text = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
    assert!(text.starts_with("{\"version\":1,"), "{text}");
    assert!(
        text.ends_with(",\"lab\":null,\"starting\":null,\"teardowns\":[]}\n"),
        "what the package's postrm looks for: {text}"
    );
}

/// Whether the package's postrm (`records_a_lab`, run by `sh`) finds that the state file in
/// `state_dir` records a lab.
fn postrm_finds_a_lab(state_dir: &Path) -> bool {
    let postrm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/debian/postrm"),
    )
    .unwrap();
    let start = postrm
        .find("records_a_lab() {")
        .expect("records_a_lab in postrm");
    let end = start + postrm[start..].find("\n}\n").expect("its end") + 3;
    let script = format!("{}\nrecords_a_lab", &postrm[start..end]);
    let status = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("state_dir", state_dir)
        .status()
        .unwrap();
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("records_a_lab exited {other:?}"),
    }
}

/// The purge keeps a state dir whose state file records a lab: the postrm tells by the
/// file's end, and still reads the files of earlier versions (a field per line).
#[test]
fn the_postrm_tells_whether_the_state_file_records_a_lab() {
    let s = start();
    let (a, _) = s.create_session();
    assert!(!postrm_finds_a_lab(&s.state_dir()));
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    assert!(postrm_finds_a_lab(&s.state_dir()));
    // Released and its session gone: the lab stays up, idle, and recorded.
    s.lab("POST", "/lab/release", &a).expect_empty(204);
    s.delete(&format!("/session/{a}")).expect_empty(204);
    assert!(postrm_finds_a_lab(&s.state_dir()));
    drop(s);

    let old = test_dir();
    let state = old.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let lab = r#"{"hash": "00", "work_dir": "/s/labs/a", "topology": "/s/labs/a/t.yml", "ref_count": 1, "devices": []}"#;
    for (lab, recorded) in [("null", false), (lab, true)] {
        std::fs::write(
            state.join("state.json"),
            format!(
                "{{\n\"version\": 1,\n\"sessions\": [],\n\"lab\": {lab},\n\"starting\": null,\n\"teardowns\": []\n}}\n"
            ),
        )
        .unwrap();
        assert_eq!(postrm_finds_a_lab(&state), recorded, "lab {lab}");
    }
    std::fs::remove_file(state.join("state.json")).unwrap();
    assert!(!postrm_finds_a_lab(&state), "no file, no lab");
}

#[test]
fn a_held_lab_is_readopted_without_a_new_netlab_up() {
    let s = start();
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let devices = s.lab("GET", "/lab/devices", &a).text();
    let before = s.lab("GET", "/lab", &a).text();
    let work = s.work_dirs();
    let dir = s.kill_keep_dir();
    std::fs::remove_file(dir.path().join("fake/calls.log")).unwrap();
    let s = restart(dir, &[]);
    s.lab("GET", "/lab/devices", &a).expect(200, &devices);
    s.lab("GET", "/lab", &a).expect(200, &before);
    assert_eq!(s.work_dirs(), work);
    assert_eq!(
        s.call_lines(),
        [
            "version",
            "status --all --format json",
            "inspect -q --format json list(nodes.keys())"
        ]
    );
    s.expect_session(&b, "waiting", 1);
    // The re-adopted lab behaves as before: reuse attaches, ending the session tears it down.
    let r = s.acquire(&a, &Form::topology("again.yml", TOPO));
    assert_eq!(r.json()["reused"], true);
    s.delete(&format!("/session/{a}")).expect_empty(204);
    wait_until(Duration::from_secs(10), "the teardown", || {
        s.registered().is_none() && s.work_dirs().is_empty()
    });
}

/// Kills the fake netlab processes still running, with their process groups (systemd
/// kills the whole cgroup). They are not our children (the server that started them was
/// SIGKILLed), so each one is pinned by a pidfd and signalled only if it still carries this
/// test's `FAKE_NETLAB_DIR`: a logged pid that has exited may belong to anybody by now.
fn kill_netlab_processes(fake_dir: &Path) {
    let text = std::fs::read_to_string(fake_dir.join("calls.log")).unwrap_or_default();
    let marker = format!("FAKE_NETLAB_DIR={}", fake_dir.display());
    let ours = |pid: u32| {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        environ
            .split(|&b| b == 0)
            .any(|var| var == marker.as_bytes())
    };
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let pid = u32::try_from(v["pid"].as_u64().unwrap()).unwrap();
        // Each netlab command leads its own group; a group whose leader is gone or is not
        // ours any more is left alone by the predicate.
        if ours(pid) {
            neops_remote_lab::lab::procgroup::signal_group_members(pid, ours, Signal::KILL)
                .unwrap();
        }
    }
}

#[test]
fn a_start_cut_short_by_kill_9_is_cleaned_and_can_be_retried() {
    let s = start();
    let (a, _) = s.create_session();
    s.set_control("up.sleep", "30");
    let acquire = s.acquire_during_up(&a, Form::topology("t.yml", TOPO));
    let starting = state_file(&s)["starting"].clone();
    assert_eq!(starting["session"], a.as_str());
    let work = PathBuf::from(starting["work_dir"].as_str().unwrap());
    assert!(work.is_dir());
    // The server first (killed second, it could see its `up` die and clean up the start).
    let dir = s.kill_keep_dir();
    kill_netlab_processes(&dir.path().join("fake"));
    let _ = acquire.join();
    std::fs::remove_file(dir.path().join("fake/control/up.sleep")).unwrap();
    std::fs::remove_file(dir.path().join("fake/calls.log")).unwrap();
    // As if netlab had got as far as its snapshot (the real one writes it before it deploys).
    std::fs::write(work.join("netlab.snapshot.pickle"), "fake").unwrap();
    let s = restart(dir, &[]);
    assert!(
        s.calls()
            .iter()
            .any(|(argv, cwd)| argv.join(" ") == "down --cleanup --force"
                && std::path::Path::new(cwd) == work)
    );
    assert!(!work.exists());
    assert!(s.work_dirs().is_empty());
    s.expect_session(&a, "active", 0);
    assert_eq!(state_file(&s)["starting"], serde_json::Value::Null);
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_pending_teardown_is_carried_out_after_kill_9() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let work = s.work_dirs().pop().unwrap();
    s.set_control("down.sleep", "30");
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    wait_until(Duration::from_secs(5), "netlab down to start", || {
        s.call_lines().iter().any(|l| l == "down --cleanup")
    });
    assert_eq!(
        state_file(&s)["teardowns"][0]["work_dir"],
        work.display().to_string()
    );
    let dir = s.kill_keep_dir();
    kill_netlab_processes(&dir.path().join("fake"));
    std::fs::remove_file(dir.path().join("fake/control/down.sleep")).unwrap();
    let s = restart(dir, &[]);
    wait_until(Duration::from_secs(10), "the pending teardown", || {
        !work.exists() && state_file(&s)["teardowns"] == serde_json::json!([])
    });
    assert_eq!(s.registered(), None);
    s.lab("GET", "/lab", &a).expect(200, NOT_RUNNING);
}

#[test]
fn a_lab_whose_work_dir_vanished_is_forgotten() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let work = s.work_dirs().pop().unwrap();
    let dir = s.kill_keep_dir();
    std::fs::remove_dir_all(&work).unwrap();
    let s = restart(dir, &[]);
    s.lab("GET", "/lab", &a).expect(200, NOT_RUNNING);
    assert!(
        s.log_text().contains("is not running any more"),
        "{}",
        s.log_text()
    );
    // The stale registration went with it; the next acquire is a clean start.
    assert_eq!(s.registered(), None);
    s.clear_calls();
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO));
    assert_eq!(r.json()["reused"], false);
    assert!(s.call_lines().contains(&"up t.yml".to_owned()));
}

#[test]
fn a_corrupt_state_file_means_a_clean_start() {
    let s = start();
    s.create_session();
    let dir = s.kill_keep_dir();
    std::fs::write(
        dir.path().join("state/state.json"),
        "{\"version\": 1, \"sess",
    )
    .unwrap();
    let s = restart(dir, &[]);
    assert_eq!(s.get("/debug/health").json()["sessions"], 0);
    let kept: Vec<String> = std::fs::read_dir(s.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.json.bad-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(s.log_text().contains(&kept[0]), "{}", s.log_text());
    assert_eq!(
        std::fs::read_to_string(s.state_dir().join(&kept[0])).unwrap(),
        "{\"version\": 1, \"sess"
    );
    // And the new state file is good again.
    let (id, _) = s.create_session();
    assert_eq!(session_ids_in_file(&s), [id]);
}

#[test]
fn sigterm_with_on_exit_keep_leaves_the_lab_for_the_next_start() {
    let mut s = start_with(&[("--on-exit", "keep")]);
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let devices = s.lab("GET", "/lab/devices", &a).text();
    s.clear_calls();
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(s.calls().is_empty(), "no netlab call on a keep exit");
    assert!(s.registered().is_some());
    let dir = s.take_dir();
    let s = restart(dir, &[("--on-exit", "keep")]);
    s.lab("GET", "/lab/devices", &a).expect(200, &devices);
    assert!(!s.call_lines().iter().any(|l| l.starts_with("up ")));
}

#[test]
fn sigterm_by_default_tears_the_lab_down_and_the_next_start_is_clean() {
    let mut s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(s.registered(), None);
    assert_eq!(state_file(&s)["lab"], serde_json::Value::Null);
    let dir = s.take_dir();
    let s = restart(dir, &[]);
    // The session itself survived the restart.
    s.lab("GET", "/lab", &a).expect(200, NOT_RUNNING);
}

/// `neops-remote-lab cleanup` on the server's state dir.
fn cleanup_command(s: &TestServer) -> std::process::Output {
    server_command()
        .arg("cleanup")
        .arg("--state-dir")
        .arg(s.state_dir())
        .arg("--netlab")
        .arg(fake_netlab())
        .env("FAKE_NETLAB_DIR", s.fake_dir())
        .output()
        .unwrap()
}

#[test]
fn the_cleanup_command_tears_down_what_a_stopped_server_left() {
    let mut s = start_with(&[("--on-exit", "keep")]);
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let work = s.work_dirs().pop().unwrap();
    // Refused while the server runs.
    let out = cleanup_command(&s);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(s.registered().is_some());
    s.clear_calls();
    let out = cleanup_command(&s);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(s.registered(), None);
    assert!(!work.exists());
    assert!(!s.state_dir().join("state.json").exists());
    // One `down --cleanup` in the work dir and no `--force` pass after it (it would fail
    // with "snapshot does not exist" and warn about a cleanup that went fine).
    let calls: Vec<(String, String)> = s
        .calls()
        .into_iter()
        .map(|(argv, cwd)| (argv.join(" "), cwd))
        .collect();
    let work_text = work.display().to_string();
    assert_eq!(
        calls
            .iter()
            .filter(|(argv, _)| argv != "version")
            .map(|(argv, cwd)| (argv.as_str(), cwd == &work_text))
            .collect::<Vec<_>>(),
        [
            ("down --cleanup", true),
            ("down --instance default --cleanup", false)
        ]
    );
    assert!(!stderr.contains("WARN"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    assert!(stderr.contains("cleanup done"), "{stderr}");
}

/// `cleanup` of a lab whose netlab snapshot is gone: containerlab destroys it from
/// `clab.yml` before the directory goes; while containerlab fails, `cleanup` exits 1 and
/// keeps the directory with `clab.yml`.
#[test]
fn the_cleanup_command_destroys_a_lab_without_snapshot_with_containerlab() {
    let mut s = start_with(&[("--on-exit", "keep")]);
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let work = s.work_dirs().pop().unwrap();
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    std::fs::remove_file(work.join("netlab.snapshot.pickle")).unwrap();
    let cleanup = || {
        let mut command = server_command();
        command
            .arg("cleanup")
            .arg("--state-dir")
            .arg(s.state_dir())
            .arg("--netlab")
            .arg(fake_netlab())
            .arg("--containerlab")
            .arg(fake_containerlab())
            .env("FAKE_NETLAB_DIR", s.fake_dir());
        command.output().unwrap()
    };

    s.set_control(
        "clab.fail",
        r#"{"code": 1, "stderr": "docker is not running\n"}"#,
    );
    let out = cleanup();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("docker is not running"), "{stderr}");
    assert!(work.join("clab.yml").exists());
    assert!(s.registered().is_some());

    s.clear_control("clab.fail");
    let out = cleanup();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cleanup done"), "{stderr}");
    let work_text = work.display().to_string();
    assert_eq!(
        containerlab_calls(&s.fake_dir()),
        [
            (
                "destroy --cleanup -t clab.yml".to_owned(),
                work_text.clone()
            ),
            ("destroy --cleanup -t clab.yml".to_owned(), work_text)
        ]
    );
    assert!(!work.exists());
    // The registration of the directory that is gone is dropped as well.
    assert_eq!(s.registered(), None);
    assert!(!s.state_dir().join("state.json").exists());
}

/// `cleanup` when netlab cannot tear the lab down: exit 1, the work dir and the record kept,
/// what is left named with the commands to finish by hand; the next `cleanup`, once netlab
/// works, finishes the job.
#[test]
fn a_cleanup_that_netlab_cannot_finish_says_so_and_keeps_what_is_left() {
    for (control, content, error) in [
        (
            "down.fail",
            r#"{"code": 1, "stderr": "Error response from daemon: Docker is not running\n"}"#,
            "netlab down --cleanup failed (exit code 1): Error response from daemon: Docker is not running",
        ),
        (
            "down.fatal",
            "Fatal error in netlab: Containerlab is not installed
",
            "netlab down --cleanup failed (exited 0 but failed): Fatal error in netlab: Containerlab is not installed",
        ),
        (
            "containerlab.missing",
            "",
            "netlab down --cleanup failed (exited 0 but failed): Fatal error in netlab: Containerlab is not installed",
        ),
    ] {
        let mut s = start_with(&[("--on-exit", "keep")]);
        let (a, _) = s.create_session();
        assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
        let work = s.work_dirs().pop().unwrap();
        s.signal(Signal::TERM);
        assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
        s.set_control(control, content);
        s.clear_calls();
        let out = cleanup_command(&s);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{control}: {stderr}");
        assert!(!stderr.contains("cleanup done"), "{stderr}");
        // Kept: the work dir with clab.yml and the snapshot, netlab's registration, and the
        // record in state.json (as a pending teardown; the sessions are gone).
        assert!(work.join("clab.yml").exists(), "{control}");
        assert!(work.join("netlab.snapshot.pickle").exists(), "{control}");
        assert!(s.registered().is_some());
        let state = state_file(&s);
        assert_eq!(state["sessions"], serde_json::json!([]));
        assert_eq!(
            state["teardowns"][0]["work_dir"],
            work.display().to_string()
        );
        assert_eq!(state["teardowns"][0]["attempts"], 1);
        assert_eq!(state["teardowns"][0]["error"], error);
        // No --force pass that would delete clab.yml.
        assert!(
            !s.call_lines().iter().any(|l| l.contains("--force")),
            "{:?}",
            s.call_lines()
        );
        // The report names what is left and the commands that finish it.
        assert!(stderr.contains("NOT DONE"), "{stderr}");
        assert!(
            stderr.contains(&format!("the lab in {}", work.display())),
            "{stderr}"
        );
        assert!(stderr.contains(error), "{stderr}");
        assert!(
            stderr.contains(&format!("cd {} && HOME=", work.display())),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "containerlab destroy -t {}/clab.yml --cleanup",
                work.display()
            )),
            "{stderr}"
        );
        // Once netlab works again, the next cleanup finishes the job.
        s.clear_control(control);
        let out = cleanup_command(&s);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{control}: {stderr}");
        assert!(!work.exists());
        assert_eq!(s.registered(), None);
        assert!(!s.state_dir().join("state.json").exists());
    }
}

/// A server whose own teardown fails at shutdown keeps the lab on record; the next server
/// retries it.
#[test]
fn a_teardown_that_fails_at_shutdown_is_retried_by_the_next_start() {
    let mut s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let work = s.work_dirs().pop().unwrap();
    s.set_control("down.fatal", "");
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(work.join("clab.yml").exists());
    assert_eq!(state_file(&s)["teardowns"][0]["attempts"], 1);
    assert_eq!(state_file(&s)["lab"], serde_json::Value::Null);
    assert!(
        s.log_text().contains("[ERROR] teardown of"),
        "{}",
        s.log_text()
    );
    s.clear_control("down.fatal");
    let dir = s.take_dir();
    let s = restart(dir, &[]);
    wait_until(Duration::from_secs(10), "the retried teardown", || {
        !work.exists() && state_file(&s)["teardowns"] == serde_json::json!([])
    });
    assert_eq!(s.registered(), None);
}

#[test]
fn an_idle_lab_with_no_session_is_torn_down_after_the_idle_timeout() {
    let s = start_with(&[("--idle-lab-timeout", "0.5")]);
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    s.lab("POST", "/lab/release", &a).expect_empty(204);
    s.delete(&format!("/session/{a}")).expect_empty(204);
    // Idle, kept for reuse at first...
    assert!(s.registered().is_some());
    // ...then torn down by the timer.
    wait_until(Duration::from_secs(10), "the idle teardown", || {
        s.registered().is_none() && s.work_dirs().is_empty()
    });
    assert!(s.log_text().contains("idle with no session"));
}
