//! Benchmark cases: the default shape table, random structured masks of a given density for each
//! format, and the measurement of one case against the dense baseline in the same run.

use std::str::FromStr;

use coarsen_core::{Mask, MatrixView};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{KernelError, Result};
use crate::formats::{
    Bsr, ChannelCompact, Csr, Dense, GroupBlocks, NmCompressed, Packed, ShuffledBlocks,
};
use crate::timing::{interleaved, repetitions};
use crate::{DenseKernel, Plan, Threading};

/// A GEMM shape `Y[rows × n] = W[rows × cols]·X[cols × n]` with a label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Where the shape comes from, e.g. `resnet18 layer4.0.conv2`.
    pub label: String,
    /// Rows of `W` (output channels).
    pub rows: usize,
    /// Columns of `W` (input channels × kernel positions).
    pub cols: usize,
    /// Columns of `X` (batch × output positions, or tokens).
    pub n: usize,
}

/// The default shape set: the conv layers of CIFAR ResNet-18 and VGG-16 as im2col GEMMs at batch
/// `batch` (each distinct shape once), and transformer MLP shapes (hidden 384 and 768, 4×
/// intermediate, 8 sequences of 128 tokens).
pub fn default_cases(batch: usize) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for model in ["resnet18", "vgg16"] {
        if let Ok(arch) = coarsen_core::zoo::by_name(model, 10) {
            for conv in &arch.convs {
                let (rows, cols, n) = conv.gemm_shape(batch);
                if !cases
                    .iter()
                    .any(|c| (c.rows, c.cols, c.n) == (rows, cols, n))
                {
                    let name = conv.name.trim_end_matches(".weight");
                    cases.push(Case {
                        label: format!("{model} {name}"),
                        rows,
                        cols,
                        n,
                    });
                }
            }
        }
    }
    for hidden in [384, 768] {
        let tokens = 8 * 128;
        cases.push(Case {
            label: format!("mlp{hidden} up"),
            rows: 4 * hidden,
            cols: hidden,
            n: tokens,
        });
        cases.push(Case {
            label: format!("mlp{hidden} down"),
            rows: hidden,
            cols: 4 * hidden,
            n: tokens,
        });
    }
    cases
}

/// A format to benchmark, with its structure parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchFormat {
    /// coarsen's own tiled dense GEMM on the whole matrix (density 1 whatever the requested
    /// density), against the faer baseline.
    Dense,
    /// Kept rows, dense.
    Channel,
    /// Dense blocks of `rows` rows on random column sets (Regroup's row tile is 32).
    Group {
        /// Rows per block.
        rows: usize,
    },
    /// Shuffled blocks of size b.
    Shuffled {
        /// Block size.
        b: usize,
    },
    /// Aligned tiles.
    Bsr {
        /// Tile height.
        h: usize,
        /// Tile width.
        w: usize,
    },
    /// N:M (density N/M whatever the requested density).
    Nm {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
    /// Unstructured.
    Csr,
}

impl BenchFormat {
    /// The formats of a default run.
    pub fn defaults() -> Vec<BenchFormat> {
        vec![
            BenchFormat::Dense,
            BenchFormat::Group { rows: 32 },
            BenchFormat::Shuffled { b: 16 },
            BenchFormat::Shuffled { b: 32 },
            BenchFormat::Bsr { h: 16, w: 16 },
            BenchFormat::Bsr { h: 32, w: 32 },
            BenchFormat::Channel,
            BenchFormat::Nm { n: 2, m: 4 },
            BenchFormat::Csr,
        ]
    }

    /// The name as `FromStr` reads it, e.g. `shuffled-block:16`, `bsr:32x32`, `nm:2:4`.
    pub fn label(&self) -> String {
        match self {
            BenchFormat::Dense => "dense".into(),
            BenchFormat::Channel => "channel".into(),
            BenchFormat::Group { rows } => format!("group:{rows}"),
            BenchFormat::Shuffled { b } => format!("shuffled-block:{b}"),
            BenchFormat::Bsr { h, w } => format!("bsr:{h}x{w}"),
            BenchFormat::Nm { n, m } => format!("nm:{n}:{m}"),
            BenchFormat::Csr => "csr".into(),
        }
    }
}

impl FromStr for BenchFormat {
    type Err = KernelError;

