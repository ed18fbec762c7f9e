//! The state file, `<state dir>/state.json`: everything a restart needs (sessions in queue
//! order, the lab record, a start in progress, pending teardowns), so that a restart, a crash
//! or a package upgrade does not throw the queue away or orphan the lab.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory) and happen
//! before the client gets the answer for the change. Concurrent changes share one write
//! (group commit): whoever finds no write in progress writes a snapshot that includes every
//! change made so far, and everyone whose change it covers returns.
//!
//! Why one file of this size: over a third of it is tests of the file's format, old layouts
//! included.

use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::lab::record::{self, LabRecord, Teardown};
use crate::observe::metrics::METRICS;
use crate::store::session::{SessionId, SessionRecord};

pub const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u64 = 1;

/// A start in progress (`netlab up` running): cleaned up if the server dies meanwhile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Starting {
    #[serde(with = "session_id")]
    pub session: SessionId,
    #[serde(serialize_with = "record::path_text")]
    pub work_dir: PathBuf,
    /// The process group of the running `netlab up`, once it is started: a restart after a
    /// crash kills what is left of it.
    #[serde(default)]
    pub pgid: Option<u32>,
    /// netlab's multilab instance id of the start; `None`: `default` (one slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u16>,
}

/// A lab slot after the first, as the state file keeps it (the first slot's fields are the
/// file's own `lab`, `holder`, `starting`, …, as they were before there were slots). Only
/// slots with a lab or a start are written.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The slot's number (1 is the first), for whoever reads the file; a restart goes by
    /// the netlab instance of the lab or start.
    pub slot: usize,
    #[serde(default)]
    pub lab: Option<LabRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab_started_ms: Option<u64>,
    /// The session whose slot this is.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "holder")]
    pub holder: Option<SessionId>,
    /// Unix ms the lab was last acquired or released.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_used_ms: u64,
    #[serde(default)]
    pub starting: Option<Starting>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The holder of a slot's lab in the file: a session id, or nothing.
mod holder {
    use super::*;

    pub fn serialize<S: Serializer>(id: &Option<SessionId>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => session_id::serialize(id, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SessionId>, D::Error> {
        #[derive(Deserialize)]
        struct Id(#[serde(with = "session_id")] SessionId);
        Ok(Option::<Id>::deserialize(d)?.map(|Id(id)| id))
    }
}

/// The durable part of the state, as the state file holds it. The writer keeps one and
/// refills it under the state lock, so a queue of thousands does not churn the allocator on
/// every write; a start reads one back from the file.
///
/// Fields a file written before they existed lacks take their defaults; fields this
/// version does not know are ignored. The file is one line of compact JSON, and `lab`,
/// `starting` and `teardowns` come last, in that order: a file that records no lab (nor a
/// start in progress, nor a pending teardown) ends with
/// `,"lab":null,"starting":null,"teardowns":[]}`, which is what the package's postrm looks
/// for. Those are the top-level fields for sure: no string in compact JSON holds a bare
/// quote, and the file ends where the top-level object does.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// The state's version this is a copy of (in memory only).
    #[serde(skip)]
    pub state_version: u64,
    /// The file's format.
    #[serde(rename = "version")]
    pub format: Format,
    /// Sessions in queue order (the first is the ACTIVE one).
    #[serde(with = "session_list")]
    pub sessions: Vec<SessionRecord>,
    /// Unix ms the lab came up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab_started_ms: Option<u64>,
    /// The session whose lab it is (the first slot's).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "holder")]
    pub holder: Option<SessionId>,
    /// Unix ms the first slot's lab was last acquired or released.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_used_ms: u64,
    /// The other slots that have a lab or a start (`--slots` above 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<SlotRecord>,
    /// The id of the newest event when the file was written: event ids after a restart
    /// start above it even when the event file lost its last lines (see `EventLog`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub event_id: u64,
    /// The first slot's lab. This and the next two fields end the file: the package's
    /// postrm reads the file's end to tell whether it records a lab.
    #[serde(default)]
    pub lab: Option<LabRecord>,
    /// The first slot's start in progress.
    #[serde(default)]
    pub starting: Option<Starting>,
    #[serde(default)]
    pub teardowns: Vec<Teardown>,
}

/// The file's `version`: [`FORMAT_VERSION`] is written, and a file of any other is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Format;

impl Serialize for Format {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(FORMAT_VERSION)
    }
}

impl<'de> Deserialize<'de> for Format {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            FORMAT_VERSION => Ok(Format),
            other => Err(D::Error::custom(format!("unknown format version {other}"))),
        }
    }
}

