//! Every rank's pieces collected on world rank 0 through the communicator, so that checkpoints
//! and the final weights are written by one process whether the ranks are threads or MPI
//! processes.

use anyhow::{ensure, Context, Result};
use comm::{Communicator, Rank};

/// Tags of the two messages each rank sends to rank 0 (above the pipeline's tags).
const TAG_HEADER: u32 = 32000;
const TAG_DATA: u32 = 32001;

/// A length as two exact f32 halves (f32 holds integers up to 2^24 exactly).
fn encode(n: usize, out: &mut Vec<f32>) {
    out.push((n >> 16) as f32);
    out.push((n & 0xffff) as f32);
}

fn decode(h: &[f32]) -> usize {
    ((h[0] as usize) << 16) | h[1] as usize
}

/// Lists of tensors (e.g. the weights and the two moments of one rank).
pub type Sets = Vec<Vec<Vec<f32>>>;

/// Sends this rank's `sets` to world rank 0; rank 0 gets every rank's, in rank order (its own
/// first), and the others `None`.
pub fn to_root(world: &dyn Communicator, sets: Sets) -> Result<Option<Vec<Sets>>> {
    let me = world.rank().0;
    if me != 0 {
        let mut header = Vec::new();
        encode(sets.len(), &mut header);
        for set in &sets {
            encode(set.len(), &mut header);
            for t in set {
                encode(t.len(), &mut header);
            }
        }
        let data: Vec<f32> = sets.iter().flatten().flatten().copied().collect();
        let mut len = Vec::new();
        encode(header.len(), &mut len);
        world.send(&len, Rank(0), TAG_HEADER)?;
        world.send(&header, Rank(0), TAG_HEADER)?;
        world.send(&data, Rank(0), TAG_DATA)?;
        return Ok(None);
    }
    let mut all = vec![sets];
    for r in 1..world.size() {
        let ctx = || format!("collecting rank {r}'s pieces on rank 0");
        let mut len = [0f32; 2];
        world
            .recv(&mut len, Rank(r), TAG_HEADER)
            .with_context(ctx)?;
        let mut header = vec![0f32; decode(&len)];
        world
            .recv(&mut header, Rank(r), TAG_HEADER)
            .with_context(ctx)?;
        ensure!(header.len() >= 2, "rank {r} sent an empty header");
        let mut at = 0;
        let mut next = |h: &[f32]| -> Result<usize> {
            ensure!(at + 2 <= h.len(), "rank {r} sent a truncated header");
            let v = decode(&h[at..at + 2]);
            at += 2;
            Ok(v)
        };
        let n_sets = next(&header)?;
        let mut shapes = Vec::with_capacity(n_sets);
        for _ in 0..n_sets {
            let n = next(&header)?;
            let lens = (0..n).map(|_| next(&header)).collect::<Result<Vec<_>>>()?;
            shapes.push(lens);
        }
        let total: usize = shapes.iter().flatten().sum();
        let mut data = vec![0f32; total];
        world.recv(&mut data, Rank(r), TAG_DATA).with_context(ctx)?;
        let mut off = 0;
        let sets = shapes
            .into_iter()
            .map(|lens| {
                lens.into_iter()
                    .map(|n| {
                        let t = data[off..off + n].to_vec();
                        off += n;
                        t
                    })
                    .collect()
            })
            .collect();
        all.push(sets);
    }
    Ok(Some(all))
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm::{CommError, ThreadComm};

    #[test]
    fn rank_zero_gets_every_ranks_sets_in_order() {
        let out = ThreadComm::run(3, |c| -> Result<_, CommError> {
            let r = c.rank().0;
            let sets = vec![
                vec![vec![r as f32; r + 1], vec![]],
                vec![vec![-(r as f32); 70_000 * r]],
            ];
            to_root(&c, sets).map_err(|e| CommError::Unavailable(e.to_string()))
        })
        .unwrap();
        let all = out[0].as_ref().unwrap();
        assert!(out[1].is_none() && out[2].is_none());
        for (r, sets) in all.iter().enumerate() {
            assert_eq!(sets[0][0], vec![r as f32; r + 1]);
            assert!(sets[0][1].is_empty());
            assert_eq!(sets[1][0].len(), 70_000 * r);
        }
    }
}
