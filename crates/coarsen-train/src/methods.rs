//! The training methods as runs of stages, and the experiment that selects one.
//!
//! | method | stages |
//! |---|---|
//! | `dense` | 0: dense training (saving the rewind point) |
//! | `one-shot` | 0: dense; 1: global magnitude pruning to the target sparsity, rewind, retrain |
//! | `naive-channel` | 0: dense; 1: per layer, the channels with the smallest ℓ1 of the trained weights removed, rewind, retrain |
//! | `imp` | 0: dense; r = 1..R: prune 20% of the remaining weights globally, rewind, retrain |
//! | `imp-refill`, `imp-refill+`, `imp-regroup` | IMP to round r, then r+1: round r's mask post-processed, rewind, retrain (`every_round`: post-processing inside every IMP round instead) |
//! | `nm` | 0: dense; 1: N:M (default 2:4, input channels permuted) of the trained weights, fine-tuned with the mask fixed (apex ASP) |
//! | `rigl`, `dsb`, `ssb` | 0: sparse training from ERK masks with mask dynamics |
//!
//! Every stage writes `stage-{s}/weights.safetensors` (all parameters and BatchNorm
//! statistics), `stage-{s}/masks.safetensors` (U8 masks with the weights' shapes; structured
//! stages carry coarsen-core's pattern metadata, so `coarsen bench`/`inspect` read them) and
//! `stage-{s}/summary.json`. The run writes `results.json` when it ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use coarsen_core::metadata::{CoarsenMetadata, LayerMeta, LayerStatus, METADATA_VERSION};
use coarsen_core::patterns::{
    nm_prune, ChannelConfig, ChannelCriterion, GroupConfig, NmConfig, ShuffledConfig,
};
use coarsen_core::{Mask, MaskSet, Pattern};
use serde::{Deserialize, Serialize};

use crate::data::{epoch_order, make_batch, DataSplits};
use crate::dynamic::{
    dsb_blocks, Dsb, DsbConfig, DynamicConfig, Grow, LinearBlocks, Rigl, UpdateAt,
};
use crate::error::{Result, TrainError};
use crate::model::{Model, ModelSpec, ParamKind};
use crate::optim::apply_masks;
use crate::sparsity::{
    channel_sparsity, naive_channel, post_process, prune_global, PostProcess, RefillCriterion,
};
use crate::train::{
    accuracy, load_masks, save_tensors, write_atomic, Dynamics, EpochMetrics, Progress, Recipe,
    Static, Trainer,
};

/// The method names `coarsen train --method` accepts.
pub const METHODS: &[&str] = &[
    "dense",
    "one-shot",
    "naive-channel",
    "imp",
    "imp-refill",
    "imp-refill+",
    "imp-regroup",
    "nm",
    "rigl",
    "dsb",
    "ssb",
];

/// IMP settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImpConfig {
    /// Pruning rounds R.
    pub rounds: usize,
    /// Fraction of the remaining weights pruned per round.
    pub rate: f64,
    /// The round whose mask is post-processed (`imp-refill`/`-refill+`/`-regroup`); the last
    /// round when absent.
    pub post_round: Option<usize>,
    /// Post-process inside every round (group-aware IMP, the paper's Algorithm 4) instead of
    /// once after round `post_round` (the reference code's README mode).
    pub every_round: bool,
    /// Weights to prune; the model's default (every conv but the first, every linear but the
    /// classifier) when absent.
    pub layers: Option<Vec<String>>,
    /// After Refill/Regroup, move the structured masks back to the density IMP pruned to, inside
    /// the structure (coarsen-core's density targeting): `layer` per layer, `global` over the
    /// pruned layers together; absent, the structure's own density stands (the reference code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_density: Option<String>,
}

impl Default for ImpConfig {
    fn default() -> Self {
        ImpConfig {
            rounds: 7,
            rate: 0.2,
            post_round: None,
            every_round: false,
            layers: None,
            keep_density: None,
        }
    }
}

/// Refill settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefillConfig {
    /// Channel score.
    pub criterion: RefillCriterion,
    /// Refill+'s ρ (used by `imp-refill+`; `imp-refill` uses 0).
    pub extra: f64,
    /// Training images the feature and saliency criteria are computed over.
    pub score_batch: usize,
}

impl Default for RefillConfig {
    fn default() -> Self {
        RefillConfig {
            criterion: RefillCriterion::L1,
            extra: 0.1,
            score_batch: 256,
        }
    }
}

/// Dynamic sparse training settings (RigL, DSB, SSB).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicSettings {
    /// Steps between mask updates ΔT.
    pub delta_t: usize,
    /// `T_end`, the drop cosine's period, as a fraction of training [default: RigL 0.75; DSB and
    /// SSB 1.2, the DSB CIFAR code's 75,000 steps over its 62,560].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t_end: Option<f64>,
    /// Updates stop at this fraction of `T_end` [default: RigL 1; DSB 0.5, as its CIFAR code,
    /// where the drop fraction is still α/2].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<f64>,
    /// Initial drop fraction α.
    pub alpha: f64,
    /// When the masks change within a step [default: RigL after the backward pass, DSB after the
    /// optimiser step, as their codes do].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateAt>,
    /// DSB block size b.
    pub block: usize,
    /// DSB growth criterion.
    pub grow: Grow,
    /// Whether DSB blocks linear layers (the DSB code leaves them unstructured).
    pub linear: LinearBlocks,
    /// The seed article's row-similarity threshold q for DSB's row clustering (`None`: the DSB
    /// code's R/b clusters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
}

impl Default for DynamicSettings {
    fn default() -> Self {
        DynamicSettings {
            delta_t: 100,
            t_end: None,
            stop: None,
            alpha: 0.3,
            update: None,
            block: 16,
            grow: Grow::Gradient,
            linear: LinearBlocks::Blocked,
            similarity: None,
        }
    }
}

impl DynamicSettings {
    /// `(T_end, stop, update)` for `method`, each the setting given or the method's default.
    pub fn window(&self, method: &str) -> (f64, f64, UpdateAt) {
        let dsb = matches!(method, "dsb" | "ssb");
        (
            self.t_end.unwrap_or(if dsb { 1.2 } else { 0.75 }),
            self.stop.unwrap_or(if dsb { 0.5 } else { 1.0 }),
            self.update.unwrap_or(if dsb {
                UpdateAt::Step
            } else {
                UpdateAt::Backward
            }),
        )
    }
}

