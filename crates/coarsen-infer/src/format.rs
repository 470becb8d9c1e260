//! How each layer is stored and run: the packed format of every conv and linear weight, chosen
//! from its mask and the mask file's coarsen metadata.

use std::collections::BTreeMap;

use coarsen_core::patterns::check::{check_block, check_channel, check_shuffled};
use coarsen_core::patterns::row_classes;
use coarsen_core::patterns::Pattern;
use coarsen_core::{CoarsenMetadata, LayerStatus, Mask, MaskSet, MatrixView};
use coarsen_kernels::{
    Bsr, ChannelCompact, Csr, Dense, GroupBlocks, NmCompressed, Packed, ShuffledBlocks,
};
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::graph::Graph;

/// Unstructured layers at or below this density run as CSR; denser ones run dense (CSR does not
/// beat a strong dense GEMM above it on CPUs).
pub const CSR_MAX_DENSITY: f64 = 0.1;

/// How one layer is stored and run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "kebab-case")]
pub enum LayerFormat {
    /// Dense (on the dense GEMM).
    Dense,
    /// Compressed sparse rows (unstructured and very sparse).
    Csr,
    /// Kept output channels, dense; reads only the input channels its producer kept.
    Channel,
    /// Group blocks (Regroup).
    Group,
    /// Shuffled blocks of `block` rows (DSB).
    ShuffledBlock {
        /// Rows per block.
        block: usize,
    },
    /// Aligned `height × width` tiles.
    Bsr {
        /// Tile height.
        height: usize,
        /// Tile width.
        width: usize,
    },
    /// N:M along input channels, after the input-channel permutation `col_perm`.
    Nm {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
        /// `perm[new] = old`, when one was searched.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        col_perm: Option<Vec<usize>>,
    },
}

/// The format of every conv and linear weight, by weight name (a weight missing is dense).
pub type Formats = BTreeMap<String, LayerFormat>;

impl LayerFormat {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            LayerFormat::Dense => "dense",
            LayerFormat::Csr => "csr",
            LayerFormat::Channel => "channel",
            LayerFormat::Group => "group",
            LayerFormat::ShuffledBlock { .. } => "shuffled-block",
            LayerFormat::Bsr { .. } => "bsr",
            LayerFormat::Nm { .. } => "nm",
        }
    }

    /// The name with its parameters, for tables: `shuffled-block:16`, `bsr:16x8`, `nm:2:4`.
    pub fn label(&self) -> String {
        match self {
            LayerFormat::ShuffledBlock { block } => format!("shuffled-block:{block}"),
            LayerFormat::Bsr { height, width } => format!("bsr:{height}x{width}"),
            LayerFormat::Nm { n, m, .. } => format!("nm:{n}:{m}"),
            other => other.name().to_string(),
        }
    }

    /// Packs a whole weight matrix (`values`, row-major in `view`) under `mask` in this format;
    /// the dense format zeroes the masked-out values. (The engine packs its layers itself: it
    /// shrinks their inputs to the channels a producer kept.)
    pub fn pack(
        &self,
        mask: &Mask,
        values: &[f32],
        view: MatrixView,
    ) -> coarsen_kernels::Result<Packed> {
        Ok(match self {
            LayerFormat::Dense => {
                let masked = values
                    .iter()
                    .zip(mask.as_bytes())
                    .map(|(&v, &keep)| if keep == 0 { 0.0 } else { v })
                    .collect();
                Packed::Dense(Dense::new(view.rows, view.cols, masked)?)
            }
            LayerFormat::Channel => Packed::Channel(ChannelCompact::pack(mask, values, None)?),
            LayerFormat::Group => Packed::Group(GroupBlocks::pack(mask, values)?),
            LayerFormat::Csr => Packed::Csr(Csr::pack(mask, values)?),
            LayerFormat::ShuffledBlock { block } => {
                Packed::Shuffled(ShuffledBlocks::pack(mask, values, *block)?)
            }
            LayerFormat::Bsr { height, width } => {
                Packed::Bsr(Bsr::pack(mask, values, *height, *width)?)
            }
            LayerFormat::Nm { n, m, col_perm } => Packed::Nm(NmCompressed::pack(
                mask,
                values,
                view,
                *n,
                *m,
                col_perm.as_deref(),
            )?),
        })
    }

    /// Whether the format can read a subset of the input channels (the others were removed by
    /// a channel-sparse producer); the other formats read every input channel.
    pub fn shrinks_input(&self) -> bool {
        matches!(
            self,
            LayerFormat::Dense | LayerFormat::Csr | LayerFormat::Channel | LayerFormat::Group
        )
    }

    /// The format a pattern of `coarsen convert` runs in (`layer` is the layer's metadata, for
    /// N:M's permutation).
    pub fn of_pattern(pattern: &Pattern, col_perm: Option<&[usize]>) -> LayerFormat {
        match pattern {
            Pattern::Channel(_) => LayerFormat::Channel,
            Pattern::Group(_) => LayerFormat::Group,
            Pattern::ShuffledBlock(c) => LayerFormat::ShuffledBlock { block: c.block },
            Pattern::Block(c) => LayerFormat::Bsr {
                height: c.height,
                width: c.width,
            },
            Pattern::Nm(c) => LayerFormat::Nm {
                n: c.n,
                m: c.m,
                col_perm: col_perm.map(<[usize]>::to_vec),
            },
        }
    }
}

