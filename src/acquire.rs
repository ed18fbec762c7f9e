//! `POST /lab`, from the gate to the hand-over to the lab thread.
//!
//! A worker only does what needs no body: the gate, the one-acquire-at-a-time rule, the
//! `Content-Length` and `Content-Type` checks. The body is then read on a thread of its own,
//! because a client can send it as slowly as it likes and tiny_http has no socket timeouts:
//! a worker reading it would be lost to every other client meanwhile.
//!
//! The upload is bounded by `--upload-timeout` like this: a watchdog waits for the upload to
//! finish; when time is up first, it gives the upload up (the partial files are removed, the
//! acquire slot is freed, the session may be reaped again), and the reader fails at its next
//! read, so the upload thread ends as soon as the client sends anything or goes away. A
//! client that does neither keeps only that thread and its socket; at most
//! [`MAX_UPLOAD_THREADS`] such threads exist, later uploads get 503 until one ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::{RecvTimeoutError, bounded};
use tiny_http::Request;
use uuid::Uuid;

use crate::api::{Caller, Outcome, gate, header_value, session_not_found};
use crate::events::{self, who};
use crate::http::{Reply, answer};
use crate::lab::{self, Acquire};
use crate::lab_thread::{LabJob, StartJob};
use crate::metrics::{METRICS, OUTCOME_BUSY, OUTCOME_REUSED};
use crate::persist::Starting;
use crate::queue::{SessionId, Status};
use crate::state::Shared;
use crate::upload::{self, UploadError};

/// Upload threads alive at once, the running one and those given up on but still blocked
/// on a silent client.
pub const MAX_UPLOAD_THREADS: usize = 16;

/// Upload threads alive now.
pub static UPLOAD_THREADS: AtomicUsize = AtomicUsize::new(0);

/// One `POST /lab` in progress: the session it is for and a number of its own, so that a
/// late finish of an upload that was given up on cannot free a newer acquire's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub session: SessionId,
    pub id: u64,
}

/// What the worker hands to the upload thread.
pub struct Pending {
    ticket: Ticket,
    boundary: String,
    work_dir: PathBuf,
    began: Instant,
}

/// Ends a `POST /lab` in progress: the next one may come, and the session may be reaped again
/// (its clock restarts now: the completion of its lab operation counts as activity).
pub fn finish(shared: &Shared, ticket: &Ticket) {
    let now = shared.clock.now();
    let mut state = shared.lock();
    if state.acquiring != Some(*ticket) {
        return;
    }
    state.acquiring = None;
    state.queue.set_busy(&ticket.session, false);
    state.queue.touch(&ticket.session, now);
}

/// Frees the acquire slot when dropped, unless the job was handed to the lab thread, which
/// frees it when netlab is done.
struct Guard<'a> {
    shared: &'a Shared,
    ticket: Ticket,
    armed: bool,
}

impl Guard<'_> {
    fn hand_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.armed {
            finish(self.shared, &self.ticket);
        }
    }
}

fn upload_error_reply(e: &UploadError) -> Reply {
    match e {
        UploadError::MissingTopology => Reply::missing(["body", "topology"]),
        UploadError::BadBool(input) => crate::api::bool_error("body", "reuse", input),
        UploadError::Io(_) => Reply::detail(500, "Could not store the upload on the server"),
        other => Reply::detail(other.status(), other.to_string()),
    }
}

