//! The read-only views that let everyone see the lab host: `GET /queue`, `GET /events`,
//! `GET /lab/log`, `GET /metrics` and the status page `GET /`, and the client's identity
//! (`X-Client-Name`, address, `User-Agent`) taken at `POST /session`.
//!
//! None of them needs a session, none refreshes one, and none lists a full session id:
//! those are bearer credentials, so lists show 8-character prefixes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use tiny_http::Request;

use crate::core::host::Condition;
use crate::core::queue::{ClientInfo, SessionId, Status};
use crate::core::state::{Shared, Slot, State, file_name};
use crate::http::reply::{Reply, header_value, query_param};
use crate::lab::record::{self, Hash};
use crate::observe::events::{self, now_ms, prefix, secs, who};
use crate::observe::lablog::Job;
use crate::observe::metrics::{self, Ended, METRICS};
use crate::protocol::{
    self, DeviceView, HostState, LOG_COMMAND_HEADER, LOG_DONE_HEADER, LOG_OFFSET_HEADER, LabView,
    Operation, QueueView, SessionView, SlotView,
};

pub use crate::protocol::{CLIENT_NAME_HEADER, TOPOLOGY_SHA256_HEADER as TOPOLOGY_HEADER};
/// Longest client name, in characters.
pub const MAX_NAME: usize = protocol::MAX_CLIENT_NAME;
/// Default and largest `limit` of `GET /queue`.
pub const QUEUE_LIMIT: usize = 1000;
pub const QUEUE_LIMIT_MAX: u64 = 1_000_000;
/// Default `limit` of `GET /events`.
pub const EVENTS_LIMIT: usize = 100;
/// Largest `since` and `offset` accepted (2^53, what a JavaScript number holds exactly).
pub const MAX_NUMBER: u64 = 1 << 53;

fn name_error(kind: &str, msg: &str) -> Reply {
    Reply::validation(kind, ["header", CLIENT_NAME_HEADER], msg, None)
}

/// Checks an `X-Client-Name` value. Header values are ASCII on the wire (tiny_http refuses
/// other bytes with a 400), so names beyond ASCII are sent percent-encoded (`%C3%A9`) and
/// decoded here as UTF-8. Empty means no name.
pub fn parse_client_name(raw: &str) -> Result<Option<String>, Reply> {
    let raw = raw.trim();
    if raw.len() > MAX_NAME * 12 {
        return Err(too_long());
    }
    let name = String::from_utf8(protocol::decode_client_name(raw)).map_err(|_| {
        name_error(
            "string_unicode",
            "X-Client-Name must be valid UTF-8 (percent-encode characters beyond ASCII)",
        )
    })?;
    let invisible = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}' | '\u{061c}');
    if name.chars().any(|c| c.is_control() || invisible(c)) {
        return Err(name_error(
            "string_pattern_mismatch",
            "X-Client-Name must be printable: no control characters, bidi controls or line separators",
        ));
    }
    if name.chars().count() > MAX_NAME {
        return Err(too_long());
    }
    Ok((!name.is_empty()).then_some(name))
}

fn too_long() -> Reply {
    name_error(
        "string_too_long",
        "X-Client-Name should have at most 200 characters",
    )
}

/// Checks an `X-Topology-SHA256` value: the SHA-256 of the topology file the session will
/// upload, 64 hexadecimal digits (either case). Anything else is a 422 naming the header.
pub fn parse_declared(raw: &str) -> Result<Hash, Reply> {
    record::parse_hex(raw.trim()).ok_or_else(|| {
        Reply::validation(
            "string_pattern_mismatch",
            ["header", TOPOLOGY_HEADER],
            "String should match pattern '^[0-9a-fA-F]{64}$'",
            Some(cut(raw)),
        )
    })
}

/// Who is calling `POST /session`: the name it gives, its address, its `User-Agent` (cut to
/// 200 characters, control characters dropped: it is shown, never judged), and the topology
/// it declares.
pub fn client_info(request: &Request) -> Result<ClientInfo, Reply> {
    let name = match header_value(request, CLIENT_NAME_HEADER) {
        Some(raw) => parse_client_name(raw)?,
        None => None,
    };
    let user_agent = header_value(request, "User-Agent").map(|ua| {
        ua.chars()
            .filter(|c| !c.is_control())
            .take(MAX_NAME)
            .collect::<String>()
    });
    let declared = match header_value(request, TOPOLOGY_HEADER) {
        Some(raw) => Some(parse_declared(raw)?),
        None => None,
    };
    Ok(ClientInfo {
        name,
        addr: request.remote_addr().map(|a| a.ip().to_string()),
        user_agent,
        created_ms: now_ms(),
        owner: None,
        declared,
    })
}

