//! Command line and environment. Every option `--some-flag` falls back to the environment
//! variable `NEOPS_REMOTE_LAB_SOME_FLAG`; the command line wins.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

pub const ENV_PREFIX: &str = "NEOPS_REMOTE_LAB_";

/// One option: its long name, the placeholder of its value (None for a switch), its default
/// as the help shows it, and what it does.
pub struct OptionSpec {
    pub name: &'static str,
    pub value: Option<&'static str>,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every option, in the order `--help` lists them.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "host",
        value: Some("ADDR"),
        default: "0.0.0.0",
        help: "address to listen on",
    },
    OptionSpec {
        name: "port",
        value: Some("PORT"),
        default: "8000",
        help: "TCP port to listen on (0 picks a free one)",
    },
    OptionSpec {
        name: "workers",
        value: Some("N"),
        default: "twice the CPU count, at least 4",
        help: "worker threads answering requests",
    },
    OptionSpec {
        name: "state-dir",
        value: Some("DIR"),
        default: "/var/lib/neops-remote-lab as root, else ~/.local/state/neops-remote-lab",
        help: "state file, lock file and lab work directories (0700, ours alone)",
    },
    OptionSpec {
        name: "active-timeout",
        value: Some("SECONDS"),
        default: "300",
        help: "reap the ACTIVE session after this much silence",
    },
    OptionSpec {
        name: "waiting-timeout",
        value: Some("SECONDS"),
        default: "600",
        help: "reap a WAITING session after this much silence",
    },
    OptionSpec {
        name: "sweep-interval",
        value: Some("SECONDS"),
        default: "5",
        help: "how often stale sessions are looked for",
    },
    OptionSpec {
        name: "max-sessions",
        value: Some("N"),
        default: "1000",
        help: "sessions allowed at once; more get 503",
    },
    OptionSpec {
        name: "netlab",
        value: Some("PATH"),
        default: "netlab",
        help: "the netlab command (a path, or a name looked up on PATH)",
    },
    OptionSpec {
        name: "netlab-timeout",
        value: Some("SECONDS"),
        default: "1800",
        help: "give up on `netlab up` after this long",
    },
    OptionSpec {
        name: "containerlab",
        value: Some("PATH"),
        default: "containerlab",
        help: "the containerlab command, for a lab whose netlab snapshot is gone",
    },
    OptionSpec {
        name: "max-upload-bytes",
        value: Some("BYTES"),
        default: "16777216",
        help: "largest POST /lab body accepted",
    },
    OptionSpec {
        name: "upload-timeout",
        value: Some("SECONDS"),
        default: "60",
        help: "give up on a POST /lab upload that takes longer",
    },
    OptionSpec {
        name: "client-timeout",
        value: Some("SECONDS"),
        default: "30",
        help: "close a connection that sends or takes nothing for this long",
    },
    OptionSpec {
        name: "cleanup-foreign",
        value: None,
        default: "off",
        help: "tear down netlab's `default` instance even when it is not in our state dir",
    },
    OptionSpec {
        name: "on-exit",
        value: Some("ACTION"),
        default: "teardown",
        help: "on SIGTERM: teardown the lab, or keep it for the next start to adopt",
    },
    OptionSpec {
        name: "idle-lab-timeout",
        value: Some("SECONDS"),
        default: "3600",
        help: "tear down a lab left idle with no session for this long",
    },
    OptionSpec {
        name: "unhealthy-after",
        value: Some("N"),
        default: "3",
        help: "starts failing in a row for reasons not the topology's before the host is unhealthy",
    },
    OptionSpec {
        name: "health-topology",
        value: Some("FILE"),
        default: "none: only POST /admin/health/reset heals",
        help: "while unhealthy, start this topology every --health-interval; a success heals",
    },
    OptionSpec {
        name: "health-interval",
        value: Some("SECONDS"),
        default: "600",
        help: "how often an unhealthy host tries --health-topology",
    },
    OptionSpec {
        name: "affinity-window",
        value: Some("N"),
        default: "8",
        help: "a waiting session this far up that declared the idle lab may go first",
    },
    OptionSpec {
        name: "max-skips",
        value: Some("N"),
        default: "2",
        help: "times a waiting session may be passed over that way; 0: strict FIFO",
    },
    OptionSpec {
        name: "slots",
        value: Some("N"),
        default: "1",
        help: "labs run at once (1: netlab's default instance; more: its multilab plugin)",
    },
    OptionSpec {
        name: "multilab-ids",
        value: Some("IDS"),
        default: "1-N",
        help: "netlab multilab instance ids of the slots, e.g. 1-3 or 4,7,9 (never 121)",
    },
    OptionSpec {
        name: "token-file",
        value: Some("PATH"),
        default: "none: no authentication",
        help: "NAME:TOKEN[:admin] lines; every route but /healthz needs a token",
    },
    OptionSpec {
        name: "public-read",
        value: None,
        default: "off",
        help: "with --token-file: the read-only views need no token",
    },
    OptionSpec {
        name: "trusted-proxy",
        value: Some("ADDR"),
        default: "none",
        help: "the reverse proxy's address: its requests are keyed on X-Forwarded-For",
    },
    OptionSpec {
        name: "log-level",
        value: Some("LEVEL"),
        default: "info",
        help: "error, warn, info, debug or trace",
    },
    OptionSpec {
        name: "log-file",
        value: Some("PATH"),
        default: "none",
        help: "also append the log, with timestamps, to this file",
    },
    OptionSpec {
        name: "debug",
        value: None,
        default: "off",
        help: "same as --log-level debug, and log netlab's output as it comes",
    },
    OptionSpec {
        name: "log-config",
        value: Some("PATH"),
        default: "none",
        help: "accepted for compatibility with the Python server; ignored",
    },
];

