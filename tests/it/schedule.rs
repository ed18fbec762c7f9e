//! Declared topologies (`X-Topology-SHA256`) and lab-aware promotion, over HTTP against the
//! real binary and the fake netlab: who goes next, what the views show, what a restart keeps.

use sha2::{Digest, Sha256};

use crate::common::*;

const TOPO_A: &str = "nodes: [r1, r2]\n";
const TOPO_B: &str = "nodes: [s1]\n";

fn sha(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A session that declares `topology` (by its hash) and names itself `name`.
fn declare(s: &TestServer, name: &str, topology: &str) -> String {
    let hash = sha(topology);
    let r = s.request(
        "POST",
        "/session",
        &[("X-Client-Name", name), ("X-Topology-SHA256", &hash)],
        b"",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session_id"].as_str().unwrap().to_owned()
}

/// Acquires `topology` with reuse, releases it: what `remote-lab run` does around a test.
fn use_lab(s: &TestServer, id: &str, topology: &str) -> bool {
    let r = s.acquire(id, &Form::topology("t.yml", topology).text("reuse", "true"));
    assert_eq!(r.status, 200, "{}", r.text());
    s.lab("POST", "/lab/release", id).expect_empty(204);
    r.json()["reused"].as_bool().unwrap()
}

fn ups(s: &TestServer) -> usize {
    s.call_lines()
        .iter()
        .filter(|l| l.starts_with("up "))
        .count()
}

fn metric(s: &TestServer, name: &str) -> u64 {
    let text = s.get("/metrics").text();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("neops_remote_lab_{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn queue_row(s: &TestServer, id: &str) -> serde_json::Value {
    s.get("/queue").json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id[..8])
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in /queue"))
}

/// A holder of A, then A, B, A waiting: the holder ends, the first A attaches to the lab;
/// it ends, the second A goes ahead of B and attaches too. One `netlab up` for three A's.
#[test]
fn a_session_that_declared_the_idle_lab_goes_before_the_one_that_did_not() {
    let s = start();
    let holder = declare(&s, "holder", TOPO_A);
    assert!(!use_lab(&s, &holder, TOPO_A));
    let a1 = declare(&s, "a1", TOPO_A);
    let b = declare(&s, "b", TOPO_B);
    let a2 = declare(&s, "a2", TOPO_A);
    assert_eq!(queue_row(&s, &b)["declared"], sha(TOPO_B)[..12]);

    s.delete(&format!("/session/{holder}")).expect_empty(204);
    s.expect_session(&a1, "active", 0);
    assert!(use_lab(&s, &a1, TOPO_A));
    s.delete(&format!("/session/{a1}")).expect_empty(204);
    s.expect_session(&a2, "active", 0);
    // B's position did not move up, and did not grow either.
    s.expect_session(&b, "waiting", 1);
    assert!(use_lab(&s, &a2, TOPO_A));
    assert_eq!(ups(&s), 1);

    let row = queue_row(&s, &a2);
    assert_eq!(row["promoted_ahead"], true);
    assert_eq!(row["skips"], 0);
    let row = queue_row(&s, &b);
    assert_eq!(
        (row["skips"].as_u64(), row["position"].as_u64()),
        (Some(1), Some(1))
    );
    let events = s.get("/events?limit=100").json();
    let ahead: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "promoted_ahead")
        .collect();
    assert_eq!(ahead.len(), 1, "{events}");
    assert_eq!(ahead[0]["session"], a2[..8]);
    assert_eq!(ahead[0]["client"], "a2");
    assert_eq!(ahead[0]["hash"], sha(TOPO_A)[..12]);
    assert_eq!(ahead[0]["passed"][0]["session"], b[..8]);
    assert_eq!(ahead[0]["passed"][0]["client"], "b");
    assert_eq!(metric(&s, "promotions_ahead_total"), 1);
    assert_eq!(metric(&s, "skips_total"), 1);
    assert_eq!(metric(&s, "ups_avoided_total"), 1);
    let page = s.get("/").text();
    assert!(page.contains("promoted ahead"), "{page}");
    assert!(page.contains("passed 1×"), "{page}");

    s.delete(&format!("/session/{a2}")).expect_empty(204);
    s.expect_session(&b, "active", 0);
    assert!(!use_lab(&s, &b, TOPO_B));
    assert_eq!(ups(&s), 2);
}

/// `--max-skips 0`: the same queue is served in order, and the lab is replaced each time.
#[test]
fn max_skips_zero_keeps_strict_fifo() {
    let s = start_with(&[("--max-skips", "0")]);
    let holder = declare(&s, "holder", TOPO_A);
    assert!(!use_lab(&s, &holder, TOPO_A));
    let a1 = declare(&s, "a1", TOPO_A);
    let b = declare(&s, "b", TOPO_B);
    let a2 = declare(&s, "a2", TOPO_A);
    for (id, topology) in [(&holder, None), (&a1, Some(TOPO_A)), (&b, Some(TOPO_B))] {
        if let Some(topology) = topology {
            use_lab(&s, id, topology);
        }
        s.delete(&format!("/session/{id}")).expect_empty(204);
    }
    s.expect_session(&a2, "active", 0);
    assert_eq!(metric(&s, "promotions_ahead_total"), 0);
    assert_eq!(ups(&s), 2);
}

#[test]
fn an_invalid_declaration_is_a_422_naming_the_header() {
    let s = start();
    for bad in [
        "abc".to_owned(),
        sha(TOPO_A) + "0",
        format!("{}  topology.yml", sha(TOPO_A)),
        "g".repeat(64),
    ] {
        let r = s.request("POST", "/session", &[("X-Topology-SHA256", &bad)], b"");
        let echoed = serde_json::to_string(&bad).unwrap();
        r.expect(
            422,
            &format!(
                r#"{{"detail":[{{"type":"string_pattern_mismatch","loc":["header","X-Topology-SHA256"],"msg":"String should match pattern '^[0-9a-fA-F]{{64}}$'","input":{echoed}}}]}}"#
            ),
        );
    }
    assert_eq!(s.get("/queue").json()["total"], 0);
    // Upper case spells the same hash.
    let upper = sha(TOPO_A).to_uppercase();
    let r = s.request("POST", "/session", &[("X-Topology-SHA256", &upper)], b"");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        s.get("/queue").json()["sessions"][0]["declared"],
        sha(TOPO_A)[..12]
    );
}

