//! The multipart upload of `POST /lab`: the `topology` file, the optional `reuse` flag and the
//! repeatable `extra_files`, streamed into a fresh lab work directory.
//!
//! The `multipart` crate does the parsing; it stays behind this module so that it can be
//! replaced. This module owns the limits (total bytes, number of parts) and the file-name
//! rules, so that nothing a client sends is ever written outside the work directory.
//!
//! Why one file of this size: the multipart crate is kept behind this one module, with our
//! own reading of part headers where the crate's is wrong, and the limits around it.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use multipart::server::Multipart;
use sha2::{Digest, Sha256};

use crate::lab::record::Hash;

/// Most parts accepted in one upload.
pub const MAX_PARTS: usize = 256;

pub struct Limits {
    pub max_bytes: u64,
    pub max_parts: usize,
}

/// A stored upload.
#[derive(Debug)]
pub struct Upload {
    /// Full path of the topology file inside the work directory.
    pub topology: PathBuf,
    pub hash: Hash,
    pub reuse: bool,
    /// The extra files' paths relative to the work directory, in upload order.
    pub extra_files: Vec<PathBuf>,
}

#[derive(Debug)]
pub enum UploadError {
    /// No `topology` part (also: not a multipart body at all, or cut short before it).
    MissingTopology,
    /// `reuse` is not a boolean; carries what was sent.
    BadBool(String),
    /// `multipart/form-data` without a boundary.
    MissingBoundary,
    BadBoundary,
    TopologyExtension,
    TopologyName(String),
    TopologyNotAFile,
    DuplicateTopology,
    EmptyTopology,
    ExtraName {
        name: String,
        reason: &'static str,
    },
    TooLarge(u64),
    TooManyParts(usize),
    Malformed(String),
    /// A part's headers cannot be read; says why.
    BadPartHeaders(&'static str),
    Io(io::Error),
}

impl UploadError {
    pub fn status(&self) -> u16 {
        match self {
            UploadError::MissingTopology | UploadError::BadBool(_) => 422,
            UploadError::TooLarge(_) | UploadError::TooManyParts(_) => 413,
            UploadError::Io(_) => 500,
            _ => 400,
        }
    }
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UploadError::MissingTopology => f.write_str("Field required: topology"),
            UploadError::BadBool(v) => write!(f, "reuse is not a boolean: {v:?}"),
            UploadError::MissingBoundary => f.write_str("Missing boundary in multipart."),
            UploadError::BadBoundary => f.write_str("Invalid boundary in multipart."),
            UploadError::TopologyExtension => f.write_str("Topology must be a .yml or .yaml file"),
            UploadError::TopologyName(name) => write!(
                f,
                "Topology file name must be a plain file name (no path, no leading '-'): {name:?}"
            ),
            UploadError::TopologyNotAFile => {
                f.write_str("The topology part must be a file upload with a file name")
            }
            UploadError::DuplicateTopology => f.write_str("Only one topology file may be uploaded"),
            UploadError::EmptyTopology => f.write_str("Topology file is empty"),
            UploadError::ExtraName { name, reason } => {
                write!(f, "Invalid extra file name {name:?}: {reason}")
            }
            UploadError::TooLarge(limit) => write!(
                f,
                "Upload too large: the limit is {limit} bytes (--max-upload-bytes)"
            ),
            UploadError::TooManyParts(limit) => {
                write!(f, "Too many parts in the upload: the limit is {limit}")
            }
            UploadError::Malformed(why) => write!(f, "Malformed multipart body: {why}"),
            UploadError::BadPartHeaders(why) => write!(f, "Malformed multipart body: {why}"),
            UploadError::Io(e) => write!(f, "cannot store the upload: {e}"),
        }
    }
}

