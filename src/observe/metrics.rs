//! `GET /metrics`: counters and histograms as plain atomics in one static, so that counting
//! costs the hot paths one relaxed `fetch_add` and no lock; gauges are read from the state at
//! scrape time. Rendered in the Prometheus text format 0.0.4.
//!
//! Why one file of this size: most of it is the exposition itself, a metric after another
//! with its help text, in the order Prometheus shows them.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const PREFIX: &str = "neops_remote_lab_";

/// The route labels of `http_requests_total`, registered once at start-up from the route
/// table (the table lives above this module; the responder carries the index of the route a
/// request matched). Requests that matched none count as `other`.
static ROUTE_LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();

/// Registers the route templates (in the route table's order). Later calls change nothing.
pub fn register_routes(templates: impl IntoIterator<Item = &'static str>) {
    let mut labels: Vec<&'static str> = templates.into_iter().collect();
    labels.push("other");
    if ROUTE_LABELS.set(labels).is_ok() {
        let n = ROUTE_LABELS.get().map_or(0, Vec::len);
        let _ = METRICS
            .http
            .set((0..n).map(|_| [const { AtomicU64::new(0) }; 5]).collect());
    }
}

const CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Deleted = 0,
    ReapedActive = 1,
    ReapedWaiting = 2,
    Refused = 3,
    /// Refused: the host is draining.
    Draining = 4,
    /// Its owner's token was removed from the token file (on reload).
    Revoked = 5,
}

const ENDED: &[&str] = &[
    "deleted",
    "reaped_active",
    "reaped_waiting",
    "refused",
    "draining",
    "revoked",
];

impl Ended {
    pub fn as_str(self) -> &'static str {
        ENDED[self as usize]
    }
}

/// How a `POST /lab` ended (the `outcome` label of `lab_acquisitions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Started,
    Reused,
    Rejected,
    Conflict,
    Failed,
    Timeout,
    Busy,
    Cancelled,
    /// Refused at once: the host is unhealthy.
    Unhealthy,
}

impl Outcome {
    const ALL: [Outcome; 9] = [
        Outcome::Started,
        Outcome::Reused,
        Outcome::Rejected,
        Outcome::Conflict,
        Outcome::Failed,
        Outcome::Timeout,
        Outcome::Busy,
        Outcome::Cancelled,
        Outcome::Unhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Started => "started",
            Outcome::Reused => "reused",
            Outcome::Rejected => "rejected",
            Outcome::Conflict => "conflict",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Busy => "busy",
            Outcome::Cancelled => "cancelled",
            Outcome::Unhealthy => "unhealthy",
        }
    }

    /// The outcome of a `POST /lab` answered with `status` after netlab ran.
    pub fn of_start(status: u16) -> Outcome {
        match status {
            200 => Outcome::Started,
            422 => Outcome::Rejected,
            409 => Outcome::Conflict,
            504 => Outcome::Timeout,
            423 => Outcome::Busy,
            503 => Outcome::Cancelled,
            _ => Outcome::Failed,
        }
    }
}

/// netlab commands counted; anything else is `other`.
const COMMANDS: &[&str] = &["up", "down", "inspect", "status", "version", "other"];
const RESULTS: &[&str] = &["success", "failure", "timeout"];

fn command_index(command: &str) -> usize {
    COMMANDS
        .iter()
        .position(|c| *c == command)
        .unwrap_or(COMMANDS.len() - 1)
}

/// Bucket bounds of the time histograms, in seconds.
const SHORT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const LONG_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

const MAX_BUCKETS: usize = 13;

/// A histogram of durations: counts per bucket (not cumulative), count, and the sum in µs.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: [AtomicU64; MAX_BUCKETS],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{PREFIX}{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(
            out,
            "{PREFIX}{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{PREFIX}{name}_sum{} {}",
            braces(labels),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{PREFIX}{name}_count{} {count}", braces(labels));
    }
}

pub struct Metrics {
    /// Per route (see [`register_routes`]) and status class.
    http: OnceLock<Box<[[AtomicU64; 5]]>>,
    sessions_created: AtomicU64,
    sessions_ended: [AtomicU64; ENDED.len()],
    acquisitions: [AtomicU64; Outcome::ALL.len()],
    netlab_commands: [[AtomicU64; 3]; 6],
    state_writes: [AtomicU64; 2],
    events_not_written: AtomicU64,
    host_unhealthy: AtomicU64,
    /// Health checks, by result: success, failure.
    health_checks: [AtomicU64; 2],
    promotions_ahead: AtomicU64,
    skips: AtomicU64,
    ups_avoided: AtomicU64,
    auth_failures: AtomicU64,
    auth_throttled: AtomicU64,
    auth_events_suppressed: AtomicU64,
    abandoned_untrusted: AtomicU64,
    auth_challenges: AtomicU64,
    pub queue_wait: Histogram,
    pub lab_hold: Histogram,
    netlab_duration: [Histogram; 6],
    acquire_duration: [Histogram; Outcome::ALL.len()],
    pub state_write_duration: Histogram,
}

