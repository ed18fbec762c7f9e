//! One lab host: its URL (credentials taken out), the credentials it gets, and the typed
//! calls the client makes on it. Blocking HTTP with ureq; every body is read bounded and
//! parsed into the types of `neops_remote_lab::protocol`.

use std::io::Read;
use std::time::Duration;

use base64::Engine;
use neops_remote_lab::protocol::{
    Acquired, CLIENT_NAME_HEADER, Detail, Health, LOG_DONE_HEADER, LOG_OFFSET_HEADER, QueueView,
    SESSION_HEADER, SessionCreated, SessionStatus, TOPOLOGY_SHA256_HEADER, encode_client_name,
};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use ureq::Agent;
use ureq::http::Request;

use crate::netrc::Netrc;
use crate::term;

/// A host that does not answer its queue within this is skipped.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// `POST /session`.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Ending a session, releasing a lab.
pub const END_TIMEOUT: Duration = Duration::from_secs(10);
/// One heartbeat, at least (longer when heartbeats are further apart).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// One `GET /lab/log`.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// `POST /lab`: netlab up may take long; the server bounds it.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// A long-poll's answer may come this much after the wait it asked for.
pub const LONG_POLL_SLACK: Duration = Duration::from_secs(15);
/// The largest JSON body read (a queue view of thousands of sessions fits).
const MAX_JSON: u64 = 16 * 1024 * 1024;
/// Read size of `GET /lab/log` bodies: the memory a log chunk takes.
const LOG_READ: usize = 64 * 1024;

/// Why a call did not give what was asked.
#[derive(Debug)]
pub enum Failure {
    /// No answer: connection refused, timeout, TLS, a body cut short.
    Net(String),
    /// An answer, with a status not asked for; the detail is cleaned for printing.
    Status { code: u16, detail: String },
    /// A 2xx whose body is not what the API says.
    Body(String),
}

