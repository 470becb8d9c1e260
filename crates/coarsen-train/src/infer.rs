//! Sparse inference: a trained network with (structured) masks run forward on
//! `coarsen-kernels`' packed formats, and the same network on the dense path.
//!
//! An [`InferenceNet`] is built once from a [`Model`], its masks and the masks' coarsen metadata:
//!
//! - BatchNorm is folded into the preceding convolution (`W ← γ/σ·W`, bias `β − μ·γ/σ`) and a
//!   ReLU behind it is fused into the layer's epilogue;
//! - every conv and linear weight is packed in the format its pattern allows
//!   ([`LayerFormat`]): channel-compact, group blocks, shuffled blocks, BSR, N:M, CSR for very
//!   sparse unstructured layers, dense otherwise;
//! - **channel sparsity physically shrinks the network**: a channel-sparse layer computes only
//!   its kept output channels, and the next layer reads only those input channels. A removed
//!   channel is not zero after BatchNorm: it is the constant `act(β − μ·γ/σ)`. Its contribution
//!   to the next layer is precomputed exactly, as a per-output-position bias map (the map varies
//!   only at the borders, where zero padding cuts the kernel), so the shrunk network computes the
//!   same function as the masked one;
//! - convolutions run as im2col + SpMM over cache-sized chunks of images, one chunk per thread.
//!
//! The dense path ([`Path::Dense`]) runs the same folded network with every layer dense on the
//! strong dense GEMM (faer) through the same chunked im2col: the honest baseline that
//! time savings are measured against.

use std::borrow::Cow;
use std::collections::BTreeMap;

use coarsen_core::patterns::Pattern;
use coarsen_core::{CoarsenMetadata, LayerStatus, Mask, MatrixView};
use coarsen_kernels::{
    Bsr, ChannelCompact, Csr, Dense, GroupBlocks, NmCompressed, Packed, Plan, ShuffledBlocks,
    Threading,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::Images;
use crate::error::{Result, TrainError};
use crate::model::{Model, Node};
use crate::ops::{ConvDims, ConvGeometry, Shared};
use crate::optim::Masks;

const BN_EPS: f32 = 1e-5;

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

    /// Whether the format can read a subset of the input channels (the others were removed by
    /// a channel-sparse producer); the other formats read every input channel.
    fn shrinks_input(&self) -> bool {
        matches!(
            self,
            LayerFormat::Dense | LayerFormat::Csr | LayerFormat::Channel | LayerFormat::Group
        )
    }
}

/// The format of every conv and linear weight of `model`: from the mask file's coarsen metadata
/// where a layer is structured; otherwise channel-compact when every row is full or empty, CSR
/// at density ≤ [`CSR_MAX_DENSITY`], dense above. Layers without a mask are dense.
pub fn layer_formats(
    model: &Model,
    masks: &Masks,
    meta: Option<&CoarsenMetadata>,
) -> Result<BTreeMap<String, LayerFormat>> {
    let pattern = match meta {
        Some(m) => Some(Pattern::from_metadata(&m.pattern, &m.params)?),
        None => None,
    };
    let mut out = BTreeMap::new();
    for p in model.weights() {
        let shape = p.shape();
        let rows = shape[0];
        let len: usize = shape.iter().product();
        let Some(m) = masks.get(&p.name) else {
            out.insert(p.name.clone(), LayerFormat::Dense);
            continue;
        };
        let ones = m.iter().filter(|&&b| b != 0).count();
        if ones == len {
            out.insert(p.name.clone(), LayerFormat::Dense);
            continue;
        }
        let layer = meta.and_then(|mm| mm.layers.get(&p.name));
        let structured = layer.is_some_and(|l| l.status == LayerStatus::Structured);
        let fmt = match (&pattern, structured) {
            (Some(Pattern::Channel(_)), true) => LayerFormat::Channel,
            (Some(Pattern::Group(_)), true) => LayerFormat::Group,
            (Some(Pattern::ShuffledBlock(c)), true) => {
                LayerFormat::ShuffledBlock { block: c.block }
            }
            (Some(Pattern::Block(c)), true) => LayerFormat::Bsr {
                height: c.height,
                width: c.width,
            },
            (Some(Pattern::Nm(c)), true) => LayerFormat::Nm {
                n: c.n,
                m: c.m,
                col_perm: layer.and_then(|l| l.col_perm.clone()),
            },
            _ => {
                let mask = Mask::from_bytes(rows, len / rows.max(1), m.clone())?;
                if coarsen_core::patterns::check::check_channel(&mask).is_ok() {
                    LayerFormat::Channel
                } else if (ones as f64) <= CSR_MAX_DENSITY * len as f64 {
                    LayerFormat::Csr
                } else {
                    LayerFormat::Dense
                }
            }
        };
        out.insert(p.name.clone(), fmt);
    }
    Ok(out)
}

/// Which kernels an [`InferenceNet`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Every layer in its packed format; channel sparsity shrinks the network.
    Packed,
    /// Every layer dense (masked weights, zeros included) on the dense GEMM: the baseline.
    Dense,
}

/// What one layer became.
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

/// Activation flow at one point of the network, known when building: which channels are
/// computed (`live`, ascending) and the constant value of every other channel.
#[derive(Clone, Debug)]
struct Flow {
    full: usize,
    live: Vec<u32>,
    consts: Vec<f32>,
    h: usize,
    w: usize,
}

impl Flow {
    fn all(c: usize, h: usize, w: usize) -> Flow {
        Flow {
            full: c,
            live: (0..c as u32).collect(),
            consts: vec![0.0; c],
            h,
            w,
        }
    }

    fn all_live(&self) -> bool {
        self.live.len() == self.full
    }

    fn map_consts(&mut self, f: impl Fn(f32) -> f32) {
        self.consts.iter_mut().for_each(|v| *v = f(*v));
    }
}

