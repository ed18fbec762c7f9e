//! Long-poll of `GET /session/{id}?wait=S`: requests parked without a worker.
//!
//! A waiting session's status request is parked here (inside the shared state, under
//! its lock) and answered by whichever thread changes the queue (a session ending ahead of
//! it, a promotion, the sweep), by the timer when its wait runs out, or at shutdown. The
//! answering thread takes the ready requests out under the lock and writes them after it
//! let go of it: no socket write ever happens under the lock.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::core::queue::{Queue, SessionId, Status};
use crate::http::reply::{Reply, Responder};

/// At most this many parked requests, however many descriptors we may open; beyond the cap
/// (see [`cap_for`]), `wait` is ignored and the answer immediate.
pub const MAX_PARKED: usize = 10_000;
/// Descriptors kept out of the long-polls' share: the workers' connections, uploads, the
/// state and log files, netlab's pipes.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The cap in force (set once at start from the open-files limit).
static CAP: AtomicUsize = AtomicUsize::new(MAX_PARKED);

/// The cap for an open-files limit of `nofile` (`None`: unlimited). Each parked request
/// holds its connection's two descriptors (tiny_http keeps a clone of the socket for
/// writing); the long-polls get at most half of what is left after a reserve, so that a
/// crowd of waiting clients cannot starve the rest of the server of descriptors (which would
/// make tiny_http's accept loop fail and the server restart).
pub fn cap_for(nofile: Option<u64>) -> usize {
    match nofile {
        None => MAX_PARKED,
        Some(n) => {
            let share = n.saturating_sub(RESERVED_DESCRIPTORS) / 4;
            usize::try_from(share).map_or(MAX_PARKED, |share| share.min(MAX_PARKED))
        }
    }
}

/// Sets the cap (at start).
pub fn set_cap(cap: usize) {
    CAP.store(cap, Ordering::Relaxed);
}

/// The cap in force.
pub fn cap() -> usize {
    CAP.load(Ordering::Relaxed)
}
/// The longest wait a client may ask for, in seconds.
pub const MAX_WAIT_SECS: f64 = 60.0;

struct Waiter {
    id: SessionId,
    /// What the client would have been told when it parked.
    seen: (Status, usize),
    deadline: Duration,
    responder: Responder,
    /// The order it was parked in (see [`Parked::take_dead`]).
    serial: u64,
}

/// Which parked requests [`Parked::take_ready`] takes out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Those whose session changed: status, position, or gone.
    Changed,
    /// Those whose wait ran out (and those whose session changed).
    Expired,
    /// Every one (shutdown).
    All,
}

/// The parked requests.
#[derive(Default)]
pub struct Parked {
    waiters: Vec<Waiter>,
    /// The earliest deadline among `waiters`.
    earliest: Option<Duration>,
    /// The serial of the next request parked.
    next_serial: u64,
}

/// A parked request ready to be answered, and its answer.
pub type Ready = Vec<(Responder, Reply)>;

