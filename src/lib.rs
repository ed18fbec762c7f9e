//! neops-remote-lab: exclusive, queued access to the one network lab a host can run.
//!
//! The binary is a thin wrapper around [`server::main`]; everything else lives here so that
//! tests can reach it. Module map:
//!
//! * [`config`]: command line and environment.
//! * [`auth`]: access tokens, who a request is, and the throttle of failed attempts.
//! * [`clock`]: the time source (a fake one for tests).
//! * [`queue`]: sessions and the FIFO queue (pure).
//! * [`lab`]: the lab record and the acquire decisions (pure).
//! * [`state`]: the shared state behind one mutex, and the operations that change it.
//! * [`http`]: listener thread, worker pool, replies and routing.
//! * [`listener`]: the listening socket with connection timeouts, and the watch on it.
//! * [`api`]: one handler per endpoint.
//! * [`acquire`]: `POST /lab` from the gate to the lab thread, uploads on their own threads.
//! * [`upload`]: the multipart upload of `POST /lab`.
//! * [`netlab`]: the netlab CLI driver.
//! * [`lab_thread`]: the one thread that runs netlab.
//! * [`procgroup`]: signals that reach only the process groups they are meant for.
//! * [`runner`]: runs a command in its own process group, bounded in time and output.
//! * [`longpoll`]: `GET /session/{id}?wait=S`, parked without a worker.
//! * [`timer`]: the stale-session sweep and the systemd watchdog.
//! * [`persist`]: the state file that lets a restart lose nothing.
//! * [`observe`]: the read-only views (`/queue`, `/events`, `/lab/log`, `/metrics`, `/`).
//! * [`events`]: the event history (`GET /events`, `events.jsonl`).
//! * [`lablog`]: netlab's live output (`GET /lab/log`).
//! * [`metrics`]: counters and histograms for `GET /metrics`.
//! * [`status_page`]: the HTML status page at `GET /`.
//! * [`statedir`]: the state directory is ours alone; links are never followed.
#![forbid(unsafe_code)]

pub mod acquire;
pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod events;
pub mod http;
pub mod lab;
pub mod lab_thread;
pub mod lablog;
pub mod listener;
pub mod lockfile;
pub mod logging;
pub mod longpoll;
pub mod metrics;
pub mod netlab;
pub mod notify;
pub mod observe;
pub mod openapi;
pub mod persist;
pub mod procgroup;
pub mod queue;
mod runner;
pub mod server;
pub mod state;
pub mod statedir;
pub mod status_page;
pub mod timer;
pub mod upload;
