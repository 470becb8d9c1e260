//! Implicit-GEMM convolution: `Y = W ⊛ X` for stride-1 "same" convolutions, reading the
//! channel-major input `[C, B·H·W]` in place instead of materialising im2col.
//!
//! Tap `(ky, kx)` of such a convolution reads, for output position `p`, the input at
//! `p + (ky − pt)·W + (kx − pl)` of every channel, or 0 where that falls into the padding. So the
//! im2col matrix's rows are shifted views of the input's rows: the micro-kernel loads `NR`
//! consecutive positions of a channel at the tap's shift with a lane mask that zeroes the
//! padding (AVX-512 masked loads, which also never touch memory in masked lanes), keeping an
//! `MR × NR` tile of `Y` in registers over every tap and a block of channels. `W` is packed
//! tap-major (`panel[(tap·C + c)·MR + i]`) so each step streams `MR` consecutive weights.

#[cfg(target_arch = "x86_64")]
use crate::conv::split_pairs_avx512;
use crate::conv::{ConvDims, ConvGeometry};
use crate::error::{check_len, KernelError, Result};
use crate::simd::Isa;

/// Rows of the register tile.
pub(super) const MR: usize = 8;
/// Vectors of 16 lanes per tile row.
pub(super) const NV: usize = 3;
/// Columns (output positions) of a tile.
pub(super) const NR: usize = NV * 16;
/// Channels per block: the `CB` input rows around a tile (`CB × (NR + 2·W + 2)` floats) are
/// copied once and read by every panel of `W` (128 measured best of 16–512 on ResNet-18).
const CB: usize = 128;
/// Most kernel taps supported (`kh·kw`).
pub(super) const MAX_TAPS: usize = 49;

/// What the implicit GEMM applies to each output value as it stores it:
/// `act(v + bias[row] + residual[row, column])`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// One value per output channel (all `cout` of them), added to its row.
    pub bias: Option<&'a [f32]>,
    /// A matrix added before the activation (a residual connection's other branch).
    pub residual: Option<Residual<'a>>,
    /// Whether the result goes through ReLU.
    pub relu: bool,
}

/// A matrix of the output's shape added by the [`Epilogue`]: the value of output row `r`,
/// column `c` (of the whole `B·Ho·Wo`, not of a call's range) is `values[r·ld + c]`.
#[derive(Clone, Copy, Debug)]
pub struct Residual<'a> {
    /// The values, `cout` rows of `ld`.
    pub values: &'a [f32],
    /// Values between the starts of two rows (at least the output's columns).
    pub ld: usize,
}

impl Epilogue<'_> {
    /// Checks how a call stores output columns `c0 .. c1` of `cout` rows: rows `ldy` apart
    /// (at least `c1 − c0`), the bias (`cout` values) and the residual (`cout` rows of
    /// `ld ≥ c1` values).
    pub(super) fn check(
        &self,
        op: &'static str,
        cout: usize,
        (c0, c1): (usize, usize),
        ldy: usize,
    ) -> Result<()> {
        let nc = c1 - c0;
        if ldy < nc {
            return Err(KernelError::Param {
                name: "ldy",
                value: ldy.to_string(),
                reason: format!("rows of {nc} columns need a stride of at least {nc}"),
            });
        }
        if let Some(b) = self.bias {
            check_len(op, "bias", b.len(), cout, || {
                format!("{cout} output channels")
            })?;
        }
        if let Some(r) = self.residual {
            let want = cout.checked_mul(r.ld);
            if r.ld < c1 || want.is_none() {
                return Err(KernelError::Param {
                    name: "residual.ld",
                    value: r.ld.to_string(),
                    reason: format!("rows must hold the output's {c1} columns"),
                });
            }
            check_len(op, "residual", r.values.len(), want.unwrap_or(0), || {
                format!("{cout} rows × {}", r.ld)
            })?;
        }
        Ok(())
    }
}

/// A dense convolution weight packed for the implicit-GEMM kernel (AVX-512 only): stride-1
/// convolutions whose output is as large as the input, and stride-2 ones whose output is half
/// of it (each tap a shift within one of the input's four phases, which the kernel takes
/// apart tile by tile).
#[derive(Clone, Debug)]
pub struct DirectConv {
    cout: usize,
    cin: usize,
    g: ConvGeometry,
    /// `ceil(cout/MR)` panels of `taps·cin × MR` values, tap-major; rows past `cout` zero.
    panels: Vec<f32>,
    /// Input channels per block (see [`CB`]).
    block: usize,
}

/// Where tap `(ty, tx)` of a stride-`s` convolution reads, in the plane coordinates the kernel
/// walks: the phase plane (`ry·2 + rx` for stride 2, 0 for stride 1) and the shift `(dy, dx)`
/// from the output position. Stride 2 reads input `(2·oy + ay, 2·ox + ax)`, `a = t − pad`, which
/// is position `(oy + ⌊ay/2⌋, ox + ⌊ax/2⌋)` of the plane of parity `(ay mod 2, ax mod 2)`.
pub(super) fn tap_place(g: &ConvGeometry, tap: usize) -> (usize, isize, isize) {
    let kw = g.kernel[1];
    let ay = (tap / kw) as isize - g.padding[0] as isize;
    let ax = (tap % kw) as isize - g.padding[1] as isize;
    if g.stride == [2, 2] {
        let plane = (ay.rem_euclid(2) * 2 + ax.rem_euclid(2)) as usize;
        (plane, ay.div_euclid(2), ax.div_euclid(2))
    } else {
        (0, ay, ax)
    }
}

/// Where the taps of a convolution read, for the in-place kernels: each tap a shift within one
/// plane, the planes' rows copied per tile into a halo buffer.
pub(super) struct Taps {
    /// Per tap: its plane and shift `(dy, dx)` (see [`tap_place`]).
    pub(super) places: Vec<(usize, isize, isize)>,
    /// Per tap: the shift `dy·W + dx` in positions.
    pub(super) shifts: Vec<isize>,
    /// The halo slot of each plane some tap reads.
    pub(super) slot_of: [usize; 4],
    /// The planes some tap reads, in slot order.
    pub(super) planes: Vec<usize>,
    /// The least (≤ 0) and greatest (≥ 0) shift.
    pub(super) lo: isize,
    hi: isize,
    /// Floats between a halo buffer's rows.
    pub(super) stride: usize,
    /// Output plane sizes (the planes the taps read are as large).
    h: usize,
    w: usize,
    /// Output positions of the batch (`B·Ho·Wo`): a row of a plane.
    ld: usize,
    /// Whether the planes are the input's phases (stride 2), which the halo copies take
    /// apart from the input's rows (`copy_halo`); else the plane is the input itself.
    phases: bool,
}

impl Taps {
    /// The taps of `g` on the planes of `d` (as large as the output: the input itself for
    /// stride 1, its four phases for stride 2, taken apart by the halo copies), for halos of
    /// up to `width` positions.
    pub(super) fn new(g: &ConvGeometry, d: &ConvDims, width: usize) -> Taps {
        let w = d.wo as isize;
        let places: Vec<(usize, isize, isize)> = (0..g.taps()).map(|t| tap_place(g, t)).collect();
        let shifts: Vec<isize> = places.iter().map(|&(_, dy, dx)| dy * w + dx).collect();
        let mut slot_of = [usize::MAX; 4];
        let mut planes = Vec::new();
        for &(q, _, _) in &places {
            if slot_of[q] == usize::MAX {
                slot_of[q] = planes.len();
                planes.push(q);
            }
        }
        // Each tile's input rows (the tile's positions and the halo the taps reach) are copied
        // into the halo buffer, rows `stride` apart: an odd number of cache lines, so the rows
        // spread over L1's sets (the input's own row stride, B·H·W floats, is often a multiple
        // of 4 KiB, and its rows would all fall into the same few sets).
        let lo = shifts.iter().copied().min().unwrap_or(0).min(0);
        let hi = shifts.iter().copied().max().unwrap_or(0).max(0);
        let span = width + (hi - lo) as usize;
        let mut lines = span.div_ceil(16);
        if lines.is_multiple_of(2) {
            lines += 1;
        }
        Taps {
            places,
            shifts,
            slot_of,
            planes,
            lo,
            hi,
            stride: lines * 16,
            h: d.ho,
            w: d.wo,
            ld: d.n(),
            phases: g.stride == [2, 2],
        }
    }

