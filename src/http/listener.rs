//! The listening socket, made by us so that every connection has timeouts, and the watch
//! that notices when tiny_http stopped taking connections.
//!
//! tiny_http has no connection timeouts and a thread per connection. On Linux an accepted
//! socket inherits `SO_RCVTIMEO`/`SO_SNDTIMEO` from the listening socket, so setting them
//! here (`--client-timeout`) bounds every read and write tiny_http or we do on a connection:
//! a silent client is dropped after that long. The same option bounds the listener's own
//! `accept()`, and tiny_http ends its accept loop on that error; the watch below connects
//! to the listener several times per timeout, so `accept()` never waits that long.
//!
//! Where tiny_http leaves no way out (its accept loop ended or panicked because descriptors
//! or threads ran out, or too many connections had to be abandoned on purpose, see
//! `reply`), the watch notices within seconds and the process exits with
//! [`EXIT_RESTART`] and a log line saying why: the service manager starts it again, and the
//! state file makes that restart invisible to clients.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// Connections that arrive while tiny_http's connection threads are idle can be left
/// waiting in its pool; see [`rescue`]. While requests come in, a round of rescue is made at
/// least this often, for a connection whose first request came late (every other case is
/// announced through [`Arrivals`]).
const RESCUE_BACKSTOP: Duration = Duration::from_millis(50);

/// After a round of [`rescue`] that found nothing waiting, the next waits this long.
const RESCUE_REST: Duration = Duration::from_millis(5);

/// How long [`rescue`] lets a burst of connections settle (tiny_http accepting the rest of
/// it, the threads it woke taking theirs) before its first request.
const RESCUE_SETTLE: Duration = Duration::from_micros(200);

/// The exit status of a deliberate crash: the service manager should start us again.
const EXIT_RESTART: i32 = 75;

/// Pending connections the kernel keeps for us (std uses 128).
const BACKLOG: i32 = 1024;

/// Connections abandoned on purpose (see `reply`'s `is_absurd`; only trusted callers'); each keeps a thread and two
/// descriptors until the process ends.
pub static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// More abandoned connections than this: restart to get their resources back.
pub const MAX_ABANDONED: usize = 100;

/// How long the listener may go without answering the watch before the process exits.
const DEAF_LIMIT: Duration = Duration::from_secs(5);

/// The read and write timeout of every connection: half of `--client-timeout`, because a
/// request that is answered without its body being read waits for two reads in a row
/// (tiny_http drains the body, then waits for the next request) before the connection is
/// closed; so a silent client is disconnected within `--client-timeout`.
pub fn socket_timeout(config: &crate::config::Config) -> Duration {
    config.client_timeout / 2
}

/// Binds `host:port` with the backlog and `timeout` as every connection's read and write
/// timeout.
pub fn bind(host: &str, port: u16, timeout: Duration) -> io::Result<TcpListener> {
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    // Inherited by every accepted connection: answers go out at once (with Nagle's
    // algorithm, one over 1 KiB waited 40 ms for the client's delayed ACK).
    if let Err(e) = sockopt::set_tcp_nodelay(&fd, true) {
        log::warn!("cannot set TCP_NODELAY on the listener: {e}");
    }
    sockopt::set_socket_timeout(&fd, Timeout::Recv, Some(timeout))?;
    sockopt::set_socket_timeout(&fd, Timeout::Send, Some(timeout))?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(TcpListener::from(fd))
}

/// Announces, from the listener thread to [`rescue`], that a connection brought its first
/// request: the moment at which tiny_http may have left others of the same burst waiting.
#[derive(Clone)]
pub struct Arrivals {
    tx: Sender<()>,
    rx: Receiver<()>,
}

impl Arrivals {
    pub fn new() -> Self {
        // One pending announcement is enough: a round serves every connection then waiting.
        let (tx, rx) = crossbeam_channel::bounded(1);
        Arrivals { tx, rx }
    }

    /// Says that a connection not seen before brought a request; never blocks.
    pub fn announce(&self) {
        let _ = self.tx.try_send(());
    }

    fn forget(&self) {
        while self.rx.try_recv().is_ok() {}
    }
}

impl Default for Arrivals {
    fn default() -> Self {
        Self::new()
    }
}

/// The peers whose requests the listener thread has seen, to tell a new connection from
/// the next request of a kept-alive one.
pub struct Peers {
    seen: HashSet<SocketAddr>,
}

/// Peers remembered before the set starts afresh (each then counts as new once more, which
/// costs one round of [`rescue`]).
const MAX_PEERS: usize = 4096;

impl Peers {
    pub fn new() -> Self {
        Peers {
            seen: HashSet::new(),
        }
    }

