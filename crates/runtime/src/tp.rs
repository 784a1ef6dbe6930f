//! A rank's TP group with its sub-groups, and the collectives of comm ops on row-major pieces.

use std::collections::HashMap;

use comm::{Communicator, Rank, ReduceOp};
use dstate::{extract, insert, Collective, DState, Region};
use graph::CpExchange;

use crate::error::{Result, RuntimeError};

/// This rank's tensor-parallel group and the sub-groups along the axes of multi-axis DStates.
pub struct TpGroup {
    comm: Box<dyn Communicator>,
    subs: HashMap<Vec<usize>, Box<dyn Communicator>>,
    /// A handle on the DP group for ZeRO-3 parameter gathers.
    dp: Option<Box<dyn Communicator>>,
    /// The CP group, whose ranks split the micro-batches' tokens, and how its attention
    /// exchanges keys and values.
    cp: Option<(Box<dyn Communicator>, CpExchange)>,
}

impl TpGroup {
    /// Wraps the communicator of the TP group (its rank is the TP rank).
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        Self {
            comm,
            subs: HashMap::new(),
            dp: None,
            cp: None,
        }
    }

    /// Adds the CP group that attention's exchange runs on.
    pub fn with_cp(mut self, cp: Box<dyn Communicator>, exchange: CpExchange) -> Self {
        self.cp = Some((cp, exchange));
        self
    }

    /// The CP group and its exchange (`None` without context parallelism).
    pub fn cp(&self) -> Option<(&dyn Communicator, CpExchange)> {
        self.cp.as_ref().map(|(c, x)| (c.as_ref(), *x))
    }

    /// Adds the DP group handle ZeRO-3 parameter gathers run on.
    pub fn with_dp(mut self, dp: Box<dyn Communicator>) -> Self {
        self.dp = Some(dp);
        self
    }

    /// This rank's index in the DP group and the DP size (0 of 1 without a DP handle).
    pub fn dp_position(&self) -> (usize, usize) {
        self.dp.as_ref().map_or((0, 1), |d| (d.rank().0, d.size()))
    }

    /// ZeRO-3: all-gathers the flat chunks of a piece over DP into `out` (the whole piece).
    pub fn gather_param(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let dp = self.dp.as_ref().ok_or_else(|| {
            RuntimeError::Binding("a ZeRO-3 parameter gather without a DP group".into())
        })?;
        let counts = comm::chunk_counts(out.len(), dp.size());
        dp.all_gather(shard, out, &counts)?;
        Ok(())
    }

    /// This rank's index in the TP group.
    pub fn rank(&self) -> usize {
        self.comm.rank().0
    }

    /// The whole TP group.
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// The members (TP ranks) that differ from this rank only along `axis` of `state`.
    fn members(&self, state: &DState, axis: usize) -> Result<Vec<usize>> {
        let coords = state.coords(self.rank())?;
        Ok((0..state.axes()[axis].degree)
            .map(|j| {
                let mut c = coords.clone();
                c[axis] = j;
                state.index_of(&c)
            })
            .collect())
    }

    fn sub(&mut self, members: &[usize]) -> Result<&dyn Communicator> {
        if members.len() == self.comm.size() && members.iter().enumerate().all(|(i, &m)| i == m) {
            return Ok(self.comm.as_ref());
        }
        if !self.subs.contains_key(members) {
            let ranks: Vec<Rank> = members.iter().map(|&m| Rank(m)).collect();
            let c = self.comm.sub_group(&ranks)?;
            self.subs.insert(members.to_vec(), c);
        }
        Ok(self.subs[members].as_ref())
    }

    /// Moves this rank's piece `local` of a tensor of `shape` from `from` to `to` by
    /// `collective` along `axis`, writing every value of the new local piece `out`.
    #[allow(clippy::too_many_arguments)] // a comm op (five fields) and its two buffers
    pub fn apply(
        &mut self,
        collective: Collective,
        axis: usize,
        from: &DState,
        to: &DState,
        shape: &[usize],
        local: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let me = self.rank();
        let members = self.members(from, axis)?;
        let pos = members.iter().position(|&m| m == me).unwrap_or(0);
        let mine_from = from.piece(me, shape)?.region;
        let mine_to = to.piece(me, shape)?.region;
        let want = mine_to.volume();
        if out.len() != want {
            return Err(RuntimeError::Binding(format!(
                "a {collective:?} comm op writes {want} values into a buffer of {}",
                out.len()
            )));
        }
        match collective {
            Collective::Identity => {
                out.copy_from_slice(local);
                Ok(())
            }
            Collective::AllReduce => {
                // The output is a buffer of its own (the input may be read again): the values
                // go into it, and the reduction runs there.
                out.copy_from_slice(local);
                Ok(self.sub(&members)?.all_reduce(out, ReduceOp::Sum)?)
            }
            Collective::AllGather { .. } => {
                let (regions, counts) = pieces_of(from, &members, shape)?;
                // Pieces along the leading dim land where they belong: gathered straight into
                // the output; others are gathered, then placed.
                let contiguous = stacked(&regions, &mine_to);
                if contiguous {
                    return Ok(self.sub(&members)?.all_gather(local, out, &counts)?);
                }
                let mut gathered = vec![0.0; counts.iter().sum()];
                self.sub(&members)?
                    .all_gather(local, &mut gathered, &counts)?;
                let out_shape = mine_to.shape();
                let mut off = 0;
                for (r, n) in regions.iter().zip(&counts) {
                    insert(
                        out,
                        &out_shape,
                        &r.relative_to(&mine_to),
                        &gathered[off..off + n],
                    )?;
                    off += n;
                }
                Ok(())
            }
            Collective::ReduceScatter { .. } => {
                let (regions, counts) = pieces_of(to, &members, shape)?;
                // Pieces along the leading dim are sent as they lie; others are laid out in
                // member order first.
                let laid_out;
                let send: &[f32] = if stacked(&regions, &mine_from) {
                    local
                } else {
                    let in_shape = mine_from.shape();
                    let mut v = Vec::with_capacity(local.len());
                    for r in &regions {
                        v.extend(extract(local, &in_shape, &r.relative_to(&mine_from))?);
                    }
                    laid_out = v;
                    &laid_out
                };
                if counts.get(pos) != Some(&out.len()) {
                    return Err(RuntimeError::Binding(format!(
                        "a reduce-scatter gives this rank {:?} values, its piece holds {}",
                        counts.get(pos),
                        out.len()
                    )));
                }
                Ok(self
                    .sub(&members)?
                    .reduce_scatter(send, out, &counts, ReduceOp::Sum)?)
            }
            Collective::LocalSlice { .. } => {
                let part = extract(local, &mine_from.shape(), &mine_to.relative_to(&mine_from))?;
                out.copy_from_slice(&part);
                Ok(())
            }
            Collective::LocalZero => {
                if pos == 0 {
                    out.copy_from_slice(local);
                } else {
                    out.fill(0.0);
                }
                Ok(())
            }
            Collective::AllToAll { .. } => Err(RuntimeError::Binding(
                "all-to-all comm ops are not executed yet (no strategy needs them so far)".into(),
            )),
        }
    }
}

