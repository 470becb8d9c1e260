//! Running compiled steps: every value is a channel-major batch `[C, B, H, W]` (or `[F, B]`).

use std::borrow::Cow;
use std::mem::MaybeUninit;

use coarsen_kernels::conv::{ConvDims, ConvGeometry};
use coarsen_kernels::team;
use coarsen_kernels::{
    BlockConv, DenseKernel, DirectConv, Epilogue, NmConv, Plan, Residual, Winograd,
};
use rayon::prelude::*;

use super::{InferOptions, InferenceNet};
use crate::error::{InferError, Result};

/// One step: reads slots, writes a new one.
#[derive(Debug)]
pub(super) struct Step {
    pub(super) inputs: Vec<usize>,
    pub(super) output: usize,
    /// A second output: the slot of the 1×1 layer fused into this step's layer
    /// ([`Layer::fused`]).
    pub(super) also: Option<usize>,
    pub(super) kind: Kind,
}

/// Where a channel of a sum comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Source {
    /// Row of the input value.
    Row(usize),
    /// A constant (a removed channel).
    Const(f32),
}

#[derive(Debug)]
pub(super) enum Kind {
    Layer(Box<Layer>),
    /// Rebuilds `to` channels (ascending, a superset of `from`), removed ones from constants.
    Materialize {
        from: Vec<u32>,
        to: Vec<u32>,
        consts: Vec<f32>,
        hw: usize,
    },
    /// `x·scale[c] + shift[c]` per (live) channel row.
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
        hw: usize,
    },
    Relu,
    /// Max pooling (`avg` is `None`) or average pooling (`avg` = whether the padding counts).
    Pool {
        g: ConvGeometry,
        avg: Option<bool>,
        h: usize,
        w: usize,
        ho: usize,
        wo: usize,
    },
    GlobalAvgPool {
        hw: usize,
    },
    /// `[C, B, HW]` → `[C·HW, B]`.
    Flatten {
        hw: usize,
    },
    /// Output channels (the union of both inputs' live ones), each a sum of two sources.
    Add {
        sources: Vec<(Source, Source)>,
        hw: usize,
    },
}

impl Kind {
    /// The operation in words, for profiles.
    pub(super) fn op_name(&self) -> &'static str {
        match self {
            Kind::Layer(_) => "layer",
            Kind::Materialize { .. } => "restore removed channels",
            Kind::Affine { .. } => "affine (unfolded batch norm)",
            Kind::Relu => "relu",
            Kind::Pool { avg: None, .. } => "max pool",
            Kind::Pool { avg: Some(_), .. } => "avg pool",
            Kind::GlobalAvgPool { .. } => "global avg pool",
            Kind::Flatten { .. } => "flatten",
            Kind::Add { .. } => "add",
        }
    }
}

/// A layer's unrolled map ([`Layer::unrolled`]): its plan, and with bfloat16 (where asked and
/// the CPU has it) the in-place block kernel on the same blocks as a 1×1 convolution over the
/// images (one position per image), which multiplies in bfloat16 where the plan would not.
#[derive(Debug)]
pub(super) struct Unrolled {
    pub(super) plan: Plan,
    pub(super) bf16: Option<BlockConv>,
}

/// A conv or linear layer (a linear layer is a 1×1 convolution on a 1×1 image).
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) name: String,
    pub(super) plan: Plan,
    pub(super) g: ConvGeometry,
    /// Input channels read and output rows.
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
    pub(super) bias: Vec<f32>,
    /// `[cout, ho·wo]`: the exact contribution of removed input channels.
    pub(super) corr: Option<Vec<f32>>,
    pub(super) relu: bool,
    /// Whether the step's second input, a value of the output's shape, is added before the
    /// ReLU (a residual connection's `Add` fused into the layer that computes its last
    /// operand).
    pub(super) residual: bool,
    /// The rows of the im2col matrix the kernel reads, when it does not read them all (no
    /// kept weight uses the others): only these are computed.
    pub(super) read: Option<Vec<u32>>,
    /// The implicit-GEMM kernel of a dense stride-1 "same" convolution, which reads the input
    /// in place (the plan then serves only to describe the layer).
    pub(super) direct: Option<DirectConv>,
    /// Winograd for a dense 3×3 stride-1 convolution of even sizes (preferred to `direct`).
    /// Both run only while the plan runs coarsen's tiled kernel (not faer).
    pub(super) wino: Option<Wino>,
    /// The implicit-GEMM kernel of a convolution in dense blocks (group, shuffled, BSR) of
    /// those geometries, which reads the input in place per block (the plan then serves the
    /// other shapes).
    pub(super) blocks: Option<BlockConv>,
    /// The N:M kernel of an N:M layer, for products of at most [`NM_COLS`] columns (batch 1's
    /// deep layers, where the weight's bytes bound the time).
    pub(super) nm: Option<NmConv>,
    /// A convolution in dense blocks on images of at most 4 positions as the linear map from
    /// an image's input to its output (rows `co·ho·wo + q`, columns `ci·h·w + p`; see
    /// `unroll` in `build.rs`): the taps that fall in the padding, most of them on such
    /// images, are gone (a 3×3 kernel on 2×2 images: 4 of 9 per position), for products of at
    /// least [`UNROLL_IMAGES`] images.
    pub(super) unrolled: Option<Box<Unrolled>>,
    /// The same layer on the dense kernels (sparse formats on the packed path), until tuning
    /// decides which of the two runs.
    pub(super) dense_twin: Option<Box<Layer>>,
    /// A 1×1 stride-2 layer of the same input computed in the same pass over it (a residual
    /// block's downsample beside its first, 3×3 stride-2, convolution): its value is the
    /// step's second output ([`Step::also`]).
    pub(super) fused: Option<Box<Fused>>,
}

/// A 1×1 stride-2 layer fused into a 3×3 stride-2 layer of the same input
/// ([`InferenceNet::fuse_downsamples`](super::InferenceNet)).
#[derive(Debug)]
pub(super) struct Fused {
    /// The 1×1 layer, which runs on its own where the fused kernel does not run.
    pub(super) down: Layer,
    /// Both layers' blocks in one kernel ([`BlockConv::fuse_strided_1x1`]).
    pub(super) kernel: BlockConv,
}

/// Runs the steps of `net` on the channel-major batch `x`; the output slot's values. With
/// `times` (one entry per step), adds each step's wall time in seconds to its entry.
pub(super) fn run(
    net: &InferenceNet,
    x: &[f32],
    batch: usize,
    mut times: Option<&mut [f64]>,
) -> Result<Vec<f32>> {
    let mut vals: Vec<Option<Cow<'_, [f32]>>> = (0..net.reads.len()).map(|_| None).collect();
    let mut left = net.reads.clone();
    let mut first = 0;
    match prefix(net, batch) {
        Some((p, images)) => {
            let cut = run_prefix(net, x, batch, &p, images, times.as_deref_mut())?;
            vals[p.cut] = Some(Cow::Owned(cut));
            for step in &net.steps[..p.end] {
                for &i in &step.inputs {
                    left[i] -= 1;
                }
            }
            first = p.end;
        }
        None => vals[0] = Some(Cow::Borrowed(x)),
    }
    run_steps(
        net,
        first..net.steps.len(),
        &mut vals,
        &mut left,
        batch,
        times,
    )?;
    vals[net.output]
        .take()
        .map(Cow::into_owned)
        .ok_or_else(|| InferError::graph("graph", "output", "the output was never computed"))
}

/// The first steps of a pass, run on chunks of images (see
/// [`InferOptions::prefix_chunk_floats`]): steps `0 .. end`, after which slot `cut` alone is
/// live, a value of `rows` channel rows of `hw` positions per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Prefix {
    pub(super) end: usize,
    pub(super) cut: usize,
    pub(super) rows: usize,
    pub(super) hw: usize,
    /// Floats per image of the largest value of steps `0 .. end`.
    pub(super) peak: usize,
}

/// The compiled [`Prefix`] of `net`, and its images per chunk, where a pass of `batch`
/// images runs it (chunks of fewer images than the batch).
pub(super) fn prefix(net: &InferenceNet, batch: usize) -> Option<(Prefix, usize)> {
    let p = net.prefix?;
    let images = (net.options.prefix_chunk_floats / p.peak.max(1)).max(1);
    (images < batch).then_some((p, images))
}

