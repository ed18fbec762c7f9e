//! The lab record and the decisions of `POST /lab`, `POST /lab/release` and `DELETE /lab`.
//! Pure: no I/O. A lab's identity is the SHA-256 of its topology file's bytes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

pub type Hash = [u8; 32];

/// The hash of `bytes` at once (tests: uploads are hashed as they stream in).
#[cfg(test)]
pub fn sha256(bytes: &[u8]) -> Hash {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

/// A hash in lower-case hexadecimal, written out without an intermediate string.
struct Hex<'a>(&'a Hash);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

pub fn hex(hash: &Hash) -> String {
    Hex(hash).to_string()
}

/// The hash that `text` spells in 64 hexadecimal digits (either case; nothing else, not
/// even a sign).
pub fn parse_hex(text: &str) -> Option<Hash> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// `hash` in the state file: 64 hexadecimal digits.
mod hash_text {
    use super::*;

    pub fn serialize<S: Serializer>(hash: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&Hex(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let text = String::deserialize(d)?;
        parse_hex(&text).ok_or_else(|| D::Error::custom("lab hash is not 64 hex digits"))
    }
}

/// A path in the state file: its text, with anything that is not UTF-8 replaced (the paths
/// the server makes are UTF-8; a replaced one names no directory of ours when read back).
pub(crate) fn path_text<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&path.display())
}

/// The devices in the state file: the API's JSON array, written and read back byte for byte.
mod devices_text {
    use super::*;

    pub fn serialize<S: Serializer>(devices: &Arc<RawValue>, s: S) -> Result<S::Ok, S::Error> {
        devices.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<RawValue>, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        if !raw.get().starts_with('[') {
            return Err(D::Error::custom("lab devices is not a list"));
        }
        Ok(Arc::from(raw))
    }
}

/// One node of the lab as the API returns it: its name and netlab's data for it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Device {
    pub name: String,
    pub raw: serde_json::Value,
}

/// The running lab. Serialized as the state file keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabRecord {
    #[serde(with = "hash_text")]
    pub hash: Hash,
    /// The directory netlab ran `up` in (under the state dir).
    #[serde(serialize_with = "path_text")]
    pub work_dir: PathBuf,
    /// The topology file inside `work_dir`.
    #[serde(serialize_with = "path_text")]
    pub topology: PathBuf,
    pub ref_count: u32,
    /// The devices, serialized once as the JSON array the API returns.
    #[serde(rename = "devices", with = "devices_text")]
    pub devices_json: Arc<RawValue>,
}

/// What `POST /lab` does, given the running lab (if any).
#[derive(Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Same topology and `reuse=true`: take a reference on the running lab (`reused:true`).
    Attach,
    /// Start a lab from the upload; `replace` says whether the running (idle) lab must be torn
    /// down first.
    Start { replace: bool },
    /// The running lab is held by someone and cannot be replaced: 423.
    Busy,
}

pub fn decide(running: Option<&LabRecord>, hash: &Hash, reuse: bool) -> Acquire {
    match running {
        None => Acquire::Start { replace: false },
        Some(lab) if lab.hash == *hash && reuse => Acquire::Attach,
        Some(lab) if lab.ref_count == 0 => Acquire::Start { replace: true },
        Some(_) => Acquire::Busy,
    }
}

/// What `DELETE /lab` does.
#[derive(Debug, PartialEq, Eq)]
pub enum Destroy {
    /// No lab: 204.
    NothingRunning,
    /// `force=false` and the lab is held: 409.
    InUse,
    /// Tear it down (202).
    TearDown,
}

pub fn decide_destroy(running: Option<&LabRecord>, force: bool) -> Destroy {
    match running {
        None => Destroy::NothingRunning,
        Some(lab) if !force && lab.ref_count > 0 => Destroy::InUse,
        Some(_) => Destroy::TearDown,
    }
}

impl LabRecord {
    /// `POST /lab/release`: one reference less, clamped at 0.
    pub fn release(&mut self) {
        self.ref_count = self.ref_count.saturating_sub(1);
    }

    /// Whether ending the ACTIVE session must tear this lab down: only when it still holds
    /// references; a lab released properly stays up for the next session to attach to.
    pub fn torn_down_with_its_session(&self) -> bool {
        self.ref_count > 0
    }
}

/// A lab to tear down: queued on the lab thread, or waiting for its next attempt after
/// netlab failed to tear it down. Its work directory is kept until netlab succeeds.
///
/// The state file keeps it as its lab's fields followed by `force`, `attempts` and `error`.
#[derive(Clone, Debug, Serialize)]
pub struct Teardown {
    #[serde(flatten)]
    pub lab: LabRecord,
    /// `netlab down --cleanup --force`: the remains of a start that failed, or of a lab in
    /// an unknown state, where plain `down --cleanup` leaves netlab's registration behind.
    /// A lab that ran is torn down without it.
    pub force: bool,
    /// Failed attempts so far.
    pub attempts: u32,
    /// netlab's words from the last failed attempt.
    pub error: Option<String>,
    /// When the next attempt is due (clock time); `None` while one is queued.
    #[serde(skip)]
    pub retry_at: Option<Duration>,
}

