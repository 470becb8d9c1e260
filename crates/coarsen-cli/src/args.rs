//! Command-line arguments (parsing only; no I/O happens here).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use coarsen_kernels::threads::Pinning;

/// coarsen turns unstructured sparse neural networks into structured sparse networks that
/// kernels can run fast.
///
/// Weights and masks are safetensors files; a mask has the same tensor names and shapes as the
/// weights, U8 0/1 (or BOOL). Every weight is seen as a matrix W[rows, cols]: a conv weight
/// [Cout, Cin, kh, kw] is W[Cout, Cin·kh·kw].
#[derive(Debug, Parser)]
#[command(
    name = "coarsen",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
    /// Print no progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Pin worker threads, one per CPU: `auto` when a pool has one worker per CPU the process
    /// may use, `on` for any pool no larger, `off` never. Keeps two workers from sharing a CPU
    /// for a while, which halves the speed of small-batch inference.
    #[arg(long, global = true, value_name = "WHEN", default_value_t = Pinning::Auto)]
    pub pin: Pinning,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prune weights by magnitude to a target sparsity (unstructured; IMP's pruning step).
    Prune(PruneArgs),
    /// Convert an unstructured mask into a structured pattern.
    Convert(Box<ConvertArgs>),
    /// Show what a mask file holds, layer by layer; optionally draw each layer as a PNG.
    Inspect(InspectArgs),
    /// Time structured-sparse kernels against the dense GEMM baseline, in the same run.
    Bench(Box<BenchArgs>),
    /// Write randomly initialised weights of a known CIFAR architecture.
    Synth(SynthArgs),
    /// Run the structuring pipeline on an example model and write a report directory.
    Demo(DemoArgs),
    /// Train a network: dense, IMP with rewinding, IMP-Refill/Refill+/Regroup, RigL, DSB, SSB.
    Train(Box<TrainArgs>),
    /// Accuracy, per-layer density and pattern of a trained network.
    Eval(EvalArgs),
    /// Write a trained sparse network as safetensors (mask bits + kept values) plus a JSON file
    /// holding its explicit graph, and/or as an ONNX model.
    Export(ExportArgs),
    /// Class probabilities (top-k) of your own images: .npy, PNG, IDX or CIFAR-10 binary.
    Predict(PredictArgs),
}

/// Which tensors are layers.
#[derive(Debug, Args, Clone, Default)]
pub struct Selection {
    /// Only tensors whose name matches this regular expression (default: every tensor of rank ≥ 2).
    #[arg(long, value_name = "REGEX")]
    pub include: Option<String>,
    /// Leave out tensors whose name matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub exclude: Option<String>,
}

/// Where one magnitude threshold applies.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ScopeArg {
    /// One threshold over all selected layers.
    Global,
    /// Each layer pruned to the sparsity on its own.
    Layer,
}

/// What `coarsen prune` removes at a time.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum GranularityArg {
    /// Single weights (unstructured).
    Weight,
    /// Whole kh×kw kernels of convolutions (single weights of linear layers).
    Kernel,
}

/// `coarsen prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Weights (safetensors; f32, f16, bf16 or f64).
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Target sparsity, strictly between 0 and 1 (0.8 = 80% of the weights become zero).
    #[arg(long, value_name = "S")]
    pub sparsity: f64,
    /// Prune globally (one threshold) or per layer.
    #[arg(long, value_enum, default_value = "global")]
    pub scope: ScopeArg,
    /// Prune single weights, or whole kernels (the kh×kw weights of one output and input
    /// channel of a convolution, by their root mean square; the sparsity then counts kernels).
    /// `convert --kernels` then makes group or shuffled blocks of whole kernels, which Winograd
    /// runs with about 4x fewer multiplications.
    #[arg(long, value_enum, default_value = "weight")]
    pub granularity: GranularityArg,
    /// An existing mask to prune further (weights it removed stay removed and count).
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// Layer selection.
    #[command(flatten)]
    pub selection: Selection,
    /// Where to write the mask (safetensors, U8).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// The target pattern of `convert`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PatternArg {
    /// Refill: whole output channels kept or removed.
    Channel,
    /// Refill+: Refill plus an extra fraction of channels (--extra).
    #[value(name = "channel+")]
    ChannelPlus,
    /// Regroup: dense blocks of rows × columns found by graph partitioning.
    Group,
    /// DSB's shuffled blocks: rows clustered into groups of b, each owning b×b tiles.
    ShuffledBlock,
    /// Aligned H×W tiles.
    Block,
    /// N:M along input channels, optionally with a channel permutation.
    Nm,
}

