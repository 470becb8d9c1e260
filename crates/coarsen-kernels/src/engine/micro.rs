//! Register-tiled micro-kernels shared by the engines. Everything here is `#[inline(always)]` so
//! that it is compiled inside the instruction set's entry point (see [`crate::simd`]).

use crate::simd::Simd;

/// `Y[out_rows[i], 0..NV·L] (+)= Σ_k vals[k·MR + i] · X[cols[k], 0..NV·L]` for `i < out_rows.len()
/// ≤ MR`. `x` and `y` point at the tile's first column; `vals` holds `k` groups of `MR` values.
///
/// # Safety
/// Every `cols[k]·ldx + NV·L` must lie inside `x`'s allocation, every `out_rows[i]·ldy + NV·L`
/// inside `y`'s, and `vals` must hold `k·MR` values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn gather_tile<S: Simd, const MR: usize, const NV: usize>(
    k: usize,
    vals: *const f32,
    cols: *const u32,
    x: *const f32,
    ldx: usize,
    out_rows: &[u32],
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    /// Rows of `X` fetched ahead: they come from arbitrary columns, so the hardware prefetcher
    /// cannot guess them.
    const AHEAD: usize = 8;
    let mut acc = [[S::zero(); NV]; MR];
    for kk in 0..k {
        if kk + AHEAD < k {
            let pf = x.add(*cols.add(kk + AHEAD) as usize * ldx);
            S::prefetch(pf);
            S::prefetch(pf.add(NV * S::LANES - 1));
        }
        let xp = x.add(*cols.add(kk) as usize * ldx);
        let mut xv = [S::zero(); NV];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = S::load(xp.add(j * S::LANES));
        }
        let vp = vals.add(kk * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let w = S::bcast(vp.add(i));
            for (a, &xj) in row.iter_mut().zip(&xv) {
                *a = S::fma(w, xj, *a);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        if i < out_rows.len() {
            let yp = y.add(*out_rows.get_unchecked(i) as usize * ldy);
            for (j, &a) in row.iter().enumerate() {
                let p = yp.add(j * S::LANES);
                let v = if accumulate { S::add(a, S::load(p)) } else { a };
                S::store(p, v);
            }
        }
    }
}

/// Copies `X[cols[kk], t·NR .. (t+1)·NR]` (`NR = NV·L`) for `t < tiles` into `buf` laid out
/// tile by tile, `buf[t·k·NR + kk·NR + j]`, so that a micro-kernel reads it sequentially.
/// Vector loads and stores of a width known at compile time (not `memcpy` calls).
///
/// # Safety
/// `x` must hold every `cols[kk]·ldx + tiles·NR` values and `buf` `tiles·k·NR` values.
#[inline(always)]
pub(crate) unsafe fn pack_rows<S: Simd>(
    k: usize,
    cols: *const u32,
    x: *const f32,
    ldx: usize,
    tiles: usize,
    buf: *mut f32,
) {
    let nr = S::NV * S::LANES;
    for kk in 0..k {
        let src = x.add(*cols.add(kk) as usize * ldx);
        let mut dst = buf.add(kk * nr);
        for t in 0..tiles {
            let s = src.add(t * nr);
            for j in 0..S::NV {
                S::store(dst.add(j * S::LANES), S::load(s.add(j * S::LANES)));
            }
            dst = dst.add(k * nr);
        }
    }
}

/// [`gather_tile`] on packed rows: row `kk` of the tile's `X` is at `xp + kk·NV·L`; the values
/// of row `kk` are at `vals + kk·MR`.
///
/// # Safety
/// `xp` must hold `k·NV·L` values, `vals` `k·MR`, and every `out_rows[i]·ldy + NV·L` must lie
/// inside `y`'s allocation.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn packed_tile<S: Simd, const MR: usize, const NV: usize>(
    k: usize,
    vals: *const f32,
    xp: *const f32,
    out_rows: &[u32],
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    let acc = register_tile::<S, MR, NV>(k, vals, xp);
    for (i, accs) in acc.iter().enumerate() {
        if i < out_rows.len() {
            let yp = y.add(*out_rows.get_unchecked(i) as usize * ldy);
            for (j, &a) in accs.iter().enumerate() {
                let p = yp.add(j * S::LANES);
                let v = if accumulate { S::add(a, S::load(p)) } else { a };
                S::store(p, v);
            }
        }
    }
}

