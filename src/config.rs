//! Command line and environment. Every option `--some-flag` falls back to the environment
//! variable `NEOPS_REMOTE_LAB_SOME_FLAG`; the command line wins.
//!
//! Why one file of this size: the table of options (one entry each: name, default, help and
//! the reader of its value) is half of it, and a fifth is tests.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

pub const ENV_PREFIX: &str = "NEOPS_REMOTE_LAB_";

/// One option: its long name, the placeholder of its value (None for a switch), its default
/// as the help shows it, what it does, and how its value is read into the [`Config`]. The
/// table is the one place an option is named and its default given: parsing, `--help`,
/// [`Config::defaults`] and the docs test all read it.
pub struct OptionSpec {
    pub name: &'static str,
    pub value: Option<&'static str>,
    pub default: &'static str,
    pub help: &'static str,
    /// `default` is a value `set` takes, applied by [`Config::defaults`]; otherwise it is
    /// words for a default computed in code (the CPU count, the state dir) or none.
    pub default_is_value: bool,
    /// Reads (and checks) a value given on the command line, in the environment, or as the
    /// default.
    set: fn(&mut Config, &str, &Source) -> Result<(), ConfigError>,
}

/// Where a value came from, for the messages that refuse it.
pub struct Source {
    option: &'static str,
    from_env: bool,
}

impl Source {
    fn name(&self) -> String {
        source_name(self.option, self.from_env)
    }

    fn bad(&self, value: &str, expected: &str) -> ConfigError {
        bad(self.option, self.from_env, value, expected)
    }

    fn count(&self, v: &str, min: usize, max: usize) -> Result<usize, ConfigError> {
        parse_count(v, self.option, self.from_env, min, max)
    }

    fn seconds(&self, v: &str) -> Result<Duration, ConfigError> {
        parse_seconds(v, self.option, self.from_env)
    }

    fn boolean(&self, v: &str) -> Result<bool, ConfigError> {
        parse_bool(v).ok_or_else(|| self.bad(v, "a boolean"))
    }

    /// A program: a path or a name looked up on `PATH`.
    fn command(&self, v: &str) -> Result<PathBuf, ConfigError> {
        if v.is_empty() {
            return Err(self.bad(v, "a path or a command name"));
        }
        Ok(PathBuf::from(v))
    }

    fn state_dir(&self, v: &str) -> Result<PathBuf, ConfigError> {
        if v.is_empty() {
            return Err(ConfigError(format!("{}: must not be empty", self.name())));
        }
        Ok(PathBuf::from(v))
    }
}

/// An optional path: empty means none.
fn optional_path(v: &str) -> Option<PathBuf> {
    (!v.is_empty()).then(|| PathBuf::from(v))
}

