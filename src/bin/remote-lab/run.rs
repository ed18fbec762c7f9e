//! `remote-lab run`: join the queue on the best `--choices` hosts, keep the first session
//! that becomes active and end the others, start the lab, run COMMAND, end the session.
//!
//! Threads: one per open session for its heartbeats and one for its long-poll while it
//! waits, one for signals, one for the upload and one following netlab's output while the
//! lab starts, one waiting for COMMAND. They report to the main thread on one channel of
//! [`Event`]s; the main thread decides everything, with `select!` and timers, and ends
//! every session it opened however the run ends.
//!
//! Why one file of this size: `run` is one command in sections (choosing hosts, waiting,
//! heartbeats, ending, the lab, the command, names), each a few functions long.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, after, never, select, tick, unbounded};
use neops_remote_lab::protocol::{Device, QueueView};
use rustix::process::Signal;
use sha2::{Digest, Sha256};

use crate::api::{Failure, Host, Multipart};
use crate::flags::RunArgs;
use crate::netrc::Netrc;
use crate::term::{self, Progress};
use crate::{
    EX_DATAERR, EX_NOPERM, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, child, say,
};

/// The server's timeouts, for servers that do not say theirs.
const DEFAULT_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_WAITING_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest long-poll asked for.
const LONG_POLL: f64 = 25.0;
/// Polling interval against a server that ignores `wait`, and between tries of a busy lab.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// A poll answered faster than this, with nothing new, shows a server that ignores `wait`.
const QUICK_ANSWER: Duration = Duration::from_millis(500);
/// Heartbeats: a third of the shorter timeout, within these bounds.
const BEAT_MIN: Duration = Duration::from_millis(50);
const BEAT_MAX: Duration = Duration::from_secs(30);
/// Retries after a failed poll: capped exponential backoff, with jitter.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Time COMMAND gets between SIGTERM (session lost) and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// Between two reads of netlab's output while the lab starts.
const LOG_EVERY: Duration = Duration::from_millis(500);

/// What the main thread hears.
enum Event {
    /// A signal to remote-lab; `forward` is false when the kernel sent it to the whole
    /// foreground group (a terminal's Ctrl-C), so COMMAND has it already.
    Signal(i32, bool),
    /// Session `seat` is active.
    Active(usize),
    /// Session `seat` waits at a position; who holds that host's lab.
    Waiting(usize, usize, Option<String>),
    /// Session `seat` cannot be kept: the server no longer knows it, or heartbeats failed
    /// for longer than the server's active timeout.
    Lost(usize, String),
}

/// One session opened on one host.
struct Seat {
    host: Arc<Host>,
    id: String,
    /// Dropped to stop its threads (each at the end of the call it is making).
    stop: Option<Sender<()>>,
}

#[derive(Clone, Copy)]
struct Timeouts {
    active: Duration,
    waiting: Duration,
}

impl Seat {
    fn short(&self) -> &str {
        short(&self.id)
    }

