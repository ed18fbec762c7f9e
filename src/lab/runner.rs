//! Runs one command and waits for it, within bounds: the command leads its own process
//! group (a [`GroupChild`]), so a timeout or a cancel kills the whole tree it started and
//! nothing else; stdout and stderr are captured up to a bound each (the head of stdout, the
//! tail of stderr); stdin is /dev/null or a short answer; a hook sees the output line by line
//! as it comes. Nothing here knows what the command is.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded};
use rustix::process::Signal;

use crate::lab::procgroup::GroupChild;

/// How often a running command looks at the cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// Longest piece of a line handed to the hook and kept at once (an endless line cannot grow
/// memory).
const LINE_PIECE: u64 = 64 * 1024;

/// Sees each line of output (stdout and stderr alike, with its line break) as it comes.
pub type LineHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What a command left behind.
#[derive(Debug)]
pub struct Output {
    /// `None` when the exit could not be waited for.
    pub status: Option<ExitStatus>,
    /// The first bytes of stdout, up to the bound.
    pub stdout: Vec<u8>,
    /// The last bytes of stderr, up to the bound.
    pub stderr: Vec<u8>,
    /// Killed for running past the timeout.
    pub timed_out: bool,
    /// Killed because the cancel flag was set.
    pub cancelled: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit code 1", "killed by signal 9".
    pub fn exit(&self) -> String {
        match self.status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "unknown exit".to_owned(),
            },
            None => "no exit status".to_owned(),
        }
    }

    pub fn stdout_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    pub fn stderr_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }
}

/// How to run a command: its bounds and hooks. [`Run::run`] runs it.
pub struct Run<'a> {
    timeout: Duration,
    stdin: Option<&'a [u8]>,
    cancel: Option<&'a AtomicBool>,
    spawned: Option<&'a dyn Fn(u32)>,
    on_line: Option<LineHook>,
    stdout_head: usize,
    stderr_tail: usize,
    drain_grace: Duration,
}

