//! Long-poll of `GET /session/{id}?wait=S`: requests parked without a worker.
//!
//! A waiting session's status request is parked here (inside [`crate::state::State`], under
//! its lock) and answered by whichever thread changes the queue (a session ending ahead of
//! it, a promotion, the sweep), by the timer when its wait runs out, or at shutdown. The
//! answering thread takes the ready requests out under the lock and writes them after it
//! let go of it: no socket write ever happens under the lock.

use std::time::Duration;

use tiny_http::Request;

use crate::http::Reply;
use crate::queue::{Queue, SessionId, Status};

/// At most this many parked requests; beyond, `wait` is ignored and the answer immediate.
pub const MAX_PARKED: usize = 10_000;
/// The longest wait a client may ask for, in seconds.
pub const MAX_WAIT_SECS: f64 = 60.0;

struct Waiter {
    id: SessionId,
    /// What the client would have been told when it parked.
    seen: (Status, usize),
    deadline: Duration,
    request: Request,
}

/// The parked requests.
#[derive(Default)]
pub struct Parked {
    waiters: Vec<Waiter>,
}

/// A parked request ready to be answered, and its answer.
pub type Ready = Vec<(Request, Reply)>;

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

    pub fn park(
        &mut self,
        id: SessionId,
        seen: (Status, usize),
        deadline: Duration,
        request: Request,
    ) {
        self.waiters.push(Waiter {
            id,
            seen,
            deadline,
            request,
        });
    }

    /// The earliest deadline of a parked request.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.waiters.iter().map(|w| w.deadline).min()
    }

    /// Takes out the requests whose session changed (status, position, or gone) and, when
    /// `now` is given, those whose wait ran out, or every one when `all`. Answered sessions
    /// are refreshed (an answer counts as a poll).
    pub fn take_ready(
        &mut self,
        queue: &mut Queue,
        now: Duration,
        expire: bool,
        all: bool,
    ) -> Ready {
        let mut ready = Vec::new();
        let mut kept = Vec::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            let current = queue.lookup(&waiter.id);
            let due = all || (expire && now >= waiter.deadline) || current != Some(waiter.seen);
            if !due {
                kept.push(waiter);
                continue;
            }
            let reply = match current {
                Some(state) => {
                    queue.touch(&waiter.id, now);
                    status_reply(state)
                }
                None => not_found(),
            };
            ready.push((waiter.request, reply));
        }
        self.waiters = kept;
        ready
    }
}

/// The answer for a session that is gone.
pub fn not_found() -> Reply {
    Reply::detail(404, "Session not found")
}

/// `200 {"status":…,"position":…}`.
pub fn status_reply((status, position): (Status, usize)) -> Reply {
    Reply::raw_json(
        200,
        format!(
            "{{\"status\":\"{}\",\"position\":{position}}}",
            status.as_str()
        ),
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
    for (request, reply) in ready {
        crate::http::respond(request, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
