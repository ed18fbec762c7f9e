//! `remote-lab`: the command-line client of neops-remote-lab.
//!
//! `remote-lab run [OPTIONS] -- COMMAND [ARGS…]` picks a lab host (the one with the fewest
//! sessions ahead), waits for its turn with long-polls, keeps the session alive with
//! heartbeats from a background thread, starts (or reuses) the lab, runs the command with the
//! lab's devices in its environment, and releases the lab and ends the session however the
//! command ends. `remote-lab status` shows each host's queue.
//!
//! Blocking HTTP (ureq), a few threads, no async runtime.
#![forbid(unsafe_code)]

mod host;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select, unbounded};
use serde_json::Value;

use host::{Answer, Host, Multipart};

/// The command line was wrong.
const EX_USAGE: i32 = 64;
/// netlab rejected the topology (422).
const EX_DATAERR: i32 = 65;
/// No lab host reachable, or every one refused a session.
const EX_UNAVAILABLE: i32 = 69;
/// Any other failure to start the lab (409, 500, 504, …).
const EX_SOFTWARE: i32 = 70;
/// The wait timed out, or the session was lost.
const EX_TEMPFAIL: i32 = 75;

/// The server's defaults, for servers that do not say theirs.
const DEFAULT_ACTIVE_TIMEOUT: f64 = 300.0;
const DEFAULT_WAITING_TIMEOUT: f64 = 600.0;
/// A host that does not answer its queue within this is skipped.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest long-poll the client asks for.
const LONG_POLL: f64 = 25.0;
/// Polling interval against a server that ignores `wait`.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// Time the command gets between SIGTERM (session lost) and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);

const HELP: &str = "\
remote-lab: run a command while holding a neops-remote-lab lab host

Usage:
  remote-lab run [OPTIONS] [--] COMMAND [ARGS...]
  remote-lab status [--url URL]... [--token TOKEN] [--json]
  remote-lab --help | --version

run: picks the lab host with the fewest sessions ahead, waits for its turn
(long-poll), keeps the session alive with heartbeats, starts or reuses the lab
from --topology, runs COMMAND with the lab in its environment, then releases
the lab and ends the session however COMMAND ends.

