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
//!
//! Why one file of this size: start-up (a step a function), restore, cleanup and reload each
//! read the state file and drive netlab at the top of the program; they share its helpers.

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

use crate::api::lab_thread;
use crate::api::routes;
use crate::config::{self, Command, Config};
use crate::core::auth::Access;
use crate::core::clock::{Clock, MonotonicClock};
use crate::core::queue::SessionId;
use crate::core::state::{LabJob, Shared, State, plural};
use crate::core::timer;
use crate::http::listener;
use crate::http::pool;
use crate::http::reply;
use crate::lab::netlab::Netlab;
use crate::lab::procgroup;
use crate::lab::record::{self, LabRecord, Teardown};
use crate::lab::upload;
use crate::logging;
use crate::notify;
use crate::store::drain;
use crate::store::lockfile;
use crate::store::persist::{self, Snapshot, Starting};
use crate::store::statedir;

/// How long a deliberate exit waits for the event writer (a hung disk must not keep a
/// process that has to go).
const EXIT_FLUSH_LIMIT: Duration = Duration::from_secs(2);

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
        Ok(Command::Drain { config, wait }) => crate::ctl::drain(&config, wait),
        Ok(Command::Resume(config)) => crate::ctl::resume(&config),
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
    match start(config) {
        Ok(ready) => ready.serve_until_stopped(),
        Err(StartError(why)) => fail(why),
    }
}

/// Why the server could not start: logged, and the process exits 1 (nothing of netlab's
/// has been touched unless the message says so).
struct StartError(String);

impl StartError {
    fn of(what: impl std::fmt::Display) -> Self {
        StartError(what.to_string())
    }
}

/// A server that has done every check and restored its state, with its listening socket
/// bound, ready to start its threads.
struct Ready {
    config: Config,
    shared: Arc<Shared>,
    server: Arc<Server>,
    bound: SocketAddr,
    netlab: Netlab,
    lab_rx: Vec<Receiver<LabJob>>,
    signals: Signals,
    nofile: Option<u64>,
    /// Held until the process ends: one server per state dir.
    _lock: lockfile::StateDirLock,
}

/// The start-up steps, in order; the first that fails ends the start.
fn start(config: Config) -> Result<Ready, StartError> {
    if let Some(path) = &config.log_config {
        log::warn!(
            "--log-config {} is ignored: use --log-level, --log-file or --debug",
            path.display()
        );
    }
    let access = load_access(&config)?;
    statedir::prepare(&config.state_dir).map_err(StartError::of)?;
    let lock = lockfile::acquire(&config.state_dir).map_err(StartError::of)?;
    let nofile = listener::raise_nofile_limit();
    crate::core::longpoll::set_cap(crate::core::longpoll::cap_for(nofile));
    // Bound before netlab is touched: a second server started by mistake on a port in use
    // must fail without tearing down anything.
    let cannot_listen = |e: &dyn std::fmt::Display| {
        StartError(format!(
            "cannot listen on {}:{}: {e}",
            config.host, config.port
        ))
    };
    let socket = listener::bind(&config.host, config.port, listener::socket_timeout(&config))
        .map_err(|e| cannot_listen(&e))?;
    let netlab = check_netlab(&config)?;
    check_health_topology(&config)?;
    let draining = load_drain(&config)?;
    let clock = Arc::new(MonotonicClock::new());
    let (state, lab_outcome) = restore(&config, &netlab, clock.now());

    let server = Arc::new(Server::from_listener(socket, None).map_err(|e| cannot_listen(&e))?);
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| StartError::of("the listener has no IP address"))?;
    let (lab_tx, lab_rx): (Vec<_>, Vec<_>) = config.instances().iter().map(|_| unbounded()).unzip();
    let pending: Vec<Teardown> = state.teardowns.clone();
    let mut shared = Shared::with_state(config.clone(), clock, lab_tx, Some(state));
    shared.access = access;
    let shared = Arc::new(shared);
    if let Some(drain) = draining {
        let _ = shared.host.set_drain(Some(drain), |_| Ok::<(), ()>(()));
    }
    record_deliberate_exits(&shared);
    begin(&shared, lab_outcome, pending);
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| StartError(format!("cannot handle signals: {e}")))?;
    Ok(Ready {
        config,
        shared,
        server,
        bound,
        netlab,
        lab_rx,
        signals,
        nofile,
        _lock: lock,
    })
}

