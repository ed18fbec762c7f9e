//! The lab workers: one thread per lab slot runs that slot's netlab commands (with one slot,
//! the one thread that runs netlab). Jobs (start, teardown) come over the slot's channel and
//! run one at a time, in order, so a slot's starts and teardowns never overlap and a start
//! queued behind a teardown waits for it; different slots start and tear down at the same
//! time. A start carries the client's responder and the acquire
//! slot; this thread answers the client when netlab is done (no worker ever waits for
//! netlab) and frees the slot by dropping it. A panic during a job ends that job only: the
//! unwinding drops the start's responder (the client gets our 500) and its slot (freed; the
//! half-made start becomes a pending teardown), and the thread takes the next job.
//!
//! Why one file of this size: a start, a teardown and a health check each run netlab through
//! the same `Driver`; a fifth is tests.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde_json::json;

use crate::api::acquire::Acquired;
use crate::config::OnExit;
use crate::core::queue::{ClientInfo, SessionId, Status};
use crate::core::state::{LabJob, Shared, StartJob, Ticket, file_name};
use crate::http::reply::Reply;
use crate::lab::netlab::{Netlab, NetlabError, SnapshotStamp, snapshot_stamp};
use crate::lab::record::{self, Device, LabRecord, Teardown};
use crate::lab::upload::remove_dir;
use crate::observe::events::{self, now_ms, who};
use crate::observe::lablog::Job;
use crate::observe::metrics::{METRICS, Outcome};
use crate::store::persist::NotPersisted;

/// What the lab thread asks of netlab; [`Netlab`] does it, a unit test can stand in.
/// Every call names the netlab instance (`None`: `default`).
pub trait Driver: Sync {
    /// `netlab up`; `spawned` gets the process group as soon as it runs.
    fn up(
        &self,
        topology: &Path,
        instance: Option<u16>,
        cancel: &AtomicBool,
        spawned: &dyn Fn(u32),
    ) -> Result<(), NetlabError>;
    /// The devices of the lab in `work_dir` (after its `up`).
    fn devices(&self, work_dir: &Path) -> Result<Vec<Device>, NetlabError>;
    /// The devices of the lab in `work_dir` in one call, while its `up` still runs (the
    /// snapshot is there); killed when `cancel` is set. A driver without it answers
    /// `Cancelled`, and the devices are read after `up`.
    fn devices_early(
        &self,
        _work_dir: &Path,
        _cancel: &AtomicBool,
    ) -> Result<Vec<Device>, NetlabError> {
        Err(NetlabError::Cancelled)
    }
    fn tear_down(
        &self,
        work_dir: &Path,
        force: bool,
        instance: Option<u16>,
    ) -> Result<(), NetlabError>;
    fn instance_dir(
        &self,
        cwd: &Path,
        instance: Option<u16>,
    ) -> Result<Option<PathBuf>, NetlabError>;
    fn cleanup_instance(&self, cwd: &Path, instance: Option<u16>) -> Result<(), NetlabError>;
}

impl Driver for Netlab {
    fn up(
        &self,
        topology: &Path,
        instance: Option<u16>,
        cancel: &AtomicBool,
        spawned: &dyn Fn(u32),
    ) -> Result<(), NetlabError> {
        Netlab::up(self, topology, instance, cancel, spawned)
    }
    fn devices(&self, work_dir: &Path) -> Result<Vec<Device>, NetlabError> {
        Netlab::devices(self, work_dir)
    }
    fn devices_early(
        &self,
        work_dir: &Path,
        cancel: &AtomicBool,
    ) -> Result<Vec<Device>, NetlabError> {
        Netlab::devices_at_once(self, work_dir, Some(cancel))
    }
    fn tear_down(
        &self,
        work_dir: &Path,
        force: bool,
        instance: Option<u16>,
    ) -> Result<(), NetlabError> {
        Netlab::tear_down(self, work_dir, force, instance)
    }
    fn instance_dir(
        &self,
        cwd: &Path,
        instance: Option<u16>,
    ) -> Result<Option<PathBuf>, NetlabError> {
        Netlab::instance_dir(self, cwd, instance)
    }
    fn cleanup_instance(&self, cwd: &Path, instance: Option<u16>) -> Result<(), NetlabError> {
        Netlab::cleanup_instance(self, cwd, instance)
    }
}

