//! Compiling a [`Network`] into steps: fusion, BatchNorm folding, channel-flow tracking and the
//! packing of every layer.

use std::collections::{HashMap, HashSet};

use coarsen_core::{Mask, MatrixView};
use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::{
    BlockConv, Bsr, ChannelCompact, Csr, Dense, DirectConv, GroupBlocks, NmCompressed, NmConv,
    Packed, Plan, ShuffledBlocks, Threading, Winograd,
};
use rayon::prelude::*;

use super::run::{Kind, Layer, Source, Step, Unrolled, Wino};
use super::{LayerInfo, Path};
use crate::error::{InferError, Result};
use crate::format::{Formats, LayerFormat};
use crate::graph::{Node, Op, Pool, INPUT};
use crate::network::Network;

/// Fewest input channels of a layer that runs Winograd F(2×2, 3×3): with fewer (a network's
/// first layer, 3 channels) its transforms cost more than the products they save
/// (`examples/ab_wino` in coarsen-kernels times the shapes).
pub(super) const WINOGRAD_MIN_CHANNELS: usize = 8;

/// Activation flow of one value, known when compiling: which channels are computed (`live`,
/// ascending) and the constant value of every other channel.
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

    fn map_consts(&mut self, f: impl Fn(usize, f32) -> f32) {
        self.consts
            .iter_mut()
            .enumerate()
            .for_each(|(c, v)| *v = f(c, *v));
    }

    fn pos(&self, c: u32) -> Option<usize> {
        self.live.binary_search(&c).ok()
    }
}

/// The result of compiling.
pub(super) struct Compiled {
    pub(super) steps: Vec<Step>,
    pub(super) reads: Vec<usize>,
    pub(super) output: usize,
    pub(super) layers: Vec<LayerInfo>,
}

/// A conv or linear layer about to be packed: its weight folded and masked, in the full
/// (ungrouped) `[Cout, Cin, kh, kw]` shape.
struct Weighted {
    /// The conv or linear node.
    node: String,
    /// The last node fused into it (its output is the layer's).
    out: String,
    weight: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    mask: Option<Mask>,
    bias: Vec<f32>,
    relu: bool,
    geometry: ConvGeometry,
    grouped: bool,
}

pub(super) struct Compiler<'a> {
    net: &'a Network,
    formats: &'a Formats,
    path: Path,
    steps: Vec<Step>,
    flows: Vec<Flow>,
    slot_of: HashMap<String, usize>,
    layers: Vec<LayerInfo>,
    consumers: HashMap<&'a str, usize>,
    fused: HashSet<usize>,
    /// Make Winograd kernels for the layers that allow them.
    pub(super) winograd: bool,
    /// Fuse residual adds into the layers before them (see [`Compiler::fuse_add`]).
    pub(super) fuse_residual: bool,
    /// Block kernels multiply in bfloat16 where the CPU has AVX-512 BF16
    /// ([`InferOptions::bf16`](super::InferOptions::bf16)).
    pub(super) bf16: bool,
}

impl<'a> Compiler<'a> {
    pub(super) fn new(net: &'a Network, formats: &'a Formats, path: Path) -> Self {
        Compiler {
            net,
            formats,
            path,
            steps: Vec::new(),
            flows: Vec::new(),
            slot_of: HashMap::new(),
            layers: Vec::new(),
            consumers: net.graph().consumers(),
            fused: HashSet::new(),
            winograd: false,
            fuse_residual: true,
            bf16: false,
        }
    }

    pub(super) fn compile(mut self) -> Result<Compiled> {
        let [c, h, w] = self.net.input();
        self.flows.push(Flow::all(c, h, w));
        self.slot_of.insert(INPUT.to_string(), 0);
        let graph = self.net.graph();
        for (i, node) in graph.nodes.iter().enumerate() {
            if self.fused.contains(&i) {
                continue;
            }
            let ins = node
                .inputs
                .iter()
                .map(|n| {
                    self.slot_of.get(n).copied().ok_or_else(|| {
                        InferError::graph(
                            &node.name,
                            node.op.name(),
                            format!("reads unknown '{n}'"),
                        )
                    })
                })
                .collect::<Result<Vec<usize>>>()?;
            self.node(i, node, &ins)?;
        }
        let mut output = *self
            .slot_of
            .get(&graph.output)
            .ok_or_else(|| InferError::graph(&graph.output, "output", "no node of that name"))?;
        if !self.flows[output].all_live() {
            output = self.materialize(output);
        }
        let mut reads = vec![0usize; self.flows.len()];
        for s in &self.steps {
            for &i in &s.inputs {
                reads[i] += 1;
            }
        }
        reads[output] += 1;
        Ok(Compiled {
            steps: self.steps,
            reads,
            output,
            layers: self.layers,
        })
    }

