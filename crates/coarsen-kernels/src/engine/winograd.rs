//! Winograd F(2×2, 3×3) convolution: 3×3, stride 1, padding 1 convolutions with 2.25× fewer
//! multiplications than im2col + GEMM (Lavin & Gray, 2016).
//!
//! Each 2×2 block of outputs (a *tile*) of a channel is `Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`,
//! where `d_c` is the 4×4 input patch around the tile and `g_c` the 3×3 kernel of channel `c`.
//! Over all tiles and channels the sum is 16 independent products `M_e = U_e · V_e`
//! (`U_e[m, c]`, the transformed weights, `V_e[c, t]`, the transformed patches), which run on the
//! tiled dense GEMM; the transforms are additions only. Rows of tiles are transformed
//! separably (along the row, then down the four rows), on contiguous arrays the compiler
//! vectorises.

use super::tiled::Tiled;
use crate::conv::{ConvDims, ConvGeometry};
use crate::error::{check_len, KernelError, Result};
use crate::simd::{run_task, Isa, Simd, SimdTask};

/// A dense 3×3 convolution weight transformed for Winograd F(2×2, 3×3).
#[derive(Clone, Debug)]
pub struct Winograd {
    cout: usize,
    cin: usize,
    /// `U_e` for e = 4·i + j, each `cout × cin`, on the tiled GEMM.
    u: Vec<Tiled>,
}

/// `G`, 4×3.
const G: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

impl Winograd {
    /// The geometry it runs: 3×3, stride 1, padding 1 on every side, no dilation.
    pub fn geometry() -> ConvGeometry {
        ConvGeometry::square(3, 1, 1)
    }

    /// Transforms the dense weight `values` (`[cout, cin, 3, 3]` row-major) of a convolution
    /// with geometry `g`; `None` when `g` is not [`geometry`](Self::geometry).
    pub fn new(g: ConvGeometry, cout: usize, cin: usize, values: &[f32]) -> Result<Option<Self>> {
        let want = cout
            .checked_mul(cin)
            .and_then(|v| v.checked_mul(9))
            .ok_or_else(|| KernelError::Param {
                name: "shape",
                value: format!("[{cout}, {cin}, 3, 3]"),
                reason: "overflows usize".into(),
            })?;
        if g != Self::geometry() {
            return Ok(None);
        }
        check_len("Winograd::new", "values", values.len(), want, || {
            format!("[{cout}, {cin}, 3, 3]")
        })?;
        let isa = Isa::detect();
        let mut ue = vec![vec![0.0f32; cout * cin]; 16];
        for m in 0..cout {
            for c in 0..cin {
                let k = &values[(m * cin + c) * 9..][..9];
                // G·g (4×3), then (G·g)·Gᵀ (4×4).
                let mut gg = [[0.0f32; 3]; 4];
                for (i, row) in gg.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|t| G[i][t] * k[t * 3 + j]).sum();
                    }
                }
                for i in 0..4 {
                    for j in 0..4 {
                        ue[i * 4 + j][m * cin + c] = (0..3).map(|t| gg[i][t] * G[j][t]).sum();
                    }
                }
            }
        }
        let u = ue.iter().map(|v| Tiled::new(isa, cout, cin, v)).collect();
        Ok(Some(Winograd { cout, cin, u }))
    }

    /// Output channels.
    pub fn out_dim(&self) -> usize {
        self.cout
    }

    /// Rows of the GEMM's panels: [`forward_rows`](Self::forward_rows) splits rows at
    /// multiples of it.
    pub fn row_align(&self) -> usize {
        self.u[0].panel_rows()
    }

    /// Whether it runs convolutions of `d`: its geometry and channels, even height and width.
    pub fn accepts(&self, d: &ConvDims) -> bool {
        d.g == Self::geometry()
            && d.c == self.cin
            && d.h.is_multiple_of(2)
            && d.w.is_multiple_of(2)
            && d.h > 0
            && d.w > 0
    }

    /// Output channels `r0 .. r1` (`r0` a multiple of [`row_align`](Self::row_align)) of the
    /// output columns `c0 .. c1` (multiples of `2·W`: whole pairs of output rows) of the batch
    /// `x` (`[cin, B, H, W]`, sizes `d`) into `y` (`(r1 − r0) × (c1 − c0)`), on the calling
    /// thread.
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
        let w = d.w;
        super::direct::check_call(
            "Winograd::forward_rows",
            d,
            (self.accepts(d), &|| {
                format!(
                    "Winograd F(2x2, 3x3) runs 3x3 stride-1 padding-1 convolutions of {} channels on even sizes",
                    self.cin
                )
            }),
            x.len(),
            ((c0, c1), 2 * w),
            ((r0, r1), self.row_align(), self.cout),
            y.len(),
        )?;
        if c0 == c1 || r0 == r1 {
            return Ok(());
        }
        run_task(
            Isa::detect(),
            Run {
                k: self,
                x,
                d,
                cols: (c0, c1),
                rows: (r0, r1),
                y,
            },
        );
        Ok(())
    }
}

