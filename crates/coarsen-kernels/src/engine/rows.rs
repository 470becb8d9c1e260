//! The row engine: CSR and N:M, row by row. Each row's entries are sorted and cut into chunks of
//! `KC` columns, so that a `KC × NC` tile of `X` stays in cache while every row uses it; a row
//! keeps an `NV·L`-wide tile of `Y` in registers and adds `w·X[col]` for each of its entries.
//! `Wᵀ·dY` runs the same kernel on the transposed entries.

use rayon::prelude::*;

use super::blocks::with_dot;
use super::micro::{dot_tile, row_tile};
use super::{split_range, SyncPtr};
use crate::formats::{Csr, NmCompressed};
use crate::simd::{run_task, Isa, Simd, SimdTask};

/// Columns of `W` per chunk.
const KC: usize = 256;

/// Row-sorted entries cut into column chunks.
#[derive(Clone, Debug)]
struct Entries {
    rows: usize,
    chunks: usize,
    /// Entries of (row r, chunk c) are `ptr[r·chunks + c]..ptr[r·chunks + c + 1]`.
    ptr: Vec<u32>,
    /// (column, weight).
    data: Vec<(u32, f32)>,
    /// Index in the format's values of each entry.
    map: Vec<u32>,
}

impl Entries {
    /// From (row, column, value index) triples of a `rows × cols` matrix.
    fn new(rows: usize, cols: usize, mut triples: Vec<(u32, u32, u32)>, values: &[f32]) -> Self {
        triples.sort_unstable();
        let chunks = cols.div_ceil(KC).max(1);
        let mut ptr = Vec::with_capacity(rows * chunks + 1);
        let mut at = 0;
        for r in 0..rows {
            for c in 0..chunks {
                ptr.push(at as u32);
                let end = ((c + 1) * KC) as u32;
                while at < triples.len() && triples[at].0 as usize == r && triples[at].1 < end {
                    at += 1;
                }
            }
        }
        ptr.push(at as u32);
        let data = triples
            .iter()
            .map(|&(_, c, v)| (c, values[v as usize]))
            .collect();
        let map = triples.iter().map(|&(_, _, v)| v).collect();
        Entries {
            rows,
            chunks,
            ptr,
            data,
            map,
        }
    }

    fn set_values(&mut self, values: &[f32]) {
        for (d, &m) in self.data.iter_mut().zip(&self.map) {
            d.1 = values[m as usize];
        }
    }

    #[inline(always)]
    fn chunk(&self, r: usize, c: usize) -> &[(u32, f32)] {
        let i = r * self.chunks + c;
        &self.data[self.ptr[i] as usize..self.ptr[i + 1] as usize]
    }

    #[inline(always)]
    fn row(&self, r: usize) -> std::ops::Range<usize> {
        self.ptr[r * self.chunks] as usize..self.ptr[(r + 1) * self.chunks] as usize
    }
}

/// A row-wise sparse matrix ready to run.
#[derive(Clone, Debug)]
pub(crate) struct RowEngine {
    rows: usize,
    cols: usize,
    fwd: Entries,
    bwd: Entries,
}

impl RowEngine {
    fn new(rows: usize, cols: usize, triples: Vec<(u32, u32, u32)>, values: &[f32]) -> Self {
        let transposed = triples.iter().map(|&(r, c, v)| (c, r, v)).collect();
        RowEngine {
            rows,
            cols,
            fwd: Entries::new(rows, cols, triples, values),
            bwd: Entries::new(cols, rows, transposed, values),
        }
    }

    pub(crate) fn from_csr(f: &Csr) -> Self {
        let mut t = Vec::with_capacity(f.values.len());
        for r in 0..f.rows {
            for k in f.row_ptr[r] as usize..f.row_ptr[r + 1] as usize {
                t.push((r as u32, f.col_idx[k], k as u32));
            }
        }
        Self::new(f.rows, f.cols, t, &f.values)
    }

    pub(crate) fn from_nm(f: &NmCompressed) -> Self {
        let mut t = Vec::with_capacity(f.values.len());
        f.for_each_entry(|r, c, slot| t.push((r as u32, c as u32, slot as u32)));
        Self::new(f.rows, f.cols, t, &f.values)
    }

    pub(crate) fn set_values(&mut self, values: &[f32]) {
        self.fwd.set_values(values);
        self.bwd.set_values(values);
    }

    /// Every value position the kernels read and write.
    pub(crate) fn mapped(&self) -> impl Iterator<Item = u32> + '_ {
        self.fwd.map.iter().copied()
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// `Y = W·X`.
    pub(crate) fn forward(&self, isa: Isa, x: &[f32], y: &mut [f32], n: usize) {
        run_rows(&self.fwd, isa, x, y, n);
    }

    /// `dX = Wᵀ·dY`.
    pub(crate) fn backward_input(&self, isa: Isa, dy: &[f32], dx: &mut [f32], n: usize) {
        run_rows(&self.bwd, isa, dy, dx, n);
    }

