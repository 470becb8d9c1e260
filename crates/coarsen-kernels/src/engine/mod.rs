//! Plans: a packed format prepared for one instruction set, run many times.

mod block_conv;
mod blocks;
mod dense;
mod direct;
mod micro;
mod nm_conv;
mod nm_rows;
mod rows;
mod tiled;
mod winograd;

pub use block_conv::BlockConv;
pub use dense::{DenseKernel, Threading};
pub use direct::{DirectConv, Epilogue, Residual};
pub use nm_conv::NmConv;
pub use winograd::Winograd;

use blocks::BlockEngine;
use dense::DenseEngine;
use rows::RowEngine;

use crate::error::{check_len, KernelError, Result};
use crate::formats::Packed;
use crate::simd::Isa;

/// A raw pointer that threads may share; each thread touches a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);

impl SyncPtr {
    /// The pointer (a method, so that closures capture the whole `SyncPtr`).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: used only to hand disjoint parts of one buffer to rayon tasks.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

/// A pointer into `buf` aligned to 64 bytes (a cache line), with at least `len` floats after
/// it; grows `buf` as needed. Vector loads from packed buffers then never straddle lines.
pub(crate) fn aligned(buf: &mut Vec<f32>, len: usize) -> *mut f32 {
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let p = buf.as_mut_ptr();
    let offset = p.align_offset(64);
    // SAFETY: `offset` < 16 floats, and `buf` holds `len + 16`.
    unsafe { p.add(offset.min(15)) }
}

/// `src` into `dst` (as long), inline: the block kernel's halo rows and the N:M gather's runs
/// are often 1 to 32 floats, which a call to `memcpy` each spent longer on than the copy.
#[inline(always)]
pub(crate) fn copy_floats(src: &[f32], dst: &mut [f32]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d8, s8) in (&mut d).zip(&mut s) {
        if let (Ok(d8), Ok(s8)) = (<&mut [f32; 8]>::try_from(d8), <&[f32; 8]>::try_from(s8)) {
            *d8 = *s8;
        }
    }
    for (d1, s1) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d1 = *s1;
    }
}

/// Part `t` of `0..n` cut into `parts` pieces whose boundaries are multiples of `align`.
pub(crate) fn split_range(n: usize, parts: usize, t: usize, align: usize) -> (usize, usize) {
    let chunk = n.div_ceil(parts.max(1)).div_ceil(align.max(1)) * align.max(1);
    ((t * chunk).min(n), ((t + 1) * chunk).min(n))
}

/// Register tile height of the block micro-kernel for an instruction set (= its `Simd::MR`).
fn tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 8,
        Isa::Avx2 => 4,
        _ => 4,
    }
}

/// Width in floats of the block micro-kernel's register tile (= `Simd::NV · Simd::LANES`).
pub(crate) fn tile_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 3 * 16,
        Isa::Avx2 => 2 * 8,
        Isa::Neon => 4 * 4,
        Isa::Scalar => 2 * 4,
    }
}

/// The positions of `0..len` that `mapped` does not name.
fn unwritten(len: usize, mapped: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut written = vec![false; len];
    mapped.for_each(|i| written[i as usize] = true);
    (0..len)
        .filter(|&i| !written[i])
        .map(|i| i as u32)
        .collect()
}

#[derive(Clone, Debug)]
enum Engine {
    Dense(DenseEngine),
    Blocks(BlockEngine),
    Rows(RowEngine),
}