/// The boundary of a `multipart/form-data` content type. Any other content type (none, JSON,
/// url-encoded) cannot carry the topology file, so it counts as a missing `topology`.
pub fn boundary(content_type: Option<&str>) -> Result<String, UploadError> {
    let Some(content_type) = content_type else {
        return Err(UploadError::MissingTopology);
    };
    let mut params = content_type.split(';');
    let media = params.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return Err(UploadError::MissingTopology);
    }
    let value = params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .ok_or(UploadError::MissingBoundary)?;
    let valid = (1..=70).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !value.ends_with(' ');
    if valid {
        Ok(value)
    } else if value.is_empty() {
        Err(UploadError::MissingBoundary)
    } else {
        Err(UploadError::BadBoundary)
    }
}

/// Checks the topology's file name: a plain `.yml`/`.yaml` file name.
fn check_topology_name(name: &str) -> Result<(), UploadError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(UploadError::TopologyExtension);
    }
    if name.contains(['/', '\\', '\0']) || name.chars().any(char::is_control) {
        return Err(UploadError::TopologyName(name.to_owned()));
    }
    let lower = name.to_ascii_lowercase();
    let stem_len = if lower.ends_with(".yaml") {
        name.len() - 5
    } else if lower.ends_with(".yml") {
        name.len() - 4
    } else {
        return Err(UploadError::TopologyExtension);
    };
    if stem_len == 0 {
        return Err(UploadError::TopologyExtension);
    }
    // It goes on netlab's command line: a leading '-' would read as an option.
    if name.starts_with('-') || name.len() > 255 {
        return Err(UploadError::TopologyName(name.to_owned()));
    }
    Ok(())
}

/// Checks an extra file's name and turns it into a relative path inside the work directory.
fn extra_file_path(name: &str) -> Result<PathBuf, UploadError> {
    let bad = |reason| UploadError::ExtraName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if name.contains('\\') {
        return Err(bad("backslashes are not allowed"));
    }
    if name.contains('\0') || name.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    if name.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    let mut path = PathBuf::new();
    for segment in name.split('/') {
        match segment {
            "" => return Err(bad("empty path segments are not allowed")),
            "." | ".." => return Err(bad("'.' and '..' segments are not allowed")),
            s if s.len() > 255 => return Err(bad("a path segment is longer than 255 bytes")),
            s => path.push(s),
        }
    }
    Ok(path)
}

/// What the body reader has seen, kept by [`receive`] and written by the [`Limited`] reader
/// it lends it to: the multipart parser owns the reader, and its errors alone cannot tell a
/// limit from a body cut short.
struct Seen {
    /// More than the limit came through; every read fails from then on.
    over: bool,
    /// The body ended (a read returned 0 bytes).
    ended: bool,
    /// Sees every byte, to read the parts' headers itself (see [`HeaderScanner`]).
    headers: HeaderScanner,
}

/// A reader that fails once more than `remaining` bytes come through (and records it in
/// `seen`), or once `cancel` is set (the upload was given up on).
struct Limited<'a, R> {
    inner: R,
    remaining: u64,
    seen: &'a RefCell<Seen>,
    cancel: &'a AtomicBool,
}

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "upload given up"));
        }
        if self.seen.borrow().over {
            return Err(io::Error::other("upload limit exceeded"));
        }
        // Ask for one byte more than allowed, to tell "exactly at the limit" from "over".
        let want = buf.len().min(self.remaining.saturating_add(1) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        let mut seen = self.seen.borrow_mut();
        if n == 0 && want > 0 {
            seen.ended = true;
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "upload given up"));
        }
        if n as u64 > self.remaining {
            seen.over = true;
            return Err(io::Error::other("upload limit exceeded"));
        }
        self.remaining -= n as u64;
        seen.headers.feed(&buf[..n]);
        Ok(n)
    }
}

/// Longest header block of one part kept by [`HeaderScanner`].
const MAX_HEADER_BLOCK: usize = 16 * 1024;

