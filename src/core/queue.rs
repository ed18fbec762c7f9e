//! Sessions and the queue. Pure data: no I/O, no clock of its own (callers pass `now`).
//!
//! Only the head is ACTIVE; positions are dense. The order is the order of arrival except
//! where the scheduler promoted a session ahead (see [`crate::core::schedule`] and
//! [`Queue::promote_ahead`]): that moves one session to the front, so that a position is
//! always the number of sessions the scheduler will serve first as things stand. Each
//! session has a sequence number; the queue keeps `(seq, id)` pairs sorted by `seq`, so a
//! session's position is a binary search and removing the head is O(1).

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
}

impl Queue {
    pub fn new(max_sessions: usize) -> Self {
        Queue {
            sessions: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            max_sessions,
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

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
        let active_since = self.order.is_empty().then_some(info.created_ms);
        self.push(id, now, info, active_since);
        Ok(self.order.len() - 1)
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
            },
        );
        self.order.push_back((seq, id));
    }

    /// Appends a session restored from the state file, with what the file kept of its
    /// client (the limit does not apply: nobody who was queued before a restart is turned
    /// away after it).
    pub fn restore_with(
        &mut self,
        id: SessionId,
        now: Duration,
        info: Arc<ClientInfo>,
        active_since_ms: Option<u64>,
    ) {
        if !self.sessions.contains_key(&id) {
            self.push(id, now, info, active_since_ms);
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
        self.order
            .iter()
            .take(limit)
            .map(|(_, id)| {
                let s = &self.sessions[id];
                Row {
                    id: *id,
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
        self.order.len().saturating_sub(1)
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
        }
    }

    /// Status and position of a session, if it is tracked.
    pub fn lookup(&self, id: &SessionId) -> Option<(Status, usize)> {
        let session = self.sessions.get(id)?;
        let position = self.position_of(session.seq);
        let status = if position == 0 {
            Status::Active
        } else {
            Status::Waiting
        };
        Some((status, position))
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

    /// The ACTIVE session (the head), if any.
    pub fn active(&self) -> Option<SessionId> {
        self.order.front().map(|&(_, id)| id)
    }

    /// Marks a session as having a `POST /lab` in progress (never reaped) or not.
    pub fn set_busy(&mut self, id: &SessionId, busy: bool) {
        if let Some(session) = self.sessions.get_mut(id) {
            session.busy = busy;
        }
    }

    /// Removes a session wherever it stands; the next one is promoted at once when the
    /// removed one was the head.
    #[cfg(test)]
    pub fn remove(&mut self, id: &SessionId) -> Option<Removed> {
        self.remove_full(id).map(|(removed, _)| removed)
    }

    /// [`Queue::remove`], with what the queue knew of the removed session.
    pub fn remove_full(&mut self, id: &SessionId) -> Option<(Removed, Gone)> {
        let session = self.sessions.remove(id)?;
        let position = self.position_of(session.seq);
        self.order.remove(position);
        let was_active = position == 0;
        Some((
            Removed {
                id: *id,
                was_active,
                promoted: if was_active { self.active() } else { None },
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
            .enumerate()
            .filter_map(|(position, (_, id))| {
                let session = &self.sessions[id];
                let timeout = if position == 0 {
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
        // When several sessions at the head are reaped in one sweep, only the last promotion
        // stands: report the session that is ACTIVE now, not the ones reaped right after.
        let head = self.active();
        for (r, _) in removed.iter_mut() {
            if r.promoted.is_some() {
                r.promoted = head;
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
            }
        })
    }

    /// What the waiting sessions declared, in queue order (the ACTIVE head left out).
    pub fn waiting_declared(&self) -> impl Iterator<Item = Option<&Hash>> + '_ {
        self.order
            .iter()
            .skip(1)
            .map(|(_, id)| self.sessions[id].info.declared.as_ref())
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

    /// Lets the scheduler choose who stands at position `first` (0 for the one ACTIVE
    /// session, right after the head was removed): among the sessions from `first` on, the
    /// one [`schedule::pick_next`] picks for the `idle` labs is moved to `first`, and each
    /// session it passes counts a skip. `None` when the one at `first` stays there.
    pub fn promote_ahead(
        &mut self,
        first: usize,
        idle: &[Hash],
        policy: Policy,
    ) -> Option<Promotion> {
        let candidates = self.order.iter().skip(first).map(|(_, id)| {
            let s = &self.sessions[id];
            Candidate {
                declared: s.info.declared.as_ref(),
                skips: s.skips,
            }
        });
        let pick = schedule::pick_next(candidates, idle, policy)?;
        let hash = pick.ahead_for?;
        let end = first + pick.index;
        // The sequence numbers of first..=end, ascending: handed out again in the new order.
        let seqs: Vec<u64> = self.order.range(first..=end).map(|&(seq, _)| seq).collect();
        let moved = self.order.remove(end)?;
        self.order.insert(first, moved);
        let mut passed = Vec::with_capacity(pick.index);
        for (entry, seq) in self.order.range_mut(first..=end).zip(seqs) {
            entry.0 = seq;
            if let Some(s) = self.sessions.get_mut(&entry.1) {
                s.seq = seq;
                if entry.1 != moved.1 {
                    s.skips += 1;
                    passed.push(entry.1);
                }
            }
        }
        if let Some(s) = self.sessions.get_mut(&moved.1) {
            s.ahead = true;
        }
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
        q.remove(&id(1));
        assert_eq!(q.promote_ahead(0, &[A], POLICY), None);
        assert_eq!(q.lookup(&id(3)), Some((Status::Waiting, 1)));
        q.remove(&id(2));
        assert_eq!(
            q.promote_ahead(0, &[A], POLICY),
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
        assert_eq!(q.promote_ahead(0, &[A], POLICY), None);
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
            q.remove(&head);
            if q.promote_ahead(0, &[A], POLICY).is_some() {
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
        q.remove(&id(1));
        let fifo = Policy {
            max_skips: 0,
            ..POLICY
        };
        assert_eq!(q.promote_ahead(0, &[A], fifo), None);
        assert_eq!(q.ids().collect::<Vec<_>>(), [id(2), id(3)]);
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
