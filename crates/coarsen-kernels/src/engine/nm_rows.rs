//! The N:M kernel's AVX2 layout: output positions in the lanes, each stored value times the
//! input row its position names.
//!
//! AVX2 has no cheap permute across a vector's lanes, so the lanes kernel of [`super::NmConv`]
//! (rows in the lanes, a permute per slot and column) is bound by its shuffles there. This
//! one vectorises over output positions instead: for each output row and tap group it reads
//! the group's positions (one word for all N slots), and for each slot broadcasts the value
//! and adds it times that input row (`J` vectors of 8 columns, straight from memory into the
//! FMA). Per slot: one broadcast and `J` input loads for `J` FMAs, no shuffle.
//!
//! The input is gathered into `[column block][tap group][position in group][16 columns]`:
//! a block's rows are one cache line each, one after another (rows of the whole width, 1 or
//! 4 KiB apart at 256 or 1024 columns, fell into a few of L1's sets and evicted each other).
//! The tap groups are cut into chunks whose input rows (256 of them, 16 KiB) stay in L1
//! while every row of a share runs over them; the values are stored in that order,
//! `[chunk][tile of 4 rows][tap group][row][slot]`, so that a thread's share of each chunk is
//! one sequential stream from memory. Partial sums live in a per-share buffer between chunks.

use super::copy_floats;
use super::nm_conv::Offsets;
use crate::conv::ConvDims;
use crate::formats::{NmCompressed, NM_PAD};

/// Output rows per register tile (the layout's tiles; [`super::NmConv::ROW_ALIGN`] is a
/// multiple of it).
pub(super) const TILE: usize = 4;

/// Input rows per chunk of tap groups: 16 KiB of a column block.
const CHUNK_ROWS: usize = 256;

/// Columns of a block of the gathered input (one cache line per row).
const XB: usize = 16;

/// An N:M weight in the rows layout (N ≤ 4, M ≤ 16: a group's positions fit 16 bits).
#[derive(Clone, Debug)]
pub(super) struct RowsLayout {
    /// Slots per group (N) and the group size (M).
    slots: usize,
    m: usize,
    /// Bits per position, and bytes per (row, tap group) of positions.
    bits: u32,
    pw: usize,
    /// Tap groups per chunk, tap groups, and tiles of rows.
    kc: usize,
    kgs: usize,
    tiles: usize,
    /// `[chunk][tile][kg][row][slot]`, 0 in padding slots and past the rows.
    values: Vec<f32>,
    /// `[chunk][tile][kg][row]`, `pw` bytes each: slot `e`'s position in bits
    /// `e·bits ..`; 7 bytes of slack at the end (a tap group's words are read as a `u64`).
    pos: Vec<u8>,
}

impl RowsLayout {
    /// Whether `f`'s groups fit the layout: N ≤ 4 and M ≤ 16.
    pub(super) fn fits(f: &NmCompressed) -> bool {
        f.n() <= 4 && f.m() <= 16 && f.n() >= 1
    }

