//! The shared state (sessions, queue, lab record, the acquire in progress, parked long-polls)
//! behind one mutex, the operations several callers share (ending and reaping sessions,
//! queueing and recording teardowns, parking long-polls), and what the request path needs
//! of it: the `X-Session-ID` gate, the acquire slot, the lab thread's jobs. A handler with a
//! change of its own (`acquire`'s decision, the lab thread's end of a start, the release
//! and destroy of `api`) makes it itself, under the lock, and bumps the version.
//!
//! The mutex guards plain data and is held for microseconds: never across a subprocess, a
//! state-file write or a socket write. (Events are recorded under it: that appends to an
//! in-memory ring and hands the line to the event writer, see `events`; a log line written
//! under it goes to `--log-file` when one is set.)
//!
//! Every change a restart must not lose bumps the state's version; the caller then waits for
//! [`Shared::persist`] of that version (outside the lock) before it answers the client.
//!
//! Why one file of this size: everything that happens under the state lock is here, so that
//! the lock order (state before persister) can be read in one place; a fifth is tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use serde_json::json;

use crate::config::Config;
use crate::core::auth::{Access, Caller};
use crate::core::clock::Clock;
use crate::core::host::Host;
use crate::core::longpoll::{self, Parked};
use crate::core::queue::{
    ClientInfo, Gone, Promotion, Queue, Removed, SessionId, Status, parse_session_id,
};
use crate::core::schedule::Policy;
use crate::http::reply::{Reply, Responder};
use crate::lab::record::{self, Hash, LabRecord, Teardown};
use crate::observe::events::{self, EventLog, now_ms, who};
use crate::observe::lablog::LabLog;
use crate::observe::metrics::{Ended, METRICS};
use crate::store::persist::{NotPersisted, Persister, SlotRecord, Snapshot, Starting};

/// One `POST /lab` in progress: the session it is for and a number of its own, so that a
/// late end of an upload that was given up on cannot free a newer acquire's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub session: SessionId,
    pub id: u64,
}

/// The right to run the one `POST /lab` in progress. Whoever holds it last frees it by
/// dropping it, panic or not: the next `POST /lab` may come, the session's busy flag is
/// cleared (it may be reaped again, its clock restarting now: the end of its lab operation
/// counts as activity), and a start record left by a start that never finished becomes a
/// pending teardown of its work dir.
pub struct AcquireSlot {
    shared: Weak<Shared>,
    ticket: Ticket,
}

impl AcquireSlot {
    pub fn ticket(&self) -> Ticket {
        self.ticket
    }

    /// A handle that frees the slot before its holder is done (the upload watchdog's give-up).
    pub fn early_release(&self) -> EarlyRelease {
        EarlyRelease {
            shared: Weak::clone(&self.shared),
            ticket: self.ticket,
        }
    }
}

impl Drop for AcquireSlot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.free_slot(&self.ticket);
        }
    }
}

/// See [`AcquireSlot::early_release`]. Freeing twice is harmless: a slot is freed only
/// while its ticket is the one in progress.
pub struct EarlyRelease {
    shared: Weak<Shared>,
    ticket: Ticket,
}

impl EarlyRelease {
    pub fn release(self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.free_slot(&self.ticket);
        }
    }
}

/// Why a slot could not be taken.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotBusy;

/// A validated, stored upload waiting for `netlab up`, with the client to answer and the
/// slot to free when it is done.
pub struct StartJob {
    pub slot: AcquireSlot,
    /// The lab slot it starts in (its index in [`State::slots`]).
    pub lab_slot: usize,
    /// That slot's netlab instance.
    pub instance: Option<u16>,
    pub responder: Responder,
    pub hash: Hash,
    pub work_dir: PathBuf,
    /// The topology file inside `work_dir`.
    pub topology: PathBuf,
    /// When the `POST /lab` passed the gate.
    pub began: std::time::Instant,
}

/// The lab thread's work, in order.
pub enum LabJob {
    /// Boxed: the request and its responder travel with it.
    Start(Box<StartJob>),
    Teardown(Teardown),
    /// Start `--health-topology` (no session), and tear it down after a success: does the
    /// unhealthy host start labs again?
    HealthCheck,
    /// Finish the queued jobs, tear the running lab down and stop.
    Shutdown,
}

impl std::fmt::Debug for LabJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabJob::Start(job) => write!(f, "start of {}", job.topology.display()),
            LabJob::Teardown(t) => write!(f, "teardown of {}", t.lab.topology.display()),
            LabJob::HealthCheck => f.write_str("health check"),
            LabJob::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// One lab slot: a netlab instance, the lab running in it and whose it is.
#[derive(Clone, Debug, Default)]
pub struct Slot {
    /// netlab's multilab instance id; `None`: its `default` instance (one slot).
    pub instance: Option<u16>,
    /// The running lab, if any. A lab being torn down is no longer here.
    pub lab: Option<LabRecord>,
    /// The session whose slot this is (it started or attached to the lab, or is starting
    /// one); `None` once that session ended with the lab released.
    pub holder: Option<SessionId>,
    /// The start its lab worker is running, once the upload is stored.
    pub starting: Option<Starting>,
    /// Unix ms the running lab came up (or was re-adopted).
    pub lab_started_ms: Option<u64>,
    /// Unix ms the lab was last acquired or released (the least recently used idle lab is
    /// the one replaced when no slot is empty).
    pub last_used_ms: u64,
    /// Since when the lab has been idle with no session wanting it (`--idle-lab-timeout`).
    pub idle_since: Option<Duration>,
}

impl Slot {
    fn new(instance: Option<u16>) -> Self {
        Slot {
            instance,
            ..Slot::default()
        }
    }

    /// What the slot is doing: `empty`, `starting`, `running` or `tearing_down`.
    pub fn phase(&self, tearing_down: bool) -> &'static str {
        if self.starting.is_some() {
            "starting"
        } else if self.lab.is_some() {
            "running"
        } else if tearing_down {
            "tearing_down"
        } else {
            "empty"
        }
    }
}

