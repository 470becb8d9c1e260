//! N:M convolution for few output positions (batch 1's deep layers): reads half the weight's
//! bytes (at 2:4) where the dense kernels stream all of it from memory.
//!
//! A dense product with few columns is bound by the weight's bytes, not by its multiplications,
//! and an N:M weight keeps N values of every group of M input channels. Here output channels
//! run in the 16 lanes of a vector: for each group of M channels at one kernel tap, and each
//! of its N slots, the kernel loads 16 rows' values and 16 rows' positions in the group
//! (`u8`), and for each output position permutes that group's M inputs (one short load) into
//! the lanes by those positions, then multiplies and adds. The input is first gathered into
//! that layout, `[tap group][column][M]`, straight from the batch (no im2col matrix), by
//! AVX-512 gathers: for each group, the channels it names (after the format's permutation)
//! at each column's input position.
//!
//! Each (16 rows, slot) costs one permute and one FMA per column; with 16 columns that is the
//! dense narrow kernel's rate of work per stored weight, on a half of the weights, and on fewer
//! columns the dense kernels waste lanes where this one does not.
//!
//! With AVX2 (module `avx2`) the same scheme runs 8 rows per vector, groups of at most 8
//! channels and blocks of at most 8 columns; groups of 4 (2:4) permute within each 128-bit
//! half, each holding the group's 4 inputs.
//! Where N ≤ 4, AVX2 runs products of more than 8 columns on a second layout instead
//! ([`super::nm_rows`]: columns in the lanes, no permutes), whose loads cost less there than
//! the permutes (a 512→512 convolution on 4×4 images, warm, gather and dispatch included:
//! 0.87 → 0.73–0.79 ms in `examples/ab_nm`).

use crate::conv::ConvDims;
use crate::error::{check_len, KernelError, Result};
use crate::formats::{NmCompressed, NM_PAD};
use crate::simd::Isa;

use super::nm_rows::RowsLayout;

/// Output channels per block (the lanes of an AVX-512 vector; 8 of them with AVX2).
const RB: usize = 16;

/// Columns up to which AVX2 runs the lanes layout where it has both: at 4 columns (VGG-16's
/// last block at batch 1) its permutes cost less than the rows layout's loads, which pads
/// them to 8 (0.27 against 0.40-0.43 ms for a 512->512 convolution in the network).
const LANES_COLS: usize = 8;

/// An N:M weight packed for [`NmConv::forward_rows`] (AVX-512 with M ≤ 16, or AVX2 and FMA
/// with M ≤ 8: a group's inputs fit one vector).
#[derive(Clone, Debug)]
pub struct NmConv {
    /// The kernel's instruction set, and its rows per block (its vectors' lanes).
    isa: Isa,
    rb: usize,
    rows: usize,
    cin: usize,
    /// Entries per input channel in a row (the kernel's taps; 1 for a linear layer).
    inner: usize,
    /// The format's group size, and the slot of a group's inputs per column in the input
    /// layout (its power of two, at least 4).
    m: usize,
    mp: usize,
    /// Slots per group (N).
    slots: usize,
    /// Groups of input channels.
    groups: usize,
    /// Per group, a vector's lanes `l`: the input channel of position `l mod mp`, or −1 past
    /// the channels (the short last group, and positions `m .. mp`).
    chan: Vec<[i32; 16]>,
    /// `[row block][g·inner + s][slot][rb]`: values, 0 in padding slots and past the rows.
    values: Vec<f32>,
    /// Same layout: each value's position in its group (0 where the value is 0).
    pos: Vec<u8>,
    /// With AVX2 and N ≤ 4: the layout that vectorises over columns instead, for products
    /// of more than [`LANES_COLS`] columns (and all of them where `lanes` is false).
    by_rows: Option<RowsLayout>,
    /// Whether `values` and `pos` hold the lanes layout (AVX2: groups of at most 8).
    lanes: bool,
}

impl NmConv {
    /// Rows of a block: [`forward_rows`](Self::forward_rows) splits rows at multiples of it.
    pub const ROW_ALIGN: usize = RB;

