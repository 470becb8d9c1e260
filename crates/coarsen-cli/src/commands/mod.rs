//! The subcommands, one file each, and what they share.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod demo_synthetic;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod predict;
pub mod prune;
pub mod synth;
pub mod train;

use std::path::Path;

use anyhow::{bail, Result};
use coarsen_core::Selector;

use crate::args::Selection;

/// The layer selector of `--include` / `--exclude`.
pub fn selector(s: &Selection) -> Result<Selector> {
    Ok(Selector::new(s.include.as_deref(), s.exclude.as_deref())?)
}

/// Fails early, before any work, when the directory an output goes to does not exist.
pub fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "{}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    if path.is_dir() {
        bail!("{}: is a directory; give a file name", path.display());
    }
    Ok(())
}

/// `N` positive sizes separated by `,` or `x` (`R,C,N`, `3x32x32`); `flag` and `names` (e.g.
/// `--input`, `C,H,W`) make the error message.
pub fn parse_sizes<const N: usize>(flag: &str, s: &str, names: &str) -> Result<[usize; N]> {
    let v: Vec<usize> = s
        .split([',', 'x'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("{flag} {s}: expected {names}"))?;
    match <[usize; N]>::try_from(v) {
        Ok(a) if a.iter().all(|&d| d > 0) => Ok(a),
        _ => {
            let count = match N {
                2 => "two".to_string(),
                3 => "three".to_string(),
                n => n.to_string(),
            };
            bail!("{flag} {s}: expected {count} positive sizes {names}")
        }
    }
}

/// A shape for tables: `64×32×3×3`.
pub fn shape_text(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    coarsen_core::io::write_atomic(path, &bytes)?;
    Ok(())
}
