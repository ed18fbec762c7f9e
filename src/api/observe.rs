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

use crate::core::queue::{ClientInfo, SessionId};
use crate::core::state::{Shared, State, file_name};
use crate::http::reply::{Reply, header_value, query_param};
use crate::lab::record;
use crate::observe::events::{self, now_ms, prefix, secs, who};
use crate::observe::lablog::Job;
use crate::observe::metrics::{self, Ended, METRICS};
use crate::observe::views::{DeviceView, LabView, Operation, QueueView, SessionView};

pub const CLIENT_NAME_HEADER: &str = "X-Client-Name";
/// Longest client name, in characters.
pub const MAX_NAME: usize = 200;
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
    let mut bytes = Vec::with_capacity(raw.len());
    let b = raw.as_bytes();
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
    let name = String::from_utf8(bytes).map_err(|_| {
        name_error(
            "string_unicode",
            "X-Client-Name must be valid UTF-8 (percent-encode characters beyond ASCII)",
        )
    })?;
    if name.chars().any(char::is_control) {
        return Err(name_error(
            "string_pattern_mismatch",
            "X-Client-Name must be printable: no control characters",
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

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Who is calling `POST /session`: the name it gives, its address, its `User-Agent` (cut to
/// 200 characters, control characters dropped: it is shown, never judged).
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
    Ok(ClientInfo {
        name,
        addr: request.remote_addr().map(|a| a.ip().to_string()),
        user_agent,
        created_ms: now_ms(),
        owner: None,
    })
}

/// A session was created (under the state lock; recording an event writes no file).
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
            }),
        ),
    );
    if position == 0 {
        METRICS.queue_wait.observe(Duration::ZERO);
    }
}

/// A `POST /session` turned away because the queue is full.
pub fn note_refused(shared: &Shared, info: &ClientInfo) {
    METRICS.session_ended(Ended::Refused);
    shared.events.emit(
        "session_ended",
        json!({
            "session": null,
            "client": info.name,
            "reason": Ended::Refused.as_str(),
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

/// The queue view, taken with one short hold of the state lock (copies of the first `limit`
/// rows); everything else is done after it is released.
pub fn queue_view(shared: &Shared, limit: usize) -> QueueView {
    let now = shared.clock.now();
    let wall = unix_now();
    let (rows, total, lab, lab_started, idle_since, starting, acquiring, teardowns) = {
        let state = shared.lock();
        (
            state.queue.rows(now, limit),
            state.queue.len(),
            state.lab.clone(),
            state.lab_started_ms,
            state.idle_since,
            state.starting.as_ref().map(|s| s.session),
            state.acquiring().map(|t| t.session),
            state.teardowns.len(),
        )
    };
    let device_list: Vec<DeviceView> = lab
        .as_ref()
        .and_then(|l| serde_json::from_str::<Vec<serde_json::Value>>(l.devices_json.get()).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(DeviceView::from_device)
        .collect();
    let device_names: Vec<String> = device_list.iter().map(|d| d.name.clone()).collect();
    let lab_view = LabView {
        running: lab.is_some(),
        topology: lab.as_ref().map(|l| file_name(&l.topology)),
        hash: lab.as_ref().map(|l| record::hex(&l.hash)[..12].to_owned()),
        devices: device_names.len(),
        device_names,
        device_list,
        started_at: lab.as_ref().and(lab_started).map(secs),
        ref_count: lab.as_ref().map_or(0, |l| l.ref_count),
        idle_since: lab
            .as_ref()
            .and(idle_since)
            .map(|since| wall - now.saturating_sub(since).as_secs_f64()),
    };
    let operation = match shared.lab_log.running() {
        Some((command, since)) => Some(Operation {
            command,
            since: secs(since),
            session: if command == "up" {
                starting.as_ref().map(prefix)
            } else {
                None
            },
        }),
        None => acquiring.map(|s| Operation {
            command: "upload",
            since: wall,
            session: Some(prefix(&s)),
        }),
    };
    let holds = lab.as_ref().is_some_and(|l| l.ref_count > 0);
    let sessions = rows
        .into_iter()
        .enumerate()
        .map(|(position, row)| SessionView {
            position,
            status: if position == 0 { "active" } else { "waiting" },
            id: prefix(&row.id),
            client_name: row.info.name.clone(),
            owner: row.info.owner.clone(),
            address: row.info.addr.clone(),
            user_agent: row.info.user_agent.clone(),
            created_at: secs(row.info.created_ms),
            active_since: row.active_since_ms.filter(|_| position == 0).map(secs),
            last_seen_ago: row.silent.as_secs_f64(),
            holds_lab: position == 0 && holds,
            acquiring: row.busy,
        })
        .collect::<Vec<_>>();
    QueueView {
        time: wall,
        version: env!("CARGO_PKG_VERSION"),
        active_timeout: shared.config.active_timeout.as_secs_f64(),
        waiting_timeout: shared.config.waiting_timeout.as_secs_f64(),
        lab: lab_view,
        operation,
        teardowns_pending: teardowns,
        truncated: total > sessions.len(),
        total,
        sessions,
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
    let chunk = shared.lab_log.read(offset, job);
    Reply::typed(200, "text/plain; charset=utf-8", chunk.text)
        .with_header("X-Log-Offset", chunk.next.to_string())
        .with_header("X-Log-Command", chunk.command.unwrap_or("none"))
        .with_header("X-Log-Done", if chunk.done { "true" } else { "false" })
        .with_header("Cache-Control", "no-store")
}

// ------------------------------------------------------------------------------- GET /metrics

pub fn metrics(shared: &Shared) -> Reply {
    let now = now_ms();
    let gauges = {
        let state = shared.lock();
        let head = state.queue.rows(Duration::ZERO, 2);
        let since = |ms: u64| secs(now.saturating_sub(ms));
        metrics::Gauges {
            active_for: head
                .first()
                .and_then(|r| r.active_since_ms)
                .map_or(0.0, since),
            oldest_wait: head.get(1).map_or(0.0, |r| since(r.info.created_ms)),
            active_timeout: shared.config.active_timeout.as_secs_f64(),
            waiting_timeout: shared.config.waiting_timeout.as_secs_f64(),
            active: usize::from(!state.queue.is_empty()),
            waiting: state.queue.waiting(),
            lab_up: state.lab.is_some(),
            lab_references: state.lab.as_ref().map_or(0, |l| l.ref_count),
            start_in_progress: state.acquiring().is_some(),
            teardowns_pending: state.teardowns.len(),
            events: 0,
        }
    };
    let gauges = metrics::Gauges {
        events: shared.events.last_id(),
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
    let log = shared.lab_log.read(0, None);
    let html = crate::observe::status_page::render(&view, &events, &log);
    Reply::typed(200, "text/html; charset=utf-8", html)
        .with_header("Cache-Control", "no-store")
        .with_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'none'",
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
