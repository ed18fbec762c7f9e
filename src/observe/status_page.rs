//! The status page, `GET /`: one HTML file embedded in the binary (no external scripts,
//! fonts or styles), filled in on the server with the state at load time, so it says
//! everything without JavaScript; its script then refreshes it from `/queue`, `/events` and
//! `/lab/log` every 2 s. Everything a client supplied (names, user agents) is escaped here
//! and set with `textContent` by the script: never markup.

use std::fmt::Write as _;

use crate::observe::lablog::Chunk;
use crate::protocol::{HostState, QueueView, SessionView};

const TEMPLATE: &str = include_str!("status.html");

/// Escapes text for HTML element content and quoted attribute values.
/// The page's `Content-Security-Policy`: its one script is allowed by its SHA-256 (no
/// `'unsafe-inline'` for scripts, so markup that slipped into the page could run nothing).
pub fn content_security_policy() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let start = TEMPLATE
            .find("<script>")
            .map_or(0, |i| i + "<script>".len());
        let end = TEMPLATE[start..]
            .find("</script>")
            .map_or(start, |i| start + i);
        let digest = sha2::Sha256::digest(&TEMPLATE.as_bytes()[start..end]);
        let hash = base64::engine::general_purpose::STANDARD.encode(digest);
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'none'; form-action 'none'; frame-ancestors 'none'; \
             base-uri 'none'"
        )
    })
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn dur(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

fn who(name: Option<&str>, id: &str) -> String {
    format!("{} ({id})", name.unwrap_or("(unnamed)"))
}

fn clock(unix: f64) -> String {
    let s = unix.max(0.0) as u64 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, (s % 3600) / 60, s % 60)
}

fn event_line(e: &serde_json::Value) -> (String, bool) {
    let kind = e["kind"].as_str().unwrap_or("?");
    let mut text = format!("{}  {kind}", clock(e["time"].as_f64().unwrap_or(0.0)));
    if e.get("session").is_some() || e.get("client").is_some() {
        text.push_str("  ");
        text.push_str(&who(
            e["client"].as_str(),
            e["session"].as_str().unwrap_or("null"),
        ));
    }
    if let Some(map) = e.as_object() {
        for (k, v) in map {
            if matches!(k.as_str(), "id" | "time" | "kind" | "session" | "client") || v.is_null() {
                continue;
            }
            match v.as_str() {
                Some(s) => {
                    let _ = write!(text, "  {k}={s}");
                }
                None => {
                    let _ = write!(text, "  {k}={v}");
                }
            }
        }
    }
    let reason = e["reason"].as_str().unwrap_or("");
    let bad = kind.contains("failed")
        || kind == "host_unhealthy"
        || e["success"] == serde_json::Value::Bool(false)
        || matches!(reason, "reaped_active" | "reaped_waiting" | "refused");
    (text, bad)
}

/// What the scheduler did to a session, after its name: promoted ahead for the lab it
/// declared, passed over so many times, the topology it declared.
fn schedule_marks(s: &SessionView) -> String {
    let mut marks = String::new();
    if s.promoted_ahead {
        marks.push_str(" <span class=\"ahead warn\">⤴ promoted ahead</span>");
    }
    if s.skips > 0 {
        let _ = write!(
            marks,
            " <span class=\"skips muted\">passed {}×</span>",
            s.skips
        );
    }
    if let Some(declared) = &s.declared {
        let _ = write!(
            marks,
            " <span class=\"declared muted\">{}</span>",
            escape(declared)
        );
    }
    marks
}

/// A card per lab slot (only with several slots): topology, holder, devices, state.
fn slot_cards(view: &QueueView) -> String {
    if view.slots.len() < 2 {
        return String::new();
    }
    let mut out = String::new();
    for slot in &view.slots {
        let holder = match &slot.holder {
            Some(id) => who(slot.holder_name.as_deref(), id),
            None => "nobody".to_owned(),
        };
        let _ = write!(
            out,
            "<div class=\"slot {}\"><strong>slot {} · instance {}</strong> <span>{}</span><div>{} · held by {} · refs {}</div><div class=\"muted\">{}</div></div>",
            slot.state,
            slot.slot,
            escape(&slot.instance),
            slot.state,
            escape(slot.topology.as_deref().unwrap_or("no lab")),
            escape(&holder),
            slot.ref_count,
            escape(&slot.device_names.join(", "))
        );
    }
    out
}

/// A device's type and image, as the page shows them: `frr · quay.io/frrouting/frr:10.7.1`.
fn device_type(kind: Option<&str>, image: Option<&str>) -> String {
    match (kind, image) {
        (Some(k), Some(i)) => format!("{k} · {i}"),
        (Some(one), None) | (None, Some(one)) => one.to_owned(),
        (None, None) => String::new(),
    }
}

/// The page with the state of `view`, `events_json` (`GET /events` body) and `log`.
pub fn render(view: &QueueView, events_json: &str, log: &Chunk) -> String {
    let log_text = String::from_utf8_lossy(&log.text);
    let log_tail = {
        let mut start = log_text.len().saturating_sub(65_536);
        while !log_text.is_char_boundary(start) {
            start += 1;
        }
        &log_text[start..]
    };
    let log_command = match log.command {
        Some(c) => format!(
            "netlab {c} ({})",
            if log.done { "ended" } else { "running" }
        ),
        None => String::new(),
    };
    let slots = slot_cards(view);
    TEMPLATE
        .replace(
            "<!--SLOTS_HIDDEN-->",
            if slots.is_empty() { "hidden" } else { "" },
        )
        .replace("<!--SLOTS-->", &slots)
        .replace("<!--VERSION-->", &escape(&view.version))
        .replace("<!--UPDATED-->", &clock(view.time))
        .replace("<!--HOST_STATE-->", &host_html(view))
        .replace("<!--LAB-->", &lab_html(view))
        .replace("<!--HOLDER-->", &holder_html(view))
        .replace("<!--OPERATION-->", &operation_html(view))
        .replace("<!--QUEUE-->", &queue_rows(view))
        .replace("<!--QUEUE_NOTE-->", &queue_note(view))
        .replace("<!--DEVICES-->", &devices_html(view))
        .replace("<!--EVENTS-->", &events_html(events_json))
        .replace("<!--LOG_COMMAND-->", &escape(&log_command))
        .replace("<!--LOG_OFFSET-->", &log.next.to_string())
        .replace("<!--LOG-->", &escape(log_tail))
}

