//! `NcclComm` proper (feature `nccl`): NCCL loaded at run time with `libloading` (cudarc's own
//! loader does not look for `libnccl.so.2`, the only name the pip wheel ships), device buffers
//! and the stream from cudarc.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use super::rendezvous::ID_BYTES;
use crate::communicator::offsets;
use crate::error::{check_len, CommError, Result};
use crate::{Communicator, P2p, Rank, ReduceOp};

type Comm = *mut c_void;
type Stream = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([u8; ID_BYTES]);

const FLOAT32: c_int = 7;
const SUM: c_int = 0;
const MAX: c_int = 2;

/// The NCCL entry points hotspa uses.
struct Nccl {
    _lib: libloading::Library,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    destroy: unsafe extern "C" fn(Comm) -> c_int,
    abort: unsafe extern "C" fn(Comm) -> c_int,
    async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int,
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
}

/// Library names tried, in order: `$HOTSPA_NCCL_LIBRARY`, then the soname.
fn candidates() -> Vec<String> {
    let mut v: Vec<String> = std::env::var("HOTSPA_NCCL_LIBRARY").into_iter().collect();
    v.push("libnccl.so.2".into());
    v.push("libnccl.so".into());
    v
}

fn nccl() -> Result<&'static Nccl> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let names = candidates();
        // SAFETY: loading NCCL runs its (trusted) initialisers only.
        let lib = names
            .iter()
            .find_map(|n| unsafe { libloading::Library::new(n) }.ok())
            .ok_or_else(|| {
                format!(
                    "cannot load NCCL: tried {names:?}. Install NCCL, or `pip install \
                     nvidia-nccl-cu13` and put its nvidia/nccl/lib folder on LD_LIBRARY_PATH \
                     (or point HOTSPA_NCCL_LIBRARY at libnccl.so.2)"
                )
            })?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the signature matches nccl.h for this symbol.
                *unsafe { lib.get($name) }
                    .map_err(|e| format!("NCCL lacks {}: {e}", String::from_utf8_lossy($name)))?
            };
        }
        Ok(Nccl {
            get_unique_id: sym!(b"ncclGetUniqueId"),
            init_rank: sym!(b"ncclCommInitRank"),
            destroy: sym!(b"ncclCommDestroy"),
            abort: sym!(b"ncclCommAbort"),
            async_error: sym!(b"ncclCommGetAsyncError"),
            error_string: sym!(b"ncclGetErrorString"),
            all_reduce: sym!(b"ncclAllReduce"),
            all_gather: sym!(b"ncclAllGather"),
            reduce_scatter: sym!(b"ncclReduceScatter"),
            broadcast: sym!(b"ncclBroadcast"),
            reduce: sym!(b"ncclReduce"),
            send: sym!(b"ncclSend"),
            recv: sym!(b"ncclRecv"),
            group_start: sym!(b"ncclGroupStart"),
            group_end: sym!(b"ncclGroupEnd"),
            _lib: lib,
        })
    })
    .as_ref()
    .map_err(|e| CommError::Unavailable(e.clone()))
}

fn check(lib: &Nccl, what: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static C string.
    let msg = unsafe { CStr::from_ptr((lib.error_string)(code)) }.to_string_lossy();
    Err(CommError::Unavailable(format!(
        "NCCL {what}: {msg} ({code})"
    )))
}

fn cu(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CommError {
    move |e| CommError::Unavailable(format!("CUDA {what}: {e}"))
}

/// A new NCCL unique id (rank 0 of a world creates it and hands it out).
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let lib = nccl()?;
    let mut id = UniqueId([0; ID_BYTES]);
    // SAFETY: writes 128 bytes into `id`.
    check(lib, "ncclGetUniqueId", unsafe {
        (lib.get_unique_id)(&mut id)
    })?;
    Ok(id.0)
}

struct Handle(Comm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent;
// every use below holds `Inner::lock`.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

struct Inner {
    lib: &'static Nccl,
    comm: Handle,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    lock: Mutex<()>,
    /// Messages a rank sent to itself, by tag.
    own: Mutex<HashMap<u32, VecDeque<Vec<f32>>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: the communicator is not used after this.
        unsafe { (self.lib.destroy)(self.comm.0) };
    }
}

