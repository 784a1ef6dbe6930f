//! What the runtime's multi-rank tests share: a tiny LLaMA (vocabulary 23, hidden 16, MLP 22,
//! 4 heads: none a multiple of every TP degree) and long-tailed token sequences.

#![allow(dead_code)]

use std::path::Path;

use comm::Communicator;
use graph::{ExecGraph, Strategy};
use kernels::{AdamW, CpuBackend};
use model::{rank_exec, rank_params, Held, LlamaConfig, RankParams, Weights};
use runtime::MicroBatch;
use runtime::{Optimizer, RankGroups};

/// The tiny LLaMA with `layers` layers, `kv` KV heads, tied embeddings or not, and RMSNorm's
/// epsilon (`None`: HF's default).
pub fn config(layers: usize, kv: usize, tied: bool, eps: Option<f64>) -> LlamaConfig {
    let eps = eps.map_or(String::new(), |e| format!(r#", "rms_norm_eps": {e:e}"#));
    let json = format!(
        r#"{{"vocab_size": 23, "hidden_size": 16, "intermediate_size": 22,
            "num_hidden_layers": {layers}, "num_attention_heads": 4, "num_key_value_heads": {kv},
            "tie_word_embeddings": {tied}{eps}}}"#
    );
    LlamaConfig::from_json(&json, Path::new("test")).unwrap()
}

/// Sequences of `lens` tokens (ids below 23), varied by `salt`.
pub fn sequences(lens: &[usize], salt: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((i * 7 + k * 5 + salt * 11 + i * i) % 23) as u32)
                .collect()
        })
        .collect()
}

/// The micro-batches of DP replica `d` of `dp`: `seqs` dealt round-robin, packed two by two.
pub fn micro_batches(seqs: &[Vec<u32>], dp: usize, d: usize, scale: f32) -> Vec<MicroBatch> {
    let mine: Vec<Vec<u32>> = seqs.iter().skip(d).step_by(dp).cloned().collect();
    mine.chunks(2)
        .map(|c| MicroBatch::pack(c, scale).unwrap())
        .collect()
}

/// [`micro_batches`] of the global batch `seqs`, each loss scaled by the batch's predicted
/// tokens (DESIGN §3).
pub fn replica_batches(seqs: &[Vec<u32>], dp: usize, d: usize) -> Vec<MicroBatch> {
    let predicted: usize = seqs.iter().map(|q| q.len() - 1).sum();
    micro_batches(seqs, dp, d, 1.0 / predicted as f32)
}

/// The largest absolute difference between `got` and `want`, and the largest `|want|`.
pub fn worst(got: &[f32], want: &[f32]) -> (f32, f32) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (worst, scale)
}

/// The AdamW the optimizer tests train with: lr 1e-2, β2 0.95, weight decay 0.1, the rest
/// AdamW's defaults (β1 0.9, ε 1e-8).
pub fn adamw() -> AdamW {
    AdamW {
        lr: 1e-2,
        beta2: 0.95,
        weight_decay: 0.1,
        ..AdamW::default()
    }
}

/// What a thread rank's closure returns.
pub type RankResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One thread rank of a test run: where it sits in the strategy, its exec graph, groups and
/// backend, and its pieces of the weights.
pub struct RankSetup {
    pub me: usize,
    pub dp_rank: usize,
    pub tp_rank: usize,
    pub exec: ExecGraph,
    pub groups: RankGroups,
    pub cpu: CpuBackend,
    pub params: Vec<Vec<f32>>,
    pub shared: Vec<bool>,
    pub held: Held,
}

/// Rank `world.rank()` of `strategy` on `cfg`, holding its pieces of `weights`.
pub fn rank_setup(
    world: &dyn Communicator,
    cfg: &LlamaConfig,
    strategy: &Strategy,
    weights: &Weights,
) -> RankResult<RankSetup> {
    let me = world.rank().0;
    let (_, dp_rank, tp_rank) = strategy.coords(me);
    let exec = rank_exec(cfg, strategy, me)?;
    let groups = RankGroups::new(world, strategy)?;
    let RankParams {
        params,
        shared,
        held,
    } = rank_params(cfg, &exec, weights, tp_rank)?;
    Ok(RankSetup {
        me,
        dp_rank,
        tp_rank,
        exec,
        groups,
        cpu: CpuBackend::new(1)?,
        params,
        shared,
        held,
    })
}

impl RankSetup {
    /// [`adamw`] over this rank's pieces (moved out of `params`), clipping at `clip`.
    pub fn optimizer(&mut self, clip: f64) -> RankResult<Optimizer<CpuBackend>> {
        let params = std::mem::take(&mut self.params);
        Ok(Optimizer::new(
            &self.cpu,
            &self.exec,
            &self.groups,
            params,
            &self.shared,
            adamw(),
            clip,
        )?)
    }
}

/// What a rank hands back to [`on_ranks`]: its pieces of the weights, what it holds of them,
/// and what else the test keeps.
pub type RankOut<T> = (Vec<Vec<f32>>, Held, T);

/// Runs `body` on every rank of `spec` over `devices` thread ranks, each with its
/// [`RankSetup`] of `cfg` from the weights seed 9 draws; returns the global weights gathered
/// from the ranks' pieces and what each rank kept, rank by rank.
pub fn on_ranks<T, F>(
    cfg: &LlamaConfig,
    spec: &str,
    devices: usize,
    body: F,
) -> (Vec<Vec<f32>>, Vec<T>)
where
    T: Send + 'static,
    F: Fn(&dyn Communicator, &Strategy, RankSetup) -> RankResult<RankOut<T>>
        + Send
        + Sync
        + 'static,
{
    let weights = std::sync::Arc::new(Weights::random(cfg, 9));
    let strategy = Strategy::parse(spec, devices).unwrap();
    let (c2, s2) = (cfg.clone(), strategy.clone());
    let results = comm::ThreadComm::run(devices, move |world| -> RankResult<RankOut<T>> {
        let r = rank_setup(&world, &c2, &s2, &weights)?;
        body(&world, &s2, r)
    })
    .unwrap_or_else(|e| panic!("{spec}: {e}"));
    let (per_rank, kept): (Vec<_>, Vec<_>) = results
        .into_iter()
        .map(|(params, held, t)| ((params, held), t))
        .unzip();
    let out = model::gather_weights(cfg, &strategy, &per_rank)
        .unwrap()
        .tensors()
        .to_vec();
    (out, kept)
}

impl RankSetup {
    /// One step's 1F1B passes of `mbs` over `params` (this rank's pieces, or a view of them).
    pub fn pass<'p>(
        &mut self,
        params: impl Into<runtime::ParamView<'p, CpuBackend>>,
        mbs: &[MicroBatch],
    ) -> runtime::Result<runtime::StepGradients<CpuBackend>> {
        runtime::pipeline_step(
            &self.cpu,
            &self.exec,
            &mut self.groups,
            params,
            &self.shared,
            mbs,
            graph::Schedule::OneFOneB,
        )
    }
}