/// A conv or linear layer (a linear layer is a 1×1 convolution on a 1×1 image).
#[derive(Debug)]
struct Layer {
    name: String,
    plan: Plan,
    g: ConvGeometry,
    /// Input channels read (rows of `X` / k²) and output rows.
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    bias: Vec<f32>,
    /// `[cout, ho·wo]`: the exact contribution of removed input channels.
    corr: Option<Vec<f32>>,
    relu: bool,
    /// The rows of the im2col matrix the kernel reads, when it does not read them all (no
    /// kept weight uses the others): only these are computed.
    read: Option<Vec<u32>>,
}

#[derive(Debug)]
enum Op {
    Layer(Box<Layer>),
    /// Rebuilds `to` channels (ascending, a superset of `from`), removed ones from constants.
    Materialize {
        from: Vec<u32>,
        to: Vec<u32>,
        consts: Vec<f32>,
        hw: usize,
    },
    Relu,
    MaxPool2 {
        h: usize,
        w: usize,
    },
    GlobalAvgPool {
        hw: usize,
    },
    Flatten {
        hw: usize,
    },
    Residual {
        body: Vec<Op>,
        shortcut: Vec<Op>,
        /// Output channels (union), each from (body row or constant) + (shortcut row or constant).
        sources: Vec<(Source, Source)>,
        hw: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Source {
    Row(usize),
    Const(f32),
}

/// Performance settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InferOptions {
    /// im2col values per chunk of images (a chunk is one thread's work).
    pub chunk_floats: usize,
    /// Least columns of a chunk.
    pub min_cols: usize,
}

impl Default for InferOptions {
    fn default() -> Self {
        InferOptions {
            chunk_floats: 1 << 17,
            min_cols: 256,
        }
    }
}

/// A network ready to run forward on packed (or dense) kernels. See the [module](self) docs.
#[derive(Debug)]
pub struct InferenceNet {
    input: [usize; 3],
    classes: usize,
    ops: Vec<Op>,
    layers: Vec<LayerInfo>,
    path: Path,
    options: InferOptions,
}

struct Ctx<'a> {
    model: &'a Model,
    masks: &'a Masks,
    formats: &'a BTreeMap<String, LayerFormat>,
    path: Path,
    infos: Vec<LayerInfo>,
}

impl InferenceNet {
    /// Builds the network of `model` (its current weights and BatchNorm statistics) under
    /// `masks`, on `path`, with layer formats from [`layer_formats`].
    pub fn new(
        model: &Model,
        masks: &Masks,
        meta: Option<&CoarsenMetadata>,
        path: Path,
    ) -> Result<InferenceNet> {
        let formats = layer_formats(model, masks, meta)?;
        Self::with_formats(model, masks, &formats, path)
    }

    /// Builds with the given per-layer formats (layers missing from `formats` are dense).
    pub fn with_formats(
        model: &Model,
        masks: &Masks,
        formats: &BTreeMap<String, LayerFormat>,
        path: Path,
    ) -> Result<InferenceNet> {
        let [c, h, w] = model.spec.input;
        let mut ctx = Ctx {
            model,
            masks,
            formats,
            path,
            infos: Vec::new(),
        };
        let (mut ops, flow) = ctx.build(&model.nodes, Flow::all(c, h, w))?;
        if flow.h * flow.w != 1 || flow.full != model.spec.classes {
            return Err(TrainError::config(
                "model",
                &model.spec.name,
                format!(
                    "ends with {} channels of {}x{}, expected {} logits",
                    flow.full, flow.h, flow.w, model.spec.classes
                ),
            ));
        }
        if !flow.all_live() {
            ops.push(materialize(&flow, 1));
        }
        Ok(InferenceNet {
            input: model.spec.input,
            classes: model.spec.classes,
            ops,
            layers: ctx.infos,
            path,
            options: InferOptions::default(),
        })
    }

    /// Sets the performance options.
    pub fn set_options(&mut self, options: InferOptions) {
        self.options = options;
    }

    /// What every layer became, in forward order.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The path it runs on.
    pub fn path(&self) -> Path {
        self.path
    }

    /// Multiply-adds per image over all conv and linear layers.
    pub fn macs_per_image(&self) -> usize {
        self.layers.iter().map(|l| l.macs_per_image).sum()
    }

    /// Logits `[batch, classes]` (row-major) of a channel-major batch `x = [C, B, H, W]`.
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let [c, h, w] = self.input;
        if x.len() != c * batch * h * w {
            return Err(TrainError::config(
                "input",
                x.len(),
                format!(
                    "expected [{c}, {batch}, {h}, {w}] = {} values",
                    c * batch * h * w
                ),
            ));
        }
        let y = run_ops(&self.ops, Cow::Borrowed(x), batch, &self.options)?;
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

    /// Top-1 accuracy on `images`, in batches of `batch`.
    pub fn accuracy(&self, images: &Images, batch: usize) -> Result<f64> {
        crate::train::top1(images, batch, |b| {
            let logits = self.forward(&b.pixels, b.size)?;
            Ok(logits
                .chunks(self.classes.max(1))
                .map(|row| {
                    // The first of the largest logits.
                    row.iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |acc, (i, &v)| {
                                if v > acc.1 {
                                    (i, v)
                                } else {
                                    acc
                                }
                            },
                        )
                        .0 as u32
                })
                .collect())
        })
    }
}

/// Latency of a packed network against its dense path on the same batch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathTiming {
    /// Median milliseconds of the packed path.
    pub packed_ms: f64,
    /// Median milliseconds of the dense path.
    pub dense_ms: f64,
    /// `1 − packed_ms / dense_ms`.
    pub time_saving: f64,
    /// `1 − packed multiply-adds / dense multiply-adds`: what a perfect kernel would save.
    pub ideal_time_saving: f64,
}