/// A [`Communicator`] over NCCL: host slices in and out (copied through the GPU), collectives and
/// batched groups as NCCL (group) calls. Uneven all-gathers and reduce-scatters become groups of
/// broadcasts and reduces. Unlike `ThreadComm`, a plain `send` returns only once the peer has
/// posted the matching `recv`, and sends between a pair must be received in the order they were
/// posted (the tag travels in a header and a mismatch is an error); use `batch` for exchanges.
/// A timeout aborts the NCCL communicator; NCCL cannot say which rank was missing.
pub struct NcclComm {
    inner: Arc<Inner>,
    rank: usize,
    size: usize,
    world: Vec<Rank>,
    timeout: Duration,
}

/// GPUs on this machine (at least 1 for the `rank mod` count).
fn gpu_count() -> Result<usize> {
    Ok(CudaContext::device_count()
        .map_err(cu("device count"))?
        .max(1) as usize)
}

impl NcclComm {
    /// Joins the world `size` of NCCL `id` as `rank`, on GPU `device`.
    pub fn init(id: [u8; ID_BYTES], rank: usize, size: usize, device: usize) -> Result<Self> {
        let world = (0..size).map(Rank).collect();
        Self::init_with(id, rank, size, device, world, crate::default_timeout())
    }

    /// One rank alone on GPU `device`.
    pub fn single(device: usize) -> Result<Self> {
        Self::init(unique_id()?, 0, 1, device)
    }