pub fn env_name(option: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        option.to_ascii_uppercase().replace('-', "_")
    )
}

pub fn help_text() -> String {
    let mut out = String::from(
        "neops-remote-lab: exclusive, queued access to this host's network lab over HTTP\n\n\
         Usage: neops-remote-lab [OPTIONS]\n       \
         neops-remote-lab cleanup [OPTIONS]\n       \
         neops-remote-lab reload [OPTIONS]\n       \
         neops-remote-lab drain [--wait] [OPTIONS]\n       \
         neops-remote-lab resume [OPTIONS]\n\n\
         `drain` asks the running server (at --host and --port, with the first\n\
         NAME:TOKEN:admin line of --token-file) to take no new sessions; the ones\n\
         there finish. With --wait it returns when the last one has ended.\n\
         `resume` takes new sessions again.\n\
         `reload` makes the running server re-read its token file (SIGHUP to the pid\n\
         in $MAINPID, else to the one holding the state dir's lock).\n\
         `cleanup` tears down the lab a stopped server left (and netlab's `default`\n\
         instance) and clears the state file; it refuses while a server runs.\n\n\
         Every option can also be set in the environment variable shown under it;\n\
         the command line wins.\n\nOptions:\n",
    );
    for opt in OPTIONS {
        let flag = match opt.value {
            Some(v) => format!("--{} {v}", opt.name),
            None => format!("--{}", opt.name),
        };
        out.push_str(&format!(
            "  {flag:<28} {} [default: {}]\n  {:<28} env: {}\n",
            opt.help,
            opt.default,
            "",
            env_name(opt.name)
        ));
    }
    out.push_str("  -h, --help                   print this help\n");
    out.push_str("  -V, --version                print the version\n");
    out
}

pub fn version_text() -> String {
    format!("neops-remote-lab {}", env!("CARGO_PKG_VERSION"))
}

