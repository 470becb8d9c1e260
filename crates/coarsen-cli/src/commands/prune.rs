//! `coarsen prune`: unstructured magnitude pruning.

use anyhow::Result;
use coarsen_core::{
    magnitude_prune, Error, Mask, MaskFile, MaskTensor, MatrixView, PruneInput, Scope, Selector,
    WeightFile,
};

use crate::args::{PruneArgs, ScopeArg};
use crate::commands::{ensure_parent, selector};
use crate::progress;

/// Runs `coarsen prune`.
pub fn run(args: &PruneArgs, quiet: bool) -> Result<()> {
    coarsen_core::prune::check_sparsity(args.sparsity)?;
    ensure_parent(&args.out)?;
    let sel = selector(&args.selection)?;
    let spin = progress::spinner("pruning", quiet);
    spin.set_message(format!("reading {}", args.weights.display()));
    let weights = WeightFile::read(&args.weights)?;
    let previous = args.mask.as_ref().map(MaskFile::read).transpose()?;
    let masks = prune_file(
        &weights,
        previous.as_ref(),
        &sel,
        args.sparsity,
        scope(args.scope),
    )?;
    spin.set_message(format!("writing {}", args.out.display()));
    masks.write(&args.out)?;
    spin.finish_and_clear();
    print!("{}", density_table(&masks));
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn scope(s: ScopeArg) -> Scope {
    match s {
        ScopeArg::Global => Scope::Global,
        ScopeArg::Layer => Scope::Layer,
    }
}

/// A layer to prune: name, shape, weights and its current mask (when pruning further).
struct Layer<'a> {
    name: String,
    shape: Vec<usize>,
    values: &'a [f32],
    mask: Option<Mask>,
}

/// Prunes the selected layers of `weights` (or, with `previous`, the selected layers of that mask
/// further) and returns the mask file of those layers.
pub fn prune_file(
    weights: &WeightFile,
    previous: Option<&MaskFile>,
    sel: &Selector,
    sparsity: f64,
    scope: Scope,
) -> Result<MaskFile> {
    // The layers: the previous mask's tensors, or every selected floating-point weight.
    let mut layers: Vec<Layer<'_>> = Vec::new();
    match previous {
        Some(prev) => {
            for t in prev
                .tensors()
                .iter()
                .filter(|t| sel.selects(&t.name, &t.shape))
            {
                let values = coarsen_core::matching_values(weights, t, prev.path())?;
                let view = view_of(&t.shape);
                let mask = Mask::from_bytes(view.rows, view.cols, t.data.clone())?;
                layers.push(Layer {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values,
                    mask: Some(mask),
                });
            }
        }
        None => {
            for t in weights
                .tensors()
                .iter()
                .filter(|t| sel.selects(&t.name, &t.shape))
            {
                let Some(values) = t.values() else {
                    eprintln!(
                        "note: skipping '{}' ({} is not a floating-point dtype)",
                        t.name, t.dtype
                    );
                    continue;
                };
                t.check_finite(weights.path())?;
                layers.push(Layer {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values,
                    mask: None,
                });
            }
        }
    }
    if layers.is_empty() {
        return Err(Error::EmptySelection {
            path: previous
                .map_or(weights.path(), MaskFile::path)
                .to_path_buf(),
            detail: sel.describe(),
        }
        .into());
    }
    let inputs: Vec<PruneInput<'_>> = layers
        .iter()
        .map(|l| {
            let v = view_of(&l.shape);
            PruneInput {
                name: &l.name,
                rows: v.rows,
                cols: v.cols,
                weights: l.values,
                mask: l.mask.as_ref(),
            }
        })
        .collect();
    let masks = magnitude_prune(&inputs, sparsity, scope)?;
    let tensors = layers
        .iter()
        .zip(masks)
        .map(|(l, m)| MaskTensor {
            name: l.name.clone(),
            shape: l.shape.clone(),
            data: m.into_bytes(),
        })
        .collect();
    Ok(MaskFile::new(weights.path(), tensors))
}

fn view_of(shape: &[usize]) -> MatrixView {
    MatrixView::of(shape).unwrap_or_else(|| MatrixView::matrix(1, shape.iter().product()))
}

/// Per-layer and total density of a mask file.
pub fn density_table(masks: &MaskFile) -> String {
    let w = masks
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!(
        "{:<w$}  {:>18}  {:>10}  {:>8}\n",
        "layer", "shape", "weights", "density"
    );
    let (mut n, mut ones) = (0usize, 0usize);
    for t in masks.tensors() {
        let k: usize = t.data.iter().map(|&b| b as usize).sum();
        let shape = t
            .shape
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("x");
        s += &format!(
            "{:<w$}  {:>18}  {:>10}  {:>8.4}\n",
            t.name,
            shape,
            t.data.len(),
            k as f64 / t.data.len().max(1) as f64
        );
        n += t.data.len();
        ones += k;
    }
    s += &format!(
        "{:<w$}  {:>18}  {:>10}  {:>8.4}\n",
        "total",
        "",
        n,
        ones as f64 / n.max(1) as f64
    );
    s
}
