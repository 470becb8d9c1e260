//! `coarsen inspect`: what a mask file holds, per layer, and pictures of it.

use anyhow::Result;
use coarsen_core::patterns::{check, row_classes};
use coarsen_core::{Mask, MaskFile, MatrixView, Pattern, WeightFile};

use crate::args::InspectArgs;
use crate::commands::selector;
use crate::picture;
use crate::progress;

/// One row of the inspect table.
struct Row {
    name: String,
    shape: String,
    density: f64,
    classes: usize,
    empty_rows: usize,
    status: String,
    check: String,
    magnitude: Option<f64>,
    recall: Option<f64>,
}

/// Runs `coarsen inspect`.
pub fn run(args: &InspectArgs, quiet: bool) -> Result<()> {
    let masks = MaskFile::read(&args.mask)?;
    let weights = args.weights.as_ref().map(WeightFile::read).transpose()?;
    let before = args.before.as_ref().map(MaskFile::read).transpose()?;
    let sel = selector(&args.selection)?;
    if let Some(dir) = &args.png {
        std::fs::create_dir_all(dir).map_err(|e| coarsen_core::Error::io(dir, e))?;
    }
    let pattern = match &masks.metadata {
        Some(meta) => Some(Pattern::from_metadata(&meta.pattern, &meta.params)?),
        None => None,
    };
    let layers: Vec<_> = masks
        .tensors()
        .iter()
        .filter(|t| sel.selects(&t.name, &t.shape))
        .collect();
    if layers.is_empty() {
        return Err(coarsen_core::Error::EmptySelection {
            path: masks.path().to_path_buf(),
            detail: sel.describe(),
        }
        .into());
    }
    let bar = progress::bar(layers.len() as u64, "inspecting", quiet);
    let mut rows = Vec::new();
    for t in layers {
        bar.set_message(t.name.clone());
        let view = MatrixView::of(&t.shape).unwrap_or_else(|| MatrixView::matrix(1, t.data.len()));
        let mask = Mask::from_bytes(view.rows, view.cols, t.data.clone())?;
        let meta = masks.metadata.as_ref().and_then(|m| m.layers.get(&t.name));
        let col_perm = meta.and_then(|m| m.col_perm.as_deref());
        let classes = row_classes(&mask).len();
        let status = meta.map_or("-".to_string(), |m| m.status.as_str().to_string());
        let check = match (&pattern, meta) {
            (Some(p), Some(m)) if m.status != coarsen_core::LayerStatus::Unstructured => {
                let parts = p.max_row_patterns(view.rows);
                match check(p, &mask, view, parts, col_perm) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("VIOLATED: {e}"),
                }
            }
            _ => "-".to_string(),
        };
        let magnitude = match &weights {
            Some(w) => {
                let values = coarsen_core::matching_values(w, t, masks.path())?;
                let all: f64 = values.iter().map(|v| v.abs() as f64).sum();
                Some(if all > 0.0 {
                    mask.magnitude(values) / all
                } else {
                    0.0
                })
            }
            None => None,
        };
        let prior = match &before {
            Some(b) => match b.get(&t.name) {
                Some(bt) if bt.shape == t.shape => {
                    Some(Mask::from_bytes(view.rows, view.cols, bt.data.clone())?)
                }
                Some(bt) => {
                    return Err(coarsen_core::Error::ShapeMismatch {
                        tensor: t.name.clone(),
                        left: masks.path().to_path_buf(),
                        left_shape: t.shape.clone(),
                        right: b.path().to_path_buf(),
                        right_shape: bt.shape.clone(),
                    }
                    .into())
                }
                None => None,
            },
            None => None,
        };
        let recall = prior
            .as_ref()
            .map(|p| p.overlap(&mask) as f64 / p.nnz().max(1) as f64);
        if let Some(dir) = &args.png {
            let order = picture::structure_order(&mask, view, col_perm);
            let path = dir.join(format!("{}.png", picture::file_stem(&t.name)));
            match &prior {
                Some(p) => picture::draw(&[p, &mask], &order, &path)?,
                None => picture::draw(&[&mask], &order, &path)?,
            }
        }
        rows.push(Row {
            name: t.name.clone(),
            shape: t
                .shape
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("x"),
            density: mask.density(),
            classes,
            empty_rows: view.rows - mask.nonempty_rows().len(),
            status,
            check,
            magnitude,
            recall,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    match &masks.metadata {
        Some(m) => println!(
            "{}: pattern {} {}",
            masks.path().display(),
            m.pattern,
            m.params
        ),
        None => println!(
            "{}: no coarsen metadata (an unstructured or foreign mask)",
            masks.path().display()
        ),
    }
    print!("{}", table(&rows));
    if let Some(dir) = &args.png {
        eprintln!(
            "wrote one PNG per layer to {}{}",
            dir.display(),
            if before.is_some() {
                " (left: before, right: after)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    let mut s = format!(
        "{:<w$}  {:>18}  {:>8}  {:>8}  {:>6}  {:>12}  {:>7}  {:>7}  check\n",
        "layer", "shape", "density", "row-pat.", "empty", "status", "magn.", "recall"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
    for r in rows {
        s += &format!(
            "{:<w$}  {:>18}  {:>8.4}  {:>8}  {:>6}  {:>12}  {:>7}  {:>7}  {}\n",
            r.name,
            r.shape,
            r.density,
            r.classes,
            r.empty_rows,
            r.status,
            opt(r.magnitude),
            opt(r.recall),
            r.check
        );
    }
    s
}
