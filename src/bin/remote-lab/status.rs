//! `remote-lab status`: each host's state (ok, draining, unhealthy with the reason,
//! rejected credentials, unreachable), queue, slots and holder; as a table or as JSON.

use std::sync::Arc;

use neops_remote_lab::protocol::{Health, HostState, LabView, QueueView};
use serde_json::value::RawValue;

use crate::api::{Failure, Host};
use crate::flags::Common;
use crate::netrc::Netrc;
use crate::run::{holder_of, state_text};
use crate::term;
use crate::{EX_NOPERM, EX_UNAVAILABLE};

/// What one host said.
enum Seen {
    Queue(QueueView, Box<RawValue>),
    /// No queue view (an older or a Python server): its health.
    Health(Health, Box<RawValue>),
    Rejected(Failure),
    Unreachable(Failure),
}

fn look(host: &Host) -> Seen {
    match host.queue_raw() {
        Ok((view, raw)) => Seen::Queue(view, raw),
        Err(f) if f.rejected() => Seen::Rejected(f),
        Err(f @ Failure::Net(_)) => Seen::Unreachable(f),
        Err(_) => match host.health() {
            Ok(health) => {
                let raw = serde_json::value::to_raw_value(&health)
                    .unwrap_or_else(|_| RawValue::NULL.to_owned());
                Seen::Health(health, raw)
            }
            Err(f) if f.rejected() => Seen::Rejected(f),
            Err(f) => Seen::Unreachable(f),
        },
    }
}

impl Seen {
    /// `ok`, `draining`, `unhealthy`, `rejected` or `unreachable`, and why.
    fn state(&self) -> (&'static str, Option<String>) {
        match self {
            Seen::Queue(view, _) => {
                let state = view.host_state.unwrap_or_default();
                let reason = view
                    .host_state_reason
                    .as_deref()
                    .filter(|_| state != HostState::Ok)
                    .map(|r| term::clean_short(r, false));
                (state.as_str(), reason)
            }
            Seen::Health(..) => ("ok", None),
            Seen::Rejected(f) => ("rejected", Some(f.to_string())),
            Seen::Unreachable(f) => ("unreachable", Some(f.to_string())),
        }
    }
}

pub fn status(common: &Common, json: bool) -> i32 {
    let netrc = Netrc::load();
    let hosts: Vec<Arc<Host>> = common
        .urls
        .iter()
        .map(|u| Arc::new(Host::new(u, common.token.as_deref(), &netrc)))
        .collect();
    let seen: Vec<Seen> = std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|host| scope.spawn(move || look(host)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Seen::Unreachable(Failure::Net("panicked".into())))
            })
            .collect()
    });
    for (host, seen) in hosts.iter().zip(&seen) {
        if let Seen::Rejected(f) = seen {
            crate::say(format!(
                "warning: {} REJECTED THE CREDENTIALS ({f}) {}",
                host.url,
                host.source.text()
            ));
        }
    }
    if json {
        print_json(&hosts, &seen);
    } else {
        print_table(&hosts, &seen);
    }
    if seen.iter().any(|s| matches!(s, Seen::Rejected(_))) {
        EX_NOPERM
    } else if seen.iter().any(|s| matches!(s, Seen::Unreachable(_))) {
        EX_UNAVAILABLE
    } else {
        0
    }
}

fn print_json(hosts: &[Arc<Host>], seen: &[Seen]) {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        url: &'a str,
        state: &'a str,
        reason: Option<String>,
        reachable: bool,
        queue: Option<&'a RawValue>,
        health: Option<&'a RawValue>,
        error: Option<String>,
    }
    let rows: Vec<Row<'_>> = hosts
        .iter()
        .zip(seen)
        .map(|(host, seen)| {
            let (state, reason) = seen.state();
            let (queue, health, error) = match seen {
                Seen::Queue(_, raw) => (Some(&**raw), None, None),
                Seen::Health(_, raw) => (None, Some(&**raw), None),
                Seen::Rejected(f) | Seen::Unreachable(f) => (None, None, Some(f.to_string())),
            };
            Row {
                url: &host.url,
                state,
                reason,
                reachable: matches!(seen, Seen::Queue(..) | Seen::Health(..)),
                queue,
                health,
                error,
            }
        })
        .collect();
    // The server's own JSON passes through: serde_json escapes C0 and DEL is left as it
    // is, so the C1 controls and DEL are escaped here (they only occur inside strings).
    let text = serde_json::to_string(&rows).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || c == '\x1b' {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    println!("{out}");
}

fn print_table(hosts: &[Arc<Host>], seen: &[Seen]) {
    let colour = term::stdout_colour();
    let clean = |text: &str| term::clean_short(text, colour);
    println!(
        "{:<32} {:<12} {:>8} {:>7}  {:<40} LAB",
        "HOST", "STATE", "SESSIONS", "WAITING", "HOLDER"
    );
    for (host, seen) in hosts.iter().zip(seen) {
        let (state, reason) = seen.state();
        match seen {
            Seen::Queue(view, _) => {
                let sessions = view.total.max(view.sessions.len());
                println!(
                    "{:<32} {:<12} {:>8} {:>7}  {:<40} {}",
                    host.url,
                    state,
                    sessions,
                    sessions.saturating_sub(1),
                    holder_of(view).map_or_else(|| "-".into(), |h| clean(&h)),
                    lab_text(&view.lab)
                );
                if let Some(reason) = reason {
                    println!("  {}", clean(&state_text(state, Some(&reason))));
                }
                for slot in view.slots.iter().flatten() {
                    let held = match (&slot.holder_name, &slot.holder) {
                        (Some(name), _) => format!(", held by {}", clean(name)),
                        (None, Some(id)) => format!(", held by session {}", clean(id)),
                        (None, None) => String::new(),
                    };
                    println!(
                        "  slot {} ({}): {}{}{}, {} ref",
                        slot.slot,
                        clean(&slot.instance),
                        clean(&slot.state),
                        slot.topology
                            .as_deref()
                            .map_or_else(String::new, |t| format!(" {}", clean(base(t)))),
                        held,
                        slot.ref_count
                    );
                }
            }
            Seen::Health(health, _) => {
                let n = health.queue_length;
                println!(
                    "{:<32} {:<12} {:>8} {:>7}  {:<40} -",
                    host.url,
                    state,
                    n,
                    n.saturating_sub(1),
                    if n > 0 { "(unnamed)" } else { "-" }
                );
            }
            Seen::Rejected(_) | Seen::Unreachable(_) => println!(
                "{:<32} {}: {}",
                host.url,
                if matches!(seen, Seen::Rejected(_)) {
                    "rejected credentials"
                } else {
                    state
                },
                clean(reason.as_deref().unwrap_or(""))
            ),
        }
    }
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn lab_text(lab: &LabView) -> String {
    if !lab.running {
        return "down".into();
    }
    let topology = term::clean_short(base(lab.topology.as_deref().unwrap_or("?")), false);
    format!("up ({topology}, {} ref)", lab.ref_count)
}
