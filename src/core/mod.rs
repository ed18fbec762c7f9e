//! The shared state behind one lock, the session queue, the clock, long-poll parking and the timer.

pub mod auth;
pub mod clock;
pub mod host;
pub mod longpoll;
pub mod queue;
pub mod schedule;
pub mod state;
pub mod timer;