/// What a slot's lab worker knows of its netlab instance from the commands it ran itself
/// (only this worker runs netlab for the instance while the server runs). It saves a
/// start the Python start of `netlab status` (half a second) where the answer is known.
#[derive(Debug, Default)]
struct Known {
    /// netlab registers nothing under the instance: `status` said so (or the lab we had
    /// there was cleared), or our last teardown of it succeeded. Not known at start, after
    /// a start (its lab is registered, or it failed) and after a failed teardown.
    clear: bool,
    /// A start of ours was seen registered under the slot's multilab id (`status --all`):
    /// netlab honours the plugin, which need not be checked again.
    registers: bool,
}

/// The lab worker of slot `slot` (its index): takes its jobs until a shutdown.
pub fn run(shared: &Shared, netlab: &dyn Driver, jobs: Receiver<LabJob>, slot: usize) {
    let lab_log = shared.lab_log(slot);
    let instance = shared.lock().slots.get(slot).and_then(|s| s.instance);
    let mut known = Known::default();
    for job in jobs.iter() {
        let stop = matches!(job, LabJob::Shutdown);
        let check = matches!(job, LabJob::HealthCheck);
        let description = format!("{job:?}");
        let result = catch_unwind(AssertUnwindSafe(|| match job {
            LabJob::Start(job) => {
                lab_log.begin(Job::Up);
                let reply = start(shared, netlab, &job, &mut known);
                lab_log.end();
                METRICS.acquisition(Outcome::of_start(reply.status), Some(job.began.elapsed()));
                let StartJob {
                    slot, responder, ..
                } = *job;
                drop(slot);
                responder.respond(reply);
            }
            LabJob::Teardown(t) => match observed_teardown(shared, netlab, &t, slot) {
                Ok(()) => {
                    // Free unless the slot has another lab running (a pending teardown of
                    // an older failed start's remains), or the teardown was of an instance
                    // no slot has any more, which comes here too.
                    known.clear = t.lab.instance == instance
                        && shared
                            .lock()
                            .slots
                            .get(slot)
                            .is_some_and(|s| s.lab.is_none());
                    shared.teardown_done(t.work_dir());
                }
                Err(e) => {
                    known.clear = false;
                    shared.teardown_failed(&t, e);
                }
            },
            LabJob::HealthCheck => {
                known.clear = false;
                health_check(shared, netlab, slot);
            }
            LabJob::Shutdown => shut_down(shared, netlab, slot),
        }));
        if result.is_err() {
            known.clear = false;
            lab_log.end();
            log::error!(
                "the lab worker of slot {} panicked during the {description}; taking the next job",
                slot + 1
            );
        }
        if check {
            // Done, skipped or panicked: the next one is due an interval from now.
            shared
                .host
                .check_done(shared.clock.now() + shared.config.health_interval);
        }
        if stop {
            break;
        }
    }
}

/// The last job: tear the slot's running lab down, unless `--on-exit keep` leaves it for the
/// next start to adopt (the state file already says everything about it).
fn shut_down(shared: &Shared, netlab: &dyn Driver, slot: usize) {
    if shared.config.on_exit == OnExit::Keep {
        if let Some(lab) = shared.lock().slots.get(slot).and_then(|s| s.lab.as_ref()) {
            log::info!(
                "shutting down: keeping the lab {} (ref_count {}) for the next start",
                lab.topology.display(),
                lab.ref_count
            );
        }
        return;
    }
    let running = shared.lock().slots.get(slot).and_then(|s| s.lab.clone());
    if let Some(lab) = running {
        log::info!(
            "shutting down: tearing down the running lab of slot {}",
            slot + 1
        );
        let t = Teardown::new(lab, false);
        let result = observed_teardown(shared, netlab, &t, slot);
        let version = {
            let mut state = shared.lock();
            if let Some(s) = state.slots.get_mut(slot) {
                s.lab = None;
                s.holder = None;
            }
            state.changed()
        };
        shared.persist_quietly(version);
        if let Err(e) = result {
            // Recorded as a pending teardown: the next start (or `cleanup`) tries again.
            shared.teardown_failed(&t, e);
        }
    }
}