/// Every option, in the order `--help` lists them.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "host",
        value: Some("ADDR"),
        default: "0.0.0.0",
        help: "address to listen on",
        default_is_value: true,
        set: |c, v, _| {
            c.host = v.to_owned();
            Ok(())
        },
    },
    OptionSpec {
        name: "port",
        value: Some("PORT"),
        default: "8000",
        help: "TCP port to listen on (0 picks a free one)",
        default_is_value: true,
        set: |c, v, src| {
            c.port = v
                .trim()
                .parse()
                .map_err(|_| src.bad(v, "a port number from 0 to 65535"))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "workers",
        value: Some("N"),
        default: "twice the CPU count, at least 4",
        help: "worker threads answering requests",
        default_is_value: false,
        set: |c, v, src| {
            c.workers = src.count(v, 1, 1024)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "state-dir",
        value: Some("DIR"),
        default: "/var/lib/neops-remote-lab as root, else ~/.local/state/neops-remote-lab",
        help: "state file, lock file and lab work directories (0700, ours alone)",
        default_is_value: false,
        set: |c, v, src| {
            c.state_dir = src.state_dir(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "active-timeout",
        value: Some("SECONDS"),
        default: "300",
        help: "reap the ACTIVE session after this much silence",
        default_is_value: true,
        set: |c, v, src| {
            c.active_timeout = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "waiting-timeout",
        value: Some("SECONDS"),
        default: "600",
        help: "reap a WAITING session after this much silence",
        default_is_value: true,
        set: |c, v, src| {
            c.waiting_timeout = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "sweep-interval",
        value: Some("SECONDS"),
        default: "5",
        help: "how often stale sessions are looked for",
        default_is_value: true,
        set: |c, v, src| {
            c.sweep_interval = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "max-sessions",
        value: Some("N"),
        default: "1000",
        help: "sessions allowed at once; more get 503",
        default_is_value: true,
        set: |c, v, src| {
            c.max_sessions = src.count(v, 1, 10_000_000)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "netlab",
        value: Some("PATH"),
        default: "netlab",
        help: "the netlab command (a path, or a name looked up on PATH)",
        default_is_value: true,
        set: |c, v, src| {
            c.netlab = src.command(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "netlab-timeout",
        value: Some("SECONDS"),
        default: "1800",
        help: "give up on `netlab up` after this long",
        default_is_value: true,
        set: |c, v, src| {
            c.netlab_timeout = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "containerlab",
        value: Some("PATH"),
        default: "containerlab",
        help: "the containerlab command, for a lab whose netlab snapshot is gone",
        default_is_value: true,
        set: |c, v, src| {
            c.containerlab = src.command(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "max-upload-bytes",
        value: Some("BYTES"),
        default: "16777216",
        help: "largest POST /lab body accepted",
        default_is_value: true,
        set: |c, v, src| {
            c.max_upload_bytes = src.count(v, 1, 1 << 40)? as u64;
            Ok(())
        },
    },
    OptionSpec {
        name: "upload-timeout",
        value: Some("SECONDS"),
        default: "60",
        help: "give up on a POST /lab upload that takes longer",
        default_is_value: true,
        set: |c, v, src| {
            c.upload_timeout = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "client-timeout",
        value: Some("SECONDS"),
        default: "30",
        help: "close a connection that sends or takes nothing for this long",
        default_is_value: true,
        set: |c, v, src| {
            c.client_timeout = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "cleanup-foreign",
        value: None,
        default: "off",
        help: "tear down netlab's `default` instance even when it is not in our state dir",
        default_is_value: true,
        set: |c, v, src| {
            c.cleanup_foreign = src.boolean(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "on-exit",
        value: Some("ACTION"),
        default: "teardown",
        help: "on SIGTERM: teardown the lab, or keep it for the next start to adopt",
        default_is_value: true,
        set: |c, v, src| {
            c.on_exit = match v.trim().to_ascii_lowercase().as_str() {
                "teardown" => OnExit::Teardown,
                "keep" => OnExit::Keep,
                _ => return Err(src.bad(v, "teardown or keep")),
            };
            Ok(())
        },
    },
    OptionSpec {
        name: "idle-lab-timeout",
        value: Some("SECONDS"),
        default: "3600",
        help: "tear down a lab left idle with no session for this long",
        default_is_value: true,
        set: |c, v, src| {
            c.idle_lab_timeout = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "unhealthy-after",
        value: Some("N"),
        default: "3",
        help: "starts failing in a row for reasons not the topology's before the host is unhealthy",
        default_is_value: true,
        set: |c, v, src| {
            c.unhealthy_after = src.count(v, 1, 1000)? as u32;
            Ok(())
        },
    },
    OptionSpec {
        name: "health-topology",
        value: Some("FILE"),
        default: "none: only POST /admin/health/reset heals",
        help: "while unhealthy, start this topology every --health-interval; a success heals",
        default_is_value: false,
        set: |c, v, _| {
            c.health_topology = optional_path(v);
            Ok(())
        },
    },
    OptionSpec {
        name: "health-interval",
        value: Some("SECONDS"),
        default: "600",
        help: "how often an unhealthy host tries --health-topology",
        default_is_value: true,
        set: |c, v, src| {
            c.health_interval = src.seconds(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "affinity-window",
        value: Some("N"),
        default: "8",
        help: "a waiting session this far up that declared the idle lab may go first",
        default_is_value: true,
        set: |c, v, src| {
            c.affinity_window = src.count(v, 0, 10_000_000)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "max-skips",
        value: Some("N"),
        default: "2",
        help: "times a waiting session may be passed over that way; 0: strict FIFO",
        default_is_value: true,
        set: |c, v, src| {
            c.max_skips = src.count(v, 0, 1_000_000)? as u32;
            Ok(())
        },
    },
    OptionSpec {
        name: "slots",
        value: Some("N"),
        default: "1",
        help: "labs run at once (1: netlab's default instance; more: its multilab plugin)",
        default_is_value: true,
        set: |c, v, src| {
            c.slots = src.count(v, 1, MAX_SLOTS)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "multilab-ids",
        value: Some("IDS"),
        default: "1-N",
        help: "netlab multilab instance ids of the slots, e.g. 1-3 or 4,7,9 (never 121)",
        default_is_value: false,
        set: |c, v, src| {
            c.multilab_ids = parse_multilab_ids(v).map_err(|why| {
                ConfigError(format!(
                    "{}: {why} (want ids 1-200 such as 1-3 or 4,7,9, never 121)",
                    src.name()
                ))
            })?;
            Ok(())
        },
    },
    OptionSpec {
        name: "token-file",
        value: Some("PATH"),
        default: "none: no authentication",
        help: "NAME:TOKEN[:admin] lines; every route but /healthz needs a token",
        default_is_value: false,
        set: |c, v, _| {
            c.token_file = optional_path(v);
            Ok(())
        },
    },
    OptionSpec {
        name: "public-read",
        value: None,
        default: "off",
        help: "with --token-file: the read-only views need no token",
        default_is_value: true,
        set: |c, v, src| {
            c.public_read = src.boolean(v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "trusted-proxy",
        value: Some("ADDR"),
        default: "none",
        help: "the reverse proxy's address: its requests are keyed on X-Forwarded-For",
        default_is_value: false,
        set: |c, v, src| {
            c.trusted_proxy = match v.trim() {
                "" => None,
                text => Some(text.parse().map_err(|_| src.bad(v, "an IP address"))?),
            };
            Ok(())
        },
    },
    OptionSpec {
        name: "log-level",
        value: Some("LEVEL"),
        default: "info",
        help: "error, warn, info, debug or trace",
        default_is_value: true,
        set: |c, v, src| {
            c.log_level = parse_level(v)
                .ok_or_else(|| src.bad(v, "one of error, warn, info, debug, trace"))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "log-file",
        value: Some("PATH"),
        default: "none",
        help: "also append the log, with timestamps, to this file",
        default_is_value: false,
        set: |c, v, _| {
            c.log_file = optional_path(v);
            Ok(())
        },
    },
    OptionSpec {
        name: "debug",
        value: None,
        default: "off",
        help: "same as --log-level debug, and log netlab's output as it comes",
        default_is_value: true,
        set: |c, v, src| {
            if src.boolean(v)? {
                c.stream_netlab_output = true;
                c.log_level = c.log_level.max(LevelFilter::Debug);
            }
            Ok(())
        },
    },
    OptionSpec {
        name: "log-config",
        value: Some("PATH"),
        default: "none",
        help: "accepted for compatibility with the Python server; ignored",
        default_is_value: false,
        set: |c, v, _| {
            c.log_config = optional_path(v);
            Ok(())
        },
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
    /// The defaults, with `state_dir` as given: each option's default from [`OPTIONS`], read
    /// by the same code as a value given on the command line; those the table describes in
    /// words are computed here.
    pub fn defaults(state_dir: PathBuf) -> Self {
        let mut config = Config {
            host: String::new(),
            port: 0,
            workers: default_workers(),
            state_dir,
            active_timeout: Duration::ZERO,
            waiting_timeout: Duration::ZERO,
            sweep_interval: Duration::ZERO,
            max_sessions: 0,
            netlab: PathBuf::new(),
            netlab_timeout: Duration::ZERO,
            containerlab: PathBuf::new(),
            max_upload_bytes: 0,
            upload_timeout: Duration::ZERO,
            client_timeout: Duration::ZERO,
            cleanup_foreign: false,
            on_exit: OnExit::Teardown,
            idle_lab_timeout: Duration::ZERO,
            affinity_window: 0,
            max_skips: 0,
            slots: 0,
            multilab_ids: Vec::new(),
            log_level: LevelFilter::Off,
            log_file: None,
            stream_netlab_output: false,
            log_config: None,
            token_file: None,
            public_read: false,
            unhealthy_after: 0,
            health_topology: None,
            health_interval: Duration::ZERO,
            trusted_proxy: None,
        };
        for opt in OPTIONS.iter().filter(|o| o.default_is_value) {
            let source = Source {
                option: opt.name,
                from_env: false,
            };
            if let Err(e) = (opt.set)(&mut config, opt.default, &source) {
                // The table's own defaults; a unit test reads every one.
                unreachable!("the default of --{}: {e}", opt.name);
            }
        }
        config
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
        Some((v, from_env)) => Source {
            option: "state-dir",
            from_env,
        }
        .state_dir(&v)?,
        None => default_state_dir(rustix::process::geteuid().is_root(), &env)?,
    };
    let mut config = Config::defaults(state_dir);
    for opt in OPTIONS.iter().filter(|o| o.name != "state-dir") {
        if let Some((v, from_env)) = lookup(opt.name) {
            let source = Source {
                option: opt.name,
                from_env,
            };
            (opt.set)(&mut config, &v, &source)?;
        }
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