    /// Packs `f`; `None` where its groups do not [fit](Self::fits) or the layout's size
    /// overflows `usize`.
    pub(super) fn new(f: &NmCompressed) -> Option<RowsLayout> {
        if !Self::fits(f) {
            return None;
        }
        let view = f.view();
        let (rows, inner) = (view.rows, view.inner);
        let (m, slots, groups) = (f.m(), f.n(), f.groups());
        let bits = (usize::BITS - (m - 1).leading_zeros()).max(1);
        let pw = (slots * bits as usize).div_ceil(8);
        // A tile's positions are read in one `u64` (N ≤ 4 and M ≤ 16 keep `pw` ≤ 2).
        if TILE * pw > 8 {
            return None;
        }
        let kgs = groups.checked_mul(inner)?;
        let kc = (CHUNK_ROWS / m).max(1);
        let tiles = rows.div_ceil(TILE);
        let len = tiles
            .checked_mul(TILE)?
            .checked_mul(kgs)?
            .checked_mul(slots)?;
        let plen = (tiles * TILE)
            .checked_mul(kgs)?
            .checked_mul(pw)?
            .checked_add(7)?;
        let mut values = vec![0.0f32; len];
        let mut pos = vec![0u8; plen];
        let (fv, fi) = (f.values(), f.indices());
        for r in 0..rows {
            for kg in 0..kgs {
                let (g, s) = (kg / inner, kg % inner);
                let at = entry(r, kg, (kgs, kc), tiles);
                let mut word = 0u32;
                for e in 0..slots {
                    // The format's slot: ((r·groups + g)·inner + s)·n + e.
                    let from = ((r * groups + g) * inner + s) * slots + e;
                    let p = fi[from];
                    if p != NM_PAD {
                        values[at * slots + e] = fv[from];
                        word |= u32::from(p) << (e as u32 * bits);
                    }
                }
                pos[at * pw..][..pw].copy_from_slice(&word.to_le_bytes()[..pw]);
            }
        }
        Some(RowsLayout {
            slots,
            m,
            bits,
            pw,
            kc,
            kgs,
            tiles,
            values,
            pos,
        })
    }

    /// Columns padded to whole vectors of 8.
    fn padded(n: usize) -> usize {
        n.div_ceil(8) * 8
    }

    /// Floats of one column block of the gathered input: every tap group's rows of [`XB`].
    fn block_len(&self) -> usize {
        self.kgs * self.m * XB
    }

    /// Floats of the gathered input for `n` columns: its column blocks, and 16 floats before
    /// them (the first holds where the blocks start, so that they start on a cache line: each
    /// block's row is then one line, and no load splits across two).
    pub(super) fn input_len(&self, n: usize) -> usize {
        n.div_ceil(XB) * self.block_len() + 16
    }

    /// Where the rows of `xq` start: the slot after the first that is 64-byte aligned.
    fn start_for(xq: &[f32]) -> usize {
        let p = xq.as_ptr().wrapping_add(1);
        1 + p.align_offset(64).min(15)
    }

    /// Where the rows of [`gather_input`](Self::gather_input)'s output `xq` start, as it
    /// recorded (a copy of the buffer elsewhere keeps working); `None` when that record is
    /// not one `gather_input` writes.
    pub(super) fn start(xq: &[f32]) -> Option<usize> {
        let s = *xq.first()?;
        ((1.0..=16.0).contains(&s) && s.fract() == 0.0).then_some(s as usize)
    }

    /// The batch `x` (checked by the caller: `[C, B, H, W]` of `d`, every offset an `i32`)
    /// into `out` ([`input_len`](Self::input_len) values): in column block `b`, row `(kg, p)`
    /// holds channel `chan[g][p]` (−1: zeros) at the input position under tap `s` of each of
    /// the block's [`XB`] columns, 0 in the padding and past the columns. In parallel over
    /// (column block, tap group) pairs.
    pub(super) fn gather_input(
        &self,
        x: &[f32],
        d: &ConvDims,
        chan: &[[i32; 16]],
        inner: usize,
        out: &mut [f32],
    ) {
        let n = d.n();
        let (m, kgs) = (self.m, self.kgs);
        let blocks = n.div_ceil(XB);
        let start = Self::start_for(out);
        out[0] = start as f32;
        let out = &mut out[start..][..blocks * self.block_len()];
        if n == 0 || kgs == 0 {
            return;
        }
        let t = Offsets::new(d, 1, blocks * XB);
        // Per tap and column block, the runs of the block's columns inside the image whose
        // offsets follow one another (whole output rows at stride 1): `(first column in the
        // block, its offset, length)`.
        let runs: Vec<Vec<Vec<(usize, usize, usize)>>> = (0..inner)
            .map(|s| {
                let mut v = vec![Vec::<(usize, usize, usize)>::new(); blocks];
                for j in 0..n {
                    let lane = s * t.lanes + j;
                    if t.inside[lane / 16] >> (lane % 16) & 1 == 0 {
                        continue;
                    }
                    let off = t.offset[lane] as usize;
                    let (b, jb) = (j / XB, j % XB);
                    match v[b].last_mut() {
                        Some((j0, o0, len)) if *j0 + *len == jb && *o0 + *len == off => *len += 1,
                        _ => v[b].push((jb, off, 1)),
                    }
                }
                v
            })
            .collect();
        let plane = d.b * d.h * d.w;
        // (Column block, tap group) pairs in chunks of about 64 KiB of output.
        let per = (16384 / (m * XB)).max(1);
        crate::team::for_each_chunk_mut(out, per * m * XB, |i, chunk| {
            for (k, dst) in chunk.chunks_exact_mut(m * XB).enumerate() {
                let (b, kg) = ((i * per + k) / kgs, (i * per + k) % kgs);
                let (g, s) = (kg / inner, kg % inner);
                for (p, row) in dst.chunks_exact_mut(XB).enumerate() {
                    let Ok(row) = <&mut [f32; XB]>::try_from(row) else {
                        continue;
                    };
                    *row = [0.0; XB];
                    let c = chan[g][p];
                    if c < 0 {
                        continue;
                    }
                    let xc = &x[c as usize * plane..][..plane];
                    for &(j, off, len) in &runs[s][b] {
                        copy_floats(&xc[off..off + len], &mut row[j..j + len]);
                    }
                }
            }
        });
    }

