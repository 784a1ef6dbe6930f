//! Running a plan on the ranks of a communicator: local copies, then one fused buffer per
//! (sender, receiver) pair, all exchanged in one batched group.

use std::collections::BTreeMap;

use comm::{Communicator, Exposed, P2p, Rank};
use dstate::{copy_region_with, extract, extract_into, insert, DeviceId, Distribution, Region};

use crate::error::{Result, SwitchError};
use crate::plan::{Plan, TensorSwitch};

/// What one rank holds of each tensor: its piece's region and values (row-major).
pub type Pieces = Vec<Option<(Region, Vec<f32>)>>;

/// The piece of every tensor that device `me` holds under `which` (its source or destination
/// distribution), filled by `fill(tensor index, region)`.
fn pieces(
    plan: &Plan,
    me: DeviceId,
    which: impl Fn(&TensorSwitch) -> &Distribution,
    mut fill: impl FnMut(usize, &Region) -> Result<Vec<f32>>,
) -> Result<Pieces> {
    plan.tensors
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let piece = which(t)
                .piece_of(me, &t.shape)
                .map_err(|e| SwitchError::State {
                    tensor: t.name.clone(),
                    source: e,
                })?;
            piece
                .map(|p| Ok((fill(k, &p.region)?, p.region)))
                .transpose()
                .map(|o| o.map(|(v, r)| (r, v)))
        })
        .collect()
}

/// This rank's pieces under the plan's source distributions, cut from full tensors (a test or
/// a first placement uses it).
pub fn source_pieces(plan: &Plan, me: DeviceId, full: &[Vec<f32>]) -> Result<Pieces> {
    pieces(
        plan,
        me,
        |t| &t.src,
        |k, region| {
            let t = &plan.tensors[k];
            extract(&full[k], &t.shape, region).map_err(|e| SwitchError::State {
                tensor: t.name.clone(),
                source: e,
            })
        },
    )
}

/// Zero-filled destination pieces of device `me` under `plan` (what [`execute_into`] fills).
pub fn destination_pieces(plan: &Plan, me: DeviceId) -> Result<Pieces> {
    pieces(
        plan,
        me,
        |t| &t.dst,
        |_, region| Ok(vec![0.0; region.volume()]),
    )
}

/// Runs `plan` on this rank (`comm` rank `r` is device `r`): takes this rank's source pieces
/// and returns its destination pieces. Every rank of `comm` must call it with the same plan.
pub fn execute(plan: &Plan, comm: &dyn Communicator, src: &Pieces) -> Result<Pieces> {
    let mut out = destination_pieces(plan, DeviceId(comm.rank().0))?;
    execute_into(plan, comm, src, &mut out)?;
    Ok(out)
}