/// Row score of the channel patterns.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CriterionArg {
    /// ℓ1 of the masked weights of the row (paper's choice).
    L1,
    /// Number of kept entries of the row (reference code's default).
    Count,
}

/// Partitioner of the group pattern.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PartitionerArg {
    /// METIS multilevel recursive bisection of the row graph.
    Metis,
    /// Balanced random parts (a baseline).
    Random,
    /// Mt-KaHyPar on the hypergraph (columns as hyperedges), minimising the cut, as the paper's
    /// hMETIS; needs a build with `--features kahypar`.
    Kahypar,
}

/// What a group layer without blocks becomes.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum FallbackArg {
    /// Keep its unstructured mask (reported as unstructured, with the reason).
    Keep,
    /// Make it one dense block.
    Dense,
}

/// `coarsen convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The unstructured mask (safetensors, U8/BOOL, same names and shapes as the weights).
    #[arg(long, value_name = "FILE")]
    pub mask: PathBuf,
    /// The weights; without them, magnitude criteria see every kept entry as 1.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// The target pattern.
    #[arg(long, value_enum)]
    pub to: PatternArg,
    /// Where to write the structured mask.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Seed of the randomised steps (partitioning, permutation search).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Reach this density (fraction kept, e.g. 0.2 for 80% sparsity) within one point, by
    /// pruning the weakest or refilling the strongest units of the structure (rows, tiles,
    /// block columns, N:M slots) after conversion [default: the density the pattern lands on].
    #[arg(long, value_name = "D")]
    pub target_density: Option<f64>,
    /// Whether every layer reaches --target-density on its own, or the selected layers together
    /// (one ranking of units across layers, as global magnitude pruning).
    #[arg(long, value_enum, default_value_t = TargetScopeArg::Layer, requires = "target_density")]
    pub target_scope: TargetScopeArg,
    /// Layer selection.
    #[command(flatten)]
    pub selection: Selection,
    /// Pattern options.
    #[command(flatten)]
    pub options: PatternOptions,
}

/// Scope of `--target-density`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetScopeArg {
    /// Every layer on its own.
    Layer,
    /// The selected layers together.
    Global,
}

/// Options of the individual patterns. Each is refused with a pattern it does not apply to.
#[derive(Debug, Args, Default, Clone)]
pub struct PatternOptions {
    /// Row score [default: l1].
    #[arg(long, value_enum, help_heading = "channel, channel+")]
    pub criterion: Option<CriterionArg>,
    /// Per-row scores: one vector of `rows` values per layer, same names (overrides --criterion).
    #[arg(long, value_name = "FILE", help_heading = "channel, channel+")]
    pub scores: Option<PathBuf>,
    /// Extra fraction ρ of the removed channels to keep [default: 0 for channel, 0.1 for channel+].
    #[arg(long, value_name = "RHO", help_heading = "channel, channel+")]
    pub extra: Option<f64>,