/// The steps of `net` that may run on chunks of images, if any: the first steps while each
/// reads or makes a value of at least `prefix_min_floats` floats per image (per-image
/// operations only: layers, ReLU, affine, add, pooling), cut back to the last step after
/// which one value alone is live; chunks of as many images as keep the largest of those
/// values within `prefix_chunk_floats` ([`prefix`]). Found once, when the network is
/// compiled or its options set (a layer and its dense twin have the same shapes).
pub(super) fn plan_prefix(net: &InferenceNet) -> Option<Prefix> {
    let o = &net.options;
    if o.prefix_chunk_floats == 0 {
        return None;
    }
    let slots = net.reads.len();
    // (channel rows, positions per image) of every slot the per-image steps make, up to the
    // first step that is not one (a global pooling, a flatten).
    let mut shape = vec![(0usize, 0usize); slots];
    let [c, h, w] = net.input;
    shape[0] = (c, h * w);
    // Per step: the larger of the value it reads and the one it makes, floats per image.
    let mut sizes = Vec::new();
    for step in &net.steps {
        let Some(&first) = step.inputs.first() else {
            break;
        };
        let (rows, hw) = shape[first];
        let out = match &step.kind {
            Kind::Layer(l) => {
                if let (Some(also), Some(f)) = (step.also, &l.fused) {
                    shape[also] = (f.down.cout, f.down.ho * f.down.wo);
                }
                (l.cout, l.ho * l.wo)
            }
            Kind::Relu | Kind::Affine { .. } => (rows, hw),
            Kind::Materialize { to, hw, .. } => (to.len(), *hw),
            Kind::Add { sources, hw } => (sources.len(), *hw),
            Kind::Pool { ho, wo, .. } => (rows, ho * wo),
            Kind::GlobalAvgPool { .. } | Kind::Flatten { .. } => break,
        };
        shape[step.output] = out;
        sizes.push(out.0.saturating_mul(out.1).max(rows.saturating_mul(hw)));
    }
    // A network whose values all stay below the threshold (the demo's CNN on 28×28 images:
    // 25 K floats at most) chunks from half its largest value instead, where its values
    // would otherwise stream through memory layer by layer at large batches.
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let min = if largest < o.prefix_min_floats {
        largest / 2
    } else {
        o.prefix_min_floats
    };
    // The first steps while each reads or makes a value of at least `min` floats per image;
    // a step that shrinks a large value (a pooling, a strided layer) belongs to the chunks
    // too: the large value then never leaves the cache.
    let end = sizes.iter().take_while(|&&v| v >= min.max(1)).count();
    // Where each slot is made (the input: before step 0) and last read (the output: after
    // the last step).
    let mut made = vec![None; slots];
    let mut last = vec![None; slots];
    made[0] = Some(0);
    for (i, step) in net.steps.iter().enumerate() {
        made[step.output] = Some(i + 1);
        if let Some(also) = step.also {
            made[also] = Some(i + 1);
        }
        for &s in &step.inputs {
            last[s] = Some(i);
        }
    }
    last[net.output] = Some(net.steps.len());
    (1..=end).rev().find_map(|p| {
        let mut live = (0..slots)
            .filter(|&s| made[s].is_some_and(|m| m <= p) && last[s].is_some_and(|r| r >= p));
        let cut = live.next()?;
        if live.next().is_some() || cut == 0 {
            return None;
        }
        // The largest value of the steps before the cut sets the chunk.
        let floats = |s: usize| shape[s].0 * shape[s].1;
        let peak = net.steps[..p]
            .iter()
            .map(|st| floats(st.output).max(st.also.map_or(0, floats)))
            .max()?;
        let (rows, hw) = shape[cut];
        Some(Prefix {
            end: p,
            cut,
            rows,
            hw,
            peak,
        })
    })
}

/// Steps `0 .. p.end` of `net` on chunks of `images` images of `x` (`[C, B, H, W]`), each
/// chunk's value of slot `p.cut` copied into its images of the whole batch's: the chunks as
/// the tasks of one parallel section ([`InferOptions::prefix_parallel`]; each chunk's steps
/// then run on its task's thread alone), else one after another. With `times`, each chunk
/// times its steps on its own thread, and a step's time is the sum over its chunks shared
/// out over the threads that ran them (its part of the section's wall time, as the
/// section ran: each chunk on one thread, its values in that core's cache); run one after
/// another, the sum over its chunks.
fn run_prefix(
    net: &InferenceNet,
    x: &[f32],
    batch: usize,
    p: &Prefix,
    images: usize,
    mut times: Option<&mut [f64]>,
) -> Result<Vec<f32>> {
    let len = p.rows * batch * p.hw;
    let mut out = buffer(len);
    let dst = Shared(out.as_mut_ptr());
    let starts: Vec<usize> = (0..batch).step_by(images.max(1)).collect();
    // Chunk `i`'s value at the cut, copied into its images of every row of `out`.
    let chunk = |i: usize, times: Option<&mut [f64]>| -> Result<()> {
        let n0 = starts[i];
        let k = images.min(batch - n0);
        let part = run_chunk(net, x, batch, p, (n0, k), times)?;
        let n = k * p.hw;
        // The whole `Shared` (a closure would capture its pointer field alone).
        let to = dst;
        for (r, src) in part.chunks_exact(n.max(1)).enumerate() {
            // SAFETY: `out` has room for `len` = `rows · batch · hw` values; row `r`'s images
            // `n0 .. n0 + k` are `n` values at `r · batch · hw + n0 · hw`, written by this
            // chunk only (the chunks' images are disjoint), and `out` outlives the section.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    to.0.add(r * batch * p.hw + n0 * p.hw),
                    n,
                );
            }
        }
        give_back(part);
        Ok(())
    };
    if net.options.prefix_parallel && starts.len() > 1 {
        match times {
            None => team::try_for_each(starts.len(), |i| chunk(i, None))?,
            Some(times) => {
                let sums = std::sync::Mutex::new(vec![0.0f64; times.len()]);
                team::try_for_each(starts.len(), |i| {
                    let mut own = vec![0.0f64; times.len()];
                    chunk(i, Some(&mut own))?;
                    // A panicking task poisons nothing another could misread: sums only grow.
                    let mut sums = sums.lock().unwrap_or_else(|e| e.into_inner());
                    for (s, t) in sums.iter_mut().zip(&own) {
                        *s += t;
                    }
                    Ok::<(), InferError>(())
                })?;
                let threads = rayon::current_num_threads().clamp(1, starts.len()) as f64;
                let sums = sums.into_inner().unwrap_or_else(|e| e.into_inner());
                for (t, s) in times.iter_mut().zip(sums) {
                    *t += s / threads;
                }
            }
        }
    } else {
        for i in 0..starts.len() {
            chunk(i, times.as_deref_mut())?;
        }
    }
    // SAFETY: the chunks cover every image of every row: all `len` values are written.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// Steps `0 .. p.end` of `net` on the `k` images from `n0` of `x` (`[C, B, H, W]`): the
/// value of slot `p.cut` (`p.rows × k·p.hw`).
fn run_chunk(
    net: &InferenceNet,
    x: &[f32],
    batch: usize,
    p: &Prefix,
    (n0, k): (usize, usize),
    times: Option<&mut [f64]>,
) -> Result<Vec<f32>> {
    let [c, h, w] = net.input;
    let hw = h * w;
    let mut xc = buffer(c * k * hw);
    for ch in 0..c {
        xc.extend_from_slice(&x[(ch * batch + n0) * hw..][..k * hw]);
    }
    let mut vals: Vec<Option<Cow<'_, [f32]>>> = (0..net.reads.len()).map(|_| None).collect();
    vals[0] = Some(Cow::Owned(xc));
    let mut left = net.reads.clone();
    run_steps(net, 0..p.end, &mut vals, &mut left, k, times)?;
    let part = vals[p.cut]
        .take()
        .map(Cow::into_owned)
        .filter(|v| v.len() == p.rows * k * p.hw)
        .ok_or_else(|| {
            InferError::graph(
                "graph",
                "run",
                "a chunk's value at the cut has another size (a bug in coarsen)",
            )
        });
    for v in vals.into_iter().flatten() {
        if let Cow::Owned(v) = v {
            give_back(v);
        }
    }
    part
}

