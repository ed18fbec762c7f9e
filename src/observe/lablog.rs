//! netlab's live output for `GET /lab/log`: what the lab thread's command prints, line by
//! line as it comes (the driver's pipe readers feed it), in bounded buffers: the job running
//! now (or the last one), the last start and the last teardown, [`LIMIT`] bytes each, the
//! oldest lines dropped first.
//!
//! Offsets count bytes of one stream that never restarts while the server runs: every job
//! begins where the previous one ended, so a client that follows with the offset it was
//! given sees one job's output after the other.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::observe::events::now_ms;

/// Bytes kept per buffer.
pub const LIMIT: usize = 1024 * 1024;

/// Which job a recording is: the label clients see in `X-Log-Command`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// `POST /lab`: `netlab up` and the inspections.
    Up,
    /// A teardown: `netlab down`.
    Down,
}

impl Job {
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Up => "up",
            Job::Down => "down",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Recording {
    pub job: Job,
    /// Offset of the first byte ever written to it.
    pub start: u64,
    /// Bytes dropped from its front.
    pub dropped: u64,
    pub data: VecDeque<u8>,
    pub done: bool,
    /// Unix ms it began.
    pub since_ms: u64,
}

impl Recording {
    pub fn end(&self) -> u64 {
        self.start + self.dropped + self.data.len() as u64
    }

    fn push(&mut self, bytes: &[u8]) {
        self.data.extend(bytes);
        if self.data.len() > LIMIT {
            // Drop whole lines while over the limit.
            let mut excess = self.data.len() - LIMIT;
            if let Some(nl) = self.data.iter().skip(excess).position(|&b| b == b'\n') {
                excess += nl + 1;
            }
            let excess = excess.min(self.data.len());
            self.data.drain(..excess);
            self.dropped += excess as u64;
        }
    }
}

/// What `GET /lab/log` answers.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub text: Vec<u8>,
    pub next: u64,
    pub command: Option<&'static str>,
    pub done: bool,
}

#[derive(Default)]
struct Inner {
    total: u64,
    current: Option<Recording>,
    last_up: Option<Recording>,
    last_down: Option<Recording>,
}

#[derive(Default)]
pub struct LabLog {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for LabLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LabLog")
    }
}

impl LabLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lab thread begins a job.
    pub fn begin(&self, job: Job) {
        let mut inner = self.lock();
        let start = inner.total;
        inner.current = Some(Recording {
            job,
            start,
            dropped: 0,
            data: VecDeque::new(),
            done: false,
            since_ms: now_ms(),
        });
    }

    /// A line (or any bytes) of output of the current job; ignored when no job runs.
    pub fn append(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        if let Some(current) = inner.current.as_mut()
            && !current.done
        {
            current.push(bytes);
            inner.total += bytes.len() as u64;
        }
    }

    /// The job ended; it is kept as the last start or teardown.
    pub fn end(&self) {
        let mut inner = self.lock();
        if let Some(current) = inner.current.as_mut() {
            current.done = true;
            let copy = current.clone();
            match copy.job {
                Job::Up => inner.last_up = Some(copy),
                Job::Down => inner.last_down = Some(copy),
            }
        }
    }

    /// The job running now, if any: (command, since).
    pub fn running(&self) -> Option<(&'static str, u64)> {
        let inner = self.lock();
        inner
            .current
            .as_ref()
            .filter(|c| !c.done)
            .map(|c| (c.job.as_str(), c.since_ms))
    }

    /// The output after `offset`: of the current (or last) job, or of the last job of kind
    /// `job`. An offset before what is kept gets a marker line first; an offset past the end
    /// (a client of an earlier server run) starts from the recording's beginning.
    pub fn read(&self, offset: u64, job: Option<Job>) -> Chunk {
        let inner = self.lock();
        let recording = match job {
            None => inner.current.as_ref(),
            Some(Job::Up) => inner
                .last_up
                .as_ref()
                .or(inner.current.as_ref().filter(|c| c.job == Job::Up)),
            Some(Job::Down) => inner
                .last_down
                .as_ref()
                .or(inner.current.as_ref().filter(|c| c.job == Job::Down)),
        };
        // The current job of that kind is newer than the last finished one.
        let recording = match (job, inner.current.as_ref()) {
            (Some(kind), Some(c)) if c.job == kind => Some(c),
            _ => recording,
        };
        let Some(r) = recording else {
            return Chunk {
                text: Vec::new(),
                next: offset.min(inner.total),
                command: None,
                done: true,
            };
        };
        let end = r.end();
        let first = r.start + r.dropped;
        let from = if offset > end || offset < r.start {
            r.start
        } else {
            offset
        };
        let mut text = Vec::new();
        if from < first {
            text.extend_from_slice(
                format!(
                    "[neops-remote-lab: {} bytes of earlier output dropped]\n",
                    first - from
                )
                .as_bytes(),
            );
        }
        let skip = from.saturating_sub(first) as usize;
        text.extend(r.data.iter().skip(skip));
        Chunk {
            text,
            next: end,
            command: Some(r.job.as_str()),
            done: r.done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_job_then_the_next() {
        let log = LabLog::new();
        assert_eq!(log.read(0, None).command, None);
        log.begin(Job::Up);
        log.append(b"one\n");
        let c = log.read(0, None);
        assert_eq!(
            (c.text.as_slice(), c.next, c.done),
            (&b"one\n"[..], 4, false)
        );
        assert_eq!(c.command, Some("up"));
        log.append(b"two\n");
        assert_eq!(log.read(4, None).text, b"two\n");
        log.end();
        let c = log.read(8, None);
        assert!(c.text.is_empty() && c.done && c.next == 8);
        log.begin(Job::Down);
        log.append(b"down\n");
        let c = log.read(8, None);
        assert_eq!(
            (c.text.as_slice(), c.next, c.command),
            (&b"down\n"[..], 13, Some("down"))
        );
        // The last start is still there.
        let c = log.read(0, Some(Job::Up));
        assert_eq!((c.text.as_slice(), c.done), (&b"one\ntwo\n"[..], true));
        // An offset from another life starts the recording over.
        assert_eq!(log.read(10_000, None).text, b"down\n");
        assert_eq!(log.read(0, None).text, b"down\n");
    }

    #[test]
    fn old_lines_are_dropped_with_a_marker() {
        let log = LabLog::new();
        log.begin(Job::Up);
        let line = [b'x'; 1023];
        for _ in 0..1100 {
            log.append(&line);
            log.append(b"\n");
        }
        let c = log.read(0, None);
        assert_eq!(c.next, 1100 * 1024);
        let text = String::from_utf8(c.text).unwrap();
        assert!(text.starts_with("[neops-remote-lab: "), "{}", &text[..80]);
        assert!(text.len() <= LIMIT + 100);
        // Whole lines only after the marker.
        let body = text.split_once('\n').unwrap().1;
        assert!(body.lines().all(|l| l.len() == 1023));
    }
}