/// Finds the header block of each part in the raw body as it streams by (the multipart
/// crate parses them too, but cuts quoted parameters at the first ';'). Blocks come out in
/// part order, one per part; `None` for a block too long to keep.
struct HeaderScanner {
    /// `\r\n--BOUNDARY`
    delimiter: Vec<u8>,
    window: Vec<u8>,
    blocks: VecDeque<Option<Vec<u8>>>,
    done: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl HeaderScanner {
    fn new(boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        HeaderScanner {
            delimiter,
            // The body's first delimiter has no line break before it.
            window: b"\r\n".to_vec(),
            blocks: VecDeque::new(),
            done: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        self.window.extend_from_slice(bytes);
        loop {
            let Some(at) = find(&self.window, &self.delimiter) else {
                // Keep what may be the start of a delimiter.
                let keep = self.delimiter.len() - 1;
                let excess = self.window.len().saturating_sub(keep);
                self.window.drain(..excess);
                return;
            };
            let after = at + self.delimiter.len();
            if self.window.len() < after + 2 {
                self.window.drain(..at);
                return;
            }
            if &self.window[after..after + 2] == b"--" {
                self.done = true;
                self.window = Vec::new();
                return;
            }
            let Some(line_end) = find(&self.window[after..], b"\r\n") else {
                self.window.drain(..at);
                return;
            };
            let start = after + line_end + 2;
            if self.window[start..].starts_with(b"\r\n") {
                self.blocks.push_back(Some(Vec::new()));
                self.window.drain(..start + 2);
                continue;
            }
            match find(&self.window[start..], b"\r\n\r\n") {
                Some(end) if end <= MAX_HEADER_BLOCK => {
                    self.blocks
                        .push_back(Some(self.window[start..start + end + 2].to_vec()));
                    self.window.drain(..start + end + 4);
                }
                Some(end) => {
                    self.blocks.push_back(None);
                    self.window.drain(..start + end + 4);
                }
                None if self.window.len() - start > MAX_HEADER_BLOCK => {
                    self.blocks.push_back(None);
                    self.window.drain(..start);
                }
                None => {
                    self.window.drain(..at);
                    return;
                }
            }
        }
    }
}

/// The `name` and `filename` of a part's `Content-Disposition` header, with quoted values
/// read as quoted strings: a `;` inside quotes belongs to the value.
fn disposition(block: &[u8]) -> Option<(String, Option<String>)> {
    let text = std::str::from_utf8(block).ok()?;
    let value = text.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(value)
    })?;
    let mut params = Vec::new();
    let mut chars = value.chars().peekable();
    // The disposition type, up to the first ';'.
    for c in chars.by_ref() {
        if c == ';' {
            break;
        }
    }
    loop {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            // Taken literally up to the closing quote, as the crate does (and as browsers
            // send them: no backslash escapes), only not cut at a ';'.
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                val.push(c);
            }
            for c in chars.by_ref() {
                if c == ';' {
                    break;
                }
            }
        } else {
            for c in chars.by_ref() {
                if c == ';' {
                    break;
                }
                val.push(c);
            }
            val = val.trim().to_owned();
        }
        params.push((key, val));
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    Some((get("name")?, get("filename")))
}

/// Which relative paths are taken in the work directory, as files or as directories.
#[derive(Default)]
struct Layout {
    files: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
}

impl Layout {
    fn is_free(&self, path: &Path) -> bool {
        !self.files.contains(path)
            && !self.dirs.contains(path)
            && path.ancestors().skip(1).all(|a| !self.files.contains(a))
    }

    fn take(&mut self, path: &Path) {
        for ancestor in path.ancestors().skip(1) {
            if !ancestor.as_os_str().is_empty() {
                self.dirs.insert(ancestor.to_path_buf());
            }
        }
        self.files.insert(path.to_path_buf());
    }
}

