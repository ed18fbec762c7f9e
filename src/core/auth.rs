//! Access tokens (`--token-file`): who may call the API, and under which name.
//!
//! The file holds lines `NAME:TOKEN[:admin]`. A request proves who it is with
//! `Authorization: Bearer TOKEN` or `Authorization: Basic base64(NAME:TOKEN)` (what Python's
//! `requests` sends by itself from a `~/.netrc` entry). Only SHA-256 digests of the tokens are
//! kept, and a presented token is compared with every entry's digest without stopping early,
//! so the time taken says nothing about how close a guess was.
//!
//! Addresses that fail too often are throttled: after [`MAX_FAILURES`] failures within
//! [`WINDOW`], every request from that address that needs a token gets 429 for [`WINDOW`].
//! A request with the right token from any other address is not touched by this, and the
//! check costs one atomic load while no address is blocked.
//!
//! Why one file of this size: the token file, callers and the throttle belong together;
//! a third of it is tests.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine as _;

use crate::observe::events::EventLog;
use sha2::{Digest, Sha256};

/// Failures from one address within [`WINDOW`] before it is blocked.
pub const MAX_FAILURES: u32 = 20;
/// The failure window, and how long a block lasts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Failures from one IPv4 /24 within [`WINDOW`] before the whole /24 is blocked.
pub const MAX_FAILURES_NET: u32 = 100;
/// Keys (addresses and networks) tracked at once; beyond, the oldest make room.
const MAX_TRACKED: usize = 4096;
/// `auth_failed` and `auth_blocked` events recorded per [`WINDOW`], over all addresses.
pub const EVENTS_PER_WINDOW: u32 = 20;
/// Shortest token accepted in the file.
pub const MIN_TOKEN_LEN: usize = 16;

type Sha = [u8; 32];

fn digest(bytes: &[u8]) -> Sha {
    Sha256::digest(bytes).into()
}

/// Equal digests, compared without an early exit.
fn same(a: &Sha, b: &Sha) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who a request is, once its token was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: Arc<str>,
    pub admin: bool,
}

struct Entry {
    name: Arc<str>,
    digest: Sha,
    admin: bool,
}

/// The tokens of one reading of the file.
pub struct Tokens {
    entries: Vec<Entry>,
}

/// Why the token file cannot be used. Never holds a token.
#[derive(Debug)]
pub enum TokenFileError {
    Unreadable {
        path: PathBuf,
        source: io::Error,
    },
    Exposed {
        path: PathBuf,
        mode: u32,
    },
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
    NoTokens {
        path: PathBuf,
    },
}

