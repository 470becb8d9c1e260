//! The training loop: epochs of SGD over shuffled, augmented batches, masks kept, evaluation,
//! metrics as JSON lines, and a checkpoint after every epoch from which a run resumes exactly.
//!
//! A method is a sequence of stages (IMP round r is stage r). Each stage trains the model for the
//! recipe's epochs; the checkpoint records the stage, the epoch and everything the next epoch
//! depends on — weights, BatchNorm statistics, masks, momentum, the sparse method's state —
//! while data order and augmentation are functions of (seed, stage, epoch, batch) alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use coarsen_core::MaskSet;
use serde::{Deserialize, Serialize};

use crate::data::{epoch_order, make_batch, Augment, Batch, DataSplits, Images};
use crate::dynamic::UpdateAt;
use crate::error::{Result, TrainError};
use crate::model::{Model, NamedTensor, ShapedValues};
use crate::optim::{apply_masks, LrSchedule, Schedule, Sgd};

/// How to train: epochs, batch, optimiser, schedule, augmentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Epochs per training run (per IMP round).
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Learning-rate decay.
    pub schedule: Schedule,
    /// Linear warm-up, in epochs; at most [`MAX_WARMUP_FRACTION`] of a run.
    pub warmup_epochs: f64,
    /// Training augmentation (none when absent).
    pub augment: Option<Augment>,
    /// Training images held out for validation.
    pub val_split: usize,
    /// Batch size of evaluation.
    pub eval_batch: usize,
    /// Stop an epoch after this many batches (quick runs and tests); all when absent.
    pub max_batches: Option<usize>,
    /// Train on the first this many training images only (quick runs, the demo); all when
    /// absent.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Evaluate validation and test accuracy after every epoch (otherwise after the last epoch
    /// of each stage only).
    #[serde(default = "yes")]
    pub eval_every_epoch: bool,
    /// IMP rewinds to the weights at the start of this epoch of the dense run (the paper: 5% of
    /// training).
    pub rewind_epoch: usize,
}

/// The warm-up never takes more than this fraction of a run's steps, so that a short run (one
/// epoch of a recipe with a one-epoch warm-up) still trains at its peak rate most of the time.
pub const MAX_WARMUP_FRACTION: f64 = 0.2;

impl Recipe {
    /// The default recipe for the data set in `dir`: CIFAR's for CIFAR-10; Fashion-MNIST's for
    /// Fashion-MNIST (a directory named like it); for other MNIST-format data (digits, whose
    /// mirror images are other symbols or none) Fashion-MNIST's without horizontal flips.
    pub fn for_data(dir: &std::path::Path) -> Recipe {
        if crate::data::is_cifar(dir) {
            return Recipe::cifar();
        }
        let mut r = Recipe::fashion_mnist();
        if !crate::data::is_fashion(dir) {
            if let Some(a) = r.augment.as_mut() {
                a.flip = false;
            }
        }
        r
    }

    /// Warm-up steps of a run with `steps` steps per epoch: `warmup_epochs` of them, capped at
    /// [`MAX_WARMUP_FRACTION`] of the run.
    pub fn warmup_steps(&self, steps: usize) -> usize {
        let total = (steps * self.epochs) as f64;
        (self.warmup_epochs * steps as f64)
            .min(MAX_WARMUP_FRACTION * total)
            .round() as usize
    }

    /// The recipe for Fashion-MNIST and the small CNN: 8 epochs, batch 128, SGD 0.05 with
    /// momentum 0.9 and Nesterov, weight decay 5e-4, cosine decay after a one-epoch warm-up,
    /// random crop (pad 2) and flips, 5000 validation images, rewind to epoch 1.
    pub fn fashion_mnist() -> Recipe {
        Recipe {
            epochs: 8,
            batch_size: 128,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
            schedule: Schedule::Cosine,
            warmup_epochs: 1.0,
            augment: Some(Augment {
                crop_pad: 2,
                flip: true,
            }),
            val_split: 5000,
            eval_batch: 1000,
            max_batches: None,
            train_subset: None,
            eval_every_epoch: true,
            rewind_epoch: 1,
        }
    }

