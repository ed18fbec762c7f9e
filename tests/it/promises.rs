//! Issue 12: the promises hold against a local user and a careless operator. The state dir
//! cannot be hijacked, a full disk loses nothing a client was told, a second server started
//! by mistake destroys nothing, and a `netlab up` orphaned by `kill -9` does not survive
//! the restart.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const TOPO: &str = "nodes: [r1]\n";

/// Runs a server that is expected to refuse to start; returns its exit code and stderr.
fn refused(dir: &Path, options: &Options) -> (Option<i32>, String) {
    let mut child = TestServer::command(dir, options)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn prepared_dir() -> tempfile::TempDir {
    let dir = test_dir();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::set_permissions(
        dir.path().join("state"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    dir
}

#[test]
fn a_state_dir_others_can_write_to_is_refused() {
    let dir = prepared_dir();
    let state = dir.path().join("state");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = refused(dir.path(), &Options::default());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "state dir {} is writable by group or others (mode 777)",
            state.display()
        )),
        "{err}"
    );
    // Nothing was made in it.
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}

#[test]
fn a_state_dir_owned_by_another_user_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED a_state_dir_owned_by_another_user_is_refused: needs root to chown");
        return;
    }
    let dir = prepared_dir();
    let state = dir.path().join("state");
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let (code, err) = refused(dir.path(), &Options::default());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "state dir {} belongs to uid 65534, not to this server's uid 0",
            state.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}

#[test]
fn a_symlinked_lock_file_is_never_written_through() {
    let dir = prepared_dir();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "root's file\n").unwrap();
    std::os::unix::fs::symlink(&precious, dir.path().join("state/neops-remote-lab.lock")).unwrap();
    let (code, err) = refused(dir.path(), &Options::default());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot open lock file"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root's file\n");
}

#[test]
fn a_symlinked_temporary_state_file_is_never_written_through() {
    let dir = prepared_dir();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "root's file\n").unwrap();
    let tmp = dir.path().join("state/state.json.tmp");
    std::os::unix::fs::symlink(&precious, &tmp).unwrap();
    let s = start_in(dir);
    s.create_session();
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root's file\n");
    assert!(std::fs::symlink_metadata(&tmp).is_err(), "the link is gone");
    assert!(
        std::fs::read_to_string(s.state_dir().join("state.json"))
            .unwrap()
            .contains("\"status\":\"active\"")
    );
}

#[test]
fn records_outside_labs_are_never_acted_on() {
    let dir = prepared_dir();
    // A directory the state file has no business with, named as the lab, a start and a
    // teardown.
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("t.yml"), TOPO).unwrap();
    let lab = serde_json::json!({
        "hash": "00".repeat(32),
        "work_dir": victim,
        "topology": victim.join("t.yml"),
        "ref_count": 1,
        "devices": [],
    });
    let id = "0b8e6f0e-4f3c-4d2a-9a57-8a7f1f6f2b11";
    let state = serde_json::json!({
        "version": 1,
        "sessions": [{"id": id, "status": "active"}],
        "lab": lab,
        "starting": {"session": id, "work_dir": victim, "pgid": 1},
        "teardowns": [lab],
    });
    std::fs::write(dir.path().join("state/state.json"), state.to_string()).unwrap();
    let s = start_in(dir);
    // The session is kept; nothing was done in or to the victim directory.
    s.expect_session(id, "active", 0);
    assert!(victim.join("t.yml").exists());
    let victim_text = victim.display().to_string();
    assert!(
        s.calls()
            .iter()
            .all(|(_, cwd)| !cwd.starts_with(&victim_text)),
        "{:?}",
        s.calls()
    );
    assert!(
        s.log_text().contains(&format!(
            "the state file names the lab {victim_text}, outside"
        )),
        "{}",
        s.log_text()
    );
    s.lab("GET", "/lab", id).expect(
        200,
        r#"{"running":false,"topology":null,"ref_count":0,"devices":[],"netlab_status":null}"#,
    );
}

// ------------------------------------------------------------------ a full file system