#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub state_dir: PathBuf,
    pub active_timeout: Duration,
    pub waiting_timeout: Duration,
    pub sweep_interval: Duration,
    pub max_sessions: usize,
    pub netlab: PathBuf,
    pub netlab_timeout: Duration,
    /// `containerlab destroy` where netlab cannot tear a lab down (its snapshot is gone).
    pub containerlab: PathBuf,
    pub max_upload_bytes: u64,
    pub upload_timeout: Duration,
    /// Read and write timeout of every connection (`SO_RCVTIMEO`/`SO_SNDTIMEO`).
    pub client_timeout: Duration,
    /// Tear down a `default` netlab instance outside `<state dir>/labs` too.
    pub cleanup_foreign: bool,
    pub on_exit: OnExit,
    pub idle_lab_timeout: Duration,
    /// `--affinity-window`: how many waiting sessions a promotion ahead looks at.
    pub affinity_window: usize,
    /// `--max-skips`: how often a waiting session may be passed over; 0 is strict FIFO.
    pub max_skips: u32,
    /// `--slots`: labs that may run at once, each in a slot of its own.
    pub slots: usize,
    /// `--multilab-ids`: the netlab instance ids of the slots (used when `slots > 1`).
    pub multilab_ids: Vec<u16>,
    pub log_level: LevelFilter,
    pub log_file: Option<PathBuf>,
    /// `--debug`: netlab's output is logged line by line.
    pub stream_netlab_output: bool,
    /// `--log-config` was given (it is ignored, with a warning).
    pub log_config: Option<PathBuf>,
    /// `--token-file`: access tokens; `None` leaves the API open.
    pub token_file: Option<PathBuf>,
    /// `--public-read`: the read-only views need no token.
    pub public_read: bool,
    /// `--unhealthy-after`: failed starts in a row that make the host unhealthy.
    pub unhealthy_after: u32,
    /// `--health-topology`: started while unhealthy, to find out whether the host heals.
    pub health_topology: Option<PathBuf>,
    pub health_interval: Duration,
    /// `--trusted-proxy`: requests from this address are keyed (throttle, logs, events) on
    /// the last address of their `X-Forwarded-For`.
    pub trusted_proxy: Option<std::net::IpAddr>,
}

impl Config {
    /// The defaults, with `state_dir` as given.
    pub fn defaults(state_dir: PathBuf) -> Self {
        Config {
            host: "0.0.0.0".into(),
            port: 8000,
            workers: default_workers(),
            state_dir,
            active_timeout: Duration::from_secs(300),
            waiting_timeout: Duration::from_secs(600),
            sweep_interval: Duration::from_secs(5),
            max_sessions: 1000,
            netlab: PathBuf::from("netlab"),
            netlab_timeout: Duration::from_secs(1800),
            containerlab: PathBuf::from("containerlab"),
            max_upload_bytes: 16 * 1024 * 1024,
            upload_timeout: Duration::from_secs(60),
            client_timeout: Duration::from_secs(30),
            cleanup_foreign: false,
            on_exit: OnExit::Teardown,
            idle_lab_timeout: Duration::from_secs(3600),
            affinity_window: 8,
            max_skips: 2,
            slots: 1,
            multilab_ids: Vec::new(),
            log_level: LevelFilter::Info,
            log_file: None,
            stream_netlab_output: false,
            log_config: None,
            token_file: None,
            public_read: false,
            unhealthy_after: 3,
            health_topology: None,
            health_interval: Duration::from_secs(600),
            trusted_proxy: None,
        }
    }
}

impl Config {
    /// The netlab instance of each slot, in slot order: netlab's `default` (`None`) for one
    /// slot, else the first `slots` of `--multilab-ids` (default `1-N`).
    pub fn instances(&self) -> Vec<Option<u16>> {
        if self.slots <= 1 {
            return vec![None];
        }
        if self.multilab_ids.is_empty() {
            (1..=MAX_MULTILAB_ID)
                .filter(|id| *id != RESERVED_MULTILAB_ID)
                .take(self.slots)
                .map(Some)
                .collect()
        } else {
            self.multilab_ids
                .iter()
                .take(self.slots)
                .copied()
                .map(Some)
                .collect()
        }
    }
}

/// The largest multilab id netlab accepts.
pub const MAX_MULTILAB_ID: u16 = 200;

/// Most slots: every multilab id but the reserved one.
pub const MAX_SLOTS: usize = MAX_MULTILAB_ID as usize - 1;

/// The management subnet netlab uses without the multilab plugin (192.168.121.0/24): the id
/// that would give a slot the same subnet as a `default` lab.
pub const RESERVED_MULTILAB_ID: u16 = 121;