/// Runs steps `range` of `net`, reading and writing `vals`, `left` counting every slot's
/// remaining readers. With `times` (one entry per step), adds each step's wall time in
/// seconds to its entry.
fn run_steps(
    net: &InferenceNet,
    range: std::ops::Range<usize>,
    vals: &mut [Option<Cow<'_, [f32]>>],
    left: &mut [usize],
    batch: usize,
    mut times: Option<&mut [f64]>,
) -> Result<()> {
    let o = &net.options;
    let (first, end) = (range.start, range.end.min(net.steps.len()));
    for (index, step) in net.steps.iter().enumerate().take(end).skip(first) {
        // The clock is read only when profiling.
        let start = times.is_some().then(std::time::Instant::now);
        let mut second = None;
        let out = {
            // A step that works in place takes its input when nothing else reads it later.
            let in_place =
                matches!(step.kind, Kind::Relu | Kind::Affine { .. }) && left[step.inputs[0]] == 1;
            if in_place {
                let v = vals[step.inputs[0]].take().map(Cow::into_owned);
                let mut v = v.ok_or_else(|| missing(step))?;
                apply_in_place(&step.kind, &mut v, batch);
                v
            } else {
                let ins = step
                    .inputs
                    .iter()
                    .map(|&i| vals[i].as_deref().ok_or_else(|| missing(step)))
                    .collect::<Result<Vec<&[f32]>>>()?;
                match (&step.kind, step.also) {
                    (Kind::Layer(l), Some(_)) => {
                        let (a, b) = l.forward_pair(ins[0], batch, o)?;
                        second = Some(b);
                        a
                    }
                    _ => apply(&step.kind, &ins, batch, o)?,
                }
            }
        };
        for &i in &step.inputs {
            left[i] -= 1;
            if left[i] == 0 {
                if let Some(Cow::Owned(v)) = vals[i].take() {
                    give_back(v);
                }
            }
        }
        vals[step.output] = Some(Cow::Owned(out));
        if let (Some(also), Some(v)) = (step.also, second) {
            vals[also] = Some(Cow::Owned(v));
        }
        if let (Some(t), Some(start)) = (times.as_deref_mut().and_then(|t| t.get_mut(index)), start)
        {
            *t += start.elapsed().as_secs_f64();
        }
    }
    Ok(())
}

fn missing(step: &Step) -> InferError {
    InferError::graph(
        format!("step {}", step.output),
        "run",
        "an input was freed before it was read (a bug in coarsen)",
    )
}

fn apply_in_place(kind: &Kind, v: &mut [f32], batch: usize) {
    match kind {
        Kind::Relu => v
            .par_chunks_mut(4096)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0))),
        Kind::Affine { scale, shift, hw } => {
            let n = (batch * hw).max(1);
            v.par_chunks_mut(n)
                .zip(scale.par_iter().zip(shift.par_iter()))
                .for_each(|(row, (&s, &t))| row.iter_mut().for_each(|v| *v = *v * s + t));
        }
        _ => {}
    }
}

fn apply(kind: &Kind, ins: &[&[f32]], batch: usize, o: &InferOptions) -> Result<Vec<f32>> {
    let x = ins[0];
    Ok(match kind {
        Kind::Layer(l) => l.forward(x, ins.get(1).copied(), batch, o)?,
        Kind::Relu | Kind::Affine { .. } => {
            let mut v = x.to_vec();
            apply_in_place(kind, &mut v, batch);
            v
        }
        Kind::Materialize {
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
        Kind::Pool {
            g,
            avg,
            h,
            w,
            ho,
            wo,
        } => pool(x, *g, (*h, *w), (*ho, *wo), *avg),
        Kind::GlobalAvgPool { hw } => {
            let hw = (*hw).max(1);
            x.par_chunks(hw)
                .map(|p| p.iter().sum::<f32>() / hw as f32)
                .collect()
        }
        Kind::Flatten { hw } => {
            // [C, B, HW] → [C·HW, B].
            let c = x.len() / (batch * hw).max(1);
            let mut y = vec![0.0f32; x.len()];
            y.par_chunks_mut((batch * hw).max(1))
                .enumerate()
                .take(c)
                .for_each(|(ch, out)| {
                    let src = &x[ch * batch * hw..(ch + 1) * batch * hw];
                    // Blocks of 16 samples, whose rows stay in L1 while each position's 16
                    // values go out as one contiguous run.
                    for b0 in (0..batch).step_by(16) {
                        let b1 = (b0 + 16).min(batch);
                        for s in 0..*hw {
                            let dst = &mut out[s * batch + b0..s * batch + b1];
                            for (k, d) in dst.iter_mut().enumerate() {
                                *d = src[(b0 + k) * hw + s];
                            }
                        }
                    }
                });
            y
        }
        Kind::Add { sources, hw } => {
            let (a, b) = (ins[0], ins[1]);
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
                    (Source::Row(i), Source::Const(c)) => dst
                        .iter_mut()
                        .zip(&a[i * n..(i + 1) * n])
                        .for_each(|(d, u)| *d = u + c),
                    (Source::Const(c), Source::Row(j)) => dst
                        .iter_mut()
                        .zip(&b[j * n..(j + 1) * n])
                        .for_each(|(d, v)| *d = v + c),
                    (Source::Const(c), Source::Const(e)) => dst.fill(c + e),
                });
            out
        }
    })
}

/// Max pooling (`avg = None`) or average pooling (`avg = Some(count the padding)`) of every
/// plane of `x` (`h × w` each).
fn pool(
    x: &[f32],
    g: ConvGeometry,
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    avg: Option<bool>,
) -> Vec<f32> {
    let planes = x.len() / (h * w).max(1);
    let len = planes * ho * wo;
    // A recycled buffer (a new one, of megabytes, costs a page fault per 4 KiB on first
    // write), every value written below.
    let mut y = buffer(len);
    let fast2 = avg.is_none() && g.kernel == [2, 2] && g.stride == [2, 2] && g.padding == [0; 4];
    let [kh, kw] = g.kernel;
    let (sh, sw) = (g.stride[0], g.stride[1]);
    let (pt, pl) = (g.padding[0], g.padding[1]);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut((ho * wo).max(1))
        .enumerate()
        .for_each(|(p, out)| {
            let src = &x[p * h * w..(p + 1) * h * w];
            if fast2 {
                // Pairs of input rows and pairs of columns, without bounds checks in the loop
                // (so that it vectorises).
                for (oy, row) in out.chunks_exact_mut(wo.max(1)).enumerate() {
                    let r0 = &src[2 * oy * w..][..2 * wo];
                    let r1 = &src[(2 * oy + 1) * w..][..2 * wo];
                    for ((o, a), b) in row
                        .iter_mut()
                        .zip(r0.chunks_exact(2))
                        .zip(r1.chunks_exact(2))
                    {
                        o.write(a[0].max(a[1]).max(b[0].max(b[1])));
                    }
                }
                return;
            }
            for oy in 0..ho {
                let y0 = (oy * sh) as isize - pt as isize;
                let (ya, yb) = (
                    y0.max(0) as usize,
                    ((y0 + kh as isize).min(h as isize)) as usize,
                );
                for ox in 0..wo {
                    let x0 = (ox * sw) as isize - pl as isize;
                    let (xa, xb) = (
                        x0.max(0) as usize,
                        ((x0 + kw as isize).min(w as isize)) as usize,
                    );
                    let rows = (ya..yb).map(|iy| &src[iy * w + xa..iy * w + xb]);
                    let v = match avg {
                        None => rows.flatten().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
                        Some(include_pad) => {
                            let s: f32 = rows.flatten().sum();
                            let count = if include_pad {
                                // The window inside the padded input.
                                let ye = (y0 + kh as isize).min((h + g.padding[2]) as isize);
                                let xe = (x0 + kw as isize).min((w + g.padding[3]) as isize);
                                ((ye - y0) * (xe - x0)) as usize
                            } else {
                                (yb - ya) * (xb - xa)
                            };
                            s / count.max(1) as f32
                        }
                    };
                    out[oy * wo + ox].write(v);
                }
            }
        });
    // SAFETY: the planes cover all `len` values, each written above.
    unsafe { y.set_len(len) };
    y
}

