//! Converting a model's masks into a pattern: validation, per-layer conversion in parallel,
//! verification of every result, metadata and report.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::{MaskFile, MaskTensor, WeightFile};
use crate::mask::Mask;
use crate::metadata::{CoarsenMetadata, LayerMeta, LayerStatus, METADATA_VERSION};
use crate::patterns::row_classes;
use crate::patterns::{
    aligned_blocks, check, nm_prune, refill, regroup, shuffled_blocks, ChannelCriterion, Fallback,
    Pattern,
};
use crate::prune::Scope;
use crate::report::{LayerReport, Magnitudes, PatternStats, Report, Spread, TargetSummary};
use crate::select::Selector;
use crate::target::{retarget, DensityTarget, Structure, TargetLayer};
use crate::view::MatrixView;

/// One layer ready for conversion.
#[derive(Clone, Copy, Debug)]
pub struct LayerInput<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Tensor shape.
    pub shape: &'a [usize],
    /// The unstructured mask in matrix view.
    pub mask: &'a Mask,
    /// The weights (row-major, matrix view), when known.
    pub weights: Option<&'a [f32]>,
    /// Per-row scores for the channel pattern's `scores` criterion.
    pub scores: Option<&'a [f32]>,
}

/// What a layer became.
#[derive(Clone, Debug)]
pub struct LayerOutcome {
    /// The new mask.
    pub mask: Mask,
    /// Structured, unstructured or dense.
    pub status: LayerStatus,
    /// Why a layer is not structured.
    pub reason: Option<String>,
    /// N:M input-channel permutation.
    pub col_perm: Option<Vec<usize>>,
    /// Pattern statistics.
    pub stats: PatternStats,
    /// What a structured layer is built of (the units density targeting adds and removes);
    /// `None` for a layer left unstructured or made dense by a fallback.
    pub structure: Option<Structure>,
}

/// The inputs of [`convert`].
#[derive(Clone, Copy, Debug)]
pub struct ConvertInputs<'a> {
    /// The unstructured masks.
    pub masks: &'a MaskFile,
    /// The weights with the same names and shapes, if any (magnitude criteria use them).
    pub weights: Option<&'a WeightFile>,
    /// Per-layer row scores, if any (one vector of `rows` values per layer, same names).
    pub scores: Option<&'a WeightFile>,
    /// Which mask tensors are layers.
    pub selector: &'a Selector,
    /// A density to reach by pruning or refilling inside the structure, if any.
    pub target: Option<DensityTarget>,
}

/// The result of [`convert`]: the structured masks (metadata included) and the report.
#[derive(Clone, Debug)]
pub struct Conversion {
    /// All tensors of the input mask file; selected ones converted.
    pub masks: MaskFile,
    /// The report.
    pub report: Report,
}

