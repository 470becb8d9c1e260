//! Dynamic sparse training: RigL (unstructured) and DSB / SSB (shuffled blocks, NeurIPS 2022).
//!
//! Both start from ERK layer densities and drop / grow every ΔT steps with the cosine fraction
//! `ζ(t) = α/2·(1 + cos(π·t/T_end))`, while `t < stop·T_end`. RigL drops the smallest weights and
//! grows by the dense gradient, at zero with momentum reset. DSB keeps each blocked layer in
//! shuffled blocks: drops are block-aware (inside the tiles the last extraction chose, only where
//! a whole tile row or column is mostly dropped), growth uses the dense gradient (the DSB code) or
//! the paper's estimate `|∂L/∂W_ij| ≤ ‖dY_i‖·‖U_j‖` from the layer's output gradient and input
//! (a grid of the top rows × top columns, then strips; no dense weight gradient), and
//! coarsen-core's EXTRACT re-clusters the blocks; blocked layers run on packed shuffled-block
//! kernels throughout. Convolutions that cannot be blocked (the first) stay static, as in the DSB
//! code. SSB extracts blocks once and never updates them.

use std::sync::atomic::Ordering;

use candle_core::backprop::GradStore;
use coarsen_core::patterns::{shuffled_blocks, ShuffledConfig};
use coarsen_core::{Mask, MaskSet};
use coarsen_kernels::{Packed, ShuffledBlocks};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::{Model, ParamKind};
use crate::ops::SparseWeight;
use crate::optim::Sgd;
use crate::sparsity::{erk_densities, layer_views, top_magnitude};
use crate::train::Dynamics;

/// How DSB grows connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grow {
    /// By the magnitude of the dense weight gradient of the current batch (the DSB code).
    Gradient,
    /// By the estimate `‖dY_i‖₂·‖U_j‖₂ ≥ |∂L/∂W_ij|` (the paper): `dY_i` is output channel i's
    /// gradient, `U_j` input row j (im2col row for a convolution), both recorded by the backward
    /// pass; growth takes a grid of the top rows × top columns, then strips. No dense gradient.
    Estimate,
}

/// When a mask update happens within its training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateAt {
    /// After the backward pass, before the optimiser step (RigL).
    Backward,
    /// After the optimiser step (the DSB code).
    Step,
}

/// Whether DSB puts linear layers in shuffled blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinearBlocks {
    /// Linear layers of at least b×b are blocked (see [`dsb_blocks`]).
    #[default]
    Blocked,
    /// Linear layers stay unstructured and are updated as RigL does (the DSB code).
    Unstructured,
}

/// Settings shared by RigL and DSB.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicConfig {
    /// Overall sparsity of the sparse layers.
    pub sparsity: f64,
    /// Steps between updates.
    pub delta_t: usize,
    /// `T_end`, the cosine's period, as a fraction of the training steps.
    pub t_end: f64,
    /// Updates stop at this fraction of `T_end` (RigL 1; the DSB CIFAR code 0.5, where the drop
    /// fraction is still α/2).
    pub stop: f64,
    /// Initial drop fraction α.
    pub alpha: f64,
    /// When in the step the masks change.
    pub update: UpdateAt,
}

impl DynamicConfig {
    fn fraction(&self, step: usize, t_end: usize) -> f64 {
        self.alpha / 2.0 * (1.0 + (std::f64::consts::PI * step as f64 / t_end.max(1) as f64).cos())
    }

    fn updates_at(&self, step: usize, t_end: usize) -> bool {
        step > 0
            && step.is_multiple_of(self.delta_t.max(1))
            && (step as f64) < self.stop * t_end as f64
    }
}

/// One sparse layer of a dynamic method.
#[derive(Clone, Debug)]
struct DynLayer {
    name: String,
    rows: usize,
    cols: usize,
    /// Target number of kept weights.
    target: usize,
    /// Shuffled-block tiles `K` (0: not blocked).
    blocks: usize,
    /// Whether the mask changes during training (blocked layers; unblocked linear layers).
    dynamic: bool,
    /// The tiles the last extraction chose: (rows, columns) of each.
    tiles: Vec<Tile>,
}