Options (run):
  --url URL           a lab host; repeatable. Default: $REMOTE_LAB_URL (several
                      URLs separated by commas or spaces)
  --topology FILE     netlab topology to start (without it the run holds the
                      session only: an exclusive lock on the host)
  --extra-file PATH   a file netlab needs next to the topology (sent with its
                      path relative to the topology's directory); repeatable
  --no-reuse          start a fresh lab even if the same topology runs
  --name TEXT         who is asking (X-Client-Name). Default: the CI job URL
                      ($CI_JOB_URL, $BUILD_URL, GitHub's run URL), else user@host
  --wait-timeout S    give up waiting for the turn (or a busy lab) after S
                      seconds (default 3600)
  --devices-file PATH where to write the devices JSON (default: a temporary
                      file, removed at the end)
  --on-lost MODE      when the session is lost while COMMAND runs: terminate
                      (default: SIGTERM to COMMAND) or warn
  --token TOKEN       access token (Authorization: Bearer). Default:
                      $REMOTE_LAB_TOKEN, else the login ~/.netrc (or $NETRC)
                      has for the host (Basic)
  --json              (status) print JSON instead of a table

COMMAND's environment: REMOTE_LAB_URL (the chosen host), REMOTE_LAB_SESSION_ID,
REMOTE_LAB_DEVICES (path of the devices JSON) and REMOTE_LAB_REUSED (true or
false; the last two only with --topology). SIGINT, SIGTERM and SIGHUP are
forwarded to COMMAND.

Exit status (run):
  COMMAND's own status, or 128+N when it died of signal N
  64   bad command line, or a file it names cannot be read
  65   netlab rejected the topology (422)
  69   no lab host reachable, or every one refused a session
  70   any other failure to start the lab (409, 500, 504, ...)
  75   the wait timed out, or the session was lost
  126  COMMAND could not be run; 127 COMMAND not found
Exit status (status): 0 when every host answered, 69 otherwise.
";

fn main() {
    std::process::exit(real_main(std::env::args_os().skip(1).collect()));
}

fn say(message: impl std::fmt::Display) {
    eprintln!("remote-lab: {message}");
}

// ------------------------------------------------------------------------------ arguments

struct Common {
    urls: Vec<String>,
    token: Option<String>,
}

struct RunArgs {
    common: Common,
    topology: Option<PathBuf>,
    extra_files: Vec<PathBuf>,
    reuse: bool,
    name: Option<String>,
    wait_timeout: Duration,
    devices_file: Option<PathBuf>,
    on_lost_warn: bool,
    command: Vec<OsString>,
}

enum Cli {
    Help,
    Version,
    Run(RunArgs),
    Status(Common, bool),
}

fn real_main(args: Vec<OsString>) -> i32 {
    match parse(args) {
        Ok(Cli::Help) => {
            print!("{HELP}");
            0
        }
        Ok(Cli::Version) => {
            println!("remote-lab {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Cli::Run(args)) => run(args),
        Ok(Cli::Status(common, json)) => status(&common, json),
        Err(message) => {
            say(format!("{message}\nTry 'remote-lab --help'."));
            EX_USAGE
        }
    }
}

/// URLs from a flag or `REMOTE_LAB_URL`: separated by commas or white space.
fn split_urls(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
}

fn parse(args: Vec<OsString>) -> Result<Cli, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let sub = match parser.next().map_err(|e| e.to_string())? {
        Some(Long("help") | Short('h')) => return Ok(Cli::Help),
        Some(Long("version") | Short('V')) => return Ok(Cli::Version),
        Some(Value(sub)) => sub.string().map_err(|e| e.to_string())?,
        Some(other) => return Err(other.unexpected().to_string()),
        None => return Err("a command is needed: run or status".into()),
    };
    if sub != "run" && sub != "status" {
        return Err(format!("unknown command {sub:?}: run or status"));
    }
    let mut urls = Vec::new();
    let mut token = None;
    let mut json = false;
    let mut run = RunArgs {
        common: Common {
            urls: Vec::new(),
            token: None,
        },
        topology: None,
        extra_files: Vec::new(),
        reuse: true,
        name: None,
        wait_timeout: Duration::from_secs(3600),
        devices_file: None,
        on_lost_warn: false,
        command: Vec::new(),
    };
    let text = |parser: &mut lexopt::Parser| -> Result<String, String> {
        parser
            .value()
            .map_err(|e| e.to_string())?
            .string()
            .map_err(|e| e.to_string())
    };
    let is_run = sub == "run";
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("help") | Short('h') => return Ok(Cli::Help),
            Long("url") => urls.extend(split_urls(&text(&mut parser)?)),
            Long("token") => token = Some(text(&mut parser)?),
            Long("json") if !is_run => json = true,
            Long("topology") if is_run => {
                run.topology = Some(parser.value().map_err(|e| e.to_string())?.into());
            }
            Long("extra-file") if is_run => run
                .extra_files
                .push(parser.value().map_err(|e| e.to_string())?.into()),
            Long("no-reuse") if is_run => run.reuse = false,
            Long("name") if is_run => run.name = Some(text(&mut parser)?),
            Long("wait-timeout") if is_run => {
                let value = text(&mut parser)?;
                let secs: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        format!("--wait-timeout: {value:?} is not a positive number of seconds")
                    })?;
                run.wait_timeout = Duration::from_secs_f64(secs);
            }
            Long("devices-file") if is_run => {
                run.devices_file = Some(parser.value().map_err(|e| e.to_string())?.into());
            }
            Long("on-lost") if is_run => {
                run.on_lost_warn = match text(&mut parser)?.as_str() {
                    "warn" => true,
                    "terminate" => false,
                    other => return Err(format!("--on-lost: {other:?} is not terminate or warn")),
                }
            }
            Value(first) if is_run => {
                run.command.push(first);
                run.command
                    .extend(parser.raw_args().map_err(|e| e.to_string())?);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if urls.is_empty()
        && let Ok(env) = std::env::var("REMOTE_LAB_URL")
    {
        urls.extend(split_urls(&env));
    }
    if urls.is_empty() {
        return Err("no lab host: give --url or set REMOTE_LAB_URL".into());
    }
    if token.is_none() {
        token = std::env::var("REMOTE_LAB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
    }
    let common = Common { urls, token };
    if !is_run {
        return Ok(Cli::Status(common, json));
    }
    if run.command.is_empty() {
        return Err("no command to run: remote-lab run [OPTIONS] -- COMMAND [ARGS...]".into());
    }
    if run.topology.is_none() && !run.extra_files.is_empty() {
        return Err("--extra-file needs --topology".into());
    }
    run.common = common;
    Ok(Cli::Run(run))
}

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

/// A header value the server accepts: printable, at most 200 characters.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .filter(|c| c.is_ascii())
        .take(200)
        .collect()
}

// ------------------------------------------------------------------------------ the queue

/// What a host says about its queue.
struct Probe {
    /// Sessions ahead of a new one.
    ahead: usize,
    active_timeout: f64,
    waiting_timeout: f64,
}

fn seconds(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64).filter(|s| *s > 0.0)
}

/// The sessions of a `/queue` answer, in order.
fn queue_sessions(queue: &Value) -> &[Value] {
    queue
        .get("sessions")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn probe(host: &Host) -> Result<Probe, String> {
    let queue = host.get("/queue", PROBE_TIMEOUT)?;
    if queue.status == 200
        && let Some(view) = queue.json()
    {
        let ahead = view
            .get("total")
            .and_then(Value::as_u64)
            .map_or_else(|| queue_sessions(&view).len(), |n| n as usize);
        return Ok(Probe {
            ahead,
            active_timeout: seconds(view.get("active_timeout")).unwrap_or(DEFAULT_ACTIVE_TIMEOUT),
            waiting_timeout: seconds(view.get("waiting_timeout"))
                .unwrap_or(DEFAULT_WAITING_TIMEOUT),
        });
    }
    if queue.status == 401 {
        return Err(format!("401 {}", queue.detail()));
    }
    let health = host.get("/debug/health", PROBE_TIMEOUT)?;
    let view = match (health.status, health.json()) {
        (200, Some(view)) => view,
        (status, _) => {
            return Err(format!(
                "GET /debug/health answered {status} {}",
                health.detail()
            ));
        }
    };
    Ok(Probe {
        ahead: view
            .get("queue_length")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize,
        active_timeout: seconds(view.get("active_timeout")).unwrap_or(DEFAULT_ACTIVE_TIMEOUT),
        waiting_timeout: seconds(view.get("waiting_timeout")).unwrap_or(DEFAULT_WAITING_TIMEOUT),
    })
}

/// Probes every host at once; unreachable ones are `Err`.
fn probe_all(hosts: &[Host]) -> Vec<Result<Probe, String>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|host| scope.spawn(move || probe(host)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("probe panicked".into())))
            .collect()
    })
}

