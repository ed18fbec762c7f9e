//! Sessions and the queue. Pure data: no I/O, no clock of its own (callers pass `now`).
//!
//! Up to `slots` sessions are ACTIVE at once (one, the head, unless `--slots` says more): a
//! session becomes ACTIVE at its creation when a slot is free, else when an ACTIVE one ends
//! and [`Queue::next_to_promote`] picks it. ACTIVE sessions are at position 0; the WAITING
//! ones have dense positions from 1 (1 is next). The order is the order of arrival except
//! where the scheduler promoted a session ahead (see [`crate::core::schedule`] and
//! [`Queue::promote_ahead`]): that moves one session before the other waiting ones, so that
//! a position is always the number of sessions the scheduler will serve first as things
//! stand. Each session has a sequence number; the queue keeps `(seq, id)` pairs sorted by
//! `seq`, so a session's position is a binary search (less the few ACTIVE sessions ahead of
//! it).
//!
//! Why one file of this size: a third of it is unit tests of the queue's order.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::core::schedule::{self, Candidate, Policy};
use crate::lab::record::Hash;
pub use crate::store::session::{ClientInfo, SessionId, SessionRecord, parse_session_id};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Waiting,
    Active,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Active => "active",
        }
    }
}

/// What the queue knew of a session it removed.
#[derive(Clone, Debug)]
pub struct Gone {
    pub info: Arc<ClientInfo>,
    /// Unix time (ms) it became ACTIVE, if it did.
    pub active_since_ms: Option<u64>,
}

/// One row of the queue view.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: SessionId,
    pub status: Status,
    /// 0 for an ACTIVE session, 1… for the WAITING ones.
    pub position: usize,
    pub info: Arc<ClientInfo>,
    pub active_since_ms: Option<u64>,
    pub silent: Duration,
    pub busy: bool,
    /// How often it was passed over; whether it was promoted ahead.
    pub skips: u32,
    pub ahead: bool,
}

#[derive(Debug)]
struct Session {
    seq: u64,
    last_seen: Duration,
    /// A `POST /lab` of this session is in progress: it is never reaped meanwhile.
    busy: bool,
    /// The token name that created it (with `--token-file`); only that name may use it.
    owner: Option<Arc<str>>,
    info: Arc<ClientInfo>,
    active_since_ms: Option<u64>,
    /// How often a promotion ahead passed it over.
    skips: u32,
    /// It was promoted ahead of others.
    ahead: bool,
    /// It has attached to a lab since (the `up` its promotion saved is counted).
    ahead_used: bool,
    /// ACTIVE: it may use a lab slot.
    active: bool,
}

/// A promotion ahead: who went first, for which idle lab, and whom it passed (in queue
/// order).
#[derive(Debug, PartialEq, Eq)]
pub struct Promotion {
    pub id: SessionId,
    pub hash: Hash,
    pub passed: Vec<SessionId>,
}

/// `POST /session` when `--max-sessions` sessions already exist.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Session queue is full")
    }
}

/// What removing a session did to the queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed {
    pub id: SessionId,
    pub was_active: bool,
    /// The session that became ACTIVE because of the removal.
    pub promoted: Option<SessionId>,
}

#[derive(Debug)]
pub struct Queue {
    sessions: HashMap<SessionId, Session>,
    order: VecDeque<(u64, SessionId)>,
    next_seq: u64,
    max_sessions: usize,
    /// How many sessions may be ACTIVE at once (`--slots`).
    slots: usize,
    /// The sequence numbers of the ACTIVE sessions (at most `slots`).
    active: Vec<u64>,
}

impl Queue {
    #[cfg(test)]
    pub fn new(max_sessions: usize) -> Self {
        Self::with_slots(max_sessions, 1)
    }

    /// A queue of which up to `slots` sessions are ACTIVE at once.
    pub fn with_slots(max_sessions: usize, slots: usize) -> Self {
        Queue {
            sessions: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            max_sessions,
            slots: slots.max(1),
            active: Vec::new(),
        }
    }

