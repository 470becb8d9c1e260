//! `coarsen synth`: randomly initialised weights of a known architecture.

use anyhow::Result;
use coarsen_core::WeightFile;

use crate::args::SynthArgs;
use crate::commands::ensure_parent;

/// Runs `coarsen synth`.
pub fn run(args: &SynthArgs) -> Result<()> {
    ensure_parent(&args.out)?;
    crate::commands::check_outputs(&[], &[("--out", args.out.as_path())])?;
    let arch = coarsen_core::zoo::by_name(&args.model, args.classes)?;
    let tensors = arch.init(args.seed)?;
    WeightFile::write_f32(&args.out, &tensors)?;
    println!(
        "{}: {} tensors, {} conv/linear weights, seed {}",
        arch.name,
        tensors.len(),
        arch.prunable_weights(),
        args.seed
    );
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
