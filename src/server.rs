//! Start-up, the threads, and shutdown.
//!
//! Start-up: check the state dir is ours alone, lock it, bind the port (a second server by
//! mistake fails here, before it touches netlab), check netlab (`netlab version`), clear what
//! a previous run left (netlab's `default` instance when it is in our `labs/`, old work
//! directories), print `listening on http://ADDR:PORT`, tell systemd `READY=1`.
//!
//! Shutdown (SIGTERM/SIGINT): the listener stops taking requests (what tiny_http already
//! parsed is still answered), the workers drain the channel, the lab thread finishes its job
//! (a running `netlab up` is cut short) and tears the lab down, and the process exits 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, unbounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tiny_http::Server;

use crate::auth::Access;
use crate::clock::{Clock, MonotonicClock};
use crate::config::{self, Command, Config};
use crate::lab::{LabRecord, Teardown};
use crate::lab_thread;
use crate::netlab::Netlab;
use crate::persist::{self, Snapshot};
use crate::state::{LabJob, Shared, State, plural};
use crate::{api, http, listener, lockfile, logging, notify, procgroup, statedir, timer, upload};

/// Runs the program with its arguments (without the program name); returns the exit code.
pub fn main<I: IntoIterator<Item = std::ffi::OsString>>(args: I) -> i32 {
    match config::parse(args, |name| std::env::var_os(name)) {
        Ok(Command::Help) => {
            print!("{}", config::help_text());
            0
        }
        Ok(Command::Version) => {
            println!("{}", config::version_text());
            0
        }
        Ok(Command::Serve(config)) => serve(*config),
        Ok(Command::Cleanup(config)) => cleanup(*config),
        Ok(Command::Reload(config)) => reload(&config),
        Err(e) => {
            eprintln!("neops-remote-lab: {e}\nTry 'neops-remote-lab --help'.");
            2
        }
    }
}

fn fail(message: impl std::fmt::Display) -> i32 {
    log::error!("{message}");
    1
}