/// Tears a lab down in its work directory and removes the directory, once netlab says it
/// is done. On failure the directory stays (the caller records the teardown as failed, to be
/// retried): it holds what netlab and containerlab need to finish by hand.
pub fn teardown(netlab: &dyn Driver, t: &Teardown) -> Result<(), String> {
    let started = Instant::now();
    netlab
        .tear_down(t.work_dir(), t.force, t.lab.instance)
        .map_err(|e| e.to_string())?;
    log::info!(
        "lab {} torn down in {:.1} s",
        t.lab.topology.display(),
        started.elapsed().as_secs_f64()
    );
    remove_dir(t.work_dir());
    Ok(())
}

/// [`teardown`], with its output in the live log and its start and end as events.
fn observed_teardown(
    shared: &Shared,
    netlab: &dyn Driver,
    t: &Teardown,
    slot: usize,
) -> Result<(), String> {
    let started = Instant::now();
    let topology = file_name(&t.lab.topology);
    let lab_log = shared.lab_log(slot);
    lab_log.begin(Job::Down);
    shared.events.emit(
        "teardown_begun",
        json!({ "slot": slot + 1, "topology": topology }),
    );
    let result = teardown(netlab, t);
    lab_log.end();
    shared.events.emit(
        "teardown_done",
        json!({
            "slot": slot + 1,
            "topology": topology,
            "duration_s": started.elapsed().as_secs_f64(),
            "success": result.is_ok(),
            "error": result.as_ref().err(),
        }),
    );
    result
}

/// Cleans up after a start that did not produce a lab we keep. If netlab cannot, the
/// remains become a failed teardown, retried like any other.
fn discard(shared: &Shared, netlab: &dyn Driver, job: &StartJob) {
    let t = Teardown::of_failed_start(&job.work_dir, Some(&job.topology), job.hash, job.instance);
    match netlab.tear_down(&job.work_dir, true, job.instance) {
        Ok(()) => remove_dir(&job.work_dir),
        Err(e) => shared.teardown_failed(&t, e.to_string()),
    }
}

/// What a start leaves behind until it has a lab that is kept: its work dir and its start
/// record in the slot. Dropped before [`StartWork::keep`], it cleans both up: the directory
/// removed (or, once netlab ran in it, the half-made lab discarded) and the start record
/// ended. Every way out of [`start`] but success goes through its drop. While a panic
/// unwinds, it leaves both to the acquire slot's drop, which turns the start record into a
/// pending teardown (no netlab command runs on a thread that is failing).
struct StartWork<'a> {
    shared: &'a Shared,
    netlab: &'a dyn Driver,
    job: &'a StartJob,
    ticket: Ticket,
    /// netlab ran in the work dir: discard, not just remove.
    netlab_ran: bool,
    /// netlab refused the `up` because the instance runs elsewhere: it wrote its files here
    /// but deployed nothing, and a `down --force` here would reach the other lab (same
    /// instance, same names): the directory is only removed.
    refused: bool,
    /// The start record is ended already (by `finish_start`).
    record_ended: bool,
    kept: bool,
}

impl StartWork<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for StartWork<'_> {
    fn drop(&mut self) {
        if self.kept || std::thread::panicking() {
            return;
        }
        if self.netlab_ran && !self.refused {
            discard(self.shared, self.netlab, self.job);
        } else {
            remove_dir(&self.job.work_dir);
        }
        if !self.record_ended {
            let _ = finish_start(self.shared, &self.ticket, self.job.lab_slot, None);
        }
    }
}