    /// A new slot holding the output of `step`, whose flow is `flow`.
    fn push(&mut self, inputs: Vec<usize>, kind: Kind, flow: Flow) -> usize {
        let output = self.flows.len();
        self.flows.push(flow);
        self.steps.push(Step {
            inputs,
            output,
            also: None,
            kind,
        });
        output
    }

    /// Rebuilds every channel of `slot` (removed ones from their constants); the new slot.
    fn materialize(&mut self, slot: usize) -> usize {
        let f = self.flows[slot].clone();
        let kind = Kind::Materialize {
            from: f.live.clone(),
            to: (0..f.full as u32).collect(),
            consts: f.consts.clone(),
            hw: f.h * f.w,
        };
        self.push(vec![slot], kind, Flow::all(f.full, f.h, f.w))
    }

    /// The node that alone reads `value`, unless `value` is the graph's output.
    fn sole_reader(&self, value: &str) -> Option<usize> {
        self.net.graph().sole_reader(value, &self.consumers)
    }

    fn node(&mut self, i: usize, node: &Node, ins: &[usize]) -> Result<()> {
        let slot = ins[0];
        let flow = self.flows[slot].clone();
        let out = match &node.op {
            Op::Conv(cv) => {
                let lw =
                    self.weighted(i, &cv.weight, cv.bias.as_deref(), cv.geometry(), cv.groups)?;
                return self.layer(lw, slot);
            }
            Op::Linear(l) => {
                let g = ConvGeometry::square(1, 1, 0);
                let lw = self.weighted(i, &l.weight, l.bias.as_deref(), g, 1)?;
                return self.layer(lw, slot);
            }
            Op::BatchNorm(b) => {
                let (scale, shift) = self.net.batch_norm_affine(b)?;
                let mut f = flow.clone();
                f.map_consts(|c, v| v * scale[c] + shift[c]);
                let kind = Kind::Affine {
                    scale: flow.live.iter().map(|&c| scale[c as usize]).collect(),
                    shift: flow.live.iter().map(|&c| shift[c as usize]).collect(),
                    hw: flow.h * flow.w,
                };
                self.push(vec![slot], kind, f)
            }
            Op::Relu => {
                let mut f = flow;
                f.map_consts(|_, v| v.max(0.0));
                self.push(vec![slot], Kind::Relu, f)
            }
            Op::MaxPool(p) => self.pool(node, slot, flow, p, None)?,
            Op::AvgPool(a) => self.pool(node, slot, flow, &a.window, Some(a.count_include_pad))?,
            Op::GlobalAvgPool => {
                let kind = Kind::GlobalAvgPool {
                    hw: flow.h * flow.w,
                };
                self.push(vec![slot], kind, Flow { h: 1, w: 1, ..flow })
            }
            Op::Flatten => {
                let hw = flow.h * flow.w;
                if hw == 1 {
                    // Nothing moves: the flattened value is the same buffer.
                    slot
                } else {
                    let h = hw as u32;
                    let live = flow
                        .live
                        .iter()
                        .flat_map(|&c| (0..h).map(move |s| c * h + s))
                        .collect();
                    let consts = flow
                        .consts
                        .iter()
                        .flat_map(|&v| std::iter::repeat_n(v, hw))
                        .collect();
                    let f = Flow {
                        full: flow.full * hw,
                        live,
                        consts,
                        h: 1,
                        w: 1,
                    };
                    self.push(vec![slot], Kind::Flatten { hw }, f)
                }
            }
            Op::Add => {
                if let Some(out) = self.fuse_add(i, node, ins) {
                    self.slot_of.insert(node.name.clone(), out);
                    return Ok(());
                }
                let (fa, fb) = (flow, self.flows[ins[1]].clone());
                let mut live = Vec::new();
                let mut consts = vec![0.0f32; fa.full];
                let mut sources = Vec::new();
                for c in 0..fa.full as u32 {
                    let (a, b) = (fa.pos(c), fb.pos(c));
                    if a.is_none() && b.is_none() {
                        consts[c as usize] = fa.consts[c as usize] + fb.consts[c as usize];
                        continue;
                    }
                    let src = |p: Option<usize>, f: &Flow| match p {
                        Some(r) => Source::Row(r),
                        None => Source::Const(f.consts[c as usize]),
                    };
                    sources.push((src(a, &fa), src(b, &fb)));
                    live.push(c);
                }
                let f = Flow {
                    full: fa.full,
                    live,
                    consts,
                    h: fa.h,
                    w: fa.w,
                };
                let hw = fa.h * fa.w;
                self.push(ins.to_vec(), Kind::Add { sources, hw }, f)
            }
        };
        self.slot_of.insert(node.name.clone(), out);
        Ok(())
    }