/// The access tokens of `--token-file`, if any (said in the log either way).
fn load_access(config: &Config) -> Result<Option<Access>, StartError> {
    let Some(path) = &config.token_file else {
        log::warn!(
            "no --token-file: anyone who can reach the port can use the lab \
             (and a topology runs commands on this host)"
        );
        if config.public_read {
            log::warn!("--public-read has no effect without --token-file");
        }
        return Ok(None);
    };
    let access = Access::load(path, config.public_read).map_err(StartError::of)?;
    log::info!(
        "access tokens from {}: every route but /healthz needs one{}",
        path.display(),
        if config.public_read {
            " (--public-read: the read-only views do not)"
        } else {
            ""
        }
    );
    Ok(Some(access))
}

/// `netlab version` must answer before anything else of netlab's runs.
fn check_netlab(config: &Config) -> Result<Netlab, StartError> {
    let netlab = Netlab::new(
        config.netlab.clone(),
        config.netlab_timeout,
        config.stream_netlab_output,
    )
    .with_containerlab(config.containerlab.clone());
    match netlab.version(&config.state_dir) {
        Ok(version) => {
            log::info!("using {version} ({})", config.netlab.display());
            Ok(netlab)
        }
        Err(e) => Err(StartError(format!(
            "netlab is missing or broken: {e}\n\
             Install it (for example `python3 -m venv /opt/netlab && /opt/netlab/bin/pip install networklab`) \
             and point --netlab (or NEOPS_REMOTE_LAB_NETLAB) at the `netlab` command."
        ))),
    }
}

fn check_health_topology(config: &Config) -> Result<(), StartError> {
    let Some(topology) = &config.health_topology else {
        return Ok(());
    };
    match std::fs::metadata(topology) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(StartError(format!(
            "--health-topology {}: not a file",
            topology.display()
        ))),
        Err(e) => Err(StartError(format!(
            "--health-topology {}: {e}",
            topology.display()
        ))),
    }
}

/// A drain the last run left in force (it survives restarts).
fn load_drain(config: &Config) -> Result<Option<drain::Drain>, StartError> {
    let drain = drain::load(&config.state_dir).map_err(|e| {
        StartError(format!(
            "cannot read {}: {e}",
            config.state_dir.join(drain::DRAIN_FILE).display()
        ))
    })?;
    if let Some(drain) = &drain {
        log::warn!(
            "draining (since the last run{}): no new sessions until `neops-remote-lab resume` \
             or POST /admin/resume",
            drain
                .by
                .as_deref()
                .map(|by| format!(", by {by}"))
                .unwrap_or_default()
        );
    }
    Ok(drain)
}

/// A deliberate exit (status 75, from any thread) is an event too, and takes what the event
/// writer has queued with it to the file rather than dropping it.
fn record_deliberate_exits(shared: &Arc<Shared>) {
    let events = Arc::downgrade(shared);
    listener::before_restart(move |why, status| {
        if let Some(shared) = events.upgrade() {
            shared.events.emit(
                "server_stopping",
                serde_json::json!({ "exit_status": status, "reason": why }),
            );
            if !shared.events.flush(EXIT_FLUSH_LIMIT) {
                log::warn!(
                    "the event file took more than {} s; the last events may be missing from it",
                    EXIT_FLUSH_LIMIT.as_secs()
                );
            }
        }
    });
}