    /// Lane masks per tap of the tile of `width ≤ NR` positions from `t0`: the input position
    /// is inside the image (and the lane inside the tile). The output position walks from the
    /// tile's first one without divisions (for few input channels, dividing per lane and tap
    /// cost more than the products); a tap's mask is the lanes whose row is inside the image
    /// under its vertical shift and whose column is under its horizontal one, each of those
    /// made once per distinct shift (three each for 3×3 taps, not nine per lane).
    pub(super) fn masks(&self, t0: usize, width: usize, masks: &mut [[u16; NV]]) {
        const { assert!(NR <= 64) };
        let (h, w) = (self.h as isize, self.w as isize);
        let width = width.min(NR);
        let r = t0 % (self.h * self.w).max(1);
        let (mut oy, mut ox) = ((r / self.w) as isize, (r % self.w) as isize);
        let mut rows = [0isize; NR];
        let mut cols = [0isize; NR];
        for lane in 0..width {
            (rows[lane], cols[lane]) = (oy, ox);
            ox += 1;
            if ox == w {
                ox = 0;
                oy += 1;
                if oy == h {
                    oy = 0;
                }
            }
        }
        // Lanes (bit per lane) inside the image under a shift, per distinct shift.
        let inside = |pos: &[isize], d: isize, n: isize| -> u64 {
            pos[..width]
                .iter()
                .enumerate()
                .filter(|&(_, &p)| p + d >= 0 && p + d < n)
                .fold(0u64, |m, (lane, _)| m | 1 << lane)
        };
        // The mask of shift `d` from `seen` (its first `n` entries), made and added if new.
        fn memo(
            seen: &mut [(isize, u64); MAX_TAPS],
            n: &mut usize,
            d: isize,
            make: impl FnOnce() -> u64,
        ) -> u64 {
            if let Some(e) = seen[..*n].iter().find(|e| e.0 == d) {
                return e.1;
            }
            let m = make();
            seen[*n] = (d, m);
            *n += 1;
            m
        }
        let mut ys = [(0isize, 0u64); MAX_TAPS];
        let mut xs = [(0isize, 0u64); MAX_TAPS];
        let (mut ny, mut nx) = (0, 0);
        for (m, &(_, dy, dx)) in masks.iter_mut().zip(&self.places) {
            let ym = memo(&mut ys, &mut ny, dy, || inside(&rows, dy, h));
            let xm = memo(&mut xs, &mut nx, dx, || inside(&cols, dx, w));
            let both = ym & xm;
            for (v, mv) in m.iter_mut().enumerate() {
                *mv = (both >> (16 * v)) as u16;
            }
        }
    }

    /// The lane masks of full-width tiles (`NR` positions) for a call's range: a tile's masks
    /// depend only on where it starts within an image, so they are kept per thread, by the
    /// image size and the taps, in a table by that start, each entry computed the first time a
    /// tile starts there and read from then on (one call, one layer and one pass to the next).
    /// The tables they replace were made per call, one entry per period of tiles, and a
    /// thread's call on a chunk of 4 images (85 tiles of a 32×32 layer, whose period is 64)
    /// computed almost every tile's masks anyway: a visible share of `perf`'s samples in the
    /// first layer (3 input channels), whose tiles have few products to spread them over.
    pub(super) fn mask_cache(&self) -> MaskCache {
        let hw = self.h * self.w;
        let taps = self.places.len();
        let fits = hw
            .checked_mul(taps)
            .is_some_and(|e| e <= MaskCache::MAX_ENTRIES);
        if !fits || taps == 0 || hw == 0 {
            return MaskCache { table: None };
        }
        let mut tables = MASK_TABLES.take();
        let found = tables
            .iter()
            .position(|t| t.is_for(self.h, self.w, &self.places));
        let table = match found {
            Some(i) => tables.remove(i),
            None => MaskTable {
                h: self.h,
                w: self.w,
                places: self.places.clone(),
                made: vec![false; hw],
                masks: vec![[0; NV]; hw * taps],
            },
        };
        MASK_TABLES.set(tables);
        MaskCache { table: Some(table) }
    }

    /// Copies channels `c0 .. c0 + cn` of every plane the taps read (`x`: the batch, `cin`
    /// channels of `B·H·W` input positions) around the `width` positions from `t0` (at most
    /// the `width` of [`new`](Self::new)) into `halo`: channel `c` of slot `s` at row `s·cn +
    /// c − c0`, position `t0 + j + lo` at `j`. Positions outside the batch are not copied (the
    /// masks never read them). At stride 2 the planes are the input's phases: plane `ry·2 + rx`
    /// holds `x[c, b, 2i + ry, 2j + rx]` at position `(b, i, j)`, each output row of them
    /// taken from one input row by splitting its even and odd columns (no copy of the whole
    /// input into phase planes first: that wrote and read the input once more per layer).
    ///
    /// # Safety
    /// `x` holds `cin × B·H·W` values with `c0 + cn ≤ cin`, and `halo` room for
    /// `planes.len() · cn · stride` values.
    pub(super) unsafe fn copy_halo(
        &self,
        x: *const f32,
        cin: usize,
        (c0, cn): (usize, usize),
        t0: usize,
        width: usize,
        halo: *mut f32,
    ) {
        if let Some(rows) = self.halo_rows(cin, (c0, cn), t0, width) {
            for (src, dst, n) in rows {
                // SAFETY: as the caller guarantees; see `halo_rows`.
                unsafe { std::ptr::copy_nonoverlapping(x.add(src), halo.add(dst), n) };
            }
            return;
        }
        let split = f32_split(crate::simd::Isa::detect() == crate::simd::Isa::Avx512);
        // SAFETY: as the caller guarantees; the AVX-512 split only with AVX-512.
        unsafe { self.copy_phase_halo(x, (c0, cn), t0, width, halo, split) };
    }

    /// The positions `a .. b` of the planes that a halo of the tiles of `width` positions
    /// from `t0` holds (those inside the batch), and where they go in each halo row (`at`).
    fn span(&self, t0: usize, width: usize) -> (usize, usize, usize) {
        let first = t0 as isize + self.lo;
        let a = first.max(0) as usize;
        let b = ((t0 + width) as isize + self.hi).min(self.ld as isize);
        let b = (b.max(a as isize)) as usize;
        (a, b, (a as isize - first) as usize)
    }

