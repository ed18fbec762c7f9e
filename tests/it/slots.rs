//! Lab slots (`--slots N`, netlab's multilab plugin): N sessions ACTIVE at once, each lab in a
//! netlab instance of its own, started at the same time, re-adopted after a crash, torn
//! down by `cleanup`. The fake netlab keeps a registry per instance and logs when each `up`
//! began and ended (`ups.log`), so overlap is read from its timestamps, not timed here.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const TOPOLOGIES: [(&str, &str); 3] = [
    ("a.yml", "nodes: [a1]\n"),
    ("b.yml", "nodes: [b1, b2]\n"),
    ("c.yml", "nodes: [c1, c2, c3]\n"),
];

fn start_slots(n: usize, more: &[(&str, &str)]) -> TestServer {
    let mut options = Options::default().arg("--slots", &n.to_string());
    for (flag, value) in more {
        options = options.arg(flag, value);
    }
    TestServer::start(options)
}

/// The fake netlab's registered instances: key (`default`, `1`, …) → (dir, name, subnet).
fn instances(s: &TestServer) -> Vec<(String, String, String, u64)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(s.fake_dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = match name.as_str() {
            "instance.json" => "default".to_owned(),
            n if n.starts_with("instance-") && n.ends_with(".json") => {
                n["instance-".len()..n.len() - ".json".len()].to_owned()
            }
            _ => continue,
        };
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
        found.push((
            key,
            v["dir"].as_str().unwrap().to_owned(),
            v["name"].as_str().unwrap().to_owned(),
            v["subnet"].as_u64().unwrap_or(121),
        ));
    }
    found.sort();
    found
}

