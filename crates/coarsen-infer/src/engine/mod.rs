//! The inference engine: a [`Network`] compiled once into steps over packed kernels, then run
//! forward on batches.
//!
//! An [`InferenceNet`] is built from a network and the format of each layer:
//!
//! - a BatchNorm that is the only reader of a convolution is folded into it
//!   (`W ← γ/σ·W`, bias `β + (b − μ)·γ/σ`) and a ReLU that is the only reader of either is
//!   fused into the layer's epilogue, and so is a residual `Add` (with a ReLU that alone
//!   reads the sum) whose later operand is a layer's output read by nothing else: the layer
//!   reads the other operand as a second input and adds it as it stores;
//! - every conv and linear weight is packed in its [`LayerFormat`]: channel-compact, group
//!   blocks, shuffled blocks, BSR, N:M, CSR for very sparse unstructured layers, dense
//!   otherwise;
//! - **channel sparsity physically shrinks the network**: a channel-sparse layer computes only
//!   its kept output channels, and the next layer reads only those input channels. A removed
//!   channel is not zero after BatchNorm: it is the constant `act(β − μ·γ/σ)`. Its contribution
//!   to the next layer is precomputed exactly, as a per-output-position bias map (the map varies
//!   only at the borders, where zero padding cuts the kernel), so the shrunk network computes
//!   the same function as the masked one;
//! - convolutions run as im2col + SpMM over cache-sized chunks of whole output rows, one chunk
//!   per task; grouped convolutions run as one block-diagonal matrix. Stride-1 "same" and
//!   size-halving stride-2 convolutions read their input in place instead: dense ones as one
//!   implicit GEMM ([`coarsen_kernels::DirectConv`]), those in dense blocks (group, shuffled,
//!   BSR) as one implicit GEMM per block ([`coarsen_kernels::BlockConv`]).
//!
//! Layer outputs reuse the buffers that earlier steps and passes on the calling thread freed
//! (the largest few are kept), so a pass maps no fresh pages once the first has run.
//!
//! The dense path ([`Path::Dense`]) runs the same folded network with every layer dense on the
//! dense GEMM (faer) through the same chunked im2col.

mod build;
mod run;
mod spin;
mod tune;

pub use tune::{describe_choices, LayerChoice, TuneCache, Tuning, CLOSE_STEPS};

use std::collections::BTreeMap;

pub use coarsen_kernels::DenseKernel;
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::format::LayerFormat;
use crate::network::Network;

use build::Compiler;
use run::Step;

/// Which kernels an [`InferenceNet`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Every layer in its packed format; channel sparsity shrinks the network.
    Packed,
    /// Every layer dense (masked weights, zeros included) on the dense GEMM: the baseline.
    Dense,
}

/// What one conv or linear layer became.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// The weight's name.
    pub name: String,
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// The format it runs in.
    pub format: String,
    /// Rows and columns of the matrix the kernel multiplies (after channel shrinking).
    pub matrix: [usize; 2],
    /// Values stored by the format.
    pub stored: usize,
    /// Multiply-adds per image.
    pub macs_per_image: usize,
}

/// The time of one step of a forward pass ([`InferenceNet::profile`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    /// The layer's weight name, or the operation.
    pub step: String,
    /// What ran: a conv or linear layer's kernel, else the operation.
    pub kernel: String,
    /// Multiply-adds of the step over the whole batch (0 for steps without weights).
    pub macs: usize,
    /// Median wall time, ms.
    pub ms: f64,
}