    /// `channel`, `group[:rows]`, `shuffled-block[:b]`, `bsr[:HxW]`, `nm[:N:M]`, `csr`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| KernelError::Param {
            name: "format",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let num = |x: &str| {
            x.parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| bad("sizes must be positive integers"))
        };
        let (name, arg) = s.split_once(':').map_or((s, None), |(a, b)| (a, Some(b)));
        Ok(match (name, arg) {
            ("dense", None) => BenchFormat::Dense,
            ("channel", None) => BenchFormat::Channel,
            ("csr", None) => BenchFormat::Csr,
            ("group", a) => BenchFormat::Group {
                rows: a.map_or(Ok(32), num)?,
            },
            ("shuffled-block" | "shuffled", a) => BenchFormat::Shuffled {
                b: a.map_or(Ok(16), num)?,
            },
            ("bsr" | "block", None) => BenchFormat::Bsr { h: 16, w: 16 },
            ("bsr" | "block", Some(a)) => {
                let (h, w) = a.split_once(['x', 'X']).unwrap_or((a, a));
                BenchFormat::Bsr {
                    h: num(h)?,
                    w: num(w)?,
                }
            }
            ("nm", None) => BenchFormat::Nm { n: 2, m: 4 },
            ("nm", Some(a)) => {
                let (n, m) = a.split_once(':').ok_or_else(|| bad("expected nm:N:M"))?;
                let (n, m) = (num(n)?, num(m)?);
                if n > m {
                    return Err(bad("N must not exceed M"));
                }
                BenchFormat::Nm { n, m }
            }
            _ => return Err(bad(
                "expected dense, channel, group[:rows], shuffled-block[:b], bsr[:HxW], nm[:N:M] or csr",
            )),
        })
    }
}

/// `count` distinct indices of `0..n`, ascending.
fn choose(rng: &mut ChaCha8Rng, n: usize, count: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(rng);
    all.truncate(count.min(n));
    all.sort_unstable();
    all
}

/// A random mask of `format`'s structure at about `density` (N:M is always N/M), with uniform
/// random weights in [-1, 1), packed.
pub fn random_packed(
    format: BenchFormat,
    rows: usize,
    cols: usize,
    density: f64,
    seed: u64,
) -> Result<Packed> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(KernelError::Param {
            name: "density",
            value: density.to_string(),
            reason: "must lie in (0, 1]".into(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let weights: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let keep = |total: usize| ((density * total as f64).round() as usize).clamp(1, total.max(1));
    Ok(match format {
        BenchFormat::Dense => Packed::Dense(Dense::new(rows, cols, weights)?),
        BenchFormat::Channel => {
            let kept = choose(&mut rng, rows, keep(rows));
            let mut on = vec![false; rows];
            kept.iter().for_each(|&r| on[r] = true);
            Packed::Channel(ChannelCompact::pack(
                &Mask::from_fn(rows, cols, |r, _| on[r]),
                &weights,
                None,
            )?)
        }
        BenchFormat::Group { rows: per } => {
            let mut order: Vec<usize> = (0..rows).collect();
            order.shuffle(&mut rng);
            let mut mask = Mask::zeros(rows, cols);
            for part in order.chunks(per.max(1)) {
                for c in choose(&mut rng, cols, keep(cols)) {
                    part.iter().for_each(|&r| mask.set(r, c, true));
                }
            }
            Packed::Group(GroupBlocks::pack(&mask, &weights)?)
        }
        BenchFormat::Shuffled { b } => {
            let mut order: Vec<usize> = (0..rows).collect();
            order.shuffle(&mut rng);
            let tiles = keep(cols.div_ceil(b));
            let mut mask = Mask::zeros(rows, cols);
            for group in order.chunks(b) {
                let cols_of_group = choose(&mut rng, cols, (tiles * b).min(cols));
                for &c in &cols_of_group {
                    group.iter().for_each(|&r| mask.set(r, c, true));
                }
            }
            Packed::Shuffled(ShuffledBlocks::pack(&mask, &weights, b)?)
        }
        BenchFormat::Bsr { h, w } => {
            let (br, bc) = (rows.div_ceil(h), cols.div_ceil(w));
            let tiles = choose(&mut rng, br * bc, keep(br * bc));
            let mut mask = Mask::zeros(rows, cols);
            for t in tiles {
                let (i, j) = (t / bc, t % bc);
                for r in i * h..((i + 1) * h).min(rows) {
                    for c in j * w..((j + 1) * w).min(cols) {
                        mask.set(r, c, true);
                    }
                }
            }
            Packed::Bsr(Bsr::pack(&mask, &weights, h, w)?)
        }
        BenchFormat::Nm { n, m } => {
            let view = MatrixView::matrix(rows, cols);
            let mut mask = Mask::zeros(rows, cols);
            for r in 0..rows {
                for g in (0..cols).step_by(m) {
                    let len = m.min(cols - g);
                    for p in choose(&mut rng, len, n.min(len)) {
                        mask.set(r, g + p, true);
                    }
                }
            }
            Packed::Nm(NmCompressed::pack(&mask, &weights, view, n, m, None)?)
        }
        BenchFormat::Csr => {
            let mask = Mask::from_fn(rows, cols, |_, _| rng.random_bool(density));
            Packed::Csr(Csr::pack(&mask, &weights)?)
        }
    })
}

/// One measurement: a format at a shape against the dense baseline, same run.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The case's label.
    pub label: String,
    /// The format's label.
    pub format: String,
    /// `[rows, cols, n]`.
    pub shape: [usize; 3],
    /// Fraction of `W`'s entries the pattern keeps.
    pub density: f64,
    /// Median time of the dense GEMM, ms.
    pub dense_ms: f64,
    /// Median time of the sparse kernel, ms.
    pub sparse_ms: f64,
    /// `dense_ms / sparse_ms`.
    pub speedup: f64,
    /// `1 / density`.
    pub ideal: f64,
    /// `speedup / ideal`.
    pub fraction_of_ideal: f64,
    /// GFLOP/s of the dense GEMM.
    pub dense_gflops: f64,
    /// Useful GFLOP/s of the sparse kernel (`2·nnz·n / time`).
    pub sparse_gflops: f64,
}

/// The faer baseline plan for `rows × cols`, with the faster of its two threadings at this
/// shape (each timed a few times).
pub fn tuned_dense(rows: usize, cols: usize, n: usize, seed: u64) -> Result<Plan> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut plan = Plan::new(&Packed::Dense(Dense::new(rows, cols, w)?))?;
    plan.set_dense_kernel(DenseKernel::Faer);
    if rayon::current_num_threads() > 1 {
        let x = vec![0.5f32; cols * n];
        let mut y = vec![0.0f32; rows * n];
        let mut time = |plan: &mut Plan, t: Threading| -> Result<f64> {
            plan.set_threading(t);
            let mut res = Ok(());
            let (ms, _) = interleaved(3, || res = plan.forward(&x, &mut y, n), || {});
            res.map(|_| ms)
        };
        let a = time(&mut plan, Threading::Faer)?;
        let b = time(&mut plan, Threading::SplitColumns)?;
        plan.set_threading(if b < a {
            Threading::SplitColumns
        } else {
            Threading::Faer
        });
    }
    Ok(plan)
}