impl<'de> Deserialize<'de> for Teardown {
    /// The entry is read twice, once as its lab and once for the teardown's own fields:
    /// serde's `flatten` cannot read the devices as raw JSON.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The fields besides the lab's; files written before they existed lack them.
        #[derive(Deserialize)]
        struct Progress {
            #[serde(default)]
            force: bool,
            #[serde(default)]
            attempts: u32,
            #[serde(default)]
            error: Option<String>,
        }
        let raw = Box::<RawValue>::deserialize(d)?;
        let lab = serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
        let progress: Progress = serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
        Ok(Teardown {
            lab,
            force: progress.force,
            attempts: progress.attempts,
            error: progress.error,
            retry_at: None,
        })
    }
}

impl Teardown {
    pub fn new(lab: LabRecord, force: bool) -> Self {
        Teardown {
            lab,
            force,
            attempts: 0,
            error: None,
            retry_at: None,
        }
    }

    /// The remains of a start in `work_dir` that never became the running lab.
    pub fn of_failed_start(work_dir: &Path, topology: Option<&Path>, hash: Hash) -> Self {
        Teardown::new(
            LabRecord {
                hash,
                work_dir: work_dir.to_path_buf(),
                topology: topology.unwrap_or(work_dir).to_path_buf(),
                ref_count: 0,
                devices_json: no_devices(),
            },
            true,
        )
    }

    pub fn work_dir(&self) -> &Path {
        &self.lab.work_dir
    }
}

/// How long to wait before attempt `attempts + 1` of a failing teardown: six sweep
/// intervals (30 s by default), doubled after every failure, at most 10 minutes.
pub fn retry_delay(sweep_interval: Duration, attempts: u32) -> Duration {
    let factor = 6u32.saturating_mul(1 << attempts.saturating_sub(1).min(16));
    sweep_interval
        .saturating_mul(factor)
        .min(Duration::from_secs(600))
}

/// Serializes devices as the API returns them.
pub fn devices_json(devices: &[Device]) -> Arc<RawValue> {
    serde_json::value::to_raw_value(devices).map_or_else(|_| no_devices(), Arc::from)
}

/// The empty device list.
pub fn no_devices() -> Arc<RawValue> {
    Arc::from(RawValue::from_string("[]".to_owned()).expect("`[]` is JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(topology: &[u8], ref_count: u32) -> LabRecord {
        LabRecord {
            hash: sha256(topology),
            work_dir: PathBuf::from("/state/labs/x"),
            topology: PathBuf::from("/state/labs/x/topo.yml"),
            ref_count,
            devices_json: no_devices(),
        }
    }

    const A: &[u8] = b"nodes: [r1]\n";
    const B: &[u8] = b"nodes: [r1, r2]\n";

    #[test]
    fn hex_of_a_known_digest() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn no_lab_starts_one() {
        assert_eq!(
            decide(None, &sha256(A), true),
            Acquire::Start { replace: false }
        );
        assert_eq!(
            decide(None, &sha256(A), false),
            Acquire::Start { replace: false }
        );
    }

    #[test]
    fn same_hash_with_reuse_attaches_whether_held_or_idle() {
        assert_eq!(decide(Some(&lab(A, 1)), &sha256(A), true), Acquire::Attach);
        assert_eq!(decide(Some(&lab(A, 0)), &sha256(A), true), Acquire::Attach);
    }

    #[test]
    fn same_hash_without_reuse_restarts_an_idle_lab_and_refuses_a_held_one() {
        assert_eq!(
            decide(Some(&lab(A, 0)), &sha256(A), false),
            Acquire::Start { replace: true }
        );
        assert_eq!(decide(Some(&lab(A, 2)), &sha256(A), false), Acquire::Busy);
    }

    #[test]
    fn other_hash_switches_an_idle_lab_and_refuses_a_held_one() {
        for reuse in [true, false] {
            assert_eq!(
                decide(Some(&lab(A, 0)), &sha256(B), reuse),
                Acquire::Start { replace: true }
            );
            assert_eq!(decide(Some(&lab(A, 1)), &sha256(B), reuse), Acquire::Busy);
        }
    }

    #[test]
    fn release_clamps_at_zero() {
        let mut l = lab(A, 1);
        l.release();
        assert_eq!(l.ref_count, 0);
        l.release();
        assert_eq!(l.ref_count, 0);
    }

    #[test]
    fn destroy_rows() {
        assert_eq!(decide_destroy(None, true), Destroy::NothingRunning);
        assert_eq!(decide_destroy(None, false), Destroy::NothingRunning);
        assert_eq!(decide_destroy(Some(&lab(A, 1)), false), Destroy::InUse);
        assert_eq!(decide_destroy(Some(&lab(A, 0)), false), Destroy::TearDown);
        assert_eq!(decide_destroy(Some(&lab(A, 3)), true), Destroy::TearDown);
    }

    #[test]
    fn session_end_tears_down_only_a_held_lab() {
        assert!(lab(A, 1).torn_down_with_its_session());
        assert!(!lab(A, 0).torn_down_with_its_session());
    }

    #[test]
    fn failing_teardowns_back_off_to_ten_minutes() {
        let every = Duration::from_secs(5);
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(every, n).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(retry_delay(every, 1000), Duration::from_secs(600));
        assert_eq!(
            retry_delay(Duration::from_millis(100), 1),
            Duration::from_millis(600)
        );
    }

    #[test]
    fn devices_serialize_as_name_then_raw() {
        let devices = vec![Device {
            name: "r1".into(),
            raw: serde_json::json!({"hostname": "clab-x-r1"}),
        }];
        assert_eq!(
            devices_json(&devices).get(),
            r#"[{"name":"r1","raw":{"hostname":"clab-x-r1"}}]"#
        );
    }
}
