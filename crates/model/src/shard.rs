//! Moving whole-model weights to and from the pieces each rank holds under a strategy.

use dstate::{DState, Distribution};
use graph::{ExecGraph, GraphError, Strategy};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::params::param_specs;
use crate::weights::Weights;

/// For each parameter a rank holds: its index in [`param_specs`] and its DState over the TP group.
pub type Held = Vec<(usize, DState)>;

/// One rank's parameters for its exec graph, in `exec.graph.params` order.
#[derive(Debug, Clone)]
pub struct RankParams {
    /// This TP rank's piece of every parameter.
    pub params: Vec<Vec<f32>>,
    /// Whether each is a tied embedding held by the first and the last pipeline stage.
    pub shared: Vec<bool>,
    /// For each: its index in [`param_specs`] and its DState over the TP group.
    pub held: Held,
}

/// The pieces TP rank `tp_rank` holds of `weights` under `exec` (one stage's exec graph), in
/// the graph's storage layout.
pub fn rank_params(
    cfg: &LlamaConfig,
    exec: &ExecGraph,
    weights: &Weights,
    tp_rank: usize,
) -> Result<RankParams> {
    let specs = param_specs(cfg);
    let mut out = RankParams {
        params: Vec::new(),
        shared: Vec::new(),
        held: Vec::new(),
    };
    for &p in &exec.graph.params {
        let name = &exec.graph.info(p).name;
        let k = specs.iter().position(|s| &s.name == name).ok_or_else(|| {
            ModelError::Mismatch(format!("the graph's parameter {name} is not in the config"))
        })?;
        let state = &exec.states[p.0];
        let stored = specs[k].to_stored(&weights.tensors()[k]);
        let mut pieces = dstate::distribute(&stored, &specs[k].stored_shape(), state)
            .map_err(|e| ModelError::Mismatch(format!("{name}: {e}")))?;
        if tp_rank >= pieces.len() {
            return Err(ModelError::Mismatch(format!(
                "TP rank {tp_rank} of {}",
                pieces.len()
            )));
        }
        out.params.push(pieces.swap_remove(tp_rank));
        out.shared
            .push(cfg.tie_word_embeddings && name == "model.embed_tokens.weight");
        out.held.push((k, state.clone()));
    }
    Ok(out)
}

/// What a rank running `exec` (one stage's exec graph) holds: for each of its parameters, the
/// index in [`param_specs`] and the DState over the TP group (as in [`RankParams::held`]).
pub fn held(cfg: &LlamaConfig, exec: &ExecGraph) -> Result<Held> {
    let specs = param_specs(cfg);
    exec.graph
        .params
        .iter()
        .map(|&p| {
            let name = &exec.graph.info(p).name;
            let k = specs.iter().position(|s| &s.name == name).ok_or_else(|| {
                ModelError::Mismatch(format!("the graph's parameter {name} is not in the config"))
            })?;
            Ok((k, exec.states[p.0].clone()))
        })
        .collect()
}

