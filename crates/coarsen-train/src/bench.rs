//! Training-speed measurements: one masked SGD step of a small benchmark CNN with stock candle
//! (`conv2d`, matmul) against the same step on coarsen's operations, interleaved in one run; and
//! the training throughput of a model with dense, masked and structured-sparse (packed) layers.

use std::cell::RefCell;

use candle_core::{Device, Tensor, Var};
use coarsen_core::MaskSet;
use coarsen_infer::format::random_masks;
use coarsen_infer::timing::time_tuned;
use coarsen_infer::{
    layer_formats, Formats, InferenceNet, LayerChoice, LayerFormat, Network, Path, StepTime, Tuning,
};
use coarsen_kernels::timing::{interleaved, median};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use crate::dynamic::{DsbConfig, DynamicConfig, Grow};
use crate::error::{Result, TrainError};
use crate::model::{Model, ModelSpec};
use crate::ops::{Conv2d, ConvGeometry, LayerKernel, MaxPool2, WeightMatmul};
use crate::optim::Sgd;
use crate::sparsity::prune_global;

/// Result of [`step_benchmark`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepBench {
    /// Batch size.
    pub batch: usize,
    /// Median milliseconds of a step with stock candle `conv2d` and matmul.
    pub candle_ms: f64,
    /// Median milliseconds of the same step on coarsen's operations.
    pub coarsen_ms: f64,
    /// Timed repetitions of each.
    pub reps: usize,
    /// Loss of both after the first step (they compute the same function).
    pub losses: (f32, f32),
}

/// Weights of the benchmark network conv3x3(1→32)-ReLU-conv3x3(32→64)-ReLU-maxpool-fc(→10).
struct BenchNet {
    w1: Var,
    w2: Var,
    fc: Var,
    masks: Vec<Tensor>,
}

const SIDE: usize = 28;

