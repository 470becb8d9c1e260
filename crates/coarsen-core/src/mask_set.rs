//! A typed set of masks: every layer's [`Mask`] together with the shape of its weight tensor.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::{MaskFile, MaskTensor};
use crate::mask::Mask;
use crate::metadata::CoarsenMetadata;
use crate::view::MatrixView;

/// One layer's mask and the shape of the weight it masks.
///
/// Invariant: the shape has rank ≥ 2 and the mask is its [`MatrixView`]:
/// `rows = shape[0]`, `cols = shape[1] · … · shape[rank − 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMask {
    shape: Vec<usize>,
    mask: Mask,
}

impl LayerMask {
    /// The mask of a weight tensor of shape `shape` (named `name` in errors).
    pub fn new(name: &str, shape: &[usize], mask: Mask) -> Result<Self> {
        let view = view_of(name, shape)?;
        if (mask.rows(), mask.cols()) != (view.rows, view.cols) {
            return Err(Error::MaskShape {
                tensor: name.to_string(),
                shape: shape.to_vec(),
                detail: format!(
                    "a {}x{} mask does not fit its {}x{} matrix view",
                    mask.rows(),
                    mask.cols(),
                    view.rows,
                    view.cols
                ),
            });
        }
        Ok(LayerMask {
            shape: shape.to_vec(),
            mask,
        })
    }

    /// The mask of a weight of shape `shape` from row-major bytes (any nonzero byte is 1).
    pub fn from_bytes(name: &str, shape: &[usize], bytes: Vec<u8>) -> Result<Self> {
        let view = view_of(name, shape)?;
        if bytes.len() != view.len() {
            return Err(Error::BadLength {
                tensor: name.to_string(),
                shape: shape.to_vec(),
                len: bytes.len(),
            });
        }
        Self::new(name, shape, Mask::from_bytes(view.rows, view.cols, bytes)?)
    }

    /// The weight's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The matrix view of the weight.
    pub fn view(&self) -> MatrixView {
        // The shape was checked to have rank ≥ 2 when the value was made.
        MatrixView::of(&self.shape)
            .unwrap_or(MatrixView::matrix(self.mask.rows(), self.mask.cols()))
    }

    /// The mask in the matrix view.
    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// Row-major 0/1 bytes, one per weight.
    pub fn as_bytes(&self) -> &[u8] {
        self.mask.as_bytes()
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.mask.len()
    }

    /// Whether the weight has no entries.
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }

    /// Number of kept weights.
    pub fn nnz(&self) -> usize {
        self.mask.nnz()
    }

    /// Kept fraction (1 for an empty weight).
    pub fn density(&self) -> f64 {
        self.mask.density()
    }

    /// Whether flat entry `i` (row-major over the weight) is kept; `false` beyond the end.
    pub fn keeps(&self, i: usize) -> bool {
        self.mask.as_bytes().get(i).is_some_and(|&b| b != 0)
    }

    /// Replaces the mask by another of the same matrix shape.
    pub fn replace(&mut self, name: &str, mask: Mask) -> Result<()> {
        *self = LayerMask::new(name, &self.shape, mask)?;
        Ok(())
    }

    /// Sets entry (`r`, `c`) of the matrix view.
    pub fn set(&mut self, r: usize, c: usize, on: bool) {
        self.mask.set(r, c, on);
    }

    /// Zeroes `values` (the weight, row-major) where the mask is 0.
    pub fn apply(&self, name: &str, values: &mut [f32]) -> Result<()> {
        if values.len() != self.len() {
            return Err(Error::BadLength {
                tensor: name.to_string(),
                shape: self.shape.clone(),
                len: values.len(),
            });
        }
        values
            .iter_mut()
            .zip(self.mask.as_bytes())
            .filter(|(_, &b)| b == 0)
            .for_each(|(v, _)| *v = 0.0);
        Ok(())
    }

    /// The mask and the weight's shape.
    pub fn into_parts(self) -> (Vec<usize>, Mask) {
        (self.shape, self.mask)
    }
}

fn view_of(name: &str, shape: &[usize]) -> Result<MatrixView> {
    let overflow = || Error::MaskShape {
        tensor: name.to_string(),
        shape: shape.to_vec(),
        detail: "the number of entries overflows".into(),
    };
    let view = MatrixView::of(shape).ok_or_else(|| Error::MaskShape {
        tensor: name.to_string(),
        shape: shape.to_vec(),
        detail: "a mask needs a weight of rank 2 or more".into(),
    })?;
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    Ok(view)
}

/// Masks by weight name, each with its weight's shape: what a pruned network carries.
///
/// ```
/// use coarsen_core::{Mask, MaskSet};
///
/// let mut masks = MaskSet::new();
/// masks.insert("conv.weight", &[4, 2, 3, 3], Mask::ones(4, 18)).unwrap();
/// assert_eq!(masks.get("conv.weight").unwrap().shape(), &[4, 2, 3, 3]);
/// // A mask that does not fit its weight is refused.
/// assert!(masks.insert("fc.weight", &[10, 5], Mask::ones(10, 6)).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaskSet {
    layers: BTreeMap<String, LayerMask>,
}

