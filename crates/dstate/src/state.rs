//! Placements, axes, DStates and distributions (a DState bound to a device group).

use std::fmt;
use std::str::FromStr;

use crate::error::{DStateError, Result};
use crate::group::{DeviceGroup, DeviceId};
use crate::region::{chunk, Region};

/// How one device-mesh axis holds a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Tensor dim `d` is cut into `degree` contiguous chunks along this axis.
    Split(usize),
    /// Every member of the axis holds the same values.
    Duplicate,
    /// The true value is the sum of the members' values along this axis.
    Partial,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Split(d) => write!(f, "S({d})"),
            Placement::Duplicate => write!(f, "D"),
            Placement::Partial => write!(f, "P"),
        }
    }
}

/// One mesh axis: a placement and how many devices it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Axis {
    /// What the axis does to the tensor.
    pub placement: Placement,
    /// Number of devices along the axis (≥ 1).
    pub degree: usize,
}

impl Axis {
    /// `Split(dim)` over `degree` devices.
    pub fn split(dim: usize, degree: usize) -> Self {
        Self {
            placement: Placement::Split(dim),
            degree,
        }
    }
    /// `Duplicate` over `degree` devices.
    pub fn dup(degree: usize) -> Self {
        Self {
            placement: Placement::Duplicate,
            degree,
        }
    }
    /// `Partial` over `degree` devices.
    pub fn partial(degree: usize) -> Self {
        Self {
            placement: Placement::Partial,
            degree,
        }
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}", self.placement, self.degree)
    }
}

/// The piece of a tensor one device holds under a DState.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The box of global indices the device holds.
    pub region: Region,
    /// Which partial part the values are (mixed radix over the Partial axes), `None` when the
    /// DState has no Partial axis. Summing the parts gives the true value.
    pub part: Option<usize>,
    /// Which replica the device is (mixed radix over the Duplicate axes); replica 0 is canonical.
    pub replica: usize,
}

/// An ordered list of mesh axes, outermost first. A device's index in its group, read in mixed
/// radix over the degrees, gives its coordinate on every axis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DState {
    axes: Vec<Axis>,
}

impl DState {
    /// A DState over the given axes (outermost first); every degree must be ≥ 1.
    /// No axes means one device holding the whole tensor.
    pub fn new(axes: Vec<Axis>) -> Result<Self> {
        if let Some(axis) = axes.iter().position(|a| a.degree == 0) {
            return Err(DStateError::ZeroDegree { axis });
        }
        Ok(Self { axes })
    }

    /// The axes, outermost first.
    pub fn axes(&self) -> &[Axis] {
        &self.axes
    }

    /// The number of devices the DState spans: the product of the degrees.
    pub fn size(&self) -> usize {
        self.axes.iter().map(|a| a.degree).product()
    }

    /// Checks that the degrees multiply to `group_size`, naming every factor when they do not.
    pub fn check_group_size(&self, group_size: usize) -> Result<()> {
        if self.size() == group_size {
            return Ok(());
        }
        let factors = if self.axes.is_empty() {
            "(no axes)".to_string()
        } else {
            self.axes
                .iter()
                .map(|a| format!("{} ({})", a.degree, a.placement))
                .collect::<Vec<_>>()
                .join(" × ")
        };
        Err(DStateError::DegreeProduct {
            factors,
            product: self.size(),
            group_size,
        })
    }