/// A packed weight matrix `W` prepared to run `Y = W·X` and the two products training needs.
///
/// `X` has [`in_dim`](Self::in_dim) rows and `Y` [`out_dim`](Self::out_dim) rows, both
/// row-major with `n` columns (the batch × spatial positions of an im2col convolution). For every
/// format but channel-compact these are the columns and rows of `W`; channel-compact reads only
/// the kept input columns and writes only the kept rows.
///
/// `Plan::new` validates and packs once; the run methods check buffer lengths (a size that
/// overflows `usize` is an error) and allocate nothing. They use the threads of the current
/// rayon pool. Formats uphold their invariants by construction (private fields, checked
/// `from_parts`), so a plan built from safe code never reads or writes out of bounds.
///
/// ```
/// use coarsen_core::Mask;
/// use coarsen_kernels::{GroupBlocks, Packed, Plan};
///
/// let mask = Mask::from_fn(8, 6, |r, c| (r < 4) == (c < 3));
/// let w = vec![1.0f32; 48];
/// let plan = Plan::new(&Packed::Group(GroupBlocks::pack(&mask, &w).unwrap())).unwrap();
/// let x = vec![1.0f32; 6 * 5];
/// let mut y = vec![0.0f32; 8 * 5];
/// plan.forward(&x, &mut y, 5).unwrap();
/// assert!(y.iter().all(|&v| v == 3.0));
/// ```
#[derive(Clone, Debug)]
pub struct Plan {
    isa: Isa,
    format: &'static str,
    engine: Engine,
    /// Value positions no kernel writes (N:M padding, BSR past the edge): zeroed by
    /// `backward_weight`.
    padding: Vec<u32>,
    /// Number of values of the format.
    values_len: usize,
    /// Run the sparse engines on the calling thread only ([`Threading::Serial`]).
    serial: bool,
}

/// How a tiled kernel takes `X` (see [`Plan::run_tiled`]).
#[derive(Clone, Copy)]
enum TiledInput {
    /// Tiles of `tile_width` columns ([`Plan::forward_tiles_rows`]).
    Tiles,
    /// The same tiles, all of them under each panel of weights in turn
    /// ([`Plan::forward_stream_rows`]).
    Stream,
    /// Panels of `tile_rows` columns ([`Plan::forward_small_rows`]).
    Panels,
    /// One tile of `narrow_width` columns ([`Plan::forward_narrow_rows`]).
    Narrow,
}

impl Plan {
    /// A plan for the best instruction set of this CPU.
    pub fn new(packed: &Packed) -> Result<Plan> {
        Plan::with_isa(packed, Isa::detect())
    }

    /// A plan for a given instruction set (fails if this CPU lacks it).
    pub fn with_isa(packed: &Packed, isa: Isa) -> Result<Plan> {
        if !isa.is_available() {
            return Err(KernelError::Isa(isa.as_str()));
        }
        let mr = tile_rows(isa);
        let engine = match packed {
            Packed::Dense(d) => Engine::Dense(DenseEngine::new(
                isa,
                d.rows(),
                d.cols(),
                d.values().to_vec(),
            )),
            Packed::Channel(f) => Engine::Dense(DenseEngine::new(
                isa,
                f.kept_rows().len(),
                f.in_dim(),
                f.values().to_vec(),
            )),
            Packed::Group(f) => Engine::Blocks(BlockEngine::from_group(f, mr)),
            Packed::Shuffled(f) => Engine::Blocks(BlockEngine::from_shuffled(f, mr)),
            Packed::Bsr(f) => Engine::Blocks(BlockEngine::from_bsr(f, mr)),
            Packed::Csr(f) => Engine::Rows(RowEngine::from_csr(f, rows::chunk_cols(isa.lanes()))),
            Packed::Nm(f) => Engine::Rows(RowEngine::from_nm(f, rows::chunk_cols(isa.lanes()))),
        };
        // Value positions no kernel touches: N:M padding slots, BSR entries past the edge. (The
        // sparse formats hold at most u32::MAX values, so their positions fit u32; dense
        // engines write every value.)
        let values_len = packed.values().len();
        let padding = match &engine {
            Engine::Dense(_) => Vec::new(),
            Engine::Blocks(e) => unwritten(values_len, e.mapped()),
            Engine::Rows(e) => unwritten(values_len, e.mapped()),
        };
        Ok(Plan {
            isa,
            format: packed.name(),
            engine,
            padding,
            values_len,
            serial: false,
        })
    }

    /// The instruction set the plan runs on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The format's name.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// Rows of `Y` (and of `dY`).
    pub fn out_dim(&self) -> usize {
        match &self.engine {
            Engine::Dense(e) => e.rows(),
            Engine::Blocks(e) => e.rows(),
            Engine::Rows(e) => e.rows(),
        }
    }

    /// Rows of `X` (and of `dX`).
    pub fn in_dim(&self) -> usize {
        match &self.engine {
            Engine::Dense(e) => e.cols(),
            Engine::Blocks(e) => e.cols(),
            Engine::Rows(e) => e.cols(),
        }
    }