/// Most freed values [`POOL`] keeps.
const POOL_SIZE: usize = 8;

thread_local! {
    /// Values freed by earlier steps (and earlier passes) of the calling thread, reused as the
    /// outputs of layers: a fresh allocation of a large output maps fresh pages, and every
    /// page then faults on first touch (12 000 faults per ResNet-18 pass at batch 64).
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's buffer of inputs that [`Layer::forward`]'s tasks share.
    static SHARED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Per-thread scratch of [`Layer::forward`]: the im2col chunk, the kernel's output and one
    /// im2col row.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// An empty vector with room for `len` values: the smallest pooled one that is large enough
/// (and not more than twice as large), else a new one.
fn buffer(len: usize) -> Vec<f32> {
    let pooled = POOL.with_borrow_mut(|pool| {
        let fit = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() / 2 <= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        fit.map(|i| pool.swap_remove(i))
    });
    match pooled {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(len),
    }
}

/// Keeps a freed value for [`buffer`] (the largest [`POOL_SIZE`] of them).
fn give_back(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    POOL.with_borrow_mut(|pool| {
        pool.push(v);
        if pool.len() > POOL_SIZE {
            let smallest = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = smallest {
                pool.swap_remove(i);
            }
        }
    });
}

/// `v` with at least `len` values (grown, never shrunk; contents unspecified).
fn at_least(mut v: Vec<f32>, len: usize) -> Vec<f32> {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// A pointer through which tasks write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes a disjoint range (its columns of each row), and the buffer outlives
// the parallel loop.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// A layer's Winograd kernels: F(2×2, 3×3), and F(4×4, 3×3) where the layer allows it.
#[derive(Clone, Debug)]
pub(super) struct Wino {
    /// F(2×2, 3×3).
    pub(super) f2: Winograd,
    /// F(4×4, 3×3), for products of at least [`F4_MIN_COLS`] columns.
    pub(super) f4: Option<Winograd>,
}

/// Fewest columns (output positions × batch) of a product that runs F(4×4, 3×3): with fewer,
/// its blocks of tiles of 16 outputs are mostly empty, and its weight (four times the direct
/// one) is read for few outputs. Batch 1's 32×32 layers (1024 columns) measured faster on
/// F(4×4) with AVX2 (`examples/ab_options`, two binaries alternated) and no slower with
/// AVX-512; its 16×16 layers slower with AVX2.
const F4_MIN_COLS: usize = 1024;

impl Wino {
    /// The kernel for a product of `n` columns.
    pub(super) fn for_columns(&self, n: usize) -> &Winograd {
        match &self.f4 {
            Some(k) if n >= F4_MIN_COLS => k,
            _ => &self.f2,
        }
    }

    /// Whether its kernels multiply only each row class's input channels (a sparse layer's
    /// twin whose weight has whole kernels of zeros, [`Winograd::is_sparse`]).
    pub(super) fn is_sparse(&self) -> bool {
        self.f2.is_sparse() || self.f4.as_ref().is_some_and(Winograd::is_sparse)
    }
}

impl Layer {
    /// `[cin, B, h, w]` → `[cout, B, ho, wo]`.
    ///
    /// Columns are cut into chunks of whole output rows, one task each: im2col of the chunk,
    /// the kernel, then bias, the removed-channel correction and ReLU fused into the copy of
    /// the chunk's columns into the output. Scratch buffers are per thread and reused across
    /// layers and calls.
    pub(super) fn forward(
        &self,
        x: &[f32],
        res: Option<&[f32]>,
        batch: usize,
        o: &InferOptions,
    ) -> Result<Vec<f32>> {
        let kerr = |e| InferError::kernel(&self.name, e);
        let d = ConvDims::new(&[self.cin, batch, self.h, self.w], self.g).map_err(kerr)?;
        let hw = self.ho * self.wo;
        let n = batch * hw;
        let res = match (self.residual, res) {
            (false, None) => None,
            (true, Some(q)) if Some(q.len()) == self.cout.checked_mul(n) => Some(q),
            (want, got) => {
                return Err(InferError::graph(
                    &self.name,
                    "layer",
                    format!(
                        "the residual input: {} expected, {} given (a bug in coarsen)",
                        if want {
                            "one of the output's shape"
                        } else {
                            "none"
                        },
                        got.map_or("none".to_string(), |q| format!("{} values", q.len()))
                    ),
                ))
            }
        };
        if let Some(u) = self.unrolled.as_ref().filter(|_| self.runs_unrolled(batch)) {
            return self.forward_unrolled(u, x, res, batch);
        }
        if let Some(bc) = self.blocks.as_ref().filter(|_| self.runs_blocks(n, o)) {
            return self.forward_blocks(bc, x, res, &d, o);
        }
        if let Some(k) = self
            .nm
            .as_ref()
            .filter(|k| self.runs_nm(n) && k.accepts(&d))
        {
            return self.forward_nm(k, x, res, &d);
        }
        let rows = self.cout;
        let len = rows * n;
        // Every value of `y` is written below (the chunks cover every column of every row)
        // before its length is set; nothing reads it before.
        let mut y: Vec<f32> = buffer(len);
        let yp = Shared(y.as_mut_ptr());
        // im2col rows computed: all, or those the kernel reads.
        let kk = self.read.as_ref().map_or(d.rows(), |r| r.len());
        let tiles = self.plan.tile_width();
        let wino = self
            .wino
            .as_ref()
            .filter(|_| self.runs_winograd(n, o))
            .map(|w| w.for_columns(n));
        let chunks = match wino {
            // Whole bands of output rows (as many as the tiles' side; whole images where the
            // tiles reach past them), in whole blocks of tiles where that costs at most a few
            // bands.
            Some(k) => {
                let unit = k.column_unit(self.ho, self.wo);
                let chunks = column_chunks(n, unit, k.block_columns(), 4 * self.cin, o);
                balanced(chunks, n, unit, rayon::current_num_threads())
            }
            None => column_chunks(n, self.wo, tiles.unwrap_or(1), kk, o),
        };
        // A 1×1 convolution over the whole batch multiplies the input itself.
        let no_im2col = self.g.pointwise() && chunks.len() == 1 && self.read.is_none();
        // A few whole column tiles (batch 1's deepest layers on AVX2): the tiled kernel runs
        // each panel of weights over all of them, one stream of weights per thread.
        let stream = self.stream_width(n, o);
        // Few columns (small batches, deep layers): the dense kernel vectorises over rows.
        let small = self
            .plan
            .tile_rows()
            .zip(tiles)
            .filter(|_| stream.is_none() && self.runs_small(n, o));
        // At most one vector of columns (batch 1's deepest layers): the narrow kernel reads
        // every weight once.
        let narrow = self.narrow_width(n, o);
        let dc = self.direct.as_ref().filter(|_| self.runs_direct(n, o));
        // Few columns on the implicit GEMM (batch 1's 8×8 layers): one chunk, so that each
        // task's weight rows, read from memory for its first tile, serve its other tiles
        // from the cache.
        let few = dc.is_some() && n <= FEW_DIRECT_TILES * DirectConv::TILE;
        let chunks = if small.is_some() || stream.is_some() || few {
            vec![(0, n)]
        } else {
            chunks
        };
        // Too few columns to keep every thread busy (small batches, deep layers): the dense
        // kernels also split the output rows.
        let align = match (dc, self.plan.tile_rows()) {
            _ if narrow.is_some() || stream.is_some() => self.plan.tile_rows(),
            _ if small.is_some() => small.map(|(_, a)| a),
            _ if wino.is_some() => wino.map(|k| k.row_align()),
            (Some(_), _) => Some(DirectConv::ROW_ALIGN),
            (None, Some(r)) if tiles.is_some() => Some(r),
            _ => None,
        };
        let want = 2 * rayon::current_num_threads();
        let row_blocks: Vec<(usize, usize)> = match align {
            Some(a) if chunks.len() < want && rows > a => {
                let parts = want.div_ceil(chunks.len()).min(rows / a);
                let per = rows.div_ceil(parts).div_ceil(a) * a;
                (0..rows.div_ceil(per))
                    .map(|i| (i * per, ((i + 1) * per).min(rows)))
                    .collect()
            }
            _ => vec![(0, rows)],
        };
        let tasks: Vec<((usize, usize), (usize, usize))> = chunks
            .iter()
            .flat_map(|&c| row_blocks.iter().map(move |&r| (c, r)))
            .collect();
        // The few-column kernels' input (the narrow kernel's one tile, or panels of `MR`
        // columns) is made once and shared by the row shares (each share making its own
        // repeated the im2col once per share).
        let mut shared = SHARED.take();
        let packed_width = narrow.or(stream).or(small.map(|(mr, _)| mr));
        let packed_len = packed_width.map_or(0, |w| n.div_ceil(w) * w * kk);
        if let Some(w) = packed_width {
            shared = at_least(shared, packed_len);
            let c = &mut shared[..packed_len];
            let parts = (2 * rayon::current_num_threads()).min(kk / IM2COL_ROWS);
            if n <= w && parts > 1 {
                // One tile (`kk × w`, row after row; batch 1's deepest layers): its rows in
                // parallel, where one thread made it while the others waited.
                let all: Vec<u32>;
                let ids = match self.read.as_deref() {
                    Some(r) => r,
                    None => {
                        all = (0..kk as u32).collect();
                        &all
                    }
                };
                let per = kk.div_ceil(parts);
                team::try_for_each_chunk_mut(c, per * w, |i, out| {
                    let ids = &ids[i * per..ids.len().min((i + 1) * per)];
                    d.im2col_tiles(x, Some(ids), 0, n, w, out, &mut Vec::new())
                })
                .map_err(kerr)?;
            } else {
                d.im2col_tiles(x, self.read.as_deref(), 0, n, w, c, &mut Vec::new())
                    .map_err(kerr)?;
            }
        }
        let panels = &shared;
        let result = team::try_for_each(tasks.len(), |t| -> Result<()> {
            let ((c0, c1), (r0, r1)) = tasks[t];
            let (nc, out) = (c1 - c0, yp);
            let fused = o.fuse_epilogue && self.corr.is_none();
            let epilogue = Epilogue {
                bias: Some(&self.bias),
                residual: res.map(|values| Residual { values, ld: n }),
                relu: self.relu,
            };
            if let Some(k) = wino.filter(|_| fused) {
                // SAFETY: this task alone writes rows r0..r1, columns c0..c1 of `y`
                // (`rows × n`, allocated above), and every value is written before
                // `set_len` below.
                return unsafe {
                    k.forward_into(
                        x,
                        &d,
                        (c0, c1),
                        (r0, r1),
                        out.0.add(r0 * n + c0),
                        n,
                        epilogue,
                    )
                }
                .map_err(kerr);
            }
            if let Some(dc) = dc.filter(|_| fused) {
                // SAFETY: this task alone writes rows r0..r1, columns c0..c1 of `y`
                // (`rows × n`, allocated above); the kernel writes each value before it
                // reads it back, and every value is written before `set_len` below.
                return unsafe {
                    dc.forward_into(
                        x,
                        &d,
                        (c0, c1),
                        (r0, r1),
                        out.0.add(r0 * n + c0),
                        n,
                        epilogue,
                    )
                }
                .map_err(kerr);
            }
            // Taken out of the thread's slot, not borrowed across the kernel call: should
            // anything run another chunk on this thread meanwhile (rayon's work stealing),
            // that chunk allocates its own.
            let (mut col_buf, part_buf, mut tmp) = SCRATCH.take();
            let mut part_buf = at_least(part_buf, (r1 - r0) * nc);
            let part = &mut part_buf[..(r1 - r0) * nc];
            if narrow.is_some() {
                // One chunk, all of 0..n, one tile (see above).
                self.plan
                    .forward_narrow_rows(&panels[..packed_len], part, nc, r0, r1)
            } else if stream.is_some() {
                // One chunk, all of 0..n, in whole tiles (see above).
                self.plan
                    .forward_stream_rows(&panels[..packed_len], part, nc, r0, r1)
            } else if small.is_some() {
                // One chunk, all of 0..n (see above).
                self.plan
                    .forward_small_rows(&panels[..packed_len], part, nc, r0, r1)
            } else if let Some(k) = wino {
                k.forward_rows(x, &d, c0, c1, r0, r1, part)
            } else if let Some(dc) = dc {
                dc.forward_rows(x, &d, c0, c1, r0, r1, part)
            } else if let Some(nr) = tiles {
                // The tiled dense kernel reads im2col tiles in place: no packing copy.
                let len = nc.div_ceil(nr) * nr * kk;
                col_buf = at_least(col_buf, len);
                let c = &mut col_buf[..len];
                d.im2col_tiles(x, self.read.as_deref(), c0, c1, nr, c, &mut tmp)
                    .and_then(|()| self.plan.forward_tiles_rows(c, part, nc, r0, r1))
            } else if no_im2col {
                self.plan.forward(x, part, nc)
            } else {
                col_buf = at_least(col_buf, kk * nc);
                let c = &mut col_buf[..kk * nc];
                match &self.read {
                    Some(r) => d.im2col_rows(x, r, c0, c1, c),
                    None => d.im2col_range(x, c0, c1, c),
                }
                .and_then(|()| self.plan.forward(c, part, nc))
            }
            .map_err(kerr)?;
            self.store(part, out, (r0, c0), nc, (n, res));
            SCRATCH.set((col_buf, part_buf, tmp));
            Ok(())
        });
        SHARED.set(shared);
        result?;
        // SAFETY: every one of the `len` values was written above (the tasks cover every row
        // of every column chunk, and the chunks cover 0..n).
        unsafe { y.set_len(len) };
        Ok(y)
    }

    /// [`forward`](Self::forward) on the block kernel: tasks of column chunks × shares of the
    /// blocks, each writing its part of the output in place through the epilogue.
    fn forward_blocks(
        &self,
        bc: &BlockConv,
        x: &[f32],
        res: Option<&[f32]>,
        d: &ConvDims,
        o: &InferOptions,
    ) -> Result<Vec<f32>> {
        let kerr = |e| InferError::kernel(&self.name, e);
        let n = d.n();
        let len = self.cout * n;
        let mut y: Vec<f32> = buffer(len);
        let yp = Shared(y.as_mut_ptr());
        let (shares, tasks) = self.block_tasks(bc, d, o);
        let epilogue = Epilogue {
            bias: Some(&self.bias),
            residual: res.map(|values| Residual { values, ld: n }),
            relu: self.relu,
        };
        // The narrow kernel for at most one vector of columns, or up to its most where the
        // in-place kernel does not run the layer (odd sizes at stride 2); between 16 and 64
        // columns of 3×3 layers the in-place kernel measured 1.3–1.6× faster.
        if bc.narrow() && (n <= 16 || (!self.blocks_in_place() && n <= BlockConv::NARROW)) {
            // Few columns (batch 1's small images): im2col tiles of 16 columns, made once,
            // every block's column one aligned vector of a tile.
            let tl = bc.narrow_len(n);
            let mut shared = at_least(SHARED.take(), tl);
            let result = bc
                .narrow_input(x, d, &mut shared[..tl])
                .map_err(kerr)
                .and_then(|()| {
                    let xt = &shared[..tl];
                    team::try_for_each(shares.len(), |i| {
                        let share = shares[i];
                        let out = yp;
                        // SAFETY: this task alone writes the rows of its blocks of `y` (`cout
                        // × n`, allocated above; blocks' rows are disjoint and below `cout`);
                        // every value is written before `set_len` below.
                        unsafe { bc.forward_narrow_into(xt, d, share, out.0, n, epilogue) }
                            .map_err(kerr)
                    })
                });
            SHARED.set(shared);
            result?;
            // SAFETY: every row is in exactly one block and the shares cover every block.
            unsafe { y.set_len(len) };
            return Ok(y);
        }
        let result = team::try_for_each(tasks.len(), |i| {
            let ((c0, c1), share) = tasks[i];
            let out = yp;
            // SAFETY: this task alone writes columns c0..c1 of the rows of its blocks of `y`
            // (`cout × n`, allocated above; the blocks' rows are disjoint and below `cout`);
            // every value is written before `set_len` below.
            unsafe { bc.forward_into(x, d, (c0, c1), share, out.0.add(c0), n, epilogue) }
                .map_err(kerr)
        });
        result?;
        // SAFETY: every row is in exactly one block, and the tasks cover every block of every
        // column chunk, and the chunks cover 0..n: all `len` values were written.
        unsafe { y.set_len(len) };
        Ok(y)
    }

    /// How the block kernel `bc` runs this layer on `d`: its shares of the blocks, and the
    /// tasks (column chunk × share). Whole tiles of the kernel where that costs at most a few
    /// output rows (a chunk's narrow last tile runs at a fraction of the full tiles' rate);
    /// where the chunks are too few to keep every thread busy, the blocks are shared out too.
    #[allow(clippy::type_complexity)]
    fn block_tasks(
        &self,
        bc: &BlockConv,
        d: &ConvDims,
        o: &InferOptions,
    ) -> (Vec<(usize, usize)>, Vec<((usize, usize), (usize, usize))>) {
        let chunks = column_chunks(d.n(), self.wo, BlockConv::TILE, d.rows(), o);
        let want = 2 * rayon::current_num_threads();
        let shares = if chunks.len() < want {
            bc.shares(want.div_ceil(chunks.len()))
        } else {
            vec![(0, bc.blocks())]
        };
        let tasks = chunks
            .iter()
            .flat_map(|&c| shares.iter().map(move |&s| (c, s)))
            .collect();
        (shares, tasks)
    }

    /// [`forward`](Self::forward) on the unrolled map ([`unrolled`](Self::unrolled)): tasks
    /// of images, each transposing its images' input into the map's columns (`[ci·h·w + p]
    /// [image]`), multiplying, and storing through the epilogue, each image's `ho·wo`
    /// positions of a channel from the map's rows `co·ho·wo ..`.
    fn forward_unrolled(
        &self,
        u: &Unrolled,
        x: &[f32],
        res: Option<&[f32]>,
        batch: usize,
    ) -> Result<Vec<f32>> {
        let kerr = |e| InferError::kernel(&self.name, e);
        let (hw, ohw) = (self.h * self.w, self.ho * self.wo);
        let (k, rows) = (u.plan.in_dim(), u.plan.out_dim());
        if k != self.cin * hw || rows != self.cout * ohw || x.len() != self.cin * batch * hw {
            return Err(InferError::graph(
                &self.name,
                "layer",
                format!(
                    "the unrolled map is {rows}x{k} for {} channels of {hw} positions and {} of \
                     {ohw}, the input {} values for {batch} images (a bug in coarsen)",
                    self.cin,
                    self.cout,
                    x.len()
                ),
            ));
        }
        let n = batch * ohw;
        let len = self.cout * n;
        let mut y: Vec<f32> = buffer(len);
        let yp = Shared(y.as_mut_ptr());
        // One chunk of images per thread (the map's kernels run best on wide products).
        let per = batch.div_ceil(rayon::current_num_threads()).max(1);
        let chunks = batch.div_ceil(per);
        let result = team::try_for_each(chunks, |t| -> Result<()> {
            let (i0, i1, out) = (t * per, ((t + 1) * per).min(batch), yp);
            let nc = i1 - i0;
            let (col_buf, part_buf, tmp) = SCRATCH.take();
            let mut col_buf = at_least(col_buf, k * nc);
            let mut part_buf = at_least(part_buf, rows * nc);
            let mut row_buf = at_least(tmp, rows * nc);
            let cols = &mut col_buf[..k * nc];
            for ci in 0..self.cin {
                let src = &x[(ci * batch + i0) * hw..][..nc * hw];
                for p in 0..hw {
                    let dst = &mut cols[(ci * hw + p) * nc..][..nc];
                    for (d, img) in dst.iter_mut().zip(src.chunks_exact(hw)) {
                        *d = img[p];
                    }
                }
            }
            let part = &mut part_buf[..rows * nc];
            let r = match &u.bf16 {
                // The map as a 1×1 convolution of `k` channels over `nc` images of one
                // position, whose output rows are the map's.
                Some(bc) => ConvDims::new(&[k, nc, 1, 1], ConvGeometry::square(1, 1, 0))
                    .and_then(|d| {
                        let e = Epilogue {
                            bias: None,
                            residual: None,
                            relu: false,
                        };
                        // SAFETY: `part` holds the map's `rows` rows of `nc` columns, every
                        // row of the kernel's blocks (all of them cover `rows`).
                        unsafe {
                            bc.forward_into(
                                cols,
                                &d,
                                (0, nc),
                                (0, bc.blocks()),
                                part.as_mut_ptr(),
                                nc,
                                e,
                            )
                        }
                    })
                    .map_err(kerr),
                None => u.plan.forward(cols, part, nc).map_err(kerr),
            };
            if r.is_ok() {
                // The map's rows (channel, position) × images in the output's order, each
                // channel's images one after another, then through the epilogue into their
                // columns of `y`.
                let ordered = &mut row_buf[..rows * nc];
                for (co, dst) in ordered.chunks_exact_mut(nc * ohw).enumerate() {
                    for (j, v) in dst.iter_mut().enumerate() {
                        *v = part[(co * ohw + j % ohw) * nc + j / ohw];
                    }
                }
                self.store(ordered, out, (0, i0 * ohw), nc * ohw, (n, res));
            }
            SCRATCH.set((col_buf, part_buf, row_buf));
            r
        });
        result?;
        // SAFETY: the chunks cover every image, each task writing all of its images' values.
        unsafe { y.set_len(len) };
        Ok(y)
    }

    /// [`forward`](Self::forward) on the N:M kernel: the input gathered once into its
    /// layout, then tasks of output rows, each through the epilogue into its rows.
    fn forward_nm(
        &self,
        k: &NmConv,
        x: &[f32],
        res: Option<&[f32]>,
        d: &ConvDims,
    ) -> Result<Vec<f32>> {
        let kerr = |e| InferError::kernel(&self.name, e);
        let n = d.n();
        let rows = self.cout;
        let len = rows * n;
        let mut y: Vec<f32> = buffer(len);
        let yp = Shared(y.as_mut_ptr());
        let ql = k.input_len(n);
        let mut shared = at_least(SHARED.take(), ql);
        if let Err(e) = k.gather_input(x, d, &mut shared[..ql]) {
            SHARED.set(shared);
            return Err(kerr(e));
        }
        let xq = &shared[..ql];
        let align = NmConv::ROW_ALIGN;
        let parts = (2 * rayon::current_num_threads())
            .min(rows.div_ceil(align))
            .max(1);
        let per = rows.div_ceil(parts).div_ceil(align) * align;
        let shares: Vec<(usize, usize)> = (0..rows.div_ceil(per))
            .map(|i| (i * per, ((i + 1) * per).min(rows)))
            .collect();
        let result = team::try_for_each(shares.len(), |i| -> Result<()> {
            let (r0, r1) = shares[i];
            // Taken out of the thread's slot (see `forward`).
            let (col_buf, part_buf, tmp) = SCRATCH.take();
            let mut part_buf = at_least(part_buf, (r1 - r0) * n);
            let part = &mut part_buf[..(r1 - r0) * n];
            let r = k.forward_rows(xq, n, r0, r1, part).map_err(kerr);
            if r.is_ok() {
                self.store(part, yp, (r0, 0), n, (n, res));
            }
            SCRATCH.set((col_buf, part_buf, tmp));
            r
        });
        SHARED.set(shared);
        result?;
        // SAFETY: the shares cover every row, each storing all `n` columns of its rows.
        unsafe { y.set_len(len) };
        Ok(y)
    }

    /// Whether this layer of geometry `g` may take part in a fused pair
    /// ([`InferenceNet::fuse_downsamples`](super::InferenceNet)): its kind chosen (no dense
    /// twin left), not fused yet, its block kernel in place, and no removed-channel
    /// correction (the fused kernel's epilogues have none; nor a residual, which the caller
    /// checks).
    pub(super) fn fusable(&self, g: ConvGeometry) -> bool {
        self.g == g
            && self.dense_twin.is_none()
            && self.fused.is_none()
            && self.corr.is_none()
            && self.blocks_in_place()
    }

    /// Whether a product of `n` columns runs on the fused kernel of this layer and its 1×1
    /// layer ([`fused`](Self::fused)): where this layer runs its block kernel in place, on
    /// more than one vector of columns (fewer run on the narrow kernel, each layer alone).
    fn runs_fused(&self, n: usize, o: &InferOptions) -> bool {
        self.fused.is_some() && o.block_conv && self.blocks_in_place() && n > 16
    }

    /// This layer and its fused 1×1 layer ([`fused`](Self::fused)) on the same input `x`:
    /// both values, from one pass of the fused kernel where it runs, else from each layer
    /// on its own.
    pub(super) fn forward_pair(
        &self,
        x: &[f32],
        batch: usize,
        o: &InferOptions,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(f) = self.fused.as_deref() else {
            return Err(InferError::graph(
                &self.name,
                "layer",
                "a step with two outputs whose layer has no fused layer (a bug in coarsen)",
            ));
        };
        let kerr = |e| InferError::kernel(&self.name, e);
        let n = batch * self.ho * self.wo;
        if !self.runs_fused(n, o) {
            return Ok((
                self.forward(x, None, batch, o)?,
                f.down.forward(x, None, batch, o)?,
            ));
        }
        let d = ConvDims::new(&[self.cin, batch, self.h, self.w], self.g).map_err(kerr)?;
        let bc = &f.kernel;
        let (len, len2) = (self.cout * n, f.down.cout * n);
        let (mut y, mut z): (Vec<f32>, Vec<f32>) = (buffer(len), buffer(len2));
        let (yp, zp) = (Shared(y.as_mut_ptr()), Shared(z.as_mut_ptr()));
        let (_, tasks) = self.block_tasks(bc, &d, o);
        let first = Epilogue {
            bias: Some(&self.bias),
            residual: None,
            relu: self.relu,
        };
        let second = Epilogue {
            bias: Some(&f.down.bias),
            residual: None,
            relu: f.down.relu,
        };
        team::try_for_each(tasks.len(), |i| {
            let ((c0, c1), share) = tasks[i];
            let (a, b) = (yp, zp);
            // SAFETY: this task alone writes columns c0..c1 of the rows of its blocks of `y`
            // (`cout × n`) and `z` (`cout2 × n`), both allocated above (the blocks' rows are
            // disjoint and below their output's rows); every value is written before
            // `set_len` below.
            unsafe {
                bc.forward_pair_into(
                    x,
                    &d,
                    (c0, c1),
                    share,
                    (a.0.add(c0), n, first),
                    (b.0.add(c0), n, second),
                )
            }
            .map_err(kerr)
        })?;
        // SAFETY: every row of both outputs is in exactly one block, the tasks cover every
        // block of every column chunk, and the chunks cover 0..n.
        unsafe {
            y.set_len(len);
            z.set_len(len2);
        }
        Ok((y, z))
    }

    /// Whether a pass of `batch` images runs the unrolled map ([`unrolled`](Self::unrolled)):
    /// at least [`UNROLL_IMAGES`] of them.
    fn runs_unrolled(&self, batch: usize) -> bool {
        self.unrolled.is_some() && batch >= UNROLL_IMAGES
    }

    /// Whether a product of `n` columns runs on the N:M kernel.
    fn runs_nm(&self, n: usize) -> bool {
        self.nm.is_some() && n > 0 && n <= NM_COLS
    }

    /// Whether a product of `n` columns runs on the block kernel.
    fn runs_blocks(&self, n: usize, o: &InferOptions) -> bool {
        self.blocks.is_some()
            && (self.blocks_in_place()
                || (n <= BlockConv::NARROW && self.blocks.as_ref().is_some_and(BlockConv::narrow)))
            && o.block_conv
            && n > 0
    }

    /// Whether the block kernel runs this layer in place: a geometry it runs, on an output as
    /// large as the input (or half of it at stride 2).
    fn blocks_in_place(&self) -> bool {
        let same = self.ho == self.h && self.wo == self.w;
        let halved = self.g.stride == [2, 2] && self.h == 2 * self.ho && self.w == 2 * self.wo;
        self.blocks
            .as_ref()
            .is_some_and(|b| b.in_place() && (same || halved))
    }

    /// Whether the plan runs coarsen's tiled dense kernel (which the in-place kernels need).
    fn tiled_kernel(&self) -> bool {
        self.plan.dense_kernel() == Some(DenseKernel::Tiled)
    }

    /// Whether the layer's Winograd kernels multiply only each row class's input channels.
    pub(super) fn sparse_winograd(&self) -> bool {
        self.wino.as_ref().is_some_and(Wino::is_sparse)
    }

    /// Whether a product of `n` columns runs as Winograd: more than `o.few_columns` of them
    /// (batch 1's 8×8 layers, one vector of 16 tiles per image, included).
    fn runs_winograd(&self, n: usize, o: &InferOptions) -> bool {
        self.wino.is_some() && self.tiled_kernel() && o.winograd && n > o.few_columns
    }

    /// Whether a product of `n` columns runs on the kernel that vectorises over output rows:
    /// up to `o.few_columns` columns, or up to [`SMALL_COLS`] where the layer has no in-place
    /// kernel (whose tiles of 16 to 48 columns waste no lanes on such products), and not
    /// where Winograd runs the layer.
    fn runs_small(&self, n: usize, o: &InferOptions) -> bool {
        let most = match self.direct {
            Some(_) => o.few_columns,
            None => SMALL_COLS,
        };
        self.plan.tile_rows().is_some()
            && self.plan.tile_width().is_some()
            && n <= most
            && !self.runs_winograd(n, o)
    }

    /// The narrow kernel's width when a product of `n` columns runs on it (few enough for one
    /// vector register, see `Plan::forward_narrow_rows`).
    fn narrow_width(&self, n: usize, o: &InferOptions) -> Option<usize> {
        self.plan
            .narrow_width()
            .filter(|&nw| n <= nw && self.runs_small(n, o))
    }

    /// The tiled kernel's tile width when a product of `n` columns runs on it as a few whole
    /// tiles made once and shared by the row shares (`Plan::forward_stream_rows` runs each
    /// panel of weights over all of them): few columns that fill their tiles (at most one in
    /// eight lanes idle) and no narrow kernel for them.
    fn stream_width(&self, n: usize, o: &InferOptions) -> Option<usize> {
        if self.narrow_width(n, o).is_some() || !self.runs_small(n, o) {
            return None;
        }
        self.plan
            .tile_width()
            .filter(|&nr| n >= nr && 8 * n.div_ceil(nr) * nr <= 9 * n)
    }

    /// Whether a product of `n` columns runs as an implicit GEMM on the input in place.
    fn runs_direct(&self, n: usize, o: &InferOptions) -> bool {
        self.direct.is_some()
            && self.tiled_kernel()
            && !self.runs_small(n, o)
            && !self.runs_winograd(n, o)
    }

    /// The kernel that runs this layer on batches of `batch` images, in words.
    pub(super) fn kernel_name(&self, batch: usize, o: &InferOptions) -> String {
        let n = batch * self.ho * self.wo;
        // Block kernels that multiply in bfloat16 say so.
        let bf16 = |k: Option<&BlockConv>| {
            if k.is_some_and(BlockConv::bf16) {
                ", bf16"
            } else {
                ""
            }
        };
        if let Some(u) = self.unrolled.as_ref().filter(|_| self.runs_unrolled(batch)) {
            let bf16 = bf16(u.bf16.as_ref());
            format!("unrolled {}{bf16}", self.plan.format())
        } else if self.runs_fused(n, o) {
            let bf16 = bf16(self.fused.as_ref().map(|f| &f.kernel));
            format!("implicit gemm, {}, 1x1 fused{bf16}", self.plan.format())
        } else if self.runs_blocks(n, o) {
            let bf16 = bf16(self.blocks.as_ref());
            format!("implicit gemm, {}{bf16}", self.plan.format())
        } else if self.runs_nm(n) {
            format!("gathered {}", self.plan.format())
        } else if let Some(w) = self.wino.as_ref().filter(|_| self.runs_winograd(n, o)) {
            let k = w.for_columns(n);
            let t = k.tile();
            let classes = if k.is_sparse() { ", row classes" } else { "" };
            format!("winograd F({t}x{t},3x3){classes}")
        } else if self.runs_direct(n, o) {
            "implicit gemm".into()
        } else if self.narrow_width(n, o).is_some() {
            "gemm, one vector of columns".into()
        } else if self.stream_width(n, o).is_some() {
            "gemm, few column tiles".into()
        } else if self.runs_small(n, o) {
            "gemm, few columns".into()
        } else if self.plan.tile_width().is_some() {
            "im2col + tiled gemm".into()
        } else if self.plan.dense_kernel() == Some(DenseKernel::Faer) {
            "im2col + faer gemm".into()
        } else {
            format!("im2col + {}", self.plan.format())
        }
    }

    /// The same layer on other kernels (`plan`, and the in-place kernels): same input, output
    /// and epilogue, reading the im2col rows `read` (all of them when `None`).
    pub(super) fn twin(
        &self,
        plan: Plan,
        direct: Option<DirectConv>,
        wino: Option<Wino>,
        read: Option<Vec<u32>>,
    ) -> Layer {
        Layer {
            name: self.name.clone(),
            plan,
            g: self.g,
            cin: self.cin,
            cout: self.cout,
            h: self.h,
            w: self.w,
            ho: self.ho,
            wo: self.wo,
            bias: self.bias.clone(),
            corr: self.corr.clone(),
            relu: self.relu,
            residual: self.residual,
            read,
            direct,
            wino,
            blocks: None,
            nm: None,
            unrolled: None,
            dense_twin: None,
            fused: None,
        }
    }

    /// The kernel's result `part` (rows `r0 ..`, `nc` columns each) into columns
    /// `c0 .. c0 + nc` of those rows of the output `out` (`rows × n`), through the epilogue.
    fn store(
        &self,
        part: &[f32],
        out: Shared,
        (r0, c0): (usize, usize),
        nc: usize,
        (n, res): (usize, Option<&[f32]>),
    ) {
        for (i, row) in part.chunks(nc.max(1)).enumerate() {
            let r = r0 + i;
            // SAFETY: tasks cover disjoint blocks (rows × columns) of `y`; `r·n + c0 + nc ≤
            // len`, inside the capacity; the values are written, never read, before `set_len`.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.0.add(r * n + c0).cast::<MaybeUninit<f32>>(), nc)
            };
            let res_row = res.map(|q| &q[r * n + c0..][..row.len()]);
            self.epilogue(r, c0, row, res_row, dst);
        }
    }

    /// Output row `r`, columns `c0 ..` of the batch: kernel result `src` plus bias, the
    /// removed-channel correction and the residual's row (`res`, as long as `src`), through
    /// ReLU when fused, into `dst`.
    fn epilogue(
        &self,
        r: usize,
        c0: usize,
        src: &[f32],
        res: Option<&[f32]>,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let b = self.bias[r];
        let act = |v: f32| if self.relu { v.max(0.0) } else { v };
        match (&self.corr, res) {
            (None, None) if self.relu => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &v)| _ = d.write((v + b).max(0.0))),
            (None, None) => dst
                .iter_mut()
                .zip(src)
                .for_each(|(d, &v)| _ = d.write(v + b)),
            (None, Some(q)) => dst
                .iter_mut()
                .zip(src.iter().zip(q))
                .for_each(|(d, (&v, &p))| _ = d.write(act(v + b + p))),
            (Some(c), _) => {
                let hw = self.ho * self.wo;
                let map = &c[r * hw..(r + 1) * hw];
                let mut j = 0;
                while j < src.len() {
                    let at = (c0 + j) % hw;
                    let m = (hw - at).min(src.len() - j);
                    for (i, ((d, &v), &k)) in dst[j..j + m]
                        .iter_mut()
                        .zip(&src[j..j + m])
                        .zip(&map[at..at + m])
                        .enumerate()
                    {
                        let p = res.map_or(0.0, |q| q[j + i]);
                        d.write(act(v + b + k + p));
                    }
                    j += m;
                }
            }
        }
    }
}