/// The holder of the lab and since how long, from a `/queue` answer.
fn holder(queue: &Value) -> Option<String> {
    let head = queue_sessions(queue).first()?;
    let name = ["client_name", "owner"]
        .iter()
        .find_map(|k| head.get(*k).and_then(Value::as_str))
        .filter(|n| !n.is_empty())
        .map_or_else(
            || {
                let id = head.get("id").and_then(Value::as_str).unwrap_or("?");
                format!("session {id}")
            },
            str::to_owned,
        );
    let held = {
        let now = queue.get("time").and_then(Value::as_f64);
        let since = head.get("active_since").and_then(Value::as_f64);
        now.zip(since).map(|(now, since)| now - since)
    };
    Some(match held {
        Some(secs) => format!("{name} for {}", duration_text(secs)),
        None => name,
    })
}

fn duration_text(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Progress on stderr: on a terminal one line updated in place, else a line per change.
struct Progress {
    tty: bool,
    last: Option<String>,
    open_line: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: None,
            open_line: false,
        }
    }

    /// Shows `line` if `key` (what counts as a change) differs from the last one shown.
    fn show(&mut self, key: &str, line: &str) {
        if self.last.as_deref() == Some(key) && !self.tty {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[Kremote-lab: {line}");
            self.open_line = true;
        } else {
            let _ = writeln!(err, "remote-lab: {line}");
        }
        let _ = err.flush();
        self.last = Some(key.to_owned());
    }

    fn done(&mut self) {
        if self.open_line {
            eprintln!();
            self.open_line = false;
        }
    }
}

// ------------------------------------------------------------------------------ run