    /// How many sessions may be ACTIVE at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Appends a new session; returns its position (0 = it is ACTIVE already).
    #[cfg(test)]
    pub fn create(&mut self, id: SessionId, now: Duration) -> Result<usize, QueueFull> {
        self.create_with(id, now, Arc::default())
    }

    /// [`Queue::create`] with what is known of the client. A session that is ACTIVE at once
    /// is active since its creation.
    pub fn create_with(
        &mut self,
        id: SessionId,
        now: Duration,
        info: Arc<ClientInfo>,
    ) -> Result<usize, QueueFull> {
        if self.sessions.len() >= self.max_sessions {
            return Err(QueueFull);
        }
        let active = self.active.len() < self.slots;
        let active_since = active.then_some(info.created_ms);
        self.push(id, now, info, active_since);
        if active {
            self.activate(&id);
        }
        Ok(self.lookup(&id).map_or(0, |(_, position)| position))
    }

    /// Makes a WAITING session ACTIVE.
    fn activate(&mut self, id: &SessionId) {
        if let Some(session) = self.sessions.get_mut(id)
            && !session.active
        {
            session.active = true;
            self.active.push(session.seq);
        }
    }

    /// Which WAITING session becomes ACTIVE next when a slot frees: the decision of the
    /// queue's order, in one place. First come, first served: the WAITING session created
    /// first.
    pub fn next_to_promote(&self) -> Option<SessionId> {
        self.order
            .iter()
            .map(|(_, id)| id)
            .find(|id| self.sessions.get(*id).is_some_and(|s| !s.active))
            .copied()
    }

    /// Promotes WAITING sessions while fewer than `slots` are ACTIVE (after a restore or a
    /// roll-back); returns them.
    pub fn fill(&mut self) -> Vec<SessionId> {
        let mut promoted = Vec::new();
        while self.active.len() < self.slots
            && let Some(next) = self.next_to_promote()
        {
            self.activate(&next);
            promoted.push(next);
        }
        promoted
    }

    fn push(
        &mut self,
        id: SessionId,
        now: Duration,
        info: Arc<ClientInfo>,
        active_since_ms: Option<u64>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sessions.insert(
            id,
            Session {
                seq,
                last_seen: now,
                busy: false,
                owner: None,
                info,
                active_since_ms,
                skips: 0,
                ahead: false,
                ahead_used: false,
                active: false,
            },
        );
        self.order.push_back((seq, id));
    }

    /// Appends a session restored from the state file, with what the file kept of its
    /// client (the limit does not apply: nobody who was queued before a restart is turned
    /// away after it). One that was ACTIVE is ACTIVE again while a slot is free; call
    /// [`Queue::fill`] once all are back.
    pub fn restore_with(
        &mut self,
        id: SessionId,
        now: Duration,
        info: Arc<ClientInfo>,
        active_since_ms: Option<u64>,
        active: bool,
    ) {
        if !self.sessions.contains_key(&id) {
            self.push(id, now, info, active_since_ms);
            if active && self.active.len() < self.slots {
                self.activate(&id);
            }
        }
    }

    /// What is known of a session's client, and since when it is ACTIVE.
    pub fn info(&self, id: &SessionId) -> Option<(Arc<ClientInfo>, Option<u64>)> {
        self.sessions
            .get(id)
            .map(|s| (Arc::clone(&s.info), s.active_since_ms))
    }

    /// Records when a session became ACTIVE (unless it is known already).
    pub fn set_active_since(&mut self, id: &SessionId, unix_ms: u64) {
        if let Some(session) = self.sessions.get_mut(id) {
            session.active_since_ms.get_or_insert(unix_ms);
        }
    }

