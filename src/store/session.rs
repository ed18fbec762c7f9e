//! A session as the state file keeps it, and the id clients see: the types the queue and
//! the state file share (the queue above builds on them; the file below the queue must not
//! reach up for them).

use std::sync::Arc;

use uuid::Uuid;

use crate::lab::record::Hash;

/// A session id as the clients see it: a lower-case hyphenated UUID v4.
pub type SessionId = Uuid;

/// Parses a session id exactly as the server hands them out. Any other spelling (upper case,
/// braces, no hyphens) is not a tracked id, so it is "not found" like any other string.
pub fn parse_session_id(text: &str) -> Option<SessionId> {
    if text.len() != 36 {
        return None;
    }
    let id = Uuid::try_parse(text).ok()?;
    let mut buf = [0u8; 36];
    (id.hyphenated().encode_lower(&mut buf) == text).then_some(id)
}

/// Who a session is, as far as the server can tell: shown in the queue view, the events and
/// the status page, kept in the state file. The name is client-supplied (never trusted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// `X-Client-Name` of `POST /session`.
    pub name: Option<String>,
    /// The peer address of `POST /session`.
    pub addr: Option<String>,
    pub user_agent: Option<String>,
    /// Unix time of creation, in milliseconds.
    pub created_ms: u64,
    /// The name of the access token that created it (with `--token-file`).
    pub owner: Option<String>,
    /// `X-Topology-SHA256` of `POST /session`: the topology it said it would upload.
    pub declared: Option<Hash>,
}

/// One session as the state file keeps it: its id, its owner, what is known of its client
/// and since when it is ACTIVE. The file lists them in queue order.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRecord {
    pub id: SessionId,
    /// The token name that created it (with `--token-file`).
    pub owner: Option<Arc<str>>,
    pub info: Arc<ClientInfo>,
    /// Unix time (ms) it became ACTIVE, if it did.
    pub active_since_ms: Option<u64>,
    /// How often it was passed over by a promotion ahead.
    pub skips: u32,
    /// It was promoted ahead of others (for the lab it declared).
    pub ahead: bool,
}
