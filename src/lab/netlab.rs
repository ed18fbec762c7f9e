//! The netlab CLI driver: the netlab commands the server needs, each run through
//! [`crate::lab::runner`] (its own process group, bounded output, a timeout) with
//! `COLUMNS=1000` (netlab prints through Rich, which cuts lines at the terminal width) and
//! stdin from /dev/null, or a short answer such as `y\n` where netlab asks.
//!
//! Why one file of this size: one method per netlab command the server runs, each with the
//! parsing of what netlab prints and the classification of its failures.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::lab::record::{Device, instance_name};
use crate::lab::runner::{LineHook, Output, Run};
use crate::observe::lablog::LabLog;
use crate::observe::metrics::METRICS;

/// Most stdout kept from one command (one node's data is a few KiB; `up` says little).
const STDOUT_LIMIT: usize = 4 * 1024 * 1024;
/// The tail of stderr kept from one command.
const STDERR_TAIL: usize = 64 * 1024;
/// The tail of output quoted in an error.
const DETAIL_TAIL: usize = 4 * 1024;

const INSPECT_TIMEOUT: Duration = Duration::from_secs(120);
const DOWN_TIMEOUT: Duration = Duration::from_secs(600);
const SHORT_TIMEOUT: Duration = Duration::from_secs(60);

/// netlab prints `Fatal error in netlab: …` (or a `FatalError` traceback) when it gave up,
/// and some commands still exit 0 then (`down` without containerlab, for one).
fn says_fatal(out: &Output) -> bool {
    [out.stdout_text(), out.stderr_text()]
        .iter()
        .any(|text| text.contains("Fatal error") || text.contains("FatalError"))
}

/// netlab's answer to `status --all` on a host where no lab runs: `{"warning": "No
/// netlab-managed labs"}`, exit 1. An answer, not a failure (for the metrics too).
fn says_nothing_runs(command: &str, out: &Output) -> bool {
    command == "status" && out.stdout_text().contains("No netlab-managed labs")
}

/// Whether netlab did what it was asked: exit 0 and no fatal error in its output.
fn done(out: &Output) -> bool {
    out.success() && !says_fatal(out)
}

/// The last lines of both outputs, for error messages (netlab's fatal errors go to either,
/// depending on the command).
fn output_tail(out: &Output) -> String {
    tail(
        &format!("{}\n{}", out.stdout_text().trim(), out.stderr_text().trim()),
        DETAIL_TAIL,
    )
}

/// The last lines of stderr, trimmed and bounded, for error messages.
fn stderr_tail(out: &Output) -> String {
    tail(&out.stderr_text(), DETAIL_TAIL)
}