fn start(shared: &Shared, netlab: &dyn Driver, job: &StartJob, known: &mut Known) -> Reply {
    let ticket = job.slot.ticket();
    let mut work = StartWork {
        shared,
        netlab,
        job,
        ticket,
        netlab_ran: false,
        refused: false,
        record_ended: false,
        kept: false,
    };
    if shared.is_shutting_down() {
        return Reply::detail(503, "Server is shutting down");
    }
    let events = StartEvents::begin(shared, job, ticket.session);
    let refuse = |why: String| {
        log::warn!("lab {}: {why}", job.topology.display());
        shared.start_failed(&why);
        Reply::detail(409, why)
    };
    // Whatever netlab still registers as the slot's instance (a lab we lost track of)
    // would make `up` fail: clear it first, if it is ours; another's is left alone and
    // refused. Where this worker knows the instance to be clear, `up` goes first, and the
    // same is done only if netlab refuses it as running elsewhere (someone started it by
    // hand meanwhile), before a second `up`.
    let looked = !known.clear;
    if looked && let Err(why) = clear_instance(netlab, &shared.config, job.instance) {
        return refuse(why);
    }
    known.clear = false;
    work.netlab_ran = true;
    let check_registration = !known.registers;
    let mut result = run_netlab(shared, netlab, job, check_registration);
    if matches!(result, Err(NetlabError::AlreadyRunning(_))) && !looked {
        log::info!(
            "lab {}: netlab says its instance runs elsewhere: looking where",
            job.topology.display()
        );
        if let Err(why) = clear_instance(netlab, &shared.config, job.instance) {
            work.refused = true;
            return refuse(why);
        }
        result = run_netlab(shared, netlab, job, check_registration);
    }
    let devices = match result {
        Ok(devices) => devices,
        Err(e) => {
            work.refused = matches!(e, NetlabError::AlreadyRunning(_));
            log_failure(job, &e);
            events.failed(e.status(), &e.to_string());
            if e.counts_against_host() {
                shared.start_failed(&e.to_string());
            }
            return Reply::detail(e.status(), e.to_string());
        }
    };
    known.registers |= job.instance.is_some();
    // netlab did its part, whatever becomes of the lab: the host starts labs.
    shared.start_succeeded("start");
    let devices_json = record::devices_json(&devices);
    let record = LabRecord {
        hash: job.hash,
        work_dir: job.work_dir.clone(),
        topology: job.topology.clone(),
        ref_count: 1,
        devices_json: devices_json.clone(),
        instance: job.instance,
    };
    let (active, stored) = match finish_start(shared, &ticket, job.lab_slot, Some(record)) {
        Ok(done) => done,
        Err(e) => {
            // Not recorded, so not kept: a lab nobody knows of would outlive a restart.
            log::error!(
                "lab {} came up but cannot be recorded: tearing it down again",
                job.topology.display()
            );
            return e.into();
        }
    };
    work.record_ended = true;
    if !stored {
        return if active {
            events.failed(503, "the server is shutting down");
            log::warn!("the server is shutting down: tearing the new lab down again");
            Reply::detail(503, "Server is shutting down")
        } else {
            events.failed(404, "the session ended while its lab was starting");
            log::warn!(
                "session {} ended while its lab was starting: tearing the new lab down",
                ticket.session
            );
            Reply::detail(404, "Session not found")
        };
    }
    work.keep();
    events.started(devices.len());
    Reply::json(
        200,
        &Acquired {
            reused: false,
            devices: &devices_json,
        },
    )
}

/// `netlab up` for the job (its process group recorded in the start record, so that a
/// restart after a crash can kill what is left of it), the check that netlab registered the
/// slot's instance there, and the devices: read while `up` deploys, as soon as netlab has
/// written the lab's snapshot ([`early_devices`]), and again after `up` only if that failed
/// or the snapshot changed since.
fn run_netlab(
    shared: &Shared,
    netlab: &dyn Driver,
    job: &StartJob,
    check_registration: bool,
) -> Result<Vec<Device>, NetlabError> {
    let record_group = |pgid: u32| {
        let version = {
            let mut state = shared.lock();
            match state
                .slots
                .get_mut(job.lab_slot)
                .and_then(|s| s.starting.as_mut())
            {
                Some(start) if start.work_dir == job.work_dir => start.pgid = Some(pgid),
                _ => return,
            }
            state.changed()
        };
        shared.persist_quietly(version);
    };
    let up_ended = AtomicBool::new(false);
    let up_failed = AtomicBool::new(false);
    let work_dir = job.work_dir.as_path();
    let (up, early) = std::thread::scope(|scope| {
        let early = std::thread::Builder::new()
            .name("inspect".into())
            .spawn_scoped(scope, || {
                early_devices(netlab, work_dir, &up_ended, &up_failed)
            });
        // Set however `up` ends, a panic included (the scope waits for the inspect).
        let ended = UpEnded {
            ended: &up_ended,
            failed: &up_failed,
            success: false,
        };
        let up = netlab.up(
            &job.topology,
            job.instance,
            shared.shutdown_flag(),
            &record_group,
        );
        ended.end(up.is_ok());
        let early = early.ok().and_then(|t| {
            // Awake at once if it is still looking for the snapshot.
            t.thread().unpark();
            t.join().ok()
        });
        let early = early.flatten();
        (up, early)
    });
    up?;
    if check_registration {
        registered(netlab, job)?;
    }
    match early {
        Some((devices, seen)) if snapshot_stamp(&job.work_dir) == Some(seen) => Ok(devices),
        _ => netlab.devices(&job.work_dir),
    }
}