/// What happens around the main thread.
enum Event {
    /// A signal to remote-lab; `forward` is false when the kernel sent it to the whole
    /// foreground group (a terminal's Ctrl-C), so the command has it already.
    Signal(i32, bool),
    /// A heartbeat answered 404: the session is gone.
    Lost(String),
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
/// the command (which shares our group) as well, and is not forwarded a second time.
fn terminal_in_front() -> bool {
    let ours = rustix::process::getpgrp();
    let (stdin, stderr) = (std::io::stdin(), std::io::stderr());
    rustix::termios::tcgetpgrp(&stdin).is_ok_and(|front| front == ours)
        || rustix::termios::tcgetpgrp(&stderr).is_ok_and(|front| front == ours)
}

/// Heartbeats every `every` until `stop` says so; a 404 is reported as the session lost.
fn heartbeat_thread(
    host: Arc<Host>,
    id: String,
    every: Duration,
    stop: Receiver<()>,
    events: Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut warned = false;
        loop {
            match stop.recv_timeout(every) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let sent = host.call(
                "POST",
                "/session/heartbeat",
                &[("X-Session-ID", &id)],
                Some(("application/octet-stream", Vec::new())),
                every.max(Duration::from_secs(5)),
            );
            match sent {
                Ok(a) if a.status == 204 => warned = false,
                Ok(a) if a.status == 404 => {
                    let _ = events.send(Event::Lost(format!(
                        "the server no longer knows session {id} (reaped, or ended by someone else)"
                    )));
                    return;
                }
                Ok(a) if !warned => {
                    warned = true;
                    say(format!(
                        "warning: heartbeat answered {} {}",
                        a.status,
                        a.detail()
                    ));
                }
                Err(e) if !warned => {
                    warned = true;
                    say(format!("warning: heartbeat failed: {e}"));
                }
                _ => {}
            }
        }
    })
}

/// How a run ends before its command: the exit status, and whether to end the session.
struct Abort {
    code: i32,
    end_session: bool,
}

fn abort(code: i32) -> Abort {
    Abort {
        code,
        end_session: true,
    }
}

fn run(args: RunArgs) -> i32 {
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
    let hosts: Vec<Host> = args
        .common
        .urls
        .iter()
        .map(|u| Host::new(u, args.common.token.as_deref()))
        .collect();
    let name = clean_name(&args.name.clone().unwrap_or_else(default_name));

    // Choose: the fewest sessions ahead; ties in the order given.
    let probes = probe_all(&hosts);
    let mut candidates: Vec<(usize, usize)> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    for (index, (host, probe)) in hosts.iter().zip(&probes).enumerate() {
        match probe {
            Ok(p) => candidates.push((p.ahead, index)),
            Err(e) => {
                say(format!("warning: {} skipped: {e}", host.url));
                reasons.push(format!("{}: {e}", host.url));
            }
        }
    }
    candidates.sort();
    let mut chosen = None;
    for (_, index) in candidates {
        let host = &hosts[index];
        match host.call(
            "POST",
            "/session",
            &[("X-Client-Name", &name)],
            Some(("application/octet-stream", Vec::new())),
            Duration::from_secs(30),
        ) {
            Ok(a) if a.status == 201 => {
                let v = a.json().unwrap_or(Value::Null);
                if let Some(id) = v.get("session_id").and_then(Value::as_str) {
                    let position = v.get("position").and_then(Value::as_u64).unwrap_or(0);
                    chosen = Some((index, id.to_owned(), position));
                    break;
                }
                say(format!(
                    "warning: {} answered 201 without a session id",
                    host.url
                ));
            }
            Ok(a) => {
                say(format!(
                    "warning: {} refused a session: {} {}",
                    host.url,
                    a.status,
                    a.detail()
                ));
                reasons.push(format!("{}: {}", host.url, a.status));
            }
            Err(e) => {
                say(format!("warning: {} skipped: {e}", host.url));
                reasons.push(format!("{}: {e}", host.url));
            }
        }
    }
    let Some((index, id, position)) = chosen else {
        say("no lab host reachable, or every one refused a session");
        return EX_UNAVAILABLE;
    };
    let probe = probes[index].as_ref().ok();
    let active_timeout = probe.map_or(DEFAULT_ACTIVE_TIMEOUT, |p| p.active_timeout);
    let waiting_timeout = probe.map_or(DEFAULT_WAITING_TIMEOUT, |p| p.waiting_timeout);
    let host = Arc::new(hosts.into_iter().nth(index).expect("chosen index"));
    say(format!(
        "session {} on {} ({})",
        short(&id),
        host.url,
        if position == 0 {
            "active".to_owned()
        } else {
            format!("position {position}")
        }
    ));

    // Heartbeats for the whole run, at a third of the shorter timeout, at most every 30 s.
    let every =
        Duration::from_secs_f64((active_timeout.min(waiting_timeout) / 3.0).clamp(0.05, 30.0));
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let beats = heartbeat_thread(
        Arc::clone(&host),
        id.clone(),
        every,
        stop_rx,
        events_tx.clone(),
    );
    let stop_beats = move || {
        drop(stop_tx);
        let _ = beats.join();
    };

    let deadline = Instant::now() + args.wait_timeout;
    let prepared = wait_turn(&host, &id, position, deadline, &events)
        .and_then(|()| start_lab(&host, &id, &args, upload, deadline, &events));
    let lab = match prepared {
        Ok(lab) => lab,
        Err(end) => {
            stop_beats();
            if end.end_session {
                end_session(&host, &id, false);
            }
            return end.code;
        }
    };

    let (code, lost) = run_command(&host, &id, &args, lab.as_ref(), &events);
    stop_beats();
    if let Some(lab) = &lab
        && lab.temporary
    {
        let _ = std::fs::remove_file(&lab.devices_file);
    }
    if lost {
        return EX_TEMPFAIL;
    }
    end_session(&host, &id, lab.is_some());
    code
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Releases the lab (when one was acquired) and ends the session.
fn end_session(host: &Host, id: &str, release: bool) {
    let limit = Duration::from_secs(10);
    if release {
        match host.call(
            "POST",
            "/lab/release",
            &[("X-Session-ID", id)],
            Some(("application/octet-stream", Vec::new())),
            limit,
        ) {
            Ok(a) if a.status == 204 || a.status == 404 => {}
            Ok(a) => say(format!(
                "warning: releasing the lab: {} {}",
                a.status,
                a.detail()
            )),
            Err(e) => say(format!("warning: releasing the lab: {e}")),
        }
    }
    match host.call("DELETE", &format!("/session/{id}"), &[], None, limit) {
        Ok(a) if a.status == 204 || a.status == 404 => {}
        Ok(a) => say(format!(
            "warning: ending the session: {} {}",
            a.status,
            a.detail()
        )),
        Err(e) => say(format!("warning: ending the session: {e}")),
    }
}

/// Runs `work` on a helper thread while the main thread watches `events`: a signal ends the
/// run (the session is ended: 128+N), a lost session ends it with 75.
fn watch<T: Send + 'static>(
    events: &Receiver<Event>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Abort> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    select! {
        recv(rx) -> result => result.map_err(|_| abort(EX_SOFTWARE)),
        recv(events) -> event => Err(match event {
            Ok(Event::Signal(signal, _)) => {
                say(format!("signal {signal}: giving up the session"));
                abort(128 + signal)
            }
            Ok(Event::Lost(why)) => {
                say(format!("SESSION LOST: {why}"));
                Abort { code: EX_TEMPFAIL, end_session: false }
            }
            Err(_) => abort(EX_SOFTWARE),
        }),
    }
}