impl Failure {
    pub fn code(&self) -> Option<u16> {
        match self {
            Failure::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// 401 or 403: the host does not take these credentials.
    pub fn rejected(&self) -> bool {
        matches!(self.code(), Some(401 | 403))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Net(e) => f.write_str(e),
            Failure::Status { code, detail } => write!(f, "{code} {detail}"),
            Failure::Body(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

/// An answer: the status, the body, and the headers the client reads.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    /// The cleaned `detail` of an error answer (the text itself when not the envelope).
    fn detail(&self) -> String {
        let text = match serde_json::from_slice::<Detail>(&self.body) {
            Ok(d) => d.detail.to_string(),
            Err(_) => String::from_utf8_lossy(&self.body).into_owned(),
        };
        term::clean_short(&text, false)
    }

    fn fail(&self) -> Failure {
        Failure::Status {
            code: self.status,
            detail: self.detail(),
        }
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_slice(&self.body).map_err(|e| Failure::Body(e.to_string()))
    }
}

/// Where the credentials of a host come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Url,
    Netrc,
    Token,
    NetrcDefault,
    None,
}

impl Source {
    /// Where they came from, for a message naming a host that rejected them.
    pub fn text(self) -> &'static str {
        match self {
            Source::Url => "given in its URL",
            Source::Netrc => "of its ~/.netrc entry",
            Source::Token => "given by --token or $REMOTE_LAB_TOKEN",
            Source::NetrcDefault => "of the ~/.netrc default entry",
            Source::None => "(none sent: give a token in its URL, ~/.netrc or --token)",
        }
    }
}

pub struct Host {
    /// The base URL, without credentials or a trailing slash: what is printed.
    pub url: String,
    agent: Agent,
    auth: Option<String>,
    pub source: Source,
}

impl Host {
    /// `url` may carry credentials (`https://ci:TOKEN@lab1:8000`: Basic; `https://TOKEN@…`:
    /// Bearer); else the netrc entry of the host; else `token` (Bearer); else the netrc's
    /// `default` entry.
    pub fn new(url: &str, token: Option<&str>, netrc: &Netrc) -> Host {
        let (url, userinfo) = split_userinfo(url.trim().trim_end_matches('/'));
        let basic = |login: &str, password: &str| {
            let pair = format!("{login}:{password}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        let (auth, source) = if let Some((user, password)) = userinfo {
            match password {
                Some(password) => (Some(basic(&user, &password)), Source::Url),
                None => (Some(format!("Bearer {user}")), Source::Url),
            }
        } else if let Some(l) = netrc.machine(&host_of(&url)) {
            (Some(basic(&l.login, &l.password)), Source::Netrc)
        } else if let Some(token) = token {
            (Some(format!("Bearer {token}")), Source::Token)
        } else if let Some(l) = netrc.default_login() {
            (Some(basic(&l.login, &l.password)), Source::NetrcDefault)
        } else {
            (None, Source::None)
        };
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(format!("remote-lab/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Host {
            url,
            agent,
            auth,
            source,
        }
    }

    // ------------------------------------------------------------------------- the calls

    /// `GET /queue` (at most `limit` sessions listed).
    pub fn queue(&self, limit: Option<usize>) -> Result<QueueView, Failure> {
        let path = match limit {
            Some(n) => format!("/queue?limit={n}"),
            None => "/queue".to_owned(),
        };
        self.expect(200, self.call("GET", &path, &[], None, PROBE_TIMEOUT)?)
    }

    /// `GET /queue` as the server sent it (for `status --json`), and parsed.
    pub fn queue_raw(&self) -> Result<(QueueView, Box<RawValue>), Failure> {
        let answer = self.call("GET", "/queue", &[], None, PROBE_TIMEOUT)?;
        if answer.status != 200 {
            return Err(answer.fail());
        }
        let raw: Box<RawValue> = answer.parse()?;
        let view = serde_json::from_str(raw.get()).map_err(|e| Failure::Body(e.to_string()))?;
        Ok((view, raw))
    }

    /// `GET /debug/health`.
    pub fn health(&self) -> Result<Health, Failure> {
        self.expect(
            200,
            self.call("GET", "/debug/health", &[], None, PROBE_TIMEOUT)?,
        )
    }

    /// `POST /session`, with the client's name and the topology's SHA-256 (hex).
    pub fn create_session(
        &self,
        name: &str,
        topology_sha256: Option<&str>,
    ) -> Result<SessionCreated, Failure> {
        let encoded = encode_client_name(name);
        let mut headers = vec![(CLIENT_NAME_HEADER, encoded.as_str())];
        if let Some(sha) = topology_sha256 {
            headers.push((TOPOLOGY_SHA256_HEADER, sha));
        }
        let answer = self.call("POST", "/session", &headers, Some(empty()), CREATE_TIMEOUT)?;
        self.expect(201, answer)
    }

    /// `GET /session/{id}`, with `?wait=S` a long-poll.
    pub fn session_status(&self, id: &str, wait: Option<f64>) -> Result<SessionStatus, Failure> {
        let (path, timeout) = match wait {
            Some(wait) => (
                format!("/session/{id}?wait={wait:.3}"),
                Duration::from_secs_f64(wait) + LONG_POLL_SLACK,
            ),
            None => (format!("/session/{id}"), PROBE_TIMEOUT),
        };
        self.expect(200, self.call("GET", &path, &[], None, timeout)?)
    }

    /// `POST /session/heartbeat`.
    pub fn heartbeat(&self, id: &str, timeout: Duration) -> Result<(), Failure> {
        let answer = self.call(
            "POST",
            "/session/heartbeat",
            &[(SESSION_HEADER, id)],
            Some(empty()),
            timeout,
        )?;
        self.expect_empty(204, &answer)
    }

    /// `POST /lab` with the form; the devices as the server sent them.
    pub fn acquire(
        &self,
        id: &str,
        form: (String, Vec<u8>),
    ) -> Result<Acquired<Box<RawValue>>, Failure> {
        let answer = self.call(
            "POST",
            "/lab",
            &[(SESSION_HEADER, id)],
            Some(form),
            ACQUIRE_TIMEOUT,
        )?;
        self.expect(200, answer)
    }

    /// `POST /lab/release` (404: nothing to release).
    pub fn release(&self, id: &str) -> Result<(), Failure> {
        let answer = self.call(
            "POST",
            "/lab/release",
            &[(SESSION_HEADER, id)],
            Some(empty()),
            END_TIMEOUT,
        )?;
        self.expect_empty_or_gone(&answer)
    }

    /// `DELETE /session/{id}` (404: already gone).
    pub fn end(&self, id: &str) -> Result<(), Failure> {
        let answer = self.call("DELETE", &format!("/session/{id}"), &[], None, END_TIMEOUT)?;
        self.expect_empty_or_gone(&answer)
    }

    /// `GET /lab/log?offset=N`: feeds the body to `sink` in bounded reads (with whether
    /// the command ended); the next offset and whether the command ended. `Ok(None)`: the server has no such route.
    pub fn lab_log(
        &self,
        id: &str,
        offset: u64,
        sink: &mut impl FnMut(bool, &[u8]),
    ) -> Result<Option<(u64, bool)>, Failure> {
        let request = self
            .request(
                "GET",
                &format!("/lab/log?offset={offset}"),
                &[(SESSION_HEADER, id)],
            )
            .body(())
            .map_err(|e| Failure::Net(e.to_string()))?;
        let response = self.send(request, LOG_TIMEOUT)?;
        if response.status().as_u16() != 200 {
            return Ok(None);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        };
        let next = header(LOG_OFFSET_HEADER).and_then(|v| v.parse::<u64>().ok());
        let done = header(LOG_DONE_HEADER).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut reader = response.into_body().into_reader();
        let mut buffer = vec![0u8; LOG_READ];
        let mut read = 0u64;
        loop {
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    read += n as u64;
                    sink(done, &buffer[..n]);
                }
                Err(e) => return Err(Failure::Net(e.to_string())),
            }
        }
        Ok(Some((next.unwrap_or(offset + read), done)))
    }

    // ------------------------------------------------------------------------- plumbing

    fn expect<T: DeserializeOwned>(&self, status: u16, answer: Answer) -> Result<T, Failure> {
        if answer.status == status {
            answer.parse()
        } else {
            Err(answer.fail())
        }
    }

    fn expect_empty(&self, status: u16, answer: &Answer) -> Result<(), Failure> {
        if answer.status == status {
            Ok(())
        } else {
            Err(answer.fail())
        }
    }

    fn expect_empty_or_gone(&self, answer: &Answer) -> Result<(), Failure> {
        match answer.status {
            204 | 404 => Ok(()),
            _ => Err(answer.fail()),
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> ureq::http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        if let Some(auth) = &self.auth {
            builder = builder.header("Authorization", auth);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
    }

    /// One request. `body`: content type and bytes.
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(String, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        let builder = self.request(method, path, headers);
        let net = |e: ureq::http::Error| Failure::Net(e.to_string());
        let response = match body {
            Some((content_type, bytes)) => self.send(
                builder
                    .header("Content-Type", content_type)
                    .body(bytes)
                    .map_err(net)?,
                timeout,
            ),
            None => self.send(builder.body(()).map_err(net)?, timeout),
        }?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .with_config()
            .limit(MAX_JSON)
            .read_to_vec()
            .map_err(|e| Failure::Net(e.to_string()))?;
        Ok(Answer { status, body })
    }

    /// Sends a request with this host's agent, bounded by `timeout` as a whole.
    fn send<B: ureq::AsSendBody>(
        &self,
        request: Request<B>,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout))
            .build();
        self.agent
            .run(request)
            .map_err(|e| Failure::Net(term::clean_short(&e.to_string(), false)))
    }
}

fn empty() -> (String, Vec<u8>) {
    ("application/octet-stream".to_owned(), Vec::new())
}

/// Takes the credentials out of a URL: the URL without them, and the user and password
/// (percent-decoded).
pub fn split_userinfo(url: &str) -> (String, Option<(String, Option<String>)>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let decode = |s: &str| {
        String::from_utf8_lossy(&neops_remote_lab::protocol::percent_decode(s)).into_owned()
    };
    let userinfo = &rest[..at];
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => (decode(user), Some(decode(password))),
        None => (decode(userinfo), None),
    };
    (format!("{scheme}{}", &rest[at + 1..]), Some(credentials))
}

/// The host part of a URL (no scheme, credentials, port or path; IPv6 without brackets).
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("").to_owned();
    }
    authority.split(':').next().unwrap_or("").to_owned()
}

