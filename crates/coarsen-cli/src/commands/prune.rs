//! `coarsen prune`: unstructured magnitude pruning.

use anyhow::Result;
use coarsen_core::prune::prune_file as prune_layers;
use coarsen_core::{Granularity, MaskFile, Scope, Selector, WeightFile};

use crate::args::{GranularityArg, PruneArgs, ScopeArg};
use crate::commands::{check_outputs, ensure_parent, selector};
use crate::progress;

/// Runs `coarsen prune`.
pub fn run(args: &PruneArgs, quiet: bool) -> Result<()> {
    coarsen_core::prune::check_sparsity(args.sparsity)?;
    ensure_parent(&args.out)?;
    let mut inputs = vec![("--weights", args.weights.as_path())];
    inputs.extend(args.mask.as_deref().map(|m| ("--mask", m)));
    check_outputs(&inputs, &[("--out", args.out.as_path())])?;
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
        match args.granularity {
            GranularityArg::Weight => Granularity::Weight,
            GranularityArg::Kernel => Granularity::Kernel,
        },
    )?;
    spin.set_message(format!("writing {}", args.out.display()));
    masks.write(&args.out)?;
    spin.finish_and_clear();
    print!("{}", density_table(&masks));
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Prunes the selected layers of `weights` (or, with `previous`, the selected layers of that mask
/// further), noting each tensor skipped for its dtype.
pub fn prune_file(
    weights: &WeightFile,
    previous: Option<&MaskFile>,
    sel: &Selector,
    sparsity: f64,
    scope: Scope,
    granularity: Granularity,
) -> Result<MaskFile> {
    let (masks, skipped) = prune_layers(weights, previous, sel, sparsity, scope, granularity)?;
    for t in skipped {
        eprintln!(
            "note: skipping '{}' ({} is not a floating-point dtype)",
            t.name.escape_debug(),
            t.dtype
        );
    }
    Ok(masks)
}

fn scope(s: ScopeArg) -> Scope {
    match s {
        ScopeArg::Global => Scope::Global,
        ScopeArg::Layer => Scope::Layer,
    }
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
