//! The netlab CLI driver. Every command runs without a shell, with stdin from /dev/null (or
//! a short answer such as `y\n` where netlab asks), `COLUMNS=1000` (netlab prints through
//! Rich, which cuts lines at the terminal width), in its own process group (a
//! [`GroupChild`], so a timeout kills the whole tree and nothing else), with stdout and stderr
//! captured up to a bound, and with a timeout.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded};

use crate::lab::Device;
use crate::lablog::LabLog;
use crate::metrics::METRICS;
use crate::procgroup::GroupChild;
use rustix::process::Signal;

/// Most stdout kept from one command (one node's data is a few KiB; `up` says little).
const STDOUT_LIMIT: usize = 4 * 1024 * 1024;
/// The tail of stderr kept from one command.
const STDERR_TAIL: usize = 64 * 1024;
/// The tail of stderr quoted in an HTTP error.
const DETAIL_TAIL: usize = 4 * 1024;
/// How long captured output may keep flowing after the command exited (a grandchild that
/// escaped the process group can hold the pipes open; we do not wait for it).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How often a running command looks at the cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(120);
pub const DOWN_TIMEOUT: Duration = Duration::from_secs(600);
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a netlab command left behind.
#[derive(Debug)]
pub struct Output {
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub timed_out: bool,
    pub cancelled: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit code 1", "killed by signal 9".
    pub fn exit(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self.status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "unknown exit".to_owned(),
            },
            None => "no exit status".to_owned(),
        }
    }

    /// netlab prints `Fatal error in netlab: …` (or a `FatalError` traceback) when it gave
    /// up, and some commands still exit 0 then (`down` without containerlab, for one).
    pub fn says_fatal(&self) -> bool {
        let stdout = String::from_utf8_lossy(&self.stdout);
        [stdout.as_ref(), self.stderr.as_str()]
            .iter()
            .any(|text| text.contains("Fatal error") || text.contains("FatalError"))
    }

    /// Whether netlab did what it was asked: exit 0 and no fatal error in its output.
    pub fn done(&self) -> bool {
        self.success() && !self.says_fatal()
    }

    /// The last lines of both outputs, for error messages (netlab's fatal errors go to
    /// either, depending on the command).
    pub fn output_tail(&self) -> String {
        tail(
            &format!("{}\n{}", self.stdout_text().trim(), self.stderr.trim()),
            DETAIL_TAIL,
        )
    }

    /// Why a command that ran is not [`done`](Self::done).
    fn failure(&self, command: &str) -> String {
        if self.timed_out {
            return format!("netlab {command} timed out");
        }
        let how = if self.success() {
            "exited 0 but failed".to_owned()
        } else {
            self.exit()
        };
        format!("netlab {command} failed ({how}): {}", self.output_tail())
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The last lines of stderr, trimmed and bounded, for error messages.
    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr, DETAIL_TAIL)
    }
}

/// The last `limit` bytes of `text` (cut at a line start when possible), trimmed.
pub fn tail(text: &str, limit: usize) -> String {
    let text = text.trim();
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    match cut.find('\n') {
        Some(nl) if nl + 1 < cut.len() => cut[nl + 1..].trim().to_owned(),
        _ => cut.trim().to_owned(),
    }
}

/// `text` for a log line: netlab's lines after the first are marked `netlab| `, so every
/// line of the log says where it comes from.
pub fn for_log(text: &str) -> String {
    text.trim_end().replace('\n', "\nnetlab| ")
}

/// The file `netlab up` writes into a work directory before it deploys anything, and a
/// successful `netlab down --cleanup` removes: where there is none, netlab has nothing to
/// tear down (a topology it rejected, a directory already cleaned).
pub const SNAPSHOT: &str = "netlab.snapshot.pickle";