/// Waits until the session is ACTIVE: long-polls, or a poll every 2 s against a server that
/// answers at once.
fn wait_turn(
    host: &Arc<Host>,
    id: &str,
    position: u64,
    deadline: Instant,
    events: &Receiver<Event>,
) -> Result<(), Abort> {
    if position == 0 {
        return Ok(());
    }
    let mut progress = Progress::new();
    show_waiting(&mut progress, host, position);
    // What the session's creation said: a quick answer saying the same means the server
    // ignored `wait`.
    let mut last: Option<(String, u64)> = Some(("waiting".to_owned(), position));
    let mut long_poll = true;
    let mut failures = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            progress.done();
            say(format!(
                "gave up waiting for the lab after --wait-timeout ({:.0} s)",
                (deadline - Instant::now().min(deadline)).as_secs_f64()
            ));
            return Err(abort(EX_TEMPFAIL));
        }
        let wait = left.as_secs_f64().min(LONG_POLL);
        let path = if long_poll {
            format!("/session/{id}?wait={wait:.3}")
        } else {
            format!("/session/{id}")
        };
        let started = Instant::now();
        let polled = {
            let host = Arc::clone(host);
            watch(events, move || {
                host.get(&path, Duration::from_secs_f64(wait + 15.0))
            })
        };
        let answer = match polled {
            Ok(answer) => answer,
            Err(end) => {
                progress.done();
                return Err(end);
            }
        };
        let quick = started.elapsed() < Duration::from_millis(500);
        match answer {
            Ok(a) if a.status == 200 => {
                failures = 0;
                let v = a.json().unwrap_or(Value::Null);
                let status = v
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let position = v.get("position").and_then(Value::as_u64).unwrap_or(0);
                if status == "active" {
                    progress.show("active", &format!("session {} is active", short(id)));
                    progress.done();
                    return Ok(());
                }
                show_waiting(&mut progress, host, position);
                let unchanged = last
                    .as_ref()
                    .is_some_and(|(s, p)| *s == status && *p == position);
                if quick && (unchanged || !long_poll) {
                    // The server answered at once with nothing new: it ignores `wait`.
                    pause(events, POLL_EVERY.min(left))?;
                }
                last = Some((status, position));
            }
            Ok(a) if a.status == 404 => {
                progress.done();
                say(format!("SESSION LOST while waiting: {}", a.detail()));
                return Err(Abort {
                    code: EX_TEMPFAIL,
                    end_session: false,
                });
            }
            Ok(a) if a.status == 422 && long_poll => long_poll = false,
            other => {
                failures += 1;
                if failures == 1 {
                    progress.done();
                    match other {
                        Ok(a) => say(format!(
                            "warning: polling answered {} {}",
                            a.status,
                            a.detail()
                        )),
                        Err(e) => say(format!("warning: polling failed: {e}")),
                    }
                }
                pause(events, POLL_EVERY.min(left))?;
            }
        }
    }
}

