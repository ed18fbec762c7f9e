//! The HTTP edge: replies, the listener thread and the worker pool.
//!
//! tiny_http accepts connections and parses requests on its own threads and queues them
//! without bound; the listener thread only drains `recv()` into a bounded channel, so the
//! queue stays short, and answers `503 Server busy` itself when the channel is full.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};
use serde::Serialize;
use tiny_http::{Header, Request, Response, Server};

use crate::acquire;
use crate::api::{self, Outcome};
use crate::lab_thread::LabJob;
use crate::metrics::METRICS;
use crate::state::Shared;

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
        Self::json(status, &serde_json::json!({ "detail": message.as_ref() }))
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

    pub fn missing(loc: [&str; 2]) -> Self {
        Self::validation("missing", loc, "Field required", None)
    }

    pub fn internal_error() -> Self {
        Reply::raw_json(500, &b"{\"detail\":\"internal error\"}"[..])
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A body of another type than JSON.
    pub fn typed(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Reply::raw_json(status, body).with_header("Content-Type", content_type)
    }

    pub fn into_response(self) -> Response<Cursor<Vec<u8>>> {
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

/// Sends a reply; a client that went away is not an error worth more than a debug line.
pub fn respond(request: Request, reply: Reply) {
    let status = reply.status;
    METRICS.request(request.url(), status);
    if let Err(e) = request.respond(reply.into_response()) {
        log::debug!("could not send a {status} response: {e}");
    }
}

/// Capacity of the channel between the listener and the workers.
pub const QUEUE_CAPACITY: usize = 1024;

/// Drains `server.recv()` into the workers' channel until the server is unblocked for a
/// shutdown. Returns `Err` when tiny_http's accept loop died (the process must exit non-zero).
pub fn listen(server: &Server, shared: &Shared, tx: &Sender<Request>) -> Result<(), String> {
    let mut waiter = Waiter::new();
    loop {
        let request = match next_incoming(&mut waiter, server, shared) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                if shared.is_shutting_down() {
                    break;
                }
                return Err(format!("the HTTP listener failed: {e}"));
            }
        };
        if !dispatch(request, tx) {
            return Ok(());
        }
        if shared.is_shutting_down() {
            break;
        }
    }
    // Requests tiny_http had already parsed are still answered.
    while let Ok(Some(request)) = server.try_recv() {
        if !dispatch(request, tx) {
            break;
        }
    }
    Ok(())
}

fn dispatch(request: Request, tx: &Sender<Request>) -> bool {
    match tx.try_send(request) {
        Ok(()) => true,
        Err(TrySendError::Full(request)) => {
            respond(
                request,
                Reply::detail(503, "Server busy").with_header("Retry-After", "1"),
            );
            true
        }
        Err(TrySendError::Disconnected(request)) => {
            respond(request, Reply::detail(503, "Server is shutting down"));
            false
        }
    }
}

pub fn work_channel() -> (Sender<Request>, Receiver<Request>) {
    bounded(QUEUE_CAPACITY)
}

/// Starts the worker pool. Each worker runs until the channel is closed and drained.
pub fn start_workers(
    count: usize,
    shared: &Arc<Shared>,
    rx: &Receiver<Request>,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|n| {
            let shared = Arc::clone(shared);
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || {
                    let mut waiter = Waiter::new();
                    while let Some(request) = next_request(&mut waiter, &rx) {
                        serve_one(&shared, request);
                    }
                })
                .expect("cannot start a worker thread")
        })
        .collect()
}

/// Declared bodies above this size are never read nor dropped; see [`quarantine`].
pub const QUARANTINE_FLOOR: u64 = 256 * 1024 * 1024;

/// How long a busy listener or worker with nothing to do keeps looking (yielding the CPU in
/// between) before it goes to sleep. Under load the next request comes within this, and
/// taking it without being woken saves a context switch per request, the main cost of
/// handing a request from the listener to a worker. Only a thread whose last request came
/// while it was still looking does this: at a few polls a second every thread sleeps at
/// once, so a quiet server burns no CPU.
const STAY_AWAKE: Duration = Duration::from_micros(200);

/// Waits for the next item: briefly awake when busy (see [`STAY_AWAKE`]), asleep otherwise.
struct Waiter {
    busy: bool,
}

impl Waiter {
    fn new() -> Self {
        Waiter { busy: false }
    }

    /// `poll` looks without blocking, `block` waits for as long as it takes.
    fn next<T, E>(
        &mut self,
        mut poll: impl FnMut() -> Result<Option<T>, E>,
        block: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        loop {
            if let Some(item) = poll()? {
                self.busy = true;
                return Ok(item);
            }
            if !self.busy || started.elapsed() >= STAY_AWAKE {
                break;
            }
            std::thread::yield_now();
        }
        self.busy = false;
        block()
    }
}

fn next_request(waiter: &mut Waiter, rx: &Receiver<Request>) -> Option<Request> {
    waiter
        .next(
            || match rx.try_recv() {
                Ok(request) => Ok(Some(request)),
                Err(TryRecvError::Empty) => Ok(None),
                Err(TryRecvError::Disconnected) => Err(()),
            },
            || rx.recv().map_err(|_| ()),
        )
        .ok()
}

/// The next request from tiny_http, or `None` once the server is shutting down. The wait is
/// cut into slices so the shutdown flag is seen even if a `try_recv()` consumed the wake-up
/// that `Server::unblock()` queued.
fn next_incoming(
    waiter: &mut Waiter,
    server: &Server,
    shared: &Shared,
) -> std::io::Result<Option<Request>> {
    waiter.next(
        || {
            if shared.is_shutting_down() {
                return Ok(Some(None));
            }
            server.try_recv().map(|r| r.map(Some))
        },
        || loop {
            if shared.is_shutting_down() {
                return Ok(None);
            }
            if let Some(request) = server.recv_timeout(Duration::from_millis(100))? {
                return Ok(Some(request));
            }
        },
    )
}