/// The restored state becomes the new truth: written before anyone can see it (if that
/// fails, the server starts degraded and refuses changes until a write succeeds), the start
/// recorded, the teardowns the last run left pending sent to the lab workers, and the
/// sessions of names revoked meanwhile ended.
fn begin(shared: &Shared, lab_outcome: &str, pending: Vec<Teardown>) {
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
            "draining": shared.host.draining().is_some(),
        }),
    );
    for t in pending {
        log::info!(
            "carrying out the teardown of {} left pending by the last run",
            t.lab.topology.display()
        );
        shared.send_lab_job(LabJob::Teardown(t));
    }
    end_revoked_sessions(shared, "start");
}

/// The threads of a running server, joined in this order at shutdown.
struct Threads {
    watch: (crossbeam_channel::Sender<()>, thread::JoinHandle<()>),
    rescuer: thread::JoinHandle<()>,
    workers: Vec<thread::JoinHandle<()>>,
    timer: (crossbeam_channel::Sender<()>, thread::JoinHandle<()>),
    lab_workers: Vec<thread::JoinHandle<()>>,
}

impl Ready {
    /// Starts the threads, says it listens, serves until a signal (or the accept loop's
    /// end), and shuts down in order; the exit status.
    fn serve_until_stopped(self) -> i32 {
        let Ready {
            config,
            shared,
            server,
            bound,
            netlab,
            lab_rx,
            signals,
            nofile,
            _lock,
        } = self;
        spawn_signal_thread(&shared, &server, signals);
        let lab_workers = spawn_lab_workers(&shared, &netlab, lab_rx);
        let timer = spawn(&shared, "timer", move |shared, stop| {
            timer::run(shared, stop, timer::probe_address(bound));
        });
        let (work_tx, work_rx) = pool::work_channel();
        routes::register_metrics();
        let handler: Arc<pool::Handler> = {
            let shared = Arc::clone(&shared);
            Arc::new(move |responder| routes::handle(&shared, responder))
        };
        reply::set_body_ceiling(config.max_upload_bytes);
        let workers = pool::start_workers(config.workers, &work_rx, &handler);
        drop((handler, work_rx));
        let every = listener::watch_interval(listener::socket_timeout(&config));
        let watch = spawn(&shared, "watch", move |shared, stop| {
            watch_listener(shared, timer::probe_address(bound), every, &stop);
        });
        let arrivals = listener::Arrivals::new();
        let rescuer = {
            let shared = Arc::clone(&shared);
            let arrivals = arrivals.clone();
            let probe = timer::probe_address(bound);
            thread::Builder::new()
                .name("rescue".into())
                .spawn(move || {
                    let dispatched = &pool::DISPATCHED;
                    listener::rescue(&arrivals, probe, shared.shutdown_flag(), dispatched);
                })
                .expect("cannot start the rescue thread")
        };
        say_ready(&config, bound, nofile);
        let listener = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("listener".into())
                .spawn(move || pool::listen(&server, shared.shutdown_flag(), &work_tx, &arrivals))
                .expect("cannot start the listener thread")
        };
        let listened = listener
            .join()
            .unwrap_or_else(|_| Err(pool::ListenerFailed("its thread panicked".into())));
        if let Err(e) = &listened
            && !shared.is_shutting_down()
        {
            // tiny_http's accept loop is gone: no orderly stop (it would tear the lab down).
            listener::restart_now(&e.to_string());
        }
        shut_down(
            &shared,
            Threads {
                watch,
                rescuer,
                workers,
                timer,
                lab_workers,
            },
        );
        match listened {
            Ok(()) => {
                log::info!(
                    "stopped (the longest a worker spent on one request: {:.1} ms; requests \
                     made to serve connections tiny_http left waiting: {})",
                    pool::LONGEST_SERVE_US.load(std::sync::atomic::Ordering::Relaxed) as f64
                        / 1000.0,
                    listener::RESCUE_KICKS.load(std::sync::atomic::Ordering::Relaxed)
                );
                0
            }
            Err(e) => fail(e),
        }
    }
}

