//! A host in a fleet: an admin drains it for maintenance (`POST /admin/drain`, the
//! `drain [--wait]` and `resume` commands, across a restart), and a host whose starts keep
//! failing for reasons not the topology's steps aside as unhealthy until a health check or
//! an admin brings it back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::*;

const CI: &str = "ci-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789ab";
const TOKENS: &str = "ci:ci-token-0123456789abcdef\nops:admin-token-0123456789ab:admin\n";
const TOPO: &str = "name: a\nnodes: [r1, r2]\n";
const DRAINING: &str = r#"{"detail":"Lab host is draining: no new sessions"}"#;
const LIMIT: Duration = Duration::from_secs(10);

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn with_tokens(dir: tempfile::TempDir) -> Options {
    let path = dir.path().join("tokens");
    std::fs::write(&path, TOKENS).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Options::default()
        .in_dir(dir)
        .arg("--token-file", &path.display().to_string())
}

fn as_(s: &TestServer, token: &str, method: &str, path: &str, id: Option<&str>) -> Resp {
    let auth = bearer(token);
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(id) = id {
        headers.push(("X-Session-ID", id));
    }
    s.request(method, path, &headers, b"")
}

fn session_as_ci(s: &TestServer) -> String {
    let r = as_(s, CI, "POST", "/session", None);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session_id"].as_str().unwrap().to_owned()
}

fn queue(s: &TestServer, token: &str) -> serde_json::Value {
    as_(s, token, "GET", "/queue", None).json()
}

/// `neops-remote-lab <args>` against the server of `dir`, on `port`, its output piped.
fn command(dir: &Path, port: u16, args: &[&str]) -> Child {
    server_command()
        .args(args)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--token-file")
        .arg(dir.join("tokens"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child to end (at most `limit`): its exit code and stdout.
fn finish(mut child: Child, limit: Duration) -> (i32, String, String) {
    let mut status = None;
    wait_until(limit, "the command to end", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.unwrap().code().unwrap_or(-1), out, err)
}

fn metric_line(s: &TestServer, token: &str, line: &str) -> bool {
    as_(s, token, "GET", "/metrics", None)
        .text()
        .lines()
        .any(|l| l == line)
}

#[test]
fn a_drained_host_takes_no_new_sessions_lets_the_others_finish_and_stays_drained() {
    let s = TestServer::start(with_tokens(test_dir()));
    let port = s.addr.port();
    let a = session_as_ci(&s);
    let b = session_as_ci(&s);

    // Only an admin drains.
    as_(&s, CI, "POST", "/admin/drain", None)
        .expect(403, r#"{"detail":"Only an admin token may do this"}"#);
    assert_eq!(queue(&s, CI)["host_state"], "ok");
    s.request("GET", "/healthz", &[], b"").expect_empty(204);

    let drain = command(s.dir.path(), port, &["drain", "--wait"]);
    wait_until(LIMIT, "the host to drain", || {
        queue(&s, ADMIN)["host_state"] == "draining"
    });
    assert_eq!(queue(&s, CI)["host_state_reason"], "drained by ops");
    let refused = as_(&s, CI, "POST", "/session", None);
    refused.expect(503, DRAINING);
    assert_eq!(refused.header("Retry-After"), Some("60"));
    s.request("GET", "/healthz", &[], b"")
        .expect(503, r#"{"detail":"draining"}"#);
    assert!(metric_line(
        &s,
        CI,
        r#"neops_remote_lab_host_state{state="draining"} 1"#
    ));
    assert!(metric_line(
        &s,
        CI,
        r#"neops_remote_lab_sessions_ended_total{reason="draining"} 1"#
    ));
    let page = as_(&s, CI, "GET", "/", None).text();
    assert!(page.contains(">DRAINING</div><div>drained by ops</div>"));
    // Draining again changes nothing.
    as_(&s, ADMIN, "POST", "/admin/drain", None).expect_empty(204);

    // The sessions there finish: a's lab, then b's.
    let form = Form::topology("t.yml", TOPO);
    let auth = bearer(CI);
    let acquire = |id: &str| {
        s.request(
            "POST",
            "/lab",
            &[
                ("Authorization", &auth),
                ("X-Session-ID", id),
                ("Content-Type", &form.content_type()),
            ],
            &form.body(),
        )
    };
    assert_eq!(acquire(&a).status, 200);
    as_(&s, CI, "DELETE", &format!("/session/{a}"), None).expect_empty(204);
    as_(&s, CI, "GET", &format!("/session/{b}"), None)
        .expect(200, r#"{"status":"active","position":0}"#);
    let mut drain = drain;
    assert!(
        drain.try_wait().unwrap().is_none(),
        "drain --wait returned with a session left"
    );
    assert_eq!(acquire(&b).status, 200);
    as_(&s, CI, "DELETE", &format!("/session/{b}"), None).expect_empty(204);
    let (code, out, err) = finish(drain, LIMIT);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!(
        "draining 127.0.0.1:{port}: no new sessions; 2 sessions left to finish\n"
    )));
    assert!(out.ends_with("drained: no session left\n"), "{out}");

    // A crash and a restart: still draining.
    let dir = s.kill_keep_dir();
    let s = TestServer::start(with_tokens(dir));
    assert_eq!(queue(&s, CI)["host_state"], "draining");
    as_(&s, CI, "POST", "/session", None).expect(503, DRAINING);
    assert!(
        s.log_text()
            .contains("draining (since the last run, by ops)")
    );

    // `resume` on the host takes sessions again.
    let (code, out, err) = finish(command(s.dir.path(), s.addr.port(), &["resume"]), LIMIT);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        format!("127.0.0.1:{} takes new sessions again\n", s.addr.port())
    );
    s.request("GET", "/healthz", &[], b"").expect_empty(204);
    assert_eq!(queue(&s, CI)["host_state"], "ok");
    assert_eq!(queue(&s, CI)["host_state_reason"], serde_json::Value::Null);
    session_as_ci(&s);
    assert!(!s.state_dir().join("draining").exists());
    let kinds: Vec<String> = as_(&s, CI, "GET", "/events?limit=100", None).json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(kinds.contains(&"host_resumed".to_owned()), "{kinds:?}");
}

#[test]
fn drain_and_resume_say_clearly_what_is_wrong() {
    let dir = test_dir();
    let s = TestServer::start(with_tokens(dir));
    let port = s.addr.port();
    // A token file without an admin line.
    let other = tempfile::tempdir().unwrap();
    let path = other.path().join("tokens");
    std::fs::write(&path, "ci:ci-token-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = finish(command(other.path(), port, &["drain"]), LIMIT);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "neops-remote-lab drain: {} has no NAME:TOKEN:admin line",
            path.display()
        )),
        "{err}"
    );
    // The ci token is no admin's.
    std::fs::write(&path, "ops:ci-token-0123456789abcdef:admin\n").unwrap();
    let (code, _, err) = finish(command(other.path(), port, &["drain"]), LIMIT);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "neops-remote-lab drain: the token is not an admin token (403 Only an admin token may do this)\n"
    );
    assert_eq!(s.get("/healthz").status, 204);
    // Nobody listening (port 1: nothing of ours).
    let (code, _, err) = finish(command(other.path(), 1, &["resume"]), LIMIT);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("neops-remote-lab resume: no server answers at 127.0.0.1:1: "),
        "{err}"
    );
}

