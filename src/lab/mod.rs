//! netlab and the lab itself: the lab record and its decisions, the netlab commands, the process runner, process groups, the upload.

pub mod netlab;
pub mod procgroup;
pub mod record;
pub mod runner;
pub mod upload;