/// Handles one request; a panic in the handler becomes a 500 and the worker lives on.
pub fn serve_one(shared: &Arc<Shared>, request: Request) {
    let ceiling = shared.config.max_upload_bytes.max(QUARANTINE_FLOOR);
    if request.body_length().is_some_and(|n| n as u64 > ceiling) {
        quarantine(request, ceiling);
        return;
    }
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| api::handle(shared, &request)));
    match outcome {
        Ok(Outcome::Reply(reply)) => answer(request, reply),
        Ok(Outcome::Lab(job)) => shared.send_lab_job(LabJob::Start(job, request)),
        Ok(Outcome::Upload(pending)) => acquire::spawn_upload(shared, request, pending),
        Ok(Outcome::Park(id, seen, deadline)) => shared.park(request, id, seen, deadline),
        Err(_) => {
            log::error!(
                "handler for {} {} panicked; answered 500",
                request.method(),
                crate::logging::escape(request.url())
            );
            answer(request, Reply::internal_error());
        }
    }
    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    LONGEST_SERVE_US.fetch_max(took, Ordering::Relaxed);
}

/// The longest a worker spent on one request so far, in microseconds (logged at exit):
/// how long a worker was kept from everyone else.
pub static LONGEST_SERVE_US: AtomicU64 = AtomicU64::new(0);

/// Whether dropping `request` would make tiny_http read the rest of its body on the
/// dropping thread: a declared body of more than 1 KiB (smaller ones were read with the
/// head), any body behind `Expect: 100-continue`, or a chunked one. None of our handlers
/// but the upload of `POST /lab` reads a body.
pub fn has_unread_body(request: &Request) -> bool {
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

/// Answers on this thread when that cannot block on the client beyond one write, else on
/// a dropper thread (see [`drop_elsewhere`]).
pub fn answer(request: Request, reply: Reply) {
    if has_unread_body(&request) {
        drop_elsewhere(request, reply);
    } else {
        respond(request, reply);
    }
}

/// Dropper threads alive now; see [`drop_elsewhere`].
pub static DROPPERS: AtomicUsize = AtomicUsize::new(0);

/// Most dropper threads at once. Each waits at most `--client-timeout` per read for a
/// silent client, so a burst of silent bodies is cleared within that time.
pub const MAX_DROPPERS: usize = 1024;

/// Answers `request` and drops it on a thread of its own: dropping a request whose body was
/// not read makes tiny_http read the rest of the body first, on the dropping thread, for as
/// long as the client takes (each read bounded by `--client-timeout`). A worker doing that
/// would be lost to everyone else meanwhile. Past [`MAX_DROPPERS`] such requests at once
/// (or when no thread can be started), the request is answered and its connection
/// abandoned instead; see [`quarantine`].
pub fn drop_elsewhere(request: Request, reply: Reply) {
    if DROPPERS.fetch_add(1, Ordering::SeqCst) >= MAX_DROPPERS {
        DROPPERS.fetch_sub(1, Ordering::SeqCst);
        abandon(request, reply, "too many bodies are being drained at once");
        return;
    }
    let (tx, rx) = bounded::<(Request, Reply)>(1);
    let spawned = std::thread::Builder::new()
        .name("dropper".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if let Ok((request, reply)) = rx.recv() {
                respond(request, reply);
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
            abandon(request, reply, &format!("cannot start a thread ({e})"));
        }
    }
}

/// Answers a request through `upgrade()`, which writes the response and hands back the
/// connection (body reader included) without dropping the reader, and leaks that
/// connection: it costs one idle connection thread and two descriptors until the process
/// ends. [`crate::listener`] counts them and restarts the server past
/// [`crate::listener::MAX_ABANDONED`].
fn abandon(request: Request, reply: Reply, why: &str) {
    let count = crate::listener::ABANDONED.fetch_add(1, Ordering::SeqCst) + 1;
    log::warn!(
        "{} {} from {}: {why}; answered {} and abandoned the connection ({count} so far)",
        request.method(),
        crate::logging::escape(request.url()),
        request
            .remote_addr()
            .map_or_else(|| "?".to_owned(), |a| a.to_string()),
        reply.status,
    );
    let stream = request.upgrade(
        "none",
        reply.with_header("Connection", "close").into_response(),
    );
    std::mem::forget(stream);
    if count > crate::listener::MAX_ABANDONED {
        crate::listener::restart_now(&format!(
            "{count} connections were abandoned on purpose; each holds a thread and two descriptors"
        ));
    }
}

/// Answers a request that declares an absurd `Content-Length`, and never drops it.
///
/// When tiny_http drops a request whose body was not read to the end, it reads the rest and
/// throws it away, allocating one buffer as large as the remaining declared length first. A
/// request declaring a terabyte would make that allocation fail, and a failed allocation aborts
/// the process; reading the body ourselves does not help either (at the client's end of
/// stream tiny_http drops the reader the same way). So such a request is answered and its
/// connection abandoned (see [`abandon`]). Only requests declaring more than the larger of
/// `--max-upload-bytes` and 256 MiB go this way; no client of this API sends those.
fn quarantine(request: Request, ceiling: u64) {
    METRICS.request(request.url(), 413);
    let reply = Reply::detail(
        413,
        format!("Request body too large: the limit is {ceiling} bytes"),
    );
    let why = format!(
        "declares a body of {} bytes (over {ceiling})",
        request.body_length().unwrap_or(0)
    );
    abandon(request, reply, &why);
}