/// Performance settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InferOptions {
    /// im2col values per chunk of columns (a chunk is one task's work).
    pub chunk_floats: usize,
    /// Least columns of a chunk.
    pub min_cols: usize,
    /// Run dense (and channel-compact) 3×3 stride-1 padding-1 convolutions of even sizes and
    /// at least 8 input channels as Winograd instead of implicit GEMMs, where the CPU has
    /// AVX-512 (its fused kernel): F(4×4, 3×3) (4× fewer multiplications) for products of at
    /// least 1024 columns of layers whose 4×4 tiles pad the image by at most a third, with at
    /// least 32 output channels (16 where F(2×2) would gather its tiles) and at most 512²
    /// weights per tap, F(2×2, 3×3) (2.25×) otherwise. On by
    /// default; off, the implicit GEMM runs them (`examples/ab_dense` compares the two).
    /// Outputs differ from the direct products by rounding only: about 10⁻⁶ of the largest
    /// output for tiles of 2, 10⁻⁵ for tiles of 4 (`examples/ab_wino` in coarsen-kernels
    /// prints both).
    pub winograd: bool,
    /// Implicit-GEMM layers write their results straight into the output through bias and
    /// ReLU (on by default); off, through a scratch block and a separate epilogue pass (kept
    /// to measure what the fusion saves, with `examples/ab_options`).
    pub fuse_epilogue: bool,
    /// Convolutions in dense blocks (group, shuffled, BSR) of the geometries the implicit GEMM
    /// runs read their input in place, block by block (on by default); off, through im2col and
    /// the block GEMM (kept to measure what it saves, with `examples/ab_options`).
    pub block_conv: bool,
    /// A residual `Add` (and the ReLU after it) runs in the epilogue of the layer that
    /// computes its later operand (on by default; takes effect only in
    /// [`InferenceNet::with_options`], where the network is compiled); off, as steps of their
    /// own (kept to measure what it saves, with `examples/ab_options`).
    pub fuse_residual: bool,
    /// Tuning ([`InferenceNet::tune`]) fuses a residual block's 1×1 stride-2 downsample into
    /// its first, 3×3 stride-2, convolution where both run their block kernels in place: one
    /// pass over the input computes both (on by default; off, each runs on its own, kept to
    /// measure what it saves, with `examples/ab_tuned`).
    pub fuse_downsample: bool,
    /// Products of at most this many columns (output positions × batch) run on the
    /// few-column kernels, which vectorise over output rows, where a layer could also run its
    /// in-place implicit GEMM: batch 1's deepest layers (16 columns on CIFAR) read every
    /// weight once there, while the implicit GEMM, whose tiles are 16 to 48 columns, runs
    /// anything wider (batch 1's 8×8 layers) faster.
    pub few_columns: usize,
    /// Through a forward pass, the pool's other threads wait for the next parallel section
    /// spinning instead of sleeping (on by default; see `engine/spin.rs`): on a virtual
    /// machine whose idle vCPUs halt, waking a sleeping thread took so long that sections
    /// ran on one thread. Off, rayon's threads sleep between sections (they spin for about
    /// 32 yields first).
    pub spin_workers: bool,
    /// The network's first steps, while each reads or makes a value of at least this many
    /// floats per image (256 KiB by default: ResNet-18's and VGG-16's 32×32 layers of 64
    /// channels), run on chunks of images, whose values stay in the cache from one step to
    /// the next, instead of on the whole batch layer by layer (each such layer's 16 MiB at
    /// batch 64 streamed through memory); the rest runs on the whole batch (more columns per
    /// product). The chunks end after the last of those steps where one value alone is live
    /// (a residual block's end, a pooling's output). A network whose values are all smaller
    /// chunks from half its largest value instead (the demo's CNN on 28×28 images, whose
    /// largest is 25 K floats: its dense pass at batch 256 ran 25.5–27.3 → 20.0–20.3 ms,
    /// `examples/ab_options`). Tuning ([`InferenceNet::tune`], measuring) halves it where
    /// whole passes ran faster so (chunks a stage further).
    pub prefix_min_floats: usize,
    /// Floats of the largest value of a chunk of [`prefix_min_floats`](Self::prefix_min_floats):
    /// images per chunk = this / that value's floats per image (1 MiB by default: 4 CIFAR
    /// images); 0 runs every step on the whole batch.
    pub prefix_chunk_floats: usize,
    /// The chunks of [`prefix_min_floats`](Self::prefix_min_floats) run in parallel, one
    /// chunk per thread through all of those steps (each step of a chunk on that thread
    /// alone), instead of one after another with every step shared by all threads: no
    /// thread waits at the end of each step of each chunk (4 of ResNet-18's 67 parallel
    /// sections per pass at batch 64 had ended with one thread waiting for the other's last
    /// task), and each thread's chunk stays in its own core's cache. On by default; off
    /// kept to measure what it saves (`examples/ab_tuned`). Profiling
    /// ([`InferenceNet::profile`]) and tuning time the steps as they run: each chunk's on its
    /// own thread, a step's time its chunks' times shared out over the threads.
    pub prefix_parallel: bool,
    /// Convolutions in dense blocks that run in place multiply in bfloat16 where the CPU has
    /// AVX-512 BF16 (`vdpbf16ps`: twice an FMA's multiply-adds per instruction): weights and
    /// inputs rounded to bfloat16 (8 significant bits), products summed in `f32`. On the
    /// packed path, a dense convolution that would run as an implicit GEMM (no Winograd: a
    /// CIFAR network's first layer) runs so too, as one dense block, with its `f32` kernels as
    /// a dense twin for tuning to choose, and so do the unrolled maps of convolutions on tiny
    /// images (as a 1×1 convolution over the images). Every other layer stays in `f32`. Off by default
    /// (results then differ from the `f32` engine's by the rounding, about 2⁻⁹ of each
    /// product); takes effect only in [`InferenceNet::with_options`], where the kernels are
    /// packed. Whether a network runs any layer so: [`InferenceNet::kernel_names`] (", bf16").
    pub bf16: bool,
}

