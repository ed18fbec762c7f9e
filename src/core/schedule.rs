//! The scheduler's two decisions, pure (no state, no clock, no I/O): which waiting session
//! becomes ACTIVE next, and which idle lab to tear down when one must make room.
//!
//! A session may declare the topology it will upload (`X-Topology-SHA256` on
//! `POST /session`). When a lab with hash H is idle as a session becomes ACTIVE, a waiting
//! session that declared H within the first `--affinity-window` waiting sessions goes ahead
//! of those before it: it attaches to the running lab instead of making netlab start
//! another. Each session passed over counts it; one passed over `--max-skips` times is never
//! passed again, so nobody waits for more than `--max-skips` extra sessions. `--max-skips 0`
//! (or `--affinity-window 0`) is strict FIFO. Sessions that declared nothing are never
//! promoted ahead.

use crate::lab::record::Hash;

/// `--affinity-window` and `--max-skips`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How many waiting sessions (from the front) a promotion ahead may look at.
    pub affinity_window: usize,
    /// How often a session may be passed over; 0: strict FIFO.
    pub max_skips: u32,
}

impl Policy {
    /// First come, first served, as the Python original serves.
    #[cfg(test)]
    pub const FIFO: Policy = Policy {
        affinity_window: 0,
        max_skips: 0,
    };

    fn is_fifo(self) -> bool {
        self.affinity_window == 0 || self.max_skips == 0
    }
}

/// A waiting session as the scheduler sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// The topology it declared, if any.
    pub declared: Option<&'a Hash>,
    /// How often it has been passed over.
    pub skips: u32,
}

/// The waiting session to promote: its index among the waiting ones, in queue order. The
/// sessions before it (`index` of them) are passed over; each counts one more skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    /// The idle lab it was promoted for, when it goes ahead of anyone (`index > 0`).
    pub ahead_for: Option<Hash>,
}

impl Pick {
    const FIRST: Pick = Pick {
        index: 0,
        ahead_for: None,
    };
}

/// Which of the `waiting` sessions (in queue order, the next in line first) becomes ACTIVE,
/// given the hashes of the labs that are idle (running, no reference: one lab today, one per
/// free slot with slots). The first waiting session wins, unless one that declared an idle
/// lab's hash stands within the first `affinity_window` and no session before it has been
/// passed over `max_skips` times already. `None` when nobody waits.
pub fn pick_next<'a, I>(waiting: I, idle: &[Hash], policy: Policy) -> Option<Pick>
where
    I: IntoIterator<Item = Candidate<'a>>,
{
    let mut waiting = waiting.into_iter().peekable();
    waiting.peek()?;
    if policy.is_fifo() || idle.is_empty() {
        return Some(Pick::FIRST);
    }
    for (index, c) in waiting.take(policy.affinity_window).enumerate() {
        if let Some(hash) = c.declared.filter(|h| idle.contains(h)) {
            return Some(Pick {
                index,
                ahead_for: (index > 0).then_some(*hash),
            });
        }
        if c.skips >= policy.max_skips {
            // Never passed again: whoever goes next is at or before it.
            break;
        }
    }
    Some(Pick::FIRST)
}

/// An idle lab (running, no reference) that could be torn down to make room.
#[derive(Clone, Copy, Debug)]
pub struct IdleLab<'a> {
    pub hash: &'a Hash,
    /// When it was last used (any monotonic measure: seconds, milliseconds, a counter).
    pub last_used: u64,
}