    /// Whether `peer` is a connection not seen before.
    pub fn is_new(&mut self, peer: Option<&SocketAddr>) -> bool {
        let Some(peer) = peer else {
            return false;
        };
        if self.seen.len() >= MAX_PEERS {
            self.seen.clear();
        }
        self.seen.insert(*peer)
    }
}

impl Default for Peers {
    fn default() -> Self {
        Self::new()
    }
}

/// The `Host` of [`rescue`]'s own requests, so that they announce nothing.
pub const RESCUE_HOST: &str = "rescue";

/// Keeps tiny_http from leaving connections unserved, until `stop` is set.
///
/// tiny_http hands each accepted connection to a pool of threads, one connection per thread
/// for as long as it stays open. The pool counts its idle threads, and a thread it has
/// woken still counts as idle until it has taken its connection: when several connections
/// are accepted back to back while some threads are idle (a client opening 32 keep-alive
/// connections at once), the later ones are queued for threads that are already busy, and
/// no new thread is started for them. Such a connection is served only when some thread of
/// the pool finishes its own connection, which for keep-alive clients may be never.
///
/// A connection is left waiting only in a moment when the pool has just woken an idle
/// thread for another one, and that one's first request is then announced by the listener
/// thread ([`Arrivals`]). So at each announcement this thread lets the burst settle and then
/// connects to `probe` itself with short requests ([`rescue_round`], [`kick`]): while
/// connections are left waiting, every thread of the pool is busy, so each such request
/// gets a new thread, which takes the oldest waiting connection once it has answered. A
/// round stops when requests are answered without a new thread (an idle thread took them:
/// nothing is waiting any more). While requests come in (`requests`, the count of requests
/// taken from tiny_http, grows), a round is also made every [`RESCUE_BACKSTOP`], for a
/// connection whose first request came late; after a round that found nothing waiting, the
/// next waits [`RESCUE_REST`].
pub fn rescue(arrivals: &Arrivals, probe: SocketAddr, stop: &AtomicBool, requests: &AtomicU64) {
    // The stop flag is looked at once a second when nothing arrives.
    const IDLE_WAIT: Duration = Duration::from_secs(1);
    let mut seen = requests.load(Ordering::Relaxed);
    let mut ours = 0;
    let mut busy = false;
    let mut rest_until = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let announced =
            match arrivals
                .rx
                .recv_timeout(if busy { RESCUE_BACKSTOP } else { IDLE_WAIT })
            {
                Ok(()) => true,
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return,
            };
        let now = requests.load(Ordering::Relaxed);
        busy = now.saturating_sub(seen) > ours;
        seen = now;
        if !announced && !busy {
            continue;
        }
        std::thread::sleep(rest_until.saturating_duration_since(Instant::now()) + RESCUE_SETTLE);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // Whatever was announced until now is seen to by this round.
        arrivals.forget();
        let kicks = rescue_round(probe);
        RESCUE_KICKS.fetch_add(kicks, Ordering::Relaxed);
        ours = kicks as u64;
        // Two requests: both answered by idle threads, nothing was waiting. Clients that
        // open a connection per request announce one each: rounds for them come at most
        // every RESCUE_REST, and one that frees a connection lets the next follow at once.
        rest_until = Instant::now()
            + if kicks <= 2 {
                RESCUE_REST
            } else {
                Duration::ZERO
            };
    }
}

/// One round of [`rescue`]: short requests until two batches of them in a row are answered
/// without a new thread. They go out one at a time at first, and in growing batches sent
/// at once while every one of a batch gets a new thread (many connections waiting: a
/// hundred of them freed one request at a time took 90 ms on a busy machine). Returns the
/// requests made.
fn rescue_round(probe: SocketAddr) -> usize {
    let mut kicks = 0;
    let mut unanswered: u32 = 0;
    let mut idle_seen = 0;
    let mut batch = 1;
    while kicks < MAX_KICKS && (unanswered as usize) < MAX_UNANSWERED && idle_seen < 2 {
        let before = thread_count();
        // Doubled after each request not answered in time, so that a machine too busy to
        // answer within the first limit gets a request after a while rather than a storm.
        let limit = (KICK_LIMIT * 2u32.pow(unanswered.min(4))).min(KICK_LIMIT_MAX);
        let answered = kick(probe, batch, limit);
        kicks += batch;
        if answered < batch {
            // Queued behind the waiting connections itself: the threads the pool woke for
            // the last arrivals have not taken theirs yet (on a loaded machine that can
            // take a while). Once they have, the next request gets a new thread. (Such a
            // request is closed: when its turn comes, its thread moves straight on to the
            // next connection in the queue.)
            unanswered += 1;
            batch = 1;
            std::thread::sleep(KICK_PAUSE);
            continue;
        }
        match (before, thread_count()) {
            (Some(b), Some(a)) if a >= b + batch => {
                idle_seen = 0;
                batch = (batch * 2).min(MAX_BATCH);
            }
            _ => {
                // An idle thread of the pool took one: nothing is waiting. Twice in a
                // row, in case another thread of ours ended meanwhile.
                idle_seen += 1;
                batch = 1;
            }
        }
    }
    kicks
}