impl Default for InferOptions {
    fn default() -> Self {
        InferOptions {
            chunk_floats: 1 << 17,
            min_cols: 256,
            winograd: true,
            fuse_epilogue: true,
            block_conv: true,
            fuse_residual: true,
            fuse_downsample: true,
            few_columns: 16,
            spin_workers: true,
            prefix_min_floats: 1 << 16,
            prefix_chunk_floats: 1 << 18,
            prefix_parallel: true,
            bf16: false,
        }
    }
}

/// The first steps of a pass that run on chunks of images ([`InferenceNet::chunking`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    /// Steps run chunk by chunk (the rest runs on the whole batch).
    pub steps: usize,
    /// Images per chunk.
    pub images: usize,
    /// Floats per image of the largest value those steps make.
    pub image_floats: usize,
}

/// A network compiled to run forward on packed (or dense) kernels. See the [module](self) docs.
///
/// ```
/// use coarsen_core::MaskSet;
/// use coarsen_infer::graph::{GraphBuilder, Linear, Op};
/// use coarsen_infer::{Formats, InferenceNet, Network, Path, TensorSet};
///
/// // logits = W · flatten(x) + b for 1×2×2 images and 3 classes.
/// let mut g = GraphBuilder::new([1, 2, 2]);
/// g.then(None, Op::Flatten);
/// g.then(Some("fc".into()), Op::Linear(Linear { weight: "fc.weight".into(), bias: Some("fc.bias".into()) }));
/// let mut t = TensorSet::new();
/// t.insert_values("fc.weight", vec![3, 4], (0..12).map(|i| i as f32).collect())?;
/// t.insert_values("fc.bias", vec![3], vec![0.5; 3])?;
/// let net = Network::new(g.finish(), t, MaskSet::new())?;
/// let engine = InferenceNet::new(&net, &Formats::new(), Path::Packed)?;
/// let logits = engine.forward_nchw(&[1.0, 0.0, 0.0, 1.0], 1)?;
/// assert_eq!(logits, vec![3.5, 11.5, 19.5]);
/// # Ok::<(), coarsen_infer::InferError>(())
/// ```
#[derive(Debug)]
pub struct InferenceNet {
    input: [usize; 3],
    classes: usize,
    steps: Vec<Step>,
    /// How many steps read each slot (+1 for the output slot).
    reads: Vec<usize>,
    output: usize,
    layers: Vec<LayerInfo>,
    path: Path,
    options: InferOptions,
    /// The steps that run on chunks of images, at batches larger than a chunk (found once
    /// from the steps and the options).
    prefix: Option<run::Prefix>,
    /// `options.prefix_min_floats` as set, where tuning changed it (so that tuning again
    /// chooses between the same two cuts, not a stage further each time).
    untuned_prefix_min: Option<usize>,
}

impl InferenceNet {
    /// Compiles `net` on `path`, each conv and linear weight in its format in `formats`
    /// (weights missing from it are dense).
    pub fn new(
        net: &Network,
        formats: &BTreeMap<String, LayerFormat>,
        path: Path,
    ) -> Result<InferenceNet> {
        Self::with_options(net, formats, path, InferOptions::default())
    }

