//! The timer thread: every `--sweep-interval` it reaps stale sessions. It only decides (under
//! the state lock) and queues teardowns; it never runs netlab itself.

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::state::Shared;

/// Runs until `stop` receives a message or is disconnected.
pub fn run(shared: &Shared, stop: Receiver<()>) {
    loop {
        match stop.recv_timeout(shared.config.sweep_interval) {
            Err(RecvTimeoutError::Timeout) => {
                shared.sweep();
            }
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
