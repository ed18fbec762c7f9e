//! The API: one route table and one handler per operation.
//!
//! [`ROUTES`] names every path, its operations (method, handler, OpenAPI summary and
//! description) and who may read it without a token. Routing, the `Allow` header of a 405,
//! the `--public-read` views and the OpenAPI paths all come from it. A handler either
//! returns a [`Reply`] (the worker sends it) or takes the [`Responder`] to answer later
//! elsewhere: `POST /lab` hands it to an upload thread and on to the lab thread, a
//! long-poll parks it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;
use tiny_http::{Method, Request};
use uuid::Uuid;

use crate::api::acquire;
use crate::api::observe;
use crate::api::openapi;
use crate::config::parse_bool;
use crate::core::auth::{self, Caller};
use crate::core::longpoll;
use crate::core::queue::{SessionId, Status, parse_session_id};
use crate::core::state::{SESSION_HEADER, Shared};
use crate::http::reply::{Reply, Responder, header_value, percent_decode, query_param};
use crate::lab::record::{self, Destroy};
use crate::observe::metrics;
use crate::store::persist::NotPersisted;

// ------------------------------------------------------------------------------- the table

/// An HTTP method the API serves (`HEAD` is served wherever `GET` is; tiny_http leaves the
/// body out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    fn of(method: &Method) -> Option<Verb> {
        match method {
            Method::Get | Method::Head => Some(Verb::Get),
            Method::Post => Some(Verb::Post),
            Method::Delete => Some(Verb::Delete),
            _ => None,
        }
    }

    /// As the `Allow` header names it.
    fn allow(self) -> &'static str {
        match self {
            Verb::Get => "GET, HEAD",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }

    /// As OpenAPI names it.
    fn openapi(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Delete => "delete",
        }
    }
}

/// A request to one operation: who asks, the path's `{session_id}` (percent-decoded) and
/// the query string.
struct Call<'a> {
    shared: &'a Arc<Shared>,
    caller: Caller,
    param: String,
    query: String,
}

