//! The host's own condition, beside its queue: whether an admin is draining it (no new
//! sessions; the drain file keeps it across restarts), and whether it is unhealthy (starts
//! kept failing for reasons not the topology's).
//!
//! Health is counted per host, in one place: the lab thread calls [`Host::start_failed`]
//! when a start fails for a reason that counts against the host, and
//! [`Host::start_succeeded`] when netlab brought a lab up. After `--unhealthy-after` such
//! failures in a row the host is unhealthy; a success, an admin's reset, or a successful
//! health check (`--health-topology`, every `--health-interval` while unhealthy) makes it
//! healthy again. The caller (the shared state's `start_failed`, `start_succeeded` and
//! `health_reset`) records the events and the metrics of each change.
//!
//! Its own small lock, never held together with the state lock.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::store::drain::Drain;

/// What the host tells pools and probes (`/queue`'s `host_state`, `/healthz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    Ok,
    Draining,
    Unhealthy,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Ok => "ok",
            Condition::Draining => "draining",
            Condition::Unhealthy => "unhealthy",
        }
    }
}

/// A failed start, as counted.
#[derive(Debug, PartialEq, Eq)]
pub struct Failed {
    /// Failures in a row, this one included.
    pub in_a_row: u32,
    /// This failure made the host unhealthy.
    pub became_unhealthy: bool,
}

#[derive(Default)]
struct Inner {
    drain: Option<Drain>,
    /// Starts that failed in a row for reasons that count against the host.
    failures: u32,
    /// Set while unhealthy: netlab's words from the last failure.
    unhealthy: Option<String>,
    /// When the next health check is due (clock time), while unhealthy.
    next_check: Option<Duration>,
    /// A health check is queued on the lab thread or running.
    checking: bool,
}

pub struct Host {
    unhealthy_after: u32,
    inner: Mutex<Inner>,
}

