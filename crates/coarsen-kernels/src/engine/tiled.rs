//! coarsen's own dense GEMM for `Y = W·X` (`W` fixed, `X` and `Y` row-major with many columns),
//! the shape of every convolution and linear layer at inference.
//!
//! `W` is packed once into panels of `MR` rows, `k`-major (`panel[k·MR + i]`), so the
//! micro-kernel broadcasts `MR` consecutive weights per step. `X` is cut into column chunks of
//! [`NC`] columns and `k`-blocks of [`KC`] rows; each `KC × NR` tile of a chunk is copied once
//! into a contiguous buffer that stays in L1 while every panel of `W` runs over it, the `MR × NR`
//! tile of `Y` held in registers. A `k`-block of all panels (`KC × M`) stays in L2 across the
//! tiles of a chunk. General-purpose GEMMs (faer) tune for square products; here `M` is often
//! small (64 output channels) and `N` large (batch × positions), where this layout keeps the
//! FMA units busy.

use super::micro::register_tile;
use super::{split_range, SyncPtr};
use crate::simd::{run_task, Isa, Simd, SimdTask};

/// Most rows of `X` per `k`-block: a `KC × NR` tile of packed `X` (30 KiB at AVX-512's
/// NR = 48) and a `KC × MR` panel of `W` stay in L1. `k` is cut into equal blocks.
const KC: usize = 160;
/// Columns per chunk: the chunk's `Y` rows (`M × NC`) and a `k`-block of `W` stay in L2.
const NC: usize = 240;
/// The widest register tile in floats (AVX-512: 3 vectors of 16).
const NR_MAX: usize = 64;

/// Register tile `(MR, NV)` of this engine for an instruction set: `MR` rows of `Y` by `NV`
/// vectors of columns.
fn tile(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (8, 3),
        Isa::Avx2 => (6, 2),
        Isa::Neon => (8, 2),
        Isa::Scalar => (4, 2),
    }
}

/// A dense `rows × cols` matrix packed into register-tile panels for one instruction set.
#[derive(Clone, Debug)]
pub(crate) struct Tiled {
    isa: Isa,
    rows: usize,
    cols: usize,
    mr: usize,
    /// `ceil(rows/mr)` panels of `cols × mr` values, rows past the end zero.
    panels: Vec<f32>,
    /// `Wᵀ` in tiles of `NR` rows of `W`: `ceil(rows/NR)` tiles of `cols × NR` values, for
    /// products with few columns ([`forward_small`](Self::forward_small)); made from `panels`
    /// on the first such product (training and wide products never need it).
    tiles_t: std::sync::OnceLock<Vec<f32>>,
}

/// A 64-byte aligned buffer of one packed `KC × NR` tile of `X`.
#[repr(C, align(64))]
struct PackBuf([f32; KC * NR_MAX]);

impl Tiled {
    /// Packs the row-major `rows × cols` matrix `values`.
    pub(crate) fn new(isa: Isa, rows: usize, cols: usize, values: &[f32]) -> Self {
        let (mr, _) = tile(isa);
        let mut t = Tiled {
            isa,
            rows,
            cols,
            mr,
            panels: vec![0.0; rows.div_ceil(mr) * mr * cols],
            tiles_t: std::sync::OnceLock::new(),
        };
        t.set_values(values);
        t
    }

    /// Repacks from new row-major values of the same shape.
    pub(crate) fn set_values(&mut self, values: &[f32]) {
        let (mr, cols) = (self.mr, self.cols);
        for (r, row) in values.chunks(cols.max(1)).take(self.rows).enumerate() {
            let panel = &mut self.panels[(r / mr) * cols * mr..];
            for (k, &v) in row.iter().enumerate() {
                panel[k * mr + r % mr] = v;
            }
        }
        self.tiles_t.take();
    }

    /// `Wᵀ` in tiles of `NR` rows of `W` (see the field), made from the panels when first
    /// asked for.
    fn tiles_t(&self) -> &[f32] {
        self.tiles_t.get_or_init(|| {
            let (mr, cols, nr) = (self.mr, self.cols, self.tile_width());
            let mut t = vec![0.0f32; self.rows.div_ceil(nr) * nr * cols];
            for r in 0..self.rows {
                let panel = &self.panels[(r / mr) * cols * mr..];
                let tile = &mut t[(r / nr) * cols * nr..];
                for k in 0..cols {
                    tile[k * nr + r % nr] = panel[k * mr + r % mr];
                }
            }
            t
        })
    }