/// One b×b (or edge-cut) tile: its rows and its columns.
type Tile = (Vec<usize>, Vec<usize>);

fn dense_grad(grads: &GradStore, model: &Model, name: &str) -> Result<Vec<f32>> {
    let p = model
        .param(name)
        .ok_or_else(|| TrainError::config("layer", name, "no such parameter"))?;
    let g = grads
        .get(p.var.as_tensor())
        .ok_or_else(|| TrainError::config("layer", name, "no gradient"))?;
    Ok(g.flatten_all()?.to_vec1::<f32>()?)
}

/// The `k` entries of `candidates` with the largest `score` (ties by index).
fn top_k(candidates: &[usize], score: impl Fn(usize) -> f32, k: usize) -> Vec<usize> {
    let mut c = candidates.to_vec();
    c.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    c.truncate(k);
    c
}

/// RigL: ERK densities (first conv dense), drop by magnitude, grow by dense gradient.
pub struct Rigl {
    cfg: DynamicConfig,
    layers: Vec<DynLayer>,
    t_end: usize,
}

impl Rigl {
    /// Initial masks (random initial weights, so magnitude selection is random) and the method.
    pub fn new(model: &Model, cfg: DynamicConfig, total_steps: usize) -> Result<(Self, MaskSet)> {
        let first_conv = model.weights().position(|p| p.kind == ParamKind::Conv);
        let names: Vec<String> = model
            .weights()
            .enumerate()
            .filter(|&(i, _)| Some(i) != first_conv)
            .map(|(_, p)| p.name.clone())
            .collect();
        let (layers, masks) = init_layers(model, &names, cfg.sparsity, None)?;
        let t_end = (cfg.t_end * total_steps as f64) as usize;
        Ok((Rigl { cfg, layers, t_end }, masks))
    }
}

impl Dynamics for Rigl {
    fn update_at(&self) -> UpdateAt {
        self.cfg.update
    }

    fn update(
        &mut self,
        step: usize,
        model: &Model,
        grads: &GradStore,
        masks: &mut MaskSet,
        opt: &mut Sgd,
    ) -> Result<()> {
        if !self.cfg.updates_at(step, self.t_end) {
            return Ok(());
        }
        let f = self.cfg.fraction(step, self.t_end);
        for l in &self.layers {
            let Some(lm) = masks.get_mut(&l.name) else {
                continue;
            };
            let mut mask = lm.as_bytes().to_vec();
            let mut w = model
                .param(&l.name)
                .map(|p| p.values())
                .transpose()?
                .unwrap_or_default();
            let g = dense_grad(grads, model, &l.name)?;
            let active: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] != 0).collect();
            let k = (f * active.len() as f64).floor() as usize;
            if k == 0 {
                continue;
            }
            let drop = top_k(&active, |i| -w[i].abs(), k);
            for &i in &drop {
                mask[i] = 0;
            }
            let grow = grow_by_score(&mask, |i| g[i].abs(), drop.len());
            apply_drop_and_grow(model, &l.name, &mut mask, &mut w, &grow, opt, true)?;
            lm.replace(&l.name, Mask::from_bytes(l.rows, l.cols, mask)?)?;
        }
        Ok(())
    }
}

/// Marks `grow` active, sets those weights to zero and (`reset_momentum`) resets their momentum,
/// zeroes every weight outside the mask and loads the weights into the model.
fn apply_drop_and_grow(
    model: &Model,
    name: &str,
    mask: &mut [u8],
    weights: &mut [f32],
    grow: &[usize],
    opt: &mut Sgd,
    reset_momentum: bool,
) -> Result<()> {
    for &i in grow {
        mask[i] = 1;
        weights[i] = 0.0;
    }
    if reset_momentum {
        opt.reset_momentum(name, grow);
    }
    for (w, &m) in weights.iter_mut().zip(mask.iter()) {
        if m == 0 {
            *w = 0.0;
        }
    }
    let p = model
        .param(name)
        .ok_or_else(|| TrainError::config("layer", name, "no such parameter"))?;
    p.set_values(weights.to_vec())?;
    Ok(())
}

