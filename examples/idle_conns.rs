//! The idle-connection table of `docs/performance.md`: with 0, 500, 2000 and 5000 idle connections open
//! (connected, nothing sent), how fast `/healthz` answers and what the server holds.
//!
//! Usage: idle_conns ADDR PID [COUNTS...]   (default counts: 0 500 2000 5000)
//! Prints one row per count: p50 and p95 of 200 sequential `GET /healthz` on fresh
//! connections, resident memory, threads and descriptors of PID (from /proc).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn status_field(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| "?".into())
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn healthz(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    (&head == b"HTTP/1.1 204").then(|| started.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddr = args[0].parse().expect("ADDR");
    let pid: u32 = args[1].parse().expect("PID");
    let counts: Vec<usize> = if args.len() > 2 {
        args[2..]
            .iter()
            .map(|c| c.parse().expect("count"))
            .collect()
    } else {
        vec![0, 500, 2000, 5000]
    };
    println!("| idle connections | /healthz p50 | p95 | failed | RSS | threads | descriptors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut idle: Vec<TcpStream> = Vec::new();
    for count in counts {
        while idle.len() < count {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => idle.push(s),
                Err(e) => {
                    eprintln!("connect {} failed: {e}", idle.len());
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut times = Vec::new();
        let mut failed = 0;
        for _ in 0..200 {
            match healthz(addr) {
                Some(t) => times.push(t),
                None => failed += 1,
            }
        }
        times.sort();
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
                .map_or("-".to_owned(), |t| {
                    format!("{:.2} ms", t.as_secs_f64() * 1000.0)
                })
        };
        println!(
            "| {count} | {} | {} | {failed} | {} | {} | {} |",
            pct(0.5),
            pct(0.95),
            status_field(pid, "VmRSS:"),
            status_field(pid, "Threads:"),
            fds(pid)
        );
    }
}