/// A training experiment: everything a run depends on (written to `experiment.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Experiment {
    /// One of [`METHODS`].
    pub method: String,
    /// Architecture (see [`crate::model::MODELS`]).
    pub model: String,
    /// Width multiplier.
    pub width: f64,
    /// Seed of initialisation, data order and augmentation.
    pub seed: u64,
    /// Data set directory.
    pub data: PathBuf,
    /// Target sparsity of `one-shot`, `naive-channel` (channel sparsity), `rigl`, `dsb`, `ssb`.
    pub sparsity: f64,
    /// Training recipe.
    pub recipe: Recipe,
    /// IMP settings.
    pub imp: ImpConfig,
    /// Refill settings.
    pub refill: RefillConfig,
    /// Regroup settings (coarsen-core's).
    pub regroup: GroupConfig,
    /// RigL / DSB settings.
    pub dynamic: DynamicSettings,
    /// N:M settings (coarsen-core's).
    pub nm: NmConfig,
}

impl Default for Experiment {
    fn default() -> Self {
        Experiment {
            method: "dense".into(),
            model: "cnn".into(),
            width: 1.0,
            seed: 0,
            data: PathBuf::from(crate::data::DEFAULT_DATA_DIR),
            sparsity: 0.8,
            recipe: Recipe::fashion_mnist(),
            imp: ImpConfig::default(),
            refill: RefillConfig::default(),
            regroup: GroupConfig::default(),
            dynamic: DynamicSettings::default(),
            nm: NmConfig {
                permute: true,
                ..NmConfig::default()
            },
        }
    }
}

impl Experiment {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !METHODS.contains(&self.method.as_str()) {
            return Err(TrainError::config(
                "method",
                &self.method,
                format!("unknown; known: {}", METHODS.join(", ")),
            ));
        }
        self.recipe.validate()?;
        if !(self.width > 0.0 && self.width <= crate::model::MAX_WIDTH) {
            return Err(TrainError::config(
                "width",
                self.width,
                format!("must lie in (0, {}]", crate::model::MAX_WIDTH),
            ));
        }
        if !(self.sparsity > 0.0 && self.sparsity < 1.0) {
            return Err(TrainError::config(
                "sparsity",
                self.sparsity,
                "must lie strictly between 0 and 1",
            ));
        }
        if self.method.starts_with("imp") {
            if self.imp.rounds == 0 {
                return Err(TrainError::config("imp.rounds", 0, "must be at least 1"));
            }
            if !(self.imp.rate > 0.0 && self.imp.rate < 1.0) {
                return Err(TrainError::config(
                    "imp.rate",
                    self.imp.rate,
                    "must lie strictly between 0 and 1",
                ));
            }
            if let Some(k) = &self.imp.keep_density {
                coarsen_core::target::parse_scope(k).map_err(|_| {
                    TrainError::config("imp.keep_density", k, "expected `layer` or `global`")
                })?;
            }
            if let Some(r) = self.imp.post_round {
                if r == 0 || r > self.imp.rounds {
                    return Err(TrainError::config(
                        "imp.post_round",
                        r,
                        format!("must lie in 1..={} (the IMP rounds)", self.imp.rounds),
                    ));
                }
            }
        }
        if self.method == "imp-regroup" {
            self.regroup.validate()?;
        }
        if self.method == "nm" {
            Pattern::Nm(self.nm).validate()?;
        }
        if let Some(q) = self.dynamic.similarity {
            if !(0.0..=1.0).contains(&q) {
                return Err(TrainError::config(
                    "dynamic.similarity",
                    q,
                    "a cosine similarity threshold lies in [0, 1]",
                ));
            }
        }
        if !(self.refill.extra >= 0.0 && self.refill.extra < 1.0) {
            return Err(TrainError::config(
                "refill.extra",
                self.refill.extra,
                "must lie in [0, 1)",
            ));
        }
        let d = &self.dynamic;
        if d.delta_t == 0 || d.block == 0 {
            return Err(TrainError::config(
                "dynamic.delta_t / block",
                0,
                "must be at least 1",
            ));
        }
        let (t_end, stop, _) = d.window(&self.method);
        if !(t_end > 0.0 && t_end <= 2.0) {
            return Err(TrainError::config(
                "dynamic.t_end",
                t_end,
                "must lie in (0, 2] (a fraction of the training steps)",
            ));
        }
        if !(stop > 0.0 && stop <= 1.0) {
            return Err(TrainError::config(
                "dynamic.stop",
                stop,
                "must lie in (0, 1] (a fraction of T_end)",
            ));
        }
        if !(0.0..1.0).contains(&d.alpha) {
            return Err(TrainError::config(
                "dynamic.alpha",
                d.alpha,
                "must lie in [0, 1)",
            ));
        }
        Ok(())
    }

    /// This experiment with the fields a TOML experiment file names replaced (tables merge
    /// field by field, so `[recipe]` with only `epochs = 5` keeps the rest of the recipe).
    /// Unknown fields are errors.
    pub fn overlay_toml(&self, text: &str, path: &Path) -> Result<Experiment> {
        let bad = |reason: String| TrainError::Data {
            path: path.to_path_buf(),
            reason,
        };
        let over: toml::Table =
            toml::from_str(text).map_err(|e| bad(format!("not a valid TOML file: {e}")))?;
        let over = serde_json::to_value(over).map_err(|e| bad(e.to_string()))?;
        let mut base = serde_json::to_value(self).map_err(|e| bad(e.to_string()))?;
        merge_json(&mut base, over);
        serde_json::from_value(base).map_err(|e| bad(format!("invalid experiment: {e}")))
    }

    /// The model's specification for `data`.
    pub fn model_spec(&self, data: &DataSplits) -> ModelSpec {
        ModelSpec {
            name: self.model.clone(),
            width: self.width,
            input: [data.train.channels, data.train.height, data.train.width],
            classes: data.classes,
        }
    }

    /// The post-processing of `imp-refill`, `imp-refill+`, `imp-regroup`.
    pub fn post(&self) -> Option<PostProcess> {
        match self.method.as_str() {
            "imp-refill" => Some(PostProcess::Refill {
                criterion: self.refill.criterion,
                extra: 0.0,
            }),
            "imp-refill+" => Some(PostProcess::Refill {
                criterion: self.refill.criterion,
                extra: self.refill.extra,
            }),
            "imp-regroup" => Some(PostProcess::Regroup(self.regroup)),
            _ => None,
        }
    }

    /// Number of stages of the run.
    pub fn stages(&self) -> usize {
        match self.method.as_str() {
            "dense" | "rigl" | "dsb" | "ssb" => 1,
            "one-shot" | "naive-channel" | "nm" => 2,
            "imp" => self.imp.rounds + 1,
            _ if self.imp.every_round => self.imp.rounds + 1,
            _ => self.imp.post_round.unwrap_or(self.imp.rounds) + 2,
        }
    }

    /// What stage `s` does, for reports.
    pub fn stage_name(&self, s: usize) -> String {
        let m = self.method.as_str();
        match (m, s) {
            ("rigl" | "dsb" | "ssb", _) => format!("{m} training"),
            (_, 0) => "dense training".into(),
            ("one-shot", _) => "one-shot magnitude pruning, rewind, retrain".into(),
            ("naive-channel", _) => "channel ℓ1 pruning, rewind, retrain".into(),
            ("nm", _) => format!(
                "{}:{} mask of the trained weights, fine-tune",
                self.nm.n, self.nm.m
            ),
            ("imp", r) => format!("IMP round {r}"),
            (_, r) if self.imp.every_round => format!("IMP round {r} + {}", self.post_label()),
            (_, r) if r == self.stages() - 1 => {
                format!("{} of round {}, rewind, retrain", self.post_label(), r - 1)
            }
            (_, r) => format!("IMP round {r}"),
        }
    }

    fn post_label(&self) -> &'static str {
        match self.method.as_str() {
            "imp-refill" => "Refill",
            "imp-refill+" => "Refill+",
            _ => "Regroup",
        }
    }

    /// The pattern the sparse layers of the final stage have (for metadata and reports).
    fn pattern(&self) -> Option<Pattern> {
        match self.method.as_str() {
            "imp-refill" | "imp-refill+" | "naive-channel" => {
                Some(Pattern::Channel(ChannelConfig {
                    criterion: match self.refill.criterion {
                        RefillCriterion::Count => ChannelCriterion::Count,
                        RefillCriterion::L1 => ChannelCriterion::L1,
                        _ => ChannelCriterion::Scores,
                    },
                    extra: if self.method == "imp-refill+" {
                        self.refill.extra
                    } else {
                        0.0
                    },
                }))
            }
            "imp-regroup" => Some(Pattern::Group(self.regroup)),
            "nm" => Some(Pattern::Nm(self.nm)),
            "dsb" | "ssb" => Some(Pattern::ShuffledBlock(ShuffledConfig {
                block: self.dynamic.block,
                blocks: None,
                similarity: self.dynamic.similarity,
                kernels: false,
            })),
            _ => None,
        }
    }
}

