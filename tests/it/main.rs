//! The integration tests, in one binary (as ripgrep does): the harness in `common` is
//! compiled once, and the tests of every module share one run of the test harness (so slow
//! tests that mostly wait overlap with the others).
//!
//! Each module is a part of the contract, tested against the real binary
//! (`CARGO_BIN_EXE_neops-remote-lab`) with the fake netlab (`tests/fake-netlab/netlab`);
//! `upload_props` alone calls the library (`neops_remote_lab::lab::upload`).

mod common;

mod auth;
mod docs;
mod fleet;
mod hostile;
mod lab;
mod lifecycle;
mod longpoll;
mod notify;
mod observe;
mod promises;
// `remote-lab`, the client, is built only with the `client` feature (on by default).
#[cfg(feature = "client")]
mod remote_lab;
mod restart;
mod runbook;
mod schedule;
mod sessions;
mod slots;
mod upload_props;