/// Times `packed` against `dense` on the channel-major batch `x` of `batch` images, `reps`
/// times each (at least once), interleaved; medians.
pub fn time_paths(
    packed: &InferenceNet,
    dense: &InferenceNet,
    x: &[f32],
    batch: usize,
    reps: usize,
) -> Result<PathTiming> {
    let error = std::cell::RefCell::new(None);
    let run = |net: &InferenceNet| {
        if let Err(e) = net.forward(x, batch) {
            error.borrow_mut().get_or_insert(e);
        }
    };
    let (packed_ms, dense_ms) =
        coarsen_kernels::timing::interleaved(reps.max(1), || run(packed), || run(dense));
    if let Some(e) = error.into_inner() {
        return Err(e);
    }
    Ok(PathTiming {
        packed_ms,
        dense_ms,
        time_saving: 1.0 - packed_ms / dense_ms,
        ideal_time_saving: 1.0
            - packed.macs_per_image() as f64 / dense.macs_per_image().max(1) as f64,
    })
}

fn materialize(flow: &Flow, hw: usize) -> Op {
    Op::Materialize {
        from: flow.live.clone(),
        to: (0..flow.full as u32).collect(),
        consts: flow.consts.clone(),
        hw,
    }
}

impl Ctx<'_> {
    fn build(&mut self, nodes: &[Node], mut flow: Flow) -> Result<(Vec<Op>, Flow)> {
        let mut ops = Vec::new();
        let mut i = 0;
        while i < nodes.len() {
            match &nodes[i] {
                Node::Conv { w, g } => {
                    let bn = match nodes.get(i + 1) {
                        Some(Node::Bn {
                            w: gw,
                            b,
                            mean,
                            var,
                            relu,
                            ..
                        }) => {
                            i += 1;
                            Some((*gw, *b, *mean, *var, *relu))
                        }
                        _ => None,
                    };
                    let p = &self.model.params[*w];
                    let shape = p.shape();
                    let mut wv = p.values()?;
                    self.apply_mask(&p.name, &mut wv)?;
                    let cout = shape[0];
                    let (bias, relu) = match bn {
                        Some((gw, b, mean, var, relu)) => {
                            let gamma = self.model.params[gw].values()?;
                            let beta = self.model.params[b].values()?;
                            let rm = buffer(self.model, mean);
                            let rv = buffer(self.model, var);
                            let per = wv.len() / cout.max(1);
                            let mut bias = vec![0.0f32; cout];
                            for r in 0..cout {
                                let s = gamma[r] / (rv[r] + BN_EPS).sqrt();
                                wv[r * per..(r + 1) * per].iter_mut().for_each(|v| *v *= s);
                                bias[r] = beta[r] - rm[r] * s;
                            }
                            (bias, relu)
                        }
                        None => (vec![0.0; cout], false),
                    };
                    flow = self.layer(&mut ops, &p.name, &shape, wv, bias, relu, *g, flow)?;
                }
                Node::Linear { w, b } => {
                    let relu = matches!(nodes.get(i + 1), Some(Node::Relu));
                    if relu {
                        i += 1;
                    }
                    let p = &self.model.params[*w];
                    let shape = p.shape();
                    let mut wv = p.values()?;
                    self.apply_mask(&p.name, &mut wv)?;
                    let bias = self.model.params[*b].values()?;
                    if flow.h * flow.w != 1 {
                        return Err(TrainError::config(
                            "model",
                            &p.name,
                            "a linear layer needs flattened input",
                        ));
                    }
                    let g = ConvGeometry {
                        k: 1,
                        stride: 1,
                        pad: 0,
                    };
                    let shape4 = vec![shape[0], shape[1], 1, 1];
                    flow = self.layer(&mut ops, &p.name, &shape4, wv, bias, relu, g, flow)?;
                    if let Some(info) = self.infos.last_mut() {
                        info.shape = shape;
                    }
                }
                Node::Bn { .. } => {
                    return Err(TrainError::config(
                        "model",
                        "batchnorm",
                        "a BatchNorm must follow a convolution",
                    ))
                }
                Node::Relu => {
                    ops.push(Op::Relu);
                    flow.map_consts(|v| v.max(0.0));
                }
                Node::MaxPool2 => {
                    ops.push(Op::MaxPool2 {
                        h: flow.h,
                        w: flow.w,
                    });
                    flow.h /= 2;
                    flow.w /= 2;
                }
                Node::GlobalAvgPool => {
                    ops.push(Op::GlobalAvgPool {
                        hw: flow.h * flow.w,
                    });
                    flow.h = 1;
                    flow.w = 1;
                }
                Node::Flatten => {
                    let hw = flow.h * flow.w;
                    if hw > 1 {
                        ops.push(Op::Flatten { hw });
                        let live = flow
                            .live
                            .iter()
                            .flat_map(|&c| (0..hw as u32).map(move |s| c * hw as u32 + s))
                            .collect();
                        let consts = flow
                            .consts
                            .iter()
                            .flat_map(|&v| std::iter::repeat_n(v, hw))
                            .collect();
                        flow = Flow {
                            full: flow.full * hw,
                            live,
                            consts,
                            h: 1,
                            w: 1,
                        };
                    }
                }
                Node::Residual { body, shortcut } => {
                    let (body_ops, fb) = self.build(body, flow.clone())?;
                    let (short_ops, fs) = self.build(shortcut, flow.clone())?;
                    if (fb.full, fb.h, fb.w) != (fs.full, fs.h, fs.w) {
                        return Err(TrainError::config(
                            "model",
                            "residual",
                            format!(
                                "body gives {}x{}x{}, shortcut {}x{}x{}",
                                fb.full, fb.h, fb.w, fs.full, fs.h, fs.w
                            ),
                        ));
                    }
                    let pos = |f: &Flow, c: u32| f.live.binary_search(&c).ok();
                    let mut live = Vec::new();
                    let mut consts = vec![0.0f32; fb.full];
                    let mut sources = Vec::new();
                    for c in 0..fb.full as u32 {
                        let (a, b) = (pos(&fb, c), pos(&fs, c));
                        if a.is_none() && b.is_none() {
                            consts[c as usize] = fb.consts[c as usize] + fs.consts[c as usize];
                            continue;
                        }
                        let src = |p: Option<usize>, f: &Flow| match p {
                            Some(r) => Source::Row(r),
                            None => Source::Const(f.consts[c as usize]),
                        };
                        sources.push((src(a, &fb), src(b, &fs)));
                        live.push(c);
                    }
                    ops.push(Op::Residual {
                        body: body_ops,
                        shortcut: short_ops,
                        sources,
                        hw: fb.h * fb.w,
                    });
                    flow = Flow {
                        full: fb.full,
                        live,
                        consts,
                        h: fb.h,
                        w: fb.w,
                    };
                }
            }
            i += 1;
        }
        Ok((ops, flow))
    }

    fn apply_mask(&self, name: &str, w: &mut [f32]) -> Result<()> {
        if let Some(m) = self.masks.get(name) {
            if m.len() != w.len() {
                return Err(TrainError::config(
                    "mask",
                    name,
                    format!("has {} values, the weight {}", m.len(), w.len()),
                ));
            }
            w.iter_mut()
                .zip(m)
                .filter(|(_, b)| **b == 0)
                .for_each(|(v, _)| *v = 0.0);
        }
        Ok(())
    }

    /// Packs one layer (weights already masked and BN-folded) reading `flow`; returns the
    /// output flow.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &mut self,
        ops: &mut Vec<Op>,
        name: &str,
        shape: &[usize],
        w: Vec<f32>,
        bias: Vec<f32>,
        relu: bool,
        g: ConvGeometry,
        mut flow: Flow,
    ) -> Result<Flow> {
        let (cout, cin_full, kk) = (shape[0], shape[1], shape[2] * shape[3]);
        if cin_full != flow.full {
            return Err(TrainError::config(
                "model",
                name,
                format!(
                    "weight {shape:?} reads {cin_full} channels, the input has {}",
                    flow.full
                ),
            ));
        }
        let cols = cin_full * kk;
        let format = match self.path {
            Path::Dense => LayerFormat::Dense,
            Path::Packed => self
                .formats
                .get(name)
                .cloned()
                .unwrap_or(LayerFormat::Dense),
        };
        // The mask file decides what is kept (weights may be exactly zero under a one); a layer
        // without one is dense, or keeps its non-zero weights when given a sparse format.
        let mask = match self.masks.get(name) {
            Some(m) => Mask::from_bytes(cout, cols, m.clone())?,
            None if format == LayerFormat::Dense => Mask::ones(cout, cols),
            None => Mask::from_fn(cout, cols, |r, c| w[r * cols + c] != 0.0),
        };
        // Input channels the kernel reads.
        let shrink = !flow.all_live() && format.shrinks_input();
        if !flow.all_live() && !shrink {
            ops.push(materialize(&flow, flow.h * flow.w));
            flow.live = (0..flow.full as u32).collect();
        }
        let in_ch: Vec<u32> = flow.live.clone();
        let used_cols: Vec<u32> = in_ch
            .iter()
            .flat_map(|&c| (0..kk as u32).map(move |s| c * kk as u32 + s))
            .collect();
        let (ho, wo) = (g.out(flow.h), g.out(flow.w));
        // Exact contribution of removed input channels (constants), per output position.
        let corr = if shrink {
            let dead: Vec<(usize, f32)> = (0..cin_full)
                .filter(|c| in_ch.binary_search(&(*c as u32)).is_err())
                .map(|c| (c, flow.consts[c]))
                .filter(|&(_, v)| v != 0.0)
                .collect();
            (!dead.is_empty()).then(|| constant_map(&w, cout, cols, g, &dead, flow.h, flow.w))
        } else {
            None
        };
        let (sub_mask, sub_w) = if shrink {
            select_cols(&mask, &w, &used_cols)
        } else {
            (mask.clone(), w.clone())
        };
        // Group and CSR kernels read only the columns some kept weight uses: the others are
        // dropped from the matrix, and their im2col rows are never computed.
        let read: Option<Vec<u32>> = if matches!(format, LayerFormat::Group | LayerFormat::Csr) {
            let mut used = vec![false; sub_mask.cols()];
            for r in 0..cout {
                for (j, u) in used.iter_mut().enumerate() {
                    *u |= sub_mask.get(r, j);
                }
            }
            let kept: Vec<u32> = (0..used.len() as u32)
                .filter(|&j| used[j as usize])
                .collect();
            (kept.len() < used.len()).then_some(kept)
        } else {
            None
        };
        let (sub_mask, sub_w) = match &read {
            Some(cols_read) => select_cols(&sub_mask, &sub_w, cols_read),
            None => (sub_mask, sub_w),
        };
        let ncols = sub_mask.cols();
        let (packed, out_rows): (Packed, Option<Vec<u32>>) = match &format {
            LayerFormat::Dense => (Packed::Dense(Dense::new(cout, ncols, sub_w)?), None),
            LayerFormat::Csr => (Packed::Csr(Csr::pack(&sub_mask, &sub_w)?), None),
            LayerFormat::Group => (Packed::Group(GroupBlocks::pack(&sub_mask, &sub_w)?), None),
            LayerFormat::Channel => {
                let input = shrink.then_some((in_ch.as_slice(), kk));
                let f = ChannelCompact::pack(&mask, &w, input)?;
                let rows = f.kept_rows().to_vec();
                (Packed::Channel(f), Some(rows))
            }
            LayerFormat::ShuffledBlock { block } => (
                Packed::Shuffled(ShuffledBlocks::pack(&mask, &w, *block)?),
                None,
            ),
            LayerFormat::Bsr { height, width } => {
                (Packed::Bsr(Bsr::pack(&mask, &w, *height, *width)?), None)
            }
            LayerFormat::Nm { n, m, col_perm } => {
                let view = MatrixView::of(shape).ok_or_else(|| {
                    TrainError::config("layer", name, format!("shape {shape:?} is not a matrix"))
                })?;
                (
                    Packed::Nm(NmCompressed::pack(
                        &mask,
                        &w,
                        view,
                        *n,
                        *m,
                        col_perm.as_deref(),
                    )?),
                    None,
                )
            }
        };
        let stored = packed.stored();
        let mut plan = Plan::new(&packed)?;
        plan.set_threading(Threading::Serial);
        let rows_out = plan.out_dim();
        let (bias_out, corr_out) = match &out_rows {
            Some(rows) => {
                let hw = ho * wo;
                let b = rows.iter().map(|&r| bias[r as usize]).collect();
                let c = corr.map(|c| {
                    rows.iter()
                        .flat_map(|&r| c[r as usize * hw..(r as usize + 1) * hw].to_vec())
                        .collect()
                });
                (b, c)
            }
            None => (bias.clone(), corr),
        };
        let macs = ho
            * wo
            * match format {
                LayerFormat::Dense => rows_out * ncols,
                _ => sub_mask.nnz(),
            };
        self.infos.push(LayerInfo {
            name: name.to_string(),
            shape: shape.to_vec(),
            format: format.name().to_string(),
            matrix: [rows_out, plan.in_dim()],
            stored,
            macs_per_image: macs,
        });
        let act = |v: f32| if relu { v.max(0.0) } else { v };
        let out_flow = match out_rows {
            Some(rows) => Flow {
                full: cout,
                live: rows,
                consts: bias.iter().map(|&b| act(b)).collect(),
                h: ho,
                w: wo,
            },
            None => Flow {
                full: cout,
                live: (0..cout as u32).collect(),
                consts: vec![0.0; cout],
                h: ho,
                w: wo,
            },
        };
        ops.push(Op::Layer(Box::new(Layer {
            name: name.to_string(),
            plan,
            g,
            cin: in_ch.len(),
            cout: rows_out,
            h: flow.h,
            w: flow.w,
            ho,
            wo,
            bias: bias_out,
            corr: corr_out,
            relu,
            read,
        })));
        Ok(out_flow)
    }
}

