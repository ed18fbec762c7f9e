//! What the server answers, and the one way to answer it.
//!
//! A handler builds a [`Reply`]. A request is answered through its [`Responder`], which owns
//! the `tiny_http::Request` and answers it exactly once: [`Responder::respond`] consumes it,
//! and a responder dropped unanswered (a panic on any thread, a path that forgot to answer)
//! sends our JSON 500 instead of tiny_http's bare one. Whoever holds the responder last
//! answers: a worker, an upload thread, the lab thread, or the thread that wakes a long-poll.
//!
//! Answering a request whose body was not read makes tiny_http read the rest of that body on
//! the answering thread, for as long as the client takes; such requests are answered on a
//! dropper thread of their own, and absurd ones are answered and abandoned (see
//! [`is_absurd`]).

use std::borrow::Cow;
use std::io::Cursor;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;
use tiny_http::{Header, Request, Response};

use crate::http::listener;
use crate::logging::escape;
use crate::observe::metrics::METRICS;

/// A response the server produces, before it becomes a tiny_http response.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    /// `None` for responses without a body (204, 202): no body, no content type.
    pub body: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            body: None,
            headers: Vec::new(),
        }
    }

    /// A JSON body already serialized.
    pub fn raw_json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status,
            body: Some(body.into()),
            headers: Vec::new(),
        }
    }

    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self::raw_json(status, body),
            Err(e) => {
                log::error!("cannot serialize a response: {e}");
                Self::internal_error()
            }
        }
    }

    /// The error envelope `{"detail":"..."}`.
    pub fn detail(status: u16, message: impl AsRef<str>) -> Self {
        #[derive(Serialize)]
        struct Detail<'a> {
            detail: &'a str,
        }
        Self::json(
            status,
            &Detail {
                detail: message.as_ref(),
            },
        )
    }

    /// A FastAPI-shaped validation error: `{"detail":[{type, loc, msg, input}]}`.
    pub fn validation(kind: &str, loc: [&str; 2], msg: &str, input: Option<&str>) -> Self {
        #[derive(Serialize)]
        struct Item<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            loc: [&'a str; 2],
            msg: &'a str,
            input: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            detail: [Item<'a>; 1],
        }
        Self::json(
            422,
            &Body {
                detail: [Item {
                    kind,
                    loc,
                    msg,
                    input,
                }],
            },
        )
    }

    /// 422: a required field (the session header, the topology of the body) is absent.
    pub fn missing(loc: [&str; 2]) -> Self {
        Self::validation("missing", loc, "Field required", None)
    }

    /// 422: a boolean field that is not one.
    pub fn bad_bool(place: &str, name: &str, input: &str) -> Self {
        Self::validation(
            "bool_parsing",
            [place, name],
            "Input should be a valid boolean, unable to interpret input",
            Some(input),
        )
    }

    pub fn internal_error() -> Self {
        Reply::raw_json(500, &b"{\"detail\":\"internal error\"}"[..])
    }

    pub fn session_not_found() -> Self {
        Reply::detail(404, "Session not found")
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A body of another type than JSON.
    pub fn typed(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Reply::raw_json(status, body).with_header("Content-Type", content_type)
    }

    fn into_response(self) -> Response<Cursor<Vec<u8>>> {
        let typed = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
        let mut response = match self.body {
            Some(body) if typed => Response::from_data(body),
            Some(body) => {
                Response::from_data(body).with_header(header("Content-Type", "application/json"))
            }
            None => Response::new(
                self.status.into(),
                Vec::new(),
                Cursor::new(Vec::new()),
                Some(0),
                None,
            ),
        }
        .with_status_code(self.status);
        for (name, value) in self.headers {
            response.add_header(header(name, &value));
        }
        response
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .unwrap_or_else(|_| Header::from_bytes(&b"X-Invalid"[..], &b"1"[..]).expect("static"))
}

// ------------------------------------------------------------------------------- requests

/// The value of a request header (names compare without case).
pub fn header_value<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// The value of a query parameter, percent-decoded (`+` is a space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(&key.replace('+', " ")) == name)
            .then(|| percent_decode(&value.replace('+', " ")).into_owned())
    })
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

// ------------------------------------------------------------------------------- responder

/// A request still to be answered; see the module documentation.
pub struct Responder {
    request: Option<Request>,
    /// The caller proved who it is (or the server is open): abandoning its connection
    /// counts toward the restart limit (see [`is_absurd`]).
    trusted: bool,
    /// The index of the route the request matched in the route table (for the metrics).
    route: Option<usize>,
    /// In unit tests: where the reply goes instead of the request's connection.
    #[cfg(test)]
    capture: Option<crossbeam_channel::Sender<Reply>>,
}