    /// Number of parts (the reference code: 8), or `auto` to size it to each layer (rows / row
    /// tile) [default: auto].
    #[arg(long, value_name = "K|auto", help_heading = "group")]
    pub parts: Option<String>,
    /// Balance: each bisection puts (50 ± 100·x)% of the rows on a side [default: 0.10].
    #[arg(long, value_name = "X", help_heading = "group")]
    pub imbalance: Option<f64>,
    /// A part needs more than this many rows to become a block [default: 16].
    #[arg(long, value_name = "N", help_heading = "group")]
    pub min_rows: Option<usize>,
    /// Row tile; larger parts split at a multiple of it [default: 32].
    #[arg(long, value_name = "N", help_heading = "group")]
    pub row_tile: Option<usize>,
    /// Block widening ratio [default: 1.5].
    #[arg(long, value_name = "R", help_heading = "group")]
    pub width_ratio: Option<f64>,
    /// Partitioner [default: metis].
    #[arg(long, value_enum, help_heading = "group")]
    pub partitioner: Option<PartitionerArg>,
    /// What a layer without blocks becomes [default: keep].
    #[arg(long, value_enum, help_heading = "group")]
    pub fallback: Option<FallbackArg>,
    /// Reproduce the widening bugs of the reference training code.
    #[arg(long, help_heading = "group")]
    pub legacy_regroup: bool,

    /// Block size: `b` for shuffled-block [default: 16], `HxW` (or `b`) for block [default: 16x16].
    #[arg(long, value_name = "b|HxW", help_heading = "shuffled-block, block")]
    pub block: Option<String>,
    /// Number of b×b tiles per layer [default: keeps each layer's density].
    #[arg(long, value_name = "K", help_heading = "shuffled-block, block")]
    pub blocks: Option<usize>,
    /// The seed article's row-similarity threshold q: only rows at least this cosine-similar
    /// are clustered together, the others keep their order [default: none, the DSB code's R/b
    /// clusters].
    #[arg(long, value_name = "Q", help_heading = "shuffled-block")]
    pub similarity: Option<f64>,
    /// Blocks of whole kernels: convert convolutions in the kernel view [Cout, Cin] (a kernel
    /// kept where one of its weights is, weighing the root mean square of its kept weights),
    /// each kernel kept whole. Blocks of input channels run on Winograd with about 4x fewer
    /// products. Start from a kernel mask (`coarsen prune --granularity kernel`).
    #[arg(long, help_heading = "group, shuffled-block")]
    pub kernels: bool,

    /// Entries kept per group [default: 2].
    #[arg(long, value_name = "N", help_heading = "nm")]
    pub n: Option<usize>,
    /// Group size [default: 4].
    #[arg(long, value_name = "M", help_heading = "nm")]
    pub m: Option<usize>,
    /// Search an input-channel permutation that keeps more magnitude.
    #[arg(long, help_heading = "nm")]
    pub permute: bool,
    /// Regrow every group to exactly N from the weights (the mask's ones first, then the largest
    /// others), as Refill regrows channels; needs --weights.
    #[arg(long, help_heading = "nm")]
    pub fill: bool,
    /// Random escapes of the permutation search (apex: 100) [default: 10].
    #[arg(long, value_name = "N", help_heading = "nm")]
    pub escape_attempts: Option<usize>,
    /// Stripes (of M channels) per window of the permutation search on wide layers: pairs are
    /// searched inside windows, dealt again at random until a deal gains nothing; 0 searches
    /// every pair, as apex [default: 32].
    #[arg(long, value_name = "S", help_heading = "nm")]
    pub permute_window: Option<usize>,
}

/// `coarsen inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The mask file to inspect.
    #[arg(value_name = "MASK")]
    pub mask: PathBuf,
    /// Weights, to report the magnitude each mask keeps.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Draw each layer's mask as a PNG in this directory (rows and columns reordered so the
    /// structure shows).
    #[arg(long, value_name = "DIR")]
    pub png: Option<PathBuf>,
    /// The mask before conversion, drawn beside each layer with the same reordering.
    #[arg(long, value_name = "FILE")]
    pub before: Option<PathBuf>,
    /// Layer selection.
    #[command(flatten)]
    pub selection: Selection,
}