pub struct State {
    pub queue: Queue,
    /// The lab slots (`--slots`), in order; one unless configured otherwise.
    pub slots: Vec<Slot>,
    /// The `POST /lab`s in progress (one per session at most); see [`AcquireSlot`].
    acquiring: Vec<Ticket>,
    tickets: u64,
    /// Teardowns queued on the lab thread, or failed and waiting for their next attempt.
    pub teardowns: Vec<Teardown>,
    /// Teardowns decided but not sent to the lab thread yet, with the state version that
    /// decided them: sent once that version is on disk (a roll-back drops them).
    outbox: Vec<(u64, Teardown)>,
    /// Long-polls (`GET /session/{id}?wait=S`) waiting for their session to change.
    pub parked: Parked,
    version: u64,
    /// The newest event id the state file recorded (restored); new ids start above it.
    pub event_id_floor: u64,
}

impl State {
    /// A slot per instance; as many sessions may be ACTIVE at once.
    pub fn with_slots(max_sessions: usize, instances: &[Option<u16>]) -> Self {
        State {
            queue: Queue::with_slots(max_sessions, instances.len()),
            slots: instances.iter().map(|i| Slot::new(*i)).collect(),
            acquiring: Vec::new(),
            tickets: 0,
            outbox: Vec::new(),
            teardowns: Vec::new(),
            parked: Parked::default(),
            version: 0,
            event_id_floor: 0,
        }
    }

    /// A `POST /lab` in progress (the first, when several are).
    pub fn acquiring(&self) -> Option<Ticket> {
        self.acquiring.first().copied()
    }

    /// The slot a session holds (its lab, or its start), if any.
    pub fn slot_held_by(&self, session: &SessionId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.holder == Some(*session) && (s.lab.is_some() || s.starting.is_some()))
    }

    /// The slot the lab routes of a session address: the one it holds; with a single slot,
    /// that slot whoever holds it (as before there were slots).
    pub fn lab_slot(&self, session: &SessionId) -> Option<usize> {
        self.slot_held_by(session)
            .or_else(|| (self.slots.len() == 1).then_some(0))
    }

    /// Whether a teardown of the slot's instance is queued or waiting for a retry.
    pub fn tearing_down(&self, slot: usize) -> bool {
        let instance = self.slots.get(slot).and_then(|s| s.instance);
        self.teardowns.iter().any(|t| t.lab.instance == instance)
    }

    /// How many slots run a lab.
    pub fn labs_running(&self) -> usize {
        self.slots.iter().filter(|s| s.lab.is_some()).count()
    }

    /// Marks a change that must reach the state file; returns the version to persist.
    pub fn changed(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Puts the durable part of the state back as `snap` says (a failed write's roll-back).
    pub fn reset_to(&mut self, snap: &Snapshot, now: Duration) {
        self.queue.reset_to(&snap.sessions, now);
        for slot in &mut self.slots {
            slot.lab = None;
            slot.starting = None;
            slot.holder = None;
        }
        let first = SlotRecord {
            slot: 1,
            lab: snap.lab.clone(),
            lab_started_ms: snap.lab_started_ms,
            holder: snap.holder,
            last_used_ms: snap.last_used_ms,
            starting: snap.starting.clone(),
        };
        for record in std::iter::once(&first).chain(&snap.slots) {
            if let Some(slot) = record
                .slot
                .checked_sub(1)
                .and_then(|i| self.slots.get_mut(i))
            {
                slot.lab.clone_from(&record.lab);
                slot.starting.clone_from(&record.starting);
                slot.holder = record.holder;
                slot.last_used_ms = record.last_used_ms;
                if record.lab_started_ms.is_some() {
                    slot.lab_started_ms = record.lab_started_ms;
                }
            }
        }
        self.teardowns.clone_from(&snap.teardowns);
        self.outbox.clear();
    }

    /// Copies the durable part of the state into `snap`, reusing its buffers.
    pub fn snapshot_into(&self, snap: &mut Snapshot) {
        snap.state_version = self.version;
        snap.sessions.clear();
        snap.sessions.extend(self.queue.records());
        let record = |i: usize, slot: &Slot| SlotRecord {
            slot: i + 1,
            lab: slot.lab.clone(),
            // Only while there is a lab: the field is not cleared when a lab goes away.
            lab_started_ms: slot.lab.as_ref().and(slot.lab_started_ms),
            holder: slot
                .holder
                .filter(|_| slot.lab.is_some() || slot.starting.is_some()),
            last_used_ms: if slot.lab.is_some() {
                slot.last_used_ms
            } else {
                0
            },
            starting: slot.starting.clone(),
        };
        let first = record(0, &self.slots[0]);
        snap.lab = first.lab;
        snap.lab_started_ms = first.lab_started_ms;
        snap.holder = first.holder;
        snap.last_used_ms = first.last_used_ms;
        snap.starting = first.starting;
        snap.slots.clear();
        snap.slots.extend(
            self.slots
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, s)| s.lab.is_some() || s.starting.is_some())
                .map(|(i, s)| record(i, s)),
        );
        snap.teardowns.clone_from(&self.teardowns);
    }
}

/// A change that could not be written to the state file (it was rolled back): 503.
impl From<NotPersisted> for Reply {
    fn from(e: NotPersisted) -> Self {
        Reply::detail(503, e.to_string()).with_header("Retry-After", "5")
    }
}

pub use crate::protocol::SESSION_HEADER;

pub struct Shared {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// One lab worker per slot, in slot order.
    lab_tx: Vec<Sender<LabJob>>,
    /// The slots' netlab instances, in slot order (as [`Config::instances`] gives them).
    pub instances: Vec<Option<u16>>,
    shutting_down: AtomicBool,
    persister: Persister,
    pub started_at: SystemTime,
    /// Where lab work directories are created (`<state dir>/labs`).
    pub labs_dir: PathBuf,
    /// Access tokens (`--token-file`); `None`: the API is open to everyone.
    pub access: Option<Access>,
    /// Wakes the timer when a long-poll is parked (its deadline may be the next one).
    park_wake: (Sender<()>, Receiver<()>),
    /// The event history.
    pub events: EventLog,
    /// netlab's live output, one per slot.
    pub lab_logs: Vec<Arc<LabLog>>,
    /// Draining, and the host's health.
    pub host: Host,
}

