//! Gradient codecs (the survey's "send less": quantisation, sparsification, low rank) and the
//! compressed all-reduces that carry them. A codec only encodes and decodes; error feedback (the
//! residual each member adds back next time) is the caller's state, passed in as slices, so the
//! same functions serve with feedback and without.
//!
//! Every compressed all-reduce leaves bitwise the same result on every member: each member
//! decodes the same payloads and adds them up in rank order.
//!
//! ```
//! use comm::codec::{all_reduce_dense, Codec};
//! use comm::{Communicator, ThreadComm, CommError};
//!
//! let out = ThreadComm::run(3, |c| -> Result<Vec<f32>, CommError> {
//!     let mut g = vec![0.25 * (c.rank().0 as f32 + 1.0); 5];
//!     all_reduce_dense(&c, &mut g, Codec::Bf16, None, None)?;
//!     Ok(g)
//! })?;
//! assert!(out.iter().all(|g| g == &vec![1.5; 5])); // quarters are exact in bf16
//! # Ok::<(), CommError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::allreduce::{self, Algorithm};
use crate::communicator::{chunk_counts, offsets, Communicator, ReduceOp};
use crate::error::{CommError, Result};

/// Values per scale of [`Codec::Int8`] and [`Codec::Sign`].
pub const CHUNK: usize = 256;

/// How gradients are compressed before they cross the network.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Codec {
    /// Exact `f32`.
    #[default]
    None,
    /// bfloat16 (round to nearest even): 2 bytes a value.
    Bf16,
    /// IEEE half (round to nearest even, saturating at ±65504): 2 bytes a value.
    Fp16,
    /// 8-bit integers with one `f32` scale (max |x| / 127) per [`CHUNK`] values.
    Int8,
    /// One bit a value (its sign) with one `f32` scale (mean |x|) per [`CHUNK`] values.
    Sign,
    /// The largest `fraction` of the values by magnitude, as (index, value) pairs.
    TopK(f64),
    /// Top-k by Ok-Topk's balanced sparse all-reduce ([`crate::sparse`]): each member's top
    /// `fraction` goes to the owners of its regions, which keep the largest of their sums; a
    /// member's bytes do not grow with the members (the all-gather of [`Codec::TopK`]'s do).
    OkTopK(f64),
    /// A `fraction` of the values at positions every member draws from the same seed.
    RandK(f64),
    /// PowerSGD: each gradient matrix by a rank-`r` product `P Qᵀ` (vectors exact).
    PowerSgd(usize),
    /// QSGD with `s` levels (Alistarh et al. 2017): per [`CHUNK`] values their L2 norm, and
    /// each value as its sign and a level in `0..=s`, rounded stochastically so that the
    /// decoded value equals the original in expectation; `1 + ⌈log₂(s + 1)⌉` bits a value.
    Qsgd(u32),
    /// Deep Gradient Compression (Lin et al. 2018) keeping a `fraction` of the values once
    /// warmed up: local gradient clipping, momentum correction (a velocity accumulated before
    /// the residual), momentum factor masking (sent positions cleared in both) and sparsity
    /// warm-up ([`crate::dgc::all_reduce_dgc`]); the kept values travel as (index, value) pairs.
    Dgc(f64),
    /// DGC's sparsification exchanged by Ok-Topk's balanced sparse all-reduce (as
    /// [`Codec::OkTopK`]): a member's bytes do not grow with the members; what it sent that the
    /// owners' selection drops stays in its accumulation, and only what the result carries
    /// clears its velocity.
    OkDgc(f64),
    /// A count sketch of `rows × cols` (FetchSGD, Rothchild et al. 2020): a federated uplink
    /// only — the clients send sketches of their changes, the server adds them into its error
    /// accumulation and applies the largest coordinates it recovers ([`crate::sketch`]).
    Sketch(u32, u32),
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::None => f.write_str("none"),
            Codec::Bf16 => f.write_str("bf16"),
            Codec::Fp16 => f.write_str("fp16"),
            Codec::Int8 => f.write_str("int8"),
            Codec::Sign => f.write_str("sign"),
            Codec::TopK(x) => write!(f, "topk:{x}"),
            Codec::OkTopK(x) => write!(f, "oktopk:{x}"),
            Codec::RandK(x) => write!(f, "randk:{x}"),
            Codec::PowerSgd(r) => write!(f, "powersgd:{r}"),
            Codec::Qsgd(levels) => write!(f, "qsgd:{levels}"),
            Codec::Dgc(x) => write!(f, "dgc:{x}"),
            Codec::OkDgc(x) => write!(f, "okdgc:{x}"),
            Codec::Sketch(r, c) => write!(f, "sketch:{r}x{c}"),
        }
    }
}

