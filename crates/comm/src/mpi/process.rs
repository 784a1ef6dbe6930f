//! `MpiComm`: one rank per process over the system MPI.
//!
//! Every group is an MPI communicator of its own (`MPI_Comm_create_group`, collective over the
//! members only), so groups never see each other's messages. Within a group, tag 0 carries the
//! collectives (in call order: MPI keeps messages of one tag from one sender in order), tag 1
//! batched groups, tag 2 the sub-group handshake, and user tag `t` is MPI tag `t + 3`.
//! Sends are `MPI_Isend` of an owned copy (buffered semantics, as `ThreadComm`); receives poll
//! `MPI_Improbe` + `MPI_Imrecv` against the communicator's timeout, so no call blocks forever.
//!
//! Naming the missing rank: every process runs a small census thread on a duplicate of the world
//! communicator that answers, at any time, how many collectives of a group this process has
//! entered. A rank that times out asks every member; members that entered fewer collectives than
//! the one it waits in "never arrived", and a process that does not answer at all is dead or
//! stopped. The ring algorithms are `crate::algorithms`, shared with `ThreadComm`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::mem::ManuallyDrop;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::ffi;
use mpi::raw::AsRaw;
#[allow(unused_imports)]
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::algorithms::{self, Channel, Transport};
use crate::communicator::{sub_group_members, Communicator, Rank};
use crate::error::{CommError, Result};
use crate::thread::default_timeout;

const TAG_COLLECTIVE: c_int = 0;
const TAG_BATCH: c_int = 1;
const TAG_SETUP: c_int = 2;
const TAG_USER: c_int = 3;
/// The MPI standard guarantees tags up to 32767.
const TAG_MAX: c_int = 32767;
/// Census requests and (per request, `+ nonce % 1024`) replies on the service communicator.
const TAG_CENSUS: c_int = 100;
const TAG_REPLY: c_int = 1000;

/// An MPI communicator shared between threads. MPI is initialised with `MPI_THREAD_MULTIPLE`
/// (checked in [`MpiComm::init`]), which makes every call on it thread-safe.
struct Shared(SimpleCommunicator);
// SAFETY: MPI_THREAD_MULTIPLE is required at initialisation; MPI handles may then be used from
// any thread.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// What every handle of this process shares: MPI itself, the census service and the topology.
struct Process {
    /// Freed in `Drop` before MPI is finalised.
    world: ManuallyDrop<Shared>,
    /// Freed in `Drop` (after the census thread, which holds the other reference, ended).
    service: ManuallyDrop<Arc<Shared>>,
    /// Collectives entered per group id.
    arrivals: Arc<Mutex<HashMap<u64, u64>>>,
    stop: Arc<AtomicBool>,
    census: Mutex<Option<JoinHandle<()>>>,
    nonce: AtomicU64,
    /// Node index of every world rank.
    nodes: Vec<usize>,
    /// Kept last: dropping it finalises MPI.
    universe: Mutex<Option<mpi::environment::Universe>>,
}

// SAFETY: the universe is only dropped (MPI_Finalize) once, from `Drop`; everything else is
// thread-safe under MPI_THREAD_MULTIPLE.
unsafe impl Send for Process {}
// SAFETY: as above.
unsafe impl Sync for Process {}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.census.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        // Free the communicators before MPI_Finalize.
        // SAFETY: neither field is used again; `drop` runs once.
        unsafe {
            ManuallyDrop::drop(&mut self.world);
            ManuallyDrop::drop(&mut self.service);
        }
        drop(
            self.universe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }
}

/// A send in flight: its buffer must live until MPI is done with it.
struct Pending {
    _buf: Vec<f32>,
    req: ffi::MPI_Request,
}

/// One rank's handle on a group of MPI processes.
pub struct MpiComm {
    /// This group's communicator; declared before `process` so that it is freed first.
    comm: Arc<Shared>,
    process: Arc<Process>,
    /// Identifies the group in census requests (the same on every member).
    id: u64,
    /// World ranks of the members, in group order.
    members: Arc<Vec<usize>>,
    me: usize,
    seq: AtomicU64,
    pending: Mutex<Vec<Pending>>,
    subgroups: crate::communicator::SubGroups,
    timeout: Duration,
}