    /// What [`copy_halo`](Self::copy_halo) copies at stride 1: for every plane slot and
    /// channel `c0 .. c0 + cn`, `(src, dst, n)`, `n` values from `x + src` to `halo + dst`
    /// (every `dst + n` within the halo's `planes.len() · cn · stride` values, every `src + n`
    /// within `x`'s `cin × B·H·W`). `None` at stride 2, whose halo rows are the input's rows
    /// taken apart.
    pub(super) fn halo_rows(
        &self,
        cin: usize,
        (c0, cn): (usize, usize),
        t0: usize,
        width: usize,
    ) -> Option<impl Iterator<Item = (usize, usize, usize)> + '_> {
        if self.phases {
            return None;
        }
        // `a ≤ b ≤ ld`, and a row's offset `at = a − first ≤ −lo` plus `b − a ≤ width + hi −
        // lo` stays within `stride`.
        let (a, b, at) = self.span(t0, width);
        Some(self.planes.iter().enumerate().flat_map(move |(slot, &q)| {
            (0..cn).map(move |c| {
                (
                    (q * cin + c0 + c) * self.ld + a,
                    (slot * cn + c) * self.stride + at,
                    b - a,
                )
            })
        }))
    }

    /// [`copy_halo`](Self::copy_halo) at stride 2, into a halo of `T` (`f32`, or bfloat16's
    /// bits for the bfloat16 kernel, at the same offsets), each channel's row pairs of one
    /// parity taken apart by `split` (`f32`: [`split_rows_avx512`] where the CPU has AVX-512,
    /// else [`split_rows`]). Positions `a .. b` of the phase planes (those the halo of the
    /// tiles of `width` positions from `t0` holds) go to `at` in each halo row.
    ///
    /// # Safety
    /// As [`copy_halo`](Self::copy_halo), the taps at stride 2; the CPU has what `split` asks
    /// for, and `split` writes no more than [`split_rows`] would.
    pub(super) unsafe fn copy_phase_halo<T>(
        &self,
        x: *const f32,
        (c0, cn): (usize, usize),
        t0: usize,
        width: usize,
        halo: *mut T,
        split: SplitRows<T>,
    ) {
        /// Output rows per pass over the channels.
        const SEGS: usize = 64;
        debug_assert!(self.phases);
        // `a ≤ b ≤ ld`, `at + b − a` within `stride`.
        let (a, b, at) = self.span(t0, width);
        let (h, w) = (self.h, self.w);
        let (hw, wi) = ((h * w).max(1), 2 * w);
        // Floats per input channel: B images of 2·Ho × 2·Wo.
        let chan = 4 * self.ld;
        #[cfg(target_arch = "x86_64")]
        let wide = crate::simd::Isa::detect() == crate::simd::Isa::Avx512;
        let slot = |q: usize| self.slot_of[q];
        let mut p = a;
        while p < b {
            // The output rows of positions p.. (at most SEGS of them): each one's place in
            // the halo row, length, and first input column (of the row pair's top row).
            let mut segs = [(0usize, 0usize, 0usize); SEGS];
            let mut ns = 0;
            let (img, r) = (p / hw, p % hw);
            let (mut img, mut oy, mut ox) = (img, r / w.max(1), r % w.max(1));
            while p < b && ns < SEGS {
                let n = (w - ox).min(b - p);
                segs[ns] = (at + (p - a), n, img * 4 * hw + 2 * oy * wi + 2 * ox);
                ns += 1;
                p += n;
                ox = 0;
                oy += 1;
                if oy == h {
                    oy = 0;
                    img += 1;
                }
            }
            // Both row parities of a channel, channel after channel: its rows are read in
            // order (one parity after the other read every other pair of cache lines, twice
            // over), and the next channel's are fetched meanwhile.
            let rows: [Option<PhaseRows<T>>; 2] = std::array::from_fn(|ry| {
                let (se, so) = (slot(2 * ry), slot(2 * ry + 1));
                (se != usize::MAX || so != usize::MAX).then(|| PhaseRows {
                    // SAFETY: as the caller guarantees (`c0 + cn ≤ cin` channels of `chan`).
                    src: unsafe { x.add(c0 * chan + ry * wi) },
                    chan,
                    even: (se != usize::MAX).then(|| unsafe { halo.add(se * cn * self.stride) }),
                    odd: (so != usize::MAX).then(|| unsafe { halo.add(so * cn * self.stride) }),
                    stride: self.stride,
                })
            });
            let segs = &segs[..ns];
            for c in 0..cn {
                #[cfg(target_arch = "x86_64")]
                if wide && c + 1 < cn {
                    // SAFETY: only addresses inside the next channel's rows of these segments.
                    unsafe {
                        prefetch_rows(x.add((c0 + c + 1) * chan), segs, wi, rows[1].is_some())
                    };
                }
                for r in rows.iter().flatten() {
                    // SAFETY: as the caller guarantees: input row `2·oy + ry` of image `img`
                    // holds `2·Wo` values, a segment reads `2n ≤ 2·(Wo − ox)` of them from
                    // column `2·ox`; a halo row holds `at + b − a` values.
                    unsafe { split(r, c, segs) };
                }
            }
        }
    }
}

/// Asks for the input rows of `segs` (output rows of a stride-2 halo, `(at, n, from)`: the
/// row pair at `from` of the channel at `src`, rows `wi` floats long; the odd row only with
/// `odd`) to be brought into the cache, one request per cache line.
///
/// # Safety
/// Every segment's row pair lies in the channel's values.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn prefetch_rows(src: *const f32, segs: &[(usize, usize, usize)], wi: usize, odd: bool) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for &(_, n, from) in segs {
        let (a, b) = (from, from + if odd { wi } else { 0 } + 2 * n);
        let mut p = a;
        while p < b {
            // SAFETY: `p` is inside the segment's row pair.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(src.add(p).cast()) };
            p += 16;
        }
    }
}

/// How [`Taps::copy_phase_halo`] takes a channel's row pairs of one parity apart, `(rows, c,
/// segs)`: every segment `(at, n, from)` of channel `c`, `n` pairs from `from`, even values to
/// the halo row `rows.even` at `at`, odd ones to `rows.odd` ([`PhaseRows::each`]), converted
/// to the halo's values; writes nothing else ([`split_rows`]).
pub(super) type SplitRows<T> = unsafe fn(&PhaseRows<T>, usize, &[(usize, usize, usize)]);

/// The [`SplitRows`] into `f32`: by AVX-512 permutes where `wide` (the CPU has AVX-512F),
/// else value by value.
fn f32_split(wide: bool) -> SplitRows<f32> {
    #[cfg(target_arch = "x86_64")]
    if wide {
        return split_rows_avx512;
    }
    let _ = wide;
    split_rows
}

/// [`SplitRows`] into `f32`, value by value.
///
/// # Safety
/// The channel's row holds `from + 2n` values per segment and its halo rows `at + n`.
unsafe fn split_rows(rows: &PhaseRows<f32>, c: usize, segs: &[(usize, usize, usize)]) {
    // SAFETY: as the caller guarantees.
    unsafe {
        rows.each(c, segs, |src, n, even, odd| {
            for j in 0..n {
                if let Some(e) = even {
                    *e.add(j) = *src.add(2 * j);
                }
                if let Some(o) = odd {
                    *o.add(j) = *src.add(2 * j + 1);
                }
            }
        })
    }
}

/// [`split_rows`] by AVX-512 permutes ([`split_pairs_avx512`]).
///
/// # Safety
/// As [`split_rows`], with AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_rows_avx512(rows: &PhaseRows<f32>, c: usize, segs: &[(usize, usize, usize)]) {
    // SAFETY: as the caller guarantees: the segment's `2n` values and `n` halo positions.
    unsafe {
        rows.each(c, segs, |src, n, e, o| {
            split_pairs_avx512(src, 2 * n, n, e, o)
        })
    }
}

/// Where [`Taps::copy_phase_halo`] takes one row parity of the input apart: channel `c`'s
/// rows from `src + c·chan`, its even columns to the halo row `even + c·stride`, its odd ones
/// to `odd + c·stride` (each where the taps read that phase).
pub(super) struct PhaseRows<T> {
    src: *const f32,
    chan: usize,
    even: Option<*mut T>,
    odd: Option<*mut T>,
    stride: usize,
}

impl<T> PhaseRows<T> {
    /// Channel `c`, each segment `(at, n, from)`: `f(src, n, even, odd)` for its `n` pairs
    /// from `src` (`from` in the channel's rows) and their places in the halo rows (position
    /// `at`).
    ///
    /// # Safety
    /// The channel's row holds `from + 2n` values per segment and its halo rows `at + n`.
    #[inline(always)]
    pub(super) unsafe fn each(
        &self,
        c: usize,
        segs: &[(usize, usize, usize)],
        mut f: impl FnMut(*const f32, usize, Option<*mut T>, Option<*mut T>),
    ) {
        for &(at, n, from) in segs {
            let to = c * self.stride + at;
            // SAFETY: as the caller guarantees: the segment's `2n` values and its halo
            // positions `to .. to + n`.
            unsafe {
                f(
                    self.src.add(c * self.chan + from),
                    n,
                    self.even.map(|e| e.add(to)),
                    self.odd.map(|o| o.add(to)),
                )
            };
        }
    }
}