fn serve(config: Config) -> i32 {
    if let Err(e) = logging::init(config.log_level, config.log_file.as_deref()) {
        eprintln!("neops-remote-lab: {e}");
        return 1;
    }
    if let Some(path) = &config.log_config {
        log::warn!(
            "--log-config {} is ignored: use --log-level, --log-file or --debug",
            path.display()
        );
    }
    let access = match &config.token_file {
        Some(path) => match Access::load(path, config.public_read) {
            Ok(access) => {
                log::info!(
                    "access tokens from {}: every route but /healthz needs one{}",
                    path.display(),
                    if config.public_read {
                        " (--public-read: the read-only views do not)"
                    } else {
                        ""
                    }
                );
                Some(access)
            }
            Err(e) => return fail(e),
        },
        None => {
            log::warn!(
                "no --token-file: anyone who can reach the port can use the lab \
                 (and a topology runs commands on this host)"
            );
            if config.public_read {
                log::warn!("--public-read has no effect without --token-file");
            }
            None
        }
    };
    if let Err(e) = statedir::prepare(&config.state_dir) {
        return fail(e);
    }
    let _lock = match lockfile::acquire(&config.state_dir) {
        Ok(lock) => lock,
        Err(e) => return fail(e),
    };
    let nofile = listener::raise_nofile_limit();
    // Bound before netlab is touched: a second server started by mistake on a port in use
    // must fail without tearing down anything.
    let socket = match listener::bind(&config.host, config.port, listener::socket_timeout(&config))
    {
        Ok(socket) => socket,
        Err(e) => {
            return fail(format!(
                "cannot listen on {}:{}: {e}",
                config.host, config.port
            ));
        }
    };

    let netlab = Netlab::new(
        config.netlab.clone(),
        config.netlab_timeout,
        config.stream_netlab_output,
    );
    match netlab.version(&config.state_dir) {
        Ok(version) => log::info!("using {version} ({})", config.netlab.display()),
        Err(e) => {
            return fail(format!(
                "netlab is missing or broken: {e}\n\
                 Install it (for example `python3 -m venv /opt/netlab && /opt/netlab/bin/pip install networklab`) \
                 and point --netlab (or NEOPS_REMOTE_LAB_NETLAB) at the `netlab` command."
            ));
        }
    }
    let clock = Arc::new(MonotonicClock::new());
    let (state, lab_outcome) = restore(&config, &netlab, clock.now());

    // A copy of the listening socket for the rescue of connections tiny_http leaves waiting
    // (see `listener::rescue`); closed when that thread ends.
    let rescue_socket = match socket.try_clone() {
        Ok(copy) => copy,
        Err(e) => return fail(format!("cannot copy the listening socket: {e}")),
    };
    let server = match Server::from_listener(socket, None) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            return fail(format!(
                "cannot listen on {}:{}: {e}",
                config.host, config.port
            ));
        }
    };
    let Some(bound) = server.server_addr().to_ip() else {
        return fail("the listener has no IP address");
    };

    let (lab_tx, lab_rx) = unbounded();
    let pending: Vec<Teardown> = state.teardowns.clone();
    let mut shared = Shared::with_state(config.clone(), clock, lab_tx, Some(state));
    shared.access = access;
    let shared = Arc::new(shared);
    // The restored state is the new truth: write it before anyone can see it. (If that
    // fails, the server starts degraded and refuses changes until a write succeeds.)
    shared.set_durable_baseline();
    let version = shared.lock().changed();
    shared.persist_quietly(version);
    let restored = shared.lock().queue.len();
    shared.events.emit(
        "server_started",
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "restored_sessions": restored,
            "lab": lab_outcome,
        }),
    );
    for t in pending {
        log::info!(
            "carrying out the teardown of {} left pending by the last run",
            t.lab.topology.display()
        );
        shared.send_lab_job(LabJob::Teardown(t));
    }

    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => return fail(format!("cannot handle signals: {e}")),
    };
    {
        let shared = Arc::clone(&shared);
        // Weak: once the listener is done, the server is dropped and its socket closed.
        let server = Arc::downgrade(&server);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal == SIGHUP {
                        reload_tokens(&shared);
                    } else if shared.begin_shutdown() {
                        let name = if signal == SIGINT {
                            "SIGINT"
                        } else {
                            "SIGTERM"
                        };
                        log::info!("{name}: shutting down");
                        notify::notify("STOPPING=1");
                        if let Some(server) = server.upgrade() {
                            server.unblock();
                        }
                    } else {
                        log::info!("shutdown already in progress");
                    }
                }
            })
            .expect("cannot start the signal thread");
    }

    let netlab = netlab.with_live_log(Arc::clone(&shared.lab_log));
    let lab_thread = {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("lab".into())
            .spawn(move || lab_thread::run(&shared, &netlab, lab_rx))
            .expect("cannot start the lab thread")
    };
    let (timer_stop, timer_rx) = crossbeam_channel::bounded::<()>(1);
    let timer = {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("timer".into())
            .spawn(move || timer::run(&shared, timer_rx, timer::probe_address(bound)))
            .expect("cannot start the timer thread")
    };
    let (work_tx, work_rx) = http::work_channel();
    let handler: Arc<http::Handler> = {
        let shared = Arc::clone(&shared);
        Arc::new(move |responder| api::handle(&shared, responder))
    };
    let ceiling = config.max_upload_bytes.max(http::QUARANTINE_FLOOR);
    let workers = http::start_workers(config.workers, &work_rx, ceiling, &handler);
    drop(handler);
    drop(work_rx);
    let (watch_stop, watch_rx) = crossbeam_channel::bounded::<()>(1);
    let watch = {
        let shared = Arc::clone(&shared);
        let every = listener::watch_interval(listener::socket_timeout(&config));
        let probe = timer::probe_address(bound);
        thread::Builder::new()
            .name("watch".into())
            .spawn(move || watch_listener(&shared, probe, every, &watch_rx))
            .expect("cannot start the watch thread")
    };

    let rescuer = {
        let shared = Arc::clone(&shared);
        let probe = timer::probe_address(bound);
        thread::Builder::new()
            .name("rescue".into())
            .spawn(move || {
                listener::rescue(
                    &rescue_socket,
                    probe,
                    shared.shutdown_flag(),
                    &http::DISPATCHED,
                );
            })
            .expect("cannot start the rescue thread")
    };

    // The start-up contract (tests and scripts wait for this exact line), and the same
    // event in the log's own format.
    eprintln!("listening on http://{bound}");
    log::info!("listening on http://{bound}");
    log::info!(
        "serving with {} {}; state dir {}; client timeout {:.1} s; open files limit {}",
        config.workers,
        plural(config.workers, "worker", "workers"),
        config.state_dir.display(),
        config.client_timeout.as_secs_f64(),
        nofile.map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
    );
    notify::notify("READY=1");

    let listener = {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("listener".into())
            .spawn(move || http::listen(&server, shared.shutdown_flag(), &work_tx))
            .expect("cannot start the listener thread")
    };
    let listened = listener
        .join()
        .unwrap_or_else(|_| Err(http::ListenerFailed("its thread panicked".into())));
    if let Err(e) = &listened
        && !shared.is_shutting_down()
    {
        // tiny_http's accept loop is gone: no orderly stop (it would tear the lab down).
        listener::restart_now(&e.to_string());
    }
    let _ = watch_stop.send(());
    let _ = watch.join();
    let _ = rescuer.join();
    if shared.begin_shutdown() {
        notify::notify("STOPPING=1");
    }
    shared.events.emit("server_stopping", serde_json::json!({}));
    for worker in workers {
        let _ = worker.join();
    }
    // Nobody parks any more: every long-poll gets its answer now.
    shared.expire_parked(true);
    let _ = timer_stop.send(());
    let _ = timer.join();
    shared.send_lab_job(LabJob::Shutdown);
    let _ = lab_thread.join();
    shared.events.close();
    match listened {
        Ok(()) => {
            log::info!(
                "stopped (the longest a worker spent on one request: {:.1} ms; requests made \
                 to serve connections tiny_http left waiting: {})",
                http::LONGEST_SERVE_US.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0,
                listener::RESCUE_KICKS.load(std::sync::atomic::Ordering::Relaxed)
            );
            0
        }
        Err(e) => fail(e),
    }
}

