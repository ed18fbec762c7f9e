//! Routing and one handler per endpoint. Handlers run on the worker threads; they read the
//! request, change the shared state under its lock, and return a [`Reply`], or, for a
//! `POST /lab` that has to run netlab, a [`StartJob`] for the lab thread.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tiny_http::{Method, Request};
use uuid::Uuid;

use crate::acquire::{self, Pending};
use crate::auth::Identity;
use crate::config::parse_bool;
use crate::http::Reply;
use crate::lab::{self, Destroy};
use crate::lab_thread::StartJob;
use crate::longpoll;
use crate::observe;
use crate::persist::NotPersisted;
use crate::queue::{SessionId, Status, parse_session_id};
use crate::state::Shared;

pub const SESSION_HEADER: &str = "X-Session-ID";

pub enum Outcome {
    Reply(Reply),
    /// Hand the request to the lab thread, which answers it when netlab is done.
    Lab(StartJob),
    /// Read the `POST /lab` body on an upload thread (see [`crate::acquire`]).
    Upload(Pending),
    /// Park a long-poll: session, the state it was seen in, and the deadline (see
    /// [`crate::longpoll`]).
    Park(SessionId, (Status, usize), Duration),
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Self {
        Outcome::Reply(reply)
    }
}

/// The routes, by path. A path can match two routes (`/session/heartbeat` is also a
/// `/session/{id}`); the methods of both are allowed there.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Sessions,
    Heartbeat,
    Session(&'a str),
    ActiveSession,
    Healthz,
    DebugHealth,
    OpenApi,
    Lab,
    LabRelease,
    LabDevices,
    LabLog,
    QueueView,
    Events,
    Metrics,
    StatusPage,
}

fn route(path: &str) -> Option<Route<'_>> {
    Some(match path {
        "/session" => Route::Sessions,
        "/session/heartbeat" => Route::Heartbeat,
        "/active-session" => Route::ActiveSession,
        "/healthz" => Route::Healthz,
        "/debug/health" => Route::DebugHealth,
        "/openapi.json" => Route::OpenApi,
        "/lab" => Route::Lab,
        "/lab/release" => Route::LabRelease,
        "/lab/devices" => Route::LabDevices,
        "/lab/log" => Route::LabLog,
        "/queue" => Route::QueueView,
        "/events" => Route::Events,
        "/metrics" => Route::Metrics,
        "/" => Route::StatusPage,
        _ => match path.strip_prefix("/session/") {
            Some(id) if !id.contains('/') => Route::Session(id),
            _ => return None,
        },
    })
}

/// The `Allow` header of a path: every method of every route that matches it.
fn allow(route: &Route<'_>) -> &'static str {
    match route {
        Route::Sessions | Route::LabRelease => "POST",
        Route::Heartbeat => "GET, HEAD, DELETE, POST",
        Route::Session(_) => "GET, HEAD, DELETE",
        Route::Lab => "GET, HEAD, POST, DELETE",
        Route::ActiveSession
        | Route::Healthz
        | Route::DebugHealth
        | Route::OpenApi
        | Route::LabDevices
        | Route::LabLog
        | Route::QueueView
        | Route::Events
        | Route::Metrics
        | Route::StatusPage => "GET, HEAD",
    }
}

/// `HEAD` is served wherever `GET` is; tiny_http leaves the body out.
fn effective_method(method: &Method) -> Option<&'static str> {
    Some(match method {
        Method::Get | Method::Head => "GET",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        _ => return None,
    })
}