    /// Checks that every split dim exists in a tensor of `shape`.
    pub fn check_shape(&self, shape: &[usize]) -> Result<()> {
        for (axis, a) in self.axes.iter().enumerate() {
            if let Placement::Split(dim) = a.placement {
                if dim >= shape.len() {
                    return Err(DStateError::SplitDimOutOfRange {
                        axis,
                        dim,
                        rank: shape.len(),
                        shape: shape.to_vec(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Refuses a Partial axis where `context` needs materialised values.
    pub fn ensure_no_partial(&self, context: &str) -> Result<()> {
        match self
            .axes
            .iter()
            .position(|a| a.placement == Placement::Partial)
        {
            Some(axis) => Err(DStateError::PartialNotAllowed {
                axis,
                context: context.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The coordinate of device `index` on every axis (mixed radix, outermost axis most
    /// significant).
    pub fn coords(&self, index: usize) -> Result<Vec<usize>> {
        let size = self.size();
        if index >= size {
            return Err(DStateError::IndexOutOfRange { index, size });
        }
        let mut rest = index;
        let mut coords = vec![0; self.axes.len()];
        for (i, a) in self.axes.iter().enumerate().rev() {
            coords[i] = rest % a.degree;
            rest /= a.degree;
        }
        Ok(coords)
    }

    /// The device index with the given coordinates (the inverse of [`DState::coords`]).
    pub fn index_of(&self, coords: &[usize]) -> usize {
        coords
            .iter()
            .zip(&self.axes)
            .fold(0, |acc, (&c, a)| acc * a.degree + c)
    }

    /// Number of partial parts (product of the Partial degrees; 1 without Partial axes).
    pub fn num_parts(&self) -> usize {
        self.axes
            .iter()
            .filter(|a| a.placement == Placement::Partial)
            .map(|a| a.degree)
            .product()
    }

    /// Number of replicas (product of the Duplicate degrees).
    pub fn num_replicas(&self) -> usize {
        self.axes
            .iter()
            .filter(|a| a.placement == Placement::Duplicate)
            .map(|a| a.degree)
            .product()
    }

    /// The piece device `index` holds of a tensor of `shape`. Split axes cut the running range of
    /// their dim in order, so the outer axis cuts first; uneven sizes follow [`chunk`].
    pub fn piece(&self, index: usize, shape: &[usize]) -> Result<Piece> {
        self.check_shape(shape)?;
        let coords = self.coords(index)?;
        let mut region = Region::full(shape);
        let (mut part, mut replica) = (0usize, 0usize);
        let has_partial = self.axes.iter().any(|a| a.placement == Placement::Partial);
        for (a, &c) in self.axes.iter().zip(&coords) {
            match a.placement {
                Placement::Split(d) => {
                    region.ranges[d] = chunk(region.ranges[d].clone(), a.degree, c);
                }
                Placement::Duplicate => replica = replica * a.degree + c,
                Placement::Partial => part = part * a.degree + c,
            }
        }
        Ok(Piece {
            region,
            part: has_partial.then_some(part),
            replica,
        })
    }

    /// Local shape of device `index`'s piece.
    pub fn local_shape(&self, index: usize, shape: &[usize]) -> Result<Vec<usize>> {
        Ok(self.piece(index, shape)?.region.shape())
    }

    /// Global offset of device `index`'s piece.
    pub fn offset(&self, index: usize, shape: &[usize]) -> Result<Vec<usize>> {
        Ok(self.piece(index, shape)?.region.offset())
    }

    /// The innermost axis that splits `dim`, if any.
    pub fn innermost_split_of(&self, dim: usize) -> Option<usize> {
        self.axes
            .iter()
            .rposition(|a| a.placement == Placement::Split(dim))
    }
}

impl fmt::Display for DState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let axes: Vec<String> = self.axes.iter().map(|a| a.to_string()).collect();
        write!(f, "[{}]", axes.join(", "))
    }
}

impl FromStr for DState {
    type Err = String;

    /// Parses the display form, e.g. `[D×2, S(0)×4]` (`x` may stand for `×`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let inner = s
            .trim()
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| format!("a DState is written like [D×2, S(0)×4], got `{s}`"))?;
        let mut axes = Vec::new();
        for item in inner.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let item = item.replace('x', "×");
            let (p, d) = item
                .split_once('×')
                .ok_or_else(|| format!("axis `{item}` lacks `×degree`"))?;
            let degree: usize = d
                .trim()
                .parse()
                .map_err(|_| format!("axis `{item}`: degree `{d}` is not a number"))?;
            let placement = match p.trim() {
                "D" => Placement::Duplicate,
                "P" => Placement::Partial,
                other => {
                    let dim = other
                        .strip_prefix("S(")
                        .and_then(|r| r.strip_suffix(')'))
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| format!("unknown placement `{other}` (use D, P or S(n))"))?;
                    Placement::Split(dim)
                }
            };
            axes.push(Axis { placement, degree });
        }
        DState::new(axes).map_err(|e| e.to_string())
    }
}

/// A DState bound to a device group: the full description of how a tensor lives on devices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Distribution {
    group: DeviceGroup,
    state: DState,
}

impl Distribution {
    /// Binds `state` to `group`; the degrees must multiply to the group size.
    pub fn new(group: DeviceGroup, state: DState) -> Result<Self> {
        state.check_group_size(group.len())?;
        Ok(Self { group, state })
    }

    /// The device group.
    pub fn group(&self) -> &DeviceGroup {
        &self.group
    }

    /// The DState.
    pub fn state(&self) -> &DState {
        &self.state
    }

    /// Every device with its piece, in group order.
    pub fn pieces(&self, shape: &[usize]) -> Result<Vec<(DeviceId, Piece)>> {
        self.group
            .devices()
            .iter()
            .enumerate()
            .map(|(i, &d)| Ok((d, self.state.piece(i, shape)?)))
            .collect()
    }

    /// The piece `device` holds, or `None` when it is not in the group.
    pub fn piece_of(&self, device: DeviceId, shape: &[usize]) -> Result<Option<Piece>> {
        match self.group.index_of(device) {
            Some(i) => self.state.piece(i, shape).map(Some),
            None => Ok(None),
        }
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} @ {}", self.state, self.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_roundtrip() {
        let s = DState::new(vec![Axis::dup(2), Axis::split(0, 4)]).unwrap();
        assert_eq!(s.to_string(), "[D×2, S(0)×4]");
        assert_eq!("[D×2, S(0)×4]".parse::<DState>().unwrap(), s);
        assert_eq!("[Dx2, S(0)x4]".parse::<DState>().unwrap(), s);
        let d = Distribution::new(DeviceGroup::range(0, 8).unwrap(), s).unwrap();
        assert_eq!(d.to_string(), "[D×2, S(0)×4] @ g0-7");
        assert!("[Q×2]".parse::<DState>().is_err());
    }

    #[test]
    fn degree_errors_name_every_factor() {
        let s = DState::new(vec![Axis::dup(2), Axis::split(0, 3)]).unwrap();
        let e = Distribution::new(DeviceGroup::range(0, 8).unwrap(), s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "degrees 2 (D) × 3 (S(0)) = 6 do not match the device group size 8"
        );
        assert!(matches!(
            DState::new(vec![Axis::dup(0)]),
            Err(DStateError::ZeroDegree { axis: 0 })
        ));
    }

    #[test]
    fn split_dim_out_of_range_and_partial_check() {
        let s = DState::new(vec![Axis::split(2, 2)]).unwrap();
        let e = s.piece(0, &[4, 4]).unwrap_err();
        assert!(e
            .to_string()
            .contains("splits dim 2 but the tensor has rank 2"));
        let p = DState::new(vec![Axis::dup(2), Axis::partial(2)]).unwrap();
        let e = p.ensure_no_partial("a parameter").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Partial placement on axis 1 is not allowed for a parameter"
        );
    }

    #[test]
    fn mixed_radix_coords_and_nested_splits() {
        let s = DState::new(vec![Axis::split(0, 2), Axis::dup(2), Axis::split(0, 2)]).unwrap();
        assert_eq!(s.coords(5).unwrap(), vec![1, 0, 1]);
        assert_eq!(s.index_of(&[1, 0, 1]), 5);
        // 10 rows: the outer axis cuts 0..5 / 5..10, the inner one 0..3 / 3..5 of each.
        let p = s.piece(5, &[10, 3]).unwrap();
        assert_eq!(p.region.to_string(), "[8..10, 0..3]");
        assert_eq!(p.replica, 0);
        assert_eq!(s.local_shape(6, &[10, 3]).unwrap(), vec![3, 3]);
        assert_eq!(s.offset(6, &[10, 3]).unwrap(), vec![5, 0]);
    }
}
