//! `ThreadComm`: N ranks as threads of one process (the embedded default). Messages are moved
//! through per-channel FIFO mailboxes; sends are buffered, so a batched group posts its sends
//! first and cannot deadlock. The collectives are `algorithms`' rings over the mailboxes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod window;

use crate::algorithms::{self, Channel, Transport};
use crate::communicator::{sub_group_members, Communicator, Rank};
use crate::error::{CommError, Result};

/// How long [`ThreadComm::run`] waits for the other ranks after one failed: those waiting on
/// it fail at once (they are woken), so only a rank stuck elsewhere is still running then.
pub const AFTER_FAILURE: Duration = Duration::from_secs(3);

/// The timeout of every blocking call when `HOTSPA_COMM_TIMEOUT_SECS` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a caught panic says: its message when it carries a string (as `panic!` does), else
/// "non-string panic".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// The timeout of every blocking call: `HOTSPA_COMM_TIMEOUT_SECS` (seconds, positive and
/// finite, fractions allowed), else [`DEFAULT_TIMEOUT`]. An invalid value is an error naming
/// it (see [`timeout_from_env`]); here, where no error can be returned, it falls back to the
/// default — callers that start a run check it first.
pub fn default_timeout() -> Duration {
    timeout_from_env().unwrap_or(DEFAULT_TIMEOUT)
}

/// `HOTSPA_COMM_TIMEOUT_SECS` read and checked: unset is [`DEFAULT_TIMEOUT`]; anything but a
/// positive finite number of seconds (`0`, `-1`, `abc`, `inf`) is refused by name.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("HOTSPA_COMM_TIMEOUT_SECS") {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| CommError::Parse {
                what: "HOTSPA_COMM_TIMEOUT_SECS",
                input: s.clone(),
                expected: "give a positive, finite number of seconds (e.g. 120)".into(),
            }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    group: u64,
    src: usize,
    dst: usize,
    channel: Channel,
}

#[derive(Default)]
struct State {
    boxes: HashMap<Key, VecDeque<Vec<f32>>>,
    /// Collectives entered, per (group, world rank).
    arrivals: HashMap<(u64, usize), u64>,
    /// The first rank that failed, with its error.
    failed: Option<(usize, String)>,
    /// Open windows, per (group, collective sequence number).
    windows: HashMap<(u64, u64), window::Window>,
    /// Interned sub-group ids: (parent, members, n-th creation) → id.
    groups: HashMap<(u64, Vec<usize>, u64), u64>,
}

/// What the ranks of one thread world share.
struct World {
    size: usize,
    state: Mutex<State>,
    cond: Condvar,
    /// Message buffers handed back by receivers, reused by senders: large messages then cost a
    /// memcpy, not an allocation and its page faults.
    pool: Mutex<Vec<Vec<f32>>>,
}

/// A ring step's largest message (256 KiB): pieces this size stay in the cache between the
/// sender's copy into a pooled buffer and the receiver's use of it.
const PIPELINE_ELEMS: usize = 64 * 1024;

/// Buffers kept for reuse at most.
const POOL_LIMIT: usize = 64;

impl World {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a rank panicked while holding it; the state stays usable
        // and the panic is reported through `fail`.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn buffer(&self, data: &[f32]) -> Vec<f32> {
        let mut v = self.buffer_len(0, data.len());
        v.extend_from_slice(data);
        v
    }

    /// A pooled buffer of `len` elements with arbitrary contents (the smallest that holds
    /// `capacity`, or a new one).
    fn buffer_len(&self, len: usize, capacity: usize) -> Vec<f32> {
        if capacity == 0 {
            return Vec::new();
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= capacity)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut v = match best {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(capacity),
        };
        drop(pool);
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    fn recycle(&self, v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_LIMIT {
            pool.push(v);
        }
    }

    /// Waits on the world's condition for at most `timeout` (a poisoned lock stays usable, as
    /// in [`World::lock`]).
    fn wait<'a>(&self, st: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        self.cond
            .wait_timeout(st, timeout)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    fn fail(&self, rank: usize, reason: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some((rank, reason));
        }
        drop(st);
        self.cond.notify_all();
    }
}

/// `PeerFailed` for world rank `me` when another rank has failed.
fn peer_failure(st: &State, me: usize) -> Option<CommError> {
    match &st.failed {
        Some((failed, reason)) if *failed != me => Some(CommError::PeerFailed {
            rank: Rank(me),
            failed: Rank(*failed),
            reason: reason.clone(),
        }),
        _ => None,
    }
}

/// One rank's handle on a group of thread ranks.
pub struct ThreadComm {
    world: Arc<World>,
    group: u64,
    /// World ranks of the members, in group order.
    members: Arc<Vec<usize>>,
    me: usize,
    seq: AtomicU64,
    subgroups: crate::communicator::SubGroups,
    timeout: Duration,
    /// The member `take_any` looks at first.
    turn: AtomicUsize,
}

