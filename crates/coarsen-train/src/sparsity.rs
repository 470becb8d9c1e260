//! Mask operations of the training methods, on coarsen-core: global magnitude pruning (IMP's
//! step), ERK layer densities, and the post-processing of a mask into channel (Refill,
//! Refill+), group (Regroup) or naive channel structure.

use std::collections::BTreeMap;

use coarsen_core::patterns::{refill, regroup, ChannelConfig, ChannelCriterion, GroupConfig};
use coarsen_core::{magnitude_prune, Mask, MaskSet, MatrixView, PruneInput, Scope};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::Model;

/// A layer's weights and current mask in matrix view.
pub struct LayerView {
    /// Parameter name.
    pub name: String,
    /// Weight shape.
    pub shape: Vec<usize>,
    /// Matrix view.
    pub view: MatrixView,
    /// Weights, row-major.
    pub weights: Vec<f32>,
    /// Current mask (all ones when the layer has none yet).
    pub mask: Mask,
}

/// The views of `names` in `model`.
pub fn layer_views(model: &Model, names: &[String], masks: &MaskSet) -> Result<Vec<LayerView>> {
    names
        .iter()
        .map(|n| {
            let p = model
                .param(n)
                .ok_or_else(|| TrainError::config("layer", n, "the model has no such parameter"))?;
            let shape = p.shape();
            let view = MatrixView::of(&shape)
                .ok_or_else(|| TrainError::config("layer", n, "rank below 2"))?;
            let mask = match masks.get(n) {
                Some(m) if m.shape() == shape.as_slice() => m.mask().clone(),
                Some(m) => {
                    return Err(TrainError::config(
                        "mask",
                        n,
                        format!("has shape {:?}, the weight {shape:?}", m.shape()),
                    ))
                }
                None => Mask::ones(view.rows, view.cols),
            };
            Ok(LayerView {
                name: n.clone(),
                shape,
                view,
                weights: p.values()?,
                mask,
            })
        })
        .collect()
}

/// Global magnitude pruning of `names` to `sparsity` of their weights (already-pruned weights
/// count), one threshold over all of them.
pub fn prune_global(
    model: &Model,
    names: &[String],
    masks: &MaskSet,
    sparsity: f64,
) -> Result<MaskSet> {
    let layers = layer_views(model, names, masks)?;
    let inputs: Vec<PruneInput<'_>> = layers
        .iter()
        .map(|l| PruneInput {
            name: &l.name,
            rows: l.view.rows,
            cols: l.view.cols,
            weights: &l.weights,
            mask: Some(&l.mask),
        })
        .collect();
    let out = magnitude_prune(&inputs, sparsity, Scope::Global)?;
    let mut next = masks.clone();
    for (l, m) in layers.iter().zip(out) {
        next.insert(l.name.clone(), &l.shape, m)?;
    }
    Ok(next)
}

/// Erdős–Rényi-Kernel densities of layers of `shapes` for an overall `density`: `d ∝ Σdims/Πdims`,
/// scaled so that the kept weights match, layers that would exceed 1 made dense and the rest
/// re-solved.
pub fn erk_densities(shapes: &[Vec<usize>], density: f64) -> Vec<f64> {
    let sizes: Vec<f64> = shapes
        .iter()
        .map(|s| s.iter().product::<usize>() as f64)
        .collect();
    let raw: Vec<f64> = shapes
        .iter()
        .zip(&sizes)
        .map(|(s, &n)| s.iter().sum::<usize>() as f64 / n.max(1.0))
        .collect();
    let total: f64 = sizes.iter().sum();
    let mut dense = vec![false; shapes.len()];
    loop {
        let budget = density * total
            - dense
                .iter()
                .zip(&sizes)
                .filter(|(&d, _)| d)
                .map(|(_, &n)| n)
                .sum::<f64>();
        let denom: f64 = (0..shapes.len())
            .filter(|&i| !dense[i])
            .map(|i| raw[i] * sizes[i])
            .sum();
        let eps = if denom > 0.0 { budget / denom } else { 0.0 };
        let mut changed = false;
        for i in 0..shapes.len() {
            if !dense[i] && eps * raw[i] > 1.0 {
                dense[i] = true;
                changed = true;
            }
        }
        if !changed {
            return (0..shapes.len())
                .map(|i| {
                    if dense[i] {
                        1.0
                    } else {
                        (eps * raw[i]).clamp(0.0, 1.0)
                    }
                })
                .collect();
        }
    }
}

/// A layer's mask keeping its `keep` largest-magnitude weights (ties by index).
pub fn top_magnitude(weights: &[f32], rows: usize, cols: usize, keep: usize) -> Result<Mask> {
    let mut idx: Vec<usize> = (0..weights.len()).collect();
    idx.sort_by(|&a, &b| {
        weights[b]
            .abs()
            .total_cmp(&weights[a].abs())
            .then(a.cmp(&b))
    });
    let mut bytes = vec![0u8; weights.len()];
    for &i in idx.iter().take(keep) {
        bytes[i] = 1;
    }
    Ok(Mask::from_bytes(rows, cols, bytes)?)
}