/// `neops-remote-lab reload`: SIGHUP to the server (systemd's `$MAINPID`, else the pid in the
/// state dir's lock file), by syscall and only if that pid runs neops-remote-lab.
fn reload(config: &Config) -> i32 {
    let (pid, source) = match std::env::var("MAINPID") {
        Ok(pid) => (pid, "$MAINPID".to_owned()),
        Err(_) => {
            let lock = config.state_dir.join(lockfile::LOCK_FILE);
            match std::fs::read_to_string(&lock) {
                Ok(text) => (text, lock.display().to_string()),
                Err(e) => {
                    eprintln!(
                        "neops-remote-lab: no server to reload: cannot read {}: {e}",
                        lock.display()
                    );
                    return 1;
                }
            }
        }
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        eprintln!("neops-remote-lab: no server to reload: {source} holds no process id");
        return 1;
    };
    let is_server = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
            let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
            // After an upgrade the running binary shows as "neops-remote-lab (deleted)".
            name.is_some_and(|n| n.trim_end_matches(" (deleted)") == "neops-remote-lab")
        })
    };
    match crate::procgroup::signal_process(pid, is_server, rustix::process::Signal::HUP) {
        Ok(true) => {
            println!("sent SIGHUP to neops-remote-lab (pid {pid})");
            0
        }
        Ok(false) => {
            eprintln!("neops-remote-lab: pid {pid} (from {source}) is not neops-remote-lab");
            1
        }
        Err(e) => {
            eprintln!("neops-remote-lab: cannot signal pid {pid} (from {source}): {e}");
            1
        }
    }
}

/// SIGHUP: re-reads the token file; a bad file keeps the tokens in force.
fn reload_tokens(shared: &Shared) {
    let Some(access) = &shared.access else {
        log::info!("SIGHUP: no --token-file, nothing to reload");
        return;
    };
    match access.reload() {
        Ok(count) => log::info!(
            "SIGHUP: {} token{} from {}",
            count,
            if count == 1 { "" } else { "s" },
            access.path().display()
        ),
        Err(e) => log::error!("SIGHUP: {e}; the tokens in force stay"),
    }
}