impl Shared {
    /// One lab worker takes every slot's jobs (unit tests).
    #[cfg(test)]
    pub fn new(config: Config, clock: Arc<dyn Clock>, lab_tx: Sender<LabJob>) -> Self {
        let workers = vec![lab_tx; config.instances().len()];
        Self::with_state(config, clock, workers, None)
    }

    /// With a state restored from the state file; `lab_tx` has a lab worker per slot.
    pub fn with_state(
        config: Config,
        clock: Arc<dyn Clock>,
        lab_tx: Vec<Sender<LabJob>>,
        state: Option<State>,
    ) -> Self {
        let labs_dir = config.state_dir.join("labs");
        let events = EventLog::open(&config.state_dir);
        if let Some(state) = &state {
            events.start_above(state.event_id_floor);
        }
        let instances = config.instances();
        let config_unhealthy_after = config.unhealthy_after;
        Shared {
            events,
            lab_logs: instances.iter().map(|_| Arc::new(LabLog::new())).collect(),
            state: Mutex::new(
                state.unwrap_or_else(|| State::with_slots(config.max_sessions, &instances)),
            ),
            instances,
            persister: Persister::new(config.state_dir.clone()),
            config,
            clock,
            lab_tx,
            shutting_down: AtomicBool::new(false),
            started_at: SystemTime::now(),
            labs_dir,
            access: None,
            park_wake: crossbeam_channel::bounded(1),
            host: Host::new(config_unhealthy_after),
        }
    }

    /// Locks the state. A panic in another thread while it held the lock leaves the data
    /// consistent enough to go on (every change is a few field writes), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until state `version` is in the state file. When the write fails, every change
    /// since the last write is rolled back and this returns the error: the caller must not
    /// acknowledge its change (503). Teardowns decided by changes now on disk are sent to
    /// the lab thread.
    pub fn persist(&self, version: u64) -> Result<(), NotPersisted> {
        let durable = self.persister.commit(
            version,
            |snap| {
                self.lock().snapshot_into(snap);
                // Read after the state: every event about this state is at or below it.
                snap.event_id = self.events.last_id();
            },
            |baseline| {
                let mut state = self.lock();
                let upto = state.version;
                state.reset_to(baseline, self.clock.now());
                state.changed();
                upto
            },
        )?;
        let ready: Vec<Teardown> = {
            let mut state = self.lock();
            if state.outbox.is_empty() {
                return Ok(());
            }
            let (ready, later) = std::mem::take(&mut state.outbox)
                .into_iter()
                .partition(|(v, _)| *v <= durable);
            state.outbox = later;
            ready.into_iter().map(|(_, t)| t).collect()
        };
        for t in ready {
            self.send_lab_job(LabJob::Teardown(t));
        }
        Ok(())
    }

    /// Like [`Shared::persist`] for changes nobody is told about; a failure is logged by
    /// the writer already (and the change rolled back).
    pub fn persist_quietly(&self, version: u64) {
        let _ = self.persist(version);
    }

    /// The current state is what the state file says (just restored from it).
    pub fn set_durable_baseline(&self) {
        self.persister
            .set_baseline(|snap| self.lock().snapshot_into(snap));
    }

    /// Why the state file cannot be written, while that is so.
    pub fn degraded(&self) -> Option<String> {
        self.persister.degraded()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) -> bool {
        !self.shutting_down.swap(true, Ordering::SeqCst)
    }

    pub fn shutdown_flag(&self) -> &AtomicBool {
        &self.shutting_down
    }

    /// netlab's live output of a slot (the first for a slot that does not exist).
    pub fn lab_log(&self, slot: usize) -> &Arc<LabLog> {
        self.lab_logs.get(slot).unwrap_or(&self.lab_logs[0])
    }

    /// The slot of a netlab instance (the first for one no slot has: a lab of a run with
    /// other slots).
    pub fn slot_of_instance(&self, instance: Option<u16>) -> usize {
        self.instances
            .iter()
            .position(|i| *i == instance)
            .unwrap_or(0)
    }

    /// Takes the acquire slot of `session`, one `POST /lab` at a time per session (and marks
    /// it busy: not reaped meanwhile).
    pub fn take_slot(self: &Arc<Self>, session: SessionId) -> Result<AcquireSlot, SlotBusy> {
        let mut state = self.lock();
        if state.acquiring.iter().any(|t| t.session == session) {
            return Err(SlotBusy);
        }
        state.tickets += 1;
        let ticket = Ticket {
            session,
            id: state.tickets,
        };
        state.acquiring.push(ticket);
        state.queue.set_busy(&session, true);
        Ok(AcquireSlot {
            shared: Arc::downgrade(self),
            ticket,
        })
    }

    /// Frees the slot of `ticket`, if it still is the one in progress; see [`AcquireSlot`].
    fn free_slot(&self, ticket: &Ticket) {
        let now = self.clock.now();
        let version = {
            let mut state = self.lock();
            if !state.acquiring.contains(ticket) {
                return;
            }
            state.acquiring.retain(|t| t != ticket);
            state.queue.set_busy(&ticket.session, false);
            state.queue.touch(&ticket.session, now);
            // A finished start cleared its record before its slot was freed.
            let Some(slot) = state.slots.iter_mut().find(|s| {
                s.starting
                    .as_ref()
                    .is_some_and(|st| st.session == ticket.session)
            }) else {
                return;
            };
            let Some(start) = slot.starting.take() else {
                return;
            };
            if slot.lab.is_none() {
                slot.holder = None;
            }
            log::error!(
                "the start in {} ended without finishing it: tearing down what it left",
                start.work_dir.display()
            );
            let teardown =
                Teardown::of_failed_start(&start.work_dir, None, [0; 32], start.instance);
            state.teardowns.push(teardown.clone());
            let version = state.changed();
            state.outbox.push((version, teardown));
            version
        };
        self.persist_quietly(version);
    }