    /// Packs `f` (its view's `inner` = the convolution's taps). `None` where this CPU lacks
    /// AVX-512 and AVX2, or the groups are larger than a vector (16 channels with AVX-512;
    /// with AVX2, 16 channels where N ≤ 4, else 8).
    pub fn new(f: &NmCompressed) -> Result<Option<Self>> {
        let isa = Isa::detect();
        let rb = match isa {
            Isa::Avx512 if cfg!(target_arch = "x86_64") => 16,
            Isa::Avx2 if cfg!(target_arch = "x86_64") => 8,
            _ => return Ok(None),
        };
        let by_rows = isa == Isa::Avx2 && RowsLayout::fits(f);
        if f.m() > rb && !by_rows {
            return Ok(None);
        }
        let view = f.view();
        let (rows, cin, inner) = (view.rows, view.in_channels, view.inner);
        let (m, slots, groups) = (f.m(), f.n(), f.groups());
        // Each column's slot: a power of two, at least one 128-bit load.
        let mp = m.next_power_of_two().max(4);
        let kgs = groups * inner;
        let lanes = m <= rb;
        let blocks = if lanes { rows.div_ceil(rb) } else { 0 };
        let overflow = || KernelError::Param {
            name: "shape",
            value: format!("{rows} rows × {groups} groups × {inner} taps × {slots} slots"),
            reason: "overflows usize".into(),
        };
        let rows_layout = match by_rows {
            true => Some(RowsLayout::new(f).ok_or_else(overflow)?),
            false => None,
        };
        let len = blocks
            .checked_mul(kgs)
            .and_then(|v| v.checked_mul(slots))
            .and_then(|v| v.checked_mul(rb))
            .ok_or_else(overflow)?;
        let mut values = vec![0.0f32; len];
        let mut pos = vec![0u8; len];
        let (fv, fi) = (f.values(), f.indices());
        // The lanes layout, unless the rows layout replaces it.
        for r in 0..if lanes { rows } else { 0 } {
            let (b, i) = (r / rb, r % rb);
            for kg in 0..kgs {
                let (g, s) = (kg / inner, kg % inner);
                for e in 0..slots {
                    // The format's slot: ((r·groups + g)·inner + s)·n + e.
                    let from = ((r * groups + g) * inner + s) * slots + e;
                    let p = fi[from];
                    if p != NM_PAD {
                        let to = ((b * kgs + kg) * slots + e) * rb + i;
                        values[to] = fv[from];
                        pos[to] = p;
                    }
                }
            }
        }
        let perm = f.col_perm();
        let chan = (0..groups)
            .map(|g| {
                std::array::from_fn(|l| {
                    let p = l % mp;
                    let c = g * m + p;
                    if p < m && c < cin {
                        perm[c] as i32
                    } else {
                        -1
                    }
                })
            })
            .collect();
        Ok(Some(NmConv {
            isa,
            rb,
            rows,
            cin,
            inner,
            m,
            mp,
            slots,
            groups,
            chan,
            values,
            pos,
            by_rows: rows_layout,
            lanes,
        }))
    }

    /// The rows layout where a product of `n` columns runs on it: more than
    /// [`LANES_COLS`] columns, or any where there is no lanes layout.
    fn rows_for(&self, n: usize) -> Option<&RowsLayout> {
        self.by_rows
            .as_ref()
            .filter(|_| n > LANES_COLS || !self.lanes)
    }

    /// Output channels.
    pub fn out_dim(&self) -> usize {
        self.rows
    }

    /// Whether it runs convolutions of `d`: the format's input channels and taps, and a batch
    /// whose every offset fits an `i32` (the gathers' indices).
    pub fn accepts(&self, d: &ConvDims) -> bool {
        let fits =
            d.c.checked_mul(d.b)
                .and_then(|v| v.checked_mul(d.h))
                .and_then(|v| v.checked_mul(d.w))
                .is_some_and(|v| i32::try_from(v).is_ok());
        d.c == self.cin && d.g.taps() == self.inner && fits
    }

    /// Columns of a kernel block for `n` columns: 4, 8 or 16 (at most 8 with AVX2, whose
    /// 16 registers hold 8 accumulators and the operands).
    fn block_cols(&self, n: usize) -> usize {
        let most = if self.isa == Isa::Avx512 { 16 } else { 8 };
        n.next_power_of_two().clamp(4, most)
    }