    /// Fuses the `Add` node `i` (reading slots `ins`) into the conv or linear layer that
    /// computes its later operand, when the add alone reads that layer's output, both operands
    /// have every channel computed and the same shape, and the layer has no ReLU of its own:
    /// the layer then reads the other operand as a residual and adds it in its epilogue (and a
    /// ReLU that alone reads the sum goes into the epilogue too). The fused layer's slot, or
    /// `None` where the add runs as a step of its own.
    fn fuse_add(&mut self, i: usize, node: &Node, ins: &[usize]) -> Option<usize> {
        let [a, b] = ins else { return None };
        if !self.fuse_residual {
            return None;
        }
        let producer = |s: usize| self.steps.iter().rposition(|st| st.output == s);
        let (pa, pb) = (producer(*a), producer(*b));
        // The operand computed last; the other one (or the network's input) exists before it.
        let (k, step, other) = match (pa, pb) {
            (Some(x), Some(y)) if x > y => (0, x, *b),
            (Some(x), None) => (0, x, *b),
            (_, Some(y)) => (1, y, *a),
            _ => return None,
        };
        if a == b || self.sole_reader(&node.inputs[k]) != Some(i) {
            return None;
        }
        let (fl, fo) = (&self.flows[self.steps[step].output], &self.flows[other]);
        if !fl.all_live() || !fo.all_live() || (fl.full, fl.h, fl.w) != (fo.full, fo.h, fo.w) {
            return None;
        }
        let Kind::Layer(layer) = &mut self.steps[step].kind else {
            return None;
        };
        if layer.relu || layer.residual || layer.cout != fl.full {
            return None;
        }
        let graph = self.net.graph();
        let relu = graph
            .sole_reader(&node.name, &self.consumers)
            .filter(|&j| graph.nodes[j].op == Op::Relu);
        // The dense twin (which tuning may swap in) computes the same function.
        layer.residual = true;
        layer.relu = relu.is_some();
        if let Some(t) = layer.dense_twin.as_deref_mut() {
            t.residual = true;
            t.relu = relu.is_some();
        }
        if let Some(j) = relu {
            self.fused.insert(j);
            let out = self.steps[step].output;
            self.slot_of.insert(graph.nodes[j].name.clone(), out);
        }
        self.steps[step].inputs.push(other);
        Some(self.steps[step].output)
    }

    /// Max pooling (`avg` is `None`) or average pooling (`avg` = whether the padding counts)
    /// of `slot`; the new slot.
    fn pool(
        &mut self,
        node: &Node,
        slot: usize,
        flow: Flow,
        p: &Pool,
        avg: Option<bool>,
    ) -> Result<usize> {
        let g = p.geometry();
        let (ho, wo) = output_hw(node, g, flow.h, flow.w)?;
        // Counting the padding makes a removed channel's average vary at the borders: such a
        // channel is rebuilt first.
        let (slot, flow) = if avg == Some(true) && g.padding != [0; 4] && !flow.all_live() {
            let s = self.materialize(slot);
            (s, self.flows[s].clone())
        } else {
            (slot, flow)
        };
        let kind = Kind::Pool {
            g,
            avg,
            h: flow.h,
            w: flow.w,
            ho,
            wo,
        };
        let f = Flow {
            h: ho,
            w: wo,
            ..flow
        };
        Ok(self.push(vec![slot], kind, f))
    }

