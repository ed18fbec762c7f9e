//! The state file, `<state dir>/state.json`: everything a restart needs (sessions in queue
//! order, the lab record, a start in progress, pending teardowns), so that a restart, a crash
//! or a package upgrade does not throw the queue away or orphan the lab.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory) and happen
//! before the client gets the answer for the change. Concurrent changes share one write
//! (group commit): whoever finds no write in progress writes a snapshot that includes every
//! change made so far, and everyone whose change it covers returns.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::lab::{self, Hash, LabRecord, Teardown};
use crate::metrics::METRICS;
use crate::queue::{ClientInfo, SessionId, SessionRecord, parse_session_id};

pub const STATE_FILE: &str = "state.json";
pub const FORMAT_VERSION: u64 = 1;

/// A start in progress (`netlab up` running): cleaned up if the server dies meanwhile.
#[derive(Clone, Debug, PartialEq)]
pub struct Starting {
    pub session: SessionId,
    pub work_dir: PathBuf,
    /// The process group of the running `netlab up`, once it is started: a restart after a
    /// crash kills what is left of it.
    pub pgid: Option<u32>,
}

/// What the state file holds, decoded.
#[derive(Debug, Default)]
pub struct Saved {
    /// Sessions in queue order (the first is the ACTIVE one).
    pub sessions: Vec<SessionRecord>,
    pub lab: Option<LabRecord>,
    pub starting: Option<Starting>,
    pub teardowns: Vec<Teardown>,
    /// Per session (same order): what is known of its client and since when it is ACTIVE.
    /// Files written before these existed give defaults.
    pub infos: Vec<(ClientInfo, Option<u64>)>,
    /// Unix ms the lab came up, when the file says.
    pub lab_started_ms: Option<u64>,
}

/// A copy of the durable part of the state, taken under the state lock. The writer keeps
/// one and refills it, so a queue of thousands does not churn the allocator on every write.
#[derive(Default)]
pub struct Snapshot {
    pub version: u64,
    pub sessions: Vec<SessionRecord>,
    pub lab: Option<LabRecord>,
    pub starting: Option<Starting>,
    pub teardowns: Vec<Teardown>,
    /// Parallel to `sessions`.
    pub infos: Vec<(Arc<ClientInfo>, Option<u64>)>,
    pub lab_started_ms: Option<u64>,
}

impl Snapshot {
    /// The file's JSON, into `out` (cleared first). Devices are stored as the API serves
    /// them (already JSON).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{{\n\"version\": {FORMAT_VERSION},\n\"sessions\": [");
        let mut id = [0u8; 36];
        for (i, s) in self.sessions.iter().enumerate() {
            let status = if i == 0 { "active" } else { "waiting" };
            let sep = if i == 0 { "" } else { "," };
            let id = s.id.hyphenated().encode_lower(&mut id);
            let _ = write!(out, "{sep}\n  {{\"id\":\"{id}\",\"status\":\"{status}\"");
            if let Some(owner) = &s.owner {
                let _ = write!(out, ",\"owner\":{}", Value::String(owner.to_string()));
            }
            if let Some((info, active_since)) = self.infos.get(i) {
                write_info(out, info, *active_since);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"\n],\n\"lab\": ");
        match &self.lab {
            Some(l) => out.extend_from_slice(lab_json(l).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\n\"starting\": ");
        match &self.starting {
            Some(s) => out.extend_from_slice(
                serde_json::json!({
                    "session": s.session.to_string(),
                    "work_dir": s.work_dir,
                    "pgid": s.pgid,
                })
                .to_string()
                .as_bytes(),
            ),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\n\"teardowns\": [");
        for (i, t) in self.teardowns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(teardown_json(t).as_bytes());
        }
        out.extend_from_slice(b"]");
        if let Some(ms) = self.lab_started_ms {
            let _ = write!(out, ",\n\"lab_started_ms\": {ms}");
        }
        out.extend_from_slice(b"\n}\n");
    }
}