const EXPECTED: &str =
    "use none, bf16, fp16, int8, sign, topk:F, oktopk:F, randk:F, dgc:F, okdgc:F (F a fraction in (0, 1], e.g. 0.01 or 1%), powersgd:R (R ≥ 1), qsgd:S (S levels, 1 to 255) or sketch:RxC (a count sketch of 1 to 32 rows of C ≥ 4 columns, federated uploads); --grad-compression also takes auto (per bucket)";

impl FromStr for Codec {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || CommError::Parse {
            what: "gradient codec",
            input: s.into(),
            expected: EXPECTED.into(),
        };
        let fraction = |v: &str| -> Result<f64> {
            let x = match v.strip_suffix('%') {
                Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
                None => v.trim().parse::<f64>().map_err(|_| bad())?,
            };
            if x > 0.0 && x <= 1.0 {
                Ok(x)
            } else {
                Err(bad())
            }
        };
        match s.split_once(':') {
            None => match s {
                "none" => Ok(Codec::None),
                "bf16" => Ok(Codec::Bf16),
                "fp16" => Ok(Codec::Fp16),
                "int8" => Ok(Codec::Int8),
                "sign" => Ok(Codec::Sign),
                _ => Err(bad()),
            },
            Some(("topk", v)) => Ok(Codec::TopK(fraction(v)?)),
            Some(("oktopk", v)) => Ok(Codec::OkTopK(fraction(v)?)),
            Some(("randk", v)) => Ok(Codec::RandK(fraction(v)?)),
            Some(("dgc", v)) => Ok(Codec::Dgc(fraction(v)?)),
            Some(("okdgc", v)) => Ok(Codec::OkDgc(fraction(v)?)),
            Some(("sketch", v)) => match v
                .split_once('x')
                .map(|(r, c)| (r.trim().parse::<u32>(), c.trim().parse::<u32>()))
            {
                Some((Ok(r), Ok(c))) if (1..=32).contains(&r) && c >= 4 => Ok(Codec::Sketch(r, c)),
                _ => Err(bad()),
            },
            Some(("powersgd", v)) => match v.trim().parse::<usize>() {
                Ok(r) if r >= 1 => Ok(Codec::PowerSgd(r)),
                _ => Err(bad()),
            },
            Some(("qsgd", v)) => match v.trim().parse::<u32>() {
                Ok(levels) if (1..=255).contains(&levels) => Ok(Codec::Qsgd(levels)),
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
        }
    }
}

impl Codec {
    /// Whether this codec encodes each value on its own ([`Codec::encode`] applies).
    pub fn is_dense(&self) -> bool {
        matches!(
            self,
            Codec::Bf16 | Codec::Fp16 | Codec::Int8 | Codec::Sign | Codec::Qsgd(_)
        )
    }

    /// Deep Gradient Compression, by either exchange ([`Codec::Dgc`], [`Codec::OkDgc`]).
    pub fn is_dgc(&self) -> bool {
        matches!(self, Codec::Dgc(_) | Codec::OkDgc(_))
    }

    /// How many of `len` values a sparsifying codec keeps (at least one of a non-empty vector).
    pub fn keep(&self, len: usize) -> usize {
        match *self {
            Codec::TopK(f)
            | Codec::OkTopK(f)
            | Codec::RandK(f)
            | Codec::Dgc(f)
            | Codec::OkDgc(f) => ((f * len as f64).ceil() as usize).clamp(len.min(1), len),
            _ => len,
        }
    }

    /// `f32` words of the payload of `len` values under a dense codec (`len` for the others).
    pub fn encoded_words(&self, len: usize) -> usize {
        let chunks = len.div_ceil(CHUNK);
        match self {
            Codec::Bf16 | Codec::Fp16 => len.div_ceil(2),
            Codec::Int8 => chunks + chunked_words(len, 4),
            Codec::Sign => chunks + chunked_words(len, 32),
            Codec::Qsgd(levels) => chunks + chunked_words(len, qsgd_per_word(*levels)),
            _ => len,
        }
    }

    /// Appends the payload of `x` to `out` (dense codecs; the others copy `x`). Non-finite
    /// values stay non-finite after decoding, so an overflow is seen, not hidden. QSGD's
    /// rounding draws from a seed made of `x`'s bits alone ([`Codec::encode_salted`] adds one).
    pub fn encode(&self, x: &[f32], out: &mut Vec<f32>) {
        self.encode_salted(x, out, 0)
    }