/// Converts one layer. `seed` drives the randomised steps (partitioning, permutation escapes).
pub fn convert_layer(layer: &LayerInput<'_>, pattern: &Pattern, seed: u64) -> Result<LayerOutcome> {
    let view = matrix_view(layer)?;
    if pattern.kernels() && view.inner > 1 {
        return convert_kernels(layer, pattern, seed, view);
    }
    let mask = layer.mask;
    let mut out = LayerOutcome {
        mask: Mask::default(),
        status: LayerStatus::Structured,
        reason: None,
        col_perm: None,
        stats: PatternStats::default(),
        structure: None,
    };
    let mut parts = 0;
    match pattern {
        Pattern::Channel(cfg) => {
            let mut cfg = *cfg;
            if layer.scores.is_some() {
                cfg.criterion = ChannelCriterion::Scores;
            }
            let (m, kept) = refill(mask, layer.weights, layer.scores, &cfg)?;
            out.stats.kept_rows = Some(kept.len());
            out.stats.blocks = Some(usize::from(!kept.is_empty()));
            out.stats.rows_per_block = Spread::of([kept.len()]);
            out.stats.cols_per_block = Spread::of([view.cols]);
            out.mask = m;
            out.structure = Some(Structure::Rows);
        }
        Pattern::Group(cfg) => {
            let g = regroup(mask, cfg, seed, layer.name)?;
            parts = g.parts;
            out.stats.parts = Some(g.parts);
            out.stats.blocks = Some(g.blocks.len());
            out.stats.rows_per_block = Spread::of(g.blocks.iter().map(|b| b.rows.len()));
            out.stats.cols_per_block = Spread::of(g.blocks.iter().map(|b| b.cols.len()));
            if let Some(reason) = g.no_block_reason {
                out.status = match cfg.fallback {
                    Fallback::Keep => LayerStatus::Unstructured,
                    Fallback::Dense => LayerStatus::Dense,
                };
                out.reason = Some(reason);
            } else {
                out.structure = Some(Structure::Classes);
            }
            out.mask = g.mask;
        }
        Pattern::ShuffledBlock(cfg) => {
            let s = shuffled_blocks(mask, layer.weights, None, cfg)?;
            out.stats.blocks = Some(s.tiles.len());
            out.stats.row_groups = Some(s.groups.len());
            out.stats.rows_per_block = Spread::of(s.tiles.iter().map(|(g, _)| s.groups[*g].len()));
            out.stats.cols_per_block = Spread::of(s.tiles.iter().map(|(_, c)| c.len()));
            out.mask = s.mask;
            out.structure = Some(Structure::Shuffled {
                groups: s.groups,
                chunks: s.chunks,
            });
        }
        Pattern::Block(cfg) => {
            let (m, tiles) = aligned_blocks(mask, layer.weights, cfg)?;
            out.stats.blocks = Some(tiles.len());
            out.mask = m;
            out.structure = Some(Structure::Tiles {
                height: cfg.height,
                width: cfg.width,
            });
        }
        Pattern::Nm(cfg) => {
            let n = nm_prune(mask, layer.weights, view, cfg, seed)?;
            if cfg.permute {
                let total = mask.magnitude(&weights_or_ones(layer.weights, mask.len()));
                out.stats.retained_magnitude_unpermuted =
                    Some(crate::report::ratio(n.kept_unpermuted, total));
                out.stats.permute_skipped = n.permute_skipped;
            }
            out.structure = Some(Structure::Nm {
                n: cfg.n,
                m: cfg.m,
                view,
                col_perm: n.col_perm.clone(),
            });
            out.col_perm = n.col_perm;
            out.mask = n.mask;
        }
    }
    verify(layer.name, pattern, view, parts, &mut out)?;
    Ok(out)
}

/// The layer's matrix view; an error for a shape of rank below 2.
fn matrix_view(layer: &LayerInput<'_>) -> Result<MatrixView> {
    MatrixView::of(layer.shape).ok_or_else(|| {
        Error::param(
            "layer",
            layer.name,
            format!("shape {:?} has rank < 2", layer.shape),
        )
    })
}

/// [`convert_layer`] of a convolution (matrix view `view`, kernels of `view.inner` weights) in
/// the kernel view ([`Pattern::kernels`]): the pattern runs on `[Cout, Cin]`, and its result
/// keeps whole kernels. A layer the pattern leaves unstructured keeps its input mask.
fn convert_kernels(
    layer: &LayerInput<'_>,
    pattern: &Pattern,
    seed: u64,
    view: MatrixView,
) -> Result<LayerOutcome> {
    let taps = view.inner;
    let mask = layer.mask;
    let (rows, cols) = (mask.rows(), mask.cols());
    if !cols.is_multiple_of(taps) {
        return Err(Error::param(
            "layer",
            layer.name,
            format!("{cols} columns are not whole kernels of {taps} weights"),
        ));
    }
    let kc = cols / taps;
    let kmask = mask.kernel_mask(taps);
    let kweights: Option<Vec<f32>> = layer.weights.map(|w| mask.kernel_rms(w, taps));
    let shape = [rows, kc];
    let inner = LayerInput {
        name: layer.name,
        shape: &shape,
        mask: &kmask,
        weights: kweights.as_deref(),
        scores: None,
    };
    let mut out = convert_layer(&inner, &pattern.on_single_weights(), seed)?;
    if out.status == LayerStatus::Unstructured {
        out.mask = mask.clone();
    } else {
        let km = std::mem::take(&mut out.mask);
        out.mask = Mask::from_fn(rows, cols, |r, j| km.get(r, j / taps));
        if out.status == LayerStatus::Dense {
            out.status = LayerStatus::Structured;
        }
    }
    out.structure = out.structure.map(|s| match s {
        Structure::Shuffled { groups, chunks } => Structure::Shuffled {
            groups,
            chunks: chunks
                .into_iter()
                .map(|g| {
                    g.into_iter()
                        .map(|chunk| {
                            chunk
                                .into_iter()
                                .flat_map(|c| c * taps..(c + 1) * taps)
                                .collect()
                        })
                        .collect()
                })
                .collect(),
        },
        other => other,
    });
    out.stats.cols_per_block = out.stats.cols_per_block.map(|s| Spread {
        min: s.min * taps,
        mean: s.mean * taps as f64,
        max: s.max * taps,
    });
    verify(
        layer.name,
        pattern,
        view,
        out.stats.parts.unwrap_or(0),
        &mut out,
    )?;
    Ok(out)
}