    /// The first `limit` sessions in queue order, for the queue view.
    pub fn rows(&self, now: Duration, limit: usize) -> Vec<Row> {
        let mut waiting = 0;
        self.order
            .iter()
            .take(limit)
            .map(|(_, id)| {
                let s = &self.sessions[id];
                let (status, position) = if s.active {
                    (Status::Active, 0)
                } else {
                    waiting += 1;
                    (Status::Waiting, waiting)
                };
                Row {
                    id: *id,
                    status,
                    position,
                    info: Arc::clone(&s.info),
                    active_since_ms: s.active_since_ms,
                    silent: now.saturating_sub(s.last_seen),
                    busy: s.busy,
                    skips: s.skips,
                    ahead: s.ahead,
                }
            })
            .collect()
    }

    /// How many sessions are WAITING.
    pub fn waiting(&self) -> usize {
        self.order.len() - self.active.len()
    }

    /// How many sessions are ACTIVE.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    fn position_of(&self, seq: u64) -> usize {
        // Present by construction: every tracked session is in `order`.
        self.order
            .binary_search_by_key(&seq, |&(s, _)| s)
            .unwrap_or_else(|insert_at| insert_at)
    }

    /// Makes the queue exactly `records`, in that order (a roll-back to the last state written):
    /// sessions still tracked keep their activity; the others come back as the records say,
    /// seen `now`.
    pub fn reset_to(&mut self, records: &[SessionRecord], now: Duration) {
        let mut old = std::mem::take(&mut self.sessions);
        self.order.clear();
        self.active.clear();
        for record in records {
            let id = &record.id;
            if self.sessions.contains_key(id) {
                continue;
            }
            let before = old.remove(id);
            let (info, active_since) = before.as_ref().map_or_else(
                || (Arc::clone(&record.info), record.active_since_ms),
                |s| (Arc::clone(&s.info), s.active_since_ms),
            );
            self.push(*id, now, info, active_since);
            if let Some(s) = self.sessions.get_mut(id) {
                if let Some(before) = before {
                    s.last_seen = before.last_seen;
                    s.busy = before.busy;
                }
                s.owner.clone_from(&record.owner);
                s.skips = record.skips;
                s.ahead = record.ahead;
            }
            if record.active && self.active.len() < self.slots {
                self.activate(id);
            }
        }
        self.fill();
    }

    /// Status and position of a session, if it is tracked.
    pub fn lookup(&self, id: &SessionId) -> Option<(Status, usize)> {
        let session = self.sessions.get(id)?;
        if session.active {
            return Some((Status::Active, 0));
        }
        let index = self.position_of(session.seq);
        let active_ahead = self.active.iter().filter(|&&a| a < session.seq).count();
        Some((Status::Waiting, index - active_ahead + 1))
    }

    /// Refreshes `last_seen`; false when the session is not tracked.
    pub fn touch(&mut self, id: &SessionId, now: Duration) -> bool {
        match self.sessions.get_mut(id) {
            Some(session) => {
                session.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// The first ACTIVE session in queue order (the head, with one slot), if any.
    pub fn active(&self) -> Option<SessionId> {
        self.actives().next()
    }

    /// The ACTIVE sessions, in queue order.
    pub fn actives(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.order
            .iter()
            .map(|&(_, id)| id)
            .filter(|id| self.sessions.get(id).is_some_and(|s| s.active))
    }

    /// Whether a session is ACTIVE.
    pub fn is_active(&self, id: &SessionId) -> bool {
        self.sessions.get(id).is_some_and(|s| s.active)
    }

    /// Marks a session as having a `POST /lab` in progress (never reaped) or not.
    pub fn set_busy(&mut self, id: &SessionId, busy: bool) {
        if let Some(session) = self.sessions.get_mut(id) {
            session.busy = busy;
        }
    }

    /// Removes a session wherever it stands; the next one is promoted at once when the
    /// removed one was ACTIVE.
    #[cfg(test)]
    pub fn remove(&mut self, id: &SessionId) -> Option<Removed> {
        self.remove_full(id).map(|(removed, _)| removed)
    }

    /// [`Queue::remove`], with what the queue knew of the removed session.
    pub fn remove_full(&mut self, id: &SessionId) -> Option<(Removed, Gone)> {
        let session = self.sessions.remove(id)?;
        let index = self.position_of(session.seq);
        self.order.remove(index);
        let was_active = session.active;
        let mut promoted = None;
        if was_active {
            self.active.retain(|&seq| seq != session.seq);
            promoted = self.next_to_promote();
            if let Some(next) = &promoted {
                self.activate(next);
            }
        }
        Some((
            Removed {
                id: *id,
                was_active,
                promoted,
            },
            Gone {
                info: session.info,
                active_since_ms: session.active_since_ms,
            },
        ))
    }

    /// Removes every session not seen for longer than its timeout (WAITING and ACTIVE have
    /// their own), except those with a `POST /lab` in progress. Returns the removals in queue
    /// order; a removal of the head names the session it promoted.
    #[cfg(test)]
    pub fn sweep(
        &mut self,
        now: Duration,
        waiting_timeout: Duration,
        active_timeout: Duration,
    ) -> Vec<Removed> {
        self.sweep_full(now, waiting_timeout, active_timeout)
            .into_iter()
            .map(|(removed, _)| removed)
            .collect()
    }

    /// [`Queue::sweep`], with what the queue knew of each removed session.
    pub fn sweep_full(
        &mut self,
        now: Duration,
        waiting_timeout: Duration,
        active_timeout: Duration,
    ) -> Vec<(Removed, Gone)> {
        let stale: Vec<SessionId> = self
            .order
            .iter()
            .filter_map(|(_, id)| {
                let session = &self.sessions[id];
                let timeout = if session.active {
                    active_timeout
                } else {
                    waiting_timeout
                };
                let silent = now.saturating_sub(session.last_seen);
                (!session.busy && silent > timeout).then_some(*id)
            })
            .collect();
        let mut removed: Vec<(Removed, Gone)> =
            stale.iter().filter_map(|id| self.remove_full(id)).collect();
        // A session promoted by one removal and reaped by a later one of the same sweep was
        // never really ACTIVE: report, for each promotion, the session that stands now (the
        // one the later removal promoted, and so on).
        let promoted_by: HashMap<SessionId, Option<SessionId>> =
            removed.iter().map(|(r, _)| (r.id, r.promoted)).collect();
        for (r, _) in removed.iter_mut() {
            let mut seen = 0;
            while let Some(p) = r.promoted
                && let Some(next) = promoted_by.get(&p)
                && seen < promoted_by.len()
            {
                r.promoted = *next;
                seen += 1;
            }
        }
        removed
    }

    /// Records the token name a session belongs to.
    pub fn set_owner(&mut self, id: &SessionId, owner: Option<Arc<str>>) {
        if let Some(session) = self.sessions.get_mut(id) {
            session.owner = owner;
        }
    }

    /// The token name a tracked session belongs to (`Some(None)`: nobody in particular).
    pub fn owner(&self, id: &SessionId) -> Option<Option<&Arc<str>>> {
        self.sessions.get(id).map(|s| s.owner.as_ref())
    }

    /// Sessions in queue order (the head first), as the state file keeps them.
    pub fn records(&self) -> impl Iterator<Item = SessionRecord> + '_ {
        self.order.iter().map(|(_, id)| {
            let s = &self.sessions[id];
            SessionRecord {
                id: *id,
                owner: s.owner.clone(),
                info: Arc::clone(&s.info),
                active_since_ms: s.active_since_ms,
                skips: s.skips,
                ahead: s.ahead,
                active: s.active,
            }
        })
    }

    /// What the WAITING sessions declared, in queue order.
    pub fn waiting_declared(&self) -> impl Iterator<Item = Option<&Hash>> + '_ {
        self.order
            .iter()
            .map(|(_, id)| &self.sessions[id])
            .filter(|s| !s.active)
            .map(|s| s.info.declared.as_ref())
    }

    /// How often a session was passed over.
    pub fn skips(&self, id: &SessionId) -> Option<u32> {
        self.sessions.get(id).map(|s| s.skips)
    }

    /// Restores what the state file kept of a session's scheduling: its skips, and whether
    /// it was promoted ahead.
    pub fn set_schedule(&mut self, id: &SessionId, skips: u32, ahead: bool) {
        if let Some(session) = self.sessions.get_mut(id) {
            session.skips = skips;
            session.ahead = ahead;
        }
    }

    /// Whether the session was promoted ahead and this is the first time it says so (so
    /// that the `up` a promotion saved is counted once).
    pub fn first_use_of_ahead(&mut self, id: &SessionId) -> bool {
        self.sessions
            .get_mut(id)
            .is_some_and(|s| s.ahead && !std::mem::replace(&mut s.ahead_used, true))
    }

    /// Lets the scheduler choose who takes the slot that `promoted` was just given (first
    /// come, first served, by the queue): among `promoted` and the WAITING sessions behind
    /// it, the one [`schedule::pick_next`] picks for the `idle` labs becomes ACTIVE in its
    /// place, moved before the others, and each session it passes (`promoted` among them)
    /// counts a skip. `None` when `promoted` keeps the slot (or is no longer ACTIVE).
    pub fn promote_ahead(
        &mut self,
        promoted: SessionId,
        idle: &[Hash],
        policy: Policy,
    ) -> Option<Promotion> {
        let session = self.sessions.get(&promoted).filter(|s| s.active)?;
        let first = self.position_of(session.seq);
        // `promoted`, then the WAITING sessions after it, as indices into `order`.
        let at: Vec<usize> = (first..self.order.len())
            .filter(|&i| {
                let id = &self.order[i].1;
                *id == promoted || self.sessions.get(id).is_some_and(|s| !s.active)
            })
            .collect();
        let candidates = at.iter().map(|&i| {
            let s = &self.sessions[&self.order[i].1];
            Candidate {
                declared: s.info.declared.as_ref(),
                skips: s.skips,
            }
        });
        let pick = schedule::pick_next(candidates, idle, policy)?;
        let hash = pick.ahead_for?;
        if pick.index == 0 {
            return None;
        }
        let end = at[pick.index];
        // The sequence numbers of first..=end, ascending: handed out again in the new order.
        let seqs: Vec<u64> = self.order.range(first..=end).map(|&(seq, _)| seq).collect();
        let moved = self.order.remove(end)?;
        self.order.insert(first, moved);
        let mut passed = Vec::with_capacity(pick.index);
        for (entry, seq) in self.order.range_mut(first..=end).zip(seqs) {
            entry.0 = seq;
            if let Some(s) = self.sessions.get_mut(&entry.1) {
                s.seq = seq;
                if entry.1 != moved.1 && !(s.active && entry.1 != promoted) {
                    s.skips += 1;
                    passed.push(entry.1);
                }
            }
        }
        if let Some(s) = self.sessions.get_mut(&promoted) {
            s.active = false;
        }
        if let Some(s) = self.sessions.get_mut(&moved.1) {
            s.ahead = true;
            s.active = true;
        }
        // Sequence numbers moved: the ACTIVE list follows them.
        self.active = self
            .order
            .iter()
            .filter(|(_, id)| self.sessions.get(id).is_some_and(|s| s.active))
            .map(|&(seq, _)| seq)
            .collect();
        Some(Promotion {
            id: moved.1,
            hash,
            passed,
        })
    }

    /// Ids in queue order (the head first).
    #[cfg(test)]
    pub fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.order.iter().map(|&(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::{Clock, FakeClock};
    use uuid::Uuid;

    fn id(n: u128) -> SessionId {
        Uuid::from_u128(n)
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_session_is_active_and_later_ones_wait_in_order() {
        let mut q = Queue::new(10);
        assert_eq!(q.create(id(1), S), Ok(0));
        assert_eq!(q.create(id(2), S), Ok(1));
        assert_eq!(q.create(id(3), S), Ok(2));
        assert_eq!(q.lookup(&id(1)), Some((Status::Active, 0)));
        assert_eq!(q.lookup(&id(2)), Some((Status::Waiting, 1)));
        assert_eq!(q.lookup(&id(3)), Some((Status::Waiting, 2)));
        assert_eq!(q.active(), Some(id(1)));
    }

    #[test]
    fn removing_the_head_promotes_the_next_at_once() {
        let mut q = Queue::new(10);
        for n in 1..=3 {
            q.create(id(n), S).unwrap();
        }
        let r = q.remove(&id(1)).unwrap();
        assert_eq!(
            r,
            Removed {
                id: id(1),
                was_active: true,
                promoted: Some(id(2))
            }
        );
        assert_eq!(q.lookup(&id(2)), Some((Status::Active, 0)));
        assert_eq!(q.lookup(&id(3)), Some((Status::Waiting, 1)));
    }

    #[test]
    fn removing_from_the_middle_shifts_the_positions_behind_it() {
        let mut q = Queue::new(10);
        for n in 1..=4 {
            q.create(id(n), S).unwrap();
        }
        let r = q.remove(&id(2)).unwrap();
        assert!(!r.was_active);
        assert_eq!(r.promoted, None);
        assert_eq!(q.lookup(&id(1)), Some((Status::Active, 0)));
        assert_eq!(q.lookup(&id(3)), Some((Status::Waiting, 1)));
        assert_eq!(q.lookup(&id(4)), Some((Status::Waiting, 2)));
        assert_eq!(q.lookup(&id(2)), None);
        assert_eq!(q.remove(&id(2)), None);
    }

    #[test]
    fn queue_full_is_refused_and_frees_up_after_a_removal() {
        let mut q = Queue::new(2);
        q.create(id(1), S).unwrap();
        q.create(id(2), S).unwrap();
        assert_eq!(q.create(id(3), S), Err(QueueFull));
        q.remove(&id(1));
        assert_eq!(q.create(id(3), S), Ok(1));
    }

    #[test]
    fn sweep_reaps_waiting_and_active_sessions_by_their_own_timeouts() {
        let clock = FakeClock::new();
        let mut q = Queue::new(10);
        for n in 1..=3 {
            q.create(id(n), clock.now()).unwrap();
        }
        let active_timeout = Duration::from_secs(300);
        let waiting_timeout = Duration::from_secs(600);
        clock.advance(Duration::from_secs(300));
        assert!(
            q.sweep(clock.now(), waiting_timeout, active_timeout)
                .is_empty()
        );
        // Session 3 keeps polling; 1 (active) goes silent past 300 s, 2 (waiting) too.
        q.touch(&id(3), clock.now());
        clock.advance(Duration::from_millis(1));
        let reaped = q.sweep(clock.now(), waiting_timeout, active_timeout);
        assert_eq!(
            reaped,
            vec![Removed {
                id: id(1),
                was_active: true,
                promoted: Some(id(2))
            }]
        );
        // Session 2 was waiting for 300 s and is now active: it gets the active timeout,
        // counted from its last contact.
        assert_eq!(q.lookup(&id(2)), Some((Status::Active, 0)));
        let reaped = q.sweep(clock.now(), waiting_timeout, active_timeout);
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].id, id(2));
        assert_eq!(reaped[0].promoted, Some(id(3)));
        assert_eq!(q.lookup(&id(3)), Some((Status::Active, 0)));
    }

    #[test]
    fn a_waiting_session_lives_until_the_waiting_timeout() {
        let clock = FakeClock::new();
        let mut q = Queue::new(10);
        q.create(id(1), clock.now()).unwrap();
        q.create(id(2), clock.now()).unwrap();
        let (w, a) = (Duration::from_secs(600), Duration::from_secs(300));
        clock.advance(Duration::from_secs(400));
        q.touch(&id(1), clock.now());
        assert!(q.sweep(clock.now(), w, a).is_empty());
        clock.advance(Duration::from_secs(201));
        q.touch(&id(1), clock.now());
        let reaped = q.sweep(clock.now(), w, a);
        assert_eq!(
            reaped,
            vec![Removed {
                id: id(2),
                was_active: false,
                promoted: None
            }]
        );
    }

    #[test]
    fn a_busy_session_is_never_reaped() {
        let clock = FakeClock::new();
        let mut q = Queue::new(10);
        q.create(id(1), clock.now()).unwrap();
        q.set_busy(&id(1), true);
        clock.advance(Duration::from_secs(10_000));
        let (w, a) = (Duration::from_secs(600), Duration::from_secs(300));
        assert!(q.sweep(clock.now(), w, a).is_empty());
        q.set_busy(&id(1), false);
        assert_eq!(q.sweep(clock.now(), w, a).len(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn reaping_several_heads_in_one_sweep_reports_the_final_head() {
        let clock = FakeClock::new();
        let mut q = Queue::new(10);
        for n in 1..=3 {
            q.create(id(n), clock.now()).unwrap();
        }
        clock.advance(Duration::from_secs(700));
        q.touch(&id(3), clock.now());
        let reaped = q.sweep(
            clock.now(),
            Duration::from_secs(600),
            Duration::from_secs(300),
        );
        let ids: Vec<_> = reaped.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![id(1), id(2)]);
        assert_eq!(reaped[0].promoted, Some(id(3)));
        assert_eq!(reaped[1].promoted, Some(id(3)));
        assert!(reaped[1].was_active);
    }

    #[test]
    fn positions_stay_dense_through_many_creates_and_removes() {
        let mut q = Queue::new(100_000);
        for n in 0..1000 {
            q.create(id(n), S).unwrap();
        }
        for n in (0..1000).step_by(3) {
            q.remove(&id(n));
        }
        let ids: Vec<_> = q.ids().collect();
        for (position, sid) in ids.iter().enumerate() {
            let (status, p) = q.lookup(sid).unwrap();
            assert_eq!(p, position);
            assert_eq!(status == Status::Active, position == 0);
        }
    }

    const A: Hash = [0xa; 32];
    const B: Hash = [0xb; 32];
    const POLICY: Policy = Policy {
        affinity_window: 8,
        max_skips: 2,
    };

    fn create_declaring(q: &mut Queue, n: u128, declared: Option<Hash>) {
        let info = Arc::new(ClientInfo {
            declared,
            ..ClientInfo::default()
        });
        q.create_with(id(n), S, info).unwrap();
    }

    /// A holder of A, then A, B, A waiting. The holder ends: the first A is next anyway;
    /// it ends: the second A goes ahead of B, and B's position stays where it was (it
    /// never grows).
    #[test]
    fn a_promotion_ahead_moves_one_session_to_the_front_and_counts_the_skips() {
        let mut q = Queue::new(10);
        create_declaring(&mut q, 1, Some(A));
        create_declaring(&mut q, 2, Some(A));
        create_declaring(&mut q, 3, Some(B));
        create_declaring(&mut q, 4, Some(A));
        let next = q.remove(&id(1)).unwrap().promoted.unwrap();
        assert_eq!(q.promote_ahead(next, &[A], POLICY), None);
        assert_eq!(q.lookup(&id(3)), Some((Status::Waiting, 1)));
        let next = q.remove(&id(2)).unwrap().promoted.unwrap();
        assert_eq!(next, id(3), "first come, first served by the queue");
        assert_eq!(
            q.promote_ahead(next, &[A], POLICY),
            Some(Promotion {
                id: id(4),
                hash: A,
                passed: vec![id(3)]
            })
        );
        assert_eq!(q.ids().collect::<Vec<_>>(), [id(4), id(3)]);
        assert_eq!(q.lookup(&id(4)), Some((Status::Active, 0)));
        assert_eq!(q.lookup(&id(3)), Some((Status::Waiting, 1)));
        assert_eq!(q.skips(&id(3)), Some(1));
        assert!(q.first_use_of_ahead(&id(4)));
        assert!(!q.first_use_of_ahead(&id(4)));
        assert!(!q.first_use_of_ahead(&id(3)));
        // Asked again, nothing changes.
        assert_eq!(q.promote_ahead(id(4), &[A], POLICY), None);
        assert_eq!(q.promote_ahead(id(3), &[A], POLICY), None, "not ACTIVE");
        // The records keep what the scheduler did, in the new order.
        let records: Vec<_> = q.records().map(|r| (r.id, r.skips, r.ahead)).collect();
        assert_eq!(records, [(id(4), 0, true), (id(3), 1, false)]);
    }

    /// Positions stay dense and binary-searchable after moves in the middle of a long queue.
    #[test]
    fn positions_stay_consistent_after_promotions_ahead() {
        let mut q = Queue::new(1000);
        for n in 0..100 {
            create_declaring(&mut q, n, Some(if n % 5 == 4 { A } else { B }));
        }
        let mut promoted = 0;
        for round in 0..50 {
            let head = q.active().unwrap();
            let next = q.remove(&head).unwrap().promoted.unwrap();
            if q.promote_ahead(next, &[A], POLICY).is_some() {
                promoted += 1;
            }
            let ids: Vec<_> = q.ids().collect();
            for (position, sid) in ids.iter().enumerate() {
                assert_eq!(q.lookup(sid).unwrap().1, position);
                assert!(q.skips(sid).unwrap() <= POLICY.max_skips);
            }
            create_declaring(&mut q, 1000 + round, Some(A));
        }
        assert!(promoted > 0);
    }

    #[test]
    fn strict_fifo_never_reorders() {
        let mut q = Queue::new(10);
        create_declaring(&mut q, 1, Some(A));
        create_declaring(&mut q, 2, Some(B));
        create_declaring(&mut q, 3, Some(A));
        let next = q.remove(&id(1)).unwrap().promoted.unwrap();
        let fifo = Policy {
            max_skips: 0,
            ..POLICY
        };
        assert_eq!(q.promote_ahead(next, &[A], fifo), None);
        assert_eq!(q.ids().collect::<Vec<_>>(), [id(2), id(3)]);
    }

    #[test]
    fn with_three_slots_three_are_active_and_the_waiting_count_from_1() {
        let mut q = Queue::with_slots(10, 3);
        let positions: Vec<usize> = (1..=5).map(|n| q.create(id(n), S).unwrap()).collect();
        assert_eq!(positions, [0, 0, 0, 1, 2]);
        assert_eq!(q.lookup(&id(4)), Some((Status::Waiting, 1)));
        // Ending the second ACTIVE promotes the first WAITING; the others close up.
        let r = q.remove(&id(2)).unwrap();
        assert_eq!(r.promoted, Some(id(4)));
        assert_eq!(q.lookup(&id(4)), Some((Status::Active, 0)));
        assert_eq!(q.lookup(&id(5)), Some((Status::Waiting, 1)));
        // A WAITING one leaving promotes nobody.
        q.create(id(6), S).unwrap();
        assert_eq!(q.remove(&id(5)).unwrap().promoted, None);
        assert_eq!(q.lookup(&id(6)), Some((Status::Waiting, 1)));
        assert_eq!((q.active_count(), q.waiting()), (3, 1));
        let actives: Vec<_> = q.actives().collect();
        assert_eq!(actives, [id(1), id(3), id(4)]);
        // A roll-back keeps who was ACTIVE, as the records say.
        let records: Vec<SessionRecord> = q.records().collect();
        let mut other = Queue::with_slots(10, 3);
        other.reset_to(&records, S);
        assert_eq!(other.lookup(&id(4)), Some((Status::Active, 0)));
        assert_eq!(other.lookup(&id(6)), Some((Status::Waiting, 1)));
    }

    #[test]
    fn only_the_canonical_spelling_of_an_id_is_accepted() {
        let id = Uuid::new_v4();
        let text = id.to_string();
        assert_eq!(parse_session_id(&text), Some(id));
        assert_eq!(parse_session_id(&text.to_uppercase()), None);
        assert_eq!(parse_session_id(&id.simple().to_string()), None);
        assert_eq!(parse_session_id(""), None);
        assert_eq!(parse_session_id("heartbeat"), None);
    }
}
