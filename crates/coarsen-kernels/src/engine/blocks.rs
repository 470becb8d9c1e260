//! The block engine: group blocks, shuffled blocks and BSR all reduce to dense blocks whose rows
//! share one column set. `Y[rows_b] = V_b · X[cols_b]` is a gather-GEMM: the micro-kernel keeps
//! an `MR × NV·L` tile of `Y` in registers and streams the block's columns of `X` by index.

use rayon::prelude::*;

use super::micro::{dot_tile, gather_columns, gather_tile, pack_rows, packed_tile};
use super::{split_range, SyncPtr};
use crate::formats::{Bsr, GroupBlocks, Packed, ShuffledBlocks};
use crate::simd::{run_task, Isa, Simd, SimdTask};

/// Columns of `X` per chunk when many rows use each column: the chunk is copied once, so that
/// blocks gather from a compact, cache-resident buffer instead of from scattered pages.
const REUSED_NC: usize = 64;
/// Columns of `X` per chunk when few rows use each column: rows of `X` are streamed in long
/// runs the hardware prefetchers follow.
const STREAMED_NC: usize = 512;
/// Rows that use a column of `X`, on average, above which the chunk copy pays off.
const CHUNK_REUSE: usize = 48;
/// Columns of a block packed at once: with one register tile of `X` they fill a few KiB of L1.
const KC: usize = 64;