/// Times `sparse` against `dense` on `case`, interleaved, the medians of about `budget_s`
/// seconds of repetitions (at least 5).
pub fn measure(
    case: &Case,
    format: &str,
    packed: &Packed,
    dense: &Plan,
    sparse: &Plan,
    budget_s: f64,
) -> Result<Record> {
    let (rows, cols, n) = (case.rows, case.cols, case.n);
    let x = vec![0.5f32; cols * n];
    let xs = vec![0.5f32; sparse.in_dim() * n];
    let mut y = vec![0.0f32; rows * n];
    let mut ys = vec![0.0f32; sparse.out_dim() * n];
    let flops = 2.0 * (rows * cols * n) as f64;
    let reps = repetitions(flops, 100.0, budget_s, 5, 200);
    let (mut r1, mut r2) = (Ok(()), Ok(()));
    let (dense_ms, sparse_ms) = interleaved(
        reps,
        || r1 = dense.forward(&x, &mut y, n),
        || r2 = sparse.forward(&xs, &mut ys, n),
    );
    r1?;
    r2?;
    let nnz = packed.nnz();
    let density = nnz as f64 / (rows * cols).max(1) as f64;
    let speedup = dense_ms / sparse_ms.max(1e-9);
    let ideal = 1.0 / density.max(1e-12);
    Ok(Record {
        label: case.label.clone(),
        format: format.to_string(),
        shape: [rows, cols, n],
        density,
        dense_ms,
        sparse_ms,
        speedup,
        ideal,
        fraction_of_ideal: speedup / ideal,
        dense_gflops: flops / dense_ms / 1e6,
        sparse_gflops: 2.0 * (nnz * n) as f64 / sparse_ms / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cases_cover_both_networks_and_mlps() {
        let c = default_cases(64);
        assert!(c.iter().any(|c| (c.rows, c.cols, c.n) == (512, 4608, 1024)));
        assert!(c.iter().any(|c| (c.rows, c.cols, c.n) == (64, 576, 65536)));
        assert!(c.iter().any(|c| (c.rows, c.cols, c.n) == (512, 4608, 256)));
        assert!(c
            .iter()
            .any(|c| c.label == "mlp768 down" && (c.rows, c.cols) == (768, 3072)));
        let mut shapes: Vec<_> = c.iter().map(|c| (c.rows, c.cols, c.n)).collect();
        shapes.sort_unstable();
        shapes.dedup();
        assert_eq!(shapes.len(), c.len());
    }

    #[test]
    fn random_formats_hit_their_density() {
        for f in BenchFormat::defaults() {
            let p = random_packed(f, 128, 256, 0.25, 1).unwrap();
            let d = p.nnz() as f64 / (128.0 * 256.0);
            let want = match f {
                BenchFormat::Nm { n, m } => n as f64 / m as f64,
                BenchFormat::Dense => 1.0,
                _ => 0.25,
            };
            assert!((d - want).abs() < 0.03, "{f:?}: {d}");
        }
        assert!(random_packed(BenchFormat::Csr, 4, 4, 0.0, 1).is_err());
    }

    #[test]
    fn formats_parse() {
        for f in BenchFormat::defaults() {
            assert_eq!(f.label().parse::<BenchFormat>().unwrap(), f);
        }
        assert_eq!(
            "bsr:8".parse::<BenchFormat>().unwrap(),
            BenchFormat::Bsr { h: 8, w: 8 }
        );
        assert!("nm:3:2".parse::<BenchFormat>().is_err());
        assert!("triangle".parse::<BenchFormat>().is_err());
    }
}