/// The watch on tiny_http's listener (see [`crate::listener`]): connects several times per
/// socket timeout, and ends the process when the listener is gone, deaf for seconds, or too
/// many connections were abandoned.
fn watch_listener(shared: &Shared, probe: SocketAddr, every: Duration, stop: &Receiver<()>) {
    let limit = every.max(Duration::from_millis(500));
    let mut last_alive = Instant::now();
    loop {
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if shared.is_shutting_down() {
            return;
        }
        let verdict = listener::probe(probe, limit);
        if shared.is_shutting_down() {
            return;
        }
        if let Some(why) = listener::judge(verdict, &mut last_alive, Instant::now()) {
            listener::restart_now(&why);
        }
    }
}

/// Rebuilds the state from the state file, checked against reality:
/// * sessions come back in the same order (their silence is counted from now);
/// * the lab is re-adopted if its work dir exists, netlab still registers `default` there
///   and `inspect` answers; otherwise it is cleaned up and forgotten;
/// * a start the last run did not finish is cleaned up (its session can retry);
/// * pending teardowns stay pending (the lab thread carries them out first);
/// * without a lab to adopt, netlab's `default` instance is torn down;
/// * work directories nobody refers to are removed.
///
/// Also returns what became of the lab: `readopted`, `dropped` or `none`.
fn restore(config: &Config, netlab: &Netlab, now: std::time::Duration) -> (State, &'static str) {
    let mut state = State::new(config.max_sessions);
    let saved = match persist::load(&config.state_dir) {
        Ok(saved) => saved.unwrap_or_default(),
        Err(message) => {
            log::warn!("{message}");
            Snapshot::default()
        }
    };
    let saved = confine(saved, &config.state_dir.join("labs"));
    for (i, session) in saved.sessions.iter().enumerate() {
        // The head was ACTIVE before the restart; if the file does not say since when, it
        // is since now.
        let active_since = session
            .active_since_ms
            .or_else(|| (i == 0).then(crate::events::now_ms));
        state
            .queue
            .restore_with(session.id, now, Arc::clone(&session.info), active_since);
        state.queue.set_owner(&session.id, session.owner.clone());
    }
    if let Some(active) = state.queue.active() {
        let n = state.queue.len();
        log::info!(
            "restored {n} {} from the state file; session {active} is active",
            plural(n, "session", "sessions")
        );
    }
    let mut keep: Vec<PathBuf> = Vec::new();
    if let Some(start) = &saved.starting {
        if let Some(pgid) = start.pgid {
            kill_orphaned_up(config, pgid);
        }
        log::warn!(
            "the last run stopped during a netlab up for session {}: cleaning up {}",
            start.session,
            start.work_dir.display()
        );
        let t = Teardown::of_failed_start(&start.work_dir, None, [0; 32]);
        discard_dir(netlab, t, &mut state, &mut keep);
    }
    let mut lab_outcome = "none";
    if let Some(lab) = saved.lab {
        lab_outcome = "dropped";
        match netlab.check_running(&lab.work_dir) {
            Ok(()) => {
                log::info!(
                    "re-adopted the running lab {} (ref_count {})",
                    lab.topology.display(),
                    lab.ref_count
                );
                keep.push(lab.work_dir.clone());
                state.lab = Some(lab);
                state.lab_started_ms = saved
                    .lab_started_ms
                    .or_else(|| Some(crate::events::now_ms()));
                lab_outcome = "readopted";
            }
            Err(why) => {
                log::warn!(
                    "the lab {} of the last run is not running any more ({why}): forgetting it",
                    lab.topology.display()
                );
                discard_dir(netlab, Teardown::new(lab, true), &mut state, &mut keep);
            }
        }
    }
    for t in saved.teardowns {
        keep.push(t.work_dir().to_path_buf());
        state.teardowns.push(t);
    }
    if state.lab.is_none()
        && let Err(why) = lab_thread::clear_default(netlab, config)
    {
        log::warn!("{why}; a POST /lab gets 409 until it is gone");
    }
    remove_leftover_work_dirs(config, &keep);
    (state, lab_outcome)
}