    /// Rows `r0 .. r1` (`r0` a multiple of [`TILE`]) of the `n` columns of `xq`
    /// ([`gather_input`](Self::gather_input)'s output, its rows from `start`) into `y`
    /// (`(r1 − r0) × n`), on the calling thread. The caller checked the lengths and the rows.
    pub(super) fn forward_rows(
        &self,
        xq: &[f32],
        start: usize,
        n: usize,
        (r0, r1): (usize, usize),
        y: &mut [f32],
    ) {
        let np = Self::padded(n);
        let xq = &xq[start..];
        let (t0, t1) = (r0 / TILE, r1.div_ceil(TILE));
        let width = TILE * np;
        let mut acc = vec![0.0f32; (t1 - t0) * width];
        let (kc, tiles, slots) = (self.kc, self.tiles, self.slots);
        for c in 0..self.kgs.div_ceil(kc) {
            let k0 = c * kc;
            let kn = kc.min(self.kgs - k0);
            let mut cb = 0;
            while cb < np {
                let wide = np - cb >= 16;
                // The chunk's rows of the column block.
                let xc = &xq[cb / XB * self.block_len() + k0 * self.m * XB..][..kn * self.m * XB];
                for t in t0..t1 {
                    let at = entry(t * TILE, k0, (self.kgs, kc), tiles);
                    let run = Run {
                        values: &self.values[at * slots..][..kn * TILE * slots],
                        pos: &self.pos[at * self.pw..][..kn * TILE * self.pw + 7],
                        x: xc,
                        acc: &mut acc[(t - t0) * width + cb..],
                        kn,
                        np,
                        m: self.m,
                        pw: self.pw,
                        bits: self.bits,
                        first: c == 0,
                    };
                    // SAFETY: the layout's ISA (AVX2 and FMA) was detected by the caller;
                    // `run` holds the tile's `kn` tap groups of values and positions (every
                    // position below `m`), the chunk's `kn·m` input rows of the column block
                    // (`XB` columns, of which the kernel reads 8 or, `wide`, 16), and the
                    // tile's `TILE` rows of `np` partial sums from column `cb` (at least 8,
                    // or 16 for `wide`).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match (slots, wide) {
                            (1, true) => avx2::tile::<1, 2>(run),
                            (1, false) => avx2::tile::<1, 1>(run),
                            (2, true) => avx2::tile::<2, 2>(run),
                            (2, false) => avx2::tile::<2, 1>(run),
                            (3, true) => avx2::tile::<3, 2>(run),
                            (3, false) => avx2::tile::<3, 1>(run),
                            (4, true) => avx2::tile::<4, 2>(run),
                            _ => avx2::tile::<4, 1>(run),
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = run;
                }
                cb += if wide { 16 } else { 8 };
            }
        }
        for r in r0..r1 {
            let from = (r - r0 / TILE * TILE) * np;
            y[(r - r0) * n..][..n].copy_from_slice(&acc[from..][..n]);
        }
    }
}

