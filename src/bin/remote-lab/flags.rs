//! The command line: one table of flags drives both the parsing and `--help`, and holds
//! each default once.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Which subcommands take a flag.
#[derive(Clone, Copy, PartialEq, Eq)]
enum For {
    Run,
    Status,
    Both,
}

/// One flag: its name, its value's name (none: a switch), the commands that take it, its
/// default (applied through the same parsing as a given value) and its help.
struct Flag {
    name: &'static str,
    value: Option<&'static str>,
    takes: For,
    default: Option<&'static str>,
    help: &'static str,
}

/// Every flag, in the order `--help` lists them.
const FLAGS: &[Flag] = &[
    Flag {
        name: "url",
        value: Some("URL"),
        takes: For::Both,
        default: None,
        help: "a lab host; repeatable. Default: $REMOTE_LAB_URL (several URLs\n\
               separated by commas or spaces). Credentials in the URL\n\
               (https://ci:TOKEN@lab1:8000) are used for that host only",
    },
    Flag {
        name: "topology",
        value: Some("FILE"),
        takes: For::Run,
        default: None,
        help: "netlab topology to start (without it the run holds the session\n\
               only: an exclusive lock on the host)",
    },
    Flag {
        name: "extra-file",
        value: Some("PATH"),
        takes: For::Run,
        default: None,
        help: "a file netlab needs next to the topology (sent with its path\n\
               relative to the topology's directory); repeatable",
    },
    Flag {
        name: "no-reuse",
        value: None,
        takes: For::Run,
        default: None,
        help: "start a fresh lab even if the same topology runs",
    },
    Flag {
        name: "name",
        value: Some("TEXT"),
        takes: For::Run,
        default: None,
        help: "who is asking (X-Client-Name). Default: the CI job URL\n\
               ($CI_JOB_URL, $BUILD_URL, GitHub's run URL), else user@host",
    },
    Flag {
        name: "choices",
        value: Some("D"),
        takes: For::Run,
        default: Some("2"),
        help: "join the queues of the D best hosts at once, keep the first\n\
               session that becomes active and end the others (1: one host)",
    },
    Flag {
        name: "wait-timeout",
        value: Some("S"),
        takes: For::Run,
        default: Some("3600"),
        help: "give up waiting for the turn (or a busy lab) after S seconds",
    },
    Flag {
        name: "devices-file",
        value: Some("PATH"),
        takes: For::Run,
        default: None,
        help: "where to write the devices JSON (default: a temporary file\n\
               in $TMPDIR, mode 0600, removed at the end)",
    },
    Flag {
        name: "on-lost",
        value: Some("MODE"),
        takes: For::Run,
        default: Some("terminate"),
        help: "when the session is lost while COMMAND runs: terminate\n\
               (SIGTERM to COMMAND) or warn",
    },
    Flag {
        name: "token",
        value: Some("TOKEN"),
        takes: For::Both,
        default: None,
        help: "access token (Authorization: Bearer) for the hosts that have\n\
               none in their URL or in ~/.netrc (or $NETRC). Default:\n\
               $REMOTE_LAB_TOKEN",
    },
    Flag {
        name: "json",
        value: None,
        takes: For::Status,
        default: None,
        help: "(status) print JSON instead of a table",
    },
];

/// Options of both commands.
pub struct Common {
    pub urls: Vec<String>,
    pub token: Option<String>,
}

pub struct RunArgs {
    pub common: Common,
    pub topology: Option<PathBuf>,
    pub extra_files: Vec<PathBuf>,
    pub reuse: bool,
    pub name: Option<String>,
    pub choices: usize,
    pub wait_timeout: Duration,
    pub devices_file: Option<PathBuf>,
    pub on_lost_warn: bool,
    pub command: Vec<OsString>,
}

pub enum Cli {
    Help,
    Version,
    Run(RunArgs),
    Status(Common, bool),
    /// The hidden trampoline that starts COMMAND (see `child`): the parent's pid, COMMAND.
    ExecChild(u32, Vec<OsString>),
}

/// The name of the hidden trampoline subcommand.
pub const EXEC_CHILD: &str = "__exec-child";