/// Drops every record of the state file that names a directory outside `labs` (or a
/// topology outside its work dir): nothing is removed, nor is netlab run, anywhere else,
/// whoever wrote the file.
fn confine(mut saved: Snapshot, labs: &Path) -> Snapshot {
    let lab_ok = |lab: &LabRecord| {
        statedir::is_work_dir(labs, &lab.work_dir)
            && statedir::is_inside(&lab.work_dir, &lab.topology)
    };
    let refuse = |what: &str, path: &Path| {
        log::error!(
            "the state file names {what} {}, outside {}: ignoring it, touching nothing there",
            logging::escape(&path.to_string_lossy()),
            labs.display()
        );
    };
    if let Some(lab) = saved.lab.take() {
        if lab_ok(&lab) {
            saved.lab = Some(lab);
        } else {
            refuse("the lab", &lab.work_dir);
        }
    }
    if let Some(start) = saved.starting.take() {
        if statedir::is_work_dir(labs, &start.work_dir) {
            saved.starting = Some(start);
        } else {
            refuse("a start in", &start.work_dir);
        }
    }
    saved.teardowns.retain(|t| {
        // The remains of a failed start name their work dir as their topology.
        let ok = statedir::is_work_dir(labs, t.work_dir())
            && (t.lab.topology == t.lab.work_dir || lab_ok(&t.lab));
        if !ok {
            refuse("a teardown of", t.work_dir());
        }
        ok
    });
    saved
}

