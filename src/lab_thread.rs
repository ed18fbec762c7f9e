//! The lab thread: the one thread that runs netlab. Jobs (start, teardown) come over a channel
//! and run one at a time, in order, so starts and teardowns never overlap and a start queued
//! behind a teardown waits for it. A start carries the client's request; this thread answers
//! it when netlab is done, so no worker ever waits for netlab.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::Receiver;
use tiny_http::Request;

use serde_json::json;

use crate::acquire::{self, Ticket};
use crate::config::OnExit;
use crate::events::{self, now_ms, who};
use crate::http::{Reply, answer};
use crate::lab::{self, Hash, LabRecord, Teardown};
use crate::lablog::Job;
use crate::metrics::{METRICS, start_outcome};
use crate::netlab::{Netlab, NetlabError};
use crate::persist::NotPersisted;
use crate::queue::Status;
use crate::state::Shared;
use crate::state::file_name;
use crate::upload::remove_dir;

/// A validated, stored upload waiting for `netlab up`.
#[derive(Debug)]
pub struct StartJob {
    pub ticket: Ticket,
    pub hash: Hash,
    pub work_dir: PathBuf,
    /// The topology file inside `work_dir`.
    pub topology: PathBuf,
    /// When the `POST /lab` passed the gate.
    pub began: Instant,
}

pub enum LabJob {
    Start(StartJob, Request),
    Teardown(Teardown),
    /// Finish the queued jobs, tear the running lab down and stop.
    Shutdown,
}

impl fmt::Debug for LabJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabJob::Start(job, _) => write!(f, "start of {}", job.topology.display()),
            LabJob::Teardown(t) => write!(f, "teardown of {}", t.lab.topology.display()),
            LabJob::Shutdown => f.write_str("shutdown"),
        }
    }
}

pub fn run(shared: &Shared, netlab: &Netlab, jobs: Receiver<LabJob>) {
    for job in jobs.iter() {
        let stop = matches!(job, LabJob::Shutdown);
        let description = format!("{job:?}");
        let result = catch_unwind(AssertUnwindSafe(|| match job {
            LabJob::Start(job, request) => {
                let began = job.began;
                shared.lab_log.begin(Job::Up);
                let reply = start(shared, netlab, job);
                shared.lab_log.end();
                METRICS.acquisition(start_outcome(reply.status), Some(began.elapsed()));
                answer(request, reply);
            }
            LabJob::Teardown(t) => match observed_teardown(shared, netlab, &t) {
                Ok(()) => shared.teardown_done(t.work_dir()),
                Err(e) => shared.teardown_failed(&t, e),
            },
            LabJob::Shutdown => shut_down(shared, netlab),
        }));
        if result.is_err() {
            log::error!("the lab thread panicked during the {description}; going on");
        }
        if stop {
            break;
        }
    }
}