impl MaskSet {
    /// No masks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the mask of weight `name` of shape `shape`; returns the previous one.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        mask: Mask,
    ) -> Result<Option<LayerMask>> {
        let name = name.into();
        let layer = LayerMask::new(&name, shape, mask)?;
        Ok(self.layers.insert(name, layer))
    }

    /// Adds (or replaces) the mask of weight `name` of shape `shape` from row-major bytes.
    pub fn insert_bytes(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> Result<Option<LayerMask>> {
        let name = name.into();
        let layer = LayerMask::from_bytes(&name, shape, bytes)?;
        Ok(self.layers.insert(name, layer))
    }

    /// Adds (or replaces) a layer's mask.
    pub fn insert_layer(&mut self, name: impl Into<String>, layer: LayerMask) -> Option<LayerMask> {
        self.layers.insert(name.into(), layer)
    }

    /// The mask of weight `name`.
    pub fn get(&self, name: &str) -> Option<&LayerMask> {
        self.layers.get(name)
    }

    /// The mask of weight `name`, to change in place (its shape stays).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut LayerMask> {
        self.layers.get_mut(name)
    }

    /// Whether weight `name` has a mask.
    pub fn contains(&self, name: &str) -> bool {
        self.layers.contains_key(name)
    }

    /// Removes the mask of weight `name`.
    pub fn remove(&mut self, name: &str) -> Option<LayerMask> {
        self.layers.remove(name)
    }

    /// Masks by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LayerMask)> {
        self.layers.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Weight names, in name order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.layers.keys().map(String::as_str)
    }

    /// Number of masks.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there is no mask.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Sparsity over these masks (the prunable layers) and over all of `weights`, the network's
    /// conv and linear weights as `(name, len)` (see [`crate::Sparsity`]).
    pub fn sparsity<'a>(
        &'a self,
        weights: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> crate::Sparsity {
        crate::Sparsity::of(self.iter().map(|(n, l)| (n, l.nnz(), l.len())), weights)
    }

    /// Fraction of kept weights over all masks (1 when there are none).
    pub fn density(&self) -> f64 {
        let (ones, all) = self
            .layers
            .values()
            .fold((0usize, 0usize), |(o, a), l| (o + l.nnz(), a + l.len()));
        if all == 0 {
            1.0
        } else {
            ones as f64 / all as f64
        }
    }

    /// The masks of a mask file (every tensor of rank ≥ 2; others are refused).
    pub fn from_file(file: &MaskFile) -> Result<Self> {
        let mut set = MaskSet::new();
        for t in file.tensors() {
            set.insert_bytes(t.name.clone(), &t.shape, t.data.clone())?;
        }
        Ok(set)
    }

    /// Reads a mask file: its masks and its coarsen metadata.
    pub fn read(path: impl AsRef<std::path::Path>) -> Result<(Self, Option<CoarsenMetadata>)> {
        let file = MaskFile::read(path)?;
        Ok((Self::from_file(&file)?, file.metadata))
    }

    /// A mask file labelled `label` holding these masks, with `metadata`.
    pub fn to_file(
        &self,
        label: impl Into<std::path::PathBuf>,
        metadata: Option<CoarsenMetadata>,
    ) -> MaskFile {
        let tensors = self
            .layers
            .iter()
            .map(|(name, l)| MaskTensor {
                name: name.clone(),
                shape: l.shape.clone(),
                data: l.as_bytes().to_vec(),
            })
            .collect();
        let mut file = MaskFile::new(label, tensors);
        file.metadata = metadata;
        file
    }

    /// Writes the masks (and `metadata`) to a safetensors mask file, atomically.
    pub fn write(
        &self,
        path: impl AsRef<std::path::Path>,
        metadata: Option<CoarsenMetadata>,
    ) -> Result<()> {
        let path = path.as_ref();
        self.to_file(path, metadata).write(path)
    }
}

impl<'a> IntoIterator for &'a MaskSet {
    type Item = (&'a String, &'a LayerMask);
    type IntoIter = std::collections::btree_map::Iter<'a, String, LayerMask>;

    fn into_iter(self) -> Self::IntoIter {
        self.layers.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        let mut s = MaskSet::new();
        assert!(s.insert("a", &[2, 3, 1, 1], Mask::ones(2, 3)).is_ok());
        assert!(s.insert("b", &[6], Mask::ones(1, 6)).is_err());
        assert!(s.insert("c", &[2, 3], Mask::ones(3, 2)).is_err());
        assert!(s.insert_bytes("d", &[2, 2], vec![1, 0, 1]).is_err());
        assert!(s.insert_bytes("e", &[usize::MAX, 2, 2], vec![]).is_err());
        let l = s.get_mut("a").unwrap();
        l.set(1, 2, false);
        assert_eq!(l.nnz(), 5);
        assert!(l.replace("a", Mask::ones(3, 2)).is_err());
        assert_eq!(s.get("a").unwrap().nnz(), 5);
        let mut w = vec![1.0f32; 6];
        s.get("a").unwrap().apply("a", &mut w).unwrap();
        assert_eq!(w, [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        assert!(s.get("a").unwrap().apply("a", &mut [0.0; 5]).is_err());
        assert!((s.density() - 5.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut s = MaskSet::new();
        s.insert(
            "x.weight",
            &[3, 2, 2, 2],
            Mask::from_fn(3, 8, |r, c| (r + c) % 3 == 0),
        )
        .unwrap();
        s.insert("y.weight", &[4, 5], Mask::from_fn(4, 5, |r, c| r == c))
            .unwrap();
        s.write(&path, None).unwrap();
        let (back, meta) = MaskSet::read(&path).unwrap();
        assert_eq!(back, s);
        assert!(meta.is_none());
    }
}