    /// The Structure-LTH CIFAR recipe: 160 epochs, batch 128, SGD 0.1, momentum 0.9, weight
    /// decay 1e-4, ×0.1 at epochs 80 and 120, crop (pad 4) and flips, 5000 validation images,
    /// rewind to epoch 8 (5%).
    pub fn cifar() -> Recipe {
        Recipe {
            epochs: 160,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
            schedule: Schedule::Step {
                milestones: vec![0.5, 0.75],
                gamma: 0.1,
            },
            warmup_epochs: 0.0,
            augment: Some(Augment {
                crop_pad: 4,
                flip: true,
            }),
            val_split: 5000,
            eval_batch: 500,
            max_batches: None,
            train_subset: None,
            eval_every_epoch: true,
            rewind_epoch: 8,
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(TrainError::config("epochs", 0, "must be at least 1"));
        }
        if self.batch_size == 0 || self.eval_batch == 0 {
            return Err(TrainError::config("batch size", 0, "must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(TrainError::config("lr", self.lr, "must be positive"));
        }
        if self.train_subset == Some(0) {
            return Err(TrainError::config("train subset", 0, "must be at least 1"));
        }
        if self.rewind_epoch >= self.epochs {
            return Err(TrainError::config(
                "rewind epoch",
                self.rewind_epoch,
                format!("must be below the {} epochs of a run", self.epochs),
            ));
        }
        Ok(())
    }

    /// Optimiser steps per epoch over `n` training images.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        let all = n.div_ceil(self.batch_size);
        self.max_batches.map_or(all, |m| m.min(all))
    }
}

fn yes() -> bool {
    true
}

/// Metrics of one epoch (one line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Stage (IMP round).
    pub stage: usize,
    /// Epoch within the stage (0-based).
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (on augmented batches).
    pub train_acc: f64,
    /// Validation accuracy (absent when not evaluated this epoch).
    pub val_acc: Option<f64>,
    /// Test accuracy (absent when not evaluated this epoch).
    pub test_acc: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Training throughput.
    pub samples_per_s: f64,
    /// Density of the masked layers (1 without masks).
    pub density: f64,
}

/// Progress reports of a run.
pub trait Progress: Sync {
    /// A stage begins.
    fn stage(&self, _stage: usize, _name: &str, _epochs: usize, _steps: usize) {}
    /// A batch is done.
    fn batch(&self, _epoch: usize, _step: usize, _loss: f64, _acc: f64, _samples_per_s: f64) {}
    /// An epoch is done.
    fn epoch(&self, _m: &EpochMetrics) {}
    /// A message.
    fn note(&self, _msg: &str) {}
}

/// Progress that reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// Changes of the masks during training (dynamic sparse training).
pub trait Dynamics {
    /// Before the forward pass of a step (e.g. to ask for dense weight gradients).
    fn before_step(&mut self, _step: usize, _model: &Model) -> Result<()> {
        Ok(())
    }
    /// When [`Dynamics::update`] runs: after the backward pass (before the optimiser step), or
    /// after the optimiser step.
    fn update_at(&self) -> UpdateAt {
        UpdateAt::Backward
    }
    /// Once a step, at [`Dynamics::update_at`]: may change masks and weights and reset momentum.
    fn update(
        &mut self,
        _step: usize,
        _model: &Model,
        _grads: &GradStore,
        _masks: &mut MaskSet,
        _opt: &mut Sgd,
    ) -> Result<()> {
        Ok(())
    }
    /// State to checkpoint.
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores checkpointed state.
    fn load(&mut self, _state: &serde_json::Value, _model: &Model) -> Result<()> {
        Ok(())
    }
}

