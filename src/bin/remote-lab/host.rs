//! One lab host: blocking HTTP with ureq, the credentials it gets (a bearer token, else the
//! `~/.netrc` login as Basic), and the few calls the client makes.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use ureq::Agent;
use ureq::http::Request;

/// An answer: status, body, and the headers the client reads.
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub log_offset: Option<u64>,
    pub log_done: Option<bool>,
}

impl Answer {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// The `detail` of an error answer (the text itself when it is not the envelope).
    pub fn detail(&self) -> String {
        match self.json().as_ref().and_then(|v| v.get("detail")) {
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
            None => self.body.trim().to_owned(),
        }
    }
}

pub struct Host {
    /// The base URL without a trailing slash.
    pub url: String,
    agent: Agent,
    auth: Option<String>,
}

impl Host {
    pub fn new(url: &str, token: Option<&str>) -> Host {
        let url = url.trim_end_matches('/').to_owned();
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(format!("remote-lab/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let auth = match token {
            Some(token) => Some(format!("Bearer {token}")),
            None => netrc_login(&url).map(|(login, password)| {
                let pair = format!("{login}:{password}");
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }),
        };
        Host { url, agent, auth }
    }

    /// One request. `body`: content type and bytes (`POST` only).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        if let Some(auth) = &self.auth {
            builder = builder.header("Authorization", auth);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = match body {
            Some((content_type, bytes)) => {
                let request = builder
                    .header("Content-Type", content_type)
                    .body(bytes)
                    .map_err(|e| e.to_string())?;
                self.send(request, timeout)
            }
            None => self.send(builder.body(()).map_err(|e| e.to_string())?, timeout),
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let log_offset = header("x-log-offset").and_then(|v| v.trim().parse().ok());
        let log_done = header("x-log-done").map(|v| v.trim().eq_ignore_ascii_case("true"));
        let body = response
            .into_body()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok(Answer {
            status,
            body,
            log_offset,
            log_done,
        })
    }

    pub fn get(&self, path: &str, timeout: Duration) -> Result<Answer, String> {
        self.call("GET", path, &[], None, timeout)
    }

    /// Sends a request with this host's agent, bounded by `timeout` as a whole.
    fn send<B: ureq::AsSendBody>(
        &self,
        request: Request<B>,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout))
            .build();
        self.agent.run(request)
    }
}

/// The login and password `~/.netrc` (or `$NETRC`) has for the URL's host.
fn netrc_login(url: &str) -> Option<(String, String)> {
    let path = match std::env::var_os("NETRC") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".netrc"),
    };
    let text = std::fs::read_to_string(path).ok()?;
    netrc_lookup(&text, &host_of(url))
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

/// `machine NAME login L password P` entries, and `default`, as curl reads them: the first
/// entry for the host, else the default.
pub fn netrc_lookup(text: &str, host: &str) -> Option<(String, String)> {
    type Entry = (Option<String>, Option<String>, Option<String>);
    let mut entries: Vec<Entry> = Vec::new();
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        match word {
            "machine" => entries.push((words.next().map(str::to_owned), None, None)),
            "default" => entries.push((None, None, None)),
            "login" => {
                let value = words.next().map(str::to_owned);
                if let Some(entry) = entries.last_mut() {
                    entry.1 = value;
                }
            }
            "password" => {
                let value = words.next().map(str::to_owned);
                if let Some(entry) = entries.last_mut() {
                    entry.2 = value;
                }
            }
            "account" => {
                words.next();
            }
            "macdef" => break,
            _ => {}
        }
    }
    let (_, login, password) = entries
        .into_iter()
        .find(|(machine, _, _)| machine.as_deref().is_none_or(|m| m == host))?;
    Some((login?, password?))
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
    fn netrc_entries() {
        let text = "machine other login a password b\n\
                    machine lab1 login ci password s3cret\n\
                    default login d password e\n";
        assert_eq!(
            netrc_lookup(text, "lab1"),
            Some(("ci".into(), "s3cret".into()))
        );
        assert_eq!(netrc_lookup(text, "lab9"), Some(("d".into(), "e".into())));
        assert_eq!(netrc_lookup("machine x login a password b", "y"), None);
        assert_eq!(netrc_lookup("", "y"), None);
    }
}