/// Checks a structured layer's mask against the pattern and marks an all-ones mask dense.
fn verify(
    name: &str,
    pattern: &Pattern,
    view: MatrixView,
    parts: usize,
    out: &mut LayerOutcome,
) -> Result<()> {
    if out.status == LayerStatus::Structured {
        check(pattern, &out.mask, view, parts, out.col_perm.as_deref()).map_err(|violation| {
            Error::PatternViolated {
                layer: name.to_string(),
                pattern: pattern.name().to_string(),
                violation,
            }
        })?;
        out.status = if out.mask.nnz() == out.mask.len() {
            LayerStatus::Dense
        } else {
            LayerStatus::Structured
        };
    }
    Ok(())
}

/// Updates the block statistics of a layer whose mask density targeting changed.
fn restat(out: &mut LayerOutcome) {
    let mask = &out.mask;
    match &out.structure {
        Some(Structure::Rows) => {
            let kept = mask.nonempty_rows().len();
            out.stats.kept_rows = Some(kept);
            out.stats.blocks = Some(usize::from(kept > 0));
            out.stats.rows_per_block = Spread::of([kept]);
        }
        Some(Structure::Classes) => {
            let classes = row_classes(mask);
            out.stats.blocks = Some(classes.len());
            out.stats.rows_per_block = Spread::of(classes.iter().map(|c| c.rows.len()));
            out.stats.cols_per_block = Spread::of(classes.iter().map(|c| c.cols.len()));
        }
        Some(s @ (Structure::Shuffled { .. } | Structure::Tiles { .. })) => {
            let mut tiles = Vec::new();
            s.for_each_tile(mask.rows(), mask.cols(), |rs, cs| {
                if Structure::tile_kept(mask, rs, cs) == Some(true) {
                    tiles.push((rs.len(), cs.len()));
                }
            });
            out.stats.blocks = Some(tiles.len());
            if matches!(s, Structure::Shuffled { .. }) {
                out.stats.rows_per_block = Spread::of(tiles.iter().map(|t| t.0));
                out.stats.cols_per_block = Spread::of(tiles.iter().map(|t| t.1));
            }
        }
        Some(Structure::Nm { .. }) | None => {}
    }
}

fn weights_or_ones(weights: Option<&[f32]>, len: usize) -> Vec<f32> {
    weights.map_or_else(|| vec![1.0; len], <[f32]>::to_vec)
}

/// 64-bit FNV-1a, a hash that is stable across platforms and Rust versions.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A selected layer after validation.
struct Prepared<'a> {
    tensor: &'a MaskTensor,
    mask: Mask,
    weights: Option<&'a [f32]>,
    scores: Option<&'a [f32]>,
}

impl Prepared<'_> {
    fn input(&self) -> LayerInput<'_> {
        LayerInput {
            name: &self.tensor.name,
            shape: &self.tensor.shape,
            mask: &self.mask,
            weights: self.weights,
            scores: self.scores,
        }
    }
}

