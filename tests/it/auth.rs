//! Access tokens (`--token-file`): every route with every kind of credential, Bearer and
//! Basic, malformed headers, `--public-read`, SIGHUP reload, the throttle, session ownership
//! across a restart, and refusing a bad token file at start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

const CI: &str = "ci-token-0123456789abcdef";
const OTHER: &str = "other-token-0123456789ab";
const ADMIN: &str = "admin-token-0123456789ab";
const TOKENS: &str = "# name:token[:admin]\n\
    ci:ci-token-0123456789abcdef\n\
    \n\
    other:other-token-0123456789ab\n\
    ops:admin-token-0123456789ab:admin\n";
const TOPO: &str = "name: a\nnodes: [r1, r2]\n";
const NOT_AUTHENTICATED: &str = r#"{"detail":"Not authenticated"}"#;

fn write_tokens(dir: &Path, text: &str, mode: u32) {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn options_with_tokens(extra: &[&str]) -> Options {
    let dir = tempfile::tempdir().unwrap();
    write_tokens(dir.path(), TOKENS, 0o600);
    let tokens = dir.path().join("tokens").display().to_string();
    let mut options = Options::default().in_dir(dir).arg("--token-file", &tokens);
    options.args.extend(extra.iter().map(|s| s.to_string()));
    options
}

fn start_with_tokens(extra: &[&str]) -> TestServer {
    TestServer::start(options_with_tokens(extra))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn basic(name: &str, token: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{token}"));
    format!("Basic {encoded}")
}

/// The kinds of credential every route is tried with.
#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    Wrong,
    Owner,
    Other,
    Admin,
}

const EVERYONE: [Who; 5] = [Who::Nobody, Who::Wrong, Who::Owner, Who::Other, Who::Admin];

impl Who {
    fn authorization(self) -> Option<String> {
        match self {
            Who::Nobody => None,
            Who::Wrong => Some(bearer("not-a-token-of-anybody")),
            // Basic for the owner, Bearer for the rest: both schemes on every route.
            Who::Owner => Some(basic("ci", CI)),
            Who::Other => Some(bearer(OTHER)),
            Who::Admin => Some(bearer(ADMIN)),
        }
    }
}

/// A fresh loopback address for each failing request, so that the throttle of failed
/// authentications (tested on its own below) stays out of the way.
fn next_source() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("127.0.{}.{}", 1 + n / 250, 1 + n % 250)
}

fn call(s: &TestServer, who: Who, method: &str, path: &str, session: Option<&str>) -> Resp {
    let auth = who.authorization();
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    if let Some(id) = session {
        headers.push(("X-Session-ID", id));
    }
    match who {
        Who::Nobody | Who::Wrong => request_from(&next_source(), s.addr, method, path, &headers),
        _ => s.request(method, path, &headers, b""),
    }
}

fn create_as(s: &TestServer, who: Who) -> String {
    let r = call(s, who, "POST", "/session", None);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session_id"].as_str().unwrap().to_owned()
}

fn acquire_as(s: &TestServer, who: Who, session: &str) -> Resp {
    let form = Form::topology("t.yml", TOPO);
    let auth = who.authorization();
    let content_type = form.content_type();
    let mut headers = vec![("X-Session-ID", session), ("Content-Type", &content_type)];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    s.request("POST", "/lab", &headers, &form.body())
}