#[derive(Clone, Copy)]
enum Handler {
    /// Builds the reply; the worker sends it.
    Reply(fn(&Call<'_>, &Request) -> Reply),
    /// Answers through the responder, now or later, on another thread.
    Responder(fn(&Call<'_>, Responder)),
}

/// Who may `GET` a route without a token when `--token-file` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// Nobody: a token is needed.
    No,
    /// Everybody with `--public-read` (the read-only views).
    PublicRead,
    /// Everybody (`/healthz`, for probes).
    Always,
}

struct Operation {
    verb: Verb,
    handler: Handler,
    summary: &'static str,
    /// Parameters and responses, for OpenAPI.
    doc: fn() -> serde_json::Value,
}

struct Route {
    /// The path; a segment `{session_id}` matches any one segment.
    path: &'static str,
    open: Open,
    operations: &'static [Operation],
}

const fn op(
    verb: Verb,
    handler: Handler,
    summary: &'static str,
    doc: fn() -> serde_json::Value,
) -> Operation {
    Operation {
        verb,
        handler,
        summary,
        doc,
    }
}

use Handler::{Reply as R, Responder as Owning};
use Verb::{Delete, Get, Post};

/// Every route. A path can match two routes (`/session/heartbeat` is also a
/// `/session/{session_id}`): a request goes to the first that has its method, and a 405
/// names the methods of all of them.
static ROUTES: &[Route] = &[
    Route {
        path: "/session",
        open: Open::No,
        operations: &[op(
            Post,
            R(create_session),
            "Open a session and join the queue",
            openapi::create_session,
        )],
    },
    Route {
        path: "/session/{session_id}",
        open: Open::No,
        operations: &[
            op(
                Get,
                Owning(session_status),
                "Status and queue position of a session",
                openapi::session_status,
            ),
            op(
                Delete,
                R(end_session),
                "End a session",
                openapi::end_session,
            ),
        ],
    },
    Route {
        path: "/session/heartbeat",
        open: Open::No,
        operations: &[op(
            Post,
            R(heartbeat),
            "Keep a session alive",
            openapi::heartbeat,
        )],
    },
    Route {
        path: "/active-session",
        open: Open::No,
        operations: &[op(
            Get,
            R(active_session),
            "The active session (a read: it does not keep that session alive)",
            openapi::active_session,
        )],
    },
    Route {
        path: "/lab",
        open: Open::No,
        operations: &[
            op(
                Get,
                R(lab_status),
                "The lab's state (a read: it does not keep the session alive)",
                openapi::lab_status,
            ),
            op(
                Post,
                Owning(acquire),
                "Upload a topology and acquire the lab",
                openapi::acquire,
            ),
            op(
                Delete,
                R(destroy_lab),
                "Tear the lab down",
                openapi::destroy_lab,
            ),
        ],
    },
    Route {
        path: "/lab/release",
        open: Open::No,
        operations: &[op(
            Post,
            R(release_lab),
            "Release one reference on the lab",
            openapi::release_lab,
        )],
    },
    Route {
        path: "/lab/devices",
        open: Open::No,
        operations: &[op(
            Get,
            R(lab_devices),
            "The running lab's devices (a read: it does not keep the session alive)",
            openapi::lab_devices,
        )],
    },
    Route {
        path: "/lab/log",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(|call, _| observe::lab_log(call.shared, &call.query)),
            "netlab's live output (the job running now, or the last one)",
            openapi::lab_log,
        )],
    },
    Route {
        path: "/healthz",
        open: Open::Always,
        operations: &[op(Get, R(healthz), "Liveness", openapi::healthz)],
    },
    Route {
        path: "/debug/health",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(debug_health),
            "Health and queue figures",
            openapi::debug_health,
        )],
    },
    Route {
        path: "/openapi.json",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(|_, _| Reply::raw_json(200, document())),
            "This document",
            openapi::openapi,
        )],
    },
    Route {
        path: "/queue",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(|call, _| observe::queue(call.shared, &call.query)),
            "The lab and the queue, for people and dashboards (no session needed; ids are 8-character prefixes)",
            openapi::queue,
        )],
    },
    Route {
        path: "/events",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(|call, _| observe::events(call.shared, &call.query)),
            "The event history, newest first",
            openapi::events,
        )],
    },
    Route {
        path: "/metrics",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(|call, _| observe::metrics(call.shared)),
            "Prometheus metrics (text format 0.0.4)",
            openapi::metrics,
        )],
    },
    Route {
        path: "/favicon.ico",
        open: Open::Always,
        operations: &[op(
            Get,
            R(|_, _| Reply::empty(204)),
            "No icon (a browser's automatic request, answered without a challenge)",
            openapi::favicon,
        )],
    },
    Route {
        path: "/",
        open: Open::PublicRead,
        operations: &[op(
            Get,
            R(|call, _| observe::status_page(call.shared)),
            "The status page (HTML)",
            openapi::status_page,
        )],
    },
];

/// Whether `path` matches the route's pattern; the value of its `{session_id}` segment.
fn matches<'p>(pattern: &str, path: &'p str) -> Option<&'p str> {
    match pattern.split_once("{session_id}") {
        None => (pattern == path).then_some(""),
        Some((before, after)) => {
            let rest = path.strip_prefix(before)?;
            let param = rest.strip_suffix(after)?;
            (!param.contains('/')).then_some(param)
        }
    }
}

