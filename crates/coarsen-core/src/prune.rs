//! Unstructured magnitude pruning to a target sparsity, globally or per layer (IMP's pruning
//! step).

use crate::error::{Error, Result};
use crate::io::{MaskFile, MaskTensor, WeightFile, WeightTensor};
use crate::mask::Mask;
use crate::select::Selector;
use crate::view::MatrixView;

/// Over which set of weights one magnitude threshold is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scope {
    /// One threshold across all layers (IMP's default).
    #[default]
    Global,
    /// Each layer is pruned to the target sparsity on its own.
    Layer,
}

/// What one unit of pruning is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Granularity {
    /// Single weights (unstructured; IMP's pruning).
    #[default]
    Weight,
    /// Whole kernels: the `kh × kw` weights of one (output, input) channel pair of a
    /// convolution go together, scored by their root mean square (pruned taps counting as
    /// zero), and the sparsity counts kernels. Linear layers and 1×1 convolutions have
    /// kernels of one weight. What group sparsity over kernels starts from: Winograd
    /// convolution then multiplies only the kept kernels' channels.
    Kernel,
}

/// One layer to prune: its weights in matrix view and, for iterative pruning, its current mask.
#[derive(Clone, Copy, Debug)]
pub struct PruneInput<'a> {
    /// Layer name (for messages).
    pub name: &'a str,
    /// Rows of the matrix view.
    pub rows: usize,
    /// Columns of the matrix view.
    pub cols: usize,
    /// The weights, row-major, `rows * cols` values.
    pub weights: &'a [f32],
    /// The current mask; entries already 0 stay 0 and count as pruned.
    pub mask: Option<&'a Mask>,
}

/// Checks that a target sparsity lies strictly between 0 and 1.
pub fn check_sparsity(sparsity: f64) -> Result<()> {
    if !(sparsity > 0.0 && sparsity < 1.0) {
        return Err(Error::param(
            "--sparsity",
            sparsity,
            "must lie strictly between 0 and 1 (0 prunes nothing, 1 prunes everything)",
        ));
    }
    Ok(())
}