    /// [`Codec::encode`], QSGD's draws seeded by `salt` as well as by `x`'s bits (members and
    /// chunks pass different salts, so their draws are independent; the same inputs give the
    /// same payload on threads and under MPI).
    pub fn encode_salted(&self, x: &[f32], out: &mut Vec<f32>, salt: u64) {
        match self {
            Codec::Qsgd(levels) => qsgd_encode(*levels, x, out, salt),
            Codec::Bf16 => pack16(x, out, |v| bf16::from_f32(v).to_bits()),
            Codec::Fp16 => pack16(x, out, |v| {
                let v = if v.is_finite() {
                    v.clamp(-f16::MAX.to_f32(), f16::MAX.to_f32())
                } else {
                    v
                };
                f16::from_f32(v).to_bits()
            }),
            Codec::Int8 => {
                for c in x.chunks(CHUNK) {
                    let scale =
                        scale_of(c, |c| c.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0);
                    out.push(scale);
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for w in c.chunks(4) {
                        let mut bits = 0u32;
                        for (i, &v) in w.iter().enumerate() {
                            let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                            bits |= u32::from(q as u8) << (8 * i);
                        }
                        out.push(f32::from_bits(bits));
                    }
                }
            }
            Codec::Sign => {
                for c in x.chunks(CHUNK) {
                    out.push(scale_of(c, |c| {
                        c.iter().map(|v| v.abs()).sum::<f32>() / c.len() as f32
                    }));
                    for w in c.chunks(32) {
                        let mut bits = 0u32;
                        for (i, &v) in w.iter().enumerate() {
                            bits |= u32::from(v.is_sign_negative()) << i;
                        }
                        out.push(f32::from_bits(bits));
                    }
                }
            }
            _ => out.extend_from_slice(x),
        }
    }

    /// Adds the values `words` (a payload of `out.len()` values) encode to `out`.
    pub fn decode_add(&self, words: &[f32], out: &mut [f32]) -> Result<()> {
        crate::error::check_len(
            "decode",
            "payload",
            self.encoded_words(out.len()),
            words.len(),
        )?;
        match self {
            Codec::Bf16 => unpack16(words, out, |b| bf16::from_bits(b).to_f32()),
            Codec::Fp16 => unpack16(words, out, |b| f16::from_bits(b).to_f32()),
            Codec::Qsgd(levels) => qsgd_decode_add(*levels, words, out),
            Codec::Int8 | Codec::Sign => {
                let per = if *self == Codec::Int8 { 4 } else { 32 };
                let mut w = words.iter();
                for c in out.chunks_mut(CHUNK) {
                    let scale = w.next().copied().unwrap_or(0.0);
                    for part in c.chunks_mut(per) {
                        let bits = w.next().map_or(0, |x| x.to_bits());
                        for (i, o) in part.iter_mut().enumerate() {
                            *o += if per == 4 {
                                f32::from((bits >> (8 * i)) as u8 as i8) * scale
                            } else if bits >> i & 1 == 1 {
                                -scale
                            } else {
                                scale
                            };
                        }
                    }
                }
            }
            _ => out.iter_mut().zip(words).for_each(|(o, &v)| *o += v),
        }
        Ok(())
    }

    /// `x` as it arrives after encoding and decoding.
    pub fn round_trip(&self, x: &[f32]) -> Vec<f32> {
        self.round_trip_salted(x, 0)
    }

    /// [`Codec::round_trip`] with [`Codec::encode_salted`]'s salt.
    pub fn round_trip_salted(&self, x: &[f32], salt: u64) -> Vec<f32> {
        let mut words = Vec::with_capacity(self.encoded_words(x.len()));
        self.encode_salted(x, &mut words, salt);
        let mut out = vec![0.0; x.len()];
        // The payload was made for this length.
        let _ = self.decode_add(&words, &mut out);
        out
    }
}

/// Bits of one QSGD value with `levels` levels: its sign and its level in `0..=levels`.
fn qsgd_bits(levels: u32) -> u32 {
    1 + (32 - levels.leading_zeros())
}

/// QSGD values per 32-bit word (none straddles two).
fn qsgd_per_word(levels: u32) -> usize {
    (32 / qsgd_bits(levels)) as usize
}

/// SplitMix64's increment (2⁶⁴ / φ).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a stateless, well-mixed 64-bit hash.
pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64's stream from `seed` (Steele, Lea and Flood 2014): the same values on every
/// machine and member, for draws all members must agree on.
pub fn splitmix_stream(seed: u64) -> impl Iterator<Item = u64> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        let z = splitmix(state);
        state = state.wrapping_add(GOLDEN);
        z
    })
}