    /// The `X-Session-ID` gate of every `/lab*` route: 422 missing header, 404 unknown
    /// session (or another name's), 423 not the ACTIVE session. With `touch`, passing it
    /// refreshes the session's `last_seen_at`; the read-only routes pass without, so that
    /// polling them never keeps a silent session alive.
    pub fn gate(
        &self,
        session_header: Option<&str>,
        caller: &Caller,
        touch: bool,
    ) -> Result<SessionId, Reply> {
        let Some(value) = session_header else {
            return Err(Reply::missing(["header", SESSION_HEADER]));
        };
        let id = parse_session_id(value).ok_or_else(Reply::session_not_found)?;
        let now = self.clock.now();
        let mut state = self.lock();
        if !state.queue.owner(&id).is_some_and(|o| caller.may_use(o)) {
            return Err(Reply::session_not_found());
        }
        match state.queue.lookup(&id) {
            None => Err(Reply::session_not_found()),
            Some((Status::Waiting, _)) => Err(Reply::detail(423, "Session is not active")),
            Some((Status::Active, _)) => {
                if touch {
                    state.queue.touch(&id, now);
                }
                Ok(id)
            }
        }
    }

    /// Queues a job for the lab worker of its slot (a shutdown for every worker). Takes no
    /// lock: callers may hold the state lock.
    pub fn send_lab_job(&self, job: LabJob) {
        let worker = match &job {
            LabJob::Start(start) => start.lab_slot,
            LabJob::Teardown(t) => self.slot_of_instance(t.lab.instance),
            // Health checks run in the first slot (put off while any slot is busy).
            LabJob::HealthCheck => 0,
            LabJob::Shutdown => {
                for tx in &self.lab_tx {
                    let _ = tx.send(LabJob::Shutdown);
                }
                return;
            }
        };
        let Some(tx) = self.lab_tx.get(worker).or_else(|| self.lab_tx.first()) else {
            return;
        };
        if let Err(e) = tx.send(job) {
            // Only after the lab worker has exited, i.e. at the very end of a shutdown.
            log::error!("lab worker is gone; dropped a job: {:?}", e.into_inner());
        }
    }

    /// Queues the teardown of a lab that no longer counts as running, and records it as
    /// pending until the lab thread has done it.
    pub fn queue_teardown(&self, state: &mut State, lab: LabRecord) {
        let teardown = Teardown::new(lab, false);
        state.teardowns.push(teardown.clone());
        let version = state.changed();
        // Sent by `persist` once this is on disk: a roll-back keeps the lab instead.
        state.outbox.push((version, teardown));
    }

    /// The lab thread finished a teardown: netlab said it was done.
    pub fn teardown_done(&self, work_dir: &Path) {
        let version = {
            let mut state = self.lock();
            if let Some(t) = state.teardowns.iter().find(|t| t.work_dir() == work_dir)
                && t.attempts > 0
            {
                log::info!(
                    "teardown of {} succeeded after {} failed {}",
                    t.lab.topology.display(),
                    t.attempts,
                    plural(t.attempts as usize, "attempt", "attempts")
                );
            }
            state.teardowns.retain(|t| t.work_dir() != work_dir);
            state.changed()
        };
        self.persist_quietly(version);
    }

    /// netlab failed to tear a lab down: its record and work directory stay, and the timer
    /// queues another attempt after a back-off. The first failure is an ERROR (a human has
    /// to look: the lab is still there); the retries that fail again are warnings.
    pub fn teardown_failed(&self, failed: &Teardown, error: String) {
        let now = self.clock.now();
        let version = {
            let mut state = self.lock();
            let index = match state
                .teardowns
                .iter()
                .position(|t| t.work_dir() == failed.work_dir())
            {
                Some(i) => i,
                None => {
                    state.teardowns.push(failed.clone());
                    state.teardowns.len() - 1
                }
            };
            let t = &mut state.teardowns[index];
            t.attempts = t.attempts.saturating_add(1);
            let delay = record::retry_delay(self.config.sweep_interval, t.attempts);
            t.retry_at = Some(now + delay);
            let what = format!(
                "teardown of {} failed; its work dir {} is kept and the teardown retried in {:.1} s",
                t.lab.topology.display(),
                t.work_dir().display(),
                delay.as_secs_f64()
            );
            if t.attempts == 1 {
                log::error!("{what}: {}", crate::lab::netlab::for_log(&error));
            } else {
                log::warn!(
                    "{what} (attempt {}): {}",
                    t.attempts,
                    crate::lab::netlab::for_log(&error)
                );
            }
            t.error = Some(error);
            state.changed()
        };
        self.persist_quietly(version);
    }

    /// Queues the failed teardowns whose next attempt is due (the timer's round).
    fn retry_teardowns(&self, state: &mut State, now: Duration) {
        for t in &mut state.teardowns {
            if t.retry_at.is_some_and(|at| at <= now) {
                t.retry_at = None;
                log::info!(
                    "retrying the teardown of {} (attempt {})",
                    t.lab.topology.display(),
                    t.attempts + 1
                );
                self.send_lab_job(LabJob::Teardown(t.clone()));
            }
        }
    }

    /// Tells the timer that a long-poll was parked.
    pub fn parked_one(&self) {
        let _ = self.park_wake.0.try_send(());
    }

    /// What the timer waits on besides its stop channel.
    pub fn park_wakes(&self) -> &Receiver<()> {
        &self.park_wake.1
    }

    /// Parks a long-poll of session `id`, which was `seen` in that state; it is answered at
    /// once instead when the state changed meanwhile, when [`longpoll::cap`] requests
    /// are parked already, or during a shutdown.
    pub fn park(
        &self,
        responder: Responder,
        id: SessionId,
        seen: (Status, usize),
        deadline: Duration,
    ) {
        let at_once = {
            let mut state = self.lock();
            let current = state.queue.lookup(&id);
            if current == Some(seen) && !state.parked.is_full() && !self.is_shutting_down() {
                let earliest = state.parked.park(id, seen, deadline, responder);
                Some(None).filter(|_| earliest)
            } else {
                Some(Some((responder, current)))
            }
        };
        match at_once {
            // Parked, with the earliest deadline: the timer must wake for it.
            Some(None) => self.parked_one(),
            // Parked behind an earlier deadline.
            None => {}
            Some(Some((responder, current))) => responder
                .respond(current.map_or_else(Reply::session_not_found, longpoll::status_reply)),
        }
    }