/// One thread's lane masks of full-width tiles for one image size and set of taps, by where a
/// tile starts within the image ([`Taps::mask_cache`]).
struct MaskTable {
    h: usize,
    w: usize,
    places: Vec<(usize, isize, isize)>,
    /// Per start: whether its masks are in `masks` yet.
    made: Vec<bool>,
    /// `H·W` starts' masks, one per tap.
    masks: Vec<[u16; NV]>,
}

impl MaskTable {
    /// Whether it holds the masks of taps at `places` on images of `h × w`.
    fn is_for(&self, h: usize, w: usize, places: &[(usize, isize, isize)]) -> bool {
        self.h == h && self.w == w && self.places == places
    }
}

thread_local! {
    /// Each thread's mask tables, the latest used last (at most [`MaskCache::MAX_TABLES`]).
    /// A call takes its table out and puts it back when done, so a nested call on the same
    /// thread makes its own.
    static MASK_TABLES: std::cell::Cell<Vec<MaskTable>> =
        const { std::cell::Cell::new(Vec::new()) };
}

/// A call's lane masks of full-width tiles ([`Taps::mask_cache`]): the thread's table for the
/// call's image size and taps, returned to the thread when the call drops it.
pub(super) struct MaskCache {
    /// `None` where the image is too large to keep one (every tile's masks are computed).
    table: Option<MaskTable>,
}

impl MaskCache {
    /// Entries (starts × taps) of the largest table kept: 384 KiB, 3×3 taps on images of up
    /// to 14,563 positions (120×120).
    const MAX_ENTRIES: usize = 1 << 16;
    /// Tables kept per thread (ResNet-18 on CIFAR uses 7, VGG-16 5); the least recently used
    /// goes first.
    const MAX_TABLES: usize = 16;

    /// The lane masks per tap of the tile of `width` positions from `t0` into `masks`, from
    /// the table where it holds them (`t`: the taps that made the cache).
    pub(super) fn masks(&mut self, t: &Taps, t0: usize, width: usize, masks: &mut [[u16; NV]]) {
        let taps = t.places.len();
        let Some(table) = self.table.as_mut().filter(|_| width == NR) else {
            t.masks(t0, width, masks);
            return;
        };
        let at = t0 % table.made.len();
        let entry = &mut table.masks[at * taps..][..taps];
        if !table.made[at] {
            t.masks(t0, NR, entry);
            table.made[at] = true;
        }
        masks[..taps].copy_from_slice(entry);
    }
}

impl Drop for MaskCache {
    fn drop(&mut self) {
        let Some(table) = self.table.take() else {
            return;
        };
        let mut tables = MASK_TABLES.take();
        // A nested call may have put back a table of the same key meanwhile.
        tables.retain(|t| !t.is_for(table.h, table.w, &table.places));
        if tables.len() >= Self::MAX_TABLES {
            tables.remove(0);
        }
        tables.push(table);
        MASK_TABLES.set(tables);
    }
}

/// The start of a halo of `len` values in `buf` (grown as needed), on a 64-byte boundary:
/// halo rows are whole cache lines apart, so the taps whose shift is a multiple of a line's
/// values load whole lines instead of two halves (`T`: `f32`, or bfloat16's bits).
pub(super) fn halo_start<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> *mut T {
    // Values per cache line: the most the start moves to reach a boundary.
    let line = 64 / std::mem::size_of::<T>().max(1);
    if buf.len() < len + line {
        buf.resize(len + line, T::default());
    }
    let skip = buf.as_ptr().align_offset(64).min(line);
    buf[skip..].as_mut_ptr()
}

/// The lanes of a tile's `NV` vectors that hold its first `width ≤ NR` positions.
pub(super) fn lanes(width: usize) -> [u16; NV] {
    let mut f = [0u16; NV];
    for (j, m) in f.iter_mut().enumerate() {
        let n = width.saturating_sub(16 * j).min(16);
        *m = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
    }
    f
}

/// Whether this CPU runs convolutions of geometry `g` in place: AVX-512, and a stride-1 or
/// stride-2, undilated convolution of 1 to [`MAX_TAPS`] taps (a 1×1 stride-2 one too: its halo
/// copies take only the even columns of even rows).
pub(super) fn runs_in_place(g: &ConvGeometry) -> bool {
    Isa::detect() == Isa::Avx512 && in_place_geometry(g)
}

/// Whether the in-place kernels' scheme runs geometry `g` (see [`runs_in_place`], whatever
/// the CPU).
pub(super) fn in_place_geometry(g: &ConvGeometry) -> bool {
    let taps = g.taps();
    (g.stride == [1, 1] || g.stride == [2, 2])
        && g.dilation == [1, 1]
        && taps > 0
        && taps <= MAX_TAPS
}

/// Whether an in-place kernel of geometry `g` over `cin` channels runs convolutions of `d`:
/// same geometry and channels, output as large as the input (stride 1) or as each phase plane
/// (stride 2).
pub(super) fn accepts(g: &ConvGeometry, cin: usize, d: &ConvDims) -> bool {
    let sizes = if g.stride == [2, 2] {
        d.h == 2 * d.ho && d.w == 2 * d.wo
    } else {
        d.ho == d.h && d.wo == d.w
    };
    d.g == *g && d.c == cin && sizes
}

impl DirectConv {
    /// Packs the dense weight `values` (`[cout, cin, kh, kw]` row-major, as im2col orders its
    /// rows) of a convolution with geometry `g`. `None` when this CPU lacks AVX-512 or the
    /// geometry is not a stride-1 or stride-2, undilated convolution of at most 7×7 taps (use
    /// im2col).
    pub fn new(g: ConvGeometry, cout: usize, cin: usize, values: &[f32]) -> Result<Option<Self>> {
        let taps = g.taps();
        let want = cout
            .checked_mul(cin)
            .and_then(|v| v.checked_mul(taps))
            .ok_or_else(|| KernelError::Param {
                name: "shape",
                value: format!("[{cout}, {cin}, {}, {}]", g.kernel[0], g.kernel[1]),
                reason: "overflows usize".into(),
            })?;
        check_len("DirectConv::new", "values", values.len(), want, || {
            format!("[{cout}, {cin}, {}, {}]", g.kernel[0], g.kernel[1])
        })?;
        if !runs_in_place(&g) {
            return Ok(None);
        }
        let k = taps * cin;
        let mut panels = vec![0.0f32; cout.div_ceil(MR) * MR * k];
        for r in 0..cout {
            let panel = &mut panels[(r / MR) * k * MR..];
            for c in 0..cin {
                for t in 0..taps {
                    panel[(t * cin + c) * MR + r % MR] = values[(r * cin + c) * taps + t];
                }
            }
        }
        Ok(Some(DirectConv {
            cout,
            cin,
            g,
            panels,
            block: CB,
        }))
    }

    /// Sets the input channels per block (at least 1): the block's input rows around a tile
    /// are copied once and read by every panel of the weight, so a block that fits L1 with
    /// one panel's share of the weight keeps the kernel out of L2.
    pub fn set_channel_block(&mut self, channels: usize) {
        self.block = channels.max(1);
    }

    /// Output channels.
    pub fn out_dim(&self) -> usize {
        self.cout
    }

    /// Whether it runs convolutions of `d` (same geometry and channels, output as large as the
    /// input).
    pub fn accepts(&self, d: &ConvDims) -> bool {
        accepts(&self.g, self.cin, d)
    }

    /// Columns `c0 .. c1` of the output `[cout, B·Ho·Wo]` of the batch `x` (`[cin, B, H, W]`,
    /// sizes `d`) into `y` (`cout × (c1 − c0)`, row-major), on the calling thread.
    pub fn forward(
        &self,
        x: &[f32],
        d: &ConvDims,
        c0: usize,
        c1: usize,
        y: &mut [f32],
    ) -> Result<()> {
        self.forward_rows(x, d, c0, c1, 0, self.cout, y)
    }

    /// Rows of the register tile: [`forward_rows`](Self::forward_rows) splits rows at
    /// multiples of it.
    pub const ROW_ALIGN: usize = MR;
    /// Output positions of the kernel's widest tile (narrower ones serve a range's end).
    pub const TILE: usize = NR;

