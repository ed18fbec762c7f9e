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

use crate::reply::{Reply, Responder};

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
) -> Result<(), ListenerFailed> {
    let mut waiter = Waiter::new();
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
/// Requests declaring a body over `ceiling` bytes are quarantined (see [`quarantine`]).
pub fn start_workers(
    count: usize,
    rx: &Receiver<Request>,
    ceiling: u64,
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
                        serve_one(&*handler, request, ceiling);
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

/// Handles one request. A panic in the handler leaves the worker alive; the request's
/// responder, dropped unanswered by the panic, answers 500.
fn serve_one(handler: &Handler, request: Request, ceiling: u64) {
    if request.body_length().is_some_and(|n| n as u64 > ceiling) {
        quarantine(request, ceiling);
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

/// Declared bodies above this size are never read nor dropped; see [`quarantine`].
pub const QUARANTINE_FLOOR: u64 = 256 * 1024 * 1024;

/// Answers a request that declares an absurd `Content-Length`, and never drops it.
///
/// When tiny_http drops a request whose body was not read to the end, it reads the rest and
/// throws it away, allocating one buffer as large as the remaining declared length first. A
/// request declaring a terabyte would make that allocation fail, and a failed allocation aborts
/// the process; reading the body ourselves does not help either (at the client's end of
/// stream tiny_http drops the reader the same way). So such a request is answered and its
/// connection abandoned (see [`Responder::abandon`]). Only requests declaring more than the
/// larger of `--max-upload-bytes` and 256 MiB go this way; no client of this API sends those.
fn quarantine(request: Request, ceiling: u64) {
    let why = format!(
        "declares a body of {} bytes (over {ceiling})",
        request.body_length().unwrap_or(0)
    );
    let reply = Reply::detail(
        413,
        format!("Request body too large: the limit is {ceiling} bytes"),
    );
    Responder::new(request).abandon(reply, &why);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tiny_http::{Header, TestRequest};

    use super::*;

    #[test]
    fn a_worker_lives_on_after_a_panic_and_absurd_bodies_never_reach_the_handler() {
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
        let workers = start_workers(1, &rx, 1024, &handler);
        drop(rx);
        let huge = Header::from_bytes("Content-Length", "1025").unwrap();
        for request in [
            TestRequest::new().with_path("/panic"),
            TestRequest::new().with_path("/after"),
            TestRequest::new().with_path("/huge").with_header(huge),
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