thread_local! {
    /// Per-thread buffer for packed rows of `X`; it grows to the largest need and is reused.
    static PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A dense block ready to run.
#[derive(Clone, Debug)]
pub(crate) struct ExecBlock {
    rows: Vec<u32>,
    cols: Vec<u32>,
    /// `ceil(rows/MR)` panels of `cols × MR` values (rows padded with zeros).
    fwd: Vec<f32>,
    /// `ceil(cols/MR)` panels of `rows × MR` values: the transpose, for `Wᵀ·dY`.
    bwd: Vec<f32>,
    /// Index in the format's values of entry (i, k), block-row-major.
    map: Vec<u32>,
}

/// Every block of a layer, packed for one register tile height `mr`.
#[derive(Clone, Debug)]
pub(crate) struct BlockEngine {
    rows: usize,
    cols: usize,
    mr: usize,
    blocks: Vec<ExecBlock>,
    /// Rows of `Y` no block writes (zeroed by `forward`).
    uncovered: Vec<u32>,
    /// Copy whole chunks of `X` (many rows use each column) rather than pack per block.
    chunked: bool,
}

impl BlockEngine {
    fn new(rows: usize, cols: usize, mr: usize, parts: Vec<Part>, values: &[f32]) -> Self {
        let mut covered = vec![false; rows];
        let blocks: Vec<ExecBlock> = parts
            .into_iter()
            .filter(|(r, c, _)| !r.is_empty() && !c.is_empty())
            .map(|(rows, cols, map)| {
                rows.iter().for_each(|&r| covered[r as usize] = true);
                ExecBlock {
                    fwd: vec![0.0; rows.len().div_ceil(mr) * mr * cols.len()],
                    bwd: vec![0.0; cols.len().div_ceil(mr) * mr * rows.len()],
                    rows,
                    cols,
                    map,
                }
            })
            .collect();
        let uncovered = (0..rows as u32).filter(|&r| !covered[r as usize]).collect();
        let entries: usize = blocks.iter().map(|b| b.rows.len() * b.cols.len()).sum();
        let chunked = entries >= CHUNK_REUSE * cols.max(1);
        let mut e = BlockEngine {
            rows,
            cols,
            mr,
            blocks,
            uncovered,
            chunked,
        };
        e.set_values(values);
        e
    }

    /// Group blocks as they are.
    pub(crate) fn from_group(f: &GroupBlocks, mr: usize) -> Self {
        Self::new(f.rows(), f.cols(), mr, group_parts(f), f.values())
    }

    /// Each row group with all its tiles' columns.
    pub(crate) fn from_shuffled(f: &ShuffledBlocks, mr: usize) -> Self {
        Self::new(f.rows(), f.cols(), mr, shuffled_parts(f), f.values())
    }

    /// Each block row with all its tiles' (in-matrix) columns.
    pub(crate) fn from_bsr(f: &Bsr, mr: usize) -> Self {
        Self::new(f.rows(), f.cols(), mr, bsr_parts(f), f.values())
    }

    /// Repacks the panels from the format's values (same structure).
    pub(crate) fn set_values(&mut self, values: &[f32]) {
        let mr = self.mr;
        for b in &mut self.blocks {
            let (nr, nc) = (b.rows.len(), b.cols.len());
            b.fwd.iter_mut().for_each(|v| *v = 0.0);
            b.bwd.iter_mut().for_each(|v| *v = 0.0);
            for i in 0..nr {
                for k in 0..nc {
                    let v = values[b.map[i * nc + k] as usize];
                    b.fwd[(i / mr) * nc * mr + k * mr + i % mr] = v;
                    b.bwd[(k / mr) * nr * mr + i * mr + k % mr] = v;
                }
            }
        }
    }

    /// Every value position the kernels read and write.
    pub(crate) fn mapped(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks.iter().flat_map(|b| b.map.iter().copied())
    }

    /// `Y = W·X`.
    pub(crate) fn forward(&self, isa: Isa, x: &[f32], y: &mut [f32], n: usize, parts: usize) {
        self.run_pass(isa, x, y, n, false, parts);
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
        self.run_pass(isa, dy, dx, n, true, parts);
    }

    /// One pass over the columns of `X`, split into `parts` column ranges run in parallel.
    fn run_pass(
        &self,
        isa: Isa,
        x: &[f32],
        y: &mut [f32],
        n: usize,
        transpose: bool,
        parts: usize,
    ) {
        let (x, y) = (SyncPtr(x.as_ptr() as *mut f32), SyncPtr(y.as_mut_ptr()));
        let parts = parts.max(1);
        let need = if transpose {
            0
        } else {
            self.pack_floats(super::tile_width(isa))
        };
        crate::team::for_each(parts, |t| {
            let (n0, n1) = split_range(n, parts, t, isa.lanes());
            if n0 < n1 {
                PACK.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let pack = SyncPtr(super::aligned(&mut buf, need));
                    let pack_len = need;
                    let e = self;
                    run_task(
                        isa,
                        Pass {
                            e,
                            x,
                            y,
                            n,
                            n0,
                            n1,
                            transpose,
                            pack,
                            pack_len,
                        },
                    );
                });
            }
        });
    }

    /// Columns of `X` per chunk (rounded down to whole register tiles by the pass).
    fn chunk_width(&self) -> usize {
        if self.chunked {
            REUSED_NC
        } else {
            STREAMED_NC
        }
    }

    /// Floats of scratch a forward pass with register tiles `nr` wide needs: the copy of a chunk
    /// (chunk-copy strategy) or the block packing buffer of `KC` rows of a chunk.
    fn pack_floats(&self, nr: usize) -> usize {
        let nc = self.chunk_width().div_ceil(nr) * nr;
        if self.chunked {
            self.cols * nc
        } else {
            KC * nc
        }
    }

    /// `dV = dY[rows]·X[cols]ᵀ` for every block, written to the format's value positions.
    pub(crate) fn backward_weight(
        &self,
        isa: Isa,
        dy: &[f32],
        x: &[f32],
        n: usize,
        dv: &mut [f32],
    ) {
        const COLS_PER_TASK: usize = 64;
        let out = SyncPtr(dv.as_mut_ptr());
        let tasks: usize = self
            .blocks
            .iter()
            .map(|b| b.cols.len().div_ceil(COLS_PER_TASK))
            .sum();
        (0..tasks).into_par_iter().for_each(|mut t| {
            // Find the block and column chunk of task t.
            let mut bi = 0;
            while t >= self.blocks[bi].cols.len().div_ceil(COLS_PER_TASK) {
                t -= self.blocks[bi].cols.len().div_ceil(COLS_PER_TASK);
                bi += 1;
            }
            let b = &self.blocks[bi];
            let k0 = t * COLS_PER_TASK;
            let k1 = (k0 + COLS_PER_TASK).min(b.cols.len());
            run_task(
                isa,
                WeightGrad {
                    b,
                    dy: dy.as_ptr(),
                    x: x.as_ptr(),
                    n,
                    k0,
                    k1,
                    out,
                },
            );
        });
    }

    /// Rows of the full matrix.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the full matrix.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }
}

/// A dense block of a format: its rows, its columns, and the position in the format's values
/// of each entry (block-row-major). The rows of different blocks are disjoint.
pub(crate) type Part = (Vec<u32>, Vec<u32>, Vec<u32>);

