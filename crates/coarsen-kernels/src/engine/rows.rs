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

/// Vectors per row tile.
const RNV: usize = 8;
/// Bytes of the packed `X` tile (chunk rows × one row tile): half of a 32 KiB L1 cache, so that
/// it survives the streams of entries and `Y` rows passing through.
const L1_TILE_BYTES: usize = 16 * 1024;

/// Columns of `W` per chunk for an instruction set with `lanes` lanes: the chunk's rows of `X`,
/// one row tile wide, fill `L1_TILE_BYTES`.
pub(crate) fn chunk_cols(lanes: usize) -> usize {
    (L1_TILE_BYTES / (RNV * lanes * 4)).max(8)
}

/// Entries cut into column chunks and stored chunk by chunk (rows in order inside a chunk), so
/// that the kernel, which runs every row on one chunk before the next, reads them sequentially.
#[derive(Clone, Debug)]
struct Entries {
    rows: usize,
    chunks: usize,
    /// Columns per chunk.
    kc: usize,
    /// Entries of (chunk c, row r) are `ptr[c·rows + r]..ptr[c·rows + r + 1]`.
    ptr: Vec<u32>,
    /// (column, weight).
    data: Vec<(u32, f32)>,
    /// Index in the format's values of each entry.
    map: Vec<u32>,
}