/// A `multipart/form-data` body: the content type and the bytes.
pub struct Multipart {
    boundary: String,
    body: Vec<u8>,
}

impl Multipart {
    pub fn new() -> Multipart {
        let boundary = format!("remote-lab-{}", uuid::Uuid::new_v4().simple());
        Multipart {
            boundary,
            body: Vec::new(),
        }
    }

    pub fn text(&mut self, name: &str, value: &str) {
        self.body.extend_from_slice(
            format!(
                "--{}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n",
                self.boundary
            )
            .as_bytes(),
        );
    }

    pub fn file(&mut self, name: &str, filename: &str, content_type: &str, data: &[u8]) {
        let filename = filename.replace(['"', '\r', '\n'], "_");
        self.body.extend_from_slice(
            format!(
                "--{}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
                 Content-Type: {content_type}\r\n\r\n",
                self.boundary
            )
            .as_bytes(),
        );
        self.body.extend_from_slice(data);
        self.body.extend_from_slice(b"\r\n");
    }

    pub fn finish(mut self) -> (String, Vec<u8>) {
        self.body
            .extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        (
            format!("multipart/form-data; boundary={}", self.boundary),
            self.body,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(host_of("http://lab1:8000/"), "lab1");
        assert_eq!(host_of("https://u:p@lab.example.org/x"), "lab.example.org");
        assert_eq!(host_of("http://[::1]:8000"), "::1");
        assert_eq!(host_of("lab2"), "lab2");
    }

    #[test]
    fn credentials_leave_the_url() {
        assert_eq!(
            split_userinfo("https://ci:s%40cret@lab1:8000/x"),
            (
                "https://lab1:8000/x".to_owned(),
                Some(("ci".to_owned(), Some("s@cret".to_owned())))
            )
        );
        assert_eq!(
            split_userinfo("http://TOKEN@lab1"),
            ("http://lab1".to_owned(), Some(("TOKEN".to_owned(), None)))
        );
        assert_eq!(
            split_userinfo("http://lab1/a@b"),
            ("http://lab1/a@b".to_owned(), None)
        );
    }

    #[test]
    fn credentials_by_precedence() {
        let netrc = Netrc::parse("machine lab1 login n password p\ndefault login d password e");
        assert_eq!(
            Host::new("http://u:p@lab1", Some("t"), &netrc).source,
            Source::Url
        );
        let host = Host::new("http://u:p@lab1", Some("t"), &netrc);
        assert_eq!(host.url, "http://lab1");
        assert_eq!(
            Host::new("http://lab1", Some("t"), &netrc).source,
            Source::Netrc
        );
        assert_eq!(
            Host::new("http://lab2", Some("t"), &netrc).source,
            Source::Token
        );
        assert_eq!(
            Host::new("http://lab2", None, &netrc).source,
            Source::NetrcDefault
        );
        assert_eq!(
            Host::new("http://lab2", None, &Netrc::default()).source,
            Source::None
        );
    }
}
