//! The HTTP edge: the listening socket, the listener thread and worker pool, and the responder. Knows nothing of the API.

pub mod listener;
pub mod pool;
pub mod reply;