impl Entries {
    /// From (row, column, value index) triples of a `rows × cols` matrix, cut into chunks of `kc`
    /// columns.
    fn new(
        rows: usize,
        cols: usize,
        kc: usize,
        mut triples: Vec<(u32, u32, u32)>,
        values: &[f32],
    ) -> Self {
        let kc = kc.max(1);
        let chunks = cols.div_ceil(kc).max(1);
        triples.sort_unstable_by_key(|&(r, c, _)| ((c as usize / kc) as u64, r, c));
        let mut ptr = Vec::with_capacity(rows * chunks + 1);
        let mut at = 0;
        for c in 0..chunks {
            for r in 0..rows {
                ptr.push(at as u32);
                while at < triples.len()
                    && triples[at].1 as usize / kc == c
                    && triples[at].0 as usize == r
                {
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
            kc,
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

    /// Entries of row `r` in chunk `c`.
    #[inline(always)]
    fn chunk(&self, r: usize, c: usize) -> &[(u32, f32)] {
        let i = c * self.rows + r;
        &self.data[self.ptr[i] as usize..self.ptr[i + 1] as usize]
    }

    /// Positions in `data` of the entries of row `r`, chunk by chunk.
    #[inline(always)]
    fn row(&self, r: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.chunks).flat_map(move |c| {
            let i = c * self.rows + r;
            self.ptr[i] as usize..self.ptr[i + 1] as usize
        })
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
    fn new(
        rows: usize,
        cols: usize,
        kc: usize,
        triples: Vec<(u32, u32, u32)>,
        values: &[f32],
    ) -> Self {
        let transposed = triples.iter().map(|&(r, c, v)| (c, r, v)).collect();
        RowEngine {
            rows,
            cols,
            fwd: Entries::new(rows, cols, kc, triples, values),
            bwd: Entries::new(cols, rows, kc, transposed, values),
        }
    }

    pub(crate) fn from_csr(f: &Csr, kc: usize) -> Self {
        let mut t = Vec::with_capacity(f.values().len());
        for (r, span) in f.row_ptr().windows(2).enumerate() {
            for k in span[0] as usize..span[1] as usize {
                t.push((r as u32, f.col_idx()[k], k as u32));
            }
        }
        Self::new(f.rows(), f.cols(), kc, t, f.values())
    }

    pub(crate) fn from_nm(f: &NmCompressed, kc: usize) -> Self {
        let mut t = Vec::with_capacity(f.values().len());
        f.for_each_entry(|r, c, slot| t.push((r as u32, c as u32, slot as u32)));
        Self::new(f.rows(), f.cols(), kc, t, f.values())
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
    pub(crate) fn forward(&self, isa: Isa, x: &[f32], y: &mut [f32], n: usize, parts: usize) {
        run_rows(&self.fwd, self.cols, isa, (x, y, n), parts);
    }

    /// `dX = Wᵀ·dY`.
    pub(crate) fn backward_input(
        &self,
        isa: Isa,
        dy: &[f32],
        dx: &mut [f32],
        n: usize,
        parts: usize,
    ) {
        run_rows(&self.bwd, self.rows, isa, (dy, dx, n), parts);
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

/// Runs rows of `e` on `X`: up to `parts` threads take disjoint row ranges (each streams only
/// its own entries) over all columns of `X`.
fn run_rows(
    e: &Entries,
    in_rows: usize,
    isa: Isa,
    (x, y, n): (&[f32], &mut [f32], usize),
    parts: usize,
) {
    let (xp, yp) = (SyncPtr(x.as_ptr() as *mut f32), SyncPtr(y.as_mut_ptr()));
    let parts = parts.clamp(1, e.rows.max(1));
    let need = (e.kc + e.rows) * RNV * isa.lanes();
    crate::team::for_each(parts, |t| {
        let (r0, r1) = split_range(e.rows, parts, t, 1);
        if r0 < r1 && n > 0 {
            TILE.with(|buf| {
                let mut buf = buf.borrow_mut();
                let tile = SyncPtr(super::aligned(&mut buf, need));
                let (x, y) = (xp, yp);
                run_task(
                    isa,
                    RowPass {
                        e,
                        x,
                        y,
                        n,
                        r0,
                        r1,
                        in_rows,
                        tile,
                    },
                );
            });
        }
    });
}

struct RowPass<'a> {
    e: &'a Entries,
    x: SyncPtr,
    y: SyncPtr,
    n: usize,
    /// Rows of `W` this thread computes.
    r0: usize,
    r1: usize,
    /// Rows of `X`.
    in_rows: usize,
    /// A buffer of `(kc + rows) · RNV · LANES` floats: one packed tile of `X`, then the running
    /// tile of `Y`.
    tile: SyncPtr,
}

impl SimdTask for RowPass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked the buffer lengths; threads own disjoint row ranges.
        unsafe { row_pass::<S>(&self) }
    }
}

thread_local! {
    /// Per-thread buffer for one packed tile of `X`.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One thread's columns of `Y = W·X`: for each row tile of `X` (`RNV` vectors), for each chunk
/// of columns of `W`, the chunk's rows of that tile of `X` are copied into a contiguous buffer
/// (rows of `X` a multiple of 4 KiB apart would all fall into the same few L1 sets), then every
/// row of `W` adds its entries of the chunk with its tile of `Y` in registers.
#[inline(always)]
unsafe fn row_pass<S: Simd>(p: &RowPass<'_>) {
    let e = p.e;
    let (x, y, ld) = (p.x.get() as *const f32, p.y.get(), p.n);
    let nr = RNV * S::LANES;
    let buf = p.tile.get();
    // The running tile of Y: rows one tile apart, so that they stream through the caches.
    let ybuf = buf.add(e.kc * nr);
    let mut t = 0;
    while t + nr <= p.n {
        for chunk in 0..e.chunks {
            let c0 = chunk * e.kc;
            let rows = e.kc.min(p.in_rows.saturating_sub(c0));
            for c in 0..rows {
                let src = x.add((c0 + c) * ld + t);
                let dst = buf.add(c * nr);
                for j in 0..RNV {
                    S::store(dst.add(j * S::LANES), S::load(src.add(j * S::LANES)));
                }
            }
            let acc = chunk > 0;
            for r in p.r0..p.r1 {
                let entries = e.chunk(r, chunk);
                if acc && entries.is_empty() {
                    continue;
                }
                // The chunk's columns c0.. are rows 0.. of the packed tile.
                row_tile::<S, RNV>(entries, c0, buf, nr, ybuf.add(r * nr), acc);
            }
        }
        for r in p.r0..p.r1 {
            let (src, dst) = (ybuf.add(r * nr), y.add(r * ld + t));
            for j in 0..RNV {
                S::store(dst.add(j * S::LANES), S::load(src.add(j * S::LANES)));
            }
        }
        t += nr;
    }
    while t + S::LANES <= p.n {
        for chunk in 0..e.chunks {
            for r in p.r0..p.r1 {
                let entries = e.chunk(r, chunk);
                row_tile::<S, 1>(entries, 0, x.add(t), ld, y.add(r * ld + t), chunk > 0);
            }
        }
        t += S::LANES;
    }
    while t < p.n {
        for r in p.r0..p.r1 {
            let mut s = 0.0;
            for k in e.row(r) {
                let (col, w) = e.data[k];
                s += w * *x.add(col as usize * ld + t);
            }
            *y.add(r * ld + t) = s;
        }
        t += 1;
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
            for c in 0..e.chunks {
                let seg = c * e.rows + r;
                let (start, end) = (e.ptr[seg] as usize, e.ptr[seg + 1] as usize);
                let mut k = start;
                while k < end {
                    let wc = WC.min(end - k);
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
            }
            first = false;
            n0 += len;
        }
    }
}
