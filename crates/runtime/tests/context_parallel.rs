//! Context-parallel attention on thread ranks against the single-rank kernel: ring and Ulysses,
//! 2–4 ranks, MHA and GQA (with fewer kv heads than ranks), on a long-tailed packed batch.

use std::sync::Arc;

use comm::{Communicator, ThreadComm};
use kernels::ops::attention;
use kernels::AttnShape;
use runtime::context::{CpAttention, CpExchange, CpSplit, Saved};
use runtime::RuntimeError;

use kernels::conformance::uniform as rand;

struct Case {
    cu: Vec<usize>,
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

struct Whole {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Over the group, the (query, key) pairs × query heads of the blocks of attention run
    /// through the ranks' `HostAttention`, forward and backward.
    accounted: [usize; 2],
}

const SCALE: f32 = 0.35;

/// The backward's inputs: a rank's `[q, k, v, dout]` and the forward's `out` and `lse`.
fn saved<'a>(x: &'a [Vec<f32>; 4], out: &'a [f32], lse: &'a [f32]) -> Saved<'a> {
    let [q, k, v, dout] = x;
    Saved {
        dout,
        q,
        k,
        v,
        out,
        lse,
    }
}

impl Case {
    fn new(lengths: &[usize], heads: usize, kv_heads: usize) -> Self {
        let mut cu = vec![0];
        for l in lengths {
            cu.push(cu.last().unwrap() + l);
        }
        let t = *cu.last().unwrap();
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: 16,
        };
        let (qn, kn) = (t * heads * 16, t * kv_heads * 16);
        Self {
            cu,
            shape,
            q: rand(qn, 1),
            k: rand(kn, 2),
            v: rand(kn, 3),
            dout: rand(qn, 4),
        }
    }

    fn whole(&self) -> Whole {
        let t = *self.cu.last().unwrap();
        let mut w = Whole {
            out: vec![0.0; self.q.len()],
            lse: vec![0.0; self.shape.heads * t],
            dq: vec![0.0; self.q.len()],
            dk: vec![0.0; self.k.len()],
            dv: vec![0.0; self.k.len()],
            accounted: [0; 2],
        };
        attention::forward(
            &self.q, &self.k, &self.v, &self.cu, self.shape, SCALE, &mut w.out, &mut w.lse,
        )
        .unwrap();
        attention::backward(
            &self.dout, &self.q, &self.k, &self.v, &w.out, &w.lse, &self.cu, self.shape, SCALE,
            &mut w.dq, &mut w.dk, &mut w.dv,
        )
        .unwrap();
        w
    }

    /// Rank `me`'s queries, keys, values and output gradient under `split`.
    fn rank_share(&self, split: &CpSplit, me: usize) -> [Vec<f32>; 4] {
        let sh = self.shape;
        let (qrow, krow) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
        [
            (&self.q, qrow),
            (&self.k, krow),
            (&self.v, krow),
            (&self.dout, qrow),
        ]
        .map(|(x, row)| split.take(me, x, row))
    }

    /// Every rank's forward and backward; the results put back in packed-batch order.
    fn split_run(self: &Arc<Self>, cp: usize, exchange: CpExchange) -> Result<Whole, RuntimeError> {
        let case = self.clone();
        let per_rank = ThreadComm::run(cp, move |c| {
            let me = c.rank().0;
            let (split, sh) = (CpSplit::balanced(&case.cu, cp)?, case.shape);
            let x = case.rank_share(&split, me);
            let [q, k, v, _] = &x;
            let tally = Tally::default();
            let attn = CpAttention::new(&c, exchange, &split, sh, SCALE).through(&tally);
            let (out, lse) = attn.forward(q, k, v)?;
            let (dq, dk, dv) = attn.backward(&saved(&x, &out, &lse))?;
            let counted = *tally
                .0
                .lock()
                .map_err(|_| RuntimeError::Context("tally".into()))?;
            Ok::<_, RuntimeError>((out, lse, dq, dk, dv, counted))
        })?;
        let split = CpSplit::balanced(&self.cu, cp)?;
        let t = split.tokens();
        let sh = self.shape;
        let (qrow, krow) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
        let mut w = Whole {
            out: vec![f32::NAN; self.q.len()],
            lse: vec![f32::NAN; sh.heads * t],
            dq: vec![f32::NAN; self.q.len()],
            dk: vec![f32::NAN; self.k.len()],
            dv: vec![f32::NAN; self.k.len()],
            accounted: [0; 2],
        };
        for (r, (out, lse, dq, dk, dv, counted)) in per_rank.into_iter().enumerate() {
            w.accounted[0] += counted[0];
            w.accounted[1] += counted[1];
            split.put(r, &out, qrow, &mut w.out);
            split.put(r, &dq, qrow, &mut w.dq);
            split.put(r, &dk, krow, &mut w.dk);
            split.put(r, &dv, krow, &mut w.dv);
            let n = split.local_tokens(r);
            for (i, &row) in split.global_rows(r).iter().enumerate() {
                for h in 0..sh.heads {
                    w.lse[h * t + row] = lse[h * n + i];
                }
            }
        }
        Ok(w)
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// Sequences from 1 token (shorter than the 2·cp chunks) to 300, the long one first.
const LENGTHS: [usize; 6] = [300, 3, 1, 57, 129, 8];

#[test]
fn ring_and_ulysses_give_the_single_rank_attention_and_gradients() {
    for (heads, kv_heads) in [(4, 4), (4, 2), (8, 2), (4, 1)] {
        let case = Arc::new(Case::new(&LENGTHS, heads, kv_heads));
        let whole = case.whole();
        for cp in [1, 2, 3, 4] {
            for exchange in [CpExchange::Ring, CpExchange::Ulysses] {
                if exchange == CpExchange::Ulysses && heads % cp != 0 {
                    continue;
                }
                let got = case.split_run(cp, exchange).unwrap();
                let what = format!("{exchange} cp{cp} heads {heads}/{kv_heads}");
                for (name, a, b) in [
                    ("out", &got.out, &whole.out),
                    ("lse", &got.lse, &whole.lse),
                    ("dq", &got.dq, &whole.dq),
                    ("dk", &got.dk, &whole.dk),
                    ("dv", &got.dv, &whole.dv),
                ] {
                    let d = max_diff(a, b);
                    assert!(d <= 1e-5, "{what}: {name} differs by {d}");
                }
            }
        }
    }
}

#[test]
fn ulysses_refuses_what_it_cannot_split_and_names_ring() {
    let case = Arc::new(Case::new(&[20, 7], 6, 3));
    let e = case
        .split_run(2, CpExchange::Ulysses)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Ulysses over 2 ranks") && e.contains("ring"),
        "{e}"
    );
    // Ring attention takes any head layout.
    let got = case.split_run(2, CpExchange::Ring).unwrap();
    assert!(max_diff(&got.out, &case.whole().out) <= 1e-5);
}