/// Reassembles whole weights (HF layout) from the ranks' pieces (storage layout): `per_rank[r]` is world rank `r`'s
/// `(pieces, held)` (as in [`RankParams`]); DP replica 0 of every stage is read.
pub fn gather_weights(
    cfg: &LlamaConfig,
    strategy: &Strategy,
    per_rank: &[(Vec<Vec<f32>>, Held)],
) -> Result<Weights> {
    let specs = param_specs(cfg);
    let mut tensors = vec![Vec::new(); specs.len()];
    for (k, spec) in specs.iter().enumerate() {
        let mut found = false;
        for stage in 0..strategy.pp {
            let ranks: Vec<usize> = (0..strategy.tp)
                .map(|t| strategy.rank_of(stage, 0, t))
                .collect();
            let Some((_, held)) = per_rank.get(ranks[0]) else {
                continue;
            };
            if let Some(j) = held.iter().position(|(kk, _)| *kk == k) {
                let locals: Vec<Vec<f32>> = ranks
                    .iter()
                    .map(|&r| {
                        per_rank
                            .get(r)
                            .and_then(|x| x.0.get(j))
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect();
                let stored = dstate::assemble(&locals, &spec.stored_shape(), &held[j].1)
                    .map_err(|e| ModelError::Mismatch(format!("{}: {e}", spec.name)))?;
                tensors[k] = spec.from_stored(stored);
                found = true;
                break;
            }
        }
        if !found {
            return Err(ModelError::Mismatch(format!("no rank holds {}", spec.name)));
        }
    }
    Weights::new(cfg, tensors)
}

/// Builds, differentiates and lowers the exec graph of world rank `rank`'s pipeline stage.
pub fn rank_exec(
    cfg: &LlamaConfig,
    strategy: &Strategy,
    rank: usize,
) -> std::result::Result<ExecGraph, GraphError> {
    let (stage, _, _) = strategy.coords(rank);
    let layers = strategy.stage_layers(cfg.num_hidden_layers)?;
    let mut g = crate::decoder::build_stage_graph(
        cfg,
        layers[stage].clone(),
        stage == 0,
        stage + 1 == strategy.pp,
    )?;
    graph::backward(&mut g)?;
    graph::lower(&g, strategy)
}

/// Where every parameter lives under `strategy` on the world's devices (rank r = device r):
/// `(name, stored shape, distribution)` in the order of [`param_specs`] (row-parallel weights
/// transposed, as the training graph stores them: see [`crate::ParamSpec::storage`]). A parameter of stage `p` is
/// replicated over its stage's `dp · cp` replicas and laid out over each replica's TP group as
/// the exec graph has it: the distribution is `[D×dp·cp] ++ TP axes` over ranks `p·dp·cp·tp ..`.
/// Fails for a tied embedding split across pipeline stages (two groups at once).
pub fn placements(
    cfg: &LlamaConfig,
    strategy: &Strategy,
) -> Result<Vec<(String, Vec<usize>, dstate::Distribution)>> {
    let specs = param_specs(cfg);
    let mut found: Vec<Option<dstate::Distribution>> = vec![None; specs.len()];
    let per_stage = strategy.replicas() * strategy.tp;
    let graph_err = |e: GraphError| ModelError::Mismatch(e.to_string());
    let state_err = |e: dstate::DStateError| ModelError::Mismatch(e.to_string());
    for stage in 0..strategy.pp {
        let exec = rank_exec(cfg, strategy, strategy.rank_of(stage, 0, 0)).map_err(graph_err)?;
        let group = dstate::DeviceGroup::range(stage * per_stage, per_stage).map_err(state_err)?;
        for &p in &exec.graph.params {
            let name = &exec.graph.info(p).name;
            let k = specs.iter().position(|s| &s.name == name).ok_or_else(|| {
                ModelError::Mismatch(format!("the graph's parameter {name} is not in the config"))
            })?;
            let mut axes = Vec::new();
            if strategy.replicas() > 1 {
                axes.push(dstate::Axis::dup(strategy.replicas()));
            }
            axes.extend(exec.states[p.0].axes().iter().copied());
            let dist =
                dstate::Distribution::new(group.clone(), DState::new(axes).map_err(state_err)?)
                    .map_err(state_err)?;
            if found[k].replace(dist).is_some() {
                return Err(ModelError::Mismatch(format!(
                    "{name} is held by two pipeline stages (tied embeddings): not supported here"
                )));
            }
        }
    }
    specs
        .iter()
        .zip(found)
        .map(|(s, d)| {
            let d = d.ok_or_else(|| ModelError::Mismatch(format!("{} is on no stage", s.name)))?;
            Ok((s.name.clone(), s.stored_shape(), d))
        })
        .collect()
}

/// [`placements`] of `s` running on devices `offset..offset + s.devices()` (a concurrent
/// group's strategy).
pub fn placements_at(
    cfg: &LlamaConfig,
    s: &Strategy,
    offset: usize,
) -> Result<Vec<(String, Vec<usize>, Distribution)>> {
    let mut out = placements(cfg, s)?;
    if offset > 0 {
        for (name, _, d) in &mut out {
            let devices = d
                .group()
                .devices()
                .iter()
                .map(|x| dstate::DeviceId(x.0 + offset))
                .collect();
            let bad = |e: dstate::DStateError| ModelError::Mismatch(format!("{name}: {e}"));
            let group = dstate::DeviceGroup::new(devices).map_err(bad)?;
            *d = Distribution::new(group, d.state().clone()).map_err(bad)?;
        }
    }
    Ok(out)
}

/// The parameters' move from `from`'s layout to `to`'s: every parameter with its stored shape and
/// both distributions ([`placements`]), ready for the switch planner.
pub fn switch_tensors(
    cfg: &LlamaConfig,
    from: &Strategy,
    to: &Strategy,
) -> Result<Vec<switch::TensorSwitch>> {
    switch_tensors_at(cfg, (from, 0), (to, 0))
}

/// [`switch_tensors`] between strategies on devices from the given offsets ([`placements_at`]).
pub fn switch_tensors_at(
    cfg: &LlamaConfig,
    (from, from_offset): (&Strategy, usize),
    (to, to_offset): (&Strategy, usize),
) -> Result<Vec<switch::TensorSwitch>> {
    let a = placements_at(cfg, from, from_offset)?;
    let b = placements_at(cfg, to, to_offset)?;
    Ok(a.into_iter()
        .zip(b)
        .map(|((name, shape, src), (_, _, dst))| switch::TensorSwitch {
            name,
            shape,
            src,
            dst,
        })
        .collect())
}