/// Shows the position, and who holds the lab when the server has a queue view.
fn show_waiting(progress: &mut Progress, host: &Host, position: u64) {
    let holder = host
        .get("/queue", PROBE_TIMEOUT)
        .ok()
        .filter(|q| q.status == 200)
        .and_then(|q| q.json())
        .and_then(|q| holder(&q));
    // What counts as a change: the position and the holder, not how long it has held.
    let key = format!(
        "{position} {}",
        holder
            .as_deref()
            .map_or("", |h| h.rsplit_once(" for ").map_or(h, |(name, _)| name))
    );
    let line = match &holder {
        Some(h) => format!(
            "waiting at position {position} on {} (held by {h})",
            host.url
        ),
        None => format!("waiting at position {position} on {}", host.url),
    };
    progress.show(&key, &line);
}

/// Sleeps, but a signal or a lost session still ends the run at once.
fn pause(events: &Receiver<Event>, span: Duration) -> Result<(), Abort> {
    watch(events, move || std::thread::sleep(span))
}

/// The lab as the command sees it.
struct Lab {
    devices_file: PathBuf,
    temporary: bool,
    reused: bool,
}

/// Uploads the topology and waits for the lab; follows netlab's output meanwhile.
fn start_lab(
    host: &Arc<Host>,
    id: &str,
    args: &RunArgs,
    upload: Option<(String, Vec<u8>)>,
    deadline: Instant,
    events: &Receiver<Event>,
) -> Result<Option<Lab>, Abort> {
    let Some((content_type, body)) = upload else {
        return Ok(None);
    };
    loop {
        let following = Arc::new(AtomicBool::new(true));
        let follower = follow_log(Arc::clone(host), id.to_owned(), Arc::clone(&following));
        let answer = {
            let host = Arc::clone(host);
            let (id, content_type, body) = (id.to_owned(), content_type.clone(), body.clone());
            watch(events, move || {
                host.call(
                    "POST",
                    "/lab",
                    &[("X-Session-ID", &id)],
                    Some((&content_type, body)),
                    Duration::from_secs(4 * 3600),
                )
            })
        };
        following.store(false, Ordering::SeqCst);
        let _ = follower.join();
        let answer = answer?;
        let a = match answer {
            Ok(a) => a,
            Err(e) => {
                say(format!("POST /lab failed: {e}"));
                return Err(abort(EX_SOFTWARE));
            }
        };
        match a.status {
            200 => {
                return write_devices(&a, args).map(Some).map_err(|e| {
                    say(e);
                    abort(EX_SOFTWARE)
                });
            }
            423 if Instant::now() < deadline => {
                say(format!("lab busy ({}): trying again in 2 s", a.detail()));
                pause(events, POLL_EVERY)?;
            }
            422 => {
                say(format!("netlab rejected the topology: {}", a.detail()));
                return Err(abort(EX_DATAERR));
            }
            404 => {
                say(format!(
                    "SESSION LOST before the lab started: {}",
                    a.detail()
                ));
                return Err(Abort {
                    code: EX_TEMPFAIL,
                    end_session: false,
                });
            }
            status => {
                say(format!("the lab did not start: {status} {}", a.detail()));
                return Err(abort(EX_SOFTWARE));
            }
        }
    }
}

/// The `POST /lab` form: the topology, `reuse`, and the extra files under their paths
/// relative to the topology's directory.
fn form(topology: &Path, extra: &[PathBuf], reuse: bool) -> Result<(String, Vec<u8>), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let filename = topology
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} is not a file", topology.display()))?;
    let mut form = Multipart::new();
    form.file(
        "topology",
        &filename,
        "application/x-yaml",
        &read(topology)?,
    );
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
    Ok(form.finish())
}

