//! The event history: every change that matters (sessions created, promoted, ended; lab
//! starts, reuses, failures, releases, teardowns; server start and stop) as one JSON object
//! with an increasing id and a timestamp.
//!
//! The newest [`MEMORY`] events are kept in memory for `GET /events` and the status page.
//! Each is also appended to `<state dir>/events.jsonl` by a writer thread of its own, so that
//! recording an event costs its caller a short lock and a channel send, never a disk write
//! (events are recorded while the state lock is held). The file is not fsynced per event; at
//! [`ROTATE_BYTES`] it is renamed to `events.jsonl.1` (replacing the older one) and a new one
//! begins. At start-up the history is read back from both files.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::observe::metrics::METRICS;

pub const EVENTS_FILE: &str = "events.jsonl";
/// Events kept in memory.
pub const MEMORY: usize = 10_000;
/// Size at which the event file is rotated (the hidden `NEOPS_REMOTE_LAB_EVENTS_ROTATE_BYTES`
/// overrides it, for tests).
pub const ROTATE_BYTES: u64 = 8 * 1024 * 1024;
/// Most events one `GET /events` returns.
pub const MAX_LIMIT: usize = MEMORY;

/// One recorded event: its id and its JSON text.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: u64,
    /// The event as one JSON object.
    pub json: Box<RawValue>,
}

enum Write_ {
    Line(Box<RawValue>),
    /// Answered once every line sent before it has been written (or failed).
    Flush(Sender<()>),
    Stop,
}

struct Inner {
    next_id: u64,
    recent: VecDeque<Event>,
}

pub struct EventLog {
    inner: Mutex<Inner>,
    tx: Sender<Write_>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds as seconds, for JSON.
pub fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The 8-character prefix of a session id, the only form lists show.
pub fn prefix(id: &uuid::Uuid) -> String {
    let mut buf = [0u8; 36];
    id.hyphenated().encode_lower(&mut buf)[..8].to_owned()
}

/// The fields that say which session an event is about: its id prefix and its client's name
/// (and the owner's name, once sessions have owners).
pub fn who(id: &uuid::Uuid, client: Option<&str>, owner: Option<&str>) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("session".into(), prefix(id).into());
    map.insert("client".into(), client.into());
    if let Some(owner) = owner {
        map.insert("owner".into(), owner.into());
    }
    map
}

/// `who` plus more fields.
pub fn with(mut map: Map<String, Value>, more: Value) -> Value {
    if let Value::Object(more) = more {
        map.extend(more);
    }
    Value::Object(map)
}

impl EventLog {
    /// Reads the history back from `dir` and starts the writer thread.
    pub fn open(dir: &Path) -> EventLog {
        let rotate = std::env::var("NEOPS_REMOTE_LAB_EVENTS_ROTATE_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(ROTATE_BYTES);
        Self::open_with(dir, rotate)
    }

    pub fn open_with(dir: &Path, rotate_bytes: u64) -> EventLog {
        let path = dir.join(EVENTS_FILE);
        let mut recent = VecDeque::new();
        let mut last = 0;
        for file in [rotated(&path), path.clone()] {
            read_into(&file, &mut recent, &mut last);
        }
        let (tx, rx) = unbounded();
        let writer = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || write_loop(&path, rotate_bytes, &rx))
            .map_err(|e| log::error!("cannot start the event writer: {e}"))
            .ok();
        EventLog {
            inner: Mutex::new(Inner {
                next_id: last + 1,
                recent,
            }),
            tx,
            writer: Mutex::new(writer),
        }
    }