    /// The layer of node `i` (weight `weight`), with a BatchNorm that alone reads it folded in
    /// and a ReLU that alone reads the result fused; grouped weights expanded to the full
    /// block-diagonal matrix.
    fn weighted(
        &mut self,
        i: usize,
        weight: &str,
        bias: Option<&str>,
        geometry: ConvGeometry,
        groups: usize,
    ) -> Result<Weighted> {
        let graph = self.net.graph();
        let t = self.net.tensors();
        let shape = t.require(weight)?.shape().to_vec();
        let rows = shape[0];
        let mut values = self.net.masked_values(weight)?;
        let mut bias = match bias {
            Some(b) => t.require(b)?.values().to_vec(),
            None => vec![0.0; rows],
        };
        let mut out = graph.nodes[i].name.clone();
        if let Some(j) = self.sole_reader(&out) {
            if let Op::BatchNorm(b) = &graph.nodes[j].op {
                self.net.fold_batch_norm(b, &mut values, &mut bias)?;
                self.fused.insert(j);
                out = graph.nodes[j].name.clone();
            }
        }
        let mut relu = false;
        if let Some(j) = self.sole_reader(&out) {
            if graph.nodes[j].op == Op::Relu {
                relu = true;
                self.fused.insert(j);
                out = graph.nodes[j].name.clone();
            }
        }
        let mask = self.net.masks().get(weight).map(|m| m.mask().clone());
        let (shape, values, mask) = if groups > 1 {
            expand_groups(&shape, groups, values, mask)
        } else {
            (shape, values, mask)
        };
        Ok(Weighted {
            node: graph.nodes[i].name.clone(),
            out,
            weight: weight.to_string(),
            shape,
            values,
            mask,
            bias,
            relu,
            geometry,
            grouped: groups > 1,
        })
    }

    /// The kernels that read a dense stride-1 "same" convolution's input in place: the implicit
    /// GEMM, and Winograd (F(2×2, 3×3), and F(4×4, 3×3) where it pays) when it was asked
    /// for, the CPU runs its fused kernel and the layer is a 3×3 padding-1 convolution of even
    /// `h × w` inputs and at least [`WINOGRAD_MIN_CHANNELS`] input channels (`rows ×
    /// cin·kh·kw` weight `values`).
    ///
    /// `sparse`: the values are a sparse layer's (its dense twin's), whose Winograd kernels
    /// multiply only the input channels of each class of rows where that pays
    /// ([`Winograd::sparse_with_tile`]).
    fn in_place_kernels(
        &self,
        g: ConvGeometry,
        rows: usize,
        cin: usize,
        values: &[f32],
        (h, w): (usize, usize),
        sparse: bool,
    ) -> std::result::Result<(Option<DirectConv>, Option<Wino>), coarsen_kernels::KernelError> {
        let winograd = |tile| {
            if sparse {
                Winograd::sparse_with_tile(g, rows, cin, values, tile)
            } else {
                Winograd::with_tile(g, rows, cin, values, tile)
            }
        };
        let wino = if self.winograd
            && h.is_multiple_of(2)
            && w.is_multiple_of(2)
            && cin >= WINOGRAD_MIN_CHANNELS
        {
            winograd(2)?.filter(Winograd::is_fused)
        } else {
            None
        };
        let wino = match wino {
            Some(f2) => {
                // F(4×4) where it measured faster than F(2×2) in the network
                // (`examples/ab_options`; `examples/ab_wino` times one layer):
                // - sizes that are multiples of 4, or whose tiles reach past the image by at
                //   most a third of its area (the demo CNN's 14×14 conv3: 16 tiles of 36
                //   products against 49 of 16), where the kernel takes such sizes;
                // - at least 32 output channels where F(2×2) loads rows of 16 tiles
                //   contiguously (with 16, ResNet-20's first stage on 32×32, its gathers and
                //   transforms cost what its products save; with 32, its second stage ran
                //   faster on F(4×4), alternated binaries), at least 16 where F(2×2) gathers
                //   its patches (the refilled demo CNN's conv2, 16→28 on 28×28, ran faster
                //   on F(4×4): `ab_wino 64 7 16,28,28`);
                // - a transformed weight of at most 36·512² values (38 MB): ResNet-18's and
                //   VGG-16's 512-channel layers on 4×4 images at batch 64 ran faster on F(4×4)
                //   (`examples/ab_options`, alternated binaries); larger layers would hold
                //   hundreds of MB each.
                let padded = h.next_multiple_of(4) * w.next_multiple_of(4);
                let f2_gathers = !(w / 2).is_multiple_of(16);
                let f4 = if 3 * padded <= 4 * h * w
                    && (rows >= 32 || (rows >= 16 && f2_gathers))
                    && rows * cin <= 512 * 512
                {
                    let dims = ConvDims::new(&[cin, 1, h, w], g)?;
                    winograd(4)?.filter(|k| k.tile() == 4 && k.accepts(&dims))
                } else {
                    None
                };
                Some(Wino { f2, f4 })
            }
            None => None,
        };
        Ok((DirectConv::new(g, rows, cin, values)?, wino))
    }