impl Host {
    pub fn new(unhealthy_after: u32) -> Self {
        Host {
            unhealthy_after: unhealthy_after.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the host says about itself, and why. Draining wins over unhealthy: it is what
    /// an admin asked for, and either keeps new work away.
    pub fn condition(&self) -> (Condition, Option<String>) {
        let inner = self.lock();
        match (&inner.drain, &inner.unhealthy) {
            (Some(drain), _) => (
                Condition::Draining,
                Some(match &drain.by {
                    Some(by) => format!("drained by {by}"),
                    None => "drained".to_owned(),
                }),
            ),
            (None, Some(error)) => (Condition::Unhealthy, Some(error.clone())),
            (None, None) => (Condition::Ok, None),
        }
    }

    pub fn draining(&self) -> Option<Drain> {
        self.lock().drain.clone()
    }

    /// Sets or clears the drain; `write` makes it durable first (the drain file), under
    /// this lock so that two admins cannot interleave. Returns whether it changed; an
    /// error of `write` changes nothing.
    pub fn set_drain<E>(
        &self,
        drain: Option<Drain>,
        write: impl FnOnce(Option<&Drain>) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut inner = self.lock();
        if inner.drain.is_some() == drain.is_some() {
            return Ok(false);
        }
        write(drain.as_ref())?;
        inner.drain = drain;
        Ok(true)
    }

    /// netlab's last error, while the host is unhealthy.
    pub fn unhealthy(&self) -> Option<String> {
        self.lock().unhealthy.clone()
    }

    /// Failed starts in a row that count against the host.
    pub fn failures(&self) -> u32 {
        self.lock().failures
    }

    /// A start failed for a reason that counts against the host; `now` and `interval`
    /// schedule the first health check when this makes the host unhealthy.
    pub fn start_failed(&self, error: &str, now: Duration, interval: Duration) -> Failed {
        let mut inner = self.lock();
        inner.failures = inner.failures.saturating_add(1);
        let was = inner.unhealthy.is_some();
        if was || inner.failures >= self.unhealthy_after {
            inner.unhealthy = Some(error.to_owned());
        }
        let became_unhealthy = !was && inner.unhealthy.is_some();
        if became_unhealthy {
            inner.next_check = Some(now + interval);
        }
        Failed {
            in_a_row: inner.failures,
            became_unhealthy,
        }
    }

    /// netlab brought a lab up: the count starts again. Returns whether the host was
    /// unhealthy.
    pub fn start_succeeded(&self) -> bool {
        self.reset()
    }

    /// An admin's reset (or a success): healthy, no failures counted. Returns whether the
    /// host was unhealthy.
    pub fn reset(&self) -> bool {
        let mut inner = self.lock();
        inner.failures = 0;
        inner.next_check = None;
        inner.unhealthy.take().is_some()
    }

    /// Whether a health check is due now (unhealthy, its time has come, none running); if
    /// so, it counts as running until [`Host::check_done`].
    pub fn check_due(&self, now: Duration) -> bool {
        let mut inner = self.lock();
        let due = inner.unhealthy.is_some()
            && !inner.checking
            && inner.next_check.is_some_and(|at| now >= at);
        if due {
            inner.checking = true;
        }
        due
    }

    /// A health check ended (or was skipped); the next one, if still unhealthy, is due at
    /// `next`.
    pub fn check_done(&self, next: Duration) {
        let mut inner = self.lock();
        inner.checking = false;
        if inner.unhealthy.is_some() {
            inner.next_check = Some(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn three_failures_in_a_row_make_the_host_unhealthy_and_a_success_heals_it() {
        let host = Host::new(3);
        assert_eq!(host.condition(), (Condition::Ok, None));
        for n in 1..=2 {
            let failed = host.start_failed("clab down", S, 10 * S);
            assert_eq!((failed.in_a_row, failed.became_unhealthy), (n, false));
        }
        // A success in between starts the count again.
        assert!(!host.start_succeeded());
        assert!(!host.start_failed("e1", S, 10 * S).became_unhealthy);
        assert!(!host.start_failed("e2", S, 10 * S).became_unhealthy);
        assert!(host.start_failed("e3", S, 10 * S).became_unhealthy);
        assert_eq!(
            host.condition(),
            (Condition::Unhealthy, Some("e3".to_owned()))
        );
        // Further failures keep it unhealthy and name the latest error.
        assert!(!host.start_failed("e4", S, 10 * S).became_unhealthy);
        assert_eq!(host.unhealthy().as_deref(), Some("e4"));
        assert_eq!(host.failures(), 4);
        assert!(host.start_succeeded());
        assert_eq!(host.condition(), (Condition::Ok, None));
        assert_eq!(host.failures(), 0);
    }

    #[test]
    fn health_checks_are_due_every_interval_one_at_a_time() {
        let host = Host::new(1);
        assert!(!host.check_due(100 * S), "healthy: no checks");
        host.start_failed("e", S, 10 * S);
        assert!(!host.check_due(10 * S));
        assert!(host.check_due(11 * S));
        assert!(!host.check_due(12 * S), "one at a time");
        host.check_done(21 * S);
        assert!(!host.check_due(20 * S));
        assert!(host.check_due(21 * S));
        host.reset();
        host.check_done(30 * S);
        assert!(!host.check_due(100 * S), "healthy again: no checks");
    }

    #[test]
    fn draining_wins_and_a_failed_write_changes_nothing() {
        let host = Host::new(1);
        host.start_failed("e", S, S);
        let drain = Drain {
            since: 1,
            by: Some("ops".into()),
        };
        assert_eq!(
            host.set_drain(Some(drain.clone()), |_| Err("disk full")),
            Err("disk full")
        );
        assert_eq!(host.condition().0, Condition::Unhealthy);
        assert_eq!(
            host.set_drain(Some(drain.clone()), |_| Ok::<(), ()>(())),
            Ok(true)
        );
        assert_eq!(
            host.set_drain(Some(drain), |_| -> Result<(), ()> {
                panic!("not written twice")
            }),
            Ok(false)
        );
        assert_eq!(
            host.condition(),
            (Condition::Draining, Some("drained by ops".to_owned()))
        );
        assert_eq!(
            host.set_drain(None, |d| {
                assert!(d.is_none());
                Ok::<_, ()>(())
            }),
            Ok(true)
        );
        assert_eq!(host.condition().0, Condition::Unhealthy);
    }
}
