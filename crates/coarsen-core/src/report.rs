//! Conversion reports: per layer and in total, as JSON and as a table.

use serde::Serialize;

use crate::metadata::LayerStatus;

/// Minimum, mean and maximum of a list of sizes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// Smallest value.
    pub min: usize,
    /// Mean value.
    pub mean: f64,
    /// Largest value.
    pub max: usize,
}

impl Spread {
    /// The spread of `values`, or `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = usize>) -> Option<Spread> {
        let v: Vec<usize> = values.into_iter().collect();
        let (&min, &max) = (v.iter().min()?, v.iter().max()?);
        Some(Spread {
            min,
            mean: v.iter().sum::<usize>() as f64 / v.len() as f64,
            max,
        })
    }
}

/// Pattern statistics of one layer; fields that do not apply to the pattern are absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PatternStats {
    /// Number of dense blocks (group), tiles (shuffled-block, block) or 1 (channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<usize>,
    /// Rows per block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_per_block: Option<Spread>,
    /// Columns per block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cols_per_block: Option<Spread>,
    /// Rows kept (channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_rows: Option<usize>,
    /// Parts the rows were split into (group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts: Option<usize>,
    /// Row groups (shuffled-block).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_groups: Option<usize>,
    /// Retained magnitude without the channel permutation (nm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retained_magnitude_unpermuted: Option<f64>,
    /// Why the channel permutation was not searched (nm with `--permute`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permute_skipped: Option<String>,
}

/// The report of one layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerReport {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Rows of the matrix view.
    pub rows: usize,
    /// Columns of the matrix view.
    pub cols: usize,
    /// What became of the layer.
    pub status: LayerStatus,
    /// Why the layer is not structured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Ones in the input mask.
    pub nnz_in: usize,
    /// Ones in the output mask.
    pub nnz_out: usize,
    /// Density of the input mask.
    pub density_in: f64,
    /// Density of the output mask.
    pub density_out: f64,
    /// Fraction of the input mask's ones that survive.
    pub recall: f64,
    /// Σ|W| under the new mask / Σ|W| under the input mask (when weights are given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retained_magnitude: Option<f64>,
    /// The same ratio for the pattern's obvious baseline at the same density, built from the
    /// dense weights (see [`crate::baseline`]); absent without weights or for a layer left
    /// unstructured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_magnitude: Option<f64>,
    /// Pattern statistics.
    pub stats: PatternStats,
    /// Why the layer ends more than one point from a per-layer `--target-density`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_note: Option<String>,
    /// Wall time of the conversion of this layer, in milliseconds.
    pub time_ms: f64,
}

/// Totals over all layers of a report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Totals {
    /// Number of layers.
    pub layers: usize,
    /// Layers whose mask satisfies the pattern.
    pub structured: usize,
    /// Layers left unstructured.
    pub unstructured: usize,
    /// Layers that are dense.
    pub dense: usize,
    /// Weights over all layers.
    pub weights: usize,
    /// Ones in the input masks.
    pub nnz_in: usize,
    /// Ones in the output masks.
    pub nnz_out: usize,
    /// Overall input density.
    pub density_in: f64,
    /// Overall output density.
    pub density_out: f64,
    /// Overall recall.
    pub recall: f64,
    /// Overall retained magnitude (when weights are given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retained_magnitude: Option<f64>,
    /// Overall retained magnitude of the baseline (layers without one count at coarsen's value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_magnitude: Option<f64>,
    /// Wall time of the whole conversion, in milliseconds.
    pub time_ms: f64,
}

/// A conversion report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The pattern's name.
    pub pattern: String,
    /// Its parameters.
    pub params: serde_json::Value,
    /// The seed.
    pub seed: u64,
    /// What the baseline columns compare against (when weights are given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// The requested density and what was reached, when `--target-density` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetSummary>,
    /// The written mask file's sparsity: over every mask in it (the prunable layers, selected or
    /// passed through), and over all conv and linear weights when weights were given.
    pub sparsity: crate::Sparsity,
    /// Per layer, in natural name order.
    pub layers: Vec<LayerReport>,
    /// Totals.
    pub total: Totals,
}

/// A `--target-density` request and what conversion reached.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetSummary {
    /// The requested density.
    pub density: f64,
    /// `layer` or `global`.
    pub scope: String,
    /// Density reached: of the targeted layers together (per-layer scope), of all selected
    /// layers (global scope, where the targeted layers make up for the others).
    pub reached: f64,
    /// Structured layers off by more than one point (per-layer scope).
    pub missed: usize,
    /// Layers not targeted (left unstructured or made dense by a fallback).
    pub untargeted: usize,
}

impl TargetSummary {
    /// How many of `layers` were targeted.
    pub fn layers_targeted(&self, layers: usize) -> usize {
        layers - self.untargeted
    }

    pub(crate) fn of(t: &crate::target::DensityTarget, layers: &[LayerReport]) -> Self {
        let targeted =
            |l: &&LayerReport| l.status != LayerStatus::Unstructured && l.reason.is_none();
        let global = t.scope == crate::prune::Scope::Global;
        let (nnz, len) = layers
            .iter()
            .filter(|l| global || targeted(l))
            .fold((0usize, 0usize), |(n, w), l| {
                (n + l.nnz_out, w + l.rows * l.cols)
            });
        TargetSummary {
            density: t.density,
            scope: crate::target::scope_str(t.scope).to_string(),
            reached: ratio(nnz as f64, len as f64),
            missed: layers.iter().filter(|l| l.target_note.is_some()).count(),
            untargeted: layers.len() - layers.iter().filter(targeted).count(),
        }
    }
}

