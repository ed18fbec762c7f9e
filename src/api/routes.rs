//! The API: one route table and one handler per operation.
//!
//! [`ROUTES`] names every path, its operations (method, handler, OpenAPI summary and
//! description) and who may read it without a token. Routing, the `Allow` header of a 405,
//! the `--public-read` views and the OpenAPI paths all come from it. A handler either
//! returns a [`Reply`] (the worker sends it) or takes the [`Responder`] to answer later
//! elsewhere: `POST /lab` hands it to an upload thread and on to the lab thread, a
//! long-poll parks it.
//!
//! Why one file of this size: the route table (with each operation's OpenAPI summary) is a
//! third of it, and the handlers below it are short ones grouped by route family
//! (sessions, admin, lab); they share the `Call` the table hands them. Splitting them into
//! files of their own is the next step once the `Call` moves to a module of its own.

use std::net::IpAddr;
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
use crate::core::host::Condition;
use crate::core::longpoll;
use crate::core::queue::{SessionId, Status, parse_session_id};
use crate::core::state::{SESSION_HEADER, Shared};
use crate::http::reply::{self, Reply, Responder, header_value, percent_decode, query_param};
use crate::lab::record::{self, Destroy};
use crate::logging::escape;
use crate::observe::metrics::{self, Ended, METRICS};
use crate::protocol::{Health, PendingTeardown, SessionCreated};
use crate::store::drain::{self, Drain};
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
        path: "/admin/drain",
        open: Open::No,
        operations: &[op(
            Post,
            R(admin_drain),
            "Drain the host: no new sessions, the ones there finish (admin)",
            openapi::admin_drain,
        )],
    },
    Route {
        path: "/admin/resume",
        open: Open::No,
        operations: &[op(
            Post,
            R(admin_resume),
            "End a drain: take new sessions again (admin)",
            openapi::admin_resume,
        )],
    },
    Route {
        path: "/admin/health/reset",
        open: Open::No,
        operations: &[op(
            Post,
            R(admin_health_reset),
            "Count the host healthy again (admin)",
            openapi::admin_health_reset,
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
    // Trusted: the caller passed authorization (a 404 or 405 comes after it) as a token
    // holder or on an open server.
    let trusted = match &resolved {
        Ok((_, call)) => matches!(call.caller, Caller::Open | Caller::Token(..)),
        Err(reply) => !matches!(reply.status, 401 | 429),
    };
    if trusted {
        responder.set_trusted();
    }
    match resolved {
        _ if trusted && reply::is_absurd(responder.request()) => {
            let reply = Reply::detail(
                413,
                format!(
                    "Request body too large: the limit is {} bytes",
                    reply::body_ceiling()
                ),
            );
            responder.respond(reply);
        }
        Err(reply) => responder.respond(reply),
        Ok(_) if let Some(reply) = cross_site(responder.request()) => responder.respond(reply),
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

/// The refusal of a state-changing request a web page of another site could have made a
/// browser send (with the browser's cached Basic credentials, or to an open server): an
/// `Origin` that is not this server's own (403), or a body type an HTML form sends without
/// a CORS preflight (415; only `POST /lab` takes a form, and it needs `X-Session-ID`, which
/// no form can send). Reads and requests without `Origin` (every non-browser client) pass.
fn cross_site(request: &Request) -> Option<Reply> {
    if matches!(request.method(), Method::Get | Method::Head) {
        return None;
    }
    if let Some(origin) = header_value(request, "Origin") {
        let host = header_value(request, "Host").unwrap_or("");
        if !same_origin(origin, host) {
            return Some(Reply::detail(
                403,
                "Cross-site request refused: the Origin is not this server",
            ));
        }
    }
    let path = request.url().split('?').next().unwrap_or("");
    let form_type = header_value(request, "Content-Type").is_some_and(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data",
        ]
        .iter()
        .any(|f| t.eq_ignore_ascii_case(f))
    });
    if form_type && !(path == "/lab" && request.method() == &Method::Post) {
        return Some(Reply::detail(
            415,
            "Unsupported body type: this route takes no form (send no body, or JSON)",
        ));
    }
    None
}

/// Whether an `Origin` (`scheme://host[:port]`) names the server the `Host` header names.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.trim().split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |a: &str| -> String {
        let a = a.trim().to_ascii_lowercase();
        a.strip_suffix(default_port)
            .map_or(a.clone(), str::to_owned)
    };
    !host.is_empty() && strip(authority) == strip(host)
}