/// A session was created and is in the state file.
pub fn note_created(shared: &Shared, id: &SessionId, info: &ClientInfo, position: usize) {
    METRICS.session_created();
    shared.events.emit(
        "session_created",
        events::with(
            who(id, info.name.as_deref(), info.owner.as_deref()),
            json!({
                "position": position,
                "addr": info.addr,
                "user_agent": info.user_agent,
                "declared": info.declared.as_ref().map(hash_prefix),
            }),
        ),
    );
    if position == 0 {
        METRICS.queue_wait.observe(Duration::ZERO);
    }
}

/// A `POST /session` turned away: the queue is full (`Refused`), or the host is draining.
pub fn note_refused(shared: &Shared, info: &ClientInfo, why: Ended) {
    METRICS.session_ended(why);
    shared.events.emit(
        "session_ended",
        json!({
            "session": null,
            "client": info.name,
            "reason": why.as_str(),
            "addr": info.addr,
        }),
    );
}

/// `POST /lab/release` (under the state lock).
pub fn note_released(shared: &Shared, state: &State, id: &SessionId, ref_count: u32) {
    let info = state.queue.info(id).map(|(i, _)| i).unwrap_or_default();
    shared.events.emit(
        "lab_released",
        events::with(
            who(id, info.name.as_deref(), info.owner.as_deref()),
            json!({ "ref_count": ref_count }),
        ),
    );
}

/// The 12-character prefix of a hash that views show.
pub fn hash_prefix(hash: &Hash) -> String {
    record::hex(hash)[..12].to_owned()
}

// ------------------------------------------------------------------------------- queries

/// A whole number from a query parameter in `0..=max`; absent gives `default`.
fn number(query: &str, name: &str, default: u64, max: u64) -> Result<u64, Reply> {
    let Some(text) = query_param(query, name) else {
        return Ok(default);
    };
    let text = text.trim();
    let loc = ["query", name];
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(Reply::validation(
                "less_than_equal",
                loc,
                &format!("Input should be less than or equal to {max}"),
                Some(cut(text)),
            )),
        };
    }
    if text.starts_with('-') && text.len() > 1 && text[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reply::validation(
            "greater_than_equal",
            loc,
            "Input should be greater than or equal to 0",
            Some(cut(text)),
        ));
    }
    Err(Reply::validation(
        "int_parsing",
        loc,
        "Input should be a valid integer, unable to parse string as an integer",
        Some(cut(text)),
    ))
}

/// At most 100 bytes of a rejected input are echoed.
fn cut(text: &str) -> &str {
    let mut end = text.len().min(100);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

// ------------------------------------------------------------------------------- GET /queue

/// A slot as the lock holder copied it: the slot, whether a teardown of its instance is
/// pending, its holder's client name.
type SlotCopy = (Slot, bool, Option<String>);

fn slot_copies(state: &State) -> Vec<SlotCopy> {
    state
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let name = slot
                .holder
                .filter(|_| slot.lab.is_some() || slot.starting.is_some())
                .and_then(|h| state.queue.info(&h))
                .and_then(|(info, _)| info.name.clone());
            (slot.clone(), state.tearing_down(i), name)
        })
        .collect()
}