// SAFETY: the MPI requests in `pending` are only touched under its mutex, and MPI is
// thread-safe (MPI_THREAD_MULTIPLE).
unsafe impl Send for MpiComm {}
// SAFETY: as above.
unsafe impl Sync for MpiComm {}

fn mpi_err(what: &str, code: c_int) -> CommError {
    CommError::Unavailable(format!("{what} failed with MPI error code {code}"))
}

impl MpiComm {
    /// Initialises MPI (thread support `MPI_THREAD_MULTIPLE`) and returns this process's handle
    /// on the world. Call once per process, from the main thread.
    pub fn init() -> Result<MpiComm> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| {
                CommError::Unavailable("MPI was already initialised in this process".into())
            })?;
        if threading != mpi::Threading::Multiple {
            return Err(CommError::Unavailable(format!(
                "the MPI library gives {threading:?} thread support; hotspa needs \
                 MPI_THREAD_MULTIPLE (Open MPI ≥ 3 has it)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // Nodes: the lowest world rank sharing memory with each process names its node.
        let local = world.split_shared(world.rank());
        let mut local_ranks = vec![0i32; local.size() as usize];
        local.all_gather_into(&world.rank(), &mut local_ranks[..]);
        let leader = local_ranks.iter().copied().min().unwrap_or(world.rank());
        let mut leaders = vec![0i32; size];
        world.all_gather_into(&leader, &mut leaders[..]);
        let mut distinct = leaders.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let nodes = leaders
            .iter()
            .map(|l| distinct.iter().position(|d| d == l).unwrap_or(0))
            .collect();
        let service = Arc::new(Shared(world.duplicate()));
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let census = {
            let (service, arrivals, stop) = (service.clone(), arrivals.clone(), stop.clone());
            std::thread::Builder::new()
                .name("hotspa-mpi-census".into())
                .spawn(move || serve_census(&service, &arrivals, &stop))
                .map_err(|e| CommError::Unavailable(format!("cannot start the census: {e}")))?
        };
        let process = Arc::new(Process {
            world: ManuallyDrop::new(Shared(world.duplicate())),
            service: ManuallyDrop::new(service),
            arrivals,
            stop,
            census: Mutex::new(Some(census)),
            nonce: AtomicU64::new(0),
            nodes,
            universe: Mutex::new(Some(universe)),
        });
        let comm = Arc::new(Shared(process.world.0.duplicate()));
        Ok(MpiComm {
            process,
            comm,
            id: 0,
            members: Arc::new((0..size).collect()),
            me: rank,
            seq: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
            subgroups: Default::default(),
            timeout: default_timeout(),
        })
    }

    /// The node of every world rank (0, 1, … in order of each node's lowest rank), from which
    /// processes share memory according to MPI.
    pub fn nodes(&self) -> &[usize] {
        &self.process.nodes
    }

    /// Ends every process of the job with `code` (`MPI_Abort`): what a rank does after a fatal
    /// error, so that no other rank waits for it.
    pub fn abort(&self, code: i32) -> ! {
        self.process.world.0.abort(code)
    }

    fn tag(channel: Channel) -> Result<c_int> {
        Ok(match channel {
            Channel::Collective(_) => TAG_COLLECTIVE,
            Channel::Batch => TAG_BATCH,
            Channel::User(t) => {
                let t = c_int::try_from(t)
                    .ok()
                    .and_then(|t| t.checked_add(TAG_USER))
                    .filter(|&t| t <= TAG_MAX)
                    .ok_or_else(|| {
                        CommError::InvalidGroup(format!(
                            "tag {t} is beyond what MPI guarantees (at most {})",
                            TAG_MAX - TAG_USER
                        ))
                    })?;
                t
            }
        })
    }

    fn group_rank(&self, world: usize) -> c_int {
        self.members
            .iter()
            .position(|&m| m == world)
            .unwrap_or(usize::MAX) as c_int
    }

    /// Completes the sends MPI has finished with; with `wait`, waits (up to the timeout) for all.
    fn progress(&self, wait: bool) -> Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut i = 0;
            while i < pending.len() {
                let mut flag: c_int = 0;
                // SAFETY: `req` is a live request of a buffer this entry owns.
                let rc = unsafe {
                    ffi::MPI_Test(&mut pending[i].req, &mut flag, ffi::RSMPI_STATUS_IGNORE)
                };
                if rc != 0 {
                    return Err(mpi_err("MPI_Test", rc));
                }
                if flag != 0 {
                    pending.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if !wait || pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CommError::Timeout {
                    rank: Rank(self.members[self.me]),
                    op: format!("finishing {} sends", pending.len()),
                    waited: self.timeout,
                    detail: "their receivers never took them".into(),
                });
            }
            std::thread::yield_now();
        }
    }

    /// Asks every process how many collectives of this group it entered (world-rank order);
    /// `None` for a process that does not answer within `window`. Non-members answer too, so
    /// that a dead or stopped process elsewhere (which holds up a member) is named as well.
    fn census(&self, window: Duration) -> Vec<Option<u64>> {
        let size = self.process.nodes.len();
        let me = self.members[self.me];
        let nonce = self.process.nonce.fetch_add(1, Ordering::SeqCst) * 4096 + me as u64;
        let reply_tag = TAG_REPLY + (nonce % 1024) as c_int;
        let service = &self.process.service.0;
        for w in (0..size).filter(|&w| w != me) {
            let req = [self.id, nonce];
            service
                .process_at_rank(w as i32)
                .send_with_tag(&req[..], TAG_CENSUS);
        }
        let mut out: Vec<Option<u64>> = vec![None; size];
        out[me] = Some(self.seq.load(Ordering::SeqCst));
        let deadline = Instant::now() + window;
        while Instant::now() < deadline && out.iter().any(Option::is_none) {
            for (w, slot) in out.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                if let Some((msg, _)) = service
                    .process_at_rank(w as i32)
                    .immediate_matched_probe_with_tag(reply_tag)
                {
                    let mut v = [0u64; 1];
                    msg.matched_receive_into(&mut v[..]);
                    *slot = Some(v[0]);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    }

    fn timeout_detail(&self, src: usize, channel: Channel) -> String {
        let answers = self.census(Duration::from_millis(1500).min(self.timeout * 2));
        let silent: Vec<usize> = (0..answers.len())
            .filter(|&w| answers[w].is_none())
            .collect();
        let mut parts = Vec::new();
        if let Channel::Collective(seq) = channel {
            let missing: Vec<String> = self
                .members
                .iter()
                .filter(|&&w| answers[w].is_none_or(|n| n <= seq))
                .map(|w| w.to_string())
                .collect();
            if missing.is_empty() {
                parts.push(format!(
                    "every rank arrived but rank {src} did not send (stuck?)"
                ));
            } else {
                parts.push(format!(
                    "rank{} {} never arrived",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.join(", ")
                ));
            }
        } else {
            parts.push(format!("rank {src} sent nothing"));
        }
        if !silent.is_empty() {
            let names: Vec<String> = silent.iter().map(|w| w.to_string()).collect();
            parts.push(format!(
                "the process of rank{} {} does not answer at all (dead or stopped)",
                if silent.len() > 1 { "s" } else { "" },
                names.join(", ")
            ));
        }
        parts.join("; ")
    }

    /// Waits until every member of the prospective group `world_members` has reached the same
    /// point (bounded by the timeout, naming the absent), over this group's communicator.
    fn handshake(&self, world_members: &[usize], what: &str) -> Result<()> {
        let me = self.members[self.me];
        for &w in world_members.iter().filter(|&&w| w != me) {
            self.post_tag(w, TAG_SETUP, &[])?;
        }
        for &w in world_members.iter().filter(|&&w| w != me) {
            self.take_tag(w, TAG_SETUP, Channel::Batch, &|| what.to_string())?;
        }
        Ok(())
    }

    fn post_tag(&self, dst: usize, tag: c_int, data: &[f32]) -> Result<()> {
        let dest = self.group_rank(dst);
        let buf = data.to_vec();
        let count = c_int::try_from(buf.len()).map_err(|_| {
            CommError::InvalidGroup(format!("a message of {} values is too long", buf.len()))
        })?;
        // SAFETY: MPI_Request is a plain handle; MPI_Isend initialises it.
        let mut req: ffi::MPI_Request = unsafe { std::mem::zeroed() };
        // SAFETY: `buf` is owned by the pending entry until MPI_Test reports the send done; its
        // heap storage does not move when the Vec is moved.
        let rc = unsafe {
            ffi::MPI_Isend(
                buf.as_ptr() as *const c_void,
                count,
                ffi::RSMPI_FLOAT,
                dest,
                tag,
                self.comm.0.as_raw(),
                &mut req,
            )
        };
        if rc != 0 {
            return Err(mpi_err("MPI_Isend", rc));
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending { _buf: buf, req });
        self.progress(false)
    }

    fn take_tag(
        &self,
        src: usize,
        tag: c_int,
        channel: Channel,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<f32>> {
        let source = self.group_rank(src);
        Ok(self.take_from(source, src, tag, channel, what)?.1)
    }

    /// Receives the next message with `tag` from group rank `source` (or `MPI_ANY_SOURCE`;
    /// `src` names the awaited world rank in errors): the sender's world rank and the values.
    fn take_from(
        &self,
        source: c_int,
        src: usize,
        tag: c_int,
        channel: Channel,
        what: &dyn Fn() -> String,
    ) -> Result<(usize, Vec<f32>)> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut spins = 0u32;
        let wait = |spins: &mut u32| {
            *spins += 1;
            if *spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(
                    50 * u64::from((*spins - 199).min(10)),
                ));
            }
        };
        let timed_out = |me: &Self| CommError::Timeout {
            rank: Rank(me.members[me.me]),
            op: what(),
            waited: start.elapsed(),
            detail: me.timeout_detail(src, channel),
        };
        loop {
            self.progress(false)?;
            let mut flag: c_int = 0;
            // SAFETY: plain handles filled by MPI_Improbe.
            let mut message: ffi::MPI_Message = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
            // SAFETY: valid communicator and out-pointers.
            let rc = unsafe {
                ffi::MPI_Improbe(
                    source,
                    tag,
                    self.comm.0.as_raw(),
                    &mut flag,
                    &mut message,
                    &mut status,
                )
            };
            if rc != 0 {
                return Err(mpi_err("MPI_Improbe", rc));
            }
            if flag != 0 {
                let mut count: c_int = 0;
                // SAFETY: `status` describes the matched message.
                unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_FLOAT, &mut count) };
                let mut buf = vec![0f32; count.max(0) as usize];
                // SAFETY: as in `post_tag`.
                let mut req: ffi::MPI_Request = unsafe { std::mem::zeroed() };
                // SAFETY: `buf` holds `count` floats and outlives the request (leaked below
                // if the receive never completes).
                let rc = unsafe {
                    ffi::MPI_Imrecv(
                        buf.as_mut_ptr() as *mut c_void,
                        count,
                        ffi::RSMPI_FLOAT,
                        &mut message,
                        &mut req,
                    )
                };
                if rc != 0 {
                    return Err(mpi_err("MPI_Imrecv", rc));
                }
                loop {
                    let mut done: c_int = 0;
                    // SAFETY: live request on `buf`.
                    let rc =
                        unsafe { ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE) };
                    if rc != 0 {
                        std::mem::forget(buf);
                        return Err(mpi_err("MPI_Test", rc));
                    }
                    if done != 0 {
                        let from = usize::try_from(status.MPI_SOURCE)
                            .ok()
                            .and_then(|g| self.members.get(g).copied())
                            .unwrap_or(src);
                        return Ok((from, buf));
                    }
                    if Instant::now() >= deadline {
                        // MPI may still write into it: never free it.
                        std::mem::forget(buf);
                        return Err(timed_out(self));
                    }
                    self.progress(false)?;
                    wait(&mut spins);
                }
            }
            if Instant::now() >= deadline {
                return Err(timed_out(self));
            }
            wait(&mut spins);
        }
    }
}