/// The format of every conv and linear weight of `graph`: from the mask file's coarsen metadata
/// `meta` where a layer is structured; otherwise channel-compact when every row is full or
/// empty, CSR at density ≤ [`CSR_MAX_DENSITY`], dense above. Weights without a mask, or with
/// an all-ones mask, are dense.
pub fn layer_formats(
    graph: &Graph,
    masks: &MaskSet,
    meta: Option<&CoarsenMetadata>,
) -> Result<Formats> {
    let pattern = match meta {
        Some(m) => Some(Pattern::from_metadata(&m.pattern, &m.params)?),
        None => None,
    };
    let mut out = Formats::new();
    for (_, weight) in graph.weights() {
        let Some(m) = masks.get(weight) else {
            out.insert(weight.to_string(), LayerFormat::Dense);
            continue;
        };
        if m.nnz() == m.len() {
            out.insert(weight.to_string(), LayerFormat::Dense);
            continue;
        }
        let layer = meta.and_then(|mm| mm.layers.get(weight));
        let structured = layer.is_some_and(|l| l.status == LayerStatus::Structured);
        let fmt = match (&pattern, structured) {
            (Some(p), true) => {
                LayerFormat::of_pattern(p, layer.and_then(|l| l.col_perm.as_deref()))
            }
            _ if check_channel(m.mask()).is_ok() => LayerFormat::Channel,
            _ if m.density() <= CSR_MAX_DENSITY => LayerFormat::Csr,
            _ => LayerFormat::Dense,
        };
        out.insert(weight.to_string(), fmt);
    }
    Ok(out)
}

/// The format a mask alone calls for, when no conversion metadata says which pattern made it:
/// dense when it is full; channel-compact when every row is full or empty; aligned 16×16 tiles
/// (BSR) or shuffled blocks of 16 when it has that structure; group blocks when its rows share
/// few column patterns (at most one per 8 rows, so that each gathered column feeds a register
/// tile of rows); CSR at density ≤ [`CSR_MAX_DENSITY`]; dense above.
pub fn detect_format(mask: &Mask) -> LayerFormat {
    const B: usize = 16;
    if mask.nnz() == mask.len() {
        return LayerFormat::Dense;
    }
    if check_channel(mask).is_ok() {
        return LayerFormat::Channel;
    }
    if check_block(mask, B, B).is_ok() {
        return LayerFormat::Bsr {
            height: B,
            width: B,
        };
    }
    if mask.rows() >= B && check_shuffled(mask, B).is_ok() {
        return LayerFormat::ShuffledBlock { block: B };
    }
    if row_classes(mask).len() <= (mask.rows() / 8).max(1) {
        return LayerFormat::Group;
    }
    let density = mask.nnz() as f64 / mask.len().max(1) as f64;
    if density <= CSR_MAX_DENSITY {
        LayerFormat::Csr
    } else {
        LayerFormat::Dense
    }
}

/// Random structured masks of `format` at `density` (N:M is always N/M) on the weights
/// `shapes` (name, shape), for speed measurements: channel (rows kept at random), group (blocks
/// of 32 rows on random column sets), shuffled blocks, BSR, N:M along input channels, CSR
/// (Bernoulli). Deterministic in `seed`.
pub fn random_masks(
    shapes: &[(String, Vec<usize>)],
    format: &LayerFormat,
    density: f64,
    seed: u64,
) -> Result<MaskSet> {
    use coarsen_kernels::bench::{random_packed, BenchFormat};
    use rand::{Rng, SeedableRng};
    let mut masks = MaskSet::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let view = MatrixView::of(shape).ok_or_else(|| {
            InferError::tensor(name, shape, "a mask needs a weight of rank 2 or more")
        })?;
        let s = seed.wrapping_add(i as u64);
        let bench = match format {
            LayerFormat::Channel => Some(BenchFormat::Channel),
            LayerFormat::Group => Some(BenchFormat::Group { rows: 32 }),
            LayerFormat::ShuffledBlock { block } => Some(BenchFormat::Shuffled { b: *block }),
            LayerFormat::Bsr { height, width } => Some(BenchFormat::Bsr {
                h: *height,
                w: *width,
            }),
            LayerFormat::Csr => Some(BenchFormat::Csr),
            LayerFormat::Dense | LayerFormat::Nm { .. } => None,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
        let bytes = match (bench, format) {
            (Some(b), _) => random_packed(b, view.rows, view.cols, density, s)
                .map_err(|e| InferError::kernel(name, e))?
                .mask()
                .into_bytes(),
            (None, LayerFormat::Nm { n, m, .. }) => random_nm_mask(&mut rng, view, *n, *m, None),
            _ => (0..view.len())
                .map(|_| u8::from(rng.random_bool(density.clamp(0.0, 1.0))))
                .collect(),
        };
        masks.insert_bytes(name.clone(), shape, bytes)?;
    }
    Ok(masks)
}

