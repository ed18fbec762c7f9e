//! neops-remote-lab: exclusive, queued access to the one network lab a host can run.
//!
//! The server binary calls [`server::main`]; the `remote-lab` client uses [`protocol`]; the
//! integration tests reach [`upload`] (its property tests) and [`procgroup`] (to check what
//! a crashed server leaves). Everything
//! else is private to the crate. The modules, from the request's edge inwards (a module
//! uses only modules further down this list; `docs/design.md` says why the threads are
//! as they are):
//!
//! * [`server`]: start-up, the threads, shutdown, `cleanup` and `reload`.
//! * `api`: the route table and one handler per operation.
//! * `acquire`: `POST /lab` from the gate to the lab thread, the upload on its own thread.
//! * `lab_thread`: the one thread that runs netlab.
//! * `timer`: the stale-session sweep, teardown retries, long-poll deadlines, the watchdog.
//! * `observe`: the read-only views (`/queue`, `/events`, `/lab/log`, `/metrics`, `/`);
//!   `status_page` renders the page.
//! * `openapi`: the schemas and the operations' documentation.
//! * `http`: the listener thread and the worker pool; knows nothing of the API.
//! * `state`: the shared state behind one mutex, the gate, the acquire slot, the lab jobs.
//! * `longpoll`: parked `GET /session/{id}?wait=S` requests.
//! * `persist`: the state file that lets a restart lose nothing.
//! * `reply`: replies, and the responder that answers each request exactly once.
//! * `netlab`: the netlab commands, on `runner` (a process in its own group, output
//!   bounded, timeout and cancel); [`procgroup`]: signals that reach only our groups.
//! * `queue` (sessions, FIFO), `lab` (lab record, acquire decisions), `auth` (tokens,
//!   callers, throttle), `events`, `lablog`, `metrics`, `config`, `clock`, `listener`,
//!   `statedir`, `lockfile`, `logging`, `notify`, [`upload`].
//! * [`protocol`]: the API's bodies, header names and the `X-Client-Name` encoding, shared
//!   with the `remote-lab` client; it uses nothing else of the crate.
#![forbid(unsafe_code)]

mod acquire;
mod api;
mod auth;
mod clock;
mod config;
mod events;
mod http;
mod lab;
mod lab_thread;
mod lablog;
mod listener;
mod lockfile;
mod logging;
mod longpoll;
mod metrics;
mod netlab;
mod notify;
mod observe;
mod openapi;
mod persist;
pub mod procgroup;
pub mod protocol;
mod queue;
mod reply;
mod runner;
pub mod server;
mod state;
mod statedir;
mod status_page;
mod timer;
pub mod upload;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The modules each module of `src/` names (`use crate::…`, `crate::…::` paths, doc
    /// links included).
    fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut sources = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
                sources.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
        let word = |text: &str| -> String {
            text.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut graph = BTreeMap::new();
        for (name, text) in &sources {
            let mut uses = BTreeSet::new();
            for (i, _) in text.match_indices("crate::") {
                let rest = &text[i + "crate::".len()..];
                let names: Vec<String> = match rest.strip_prefix('{') {
                    Some(group) => group[..group.find('}').unwrap_or(0)]
                        .split(',')
                        .map(|item| word(item.trim()))
                        .collect(),
                    None => vec![word(rest)],
                };
                uses.extend(
                    names
                        .into_iter()
                        .filter(|n| n != name && sources.contains_key(n)),
                );
            }
            graph.insert(name.clone(), uses);
        }
        graph
    }

    #[test]
    fn the_modules_depend_on_each_other_without_a_cycle() {
        let graph = module_graph();
        assert!(graph.len() > 20, "{graph:?}");
        // Kahn: take away the modules that use nothing left; a cycle is what remains.
        let mut left = graph.clone();
        while let Some(leaf) = left
            .iter()
            .find(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(name, _)| name.clone())
        {
            left.remove(&leaf);
        }
        assert!(left.is_empty(), "modules in a cycle: {left:?}");
    }
}