    /// `Y = W·X` for few columns, on the calling thread, output rows `r0 .. r1` (`r0` a
    /// multiple of `NR`; `y` is `(r1 − r0) × n`): the roles swap, `X` given in panels of `MR`
    /// columns (`xt[q·cols·MR + k·MR + i]` = `X[k, q·MR + i]`, zero past `n`, as
    /// [`crate::conv::ConvDims::im2col_tiles`] writes tiles of `MR`) is broadcast, and `Wᵀ` is
    /// loaded `NR` rows of `W` at a time, so no lane is wasted on missing columns.
    pub(crate) fn forward_small(&self, xt: &[f32], y: &mut [f32], n: usize, rows: (usize, usize)) {
        self.tile_task(xt, y, n, rows, Order::Small);
    }

    /// Columns of [`forward_narrow`](Self::forward_narrow): one AVX-512 register (other
    /// instruction sets have too few registers for its tile, or lanes for it to pay).
    pub(crate) fn narrow_width(&self) -> Option<usize> {
        (self.isa == Isa::Avx512 && self.mr == NARROW_MR).then(|| self.isa.lanes())
    }

    /// `Y = W·X` for `n ≤ narrow_width` columns, on the calling thread, output rows `r0 .. r1`
    /// (`r0` a multiple of `MR`; `y` is `(r1 − r0) × n`): `X` is one tile (`xt[k·NW + j]`,
    /// zero past `n`) held one vector per `k`, and [`NARROW_PANELS`] panels of `W` are
    /// broadcast against it, so every weight is read once.
    pub(crate) fn forward_narrow(&self, xt: &[f32], y: &mut [f32], n: usize, rows: (usize, usize)) {
        run_task(
            self.isa,
            NarrowPass {
                w: self,
                xt,
                y: SyncPtr(y.as_mut_ptr()),
                n,
                rows,
            },
        );
    }

    /// `Y = W·X` over columns `0..n` (`x` is `cols × n`, `y` is `rows × n`, row-major), split into
    /// `parts` column ranges run in parallel (1: on the calling thread).
    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32], n: usize, parts: usize) {
        let (mr, nv) = tile(self.isa);
        let nr = nv * self.isa.lanes();
        let (xp, yp) = (SyncPtr(x.as_ptr() as *mut f32), SyncPtr(y.as_mut_ptr()));
        let run = |t: usize, parts: usize| {
            let (n0, n1) = split_range(n, parts, t, nr);
            if n0 < n1 {
                run_task(
                    self.isa,
                    Pass {
                        w: self,
                        x: xp,
                        y: yp,
                        ld: n,
                        n0,
                        n1,
                        mr,
                        nv,
                    },
                );
            }
        };
        let parts = parts.clamp(1, n.div_ceil(nr).max(1));
        if parts == 1 {
            run(0, 1);
        } else {
            crate::team::for_each(parts, |t| run(t, parts));
        }
    }

    /// Width in floats of a column tile of `X` ([`forward_tiles`](Self::forward_tiles)).
    pub(crate) fn tile_width(&self) -> usize {
        let (_, nv) = tile(self.isa);
        nv * self.isa.lanes()
    }

    /// `Y = W·X` on the calling thread, `X` given tile by tile: `ceil(n/NR)` tiles of
    /// `cols × NR` values (`xt[t·cols·NR + k·NR + j]` = `X[k, t·NR + j]`, zero past `n`), as
    /// [`crate::conv::ConvDims::im2col_tiles`] writes them; `y` is `rows × n`, row-major.
    pub(crate) fn forward_tiles(&self, xt: &[f32], y: &mut [f32], n: usize, rows: (usize, usize)) {
        self.tile_task(xt, y, n, rows, Order::Blocks);
    }

    /// [`forward_tiles`](Self::forward_tiles) as one stream of weights ([`stream_pass`]), for
    /// a few tiles.
    pub(crate) fn forward_stream(&self, xt: &[f32], y: &mut [f32], n: usize, rows: (usize, usize)) {
        self.tile_task(xt, y, n, rows, Order::Stream);
    }

    fn tile_task(&self, xt: &[f32], y: &mut [f32], n: usize, rows: (usize, usize), order: Order) {
        let (mr, nv) = tile(self.isa);
        run_task(
            self.isa,
            TilePass {
                w: self,
                xt,
                y: SyncPtr(y.as_mut_ptr()),
                n,
                rows,
                mr,
                nv,
                order,
            },
        );
    }

    /// Rows of a panel.
    pub(crate) fn panel_rows(&self) -> usize {
        self.mr
    }
}

/// How [`TilePass`] runs over its operands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// [`Tiled::forward_tiles`]: `k`-blocks, in each every tile under every panel.
    Blocks,
    /// [`Tiled::forward_stream`]: every panel over every tile, `k` whole ([`stream_pass`]).
    Stream,
    /// [`Tiled::forward_small`]: panels of columns broadcast against tiles of `Wᵀ`.
    Small,
}