/// The largest batch of requests [`rescue_round`] sends at once.
const MAX_BATCH: usize = 32;

/// Most requests of one round of [`rescue`]: more connections than this left waiting at
/// once are served over several rounds (or by the watch).
const MAX_KICKS: usize = 1024;

/// A round of [`rescue`] ends after this many requests that were not answered in time
/// (the listener is overwhelmed or gone, which the watch sees to).
const MAX_UNANSWERED: usize = 100;

/// How long [`kick`] first waits for its answer. One not answered by then is taken to be
/// queued behind waiting connections (see [`rescue_round`]); one merely slow costs a
/// request more, and the next waits twice as long, up to [`KICK_LIMIT_MAX`].
const KICK_LIMIT: Duration = Duration::from_millis(4);
const KICK_LIMIT_MAX: Duration = Duration::from_millis(50);

/// The pause after a request not answered in time: the threads the pool woke get the CPU.
const KICK_PAUSE: Duration = Duration::from_micros(500);

/// Requests [`rescue`] made so far (logged at exit).
pub static RESCUE_KICKS: AtomicUsize = AtomicUsize::new(0);

/// `count` short requests to the listener, sent at once: `GET /healthz` with
/// `Connection: close` on a connection each, each read to its end, then closed. Returns how
/// many were answered within `limit`.
fn kick(addr: SocketAddr, count: usize, limit: Duration) -> usize {
    let request =
        format!("GET /healthz HTTP/1.1\r\nHost: {RESCUE_HOST}\r\nConnection: close\r\n\r\n");
    let sent: Vec<TcpStream> = (0..count)
        .filter_map(|_| {
            let mut stream = TcpStream::connect_timeout(&addr, limit).ok()?;
            stream
                .set_read_timeout(Some(limit))
                .and_then(|_| stream.set_write_timeout(Some(limit)))
                .and_then(|_| stream.write_all(request.as_bytes()))
                .ok()?;
            Some(stream)
        })
        .collect();
    let mut answer = Vec::with_capacity(256);
    sent.into_iter()
        .filter(|mut stream| {
            answer.clear();
            // To the end: the connection's thread in the pool has finished with it then.
            stream.read_to_end(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.1 ")
        })
        .count()
}

/// The threads of this process (`Threads:` in /proc/self/status).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Raises the soft limit on open descriptors to the hard one (a shell gives 1024, which
/// tiny_http's two descriptors per connection use up at about 500 clients). Returns the
/// limit in force.
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            log::warn!("cannot raise the open-files limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// How often the watch connects: several times per socket timeout (so `accept()` never
/// times out), at least once a second.
pub fn watch_interval(socket_timeout: Duration) -> Duration {
    (socket_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// Why the watch gives up on the listener, if it does. The reasons are text: they are only
/// ever logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// Not answered yet; the listener may just be busy.
    Silent(String),
    /// Nothing listens any more, or descriptors are gone: no point in waiting.
    Dead(String),
}

/// One look through the listener: connect and send `GET /healthz`; any HTTP answer means
/// tiny_http still accepts and parses (the workers may be busy, or the state degraded).
pub fn probe(addr: SocketAddr, limit: Duration) -> Verdict {
    let mut stream = match TcpStream::connect_timeout(&addr, limit) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Verdict::Dead(format!("nothing listens on {addr} any more"));
        }
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
            return Verdict::Dead(format!("out of file descriptors ({e})"));
        }
        Err(e) => return Verdict::Silent(format!("connect: {e}")),
    };
    let sent = stream
        .set_read_timeout(Some(limit))
        .and_then(|_| stream.set_write_timeout(Some(limit)))
        .and_then(|_| {
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: watch\r\nConnection: close\r\n\r\n")
        });
    if let Err(e) = sent {
        return Verdict::Silent(format!("send: {e}"));
    }
    let mut head = [0u8; 9];
    match stream.read_exact(&mut head) {
        Ok(()) if &head == b"HTTP/1.1 " => Verdict::Alive,
        Ok(()) => Verdict::Silent(format!("odd answer {:?}", String::from_utf8_lossy(&head))),
        Err(e) => Verdict::Silent(format!("no answer: {e}")),
    }
}