    /// Answers the long-polls whose session changed (after a removal from the queue).
    pub fn wake_parked(&self) {
        let ready = {
            let mut state = self.lock();
            if state.parked.is_empty() {
                return;
            }
            let now = self.clock.now();
            let State { parked, queue, .. } = &mut *state;
            parked.take_ready(queue, now, longpoll::Due::Changed)
        };
        longpoll::answer(ready);
    }

    /// Answers the long-polls whose client is gone (see [`longpoll::live_peers`]), on the
    /// connections of our listening `port`; returns how many.
    pub fn drop_dead_parked(&self, port: u16) -> usize {
        let serial = {
            let state = self.lock();
            if state.parked.is_empty() {
                return 0;
            }
            state.parked.next_serial()
        };
        // Read without the lock: those parked meanwhile are not judged by this reading.
        let Some(alive) = longpoll::live_peers(port) else {
            return 0;
        };
        let ready = {
            let mut state = self.lock();
            let State { parked, queue, .. } = &mut *state;
            parked.take_dead(queue, serial, &alive)
        };
        let dead = ready.len();
        if dead > 0 {
            log::debug!("{dead} long-polls answered: their clients are gone");
        }
        longpoll::answer(ready);
        dead
    }

    /// Answers the long-polls whose wait ran out (every one when `all`, at shutdown);
    /// returns the next deadline of those left.
    pub fn expire_parked(&self, all: bool) -> Option<Duration> {
        let (ready, next) = {
            let mut state = self.lock();
            let now = self.clock.now();
            let State { parked, queue, .. } = &mut *state;
            let which = if all {
                longpoll::Due::All
            } else {
                longpoll::Due::Expired
            };
            let ready = parked.take_ready(queue, now, which);
            (ready, parked.next_deadline())
        };
        longpoll::answer(ready);
        next
    }

    /// Ends a session (DELETE /session/{id}); false when it was not tracked. The change is
    /// in the state file when this returns.
    pub fn end_session(&self, id: &SessionId) -> Result<bool, NotPersisted> {
        let version = {
            let mut state = self.lock();
            match state.queue.remove_full(id) {
                Some((removed, gone)) => {
                    log::info!("session {id} ended");
                    self.note_end(&removed, &gone, Ended::Deleted);
                    self.after_removal(&mut state, &removed);
                    state.changed()
                }
                None => return Ok(false),
            }
        };
        self.persist(version)?;
        self.wake_parked();
        Ok(true)
    }

    /// Ends every session owned by a name `known` no longer accepts (its token was removed
    /// from the token file), as `DELETE /session` would: the active one's held lab is torn
    /// down, the next session promoted. Returns the ended sessions with their owners; the
    /// change is in the state file when this returns.
    pub fn end_revoked(
        &self,
        known: impl Fn(&str) -> bool,
    ) -> Result<Vec<(SessionId, Arc<str>)>, NotPersisted> {
        let (ended, version) = {
            let mut state = self.lock();
            let revoked: Vec<(SessionId, Arc<str>)> = state
                .queue
                .records()
                .filter_map(|r| r.owner.filter(|o| !known(o)).map(|o| (r.id, o)))
                .collect();
            if revoked.is_empty() {
                return Ok(revoked);
            }
            for (id, owner) in &revoked {
                if let Some((removed, gone)) = state.queue.remove_full(id) {
                    log::warn!("session {id} ended: the token of '{owner}' was revoked");
                    self.note_end(&removed, &gone, Ended::Revoked);
                    self.after_removal(&mut state, &removed);
                }
            }
            (revoked, state.changed())
        };
        self.persist(version)?;
        self.wake_parked();
        Ok(ended)
    }

    /// The timer's round: reaps stale sessions and tears down a lab left idle with no session
    /// for longer than `--idle-lab-timeout`. Returns how many sessions were reaped.
    ///
    /// While the state file cannot be written, it only tries the write again: a reap or a
    /// teardown decided then would be rolled back by the failed write and decided again at
    /// every round (each time logged and recorded as an event), so they wait for the disk.
    pub fn sweep(&self) -> usize {
        if self.degraded().is_some() {
            let version = self.lock().changed();
            self.persist_quietly(version);
            if self.degraded().is_some() {
                return 0;
            }
        }
        let now = self.clock.now();
        let mut state = self.lock();
        let removed =
            state
                .queue
                .sweep_full(now, self.config.waiting_timeout, self.config.active_timeout);
        for (r, gone) in &removed {
            let (status, timeout) = if r.was_active {
                ("active", self.config.active_timeout)
            } else {
                ("waiting", self.config.waiting_timeout)
            };
            log::warn!(
                "session {} reaped: {status} and silent for more than {:.1} s",
                r.id,
                timeout.as_secs_f64()
            );
            let why = if r.was_active {
                Ended::ReapedActive
            } else {
                Ended::ReapedWaiting
            };
            self.note_end(r, gone, why);
            self.after_removal(&mut state, r);
        }
        self.retry_teardowns(&mut state, now);
        let mut dirty = !removed.is_empty();
        // A lab is unattended when it is idle, no session holds it and fewer sessions exist
        // than slots (with one slot: no session at all), with no `POST /lab` in progress.
        let few = state.queue.len() < state.slots.len() && state.acquiring.is_empty();
        for i in 0..state.slots.len() {
            let slot = &state.slots[i];
            let unattended = few
                && slot.holder.is_none_or(|h| !state.queue.is_active(&h))
                && slot.lab.as_ref().is_some_and(|l| l.ref_count == 0);
            match (unattended, slot.idle_since) {
                (false, _) => state.slots[i].idle_since = None,
                (true, None) => state.slots[i].idle_since = Some(now),
                (true, Some(since)) if now.saturating_sub(since) > self.config.idle_lab_timeout => {
                    state.slots[i].idle_since = None;
                    state.slots[i].holder = None;
                    if let Some(lab) = state.slots[i].lab.take() {
                        log::info!(
                            "lab {} idle with no session for more than {:.0} s: tearing it down",
                            lab.topology.display(),
                            self.config.idle_lab_timeout.as_secs_f64()
                        );
                        self.events.emit(
                            "lab_idle_teardown",
                            json!({
                                "slot": i + 1,
                                "topology": file_name(&lab.topology),
                                "idle_s": now.saturating_sub(since).as_secs_f64(),
                            }),
                        );
                        self.queue_teardown(&mut state, lab);
                        dirty = true;
                    }
                }
                (true, Some(_)) => {}
            }
        }
        if dirty {
            let version = state.changed();
            drop(state);
            self.persist_quietly(version);
        } else {
            drop(state);
        }
        if !removed.is_empty() {
            self.wake_parked();
        }
        removed.len()
    }