/// Writes the `devices` of a `POST /lab` answer, exactly as the server sent them.
fn write_devices(answer: &Answer, args: &RunArgs) -> Result<Lab, String> {
    #[derive(serde::Deserialize)]
    struct Acquired<'a> {
        reused: bool,
        #[serde(borrow)]
        devices: &'a serde_json::value::RawValue,
    }
    let acquired: Acquired<'_> = serde_json::from_str(&answer.body)
        .map_err(|e| format!("POST /lab answered something else than the lab: {e}"))?;
    let (path, temporary) = match &args.devices_file {
        Some(path) => (path.clone(), false),
        None => (
            std::env::temp_dir().join(format!("remote-lab-{}-devices.json", std::process::id())),
            true,
        ),
    };
    std::fs::write(&path, acquired.devices.get())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    say(format!(
        "lab {} ({} devices in {})",
        if acquired.reused { "reused" } else { "started" },
        serde_json::from_str::<Vec<Value>>(acquired.devices.get()).map_or(0, |d| d.len()),
        path.display()
    ));
    Ok(Lab {
        devices_file: path,
        temporary,
        reused: acquired.reused,
    })
}

/// Follows `GET /lab/log` while `POST /lab` runs, if the server offers it, and prints
/// netlab's output prefixed `netlab| `.
fn follow_log(
    host: Arc<Host>,
    id: String,
    running: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut offset: u64 = 0;
        let mut partial = String::new();
        let mut first = true;
        loop {
            let still = running.load(Ordering::SeqCst);
            let answer = host.call(
                "GET",
                &format!("/lab/log?offset={offset}"),
                &[("X-Session-ID", &id)],
                None,
                Duration::from_secs(10),
            );
            let Ok(a) = answer else { return };
            if a.status != 200 {
                return;
            }
            // The first answer may be the end of an earlier command's output: skip it.
            if first && a.log_done == Some(true) {
                offset = a.log_offset.unwrap_or(offset + a.body.len() as u64);
                first = false;
            } else {
                first = false;
                offset = a.log_offset.unwrap_or(offset + a.body.len() as u64);
                partial.push_str(&a.body);
                while let Some(newline) = partial.find('\n') {
                    let line: String = partial.drain(..=newline).collect();
                    eprintln!("netlab| {}", line.trim_end_matches(['\n', '\r']));
                }
            }
            if !still {
                if !partial.is_empty() {
                    eprintln!("netlab| {partial}");
                }
                return;
            }
            for _ in 0..5 {
                if !running.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    })
}

/// Runs the command; returns its exit status (128+N for signal N) and whether the session
/// was lost meanwhile.
fn run_command(
    host: &Host,
    id: &str,
    args: &RunArgs,
    lab: Option<&Lab>,
    events: &Receiver<Event>,
) -> (i32, bool) {
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("REMOTE_LAB_URL", &host.url)
        .env("REMOTE_LAB_SESSION_ID", id)
        .env_remove("REMOTE_LAB_DEVICES")
        .env_remove("REMOTE_LAB_REUSED");
    if let Some(lab) = lab {
        command.env("REMOTE_LAB_DEVICES", &lab.devices_file).env(
            "REMOTE_LAB_REUSED",
            if lab.reused { "true" } else { "false" },
        );
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            say(format!(
                "cannot run {}: {e}",
                args.command[0].to_string_lossy()
            ));
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return (code, false);
        }
    };
    let pid = rustix::process::Pid::from_child(&child);
    // The child is ours and not reaped until `try_wait` says it exited: its pid cannot
    // belong to anyone else while this loop signals it.
    let signal = |number: i32| {
        if let Some(sig) = rustix::process::Signal::from_named_raw(number) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    };
    let mut lost = false;
    let mut kill_at: Option<Instant> = None;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                say(format!("cannot wait for the command: {e}"));
                return (EX_SOFTWARE, lost);
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            say("the command did not stop within 10 s of SIGTERM: SIGKILL");
            signal(rustix::process::Signal::KILL.as_raw());
            kill_at = None;
        }
        select! {
            recv(events) -> event => match event {
                Ok(Event::Signal(number, forward)) => {
                    if forward {
                        signal(number);
                    }
                }
                Ok(Event::Lost(why)) => {
                    lost = true;
                    say(format!("SESSION LOST: {why}"));
                    if args.on_lost_warn {
                        say("--on-lost warn: the command goes on; remote-lab will exit 75");
                    } else {
                        say("sending the command SIGTERM");
                        signal(rustix::process::Signal::TERM.as_raw());
                        kill_at = Some(Instant::now() + KILL_GRACE);
                    }
                }
                Err(_) => {}
            },
            default(Duration::from_millis(10)) => {}
        }
    };
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => EX_SOFTWARE,
    };
    (code, lost)
}

