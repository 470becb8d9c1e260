//! Dynamic sparse training: RigL (unstructured) and DSB / SSB (shuffled blocks, NeurIPS 2022).
//!
//! Both start from ERK layer densities and drop / grow every ΔT steps with the cosine fraction
//! `ζ(t) = α/2·(1 + cos(π·t/T_end))`. RigL drops the smallest weights and grows by the dense
//! gradient, at zero with momentum reset. DSB keeps each blocked conv layer in shuffled blocks:
//! drops are block-aware (only where a whole block row or column is mostly dropped), growth uses
//! the dense gradient (or its Cauchy–Schwarz estimate ‖dY_i‖·‖X_j‖), and coarsen-core's EXTRACT
//! re-clusters the blocks; blocked layers run on packed shuffled-block kernels throughout. SSB
//! extracts blocks once and never updates them.

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
    /// By the estimate `‖dY_i‖₂·‖X_j‖₂ ≥ |∂L/∂W_ij|` (the paper), without a dense gradient.
    Estimate,
}

/// Settings shared by RigL and DSB.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicConfig {
    /// Overall sparsity of the sparse layers.
    pub sparsity: f64,
    /// Steps between updates.
    pub delta_t: usize,
    /// Updates stop at this fraction of the training steps.
    pub t_end: f64,
    /// Initial drop fraction α.
    pub alpha: f64,
}

impl DynamicConfig {
    fn fraction(&self, step: usize, t_end: usize) -> f64 {
        self.alpha / 2.0 * (1.0 + (std::f64::consts::PI * step as f64 / t_end.max(1) as f64).cos())
    }

    fn updates_at(&self, step: usize, t_end: usize) -> bool {
        step > 0 && step.is_multiple_of(self.delta_t.max(1)) && step < t_end
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
}

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

/// Drops the `drop` smallest active weights (ties by index) and grows as many of the inactive
/// entries (just-dropped ones included) with the largest `grow_score`; grown weights are set to
/// zero and (`reset_momentum`) their momentum reset. Returns the grown entries.
#[allow(clippy::too_many_arguments)]
fn drop_and_grow(
    model: &Model,
    name: &str,
    mask: &mut [u8],
    weights: &mut [f32],
    drop: &[usize],
    grow_score: &dyn Fn(usize) -> f32,
    opt: &mut Sgd,
    reset_momentum: bool,
) -> Result<Vec<usize>> {
    for &i in drop {
        mask[i] = 0;
    }
    let inactive: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 0).collect();
    let grown = top_k(&inactive, grow_score, drop.len());
    for &i in &grown {
        mask[i] = 1;
        weights[i] = 0.0;
    }
    if reset_momentum {
        opt.reset_momentum(name, &grown);
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
    Ok(grown)
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
    fn after_backward(
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
            drop_and_grow(
                model,
                &l.name,
                &mut mask,
                &mut w,
                &drop,
                &|i| g[i].abs(),
                opt,
                true,
            )?;
            lm.replace(&l.name, Mask::from_bytes(l.rows, l.cols, mask)?)?;
        }
        Ok(())
    }
}

/// ERK densities over `names`, masks keeping the largest initial weights, and (with a block
/// size) shuffled blocks for the conv layers that allow them.
fn init_layers(
    model: &Model,
    names: &[String],
    sparsity: f64,
    block: Option<usize>,
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
        let blocks = match block {
            // DSB blocks conv layers whose output channels are a multiple of b and whose input
            // channels are at least b; others (and linear layers) stay unstructured.
            Some(b)
                if v.shape.len() == 4
                    && v.view.rows % b == 0
                    && v.view.in_channels >= b
                    && d < 1.0 =>
            {
                let k = (d * n as f64 / (b * b) as f64).ceil() as usize;
                mask = shuffled_blocks(
                    &mask,
                    Some(&v.weights),
                    None,
                    &ShuffledConfig {
                        block: b,
                        blocks: Some(k),
                    },
                )?
                .mask;
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
        });
        masks.insert(v.name.clone(), &v.shape, mask)?;
    }
    Ok((layers, masks))
}

/// DSB (and SSB with `static_blocks`): dynamic shuffled-block sparse training.
pub struct Dsb {
    cfg: DynamicConfig,
    block: usize,
    grow: Grow,
    static_blocks: bool,
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
}