    /// What follows the removal of a session: the promotion is logged, and when the ACTIVE
    /// session ends while it still holds references on the lab, the lab is torn down. A lab it
    /// released properly stays up for the next session to attach to.
    fn after_removal(&self, state: &mut State, removed: &Removed) {
        if !removed.was_active {
            return;
        }
        // With one slot the lab is the ACTIVE session's, whoever started it.
        let single = state.queue.slots() == 1;
        for i in 0..state.slots.len() {
            let slot = &mut state.slots[i];
            let held = match (slot.holder, &slot.lab) {
                (_, Some(lab)) if single || slot.holder == Some(removed.id) => {
                    lab.torn_down_with_its_session()
                }
                _ => false,
            };
            if slot.holder == Some(removed.id) && slot.starting.is_none() {
                slot.holder = None;
            }
            if held && let Some(lab) = slot.lab.take() {
                slot.holder = None;
                log::info!(
                    "lab {} still held by ended session {}: tearing it down",
                    lab.topology.display(),
                    removed.id
                );
                self.queue_teardown(state, lab);
            }
        }
        if let Some(promoted) = removed.promoted
            && let Some(next) = self.schedule_next(state, promoted)
        {
            log::info!("session {next} is now active");
            self.note_promoted(state, &next);
        }
    }

    /// The scheduler's say on who takes the slot a removal freed: the next in line (the queue
    /// promoted `promoted`), unless a waiting session declared a lab that is idle now (see
    /// [`crate::core::schedule`]). Returns the session that is ACTIVE in its place, if it
    /// still is (a sweep that reaps several sessions may have reaped it too).
    fn schedule_next(&self, state: &mut State, promoted: SessionId) -> Option<SessionId> {
        let idle: Vec<Hash> = state
            .slots
            .iter()
            .filter(|s| s.starting.is_none())
            .filter_map(|s| s.lab.as_ref())
            .filter(|l| l.ref_count == 0)
            .map(|l| l.hash)
            .collect();
        let policy = Policy {
            affinity_window: self.config.affinity_window,
            max_skips: self.config.max_skips,
        };
        if let Some(promotion) = state.queue.promote_ahead(promoted, &idle, policy) {
            self.note_ahead(state, &promotion);
            return Some(promotion.id);
        }
        state.queue.is_active(&promoted).then_some(promoted)
    }

    /// A session went ahead of others for an idle lab: logged, counted, an event recorded.
    fn note_ahead(&self, state: &State, promotion: &Promotion) {
        let hash = record::hex(&promotion.hash)[..12].to_owned();
        let info = state
            .queue
            .info(&promotion.id)
            .map(|(i, _)| i)
            .unwrap_or_default();
        log::info!(
            "session {} promoted ahead of {} for the idle lab {hash}",
            promotion.id,
            promotion.passed.len(),
        );
        METRICS.promoted_ahead(promotion.passed.len());
        let passed: Vec<serde_json::Value> = promotion
            .passed
            .iter()
            .map(|id| {
                let info = state.queue.info(id).map(|(i, _)| i).unwrap_or_default();
                let skips = state.queue.skips(id).unwrap_or(0);
                events::with(
                    who(id, info.name.as_deref(), info.owner.as_deref()),
                    json!({ "skips": skips }),
                )
            })
            .collect();
        self.events.emit(
            "promoted_ahead",
            events::with(
                who(&promotion.id, info.name.as_deref(), info.owner.as_deref()),
                json!({ "hash": hash, "passed": passed }),
            ),
        );
    }

    /// A session became ACTIVE (not at its creation): since when, how long it waited.
    pub fn note_promoted(&self, state: &mut State, id: &SessionId) {
        let now = now_ms();
        // A sweep that reaps several heads names the final head for each: count it once.
        if let Some((info, None)) = state.queue.info(id) {
            state.queue.set_active_since(id, now);
            let waited = now.saturating_sub(info.created_ms);
            METRICS.queue_wait.observe(Duration::from_millis(waited));
            self.events.emit(
                "session_promoted",
                events::with(
                    who(id, info.name.as_deref(), info.owner.as_deref()),
                    json!({ "waited_s": events::secs(waited) }),
                ),
            );
        }
    }

    /// A session ended: counted, its hold time measured, an event recorded.
    fn note_end(&self, removed: &Removed, gone: &Gone, why: Ended) {
        METRICS.session_ended(why);
        let held = gone
            .active_since_ms
            .filter(|_| removed.was_active)
            .map(|since| now_ms().saturating_sub(since));
        if let Some(held) = held {
            METRICS.lab_hold.observe(Duration::from_millis(held));
        }
        self.events.emit(
            "session_ended",
            events::with(
                who(
                    &removed.id,
                    gone.info.name.as_deref(),
                    gone.info.owner.as_deref(),
                ),
                json!({
                    "reason": why.as_str(),
                    "was_active": removed.was_active,
                    "held_s": held.map(events::secs),
                }),
            ),
        );
    }