/// `coarsen synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Architecture: resnet18, resnet20, vgg11 or vgg16 (CIFAR variants, 32×32 inputs).
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Number of classes.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub classes: usize,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the weights.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `coarsen demo`: dense training, IMP rounds, Refill, Regroup, N:M and DSB on Fashion-MNIST,
/// each result run on the packed kernels and timed against the dense network; writes
/// `report.md`, `report.html`, PNG plots and `results.json` to --out.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Report directory (runs are kept under DIR/runs; an interrupted demo continues there).
    #[arg(long, value_name = "DIR", default_value = "coarsen-demo")]
    pub out: PathBuf,
    /// Data set directory: MNIST-format IDX files or CIFAR-10 binary.
    #[arg(long, value_name = "DIR", default_value = coarsen_train::data::DEFAULT_DATA_DIR)]
    pub data: PathBuf,
    /// The full recipe of `coarsen train` (8 epochs per run on every training image, 7 IMP
    /// rounds of 20%): about two hours on two cores instead of minutes.
    #[arg(long)]
    pub full: bool,
    /// Epochs per training run [default: 3, or the recipe's with --full].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Training images used [default: 12000, or all with --full].
    #[arg(long)]
    pub train_subset: Option<usize>,
    /// Images per timed forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Timed forward passes of each path (median reported).
    #[arg(long, default_value_t = 25)]
    pub reps: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A TOML experiment file (as for `coarsen train --config`) applied to every run: model,
    /// width, recipe, IMP rounds and rate, ... (each run keeps its own method).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Instead: the structuring-only demo on a synthetic CIFAR network (no data, no
    /// training): magnitude pruning, then every pattern, verified and drawn.
    #[arg(long)]
    pub synthetic: bool,
    /// With --synthetic: the architecture.
    #[arg(long, default_value = "resnet18", requires = "synthetic")]
    pub model: String,
    /// With --synthetic: global magnitude sparsity of the unstructured mask.
    #[arg(long, default_value_t = 0.8, requires = "synthetic")]
    pub sparsity: f64,
    /// Stop every epoch after this many batches (quick checks).
    #[arg(long, hide = true)]
    pub max_batches: Option<usize>,
}