/// [`Tiled::forward_tiles`], [`Tiled::forward_stream`] or [`Tiled::forward_small`].
struct TilePass<'a> {
    w: &'a Tiled,
    xt: &'a [f32],
    y: SyncPtr,
    n: usize,
    /// Output rows `r0 .. r1` (`r0` a multiple of `MR`, or of `NR` for [`Order::Small`]); `y`
    /// holds just these.
    rows: (usize, usize),
    mr: usize,
    nv: usize,
    order: Order,
}

impl SimdTask for TilePass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked that `xt` holds every tile (or panel) and `y`
        // `(r1 − r0) × n` values.
        unsafe {
            let small = self.order == Order::Small;
            match (self.mr, self.nv, small) {
                (8, 3, false) => tile_pass::<S, 8, 3>(&self),
                (6, 2, false) => tile_pass::<S, 6, 2>(&self),
                (8, 2, false) => tile_pass::<S, 8, 2>(&self),
                (_, _, false) => tile_pass::<S, 4, 2>(&self),
                (8, 3, true) => small_pass::<S, 8, 3>(&self),
                (6, 2, true) => small_pass::<S, 6, 2>(&self),
                (8, 2, true) => small_pass::<S, 8, 2>(&self),
                (_, _, true) => small_pass::<S, 4, 2>(&self),
            }
        }
    }
}

#[inline(always)]
unsafe fn tile_pass<S: Simd, const MR: usize, const NV: usize>(p: &TilePass<'_>) {
    let w = p.w;
    let nr = NV * S::LANES;
    let (k, n) = (w.cols, p.n);
    let (r0, r1) = p.rows;
    let (xt, y) = (p.xt.as_ptr(), p.y.get());
    if k == 0 {
        std::ptr::write_bytes(y, 0, (r1 - r0) * n);
        return;
    }
    let (q0, q1) = (r0 / MR, r1.div_ceil(MR));
    if p.order == Order::Stream {
        stream_pass::<S, MR, NV>(w, xt, y, n, (q0, q1), r0, r1);
        return;
    }
    let tiles = n.div_ceil(nr);
    let kb = k.div_ceil(k.div_ceil(KC)).div_ceil(8) * 8;
    let mut k0 = 0;
    while k0 < k {
        let kc = kb.min(k - k0);
        for t in 0..tiles {
            let width = nr.min(n - t * nr);
            let bp = xt.add(t * k * nr + k0 * nr);
            for q in q0..q1 {
                let rows = MR.min(r1 - q * MR);
                let wp = w.panels.as_ptr().add(q * k * MR + k0 * MR);
                let yq = y.add((q * MR - r0) * n + t * nr);
                if rows == MR && width == nr {
                    tile_full::<S, MR, NV>(kc, wp, bp, yq, n, k0 > 0);
                } else {
                    tile_part::<S, MR, NV>(kc, wp, bp, yq, n, k0 > 0, rows, width);
                }
            }
        }
        k0 += kc;
    }
}

/// Bytes that a stream of weights is prefetched ahead.
const STREAM_AHEAD: usize = 6144;

/// The tiled product for a few column tiles (small batches, deep layers): `k` is not blocked and
/// each panel of `W` runs over every tile before the next panel, so the weights are one
/// sequential stream per thread, prefetched [`STREAM_AHEAD`] bytes ahead and read from memory
/// once (the tiles of `X`, `k × NR` each, stay in L2).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn stream_pass<S: Simd, const MR: usize, const NV: usize>(
    w: &Tiled,
    xt: *const f32,
    y: *mut f32,
    n: usize,
    (q0, q1): (usize, usize),
    r0: usize,
    r1: usize,
) {
    let nr = NV * S::LANES;
    let k = w.cols;
    let tiles = n.div_ceil(nr);
    for q in q0..q1 {
        let rows = MR.min(r1 - q * MR);
        let wp = w.panels.as_ptr().add(q * k * MR);
        for t in 0..tiles {
            let width = nr.min(n - t * nr);
            let bp = xt.add(t * k * nr);
            let acc = if t == 0 {
                register_tile_ahead::<S, MR, NV>(k, wp, bp)
            } else {
                register_tile::<S, MR, NV>(k, wp, bp)
            };
            let yq = y.add((q * MR - r0) * n + t * nr);
            let mut tmp = [0.0f32; NR_MAX];
            for (i, accs) in acc.iter().enumerate().take(rows) {
                let yp = yq.add(i * n);
                if width == nr {
                    for (j, &a) in accs.iter().enumerate() {
                        S::store(yp.add(j * S::LANES), a);
                    }
                } else {
                    for (j, &a) in accs.iter().enumerate() {
                        S::store(tmp.as_mut_ptr().add(j * S::LANES), a);
                    }
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), yp, width);
                }
            }
        }
    }
}