/// Streams a multipart body into `work_dir` (created here, and left for the caller to remove
/// on error).
pub fn receive<R: Read>(
    body: R,
    boundary: &str,
    limits: &Limits,
    work_dir: &Path,
    cancel: &AtomicBool,
) -> Result<Upload, UploadError> {
    let seen = RefCell::new(Seen {
        over: false,
        ended: false,
        headers: HeaderScanner::new(boundary),
    });
    let limited = Limited {
        inner: body,
        remaining: limits.max_bytes,
        seen: &seen,
        cancel,
    };
    let mut multipart = Multipart::with_body(limited, boundary);
    fs::create_dir_all(work_dir).map_err(UploadError::Io)?;
    let mut parts = Parts {
        seen: &seen,
        limits,
        work_dir,
        topology: None,
        reuse: true,
        extra_files: Vec::new(),
        layout: Layout::default(),
        count: 0,
    };
    loop {
        let mut field = match multipart.read_entry() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(e) => return Err(parts.parse_failed(e)),
        };
        parts.count += 1;
        if parts.count > limits.max_parts {
            return Err(UploadError::TooManyParts(limits.max_parts));
        }
        let name = field.headers.name.to_string();
        let mut filename = field.headers.filename.clone();
        // The crate cuts a quoted file name at its first ';' ("a;b.yml" becomes "a"): the
        // name comes from our own reading of this part's headers when it has one.
        let raw = seen.borrow_mut().headers.blocks.pop_front().flatten();
        if filename.is_some()
            && let Some((raw_name, Some(raw_filename))) = raw.as_deref().and_then(disposition)
            && raw_name == name
        {
            filename = Some(raw_filename);
        }
        match name.as_str() {
            "topology" => parts.topology(&mut field.data, filename)?,
            "extra_files" => parts.extra_file(&mut field.data, filename)?,
            "reuse" => parts.reuse(&mut field.data)?,
            // Unknown parts are read past (they count against the byte limit).
            _ => parts.skip(&mut field.data)?,
        }
    }
    parts.finish()
}

/// What [`receive`] has taken from the body so far, one method per kind of part.
struct Parts<'a> {
    seen: &'a RefCell<Seen>,
    limits: &'a Limits,
    work_dir: &'a Path,
    topology: Option<(PathBuf, Hash)>,
    reuse: bool,
    extra_files: Vec<PathBuf>,
    layout: Layout,
    count: usize,
}

impl Parts<'_> {
    /// Turns a parse error into the right answer: a limit, or a body cut short.
    fn parse_failed(&self, e: io::Error) -> UploadError {
        let seen = self.seen.borrow();
        if seen.over {
            UploadError::TooLarge(self.limits.max_bytes)
        } else if let Some(problem) = part_header_problem(&e, seen.ended) {
            UploadError::BadPartHeaders(problem)
        } else if self.topology.is_none() {
            UploadError::MissingTopology
        } else {
            UploadError::Malformed(e.to_string())
        }
    }

    fn failed(&self, e: StoreError) -> UploadError {
        store_error(e, self.seen, self.limits, self.topology.is_some())
    }

    fn topology(
        &mut self,
        data: &mut impl Read,
        filename: Option<String>,
    ) -> Result<(), UploadError> {
        let Some(filename) = filename else {
            return Err(UploadError::TopologyNotAFile);
        };
        check_topology_name(&filename)?;
        if self.topology.is_some() {
            return Err(UploadError::DuplicateTopology);
        }
        let relative = PathBuf::from(&filename);
        if !self.layout.is_free(&relative) {
            return Err(UploadError::ExtraName {
                name: filename,
                reason: "the same path as the topology",
            });
        }
        self.layout.take(&relative);
        let path = self.work_dir.join(&relative);
        let mut hasher = Sha256::new();
        let size = store(data, &path, Some(&mut hasher)).map_err(|e| self.failed(e))?;
        if size == 0 {
            return Err(UploadError::EmptyTopology);
        }
        self.topology = Some((path, hasher.finalize().into()));
        Ok(())
    }

    fn extra_file(
        &mut self,
        data: &mut impl Read,
        filename: Option<String>,
    ) -> Result<(), UploadError> {
        let Some(filename) = filename else {
            return Err(UploadError::ExtraName {
                name: String::new(),
                reason: "an extra file must be a file upload with a file name",
            });
        };
        let relative = extra_file_path(&filename)?;
        let path = self.work_dir.join(&relative);
        if !self.layout.is_free(&relative) {
            let reason = if self.topology.as_ref().is_some_and(|(t, _)| *t == path) {
                "the same path as the topology"
            } else {
                "clashes with another uploaded file"
            };
            return Err(UploadError::ExtraName {
                name: filename,
                reason,
            });
        }
        self.layout.take(&relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(UploadError::Io)?;
        }
        store(data, &path, None).map_err(|e| self.failed(e))?;
        self.extra_files.push(relative);
        Ok(())
    }

    fn reuse(&mut self, data: &mut impl Read) -> Result<(), UploadError> {
        let mut text = Vec::new();
        data.take(256)
            .read_to_end(&mut text)
            .map_err(|e| self.failed(e.into()))?;
        let text = String::from_utf8_lossy(&text).into_owned();
        self.reuse = crate::config::parse_bool(&text).ok_or(UploadError::BadBool(text))?;
        Ok(())
    }

    fn skip(&mut self, data: &mut impl Read) -> Result<(), UploadError> {
        io::copy(data, &mut io::sink()).map_err(|e| self.failed(e.into()))?;
        Ok(())
    }

    fn finish(self) -> Result<Upload, UploadError> {
        if self.seen.borrow().over {
            return Err(UploadError::TooLarge(self.limits.max_bytes));
        }
        let (topology, hash) = self.topology.ok_or(UploadError::MissingTopology)?;
        if let Some(name) = topology.file_name()
            && self.layout.dirs.contains(Path::new(name))
        {
            return Err(UploadError::ExtraName {
                name: name.to_string_lossy().into_owned(),
                reason: "the same path as the topology",
            });
        }
        Ok(Upload {
            topology,
            hash,
            reuse: self.reuse,
            extra_files: self.extra_files,
        })
    }
}