/// Which idle lab to tear down when a new topology needs the room: one that no waiting
/// session declared, the least recently used first; when every one is wanted, the one whose
/// first taker stands furthest back in the queue (then the least recently used). `declared`
/// is the waiting sessions' declarations in queue order. `None` when nothing is idle.
pub fn evict<'a, I>(idle: &[IdleLab<'_>], declared: I) -> Option<usize>
where
    I: IntoIterator<Item = Option<&'a Hash>>,
{
    // For each idle lab, the queue index of the first waiting session that wants it.
    let mut wanted_at: Vec<Option<usize>> = vec![None; idle.len()];
    let mut left = idle.len();
    for (at, hash) in declared.into_iter().enumerate() {
        if left == 0 {
            break;
        }
        let Some(hash) = hash else { continue };
        for (lab, first) in idle.iter().zip(wanted_at.iter_mut()) {
            if first.is_none() && lab.hash == hash {
                *first = Some(at);
                left -= 1;
            }
        }
    }
    // Not wanted at all ranks above any queue index; then later takers; then older use.
    (0..idle.len()).max_by_key(|&i| {
        (
            wanted_at[i].map_or(usize::MAX, |at| at),
            std::cmp::Reverse(idle[i].last_used),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Hash = [0xa; 32];
    const B: Hash = [0xb; 32];
    const C: Hash = [0xc; 32];

    const DEFAULT: Policy = Policy {
        affinity_window: 8,
        max_skips: 2,
    };

    fn c(declared: Option<&Hash>, skips: u32) -> Candidate<'_> {
        Candidate { declared, skips }
    }

    fn index(waiting: &[Candidate<'_>], idle: &[Hash], policy: Policy) -> Option<usize> {
        pick_next(waiting.iter().copied(), idle, policy).map(|p| p.index)
    }

    #[test]
    fn nobody_waiting_nobody_picked() {
        assert_eq!(pick_next([], &[A], DEFAULT), None);
    }

    #[test]
    fn a_session_that_declared_the_idle_lab_goes_ahead_within_the_window() {
        let waiting = [c(Some(&B), 0), c(None, 0), c(Some(&A), 0)];
        assert_eq!(
            pick_next(waiting, &[A], DEFAULT),
            Some(Pick {
                index: 2,
                ahead_for: Some(A)
            })
        );
        // The first match wins; one at the front passes nobody.
        assert_eq!(
            index(&[c(Some(&A), 0), c(Some(&A), 0)], &[A], DEFAULT),
            Some(0)
        );
        assert_eq!(
            pick_next([c(Some(&A), 0)], &[A], DEFAULT)
                .unwrap()
                .ahead_for,
            None
        );
        // Any idle lab will do (slots).
        assert_eq!(
            index(&[c(Some(&C), 0), c(Some(&B), 0)], &[A, B], DEFAULT),
            Some(1)
        );
    }

    #[test]
    fn fifo_when_nothing_matches_nothing_is_idle_or_the_policy_says_so() {
        let waiting = [c(Some(&B), 0), c(Some(&A), 0)];
        assert_eq!(index(&waiting, &[C], DEFAULT), Some(0));
        assert_eq!(index(&waiting, &[], DEFAULT), Some(0));
        assert_eq!(index(&waiting, &[A], Policy::FIFO), Some(0));
        let no_skips = Policy {
            max_skips: 0,
            ..DEFAULT
        };
        assert_eq!(index(&waiting, &[A], no_skips), Some(0));
        let no_window = Policy {
            affinity_window: 0,
            ..DEFAULT
        };
        assert_eq!(index(&waiting, &[A], no_window), Some(0));
    }

    #[test]
    fn the_window_bounds_how_far_back_a_match_is_looked_for() {
        let mut waiting = vec![c(Some(&B), 0); 8];
        waiting.push(c(Some(&A), 0));
        assert_eq!(index(&waiting, &[A], DEFAULT), Some(0));
        waiting.remove(0);
        assert_eq!(index(&waiting, &[A], DEFAULT), Some(7));
    }

    #[test]
    fn a_session_passed_over_max_skips_times_is_never_passed_again() {
        // B has been passed twice: the A behind it must wait.
        let waiting = [c(Some(&B), 2), c(Some(&A), 0)];
        assert_eq!(index(&waiting, &[A], DEFAULT), Some(0));
        // An A before it may still go first (it passes nobody who is at the limit).
        let waiting = [c(Some(&C), 0), c(Some(&A), 0), c(Some(&B), 2)];
        assert_eq!(index(&waiting, &[A], DEFAULT), Some(1));
        // A session at the limit behind the match does not hold it back.
        let waiting = [c(Some(&C), 1), c(Some(&A), 0), c(None, 5)];
        assert_eq!(index(&waiting, &[A], DEFAULT), Some(1));
        // Nor does one at the limit that matches itself.
        let waiting = [c(Some(&A), 2)];
        assert_eq!(index(&waiting, &[A], DEFAULT), Some(0));
    }

    /// A stream of A's behind one B: B is passed exactly `max_skips` times, then served.
    #[test]
    fn a_stream_of_matches_passes_a_session_at_most_max_skips_times() {
        for max_skips in 0..4 {
            let policy = Policy {
                affinity_window: 8,
                max_skips,
            };
            let mut b_skips = 0;
            let mut passed = 0;
            loop {
                let waiting = [c(Some(&B), b_skips), c(Some(&A), 0), c(Some(&A), 0)];
                let pick = pick_next(waiting, &[A], policy).unwrap();
                if pick.index == 0 {
                    break;
                }
                b_skips += 1;
                passed += 1;
                assert!(passed <= max_skips, "passed {passed} times");
            }
            assert_eq!(passed, max_skips);
        }
    }

    fn lab(hash: &Hash, last_used: u64) -> IdleLab<'_> {
        IdleLab { hash, last_used }
    }

    #[test]
    fn eviction_keeps_the_lab_a_waiting_session_declared() {
        // A is the least recently used, but a waiting session declared it: B goes.
        let idle = [lab(&A, 10), lab(&B, 20)];
        assert_eq!(evict(&idle, [None, Some(&A), Some(&C)]), Some(1));
        // Nobody wants either: the least recently used goes.
        assert_eq!(evict(&idle, [Some(&C), None]), Some(0));
        assert_eq!(evict(&idle, []), Some(0));
        // Several unwanted: the least recently used of them.
        let idle = [lab(&A, 30), lab(&B, 20), lab(&C, 10)];
        assert_eq!(evict(&idle, [Some(&C)]), Some(1));
    }

    #[test]
    fn when_every_idle_lab_is_wanted_the_one_wanted_last_goes() {
        let idle = [lab(&A, 10), lab(&B, 20)];
        assert_eq!(evict(&idle, [Some(&B), Some(&A)]), Some(0));
        assert_eq!(evict(&idle, [Some(&A), None, Some(&B)]), Some(1));
        // Same hash twice (two slots with one topology): the older goes.
        let idle = [lab(&A, 20), lab(&A, 10)];
        assert_eq!(evict(&idle, [Some(&A)]), Some(1));
    }

    #[test]
    fn nothing_idle_nothing_evicted() {
        assert_eq!(evict(&[], [Some(&A)]), None);
    }
}
