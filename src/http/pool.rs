//! The HTTP edge: the listener thread and the worker pool. It knows nothing of the API: each
//! request becomes a [`Responder`] handed to the handler the server gives it.
//!
//! tiny_http accepts connections and parses requests on its own threads and queues them
//! without bound; the listener thread only drains `recv()` into a bounded channel, so the
//! queue stays short, and answers `503 Server busy` itself when the channel is full.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};
use tiny_http::{Request, Server};

use crate::http::listener::{Arrivals, Peers, RESCUE_HOST};
use crate::http::reply::{Reply, Responder};

/// What a worker calls for each request.
pub type Handler = dyn Fn(Responder) + Send + Sync;

/// tiny_http's accept loop died: the process must exit non-zero.
#[derive(Debug)]
pub struct ListenerFailed(pub String);

impl std::fmt::Display for ListenerFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the HTTP listener failed: {}", self.0)
    }
}

impl std::error::Error for ListenerFailed {}

/// Capacity of the work channel between the listener and the workers.
const WORK_CHANNEL_CAPACITY: usize = 1024;

/// Drains `server.recv()` into the workers' channel until `stop` is set (and the server
/// unblocked). Returns `Err` when tiny_http's accept loop died.
pub fn listen(
    server: &Server,
    stop: &AtomicBool,
    tx: &Sender<Request>,
    arrivals: &Arrivals,
) -> Result<(), ListenerFailed> {
    let mut waiter = Waiter::new();
    let mut peers = Peers::new();
    loop {
        let request = match next_incoming(&mut waiter, server, stop) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                return Err(ListenerFailed(e.to_string()));
            }
        };
        if peers.is_new(request.remote_addr()) && !from_rescue(&request) {
            arrivals.announce();
        }
        if !dispatch(request, tx) {
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
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

/// Whether `request` is one of the rescue thread's own (see `listener::rescue`).
fn from_rescue(request: &Request) -> bool {
    request
        .headers()
        .iter()
        .any(|h| h.field.equiv("Host") && h.value.as_str() == RESCUE_HOST)
}

/// Requests taken from tiny_http so far (the rescue in `listener` watches it).
pub static DISPATCHED: AtomicU64 = AtomicU64::new(0);

fn dispatch(request: Request, tx: &Sender<Request>) -> bool {
    DISPATCHED.fetch_add(1, Ordering::Relaxed);
    match tx.try_send(request) {
        Ok(()) => true,
        Err(TrySendError::Full(request)) => {
            Responder::new(request)
                .respond(Reply::detail(503, "Server busy").with_header("Retry-After", "1"));
            true
        }
        Err(TrySendError::Disconnected(request)) => {
            Responder::new(request).respond(Reply::detail(503, "Server is shutting down"));
            false
        }
    }
}

pub fn work_channel() -> (Sender<Request>, Receiver<Request>) {
    bounded(WORK_CHANNEL_CAPACITY)
}

/// Starts the worker pool. Each worker runs until the channel is closed and drained.
pub fn start_workers(
    count: usize,
    rx: &Receiver<Request>,
    handler: &Arc<Handler>,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|n| {
            let handler = Arc::clone(handler);
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || {
                    let mut waiter = Waiter::new();
                    while let Some(request) = next_request(&mut waiter, &rx) {
                        serve_one(&*handler, request);
                    }
                })
                .expect("cannot start a worker thread")
        })
        .collect()
}

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
    stop: &AtomicBool,
) -> std::io::Result<Option<Request>> {
    waiter.next(
        || {
            if stop.load(Ordering::SeqCst) {
                return Ok(Some(None));
            }
            server.try_recv().map(|r| r.map(Some))
        },
        || loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            if let Some(request) = server.recv_timeout(Duration::from_millis(100))? {
                return Ok(Some(request));
            }
        },
    )
}

/// Longest request line (method, target and version) served; longer ones get 414.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest header block (names, values and their separators) served; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most header lines served; more get 431.
pub const MAX_HEADERS: usize = 100;

/// The answer to a request whose head is over our limits, if it is: 414 for a long request
/// line, 431 for too many or too large headers. Checked before anything else looks at the
/// request (no token check, no event, no log line with its path, no body read).
pub fn over_limits(request: &Request) -> Option<Reply> {
    let line = request.method().as_str().len() + 1 + request.url().len() + " HTTP/1.1".len();
    if line > MAX_REQUEST_LINE {
        return Some(Reply::detail(
            414,
            format!("Request line too long: the limit is {MAX_REQUEST_LINE} bytes"),
        ));
    }
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|h| h.field.as_str().as_str().len() + 2 + h.value.as_str().len() + 2)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Some(Reply::detail(
            431,
            format!(
                "Request header fields too large: the limits are {MAX_HEADERS} fields and \
                 {MAX_HEADER_BYTES} bytes"
            ),
        ));
    }
    None
}

/// Handles one request. A panic in the handler leaves the worker alive; the request's
/// responder, dropped unanswered by the panic, answers 500.
fn serve_one(handler: &Handler, request: Request) {
    if let Some(reply) = over_limits(&request) {
        Responder::new(request).respond(reply);
        return;
    }
    let started = Instant::now();
    // The responder, dropped unanswered, logs which request it was.
    if catch_unwind(AssertUnwindSafe(|| handler(Responder::new(request)))).is_err() {
        log::error!("a request handler panicked; the worker goes on");
    }
    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    LONGEST_SERVE_US.fetch_max(took, Ordering::Relaxed);
}

/// The longest a worker spent on one request so far, in microseconds (logged at exit):
/// how long a worker was kept from everyone else.
pub static LONGEST_SERVE_US: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tiny_http::{Header, TestRequest};

    use super::*;

    #[test]
    fn a_worker_lives_on_after_a_panic_and_oversize_heads_never_reach_the_handler() {
        let (tx, rx) = work_channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = {
            let seen = Arc::clone(&seen);
            Arc::new(move |responder: Responder| {
                let path = responder.request().url().to_owned();
                seen.lock().unwrap().push(path.clone());
                if path == "/panic" {
                    panic!("a handler bug");
                }
                responder.respond(Reply::empty(204));
            })
        };
        let workers = start_workers(1, &rx, &handler);
        drop(rx);
        let long = format!("/{}", "a".repeat(MAX_REQUEST_LINE));
        let big = Header::from_bytes("X-Big", "b".repeat(MAX_HEADER_BYTES)).unwrap();
        let mut many = TestRequest::new().with_path("/many");
        for n in 0..=MAX_HEADERS {
            many = many.with_header(Header::from_bytes(format!("X-{n}"), "1").unwrap());
        }
        for request in [
            TestRequest::new().with_path("/panic"),
            TestRequest::new().with_path("/after"),
            TestRequest::new().with_path(&long),
            TestRequest::new().with_path("/big").with_header(big),
            many,
            TestRequest::new().with_path("/last"),
        ] {
            tx.send(request.into()).unwrap();
        }
        drop(tx);
        for worker in workers {
            worker.join().unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), ["/panic", "/after", "/last"]);
    }
}