/// On the worker: everything that needs no body.
pub fn begin(shared: &Shared, request: &Request, caller: &Caller) -> Outcome {
    let session = match gate(shared, request, caller) {
        Ok(id) => id,
        Err(reply) => return reply.into(),
    };
    let max_bytes = shared.config.max_upload_bytes;
    if let Some(length) = request.body_length()
        && length as u64 > max_bytes
    {
        return upload_error_reply(&UploadError::TooLarge(max_bytes)).into();
    }
    let boundary = match upload::boundary(header_value(request, "Content-Type")) {
        Ok(boundary) => boundary,
        Err(e) => return upload_error_reply(&e).into(),
    };
    if UPLOAD_THREADS.load(Ordering::SeqCst) >= MAX_UPLOAD_THREADS {
        log::warn!("{MAX_UPLOAD_THREADS} uploads are stalled: refusing a new one");
        return Reply::detail(503, "Too many stalled uploads; try again later")
            .with_header("Retry-After", "10")
            .into();
    }
    let ticket = {
        let mut state = shared.lock();
        if state.acquiring.is_some() {
            METRICS.acquisition(OUTCOME_BUSY, None);
            return Reply::detail(423, "Lab currently busy").into();
        }
        let ticket = Ticket {
            session,
            id: state.next_ticket(),
        };
        state.acquiring = Some(ticket);
        state.queue.set_busy(&session, true);
        ticket
    };
    Outcome::Upload(Pending {
        ticket,
        boundary,
        work_dir: shared.labs_dir.join(work_dir_name(Uuid::new_v4())),
        began: Instant::now(),
    })
}

/// A fresh work directory's name. netlab names a lab without `name:` after its directory
/// (alphanumerics only, at most 12) and refuses one that starts with a digit, which a bare
/// UUID does whenever its first eight hex digits are all digits (about 2 % of starts); the
/// `lab-` prefix always gives a letter first.
fn work_dir_name(id: Uuid) -> String {
    format!("lab-{id}")
}

const UPLOADING: u8 = 0;
const RECEIVED: u8 = 1;
const GIVEN_UP: u8 = 2;

/// Starts the upload thread for a `POST /lab` that passed [`begin`].
pub fn spawn_upload(shared: &Arc<Shared>, request: Request, pending: Pending) {
    UPLOAD_THREADS.fetch_add(1, Ordering::SeqCst);
    let shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("upload".into())
        .spawn(move || {
            run_upload(&shared, request, pending);
            UPLOAD_THREADS.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        // The request went down with the closure: tiny_http answers it with a bare 500.
        UPLOAD_THREADS.fetch_sub(1, Ordering::SeqCst);
        log::error!("cannot start an upload thread: {e}");
    }
}

fn run_upload(shared: &Arc<Shared>, mut request: Request, pending: Pending) {
    let phase = Arc::new(AtomicU8::new(UPLOADING));
    let cancel = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = bounded::<()>(1);
    {
        let shared = Arc::clone(shared);
        let phase = Arc::clone(&phase);
        let cancel = Arc::clone(&cancel);
        let ticket = pending.ticket;
        let work_dir = pending.work_dir.clone();
        let timeout = shared.config.upload_timeout;
        let watchdog = std::thread::Builder::new()
            .name("upload-watchdog".into())
            .spawn(move || {
                if done_rx.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout)
                    && phase
                        .compare_exchange(UPLOADING, GIVEN_UP, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    cancel.store(true, Ordering::SeqCst);
                    log::warn!(
                        "session {}: upload not received within {:.0} s: given up",
                        ticket.session,
                        timeout.as_secs_f64()
                    );
                    upload::remove_dir(&work_dir);
                    finish(&shared, &ticket);
                }
            });
        if let Err(e) = watchdog {
            log::error!("cannot start an upload watchdog: {e}");
        }
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        receive_and_decide(shared, &mut request, &pending, &phase, &cancel)
    }));
    let _ = done_tx.send(());
    match outcome {
        Ok(Outcome::Reply(reply)) => answer(request, reply),
        Ok(Outcome::Lab(job)) => shared.send_lab_job(LabJob::Start(job, request)),
        Ok(Outcome::Upload(_) | Outcome::Park(..)) => answer(request, Reply::internal_error()),
        Err(_) => {
            log::error!("the upload of POST /lab panicked; answered 500");
            upload::remove_dir(&pending.work_dir);
            finish(shared, &pending.ticket);
            answer(request, Reply::internal_error());
        }
    }
}

fn timed_out(shared: &Shared) -> Reply {
    Reply::detail(
        408,
        format!(
            "Upload not received within {} s (--upload-timeout)",
            shared.config.upload_timeout.as_secs_f64()
        ),
    )
}