/// [`register_tile`] that prefetches the broadcast values `w` (the weights, coming from
/// memory) [`STREAM_AHEAD`] bytes ahead.
#[inline(always)]
unsafe fn register_tile_ahead<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    w: *const f32,
    b: *const f32,
) -> [[S::V; NV]; MR] {
    /// Steps per round of prefetches.
    const STEP: usize = 8;
    let mut acc = [[S::zero(); NV]; MR];
    let nr = NV * S::LANES;
    let mut kk = 0;
    while kk + STEP <= kc {
        let p = w.add(kk * MR + STREAM_AHEAD / 4);
        let mut off = 0;
        while off < STEP * MR {
            S::prefetch(p.add(off));
            off += 16;
        }
        for u in 0..STEP {
            let row = b.add((kk + u) * nr);
            let mut xv = [S::zero(); NV];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = S::load(row.add(j * S::LANES));
            }
            super::micro::rank1::<S, MR, NV>(&mut acc, w.add((kk + u) * MR), &xv);
        }
        kk += STEP;
    }
    while kk < kc {
        let row = b.add(kk * nr);
        let mut xv = [S::zero(); NV];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = S::load(row.add(j * S::LANES));
        }
        super::micro::rank1::<S, MR, NV>(&mut acc, w.add(kk * MR), &xv);
        kk += 1;
    }
    acc
}

#[inline(always)]
unsafe fn small_pass<S: Simd, const MR: usize, const NV: usize>(p: &TilePass<'_>) {
    let w = p.w;
    let nr = NV * S::LANES;
    let (k, n) = (w.cols, p.n);
    let (r0, r1) = p.rows;
    let (xt, y) = (p.xt.as_ptr(), p.y.get());
    if k == 0 {
        std::ptr::write_bytes(y, 0, (r1 - r0) * n);
        return;
    }
    let tiles_t = w.tiles_t();
    let panels = n.div_ceil(MR);
    // `k` is not cut into blocks: a block's register tile would be added to `Y` through a
    // transposing scalar loop once per block. Unblocked, each tile of `Wᵀ` (`k × NR`) streams
    // from memory once for the first panel of `X` and from L2 for the others, and every value
    // of `Y` is written once.
    let mut tmp = [0.0f32; NR_MAX];
    for t in r0 / nr..r1.div_ceil(nr) {
        let chans = nr.min(r1 - t * nr);
        let b = tiles_t.as_ptr().add(t * k * nr);
        for q in 0..panels {
            let cols = MR.min(n - q * MR);
            let a = xt.add(q * k * MR);
            let acc = register_tile::<S, MR, NV>(k, a, b);
            // acc[i] holds column q·MR + i of rows t·NR ..: stored to Y transposed.
            for (i, accs) in acc.iter().enumerate().take(cols) {
                for (j, &v) in accs.iter().enumerate() {
                    S::store(tmp.as_mut_ptr().add(j * S::LANES), v);
                }
                let col = q * MR + i;
                for (c, &v) in tmp.iter().enumerate().take(chans) {
                    *y.add((t * nr + c - r0) * n + col) = v;
                }
            }
        }
    }
}

/// Rows of a panel that [`Tiled::forward_narrow`] takes (AVX-512's `MR`).
const NARROW_MR: usize = 8;
/// Panels of `W` per register tile of [`Tiled::forward_narrow`]: 3 × 8 rows by one vector of
/// columns, 24 accumulators.
const NARROW_PANELS: usize = 3;

/// [`Tiled::forward_narrow`].
struct NarrowPass<'a> {
    w: &'a Tiled,
    xt: &'a [f32],
    y: SyncPtr,
    n: usize,
    rows: (usize, usize),
}

impl SimdTask for NarrowPass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked that `xt` holds `cols × LANES` values, `n ≤ LANES`, `y`
        // `(r1 − r0) × n` values and `r0` a multiple of `MR` (= NARROW_MR, checked by
        // `narrow_width`).
        unsafe { narrow_pass::<S>(&self) }
    }
}

