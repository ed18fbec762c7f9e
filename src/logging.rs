//! Logging: one event per line to stderr (colours only on a terminal, no timestamp under
//! systemd, where journald adds one), and optionally appended to a file with timestamps.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

use log::{LevelFilter, SetLoggerError};
use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, SharedLogger, TermLogger, TerminalMode, WriteLogger,
};

/// Why logging could not be set up.
#[derive(Debug)]
pub enum InitError {
    /// The `--log-file` cannot be opened for appending.
    LogFile { path: PathBuf, error: io::Error },
    /// A logger is set already (only once per process).
    AlreadySet(SetLoggerError),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::LogFile { path, error } => {
                write!(f, "--log-file {}: {error}", path.display())
            }
            InitError::AlreadySet(e) => write!(f, "logging: {e}"),
        }
    }
}

impl std::error::Error for InitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InitError::LogFile { error, .. } => Some(error),
            InitError::AlreadySet(e) => Some(e),
        }
    }
}

pub fn init(level: LevelFilter, log_file: Option<&Path>) -> Result<(), InitError> {
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut stderr_config = ConfigBuilder::new();
    stderr_config
        // The multipart parser logs every boundary it meets at debug level.
        .add_filter_ignore_str("multipart")
        .add_filter_ignore_str("buf_redux")
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off);
    if under_journal {
        stderr_config.set_time_level(LevelFilter::Off);
    } else {
        let _ = stderr_config.set_time_offset_to_local();
    }
    let stderr_config = stderr_config.build();

    let mut loggers: Vec<Box<dyn SharedLogger>> = Vec::new();
    if std::io::stderr().is_terminal() {
        loggers.push(TermLogger::new(
            level,
            stderr_config,
            TerminalMode::Stderr,
            ColorChoice::Auto,
        ));
    } else {
        loggers.push(WriteLogger::new(level, stderr_config, std::io::stderr()));
    }
    if let Some(path) = log_file {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| InitError::LogFile {
                path: path.to_path_buf(),
                error,
            })?;
        let mut file_config = ConfigBuilder::new();
        file_config
            .add_filter_ignore_str("multipart")
            .add_filter_ignore_str("buf_redux")
            .set_target_level(LevelFilter::Off)
            .set_thread_level(LevelFilter::Off)
            .set_location_level(LevelFilter::Off)
            .set_time_format_rfc3339();
        let _ = file_config.set_time_offset_to_local();
        loggers.push(WriteLogger::new(level, file_config.build(), file));
    }
    CombinedLogger::init(loggers).map_err(InitError::AlreadySet)
}

/// Client text as it may appear in a log line: control characters (line breaks, ESC, NUL)
/// escaped, so that no client can start a line of its own or colour the terminal, and cut
/// after 200 characters.
pub fn escape(text: &str) -> String {
    const LIMIT: usize = 200;
    let mut out = String::with_capacity(text.len().min(LIMIT) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == LIMIT {
            out.push_str("...");
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                out.extend(c.escape_default());
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_cannot_make_lines_of_its_own() {
        assert_eq!(escape("/a b"), "/a b");
        assert_eq!(
            escape("/x\n[ERROR] FORGED\r\u{1b}[31m\0"),
            "/x\\n[ERROR] FORGED\\r\\u{1b}[31m\\u{0}"
        );
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_eq!(escape(&"x".repeat(300)).len(), 203);
    }
}