pub fn help() -> String {
    let mut options = String::new();
    for flag in FLAGS {
        let head = match flag.value {
            Some(value) => format!("--{} {value}", flag.name),
            None => format!("--{}", flag.name),
        };
        let mut lines = flag.help.lines();
        let first = lines.next().unwrap_or("");
        options.push_str(&format!("  {head:<20}{first}"));
        for line in lines {
            options.push_str(&format!("\n  {:<20}{line}", ""));
        }
        if let Some(default) = flag.default {
            let last = options.rsplit('\n').next().unwrap_or("").len();
            let text = format!("(default {default})");
            if last + 1 + text.len() > 80 {
                options.push_str(&format!("\n  {:<20}{text}", ""));
            } else {
                options.push_str(&format!(" {text}"));
            }
        }
        options.push('\n');
    }
    format!(
        "\
remote-lab: run a command while holding a neops-remote-lab lab host

Usage:
  remote-lab run [OPTIONS] [--] COMMAND [ARGS...]
  remote-lab status [--url URL]... [--token TOKEN] [--json]
  remote-lab --help | --version

run: joins the queue on the --choices best lab hosts (the fewest sessions
ahead; draining, unhealthy and refusing hosts are skipped), keeps the first
session that becomes active and ends the others, keeps it alive with
heartbeats, starts or reuses the lab from --topology, runs COMMAND with the lab
in its environment, then releases the lab and ends the session however
COMMAND ends.
status: each host's state, queue, slots and holder.

Options:
{options}
COMMAND's environment: REMOTE_LAB_URL (the chosen host, without credentials),
REMOTE_LAB_SESSION_ID, REMOTE_LAB_DEVICES (path of the devices JSON) and
REMOTE_LAB_REUSED (true or false; the last two only with --topology). SIGINT,
SIGTERM and SIGHUP are forwarded to COMMAND; COMMAND is killed if remote-lab
dies.

Exit status (run):
  COMMAND's own status, or 128+N when it died of signal N
  64   bad command line, or a file it names cannot be read
  65   netlab rejected the topology (422)
  69   no lab host reachable, or every one refused a session
  70   any other failure to start the lab (409, 500, 504, ...)
  75   the wait timed out, or the session was lost
  77   every host that answered rejected the credentials (401, 403)
  126  COMMAND could not be run; 127 COMMAND not found
Exit status (status): 0 when every host answered and took the credentials,
77 when one rejected them, 69 when one did not answer.
"
    )
}

/// URLs from a flag or `REMOTE_LAB_URL`: separated by commas or white space.
fn split_urls(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
}

fn positive_seconds(name: &str, value: &str) -> Result<Duration, String> {
    value
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("--{name}: {value:?} is not a positive number of seconds"))
}

/// Sets a flag with a value (given, or its default).
fn apply(
    run: &mut RunArgs,
    json: &mut bool,
    name: &str,
    value: Option<OsString>,
) -> Result<(), String> {
    let text = || -> Result<String, String> {
        value
            .clone()
            .unwrap_or_default()
            .into_string()
            .map_err(|v| format!("--{name}: {v:?} is not UTF-8"))
    };
    match name {
        "url" => run.common.urls.extend(split_urls(&text()?)),
        "token" => run.common.token = Some(text()?).filter(|t| !t.is_empty()),
        "json" => *json = true,
        "topology" => run.topology = value.map(PathBuf::from),
        "extra-file" => run.extra_files.extend(value.map(PathBuf::from)),
        "no-reuse" => run.reuse = false,
        "name" => run.name = Some(text()?),
        "choices" => {
            let value = text()?;
            run.choices = value
                .parse()
                .ok()
                .filter(|d| (1..=64).contains(d))
                .ok_or_else(|| format!("--choices: {value:?} is not a number from 1 to 64"))?;
        }
        "wait-timeout" => run.wait_timeout = positive_seconds(name, &text()?)?,
        "devices-file" => run.devices_file = value.map(PathBuf::from),
        "on-lost" => {
            run.on_lost_warn = match text()?.as_str() {
                "warn" => true,
                "terminate" => false,
                other => return Err(format!("--on-lost: {other:?} is not terminate or warn")),
            }
        }
        other => return Err(format!("--{other}: not a flag of remote-lab")),
    }
    Ok(())
}

