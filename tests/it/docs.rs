//! The docs say what the binary does: every flag in `--help` is in the man page, the
//! /etc/default file and the README, and none of them names a flag that does not exist.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The long options `--help` lists (without -h/--help and -V/--version).
fn help_flags() -> BTreeSet<String> {
    flags_of(env!("CARGO_BIN_EXE_neops-remote-lab"))
}

/// The long options of `remote-lab --help`.
#[cfg(feature = "client")]
fn client_flags() -> BTreeSet<String> {
    flags_of(env!("CARGO_BIN_EXE_remote-lab"))
}

fn flags_of(binary: &str) -> BTreeSet<String> {
    let out = Command::new(binary).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
        .filter(|f| f != "help" && f != "version")
        .collect()
}

/// Flags named in `text` as `--word-word` (man pages escape each dash: `\-\-word\-word`).
fn named_flags(text: &str) -> BTreeSet<String> {
    let plain = text.replace("\\-", "-");
    let mut out = BTreeSet::new();
    let bytes = plain.as_bytes();
    let mut i = 0;
    while let Some(at) = plain[i..].find("--") {
        let start = i + at + 2;
        let end = plain[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .map_or(plain.len(), |e| start + e);
        let before_ok = i + at == 0 || !bytes[i + at - 1].is_ascii_alphanumeric();
        let name = plain[start..end].trim_matches('-');
        if before_ok && !name.is_empty() {
            out.insert(name.to_owned());
        }
        i = end.max(start);
    }
    out
}

/// Does a line name the client (`remote-lab ...`, not `neops-remote-lab ...`)?
fn about_the_client(line: &str) -> bool {
    line.match_indices("remote-lab ")
        .any(|(at, _)| at == 0 || !line[..at].ends_with('-'))
}

/// Other tools' flags that the docs quote in their command lines (netlab's, cargo's).
const NETLAB_FLAGS: &[&str] = &[
    "cleanup", "instance", "reset", "force", "format", "node", "check", "release", "all", "test",
];

#[test]
fn help_lists_the_flags_we_expect() {
    let flags = help_flags();
    for f in [
        "host",
        "port",
        "workers",
        "state-dir",
        "active-timeout",
        "waiting-timeout",
        "sweep-interval",
        "max-sessions",
        "netlab",
        "netlab-timeout",
        "max-upload-bytes",
        "upload-timeout",
        "on-exit",
        "idle-lab-timeout",
        "log-level",
        "log-file",
        "debug",
        "log-config",
    ] {
        assert!(flags.contains(f), "--{f} missing from --help: {flags:?}");
    }
}

/// A man page without its roff comments (`.\"`), which may quote other tools' flags.
fn man_page(path: &str) -> String {
    read(path)
        .lines()
        .filter(|l| !l.starts_with(".\\\""))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The options a man page has an entry for: `.B \-\-flag` or `.BI \-\-flag " arg"` at the
/// start of a line.
fn entries(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| {
            l.strip_prefix(".B \\-\\-")
                .or_else(|| l.strip_prefix(".BI \\-\\-"))
        })
        .map(|rest| rest.split_whitespace().next().unwrap().replace("\\-", "-"))
        .collect()
}

/// The flags of the server's commands (`drain --wait`), which are no server options.
const COMMAND_FLAGS: &[&str] = &["wait"];

/// Whether the server's docs may name `--flag`: one of its flags, a command's, or another
/// tool's.
fn a_server_flag(flags: &BTreeSet<String>, flag: &str) -> bool {
    flags.contains(flag)
        || flag == "help"
        || flag == "version"
        || NETLAB_FLAGS.contains(&flag)
        || COMMAND_FLAGS.contains(&flag)
}

#[test]
fn the_commands_flags_are_in_the_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_neops-remote-lab"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("neops-remote-lab drain [--wait]"), "{help}");
    assert!(help.contains("neops-remote-lab resume"), "{help}");
    let page = man_page("man/neops-remote-lab.8");
    assert!(page.contains(".B drain \\fR[\\fB\\-\\-wait\\fR]"));
    assert!(page.contains(".B resume\n"));
}

#[test]
fn the_man_page_documents_exactly_the_flags() {
    let flags = help_flags();
    let page = man_page("man/neops-remote-lab.8");
    let entries = entries(&page);
    for f in &flags {
        assert!(entries.contains(f), "--{f} has no entry in the man page");
    }
    for f in named_flags(&page) {
        assert!(
            a_server_flag(&flags, &f),
            "the man page names --{f}, which does not exist"
        );
    }
}