/// What is wrong with a part's headers, from the parser's error (its own message is no use
/// to a client), if that is what failed. `ended`: the body was read to its end, so headers
/// that never end were cut short (a missing topology, as the API has it), not too long.
fn part_header_problem(e: &io::Error, ended: bool) -> Option<&'static str> {
    if e.kind() != io::ErrorKind::InvalidData {
        return None;
    }
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("utf-8") || text.contains("utf8") {
        Some("a part header is not valid UTF-8 (file names must be UTF-8)")
    } else if text.contains("invalid header") || text.contains("invalid token") {
        Some(
            "a part header contains bytes not allowed in a header (such as NUL or other control characters)",
        )
    } else if !ended {
        Some("a part's headers are too long or not ended by an empty line")
    } else {
        None
    }
}

/// An error while copying a part: the byte limit, a body cut short, or the disk.
fn store_error(
    e: StoreError,
    seen: &RefCell<Seen>,
    limits: &Limits,
    topology_seen: bool,
) -> UploadError {
    match e {
        StoreError::Write(e) => UploadError::Io(e),
        StoreError::Read(_) if seen.borrow().over => UploadError::TooLarge(limits.max_bytes),
        StoreError::Read(_) if !topology_seen => UploadError::MissingTopology,
        StoreError::Read(e) => UploadError::Malformed(e.to_string()),
    }
}

enum StoreError {
    Read(io::Error),
    Write(io::Error),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Read(e)
    }
}

/// Copies one part into a new file (never over an existing one), hashing it on the way.
fn store(
    data: &mut impl Read,
    path: &Path,
    mut hasher: Option<&mut Sha256>,
) -> Result<u64, StoreError> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(StoreError::Write)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::Read(e)),
        };
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        file.write_all(&buf[..n]).map_err(StoreError::Write)?;
        total += n as u64;
    }
    Ok(total)
}