pub fn parse(args: Vec<OsString>) -> Result<Cli, String> {
    use lexopt::prelude::*;
    let err = |e: lexopt::Error| e.to_string();
    let mut parser = lexopt::Parser::from_args(args);
    let sub = match parser.next().map_err(err)? {
        Some(Long("help") | Short('h')) => return Ok(Cli::Help),
        Some(Long("version") | Short('V')) => return Ok(Cli::Version),
        Some(Value(sub)) => sub.string().map_err(err)?,
        Some(other) => return Err(other.unexpected().to_string()),
        None => return Err("a command is needed: run or status".into()),
    };
    let takes = match sub.as_str() {
        "run" => For::Run,
        "status" => For::Status,
        EXEC_CHILD => return exec_child(parser.raw_args().map_err(err)?.collect()),
        _ => return Err(format!("unknown command {sub:?}: run or status")),
    };
    let mut json = false;
    let mut run = RunArgs {
        common: Common {
            urls: Vec::new(),
            token: None,
        },
        topology: None,
        extra_files: Vec::new(),
        reuse: true,
        name: None,
        choices: 0,
        wait_timeout: Duration::ZERO,
        devices_file: None,
        on_lost_warn: false,
        command: Vec::new(),
    };
    for flag in FLAGS {
        if let Some(default) = flag.default {
            apply(&mut run, &mut json, flag.name, Some(default.into()))?;
        }
    }
    while let Some(arg) = parser.next().map_err(err)? {
        match arg {
            Long("help") | Short('h') => return Ok(Cli::Help),
            Long(name) => {
                let flag = FLAGS
                    .iter()
                    .find(|f| f.name == name && (f.takes == For::Both || f.takes == takes))
                    .ok_or_else(|| Long(name).unexpected().to_string())?;
                let value = match flag.value {
                    Some(_) => Some(parser.value().map_err(err)?),
                    None => None,
                };
                apply(&mut run, &mut json, flag.name, value)?;
            }
            Value(first) if takes == For::Run => {
                run.command.push(first);
                run.command.extend(parser.raw_args().map_err(err)?);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if run.common.urls.is_empty()
        && let Ok(env) = std::env::var("REMOTE_LAB_URL")
    {
        run.common.urls.extend(split_urls(&env));
    }
    if run.common.urls.is_empty() {
        return Err("no lab host: give --url or set REMOTE_LAB_URL".into());
    }
    if run.common.token.is_none() {
        run.common.token = std::env::var("REMOTE_LAB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
    }
    if takes == For::Status {
        return Ok(Cli::Status(run.common, json));
    }
    if run.command.is_empty() {
        return Err("no command to run: remote-lab run [OPTIONS] -- COMMAND [ARGS...]".into());
    }
    if run.topology.is_none() && !run.extra_files.is_empty() {
        return Err("--extra-file needs --topology".into());
    }
    Ok(Cli::Run(run))
}

/// `__exec-child PPID -- COMMAND [ARGS...]`.
fn exec_child(mut rest: Vec<OsString>) -> Result<Cli, String> {
    let usage = || format!("{EXEC_CHILD} PPID -- COMMAND [ARGS...]");
    if rest.len() < 3 || rest[1] != "--" {
        return Err(usage());
    }
    let parent = rest[0]
        .to_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(usage)?;
    Ok(Cli::ExecChild(parent, rest.split_off(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn command_lines() {
        let Ok(Cli::Run(run)) = parse(args(&[
            "run",
            "--url",
            "http://a,http://b",
            "--url",
            "http://c",
            "--no-reuse",
            "--",
            "echo",
            "--x",
        ])) else {
            panic!("not a run");
        };
        assert_eq!(run.common.urls, ["http://a", "http://b", "http://c"]);
        assert!(!run.reuse);
        assert_eq!(run.command, args(&["echo", "--x"]));
        // The defaults of the table.
        assert_eq!(run.choices, 2);
        assert_eq!(run.wait_timeout, Duration::from_secs(3600));
        assert!(!run.on_lost_warn);
        assert!(parse(args(&["run", "--url", "http://a"])).is_err());
        assert!(parse(args(&["fly"])).is_err());
        for bad in [
            ["--wait-timeout", "0"],
            ["--choices", "0"],
            ["--on-lost", "x"],
        ] {
            let mut line = args(&["run", "--url", "u"]);
            line.extend(args(&bad));
            line.extend(args(&["--", "true"]));
            assert!(parse(line).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse(args(&["status", "--url", "u", "--json"])),
            Ok(Cli::Status(_, true))
        ));
        // A run flag is not a status flag.
        assert!(parse(args(&["status", "--url", "u", "--choices", "2"])).is_err());
        assert!(parse(args(&["run", "--url", "u", "--json", "--", "true"])).is_err());
        assert!(matches!(
            parse(args(&[EXEC_CHILD, "12", "--", "sh", "-c", "x"])),
            Ok(Cli::ExecChild(12, command)) if command == args(&["sh", "-c", "x"])
        ));
    }

    #[test]
    fn help_lists_every_flag_with_its_default() {
        let help = help();
        for flag in FLAGS {
            let line = help
                .lines()
                .find(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    words.first() == Some(&format!("--{}", flag.name).as_str())
                })
                .unwrap_or_else(|| panic!("--{} missing:\n{help}", flag.name));
            if let Some(value) = flag.value {
                assert!(line.contains(value), "{line}");
            }
            if let Some(default) = flag.default {
                assert!(
                    help.contains(&format!("(default {default})")),
                    "{}",
                    flag.name
                );
            }
        }
    }
}