/// DSB's growth by the gradient estimate `s_ij = ‖dY_i‖·‖U_j‖`: the `k` inactive entries (mask 0)
/// of a grid of the top `b·gx` rows by `‖dY_i‖` × the top `b·gy` columns by `‖U_j‖`, with
/// `D = k/b²` blocks, `gx = round(√(R·D/C))`, `gy = round(√(C·D/R))`; while the grid holds fewer
/// than `k` inactive entries it grows by a strip of b rows or b columns, whichever adds the larger
/// estimate. Of the grid's inactive entries the `k` with the largest `s_ij` grow (ties by index).
/// An entry's score depends on the layer's input and output gradient only, so a row or column
/// that holds no weight at all can grow back.
pub fn grow_by_estimate(
    mask: &[u8],
    rows: usize,
    cols: usize,
    b: usize,
    k: usize,
    output: &[f32],
    input: &[f32],
) -> Vec<usize> {
    if k == 0 || rows == 0 || cols == 0 || output.len() != rows || input.len() != cols {
        return Vec::new();
    }
    let b = b.max(1);
    let by = |v: &[f32]| {
        let mut o: Vec<usize> = (0..v.len()).collect();
        o.sort_by(|&x, &y| v[y].total_cmp(&v[x]).then(x.cmp(&y)));
        o
    };
    let (row_order, col_order) = (by(output), by(input));
    let d = k as f64 / (b * b) as f64;
    let (r, c) = (rows as f64, cols as f64);
    let gx = ((r * d / c).sqrt().round() as usize).max(1);
    let gy = ((c * d / r).sqrt().round() as usize).max(1);
    let mut nr = (b * gx).min(rows);
    let mut nc = (b * gy).min(cols);
    let inactive_in = |r0: usize, r1: usize, c0: usize, c1: usize| -> usize {
        row_order[r0..r1]
            .iter()
            .map(|&i| {
                col_order[c0..c1]
                    .iter()
                    .filter(|&&j| mask[i * cols + j] == 0)
                    .count()
            })
            .sum()
    };
    let mut have = inactive_in(0, nr, 0, nc);
    while have < k && (nr < rows || nc < cols) {
        let sum = |v: &[f32], idx: &[usize]| idx.iter().map(|&i| v[i] as f64).sum::<f64>();
        let row_strip = (nr < rows).then(|| {
            let next = (nr + b).min(rows);
            sum(output, &row_order[nr..next]) * sum(input, &col_order[..nc])
        });
        let col_strip = (nc < cols).then(|| {
            let next = (nc + b).min(cols);
            sum(input, &col_order[nc..next]) * sum(output, &row_order[..nr])
        });
        let rows_win = match (row_strip, col_strip) {
            (Some(x), Some(y)) => x >= y,
            (Some(_), None) => true,
            _ => false,
        };
        if rows_win {
            let next = (nr + b).min(rows);
            have += inactive_in(nr, next, 0, nc);
            nr = next;
        } else {
            let next = (nc + b).min(cols);
            have += inactive_in(0, nr, nc, next);
            nc = next;
        }
    }
    let mut candidates: Vec<(f32, usize)> = Vec::with_capacity(have);
    for &i in &row_order[..nr] {
        for &j in &col_order[..nc] {
            let at = i * cols + j;
            if mask[at] == 0 {
                candidates.push((output[i] * input[j], at));
            }
        }
    }
    candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    candidates.truncate(k);
    let mut grown: Vec<usize> = candidates.into_iter().map(|(_, at)| at).collect();
    grown.sort_unstable();
    grown
}

/// Whether DSB puts a weight of `shape` in shuffled blocks of side `b`: convolutions whose
/// output channels are a multiple of b with at least b input channels (the DSB code), and, unless
/// `linear` says otherwise, linear layers of at least b×b (a last row group or tile cut short by
/// the matrix edge is allowed).
pub fn dsb_blocks(shape: &[usize], b: usize, linear: LinearBlocks) -> bool {
    match *shape {
        [rows, cin, _, _] => rows % b == 0 && cin >= b,
        [rows, cols] => linear == LinearBlocks::Blocked && rows >= b && cols >= b,
        _ => false,
    }
}