fn qsgd_encode(levels: u32, x: &[f32], out: &mut Vec<f32>, salt: u64) {
    let (bits, per) = (qsgd_bits(levels), qsgd_per_word(levels));
    let s = levels as f32;
    for (ci, c) in x.chunks(CHUNK).enumerate() {
        let norm = scale_of(c, |c| {
            c.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt() as f32
        });
        out.push(norm);
        // The draws: a seed from the chunk's bits, its place and the salt; one draw a value.
        let seed = c.iter().fold(splitmix(salt ^ ((ci as u64) << 1)), |h, v| {
            splitmix(h ^ u64::from(v.to_bits()))
        });
        let inv = if norm > 0.0 && norm.is_finite() {
            s / norm
        } else {
            0.0
        };
        for (wi, w) in c.chunks(per).enumerate() {
            let mut word = 0u32;
            for (i, &v) in w.iter().enumerate() {
                let r = (v.abs() * inv).min(s);
                let low = r.floor();
                let u = (splitmix(seed ^ (wi * per + i) as u64) >> 40) as f32 / (1u64 << 24) as f32;
                let level = (low as u32 + u32::from(u < r - low)).min(levels);
                let code = u32::from(v.is_sign_negative()) | level << 1;
                word |= code << (bits as usize * i);
            }
            out.push(f32::from_bits(word));
        }
    }
}

fn qsgd_decode_add(levels: u32, words: &[f32], out: &mut [f32]) {
    let (bits, per) = (qsgd_bits(levels), qsgd_per_word(levels));
    let mask = (1u32 << bits) - 1;
    let mut w = words.iter();
    for c in out.chunks_mut(CHUNK) {
        let norm = w.next().copied().unwrap_or(0.0);
        let unit = norm / levels as f32;
        for part in c.chunks_mut(per) {
            let word = w.next().map_or(0, |x| x.to_bits());
            for (i, o) in part.iter_mut().enumerate() {
                let code = word >> (bits as usize * i) & mask;
                let v = (code >> 1) as f32 * unit;
                *o += if code & 1 == 1 { -v } else { v };
            }
        }
    }
}

fn chunked_words(len: usize, per_word: usize) -> usize {
    (0..len.div_ceil(CHUNK))
        .map(|c| (len - c * CHUNK).min(CHUNK).div_ceil(per_word))
        .sum()
}

/// A chunk's scale, NaN when the chunk holds a non-finite value.
fn scale_of(c: &[f32], f: impl Fn(&[f32]) -> f32) -> f32 {
    if c.iter().all(|v| v.is_finite()) {
        f(c)
    } else {
        f32::NAN
    }
}

fn pack16(x: &[f32], out: &mut Vec<f32>, f: impl Fn(f32) -> u16) {
    for p in x.chunks(2) {
        let lo = u32::from(f(p[0]));
        let hi = p.get(1).map_or(0, |&v| u32::from(f(v)));
        out.push(f32::from_bits(lo | hi << 16));
    }
}

fn unpack16(words: &[f32], out: &mut [f32], f: impl Fn(u16) -> f32) {
    for (p, w) in out.chunks_mut(2).zip(words) {
        let bits = w.to_bits();
        p[0] += f(bits as u16);
        if let Some(o) = p.get_mut(1) {
            *o += f((bits >> 16) as u16);
        }
    }
}

