//! Long-poll of `GET /session/{id}?wait=S`: requests parked without a worker.
//!
//! A waiting session's status request is parked here (inside the shared state, under
//! its lock) and answered by whichever thread changes the queue (a session ending ahead of
//! it, a promotion, the sweep), by the timer when its wait runs out, or at shutdown. The
//! answering thread takes the ready requests out under the lock and writes them after it
//! let go of it: no socket write ever happens under the lock.

use std::time::Duration;

use crate::core::queue::{Queue, SessionId, Status};
use crate::http::reply::{Reply, Responder};

/// At most this many parked requests; beyond, `wait` is ignored and the answer immediate.
pub const MAX_PARKED: usize = 10_000;
/// The longest wait a client may ask for, in seconds.
pub const MAX_WAIT_SECS: f64 = 60.0;

struct Waiter {
    id: SessionId,
    /// What the client would have been told when it parked.
    seen: (Status, usize),
    deadline: Duration,
    responder: Responder,
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
        self.waiters.len() >= MAX_PARKED
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
        });
        earliest
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