/// Magnitudes a report needs to sum retained magnitude over layers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Magnitudes {
    pub input: f64,
    pub output: f64,
    pub baseline: f64,
}

impl Report {
    pub(crate) fn new(
        pattern: String,
        params: serde_json::Value,
        seed: u64,
        layers: Vec<LayerReport>,
        magnitudes: Option<Vec<Magnitudes>>,
        time_ms: f64,
    ) -> Self {
        let count = |s: LayerStatus| layers.iter().filter(|l| l.status == s).count();
        let weights: usize = layers.iter().map(|l| l.rows * l.cols).sum();
        let nnz_in: usize = layers.iter().map(|l| l.nnz_in).sum();
        let nnz_out: usize = layers.iter().map(|l| l.nnz_out).sum();
        let kept: f64 = layers.iter().map(|l| l.recall * l.nnz_in as f64).sum();
        let sums = magnitudes.map(|m| {
            m.iter().fold((0.0, 0.0, 0.0), |(i, o, b), x| {
                (i + x.input, o + x.output, b + x.baseline)
            })
        });
        let of = |v: f64, i: f64| if i > 0.0 { v / i } else { 1.0 };
        let retained_magnitude = sums.map(|(i, o, _)| of(o, i));
        let baseline_magnitude = sums
            .filter(|_| layers.iter().any(|l| l.baseline_magnitude.is_some()))
            .map(|(i, _, b)| of(b, i));
        let total = Totals {
            layers: layers.len(),
            structured: count(LayerStatus::Structured),
            unstructured: count(LayerStatus::Unstructured),
            dense: count(LayerStatus::Dense),
            weights,
            nnz_in,
            nnz_out,
            density_in: ratio(nnz_in as f64, weights as f64),
            density_out: ratio(nnz_out as f64, weights as f64),
            recall: ratio(kept, nnz_in as f64),
            retained_magnitude,
            baseline_magnitude,
            time_ms,
        };
        Report {
            pattern,
            params,
            seed,
            baseline: None,
            target: None,
            sparsity: crate::Sparsity::default(),
            layers,
            total,
        }
    }

    /// The report as a plain-text table, one line per layer and a total line.
    pub fn table(&self) -> String {
        let name_w = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!(
            "{:<name_w$}  {:>18}  {:>12}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>8}\n",
            "layer",
            "shape",
            "status",
            "dens.in",
            "dens.out",
            "recall",
            "magn.",
            "base.",
            "blocks",
            "ms"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        for l in &self.layers {
            let shape = l
                .shape
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("x");
            s += &format!(
                "{:<name_w$}  {:>18}  {:>12}  {:>7.4}  {:>8.4}  {:>6.3}  {:>6}  {:>6}  {:>7}  {:>8.1}\n",
                l.name,
                shape,
                l.status.as_str(),
                l.density_in,
                l.density_out,
                l.recall,
                opt(l.retained_magnitude),
                opt(l.baseline_magnitude),
                l.stats.blocks.map_or("-".into(), |b| b.to_string()),
                l.time_ms
            );
        }
        let t = &self.total;
        s += &format!(
            "{:<name_w$}  {:>18}  {:>12}  {:>7.4}  {:>8.4}  {:>6.3}  {:>6}  {:>6}  {:>7}  {:>8.1}\n",
            "total",
            format!("{} weights", t.weights),
            format!("{}/{} struct.", t.structured, t.layers),
            t.density_in,
            t.density_out,
            t.recall,
            opt(t.retained_magnitude),
            opt(t.baseline_magnitude),
            "",
            t.time_ms
        );
        s += &format!(
            "{}: {} of {} layers carry the structure; the mask file is at {}\n",
            self.pattern,
            t.structured,
            t.layers,
            self.sparsity.describe()
        );
        if let (Some(b), Some(ours), Some(base)) =
            (&self.baseline, t.retained_magnitude, t.baseline_magnitude)
        {
            s += &format!(
                "magn. = retained magnitude; base. = the same for the naive baseline ({b}) at the same density: {:+.1} pt for coarsen\n",
                100.0 * (ours - base)
            );
        }
        if let Some(t) = &self.target {
            let which = if t.scope == "global" {
                format!("the {} layers together", self.layers.len())
            } else {
                format!(
                    "the {} targeted layers",
                    t.layers_targeted(self.layers.len())
                )
            };
            s += &format!(
                "target density {} ({}): {which} reach {:.4}{}{}\n",
                t.density,
                t.scope,
                t.reached,
                if t.missed > 0 {
                    format!("; {} off by more than one point (notes below)", t.missed)
                } else {
                    String::new()
                },
                if t.untargeted > 0 {
                    format!("; {} left as they were (not structured)", t.untargeted)
                } else {
                    String::new()
                },
            );
        }
        for l in &self.layers {
            if let Some(n) = &l.target_note {
                s += &format!("note: {}: {n}\n", l.name);
            }
        }
        for l in self.layers.iter().filter(|l| l.reason.is_some()) {
            s += &format!(
                "note: {} is {}: {}\n",
                l.name,
                l.status.as_str(),
                l.reason.as_deref().unwrap_or_default()
            );
        }
        s
    }
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}