/// Masks never change.
pub struct Static;
impl Dynamics for Static {}

/// What a run has done so far (checkpointed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Current stage.
    pub stage: usize,
    /// Next epoch to run in the current stage.
    pub epoch: usize,
    /// Optimiser steps taken in the current stage.
    pub step: usize,
    /// Metrics of every finished epoch.
    pub history: Vec<EpochMetrics>,
    /// State of the stage's mask dynamics.
    pub dynamics: serde_json::Value,
}

/// A training run in an output directory.
pub struct Trainer<'a> {
    /// Output directory (checkpoint, metrics, stage results).
    pub out: PathBuf,
    /// The data.
    pub data: &'a DataSplits,
    /// The recipe.
    pub recipe: Recipe,
    /// Seed of data order, augmentation and initialisation.
    pub seed: u64,
    /// The model.
    pub model: Model,
    /// Masks of pruned layers.
    pub masks: MaskSet,
    /// The optimiser.
    pub opt: Sgd,
    /// Progress so far.
    pub state: RunState,
    /// Reports.
    pub progress: &'a dyn Progress,
    /// Stop (as if killed, mid-epoch) after this many optimiser steps of this process — for
    /// resume tests.
    pub stop_after_steps: Option<usize>,
    steps_this_process: usize,
}

/// The files of a checkpoint directory (their checksums are recorded beside them).
const CHECKPOINT_FILES: [&str; 4] = [
    "weights.safetensors",
    "masks.safetensors",
    "momentum.safetensors",
    "state.json",
];

/// The checkpoint directory of a run.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

impl<'a> Trainer<'a> {
    /// A fresh trainer.
    pub fn new(
        out: &Path,
        data: &'a DataSplits,
        recipe: Recipe,
        seed: u64,
        model: Model,
        progress: &'a dyn Progress,
    ) -> Result<Self> {
        recipe.validate()?;
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        let opt = Sgd::new(
            recipe.momentum as f32,
            recipe.weight_decay as f32,
            recipe.nesterov,
        );
        Ok(Trainer {
            out: out.to_path_buf(),
            data,
            recipe,
            seed,
            model,
            masks: MaskSet::new(),
            opt,
            state: RunState::default(),
            progress,
            stop_after_steps: None,
            steps_this_process: 0,
        })
    }

    /// Whether stage `s` still has epochs to run (it is not finished).
    pub fn needs_stage(&self, s: usize) -> bool {
        s >= self.state.stage
    }

    /// Whether stage `s` starts fresh now (not resumed in its middle): then the caller prepares
    /// its initial weights and masks.
    pub fn starts_fresh(&self, s: usize) -> bool {
        s > self.state.stage || (s == self.state.stage && self.state.epoch == 0)
    }