    /// Output channels `r0 .. r1` (`r0` a multiple of [`ROW_ALIGN`](Self::ROW_ALIGN)) of
    /// columns `c0 .. c1` into `y` (`(r1 − r0) × (c1 − c0)`): a share of the work when there
    /// are too few columns to split.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_rows(
        &self,
        x: &[f32],
        d: &ConvDims,
        c0: usize,
        c1: usize,
        r0: usize,
        r1: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let ldy = c1.saturating_sub(c0);
        // SAFETY: `checked` refuses a `y` that does not hold the block's
        // `(r1 − r0) × (c1 − c0)` values, which are its rows at stride `c1 − c0`.
        unsafe {
            self.checked(
                "DirectConv::forward",
                x,
                d,
                ((c0, c1), (r0, r1)),
                (y.as_mut_ptr(), ldy, y.len()),
                Epilogue::default(),
            )
        }
    }

    /// [`forward_rows`](Self::forward_rows) written straight into the layer's output through
    /// the epilogue: value `(r, c)` for `r0 ≤ r < r1`, `c0 ≤ c < c1` goes to
    /// `y[(r − r0)·ldy + (c − c0)]`, as `act(v + bias[r] + residual[r, c])`. Tasks that share one output
    /// buffer write their own blocks of it in place (no copy through a scratch buffer).
    ///
    /// # Safety
    /// `y` must be valid for writes of every position above (it need not be initialised:
    /// the kernel writes each value before it reads it back), and no other thread may access
    /// those positions during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_into(
        &self,
        x: &[f32],
        d: &ConvDims,
        (c0, c1): (usize, usize),
        (r0, r1): (usize, usize),
        y: *mut f32,
        ldy: usize,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        // The block's own shape: the caller vouches for `y` and `ldy`.
        let len = r1.saturating_sub(r0) * c1.saturating_sub(c0);
        // SAFETY: as the caller guarantees.
        unsafe {
            self.checked(
                "DirectConv::forward_into",
                x,
                d,
                ((c0, c1), (r0, r1)),
                (y, ldy, len),
                epilogue,
            )
        }
    }

    /// Checks a call (`y_len`: the values `y` holds for the block) and runs it.
    ///
    /// # Safety
    /// As [`forward_into`](Self::forward_into), for an output whose length is `y_len`.
    unsafe fn checked(
        &self,
        op: &'static str,
        x: &[f32],
        d: &ConvDims,
        ((c0, c1), (r0, r1)): ((usize, usize), (usize, usize)),
        (y, ldy, y_len): (*mut f32, usize, usize),
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        let output = if self.g.stride == [2, 2] {
            "output half the input's size"
        } else {
            "output as large as the input"
        };
        check_call(
            op,
            d,
            (self.accepts(d), &|| {
                format!(
                    "the kernel was packed for {} input channels and {:?}, {output}",
                    self.cin, self.g
                )
            }),
            x.len(),
            ((c0, c1), 1),
            ((r0, r1), MR, self.cout),
            y_len,
        )?;
        epilogue.check(op, self.cout, (c0, c1), ldy)?;
        if c0 == c1 || r0 == r1 {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `new` returned `Some` only on a CPU with AVX-512; the lengths were checked
        // above; `y` as the caller guarantees; the bias (if any) holds `cout` values.
        unsafe {
            avx512::forward(self, x, d, (c0, c1), (r0, r1), (y, ldy), epilogue)
        };
        Ok(())
    }
}