/// The `up` calls the fake netlab got so far.
fn ups(s: &TestServer) -> usize {
    s.call_lines()
        .iter()
        .filter(|l| l.starts_with("up "))
        .count()
}

const CLAB_ERROR: &str = "netlab up failed (exit code 1): Error: failed to create docker client: \
    Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon \
    running?\nFatal error in netlab up: containerlab deploy --reconfigure -t clab.yml failed, \
    aborting...";

#[test]
fn three_failed_starts_make_the_host_unhealthy_until_the_health_topology_starts() {
    let dir = test_dir();
    let health = dir.path().join("health.yml");
    std::fs::write(&health, "name: h\nnodes: [h1]\n").unwrap();
    let s = TestServer::start(
        Options::default()
            .in_dir(dir)
            .arg("--health-topology", &health.display().to_string())
            .arg("--health-interval", "0.3"),
    );
    let (a, _) = s.create_session();
    let rejected = Form::topology("bad.yml", "fake: reject\n");
    let good = Form::topology("t.yml", TOPO);
    s.set_control("up.clab_error", "");

    // A rejected topology never counts, not even between failures.
    assert_eq!(s.acquire(&a, &rejected).status, 422);
    for _ in 0..2 {
        s.acquire(&a, &good).expect(
            500,
            &serde_json::json!({ "detail": CLAB_ERROR }).to_string(),
        );
        assert_eq!(s.acquire(&a, &rejected).status, 422);
    }
    assert_eq!(s.get("/queue").json()["host_state"], "ok");
    assert!(metric_line(
        &s,
        "",
        "neops_remote_lab_host_start_failures 2"
    ));
    s.get("/healthz").expect_empty(204);

    // The third failure in a row: unhealthy.
    assert_eq!(s.acquire(&a, &good).status, 500);
    let unhealthy = format!("lab host unhealthy: {CLAB_ERROR}");
    let q = s.get("/queue").json();
    assert_eq!(
        (q["host_state"].as_str(), q["host_state_reason"].as_str()),
        (Some("unhealthy"), Some(CLAB_ERROR))
    );
    s.get("/healthz").expect(
        503,
        &serde_json::json!({ "detail": format!("unhealthy: {CLAB_ERROR}") }).to_string(),
    );
    assert!(metric_line(
        &s,
        "",
        r#"neops_remote_lab_host_state{state="unhealthy"} 1"#
    ));
    assert!(metric_line(
        &s,
        "",
        "neops_remote_lab_host_unhealthy_total 1"
    ));
    let events = s.get("/events?limit=100").json();
    let became = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "host_unhealthy")
        .expect("a host_unhealthy event");
    assert_eq!(became["failures"], 3);
    assert_eq!(became["error"], CLAB_ERROR);

    // The fourth POST /lab: 503 at once, before its body is sent, and netlab is not run.
    let before = ups(&s);
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        stream,
        "POST /lab HTTP/1.1\r\nHost: x\r\nX-Session-ID: {a}\r\nContent-Type: {}\r\nContent-Length: 100000\r\n\r\n",
        good.content_type()
    )
    .unwrap();
    let r = read_response(&mut stream, false);
    r.expect(503, &serde_json::json!({ "detail": unhealthy }).to_string());
    s.acquire(&a, &rejected)
        .expect(503, &serde_json::json!({ "detail": unhealthy }).to_string());
    assert!(metric_line(
        &s,
        "",
        r#"neops_remote_lab_lab_acquisitions_total{outcome="unhealthy"} 2"#
    ));

    // The health topology keeps failing while Docker is down...
    wait_until(LIMIT, "a failed health check", || {
        metric_line(
            &s,
            "",
            r#"neops_remote_lab_health_checks_total{result="failure"} 1"#,
        )
    });
    assert_eq!(s.get("/queue").json()["host_state"], "unhealthy");
    assert!(ups(&s) > before, "health checks run netlab up");
    // ...and brings the host back once it is up again.
    s.clear_control("up.clab_error");
    wait_until(LIMIT, "the host to be healthy", || {
        s.get("/queue").json()["host_state"] == "ok"
    });
    s.get("/healthz").expect_empty(204);
    assert!(metric_line(
        &s,
        "",
        r#"neops_remote_lab_health_checks_total{result="success"} 1"#
    ));
    assert!(metric_line(
        &s,
        "",
        "neops_remote_lab_host_start_failures 0"
    ));
    // The health lab is gone: torn down, its work dir removed.
    assert_eq!(s.registered(), None);
    assert_eq!(s.work_dirs(), Vec::<std::path::PathBuf>::new());
    let calls = s.call_lines();
    assert!(calls.iter().any(|l| l == "up health.yml"), "{calls:?}");
    let events = s.get("/events?limit=200").json();
    let healed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "host_healthy")
        .expect("a host_healthy event");
    assert_eq!(healed["how"], "health_check");

    assert_eq!(s.acquire(&a, &good).status, 200);
}