/// Validates the inputs and returns the selected layers: names and shapes must match, weights
/// must be finite floats, masks must not be all zero, the selection must not be empty.
fn prepare<'a>(inputs: &ConvertInputs<'a>, pattern: &Pattern) -> Result<Vec<Prepared<'a>>> {
    let masks = inputs.masks;
    let needs_scores =
        matches!(pattern, Pattern::Channel(c) if c.criterion == ChannelCriterion::Scores);
    if needs_scores && inputs.scores.is_none() {
        return Err(Error::param("--criterion", "scores", "needs --scores FILE"));
    }
    let mut out = Vec::new();
    for t in masks.tensors() {
        if !inputs.selector.selects(&t.name, &t.shape) {
            continue;
        }
        let view = MatrixView::of(&t.shape).ok_or_else(|| Error::BadLength {
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            len: t.data.len(),
        })?;
        if t.data.len() != view.len() {
            return Err(Error::BadLength {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
                len: t.data.len(),
            });
        }
        let weights = match inputs.weights {
            None => None,
            Some(wf) => Some(matching_values(wf, t, masks.path())?),
        };
        let scores = match inputs.scores {
            Some(sf) if matches!(pattern, Pattern::Channel(_)) => {
                let s = sf.get(&t.name).ok_or_else(|| Error::MissingTensor {
                    path: sf.path().to_path_buf(),
                    tensor: t.name.clone(),
                    shape: vec![view.rows],
                    named_in: masks.path().to_path_buf(),
                })?;
                let values = s.float_values(sf.path())?;
                s.check_finite(sf.path())?;
                if values.len() != view.rows {
                    return Err(Error::ShapeMismatch {
                        tensor: t.name.clone(),
                        left: sf.path().to_path_buf(),
                        left_shape: s.shape.clone(),
                        right: masks.path().to_path_buf(),
                        right_shape: vec![view.rows],
                    });
                }
                Some(values)
            }
            _ => None,
        };
        let mask = Mask::from_bytes(view.rows, view.cols, t.data.clone())?;
        if mask.nnz() == 0 {
            return Err(Error::AllZeroMask {
                path: masks.path().to_path_buf(),
                tensor: t.name.clone(),
                shape: t.shape.clone(),
            });
        }
        out.push(Prepared {
            tensor: t,
            mask,
            weights,
            scores,
        });
    }
    if out.is_empty() {
        return Err(Error::EmptySelection {
            path: masks.path().to_path_buf(),
            detail: inputs.selector.describe(),
        });
    }
    Ok(out)
}

/// The weight values matching a mask tensor, checked for name, shape, dtype and finiteness.
pub fn matching_values<'a>(
    weights: &'a WeightFile,
    t: &MaskTensor,
    mask_path: &Path,
) -> Result<&'a [f32]> {
    let w = weights.get(&t.name).ok_or_else(|| Error::MissingTensor {
        path: weights.path().to_path_buf(),
        tensor: t.name.clone(),
        shape: t.shape.clone(),
        named_in: mask_path.to_path_buf(),
    })?;
    if w.shape != t.shape {
        return Err(Error::ShapeMismatch {
            tensor: t.name.clone(),
            left: mask_path.to_path_buf(),
            left_shape: t.shape.clone(),
            right: weights.path().to_path_buf(),
            right_shape: w.shape.clone(),
        });
    }
    let values = w.float_values(weights.path())?;
    w.check_finite(weights.path())?;
    Ok(values)
}