/// The `k` entries with mask 0 that score highest (ties by index).
fn grow_by_score(mask: &[u8], score: impl Fn(usize) -> f32, k: usize) -> Vec<usize> {
    let inactive: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 0).collect();
    top_k(&inactive, score, k)
}

/// How [`init_layers`] blocks layers: DSB's block size and its treatment of linear layers.
#[derive(Clone, Copy)]
struct Blocking {
    block: usize,
    linear: LinearBlocks,
    similarity: Option<f64>,
}

/// ERK densities over `names`, masks keeping the largest initial weights, and (with a block
/// size) shuffled blocks for the layers that allow them.
fn init_layers(
    model: &Model,
    names: &[String],
    sparsity: f64,
    blocking: Option<Blocking>,
) -> Result<(Vec<DynLayer>, MaskSet)> {
    if !(sparsity > 0.0 && sparsity < 1.0) {
        return Err(TrainError::config(
            "sparsity",
            sparsity,
            "must lie strictly between 0 and 1",
        ));
    }
    let views = layer_views(model, names, &MaskSet::new())?;
    let shapes: Vec<Vec<usize>> = views.iter().map(|v| v.shape.clone()).collect();
    let dens = erk_densities(&shapes, 1.0 - sparsity);
    let mut layers = Vec::new();
    let mut masks = MaskSet::new();
    for (v, d) in views.iter().zip(dens) {
        let n = v.weights.len();
        let target = ((n as f64 * d).floor() as usize).clamp(1, n);
        let mut mask = top_magnitude(&v.weights, v.view.rows, v.view.cols, target)?;
        let conv = v.shape.len() == 4;
        let mut tiles = Vec::new();
        let blocks = match blocking {
            // Layers DSB cannot block stay unstructured.
            Some(Blocking {
                block: b,
                linear,
                similarity,
            }) if d < 1.0 && dsb_blocks(&v.shape, b, linear) => {
                let k = (d * n as f64 / (b * b) as f64).ceil() as usize;
                let out = shuffled_blocks(
                    &mask,
                    Some(&v.weights),
                    None,
                    &ShuffledConfig {
                        block: b,
                        blocks: Some(k),
                        similarity,
                        kernels: false,
                    },
                )?;
                tiles = tiles_of(&out);
                mask = out.mask;
                k
            }
            _ => 0,
        };
        layers.push(DynLayer {
            name: v.name.clone(),
            rows: v.view.rows,
            cols: v.view.cols,
            target,
            blocks,
            // Blocked layers change; of the others, DSB keeps convolutions static (the first
            // conv) and updates linear layers unstructured. RigL updates every layer.
            dynamic: blocking.is_none() || blocks > 0 || !conv,
            tiles,
        });
        masks.insert(v.name.clone(), &v.shape, mask)?;
    }
    Ok((layers, masks))
}

/// The tiles of an extraction as (rows, columns).
fn tiles_of(out: &coarsen_core::patterns::ShuffledOutcome) -> Vec<Tile> {
    out.tiles
        .iter()
        .map(|(g, cols)| (out.groups[*g].clone(), cols.clone()))
        .collect()
}

/// DSB (and SSB with `static_blocks`): dynamic shuffled-block sparse training.
pub struct Dsb {
    cfg: DynamicConfig,
    block: usize,
    grow: Grow,
    static_blocks: bool,
    similarity: Option<f64>,
    layers: Vec<DynLayer>,
    t_end: usize,
}

/// Settings of DSB.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DsbConfig {
    /// Shared dynamic settings.
    pub dynamic: DynamicConfig,
    /// Block size b.
    pub block: usize,
    /// Growth criterion.
    pub grow: Grow,
    /// SSB: blocks extracted once, never updated.
    pub static_blocks: bool,
    /// Whether linear layers are blocked.
    pub linear: LinearBlocks,
    /// The row-similarity threshold q of the extraction's clustering (`None`: R/b clusters).
    #[serde(default)]
    pub similarity: Option<f64>,
}

