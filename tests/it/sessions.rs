//! The session half of the contract, over real HTTP against the real binary.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn sessions_queue_and_promote_in_order() {
    let s = start();
    let (a, pa) = s.create_session();
    let (b, pb) = s.create_session();
    let (c, pc) = s.create_session();
    assert_eq!((pa, pb, pc), (0, 1, 2));
    s.expect_session(&a, "active", 0);
    s.expect_session(&b, "waiting", 1);
    s.expect_session(&c, "waiting", 2);
    s.get("/active-session").expect(
        200,
        &format!(r#"{{"status":"active","position":0,"session_id":"{a}"}}"#),
    );

    s.delete(&format!("/session/{a}")).expect_empty(204);
    // Promotion is immediate: the next read already sees it.
    s.expect_session(&b, "active", 0);
    s.expect_session(&c, "waiting", 1);
    s.delete(&format!("/session/{b}")).expect_empty(204);
    s.expect_session(&c, "active", 0);
    s.delete(&format!("/session/{c}")).expect_empty(204);
    s.get("/active-session")
        .expect(404, r#"{"detail":"No active session"}"#);
}

#[test]
fn two_sessions_promote() {
    let s = start();
    let (a, _) = s.create_session();
    let (b, pb) = s.create_session();
    assert_eq!(pb, 1);
    s.delete(&format!("/session/{a}")).expect_empty(204);
    s.expect_session(&b, "active", 0);
}

#[test]
fn deleting_a_waiting_session_in_the_middle_shifts_the_ones_behind() {
    let s = start();
    let ids: Vec<String> = (0..4).map(|_| s.create_session().0).collect();
    s.delete(&format!("/session/{}", ids[1])).expect_empty(204);
    s.expect_session(&ids[0], "active", 0);
    s.expect_session(&ids[2], "waiting", 1);
    s.expect_session(&ids[3], "waiting", 2);
    s.expect_no_session(&ids[1]);
    s.delete(&format!("/session/{}", ids[1]))
        .expect(404, SESSION_NOT_FOUND);
}

#[test]
fn unknown_and_odd_session_ids_are_not_found() {
    let s = start();
    let (a, _) = s.create_session();
    for id in [
        "nope".to_owned(),
        "".to_owned(),
        a.to_uppercase(),
        "00000000-0000-0000-0000-000000000000".to_owned(),
        "%00".to_owned(),
    ] {
        s.expect_no_session(&id);
        s.delete(&format!("/session/{id}"))
            .expect(404, SESSION_NOT_FOUND);
        s.request("POST", "/session/heartbeat", &[("X-Session-ID", &id)], b"")
            .expect(404, SESSION_NOT_FOUND);
    }
    // GET on /session/heartbeat is a lookup of the id "heartbeat".
    s.get("/session/heartbeat").expect(404, SESSION_NOT_FOUND);
    // A percent-encoded id is the same id.
    let encoded = a.replace('-', "%2D");
    s.expect_session(&encoded, "active", 0);
}

#[test]
fn heartbeat_for_waiting_and_active_sessions() {
    let s = start();
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    for id in [&a, &b] {
        s.request("POST", "/session/heartbeat", &[("X-Session-ID", id)], b"")
            .expect_empty(204);
    }
    // Header names are case-insensitive.
    s.request("POST", "/session/heartbeat", &[("x-session-id", &b)], b"")
        .expect_empty(204);
    s.post("/session/heartbeat")
        .expect(422, MISSING_SESSION_HEADER);
}

#[test]
fn heartbeats_keep_sessions_alive_and_silence_reaps_them() {
    let s = start_with(&[("--active-timeout", "1"), ("--waiting-timeout", "1.5")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let (c, _) = s.create_session();
    let beat = |id: &str| {
        s.request("POST", "/session/heartbeat", &[("X-Session-ID", id)], b"")
            .expect_empty(204);
    };
    // Whether a session was reaped is read from the log: a poll would keep it alive.
    let reaped = |id: &str| s.log_text().contains(&format!("session {id} reaped"));
    // b and c keep beating (every heartbeat a 204, however long it takes) until a, silent
    // and active, is reaped, and for longer than both timeouts.
    let started = Instant::now();
    wait_until(Duration::from_secs(20), "a to be reaped", || {
        beat(&b);
        beat(&c);
        started.elapsed() > Duration::from_secs(2) && reaped(&a)
    });
    s.expect_no_session(&a);
    s.expect_session(&b, "active", 0);
    s.expect_session(&c, "waiting", 1);

    // Now c (waiting) goes silent while b keeps polling: c is reaped by the waiting timeout.
    wait_until(Duration::from_secs(20), "c to be reaped", || {
        s.expect_session(&b, "active", 0);
        reaped(&c)
    });
    s.expect_no_session(&c);
    s.expect_session(&b, "active", 0);
}

#[test]
fn a_reaped_active_session_promotes_the_next() {
    let s = start_with(&[("--active-timeout", "0.5"), ("--waiting-timeout", "600")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    // Only b polls (a poll would keep a alive).
    wait_until(Duration::from_secs(5), "b to be promoted", || {
        s.get(&format!("/session/{b}")).text() == r#"{"status":"active","position":0}"#
    });
    s.expect_no_session(&a);
}

#[test]
fn max_sessions_answers_503_with_retry_after() {
    let s = start_with(&[("--max-sessions", "2")]);
    let (a, _) = s.create_session();
    s.create_session();
    let r = s.post("/session");
    r.expect(503, r#"{"detail":"Session queue is full"}"#);
    assert_eq!(r.header("Retry-After"), Some("5"));
    s.delete(&format!("/session/{a}")).expect_empty(204);
    let (_, position) = s.create_session();
    assert_eq!(position, 1);
}

#[test]
fn health_endpoints() {
    let s = start();
    s.get("/healthz").expect_empty(204);
    s.create_session();
    s.create_session();
    let r = s.get("/debug/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys.len(), 10);
    // The cap follows the open-files limit of the machine the test runs on.
    let cap = v["long_poll_cap"].as_u64().unwrap();
    assert!((1..=10_000).contains(&cap), "{cap}");
    assert!(r.text().ends_with(&format!(
        r#","sessions":2,"queue_length":2,"active_timeout":300.0,"waiting_timeout":600.0,"long_polls":0,"long_poll_cap":{cap},"teardowns":[]}}"#
    )));
    assert_eq!(v["teardowns"], serde_json::json!([]));
    assert_eq!(v["status"], "ok");
    assert_eq!(v["active_timeout"], 300.0);
    assert_eq!(v["waiting_timeout"], 600.0);
    assert_eq!(v["long_polls"], 0);
    assert_eq!(v["sessions"], 2);
    assert_eq!(v["queue_length"], 2);
    assert!(v["timestamp"].as_f64().unwrap() > 1.7e9);
    assert!(v["uptime"].as_f64().unwrap() >= 0.0);
    assert!(r.text().starts_with(r#"{"status":"ok","timestamp":"#));
}

#[test]
fn not_found_method_not_allowed_and_head() {
    let s = start();
    s.get("/nope").expect(404, ROUTE_NOT_FOUND);
    s.get("/lab/devices/extra").expect(404, ROUTE_NOT_FOUND);

    let cases = [
        ("GET", "/session", "POST"),
        ("PUT", "/session/abc", "GET, HEAD, DELETE"),
        ("PATCH", "/lab", "GET, HEAD, POST, DELETE"),
        ("GET", "/lab/release", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/active-session", "GET, HEAD"),
        ("PUT", "/session/heartbeat", "GET, HEAD, DELETE, POST"),
        ("POST", "/lab/devices", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let r = s.request(method, path, &[], b"");
        r.expect(405, r#"{"detail":"Method Not Allowed"}"#);
        assert_eq!(r.header("Allow"), Some(allow), "{method} {path}");
    }

    // HEAD on a GET route: same status and headers, no body.
    let (a, _) = s.create_session();
    let get = s.get(&format!("/session/{a}"));
    let head = s.request("HEAD", &format!("/session/{a}"), &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.header("content-length"));
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert_eq!(s.request("HEAD", "/healthz", &[], b"").status, 204);
    assert_eq!(s.request("HEAD", "/nope", &[], b"").status, 404);
    let r = s.request("HEAD", "/session", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("POST"));
}

#[test]
fn the_gate_of_lab_routes_in_order() {
    let s = start();
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let routes = [
        ("GET", "/lab"),
        ("POST", "/lab"),
        ("DELETE", "/lab"),
        ("POST", "/lab/release"),
        ("GET", "/lab/devices"),
    ];
    for (method, path) in routes {
        s.request(method, path, &[], b"")
            .expect(422, MISSING_SESSION_HEADER);
        s.lab(method, path, "not-a-session")
            .expect(404, SESSION_NOT_FOUND);
        s.lab(method, path, &b).expect(423, NOT_ACTIVE);
    }
    // Passing the gate with no lab running.
    s.lab("GET", "/lab", &a).expect(200, NOT_RUNNING);
    s.lab("GET", "/lab/devices", &a).expect(404, NO_LAB);
    s.lab("POST", "/lab/release", &a).expect(404, NO_LAB);
    s.lab("DELETE", "/lab", &a).expect_empty(204);
}

#[test]
fn the_gate_does_not_read_the_body_of_an_unauthenticated_upload() {
    let s = start();
    let form = Form::topology("t.yml", "nodes: [r1]\n");
    let r = s.request(
        "POST",
        "/lab",
        &[("Content-Type", &form.content_type())],
        &form.body(),
    );
    r.expect(422, MISSING_SESSION_HEADER);
    assert!(s.work_dirs().is_empty());
}

/// The router's answer for a path it has no route for.
const ROUTE_NOT_FOUND: &str = r#"{"detail":"Not Found"}"#;

/// The OpenAPI document and the router agree, with no list of routes of the test's own:
/// every documented operation is routed (neither the router's 404 nor a 405; a handler's
/// own 404, such as "Session not found", is fine), and every other method on a documented
/// path is a 405 whose `Allow` names exactly the documented methods (and HEAD wherever GET
/// is). A path that several documented paths match has the methods of each:
/// `/session/heartbeat` is also `/session/{session_id}` with the id "heartbeat" (as in the
/// Python server).
#[test]
fn the_openapi_document_and_the_router_agree() {
    /// A documented path: its segments (None: a parameter) and its methods.
    #[derive(Debug)]
    struct Documented<'a> {
        template: &'a str,
        segments: Vec<Option<&'a str>>,
        methods: BTreeSet<String>,
    }

    let s = start();
    let r = s.get("/openapi.json");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["openapi"], "3.1.0");
    let documented: Vec<Documented> = v["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(template, item)| {
            let segments = template
                .split('/')
                .map(|segment| (!segment.starts_with('{')).then_some(segment))
                .collect();
            // A path item may hold fields other than operations (summary, parameters).
            let methods: BTreeSet<String> = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| {
                    [
                        "get", "put", "post", "delete", "options", "head", "patch", "trace",
                    ]
                    .contains(&k.as_str())
                })
                .map(|k| k.to_uppercase())
                .collect();
            assert!(!methods.is_empty(), "{template}: no operation");
            Documented {
                template,
                segments,
                methods,
            }
        })
        .collect();
    assert!(
        documented
            .iter()
            .any(|d| d.template == "/session/{session_id}"),
        "{documented:?}"
    );
    for Documented {
        template, segments, ..
    } in &documented
    {
        // A parameter gets a fresh id, which no session has.
        let concrete: Vec<String> = segments
            .iter()
            .map(|s| s.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned))
            .collect();
        let path = concrete.join("/");
        let methods: BTreeSet<String> = documented
            .iter()
            .filter(|other| {
                other.segments.len() == concrete.len()
                    && other
                        .segments
                        .iter()
                        .zip(&concrete)
                        .all(|(o, c)| o.is_none_or(|o| o == c))
            })
            .flat_map(|other| other.methods.iter().cloned())
            .collect();
        for method in &methods {
            let r = s.request(method, &path, &[], b"");
            assert_ne!(r.status, 405, "{method} {path}: {}", r.text());
            assert!(
                !(r.status == 404 && r.text() == ROUTE_NOT_FOUND),
                "{method} {path} ({template}) is documented but has no route"
            );
        }
        let mut allowed = methods.clone();
        if methods.contains("GET") {
            allowed.insert("HEAD".to_owned());
        }
        for method in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
            if methods.contains(method) {
                continue;
            }
            let r = s.request(method, &path, &[], b"");
            assert_eq!(
                (r.status, r.text().as_str()),
                (405, r#"{"detail":"Method Not Allowed"}"#),
                "{method} {path} ({template})"
            );
            let allow: BTreeSet<String> = r
                .header("Allow")
                .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"))
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect();
            assert_eq!(allow, allowed, "Allow of {method} {path} ({template})");
        }
    }
}

/// The runbook's reads (`GET /lab`, `GET /lab/devices`, `GET /active-session`,
/// `GET /debug/health`) look at the active session without keeping it alive: a client that
/// went silent is reaped after `--active-timeout` however often an operator looks.
#[test]
fn reads_do_not_keep_a_silent_session_alive() {
    let s = start_with(&[("--active-timeout", "0.5")]);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let mut looks = 0;
    wait_until(
        Duration::from_secs(10),
        "the silent session to be reaped",
        || {
            looks += 1;
            // The sweep may reap a between any two reads of a look: a read that already
            // sees it gone (not found, b promoted) ends the looks.
            let r = s.lab("GET", "/lab", &a);
            if r.status == 404 {
                return true;
            }
            r.expect(200, NOT_RUNNING);
            let r = s.lab("GET", "/lab/devices", &a);
            if r.text() == SESSION_NOT_FOUND {
                return true;
            }
            r.expect(404, NO_LAB);
            let r = s.get("/active-session");
            if r.text() == format!(r#"{{"status":"active","position":0,"session_id":"{b}"}}"#) {
                return true;
            }
            r.expect(
                200,
                &format!(r#"{{"status":"active","position":0,"session_id":"{a}"}}"#),
            );
            assert_eq!(s.get("/debug/health").status, 200);
            // b keeps itself alive the way clients do.
            s.get(&format!("/session/{b}"));
            false
        },
    );
    assert!(looks > 1, "the session was reaped before anyone looked");
    s.lab("GET", "/lab", &a).expect(404, SESSION_NOT_FOUND);
    s.get("/active-session").expect(
        200,
        &format!(r#"{{"status":"active","position":0,"session_id":"{b}"}}"#),
    );
    assert!(
        s.log_text().contains(&format!("session {a} reaped")),
        "{}",
        s.log_text()
    );
}