pub fn handle(shared: &Shared, request: &Request) -> Outcome {
    let url = request.url();
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let method = effective_method(request.method());
    // Before anything else, the body included: who is asking.
    let caller = match authorize(shared, request, path, method) {
        Ok(caller) => caller,
        Err(reply) => return reply.into(),
    };
    let caller = &caller;
    let Some(route) = route(path) else {
        return Reply::detail(404, "Not Found").into();
    };
    let reply = match (&route, method) {
        (Route::Sessions, Some("POST")) => create_session(shared, request, caller),
        (Route::Heartbeat, Some("POST")) => heartbeat(shared, request, caller),
        (Route::Heartbeat, Some("GET")) => session_status(shared, "heartbeat", caller),
        (Route::Heartbeat, Some("DELETE")) => end_session(shared, "heartbeat", caller),
        (Route::Session(id), Some("GET")) if query_param(query, "wait").is_some() => {
            return session_poll(shared, &percent_decode(id), query, caller);
        }
        (Route::Session(id), Some("GET")) => session_status(shared, &percent_decode(id), caller),
        (Route::Session(id), Some("DELETE")) => end_session(shared, &percent_decode(id), caller),
        (Route::ActiveSession, Some("GET")) => active_session(shared, caller),
        (Route::Healthz, Some("GET")) => match shared.degraded() {
            None => Reply::empty(204),
            Some(why) => Reply::detail(503, format!("degraded: {}", NotPersisted(why))),
        },
        (Route::DebugHealth, Some("GET")) => debug_health(shared),
        (Route::OpenApi, Some("GET")) => Reply::raw_json(200, crate::openapi::document()),
        (Route::Lab, Some("POST")) => return acquire::begin(shared, request, caller),
        (Route::Lab, Some("GET")) => lab_status(shared, request, caller),
        (Route::Lab, Some("DELETE")) => destroy_lab(shared, request, query, caller),
        (Route::LabRelease, Some("POST")) => release_lab(shared, request, caller),
        (Route::LabDevices, Some("GET")) => lab_devices(shared, request, caller),
        (Route::LabLog, Some("GET")) => observe::lab_log(shared, query),
        (Route::QueueView, Some("GET")) => observe::queue(shared, query),
        (Route::Events, Some("GET")) => observe::events(shared, query),
        (Route::Metrics, Some("GET")) => observe::metrics(shared),
        (Route::StatusPage, Some("GET")) => observe::status_page(shared),
        _ => Reply::detail(405, "Method Not Allowed").with_header("Allow", allow(&route)),
    };
    Outcome::Reply(reply)
}

// ------------------------------------------------------------------------------- access

/// Who is asking.
pub enum Caller {
    /// No `--token-file`: everyone may do everything, as with the Python server.
    Open,
    /// A read-only view opened to everyone by `--public-read`, or `/healthz`.
    Public,
    /// A request with a valid token, and the address it came from.
    Token(Identity, String),
}

impl Caller {
    /// The name a session created by this caller belongs to.
    fn owner(&self) -> Option<Arc<str>> {
        match self {
            Caller::Token(id, _) => Some(Arc::clone(&id.name)),
            Caller::Open | Caller::Public => None,
        }
    }

    /// May this caller see and use a session that belongs to `owner`? Without tokens,
    /// everyone may; with them, only its owner (a session made while the server was open
    /// belongs to nobody in particular: any valid token may use it).
    pub fn may_use(&self, owner: Option<&Arc<str>>) -> bool {
        match self {
            Caller::Open => true,
            Caller::Public => false,
            Caller::Token(id, _) => owner.is_none_or(|o| *o == id.name),
        }
    }

    fn is_admin(&self) -> bool {
        matches!(self, Caller::Token(id, _) if id.admin)
    }

    /// Records an admin's action on what is not its own, as an event naming the address.
    fn admin_event(&self, shared: &Shared, action: &str, mut fields: serde_json::Value) {
        if let (Caller::Token(id, from), Some(map)) = (self, fields.as_object_mut()) {
            map.insert("action".into(), action.into());
            map.insert("admin".into(), (*id.name).into());
            map.insert("addr".into(), from.as_str().into());
            shared.events.emit("admin_action", fields);
        }
    }

    /// The name to put in a log line about an action of this caller.
    fn describe(&self) -> String {
        match self {
            Caller::Token(id, from) if id.admin => format!(" by admin {:?} from {from}", &*id.name),
            Caller::Token(id, _) => format!(" by {:?}", &*id.name),
            Caller::Open | Caller::Public => String::new(),
        }
    }
}