    /// Records an event of `kind` with `fields` (an object; other values are ignored).
    pub fn emit(&self, kind: &str, fields: Value) {
        let time = secs(now_ms());
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let id = inner.next_id;
        inner.next_id += 1;
        // id, time and kind first, for people reading the file.
        #[derive(Serialize)]
        struct Line<'a> {
            id: u64,
            time: f64,
            kind: &'a str,
            #[serde(flatten)]
            fields: &'a Map<String, Value>,
        }
        let none = Map::new();
        let fields = match &fields {
            Value::Object(fields) => fields,
            _ => &none,
        };
        let line = Line {
            id,
            time,
            kind,
            fields,
        };
        let Ok(json) = serde_json::value::to_raw_value(&line) else {
            return;
        };
        if inner.recent.len() >= MEMORY {
            inner.recent.pop_front();
        }
        inner.recent.push_back(Event {
            id,
            json: json.clone(),
        });
        drop(inner);
        let _ = self.tx.send(Write_::Line(json));
    }

    /// Event ids go on above `floor` (the newest id the state file recorded), whatever the
    /// event files hold. Ids must never be given twice (`GET /events?since=ID` would skip
    /// the second ones), but a full disk can lose the file's last lines while the state
    /// file, written on every change, still recorded how far ids had gone; so the next id
    /// is above the greater of the two. Lines lost after the state file's last write (both
    /// files failing) cannot be known of.
    pub fn start_above(&self, floor: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next_id = inner.next_id.max(floor.saturating_add(1));
    }

    /// The id of the newest event (0 when there is none).
    pub fn last_id(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).next_id - 1
    }

    /// Up to `limit` events with an id above `since`, newest first.
    pub fn newest(&self, limit: usize, since: u64) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .recent
            .iter()
            .rev()
            .take_while(|e| e.id > since)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Waits, at most `limit`, until every event recorded so far has been written to the file
    /// (or failed to be); whether that happened in time. For a process about to exit at
    /// once: the writer thread does not outlive it.
    pub fn flush(&self, limit: Duration) -> bool {
        let (done_tx, done_rx) = bounded(1);
        if self.tx.send(Write_::Flush(done_tx)).is_err() {
            // The writer has stopped: nothing is queued any more.
            return true;
        }
        match done_rx.recv_timeout(limit) {
            Ok(()) => true,
            Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        }
    }

    /// Writes what is queued and stops the writer (at the end of a shutdown).
    pub fn close(&self) {
        let _ = self.tx.send(Write_::Stop);
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Appends the events of `file` (one JSON object a line; bad lines are skipped).
fn read_into(file: &Path, recent: &mut VecDeque<Event>, last: &mut u64) {
    let Ok(f) = File::open(file) else { return };
    for line in BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let Some(id) = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_u64))
        else {
            continue;
        };
        if id <= *last {
            continue;
        }
        *last = id;
        if recent.len() >= MEMORY {
            recent.pop_front();
        }
        let Ok(json) = RawValue::from_string(line) else {
            continue;
        };
        recent.push_back(Event { id, json });
    }
}

fn open_append(path: &Path) -> Result<(File, u64), std::io::Error> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let size = f.metadata().map_or(0, |m| m.len());
    Ok((f, size))
}

/// How often a failing event file is reported while it keeps failing.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// The event file's failures, reported once and then at most once a [`REPORT_EVERY`] with
/// a count, so that a full disk does not flood the log with a line per event.
struct Failures {
    /// Lines not written since the last report.
    lost: u64,
    reported: Option<Instant>,
}

impl Failures {
    fn failed(&mut self, path: &Path, what: &str, e: &std::io::Error) {
        self.lost += 1;
        METRICS.event_not_written();
        if self.reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            log::error!(
                "cannot {what} {}: {e}; {} event line{} not written (reported again at most \
                 once a minute)",
                path.display(),
                self.lost,
                if self.lost == 1 { "" } else { "s" }
            );
            self.reported = Some(Instant::now());
            self.lost = 0;
        }
    }

    fn written(&mut self, path: &Path) {
        if self.reported.take().is_some() {
            log::warn!(
                "{} is written again; {} more event lines were not written",
                path.display(),
                self.lost
            );
            self.lost = 0;
        }
    }
}