/// The dense blocks of group blocks, shuffled blocks and BSR (`None` for the other formats).
pub(crate) fn packed_parts(p: &Packed) -> Option<Vec<Part>> {
    match p {
        Packed::Group(f) => Some(group_parts(f)),
        Packed::Shuffled(f) => Some(shuffled_parts(f)),
        Packed::Bsr(f) => Some(bsr_parts(f)),
        _ => None,
    }
}

/// Group blocks as they are.
fn group_parts(f: &GroupBlocks) -> Vec<Part> {
    f.blocks()
        .iter()
        .map(|b| {
            let len = b.rows().len() * b.cols().len();
            let map = (0..len).map(|i| (b.offset() + i) as u32).collect();
            (b.rows().to_vec(), b.cols().to_vec(), map)
        })
        .collect()
}

/// Each row group with all its tiles' columns.
fn shuffled_parts(f: &ShuffledBlocks) -> Vec<Part> {
    f.groups()
        .iter()
        .map(|g| {
            let cols: Vec<u32> = g
                .tiles()
                .iter()
                .flat_map(|t| t.cols().iter().copied())
                .collect();
            let mut map = Vec::with_capacity(g.rows().len() * cols.len());
            for i in 0..g.rows().len() {
                for t in g.tiles() {
                    let w = t.cols().len();
                    map.extend((0..w).map(|k| (t.offset() + i * w + k) as u32));
                }
            }
            (g.rows().to_vec(), cols, map)
        })
        .collect()
}

/// Each block row with all its tiles' (in-matrix) columns.
fn bsr_parts(f: &Bsr) -> Vec<Part> {
    let (h, w) = (f.height(), f.width());
    let mut parts = Vec::new();
    for (i, span) in f.row_ptr().windows(2).enumerate() {
        let tiles = span[0] as usize..span[1] as usize;
        if tiles.is_empty() {
            continue;
        }
        let rows: Vec<u32> = (i * h..((i + 1) * h).min(f.rows()))
            .map(|r| r as u32)
            .collect();
        let mut cols = Vec::new();
        let mut spans = Vec::new();
        for t in tiles.clone() {
            let j = f.col_idx()[t] as usize;
            let c1 = ((j + 1) * w).min(f.cols());
            spans.push((t, c1 - j * w));
            cols.extend((j * w..c1).map(|c| c as u32));
        }
        let mut map = Vec::with_capacity(rows.len() * cols.len());
        for a in 0..rows.len() {
            for &(t, width) in &spans {
                map.extend((0..width).map(|b| (t * h * w + a * w + b) as u32));
            }
        }
        parts.push((rows, cols, map));
    }
    parts
}

/// One thread's share of `Y = W·X` (or `dX = Wᵀ·dY` when `transpose`): columns `n0..n1`.
struct Pass<'a> {
    e: &'a BlockEngine,
    x: SyncPtr,
    y: SyncPtr,
    n: usize,
    n0: usize,
    n1: usize,
    transpose: bool,
    /// Packing buffer (forward only) of `pack_len` values.
    pack: SyncPtr,
    pack_len: usize,
}

impl SimdTask for Pass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked the buffer lengths; threads own disjoint column ranges.
        unsafe { pass::<S>(&self) }
    }
}

macro_rules! with_tile {
    ($S:ty, $mr:expr, $nv:expr, $f:ident ( $($arg:expr),* )) => {
        match ($mr, $nv) {
            (4, 1) => $f::<$S, 4, 1>($($arg),*),
            (4, 2) => $f::<$S, 4, 2>($($arg),*),
            (4, 3) => $f::<$S, 4, 3>($($arg),*),
            (4, 4) => $f::<$S, 4, 4>($($arg),*),
            (8, 1) => $f::<$S, 8, 1>($($arg),*),
            (8, 2) => $f::<$S, 8, 2>($($arg),*),
            (8, 3) => $f::<$S, 8, 3>($($arg),*),
            (6, 1) => $f::<$S, 6, 1>($($arg),*),
            (6, 2) => $f::<$S, 6, 2>($($arg),*),
            _ => unreachable!("no micro-kernel for tile {}x{}", $mr, $nv),
        }
    };
}