    /// Floats per (column block, tap group) in [`gather_input`](Self::gather_input)'s layout
    /// for `n` columns: the block's columns times the group's slot (whole vectors).
    fn group_stride(&self, n: usize) -> usize {
        self.block_cols(n) * self.mp
    }

    /// Floats of [`gather_input`](Self::gather_input)'s output for `n` output positions.
    pub fn input_len(&self, n: usize) -> usize {
        if let Some(l) = self.rows_for(n) {
            return l.input_len(n);
        }
        n.div_ceil(self.block_cols(n)) * self.groups * self.inner * self.group_stride(n)
    }

    /// The batch `x` (`[C, B, H, W]`, sizes `d`) in the kernel's layout, into `out`
    /// ([`input_len`](Self::input_len)`(d.n())` values): for column block `b`, tap group
    /// `(g, s)`, column `j` of the block and position `p`, the input channel `chan(g, p)` at
    /// the column's position under tap `s` (0 in the padding), a block's tap groups one after
    /// another (the kernel reads them in that order). In parallel over tap groups.
    pub fn gather_input(&self, x: &[f32], d: &ConvDims, out: &mut [f32]) -> Result<()> {
        const OP: &str = "NmConv::gather_input";
        if !self.accepts(d) {
            return Err(KernelError::Param {
                name: "dims",
                value: format!("[{}, {}, {}, {}] {:?}", d.c, d.b, d.h, d.w, d.g),
                reason: format!(
                    "the kernel takes {} input channels and {} taps, and at most 2^31 input values",
                    self.cin, self.inner
                ),
            });
        }
        check_len(OP, "x", x.len(), d.c * d.b * d.h * d.w, || {
            format!("[{}, {}, {}, {}]", d.c, d.b, d.h, d.w)
        })?;
        let n = d.n();
        check_len(OP, "out", out.len(), self.input_len(n), || {
            format!("{} tap groups for {n} columns", self.groups * self.inner)
        })?;
        if let Some(l) = self.rows_for(n) {
            l.gather_input(x, d, &self.chan, self.inner, out);
            return Ok(());
        }
        let stride = self.group_stride(n);
        let kgs = self.groups * self.inner;
        if n == 0 || kgs == 0 {
            return Ok(());
        }
        let t = Offsets::new(d, self.mp, n.div_ceil(self.block_cols(n)) * stride);
        let plane = (d.b * d.h * d.w) as i32;
        // (Block, tap group) pairs in chunks of about 64 KiB of output.
        let per = (16384 / stride).max(1);
        crate::team::for_each_chunk_mut(out, per * stride, |i, chunk| {
            for (k, dst) in chunk.chunks_exact_mut(stride).enumerate() {
                let (b, kg) = ((i * per + k) / kgs, (i * per + k) % kgs);
                let (g, s) = (kg / self.inner, kg % self.inner);
                // SAFETY: `isa` is available (`new`); every valid lane's index is a
                // channel below `cin` times the plane plus an offset inside it, below
                // `x.len()` ≤ i32::MAX (`accepts`); `dst` holds `stride` values (a
                // multiple of 16), the lanes of block `b` in `t`.
                unsafe {
                    let (chan, at) = (&self.chan[g], (s, b));
                    if self.isa == Isa::Avx512 {
                        avx512::gather_group(x, chan, plane, &t, at, dst)
                    } else {
                        avx2::gather_group(x, chan, plane, &t, at, dst)
                    }
                };
            }
        });
        Ok(())
    }