/// `coarsen bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A GEMM shape `R,C,N` (W is R×C, X is C×N); repeat for several. Default: CIFAR ResNet-18
    /// and VGG-16 conv layers as im2col GEMMs at --batch, and transformer MLP shapes.
    #[arg(long, value_name = "R,C,N")]
    pub shape: Vec<String>,
    /// Density of the random structured masks.
    #[arg(long, default_value_t = 0.25)]
    pub density: f64,
    /// Formats, comma-separated: channel, group or group:ROWS, shuffled-block or shuffled-block:B,
    /// bsr or bsr:HxW, nm or nm:N:M, csr
    /// (default: group:32,shuffled-block:16,shuffled-block:32,bsr:16x16,bsr:32x32,channel,nm:2:4,csr).
    #[arg(long, value_name = "LIST")]
    pub formats: Option<String>,
    /// Batch size of the default conv shapes.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Benchmark every layer of this (structured) mask file at its real shape instead; with
    /// --model NAME, the whole network under these masks.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// Weights for --mask (seeded random values otherwise).
    #[arg(long, value_name = "FILE", requires = "mask")]
    pub weights: Option<PathBuf>,
    /// Columns of X for --mask layers (batch × output positions of a conv).
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub n: usize,
    /// Layer selection for --mask.
    #[command(flatten)]
    pub selection: Selection,
    /// Threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Instruction set: scalar, avx2, avx512, neon [default: the best available].
    #[arg(long)]
    pub isa: Option<String>,
    /// Seconds of repetitions per measurement (at least 5 repetitions).
    #[arg(long, default_value_t = 0.3, value_parser = positive_seconds)]
    pub budget: f64,
    /// Seed of the random masks and weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the records as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Instead of kernels: time a masked SGD step of conv3x3(1→32)-conv3x3(32→64)-pool-fc
    /// (batch 128) with stock candle against coarsen's operations, and the training throughput
    /// of the small CNN dense, masked and structured-sparse.
    #[arg(long, conflicts_with_all = ["mask", "shape"])]
    pub training: bool,
    /// Timed steps per measurement of --training.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Instead of kernels: the end-to-end inference time of a network, packed against dense,
    /// same run, batch --batch: an export directory, or a CIFAR-shaped architecture (resnet18,
    /// vgg16, resnet20, vgg11) with random structured masks on its prunable layers (or the
    /// masks of --mask, on the weights of --weights). Repeat for several.
    #[arg(long, conflicts_with_all = ["shape", "training"])]
    pub model: Vec<String>,
    /// Patterns of --model, comma-separated: channel, group, shuffled-block, block, nm,
    /// unstructured [default: group,channel,nm].
    #[arg(long, value_name = "LIST", requires = "model")]
    pub pattern: Option<String>,
    /// Sparsities of --model's prunable layers, comma-separated (N:M is always 1 − N/M)
    /// [default: 0.78 for group, 0.5 for channel].
    #[arg(long, value_name = "LIST", requires = "model")]
    pub sparsity: Option<String>,
    /// Timed forward passes of each path per --model measurement.
    #[arg(long, default_value_t = 7, requires = "model")]
    pub reps: usize,
    /// With --model: also time every step of both paths (layer, kernel, GFLOP/s and its share of
    /// this machine's FMA peak, measured in the run), to see where the time goes, and each
    /// path's roof: the least time its multiply-adds take at that peak.
    #[arg(long, requires = "model")]
    pub profile: bool,
    /// Timing worker for scripts/bench-peers: load this export directory, run it once on
    /// --input and write the logits to --logits-out, print a JSON `ready` line, then answer
    /// `run K` lines on stdin with the milliseconds of K forward passes (`quit` ends). The
    /// packed path is tuned per layer (--tuning); where tuning measured (`measure`,
    /// `remeasure`) and the tuned network then measures no faster than the dense path as a
    /// whole in two timings in a row, it runs dense (the `ready` line's detail says so). The
    /// `ready` line also gives the pass's multiply-adds (`macs`), this machine's FMA peak on the
    /// worker's threads (`fma_peak_gflops`) and how many layers run Winograd.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "mask", "shape", "training"], requires_all = ["input", "logits_out"])]
    pub serve: Option<PathBuf>,
    /// With --serve: the kernels, packed or dense.
    #[arg(long, value_enum, default_value_t = PathArg::Packed, requires = "serve")]
    pub path: PathArg,
    /// Per sparse layer of the packed path: run its packed format or the dense kernels.
    /// `measure` runs whichever this machine runs faster at this batch size (timed per layer
    /// in whole passes, cached in ~/.cache/coarsen/tune.json or $COARSEN_TUNE_CACHE),
    /// `remeasure` times again, `packed` and `dense` force one side.
    #[arg(long, value_enum, default_value_t = TuningArg::Measure)]
    pub tuning: TuningArg,
    /// With --model or --serve: the packed path's convolutions in dense blocks (group,
    /// shuffled-block, block; also the unrolled maps of those on 2×2 images, and dense
    /// convolutions that run as implicit GEMMs, such as a CIFAR network's first) multiply in
    /// bfloat16 (weights and inputs rounded to 8 significant bits, products summed in
    /// float32), twice the multiply-adds per instruction on CPUs with AVX-512 BF16; every other
    /// layer stays float32. Outputs differ from float32 by the rounding (the max |Δ| column of
    /// --model, bench-peers' check). --serve fails where no layer runs so.
    #[arg(long)]
    pub bf16: bool,
    /// With --serve: the input batch, a float32 .npy array [N, C, H, W] of network inputs.
    #[arg(long, value_name = "FILE", requires = "serve")]
    pub input: Option<PathBuf>,
    /// With --serve: where to write the logits of the input batch (.npy, [N, classes]).
    #[arg(long, value_name = "FILE", requires = "serve")]
    pub logits_out: Option<PathBuf>,
}

/// Which kernels run a network.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PathArg {
    /// Every layer in its packed format.
    Packed,
    /// Every layer dense on the dense GEMM.
    Dense,
}

impl PathArg {
    /// The engine's path.
    pub fn path(self) -> coarsen_infer::Path {
        match self {
            PathArg::Packed => coarsen_infer::Path::Packed,
            PathArg::Dense => coarsen_infer::Path::Dense,
        }
    }
}