    /// `dW = dY·Xᵀ` on the entries, written to the format's value positions.
    pub(crate) fn backward_weight(
        &self,
        isa: Isa,
        dy: &[f32],
        x: &[f32],
        n: usize,
        dv: &mut [f32],
    ) {
        let out = SyncPtr(dv.as_mut_ptr());
        let (dyp, xp) = (
            SyncPtr(dy.as_ptr() as *mut f32),
            SyncPtr(x.as_ptr() as *mut f32),
        );
        const ROWS_PER_TASK: usize = 16;
        (0..self.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|t| {
                let r0 = t * ROWS_PER_TASK;
                let r1 = (r0 + ROWS_PER_TASK).min(self.rows);
                run_task(
                    isa,
                    RowGrad {
                        e: &self.fwd,
                        dy: dyp,
                        x: xp,
                        n,
                        r0,
                        r1,
                        out,
                    },
                );
            });
    }
}

fn run_rows(e: &Entries, isa: Isa, x: &[f32], y: &mut [f32], n: usize) {
    let (xp, yp) = (SyncPtr(x.as_ptr() as *mut f32), SyncPtr(y.as_mut_ptr()));
    let parts = rayon::current_num_threads();
    (0..parts).into_par_iter().for_each(|t| {
        let (n0, n1) = split_range(n, parts, t, isa.lanes());
        if n0 < n1 {
            run_task(
                isa,
                RowPass {
                    e,
                    x: xp,
                    y: yp,
                    n,
                    n0,
                    n1,
                },
            );
        }
    });
}

struct RowPass<'a> {
    e: &'a Entries,
    x: SyncPtr,
    y: SyncPtr,
    n: usize,
    n0: usize,
    n1: usize,
}

impl SimdTask for RowPass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked the buffer lengths; threads own disjoint column ranges.
        unsafe { row_pass::<S>(&self) }
    }
}

/// Vectors per row tile.
const RNV: usize = 8;

#[inline(always)]
unsafe fn row_pass<S: Simd>(p: &RowPass<'_>) {
    let e = p.e;
    let (x, y, ld) = (p.x.0 as *const f32, p.y.0, p.n);
    let nr = RNV * S::LANES;
    let nc = 4 * nr;
    let mut c0 = p.n0;
    while c0 < p.n1 {
        let c1 = (c0 + nc).min(p.n1);
        for chunk in 0..e.chunks {
            let acc = chunk > 0;
            for r in 0..e.rows {
                let entries = e.chunk(r, chunk);
                if acc && entries.is_empty() {
                    continue;
                }
                let yr = y.add(r * ld);
                let mut t = c0;
                while t + nr <= c1 {
                    row_tile::<S, RNV>(entries, x.add(t), ld, yr.add(t), acc);
                    t += nr;
                }
                while t + S::LANES <= c1 {
                    row_tile::<S, 1>(entries, x.add(t), ld, yr.add(t), acc);
                    t += S::LANES;
                }
                while t < c1 {
                    let mut s = if acc { *yr.add(t) } else { 0.0 };
                    for &(col, w) in entries {
                        s += w * *x.add(col as usize * ld + t);
                    }
                    *yr.add(t) = s;
                    t += 1;
                }
            }
        }
        c0 = c1;
    }
}

struct RowGrad<'a> {
    e: &'a Entries,
    dy: SyncPtr,
    x: SyncPtr,
    n: usize,
    r0: usize,
    r1: usize,
    out: SyncPtr,
}

impl SimdTask for RowGrad<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked the buffer lengths; tasks own disjoint rows, hence entries.
        unsafe { row_grad::<S>(&self) }
    }
}

#[inline(always)]
unsafe fn row_grad<S: Simd>(g: &RowGrad<'_>) {
    const NCHUNK: usize = 2048;
    const WC: usize = 3;
    let e = g.e;
    let mut tile = [[0.0f32; 4]; 4];
    for r in g.r0..g.r1 {
        let range = e.row(r);
        let mut first = true;
        let mut n0 = 0;
        while n0 < g.n {
            let len = NCHUNK.min(g.n - n0);
            let a = [
                g.dy.0.add(r * g.n + n0) as *const f32,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            ];
            let mut k = range.start;
            while k < range.end {
                let wc = WC.min(range.end - k);
                let mut xs = [std::ptr::null::<f32>(); 4];
                for (u, p) in xs.iter_mut().enumerate().take(wc) {
                    *p = g.x.0.add(e.data[k + u].0 as usize * g.n + n0);
                }
                with_dot!(S, 1, wc, (&a, &xs, len, &mut tile));
                for (u, &val) in tile[0].iter().enumerate().take(wc) {
                    let dst = g.out.0.add(e.map[k + u] as usize);
                    *dst = if first { val } else { *dst + val };
                }
                k += wc;
            }
            first = false;
            n0 += len;
        }
    }
}