    /// Output channels `r0 .. r1` (`r0` a multiple of [`ROW_ALIGN`](Self::ROW_ALIGN)) of the
    /// `n` columns of `xq` ([`gather_input`](Self::gather_input)'s output) into `y`
    /// (`(r1 − r0) × n`, row-major), on the calling thread.
    pub fn forward_rows(
        &self,
        xq: &[f32],
        n: usize,
        r0: usize,
        r1: usize,
        y: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "NmConv::forward_rows";
        check_len(OP, "xq", xq.len(), self.input_len(n), || {
            format!("{} tap groups for {n} columns", self.groups * self.inner)
        })?;
        if r0 > r1 || r1 > self.rows || !r0.is_multiple_of(RB) {
            return Err(KernelError::Param {
                name: "rows",
                value: format!("{r0}..{r1}"),
                reason: format!(
                    "must lie within the {} output channels and start at a multiple of {RB}",
                    self.rows
                ),
            });
        }
        check_len(OP, "y", y.len(), (r1 - r0) * n, || {
            format!("{} rows × {n} columns", r1 - r0)
        })?;
        if n == 0 || r0 == r1 {
            return Ok(());
        }
        if self.groups * self.inner == 0 {
            // No input channels: every product is 0.
            y.fill(0.0);
            return Ok(());
        }
        if let Some(l) = self.rows_for(n) {
            let start = RowsLayout::start(xq).ok_or_else(|| KernelError::Param {
                name: "xq",
                value: format!("{} values", xq.len()),
                reason: "is not the output of gather_input (no record of where its rows start)"
                    .into(),
            })?;
            l.forward_rows(xq, start, n, (r0, r1), y);
            return Ok(());
        }
        let j = self.block_cols(n);
        let stride = self.group_stride(n);
        let kgs = self.groups * self.inner;
        let rb = self.rb;
        let per_block = kgs * self.slots * rb;
        let mut tile = [[0.0f32; RB]; 16];
        let (cbs, bs) = (n.div_ceil(j), r1.div_ceil(rb) - r0 / rb);
        // Row blocks outer where the gathered input is small enough to stay in L2 beside a
        // row block's values (a few column blocks: AVX2's blocks of 8 columns at batch 1's
        // 4×4 images), so that each row block streams from memory once; column blocks outer
        // otherwise, so that the input streams once.
        let rows_outer = cbs > 1 && xq.len() * 4 <= 256 << 10;
        for step in 0..cbs * bs {
            let (cb, b) = if rows_outer {
                (step % cbs, r0 / rb + step / cbs)
            } else {
                (step / bs, r0 / rb + step % bs)
            };
            {
                let run = avx512::Run {
                    values: &self.values[b * per_block..][..per_block],
                    pos: &self.pos[b * per_block..][..per_block],
                    xq: &xq[cb * kgs * stride..][..kgs * stride],
                    kgs,
                    slots: self.slots,
                };
                // SAFETY: `isa` is available (`new`); `run` holds the block's `kgs` tap
                // groups of `j·mp` inputs and `per_block` values and positions.
                unsafe {
                    match (self.isa, j, self.mp) {
                        (Isa::Avx2, 4, 4) => avx2::block::<4, 4>(&run, &mut tile),
                        (Isa::Avx2, _, 4) => avx2::block::<8, 4>(&run, &mut tile),
                        (Isa::Avx2, 4, _) => avx2::block::<4, 8>(&run, &mut tile),
                        (Isa::Avx2, _, _) => avx2::block::<8, 8>(&run, &mut tile),
                        _ => match (j, self.mp) {
                            (4, 4) => avx512::block::<4, 4>(&run, &mut tile),
                            (8, 4) => avx512::block::<8, 4>(&run, &mut tile),
                            (_, 4) => avx512::block::<16, 4>(&run, &mut tile),
                            (4, 8) => avx512::block::<4, 8>(&run, &mut tile),
                            (8, 8) => avx512::block::<8, 8>(&run, &mut tile),
                            (_, 8) => avx512::block::<16, 8>(&run, &mut tile),
                            (4, _) => avx512::block::<4, 16>(&run, &mut tile),
                            (8, _) => avx512::block::<8, 16>(&run, &mut tile),
                            _ => avx512::block::<16, 16>(&run, &mut tile),
                        },
                    }
                }
                for (c, col) in tile.iter().enumerate().take(j.min(n - cb * j)) {
                    for (i, &v) in col.iter().enumerate().take(rb) {
                        let r = b * rb + i;
                        if r >= r1 {
                            break;
                        }
                        y[(r - r0) * n + cb * j + c] = v;
                    }
                }
            }
        }
        Ok(())
    }

    /// The group size M.
    pub fn m(&self) -> usize {
        self.m
    }
}