/// A thread named `name` running `body` until its stop channel says so (or is dropped).
fn spawn(
    shared: &Arc<Shared>,
    name: &str,
    body: impl FnOnce(&Shared, Receiver<()>) + Send + 'static,
) -> (crossbeam_channel::Sender<()>, thread::JoinHandle<()>) {
    let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let shared = Arc::clone(shared);
    let handle = thread::Builder::new()
        .name(name.into())
        .spawn(move || body(&shared, stop_rx))
        .unwrap_or_else(|e| panic!("cannot start the {name} thread: {e}"));
    (stop, handle)
}

/// SIGTERM and SIGINT stop the server (once), SIGHUP re-reads the tokens.
fn spawn_signal_thread(shared: &Arc<Shared>, server: &Arc<Server>, mut signals: Signals) {
    let shared = Arc::clone(shared);
    // Weak: once the listener is done, the server is dropped and its socket closed.
    let server = Arc::downgrade(server);
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

/// One lab worker per slot, each with its slot's live log.
fn spawn_lab_workers(
    shared: &Arc<Shared>,
    netlab: &Netlab,
    lab_rx: Vec<Receiver<LabJob>>,
) -> Vec<thread::JoinHandle<()>> {
    let single = lab_rx.len() == 1;
    lab_rx
        .into_iter()
        .enumerate()
        .map(|(slot, rx)| {
            let shared = Arc::clone(shared);
            let netlab = netlab
                .clone()
                .with_live_log(Arc::clone(shared.lab_log(slot)));
            let name = if single {
                "lab".to_owned()
            } else {
                format!("lab-{}", slot + 1)
            };
            thread::Builder::new()
                .name(name)
                .spawn(move || lab_thread::run(&shared, &netlab, rx, slot))
                .expect("cannot start a lab worker")
        })
        .collect()
}

/// The start-up contract (tests and scripts wait for the exact line on stderr), the same in
/// the log's own format, and systemd's READY.
fn say_ready(config: &Config, bound: SocketAddr, nofile: Option<u64>) {
    eprintln!("listening on http://{bound}");
    log::info!("listening on http://{bound}");
    log::info!(
        "serving with {} {}; state dir {}; client timeout {:.1} s; open files limit {} \
         (long-polls parked at most {})",
        config.workers,
        plural(config.workers, "worker", "workers"),
        config.state_dir.display(),
        config.client_timeout.as_secs_f64(),
        nofile.map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
        crate::core::longpoll::cap(),
    );
    notify::notify("READY=1");
}

/// The order matters: the listener is done; then the watch and rescue threads, the workers
/// (each finishes its request), the long-polls (answered now), the timer, and last the lab
/// workers (each finishes its job and tears its lab down unless `--on-exit keep`).
fn shut_down(shared: &Shared, threads: Threads) {
    let _ = threads.watch.0.send(());
    let _ = threads.watch.1.join();
    let _ = threads.rescuer.join();
    if shared.begin_shutdown() {
        notify::notify("STOPPING=1");
    }
    shared.events.emit("server_stopping", serde_json::json!({}));
    for worker in threads.workers {
        let _ = worker.join();
    }
    shared.expire_parked(true);
    let _ = threads.timer.0.send(());
    let _ = threads.timer.1.join();
    shared.send_lab_job(LabJob::Shutdown);
    for lab_worker in threads.lab_workers {
        let _ = lab_worker.join();
    }
    shared.events.close();
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
    match crate::lab::procgroup::signal_process(pid, is_server, rustix::process::Signal::HUP) {
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
        Err(e) => {
            log::error!("SIGHUP: {e}; the tokens in force stay");
            return;
        }
    }
    end_revoked_sessions(shared, "SIGHUP");
}

/// Ends the sessions of names no longer in the token file. Such a name can no longer use
/// its sessions, nor end them: they end now instead of holding their place (or the lab)
/// until they are reaped. `when` starts the log line.
fn end_revoked_sessions(shared: &Shared, when: &str) {
    let Some(access) = &shared.access else {
        return;
    };
    match shared.end_revoked(|name| access.knows(name)) {
        Ok(ended) if ended.is_empty() => {}
        Ok(ended) => log::warn!(
            "{when}: ended {} {} of revoked tokens",
            ended.len(),
            plural(ended.len(), "session", "sessions")
        ),
        Err(e) => log::error!("{when}: ending the sessions of revoked tokens: {e}"),
    }
}

/// The watch on tiny_http's listener (see [`crate::http::listener`]): connects several times per
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
    let instances = config.instances();
    let mut state = State::with_slots(config.max_sessions, &instances);
    let saved = match persist::load(&config.state_dir) {
        Ok(saved) => saved.unwrap_or_default(),
        Err(message) => {
            log::warn!("{message}");
            Snapshot::default()
        }
    };
    let saved = confine(saved, &config.state_dir.join("labs"));
    restore_sessions(&mut state, &saved, now);
    state.event_id_floor = saved.event_id;
    let mut keep: Vec<PathBuf> = Vec::new();
    let (labs, starts) = saved_slots(&saved);
    for start in starts {
        if let Some(pgid) = start.pgid {
            kill_orphaned_up(config, pgid);
        }
        log::warn!(
            "the last run stopped during a netlab up for session {}: cleaning up {}",
            start.session,
            start.work_dir.display()
        );
        let t = Teardown::of_failed_start(&start.work_dir, None, [0; 32], start.instance);
        discard_dir(netlab, t, &mut state, &mut keep);
    }
    let mut outcome = (0, 0);
    for saved_lab in labs {
        outcome.1 += 1;
        if readopt(netlab, &instances, &mut state, &mut keep, saved_lab) {
            outcome.0 += 1;
        }
    }
    for t in saved.teardowns {
        keep.push(t.work_dir().to_path_buf());
        state.teardowns.push(t);
    }
    clear_free_instances(config, netlab, &state);
    remove_leftover_work_dirs(config, &keep);
    let lab_outcome = match outcome {
        (0, 0) => "none",
        (0, _) => "dropped",
        _ => "readopted",
    };
    (state, lab_outcome)
}

