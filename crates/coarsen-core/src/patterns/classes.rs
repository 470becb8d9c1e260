//! Row classes: the rows of a mask grouped by identical pattern. Under a group pattern every
//! class is a dense rows × columns block; kernels and pictures use them to find the blocks.

use std::collections::HashMap;

use crate::mask::Mask;

/// Rows with one and the same non-empty pattern, and the columns of that pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowClass {
    /// The rows, ascending.
    pub rows: Vec<usize>,
    /// The columns where these rows are 1, ascending.
    pub cols: Vec<usize>,
}

/// The non-empty row classes of `mask`, most rows first (ties by first row).
pub fn row_classes(mask: &Mask) -> Vec<RowClass> {
    let mut by_pattern: HashMap<&[u8], usize> = HashMap::new();
    let mut classes: Vec<RowClass> = Vec::new();
    for r in 0..mask.rows() {
        let row = mask.row(r);
        if !row.contains(&1) {
            continue;
        }
        match by_pattern.get(row) {
            Some(&i) => classes[i].rows.push(r),
            None => {
                by_pattern.insert(row, classes.len());
                classes.push(RowClass {
                    rows: vec![r],
                    cols: row
                        .iter()
                        .enumerate()
                        .filter(|(_, &b)| b != 0)
                        .map(|(c, _)| c)
                        .collect(),
                });
            }
        }
    }
    classes.sort_by(|a, b| {
        b.rows
            .len()
            .cmp(&a.rows.len())
            .then(a.rows[0].cmp(&b.rows[0]))
    });
    classes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_identical_rows() {
        let m = Mask::from_fn(5, 4, |r, c| match r {
            0 | 3 | 4 => c < 2,
            1 => c == 3,
            _ => false,
        });
        let classes = row_classes(&m);
        assert_eq!(classes.len(), 2);
        assert_eq!(classes[0].rows, vec![0, 3, 4]);
        assert_eq!(classes[0].cols, vec![0, 1]);
        assert_eq!(classes[1].rows, vec![1]);
        assert_eq!(classes[1].cols, vec![3]);
    }
}
