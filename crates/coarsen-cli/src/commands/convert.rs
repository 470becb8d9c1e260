//! `coarsen convert`: an unstructured mask into a structured pattern.

use anyhow::Result;
use coarsen_core::{
    Conversion, ConvertInputs, DensityTarget, MaskFile, Pattern, Scope, WeightFile,
};

use crate::args::{ConvertArgs, TargetScopeArg};
use crate::commands::{check_outputs, ensure_parent, selector, write_json};
use crate::{pattern, progress};

/// Runs `coarsen convert`.
pub fn run(args: &ConvertArgs, quiet: bool) -> Result<()> {
    let pattern = pattern::build(args.to, &args.options)?;
    ensure_parent(&args.out)?;
    if let Some(r) = &args.report {
        ensure_parent(r)?;
    }
    let mut inputs = vec![("--mask", args.mask.as_path())];
    inputs.extend(args.weights.as_deref().map(|w| ("--weights", w)));
    inputs.extend(args.options.scores.as_deref().map(|s| ("--scores", s)));
    let mut outputs = vec![("--out", args.out.as_path())];
    outputs.extend(args.report.as_deref().map(|r| ("--report", r)));
    check_outputs(&inputs, &outputs)?;
    let sel = selector(&args.selection)?;
    let target = args.target_density.map(|density| DensityTarget {
        density,
        scope: match args.target_scope {
            TargetScopeArg::Layer => Scope::Layer,
            TargetScopeArg::Global => Scope::Global,
        },
    });
    if let Some(t) = &target {
        t.validate()?;
    }
    let masks = MaskFile::read(&args.mask)?;
    let weights = args.weights.as_ref().map(WeightFile::read).transpose()?;
    let scores = args
        .options
        .scores
        .as_ref()
        .map(WeightFile::read)
        .transpose()?;
    let inputs = ConvertInputs {
        masks: &masks,
        weights: weights.as_ref(),
        scores: scores.as_ref(),
        selector: &sel,
        target,
    };
    let conv = convert_with_progress(&inputs, &pattern, args.seed, quiet)?;
    conv.masks.write(&args.out)?;
    if let Some(r) = &args.report {
        write_json(r, &conv.report)?;
    }
    print!("{}", conv.report.table());
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// [`coarsen_core::convert`] with a progress bar over the layers.
pub fn convert_with_progress(
    inputs: &ConvertInputs<'_>,
    pattern: &Pattern,
    seed: u64,
    quiet: bool,
) -> Result<Conversion> {
    let layers = inputs
        .masks
        .tensors()
        .iter()
        .filter(|t| inputs.selector.selects(&t.name, &t.shape))
        .count();
    let bar = progress::bar(layers as u64, pattern.name(), quiet);
    let result = coarsen_core::convert(inputs, pattern, seed, &|r| {
        bar.set_message(r.name.clone());
        bar.inc(1);
    });
    bar.finish_and_clear();
    Ok(result?)
}