fn lab_json(l: &LabRecord) -> String {
    format!(
        "{{\"hash\": {}, \"work_dir\": {}, \"topology\": {}, \"ref_count\": {}, \"devices\": {}}}",
        Value::String(lab::hex(&l.hash)),
        Value::String(l.work_dir.to_string_lossy().into_owned()),
        Value::String(l.topology.to_string_lossy().into_owned()),
        l.ref_count,
        l.devices_json
    )
}

/// A teardown: its lab's fields, then how it is done and how it went so far.
fn teardown_json(t: &Teardown) -> String {
    let mut text = lab_json(&t.lab);
    text.pop();
    text.push_str(&format!(
        ", \"force\": {}, \"attempts\": {}, \"error\": {}}}",
        t.force,
        t.attempts,
        t.error
            .as_ref()
            .map_or(Value::Null, |e| Value::String(e.clone()))
    ));
    text
}

fn parse_teardown(v: &Value) -> Result<Teardown, String> {
    let mut t = Teardown::new(
        parse_lab(v)?,
        v.get("force").and_then(Value::as_bool).unwrap_or(false),
    );
    t.attempts = v
        .get("attempts")
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    t.error = v.get("error").and_then(Value::as_str).map(str::to_owned);
    Ok(t)
}

fn parse_hash(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

fn parse_lab(v: &Value) -> Result<LabRecord, String> {
    let field = |name: &str| v.get(name).ok_or_else(|| format!("lab without {name}"));
    let text = |name: &str| -> Result<String, String> {
        field(name)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("lab {name} is not a string"))
    };
    let devices = field("devices")?;
    if !devices.is_array() {
        return Err("lab devices is not a list".into());
    }
    Ok(LabRecord {
        hash: parse_hash(&text("hash")?).ok_or("lab hash is not 64 hex digits")?,
        work_dir: PathBuf::from(text("work_dir")?),
        topology: PathBuf::from(text("topology")?),
        ref_count: field("ref_count")?
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("lab ref_count is not a count")?,
        devices_json: devices.to_string().into(),
    })
}

/// The optional client fields of a session entry.
fn write_info(out: &mut Vec<u8>, info: &ClientInfo, active_since: Option<u64>) {
    use std::io::Write as _;
    // Absent fields are left out: the file of a deep queue stays small.
    for (key, value) in [
        ("name", &info.name),
        ("addr", &info.addr),
        ("user_agent", &info.user_agent),
    ] {
        if let Some(text) = value {
            let _ = write!(out, ",\"{key}\":{}", Value::String(text.clone()));
        }
    }
    let _ = write!(out, ",\"created_ms\":{}", info.created_ms);
    if let Some(ms) = active_since {
        let _ = write!(out, ",\"active_since_ms\":{ms}");
    }
}

/// The client fields of a session entry; absent ones (older files) are defaults.
fn parse_info(s: &Value) -> (ClientInfo, Option<u64>) {
    let text = |k: &str| s.get(k).and_then(Value::as_str).map(str::to_owned);
    (
        ClientInfo {
            name: text("name"),
            addr: text("addr"),
            user_agent: text("user_agent"),
            created_ms: s.get("created_ms").and_then(Value::as_u64).unwrap_or(0),
            owner: text("owner"),
        },
        s.get("active_since_ms").and_then(Value::as_u64),
    )
}