/// What a DSB checkpoint keeps besides the masks: the tiles of every blocked layer.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DsbState {
    tiles: std::collections::BTreeMap<String, Vec<Tile>>,
}

impl Dsb {
    /// Initial masks and the method; blocked layers are switched to packed kernels.
    pub fn new(model: &Model, cfg: DsbConfig, total_steps: usize) -> Result<(Self, MaskSet)> {
        if cfg.block == 0 {
            return Err(TrainError::config("block", 0, "must be at least 1"));
        }
        // DSB sparsifies every conv and linear layer (ERK over all of them).
        let names: Vec<String> = model.weights().map(|p| p.name.clone()).collect();
        let blocking = Blocking {
            block: cfg.block,
            linear: cfg.linear,
            similarity: cfg.similarity,
        };
        let (layers, masks) = init_layers(model, &names, cfg.dynamic.sparsity, Some(blocking))?;
        let t_end = (cfg.dynamic.t_end * total_steps as f64) as usize;
        let d = Dsb {
            cfg: cfg.dynamic,
            block: cfg.block,
            grow: cfg.grow,
            static_blocks: cfg.static_blocks,
            similarity: cfg.similarity,
            layers,
            t_end,
        };
        d.attach_kernels(model, &masks)?;
        Ok((d, masks))
    }

    /// Names of the layers in shuffled blocks.
    pub fn blocked_layers(&self) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.blocks > 0)
            .map(|l| l.name.clone())
            .collect()
    }

    /// Switches every blocked layer's kernel to a packed shuffled-block plan of its mask.
    fn attach_kernels(&self, model: &Model, masks: &MaskSet) -> Result<()> {
        for l in self.layers.iter().filter(|l| l.blocks > 0) {
            let p = model
                .param(&l.name)
                .ok_or_else(|| TrainError::config("layer", &l.name, "no such parameter"))?;
            let mask = masks
                .get(&l.name)
                .ok_or_else(|| TrainError::config("layer", &l.name, "a blocked layer has no mask"))?
                .mask();
            let packed = Packed::Shuffled(ShuffledBlocks::pack(mask, &p.values()?, self.block)?);
            if let Some(k) = &p.kernel {
                k.set_sparse(Some(SparseWeight::new(&packed)?));
            }
        }
        Ok(())
    }

    /// Block-aware filter: of the entries in `drop`, keep those whose row or column inside
    /// their tile (as the last extraction chose it) holds at least half of the tile's side in
    /// drops. Entries outside every tile are kept as drops.
    fn block_filter(tiles: &[Tile], len: usize, cols: usize, drop: &[usize]) -> Vec<usize> {
        let mut dropped = vec![false; len];
        drop.iter().for_each(|&i| dropped[i] = true);
        let mut in_tile = vec![false; len];
        let mut keep = Vec::new();
        for (rows, tcols) in tiles {
            let mut rc = vec![0usize; rows.len()];
            let mut cc = vec![0usize; tcols.len()];
            for (i, &r) in rows.iter().enumerate() {
                for (j, &c) in tcols.iter().enumerate() {
                    in_tile[r * cols + c] = true;
                    if dropped[r * cols + c] {
                        rc[i] += 1;
                        cc[j] += 1;
                    }
                }
            }
            // Half of the tile's side along the counted direction: a row holds tcols.len()
            // entries, a column rows.len().
            let (row_half, col_half) = (tcols.len().div_ceil(2), rows.len().div_ceil(2));
            for (i, &r) in rows.iter().enumerate() {
                for (j, &c) in tcols.iter().enumerate() {
                    let at = r * cols + c;
                    if dropped[at] && (rc[i] >= row_half || cc[j] >= col_half) {
                        keep.push(at);
                    }
                }
            }
        }
        keep.extend(drop.iter().copied().filter(|&i| !in_tile[i]));
        keep.sort_unstable();
        keep.dedup();
        keep
    }
}

