//! The lab half of the contract, over real HTTP, with the fake netlab.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;

const TOPO_A: &str = "name: a\nnodes: [r1, r2]\n";
const TOPO_B: &str = "name: b\nnodes: [s1, s2, s3]\n";

fn devices(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn device_names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `GET /lab` as session `id`, parsed.
fn lab_state(s: &TestServer, id: &str) -> serde_json::Value {
    let r = s.lab("GET", "/lab", id);
    assert_eq!(r.status, 200);
    r.json()
}

/// The work dir of the lab session `id` holds, as the state file records it (`GET /lab`
/// names only the topology file).
fn work_dir_of(s: &TestServer, id: &str) -> PathBuf {
    assert_eq!(lab_state(s, id)["running"], true);
    let text = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(state["holder"], id, "{state}");
    PathBuf::from(state["lab"]["work_dir"].as_str().unwrap())
}

/// Waits until the teardowns queued so far are done (no lab registered, no work dir left).
fn wait_torn_down(s: &TestServer) {
    wait_until(Duration::from_secs(10), "the teardown", || {
        s.registered().is_none() && s.work_dirs().is_empty()
    });
}

#[test]
fn fresh_start_returns_devices_and_runs_netlab_in_order() {
    let s = start();
    let (a, _) = s.create_session();
    s.clear_calls();
    let r = s.acquire(&a, &Form::topology("lab.yml", TOPO_A));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["devices", "reused"]
    );
    assert!(
        r.text()
            .starts_with(r#"{"reused":false,"devices":[{"name":"r1","raw":{"#)
    );
    assert_eq!(device_names(&v["devices"]), devices(&["r1", "r2"]));
    assert_eq!(v["devices"][1]["raw"]["mgmt"]["ipv4"], "192.168.121.102");

    let state = lab_state(&s, &a);
    assert_eq!(state["running"], true);
    assert_eq!(state["ref_count"], 1);
    assert_eq!(state["devices"], v["devices"]);
    assert_eq!(state["netlab_status"], serde_json::Value::Null);
    // The file's name: where the server keeps it is none of the client's business.
    assert_eq!(state["topology"], "lab.yml");
    let work = work_dir_of(&s, &a);
    assert!(work.starts_with(s.state_dir().join("labs")));
    let topology = work.join("lab.yml");
    assert_eq!(std::fs::read_to_string(&topology).unwrap(), TOPO_A);
    s.lab("GET", "/lab/devices", &a)
        .expect(200, &serde_json::to_string(&v["devices"]).unwrap());

    let work = work.display().to_string();
    let state_dir = s.state_dir().display().to_string();
    let calls = s.calls();
    let lines: Vec<String> = calls.iter().map(|(argv, _)| argv.join(" ")).collect();
    assert_eq!(
        lines[..2],
        [
            "status --all --format json".to_owned(),
            "up lab.yml".to_owned(),
        ]
    );
    // Every node's data in one call (the expression is the server's own).
    assert!(
        lines[2].starts_with("inspect -q --format json __import__('box').BoxList("),
        "{lines:?}"
    );
    assert_eq!(calls[0].1, state_dir);
    assert_eq!(calls[1].1, work);
    assert_eq!(calls[2].1, work);
    assert_eq!(calls.len(), 3);

    // Teardown: exactly `down --cleanup` in the work dir, then the dir is gone.
    s.clear_calls();
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    s.lab("GET", "/lab", &a).expect(200, NOT_RUNNING);
    wait_torn_down(&s);
    assert_eq!(s.calls(), vec![(devices(&["down", "--cleanup"]), work)]);
}

#[test]
fn reuse_by_content_attach_release_and_idle_reattach() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(
        s.acquire(&a, &Form::topology("one.yml", TOPO_A)).status,
        200
    );
    s.clear_calls();
    // Same bytes, another file name: attached, no netlab call.
    let r = s.acquire(&a, &Form::topology("two.yaml", TOPO_A));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reused"], true);
    assert_eq!(device_names(&r.json()["devices"]), devices(&["r1", "r2"]));
    assert_eq!(lab_state(&s, &a)["ref_count"], 2);
    assert!(s.calls().is_empty());
    // The attach left no second work dir behind.
    assert_eq!(s.work_dirs().len(), 1);

    // Release clamps at zero.
    for expected in [1, 0, 0] {
        s.lab("POST", "/lab/release", &a).expect_empty(204);
        assert_eq!(lab_state(&s, &a)["ref_count"], expected);
    }
    // Idle but running: a reattach says reused:true.
    let r = s.acquire(
        &a,
        &Form::topology("three.YML", TOPO_A).text("reuse", "true"),
    );
    assert_eq!(r.json()["reused"], true);
    assert_eq!(lab_state(&s, &a)["ref_count"], 1);
    assert!(s.calls().is_empty());
}