/// The read-only views `--public-read` opens to requests without a token.
const PUBLIC_VIEWS: &[&str] = &[
    "/",
    "/queue",
    "/events",
    "/metrics",
    "/debug/health",
    "/openapi.json",
    "/lab/log",
];

pub const WWW_AUTHENTICATE: &str = "Basic realm=\"neops-remote-lab\", Bearer";

/// With `--token-file`: the caller's identity from `Authorization`, or the 401 (429 for an
/// address that failed too often). `/healthz` is always open.
fn authorize(
    shared: &Shared,
    request: &Request,
    path: &str,
    method: Option<&str>,
) -> Result<Caller, Reply> {
    let Some(access) = &shared.access else {
        return Ok(Caller::Open);
    };
    let reading = method == Some("GET");
    if reading && (path == "/healthz" || (access.public_read && PUBLIC_VIEWS.contains(&path))) {
        return Ok(Caller::Public);
    }
    let addr = request.remote_addr().map(|a| a.ip());
    let now = shared.clock.now();
    if let Some(retry) = addr.and_then(|a| access.throttle.blocked(a, now)) {
        return Err(
            Reply::detail(429, "Too many failed authentications; try again later")
                .with_header("Retry-After", retry.to_string()),
        );
    }
    let from = addr.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
    if let Some(identity) = access.identify(header_value(request, "Authorization")) {
        return Ok(Caller::Token(identity, from));
    }
    log::warn!(
        "authentication failed: {} {:?} from {from}",
        request.method(),
        path
    );
    shared.events.emit(
        "auth_failed",
        serde_json::json!({ "addr": from, "method": request.method().as_str(), "path": path }),
    );
    if let Some(addr) = addr
        && access.throttle.fail(addr, now)
    {
        log::warn!(
            "{addr} failed to authenticate {} times within {} s: refused for {} s",
            crate::auth::MAX_FAILURES,
            crate::auth::WINDOW.as_secs(),
            crate::auth::WINDOW.as_secs()
        );
        shared.events.emit(
            "auth_blocked",
            serde_json::json!({ "addr": from, "seconds": crate::auth::WINDOW.as_secs() }),
        );
    }
    Err(Reply::detail(401, "Not authenticated").with_header("WWW-Authenticate", WWW_AUTHENTICATE))
}

// ------------------------------------------------------------------------------- sessions

fn create_session(shared: &Shared, request: &Request, caller: &Caller) -> Reply {
    #[derive(Serialize)]
    struct Created {
        session_id: String,
        position: usize,
    }
    let info = match observe::client_info(request) {
        Ok(mut info) => {
            info.owner = caller.owner().map(|o| o.to_string());
            Arc::new(info)
        }
        Err(reply) => return reply,
    };
    let id = Uuid::new_v4();
    let now = shared.clock.now();
    let created = {
        let mut state = shared.lock();
        let created = state
            .queue
            .create_with(id, now, Arc::clone(&info))
            .map(|position| {
                state.queue.set_owner(&id, caller.owner());
                (position, state.changed())
            });
        if let Ok((position, _)) = &created {
            observe::note_created(shared, &id, &info, *position);
        }
        created
    };
    match created {
        Ok((position, version)) => {
            if let Err(e) = shared.persist(version) {
                return not_persisted(&e);
            }
            let by = caller.describe();
            if position == 0 {
                log::info!("session {id} created{by} and active");
            } else {
                log::info!("session {id} created{by}, waiting at position {position}");
            }
            Reply::json(
                201,
                &Created {
                    session_id: id.to_string(),
                    position,
                },
            )
        }
        Err(full) => {
            observe::note_refused(shared, &info);
            log::warn!(
                "session refused: {full} ({} sessions)",
                shared.config.max_sessions
            );
            Reply::detail(503, full.to_string()).with_header("Retry-After", "5")
        }
    }
}

/// A change that could not be written to the state file (it was rolled back).
pub fn not_persisted(e: &NotPersisted) -> Reply {
    Reply::detail(503, e.to_string()).with_header("Retry-After", "5")
}