#[test]
fn an_admin_resets_the_health_and_a_success_resets_the_count() {
    let s = start_with(&[("--unhealthy-after", "2")]);
    let (a, _) = s.create_session();
    let good = Form::topology("t.yml", TOPO);
    // One failure, a success: the count starts again.
    s.set_control("up.clab_error", "1");
    assert_eq!(s.acquire(&a, &good).status, 500);
    assert_eq!(s.acquire(&a, &good).status, 200);
    s.lab("DELETE", "/lab", &a).expect_empty(202);
    s.set_control("up.clab_error", "2");
    assert_eq!(s.acquire(&a, &good).status, 500);
    assert_eq!(s.get("/queue").json()["host_state"], "ok");
    assert_eq!(s.acquire(&a, &good).status, 500);
    assert_eq!(s.get("/queue").json()["host_state"], "unhealthy");
    // No --health-topology: it stays unhealthy until an admin says otherwise.
    assert_eq!(s.acquire(&a, &good).status, 503);
    s.post("/admin/health/reset").expect_empty(204);
    s.get("/healthz").expect_empty(204);
    assert_eq!(s.acquire(&a, &good).status, 200);
    let events = s.get("/events?limit=100").json();
    let healed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "host_healthy")
        .expect("a host_healthy event");
    assert_eq!(
        (healed["how"].as_str(), &healed["by"]),
        (Some("reset"), &serde_json::Value::Null)
    );
}