/// Tells [`early_devices`] that `up` ended, and whether it failed (its inspect is then
/// killed): when [`UpEnded::end`] is called, or dropped (a panic: failed).
struct UpEnded<'a> {
    ended: &'a AtomicBool,
    failed: &'a AtomicBool,
    success: bool,
}

impl UpEnded<'_> {
    fn end(mut self, success: bool) {
        self.success = success;
    }
}

impl Drop for UpEnded<'_> {
    fn drop(&mut self) {
        self.failed.store(!self.success, Ordering::SeqCst);
        self.ended.store(true, Ordering::SeqCst);
    }
}

/// How often [`early_devices`] looks for the snapshot.
const SNAPSHOT_LOOK: Duration = Duration::from_millis(20);

/// The devices of the lab `up` is starting in `work_dir`, read with one `netlab inspect`
/// as soon as the snapshot `up` writes before it deploys is there and has not changed for
/// one look ([`SNAPSHOT_LOOK`]), with the snapshot's size and time then; `None` when `up`
/// ended first or the inspect failed. On a real host the deploy takes far longer than the
/// inspect (a Python start of about half a second), which so costs nothing. The inspect is
/// killed when `up` failed.
fn early_devices(
    netlab: &dyn Driver,
    work_dir: &Path,
    up_ended: &AtomicBool,
    up_failed: &AtomicBool,
) -> Option<(Vec<Device>, SnapshotStamp)> {
    let mut last = None;
    let seen = loop {
        if up_ended.load(Ordering::SeqCst) {
            return None;
        }
        let now = snapshot_stamp(work_dir);
        if now.is_some() && now == last {
            break now?;
        }
        last = now;
        // Woken early when `up` ends.
        std::thread::park_timeout(SNAPSHOT_LOOK);
    };
    match netlab.devices_early(work_dir, up_failed) {
        Ok(devices) => Some((devices, seen)),
        Err(NetlabError::Cancelled) => None,
        Err(e) => {
            log::debug!(
                "reading the devices while netlab up runs failed (read again after it): {}",
                crate::lab::netlab::for_log(&e)
            );
            None
        }
    }
}

/// A start's log lines and events: begun, then failed or started, each naming the session,
/// the slot, the topology and how long it took.
struct StartEvents<'a> {
    shared: &'a Shared,
    job: &'a StartJob,
    session: SessionId,
    info: Arc<ClientInfo>,
    topology: String,
    hash: String,
    started: Instant,
}

impl<'a> StartEvents<'a> {
    fn begin(shared: &'a Shared, job: &'a StartJob, session: SessionId) -> Self {
        let hash = record::hex(&job.hash)[..12].to_owned();
        log::info!(
            "starting lab {} ({hash}) for session {session} in slot {} (netlab instance {})",
            job.topology.display(),
            job.lab_slot + 1,
            record::instance_name(job.instance)
        );
        let events = StartEvents {
            shared,
            job,
            session,
            info: shared.client_info(&session),
            topology: file_name(&job.topology),
            hash,
            started: Instant::now(),
        };
        events.emit("lab_start_begun", json!({}));
        events
    }

    fn emit(&self, kind: &str, more: serde_json::Value) {
        let mut fields = json!({
            "slot": self.job.lab_slot + 1,
            "topology": self.topology,
            "hash": self.hash,
        });
        if let (Some(fields), serde_json::Value::Object(more)) = (fields.as_object_mut(), more) {
            fields.extend(more);
        }
        self.shared.events.emit(
            kind,
            events::with(
                who(
                    &self.session,
                    self.info.name.as_deref(),
                    self.info.owner.as_deref(),
                ),
                fields,
            ),
        );
    }