/// Gives the metrics the route table's templates as their `route` labels (at start-up).
pub fn register_metrics() {
    metrics::register_routes(ROUTES.iter().map(|r| r.path));
}

// ------------------------------------------------------------------------------- access

pub const WWW_AUTHENTICATE: &str = "Basic realm=\"neops-remote-lab\", Bearer";

/// The address a request comes from: its peer's, or, when the peer is `--trusted-proxy`,
/// the last address of its `X-Forwarded-For` (the one that proxy appended).
pub fn client_addr(shared: &Shared, request: &Request) -> Option<IpAddr> {
    let peer = request.remote_addr().map(|a| a.ip())?;
    if shared.config.trusted_proxy != Some(peer) {
        return Some(peer);
    }
    let forwarded = header_value(request, "X-Forwarded-For")
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse().ok());
    Some(forwarded.unwrap_or(peer))
}

/// Longest piece of a request path an `auth_failed` event or log line keeps.
const PATH_KEPT: usize = 64;

/// A request path as an event keeps it: cut to [`PATH_KEPT`] characters.
fn short_path(path: &str) -> String {
    let mut chars = path.chars();
    let mut kept: String = chars.by_ref().take(PATH_KEPT).collect();
    if chars.next().is_some() {
        kept.push_str("...");
    }
    kept
}

/// With `--token-file`: the caller's identity from `Authorization`, or the 401 (429 for an
/// address that failed too often; never for a valid credential). `/healthz` is always open.
/// A failure leaves at most one event and one log line per address and window, and at most
/// [`auth::EVENTS_PER_WINDOW`] of them in all; `/metrics` counts every failure.
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
    let addr = client_addr(shared, request);
    let from = addr.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
    let authorization = header_value(request, "Authorization");
    if let Some(identity) = access.identify(authorization) {
        return Ok(Caller::Token(identity, from));
    }
    let challenge =
        Reply::detail(401, "Not authenticated").with_header("WWW-Authenticate", WWW_AUTHENTICATE);
    // No credentials at all is how HTTP asks for them (a browser's first request, a client
    // that sends them only when challenged): counted, not a failure, an event or a warning.
    if authorization.is_none() {
        METRICS.auth_challenge();
        log::debug!("challenged {} {:?} from {from}", request.method(), path);
        return Err(challenge);
    }
    // Session ids in the path are credentials: logged and recorded as 8-character prefixes.
    let path = &auth::redact_ids(path);
    METRICS.auth_failure();
    let now = shared.clock.now();
    if let Some(retry) = addr.and_then(|a| access.throttle.blocked(a, now)) {
        METRICS.auth_throttled();
        return Err(
            Reply::detail(429, "Too many failed authentications; try again later")
                .with_header("Retry-After", retry.to_string()),
        );
    }
    let failed = addr
        .map(|a| access.throttle.fail(a, now))
        .unwrap_or_default();
    if failed.record {
        if failed.first {
            log::warn!(
                "authentication failed: {} {} from {from} (further failures from there \
                 within {} s are only counted)",
                request.method(),
                escape(&short_path(path)),
                auth::WINDOW.as_secs()
            );
            shared.events.emit(
                "auth_failed",
                serde_json::json!({
                    "addr": from,
                    "method": request.method().as_str(),
                    "path": short_path(path),
                    "suppressed": failed.suppressed,
                }),
            );
        }
        if let Some(key) = failed.blocked {
            log::warn!(
                "{key} failed to authenticate {} times within {} s: refused for {} s",
                key_limit(key),
                auth::WINDOW.as_secs(),
                auth::WINDOW.as_secs()
            );
            shared.events.emit(
                "auth_blocked",
                serde_json::json!({
                    "addr": key.to_string(),
                    "failures": key_limit(key),
                    "seconds": auth::WINDOW.as_secs(),
                    "suppressed": if failed.first { 0 } else { failed.suppressed },
                }),
            );
        }
    } else if failed.first || failed.blocked.is_some() {
        METRICS.auth_event_suppressed();
    }
    Err(challenge)
}

