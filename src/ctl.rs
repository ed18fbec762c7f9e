//! The host's commands that talk to the running server over HTTP: `drain [--wait]` and
//! `resume`. They reach it where the server's own options say it listens (`--host`,
//! `--port`; a wildcard address means loopback) and present the first `NAME:TOKEN:admin`
//! line of `--token-file` (nothing on a server without tokens). One plain HTTP/1.1 request
//! per connection: the server binary carries no HTTP client library.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::config::Config;
use crate::core::auth::Tokens;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `drain --wait` asks how many sessions are left.
const POLL: Duration = Duration::from_millis(500);

/// Where the server is, and what proves the caller is an admin.
struct Target {
    address: String,
    authorization: Option<String>,
}

fn target(config: &Config) -> Result<Target, String> {
    let host = match config.host.trim_matches(['[', ']']) {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        other => other,
    };
    let address = if host.contains(':') {
        format!("[{host}]:{}", config.port)
    } else {
        format!("{host}:{}", config.port)
    };
    let authorization = match &config.token_file {
        None => None,
        Some(path) => match Tokens::first_admin(path).map_err(|e| e.to_string())? {
            Some((_, token)) => Some(format!("Bearer {token}")),
            None => {
                return Err(format!(
                    "{} has no NAME:TOKEN:admin line: add one (for example `admin:<32 random \
                     characters>:admin`) and run `neops-remote-lab reload`",
                    path.display()
                ));
            }
        },
    };
    Ok(Target {
        address,
        authorization,
    })
}

/// One request; the status and the body.
fn call(target: &Target, method: &str, path: &str) -> Result<(u16, String), String> {
    let unreachable = |e: std::io::Error| format!("no server answers at {}: {e}", target.address);
    let addr = target
        .address
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| format!("{} names no address", target.address))?;
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(unreachable)?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n",
        target.address
    );
    if let Some(auth) = &target.authorization {
        request.push_str(&format!("Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut answer = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("{} answered something that is not HTTP", target.address))?;
    Ok((status, body.to_owned()))
}

/// An answer other than the one expected, in words.
fn refused(status: u16, body: &str) -> String {
    let detail = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    match status {
        401 => format!("the server refused the admin token (401 {detail})"),
        403 => format!("the token is not an admin token (403 {detail})"),
        404 => "the server does not know this command (404): is it an older version?".to_owned(),
        _ => format!("the server answered {status}: {detail}"),
    }
}

/// Sessions on the server (`GET /debug/health`).
fn sessions(target: &Target) -> Result<u64, String> {
    let (status, body) = call(target, "GET", "/debug/health")?;
    if status != 200 {
        return Err(refused(status, &body));
    }
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["sessions"].as_u64())
        .ok_or_else(|| "GET /debug/health gave no session count".to_owned())
}

fn admin_post(config: &Config, path: &str) -> Result<Target, String> {
    let target = target(config)?;
    match call(&target, "POST", path)? {
        (204, _) => Ok(target),
        (status, body) => Err(refused(status, &body)),
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "session" } else { "sessions" }
}

/// `neops-remote-lab drain [--wait]`; the exit code.
pub fn drain(config: &Config, wait: bool) -> i32 {
    let run = || -> Result<(), String> {
        let target = admin_post(config, "/admin/drain")?;
        let mut left = sessions(&target)?;
        println!(
            "draining {}: no new sessions; {left} {} left to finish",
            target.address,
            plural(left)
        );
        if !wait {
            return Ok(());
        }
        while left > 0 {
            std::thread::sleep(POLL);
            let now = sessions(&target)?;
            if now != left && now > 0 {
                println!("{now} {} left", plural(now));
            }
            left = now;
        }
        println!("drained: no session left");
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("neops-remote-lab drain: {e}");
            1
        }
    }
}

/// `neops-remote-lab resume`; the exit code.
pub fn resume(config: &Config) -> i32 {
    match admin_post(config, "/admin/resume") {
        Ok(target) => {
            println!("{} takes new sessions again", target.address);
            0
        }
        Err(e) => {
            eprintln!("neops-remote-lab resume: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_mean_loopback() {
        let mut config = Config::defaults("/x".into());
        config.port = 8001;
        assert_eq!(target(&config).unwrap().address, "127.0.0.1:8001");
        config.host = "::".into();
        assert_eq!(target(&config).unwrap().address, "[::1]:8001");
        config.host = "lab1.example".into();
        assert_eq!(target(&config).unwrap().address, "lab1.example:8001");
        config.host = "[fd00::1]".into();
        assert_eq!(target(&config).unwrap().address, "[fd00::1]:8001");
    }

    #[test]
    fn answers_in_words() {
        assert_eq!(
            refused(403, r#"{"detail":"Only an admin token may do this"}"#),
            "the token is not an admin token (403 Only an admin token may do this)"
        );
        assert_eq!(
            refused(503, r#"{"detail":"cannot change the drain file: x"}"#),
            "the server answered 503: cannot change the drain file: x"
        );
    }
}