fn merge_json(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                merge_json(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// Per-layer outcome in `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerResult {
    /// Weight name.
    pub name: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Fraction of weights kept.
    pub density: f64,
    /// `dense`, `unstructured`, `channel`, `channel+`, `group`, `shuffled-block`.
    pub pattern: String,
    /// Why a layer meant to be structured is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One stage in `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    /// Stage index.
    pub stage: usize,
    /// What it did.
    pub name: String,
    /// Sparsity of the sparse layers.
    pub sparsity: f64,
    /// Fraction of all-zero rows (channels) of the sparse layers.
    pub channel_sparsity: f64,
    /// Test accuracy at the end of the stage.
    pub test_accuracy: f64,
    /// Validation accuracy at the end of the stage.
    pub val_accuracy: f64,
    /// Training seconds of the stage.
    pub seconds: f64,
    /// The epoch with the best validation accuracy (the first of ties), when validation ran
    /// after more than the last epoch; the stage's weights stay those of its last epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestEpoch>,
}

/// The best-by-validation epoch of a stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestEpoch {
    /// Epoch within the stage (0-based).
    pub epoch: usize,
    /// Its validation accuracy.
    pub val_accuracy: f64,
    /// Its test accuracy.
    pub test_accuracy: f64,
}

/// The epoch of `history` (one stage's metrics) with the best validation accuracy, ties to the
/// earliest; none when fewer than two epochs were validated.
pub fn best_epoch<'a>(history: impl Iterator<Item = &'a EpochMetrics>) -> Option<BestEpoch> {
    let validated: Vec<BestEpoch> = history
        .filter_map(|m| {
            Some(BestEpoch {
                epoch: m.epoch,
                val_accuracy: m.val_acc?,
                test_accuracy: m.test_acc?,
            })
        })
        .collect();
    if validated.len() < 2 {
        return None;
    }
    validated.into_iter().reduce(|a, b| {
        if b.val_accuracy > a.val_accuracy {
            b
        } else {
            a
        }
    })
}

/// `results.json` of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    /// The method.
    pub method: String,
    /// The architecture.
    pub model: String,
    /// The data set.
    pub dataset: String,
    /// Test accuracy of the final model.
    pub test_accuracy: f64,
    /// Validation accuracy of the final model.
    pub val_accuracy: f64,
    /// Sparsity of the method's sparse layers.
    pub sparsity: f64,
    /// Sparsity over every conv and linear weight.
    pub sparsity_all: f64,
    /// Fraction of all-zero rows of the sparse layers.
    pub channel_sparsity: f64,
    /// Pattern of the sparse layers (`unstructured` when none).
    pub pattern: String,
    /// Every conv and linear weight.
    pub layers: Vec<LayerResult>,
    /// Every stage.
    pub stages: Vec<StageResult>,
    /// The experiment (recipe included).
    pub experiment: Experiment,
    /// Median training throughput of the final stage.
    pub samples_per_s: f64,
    /// Training seconds over all stages.
    pub train_seconds: f64,
    /// Directory of the final weights and masks.
    pub final_stage: String,
}

impl RunResults {
    /// Reads `results.json` of the run directory `run`.
    pub fn read(run: &Path) -> Result<RunResults> {
        read_json(&run.join("results.json"))
    }

    /// The pattern and how many of the sparse layers carry it, e.g. `group: 1 of 3 layers`
    /// (the bare pattern for dense and unstructured runs).
    pub fn structure(&self) -> String {
        if matches!(self.pattern.as_str(), "dense" | "unstructured") {
            return self.pattern.clone();
        }
        let sparse = self.layers.iter().filter(|l| l.pattern != "dense").count();
        let carry = self
            .layers
            .iter()
            .filter(|l| l.pattern == self.pattern)
            .count();
        format!("{}: {carry} of {sparse} layers", self.pattern)
    }

    /// The sparse layers of a structured run left without its structure, each with the reason.
    pub fn unstructured_layers(&self) -> Vec<(&str, &str)> {
        if matches!(self.pattern.as_str(), "dense" | "unstructured") {
            return Vec::new();
        }
        self.layers
            .iter()
            .filter(|l| l.pattern != "dense" && l.pattern != self.pattern)
            .map(|l| {
                let reason = l.reason.as_deref();
                (
                    l.name.as_str(),
                    reason.unwrap_or("the pattern does not hold on its mask"),
                )
            })
            .collect()
    }
}