/// A session id in the file: the lower-case hyphenated spelling the clients see, and only
/// that one.
mod session_id {
    use super::*;
    use crate::store::session::parse_session_id;

    pub fn serialize<S: Serializer>(id: &SessionId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut [0u8; 36]))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        parse_session_id(&text).ok_or_else(|| D::Error::custom("not a valid session id"))
    }
}

/// The session list: one flat entry per session, in queue order, with its status.
mod session_list {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;
    use crate::store::session::ClientInfo;

    /// A session entry as the file spells it. Optional fields are left out when absent, so
    /// the file of a deep queue stays small.
    #[derive(Serialize, Deserialize)]
    struct Entry<'a> {
        #[serde(with = "session_id")]
        id: SessionId,
        /// `active` or `waiting`. A file written before several sessions could be ACTIVE
        /// says `active` for its first entry only; one without statuses gets its ACTIVE
        /// sessions in queue order.
        #[serde(default)]
        status: Cow<'a, str>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Cow<'a, str>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Cow<'a, str>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        addr: Option<Cow<'a, str>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_agent: Option<Cow<'a, str>>,
        #[serde(default)]
        created_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        active_since_ms: Option<u64>,
        /// The declared topology's hash, 64 hexadecimal digits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        declared: Option<Cow<'a, str>>,
        #[serde(default, skip_serializing_if = "is_zero")]
        skips: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ahead: bool,
    }

    fn is_zero(n: &u32) -> bool {
        *n == 0
    }

    pub fn serialize<S: Serializer>(records: &[SessionRecord], s: S) -> Result<S::Ok, S::Error> {
        fn borrowed(text: &Option<String>) -> Option<Cow<'_, str>> {
            text.as_deref().map(Cow::Borrowed)
        }
        s.collect_seq(records.iter().map(|r| Entry {
            id: r.id,
            status: Cow::Borrowed(if r.active { "active" } else { "waiting" }),
            owner: r.owner.as_deref().map(Cow::Borrowed),
            name: borrowed(&r.info.name),
            addr: borrowed(&r.info.addr),
            user_agent: borrowed(&r.info.user_agent),
            created_ms: r.info.created_ms,
            active_since_ms: r.active_since_ms,
            declared: r.info.declared.as_ref().map(|h| Cow::Owned(record::hex(h))),
            skips: r.skips,
            ahead: r.ahead,
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SessionRecord>, D::Error> {
        let entries = Vec::<Entry<'static>>::deserialize(d)?;
        let mut seen = HashSet::with_capacity(entries.len());
        let mut records = Vec::with_capacity(entries.len());
        for entry in entries {
            if !seen.insert(entry.id) {
                return Err(D::Error::custom(format!(
                    "session {} listed twice",
                    entry.id
                )));
            }
            let owner = entry.owner.map(Cow::into_owned);
            let declared = match entry.declared {
                None => None,
                Some(text) => Some(record::parse_hex(&text).ok_or_else(|| {
                    D::Error::custom(format!(
                        "session {}: declared is not 64 hex digits",
                        entry.id
                    ))
                })?),
            };
            records.push(SessionRecord {
                id: entry.id,
                owner: owner.as_deref().map(Arc::from),
                info: Arc::new(ClientInfo {
                    name: entry.name.map(Cow::into_owned),
                    addr: entry.addr.map(Cow::into_owned),
                    user_agent: entry.user_agent.map(Cow::into_owned),
                    created_ms: entry.created_ms,
                    owner,
                    declared,
                }),
                active_since_ms: entry.active_since_ms,
                skips: entry.skips,
                ahead: entry.ahead,
                active: entry.status == "active",
            });
        }
        Ok(records)
    }
}

impl Snapshot {
    /// The file's text, into `out` (cleared first; its buffer is reused). Devices go in as
    /// the API serves them, byte for byte.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.clear();
        serde_json::to_writer(&mut *out, self)?;
        out.push(b'\n');
        Ok(())
    }
}

/// Decodes the file's text.
fn parse(text: &str) -> serde_json::Result<Snapshot> {
    serde_json::from_str(text)
}

/// Why the state file cannot be used.
#[derive(Debug)]
pub enum Unusable {
    /// It could not be read (permissions, an I/O error).
    Unreadable(io::Error),
    /// Its text is not a state file of this format.
    Corrupt(serde_json::Error),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Unreadable(e) => e.fmt(f),
            Unusable::Corrupt(e) => e.fmt(f),
        }
    }
}