pub fn session_not_found() -> Reply {
    Reply::detail(404, "Session not found")
}

fn session_status(shared: &Shared, id: &str, caller: &Caller) -> Reply {
    match parse_session_id(id).and_then(|id| poll_own(shared, &id, caller)) {
        Some(current) => longpoll::status_reply(current),
        None => session_not_found(),
    }
}

/// A poll of the caller's own session: refreshes it and gives its status and position;
/// `None` when it is not tracked or belongs to another name.
fn poll_own(shared: &Shared, id: &SessionId, caller: &Caller) -> Option<(Status, usize)> {
    let now = shared.clock.now();
    let mut state = shared.lock();
    if !state.queue.owner(id).is_some_and(|o| caller.may_use(o)) {
        return None;
    }
    state.queue.touch(id, now);
    state.queue.lookup(id)
}

/// `GET /session/{id}?wait=S`: a WAITING session's request is parked until its status or
/// position changes, or S seconds pass.
fn session_poll(shared: &Shared, id: &str, query: &str, caller: &Caller) -> Outcome {
    let wait = match query_param(query, "wait").map(|text| longpoll::parse_wait(&text)) {
        Some(Ok(wait)) => wait,
        Some(Err(reply)) => return reply.into(),
        None => return session_status(shared, id, caller).into(),
    };
    let Some(id) = parse_session_id(id) else {
        return session_not_found().into();
    };
    let now = shared.clock.now();
    match poll_own(shared, &id, caller) {
        Some(seen @ (Status::Waiting, _)) => Outcome::Park(id, seen, now + wait),
        Some(current) => longpoll::status_reply(current).into(),
        None => session_not_found().into(),
    }
}

fn end_session(shared: &Shared, id: &str, caller: &Caller) -> Reply {
    let ended = match parse_session_id(id) {
        None => false,
        Some(id) => {
            let owner = shared.lock().queue.owner(&id).map(|o| o.cloned());
            let ended = match owner {
                Some(owner) if caller.may_use(owner.as_ref()) => shared.end_session(&id),
                Some(owner) if caller.is_admin() => {
                    let owner = owner.as_deref().unwrap_or("nobody");
                    log::warn!("session {id} of {owner:?} ended{}", caller.describe());
                    caller.admin_event(
                        shared,
                        "end_session",
                        serde_json::json!({ "session": crate::events::prefix(&id), "owner": owner }),
                    );
                    shared.end_session(&id)
                }
                _ => Ok(false),
            };
            match ended {
                Ok(ended) => ended,
                Err(e) => return not_persisted(&e),
            }
        }
    };
    if ended || shared.is_shutting_down() {
        Reply::empty(204)
    } else {
        session_not_found()
    }
}

pub fn header_value<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn heartbeat(shared: &Shared, request: &Request, caller: &Caller) -> Reply {
    let Some(value) = header_value(request, SESSION_HEADER) else {
        return Reply::missing(["header", SESSION_HEADER]);
    };
    let now = shared.clock.now();
    let known = parse_session_id(value).is_some_and(|id| {
        let mut state = shared.lock();
        state.queue.owner(&id).is_some_and(|o| caller.may_use(o)) && state.queue.touch(&id, now)
    });
    if known {
        Reply::empty(204)
    } else {
        session_not_found()
    }
}

fn active_session(shared: &Shared, caller: &Caller) -> Reply {
    #[derive(Serialize)]
    struct ActiveBody {
        status: &'static str,
        position: usize,
        session_id: String,
    }
    // A read: it names the session but does not keep it alive (an operator following the
    // runbook must not keep a vanished client's session from being reaped).
    let active = {
        let state = shared.lock();
        state.queue.active().filter(|id| {
            caller.is_admin() || state.queue.owner(id).is_some_and(|o| caller.may_use(o))
        })
    };
    match active {
        Some(id) => Reply::json(
            200,
            &ActiveBody {
                status: Status::Active.as_str(),
                position: 0,
                session_id: id.to_string(),
            },
        ),
        None => Reply::detail(404, "No active session"),
    }
}

