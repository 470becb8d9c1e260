//! The in-place block kernel in bfloat16 (AVX-512 BF16): `vdpbf16ps` multiplies two pairs of
//! bfloat16 values per `f32` lane and adds both products to the lane, twice the multiply-adds
//! of an FMA per instruction.
//!
//! A panel's columns go in pairs: each of its `MR` rows holds a pair's two weights in one
//! 32-bit word (broadcast to every lane), and the tile's inputs for the pair are the two
//! columns' halo rows (rounded to bfloat16 once per halo copy) interleaved value by value, so
//! lane `j` holds both columns' values at one output position. The interleave of 32 positions
//! is two `vpunpck{l,h}wd`, which interleave within 128-bit lanes: their accumulators hold the
//! positions in the order `0–3, 8–11, …` and `4–7, 12–15, …`, put back in order once per
//! panel before the epilogue. A tile's last 16 positions (a tile of 48) are interleaved in
//! order by one `vpermt2w`.

use std::arch::x86_64::*;

use super::{each_panel, walk_avx512, Bf16Halo, BlockConv, ConvBlock, Epilogue, Tile, MR, NV};

use crate::conv::{split_pairs_by, ConvDims};
use crate::engine::direct::avx512::store_row;
use crate::engine::direct::PhaseRows;

/// Whether this CPU has the instructions of the bfloat16 kernel.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bf16")
}

/// `n` values of `src` rounded to bfloat16 (nearest, ties to even) into `dst`.
///
/// # Safety
/// AVX-512F, BW, VL and BF16 must be available; `src` and `dst` hold `n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn to_bf16(src: *const f32, dst: *mut u16, n: usize) {
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(i)));
        _mm256_storeu_si256(
            dst.add(i).cast(),
            std::mem::transmute::<__m256bh, __m256i>(v),
        );
        i += 16;
    }
    if i < n {
        let m = (1u16 << (n - i)) - 1;
        let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src.add(i)));
        let v = std::mem::transmute::<__m256bh, __m256i>(v);
        _mm256_mask_storeu_epi16(dst.add(i).cast(), m, v);
    }
}

/// A row's even and odd columns rounded to bfloat16: `even[j] =
/// src[2j]` and `odd[j] = src[2j + 1]` for `j < n`, either optional, 16 pairs at a time by
/// AVX-512 permutes, the last ones through masks, which read nothing past `src[len − 1]` and
/// write nothing past position `n`. The stride-2 halos of the bfloat16 kernel, made straight
/// from the input's rows (no `f32` halo written and read again to round it).
///
/// # Safety
/// AVX-512F, BW, VL and BF16 must be available; `src` is valid for reading `len ≥ 2n − 1`
/// values (`2n` with `odd`), `even` and `odd` for writing `n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
pub(super) unsafe fn split_pairs(
    src: *const f32,
    len: usize,
    n: usize,
    even: Option<*mut u16>,
    odd: Option<*mut u16>,
) {
    split_pairs_by(src, len, n, even, odd, |p, m, v| {
        let v = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
        _mm256_mask_storeu_epi16(p.cast(), m, v)
    })
}

/// `SplitRows` into bfloat16: each segment of a channel's row pairs by [`split_pairs`].
///
/// # Safety
/// AVX-512F, BW, VL and BF16 must be available; the channel's row holds `from + 2n` values
/// per segment `(at, n, from)` and its halo rows `at + n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn split_rows(rows: &PhaseRows<u16>, c: usize, segs: &[(usize, usize, usize)]) {
    rows.each(c, segs, |src, n, e, o| split_pairs(src, 2 * n, n, e, o))
}