/// Decides, from one probe, whether the process must go, and says why (text: it is only
/// logged, by [`restart_now`]). `last_alive` is when the listener last answered.
pub fn judge(verdict: Verdict, last_alive: &mut Instant, now: Instant) -> Option<String> {
    let abandoned = ABANDONED.load(Ordering::SeqCst);
    if abandoned > MAX_ABANDONED {
        return Some(format!(
            "{abandoned} connections were abandoned on purpose (bodies too large to drain, or \
             too many to drain at once); each holds a thread and two descriptors"
        ));
    }
    match verdict {
        Verdict::Alive => {
            *last_alive = now;
            None
        }
        Verdict::Dead(why) => Some(format!("the HTTP listener is gone: {why}")),
        Verdict::Silent(why) if now.duration_since(*last_alive) > DEAF_LIMIT => Some(format!(
            "the HTTP listener has not answered for {:.0} s (last: {why})",
            now.duration_since(*last_alive).as_secs_f64()
        )),
        Verdict::Silent(why) => {
            log::warn!("the listener did not answer the self-check: {why}");
            None
        }
    }
}

/// What runs before a deliberate exit, with its reason: see [`before_restart`].
type Hook = Box<dyn Fn(&str, i32) + Send + Sync>;

static BEFORE_RESTART: Mutex<Option<Hook>> = Mutex::new(None);

/// Sets what [`restart_now`] does before the process ends, given the reason and the exit
/// status: the server records the exit as an event and waits for the event writer, whose
/// queue would otherwise die with the process. This module knows nothing above it, hence a
/// hook; it may run on any thread (a worker, a dropper, the watch).
pub fn before_restart(hook: impl Fn(&str, i32) + Send + Sync + 'static) {
    *BEFORE_RESTART.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
}

/// Ends the process at once for the service manager to restart it. Everything a client was
/// told is already in the state file; a `netlab up` still running is killed by the next
/// start (its process group is in the state file too).
pub fn restart_now(why: &str) -> ! {
    log::error!(
        "{why}: exiting with status {EXIT_RESTART} so that the service manager restarts the server"
    );
    // Two threads may get here at once: the first runs the hook and ends the process with
    // the lock held, so the second waits instead of ending it before the hook is done.
    let mut hook = BEFORE_RESTART.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(hook) = hook.take() {
        hook(why, EXIT_RESTART);
    }
    log::logger().flush();
    std::process::exit(EXIT_RESTART)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_new_once_and_the_set_starts_afresh_when_full() {
        let mut peers = Peers::new();
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert!(peers.is_new(Some(&a)));
        assert!(
            !peers.is_new(Some(&a)),
            "the next request of a kept-alive connection"
        );
        assert!(!peers.is_new(None), "no address, nothing to announce");
        for port in 1..MAX_PEERS as u16 {
            peers.is_new(Some(&SocketAddr::from(([127, 0, 0, 2], port))));
        }
        assert_eq!(peers.seen.len(), MAX_PEERS);
        assert!(
            peers.is_new(Some(&a)),
            "forgotten when the set started afresh"
        );
        assert_eq!(peers.seen.len(), 1);
    }

    #[test]
    fn announcements_never_block_and_one_stands_for_many() {
        let arrivals = Arrivals::new();
        for _ in 0..10 {
            arrivals.announce();
        }
        assert!(arrivals.rx.try_recv().is_ok());
        assert!(
            arrivals.rx.try_recv().is_err(),
            "one pending announcement at most"
        );
        arrivals.announce();
        arrivals.forget();
        assert!(arrivals.rx.try_recv().is_err());
    }

    #[test]
    fn accepted_connections_inherit_the_timeouts() {
        let listener = bind("127.0.0.1", 0, Duration::from_millis(1500)).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(
            accepted.read_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            accepted.write_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn a_closed_listener_is_dead_and_a_silent_one_is_given_time() {
        let listener = bind("127.0.0.1", 0, Duration::from_secs(5)).unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel, never answered.
        assert!(matches!(
            probe(addr, Duration::from_millis(100)),
            Verdict::Silent(_)
        ));
        drop(listener);
        // A command that another test of this binary spawns at that moment holds a copy of
        // the socket until it execs: the port may stay open a moment longer.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(probe(addr, Duration::from_millis(100)), Verdict::Dead(_)) {
            assert!(
                Instant::now() < deadline,
                "the closed listener still answers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        let start = Instant::now();
        let mut last = start;
        assert_eq!(
            judge(
                Verdict::Silent("x".into()),
                &mut last,
                start + Duration::from_secs(1)
            ),
            None
        );
        assert!(
            judge(
                Verdict::Silent("x".into()),
                &mut last,
                start + DEAF_LIMIT * 2
            )
            .is_some()
        );
        assert_eq!(
            judge(Verdict::Alive, &mut last, start + DEAF_LIMIT * 2),
            None
        );
        assert!(judge(Verdict::Dead("gone".into()), &mut last, start).is_some());
    }

    #[test]
    fn the_watch_connects_several_times_per_timeout() {
        assert_eq!(
            watch_interval(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            watch_interval(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }
}