    /// Stops its heartbeats and its poll.
    fn stop(&mut self) {
        self.stop = None;
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// How a run ends before COMMAND: the exit status, and whether the session is known gone.
struct Abort {
    code: i32,
    gone: bool,
}

fn abort(code: i32) -> Abort {
    Abort { code, gone: false }
}

pub fn run(args: RunArgs) -> i32 {
    let (events_tx, events) = unbounded::<Event>();
    if let Err(e) = signal_thread(events_tx.clone()) {
        say(e);
        return EX_SOFTWARE;
    }
    // The files are read before anything else: a typo costs no session.
    let upload = match &args.topology {
        Some(topology) => match form(topology, &args.extra_files, args.reuse) {
            Ok(form) => Some(form),
            Err(e) => {
                say(e);
                return EX_USAGE;
            }
        },
        None => None,
    };
    let netrc = Netrc::load();
    let hosts: Vec<Arc<Host>> = args
        .common
        .urls
        .iter()
        .map(|u| Arc::new(Host::new(u, args.common.token.as_deref(), &netrc)))
        .collect();
    let name = clean_name(&args.name.clone().unwrap_or_else(default_name));
    let sha = upload.as_ref().map(|u| hex(&Sha256::digest(&u.topology)));

    let mut seats = match open_seats(&hosts, args.choices, &name, sha.as_deref(), &events_tx) {
        Ok(seats) => seats,
        Err(code) => return code,
    };
    let deadline = Instant::now() + args.wait_timeout;
    let kept = match wait_turn(&mut seats, deadline, &events) {
        Ok(kept) => kept,
        Err(end) => {
            end_seats(&mut seats, end.gone);
            return end.code;
        }
    };
    // The others go at once, so that their hosts promote their next waiters; the run
    // goes on meanwhile, and waits for them before it exits.
    let ending = end_seats_behind(&mut seats, kept);
    let seat = seats.swap_remove(kept);
    let code = with_session(seat, kept, upload, &args, deadline, &events);
    for handle in ending {
        let _ = handle.join();
    }
    code
}

/// The rest of the run, on the session kept.
fn with_session(
    mut seat: Seat,
    kept: usize,
    upload: Option<Upload>,
    args: &RunArgs,
    deadline: Instant,
    events: &Receiver<Event>,
) -> i32 {
    let lab = match start_lab(&seat, kept, upload, args, deadline, events) {
        Ok(lab) => lab,
        Err(end) => {
            if !end.gone {
                end_session(&seat, false);
            }
            seat.stop();
            return end.code;
        }
    };
    let (code, lost) = run_command(&seat, kept, args, lab.as_ref(), events);
    let release = lab.is_some();
    drop(lab); // a temporary devices file goes
    // The heartbeats go on until the session has ended: a slow release must not let the
    // server reap it first.
    if lost {
        // The server may still know it (heartbeats failed, the session was not reaped yet).
        let _ = seat.host.release(&seat.id);
        let _ = seat.host.end(&seat.id);
        seat.stop();
        return EX_TEMPFAIL;
    }
    end_session(&seat, release);
    seat.stop();
    code
}

// ------------------------------------------------------------------------------ choosing

/// What a host says before a session is opened there.
enum Probe {
    /// Takes work: sessions ahead, its timeouts.
    Ready(usize, Timeouts),
    /// Answered, but takes no new work (draining, unhealthy): why.
    Skip(String),
    /// Refused the credentials (401, 403).
    Rejected(Failure),
    Unreachable(Failure),
}

fn seconds(value: f64, default: Duration) -> Duration {
    if value.is_finite() && value > 0.0 && value < 1e9 {
        Duration::from_secs_f64(value)
    } else {
        default
    }
}

fn probe(host: &Host) -> Probe {
    match host.queue(Some(1)) {
        Ok(view) => match view.host_state {
            Some(state @ (HostState::Draining | HostState::Unhealthy)) => Probe::Skip(state_text(
                state.as_str(),
                view.host_state_reason.as_deref(),
            )),
            _ => Probe::Ready(
                view.total,
                Timeouts {
                    active: seconds(view.active_timeout, DEFAULT_ACTIVE_TIMEOUT),
                    waiting: seconds(view.waiting_timeout, DEFAULT_WAITING_TIMEOUT),
                },
            ),
        },
        Err(f) if f.rejected() => Probe::Rejected(f),
        Err(f @ Failure::Net(_)) => Probe::Unreachable(f),
        // No queue view (an older or a Python server): its health.
        Err(_) => match host.health() {
            Ok(health) => Probe::Ready(
                health.queue_length,
                Timeouts {
                    active: seconds(health.active_timeout, DEFAULT_ACTIVE_TIMEOUT),
                    waiting: seconds(health.waiting_timeout, DEFAULT_WAITING_TIMEOUT),
                },
            ),
            Err(f) if f.rejected() => Probe::Rejected(f),
            Err(f) => Probe::Unreachable(f),
        },
    }
}

use neops_remote_lab::protocol::HostState;

pub fn state_text(state: &str, reason: Option<&str>) -> String {
    match reason {
        Some(reason) if !reason.is_empty() => {
            format!("{state}: {}", term::clean_short(reason, false))
        }
        _ => state.to_owned(),
    }
}

/// Probes every host at once.
fn probe_all(hosts: &[Arc<Host>]) -> Vec<Probe> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|host| scope.spawn(move || probe(host)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Probe::Unreachable(Failure::Net("panicked".into())))
            })
            .collect()
    })
}