/// A state file that could not be used: it was moved aside (when that worked), and the
/// server starts clean.
#[derive(Debug)]
pub struct LoadError {
    pub path: PathBuf,
    pub cause: Unusable,
    /// Where the file was moved, or why it could not be.
    pub kept_as: io::Result<PathBuf>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, why) = (self.path.display(), &self.cause);
        match &self.kept_as {
            Ok(aside) => write!(
                f,
                "state file {path} is unusable ({why}); kept as {} and starting clean",
                aside.display()
            ),
            Err(e) => write!(
                f,
                "state file {path} is unusable ({why}) and could not be moved aside ({e}); starting clean"
            ),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Unusable::Unreadable(e) => Some(e),
            Unusable::Corrupt(e) => Some(e),
        }
    }
}

/// Reads the state file. Missing: `Ok(None)`. Unreadable or corrupt: the file is moved
/// aside (the error says where) and the server starts clean.
pub fn load(state_dir: &Path) -> Result<Option<Snapshot>, LoadError> {
    let path = state_dir.join(STATE_FILE);
    let read = crate::store::statedir::open_read(&path).and_then(|mut f| {
        let mut text = String::new();
        io::Read::read_to_string(&mut f, &mut text).map(|_| text)
    });
    let cause = match read {
        Ok(text) => match parse(&text) {
            Ok(saved) => return Ok(Some(saved)),
            Err(e) => Unusable::Corrupt(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => Unusable::Unreadable(e),
    };
    let kept_as = set_aside(&path);
    Err(LoadError {
        path,
        cause,
        kept_as,
    })
}

/// Renames the file to `state.json.bad-<unix seconds>`.
fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = path.with_file_name(format!("{STATE_FILE}.bad-{stamp}"));
    fs::rename(path, &aside).map(|()| aside)
}

/// Writes `text` to `<dir>/state.json` atomically and durably.
pub fn write_atomic(dir: &Path, text: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        // Unlinked and made afresh: a link planted there is never written through.
        let mut file = crate::store::statedir::create_fresh(&tmp)?;
        file.write_all(text)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, dir.join(STATE_FILE))?;
    File::open(dir)?.sync_all()
}

/// Removes the state file (the `cleanup` command).
pub fn remove(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(STATE_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => File::open(dir)?.sync_all(),
    }
}

/// Group commit of state versions, with roll-back when a write fails.
///
/// A change is acknowledged to a client only once a snapshot containing it is on disk. When
/// a write fails (full disk, I/O error), the in-memory state is rolled back to the last
/// snapshot that was written, every change since then is reported as failed to whoever
/// made it (they answer 503, so nothing they were told is lost), and the server counts as
/// degraded until a write succeeds again.
///
/// Lock order: the state lock before this one, never the other way. Nothing here calls
/// `fill` or `rollback` (which take the state lock) while holding this lock, so a caller may
/// hold the state lock and ask [`Persister::degraded`].
pub struct Persister {
    dir: PathBuf,
    inner: Mutex<Progress>,
    written: Condvar,
}

/// A range of versions `(after, upto]` whose changes were rolled back.
type Failed = (u64, u64, String);

struct Progress {
    durable: u64,
    writing: bool,
    /// The writer's buffers, kept between writes.
    snapshot: Snapshot,
    text: Vec<u8>,
    /// The last snapshot on disk: what a failed write rolls the state back to.
    baseline: Snapshot,
    /// Recent roll-backs (only the last few are kept: their committers are waiting now).
    failed: Vec<Failed>,
    /// Why the last write failed, until one succeeds.
    error: Option<String>,
}

/// The error of a change that could not be made durable (and was rolled back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPersisted(pub String);

impl std::fmt::Display for NotPersisted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Change not made: the server cannot persist its state file ({}); try again later",
            self.0
        )
    }
}

