//! What reaches the terminal: nothing a server sent is printed raw. Control characters (C0
//! but newline and tab, DEL, C1), escape sequences and the bidirectional overrides are
//! replaced before printing; SGR colour may stay when the output is a terminal. netlab's
//! live output is cut into lines by a bounded buffer and decoded lossily.

use std::io::{IsTerminal, Write};

/// Stands for what was taken out.
const REPLACEMENT: char = '\u{FFFD}';
/// The longest unfinished line kept; a longer one is printed as it is, marked cut.
pub const MAX_LINE: usize = 64 * 1024;
/// The longest single text from a server (a detail, a name) printed, in characters.
pub const MAX_TEXT: usize = 2000;

/// `text` with every control character and escape sequence replaced by U+FFFD, except SGR
/// sequences (`ESC [ digits ; … m`) when `keep_sgr`.
pub fn clean(text: &str, keep_sgr: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == '\x1b' {
            if keep_sgr && let Some(len) = sgr_len(&text[at..]) {
                out.push_str(&text[at..at + len]);
                while chars.peek().is_some_and(|(i, _)| *i < at + len) {
                    chars.next();
                }
                continue;
            }
            out.push(REPLACEMENT);
            continue;
        }
        if c == '\n' || c == '\t' || !forbidden(c) {
            out.push(c);
        } else {
            out.push(REPLACEMENT);
        }
    }
    out
}

/// Also cuts to [`MAX_TEXT`] characters: for one-line texts of a server (details, names).
pub fn clean_short(text: &str, keep_sgr: bool) -> String {
    let cleaned = clean(text.trim(), keep_sgr);
    if cleaned.chars().count() <= MAX_TEXT {
        return cleaned.replace('\n', " ");
    }
    let cut: String = cleaned.chars().take(MAX_TEXT).collect();
    format!("{} … (cut)", cut.replace('\n', " "))
}

fn forbidden(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// The length of an SGR sequence at the start of `text`, if that is what it holds.
fn sgr_len(text: &str) -> Option<usize> {
    let rest = text.strip_prefix("\x1b[")?;
    let params = rest
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b';')
        .count();
    (rest.as_bytes().get(params) == Some(&b'm') && params <= 64).then_some(2 + params + 1)
}

/// Whether colour may stay in what goes to standard error.
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal()
}

/// Whether colour may stay in what goes to standard output.
pub fn stdout_colour() -> bool {
    std::io::stdout().is_terminal()
}

/// netlab's output, cut into lines: bytes in, whole lines out, the unfinished one bounded.
#[derive(Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Adds `bytes`; calls `line` with each line finished (without its end), decoded
    /// lossily, and with a line cut at [`MAX_LINE`] bytes (`cut` true).
    pub fn push(&mut self, mut bytes: &[u8], line: &mut impl FnMut(&str, bool)) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(end) if self.pending.len() + end <= MAX_LINE => {
                    self.pending.extend_from_slice(&bytes[..end]);
                    self.emit(false, line);
                    bytes = &bytes[end + 1..];
                }
                _ => {
                    let room = MAX_LINE - self.pending.len();
                    let take = room.min(bytes.len());
                    self.pending.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.pending.len() >= MAX_LINE {
                        self.emit(true, line);
                    }
                }
            }
        }
    }

    /// What is left, as a last line.
    pub fn finish(&mut self, line: &mut impl FnMut(&str, bool)) {
        if !self.pending.is_empty() {
            self.emit(false, line);
        }
    }

    fn emit(&mut self, cut: bool, line: &mut impl FnMut(&str, bool)) {
        let text = String::from_utf8_lossy(&self.pending);
        line(text.trim_end_matches('\r'), cut);
        self.pending.clear();
    }
}

/// Prints one line of netlab's output, prefixed `netlab| `, cleaned.
pub fn netlab_line(text: &str, cut: bool) {
    let text = clean(text, stderr_colour());
    if cut {
        eprintln!("netlab| {text} [line cut at {} KiB]", MAX_LINE / 1024);
    } else {
        eprintln!("netlab| {text}");
    }
}

/// Progress on stderr: on a terminal one line updated in place, else a line per change.
pub struct Progress {
    tty: bool,
    last: Option<String>,
    open_line: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: None,
            open_line: false,
        }
    }

    /// Shows `line` if `key` (what counts as a change) differs from the last one shown.
    /// `line` must be clean already.
    pub fn show(&mut self, key: &str, line: &str) {
        if self.last.as_deref() == Some(key) && !self.tty {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[Kremote-lab: {line}");
            self.open_line = true;
        } else {
            let _ = writeln!(err, "remote-lab: {line}");
        }
        let _ = err.flush();
        self.last = Some(key.to_owned());
    }

    pub fn done(&mut self) {
        if self.open_line {
            eprintln!();
            self.open_line = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_escapes_are_replaced() {
        let hostile = "a\x1b]0;title\x07b\x1b[2Jc\u{9b}31md\x7fe\r\u{202e}f\tg\nh";
        let out = clean(hostile, false);
        assert!(!out.chars().any(forbidden_or_esc), "{out:?}");
        assert!(out.contains("\tg\nh"), "{out:?}");
        // SGR colour stays on a terminal, nothing else does.
        assert_eq!(clean("\x1b[1;31mred\x1b[0m", true), "\x1b[1;31mred\x1b[0m");
        assert_eq!(clean("\x1b[2J", true), "\u{FFFD}[2J");
        assert_eq!(clean("\x1b[1;31mred", false), "\u{FFFD}[1;31mred");
        assert_eq!(
            clean_short(&"x".repeat(5000), false).chars().count(),
            MAX_TEXT + 8
        );
    }

    fn forbidden_or_esc(c: char) -> bool {
        (c != '\n' && c != '\t' && forbidden(c)) || c == '\x1b'
    }

    #[test]
    fn lines_are_bounded_and_decoded_lossily() {
        let mut lines = Lines::default();
        let mut seen: Vec<(String, bool)> = Vec::new();
        let mut take = |l: &str, cut: bool| seen.push((l.to_owned(), cut));
        lines.push(b"one\r\ntw", &mut take);
        lines.push(b"o\xff\n", &mut take);
        lines.push(&vec![b'x'; MAX_LINE + 10], &mut take);
        lines.push(b"\n", &mut take);
        lines.finish(&mut take);
        assert_eq!(seen[0], ("one".to_owned(), false));
        assert_eq!(seen[1], ("two\u{FFFD}".to_owned(), false));
        assert_eq!(seen[2].0.len(), MAX_LINE);
        assert!(seen[2].1);
        assert_eq!(seen[3], ("x".repeat(10), false));
        assert_eq!(seen.len(), 4);
        assert!(lines.pending.capacity() <= 2 * MAX_LINE);
    }
}