#[test]
fn reuse_false_restarts_an_idle_lab_and_is_refused_for_a_held_one() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    let first = work_dir_of(&s, &a);
    let held = s.acquire(&a, &Form::topology("t.yml", TOPO_A).text("reuse", "false"));
    held.expect(423, LAB_BUSY);
    s.lab("POST", "/lab/release", &a).expect_empty(204);
    s.clear_calls();
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A).text("reuse", "0"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reused"], false);
    let second = work_dir_of(&s, &a);
    assert_ne!(first, second);
    assert!(!first.exists());
    let lines = s.call_lines();
    assert_eq!(lines[0], "down --cleanup");
    // The lab worker tore the lab down itself: netlab registers nothing in its instance,
    // and the next `up` comes without asking `netlab status` first.
    assert_eq!(lines[1], "up t.yml");
    assert_eq!(s.calls()[0].1, first.display().to_string());
    assert_eq!(s.work_dirs(), vec![second]);
}

#[test]
fn another_topology_switches_an_idle_lab_and_is_refused_for_a_held_one() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("a.yml", TOPO_A)).status, 200);
    s.acquire(&a, &Form::topology("b.yml", TOPO_B))
        .expect(423, LAB_BUSY);
    // The refused upload left nothing behind.
    assert_eq!(s.work_dirs().len(), 1);
    s.lab("POST", "/lab/release", &a).expect_empty(204);
    let r = s.acquire(&a, &Form::topology("b.yml", TOPO_B));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reused"], false);
    assert_eq!(
        device_names(&r.json()["devices"]),
        devices(&["s1", "s2", "s3"])
    );
    assert_eq!(s.work_dirs().len(), 1);
    assert!(
        s.registered()
            .unwrap()
            .ends_with(work_dir_of(&s, &a).file_name().unwrap().to_str().unwrap())
    );
}

#[test]
fn only_one_acquire_at_a_time() {
    let s = start();
    let (a, _) = s.create_session();
    s.set_control("up.sleep", "1.5");
    let first = s.acquire_during_up(&a, Form::topology("t.yml", TOPO_A));
    s.acquire(&a, &Form::topology("t.yml", TOPO_A))
        .expect(423, LAB_BUSY);
    let r = first.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reused"], false);
}