/// Opens sessions on the best `choices` hosts (fewest sessions ahead, ties in the order
/// given); stops early at a session active at once. Starts each one's threads. `Err`: the
/// exit status when none could be opened.
fn open_seats(
    hosts: &[Arc<Host>],
    choices: usize,
    name: &str,
    sha: Option<&str>,
    events: &Sender<Event>,
) -> Result<Vec<Seat>, i32> {
    let probes = probe_all(hosts);
    let mut rejected = false;
    let mut candidates = Vec::new();
    for (index, (host, probe)) in hosts.iter().zip(probes).enumerate() {
        match probe {
            Probe::Ready(ahead, timeouts) => candidates.push((ahead, index, timeouts)),
            Probe::Skip(why) => say(format!("{} skipped: {why}", host.url)),
            Probe::Rejected(f) => {
                rejected = true;
                say(format!(
                    "warning: {} REJECTED THE CREDENTIALS ({f}) {}: skipped",
                    host.url,
                    host.source.text()
                ));
            }
            Probe::Unreachable(f) => say(format!("warning: {} skipped: {f}", host.url)),
        }
    }
    candidates.sort_by_key(|(ahead, index, _)| (*ahead, *index));
    let mut seats: Vec<Seat> = Vec::new();
    let mut accepted = false;
    for (_, index, timeouts) in candidates {
        if seats.len() >= choices {
            break;
        }
        let host = &hosts[index];
        match host.create_session(name, sha) {
            Ok(created) => {
                accepted = true;
                let position = created.position;
                say(format!(
                    "session {} on {} ({})",
                    short(&created.session_id),
                    host.url,
                    if position == 0 {
                        "active".to_owned()
                    } else {
                        format!("position {position}")
                    }
                ));
                let seat = seats.len();
                seats.push(open_seat(
                    Arc::clone(host),
                    created.session_id,
                    timeouts,
                    seat,
                    position,
                    events,
                ));
                if position == 0 {
                    break;
                }
            }
            Err(f) if f.rejected() => {
                rejected = true;
                say(format!(
                    "warning: {} REJECTED THE CREDENTIALS ({f}) {}: skipped",
                    host.url,
                    host.source.text()
                ));
            }
            Err(f) => {
                accepted |= f.code().is_some();
                say(format!("warning: {} refused a session: {f}", host.url));
            }
        }
    }
    if seats.is_empty() {
        if rejected && !accepted {
            say("no lab host accepted the credentials");
            return Err(EX_NOPERM);
        }
        say("no lab host reachable, or every one refused a session");
        return Err(EX_UNAVAILABLE);
    }
    Ok(seats)
}

/// Starts a session's heartbeats, and its long-poll when it waits.
fn open_seat(
    host: Arc<Host>,
    id: String,
    timeouts: Timeouts,
    seat: usize,
    position: usize,
    events: &Sender<Event>,
) -> Seat {
    let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
    heartbeats(
        Arc::clone(&host),
        id.clone(),
        seat,
        timeouts,
        stop.clone(),
        events.clone(),
    );
    if position == 0 {
        let _ = events.send(Event::Active(seat));
    } else {
        let (host, id, events) = (Arc::clone(&host), id.clone(), events.clone());
        std::thread::spawn(move || poll_turn(&host, &id, seat, position, &stop, &events));
    }
    Seat {
        host,
        id,
        stop: Some(stop_tx),
    }
}

// ------------------------------------------------------------------------------ waiting