#[inline(always)]
unsafe fn narrow_pass<S: Simd>(p: &NarrowPass<'_>) {
    const MR: usize = NARROW_MR;
    let w = p.w;
    let (k, n) = (w.cols, p.n);
    let (r0, r1) = p.rows;
    let (xt, y) = (p.xt.as_ptr(), p.y.get());
    if n == 0 || r0 == r1 {
        return;
    }
    let (q0, q1) = (r0 / MR, r1.div_ceil(MR));
    #[cfg(target_arch = "x86_64")]
    if n <= PAIRS_COLS && S::LANES == 16 {
        // SAFETY: 16 lanes are AVX-512's (the narrow kernel runs only there, so AVX-512F is
        // available); as `narrow_pass` for the rest.
        unsafe { pairs::pass(w.panels.as_ptr(), k, xt, y, n, (r0, r1)) };
        return;
    }
    let mut tmp = [0.0f32; NR_MAX];
    let mut q = q0;
    while q < q1 {
        let group = NARROW_PANELS.min(q1 - q);
        let wp = w.panels.as_ptr().add(q * k * MR);
        let mut acc = [[S::zero(); MR]; NARROW_PANELS];
        match group {
            3 => narrow_tile::<S, 3>(k, wp, xt, &mut acc),
            2 => narrow_tile::<S, 2>(k, wp, xt, &mut acc),
            _ => narrow_tile::<S, 1>(k, wp, xt, &mut acc),
        }
        for (g, panel) in acc.iter().enumerate().take(group) {
            for (i, &v) in panel.iter().enumerate() {
                let row = (q + g) * MR + i;
                if row >= r1 {
                    break;
                }
                S::store(tmp.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), y.add((row - r0) * n), n);
            }
        }
        q += group;
    }
}

/// Columns up to which [`Tiled::forward_narrow`] runs [`pairs`] instead of its broadcast tile.
const PAIRS_COLS: usize = 4;

/// [`Tiled::forward_narrow`] for at most [`PAIRS_COLS`] columns (batch 1's 2×2 layers), where
/// the broadcast tile would leave 12 of 16 lanes idle and run out of load slots before memory
/// runs out of bytes: rows in the lanes instead. A panel's 16 consecutive values are its 8
/// rows at `k` and at `k + 1`; each column's `x[k]` and `x[k + 1]` are permuted into the two
/// halves of a vector once per pair of `k` and serve four panels; the halves are added at the
/// end.
#[cfg(target_arch = "x86_64")]
pub(super) mod pairs {
    use std::arch::x86_64::*;

    use super::{NARROW_MR as MR, PAIRS_COLS};

    /// Rows of `Y = W·X` from `r0` (a multiple of `MR`) to `r1`, `n ≤ PAIRS_COLS` columns, into
    /// `y` (`(r1 − r0) × n`); `wp` the panels (`k × MR` each), `xt` the tile (`k × 16`, zero
    /// past `n`).
    ///
    /// # Safety
    /// AVX-512F must be available; the panels of rows `r0 .. r1` and `xt`'s `16·k` values
    /// exist; `y` holds `(r1 − r0)·n` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pass(
        wp: *const f32,
        k: usize,
        xt: *const f32,
        y: *mut f32,
        n: usize,
        (r0, r1): (usize, usize),
    ) {
        let (q0, q1) = (r0 / MR, r1.div_ceil(MR));
        let mut q = q0;
        while q < q1 {
            let group = (q1 - q).min(4);
            let mut out = [[[0.0f32; MR]; PAIRS_COLS]; 4];
            match group {
                4 => panels::<4>(wp.add(q * k * MR), k, xt, &mut out),
                3 => panels::<3>(wp.add(q * k * MR), k, xt, &mut out),
                2 => panels::<2>(wp.add(q * k * MR), k, xt, &mut out),
                _ => panels::<1>(wp.add(q * k * MR), k, xt, &mut out),
            }
            for (g, panel) in out.iter().enumerate().take(group) {
                for i in 0..MR {
                    let row = (q + g) * MR + i;
                    if row >= r1 {
                        break;
                    }
                    for (j, col) in panel.iter().enumerate().take(n) {
                        *y.add((row - r0) * n + j) = col[i];
                    }
                }
            }
            q += group;
        }
    }

    /// `out[g][j][i] = Σ_k W[(panel g, row i), k] · x[k, j]` for `P` panels from `wp`.
    ///
    /// # Safety
    /// As [`pass`]; `P` panels of `k × MR` values at `wp`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn panels<const P: usize>(
        wp: *const f32,
        k: usize,
        xt: *const f32,
        out: &mut [[[f32; MR]; PAIRS_COLS]; 4],
    ) {
        let idx = indices();
        let mut acc = [[_mm512_setzero_ps(); PAIRS_COLS]; P];
        let mut kk = 0;
        while kk + 2 <= k {
            let xa = _mm512_loadu_ps(xt.add(kk * 16));
            let xb = _mm512_loadu_ps(xt.add((kk + 1) * 16));
            let px: [__m512; PAIRS_COLS] =
                std::array::from_fn(|j| _mm512_permutex2var_ps(xa, idx[j], xb));
            for (g, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_ps(wp.add((g * k + kk) * MR));
                for (aj, &p) in a.iter_mut().zip(&px) {
                    *aj = _mm512_fmadd_ps(wv, p, *aj);
                }
            }
            kk += 2;
        }
        if kk < k {
            // An odd k: the last row alone, its pair's upper half zero.
            let xa = _mm512_loadu_ps(xt.add(kk * 16));
            let px: [__m512; PAIRS_COLS] =
                std::array::from_fn(|j| _mm512_permutex2var_ps(xa, idx[j], _mm512_setzero_ps()));
            for (g, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_ps(0xff, wp.add((g * k + kk) * MR));
                for (aj, &p) in a.iter_mut().zip(&px) {
                    *aj = _mm512_fmadd_ps(wv, p, *aj);
                }
            }
        }
        for (g, a) in acc.iter().enumerate() {
            for (j, &v) in a.iter().enumerate() {
                _mm256_storeu_ps(out[g][j].as_mut_ptr(), add_halves(v));
            }
        }
    }

    /// Per column `j` of the tile, the permutation that puts column `j` of `x[k]` in lanes
    /// 0..8 and of `x[k + 1]` in lanes 8..16 (`_mm512_permutex2var_ps(x[k], idx, x[k + 1])`).
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn indices() -> [__m512i; PAIRS_COLS] {
        std::array::from_fn(|j| {
            let (a, b) = (j as i32, 16 + j as i32);
            _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
        })
    }

    /// The sums of lane `i` and lane `8 + i`: a pair accumulator's 8 rows.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn add_halves(v: __m512) -> __m256 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(lo, hi)
    }
}