fn receive_and_decide(
    shared: &Shared,
    request: &mut Request,
    pending: &Pending,
    phase: &AtomicU8,
    cancel: &AtomicBool,
) -> Outcome {
    let Pending {
        ticket,
        boundary,
        work_dir,
        began,
    } = pending;
    let guard = Guard {
        shared,
        ticket: *ticket,
        armed: true,
    };
    let limits = upload::Limits {
        max_bytes: shared.config.max_upload_bytes,
        max_parts: upload::MAX_PARTS,
    };
    let received = upload::receive(request.as_reader(), boundary, &limits, work_dir, cancel);
    let received_in_time = phase
        .compare_exchange(UPLOADING, RECEIVED, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if !received_in_time {
        // Given up by the watchdog, which freed the slot; the guard must not touch a newer one.
        guard.hand_over();
        upload::remove_dir(work_dir);
        return timed_out(shared).into();
    }
    let upload = match received {
        Ok(upload) => upload,
        Err(e) => {
            upload::remove_dir(work_dir);
            if let UploadError::Io(err) = &e {
                log::error!("upload to {} failed: {err}", work_dir.display());
            }
            return upload_error_reply(&e).into();
        }
    };
    let session = ticket.session;

    let mut state = shared.lock();
    match state.queue.lookup(&session) {
        Some((Status::Active, _)) => {}
        other => {
            drop(state);
            upload::remove_dir(work_dir);
            return match other {
                None => session_not_found(),
                Some(_) => Reply::detail(423, "Session is not active"),
            }
            .into();
        }
    }
    match lab::decide(state.lab.as_ref(), &upload.hash, upload.reuse) {
        Acquire::Attach => {
            let lab = state
                .lab
                .as_mut()
                .expect("decide() attaches to a running lab");
            lab.ref_count += 1;
            let body = format!("{{\"reused\":true,\"devices\":{}}}", lab.devices_json);
            log::info!(
                "session {session} attached to the running lab {} (ref_count {})",
                lab.topology.display(),
                lab.ref_count
            );
            let refs = lab.ref_count;
            let info = state
                .queue
                .info(&session)
                .map(|(i, _)| i)
                .unwrap_or_default();
            shared.events.emit(
                "lab_reused",
                events::with(
                    who(&session, &info),
                    serde_json::json!({ "ref_count": refs }),
                ),
            );
            let version = state.changed();
            drop(state);
            let persisted = shared.persist(version);
            upload::remove_dir(work_dir);
            drop(guard);
            match persisted {
                Ok(()) => {
                    METRICS.acquisition(OUTCOME_REUSED, Some(began.elapsed()));
                    Reply::raw_json(200, body).into()
                }
                Err(e) => crate::api::not_persisted(&e).into(),
            }
        }
        Acquire::Busy => {
            drop(state);
            METRICS.acquisition(OUTCOME_BUSY, Some(began.elapsed()));
            upload::remove_dir(work_dir);
            Reply::detail(423, "Lab currently busy").into()
        }
        Acquire::Start { replace } => {
            if replace && let Some(old) = state.lab.take() {
                log::info!(
                    "replacing the idle lab {} for session {session}",
                    old.topology.display()
                );
                shared.queue_teardown(&mut state, old);
            }
            state.starting = Some(Starting {
                session,
                work_dir: work_dir.clone(),
                pgid: None,
            });
            let version = state.changed();
            drop(state);
            if let Err(e) = shared.persist(version) {
                // Rolled back (the old lab stays, no start is recorded); the guard frees
                // the slot.
                upload::remove_dir(work_dir);
                return crate::api::not_persisted(&e).into();
            }
            guard.hand_over();
            Outcome::Lab(StartJob {
                ticket: *ticket,
                hash: upload.hash,
                work_dir: work_dir.clone(),
                topology: upload.topology,
                began: *began,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dir_names_start_with_a_letter_even_for_all_digit_uuids() {
        let id = Uuid::parse_str("85690200-1234-4567-8901-234567890123").unwrap();
        assert_eq!(
            work_dir_name(id),
            "lab-85690200-1234-4567-8901-234567890123"
        );
    }
}