/// See [`BlockConv::forward_into`]: the AVX-512 kernel's walk and epilogue, the products in
/// bfloat16.
///
/// # Safety
/// As the AVX-512 kernel's `forward`; the CPU has what [`available`] asks for, and every
/// block of `k` has its pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) unsafe fn forward(
    k: &BlockConv,
    x: &[f32],
    d: &ConvDims,
    cols: (usize, usize),
    share: (usize, usize),
    out: (*mut f32, usize),
    epilogue: Epilogue<'_>,
    second: Option<(*mut f32, usize, Epilogue<'_>)>,
) {
    let outs = (out, epilogue, second);
    walk_avx512::<u16>(
        k,
        x,
        d,
        cols,
        share,
        outs,
        Some(Bf16Halo {
            convert: to_bf16,
            split: split_rows,
        }),
        |blocks, tile, v| match v {
            1 => run_tile::<1>(blocks, tile),
            2 => run_tile::<2>(blocks, tile),
            _ => run_tile::<3>(blocks, tile),
        },
    );
}

/// Every block of `blocks` on one tile of at most `V·16` positions (`V ≤ NV`).
///
/// # Safety
/// As [`forward`], which made `t`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn run_tile<const V: usize>(blocks: &[ConvBlock], t: &Tile<'_, u16>) {
    each_panel(blocks, t.offs, |b, q, rows, offs| {
        let kn = b.chans.len();
        let p = Panel {
            w: b.pairs.as_ptr().add(q * kn.div_ceil(2) * MR),
            offs,
            taps: b.taps.as_ptr(),
            runs: &b.runs,
            kn,
            rows,
            second: b.second,
        };
        by_rows!(rows.len(), panel::<V>(&p, t));
    });
}

/// One panel of a block: its pairs, the block's columns and the panel's output rows.
struct Panel<'a> {
    /// `⌈kn/2⌉ × MR` words of two bfloat16 weights.
    w: *const u32,
    /// The block's columns' halo offsets.
    offs: *const usize,
    /// The block's columns' taps.
    taps: *const u8,
    /// The block's runs `(tap, k0, k1)` of columns `k0 .. k1` that read one tap.
    runs: &'a [(u32, u32, u32)],
    /// The block's columns.
    kn: usize,
    /// At most `MR` output rows.
    rows: &'a [u32],
    /// Whether they are rows of the second output.
    second: bool,
}

/// Word indices of `vpermt2w` that interleave the first 16 values of two vectors.
const INTERLEAVE: [i16; 32] = {
    let mut a = [0i16; 32];
    let mut j = 0;
    while j < 16 {
        a[2 * j] = j as i16;
        a[2 * j + 1] = 32 + j as i16;
        j += 1;
    }
    a
};

/// Lane indices of `vpermt2ps` that put positions `0 .. 16` of the unpacked accumulators
/// (low, high) back in order, and positions `16 .. 32`.
const ORDER: [[i32; 16]; 2] = [
    [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23],
    [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31],
];

/// Lane masks of one tap for the loads of [`inputs`]: positions `0 .. 32` of the tile (16-bit
/// lanes), and its last 16 (positions `32 .. 48` of a tile of 48, else `0 .. 16`).
#[derive(Clone, Copy)]
struct Masks {
    wide: __mmask32,
    last: __mmask16,
}

impl Masks {
    /// A tap's masks (`m`, its tile masks) for a tile of `V·16` positions.
    #[inline(always)]
    fn of<const V: usize>(m: &[u16; NV]) -> Masks {
        Masks {
            wide: u32::from(m[0]) | (u32::from(m[1]) << 16),
            last: if V == 3 { m[2] } else { m[0] },
        }
    }
}

/// The interleaved inputs of one pair of columns on a tile of `V·16` positions: columns at
/// halo rows `a` and `b` under lane masks `ma` and `mb` (`b` null: a zero column).
///
/// # Safety
/// AVX-512F, BW, VL and BF16 must be available (inlined into the kernel, which enables them);
/// the rows hold the lanes their masks leave.
#[inline(always)]
unsafe fn inputs<const V: usize>(
    a: *const u16,
    ma: Masks,
    b: *const u16,
    mb: Masks,
    interleave: __m512i,
) -> [__m512bh; V] {
    let mut xs = [_mm512_setzero_si512(); V];
    if V >= 2 {
        let xa = _mm512_maskz_loadu_epi16(ma.wide, a.cast());
        let xb = if b.is_null() {
            _mm512_setzero_si512()
        } else {
            _mm512_maskz_loadu_epi16(mb.wide, b.cast())
        };
        xs[0] = _mm512_unpacklo_epi16(xa, xb);
        xs[1] = _mm512_unpackhi_epi16(xa, xb);
    }
    if V != 2 {
        // The tile's last 16 positions: all of a 16-wide tile, positions 32 .. 48 of a wider.
        let at = if V == 3 { 32 } else { 0 };
        let xa = _mm256_maskz_loadu_epi16(ma.last, a.add(at).cast());
        let xb = if b.is_null() {
            _mm256_setzero_si256()
        } else {
            _mm256_maskz_loadu_epi16(mb.last, b.add(at).cast())
        };
        xs[V - 1] = _mm512_permutex2var_epi16(
            _mm512_castsi256_si512(xa),
            interleave,
            _mm512_castsi256_si512(xb),
        );
    }
    xs.map(|v| std::mem::transmute::<__m512i, __m512bh>(v))
}