/// The last job: tear the running lab down, unless `--on-exit keep` leaves it for the next
/// start to adopt (the state file already says everything about it).
fn shut_down(shared: &Shared, netlab: &Netlab) {
    if shared.config.on_exit == OnExit::Keep {
        if let Some(lab) = &shared.lock().lab {
            log::info!(
                "shutting down: keeping the lab {} (ref_count {}) for the next start",
                lab.topology.display(),
                lab.ref_count
            );
        }
        return;
    }
    let running = shared.lock().lab.clone();
    if let Some(lab) = running {
        log::info!("shutting down: tearing down the running lab");
        let t = Teardown::new(lab, false);
        let result = observed_teardown(shared, netlab, &t);
        let version = {
            let mut state = shared.lock();
            state.lab = None;
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
pub fn teardown(netlab: &Netlab, t: &Teardown) -> Result<(), String> {
    let started = Instant::now();
    netlab
        .tear_down(t.work_dir(), t.force)
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
fn observed_teardown(shared: &Shared, netlab: &Netlab, t: &Teardown) -> Result<(), String> {
    let started = Instant::now();
    let topology = file_name(&t.lab.topology);
    shared.lab_log.begin(Job::Down);
    shared
        .events
        .emit("teardown_begun", json!({ "topology": topology }));
    let result = teardown(netlab, t);
    shared.lab_log.end();
    shared.events.emit(
        "teardown_done",
        json!({
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
fn discard(shared: &Shared, netlab: &Netlab, job: &StartJob) {
    let t = Teardown::of_failed_start(&job.work_dir, Some(&job.topology), job.hash);
    match netlab.tear_down(&job.work_dir, true) {
        Ok(()) => remove_dir(&job.work_dir),
        Err(e) => shared.teardown_failed(&t, e.to_string()),
    }
}

fn start(shared: &Shared, netlab: &Netlab, job: StartJob) -> Reply {
    if shared.is_shutting_down() {
        remove_dir(&job.work_dir);
        let _ = finish_start(shared, &job.ticket, None);
        return Reply::detail(503, "Server is shutting down");
    }
    let started = Instant::now();
    log::info!(
        "starting lab {} ({}) for session {}",
        job.topology.display(),
        &lab::hex(&job.hash)[..12],
        job.ticket.session
    );
    let info = shared.client_info(&job.ticket.session);
    let topology = file_name(&job.topology);
    let hash = lab::hex(&job.hash)[..12].to_owned();
    shared.events.emit(
        "lab_start_begun",
        events::with(
            who(&job.ticket.session, &info),
            json!({ "topology": topology, "hash": hash }),
        ),
    );
    let start_failed = |status: u16, error: &str| {
        shared.events.emit(
            "lab_start_failed",
            events::with(
                who(&job.ticket.session, &info),
                json!({
                    "topology": topology,
                    "hash": hash,
                    "status": status,
                    "duration_s": started.elapsed().as_secs_f64(),
                    "error": error,
                }),
            ),
        );
    };
    // Whatever netlab still registers as `default` (a lab we lost track of) would make
    // `up` fail: clear it first, if it is ours; another's is left alone and refused.
    if let Err(why) = clear_default(netlab, &shared.config) {
        log::warn!("lab {}: {why}", job.topology.display());
        remove_dir(&job.work_dir);
        let _ = finish_start(shared, &job.ticket, None);
        return Reply::detail(409, why);
    }
    // The up's process group goes into the start record, so that a restart after a crash
    // can kill what is left of it before cleaning up.
    let record_group = |pgid: u32| {
        let version = {
            let mut state = shared.lock();
            match state.starting.as_mut() {
                Some(start) if start.work_dir == job.work_dir => start.pgid = Some(pgid),
                _ => return,
            }
            state.changed()
        };
        shared.persist_quietly(version);
    };
    let result = netlab
        .up(&job.topology, shared.shutdown_flag(), &record_group)
        .and_then(|()| netlab.devices(&job.work_dir));
    let devices = match result {
        Ok(devices) => devices,
        Err(e) => {
            log_failure(&job, &e);
            start_failed(e.status(), &e.to_string());
            discard(shared, netlab, &job);
            let _ = finish_start(shared, &job.ticket, None);
            return Reply::detail(e.status(), e.to_string());
        }
    };
    let devices_json = lab::devices_json(&devices);
    let record = LabRecord {
        hash: job.hash,
        work_dir: job.work_dir.clone(),
        topology: job.topology.clone(),
        ref_count: 1,
        devices_json: devices_json.clone(),
    };
    let (active, stored) = match finish_start(shared, &job.ticket, Some(record)) {
        Ok(done) => done,
        Err(e) => {
            // Not recorded, so not kept: a lab nobody knows of would outlive a restart.
            log::error!(
                "lab {} came up but cannot be recorded: tearing it down again",
                job.topology.display()
            );
            discard(shared, netlab, &job);
            let version = {
                let mut state = shared.lock();
                state.starting = None;
                state.changed()
            };
            shared.persist_quietly(version);
            return crate::api::not_persisted(&e);
        }
    };
    if !stored {
        if active {
            start_failed(503, "the server is shutting down");
        } else {
            start_failed(404, "the session ended while its lab was starting");
        }
        discard(shared, netlab, &job);
        return if active {
            log::warn!("the server is shutting down: tearing the new lab down again");
            Reply::detail(503, "Server is shutting down")
        } else {
            log::warn!(
                "session {} ended while its lab was starting: tore the new lab down",
                job.ticket.session
            );
            Reply::detail(404, "Session not found")
        };
    }
    log::info!(
        "lab {} is up with {} {} after {:.1} s",
        job.topology.display(),
        devices.len(),
        crate::state::plural(devices.len(), "device", "devices"),
        started.elapsed().as_secs_f64()
    );
    shared.events.emit(
        "lab_started",
        events::with(
            who(&job.ticket.session, &info),
            json!({
                "topology": topology,
                "hash": hash,
                "duration_s": started.elapsed().as_secs_f64(),
                "devices": devices.len(),
            }),
        ),
    );
    Reply::raw_json(
        200,
        format!("{{\"reused\":false,\"devices\":{devices_json}}}"),
    )
}

/// Tears down netlab's `default` instance if it is in this server's `labs/` (a lab we lost
/// track of), or anywhere with `--cleanup-foreign`. One in another directory belongs to
/// someone else (another server, a person at the shell): it is left alone, and the reason
/// is returned. A registration whose directory is gone is cleared either way.
pub fn clear_default(netlab: &Netlab, config: &crate::config::Config) -> Result<(), String> {
    let labs = config.state_dir.join("labs");
    let dir = match netlab.default_instance_dir(&config.state_dir) {
        Ok(Some(dir)) => dir,
        Ok(None) => return Ok(()),
        Err(e) => {
            log::warn!("cannot tell where netlab's default instance is: {e}");
            return Ok(());
        }
    };
    let ours = crate::statedir::is_work_dir(&labs, &dir);
    if ours || config.cleanup_foreign || !dir.exists() {
        if let Err(e) = netlab.cleanup_default(&config.state_dir) {
            log::error!(
                "cannot clear netlab's 'default' instance: {}",
                crate::netlab::for_log(&e)
            );
        }
        return Ok(());
    }
    Err(format!(
        "netlab's instance 'default' is running in {}, outside this server's {}: \
         not touching it (tear it down there, or start the server with --cleanup-foreign)",
        crate::logging::escape(&dir.to_string_lossy()),
        labs.display()
    ))
}

/// Ends a start: the lab (if one came up and its session is still the active one, and the
/// server is not shutting down) becomes the running lab; the start is no longer in
/// progress. Durable when this returns. Returns (session still active, lab stored).
fn finish_start(
    shared: &Shared,
    ticket: &Ticket,
    lab: Option<LabRecord>,
) -> Result<(bool, bool), NotPersisted> {
    let session = &ticket.session;
    let (active, stored, version) = {
        let mut state = shared.lock();
        let active = matches!(state.queue.lookup(session), Some((Status::Active, _)));
        let stored = lab.is_some() && active && !shared.is_shutting_down();
        if stored {
            state.lab = lab;
            state.lab_started_ms = Some(now_ms());
        }
        state.starting = None;
        (active, stored, state.changed())
    };
    let persisted = shared.persist(version);
    acquire::finish(shared, ticket);
    persisted.map(|()| (active, stored))
}

fn log_failure(job: &StartJob, e: &NetlabError) {
    match e {
        NetlabError::Rejected(_) => log::warn!(
            "lab {}: {}",
            job.topology.display(),
            crate::netlab::for_log(&e.to_string())
        ),
        NetlabError::Cancelled => log::warn!(
            "start of {} cut short by the shutdown",
            job.topology.display()
        ),
        _ => log::error!(
            "lab {}: {}",
            job.topology.display(),
            crate::netlab::for_log(&e.to_string())
        ),
    }
}