    fn failed(&self, status: u16, error: &str) {
        self.emit(
            "lab_start_failed",
            json!({
                "status": status,
                "duration_s": self.started.elapsed().as_secs_f64(),
                "error": error,
            }),
        );
    }

    fn started(&self, devices: usize) {
        log::info!(
            "lab {} is up with {devices} {} after {:.1} s",
            self.job.topology.display(),
            crate::core::state::plural(devices, "device", "devices"),
            self.started.elapsed().as_secs_f64()
        );
        self.emit(
            "lab_started",
            json!({
                "duration_s": self.started.elapsed().as_secs_f64(),
                "devices": devices,
            }),
        );
    }
}

/// A health check: while the host is unhealthy, `--health-topology` is started with no
/// session (in a work dir of its own under `labs/`, in the first slot's netlab instance)
/// and torn down again. A success makes the host healthy; a failure that counts against the
/// host is counted like a start's and names netlab's latest words. Put off while any slot
/// has a lab running or starting: the next one comes an interval later.
fn health_check(shared: &Shared, netlab: &dyn Driver, slot: usize) {
    let Some(source) = &shared.config.health_topology else {
        return;
    };
    if shared.host.unhealthy().is_none() || shared.is_shutting_down() {
        return;
    }
    let (busy, instance) = {
        let state = shared.lock();
        let busy = state
            .slots
            .iter()
            .any(|s| s.lab.is_some() || s.starting.is_some());
        (busy, state.slots.get(slot).and_then(|s| s.instance))
    };
    if busy {
        log::info!("health check put off: a lab is running or starting");
        return;
    }
    let started = Instant::now();
    let topology_name = file_name(source);
    let work_dir = shared
        .labs_dir
        .join(format!("health-{}", uuid::Uuid::new_v4()));
    let topology = work_dir.join(&topology_name);
    let report = |success: bool, error: Option<&str>| {
        METRICS.health_check(success);
        shared.events.emit(
            "health_check",
            json!({
                "topology": topology_name,
                "success": success,
                "duration_s": started.elapsed().as_secs_f64(),
                "error": error,
            }),
        );
    };
    if let Err(e) =
        std::fs::create_dir_all(&work_dir).and_then(|()| std::fs::copy(source, &topology))
    {
        let error = format!(
            "cannot copy {} into {}: {e}",
            source.display(),
            work_dir.display()
        );
        log::error!("health check: {error}");
        remove_dir(&work_dir);
        report(false, Some(&error));
        return;
    }
    log::info!("health check: starting {}", source.display());
    let lab_log = shared.lab_log(slot);
    lab_log.begin(Job::Up);
    let outcome = match clear_instance(netlab, &shared.config, instance) {
        Err(why) => Err((true, why)),
        Ok(()) => netlab
            .up(&topology, instance, shared.shutdown_flag(), &|_| {})
            .and_then(|()| netlab.devices(&work_dir))
            .map(|devices| devices.len())
            .map_err(|e| (e.counts_against_host(), e.to_string())),
    };
    lab_log.end();
    lab_log.begin(Job::Down);
    let down = netlab.tear_down(&work_dir, outcome.is_err(), instance);
    lab_log.end();
    match down {
        Ok(()) => remove_dir(&work_dir),
        Err(e) => shared.teardown_failed(
            &Teardown::of_failed_start(&work_dir, Some(&topology), [0; 32], instance),
            e.to_string(),
        ),
    }
    match outcome {
        Ok(devices) => {
            log::info!(
                "health check: {} came up with {devices} {} in {:.1} s",
                topology_name,
                crate::core::state::plural(devices, "device", "devices"),
                started.elapsed().as_secs_f64()
            );
            report(true, None);
            shared.start_succeeded("health_check");
        }
        Err((counts, error)) => {
            log::warn!(
                "health check: {topology_name} failed: {}",
                crate::lab::netlab::for_log(&error)
            );
            report(false, Some(&error));
            if counts {
                shared.start_failed(&error);
            }
        }
    }
}