/// The columns `keep` of a mask and of its row-major weights.
fn select_cols(mask: &Mask, w: &[f32], keep: &[u32]) -> (Mask, Vec<f32>) {
    let cols = mask.cols();
    let sub = Mask::from_fn(mask.rows(), keep.len(), |r, j| {
        mask.get(r, keep[j] as usize)
    });
    let values = (0..mask.rows())
        .flat_map(|r| keep.iter().map(move |&j| w[r * cols + j as usize]))
        .collect();
    (sub, values)
}

fn buffer(model: &Model, i: usize) -> Vec<f32> {
    model.buffers[i]
        .values
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// `[cout, ho·wo]`: Σ over removed channels c (constant v) of v · Σ of the kernel taps of row r
/// that land inside the image at each output position.
fn constant_map(
    w: &[f32],
    cout: usize,
    cols: usize,
    g: ConvGeometry,
    dead: &[(usize, f32)],
    h: usize,
    wd: usize,
) -> Vec<f32> {
    let (ho, wo, k) = (g.out(h), g.out(wd), g.k);
    let mut out = vec![0.0f32; cout * ho * wo];
    out.par_chunks_mut((ho * wo).max(1))
        .enumerate()
        .for_each(|(r, map)| {
            // Per tap, the weighted sum of the constants.
            let mut tap = vec![0.0f32; k * k];
            for &(c, v) in dead {
                for (t, s) in tap.iter_mut().enumerate() {
                    *s += v * w[r * cols + c * k * k + t];
                }
            }
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = 0.0f32;
                    for ky in 0..k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix >= 0 && ix < wd as isize {
                                s += tap[ky * k + kx];
                            }
                        }
                    }
                    map[oy * wo + ox] = s;
                }
            }
        });
    out
}