#[test]
fn the_default_file_and_the_readme_cover_every_flag() {
    let flags = help_flags();
    let defaults = read("packaging/default");
    let readme = read("README.md");
    for f in &flags {
        let var = format!("NEOPS_REMOTE_LAB_{}=", f.to_uppercase().replace('-', "_"));
        assert!(
            defaults.contains(&var),
            "{var} missing from packaging/default"
        );
        assert!(
            readme.contains(&format!("`--{f}")),
            "--{f} missing from README.md"
        );
    }
    // Lines about the repository's own scripts name those scripts' flags, lines about the
    // client the client's.
    let about_the_server: String = readme
        .lines()
        .filter(|l| !l.contains("scripts/") && !about_the_client(l))
        .map(|l| format!("{l}\n"))
        .collect();
    for f in named_flags(&about_the_server)
        .into_iter()
        .chain(named_flags(&defaults))
    {
        assert!(
            a_server_flag(&flags, &f),
            "--{f} is named in the docs but does not exist"
        );
    }
}

#[cfg(feature = "client")]
#[test]
fn the_client_man_page_and_readme_document_exactly_its_flags() {
    let flags = client_flags();
    for f in [
        "url",
        "topology",
        "extra-file",
        "no-reuse",
        "name",
        "wait-timeout",
        "token",
        "json",
    ] {
        assert!(flags.contains(f), "--{f} missing from remote-lab --help");
    }
    let page = man_page("man/remote-lab.1");
    let entries = entries(&page);
    for f in &flags {
        assert!(entries.contains(f), "--{f} has no entry in remote-lab(1)");
    }
    for f in named_flags(&page) {
        assert!(
            flags.contains(&f) || f == "help" || f == "version",
            "remote-lab(1) names --{f}, which does not exist"
        );
    }
    // README lines about the client name only its flags, and every one of them.
    let readme = read("README.md");
    let about_the_client: String = readme
        .lines()
        .filter(|l| about_the_client(l))
        .map(|l| format!("{l}\n"))
        .collect();
    for f in named_flags(&about_the_client) {
        assert!(
            flags.contains(&f),
            "README names remote-lab --{f}, which does not exist"
        );
    }
    for f in ["topology", "wait-timeout", "name", "token", "json"] {
        assert!(
            about_the_client.contains(&format!("--{f}")),
            "README does not mention remote-lab --{f}"
        );
    }
}

/// The README's first command is `cargo run ... -- <server flags>`: with two binaries in the
/// crate, `cargo run` must still mean the server.
#[test]
fn cargo_run_in_the_quick_start_starts_the_server() {
    let readme = read("README.md");
    assert!(
        readme.contains("cargo run --release -- --host 127.0.0.1"),
        "the quick start no longer says `cargo run`; update this test"
    );
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains("\ndefault-run = \"neops-remote-lab\"\n"),
        "Cargo.toml must set default-run to the server binary"
    );
}

/// Each option's default as `--help` gives it (from the server's one table of options).
fn help_defaults() -> Vec<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_neops-remote-lab"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("--")?;
            let flag = rest.split_whitespace().next()?.to_owned();
            let default = rest.split_once("[default: ")?.1.strip_suffix(']')?;
            Some((flag, default.to_owned()))
        })
        .collect()
}

/// The defaults are given once, in the server's table of options; the man page and the
/// README must say the same. Defaults that are words ("twice the CPU count") are not
/// compared, values (`300`, `off`, `teardown`) are.
#[test]
fn the_man_page_and_the_readme_give_the_defaults_of_the_help() {
    let page = man_page("man/neops-remote-lab.8").replace("\\-", "-");
    let readme = read("README.md");
    let defaults = help_defaults();
    assert!(defaults.len() > 20, "{defaults:?}");
    let mut wrong = Vec::new();
    for (flag, default) in &defaults {
        let is_value = default
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.');
        if !is_value {
            continue;
        }
        // The man page's entry: from its `.B --flag` line to the next `.TP`.
        let entry = page
            .split("\n.TP\n")
            .find(|e| {
                e.starts_with(&format!(".B --{flag} "))
                    || e.starts_with(&format!(".B --{flag}\n"))
                    || e.starts_with(&format!(".BI --{flag} "))
            })
            .unwrap_or("");
        if !entry.contains(&format!("Default: {default}")) {
            wrong.push(format!("man page: --{flag} should say Default: {default}"));
        }
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `--{flag}")))
            .unwrap_or("");
        // The row's third cell: the default, as a value (`300`) or a word (off, none).
        let cell = row.split('|').nth(3).unwrap_or("").trim();
        let word = ["off", "none"].contains(&default.as_str())
            && cell
                .strip_prefix(default.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([';', ' ', ',']));
        if !cell.starts_with(&format!("`{default}`")) && !word {
            wrong.push(format!("README: --{flag} should give `{default}`: {row}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