/// Puts a lab the state file records back into the slot of its netlab instance, when netlab
/// says it still runs and its holder (if it had one) is still there; otherwise it is torn
/// down. Whether it was re-adopted.
fn readopt(
    netlab: &Netlab,
    instances: &[Option<u16>],
    state: &mut State,
    keep: &mut Vec<PathBuf>,
    (lab, holder, started_ms, last_used_ms): SavedLab,
) -> bool {
    let slot = instances.iter().position(|i| *i == lab.instance);
    let free = slot.filter(|&i| state.slots[i].lab.is_none());
    let Some(slot) = free else {
        log::warn!(
            "the lab {} of the last run is in netlab instance {}, which no slot of this run \
             has: tearing it down",
            lab.topology.display(),
            record::instance_name(lab.instance)
        );
        keep.push(lab.work_dir.clone());
        state.teardowns.push(Teardown::new(lab, false));
        return false;
    };
    match netlab.check_running(&lab.work_dir, lab.instance) {
        Ok(()) => {
            // Its holder, if that session is still ACTIVE; with one slot the ACTIVE
            // session's, as it always was.
            let holder = holder
                .filter(|h| state.queue.is_active(h))
                .or_else(|| state.queue.active().filter(|_| instances.len() == 1));
            if holder.is_none() && lab.ref_count > 0 && instances.len() > 1 {
                log::warn!(
                    "the lab {} of slot {} is held by a session that is gone: tearing it down",
                    lab.topology.display(),
                    slot + 1
                );
                keep.push(lab.work_dir.clone());
                state.teardowns.push(Teardown::new(lab, false));
                return false;
            }
            log::info!(
                "re-adopted the running lab {} (ref_count {}){}",
                lab.topology.display(),
                lab.ref_count,
                if instances.len() > 1 {
                    format!(" in slot {}", slot + 1)
                } else {
                    String::new()
                }
            );
            keep.push(lab.work_dir.clone());
            let s = &mut state.slots[slot];
            s.lab = Some(lab);
            s.holder = holder;
            s.last_used_ms = last_used_ms;
            s.lab_started_ms = started_ms.or_else(|| Some(crate::observe::events::now_ms()));
            true
        }
        Err(why) => {
            log::warn!(
                "the lab {} of the last run is not running any more ({why}): forgetting it",
                lab.topology.display()
            );
            discard_dir(netlab, Teardown::new(lab, true), state, keep);
            false
        }
    }
}

