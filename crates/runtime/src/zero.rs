//! ZeRO's flat chunks, for whoever moves whole pieces in and out of a strategy (hot switching):
//! a rank of a ZeRO-3 strategy binds its `1/replicas` flat chunk of every parameter piece, a
//! ZeRO-2/3 step leaves it the chunk of every gradient piece, and an optimizer under ZeRO-2/3
//! takes its chunk of a gradient. The chunk rule is [`dstate::chunk`] over the strategy's data
//! replicas (DP × CP), as the optimizer and the reducer use it.

use graph::{Strategy, Zero};
use kernels::Backend;

use crate::error::Result;
use crate::parallel::RankGroups;

/// Member `rank` (of `s`'s own ranks) of `s`'s data replicas: its index among them.
fn replica_index(s: &Strategy, rank: usize) -> usize {
    s.coords(rank).1
}

/// `whole` (a rank's whole local pieces of every parameter) bound as rank `rank` of `s` binds
/// its parameters: under ZeRO-3 its flat chunk of each, else each whole.
pub fn bind_params<B: Backend>(
    backend: &B,
    s: &Strategy,
    rank: usize,
    whole: &[Vec<f32>],
) -> Result<Vec<B::Buffer>> {
    let d = replica_index(s, rank);
    Ok(whole
        .iter()
        .map(|x| {
            if s.zero >= Zero::Parameters {
                backend.upload(&x[dstate::chunk(0..x.len(), s.replicas(), d)])
            } else {
                backend.upload(x)
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// `grads` as a ZeRO-2/3 step of `s` leaves them (each this rank's flat chunk of the piece whose
/// whole length is `lens[k]`) gathered over `groups`' DP group into whole pieces; unchanged
/// under ZeRO-0/1, where they are whole already.
pub fn whole_grads(
    s: &Strategy,
    groups: &RankGroups,
    grads: &mut [Vec<f32>],
    lens: &[usize],
) -> Result<()> {
    if s.zero < Zero::Gradients {
        return Ok(());
    }
    for (g, &len) in grads.iter_mut().zip(lens) {
        let counts = comm::chunk_counts(len, s.replicas());
        let mut whole = vec![0.0; len];
        groups.dp.all_gather(g, &mut whole, &counts)?;
        *g = whole;
    }
    Ok(())
}

/// Whole gradient pieces handed to the optimizer of `s` on its rank `rank`: under ZeRO-2/3 its
/// flat chunk of each, else each whole (adopted without a copy where the backend allows).
pub fn optimizer_grads<B: Backend>(
    backend: &B,
    s: &Strategy,
    rank: usize,
    whole: Vec<Vec<f32>>,
) -> Result<Vec<B::Buffer>> {
    let d = replica_index(s, rank);
    whole
        .into_iter()
        .map(|g| {
            if s.zero >= Zero::Gradients {
                Ok(backend.upload(&g[dstate::chunk(0..g.len(), s.replicas(), d)])?)
            } else {
                crate::host::adopt(backend, g)
            }
        })
        .collect()
}