    /// The world from the environment: `HOTSPA_RANK`, `HOTSPA_WORLD_SIZE`, `HOTSPA_NCCL_ADDR`
    /// (host:port where rank 0 hands out the unique id over TCP) and `HOTSPA_NCCL_SECRET` (the
    /// job's secret every rank proves first; refused without it: see
    /// [`rendezvous`](super::rendezvous)); GPU `rank mod` the GPU count.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| {
            std::env::var(k)
                .map_err(|_| CommError::Unavailable(format!("{k} is not set")))
                .and_then(|v| {
                    v.parse::<usize>()
                        .map_err(|_| CommError::Unavailable(format!("{k}={v} is not a number")))
                })
        };
        let (rank, size) = (var("HOTSPA_RANK")?, var("HOTSPA_WORLD_SIZE")?);
        let secret = super::rendezvous::secret_from_env()?;
        let addr = std::env::var("HOTSPA_NCCL_ADDR").unwrap_or_else(|_| "127.0.0.1:29517".into());
        let timeout = crate::default_timeout();
        let id = if rank == 0 {
            let id = unique_id()?;
            super::rendezvous::serve(&addr, size, &id, &secret, timeout)?;
            id
        } else {
            super::rendezvous::fetch(&addr, rank, &secret, timeout)?
        };
        Self::init(id, rank, size, rank % gpu_count()?)
    }

    /// The world of `world` (e.g. the MPI world under `mpirun`): rank 0's unique id reaches
    /// every member over it, no socket opened; GPU `rank mod` the GPU count.
    pub fn from_world(world: &dyn Communicator) -> Result<Self> {
        let (rank, size) = (world.rank().0, world.size());
        let id = super::rendezvous::share_id(world, (rank == 0).then(unique_id).transpose()?)?;
        Self::init(id, rank, size, rank % gpu_count()?)
    }

    fn init_with(
        id: [u8; ID_BYTES],
        rank: usize,
        size: usize,
        device: usize,
        world: Vec<Rank>,
        timeout: Duration,
    ) -> Result<Self> {
        let lib = nccl()?;
        let ctx = CudaContext::new(device).map_err(cu("context"))?;
        let stream = ctx.new_stream().map_err(cu("stream"))?;
        // ncclCommInitRank blocks until every rank joins: run it aside and bound the wait.
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx2 = ctx.clone();
        std::thread::spawn(move || {
            let r = ctx2.bind_to_thread().map_err(cu("bind")).and_then(|_| {
                let mut comm: Comm = std::ptr::null_mut();
                // SAFETY: `comm` receives the new communicator.
                let code = unsafe {
                    (lib.init_rank)(&mut comm, size as c_int, UniqueId(id), rank as c_int)
                };
                check(lib, "ncclCommInitRank", code).map(|_| Handle(comm))
            });
            let _ = tx.send(r);
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(CommError::Timeout {
                    rank: world.get(rank).copied().unwrap_or(Rank(rank)),
                    op: format!("ncclCommInitRank of {size} ranks"),
                    waited: timeout,
                    detail: "not every rank joined (NCCL does not say which)".into(),
                })
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                lib,
                comm,
                ctx,
                stream,
                lock: Mutex::new(()),
                own: Mutex::new(HashMap::new()),
            }),
            rank,
            size,
            world,
            timeout,
        })
    }

    fn up(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        let s = &self.inner.stream;
        if data.is_empty() {
            return s.alloc_zeros::<f32>(1).map_err(cu("alloc"));
        }
        s.clone_htod(data).map_err(cu("copy to device"))
    }

    fn down(&self, buf: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let s = &self.inner.stream;
        let host = s.clone_dtoh(buf).map_err(cu("copy to host"))?;
        s.synchronize().map_err(cu("synchronize"))?;
        out.copy_from_slice(&host[..out.len()]);
        Ok(())
    }

    /// A collective of one chunk per member (`counts`: all-gather, reduce-scatter): `send`
    /// and a zeroed `recv` staged to the device, one call `whole(send, recv)` where every chunk
    /// has the same size, else one call `per_chunk(send, recv, member, count, offset)` for each
    /// non-empty chunk inside one NCCL group; `recv` staged back.
    #[allow(clippy::too_many_arguments)] // the buffers, the counts and the two ways to call
    fn chunked(
        &self,
        op: &str,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        whole: impl FnOnce(&Nccl, Comm, Stream, (*mut c_void, *mut c_void)) -> Result<()>,
        per_chunk: impl Fn(
            &Nccl,
            Comm,
            Stream,
            (*mut c_void, *mut c_void),
            usize,
            usize,
            usize,
        ) -> Result<()>,
    ) -> Result<()> {
        let (ds, dr) = (self.up(send)?, self.up(&vec![0.0; recv.len()])?);
        let s = self.inner.stream.clone();
        let even = counts.iter().all(|&c| c == counts[0]);
        let off = offsets(counts);
        self.run(op, !even, |lib, comm, st| {
            let bufs = (ptr(&ds, &s, 0), ptr(&dr, &s, 0));
            if even {
                return match counts[0] {
                    0 => Ok(()),
                    _ => whole(lib, comm, st, bufs),
                };
            }
            for (r, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
                per_chunk(lib, comm, st, bufs, r, c, off[r])?;
            }
            Ok(())
        })?;
        self.down(&dr, recv)
    }

    /// Queues NCCL calls with `f` (inside one NCCL group when `group`) and waits for them, or
    /// aborts the communicator after the timeout.
    fn run(
        &self,
        op: &str,
        group: bool,
        f: impl FnOnce(&Nccl, Comm, Stream) -> Result<()>,
    ) -> Result<()> {
        let inner = &self.inner;
        let _guard = inner
            .lock
            .lock()
            .map_err(|_| CommError::Unavailable("NCCL communicator poisoned by a panic".into()))?;
        inner.ctx.bind_to_thread().map_err(cu("bind"))?;
        let (lib, comm) = (inner.lib, inner.comm.0);
        let stream = inner.stream.cu_stream() as Stream;
        if group {
            // SAFETY: plain NCCL group bracket.
            check(lib, "ncclGroupStart", unsafe { (lib.group_start)() })?;
        }
        let queued = f(lib, comm, stream);
        if group {
            // SAFETY: closes the bracket opened above.
            check(lib, "ncclGroupEnd", unsafe { (lib.group_end)() })?;
        }
        queued?;
        let ev = inner.stream.record_event(None).map_err(cu("event"))?;
        let start = Instant::now();
        loop {
            if ev.try_is_complete().map_err(cu("event"))? {
                return Ok(());
            }
            let mut err: c_int = 0;
            // SAFETY: reads the communicator's asynchronous error state.
            check(lib, "ncclCommGetAsyncError", unsafe {
                (lib.async_error)(comm, &mut err)
            })?;
            check(lib, op, err)?;
            if start.elapsed() > self.timeout {
                // SAFETY: the communicator is unusable after a timeout; aborting frees the stream.
                unsafe { (lib.abort)(comm) };
                return Err(CommError::Timeout {
                    rank: self.world[self.rank],
                    op: format!("{op} on world ranks {:?}", self.world),
                    waited: self.timeout,
                    detail: "not every rank took part (NCCL does not say which); the communicator was aborted".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn peer(&self, op: &'static str, peer: Rank) -> Result<c_int> {
        if peer.0 >= self.size {
            return Err(CommError::InvalidRank {
                op,
                rank: peer,
                size: self.size,
            });
        }
        Ok(peer.0 as c_int)
    }
}

fn ptr(s: &CudaSlice<f32>, stream: &CudaStream, offset: usize) -> *mut c_void {
    let (p, _sync) = s.device_ptr(stream);
    (p + (offset * 4) as u64) as *mut c_void
}

/// The device address `offset` floats past `base`.
fn at(base: *mut c_void, offset: usize) -> *mut c_void {
    base.cast::<f32>().wrapping_add(offset).cast()
}

fn redop(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => SUM,
        ReduceOp::Max => MAX,
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> Rank {
        Rank(self.rank)
    }
    fn size(&self) -> usize {
        self.size
    }
    fn world_ranks(&self) -> Vec<Rank> {
        self.world.clone()
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn sub_group(&self, members: &[Rank]) -> Result<Box<dyn Communicator>> {
        let pos = members
            .iter()
            .position(|&r| r.0 == self.rank)
            .ok_or_else(|| {
                CommError::InvalidGroup(format!("rank {} is not among {members:?}", self.rank))
            })?;
        for &m in members {
            self.peer("sub_group", m)?;
        }
        // The first member makes the id and sends it to the others (32 f32s carrying its bits).
        let id = if pos == 0 {
            let id = unique_id()?;
            let words: Vec<f32> = id
                .chunks(4)
                .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            for &m in &members[1..] {
                self.send(&words, m, u32::MAX)?;
            }
            id
        } else {
            let mut words = vec![0f32; ID_BYTES / 4];
            self.recv(&mut words, members[0], u32::MAX)?;
            let mut id = [0u8; ID_BYTES];
            for (i, w) in words.iter().enumerate() {
                id[4 * i..4 * i + 4].copy_from_slice(&w.to_bits().to_le_bytes());
            }
            id
        };
        let world = members.iter().map(|m| self.world[m.0]).collect();
        let device = self.inner.ctx.ordinal();
        Ok(Box::new(Self::init_with(
            id,
            pos,
            members.len(),
            device,
            world,
            self.timeout,
        )?))
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let d = self.up(buf)?;
        let s = self.inner.stream.clone();
        let p = ptr(&d, &s, 0);
        self.run("all_reduce", false, |lib, comm, st| {
            // SAFETY: in place on a device buffer of buf.len() floats.
            check(lib, "ncclAllReduce", unsafe {
                (lib.all_reduce)(p, p, buf.len(), FLOAT32, redop(op), comm, st)
            })
        })?;
        self.down(&d, buf)
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) -> Result<()> {
        check_len("all_gather", "counts", self.size, counts.len())?;
        check_len("all_gather", "send", counts[self.rank], send.len())?;
        check_len("all_gather", "recv", offsets(counts)[self.size], recv.len())?;
        self.chunked(
            "all_gather",
            send,
            recv,
            counts,
            |lib, comm, st, (send, recv)| {
                // SAFETY: send holds counts[0] floats, recv size × counts[0].
                check(lib, "ncclAllGather", unsafe {
                    (lib.all_gather)(send, recv, counts[0], FLOAT32, comm, st)
                })
            },
            |lib, comm, st, (send, recv), r, c, off| {
                // SAFETY: root r's send buffer has c floats; recv has room at off.
                check(lib, "ncclBroadcast", unsafe {
                    (lib.broadcast)(send, at(recv, off), c, FLOAT32, r as c_int, comm, st)
                })
            },
        )
    }

    fn reduce_scatter(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        check_len("reduce_scatter", "counts", self.size, counts.len())?;
        check_len(
            "reduce_scatter",
            "send",
            offsets(counts)[self.size],
            send.len(),
        )?;
        check_len("reduce_scatter", "recv", counts[self.rank], recv.len())?;
        self.chunked(
            "reduce_scatter",
            send,
            recv,
            counts,
            |lib, comm, st, (send, recv)| {
                // SAFETY: send holds size × counts[0] floats, recv counts[0].
                check(lib, "ncclReduceScatter", unsafe {
                    (lib.reduce_scatter)(send, recv, counts[0], FLOAT32, redop(op), comm, st)
                })
            },
            |lib, comm, st, (send, recv), r, c, off| {
                // SAFETY: every rank's send has c floats at off; only root r writes recv.
                check(lib, "ncclReduce", unsafe {
                    (lib.reduce)(
                        at(send, off),
                        recv,
                        c,
                        FLOAT32,
                        redop(op),
                        r as c_int,
                        comm,
                        st,
                    )
                })
            },
        )
    }

    fn all_to_all(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<()> {
        check_len("all_to_all", "send_counts", self.size, send_counts.len())?;
        check_len("all_to_all", "recv_counts", self.size, recv_counts.len())?;
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        check_len("all_to_all", "send", so[self.size], send.len())?;
        check_len("all_to_all", "recv", ro[self.size], recv.len())?;
        let (ds, dr) = (self.up(send)?, self.up(&vec![0.0; recv.len()])?);
        let s = self.inner.stream.clone();
        self.run("all_to_all", true, |lib, comm, st| {
            for j in 0..self.size {
                if send_counts[j] > 0 {
                    // SAFETY: send_counts[j] floats at so[j].
                    check(lib, "ncclSend", unsafe {
                        (lib.send)(
                            ptr(&ds, &s, so[j]),
                            send_counts[j],
                            FLOAT32,
                            j as c_int,
                            comm,
                            st,
                        )
                    })?;
                }
                if recv_counts[j] > 0 {
                    // SAFETY: room for recv_counts[j] floats at ro[j].
                    check(lib, "ncclRecv", unsafe {
                        (lib.recv)(
                            ptr(&dr, &s, ro[j]),
                            recv_counts[j],
                            FLOAT32,
                            j as c_int,
                            comm,
                            st,
                        )
                    })?;
                }
            }
            Ok(())
        })?;
        self.down(&dr, recv)
    }

    fn broadcast(&self, buf: &mut [f32], root: Rank) -> Result<()> {
        let r = self.peer("broadcast", root)?;
        if buf.is_empty() {
            return Ok(());
        }
        let d = self.up(buf)?;
        let s = self.inner.stream.clone();
        self.run("broadcast", false, |lib, comm, st| {
            let p = ptr(&d, &s, 0);
            // SAFETY: in place, buf.len() floats.
            check(lib, "ncclBroadcast", unsafe {
                (lib.broadcast)(p, p, buf.len(), FLOAT32, r, comm, st)
            })
        })?;
        self.down(&d, buf)
    }

    fn send(&self, data: &[f32], peer: Rank, tag: u32) -> Result<()> {
        let p = self.peer("send", peer)?;
        if peer.0 == self.rank {
            let mut own = self
                .inner
                .own
                .lock()
                .map_err(|_| CommError::Unavailable("mailbox poisoned".into()))?;
            own.entry(tag).or_default().push_back(data.to_vec());
            return Ok(());
        }
        // Header (tag, length as f32 bits), then the data, as one group.
        let header = [f32::from_bits(tag), f32::from_bits(data.len() as u32)];
        let (dh, dd) = (self.up(&header)?, self.up(data)?);
        let s = self.inner.stream.clone();
        self.run("send", true, |lib, comm, st| {
            // SAFETY: 2 header floats, then data.len() floats.
            check(lib, "ncclSend", unsafe {
                (lib.send)(ptr(&dh, &s, 0), 2, FLOAT32, p, comm, st)
            })?;
            if !data.is_empty() {
                check(lib, "ncclSend", unsafe {
                    (lib.send)(ptr(&dd, &s, 0), data.len(), FLOAT32, p, comm, st)
                })?;
            }
            Ok(())
        })
    }

    fn recv(&self, buf: &mut [f32], peer: Rank, tag: u32) -> Result<()> {
        let p = self.peer("recv", peer)?;
        if peer.0 == self.rank {
            let msg = self
                .inner
                .own
                .lock()
                .map_err(|_| CommError::Unavailable("mailbox poisoned".into()))?
                .get_mut(&tag)
                .and_then(|q| q.pop_front())
                .ok_or_else(|| {
                    CommError::Unavailable(format!(
                        "recv from self with tag {tag}: nothing was sent"
                    ))
                })?;
            check_len("recv", "buf", msg.len(), buf.len())?;
            buf.copy_from_slice(&msg);
            return Ok(());
        }
        let (dh, dd) = (self.up(&[0.0, 0.0])?, self.up(&vec![0.0; buf.len()])?);
        let s = self.inner.stream.clone();
        let n = buf.len();
        self.run("recv", true, |lib, comm, st| {
            // SAFETY: room for the 2 header floats and n data floats.
            check(lib, "ncclRecv", unsafe {
                (lib.recv)(ptr(&dh, &s, 0), 2, FLOAT32, p, comm, st)
            })?;
            if n > 0 {
                check(lib, "ncclRecv", unsafe {
                    (lib.recv)(ptr(&dd, &s, 0), n, FLOAT32, p, comm, st)
                })?;
            }
            Ok(())
        })?;
        let mut h = [0f32; 2];
        self.down(&dh, &mut h)?;
        let (got_tag, got_len) = (h[0].to_bits(), h[1].to_bits() as usize);
        if got_tag != tag || got_len != n {
            return Err(CommError::Unavailable(format!(
                "recv from rank {}: expected tag {tag} with {n} values, the next message has tag \
                 {got_tag} with {got_len} (NcclComm delivers a pair's messages in posting order)",
                peer.0
            )));
        }
        self.down(&dd, buf)
    }

    fn batch(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        let s = self.inner.stream.clone();
        let mut bufs = Vec::with_capacity(ops.len());
        for op in ops.iter() {
            match op {
                P2p::Send { peer, data } => {
                    self.peer("batch", *peer)?;
                    bufs.push(self.up(data)?);
                }
                P2p::Recv { peer, buf } => {
                    self.peer("batch", *peer)?;
                    bufs.push(self.up(&vec![0.0; buf.len()])?);
                }
            }
        }
        self.run("batch", true, |lib, comm, st| {
            for (op, d) in ops.iter().zip(&bufs) {
                match op {
                    P2p::Send { peer, data } if !data.is_empty() => {
                        check(lib, "ncclSend", unsafe {
                            // SAFETY: data.len() floats on the device.
                            (lib.send)(
                                ptr(d, &s, 0),
                                data.len(),
                                FLOAT32,
                                peer.0 as c_int,
                                comm,
                                st,
                            )
                        })?
                    }
                    P2p::Recv { peer, buf } if !buf.is_empty() => check(lib, "ncclRecv", unsafe {
                        // SAFETY: room for buf.len() floats.
                        (lib.recv)(ptr(d, &s, 0), buf.len(), FLOAT32, peer.0 as c_int, comm, st)
                    })?,
                    _ => {}
                }
            }
            Ok(())
        })?;
        for (op, d) in ops.iter_mut().zip(&bufs) {
            if let P2p::Recv { buf, .. } = op {
                self.down(d, buf)?;
            }
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [1.0f32];
        self.all_reduce(&mut one, ReduceOp::Sum)
    }
}