/// Waits for the first session to become active; `Ok`: its index.
fn wait_turn(
    seats: &mut [Seat],
    deadline: Instant,
    events: &Receiver<Event>,
) -> Result<usize, Abort> {
    let timeout = after(deadline.saturating_duration_since(Instant::now()));
    let mut progress = Progress::new();
    let mut places: Vec<Option<(usize, Option<String>)>> = vec![None; seats.len()];
    let mut open: Vec<bool> = vec![true; seats.len()];
    loop {
        select! {
            recv(events) -> event => match event {
                Ok(Event::Active(k)) if open[k] => {
                    let seat = &seats[k];
                    let line = if seats.len() > 1 {
                        format!("session {} is active on {}", seat.short(), seat.host.url)
                    } else {
                        format!("session {} is active", seat.short())
                    };
                    progress.show("active", &line);
                    progress.done();
                    return Ok(k);
                }
                Ok(Event::Waiting(k, position, holder)) if open[k] => {
                    places[k] = Some((position, holder));
                    show_waiting(&mut progress, seats, &places, &open);
                }
                Ok(Event::Lost(k, why)) if open[k] => {
                    progress.done();
                    open[k] = false;
                    seats[k].stop();
                    say(format!("SESSION LOST while waiting on {}: {why}", seats[k].host.url));
                    if !open.contains(&true) {
                        return Err(Abort { code: EX_TEMPFAIL, gone: false });
                    }
                }
                Ok(Event::Signal(signal, _)) => {
                    progress.done();
                    say(format!("signal {signal}: giving up the session"));
                    return Err(abort(128 + signal));
                }
                Ok(_) => {}
                Err(_) => return Err(abort(EX_SOFTWARE)),
            },
            recv(timeout) -> _ => {
                progress.done();
                say("gave up waiting for the lab after --wait-timeout");
                return Err(abort(EX_TEMPFAIL));
            }
        }
    }
}

/// One line: where each waiting session stands, and who holds each host's lab.
fn show_waiting(
    progress: &mut Progress,
    seats: &[Seat],
    places: &[Option<(usize, Option<String>)>],
    open: &[bool],
) {
    let mut key = String::new();
    let mut parts = Vec::new();
    for (k, place) in places.iter().enumerate() {
        let Some((position, holder)) = place.as_ref().filter(|_| open[k]) else {
            continue;
        };
        let url = &seats[k].host.url;
        // What counts as a change: the position and the holder, not how long it has held.
        let name = holder
            .as_deref()
            .map_or("", |h| h.rsplit_once(" for ").map_or(h, |(name, _)| name));
        key.push_str(&format!("{k} {position} {name};"));
        parts.push(match holder {
            Some(h) => format!("waiting at position {position} on {url} (held by {h})"),
            None => format!("waiting at position {position} on {url}"),
        });
    }
    if !parts.is_empty() {
        progress.show(&key, &parts.join("; "));
    }
}

/// A session's long-poll until it is active, lost, or stopped.
fn poll_turn(
    host: &Host,
    id: &str,
    seat: usize,
    position: usize,
    stop: &Receiver<()>,
    events: &Sender<Event>,
) {
    let stopped = || stop.try_recv() == Err(crossbeam_channel::TryRecvError::Disconnected);
    let _ = events.send(Event::Waiting(seat, position, holder(host)));
    // What the session's creation said: a quick answer saying the same means the server
    // ignored `wait`.
    let mut last = (false, position);
    let mut long_poll = true;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let answer = host.session_status(id, long_poll.then_some(LONG_POLL));
        if stopped() {
            return;
        }
        let quick = started.elapsed() < QUICK_ANSWER;
        match answer {
            Ok(status) if status.is_active() => {
                let _ = events.send(Event::Active(seat));
                return;
            }
            Ok(status) => {
                failures = 0;
                let now = (false, status.position);
                if now.1 != last.1 {
                    let _ = events.send(Event::Waiting(seat, now.1, holder(host)));
                }
                if quick && (now == last || !long_poll) && pause(stop, POLL_EVERY) {
                    return;
                }
                last = now;
            }
            Err(f) if f.code() == Some(404) => {
                let _ = events.send(Event::Lost(
                    seat,
                    format!("the server no longer knows it: {f}"),
                ));
                return;
            }
            Err(f) if f.code() == Some(422) && long_poll => long_poll = false,
            Err(f) => {
                failures += 1;
                if failures == 1 {
                    say(format!("warning: polling {} failed: {f}", host.url));
                }
                if pause(stop, backoff(failures)) {
                    return;
                }
            }
        }
    }
}