impl PruneInput<'_> {
    /// Checks that the weights hold `rows · cols` values and the mask, if any, has the layer's
    /// shape.
    fn check(&self) -> Result<()> {
        if self.weights.len() != self.rows * self.cols {
            return Err(Error::BadLength {
                tensor: self.name.to_string(),
                shape: vec![self.rows, self.cols],
                len: self.weights.len(),
            });
        }
        match self.mask {
            Some(m) if (m.rows(), m.cols()) != (self.rows, self.cols) => Err(Error::param(
                "mask",
                format!("{}×{}", m.rows(), m.cols()),
                format!(
                    "layer '{}' is {}×{}",
                    self.name.escape_debug(),
                    self.rows,
                    self.cols
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Prunes the weights of smallest magnitude until `sparsity` of all weights (of the scope) are
/// zero in the mask. Already-masked weights count towards the sparsity; ties are broken by layer
/// order, then by flat index, so the result is deterministic.
///
/// Fails if `sparsity` is not in (0, 1), if a layer's weights or mask do not have its shape,
/// or if a scope is already at least that sparse.
pub fn magnitude_prune(
    layers: &[PruneInput<'_>],
    sparsity: f64,
    scope: Scope,
) -> Result<Vec<Mask>> {
    check_sparsity(sparsity)?;
    for l in layers {
        l.check()?;
    }
    match scope {
        Scope::Global => prune_group(layers, sparsity),
        Scope::Layer => {
            let mut out = Vec::with_capacity(layers.len());
            for l in layers {
                out.extend(prune_group(std::slice::from_ref(l), sparsity)?);
            }
            Ok(out)
        }
    }
}

/// [`magnitude_prune`] by whole kernels of `taps[i]` consecutive columns of layer `i` (its
/// `kh·kw`; see [`Granularity::Kernel`]): a kernel is live where one of its weights is live in
/// the layer's mask, kernels are pruned by the root mean square of their live weights, and the
/// result keeps the live weights of the kept kernels.
///
/// Fails as [`magnitude_prune`] does, and where a layer's columns are not whole kernels.
pub fn kernel_prune(
    layers: &[PruneInput<'_>],
    taps: &[usize],
    sparsity: f64,
    scope: Scope,
) -> Result<Vec<Mask>> {
    check_sparsity(sparsity)?;
    if taps.len() != layers.len() {
        return Err(Error::param(
            "taps",
            format!("{} values", taps.len()),
            format!("needs one per layer ({})", layers.len()),
        ));
    }
    let mut scores = Vec::with_capacity(layers.len());
    for (l, &kk) in layers.iter().zip(taps) {
        l.check()?;
        if kk == 0 || !l.cols.is_multiple_of(kk) {
            return Err(Error::param(
                "taps",
                kk,
                format!(
                    "layer '{}' has {} columns per row, not whole kernels of {kk}",
                    l.name.escape_debug(),
                    l.cols
                ),
            ));
        }
        let ones;
        let mask = match l.mask {
            Some(m) => m,
            None => {
                ones = Mask::ones(l.rows, l.cols);
                &ones
            }
        };
        scores.push((mask.kernel_rms(l.weights, kk), mask.kernel_mask(kk)));
    }
    let inputs: Vec<PruneInput<'_>> = layers
        .iter()
        .zip(&scores)
        .map(|(l, (score, mask))| PruneInput {
            name: l.name,
            rows: l.rows,
            cols: mask.cols(),
            weights: score,
            mask: Some(mask),
        })
        .collect();
    let kept = magnitude_prune(&inputs, sparsity, scope)?;
    layers
        .iter()
        .zip(taps)
        .zip(kept)
        .map(|((l, &kk), k)| {
            let bytes = (0..l.rows * l.cols)
                .map(|i| {
                    let prev = l.mask.is_none_or(|m| m.as_bytes()[i] != 0);
                    u8::from(prev && k.as_bytes()[i / kk] != 0)
                })
                .collect();
            Mask::from_bytes(l.rows, l.cols, bytes)
        })
        .collect()
}

fn prune_group(layers: &[PruneInput<'_>], sparsity: f64) -> Result<Vec<Mask>> {
    let total: usize = layers.iter().map(|l| l.weights.len()).sum();
    let mut masks: Vec<Mask> = layers
        .iter()
        .map(|l| {
            l.mask
                .cloned()
                .unwrap_or_else(|| Mask::ones(l.rows, l.cols))
        })
        .collect();
    let alive: usize = masks.iter().map(Mask::nnz).sum();
    let target_pruned = (sparsity * total as f64).round() as usize;
    let already = total - alive;
    if target_pruned <= already {
        let names: Vec<&str> = layers.iter().map(|l| l.name).collect();
        return Err(Error::param(
            "--sparsity",
            sparsity,
            format!(
                "{} already has sparsity {:.4} (≥ target); nothing to prune",
                names.join(", "),
                already as f64 / total.max(1) as f64
            ),
        ));
    }
    let k = target_pruned - already;
    // The k-th smallest magnitude among live weights is the threshold; every live weight below it
    // is pruned, and ties at it are pruned in (layer, index) order until k are gone.
    let mut live: Vec<f32> = Vec::with_capacity(alive);
    for (l, m) in layers.iter().zip(&masks) {
        live.extend(
            l.weights
                .iter()
                .zip(m.as_bytes())
                .filter(|(_, &b)| b != 0)
                .map(|(w, _)| w.abs()),
        );
    }
    let (_, &mut threshold, _) = live.select_nth_unstable_by(k - 1, f32::total_cmp);
    drop(live);
    let below: usize = layers
        .iter()
        .zip(&masks)
        .map(|(l, m)| {
            l.weights
                .iter()
                .zip(m.as_bytes())
                .filter(|(w, &b)| b != 0 && w.abs() < threshold)
                .count()
        })
        .sum();
    let mut ties_to_prune = k - below;
    for (l, m) in layers.iter().zip(masks.iter_mut()) {
        let mut bytes = std::mem::take(m).into_bytes();
        for (b, w) in bytes.iter_mut().zip(l.weights) {
            if *b == 0 {
                continue;
            }
            let a = w.abs();
            if a < threshold {
                *b = 0;
            } else if a == threshold && ties_to_prune > 0 {
                *b = 0;
                ties_to_prune -= 1;
            }
        }
        *m = Mask::from_bytes(l.rows, l.cols, bytes)?;
    }
    Ok(masks)
}

/// A layer to prune: name, shape, weights and its current mask (when pruning further).
struct Layer<'a> {
    name: String,
    shape: Vec<usize>,
    values: &'a [f32],
    mask: Option<Mask>,
}

/// Prunes the selected layers of `weights` (or, with `previous`, the selected layers of that mask
/// further) and returns the mask file of those layers, with the tensors left out because they
/// are not floating point (a selection of every tensor meets BatchNorm's counters).
pub fn prune_file<'w>(
    weights: &'w WeightFile,
    previous: Option<&MaskFile>,
    sel: &Selector,
    sparsity: f64,
    scope: Scope,
    granularity: Granularity,
) -> Result<(MaskFile, Vec<&'w WeightTensor>)> {
    check_sparsity(sparsity)?;
    let mut skipped = Vec::new();
    // The layers: the previous mask's tensors, or every selected floating-point weight.
    let mut layers: Vec<Layer<'_>> = Vec::new();
    match previous {
        Some(prev) => {
            // Every selected layer of the weights must be in the mask pruned further: one
            // missing would silently drop out of the result.
            if let Some(w) = weights.tensors().iter().find(|w| {
                w.values().is_some()
                    && sel.selects(&w.name, &w.shape)
                    && prev.get(&w.name).is_none()
            }) {
                return Err(Error::MissingTensor {
                    path: prev.path().to_path_buf(),
                    tensor: w.name.clone(),
                    shape: w.shape.clone(),
                    named_in: weights.path().to_path_buf(),
                });
            }
            for t in prev
                .tensors()
                .iter()
                .filter(|t| sel.selects(&t.name, &t.shape))
            {
                let values = crate::convert::matching_values(weights, t, prev.path())?;
                let view = view_of(&t.shape);
                let mask = Mask::from_bytes(view.rows, view.cols, t.data.clone())?;
                layers.push(Layer {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values,
                    mask: Some(mask),
                });
            }
        }
        None => {
            for t in weights
                .tensors()
                .iter()
                .filter(|t| sel.selects(&t.name, &t.shape))
            {
                let Some(values) = t.values() else {
                    skipped.push(t);
                    continue;
                };
                t.check_finite(weights.path())?;
                layers.push(Layer {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values,
                    mask: None,
                });
            }
        }
    }
    if layers.is_empty() {
        return Err(Error::EmptySelection {
            path: previous
                .map_or(weights.path(), MaskFile::path)
                .to_path_buf(),
            detail: sel.describe(),
        });
    }
    let inputs: Vec<PruneInput<'_>> = layers
        .iter()
        .map(|l| {
            let v = view_of(&l.shape);
            PruneInput {
                name: &l.name,
                rows: v.rows,
                cols: v.cols,
                weights: l.values,
                mask: l.mask.as_ref(),
            }
        })
        .collect();
    let masks = match granularity {
        Granularity::Weight => magnitude_prune(&inputs, sparsity, scope)?,
        Granularity::Kernel => {
            let taps: Vec<usize> = layers.iter().map(|l| view_of(&l.shape).inner).collect();
            kernel_prune(&inputs, &taps, sparsity, scope)?
        }
    };
    // A layer with no weight left would cut the network; a sparsity this close to 1 is a
    // mistake, not a mask.
    if let Some((l, _)) = layers.iter().zip(&masks).find(|(_, m)| m.nnz() == 0) {
        return Err(Error::param(
            "--sparsity",
            sparsity,
            format!(
                "leaves layer '{}' {:?} without a single weight; give a lower sparsity (or --scope layer)",
                l.name.escape_debug(),
                l.shape
            ),
        ));
    }
    let tensors = layers
        .iter()
        .zip(masks)
        .map(|(l, m)| MaskTensor {
            name: l.name.clone(),
            shape: l.shape.clone(),
            data: m.into_bytes(),
        })
        .collect();
    Ok((MaskFile::new(weights.path(), tensors), skipped))
}

fn view_of(shape: &[usize]) -> MatrixView {
    MatrixView::of(shape).unwrap_or_else(|| MatrixView::matrix(1, shape.iter().product()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(name: &'a str, w: &'a [f32], cols: usize) -> PruneInput<'a> {
        PruneInput {
            name,
            rows: w.len() / cols,
            cols,
            weights: w,
            mask: None,
        }
    }

    #[test]
    fn global_prunes_smallest_across_layers() {
        let a = [0.1f32, -5.0, 0.2, 3.0];
        let b = [1.0f32, -0.05, 4.0, 2.0];
        let m =
            magnitude_prune(&[input("a", &a, 2), input("b", &b, 2)], 0.5, Scope::Global).unwrap();
        assert_eq!(m[0].as_bytes(), &[0, 1, 0, 1]);
        assert_eq!(m[1].as_bytes(), &[0, 0, 1, 1]);
    }

    #[test]
    fn layer_scope_prunes_each_layer() {
        let a = [0.1f32, -5.0, 0.2, 3.0];
        let b = [1.0f32, -0.05, 4.0, 2.0];
        let m =
            magnitude_prune(&[input("a", &a, 2), input("b", &b, 2)], 0.25, Scope::Layer).unwrap();
        assert_eq!(m[0].nnz(), 3);
        assert_eq!(m[1].as_bytes(), &[1, 0, 1, 1]);
    }

    #[test]
    fn ties_are_broken_by_index_and_counts_are_exact() {
        let w = [1.0f32; 10];
        let m = magnitude_prune(&[input("a", &w, 5)], 0.3, Scope::Global).unwrap();
        assert_eq!(m[0].as_bytes(), &[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn iterative_pruning_keeps_pruned_weights_pruned() {
        let w = [5.0f32, 4.0, 3.0, 2.0, 1.0];
        let first = Mask::from_bytes(1, 5, vec![0, 1, 1, 1, 1]).unwrap();
        let l = PruneInput {
            mask: Some(&first),
            ..input("a", &w, 5)
        };
        let m = magnitude_prune(&[l], 0.4, Scope::Global).unwrap();
        assert_eq!(m[0].as_bytes(), &[0, 1, 1, 1, 0]);
        assert!(magnitude_prune(&[l], 0.2, Scope::Global).is_err());
    }

    #[test]
    fn kernel_granularity_prunes_whole_kernels_by_rms() {
        // Two rows of three kernels of 2 taps; RMS: [0.5, 3, 1], [2, 0.1, 4].
        let w = [
            0.5f32, -0.5, 3.0, 3.0, 1.0, -1.0, 2.0, 2.0, 0.1, 0.1, -4.0, 4.0,
        ];
        let m = kernel_prune(&[input("a", &w, 6)], &[2], 0.5, Scope::Global).unwrap();
        assert_eq!(m[0].as_bytes(), &[0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]);
        // Pruned taps of a previous mask count as zero and stay pruned; a kernel with a live
        // tap is live.
        let prev = Mask::from_bytes(2, 6, vec![1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]).unwrap();
        let l = PruneInput {
            mask: Some(&prev),
            ..input("a", &w, 6)
        };
        let m = kernel_prune(&[l], &[2], 0.5, Scope::Global).unwrap();
        // RMS now [0.5, 2.12, 1], [2, 0.1, 4]: the three smallest kernels go.
        assert_eq!(m[0].as_bytes(), &[0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 1]);
        // Columns that are not whole kernels, and a taps list of the wrong length.
        assert!(kernel_prune(&[input("a", &w, 6)], &[4], 0.5, Scope::Global).is_err());
        assert!(kernel_prune(&[input("a", &w, 6)], &[0], 0.5, Scope::Global).is_err());
        assert!(kernel_prune(&[input("a", &w, 6)], &[2, 2], 0.5, Scope::Global).is_err());
        // A mask of another shape than the layer's.
        let other = Mask::ones(3, 4);
        let l = PruneInput {
            mask: Some(&other),
            ..input("a", &w, 6)
        };
        assert!(kernel_prune(&[l], &[2], 0.5, Scope::Global).is_err());
        assert!(magnitude_prune(&[l], 0.5, Scope::Global).is_err());
        // Kernels of one weight: the same as weight pruning.
        let one = kernel_prune(&[input("a", &w, 6)], &[1], 0.25, Scope::Layer).unwrap();
        let unit = magnitude_prune(&[input("a", &w, 6)], 0.25, Scope::Layer).unwrap();
        assert_eq!(one, unit);
    }

    proptest::proptest! {
        /// Every kernel is all kept or all pruned, and the kept kernels' count is the target's.
        #[test]
        fn kernel_masks_are_whole_kernels(
            rows in 1usize..6,
            kernels in 1usize..7,
            kk in 1usize..10,
            sparsity in 0.05f64..0.95,
            seed in 0u64..1000,
        ) {
            let n = rows * kernels * kk;
            let w: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let total = rows * kernels;
            proptest::prop_assume!(((sparsity * total as f64).round() as usize) >= 1);
            let m = kernel_prune(&[input("a", &w, kernels * kk)], &[kk], sparsity, Scope::Global)
                .unwrap();
            let b = m[0].as_bytes();
            let mut kept = 0;
            for k in b.chunks_exact(kk) {
                proptest::prop_assert!(k.iter().all(|&v| v == k[0]));
                kept += usize::from(k[0] != 0);
            }
            proptest::prop_assert_eq!(kept, total - (sparsity * total as f64).round() as usize);
        }
    }

    #[test]
    fn sparsity_bounds() {
        let w = [1.0f32; 4];
        for s in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(magnitude_prune(&[input("a", &w, 2)], s, Scope::Global).is_err());
        }
    }
}