/// The declarations and skip counts are in the state file and come back after `kill -9`:
/// B, passed once before the restart, is passed once more with `--max-skips 2`, then never.
#[test]
fn a_restart_keeps_declarations_and_skip_counts() {
    let s = start();
    let holder = declare(&s, "holder", TOPO_A);
    assert!(!use_lab(&s, &holder, TOPO_A));
    let b = declare(&s, "b", TOPO_B);
    let a1 = declare(&s, "a1", TOPO_A);
    s.delete(&format!("/session/{holder}")).expect_empty(204);
    s.expect_session(&a1, "active", 0);
    let text = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
    assert!(
        text.contains(&format!("\"declared\":\"{}\"", sha(TOPO_B))),
        "{text}"
    );
    assert!(text.contains("\"skips\":1"), "{text}");
    assert!(text.contains("\"ahead\":true"), "{text}");

    let mut options = Options::default().in_dir(s.kill_keep_dir());
    options = options.arg("--max-skips", "2");
    let s = TestServer::start(options);
    s.expect_session(&a1, "active", 0);
    s.expect_session(&b, "waiting", 1);
    let row = queue_row(&s, &b);
    assert_eq!(row["declared"], sha(TOPO_B)[..12]);
    assert_eq!(row["skips"], 1);
    assert_eq!(queue_row(&s, &a1)["promoted_ahead"], true);
    // The lab was re-adopted: idle, A. One more A passes B (its second skip)...
    assert!(use_lab(&s, &a1, TOPO_A));
    let a2 = declare(&s, "a2", TOPO_A);
    s.delete(&format!("/session/{a1}")).expect_empty(204);
    s.expect_session(&a2, "active", 0);
    assert_eq!(queue_row(&s, &b)["skips"], 2);
    // ...and no more: B goes next although another A waits behind it.
    let a3 = declare(&s, "a3", TOPO_A);
    s.delete(&format!("/session/{a2}")).expect_empty(204);
    s.expect_session(&b, "active", 0);
    s.expect_session(&a3, "waiting", 1);
}
