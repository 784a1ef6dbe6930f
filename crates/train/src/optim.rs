//! The optimizer a rank starts with: its pieces of the weights, on its backend, under the run's
//! AdamW and clipping.

use graph::ExecGraph;
use kernels::Backend;
use model::{rank_params, RankParams, Weights};
use runtime::{Optimizer, RankGroups};

use crate::config::TrainConfig;
use crate::error::Result;

/// The optimizer of `exec` (this rank's exec graph) over `groups`, holding TP rank `tp_rank`'s
/// pieces of `weights` uploaded to `be`; and those pieces on the host.
pub(crate) fn start<B: Backend>(
    cfg: &TrainConfig,
    be: &B,
    exec: &ExecGraph,
    groups: &RankGroups,
    weights: &Weights,
    tp_rank: usize,
) -> Result<(Optimizer<B>, RankParams)> {
    let rp = rank_params(&cfg.model, exec, weights, tp_rank)?;
    let params = rp
        .params
        .iter()
        .map(|p| be.upload(p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let opt = Optimizer::new(
        be,
        exec,
        groups,
        params,
        &rp.shared,
        cfg.adamw(),
        cfg.global_clip(),
    )?;
    Ok((opt, rp))
}