#[inline(always)]
unsafe fn pass<S: Simd>(p: &Pass<'_>) {
    let e = p.e;
    let (x, y, ld) = (p.x.get() as *const f32, p.y.get(), p.n);
    let width = p.n1 - p.n0;
    // Rows of the output that no block writes (forward), or every row (backward accumulates).
    if p.transpose {
        for c in 0..e.cols {
            std::ptr::write_bytes(y.add(c * ld + p.n0), 0, width);
        }
    } else {
        for &r in &e.uncovered {
            std::ptr::write_bytes(y.add(r as usize * ld + p.n0), 0, width);
        }
    }
    let mr = S::MR;
    debug_assert_eq!(mr, e.mr);
    let nr = S::NV * S::LANES;
    let nc = e.chunk_width().div_ceil(nr) * nr;
    assert!(
        p.transpose || e.pack_floats(nr) <= p.pack_len,
        "packing buffer too small"
    );
    let mut c0 = p.n0;
    while c0 < p.n1 {
        let c1 = (c0 + nc).min(p.n1);
        let full = (c1 - c0) / nr * nr;
        if !p.transpose && full > 0 {
            forward_chunk::<S>(e, p.pack.get(), x.add(c0), ld, y.add(c0), full);
        }
        let start = if p.transpose { c0 } else { c0 + full };
        for b in &e.blocks {
            // Forward: out = block rows, in = block columns; backward: the other way round.
            let (out, inp, vals) = if p.transpose {
                (&b.cols, &b.rows, &b.bwd)
            } else {
                (&b.rows, &b.cols, &b.fwd)
            };
            let k = inp.len();
            let panels = out.len().div_ceil(mr);
            let mut t = start;
            while t + nr <= c1 {
                for q in 0..panels {
                    let rows = &out[q * mr..((q + 1) * mr).min(out.len())];
                    let v = vals.as_ptr().add(q * k * mr);
                    with_tile!(
                        S,
                        mr,
                        S::NV,
                        gather_tile(
                            k,
                            v,
                            inp.as_ptr(),
                            x.add(t),
                            ld,
                            rows,
                            y.add(t),
                            ld,
                            p.transpose
                        )
                    );
                }
                t += nr;
            }
            while t + S::LANES <= c1 {
                for q in 0..panels {
                    let rows = &out[q * mr..((q + 1) * mr).min(out.len())];
                    let v = vals.as_ptr().add(q * k * mr);
                    with_tile!(
                        S,
                        mr,
                        1,
                        gather_tile(
                            k,
                            v,
                            inp.as_ptr(),
                            x.add(t),
                            ld,
                            rows,
                            y.add(t),
                            ld,
                            p.transpose
                        )
                    );
                }
                t += S::LANES;
            }
            if t < c1 {
                for q in 0..panels {
                    let rows = &out[q * mr..((q + 1) * mr).min(out.len())];
                    let v = vals.as_ptr().add(q * k * mr);
                    gather_columns(
                        k,
                        mr,
                        v,
                        inp.as_ptr(),
                        x.add(t),
                        ld,
                        rows,
                        y.add(t),
                        ld,
                        p.transpose,
                        c1 - t,
                    );
                }
            }
        }
        c0 = c1;
    }
}

/// `Y[:, 0..full] = W·X[:, 0..full]` for one chunk of whole register tiles (`x`, `y` point at
/// the chunk's first column; row stride `ld`).
///
/// Many rows per column (`chunked`): the chunk of every row of `X` is copied once, tile-major
/// (`[tile][row][NR]`, one aligned register tile per row), and blocks gather from that compact
/// buffer. Few rows per column: each block's columns of `X` are packed `KC` at a time into an
/// L1-sized buffer, streaming `X` in long runs, and every panel of rows runs on it.
#[inline(always)]
unsafe fn forward_chunk<S: Simd>(
    e: &BlockEngine,
    scratch: *mut f32,
    x: *const f32,
    ld: usize,
    y: *mut f32,
    full: usize,
) {
    let (mr, nr) = (S::MR, S::NV * S::LANES);
    let tiles = full / nr;
    if e.chunked {
        let cols = e.cols;
        for c in 0..cols {
            let src = x.add(c * ld);
            for t in 0..tiles {
                let dst = scratch.add(t * cols * nr + c * nr);
                for j in 0..S::NV {
                    S::store(
                        dst.add(j * S::LANES),
                        S::load(src.add(t * nr + j * S::LANES)),
                    );
                }
            }
        }
        for b in &e.blocks {
            let k = b.cols.len();
            let panels = b.rows.len().div_ceil(mr);
            for t in 0..tiles {
                let base = scratch.add(t * cols * nr) as *const f32;
                for q in 0..panels {
                    let rows = &b.rows[q * mr..((q + 1) * mr).min(b.rows.len())];
                    let v = b.fwd.as_ptr().add(q * k * mr);
                    with_tile!(
                        S,
                        mr,
                        S::NV,
                        gather_tile(
                            k,
                            v,
                            b.cols.as_ptr(),
                            base,
                            nr,
                            rows,
                            y.add(t * nr),
                            ld,
                            false
                        )
                    );
                }
            }
        }
        return;
    }
    let pack = scratch;
    for b in &e.blocks {
        let k = b.cols.len();
        let panels = b.rows.len().div_ceil(mr);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            pack_rows::<S>(kc, b.cols.as_ptr().add(k0), x, ld, tiles, pack);
            for t in 0..tiles {
                let xp = pack.add(t * kc * nr) as *const f32;
                for q in 0..panels {
                    let rows = &b.rows[q * mr..((q + 1) * mr).min(b.rows.len())];
                    let v = b.fwd.as_ptr().add(q * k * mr + k0 * mr);
                    with_tile!(
                        S,
                        mr,
                        S::NV,
                        packed_tile(kc, v, xp, rows, y.add(t * nr), ld, k0 > 0)
                    );
                }
            }
        }
    }
}