fn kernel_error(e: impl std::fmt::Display) -> TrainError {
    TrainError::config("inference", "kernel", e.to_string())
}

/// Runs `ops` on `x`; a borrowed input is copied only by an op that works in place (ReLU).
fn run_ops(ops: &[Op], x: Cow<'_, [f32]>, batch: usize, o: &InferOptions) -> Result<Vec<f32>> {
    let mut x = x;
    for op in ops {
        x = Cow::Owned(match op {
            Op::Layer(l) => l.forward(&x, batch, o)?,
            Op::Materialize {
                from,
                to,
                consts,
                hw,
            } => {
                let n = batch * hw;
                let mut out = vec![0.0f32; to.len() * n];
                out.par_chunks_mut(n.max(1))
                    .zip(to.par_iter())
                    .for_each(|(dst, c)| match from.binary_search(c) {
                        Ok(i) => dst.copy_from_slice(&x[i * n..(i + 1) * n]),
                        Err(_) => dst.fill(consts[*c as usize]),
                    });
                out
            }
            Op::Relu => {
                let mut v = x.into_owned();
                v.par_chunks_mut(4096)
                    .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
                v
            }
            Op::MaxPool2 { h, w } => {
                let (ho, wo) = (h / 2, w / 2);
                let planes = x.len() / (h * w).max(1);
                let mut y = vec![0.0f32; planes * ho * wo];
                y.par_chunks_mut((ho * wo).max(1))
                    .enumerate()
                    .for_each(|(p, out)| {
                        let src = &x[p * h * w..(p + 1) * h * w];
                        for oy in 0..ho {
                            let (r0, r1) = (&src[2 * oy * w..], &src[(2 * oy + 1) * w..]);
                            for ox in 0..wo {
                                out[oy * wo + ox] = r0[2 * ox]
                                    .max(r0[2 * ox + 1])
                                    .max(r1[2 * ox])
                                    .max(r1[2 * ox + 1]);
                            }
                        }
                    });
                y
            }
            Op::GlobalAvgPool { hw } => x
                .par_chunks(*hw.max(&1))
                .map(|p| p.iter().sum::<f32>() / *hw.max(&1) as f32)
                .collect(),
            Op::Flatten { hw } => {
                // [C, B, HW] → [C·HW, B].
                let c = x.len() / (batch * hw).max(1);
                let mut y = vec![0.0f32; x.len()];
                y.par_chunks_mut((batch * hw).max(1))
                    .enumerate()
                    .take(c)
                    .for_each(|(ch, out)| {
                        let src = &x[ch * batch * hw..(ch + 1) * batch * hw];
                        for b in 0..batch {
                            for s in 0..*hw {
                                out[s * batch + b] = src[b * hw + s];
                            }
                        }
                    });
                y
            }
            Op::Residual {
                body,
                shortcut,
                sources,
                hw,
            } => {
                let a = run_ops(body, Cow::Borrowed(&x), batch, o)?;
                let b = if shortcut.is_empty() {
                    x
                } else {
                    Cow::Owned(run_ops(shortcut, Cow::Borrowed(&x), batch, o)?)
                };
                let n = batch * hw;
                let mut out = vec![0.0f32; sources.len() * n];
                out.par_chunks_mut(n.max(1))
                    .zip(sources.par_iter())
                    .for_each(|(dst, (sa, sb))| match (*sa, *sb) {
                        (Source::Row(i), Source::Row(j)) => {
                            let (p, q) = (&a[i * n..(i + 1) * n], &b[j * n..(j + 1) * n]);
                            dst.iter_mut()
                                .zip(p.iter().zip(q))
                                .for_each(|(d, (u, v))| *d = u + v);
                        }
                        (Source::Row(i), Source::Const(c)) => {
                            dst.iter_mut()
                                .zip(&a[i * n..(i + 1) * n])
                                .for_each(|(d, u)| *d = u + c);
                        }
                        (Source::Const(c), Source::Row(j)) => {
                            dst.iter_mut()
                                .zip(&b[j * n..(j + 1) * n])
                                .for_each(|(d, v)| *d = v + c);
                        }
                        (Source::Const(c), Source::Const(e)) => dst.fill(c + e),
                    });
                out
            }
        });
    }
    Ok(x.into_owned())
}