fn write_loop(path: &Path, rotate_bytes: u64, rx: &Receiver<Write_>) {
    let mut file: Option<(File, u64)> = None;
    let mut failures = Failures {
        lost: 0,
        reported: None,
    };
    let mut buf = Vec::new();
    loop {
        let line = match rx.recv() {
            Ok(Write_::Line(line)) => line,
            Ok(Write_::Flush(done)) => {
                // Each line is one write to an unbuffered file: written lines are in the
                // kernel's hands already.
                let _ = done.send(());
                continue;
            }
            Ok(Write_::Stop) | Err(_) => return,
        };
        if file.as_ref().is_some_and(|(_, size)| *size >= rotate_bytes) {
            file = None;
            if let Err(e) = fs::rename(path, rotated(path)) {
                failures.failed(path, "rotate", &e);
            }
        }
        if file.is_none() {
            match open_append(path) {
                Ok(f) => file = Some(f),
                Err(e) => {
                    failures.failed(path, "open", &e);
                    continue;
                }
            }
        }
        let Some((f, size)) = file.as_mut() else {
            continue;
        };
        // One write a line, so that a reader never sees half of one; a write that fails
        // part-way (full disk) is cut off again, so the next line starts on a line of its own.
        buf.clear();
        buf.extend_from_slice(line.get().as_bytes());
        buf.push(b'\n');
        match f.write_all(&buf) {
            Ok(()) => {
                *size += buf.len() as u64;
                failures.written(path);
            }
            Err(e) => {
                if f.set_len(*size).is_err() {
                    file = None;
                }
                failures.failed(path, "append to", &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn ids_start_above_the_state_files_and_the_event_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), ROTATE_BYTES);
        for n in 0..3 {
            log.emit("x", json!({ "n": n }));
        }
        log.close();
        // The state file recorded more than the event file holds: above the state file's.
        let log = EventLog::open_with(dir.path(), ROTATE_BYTES);
        log.start_above(7);
        log.emit("x", json!({}));
        assert_eq!(ids(&log.newest(10, 0)), [8, 3, 2, 1]);
        log.close();
        // It recorded less (written before the last events): above the event file's.
        let log = EventLog::open_with(dir.path(), ROTATE_BYTES);
        log.start_above(5);
        assert_eq!(log.last_id(), 8);
        log.emit("x", json!({}));
        assert_eq!(log.newest(1, 0)[0].id, 9);
        log.close();
    }

    /// A full disk (`/dev/full` behind the event file) loses lines, counts them, and reports
    /// them once and then at most once a minute, not once a line.
    #[test]
    fn a_full_disk_is_reported_once_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let before = METRICS.events_not_written();
        let log = EventLog::open_with(dir.path(), ROTATE_BYTES);
        // After the open (which reads the history back): the writer opens it at its first line.
        std::os::unix::fs::symlink("/dev/full", dir.path().join(EVENTS_FILE)).unwrap();
        for n in 0..200 {
            log.emit("x", json!({ "n": n }));
        }
        log.close();
        assert!(METRICS.events_not_written() - before >= 200);
        assert_eq!(
            log.newest(1, 0)[0].id,
            200,
            "memory keeps them all the same"
        );

        let mut failures = Failures {
            lost: 0,
            reported: None,
        };
        let e = std::io::Error::from_raw_os_error(28);
        for _ in 0..1000 {
            failures.failed(Path::new("x"), "append to", &e);
        }
        assert_eq!(
            failures.lost, 999,
            "one report, the rest counted for the next"
        );
        failures.reported = Some(Instant::now() - REPORT_EVERY);
        failures.failed(Path::new("x"), "append to", &e);
        assert_eq!(failures.lost, 0, "reported again after a minute");
    }

    /// What a process exiting at once relies on: when `flush` returns, every event recorded
    /// before it is a line in the file, while the writer keeps running.
    #[test]
    fn a_flush_returns_once_every_recorded_event_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), ROTATE_BYTES);
        for round in 1..=3 {
            for n in 0..2000 {
                log.emit("x", json!({ "n": n }));
            }
            assert!(log.flush(Duration::from_secs(30)));
            let text = fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
            assert_eq!(text.lines().count(), round * 2000);
            let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(last["id"], round * 2000);
        }
        log.close();
        // A stopped writer has nothing queued: a flush does not wait.
        assert!(log.flush(Duration::from_secs(30)));
    }

    #[test]
    fn newest_first_with_since_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), ROTATE_BYTES);
        for n in 0..5 {
            log.emit("x", json!({ "n": n }));
        }
        assert_eq!(ids(&log.newest(10, 0)), vec![5, 4, 3, 2, 1]);
        assert_eq!(ids(&log.newest(2, 0)), vec![5, 4]);
        assert_eq!(ids(&log.newest(10, 3)), vec![5, 4]);
        assert_eq!(ids(&log.newest(10, 5)), Vec::<u64>::new());
        let v: Value = serde_json::from_str(log.newest(1, 0)[0].json.get()).unwrap();
        assert_eq!(v["kind"], "x");
        assert_eq!(v["n"], 4);
        log.close();
    }

    #[test]
    fn history_survives_a_reopen_and_the_file_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), 300);
        for n in 0..20 {
            log.emit("filler", json!({ "n": n, "pad": "p".repeat(40) }));
        }
        log.close();
        let main = dir.path().join(EVENTS_FILE);
        let old = dir.path().join("events.jsonl.1");
        assert!(old.exists(), "rotated file missing");
        assert!(fs::metadata(&main).unwrap().len() < 300 + 200);
        // Only one older file is kept.
        assert!(!dir.path().join("events.jsonl.2").exists());
        let log = EventLog::open_with(dir.path(), 300);
        let back = log.newest(100, 0);
        // Whatever both files still hold comes back, newest first, ids continuing.
        assert_eq!(back[0].id, 20);
        let got = ids(&back);
        assert!(got.windows(2).all(|w| w[0] == w[1] + 1), "{got:?}");
        assert!(
            got.len() < 20,
            "older events were dropped by the rotation: {got:?}"
        );
        log.emit("after", json!({}));
        assert_eq!(log.last_id(), 21);
        log.close();
    }
}