/// The sessions the state file records, in its order, with what it kept of each; slots
/// their ACTIVE sessions left free (more slots now, or an older file) go to the next in
/// line.
fn restore_sessions(state: &mut State, saved: &Snapshot, now: std::time::Duration) {
    for session in &saved.sessions {
        // An ACTIVE session before the restart; if the file does not say since when, it
        // is since now.
        let active_since = session
            .active_since_ms
            .or_else(|| session.active.then(crate::observe::events::now_ms));
        state.queue.restore_with(
            session.id,
            now,
            Arc::clone(&session.info),
            active_since,
            session.active,
        );
        state.queue.set_owner(&session.id, session.owner.clone());
        state
            .queue
            .set_schedule(&session.id, session.skips, session.ahead);
    }
    for id in state.queue.fill() {
        state
            .queue
            .set_active_since(&id, crate::observe::events::now_ms());
    }
    if let Some(active) = state.queue.active() {
        let n = state.queue.len();
        log::info!(
            "restored {n} {} from the state file; session {active} is active",
            plural(n, "session", "sessions")
        );
    }
}

/// A lab the state file records: the lab, its holder, when it came up, when last used.
type SavedLab = (LabRecord, Option<SessionId>, Option<u64>, u64);

/// Every slot's lab and start, as the state file records them.
fn saved_slots(saved: &Snapshot) -> (Vec<SavedLab>, Vec<Starting>) {
    let mut labs: Vec<SavedLab> = Vec::new();
    let mut starts: Vec<Starting> = Vec::new();
    labs.extend(
        saved
            .lab
            .clone()
            .map(|lab| (lab, saved.holder, saved.lab_started_ms, saved.last_used_ms)),
    );
    starts.extend(saved.starting.clone());
    for slot in &saved.slots {
        labs.extend(
            slot.lab
                .clone()
                .map(|lab| (lab, slot.holder, slot.lab_started_ms, slot.last_used_ms)),
        );
        starts.extend(slot.starting.clone());
    }
    (labs, starts)
}