fn debug_health(shared: &Shared) -> Reply {
    /// A teardown not done yet: queued, or failed and waiting for its next attempt.
    #[derive(Serialize)]
    struct PendingTeardown {
        work_dir: String,
        attempts: u32,
        error: Option<String>,
        retry_in: Option<f64>,
    }
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
        timestamp: f64,
        uptime: f64,
        sessions: usize,
        queue_length: usize,
        /// Seconds; so that a client can choose its heartbeat interval.
        active_timeout: f64,
        waiting_timeout: f64,
        /// Long-polls parked right now.
        long_polls: usize,
        teardowns: Vec<PendingTeardown>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    }
    let now = SystemTime::now();
    let timestamp = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let uptime = now
        .duration_since(shared.started_at)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let clock = shared.clock.now();
    let (sessions, teardowns, long_polls) = {
        let state = shared.lock();
        let teardowns = state
            .teardowns
            .iter()
            .map(|t| PendingTeardown {
                work_dir: t.work_dir().to_string_lossy().into_owned(),
                attempts: t.attempts,
                error: t.error.clone(),
                retry_in: t.retry_at.map(|at| at.saturating_sub(clock).as_secs_f64()),
            })
            .collect();
        (state.queue.len(), teardowns, state.parked.len())
    };
    let degraded = shared.degraded();
    Reply::json(
        200,
        &Health {
            status: if degraded.is_some() { "degraded" } else { "ok" },
            detail: degraded.map(|why| NotPersisted(why).to_string()),
            timestamp,
            uptime,
            sessions,
            queue_length: sessions,
            active_timeout: shared.config.active_timeout.as_secs_f64(),
            waiting_timeout: shared.config.waiting_timeout.as_secs_f64(),
            long_polls,
            teardowns,
        },
    )
}

// ------------------------------------------------------------------------------- the gate

/// The `X-Session-ID` gate of every `/lab*` route: 422 missing header, 404 unknown session,
/// 423 not the ACTIVE session. Passing it refreshes the session's `last_seen_at`. The body
/// is not read before the gate is passed.
pub fn gate(shared: &Shared, request: &Request, caller: &Caller) -> Result<SessionId, Reply> {
    check_gate(shared, request, caller, true)
}

/// The gate of the read-only routes (`GET /lab`, `GET /lab/devices`): the same answers, but
/// a look does not count as the session's activity, so polling them never keeps a silent
/// session alive. Only the session's own polls, heartbeats and lab operations do.
fn read_gate(shared: &Shared, request: &Request, caller: &Caller) -> Result<SessionId, Reply> {
    check_gate(shared, request, caller, false)
}

fn check_gate(
    shared: &Shared,
    request: &Request,
    caller: &Caller,
    touch: bool,
) -> Result<SessionId, Reply> {
    let Some(value) = header_value(request, SESSION_HEADER) else {
        return Err(Reply::missing(["header", SESSION_HEADER]));
    };
    let id = parse_session_id(value).ok_or_else(session_not_found)?;
    let now = shared.clock.now();
    let mut state = shared.lock();
    if !state.queue.owner(&id).is_some_and(|o| caller.may_use(o)) {
        return Err(session_not_found());
    }
    match state.queue.lookup(&id) {
        None => Err(session_not_found()),
        Some((Status::Waiting, _)) => Err(Reply::detail(423, "Session is not active")),
        Some((Status::Active, _)) => {
            if touch {
                state.queue.touch(&id, now);
            }
            Ok(id)
        }
    }
}

fn no_lab() -> Reply {
    Reply::detail(404, "No lab running")
}

// ------------------------------------------------------------------------------- lab routes

fn lab_status(shared: &Shared, request: &Request, caller: &Caller) -> Reply {
    if let Err(reply) = read_gate(shared, request, caller) {
        return reply;
    }
    let state = shared.lock();
    let body = match &state.lab {
        Some(lab) => format!(
            "{{\"running\":true,\"topology\":{},\"ref_count\":{},\"devices\":{},\"netlab_status\":null}}",
            serde_json::Value::String(lab.topology.to_string_lossy().into_owned()),
            lab.ref_count,
            lab.devices_json
        ),
        None => {
            "{\"running\":false,\"topology\":null,\"ref_count\":0,\"devices\":[],\"netlab_status\":null}"
                .to_owned()
        }
    };
    Reply::raw_json(200, body)
}