/// The weight gradient of one block's columns `k0..k1`.
struct WeightGrad<'a> {
    b: &'a ExecBlock,
    dy: *const f32,
    x: *const f32,
    n: usize,
    k0: usize,
    k1: usize,
    out: SyncPtr,
}

// SAFETY: the raw pointers are only read (dy, x) or written at disjoint positions (out).
unsafe impl Send for WeightGrad<'_> {}

impl SimdTask for WeightGrad<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked the buffer lengths; tasks write disjoint value positions.
        unsafe { weight_grad::<S>(&self) }
    }
}

macro_rules! with_dot {
    ($S:ty, $wr:expr, $wc:expr, ($($arg:expr),*)) => {
        match ($wr, $wc) {
            (1, 1) => dot_tile::<$S, 1, 1>($($arg),*),
            (1, 2) => dot_tile::<$S, 1, 2>($($arg),*),
            (1, 3) => dot_tile::<$S, 1, 3>($($arg),*),
            (2, 1) => dot_tile::<$S, 2, 1>($($arg),*),
            (2, 2) => dot_tile::<$S, 2, 2>($($arg),*),
            (2, 3) => dot_tile::<$S, 2, 3>($($arg),*),
            (3, 1) => dot_tile::<$S, 3, 1>($($arg),*),
            (3, 2) => dot_tile::<$S, 3, 2>($($arg),*),
            (3, 3) => dot_tile::<$S, 3, 3>($($arg),*),
            (4, 4) => dot_tile::<$S, 4, 4>($($arg),*),
            _ => unreachable!("no dot tile {}x{}", $wr, $wc),
        }
    };
}
pub(crate) use with_dot;

/// Dot-product tile of the weight gradient: 3 rows of `dY` × 3 rows of `X`.
const WT: usize = 3;

#[inline(always)]
unsafe fn weight_grad<S: Simd>(w: &WeightGrad<'_>) {
    const NCHUNK: usize = 2048;
    let b = w.b;
    let nc = b.cols.len();
    let mut tile = [[0.0f32; 4]; 4];
    let mut first = true;
    let mut n0 = 0;
    while n0 < w.n {
        let len = NCHUNK.min(w.n - n0);
        for i0 in (0..b.rows.len()).step_by(WT) {
            let wr = WT.min(b.rows.len() - i0);
            let mut a = [std::ptr::null::<f32>(); 4];
            for (u, p) in a.iter_mut().enumerate().take(wr) {
                *p = w.dy.add(b.rows[i0 + u] as usize * w.n + n0);
            }
            for k0 in (w.k0..w.k1).step_by(WT) {
                let wc = WT.min(w.k1 - k0);
                let mut xs = [std::ptr::null::<f32>(); 4];
                for (u, p) in xs.iter_mut().enumerate().take(wc) {
                    *p = w.x.add(b.cols[k0 + u] as usize * w.n + n0);
                }
                with_dot!(S, wr, wc, (&a, &xs, len, &mut tile));
                for (u, row) in tile.iter().enumerate().take(wr) {
                    for (v, &val) in row.iter().enumerate().take(wc) {
                        let dst = w.out.0.add(b.map[(i0 + u) * nc + k0 + v] as usize);
                        *dst = if first { val } else { *dst + val };
                    }
                }
            }
        }
        first = false;
        n0 += len;
    }
}