#[test]
fn polls_are_answered_while_a_slow_netlab_up_runs() {
    let s = start_with(&[("--workers", "4")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    s.set_control("up.sleep", "3");
    let acquire = s.acquire_during_up(&a, Form::topology("t.yml", TOPO_A));
    // More polls than there are workers: none of them waits for netlab.
    for _ in 0..40 {
        s.expect_session(&b, "waiting", 1);
        s.request("POST", "/session/heartbeat", &[("X-Session-ID", &b)], b"")
            .expect_empty(204);
    }
    assert!(
        !acquire.is_finished(),
        "the polls should not have waited for netlab"
    );
    assert_eq!(acquire.join().unwrap().status, 200);
}

#[test]
fn destroy_rows() {
    let s = start();
    let (a, _) = s.create_session();
    s.lab("DELETE", "/lab?force=false", &a).expect_empty(204);
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    s.lab("DELETE", "/lab?force=maybe", &a).expect(
        422,
        r#"{"detail":[{"type":"bool_parsing","loc":["query","force"],"msg":"Input should be a valid boolean, unable to interpret input","input":"maybe"}]}"#,
    );
    s.lab("DELETE", "/lab?force=false", &a)
        .expect(409, r#"{"detail":"Lab still in use"}"#);
    s.lab("DELETE", "/lab?force=FALSE", &a)
        .expect(409, r#"{"detail":"Lab still in use"}"#);
    s.lab("POST", "/lab/release", &a).expect_empty(204);
    s.lab("DELETE", "/lab?force=no", &a).expect_empty(202);
    s.lab("GET", "/lab", &a).expect(200, NOT_RUNNING);
    s.lab("GET", "/lab/devices", &a).expect(404, NO_LAB);
    s.lab("POST", "/lab/release", &a).expect(404, NO_LAB);
    s.lab("DELETE", "/lab", &a).expect_empty(204);
    wait_torn_down(&s);
    // force defaults to true: a held lab is torn down.
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    wait_torn_down(&s);
}

#[test]
fn an_acquire_queued_behind_a_teardown_waits_for_it() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    s.set_control("down.sleep", "1");
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    // Not 423: it waits for the teardown, then starts.
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reused"], false);
    let lines = s.call_lines();
    let down = lines.iter().rposition(|l| l == "down --cleanup").unwrap();
    let up = lines.iter().rposition(|l| l == "up t.yml").unwrap();
    assert!(down < up, "{lines:?}");
}

#[test]
fn topology_file_names() {
    let s = start();
    let (a, _) = s.create_session();
    for (i, name) in ["t.yml", "t.yaml", "T.YML"].iter().enumerate() {
        // A different topology each time, so each is a fresh start after a release.
        let topo = format!("nodes: [r{i}]\n");
        let r = s.acquire(&a, &Form::topology(name, &topo));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        s.lab("POST", "/lab/release", &a).expect_empty(204);
    }
    let extension = r#"{"detail":"Topology must be a .yml or .yaml file"}"#;
    for name in ["t.txt", "", "yml", ".yml", "..", "."] {
        s.acquire(&a, &Form::topology(name, TOPO_A))
            .expect(400, extension);
    }
    for name in ["../t.yml", "a/b.yml", "a\\\\b.yml", "-x.yml"] {
        let r = s.acquire(&a, &Form::topology(name, TOPO_A));
        assert_eq!(r.status, 400, "{name}");
        assert!(
            r.json()["detail"]
                .as_str()
                .unwrap()
                .starts_with("Topology file name must be a plain file name"),
            "{}",
            r.text()
        );
    }
    s.acquire(&a, &Form::topology("t.yml", ""))
        .expect(400, r#"{"detail":"Topology file is empty"}"#);
    // Only the lab from the last good upload is on disk.
    assert_eq!(s.work_dirs().len(), 1);
}

#[test]
fn extra_files_land_in_the_work_dir_and_bad_names_are_refused() {
    let s = start();
    let (a, _) = s.create_session();
    for bad in [
        "/etc/passwd",
        "../escape.cfg",
        "configs/../../escape.cfg",
        "configs//r1.cfg",
        "configs\\\\r1.cfg",
        "t.yml",
        "",
    ] {
        let form = Form::topology("t.yml", TOPO_A).file("extra_files", bad, b"x");
        let r = s.acquire(&a, &form);
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.starts_with("Invalid extra file name"), "{detail}");
        assert!(detail.contains(&format!("{bad:?}")), "{detail}");
    }
    assert!(s.work_dirs().is_empty());
    // Nothing was written anywhere in the test dir but the fake's own files.
    let stray: Vec<String> = files_under(s.dir.path())
        .into_iter()
        .filter(|f| {
            !f.starts_with("fake/")
                && f != "state/neops-remote-lab.lock"
                && f != "state/state.json"
                && f != "state/events.jsonl"
        })
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    let form = Form::topology("t.yml", TOPO_A)
        .file("extra_files", "configs/r1.cfg", b"hostname r1\n")
        .file("extra_files", "templates/deep/x.j2", b"{{ x }}")
        .file("extra_files", "r2.cfg", b"hostname r2\n");
    let r = s.acquire(&a, &form);
    assert_eq!(r.status, 200, "{}", r.text());
    let work = work_dir_of(&s, &a);
    assert_eq!(
        files_under(&work)
            .into_iter()
            .filter(|f| f != "netlab.snapshot.pickle" && f != "clab.yml")
            .collect::<Vec<_>>(),
        ["configs/r1.cfg", "r2.cfg", "t.yml", "templates/deep/x.j2"]
    );
    assert_eq!(
        std::fs::read_to_string(work.join("configs/r1.cfg")).unwrap(),
        "hostname r1\n"
    );
    // netlab ran `up` next to them.
    let (_, cwd) = s
        .calls()
        .into_iter()
        .find(|(argv, _)| argv[0] == "up")
        .unwrap();
    assert_eq!(PathBuf::from(cwd), work);
}

#[test]
fn bodies_that_carry_no_topology() {
    let s = start();
    let (a, _) = s.create_session();
    let with = |ct: &str, body: &[u8]| {
        s.request(
            "POST",
            "/lab",
            &[("X-Session-ID", &a), ("Content-Type", ct)],
            body,
        )
    };
    s.lab("POST", "/lab", &a).expect(422, MISSING_TOPOLOGY);
    with("application/json", br#"{"topology":"x"}"#).expect(422, MISSING_TOPOLOGY);
    with("application/x-www-form-urlencoded", b"topology=x").expect(422, MISSING_TOPOLOGY);
    let form = Form::new().text("reuse", "true");
    with(&form.content_type(), &form.body()).expect(422, MISSING_TOPOLOGY);
    let full = Form::topology("t.yml", TOPO_A).body();
    with(&Form::new().content_type(), &full[..full.len() / 2]).expect(422, MISSING_TOPOLOGY);
    with("multipart/form-data", &full)
        .expect(400, r#"{"detail":"Missing boundary in multipart."}"#);
    let form = Form::topology("t.yml", TOPO_A).text("reuse", "maybe");
    s.acquire(&a, &form).expect(
        422,
        r#"{"detail":[{"type":"bool_parsing","loc":["body","reuse"],"msg":"Input should be a valid boolean, unable to interpret input","input":"maybe"}]}"#,
    );
    assert!(s.work_dirs().is_empty());
    // The session is still active and can acquire.
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
}

#[test]
fn oversize_bodies_with_and_without_content_length() {
    let s = start_with(&[("--max-upload-bytes", "4096")]);
    let (a, _) = s.create_session();
    let big = "x".repeat(8192);
    let form = Form::topology("t.yml", TOPO_A).file("extra_files", "big.bin", big.as_bytes());
    let expected = r#"{"detail":"Upload too large: the limit is 4096 bytes (--max-upload-bytes)"}"#;
    s.acquire(&a, &form).expect(413, expected);
    chunked_acquire(s.addr, &a, &form).expect(413, expected);
    assert!(s.work_dirs().is_empty());
    // Exactly at the limit is fine, and chunked uploads work.
    let small = Form::topology("t.yml", TOPO_A);
    let r = chunked_acquire(s.addr, &a, &small);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn too_many_parts() {
    let s = start();
    let (a, _) = s.create_session();
    let mut form = Form::topology("t.yml", TOPO_A);
    for i in 0..300 {
        form = form.file("extra_files", &format!("f{i}.cfg"), b"x");
    }
    s.acquire(&a, &form).expect(
        413,
        r#"{"detail":"Too many parts in the upload: the limit is 256"}"#,
    );
    assert!(s.work_dirs().is_empty());
}

/// After a failed start: no lab recorded, the dir gone, the session still active, and the
/// next acquire works. Where netlab made something (`up` got as far as its snapshot),
/// exactly one `down --cleanup --force` ran in the failed work dir; where it did not, netlab
/// was not asked to tear anything down there (it would only fail: no snapshot).
fn assert_failed_start_cleaned(s: &TestServer, a: &str, netlab_made_something: bool) {
    s.lab("GET", "/lab", a).expect(200, NOT_RUNNING);
    assert!(s.work_dirs().is_empty());
    let calls = s.calls();
    let up_dir = calls
        .iter()
        .rev()
        .find(|(argv, _)| argv[0] == "up")
        .unwrap()
        .1
        .clone();
    let downs: Vec<String> = calls
        .iter()
        .filter(|(argv, cwd)| argv[0] == "down" && *cwd == up_dir)
        .map(|(argv, _)| argv.join(" "))
        .collect();
    if netlab_made_something {
        assert_eq!(downs, ["down --cleanup --force"], "{calls:?}");
    } else {
        assert!(downs.is_empty(), "{calls:?}");
    }
    s.expect_session(a, "active", 0);
    for control in [
        "up.fail",
        "inspect.fail",
        "list.output",
        "node.output",
        "up.hang",
    ] {
        s.clear_control(control);
    }
    let r = s.acquire(a, &Form::topology("t.yml", TOPO_A));
    assert_eq!(r.status, 200, "{}", r.text());
    s.lab("DELETE", "/lab", a).expect_empty(202);
    wait_torn_down(s);
    s.clear_calls();
}

#[test]
fn devices_are_read_node_by_node_when_the_one_call_fails() {
    let s = start();
    let (a, _) = s.create_session();
    let at_once = s.acquire(&a, &Form::topology("lab.yml", TOPO_B));
    assert_eq!(at_once.status, 200, "{}", at_once.text());
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    wait_torn_down(&s);

    s.set_control("all.fail", "");
    s.clear_calls();
    let by_node = s.acquire(&a, &Form::topology("lab.yml", TOPO_B));
    assert_eq!(by_node.status, 200, "{}", by_node.text());
    // The same answer, byte for byte, from the list and one call per node (but for the
    // lab's name, which the fake netlab takes from the work directory).
    let same = |text: String| {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let host = v["devices"][0]["raw"]["hostname"]
            .as_str()
            .unwrap()
            .to_owned();
        let lab = host.strip_suffix("-s1").unwrap().to_owned();
        text.replace(&lab, "clab-LAB")
    };
    assert_eq!(same(by_node.text()), same(at_once.text()));
    let (at_once_calls, mut inspects): (Vec<String>, Vec<String>) = s
        .calls()
        .iter()
        .map(|(argv, _)| argv.join(" "))
        .filter(|l| l.starts_with("inspect"))
        .partition(|l| l.contains("__import__('box').BoxList("));
    // The one call first (once more after `up` when it also ran, and failed, while `up`
    // deployed: a busy machine leaves the fake netlab's `up` running long enough).
    assert!((1..=2).contains(&at_once_calls.len()), "{at_once_calls:?}");
    inspects.sort();
    assert_eq!(
        inspects,
        [
            "inspect -q --format json list(nodes.keys())",
            "inspect -q --node s1 --format json",
            "inspect -q --node s2 --format json",
            "inspect -q --node s3 --format json",
        ]
    );
    s.clear_control("all.fail");
}

#[test]
fn netlab_failures_are_clear_answers() {
    let s = start();
    let (a, _) = s.create_session();

    let r = s.acquire(&a, &Form::topology("bad.yml", "fake: reject\n"));
    r.expect(
        422,
        r#"{"detail":"netlab rejected the topology: [ERRORS]   Errors encountered while processing topology\n[TOPOLOGY] Unknown node attribute 'fake' in bad.yml"}"#,
    );
    assert_failed_start_cleaned(&s, &a, false);

    s.set_control(
        "up.fail",
        r#"{"code": 1, "stdout": "lab instance 'default' is already running in directory /srv/other\n", "stderr": "Fatal error in netlab: aborting \"netlab up\" request\n"}"#,
    );
    s.acquire(&a, &Form::topology("t.yml", TOPO_A)).expect(
        409,
        r#"{"detail":"lab instance 'default' is already running in directory /srv/other"}"#,
    );
    assert_failed_start_cleaned(&s, &a, false);

    s.set_control(
        "up.fail",
        r#"{"code": 3, "stderr": "something\nbroke badly\n"}"#,
    );
    s.acquire(&a, &Form::topology("t.yml", TOPO_A)).expect(
        500,
        r#"{"detail":"netlab up failed (exit code 3): something\nbroke badly"}"#,
    );
    assert_failed_start_cleaned(&s, &a, false);

    s.set_control(
        "inspect.fail",
        r#"{"code": 2, "stderr": "inspect exploded"}"#,
    );
    s.acquire(&a, &Form::topology("t.yml", TOPO_A)).expect(
        500,
        r#"{"detail":"netlab inspect failed (exit code 2): inspect exploded"}"#,
    );
    assert_failed_start_cleaned(&s, &a, true);

    s.set_control(
        "list.output",
        "Traceback (most recent call last):\n  oops\n",
    );
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
    assert_eq!(r.status, 500);
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .starts_with("netlab inspect printed unexpected output: not a list"),
        "{}",
        r.text()
    );
    assert_failed_start_cleaned(&s, &a, true);

    s.set_control("node.output", "{not json");
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
    assert_eq!(r.status, 500);
    assert!(r.text().contains("not JSON"), "{}", r.text());
    assert_failed_start_cleaned(&s, &a, true);
}

#[test]
fn a_hanging_netlab_up_times_out_and_its_whole_group_is_killed() {
    let s = start_with(&[("--netlab-timeout", "1")]);
    let (a, _) = s.create_session();
    // A unique sleep duration so the process can be found.
    let marker = format!("36{}.5", std::process::id() % 100);
    std::fs::write(s.fake_dir().join("control/up.hang"), "").unwrap();
    std::fs::write(s.fake_dir().join("control/hang.seconds"), &marker).unwrap();
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
    r.expect(504, r#"{"detail":"netlab up timed out after 1 s"}"#);
    let pgrep = std::process::Command::new("pgrep")
        .args(["-f", &format!("sleep {marker}")])
        .output()
        .unwrap();
    assert!(
        pgrep.stdout.is_empty(),
        "orphans left: {}",
        String::from_utf8_lossy(&pgrep.stdout)
    );
    assert_failed_start_cleaned(&s, &a, false);
}

#[test]
fn a_session_ending_during_netlab_up_gets_its_lab_torn_down() {
    let s = start();
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    s.set_control("up.sleep", "1");
    let acquire = s.acquire_during_up(&a, Form::topology("t.yml", TOPO_A));
    s.delete(&format!("/session/{a}")).expect_empty(204);
    // b is promoted at once, not after the start.
    s.expect_session(&b, "active", 0);
    acquire.join().unwrap().expect(404, SESSION_NOT_FOUND);
    wait_torn_down(&s);
    s.lab("GET", "/lab", &b).expect(200, NOT_RUNNING);
    assert!(
        s.call_lines()
            .contains(&"down --cleanup --force".to_owned())
    );
}

#[test]
fn a_session_with_an_acquire_in_progress_is_not_reaped() {
    let s = start_with(&[("--active-timeout", "0.3")]);
    let (a, _) = s.create_session();
    s.set_control("up.sleep", "1.5");
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
    assert_eq!(r.status, 200, "{}", r.text());
    // The completion counts as activity: the session is still there right after.
    s.expect_session(&a, "active", 0);
    assert!(s.registered().is_some());
}

#[test]
fn ending_the_active_session_tears_down_a_held_lab_and_keeps_an_idle_one() {
    let s = start();
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let (c, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    s.lab("POST", "/lab/release", &a).expect_empty(204);
    s.clear_calls();
    s.delete(&format!("/session/{a}")).expect_empty(204);
    // Idle lab kept: b attaches to it.
    let r = s.acquire(&b, &Form::topology("again.yml", TOPO_A));
    assert_eq!(r.json()["reused"], true);
    assert!(s.calls().is_empty());
    // b ends while holding it: torn down, c promoted at once even though down is slow.
    s.set_control("down.sleep", "2");
    s.delete(&format!("/session/{b}")).expect_empty(204);
    s.expect_session(&c, "active", 0);
    s.lab("GET", "/lab", &c).expect(200, NOT_RUNNING);
    wait_torn_down(&s);
    assert_eq!(s.call_lines(), ["down --cleanup"]);
}

#[test]
fn a_failing_teardown_never_blocks_the_queue_and_is_retried() {
    let s = start_with(&[("--active-timeout", "0.5")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    let work = work_dir_of(&s, &a);
    s.set_control("down.fail", r#"{"code": 1, "stderr": "down broke"}"#);
    // a goes silent and is reaped while holding the lab.
    wait_until(Duration::from_secs(5), "b to be promoted", || {
        s.get(&format!("/session/{b}")).text() == r#"{"status":"active","position":0}"#
    });
    wait_until(Duration::from_secs(5), "the teardown attempt", || {
        s.get(&format!("/session/{b}"));
        s.log_text().contains("down broke")
    });
    s.lab("GET", "/lab", &b).expect(200, NOT_RUNNING);
    // Not done: the work dir (clab.yml, snapshot) is kept, and the failure is visible.
    assert_eq!(s.work_dirs(), std::slice::from_ref(&work));
    assert!(work.join("clab.yml").exists());
    s.get(&format!("/session/{b}"));
    let health = s.get("/debug/health").json();
    let t = &health["teardowns"][0];
    assert_eq!(t["work_dir"], work.display().to_string());
    assert_eq!(
        t["error"],
        "netlab down --cleanup failed (exit code 1): down broke"
    );
    assert!(t["attempts"].as_u64().unwrap() >= 1);
    // It is retried (with back-off) while netlab keeps failing...
    wait_until(Duration::from_secs(10), "a retry", || {
        s.get(&format!("/session/{b}"));
        s.log_text()
            .contains("(attempt 2): netlab down --cleanup failed")
    });
    assert!(s.registered().is_some());
    // ...and done once netlab works again.
    s.clear_control("down.fail");
    wait_until(Duration::from_secs(10), "the retried teardown", || {
        s.get(&format!("/session/{b}"));
        // The directory goes first, then the record with its log line.
        s.work_dirs().is_empty() && s.log_text().contains("failed attempts")
    });
    assert_eq!(s.registered(), None);
    assert_eq!(
        s.get("/debug/health").json()["teardowns"],
        serde_json::json!([])
    );
    let log = s.log_text();
    assert_eq!(log.matches("[ERROR]").count(), 1, "{log}");
    assert!(log.contains("failed attempts"), "{log}");
    let r = s.acquire(&b, &Form::topology("t.yml", TOPO_B));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// netlab 26.10 without containerlab: `down` prints a fatal error and exits 0. That is a
/// failure: nothing is deleted and no `--force` pass destroys `clab.yml`.
#[test]
fn a_teardown_that_exits_0_with_a_fatal_error_is_a_failure() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    for control in ["down.fatal", "containerlab.missing"] {
        let work = work_dir_of(&s, &a);
        s.set_control(control, "");
        s.clear_calls();
        s.lab("DELETE", "/lab", &a).expect_empty(202);
        wait_until(Duration::from_secs(5), "the failed teardown", || {
            s.get("/debug/health").json()["teardowns"][0]["attempts"] == 1
        });
        assert_eq!(
            s.get("/debug/health").json()["teardowns"][0]["error"],
            "netlab down --cleanup failed (exited 0 but failed): Fatal error in netlab: Containerlab is not installed"
        );
        assert_eq!(s.call_lines(), ["down --cleanup"], "{control}");
        assert!(work.join("clab.yml").exists(), "{control}");
        assert!(work.join("netlab.snapshot.pickle").exists(), "{control}");
        assert!(s.registered().is_some());
        s.clear_control(control);
        wait_torn_down(&s);
        assert_eq!(
            s.get("/debug/health").json()["teardowns"],
            serde_json::json!([])
        );
        let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    wait_torn_down(&s);
}

/// A server whose `containerlab` is the fake one, with a lab held by a session.
fn held_lab_with_fake_containerlab() -> (TestServer, String, PathBuf) {
    let fake = fake_containerlab();
    let s = start_with(&[("--containerlab", fake.to_str().unwrap())]);
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO_A)).status, 200);
    let work = work_dir_of(&s, &a);
    (s, a, work)
}

/// The snapshot of a running lab is gone (deleted by hand, a partial restore): netlab's
/// `down` cannot tear it down, so containerlab destroys it from `clab.yml`, and only then
/// does the directory go.
#[test]
fn a_lab_whose_snapshot_is_gone_is_destroyed_with_containerlab() {
    let (s, a, work) = held_lab_with_fake_containerlab();
    std::fs::remove_file(work.join("netlab.snapshot.pickle")).unwrap();
    s.clear_calls();
    s.lab("DELETE", "/lab?force=true", &a).expect_empty(202);
    wait_until(Duration::from_secs(10), "the teardown", || {
        s.work_dirs().is_empty()
    });
    assert_eq!(s.call_lines(), ["down --cleanup"]);
    assert_eq!(
        containerlab_calls(&s.fake_dir()),
        [(
            "destroy --cleanup -t clab.yml".to_owned(),
            work.display().to_string()
        )]
    );
    assert_eq!(
        s.get("/debug/health").json()["teardowns"],
        serde_json::json!([])
    );
    let log = s.log_text();
    assert!(log.contains("its snapshot is gone"), "{log}");
    assert!(!log.contains("[ERROR]"), "{log}");
    // netlab still registers the directory that is gone: the next start clears that.
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO_A));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// When containerlab fails too, the teardown failed: the directory stays with `clab.yml`,
/// the error says what both said, and a retry finishes the job once containerlab works.
#[test]
fn a_lab_whose_snapshot_is_gone_is_kept_while_containerlab_fails() {
    let (s, a, work) = held_lab_with_fake_containerlab();
    std::fs::remove_file(work.join("netlab.snapshot.pickle")).unwrap();
    s.set_control(
        "clab.fail",
        r#"{"code": 1, "stderr": "docker is not running\n"}"#,
    );
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    wait_until(Duration::from_secs(10), "the failed teardown", || {
        s.get("/debug/health").json()["teardowns"][0]["attempts"] == 1
    });
    let error = s.get("/debug/health").json()["teardowns"][0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    let clab = fake_containerlab().display().to_string();
    assert_eq!(
        error,
        format!(
            "netlab down --cleanup failed (then containerlab destroy failed too): \
             netlab down --cleanup failed (exit code 1): FatalError in down: The topology \
             snapshot file netlab.snapshot.pickle does not exist\n\
             `{clab} destroy --cleanup -t clab.yml` failed (exit code 1): docker is not running"
        )
    );
    assert_eq!(s.work_dirs(), std::slice::from_ref(&work));
    assert!(work.join("clab.yml").exists());
    s.clear_control("clab.fail");
    wait_until(Duration::from_secs(15), "the retried teardown", || {
        s.get("/debug/health").json()["teardowns"] == serde_json::json!([])
    });
    assert!(s.work_dirs().is_empty());
}

/// With neither snapshot nor `clab.yml` but netlab still registering the directory, netlab
/// is asked (its `down` fails) and the directory is kept: nothing confirms the lab is gone.
#[test]
fn a_registered_lab_without_its_files_is_not_reported_torn_down() {
    let (s, a, work) = held_lab_with_fake_containerlab();
    std::fs::remove_file(work.join("netlab.snapshot.pickle")).unwrap();
    std::fs::remove_file(work.join("clab.yml")).unwrap();
    s.clear_calls();
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    wait_until(Duration::from_secs(10), "the failed teardown", || {
        s.get("/debug/health").json()["teardowns"][0]["attempts"] == 1
    });
    assert_eq!(
        s.get("/debug/health").json()["teardowns"][0]["error"],
        "netlab down --cleanup failed (exit code 1): FatalError in down: The topology \
         snapshot file netlab.snapshot.pickle does not exist"
    );
    assert_eq!(
        s.call_lines()[..2],
        ["status --all --format json", "down --cleanup"]
    );
    assert!(containerlab_calls(&s.fake_dir()).is_empty());
    assert_eq!(s.work_dirs(), std::slice::from_ref(&work));
    assert_eq!(s.registered(), Some(work.display().to_string()));
}

#[test]
fn the_devices_are_read_while_up_deploys_and_not_again() {
    // netlab writes the lab's snapshot before it deploys (here: a deploy that lasts until
    // the test opens the fake's gate): the one inspect runs then, and the answer comes when
    // `up` ends, with nothing read after it.
    let s = start();
    let (a, _) = s.create_session();
    s.gate_ups();
    let pending = s.acquire_during_up(&a, Form::topology("t.yml", TOPO_A));
    let inspects = || -> Vec<serde_json::Value> {
        s.call_records()
            .into_iter()
            .filter(|c| c["argv"][0] == "inspect")
            .collect()
    };
    wait_until(
        Duration::from_secs(10),
        "the inspect while up deploys",
        || !inspects().is_empty(),
    );
    s.open_up_gates(1);
    let r = pending.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let inspects = inspects();
    assert_eq!(inspects.len(), 1, "{inspects:?}");
    let ups = std::fs::read_to_string(s.fake_dir().join("ups.log")).unwrap();
    let up: serde_json::Value = serde_json::from_str(ups.lines().last().unwrap()).unwrap();
    let began = inspects[0]["t"].as_f64().unwrap();
    assert!(
        began > up["start"].as_f64().unwrap() && began < up["end"].as_f64().unwrap(),
        "the inspect began at {began}, `up` ran {up}"
    );
    s.lab("GET", "/lab/devices", &a)
        .expect(200, &serde_json::to_string(&r.json()["devices"]).unwrap());
    let names: Vec<String> = r.json()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["r1", "r2"]);
}
