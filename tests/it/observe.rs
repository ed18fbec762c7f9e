//! Everyone can see the lab host: client names, `GET /queue`, `GET /events`, `GET /lab/log`,
//! `GET /metrics` and the status page `GET /`, against the real binary and the fake netlab.
//! (The Prometheus parser test and the browser test are in tests/observe_py.)

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const TOPO: &str = "nodes: [r1, r2]\n# secret-topology-marker\n";

fn named_session(s: &TestServer, name: &str, agent: &str) -> String {
    let r = s.request(
        "POST",
        "/session",
        &[("X-Client-Name", name), ("User-Agent", agent)],
        b"",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session_id"].as_str().unwrap().to_owned()
}

fn hex_sha256_prefix(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..12]
        .to_owned()
}

fn name_error(kind: &str, msg: &str) -> String {
    format!(
        r#"{{"detail":[{{"type":"{kind}","loc":["header","X-Client-Name"],"msg":"{msg}","input":null}}]}}"#
    )
}

#[test]
fn bad_client_names_are_422_and_nothing_is_created() {
    let s = start();
    let too_long = "x".repeat(201);
    let long = s.request("POST", "/session", &[("X-Client-Name", &too_long)], b"");
    long.expect(
        422,
        &name_error(
            "string_too_long",
            "X-Client-Name should have at most 200 characters",
        ),
    );
    let control = name_error(
        "string_pattern_mismatch",
        "X-Client-Name must be printable: no control characters, bidi controls or line separators",
    );
    // A right-to-left override and a line separator, percent-encoded as names beyond ASCII are.
    for name in ["job%E2%80%AEfdp", "a%E2%80%A8b"] {
        s.request("POST", "/session", &[("X-Client-Name", name)], b"")
            .expect(422, &control);
    }
    s.request("POST", "/session", &[("X-Client-Name", "a\x01b")], b"")
        .expect(422, &control);
    s.request("POST", "/session", &[("X-Client-Name", "a%0Ab")], b"")
        .expect(422, &control);
    s.request("POST", "/session", &[("X-Client-Name", "job%FF%FE")], b"")
        .expect(
            422,
            &name_error(
                "string_unicode",
                "X-Client-Name must be valid UTF-8 (percent-encode characters beyond ASCII)",
            ),
        );
    // Raw bytes beyond ASCII in a header never reach the server's code: the HTTP layer
    // (tiny_http) drops such a connection without an answer. No 500, nothing created.
    {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(s.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"POST /session HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\nX-Client-Name: caf\xc3\xa9 \xff\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert_eq!(String::from_utf8_lossy(&answer), "");
    }
    assert_eq!(s.get("/queue").json()["total"], 0);
    // 200 characters (here 200 non-ASCII ones, percent-encoded) are fine.
    let ok = named_session(&s, &"%C3%A9".repeat(200), "t");
    let q = s.get("/queue").json();
    assert_eq!(q["sessions"][0]["client_name"], "é".repeat(200));
    assert_eq!(q["sessions"][0]["id"], ok[..8]);
}

#[test]
fn the_queue_view_shows_every_field_and_never_a_full_id() {
    let s = start_with(&[("--active-timeout", "30"), ("--waiting-timeout", "60")]);
    // The server's times are whole milliseconds (a session created in the millisecond
    // `before` was taken in says that millisecond): `before` is cut to its millisecond too.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
        / 1000.0;
    let empty = s.get("/queue").json();
    assert_eq!(empty["total"], 0);
    assert_eq!(empty["sessions"], serde_json::json!([]));
    assert_eq!(empty["truncated"], false);
    assert_eq!(empty["operation"], Value::Null);
    assert_eq!(
        empty["lab"],
        serde_json::json!({"running": false, "topology": null, "hash": null, "devices": 0,
            "device_names": [], "device_list": [], "started_at": null, "ref_count": 0,
            "idle_since": null})
    );

    let a = named_session(&s, "https://ci.example/job/1", "agent-a");
    let b = named_session(&s, "host-b", "agent-b");
    let c = s.post("/session").json()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.acquire(&a, &Form::topology("topo.yml", TOPO)).status, 200);

    let r = s.get("/queue");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    for id in [&a, &b, &c] {
        assert!(!r.text().contains(id.as_str()), "full id listed");
    }
    let q = r.json();
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let time = q["time"].as_f64().unwrap();
    assert!(before <= time && time <= after, "{time}");
    assert_eq!(q["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(q["active_timeout"], 30.0);
    assert_eq!(q["waiting_timeout"], 60.0);
    assert_eq!(q["total"], 3);
    assert_eq!(q["truncated"], false);
    assert_eq!(q["operation"], Value::Null);
    assert_eq!(q["teardowns_pending"], 0);
    let lab = &q["lab"];
    assert_eq!(lab["running"], true);
    assert_eq!(lab["topology"], "topo.yml");
    assert_eq!(lab["hash"], hex_sha256_prefix(TOPO));
    assert_eq!(lab["devices"], 2);
    assert_eq!(lab["device_names"], serde_json::json!(["r1", "r2"]));
    assert_eq!(
        lab["device_list"],
        serde_json::json!([
            {"name": "r1", "mgmt": "192.168.121.101", "type": "frr", "box": "fake/frr"},
            {"name": "r2", "mgmt": "192.168.121.102", "type": "frr", "box": "fake/frr"},
        ])
    );
    let started = lab["started_at"].as_f64().unwrap();
    assert!(before <= started && started <= after);
    assert_eq!(lab["ref_count"], 1);
    assert_eq!(lab["idle_since"], Value::Null);

    let sessions = q["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3);
    let expect = [
        (
            &a,
            "active",
            Some("https://ci.example/job/1"),
            Some("agent-a"),
        ),
        (&b, "waiting", Some("host-b"), Some("agent-b")),
        (&c, "waiting", None, None),
    ];
    let mut created = 0.0;
    for (position, (row, (id, status, name, _agent))) in sessions.iter().zip(expect).enumerate() {
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        let mut want = [
            "position",
            "status",
            "id",
            "client_name",
            "owner",
            "address",
            "user_agent",
            "created_at",
            "active_since",
            "last_seen_ago",
            "holds_lab",
            "acquiring",
            "declared",
            "skips",
            "promoted_ahead",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(row["position"], position);
        assert_eq!(row["status"], status);
        assert_eq!(row["id"], id[..8]);
        assert_eq!(row["client_name"], serde_json::json!(name));
        assert_eq!(row["owner"], Value::Null);
        assert_eq!(row["address"], "127.0.0.1");
        let c_at = row["created_at"].as_f64().unwrap();
        assert!(c_at >= created && before <= c_at && c_at <= after);
        created = c_at;
        assert!(row["last_seen_ago"].as_f64().unwrap() >= 0.0);
        assert_eq!(row["holds_lab"], position == 0);
        assert_eq!(row["acquiring"], false);
        assert_eq!(row["active_since"].is_number(), position == 0);
    }
    assert_eq!(sessions[0]["user_agent"], "agent-a");
    assert_eq!(sessions[1]["user_agent"], "agent-b");
    // The harness sends no User-Agent.
    assert_eq!(sessions[2]["user_agent"], Value::Null);

    // The limit cuts the list, not the total.
    let q = s.get("/queue?limit=2").json();
    assert_eq!(
        (q["total"].as_u64(), q["truncated"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(q["sessions"].as_array().unwrap().len(), 2);
    let q = s.get("/queue?limit=0").json();
    assert_eq!(q["sessions"], serde_json::json!([]));
    assert_eq!(q["truncated"], true);

    // Released and the holder gone: the lab is idle, the next one is active since then.
    assert_eq!(s.lab("POST", "/lab/release", &a).status, 204);
    s.delete(&format!("/session/{a}")).expect_empty(204);
    let q = s.get("/queue").json();
    assert_eq!(q["lab"]["ref_count"], 0);
    assert_eq!(q["sessions"][0]["id"], b[..8]);
    assert_eq!(q["sessions"][0]["holds_lab"], false);
    assert!(q["sessions"][0]["active_since"].is_number());
    assert_eq!(q["sessions"][1]["position"], 1);
}

#[test]
fn a_start_in_progress_and_its_live_output_are_visible_before_it_ends() {
    let s = start();
    let a = named_session(&s, "slow-job", "t");
    s.set_control("up.say", "deploying r1\nwaiting for r1\n");
    s.set_control("up.sleep", "3");
    let pending = s.acquire_during_up(&a, Form::topology("topo.yml", TOPO));
    let mut log = String::new();
    wait_until(Duration::from_secs(10), "netlab's first lines", || {
        let r = s.get("/lab/log?offset=0");
        log = r.text();
        log.contains("waiting for r1")
    });
    let r = s.get("/lab/log?offset=0");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("x-log-command"), Some("up"));
    assert_eq!(r.header("x-log-done"), Some("false"));
    let offset: u64 = r.header("x-log-offset").unwrap().parse().unwrap();
    assert_eq!(offset, r.body.len() as u64);
    assert!(r.text().contains("$ netlab up topo.yml\n"), "{}", r.text());
    assert!(
        r.text().ends_with("deploying r1\nwaiting for r1\n"),
        "{}",
        r.text()
    );
    // Following from the offset gives nothing new yet, and says so.
    let next = s.get(&format!("/lab/log?offset={offset}"));
    assert_eq!(next.text(), "");
    assert_eq!(
        next.header("x-log-offset"),
        Some(offset.to_string().as_str())
    );
    // The queue view shows the start in progress.
    let q = s.get("/queue").json();
    assert_eq!(q["operation"]["command"], "up");
    assert_eq!(q["operation"]["session"], a[..8]);
    assert_eq!(q["sessions"][0]["acquiring"], true);
    let m = s.get("/metrics").text();
    assert!(m.contains("\nneops_remote_lab_lab_start_in_progress 1\n"));

    assert_eq!(pending.join().unwrap().status, 200);
    let done = s.get(&format!("/lab/log?offset={offset}"));
    assert_eq!(done.header("x-log-done"), Some("true"));
    assert!(done.text().contains("lab is up"), "{}", done.text());
    let whole = s.get("/lab/log?command=up").text();
    assert!(!whole.contains("secret-topology-marker"));
    assert_eq!(s.get("/queue").json()["operation"], Value::Null);

    // A teardown becomes the latest job; the last start stays readable.
    let end: u64 = done.header("x-log-offset").unwrap().parse().unwrap();
    s.delete(&format!("/session/{a}")).expect_empty(204);
    wait_until(Duration::from_secs(10), "the teardown's output", || {
        let r = s.get(&format!("/lab/log?offset={end}"));
        r.header("x-log-command") == Some("down") && r.header("x-log-done") == Some("true")
    });
    let down = s.get(&format!("/lab/log?offset={end}"));
    assert!(
        down.text().starts_with("$ netlab down --cleanup\n"),
        "{}",
        down.text()
    );
    assert_eq!(s.get("/lab/log?command=up").text(), whole);
}

#[test]
fn bad_numbers_in_queries_are_422() {
    let s = start();
    let cases = [
        (
            "/queue?limit=-1",
            "limit",
            "greater_than_equal",
            "Input should be greater than or equal to 0",
            "-1",
        ),
        (
            "/queue?limit=abc",
            "limit",
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
            "abc",
        ),
        (
            "/queue?limit=1000001",
            "limit",
            "less_than_equal",
            "Input should be less than or equal to 1000000",
            "1000001",
        ),
        (
            "/events?limit=99999999999999999999999",
            "limit",
            "less_than_equal",
            "Input should be less than or equal to 10000",
            "99999999999999999999999",
        ),
        (
            "/events?since=-5",
            "since",
            "greater_than_equal",
            "Input should be greater than or equal to 0",
            "-5",
        ),
        (
            "/events?since=1.5",
            "since",
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
            "1.5",
        ),
        (
            "/events?since=9007199254740993",
            "since",
            "less_than_equal",
            "Input should be less than or equal to 9007199254740992",
            "9007199254740993",
        ),
        (
            "/lab/log?offset=-1",
            "offset",
            "greater_than_equal",
            "Input should be greater than or equal to 0",
            "-1",
        ),
        (
            "/lab/log?offset=x1",
            "offset",
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
            "x1",
        ),
        (
            "/lab/log?offset=18446744073709551616",
            "offset",
            "less_than_equal",
            "Input should be less than or equal to 9007199254740992",
            "18446744073709551616",
        ),
    ];
    for (path, name, kind, msg, input) in cases {
        s.get(path).expect(
            422,
            &format!(
                r#"{{"detail":[{{"type":"{kind}","loc":["query","{name}"],"msg":"{msg}","input":"{input}"}}]}}"#
            ),
        );
    }
    s.get("/lab/log?command=sideways").expect(
        422,
        r#"{"detail":[{"type":"enum","loc":["query","command"],"msg":"Input should be 'up' or 'down'","input":"sideways"}]}"#,
    );
    // Nothing was counted as a server error.
    assert!(!s.get("/metrics").text().contains("code=\"5xx\""));
}

fn events(s: &TestServer, query: &str) -> Vec<Value> {
    let v = s.get(&format!("/events{query}")).json();
    v["events"].as_array().unwrap().clone()
}

fn kinds(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn events_are_kept_newest_first_and_survive_a_restart() {
    let mut s = start();
    let a = named_session(&s, "first", "agent-a");
    let b = named_session(&s, "second", "agent-b");
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    assert_eq!(s.lab("POST", "/lab/release", &a).status, 204);
    assert_eq!(s.lab("POST", "/lab/release", &a).status, 204);
    s.delete(&format!("/session/{a}")).expect_empty(204);
    let list = events(&s, "");
    assert_eq!(
        kinds(&list),
        [
            "session_promoted",
            "session_ended",
            "lab_released",
            "lab_released",
            "lab_reused",
            "lab_started",
            "lab_start_begun",
            "session_created",
            "session_created",
            "server_started",
        ]
    );
    let ids: Vec<u64> = list.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=10).rev().collect::<Vec<u64>>());
    assert_eq!(s.get("/events").json()["last_id"], 10);
    for e in &list {
        let t = e["time"].as_f64().unwrap();
        assert!(t > 1.7e9, "{e}");
        let text = e.to_string();
        assert!(
            !text.contains(&a) && !text.contains(&b),
            "full id in {text}"
        );
    }
    let (pa, pb) = (&a[..8], &b[..8]);
    let at = |kind: &str| list.iter().find(|e| e["kind"] == kind).unwrap().clone();
    let created_a = &list[8];
    assert_eq!(created_a["session"], pa);
    assert_eq!(created_a["client"], "first");
    assert_eq!(created_a["position"], 0);
    assert_eq!(created_a["addr"], "127.0.0.1");
    assert_eq!(created_a["user_agent"], "agent-a");
    assert_eq!(list[7]["position"], 1);
    let begun = at("lab_start_begun");
    assert_eq!(
        (begun["session"].as_str(), begun["client"].as_str()),
        (Some(pa), Some("first"))
    );
    assert_eq!(begun["topology"], "t.yml");
    assert_eq!(begun["hash"], hex_sha256_prefix(TOPO));
    let started = at("lab_started");
    assert_eq!(started["devices"], 2);
    assert!(started["duration_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(at("lab_reused")["ref_count"], 2);
    assert_eq!(list[2]["ref_count"], 0);
    assert_eq!(list[3]["ref_count"], 1);
    let ended = at("session_ended");
    assert_eq!(ended["reason"], "deleted");
    assert_eq!(ended["was_active"], true);
    assert!(ended["held_s"].as_f64().unwrap() >= 0.0);
    let promoted = at("session_promoted");
    assert_eq!(
        (promoted["session"].as_str(), promoted["client"].as_str()),
        (Some(pb), Some("second"))
    );
    assert!(promoted["waited_s"].as_f64().unwrap() >= 0.0);
    let server = at("server_started");
    assert_eq!(server["restored_sessions"], 0);
    assert_eq!(server["lab"], "none");
    assert_eq!(server["version"], env!("CARGO_PKG_VERSION"));

    // limit and since.
    assert_eq!(
        kinds(&events(&s, "?limit=2")),
        ["session_promoted", "session_ended"]
    );
    let newer: Vec<u64> = events(&s, "?since=7")
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(newer, [10, 9, 8]);
    assert!(events(&s, "?since=10").is_empty());
    assert!(events(&s, "?limit=0").is_empty());

    let before_restart = s.get("/queue").json()["sessions"][0].clone();
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let file = std::fs::read_to_string(s.state_dir().join("events.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 13, "{file}");
    let dir = s.take_dir();
    let s = start_in(dir);
    let list = events(&s, "");
    assert_eq!(
        kinds(&list)[..5],
        [
            "server_started",
            "teardown_done",
            "teardown_begun",
            "server_stopping",
            "session_promoted"
        ]
    );
    assert_eq!(list[0]["id"], 14);
    assert_eq!(list[0]["restored_sessions"], 1);
    assert_eq!(list[0]["lab"], "none");
    assert_eq!(list[1]["success"], true);
    assert_eq!(list.len(), 14);
    // The queued session kept its name, address, agent and times.
    let after_restart = s.get("/queue").json()["sessions"][0].clone();
    for key in [
        "id",
        "client_name",
        "address",
        "user_agent",
        "created_at",
        "active_since",
    ] {
        assert_eq!(after_restart[key], before_restart[key], "{key}");
    }
    assert_eq!(after_restart["client_name"], "second");
}

#[test]
fn the_event_file_rotates_to_one_older_file() {
    let options = Options {
        env: vec![("NEOPS_REMOTE_LAB_EVENTS_ROTATE_BYTES".into(), "2000".into())],
        ..Options::default()
    };
    let mut s = TestServer::start(options);
    for n in 0..15 {
        let id = named_session(&s, &format!("rotating-{n}"), "t");
        s.delete(&format!("/session/{id}")).expect_empty(204);
    }
    let last = 1 + 15 * 2;
    assert_eq!(s.get("/events").json()["last_id"], last);
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let state = s.state_dir();
    let main = std::fs::metadata(state.join("events.jsonl")).unwrap().len();
    let old = std::fs::read_to_string(state.join("events.jsonl.1")).unwrap();
    assert!(main < 2000 + 400, "{main}");
    assert!(old.len() >= 2000 && old.len() < 2000 + 400, "{}", old.len());
    assert!(!state.join("events.jsonl.2").exists());
    // Everything the two files hold comes back, in order, and ids go on.
    let dir = s.take_dir();
    let s = start_in(dir);
    let list = events(&s, "?limit=10000");
    let ids: Vec<u64> = list.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids[0], last + 2);
    assert!(ids.windows(2).all(|w| w[0] == w[1] + 1), "{ids:?}");
    assert!(
        *ids.last().unwrap() > 1,
        "the oldest events were rotated away"
    );
}

#[test]
fn the_status_page_escapes_names_and_links_the_api() {
    let s = start();
    let evil = "<img src=x onerror=alert(1)>";
    named_session(&s, evil, "t");
    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = r.text();
    assert!(!html.contains(evil));
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt; ("),
        "{html}"
    );
    assert!(html.contains("href=\"/openapi.json\""));
    assert!(html.contains("href=\"/metrics\""));
    assert!(html.contains(env!("CARGO_PKG_VERSION")));
    assert!(html.contains("<div class=\"big down\">DOWN</div>"));
    let head = s.request("HEAD", "/", &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

/// Without JavaScript too, the page lists each device with its management address and type
/// from netlab's data.
#[test]
fn the_status_page_shows_management_addresses() {
    let s = start();
    let (id, _) = s.create_session();
    let r = s.acquire(&id, &Form::topology("t.yml", "nodes: [r1, h1]\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    let html = s.get("/").text();
    for (name, mgmt) in [("r1", "192.168.121.101"), ("h1", "192.168.121.102")] {
        let item = format!(
            "<li class=\"device\"><span class=\"device-name\">{name}</span> \
             <span class=\"device-mgmt\">{mgmt}</span> \
             <span class=\"device-type muted\">frr · fake/frr</span></li>"
        );
        assert!(html.contains(&item), "{item} missing in\n{html}");
    }
}

#[test]
fn metrics_count_requests_by_route_without_a_session() {
    let s = start();
    let (id, _) = s.create_session();
    for _ in 0..3 {
        s.request("POST", "/session/heartbeat", &[("X-Session-ID", &id)], b"")
            .expect_empty(204);
    }
    s.expect_session(&id, "active", 0);
    s.get("/session/nope").expect(404, SESSION_NOT_FOUND);
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    for line in [
        "neops_remote_lab_http_requests_total{route=\"/session/heartbeat\",code=\"2xx\"} 3",
        "neops_remote_lab_http_requests_total{route=\"/session/{session_id}\",code=\"2xx\"} 1",
        "neops_remote_lab_http_requests_total{route=\"/session/{session_id}\",code=\"4xx\"} 1",
        "neops_remote_lab_http_requests_total{route=\"/session\",code=\"2xx\"} 1",
        "neops_remote_lab_sessions{status=\"active\"} 1",
        "neops_remote_lab_sessions_created_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    // Reading the views refreshes no session and needs none.
    let q = s.get("/queue").json();
    assert!(q["sessions"][0]["last_seen_ago"].as_f64().unwrap() >= 0.0);
}

#[test]
fn with_tokens_the_views_name_the_owner_and_it_survives_a_restart() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ci:ci-token-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tokens = tokens.display().to_string();
    let auth = ("Authorization", "Bearer ci-token-0123456789abcdef");
    let mut s = TestServer::start(Options::default().in_dir(dir).arg("--token-file", &tokens));
    let r = s.request("POST", "/session", &[auth, ("X-Client-Name", "job-7")], b"");
    assert_eq!(r.status, 201);
    let q = s.request("GET", "/queue", &[auth], b"").json();
    assert_eq!(q["sessions"][0]["owner"], "ci");
    assert_eq!(q["sessions"][0]["client_name"], "job-7");
    let e = s.request("GET", "/events?limit=1", &[auth], b"").json();
    assert_eq!(e["events"][0]["owner"], "ci");
    // Without a token the views are closed (no --public-read).
    s.get("/queue")
        .expect(401, r#"{"detail":"Not authenticated"}"#);
    s.signal(Signal::TERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let dir = s.take_dir();
    let s = TestServer::start(Options::default().in_dir(dir).arg("--token-file", &tokens));
    let q = s.request("GET", "/queue", &[auth], b"").json();
    assert_eq!(q["sessions"][0]["owner"], "ci");
    assert_eq!(q["sessions"][0]["client_name"], "job-7");
}

/// On a healthy host with no lab, `netlab status --all` answers "No netlab-managed labs"
/// (exit 1): an answer, counted as a success, not as a failing netlab.
#[test]
fn no_managed_labs_is_not_a_failing_netlab_status() {
    let s = start();
    let (id, _) = s.create_session();
    let r = s.acquire(&id, &Form::topology("t.yml", "name: a\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    let asked = s
        .call_lines()
        .iter()
        .filter(|l| l.starts_with("status --all"))
        .count();
    assert!(asked >= 1);
    let text = s.get("/metrics").text();
    for line in [
        format!(
            "neops_remote_lab_netlab_commands_total{{command=\"status\",result=\"success\"}} {asked}"
        ),
        "neops_remote_lab_netlab_commands_total{command=\"status\",result=\"failure\"} 0".into(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
}

#[test]
fn event_ids_never_repeat_after_lines_were_lost() {
    let s = start();
    named_session(&s, "first", "t");
    let file = s.state_dir().join("events.jsonl");
    // server_started and session_created, written by the event thread.
    wait_until(
        Duration::from_secs(10),
        "two lines in the event file",
        || std::fs::read_to_string(&file).is_ok_and(|text| text.lines().count() == 2),
    );
    let dir = s.kill_keep_dir();
    // The event file cannot be written (a directory in its place): the lines of this run
    // are lost, while the state file is written on every change.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let s = start_in(dir);
    for n in 0..3 {
        let id = named_session(&s, &format!("lost-{n}"), "t");
        s.delete(&format!("/session/{id}")).expect_empty(204);
    }
    let seen: Vec<u64> = events(&s, "?limit=10000")
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    let newest = seen[0];
    assert!(newest >= 7, "{seen:?}");
    let dir = s.kill_keep_dir();
    std::fs::remove_dir(&file).unwrap();
    // The file knows of nothing past 2; the state file says how far ids went.
    let s = start_in(dir);
    let list = events(&s, "?limit=10000");
    assert_eq!(list[0]["kind"], "server_started");
    let first_new = list[0]["id"].as_u64().unwrap();
    assert!(first_new > newest, "{first_new} after {newest}: {list:?}");
    let id = named_session(&s, "after", "t");
    s.delete(&format!("/session/{id}")).expect_empty(204);
    let ids: Vec<u64> = events(&s, &format!("?since={newest}"))
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "server_started, created, ended: {ids:?}");
    assert!(ids.iter().all(|id| !seen.contains(id)), "{ids:?} {seen:?}");
}
