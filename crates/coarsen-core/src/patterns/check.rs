//! Checks of each pattern's defining property, from the mask alone (design.md, "Pattern
//! properties"). Each returns `Err` with a sentence naming the first violation.

use crate::mask::Mask;
use crate::view::MatrixView;

use super::classes::row_classes;
use super::Pattern;

/// Checks `mask` against `pattern`. `parts` is the number of parts a group layer was split into
/// (the bound on its distinct row patterns); `col_perm` is an N:M layer's permutation.
pub fn check(
    pattern: &Pattern,
    mask: &Mask,
    view: MatrixView,
    parts: usize,
    col_perm: Option<&[usize]>,
) -> Result<(), String> {
    match pattern {
        Pattern::Channel(_) => check_channel(mask),
        Pattern::Group(_) => check_group(mask, parts),
        Pattern::ShuffledBlock(c) => check_shuffled(mask, c.block),
        Pattern::Block(c) => check_block(mask, c.height, c.width),
        Pattern::Nm(c) => check_nm(mask, view, c.n, c.m, col_perm),
    }
}

/// Every row is all zeros or all ones.
pub fn check_channel(mask: &Mask) -> Result<(), String> {
    for r in 0..mask.rows() {
        let n = mask.row_nnz(r);
        if n != 0 && n != mask.cols() {
            return Err(format!("row {r} has {n} of {} ones", mask.cols()));
        }
    }
    Ok(())
}

/// At most `k` distinct non-empty row patterns.
pub fn check_group(mask: &Mask, k: usize) -> Result<(), String> {
    let classes = row_classes(mask).len();
    if classes > k {
        return Err(format!("{classes} distinct row patterns, more than {k}"));
    }
    Ok(())
}

/// Every non-empty row class has a row count and a column count that are multiples of `b`, where
/// a group or tile cut by the matrix edge counts as whole: a row count may be `R mod b` more than
/// a multiple of b (for one class at most), a column count `C mod b` more.
pub fn check_shuffled(mask: &Mask, b: usize) -> Result<(), String> {
    let (rr, cr) = (mask.rows() % b, mask.cols() % b);
    let mut short = 0;
    for class in row_classes(mask) {
        let (nr, nc) = (class.rows.len(), class.cols.len());
        if nr % b != 0 {
            if nr % b != rr {
                return Err(format!(
                    "a row class of {nr} rows (first row {}) is not a multiple of {b}",
                    class.rows[0]
                ));
            }
            short += 1;
        }
        if nc % b != 0 && nc % b != cr {
            return Err(format!(
                "a row class (first row {}) has {nc} columns, not a multiple of {b}",
                class.rows[0]
            ));
        }
    }
    if short > 1 {
        return Err(format!(
            "{short} row classes are cut short; at most one may be"
        ));
    }
    Ok(())
}

/// Every aligned `h`×`w` tile is all zeros or all ones.
pub fn check_block(mask: &Mask, h: usize, w: usize) -> Result<(), String> {
    let (rows, cols) = (mask.rows(), mask.cols());
    for i in (0..rows).step_by(h.max(1)) {
        for j in (0..cols).step_by(w.max(1)) {
            let first = mask.get(i, j);
            for r in i..(i + h).min(rows) {
                for c in j..(j + w).min(cols) {
                    if mask.get(r, c) != first {
                        return Err(format!("the tile at ({i}, {j}) is mixed"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// After `col_perm`, every group of `m` consecutive input channels at a fixed (row, kernel
/// position) holds at most `n` ones.
pub fn check_nm(
    mask: &Mask,
    view: MatrixView,
    n: usize,
    m: usize,
    col_perm: Option<&[usize]>,
) -> Result<(), String> {
    let identity: Vec<usize>;
    let perm = match col_perm {
        Some(p) => {
            let mut sorted = p.to_vec();
            sorted.sort_unstable();
            if sorted != (0..view.in_channels).collect::<Vec<_>>() {
                return Err(format!(
                    "col_perm is not a permutation of {} input channels",
                    view.in_channels
                ));
            }
            p
        }
        None => {
            identity = (0..view.in_channels).collect();
            &identity
        }
    };
    for r in 0..view.rows {
        for s in 0..view.inner {
            for (g, group) in perm.chunks(m).enumerate() {
                let ones = group
                    .iter()
                    .filter(|&&c| mask.get(r, view.col(c, s)))
                    .count();
                if ones > n {
                    return Err(format!(
                        "row {r}, kernel position {s}, group {g} holds {ones} ones (more than {n})"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_catches_a_violation() {
        assert!(check_channel(&Mask::from_fn(2, 3, |r, _| r == 0)).is_ok());
        assert!(check_channel(&Mask::from_fn(2, 3, |r, c| r == 0 && c > 0)).is_err());
        let two = Mask::from_fn(4, 4, |r, c| (r < 2) == (c < 2));
        assert!(check_group(&two, 2).is_ok());
        assert!(check_group(&two, 1).is_err());
        assert!(check_block(&Mask::from_fn(4, 4, |r, c| r < 2 && c < 2), 2, 2).is_ok());
        assert!(check_block(&Mask::from_fn(4, 4, |r, c| r < 1 && c < 2), 2, 2).is_err());
        let v = MatrixView::matrix(1, 8);
        let m = Mask::from_fn(1, 8, |_, c| c < 2 || c == 4);
        assert!(check_nm(&m, v, 2, 4, None).is_ok());
        assert!(check_nm(&Mask::from_fn(1, 8, |_, c| c < 3), v, 2, 4, None).is_err());
        // Permuting channels 2 and 4 moves a one into the first group.
        assert!(check_nm(&m, v, 2, 4, Some(&[0, 1, 4, 3, 2, 5, 6, 7])).is_err());
        assert!(check_nm(&m, v, 2, 4, Some(&[0, 0, 1, 2, 3, 4, 5, 6])).is_err());
    }

    #[test]
    fn shuffled_allows_one_short_edge_class() {
        // 20 rows, b = 8: groups of 8, 8 and 4 rows; 12 columns: chunks of 8 and 4.
        let m = Mask::from_fn(20, 12, |r, c| (r < 16 && c < 8) || (r >= 16 && c >= 8));
        assert!(check_shuffled(&m, 8).is_ok());
        let bad = Mask::from_fn(20, 12, |r, c| r < 3 && c < 8);
        assert!(check_shuffled(&bad, 8).is_err());
        let bad_cols = Mask::from_fn(16, 16, |r, c| r < 8 && c < 5);
        assert!(check_shuffled(&bad_cols, 8).is_err());
    }
}