/// One column of a panel into the register tile: `acc[i][j] += w[i] · x[j]` for the `R` rows
/// (weights at `w`, consecutive) and the `V` vectors of `x` — the update every implicit and
/// packed GEMM of the kernels runs per column.
///
/// # Safety
/// `w` must hold `R` values.
#[inline(always)]
pub(crate) unsafe fn rank1<S: Simd, const R: usize, const V: usize>(
    acc: &mut [[S::V; V]; R],
    w: *const f32,
    x: &[S::V; V],
) {
    for (i, row) in acc.iter_mut().enumerate() {
        let wv = S::bcast(w.add(i));
        for (a, &xj) in row.iter_mut().zip(x) {
            *a = S::fma(wv, xj, *a);
        }
    }
}

/// The register tile over packed operands: `acc[i][j] = Σ_kk w[kk·MR + i] · b[kk·NR + j·L ..]`
/// (`NR = NV·L`).
///
/// # Safety
/// `w` must hold `kc·MR` values and `b` `kc·NR`.
#[inline(always)]
pub(crate) unsafe fn register_tile<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    w: *const f32,
    b: *const f32,
) -> [[S::V; NV]; MR] {
    let mut acc = [[S::zero(); NV]; MR];
    let nr = NV * S::LANES;
    for kk in 0..kc {
        let row = b.add(kk * nr);
        let mut xv = [S::zero(); NV];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = S::load(row.add(j * S::LANES));
        }
        rank1::<S, MR, NV>(&mut acc, w.add(kk * MR), &xv);
    }
    acc
}

/// The same for single columns `col0..col1` (the ragged end of a row range), one at a time.
///
/// # Safety
/// As [`gather_tile`], for the columns `col0..col1`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn gather_columns(
    k: usize,
    mr: usize,
    vals: *const f32,
    cols: *const u32,
    x: *const f32,
    ldx: usize,
    out_rows: &[u32],
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
    width: usize,
) {
    for c in 0..width {
        for (i, &r) in out_rows.iter().enumerate() {
            let mut s = 0.0f32;
            for kk in 0..k {
                s += *vals.add(kk * mr + i) * *x.add(*cols.add(kk) as usize * ldx + c);
            }
            let p = y.add(r as usize * ldy + c);
            *p = if accumulate { *p + s } else { s };
        }
    }
}

/// Dot products of `WR` rows of `a` with `WC` rows of `b` over `len` values:
/// `out[i][j] = Σ_t a_i[t]·b_j[t]` for `i < WR ≤ 4`, `j < WC ≤ 4`.
///
/// # Safety
/// `a[..WR]` and `b[..WC]` must be valid for `len` values.
#[inline(always)]
pub(crate) unsafe fn dot_tile<S: Simd, const WR: usize, const WC: usize>(
    a: &[*const f32; 4],
    b: &[*const f32; 4],
    len: usize,
    out: &mut [[f32; 4]; 4],
) {
    let mut acc = [[S::zero(); WC]; WR];
    let full = len / S::LANES * S::LANES;
    let mut t = 0;
    while t < full {
        let mut bv = [S::zero(); WC];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = S::load(b[j].add(t));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = S::load(a[i].add(t));
            for (x, &bj) in row.iter_mut().zip(&bv) {
                *x = S::fma(av, bj, *x);
            }
        }
        t += S::LANES;
    }
    for i in 0..WR {
        for j in 0..WC {
            let mut s = S::sum(acc[i][j]);
            for u in full..len {
                s += *a[i].add(u) * *b[j].add(u);
            }
            out[i][j] = s;
        }
    }
}

/// `acc[j] (+)= Σ_e w_e · X[col_e, j·L]` over a list of (column, weight) entries: one row of a
/// row-wise sparse matrix times an `NV·L`-wide tile of `X`, stored to `y`. `x` points at row
/// `col0` of `X` (a chunk of rows packed on their own starts at its first column).
///
/// # Safety
/// Every `col` must be at least `col0` with `(col - col0)·ldx + NV·L` inside `x`'s allocation,
/// and `y` must be valid for `NV·L`.
#[inline(always)]
pub(crate) unsafe fn row_tile<S: Simd, const NV: usize>(
    entries: &[(u32, f32)],
    col0: usize,
    x: *const f32,
    ldx: usize,
    y: *mut f32,
    accumulate: bool,
) {
    let mut acc = [S::zero(); NV];
    if accumulate {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = S::load(y.add(j * S::LANES));
        }
    }
    for &(col, w) in entries {
        let xp = x.add((col as usize - col0) * ldx);
        let wv = S::splat(w);
        for (j, a) in acc.iter_mut().enumerate() {
            *a = S::fma(wv, S::load(xp.add(j * S::LANES)), *a);
        }
    }
    for (j, &a) in acc.iter().enumerate() {
        S::store(y.add(j * S::LANES), a);
    }
}