/// Removes what a process killed mid-write left in a run directory it had locked: temporary
/// files of atomic writes (`.coarsen-*.tmp`, in the run and its stage directories) and a
/// half-written `checkpoint.new`. The caller holds the directory's lock, so no writer is using
/// them.
fn remove_leftovers(out: &Path) -> Result<()> {
    let mut dirs = vec![out.to_path_buf()];
    for e in std::fs::read_dir(out)
        .map_err(|e| TrainError::io(out, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("stage-") && e.path().is_dir() {
            dirs.push(e.path());
        }
    }
    for d in dirs {
        for e in std::fs::read_dir(&d)
            .map_err(|e| TrainError::io(&d, e))?
            .flatten()
        {
            if coarsen_core::io::is_temporary(&e.file_name().to_string_lossy())
                && e.path().is_file()
            {
                std::fs::remove_file(e.path()).map_err(|err| TrainError::io(e.path(), err))?;
            }
        }
    }
    let partial = out.join("checkpoint.new");
    if partial.is_dir() {
        std::fs::remove_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    }
    Ok(())
}

/// Refuses to train into a directory that holds files other than a run's, or a run of another
/// experiment, unless `--force`; `--resume` of the same experiment passes (checked after).
/// Gives the experiment the directory holds, when it holds one.
fn check_out_dir(out: &Path, exp: &Experiment, opts: &RunOptions) -> Result<Option<Experiment>> {
    let exp_path = out.join("experiment.json");
    let on_disk: Option<Experiment> = if exp_path.is_file() {
        Some(read_json(&exp_path)?)
    } else {
        None
    };
    if opts.force {
        return Ok(on_disk);
    }
    let refuse = |reason: String| TrainError::Checkpoint {
        path: out.to_path_buf(),
        reason,
    };
    if let Some(prev) = &on_disk {
        if prev != exp && !opts.resume {
            return Err(refuse(
                "holds a run of another experiment; choose another --out, or pass --force to replace it"
                    .into(),
            ));
        }
        return Ok(on_disk);
    }
    let entries = std::fs::read_dir(out).map_err(|e| TrainError::io(out, e))?;
    let mut others = Vec::new();
    for e in entries {
        let e = e.map_err(|e| TrainError::io(out, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let leftover = coarsen_core::io::is_temporary(&name);
        if name != coarsen_core::io::LOCK_FILE && !leftover && name != "checkpoint.new" {
            others.push(name);
        }
    }
    if !others.is_empty() {
        others.sort();
        let shown: Vec<String> = others
            .iter()
            .take(3)
            .map(|n| format!("'{}'", n.escape_debug()))
            .collect();
        return Err(refuse(format!(
            "is not empty ({}{}) and holds no coarsen run; choose an empty or new --out, or pass --force to train there anyway",
            shown.join(", "),
            if others.len() > 3 { ", …" } else { "" }
        )));
    }
    Ok(None)
}

/// The directory of stage `s`.
pub fn stage_dir(out: &Path, s: usize) -> PathBuf {
    out.join(format!("stage-{s}"))
}

/// Options of [`run`] that are not part of the experiment.
#[derive(Default)]
pub struct RunOptions {
    /// Continue the checkpoint in the output directory.
    pub resume: bool,
    /// Reuse the finished stages of another run of the same model, seed, data and recipe
    /// (e.g. the dense stage, or IMP rounds of the same rate).
    pub reuse: Option<PathBuf>,
    /// Stop after this many optimiser steps, mid-epoch (as if killed; for tests).
    pub stop_after_steps: Option<usize>,
    /// Write into a directory that holds other files, or a run of another experiment, and
    /// start over there (`--force`).
    pub force: bool,
}

/// Runs `exp` on `data` into `out`. Returns `None` when stopped early by
/// `stop_after_steps`.
pub fn run(
    exp: &Experiment,
    data: &DataSplits,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Option<RunResults>> {
    exp.validate()?;
    let exp_path = out.join("experiment.json");
    let json = serde_json::to_vec_pretty(exp)
        .map_err(|e| TrainError::config("experiment", "json", e.to_string()))?;
    // One writer per run directory: a second `train` (or a `--resume`) into it stops here.
    let _lock = coarsen_core::DirLock::acquire(out, "training")?;
    let on_disk = check_out_dir(out, exp, opts)?;
    remove_leftovers(out)?;
    if out.join("checkpoint").exists() || out.join("checkpoint.old").exists() {
        if !opts.resume {
            return Err(TrainError::Checkpoint {
                path: out.to_path_buf(),
                reason: "holds a run already; pass --resume to continue it or choose another --out"
                    .into(),
            });
        }
        let prev = match on_disk {
            Some(p) => p,
            None => read_json(&exp_path)?,
        };
        if &prev != exp {
            return Err(TrainError::Checkpoint {
                path: exp_path,
                reason:
                    "the run in this directory has other settings; resume it with the same ones"
                        .into(),
            });
        }
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    write_atomic(&exp_path, &json)?;
    let subset;
    let data = match exp.recipe.train_subset {
        Some(n) if n < data.train.n => {
            subset = data.with_train_subset(n);
            &subset
        }
        _ => data,
    };
    let model = Model::new(&exp.model_spec(data), exp.seed)?;
    let mut t = Trainer::new(out, data, exp.recipe.clone(), exp.seed, model, progress)?;
    t.stop_after_steps = opts.stop_after_steps;
    let resumed = opts.resume && t.load_checkpoint()?;
    if !resumed {
        if let Some(src) = &opts.reuse {
            reuse_stages(exp, src, &mut t)?;
        }
    }
    let sparse_names = sparse_layers(exp, &t.model);
    let mut stage_secs: BTreeMap<usize, f64> = read_stage_seconds(out);
    for s in 0..exp.stages() {
        if !t.needs_stage(s) {
            continue;
        }
        let fresh = t.starts_fresh(s);
        if fresh && s > 0 {
            prepare_stage(exp, &mut t, s, &sparse_names)?;
        }
        let t0 = Instant::now();
        let done = train_method_stage(exp, &mut t, s, fresh)?;
        *stage_secs.entry(s).or_default() += t0.elapsed().as_secs_f64();
        write_atomic(
            &out.join("stage-seconds.json"),
            &serde_json::to_vec(&stage_secs)
                .map_err(|e| TrainError::config("stage seconds", "json", e.to_string()))?,
        )?;
        if !done {
            return Ok(None);
        }
        save_stage(exp, &t, s, &sparse_names, stage_secs[&s])?;
        t.finish_stage()?;
    }
    let results = collect_results(exp, &t, &sparse_names, &stage_secs)?;
    write_atomic(
        &out.join("results.json"),
        &serde_json::to_vec_pretty(&results)
            .map_err(|e| TrainError::config("results", "json", e.to_string()))?,
    )?;
    Ok(Some(results))
}

/// The layers the method makes sparse.
fn sparse_layers(exp: &Experiment, model: &Model) -> Vec<String> {
    match exp.method.as_str() {
        "dense" => Vec::new(),
        "dsb" | "ssb" => model.weights().map(|p| p.name.clone()).collect(),
        "rigl" => {
            let first = model.weights().position(|p| p.kind == ParamKind::Conv);
            model
                .weights()
                .enumerate()
                .filter(|&(i, _)| Some(i) != first)
                .map(|(_, p)| p.name.clone())
                .collect()
        }
        _ => exp
            .imp
            .layers
            .clone()
            .unwrap_or_else(|| model.default_prunable()),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("unreadable: {e}"),
    })
}

fn read_stage_seconds(out: &Path) -> BTreeMap<usize, f64> {
    read_json(&out.join("stage-seconds.json")).unwrap_or_default()
}

/// Loads the weights (all parameters and buffers) of a saved state file into the model.
fn load_weights(model: &Model, path: &Path) -> Result<()> {
    model.load_weights(&coarsen_core::WeightFile::read(path)?)
}

/// The density IMP round `s` prunes to. Plain IMP follows the schedule `(1 − rate)^s`; with
/// post-processing in every round, whose structure moves the density away from the schedule,
/// each round prunes `rate` of what remains (`current·(1 − rate)`, the reference code's
/// behaviour), so a mask already sparser than the schedule is pruned further instead of failing.
fn round_density(imp: &ImpConfig, s: usize, current: f64) -> f64 {
    if imp.every_round {
        current * (1.0 - imp.rate)
    } else {
        (1.0 - imp.rate).powi(s as i32)
    }
}

/// Before stage `s > 0` (fresh): new masks from the model's weights (the trained weights of
/// stage `s − 1`), then the rewind weights.
fn prepare_stage(exp: &Experiment, t: &mut Trainer<'_>, s: usize, names: &[String]) -> Result<()> {
    let m = exp.method.as_str();
    let masks = match m {
        "nm" => {
            let (masks, perms) = nm_masks(&t.model, names, &exp.nm, exp.seed)?;
            write_atomic(
                &t.out.join(PERMS_FILE),
                &serde_json::to_vec(&perms)
                    .map_err(|e| TrainError::config("permutations", "json", e.to_string()))?,
            )?;
            // ASP fine-tunes the trained weights: no rewind.
            t.masks = masks;
            apply_masks(&t.model, &t.masks)?;
            t.progress.note(&format!(
                "stage {s}: {}:{} masks, {}; fine-tuning the trained weights",
                exp.nm.n,
                exp.nm.m,
                run_sparsity(&t.masks, &t.model).describe()
            ));
            return Ok(());
        }
        "one-shot" => prune_global(&t.model, names, &MaskSet::new(), exp.sparsity)?,
        "naive-channel" => naive_channel(&t.model, names, exp.sparsity)?,
        _ => {
            let post_now = exp
                .post()
                .filter(|_| exp.imp.every_round || s == exp.stages() - 1);
            // IMP round r prunes to density (1 − rate)^r; the post-processing stage of README
            // mode restructures round r's mask without pruning further.
            let readme_post = post_now.is_some() && !exp.imp.every_round;
            let base = if readme_post {
                t.masks.clone()
            } else {
                let current = 1.0 - run_sparsity(&t.masks, &t.model).prunable;
                let density = round_density(&exp.imp, s, current);
                prune_global(&t.model, names, &t.masks, 1.0 - density)?
            };
            match post_now {
                None => base,
                Some(how) => {
                    let scores = match &how {
                        PostProcess::Refill { criterion, .. } if needs_scores(*criterion) => {
                            // Scores of the masked trained weights of the round.
                            apply_masks(&t.model, &base)?;
                            Some(channel_scores(&t.model, t.data, exp, names, *criterion)?)
                        }
                        _ => None,
                    };
                    let keep = exp
                        .imp
                        .keep_density
                        .as_deref()
                        .map(coarsen_core::target::parse_scope)
                        .transpose()?;
                    let (masks, status) = post_process(
                        &t.model,
                        names,
                        &base,
                        &how,
                        scores.as_ref(),
                        exp.seed,
                        keep,
                    )?;
                    for (layer, reason) in status {
                        if let Some(r) = reason {
                            t.progress
                                .note(&format!("{layer}: left unstructured ({r})"));
                        }
                    }
                    masks
                }
            }
        }
    };
    load_weights(&t.model, &t.out.join("rewind.safetensors"))?;
    t.masks = masks;
    apply_masks(&t.model, &t.masks)?;
    t.progress.note(&format!(
        "stage {s}: masks at {}; weights rewound to epoch {}",
        run_sparsity(&t.masks, &t.model).describe(),
        t.recipe.rewind_epoch
    ));
    Ok(())
}

/// The file of an `nm` run's input-channel permutations (layer → `perm[new] = old`).
const PERMS_FILE: &str = "nm-permutations.json";

fn read_perms(out: &Path) -> BTreeMap<String, Vec<usize>> {
    read_json(&out.join(PERMS_FILE)).unwrap_or_default()
}

/// N:M masks of the model's weights in `names`, with their input-channel permutations.
fn nm_masks(
    model: &Model,
    names: &[String],
    cfg: &NmConfig,
    seed: u64,
) -> Result<(MaskSet, BTreeMap<String, Vec<usize>>)> {
    let mut masks = MaskSet::new();
    let mut perms = BTreeMap::new();
    for l in crate::sparsity::layer_views(model, names, &MaskSet::new())? {
        let out = nm_prune(
            &l.mask,
            Some(&l.weights),
            l.view,
            cfg,
            seed ^ coarsen_core::stable_hash(&l.name),
        )?;
        if let Some(p) = out.col_perm {
            perms.insert(l.name.clone(), p);
        }
        masks.insert(l.name, &l.shape, out.mask)?;
    }
    Ok((masks, perms))
}

fn needs_scores(c: RefillCriterion) -> bool {
    matches!(
        c,
        RefillCriterion::FeatureL1 | RefillCriterion::FeatureL2 | RefillCriterion::Saliency
    )
}

/// Per-channel scores of `names` over the first `score_batch` training images (no
/// augmentation, BatchNorm in inference mode): Σ|F|, ΣF² or Σ|F·∂L/∂F| of each output channel
/// `F` of the layer.
pub fn channel_scores(
    model: &Model,
    data: &DataSplits,
    exp: &Experiment,
    names: &[String],
    criterion: RefillCriterion,
) -> Result<BTreeMap<String, Vec<f32>>> {
    let train = &data.train;
    let n = exp.refill.score_batch.clamp(1, train.n.max(1));
    let idx: Vec<usize> = epoch_order(train.n, exp.seed ^ 0x5c0e, 0)
        .into_iter()
        .take(n)
        .collect();
    let b = make_batch(train, &idx, None, (0, 0, 0));
    let x = Tensor::from_vec(
        b.pixels,
        (train.channels, b.size, train.height, train.width),
        &Device::Cpu,
    )?;
    let (logits, taps) = model.forward_tapped(&x, false)?;
    let grads = if criterion == RefillCriterion::Saliency {
        let y = Tensor::from_vec(b.labels, b.size, &Device::Cpu)?;
        Some(candle_nn::loss::cross_entropy(&logits, &y)?.backward()?)
    } else {
        None
    };
    let mut out = BTreeMap::new();
    for tap in taps.iter().filter(|t| names.contains(&t.name)) {
        let (name, f) = (&tap.name, &tap.output);
        let rows = f.dims()[0];
        let fv = f.flatten_all()?.to_vec1::<f32>()?;
        let gv = match &grads {
            Some(g) => Some(
                g.get(tap.probe.as_tensor())
                    .ok_or_else(|| {
                        TrainError::config(
                            "saliency",
                            name,
                            "no gradient reached this layer's output",
                        )
                    })?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let per = fv.len() / rows.max(1);
        let score = (0..rows)
            .map(|r| {
                let f = &fv[r * per..(r + 1) * per];
                let s: f64 = match (criterion, &gv) {
                    (RefillCriterion::FeatureL2, _) => f.iter().map(|&v| (v as f64).powi(2)).sum(),
                    (RefillCriterion::Saliency, Some(g)) => f
                        .iter()
                        .zip(&g[r * per..(r + 1) * per])
                        .map(|(&v, &d)| (v as f64 * d as f64).abs())
                        .sum(),
                    _ => f.iter().map(|&v| (v as f64).abs()).sum(),
                };
                s as f32
            })
            .collect();
        out.insert(name.clone(), score);
    }
    Ok(out)
}

/// Trains stage `s` with the method's mask dynamics.
fn train_method_stage(
    exp: &Experiment,
    t: &mut Trainer<'_>,
    s: usize,
    fresh: bool,
) -> Result<bool> {
    let name = exp.stage_name(s);
    let steps = t.recipe.steps_per_epoch(t.data.train.n) * t.recipe.epochs;
    let (t_end, stop, update) = exp.dynamic.window(&exp.method);
    let dyn_cfg = DynamicConfig {
        sparsity: exp.sparsity,
        delta_t: exp.dynamic.delta_t,
        t_end,
        stop,
        alpha: exp.dynamic.alpha,
        update,
    };
    let mut dynamics: Box<dyn Dynamics> = match exp.method.as_str() {
        "rigl" => {
            let (r, masks) = Rigl::new(&t.model, dyn_cfg, steps)?;
            if fresh {
                t.masks = masks;
            }
            Box::new(r)
        }
        "dsb" | "ssb" => {
            let cfg = DsbConfig {
                dynamic: dyn_cfg,
                block: exp.dynamic.block,
                grow: exp.dynamic.grow,
                static_blocks: exp.method == "ssb",
                linear: exp.dynamic.linear,
                similarity: exp.dynamic.similarity,
            };
            let (d, masks) = Dsb::new(&t.model, cfg, steps)?;
            if fresh {
                t.masks = masks;
            } else {
                // Resumed: the checkpoint's masks, and kernels packed from them.
                d.restore(&t.model, &t.masks)?;
            }
            Box::new(d)
        }
        _ => Box::new(Static),
    };
    let out = t.out.clone();
    let rewind_epoch = t.recipe.rewind_epoch;
    let save_rewind = s == 0 && !matches!(exp.method.as_str(), "rigl" | "dsb" | "ssb");
    let mut on_epoch = |epoch: usize, model: &Model| -> Result<()> {
        if save_rewind && epoch == rewind_epoch {
            save_tensors(&out.join("rewind.safetensors"), &model.state()?)?;
        }
        Ok(())
    };
    t.train_stage(s, &name, dynamics.as_mut(), &mut on_epoch)
}

/// Writes `stage-{s}/`: weights, masks (with pattern metadata when structured), summary.
fn save_stage(
    exp: &Experiment,
    t: &Trainer<'_>,
    s: usize,
    names: &[String],
    seconds: f64,
) -> Result<()> {
    let dir = stage_dir(&t.out, s);
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    save_tensors(&dir.join("weights.safetensors"), &t.model.state()?)?;
    let perms = read_perms(&t.out);
    let layers = layer_results(
        exp,
        &t.model,
        &t.masks,
        names,
        &perms,
        s + 1 == exp.stages(),
    )?;
    write_mask_file(
        &dir.join("masks.safetensors"),
        exp,
        &t.masks,
        &layers,
        &perms,
        s + 1 == exp.stages(),
    )?;
    let last = t.state.history.iter().rev().find(|m| m.stage == s);
    let summary = StageResult {
        stage: s,
        name: exp.stage_name(s),
        sparsity: run_sparsity(&t.masks, &t.model).prunable,
        channel_sparsity: channel_sparsity(&t.model, names, &t.masks)?,
        test_accuracy: last.and_then(|m| m.test_acc).unwrap_or(0.0),
        val_accuracy: last.and_then(|m| m.val_acc).unwrap_or(0.0),
        seconds,
        best: best_epoch(t.state.history.iter().filter(|m| m.stage == s)),
    };
    write_atomic(
        &dir.join("summary.json"),
        &serde_json::to_vec_pretty(&summary)
            .map_err(|e| TrainError::config("summary", "json", e.to_string()))?,
    )?;
    crate::checksum::write(&dir, &STAGE_FILES)
}

/// The files of a stage directory (their checksums are recorded beside them).
pub const STAGE_FILES: [&str; 3] = ["weights.safetensors", "masks.safetensors", "summary.json"];

/// The run's sparsity by coarsen's one definition: over the prunable layers (those with a
/// mask), with all conv and linear weights beside it ([`coarsen_core::Sparsity`]).
pub fn run_sparsity(masks: &MaskSet, model: &Model) -> coarsen_core::Sparsity {
    let weights: Vec<(String, usize)> = model
        .weights()
        .map(|p| (p.name.clone(), p.var.elem_count()))
        .collect();
    masks.sparsity(weights.iter().map(|(n, l)| (n.as_str(), *l)))
}

/// The pattern each weight has: a structured method's layers are checked with coarsen-core's
/// property checks (a layer failing them is reported unstructured, with the reason).
fn layer_results(
    exp: &Experiment,
    model: &Model,
    masks: &MaskSet,
    names: &[String],
    perms: &BTreeMap<String, Vec<usize>>,
    final_stage: bool,
) -> Result<Vec<LayerResult>> {
    let pattern = if final_stage || exp.imp.every_round {
        exp.pattern()
    } else {
        None
    };
    let mut out = Vec::new();
    for p in model.weights() {
        let shape = p.shape();
        let len: usize = shape.iter().product();
        let Some(m) = masks.get(&p.name) else {
            out.push(LayerResult {
                name: p.name.clone(),
                shape,
                density: 1.0,
                pattern: "dense".into(),
                reason: None,
            });
            continue;
        };
        let density = m.nnz() as f64 / len.max(1) as f64;
        let mask = m.mask();
        let (name, reason) = match &pattern {
            _ if density >= 1.0 => ("dense".to_string(), None),
            Some(Pattern::ShuffledBlock(c)) if !dsb_blocks(&shape, c.block, exp.dynamic.linear) => {
                (
                    "unstructured".to_string(),
                    Some(
                        if shape.len() == 2 && exp.dynamic.linear == LinearBlocks::Unstructured {
                            "linear layers are left unstructured (dynamic.linear = unstructured)"
                                .to_string()
                        } else {
                            format!(
                        "DSB blocks convolutions with outputs a multiple of {0} and at least {0} input channels, and linear layers of at least {0}x{0}; this one is {1:?}",
                        c.block,
                        shape
                    )
                        },
                    ),
                )
            }
            Some(pat) if names.contains(&p.name) => {
                match check_pattern(pat, mask, &shape, perms.get(&p.name)) {
                    Ok(()) => (pat.name().to_string(), None),
                    Err(e) => ("unstructured".to_string(), Some(e)),
                }
            }
            _ => ("unstructured".to_string(), None),
        };
        out.push(LayerResult {
            name: p.name.clone(),
            shape,
            density,
            pattern: name,
            reason,
        });
    }
    Ok(out)
}

/// Every conv and linear weight of `net` with its density and pattern: from the mask file's
/// coarsen metadata where it has the layer, otherwise inferred (`dense`, `channel` when every row
/// is full or empty, else `unstructured`).
pub fn describe_layers(
    net: &coarsen_infer::Network,
    meta: Option<&CoarsenMetadata>,
) -> Result<Vec<LayerResult>> {
    let mut out = Vec::new();
    for (name, shape) in net.weight_shapes() {
        let (density, inferred) = match net.masks().get(&name) {
            None => (1.0, "dense".to_string()),
            Some(m) => {
                let d = m.nnz() as f64 / m.len().max(1) as f64;
                let kind = if d >= 1.0 {
                    "dense"
                } else if coarsen_core::patterns::check::check_channel(m.mask()).is_ok() {
                    "channel"
                } else {
                    "unstructured"
                };
                (d, kind.to_string())
            }
        };
        let (pattern, reason) = match meta.and_then(|m| m.layers.get(&name).map(|l| (m, l))) {
            Some((m, l)) => match l.status {
                LayerStatus::Structured => (m.pattern.clone(), None),
                LayerStatus::Dense => ("dense".to_string(), l.reason.clone()),
                LayerStatus::Unstructured => ("unstructured".to_string(), l.reason.clone()),
            },
            None => (inferred, None),
        };
        out.push(LayerResult {
            name,
            shape,
            density,
            pattern,
            reason,
        });
    }
    Ok(out)
}

fn check_pattern(
    p: &Pattern,
    m: &Mask,
    shape: &[usize],
    perm: Option<&Vec<usize>>,
) -> std::result::Result<(), String> {
    let view = coarsen_core::MatrixView::of(shape)
        .ok_or_else(|| format!("shape {shape:?} has rank below 2"))?;
    coarsen_core::patterns::check::check(
        p,
        m,
        view,
        p.max_row_patterns(view.rows),
        perm.map(Vec::as_slice),
    )
}

fn write_mask_file(
    path: &Path,
    exp: &Experiment,
    masks: &MaskSet,
    layers: &[LayerResult],
    perms: &BTreeMap<String, Vec<usize>>,
    final_stage: bool,
) -> Result<()> {
    let mut file = masks.to_file(path, None);
    if let Some(pat) = exp.pattern().filter(|_| final_stage || exp.imp.every_round) {
        let meta_layers = layers
            .iter()
            .filter(|l| masks.contains(&l.name))
            .map(|l| {
                let status = match l.pattern.as_str() {
                    "dense" => LayerStatus::Dense,
                    "unstructured" => LayerStatus::Unstructured,
                    _ => LayerStatus::Structured,
                };
                (
                    l.name.clone(),
                    LayerMeta {
                        status,
                        reason: l.reason.clone(),
                        col_perm: perms.get(&l.name).cloned(),
                    },
                )
            })
            .collect();
        file.metadata = Some(CoarsenMetadata {
            version: METADATA_VERSION,
            pattern: pat.name().to_string(),
            params: pat.params(),
            layers: meta_layers,
        });
    }
    file.write(path)?;
    Ok(())
}

fn collect_results(
    exp: &Experiment,
    t: &Trainer<'_>,
    names: &[String],
    secs: &BTreeMap<usize, f64>,
) -> Result<RunResults> {
    let last_stage = exp.stages() - 1;
    let mut stages = Vec::new();
    for s in 0..exp.stages() {
        let p = stage_dir(&t.out, s).join("summary.json");
        stages.push(read_json::<StageResult>(&p)?);
    }
    let fin = stages
        .last()
        .cloned()
        .ok_or_else(|| TrainError::config("stages", 0, "none ran"))?;
    let layers = layer_results(exp, &t.model, &t.masks, names, &read_perms(&t.out), true)?;
    let sparse: Vec<&LayerResult> = layers.iter().filter(|l| names.contains(&l.name)).collect();
    let pattern = match exp.pattern() {
        Some(p) if sparse.iter().any(|l| l.pattern == p.name()) => p.name().to_string(),
        _ if names.is_empty() => "dense".into(),
        _ => "unstructured".into(),
    };
    let tp: Vec<f64> = t
        .state
        .history
        .iter()
        .filter(|m: &&EpochMetrics| m.stage == last_stage)
        .map(|m| m.samples_per_s)
        .collect();
    let sparsity = run_sparsity(&t.masks, &t.model);
    Ok(RunResults {
        method: exp.method.clone(),
        model: exp.model.clone(),
        dataset: t.data.name.clone(),
        test_accuracy: fin.test_accuracy,
        val_accuracy: fin.val_accuracy,
        sparsity: if names.is_empty() {
            0.0
        } else {
            sparsity.prunable
        },
        sparsity_all: sparsity.all,
        channel_sparsity: fin.channel_sparsity,
        pattern,
        layers,
        stages,
        experiment: exp.clone(),
        samples_per_s: coarsen_kernels::timing::median(tp),
        train_seconds: secs.values().sum(),
        final_stage: format!("stage-{last_stage}"),
    })
}

/// The fields in which two recipes differ, named as in `experiment.json`.
fn recipe_differences(a: &Recipe, b: &Recipe) -> String {
    let (x, y) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    match (x.as_object(), y.as_object()) {
        (Some(x), Some(y)) => {
            let names: Vec<String> = x
                .iter()
                .filter(|(k, v)| y.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "recipe.{k}: {v} vs {}",
                        y.get(k).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect();
            names.join("; ")
        }
        _ => "recipe".to_string(),
    }
}

/// Copies the finished stages of `src` that this run would compute identically (same model,
/// width, seed, data and recipe; IMP rounds of the same rate before any post-processing), and
/// continues from the last of them.
fn reuse_stages(exp: &Experiment, src: &Path, t: &mut Trainer<'_>) -> Result<()> {
    let other: Experiment = read_json(&src.join("experiment.json"))?;
    // The same data set given by another path (relative, or through a link) is the same.
    let same_dir = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    let mut differ = Vec::new();
    if other.model != exp.model {
        differ.push(format!("model ({} vs {})", other.model, exp.model));
    }
    if other.width != exp.width {
        differ.push(format!("width ({} vs {})", other.width, exp.width));
    }
    if other.seed != exp.seed {
        differ.push(format!("seed ({} vs {})", other.seed, exp.seed));
    }
    if !same_dir(&other.data, &exp.data) {
        differ.push(format!(
            "data ({} vs {})",
            other.data.display(),
            exp.data.display()
        ));
    }
    if other.recipe != exp.recipe {
        differ.push(format!(
            "recipe ({})",
            recipe_differences(&other.recipe, &exp.recipe)
        ));
    }
    if other.imp.layers != exp.imp.layers {
        differ.push("imp.layers".to_string());
    }
    if !differ.is_empty() {
        return Err(TrainError::Checkpoint {
            path: src.to_path_buf(),
            reason: format!(
                "cannot be reused: its run differs in {} (it vs this run)",
                differ.join(", ")
            ),
        });
    }
    let dynamic = |m: &str| matches!(m, "rigl" | "dsb" | "ssb");
    if dynamic(&exp.method) || dynamic(&other.method) {
        return Err(TrainError::config(
            "reuse",
            src.display(),
            "RigL, DSB and SSB runs share no stages",
        ));
    }
    // IMP rounds computed by both: plain IMP rounds of the same rate.
    let plain_rounds = |e: &Experiment| -> usize {
        match e.method.as_str() {
            "imp" => e.imp.rounds,
            "imp-refill" | "imp-refill+" | "imp-regroup" if !e.imp.every_round => e.stages() - 2,
            _ => 0,
        }
    };
    let shared_rounds = if exp.imp.rate == other.imp.rate {
        plain_rounds(exp).min(plain_rounds(&other))
    } else {
        0
    };
    let mut last = 0;
    for s in 0..=shared_rounds {
        if !stage_dir(src, s).join("summary.json").exists() {
            break;
        }
        last = s;
    }
    if !stage_dir(src, 0).join("summary.json").exists() || !src.join("rewind.safetensors").exists()
    {
        return Err(TrainError::Checkpoint {
            path: src.to_path_buf(),
            reason: "has no finished dense stage (stage-0) with its rewind point".into(),
        });
    }
    copy_file(
        &src.join("rewind.safetensors"),
        &t.out.join("rewind.safetensors"),
    )?;
    let secs = read_stage_seconds(src);
    let mut mine = BTreeMap::new();
    for s in 0..=last {
        let (from, to) = (stage_dir(src, s), stage_dir(&t.out, s));
        std::fs::create_dir_all(&to).map_err(|e| TrainError::io(&to, e))?;
        crate::checksum::verify(&from, &[])?;
        for f in STAGE_FILES {
            copy_file(&from.join(f), &to.join(f))?;
        }
        crate::checksum::write(&to, &STAGE_FILES)?;
        mine.insert(s, secs.get(&s).copied().unwrap_or(0.0));
    }
    write_atomic(
        &t.out.join("stage-seconds.json"),
        &serde_json::to_vec(&mine)
            .map_err(|e| TrainError::config("stage seconds", "json", e.to_string()))?,
    )?;
    let last_dir = stage_dir(&t.out, last);
    load_weights(&t.model, &last_dir.join("weights.safetensors"))?;
    t.masks = load_masks(&last_dir.join("masks.safetensors"), &t.model)?;
    let history: Vec<EpochMetrics> = std::fs::read_to_string(src.join("metrics.jsonl"))
        .map_err(|e| TrainError::io(src.join("metrics.jsonl"), e))?
        .lines()
        .filter_map(|l| serde_json::from_str::<EpochMetrics>(l).ok())
        .filter(|m| m.stage <= last)
        .collect();
    t.state.history = history;
    t.state.stage = last;
    t.state.epoch = t.recipe.epochs;
    t.progress
        .note(&format!("reusing stages 0..={last} of {}", src.display()));
    t.finish_stage()
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| TrainError::io(from, e))?;
    write_atomic(to, &bytes)
}

/// Accuracy of a model on the test split (for `coarsen eval`).
pub fn test_accuracy(model: &Model, data: &DataSplits, batch: usize) -> Result<f64> {
    accuracy(model, &data.test, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, val: Option<f64>, test: Option<f64>) -> EpochMetrics {
        EpochMetrics {
            stage: 0,
            epoch,
            train_loss: 0.0,
            train_acc: 0.0,
            val_acc: val,
            test_acc: test,
            lr: 0.0,
            samples_per_s: 0.0,
            density: 1.0,
        }
    }

    #[test]
    fn every_round_prunes_the_rate_of_what_remains() {
        let mut imp = ImpConfig {
            rate: 0.2,
            ..ImpConfig::default()
        };
        // The schedule: 0.8^3 whatever the current mask.
        assert!((round_density(&imp, 3, 0.5) - 0.512).abs() < 1e-12);
        // Every round: a Regroup that left 0.5 (sparser than the schedule's 0.64) goes to 0.4.
        imp.every_round = true;
        assert!((round_density(&imp, 3, 0.5) - 0.4).abs() < 1e-12);
        assert!((round_density(&imp, 1, 1.0) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn dsb_similarity_reaches_the_pattern_and_is_checked() {
        let mut exp = Experiment {
            method: "dsb".into(),
            ..Default::default()
        };
        exp.dynamic.similarity = Some(0.3);
        exp.validate().unwrap();
        match exp.pattern() {
            Some(Pattern::ShuffledBlock(c)) => assert_eq!(c.similarity, Some(0.3)),
            other => panic!("{other:?}"),
        }
        exp.dynamic.similarity = Some(1.5);
        let err = exp.validate().unwrap_err().to_string();
        assert!(err.contains("similarity"), "{err}");
    }

    #[test]
    fn best_epoch_is_the_first_best_validated_one() {
        let h = [
            epoch(0, Some(0.5), Some(0.4)),
            epoch(1, Some(0.8), Some(0.7)),
            epoch(2, Some(0.8), Some(0.9)),
            epoch(3, Some(0.6), Some(0.6)),
        ];
        let b = best_epoch(h.iter()).unwrap();
        assert_eq!((b.epoch, b.val_accuracy, b.test_accuracy), (1, 0.8, 0.7));
        // Validated once (the last epoch only): nothing to choose.
        let once = [epoch(0, None, None), epoch(1, Some(0.9), Some(0.9))];
        assert!(best_epoch(once.iter()).is_none());
    }
}