    /// A start failed for a reason that counts against the host (see [`Host`]): counted,
    /// and when this makes the host unhealthy, an event and a metric say so.
    pub fn start_failed(&self, error: &str) {
        let now = self.clock.now();
        let failed = self
            .host
            .start_failed(error, now, self.config.health_interval);
        if failed.became_unhealthy {
            METRICS.host_became_unhealthy();
            log::error!(
                "{} starts failed in a row: the lab host is unhealthy; POST /lab gets 503 until \
                 {}: {}",
                failed.in_a_row,
                match &self.config.health_topology {
                    Some(t) => format!(
                        "a start of {} (tried every {:.0} s) or POST /admin/health/reset succeeds",
                        t.display(),
                        self.config.health_interval.as_secs_f64()
                    ),
                    None => "POST /admin/health/reset".to_owned(),
                },
                crate::lab::netlab::for_log(&error)
            );
            self.events.emit(
                "host_unhealthy",
                json!({ "failures": failed.in_a_row, "error": error }),
            );
        } else if self.host.unhealthy().is_none() {
            log::warn!(
                "{} of {} failed starts in a row that count against the host",
                failed.in_a_row,
                self.config.unhealthy_after
            );
        }
    }

    /// netlab brought a lab up (`how`: `start`, `health_check`): the count starts again, and
    /// an unhealthy host is healthy.
    pub fn start_succeeded(&self, how: &str) {
        if self.host.start_succeeded() {
            self.note_healthy(how, None);
        }
    }

    /// An admin's `POST /admin/health/reset`.
    pub fn health_reset(&self, by: Option<&str>) {
        if self.host.reset() {
            self.note_healthy("reset", by);
        }
    }

    fn note_healthy(&self, how: &str, by: Option<&str>) {
        log::info!("the lab host is healthy again ({how})");
        self.events
            .emit("host_healthy", json!({ "how": how, "by": by }));
    }

    /// The timer's turn: queues a health check on the lab thread when one is due.
    pub fn health_tick(&self) {
        if self.config.health_topology.is_some() && self.host.check_due(self.clock.now()) {
            self.send_lab_job(LabJob::HealthCheck);
        }
    }

    /// The client name of a session, for events (`None` when unnamed or gone).
    pub fn client_info(&self, id: &SessionId) -> Arc<ClientInfo> {
        self.lock()
            .queue
            .info(id)
            .map(|(info, _)| info)
            .unwrap_or_default()
    }
}