/// A small tmpfs mounted on a directory for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("neops-test")
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Tmpfs(at.to_owned()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` to the last byte; returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = [0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    while file.write_all(&[0]).is_ok() {}
    path
}

const NOT_PERSISTED: &str = "Change not made: the server cannot persist its state file (No space left on device (os error 28)); try again later";

#[test]
fn a_full_disk_refuses_changes_and_loses_nothing_acknowledged() {
    let dir = prepared_dir();
    let state = dir.path().join("state");
    let _mount = match Tmpfs::mount(&state, "512k") {
        Ok(mount) => mount,
        Err(why) => {
            eprintln!(
                "SKIPPED a_full_disk_refuses_changes_and_loses_nothing_acknowledged: \
                 cannot mount a tmpfs here ({why}); run the tests as root"
            );
            return;
        }
    };
    let s = start_in(dir);
    let (a, _) = s.create_session();
    let (b, _) = s.create_session();
    let filler = fill(&state);

    // Every change is refused, and none is made.
    let detail = format!("{{\"detail\":\"{NOT_PERSISTED}\"}}");
    let r = s.post("/session");
    r.expect(503, &detail);
    assert_eq!(r.header("Retry-After"), Some("5"));
    s.delete(&format!("/session/{a}")).expect(503, &detail);
    s.expect_session(&a, "active", 0);
    s.expect_session(&b, "waiting", 1);
    // The refused session left no `session_created`: only the two made before.
    let events = s.get("/events").json();
    let created: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "session_created")
        .map(|e| e["session"].as_str().unwrap())
        .collect();
    assert_eq!(created, [&b[..8], &a[..8]], "{events}");
    s.get("/healthz").expect(
        503,
        &format!("{{\"detail\":\"degraded: {NOT_PERSISTED}\"}}"),
    );
    let health = s.get("/debug/health").json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["sessions"], 2);

    // kill -9 and a restart on the full disk: what the clients were told is all there.
    let dir = s.kill_keep_dir();
    let s = start_in(dir);
    s.expect_session(&a, "active", 0);
    s.expect_session(&b, "waiting", 1);
    assert_eq!(s.get("/debug/health").json()["sessions"], 2);
    s.get("/healthz").expect(
        503,
        &format!("{{\"detail\":\"degraded: {NOT_PERSISTED}\"}}"),
    );

    // Space again: the server is healthy after its next write, and changes work.
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(5), "the degraded state to end", || {
        s.get("/healthz").status == 204
    });
    s.delete(&format!("/session/{a}")).expect_empty(204);
    let dir = s.kill_keep_dir();
    let s = start_in(dir);
    s.expect_no_session(&a);
    s.expect_session(&b, "active", 0);
}

// ------------------------------------------------------------------ a second server

/// Options for a second server on another state dir that shares the first one's netlab.
fn sharing_netlab_of(first: &TestServer, args: &[&str]) -> Options {
    let mut options = Options::default();
    options.env.push((
        "FAKE_NETLAB_DIR".into(),
        first.fake_dir().display().to_string(),
    ));
    options.args.extend(args.iter().map(|a| (*a).to_owned()));
    options
}

#[test]
fn a_second_server_on_the_same_port_destroys_nothing() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let registered = s.registered().unwrap();
    let calls = s.calls().len();

    let other = prepared_dir();
    let port = s.addr.port().to_string();
    let (code, err) = refused(other.path(), &sharing_netlab_of(&s, &["--port", &port]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    // It never ran netlab: the first server's lab is untouched and still its own.
    assert_eq!(s.calls().len(), calls, "{:?}", &s.calls()[calls..]);
    assert_eq!(s.registered(), Some(registered));
    assert_eq!(s.lab("GET", "/lab", &a).json()["running"], true);
}

/// `POST /lab` on `server` is refused 409 because netlab's `default` instance runs in
/// `registered`, outside its state dir.
fn expect_foreign_refusal(server: &TestServer, session: &str, registered: &str) {
    let r = server.acquire(session, &Form::topology("t.yml", TOPO));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.json()["detail"],
        format!(
            "netlab's instance 'default' is running in {registered}, outside this server's {}: \
             not touching it (tear it down there, or start the server with --cleanup-foreign)",
            server.state_dir().join("labs").display()
        )
    );
}

#[test]
fn a_foreign_default_instance_is_left_alone_unless_asked() {
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let registered = s.registered().unwrap();

    // Another server (another state dir, the same netlab) leaves it alone...
    let other = TestServer::start(sharing_netlab_of(&s, &[]).in_dir(prepared_dir()));
    assert_eq!(s.registered().as_deref(), Some(registered.as_str()));
    assert!(
        other.log_text().contains(&format!(
            "netlab's instance 'default' is running in {registered}, outside this server's"
        )),
        "{}",
        other.log_text()
    );
    // ...and refuses to start a lab over it.
    let (b, _) = other.create_session();
    expect_foreign_refusal(&other, &b, &registered);
    assert_eq!(s.registered().as_deref(), Some(registered.as_str()));
    assert!(other.work_dirs().is_empty());
    drop(other);

    // Asked to, a server tears it down.
    let _third =
        TestServer::start(sharing_netlab_of(&s, &["--cleanup-foreign"]).in_dir(prepared_dir()));
    assert_eq!(s.registered(), None);
}

// ------------------------------------------------------------------ an orphaned netlab up

/// Processes running the fake netlab with `up`, working under `labs`.
fn fake_ups_under(labs: &Path) -> Vec<u32> {
    let fake = fake_netlab().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            args.contains(&fake.as_bytes())
                && args.contains(&&b"up"[..])
                && cwd.starts_with(labs)
                && alive(*pid)
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !matches!(
        stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next(),
        Some("Z" | "X" | "x")
    )
}

#[test]
fn an_orphaned_netlab_up_is_killed_on_restart() {
    let s = start();
    let (a, _) = s.create_session();
    s.set_control("up.hang", "");
    s.set_control("hang.seconds", "120");
    let _pending = s.acquire_during_up(&a, Form::topology("t.yml", TOPO));
    let labs = std::fs::canonicalize(s.state_dir().join("labs")).unwrap();
    let ups = fake_ups_under(&labs);
    assert_eq!(ups.len(), 1, "{ups:?}");
    let up = ups[0];
    // Its process group is in the start record.
    wait_until(
        Duration::from_secs(5),
        "the group in the start record",
        || {
            std::fs::read_to_string(s.state_dir().join("state.json"))
                .is_ok_and(|t| t.contains(&format!("\"pgid\":{up}")))
        },
    );

    let dir = s.kill_keep_dir();
    assert!(alive(up), "the up outlives the server killed with -9");
    std::fs::remove_file(dir.path().join("fake/control/up.hang")).unwrap();
    let s = start_in(dir);
    // Killed before the restart listens, with the child it started.
    assert!(!alive(up), "the orphaned up survived the restart");
    assert!(fake_ups_under(&labs).is_empty());
    assert!(
        s.log_text().contains(&format!(
            "processes left of the last run's netlab up (process group {up})"
        )),
        "{}",
        s.log_text()
    );
    // The session retries and gets a lab of its own, from one `up`.
    s.clear_calls();
    let r = s.acquire(&a, &Form::topology("t.yml", TOPO));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.call_lines()
            .iter()
            .filter(|l| l.starts_with("up "))
            .count(),
        1
    );
}

/// The fake netlab's calls but `inspect`: netlab writes the snapshot before it refuses an
/// `up`, so an inspect may begin meanwhile (and is killed when the `up` fails).
fn netlab_calls_but_inspect(s: &TestServer) -> Vec<String> {
    s.call_lines()
        .into_iter()
        .filter(|l| !l.starts_with("inspect"))
        .collect()
}

#[test]
fn a_foreign_lab_started_behind_our_back_is_refused_without_touching_it() {
    // `other` tore its own lab down, so it knows netlab's `default` instance to be free
    // and starts the next lab without asking `netlab status` first. Meanwhile the first
    // server started a lab of its own in that instance: netlab refuses `other`'s `up`
    // (after writing its files into the new work dir, as netlab does), and `other` then
    // looks, finds the lab outside its state dir, and answers 409 as it would have before.
    // No `down` runs in its work dir: one there would reach the first server's lab.
    let s = start();
    let other = TestServer::start(sharing_netlab_of(&s, &[]).in_dir(prepared_dir()));
    let (b, _) = other.create_session();
    assert_eq!(
        other.acquire(&b, &Form::topology("t.yml", TOPO)).status,
        200
    );
    assert_eq!(other.lab("DELETE", "/lab", &b).status, 202);
    wait_until(Duration::from_secs(10), "other's lab torn down", || {
        s.registered().is_none()
    });
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    let registered = s.registered().unwrap();
    s.clear_calls();

    expect_foreign_refusal(&other, &b, &registered);
    assert_eq!(
        netlab_calls_but_inspect(&s),
        ["up t.yml", "status --all --format json"],
        "an `up` refused, then a look, and nothing torn down"
    );
    assert_eq!(s.registered().as_deref(), Some(registered.as_str()));
    assert_eq!(s.lab("GET", "/lab", &a).json()["running"], true);
    assert!(
        other.work_dirs().is_empty(),
        "the refused start's files are gone"
    );
}

#[test]
fn a_leftover_of_ours_found_behind_a_refused_up_is_cleared_and_the_start_goes_on() {
    // The instance is registered in a directory of this server's labs/ that it does not
    // know (left by a crash of a process it cannot remember): the refused `up` makes it
    // look, clear it, and start again.
    let s = start();
    let (a, _) = s.create_session();
    assert_eq!(s.acquire(&a, &Form::topology("t.yml", TOPO)).status, 200);
    assert_eq!(s.lab("DELETE", "/lab", &a).status, 202);
    wait_until(Duration::from_secs(10), "the lab torn down", || {
        s.registered().is_none() && s.work_dirs().is_empty()
    });
    let leftover = s
        .state_dir()
        .join("labs")
        .join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("netlab.snapshot.pickle"), "{}").unwrap();
    std::fs::write(
        s.fake_dir().join("instance.json"),
        serde_json::json!({"dir": leftover, "nodes": ["r1"], "name": "left"}).to_string(),
    )
    .unwrap();
    s.clear_calls();

    let r = s.acquire(&a, &Form::topology("t.yml", TOPO));
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = netlab_calls_but_inspect(&s);
    assert_eq!(
        lines[..4],
        [
            "up t.yml",
            "status --all --format json",
            "down --instance default --cleanup",
            "up t.yml",
        ],
        "{lines:?}"
    );
    let new: Vec<PathBuf> = s
        .work_dirs()
        .into_iter()
        .filter(|d| *d != leftover)
        .collect();
    assert_eq!(new.len(), 1);
    assert_eq!(s.registered(), Some(new[0].display().to_string()));
    assert!(
        !leftover.join("netlab.snapshot.pickle").exists(),
        "netlab cleared it"
    );
}
