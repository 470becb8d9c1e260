//! Property tests: every pattern's output satisfies its defining property on random masks and
//! shapes (1 row, primes, non-multiples of b and M, conv shapes), results are deterministic for a
//! seed, and files round-trip. The property checkers here are written independently of
//! `coarsen_core::patterns::check`, so a bug there cannot hide a bug in an algorithm.

use std::collections::HashMap;

use coarsen_core::patterns::{
    BlockConfig, ChannelConfig, ChannelCriterion, GroupConfig, NmConfig, PartCount, Partitioner,
    ShuffledConfig,
};
use coarsen_core::{
    convert_layer, LayerInput, LayerStatus, Mask, MaskFile, MaskTensor, MatrixView, Pattern,
    WeightFile, WeightTensor,
};
use proptest::prelude::*;

/// A layer: shape (2-D or 4-D), mask with at least one 1, weights.
fn layer() -> impl Strategy<Value = (Vec<usize>, Vec<u8>, Vec<f32>)> {
    let shape = prop_oneof![
        (1usize..40, 1usize..70).prop_map(|(r, c)| vec![r, c]),
        (1usize..20, 1usize..12, 1usize..4).prop_map(|(o, i, k)| vec![o, i, k, k]),
        Just(vec![1, 1]),
        Just(vec![17, 31]),
        Just(vec![37, 8, 3, 3]),
    ];
    (shape, 0.02f64..1.0).prop_flat_map(|(shape, density)| {
        let n: usize = shape.iter().product();
        (
            Just(shape),
            prop::collection::vec(prop::bool::weighted(density), n),
            prop::collection::vec(-3.0f32..3.0, n),
        )
            .prop_map(|(shape, bits, w)| {
                let mut mask: Vec<u8> = bits.into_iter().map(u8::from).collect();
                if !mask.contains(&1) {
                    mask[0] = 1;
                }
                (shape, mask, w)
            })
    })
}

fn run(
    shape: &[usize],
    mask: &[u8],
    w: &[f32],
    pattern: &Pattern,
    seed: u64,
) -> (Mask, coarsen_core::LayerOutcome) {
    let v = MatrixView::of(shape).unwrap();
    let m = Mask::from_bytes(v.rows, v.cols, mask.to_vec()).unwrap();
    let out = convert_layer(
        &LayerInput {
            name: "layer",
            shape,
            mask: &m,
            weights: Some(w),
            scores: None,
        },
        pattern,
        seed,
    )
    .expect("conversion succeeds on valid input");
    (m, out)
}

