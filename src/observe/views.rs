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

/// A netlab command running now.
#[derive(Serialize)]
pub struct Operation {
    pub command: &'static str,
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
    /// `ok`, `draining` (no new sessions) or `unhealthy` (`POST /lab` refused).
    pub host_state: &'static str,
    /// Why the host is not `ok`: who drained it, or netlab's last error.
    pub host_state_reason: Option<String>,
    pub lab: LabView,
    pub operation: Option<Operation>,
    pub teardowns_pending: usize,
    pub total: usize,
    pub truncated: bool,
    pub sessions: Vec<SessionView>,
}