impl fmt::Display for TokenFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenFileError::Unreadable { path, source } => {
                write!(f, "cannot read token file {}: {source}", path.display())
            }
            TokenFileError::Exposed { path, mode } => write!(
                f,
                "token file {} is readable by every user (mode {:o}); run: chmod 600 {}",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
            TokenFileError::Line { path, line, why } => {
                write!(f, "token file {} line {line}: {why}", path.display())
            }
            TokenFileError::NoTokens { path } => write!(
                f,
                "token file {} holds no token (lines NAME:TOKEN or NAME:TOKEN:admin)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TokenFileError {}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Tokens {
    /// Reads and checks the token file.
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let unreadable = |source| TokenFileError::Unreadable {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(unreadable)?;
        if meta.mode() & 0o004 != 0 {
            return Err(TokenFileError::Exposed {
                path: path.to_owned(),
                mode: meta.mode(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(unreadable)?;
        Self::parse(&text)
            .map_err(|(line, why)| TokenFileError::Line {
                path: path.to_owned(),
                line,
                why,
            })?
            .ok_or_else(|| TokenFileError::NoTokens {
                path: path.to_owned(),
            })
    }

    /// Parses the file's text; `Ok(None)` when it holds no token. Errors name the line and
    /// what is wrong with it, never the token.
    fn parse(text: &str) -> Result<Option<Tokens>, (usize, String)> {
        let mut entries: Vec<Entry> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| Err((n + 1, why.to_owned()));
            let mut fields = line.split(':');
            let (name, token) = (fields.next().unwrap_or(""), fields.next());
            let Some(token) = token else {
                return bad("expected NAME:TOKEN or NAME:TOKEN:admin");
            };
            let admin = match fields.next() {
                None => false,
                Some("admin") => true,
                Some(_) => return bad("the third field can only be `admin`"),
            };
            if fields.next().is_some() {
                return bad("too many `:` (expected NAME:TOKEN or NAME:TOKEN:admin)");
            }
            if !valid_name(name) {
                return bad("the name must be 1 to 64 of A-Z a-z 0-9 . _ -");
            }
            if token.chars().count() < MIN_TOKEN_LEN {
                return bad("the token is shorter than 16 characters");
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad("the token holds a space or a control character");
            }
            let entry = Entry {
                name: Arc::from(name),
                digest: digest(token.as_bytes()),
                admin,
            };
            if entries.iter().any(|e| e.name == entry.name) {
                return bad("this name is given twice");
            }
            if entries.iter().any(|e| same(&e.digest, &entry.digest)) {
                return bad("this token is also given to another name");
            }
            entries.push(entry);
        }
        Ok((!entries.is_empty()).then_some(Tokens { entries }))
    }

    /// Who an `Authorization` header value is, if anyone.
    pub fn identify(&self, authorization: Option<&str>) -> Option<Identity> {
        let value = authorization?.trim();
        let (scheme, credentials) = value.split_once(' ')?;
        let credentials = credentials.trim();
        let (name, token) = if scheme.eq_ignore_ascii_case("bearer") {
            (None, credentials.as_bytes().to_vec())
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()?;
            let colon = decoded.iter().position(|&b| b == b':')?;
            let name = String::from_utf8(decoded[..colon].to_vec()).ok()?;
            (Some(name), decoded[colon + 1..].to_vec())
        } else {
            return None;
        };
        let presented = digest(&token);
        // Every entry is compared; the match is picked without an early exit.
        let mut found = None;
        for entry in &self.entries {
            let token_matches = same(&entry.digest, &presented);
            let name_matches = name.as_deref().is_none_or(|n| n == &*entry.name);
            if token_matches & name_matches {
                found = Some(entry);
            }
        }
        found.map(|e| Identity {
            name: Arc::clone(&e.name),
            admin: e.admin,
        })
    }

    /// The name and token of the file's first `NAME:TOKEN:admin` line, for the host's own
    /// commands that call the running server (`drain`, `resume`); `None` when it has none.
    /// The file is checked as the server checks it.
    pub fn first_admin(path: &Path) -> Result<Option<(String, String)>, TokenFileError> {
        Self::load(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Ok(text.lines().find_map(|line| {
            let mut fields = line.trim().split(':');
            match (fields.next(), fields.next(), fields.next()) {
                (Some(name), Some(token), Some("admin")) if !line.trim().starts_with('#') => {
                    Some((name.to_owned(), token.to_owned()))
                }
                _ => None,
            }
        }))
    }

    /// How many tokens (never zero: a file without any is refused).
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Whether a token of this name is in the file.
    pub fn has_name(&self, name: &str) -> bool {
        self.entries.iter().any(|e| &*e.name == name)
    }
}

/// What failures are counted under: an address (IPv4 /32, IPv6 /64) and, for IPv4, its /24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Host4(u32),
    Net24(u32),
    Net64(u64),
}

impl Key {
    /// The keys an address counts under: its own, and its IPv4 /24.
    pub fn of(addr: IpAddr) -> (Key, Option<Key>) {
        let v4 = match addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        match (v4, addr) {
            (Some(a), _) => {
                let n = u32::from(a);
                (Key::Host4(n), Some(Key::Net24(n & 0xffff_ff00)))
            }
            (None, IpAddr::V6(a)) => (Key::Net64((u128::from(a) >> 64) as u64), None),
            (None, IpAddr::V4(_)) => unreachable!("an IPv4 address is one"),
        }
    }

    /// Failures within [`WINDOW`] before the key is blocked.
    fn limit(self) -> u32 {
        match self {
            Key::Host4(_) | Key::Net64(_) => MAX_FAILURES,
            Key::Net24(_) => MAX_FAILURES_NET,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Key::Host4(n) => write!(f, "{}", std::net::Ipv4Addr::from(n)),
            Key::Net24(n) => write!(f, "{}/24", std::net::Ipv4Addr::from(n)),
            Key::Net64(n) => write!(f, "{}/64", std::net::Ipv6Addr::from(u128::from(n) << 64)),
        }
    }
}

/// Failures of one key.
struct Failures {
    window_start: Duration,
    count: u32,
    blocked_until: Option<Duration>,
    /// The latest failure: the oldest entries make room when the table is full.
    last: Duration,
}

impl Failures {
    fn blocked_at(&self, now: Duration) -> bool {
        self.blocked_until.is_some_and(|u| u > now)
    }
}

/// What a failure leaves to record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Failed {
    /// The first failure of this address in its window: worth an `auth_failed` event.
    pub first: bool,
    /// A key this failure blocked: worth an `auth_blocked` event.
    pub blocked: Option<Key>,
    /// Whether the events above may be recorded: at most [`EVENTS_PER_WINDOW`] are, over
    /// all addresses, so that no flood pushes the real history out of the event log.
    pub record: bool,
    /// Events left out for that reason since the last one recorded (to say so in it).
    pub suppressed: u64,
}

#[derive(Default)]
struct Table {
    keys: HashMap<Key, Failures>,
    /// The event budget: when its window began, events recorded in it, events left out.
    budget_start: Duration,
    budget_used: u32,
    suppressed: u64,
}

impl Table {
    /// Makes room for a new key: entries whose window and block are over go first, then
    /// the least recently failed (unblocked ones before blocked ones), an eighth at a time.
    fn make_room(&mut self, now: Duration) {
        self.keys
            .retain(|_, f| f.blocked_at(now) || now.saturating_sub(f.window_start) < WINDOW);
        if self.keys.len() < MAX_TRACKED {
            return;
        }
        let mut ages: Vec<(bool, Duration, Key)> = self
            .keys
            .iter()
            .map(|(k, f)| (f.blocked_at(now), f.last, *k))
            .collect();
        let evict = (MAX_TRACKED / 8).max(1);
        ages.select_nth_unstable(evict - 1);
        for (_, _, key) in &ages[..evict] {
            self.keys.remove(key);
        }
    }

    /// Counts a failure of `key`; whether it is the key's first in its window, and whether
    /// it blocked the key.
    fn count(&mut self, key: Key, now: Duration) -> (bool, bool) {
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_TRACKED {
            self.make_room(now);
        }
        let f = self.keys.entry(key).or_insert(Failures {
            window_start: now,
            count: 0,
            blocked_until: None,
            last: now,
        });
        f.last = now;
        if f.blocked_until.is_some_and(|u| u <= now) {
            f.blocked_until = None;
            f.count = 0;
            f.window_start = now;
        }
        if now.saturating_sub(f.window_start) >= WINDOW {
            f.window_start = now;
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        let blocked = f.count >= key.limit() && f.blocked_until.is_none();
        if blocked {
            f.blocked_until = Some(now + WINDOW);
        }
        (f.count == 1, blocked)
    }
}

/// Tracks failed authentications by key (times are the server clock's).
#[derive(Default)]
pub struct Throttle {
    table: Mutex<Table>,
    /// The latest end of any block, in milliseconds of the clock; 0 when none was set. While
    /// `now` is past it, nobody is blocked and the table is not looked at.
    blocks_end_ms: AtomicU64,
}

fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

impl Throttle {
    /// Seconds until `addr` may fail again, if it (or its /24) is blocked now. Asked only
    /// of requests without a valid credential: a right token is never throttled.
    pub fn blocked(&self, addr: IpAddr, now: Duration) -> Option<u64> {
        if millis(now) >= self.blocks_end_ms.load(Ordering::Relaxed) {
            return None;
        }
        let (host, net) = Key::of(addr);
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        [Some(host), net]
            .into_iter()
            .flatten()
            .filter_map(|k| table.keys.get(&k)?.blocked_until)
            .filter(|until| *until > now)
            .max()
            .map(|until| (until - now).as_secs().max(1))
    }

    /// Records a failure of `addr`; says what of it is worth recording.
    pub fn fail(&self, addr: IpAddr, now: Duration) -> Failed {
        let (host, net) = Key::of(addr);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let (first, host_blocked) = table.count(host, now);
        let net_blocked = net.is_some_and(|k| table.count(k, now).1);
        let blocked = if host_blocked {
            Some(host)
        } else if net_blocked {
            net
        } else {
            None
        };
        if blocked.is_some() {
            self.blocks_end_ms
                .fetch_max(millis(now + WINDOW), Ordering::Relaxed);
        }
        let mut failed = Failed {
            first,
            blocked,
            record: false,
            suppressed: 0,
        };
        if first || blocked.is_some() {
            if now.saturating_sub(table.budget_start) >= WINDOW {
                table.budget_start = now;
                table.budget_used = 0;
            }
            if table.budget_used < EVENTS_PER_WINDOW {
                table.budget_used += 1;
                failed.record = true;
                failed.suppressed = std::mem::take(&mut table.suppressed);
            } else {
                table.suppressed += 1;
            }
        }
        failed
    }
}

/// Access control as configured: the tokens (re-read on SIGHUP), the public-read switch and
/// the throttle.
pub struct Access {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
    pub public_read: bool,
    pub throttle: Throttle,
}

impl Access {
    pub fn load(path: &Path, public_read: bool) -> Result<Access, TokenFileError> {
        Ok(Access {
            path: path.to_owned(),
            tokens: RwLock::new(Arc::new(Tokens::load(path)?)),
            public_read,
            throttle: Throttle::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a token of this name is in force.
    pub fn knows(&self, name: &str) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .has_name(name)
    }

    pub fn identify(&self, authorization: Option<&str>) -> Option<Identity> {
        let tokens = Arc::clone(&self.tokens.read().unwrap_or_else(PoisonError::into_inner));
        tokens.identify(authorization)
    }

    /// Re-reads the file; a bad file keeps the tokens in force. Returns how many tokens
    /// are in force now, or why the file was not taken.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let fresh = Tokens::load(&self.path)?;
        let count = fresh.count();
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(count)
    }
}

/// `path` with each session id in it (a UUID between slashes) cut to its first 8
/// characters, for logs and events: a full id is a credential.
pub fn redact_ids(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.len() == 36 && uuid::Uuid::try_parse(segment).is_ok() {
                &segment[..8]
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

// ------------------------------------------------------------------------------- callers

/// Who is asking.
pub enum Caller {
    /// No `--token-file`: everyone may do everything, as with the Python server.
    Open,
    /// A read-only view opened to everyone by `--public-read`, or `/healthz`.
    Public,
    /// A request with a valid token, and the address it came from.
    Token(Identity, String),
}

impl Caller {
    /// The name a session created by this caller belongs to.
    pub fn owner(&self) -> Option<Arc<str>> {
        match self {
            Caller::Token(id, _) => Some(Arc::clone(&id.name)),
            Caller::Open | Caller::Public => None,
        }
    }

    /// May this caller see and use a session that belongs to `owner`? Without tokens,
    /// everyone may; with them, only its owner (a session made while the server was open
    /// belongs to nobody in particular: any valid token may use it).
    pub fn may_use(&self, owner: Option<&Arc<str>>) -> bool {
        match self {
            Caller::Open => true,
            Caller::Public => false,
            Caller::Token(id, _) => owner.is_none_or(|o| *o == id.name),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Token(id, _) if id.admin)
    }

    /// Records an admin's action on what is not its own, as an event naming the address.
    pub fn admin_event(&self, events: &EventLog, action: &str, mut fields: serde_json::Value) {
        if let (Caller::Token(id, from), Some(map)) = (self, fields.as_object_mut()) {
            map.insert("action".into(), action.into());
            map.insert("admin".into(), (*id.name).into());
            map.insert("addr".into(), from.as_str().into());
            events.emit("admin_action", fields);
        }
    }

    /// The name to put in a log line about an action of this caller.
    pub fn describe(&self) -> String {
        match self {
            Caller::Token(id, from) if id.admin => format!(" by admin {:?} from {from}", &*id.name),
            Caller::Token(id, _) => format!(" by {:?}", &*id.name),
            Caller::Open | Caller::Public => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    const FILE: &str = "# CI jobs\n\nci:abcdefghijklmnop0123\n  ops:ZYXWVUTSRQPONMLK9876:admin  \n";

    fn tokens() -> Tokens {
        Tokens::parse(FILE).unwrap().unwrap()
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_pass))
    }

    #[test]
    fn session_ids_in_paths_are_cut_to_their_prefix() {
        let id = "0f6c2b1e-9a53-4c1d-8b5e-2d7a9c4e1f00";
        assert_eq!(redact_ids(&format!("/session/{id}")), "/session/0f6c2b1e");
        assert_eq!(redact_ids("/session/heartbeat"), "/session/heartbeat");
        assert_eq!(redact_ids("/"), "/");
        // Not a UUID: left as it is (nothing of a credential).
        let odd = "0f6c2b1e-9a53-4c1d-8b5e-2d7a9c4e1fzz";
        assert_eq!(redact_ids(&format!("/x/{odd}")), format!("/x/{odd}"));
    }

    #[test]
    fn names_in_force() {
        let t = tokens();
        assert!(t.has_name("ci") && t.has_name("ops"));
        assert!(!t.has_name("c") && !t.has_name("other"));
    }

    #[test]
    fn bearer_and_basic_name_the_caller() {
        let t = tokens();
        let ci = t.identify(Some("Bearer abcdefghijklmnop0123")).unwrap();
        assert_eq!((&*ci.name, ci.admin), ("ci", false));
        let ops = t.identify(Some("bearer ZYXWVUTSRQPONMLK9876")).unwrap();
        assert_eq!((&*ops.name, ops.admin), ("ops", true));
        let ci = t.identify(Some(&basic("ci:abcdefghijklmnop0123"))).unwrap();
        assert_eq!(&*ci.name, "ci");
    }

    #[test]
    fn the_first_admin_line_is_found_for_the_hosts_own_commands() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{FILE}root:AAAABBBBCCCCDDDD1111:admin\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Tokens::first_admin(&path).unwrap(),
            Some(("ops".to_owned(), "ZYXWVUTSRQPONMLK9876".to_owned()))
        );
        std::fs::write(&path, "ci:abcdefghijklmnop0123\n#x:y:admin\n").unwrap();
        assert_eq!(Tokens::first_admin(&path).unwrap(), None);
        std::fs::write(&path, "broken\n").unwrap();
        assert!(Tokens::first_admin(&path).is_err());
    }

    #[test]
    fn wrong_or_malformed_credentials_are_nobody() {
        let t = tokens();
        let long = format!("Bearer {}", "x".repeat(10_000));
        let cases = [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer abcdefghijklmnop012"),
            Some("Token abcdefghijklmnop0123"),
            Some("Basic !!!not-base64!!!"),
            Some("Basic "),
            Some(long.as_str()),
        ];
        for case in cases {
            assert_eq!(t.identify(case), None, "{case:?}");
        }
        // No colon; the other name's token; a name that does not exist.
        for pair in [
            "ciabcdefghijklmnop0123",
            "ci:ZYXWVUTSRQPONMLK9876",
            "x:abcdefghijklmnop0123",
        ] {
            assert_eq!(t.identify(Some(&basic(pair))), None, "{pair}");
        }
        // Non-UTF-8 name in Basic.
        let raw = format!("Basic {}", STANDARD.encode(b"\xff:abcdefghijklmnop0123"));
        assert_eq!(t.identify(Some(&raw)), None);
    }

    #[test]
    fn bad_lines_are_named_without_their_token() {
        let cases = [
            ("ci", 1, "expected NAME:TOKEN"),
            ("ci:short", 1, "shorter than 16"),
            ("# c\nbad name:abcdefghijklmnop0123", 2, "the name must be"),
            (":abcdefghijklmnop0123", 1, "the name must be"),
            ("ci:abcdefghijklmnop0123:root", 1, "third field"),
            ("ci:abcdefghijklmnop0123:admin:x", 1, "too many"),
            (
                "ci:abcdefghijklmnop0123\nci:abcdefghijklmnop0124",
                2,
                "given twice",
            ),
            (
                "a:abcdefghijklmnop0123\nb:abcdefghijklmnop0123",
                2,
                "another name",
            ),
            ("ci:abcdefgh\tijklmnop0123", 1, "space or a control"),
        ];
        for (text, line, why) in cases {
            let (n, message) = Tokens::parse(text).err().unwrap();
            assert_eq!(n, line, "{text:?}");
            assert!(message.contains(why), "{text:?}: {message}");
            assert!(!message.contains("abcdefgh"), "{message}");
        }
        assert!(Tokens::parse("# nothing\n\n").unwrap().is_none());
    }

    #[test]
    fn the_file_must_not_be_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, FILE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Tokens::load(&path).err().unwrap().to_string();
        assert!(err.contains("readable by every user (mode 644)"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(Tokens::load(&path).unwrap().count(), 2);
        let missing = Tokens::load(&dir.path().join("nope")).err().unwrap();
        assert!(missing.to_string().starts_with("cannot read token file"));
    }

    #[test]
    fn the_throttle_blocks_an_address_after_repeated_failures() {
        let throttle = Throttle::default();
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let good: IpAddr = "198.51.100.2".parse().unwrap();
        let t0 = Duration::from_secs(1000);
        for n in 1..MAX_FAILURES {
            let failed = throttle.fail(bad, t0);
            assert_eq!(
                (failed.first, failed.blocked),
                (n == 1, None),
                "failure {n}"
            );
            assert_eq!(throttle.blocked(bad, t0), None);
        }
        assert_eq!(
            throttle.fail(bad, t0).blocked,
            Some(Key::Host4(0xc000_0201))
        );
        assert_eq!(throttle.blocked(bad, t0), Some(60));
        assert_eq!(throttle.blocked(good, t0), None);
        let later = t0 + Duration::from_secs(45);
        assert_eq!(throttle.blocked(bad, later), Some(15));
        assert_eq!(throttle.blocked(bad, t0 + WINDOW), None);
        // Failures spread wider than the window never block.
        let throttle = Throttle::default();
        for n in 0..3 * MAX_FAILURES {
            let at = t0 + Duration::from_secs(u64::from(n) * 4);
            assert_eq!(throttle.fail(bad, at).blocked, None);
        }
    }

    #[test]
    fn a_slash_24_and_an_ipv6_slash_64_count_as_one() {
        let throttle = Throttle::default();
        let t0 = Duration::from_secs(10);
        // Five failures from each of twenty addresses of one /24: the /24 is blocked, and
        // with it an address of it that never failed; the next /24 is not.
        let mut blocked = None;
        for host in 1..=20u8 {
            for _ in 0..5 {
                blocked = blocked.or(throttle.fail(IpAddr::from([192, 0, 2, host]), t0).blocked);
            }
        }
        assert_eq!(blocked, Some(Key::Net24(0xc000_0200)));
        assert_eq!(
            throttle.blocked(IpAddr::from([192, 0, 2, 200]), t0),
            Some(60)
        );
        assert_eq!(throttle.blocked(IpAddr::from([192, 0, 3, 1]), t0), None);
        // IPv6: one /64, whatever the low bits.
        let throttle = Throttle::default();
        for n in 0..MAX_FAILURES {
            let addr: IpAddr = format!("2001:db8:0:1::{:x}", n + 1).parse().unwrap();
            throttle.fail(addr, t0);
        }
        assert_eq!(
            throttle.blocked("2001:db8:0:1:ffff::1".parse().unwrap(), t0),
            Some(60)
        );
        assert_eq!(
            throttle.blocked("2001:db8:0:2::1".parse().unwrap(), t0),
            None
        );
        assert_eq!(
            Key::of("2001:db8:0:1::9".parse().unwrap()).0.to_string(),
            "2001:db8:0:1::/64"
        );
    }

    #[test]
    fn a_full_table_makes_room_and_still_blocks_a_new_address() {
        let throttle = Throttle::default();
        let t0 = Duration::from_secs(5);
        for n in 0..(MAX_TRACKED as u32 * 2) {
            // Each in a /24 of its own: two keys per address.
            throttle.fail(IpAddr::from((n << 8 | 1).to_be_bytes()), t0);
        }
        assert!(throttle.table.lock().unwrap().keys.len() <= MAX_TRACKED);
        let new: IpAddr = "203.0.113.9".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            throttle.fail(new, t0);
        }
        assert_eq!(throttle.blocked(new, t0), Some(60));
        // The blocked address kept its entry while newer ones came and went.
        for n in 0..(MAX_TRACKED as u32) {
            throttle.fail(IpAddr::from((0x0a00_0000 | n << 8).to_be_bytes()), t0);
        }
        assert_eq!(throttle.blocked(new, t0), Some(60));
        assert!(throttle.table.lock().unwrap().keys.len() <= MAX_TRACKED);
    }

    #[test]
    fn events_are_one_per_address_per_window_and_bounded_over_all() {
        let throttle = Throttle::default();
        let t0 = Duration::from_secs(5);
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let recorded: Vec<bool> = (0..10).map(|_| throttle.fail(one, t0).record).collect();
        assert_eq!(recorded.iter().filter(|r| **r).count(), 1);
        // A flood from many addresses: EVENTS_PER_WINDOW recorded, the rest counted.
        let mut recorded = 1;
        for n in 0..1000u32 {
            recorded += u32::from(
                throttle
                    .fail(IpAddr::from((0x0a00_0000 | n << 8).to_be_bytes()), t0)
                    .record,
            );
        }
        assert_eq!(recorded, EVENTS_PER_WINDOW);
        let next = throttle.fail("203.0.113.1".parse().unwrap(), t0 + WINDOW);
        assert!(next.record);
        assert_eq!(next.suppressed, 1001 - u64::from(EVENTS_PER_WINDOW));
    }
}