/// Converts every selected layer of `inputs.masks` into `pattern`, in parallel, then moves it to
/// `inputs.target` when one is given. `on_layer` is called as each layer finishes (for progress
/// bars); with a global target, after all layers are converted.
pub fn convert(
    inputs: &ConvertInputs<'_>,
    pattern: &Pattern,
    seed: u64,
    on_layer: &(dyn Fn(&LayerReport) + Sync),
) -> Result<Conversion> {
    pattern.validate()?;
    if let Some(t) = &inputs.target {
        t.validate()?;
        if matches!(pattern, Pattern::Group(g) if g.kernels) {
            return Err(Error::param(
                "kernels",
                "true",
                "a density target moves a group pattern's single columns, which would cut \
                 kernels apart; convert by kernels without a target",
            ));
        }
    }
    let start = Instant::now();
    let layers = prepare(inputs, pattern)?;
    let global = inputs.target.filter(|t| t.scope == Scope::Global);
    let per_layer = inputs.target.filter(|t| t.scope == Scope::Layer);

    let convert_one = |p: &Prepared<'_>| -> Result<(LayerOutcome, Option<String>, f64)> {
        let t0 = Instant::now();
        let input = p.input();
        let mut outcome = convert_layer(&input, pattern, seed ^ stable_hash(&p.tensor.name))?;
        let mut note = None;
        if let Some(t) = per_layer {
            note = retarget_layers(pattern, &[p], std::slice::from_mut(&mut outcome), &t)?
                .pop()
                .flatten();
        }
        Ok((outcome, note, t0.elapsed().as_secs_f64() * 1e3))
    };
    // The report of a finished layer, with the obvious baseline at the density it reached.
    let finish = |p: &Prepared<'_>, outcome: &LayerOutcome, note: Option<String>, ms: f64| {
        let input = p.input();
        let base = match (p.weights, MatrixView::of(&p.tensor.shape)) {
            (Some(w), Some(view)) if outcome.status == LayerStatus::Structured => {
                crate::baseline::baseline_mask(
                    pattern,
                    w,
                    view,
                    outcome.mask.nnz(),
                    outcome.stats.blocks.unwrap_or(0),
                    seed ^ stable_hash(&p.tensor.name),
                )?
                .map(|m| m.magnitude(w))
            }
            _ => None,
        };
        let mags = p.weights.map(|w| {
            let output = outcome.mask.magnitude(w);
            Magnitudes {
                input: p.mask.magnitude(w),
                output,
                // A layer without a baseline counts at its own value in the total.
                baseline: base.unwrap_or(output),
            }
        });
        let mut report = layer_report(&input, outcome, mags.as_ref(), base.is_some(), ms);
        report.target_note = note;
        on_layer(&report);
        Ok::<_, Error>((report, mags.unwrap_or_default()))
    };

    let results: Vec<(LayerOutcome, LayerReport, Magnitudes)> = match global {
        None => layers
            .par_iter()
            .map(|p| {
                let (outcome, note, ms) = convert_one(p)?;
                let (report, mags) = finish(p, &outcome, note, ms)?;
                Ok((outcome, report, mags))
            })
            .collect::<Result<_>>()?,
        Some(t) => {
            let done: Vec<(LayerOutcome, Option<String>, f64)> =
                layers.par_iter().map(convert_one).collect::<Result<_>>()?;
            let (mut outcomes, times): (Vec<LayerOutcome>, Vec<f64>) =
                done.into_iter().map(|(o, _, ms)| (o, ms)).unzip();
            let refs: Vec<&Prepared<'_>> = layers.iter().collect();
            retarget_layers(pattern, &refs, &mut outcomes, &t)?;
            layers
                .par_iter()
                .zip(outcomes)
                .zip(times)
                .map(|((p, outcome), ms)| {
                    let (report, mags) = finish(p, &outcome, None, ms)?;
                    Ok((outcome, report, mags))
                })
                .collect::<Result<_>>()?
        }
    };

    let mut converted = std::collections::HashMap::new();
    let mut meta_layers = std::collections::BTreeMap::new();
    let mut reports = Vec::with_capacity(results.len());
    let mut mags = Vec::with_capacity(results.len());
    for (p, (outcome, report, m)) in layers.iter().zip(results) {
        meta_layers.insert(
            p.tensor.name.clone(),
            LayerMeta {
                status: outcome.status,
                reason: outcome.reason.clone(),
                col_perm: outcome.col_perm.clone(),
            },
        );
        converted.insert(p.tensor.name.clone(), outcome.mask.into_bytes());
        reports.push(report);
        mags.push(m);
    }
    let tensors = inputs
        .masks
        .tensors()
        .iter()
        .map(|t| MaskTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: converted.remove(&t.name).unwrap_or_else(|| t.data.clone()),
        })
        .collect();
    let mut masks = MaskFile::new(inputs.masks.path(), tensors);
    masks.metadata = Some(CoarsenMetadata {
        version: METADATA_VERSION,
        pattern: pattern.name().to_string(),
        params: pattern.params(),
        layers: meta_layers,
    });
    let mut report = Report::new(
        pattern.name().to_string(),
        pattern.params(),
        seed,
        reports,
        inputs.weights.map(|_| mags),
        start.elapsed().as_secs_f64() * 1e3,
    );
    if inputs.weights.is_some() {
        report.baseline = Some(crate::baseline::describe(pattern).to_string());
    }
    report.target = inputs.target.map(|t| TargetSummary::of(&t, &report.layers));
    report.sparsity = file_sparsity(&masks, inputs.weights);
    Ok(Conversion { masks, report })
}