/// Kills what is left of the `netlab up` a crashed run started (process group `pgid`), if it
/// still is a netlab of ours: its group leader exists, leads that group, runs the
/// configured netlab program, in a work dir under our `labs/`. Then only the members of the
/// group whose working directory is under `labs/` are killed (never group 0, 1 or ours; see
/// [`crate::procgroup`]), and the function waits for them to be gone.
fn kill_orphaned_up(config: &Config, pgid: u32) {
    let Ok(labs) = std::fs::canonicalize(config.state_dir.join("labs")) else {
        return;
    };
    let cwd_in_labs = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&labs))
    };
    let runs_netlab = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| runs_up_of(&cmdline, &config.netlab))
    };
    let leader_ok =
        procgroup::process_group_of(pgid) == Some(pgid) && runs_netlab(pgid) && cwd_in_labs(pgid);
    if !leader_ok {
        log::info!("the netlab up of the last run (process group {pgid}) is gone");
        return;
    }
    match procgroup::signal_group_members(pgid, cwd_in_labs, rustix::process::Signal::KILL) {
        Ok(killed) => log::warn!(
            "killed {killed} processes left of the last run's netlab up (process group {pgid})"
        ),
        Err(e) => {
            log::error!("cannot kill the last run's netlab up (process group {pgid}): {e}");
            return;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while group_has_live_members(pgid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a command line (`/proc/PID/cmdline`) is an `up` of `program`: the program itself,
/// or the script an interpreter runs, after the interpreter's own flags (`python3 -s
/// /opt/netlab/bin/netlab up`).
fn runs_up_of(cmdline: &[u8], program: &Path) -> bool {
    let mut words = cmdline.split(|b| *b == 0);
    let named = words
        .by_ref()
        .take_while(|word| *word != b"up")
        .any(|word| {
            Path::new(std::ffi::OsStr::from_bytes(word)).file_name() == program.file_name()
        });
    named && cmdline.split(|b| *b == 0).any(|word| word == b"up")
}

/// Whether a process of group `pgid` is still running (zombies do not count).
fn group_has_live_members(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let group = fields.nth(2).and_then(|g| g.parse::<u32>().ok());
        group == Some(pgid) && !matches!(state, Some("Z" | "X" | "x"))
    })
}

/// `netlab down --cleanup --force` in a work dir that may hold a half-made lab; the directory
/// goes once netlab is done. When it fails, the directory is kept and the teardown stays
/// pending in `state`, for the lab thread to retry.
fn discard_dir(netlab: &Netlab, mut t: Teardown, state: &mut State, keep: &mut Vec<PathBuf>) {
    match netlab.tear_down(t.work_dir(), t.force) {
        Ok(()) => upload::remove_dir(t.work_dir()),
        Err(e) => {
            log::error!(
                "cleanup of {} failed; kept for another attempt: {}",
                t.work_dir().display(),
                crate::netlab::for_log(&e)
            );
            t.attempts = 1;
            t.error = Some(e.to_string());
            keep.push(t.work_dir().to_path_buf());
            state.teardowns.push(t);
        }
    }
}

/// `neops-remote-lab cleanup`: tears down whatever a stopped server left (its lab, pending
/// teardowns, a half-made start, netlab's `default` instance), removes the work dirs and the
/// state file. Refuses while a server holds the state dir.
///
/// Done only when netlab says so. Whatever netlab could not tear down is kept (its work
/// directory, and its record in `state.json` as a pending teardown, for the next server or
/// the next `cleanup` to retry), and the command exits 1 naming what is left and the
/// commands that finish the job by hand.
fn cleanup(config: Config) -> i32 {
    if let Err(e) = logging::init(config.log_level, config.log_file.as_deref()) {
        eprintln!("neops-remote-lab: {e}");
        return 1;
    }
    if let Err(e) = statedir::prepare(&config.state_dir) {
        return fail(e);
    }
    let _lock = match lockfile::acquire(&config.state_dir) {
        Ok(lock) => lock,
        Err(e @ lockfile::LockError::Held { .. }) => return fail(format!("{e}: stop it first")),
        Err(e) => return fail(e),
    };
    let netlab = Netlab::new(config.netlab.clone(), config.netlab_timeout, false);
    if let Err(e) = netlab.version(&config.state_dir) {
        return fail(format!("netlab is missing or broken: {e}"));
    }
    let saved = match persist::load(&config.state_dir) {
        Ok(saved) => saved.unwrap_or_default(),
        Err(message) => {
            log::warn!("{message}");
            Snapshot::default()
        }
    };
    let saved = confine(saved, &config.state_dir.join("labs"));
    // The running lab is torn down like the server would (one `down --cleanup`); pending
    // teardowns as they were queued; a half-made start with `--force`.
    let mut labs: Vec<Teardown> = Vec::new();
    labs.extend(saved.lab.map(|lab| Teardown::new(lab, false)));
    labs.extend(saved.teardowns);
    labs.extend(
        saved
            .starting
            .map(|s| Teardown::of_failed_start(&s.work_dir, None, [0; 32])),
    );
    let mut left: Vec<Teardown> = Vec::new();
    for mut t in labs {
        log::info!("tearing down {}", t.work_dir().display());
        match lab_thread::teardown(&netlab, &t) {
            Ok(()) => {}
            Err(e) => {
                log::error!(
                    "teardown of {} failed: {}",
                    t.work_dir().display(),
                    crate::netlab::for_log(&e)
                );
                t.attempts = t.attempts.saturating_add(1);
                t.error = Some(e);
                left.push(t);
            }
        }
    }
    // netlab's `default` instance, unless it is a lab that just failed: trying again would
    // only fail again, and report the same lab twice.
    let default_is_left = !left.is_empty()
        && netlab
            .default_instance_dir(&config.state_dir)
            .ok()
            .flatten()
            .is_some_and(|dir| left.iter().any(|t| t.work_dir() == dir));
    let default_error = if default_is_left {
        None
    } else {
        netlab
            .cleanup_default(&config.state_dir)
            .err()
            .map(|e| e.to_string())
    };
    if let Some(e) = &default_error {
        log::error!(
            "cannot clear netlab's 'default' instance: {}",
            crate::netlab::for_log(e)
        );
    }
    let keep: Vec<PathBuf> = left.iter().map(|t| t.work_dir().to_path_buf()).collect();
    remove_leftover_work_dirs(&config, &keep);
    if left.is_empty() && default_error.is_none() {
        if let Err(e) = persist::remove(&config.state_dir) {
            return fail(format!("cannot remove the state file: {e}"));
        }
        log::info!("cleanup done");
        return 0;
    }
    // What is left stays on record: the sessions are gone, the labs are pending teardowns.
    let snapshot = Snapshot {
        teardowns: left.clone(),
        ..Snapshot::default()
    };
    let mut text = Vec::new();
    let written = snapshot
        .write_json(&mut text)
        .map_err(std::io::Error::from)
        .and_then(|()| persist::write_atomic(&config.state_dir, &text));
    if let Err(e) = written {
        log::error!("cannot write the state file: {e}");
    }
    eprint!(
        "{}",
        unfinished_report(&config, &left, default_error.as_deref())
    );
    1
}

/// What `cleanup` could not finish, and the commands that finish it by hand.
fn unfinished_report(config: &Config, left: &[Teardown], default_error: Option<&str>) -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "~".into());
    let netlab = shell_quote(&config.netlab.to_string_lossy());
    let env = format!("HOME={}", shell_quote(&home));
    let mut out =
        String::from("\nneops-remote-lab cleanup: NOT DONE. netlab could not tear down:\n");
    for t in left {
        let dir = t.work_dir().display().to_string();
        out.push_str(&format!(
            "  * the lab in {dir} (kept, with its record in {}):\n      {}\n",
            config.state_dir.join(persist::STATE_FILE).display(),
            t.error.as_deref().unwrap_or("").replace('\n', "\n      ")
        ));
    }
    if let Some(e) = default_error {
        out.push_str(&format!(
            "  * netlab's 'default' instance:\n      {}\n",
            e.replace('\n', "\n      ")
        ));
    }
    out.push_str(
        "Fix the cause netlab names (is Docker running? is containerlab installed?) and run\n\
         this command again. Or finish by hand, as the service's user:\n",
    );
    out.push_str(&format!(
        "  1. netlab by hand (`--force` goes on where a plain `down` stops at an error):\n       {env} {netlab} status --all --format json\n"
    ));
    for t in left {
        let dir = shell_quote(&t.work_dir().to_string_lossy());
        out.push_str(&format!(
            "       cd {dir} && {env} {netlab} down --cleanup --force\n"
        ));
    }
    if default_error.is_some() {
        out.push_str(&format!(
            "       {env} {netlab} down --instance default --cleanup --force\n"
        ));
    }
    out.push_str("  2. if netlab cannot, the back end by hand, then drop netlab's registration:\n");
    for t in left {
        if t.work_dir().join("clab.yml").exists() {
            let dir = shell_quote(&t.work_dir().to_string_lossy());
            out.push_str(&format!(
                "       containerlab destroy -t {dir}/clab.yml --cleanup\n"
            ));
        }
    }
    out.push_str(&format!(
        "       yes | {env} {netlab} status --reset\n  3. then run this command again (or: rm -rf{} {}).\n",
        left.iter()
            .map(|t| format!(" {}", shell_quote(&t.work_dir().to_string_lossy())))
            .collect::<String>(),
        shell_quote(&config.state_dir.join(persist::STATE_FILE).to_string_lossy())
    ));
    out
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@,".contains(&b));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Work directories nobody refers to: their labs are gone (netlab's `default` was dealt
/// with just before), so the directories are only litter.
fn remove_leftover_work_dirs(config: &Config, keep: &[PathBuf]) {
    let labs = config.state_dir.join("labs");
    let Ok(entries) = std::fs::read_dir(&labs) else {
        return;
    };
    for entry in entries.flatten() {
        if keep.contains(&entry.path()) {
            continue;
        }
        log::info!("removing leftover work dir {}", entry.path().display());
        if entry.path().is_dir() {
            upload::remove_dir(&entry.path());
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_up_is_recognised_behind_an_interpreter_and_its_flags() {
        let netlab = Path::new("/opt/netlab/bin/netlab");
        let up = |words: &[&str]| runs_up_of(words.join("\0").as_bytes(), netlab);
        assert!(up(&["/opt/netlab/bin/netlab", "up", "t.yml"]));
        assert!(up(&[
            "/usr/bin/python3",
            "/opt/netlab/bin/netlab",
            "up",
            "t.yml"
        ]));
        assert!(up(&[
            "python3",
            "-s",
            "-E",
            "/opt/netlab/bin/netlab",
            "up",
            "t.yml"
        ]));
        assert!(!up(&[
            "python3",
            "/opt/netlab/bin/netlab",
            "down",
            "--cleanup"
        ]));
        assert!(!up(&["python3", "/usr/bin/other", "up", "netlab"]));
        assert!(!up(&["sleep", "3600"]));
    }
}
