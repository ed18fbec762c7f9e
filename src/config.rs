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
         neops-remote-lab reload [OPTIONS]\n\n\
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
            log_level: LevelFilter::Info,
            log_file: None,
            stream_netlab_output: false,
            log_config: None,
            token_file: None,
            public_read: false,
        }
    }
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
    let mut cleanup = false;
    let mut reload = false;
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| ConfigError(e.to_string()))? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
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
            Value(word) if word == "cleanup" && !cleanup && !reload => cleanup = true,
            Value(word) if word == "reload" && !cleanup && !reload => reload = true,
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
    if let Some((v, _)) = lookup("log-config") {
        config.log_config = (!v.is_empty()).then(|| PathBuf::from(v));
    }
    if reload {
        Ok(Command::Reload(Box::new(config)))
    } else if cleanup {
        Ok(Command::Cleanup(Box::new(config)))
    } else {
        Ok(Command::Serve(Box::new(config)))
    }
}

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