/// The routes that match a path, with the path's parameter.
fn routes_for(path: &str) -> impl Iterator<Item = (usize, (&'static Route, &str))> + '_ {
    ROUTES
        .iter()
        .enumerate()
        .filter_map(move |(i, route)| matches(route.path, path).map(|param| (i, (route, param))))
}

/// The `Allow` header of a path: every method of every route that matches it.
fn allow(path: &str) -> String {
    let mut verbs: Vec<Verb> = Vec::new();
    for (_, (route, _)) in routes_for(path) {
        for op in route.operations {
            if !verbs.contains(&op.verb) {
                verbs.push(op.verb);
            }
        }
    }
    verbs
        .iter()
        .map(|v| v.allow())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The OpenAPI document, serialized once.
fn document() -> &'static [u8] {
    static DOC: OnceLock<Vec<u8>> = OnceLock::new();
    DOC.get_or_init(|| {
        let operations = ROUTES.iter().flat_map(|route| {
            route
                .operations
                .iter()
                .map(|op| (route.path, op.verb.openapi(), op.summary, (op.doc)()))
        });
        serde_json::to_vec(&openapi::document(operations)).unwrap_or_default()
    })
}

/// Serves one request.
pub fn handle(shared: &Arc<Shared>, mut responder: Responder) {
    let (route, resolved) = resolve(shared, responder.request());
    responder.set_route(route);
    match resolved {
        Err(reply) => responder.respond(reply),
        Ok((Handler::Reply(f), call)) => {
            let reply = f(&call, responder.request());
            responder.respond(reply);
        }
        Ok((Handler::Responder(f), call)) => f(&call, responder),
    }
}

/// Who asks for which operation, or the answer when it cannot be served: 401/429 (the
/// caller first, before anything else), 404 no such path, 405 no such method there.
/// Also returns the index in [`ROUTES`] of the route that serves it (or, when none has its
/// method, of the first that matches its path): its metrics label.
fn resolve<'s>(
    shared: &'s Arc<Shared>,
    request: &Request,
) -> (Option<usize>, Result<(Handler, Call<'s>), Reply>) {
    let url = request.url();
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let verb = Verb::of(request.method());
    let mut open = None;
    let mut found = None;
    let mut index = None;
    for (i, (route, param)) in routes_for(path) {
        open.get_or_insert(route.open);
        index.get_or_insert(i);
        if let Some(op) = route.operations.iter().find(|op| Some(op.verb) == verb) {
            found = Some((op.handler, param));
            index = Some(i);
            break;
        }
    }
    let caller = match authorize(
        shared,
        request,
        path,
        verb == Some(Get),
        open.unwrap_or(Open::No),
    ) {
        Ok(caller) => caller,
        Err(reply) => return (index, Err(reply)),
    };
    let Some((handler, param)) = found else {
        return (
            index,
            Err(match open {
                None => Reply::detail(404, "Not Found"),
                Some(_) => {
                    Reply::detail(405, "Method Not Allowed").with_header("Allow", allow(path))
                }
            }),
        );
    };
    let call = Call {
        shared,
        caller,
        param: percent_decode(param).into_owned(),
        query: query.to_owned(),
    };
    (index, Ok((handler, call)))
}

/// Gives the metrics the route table's templates as their `route` labels (at start-up).
pub fn register_metrics() {
    metrics::register_routes(ROUTES.iter().map(|r| r.path));
}

// ------------------------------------------------------------------------------- access

pub const WWW_AUTHENTICATE: &str = "Basic realm=\"neops-remote-lab\", Bearer";

/// With `--token-file`: the caller's identity from `Authorization`, or the 401 (429 for an
/// address that failed too often). `/healthz` is always open.
fn authorize(
    shared: &Shared,
    request: &Request,
    path: &str,
    reading: bool,
    open: Open,
) -> Result<Caller, Reply> {
    let Some(access) = &shared.access else {
        return Ok(Caller::Open);
    };
    let public = open == Open::Always || (open == Open::PublicRead && access.public_read);
    if reading && public {
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
    let authorization = header_value(request, "Authorization");
    if let Some(identity) = access.identify(authorization) {
        return Ok(Caller::Token(identity, from));
    }
    let challenge =
        Reply::detail(401, "Not authenticated").with_header("WWW-Authenticate", WWW_AUTHENTICATE);
    // No credentials at all is how HTTP asks for them (a browser's first request, a client
    // that sends them only when challenged): counted, not an event or a warning.
    if authorization.is_none() {
        metrics::METRICS.auth_challenge();
        log::debug!("challenged {} {:?} from {from}", request.method(), path);
        return Err(challenge);
    }
    // Session ids in the path are credentials: logged and recorded as 8-character prefixes.
    let path = &auth::redact_ids(path);
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
            auth::MAX_FAILURES,
            auth::WINDOW.as_secs(),
            auth::WINDOW.as_secs()
        );
        shared.events.emit(
            "auth_blocked",
            serde_json::json!({ "addr": from, "seconds": auth::WINDOW.as_secs() }),
        );
    }
    Err(challenge)
}

// ------------------------------------------------------------------------------- sessions

fn create_session(call: &Call<'_>, request: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
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
                return e.into();
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

/// `GET /session/{id}`; with `?wait=S` a WAITING session's request is parked until its
/// status or position changes, or S seconds pass (see [`longpoll`]).
fn session_status(call: &Call<'_>, responder: Responder) {
    let (shared, caller) = (call.shared, &call.caller);
    let wait = match query_param(&call.query, "wait").map(|text| longpoll::parse_wait(&text)) {
        None => None,
        Some(Ok(wait)) => Some(wait),
        Some(Err(reply)) => return responder.respond(reply),
    };
    let current = parse_session_id(&call.param)
        .and_then(|id| poll_own(shared, &id, caller).map(|seen| (id, seen)));
    match (current, wait) {
        (Some((id, seen @ (Status::Waiting, _))), Some(wait)) => {
            let deadline = shared.clock.now() + wait;
            shared.park(responder, id, seen, deadline);
        }
        (Some((_, seen)), _) => responder.respond(longpoll::status_reply(seen)),
        (None, _) => responder.respond(Reply::session_not_found()),
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

fn end_session(call: &Call<'_>, _: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
    let ended = match parse_session_id(&call.param) {
        None => false,
        Some(id) => {
            let owner = shared.lock().queue.owner(&id).map(|o| o.cloned());
            let ended = match owner {
                Some(owner) if caller.may_use(owner.as_ref()) => shared.end_session(&id),
                Some(owner) if caller.is_admin() => {
                    let owner = owner.as_deref().unwrap_or("nobody");
                    log::warn!("session {id} of {owner:?} ended{}", caller.describe());
                    caller.admin_event(
                        &shared.events,
                        "end_session",
                        serde_json::json!({ "session": crate::observe::events::prefix(&id), "owner": owner }),
                    );
                    shared.end_session(&id)
                }
                _ => Ok(false),
            };
            match ended {
                Ok(ended) => ended,
                Err(e) => return e.into(),
            }
        }
    };
    if ended || shared.is_shutting_down() {
        Reply::empty(204)
    } else {
        Reply::session_not_found()
    }
}

fn heartbeat(call: &Call<'_>, request: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
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
        Reply::session_not_found()
    }
}

fn active_session(call: &Call<'_>, _: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
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

fn healthz(call: &Call<'_>, _: &Request) -> Reply {
    match call.shared.degraded() {
        None => Reply::empty(204),
        Some(why) => Reply::detail(503, format!("degraded: {}", NotPersisted(why))),
    }
}

fn debug_health(call: &Call<'_>, _: &Request) -> Reply {
    let shared = call.shared;
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

// ------------------------------------------------------------------------------- lab routes

/// `{"running", "topology", "ref_count", "devices", "netlab_status"}`; the devices are
/// passed through as netlab's inspect gave them.
#[derive(Serialize)]
struct LabStatus<'a> {
    running: bool,
    topology: Option<std::borrow::Cow<'a, str>>,
    ref_count: u32,
    devices: &'a RawValue,
    /// Always null, for the Python server's clients (see the OpenAPI schema).
    netlab_status: Option<()>,
}

/// Passes the `X-Session-ID` gate (see [`Shared::gate`]); `touch`: counts as activity.
fn gate(call: &Call<'_>, request: &Request, touch: bool) -> Result<SessionId, Reply> {
    call.shared
        .gate(header_value(request, SESSION_HEADER), &call.caller, touch)
}

fn lab_status(call: &Call<'_>, request: &Request) -> Reply {
    if let Err(reply) = gate(call, request, false) {
        return reply;
    }
    let none = record::no_devices();
    let state = call.shared.lock();
    let status = match &state.lab {
        Some(lab) => LabStatus {
            running: true,
            topology: Some(lab.topology.to_string_lossy()),
            ref_count: lab.ref_count,
            devices: &lab.devices_json,
            netlab_status: None,
        },
        None => LabStatus {
            running: false,
            topology: None,
            ref_count: 0,
            devices: &none,
            netlab_status: None,
        },
    };
    Reply::json(200, &status)
}

fn lab_devices(call: &Call<'_>, request: &Request) -> Reply {
    if let Err(reply) = gate(call, request, false) {
        return reply;
    }
    let devices = call
        .shared
        .lock()
        .lab
        .as_ref()
        .map(|l| l.devices_json.clone());
    match devices {
        Some(devices) => Reply::raw_json(200, devices.get().as_bytes()),
        None => no_lab(),
    }
}

fn no_lab() -> Reply {
    Reply::detail(404, "No lab running")
}

fn acquire(call: &Call<'_>, responder: Responder) {
    acquire::begin(call.shared, responder, &call.caller);
}

fn release_lab(call: &Call<'_>, request: &Request) -> Reply {
    let shared = call.shared;
    let session = match gate(call, request, true) {
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
        return e.into();
    }
    Reply::empty(204)
}

fn destroy_lab(call: &Call<'_>, request: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
    let gated = gate(call, request, true);
    let force = match query_param(&call.query, "force") {
        None => Ok(true),
        Some(text) => parse_bool(&text).ok_or(text),
    };
    // The gate's errors come first, except that an admin may force a teardown without
    // holding the active session (the operator's rescue).
    let (session, force) = match (gated, force) {
        (Ok(id), Ok(force)) => (id.to_string(), force),
        (Err(_), Ok(true)) if caller.is_admin() => {
            caller.admin_event(
                &shared.events,
                "destroy_lab",
                serde_json::json!({ "force": true }),
            );
            ("none".to_owned(), true)
        }
        (Err(reply), _) => return reply,
        (Ok(_), Err(text)) => return Reply::bad_bool("query", "force", &text),
    };
    let version = {
        let mut state = shared.lock();
        match record::decide_destroy(state.lab.as_ref(), force) {
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
        return e.into();
    }
    Reply::empty(202)
}

#[cfg(test)]
mod tests {
    use tiny_http::TestRequest;

    use super::*;
    use crate::config::Config;
    use crate::core::clock::FakeClock;

    /// Serves one request in-process; the reply the client would get.
    fn serve(shared: &Arc<Shared>, method: Method, path: &str) -> Reply {
        let request = TestRequest::new().with_method(method).with_path(path);
        let (responder, replies) = Responder::capture(request.into());
        handle(shared, responder);
        replies.try_recv().expect("answered at once")
    }

    fn body(reply: &Reply) -> serde_json::Value {
        serde_json::from_slice(reply.body.as_deref().unwrap_or(b"null")).unwrap()
    }

    #[test]
    fn sessions_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _jobs) = crossbeam_channel::unbounded();
        let config = Config::defaults(dir.path().to_path_buf());
        let shared = Arc::new(Shared::new(config, Arc::new(FakeClock::new()), tx));

        let created = serve(&shared, Method::Post, "/session");
        assert_eq!(created.status, 201);
        let id = body(&created)["session_id"].as_str().unwrap().to_owned();
        assert_eq!(body(&created)["position"], 0);
        let status = serve(&shared, Method::Get, &format!("/session/{id}"));
        assert_eq!(
            (status.status, body(&status)),
            (200, serde_json::json!({"status": "active", "position": 0}))
        );
        // An active session's long-poll is answered at once.
        let polled = serve(&shared, Method::Get, &format!("/session/{id}?wait=5"));
        assert_eq!(polled.status, 200);
        let bad = serve(&shared, Method::Get, &format!("/session/{id}?wait=abc"));
        assert_eq!(bad.status, 422);
        assert_eq!(
            body(&bad)["detail"][0]["loc"],
            serde_json::json!(["query", "wait"])
        );

        let not_allowed = serve(&shared, Method::Put, "/lab");
        assert_eq!(not_allowed.status, 405);
        assert!(
            not_allowed
                .headers
                .contains(&("Allow", "GET, HEAD, POST, DELETE".to_owned()))
        );
        assert_eq!(serve(&shared, Method::Get, "/nope").status, 404);
        assert_eq!(
            body(&serve(&shared, Method::Get, "/lab")),
            serde_json::json!({"detail": [{"type": "missing", "loc": ["header", "X-Session-ID"], "msg": "Field required", "input": null}]})
        );

        assert_eq!(
            serve(&shared, Method::Delete, &format!("/session/{id}")).status,
            204
        );
        assert_eq!(
            serve(&shared, Method::Get, &format!("/session/{id}")).status,
            404
        );
    }

    /// The metrics label of a request is the route that serves it, or the first whose path
    /// matches when none has its method, or `other` (`None`).
    #[test]
    fn requests_are_labelled_with_the_route_that_serves_them() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _jobs) = crossbeam_channel::unbounded();
        let config = Config::defaults(dir.path().to_path_buf());
        let shared = Arc::new(Shared::new(config, Arc::new(FakeClock::new()), tx));
        let label = |method: Method, path: &str| {
            let request: Request = TestRequest::new()
                .with_method(method)
                .with_path(path)
                .into();
            resolve(&shared, &request).0.map(|i| ROUTES[i].path)
        };
        assert_eq!(
            label(Method::Post, "/session/heartbeat"),
            Some("/session/heartbeat")
        );
        assert_eq!(
            label(Method::Get, "/session/abc"),
            Some("/session/{session_id}")
        );
        assert_eq!(label(Method::Get, "/queue?limit=3"), Some("/queue"));
        assert_eq!(
            label(Method::Put, "/lab"),
            Some("/lab"),
            "a 405 keeps its route"
        );
        assert_eq!(label(Method::Get, "/nope"), None);
        assert_eq!(label(Method::Get, "/session/a/b"), None);
        assert_eq!(label(Method::Get, "/"), Some("/"));
    }

    #[test]
    fn paths_match_their_routes() {
        fn first(path: &str) -> Option<(&'static str, &str)> {
            routes_for(path).next().map(|(_, (r, p))| (r.path, p))
        }
        assert_eq!(first("/session"), Some(("/session", "")));
        assert_eq!(first("/session/"), Some(("/session/{session_id}", "")));
        assert_eq!(
            first("/session/abc"),
            Some(("/session/{session_id}", "abc"))
        );
        assert_eq!(first("/session/a/b"), None);
        assert_eq!(
            routes_for("/session/heartbeat")
                .map(|(_, (r, _))| r.path)
                .collect::<Vec<_>>(),
            ["/session/{session_id}", "/session/heartbeat"]
        );
        assert_eq!(first("/lab/"), None);
        assert_eq!(first("/nope"), None);
    }

    #[test]
    fn allow_names_the_methods_of_every_matching_route() {
        assert_eq!(allow("/session/heartbeat"), "GET, HEAD, DELETE, POST");
        assert_eq!(allow("/lab"), "GET, HEAD, POST, DELETE");
        assert_eq!(allow("/session"), "POST");
        assert_eq!(allow("/queue"), "GET, HEAD");
    }

    /// The document's paths and methods are the table's; every operation has a summary
    /// and responses; every `$ref` names a schema the document has.
    #[test]
    fn the_openapi_document_is_the_route_table() {
        let doc: serde_json::Value = serde_json::from_slice(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len());
        for route in ROUTES {
            let item = paths[route.path].as_object().unwrap();
            let mut documented: Vec<&str> = item.keys().map(String::as_str).collect();
            let mut served: Vec<&str> = route
                .operations
                .iter()
                .map(|op| op.verb.openapi())
                .collect();
            documented.sort_unstable();
            served.sort_unstable();
            assert_eq!(documented, served, "{}", route.path);
            for op in item.values() {
                assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()));
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            }
        }
        let text = String::from_utf8(document().to_vec()).unwrap();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(doc["components"]["schemas"].get(name).is_some(), "{name}");
        }
    }

    /// Paths and their `{session_id}` parameters are consistent, and no two routes with
    /// the same pattern exist.
    #[test]
    fn the_table_is_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(seen.insert(route.path), "{} twice", route.path);
            let mut verbs: Vec<Verb> = route.operations.iter().map(|op| op.verb).collect();
            verbs.dedup();
            assert_eq!(verbs.len(), route.operations.len(), "{}", route.path);
            if route.open != Open::No {
                assert!(
                    route.operations.iter().all(|op| op.verb == Get),
                    "{}",
                    route.path
                );
            }
        }
    }
}
