//! `POST /lab`, from the gate to the hand-over to the lab thread.
//!
//! The request's [`Responder`] and the [`AcquireSlot`] travel together: worker, upload
//! thread, lab thread. Whoever holds them last answers the client and frees the slot (by
//! dropping it), whatever way it ends.
//!
//! A worker only does what needs no body: the gate, the one-acquire-at-a-time rule, the
//! `Content-Length` and `Content-Type` checks. The body is then read on a thread of its own,
//! because a client can send it as slowly as it likes (`--client-timeout` bounds each read,
//! not the whole: a byte now and then keeps it going): a worker reading it would be lost to
//! every other client meanwhile.
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
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::core::auth::Caller;
use crate::core::queue::Status;
use crate::core::state::{AcquireSlot, LabJob, SESSION_HEADER, Shared, SlotBusy, StartJob, State};
use crate::http::reply::{Reply, Responder, header_value};
use crate::lab::record::{self, Acquire, Hash, SlotChoice, SlotView};
use crate::lab::upload::{self, UploadError};
use crate::observe::events::{self, now_ms, who};
use crate::observe::metrics::{METRICS, Outcome};
use crate::store::persist::Starting;

/// Upload threads alive at once, the running one and those given up on but still blocked
/// on a silent client.
const MAX_UPLOAD_THREADS: usize = 16;

/// Upload threads alive now.
static UPLOAD_THREADS: AtomicUsize = AtomicUsize::new(0);

/// What the worker hands to the upload thread.
struct Pending {
    slot: AcquireSlot,
    boundary: String,
    work_dir: PathBuf,
    began: Instant,
}

/// What the upload thread decided.
enum Decision {
    Reply(Reply),
    /// Run `netlab up` on the lab worker of slot `lab_slot`.
    Start {
        slot: AcquireSlot,
        hash: Hash,
        topology: PathBuf,
        lab_slot: usize,
        instance: Option<u16>,
    },
}

impl From<Reply> for Decision {
    fn from(reply: Reply) -> Self {
        Decision::Reply(reply)
    }
}

/// `{"reused": …, "devices": […]}`, the devices passed through as netlab's inspect gave them.
pub type Acquired<'a> = crate::protocol::Acquired<&'a RawValue>;

fn upload_error_reply(e: &UploadError) -> Reply {
    match e {
        UploadError::MissingTopology => Reply::missing(["body", "topology"]),
        UploadError::BadBool(input) => Reply::bad_bool("body", "reuse", input),
        UploadError::Io(_) => Reply::detail(500, "Could not store the upload on the server"),
        other => Reply::detail(other.status(), other.to_string()),
    }
}

/// On the worker: everything that needs no body; then the upload thread takes over.
pub fn begin(shared: &Arc<Shared>, responder: Responder, caller: &Caller) {
    match check(shared, &responder, caller) {
        Ok(pending) => spawn_upload(shared, responder, pending),
        Err(reply) => responder.respond(reply),
    }
}