/// Removes a work directory and everything in it; a missing one is fine.
pub fn remove_dir(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove {}: {e}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_names() {
        for ok in ["a.yml", "a.yaml", "A.YML", "lab.Yaml", "x.y.yml"] {
            assert!(check_topology_name(ok).is_ok(), "{ok}");
        }
        for ext in ["", ".", "..", "a.txt", "yml", ".yml", "a.yml.txt"] {
            assert!(
                matches!(
                    check_topology_name(ext),
                    Err(UploadError::TopologyExtension)
                ),
                "{ext}"
            );
        }
        for path in ["a/b.yml", "..\\b.yml", "a\0.yml", "-x.yml", "a\n.yml"] {
            assert!(
                matches!(check_topology_name(path), Err(UploadError::TopologyName(_))),
                "{path:?}"
            );
        }
    }

    #[test]
    fn extra_file_names() {
        assert_eq!(
            extra_file_path("configs/r1.cfg").unwrap(),
            PathBuf::from("configs/r1.cfg")
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\0b",
        ] {
            assert!(extra_file_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary(Some("multipart/form-data; boundary=abc")).unwrap(),
            "abc"
        );
        assert_eq!(
            boundary(Some("Multipart/Form-Data;boundary=\"a b\"")).unwrap(),
            "a b"
        );
        assert!(matches!(
            boundary(Some("multipart/form-data")),
            Err(UploadError::MissingBoundary)
        ));
        assert!(matches!(
            boundary(Some("application/json")),
            Err(UploadError::MissingTopology)
        ));
        assert!(matches!(boundary(None), Err(UploadError::MissingTopology)));
    }
}

#[cfg(test)]
mod part_header_tests {
    use super::*;

    #[test]
    fn quoted_names_keep_their_semicolons() {
        let block = b"Content-Disposition: form-data; name=\"topology\"; filename=\"a;b.yml\"\r\nContent-Type: application/x-yaml\r\n";
        assert_eq!(
            disposition(block),
            Some(("topology".into(), Some("a;b.yml".into())))
        );
        assert_eq!(
            disposition(b"content-disposition: form-data;name=reuse\r\n"),
            Some(("reuse".into(), None))
        );
        // Backslashes are taken literally, as the crate takes them.
        assert_eq!(
            disposition(
                b"Content-Disposition: form-data; name=\"x\"; filename=\"c\\\\r1;.cfg\"\r\n"
            ),
            Some(("x".into(), Some("c\\\\r1;.cfg".into())))
        );
        // Fed in small pieces, the scanner finds every part's headers.
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"b\"; filename=\"x;y.yml\"\r\n\r\n--XyZ--\r\n";
        let mut scanner = HeaderScanner::new("XyZ");
        for piece in body.chunks(3) {
            scanner.feed(piece);
        }
        let names: Vec<_> = scanner
            .blocks
            .iter()
            .map(|b| disposition(b.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(
            names,
            [("a".into(), None), ("b".into(), Some("x;y.yml".into()))]
        );
        let upload = upload(&with_filename(b"a;b.yml")).unwrap();
        assert_eq!(upload.topology.file_name().unwrap(), "a;b.yml");
    }

    fn upload(body: &[u8]) -> Result<Upload, UploadError> {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 16 << 20,
            max_parts: MAX_PARTS,
        };
        receive(
            body,
            "XyZ",
            &limits,
            &dir.path().join("w"),
            &AtomicBool::new(false),
        )
    }

    fn with_filename(name: &[u8]) -> Vec<u8> {
        let mut body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"topology\"; filename=\"".to_vec();
        body.extend_from_slice(name);
        body.extend_from_slice(b"\"\r\n\r\nnodes: [r1]\r\n--XyZ--\r\n");
        body
    }

    #[test]
    fn unreadable_part_headers_get_a_clear_message() {
        let e = upload(&with_filename(b"a\0b.yml")).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(
            e.to_string()
                .starts_with("Malformed multipart body: a part header"),
            "{e}"
        );
        let e = upload(&with_filename(b"\xff\xfe.yml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Malformed multipart body: a part header is not valid UTF-8 (file names must be UTF-8)"
        );
        let mut huge = b"--XyZ\r\nContent-Disposition: form-data; name=\"topology\"; filename=\"t.yml\"\r\nX-Pad: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 200_000));
        huge.extend_from_slice(b"\r\n\r\nnodes: [r1]\r\n--XyZ--\r\n");
        let e = upload(&huge).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Malformed multipart body: a part's headers are too long or not ended by an empty line"
        );
        // A body cut short inside the headers is still a missing topology (422).
        let cut = &with_filename(b"t.yml")[..40];
        assert!(matches!(
            upload(cut).unwrap_err(),
            UploadError::MissingTopology
        ));
    }
}