impl Dynamics for Dsb {
    fn before_step(&mut self, step: usize, model: &Model) -> Result<()> {
        let update = !self.static_blocks && self.cfg.updates_at(step, self.t_end);
        for l in &self.layers {
            if let Some(k) = model.param(&l.name).and_then(|p| p.kernel.clone()) {
                // A blocked layer's kernel computes the weight gradient on its tiles only: the
                // gradient criterion needs it dense; the estimate needs the layer's norms.
                let dense = update && l.blocks > 0 && self.grow == Grow::Gradient;
                let estimate = update && l.dynamic && self.grow == Grow::Estimate;
                k.dense_grad.store(dense, Ordering::Relaxed);
                k.estimate.store(estimate, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn update_at(&self) -> UpdateAt {
        self.cfg.update
    }

    fn update(
        &mut self,
        step: usize,
        model: &Model,
        grads: &GradStore,
        masks: &mut MaskSet,
        opt: &mut Sgd,
    ) -> Result<()> {
        if self.static_blocks || !self.cfg.updates_at(step, self.t_end) {
            return Ok(());
        }
        let zeta = self.cfg.fraction(step, self.t_end);
        let block = self.block;
        let grow_by = self.grow;
        for l in self.layers.iter_mut().filter(|l| l.dynamic) {
            let Some(lm) = masks.get_mut(&l.name) else {
                continue;
            };
            let param = model
                .param(&l.name)
                .ok_or_else(|| TrainError::config("layer", &l.name, "no such parameter"))?;
            // Taken on every update step, so that no stale norms survive to the next.
            let norms = param.kernel.as_ref().and_then(|k| k.take_norms());
            let mut bytes = lm.as_bytes().to_vec();
            let mut w = param.values()?;
            let active: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
            let n = active.len();
            let keep = l.target.saturating_sub((n as f64 * zeta).floor() as usize);
            if n <= keep {
                continue;
            }
            let mut drop = top_k(&active, |i| -w[i].abs(), n - keep);
            if l.blocks > 0 {
                drop = Self::block_filter(&l.tiles, bytes.len(), l.cols, &drop);
            }
            if drop.is_empty() {
                continue;
            }
            for &i in &drop {
                bytes[i] = 0;
            }
            let grown = match grow_by {
                Grow::Gradient => {
                    let g = dense_grad(grads, model, &l.name)?;
                    grow_by_score(&bytes, |i| g[i].abs(), drop.len())
                }
                Grow::Estimate => {
                    let norms = norms.ok_or_else(|| {
                        TrainError::config(
                            "layer",
                            &l.name,
                            "no gradient estimate was recorded in the update step's backward pass",
                        )
                    })?;
                    grow_by_estimate(
                        &bytes,
                        l.rows,
                        l.cols,
                        block,
                        drop.len(),
                        &norms.output,
                        &norms.input,
                    )
                }
            };
            // DSB's code keeps the momentum of grown weights (RigL resets it).
            apply_drop_and_grow(model, &l.name, &mut bytes, &mut w, &grown, opt, false)?;
            if l.blocks > 0 {
                let mask = Mask::from_bytes(l.rows, l.cols, bytes.clone())?;
                let mut gm = vec![0u8; mask.len()];
                grown.iter().for_each(|&i| gm[i] = 1);
                let grown_mask = Mask::from_bytes(l.rows, l.cols, gm)?;
                let cfg = ShuffledConfig {
                    block,
                    blocks: Some(l.blocks),
                    similarity: self.similarity,
                    kernels: false,
                };
                let out = shuffled_blocks(&mask, Some(&w), Some(&grown_mask), &cfg)?;
                for (wi, &m) in w.iter_mut().zip(out.mask.as_bytes()) {
                    if m == 0 {
                        *wi = 0.0;
                    }
                }
                param.set_values(w)?;
                l.tiles = tiles_of(&out);
                bytes = out.mask.into_bytes();
            }
            lm.replace(&l.name, Mask::from_bytes(l.rows, l.cols, bytes)?)?;
        }
        self.attach_kernels(model, masks)?;
        Ok(())
    }

    fn save(&self) -> serde_json::Value {
        let state = DsbState {
            tiles: self
                .layers
                .iter()
                .filter(|l| l.blocks > 0)
                .map(|l| (l.name.clone(), l.tiles.clone()))
                .collect(),
        };
        serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
    }

    fn load(&mut self, state: &serde_json::Value, _model: &Model) -> Result<()> {
        if state.is_null() {
            return Ok(());
        }
        let state: DsbState = serde_json::from_value(state.clone()).map_err(|e| {
            TrainError::config("dynamics", "checkpoint state", format!("unreadable: {e}"))
        })?;
        for l in self.layers.iter_mut().filter(|l| l.blocks > 0) {
            let Some(tiles) = state.tiles.get(&l.name) else {
                continue;
            };
            // Checked: a checkpoint is read from disk.
            let fits = tiles
                .iter()
                .all(|(r, c)| r.iter().all(|&i| i < l.rows) && c.iter().all(|&j| j < l.cols));
            if !fits {
                return Err(TrainError::config(
                    "dynamics",
                    &l.name,
                    format!("a saved tile lies outside the {}x{} weight", l.rows, l.cols),
                ));
            }
            l.tiles = tiles.clone();
        }
        Ok(())
    }
}

impl Dsb {
    /// Rebuilds the packed kernels from restored masks (after a resume).
    pub fn restore(&self, model: &Model, masks: &MaskSet) -> Result<()> {
        self.attach_kernels(model, masks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_fraction_and_update_steps() {
        let mut c = DynamicConfig {
            sparsity: 0.8,
            delta_t: 10,
            t_end: 0.5,
            stop: 1.0,
            alpha: 0.3,
            update: UpdateAt::Backward,
        };
        assert!((c.fraction(0, 100) - 0.3).abs() < 1e-12);
        assert!((c.fraction(50, 100) - 0.15).abs() < 1e-12);
        assert!(
            c.updates_at(10, 100)
                && !c.updates_at(0, 100)
                && !c.updates_at(15, 100)
                && !c.updates_at(100, 100)
                && c.updates_at(90, 100)
        );
        // DSB's window: updates stop at T_end/2, where the fraction is still α/2.
        c.stop = 0.5;
        assert!(c.updates_at(40, 100) && !c.updates_at(50, 100) && !c.updates_at(60, 100));
        assert_eq!(
            top_k(&[0, 1, 2, 3], |i| [1.0, 5.0, 3.0, 5.0][i], 2),
            vec![1, 3]
        );
    }

    /// The estimate scores an entry by its row's output gradient and its column's input, so a
    /// column that drop emptied (and whose weight gradient on the tiles is therefore absent)
    /// grows back when its input is large; the old weight-gradient norms scored it 0.
    #[test]
    fn an_emptied_column_grows_back_by_estimate() {
        let (rows, cols, b) = (8, 12, 4);
        // Every column active except column 5, which drop emptied.
        let mut mask = vec![1u8; rows * cols];
        for r in 0..rows {
            mask[r * cols + 5] = 0;
        }
        // Some other inactive entries with a small input norm.
        for c in [0, 1] {
            mask[c] = 0;
        }
        let output: Vec<f32> = (0..rows).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut input = vec![0.5f32; cols];
        input[5] = 3.0;
        let grown = grow_by_estimate(&mask, rows, cols, b, rows, &output, &input);
        assert_eq!(grown.len(), rows);
        assert!(grown.iter().all(|&i| i % cols == 5), "{grown:?}");
        // Grown entries are inactive ones, never active weights.
        assert!(grown.iter().all(|&i| mask[i] == 0));
    }

    /// The grid starts at the top `b·gx` rows × `b·gy` columns and grows by strips until it holds
    /// `k` inactive entries; the `k` best of those grow.
    #[test]
    fn estimate_grows_a_grid_then_strips() {
        let (rows, cols, b) = (32, 32, 4);
        let mask = vec![0u8; rows * cols];
        let output: Vec<f32> = (0..rows).map(|i| (rows - i) as f32).collect();
        let input: Vec<f32> = (0..cols).map(|j| (cols - j) as f32).collect();
        // k = 16 = one b×b block: gx = gy = 1, the 4×4 corner of top rows and columns.
        let grown = grow_by_estimate(&mask, rows, cols, b, 16, &output, &input);
        assert_eq!(
            grown,
            (0..4)
                .flat_map(|i| (0..4).map(move |j| i * cols + j))
                .collect::<Vec<_>>()
        );
        // A grid already full of active weights grows by strips instead of giving up.
        let mut full = vec![0u8; rows * cols];
        for i in 0..8 {
            for j in 0..8 {
                full[i * cols + j] = 1;
            }
        }
        let grown = grow_by_estimate(&full, rows, cols, b, 16, &output, &input);
        assert_eq!(grown.len(), 16);
        assert!(grown.iter().all(|&i| full[i] == 0));
        // Fewer inactive entries than asked: all of them.
        let mut almost = vec![1u8; rows * cols];
        almost[7] = 0;
        almost[100] = 0;
        assert_eq!(
            grow_by_estimate(&almost, rows, cols, b, 16, &output, &input),
            vec![7, 100]
        );
        // Mismatched norms grow nothing rather than index out of range.
        assert!(grow_by_estimate(&mask, rows, cols, b, 4, &output[..3], &input).is_empty());
    }

    /// The block-aware drop rule counts drops inside the tiles the extraction chose (columns in
    /// any order), not inside tiles re-cut from the mask in column order.
    #[test]
    fn block_filter_uses_the_extracted_tiles() {
        let (rows, cols) = (4, 8);
        let tiles: Vec<Tile> = vec![
            ((0..4).collect(), vec![0, 2, 4, 6]),
            ((0..4).collect(), vec![1, 3, 5, 7]),
        ];
        // Row 0 drops columns 0 and 4: half of the first tile's row (kept as drops), but one
        // drop in each of the column-order tiles [0..4) and [4..8) (which would keep neither).
        let drop = vec![0, 4];
        assert_eq!(
            Dsb::block_filter(&tiles, rows * cols, cols, &drop),
            vec![0, 4]
        );
        let recut: Vec<Tile> = vec![
            ((0..4).collect(), vec![0, 1, 2, 3]),
            ((0..4).collect(), vec![4, 5, 6, 7]),
        ];
        assert!(Dsb::block_filter(&recut, rows * cols, cols, &drop).is_empty());
        // An isolated drop survives only outside every tile.
        assert!(Dsb::block_filter(&tiles, rows * cols, cols, &[9]).is_empty());
        let one_tile: Vec<Tile> = vec![((0..4).collect(), vec![0, 2, 4, 6])];
        assert_eq!(
            Dsb::block_filter(&one_tile, rows * cols, cols, &[9]),
            vec![9]
        );
    }

    /// The tiles a checkpoint restores are read from disk: a tile outside its weight, or state
    /// that is not DSB's, is a clear error; null state (an older checkpoint) keeps the tiles.
    #[test]
    fn restored_tiles_are_checked() {
        let spec = crate::model::ModelSpec {
            name: "cnn".into(),
            width: 0.5,
            input: [1, 8, 8],
            classes: 4,
        };
        let model = Model::new(&spec, 0).unwrap();
        let cfg = DsbConfig {
            dynamic: DynamicConfig {
                sparsity: 0.8,
                delta_t: 1,
                t_end: 1.0,
                stop: 1.0,
                alpha: 0.3,
                update: UpdateAt::Step,
            },
            block: 4,
            grow: Grow::Estimate,
            static_blocks: false,
            linear: LinearBlocks::Blocked,
            similarity: None,
        };
        let (mut dsb, _) = Dsb::new(&model, cfg, 10).unwrap();
        let saved = dsb.save();
        dsb.load(&saved, &model).unwrap();
        dsb.load(&serde_json::Value::Null, &model).unwrap();
        let name = dsb.blocked_layers()[0].clone();
        let bad = serde_json::json!({ "tiles": { name.clone(): [[[0, 1_000_000], [0]]] } });
        let err = dsb.load(&bad, &model).unwrap_err().to_string();
        assert!(err.contains("outside") && err.contains(&name), "{err}");
        let err = dsb
            .load(&serde_json::json!({ "tiles": 3 }), &model)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unreadable"), "{err}");
    }
}