/// After `up` of a multilab instance: netlab must register the slot's id in the work dir
/// (`status --all`), or the start failed.
fn registered(netlab: &dyn Driver, job: &StartJob) -> Result<(), NetlabError> {
    let Some(id) = job.instance else {
        return Ok(());
    };
    let dir = netlab.instance_dir(&job.work_dir, Some(id))?;
    if dir.as_deref() == Some(job.work_dir.as_path()) {
        return Ok(());
    }
    Err(NetlabError::Failed {
        command: "up".into(),
        exit: "exited 0 but failed".into(),
        output: match dir {
            Some(other) => format!(
                "netlab status --all registers instance {id} in {}, not in {}",
                other.display(),
                job.work_dir.display()
            ),
            None => format!("netlab status --all does not register instance {id}"),
        },
    })
}

/// Tears down netlab's `instance` (`default` for `None`) if it is in this server's `labs/`
/// (a lab we lost track of), or anywhere with `--cleanup-foreign`. One in another directory
/// belongs to someone else (another server, a person at the shell): it is left alone, and
/// the reason is returned. A registration whose directory is gone is cleared either way.
pub fn clear_instance(
    netlab: &dyn Driver,
    config: &crate::config::Config,
    instance: Option<u16>,
) -> Result<(), String> {
    let labs = config.state_dir.join("labs");
    let name = record::instance_name(instance);
    let dir = match netlab.instance_dir(&config.state_dir, instance) {
        Ok(Some(dir)) => dir,
        Ok(None) => return Ok(()),
        Err(e) => {
            log::warn!("cannot tell where netlab's instance {name} is: {e}");
            return Ok(());
        }
    };
    let ours = crate::store::statedir::is_work_dir(&labs, &dir);
    if ours || config.cleanup_foreign || !dir.exists() {
        if let Err(e) = netlab.cleanup_instance(&config.state_dir, instance) {
            log::error!(
                "cannot clear netlab's '{name}' instance: {}",
                crate::lab::netlab::for_log(&e)
            );
        }
        return Ok(());
    }
    Err(format!(
        "netlab's instance '{name}' is running in {}, outside this server's {}: \
         not touching it (tear it down there, or start the server with --cleanup-foreign)",
        crate::logging::escape(&dir.to_string_lossy()),
        labs.display()
    ))
}

/// Ends a start in slot `slot`: the lab (if one came up and its session is still ACTIVE,
/// and the server is not shutting down) becomes the slot's running lab, held by that
/// session; the start is no longer in progress. Durable when this returns (the caller then
/// frees the acquire slot by dropping it). Returns (session still active, lab stored).
fn finish_start(
    shared: &Shared,
    ticket: &Ticket,
    slot: usize,
    lab: Option<LabRecord>,
) -> Result<(bool, bool), NotPersisted> {
    let session = &ticket.session;
    let (active, stored, version) = {
        let mut state = shared.lock();
        let active = matches!(state.queue.lookup(session), Some((Status::Active, _)));
        let stored = lab.is_some() && active && !shared.is_shutting_down();
        if let Some(s) = state.slots.get_mut(slot) {
            if stored {
                s.lab = lab;
                s.holder = Some(*session);
                s.lab_started_ms = Some(now_ms());
                s.last_used_ms = now_ms();
            } else if s.lab.is_none() {
                s.holder = None;
            }
            s.starting = None;
        }
        (active, stored, state.changed())
    };
    shared.persist(version).map(|()| (active, stored))
}