// ------------------------------------------------------------------------------ status

/// A host's answer: its queue view, else its health figures; or why it did not answer.
type View = Result<(Option<Value>, Option<Value>), String>;

fn status(common: &Common, json: bool) -> i32 {
    let hosts: Vec<Host> = common
        .urls
        .iter()
        .map(|u| Host::new(u, common.token.as_deref()))
        .collect();
    let views: Vec<View> = std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|host| {
                scope.spawn(move || {
                    let queue = host.get("/queue", PROBE_TIMEOUT)?;
                    if queue.status == 200 {
                        return Ok((queue.json(), None));
                    }
                    let health = host.get("/debug/health", PROBE_TIMEOUT)?;
                    if health.status == 200 {
                        Ok((None, health.json()))
                    } else {
                        Err(format!("{} {}", health.status, health.detail()))
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let all_answered = views.iter().all(Result::is_ok);
    if json {
        let out: Vec<Value> = hosts
            .iter()
            .zip(&views)
            .map(|(host, view)| match view {
                Ok((queue, health)) => serde_json::json!({
                    "url": host.url, "reachable": true, "queue": queue, "health": health, "error": null
                }),
                Err(e) => serde_json::json!({
                    "url": host.url, "reachable": false, "queue": null, "health": null, "error": e
                }),
            })
            .collect();
        println!("{}", Value::Array(out));
    } else {
        println!(
            "{:<32} {:<12} {:>8} {:>7}  {:<40} LAB",
            "HOST", "STATE", "SESSIONS", "WAITING", "HOLDER"
        );
        for (host, view) in hosts.iter().zip(&views) {
            match view {
                Ok((Some(queue), _)) => {
                    let sessions = queue
                        .get("total")
                        .and_then(Value::as_u64)
                        .map_or_else(|| queue_sessions(queue).len(), |n| n as usize);
                    let lab = queue.get("lab").map_or_else(|| "-".to_owned(), lab_text);
                    println!(
                        "{:<32} {:<12} {:>8} {:>7}  {:<40} {}",
                        host.url,
                        "ok",
                        sessions,
                        sessions.saturating_sub(1),
                        holder(queue).unwrap_or_else(|| "-".into()),
                        lab
                    );
                }
                Ok((None, health)) => {
                    let n = health
                        .as_ref()
                        .and_then(|h| h.get("queue_length"))
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    println!(
                        "{:<32} {:<12} {:>8} {:>7}  {:<40} -",
                        host.url,
                        "ok",
                        n,
                        n.saturating_sub(1),
                        if n > 0 { "(unnamed)" } else { "-" }
                    );
                }
                Err(e) => println!("{:<32} unreachable: {e}", host.url),
            }
        }
    }
    if all_answered { 0 } else { EX_UNAVAILABLE }
}

fn lab_text(lab: &Value) -> String {
    if !lab.get("running").and_then(Value::as_bool).unwrap_or(false) {
        return "down".into();
    }
    let topology = lab
        .get("topology")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .rsplit('/')
        .next()
        .unwrap_or("?")
        .to_owned();
    let refs = lab.get("ref_count").and_then(Value::as_u64).unwrap_or(0);
    format!("up ({topology}, {refs} ref)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn command_lines() {
        let Ok(Cli::Run(run)) = parse(args(&[
            "run",
            "--url",
            "http://a,http://b",
            "--url",
            "http://c",
            "--no-reuse",
            "--",
            "echo",
            "--x",
        ])) else {
            panic!("not a run");
        };
        assert_eq!(run.common.urls, ["http://a", "http://b", "http://c"]);
        assert!(!run.reuse);
        assert_eq!(run.command, args(&["echo", "--x"]));
        assert!(parse(args(&["run", "--url", "http://a"])).is_err());
        assert!(parse(args(&["fly"])).is_err());
        assert!(
            parse(args(&[
                "run",
                "--url",
                "u",
                "--wait-timeout",
                "0",
                "--",
                "true"
            ]))
            .is_err()
        );
        assert!(matches!(
            parse(args(&["status", "--url", "u", "--json"])),
            Ok(Cli::Status(_, true))
        ));
    }

    #[test]
    fn names_and_durations() {
        assert_eq!(clean_name("a\nb"), "a b");
        assert_eq!(clean_name(&"x".repeat(300)).len(), 200);
        assert_eq!(duration_text(59.0), "59s");
        assert_eq!(duration_text(61.0), "1m01s");
        assert_eq!(duration_text(3700.0), "1h01m");
    }
}