/// Decodes the file's text.
pub fn parse(text: &str) -> Result<Saved, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("version").and_then(Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        Some(other) => return Err(format!("unknown format version {other}")),
        None => return Err("no format version".into()),
    }
    let mut saved = Saved::default();
    for s in v
        .get("sessions")
        .and_then(Value::as_array)
        .ok_or("no session list")?
    {
        let id = s
            .get("id")
            .and_then(Value::as_str)
            .and_then(parse_session_id)
            .ok_or("a session without a valid id")?;
        if saved.sessions.iter().any(|s| s.id == id) {
            return Err(format!("session {id} listed twice"));
        }
        let owner = match s.get("owner") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(Arc::from(name.as_str())),
            Some(_) => return Err(format!("session {id} has an owner that is not a name")),
        };
        saved.sessions.push(SessionRecord { id, owner });
        saved.infos.push(parse_info(s));
    }
    saved.lab_started_ms = v.get("lab_started_ms").and_then(Value::as_u64);
    saved.lab = match v.get("lab") {
        None | Some(Value::Null) => None,
        Some(l) => Some(parse_lab(l)?),
    };
    saved.starting = match v.get("starting") {
        None | Some(Value::Null) => None,
        Some(s) => Some(Starting {
            session: s
                .get("session")
                .and_then(Value::as_str)
                .and_then(parse_session_id)
                .ok_or("a start without a valid session")?,
            work_dir: PathBuf::from(
                s.get("work_dir")
                    .and_then(Value::as_str)
                    .ok_or("a start without a work dir")?,
            ),
            pgid: s
                .get("pgid")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok()),
        }),
    };
    if let Some(list) = v.get("teardowns").and_then(Value::as_array) {
        for t in list {
            saved.teardowns.push(parse_teardown(t)?);
        }
    }
    Ok(saved)
}

/// Reads the state file. Missing: `Ok(None)`. Unreadable or corrupt: the file is moved
/// aside (its new name is in the error) and the server starts clean.
pub fn load(state_dir: &Path) -> Result<Option<Saved>, String> {
    let path = state_dir.join(STATE_FILE);
    let read = crate::statedir::open_read(&path).and_then(|mut f| {
        let mut text = String::new();
        io::Read::read_to_string(&mut f, &mut text).map(|_| text)
    });
    let text = match read {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(set_aside(&path, &e.to_string())),
    };
    match parse(&text) {
        Ok(saved) => Ok(Some(saved)),
        Err(why) => Err(set_aside(&path, &why)),
    }
}

fn set_aside(path: &Path, why: &str) -> String {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = path.with_file_name(format!("{STATE_FILE}.bad-{stamp}"));
    match fs::rename(path, &aside) {
        Ok(()) => format!(
            "state file {} is unusable ({why}); kept as {} and starting clean",
            path.display(),
            aside.display()
        ),
        Err(e) => format!(
            "state file {} is unusable ({why}) and could not be moved aside ({e}); starting clean",
            path.display()
        ),
    }
}