/// Entry `(row r, tap group kg)` of the layout (`kgs` tap groups in chunks of `kc`, `tiles`
/// tiles of rows): the chunks before `kg`'s are whole, then the tiles before `r`'s in that
/// chunk, each `TILE` rows of the chunk's tap groups.
fn entry(r: usize, kg: usize, (kgs, kc): (usize, usize), tiles: usize) -> usize {
    let (c, kgi) = (kg / kc, kg % kc);
    let width = kc.min(kgs - c * kc);
    c * kc * tiles * TILE + ((r / TILE) * width + kgi) * TILE + r % TILE
}

/// One tile's share of one chunk (see [`avx2::tile`]).
struct Run<'a> {
    /// `[kg][row][slot]` values and `[kg][row]` positions (`pw` bytes each, then slack).
    values: &'a [f32],
    pos: &'a [u8],
    /// The chunk's input rows of the column block (row stride `XB`).
    x: &'a [f32],
    /// The tile's partial sums from the column block's first column (row stride `np`).
    acc: &'a mut [f32],
    kn: usize,
    np: usize,
    m: usize,
    pw: usize,
    bits: u32,
    /// The first chunk: the sums start at 0.
    first: bool,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Run, TILE, XB};

    /// Bytes of values fetched ahead.
    const AHEAD: usize = 16384;

    /// `acc[i][j] (+)= Σ_(kg, slot) value · x[kg·m + position][j]` for the tile's rows `i`
    /// and the block's `8·J` columns `j`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `r` as documented on [`Run`], with `r.x` (rows of `XB`
    /// columns) and `r.acc` (rows of `r.np`) holding `8·J` columns from their starts in every
    /// row they index, and every position below `r.m`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const N: usize, const J: usize>(r: Run<'_>) {
        let (vp, pp, xp, ap) = (
            r.values.as_ptr(),
            r.pos.as_ptr(),
            r.x.as_ptr(),
            r.acc.as_mut_ptr(),
        );
        let np = r.np;
        let mut a = [[_mm256_setzero_ps(); J]; TILE];
        if !r.first {
            for (i, row) in a.iter_mut().enumerate() {
                for (v, q) in row.iter_mut().enumerate() {
                    *q = _mm256_loadu_ps(ap.add(i * np + v * 8));
                }
            }
        }
        let mask = (1u32 << r.bits) - 1;
        for kg in 0..r.kn {
            // The values stream from memory: fetched `AHEAD` bytes ahead, past the tile into
            // the next ones (a prefetch never faults), the positions likewise.
            _mm_prefetch::<_MM_HINT_T0>(vp.wrapping_add(kg * TILE * N + AHEAD / 4).cast());
            if kg % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(pp.wrapping_add(kg * TILE * r.pw + AHEAD / 8).cast());
            }
            let xg = xp.add(kg * r.m * XB);
            // The tile's rows' positions in one load (`TILE · pw ≤ 8` bytes).
            let words = pp.add(kg * TILE * r.pw).cast::<u64>().read_unaligned();
            for (i, row) in a.iter_mut().enumerate() {
                let e0 = kg * TILE + i;
                let word = (words >> (i * r.pw * 8)) as u32;
                for e in 0..N {
                    let p = ((word >> (e as u32 * r.bits)) & mask) as usize;
                    let w = _mm256_broadcast_ss(&*vp.add(e0 * N + e));
                    let xr = xg.add(p * XB);
                    for (v, q) in row.iter_mut().enumerate() {
                        *q = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr.add(v * 8)), *q);
                    }
                }
            }
        }
        for (i, row) in a.iter().enumerate() {
            for (v, q) in row.iter().enumerate() {
                _mm256_storeu_ps(ap.add(i * np + v * 8), *q);
            }
        }
    }
}
