//! Aligned blocks: the matrix is cut into H×W tiles at fixed positions (the last row and column
//! of tiles may be cut by the matrix edge); tiles are kept by the magnitude they hold under the
//! input mask, best first, until they cover as many entries as the input mask has ones.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::Mask;

use super::{argsort_desc, masked_magnitudes};

/// Parameters of aligned blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Tile height (rows).
    pub height: usize,
    /// Tile width (columns).
    pub width: usize,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            height: 16,
            width: 16,
        }
    }
}

impl BlockConfig {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.height == 0 || self.width == 0 {
            return Err(Error::param(
                "--block",
                format!("{}x{}", self.height, self.width),
                "tile sides must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Aligned-block version of `mask`. Returns the new mask and the kept tiles as (tile row, tile
/// column) indices.
pub fn aligned_blocks(
    mask: &Mask,
    weights: Option<&[f32]>,
    cfg: &BlockConfig,
) -> Result<(Mask, Vec<(usize, usize)>)> {
    cfg.validate()?;
    let (rows, cols) = (mask.rows(), mask.cols());
    let (h, w) = (cfg.height, cfg.width);
    let (tr, tc) = (rows.div_ceil(h), cols.div_ceil(w));
    let a = masked_magnitudes(mask, weights);
    let mut score = vec![0.0f64; tr * tc];
    for r in 0..rows {
        for c in 0..cols {
            score[(r / h) * tc + c / w] += a[r * cols + c] as f64;
        }
    }
    let area = |t: usize| {
        let (i, j) = (t / tc, t % tc);
        (h.min(rows - i * h)) * (w.min(cols - j * w))
    };
    let target = mask.nnz();
    let mut covered = 0;
    let mut kept = Vec::new();
    for t in argsort_desc(tr * tc, |t| score[t]) {
        if covered >= target || score[t] <= 0.0 {
            break;
        }
        covered += area(t);
        kept.push(t);
    }
    kept.sort_unstable();
    let mut out = Mask::zeros(rows, cols);
    for &t in &kept {
        let (i, j) = (t / tc, t % tc);
        for r in i * h..((i + 1) * h).min(rows) {
            for c in j * w..((j + 1) * w).min(cols) {
                out.set(r, c, true);
            }
        }
    }
    Ok((out, kept.into_iter().map(|t| (t / tc, t % tc)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_heaviest_tiles_to_the_input_density() {
        let m = Mask::from_fn(8, 8, |r, c| (r < 4 && c < 4) || (r == 7 && c == 7));
        let (out, tiles) = aligned_blocks(
            &m,
            None,
            &BlockConfig {
                height: 4,
                width: 4,
            },
        )
        .unwrap();
        // 16 covered < 17 ones, so the next tile with any mass is added too.
        assert_eq!(tiles, vec![(0, 0), (1, 1)]);
        assert_eq!(out.nnz(), 32);
        let m2 = Mask::from_fn(8, 8, |r, c| (r < 4 && c < 4) && !(r == 0 && c == 0));
        let (out2, tiles2) = aligned_blocks(
            &m2,
            None,
            &BlockConfig {
                height: 4,
                width: 4,
            },
        )
        .unwrap();
        assert_eq!(tiles2, vec![(0, 0)]);
        assert_eq!(out2.nnz(), 16);
    }

    #[test]
    fn edge_tiles_are_cut() {
        let m = Mask::ones(5, 7);
        let (out, tiles) = aligned_blocks(
            &m,
            None,
            &BlockConfig {
                height: 4,
                width: 4,
            },
        )
        .unwrap();
        assert_eq!(tiles.len(), 4);
        assert_eq!(out, m);
    }
}