/// Distinct non-empty row patterns with their row counts.
fn patterns(m: &Mask) -> HashMap<Vec<u8>, usize> {
    let mut h = HashMap::new();
    for r in 0..m.rows() {
        let row = m.row(r).to_vec();
        if row.contains(&1) {
            *h.entry(row).or_insert(0) += 1;
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn channel_rows_are_all_or_nothing((shape, mask, w) in layer(), extra in 0.0f64..0.5, count in any::<bool>()) {
        let cfg = ChannelConfig {
            criterion: if count { ChannelCriterion::Count } else { ChannelCriterion::L1 },
            extra,
        };
        let (input, out) = run(&shape, &mask, &w, &Pattern::Channel(cfg), 0);
        let m = &out.mask;
        for r in 0..m.rows() {
            let ones = m.row(r).iter().filter(|&&b| b == 1).count();
            prop_assert!(ones == 0 || ones == m.cols());
        }
        // Refill keeps at least the input density (k = ceil(d·R + ...)).
        prop_assert!(m.nnz() >= input.nnz());
        prop_assert!(m.nnz() <= input.nnz() + m.cols() + ((m.rows() as f64 * extra).ceil() as usize) * m.cols());
    }

    #[test]
    fn group_has_at_most_k_row_patterns((shape, mask, w) in layer(), parts in 1usize..6, auto in any::<bool>(), random in any::<bool>(), legacy in any::<bool>(), seed in 0u64..4) {
        let cfg = GroupConfig {
            parts: if auto { PartCount::Auto } else { PartCount::Fixed(parts) },
            min_rows: 2,
            row_tile: 4,
            partitioner: if random { Partitioner::Random } else { Partitioner::Metis },
            legacy,
            ..Default::default()
        };
        let (input, out) = run(&shape, &mask, &w, &Pattern::Group(cfg), seed);
        let k = out.stats.parts.unwrap();
        prop_assert!(k >= 1);
        if out.status == LayerStatus::Unstructured {
            prop_assert_eq!(&out.mask, &input);
            prop_assert!(out.reason.is_some());
        } else {
            prop_assert!(patterns(&out.mask).len() <= k);
            prop_assert!(out.stats.blocks.unwrap() >= 1);
        }
    }

    #[test]
    fn shuffled_blocks_are_whole_tiles((shape, mask, w) in layer(), b in 1usize..9, k in proptest::option::of(1usize..20)) {
        let cfg = ShuffledConfig { block: b, blocks: k, similarity: None, kernels: false };
        let (input, out) = run(&shape, &mask, &w, &Pattern::ShuffledBlock(cfg), 0);
        let m = &out.mask;
        let (rr, cr) = (m.rows() % b, m.cols() % b);
        let mut short = 0;
        for (row, count) in patterns(m) {
            let cols = row.iter().filter(|&&x| x == 1).count();
            if count % b != 0 {
                prop_assert_eq!(count % b, rr);
                short += 1;
            }
            prop_assert!(cols % b == 0 || cols % b == cr, "cols {} b {}", cols, b);
        }
        prop_assert!(short <= 1);
        // Tile count: K, or fewer when fewer candidates have any mass.
        let want = k.unwrap_or_else(|| input.nnz().div_ceil(b * b));
        prop_assert!(out.stats.blocks.unwrap() <= want);
    }

    #[test]
    fn aligned_tiles_are_all_or_nothing((shape, mask, w) in layer(), h in 1usize..7, wd in 1usize..7) {
        let (input, out) = run(&shape, &mask, &w, &Pattern::Block(BlockConfig { height: h, width: wd }), 0);
        let m = &out.mask;
        for i in (0..m.rows()).step_by(h) {
            for j in (0..m.cols()).step_by(wd) {
                let first = m.get(i, j);
                for r in i..(i + h).min(m.rows()) {
                    for c in j..(j + wd).min(m.cols()) {
                        prop_assert_eq!(m.get(r, c), first);
                    }
                }
            }
        }
        // Tiles are added until they cover as many entries as the input has ones, unless every
        // tile holding a one is already kept.
        prop_assert!(m.nnz() >= input.nnz() || m.overlap(&input) == input.nnz());
    }

    #[test]
    fn nm_groups_hold_at_most_n((shape, mask, w) in layer(), n in 1usize..4, extra in 0usize..3, permute in any::<bool>(), seed in 0u64..3) {
        let cfg = NmConfig { n, m: n + extra, permute, escape_attempts: 3, ..Default::default() };
        let (input, out) = run(&shape, &mask, &w, &Pattern::Nm(cfg), seed);
        let v = MatrixView::of(&shape).unwrap();
        let perm: Vec<usize> = out.col_perm.clone().unwrap_or_else(|| (0..v.in_channels).collect());
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..v.in_channels).collect::<Vec<_>>());
        for r in 0..v.rows {
            for s in 0..v.inner {
                for group in perm.chunks(n + extra) {
                    let ones = group.iter().filter(|&&c| out.mask.get(r, c * v.inner + s)).count();
                    prop_assert!(ones <= n);
                }
            }
        }
        // N:M never keeps an entry the input mask removed.
        prop_assert_eq!(out.mask.overlap(&input), out.mask.nnz());
    }

    #[test]
    fn nm_fill_makes_every_group_exactly_n_and_keeps_the_plain_result((shape, mask, w) in layer(), n in 1usize..4, extra in 0usize..3, permute in any::<bool>(), seed in 0u64..3) {
        let m = n + extra;
        let base = NmConfig { n, m, permute, escape_attempts: 3, ..Default::default() };
        let (_, plain) = run(&shape, &mask, &w, &Pattern::Nm(base), seed);
        let (_, out) = run(&shape, &mask, &w, &Pattern::Nm(NmConfig { fill: true, ..base }), seed);
        let v = MatrixView::of(&shape).unwrap();
        prop_assert_eq!(&out.col_perm, &plain.col_perm);
        let perm: Vec<usize> = out.col_perm.clone().unwrap_or_else(|| (0..v.in_channels).collect());
        for r in 0..v.rows {
            for s in 0..v.inner {
                for group in perm.chunks(m) {
                    let ones = group.iter().filter(|&&c| out.mask.get(r, c * v.inner + s)).count();
                    prop_assert_eq!(ones, n.min(group.len()));
                }
            }
        }
        // The unfilled result's ones all stay.
        prop_assert_eq!(out.mask.overlap(&plain.mask), plain.mask.nnz());
    }

    #[test]
    fn permutation_never_loses_magnitude((shape, mask, w) in layer(), seed in 0u64..3) {
        let plain = run(&shape, &mask, &w, &Pattern::Nm(NmConfig::default()), seed).1;
        let cfg = NmConfig { permute: true, escape_attempts: 5, ..Default::default() };
        let permuted = run(&shape, &mask, &w, &Pattern::Nm(cfg), seed).1;
        prop_assert!(permuted.mask.magnitude(&w) + 1e-3 >= plain.mask.magnitude(&w));
    }

    /// Group and shuffled blocks over kernels keep every kernel whole, keep every kernel of the
    /// input that has a kept weight's block (or the input mask, where the layer stays
    /// unstructured), and hold the pattern's property in the weight view: row classes of
    /// multiples of b rows × b columns (b kernels of kh·kw weights), at most `parts` classes.
    #[test]
    fn kernel_conversions_keep_whole_kernels((shape, mask, w) in layer(), shuffled in any::<bool>(), seed in 0u64..4) {
        let pattern = if shuffled {
            Pattern::ShuffledBlock(ShuffledConfig { block: 2, kernels: true, ..Default::default() })
        } else {
            Pattern::Group(GroupConfig { min_rows: 1, row_tile: 2, kernels: true, ..Default::default() })
        };
        let (input, out) = run(&shape, &mask, &w, &pattern, seed);
        let taps: usize = shape[2..].iter().product();
        let m = &out.mask;
        if out.status == LayerStatus::Unstructured {
            prop_assert_eq!(m, &input);
            return Ok(());
        }
        for r in 0..m.rows() {
            for k in m.row(r).chunks(taps) {
                prop_assert!(k.iter().all(|&b| b == k[0]), "a kernel cut apart");
            }
        }
        // The same conversion of the kernel view, expanded, is the result.
        let kc = m.cols() / taps;
        let kmask: Vec<u8> = (0..m.rows() * kc)
            .map(|i| u8::from((0..taps).any(|t| input.get(i / kc, i % kc * taps + t))))
            .collect();
        let kw: Vec<f32> = (0..m.rows() * kc)
            .map(|i| {
                let (r, c) = (i / kc, i % kc);
                let s: f64 = (0..taps)
                    .filter(|&t| input.get(r, c * taps + t))
                    .map(|t| f64::from(w[r * m.cols() + c * taps + t]).powi(2))
                    .sum();
                (s / taps as f64).sqrt() as f32
            })
            .collect();
        let plain = match &pattern {
            Pattern::Group(g) => Pattern::Group(GroupConfig { kernels: false, ..*g }),
            Pattern::ShuffledBlock(s) => Pattern::ShuffledBlock(ShuffledConfig { kernels: false, ..*s }),
            _ => unreachable!(),
        };
        let (_, kout) = run(&[m.rows(), kc], &kmask, &kw, &plain, seed);
        for r in 0..m.rows() {
            for c in 0..kc {
                prop_assert_eq!(m.get(r, c * taps), kout.mask.get(r, c));
            }
        }
        let v = MatrixView::of(&shape).unwrap();
        prop_assert!(coarsen_core::patterns::check(&pattern, m, v, out.stats.parts.unwrap_or(0), None).is_ok());
    }

    #[test]
    fn conversions_are_deterministic((shape, mask, w) in layer(), seed in 0u64..1000) {
        for p in [
            Pattern::Group(GroupConfig { min_rows: 1, row_tile: 2, ..Default::default() }),
            Pattern::ShuffledBlock(ShuffledConfig { block: 3, blocks: None, similarity: None, kernels: false }),
            Pattern::Nm(NmConfig { permute: true, escape_attempts: 4, ..Default::default() }),
        ] {
            let a = run(&shape, &mask, &w, &p, seed).1;
            let b = run(&shape, &mask, &w, &p, seed).1;
            prop_assert_eq!(a.mask, b.mask);
            prop_assert_eq!(a.col_perm, b.col_perm);
        }
    }

    #[test]
    fn mask_files_round_trip(tensors in prop::collection::vec((1usize..6, 1usize..9, any::<u64>()), 1..5)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let list: Vec<MaskTensor> = tensors
            .iter()
            .enumerate()
            .map(|(i, &(r, c, bits))| MaskTensor {
                name: format!("layer{i}.weight"),
                shape: vec![r, c],
                data: (0..r * c).map(|k| ((bits >> (k % 64)) & 1) as u8).collect(),
            })
            .collect();
        let f = MaskFile::new("mem", list);
        f.write(&path).unwrap();
        let back = MaskFile::read(&path).unwrap();
        prop_assert_eq!(back.tensors(), f.tensors());
    }

    #[test]
    fn weight_files_round_trip(values in prop::collection::vec(prop::num::f32::NORMAL | prop::num::f32::ZERO, 1..64)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = WeightTensor::new("w", vec![values.len()], values.clone()).unwrap();
        WeightFile::write_f32(&path, &[t]).unwrap();
        let back = WeightFile::read(&path).unwrap();
        prop_assert_eq!(back.get("w").unwrap().values().unwrap(), &values[..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Density targeting keeps every pattern's property, never empties a layer, and either
    /// reaches the target within one point or says why not.
    #[test]
    fn targeting_keeps_the_structure_and_reaches_or_explains((shape, mask, w) in layer(), which in 0usize..5, density in 0.02f64..1.0, seed in 0u64..4) {
        use coarsen_core::target::{retarget, within, DensityTarget, TargetLayer};
        let pattern = match which {
            0 => Pattern::Channel(ChannelConfig::default()),
            1 => Pattern::Group(GroupConfig { min_rows: 1, row_tile: 4, ..Default::default() }),
            2 => Pattern::ShuffledBlock(ShuffledConfig { block: 4, blocks: None, similarity: None, kernels: false }),
            3 => Pattern::Block(BlockConfig { height: 2, width: 4 }),
            _ => Pattern::Nm(NmConfig { n: 2, m: 4, ..Default::default() }),
        };
        let (input, mut out) = run(&shape, &mask, &w, &pattern, seed);
        let Some(structure) = out.structure.clone() else {
            prop_assert!(out.status != LayerStatus::Structured);
            return Ok(());
        };
        let parts = out.stats.parts.unwrap_or(0);
        let before = patterns(&out.mask).len();
        let mut layers = [TargetLayer {
            name: "layer",
            structure: &structure,
            mask: &mut out.mask,
            input: &input,
            weights: Some(&w),
        }];
        let result = retarget(&mut layers, &DensityTarget::per_layer(density)).unwrap();
        let v = MatrixView::of(&shape).unwrap();
        prop_assert!(out.mask.nnz() > 0, "a layer is never emptied");
        prop_assert!(
            coarsen_core::patterns::check(&pattern, &out.mask, v, parts, out.col_perm.as_deref()).is_ok()
        );
        if matches!(pattern, Pattern::Group(_)) {
            prop_assert!(patterns(&out.mask).len() <= before, "group never gains row patterns");
        }
        let reached = out.mask.density();
        prop_assert_eq!(within(reached, density), result[0].note.is_none(), "reached {} for {}", reached, density);
        // How close the structure allows: half a unit each way, a unit for safety.
        let (rows, cols) = (v.rows as f64, v.cols as f64);
        let len = rows * cols;
        let slack = match pattern {
            Pattern::Channel(_) => 1.0 / rows,
            Pattern::Group(_) => 1.0 / rows + 1.0 / cols,
            Pattern::ShuffledBlock(_) => 16.0 / len,
            Pattern::Block(_) => 8.0 / len,
            _ => 1.0 / len,
        };
        let tol = coarsen_core::target::TOLERANCE + slack + 1e-9;
        if let Pattern::Nm(c) = pattern {
            let cap = c.n as f64 / c.m as f64;
            prop_assert!(reached >= density.min(cap) - tol, "N:M reached {} for {}", reached, density);
            prop_assert!(reached <= density + tol, "N:M reached {} for {}", reached, density);
        } else {
            prop_assert!((reached - density).abs() <= tol, "reached {} for {} (slack {})", reached, density, slack);
        }
    }
}