    /// Trains stage `stage` to the end of the recipe's epochs, resuming from the checkpointed
    /// epoch when the run stopped inside it. `on_epoch_start(epoch, model)` runs before each
    /// epoch (IMP saves its rewind weights there). Returns false when the run was stopped early
    /// (`stop_after_steps`).
    pub fn train_stage(
        &mut self,
        stage: usize,
        name: &str,
        dynamics: &mut dyn Dynamics,
        on_epoch_start: &mut dyn FnMut(usize, &Model) -> Result<()>,
    ) -> Result<bool> {
        if stage < self.state.stage {
            return Ok(true);
        }
        if stage > self.state.stage {
            self.state = RunState {
                stage,
                history: std::mem::take(&mut self.state.history),
                ..Default::default()
            };
            self.opt.buffers.clear();
        }
        if self.state.epoch > 0 {
            dynamics.load(&self.state.dynamics, &self.model)?;
        }
        apply_masks(&self.model, &self.masks)?;
        let r = self.recipe.clone();
        let steps = r.steps_per_epoch(self.data.train.n);
        let sched = LrSchedule {
            base: r.lr,
            schedule: r.schedule.clone(),
            warmup_steps: r.warmup_steps(steps),
            total_steps: steps * r.epochs,
        };
        self.progress.stage(stage, name, r.epochs, steps);
        let key = self.seed ^ (stage as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
        let fill: Vec<f32> = self
            .data
            .mean
            .iter()
            .zip(&self.data.std)
            .map(|(&m, &s)| -m / s)
            .collect();
        let train = &self.data.train;
        while self.state.epoch < r.epochs {
            let epoch = self.state.epoch;
            on_epoch_start(epoch, &self.model)?;
            let order = epoch_order(train.n, key, epoch);
            let t0 = Instant::now();
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
            for (bi, idx) in order.chunks(r.batch_size).take(steps).enumerate() {
                let step = self.state.step;
                let lr = sched.lr(step);
                let batch = make_batch(
                    train,
                    idx,
                    r.augment.as_ref().map(|a| (a, fill.as_slice())),
                    (key, epoch, bi),
                );
                let x = Tensor::from_vec(
                    batch.pixels,
                    (train.channels, batch.size, train.height, train.width),
                    &Device::Cpu,
                )?;
                let y = Tensor::from_vec(batch.labels.clone(), batch.size, &Device::Cpu)?;
                dynamics.before_step(step, &self.model)?;
                let logits = self.model.forward(&x, true)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                let lv = loss.to_scalar::<f32>()?;
                if !lv.is_finite() {
                    return Err(TrainError::Diverged {
                        epoch,
                        step: bi,
                        loss: lv,
                    });
                }
                let grads = loss.backward()?;
                // The mask update runs before or after the optimiser step, as the method says.
                let at = dynamics.update_at();
                if at == UpdateAt::Backward {
                    dynamics.update(step, &self.model, &grads, &mut self.masks, &mut self.opt)?;
                }
                self.opt.step(&self.model, &grads, &self.masks, lr)?;
                if at == UpdateAt::Step {
                    dynamics.update(step, &self.model, &grads, &mut self.masks, &mut self.opt)?;
                }
                let pred = logits.argmax(1)?.to_vec1::<u32>()?;
                correct += pred
                    .iter()
                    .zip(&batch.labels)
                    .filter(|(a, b)| a == b)
                    .count();
                seen += batch.size;
                loss_sum += lv as f64 * batch.size as f64;
                self.state.step += 1;
                self.steps_this_process += 1;
                if self
                    .stop_after_steps
                    .is_some_and(|n| self.steps_this_process >= n)
                {
                    // As if killed: nothing of the unfinished epoch is saved.
                    return Ok(false);
                }
                let sps = seen as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                self.progress.batch(
                    epoch,
                    bi + 1,
                    loss_sum / seen as f64,
                    correct as f64 / seen as f64,
                    sps,
                );
            }
            let secs = t0.elapsed().as_secs_f64();
            let evaluate = r.eval_every_epoch || epoch + 1 == r.epochs;
            let m = EpochMetrics {
                stage,
                epoch,
                train_loss: loss_sum / seen.max(1) as f64,
                train_acc: correct as f64 / seen.max(1) as f64,
                val_acc: evaluate
                    .then(|| accuracy(&self.model, &self.data.val, r.eval_batch))
                    .transpose()?,
                test_acc: evaluate
                    .then(|| accuracy(&self.model, &self.data.test, r.eval_batch))
                    .transpose()?,
                lr: sched.lr(self.state.step.saturating_sub(1)),
                samples_per_s: seen as f64 / secs.max(1e-9),
                density: self.masks.density(),
            };
            self.progress.epoch(&m);
            self.state.history.push(m);
            self.state.epoch += 1;
            self.state.dynamics = dynamics.save();
            self.write_metrics()?;
            self.save_checkpoint()?;
        }
        Ok(true)
    }

    /// Moves the state past the current (finished) stage.
    pub fn finish_stage(&mut self) -> Result<()> {
        // Each stage starts its optimiser afresh (the reference code restarts it after a rewind).
        self.opt.buffers.clear();
        self.state.stage += 1;
        self.state.epoch = 0;
        self.state.step = 0;
        self.state.dynamics = serde_json::Value::Null;
        self.save_checkpoint()
    }

    fn write_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for m in &self.state.history {
            text += &serde_json::to_string(m)
                .map_err(|e| TrainError::config("metrics", "json", e.to_string()))?;
            text.push('\n');
        }
        write_atomic(&self.out.join("metrics.jsonl"), text.as_bytes())
    }

