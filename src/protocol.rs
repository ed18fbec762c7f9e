//! The wire protocol, shared by the server and the `remote-lab` client: the bodies of the
//! API as serde types, the header names, and the `X-Client-Name` encoding.
//!
//! The lowest floor of the crate: it uses nothing else of it. The server serialises these
//! types (the bytes are what the server has always sent: fields in the same order, `None`s
//! that older answers did not have are skipped); the client deserialises them, tolerating
//! what an older or a Python server leaves out (`#[serde(default)]`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

// ------------------------------------------------------------------------------- headers

/// Names the caller's session on every `/lab*` route and the heartbeat.
pub const SESSION_HEADER: &str = "X-Session-ID";
/// Who is asking, at `POST /session`: percent-encoded UTF-8 (see [`encode_client_name`]).
pub const CLIENT_NAME_HEADER: &str = "X-Client-Name";
/// `GET /lab/log`: where to continue.
pub const LOG_OFFSET_HEADER: &str = "X-Log-Offset";
/// `GET /lab/log`: the netlab command whose output this is (`up`, `down`, `none`).
pub const LOG_COMMAND_HEADER: &str = "X-Log-Command";
/// `GET /lab/log`: `true` once that command ended.
pub const LOG_DONE_HEADER: &str = "X-Log-Done";
/// `POST /session`: the SHA-256 of the topology the session will start (64 lowercase hex).
pub const TOPOLOGY_SHA256_HEADER: &str = "X-Topology-SHA256";

// ------------------------------------------------------------------------------- X-Client-Name

/// Encodes a client name for its header: printable ASCII but `%` as it is, every other
/// byte of its UTF-8 as `%XX`. Header values are ASCII on the wire; the server decodes
/// this with [`decode_client_name`].
pub fn encode_client_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The bytes an encoded client name stands for; see [`percent_decode`].
pub fn decode_client_name(raw: &str) -> Vec<u8> {
    percent_decode(raw)
}

/// Longest client name, in characters.
pub const MAX_CLIENT_NAME: usize = 200;

/// Each `%XX` (hex, either case) one byte, everything else as it is (a `%` not followed by
/// two hex digits stays a `%`).
pub fn percent_decode(raw: &str) -> Vec<u8> {
    let b = raw.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_digit(b[i + 1]), hex_digit(b[i + 2]))
        {
            bytes.push(h << 4 | l);
            i += 3;
            continue;
        }
        bytes.push(b[i]);
        i += 1;
    }
    bytes
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

// ------------------------------------------------------------------------------- bodies

/// The envelope of every error answer: `{"detail": …}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detail {
    pub detail: DetailText,
}

/// A detail is a sentence, or (422) the list of what failed validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DetailText {
    Text(String),
    Other(serde_json::Value),
}

impl std::fmt::Display for DetailText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DetailText::Text(text) => f.write_str(text),
            DetailText::Other(value) => write!(f, "{value}"),
        }
    }
}

/// `201` of `POST /session`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionCreated {
    pub session_id: String,
    #[serde(default)]
    pub position: usize,
}

/// `200` of `GET /session/{id}`: `waiting` or `active`, and the position (0 when active).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    pub status: Cow<'static, str>,
    #[serde(default)]
    pub position: usize,
}

impl SessionStatus {
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }
}

/// `200` of `POST /lab`: whether the running lab was reused, and its devices as netlab's
/// inspect gave them (the server passes them through byte for byte: `D` is `&RawValue`
/// there, `Box<RawValue>` in the client).
#[derive(Debug, Serialize, Deserialize)]
pub struct Acquired<D> {
    pub reused: bool,
    pub devices: D,
}

/// One device of [`Acquired::devices`].
#[derive(Debug, Deserialize)]
pub struct Device {
    pub name: String,
    #[serde(default)]
    pub raw: Option<Box<RawValue>>,
}

/// A pending teardown in [`Health`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingTeardown {
    pub work_dir: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub retry_in: Option<f64>,
}

