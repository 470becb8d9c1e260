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

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use coarsen_core::Selector;

use crate::args::Selection;

/// The layer selector of `--include` / `--exclude`.
pub fn selector(s: &Selection) -> Result<Selector> {
    Ok(Selector::new(s.include.as_deref(), s.exclude.as_deref())?)
}

/// The file a path names, resolved as far as it exists: the canonical path when it exists,
/// else its canonical parent joined with its name.
fn resolved(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(p.file_name()?))
}

/// Refuses outputs that would destroy data before any work: an output that is one of the
/// inputs or another output (`(flag, path)` pairs, compared as resolved files), or an existing
/// path that is not a regular file (a device node, a FIFO) or is a symbolic link (a write
/// would land out of place).
pub fn check_outputs(inputs: &[(&str, &Path)], outputs: &[(&str, &Path)]) -> Result<()> {
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for &(flag, p) in inputs {
        if let Some(r) = resolved(p) {
            seen.push((flag, r));
        }
    }
    for &(flag, p) in outputs {
        if let Ok(meta) = std::fs::symlink_metadata(p) {
            if meta.file_type().is_symlink() {
                bail!(
                    "{flag} {}: is a symbolic link; give the file it points to, or another name",
                    p.display()
                );
            }
            if !meta.is_file() {
                bail!(
                    "{flag} {}: exists and is not a regular file; give a file name",
                    p.display()
                );
            }
        }
        if let Some(r) = resolved(p) {
            if let Some((other, _)) = seen.iter().find(|(_, q)| *q == r) {
                bail!(
                    "{flag} {}: is also {other}; an output never replaces an input or another output",
                    p.display()
                );
            }
            seen.push((flag, r));
        }
    }
    Ok(())
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