impl Responder {
    pub fn new(request: Request) -> Self {
        Responder {
            request: Some(request),
            trusted: false,
            route: None,
            #[cfg(test)]
            capture: None,
        }
    }

    /// A responder for a test request whose reply is sent to the returned channel.
    #[cfg(test)]
    pub fn capture(request: Request) -> (Self, crossbeam_channel::Receiver<Reply>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let responder = Responder {
            request: Some(request),
            trusted: false,
            route: None,
            capture: Some(tx),
        };
        (responder, rx)
    }

    pub fn request(&self) -> &Request {
        self.request.as_ref().expect("answered only by consuming")
    }

    /// Records which route of the route table the request matched (its metrics label).
    pub fn set_route(&mut self, route: Option<usize>) {
        self.route = route;
    }

    /// The caller proved who it is (a valid token, or a server without tokens).
    pub fn set_trusted(&mut self) {
        self.trusted = true;
    }

    /// The request, to read its body.
    pub fn request_mut(&mut self) -> &mut Request {
        self.request.as_mut().expect("answered only by consuming")
    }

    /// Answers the request; on this thread when that cannot block on the client beyond one
    /// write, else on a dropper thread (see [`drop_elsewhere`]).
    pub fn respond(mut self, reply: Reply) {
        self.answer(reply);
    }

    fn answer(&mut self, reply: Reply) {
        let Some(request) = self.take(&reply) else {
            return;
        };
        if is_absurd(&request) {
            let why = format!(
                "declares a body of {} bytes (over {})",
                request.body_length().unwrap_or(0),
                body_ceiling()
            );
            abandon(request, reply, &why, self.trusted);
        } else if has_unread_body(&request) {
            drop_elsewhere(request, reply);
        } else {
            send(request, reply);
        }
    }

    /// Takes the request out to answer it; `None` when a test captures the reply instead.
    fn take(&mut self, reply: &Reply) -> Option<Request> {
        let request = self.request.take()?;
        #[cfg(test)]
        if let Some(capture) = self.capture.take() {
            let _ = capture.send(reply.clone());
            return None;
        }
        METRICS.request(self.route, reply.status);
        Some(request)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(request) = &self.request {
            log::error!(
                "{} {} was dropped unanswered (a panic?); answered 500",
                request.method(),
                escape(request.url())
            );
            self.answer(Reply::internal_error());
        }
    }
}

/// Writes a reply; a client that went away is not an error worth more than a debug line.
fn send(request: Request, reply: Reply) {
    let status = reply.status;
    if let Err(e) = request.respond(reply.into_response()) {
        log::debug!("could not send a {status} response: {e}");
    }
}

/// Whether dropping `request` would make tiny_http read the rest of its body on the
/// dropping thread: a declared body of more than 1 KiB (smaller ones were read with the
/// head), any body behind `Expect: 100-continue`, or a chunked one. None of our handlers
/// but the upload of `POST /lab` reads a body.
fn has_unread_body(request: &Request) -> bool {
    let continue_expected = || {
        request.headers().iter().any(|h| {
            h.field.equiv("Expect") && h.value.as_str().eq_ignore_ascii_case("100-continue")
        })
    };
    match request.body_length() {
        Some(0) => false,
        Some(n) => n > 1024 || continue_expected(),
        None => request
            .headers()
            .iter()
            .any(|h| h.field.equiv("Transfer-Encoding")),
    }
}

/// Dropper threads alive now; see [`drop_elsewhere`].
static DROPPERS: AtomicUsize = AtomicUsize::new(0);

/// Most dropper threads at once. Each waits at most `--client-timeout` per read for a
/// silent client, so a burst of silent bodies is cleared within that time.
const MAX_DROPPERS: usize = 1024;

/// Answers `request` and drops it on a thread of its own: dropping a request whose body was
/// not read makes tiny_http read the rest of the body first, on the dropping thread, for as
/// long as the client takes (each read bounded by `--client-timeout`). A worker doing that
/// would be lost to everyone else meanwhile. Past [`MAX_DROPPERS`] such requests at once
/// (or when no thread can be started), the request is answered and its connection
/// abandoned instead.
fn drop_elsewhere(request: Request, reply: Reply) {
    if DROPPERS.fetch_add(1, Ordering::SeqCst) >= MAX_DROPPERS {
        DROPPERS.fetch_sub(1, Ordering::SeqCst);
        abandon(
            request,
            reply,
            "too many bodies are being drained at once",
            false,
        );
        return;
    }
    let (tx, rx) = bounded::<(Request, Reply)>(1);
    let spawned = std::thread::Builder::new()
        .name("dropper".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if let Ok((request, reply)) = rx.recv() {
                send(request, reply);
            }
            DROPPERS.fetch_sub(1, Ordering::SeqCst);
        });
    match spawned {
        Ok(_) => {
            // The thread is waiting for it: this cannot block.
            let _ = tx.send((request, reply));
        }
        Err(e) => {
            DROPPERS.fetch_sub(1, Ordering::SeqCst);
            abandon(
                request,
                reply,
                &format!("cannot start a thread ({e})"),
                false,
            );
        }
    }
}

