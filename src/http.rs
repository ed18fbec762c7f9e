//! The HTTP edge: replies, the listener thread and the worker pool.
//!
//! tiny_http accepts connections and parses requests on its own threads and queues them
//! without bound; the listener thread only drains `recv()` into a bounded channel, so the
//! queue stays short, and answers `503 Server busy` itself when the channel is full.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
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

/// Binds the listening socket with `TCP_NODELAY`, which accepted connections inherit.
///
/// tiny_http writes a response's head through a 1 KiB buffer and its body after it, so any
/// answer of more than about 1 KiB (the queue view, metrics, the status page) is two writes;
/// with Nagle's algorithm the second one waits for the client's delayed ACK, 40 ms on Linux.
pub fn bind(host: &str, port: u16) -> Result<Server, String> {
    let listener = std::net::TcpListener::bind((host, port)).map_err(|e| e.to_string())?;
    if let Err(e) = rustix::net::sockopt::set_tcp_nodelay(&listener, true) {
        log::warn!("cannot set TCP_NODELAY on the listener: {e}");
    }
    Server::from_listener(listener, None).map_err(|e| e.to_string())
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
    let outcome = catch_unwind(AssertUnwindSafe(|| api::handle(shared, &request)));
    match outcome {
        Ok(Outcome::Reply(reply)) => respond(request, reply),
        Ok(Outcome::Lab(job)) => shared.send_lab_job(LabJob::Start(job, request)),
        Ok(Outcome::Upload(pending)) => acquire::spawn_upload(shared, request, pending),
        Ok(Outcome::Park(id, seen, deadline)) => shared.park(request, id, seen, deadline),
        Err(_) => {
            log::error!(
                "handler for {} {} panicked; answered 500",
                request.method(),
                request.url()
            );
            respond(request, Reply::internal_error());
        }
    }
}

/// Answers a request that declares an absurd `Content-Length`, and never drops it.
///
/// When tiny_http drops a request whose body was not read to the end, it reads the rest and
/// throws it away, allocating one buffer as large as the remaining declared length first. A
/// request declaring a terabyte would make that allocation fail, and a failed allocation aborts
/// the process. So such a request is answered through `upgrade()`, which writes the response
/// and hands back the connection (body reader included) without dropping the reader, and that
/// connection is deliberately leaked: it costs one idle connection thread and one socket,
/// instead of the whole server. Only requests declaring more than the larger of
/// `--max-upload-bytes` and 256 MiB go this way; no client of this API sends those.
fn quarantine(request: Request, ceiling: u64) {
    log::warn!(
        "{} {} from {} declares a body of {} bytes (over {ceiling}): refused, connection abandoned",
        request.method(),
        request.url(),
        request
            .remote_addr()
            .map_or_else(|| "?".to_owned(), |a| a.to_string()),
        request.body_length().unwrap_or(0),
    );
    METRICS.request(request.url(), 413);
    let reply = Reply::detail(
        413,
        format!("Request body too large: the limit is {ceiling} bytes"),
    )
    .with_header("Connection", "close");
    let stream = request.upgrade("none", reply.into_response());
    std::mem::forget(stream);
}