/// The census service: answers `[group id, nonce]` with the collectives entered in that group.
fn serve_census(service: &Shared, arrivals: &Mutex<HashMap<u64, u64>>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match service
            .0
            .any_process()
            .immediate_matched_probe_with_tag(TAG_CENSUS)
        {
            Some((msg, status)) => {
                let mut req = [0u64; 2];
                msg.matched_receive_into(&mut req[..]);
                {
                    let [id, nonce] = req;
                    let n = arrivals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .copied()
                        .unwrap_or(0);
                    let tag = TAG_REPLY + (nonce % 1024) as c_int;
                    service
                        .0
                        .process_at_rank(status.source_rank())
                        .send_with_tag(&[n][..], tag);
                }
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

impl Transport for MpiComm {
    fn members(&self) -> &[usize] {
        &self.members
    }

    fn me(&self) -> usize {
        self.me
    }

    fn post(&self, dst: usize, channel: Channel, data: &[f32]) -> Result<()> {
        self.post_tag(dst, Self::tag(channel)?, data)
    }

    fn take(&self, src: usize, channel: Channel, what: &dyn Fn() -> String) -> Result<Vec<f32>> {
        self.take_tag(src, Self::tag(channel)?, channel, what)
    }

    fn take_any(&self, channel: Channel, what: &dyn Fn() -> String) -> Result<(usize, Vec<f32>)> {
        // SAFETY: reading an MPI constant.
        let any = unsafe { ffi::RSMPI_ANY_SOURCE };
        let me = self.members[self.me];
        self.take_from(any, me, Self::tag(channel)?, channel, what)
    }

    fn enter(&self) -> (Channel, u64) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.process
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id, seq + 1);
        (Channel::Collective(seq), seq)
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Sends still in flight must finish before their buffers go (bounded by the timeout;
        // after that the buffers are leaked rather than freed under MPI).
        if self.progress(true).is_err() {
            let pending =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            std::mem::forget(pending);
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> Rank {
        Rank(self.me)
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn world_ranks(&self) -> Vec<Rank> {
        self.members.iter().map(|&r| Rank(r)).collect()
    }

    fn member_nodes(&self) -> Vec<usize> {
        self.members
            .iter()
            .map(|&r| self.process.nodes[r])
            .collect()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn sub_group(&self, members: &[Rank]) -> Result<Box<dyn Communicator>> {
        let (world_members, me) = sub_group_members(&self.members, self.me, members)?;
        let nth = self.subgroups.next(&world_members);
        let mut h = DefaultHasher::new();
        (self.id, &world_members, nth).hash(&mut h);
        let id = h.finish();
        self.handshake(
            &world_members,
            &format!("creating the sub-group of world ranks {world_members:?}"),
        )?;
        let ranks: Vec<i32> = members.iter().map(|m| m.0 as i32).collect();
        let group = self.comm.0.group().include(&ranks);
        let comm = self
            .comm
            .0
            .split_by_subgroup_with_tag(&group, TAG_SETUP)
            .ok_or_else(|| {
                CommError::InvalidGroup(format!(
                    "MPI did not create the group of world ranks {world_members:?}"
                ))
            })?;
        Ok(Box::new(MpiComm {
            process: self.process.clone(),
            comm: Arc::new(Shared(comm)),
            id,
            members: Arc::new(world_members),
            me,
            seq: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
            subgroups: Default::default(),
            timeout: self.timeout,
        }))
    }

    algorithms::collectives_over_transport!();
}