/// Why a lab could not be started; each maps to one HTTP answer.
#[derive(Debug)]
pub enum NetlabError {
    /// netlab rejected the topology (422).
    Rejected(String),
    /// Another lab instance runs on the host outside our control (409).
    AlreadyRunning(String),
    /// Any other failure of `up` or `inspect` (500).
    Failed {
        command: &'static str,
        /// "exit code 1", "killed by signal 9"
        exit: String,
        stderr: String,
    },
    /// `inspect` printed something that is not a node list or not JSON (500).
    BadOutput { command: &'static str, why: String },
    /// `up` ran past `--netlab-timeout` (504).
    TimedOut(Duration),
    /// The server is shutting down (503).
    Cancelled,
    /// netlab could not be run at all (500).
    Spawn(String),
}

impl NetlabError {
    pub fn status(&self) -> u16 {
        match self {
            NetlabError::Rejected(_) => 422,
            NetlabError::AlreadyRunning(_) => 409,
            NetlabError::TimedOut(_) => 504,
            NetlabError::Cancelled => 503,
            _ => 500,
        }
    }
}

impl fmt::Display for NetlabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetlabError::Rejected(stderr) => write!(f, "netlab rejected the topology: {stderr}"),
            NetlabError::AlreadyRunning(message) => f.write_str(message),
            NetlabError::Failed {
                command,
                exit,
                stderr,
            } => write!(f, "netlab {command} failed ({exit}): {stderr}"),
            NetlabError::BadOutput { command, why } => {
                write!(f, "netlab {command} printed unexpected output: {why}")
            }
            NetlabError::TimedOut(after) => {
                write!(f, "netlab up timed out after {} s", after.as_secs_f64())
            }
            NetlabError::Cancelled => f.write_str("Server is shutting down"),
            NetlabError::Spawn(why) => write!(f, "cannot run netlab: {why}"),
        }
    }
}

/// Lines on netlab's stderr that mean "your topology is wrong", not "netlab broke".
const REJECTION_MARKERS: &[&str] = &[
    "Cannot read YAML",
    "Errors encountered while processing",
    "Unknown virtualization provider",
    "Unknown device",
    "Unknown node",
    "Unknown module",
    "Invalid node",
    "Invalid link",
    "Invalid topology",
    "is not a valid",
    "Invalid value",
    "Invalid attribute",
    "Unknown attribute",
];

/// Sorts a failed `netlab up` into rejected topology, instance already running, or failure.
pub fn classify_up_failure(output: &Output) -> NetlabError {
    let stdout = output.stdout_text();
    if let Some(at) = stdout.find("already running in directory") {
        // netlab wraps this message, the directory going on the next line: join them.
        let start = stdout[..at].rfind('\n').map_or(0, |i| i + 1);
        let mut lines = stdout[start..].lines().map(str::trim);
        let first = lines.next().unwrap_or_default();
        let message = if first.ends_with("directory") {
            format!("{first} {}", lines.next().unwrap_or_default())
        } else {
            first.to_owned()
        };
        return NetlabError::AlreadyRunning(message);
    }
    let stderr = output.stderr_tail();
    if REJECTION_MARKERS.iter().any(|m| output.stderr.contains(m)) {
        return NetlabError::Rejected(stderr);
    }
    NetlabError::Failed {
        command: "up",
        exit: output.exit(),
        stderr,
    }
}