/// `acc[g][i] = Σ_k W[(panel g, row i), k] · X[k, 0..L]` for the first `P` panels at `wp`
/// (each `k × MR`, k-major) and the tile `xt` (`k × L`).
#[inline(always)]
unsafe fn narrow_tile<S: Simd, const P: usize>(
    k: usize,
    wp: *const f32,
    xt: *const f32,
    out: &mut [[S::V; NARROW_MR]; NARROW_PANELS],
) {
    const MR: usize = NARROW_MR;
    let mut acc = [[S::zero(); MR]; P];
    for kk in 0..k {
        let xv = S::load(xt.add(kk * S::LANES));
        for (g, panel) in acc.iter_mut().enumerate() {
            let wv = wp.add(g * k * MR + kk * MR);
            for (i, a) in panel.iter_mut().enumerate() {
                *a = S::fma(S::bcast(wv.add(i)), xv, *a);
            }
        }
    }
    out[..P].copy_from_slice(&acc);
}

/// One thread's columns `n0..n1` of `Y = W·X`.
struct Pass<'a> {
    w: &'a Tiled,
    x: SyncPtr,
    y: SyncPtr,
    /// Row stride of `X` and `Y`.
    ld: usize,
    n0: usize,
    n1: usize,
    mr: usize,
    nv: usize,
}

impl SimdTask for Pass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: the plan checked that `x` holds `cols × ld` and `y` `rows × ld` values; the
        // pass touches columns n0..n1 < ld only, disjoint from every other pass.
        unsafe {
            match (self.mr, self.nv) {
                (8, 3) => pass::<S, 8, 3>(&self),
                (6, 2) => pass::<S, 6, 2>(&self),
                (8, 2) => pass::<S, 8, 2>(&self),
                _ => pass::<S, 4, 2>(&self),
            }
        }
    }
}

#[inline(always)]
unsafe fn pass<S: Simd, const MR: usize, const NV: usize>(p: &Pass<'_>) {
    let w = p.w;
    let nr = NV * S::LANES;
    debug_assert!(nr <= NR_MAX && MR == w.mr);
    let (x, y, ld) = (p.x.get() as *const f32, p.y.get(), p.ld);
    let (m, k) = (w.rows, w.cols);
    let panels = m.div_ceil(MR);
    let mut buf = PackBuf([0.0; KC * NR_MAX]);
    let bp = buf.0.as_mut_ptr();
    if k == 0 {
        for r in 0..m {
            std::ptr::write_bytes(y.add(r * ld + p.n0), 0, p.n1 - p.n0);
        }
        return;
    }
    // Equal k-blocks (a multiple of 8 rows but the last), no short tail block.
    let kb = k.div_ceil(k.div_ceil(KC)).div_ceil(8) * 8;
    let mut c0 = p.n0;
    while c0 < p.n1 {
        let c1 = (c0 + NC).min(p.n1);
        let mut k0 = 0;
        while k0 < k {
            let kc = kb.min(k - k0);
            let mut t = c0;
            while t < c1 {
                let width = nr.min(c1 - t);
                pack::<S, NV>(kc, x.add(k0 * ld + t), ld, width, bp);
                for q in 0..panels {
                    let rows = MR.min(m - q * MR);
                    let wp = w.panels.as_ptr().add(q * k * MR + k0 * MR);
                    let yq = y.add(q * MR * ld + t);
                    if rows == MR && width == nr {
                        tile_full::<S, MR, NV>(kc, wp, bp, yq, ld, k0 > 0);
                    } else {
                        tile_part::<S, MR, NV>(kc, wp, bp, yq, ld, k0 > 0, rows, width);
                    }
                }
                t += width;
            }
            k0 += kc;
        }
        c0 = c1;
    }
}