/// How sparse layers choose between their packed format and the dense kernels.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TuningArg {
    /// The faster on this machine, measured once and cached.
    Measure,
    /// Measure again, replacing the cached times.
    Remeasure,
    /// Always the packed format.
    Packed,
    /// Always the dense kernels.
    Dense,
}

impl TuningArg {
    /// The engine's tuning.
    pub fn tuning(self) -> coarsen_infer::Tuning {
        match self {
            TuningArg::Measure => coarsen_infer::Tuning::Measure,
            TuningArg::Remeasure => coarsen_infer::Tuning::Remeasure,
            TuningArg::Packed => coarsen_infer::Tuning::Packed,
            TuningArg::Dense => coarsen_infer::Tuning::Dense,
        }
    }
}

/// `coarsen predict`: class probabilities of the user's own images.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// An export directory, or a run, stage or checkpoint directory.
    pub model: PathBuf,
    /// Images: a .npy array, PNG images, an IDX images file (idx3-ubyte, gzip or raw) or a
    /// CIFAR-10 binary batch (.bin); give several files in one --input or repeat it.
    #[arg(long, short, value_name = "FILE", required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// IDX labels of the images (CIFAR-10 batches carry theirs): also report the accuracy.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Classes shown per image.
    #[arg(long, default_value_t = 3, value_name = "K")]
    pub top: usize,
    /// Float .npy arrays hold network inputs already (normalised); by default floats are pixels
    /// in [0, 1] and uint8 pixels in 0..255, normalised as the network was trained.
    #[arg(long)]
    pub normalized: bool,
    /// The kernels: packed (default) or dense.
    #[arg(long, value_enum, default_value_t = PathArg::Packed)]
    pub path: PathArg,
    /// Per sparse layer of the packed path: run its packed format or the dense kernels.
    /// `measure` runs whichever this machine runs faster at this batch size (timed per layer
    /// in whole passes, cached in ~/.cache/coarsen/tune.json or $COARSEN_TUNE_CACHE),
    /// `remeasure` times again, `packed` and `dense` force one side.
    #[arg(long, value_enum, default_value_t = TuningArg::Measure)]
    pub tuning: TuningArg,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Images listed in the table (--json gets them all).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub show: usize,
    /// Data set directory of a run [default: the one it used]: its input shape and
    /// normalisation.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Write every image's class probabilities as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// `coarsen train`.
