//! [`Communicator::window`](crate::Communicator::window) for thread ranks: each member exposes
//! the addresses of its slices in the shared state, and every member copies straight out of the
//! others' memory — one copy per value moved, none through the mailboxes.
//!
//! Why the reads are sound: a member's slices stay borrowed (immutable, alive) until it returns
//! from `window`, and it returns only (a) once every member has finished reading, or (b) after
//! marking the window abandoned — under the lock that a reader takes to start, so no reading
//! starts afterwards — and waiting until no member is still reading. A reader only runs the
//! caller's `read`, which copies and does not communicate, so that wait is short; a panic in
//! `read` ends the reading (and is rethrown once the window is closed).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Instant;

use super::{peer_failure, State, ThreadComm};
use crate::communicator::{Exposed, Rank};
use crate::error::{CommError, Result};

/// One window of one group, shared by its members.
pub(super) struct Window {
    /// Each member's exposed slices (address, length), once it has entered.
    exposed: Vec<Option<Vec<(usize, usize)>>>,
    /// Members reading now.
    readers: usize,
    /// Members that have finished reading.
    done: usize,
    /// Members that have returned.
    left: usize,
    /// A member gave up (timeout, failure): nobody starts reading any more. (The others learn
    /// the cause from the world's failure, recorded when its rank ends.)
    abandoned: bool,
}

impl ThreadComm {
    pub(super) fn window_impl(
        &self,
        slices: &[&[f32]],
        read: &mut dyn FnMut(&Exposed<'_>),
    ) -> Result<bool> {
        let (_, seq) = <Self as crate::algorithms::Transport>::enter(self);
        let key = (self.group, seq);
        let n = self.members.len();
        let start = Instant::now();
        {
            let mut st = self.world.lock();
            let w = st.windows.entry(key).or_insert_with(|| Window {
                exposed: vec![None; n],
                readers: 0,
                done: 0,
                left: 0,
                abandoned: false,
            });
            w.exposed[self.me] = Some(
                slices
                    .iter()
                    .map(|s| (s.as_ptr() as usize, s.len()))
                    .collect(),
            );
        }
        self.world.cond.notify_all();
        // Everyone's slices, once all have entered.
        let ptrs = match self.wait_window(key, start, "expose its slices", |w| {
            w.exposed.iter().all(Option::is_some)
        }) {
            Ok(()) => {
                let mut st = self.world.lock();
                let open = match st.windows.get_mut(&key) {
                    Some(w) if !w.abandoned => {
                        w.readers += 1;
                        Some(w.exposed.iter().flatten().cloned().collect::<Vec<_>>())
                    }
                    _ => None,
                };
                drop(st);
                // Given up by another member: wait for its rank's failure to be recorded (or
                // this member's deadline), so that the error reported first is the cause.
                open.ok_or_else(|| {
                    self.wait_window(key, start, "stay in the window", |_| false)
                        .err()
                        .unwrap_or_else(|| self.abandoned_error(seq))
                })
            }
            Err(e) => Err(e),
        };
        let ptrs = match ptrs {
            Ok(p) => p,
            Err(e) => {
                self.leave_window(key, true);
                return Err(e);
            }
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let exposed = Exposed {
                members: ptrs
                    .iter()
                    .map(|slices| {
                        slices
                            .iter()
                            // SAFETY: (address, length) of a `&[f32]` that its member keeps
                            // borrowed until it leaves this window, which it does only when no
                            // member reads any more (module docs); the slices are only read.
                            .map(|&(p, len)| unsafe {
                                std::slice::from_raw_parts(p as *const f32, len)
                            })
                            .collect()
                    })
                    .collect(),
            };
            read(&exposed)
        }));
        {
            let mut st = self.world.lock();
            if let Some(w) = st.windows.get_mut(&key) {
                w.readers -= 1;
                w.done += 1;
            }
        }
        self.world.cond.notify_all();
        let closed = self.wait_window(key, start, "finish reading", |w| w.done == n);
        self.leave_window(key, outcome.is_err() || closed.is_err());
        match outcome {
            Err(panic) => resume_unwind(panic),
            Ok(()) => closed.map(|()| true),
        }
    }

    /// The error of a member whose window is gone (every other member left it).
    fn abandoned_error(&self, seq: u64) -> CommError {
        CommError::Unavailable(format!(
            "window #{seq} on world ranks {:?}: another rank gave it up",
            self.members
        ))
    }

    /// Waits until `ready` holds of the window, failing on a peer's failure or the timeout
    /// (naming the members that have not done `what`).
    fn wait_window(
        &self,
        key: (u64, u64),
        start: Instant,
        what: &str,
        ready: impl Fn(&Window) -> bool,
    ) -> Result<()> {
        let me = self.members[self.me];
        let deadline = start + self.timeout;
        let mut st = self.world.lock();
        loop {
            let Some(w) = st.windows.get(&key) else {
                return Err(self.abandoned_error(key.1));
            };
            if ready(w) {
                return Ok(());
            }
            // A member that gave up does not end the wait by itself: the world's failure (when
            // its rank ends with the error) or this member's own deadline does, so that the
            // error reported first is the cause. (Nobody *starts* reading an abandoned window:
            // that check is under the lock where a reader registers.)
            if let Some(e) = peer_failure(&st, me) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = match what {
                    "expose its slices" => w
                        .exposed
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.is_none())
                        .map(|(j, _)| self.members[j].to_string())
                        .collect(),
                    _ => vec![format!(
                        "{} of {}",
                        w.exposed.len() - w.done,
                        w.exposed.len()
                    )],
                };
                return Err(CommError::Timeout {
                    rank: Rank(me),
                    op: format!("window #{} on world ranks {:?}", key.1, self.members),
                    waited: now - start,
                    detail: format!("rank(s) {} did not {what}", missing.join(", ")),
                });
            }
            st = self.world.wait(st, deadline - now);
        }
    }

    /// Leaves the window; after a failure first abandons it and waits until nobody reads this
    /// member's slices (the reads in progress only copy, so this ends).
    fn leave_window(&self, key: (u64, u64), failed: bool) {
        let n = self.members.len();
        let mut st: std::sync::MutexGuard<'_, State> = self.world.lock();
        if failed {
            if let Some(w) = st.windows.get_mut(&key) {
                w.abandoned = true;
            }
            self.world.cond.notify_all();
            while st.windows.get(&key).is_some_and(|w| w.readers > 0) {
                st = self.world.cond.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        if let Some(w) = st.windows.get_mut(&key) {
            w.left += 1;
            if w.left == n {
                st.windows.remove(&key);
            }
        }
    }
}