fn lab_devices(shared: &Shared, request: &Request, caller: &Caller) -> Reply {
    if let Err(reply) = read_gate(shared, request, caller) {
        return reply;
    }
    let devices = shared.lock().lab.as_ref().map(|l| l.devices_json.clone());
    match devices {
        Some(devices) => Reply::raw_json(200, devices.get().as_bytes()),
        None => no_lab(),
    }
}

fn release_lab(shared: &Shared, request: &Request, caller: &Caller) -> Reply {
    let session = match gate(shared, request, caller) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    let version = {
        let mut state = shared.lock();
        match state.lab.as_mut() {
            Some(lab) => {
                lab.release();
                log::info!(
                    "session {session} released the lab (ref_count {})",
                    lab.ref_count
                );
                let refs = lab.ref_count;
                observe::note_released(shared, &state, &session, refs);
                state.changed()
            }
            None => return no_lab(),
        }
    };
    if let Err(e) = shared.persist(version) {
        return not_persisted(&e);
    }
    Reply::empty(204)
}

/// The value of a query parameter, percent-decoded (`+` is a space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(&key.replace('+', " ")) == name)
            .then(|| percent_decode(&value.replace('+', " ")).into_owned())
    })
}

fn destroy_lab(shared: &Shared, request: &Request, query: &str, caller: &Caller) -> Reply {
    let gated = gate(shared, request, caller);
    let force = match query_param(query, "force") {
        None => Ok(true),
        Some(text) => parse_bool(&text).ok_or(text),
    };
    // The gate's errors come first, except that an admin may force a teardown without
    // holding the active session (the operator's rescue).
    let (session, force) = match (gated, force) {
        (Ok(id), Ok(force)) => (id.to_string(), force),
        (Err(_), Ok(true)) if caller.is_admin() => {
            caller.admin_event(shared, "destroy_lab", serde_json::json!({ "force": true }));
            ("none".to_owned(), true)
        }
        (Err(reply), _) => return reply,
        (Ok(_), Err(text)) => return bool_error("query", "force", &text),
    };
    let version = {
        let mut state = shared.lock();
        match lab::decide_destroy(state.lab.as_ref(), force) {
            Destroy::NothingRunning => return Reply::empty(204),
            Destroy::InUse => return Reply::detail(409, "Lab still in use"),
            Destroy::TearDown => {
                if let Some(lab) = state.lab.take() {
                    log::info!(
                        "session {session} destroys the lab {} (force={force}){}",
                        lab.topology.display(),
                        caller.describe()
                    );
                    shared.queue_teardown(&mut state, lab);
                }
                state.changed()
            }
        }
    };
    if let Err(e) = shared.persist(version) {
        return not_persisted(&e);
    }
    Reply::empty(202)
}

pub fn bool_error(place: &str, name: &str, input: &str) -> Reply {
    Reply::validation(
        "bool_parsing",
        [place, name],
        "Input should be a valid boolean, unable to interpret input",
        Some(input),
    )
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are.
pub fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/session"), Some(Route::Sessions));
        assert_eq!(route("/session/"), Some(Route::Session("")));
        assert_eq!(route("/session/abc"), Some(Route::Session("abc")));
        assert_eq!(route("/session/a/b"), None);
        assert_eq!(route("/session/heartbeat"), Some(Route::Heartbeat));
        assert_eq!(route("/lab/"), None);
        assert_eq!(route("/nope"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Db"), "a-b");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("x%41"), "xA");
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("force=false", "force"), Some("false".into()));
        assert_eq!(query_param("a=1&force=no", "force"), Some("no".into()));
        assert_eq!(query_param("", "force"), None);
        assert_eq!(query_param("force", "force"), Some(String::new()));
    }
}