/// `GET /debug/health`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Health {
    pub status: Cow<'static, str>,
    pub timestamp: f64,
    pub uptime: f64,
    pub sessions: usize,
    pub queue_length: usize,
    /// Seconds; so that a client can choose its heartbeat interval.
    pub active_timeout: f64,
    pub waiting_timeout: f64,
    /// Long-polls parked right now.
    pub long_polls: usize,
    /// At most this many are parked (from the open-files limit).
    pub long_poll_cap: usize,
    pub teardowns: Vec<PendingTeardown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

// ------------------------------------------------------------------------------- GET /queue

/// The running lab.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LabView {
    pub running: bool,
    pub topology: Option<String>,
    pub hash: Option<String>,
    pub devices: usize,
    pub device_names: Vec<String>,
    /// Each device's management address and type, from netlab's data.
    pub device_list: Vec<DeviceView>,
    pub started_at: Option<f64>,
    pub ref_count: u32,
    pub idle_since: Option<f64>,
}

/// What an operator wants to know of a device at a glance, from netlab's node data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceView {
    pub name: String,
    /// Management address: `mgmt.ipv4`, else `mgmt.ipv6`, else `ansible_host`.
    pub mgmt: Option<String>,
    /// netlab's device type: `device`, else `ansible_network_os` (`inspect --node` gives
    /// the latter only).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The image or box the device runs.
    #[serde(rename = "box")]
    pub image: Option<String>,
}

impl DeviceView {
    /// From one entry of a lab's device list (`{"name", "raw"}`).
    pub fn from_device(device: &serde_json::Value) -> Option<DeviceView> {
        let name = device.get("name")?.as_str()?.to_owned();
        let raw = &device["raw"];
        let text = |path: &[&str]| {
            let mut v = raw;
            for key in path {
                v = v.get(key)?;
            }
            v.as_str().map(str::to_owned)
        };
        Some(DeviceView {
            name,
            mgmt: text(&["mgmt", "ipv4"])
                .or_else(|| text(&["mgmt", "ipv6"]))
                .or_else(|| text(&["ansible_host"])),
            kind: text(&["device"]).or_else(|| text(&["ansible_network_os"])),
            image: text(&["box"]),
        })
    }
}

/// A netlab command running now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Operation {
    pub command: Cow<'static, str>,
    /// The slot it runs in (1 for the first); none for an upload.
    pub slot: Option<usize>,
    pub since: f64,
    pub session: Option<String>,
}

/// One session, its id cut to an 8-character prefix.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionView {
    pub position: usize,
    pub status: Cow<'static, str>,
    pub id: String,
    pub client_name: Option<String>,
    pub owner: Option<String>,
    pub address: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: f64,
    pub active_since: Option<f64>,
    pub last_seen_ago: f64,
    pub holds_lab: bool,
    pub acquiring: bool,
    /// The 12-character prefix of the topology hash it declared (`X-Topology-SHA256`).
    #[serde(default)]
    pub declared: Option<String>,
    /// How often it was passed over by a promotion ahead.
    #[serde(default)]
    pub skips: u32,
    /// It went ahead of others for the lab it declared.
    #[serde(default)]
    pub promoted_ahead: bool,
}

/// Whether a host takes work: absent means `ok`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    #[default]
    Ok,
    /// An operator is taking it out: no new sessions, those there finish.
    Draining,
    /// Its lab starts kept failing for reasons not the topology's.
    Unhealthy,
    /// A state this client does not know yet.
    #[serde(other)]
    Unknown,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ok => "ok",
            HostState::Draining => "draining",
            HostState::Unhealthy => "unhealthy",
            HostState::Unknown => "unknown",
        }
    }
}

/// One lab slot (`--slots`; a host with one lab has one).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotView {
    /// 1 for the first.
    pub slot: usize,
    /// netlab's instance: `default`, or the multilab id.
    pub instance: String,
    /// `empty`, `starting`, `running` or `tearing_down`.
    pub state: Cow<'static, str>,
    pub topology: Option<String>,
    pub hash: Option<String>,
    /// The session whose slot it is (8-character prefix).
    pub holder: Option<String>,
    pub holder_name: Option<String>,
    pub ref_count: u32,
    /// Unix seconds its lab was last released, while no reference is held.
    pub idle_since: Option<f64>,
    pub devices: usize,
    pub device_names: Vec<String>,
    /// Unix seconds its lab came up.
    pub started_at: Option<f64>,
}