/// The successful `up`s: (instance, start, end) in unix seconds.
fn ups(s: &TestServer) -> Vec<(String, f64, f64)> {
    std::fs::read_to_string(s.fake_dir().join("ups.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["instance"].as_str().unwrap().to_owned(),
                v["start"].as_f64().unwrap(),
                v["end"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `POST /lab` of three topologies by three sessions at the same moment; the answers in
/// the sessions' order.
fn acquire_three_at_once(s: &TestServer, ids: &[String]) -> Vec<Resp> {
    let threads: Vec<_> = ids
        .iter()
        .zip(TOPOLOGIES)
        .map(|(id, (name, text))| {
            let (addr, id) = (s.addr, id.clone());
            std::thread::spawn(move || post_lab(addr, &id, &Form::topology(name, text)))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn node_names(devices: &Value) -> Vec<String> {
    devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Three sessions with a lab each, in three instances. Returns the session ids.
fn three_labs(s: &TestServer) -> Vec<String> {
    let ids: Vec<String> = (0..3).map(|_| s.create_session().0).collect();
    for r in acquire_three_at_once(s, &ids) {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    ids
}

#[test]
fn three_sessions_are_active_at_once_and_the_fourth_waits_at_position_1() {
    let s = start_slots(3, &[]);
    let created: Vec<(String, u64)> = (0..5).map(|_| s.create_session()).collect();
    let positions: Vec<u64> = created.iter().map(|(_, p)| *p).collect();
    assert_eq!(positions, [0, 0, 0, 1, 2]);
    for (id, _) in &created[..3] {
        s.expect_session(id, "active", 0);
    }
    s.expect_session(&created[3].0, "waiting", 1);
    let q = s.get("/queue").json();
    let slots = q["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 3);
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(slot["slot"], i + 1);
        assert_eq!(slot["instance"], (i + 1).to_string());
        assert_eq!(slot["state"], "empty");
        assert_eq!(slot["holder"], Value::Null);
    }
    let statuses: Vec<&str> = q["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["active", "active", "active", "waiting", "waiting"]
    );
    // Ending an ACTIVE one promotes the first in line; the positions close up.
    s.delete(&format!("/session/{}", created[1].0))
        .expect_empty(204);
    s.expect_session(&created[3].0, "active", 0);
    s.expect_session(&created[4].0, "waiting", 1);
    let metrics = s.get("/metrics").text();
    assert!(
        metrics.contains("neops_remote_lab_sessions{status=\"active\"} 3"),
        "{metrics}"
    );
}

#[test]
fn three_labs_start_at_once_each_in_its_own_instance_directory_and_subnet() {
    let s = start_slots(3, &[]);
    // Each `up` waits at a gate until all three are at theirs: run one after another,
    // the first would wait there for ever.
    s.gate_ups();
    let ids: Vec<String> = (0..3).map(|_| s.create_session().0).collect();
    let answers = std::thread::scope(|scope| {
        let answers = scope.spawn(|| acquire_three_at_once(&s, &ids));
        s.open_up_gates(3);
        answers.join().unwrap()
    });
    for r in answers {
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // The three `up`s ran at the same time: each began before any of them ended.
    let ups = ups(&s);
    assert_eq!(ups.len(), 3, "{ups:?}");
    let last_start = ups.iter().map(|u| u.1).fold(f64::MIN, f64::max);
    let first_end = ups.iter().map(|u| u.2).fold(f64::MAX, f64::min);
    assert!(last_start < first_end, "the ups did not overlap: {ups:?}");

    // Every `up` had the plugin and its id; nobody ran netlab's `default` instance, and
    // every inspect ran in the directory of a lab of its own instance.
    let registered = instances(&s);
    let lab_dirs: BTreeSet<&str> = registered.iter().map(|r| r.1.as_str()).collect();
    let mut ids_used = BTreeSet::new();
    for v in s.call_records() {
        if v["argv"][0] == "up" {
            assert_eq!(v["env"]["NETLAB_PLUGIN"], "multilab", "{v}");
            ids_used.insert(v["env"]["NETLAB_MULTILAB_ID"].as_str().unwrap().to_owned());
        }
        if v["argv"][0] == "inspect" {
            assert!(lab_dirs.contains(v["cwd"].as_str().unwrap()), "{v}");
        }
    }
    assert_eq!(
        ids_used,
        BTreeSet::from(["1".into(), "2".into(), "3".into()])
    );

    let keys: Vec<&str> = registered.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(keys, ["1", "2", "3"]);
    let dirs: BTreeSet<&str> = registered.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(dirs.len(), 3);
    let names: Vec<&str> = registered.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(names, ["ml-1", "ml-2", "ml-3"]);
    assert_eq!(s.work_dirs().len(), 3);

    // Each session sees its own lab only, with its instance's management subnet.
    let mut subnets = BTreeSet::new();
    for (id, (_, text)) in ids.iter().zip(TOPOLOGIES) {
        let devices = s.lab("GET", "/lab/devices", id).json();
        let expected: Vec<String> = text["nodes: [".len()..text.len() - 2]
            .split(", ")
            .map(str::to_owned)
            .collect();
        assert_eq!(node_names(&devices), expected);
        let ip = devices[0]["raw"]["mgmt"]["ipv4"]
            .as_str()
            .unwrap()
            .to_owned();
        let subnet = ip.rsplit_once('.').unwrap().0.to_owned();
        assert_ne!(subnet, "192.168.121");
        subnets.insert(subnet);
        let lab = s.lab("GET", "/lab", id).json();
        assert_eq!(lab["running"], true);
        assert_eq!(lab["ref_count"], 1);
    }
    assert_eq!(subnets.len(), 3, "{subnets:?}");

    // The views show every slot; without a session, GET /lab describes them.
    let q = s.get("/queue").json();
    let held: Vec<(&str, &str)> = q["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["state"].as_str().unwrap(),
                v["topology"].as_str().unwrap(),
            )
        })
        .collect();
    let mut topologies: Vec<&str> = held.iter().map(|h| h.1).collect();
    topologies.sort_unstable();
    assert_eq!(topologies, ["a.yml", "b.yml", "c.yml"]);
    assert!(held.iter().all(|h| h.0 == "running"));
    let holders: BTreeSet<String> = q["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["holder"].as_str().unwrap().to_owned())
        .collect();
    let prefixes: BTreeSet<String> = ids.iter().map(|id| id[..8].to_owned()).collect();
    assert_eq!(holders, prefixes);
    let slots = s.get("/lab").json();
    assert_eq!(slots["slots"].as_array().unwrap().len(), 3);
    assert_eq!(slots["slots"][0]["state"], "running");
    let metrics = s.get("/metrics").text();
    for n in 1..=3 {
        let line = format!("neops_remote_lab_slot_lab_up{{slot=\"{n}\",instance=\"{n}\"}} 1");
        assert!(metrics.contains(&line), "{metrics}");
    }
    // The status page has a card per slot.
    let page = s.get("/").text();
    for n in 1..=3 {
        assert!(page.contains(&format!("slot {n} · instance {n}")), "{page}");
    }
    // Each slot has its own live log.
    let log = s.get("/lab/log?slot=2");
    assert_eq!(log.status, 200);
    assert!(log.text().contains("$ netlab up "), "{}", log.text());
    assert_eq!(s.get("/lab/log?slot=4").status, 422);
}

#[test]
fn a_promoted_session_reuses_an_idle_lab_by_hash_and_a_replacement_stays_in_its_slot() {
    let s = start_slots(3, &[]);
    let ids = three_labs(&s);
    let (fourth, position) = s.create_session();
    assert_eq!(position, 1);
    // The first session releases its lab of a.yml and ends: the fourth is promoted.
    s.lab("POST", "/lab/release", &ids[0]).expect_empty(204);
    s.delete(&format!("/session/{}", ids[0])).expect_empty(204);
    s.expect_session(&fourth, "active", 0);
    // Its a.yml finds the idle lab of the same topology: no new `up`.
    let ups_before = ups(&s).len();
    let r = s.acquire(&fourth, &Form::topology("again.yml", TOPOLOGIES[0].1));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reused"], true);
    assert_eq!(node_names(&r.json()["devices"]), ["a1"]);
    assert_eq!(ups(&s).len(), ups_before);
    // Replacing its own lab (released, another topology) reuses its slot's instance.
    s.lab("POST", "/lab/release", &fourth).expect_empty(204);
    let r = s.acquire(&fourth, &Form::topology("d.yml", "nodes: [d1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reused"], false);
    // And again with reuse=false on the same topology.
    s.lab("POST", "/lab/release", &fourth).expect_empty(204);
    let form = Form::topology("d.yml", "nodes: [d1]\n").text("reuse", "false");
    assert_eq!(s.acquire(&fourth, &form).status, 200);
    let used: BTreeSet<String> = ups(&s).into_iter().map(|u| u.0).collect();
    assert_eq!(used, BTreeSet::from(["1".into(), "2".into(), "3".into()]));
    wait_until(
        Duration::from_secs(10),
        "the replaced labs torn down",
        || instances(&s).len() == 3 && s.work_dirs().len() == 3,
    );
    // The second session ends holding its lab: it is torn down, and its slot goes to the
    // fifth session; the labs still held are not touched.
    let (fifth, _) = s.create_session();
    s.delete(&format!("/session/{}", ids[1])).expect_empty(204);
    s.expect_session(&fifth, "active", 0);
    let r = s.acquire(&fifth, &Form::topology("e.yml", "nodes: [e1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        node_names(&s.lab("GET", "/lab/devices", &ids[2]).json()),
        ["c1", "c2", "c3"]
    );
    let used: BTreeSet<String> = ups(&s).into_iter().map(|u| u.0).collect();
    assert_eq!(used.len(), 3, "{used:?}");
    assert_eq!(instances(&s).len(), 3);
}

#[test]
fn a_failed_up_in_one_slot_leaves_the_other_two_serving() {
    let s = start_slots(3, &[]);
    let ids: Vec<String> = (0..3).map(|_| s.create_session().0).collect();
    for (id, (name, text)) in ids.iter().zip(TOPOLOGIES).take(2) {
        assert_eq!(s.acquire(id, &Form::topology(name, text)).status, 200);
    }
    let r = s.acquire(&ids[2], &Form::topology("bad.yml", "fake: reject\n"));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .starts_with("netlab rejected the topology: ")
    );
    for id in &ids[..2] {
        assert_eq!(s.lab("GET", "/lab/devices", id).status, 200);
    }
    s.lab("GET", "/lab/devices", &ids[2])
        .expect(404, r#"{"detail":"No lab running"}"#);
    assert_eq!(instances(&s).len(), 2);
    // The third slot works on the next try.
    let (name, text) = TOPOLOGIES[2];
    assert_eq!(s.acquire(&ids[2], &Form::topology(name, text)).status, 200);
    assert_eq!(instances(&s).len(), 3);
    // An operator tears one slot down by number (no --token-file: anyone may).
    s.delete("/lab?slot=9&force=true").expect(
        422,
        r#"{"detail":[{"type":"enum","loc":["query","slot"],"msg":"Input should be a slot number from 1 to 3","input":"9"}]}"#,
    );
    s.delete("/lab?slot=2&force=true").expect_empty(202);
    wait_until(Duration::from_secs(10), "slot 2 torn down", || {
        s.get("/queue").json()["slots"][1]["state"] == "empty"
    });
    assert_eq!(instances(&s).len(), 2);
    s.delete("/lab?slot=2&force=true").expect_empty(204);
}

#[test]
fn kill_9_with_three_held_labs_and_a_restart_readopt_all_three_without_an_up() {
    let s = start_slots(3, &[]);
    let ids = three_labs(&s);
    let devices: Vec<String> = ids
        .iter()
        .map(|id| s.lab("GET", "/lab/devices", id).text())
        .collect();
    let dir = s.kill_keep_dir();
    std::fs::remove_file(dir.path().join("fake/calls.log")).unwrap();
    let s = TestServer::start(Options::default().in_dir(dir).arg("--slots", "3"));
    for (id, devices) in ids.iter().zip(&devices) {
        s.expect_session(id, "active", 0);
        s.lab("GET", "/lab/devices", id).expect(200, devices);
    }
    let calls = s.call_lines();
    assert!(
        !calls
            .iter()
            .any(|l| l.starts_with("up ") || l.starts_with("down ")),
        "{calls:?}"
    );
    assert_eq!(instances(&s).len(), 3);
    let q = s.get("/queue").json();
    assert!(
        q["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "running" && v["ref_count"] == 1)
    );
}

#[test]
fn cleanup_tears_down_every_slot_and_leaves_no_instance() {
    let mut s = start_slots(3, &[("--on-exit", "keep")]);
    three_labs(&s);
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(instances(&s).len(), 3);
    let out = server_command()
        .args(["cleanup", "--slots", "3", "--state-dir"])
        .arg(s.state_dir())
        .arg("--netlab")
        .arg(fake_netlab())
        .env("FAKE_NETLAB_DIR", s.fake_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(instances(&s), []);
    assert!(s.work_dirs().is_empty());
    assert!(!s.state_dir().join("state.json").exists());
}

#[test]
fn a_slot_asks_netlab_status_only_until_it_knows_its_instance() {
    // The first start of a slot asks where its instance runs (before `up`) and whether
    // netlab registered it there (after); once the slot tore its own lab down, the next
    // start is `up` and the one inspect, nothing else.
    let s = start_slots(2, &[]);
    s.clear_calls(); // the start-up's own look at netlab
    let (a, _) = s.create_session();
    let form = || Form::topology(TOPOLOGIES[1].0, TOPOLOGIES[1].1);
    assert_eq!(s.acquire(&a, &form()).status, 200);
    let mut first: Vec<String> = s
        .call_lines()
        .into_iter()
        .map(|l| l.split(" __import__").next().unwrap().to_owned())
        .collect();
    // The inspect may run while `up` is still at work (after the snapshot is written),
    // so before or after the check that follows `up`.
    first[2..].sort();
    assert_eq!(
        first,
        [
            "status --all --format json",
            "up b.yml",
            "inspect -q --format json",
            "status --all --format json",
        ]
    );
    assert_eq!(s.lab("DELETE", "/lab", &a).status, 202);
    wait_until(Duration::from_secs(10), "the lab torn down", || {
        instances(&s).is_empty() && s.work_dirs().is_empty()
    });
    s.clear_calls();
    assert_eq!(s.acquire(&a, &form()).status, 200);
    assert_eq!(instances(&s)[0].0, "1", "the first empty slot again");
    let again: Vec<String> = s
        .call_lines()
        .into_iter()
        .map(|l| l.split(" __import__").next().unwrap().to_owned())
        .collect();
    assert_eq!(again, ["up b.yml", "inspect -q --format json"]);
    assert_eq!(instances(&s).len(), 1);
}
