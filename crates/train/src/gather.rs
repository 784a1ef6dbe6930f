//! Every rank's pieces collected on world rank 0 through the communicator, so that checkpoints
//! and the final weights are written by one process whether the ranks are threads or MPI
//! processes.

use comm::{tags, words, Communicator, Rank};

use crate::error::{Result, TrainError};

/// Lists of tensors (e.g. the weights and the two moments of one rank).
pub type Sets = Vec<Vec<Vec<f32>>>;

/// Sends this rank's `sets` to world rank 0; rank 0 gets every rank's, in rank order (its own
/// first), and the others `None`.
///
/// Each rank sends a header of exact integers (the number of sets, then per set the number of
/// tensors and each tensor's length) and then every value in one message.
pub fn to_root(world: &dyn Communicator, sets: Sets) -> Result<Option<Vec<Sets>>> {
    if world.rank().0 != 0 {
        let mut header = vec![sets.len() as u64];
        for set in &sets {
            header.push(set.len() as u64);
            header.extend(set.iter().map(|t| t.len() as u64));
        }
        let data: Vec<f32> = sets.iter().flatten().flatten().copied().collect();
        words::send(world, &[header.len() as u64], Rank(0), tags::GATHER_HEADER)?;
        words::send(world, &header, Rank(0), tags::GATHER_HEADER)?;
        world.send(&data, Rank(0), tags::GATHER_DATA)?;
        return Ok(None);
    }
    let mut all = vec![sets];
    for r in 1..world.size() {
        let peer = Rank(r);
        let n = words::recv(world, 1, peer, tags::GATHER_HEADER)?[0] as usize;
        let header = words::recv(world, n, peer, tags::GATHER_HEADER)?;
        let bad = || TrainError::Rank {
            rank: r,
            reason: format!("sent a malformed header of its pieces: {header:?}"),
        };
        let mut it = header.iter().map(|&x| x as usize);
        let n_sets = it.next().ok_or_else(bad)?;
        let mut shapes = Vec::with_capacity(n_sets);
        for _ in 0..n_sets {
            let n = it.next().ok_or_else(bad)?;
            let lens: Vec<usize> = it.by_ref().take(n).collect();
            if lens.len() != n {
                return Err(bad());
            }
            shapes.push(lens);
        }
        let total: usize = shapes.iter().flatten().sum();
        let mut data = vec![0f32; total];
        world.recv(&mut data, peer, tags::GATHER_DATA)?;
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

/// Named vectors as one set: the names (their UTF-8 bytes, one value each, `\n` between) first,
/// then the vectors.
pub fn named_to_set(named: Vec<(String, Vec<f32>)>) -> Vec<Vec<f32>> {
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let header = names.join("\n").bytes().map(f32::from).collect();
    let mut set = vec![header];
    set.extend(named.into_iter().map(|(_, v)| v));
    set
}

/// The inverse of [`named_to_set`].
pub fn set_to_named(mut set: Vec<Vec<f32>>) -> Result<Vec<(String, Vec<f32>)>> {
    if set.is_empty() {
        return Ok(Vec::new());
    }
    let header = set.remove(0);
    let bytes: Vec<u8> = header.iter().map(|&b| b as u8).collect();
    let text = String::from_utf8(bytes).map_err(|e| TrainError::Rank {
        rank: 0,
        reason: format!("sent state names that are not UTF-8: {e}"),
    })?;
    let names: Vec<String> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('\n').map(str::to_string).collect()
    };
    if names.len() != set.len() {
        return Err(TrainError::Rank {
            rank: 0,
            reason: format!("sent {} state names for {} vectors", names.len(), set.len()),
        });
    }
    Ok(names.into_iter().zip(set).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm::{CommError, ThreadComm};

    #[test]
    fn named_vectors_travel_as_a_set() {
        let named = vec![
            ("a/0/worker".to_string(), vec![1.0, -2.0]),
            ("b".to_string(), vec![]),
        ];
        assert_eq!(set_to_named(named_to_set(named.clone())).unwrap(), named);
        assert!(set_to_named(named_to_set(Vec::new())).unwrap().is_empty());
    }

    #[test]
    fn rank_zero_gets_every_ranks_sets_in_order() {
        let out = ThreadComm::run(3, |c| -> std::result::Result<_, CommError> {
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