thread_local! {
    /// Per-thread scratch of [`Layer::forward`]: the im2col chunk and the kernel's output.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `v` with at least `len` values (grown, never shrunk; contents unspecified).
fn at_least(mut v: Vec<f32>, len: usize) -> Vec<f32> {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

impl Layer {
    /// `[cin, B, h, w]` → `[cout, B, ho, wo]`.
    ///
    /// Images are cut into chunks, one task each: im2col of the chunk, the kernel, then bias,
    /// the removed-channel correction and ReLU fused into the copy of the chunk's columns into
    /// the output. Scratch buffers are per thread and reused across layers and calls.
    fn forward(&self, x: &[f32], batch: usize, o: &InferOptions) -> Result<Vec<f32>> {
        let d = ConvDims::new(&[self.cin, batch, self.h, self.w], self.g).map_err(kernel_error)?;
        let hw = self.ho * self.wo;
        let n = batch * hw;
        let kk = d.rows();
        let rows = self.cout;
        let len = rows * n;
        // Every value of `y` is written below (the chunks cover every column of every row)
        // before its length is set; nothing reads it before.
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let yp = Shared(y.as_mut_ptr());
        // im2col rows computed: all, or those the kernel reads.
        let kk = self.read.as_ref().map_or(kk, |r| r.len());
        let chunks = column_chunks(n, self.wo, kk, o);
        let direct = self.g.k == 1
            && self.g.stride == 1
            && self.g.pad == 0
            && chunks.len() == 1
            && self.read.is_none();
        chunks
            .into_par_iter()
            .try_for_each(|(c0, c1)| -> Result<()> {
                let (nc, out) = (c1 - c0, yp);
                // Taken out of the thread's slot, not borrowed across the kernel call: should
                // anything run another chunk on this thread meanwhile (a plan that is not
                // serial, under rayon's work stealing), that chunk allocates its own.
                let (col_buf, part_buf) = SCRATCH.take();
                let mut col_buf = if direct {
                    col_buf
                } else {
                    at_least(col_buf, kk * nc)
                };
                let mut part_buf = at_least(part_buf, rows * nc);
                let col: &[f32] = if direct {
                    x
                } else {
                    let c = &mut col_buf[..kk * nc];
                    match &self.read {
                        Some(rows) => d.im2col_rows(x, rows, c0, c1, c),
                        None => d.im2col_range(x, c0, c1, c),
                    }
                    c
                };
                let part = &mut part_buf[..rows * nc];
                self.plan
                    .forward(col, part, nc)
                    .map_err(|e| TrainError::config("inference", &self.name, e.to_string()))?;
                for (r, row) in part.chunks(nc.max(1)).enumerate() {
                    // SAFETY: chunks cover disjoint columns of `y`; `r·n + c1 ≤ len`, inside
                    // the capacity; the values are written, never read, before `set_len`.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.0.add(r * n + c0).cast::<std::mem::MaybeUninit<f32>>(),
                            nc,
                        )
                    };
                    self.epilogue(r, c0, row, dst);
                }
                SCRATCH.set((col_buf, part_buf));
                Ok(())
            })?;
        // SAFETY: every one of the `len` values was written above.
        unsafe { y.set_len(len) };
        Ok(y)
    }

    /// Output row `r`, columns `c0 ..` of the batch: kernel result `src` plus bias and the
    /// removed-channel correction, through ReLU when fused, into `dst`.
    fn epilogue(&self, r: usize, c0: usize, src: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
        let b = self.bias[r];
        let act = |v: f32| if self.relu { v.max(0.0) } else { v };
        match &self.corr {
            None if self.relu => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &v)| _ = d.write((v + b).max(0.0))),
            None => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &v)| _ = d.write(v + b)),
            Some(c) => {
                let hw = self.ho * self.wo;
                let map = &c[r * hw..(r + 1) * hw];
                let mut j = 0;
                while j < src.len() {
                    let at = (c0 + j) % hw;
                    let m = (hw - at).min(src.len() - j);
                    for ((d, &v), &k) in dst[j..j + m]
                        .iter_mut()
                        .zip(&src[j..j + m])
                        .zip(&map[at..at + m])
                    {
                        d.write(act(v + b + k));
                    }
                    j += m;
                }
            }
        }
    }
}