impl BenchNet {
    fn new(seed: u64) -> Result<BenchNet> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize, std: f32| -> Result<Vec<f32>> {
            let d = Normal::new(0.0f32, std)
                .map_err(|e| TrainError::config("init", std, e.to_string()))?;
            Ok((0..n).map(|_| d.sample(&mut rng)).collect())
        };
        let fc_in = 64 * (SIDE / 2) * (SIDE / 2);
        let w1 = Var::from_vec(normal(32 * 9, 0.3)?, (32, 1, 3, 3), &Device::Cpu)?;
        let w2 = Var::from_vec(normal(64 * 32 * 9, 0.06)?, (64, 32, 3, 3), &Device::Cpu)?;
        let fc = Var::from_vec(normal(10 * fc_in, 0.01)?, (10, fc_in), &Device::Cpu)?;
        // 80% of every weight pruned at random: the masks are applied to weights and gradients.
        let mut mrng = ChaCha8Rng::seed_from_u64(seed ^ 1);
        let uni =
            Uniform::new(0.0f32, 1.0).map_err(|e| TrainError::config("mask", 0, e.to_string()))?;
        let masks = [&w1, &w2, &fc]
            .iter()
            .map(|v| {
                let m: Vec<f32> = (0..v.elem_count())
                    .map(|_| {
                        if uni.sample(&mut mrng) < 0.2 {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Tensor::from_vec(m, v.dims(), &Device::Cpu)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(BenchNet { w1, w2, fc, masks })
    }

    fn vars(&self) -> [&Var; 3] {
        [&self.w1, &self.w2, &self.fc]
    }

    /// Masked SGD: `w ← (w − lr·(g⊙m))⊙m`.
    fn update(&self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (v, m) in self.vars().into_iter().zip(&self.masks) {
            if let Some(g) = grads.get(v.as_tensor()) {
                let next = ((v.as_tensor() - (g * m)?.affine(0.01, 0.0)?)? * m)?;
                v.set(&next)?;
            }
        }
        Ok(())
    }

    /// Stock candle: NCHW `conv2d`, `max_pool2d`, `matmul`.
    fn candle_step(&self, x: &Tensor, y: &Tensor) -> Result<f32> {
        let b = x.dims()[0];
        let h = x.conv2d(self.w1.as_tensor(), 1, 1, 1, 1)?.relu()?;
        let h = h
            .conv2d(self.w2.as_tensor(), 1, 1, 1, 1)?
            .relu()?
            .max_pool2d(2)?;
        let logits = h.reshape((b, ()))?.matmul(&self.fc.as_tensor().t()?)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        self.update(&loss.backward()?)?;
        Ok(loss.to_scalar::<f32>()?)
    }

    /// coarsen's operations: channel-major im2col + GEMM.
    fn coarsen_step(
        &self,
        x: &Tensor,
        y: &Tensor,
        k: &[std::sync::Arc<LayerKernel>; 3],
    ) -> Result<f32> {
        let geometry = ConvGeometry {
            k: 3,
            stride: 1,
            pad: 1,
        };
        let b = x.dims()[1];
        let conv = |kernel: &std::sync::Arc<LayerKernel>| Conv2d {
            geometry,
            kernel: kernel.clone(),
            relu: true,
        };
        let h = self.w1.as_tensor().apply_op2(x, conv(&k[0]))?;
        let h = self.w2.as_tensor().apply_op2(&h, conv(&k[1]))?;
        let h = h.apply_op1(MaxPool2)?;
        // Features in (c, h, w) order like the NCHW flatten, batch last.
        let feat = h.permute((0, 2, 3, 1))?.contiguous()?.reshape(((), b))?;
        let logits = self
            .fc
            .as_tensor()
            .apply_op2(&feat, WeightMatmul(k[2].clone()))?
            .t()?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        self.update(&loss.backward()?)?;
        Ok(loss.to_scalar::<f32>()?)
    }
}

/// Times one masked SGD step (forward, cross-entropy, backward, masked update) of
/// conv3x3(1→32)-conv3x3(32→64)-pool-fc on 28×28 inputs, stock candle against coarsen's ops,
/// interleaved; medians over `reps`.
pub fn step_benchmark(batch: usize, reps: usize, seed: u64) -> Result<StepBench> {
    if batch == 0 {
        return Err(TrainError::config("batch", 0, "must be at least 1"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 2);
    let pix: Vec<f32> = (0..batch * SIDE * SIDE)
        .map(|_| Normal::new(0.0f32, 1.0).map_or(0.0, |d| d.sample(&mut rng)))
        .collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let x_nchw = Tensor::from_vec(pix.clone(), (batch, 1, SIDE, SIDE), &Device::Cpu)?;
    let x_cm = Tensor::from_vec(pix, (1, batch, SIDE, SIDE), &Device::Cpu)?;
    let y = Tensor::from_vec(labels, batch, &Device::Cpu)?;
    // Two identical networks, so both sides train the same weights.
    let (a, b) = (BenchNet::new(seed)?, BenchNet::new(seed)?);
    let kernels = [
        LayerKernel::dense(),
        LayerKernel::dense(),
        LayerKernel::dense(),
    ];
    let first = (
        a.candle_step(&x_nchw, &y)?,
        b.coarsen_step(&x_cm, &y, &kernels)?,
    );
    let err: RefCell<Option<TrainError>> = RefCell::new(None);
    let keep = |r: Result<f32>| {
        if let Err(e) = r {
            err.borrow_mut().get_or_insert(e);
        }
    };
    let (candle_ms, coarsen_ms) = interleaved(
        reps,
        || keep(a.candle_step(&x_nchw, &y)),
        || keep(b.coarsen_step(&x_cm, &y, &kernels)),
    );
    if let Some(e) = err.into_inner() {
        return Err(e);
    }
    Ok(StepBench {
        batch,
        candle_ms,
        coarsen_ms,
        reps,
        losses: first,
    })
}

/// Training throughput of one configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Throughput {
    /// `dense`, `masked` or `structured`.
    pub mode: String,
    /// What the layers run.
    pub detail: String,
    /// Density of the sparse layers.
    pub density: f64,
    /// Median samples per second over the timed steps.
    pub samples_per_s: f64,
}

/// Samples/s of training `spec` (random inputs, batch `batch`) dense, with 80% global magnitude
/// masks on its prunable layers (dense kernels), and with every conv in 80%-sparse shuffled
/// blocks of 16 on packed kernels (SSB: the structured-sparse path of DSB).
pub fn throughput(
    spec: &ModelSpec,
    batch: usize,
    steps: usize,
    seed: u64,
) -> Result<Vec<Throughput>> {
    let mut out = Vec::new();
    for mode in ["dense", "masked", "structured"] {
        let model = Model::new(spec, seed)?;
        let (masks, detail, density) = match mode {
            "dense" => (MaskSet::new(), "dense GEMM".to_string(), 1.0),
            "masked" => {
                let names = model.default_prunable();
                let m = prune_global(&model, &names, &MaskSet::new(), 0.8)?;
                (m, "80% unstructured masks, dense GEMM".to_string(), 0.2)
            }
            _ => {
                let cfg = DsbConfig {
                    dynamic: DynamicConfig {
                        sparsity: 0.8,
                        delta_t: usize::MAX,
                        t_end: 0.0,
                        stop: 0.0,
                        alpha: 0.0,
                        update: crate::dynamic::UpdateAt::Backward,
                    },
                    block: 16,
                    grow: Grow::Gradient,
                    static_blocks: true,
                    linear: crate::dynamic::LinearBlocks::Blocked,
                    similarity: None,
                };
                let (d, m) = crate::dynamic::Dsb::new(&model, cfg, 1)?;
                let detail = format!(
                    "shuffled blocks b=16 on packed kernels: {}",
                    d.blocked_layers().join(", ")
                );
                (m, detail, 0.2)
            }
        };
        crate::optim::apply_masks(&model, &masks)?;
        let mut opt = Sgd::new(0.9, 5e-4, true);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 3);
        let [c, h, w] = spec.input;
        let n = c * batch * h * w;
        let x = Tensor::from_vec(
            (0..n)
                .map(|_| Normal::new(0.0f32, 1.0).map_or(0.0, |d| d.sample(&mut rng)))
                .collect::<Vec<f32>>(),
            (c, batch, h, w),
            &Device::Cpu,
        )?;
        let y = Tensor::from_vec(
            (0..batch as u32)
                .map(|i| i % spec.classes.max(1) as u32)
                .collect::<Vec<u32>>(),
            batch,
            &Device::Cpu,
        )?;
        let mut times = Vec::new();
        for s in 0..steps + 1 {
            let t0 = std::time::Instant::now();
            let logits = model.forward(&x, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            opt.step(&model, &grads, &masks, 0.01)?;
            if s > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        out.push(Throughput {
            mode: mode.to_string(),
            detail,
            density,
            samples_per_s: batch as f64 / median(times).max(1e-12),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_steps_compute_the_same_loss() {
        let r = step_benchmark(4, 1, 7).unwrap();
        assert!((r.losses.0 - r.losses.1).abs() < 1e-4, "{:?}", r.losses);
        assert!(r.candle_ms > 0.0 && r.coarsen_ms > 0.0);
    }

    #[test]
    fn throughput_runs_every_mode() {
        let spec = ModelSpec {
            name: "cnn".into(),
            width: 1.0,
            input: [1, 12, 12],
            classes: 10,
        };
        let t = throughput(&spec, 8, 1, 3).unwrap();
        assert_eq!(
            t.iter().map(|t| t.mode.as_str()).collect::<Vec<_>>(),
            ["dense", "masked", "structured"]
        );
        assert!(t[2].detail.contains("conv2"), "{}", t[2].detail);
    }

    #[test]
    fn the_peak_bound_is_the_steps_flops_over_the_peak() {
        let step = |macs: usize| StepTime {
            step: "s".into(),
            kernel: "k".into(),
            macs,
            ms: 1.0,
        };
        // 3·10⁹ multiply-adds, 6 GFLOP, at 200 GFLOP/s: 30 ms.
        let steps = [step(1_000_000_000), step(0), step(2_000_000_000)];
        let ms = peak_bound_ms(&steps, 200.0).unwrap();
        assert!((ms - 30.0).abs() < 1e-9, "{ms}");
        assert_eq!(peak_bound_ms(&[step(0)], 200.0), None);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(peak_bound_ms(&steps, bad), None, "{bad}");
        }
    }
}

/// Result of [`model_benchmark`]: end-to-end inference time of a CIFAR-shaped network with
/// structured masks, packed against dense, interleaved in the same run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelBench {
    /// Architecture.
    pub model: String,
    /// Pattern of the prunable layers.
    pub pattern: String,
    /// Sparsity of the prunable layers (N:M: 1 − N/M).
    pub sparsity: f64,
    /// Images per forward pass.
    pub batch: usize,
    /// Median milliseconds of the dense path.
    pub dense_ms: f64,
    /// Median milliseconds of the packed path.
    pub sparse_ms: f64,
    /// `1 − sparse_ms / dense_ms`.
    pub time_saving: f64,
    /// `1 − packed multiply-adds / dense multiply-adds`: the saving a perfect kernel would give.
    pub ideal_time_saving: f64,
    /// `time_saving / ideal_time_saving`.
    pub fraction_of_ideal: f64,
    /// Timed repetitions of each path.
    pub reps: usize,
    /// Threads of the rayon pool.
    pub threads: usize,
    /// Largest |logit difference| between the two paths (they compute the same function).
    pub max_abs_diff: f32,
    /// Per sparse layer of the packed path: packed or dense kernels, as tuning chose.
    #[serde(default)]
    pub tuned: Vec<LayerChoice>,
    /// Whether the tuned network measured no faster than the dense path as a whole, and runs
    /// dense (`coarsen_infer::timing::time_tuned`): `sparse_ms` is then the dense path's.
    #[serde(default)]
    pub runs_dense: bool,
    /// Median milliseconds of ONNX Runtime on the same network (BatchNorm folded), when the
    /// caller timed it.
    #[serde(default)]
    pub ort_ms: Option<f64>,
    /// Per-step times of both paths, when asked for ([`BenchSettings::profile`]).
    #[serde(default)]
    pub profile: Option<PathProfiles>,
}

/// Per-step times of the dense and packed paths of one network (medians of
/// [`BenchSettings::reps`] passes per step; the packed path after tuning).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathProfiles {
    /// The dense path's steps.
    pub dense: Vec<StepTime>,
    /// The packed path's steps (after tuning).
    pub packed: Vec<StepTime>,
    /// This machine's f32 FMA peak on the run's threads, GFLOP/s, where the caller measured
    /// it (`coarsen bench --profile` does): the roof of every step's GFLOP/s.
    #[serde(default)]
    pub fma_peak_gflops: Option<f64>,
}

/// The least milliseconds `steps` can take on kernels that perform each of their
/// multiply-adds (two FLOPs each) at `peak_gflops`: their multiply-adds over the FMA peak.
/// `None` without multiply-adds or a positive, finite peak. Kernels that do fewer
/// multiplications than their step counts (Winograd) can run below it.
pub fn peak_bound_ms(steps: &[StepTime], peak_gflops: f64) -> Option<f64> {
    let macs: f64 = steps.iter().map(|s| s.macs as f64).sum();
    (macs > 0.0 && peak_gflops.is_finite() && peak_gflops > 0.0)
        .then(|| 2.0 * macs / (peak_gflops * 1e9) * 1e3)
}

/// How [`network_benchmark`] and [`model_benchmark`] time a network.
#[derive(Clone, Copy, Debug)]
pub struct BenchSettings {
    /// Images per forward pass.
    pub batch: usize,
    /// Timed passes of each path (and, when profiling, profiled passes of each).
    pub reps: usize,
    /// Seed of the random input batch (and of [`model_benchmark`]'s weights and masks).
    pub seed: u64,
    /// How the packed path's layers are tuned (cached per machine).
    pub tuning: Tuning,
    /// Also time every step of both paths ([`ModelBench::profile`]), on the same engines.
    pub profile: bool,
    /// The packed path's block kernels multiply in bfloat16 where the CPU has AVX-512 BF16
    /// ([`InferOptions::bf16`](coarsen_infer::InferOptions::bf16)).
    pub bf16: bool,
}

/// A batch of `batch` images with values uniform in [−1, 1), seeded.
fn random_batch(network: &Network, batch: usize, seed: u64) -> Result<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let uni =
        Uniform::new(-1.0f32, 1.0).map_err(|e| TrainError::config("input", 0, e.to_string()))?;
    let [c, h, w] = network.input();
    Ok((0..c * h * w * batch)
        .map(|_| uni.sample(&mut rng))
        .collect())
}

/// The patterns [`model_benchmark`] accepts.
pub const BENCH_PATTERNS: &[&str] = &[
    "channel",
    "group",
    "shuffled-block",
    "block",
    "nm",
    "unstructured",
];

/// The layer format of a pattern name of [`BENCH_PATTERNS`] (`None` for `unstructured`, whose
/// layers run CSR or dense by density).
pub fn bench_format(pattern: &str) -> Result<Option<LayerFormat>> {
    Ok(Some(match pattern {
        "channel" => LayerFormat::Channel,
        "group" => LayerFormat::Group,
        "shuffled-block" => LayerFormat::ShuffledBlock { block: 16 },
        "block" => LayerFormat::Bsr {
            height: 16,
            width: 16,
        },
        "nm" => LayerFormat::Nm {
            n: 2,
            m: 4,
            col_perm: None,
        },
        "unstructured" => return Ok(None),
        other => {
            return Err(TrainError::config(
                "pattern",
                other,
                format!("expected one of {}", BENCH_PATTERNS.join(", ")),
            ))
        }
    }))
}

/// Times the forward pass of a CIFAR-shaped `model` (10 classes, 3×32×32, standard width) whose
/// prunable layers (every conv but the first, every linear layer but the classifier) carry
/// random masks of `pattern` at `sparsity`, as [`network_benchmark`] does. Also returns the
/// network (for peers to time).
pub fn model_benchmark(
    model: &str,
    pattern: &str,
    sparsity: f64,
    settings: &BenchSettings,
) -> Result<(ModelBench, Network)> {
    let seed = settings.seed;
    if !(0.0..1.0).contains(&sparsity) {
        return Err(TrainError::config(
            "sparsity",
            sparsity,
            "must lie in [0, 1)",
        ));
    }
    let spec = ModelSpec {
        name: model.to_string(),
        width: 1.0,
        input: [3, 32, 32],
        classes: 10,
    };
    let net = Model::new(&spec, seed)?;
    let shapes: Vec<(String, Vec<usize>)> = net
        .default_prunable()
        .into_iter()
        .filter_map(|n| net.param(&n).map(|p| (n.clone(), p.shape())))
        .collect();
    let fmt = bench_format(pattern)?;
    let masks = random_masks(
        &shapes,
        fmt.as_ref().unwrap_or(&LayerFormat::Csr),
        1.0 - sparsity,
        seed,
    )?;
    let network = net.network(&masks)?;
    let formats: Formats = match &fmt {
        None => layer_formats(network.graph(), &masks, None)?,
        Some(f) => masks.names().map(|n| (n.to_string(), f.clone())).collect(),
    };
    let mut r = network_benchmark(&network, &formats, settings)?;
    r.model = model.to_string();
    r.pattern = pattern.to_string();
    r.sparsity = match fmt {
        Some(LayerFormat::Nm { n, m, .. }) => 1.0 - n as f64 / m as f64,
        _ => sparsity,
    };
    Ok((r, network))
}

/// Times the forward pass of `network` with its layers in `formats` against its dense path,
/// `reps` times each, interleaved, on a random batch of `batch` images (seeded by `seed`), after
/// tuning the packed path's layers as `tuning` says (cached per machine); with `profile`, also
/// every step of both paths, on the same engines and batch. The record's `model` and `pattern`
/// are left for the caller; `sparsity` is the network's.
pub fn network_benchmark(
    network: &Network,
    formats: &Formats,
    settings: &BenchSettings,
) -> Result<ModelBench> {
    let BenchSettings {
        batch,
        reps,
        seed,
        tuning,
        profile,
        bf16,
    } = *settings;
    if batch == 0 {
        return Err(TrainError::config("batch", batch, "must be positive"));
    }
    let options = coarsen_infer::InferOptions {
        bf16,
        ..Default::default()
    };
    let mut packed = InferenceNet::with_options(network, formats, Path::Packed, options)?;
    let mut tuned = packed.tune_cached(batch, tuning)?;
    let dense = InferenceNet::new(network, formats, Path::Dense)?;
    let x = random_batch(network, batch, seed)?;
    let a = packed.forward(&x, batch)?;
    let b = dense.forward(&x, batch)?;
    let max_abs_diff = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    let settled = time_tuned(
        (network, formats),
        &mut packed,
        &mut tuned,
        tuning,
        &dense,
        &x,
        batch,
        reps,
    )?;
    let t = settled.timing;
    let profile = if profile {
        Some(PathProfiles {
            dense: dense.profile(&x, batch, reps)?,
            packed: packed.profile(&x, batch, reps)?,
            fma_peak_gflops: None,
        })
    } else {
        None
    };
    Ok(ModelBench {
        model: String::new(),
        pattern: String::new(),
        sparsity: network.sparsity().prunable,
        batch,
        dense_ms: t.dense_ms,
        sparse_ms: t.packed_ms,
        time_saving: t.time_saving,
        ideal_time_saving: t.ideal_time_saving,
        fraction_of_ideal: if t.ideal_time_saving > 0.0 {
            t.time_saving / t.ideal_time_saving
        } else {
            0.0
        },
        reps: reps.max(1),
        threads: rayon::current_num_threads(),
        max_abs_diff,
        tuned,
        runs_dense: settled.runs_dense,
        ort_ms: None,
        profile,
    })
}
