//! Pictures of masks: rows and columns reordered so the structure shows, drawn as PNG (ones
//! black, zeros white; several panels side by side share one ordering).

use std::path::Path;

use anyhow::{Context, Result};
use coarsen_core::patterns::row_classes;
use coarsen_core::{Mask, MatrixView};

/// Largest side of a panel in pixels (per axis); larger masks are averaged down.
const MAX_SIDE: usize = 1024;
/// Small masks are magnified up to this side.
const MIN_SIDE: usize = 384;
const GAP: usize = 12;

/// A row order and a column order of a mask's matrix view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ordering {
    /// Rows in drawing order.
    pub rows: Vec<usize>,
    /// Columns in drawing order.
    pub cols: Vec<usize>,
}

/// The ordering that shows `mask`'s structure: rows by row class (largest class first, empty rows
/// last), columns by the classes that use them (columns of the first class first, and so on), so
/// group and shuffled blocks appear as dense rectangles. With an N:M `col_perm`, columns follow
/// the permutation instead and rows keep their order.
pub fn structure_order(mask: &Mask, view: MatrixView, col_perm: Option<&[usize]>) -> Ordering {
    if let Some(perm) = col_perm {
        let cols = perm
            .iter()
            .flat_map(|&c| (0..view.inner).map(move |s| c * view.inner + s))
            .collect();
        return Ordering {
            rows: (0..mask.rows()).collect(),
            cols,
        };
    }
    let classes = row_classes(mask);
    let mut rows: Vec<usize> = classes
        .iter()
        .flat_map(|c| c.rows.iter().copied())
        .collect();
    let mut seen = vec![false; mask.rows()];
    rows.iter().for_each(|&r| seen[r] = true);
    rows.extend((0..mask.rows()).filter(|&r| !seen[r]));

    let keyed = classes.len().min(256);
    let words = keyed.div_ceil(64).max(1);
    let mut keys = vec![vec![0u64; words]; mask.cols()];
    for (i, class) in classes.iter().take(keyed).enumerate() {
        for &c in &class.cols {
            keys[c][i / 64] |= 1u64 << (63 - i % 64);
        }
    }
    let mut cols: Vec<usize> = (0..mask.cols()).collect();
    cols.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
    Ordering { rows, cols }
}

/// Draws `panels` (masks of one shape) side by side in `order` and writes a PNG.
pub fn draw(panels: &[&Mask], order: &Ordering, path: &Path) -> Result<()> {
    let (rows, cols) = (order.rows.len(), order.cols.len());
    // Each axis on its own: average `shrink` cells into a pixel, or magnify a cell to `grow`.
    let (rs, rg) = axis_scale(rows);
    let (cs, cg) = axis_scale(cols);
    let (ph, pw) = (rows.div_ceil(rs) * rg, cols.div_ceil(cs) * cg);
    let width = (panels.len() * pw + panels.len().saturating_sub(1) * GAP).max(1);
    let height = ph.max(1);
    let mut img = vec![0u8; width * height * 3];
    for px in img.chunks_exact_mut(3) {
        px.copy_from_slice(&[205, 222, 240]);
    }
    for (p, mask) in panels.iter().enumerate() {
        let x0 = p * (pw + GAP);
        for y in 0..rows.div_ceil(rs) {
            for x in 0..cols.div_ceil(cs) {
                let (mut ones, mut cells) = (0usize, 0usize);
                for &r in &order.rows[y * rs..((y + 1) * rs).min(rows)] {
                    for &c in &order.cols[x * cs..((x + 1) * cs).min(cols)] {
                        ones += mask.get(r, c) as usize;
                        cells += 1;
                    }
                }
                let v = 255 - (255 * ones / cells.max(1)) as u8;
                for dy in 0..rg {
                    for dx in 0..cg {
                        let i = ((y * rg + dy) * width + x0 + x * cg + dx) * 3;
                        img[i..i + 3].copy_from_slice(&[v, v, v]);
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width.max(1) as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("encoding PNG")?;
        writer.write_image_data(&img).context("encoding PNG")?;
    }
    coarsen_core::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// (shrink, grow) of one axis of `n` cells: at most `MAX_SIDE` pixels, magnified towards
/// `MIN_SIDE` when small.
fn axis_scale(n: usize) -> (usize, usize) {
    let n = n.max(1);
    if n > MAX_SIDE {
        (n.div_ceil(MAX_SIDE), 1)
    } else {
        (1, (MIN_SIDE / n).clamp(1, 16))
    }
}

/// A file name for a tensor: letters, digits, `.`, `-` and `_` kept, anything else `_`.
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_groups_rows_and_columns_of_blocks() {
        // Two interleaved blocks: even rows use odd columns, odd rows use even columns.
        let m = Mask::from_fn(6, 6, |r, c| (r % 2) != (c % 2));
        let o = structure_order(&m, MatrixView::matrix(6, 6), None);
        assert_eq!(o.rows, vec![0, 2, 4, 1, 3, 5]);
        assert_eq!(o.cols, vec![1, 3, 5, 0, 2, 4]);
    }

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mask::from_fn(20, 2000, |r, c| (r + c) % 3 == 0);
        let o = structure_order(&m, MatrixView::matrix(20, 2000), None);
        let p = dir.path().join("x.png");
        draw(&[&m, &m], &o, &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(file_stem("layer1.0/conv:w"), "layer1.0_conv_w");
    }
}