/// Column ranges `[c0, c1)` of an im2col matrix with `n` columns and `kk` rows, cut at whole
/// output rows (`wo` columns): about `chunk_floats` values each (so a chunk stays in the cache
/// between im2col and the kernel), at least `min_cols` columns, and at least two per thread.
fn column_chunks(n: usize, wo: usize, kk: usize, o: &InferOptions) -> Vec<(usize, usize)> {
    let wo = wo.max(1);
    let threads = rayon::current_num_threads().max(1);
    let want = (o.chunk_floats / kk.max(1)).max(o.min_cols);
    let most = n.div_ceil(2 * threads);
    let cols = (want.min(most).div_ceil(wo) * wo).max(wo);
    (0..n.div_ceil(cols))
        .map(|i| (i * cols, ((i + 1) * cols).min(n)))
        .collect()
}

/// Random structured masks of `format` at `density` (N:M is always N/M) on the layers `names`
/// of `model`, for speed measurements: channel (rows kept at random), group (blocks of 32 rows
/// on random column sets), shuffled blocks, BSR, N:M along input channels, CSR (Bernoulli).
pub fn random_masks(
    model: &Model,
    names: &[String],
    format: &LayerFormat,
    density: f64,
    seed: u64,
) -> Result<Masks> {
    use coarsen_kernels::bench::{random_packed, BenchFormat};
    use rand::{Rng, SeedableRng};
    let mut masks = Masks::new();
    for (i, name) in names.iter().enumerate() {
        let p = model
            .param(name)
            .ok_or_else(|| TrainError::config("layer", name, "no such weight"))?;
        let shape = p.shape();
        let rows = shape[0];
        let len: usize = shape.iter().product();
        let cols = len / rows.max(1);
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
        let m = match (bench, format) {
            (Some(b), _) => random_packed(b, rows, cols, density, s)?
                .mask()
                .into_bytes(),
            (None, LayerFormat::Nm { n, m, .. }) => {
                let view = MatrixView::of(&shape).ok_or_else(|| {
                    TrainError::config("layer", name, format!("shape {shape:?} is not a matrix"))
                })?;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
                random_nm_mask(&mut rng, view, *n, *m, None)
            }
            _ => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
                (0..len)
                    .map(|_| u8::from(rng.random_bool(density)))
                    .collect()
            }
        };
        masks.insert(name.clone(), m);
    }
    Ok(masks)
}