thread_local! {
    /// Per-thread scratch of [`compute`]: V, M and the output transform's sums. Taken out of
    /// the slot for a call (a nested call on the same thread allocates its own).
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `v` with at least `len` values.
fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// [`Winograd::forward_rows`] after its checks, compiled for the CPU's instruction set (the
/// transforms vectorise there).
struct Run<'a> {
    k: &'a Winograd,
    x: &'a [f32],
    d: &'a ConvDims,
    cols: (usize, usize),
    rows: (usize, usize),
    y: &'a mut [f32],
}

impl SimdTask for Run<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        compute(self);
    }
}

#[inline(always)]
fn compute(p: Run<'_>) {
    let Run {
        k: this,
        x,
        d,
        cols: (c0, c1),
        rows: (r0, r1),
        y,
    } = p;
    let (h, w) = (d.h, d.w);
    let nc = c1 - c0;
    let (tw, pairs) = (w / 2, nc / (2 * w));
    let nt = pairs * tw;
    let nr = this.u[0].tile_width();
    let tiles = nt.div_ceil(nr);
    let cin = this.cin;
    let vlen = tiles * nr * cin;
    // V_e in the GEMM's tile layout: [t / NR][c][t % NR].
    // Scratch reused across calls on this thread. Nothing is zeroed: every value the results
    // depend on is written first (the padding columns of the last tile of V_e only feed lanes
    // of the GEMM's output that are never stored).
    let (mut v, mut m, mut sbuf) = SCRATCH.take();
    grow(&mut v, 16 * vlen);
    let (mut even, mut odd) = (vec![0.0f32; tw + 1], vec![0.0f32; tw + 1]);
    // h[i][j][tx]: the row transform of the tile row's input row i.
    let mut hrow = vec![0.0f32; 16 * tw];
    let first_pair = c0 / (2 * w);
    for c in 0..cin {
        for pr in 0..pairs {
            let gp = first_pair + pr;
            let (b, ty) = (gp / (h / 2), gp % (h / 2));
            let plane = &x[(c * d.b + b) * h * w..][..h * w];
            for i in 0..4 {
                let iy = (2 * ty + i) as isize - 1;
                let hr = &mut hrow[i * 4 * tw..][..4 * tw];
                if iy < 0 || iy >= h as isize {
                    hr.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * w..][..w];
                // even[tx] = x[2tx], odd[tx + 1] = x[2tx + 1] (odd[0] = x[−1] = 0).
                odd[0] = 0.0;
                for ((e, o), p) in even[..tw]
                    .iter_mut()
                    .zip(odd[1..].iter_mut())
                    .zip(src.chunks_exact(2))
                {
                    *e = p[0];
                    *o = p[1];
                }
                even[tw] = 0.0;
                let (h0, rest) = hr.split_at_mut(tw);
                let (h1, rest) = rest.split_at_mut(tw);
                let (h2, h3) = rest.split_at_mut(tw);
                // a0..a3 = x[2tx − 1], x[2tx], x[2tx + 1], x[2tx + 2]; Bᵀ along the row.
                let (a0, a2) = (&odd[..tw], &odd[1..=tw]);
                let (a1, a3) = (&even[..tw], &even[1..=tw]);
                for ((d, &p), &q) in h0.iter_mut().zip(a0).zip(a2) {
                    *d = p - q;
                }
                for ((d, &p), &q) in h1.iter_mut().zip(a1).zip(a2) {
                    *d = p + q;
                }
                for ((d, &p), &q) in h2.iter_mut().zip(a2).zip(a1) {
                    *d = p - q;
                }
                for ((d, &p), &q) in h3.iter_mut().zip(a1).zip(a3) {
                    *d = p - q;
                }
            }
            // Bᵀ down the four rows, then out to V_e (e = 4·i + j), in runs of tiles that
            // are contiguous in the tile layout.
            let mut tx0 = 0;
            while tx0 < tw {
                let t0 = pr * tw + tx0;
                let len = (nr - t0 % nr).min(tw - tx0);
                let at = (t0 / nr) * nr * cin + c * nr + t0 % nr;
                for j in 0..4 {
                    let r = |i: usize| &hrow[(i * 4 + j) * tw + tx0..][..len];
                    let (d0, d1, d2, d3) = (r(0), r(1), r(2), r(3));
                    let (v0, rest) = v[j * vlen + at..].split_at_mut(4 * vlen);
                    let (v1, rest) = rest.split_at_mut(4 * vlen);
                    let (v2, v3) = rest.split_at_mut(4 * vlen);
                    let (v0, v1, v2, v3) = (
                        &mut v0[..len],
                        &mut v1[..len],
                        &mut v2[..len],
                        &mut v3[..len],
                    );
                    for ((p, &a), &b) in v0.iter_mut().zip(d0).zip(d2) {
                        *p = a - b;
                    }
                    for ((p, &a), &b) in v1.iter_mut().zip(d1).zip(d2) {
                        *p = a + b;
                    }
                    for ((p, &a), &b) in v2.iter_mut().zip(d2).zip(d1) {
                        *p = a - b;
                    }
                    for ((p, &a), &b) in v3.iter_mut().zip(d1).zip(d3) {
                        *p = a - b;
                    }
                }
                tx0 += len;
            }
        }
    }
    // The 16 products M_e = U_e · V_e, rows r0 .. r1.
    let rows = r1 - r0;
    grow(&mut m, 16 * rows * nt);
    for (e, (ue, me)) in this.u.iter().zip(m.chunks_exact_mut(rows * nt)).enumerate() {
        ue.forward_tiles(&v[e * vlen..][..vlen], me, nt, (r0, r1));
    }
    // Aᵀ M A per tile (whole rows of tiles at once, on contiguous arrays), out to the two
    // output rows of its pair.
    grow(&mut sbuf, 12 * nt);
    for r in 0..rows {
        let me: [&[f32]; 16] = std::array::from_fn(|e| &m[(e * rows + r) * nt..][..nt]);
        let (sa, o) = sbuf.split_at_mut(8 * nt);
        // Aᵀ down: s0j = m0j + m1j + m2j (dst j < 4), s1j = m1j − m2j − m3j (dst 4 + j).
        for (j, dst) in sa.chunks_exact_mut(nt).enumerate() {
            let (a, b, c) = (me[j], me[j + 4], me[j + 8]);
            if j < 4 {
                for ((d, &a), (&b, &c)) in dst.iter_mut().zip(a).zip(b.iter().zip(c)) {
                    *d = a + b + c;
                }
            } else {
                for ((d, &a), (&b, &c)) in dst.iter_mut().zip(a).zip(b.iter().zip(c)) {
                    *d = a - b - c;
                }
            }
        }
        let sr = |i: usize| &sa[i * nt..][..nt];
        let (o01, o23) = o.split_at_mut(2 * nt);
        let (o0, o1) = o01.split_at_mut(nt);
        let (o2, o3) = o23.split_at_mut(nt);
        // Then along: y0 = s0 + s1 + s2, y1 = s1 − s2 − s3.
        for (dst, base, add) in [(o0, 0, true), (o1, 0, false), (o2, 4, true), (o3, 4, false)] {
            if add {
                let (a, b, c) = (sr(base), sr(base + 1), sr(base + 2));
                for ((d, &a), (&b, &c)) in dst.iter_mut().zip(a).zip(b.iter().zip(c)) {
                    *d = a + b + c;
                }
            } else {
                let (a, b, c) = (sr(base + 1), sr(base + 2), sr(base + 3));
                for ((d, &a), (&b, &c)) in dst.iter_mut().zip(a).zip(b.iter().zip(c)) {
                    *d = a - b - c;
                }
            }
        }
        let yr = &mut y[r * nc..][..nc];
        let (o01, o23) = o.split_at(2 * nt);
        let (o0, o1) = o01.split_at(nt);
        let (o2, o3) = o23.split_at(nt);
        for (pr, out) in yr.chunks_exact_mut(2 * w).enumerate() {
            let (top, bottom) = out.split_at_mut(w);
            let t = pr * tw..(pr + 1) * tw;
            let (a, b) = (&o0[t.clone()], &o1[t.clone()]);
            for ((p, &a), &b) in top.chunks_exact_mut(2).zip(a).zip(b) {
                p[0] = a;
                p[1] = b;
            }
            let (a, b) = (&o2[t.clone()], &o3[t]);
            for ((p, &a), &b) in bottom.chunks_exact_mut(2).zip(a).zip(b) {
                p[0] = a;
                p[1] = b;
            }
        }
    }
    SCRATCH.set((v, m, sbuf));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    #[test]
    fn matches_im2col_times_the_weight() {
        let mut seed = 5u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let g = Winograd::geometry();
        for &(cout, cin, b, h, w) in &[
            (8, 3, 2, 4, 4),
            (9, 70, 3, 6, 8),
            (17, 5, 1, 2, 2),
            (16, 64, 2, 8, 8),
            (3, 2, 4, 2, 34),
        ] {
            let d = ConvDims::new(&[cin, b, h, w], g).unwrap();
            let k = cin * 9;
            let wv: Vec<f32> = (0..cout * k).map(|_| rnd()).collect();
            let x: Vec<f32> = (0..cin * b * h * w).map(|_| rnd()).collect();
            let n = d.n();
            let mut col = vec![0.0; k * n];
            d.im2col_range(&x, 0, n, &mut col).unwrap();
            let want = reference::forward(&wv, cout, k, &col, n);
            let wg = Winograd::new(g, cout, cin, &wv).unwrap().unwrap();
            assert!(wg.accepts(&d));
            let a = wg.row_align();
            let pairs = n / (2 * w);
            for (p0, p1) in [(0, pairs), (1, pairs), (0, pairs / 2), (pairs, pairs)] {
                let (c0, c1) = (p0 * 2 * w, p1 * 2 * w);
                for (r0, r1) in [(0, cout), (a.min(cout) / a * a, cout)] {
                    let nc = c1 - c0;
                    let mut y = vec![f32::NAN; (r1 - r0) * nc];
                    wg.forward_rows(&x, &d, c0, c1, r0, r1, &mut y).unwrap();
                    for r in r0..r1 {
                        for j in 0..nc {
                            let (got, e) = (y[(r - r0) * nc + j], want[r * n + c0 + j]);
                            assert!(
                                (got - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "[{cout},{cin},{b},{h},{w}] cols {c0}..{c1} rows {r0}..{r1} ({r}, {j}): {got} vs {e}"
                            );
                        }
                    }
                }
            }
            let mut y = vec![0.0; cout * n];
            assert!(wg.forward_rows(&x, &d, 1, n, 0, cout, &mut y).is_err());
            assert!(wg.forward_rows(&x, &d, 0, n, 1, cout, &mut y).is_err());
            assert!(wg.forward_rows(&x[1..], &d, 0, n, 0, cout, &mut y).is_err());
        }
        let odd = ConvDims::new(&[2, 1, 3, 4], g).unwrap();
        let wg = Winograd::new(g, 2, 2, &[0.0; 36]).unwrap().unwrap();
        assert!(!wg.accepts(&odd));
        assert!(
            Winograd::new(ConvGeometry::square(3, 2, 1), 2, 2, &[0.0; 36])
                .unwrap()
                .is_none()
        );
        assert!(Winograd::new(g, 2, 2, &[0.0; 35]).is_err());
    }
}