    /// Writes the checkpoint (weights, masks, momentum, state) atomically.
    pub fn save_checkpoint(&self) -> Result<()> {
        let dir = checkpoint_dir(&self.out);
        let tmp = self.out.join("checkpoint.new");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        save_tensors(&tmp.join("weights.safetensors"), &self.model.state()?)?;
        save_masks(&tmp.join("masks.safetensors"), &self.masks)?;
        let bufs: Vec<(String, Vec<usize>, Vec<f32>)> = self
            .opt
            .buffers
            .iter()
            .map(|(k, v)| (k.clone(), vec![v.len()], v.clone()))
            .collect();
        save_tensors(&tmp.join("momentum.safetensors"), &bufs)?;
        let json = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| TrainError::config("state", "json", e.to_string()))?;
        write_atomic(&tmp.join("state.json"), &json)?;
        crate::checksum::write(&tmp, &CHECKPOINT_FILES)?;
        let old = self.out.join("checkpoint.old");
        if dir.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
            }
            std::fs::rename(&dir, &old).map_err(|e| TrainError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        Ok(())
    }

    /// Restores the checkpoint of `out` (weights, masks, momentum, state). Returns false when
    /// there is none.
    pub fn load_checkpoint(&mut self) -> Result<bool> {
        let mut dir = checkpoint_dir(&self.out);
        if !dir.exists() {
            // A crash between the two renames of `save_checkpoint` leaves only the old one.
            dir = self.out.join("checkpoint.old");
            if !dir.exists() {
                return Ok(false);
            }
        }
        crate::checksum::verify(&dir, &CHECKPOINT_FILES)?;
        let state_path = dir.join("state.json");
        let text = std::fs::read(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        self.state = serde_json::from_slice(&text).map_err(|e| TrainError::Checkpoint {
            path: state_path.clone(),
            reason: format!("unreadable state: {e}"),
        })?;
        let weights = load_tensors(&dir.join("weights.safetensors"))?;
        self.model.load_state(
            &|n| weights.get(n).cloned(),
            &dir.join("weights.safetensors"),
        )?;
        self.masks = load_masks(&dir.join("masks.safetensors"), &self.model)?;
        self.opt.buffers = load_tensors(&dir.join("momentum.safetensors"))?
            .into_iter()
            .map(|(k, (_, v))| (k, v))
            .collect();
        Ok(true)
    }
}

/// Top-1 accuracy of `model` on `images`.
pub fn accuracy(model: &Model, images: &Images, batch: usize) -> Result<f64> {
    top1(images, batch, |b| {
        let x = Tensor::from_vec(
            b.pixels,
            (images.channels, b.size, images.height, images.width),
            &Device::Cpu,
        )?;
        Ok(model.forward(&x, false)?.argmax(1)?.to_vec1::<u32>()?)
    })
}

/// Top-1 accuracy of the inference engine `net` on `images`, in batches of `batch`.
pub fn engine_accuracy(
    net: &coarsen_infer::InferenceNet,
    images: &Images,
    batch: usize,
) -> Result<f64> {
    top1(images, batch, |b| Ok(net.predict(&b.pixels, b.size)?))
}