/// The last `limit` bytes of `text` (cut at a line start when possible), trimmed.
fn tail(text: &str, limit: usize) -> String {
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
pub fn for_log(text: &impl fmt::Display) -> String {
    text.to_string().trim_end().replace('\n', "\nnetlab| ")
}

/// The file `netlab up` writes into a work directory before it deploys anything, and a
/// successful `netlab down --cleanup` removes: where there is none, netlab has nothing to
/// tear down (a topology it rejected, a directory already cleaned).
const SNAPSHOT: &str = "netlab.snapshot.pickle";

/// The size and modification time of the snapshot in a lab's directory, to tell whether
/// netlab wrote it again.
pub type SnapshotStamp = (u64, std::time::SystemTime);

/// The [`SnapshotStamp`] of `dir`'s snapshot, if there is one.
pub fn snapshot_stamp(dir: &Path) -> Option<SnapshotStamp> {
    let meta = std::fs::metadata(dir.join(SNAPSHOT)).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// containerlab's description of the lab, which `netlab up` writes and `down --cleanup`
/// removes: while it is there, containers may run.
const CLAB_FILE: &str = "clab.yml";

/// Why a netlab command did not do what it was asked. [`NetlabError::status`] is the HTTP
/// answer for a failed start.
#[derive(Debug)]
pub enum NetlabError {
    /// netlab rejected the topology (422).
    Rejected(String),
    /// Another lab instance runs on the host outside our control (409).
    AlreadyRunning(String),
    /// netlab ran and failed (500).
    Failed {
        /// The arguments, such as `down --cleanup`.
        command: String,
        /// "exit code 1", "killed by signal 9", "exited 0 but failed"
        exit: String,
        /// The end of what it printed.
        output: String,
    },
    /// It printed something that is not what it should print (500).
    BadOutput { command: &'static str, why: String },
    /// It ran past its timeout and was killed (504).
    TimedOut { command: String, after: Duration },
    /// The server is shutting down (503).
    Cancelled,
    /// netlab could not be run at all (500).
    Spawn {
        program: PathBuf,
        command: String,
        error: io::Error,
    },
}

impl NetlabError {
    pub fn status(&self) -> u16 {
        match self {
            NetlabError::Rejected(_) => 422,
            NetlabError::AlreadyRunning(_) => 409,
            NetlabError::TimedOut { .. } => 504,
            NetlabError::Cancelled => 503,
            _ => 500,
        }
    }

    /// Whether the failure says something about the host rather than the topology (or the
    /// shutdown): netlab or its back end missing or failing (containerlab, Docker), a
    /// timeout, another lab instance in the way. Such failures in a row make the host
    /// unhealthy.
    pub fn counts_against_host(&self) -> bool {
        !matches!(self, NetlabError::Rejected(_) | NetlabError::Cancelled)
    }

    /// Why `out` of `netlab <command>` is not [`done`].
    fn failure(command: String, out: &Output) -> Self {
        let exit = if out.success() {
            "exited 0 but failed".to_owned()
        } else {
            out.exit()
        };
        NetlabError::Failed {
            command,
            exit,
            output: output_tail(out),
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
                output,
            } => write!(f, "netlab {command} failed ({exit}): {output}"),
            NetlabError::BadOutput { command, why } => {
                write!(f, "netlab {command} printed unexpected output: {why}")
            }
            NetlabError::TimedOut { command, after } => {
                write!(
                    f,
                    "netlab {command} timed out after {} s",
                    after.as_secs_f64()
                )
            }
            NetlabError::Cancelled => f.write_str("Server is shutting down"),
            NetlabError::Spawn {
                program,
                command,
                error,
            } => write!(f, "cannot run `{} {command}`: {error}", program.display()),
        }
    }
}

impl std::error::Error for NetlabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NetlabError::Spawn { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why the lab a state file names is not taken back (see [`Netlab::check_running`]).
#[derive(Debug)]
pub enum NotRunning {
    WorkDirGone(PathBuf),
    /// netlab registers the lab's instance in another directory.
    ElsewhereRegistered {
        instance: String,
        registered: PathBuf,
        work_dir: PathBuf,
    },
    /// netlab does not register the lab's instance.
    NoInstance(String),
    /// netlab could not say: it failed, or printed something unexpected.
    Unknown(NetlabError),
}

impl fmt::Display for NotRunning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotRunning::WorkDirGone(dir) => write!(f, "its work dir {} is gone", dir.display()),
            NotRunning::ElsewhereRegistered {
                instance,
                registered,
                work_dir,
            } => write!(
                f,
                "netlab's instance {instance} is in {}, not in {}",
                registered.display(),
                work_dir.display()
            ),
            NotRunning::NoInstance(instance) => write!(f, "netlab has no instance {instance}"),
            NotRunning::Unknown(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for NotRunning {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotRunning::Unknown(e) => Some(e),
            _ => None,
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
fn classify_up_failure(output: &Output) -> NetlabError {
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
    let stderr = stderr_tail(output);
    if REJECTION_MARKERS
        .iter()
        .any(|m| output.stderr_text().contains(m))
    {
        return NetlabError::Rejected(stderr);
    }
    NetlabError::Failed {
        command: "up".into(),
        exit: output.exit(),
        output: stderr,
    }
}

/// Parses netlab's node list, a Python literal such as `['r1', 'r2']`.
fn parse_node_list(text: &str) -> Result<Vec<String>, String> {
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
    program: PathBuf,
    up_timeout: Duration,
    /// Log netlab's output line by line as it arrives (`--debug`).
    stream_output: bool,
    /// Most `inspect --node` calls running at once.
    parallelism: usize,
    /// Where the output of the lab thread's commands goes, line by line, for `GET /lab/log`
    /// (not that of `inspect`, which is node data, nor of `version`).
    live: Option<Arc<LabLog>>,
    /// The containerlab command, for a lab netlab can no longer tear down itself.
    containerlab: PathBuf,
}

impl Netlab {
    pub fn new(program: PathBuf, up_timeout: Duration, stream_output: bool) -> Self {
        Netlab {
            program,
            up_timeout,
            stream_output,
            parallelism: thread::available_parallelism().map_or(2, |n| n.get()),
            live: None,
            containerlab: PathBuf::from("containerlab"),
        }
    }

    /// Runs `program` for `containerlab destroy` (default: `containerlab` on `PATH`).
    pub fn with_containerlab(mut self, program: PathBuf) -> Self {
        self.containerlab = program;
        self
    }

    /// Feeds the output of the commands to `log` as it comes.
    pub fn with_live_log(mut self, log: Arc<LabLog>) -> Self {
        self.live = Some(log);
        self
    }

    /// Runs `netlab <args>` in `cwd` as `run` says, with its output in the debug log
    /// (`--debug`) and the live log (but for `inspect` and `version`), and counted in the
    /// metrics. Only a netlab that cannot be started is an error here.
    fn run(&self, args: &[&str], cwd: &Path, run: Run<'_>) -> Result<Output, NetlabError> {
        self.run_with(args, cwd, &[], run)
    }

    /// [`Netlab::run`] with more environment variables (the multilab plugin's).
    fn run_with(
        &self,
        args: &[&str],
        cwd: &Path,
        env: &[(&str, String)],
        mut run: Run<'_>,
    ) -> Result<Output, NetlabError> {
        let label = args.first().copied().unwrap_or("");
        log::debug!("running netlab {} in {}", args.join(" "), cwd.display());
        let live = self
            .live
            .clone()
            .filter(|_| !matches!(label, "inspect" | "version"));
        if let Some(live) = &live {
            live.append(format!("$ netlab {}\n", args.join(" ")).as_bytes());
        }
        run = run.keep(STDOUT_LIMIT, STDERR_TAIL);
        if let Some(hook) = self.line_hook(live) {
            run = run.on_line(hook);
        }
        let out = run
            .run(
                Command::new(&self.program)
                    .args(args)
                    .current_dir(cwd)
                    .env("COLUMNS", "1000")
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
            )
            .map_err(|error| NetlabError::Spawn {
                program: self.program.clone(),
                command: args.join(" "),
                error,
            })?;
        log::debug!(
            "netlab {label} finished in {:.2} s: {:?}",
            out.elapsed.as_secs_f64(),
            out.status
        );
        let result = if out.timed_out {
            2
        } else {
            usize::from(!out.success() && !says_nothing_runs(label, &out))
        };
        METRICS.netlab_command(label, result, out.elapsed);
        Ok(out)
    }

    /// What sees netlab's output as it comes: the debug log and the live log, if wanted.
    fn line_hook(&self, live: Option<Arc<LabLog>>) -> Option<LineHook> {
        let stream = self.stream_output;
        if !stream && live.is_none() {
            return None;
        }
        Some(Arc::new(move |line: &[u8]| {
            if stream {
                log::debug!("netlab| {}", String::from_utf8_lossy(line).trim_end());
            }
            if let Some(live) = &live {
                live.append(line);
            }
        }))
    }

    /// [`Netlab::run`], done only when netlab says so: exit 0 and no fatal error in its
    /// output.
    fn run_done(&self, args: &[&str], cwd: &Path, run: Run<'_>) -> Result<Output, NetlabError> {
        let timeout = run.timeout();
        let out = self.run(args, cwd, run)?;
        if out.timed_out {
            Err(NetlabError::TimedOut {
                command: args.join(" "),
                after: timeout,
            })
        } else if done(&out) {
            Ok(out)
        } else {
            Err(NetlabError::failure(args.join(" "), &out))
        }
    }

    /// Pre-flight: `netlab version` must work. Returns its first line (netlab 26.10 goes on
    /// with a dozen lines about its modules, which are logged at debug level only).
    pub fn version(&self, cwd: &Path) -> Result<String, NetlabError> {
        let out = self.run(&["version"], cwd, Run::new(SHORT_TIMEOUT))?;
        if !out.success() {
            return Err(NetlabError::Failed {
                command: "version".into(),
                exit: out.exit(),
                output: stderr_tail(&out),
            });
        }
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

    /// Tears down whatever netlab registers as `instance` (`default` for `None`), wherever
    /// it is. A `default` registration pointing at a directory that no longer exists is
    /// dropped with `netlab status --reset`. "Nothing running" is the normal answer. Done
    /// only when netlab says so; the error has netlab's words.
    pub fn cleanup_instance(&self, cwd: &Path, instance: Option<u16>) -> Result<(), NetlabError> {
        let name = instance_name(instance);
        let down: &[&str] = &["down", "--instance", &name, "--cleanup"];
        let out = self.run(down, cwd, Run::new(DOWN_TIMEOUT))?;
        if done(&out) {
            log::info!("tore down a leftover netlab instance '{name}'");
            return Ok(());
        }
        let all = format!("{}\n{}", out.stdout_text(), out.stderr_text());
        if !out.success() && all.contains("Unknown instance") {
            return Ok(());
        }
        if !out.success() && all.contains("Cannot change directory") && instance.is_some() {
            // `status --reset` would drop every instance's registration, the other slots'
            // too: a numbered one is left to its `down --force` in its own directory.
            return Err(NetlabError::failure(down.join(" "), &out));
        }
        if !out.success() && all.contains("Cannot change directory") {
            log::warn!(
                "netlab's 'default' instance points at a directory that is gone; resetting its status"
            );
            let reset = Run::new(SHORT_TIMEOUT).stdin(b"y\n");
            return self.run_done(&["status", "--reset"], cwd, reset).map(drop);
        }
        if out.timed_out {
            return Err(NetlabError::TimedOut {
                command: down.join(" "),
                after: DOWN_TIMEOUT,
            });
        }
        Err(NetlabError::failure(down.join(" "), &out))
    }

    /// The directory netlab registers `instance` in (`default` for `None`), if any.
    pub fn instance_dir(
        &self,
        cwd: &Path,
        instance: Option<u16>,
    ) -> Result<Option<PathBuf>, NetlabError> {
        let name = instance_name(instance);
        Ok(self
            .instances(cwd)?
            .into_iter()
            .find(|(i, _)| *i == name)
            .map(|(_, dir)| dir))
    }

    /// The instances netlab registers, each with its directory
    /// (`netlab status --all --format json`); none when netlab says "No netlab-managed
    /// labs".
    pub fn instances(&self, cwd: &Path) -> Result<Vec<(String, PathBuf)>, NetlabError> {
        let args = ["status", "--all", "--format", "json"];
        let out = self.run(&args, cwd, Run::new(SHORT_TIMEOUT))?;
        if says_nothing_runs("status", &out) {
            return Ok(Vec::new());
        }
        if out.timed_out {
            return Err(NetlabError::TimedOut {
                command: args.join(" "),
                after: SHORT_TIMEOUT,
            });
        }
        let value: serde_json::Value = match serde_json::from_str(out.stdout_text().trim()) {
            Ok(value) if out.success() => value,
            Ok(_) => return Err(NetlabError::failure(args.join(" "), &out)),
            Err(_) if !out.success() => return Err(NetlabError::failure(args.join(" "), &out)),
            Err(e) => {
                return Err(NetlabError::BadOutput {
                    command: "status",
                    why: format!("no JSON: {e}"),
                });
            }
        };
        let Some(map) = value.as_object() else {
            return Err(NetlabError::BadOutput {
                command: "status",
                why: "not a JSON object".into(),
            });
        };
        Ok(map
            .iter()
            .filter_map(|(id, entry)| {
                let dir = entry.get("dir")?.as_str()?;
                Some((id.clone(), PathBuf::from(dir)))
            })
            .collect())
    }

    /// Whether the lab in `work_dir` is still there: netlab registers its instance in that
    /// directory and `inspect` answers for it.
    pub fn check_running(&self, work_dir: &Path, instance: Option<u16>) -> Result<(), NotRunning> {
        if !work_dir.is_dir() {
            return Err(NotRunning::WorkDirGone(work_dir.to_path_buf()));
        }
        match self
            .instance_dir(work_dir, instance)
            .map_err(NotRunning::Unknown)?
        {
            Some(dir) if dir == work_dir => {}
            Some(registered) => {
                return Err(NotRunning::ElsewhereRegistered {
                    instance: instance_name(instance),
                    registered,
                    work_dir: work_dir.to_path_buf(),
                });
            }
            None => return Err(NotRunning::NoInstance(instance_name(instance))),
        }
        self.node_names(work_dir)
            .map(drop)
            .map_err(NotRunning::Unknown)
    }

    /// `netlab up <topology>` in the topology's directory, killed when `cancel` is set.
    /// `spawned` gets its process group id as soon as it runs. A multilab `instance` gets
    /// its id and the plugin through the environment (the plugin gives it its own name and
    /// management subnet; the id alone would not).
    pub fn up(
        &self,
        topology: &Path,
        instance: Option<u16>,
        cancel: &AtomicBool,
        spawned: &dyn Fn(u32),
    ) -> Result<(), NetlabError> {
        let (dir, name) = split(topology);
        let run = Run::new(self.up_timeout).cancel(cancel).on_spawn(spawned);
        let env: Vec<(&str, String)> = match instance {
            Some(id) => vec![
                ("NETLAB_PLUGIN", "multilab".to_owned()),
                ("NETLAB_MULTILAB_ID", id.to_string()),
            ],
            None => Vec::new(),
        };
        let out = self.run_with(&["up", &name], &dir, &env, run)?;
        if out.cancelled {
            Err(NetlabError::Cancelled)
        } else if out.timed_out {
            Err(NetlabError::TimedOut {
                command: "up".into(),
                after: self.up_timeout,
            })
        } else if out.success() {
            Ok(())
        } else {
            Err(classify_up_failure(&out))
        }
    }

    /// `netlab inspect` of the lab whose snapshot is in `dir`; its stdout. Run in the lab's
    /// own directory, netlab reads the snapshot there: naming the instance as well
    /// (`--instance N`) gives the same output and costs a quarter of a second more
    /// (netlab 26.10 then loads its registry). A timeout is a failure (500), not the 504 of
    /// a slow `up`; `cancel` set, it is killed and the answer is [`NetlabError::Cancelled`].
    fn inspect(
        &self,
        dir: &Path,
        args: &[&str],
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<u8>, NetlabError> {
        let mut full = vec!["inspect", "-q"];
        full.extend_from_slice(args);
        let mut run = Run::new(INSPECT_TIMEOUT);
        if let Some(cancel) = cancel {
            run = run.cancel(cancel);
        }
        let out = self.run(&full, dir, run)?;
        if out.cancelled {
            return Err(NetlabError::Cancelled);
        }
        if out.success() {
            return Ok(out.stdout);
        }
        let exit = if out.timed_out {
            format!("timed out after {} s", INSPECT_TIMEOUT.as_secs())
        } else {
            out.exit()
        };
        Err(NetlabError::Failed {
            command: "inspect".into(),
            exit,
            output: stderr_tail(&out),
        })
    }

    /// The lab's node names, in netlab's order.
    fn node_names(&self, dir: &Path) -> Result<Vec<String>, NetlabError> {
        let listing = self.inspect(dir, &["--format", "json", "list(nodes.keys())"], None)?;
        parse_node_list(&String::from_utf8_lossy(&listing)).map_err(|why| NetlabError::BadOutput {
            command: "inspect",
            why,
        })
    }

    /// The lab's nodes in netlab's order, each with its `inspect --node` data: read in one
    /// netlab call ([`Netlab::devices_at_once`]), or, when that fails, node by node
    /// ([`Netlab::devices_node_by_node`]).
    pub fn devices(&self, dir: &Path) -> Result<Vec<Device>, NetlabError> {
        match self.devices_at_once(dir, None) {
            Ok(devices) => Ok(devices),
            Err(e) => {
                log::warn!(
                    "reading every node in one netlab call failed, asking node by node: {}",
                    for_log(&e)
                );
                self.devices_node_by_node(dir)
            }
        }
    }

    /// Every node of the lab in `dir`, in netlab's order, with the data `netlab inspect
    /// --node NAME --format json` prints for it, from one `netlab inspect` (one Python start
    /// instead of one per node and one for the list). See [`ALL_NODES`]. Killed when
    /// `cancel` is set.
    pub fn devices_at_once(
        &self,
        dir: &Path,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<Device>, NetlabError> {
        let stdout = self.inspect(dir, &["--format", "json", ALL_NODES], cancel)?;
        let pairs: Vec<(String, serde_json::Value)> =
            serde_json::from_slice(&stdout).map_err(|e| NetlabError::BadOutput {
                command: "inspect",
                why: format!("every node at once: not a list of [name, data]: {e}"),
            })?;
        Ok(pairs
            .into_iter()
            .map(|(name, raw)| Device { name, raw })
            .collect())
    }

    /// The lab's nodes in netlab's order, each with its `inspect --node` data, one netlab
    /// call for the list and one per node. The per-node calls run in parallel, at most
    /// `parallelism` at a time.
    pub fn devices_node_by_node(&self, dir: &Path) -> Result<Vec<Device>, NetlabError> {
        let names = self.node_names(dir)?;
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
                            .inspect(dir, &["--node", name, "--format", "json"], None)
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

    /// Tears down the lab in `work_dir`, if netlab left anything there: one `netlab down
    /// --cleanup` (`--instance N` for a multilab instance; with `--force` for the remains of
    /// a failed start, which go by the directory's snapshot), never a second pass
    /// after one that succeeded. Done only when netlab says so: exit 0 and no fatal error in
    /// its output. On success the caller removes the directory; on failure it must keep it
    /// (it holds `clab.yml` and the snapshot, which netlab and containerlab need to finish
    /// by hand).
    ///
    /// Without netlab's snapshot, netlab is skipped only when it says there is nothing: no
    /// instance registered in `work_dir` and no `clab.yml`. Otherwise `netlab down` runs (and
    /// fails, as netlab cannot load the lab), and where `clab.yml` is left,
    /// `containerlab destroy` removes the containers; its success is what lets the
    /// directory go.
    pub fn tear_down(
        &self,
        work_dir: &Path,
        force: bool,
        instance: Option<u16>,
    ) -> Result<(), NetlabError> {
        if !work_dir.is_dir() {
            // Nothing left here to run netlab or containerlab in. A registration of netlab's
            // pointing at it is dropped where `default` is cleared (`Cannot change directory`).
            return Ok(());
        }
        let has_snapshot = work_dir.join(SNAPSHOT).exists();
        let has_clab = work_dir.join(CLAB_FILE).exists();
        if !has_snapshot && !has_clab {
            match self.instance_in(work_dir) {
                Ok(None) => return Ok(()),
                Ok(Some(id)) => log::warn!(
                    "netlab instance '{id}' is registered in {} but its snapshot is gone",
                    work_dir.display()
                ),
                // Cannot tell: `down` below decides, and its failure keeps the directory.
                Err(e) => log::warn!("cannot ask netlab about {}: {e}", work_dir.display()),
            }
        }
        let id = instance.map(|id| id.to_string());
        let args: Vec<&str> = match (force, &id) {
            (true, _) => vec!["down", "--cleanup", "--force"],
            (false, Some(id)) => vec!["down", "--instance", id, "--cleanup"],
            (false, None) => vec!["down", "--cleanup"],
        };
        let down = self.run_done(&args, work_dir, Run::new(DOWN_TIMEOUT));
        match down {
            Ok(_) => Ok(()),
            Err(e) if !has_snapshot && has_clab => {
                log::warn!(
                    "netlab cannot tear down the lab in {} (its snapshot is gone): \
                     destroying its containers with containerlab",
                    work_dir.display()
                );
                self.containerlab_destroy(work_dir)
                    .map_err(|clab| NetlabError::Failed {
                        command: args.join(" "),
                        exit: "then containerlab destroy failed too".into(),
                        output: format!("{e}\n{clab}"),
                    })
            }
            Err(e) => Err(e),
        }
    }

    /// The id of the instance netlab registers in `dir`, if any.
    fn instance_in(&self, dir: &Path) -> Result<Option<String>, NetlabError> {
        let cwd = dir.parent().unwrap_or(dir);
        Ok(self
            .instances(cwd)?
            .into_iter()
            .find(|(_, registered)| registered == dir)
            .map(|(id, _)| id))
    }

    /// `containerlab destroy --cleanup -t clab.yml` in `work_dir`, as netlab runs it, in its
    /// own process group with a timeout; its output goes to the live log.
    fn containerlab_destroy(&self, work_dir: &Path) -> Result<(), String> {
        let args = ["destroy", "--cleanup", "-t", CLAB_FILE];
        let command = format!("{} {}", self.containerlab.display(), args.join(" "));
        if let Some(live) = &self.live {
            live.append(format!("$ {command}\n").as_bytes());
        }
        let mut run = Run::new(DOWN_TIMEOUT).keep(STDOUT_LIMIT, STDERR_TAIL);
        if let Some(hook) = self.line_hook(self.live.clone()) {
            run = run.on_line(hook);
        }
        let out = run
            .run(
                Command::new(&self.containerlab)
                    .args(args)
                    .current_dir(work_dir)
                    .env("COLUMNS", "1000"),
            )
            .map_err(|e| format!("cannot run `{command}`: {e}"))?;
        if out.timed_out {
            return Err(format!(
                "`{command}` timed out after {} s",
                DOWN_TIMEOUT.as_secs()
            ));
        }
        if !out.success() {
            return Err(format!(
                "`{command}` failed ({}): {}",
                out.exit(),
                output_tail(&out)
            ));
        }
        log::info!("{command} in {} done", work_dir.display());
        Ok(())
    }
}

/// The expression `netlab inspect --format json` evaluates (with the lab's topology as its
/// names) to list every node as `[name, data]`, in netlab's order, where `data` is what
/// `netlab inspect --node NAME` computes for one node: the node as the Ansible inventory
/// shows it, group variables included, plus `_netlab_version`. netlab splits its output
/// argument at `=` and `:`, so the expression uses neither (positional arguments, a dict
/// built from a list of pairs).
const ALL_NODES: &str = "__import__('box').BoxList([[n, \
    __import__('netsim.outputs.common').outputs.common.adjust_inventory_host(\
    nodes[n], defaults, None, None, True) \
    + dict([['_netlab_version', _netlab_version]])] for n in nodes])";

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
            status: Some(std::process::ExitStatus::from_raw(code << 8)),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            timed_out: false,
            cancelled: false,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn no_managed_labs_is_an_answer_not_a_failure() {
        let none = output(1, "{\"warning\": \"No netlab-managed labs\"}\n", "");
        assert!(says_nothing_runs("status", &none));
        assert!(!says_nothing_runs("down", &none));
        assert!(!says_nothing_runs("status", &output(1, "", "boom\n")));
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

    /// What makes a host unhealthy: everything but the topology's fault and a shutdown.
    #[test]
    fn only_failures_not_the_topologys_count_against_the_host() {
        let deploy = output(
            1,
            "provider clab: executing containerlab deploy --reconfigure -t clab.yml\n",
            "Fatal error in netlab up: containerlab deploy --reconfigure -t clab.yml failed, aborting...\n",
        );
        assert!(classify_up_failure(&deploy).counts_against_host());
        let rejected = classify_up_failure(&output(1, "", "Unknown device xyz\n"));
        assert!(!rejected.counts_against_host());
        assert!(!NetlabError::Cancelled.counts_against_host());
        let timeout = NetlabError::TimedOut {
            command: "up".into(),
            after: Duration::from_secs(1),
        };
        assert!(timeout.counts_against_host());
        let in_the_way = classify_up_failure(&output(
            1,
            "lab instance 'default' is already running in directory /x\n",
            "",
        ));
        assert!(in_the_way.counts_against_host());
    }
}
