//! The body of `GET /queue`: built by `observe` from the state, rendered by `status_page`
//! too.

use serde::Serialize;

/// The running lab.
#[derive(Serialize)]
pub struct LabView {
    pub running: bool,
    pub topology: Option<String>,
    pub hash: Option<String>,
    pub devices: usize,
    pub device_names: Vec<String>,
    pub started_at: Option<f64>,
    pub ref_count: u32,
    pub idle_since: Option<f64>,
}

/// One lab slot (`slots` of `GET /queue`, and `GET /lab` without a session with several
/// slots).
#[derive(Serialize)]
pub struct SlotEntry {
    /// 1 for the first.
    pub slot: usize,
    /// netlab's instance: `default`, or the multilab id.
    pub instance: String,
    /// `empty`, `starting`, `running` or `tearing_down`.
    pub state: &'static str,
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

/// A netlab command running now.
#[derive(Serialize)]
pub struct Operation {
    pub command: &'static str,
    /// The slot it runs in (1 for the first); none for an upload.
    pub slot: Option<usize>,
    pub since: f64,
    pub session: Option<String>,
}

/// One session, its id cut to an 8-character prefix.
#[derive(Serialize)]
pub struct SessionView {
    pub position: usize,
    pub status: &'static str,
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
}

/// The whole view.
#[derive(Serialize)]
pub struct QueueView {
    pub time: f64,
    pub version: &'static str,
    pub active_timeout: f64,
    pub waiting_timeout: f64,
    pub lab: LabView,
    pub operation: Option<Operation>,
    pub slots: Vec<SlotEntry>,
    pub teardowns_pending: usize,
    pub total: usize,
    pub truncated: bool,
    pub sessions: Vec<SessionView>,
}