pub static METRICS: Metrics = Metrics {
    http: OnceLock::new(),
    sessions_created: AtomicU64::new(0),
    sessions_ended: [const { AtomicU64::new(0) }; ENDED.len()],
    acquisitions: [const { AtomicU64::new(0) }; Outcome::ALL.len()],
    netlab_commands: [const { [const { AtomicU64::new(0) }; 3] }; 6],
    state_writes: [const { AtomicU64::new(0) }; 2],
    events_not_written: AtomicU64::new(0),
    host_unhealthy: AtomicU64::new(0),
    health_checks: [const { AtomicU64::new(0) }; 2],
    promotions_ahead: AtomicU64::new(0),
    skips: AtomicU64::new(0),
    ups_avoided: AtomicU64::new(0),
    auth_failures: AtomicU64::new(0),
    auth_throttled: AtomicU64::new(0),
    auth_events_suppressed: AtomicU64::new(0),
    abandoned_untrusted: AtomicU64::new(0),
    auth_challenges: AtomicU64::new(0),
    queue_wait: Histogram::new(LONG_BUCKETS),
    lab_hold: Histogram::new(LONG_BUCKETS),
    netlab_duration: [const { Histogram::new(LONG_BUCKETS) }; 6],
    acquire_duration: [const { Histogram::new(LONG_BUCKETS) }; Outcome::ALL.len()],
    state_write_duration: Histogram::new(SHORT_BUCKETS),
};