///
/// Settings come from the defaults of the data set's recipe, then the `--config` TOML file,
/// then the flags. The output directory receives `experiment.json`, `metrics.jsonl`, a
/// checkpoint after every epoch, `stage-{s}/` (weights, masks, summary) and `results.json`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Method: dense, one-shot, naive-channel, imp, imp-refill, imp-refill+, imp-regroup, nm,
    /// rigl, dsb, ssb [default: dense].
    #[arg(long)]
    pub method: Option<String>,
    /// Architecture: mlp, cnn, vgg11, vgg16, resnet20, resnet18 [default: cnn].
    #[arg(long)]
    pub model: Option<String>,
    /// Width multiplier of the hidden layers [default: 1].
    #[arg(long)]
    pub width: Option<f64>,
    /// Epochs per training run (per IMP round) [default: the recipe's, 8 on Fashion-MNIST].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Output directory.
    #[arg(long, value_name = "DIR", required_unless_present = "summary")]
    pub out: Option<PathBuf>,
    /// Seed of initialisation, data order and augmentation [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Data set directory: MNIST-format IDX files or CIFAR-10 binary batches.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/usr/share/datasets/fashion-mnist"
    )]
    pub data: PathBuf,
    /// An experiment file (TOML): any field of `experiment.json`, tables `recipe`, `imp`,
    /// `refill`, `regroup`, `dynamic` taking only the fields to change.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Train into --out even when it holds other files or a run of another experiment
    /// (otherwise refused).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Reuse the finished stages of another run of the same model, seed and recipe (its dense
    /// stage; IMP rounds of the same rate).
    #[arg(long, value_name = "DIR")]
    pub reuse: Option<PathBuf>,
    /// Target sparsity of one-shot, rigl, dsb, ssb; channel sparsity of naive-channel [default: 0.8].
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// IMP rounds [default: 7].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Fraction of the remaining weights IMP prunes per round [default: 0.2].
    #[arg(long)]
    pub rate: Option<f64>,
    /// IMP round whose mask imp-refill/-refill+/-regroup post-process [default: the last].
    #[arg(long)]
    pub post_round: Option<usize>,
    /// Post-process inside every IMP round instead of once (each round then prunes --rate of
    /// what remains, since the structure moves the density off the schedule).
    #[arg(long)]
    pub every_round: bool,
    /// After Refill/Regroup, move the structured masks back to the density IMP pruned to by
    /// pruning or refilling inside the structure: per layer, or over the pruned layers together
    /// [default: the structure's own density, as the reference code].
    #[arg(long, value_parser = ["layer", "global"])]
    pub keep_density: Option<String>,
    /// Refill's channel score: l1, count, feature-l1, feature-l2, saliency [default: l1].
    #[arg(long)]
    pub criterion: Option<String>,
    /// Refill+'s extra fraction ρ [default: 0.1].
    #[arg(long)]
    pub extra: Option<f64>,
    /// Regroup's part count: a number (the reference code: 8) or `auto` (rows / 32) [default: auto].
    #[arg(long)]
    pub parts: Option<String>,
    /// DSB/SSB block size b [default: 16].
    #[arg(long)]
    pub block: Option<usize>,
    /// DSB growth: gradient (the dense weight gradient, as the DSB code) or estimate (the
    /// paper's ‖dY_i‖·‖U_j‖ from the layer's output gradient and input: a grid of top rows ×
    /// columns, then strips) [default: gradient].
    #[arg(long, value_parser = ["gradient", "estimate"])]
    pub grow: Option<String>,
    /// Steps between mask updates of rigl/dsb [default: 100].
    #[arg(long)]
    pub delta_t: Option<usize>,
    /// T_end, the drop cosine's period, as a fraction of training [default: rigl 0.75; dsb 1.2,
    /// as the DSB CIFAR code].
    #[arg(long, value_name = "FRACTION")]
    pub t_end: Option<f64>,
    /// Mask updates stop at this fraction of T_end [default: rigl 1; dsb 0.5, as the DSB CIFAR
    /// code, where the drop fraction is still α/2].
    #[arg(long, value_name = "FRACTION")]
    pub update_stop: Option<f64>,
    /// When masks change within a step: backward (before the optimiser step, as RigL) or step
    /// (after it, as the DSB code) [default: rigl backward, dsb step].
    #[arg(long, value_parser = ["backward", "step"])]
    pub update_at: Option<String>,
    /// Whether dsb/ssb put linear layers in shuffled blocks (the DSB code leaves them
    /// unstructured) [default: blocked].
    #[arg(long, value_parser = ["blocked", "unstructured"])]
    pub linear_blocks: Option<String>,
    /// dsb/ssb: the seed article's row-similarity threshold q for the row clustering (only rows
    /// at least this cosine-similar are clustered) [default: none, the DSB code's R/b clusters].
    #[arg(long, value_name = "Q")]
    pub similarity: Option<f64>,
    /// Batch size [default: the recipe's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: the recipe's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Train on the first N training images only.
    #[arg(long, value_name = "N")]
    pub train_subset: Option<usize>,
    /// Stop every epoch after N batches (quick checks).
    #[arg(long, value_name = "N")]
    pub max_batches: Option<usize>,
    /// Stop (as if killed) after N optimiser steps of this process; for testing --resume.
    #[arg(long, value_name = "N", hide = true)]
    pub stop_after_steps: Option<usize>,
    /// Instead of training, tabulate the results of these run directories.
    #[arg(long, value_name = "DIR", num_args = 1.., conflicts_with_all = ["out", "resume"])]
    pub summary: Vec<PathBuf>,
    /// With --summary: also write the table as JSON here.
    #[arg(long, value_name = "FILE", requires = "summary")]
    pub json: Option<PathBuf>,
}