/// The host's state, when it is not `ok`.
fn host_html(view: &QueueView) -> String {
    match view.host_state.unwrap_or_default() {
        HostState::Ok => String::new(),
        state => format!(
            "<div class=\"big {}\">{}</div>{}",
            if state == HostState::Draining {
                "warn"
            } else {
                "bad"
            },
            escape(&state.as_str().to_uppercase()),
            view.host_state_reason
                .as_deref()
                .map(|r| format!("<div>{}</div>", escape(r)))
                .unwrap_or_default()
        ),
    }
}

/// The lab: up (topology, hash, devices, references, since when) or down.
fn lab_html(view: &QueueView) -> String {
    if view.lab.running {
        let mut details = format!(
            "{} · {} · {} devices · refs {}",
            view.lab.topology.as_deref().unwrap_or("?"),
            view.lab.hash.as_deref().unwrap_or("?"),
            view.lab.devices,
            view.lab.ref_count
        );
        if let Some(started) = view.lab.started_at {
            let _ = write!(details, " · up {}", dur(view.time - started));
        }
        if let Some(idle) = view.lab.idle_since {
            let _ = write!(details, " · idle {}", dur(view.time - idle));
        }
        format!(
            "<div class=\"big up\">UP</div><div>{}</div>",
            escape(&details)
        )
    } else {
        "<div class=\"big down\">DOWN</div>".to_owned()
    }
}

/// Who holds the lab, and since when.
fn holder_html(view: &QueueView) -> String {
    match view.sessions.first() {
        Some(head) => format!(
            "<span>Held by </span><strong class=\"holder-name\">{}</strong><span> for {}</span>",
            escape(&who(head.client_name.as_deref(), &head.id)),
            dur(view.time - head.active_since.unwrap_or(head.created_at))
        ),
        None => "<span class=\"muted\">Nobody holds the lab.</span>".to_owned(),
    }
}

/// The netlab command running now, if any.
fn operation_html(view: &QueueView) -> String {
    match &view.operation {
        Some(op) => format!(
            "<span class=\"warn\">netlab {} running for {}</span>",
            escape(&op.command),
            dur(view.time - op.since)
        ),
        None => String::new(),
    }
}

/// The queue's rows, one per session.
fn queue_rows(view: &QueueView) -> String {
    let mut queue = String::new();
    for s in &view.sessions {
        let _ = write!(
            queue,
            "<tr class=\"{}\"><td>{}</td><td><span class=\"client-name\">{}</span>{}</td><td>{}</td><td>{}</td><td>{} ago</td></tr>",
            s.status,
            if s.position == 0 {
                "active".to_owned()
            } else {
                s.position.to_string()
            },
            escape(s.client_name.as_deref().unwrap_or("(unnamed)")),
            schedule_marks(s),
            escape(&s.id),
            if s.position == 0 {
                "-".to_owned()
            } else {
                dur(view.time - s.created_at)
            },
            dur(s.last_seen_ago)
        );
    }
    queue
}

/// How many sessions the queue holds.
fn queue_note(view: &QueueView) -> String {
    if view.total == 0 {
        "No sessions.".to_owned()
    } else {
        format!(
            "{} sessions{}",
            view.total,
            if view.truncated { " (list cut)" } else { "" }
        )
    }
}

/// The lab's devices, with their management address and type.
fn devices_html(view: &QueueView) -> String {
    let mut devices = String::new();
    for d in &view.lab.device_list {
        let _ = write!(
            devices,
            "<li class=\"device\"><span class=\"device-name\">{}</span> \
             <span class=\"device-mgmt\">{}</span> <span class=\"device-type muted\">{}</span></li>",
            escape(&d.name),
            escape(d.mgmt.as_deref().unwrap_or("-")),
            escape(&device_type(d.kind.as_deref(), d.image.as_deref()))
        );
    }
    if !view.lab.running {
        devices.push_str("<li class=\"muted\">no lab running</li>");
    }
    devices
}

/// The last events, failures marked.
fn events_html(events_json: &str) -> String {
    let mut events = String::new();
    let parsed: serde_json::Value = serde_json::from_str(events_json).unwrap_or_default();
    if let Some(list) = parsed["events"].as_array() {
        for e in list {
            let (text, bad) = event_line(e);
            let _ = write!(
                events,
                "<li class=\"{}\">{}</li>",
                if bad { "event bad" } else { "event" },
                escape(&text)
            );
        }
        if list.is_empty() {
            events.push_str("<li class=\"muted\">no events yet</li>");
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            escape("<img src=x onerror=\"alert('1')\">&"),
            "&lt;img src=x onerror=&quot;alert(&#39;1&#39;)&quot;&gt;&amp;"
        );
    }

    #[test]
    fn the_template_has_no_external_resources() {
        for needle in ["http://", "https://", "src=\"", "@import", "url("] {
            assert!(!TEMPLATE.contains(needle), "{needle}");
        }
    }
}