fn device_list(lab: Option<&record::LabRecord>) -> Vec<DeviceView> {
    lab.and_then(|l| serde_json::from_str::<Vec<serde_json::Value>>(l.devices_json.get()).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(DeviceView::from_device)
        .collect()
}

fn device_names(lab: Option<&record::LabRecord>) -> Vec<String> {
    device_list(lab).into_iter().map(|d| d.name).collect()
}

/// The slots as `GET /queue` (and `GET /lab` without a session) shows them.
fn slot_entries(copies: &[SlotCopy]) -> Vec<SlotView> {
    copies
        .iter()
        .enumerate()
        .map(|(i, (slot, tearing_down, name))| {
            let lab = slot.lab.as_ref();
            let holder = slot
                .holder
                .filter(|_| lab.is_some() || slot.starting.is_some());
            let names = device_names(lab);
            SlotView {
                slot: i + 1,
                instance: record::instance_name(slot.instance),
                state: slot.phase(*tearing_down).into(),
                topology: lab.map(|l| file_name(&l.topology)),
                hash: lab.map(|l| hash_prefix(&l.hash)),
                holder: holder.as_ref().map(prefix),
                holder_name: name.clone(),
                ref_count: lab.map_or(0, |l| l.ref_count),
                idle_since: lab
                    .filter(|l| l.ref_count == 0 && slot.last_used_ms > 0)
                    .map(|_| secs(slot.last_used_ms)),
                devices: names.len(),
                device_names: names,
                started_at: lab.and(slot.lab_started_ms).map(secs),
            }
        })
        .collect()
}

/// `GET /lab` without a session, with several slots: `{"slots": [...]}` as `GET /queue`
/// shows them.
pub fn slots_json(shared: &Shared) -> Reply {
    #[derive(Serialize)]
    struct Slots {
        slots: Vec<SlotView>,
    }
    let copies = slot_copies(&shared.lock());
    Reply::json(
        200,
        &Slots {
            slots: slot_entries(&copies),
        },
    )
}

/// The queue view, taken with one short hold of the state lock (copies of the first `limit`
/// rows); everything else is done after it is released.
pub fn queue_view(shared: &Shared, limit: usize) -> QueueView {
    let now = shared.clock.now();
    let wall = unix_now();
    let (rows, total, copies, acquiring, teardowns) = {
        let state = shared.lock();
        (
            state.queue.rows(now, limit),
            state.queue.len(),
            slot_copies(&state),
            state.acquiring().map(|t| t.session),
            state.teardowns.len(),
        )
    };
    let (first, _, _) = &copies[0];
    let lab = first.lab.as_ref();
    let device_list = device_list(lab);
    let names: Vec<String> = device_list.iter().map(|d| d.name.clone()).collect();
    let lab_view = LabView {
        running: lab.is_some(),
        topology: lab.map(|l| file_name(&l.topology)),
        hash: lab.map(|l| hash_prefix(&l.hash)),
        devices: names.len(),
        device_names: names,
        device_list,
        started_at: lab.and(first.lab_started_ms).map(secs),
        ref_count: lab.map_or(0, |l| l.ref_count),
        idle_since: lab
            .and(first.idle_since)
            .map(|since| wall - now.saturating_sub(since).as_secs_f64()),
    };
    let operation = operation(shared, &copies, acquiring, wall);
    let single = copies.len() == 1;
    let holds = |id: &SessionId, active: bool| {
        copies.iter().any(|(slot, _, _)| {
            active
                && (single || slot.holder == Some(*id))
                && slot.lab.as_ref().is_some_and(|l| l.ref_count > 0)
        })
    };
    let sessions = rows
        .into_iter()
        .map(|row| {
            let active = row.status == Status::Active;
            SessionView {
                position: row.position,
                status: row.status.as_str().into(),
                id: prefix(&row.id),
                client_name: row.info.name.clone(),
                owner: row.info.owner.clone(),
                address: row.info.addr.clone(),
                user_agent: row.info.user_agent.clone(),
                created_at: secs(row.info.created_ms),
                active_since: row.active_since_ms.filter(|_| active).map(secs),
                last_seen_ago: row.silent.as_secs_f64(),
                holds_lab: holds(&row.id, active),
                acquiring: row.busy,
                declared: row.info.declared.as_ref().map(hash_prefix),
                skips: row.skips,
                promoted_ahead: row.ahead,
            }
        })
        .collect::<Vec<_>>();
    let (host_state, host_state_reason) = shared.host.condition();
    QueueView {
        time: wall,
        version: env!("CARGO_PKG_VERSION").into(),
        active_timeout: shared.config.active_timeout.as_secs_f64(),
        waiting_timeout: shared.config.waiting_timeout.as_secs_f64(),
        host_state: Some(match host_state {
            Condition::Ok => HostState::Ok,
            Condition::Draining => HostState::Draining,
            Condition::Unhealthy => HostState::Unhealthy,
        }),
        host_state_reason,
        lab: lab_view,
        operation,
        slots: slot_entries(&copies),
        teardowns_pending: teardowns,
        truncated: total > sessions.len(),
        total,
        sessions,
    }
}

/// The netlab command running now in any slot (and for whom, for an `up`), else the upload
/// in progress.
fn operation(
    shared: &Shared,
    copies: &[SlotCopy],
    acquiring: Option<SessionId>,
    wall: f64,
) -> Option<Operation> {
    let running = copies.iter().enumerate().find_map(|(i, (slot, _, _))| {
        shared
            .lab_log(i)
            .running()
            .map(|(command, since)| (i, slot, command, since))
    });
    match running {
        Some((i, slot, command, since)) => Some(Operation {
            command: command.into(),
            slot: Some(i + 1),
            since: secs(since),
            session: if command == "up" {
                slot.starting.as_ref().map(|s| prefix(&s.session))
            } else {
                None
            },
        }),
        None => acquiring.map(|s| Operation {
            command: "upload".into(),
            slot: None,
            since: wall,
            session: Some(prefix(&s)),
        }),
    }
}

pub fn queue(shared: &Shared, query: &str) -> Reply {
    let limit = match number(query, "limit", QUEUE_LIMIT as u64, QUEUE_LIMIT_MAX) {
        Ok(n) => n as usize,
        Err(reply) => return reply,
    };
    Reply::json(200, &queue_view(shared, limit))
}

// ------------------------------------------------------------------------------- GET /events

/// `{"last_id":N,"events":[...]}`, newest first.
pub fn events_json(shared: &Shared, limit: usize, since: u64) -> String {
    #[derive(Serialize)]
    struct Events<'a> {
        last_id: u64,
        events: Vec<&'a RawValue>,
    }
    let events = shared.events.newest(limit, since);
    let body = Events {
        last_id: shared.events.last_id(),
        events: events.iter().map(|e| &*e.json).collect(),
    };
    serde_json::to_string(&body).unwrap_or_default()
}