/// How Refill scores channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefillCriterion {
    /// ℓ1 of the masked trained weights of the channel (the paper's choice).
    L1,
    /// Kept entries of the channel (the reference code's default).
    Count,
    /// ℓ1 of the channel's output feature map over one training batch.
    FeatureL1,
    /// ℓ2 (sum of squares) of the channel's output feature map over one training batch.
    FeatureL2,
    /// Σ|F·∂L/∂F| of the channel's output over one training batch.
    Saliency,
}

impl RefillCriterion {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RefillCriterion::L1 => "l1",
            RefillCriterion::Count => "count",
            RefillCriterion::FeatureL1 => "feature-l1",
            RefillCriterion::FeatureL2 => "feature-l2",
            RefillCriterion::Saliency => "saliency",
        }
    }
}

/// How a mask is post-processed into structure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PostProcess {
    /// Refill (`extra = 0`) or Refill+ (`extra > 0`).
    Refill {
        /// Channel score.
        criterion: RefillCriterion,
        /// Refill+'s extra fraction ρ.
        extra: f64,
    },
    /// Regroup.
    Regroup(GroupConfig),
}

impl PostProcess {
    /// The pattern name the result has.
    pub fn pattern(&self) -> &'static str {
        match self {
            PostProcess::Refill { extra, .. } if *extra > 0.0 => "channel+",
            PostProcess::Refill { .. } => "channel",
            PostProcess::Regroup(_) => "group",
        }
    }
}

/// Structures the masks of `names` with coarsen-core. `scores` are per-row scores by layer for
/// the feature and saliency criteria. With `keep`, the structured masks are moved back to the
/// density of `masks` inside their structure (per layer, or over the layers together). Returns
/// the new masks and, per layer, whether it became structured (Regroup may leave a layer
/// unstructured, with the reason).
pub fn post_process(
    model: &Model,
    names: &[String],
    masks: &MaskSet,
    how: &PostProcess,
    scores: Option<&BTreeMap<String, Vec<f32>>>,
    seed: u64,
    keep: Option<Scope>,
) -> Result<(MaskSet, BTreeMap<String, Option<String>>)> {
    let layers = layer_views(model, names, masks)?;
    let mut next = masks.clone();
    let mut status = BTreeMap::new();
    let mut structured: Vec<(usize, Mask)> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (m, reason) = match how {
            PostProcess::Refill { criterion, extra } => {
                let base = match criterion {
                    RefillCriterion::Count => ChannelCriterion::Count,
                    RefillCriterion::L1 => ChannelCriterion::L1,
                    _ => ChannelCriterion::Scores,
                };
                let cfg = ChannelConfig {
                    criterion: base,
                    extra: *extra,
                };
                let s = scores.and_then(|s| s.get(&l.name)).map(Vec::as_slice);
                if base == ChannelCriterion::Scores && s.is_none() {
                    return Err(TrainError::config(
                        "criterion",
                        criterion.as_str(),
                        format!("no scores for {}", l.name),
                    ));
                }
                (refill(&l.mask, Some(&l.weights), s, &cfg)?.0, None)
            }
            PostProcess::Regroup(cfg) => {
                let out = regroup(
                    &l.mask,
                    cfg,
                    seed ^ coarsen_core::stable_hash(&l.name),
                    &l.name,
                )?;
                (out.mask, out.no_block_reason)
            }
        };
        if reason.is_none() {
            structured.push((i, m));
        } else {
            next.insert(l.name.clone(), &l.shape, m)?;
        }
        status.insert(l.name.clone(), reason);
    }
    if let Some(scope) = keep {
        keep_density(&layers, &mut structured, how, scope)?;
    }
    for (i, m) in structured {
        let l = &layers[i];
        next.insert(l.name.clone(), &l.shape, m)?;
    }
    Ok((next, status))
}

/// Moves each structured mask back to its input mask's density (per layer), or all of them to
/// their inputs' density together (global), by pruning or refilling whole rows (Refill) or a
/// block's columns and rows (Regroup).
fn keep_density(
    layers: &[LayerView],
    structured: &mut [(usize, Mask)],
    how: &PostProcess,
    scope: Scope,
) -> Result<()> {
    use coarsen_core::target::{retarget, DensityTarget, Structure, TargetLayer};
    let structure = match how {
        PostProcess::Refill { .. } => Structure::Rows,
        PostProcess::Regroup(_) => Structure::Classes,
    };
    let run = |group: &mut [(usize, Mask)], scope| -> Result<()> {
        let (kept, len) = group.iter().fold((0usize, 0usize), |(k, n), (i, _)| {
            (k + layers[*i].mask.nnz(), n + layers[*i].mask.len())
        });
        if kept == 0 || len == 0 {
            return Ok(());
        }
        let target = DensityTarget {
            density: kept as f64 / len as f64,
            scope,
        };
        let mut work: Vec<TargetLayer<'_>> = group
            .iter_mut()
            .map(|(i, m)| TargetLayer {
                name: &layers[*i].name,
                structure: &structure,
                mask: m,
                input: &layers[*i].mask,
                weights: Some(&layers[*i].weights),
            })
            .collect();
        retarget(&mut work, &target)?;
        Ok(())
    };
    match scope {
        Scope::Global => run(structured, scope),
        Scope::Layer => {
            for one in structured.chunks_mut(1) {
                run(one, scope)?;
            }
            Ok(())
        }
    }
}