fn log_failure(job: &StartJob, e: &NetlabError) {
    match e {
        NetlabError::Rejected(_) => log::warn!(
            "lab {}: {}",
            job.topology.display(),
            crate::lab::netlab::for_log(&e.to_string())
        ),
        NetlabError::Cancelled => log::warn!(
            "start of {} cut short by the shutdown",
            job.topology.display()
        ),
        _ => log::error!(
            "lab {}: {}",
            job.topology.display(),
            crate::lab::netlab::for_log(&e.to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::core::clock::{Clock, FakeClock};
    use crate::http::reply::Responder;
    use crate::store::persist::Starting;

    /// A netlab whose first `up` panics (a bug in the start path); the next ones work.
    #[derive(Default)]
    struct PanicsOnce {
        ups: AtomicUsize,
        downs: AtomicUsize,
    }

    impl Driver for PanicsOnce {
        fn up(
            &self,
            _: &Path,
            _: Option<u16>,
            _: &AtomicBool,
            _: &dyn Fn(u32),
        ) -> Result<(), NetlabError> {
            if self.ups.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a bug in the start path");
            }
            Ok(())
        }
        fn devices(&self, _: &Path) -> Result<Vec<Device>, NetlabError> {
            Ok(vec![Device {
                name: "r1".into(),
                raw: json!({"name": "r1"}),
            }])
        }
        fn tear_down(&self, _: &Path, _: bool, _: Option<u16>) -> Result<(), NetlabError> {
            self.downs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn instance_dir(&self, _: &Path, _: Option<u16>) -> Result<Option<PathBuf>, NetlabError> {
            Ok(None)
        }
        fn cleanup_instance(&self, _: &Path, _: Option<u16>) -> Result<(), NetlabError> {
            Ok(())
        }
    }

    /// What the upload thread does before it hands a start over: takes the slot, records
    /// the start, and sends the job with the client's responder.
    fn send_start(shared: &Arc<Shared>, session: uuid::Uuid) -> crossbeam_channel::Receiver<Reply> {
        let slot = shared.take_slot(session).expect("the slot is free");
        let work_dir = shared
            .labs_dir
            .join(format!("lab-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&work_dir).unwrap();
        let topology = work_dir.join("topology.yml");
        let version = {
            let mut state = shared.lock();
            state.slots[0].holder = Some(session);
            state.slots[0].starting = Some(Starting {
                session,
                work_dir: work_dir.clone(),
                pgid: None,
                instance: None,
            });
            state.changed()
        };
        shared.persist(version).unwrap();
        let request = tiny_http::TestRequest::new()
            .with_method(tiny_http::Method::Post)
            .with_path("/lab")
            .into();
        let (responder, replies) = Responder::capture(request);
        shared.send_lab_job(LabJob::Start(Box::new(StartJob {
            slot,
            lab_slot: 0,
            instance: None,
            responder,
            hash: [7; 32],
            work_dir,
            topology,
            began: Instant::now(),
        })));
        replies
    }

    #[test]
    fn a_panic_in_a_start_answers_500_frees_the_slot_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::defaults(dir.path().to_path_buf());
        config.active_timeout = Duration::from_secs(60);
        let clock = Arc::new(FakeClock::new());
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new(config, clock.clone(), tx));
        let session = uuid::Uuid::new_v4();
        shared.lock().queue.create(session, clock.now()).unwrap();
        let driver = Arc::new(PanicsOnce::default());
        let lab_thread = {
            let (shared, driver) = (Arc::clone(&shared), Arc::clone(&driver));
            std::thread::spawn(move || run(&shared, &*driver, rx, 0))
        };
        let wait = Duration::from_secs(10);

        // The panic: the client gets our JSON 500, not tiny_http's bare one.
        let reply = send_start(&shared, session).recv_timeout(wait).unwrap();
        assert_eq!(reply.status, 500);
        let body: serde_json::Value =
            serde_json::from_slice(reply.body.as_deref().unwrap()).unwrap();
        assert_eq!(body, json!({"detail": "internal error"}));
        // The half-made start became a teardown, carried out by the same thread.
        let deadline = Instant::now() + wait;
        while driver.downs.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(driver.downs.load(Ordering::SeqCst), 1);
        assert!(shared.lock().slots[0].starting.is_none());

        // The same session's next POST /lab gets the slot and its lab.
        let reply = send_start(&shared, session).recv_timeout(wait).unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.body.as_deref(),
            Some(&br#"{"reused":false,"devices":[{"name":"r1","raw":{"name":"r1"}}]}"#[..])
        );
        assert!(shared.lock().acquiring().is_none());

        // And it can be reaped again: nothing keeps it busy.
        clock.advance(Duration::from_secs(61));
        assert_eq!(shared.sweep(), 1);
        assert!(shared.lock().queue.is_empty());

        shared.send_lab_job(LabJob::Shutdown);
        lab_thread.join().unwrap();
    }
}