/// The regions of `members`' pieces of a tensor of `shape` under `state`, and their sizes.
fn pieces_of(
    state: &DState,
    members: &[usize],
    shape: &[usize],
) -> Result<(Vec<Region>, Vec<usize>)> {
    let regions: Vec<Region> = members
        .iter()
        .map(|&m| state.piece(m, shape).map(|p| p.region))
        .collect::<std::result::Result<_, _>>()?;
    let counts = regions.iter().map(|r| r.volume()).collect();
    Ok((regions, counts))
}

/// Whether `regions`, in order, tile `whole` along its leading dim (each spanning every other
/// dim of it): their row-major values, one after another, are `whole`'s.
fn stacked(regions: &[Region], whole: &Region) -> bool {
    let rest_equal = |r: &Region| {
        r.ranges
            .iter()
            .zip(&whole.ranges)
            .skip(1)
            .all(|(a, b)| a == b)
    };
    let (Some(first), Some(last)) = (regions.first(), regions.last()) else {
        return false;
    };
    let lead = |r: &Region| r.ranges.first().cloned();
    regions
        .iter()
        .all(|r| r.ranges.len() == whole.ranges.len() && rest_equal(r))
        && lead(first).map(|a| a.start) == lead(whole).map(|a| a.start)
        && lead(last).map(|a| a.end) == lead(whole).map(|a| a.end)
        && regions
            .windows(2)
            .all(|w| lead(&w[0]).map(|a| a.end) == lead(&w[1]).map(|a| a.start))
}