/// Checks a call of a convolution kernel that reads the input in place: `accepts` (else the
/// message says what the kernel runs), the input's length, the output columns `c0 .. c1`
/// (multiples of `unit` within `B·H·W`), the output rows `r0 .. r1` (within `cout`, `r0` a
/// multiple of `align`) and the output's length `(r1 − r0) × (c1 − c0)`.
#[allow(clippy::type_complexity)]
pub(crate) fn check_call(
    op: &'static str,
    d: &ConvDims,
    (accepts, runs): (bool, &dyn Fn() -> String),
    x: usize,
    ((c0, c1), unit): ((usize, usize), usize),
    ((r0, r1), align, cout): ((usize, usize), usize, usize),
    y: usize,
) -> Result<()> {
    if !accepts {
        return Err(KernelError::Param {
            name: "dims",
            value: format!("[{}, {}, {}, {}] {:?}", d.c, d.b, d.h, d.w, d.g),
            reason: runs(),
        });
    }
    let p = d.n();
    check_len(op, "x", x, d.c * d.b * d.h * d.w, || {
        format!("[{}, {}, {}, {}]", d.c, d.b, d.h, d.w)
    })?;
    if c0 > c1 || c1 > p || !c0.is_multiple_of(unit) || !c1.is_multiple_of(unit) {
        return Err(KernelError::Param {
            name: "columns",
            value: format!("{c0}..{c1}"),
            reason: format!("must be multiples of {unit} within the {p} output positions"),
        });
    }
    if r0 > r1 || r1 > cout || !r0.is_multiple_of(align) {
        return Err(KernelError::Param {
            name: "rows",
            value: format!("{r0}..{r1}"),
            reason: format!(
                "must lie within the {cout} output channels and start at a multiple of {align}"
            ),
        });
    }
    check_len(op, "y", y, (r1 - r0) * (c1 - c0), || {
        format!("{} rows × {} columns", r1 - r0, c1 - c0)
    })
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::{halo_start, lanes, DirectConv, Epilogue, Taps, MAX_TAPS, MR, NR, NV};
    use crate::conv::ConvDims;
    use crate::engine::micro::rank1;
    use crate::simd::Avx512;

    /// See [`DirectConv::forward_into`].
    ///
    /// # Safety
    /// AVX-512F must be available; `x` holds `cin × B·H·W` values, `y` is valid for rows
    /// `0 .. r1 − r0` of `c1 − c0` values at stride `ldy`, and the bias (if any) holds `cout`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward(
        k: &DirectConv,
        x: &[f32],
        d: &ConvDims,
        (c0, c1): (usize, usize),
        (r0, r1): (usize, usize),
        (yp, ldy): (*mut f32, usize),
        epilogue: Epilogue<'_>,
    ) {
        if k.cin == 0 {
            // No input: every output is the epilogue of 0.
            for i in 0..r1 - r0 {
                let b = epilogue.bias.map_or(0.0, |b| b[r0 + i]);
                for c in 0..c1 - c0 {
                    let res = epilogue
                        .residual
                        .map_or(0.0, |r| r.values[(r0 + i) * r.ld + c0 + c]);
                    let v = b + res;
                    *yp.add(i * ldy + c) = if epilogue.relu { v.max(0.0) } else { v };
                }
            }
            return;
        }
        let t = Taps::new(&k.g, d, NR);
        let (cin, stride) = (k.cin, t.stride);
        // Reused per thread and never cleared: lanes that would read what an earlier tile left
        // there are masked off.
        let cbs = k.block.max(1);
        let mut halo = HALO.take();
        let hp = halo_start(&mut halo, t.planes.len() * cbs * stride + 16);
        let mut masks = [[0u16; NV]; MAX_TAPS];
        let mut cache = t.mask_cache();
        let mut t0 = c0;
        while t0 < c1 {
            // 64 positions left (batch 1's 8×8 images, a chunk's end) run as two tiles of
            // 32, not 48 and a one-vector tile of 16 (whose 8 accumulators leave the FMA
            // units waiting on each column's load).
            let width = if c1 - t0 == 64 { 32 } else { NR.min(c1 - t0) };
            cache.masks(&t, t0, width, &mut masks);
            let full = lanes(width);
            let mut cb0 = 0;
            while cb0 < cin {
                let cbn = cbs.min(cin - cb0);
                t.copy_halo(x.as_ptr(), cin, (cb0, cbn), t0, width, hp);
                let tile = Tile {
                    k,
                    t: &t,
                    hp,
                    masks: &masks,
                    full,
                    channels: (cb0, cbn),
                    rows: (r0, r1),
                    out: (yp, ldy),
                    t0,
                    c0,
                    epilogue,
                };
                // Tiles narrower than 48 (the batch's last columns, or batch 1's small
                // images) keep only the vectors they need in registers and issue no FMA on
                // lanes past the range.
                match width.div_ceil(16) {
                    1 => run_tile::<1>(&tile),
                    2 => run_tile::<2>(&tile),
                    _ => run_tile::<3>(&tile),
                }
                cb0 += cbn;
            }
            t0 += width;
        }
        HALO.set(halo);
    }

    /// Stores one row `r` of a register tile (the tile's valid lanes `full`, its first
    /// column `t0` of the whole output) at `out` as `act(v + bias[r] + residual[r, t0 ..])`
    /// through `epilogue`, `v` added to what `out` holds when `add` (a later block of input
    /// channels).
    ///
    /// Always inlined into the kernels' AVX-512 functions (a call would take the register
    /// tile's address and keep it in memory through the whole tile).
    ///
    /// # Safety
    /// AVX-512F must be available; `out` valid for the lanes of `full`, and the epilogue's
    /// bias and residual for row `r` and those columns.
    #[inline(always)]
    pub(crate) unsafe fn store_row<const V: usize>(
        acc: &[__m512; V],
        out: *mut f32,
        full: [u16; NV],
        add: bool,
        epilogue: Epilogue<'_>,
        r: usize,
        t0: usize,
    ) {
        let bias = epilogue.bias.map(|b| _mm512_set1_ps(*b.get_unchecked(r)));
        // The residual's row, at the tile's first column.
        let res = epilogue
            .residual
            .map(|res| res.values.as_ptr().add(r * res.ld + t0));
        for (j, &v) in acc.iter().enumerate() {
            let o = out.add(j * 16);
            let mut v = if add {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(full[j], o))
            } else {
                v
            };
            if let Some(b) = bias {
                v = _mm512_add_ps(v, b);
            }
            if let Some(rp) = res {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(full[j], rp.add(j * 16)));
            }
            if epilogue.relu {
                v = _mm512_max_ps(v, _mm512_setzero_ps());
            }
            _mm512_mask_storeu_ps(o, full[j], v);
        }
    }

    /// What one tile of output positions and one block of input channels share over every
    /// panel of the weight.
    #[derive(Clone, Copy)]
    struct Tile<'a> {
        k: &'a DirectConv,
        t: &'a Taps,
        hp: *const f32,
        masks: &'a [[u16; NV]; MAX_TAPS],
        /// Lanes of the tile inside the range.
        full: [u16; NV],
        /// First channel and channels of the block whose halo `hp` holds.
        channels: (usize, usize),
        rows: (usize, usize),
        out: (*mut f32, usize),
        t0: usize,
        c0: usize,
        epilogue: Epilogue<'a>,
    }

    /// Every panel of rows `r0 .. r1` on one tile of at most `V·16` positions (`V ≤ NV`) and
    /// one block of channels: stores the tile (first block) or adds it to what earlier blocks
    /// stored, the last block applying the epilogue.
    ///
    /// # Safety
    /// As [`forward`], which made `tile`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run_tile<const V: usize>(tile: &Tile<'_>) {
        let Tile {
            k,
            t,
            hp,
            masks,
            full,
            channels: (cb0, cbn),
            rows: (r0, r1),
            out: (yp, ldy),
            t0,
            c0,
            epilogue,
        } = *tile;
        let taps = t.places.len();
        let cin = k.cin;
        let ktot = taps * cin;
        let (lo, stride) = (t.lo, t.stride);
        let last = cb0 + cbn == cin;
        for q in r0 / MR..r1.div_ceil(MR) {
            let rows = MR.min(r1 - q * MR);
            let panel = k.panels.as_ptr().add(q * ktot * MR);
            let mut acc = [[_mm512_setzero_ps(); V]; MR];
            for (tap, &m) in masks.iter().enumerate().take(taps) {
                if m[..V] == [0; V] {
                    continue;
                }
                // Lane j of this tap reads halo position (shift − lo) + j; masked lanes
                // (padding, or past the range) read nothing.
                let slot = t.slot_of[t.places[tap].0];
                let base = hp.add(slot * cbn * stride + (t.shifts[tap] - lo) as usize);
                let wp = panel.add((tap * cin + cb0) * MR);
                for c in 0..cbn {
                    let row = base.add(c * stride);
                    let mut xv = [_mm512_setzero_ps(); V];
                    for (j, v) in xv.iter_mut().enumerate() {
                        *v = _mm512_maskz_loadu_ps(m[j], row.add(j * 16));
                    }
                    rank1::<Avx512, MR, V>(&mut acc, wp.add(c * MR), &xv);
                }
            }
            // Store (first channel block) or add (later ones) the tile's valid part; the last
            // block applies the epilogue.
            let epilogue = if last { epilogue } else { Epilogue::default() };
            let out = yp.add((q * MR - r0) * ldy + (t0 - c0));
            if rows == MR {
                // A whole panel, row by row with constant indices: the tile stays in registers
                // (no copy of it handed to a call).
                macro_rules! store {
                    ($($i:literal)*) => {$(
                        store_row(&acc[$i], out.add($i * ldy), full, cb0 > 0, epilogue, q * MR + $i, t0);
                    )*};
                }
                const { assert!(MR == 8) };
                store!(0 1 2 3 4 5 6 7);
            } else {
                store_tile(acc, rows, (out, ldy), full, cb0 > 0, epilogue, (q * MR, t0));
            }
        }
    }

    /// Stores the first `rows` rows of a register tile (rows `r ..` of the output, columns
    /// `t0 ..`) at `out`, rows `ldy` apart, through [`store_row`]: a panel of fewer than `MR`
    /// rows (whole panels store inline, row by row with constant indices).
    ///
    /// Not inlined, and given the tile by value: the tile stays in registers through the
    /// taps and channels of [`run_tile`] and is written out once (indexed at run time
    /// by `rows`, inline it made LLVM keep the tile in memory and store all of it after
    /// every tap: with 3 input channels, more stores than FMAs). The copy handed to it cost
    /// the first layer (3 input channels, few products per panel) a visible share of its
    /// time, hence the inline stores of whole panels.
    ///
    /// # Safety
    /// As [`store_row`], for each of the rows.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn store_tile<const V: usize>(
        acc: [[__m512; V]; MR],
        rows: usize,
        (out, ldy): (*mut f32, usize),
        full: [u16; NV],
        add: bool,
        epilogue: Epilogue<'_>,
        (r, t0): (usize, usize),
    ) {
        for (i, a) in acc.iter().enumerate().take(rows) {
            store_row(a, out.add(i * ldy), full, add, epilogue, r + i, t0);
        }
    }

    thread_local! {
        /// Per-thread halo buffer of [`forward`] (taken out for a call, so a nested call on the
        /// same thread makes its own).
        static HALO: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    /// A tile's lane masks cover exactly its first `width` positions.
    #[test]
    fn lanes_cover_the_tile_width() {
        assert_eq!(lanes(0), [0, 0, 0]);
        assert_eq!(lanes(5), [0x1f, 0, 0]);
        assert_eq!(lanes(16), [u16::MAX, 0, 0]);
        assert_eq!(lanes(17), [u16::MAX, 1, 0]);
        assert_eq!(lanes(47), [u16::MAX, u16::MAX, 0x7fff]);
        assert_eq!(lanes(NR), [u16::MAX; NV]);
    }

    /// The tables' lane masks equal the masks computed tile by tile, for ranges starting
    /// anywhere, calls that alternate between geometries (stride 1 and 2, 5×5 taps, tiny and
    /// odd images) and so read tables kept from earlier calls, and more geometries than a
    /// thread keeps tables for.
    #[test]
    fn cached_masks_equal_computed_ones() {
        let geometries = [
            (ConvGeometry::square(3, 1, 1), 8, 32, 32),
            (ConvGeometry::square(3, 1, 1), 40, 4, 4),
            (ConvGeometry::square(5, 1, 2), 30, 7, 9),
            (ConvGeometry::square(3, 2, 1), 20, 16, 12),
            (ConvGeometry::square(1, 1, 0), 3, 5, 5),
            // The output sizes of the stride-2 and the 5×5 geometries, other taps.
            (ConvGeometry::square(3, 1, 1), 20, 8, 6),
            (ConvGeometry::square(3, 1, 1), 30, 7, 9),
        ];
        let mut extra: Vec<_> = (1..=MaskCache::MAX_TABLES)
            .map(|i| (ConvGeometry::square(3, 1, 1), 2, i, 3))
            .collect();
        extra.extend(geometries);
        for round in 0..2 {
            for &(g, b, h, w) in geometries
                .iter()
                .chain(if round == 1 { &extra[..] } else { &[] })
            {
                let d = ConvDims::new(&[3, b, h, w], g).unwrap();
                let t = Taps::new(&g, &d, NR);
                let n = d.n();
                for c0 in [0, 5, NR + 3] {
                    let mut cache = t.mask_cache();
                    assert!(cache.table.is_some(), "{h}x{w}: no table");
                    let (mut got, mut want) = ([[0u16; NV]; MAX_TAPS], [[0u16; NV]; MAX_TAPS]);
                    let mut t0 = c0;
                    while t0 < n {
                        let width = NR.min(n - t0);
                        cache.masks(&t, t0, width, &mut got);
                        t.masks(t0, width, &mut want);
                        assert_eq!(got, want, "{h}x{w} from {c0}, tile at {t0}, round {round}");
                        t0 += width;
                    }
                }
            }
        }
        let kept = MASK_TABLES.take();
        assert!(
            kept.len() <= MaskCache::MAX_TABLES,
            "{} tables kept",
            kept.len()
        );
    }

    /// Images too large for a table compute every tile's masks, and equal them.
    #[test]
    fn large_images_compute_masks_per_tile() {
        let g = ConvGeometry::square(3, 1, 1);
        let d = ConvDims::new(&[1, 1, 128, 128], g).unwrap();
        let t = Taps::new(&g, &d, NR);
        let mut cache = t.mask_cache();
        assert!(cache.table.is_none());
        let (mut got, mut want) = ([[0u16; NV]; MAX_TAPS], [[0u16; NV]; MAX_TAPS]);
        for t0 in [0, 100, 127 * 128 - 5] {
            cache.masks(&t, t0, NR, &mut got);
            t.masks(t0, NR, &mut want);
            assert_eq!(got, want, "tile at {t0}");
        }
    }

    /// Stride-2 halos taken apart from the input rows equal the phase planes' definition,
    /// for rows that take every path of the split (16-pair vectors, masked tails, single
    /// pairs), halos that cut through rows and images, and channel blocks.
    #[test]
    fn stride_2_halos_hold_every_phase() {
        let g = ConvGeometry::square(3, 2, 1);
        for &(c, b, h, w) in &[
            (3, 2, 4, 32),
            (2, 1, 6, 16),
            (2, 3, 2, 34),
            (1, 2, 4, 48),
            (2, 2, 8, 8),
            (1, 1, 2, 2),
            (2, 2, 4, 70),
        ] {
            let d = ConvDims::new(&[c, b, h, w], g).unwrap();
            let x: Vec<f32> = (0..c * b * h * w).map(|i| i as f32).collect();
            let (ho, wo) = (h / 2, w / 2);
            let plane = |q: usize, ci: usize, p: usize| {
                let (ry, rx) = (q / 2, q % 2);
                let (bi, i, j) = (p / (ho * wo), p % (ho * wo) / wo, p % wo);
                x[((ci * b + bi) * h + 2 * i + ry) * w + 2 * j + rx]
            };
            let t = Taps::new(&g, &d, NR);
            assert_eq!(t.planes.len(), 4);
            let n = d.n();
            for t0 in (0..n).step_by(7) {
                for width in [1, 16, 29, NR] {
                    let width = width.min(n - t0);
                    for (c0, cn) in [(0, c), (c - 1, 1)] {
                        let mut halo = vec![f32::NAN; 4 * cn * t.stride];
                        // SAFETY: `x` holds the batch, the halo every plane's `cn` rows.
                        unsafe {
                            t.copy_halo(x.as_ptr(), c, (c0, cn), t0, width, halo.as_mut_ptr())
                        };
                        let first = t0 as isize + t.lo;
                        for (slot, &q) in t.planes.iter().enumerate() {
                            for k in 0..cn {
                                let row = &halo[(slot * cn + k) * t.stride..][..t.stride];
                                for (j, &v) in row.iter().enumerate() {
                                    let p = first + j as isize;
                                    let inside = p >= 0
                                        && (p as usize) < n
                                        && p < (t0 + width) as isize + t.hi;
                                    if inside {
                                        let want = plane(q, c0 + k, p as usize);
                                        assert_eq!(v, want, "[{c},{b},{h},{w}] t0 {t0} width {width} plane {q} position {p}");
                                    } else {
                                        assert!(v.is_nan(), "[{c},{b},{h},{w}] wrote position {p}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Both instruction sets' row split, every length up to three vectors, each output
        // alone or both, two channels.
        for n in 0..50 {
            let s: Vec<f32> = (0..2 * (2 * n + 3)).map(|i| i as f32).collect();
            for wide in [false, Isa::detect() == Isa::Avx512] {
                for (we, wodd) in [(true, true), (true, false), (false, true)] {
                    // Rows of n + 3 halo positions; the segment goes to 1 .. n + 1.
                    let (mut e, mut o) = (vec![f32::NAN; 2 * (n + 3)], vec![f32::NAN; 2 * (n + 3)]);
                    let rows = PhaseRows {
                        src: s.as_ptr(),
                        chan: 2 * n + 3,
                        even: we.then_some(e.as_mut_ptr()),
                        odd: wodd.then_some(o.as_mut_ptr()),
                        stride: n + 3,
                    };
                    let segs = [(1, n, 1)];
                    // SAFETY: channel c's segment reads `s[c·(2n + 3) + 1 ..][..2n]`, writes
                    // positions 1 ..= n of its halo rows; `wide` only with AVX-512.
                    let split = f32_split(wide);
                    for c in 0..2 {
                        unsafe { split(&rows, c, &segs) };
                    }
                    for c in 0..2 {
                        for j in 0..n + 3 {
                            let inside = (1..=n).contains(&j);
                            let at = c * (2 * n + 3) + 1 + 2 * (j.max(1) - 1);
                            let want_e = if we && inside { s[at] } else { f32::NAN };
                            let want_o = if wodd && inside { s[at + 1] } else { f32::NAN };
                            let (ge, go) = (e[c * (n + 3) + j], o[c * (n + 3) + j]);
                            assert_eq!(
                                ge.to_bits(),
                                want_e.to_bits(),
                                "{n} pairs, wide {wide}, channel {c}, {j}"
                            );
                            assert_eq!(
                                go.to_bits(),
                                want_o.to_bits(),
                                "{n} pairs, wide {wide}, channel {c}, {j}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The per-thread halo buffer is never cleared, so padding lanes must never take what an
    /// earlier call left there: a call on a NaN input must not leak into the next one.
    #[test]
    fn padding_lanes_never_see_what_an_earlier_call_left() {
        if Isa::detect() != Isa::Avx512 {
            return;
        }
        for g in [ConvGeometry::square(3, 1, 1), ConvGeometry::square(3, 2, 1)] {
            let (cout, cin) = (8, 5);
            let d = ConvDims::new(&[cin, 2, 8, 6], g).unwrap();
            let k = cin * g.taps();
            let wv: Vec<f32> = (0..cout * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
            let dc = DirectConv::new(g, cout, cin, &wv).unwrap().unwrap();
            let len = cin * 2 * 8 * 6;
            let x: Vec<f32> = (0..len).map(|i| (i % 11) as f32 * 0.2 - 1.0).collect();
            let n = d.n();
            let mut col = vec![0.0; k * n];
            d.im2col_range(&x, 0, n, &mut col).unwrap();
            let want = reference::forward(&wv, cout, k, &col, n);
            let mut y = vec![0.0; cout * n];
            dc.forward(&vec![f32::NAN; len], &d, 0, n, &mut y).unwrap();
            assert!(y.iter().all(|v| v.is_nan()));
            dc.forward(&x, &d, 0, n, &mut y).unwrap();
            for (a, e) in y.iter().zip(&want) {
                assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g:?}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn matches_im2col_times_the_weight() {
        if Isa::detect() != Isa::Avx512 {
            return;
        }
        let mut seed = 11u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let geometries = [
            ConvGeometry::square(3, 1, 1),
            ConvGeometry::square(1, 1, 0),
            ConvGeometry::square(5, 1, 2),
            ConvGeometry {
                kernel: [3, 1],
                stride: [1, 1],
                padding: [1, 0, 1, 0],
                dilation: [1, 1],
            },
            // Stride 2, read as the input's phases: ResNet's strided 3×3 and 1×1 (one phase),
            // and a 1×2 whose taps read two of them.
            ConvGeometry::square(3, 2, 1),
            ConvGeometry::square(1, 2, 0),
            ConvGeometry {
                kernel: [1, 2],
                stride: [2, 2],
                padding: [0, 0, 0, 1],
                dilation: [1, 1],
            },
        ];
        for g in geometries {
            for &(cout, cin, b, h, w) in &[
                (8, 3, 2, 5, 4),
                (9, 70, 3, 7, 7),
                (17, 5, 1, 1, 1),
                (16, 64, 2, 8, 8),
                (3, 2, 4, 3, 17),
                (9, 20, 3, 6, 10),
                (5, 3, 2, 2, 2),
                // More columns than four tiles, and two channel blocks of 16.
                (10, 20, 3, 10, 12),
                // Rows of 20 and 17 outputs at stride 2 (a vector and a masked tail).
                (8, 5, 2, 4, 40),
                (4, 3, 2, 6, 34),
            ] {
                let d = ConvDims::new(&[cin, b, h, w], g).unwrap();
                let k = cin * g.taps();
                let wv: Vec<f32> = (0..cout * k).map(|_| rnd()).collect();
                let x: Vec<f32> = (0..cin * b * h * w).map(|_| rnd()).collect();
                let n = d.n();
                let mut col = vec![0.0; k * n];
                d.im2col_range(&x, 0, n, &mut col).unwrap();
                let want = reference::forward(&wv, cout, k, &col, n);
                let dc = DirectConv::new(g, cout, cin, &wv).unwrap().unwrap();
                if g.stride == [2, 2] && (h % 2 == 1 || w % 2 == 1) {
                    // Odd sizes have phase planes of unequal sizes: im2col's business.
                    assert!(!dc.accepts(&d));
                    continue;
                }
                assert!(dc.accepts(&d));
                // Whole range, and ranges that start and end anywhere.
                for (c0, c1) in [(0, n), (1, n), (0, n / 2), (n / 3, n - n / 5), (n, n)] {
                    let mut y = vec![f32::NAN; cout * (c1 - c0)];
                    dc.forward(&x, &d, c0, c1, &mut y).unwrap();
                    for r in 0..cout {
                        for j in 0..c1 - c0 {
                            let (a, e) = (y[r * (c1 - c0) + j], want[r * n + c0 + j]);
                            assert!(
                                (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "{g:?} [{cout},{cin},{b},{h},{w}] {c0}..{c1} ({r}, {j}): {a} vs {e}"
                            );
                        }
                    }
                }
                // Row shares.
                let mut r0 = 0;
                while r0 < cout {
                    let r1 = (r0 + 2 * DirectConv::ROW_ALIGN).min(cout);
                    let mut y = vec![f32::NAN; (r1 - r0) * n];
                    dc.forward_rows(&x, &d, 0, n, r0, r1, &mut y).unwrap();
                    for r in r0..r1 {
                        for j in 0..n {
                            let (a, e) = (y[(r - r0) * n + j], want[r * n + j]);
                            assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "rows {r0}..{r1}");
                        }
                    }
                    r0 = r1;
                }
                // Straight into a wider buffer through bias, a residual and ReLU, in row
                // shares, with channel blocks of 16 (the epilogue waits for the last block).
                let bias: Vec<f32> = (0..cout).map(|_| rnd()).collect();
                let ldr = n + 2;
                let res: Vec<f32> = (0..cout * ldr).map(|_| rnd()).collect();
                let mut dcb = dc.clone();
                dcb.set_channel_block(16);
                let ldy = n + 5;
                for (relu, with_res) in [(false, false), (true, false), (false, true), (true, true)]
                {
                    let mut y = vec![f32::NAN; cout * ldy];
                    let mut r0 = 0;
                    while r0 < cout {
                        let r1 = (r0 + DirectConv::ROW_ALIGN).min(cout);
                        let epilogue = Epilogue {
                            bias: Some(&bias),
                            residual: with_res.then_some(Residual {
                                values: &res,
                                ld: ldr,
                            }),
                            relu,
                        };
                        // SAFETY: rows r0..r1 of n columns at stride ldy lie inside `y`.
                        unsafe {
                            dcb.forward_into(
                                &x,
                                &d,
                                (0, n),
                                (r0, r1),
                                y.as_mut_ptr().add(r0 * ldy),
                                ldy,
                                epilogue,
                            )
                        }
                        .unwrap();
                        r0 = r1;
                    }
                    for r in 0..cout {
                        for j in 0..n {
                            let r_v = if with_res { res[r * ldr + j] } else { 0.0 };
                            let e = want[r * n + j] + bias[r] + r_v;
                            let e = if relu { e.max(0.0) } else { e };
                            let a = y[r * ldy + j];
                            assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "into ({r}, {j})");
                        }
                        // Past the block's columns nothing is written.
                        assert!(y[r * ldy + n..(r + 1) * ldy].iter().all(|v| v.is_nan()));
                    }
                }
                // A stride shorter than a row, and a bias of the wrong length, are refused.
                let mut y = vec![0.0f32; cout * n];
                let bad = |ldy: usize, bias: &[f32], y: &mut [f32]| {
                    let e = Epilogue {
                        bias: Some(bias),
                        ..Epilogue::default()
                    };
                    // SAFETY: `y` holds cout × n values; the calls are refused before writing.
                    unsafe { dc.forward_into(&x, &d, (0, n), (0, cout), y.as_mut_ptr(), ldy, e) }
                };
                assert!(bad(n.saturating_sub(1), &bias, &mut y).is_err() || n == 0);
                assert!(bad(n, &bias[1..], &mut y).is_err());
                // A residual with short rows, or too few of them, is refused.
                for (ld, len) in [(n.saturating_sub(1), cout * n), (n, cout * n - 1)] {
                    let e = Epilogue {
                        residual: Some(Residual {
                            values: &res[..len.min(res.len())],
                            ld,
                        }),
                        ..Epilogue::default()
                    };
                    // SAFETY: `y` holds cout × n values; the call is refused before writing.
                    let r =
                        unsafe { dc.forward_into(&x, &d, (0, n), (0, cout), y.as_mut_ptr(), n, e) };
                    assert!(r.is_err() || n == 0, "residual ld {ld}, {len} values");
                }
                assert!(dc
                    .forward_rows(&x, &d, 0, n, 1, cout, &mut vec![0.0; (cout - 1) * n])
                    .is_err());
                let mut y = vec![0.0; cout * n + 1];
                assert!(dc.forward(&x, &d, 0, n, &mut y).is_err());
                assert!(dc.forward(&x[1..], &d, 0, n, &mut y[1..]).is_err());
            }
        }
        // Stride 3 and dilation are im2col's.
        let g = ConvGeometry::square(3, 3, 1);
        assert!(DirectConv::new(g, 2, 2, &[0.0; 36]).unwrap().is_none());
        let g = ConvGeometry {
            dilation: [2, 2],
            ..ConvGeometry::square(3, 1, 2)
        };
        assert!(DirectConv::new(g, 2, 2, &[0.0; 36]).unwrap().is_none());
        assert!(DirectConv::new(ConvGeometry::square(3, 1, 1), 2, 2, &[0.0; 35]).is_err());
    }
}