fn check(shared: &Arc<Shared>, responder: &Responder, caller: &Caller) -> Result<Pending, Reply> {
    let request = responder.request();
    let session = shared.gate(header_value(request, SESSION_HEADER), caller, true)?;
    // An unhealthy host says so at once, before the body is read: a start would only fail
    // again after a whole `netlab up` attempt.
    if let Some(error) = shared.host.unhealthy() {
        METRICS.acquisition(Outcome::Unhealthy, None);
        return Err(Reply::detail(503, format!("lab host unhealthy: {error}")));
    }
    let max_bytes = shared.config.max_upload_bytes;
    if let Some(length) = request.body_length()
        && length as u64 > max_bytes
    {
        return Err(upload_error_reply(&UploadError::TooLarge(max_bytes)));
    }
    let boundary = upload::boundary(header_value(request, "Content-Type"))
        .map_err(|e| upload_error_reply(&e))?;
    if UPLOAD_THREADS.load(Ordering::SeqCst) >= MAX_UPLOAD_THREADS {
        log::warn!("{MAX_UPLOAD_THREADS} uploads are stalled: refusing a new one");
        return Err(
            Reply::detail(503, "Too many stalled uploads; try again later")
                .with_header("Retry-After", "10"),
        );
    }
    let slot = shared.take_slot(session).map_err(|SlotBusy| {
        METRICS.acquisition(Outcome::Busy, None);
        Reply::detail(423, "Lab currently busy")
    })?;
    Ok(Pending {
        slot,
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

/// Starts the upload thread for a `POST /lab` that passed [`check`]. If no thread can be
/// started, the responder and the slot go down with the closure: the client gets our 500
/// and the slot is free.
fn spawn_upload(shared: &Arc<Shared>, responder: Responder, pending: Pending) {
    UPLOAD_THREADS.fetch_add(1, Ordering::SeqCst);
    let shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("upload".into())
        .spawn(move || {
            run_upload(&shared, responder, pending);
            UPLOAD_THREADS.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        UPLOAD_THREADS.fetch_sub(1, Ordering::SeqCst);
        log::error!("cannot start an upload thread: {e}");
    }
}

fn run_upload(shared: &Arc<Shared>, mut responder: Responder, pending: Pending) {
    let phase = Arc::new(AtomicU8::new(UPLOADING));
    let cancel = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = bounded::<()>(1);
    {
        let phase = Arc::clone(&phase);
        let cancel = Arc::clone(&cancel);
        let release = pending.slot.early_release();
        let session = pending.slot.ticket().session;
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
                        "session {session}: upload not received within {:.0} s: given up",
                        timeout.as_secs_f64()
                    );
                    upload::remove_dir(&work_dir);
                    release.release();
                }
            });
        if let Err(e) = watchdog {
            log::error!("cannot start an upload watchdog: {e}");
        }
    }
    let work_dir = pending.work_dir.clone();
    let began = pending.began;
    // A panic drops the slot (freed) and leaves the responder here, to answer 500.
    let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        receive_and_decide(shared, &mut responder, pending, &phase, &cancel)
    }));
    let _ = done_tx.send(());
    match decided {
        Ok(Decision::Reply(reply)) => responder.respond(reply),
        Ok(Decision::Start {
            slot,
            hash,
            topology,
            lab_slot,
            instance,
        }) => shared.send_lab_job(LabJob::Start(Box::new(StartJob {
            slot,
            lab_slot,
            instance,
            responder,
            hash,
            work_dir,
            topology,
            began,
        }))),
        Err(_) => {
            log::error!("the upload of POST /lab panicked; answered 500");
            upload::remove_dir(&work_dir);
            responder.respond(Reply::internal_error());
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

/// Reads the body, then decides under the state lock: attach to the running lab, refuse,
/// or start a new one (the slot travels on to the lab thread). Every other way out drops
/// the slot, which frees it.
fn receive_and_decide(
    shared: &Shared,
    responder: &mut Responder,
    pending: Pending,
    phase: &AtomicU8,
    cancel: &AtomicBool,
) -> Decision {
    let Pending {
        slot,
        boundary,
        work_dir,
        began,
    } = pending;
    let limits = upload::Limits {
        max_bytes: shared.config.max_upload_bytes,
        max_parts: upload::MAX_PARTS,
    };
    let reader = responder.request_mut().as_reader();
    let received = upload::receive(reader, &boundary, &limits, &work_dir, cancel);
    let received_in_time = phase
        .compare_exchange(UPLOADING, RECEIVED, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if !received_in_time {
        // Given up by the watchdog, which freed the slot (dropping it now changes nothing).
        upload::remove_dir(&work_dir);
        return timed_out(shared).into();
    }
    let upload = match received {
        Ok(upload) => upload,
        Err(e) => {
            upload::remove_dir(&work_dir);
            if let UploadError::Io(err) = &e {
                log::error!("upload to {} failed: {err}", work_dir.display());
            }
            return upload_error_reply(&e).into();
        }
    };
    let session = slot.ticket().session;

    let mut state = shared.lock();
    match state.queue.lookup(&session) {
        Some((Status::Active, _)) => {}
        other => {
            drop(state);
            upload::remove_dir(&work_dir);
            return match other {
                None => Reply::session_not_found(),
                Some(_) => Reply::detail(423, "Session is not active"),
            }
            .into();
        }
    }
    let (lab_slot, acquire) = choose(&state, &session, &upload);
    // The first acquire of a session promoted ahead tells whether that saved an `up`.
    let promoted_ahead = acquire != Acquire::Busy && state.queue.first_use_of_ahead(&session);
    match acquire {
        Acquire::Attach => {
            if promoted_ahead {
                METRICS.up_avoided();
            }
            let reply = attach(shared, &mut state, session, lab_slot);
            let version = state.changed();
            drop(state);
            let persisted = shared.persist(version);
            upload::remove_dir(&work_dir);
            drop(slot);
            match persisted {
                Ok(()) => {
                    METRICS.acquisition(Outcome::Reused, Some(began.elapsed()));
                    reply.into()
                }
                Err(e) => Reply::from(e).into(),
            }
        }
        Acquire::Busy => {
            drop(state);
            METRICS.acquisition(Outcome::Busy, Some(began.elapsed()));
            upload::remove_dir(&work_dir);
            Reply::detail(423, "Lab currently busy").into()
        }
        Acquire::Start { replace } => {
            let instance = begin_start(shared, &mut state, session, lab_slot, replace, &work_dir);
            let version = state.changed();
            drop(state);
            if let Err(e) = shared.persist(version) {
                // Rolled back (the old lab stays, no start is recorded); dropping the slot
                // frees it.
                upload::remove_dir(&work_dir);
                return Reply::from(e).into();
            }
            Decision::Start {
                slot,
                hash: upload.hash,
                topology: upload.topology,
                lab_slot,
                instance,
            }
        }
    }
}

/// Which slot the upload goes to, and what happens there (see [`record::choose_slot`]).
fn choose(state: &State, session: &Uuid, upload: &upload::Upload) -> (usize, Acquire) {
    // With one slot the lab is the ACTIVE session's, whoever started it.
    let single = state.slots.len() == 1;
    let views: Vec<SlotView<'_>> = state
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| SlotView {
            lab: s.lab.as_ref(),
            mine: single || s.holder == Some(*session),
            held: s.holder.is_some_and(|h| h != *session),
            starting: s.starting.is_some(),
            tearing_down: state.tearing_down(i),
            wanted_at: s.lab.as_ref().and_then(|l| {
                state
                    .queue
                    .waiting_declared()
                    .position(|d| d == Some(&l.hash))
            }),
            last_used_ms: s.last_used_ms,
        })
        .collect();
    match record::choose_slot(&views, &upload.hash, upload.reuse) {
        SlotChoice::Own { slot, acquire } => (slot, acquire),
        SlotChoice::Attach { slot } => (slot, Acquire::Attach),
        SlotChoice::Empty { slot } => (slot, Acquire::Start { replace: false }),
        SlotChoice::Evict { slot } => (slot, Acquire::Start { replace: true }),
        SlotChoice::Busy => (0, Acquire::Busy),
    }
}

/// Takes a reference on the running lab of `lab_slot` for `session`: the answer
/// (`reused:true` with its devices), logged and recorded as an event.
fn attach(shared: &Shared, state: &mut State, session: Uuid, lab_slot: usize) -> Reply {
    let target = &mut state.slots[lab_slot];
    target.holder = Some(session);
    target.last_used_ms = now_ms();
    target.idle_since = None;
    let lab = target
        .lab
        .as_mut()
        .expect("choose_slot() attaches to a running lab");
    lab.ref_count += 1;
    let reply = Reply::json(
        200,
        &Acquired {
            reused: true,
            devices: &lab.devices_json,
        },
    );
    log::info!(
        "session {session} attached to the running lab {} in slot {} (ref_count {})",
        lab.topology.display(),
        lab_slot + 1,
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
            who(&session, info.name.as_deref(), info.owner.as_deref()),
            serde_json::json!({ "slot": lab_slot + 1, "ref_count": refs }),
        ),
    );
    reply
}

/// Records the start in `lab_slot` (its idle lab queued for teardown first when it is
/// `replace`d); the slot's netlab instance.
fn begin_start(
    shared: &Shared,
    state: &mut State,
    session: Uuid,
    lab_slot: usize,
    replace: bool,
    work_dir: &std::path::Path,
) -> Option<u16> {
    if replace && let Some(old) = state.slots[lab_slot].lab.take() {
        log::info!(
            "replacing the idle lab {} in slot {} for session {session}",
            old.topology.display(),
            lab_slot + 1
        );
        shared.queue_teardown(state, old);
    }
    let instance = state.slots[lab_slot].instance;
    let target = &mut state.slots[lab_slot];
    target.holder = Some(session);
    target.idle_since = None;
    target.starting = Some(Starting {
        session,
        work_dir: work_dir.to_path_buf(),
        pgid: None,
        instance,
    });
    instance
}

#[cfg(test)]
mod tests {
    use tiny_http::{Header, Method, TestRequest};

    use super::*;
    use crate::config::Config;
    use crate::core::clock::FakeClock;

    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        let mut config = Config::defaults(dir.to_path_buf());
        config.max_upload_bytes = 1000;
        let (tx, _rx) = crossbeam_channel::unbounded();
        Arc::new(Shared::new(config, Arc::new(FakeClock::new()), tx))
    }

    fn post_lab(headers: &[(&str, &str)], body: &'static str) -> Responder {
        let mut request = TestRequest::new()
            .with_method(Method::Post)
            .with_path("/lab")
            .with_body(body);
        for (name, value) in headers {
            request = request.with_header(Header::from_bytes(*name, *value).unwrap());
        }
        Responder::capture(request.into()).0
    }

    fn status(result: Result<Pending, Reply>) -> u16 {
        result.map_or_else(|reply| reply.status, |_| 200)
    }

    /// What a worker decides before any body is read, in the order a client meets it.
    #[test]
    fn the_checks_before_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let now = shared.clock.now();
        shared.lock().queue.create(a, now).unwrap();
        shared.lock().queue.create(b, now).unwrap();
        let multipart = ("Content-Type", "multipart/form-data; boundary=x");
        let (ida, idb) = (a.to_string(), b.to_string());
        let check =
            |headers: &[(&str, &str)]| check(&shared, &post_lab(headers, ""), &Caller::Open);
        let too_large = post_lab(
            &[(SESSION_HEADER, &ida), multipart],
            &*"x".repeat(1001).leak(),
        );

        assert_eq!(status(check(&[multipart])), 422);
        assert_eq!(status(check(&[(SESSION_HEADER, &idb), multipart])), 423);
        assert_eq!(
            status(super::check(&shared, &too_large, &Caller::Open)),
            413
        );
        assert_eq!(
            status(check(&[
                (SESSION_HEADER, &ida),
                ("Content-Type", "multipart/form-data")
            ])),
            400
        );

        let pending = check(&[(SESSION_HEADER, &ida), multipart]).unwrap();
        assert_eq!(pending.boundary, "x");
        assert_eq!(shared.lock().acquiring().map(|t| t.session), Some(a));
        // One acquire at a time.
        let Err(busy) = check(&[(SESSION_HEADER, &ida), multipart]) else {
            panic!("a second acquire while one is in progress");
        };
        assert_eq!(
            busy.body.as_deref(),
            Some(&br#"{"detail":"Lab currently busy"}"#[..])
        );
        // Dropped (the upload ended, however): the slot is free, the session reapable.
        drop(pending);
        assert!(shared.lock().acquiring().is_none());
        assert_eq!(status(check(&[(SESSION_HEADER, &ida), multipart])), 200);
    }

    #[test]
    fn work_dir_names_start_with_a_letter_even_for_all_digit_uuids() {
        let id = Uuid::parse_str("85690200-1234-4567-8901-234567890123").unwrap();
        assert_eq!(
            work_dir_name(id),
            "lab-85690200-1234-4567-8901-234567890123"
        );
    }
}