/// netlab instances of this server's slots that run no lab of ours now: what netlab still
/// registers there is cleared if it is ours (in `labs/`), or anyone's with
/// `--cleanup-foreign`. With several slots, a numbered instance no slot has is left alone
/// unless it is in our `labs/` or `--cleanup-foreign` says otherwise.
fn clear_free_instances(config: &Config, netlab: &Netlab, state: &State) {
    let free: Vec<Option<u16>> = state
        .slots
        .iter()
        .filter(|s| s.lab.is_none())
        .map(|s| s.instance)
        .collect();
    if state.slots.len() == 1 {
        for instance in free {
            if let Err(why) = lab_thread::clear_instance(netlab, config, instance) {
                log::warn!("{why}; a POST /lab gets 409 until it is gone");
            }
        }
        return;
    }
    let registered = match netlab.instances(&config.state_dir) {
        Ok(registered) => registered,
        Err(e) => {
            log::warn!("cannot tell which netlab instances run: {e}");
            return;
        }
    };
    let labs = config.state_dir.join("labs");
    let ours = |dir: &Path| statedir::is_work_dir(&labs, dir);
    for (name, dir) in registered {
        let instance = name.parse::<u16>().ok();
        let slot = state.slots.iter().find(|s| s.instance == instance);
        let adopted = slot.is_some_and(|s| s.lab.is_some());
        if adopted || name == "default" {
            continue;
        }
        if slot.is_some() || ours(&dir) || config.cleanup_foreign {
            if let Err(why) = lab_thread::clear_instance(netlab, config, instance) {
                log::warn!("{why}; a POST /lab in its slot gets 409 until it is gone");
            }
        } else {
            log::info!(
                "netlab instance {name} runs in {}, outside this server's slots: left alone",
                logging::escape(&dir.to_string_lossy())
            );
        }
    }
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
    // Each slot's lab and start in progress (the first slot's at the top of the file).
    let confine_slot = |lab: &mut Option<LabRecord>, starting: &mut Option<Starting>| {
        if let Some(l) = lab.take_if(|l| !lab_ok(l)) {
            refuse("the lab", &l.work_dir);
        }
        if let Some(s) = starting.take_if(|s| !statedir::is_work_dir(labs, &s.work_dir)) {
            refuse("a start in", &s.work_dir);
        }
    };
    confine_slot(&mut saved.lab, &mut saved.starting);
    for slot in &mut saved.slots {
        confine_slot(&mut slot.lab, &mut slot.starting);
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
/// [`crate::lab::procgroup`]), and the function waits for them to be gone.
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
    match netlab.tear_down(t.work_dir(), t.force, t.lab.instance) {
        Ok(()) => upload::remove_dir(t.work_dir()),
        Err(e) => {
            log::error!(
                "cleanup of {} failed; kept for another attempt: {}",
                t.work_dir().display(),
                crate::lab::netlab::for_log(&e)
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
    let netlab = Netlab::new(config.netlab.clone(), config.netlab_timeout, false)
        .with_containerlab(config.containerlab.clone());
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
    let (running, starts) = saved_slots(&saved);
    let mut labs: Vec<Teardown> = Vec::new();
    labs.extend(
        running
            .into_iter()
            .map(|(lab, ..)| Teardown::new(lab, false)),
    );
    labs.extend(saved.teardowns);
    labs.extend(
        starts
            .into_iter()
            .map(|s| Teardown::of_failed_start(&s.work_dir, None, [0; 32], s.instance)),
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
                    crate::lab::netlab::for_log(&e)
                );
                t.attempts = t.attempts.saturating_add(1);
                t.error = Some(e);
                left.push(t);
            }
        }
    }
    let instance_errors = clear_instances_after_cleanup(&config, &netlab, &left);
    let keep: Vec<PathBuf> = left.iter().map(|t| t.work_dir().to_path_buf()).collect();
    remove_leftover_work_dirs(&config, &keep);
    if left.is_empty() && instance_errors.is_empty() {
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
    eprint!("{}", unfinished_report(&config, &left, &instance_errors));
    1
}

/// `cleanup`'s last pass over netlab's registry: netlab's `default` instance and every
/// slot's, unless it is a lab that just failed (trying again would only fail again, and
/// report the same lab twice). Each instance netlab could not clear, with its words.
fn clear_instances_after_cleanup(
    config: &Config,
    netlab: &Netlab,
    left: &[Teardown],
) -> Vec<(String, String)> {
    let mut instances: Vec<Option<u16>> = vec![None];
    instances.extend(config.instances().into_iter().flatten().map(Some));
    let mut instance_errors: Vec<(String, String)> = Vec::new();
    for instance in instances {
        let is_left = !left.is_empty()
            && netlab
                .instance_dir(&config.state_dir, instance)
                .ok()
                .flatten()
                .is_some_and(|dir| left.iter().any(|t| t.work_dir() == dir));
        if is_left {
            continue;
        }
        if let Err(e) = netlab.cleanup_instance(&config.state_dir, instance) {
            let name = record::instance_name(instance);
            log::error!(
                "cannot clear netlab's '{name}' instance: {}",
                crate::lab::netlab::for_log(&e)
            );
            instance_errors.push((name, e.to_string()));
        }
    }
    instance_errors
}

/// What `cleanup` could not finish (labs, and netlab instances with netlab's words), and the
/// commands that finish it by hand.
fn unfinished_report(
    config: &Config,
    left: &[Teardown],
    instance_errors: &[(String, String)],
) -> String {
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
    for (name, e) in instance_errors {
        out.push_str(&format!(
            "  * netlab's '{name}' instance:\n      {}\n",
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
    for (name, _) in instance_errors {
        out.push_str(&format!(
            "       {env} {netlab} down --instance {name} --cleanup --force\n"
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
