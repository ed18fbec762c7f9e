//! The shared state (sessions, queue, lab record) behind one mutex, and the operations that
//! change more than one part of it. The mutex guards plain data and is held for microseconds:
//! never across a subprocess, a disk write of an upload or a socket write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crossbeam_channel::Sender;

use crate::clock::Clock;
use crate::config::Config;
use crate::lab::LabRecord;
use crate::lab_thread::LabJob;
use crate::queue::{Queue, Removed, SessionId};

pub struct State {
    pub queue: Queue,
    /// The running lab, if any. A lab being torn down is no longer here.
    pub lab: Option<LabRecord>,
    /// The session whose `POST /lab` is in progress (only one at a time).
    pub acquiring: Option<SessionId>,
}

pub struct Shared {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    state: Mutex<State>,
    lab_tx: Sender<LabJob>,
    shutting_down: AtomicBool,
    pub started_at: SystemTime,
    /// Where lab work directories are created (`<state dir>/labs`).
    pub labs_dir: PathBuf,
}

impl Shared {
    pub fn new(config: Config, clock: Arc<dyn Clock>, lab_tx: Sender<LabJob>) -> Self {
        let labs_dir = config.state_dir.join("labs");
        Shared {
            state: Mutex::new(State {
                queue: Queue::new(config.max_sessions),
                lab: None,
                acquiring: None,
            }),
            config,
            clock,
            lab_tx,
            shutting_down: AtomicBool::new(false),
            started_at: SystemTime::now(),
            labs_dir,
        }
    }

    /// Locks the state. A panic in another thread while it held the lock leaves the data
    /// consistent enough to go on (every change is a few field writes), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Queues a job for the lab thread.
    pub fn send_lab_job(&self, job: LabJob) {
        if let Err(e) = self.lab_tx.send(job) {
            // Only after the lab thread has exited, i.e. at the very end of a shutdown.
            log::error!("lab thread is gone; dropped a job: {:?}", e.into_inner());
        }
    }

    /// Ends a session (DELETE /session/{id}); false when it was not tracked.
    pub fn end_session(&self, id: &SessionId) -> bool {
        let mut state = self.lock();
        match state.queue.remove(id) {
            Some(removed) => {
                log::info!("session {id} ended");
                self.after_removal(&mut state, &removed);
                true
            }
            None => false,
        }
    }

    /// Reaps stale sessions (the timer thread).
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        let mut state = self.lock();
        let removed =
            state
                .queue
                .sweep(now, self.config.waiting_timeout, self.config.active_timeout);
        for r in &removed {
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
            self.after_removal(&mut state, r);
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
        let held = state
            .lab
            .as_ref()
            .is_some_and(LabRecord::torn_down_with_its_session);
        if held && let Some(lab) = state.lab.take() {
            log::info!(
                "lab {} still held by ended session {}: tearing it down",
                lab.topology.display(),
                removed.id
            );
            self.send_lab_job(LabJob::Teardown(lab));
        }
        if let Some(next) = removed.promoted {
            log::info!("session {next} is now active");
        }
    }
}
