//! Slice intersection of two distributions: the unit of resharding (DESIGN §2.4).

use std::collections::BTreeMap;
use std::fmt;

use crate::error::Result;
use crate::group::DeviceId;
use crate::region::Region;
use crate::state::Distribution;

/// A device holding (or needing) a region, with the partial part its values belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder {
    /// The device.
    pub device: DeviceId,
    /// The partial part (`None` when the DState has no Partial axis).
    pub part: Option<usize>,
}

/// One cell of the common refinement of a source and a destination partition.
///
/// * `owners` hold the cell under the source. When the source has Partial axes, the true value is
///   the sum of one owner per part; owners of the same part hold identical values.
/// * `needers` hold the cell under the destination. When the destination has Partial axes, the
///   needers of part 0 receive the value and the others are zero-filled locally (the `D → P` rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The cell, in global indices.
    pub region: Region,
    /// Who owns it under the source.
    pub owners: Vec<Holder>,
    /// Who holds it under the destination.
    pub needers: Vec<Holder>,
}

impl Slice {
    /// Number of elements in the slice.
    pub fn volume(&self) -> usize {
        self.region.volume()
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |hs: &[Holder]| {
            hs.iter()
                .map(|h| match h.part {
                    Some(p) => format!("{}/p{}", h.device, p),
                    None => h.device.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "{}: {} -> {}",
            self.region,
            list(&self.owners),
            list(&self.needers)
        )
    }
}

/// The distinct regions of a distribution with the holders of each, in a stable order.
fn regions(dist: &Distribution, shape: &[usize]) -> Result<BTreeMap<Region, Vec<Holder>>> {
    let mut map: BTreeMap<Region, Vec<Holder>> = BTreeMap::new();
    for (device, piece) in dist.pieces(shape)? {
        if piece.region.is_empty() {
            continue;
        }
        map.entry(piece.region).or_default().push(Holder {
            device,
            part: piece.part,
        });
    }
    Ok(map)
}

/// Intersects the partitions of `src` and `dst` for a tensor of `shape`: every element of the
/// tensor lies in exactly one returned slice. The two distributions may use different device
/// groups (a pipeline boundary or a hot switch). Slices come in a deterministic order.
pub fn intersect(src: &Distribution, dst: &Distribution, shape: &[usize]) -> Result<Vec<Slice>> {
    let src_regions = regions(src, shape)?;
    let dst_regions = regions(dst, shape)?;
    let mut slices = Vec::new();
    for (sr, owners) in &src_regions {
        for (dr, needers) in &dst_regions {
            let region = sr.intersect(dr);
            if !region.is_empty() {
                slices.push(Slice {
                    region,
                    owners: owners.clone(),
                    needers: needers.clone(),
                });
            }
        }
    }
    Ok(slices)
}