impl Parked {
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.waiters.len() >= cap()
    }

    /// The serial the next parked request will get: those parked before have a lower one.
    pub fn next_serial(&self) -> u64 {
        self.next_serial
    }

    /// Parks a request; true when its deadline is the earliest now (the timer must wake
    /// for it; otherwise it wakes in time already).
    pub fn park(
        &mut self,
        id: SessionId,
        seen: (Status, usize),
        deadline: Duration,
        responder: Responder,
    ) -> bool {
        let earliest = self.earliest.is_none_or(|d| deadline < d);
        if earliest {
            self.earliest = Some(deadline);
        }
        self.waiters.push(Waiter {
            id,
            seen,
            deadline,
            responder,
            serial: self.next_serial,
        });
        self.next_serial += 1;
        earliest
    }

    /// Takes out the requests parked before `serial` whose client is gone: their peer
    /// address is not among the `alive` connections (see [`live_peers`]). They are answered
    /// with the state as it is (the write fails or reaches a client that half-closed); their
    /// session is not refreshed, since nobody is there to poll.
    pub fn take_dead(&mut self, queue: &Queue, serial: u64, alive: &HashSet<SocketAddr>) -> Ready {
        let dead = |w: &Waiter| {
            w.serial < serial
                && w.responder
                    .request()
                    .remote_addr()
                    .is_some_and(|addr| !alive.contains(&canonical(*addr)))
        };
        if !self.waiters.iter().any(dead) {
            return Vec::new();
        }
        let mut ready = Vec::new();
        let mut kept = Vec::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            if dead(&waiter) {
                let reply = queue
                    .lookup(&waiter.id)
                    .map_or_else(Reply::session_not_found, status_reply);
                ready.push((waiter.responder, reply));
            } else {
                kept.push(waiter);
            }
        }
        self.earliest = kept.iter().map(|w| w.deadline).min();
        self.waiters = kept;
        ready
    }

    /// The earliest deadline of a parked request.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.earliest
    }

    /// Takes out the requests that are due, with their answers (the state as it is now).
    /// Answered sessions are refreshed (an answer counts as a poll).
    pub fn take_ready(&mut self, queue: &mut Queue, now: Duration, which: Due) -> Ready {
        if self.waiters.is_empty()
            || (which == Due::Expired && self.earliest.is_some_and(|e| now < e))
        {
            return Vec::new();
        }
        let mut ready = Vec::new();
        let mut kept = Vec::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            let current = queue.lookup(&waiter.id);
            let due = match which {
                Due::Changed => current != Some(waiter.seen),
                Due::Expired => now >= waiter.deadline || current != Some(waiter.seen),
                Due::All => true,
            };
            if !due {
                kept.push(waiter);
                continue;
            }
            let reply = match current {
                Some(state) => {
                    queue.touch(&waiter.id, now);
                    status_reply(state)
                }
                None => Reply::session_not_found(),
            };
            ready.push((waiter.responder, reply));
        }
        self.earliest = kept.iter().map(|w| w.deadline).min();
        self.waiters = kept;
        ready
    }
}

// ------------------------------------------------------------------ dead clients' long-polls

/// tiny_http gives no access to a connection's socket, so a client that went away while its
/// request was parked is found in the kernel's table of TCP connections instead: the
/// connections to our listening `port` that are ESTABLISHED, by peer address. A peer that
/// reset its connection is no longer listed; one that closed it is in CLOSE_WAIT; either
/// way it is not in the set. `None` when the tables cannot be read (not Linux, no /proc):
/// then nothing is taken for dead.
///
/// The kernel's table is read in pieces, so a connection may in rare cases be missed while
/// others come and go; its request is then answered early with the state as it is, which
/// the client takes as any other answer (it asks again).
pub fn live_peers(port: u16) -> Option<HashSet<SocketAddr>> {
    let mut alive = HashSet::new();
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            read_any = true;
            alive.extend(established_peers(&text, port));
        }
    }
    read_any.then_some(alive)
}

/// TCP state 1 in the kernel's tables.
const ESTABLISHED: &str = "01";

/// The peers of the ESTABLISHED connections to local `port` in the text of `/proc/net/tcp`
/// or `/proc/net/tcp6`.
fn established_peers(text: &str, port: u16) -> impl Iterator<Item = SocketAddr> + '_ {
    text.lines().skip(1).filter_map(move |line| {
        let mut fields = line.split_whitespace().skip(1);
        let (local, remote, state) = (fields.next()?, fields.next()?, fields.next()?);
        if state != ESTABLISHED || parse_entry(local)?.port() != port {
            return None;
        }
        parse_entry(remote).map(canonical)
    })
}