impl ThreadComm {
    /// Handles for a new world of `n` ranks (index = rank), sharing one set of mailboxes.
    pub fn world(n: usize) -> Vec<ThreadComm> {
        Self::world_with_timeout(n, default_timeout())
    }

    /// Like [`ThreadComm::world`], with the given timeout on every handle.
    pub fn world_with_timeout(n: usize, timeout: Duration) -> Vec<ThreadComm> {
        let world = Arc::new(World {
            size: n,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            pool: Mutex::new(Vec::new()),
        });
        let members = Arc::new((0..n).collect::<Vec<_>>());
        (0..n)
            .map(|me| ThreadComm {
                world: world.clone(),
                group: 0,
                members: members.clone(),
                me,
                seq: AtomicU64::new(0),
                subgroups: Default::default(),
                turn: AtomicUsize::new(0),
                timeout,
            })
            .collect()
    }

    /// Runs `f` on `n` thread ranks and returns their results in rank order.
    ///
    /// When a rank returns an error or panics, the others' blocking calls fail promptly, and the
    /// error of the rank that failed *first* is returned. Ranks that still have not finished
    /// [`AFTER_FAILURE`] after the first failure are left behind (detached), so a hung rank
    /// cannot hang the caller: a frozen rank ends the run one timeout (the others' wait for it)
    /// plus that grace after it froze.
    pub fn run<T, E, F>(n: usize, f: F) -> std::result::Result<Vec<T>, E>
    where
        T: Send + 'static,
        E: From<CommError> + std::fmt::Display + Send + 'static,
        F: Fn(ThreadComm) -> std::result::Result<T, E> + Send + Sync + 'static,
    {
        Self::run_with_timeout(n, default_timeout(), f)
    }

    /// [`ThreadComm::run`] with the given timeout on every blocking call.
    pub fn run_with_timeout<T, E, F>(
        n: usize,
        timeout: Duration,
        f: F,
    ) -> std::result::Result<Vec<T>, E>
    where
        T: Send + 'static,
        E: From<CommError> + std::fmt::Display + Send + 'static,
        F: Fn(ThreadComm) -> std::result::Result<T, E> + Send + Sync + 'static,
    {
        let comms = ThreadComm::world_with_timeout(n, timeout);
        let world = comms.first().map(|c| c.world.clone());
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel();
        for comm in comms {
            let (f, tx, world) = (f.clone(), tx.clone(), comm.world.clone());
            let rank = comm.me;
            std::thread::Builder::new()
                .name(format!("hotspa-rank-{rank}"))
                .spawn(move || {
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
                    let out = match out {
                        Ok(r) => r,
                        Err(p) => Err(E::from(CommError::Panicked {
                            rank: Rank(rank),
                            message: panic_message(p.as_ref()),
                        })),
                    };
                    if let Err(e) = &out {
                        world.fail(rank, e.to_string());
                    }
                    // The receiver may be gone when the caller already returned.
                    let _ = tx.send((rank, out));
                })
                .map_err(|e| {
                    E::from(CommError::Unavailable(format!(
                        "cannot spawn rank {rank}: {e}"
                    )))
                })?;
        }
        drop(tx);
        let mut results: Vec<Option<std::result::Result<T, E>>> = (0..n).map(|_| None).collect();
        let mut received = 0;
        let mut deadline: Option<Instant> = None;
        while received < n {
            let msg = match deadline {
                None => rx.recv().ok(),
                Some(d) => rx
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                    .ok(),
            };
            let Some((rank, out)) = msg else { break };
            if out.is_err() && deadline.is_none() {
                deadline = Some(Instant::now() + AFTER_FAILURE.min(timeout));
            }
            results[rank] = Some(out);
            received += 1;
        }
        let first_failed = world.and_then(|w| w.lock().failed.as_ref().map(|(r, _)| *r));
        if let Some(r) = first_failed {
            if let Some(Some(Err(_))) = results.get(r) {
                if let Some(Some(Err(e))) = results.get_mut(r).map(|x| x.take()) {
                    return Err(e);
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(v)) => out.push(v),
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(E::from(CommError::Timeout {
                        rank: Rank(rank),
                        op: "run".into(),
                        waited: AFTER_FAILURE.min(timeout),
                        detail: format!("rank {rank} did not finish after another rank failed"),
                    }))
                }
            }
        }
        Ok(out)
    }
}

impl Transport for ThreadComm {
    fn members(&self) -> &[usize] {
        &self.members
    }

    fn me(&self) -> usize {
        self.me
    }

