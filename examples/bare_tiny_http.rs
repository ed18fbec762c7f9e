//! The ceiling of our HTTP stack: a bare tiny_http server that answers every request with a
//! fixed 204, with `THREADS` threads calling `recv()` directly (no channel, no routing, no
//! state). The benchmark drives it exactly like the real server.
//!
//! Usage: cargo run --release --example bare_tiny_http -- [PORT] [THREADS]
//! Prints `listening on http://ADDR` on stderr once bound.

use std::sync::Arc;

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let threads: usize = args.next().and_then(|t| t.parse().ok()).unwrap_or(4);
    let server = Arc::new(tiny_http::Server::http(("127.0.0.1", port)).expect("bind"));
    let addr = server.server_addr().to_ip().expect("an IP address");
    eprintln!("listening on http://{addr}");
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let server = Arc::clone(&server);
            std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    let _ = request.respond(tiny_http::Response::empty(204));
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
}