/// The sparsity of a whole mask file by coarsen's one definition: every mask tensor is a
/// prunable layer; with weights, every tensor of rank 2 or more is a conv or linear weight.
pub fn file_sparsity(masks: &MaskFile, weights: Option<&WeightFile>) -> crate::Sparsity {
    let kept: Vec<(&str, usize, usize)> = masks
        .tensors()
        .iter()
        .map(|t| {
            let ones = t.data.iter().filter(|&&b| b != 0).count();
            (t.name.as_str(), ones, t.data.len())
        })
        .collect();
    let all: Vec<(&str, usize)> = weights
        .map(|w| {
            w.tensors()
                .iter()
                .filter(|t| t.shape.len() >= 2)
                .map(|t| (t.name.as_str(), t.shape.iter().product()))
                .collect()
        })
        .unwrap_or_default();
    crate::Sparsity::of(kept, all)
}

/// Moves the structured layers among `outcomes` toward `target` (the others are left as they
/// are), re-checks each changed layer against the pattern and refreshes its statistics.
/// Returns a note per outcome for layers that end off target.
fn retarget_layers(
    pattern: &Pattern,
    layers: &[&Prepared<'_>],
    outcomes: &mut [LayerOutcome],
    target: &DensityTarget,
) -> Result<Vec<Option<String>>> {
    let mut idx = Vec::new();
    let mut work = Vec::new();
    let (mut fixed_nnz, mut fixed_len) = (0usize, 0usize);
    for (i, (p, o)) in layers.iter().zip(outcomes.iter_mut()).enumerate() {
        match o.structure.as_ref() {
            Some(structure) if o.status != LayerStatus::Unstructured => {
                idx.push(i);
                work.push(TargetLayer {
                    name: &p.tensor.name,
                    structure,
                    mask: &mut o.mask,
                    input: &p.mask,
                    weights: p.weights,
                });
            }
            _ => {
                fixed_nnz += o.mask.nnz();
                fixed_len += o.mask.len();
            }
        }
    }
    // A global target is for all selected layers: the targeted ones make up for those left
    // as they were.
    let mut target = *target;
    if target.scope == Scope::Global {
        let len: usize = work.iter().map(|l| l.mask.len()).sum();
        if len > 0 && fixed_len > 0 {
            let want = target.density * (len + fixed_len) as f64 - fixed_nnz as f64;
            target.density = (want / len as f64).clamp(f64::MIN_POSITIVE, 1.0);
        }
    }
    let results = retarget(&mut work, &target)?;
    drop(work);
    let mut notes = vec![None; outcomes.len()];
    for (i, r) in idx.into_iter().zip(results) {
        let (p, o) = (layers[i], &mut outcomes[i]);
        if r.added + r.removed > 0 {
            let view = MatrixView::of(&p.tensor.shape)
                .ok_or_else(|| Error::param("layer", &p.tensor.name, "shape has rank < 2"))?;
            o.status = LayerStatus::Structured;
            restat(o);
            let parts = o.stats.parts.unwrap_or(0);
            verify(&p.tensor.name, pattern, view, parts, o)?;
        }
        notes[i] = r.note;
    }
    Ok(notes)
}

/// The report of one layer; `mags` (with weights) give its retained magnitudes, and the
/// baseline's when `has_baseline`.
fn layer_report(
    input: &LayerInput<'_>,
    out: &LayerOutcome,
    mags: Option<&Magnitudes>,
    has_baseline: bool,
    time_ms: f64,
) -> LayerReport {
    let (nnz_in, nnz_out) = (input.mask.nnz(), out.mask.nnz());
    let len = input.mask.len();
    LayerReport {
        name: input.name.to_string(),
        shape: input.shape.to_vec(),
        rows: input.mask.rows(),
        cols: input.mask.cols(),
        status: out.status,
        reason: out.reason.clone(),
        nnz_in,
        nnz_out,
        density_in: crate::report::ratio(nnz_in as f64, len as f64),
        density_out: crate::report::ratio(nnz_out as f64, len as f64),
        recall: crate::report::ratio(input.mask.overlap(&out.mask) as f64, nnz_in as f64),
        retained_magnitude: mags.map(|m| crate::report::ratio(m.output, m.input)),
        baseline_magnitude: mags
            .filter(|_| has_baseline)
            .map(|m| crate::report::ratio(m.baseline, m.input)),
        stats: out.stats.clone(),
        target_note: None,
        time_ms,
    }
}