/// The bytes each rank sends (counted through `comm::Counting`, all-to-alls without the part a
/// rank keeps) are what `CpExchange::bytes_per_rank` says, for a sequence the split cuts evenly.
#[test]
fn the_exchanges_send_the_bytes_the_strategy_model_says() {
    use comm::{CommKind, Counting};
    for (heads, kv_heads, cp) in [(4, 2, 2), (8, 2, 4), (4, 4, 4), (8, 8, 2)] {
        let case = Arc::new(Case::new(&[16 * cp], heads, kv_heads));
        for exchange in [CpExchange::Ring, CpExchange::Ulysses] {
            let case = case.clone();
            let sent = ThreadComm::run(cp, move |c| {
                let me = c.rank().0;
                let counting = Counting::new(Box::new(c));
                let (split, sh) = (CpSplit::balanced(&case.cu, cp)?, case.shape);
                let x = case.rank_share(&split, me);
                let [q, k, v, _] = &x;
                let bytes = |log: &[comm::CommRecord]| -> usize {
                    log.iter()
                        .map(|r| match r.kind {
                            CommKind::AllToAll => r.bytes * (cp - 1) / cp,
                            _ => r.bytes,
                        })
                        .sum()
                };
                let attn = CpAttention::new(&counting, exchange, &split, sh, SCALE);
                let (out, lse) = attn.forward(q, k, v)?;
                let fwd = bytes(&counting.records());
                attn.backward(&saved(&x, &out, &lse))?;
                let both = bytes(&counting.records());
                Ok::<_, RuntimeError>((fwd, both - fwd))
            })
            .unwrap();
            let want = exchange.bytes_per_rank(cp, 16, heads, kv_heads, 16);
            for (r, got) in sent.iter().enumerate() {
                assert_eq!(
                    *got, want,
                    "{exchange} cp{cp} heads {heads}/{kv_heads}: rank {r}"
                );
            }
        }
    }
}

/// Tallies the blocks of host attention it runs: (query, key) pairs × query heads, forward
/// and backward apart.
#[derive(Default)]
struct Tally(std::sync::Mutex<[usize; 2]>);

impl runtime::context::HostAttention for Tally {
    fn run(
        &self,
        spans: &[kernels::HostSpan],
        shape: AttnShape,
        backward: bool,
        work: &mut dyn FnMut() -> kernels::Result<()>,
    ) -> kernels::Result<()> {
        let pairs: usize = spans.iter().map(|s| s.pairs).sum();
        self.0.lock().unwrap()[usize::from(backward)] += pairs * shape.heads;
        work()
    }
}

/// Every rank's blocks go through its `HostAttention` (what the simulator's clock charges):
/// over the group, every causal pair of every query head once in the forward and once in the
/// backward, by ring and by Ulysses.
#[test]
fn every_block_of_attention_is_accounted_once() {
    let case = Arc::new(Case::new(&[37, 5, 120, 1, 64], 4, 2));
    let causal: usize = case
        .cu
        .windows(2)
        .map(|w| (w[1] - w[0]) * (w[1] - w[0] + 1) / 2)
        .sum();
    for (cp, exchange) in [
        (2, CpExchange::Ring),
        (4, CpExchange::Ring),
        (2, CpExchange::Ulysses),
    ] {
        let got = case.split_run(cp, exchange).unwrap();
        let want = causal * case.shape.heads;
        assert_eq!(got.accounted, [want, want], "cp{cp} {exchange:?}");
    }
}