/// `--multilab-ids`: ids and ranges separated by commas (`1-3,7`), each 1–200, not 121, no
/// id twice.
pub fn parse_multilab_ids(text: &str) -> Result<Vec<u16>, String> {
    let mut ids: Vec<u16> = Vec::new();
    let number = |t: &str| -> Result<u16, String> {
        t.trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=MAX_MULTILAB_ID).contains(n))
            .ok_or_else(|| format!("{:?} is not an id from 1 to 200", t.trim()))
    };
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err("an empty entry".into());
        }
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(part)?;
                (n, n)
            }
        };
        if first > last {
            return Err(format!("{part:?} is a range that goes down"));
        }
        for id in first..=last {
            if id == RESERVED_MULTILAB_ID {
                return Err("121 is netlab's default management subnet (192.168.121.0/24)".into());
            }
            if ids.contains(&id) {
                return Err(format!("{id} is named twice"));
            }
            ids.push(id);
        }
    }
    Ok(ids)
}

fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 2).max(4)
}

/// What SIGTERM does with a running lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// Tear it down (as the Python server did).
    Teardown,
    /// Leave it up; the next start adopts it from the state file.
    Keep,
}

pub enum Command {
    Serve(Box<Config>),
    /// `neops-remote-lab cleanup`: tear down what a stopped server left.
    Cleanup(Box<Config>),
    /// `neops-remote-lab reload`: SIGHUP to the running server.
    Reload(Box<Config>),
    /// `neops-remote-lab drain [--wait]`: the running server takes no new sessions.
    Drain {
        config: Box<Config>,
        wait: bool,
    },
    /// `neops-remote-lab resume`: the running server takes new sessions again.
    Resume(Box<Config>),
    Help,
    Version,
}

/// A bad command line or environment; the process exits 2 with this message.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a value came from, for error messages that name it.
fn source_name(option: &str, from_env: bool) -> String {
    if from_env {
        format!("{} (--{option})", env_name(option))
    } else {
        format!("--{option}")
    }
}