/// Where each column reads under each tap, in the gather layout: per tap, per lane
/// `column·mp + position` (over every block's columns), the offset within a channel, and per
/// vector of such lanes the ones inside the image (and a real column).
pub(super) struct Offsets {
    pub(super) offset: Vec<i32>,
    pub(super) inside: Vec<u16>,
    /// Lanes per tap (the padded columns times `mp`, a multiple of 16).
    pub(super) lanes: usize,
}

impl Offsets {
    pub(super) fn new(d: &ConvDims, mp: usize, lanes: usize) -> Offsets {
        let g = d.g;
        let [kh, kw] = g.kernel;
        let taps = kh * kw;
        let (h, w) = (d.h as isize, d.w as isize);
        let (hw, wo) = (d.hw().max(1), d.wo.max(1));
        let n = d.n();
        let vecs = lanes / 16;
        let mut offset = vec![0i32; taps * lanes];
        let mut inside = vec![0u16; taps * vecs];
        for s in 0..taps {
            let (ky, kx) = (s / kw, s % kw);
            let dy = (ky * g.dilation[0]) as isize - g.padding[0] as isize;
            let dx = (kx * g.dilation[1]) as isize - g.padding[1] as isize;
            for j in 0..(lanes / mp).min(n) {
                let (img, r) = ((j / hw) as isize, j % hw);
                let iy = (r / wo) as isize * g.stride[0] as isize + dy;
                let ix = (r % wo) as isize * g.stride[1] as isize + dx;
                if iy >= 0 && iy < h && ix >= 0 && ix < w {
                    let off = (img * h * w + iy * w + ix) as i32;
                    for p in 0..mp {
                        let lane = j * mp + p;
                        offset[s * lanes + lane] = off;
                        inside[s * vecs + lane / 16] |= 1 << (lane % 16);
                    }
                }
            }
        }
        Offsets {
            offset,
            inside,
            lanes,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Offsets, RB};

    /// One (column block, tap group `(g, s)`) of [`super::NmConv::gather_input`] into `dst`:
    /// lane `column·mp + p` of the block reads channel `chan[p]` (−1: none) at the column's
    /// offset under tap `s`.
    ///
    /// # Safety
    /// AVX-512F must be available; every lane with a channel and inside the image indexes `x`
    /// (`chan·plane + offset < x.len() ≤ i32::MAX`); `dst.len()` is a multiple of 16 and block
    /// `b`'s lanes lie within `t.lanes`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_group(
        x: &[f32],
        chan: &[i32; 16],
        plane: i32,
        t: &Offsets,
        (s, b): (usize, usize),
        dst: &mut [f32],
    ) {
        let c = _mm512_loadu_si512(chan.as_ptr().cast());
        let real = _mm512_cmpge_epi32_mask(c, _mm512_setzero_si512());
        let base = _mm512_mullo_epi32(c, _mm512_set1_epi32(plane));
        let first = b * dst.len();
        let off = t.offset.as_ptr().add(s * t.lanes + first);
        let inside = t.inside.as_ptr().add((s * t.lanes + first) / 16);
        for v in 0..dst.len() / 16 {
            let idx = _mm512_add_epi32(base, _mm512_loadu_si512(off.add(v * 16).cast()));
            let val = _mm512_mask_i32gather_ps::<4>(
                _mm512_setzero_ps(),
                *inside.add(v) & real,
                idx,
                x.as_ptr().cast(),
            );
            _mm512_storeu_ps(dst.as_mut_ptr().add(v * 16), val);
        }
    }