/// An address of the kernel's table: `0100007F:1F90` (IPv4) or 32 hex digits and a port
/// (IPv6). The address is printed as 32-bit words in the host's byte order, the port as a
/// number.
fn parse_entry(entry: &str) -> Option<SocketAddr> {
    let (addr, port) = entry.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip: std::net::IpAddr = match addr.len() {
        8 => std::net::Ipv4Addr::from(word(0)?).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// An IPv4 client of a listener on `[::]` is `::ffff:a.b.c.d`: the same peer as `a.b.c.d`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `200 {"status":…,"position":…}`.
pub fn status_reply((status, position): (Status, usize)) -> Reply {
    Reply::json(
        200,
        &crate::protocol::SessionStatus {
            status: status.as_str().into(),
            position,
        },
    )
}

/// Parses `wait`: a number of seconds, 0 < S ≤ 60. The error is the 422 to send.
pub fn parse_wait(text: &str) -> Result<Duration, Reply> {
    let Ok(secs) = text.trim().parse::<f64>() else {
        return Err(Reply::validation(
            "float_parsing",
            ["query", "wait"],
            "Input should be a valid number, unable to parse string as a number",
            Some(text),
        ));
    };
    if !secs.is_finite() {
        return Err(Reply::validation(
            "finite_number",
            ["query", "wait"],
            "Input should be a finite number",
            Some(text),
        ));
    }
    if secs <= 0.0 {
        return Err(Reply::validation(
            "greater_than",
            ["query", "wait"],
            "Input should be greater than 0",
            Some(text),
        ));
    }
    if secs > MAX_WAIT_SECS {
        return Err(Reply::validation(
            "less_than_equal",
            ["query", "wait"],
            "Input should be less than or equal to 60",
            Some(text),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Answers requests taken out by [`Parked::take_ready`]; call it without the state lock.
pub fn answer(ready: Ready) {
    for (responder, reply) in ready {
        responder.respond(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Responder {
        Responder::capture(tiny_http::TestRequest::new().into()).0
    }

    #[test]
    fn what_is_due_and_when() {
        let mut queue = Queue::new(10);
        let ids: Vec<SessionId> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
        for id in &ids {
            queue.create(*id, Duration::ZERO).unwrap();
        }
        let mut parked = Parked::default();
        let s = Duration::from_secs;
        // The first park has the earliest deadline; a later one does not.
        assert!(parked.park(ids[1], (Status::Waiting, 1), s(30), request()));
        assert!(!parked.park(ids[2], (Status::Waiting, 2), s(40), request()));
        assert!(parked.park(ids[2], (Status::Waiting, 2), s(10), request()));
        assert_eq!(parked.next_deadline(), Some(s(10)));
        // Nothing changed, nothing expired.
        assert!(parked.take_ready(&mut queue, s(1), Due::Changed).is_empty());
        assert!(parked.take_ready(&mut queue, s(9), Due::Expired).is_empty());
        // The wait of 10 s ran out: that one only, and the next deadline moves on.
        let ready = parked.take_ready(&mut queue, s(10), Due::Expired);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].1, status_reply((Status::Waiting, 2)));
        assert_eq!(parked.next_deadline(), Some(s(30)));
        // The head leaves: both left are due, with their new state, and refreshed.
        queue.remove(&ids[0]);
        let ready = parked.take_ready(&mut queue, s(12), Due::Changed);
        let replies: Vec<Reply> = ready.into_iter().map(|(_, r)| r).collect();
        assert_eq!(
            replies,
            [
                status_reply((Status::Active, 0)),
                status_reply((Status::Waiting, 1))
            ]
        );
        assert!(parked.is_empty());
        assert_eq!(parked.next_deadline(), None);
        let stale = queue.sweep(s(12) + s(1), s(1), s(1));
        assert!(stale.is_empty(), "answered sessions were refreshed at 12 s");
        // A session that is gone is 404; at shutdown everything goes.
        parked.park(ids[2], (Status::Waiting, 1), s(60), request());
        parked.park(ids[1], (Status::Active, 0), s(60), request());
        queue.remove(&ids[2]);
        let ready = parked.take_ready(&mut queue, s(13), Due::Changed);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].1, Reply::session_not_found());
        assert_eq!(parked.take_ready(&mut queue, s(13), Due::All).len(), 1);
        assert!(parked.is_empty());
    }

    #[test]
    fn the_cap_follows_the_open_files_limit() {
        assert_eq!(cap_for(None), MAX_PARKED);
        assert_eq!(cap_for(Some(65_536)), MAX_PARKED);
        // 20 000 descriptors: 4 936 parked hold 9 872, half of what the reserve leaves.
        assert_eq!(cap_for(Some(20_000)), 4_936);
        assert_eq!(cap_for(Some(1_024)), 192);
        assert_eq!(cap_for(Some(100)), 0);
        assert_eq!(cap_for(Some(u64::MAX)), MAX_PARKED);
    }

    /// Lines of `/proc/net/tcp` and `/proc/net/tcp6` as Linux prints them (little-endian).
    #[cfg(target_endian = "little")]
    #[test]
    fn the_kernel_tables_are_read() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C351 08 00000000:00000000 00:00000000 00000000  1000        0 3 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:C352 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 4 1 0000000000000000 20 4 30 10 -1
   4: 0201A8C0:1F90 6401A8C0:D431 01 00000000:00000000 00:00000000 00000000  1000        0 5 1 0000000000000000 20 4 30 10 -1
";
        let peers: Vec<SocketAddr> = established_peers(tcp, 8080).collect();
        // Listening (0A), CLOSE_WAIT (08) and a connection from port 8080 elsewhere are not.
        assert_eq!(
            peers,
            [
                "127.0.0.1:50000".parse().unwrap(),
                "192.168.1.100:54321".parse().unwrap()
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000  1000        0 6 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C353 01 00000000:00000000 00:00000000 00000000  1000        0 7 1 0000000000000000 20 4 30 10 -1
   2: 000080FE00000000FF005452FF0535FE:1F90 000080FE00000000FF005452FF0635FE:C354 01 00000000:00000000 00:00000000 00000000  1000        0 8 1 0000000000000000 20 4 30 10 -1
";
        let peers: Vec<SocketAddr> = established_peers(tcp6, 8080).collect();
        assert_eq!(
            peers,
            [
                "[::1]:50000".parse().unwrap(),
                // An IPv4 client of a listener on [::] is that IPv4 address.
                "127.0.0.1:50003".parse().unwrap(),
                "[fe80::5254:ff:fe35:6ff]:50004".parse().unwrap(),
            ]
        );
        assert_eq!(parse_entry("0100007F"), None);
        assert_eq!(parse_entry("0100007G:1F90"), None);
        assert_eq!(parse_entry("0100007F0:1F90"), None);
    }

    #[test]
    fn the_dead_are_taken_out() {
        let mut queue = Queue::new(10);
        let ids: Vec<SessionId> = (0..2).map(|_| uuid::Uuid::new_v4()).collect();
        for id in &ids {
            queue.create(*id, Duration::ZERO).unwrap();
        }
        let from = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
        let parked_from = |port: u16| {
            Responder::capture(
                tiny_http::TestRequest::new()
                    .with_remote_addr(from(port))
                    .into(),
            )
            .0
        };
        let mut parked = Parked::default();
        let s = Duration::from_secs;
        parked.park(ids[1], (Status::Waiting, 1), s(30), parked_from(1));
        parked.park(ids[1], (Status::Waiting, 1), s(20), parked_from(2));
        let serial = parked.next_serial();
        // Parked after the table was read: not judged by it.
        parked.park(ids[1], (Status::Waiting, 1), s(10), parked_from(3));
        let alive: HashSet<SocketAddr> = [from(1)].into();
        let ready = parked.take_dead(&queue, serial, &alive);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].1, status_reply((Status::Waiting, 1)));
        assert_eq!(parked.len(), 2);
        assert_eq!(parked.next_deadline(), Some(s(10)));
        // The answer refreshed nothing: nobody was there.
        let stale = queue.sweep(s(100), s(1), s(1));
        assert_eq!(stale.len(), 2);
        // The rest are gone too, and their sessions with them.
        let ready = parked.take_dead(&queue, parked.next_serial(), &HashSet::new());
        let replies: Vec<Reply> = ready.into_iter().map(|(_, r)| r).collect();
        assert_eq!(
            replies,
            [Reply::session_not_found(), Reply::session_not_found()]
        );
        assert!(parked.is_empty());
        assert_eq!(parked.next_deadline(), None);
    }

    #[test]
    fn wait_values() {
        assert_eq!(parse_wait("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_wait("60").unwrap(), Duration::from_secs(60));
        for bad in ["0", "61", "-1", "abc", "", "inf", "NaN", "60.001"] {
            let reply = parse_wait(bad).unwrap_err();
            assert_eq!(reply.status, 422, "{bad}");
        }
        let body = parse_wait("abc").unwrap_err().body.unwrap();
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "{\"detail\":[{\"type\":\"float_parsing\",\"loc\":[\"query\",\"wait\"],\
             \"msg\":\"Input should be a valid number, unable to parse string as a number\",\
             \"input\":\"abc\"}]}"
        );
    }
}