/// The whole `GET /queue` view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueView {
    pub time: f64,
    pub version: Cow<'static, str>,
    pub active_timeout: f64,
    pub waiting_timeout: f64,
    pub lab: LabView,
    pub operation: Option<Operation>,
    /// Every lab slot (one on a host without `--slots`; none from servers before slots).
    pub slots: Vec<SlotView>,
    pub teardowns_pending: usize,
    pub total: usize,
    pub truncated: bool,
    pub sessions: Vec<SessionView>,
    /// `ok`, `draining` or `unhealthy`; servers that do not say are `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_state: Option<HostState>,
    /// Why the host is not `ok` (for `unhealthy`, netlab's last error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_state_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_as_netlab_describes_them() {
        use serde_json::json;
        // What `netlab inspect --node` printed for a clab frr node (netlab 26.10).
        let real = json!({"name": "a1", "raw": {
            "box": "quay.io/frrouting/frr:10.7.1",
            "mgmt": {"ifname": "eth0", "ipv4": "192.168.121.101", "mac": "ca:fe:00:01:00:00"},
            "ansible_host": "clab-labb-a1", "ansible_network_os": "frr"}});
        let d = DeviceView::from_device(&real).unwrap();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"name": "a1", "mgmt": "192.168.121.101", "type": "frr",
                   "box": "quay.io/frrouting/frr:10.7.1"})
        );
        let sparse = json!({"name": "h1", "raw": {"device": "linux",
            "mgmt": {"ipv6": "2001:db8::1"}}});
        let d = DeviceView::from_device(&sparse).unwrap();
        assert_eq!(
            (d.mgmt.as_deref(), d.kind.as_deref(), d.image.as_deref()),
            (Some("2001:db8::1"), Some("linux"), None)
        );
        let odd = json!({"name": "x", "raw": {"mgmt": {"ipv4": 7}, "box": ["a"]}});
        let d = DeviceView::from_device(&odd).unwrap();
        assert_eq!((d.mgmt, d.kind, d.image), (None, None, None));
        assert!(DeviceView::from_device(&json!({"raw": {}})).is_none());
    }

    #[test]
    fn client_names_round_trip_through_the_header_encoding() {
        for name in ["job-1", "café ☕", "50% done", "a%41", "tab\there", ""] {
            let encoded = encode_client_name(name);
            assert!(
                encoded.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{encoded}"
            );
            assert_eq!(decode_client_name(&encoded), name.as_bytes(), "{encoded}");
        }
        assert_eq!(encode_client_name("café"), "caf%C3%A9");
        assert_eq!(decode_client_name("caf%c3%a9"), "café".as_bytes());
        // A `%` without two hex digits after it stays itself.
        assert_eq!(decode_client_name("100%"), b"100%");
        assert_eq!(decode_client_name("%4"), b"%4");
        assert_eq!(decode_client_name("%zz"), b"%zz");
    }

    #[test]
    fn older_answers_deserialise_with_defaults() {
        let health: Health = serde_json::from_str(r#"{"status":"ok","queue_length":1}"#).unwrap();
        assert_eq!(health.queue_length, 1);
        assert_eq!(health.active_timeout, 0.0);
        let queue: QueueView = serde_json::from_str(r#"{"total":2,"sessions":[]}"#).unwrap();
        assert_eq!(queue.host_state, None);
        let queue: QueueView =
            serde_json::from_str(r#"{"host_state":"sleeping","host_state_reason":null}"#).unwrap();
        assert_eq!(queue.host_state, Some(HostState::Unknown));
        let detail: Detail = serde_json::from_str(r#"{"detail":[{"loc":["x"]}]}"#).unwrap();
        assert_eq!(detail.detail.to_string(), r#"[{"loc":["x"]}]"#);
    }

    #[test]
    fn a_view_without_host_state_serialises_as_before() {
        let view = QueueView::default();
        let text = serde_json::to_string(&view).unwrap();
        assert!(!text.contains("host_state"), "{text}");
        assert!(text.ends_with(r#""sessions":[]}"#), "{text}");
    }
}
