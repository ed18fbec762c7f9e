//! The API: the route table and its handlers, `POST /lab` and the lab thread.

pub mod acquire;
pub mod lab_thread;
pub mod observe;
pub mod openapi;
pub mod routes;