    /// Number of values of the format (the length of `dvalues` in
    /// [`backward_weight`](Self::backward_weight)).
    pub fn value_count(&self) -> usize {
        self.values_len
    }

    /// How the plan spreads over threads. Dense and channel-compact plans take every mode;
    /// the sparse formats split their work over the rayon pool unless `threading` is
    /// [`Threading::Serial`], which runs them on the calling thread (for callers that run many
    /// products in parallel themselves).
    pub fn set_threading(&mut self, threading: Threading) {
        self.serial = threading == Threading::Serial;
        if let Engine::Dense(e) = &mut self.engine {
            e.threading = threading;
        }
    }

    /// Threads the sparse engines split a product over.
    fn parts(&self) -> usize {
        if self.serial {
            1
        } else {
            rayon::current_num_threads().max(1)
        }
    }

    /// Chooses the GEMM of a dense or channel-compact plan's forward product (no effect on
    /// the sparse formats). Plans start with [`DenseKernel::Tiled`].
    pub fn set_dense_kernel(&mut self, kernel: DenseKernel) {
        let isa = self.isa;
        if let Engine::Dense(e) = &mut self.engine {
            e.set_kernel(isa, kernel);
        }
    }

    /// The forward GEMM of a dense or channel-compact plan.
    pub fn dense_kernel(&self) -> Option<DenseKernel> {
        match &self.engine {
            Engine::Dense(e) => Some(e.kernel()),
            _ => None,
        }
    }

    /// The threading of a dense or channel-compact plan.
    pub fn threading(&self) -> Option<Threading> {
        match &self.engine {
            Engine::Dense(e) => Some(e.threading),
            _ => None,
        }
    }