/// A random N:M mask of `view`: in every group of `m` input channels (after `perm`,
/// `perm[new] = old`; identity when `None`) at every kernel position, `n` channels drawn at
/// random.
fn random_nm_mask(
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
pub(crate) mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A model of `name` with random BatchNorm statistics (so removed channels are non-zero
    /// constants) and masks of `format` on every prunable layer.
    pub(crate) fn setup(name: &str, input: [usize; 3], width: f64, seed: u64) -> Model {
        let spec = ModelSpec {
            name: name.into(),
            width,
            input,
            classes: 10,
        };
        let model = Model::new(&spec, seed).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
        for p in &model.params {
            if p.kind == crate::model::ParamKind::Other {
                let v: Vec<f32> = p
                    .values()
                    .unwrap()
                    .iter()
                    .map(|_| rng.random_range(-0.5f32..1.0))
                    .collect();
                p.set_values(v).unwrap();
            }
        }
        for b in &model.buffers {
            let mut v = b.values.lock().unwrap();
            let var = b.name.ends_with("running_var");
            v.iter_mut().for_each(|x| {
                *x = if var {
                    rng.random_range(0.5f32..2.0)
                } else {
                    rng.random_range(-0.5f32..0.5)
                }
            });
        }
        model
    }

    fn random_masks(model: &Model, fmt: &LayerFormat, seed: u64) -> Masks {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut masks = Masks::new();
        for name in model.default_prunable() {
            let p = model.param(&name).unwrap();
            let shape = p.shape();
            let rows = shape[0];
            let len: usize = shape.iter().product();
            let cols = len / rows;
            let inner = if shape.len() == 4 {
                shape[2] * shape[3]
            } else {
                1
            };
            let cin = cols / inner;
            let m: Vec<u8> = match fmt {
                LayerFormat::Channel => {
                    let keep: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.5)).collect();
                    (0..len).map(|i| u8::from(keep[i / cols])).collect()
                }
                LayerFormat::Group => {
                    let row_part: Vec<usize> = (0..rows).map(|_| rng.random_range(0..3)).collect();
                    let part_cols: Vec<Vec<bool>> = (0..3)
                        .map(|_| (0..cols).map(|_| rng.random_bool(0.3)).collect())
                        .collect();
                    (0..len)
                        .map(|i| u8::from(part_cols[row_part[i / cols]][i % cols]))
                        .collect()
                }
                LayerFormat::ShuffledBlock { block } | LayerFormat::Bsr { height: block, .. } => {
                    let (bh, bw) = (*block, *block);
                    let on: Vec<bool> = (0..rows.div_ceil(bh) * cols.div_ceil(bw))
                        .map(|_| rng.random_bool(0.4))
                        .collect();
                    (0..len)
                        .map(|i| {
                            let (r, c) = (i / cols, i % cols);
                            u8::from(on[(r / bh) * cols.div_ceil(bw) + c / bw])
                        })
                        .collect()
                }
                LayerFormat::Nm { n, m, col_perm } => {
                    let perm = col_perm.as_deref().filter(|p| p.len() == cin);
                    random_nm_mask(&mut rng, MatrixView::of(&shape).unwrap(), *n, *m, perm)
                }
                LayerFormat::Csr => (0..len).map(|_| u8::from(rng.random_bool(0.08))).collect(),
                LayerFormat::Dense => (0..len).map(|_| u8::from(rng.random_bool(0.4))).collect(),
            };
            masks.insert(name, m);
        }
        masks
    }

    fn formats_for(
        model: &Model,
        masks: &Masks,
        fmt: &LayerFormat,
    ) -> BTreeMap<String, LayerFormat> {
        model
            .weights()
            .map(|p| {
                let f = if masks.contains_key(&p.name) {
                    match fmt {
                        LayerFormat::Nm { n, m, col_perm } => {
                            let cin = p.shape()[1];
                            LayerFormat::Nm {
                                n: *n,
                                m: *m,
                                col_perm: col_perm.as_ref().map(|_| {
                                    let mut r = ChaCha8Rng::seed_from_u64(cin as u64);
                                    let mut v: Vec<usize> = (0..cin).collect();
                                    for i in 0..cin {
                                        let j = r.random_range(i..cin);
                                        v.swap(i, j);
                                    }
                                    v
                                }),
                            }
                        }
                        f => f.clone(),
                    }
                } else {
                    LayerFormat::Dense
                };
                (p.name.clone(), f)
            })
            .collect()
    }

    fn reference(model: &Model, masks: &Masks, x: &[f32], batch: usize) -> Vec<f32> {
        crate::optim::apply_masks(model, masks).unwrap();
        let [c, h, w] = model.spec.input;
        let t = Tensor::from_vec(x.to_vec(), (c, batch, h, w), &Device::Cpu).unwrap();
        model
            .forward(&t, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Random masks of `fmt` on every prunable layer of `model` and every layer's format (N:M
    /// masks follow each layer's own permutation).
    pub(crate) fn masks_and_formats(
        model: &Model,
        fmt: &LayerFormat,
        seed: u64,
    ) -> (Masks, BTreeMap<String, LayerFormat>) {
        let base = random_masks(model, fmt, seed);
        let formats = formats_for(model, &base, fmt);
        let masks: Masks = if let LayerFormat::Nm { .. } = fmt {
            base.keys()
                .map(|n| {
                    let one = random_masks(model, &formats[n], seed);
                    (n.clone(), one[n].clone())
                })
                .collect()
        } else {
            base
        };
        (masks, formats)
    }

    fn check(name: &str, input: [usize; 3], width: f64, fmt: LayerFormat) {
        let model = setup(name, input, width, 7);
        let (masks, formats) = masks_and_formats(&model, &fmt, 3);
        let batch = 5;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x: Vec<f32> = (0..input.iter().product::<usize>() * batch)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let want = reference(&model, &masks, &x, batch);
        for path in [Path::Packed, Path::Dense] {
            let net = InferenceNet::with_formats(&model, &masks, &formats, path).unwrap();
            let got = net.forward(&x, batch).unwrap();
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-4 * scale,
                "{name} {fmt:?} {path:?}: max error {err} (scale {scale})"
            );
        }
    }

    pub(crate) const FORMATS: fn() -> Vec<LayerFormat> = || {
        vec![
            LayerFormat::Dense,
            LayerFormat::Csr,
            LayerFormat::Channel,
            LayerFormat::Group,
            LayerFormat::ShuffledBlock { block: 4 },
            LayerFormat::Bsr {
                height: 4,
                width: 4,
            },
            LayerFormat::Nm {
                n: 2,
                m: 4,
                col_perm: None,
            },
            LayerFormat::Nm {
                n: 1,
                m: 3,
                col_perm: Some(Vec::new()),
            },
        ]
    };

    #[test]
    fn packed_equals_masked_cnn() {
        for f in FORMATS() {
            check("cnn", [1, 12, 12], 0.5, f);
        }
    }

    #[test]
    fn packed_equals_masked_mlp() {
        for f in FORMATS() {
            check("mlp", [1, 6, 6], 0.2, f);
        }
    }

    #[test]
    fn packed_equals_masked_resnet() {
        for f in FORMATS() {
            check("resnet20", [3, 8, 8], 0.5, f);
        }
    }

    #[test]
    fn packed_equals_masked_vgg() {
        for f in FORMATS() {
            check("vgg11", [3, 8, 8], 0.125, f);
        }
    }

    #[test]
    fn channel_sparsity_shrinks_the_next_layer() {
        let model = setup("cnn", [1, 12, 12], 0.5, 7);
        let fmt = LayerFormat::Channel;
        let masks = random_masks(&model, &fmt, 3);
        let formats = formats_for(&model, &masks, &fmt);
        let net = InferenceNet::with_formats(&model, &masks, &formats, Path::Packed).unwrap();
        let dense = InferenceNet::with_formats(&model, &masks, &formats, Path::Dense).unwrap();
        let conv3 = |n: &InferenceNet| {
            n.layers()
                .iter()
                .find(|l| l.name == "conv3.weight")
                .unwrap()
                .matrix
        };
        let (p, d) = (conv3(&net), conv3(&dense));
        assert!(p[0] < d[0] && p[1] < d[1], "packed {p:?} vs dense {d:?}");
        assert!(net.macs_per_image() < dense.macs_per_image());
    }
}