/// A random N:M mask of `view`: in every group of `m` input channels (after `perm`,
/// `perm[new] = old`; identity when `None`) at every kernel position, `n` channels drawn at
/// random.
pub fn random_nm_mask(
    rng: &mut rand_chacha::ChaCha8Rng,
    view: MatrixView,
    n: usize,
    m: usize,
    perm: Option<&[usize]>,
) -> Vec<u8> {
    use rand::Rng;
    let (cin, inner) = (view.in_channels, view.inner);
    let mut mk = vec![0u8; view.len()];
    for r in 0..view.rows {
        for k in 0..inner {
            for g0 in (0..cin).step_by(m.max(1)) {
                let gl = m.min(cin - g0);
                let mut picks: Vec<usize> = (0..gl).collect();
                for a in 0..gl {
                    let b = rng.random_range(a..gl);
                    picks.swap(a, b);
                }
                for &q in picks.iter().take(n) {
                    let c = perm.map_or(g0 + q, |p| p[g0 + q]);
                    mk[r * view.cols + view.col(c, k)] = 1;
                }
            }
        }
    }
    mk
}

#[cfg(test)]
mod detect_tests {
    use super::*;

    #[test]
    fn packs_and_labels_every_format() {
        let view = MatrixView::of(&[8, 8]).unwrap();
        let mask = Mask::from_fn(8, 8, |r, c| r < 4 && c % 2 == 0);
        let values: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        // The dense format keeps only the mask's values.
        let Packed::Dense(d) = LayerFormat::Dense.pack(&mask, &values, view).unwrap() else {
            panic!("dense expected");
        };
        assert_eq!(d.values()[2], 3.0);
        assert_eq!(d.values()[1], 0.0);
        assert_eq!(d.values()[40], 0.0);
        for (f, label) in [
            (LayerFormat::Csr, "csr"),
            (LayerFormat::Group, "group"),
            (LayerFormat::ShuffledBlock { block: 4 }, "shuffled-block:4"),
            (
                LayerFormat::Bsr {
                    height: 4,
                    width: 2,
                },
                "bsr:4x2",
            ),
        ] {
            assert_eq!(f.label(), label);
            let p = f.pack(&mask, &values, view).unwrap();
            assert_eq!(p.shape(), (8, 8), "{label}");
        }
        // A mask that is not channel-sparse is refused by the channel format.
        assert!(LayerFormat::Channel.pack(&mask, &values, view).is_err());
    }

    #[test]
    fn detects_formats_from_masks() {
        assert_eq!(
            detect_format(&Mask::from_fn(32, 32, |_, _| true)),
            LayerFormat::Dense
        );
        assert_eq!(
            detect_format(&Mask::from_fn(32, 32, |r, _| r % 3 == 0)),
            LayerFormat::Channel
        );
        let bsr = detect_format(&Mask::from_fn(32, 64, |r, c| (r / 16 + c / 16) % 2 == 0));
        assert_eq!(
            bsr,
            LayerFormat::Bsr {
                height: 16,
                width: 16
            }
        );
        // Two row patterns over 64 rows, not tile-aligned: group blocks.
        let group = Mask::from_fn(
            64,
            64,
            |r, c| if r % 2 == 0 { c % 3 == 0 } else { c % 5 == 1 },
        );
        assert_eq!(detect_format(&group), LayerFormat::Group);
        // Scattered: CSR when very sparse, dense otherwise.
        let h = |r: usize, c: usize| (r * 7919 + c * 104_729) % 97;
        assert_eq!(
            detect_format(&Mask::from_fn(64, 64, |r, c| h(r, c) < 5)),
            LayerFormat::Csr
        );
        assert_eq!(
            detect_format(&Mask::from_fn(64, 64, |r, c| h(r, c) < 40)),
            LayerFormat::Dense
        );
    }
}