/// Top-1 accuracy on `images` (unaugmented, in order, in batches of `batch`) of `predict`, which
/// gives the predicted class of every image of a batch.
pub(crate) fn top1(
    images: &Images,
    batch: usize,
    mut predict: impl FnMut(Batch) -> Result<Vec<u32>>,
) -> Result<f64> {
    if images.n == 0 {
        return Ok(0.0);
    }
    let idx: Vec<usize> = (0..images.n).collect();
    let mut correct = 0usize;
    for chunk in idx.chunks(batch.max(1)) {
        let mut b = make_batch(images, chunk, None, (0, 0, 0));
        let labels = std::mem::take(&mut b.labels);
        let pred = predict(b)?;
        correct += pred.iter().zip(&labels).filter(|(a, b)| a == b).count();
    }
    Ok(correct as f64 / images.n as f64)
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    coarsen_core::io::write_atomic(path, bytes).map_err(TrainError::from)
}

/// Saves named f32 tensors as safetensors.
pub fn save_tensors(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    let list = tensors
        .iter()
        .map(|(n, s, v)| coarsen_core::WeightTensor::new(n.clone(), s.clone(), v.clone()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    coarsen_core::WeightFile::write_f32(path, &list)?;
    Ok(())
}

/// Loads every floating-point tensor of a safetensors file by name.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, ShapedValues>> {
    let f = coarsen_core::WeightFile::read(path)?;
    // NaN or infinity in weights, BatchNorm statistics or optimiser state poisons every output.
    for t in f.tensors() {
        t.check_finite(path)?;
    }
    Ok(f.tensors()
        .iter()
        .filter_map(|t| {
            t.values()
                .map(|v| (t.name.clone(), (t.shape.clone(), v.to_vec())))
        })
        .collect())
}

/// Saves masks as a U8 mask file with the weights' shapes (what `coarsen convert` reads).
pub fn save_masks(path: &Path, masks: &MaskSet) -> Result<()> {
    masks.write(path, None)?;
    Ok(())
}

/// Loads a mask file whose masks all belong to weights of `model`, with their shapes.
pub fn load_masks(path: &Path, model: &Model) -> Result<MaskSet> {
    let (masks, _) = MaskSet::read(path)?;
    check_masks(&masks, model, path)?;
    Ok(masks)
}

/// Fails unless every mask belongs to a conv or linear weight of `model` and has its shape.
pub fn check_masks(masks: &MaskSet, model: &Model, source: &Path) -> Result<()> {
    for (name, m) in masks.iter() {
        match model.weights().find(|p| p.name == name) {
            Some(p) if p.shape() == m.shape() => {}
            Some(p) => {
                return Err(TrainError::Checkpoint {
                    path: source.to_path_buf(),
                    reason: format!(
                        "mask '{name}' has shape {:?}, the weight {:?}",
                        m.shape(),
                        p.shape()
                    ),
                })
            }
            None => {
                return Err(TrainError::Checkpoint {
                    path: source.to_path_buf(),
                    reason: format!(
                        "mask '{name}' names no conv or linear weight of the {} model",
                        model.spec.name
                    ),
                })
            }
        }
    }
    Ok(())
}

/// Appends a line to a text file (creating it).
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_is_capped_in_short_runs() {
        let mut r = Recipe::fashion_mnist();
        // 8 epochs, one of warm-up: the recipe's epoch.
        assert_eq!(r.warmup_steps(100), 100);
        // One epoch: a fifth of it, not all of it.
        r.epochs = 1;
        assert_eq!(r.warmup_steps(100), 20);
        r.warmup_epochs = 0.0;
        assert_eq!(r.warmup_steps(100), 0);
    }

    #[test]
    fn only_fashion_mnist_flips_among_idx_data() {
        let flips = |d: &str| {
            Recipe::for_data(std::path::Path::new(d))
                .augment
                .is_some_and(|a| a.flip)
        };
        assert!(flips("/usr/share/datasets/fashion-mnist"));
        assert!(!flips("/data/mnist"));
        assert!(!flips("/data/digits"));
    }
}