    /// Packs one layer reading `slot` and records its output under the names of the nodes it
    /// stands for.
    fn layer(&mut self, lw: Weighted, slot: usize) -> Result<()> {
        let Weighted {
            node: names,
            out: out_name,
            weight,
            shape,
            values: w,
            mask,
            bias,
            relu,
            geometry: g,
            grouped,
        } = lw;
        let (cout, cin_full) = (shape[0], shape[1]);
        let kk: usize = shape[2..].iter().product();
        let mut flow = self.flows[slot].clone();
        let mut slot = slot;
        if cin_full != flow.full {
            return Err(InferError::graph(
                &names,
                "layer",
                format!(
                    "weight {shape:?} reads {cin_full} channels, the input has {}",
                    flow.full
                ),
            ));
        }
        let cols = cin_full * kk;
        let mut format = match self.path {
            Path::Dense => LayerFormat::Dense,
            Path::Packed => self
                .formats
                .get(&weight)
                .cloned()
                .unwrap_or(LayerFormat::Dense),
        };
        if grouped
            && self.path == Path::Packed
            && matches!(format, LayerFormat::Dense | LayerFormat::Channel)
        {
            // A block-diagonal matrix: one dense block per group.
            format = LayerFormat::Group;
        }
        // The mask decides what is kept (weights may be exactly zero under a one); a layer
        // without one is dense, or keeps its non-zero weights when given a sparse format.
        let mask = match mask {
            Some(m) => m,
            None if format == LayerFormat::Dense => Mask::ones(cout, cols),
            None => Mask::from_fn(cout, cols, |r, c| w[r * cols + c] != 0.0),
        };
        // Input channels the kernel reads.
        let shrink = !flow.all_live() && format.shrinks_input();
        if !flow.all_live() && !shrink {
            slot = self.materialize(slot);
            flow = self.flows[slot].clone();
        }
        let in_ch: Vec<u32> = flow.live.clone();
        let used_cols: Vec<u32> = in_ch
            .iter()
            .flat_map(|&c| (0..kk as u32).map(move |s| c * kk as u32 + s))
            .collect();
        let (ho, wo) = g.output(flow.h, flow.w).ok_or_else(|| {
            InferError::graph(
                &names,
                "layer",
                format!("the kernel does not fit a {}x{} input", flow.h, flow.w),
            )
        })?;
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
        // The matrix over every im2col row, kept for the dense twin of a layer that reads a
        // subset of them (see below).
        let all_rows_w = read.as_ref().map(|_| sub_w.clone());
        // Dense blocks (group, shuffled) of a convolution on images of at most
        // [`UNROLL_POSITIONS`] positions (VGG-16's last block on CIFAR, 2×2) also run as the
        // linear map they are there, whose blocks hold only the taps that meet the image.
        let unroll_src = (matches!(
            format,
            LayerFormat::Group | LayerFormat::ShuffledBlock { .. }
        ) && corr.is_none()
            && kk > 1
            && ho * wo <= UNROLL_POSITIONS
            && flow.h * flow.w <= UNROLL_POSITIONS
            && (cout * ho * wo)
                .checked_mul(in_ch.len() * flow.h * flow.w)
                .is_some_and(|v| v <= UNROLL_MAX_ENTRIES))
        .then(|| {
            unroll(
                &sub_mask,
                &sub_w,
                g,
                in_ch.len(),
                (flow.h, flow.w),
                (ho, wo),
            )
        });
        let (sub_mask, sub_w) = match &read {
            Some(cols_read) => select_cols(&sub_mask, &sub_w, cols_read),
            None => (sub_mask, sub_w),
        };
        let ncols = sub_mask.cols();
        let kerr = |e| InferError::kernel(&weight, e);
        // A sparse layer also gets a dense twin (the same masked matrix on the dense kernels),
        // so that tuning can run whichever is faster at the batch size it is used at.
        let twin_values = (self.path == Path::Packed
            && !matches!(format, LayerFormat::Dense | LayerFormat::Channel))
        .then(|| sub_w.clone());
        let (packed, out_rows): (Packed, Option<Vec<u32>>) = match &format {
            LayerFormat::Dense => (
                Packed::Dense(Dense::new(cout, ncols, sub_w).map_err(kerr)?),
                None,
            ),
            LayerFormat::Csr => (
                Packed::Csr(Csr::pack(&sub_mask, &sub_w).map_err(kerr)?),
                None,
            ),
            LayerFormat::Group => (
                Packed::Group(GroupBlocks::pack(&sub_mask, &sub_w).map_err(kerr)?),
                None,
            ),
            LayerFormat::Channel => {
                let input = shrink.then_some((in_ch.as_slice(), kk));
                let f = ChannelCompact::pack(&mask, &w, input).map_err(kerr)?;
                let rows = f.kept_rows().to_vec();
                (Packed::Channel(f), Some(rows))
            }
            LayerFormat::ShuffledBlock { block } => (
                Packed::Shuffled(ShuffledBlocks::pack(&mask, &w, *block).map_err(kerr)?),
                None,
            ),
            LayerFormat::Bsr { height, width } => (
                Packed::Bsr(Bsr::pack(&mask, &w, *height, *width).map_err(kerr)?),
                None,
            ),
            LayerFormat::Nm { n, m, col_perm } => {
                let view = MatrixView::of(&shape)
                    .ok_or_else(|| InferError::tensor(&weight, &shape, "is not a matrix"))?;
                let p = NmCompressed::pack(&mask, &w, view, *n, *m, col_perm.as_deref())
                    .map_err(kerr)?;
                (Packed::Nm(p), None)
            }
        };
        let stored = packed.stored();
        // Stride-1 "same" convolutions on a dense matrix run as implicit GEMMs (no im2col)
        // where the CPU has the instructions for it.
        // Convolutions whose output is as large as the input, or half of it at stride 2 (the
        // implicit GEMM reads the latter's input as its four phases), run on in-place kernels.
        let same = ho == flow.h && wo == flow.w;
        let halved = g.stride == [2, 2] && flow.h == 2 * ho && flow.w == 2 * wo;
        let spatial = (same || halved) && ho * wo > 1 && read.is_none();
        let dense_values = match &packed {
            Packed::Dense(d) if spatial => Some((d.rows(), d.values())),
            Packed::Channel(f) if spatial && f.in_dim() == in_ch.len() * kk => {
                Some((f.kept_rows().len(), f.values()))
            }
            _ => None,
        };
        let (direct, wino) = match dense_values {
            Some((rows, v)) => self
                .in_place_kernels(g, rows, in_ch.len(), v, (flow.h, flow.w), false)
                .map_err(kerr)?,
            None => (None, None),
        };
        // Dense blocks (group, shuffled, BSR) of such convolutions run as implicit GEMMs per
        // block, and those of every other convolution on few columns from im2col tiles; they
        // may read a subset of the im2col rows. Linear layers (one output position) keep the
        // plan, which sums in the dense kernels' order.
        let mut blocks = if ho * wo > 1 && corr.is_none() {
            BlockConv::new(g, in_ch.len(), &packed, read.as_deref()).map_err(kerr)?
        } else {
            None
        };
        if let Some(k) = blocks.as_mut() {
            k.set_bf16(self.bf16);
        }
        // In bfloat16, a dense convolution that runs as an implicit GEMM (the first layer of
        // a CIFAR network: 3 input channels, no Winograd) also runs as one dense block of the
        // bfloat16 kernel, with a dense twin in f32 for tuning to choose.
        let dense_bf16 = match &packed {
            Packed::Dense(d)
                if self.bf16
                    && self.path == Path::Packed
                    && blocks.is_none()
                    && direct.is_some()
                    && wino.is_none()
                    && corr.is_none() =>
            {
                let one = Packed::Group(
                    GroupBlocks::pack(&Mask::ones(d.rows(), ncols), d.values()).map_err(kerr)?,
                );
                let k = in_bf16(BlockConv::new(g, in_ch.len(), &one, None).map_err(kerr)?);
                k.map(|k| {
                    blocks = Some(k);
                    d.values().to_vec()
                })
            }
            _ => None,
        };
        let unrolled = match unroll_src {
            Some((big_mask, big_w)) => {
                let packed = match &format {
                    LayerFormat::ShuffledBlock { block } => Packed::Shuffled(
                        ShuffledBlocks::pack(&big_mask, &big_w, *block).map_err(kerr)?,
                    ),
                    _ => Packed::Group(GroupBlocks::pack(&big_mask, &big_w).map_err(kerr)?),
                };
                let mut plan = Plan::new(&packed).map_err(kerr)?;
                plan.set_threading(Threading::Serial);
                // In bfloat16, the map's blocks also as a 1×1 convolution over the images
                // (the block kernel has a bfloat16 variant, the plan's kernels have not).
                let bf16 = match self.bf16 {
                    true => {
                        let g1 = ConvGeometry::square(1, 1, 0);
                        let k = BlockConv::new(g1, plan.in_dim(), &packed, None).map_err(kerr)?;
                        in_bf16(k.filter(|k| k.in_place() && k.out_dim() == plan.out_dim()))
                    }
                    false => None,
                };
                Some(Box::new(Unrolled { plan, bf16 }))
            }
            None => None,
        };
        // N:M layers also get their own kernel for few columns.
        let nm = match &packed {
            Packed::Nm(f) if f.view().in_channels == in_ch.len() => NmConv::new(f).map_err(kerr)?,
            _ => None,
        };
        let mut plan = Plan::new(&packed).map_err(kerr)?;
        plan.set_threading(Threading::Serial);
        let rows_out = plan.out_dim();
        let hw = ho * wo;
        let (bias_out, corr_out) = match &out_rows {
            Some(rows) => {
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
        let macs = hw
            * match format {
                LayerFormat::Dense => rows_out * ncols,
                _ => sub_mask.nnz(),
            };
        // The weight's own shape (grouped and linear weights included).
        let shape_info = self.net.tensors().require(&weight)?.shape().to_vec();
        self.layers.push(LayerInfo {
            name: weight.clone(),
            shape: shape_info,
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
            None => Flow::all(cout, ho, wo),
        };
        let mut layer = Layer {
            name: weight.clone(),
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
            residual: false,
            read,
            direct,
            wino,
            blocks,
            nm,
            unrolled,
            dense_twin: None,
            fused: None,
        };
        if let Some(v) = twin_values.or(dense_bf16) {
            // A layer that reads a subset of the im2col rows gets a twin over all of them
            // (zero columns for the others) where the in-place kernels run its geometry: they
            // read every row, and Winograd was what the twin of such a layer lacked.
            let twin_spatial = (same || halved) && ho * wo > 1;
            let (v, cols, twin_read) = match all_rows_w {
                Some(all) if twin_spatial => (all, in_ch.len() * kk, None),
                _ => (v, ncols, layer.read.clone()),
            };
            let (direct, wino) = if twin_spatial && twin_read.is_none() {
                self.in_place_kernels(g, cout, in_ch.len(), &v, (flow.h, flow.w), true)
                    .map_err(kerr)?
            } else {
                (None, None)
            };
            let mut plan = Plan::new(&Packed::Dense(Dense::new(cout, cols, v).map_err(kerr)?))
                .map_err(kerr)?;
            plan.set_threading(Threading::Serial);
            layer.dense_twin = Some(Box::new(layer.twin(plan, direct, wino, twin_read)));
        }
        let out = self.push(vec![slot], Kind::Layer(Box::new(layer)), out_flow);
        self.slot_of.insert(names, out);
        self.slot_of.insert(out_name, out);
        Ok(())
    }
}

/// A block kernel made for bfloat16 alone: `k` multiplying in bfloat16, or none where the
/// CPU has no AVX-512 BF16.
fn in_bf16(k: Option<BlockConv>) -> Option<BlockConv> {
    k.and_then(|mut k| k.set_bf16(true).then_some(k))
}

/// Output size of a pooling node.
fn output_hw(node: &Node, g: ConvGeometry, h: usize, w: usize) -> Result<(usize, usize)> {
    g.output(h, w).ok_or_else(|| {
        InferError::graph(
            &node.name,
            node.op.name(),
            format!("the window does not fit a {h}x{w} input"),
        )
    })
}

/// A grouped weight `[Cout, Cin/G, kh, kw]` (and its mask) as the block-diagonal full weight
/// `[Cout, Cin, kh, kw]`: output channel `o` of group `o / (Cout/G)` reads input channels
/// `g·Cin/G ..`; every other entry is a zero outside the mask.
fn expand_groups(
    shape: &[usize],
    groups: usize,
    values: Vec<f32>,
    mask: Option<Mask>,
) -> (Vec<usize>, Vec<f32>, Option<Mask>) {
    let (cout, cin_g) = (shape[0], shape[1]);
    let kk: usize = shape[2..].iter().product();
    let cin = cin_g * groups;
    let (per_out, cols_g, cols) = (cout / groups, cin_g * kk, cin * kk);
    let mut full = vec![0.0f32; cout * cols];
    let mut keep = Mask::zeros(cout, cols);
    for o in 0..cout {
        let g = o / per_out.max(1);
        for j in 0..cols_g {
            let on = mask.as_ref().is_none_or(|m| m.get(o, j));
            full[o * cols + g * cols_g + j] = values[o * cols_g + j];
            keep.set(o, g * cols_g + j, on);
        }
    }
    let mut s = shape.to_vec();
    s[1] = cin;
    (s, full, Some(keep))
}

/// Output and input positions up to which a convolution in dense blocks also runs unrolled.
const UNROLL_POSITIONS: usize = 4;

/// Entries of the unrolled map up to which it is built (its dense values are made before
/// packing: 64 MiB at most; VGG-16's 512-channel 2×2 layers have 4 Mi).
const UNROLL_MAX_ENTRIES: usize = 1 << 24;

/// The convolution of `mask`/`w` (`cout × cin·taps`, geometry `g`) on `h × w` images as the
/// linear map from an image's input (`[cin, h·w]`, row `ci·h·w + p`) to its output
/// (`[cout, ho·wo]`, row `co·ho·wo + q`): entry `(co·ho·wo + q, ci·h·w + p)` holds the weight
/// of the tap that takes output position `q` to input position `p` (none where no tap does:
/// the taps that fall in the padding are gone).
fn unroll(
    mask: &Mask,
    w: &[f32],
    g: ConvGeometry,
    cin: usize,
    (h, wi): (usize, usize),
    (ho, wo): (usize, usize),
) -> (Mask, Vec<f32>) {
    let [kh, kw] = g.kernel;
    let taps = kh * kw;
    let (hw, ohw) = (h * wi, ho * wo);
    let (rows, cols) = (mask.rows() * ohw, cin * hw);
    // Per output position, the (tap, input position) pairs inside the image.
    let pairs: Vec<Vec<(usize, usize)>> = (0..ohw)
        .map(|q| {
            let (oy, ox) = (q / wo, q % wo);
            (0..taps)
                .filter_map(|s| {
                    let (ky, kx) = (s / kw, s % kw);
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]).checked_sub(g.padding[0])?;
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]).checked_sub(g.padding[1])?;
                    (iy < h && ix < wi).then_some((s, iy * wi + ix))
                })
                .collect()
        })
        .collect();
    let mut big = Mask::zeros(rows, cols);
    let mut values = vec![0.0f32; rows * cols];
    for co in 0..mask.rows() {
        for (q, pq) in pairs.iter().enumerate() {
            let r = co * ohw + q;
            for ci in 0..cin {
                for &(s, p) in pq {
                    let c = ci * taps + s;
                    if mask.get(co, c) {
                        let col = ci * hw + p;
                        big.set(r, col, true);
                        values[r * cols + col] += w[co * mask.cols() + c];
                    }
                }
            }
        }
    }
    (big, values)
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
    let (ho, wo) = g.output(h, wd).unwrap_or((0, 0));
    let [kh, kw] = g.kernel;
    let kk = kh * kw;
    let mut out = vec![0.0f32; cout * ho * wo];
    out.par_chunks_mut((ho * wo).max(1))
        .enumerate()
        .for_each(|(r, map)| {
            // Per tap, the weighted sum of the constants.
            let mut tap = vec![0.0f32; kk];
            for &(c, v) in dead {
                for (t, s) in tap.iter_mut().enumerate() {
                    *s += v * w[r * cols + c * kk + t];
                }
            }
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = 0.0f32;
                    for ky in 0..kh {
                        let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                            - g.padding[0] as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                - g.padding[1] as isize;
                            if ix >= 0 && ix < wd as isize {
                                s += tap[ky * kw + kx];
                            }
                        }
                    }
                    map[oy * wo + ox] = s;
                }
            }
        });
    out
}
