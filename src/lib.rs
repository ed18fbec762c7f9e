//! neops-remote-lab: exclusive, queued access to the network labs a host can run.
//!
//! The server binary calls [`server::main`]; the integration tests reach
//! [`lab::upload`] (its property tests) and [`lab::procgroup`] (to check what a crashed
//! server leaves); the `remote-lab` client uses [`protocol`]. Everything else is private to
//! the crate.
//!
//! The folders are floors: a module uses only modules of its own folder or of a floor
//! below it, never one above (the test at the bottom of this file checks it). From the top:
//!
//! 1. [`server`]: start-up, the threads, shutdown, `cleanup` and `reload`; below it `ctl`:
//!    `drain` and `resume`, which ask the running server over HTTP.
//! 2. `api/`: the route table (`routes`) and its handlers, `openapi`, `acquire` (`POST /lab`
//!    up to the lab thread), `observe` (the read-only views), `lab_thread` (the thread that
//!    runs netlab).
//! 3. `core/`: `state` (the shared state behind one mutex, the gate, the acquire slot, the
//!    lab jobs), `queue` (sessions in the order they are served), `schedule` (who goes next, which idle lab goes: pure), `auth` (tokens, callers, throttle),
//!    `host` (draining, health), `clock`,
//!    `longpoll` (parked long-polls), `timer`.
//! 4. `store/`: `persist` (the state file), `session` (a session as the file keeps it),
//!    `drain` (the drain file),
//!    `statedir`, `lockfile`.
//! 5. `http/`: `listener` (our listening socket), `pool` (listener thread and workers),
//!    `reply` (replies, and the responder that answers each request exactly once); and, on
//!    the same floor, `lab/`: `record` (the lab record, acquire decisions), `netlab` (the
//!    commands), `runner` (a process in its own group, output bounded, timeout and cancel),
//!    [`lab::procgroup`] (signals that reach only our groups), [`lab::upload`].
//! 6. `observe/`: `events`, `metrics`, `lablog` (netlab's live output), `status_page`.
//! 7. `config`, `logging`, `notify`, [`protocol`] (the API's bodies, header names and the
//!    `X-Client-Name` encoding, shared with the `remote-lab` client; it uses nothing else of
//!    the crate).
//!
//! `docs/design.md` says why the threads are as they are.
#![forbid(unsafe_code)]

mod api;
mod config;
mod core;
mod ctl;
mod http;
pub mod lab;
mod logging;
mod notify;
mod observe;
pub mod protocol;
pub mod server;
mod store;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The floors, top first: a module may use modules of its own floor or of floors below.
    /// Names are folders (`api`) or single files (`config`) under `src/`.
    const FLOORS: &[&[&str]] = &[
        &["server"],
        &["ctl"],
        &["api"],
        &["core"],
        &["store"],
        &["http", "lab"],
        &["observe"],
        &["config", "logging", "notify", "protocol"],
    ];

    fn floor_of(unit: &str) -> usize {
        FLOORS
            .iter()
            .position(|f| f.contains(&unit))
            .unwrap_or_else(|| panic!("{unit} is on no floor: add it to FLOORS and lib.rs's map"))
    }

    /// Every module of `src/` (`folder::file`, or `file` at the top), with its text.
    fn sources() -> BTreeMap<String, String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut sources = BTreeMap::new();
        let mut read = |dir: &Path, prefix: &str| {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                if path.extension().is_some_and(|e| e == "rs")
                    && !["lib", "main"].contains(&stem.as_str())
                {
                    let name = match (prefix, stem.as_str()) {
                        ("", _) => stem,
                        (p, "mod") => p.to_owned(),
                        (p, _) => format!("{p}::{stem}"),
                    };
                    sources.insert(name, std::fs::read_to_string(&path).unwrap());
                }
            }
        };
        read(&src, "");
        for unit in FLOORS.iter().flat_map(|f| f.iter()) {
            let dir = src.join(unit);
            if dir.is_dir() {
                read(&dir, unit);
            }
        }
        sources
    }

    /// The modules each module names (`use crate::…`, `crate::…::` paths, doc links too).
    fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
        let sources = sources();
        let ident = |text: &str| -> String {
            text.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect()
        };
        let mut graph = BTreeMap::new();
        for (name, text) in &sources {
            let mut uses = BTreeSet::new();
            for (i, _) in text.match_indices("crate::") {
                let path = ident(&text[i + "crate::".len()..]);
                let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
                // The longest prefix that names a module: `core::state::Shared` → `core::state`.
                let target = (1..=parts.len().min(2))
                    .rev()
                    .map(|n| parts[..n].join("::"))
                    .find(|m| sources.contains_key(m));
                if let Some(t) = target.filter(|t| t != name) {
                    uses.insert(t);
                }
            }
            graph.insert(name.clone(), uses);
        }
        graph
    }

    fn unit(module: &str) -> &str {
        module.split("::").next().unwrap()
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

    #[test]
    fn no_module_uses_a_module_of_a_floor_above_it() {
        let graph = module_graph();
        let mut upward = Vec::new();
        for (name, uses) in &graph {
            for used in uses {
                let (from, to) = (unit(name), unit(used));
                if from != to && floor_of(to) <= floor_of(from) {
                    upward.push(format!("{name} -> {used}"));
                }
            }
        }
        assert!(
            upward.is_empty(),
            "imports that point up or sideways: {upward:#?}"
        );
    }
}