    /// One row block's share of a product (see [`block`]).
    pub(super) struct Run<'a> {
        /// `[kg][slot][16]` values and positions of the block's 16 rows.
        pub(super) values: &'a [f32],
        pub(super) pos: &'a [u8],
        /// The column block's gathered input, `[kg][column][mp]`.
        pub(super) xq: &'a [f32],
        pub(super) kgs: usize,
        pub(super) slots: usize,
    }

    /// A column's `MP` inputs of one tap group in the low lanes (one load that never crosses
    /// a cache line for `MP = 4`; the other lanes are never selected).
    #[inline(always)]
    unsafe fn inputs<const MP: usize>(p: *const f32) -> __m512 {
        match MP {
            4 => _mm512_castps128_ps512(_mm_loadu_ps(p)),
            8 => _mm512_castps256_ps512(_mm256_loadu_ps(p)),
            _ => _mm512_loadu_ps(p),
        }
    }

    /// `tile[c][i] = Σ_(kg, slot) value[i] · xq[kg][c][pos[i]]` for the block's 16 rows `i`
    /// and `J` columns `c`.
    ///
    /// # Safety
    /// AVX-512F must be available; `r.xq` holds `r.kgs·J·MP` values, and `r.values` and
    /// `r.pos` `r.kgs·r.slots·16` each; every position is below `MP`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<const J: usize, const MP: usize>(
        r: &Run<'_>,
        tile: &mut [[f32; RB]; 16],
    ) {
        let (vp, pp, xp) = (r.values.as_ptr(), r.pos.as_ptr(), r.xq.as_ptr());
        let mut acc = [_mm512_setzero_ps(); J];
        // Values and positions stream from memory once per call: fetched `AHEAD` tap groups
        // ahead (a line of values per slot, a line of positions per four).
        const AHEAD: usize = 16;
        let (vend, pend) = (vp.add(r.values.len()), pp.add(r.pos.len()));
        for kg in 0..r.kgs {
            let xk = xp.add(kg * J * MP);
            let ahead = (kg + AHEAD) * r.slots * RB;
            for e in 0..r.slots {
                let v = vp.wrapping_add(ahead + e * RB);
                if v < vend {
                    _mm_prefetch::<_MM_HINT_T0>(v.cast());
                }
            }
            let p = pp.wrapping_add(ahead);
            if p < pend {
                _mm_prefetch::<_MM_HINT_T0>(p.cast());
            }
            // Slots two at a time: each column's inputs loaded once for both.
            let mut e = 0;
            while e < r.slots {
                let at = (kg * r.slots + e) * RB;
                let w0 = _mm512_loadu_ps(vp.add(at));
                let s0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(pp.add(at).cast()));
                if e + 1 < r.slots {
                    let w1 = _mm512_loadu_ps(vp.add(at + RB));
                    let s1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(pp.add(at + RB).cast()));
                    for (c, a) in acc.iter_mut().enumerate() {
                        let q = inputs::<MP>(xk.add(c * MP));
                        let t = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(s0, q), *a);
                        *a = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(s1, q), t);
                    }
                    e += 2;
                } else {
                    for (c, a) in acc.iter_mut().enumerate() {
                        let q = inputs::<MP>(xk.add(c * MP));
                        *a = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(s0, q), *a);
                    }
                    e += 1;
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(tile[c].as_mut_ptr(), *a);
        }
    }
}