/// Naive structured pruning: in each of `names`, keep the `1 − sparsity` fraction of rows
/// (channels) with the largest ℓ1 norm of the dense weights.
pub fn naive_channel(model: &Model, names: &[String], sparsity: f64) -> Result<MaskSet> {
    if !(sparsity > 0.0 && sparsity < 1.0) {
        return Err(TrainError::config(
            "sparsity",
            sparsity,
            "must lie strictly between 0 and 1",
        ));
    }
    let mut out = MaskSet::new();
    for l in layer_views(model, names, &MaskSet::new())? {
        let (r, c) = (l.view.rows, l.view.cols);
        let keep = (((1.0 - sparsity) * r as f64).round() as usize).clamp(1, r);
        let norm: Vec<f64> = (0..r)
            .map(|i| {
                l.weights[i * c..(i + 1) * c]
                    .iter()
                    .map(|w| w.abs() as f64)
                    .sum()
            })
            .collect();
        let mut rows: Vec<usize> = (0..r).collect();
        rows.sort_by(|&a, &b| norm[b].total_cmp(&norm[a]).then(a.cmp(&b)));
        let mut m = Mask::zeros(r, c);
        for &i in rows.iter().take(keep) {
            m.fill_row(i, true);
        }
        out.insert(l.name, &l.shape, m)?;
    }
    Ok(out)
}

/// Fraction of rows that are entirely zero, over the masks of `names` (channel sparsity).
pub fn channel_sparsity(model: &Model, names: &[String], masks: &MaskSet) -> Result<f64> {
    let (mut empty, mut rows) = (0usize, 0usize);
    for l in layer_views(model, names, masks)? {
        rows += l.view.rows;
        empty += l.view.rows - l.mask.nonempty_rows().len();
    }
    Ok(if rows == 0 {
        0.0
    } else {
        empty as f64 / rows as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erk_matches_the_budget_and_caps_at_one() {
        let shapes = vec![
            vec![16, 1, 3, 3],
            vec![32, 16, 3, 3],
            vec![64, 32, 3, 3],
            vec![10, 64],
        ];
        let d = erk_densities(&shapes, 0.2);
        let sizes: Vec<f64> = shapes
            .iter()
            .map(|s| s.iter().product::<usize>() as f64)
            .collect();
        let kept: f64 = d.iter().zip(&sizes).map(|(a, b)| a * b).sum();
        assert!((kept / sizes.iter().sum::<f64>() - 0.2).abs() < 1e-9);
        assert_eq!(d[0], 1.0, "the tiny first conv is dense");
        assert!(d[2] < d[1], "bigger layers are sparser");
    }

    #[test]
    fn keep_density_moves_post_processed_masks_back_to_imp_density() {
        let spec = crate::model::ModelSpec {
            name: "cnn".into(),
            width: 1.0,
            input: [1, 16, 16],
            classes: 4,
        };
        let model = Model::new(&spec, 0).unwrap();
        let names = model.default_prunable();
        let masks = prune_global(&model, &names, &MaskSet::new(), 0.8).unwrap();
        let regroup = PostProcess::Regroup(GroupConfig {
            min_rows: 2,
            row_tile: 8,
            ..Default::default()
        });
        let density = |m: &MaskSet, n: &str| m.get(n).unwrap().density();
        let (per_layer, status) = post_process(
            &model,
            &names,
            &masks,
            &regroup,
            None,
            0,
            Some(Scope::Layer),
        )
        .unwrap();
        let mut moved = 0;
        for n in &names {
            if status[n].is_none() {
                let (before, after) = (density(&masks, n), density(&per_layer, n));
                assert!(
                    (after - before).abs() <= 0.01 + 1.0 / 32.0,
                    "{n}: {before} → {after}"
                );
                moved += 1;
            }
        }
        assert!(moved > 0, "some layer is structured");
        let (plain, _) = post_process(&model, &names, &masks, &regroup, None, 0, None).unwrap();
        assert_ne!(plain, per_layer, "keeping the density changes the masks");
        // Globally, Refill's masks together return to IMP's density.
        let refill = PostProcess::Refill {
            criterion: RefillCriterion::L1,
            extra: 0.0,
        };
        let (global, _) = post_process(
            &model,
            &names,
            &masks,
            &refill,
            None,
            0,
            Some(Scope::Global),
        )
        .unwrap();
        assert!(
            (global.density() - masks.density()).abs() <= 0.01,
            "{} vs {}",
            global.density(),
            masks.density()
        );
    }

    #[test]
    fn top_magnitude_keeps_the_largest() {
        let m = top_magnitude(&[0.1, -3.0, 2.0, 0.5], 2, 2, 2).unwrap();
        assert_eq!(m.as_bytes(), &[0, 1, 1, 0]);
    }
}