/// Copies `X[0..kc, 0..width]` (row stride `ld`) into `buf[kk·NR + j]`, zero past `width`.
#[inline(always)]
unsafe fn pack<S: Simd, const NV: usize>(
    kc: usize,
    x: *const f32,
    ld: usize,
    width: usize,
    buf: *mut f32,
) {
    let nr = NV * S::LANES;
    if width == nr {
        for kk in 0..kc {
            let (s, d) = (x.add(kk * ld), buf.add(kk * nr));
            for j in 0..NV {
                S::store(d.add(j * S::LANES), S::load(s.add(j * S::LANES)));
            }
        }
    } else {
        for kk in 0..kc {
            let (s, d) = (x.add(kk * ld), buf.add(kk * nr));
            std::ptr::copy_nonoverlapping(s, d, width);
            std::ptr::write_bytes(d.add(width), 0, nr - width);
        }
    }
}

/// A whole `MR × NR` tile of `Y` (row stride `ld`): stored, or added to what is there.
#[inline(always)]
unsafe fn tile_full<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    w: *const f32,
    b: *const f32,
    y: *mut f32,
    ld: usize,
    add: bool,
) {
    let acc = register_tile::<S, MR, NV>(kc, w, b);
    for (i, accs) in acc.iter().enumerate() {
        let yp = y.add(i * ld);
        for (j, &a) in accs.iter().enumerate() {
            let p = yp.add(j * S::LANES);
            S::store(p, if add { S::add(a, S::load(p)) } else { a });
        }
    }
}