/// Declared bodies above this size are never read nor dropped (see [`is_absurd`]):
/// the larger of `--max-upload-bytes` and 256 MiB, set at start-up.
static BODY_CEILING: AtomicU64 = AtomicU64::new(QUARANTINE_FLOOR);

/// The smallest [`BODY_CEILING`]: no client of this API sends a body that large.
pub const QUARANTINE_FLOOR: u64 = 256 * 1024 * 1024;

/// Sets the body ceiling from `--max-upload-bytes` (at start-up).
pub fn set_body_ceiling(max_upload_bytes: u64) {
    BODY_CEILING.store(max_upload_bytes.max(QUARANTINE_FLOOR), Ordering::Relaxed);
}

pub fn body_ceiling() -> u64 {
    BODY_CEILING.load(Ordering::Relaxed)
}

/// Whether a request declares an absurd `Content-Length`, one whose connection is answered
/// and abandoned instead of dropped.
///
/// When tiny_http drops a request whose body was not read to the end, it reads the rest and
/// throws it away, allocating one buffer as large as the remaining declared length first. A
/// request declaring a terabyte would make that allocation fail, and a failed allocation
/// aborts the process; reading the body ourselves does not help either (at the client's end
/// of stream tiny_http drops the reader the same way). So such a request is answered and its
/// connection abandoned, whoever sends it and whatever the answer (413, 401, 503).
pub fn is_absurd(request: &Request) -> bool {
    request
        .body_length()
        .is_some_and(|n| n as u64 > body_ceiling())
}

/// When an untrusted abandon was last logged, and how many were not logged since.
static UNTRUSTED_REPORT: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));

/// Untrusted abandons are logged at most once a minute, with a count: they cost a log line
/// each only while they are rare.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Answers through `upgrade()`, which writes the response and hands back the connection
/// (body reader included) without dropping the reader, and leaks that connection. Only a
/// `trusted` caller's connection counts toward the restart limit.
fn abandon(request: Request, reply: Reply, why: &str, trusted: bool) {
    let from = request
        .remote_addr()
        .map_or_else(|| "?".to_owned(), |a| a.to_string());
    let what = format!("{} {}", request.method(), escape(request.url()));
    let status = reply.status;
    let stream = request.upgrade(
        "none",
        reply.with_header("Connection", "close").into_response(),
    );
    std::mem::forget(stream);
    if !trusted {
        // Never counted toward listener::MAX_ABANDONED.
        let total = METRICS.abandoned_untrusted();
        let mut report = UNTRUSTED_REPORT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        report.1 += 1;
        if report.0.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            log::warn!(
                "{what} from {from} without a valid token: {why}; answered {status} and \
                 abandoned the connection ({} such since the last report, {total} in all; \
                 these never restart the server)",
                report.1
            );
            *report = (Some(Instant::now()), 0);
        }
        return;
    }
    let count = listener::ABANDONED.fetch_add(1, Ordering::SeqCst) + 1;
    log::warn!(
        "{what} from {from}: {why}; answered {status} and abandoned the connection ({count} so far)"
    );
    if count > listener::MAX_ABANDONED {
        listener::restart_now(&format!(
            "{count} connections were abandoned on purpose; each holds a thread and two descriptors"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_request() -> Request {
        tiny_http::TestRequest::new().with_path("/x").into()
    }

    #[test]
    fn a_responder_dropped_unanswered_answers_a_json_500() {
        let (responder, replies) = Responder::capture(test_request());
        let thread = std::thread::spawn(move || {
            let _held = responder;
            panic!("a handler bug");
        });
        assert!(thread.join().is_err());
        let reply = replies.try_recv().expect("answered");
        assert_eq!(reply.status, 500);
        assert_eq!(
            reply.body.as_deref(),
            Some(&b"{\"detail\":\"internal error\"}"[..])
        );
        assert!(replies.try_recv().is_err(), "answered once");
    }

    #[test]
    fn a_responder_answers_once() {
        let (responder, replies) = Responder::capture(test_request());
        responder.respond(Reply::empty(204));
        assert_eq!(replies.try_recv().map(|r| r.status), Ok(204));
        assert!(replies.try_recv().is_err());
    }

    #[test]
    fn details_are_json() {
        let reply = Reply::detail(404, "a \"quoted\" thing");
        assert_eq!(
            reply.body.as_deref(),
            Some(&br#"{"detail":"a \"quoted\" thing"}"#[..])
        );
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