    /// [`new`](Self::new) with performance options (`winograd` and `fuse_residual` take
    /// effect only here: the transformed weights and the fused steps are made while
    /// compiling).
    pub fn with_options(
        net: &Network,
        formats: &BTreeMap<String, LayerFormat>,
        path: Path,
        options: InferOptions,
    ) -> Result<InferenceNet> {
        let mut compiler = Compiler::new(net, formats, path);
        compiler.winograd = options.winograd;
        compiler.fuse_residual = options.fuse_residual;
        compiler.bf16 = options.bf16;
        let c = compiler.compile()?;
        let mut engine = InferenceNet {
            input: net.input(),
            classes: net.classes(),
            steps: c.steps,
            reads: c.reads,
            output: c.output,
            layers: c.layers,
            path,
            options,
            prefix: None,
            untuned_prefix_min: None,
        };
        engine.prefix = run::plan_prefix(&engine);
        Ok(engine)
    }

    /// The performance options.
    pub fn options(&self) -> InferOptions {
        self.options
    }

    /// Sets the performance options (except `winograd` and `fuse_residual`, see
    /// [`with_options`](Self::with_options)).
    pub fn set_options(&mut self, options: InferOptions) {
        self.options = options;
        self.untuned_prefix_min = None;
        self.prefix = run::plan_prefix(self);
    }

    /// Chooses the GEMM of every dense and channel-compact layer (the default is coarsen's
    /// tiled kernel; [`DenseKernel::Faer`] runs faer's general GEMM instead).
    pub fn set_dense_kernel(&mut self, kernel: DenseKernel) {
        for step in &mut self.steps {
            if let run::Kind::Layer(l) = &mut step.kind {
                l.plan.set_dense_kernel(kernel);
                if let Some(t) = &mut l.dense_twin {
                    t.plan.set_dense_kernel(kernel);
                }
                if let Some(f) = &mut l.fused {
                    f.down.plan.set_dense_kernel(kernel);
                }
            }
        }
    }

    /// What every conv and linear layer became, in evaluation order.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The path it runs on.
    pub fn path(&self) -> Path {
        self.path
    }

