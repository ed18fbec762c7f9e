//! `remote-lab`: the command-line client of neops-remote-lab.
//!
//! `remote-lab run [OPTIONS] -- COMMAND [ARGS…]` joins the queue on the best lab hosts,
//! keeps the first session that becomes active, keeps it alive with heartbeats, starts (or
//! reuses) the lab, runs the command with the lab's devices in its environment, and
//! releases the lab and ends the session however the command ends. `remote-lab status`
//! shows each host's state and queue.
//!
//! One module per command (`run`, `status`); `flags` is the command line, `api` the typed
//! calls on one host, `netrc` the credentials file, `term` what may reach the terminal,
//! `child` the command. Blocking HTTP (ureq), a few threads, no async runtime; the bodies
//! are the types of `neops_remote_lab::protocol`, shared with the server.
#![forbid(unsafe_code)]

mod api;
mod child;
mod flags;
mod netrc;
mod run;
mod status;
mod term;

use std::ffi::OsString;

use flags::Cli;

/// The command line was wrong.
pub const EX_USAGE: i32 = 64;
/// netlab rejected the topology (422).
pub const EX_DATAERR: i32 = 65;
/// No lab host reachable, or every one refused a session.
pub const EX_UNAVAILABLE: i32 = 69;
/// Any other failure to start the lab (409, 500, 504, …).
pub const EX_SOFTWARE: i32 = 70;
/// The wait timed out, or the session was lost.
pub const EX_TEMPFAIL: i32 = 75;
/// Every host that answered rejected the credentials.
pub const EX_NOPERM: i32 = 77;

fn main() {
    std::process::exit(real_main(std::env::args_os().skip(1).collect()));
}

/// A message of remote-lab's own on stderr (what it quotes of a server is cleaned first).
pub fn say(message: impl std::fmt::Display) {
    eprintln!("remote-lab: {message}");
}

fn real_main(args: Vec<OsString>) -> i32 {
    match flags::parse(args) {
        Ok(Cli::Help) => {
            print!("{}", flags::help());
            0
        }
        Ok(Cli::Version) => {
            println!("remote-lab {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Cli::Run(args)) => run::run(args),
        Ok(Cli::Status(common, json)) => status::status(&common, json),
        Ok(Cli::ExecChild(parent, command)) => child::exec_child(parent, &command),
        Err(message) => {
            say(format!("{message}\nTry 'remote-lab --help'."));
            EX_USAGE
        }
    }
}