fn key_limit(key: auth::Key) -> u32 {
    match key {
        auth::Key::Net24(_) => auth::MAX_FAILURES_NET,
        auth::Key::Host4(_) | auth::Key::Net64(_) => auth::MAX_FAILURES,
    }
}

// ------------------------------------------------------------------------------- sessions

fn create_session(call: &Call<'_>, request: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
    let info = match observe::client_info(request) {
        Ok(mut info) => {
            info.owner = caller.owner().map(|o| o.to_string());
            Arc::new(info)
        }
        Err(reply) => return reply,
    };
    if shared.host.draining().is_some() {
        observe::note_refused(shared, &info, Ended::Draining);
        log::info!("session refused{}: the host is draining", caller.describe());
        return Reply::detail(503, "Lab host is draining: no new sessions")
            .with_header("Retry-After", "60");
    }
    let id = Uuid::new_v4();
    let now = shared.clock.now();
    let created = {
        let mut state = shared.lock();
        state
            .queue
            .create_with(id, now, Arc::clone(&info))
            .map(|position| {
                state.queue.set_owner(&id, caller.owner());
                (position, state.changed())
            })
    };
    match created {
        Ok((position, version)) => {
            if let Err(e) = shared.persist(version) {
                return e.into();
            }
            // Recorded once the session is in the state file: a session refused because the
            // file cannot be written (503) leaves no `session_created`. (Another session
            // ending in between may put this session's `session_promoted` first.)
            observe::note_created(shared, &id, &info, position);
            let by = caller.describe();
            if position == 0 {
                log::info!("session {id} created{by} and active");
            } else {
                log::info!("session {id} created{by}, waiting at position {position}");
            }
            Reply::json(
                201,
                &SessionCreated {
                    session_id: id.to_string(),
                    position,
                },
            )
        }
        Err(full) => {
            observe::note_refused(shared, &info, Ended::Refused);
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

/// 204 while the host takes sessions and starts labs; 503 (for load balancers and pools)
/// when the state file cannot be written, the host is draining, or it is unhealthy.
fn healthz(call: &Call<'_>, _: &Request) -> Reply {
    if let Some(why) = call.shared.degraded() {
        return Reply::detail(503, format!("degraded: {}", NotPersisted(why)));
    }
    match call.shared.host.condition() {
        (Condition::Ok, _) => Reply::empty(204),
        (Condition::Draining, _) => Reply::detail(503, "draining"),
        (Condition::Unhealthy, why) => {
            Reply::detail(503, format!("unhealthy: {}", why.unwrap_or_default()))
        }
    }
}

// ------------------------------------------------------------------------------- admin

/// The admin's name (`None` on a server without tokens, where everyone may), or the 403.
fn admin_only(caller: &Caller) -> Result<Option<String>, Reply> {
    match caller {
        Caller::Open => Ok(None),
        Caller::Token(id, _) if id.admin => Ok(Some(id.name.to_string())),
        _ => Err(Reply::detail(403, "Only an admin token may do this")),
    }
}

fn admin_drain(call: &Call<'_>, _: &Request) -> Reply {
    let by = match admin_only(&call.caller) {
        Ok(by) => by,
        Err(reply) => return reply,
    };
    let shared = call.shared;
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let drain = Drain {
        since,
        by: by.clone(),
    };
    let dir = &shared.config.state_dir;
    match shared.host.set_drain(Some(drain), |d| match d {
        Some(d) => drain::save(dir, d),
        None => Ok(()),
    }) {
        Ok(true) => {
            let sessions = shared.lock().queue.len();
            log::warn!(
                "draining{}: no new sessions; {sessions} {} left to finish",
                call.caller.describe(),
                crate::core::state::plural(sessions, "session", "sessions")
            );
            shared.events.emit(
                "host_draining",
                serde_json::json!({ "by": by, "sessions": sessions }),
            );
        }
        Ok(false) => {}
        Err(e) => return drain_file_error(dir, &e),
    }
    Reply::empty(204)
}

fn admin_resume(call: &Call<'_>, _: &Request) -> Reply {
    let by = match admin_only(&call.caller) {
        Ok(by) => by,
        Err(reply) => return reply,
    };
    let dir = &call.shared.config.state_dir;
    match call.shared.host.set_drain(None, |_| drain::remove(dir)) {
        Ok(true) => {
            log::info!("resumed{}: taking new sessions", call.caller.describe());
            call.shared
                .events
                .emit("host_resumed", serde_json::json!({ "by": by }));
        }
        Ok(false) => {}
        Err(e) => return drain_file_error(dir, &e),
    }
    Reply::empty(204)
}

fn drain_file_error(dir: &std::path::Path, e: &std::io::Error) -> Reply {
    let path = dir.join(drain::DRAIN_FILE);
    log::error!("cannot change {}: {e}", path.display());
    Reply::detail(503, format!("cannot change the drain file: {e}")).with_header("Retry-After", "5")
}

fn admin_health_reset(call: &Call<'_>, _: &Request) -> Reply {
    let by = match admin_only(&call.caller) {
        Ok(by) => by,
        Err(reply) => return reply,
    };
    call.shared.health_reset(by.as_deref());
    Reply::empty(204)
}

fn debug_health(call: &Call<'_>, _: &Request) -> Reply {
    let shared = call.shared;
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
            status: if degraded.is_some() { "degraded" } else { "ok" }.into(),
            detail: degraded.map(|why| NotPersisted(why).to_string()),
            timestamp,
            uptime,
            sessions,
            queue_length: sessions,
            active_timeout: shared.config.active_timeout.as_secs_f64(),
            waiting_timeout: shared.config.waiting_timeout.as_secs_f64(),
            long_polls,
            long_poll_cap: crate::core::longpoll::cap(),
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
    let session = match gate(call, request, false) {
        Ok(id) => id,
        // With several slots, no session header: what every slot runs.
        Err(_)
            if call.shared.instances.len() > 1
                && header_value(request, SESSION_HEADER).is_none()
                && call.caller.may_use(None) =>
        {
            return observe::slots_json(call.shared);
        }
        Err(reply) => return reply,
    };
    let none = record::no_devices();
    let state = call.shared.lock();
    let lab = state
        .lab_slot(&session)
        .and_then(|i| state.slots[i].lab.as_ref());
    let status = match lab {
        Some(lab) => LabStatus {
            running: true,
            // The file's name only: the server's paths are nobody's business.
            topology: Some(
                lab.topology
                    .file_name()
                    .unwrap_or(lab.topology.as_os_str())
                    .to_string_lossy(),
            ),
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
    let session = match gate(call, request, false) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    let devices = {
        let state = call.shared.lock();
        state
            .lab_slot(&session)
            .and_then(|i| state.slots[i].lab.as_ref())
            .map(|l| l.devices_json.clone())
    };
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
        let Some(slot) = state.lab_slot(&session) else {
            return no_lab();
        };
        let multi = state.slots.len() > 1;
        match state.slots[slot].lab.as_mut() {
            Some(lab) => {
                lab.release();
                let refs = lab.ref_count;
                if multi {
                    log::info!(
                        "session {session} released the lab of slot {} (ref_count {refs})",
                        slot + 1
                    );
                } else {
                    log::info!("session {session} released the lab (ref_count {refs})");
                }
                state.slots[slot].last_used_ms = crate::observe::events::now_ms();
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

/// `?slot=K` of `DELETE /lab`: `None` when absent, else a slot's index or the 422.
fn slot_param(call: &Call<'_>) -> Result<Option<usize>, Reply> {
    let Some(text) = query_param(&call.query, "slot") else {
        return Ok(None);
    };
    let slots = call.shared.instances.len();
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=slots).contains(&n) => Ok(Some(n - 1)),
        _ => Err(Reply::validation(
            "enum",
            ["query", "slot"],
            &format!("Input should be a slot number from 1 to {slots}"),
            Some(&text),
        )),
    }
}

fn destroy_lab(call: &Call<'_>, request: &Request) -> Reply {
    let (shared, caller) = (call.shared, &call.caller);
    let force = match query_param(&call.query, "force") {
        None => Ok(true),
        Some(text) => parse_bool(&text).ok_or(text),
    };
    let named = match slot_param(call) {
        Ok(named) => named,
        Err(reply) => return reply,
    };
    // A slot is named by an admin (or anyone, without --token-file): the operator's rescue
    // of one slot, whoever holds it.
    if let Some(slot) = named {
        if !caller.is_admin() && !matches!(caller, Caller::Open) {
            return Reply::detail(403, "Only an admin may tear down a slot by number");
        }
        return match force {
            Ok(force) => {
                caller.admin_event(
                    &shared.events,
                    "destroy_lab",
                    serde_json::json!({ "force": force, "slot": slot + 1 }),
                );
                tear_down_slot(shared, caller, slot, force, "none")
            }
            Err(text) => Reply::bad_bool("query", "force", &text),
        };
    }
    let gated = gate(call, request, true);
    // The gate's errors come first, except that an admin may force a teardown without
    // holding the active session (the operator's rescue; with several slots it names one).
    let (session, force) = match (gated, force) {
        (Ok(id), Ok(force)) => (Some(id), force),
        (Err(_), Ok(true)) if caller.is_admin() && shared.instances.len() == 1 => {
            caller.admin_event(
                &shared.events,
                "destroy_lab",
                serde_json::json!({ "force": true }),
            );
            (None, true)
        }
        (Err(_), Ok(true)) if caller.is_admin() => {
            return Reply::missing(["query", "slot"]);
        }
        (Err(reply), _) => return reply,
        (Ok(_), Err(text)) => return Reply::bad_bool("query", "force", &text),
    };
    let slot = match session {
        Some(id) => match shared.lock().lab_slot(&id) {
            Some(slot) => slot,
            None => return Reply::empty(204),
        },
        None => 0,
    };
    let who = session.map_or_else(|| "none".to_owned(), |id| id.to_string());
    tear_down_slot(shared, caller, slot, force, &who)
}

/// `DELETE /lab` of one slot: 204 nothing there, 409 held (without force), else 202 and the
/// teardown queued.
fn tear_down_slot(shared: &Shared, caller: &Caller, slot: usize, force: bool, who: &str) -> Reply {
    let version = {
        let mut state = shared.lock();
        match record::decide_destroy(state.slots[slot].lab.as_ref(), force) {
            Destroy::NothingRunning => return Reply::empty(204),
            Destroy::InUse => return Reply::detail(409, "Lab still in use"),
            Destroy::TearDown => {
                if let Some(lab) = state.slots[slot].lab.take() {
                    state.slots[slot].holder = None;
                    log::info!(
                        "session {who} destroys the lab {} (force={force}){}",
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
            serde_json::json!({"detail": [{"type": "missing", "loc": ["header", SESSION_HEADER], "msg": "Field required", "input": null}]})
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
    fn origins_match_their_host() {
        assert!(same_origin("http://lab.example:8000", "lab.example:8000"));
        assert!(same_origin("https://Lab.Example", "lab.example"));
        assert!(same_origin("https://lab.example:443", "lab.example"));
        assert!(!same_origin("https://evil.example", "lab.example"));
        assert!(!same_origin("http://lab.example:8001", "lab.example:8000"));
        assert!(!same_origin("null", "lab.example"));
        assert!(!same_origin("http://lab.example", ""));
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
