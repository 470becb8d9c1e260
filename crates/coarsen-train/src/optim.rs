//! SGD with momentum and weight decay, learning-rate schedules with warm-up, and masks that keep
//! pruned weights at exactly zero.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use coarsen_core::MaskSet;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::Model;

/// Learning-rate decay over the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// No decay.
    Constant,
    /// Multiply by `gamma` at each milestone (a fraction of the run, e.g. 0.5 and 0.75).
    Step {
        /// Fractions of the run.
        milestones: Vec<f64>,
        /// Factor.
        gamma: f64,
    },
    /// Cosine decay to zero.
    Cosine,
}

/// The learning rate of every step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub base: f64,
    /// Decay.
    pub schedule: Schedule,
    /// Linear warm-up steps from `base / warmup` to `base`.
    pub warmup_steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
}

impl LrSchedule {
    /// The learning rate at `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = (step - self.warmup_steps) as f64 / span;
        match &self.schedule {
            Schedule::Constant => self.base,
            Schedule::Step { milestones, gamma } => {
                let passed = milestones
                    .iter()
                    .filter(|&&m| step as f64 >= m * self.total_steps as f64)
                    .count();
                self.base * gamma.powi(passed as i32)
            }
            Schedule::Cosine => self.base * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()),
        }
    }
}

/// SGD with momentum, weight decay and optional Nesterov momentum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    /// Momentum.
    pub momentum: f32,
    /// L2 weight decay.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Momentum buffers by parameter name.
    #[serde(skip)]
    pub buffers: BTreeMap<String, Vec<f32>>,
}

impl Sgd {
    /// A new optimiser with empty momentum.
    pub fn new(momentum: f32, weight_decay: f32, nesterov: bool) -> Self {
        Sgd {
            momentum,
            weight_decay,
            nesterov,
            buffers: BTreeMap::new(),
        }
    }

    /// One step: `g ← (∇ + wd·w)⊙m`, `buf ← μ·buf + g`, `w ← (w − lr·buf)⊙m`.
    pub fn step(
        &mut self,
        model: &Model,
        grads: &GradStore,
        masks: &MaskSet,
        lr: f64,
    ) -> Result<()> {
        let lr = lr as f32;
        for p in &model.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let mut g = g.flatten_all()?.to_vec1::<f32>()?;
            let mut w = p.values()?;
            let mask = masks.get(&p.name).map(|m| m.as_bytes());
            if let Some(m) = mask {
                if m.len() != w.len() {
                    return Err(TrainError::config(
                        "mask",
                        &p.name,
                        format!("{} entries for a weight of {}", m.len(), w.len()),
                    ));
                }
            }
            for i in 0..w.len() {
                g[i] += self.weight_decay * w[i];
            }
            if let Some(m) = mask {
                for (gi, &mi) in g.iter_mut().zip(m) {
                    if mi == 0 {
                        *gi = 0.0;
                    }
                }
            }
            let buf = self
                .buffers
                .entry(p.name.clone())
                .or_insert_with(|| vec![0.0; w.len()]);
            for i in 0..w.len() {
                buf[i] = self.momentum * buf[i] + g[i];
                let d = if self.nesterov {
                    g[i] + self.momentum * buf[i]
                } else {
                    buf[i]
                };
                w[i] -= lr * d;
            }
            if let Some(m) = mask {
                for (wi, &mi) in w.iter_mut().zip(m) {
                    if mi == 0 {
                        *wi = 0.0;
                    }
                }
            }
            p.set_values(w)?;
        }
        Ok(())
    }

    /// Zeroes the momentum of the given entries of a parameter (RigL resets it for grown
    /// weights).
    pub fn reset_momentum(&mut self, name: &str, entries: &[usize]) {
        if let Some(buf) = self.buffers.get_mut(name) {
            for &i in entries {
                if let Some(b) = buf.get_mut(i) {
                    *b = 0.0;
                }
            }
        }
    }
}

/// Sets masked-out weights to zero.
pub fn apply_masks(model: &Model, masks: &MaskSet) -> Result<()> {
    for (name, m) in masks.iter() {
        let p = model
            .param(name)
            .ok_or_else(|| TrainError::config("mask", name, "the model has no such parameter"))?;
        let mut w = p.values()?;
        m.apply(name, &mut w)?;
        p.set_values(w)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let mut s = LrSchedule {
            base: 0.1,
            schedule: Schedule::Cosine,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-9);
        assert!(s.lr(109) < 0.001);
        s.schedule = Schedule::Step {
            milestones: vec![0.5, 0.75],
            gamma: 0.1,
        };
        s.warmup_steps = 0;
        assert!((s.lr(54) - 0.1).abs() < 1e-12);
        assert!((s.lr(55) - 0.01).abs() < 1e-12);
        assert!((s.lr(83) - 0.001).abs() < 1e-12);
    }
}
