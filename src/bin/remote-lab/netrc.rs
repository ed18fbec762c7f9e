//! `~/.netrc` (or `$NETRC`), read as curl and Python's `netrc` read it: `machine NAME`
//! entries with `login`, `password` (and `account`, ignored), one `default` entry; tokens
//! separated by white space, double-quoted tokens with backslash escapes, `#` comments to
//! the end of the line, `macdef` definitions (up to the next empty line) skipped.

use std::path::PathBuf;

/// The login and password for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub login: String,
    pub password: String,
}

#[derive(Debug, Default)]
struct Entry {
    /// `None`: the `default` entry.
    machine: Option<String>,
    login: Option<String>,
    password: Option<String>,
}

/// A parsed netrc file.
#[derive(Debug, Default)]
pub struct Netrc {
    entries: Vec<Entry>,
}

impl Netrc {
    /// The file `$NETRC` names, else `~/.netrc`; an absent or unreadable file is empty.
    pub fn load() -> Netrc {
        let path = match std::env::var_os("NETRC") {
            Some(path) => PathBuf::from(path),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".netrc"),
                None => return Netrc::default(),
            },
        };
        std::fs::read_to_string(path)
            .map(|text| Netrc::parse(&text))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> Netrc {
        let mut tokens = Tokens { text, at: 0 };
        let mut entries: Vec<Entry> = Vec::new();
        while let Some(word) = tokens.next() {
            match word.as_str() {
                "machine" => entries.push(Entry {
                    machine: tokens.next(),
                    ..Entry::default()
                }),
                "default" => entries.push(Entry::default()),
                "login" | "password" | "account" | "port" => {
                    let value = tokens.next();
                    if let Some(entry) = entries.last_mut() {
                        match word.as_str() {
                            "login" => entry.login = value,
                            "password" => entry.password = value,
                            _ => {}
                        }
                    }
                }
                "macdef" => tokens.skip_macro(),
                _ => {}
            }
        }
        Netrc { entries }
    }

    /// The first `machine` entry for `host` that has a login and a password.
    pub fn machine(&self, host: &str) -> Option<Login> {
        self.entries
            .iter()
            .filter(|e| e.machine.as_deref() == Some(host))
            .find_map(Entry::login)
    }

    /// The `default` entry.
    pub fn default_login(&self) -> Option<Login> {
        self.entries
            .iter()
            .filter(|e| e.machine.is_none())
            .find_map(Entry::login)
    }
}

impl Entry {
    fn login(&self) -> Option<Login> {
        Some(Login {
            login: self.login.clone()?,
            password: self.password.clone()?,
        })
    }
}

struct Tokens<'a> {
    text: &'a str,
    at: usize,
}

impl Tokens<'_> {
    fn next(&mut self) -> Option<String> {
        loop {
            let rest = &self.text[self.at..];
            let skipped = rest.len() - rest.trim_start().len();
            self.at += skipped;
            let rest = &self.text[self.at..];
            if rest.is_empty() {
                return None;
            }
            if rest.starts_with('#') {
                self.at += rest.find('\n').unwrap_or(rest.len());
                continue;
            }
            if let Some(quoted) = rest.strip_prefix('"') {
                let mut word = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                word.push(escaped);
                            }
                        }
                        c => word.push(c),
                    }
                }
                self.at += 1 + end;
                return Some(word);
            }
            let len = rest.find(char::is_whitespace).unwrap_or(rest.len());
            self.at += len;
            return Some(rest[..len].to_owned());
        }
    }

    /// Skips a `macdef NAME` and its body: everything up to the next empty line.
    fn skip_macro(&mut self) {
        let rest = &self.text[self.at..];
        let body = rest.find('\n').map_or(rest.len(), |i| i + 1);
        let after = &rest[body..];
        let mut end = body;
        for line in after.split_inclusive('\n') {
            end += line.len();
            if line.trim_end_matches(['\n', '\r']).is_empty() {
                break;
            }
        }
        self.at += end.min(rest.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(l: &str, p: &str) -> Option<Login> {
        Some(Login {
            login: l.into(),
            password: p.into(),
        })
    }

    #[test]
    fn machines_default_quotes_comments_and_macros() {
        let netrc = Netrc::parse(
            "# a comment: machine evil login x password y\n\
             machine other login a password b\n\
             machine lab1 login ci password \"s3 cr\\\"et\" # trailing comment\n\
             macdef init\n\
             machine lab2 login macro password body\n\
             \n\
             machine lab2 login ci password two\n\
             default login d password e\n",
        );
        assert_eq!(netrc.machine("lab1"), login("ci", "s3 cr\"et"));
        assert_eq!(netrc.machine("lab2"), login("ci", "two"));
        assert_eq!(netrc.machine("evil"), None);
        assert_eq!(netrc.machine("lab9"), None);
        assert_eq!(netrc.default_login(), login("d", "e"));
        assert_eq!(Netrc::parse("").default_login(), None);
        assert_eq!(Netrc::parse("machine x login a").machine("x"), None);
    }
}