    fn post(&self, dst: usize, channel: Channel, data: &[f32]) -> Result<()> {
        let data = self.world.buffer(data);
        let key = Key {
            group: self.group,
            src: self.members[self.me],
            dst,
            channel,
        };
        self.world
            .lock()
            .boxes
            .entry(key)
            .or_default()
            .push_back(data);
        self.world.cond.notify_all();
        Ok(())
    }

    /// Waits for the next message from world rank `src` on `channel`.
    fn take(&self, src: usize, channel: Channel, op: &dyn Fn() -> String) -> Result<Vec<f32>> {
        let me = self.members[self.me];
        let key = Key {
            group: self.group,
            src,
            dst: me,
            channel,
        };
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut st = self.world.lock();
        loop {
            if let Some(m) = st.boxes.get_mut(&key).and_then(|q| q.pop_front()) {
                return Ok(m);
            }
            if let Some(e) = peer_failure(&st, me) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let detail = match channel {
                    Channel::Collective(seq) => {
                        let missing: Vec<usize> = self
                            .members
                            .iter()
                            .copied()
                            .filter(|m| {
                                st.arrivals.get(&(self.group, *m)).copied().unwrap_or(0) <= seq
                            })
                            .collect();
                        if missing.is_empty() {
                            format!("every rank arrived but rank {src} did not send (stuck?)")
                        } else {
                            let names: Vec<String> =
                                missing.iter().map(|m| m.to_string()).collect();
                            format!(
                                "rank{} {} never arrived",
                                if missing.len() > 1 { "s" } else { "" },
                                names.join(", ")
                            )
                        }
                    }
                    _ => format!("rank {src} sent nothing"),
                };
                return Err(CommError::Timeout {
                    rank: Rank(me),
                    op: op(),
                    waited: now - start,
                    detail,
                });
            }
            st = self.world.wait(st, deadline - now);
        }
    }

    /// Waits for the next message on `channel` from any member, taking senders in turn
    /// (round-robin from the last one served) so that none starves.
    fn take_any(&self, channel: Channel, op: &dyn Fn() -> String) -> Result<(usize, Vec<f32>)> {
        let me = self.members[self.me];
        let n = self.members.len();
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut st = self.world.lock();
        loop {
            let first = self.turn.load(Ordering::Relaxed);
            for i in 0..n {
                let j = (first + i) % n;
                let key = Key {
                    group: self.group,
                    src: self.members[j],
                    dst: me,
                    channel,
                };
                if let Some(m) = st.boxes.get_mut(&key).and_then(|q| q.pop_front()) {
                    self.turn.store(j + 1, Ordering::Relaxed);
                    return Ok((self.members[j], m));
                }
            }
            if let Some(e) = peer_failure(&st, me) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: Rank(me),
                    op: op(),
                    waited: now - start,
                    detail: "no rank sent anything".into(),
                });
            }
            st = self.world.wait(st, deadline - now);
        }
    }

    /// Enters the next collective: returns its channel and records the arrival.
    fn enter(&self) -> (Channel, u64) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.world
            .lock()
            .arrivals
            .insert((self.group, self.members[self.me]), seq + 1);
        (Channel::Collective(seq), seq)
    }

    fn recycle(&self, buf: Vec<f32>) {
        self.world.recycle(buf);
    }

    fn scratch_len(&self, n: usize) -> Vec<f32> {
        self.world.buffer_len(n, n)
    }

    fn pipeline_elems(&self) -> usize {
        PIPELINE_ELEMS
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> Rank {
        Rank(self.me)
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn world_ranks(&self) -> Vec<Rank> {
        self.members.iter().map(|&r| Rank(r)).collect()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn sub_group(&self, members: &[Rank]) -> Result<Box<dyn Communicator>> {
        let (world_members, me) = sub_group_members(&self.members, self.me, members)?;
        // The n-th creation of the same member list under this parent gets the same id on every
        // member, without communication.
        let nth = self.subgroups.next(&world_members);
        let group = {
            let mut st = self.world.lock();
            let next = st.groups.len() as u64 + 1;
            *st.groups
                .entry((self.group, world_members.clone(), nth))
                .or_insert(next)
        };
        debug_assert!(world_members.iter().all(|&w| w < self.world.size));
        Ok(Box::new(ThreadComm {
            world: self.world.clone(),
            group,
            members: Arc::new(world_members),
            me,
            seq: AtomicU64::new(0),
            subgroups: Default::default(),
            turn: AtomicUsize::new(0),
            timeout: self.timeout,
        }))
    }

    algorithms::collectives_over_transport!();

    fn window(&self, slices: &[&[f32]], read: &mut dyn FnMut(&crate::Exposed<'_>)) -> Result<bool> {
        self.window_impl(slices, read)
    }
}