/// Who holds a host's lab, and since how long, when it has a queue view.
fn holder(host: &Host) -> Option<String> {
    holder_of(&host.queue(Some(1)).ok()?)
}

pub fn holder_of(view: &QueueView) -> Option<String> {
    let head = view.sessions.first()?;
    let name = [&head.client_name, &head.owner]
        .into_iter()
        .flatten()
        .find(|n| !n.is_empty())
        .map_or_else(|| format!("session {}", head.id), |n| n.clone());
    let name = term::clean_short(&name, false);
    let held = head
        .active_since
        .filter(|_| view.time > 0.0)
        .map(|since| view.time - since);
    Some(match held {
        Some(secs) => format!("{name} for {}", duration_text(secs)),
        None => name,
    })
}

pub fn duration_text(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Waits `span` unless `stop` closes first; true when it did.
fn pause(stop: &Receiver<()>, span: Duration) -> bool {
    select! {
        recv(stop) -> _ => true,
        recv(after(span)) -> _ => false,
    }
}

/// The wait before retry `attempt` (1, 2, …): doubling from [`RETRY_FIRST`] up to
/// [`RETRY_MAX`], each a random 50–100 % of that.
fn backoff(attempt: u32) -> Duration {
    let full = RETRY_FIRST
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    full.mul_f64(0.5 + 0.5 * jitter())
}

/// A number in [0, 1) from the clock's nanoseconds and the pid, through xorshift.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) << 20 ^ u64::from(std::process::id()) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

// ------------------------------------------------------------------------------ heartbeats

/// Heartbeats until `stop` closes. A 404, or failures (any answer but 204, or none) for
/// longer than the server's active timeout, report the session lost.
fn heartbeats(
    host: Arc<Host>,
    id: String,
    seat: usize,
    timeouts: Timeouts,
    stop: Receiver<()>,
    events: Sender<Event>,
) -> JoinHandle<()> {
    let every = (timeouts.active.min(timeouts.waiting) / 3).clamp(BEAT_MIN, BEAT_MAX);
    // Not shorter: on a loaded server a heartbeat cut short is one that never counted.
    let limit = crate::api::HEARTBEAT_TIMEOUT.max(every);
    std::thread::spawn(move || {
        let ticker = tick(every);
        let mut last_ok = Instant::now();
        let mut warned = false;
        loop {
            select! {
                recv(stop) -> _ => return,
                recv(ticker) -> _ => {}
            }
            match host.heartbeat(&id, limit) {
                Ok(()) => {
                    last_ok = Instant::now();
                    warned = false;
                }
                Err(f) if f.code() == Some(404) => {
                    let _ = events.send(Event::Lost(
                        seat,
                        format!(
                            "the server no longer knows session {} (reaped, or ended by someone else)",
                            short(&id)
                        ),
                    ));
                    return;
                }
                Err(f) => {
                    if last_ok.elapsed() > timeouts.active {
                        let _ = events.send(Event::Lost(
                            seat,
                            format!(
                                "heartbeats failed for {:.1} s, longer than the server's active \
                                 timeout ({:.1} s): {f}",
                                last_ok.elapsed().as_secs_f64(),
                                timeouts.active.as_secs_f64()
                            ),
                        ));
                        return;
                    }
                    if !warned {
                        warned = true;
                        say(format!("warning: heartbeat to {} failed: {f}", host.url));
                    }
                }
            }
        }
    })
}

fn signal_thread(events: Sender<Event>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot handle signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let from_terminal = matches!(signal, SIGINT | SIGHUP) && terminal_in_front();
                if events.send(Event::Signal(signal, !from_terminal)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Is our process group in the foreground of a terminal? Then a Ctrl-C or a hang-up reached
/// COMMAND (which shares our group) as well, and is not forwarded a second time.
fn terminal_in_front() -> bool {
    let ours = rustix::process::getpgrp();
    let (stdin, stderr) = (std::io::stdin(), std::io::stderr());
    rustix::termios::tcgetpgrp(&stdin).is_ok_and(|front| front == ours)
        || rustix::termios::tcgetpgrp(&stderr).is_ok_and(|front| front == ours)
}

// ------------------------------------------------------------------------------ ending

/// Ends every open session, all at once, and waits for the answers.
fn end_seats(seats: &mut [Seat], gone: bool) {
    if gone && seats.len() == 1 {
        return;
    }
    std::thread::scope(|scope| {
        for seat in seats.iter() {
            scope.spawn(move || end_quietly(seat));
        }
    });
    for seat in seats.iter_mut() {
        seat.stop();
    }
}

/// Ends every session but `keep`, each on a thread of its own; the threads to wait for.
fn end_seats_behind(seats: &mut [Seat], keep: usize) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for (k, seat) in seats.iter_mut().enumerate() {
        if k == keep {
            continue;
        }
        seat.stop();
        let seat = Seat {
            host: Arc::clone(&seat.host),
            id: seat.id.clone(),
            stop: None,
        };
        handles.push(std::thread::spawn(move || end_quietly(&seat)));
    }
    handles
}

fn end_quietly(seat: &Seat) {
    if let Err(e) = seat.host.end(&seat.id) {
        say(format!(
            "warning: ending session {} on {}: {e}",
            seat.short(),
            seat.host.url
        ));
    }
}

/// Releases the lab (when one was acquired) and ends the session.
fn end_session(seat: &Seat, release: bool) {
    if release && let Err(e) = seat.host.release(&seat.id) {
        say(format!("warning: releasing the lab: {e}"));
    }
    if let Err(e) = seat.host.end(&seat.id) {
        say(format!("warning: ending the session: {e}"));
    }
}

/// Waits for `rx` while the main thread still hears signals and the kept session's loss.
fn wait_for<T>(rx: &Receiver<T>, events: &Receiver<Event>, kept: usize) -> Result<T, Abort> {
    loop {
        select! {
            recv(rx) -> value => return value.map_err(|_| abort(EX_SOFTWARE)),
            recv(events) -> event => match event {
                Ok(Event::Signal(signal, _)) => {
                    say(format!("signal {signal}: giving up the session"));
                    return Err(abort(128 + signal));
                }
                Ok(Event::Lost(k, why)) if k == kept => {
                    // Ended all the same: heartbeats may have failed with the session
                    // still there.
                    say(format!("SESSION LOST: {why}"));
                    return Err(Abort { code: EX_TEMPFAIL, gone: false });
                }
                Ok(_) => {}
                Err(_) => return Err(abort(EX_SOFTWARE)),
            },
        }
    }
}

// ------------------------------------------------------------------------------ the lab

/// The `POST /lab` form, and the topology's bytes (for its SHA-256).
struct Upload {
    topology: Vec<u8>,
    form: (String, Vec<u8>),
}

/// The lab as COMMAND sees it.
struct Lab {
    devices_file: PathBuf,
    /// The temporary file, removed when dropped.
    _temporary: Option<tempfile::NamedTempFile>,
    reused: bool,
}

/// Uploads the topology and waits for the lab; follows netlab's output meanwhile.
fn start_lab(
    seat: &Seat,
    kept: usize,
    upload: Option<Upload>,
    args: &RunArgs,
    deadline: Instant,
    events: &Receiver<Event>,
) -> Result<Option<Lab>, Abort> {
    let Some(upload) = upload else {
        return Ok(None);
    };
    loop {
        let (stop_log, stop) = crossbeam_channel::bounded::<()>(0);
        let follower = follow_log(Arc::clone(&seat.host), seat.id.clone(), stop);
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let (host, id, form) = (Arc::clone(&seat.host), seat.id.clone(), upload.form.clone());
            std::thread::spawn(move || {
                let _ = tx.send(host.acquire(&id, form));
            });
        }
        let answer = wait_for(&rx, events, kept);
        drop(stop_log);
        let _ = follower.join();
        match answer? {
            Ok(acquired) => {
                return write_devices(acquired, args).map(Some).map_err(|e| {
                    say(e);
                    abort(EX_SOFTWARE)
                });
            }
            Err(f) if f.code() == Some(423) && Instant::now() < deadline => {
                say(format!("lab busy ({f}): trying again in 2 s"));
                wait_for(&after(POLL_EVERY), events, kept)?;
            }
            Err(f) if f.code() == Some(422) => {
                say(format!("netlab rejected the topology: {f}"));
                return Err(abort(EX_DATAERR));
            }
            Err(f) if f.code() == Some(404) => {
                say(format!("SESSION LOST before the lab started: {f}"));
                return Err(Abort {
                    code: EX_TEMPFAIL,
                    gone: true,
                });
            }
            Err(f) => {
                say(format!("the lab did not start: {f}"));
                return Err(abort(EX_SOFTWARE));
            }
        }
    }
}

/// The `POST /lab` form: the topology, `reuse`, and the extra files under their paths
/// relative to the topology's directory.
fn form(topology: &Path, extra: &[PathBuf], reuse: bool) -> Result<Upload, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let filename = topology
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} is not a file", topology.display()))?;
    let bytes = read(topology)?;
    let mut form = Multipart::new();
    form.file("topology", &filename, "application/x-yaml", &bytes);
    form.text("reuse", if reuse { "true" } else { "false" });
    let base = topology
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::fs::canonicalize(base).map_err(|e| format!("{}: {e}", base.display()))?;
    for path in extra {
        let full = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let relative = full.strip_prefix(&base).map_err(|_| {
            format!(
                "--extra-file {} is not under the topology's directory {}",
                path.display(),
                base.display()
            )
        })?;
        form.file(
            "extra_files",
            &relative.to_string_lossy(),
            "application/octet-stream",
            &read(path)?,
        );
    }
    Ok(Upload {
        topology: bytes,
        form: form.finish(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the devices of a `POST /lab` answer, exactly as the server sent them: to
/// `--devices-file`, else to a new file in `$TMPDIR` (mode 0600, a name nobody can
/// guess, created without following links).
fn write_devices(
    acquired: neops_remote_lab::protocol::Acquired<Box<serde_json::value::RawValue>>,
    args: &RunArgs,
) -> Result<Lab, String> {
    let bytes = acquired.devices.get().as_bytes();
    let (path, temporary) = match &args.devices_file {
        Some(path) => {
            std::fs::write(path, bytes)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            (path.clone(), None)
        }
        None => {
            let mut file = tempfile::Builder::new()
                .prefix("remote-lab-")
                .suffix("-devices.json")
                .tempfile()
                .map_err(|e| format!("cannot create the devices file: {e}"))?;
            file.write_all(bytes)
                .and_then(|()| file.flush())
                .map_err(|e| format!("cannot write {}: {e}", file.path().display()))?;
            (file.path().to_owned(), Some(file))
        }
    };
    let count = serde_json::from_str::<Vec<Device>>(acquired.devices.get()).map_or(0, |d| d.len());
    say(format!(
        "lab {} ({count} devices in {})",
        if acquired.reused { "reused" } else { "started" },
        path.display()
    ));
    Ok(Lab {
        devices_file: path,
        _temporary: temporary,
        reused: acquired.reused,
    })
}

/// Follows `GET /lab/log` while `POST /lab` runs, if the server offers it, and prints
/// netlab's output prefixed `netlab| `, cleaned; reads once more after `stop` closes.
fn follow_log(host: Arc<Host>, id: String, stop: Receiver<()>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut offset: u64 = 0;
        let mut lines = term::Lines::default();
        let mut first = true;
        let mut print = |text: &str, cut: bool| term::netlab_line(text, cut);
        loop {
            let still = stop.try_recv() != Err(crossbeam_channel::TryRecvError::Disconnected);
            let mut sink = |done: bool, bytes: &[u8]| {
                // The first answer may be the end of an earlier command's output: skip it.
                if !(first && done) {
                    lines.push(bytes, &mut print);
                }
            };
            match host.lab_log(&id, offset, &mut sink) {
                Ok(Some((next, _))) => offset = next,
                _ => return,
            }
            first = false;
            if !still {
                lines.finish(&mut print);
                return;
            }
            select! {
                recv(stop) -> _ => {}
                recv(after(LOG_EVERY)) -> _ => {}
            }
        }
    })
}

// ------------------------------------------------------------------------------ COMMAND

/// Runs COMMAND; returns its exit status (128+N for signal N) and whether the session was
/// lost meanwhile.
fn run_command(
    seat: &Seat,
    kept: usize,
    args: &RunArgs,
    lab: Option<&Lab>,
    events: &Receiver<Event>,
) -> (i32, bool) {
    let mut env: Vec<(&str, OsString)> = vec![
        ("REMOTE_LAB_URL", seat.host.url.clone().into()),
        ("REMOTE_LAB_SESSION_ID", seat.id.clone().into()),
    ];
    if let Some(lab) = lab {
        env.push(("REMOTE_LAB_DEVICES", lab.devices_file.clone().into()));
        env.push((
            "REMOTE_LAB_REUSED",
            if lab.reused { "true" } else { "false" }.into(),
        ));
    }
    let child = match child::spawn(
        &args.command,
        &env,
        &["REMOTE_LAB_DEVICES", "REMOTE_LAB_REUSED"],
    ) {
        Ok(child) => child,
        Err(code) => return (code, false),
    };
    let mut lost = false;
    let mut kill_at: Option<Receiver<Instant>> = None;
    loop {
        let kill = kill_at.clone().unwrap_or_else(never);
        select! {
            recv(child.exited) -> _ => break,
            recv(events) -> event => match event {
                Ok(Event::Signal(number, forward)) => {
                    if forward && let Some(signal) = Signal::from_named_raw(number) {
                        child.signal(signal);
                    }
                }
                Ok(Event::Lost(k, why)) if k == kept && !lost => {
                    lost = true;
                    say(format!("SESSION LOST: {why}"));
                    if args.on_lost_warn {
                        say("--on-lost warn: the command goes on; remote-lab will exit 75");
                    } else {
                        say("sending the command SIGTERM");
                        child.signal(Signal::TERM);
                        kill_at = Some(after(KILL_GRACE));
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            },
            recv(kill) -> _ => {
                say(format!(
                    "the command did not stop within {} s of SIGTERM: SIGKILL",
                    KILL_GRACE.as_secs()
                ));
                child.signal(Signal::KILL);
                kill_at = None;
            }
        }
    }
    (child.reap(), lost)
}

// ------------------------------------------------------------------------------ names

/// Who is asking, for the server's queue view: the CI job's URL, else user@host.
fn default_name() -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(url) = env("CI_JOB_URL").or_else(|| env("BUILD_URL")) {
        return url;
    }
    if let (Some(server), Some(repo), Some(run)) = (
        env("GITHUB_SERVER_URL"),
        env("GITHUB_REPOSITORY"),
        env("GITHUB_RUN_ID"),
    ) {
        return format!("{server}/{repo}/actions/runs/{run}");
    }
    let user = env("USER")
        .or_else(|| env("LOGNAME"))
        .unwrap_or_else(|| "unknown".into());
    let uname = rustix::system::uname();
    format!("{user}@{}", uname.nodename().to_string_lossy())
}

/// A name the server accepts: control characters (and the bidirectional overrides) made
/// spaces, at most 200 characters; sent percent-encoded beyond ASCII.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control()
                || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
            {
                ' '
            } else {
                c
            }
        })
        .take(neops_remote_lab::protocol::MAX_CLIENT_NAME)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_durations() {
        assert_eq!(clean_name("a\nb"), "a b");
        assert_eq!(clean_name("café"), "café");
        assert_eq!(clean_name(&"x".repeat(300)).len(), 200);
        assert_eq!(duration_text(59.0), "59s");
        assert_eq!(duration_text(61.0), "1m01s");
        assert_eq!(duration_text(3700.0), "1h01m");
    }

    #[test]
    fn backoff_doubles_up_to_a_cap_with_jitter() {
        for attempt in 1..30 {
            let full = RETRY_FIRST
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(RETRY_MAX);
            let wait = backoff(attempt);
            assert!(wait >= full / 2 && wait <= full, "{attempt}: {wait:?}");
        }
        assert!((0.0..1.0).contains(&jitter()));
    }
}