impl Persister {
    pub fn new(dir: PathBuf) -> Self {
        Persister {
            dir,
            inner: Mutex::new(Progress {
                durable: 0,
                writing: false,
                snapshot: Snapshot::default(),
                text: Vec::new(),
                baseline: Snapshot::default(),
                failed: Vec::new(),
                error: None,
            }),
            written: Condvar::new(),
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets what a failed write rolls back to, before the first write (the state restored
    /// from the file is what the file says).
    pub fn set_baseline(&self, fill: impl Fn(&mut Snapshot)) {
        // Filled before this lock is taken: `fill` takes the state lock (state before persister).
        let mut baseline = Snapshot::default();
        fill(&mut baseline);
        self.progress().baseline = baseline;
    }

    /// Why the state is not durable, while the last write failed.
    pub fn degraded(&self) -> Option<String> {
        self.progress().error.clone()
    }

    /// Returns once state `version` (or a later one) is on disk, or fails when the write
    /// that should have carried it failed (the change is rolled back then). `fill` is called
    /// by the writer to copy the current state into the snapshot (it takes the state lock
    /// briefly); `rollback` restores the state from the last written snapshot, under the
    /// state lock, and returns the state's version before it did.
    pub fn commit(
        &self,
        version: u64,
        fill: impl Fn(&mut Snapshot),
        rollback: impl Fn(&Snapshot) -> u64,
    ) -> Result<u64, NotPersisted> {
        let mut progress = self.progress();
        loop {
            if let Some((_, _, why)) = progress
                .failed
                .iter()
                .find(|(after, upto, _)| *after < version && version <= *upto)
            {
                return Err(NotPersisted(why.clone()));
            }
            if progress.durable >= version {
                return Ok(progress.durable);
            }
            if progress.writing {
                progress = self
                    .written
                    .wait(progress)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            progress.writing = true;
            let mut snap = std::mem::take(&mut progress.snapshot);
            let mut text = std::mem::take(&mut progress.text);
            drop(progress);
            fill(&mut snap);
            let serialized = snap.write_json(&mut text);
            let started = std::time::Instant::now();
            let result = serialized
                .map_err(io::Error::from)
                .and_then(|()| write_atomic(&self.dir, &text));
            METRICS.state_write(result.is_ok(), started.elapsed());
            progress = self.progress();
            match result {
                Ok(()) => {
                    progress.durable = progress.durable.max(snap.state_version);
                    if progress.error.take().is_some() {
                        log::warn!("the state file in {} is written again", self.dir.display());
                    }
                    std::mem::swap(&mut progress.baseline, &mut snap);
                }
                Err(e) => {
                    let why = e.to_string();
                    // Once per reason: while degraded, every change and every sweep retries.
                    if progress.error.as_deref() != Some(why.as_str()) {
                        log::error!(
                            "cannot write the state file in {}: {why}; changes since the last \
                             write are rolled back and refused until a write succeeds",
                            self.dir.display()
                        );
                    }
                    // The lock order is state before persister: the roll-back takes the state
                    // lock, so it runs with this lock released. `writing` stays set meanwhile,
                    // so no other write starts and nobody else touches the baseline.
                    let baseline = std::mem::take(&mut progress.baseline);
                    drop(progress);
                    let upto = rollback(&baseline);
                    progress = self.progress();
                    progress.baseline = baseline;
                    let after = progress.durable;
                    progress.failed.push((after, upto, why.clone()));
                    let excess = progress.failed.len().saturating_sub(64);
                    progress.failed.drain(..excess);
                    progress.error = Some(why);
                }
            }
            progress.writing = false;
            progress.snapshot = snap;
            progress.text = text;
            self.written.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::session::ClientInfo;
    use std::sync::Arc;
    use uuid::Uuid;

    fn record(dir: &str, refs: u32) -> LabRecord {
        LabRecord {
            hash: record::sha256(dir.as_bytes()),
            work_dir: PathBuf::from(dir),
            topology: PathBuf::from(format!("{dir}/t.yml")),
            ref_count: refs,
            devices_json: record::devices_json(&[record::Device {
                name: "r1".into(),
                raw: serde_json::json!({"a": 1}),
            }]),
            instance: None,
        }
    }

    fn session(owner: Option<&str>, info: ClientInfo, active: Option<u64>) -> SessionRecord {
        SessionRecord {
            id: Uuid::new_v4(),
            owner: owner.map(Arc::from),
            info: Arc::new(ClientInfo {
                owner: owner.map(str::to_owned),
                ..info
            }),
            active_since_ms: active,
            skips: 0,
            ahead: false,
            active: active.is_some(),
        }
    }

    fn text(snap: &Snapshot) -> String {
        let mut out = b"left over from the last write".to_vec();
        snap.write_json(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn round_trip() {
        let sessions = vec![
            session(
                Some("ci"),
                ClientInfo {
                    name: Some("job \"1\" <x>\n".into()),
                    addr: Some("10.0.0.1".into()),
                    user_agent: Some("curl/8".into()),
                    created_ms: 1_700_000_000_123,
                    owner: None,
                    declared: Some(record::sha256(b"topology")),
                },
                Some(1_700_000_000_456),
            ),
            session(None, ClientInfo::default(), None),
            session(Some("a \"quoted\" name"), ClientInfo::default(), None),
        ];
        // What the scheduler keeps: a session passed over twice, one promoted ahead.
        let mut sessions = sessions;
        sessions[1].skips = 2;
        sessions[2].ahead = true;
        let snap = Snapshot {
            state_version: 7,
            sessions: sessions.clone(),
            lab: Some(record("/s/labs/a", 2)),
            starting: Some(Starting {
                session: sessions[0].id,
                work_dir: PathBuf::from("/s/labs/b"),
                pgid: Some(4242),
                instance: None,
            }),
            teardowns: vec![Teardown {
                attempts: 2,
                error: Some("netlab down --cleanup failed".into()),
                ..Teardown::new(record("/s/labs/c", 0), true)
            }],
            lab_started_ms: Some(1_700_000_000_789),
            ..Snapshot::default()
        };
        let text = text(&snap);
        // One line of compact JSON, the fields in their order.
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with("]}\n"), "{text}");
        assert!(
            text.starts_with(&format!(
                "{{\"version\":1,\"sessions\":[{{\"id\":\"{}\",\"status\":\"active\",\"owner\":\"ci\",",
                sessions[0].id
            )),
            "{text}"
        );
        assert!(
            text.contains(r#""status":"waiting","created_ms":0,"skips":2},"#),
            "{text}"
        );
        assert!(
            text.contains(r#""devices":[{"name":"r1","raw":{"a":1}}]"#),
            "{text}"
        );
        assert!(text.contains(r#""pgid":4242"#), "{text}");
        assert!(
            text.ends_with(&format!(
                ",\"teardowns\":[{}]}}\n",
                serde_json::to_string(&snap.teardowns[0]).unwrap()
            )),
            "{text}"
        );

        let saved = parse(&text).unwrap();
        assert_eq!(saved.sessions, sessions);
        let lab = saved.lab.unwrap();
        assert_eq!(lab.hash, record::sha256(b"/s/labs/a"));
        assert_eq!(lab.ref_count, 2);
        assert_eq!(lab.devices_json.get(), r#"[{"name":"r1","raw":{"a":1}}]"#);
        assert_eq!(saved.starting, snap.starting);
        let t = &saved.teardowns[0];
        assert_eq!(t.work_dir(), Path::new("/s/labs/c"));
        assert_eq!(t.lab.topology, Path::new("/s/labs/c/t.yml"));
        assert!(t.force);
        assert_eq!(t.attempts, 2);
        assert_eq!(t.error.as_deref(), Some("netlab down --cleanup failed"));
        assert_eq!(saved.lab_started_ms, Some(1_700_000_000_789));
        assert_eq!(saved.state_version, 0);
    }

    /// A file as the writer before serde wrote it (devices as netlab printed them, in
    /// netlab's key order) loads, and the devices stay byte for byte as they were.
    #[test]
    fn files_in_the_first_layout_still_load() {
        let text = r#"{
"version": 1,
"sessions": [
  {"id":"5c1c3b8e-61d9-4ffe-9ccb-dc6d5200245b","status":"active","owner":"ci","name":"job \"1\" <x>","addr":"10.0.0.1","user_agent":"curl/8","created_ms":1700000000123,"active_since_ms":1700000000456},
  {"id":"5407edb9-4b19-42e6-8ec0-7d30d5ae5682","status":"waiting","created_ms":0},
  {"id":"0891643f-d4da-4e47-b407-80b5a1c04fd1","status":"waiting","owner":"a \"quoted\" name","created_ms":0}
],
"lab": {"hash": "81803f1cf670cd0b356834ebbd6f2b64a8d83dc334f9bbd4eccb979391fe17d0", "work_dir": "/s/labs/a", "topology": "/s/labs/a/t.yml", "ref_count": 2, "devices": [{"name":"r1","raw":{"z":1, "a":[2]}}]},
"starting": {"pgid":4242,"session":"5c1c3b8e-61d9-4ffe-9ccb-dc6d5200245b","work_dir":"/s/labs/b"},
"teardowns": [{"hash": "a39e6b90ac2a56a9892a96d806a60845fe5ed1b9df2858ab286ab2525cde6beb", "work_dir": "/s/labs/c", "topology": "/s/labs/c/t.yml", "ref_count": 0, "devices": [{"name":"r1","raw":{"a":1}}], "force": true, "attempts": 2, "error": "netlab down --cleanup failed"}],
"lab_started_ms": 1700000000789
}
"#;
        let saved = parse(text).unwrap();
        let ids: Vec<String> = saved.sessions.iter().map(|s| s.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "5c1c3b8e-61d9-4ffe-9ccb-dc6d5200245b",
                "5407edb9-4b19-42e6-8ec0-7d30d5ae5682",
                "0891643f-d4da-4e47-b407-80b5a1c04fd1"
            ]
        );
        let first = &saved.sessions[0];
        assert_eq!(first.owner.as_deref(), Some("ci"));
        assert_eq!(
            *first.info,
            ClientInfo {
                name: Some("job \"1\" <x>".into()),
                addr: Some("10.0.0.1".into()),
                user_agent: Some("curl/8".into()),
                created_ms: 1_700_000_000_123,
                owner: Some("ci".into()),
                declared: None,
            }
        );
        assert_eq!(first.active_since_ms, Some(1_700_000_000_456));
        assert_eq!(*saved.sessions[1].info, ClientInfo::default());
        assert_eq!(
            saved.sessions[2].owner.as_deref(),
            Some("a \"quoted\" name")
        );
        let lab = saved.lab.as_ref().unwrap();
        assert_eq!(
            record::hex(&lab.hash),
            "81803f1cf670cd0b356834ebbd6f2b64a8d83dc334f9bbd4eccb979391fe17d0"
        );
        assert_eq!(lab.work_dir, Path::new("/s/labs/a"));
        assert_eq!(lab.ref_count, 2);
        assert_eq!(
            lab.devices_json.get(),
            r#"[{"name":"r1","raw":{"z":1, "a":[2]}}]"#
        );
        let starting = saved.starting.as_ref().unwrap();
        assert_eq!((starting.session, starting.pgid), (first.id, Some(4242)));
        assert_eq!(saved.teardowns[0].attempts, 2);
        assert!(saved.teardowns[0].force);
        assert_eq!(saved.lab_started_ms, Some(1_700_000_000_789));
        // Written again, the devices are the same bytes.
        assert!(
            super::tests::text(&saved)
                .contains(r#""devices":[{"name":"r1","raw":{"z":1, "a":[2]}}]"#)
        );
    }

    /// Files from before sessions had client fields and owners, labs a start time, starts a
    /// process group and teardowns their progress.
    #[test]
    fn files_without_the_newer_fields_still_load() {
        let text = r#"{
"version": 1,
"sessions": [
  {"id":"5c1c3b8e-61d9-4ffe-9ccb-dc6d5200245b","status":"active"}
],
"lab": null,
"starting": {"session":"5c1c3b8e-61d9-4ffe-9ccb-dc6d5200245b","work_dir":"/s/labs/b"},
"teardowns": [{"hash": "a39e6b90ac2a56a9892a96d806a60845fe5ed1b9df2858ab286ab2525cde6beb", "work_dir": "/s/labs/c", "topology": "/s/labs/c/t.yml", "ref_count": 0, "devices": []}]
}
"#;
        let saved = parse(text).unwrap();
        let s = &saved.sessions[0];
        assert_eq!((s.owner.as_ref(), s.active_since_ms), (None, None));
        assert_eq!(*s.info, ClientInfo::default());
        assert_eq!(saved.lab_started_ms, None);
        assert_eq!(saved.starting.unwrap().pgid, None);
        let t = &saved.teardowns[0];
        assert!(!t.force && t.attempts == 0 && t.error.is_none());
        // The oldest files had neither starts nor teardowns.
        let id = Uuid::new_v4();
        let saved = parse(&format!(
            r#"{{"version": 1, "sessions": [{{"id": "{id}", "status": "active"}}], "lab": null}}"#
        ))
        .unwrap();
        assert_eq!(saved.sessions[0].id, id);
        assert!(saved.starting.is_none() && saved.teardowns.is_empty());
    }

    /// How the package's postrm tells that a file records no lab: by its end.
    const NO_LAB_END: &str = ",\"lab\":null,\"starting\":null,\"teardowns\":[]}\n";

    #[test]
    fn a_state_without_labs_has_the_end_the_postrm_looks_for() {
        let empty = Snapshot::default();
        assert_eq!(
            text(&empty),
            "{\"version\":1,\"sessions\":[]".to_owned() + NO_LAB_END
        );
        // Sessions, and a start time left from an earlier lab: still no lab.
        let after_a_lab = Snapshot {
            sessions: vec![session(None, ClientInfo::default(), Some(1))],
            lab_started_ms: Some(5),
            ..Snapshot::default()
        };
        assert!(text(&after_a_lab).ends_with(NO_LAB_END));
        // A lab, a start in progress or a pending teardown: another end, whatever their
        // records hold (a device's data with the same keys and values, here).
        let devices = r#"[{"name":"r1","raw":{"lab":null,"starting":null,"teardowns":[]}}]"#;
        let mut lab = record("/s/labs/a", 0);
        lab.devices_json =
            Arc::from(serde_json::value::RawValue::from_string(devices.into()).unwrap());
        let id = session(None, ClientInfo::default(), Some(1)).id;
        for snap in [
            Snapshot {
                lab: Some(lab.clone()),
                ..Snapshot::default()
            },
            Snapshot {
                starting: Some(Starting {
                    session: id,
                    work_dir: PathBuf::from("/s/labs/b"),
                    pgid: None,
                    instance: None,
                }),
                ..Snapshot::default()
            },
            Snapshot {
                teardowns: vec![Teardown::new(lab.clone(), false)],
                ..Snapshot::default()
            },
        ] {
            let text = text(&snap);
            assert!(!text.ends_with(NO_LAB_END), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn bad_files_are_refused() {
        let id = "5c1c3b8e-61d9-4ffe-9ccb-dc6d5200245b";
        for bad in [
            String::new(),
            "{}".into(),
            r#"{"sessions": []}"#.into(),
            r#"{"version": 99, "sessions": []}"#.into(),
            r#"{"version": 1}"#.into(),
            r#"{"version": 1, "sessions": [{"id": "x"}]}"#.into(),
            format!(
                r#"{{"version": 1, "sessions": [{{"id": "{}"}}]}}"#,
                id.to_uppercase()
            ),
            format!(r#"{{"version": 1, "sessions": [{{"id": "{id}"}}, {{"id": "{id}"}}]}}"#),
            format!(r#"{{"version": 1, "sessions": [{{"id": "{id}", "owner": 3}}]}}"#),
            r#"{"version": 1, "sessions": [], "lab": {"hash": "zz"}}"#.into(),
            format!(
                r#"{{"version": 1, "sessions": [], "lab": {{"hash": "{}", "work_dir": "/w", "topology": "/w/t.yml", "ref_count": 0, "devices": {{}}}}}}"#,
                "0".repeat(64)
            ),
            r#"{"version": 1, "sessions": [], "starting": {"work_dir": "/w"}}"#.into(),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
        assert!(
            parse(r#"{"version": 99, "sessions": []}"#)
                .unwrap_err()
                .to_string()
                .starts_with("unknown format version 99")
        );
        let empty = parse(r#"{"version": 1, "sessions": [], "from": "a newer server"}"#).unwrap();
        assert!(empty.sessions.is_empty() && empty.lab.is_none());
    }

    #[test]
    fn writes_are_atomic_and_unusable_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        write_atomic(dir.path(), b"{\"version\": 1, \"sessions\": []}").unwrap();
        assert!(load(dir.path()).unwrap().is_some());
        assert!(!dir.path().join("state.json.tmp").exists());

        fs::write(dir.path().join(STATE_FILE), "{garbage").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err.cause, Unusable::Corrupt(_)), "{err}");
        let aside = err.kept_as.as_ref().unwrap();
        assert!(aside.to_string_lossy().contains("state.json.bad-"), "{err}");
        assert!(err.to_string().contains(&*aside.to_string_lossy()), "{err}");
        assert!(aside.exists() && !dir.path().join(STATE_FILE).exists());
        assert!(load(dir.path()).unwrap().is_none());
        fs::remove_file(aside).unwrap();

        // A directory in its place cannot be read as a file.
        fs::create_dir(dir.path().join(STATE_FILE)).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err.cause, Unusable::Unreadable(_)), "{err}");
        assert!(err.kept_as.unwrap().is_dir());
    }
}
