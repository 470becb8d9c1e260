//! Dense GEMM on faer, with transposed operands: the products dense layers need.

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::error::{check_len, Result};

/// `C = op(A)·op(B)` (or `C += …` with `accumulate`), all buffers row-major. `op(A)` is `m × k`:
/// `A` is stored `m × k`, or `k × m` when `trans_a`; `op(B)` is `k × n`: `B` stored `k × n`, or
/// `n × k` when `trans_b`. Runs on the threads of the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        Par::rayon(threads)
    } else {
        Par::Seq
    };
    run(c, m, n, k, a, trans_a, b, trans_b, accumulate, par)
}

/// [`matmul`] on the calling thread alone, for callers that parallelise over many small
/// products themselves.
#[allow(clippy::too_many_arguments)]
pub fn matmul_serial(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    run(c, m, n, k, a, trans_a, b, trans_b, accumulate, Par::Seq)
}

#[allow(clippy::too_many_arguments)]
fn run(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    check_len("matmul", "a", a.len(), m * k, || format!("{m}x{k}"))?;
    check_len("matmul", "b", b.len(), k * n, || format!("{k}x{n}"))?;
    check_len("matmul", "c", c.len(), m * n, || format!("{m}x{n}"))?;
    let a = if trans_a {
        MatRef::from_row_major_slice(a, k, m).transpose()
    } else {
        MatRef::from_row_major_slice(a, m, k)
    };
    let b = if trans_b {
        MatRef::from_row_major_slice(b, n, k).transpose()
    } else {
        MatRef::from_row_major_slice(b, k, n)
    };
    let c = MatMut::from_row_major_slice_mut(c, m, n);
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    faer_matmul(c, accum, a, b, 1.0f32, par);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_transposes_match_the_reference() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want = crate::reference::forward(&a, m, k, &b, n);
        let t = |x: &[f32], r: usize, c: usize| -> Vec<f32> {
            let mut o = vec![0.0; r * c];
            for i in 0..r {
                for j in 0..c {
                    o[j * r + i] = x[i * c + j];
                }
            }
            o
        };
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let aa = if ta { t(&a, m, k) } else { a.clone() };
            let bb = if tb { t(&b, k, n) } else { b.clone() };
            let mut c = vec![1.0; m * n];
            matmul(&mut c, m, n, k, &aa, ta, &bb, tb, false).unwrap();
            assert_eq!(c, want, "{ta} {tb}");
            matmul(&mut c, m, n, k, &aa, ta, &bb, tb, true).unwrap();
            assert!(c.iter().zip(&want).all(|(x, w)| (x - 2.0 * w).abs() < 1e-4));
            matmul_serial(&mut c, m, n, k, &aa, ta, &bb, tb, false).unwrap();
            assert_eq!(c, want, "serial {ta} {tb}");
        }
        assert!(matmul(
            &mut [0.0; 3],
            2,
            2,
            2,
            &[0.0; 4],
            false,
            &[0.0; 4],
            false,
            false
        )
        .is_err());
    }
}