    fn check(
        &self,
        op: &'static str,
        a: (&'static str, usize, usize),
        b: (&'static str, usize, usize),
        n: usize,
    ) -> Result<()> {
        for (what, got, rows) in [a, b] {
            // A product that overflows cannot be any buffer's length (and must not wrap around
            // to one: the kernels trust `n`).
            let Some(want) = rows.checked_mul(n) else {
                return Err(KernelError::Param {
                    name: "n",
                    value: n.to_string(),
                    reason: format!("{what} would need {rows} × {n} values, more than usize"),
                });
            };
            check_len(op, what, got, want, || format!("{rows} rows × {n} columns"))?;
        }
        Ok(())
    }

    /// `Y = W·X`: `x` is `in_dim × n`, `y` is `out_dim × n`, both row-major.
    pub fn forward(&self, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.check(
            "forward",
            ("x", x.len(), self.in_dim()),
            ("y", y.len(), self.out_dim()),
            n,
        )?;
        if y.is_empty() {
            // Nothing to write; `n` is then bounded by no buffer when `x` is empty too.
            return Ok(());
        }
        match &self.engine {
            Engine::Dense(e) => e.forward(x, y, n),
            Engine::Blocks(e) => e.forward(self.isa, x, y, n, self.parts()),
            Engine::Rows(e) => e.forward(self.isa, x, y, n, self.parts()),
        }
        Ok(())
    }

    /// The tile width `NR` of [`forward_tiles`](Self::forward_tiles): `Some` for dense and
    /// channel-compact plans on the tiled kernel.
    pub fn tile_width(&self) -> Option<usize> {
        match &self.engine {
            Engine::Dense(e) => e.tiled().map(|t| t.tile_width()),
            _ => None,
        }
    }

    /// `Y = W·X` on the calling thread, with `X` given tile by tile: `ceil(n/NR)` tiles of
    /// `in_dim × NR` values, `NR` = [`tile_width`](Self::tile_width) (value `(k, t·NR + j)` of
    /// `X` at `xt[t·in_dim·NR + k·NR + j]`, zero past column `n`), as
    /// [`ConvDims::im2col_tiles`](crate::conv::ConvDims::im2col_tiles) writes them. The kernel
    /// then reads `X` in place, with no packing copy. `y` is `out_dim × n`, row-major.
    pub fn forward_tiles(&self, xt: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.forward_tiles_rows(xt, y, n, 0, self.out_dim())
    }

    /// Rows of a panel of the tiled kernel: [`forward_tiles_rows`](Self::forward_tiles_rows)
    /// splits rows at multiples of it (`None` for plans without tiled input).
    pub fn tile_rows(&self) -> Option<usize> {
        match &self.engine {
            Engine::Dense(e) => e.tiled().map(|t| t.panel_rows()),
            _ => None,
        }
    }

    /// [`forward_tiles`](Self::forward_tiles) for output rows `r0 .. r1` only (`r0` a multiple
    /// of [`tile_rows`](Self::tile_rows)); `y` is `(r1 − r0) × n`: a share of the work when
    /// there are too few columns to split.
    pub fn forward_tiles_rows(
        &self,
        xt: &[f32],
        y: &mut [f32],
        n: usize,
        r0: usize,
        r1: usize,
    ) -> Result<()> {
        self.run_tiled("forward_tiles", TiledInput::Tiles, xt, y, n, (r0, r1))
    }

    /// [`forward_tiles_rows`](Self::forward_tiles_rows) for a few tiles (small batches, deep
    /// layers, whose weights come from memory): `k` is not cut into blocks and each panel of
    /// weights runs over every tile before the next, so the weights are one sequential
    /// stream, prefetched ahead and read once; the tiles stay in L2 (`in_dim` × tile width
    /// values each).
    pub fn forward_stream_rows(
        &self,
        xt: &[f32],
        y: &mut [f32],
        n: usize,
        r0: usize,
        r1: usize,
    ) -> Result<()> {
        self.run_tiled("forward_stream", TiledInput::Stream, xt, y, n, (r0, r1))
    }

    /// Runs the tiled kernel of a dense or channel-compact plan that takes `X` as `input`
    /// says, after checking the call's buffers: `xt` holds `in_dim` rows of `n` columns padded
    /// to whole tiles (or panels, or the one narrow tile, which must hold all `n`), `y` rows
    /// `r0 .. r1` of `n` columns, and `r0` is aligned (to a panel, or for panels of columns to
    /// a tile of rows).
    fn run_tiled(
        &self,
        op: &'static str,
        input: TiledInput,
        xt: &[f32],
        y: &mut [f32],
        n: usize,
        (r0, r1): (usize, usize),
    ) -> Result<()> {
        let Engine::Dense(e) = &self.engine else {
            return Err(KernelError::Param {
                name: "plan",
                value: self.format.to_string(),
                reason: "only dense and channel-compact plans take tiled input".into(),
            });
        };
        let Some(t) = e.tiled() else {
            return Err(KernelError::Param {
                name: "plan",
                value: "faer".into(),
                reason: "the faer kernel takes row-major input; see tile_width".into(),
            });
        };
        let (cols, align) = match input {
            TiledInput::Panels => (t.panel_rows(), t.tile_width()),
            TiledInput::Tiles | TiledInput::Stream => (t.tile_width(), t.panel_rows()),
            TiledInput::Narrow => match t.narrow_width() {
                Some(width) if n <= width => (width, t.panel_rows()),
                width => {
                    return Err(KernelError::Param {
                        name: "n",
                        value: n.to_string(),
                        reason: width.map_or_else(
                            || "this CPU has no narrow kernel (AVX-512 only)".into(),
                            |w| format!("the narrow kernel takes at most {w} columns"),
                        ),
                    })
                }
            },
        };
        let overflow = || KernelError::Param {
            name: "n",
            value: n.to_string(),
            reason: "the buffers would need more values than usize holds".into(),
        };
        if r0 > r1 || r1 > self.out_dim() || !r0.is_multiple_of(align) {
            return Err(KernelError::Param {
                name: "rows",
                value: format!("{r0}..{r1}"),
                reason: format!(
                    "must lie within the {} rows and start at a multiple of {align}",
                    self.out_dim()
                ),
            });
        }
        let padded = n.checked_next_multiple_of(cols).ok_or_else(overflow)?;
        let want_x = self.in_dim().checked_mul(padded).ok_or_else(overflow)?;
        let want_y = (r1 - r0).checked_mul(n).ok_or_else(overflow)?;
        check_len(op, "xt", xt.len(), want_x, || {
            format!("{} rows × {n} columns in groups of {cols}", self.in_dim())
        })?;
        check_len(op, "y", y.len(), want_y, || {
            format!("{} rows × {n} columns", r1 - r0)
        })?;
        if !y.is_empty() {
            match input {
                TiledInput::Tiles => t.forward_tiles(xt, y, n, (r0, r1)),
                TiledInput::Stream => t.forward_stream(xt, y, n, (r0, r1)),
                TiledInput::Panels => t.forward_small(xt, y, n, (r0, r1)),
                TiledInput::Narrow => t.forward_narrow(xt, y, n, (r0, r1)),
            }
        }
        Ok(())
    }

    /// `Y = W·X` for products with few columns (small batches, deep layers), on the calling
    /// thread, output rows `r0 .. r1` (`r0` a multiple of [`tile_width`](Self::tile_width));
    /// `X` in panels of `MR` = [`tile_rows`](Self::tile_rows) columns
    /// (`ceil(n/MR)` panels of `in_dim × MR` values, as
    /// [`ConvDims::im2col_tiles`](crate::conv::ConvDims::im2col_tiles) writes tiles of `MR`);
    /// `y` is `(r1 − r0) × n`. The kernel vectorises over rows of `W` instead of columns of
    /// `X`, so no lane is spent on columns that do not exist.
    pub fn forward_small_rows(
        &self,
        xt: &[f32],
        y: &mut [f32],
        n: usize,
        r0: usize,
        r1: usize,
    ) -> Result<()> {
        self.run_tiled("forward_small_rows", TiledInput::Panels, xt, y, n, (r0, r1))
    }

    /// Columns of the narrow kernel ([`forward_narrow_rows`](Self::forward_narrow_rows)): one
    /// vector register's lanes (16 on AVX-512); `None` where it does not exist (other
    /// instruction sets, sparse formats, the faer kernel).
    pub fn narrow_width(&self) -> Option<usize> {
        match &self.engine {
            Engine::Dense(e) => e.tiled().and_then(|t| t.narrow_width()),
            _ => None,
        }
    }

    /// `Y = W·X` for at most [`narrow_width`](Self::narrow_width) columns (batch 1's deepest
    /// layers), on the calling thread, output rows `r0 .. r1` (`r0` a multiple of
    /// [`tile_rows`](Self::tile_rows)); `X` as one tile of `narrow_width` columns
    /// (`xt[k·NW + j]` = `X[k, j]`, zero past `n`, as
    /// [`ConvDims::im2col_tiles`](crate::conv::ConvDims::im2col_tiles) writes tiles of that
    /// width); `y` is `(r1 − r0) × n`. All the columns sit in one vector and the weights are
    /// broadcast, so `W` streams from memory once (the few-column kernel of
    /// [`forward_small_rows`](Self::forward_small_rows) streams it once per 8 columns).
    pub fn forward_narrow_rows(
        &self,
        xt: &[f32],
        y: &mut [f32],
        n: usize,
        r0: usize,
        r1: usize,
    ) -> Result<()> {
        self.run_tiled(
            "forward_narrow_rows",
            TiledInput::Narrow,
            xt,
            y,
            n,
            (r0, r1),
        )
    }

    /// `dX = Wᵀ·dY`: `dy` is `out_dim × n`, `dx` is `in_dim × n`.
    pub fn backward_input(&self, dy: &[f32], dx: &mut [f32], n: usize) -> Result<()> {
        self.check(
            "backward_input",
            ("dy", dy.len(), self.out_dim()),
            ("dx", dx.len(), self.in_dim()),
            n,
        )?;
        if dx.is_empty() {
            // Nothing to write; `n` is then bounded by no buffer when `dy` is empty too.
            return Ok(());
        }
        match &self.engine {
            Engine::Dense(e) => e.backward_input(dy, dx, n),
            Engine::Blocks(e) => e.backward_input(self.isa, dy, dx, n, self.parts()),
            Engine::Rows(e) => e.backward_input(self.isa, dy, dx, n, self.parts()),
        }
        Ok(())
    }

    /// The weight gradient on the pattern, `dY·Xᵀ` at the stored entries only, written in the
    /// format's own value layout (`dvalues` has [`value_count`](Self::value_count) values;
    /// padding slots get 0).
    pub fn backward_weight(
        &self,
        dy: &[f32],
        x: &[f32],
        n: usize,
        dvalues: &mut [f32],
    ) -> Result<()> {
        self.check(
            "backward_weight",
            ("dy", dy.len(), self.out_dim()),
            ("x", x.len(), self.in_dim()),
            n,
        )?;
        check_len(
            "backward_weight",
            "dvalues",
            dvalues.len(),
            self.value_count(),
            || format!("the {} format's values", self.format),
        )?;
        if dvalues.is_empty() {
            // Nothing to write; `n` is then bounded by no buffer when `dy` and `x` are empty.
            return Ok(());
        }
        if n == 0 {
            // An empty batch has a zero gradient (the kernels' loops would not run at all).
            dvalues.fill(0.0);
            return Ok(());
        }
        match &self.engine {
            Engine::Dense(e) => e.backward_weight(dy, x, n, dvalues),
            Engine::Blocks(e) => e.backward_weight(self.isa, dy, x, n, dvalues),
            Engine::Rows(e) => e.backward_weight(self.isa, dy, x, n, dvalues),
        }
        for &p in &self.padding {
            dvalues[p as usize] = 0.0;
        }
        Ok(())
    }

    /// New values for the same structure (after a weight update), in the format's layout.
    pub fn update_values(&mut self, values: &[f32]) -> Result<()> {
        check_len(
            "update_values",
            "values",
            values.len(),
            self.value_count(),
            || format!("the {} format's values", self.format),
        )?;
        match &mut self.engine {
            Engine::Dense(e) => e.set_values(values),
            Engine::Blocks(e) => e.set_values(values),
            Engine::Rows(e) => e.set_values(values),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_and_align() {
        for n in [0, 1, 7, 8, 9, 100, 1024] {
            let mut next = 0;
            for t in 0..3 {
                let (a, b) = split_range(n, 3, t, 8);
                assert_eq!(a, next.min(n));
                assert!(a % 8 == 0 || a == n);
                next = b;
            }
            assert_eq!(next, n);
        }
    }

    /// The three ways of taking tiled input share one checked entry: every one refuses a short
    /// `xt`, a short `y` and misaligned rows, and the narrow one more columns than it holds.
    #[test]
    fn tiled_inputs_are_checked_before_they_run() {
        use crate::formats::Dense;
        let (m, k) = (20, 7);
        let w: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.01).collect();
        let plan = Plan::new(&Packed::Dense(Dense::new(m, k, w).unwrap())).unwrap();
        let (Some(mr), Some(nr)) = (plan.tile_rows(), plan.tile_width()) else {
            return; // faer plans take row-major input
        };
        let n = 5;
        let xt = vec![0.0; k * nr];
        let mut y = vec![0.0; m * n];
        assert!(plan.forward_tiles_rows(&xt, &mut y, n, 0, m).is_ok());
        assert!(plan.forward_tiles_rows(&xt[1..], &mut y, n, 0, m).is_err());
        assert!(plan.forward_tiles_rows(&xt, &mut y[1..], n, 0, m).is_err());
        assert!(plan.forward_tiles_rows(&xt, &mut y, n, 1, m).is_err());
        let xs = vec![0.0; n.div_ceil(mr) * k * mr];
        assert!(plan.forward_small_rows(&xs, &mut y, n, 0, m).is_ok());
        assert!(plan.forward_small_rows(&xs[1..], &mut y, n, 0, m).is_err());
        assert!(plan.forward_small_rows(&xs, &mut y, n, mr, m).is_err());
        match plan.narrow_width() {
            Some(nw) => {
                let xn = vec![0.0; k * nw];
                assert!(plan.forward_narrow_rows(&xn, &mut y, n, 0, m).is_ok());
                assert!(plan.forward_narrow_rows(&xn[1..], &mut y, n, 0, m).is_err());
                assert!(plan.forward_narrow_rows(&xn, &mut y[1..], n, 0, m).is_err());
                assert!(plan.forward_narrow_rows(&xn, &mut y, n, 1, m).is_err());
                let wide = nw + 1;
                let mut yw = vec![0.0; m * wide];
                let xw = vec![0.0; k * 2 * nw];
                let e = plan.forward_narrow_rows(&xw, &mut yw, wide, 0, m);
                assert!(e.unwrap_err().to_string().contains("at most"));
            }
            None => {
                let e = plan.forward_narrow_rows(&[0.0; 16], &mut y, n, 0, m);
                assert!(e.unwrap_err().to_string().contains("no narrow kernel"));
            }
        }
    }
}