/// The indices of the `k` largest magnitudes of `x`, ascending (ties to the lower index, NaN
/// largest so that it travels).
pub fn top_k(x: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(x.len());
    let key = |i: u32| {
        let v = x[i as usize].abs();
        if v.is_nan() {
            f32::INFINITY
        } else {
            v
        }
    };
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// `k` distinct indices below `n`, ascending, drawn from `seed` (Floyd's algorithm over
/// SplitMix64: the same on every machine).
pub fn random_k(n: usize, k: usize, seed: u64) -> Vec<u32> {
    let k = k.min(n);
    let mut draws = splitmix_stream(seed);
    let mut chosen = std::collections::BTreeSet::new();
    for j in n - k..n {
        let t = (draws.next().unwrap_or(0) % (j as u64 + 1)) as u32;
        if !chosen.insert(t) {
            chosen.insert(j as u32);
        }
    }
    chosen.into_iter().collect()
}

/// Adds `residual` to `buf` (error feedback: what earlier rounds left out).
/// The salt of member `me`'s payload `j` in a compressed collective (`j` = the members' count:
/// its all-gathered chunk of the sum).
fn salt(me: usize, j: usize) -> u64 {
    ((me as u64) << 32) | j as u64
}

/// Adds `residual` (error feedback's, when there is one) to `buf`.
pub(crate) fn add_residual(buf: &mut [f32], residual: Option<&mut [f32]>) -> Result<()> {
    if let Some(r) = residual {
        crate::error::check_len("compressed all_reduce", "residual", buf.len(), r.len())?;
        buf.iter_mut().zip(r.iter()).for_each(|(b, r)| *b += r);
    }
    Ok(())
}

/// Phase one of [`all_reduce_dense`], alone a compressed reduce-scatter: `buf` (with the
/// `worker` residual added) is cut by `counts`, chunk `j` encoded and sent to member `j`; this
/// member returns the sum, in rank order, of the decoded chunks it receives. `worker` becomes
/// what encoding left out.
pub fn reduce_scatter_dense(
    c: &dyn Communicator,
    buf: &mut [f32],
    counts: &[usize],
    codec: Codec,
    worker: Option<&mut [f32]>,
) -> Result<Vec<f32>> {
    if !codec.is_dense() {
        return Err(CommError::InvalidGroup(format!(
            "{codec} is not a dense codec"
        )));
    }
    let (n, me) = (c.size(), c.rank().0);
    crate::error::check_len("compressed reduce_scatter", "counts", n, counts.len())?;
    crate::error::check_len(
        "compressed reduce_scatter",
        "buf",
        counts.iter().sum(),
        buf.len(),
    )?;
    let keep = worker.is_some();
    let mut worker = worker;
    if let Some(w) = worker.as_deref_mut() {
        add_residual(buf, Some(w))?;
    }
    let off = offsets(counts);
    let send_counts: Vec<usize> = counts.iter().map(|&k| codec.encoded_words(k)).collect();
    let mut send = Vec::with_capacity(send_counts.iter().sum());
    for j in 0..n {
        codec.encode_salted(&buf[off[j]..off[j + 1]], &mut send, salt(me, j));
    }
    if keep {
        if let Some(w) = worker {
            let so = offsets(&send_counts);
            for j in 0..n {
                let mut back = vec![0.0; counts[j]];
                codec.decode_add(&send[so[j]..so[j + 1]], &mut back)?;
                for ((r, &e), d) in w[off[j]..off[j + 1]]
                    .iter_mut()
                    .zip(&buf[off[j]..off[j + 1]])
                    .zip(back)
                {
                    *r = e - d;
                }
            }
        }
    }
    let recv_counts = vec![codec.encoded_words(counts[me]); n];
    let mut recv = vec![0.0; recv_counts.iter().sum()];
    c.all_to_all(&send, &send_counts, &mut recv, &recv_counts)?;
    let mut sum = vec![0.0f32; counts[me]];
    for part in recv.chunks(recv_counts[0].max(1)).take(n) {
        codec.decode_add(part, &mut sum)?;
    }
    if recv_counts[0] == 0 {
        // Nothing was sent: the sum of empty chunks.
        sum.clear();
    }
    Ok(sum)
}

/// A dense codec's all-reduce: a compressed reduce-scatter ([`reduce_scatter_dense`]), then each
/// member's chunk of the sum, with its `server` residual added, encoded again and all-gathered
/// (the two-sided error feedback of 1-bit Adam). Every member decodes the same payloads, so all
/// end with the same `buf`. `worker` has `buf`'s length, `server` this member's chunk's
/// (`chunk_counts(buf.len(), size)[rank]`).
pub fn all_reduce_dense(
    c: &dyn Communicator,
    buf: &mut [f32],
    codec: Codec,
    worker: Option<&mut [f32]>,
    server: Option<&mut [f32]>,
) -> Result<()> {
    let n = c.size();
    let counts = chunk_counts(buf.len(), n);
    let mut sum = reduce_scatter_dense(c, buf, &counts, codec, worker)?;
    let keep = server.is_some();
    let mut server = server;
    if let Some(s) = server.as_deref_mut() {
        add_residual(&mut sum, Some(s))?;
    }
    let mut payload = Vec::with_capacity(codec.encoded_words(sum.len()));
    codec.encode_salted(&sum, &mut payload, salt(c.rank().0, n));
    if keep {
        if let Some(s) = server {
            // What this payload leaves out (a stochastic codec's own draws).
            let mut back = vec![0.0; sum.len()];
            codec.decode_add(&payload, &mut back)?;
            for ((r, &e), d) in s.iter_mut().zip(&sum).zip(back) {
                *r = e - d;
            }
        }
    }
    let words: Vec<usize> = counts.iter().map(|&k| codec.encoded_words(k)).collect();
    let mut all = vec![0.0; words.iter().sum()];
    c.all_gather(&payload, &mut all, &words)?;
    let (off, wo) = (offsets(&counts), offsets(&words));
    buf.fill(0.0);
    for j in 0..n {
        codec.decode_add(&all[wo[j]..wo[j + 1]], &mut buf[off[j]..off[j + 1]])?;
    }
    Ok(())
}

/// Local gradient clipping (Lin et al. 2018, §3.2): scales `buf` down to the L2 norm
/// `clip / √members` when it is longer, so that the members' sum stays within `clip`.
pub fn clip_local(buf: &mut [f32], clip: f32, members: usize) {
    let norm = buf
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let limit = f64::from(clip) / (members.max(1) as f64).sqrt();
    if norm > limit {
        let scale = (limit / norm) as f32;
        buf.iter_mut().for_each(|x| *x *= scale);
    }
}

/// All-gathers every member's `(idx, values)` pairs (the same count on every member) and
/// writes their sum, added in rank order, into `buf`.
pub(crate) fn gather_pairs(
    c: &dyn Communicator,
    buf: &mut [f32],
    idx: &[u32],
    values: &[f32],
    op: &'static str,
) -> Result<()> {
    let (n, len, k) = (c.size(), buf.len(), idx.len());
    let mut payload: Vec<f32> = idx.iter().map(|&i| f32::from_bits(i)).collect();
    payload.extend_from_slice(values);
    let mut all = vec![0.0; 2 * k * n];
    c.all_gather(&payload, &mut all, &vec![2 * k; n])?;
    buf.fill(0.0);
    for part in all.chunks(2 * k.max(1)).take(if k == 0 { 0 } else { n }) {
        let (ix, vals) = part.split_at(k);
        for (&i, &v) in ix.iter().zip(vals) {
            let i = i.to_bits() as usize;
            let slot = buf.get_mut(i).ok_or(CommError::Length {
                op,
                what: "index",
                expected: len,
                got: i,
            })?;
            *slot += v;
        }
    }
    Ok(())
}

/// Top-k all-reduce: each member keeps its `codec.keep(len)` largest values (after adding its
/// `residual`, which then holds everything else), all-gathers them as (index, value) pairs and
/// adds every member's pairs in rank order.
pub fn all_reduce_top_k(
    c: &dyn Communicator,
    buf: &mut [f32],
    codec: Codec,
    residual: Option<&mut [f32]>,
) -> Result<()> {
    let len = buf.len();
    let mut residual = residual;
    if let Some(r) = residual.as_deref_mut() {
        add_residual(buf, Some(r))?;
    }
    let k = codec.keep(len);
    let idx = top_k(buf, k);
    let values: Vec<f32> = idx.iter().map(|&i| buf[i as usize]).collect();
    if let Some(r) = residual {
        r.copy_from_slice(buf);
        idx.iter().for_each(|&i| r[i as usize] = 0.0);
    }
    gather_pairs(c, buf, &idx, &values, "top-k all_reduce")
}

/// Random-k all-reduce: every member keeps the same `codec.keep(len)` positions, drawn from
/// `seed` (which must be the same on every member), so only their values travel, summed by
/// `algo`. `residual` (added first) then holds the positions left out.
pub fn all_reduce_random_k(
    c: &dyn Communicator,
    buf: &mut [f32],
    codec: Codec,
    seed: u64,
    residual: Option<&mut [f32]>,
    algo: Algorithm,
) -> Result<()> {
    let mut residual = residual;
    if let Some(r) = residual.as_deref_mut() {
        add_residual(buf, Some(r))?;
    }
    let idx = random_k(buf.len(), codec.keep(buf.len()), seed);
    let mut vals: Vec<f32> = idx.iter().map(|&i| buf[i as usize]).collect();
    if let Some(r) = residual {
        r.copy_from_slice(buf);
        idx.iter().for_each(|&i| r[i as usize] = 0.0);
    }
    allreduce::all_reduce(c, &mut vals, ReduceOp::Sum, algo)?;
    buf.fill(0.0);
    for (&i, v) in idx.iter().zip(vals) {
        buf[i as usize] = v;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::grad;
    use crate::ThreadComm;

    #[test]
    fn names_parse_and_print_back() {
        for s in [
            "none",
            "bf16",
            "fp16",
            "int8",
            "sign",
            "topk:0.01",
            "randk:0.5",
            "powersgd:4",
            "qsgd:15",
        ] {
            let c: Codec = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("topk:1%".parse::<Codec>().unwrap(), Codec::TopK(0.01));
        for bad in [
            "topk",
            "topk:0",
            "topk:1.5",
            "randk:x",
            "powersgd:0",
            "qsgd:0",
            "qsgd:256",
            "int4",
            "bf16:2",
        ] {
            let e = bad.parse::<Codec>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("powersgd:R"), "{e}");
        }
    }

    #[test]
    fn qsgd_is_unbiased_within_its_variance_bound_and_its_bytes_are_its_formula() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for levels in [1u32, 4, 15, 255] {
            let codec = Codec::Qsgd(levels);
            // Sign plus ⌈log₂(s+1)⌉ bits a value, packed whole into 32-bit words, and one f32
            // norm per chunk of 256.
            let bits = 1 + (f64::from(levels) + 1.0).log2().ceil() as usize;
            let per = 32 / bits;
            assert_eq!(
                codec.encoded_words(300),
                2 + 256usize.div_ceil(per) + 44usize.div_ceil(per)
            );
            let draws = 4000;
            let mut mean = vec![0.0f64; x.len()];
            let mut sq_err = 0.0f64;
            for salt in 0..draws {
                let mut words = Vec::new();
                codec.encode_salted(&x, &mut words, salt);
                assert_eq!(words.len(), codec.encoded_words(x.len()));
                let mut y = vec![0.0f32; x.len()];
                codec.decode_add(&words, &mut y).unwrap();
                for (i, (&a, &b)) in y.iter().zip(&x).enumerate() {
                    mean[i] += f64::from(a) / draws as f64;
                    sq_err += f64::from(a - b).powi(2) / draws as f64;
                }
            }
            // Unbiased: each value's mean within five standard errors (a value's variance is at
            // most (norm / s)² / 4).
            for (c, chunk) in x.chunks(CHUNK).enumerate() {
                let norm = chunk
                    .iter()
                    .map(|&v| f64::from(v).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let se = norm / f64::from(levels) / 2.0 / (draws as f64).sqrt();
                for (i, &v) in chunk.iter().enumerate() {
                    let m = mean[c * CHUNK + i];
                    assert!(
                        (m - f64::from(v)).abs() <= 5.0 * se + 1e-5,
                        "s={levels}: {m} vs {v}"
                    );
                }
            }
            // QSGD's Lemma 3.1: E‖Q(v) − v‖² ≤ min(d/s², √d/s)·‖v‖², per chunk of d values.
            let bound: f64 = x
                .chunks(CHUNK)
                .map(|c| {
                    let d = c.len() as f64;
                    let s = f64::from(levels);
                    let n2 = c.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>();
                    (d / (s * s)).min(d.sqrt() / s) * n2
                })
                .sum();
            assert!(sq_err <= bound * 1.05, "s={levels}: {sq_err} > {bound}");
            assert!(sq_err > 0.0, "s={levels} rounds");
        }
        // The same input and salt give the same payload; another salt draws anew.
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        Codec::Qsgd(4).encode_salted(&x, &mut a, 1);
        Codec::Qsgd(4).encode_salted(&x, &mut b, 1);
        Codec::Qsgd(4).encode_salted(&x, &mut c, 2);
        assert_eq!(
            a.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|w| w.to_bits()).collect::<Vec<_>>()
        );
        assert_ne!(
            a.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
            c.iter().map(|w| w.to_bits()).collect::<Vec<_>>()
        );
        assert!(Codec::Qsgd(4).round_trip(&[1.0, f32::NAN])[0].is_nan());
    }

    #[test]
    fn dense_round_trips_are_within_each_formats_resolution() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        for (codec, bound) in [(Codec::Bf16, 2f32.powi(-8)), (Codec::Fp16, 2f32.powi(-11))] {
            let y = codec.round_trip(&x);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= bound * a.abs(), "{codec}: {a} -> {b}");
            }
        }
        // int8: within half a step of the chunk's scale.
        let y = Codec::Int8.round_trip(&x);
        for (c, (xs, ys)) in x.chunks(CHUNK).zip(y.chunks(CHUNK)).enumerate() {
            let scale = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in xs.iter().zip(ys) {
                assert!(
                    (a - b).abs() <= 0.5 * scale * 1.0001,
                    "chunk {c}: {a} -> {b}"
                );
            }
        }
        // sign: ±mean|x| per chunk.
        let y = Codec::Sign.round_trip(&x);
        for (xs, ys) in x.chunks(CHUNK).zip(y.chunks(CHUNK)) {
            let m = xs.iter().map(|v| v.abs()).sum::<f32>() / xs.len() as f32;
            for (a, b) in xs.iter().zip(ys) {
                assert_eq!(*b, if a.is_sign_negative() { -m } else { m });
            }
        }
        // Payload sizes: 2, 2, ~1 and ~1/8 bytes a value.
        assert_eq!(Codec::Bf16.encoded_words(1001), 501);
        assert_eq!(Codec::Int8.encoded_words(1000), 4 + 250);
        assert_eq!(Codec::Sign.encoded_words(1000), 4 + 8 + 8 + 8 + 8);
        // Overflow and NaN are not hidden.
        assert_eq!(
            Codec::Fp16.round_trip(&[1e6, -1e6]),
            vec![65504.0, -65504.0]
        );
        assert!(Codec::Int8.round_trip(&[1.0, f32::NAN])[0].is_nan());
        assert!(Codec::Bf16.round_trip(&[f32::INFINITY])[0].is_infinite());
    }

    #[test]
    fn top_k_and_random_k_choose_deterministically() {
        let x = [0.5, -3.0, 2.0, -2.0, 0.0, 3.0];
        assert_eq!(top_k(&x, 3), vec![1, 2, 5]); // 3, 3, then 2 before -2 (lower index)
        assert_eq!(top_k(&[1.0, f32::NAN, 2.0], 1), vec![1]);
        let a = random_k(1000, 10, 42);
        assert_eq!(a, random_k(1000, 10, 42));
        assert_ne!(a, random_k(1000, 10, 43));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[9] < 1000);
        assert_eq!(random_k(5, 5, 1), vec![0, 1, 2, 3, 4]);
    }

    /// DGC against Lin et al.'s Algorithm 1 written out here for every member at once, step by
    /// step (clip to thr/√N, u ← m·u + g, v ← v + u, send the top of v, clear both where
    /// sent): the same sums on every member, and the same velocity and accumulation.
    #[test]
    fn compressed_all_reduces_agree_on_every_member_and_feedback_keeps_what_was_left_out() {
        for n in 1..=5 {
            for len in [0, 1, 5, 300, 1030] {
                let out = ThreadComm::run(n, move |c| -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
                    let me = c.rank().0;
                    let mut res = Vec::new();
                    for codec in [
                        Codec::Bf16,
                        Codec::Fp16,
                        Codec::Int8,
                        Codec::Sign,
                        Codec::Qsgd(4),
                    ] {
                        let mut g = grad(me, len);
                        let mut w = vec![0.0; len];
                        let mut s = vec![0.0; chunk_counts(len, n)[me]];
                        all_reduce_dense(&c, &mut g, codec, Some(&mut w), Some(&mut s))?;
                        // What this member contributed, exactly: sent + left out.
                        res.push((g, w));
                    }
                    let mut g = grad(me, len);
                    let mut r = vec![0.0; len];
                    all_reduce_top_k(&c, &mut g, Codec::TopK(0.1), Some(&mut r))?;
                    res.push((g, r));
                    let mut g = grad(me, len);
                    let mut r = vec![0.0; len];
                    all_reduce_random_k(
                        &c,
                        &mut g,
                        Codec::RandK(0.1),
                        7,
                        Some(&mut r),
                        Algorithm::Ring,
                    )?;
                    res.push((g, r));
                    Ok(res)
                })
                .unwrap();
                let exact: Vec<f32> = (0..len)
                    .map(|i| (0..n).map(|r| grad(r, len)[i]).sum())
                    .collect();
                for (k, name) in ["bf16", "fp16", "int8", "sign", "qsgd", "topk", "randk"]
                    .iter()
                    .enumerate()
                {
                    for r in 1..n {
                        assert_eq!(out[r][k].0, out[0][k].0, "{name}: ranks 0 and {r} differ");
                    }
                    if *name == "bf16" || *name == "fp16" || *name == "int8" {
                        for (a, b) in out[0][k].0.iter().zip(&exact) {
                            let tol = if *name == "int8" {
                                0.02 * n as f32
                            } else {
                                0.01 * n as f32
                            };
                            assert!((a - b).abs() <= tol, "{name} n={n} len={len}: {a} vs {b}");
                        }
                    }
                    if *name == "topk" || *name == "randk" {
                        // Sparse: the sum plus every member's residual is the exact sum.
                        for (i, &e) in exact.iter().enumerate().take(len) {
                            let back: f32 =
                                out[0][k].0[i] + (0..n).map(|r| out[r][k].1[i]).sum::<f32>();
                            assert!((back - e).abs() < 1e-5, "{name}: {back} vs {e}");
                        }
                    }
                }
            }
        }
    }
}