pub fn events(shared: &Shared, query: &str) -> Reply {
    let limit = match number(
        query,
        "limit",
        EVENTS_LIMIT as u64,
        events::MAX_LIMIT as u64,
    ) {
        Ok(n) => n as usize,
        Err(reply) => return reply,
    };
    let since = match number(query, "since", 0, MAX_NUMBER) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    Reply::raw_json(200, events_json(shared, limit, since))
}

// ------------------------------------------------------------------------------- GET /lab/log

pub fn lab_log(shared: &Shared, query: &str) -> Reply {
    let offset = match number(query, "offset", 0, MAX_NUMBER) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let job = match query_param(query, "command").as_deref() {
        None | Some("") => None,
        Some("up") => Some(Job::Up),
        Some("down") => Some(Job::Down),
        Some(other) => {
            return Reply::validation(
                "enum",
                ["query", "command"],
                "Input should be 'up' or 'down'",
                Some(cut(other)),
            );
        }
    };
    let slots = shared.lab_logs.len();
    let slot = match number(query, "slot", 1, MAX_NUMBER) {
        Ok(n) if (1..=slots as u64).contains(&n) => n as usize - 1,
        Ok(n) => {
            return Reply::validation(
                "less_than_equal",
                ["query", "slot"],
                &format!("Input should be a slot number from 1 to {slots}"),
                Some(&n.to_string()),
            );
        }
        Err(reply) => return reply,
    };
    let chunk = shared.lab_log(slot).read(offset, job);
    Reply::typed(200, "text/plain; charset=utf-8", chunk.text)
        .with_header(LOG_OFFSET_HEADER, chunk.next.to_string())
        .with_header(LOG_COMMAND_HEADER, chunk.command.unwrap_or("none"))
        .with_header(LOG_DONE_HEADER, if chunk.done { "true" } else { "false" })
        .with_header("Cache-Control", "no-store")
}

// ------------------------------------------------------------------------------- GET /metrics