impl<'a> Run<'a> {
    /// Kills the command after `timeout`; keeps 4 MiB of stdout and 64 KiB of stderr; reads
    /// output for at most 2 s after the command exited (a process that left the group can
    /// hold the pipes open, and is not waited for).
    pub fn new(timeout: Duration) -> Self {
        Run {
            timeout,
            stdin: None,
            cancel: None,
            spawned: None,
            on_line: None,
            stdout_head: 4 * 1024 * 1024,
            stderr_tail: 64 * 1024,
            drain_grace: Duration::from_secs(2),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Feeds `input` to the command's stdin (else it reads /dev/null). Meant for short
    /// answers such as `y\n`: it must fit the pipe's buffer.
    pub fn stdin(mut self, input: &'a [u8]) -> Self {
        self.stdin = Some(input);
        self
    }

    /// Kills the command, like a timeout does, once `flag` is set.
    pub fn cancel(mut self, flag: &'a AtomicBool) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Calls `hook` with the command's process group id as soon as it runs.
    pub fn on_spawn(mut self, hook: &'a dyn Fn(u32)) -> Self {
        self.spawned = Some(hook);
        self
    }

    pub fn on_line(mut self, hook: LineHook) -> Self {
        self.on_line = Some(hook);
        self
    }

    /// Keeps the first `stdout_head` bytes of stdout and the last `stderr_tail` of stderr.
    pub fn keep(mut self, stdout_head: usize, stderr_tail: usize) -> Self {
        self.stdout_head = stdout_head;
        self.stderr_tail = stderr_tail;
        self
    }

    /// How long output is still read after the command exited.
    #[cfg(test)]
    fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// Runs `command` (its stdin, stdout and stderr are set here) and waits for it to exit
    /// or to be killed. Fails only when it cannot be started.
    pub fn run(self, command: &mut Command) -> io::Result<Output> {
        command
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = GroupChild::spawn(command)?;
        if let Some(spawned) = self.spawned {
            spawned(child.id());
        }
        let (child_stdin, child_stdout, child_stderr) = child.take_pipes();
        if let (Some(input), Some(mut pipe)) = (self.stdin, child_stdin) {
            // An error means it exited already, or closed its stdin: nothing to do.
            let _ = pipe.write_all(input);
        }
        let stdout = capture(
            child_stdout,
            Keep::Head(self.stdout_head),
            self.on_line.clone(),
        );
        let stderr = capture(child_stderr, Keep::Tail(self.stderr_tail), self.on_line);

        let group = child.handle();
        // A waiter thread blocks in wait(), so an exit is seen at once; this thread wakes up
        // now and then to check the timeout and the cancel flag.
        let (exited_tx, exited) = bounded(1);
        thread::Builder::new()
            .name("runner-wait".into())
            .spawn(move || {
                let _ = exited_tx.send(child.wait().ok());
            })?;
        let mut timed_out = false;
        let mut cancelled = false;
        let status = loop {
            let left = self.timeout.saturating_sub(started.elapsed());
            match exited.recv_timeout(left.min(CANCEL_CHECK)) {
                Ok(status) => break status,
                Err(RecvTimeoutError::Disconnected) => break None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if started.elapsed() >= self.timeout {
                timed_out = true;
            } else if self.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                cancelled = true;
            }
            if timed_out || cancelled {
                // The handle signals the group only while its leader is unreaped.
                if let Err(e) = group.signal(Signal::KILL) {
                    log::error!(
                        "cannot kill {} (group {}): {e}",
                        command.get_program().to_string_lossy(),
                        group.pgid()
                    );
                }
                break exited.recv().ok().flatten();
            }
        };
        let deadline = Instant::now() + self.drain_grace;
        Ok(Output {
            status,
            stdout: stdout.collect(deadline),
            stderr: stderr.collect(deadline),
            timed_out,
            cancelled,
            elapsed: started.elapsed(),
        })
    }
}

/// Which part of a stream is kept.
enum Keep {
    Head(usize),
    Tail(usize),
}

/// A pipe being read on its own thread.
struct Capture {
    done: Option<Receiver<Vec<u8>>>,
}

impl Capture {
    /// The bytes kept, waiting at most until `deadline` for the pipe to close.
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
    keep: Keep,
    on_line: Option<LineHook>,
) -> Capture {
    let Some(pipe) = pipe else {
        return Capture { done: None };
    };
    let (tx, rx) = bounded(1);
    let spawned = thread::Builder::new()
        .name("runner-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut kept: VecDeque<u8> = VecDeque::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut reader).take(LINE_PIECE).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(hook) = &on_line {
                    hook(&line);
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
    use std::sync::Mutex;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script]);
        command
    }

    const LONG: Duration = Duration::from_secs(30);

    /// Whether `pid` runs (a zombie does not count).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next();
            !matches!(state, Some("Z" | "X" | "x"))
        })
    }

    fn wait_gone(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline, "process {pid} survived");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn exit_codes_signals_and_both_outputs() {
        let out = Run::new(LONG)
            .run(&mut sh("echo out; echo err >&2; exit 3"))
            .unwrap();
        assert_eq!(out.status.unwrap().code(), Some(3));
        assert!(!out.success() && !out.timed_out && !out.cancelled);
        assert_eq!(out.exit(), "exit code 3");
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr_text(), "err\n");

        let out = Run::new(LONG).run(&mut sh("true")).unwrap();
        assert!(out.success());
        assert_eq!(out.exit(), "exit code 0");

        let out = Run::new(LONG).run(&mut sh("kill -9 $$")).unwrap();
        assert_eq!(out.exit(), "killed by signal 9");
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error() {
        let err = Run::new(LONG)
            .run(&mut Command::new("/nonexistent/program"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn output_is_bounded_head_of_stdout_tail_of_stderr() {
        let out = Run::new(LONG)
            .keep(10, 10)
            .run(&mut sh(
                "i=0; while [ $i -lt 2000 ]; do echo line$i; echo err$i >&2; i=$((i+1)); done",
            ))
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, b"line0\nline");
        assert_eq!(out.stderr, b"8\nerr1999\n");
        // One endless line is read in pieces, and kept within the bound too.
        let out = Run::new(LONG)
            .keep(100, 100)
            .run(&mut sh("head -c 3000000 /dev/zero | tr '\\0' x"))
            .unwrap();
        assert_eq!(out.stdout.len(), 100);
    }

    #[test]
    fn stdin_is_fed_or_empty() {
        let out = Run::new(LONG)
            .stdin(b"y\n")
            .run(&mut sh("read answer; echo got $answer"))
            .unwrap();
        assert_eq!(out.stdout, b"got y\n");
        let out = Run::new(LONG).run(&mut sh("cat; echo end")).unwrap();
        assert_eq!(out.stdout, b"end\n");
    }

    #[test]
    fn the_hooks_see_the_group_and_every_line() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&lines);
        let group = Mutex::new(None);
        let out = Run::new(LONG)
            .on_spawn(&|pgid| *group.lock().unwrap() = Some(pgid))
            .on_line(Arc::new(move |line: &[u8]| {
                seen.lock().unwrap().push(line.to_vec())
            }))
            .run(&mut sh("echo a; echo b >&2; echo $$"))
            .unwrap();
        let mut lines = lines.lock().unwrap().clone();
        lines.sort();
        let pid = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_owned();
        assert_eq!(group.lock().unwrap().unwrap().to_string(), pid);
        let mut want = vec![
            b"a\n".to_vec(),
            b"b\n".to_vec(),
            format!("{pid}\n").into_bytes(),
        ];
        want.sort();
        assert_eq!(lines, want);
    }

    /// The shell starts a sleeper in its group and prints its pid; the run must kill both.
    const TREE: &str = "sleep 300 & echo $!; wait";

    fn grandchild(out: &Output) -> u32 {
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn a_timeout_kills_the_whole_group() {
        // Long enough for the shell to start its sleeper on a loaded machine.
        let out = Run::new(Duration::from_secs(2)).run(&mut sh(TREE)).unwrap();
        assert!(out.timed_out && !out.cancelled);
        assert_eq!(out.exit(), "killed by signal 9");
        assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
        wait_gone(grandchild(&out));
    }

    #[test]
    fn the_cancel_flag_kills_the_whole_group() {
        // Set once the sleeper's pid is out, so both processes exist when it is seen.
        let flag = Arc::new(AtomicBool::new(false));
        let set = Arc::clone(&flag);
        let out = Run::new(LONG)
            .cancel(&flag)
            .on_line(Arc::new(move |_: &[u8]| set.store(true, Ordering::SeqCst)))
            .run(&mut sh(TREE))
            .unwrap();
        assert!(out.cancelled && !out.timed_out);
        assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
        wait_gone(grandchild(&out));
    }

    #[test]
    fn a_process_that_left_the_group_is_not_waited_for() {
        // `setsid` puts the sleeper in a session (and group) of its own, holding stdout.
        let out = Run::new(LONG)
            .drain_grace(Duration::from_millis(200))
            .run(&mut sh("setsid sleep 10 & echo started"))
            .unwrap();
        assert!(out.success());
        assert!(out.elapsed < Duration::from_secs(8), "{:?}", out.elapsed);
        // What came before the grace ran out is lost with the pipe: only the exit counts.
        assert!(out.stdout.is_empty() || out.stdout == b"started\n");
    }
}