/// What `coarsen export` writes.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    /// model.safetensors (mask bits + kept values) and model.json (the explicit graph).
    Coarsen,
    /// model.onnx (standard opset 17, dense f32 weights holding the zeros of the masks).
    Onnx,
    /// Both.
    Both,
}

/// `coarsen export`: a trained run, an export, or a known architecture's weights file, written
/// as coarsen's export format and/or ONNX.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run directory (its final stage, or its checkpoint while unfinished), a `stage-{s}`
    /// directory, a checkpoint directory, or an export directory (to write its ONNX model).
    #[arg(required_unless_present = "model", conflicts_with = "model")]
    pub checkpoint: Option<PathBuf>,
    /// Export a weights file of this architecture instead of a run: mlp, cnn, vgg11, vgg16,
    /// resnet20 or resnet18 (torchvision names, as `coarsen synth` writes them).
    #[arg(long, value_name = "NAME", requires = "weights")]
    pub model: Option<String>,
    /// With --model: the weights (safetensors, every parameter and BatchNorm statistic).
    #[arg(long, value_name = "FILE", requires = "model")]
    pub weights: Option<PathBuf>,
    /// With --model: the masks (safetensors; structured masks carry their coarsen metadata).
    #[arg(long, value_name = "FILE", requires = "model")]
    pub mask: Option<PathBuf>,
    /// With --model: the input image C,H,W [default: 3,32,32, or 1,28,28 for mlp and cnn].
    #[arg(long, value_name = "C,H,W", requires = "model")]
    pub input: Option<String>,
    /// With --model: the width multiplier the weights were made with.
    #[arg(long, default_value_t = 1.0, value_name = "X", requires = "model")]
    pub width: f64,
    /// The export directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// What to write [default: coarsen].
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// Also write model.onnx (--format both; from an export directory, --format onnx).
    #[arg(long, conflicts_with = "format")]
    pub onnx: bool,
    /// In model.onnx, fold every BatchNorm that alone reads a convolution or linear layer into
    /// its weights and bias (default: kept as BatchNormalization nodes).
    #[arg(long)]
    pub fold_bn: bool,
    /// Data set directory [default: the one a run used; none with --model]; gives the input
    /// shape, the normalisation and class names recorded in model.json and the images the
    /// export is verified on.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Images the exported network is checked on against its source (0: no check): test
    /// images of the data set, or random images with --model and no --data.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub verify: usize,
}

/// `coarsen eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory (its final stage, or its checkpoint while unfinished), a `stage-{s}`
    /// directory, a checkpoint directory or a `coarsen export` directory.
    pub checkpoint: PathBuf,
    /// Data set directory [default: the one the run used].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Evaluation batch size (with --sparse, also the batch of the latency measurement).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Also run the network on the packed kernels (BatchNorm folded, channel sparsity shrinking
    /// the next layer): its accuracy, and its latency against the dense path, same run.
    #[arg(long)]
    pub sparse: bool,
    /// Timed forward passes of each path with --sparse (median reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Per sparse layer of the packed path (--sparse): run its packed format or the dense kernels.
    /// `measure` runs whichever this machine runs faster at this batch size (timed per layer
    /// in whole passes, cached in ~/.cache/coarsen/tune.json or $COARSEN_TUNE_CACHE),
    /// `remeasure` times again, `packed` and `dense` force one side.
    #[arg(long, value_enum, default_value_t = TuningArg::Measure)]
    pub tuning: TuningArg,
    /// With --sparse: the packed path's convolutions in dense blocks multiply in bfloat16
    /// where the CPU has AVX-512 BF16 (see `coarsen bench --bf16`): its accuracy and latency
    /// so.
    #[arg(long, requires = "sparse")]
    pub bf16: bool,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// A count of at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite, positive number of seconds.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err("must be a positive, finite number of seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}