pub fn metrics(shared: &Shared) -> Reply {
    let now = now_ms();
    let gauges = {
        let state = shared.lock();
        let slots = state.slots.len();
        let head = state.queue.rows(Duration::ZERO, slots + 1);
        let since = |ms: u64| secs(now.saturating_sub(ms));
        metrics::Gauges {
            slots: state
                .slots
                .iter()
                .map(|s| metrics::SlotGauges {
                    instance: record::instance_name(s.instance),
                    up: s.lab.is_some(),
                    references: s.lab.as_ref().map_or(0, |l| l.ref_count),
                    starting: s.starting.is_some(),
                })
                .collect(),
            active_for: head
                .iter()
                .filter_map(|r| r.active_since_ms.filter(|_| r.status == Status::Active))
                .min()
                .map_or(0.0, since),
            oldest_wait: head
                .iter()
                .find(|r| r.status == Status::Waiting)
                .map_or(0.0, |r| since(r.info.created_ms)),
            active_timeout: shared.config.active_timeout.as_secs_f64(),
            waiting_timeout: shared.config.waiting_timeout.as_secs_f64(),
            active: state.queue.active_count(),
            waiting: state.queue.waiting(),
            lab_up: state.labs_running() > 0,
            lab_references: state
                .slots
                .iter()
                .filter_map(|s| s.lab.as_ref())
                .map(|l| l.ref_count)
                .sum(),
            start_in_progress: state.acquiring().is_some(),
            teardowns_pending: state.teardowns.len(),
            events: 0,
            host_state: "ok",
            host_start_failures: 0,
        }
    };
    let gauges = metrics::Gauges {
        events: shared.events.last_id(),
        host_state: shared.host.condition().0.as_str(),
        host_start_failures: shared.host.failures(),
        ..gauges
    };
    Reply::typed(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        metrics::render(&gauges, shared.started_at),
    )
}

// ------------------------------------------------------------------------------- GET /

pub fn status_page(shared: &Shared) -> Reply {
    let view = queue_view(shared, 200);
    let events = events_json(shared, 50, 0);
    let log = shared.lab_log(0).read(0, None);
    let html = crate::observe::status_page::render(&view, &events, &log);
    Reply::typed(200, "text/html; charset=utf-8", html)
        .with_header("Cache-Control", "no-store")
        .with_header(
            "Content-Security-Policy",
            crate::observe::status_page::content_security_policy(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<Option<String>, Reply>) -> Result<Option<String>, u16> {
        r.map_err(|e| e.status)
    }

    #[test]
    fn client_names() {
        assert_eq!(
            status(parse_client_name("ci job 7")),
            Ok(Some("ci job 7".into()))
        );
        assert_eq!(status(parse_client_name("")), Ok(None));
        assert_eq!(
            status(parse_client_name("caf%C3%A9")),
            Ok(Some("café".into()))
        );
        assert_eq!(status(parse_client_name("100%")), Ok(Some("100%".into())));
        assert_eq!(status(parse_client_name("%FF%FE")), Err(422));
        assert_eq!(status(parse_client_name("a%0Ab")), Err(422));
        assert_eq!(status(parse_client_name("a\tb")), Err(422));
        assert_eq!(
            status(parse_client_name(&"x".repeat(200))),
            Ok(Some("x".repeat(200)))
        );
        assert_eq!(status(parse_client_name(&"x".repeat(201))), Err(422));
        assert_eq!(
            status(parse_client_name(&"%C3%A9".repeat(200))),
            Ok(Some("é".repeat(200)))
        );
    }

    #[test]
    fn declared_topologies() {
        let hex = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
        let hash = parse_declared(hex).unwrap();
        assert_eq!(record::hex(&hash), hex.to_ascii_lowercase());
        assert_eq!(parse_declared(&format!(" {hex} ")).ok(), Some(hash));
        for bad in [
            "",
            &hex[1..],
            &format!("{hex}0"),
            &format!("{}g", &hex[1..]),
            &format!("+{}", &hex[1..]),
            &format!("{hex}  topology.yml"),
        ] {
            let e = parse_declared(bad).unwrap_err();
            assert_eq!(e.status, 422, "{bad}");
            let body: serde_json::Value =
                serde_json::from_slice(e.body.as_deref().unwrap()).unwrap();
            assert_eq!(
                body["detail"][0]["loc"],
                json!(["header", "X-Topology-SHA256"])
            );
            assert_eq!(body["detail"][0]["type"], "string_pattern_mismatch");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(number("", "limit", 7, 10).ok(), Some(7));
        assert_eq!(number("limit=3", "limit", 7, 10).ok(), Some(3));
        for bad in [
            "limit=-1",
            "limit=11",
            "limit=abc",
            "limit=",
            "limit=1e3",
            "limit=99999999999999999999999",
        ] {
            let e = number(bad, "limit", 7, 10).unwrap_err();
            assert_eq!(e.status, 422, "{bad}");
        }
    }
}
