//! Naive references of every product, in f64: what the kernels are tested against.

use coarsen_core::Mask;

/// `Y = W·X` for dense row-major `W` (`rows × cols`) and `X` (`cols × n`).
pub fn forward(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut s = 0.0f64;
            for c in 0..cols {
                s += w[r * cols + c] as f64 * x[c * n + j] as f64;
            }
            y[r * n + j] = s as f32;
        }
    }
    y
}

/// `dX = Wᵀ·dY` (`cols × n`).
pub fn backward_input(w: &[f32], rows: usize, cols: usize, dy: &[f32], n: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; cols * n];
    for c in 0..cols {
        for j in 0..n {
            let mut s = 0.0f64;
            for r in 0..rows {
                s += w[r * cols + c] as f64 * dy[r * n + j] as f64;
            }
            dx[c * n + j] = s as f32;
        }
    }
    dx
}

/// `dW = (dY·Xᵀ) ⊙ mask`, dense `rows × cols`.
pub fn backward_weight(dy: &[f32], x: &[f32], n: usize, mask: &Mask) -> Vec<f32> {
    let (rows, cols) = (mask.rows(), mask.cols());
    let mut dw = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            if mask.get(r, c) {
                let mut s = 0.0f64;
                for j in 0..n {
                    s += dy[r * n + j] as f64 * x[c * n + j] as f64;
                }
                dw[r * cols + c] = s as f32;
            }
        }
    }
    dw
}

/// Whether `got` matches `want` to within f32 rounding of sums of `terms` products whose
/// magnitudes are bounded by `scale`.
pub fn close(got: &[f32], want: &[f32], terms: usize, scale: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} vs {}", got.len(), want.len()));
    }
    let tol = 1e-6 * scale * (terms.max(1) as f32).sqrt() * 4.0 + 1e-6;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if err.is_nan() || err > tol {
            return Err(format!("entry {i}: {g} vs {w} (tolerance {tol})"));
        }
    }
    Ok(())
}