impl Metrics {
    /// One HTTP answer with `status` on the route at `route` in the route table (`None`: it
    /// matched no route).
    pub fn request(&self, route: Option<usize>, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(http) = self.http.get() {
            let other = http.len() - 1;
            http[route.unwrap_or(other).min(other)][class].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn session_created(&self) {
        self.sessions_created.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_ended(&self, why: Ended) {
        self.sessions_ended[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A `POST /lab` ended with `outcome` after `took`.
    pub fn acquisition(&self, outcome: Outcome, took: Option<Duration>) {
        self.acquisitions[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(took) = took {
            self.acquire_duration[outcome as usize].observe(took);
        }
    }

    /// A netlab command ended: `result` 0 success, 1 failure, 2 timeout.
    pub fn netlab_command(&self, command: &str, result: usize, took: Duration) {
        let i = command_index(command);
        self.netlab_commands[i][result.min(2)].fetch_add(1, Ordering::Relaxed);
        self.netlab_duration[i].observe(took);
    }

    /// An event line the event writer could not append to `events.jsonl`.
    /// A request without credentials got the 401 that asks for them.
    pub fn auth_challenge(&self) {
        self.auth_challenges.fetch_add(1, Ordering::Relaxed);
    }

    pub fn event_not_written(&self) {
        self.events_not_written.fetch_add(1, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn events_not_written(&self) -> u64 {
        self.events_not_written.load(Ordering::Relaxed)
    }

    /// The host became unhealthy.
    pub fn host_became_unhealthy(&self) {
        self.host_unhealthy.fetch_add(1, Ordering::Relaxed);
    }

    /// A health check (`--health-topology`) ended.
    pub fn health_check(&self, ok: bool) {
        self.health_checks[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// A session went ahead of `passed` others for the lab it declared.
    pub fn promoted_ahead(&self, passed: usize) {
        self.promotions_ahead.fetch_add(1, Ordering::Relaxed);
        self.skips.fetch_add(passed as u64, Ordering::Relaxed);
    }

    /// A session promoted ahead attached to the idle lab it was promoted for: a `netlab up`
    /// that strict FIFO order would have run.
    pub fn up_avoided(&self) {
        self.ups_avoided.fetch_add(1, Ordering::Relaxed);
    }

    /// A request without a valid credential where one was needed.
    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Such a request answered 429: its address (or /24) is blocked.
    pub fn auth_throttled(&self) {
        self.auth_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// An `auth_failed`/`auth_blocked` event left out: over the budget of its window.
    pub fn auth_event_suppressed(&self) {
        self.auth_events_suppressed.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection without a valid token answered and abandoned; returns how many so far.
    pub fn abandoned_untrusted(&self) -> u64 {
        self.abandoned_untrusted.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn state_write(&self, ok: bool, took: Duration) {
        self.state_writes[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        self.state_write_duration.observe(took);
    }
}

/// One lab slot's gauges.
pub struct SlotGauges {
    /// netlab's instance: `default` or the multilab id.
    pub instance: String,
    pub up: bool,
    pub references: u32,
    pub starting: bool,
}

/// The gauges, read from the state at scrape time.
pub struct Gauges {
    /// Per lab slot, in slot order.
    pub slots: Vec<SlotGauges>,
    pub active: usize,
    pub waiting: usize,
    pub lab_up: bool,
    pub lab_references: u32,
    pub start_in_progress: bool,
    pub teardowns_pending: usize,
    pub events: u64,
    /// Seconds the ACTIVE session has been active (0 without one).
    pub active_for: f64,
    /// Seconds the first WAITING session has waited (0 without one).
    pub oldest_wait: f64,
    pub active_timeout: f64,
    pub waiting_timeout: f64,
    /// `ok`, `draining` or `unhealthy`.
    pub host_state: &'static str,
    /// Failed starts in a row that count against the host.
    pub host_start_failures: u32,
}

/// The values of the `host_state` gauge's label.
pub const HOST_STATES: &[&str] = &["ok", "draining", "unhealthy"];

/// A counter with one label: a line per label value, in `values`' order.
fn counters(
    out: &mut String,
    name: &str,
    help: &str,
    (label, names): (&str, &[&str]),
    values: &[AtomicU64],
) {
    debug_assert_eq!(names.len(), values.len(), "{name}");
    header(out, name, "counter", help);
    for (value, counter) in names.iter().zip(values) {
        let _ = writeln!(
            out,
            "{PREFIX}{name}{{{label}=\"{value}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
}

/// A metric without labels: its `# HELP` and `# TYPE` lines and its value.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{PREFIX}{name} {value}");
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
}

fn process_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition: the gauges read from the state, the counters, the histograms and
/// the process's own metrics.
pub fn render(gauges: &Gauges, started_at: SystemTime) -> String {
    let mut out = String::with_capacity(16 * 1024);
    render_gauges(&mut out, gauges);
    render_counters(&mut out, gauges);
    render_histograms(&mut out);
    process_metrics(&mut out, started_at);
    out
}

/// The gauges: sessions, the host's state, the lab and each slot, the timeouts.
fn render_gauges(out: &mut String, gauges: &Gauges) {
    header(
        out,
        "sessions",
        "gauge",
        "Sessions in the queue, by status.",
    );
    for (status, n) in [("active", gauges.active), ("waiting", gauges.waiting)] {
        let _ = writeln!(out, "{PREFIX}sessions{{status=\"{status}\"}} {n}");
    }
    header(
        out,
        "host_state",
        "gauge",
        "1 for the host's state (ok, draining: no new sessions, unhealthy: POST /lab refused), 0 for the others.",
    );
    for state in HOST_STATES {
        let on = u8::from(*state == gauges.host_state);
        let _ = writeln!(out, "{PREFIX}host_state{{state=\"{state}\"}} {on}");
    }
    /// A per-slot gauge: its name, its help, its value for one slot.
    type PerSlot = (&'static str, &'static str, fn(&SlotGauges) -> u64);
    let per_slot: [PerSlot; 3] = [
        (
            "slot_lab_up",
            "1 while a lab runs in the slot (labels: slot number, netlab instance).",
            |s| u64::from(s.up),
        ),
        (
            "slot_lab_references",
            "References held on the slot's lab.",
            |s| u64::from(s.references),
        ),
        (
            "slot_lab_starting",
            "1 while a netlab up runs in the slot.",
            |s| u64::from(s.starting),
        ),
    ];
    for (name, help, value) in per_slot {
        header(out, name, "gauge", help);
        for (i, slot) in gauges.slots.iter().enumerate() {
            let _ = writeln!(
                out,
                "{PREFIX}{name}{{slot=\"{}\",instance=\"{}\"}} {}",
                i + 1,
                slot.instance,
                value(slot)
            );
        }
    }
    // One value each, in the order Prometheus lists them.
    let gauges_table: [(&str, &str, f64); 9] = [
        (
            "host_start_failures",
            "Starts failed in a row for reasons not the topology's (--unhealthy-after makes the host unhealthy).",
            f64::from(gauges.host_start_failures),
        ),
        (
            "lab_up",
            "1 while a lab is running (in any slot).",
            f64::from(u8::from(gauges.lab_up)),
        ),
        (
            "lab_references",
            "References held on the running labs (all slots).",
            f64::from(gauges.lab_references),
        ),
        (
            "lab_start_in_progress",
            "1 while a POST /lab is being processed.",
            f64::from(u8::from(gauges.start_in_progress)),
        ),
        (
            "lab_teardowns_pending",
            "Lab teardowns queued and not done yet.",
            gauges.teardowns_pending as f64,
        ),
        (
            "active_session_seconds",
            "How long the ACTIVE session has held the lab so far (0 without one).",
            gauges.active_for,
        ),
        (
            "oldest_waiting_seconds",
            "How long the first WAITING session has waited so far (0 without one).",
            gauges.oldest_wait,
        ),
        (
            "active_timeout_seconds",
            "The server's --active-timeout.",
            gauges.active_timeout,
        ),
        (
            "waiting_timeout_seconds",
            "The server's --waiting-timeout.",
            gauges.waiting_timeout,
        ),
    ];
    for (name, help, value) in gauges_table {
        metric(out, name, "gauge", help, value);
    }
}

/// The counters, with one label or two.
fn render_counters(out: &mut String, gauges: &Gauges) {
    let m = &METRICS;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // Counters without labels: a name, its help and its value each.
    let plain: [(&str, &str, u64); 10] = [
        (
            "sessions_created_total",
            "Sessions created.",
            load(&m.sessions_created),
        ),
        (
            "promotions_ahead_total",
            "Sessions promoted ahead of others because they declared the idle lab's topology.",
            load(&m.promotions_ahead),
        ),
        (
            "skips_total",
            "Times a waiting session was passed over by a promotion ahead.",
            load(&m.skips),
        ),
        (
            "ups_avoided_total",
            "Sessions promoted ahead that then attached to the idle lab instead of starting one.",
            load(&m.ups_avoided),
        ),
        (
            "host_unhealthy_total",
            "Times the host became unhealthy.",
            load(&m.host_unhealthy),
        ),
        (
            "events_total",
            "Events recorded since the event history began (the last event id).",
            gauges.events,
        ),
        (
            "events_not_written_total",
            "Event lines that could not be appended to events.jsonl (full disk, I/O error).",
            load(&m.events_not_written),
        ),
        (
            "auth_failures_total",
            "Requests without a valid credential where one was needed (each one, logged or not).",
            load(&m.auth_failures),
        ),
        (
            "auth_throttled_total",
            "Of those, requests answered 429 because their address or /24 was blocked.",
            load(&m.auth_throttled),
        ),
        (
            "auth_events_suppressed_total",
            "auth_failed/auth_blocked events left out: over the per-minute budget of such events.",
            load(&m.auth_events_suppressed),
        ),
    ];
    for (name, help, value) in plain {
        metric(out, name, "counter", help, value);
    }
    metric(
        out,
        "connections_abandoned_untrusted_total",
        "counter",
        "Connections without a valid token that declared an absurd body, answered and abandoned (they never restart the server).",
        load(&m.abandoned_untrusted),
    );
    metric(
        out,
        "auth_challenges_total",
        "counter",
        "Requests without credentials answered 401 with WWW-Authenticate (a browser's first request, a client that sends credentials only when asked); not auth failures.",
        load(&m.auth_challenges),
    );
    // Counters with one label.
    counters(
        out,
        "sessions_ended_total",
        "Sessions ended, by reason (refused: the queue was full; draining: refused, the host is draining).",
        ("reason", ENDED),
        &m.sessions_ended,
    );
    counters(
        out,
        "lab_acquisitions_total",
        "POST /lab calls that passed the gate, by outcome.",
        ("outcome", &Outcome::ALL.map(Outcome::as_str)),
        &m.acquisitions,
    );
    counters(
        out,
        "health_checks_total",
        "Starts of --health-topology while unhealthy, by result.",
        ("result", &["success", "failure"]),
        &m.health_checks,
    );
    counters(
        out,
        "state_file_writes_total",
        "State file writes, by result.",
        ("result", &["ok", "error"]),
        &m.state_writes,
    );
    render_two_label_counters(out);
}

/// The counters with two labels: netlab commands by command and result, HTTP answers by
/// route and status class.
fn render_two_label_counters(out: &mut String) {
    let m = &METRICS;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    header(
        out,
        "netlab_commands_total",
        "counter",
        "netlab commands run, by command and result.",
    );
    for (i, command) in COMMANDS.iter().enumerate() {
        for (j, result) in RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{PREFIX}netlab_commands_total{{command=\"{command}\",result=\"{result}\"}} {}",
                load(&m.netlab_commands[i][j])
            );
        }
    }
    header(
        out,
        "http_requests_total",
        "counter",
        "HTTP requests answered, by route template and status class.",
    );
    let routes = ROUTE_LABELS.get().map_or(&[][..], Vec::as_slice);
    let http = m.http.get().map_or(&[][..], |h| &h[..]);
    for (route, counts) in routes.iter().zip(http) {
        for (class, count) in CLASSES.iter().zip(counts) {
            let n = load(count);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "{PREFIX}http_requests_total{{route=\"{route}\",code=\"{class}\"}} {n}"
                );
            }
        }
    }
}

/// The histograms, and which build this is.
fn render_histograms(out: &mut String) {
    let m = &METRICS;
    header(
        out,
        "queue_wait_seconds",
        "histogram",
        "Time from session creation to ACTIVE.",
    );
    m.queue_wait.render(out, "queue_wait_seconds", "");
    header(
        out,
        "lab_hold_seconds",
        "histogram",
        "Time a session stayed ACTIVE (held the lab), measured when it ended.",
    );
    m.lab_hold.render(out, "lab_hold_seconds", "");
    header(
        out,
        "netlab_command_duration_seconds",
        "histogram",
        "Duration of netlab commands, by command.",
    );
    for (i, command) in COMMANDS.iter().enumerate() {
        m.netlab_duration[i].render(
            out,
            "netlab_command_duration_seconds",
            &format!("command=\"{command}\""),
        );
    }
    header(
        out,
        "lab_acquire_duration_seconds",
        "histogram",
        "Duration of POST /lab after the upload, by outcome.",
    );
    for outcome in Outcome::ALL {
        m.acquire_duration[outcome as usize].render(
            out,
            "lab_acquire_duration_seconds",
            &format!("outcome=\"{}\"", outcome.as_str()),
        );
    }
    header(
        out,
        "state_file_write_duration_seconds",
        "histogram",
        "Duration of state file writes (write, fsync, rename, fsync).",
    );
    m.state_write_duration
        .render(out, "state_file_write_duration_seconds", "");

    header(
        out,
        "build_info",
        "gauge",
        "Always 1; the version is in the label.",
    );
    let _ = writeln!(
        out,
        "{PREFIX}build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
}

/// The standard `process_*` metrics, from /proc/self.
fn process_metrics(out: &mut String, started_at: SystemTime) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    if let Some(rss) = field("VmRSS:") {
        process_header(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {}", rss * 1024);
    }
    if let Some(vsz) = field("VmSize:") {
        process_header(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        let _ = writeln!(out, "process_virtual_memory_bytes {}", vsz * 1024);
    }
    if let Some(threads) = field("Threads:") {
        process_header(out, "process_threads", "gauge", "Number of OS threads.");
        let _ = writeln!(out, "process_threads {threads}");
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        process_header(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        // The directory handle itself is one of them.
        let _ = writeln!(out, "process_open_fds {}", fds.count().saturating_sub(1));
    }
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    if let (Some(u), Some(s)) = (
        fields.get(11).and_then(|v| v.parse::<u64>().ok()),
        fields.get(12).and_then(|v| v.parse::<u64>().ok()),
    ) {
        let ticks = rustix::param::clock_ticks_per_second().max(1) as f64;
        process_header(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {}", (u + s) as f64 / ticks);
    }
    let start = started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    process_header(
        out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    );
    let _ = writeln!(out, "process_start_time_seconds {start}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_label_and_the_statuses_map_to_them() {
        let labels = Outcome::ALL.map(Outcome::as_str);
        assert_eq!(labels.len(), METRICS.acquisitions.len());
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "ALL is in declaration order");
        }
        assert_eq!(Outcome::of_start(200), Outcome::Started);
        assert_eq!(Outcome::of_start(422), Outcome::Rejected);
        assert_eq!(Outcome::of_start(500), Outcome::Failed);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static H: Histogram = Histogram::new(SHORT_BUCKETS);
        H.observe(Duration::from_micros(300));
        H.observe(Duration::from_millis(3));
        H.observe(Duration::from_secs(5));
        let mut out = String::new();
        H.render(&mut out, "x", "");
        assert!(
            out.contains("neops_remote_lab_x_bucket{le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("neops_remote_lab_x_bucket{le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("neops_remote_lab_x_bucket{le=\"1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("neops_remote_lab_x_bucket{le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("neops_remote_lab_x_count 3\n"), "{out}");
        assert!(out.contains("neops_remote_lab_x_sum 5.0033\n"), "{out}");
    }
}