/// The first `R` rows (all the panel has) of a panel on one tile of `V·16` positions.
///
/// # Safety
/// AVX-512F, BW, VL and BF16 must be available (inlined into the kernel, which enables them);
/// otherwise as [`forward`], which made `t`; `p.rows` holds `R` rows.
#[inline(always)]
unsafe fn panel<const V: usize, const R: usize>(p: &Panel<'_>, t: &Tile<'_, u16>) {
    let ((yp, ldy), epilogue) = t.output(p.second);
    let (masks, hp, w, offs, taps) = (t.masks, t.hp, p.w, p.offs, p.taps);
    let interleave = _mm512_loadu_si512(INTERLEAVE.as_ptr().cast());
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let mut madd = |xs: &[__m512bh; V], w: *const u32| {
        for (i, row) in acc.iter_mut().enumerate() {
            let wv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*w.add(i) as i32));
            for (a, &x) in row.iter_mut().zip(xs) {
                *a = _mm512_dpbf16_ps(*a, x, wv);
            }
        }
    };
    let mask = |k: usize| Masks::of::<V>(masks.get_unchecked(*taps.add(k) as usize));
    // Pairs `(2q, 2q + 1)` of the block's columns. Most lie inside a run of one tap, whose
    // masks are loaded once (loading a mask per column cost a quarter of the kernel's time);
    // a run of odd length shares its last pair with the next run's first column (or with
    // nothing, the block's last column).
    let mut k = 0;
    for &(tap, _, k1) in p.runs {
        let k1 = k1 as usize;
        let m = Masks::of::<V>(masks.get_unchecked(tap as usize));
        while k + 1 < k1 {
            let xs = inputs::<V>(
                hp.add(*offs.add(k)),
                m,
                hp.add(*offs.add(k + 1)),
                m,
                interleave,
            );
            madd(&xs, w.add(k / 2 * MR));
            k += 2;
        }
        if k < k1 {
            let a = hp.add(*offs.add(k));
            let xs = if k + 1 < p.kn {
                inputs::<V>(a, m, hp.add(*offs.add(k + 1)), mask(k + 1), interleave)
            } else {
                inputs::<V>(a, m, std::ptr::null(), m, interleave)
            };
            madd(&xs, w.add(k / 2 * MR));
            k += 2;
        }
    }
    let order = [
        _mm512_loadu_si512(ORDER[0].as_ptr().cast()),
        _mm512_loadu_si512(ORDER[1].as_ptr().cast()),
    ];
    // Row by row with constant indices, as the `f32` kernel stores (see its `panel`).
    macro_rules! store {
        ($($i:literal)*) => {$(
            if $i < R {
                let r = *p.rows.get_unchecked($i) as usize;
                let out = yp.add(r * ldy + (t.t0 - t.c0));
                let mut row = acc[$i];
                if V >= 2 {
                    let (lo, hi) = (row[0], row[1]);
                    row[0] = _mm512_permutex2var_ps(lo, order[0], hi);
                    row[1] = _mm512_permutex2var_ps(lo, order[1], hi);
                }
                store_row(&row, out, t.full, false, epilogue, r, t.t0);
            }
        )*};
    }
    const { assert!(R <= MR && MR == 8) };
    store!(0 1 2 3 4 5 6 7);
}