/// Parses the command line (without the program name), falling back to `env` for options
/// not given.
pub fn parse<I, E>(args: I, env: E) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = OsString>,
    E: Fn(&str) -> Option<OsString>,
{
    use lexopt::prelude::*;

    let mut given: Vec<(&'static str, Option<OsString>)> = Vec::new();
    let mut command: Option<&'static str> = None;
    let mut wait = false;
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| ConfigError(e.to_string()))? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("wait") => wait = true,
            Long(name) => {
                let spec = OPTIONS
                    .iter()
                    .find(|o| o.name == name)
                    .ok_or_else(|| ConfigError(format!("unknown option --{name}")))?;
                let value = match spec.value {
                    Some(_) => Some(parser.value().map_err(|e| ConfigError(e.to_string()))?),
                    None => None,
                };
                given.retain(|(n, _)| *n != spec.name);
                given.push((spec.name, value));
            }
            Value(word) if command.is_none() => {
                command = Some(
                    SUBCOMMANDS
                        .iter()
                        .find(|c| word == **c)
                        .copied()
                        .ok_or_else(|| Value(word).unexpected())
                        .map_err(|e| ConfigError(e.to_string()))?,
                );
            }
            other => return Err(ConfigError(other.unexpected().to_string())),
        }
    }

    // The value of an option: the command line's, else the environment's.
    let lookup = |name: &'static str| -> Option<(String, bool)> {
        if let Some((_, v)) = given.iter().find(|(n, _)| *n == name) {
            let text = v
                .as_ref()
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_else(|| "true".into());
            return Some((text, false));
        }
        env(&env_name(name)).map(|v| (v.to_string_lossy().into_owned(), true))
    };

    let state_dir = match lookup("state-dir") {
        Some((v, from_env)) if v.is_empty() => {
            return Err(ConfigError(format!(
                "{}: must not be empty",
                source_name("state-dir", from_env)
            )));
        }
        Some((v, _)) => PathBuf::from(v),
        None => default_state_dir(rustix::process::geteuid().is_root(), &env)?,
    };
    let mut config = Config::defaults(state_dir);

    if let Some((v, _)) = lookup("host") {
        config.host = v;
    }
    if let Some((v, e)) = lookup("port") {
        config.port = v
            .trim()
            .parse()
            .map_err(|_| bad("port", e, &v, "a port number from 0 to 65535"))?;
    }
    if let Some((v, e)) = lookup("workers") {
        config.workers = parse_count(&v, "workers", e, 1, 1024)?;
    }
    if let Some((v, e)) = lookup("max-sessions") {
        config.max_sessions = parse_count(&v, "max-sessions", e, 1, 10_000_000)?;
    }
    if let Some((v, e)) = lookup("active-timeout") {
        config.active_timeout = parse_seconds(&v, "active-timeout", e)?;
    }
    if let Some((v, e)) = lookup("waiting-timeout") {
        config.waiting_timeout = parse_seconds(&v, "waiting-timeout", e)?;
    }
    if let Some((v, e)) = lookup("sweep-interval") {
        config.sweep_interval = parse_seconds(&v, "sweep-interval", e)?;
    }
    if let Some((v, e)) = lookup("netlab-timeout") {
        config.netlab_timeout = parse_seconds(&v, "netlab-timeout", e)?;
    }
    if let Some((v, e)) = lookup("netlab") {
        if v.is_empty() {
            return Err(bad("netlab", e, &v, "a path or a command name"));
        }
        config.netlab = PathBuf::from(v);
    }
    if let Some((v, e)) = lookup("containerlab") {
        if v.is_empty() {
            return Err(bad("containerlab", e, &v, "a path or a command name"));
        }
        config.containerlab = PathBuf::from(v);
    }
    if let Some((v, e)) = lookup("max-upload-bytes") {
        config.max_upload_bytes = parse_count(&v, "max-upload-bytes", e, 1, 1 << 40)? as u64;
    }
    if let Some((v, e)) = lookup("upload-timeout") {
        config.upload_timeout = parse_seconds(&v, "upload-timeout", e)?;
    }
    if let Some((v, e)) = lookup("client-timeout") {
        config.client_timeout = parse_seconds(&v, "client-timeout", e)?;
    }
    if let Some((v, e)) = lookup("cleanup-foreign") {
        config.cleanup_foreign =
            parse_bool(&v).ok_or_else(|| bad("cleanup-foreign", e, &v, "a boolean"))?;
    }
    if let Some((v, e)) = lookup("idle-lab-timeout") {
        config.idle_lab_timeout = parse_seconds(&v, "idle-lab-timeout", e)?;
    }
    if let Some((v, e)) = lookup("affinity-window") {
        config.affinity_window = parse_count(&v, "affinity-window", e, 0, 10_000_000)?;
    }
    if let Some((v, e)) = lookup("max-skips") {
        config.max_skips = parse_count(&v, "max-skips", e, 0, 1_000_000)? as u32;
    }
    if let Some((v, e)) = lookup("slots") {
        config.slots = parse_count(&v, "slots", e, 1, MAX_SLOTS)?;
    }
    if let Some((v, e)) = lookup("multilab-ids") {
        config.multilab_ids = parse_multilab_ids(&v).map_err(|why| {
            ConfigError(format!(
                "{}: {why} (want ids 1-200 such as 1-3 or 4,7,9, never 121)",
                source_name("multilab-ids", e)
            ))
        })?;
    }
    if config.slots > 1
        && !config.multilab_ids.is_empty()
        && config.multilab_ids.len() < config.slots
    {
        return Err(ConfigError(format!(
            "--slots {} needs {} multilab ids, --multilab-ids names {}",
            config.slots,
            config.slots,
            config.multilab_ids.len()
        )));
    }
    if let Some((v, e)) = lookup("on-exit") {
        config.on_exit = match v.trim().to_ascii_lowercase().as_str() {
            "teardown" => OnExit::Teardown,
            "keep" => OnExit::Keep,
            _ => return Err(bad("on-exit", e, &v, "teardown or keep")),
        };
    }
    if let Some((v, e)) = lookup("log-level") {
        config.log_level = parse_level(&v)
            .ok_or_else(|| bad("log-level", e, &v, "one of error, warn, info, debug, trace"))?;
    }
    if let Some((v, e)) = lookup("debug")
        && parse_bool(&v).ok_or_else(|| bad("debug", e, &v, "a boolean"))?
    {
        config.stream_netlab_output = true;
        config.log_level = config.log_level.max(LevelFilter::Debug);
    }
    if let Some((v, _)) = lookup("log-file") {
        config.log_file = (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if let Some((v, _)) = lookup("token-file") {
        config.token_file = (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if let Some((v, e)) = lookup("public-read") {
        config.public_read =
            parse_bool(&v).ok_or_else(|| bad("public-read", e, &v, "a boolean"))?;
    }
    if let Some((v, e)) = lookup("trusted-proxy") {
        config.trusted_proxy = match v.trim() {
            "" => None,
            text => Some(
                text.parse()
                    .map_err(|_| bad("trusted-proxy", e, &v, "an IP address"))?,
            ),
        };
    }
    if let Some((v, _)) = lookup("log-config") {
        config.log_config = (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if let Some((v, e)) = lookup("unhealthy-after") {
        config.unhealthy_after = parse_count(&v, "unhealthy-after", e, 1, 1000)? as u32;
    }
    if let Some((v, _)) = lookup("health-topology") {
        config.health_topology = (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if let Some((v, e)) = lookup("health-interval") {
        config.health_interval = parse_seconds(&v, "health-interval", e)?;
    }
    if wait && command != Some("drain") {
        return Err(ConfigError("--wait goes with `drain` only".into()));
    }
    let config = Box::new(config);
    Ok(match command {
        None => Command::Serve(config),
        Some("cleanup") => Command::Cleanup(config),
        Some("reload") => Command::Reload(config),
        Some("drain") => Command::Drain { config, wait },
        Some(_) => Command::Resume(config),
    })
}

/// The words that name a command other than serving.
const SUBCOMMANDS: &[&str] = &["cleanup", "reload", "drain", "resume"];

/// Where the state lives when `--state-dir` is not given: never in a world-writable
/// directory such as /tmp, where another local user could prepare it. Root (the packaged
/// service) uses /var/lib/neops-remote-lab; anyone else `$XDG_STATE_HOME/neops-remote-lab`,
/// by default `~/.local/state/neops-remote-lab`.
pub fn default_state_dir<E>(root: bool, env: &E) -> Result<PathBuf, ConfigError>
where
    E: Fn(&str) -> Option<OsString>,
{
    if root {
        return Ok(PathBuf::from("/var/lib/neops-remote-lab"));
    }
    let absolute = |v: OsString| {
        let p = PathBuf::from(v);
        p.is_absolute().then_some(p)
    };
    if let Some(base) = env("XDG_STATE_HOME").and_then(absolute) {
        return Ok(base.join("neops-remote-lab"));
    }
    match env("HOME").and_then(absolute) {
        Some(home) => Ok(home.join(".local/state/neops-remote-lab")),
        None => Err(ConfigError(
            "no --state-dir given and neither XDG_STATE_HOME nor HOME is set to an absolute path"
                .into(),
        )),
    }
}

fn bad(option: &str, from_env: bool, value: &str, expected: &str) -> ConfigError {
    ConfigError(format!(
        "{}: invalid value {value:?}: expected {expected}",
        source_name(option, from_env)
    ))
}

fn parse_count(
    v: &str,
    option: &str,
    from_env: bool,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            bad(
                option,
                from_env,
                v,
                &format!("a whole number from {min} to {max}"),
            )
        })
}

/// Seconds, whole or fractional (`0.5`), greater than zero.
fn parse_seconds(v: &str, option: &str, from_env: bool) -> Result<Duration, ConfigError> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| bad(option, from_env, v, "a number of seconds greater than 0"))
}

/// Log levels, case-insensitive; the Python server's names (`WARNING`, `CRITICAL`) too, so
/// its unit files keep working.
pub fn parse_level(v: &str) -> Option<LevelFilter> {
    Some(match v.trim().to_ascii_lowercase().as_str() {
        "error" | "critical" | "fatal" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Booleans as the API accepts them: true/false, 1/0, yes/no, on/off, t/f, y/n, any case.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Some(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn serve(list: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("HOME".into(), "/home/test".into()));
        match parse(args(list), |k| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| OsString::from(v))
        })? {
            Command::Serve(c) | Command::Cleanup(c) => Ok(*c),
            _ => panic!("not a serve command"),
        }
    }

    #[test]
    fn defaults() {
        let c = serve(&[], &[]).unwrap();
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.port, 8000);
        assert!(c.workers >= 4);
        assert_eq!(c.active_timeout, Duration::from_secs(300));
        assert_eq!(c.waiting_timeout, Duration::from_secs(600));
        assert_eq!(c.sweep_interval, Duration::from_secs(5));
        assert_eq!(c.max_sessions, 1000);
        assert_eq!(c.max_upload_bytes, 16 * 1024 * 1024);
        assert_eq!(c.log_level, LevelFilter::Info);
        assert_eq!(c.client_timeout, Duration::from_secs(30));
        assert!(!c.cleanup_foreign);
    }

    #[test]
    fn command_line_wins_over_environment() {
        let c = serve(
            &["--port", "9000"],
            &[
                ("NEOPS_REMOTE_LAB_PORT", "7000"),
                ("NEOPS_REMOTE_LAB_HOST", "::1"),
            ],
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.host, "::1");
        let c = serve(&["--port=9001"], &[]).unwrap();
        assert_eq!(c.port, 9001);
    }

    #[test]
    fn slots_and_their_multilab_ids() {
        let c = serve(&[], &[]).unwrap();
        assert_eq!((c.slots, c.instances()), (1, vec![None]));
        let c = serve(&["--slots", "3"], &[]).unwrap();
        assert_eq!(c.instances(), vec![Some(1), Some(2), Some(3)]);
        let c = serve(&["--slots", "2", "--multilab-ids", "4,7-9"], &[]).unwrap();
        assert_eq!(c.instances(), vec![Some(4), Some(7)]);
        let c = serve(&[], &[("NEOPS_REMOTE_LAB_SLOTS", "199")]).unwrap();
        let ids = c.instances();
        assert_eq!(ids.len(), 199);
        assert!(!ids.contains(&Some(121)) && ids.contains(&Some(200)));
        for (args, why) in [
            (&["--slots", "0"][..], "--slots: invalid value"),
            (&["--slots", "200"][..], "--slots: invalid value"),
            (
                &["--multilab-ids", "120-122"][..],
                "121 is netlab's default",
            ),
            (&["--multilab-ids", "0"][..], "not an id from 1 to 200"),
            (&["--multilab-ids", "201"][..], "not an id from 1 to 200"),
            (&["--multilab-ids", "1,2,1"][..], "1 is named twice"),
            (&["--multilab-ids", "3-1"][..], "goes down"),
            (&["--multilab-ids", "1,,2"][..], "an empty entry"),
            (
                &["--slots", "3", "--multilab-ids", "1,2"][..],
                "needs 3 multilab ids",
            ),
        ] {
            let e = serve(args, &[]).unwrap_err();
            assert!(e.0.contains(why), "{args:?}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_flag_or_the_variable() {
        let e = serve(&["--port", "http"], &[]).unwrap_err();
        assert!(e.0.starts_with("--port: invalid value \"http\""), "{e}");
        let e = serve(&[], &[("NEOPS_REMOTE_LAB_ACTIVE_TIMEOUT", "-1")]).unwrap_err();
        assert!(
            e.0.starts_with("NEOPS_REMOTE_LAB_ACTIVE_TIMEOUT (--active-timeout)"),
            "{e}"
        );
        let e = serve(&["--log-level", "loud"], &[]).unwrap_err();
        assert!(e.0.contains("--log-level"), "{e}");
        let e = serve(&["--bogus"], &[]).unwrap_err();
        assert_eq!(e.0, "unknown option --bogus");
        let e = serve(&["--workers", "0"], &[]).unwrap_err();
        assert!(e.0.contains("--workers"), "{e}");
    }

    #[test]
    fn python_server_flags_keep_working() {
        let c = serve(
            &["--debug", "--log-level", "INFO", "--log-config", "log.yaml"],
            &[],
        )
        .unwrap();
        assert_eq!(c.log_level, LevelFilter::Debug);
        assert!(c.stream_netlab_output);
        assert_eq!(c.log_config, Some(PathBuf::from("log.yaml")));
        let c = serve(&["--log-level", "WARNING"], &[]).unwrap();
        assert_eq!(c.log_level, LevelFilter::Warn);
    }

    #[test]
    fn on_exit_and_the_cleanup_command() {
        assert_eq!(serve(&[], &[]).unwrap().on_exit, OnExit::Teardown);
        let c = serve(&[], &[("NEOPS_REMOTE_LAB_ON_EXIT", "keep")]).unwrap();
        assert_eq!(c.on_exit, OnExit::Keep);
        assert!(serve(&["--on-exit", "explode"], &[]).is_err());
        let parsed = parse(args(&["cleanup", "--state-dir", "/x"]), |_| None).unwrap();
        assert!(matches!(parsed, Command::Cleanup(c) if c.state_dir == std::path::Path::new("/x")));
        assert!(serve(&["frobnicate"], &[]).is_err());
    }

    #[test]
    fn the_default_state_dir_is_never_in_the_temp_dir() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            default_state_dir(true, &env(&[("HOME", "/home/u")])).unwrap(),
            PathBuf::from("/var/lib/neops-remote-lab")
        );
        assert_eq!(
            default_state_dir(false, &env(&[("HOME", "/home/u")])).unwrap(),
            PathBuf::from("/home/u/.local/state/neops-remote-lab")
        );
        assert_eq!(
            default_state_dir(
                false,
                &env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "/s")])
            )
            .unwrap(),
            PathBuf::from("/s/neops-remote-lab")
        );
        // A relative XDG_STATE_HOME is ignored, as the XDG spec says.
        assert_eq!(
            default_state_dir(false, &env(&[("HOME", "/h"), ("XDG_STATE_HOME", "rel")])).unwrap(),
            PathBuf::from("/h/.local/state/neops-remote-lab")
        );
        assert!(default_state_dir(false, &env(&[])).is_err());
        let c = serve(&[], &[]).unwrap();
        assert!(
            !c.state_dir.starts_with(std::env::temp_dir()),
            "{:?}",
            c.state_dir
        );
        let c = serve(&["--client-timeout", "2.5", "--cleanup-foreign"], &[]).unwrap();
        assert_eq!(c.client_timeout, Duration::from_millis(2500));
        assert!(c.cleanup_foreign);
    }

    #[test]
    fn drain_resume_and_the_health_flags() {
        let parsed = parse(args(&["drain", "--wait", "--port", "9"]), |_| None).unwrap();
        assert!(matches!(parsed, Command::Drain { config, wait: true } if config.port == 9));
        let parsed = parse(args(&["--port", "9", "drain"]), |_| None).unwrap();
        assert!(matches!(parsed, Command::Drain { wait: false, .. }));
        let parsed = parse(args(&["resume"]), |_| None).unwrap();
        assert!(matches!(parsed, Command::Resume(_)));
        let e = parse(args(&["resume", "--wait"]), |_| None).err().unwrap();
        assert_eq!(e.0, "--wait goes with `drain` only");
        assert!(parse(args(&["--wait"]), |_| None).is_err());
        assert!(parse(args(&["drain", "resume"]), |_| None).is_err());

        let c = serve(&[], &[]).unwrap();
        assert_eq!(c.unhealthy_after, 3);
        assert_eq!(c.health_topology, None);
        assert_eq!(c.health_interval, Duration::from_secs(600));
        let c = serve(
            &["--unhealthy-after", "5", "--health-interval", "0.5"],
            &[("NEOPS_REMOTE_LAB_HEALTH_TOPOLOGY", "/etc/h.yml")],
        )
        .unwrap();
        assert_eq!(c.unhealthy_after, 5);
        assert_eq!(c.health_interval, Duration::from_millis(500));
        assert_eq!(c.health_topology, Some(PathBuf::from("/etc/h.yml")));
        assert!(serve(&["--unhealthy-after", "0"], &[]).is_err());
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let c = serve(&["--sweep-interval", "0.25"], &[]).unwrap();
        assert_eq!(c.sweep_interval, Duration::from_millis(250));
    }

    #[test]
    fn help_lists_every_option_with_its_default_and_variable() {
        let help = help_text();
        for opt in OPTIONS {
            assert!(help.contains(&format!("--{}", opt.name)));
            assert!(help.contains(&env_name(opt.name)));
            assert!(help.contains(&format!("[default: {}]", opt.default)));
        }
    }

    #[test]
    fn booleans() {
        for t in ["true", "TRUE", "1", "yes", "On", "t", "Y"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["false", "0", "no", "OFF", "f", "n"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_bool(""), None);
    }
}