    /// Images: channels, height, width.
    pub fn input(&self) -> [usize; 3] {
        self.input
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Multiply-adds per image over all conv and linear layers.
    pub fn macs_per_image(&self) -> usize {
        self.layers.iter().map(|l| l.macs_per_image).sum()
    }

    /// The kernel every conv and linear step runs at `batch` images, in evaluation order, as
    /// [`profile`](Self::profile) names them (a fused step once).
    pub fn kernel_names(&self, batch: usize) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match &s.kind {
                run::Kind::Layer(l) => Some(l.kernel_name(batch, &self.options)),
                _ => None,
            })
            .collect()
    }

    /// Whether every layer runs on the dense kernels: a network without sparse layers, the
    /// dense path, or a packed network whose tuning chose the dense kernels for every sparse
    /// layer ([`tune`](Self::tune)).
    pub fn runs_dense_kernels(&self) -> bool {
        self.steps.iter().all(|s| match &s.kind {
            run::Kind::Layer(l) => {
                l.dense_twin.is_none() && l.plan.format() == "dense" && !l.sparse_winograd()
            }
            _ => true,
        })
    }

    fn check_input(&self, len: usize, batch: usize) -> Result<()> {
        let [c, h, w] = self.input;
        let want = [c, batch, h, w]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        if want != Some(len) {
            return Err(InferError::param(
                "input",
                format!("{len} values"),
                format!("a batch of {batch} images of [{c}, {h}, {w}] needs {want:?} values"),
            ));
        }
        Ok(())
    }

    /// Times every step of a forward pass on the channel-major batch `x` (as
    /// [`forward`](Self::forward) takes it): `passes` passes after one warm-up, the median per
    /// step, in evaluation order. Conv and linear layers name their weight and kernel; the
    /// other steps their operation.
    pub fn profile(&self, x: &[f32], batch: usize, passes: usize) -> Result<Vec<StepTime>> {
        self.check_input(x.len(), batch)?;
        self.pass(x, batch, None)?;
        let passes = passes.max(1);
        let mut samples = vec![Vec::with_capacity(passes); self.steps.len()];
        let mut times = vec![0.0f64; self.steps.len()];
        for _ in 0..passes {
            times.fill(0.0);
            self.pass(x, batch, Some(&mut times))?;
            for (s, &t) in samples.iter_mut().zip(&times) {
                s.push(t);
            }
        }
        let macs: BTreeMap<&str, usize> = self
            .layers
            .iter()
            .map(|l| (l.name.as_str(), l.macs_per_image))
            .collect();
        Ok(self
            .steps
            .iter()
            .zip(samples)
            .map(|(step, mut s)| {
                s.sort_by(f64::total_cmp);
                let ms = s[s.len() / 2] * 1e3;
                let macs_of = |name: &str| macs.get(name).map_or(0, |m| m * batch);
                match &step.kind {
                    run::Kind::Layer(l) => {
                        // A fused step names both layers and counts both's multiply-adds.
                        let down = l.fused.as_ref().map(|f| f.down.name.as_str());
                        StepTime {
                            step: down.map_or(l.name.clone(), |d| format!("{} + {d}", l.name)),
                            kernel: l.kernel_name(batch, &self.options),
                            macs: macs_of(&l.name) + down.map_or(0, macs_of),
                            ms,
                        }
                    }
                    k => StepTime {
                        step: k.op_name().to_string(),
                        kernel: k.op_name().to_string(),
                        macs: 0,
                        ms,
                    },
                }
            })
            .collect())
    }

    /// How a pass of `batch` images runs its first steps on chunks of images
    /// ([`InferOptions::prefix_chunk_floats`]), or `None` when every step runs on the whole
    /// batch.
    pub fn chunking(&self, batch: usize) -> Option<Chunking> {
        run::prefix(self, batch).map(|(p, images)| Chunking {
            steps: p.end,
            images,
            image_floats: p.peak,
        })
    }

    /// One pass over the steps ([`run::run`]) with the pool's other threads held awake
    /// through it where [`InferOptions::spin_workers`] asks (every pass: forward, profile and
    /// tuning alike).
    fn pass(&self, x: &[f32], batch: usize, times: Option<&mut [f64]>) -> Result<Vec<f32>> {
        spin::spinning(self.options.spin_workers, || {
            run::run(self, x, batch, times)
        })
    }

    /// Logits `[batch, classes]` (row-major) of a channel-major batch `x = [C, B, H, W]`.
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.check_input(x.len(), batch)?;
        let y = self.pass(x, batch, None)?;
        // [classes, B] → [B, classes].
        let k = self.classes;
        let mut out = vec![0.0f32; k * batch];
        for (j, row) in y.chunks(batch.max(1)).enumerate().take(k) {
            for (b, &v) in row.iter().enumerate() {
                out[b * k + j] = v;
            }
        }
        Ok(out)
    }

    /// Logits `[batch, classes]` (row-major) of an image-major batch `x = [N, C, H, W]`
    /// (PyTorch's and ONNX's layout).
    pub fn forward_nchw(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.check_input(x.len(), batch)?;
        self.forward(&nchw_to_cbhw(x, batch, self.input), batch)
    }

    /// The predicted class of every image of a channel-major batch (the first of the largest
    /// logits).
    pub fn predict(&self, x: &[f32], batch: usize) -> Result<Vec<u32>> {
        let logits = self.forward(x, batch)?;
        Ok(argmax_rows(&logits, self.classes))
    }
}

/// `[N, C, H, W]` → `[C, N, H, W]`.
pub fn nchw_to_cbhw(x: &[f32], batch: usize, [c, h, w]: [usize; 3]) -> Vec<f32> {
    let hw = h * w;
    let mut out = vec![0.0f32; x.len()];
    for ch in 0..c {
        for b in 0..batch {
            let src = &x[(b * c + ch) * hw..][..hw];
            out[(ch * batch + b) * hw..][..hw].copy_from_slice(src);
        }
    }
    out
}

/// The index of the first largest value of every row of `k` values.
pub fn argmax_rows(values: &[f32], k: usize) -> Vec<u32> {
    values
        .chunks(k.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &v)| {
                    if v > acc.1 {
                        (i, v)
                    } else {
                        acc
                    }
                })
                .0 as u32
        })
        .collect()
}

/// Softmax of every row of `k` logits, computed stably.
pub fn softmax_rows(logits: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(k.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&v| (v - m).exp()).collect();
        let s: f32 = e.iter().sum();
        out.extend(e.iter().map(|v| v / s));
    }
    out
}