/// Expected (status, body) for each of [`EVERYONE`]; `None` body: not checked here.
#[track_caller]
fn expect_each(
    s: &TestServer,
    method: &str,
    path: &str,
    session: Option<&str>,
    expected: [(u16, Option<&str>); 5],
) {
    for (who, (status, body)) in EVERYONE.into_iter().zip(expected) {
        let r = call(s, who, method, path, session);
        assert_eq!(r.status, status, "{who:?} {method} {path}: {}", r.text());
        if let Some(body) = body {
            assert_eq!(r.text(), body, "{who:?} {method} {path}");
        }
        if status == 401 {
            assert_eq!(
                r.header("www-authenticate"),
                Some(r#"Basic realm="neops-remote-lab", Bearer"#)
            );
            assert_eq!(r.text(), NOT_AUTHENTICATED);
        }
    }
}

const DENIED: (u16, Option<&str>) = (401, Some(NOT_AUTHENTICATED));
const GONE: (u16, Option<&str>) = (404, Some(SESSION_NOT_FOUND));

#[test]
fn every_route_with_every_kind_of_credential() {
    let s = start_with_tokens(&[]);
    // Open to all.
    expect_each(&s, "GET", "/healthz", None, [(204, None); 5]);
    let any = (200, None);
    expect_each(
        &s,
        "GET",
        "/debug/health",
        None,
        [DENIED, DENIED, any, any, any],
    );
    expect_each(
        &s,
        "GET",
        "/openapi.json",
        None,
        [DENIED, DENIED, any, any, any],
    );
    // Unknown paths and wrong methods say nothing to strangers.
    let nf = (404, Some(r#"{"detail":"Not Found"}"#));
    expect_each(&s, "GET", "/nope", None, [DENIED, DENIED, nf, nf, nf]);
    let na = (405, Some(r#"{"detail":"Method Not Allowed"}"#));
    expect_each(&s, "PUT", "/session", None, [DENIED, DENIED, na, na, na]);
    expect_each(
        &s,
        "GET",
        "/active-session",
        None,
        [
            DENIED,
            DENIED,
            (404, Some(r#"{"detail":"No active session"}"#)),
            (404, None),
            (404, None),
        ],
    );

    // The owner's session: only its owner sees and uses it.
    let id = create_as(&s, Who::Owner);
    let owned_prefix = id[..8].to_owned();
    let session_path = format!("/session/{id}");
    let active = format!(r#"{{"status":"active","position":0,"session_id":"{id}"}}"#);
    let no_active = (404, Some(r#"{"detail":"No active session"}"#));
    expect_each(
        &s,
        "GET",
        "/active-session",
        None,
        [
            DENIED,
            DENIED,
            (200, Some(&active)),
            no_active,
            (200, Some(&active)),
        ],
    );
    let status = (200, Some(r#"{"status":"active","position":0}"#));
    expect_each(
        &s,
        "GET",
        &session_path,
        None,
        [DENIED, DENIED, status, GONE, GONE],
    );
    expect_each(
        &s,
        "POST",
        "/session/heartbeat",
        Some(&id),
        [DENIED, DENIED, (204, None), GONE, GONE],
    );
    expect_each(
        &s,
        "GET",
        "/lab",
        Some(&id),
        [DENIED, DENIED, (200, Some(NOT_RUNNING)), GONE, GONE],
    );
    let no_lab = (404, Some(NO_LAB));
    expect_each(
        &s,
        "GET",
        "/lab/devices",
        Some(&id),
        [DENIED, DENIED, no_lab, GONE, GONE],
    );
    expect_each(
        &s,
        "POST",
        "/lab/release",
        Some(&id),
        [DENIED, DENIED, no_lab, GONE, GONE],
    );
    for who in [Who::Nobody, Who::Wrong] {
        // Refused before the body is read: the upload never reaches the disk.
        acquire_as(&s, who, &id).expect(401, NOT_AUTHENTICATED);
        assert!(s.work_dirs().is_empty());
    }
    for who in [Who::Other, Who::Admin] {
        acquire_as(&s, who, &id).expect(404, SESSION_NOT_FOUND);
    }
    assert!(s.call_lines().iter().all(|l| !l.starts_with("up ")));
    let r = acquire_as(&s, Who::Owner, &id);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reused"], false);
    expect_each(
        &s,
        "GET",
        "/lab/devices",
        Some(&id),
        [DENIED, DENIED, (200, None), GONE, GONE],
    );

    // DELETE /lab: another name cannot; an admin may force it without a session of its own.
    for who in [Who::Nobody, Who::Wrong] {
        call(&s, who, "DELETE", "/lab?force=true", Some(&id)).expect(401, NOT_AUTHENTICATED);
    }
    call(&s, Who::Other, "DELETE", "/lab?force=true", Some(&id)).expect(404, SESSION_NOT_FOUND);
    call(&s, Who::Admin, "DELETE", "/lab?force=false", None).expect(422, MISSING_SESSION_HEADER);
    call(&s, Who::Admin, "DELETE", "/lab?force=true", None).expect_empty(202);
    wait_until(Duration::from_secs(10), "the teardown", || {
        s.call_lines().iter().any(|l| l == "down --cleanup")
    });
    call(&s, Who::Owner, "DELETE", "/lab", Some(&id)).expect_empty(204);

    // DELETE /session: another name cannot; an admin may end anyone's.
    for who in [Who::Nobody, Who::Wrong] {
        call(&s, who, "DELETE", &session_path, None).expect(401, NOT_AUTHENTICATED);
    }
    call(&s, Who::Other, "DELETE", &session_path, None).expect(404, SESSION_NOT_FOUND);
    call(&s, Who::Admin, "DELETE", &session_path, None).expect_empty(204);
    call(&s, Who::Owner, "DELETE", &session_path, None).expect(404, SESSION_NOT_FOUND);
    // And the owner ends its own.
    let id = create_as(&s, Who::Other);
    call(&s, Who::Other, "DELETE", &format!("/session/{id}"), None).expect_empty(204);

    // Failures and admin actions are events too, naming the address and never a token.
    let events = call(&s, Who::Admin, "GET", "/events?limit=1000", None).text();
    for token in [CI, OTHER, ADMIN, "not-a-token-of-anybody"] {
        assert!(!events.contains(token), "a token reached the events");
    }
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let list = events["events"].as_array().expect("an event list");
    let kinds = |kind: &str| {
        list.iter()
            .filter(|e| e["kind"] == kind)
            .collect::<Vec<_>>()
    };
    // Only wrong credentials are failures; a request without any is a challenge, counted
    // in /metrics.
    let failed = kinds("auth_failed");
    assert!(failed.len() >= 10, "{failed:?}");
    assert!(
        failed
            .iter()
            .all(|e| e["addr"].as_str().unwrap().starts_with("127.0."))
    );
    // Session ids in failed paths are 8-character prefixes, as everywhere else.
    assert!(
        failed.iter().all(|e| e["path"]
            .as_str()
            .unwrap()
            .split('/')
            .all(|segment| segment.len() <= 20)),
        "{failed:?}"
    );
    let metrics = call(&s, Who::Admin, "GET", "/metrics", None).text();
    let challenges: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("neops_remote_lab_auth_challenges_total "))
        .expect("the challenge counter")
        .parse()
        .unwrap();
    assert!(challenges >= 10, "{challenges}");
    let admin = kinds("admin_action");
    let actions: Vec<_> = admin
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["end_session", "destroy_lab"], "{admin:?}");
    assert!(
        admin
            .iter()
            .all(|e| e["admin"] == "ops" && e["addr"] == "127.0.0.1")
    );
    assert_eq!(admin[0]["owner"], "ci");
    assert_eq!(admin[0]["session"], owned_prefix.as_str());

    let log = s.log_text();
    assert!(
        log.contains(r#"of "ci" ended by admin "ops" from 127.0.0.1"#),
        "{log}"
    );
    assert!(
        log.contains(r#"(force=true) by admin "ops" from 127.0.0.1"#),
        "{log}"
    );
    for token in [CI, OTHER, ADMIN, "not-a-token-of-anybody"] {
        assert!(!log.contains(token), "a token reached the log");
    }
    assert!(!log.contains("authentication failed: GET /healthz"));
    assert!(
        log.contains("authentication failed: GET /debug/health from 127.0.1."),
        "{log}"
    );
}

/// A browser's visit: its first request carries no credentials (the 401 asks for them) and it
/// asks for /favicon.ico by itself. Neither is an auth failure: no event, no warning; the
/// challenge is counted in /metrics, and the icon is a 204 without a challenge.
#[test]
fn a_page_load_without_credentials_adds_no_event() {
    let s = start_with_tokens(&[]);
    let admin = |path: &str| s.request("GET", path, &[("Authorization", &bearer(ADMIN))], b"");
    let last_id = admin("/events?limit=1").json()["last_id"].clone();
    let r = s.get("/");
    r.expect(401, NOT_AUTHENTICATED);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Basic realm="neops-remote-lab", Bearer"#)
    );
    let r = s.get("/favicon.ico");
    r.expect_empty(204);
    assert_eq!(r.header("www-authenticate"), None);
    // The browser sends the credentials once asked.
    let r = s.request("GET", "/", &[("Authorization", &basic("ci", CI))], b"");
    assert_eq!(r.status, 200);
    let events = admin("/events").json();
    assert_eq!(events["last_id"], last_id, "{events}");
    let metrics = admin("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "neops_remote_lab_auth_challenges_total 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l
                == r#"neops_remote_lab_http_requests_total{route="/favicon.ico",code="2xx"} 1"#),
        "{metrics}"
    );
    // The log is read as the server writes it: wait for a later line before looking.
    let r = s.request(
        "GET",
        "/x",
        &[("Authorization", "Bearer wrong-token-0123456789")],
        b"",
    );
    assert_eq!(r.status, 401);
    wait_until(Duration::from_secs(5), "the log line", || {
        s.log_text().contains("authentication failed: GET /x from")
    });
    let log = s.log_text();
    assert_eq!(log.matches("authentication failed").count(), 1, "{log}");
}

/// An auth failure on a session's path logs and records the id's 8-character prefix only.
#[test]
fn a_failed_authentication_names_a_session_by_its_prefix() {
    let s = start_with_tokens(&[]);
    let id = create_as(&s, Who::Owner);
    call(&s, Who::Wrong, "GET", &format!("/session/{id}"), None).expect(401, NOT_AUTHENTICATED);
    let line = format!("authentication failed: GET /session/{} from", &id[..8]);
    wait_until(Duration::from_secs(5), "the log line", || {
        s.log_text().contains(&line)
    });
    let log = s.log_text();
    let failure = log
        .lines()
        .find(|l| l.contains("authentication failed"))
        .unwrap();
    assert!(!failure.contains(&id), "{failure}");
    let events = call(&s, Who::Admin, "GET", "/events", None).text();
    assert!(!events.contains(&id), "{events}");
    assert!(
        events.contains(&format!(r#""path":"/session/{}""#, &id[..8])),
        "{events}"
    );
}

#[test]
fn malformed_authorization_headers_are_401_never_500() {
    let s = start_with_tokens(&[]);
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    let long = format!("Bearer {}", "x".repeat(10 * 1024));
    let cases = [
        "".to_owned(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        "Basic".to_owned(),
        "Basic %%%not base64%%%".to_owned(),
        b64(b"no-colon-here"),
        b64(b"ci:"),
        b64(b":ci-token-0123456789abcdef"),
        b64(b"\xff\xfe:ci-token-0123456789abcdef"),
        b64("ci:ci-token-0123456789abcdeé".as_bytes()),
        format!("Digest {CI}"),
        format!("Bearer  {CI}x"),
        long,
    ];
    for case in &cases {
        let r = s.request("GET", "/debug/health", &[("Authorization", case)], b"");
        assert_eq!(r.status, 401, "{case:?}: {}", r.text());
        assert_eq!(r.text(), NOT_AUTHENTICATED);
    }
    // Raw non-ASCII bytes in a header: tiny_http closes such a connection before the
    // request reaches us. No answer, no 500, and the server goes on.
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /debug/health HTTP/1.1\r\nAuthorization: Bearer \xc3\xa9\xff\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 500"), "{answer:?}");
    // Spaces around the credentials are forgiven; both schemes work anywhere.
    for auth in [format!("Bearer {CI}  "), basic("ci", CI), bearer(ADMIN)] {
        let r = s.request("GET", "/debug/health", &[("Authorization", &auth)], b"");
        assert_eq!(r.status, 200, "{auth:?}");
    }
}

#[test]
fn public_read_opens_the_read_only_views_only() {
    let s = start_with_tokens(&["--public-read"]);
    s.get("/debug/health").json();
    assert_eq!(s.get("/debug/health").status, 200);
    assert_eq!(s.get("/openapi.json").status, 200);
    assert_eq!(
        s.request("HEAD", "/openapi.json", &[], b"").status,
        200,
        "HEAD is a read too"
    );
    s.get("/healthz").expect_empty(204);
    // Everything else still needs a token.
    s.post("/session").expect(401, NOT_AUTHENTICATED);
    s.get("/active-session").expect(401, NOT_AUTHENTICATED);
    s.get("/lab").expect(401, NOT_AUTHENTICATED);
    s.post("/debug/health").expect(401, NOT_AUTHENTICATED);
    assert!(
        s.log_text()
            .contains("--public-read: the read-only views do not")
    );
}

#[test]
fn without_a_token_file_everything_is_open_and_a_warning_says_so() {
    let s = start();
    let (id, _) = s.create_session();
    s.expect_session(&id, "active", 0);
    // A token sent to an open server is ignored.
    let r = s.request(
        "POST",
        "/session",
        &[("Authorization", "Bearer whatever")],
        b"",
    );
    assert_eq!(r.status, 201);
    let log = s.log_text();
    assert_eq!(
        log.matches("no --token-file: anyone who can reach the port")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn sighup_rereads_the_token_file_and_a_broken_one_keeps_the_old_tokens() {
    let s = start_with_tokens(&[]);
    let get = |token: &str| {
        s.request(
            "GET",
            "/debug/health",
            &[("Authorization", &bearer(token))],
            b"",
        )
        .status
    };
    assert_eq!((get(CI), get(OTHER)), (200, 200));
    let fresh = "fresh-token-0123456789ab";
    write_tokens(s.dir.path(), &format!("ci:{CI}\nnew:{fresh}\n"), 0o600);
    s.signal(Signal::HUP);
    wait_until(Duration::from_secs(5), "the reload", || {
        s.log_text().contains("SIGHUP: 2 tokens from")
    });
    assert_eq!((get(CI), get(OTHER), get(fresh)), (200, 401, 200));

    // A broken file: logged, and the tokens in force stay. This time through
    // `neops-remote-lab reload` (what the unit's ExecReload= runs), finding the server by
    // the lock file of its state dir.
    write_tokens(s.dir.path(), &format!("ci:{CI}\nbroken line\n"), 0o600);
    let out = std::process::Command::new(BIN)
        .arg("reload")
        .arg("--state-dir")
        .arg(s.state_dir())
        .env_remove("MAINPID")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid = s.child.id();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("sent SIGHUP to neops-remote-lab (pid {pid})\n")
    );
    wait_until(Duration::from_secs(5), "the failed reload", || {
        s.log_text().contains("line 2: expected NAME:TOKEN")
    });
    assert!(s.log_text().contains("the tokens in force stay"));
    assert_eq!((get(CI), get(OTHER), get(fresh)), (200, 401, 200));
    // A world-readable file is refused the same way; systemd gives the pid in $MAINPID.
    write_tokens(s.dir.path(), &format!("x:{OTHER}\n"), 0o644);
    let out = std::process::Command::new(BIN)
        .arg("reload")
        .env("MAINPID", pid.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(Duration::from_secs(5), "the refused reload", || {
        s.log_text().contains("readable by every user")
    });
    assert_eq!((get(CI), get(OTHER)), (200, 401));
    // The server is still serving after all that.
    s.get("/healthz").expect_empty(204);
}

/// One request from `source` (an address on the loopback network) to `to`.
fn request_from(
    source: &str,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    use rustix::net::{AddressFamily, SocketType, bind, connect, ipproto, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    bind(&fd, &from).unwrap();
    connect(&fd, &to).unwrap();
    let mut stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    read_response(&mut stream, method == "HEAD")
}

fn health_from(source: &str, to: SocketAddr, auth: &str) -> Resp {
    request_from(
        source,
        to,
        "GET",
        "/debug/health",
        &[("Authorization", auth)],
    )
}

#[test]
fn reload_signals_only_a_neops_remote_lab_process() {
    let mut sleeper = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let cases = [
        (sleeper.id().to_string(), "is not neops-remote-lab"),
        ("1".to_owned(), "cannot signal pid 1"),
        ("0".to_owned(), "cannot signal pid 0"),
        ("nope".to_owned(), "$MAINPID holds no process id"),
    ];
    for (mainpid, message) in cases {
        let out = std::process::Command::new(BIN)
            .arg("reload")
            .env("MAINPID", &mainpid)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mainpid}: {stderr}");
        assert!(stderr.contains(message), "{mainpid}: {stderr}");
    }
    assert_eq!(
        sleeper.try_wait().unwrap(),
        None,
        "the sleeper was signalled"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // No server on a state dir: says so.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["reload", "--state-dir"])
        .arg(dir.path())
        .env_remove("MAINPID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server to reload"));
}

#[test]
fn repeated_failures_block_that_address_only() {
    let s = start_with_tokens(&[]);
    let wrong = bearer("wrong-token-0123456789ab");
    for n in 0..20 {
        let r = health_from("127.0.0.3", s.addr, &wrong);
        assert_eq!(r.status, 401, "failure {n}");
    }
    let r = health_from("127.0.0.3", s.addr, &wrong);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"detail":"Too many failed authentications; try again later"}"#
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "Retry-After {retry}");
    // The right token is served from the blocked address too: the throttle only ever
    // slows the guilty.
    assert_eq!(health_from("127.0.0.3", s.addr, &bearer(CI)).status, 200);
    let hb = request_from(
        "127.0.0.3",
        s.addr,
        "POST",
        "/session",
        &[("Authorization", &basic("ci", CI))],
    );
    assert_eq!(hb.status, 201, "{}", hb.text());
    // Another address with the right token is not slowed, and not blocked even when wrong.
    assert_eq!(health_from("127.0.0.4", s.addr, &bearer(CI)).status, 200);
    assert_eq!(health_from("127.0.0.4", s.addr, &wrong).status, 401);
    // /healthz stays open to the blocked address.
    s.get("/healthz").expect_empty(204);
    let log = s.log_text();
    assert!(
        log.contains("127.0.0.3 failed to authenticate 20 times within 60 s: refused for 60 s"),
        "{log}"
    );
    assert_eq!(log.matches("refused for 60 s").count(), 1);
}

/// Removing a name from the token file and reloading ends its sessions: the active one's
/// lab is torn down as on `DELETE /session`, the next name's session is promoted, and an
/// event names each ended session.
#[test]
fn revoking_a_name_ends_its_sessions_on_reload() {
    let s = start_with_tokens(&[]);
    let held = create_as(&s, Who::Owner);
    let other = create_as(&s, Who::Other);
    let queued = create_as(&s, Who::Owner);
    assert_eq!(acquire_as(&s, Who::Owner, &held).status, 200);
    assert!(s.registered().is_some());
    write_tokens(
        s.dir.path(),
        &format!(
            "other:{OTHER}
ops:{ADMIN}:admin
"
        ),
        0o600,
    );
    s.signal(Signal::HUP);
    wait_until(
        Duration::from_secs(5),
        "the revoked sessions to end",
        || {
            s.log_text()
                .contains("SIGHUP: ended 2 sessions of revoked tokens")
        },
    );
    let as_other = |path: &str| s.request("GET", path, &[("Authorization", &bearer(OTHER))], b"");
    as_other(&format!("/session/{other}")).expect(200, r#"{"status":"active","position":0}"#);
    let admin = |path: &str| s.request("GET", path, &[("Authorization", &bearer(ADMIN))], b"");
    for id in [&held, &queued] {
        admin(&format!("/session/{id}")).expect(404, SESSION_NOT_FOUND);
    }
    wait_until(Duration::from_secs(10), "the held lab's teardown", || {
        s.registered().is_none() && s.work_dirs().is_empty()
    });
    let events = admin("/events").json();
    let revoked: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "session_ended" && e["reason"] == "revoked")
        .collect();
    let mut named: Vec<(String, String, bool)> = revoked
        .iter()
        .map(|e| {
            (
                e["session"].as_str().unwrap().to_owned(),
                e["owner"].as_str().unwrap().to_owned(),
                e["was_active"].as_bool().unwrap(),
            )
        })
        .collect();
    named.sort();
    let mut expected = vec![
        (held[..8].to_owned(), "ci".to_owned(), true),
        (queued[..8].to_owned(), "ci".to_owned(), false),
    ];
    expected.sort();
    assert_eq!(named, expected, "{events}");
    let metrics = admin("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "neops_remote_lab_sessions_ended_total{reason=\"revoked\"} 2"),
        "{metrics}"
    );
}

/// A name removed from the token file while the server was down: its restored sessions end
/// at start.
#[test]
fn sessions_of_a_name_revoked_while_stopped_end_at_start() {
    let s = start_with_tokens(&[]);
    let id = create_as(&s, Who::Owner);
    let tokens = s.dir.path().join("tokens").display().to_string();
    let dir = s.kill_keep_dir();
    write_tokens(
        dir.path(),
        &format!(
            "other:{OTHER}
"
        ),
        0o600,
    );
    let s = TestServer::start(Options::default().in_dir(dir).arg("--token-file", &tokens));
    let path = format!("/session/{id}");
    call(&s, Who::Other, "GET", &path, None).expect(404, SESSION_NOT_FOUND);
    assert!(
        s.log_text()
            .contains("start: ended 1 session of revoked tokens"),
        "{}",
        s.log_text()
    );
}

#[test]
fn sessions_keep_their_owner_across_a_restart() {
    let s = start_with_tokens(&[]);
    let id = create_as(&s, Who::Owner);
    let text = std::fs::read_to_string(s.state_dir().join("state.json")).unwrap();
    assert!(text.contains(r#""owner":"ci""#), "{text}");
    let tokens = s.dir.path().join("tokens").display().to_string();
    let dir = s.kill_keep_dir();
    let s = TestServer::start(Options::default().in_dir(dir).arg("--token-file", &tokens));
    let path = format!("/session/{id}");
    call(&s, Who::Other, "GET", &path, None).expect(404, SESSION_NOT_FOUND);
    call(&s, Who::Owner, "GET", &path, None).expect(200, r#"{"status":"active","position":0}"#);
}

#[test]
fn a_bad_token_file_stops_the_start_naming_the_file_and_line_but_never_the_token() {
    let cases: [(&str, u32, &str); 5] = [
        (
            "ci:ci-token-0123456789abcdef\nbad name:secret-token-0123456789\n",
            0o600,
            "line 2: the name must be",
        ),
        (
            "ci:short-secret\n",
            0o600,
            "line 1: the token is shorter than 16",
        ),
        (
            "ci:secret-token-0123456789:root\n",
            0o600,
            "line 1: the third field can only be `admin`",
        ),
        (
            "ci:secret-token-0123456789\n",
            0o644,
            "is readable by every user (mode 644)",
        ),
        ("# only a comment\n", 0o600, "holds no token"),
    ];
    for (text, mode, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_tokens(dir.path(), text, mode);
        let tokens = dir.path().join("tokens");
        let options = Options::default().arg("--token-file", &tokens.display().to_string());
        let out = TestServer::command(dir.path(), &options).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&tokens.display().to_string()), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
        assert!(!stderr.contains("secret"), "{stderr}");
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
    // A missing file.
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default().arg("--token-file", "/nonexistent/tokens");
    let out = TestServer::command(dir.path(), &options).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read token file /nonexistent/tokens"),
        "{stderr}"
    );
}

fn events_of(s: &TestServer, kind: &str) -> Vec<serde_json::Value> {
    let r = s.request(
        "GET",
        "/events?limit=10000",
        &[("Authorization", &bearer(ADMIN))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

fn metric(s: &TestServer, name: &str) -> u64 {
    let r = s.request("GET", "/metrics", &[("Authorization", &bearer(ADMIN))], b"");
    let text = r.text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("neops_remote_lab_{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

/// Behind the reverse proxy every client has the proxy's address: with `--trusted-proxy`,
/// the throttle keys on the address the proxy forwards, so one client's bad tokens block
/// that client, and the right token (heartbeats too) is served to everyone.
#[test]
fn twenty_bad_tokens_through_the_proxy_block_only_that_client() {
    let s = start_with_tokens(&["--trusted-proxy", "127.0.0.5"]);
    let proxy = |xff: &str, auth: &str, method: &str, path: &str, extra: Option<(&str, &str)>| {
        let mut headers = vec![("X-Forwarded-For", xff), ("Authorization", auth)];
        headers.extend(extra);
        request_from("127.0.0.5", s.addr, method, path, &headers)
    };
    let wrong = bearer("stale-token-0123456789ab");
    let session = {
        let r = proxy("10.1.1.1", &bearer(CI), "POST", "/session", None);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["session_id"].as_str().unwrap().to_owned()
    };
    for n in 0..20 {
        let r = proxy("203.0.113.9, 10.9.9.9", &wrong, "GET", "/queue", None);
        assert_eq!(r.status, 401, "failure {n}");
    }
    assert_eq!(proxy("10.9.9.9", &wrong, "GET", "/queue", None).status, 429);
    // Another client behind the same proxy fails without being blocked...
    assert_eq!(proxy("10.1.1.2", &wrong, "GET", "/queue", None).status, 401);
    // ...and the right token is served, heartbeats included, to the guilty one too.
    let hb = proxy(
        "10.1.1.1",
        &bearer(CI),
        "POST",
        "/session/heartbeat",
        Some(("X-Session-ID", &session)),
    );
    assert_eq!(hb.status, 204, "{}", hb.text());
    assert_eq!(
        proxy("10.9.9.9", &bearer(CI), "GET", "/queue", None).status,
        200
    );
    // A client that is not the proxy cannot pick its address by sending the header.
    for _ in 0..20 {
        let r = request_from(
            "127.0.0.6",
            s.addr,
            "GET",
            "/queue",
            &[("X-Forwarded-For", "10.7.7.7"), ("Authorization", &wrong)],
        );
        assert_eq!(r.status, 401);
    }
    assert_eq!(proxy("10.7.7.7", &wrong, "GET", "/queue", None).status, 401);
    let blocked = events_of(&s, "auth_blocked");
    let addrs: Vec<&str> = blocked
        .iter()
        .map(|e| e["addr"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["127.0.0.6", "10.9.9.9"]);
}

/// Thousands of addresses failing once fill the throttle's table; a new address failing
/// twenty times is still blocked (the oldest entries made room).
#[test]
fn a_full_throttle_table_still_throttles_a_new_address() {
    let s = start_with_tokens(&[]);
    let wrong = bearer("not-a-token-of-anybody");
    // Each in a /24 of its own: 2 entries each, 8 400 in all, over the table's 4 096.
    for n in 0..4200u32 {
        let source = format!("127.{}.{}.1", 1 + n / 250, n % 250);
        let r = health_from(&source, s.addr, &wrong);
        assert_eq!(r.status, 401, "{source}");
    }
    for n in 0..20 {
        assert_eq!(
            health_from("127.250.0.1", s.addr, &wrong).status,
            401,
            "{n}"
        );
    }
    assert_eq!(health_from("127.250.0.1", s.addr, &wrong).status, 429);
    assert_eq!(health_from("127.250.0.1", s.addr, &bearer(CI)).status, 200);
}

/// A flood of failures from many addresses leaves the history in place: at most a
/// budget of auth events per minute, every failure counted in /metrics.
#[test]
fn a_flood_of_failures_leaves_server_started_in_the_events() {
    let mut options = options_with_tokens(&[]);
    options
        .env
        .push(("NEOPS_REMOTE_LAB_EVENTS_ROTATE_BYTES".into(), "2000".into()));
    let s = TestServer::start(options);
    let wrong = bearer("not-a-token-of-anybody");
    for n in 0..600u32 {
        let source = format!("127.{}.{}.{}", 1 + n / 2500, n / 10 % 250, 1 + n % 10);
        let r = request_from(
            &source,
            s.addr,
            "GET",
            &format!("/queue?{n}"),
            &[("Authorization", &wrong)],
        );
        assert_eq!(r.status, 401);
    }
    assert_eq!(events_of(&s, "server_started").len(), 1);
    let failed = events_of(&s, "auth_failed");
    assert!(
        !failed.is_empty() && failed.len() <= 20,
        "{} auth_failed events",
        failed.len()
    );
    assert_eq!(metric(&s, "auth_failures_total"), 600);
    assert_eq!(
        metric(&s, "auth_events_suppressed_total"),
        600 - failed.len() as u64
    );
    let log = s.log_text();
    assert!(log.matches("authentication failed").count() <= 20, "{log}");
}

/// Long paths without a token: a request line over 8 KiB is refused (414) before anything
/// is recorded; one under it leaves an event and a log line with the path cut short, once
/// per address and minute, however many follow.
#[test]
fn long_paths_without_a_token_leave_memory_and_the_event_log_bounded() {
    let s = start_with_tokens(&[]);
    let pid = s.child.id();
    let (rss_before, _, _) = process_figures(pid);
    let huge = format!("/{}", "a".repeat(1_000_000));
    let long = format!("/{}", "b".repeat(8000));
    for n in 0..100u32 {
        let source = format!("127.3.{}.{}", n / 19, 1 + n % 19);
        let mut stream = TcpStream::connect(s.addr).unwrap();
        let _ = stream.write_all(format!("GET {huge} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let r = read_response(&mut stream, false);
        assert_eq!(r.status, 414, "{}", r.text());
        // A wrong token: a request with none is a challenge, never an event.
        let r = request_from(
            &source,
            s.addr,
            "GET",
            &long,
            &[("Authorization", "Bearer wrong-token-0123456789")],
        );
        assert_eq!(r.status, 401, "{source}");
    }
    let (rss_after, _, _) = process_figures(pid);
    let failed = events_of(&s, "auth_failed");
    assert!(!failed.is_empty() && failed.len() <= 20, "{}", failed.len());
    for event in &failed {
        let path = event["path"].as_str().unwrap();
        assert_eq!(path, format!("/{}...", "b".repeat(63)));
    }
    let events = std::fs::metadata(s.state_dir().join("events.jsonl"))
        .unwrap()
        .len();
    let log = s.log_text();
    eprintln!(
        "100 paths of 1 MB and 100 of 8 KB without a token: RSS {rss_before} -> {rss_after} KiB, \
         log {} bytes, events.jsonl {events} bytes",
        log.len()
    );
    assert!(log.len() < 16 * 1024, "{} log bytes", log.len());
    assert!(events < 16 * 1024, "{events} event bytes");
    assert!(!log.contains(&"b".repeat(100)));
    assert!(
        rss_after < rss_before + 64 * 1024,
        "{rss_before} -> {rss_after} KiB"
    );
}

/// Requests without a token that declare an absurd body are answered 401 and their
/// connections abandoned without ever counting toward the restart limit; with a token the
/// answer is still 413.
#[test]
fn oversize_bodies_without_a_token_never_restart_the_server() {
    let mut s = start_with_tokens(&[]);
    for n in 0..150u32 {
        let source = format!("127.4.{}.{}", n / 10, 1 + n % 10);
        use rustix::net::{AddressFamily, SocketType, bind, connect, ipproto, socket};
        let fd = socket(AddressFamily::INET, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
        bind(&fd, &format!("{source}:0").parse::<SocketAddr>().unwrap()).unwrap();
        connect(&fd, &s.addr).unwrap();
        let mut stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(
                b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nabc",
            )
            .unwrap();
        // An abandoned connection's answer is its status line and headers (no length, no
        // body: the connection is never closed).
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 401", "{n}");
    }
    assert_eq!(s.child.try_wait().unwrap(), None, "the server exited");
    s.get("/healthz").expect_empty(204);
    assert_eq!(metric(&s, "connections_abandoned_untrusted_total"), 150);

    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .write_all(
            format!(
                "POST /session HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 1000000000000\r\n\r\n",
                bearer(CI)
            )
            .as_bytes(),
        )
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    assert_eq!(s.child.try_wait().unwrap(), None, "the server exited");
    let log = s.log_text();
    assert_eq!(log.matches("without a valid token").count(), 1, "{log}");
}