/// The kernel on AVX2 and FMA: rows in the 8 lanes, permutes across them by position.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::avx512::Run;
    use super::{Offsets, RB};

    /// See the AVX-512 `gather_group`: the same lanes, gathered 8 at a time.
    ///
    /// # Safety
    /// AVX2 must be available; otherwise as the AVX-512 `gather_group`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gather_group(
        x: &[f32],
        chan: &[i32; 16],
        plane: i32,
        t: &Offsets,
        (s, b): (usize, usize),
        dst: &mut [f32],
    ) {
        let first = b * dst.len();
        let off = t.offset.as_ptr().add(s * t.lanes + first);
        let inside = t.inside.as_ptr().add((s * t.lanes + first) / 16);
        let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for v in 0..dst.len() / 8 {
            // The 8 lanes `8v ..` of the block: channel `chan[p]` of their positions.
            let c = _mm256_loadu_si256(chan.as_ptr().add((v % 2) * 8).cast());
            let real = _mm256_cmpgt_epi32(c, _mm256_set1_epi32(-1));
            let base = _mm256_mullo_epi32(c, _mm256_set1_epi32(plane));
            let bits = i32::from((*inside.add(v / 2) >> ((v % 2) * 8)) as u8);
            let inb = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lanes), lanes);
            let mask = _mm256_castsi256_ps(_mm256_and_si256(inb, real));
            let idx = _mm256_add_epi32(base, _mm256_loadu_si256(off.add(v * 8).cast()));
            let val = _mm256_mask_i32gather_ps::<4>(_mm256_setzero_ps(), x.as_ptr(), idx, mask);
            _mm256_storeu_ps(dst.as_mut_ptr().add(v * 8), val);
        }
    }

    /// A column's `MP ≤ 8` inputs of one tap group: for `MP = 4` in both 128-bit halves
    /// (see [`select`]), else in the 8 lanes.
    #[inline(always)]
    unsafe fn inputs<const MP: usize>(p: *const f32) -> __m256 {
        if MP == 4 {
            let q = _mm_loadu_ps(p);
            _mm256_set_m128(q, q)
        } else {
            _mm256_loadu_ps(p)
        }
    }

    /// Lane `i` takes input `s[i]` of `q`: for `MP = 4` a permute within each half
    /// (`vpermilps`, which costs Zen 3 a fraction of the permute across halves that
    /// `vpermps` is; profiled, it bounded the kernel), else across the 8 lanes.
    #[inline(always)]
    unsafe fn select<const MP: usize>(q: __m256, s: __m256i) -> __m256 {
        if MP == 4 {
            _mm256_permutevar_ps(q, s)
        } else {
            _mm256_permutevar8x32_ps(q, s)
        }
    }

    /// `tile[c][i] = Σ_(kg, slot) value[i] · xq[kg][c][pos[i]]` for the block's 8 rows `i`
    /// and `J ≤ 8` columns `c`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `r.xq` holds `r.kgs·J·MP` values, and `r.values` and
    /// `r.pos` `r.kgs·r.slots·8` each; every position is below `MP ≤ 8`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block<const J: usize, const MP: usize>(
        r: &Run<'_>,
        tile: &mut [[f32; RB]; 16],
    ) {
        let (vp, pp, xp) = (r.values.as_ptr(), r.pos.as_ptr(), r.xq.as_ptr());
        let mut acc = [_mm256_setzero_ps(); J];
        for kg in 0..r.kgs {
            let xk = xp.add(kg * J * MP);
            // Slots two at a time: each column's inputs loaded once for both.
            let mut e = 0;
            while e < r.slots {
                let at = (kg * r.slots + e) * 8;
                let w0 = _mm256_loadu_ps(vp.add(at));
                let s0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(pp.add(at).cast()));
                if e + 1 < r.slots {
                    let w1 = _mm256_loadu_ps(vp.add(at + 8));
                    let s1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(pp.add(at + 8).cast()));
                    for (c, a) in acc.iter_mut().enumerate() {
                        let q = inputs::<MP>(xk.add(c * MP));
                        let t = _mm256_fmadd_ps(w0, select::<MP>(q, s0), *a);
                        *a = _mm256_fmadd_ps(w1, select::<MP>(q, s1), t);
                    }
                    e += 2;
                } else {
                    for (c, a) in acc.iter_mut().enumerate() {
                        let q = inputs::<MP>(xk.add(c * MP));
                        *a = _mm256_fmadd_ps(w0, select::<MP>(q, s0), *a);
                    }
                    e += 1;
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile[c].as_mut_ptr(), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use coarsen_core::{Mask, MatrixView};

    use super::*;
    use crate::conv::ConvGeometry;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The definition: im2col of the batch times the unpacked weight.
    fn reference(f: &NmCompressed, x: &[f32], d: &ConvDims) -> Vec<f32> {
        let n = d.n();
        let mut col = vec![0.0; d.rows() * n];
        d.im2col_range(x, 0, n, &mut col).unwrap();
        crate::reference::forward(&f.unpack(), f.rows(), f.cols(), &col, n)
    }

    #[test]
    fn matches_the_definition_on_awkward_shapes() {
        if !matches!(Isa::detect(), Isa::Avx512 | Isa::Avx2) {
            return;
        }
        // (rows, cin, kernel, stride, image side, batch, n, m, channel permutation?)
        let cases = [
            (16, 8, 3, 1, 4, 1, 2, 4, false),
            (37, 13, 3, 1, 4, 1, 2, 4, true),
            (40, 12, 3, 2, 8, 1, 2, 4, true),
            (20, 9, 1, 1, 2, 1, 1, 3, false),
            (33, 24, 3, 1, 2, 3, 2, 8, true),
            (16, 32, 3, 1, 4, 2, 4, 16, true),
            (24, 10, 1, 2, 6, 2, 1, 2, true),
            (17, 7, 3, 1, 5, 5, 2, 4, false),
            // Several chunks of tap groups (the AVX2 rows layout's 64 at 2:4), and column
            // blocks of 16 and 8 (25 and 36 columns).
            (21, 64, 3, 1, 5, 1, 2, 4, true),
            (19, 40, 3, 1, 6, 1, 2, 4, false),
            (18, 30, 3, 2, 8, 1, 3, 8, true),
            // N > 4: AVX2's lanes kernel.
            (20, 16, 3, 1, 3, 2, 6, 8, true),
            (16, 11, 1, 1, 4, 1, 5, 5, false),
        ];
        for (rows, cin, k, stride, side, batch, nn, m, permute) in cases {
            let g = ConvGeometry::square(k, stride, k / 2);
            let d = ConvDims::new(&[cin, batch, side, side], g).unwrap();
            let taps = k * k;
            let view = MatrixView::of(&[rows, cin, k, k]).unwrap();
            let perm: Vec<usize> = if permute {
                (0..cin).map(|c| (cin - 1 - c + 3) % cin).collect()
            } else {
                (0..cin).collect()
            };
            // Every group (after the permutation) keeps at most `nn` of its channels, fewer
            // in some groups (padding slots).
            let mut mask = Mask::zeros(rows, cin * taps);
            for r in 0..rows {
                for s in 0..taps {
                    for gs in (0..cin).step_by(m) {
                        let keep = (r + s + gs) % (nn + 1);
                        for q in 0..keep.min(nn) {
                            let at = gs + (r * 3 + s + q * 2) % m.min(cin - gs);
                            mask.set(r, perm[at] * taps + s, true);
                        }
                    }
                }
            }
            let w = values(rows * cin * taps, rows);
            let f = NmCompressed::pack(&mask, &w, view, nn, m, Some(&perm)).unwrap();
            let Some(kernel) = NmConv::new(&f).unwrap() else {
                // AVX2 runs groups of at most 8 channels where N > 4.
                assert!(Isa::detect() == Isa::Avx2 && m > 8 && nn > 4);
                continue;
            };
            let x = values(cin * batch * side * side, cin);
            let n = d.n();
            let mut xq = vec![f32::NAN; kernel.input_len(n)];
            kernel.gather_input(&x, &d, &mut xq).unwrap();
            let want = reference(&f, &x, &d);
            let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
            // All rows at once, and rows split at a block boundary.
            let mut y = vec![f32::NAN; rows * n];
            kernel.forward_rows(&xq, n, 0, rows, &mut y).unwrap();
            let split = RB.min(rows);
            let mut y2 = vec![f32::NAN; rows * n];
            let (a, b) = y2.split_at_mut(split * n);
            kernel.forward_rows(&xq, n, 0, split, a).unwrap();
            kernel.forward_rows(&xq, n, split, rows, b).unwrap();
            for (i, ((&got, &got2), &exp)) in y.iter().zip(&y2).zip(&want).enumerate() {
                let tol = 1e-5 * scale * (cin * taps) as f32;
                assert!(
                    (got - exp).abs() <= tol && (got2 - exp).abs() <= tol,
                    "{rows}x{cin} k{k} s{stride} {side}x{side} b{batch} {nn}:{m} at {i}: {got} / {got2} vs {exp}"
                );
            }
            // Misaligned rows, short buffers and foreign shapes are refused.
            assert!(kernel.forward_rows(&xq, n, 1, rows, &mut y[n..]).is_err());
            assert!(kernel.forward_rows(&xq[1..], n, 0, rows, &mut y).is_err());
            assert!(kernel.forward_rows(&xq, n, 0, rows, &mut y[1..]).is_err());
            let other = ConvDims::new(&[cin + 1, batch, side, side], g).unwrap();
            assert!(!kernel.accepts(&other));
            assert!(kernel.gather_input(&x, &other, &mut xq).is_err());
        }
    }

    #[test]
    fn refuses_groups_wider_than_a_vector() {
        let view = MatrixView::of(&[2, 32, 1, 1]).unwrap();
        let mask = Mask::from_fn(2, 32, |_, c| c % 32 == 0);
        let f = NmCompressed::pack(&mask, &values(64, 1), view, 1, 32, None).unwrap();
        assert!(NmConv::new(&f).unwrap().is_none());
    }
}
