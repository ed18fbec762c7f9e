//! What the server shows of itself: events, metrics, netlab's live output, the status page, the queue view.

pub mod events;
pub mod lablog;
pub mod metrics;
pub mod status_page;