/// The file name of a path (never its directory: work dirs are not for the public).
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `1 session`, `2 sessions`.
pub fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::FakeClock;
    use crate::lab::record;

    fn shared(clock: Arc<FakeClock>) -> (Shared, crossbeam_channel::Receiver<LabJob>) {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut config = Config::defaults(dir);
        config.idle_lab_timeout = Duration::from_secs(3600);
        let (tx, rx) = crossbeam_channel::unbounded();
        (Shared::new(config, clock, tx), rx)
    }

    fn lab(refs: u32) -> LabRecord {
        LabRecord {
            hash: record::sha256(b"t"),
            work_dir: PathBuf::from("/x"),
            topology: PathBuf::from("/x/t.yml"),
            ref_count: refs,
            devices_json: record::no_devices(),
            instance: None,
        }
    }

    #[test]
    fn an_idle_lab_with_no_session_is_torn_down_after_the_idle_timeout() {
        let clock = Arc::new(FakeClock::new());
        let (shared, jobs) = shared(clock.clone());
        shared.lock().slots[0].lab = Some(lab(0));
        shared.sweep();
        clock.advance(Duration::from_secs(3600));
        shared.sweep();
        assert!(shared.lock().slots[0].lab.is_some());
        clock.advance(Duration::from_secs(1));
        shared.sweep();
        assert!(shared.lock().slots[0].lab.is_none());
        assert!(matches!(jobs.try_recv(), Ok(LabJob::Teardown(_))));
        assert_eq!(shared.lock().teardowns.len(), 1);
    }

    #[test]
    fn a_session_or_a_reference_keeps_an_idle_lab() {
        let clock = Arc::new(FakeClock::new());
        let (shared, jobs) = shared(clock.clone());
        shared.lock().slots[0].lab = Some(lab(1));
        shared.sweep();
        clock.advance(Duration::from_secs(5000));
        shared.sweep();
        assert!(shared.lock().slots[0].lab.is_some());
        // Released, but a session is queued and polling: kept.
        let id = uuid::Uuid::new_v4();
        shared.lock().slots[0].lab.as_mut().unwrap().release();
        shared.lock().queue.create(id, clock.now()).unwrap();
        for _ in 0..3 {
            clock.advance(Duration::from_secs(200));
            shared.lock().queue.touch(&id, clock.now());
            shared.sweep();
        }
        assert!(shared.lock().slots[0].lab.is_some());
        assert!(jobs.try_recv().is_err());
    }

    /// The lock order under a failing disk: committers roll the state back (state lock taken
    /// by the persister) while the sweep holds the state lock and asks whether the state is
    /// degraded (persister's lock). Both orders at once once deadlocked.
    #[test]
    fn persisting_and_sweeping_on_an_unwritable_state_dir_never_deadlock() {
        let clock = Arc::new(FakeClock::new());
        let (shared, _jobs) = shared(clock.clone());
        std::fs::remove_dir_all(&shared.config.state_dir).unwrap();
        let shared = Arc::new(shared);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let mut threads = Vec::new();
        for _ in 0..2 {
            let (shared, done_tx, clock) = (shared.clone(), done_tx.clone(), clock.clone());
            threads.push(std::thread::spawn(move || {
                for _ in 0..300 {
                    let version = {
                        let mut state = shared.lock();
                        let _ = state.queue.create(uuid::Uuid::new_v4(), clock.now());
                        state.changed()
                    };
                    assert!(shared.persist(version).is_err());
                }
                done_tx.send(()).unwrap();
            }));
        }
        {
            let (shared, done_tx) = (shared.clone(), done_tx.clone());
            threads.push(std::thread::spawn(move || {
                for _ in 0..300 {
                    shared.sweep();
                }
                done_tx.send(()).unwrap();
            }));
        }
        for _ in 0..3 {
            // A deadlock never finishes; a healthy run takes well under a second.
            done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("persisting and sweeping deadlocked");
        }
        for t in threads {
            t.join().unwrap();
        }
        assert!(shared.degraded().is_some());
        assert_eq!(
            shared.lock().queue.len(),
            0,
            "every refused change is rolled back"
        );
    }

    fn declaring(shared: &Shared, declared: Hash) -> SessionId {
        let id = uuid::Uuid::new_v4();
        let info = Arc::new(ClientInfo {
            declared: Some(declared),
            created_ms: now_ms(),
            ..ClientInfo::default()
        });
        let now = shared.clock.now();
        shared.lock().queue.create_with(id, now, info).unwrap();
        id
    }

    fn kinds(shared: &Shared, kind: &str) -> Vec<serde_json::Value> {
        shared
            .events
            .newest(1000, 0)
            .iter()
            .map(|e| serde_json::from_str::<serde_json::Value>(e.json.get()).unwrap())
            .filter(|v| v["kind"] == kind)
            .collect()
    }

    /// A holder of A (released: the lab is idle) with A, B, A waiting. When it ends the first
    /// A is next anyway; when that one ends the second A goes before B. Then A's keep
    /// arriving: B is passed exactly `--max-skips` times, then served.
    #[test]
    fn the_idle_lab_is_served_first_and_nobody_is_passed_more_than_max_skips() {
        let clock = Arc::new(FakeClock::new());
        let (shared, jobs) = shared(clock.clone());
        assert_eq!(shared.config.max_skips, 2);
        let a = record::sha256(b"t");
        let b = record::sha256(b"other topology");
        let holder = declaring(&shared, a);
        let a1 = declaring(&shared, a);
        let b1 = declaring(&shared, b);
        let a2 = declaring(&shared, a);
        shared.lock().slots[0].lab = Some(lab(0));
        assert!(shared.end_session(&holder).unwrap());
        assert_eq!(shared.lock().queue.active(), Some(a1));
        assert!(kinds(&shared, "promoted_ahead").is_empty());
        assert!(shared.end_session(&a1).unwrap());
        assert_eq!(shared.lock().queue.active(), Some(a2));
        assert_eq!(shared.lock().queue.lookup(&b1), Some((Status::Waiting, 1)));
        let ahead = kinds(&shared, "promoted_ahead");
        assert_eq!(ahead.len(), 1);
        assert_eq!(ahead[0]["session"], events::prefix(&a2));
        assert_eq!(ahead[0]["hash"], &record::hex(&a)[..12]);
        assert_eq!(ahead[0]["passed"][0]["session"], events::prefix(&b1));
        assert_eq!(ahead[0]["passed"][0]["skips"], 1);
        // A stream of A's: one more arrives before each hand-over.
        let mut served_before_b = 0;
        loop {
            declaring(&shared, a);
            let head = shared.lock().queue.active().unwrap();
            if head == b1 {
                break;
            }
            assert!(shared.end_session(&head).unwrap());
            served_before_b += 1;
            assert!(served_before_b < 10, "B is never served");
            // Its position never grows.
            assert!(shared.lock().queue.lookup(&b1).unwrap().1 <= 1);
        }
        assert_eq!(shared.lock().queue.skips(&b1), Some(2));
        assert_eq!(kinds(&shared, "promoted_ahead").len(), 2);
        // The lab stayed up through it all: nothing was torn down.
        assert!(jobs.try_recv().is_err());
    }

    /// With `--max-skips 0` the queue is served in order whatever is declared.
    #[test]
    fn max_skips_zero_is_strict_fifo() {
        let clock = Arc::new(FakeClock::new());
        let (mut shared, _jobs) = shared(clock.clone());
        shared.config.max_skips = 0;
        let a = record::sha256(b"t");
        let b = record::sha256(b"other topology");
        let ids = [a, a, b, a, b, a].map(|h| declaring(&shared, h));
        shared.lock().slots[0].lab = Some(lab(0));
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(shared.lock().queue.active(), Some(*id), "turn {n}");
            assert!(shared.end_session(id).unwrap());
        }
        assert!(kinds(&shared, "promoted_ahead").is_empty());
    }

    /// No lab idle (the holder still held it: it is torn down), so nobody goes ahead.
    #[test]
    fn a_lab_torn_down_with_its_holder_promotes_nobody_ahead() {
        let clock = Arc::new(FakeClock::new());
        let (shared, jobs) = shared(clock.clone());
        let a = record::sha256(b"t");
        let b = record::sha256(b"other topology");
        let holder = declaring(&shared, a);
        let b1 = declaring(&shared, b);
        declaring(&shared, a);
        shared.lock().slots[0].lab = Some(lab(1));
        assert!(shared.end_session(&holder).unwrap());
        assert_eq!(shared.lock().queue.active(), Some(b1));
        assert!(matches!(jobs.try_recv(), Ok(LabJob::Teardown(_))));
    }

    #[test]
    fn reaping_several_heads_at_once_promotes_the_last_one_once() {
        let clock = Arc::new(FakeClock::new());
        let (shared, _jobs) = shared(clock.clone());
        let ids: Vec<SessionId> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
        for id in &ids {
            let info = Arc::new(ClientInfo {
                created_ms: now_ms(),
                ..ClientInfo::default()
            });
            shared
                .lock()
                .queue
                .create_with(*id, clock.now(), info)
                .unwrap();
        }
        clock.advance(Duration::from_secs(700));
        shared.lock().queue.touch(&ids[2], clock.now());
        assert_eq!(shared.sweep(), 2);
        let kinds: Vec<String> = shared
            .events
            .newest(10, 0)
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(e.json.get()).unwrap();
                v["kind"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            ["session_ended", "session_promoted", "session_ended"]
        );
        assert!(shared.lock().queue.info(&ids[2]).unwrap().1.is_some());
    }
}