impl Dsb {
    /// Initial masks and the method; blocked layers are switched to packed kernels.
    pub fn new(model: &Model, cfg: DsbConfig, total_steps: usize) -> Result<(Self, MaskSet)> {
        if cfg.block == 0 {
            return Err(TrainError::config("block", 0, "must be at least 1"));
        }
        // DSB sparsifies every conv and linear layer (ERK over all of them).
        let names: Vec<String> = model.weights().map(|p| p.name.clone()).collect();
        let (layers, masks) = init_layers(model, &names, cfg.dynamic.sparsity, Some(cfg.block))?;
        let t_end = (cfg.dynamic.t_end * total_steps as f64) as usize;
        let d = Dsb {
            cfg: cfg.dynamic,
            block: cfg.block,
            grow: cfg.grow,
            static_blocks: cfg.static_blocks,
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
    /// their b×b tile holds at least b/2 of the tile's drops.
    fn block_filter(&self, mask: &Mask, drop: &[usize]) -> Result<Vec<usize>> {
        let b = self.block;
        let cols = mask.cols();
        let packed = ShuffledBlocks::pack(mask, &vec![0.0; mask.len()], b)?;
        let mut dropped = vec![false; mask.len()];
        drop.iter().for_each(|&i| dropped[i] = true);
        let mut keep = Vec::new();
        for g in packed.groups() {
            for t in g.tiles() {
                let mut rc = vec![0usize; g.rows().len()];
                let mut cc = vec![0usize; t.cols().len()];
                for (i, &r) in g.rows().iter().enumerate() {
                    for (j, &c) in t.cols().iter().enumerate() {
                        if dropped[r as usize * cols + c as usize] {
                            rc[i] += 1;
                            cc[j] += 1;
                        }
                    }
                }
                let half = b.div_ceil(2);
                for (i, &r) in g.rows().iter().enumerate() {
                    for (j, &c) in t.cols().iter().enumerate() {
                        let at = r as usize * cols + c as usize;
                        if dropped[at] && (rc[i] >= half || cc[j] >= half) {
                            keep.push(at);
                        }
                    }
                }
            }
        }
        keep.sort_unstable();
        Ok(keep)
    }
}

impl Dynamics for Dsb {
    fn before_step(&mut self, step: usize, model: &Model) -> Result<()> {
        let update = !self.static_blocks
            && self.cfg.updates_at(step, self.t_end)
            && self.grow == Grow::Gradient;
        for l in self.layers.iter().filter(|l| l.blocks > 0) {
            if let Some(k) = model.param(&l.name).and_then(|p| p.kernel.clone()) {
                k.dense_grad.store(update, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn after_backward(
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
        for l in &self.layers {
            let Some(lm) = masks.get_mut(&l.name) else {
                continue;
            };
            let mut bytes = lm.as_bytes().to_vec();
            let mut w = model
                .param(&l.name)
                .map(|p| p.values())
                .transpose()?
                .unwrap_or_default();
            let g = dense_grad(grads, model, &l.name)?;
            let active: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
            let n = active.len();
            let keep = l.target.saturating_sub((n as f64 * zeta).floor() as usize);
            if n <= keep {
                continue;
            }
            let mut drop = top_k(&active, |i| -w[i].abs(), n - keep);
            if l.blocks > 0 {
                let mask = Mask::from_bytes(l.rows, l.cols, bytes.clone())?;
                drop = self.block_filter(&mask, &drop)?;
            }
            if drop.is_empty() {
                continue;
            }
            let score: Box<dyn Fn(usize) -> f32> = match self.grow {
                Grow::Gradient => Box::new(|i: usize| g[i].abs()),
                Grow::Estimate => {
                    // ‖dY_i‖·‖X_j‖ bounds |∂L/∂W_ij|; with masked weights the gradient of row i
                    // at column j is dY_i·X_j, whose row/column norms are those of the gradient.
                    let (r, c) = (l.rows, l.cols);
                    let row: Vec<f32> = (0..r)
                        .map(|i| {
                            g[i * c..(i + 1) * c]
                                .iter()
                                .map(|v| v * v)
                                .sum::<f32>()
                                .sqrt()
                        })
                        .collect();
                    let col: Vec<f32> = (0..c)
                        .map(|j| {
                            (0..r)
                                .map(|i| g[i * c + j] * g[i * c + j])
                                .sum::<f32>()
                                .sqrt()
                        })
                        .collect();
                    Box::new(move |i: usize| row[i / c] * col[i % c])
                }
            };
            // DSB's code keeps the momentum of grown weights (RigL resets it).
            let grown = drop_and_grow(
                model, &l.name, &mut bytes, &mut w, &drop, &*score, opt, false,
            )?;
            if l.blocks > 0 {
                let mask = Mask::from_bytes(l.rows, l.cols, bytes.clone())?;
                let grown_mask = {
                    let mut gm = vec![0u8; mask.len()];
                    grown.iter().for_each(|&i| gm[i] = 1);
                    Mask::from_bytes(l.rows, l.cols, gm)?
                };
                let cfg = ShuffledConfig {
                    block: self.block,
                    blocks: Some(l.blocks),
                };
                let out = shuffled_blocks(&mask, Some(&w), Some(&grown_mask), &cfg)?;
                for (wi, &m) in w.iter_mut().zip(out.mask.as_bytes()) {
                    if m == 0 {
                        *wi = 0.0;
                    }
                }
                if let Some(p) = model.param(&l.name) {
                    p.set_values(w)?;
                }
                bytes = out.mask.into_bytes();
            }
            lm.replace(&l.name, Mask::from_bytes(l.rows, l.cols, bytes)?)?;
        }
        self.attach_kernels(model, masks)?;
        Ok(())
    }

    fn load(&mut self, _state: &serde_json::Value, _model: &Model) -> Result<()> {
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
        let c = DynamicConfig {
            sparsity: 0.8,
            delta_t: 10,
            t_end: 0.5,
            alpha: 0.3,
        };
        assert!((c.fraction(0, 100) - 0.3).abs() < 1e-12);
        assert!((c.fraction(50, 100) - 0.15).abs() < 1e-12);
        assert!(
            c.updates_at(10, 100)
                && !c.updates_at(0, 100)
                && !c.updates_at(15, 100)
                && !c.updates_at(100, 100)
        );
        assert_eq!(
            top_k(&[0, 1, 2, 3], |i| [1.0, 5.0, 3.0, 5.0][i], 2),
            vec![1, 3]
        );
    }
}