/// Tiles of the implicit GEMM up to which a product runs as one column chunk (its tasks split
/// the rows only).
const FEW_DIRECT_TILES: usize = 2;

/// Images from which a layer with an unrolled map runs it ([`Layer::unrolled`]): with fewer
/// (batch 1), the map's weights (16/9 of the layer's for a 3×3 kernel on 2×2 images) are read
/// for too few columns.
const UNROLL_IMAGES: usize = 8;

/// Columns up to which an N:M layer runs its own kernel ([`NmConv`]); more run the plan.
const NM_COLS: usize = 1024;

/// Columns up to which a dense layer runs the kernel that vectorises over output rows.
const SMALL_COLS: usize = 64;

/// Fewest im2col rows per task when one tile of few columns is made in parallel.
const IM2COL_ROWS: usize = 256;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `chunks` of `0 .. n` again in equal shares of whole `unit`s, as many as the threads or a
/// multiple, where they are few (under four per thread) and would leave a thread idle: blocks
/// of 48 Winograd tiles cut ResNet-18's last stage at batch 64 (64 tiles) into 48 and 16, one
/// thread waiting for the other most of the layer (the dense kernel's row shares hid that;
/// row classes are not split by rows).
fn balanced(
    chunks: Vec<(usize, usize)>,
    n: usize,
    unit: usize,
    threads: usize,
) -> Vec<(usize, usize)> {
    let threads = threads.max(1);
    if chunks.len() >= 4 * threads || unit == 0 || !n.is_multiple_of(unit) {
        return chunks;
    }
    let units = n / unit;
    let parts = chunks.len().div_ceil(threads) * threads;
    let parts = parts.min(units).max(1);
    (0..parts)
        .map(|i| (i * units / parts * unit, (i + 1) * units / parts * unit))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Column ranges `[c0, c1)` of an im2col matrix with `n` columns and `kk` rows, cut at whole
/// output rows (`wo` columns) and, where cheap, whole tiles of `nr` columns: about
/// `chunk_floats` values each (so a chunk stays in the cache between im2col and the kernel),
/// at least `min_cols` columns, and at least two per thread.
fn column_chunks(
    n: usize,
    wo: usize,
    nr: usize,
    kk: usize,
    o: &InferOptions,
) -> Vec<(usize, usize)> {
    // Whole output rows, and whole kernel tiles where that costs at most a few rows.
    let (wo, nr) = (wo.max(1), nr.max(1));
    let lcm = wo / gcd(wo, nr) * nr;
    let wo = if lcm <= 4 * wo.max(nr) { lcm } else { wo };
    let threads = rayon::current_num_threads().max(1);
    let want = (o.chunk_floats / kk.max(1)).max(o.min_cols);
    let most = n.div_ceil(2 * threads);
    let cols = (want.min(most).div_ceil(wo) * wo).max(wo);
    (0..n.div_ceil(cols))
        .map(|i| (i * cols, ((i + 1) * cols).min(n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::balanced;

    #[test]
    fn few_chunks_are_cut_in_equal_shares_per_thread() {
        // 64 tiles of 16 columns in blocks of 48 tiles: 48 + 16 becomes 32 + 32.
        assert_eq!(
            balanced(vec![(0, 768), (768, 1024)], 1024, 16, 2),
            vec![(0, 512), (512, 1024)]
        );
        // Six chunks on two threads: six shares of 21 or 22 units, covering everything.
        let six = balanced(
            (0..6)
                .map(|i| (i * 768, ((i + 1) * 768).min(4096)))
                .collect(),
            4096,
            32,
            2,
        );
        assert_eq!(six.len(), 6);
        assert_eq!(six.first().map(|c| c.0), Some(0));
        assert_eq!(six.last().map(|c| c.1), Some(4096));
        for w in six.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        for &(a, b) in &six {
            assert!(a % 32 == 0 && (b - a) / 32 >= 21 && (b - a) / 32 <= 22);
        }
        // Many chunks, fewer units than threads, units that do not divide: unchanged or
        // capped.
        let many: Vec<(usize, usize)> = (0..8).map(|i| (i * 16, (i + 1) * 16)).collect();
        assert_eq!(balanced(many.clone(), 128, 16, 2), many);
        assert_eq!(balanced(vec![(0, 32)], 32, 16, 4), vec![(0, 16), (16, 32)]);
        assert_eq!(balanced(vec![(0, 30)], 30, 16, 2), vec![(0, 30)]);
    }
}