/// Parses netlab's node list, a Python literal such as `['r1', 'r2']`.
pub fn parse_node_list(text: &str) -> Result<Vec<String>, String> {
    let text = text.trim();
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| format!("not a list: {:?}", tail(text, 200)))?;
    let mut names = Vec::new();
    for item in inner.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let name = item
            .strip_prefix('\'')
            .and_then(|i| i.strip_suffix('\''))
            .or_else(|| item.strip_prefix('"').and_then(|i| i.strip_suffix('"')))
            .ok_or_else(|| format!("not a quoted name: {item:?}"))?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !valid {
            return Err(format!("not a node name: {name:?}"));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

#[derive(Clone, Debug)]
pub struct Netlab {
    pub program: PathBuf,
    pub up_timeout: Duration,
    /// Log netlab's output line by line as it arrives (`--debug`).
    pub stream_output: bool,
    /// Most `inspect --node` calls running at once.
    pub parallelism: usize,
    /// Where the output of the lab thread's commands goes, line by line, for `GET /lab/log`
    /// (not that of `inspect`, which is node data, nor of `version`).
    pub live: Option<Arc<LabLog>>,
}

impl Netlab {
    pub fn new(program: PathBuf, up_timeout: Duration, stream_output: bool) -> Self {
        Netlab {
            program,
            up_timeout,
            stream_output,
            parallelism: thread::available_parallelism().map_or(2, |n| n.get()),
            live: None,
        }
    }

    /// Feeds the output of the commands to `log` as it comes.
    pub fn with_live_log(mut self, log: Arc<LabLog>) -> Self {
        self.live = Some(log);
        self
    }

    /// Runs `netlab <args>` in `cwd`. `stdin` is fed to it (else /dev/null); `cancel`, when it
    /// becomes true, kills it like a timeout does.
    pub fn run(
        &self,
        args: &[&str],
        cwd: &Path,
        timeout: Duration,
        stdin: Option<&[u8]>,
        cancel: Option<&AtomicBool>,
    ) -> io::Result<Output> {
        self.run_with(args, cwd, timeout, stdin, cancel, &|_| {})
    }

    /// [`Netlab::run`], calling `spawned` with the command's process group id as soon as it
    /// runs.
    pub fn run_with(
        &self,
        args: &[&str],
        cwd: &Path,
        timeout: Duration,
        stdin: Option<&[u8]>,
        cancel: Option<&AtomicBool>,
        spawned: &dyn Fn(u32),
    ) -> io::Result<Output> {
        let label = args.first().copied().unwrap_or("").to_owned();
        log::debug!("running netlab {} in {}", args.join(" "), cwd.display());
        let mut command = Command::new(&self.program);
        command
            .args(args)
            .current_dir(cwd)
            .env("COLUMNS", "1000")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let live = self
            .live
            .clone()
            .filter(|_| !matches!(label.as_str(), "inspect" | "version"));
        if let Some(live) = &live {
            live.append(format!("$ netlab {}\n", args.join(" ")).as_bytes());
        }
        let mut child = GroupChild::spawn(&mut command)?;
        spawned(child.id());
        let (child_stdin, child_stdout, child_stderr) = child.take_pipes();
        if let (Some(input), Some(mut pipe)) = (stdin, child_stdin) {
            // Small answers ("y\n"): fits the pipe buffer; errors mean it exited already.
            let _ = pipe.write_all(input);
        }
        let stdout = capture(
            child_stdout,
            self.stream_output,
            Keep::Head(STDOUT_LIMIT),
            live.clone(),
        );
        let stderr = capture(
            child_stderr,
            self.stream_output,
            Keep::Tail(STDERR_TAIL),
            live,
        );

        let started = Instant::now();
        let group = child.handle();
        // A waiter thread blocks in wait(), so an exit is seen at once; this thread wakes up
        // now and then to check the timeout and the cancel flag.
        let (exited_tx, exited) = bounded(1);
        thread::Builder::new()
            .name("netlab-wait".into())
            .spawn(move || {
                let _ = exited_tx.send(child.wait().ok());
            })?;
        let mut timed_out = false;
        let mut cancelled = false;
        let status = loop {
            let left = timeout.saturating_sub(started.elapsed());
            match exited.recv_timeout(left.min(CANCEL_CHECK)) {
                Ok(status) => break status,
                Err(RecvTimeoutError::Disconnected) => break None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if started.elapsed() >= timeout {
                timed_out = true;
            } else if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                cancelled = true;
            }
            if timed_out || cancelled {
                // The handle signals the group only while its leader is unreaped.
                if let Err(e) = group.signal(Signal::KILL) {
                    log::error!("cannot kill netlab {label} (group {}): {e}", group.pgid());
                }
                break exited.recv().ok().flatten();
            }
        };
        let deadline = Instant::now() + DRAIN_GRACE;
        let stdout = stdout.collect(deadline);
        let stderr = String::from_utf8_lossy(&stderr.collect(deadline)).into_owned();
        log::debug!(
            "netlab {label} finished in {:.2} s: {status:?}",
            started.elapsed().as_secs_f64()
        );
        let result = if timed_out {
            2
        } else {
            usize::from(!status.is_some_and(|s| s.success()))
        };
        METRICS.netlab_command(&label, result, started.elapsed());
        Ok(Output {
            status,
            stdout,
            stderr,
            timed_out,
            cancelled,
        })
    }

    /// Pre-flight: `netlab version` must work. Returns its first line (netlab 26.10 goes on
    /// with a dozen lines about its modules, which are logged at debug level only).
    pub fn version(&self, cwd: &Path) -> Result<String, String> {
        match self.run(&["version"], cwd, SHORT_TIMEOUT, None, None) {
            Ok(out) if out.success() => {
                let text = out.stdout_text();
                let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
                let first = lines
                    .next()
                    .unwrap_or("netlab (no version printed)")
                    .to_owned();
                for line in lines {
                    log::debug!("netlab| {line}");
                }
                Ok(first)
            }
            Ok(out) => Err(format!(
                "`{} version` failed ({}): {}",
                self.program.display(),
                out.exit(),
                out.stderr_tail()
            )),
            Err(e) => Err(format!("cannot run `{}`: {e}", self.program.display())),
        }
    }

    /// Tears down whatever netlab registers as the `default` instance, wherever it is. A
    /// registration pointing at a directory that no longer exists is dropped with
    /// `netlab status --reset`. "Nothing running" is the normal answer. Done only when
    /// netlab says so; the error has netlab's words.
    pub fn cleanup_default(&self, cwd: &Path) -> Result<(), String> {
        const DOWN: &str = "down --instance default --cleanup";
        let out = self
            .run(
                &["down", "--instance", "default", "--cleanup"],
                cwd,
                DOWN_TIMEOUT,
                None,
                None,
            )
            .map_err(|e| format!("cannot run netlab down: {e}"))?;
        if out.done() {
            log::info!("tore down a leftover netlab instance 'default'");
            return Ok(());
        }
        let all = format!("{}\n{}", out.stdout_text(), out.stderr);
        if !out.success() && all.contains("Unknown instance") {
            return Ok(());
        }
        if !out.success() && all.contains("Cannot change directory") {
            log::warn!(
                "netlab's 'default' instance points at a directory that is gone; resetting its status"
            );
            let reset = self
                .run(
                    &["status", "--reset"],
                    cwd,
                    SHORT_TIMEOUT,
                    Some(b"y\n"),
                    None,
                )
                .map_err(|e| format!("cannot run netlab status --reset: {e}"))?;
            return if reset.done() {
                Ok(())
            } else {
                Err(reset.failure("status --reset"))
            };
        }
        Err(out.failure(DOWN))
    }

    /// The directory netlab registers its `default` instance in, if any
    /// (`netlab status --all --format json`).
    pub fn default_instance_dir(&self, cwd: &Path) -> Result<Option<PathBuf>, String> {
        let out = self
            .run(
                &["status", "--all", "--format", "json"],
                cwd,
                SHORT_TIMEOUT,
                None,
                None,
            )
            .map_err(|e| format!("cannot run netlab status: {e}"))?;
        let text = out.stdout_text();
        let value: serde_json::Value = match serde_json::from_str(text.trim()) {
            Ok(value) => value,
            // "No netlab-managed labs" exits 1 with a warning object; anything else is odd.
            Err(_) if !out.success() => return Ok(None),
            Err(e) => return Err(format!("netlab status printed no JSON: {e}")),
        };
        Ok(value
            .get("default")
            .and_then(|d| d.get("dir"))
            .and_then(|d| d.as_str())
            .map(PathBuf::from))
    }

    /// Whether the lab in `work_dir` is still there: netlab registers `default` in that
    /// directory and `inspect` answers for it.
    pub fn check_running(&self, work_dir: &Path) -> Result<(), String> {
        if !work_dir.is_dir() {
            return Err(format!("its work dir {} is gone", work_dir.display()));
        }
        match self.default_instance_dir(work_dir)? {
            Some(dir) if dir == work_dir => {}
            Some(dir) => {
                return Err(format!(
                    "netlab's default instance is in {}, not in {}",
                    dir.display(),
                    work_dir.display()
                ));
            }
            None => return Err("netlab has no default instance".into()),
        }
        self.inspect(work_dir, &["--format", "json", "list(nodes.keys())"])
            .map_err(|e| e.to_string())
            .and_then(|out| {
                parse_node_list(&String::from_utf8_lossy(&out))
                    .map(|_| ())
                    .map_err(|e| format!("netlab inspect: {e}"))
            })
    }

    /// `netlab up <topology>` in the topology's directory.
    /// `spawned` gets its process group id as soon as it runs.
    pub fn up(
        &self,
        topology: &Path,
        cancel: &AtomicBool,
        spawned: &dyn Fn(u32),
    ) -> Result<(), NetlabError> {
        let (dir, name) = split(topology);
        let out = self
            .run_with(
                &["up", &name],
                &dir,
                self.up_timeout,
                None,
                Some(cancel),
                spawned,
            )
            .map_err(|e| NetlabError::Spawn(format!("{}: {e}", self.program.display())))?;
        if out.cancelled {
            return Err(NetlabError::Cancelled);
        }
        if out.timed_out {
            return Err(NetlabError::TimedOut(self.up_timeout));
        }
        if out.success() {
            Ok(())
        } else {
            Err(classify_up_failure(&out))
        }
    }

    fn inspect(&self, dir: &Path, args: &[&str]) -> Result<Vec<u8>, NetlabError> {
        let mut full = vec!["inspect", "-q", "--instance", "default"];
        full.extend_from_slice(args);
        let out = self
            .run(&full, dir, INSPECT_TIMEOUT, None, None)
            .map_err(|e| NetlabError::Spawn(format!("{}: {e}", self.program.display())))?;
        if out.success() {
            Ok(out.stdout)
        } else if out.timed_out {
            Err(NetlabError::Failed {
                command: "inspect",
                exit: format!("timed out after {} s", INSPECT_TIMEOUT.as_secs()),
                stderr: out.stderr_tail(),
            })
        } else {
            Err(NetlabError::Failed {
                command: "inspect",
                exit: out.exit(),
                stderr: out.stderr_tail(),
            })
        }
    }

    /// The lab's nodes in netlab's order, each with its `inspect --node` data. The per-node
    /// calls run in parallel, at most `parallelism` at a time.
    pub fn devices(&self, dir: &Path) -> Result<Vec<Device>, NetlabError> {
        let listing = self.inspect(dir, &["--format", "json", "list(nodes.keys())"])?;
        let names = parse_node_list(&String::from_utf8_lossy(&listing)).map_err(|why| {
            NetlabError::BadOutput {
                command: "inspect",
                why,
            }
        })?;
        let results: Mutex<Vec<Option<Result<serde_json::Value, NetlabError>>>> =
            Mutex::new((0..names.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        thread::scope(|scope| {
            for _ in 0..self.parallelism.clamp(1, names.len().max(1)) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(name) = names.get(i) else { break };
                        let result = self
                            .inspect(dir, &["--node", name, "--format", "json"])
                            .and_then(|bytes| {
                                serde_json::from_slice(&bytes).map_err(|e| NetlabError::BadOutput {
                                    command: "inspect",
                                    why: format!("node {name}: not JSON: {e}"),
                                })
                            });
                        results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                    }
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        names
            .into_iter()
            .zip(results)
            .map(|(name, result)| {
                let raw = result.unwrap_or_else(|| {
                    Err(NetlabError::BadOutput {
                        command: "inspect",
                        why: format!("node {name} was not inspected"),
                    })
                })?;
                Ok(Device { name, raw })
            })
            .collect()
    }

    /// `netlab down --cleanup [--force]` in a lab's work directory. Done only when netlab
    /// says so: exit 0 and no fatal error in its output.
    pub fn down(&self, dir: &Path, force: bool) -> Result<(), String> {
        let mut args = vec!["down", "--cleanup"];
        if force {
            args.push("--force");
        }
        match self.run(&args, dir, DOWN_TIMEOUT, None, None) {
            Ok(out) if out.done() => Ok(()),
            Ok(out) if out.timed_out => Err(format!(
                "netlab {} timed out after {} s",
                args.join(" "),
                DOWN_TIMEOUT.as_secs()
            )),
            Ok(out) => Err(out.failure(&args.join(" "))),
            Err(e) => Err(format!("cannot run netlab down: {e}")),
        }
    }

    /// Tears down the lab in `work_dir`, if netlab left anything there: one `netlab down
    /// --cleanup` (with `--force` for the remains of a failed start), never a second pass
    /// after one that succeeded. On success the caller removes the directory; on failure it
    /// must keep it (it holds `clab.yml` and the snapshot, which netlab and containerlab
    /// need to finish by hand).
    pub fn tear_down(&self, work_dir: &Path, force: bool) -> Result<(), String> {
        if !work_dir.join(SNAPSHOT).exists() {
            return Ok(());
        }
        self.down(work_dir, force)
    }
}

fn split(topology: &Path) -> (PathBuf, String) {
    let dir = topology
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = topology
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, name)
}

enum Keep {
    Head(usize),
    Tail(usize),
}

/// A pipe being read on its own thread.
struct Capture {
    done: Option<Receiver<Vec<u8>>>,
}

impl Capture {
    /// The bytes read, waiting at most until `deadline` for the pipe to close.
    fn collect(self, deadline: Instant) -> Vec<u8> {
        match self.done {
            Some(rx) => rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

fn capture<R: Read + Send + 'static>(
    pipe: Option<R>,
    stream: bool,
    keep: Keep,
    live: Option<Arc<LabLog>>,
) -> Capture {
    let Some(pipe) = pipe else {
        return Capture { done: None };
    };
    let (tx, rx) = bounded(1);
    let spawned = thread::Builder::new()
        .name("netlab-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut kept: VecDeque<u8> = VecDeque::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                // Lines are read in bounded pieces so one endless line cannot grow memory.
                match (&mut reader).take(64 * 1024).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if stream {
                    log::debug!("netlab| {}", String::from_utf8_lossy(&line).trim_end());
                }
                if let Some(live) = &live {
                    live.append(&line);
                }
                match keep {
                    Keep::Head(limit) => {
                        let room = limit.saturating_sub(kept.len());
                        kept.extend(&line[..line.len().min(room)]);
                    }
                    Keep::Tail(limit) => {
                        kept.extend(&line);
                        let excess = kept.len().saturating_sub(limit);
                        kept.drain(..excess);
                    }
                }
            }
            let _ = tx.send(Vec::from(kept));
        });
    Capture {
        done: spawned.ok().map(|_| rx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_as_netlab_prints_them() {
        assert_eq!(
            parse_node_list("['r1', 'r2', 'h1']\n\n").unwrap(),
            vec!["r1", "r2", "h1"]
        );
        assert_eq!(parse_node_list("[]\n").unwrap(), Vec::<String>::new());
        assert_eq!(parse_node_list("[\"a_b\"]").unwrap(), vec!["a_b"]);
        assert!(parse_node_list("garbage").is_err());
        assert!(parse_node_list("[r1]").is_err());
        assert!(parse_node_list("['r1; rm -rf /']").is_err());
    }

    #[test]
    fn tails_keep_whole_last_lines() {
        assert_eq!(tail("  a\nb  \n", 100), "a\nb");
        let long = format!("{}\nlast line", "x".repeat(100));
        assert_eq!(tail(&long, 20), "last line");
    }

    fn output(code: i32, stdout: &str, stderr: &str) -> Output {
        use std::os::unix::process::ExitStatusExt;
        Output {
            status: Some(ExitStatus::from_raw(code << 8)),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.to_owned(),
            timed_out: false,
            cancelled: false,
        }
    }

    #[test]
    fn up_failures_are_classified() {
        let e = classify_up_failure(&output(
            1,
            "lab instance 'default' is already running in directory /x\n",
            "Fatal error in netlab: aborting \"netlab up\" request",
        ));
        assert_eq!(e.status(), 409);
        assert_eq!(
            e.to_string(),
            "lab instance 'default' is already running in directory /x"
        );
        let e = classify_up_failure(&output(
            1,
            "It looks like the lab instance 'default' is already running in directory\n/tmp/lab1.\n",
            "",
        ));
        assert_eq!(
            e.to_string(),
            "It looks like the lab instance 'default' is already running in directory /tmp/lab1."
        );
        let e = classify_up_failure(&output(1, "", "Cannot read YAML from t.yml\n"));
        assert_eq!(e.status(), 422);
        assert!(e.to_string().starts_with("netlab rejected the topology: "));
        let e = classify_up_failure(&output(3, "", "boom\n"));
        assert_eq!(e.status(), 500);
        assert_eq!(e.to_string(), "netlab up failed (exit code 3): boom");
        let mut killed = output(0, "", "half done\n");
        killed.status = Some(std::os::unix::process::ExitStatusExt::from_raw(9));
        assert_eq!(
            classify_up_failure(&killed).to_string(),
            "netlab up failed (killed by signal 9): half done"
        );
    }
}