/// [`execute`] into destination pieces the caller already holds (from
/// [`destination_pieces`]), so that a repeated switch allocates nothing new.
pub fn execute_into(
    plan: &Plan,
    comm: &dyn Communicator,
    src: &Pieces,
    out: &mut Pieces,
) -> Result<()> {
    let me = DeviceId(comm.rank().0);
    if src.len() != plan.tensors.len() || out.len() != plan.tensors.len() {
        return Err(SwitchError::Pieces(format!(
            "{} source and {} destination pieces for {} tensors",
            src.len(),
            out.len(),
            plan.tensors.len()
        )));
    }
    let write = |out: &mut Pieces, tensor: usize, region: &Region, values: &[f32]| -> Result<()> {
        let (want, data) = out[tensor].as_mut().ok_or_else(|| {
            SwitchError::Pieces(format!(
                "device {me} receives part of {} but holds no destination piece of it",
                plan.tensors[tensor].name
            ))
        })?;
        let shape = want.shape();
        insert(data, &shape, &region.relative_to(want), values).map_err(|e| SwitchError::State {
            tensor: plan.tensors[tensor].name.clone(),
            source: e,
        })
    };
    for c in plan.local.iter().filter(|c| c.device == me) {
        let name = &plan.tensors[c.tensor].name;
        let missing = || {
            SwitchError::Pieces(format!(
                "device {me} keeps part of {name} but lacks a piece"
            ))
        };
        let (have, data) = src[c.tensor].as_ref().ok_or_else(missing)?;
        let (want, dst) = out[c.tensor].as_mut().ok_or_else(missing)?;
        let (hs, ws) = (have.shape(), want.shape());
        copy_region_with(
            data,
            &hs,
            &c.region.relative_to(have),
            dst,
            &ws,
            &c.region.relative_to(want),
            crate::stream::copy,
        )
        .map_err(|e| SwitchError::State {
            tensor: name.clone(),
            source: e,
        })?;
    }
    crate::stream::fence();
    // Ranks that share memory (threads) copy straight out of the senders' pieces: one copy per
    // value moved, no message buffers.
    let exposed: Vec<&[f32]> = src
        .iter()
        .map(|p| p.as_ref().map_or(&[][..], |(_, v)| v.as_slice()))
        .collect();
    let mut failure = None;
    let shared = comm.window(&exposed, &mut |peers| {
        failure = copy_from_peers(plan, me, peers, out).err();
    })?;
    if shared {
        return failure.map_or(Ok(()), Err);
    }
    // Otherwise one fused buffer per peer, in plan order on both sides.
    let mut sends: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut recv_len: BTreeMap<usize, usize> = BTreeMap::new();
    for t in &plan.transfers {
        if t.from == me {
            let (have, data) = src[t.tensor].as_ref().ok_or_else(|| {
                SwitchError::Pieces(format!(
                    "device {me} must send part of {} but holds no source piece of it",
                    plan.tensors[t.tensor].name
                ))
            })?;
            let buf = sends.entry(t.to.0).or_default();
            extract_into(data, &have.shape(), &t.region.relative_to(have), buf).map_err(|e| {
                SwitchError::State {
                    tensor: plan.tensors[t.tensor].name.clone(),
                    source: e,
                }
            })?;
        }
        if t.to == me {
            *recv_len.entry(t.from.0).or_default() += t.region.volume();
        }
    }
    let mut recvs: BTreeMap<usize, Vec<f32>> =
        recv_len.iter().map(|(&p, &n)| (p, vec![0.0; n])).collect();
    {
        let mut ops: Vec<P2p<'_>> = Vec::new();
        for (&peer, data) in &sends {
            ops.push(P2p::Send {
                peer: Rank(peer),
                data,
            });
        }
        for (&peer, buf) in recvs.iter_mut() {
            ops.push(P2p::Recv {
                peer: Rank(peer),
                buf,
            });
        }
        if !ops.is_empty() {
            comm.batch(&mut ops)?;
        }
    }
    let mut at: BTreeMap<usize, usize> = BTreeMap::new();
    for t in plan.transfers.iter().filter(|t| t.to == me) {
        let off = at.entry(t.from.0).or_default();
        let n = t.region.volume();
        let buf = &recvs[&t.from.0];
        write(out, t.tensor, &t.region, &buf[*off..*off + n])?;
        *off += n;
    }
    Ok(())
}

/// Copies every region `me` receives straight from its sender's exposed source piece into `out`.
fn copy_from_peers(plan: &Plan, me: DeviceId, peers: &Exposed<'_>, out: &mut Pieces) -> Result<()> {
    for t in plan.transfers.iter().filter(|t| t.to == me) {
        let tensor = &plan.tensors[t.tensor];
        let state = |source| SwitchError::State {
            tensor: tensor.name.clone(),
            source,
        };
        let have = tensor
            .src
            .piece_of(t.from, &tensor.shape)
            .map_err(state)?
            .ok_or_else(|| {
                SwitchError::Pieces(format!(
                    "device {} must send part of {} but holds none of it",
                    t.from, tensor.name
                ))
            })?
            .region;
        let data = peers
            .get(Rank(t.from.0), t.tensor)
            .filter(|d| d.len() == have.volume())
            .ok_or_else(|| {
                SwitchError::Pieces(format!(
                    "device {} exposes no piece of {} of {} values",
                    t.from,
                    tensor.name,
                    have.volume()
                ))
            })?;
        let (want, dst) = out[t.tensor].as_mut().ok_or_else(|| {
            SwitchError::Pieces(format!(
                "device {me} receives part of {} but holds no destination piece of it",
                tensor.name
            ))
        })?;
        let ws = want.shape();
        copy_region_with(
            data,
            &have.shape(),
            &t.region.relative_to(&have),
            dst,
            &ws,
            &t.region.relative_to(want),
            crate::stream::copy,
        )
        .map_err(state)?;
    }
    crate::stream::fence();
    Ok(())
}