/// The first `rows` rows and `width` columns of a tile (the ragged edges of `Y`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_part<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    w: *const f32,
    b: *const f32,
    y: *mut f32,
    ld: usize,
    add: bool,
    rows: usize,
    width: usize,
) {
    let acc = register_tile::<S, MR, NV>(kc, w, b);
    let mut tmp = [0.0f32; NR_MAX];
    for (i, accs) in acc.iter().enumerate().take(rows) {
        for (j, &a) in accs.iter().enumerate() {
            S::store(tmp.as_mut_ptr().add(j * S::LANES), a);
        }
        let yp = y.add(i * ld);
        for (j, &v) in tmp.iter().enumerate().take(width) {
            let p = yp.add(j);
            *p = if add { *p + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::forward as dense_matmul;

    #[test]
    fn matches_the_reference_on_awkward_shapes() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for isa in Isa::available() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (3, 5, 7),
                (8, 128, 48),
                (9, 129, 49),
                (17, 300, 97),
                (64, 27, 250),
                (10, 512, 1),
                (5, 0, 9),
                (0, 4, 4),
                (50, 300, 16),
                (41, 70, 12),
                (16, 33, 15),
                // At most four columns (rows in lanes, pairs of k, odd k last).
                (37, 77, 4),
                (70, 9, 3),
                (100, 64, 2),
                // Whole tiles of few columns, k past the weight stream's prefetch distance.
                (13, 700, 32),
                (24, 1100, 64),
            ] {
                let w: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let x: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                let want = dense_matmul(&w, m, k, &x, n);
                let mut t = Tiled::new(isa, m, k, &w);
                // X in groups of `g` columns (`ceil(n/g)` groups of `k × g`, zero past n), as
                // im2col_tiles writes them.
                let grouped = |g: usize| {
                    let mut v = vec![0.0f32; n.div_ceil(g) * g * k];
                    for kk in 0..k {
                        for j in 0..n {
                            v[(j / g * k + kk) * g + j % g] = x[kk * n + j];
                        }
                    }
                    v
                };
                // Rows r0..r1 of Y (`y` holds just these) against the reference.
                let check_rows = |y: &[f32], (r0, r1): (usize, usize), what: &str| {
                    for r in r0..r1 {
                        for j in 0..n {
                            let (a, b) = (y[(r - r0) * n + j], want[r * n + j]);
                            assert!(
                                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                "{isa:?} {m}x{k}x{n} {what} rows {r0}..{r1}: ({r}, {j}) = {a}, want {b}"
                            );
                        }
                    }
                };
                let nr = t.tile_width();
                let xt = grouped(nr);
                let mut y = vec![f32::NAN; m * n];
                t.forward_tiles(&xt, &mut y, n, (0, m));
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{isa:?} {m}x{k}x{n} tiles: y[{i}] = {a}, want {b}"
                    );
                }
                // All rows and shares of rows starting at a panel, in k-blocks and as one
                // stream of weights.
                let mr = t.panel_rows();
                for (r0, r1) in [(0, m), (mr.min(m), m), (0, (2 * mr).min(m)), (0, m / 2)] {
                    let r0 = (r0 / mr * mr).min(r1);
                    let mut y = vec![f32::NAN; (r1 - r0) * n];
                    t.forward_tiles(&xt, &mut y, n, (r0, r1));
                    check_rows(&y, (r0, r1), "tiles");
                    let mut y = vec![f32::NAN; (r1 - r0) * n];
                    t.forward_stream(&xt, &mut y, n, (r0, r1));
                    check_rows(&y, (r0, r1), "stream");
                }
                // Few columns: panels of MR columns, Wᵀ in tiles of NR rows, all rows and a share.
                let xs = grouped(mr);
                for (r0, r1) in [(0, m), (nr.min(m), m), (0, (2 * nr).min(m))] {
                    let r0 = r0 / nr * nr;
                    let mut y = vec![f32::NAN; (r1 - r0) * n];
                    t.forward_small(&xs, &mut y, n, (r0, r1));
                    check_rows(&y, (r0, r1), "small");
                }
                // At most one vector of columns: one tile, all rows and shares that start at
                // any panel and end anywhere (groups of three panels and their tails).
                if let Some(nw) = t.narrow_width().filter(|&nw| n <= nw) {
                    let xn = grouped(nw);
                    for (r0, r1) in [(0, m), (mr.min(m), m), (0, (2 * mr).min(m)), (0, m / 2)] {
                        let r0 = (r0 / mr * mr).min(r1);
                        let mut y = vec![f32::NAN; (r1 - r0) * n];
                        t.forward_narrow(&xn, &mut y, n, (r0, r1));
                        check_rows(&y, (r0, r1), "narrow");
                    }
                } else {
                    assert!(isa != Isa::Avx512 || n > 16, "{isa:?} n = {n}");
                }
                // New values replace what the few-column product made from the old ones.
                let doubled: Vec<f32> = w.iter().map(|v| 2.0 * v).collect();
                t.set_values(&doubled);
                let mut y = vec![f32::NAN; m * n];
                t.forward_small(&xs, &mut y, n, (0, m));
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - 2.0 * b).abs() <= 2e-4 * (1.0 + b.abs()),
                        "{isa:?} {m}x{k}x{n} small after set_values: y[{i}] = {a}, want {}",
                        2.0 * b
                    );
                }
                t.set_values(&w);
                for parts in [1, 2, 3] {
                    let mut y = vec![f32::NAN; m * n];
                    t.forward(&x, &mut y, n, parts);
                    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{isa:?} {m}x{k}x{n} parts {parts}: y[{i}] = {a}, want {b}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    struct Micro<const MR: usize, const NV: usize>(usize);
    impl<const MR: usize, const NV: usize> SimdTask for Micro<MR, NV> {
        type Output = f64;
        #[inline(always)]
        fn run<S: Simd>(self) -> f64 {
            let kc = self.0;
            let nr = NV * S::LANES;
            let w = vec![0.5f32; kc * MR];
            let b = vec![0.25f32; kc * nr];
            let mut y = vec![0.0f32; MR * nr];
            let reps = 20_000_000 / kc;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                unsafe {
                    tile_full::<S, MR, NV>(kc, w.as_ptr(), b.as_ptr(), y.as_mut_ptr(), nr, true)
                };
            }
            let s = t.elapsed().as_secs_f64();
            std::hint::black_box(&y);
            2.0 * (MR * nr * kc * reps) as f64 / s / 1e9
        }
    }

    #[test]
    #[ignore]
    fn micro_kernel_gflops() {
        if !Isa::Avx512.is_available() {
            return;
        }
        for kc in [64, 128, 192] {
            println!(
                "kc {kc}: 8x3 {:.1}  6x4 {:.1}  12x2 {:.1}  14x2 {:.1}  4x6 {:.1}  GFLOP/s",
                run_task(Isa::Avx512, Micro::<8, 3>(kc)),
                run_task(Isa::Avx512, Micro::<6, 4>(kc)),
                run_task(Isa::Avx512, Micro::<12, 2>(kc)),
                run_task(Isa::Avx512, Micro::<14, 2>(kc)),
                run_task(Isa::Avx512, Micro::<4, 6>(kc)),
            );
        }
    }
}