/// Writes `text` to `<dir>/state.json` atomically and durably.
pub fn write_atomic(dir: &Path, text: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        // Unlinked and made afresh: a link planted there is never written through.
        let mut file = crate::statedir::create_fresh(&tmp)?;
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
        fill(&mut self.progress().baseline);
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
            snap.write_json(&mut text);
            let started = std::time::Instant::now();
            let result = write_atomic(&self.dir, &text);
            METRICS.state_write(result.is_ok(), started.elapsed());
            progress = self.progress();
            match result {
                Ok(()) => {
                    progress.durable = progress.durable.max(snap.version);
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
                    let upto = rollback(&progress.baseline);
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
    use uuid::Uuid;

    fn record(dir: &str, refs: u32) -> LabRecord {
        LabRecord {
            hash: lab::sha256(dir.as_bytes()),
            work_dir: PathBuf::from(dir),
            topology: PathBuf::from(format!("{dir}/t.yml")),
            ref_count: refs,
            devices_json: r#"[{"name":"r1","raw":{"a":1}}]"#.into(),
        }
    }

    #[test]
    fn round_trip() {
        let ids: Vec<SessionId> = (0..3).map(|_| Uuid::new_v4()).collect();
        let owners = [
            Some(Arc::from("ci")),
            None,
            Some(Arc::from("a \"quoted\" name")),
        ];
        let sessions: Vec<SessionRecord> = ids
            .iter()
            .zip(owners)
            .map(|(&id, owner)| SessionRecord { id, owner })
            .collect();
        let snap = Snapshot {
            version: 7,
            sessions: sessions.clone(),
            lab: Some(record("/s/labs/a", 2)),
            starting: Some(Starting {
                session: ids[0],
                work_dir: PathBuf::from("/s/labs/b"),
                pgid: Some(4242),
            }),
            teardowns: vec![Teardown {
                attempts: 2,
                error: Some("netlab down --cleanup failed".into()),
                ..Teardown::new(record("/s/labs/c", 0), true)
            }],
            infos: vec![
                (
                    Arc::new(ClientInfo {
                        name: Some("job \"1\" <x>".into()),
                        addr: Some("10.0.0.1".into()),
                        user_agent: Some("curl/8".into()),
                        created_ms: 1_700_000_000_123,
                        owner: None,
                    }),
                    Some(1_700_000_000_456),
                ),
                (Arc::default(), None),
                (Arc::default(), None),
            ],
            lab_started_ms: Some(1_700_000_000_789),
        };
        let mut bytes = Vec::new();
        snap.write_json(&mut bytes);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"status\":\"active\""));
        let saved = parse(&text).unwrap();
        assert_eq!(saved.sessions, sessions);
        let lab = saved.lab.unwrap();
        assert_eq!(lab.hash, lab::sha256(b"/s/labs/a"));
        assert_eq!(lab.ref_count, 2);
        assert_eq!(&*lab.devices_json, r#"[{"name":"r1","raw":{"a":1}}]"#);
        let starting = saved.starting.unwrap();
        assert_eq!(starting.work_dir, PathBuf::from("/s/labs/b"));
        assert_eq!(starting.pgid, Some(4242));
        let t = &saved.teardowns[0];
        assert_eq!(t.work_dir(), Path::new("/s/labs/c"));
        assert!(t.force);
        assert_eq!(t.attempts, 2);
        assert_eq!(t.error.as_deref(), Some("netlab down --cleanup failed"));
        // Files written before teardowns had these fields still load.
        let old = parse(&text.replace(
            ", \"force\": true, \"attempts\": 2, \"error\": \"netlab down --cleanup failed\"",
            "",
        ))
        .unwrap();
        assert!(!old.teardowns[0].force && old.teardowns[0].attempts == 0);
        let (info, active) = &saved.infos[0];
        assert_eq!(info.name.as_deref(), Some("job \"1\" <x>"));
        assert_eq!(info.addr.as_deref(), Some("10.0.0.1"));
        assert_eq!(info.user_agent.as_deref(), Some("curl/8"));
        assert_eq!(info.created_ms, 1_700_000_000_123);
        assert_eq!(*active, Some(1_700_000_000_456));
        assert_eq!(saved.infos[1], (ClientInfo::default(), None));
        assert_eq!(saved.lab_started_ms, Some(1_700_000_000_789));
    }

    #[test]
    fn files_without_client_fields_still_load() {
        let id = Uuid::new_v4();
        let saved = parse(&format!(
            r#"{{"version": 1, "sessions": [{{"id": "{id}", "status": "active"}}], "lab": null}}"#
        ))
        .unwrap();
        assert_eq!(saved.sessions[0].id, id);
        assert_eq!(saved.infos, vec![(ClientInfo::default(), None)]);
        assert_eq!(saved.lab_started_ms, None);
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(parse("").is_err());
        assert!(parse("{}").is_err());
        assert!(parse(r#"{"version": 99, "sessions": []}"#).is_err());
        assert!(parse(r#"{"version": 1, "sessions": [{"id": "x"}]}"#).is_err());
        assert!(parse(r#"{"version": 1, "sessions": [], "lab": {"hash": "zz"}}"#).is_err());
        let empty = parse(r#"{"version": 1, "sessions": []}"#).unwrap();
        assert!(empty.sessions.is_empty() && empty.lab.is_none());
    }

    #[test]
    fn writes_are_atomic_and_corrupt_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        write_atomic(dir.path(), b"{\"version\": 1, \"sessions\": []}").unwrap();
        assert!(load(dir.path()).unwrap().is_some());
        assert!(!dir.path().join("state.json.tmp").exists());
        fs::write(dir.path().join(STATE_FILE), "{garbage").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.contains("state.json.bad-"), "{err}");
        assert!(!dir.path().join(STATE_FILE).exists());
        assert!(load(dir.path()).unwrap().is_none());
    }
}
