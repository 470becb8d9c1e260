//! Convolution geometry and im2col / col2im over channel-major batches `[C, B, H, W]`.
//!
//! A 2-D convolution of a batch by a weight `[Cout, C, kh, kw]` is the product
//! `Y[Cout, B·Ho·Wo] = W[Cout, C·kh·kw] · X[C·kh·kw, B·Ho·Wo]` where `X` is the im2col matrix:
//! row `(c·kh + ky)·kw + kx`, column `(b·Ho + oy)·Wo + ox` holds the input at
//! `(c, b, oy·sh + ky·dh − pad_top, ox·sw + kx·dw − pad_left)`, or 0 in the padding.
//! [`ConvDims`] computes ranges of columns of that matrix (cache-sized chunks), all of its rows or
//! only the rows a sparse kernel reads, and scatters a gradient back (col2im).

use crate::error::{KernelError, Result};

/// Geometry of a 2-D convolution (or pooling window): kernel, stride, zero padding and
/// dilation, per axis (height first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Zero padding: top, left, bottom, right (ONNX's `pads` order).
    pub padding: [usize; 4],
    /// Dilation along height and width.
    pub dilation: [usize; 2],
}

impl ConvGeometry {
    /// Whether it is pointwise: a 1×1 kernel, stride 1, no padding (row `r` of the im2col
    /// matrix is input row `r` itself).
    pub fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0; 4]
    }

    /// A square `k × k` kernel with the same stride and padding on every side, no dilation.
    pub fn square(k: usize, stride: usize, pad: usize) -> Self {
        ConvGeometry {
            kernel: [k, k],
            stride: [stride, stride],
            padding: [pad; 4],
            dilation: [1, 1],
        }
    }

    /// Kernel taps `kh·kw`.
    pub fn taps(&self) -> usize {
        self.kernel[0].saturating_mul(self.kernel[1])
    }

    /// Output size along one axis (0 = height, 1 = width) for an input of `n`, or `None` when
    /// the (dilated) kernel does not fit the padded input, a stride or dilation is 0, or the
    /// sizes overflow.
    pub fn out_axis(&self, axis: usize, n: usize) -> Option<usize> {
        let (k, s, d) = (self.kernel[axis], self.stride[axis], self.dilation[axis]);
        let (p0, p1) = (self.padding[axis], self.padding[axis + 2]);
        if k == 0 || s == 0 || d == 0 {
            return None;
        }
        let span = d.checked_mul(k - 1)?.checked_add(1)?;
        let padded = n.checked_add(p0)?.checked_add(p1)?;
        (padded >= span).then(|| (padded - span) / s + 1)
    }

    /// Output height and width for an input of `h × w` (see [`out_axis`](Self::out_axis)).
    pub fn output(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        Some((self.out_axis(0, h)?, self.out_axis(1, w)?))
    }

    /// Whether every output position reads the input at the same position shifted by a
    /// constant per tap: stride 1, no dilation, output as large as the input ("same").
    fn shifted(&self, h: usize, w: usize) -> bool {
        self.stride == [1, 1]
            && self.dilation == [1, 1]
            && self.out_axis(0, h) == Some(h)
            && self.out_axis(1, w) == Some(w)
    }

    /// The output range `[lo, hi)` along `axis` (of `len_out` outputs) whose input index
    /// `o·s + tap·d − pad` lies inside `0..len_in`.
    pub fn valid(&self, axis: usize, tap: usize, len_in: usize, len_out: usize) -> (usize, usize) {
        let (s, d, p) = (self.stride[axis], self.dilation[axis], self.padding[axis]);
        let off = tap * d;
        // o·s + off ≥ p  ⇔  o ≥ ⌈(p − off)/s⌉
        let lo = p.saturating_sub(off).div_ceil(s.max(1)).min(len_out);
        // o·s + off − p ≤ len_in − 1  ⇔  o ≤ (len_in − 1 + p − off)/s
        let hi = if len_in + p > off {
            ((len_in - 1 + p - off) / s.max(1) + 1).min(len_out)
        } else {
            0
        };
        (lo, hi.max(lo))
    }
}

/// Sizes of a convolution over a channel-major batch `[C, B, H, W]`, and its im2col matrix
/// `[C·kh·kw, B·Ho·Wo]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    /// Input channels.
    pub c: usize,
    /// Images.
    pub b: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
    /// The geometry.
    pub g: ConvGeometry,
}

impl ConvDims {
    /// The sizes of convolving a `[C, B, H, W]` batch (`dims`) with geometry `g`. Fails when the
    /// kernel does not fit, a stride or dilation is 0, or the im2col matrix's size overflows.
    pub fn new(dims: &[usize], g: ConvGeometry) -> Result<ConvDims> {
        let &[c, b, h, w] = dims else {
            return Err(KernelError::Param {
                name: "input",
                value: format!("{dims:?}"),
                reason: "a convolution needs a [C, B, H, W] batch".into(),
            });
        };
        let unfit = || KernelError::Param {
            name: "geometry",
            value: format!("{g:?}"),
            reason: format!("the kernel does not fit a {h}x{w} input"),
        };
        let (ho, wo) = g.output(h, w).ok_or_else(unfit)?;
        let d = ConvDims {
            c,
            b,
            h,
            w,
            ho,
            wo,
            g,
        };
        // Every size used to index buffers must be representable.
        [c, b, h, w, ho, wo]
            .iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x.max(1)))
            .and_then(|_| c.checked_mul(g.taps()))
            .and_then(|rows| rows.checked_mul(b.checked_mul(ho)?.checked_mul(wo)?))
            .ok_or_else(|| KernelError::Param {
                name: "input",
                value: format!("{dims:?}"),
                reason: "the im2col matrix's size overflows".into(),
            })?;
        Ok(d)
    }

    /// Rows of the im2col matrix: `C·kh·kw`.
    pub fn rows(&self) -> usize {
        self.c * self.g.taps()
    }

    /// Output positions per image: `Ho·Wo`.
    pub fn hw(&self) -> usize {
        self.ho * self.wo
    }

    /// Columns of the whole batch: `B·Ho·Wo`.
    pub fn n(&self) -> usize {
        self.b * self.hw()
    }

    /// Images per chunk: about `floats` values of im2col matrix, at least `min_cols` columns,
    /// and at least `min_chunks` chunks when there are that many images.
    pub fn images_per_chunk(&self, floats: usize, min_cols: usize, min_chunks: usize) -> usize {
        let cols = (floats / self.rows().max(1)).max(min_cols);
        let per = cols.div_ceil(self.hw().max(1));
        per.min(self.b.div_ceil(min_chunks.max(1)))
            .clamp(1, self.b.max(1))
    }

    /// (channel, ky, kx) of im2col row `row`.
    fn tap_of(&self, row: usize) -> (usize, usize, usize) {
        let [kh, kw] = self.g.kernel;
        (row / (kh * kw), (row / kw) % kh, row % kw)
    }

    /// Whether [`im2col_tiles`](Self::im2col_tiles) gathers its tiles vector by vector
    /// (AVX-512, tiles of whole vectors, every offset within a channel an `i32`): where the
    /// copies of whole output rows are short (small images, or strided taps), which left them
    /// a loop of a few values per call (batch 1's 4×4 layers: about 1 GB/s written).
    #[cfg(target_arch = "x86_64")]
    fn gathers(&self, nr: usize) -> bool {
        use crate::simd::Isa;
        // A 1×1 stride-2 convolution's rows of at least 16 outputs are copied by vector
        // permutes instead (`even_columns`).
        let strided_copies = self.g.kernel == [1, 1] && self.g.stride == [2, 2] && self.wo >= 16;
        let short = self.wo < 16
            || (self.g.stride != [1, 1] && !strided_copies)
            || self.g.dilation != [1, 1];
        short
            && nr.is_multiple_of(16)
            && i32::try_from(self.b * self.h * self.w).is_ok()
            && Isa::detect() == Isa::Avx512
    }

    /// Checks a column range and the buffers of an im2col call.
    fn check(&self, x: usize, c0: usize, c1: usize, rows: usize, col: usize) -> Result<()> {
        let want_x = self.c * self.b * self.h * self.w;
        let bad = |what: &'static str, got: usize, expected: usize| KernelError::Length {
            op: "im2col",
            what,
            got,
            expected,
            shape: format!(
                "[{}, {}, {}, {}] input, columns {c0}..{c1} of {}",
                self.c,
                self.b,
                self.h,
                self.w,
                self.n()
            ),
        };
        if x != want_x {
            return Err(bad("x", x, want_x));
        }
        if c0 > c1
            || c1 > self.n()
            || !c0.is_multiple_of(self.wo.max(1))
            || !c1.is_multiple_of(self.wo.max(1))
        {
            return Err(KernelError::Param {
                name: "columns",
                value: format!("{c0}..{c1}"),
                reason: format!(
                    "must be whole output rows ({} columns) within {} columns",
                    self.wo,
                    self.n()
                ),
            });
        }
        if col < rows * (c1 - c0) {
            return Err(bad("col", col, rows * (c1 - c0)));
        }
        Ok(())
    }

    /// Columns `c0 .. c1` of row `row` of the batch's im2col matrix into `dst` (`c1 − c0`
    /// values, every one written). `c0` and `c1` are multiples of `Wo`: a range covers whole
    /// output rows, possibly of several images.
    pub fn im2col_row_range(
        &self,
        x: &[f32],
        row: usize,
        c0: usize,
        c1: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        self.check(x.len(), c0, c1, 1, dst.len())?;
        if row >= self.rows() {
            return Err(KernelError::Param {
                name: "row",
                value: row.to_string(),
                reason: format!("the im2col matrix has {} rows", self.rows()),
            });
        }
        self.row_range(x, row, c0, c1, dst);
        Ok(())
    }

    fn row_range(&self, x: &[f32], row: usize, c0: usize, c1: usize, dst: &mut [f32]) {
        let (hw, wo) = (self.hw().max(1), self.wo.max(1));
        let mut c = c0;
        while c < c1 {
            let img = c / hw;
            let end = c1.min((img + 1) * hw);
            let (oy0, oy1) = ((c - img * hw) / wo, (end - img * hw).div_ceil(wo));
            self.image_rows(x, row, img, (oy0, oy1), &mut dst[c - c0..end - c0]);
            c = end;
        }
    }

    /// Columns `c0 .. c1` (multiples of `Wo`) of every row of the batch's im2col matrix into
    /// `col` (`C·kh·kw` rows of `c1 − c0` values, every one written).
    pub fn im2col_range(&self, x: &[f32], c0: usize, c1: usize, col: &mut [f32]) -> Result<()> {
        self.check(x.len(), c0, c1, self.rows(), col.len())?;
        self.select(x, None, c0, c1, col);
        Ok(())
    }

    /// [`im2col_range`](Self::im2col_range) of the listed rows only, in their order
    /// (`rows.len()` rows of `c1 − c0` values): the rows a sparse kernel actually reads.
    pub fn im2col_rows(
        &self,
        x: &[f32],
        rows: &[u32],
        c0: usize,
        c1: usize,
        col: &mut [f32],
    ) -> Result<()> {
        self.check(x.len(), c0, c1, rows.len(), col.len())?;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= self.rows()) {
            return Err(KernelError::Param {
                name: "rows",
                value: r.to_string(),
                reason: format!("the im2col matrix has {} rows", self.rows()),
            });
        }
        self.select(x, Some(rows), c0, c1, col);
        Ok(())
    }

    /// Columns `c0 .. c1` (multiples of `Wo`) of the listed rows (all rows when `rows` is
    /// `None`) of the batch's im2col matrix, written tile by tile for
    /// [`Plan::forward_tiles`](crate::Plan::forward_tiles): `ceil((c1 − c0)/nr)` tiles of
    /// `count × nr` values, value `(i, t·nr + j)` at `out[t·count·nr + i·nr + j]`, zero past
    /// the last column. `tmp` is scratch (grown to `c1 − c0` values).
    #[allow(clippy::too_many_arguments)]
    pub fn im2col_tiles(
        &self,
        x: &[f32],
        rows: Option<&[u32]>,
        c0: usize,
        c1: usize,
        nr: usize,
        out: &mut [f32],
        tmp: &mut Vec<f32>,
    ) -> Result<()> {
        let count = rows.map_or(self.rows(), |r| r.len());
        self.check(x.len(), c0, c1, 0, 0)?;
        if let Some(&r) = rows.and_then(|rs| rs.iter().find(|&&r| r as usize >= self.rows())) {
            return Err(KernelError::Param {
                name: "rows",
                value: r.to_string(),
                reason: format!("the im2col matrix has {} rows", self.rows()),
            });
        }
        if nr == 0 {
            return Err(KernelError::Param {
                name: "nr",
                value: "0".into(),
                reason: "the tile width must be positive".into(),
            });
        }
        let nc = c1 - c0;
        let tiles = nc.div_ceil(nr);
        let want = tiles
            .checked_mul(nr)
            .and_then(|v| v.checked_mul(count))
            .unwrap_or(usize::MAX);
        if out.len() != want {
            return Err(KernelError::Length {
                op: "im2col_tiles",
                what: "out",
                got: out.len(),
                expected: want,
                shape: format!("{count} rows × {nc} columns in tiles of {nr}"),
            });
        }
        if self.g.pointwise() {
            // A linear layer's input: each tile's row is one copy of an input row's columns,
            // written in order.
            let plane = self.b * self.h * self.w;
            for t in 0..tiles {
                let a = c0 + t * nr;
                let width = nr.min(c1 - a);
                for i in 0..count {
                    let r = rows.map_or(i, |rs| rs[i] as usize);
                    let dst = &mut out[(t * count + i) * nr..][..nr];
                    dst[..width].copy_from_slice(&x[r * plane + a..][..width]);
                    dst[width..].fill(0.0);
                }
            }
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if self.gathers(nr) {
            // SAFETY: AVX-512F is available (`gathers`); `x` holds the batch and the rows are
            // below `rows()` (both checked above), `out` holds every tile (checked above).
            unsafe { gather::tiles(self, x, rows, count, (c0, c1), nr, out) };
            return Ok(());
        }
        // Blocks of rows go row-major into `tmp` (small enough to stay in L1), then out to
        // their tiles.
        const BLOCK: usize = 16;
        if tmp.len() < BLOCK * nc {
            tmp.resize(BLOCK * nc, 0.0);
        }
        let mut ids = [0u32; BLOCK];
        for i0 in (0..count).step_by(BLOCK) {
            let i1 = (i0 + BLOCK).min(count);
            let block: &[u32] = match rows {
                Some(r) => &r[i0..i1],
                None => {
                    for (j, id) in ids.iter_mut().enumerate().take(i1 - i0) {
                        *id = (i0 + j) as u32;
                    }
                    &ids[..i1 - i0]
                }
            };
            let buf = &mut tmp[..(i1 - i0) * nc];
            self.select(x, Some(block), c0, c1, buf);
            for (j, src) in buf.chunks_exact(nc.max(1)).enumerate() {
                for t in 0..tiles {
                    let w = nr.min(nc - t * nr);
                    let dst = &mut out[(t * count + i0 + j) * nr..][..nr];
                    dst[..w].copy_from_slice(&src[t * nr..t * nr + w]);
                    dst[w..].fill(0.0);
                }
            }
        }
        Ok(())
    }

    /// The im2col matrix `[C·kh·kw, nb·Ho·Wo]` of images `b0 .. b0 + nb` into `col`.
    pub fn im2col(&self, x: &[f32], b0: usize, nb: usize, col: &mut [f32]) -> Result<()> {
        let hw = self.hw();
        self.im2col_range(x, b0 * hw, (b0 + nb) * hw, col)
    }

    fn select(&self, x: &[f32], rows: Option<&[u32]>, c0: usize, c1: usize, col: &mut [f32]) {
        let nc = c1 - c0;
        let count = rows.map_or(self.rows(), |r| r.len());
        let row_at = |i: usize| rows.map_or(i, |r| r[i] as usize);
        if !self.g.shifted(self.h, self.w) || nc == 0 {
            for (i, dst) in col.chunks_mut(nc.max(1)).take(count).enumerate() {
                self.row_range(x, row_at(i), c0, c1, dst);
            }
            return;
        }
        // Stride-1 "same" convolution: per tap, the valid output rows and columns and the
        // source shift are computed once, then every row is one shifted copy per image.
        let (h, w) = (self.h, self.w);
        let [kh, kw] = self.g.kernel;
        let taps: Vec<Tap> = (0..kh * kw).map(|t| self.tap(t / kw, t % kw)).collect();
        let hw = h * w;
        let mut c = c0;
        while c < c1 {
            let img = c / hw;
            let end = c1.min((img + 1) * hw);
            let (oy0, oy1) = ((c - img * hw) / w, (end - img * hw).div_ceil(w));
            let at = c - c0;
            for i in 0..count {
                let row = row_at(i);
                let (ch, t) = (row / (kh * kw), row % (kh * kw));
                let plane = &x[(ch * self.b + img) * hw..][..hw];
                let d = &mut col[i * nc + at..][..end - c];
                taps[t].copy(plane, w, (oy0, oy1), d);
            }
            c = end;
        }
    }

    /// The shifted-copy description of tap (ky, kx) of a stride-1 "same" convolution.
    fn tap(&self, ky: usize, kx: usize) -> Tap {
        let (lo, hi) = self.g.valid(1, kx, self.w, self.w);
        let (ylo, yhi) = self.g.valid(0, ky, self.h, self.h);
        let [pt, pl, _, _] = self.g.padding;
        let shift = (ky * self.w + kx) as isize - (pt * self.w + pl) as isize;
        Tap {
            lo,
            hi,
            ylo,
            yhi,
            shift,
            plane: self.h * self.w,
        }
    }

    /// Output rows `oy0 .. oy1` of image `img` of im2col row `row` into `dst`.
    fn image_rows(
        &self,
        x: &[f32],
        row: usize,
        img: usize,
        (oy0, oy1): (usize, usize),
        dst: &mut [f32],
    ) {
        let g = self.g;
        let (ch, ky, kx) = self.tap_of(row);
        let plane = &x[(ch * self.b + img) * self.h * self.w..][..self.h * self.w];
        if g.shifted(self.h, self.w) {
            self.tap(ky, kx)
                .copy(plane, self.w, (oy0, oy1), &mut dst[..(oy1 - oy0) * self.w]);
            return;
        }
        let (lo, hi) = g.valid(1, kx, self.w, self.wo);
        let (sh, sw) = (g.stride[0], g.stride[1]);
        let (offy, offx) = (ky * g.dilation[0], kx * g.dilation[1]);
        let (pt, pl) = (g.padding[0], g.padding[1]);
        for oy in oy0..oy1 {
            let out = &mut dst[(oy - oy0) * self.wo..][..self.wo];
            let iy = (oy * sh + offy) as isize - pt as isize;
            if iy < 0 || iy >= self.h as isize {
                out.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * self.w..][..self.w];
            out[..lo].fill(0.0);
            out[hi..].fill(0.0);
            if sw == 1 {
                let from = lo + offx - pl;
                out[lo..hi].copy_from_slice(&src[from..from + hi - lo]);
            } else if sw == 2 && hi > lo {
                // Every other column (a stride-2 downsample's rows): vector permutes.
                let from = 2 * lo + offx - pl;
                let end = (from + 2 * (hi - lo)).min(src.len());
                even_columns(&src[from..end], &mut out[lo..hi]);
            } else {
                for (ox, o) in out[lo..hi].iter_mut().enumerate() {
                    *o = src[(lo + ox) * sw + offx - pl];
                }
            }
        }
    }

    /// Adds channel `ch`'s rows of `dcol` (the im2col gradient of `nb` images, `C·kh·kw` rows
    /// of `nb·Ho·Wo` values) into `plane`, that channel's `nb·H·W` input gradient.
    pub fn col2im_channel(
        &self,
        dcol: &[f32],
        nb: usize,
        ch: usize,
        plane: &mut [f32],
    ) -> Result<()> {
        let nc = nb * self.hw();
        let (want_d, want_p) = (self.rows() * nc, nb * self.h * self.w);
        if dcol.len() < want_d || plane.len() < want_p || ch >= self.c {
            return Err(KernelError::Length {
                op: "col2im",
                what: "dcol / plane",
                got: dcol.len().min(plane.len()),
                expected: want_d.max(want_p),
                shape: format!(
                    "channel {ch} of {}, {nb} images of {}x{}",
                    self.c, self.h, self.w
                ),
            });
        }
        let g = self.g;
        let [kh, kw] = g.kernel;
        let (sh, sw) = (g.stride[0], g.stride[1]);
        let (pt, pl) = (g.padding[0], g.padding[1]);
        for ky in 0..kh {
            for kx in 0..kw {
                let (lo, hi) = g.valid(1, kx, self.w, self.wo);
                let (offy, offx) = (ky * g.dilation[0], kx * g.dilation[1]);
                let row = &dcol[((ch * kh + ky) * kw + kx) * nc..][..nc];
                for bl in 0..nb {
                    for oy in 0..self.ho {
                        let iy = (oy * sh + offy) as isize - pt as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut plane[(bl * self.h + iy as usize) * self.w..][..self.w];
                        let src = &row[(bl * self.ho + oy) * self.wo..][..self.wo];
                        if sw == 1 {
                            let from = lo + offx - pl;
                            for (d, &v) in dst[from..from + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *d += v;
                            }
                        } else {
                            for (ox, &v) in src[lo..hi].iter().enumerate() {
                                dst[(lo + ox) * sw + offx - pl] += v;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// One tap of a stride-1 "same" convolution: valid output columns `[lo, hi)` and rows
/// `[ylo, yhi)`, and the shift from an output position to its source in the plane.
#[derive(Clone, Copy, Debug)]
struct Tap {
    lo: usize,
    hi: usize,
    ylo: usize,
    yhi: usize,
    shift: isize,
    plane: usize,
}

/// `dst[j] = src[2j]` for every `j < dst.len()` (`src` holds at least `2·dst.len() − 1`
/// values): the even columns of a row, by AVX-512 permutes where available.
pub(crate) fn even_columns(src: &[f32], dst: &mut [f32]) {
    debug_assert!(dst.is_empty() || src.len() > 2 * (dst.len() - 1));
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= 16 && crate::simd::Isa::detect() == crate::simd::Isa::Avx512 {
        let n = dst.len().min(src.len().div_ceil(2));
        // SAFETY: AVX-512F is available; `src` holds `len ≥ 2n − 1` values and `dst` `n`.
        unsafe { split_pairs_avx512(src.as_ptr(), src.len(), n, Some(dst.as_mut_ptr()), None) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src.iter().step_by(2)) {
        *d = *s;
    }
}

/// `even[j] = src[2j]` and `odd[j] = src[2j + 1]` for `j < n`, either output optional: a row
/// split into its even and odd columns by AVX-512 permutes, 16 pairs at a time, the last ones
/// through masks, which read nothing past `src[len − 1]` and write nothing past position `n`.
/// Serves [`even_columns`] and the stride-2 halo copies of the in-place kernels.
///
/// # Safety
/// AVX-512F must be available; `src` is valid for reading `len ≥ 2n − 1` values (`2n` with
/// `odd`), `even` and `odd` for writing `n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn split_pairs_avx512(
    src: *const f32,
    len: usize,
    n: usize,
    even: Option<*mut f32>,
    odd: Option<*mut f32>,
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller guarantees; `put` stores the lanes it is given.
    unsafe {
        split_pairs_by(src, len, n, even, odd, |p, m, v| {
            _mm512_mask_storeu_ps(p, m, v)
        })
    }
}

/// The loop of [`split_pairs_avx512`] for any halo values: per 16 pairs (fewer at the end),
/// `put(to, lanes, values)` stores the even values (or the odd ones) at `to` under the mask
/// `lanes` of the positions it may write.
///
/// # Safety
/// As [`split_pairs_avx512`]; inlined where AVX-512F is enabled; `put` writes no lane its
/// mask leaves out.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn split_pairs_by<T>(
    src: *const f32,
    len: usize,
    n: usize,
    even: Option<*mut T>,
    odd: Option<*mut T>,
    put: impl Fn(*mut T, u16, std::arch::x86_64::__m512),
) {
    use std::arch::x86_64::*;
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let lanes = |k: usize| {
        if k >= 16 {
            u16::MAX
        } else {
            ((1u32 << k) - 1) as u16
        }
    };
    let mut j = 0;
    while j < n {
        let m = (n - j).min(16);
        // Values `2j ..` of the pairs, no further than `len`.
        let v = (2 * m).min(len - 2 * j);
        // SAFETY: as the caller guarantees; the masks cover values `2j .. 2j + v ≤ len` and
        // positions `j .. j + m ≤ n`.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(lanes(v), src.add(2 * j));
            let hi = _mm512_maskz_loadu_ps(lanes(v.saturating_sub(16)), src.add(2 * j + 16));
            if let Some(e) = even {
                put(e.add(j), lanes(m), _mm512_permutex2var_ps(lo, ie, hi));
            }
            if let Some(o) = odd {
                put(o.add(j), lanes(m), _mm512_permutex2var_ps(lo, io, hi));
            }
        }
        j += m;
    }
}

impl Tap {
    /// Output rows `oy0 .. oy1` of this tap over `plane` (width `w`) into `d`: one contiguous
    /// shifted copy, then zeros where the tap falls into the padding (whole rows above and
    /// below; columns < lo and ≥ hi, which the shifted copy filled from the neighbouring row).
    fn copy(&self, plane: &[f32], w: usize, (oy0, oy1): (usize, usize), d: &mut [f32]) {
        let ra = self.ylo.max(oy0).min(oy1);
        let rb = self.yhi.min(oy1).max(ra);
        let (s, e) = (ra * w, rb * w);
        let base = oy0 * w;
        // Clamp the copy to source indices inside the plane; what is cut off is padding.
        let s2 = (s as isize).max(-self.shift).min(e as isize) as usize;
        let e2 = (e as isize)
            .min(self.plane as isize - self.shift)
            .max(s2 as isize) as usize;
        d[..s2 - base].fill(0.0);
        d[e2 - base..].fill(0.0);
        if e2 > s2 {
            let from = (s2 as isize + self.shift) as usize;
            d[s2 - base..e2 - base].copy_from_slice(&plane[from..from + e2 - s2]);
        }
        if self.lo > 0 || self.hi < w {
            for r in d[s - base..e - base].chunks_exact_mut(w) {
                r[..self.lo].fill(0.0);
                r[self.hi..].fill(0.0);
            }
        }
    }
}

/// [`ConvDims::im2col_tiles`] by AVX-512 gathers: per vector of 16 columns, each tap's
/// offsets within a channel and mask of the lanes inside the image, then one masked gather
/// per row (its channel's plane and its tap's offsets).
#[cfg(target_arch = "x86_64")]
mod gather {
    use std::arch::x86_64::*;

    use super::ConvDims;

    /// Most taps (`kh·kw`) whose offsets a vector keeps at once (every kernel up to 7×7);
    /// larger kernels take one pass over the rows per chunk of taps.
    const MAX_TAPS: usize = 49;

    /// See the module docs; `count` rows (`rows`, or all), columns `c0 .. c1` in tiles of `nr`.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` holds `C·B·H·W` values, every row is below
    /// `d.rows()`, `nr` is a multiple of 16, `B·H·W` fits an `i32`, and `out` holds
    /// `⌈(c1 − c0)/nr⌉·nr·count` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tiles(
        d: &ConvDims,
        x: &[f32],
        rows: Option<&[u32]>,
        count: usize,
        (c0, c1): (usize, usize),
        nr: usize,
        out: &mut [f32],
    ) {
        let g = d.g;
        let [kh, kw] = g.kernel;
        let taps = kh * kw;
        let (h, w) = (d.h as isize, d.w as isize);
        let (hw, wo) = (d.hw().max(1), d.wo.max(1));
        let plane = d.b * d.h * d.w;
        let nc = c1 - c0;
        let tiles = nc.div_ceil(nr);
        let xp = x.as_ptr();
        let op = out.as_mut_ptr();
        let mut idx = [[0i32; 16]; MAX_TAPS];
        let mut mask = [0u16; MAX_TAPS];
        // Taps in chunks of MAX_TAPS (one chunk for every kernel up to 7×7).
        for tap0 in (0..taps).step_by(MAX_TAPS) {
            let tap1 = (tap0 + MAX_TAPS).min(taps);
            for t in 0..tiles {
                for v in 0..nr / 16 {
                    let col0 = c0 + t * nr + v * 16;
                    // Each lane's image and output position, walked from the first one
                    // without dividing per lane (few rows per vector left the divisions the
                    // larger cost).
                    let lanes = c1.saturating_sub(col0).min(16);
                    let mut pos = [(0isize, 0isize, 0isize); 16];
                    let (img, r) = (col0 / hw, col0 % hw);
                    let (mut img, mut oy, mut ox) =
                        (img as isize, (r / wo) as isize, (r % wo) as isize);
                    for p in pos.iter_mut().take(lanes) {
                        *p = (img, oy, ox);
                        ox += 1;
                        if ox == wo as isize {
                            ox = 0;
                            oy += 1;
                            if oy == (hw / wo) as isize {
                                oy = 0;
                                img += 1;
                            }
                        }
                    }
                    // Each tap's offsets and lanes inside the image.
                    for tap in tap0..tap1 {
                        let (ky, kx) = (tap / kw, tap % kw);
                        let dy = (ky * g.dilation[0]) as isize - g.padding[0] as isize;
                        let dx = (kx * g.dilation[1]) as isize - g.padding[1] as isize;
                        let (sy, sx) = (g.stride[0] as isize, g.stride[1] as isize);
                        let (mut m, ix_) = (0u16, &mut idx[tap - tap0]);
                        for (lane, &(img, oy, ox)) in pos.iter().enumerate() {
                            let (iy, ix) = (oy * sy + dy, ox * sx + dx);
                            if lane < lanes && iy >= 0 && iy < h && ix >= 0 && ix < w {
                                m |= 1 << lane;
                                ix_[lane] = (img * h * w + iy * w + ix) as i32;
                            } else {
                                ix_[lane] = 0;
                            }
                        }
                        mask[tap - tap0] = m;
                    }
                    let dst = op.add(t * count * nr + v * 16);
                    for i in 0..count {
                        let row = rows.map_or(i, |r| *r.get_unchecked(i) as usize);
                        let (ch, tap) = (row / taps, row % taps);
                        if tap < tap0 || tap >= tap1 {
                            continue;
                        }
                        let k = tap - tap0;
                        let vi = _mm512_loadu_si512(idx[k].as_ptr().cast());
                        let val = _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            mask[k],
                            vi,
                            xp.add(ch * plane).cast(),
                        );
                        _mm512_storeu_ps(dst.add(i * nr), val);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, entry by entry.
    fn naive(x: &[f32], d: &ConvDims) -> Vec<f32> {
        let g = d.g;
        let [kh, kw] = g.kernel;
        let n = d.n();
        let mut col = vec![0.0; d.rows() * n];
        for c in 0..d.c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = (c * kh + ky) * kw + kx;
                    for b in 0..d.b {
                        for oy in 0..d.ho {
                            for ox in 0..d.wo {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                    - g.padding[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                    - g.padding[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < d.h && (ix as usize) < d.w
                                {
                                    col[row * n + (b * d.ho + oy) * d.wo + ox] =
                                        x[((c * d.b + b) * d.h + iy as usize) * d.w + ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        col
    }

    fn geometries() -> Vec<ConvGeometry> {
        let mut v = vec![
            ConvGeometry::square(3, 1, 1),
            ConvGeometry::square(1, 1, 0),
            ConvGeometry::square(3, 2, 1),
            ConvGeometry::square(5, 1, 2),
            ConvGeometry::square(3, 1, 0),
            ConvGeometry::square(1, 2, 0),
        ];
        v.push(ConvGeometry {
            kernel: [2, 3],
            stride: [1, 1],
            padding: [0, 1, 1, 1],
            dilation: [1, 1],
        });
        v.push(ConvGeometry {
            kernel: [3, 3],
            stride: [1, 2],
            padding: [2, 2, 2, 2],
            dilation: [2, 2],
        });
        v.push(ConvGeometry {
            kernel: [3, 2],
            stride: [3, 1],
            padding: [1, 0, 0, 2],
            dilation: [1, 3],
        });
        v
    }

    #[test]
    fn im2col_matches_the_definition() {
        for g in geometries() {
            // The last two: rows of 33 and 17 outputs at stride 2 (vector permutes and a
            // scalar rest, even and odd input widths).
            for (c, b, h, w) in [
                (2, 3, 5, 4),
                (1, 1, 1, 1),
                (3, 2, 7, 7),
                (2, 2, 6, 3),
                (2, 2, 4, 66),
                (1, 2, 3, 33),
            ] {
                let Ok(d) = ConvDims::new(&[c, b, h, w], g) else {
                    assert!(g.output(h, w).is_none(), "{g:?} {h}x{w}");
                    continue;
                };
                let x: Vec<f32> = (0..c * b * h * w).map(|i| i as f32 + 1.0).collect();
                let want = naive(&x, &d);
                let n = d.n();
                // Every range of whole output rows, including ones that cut through images.
                let wo = d.wo;
                for c0 in (0..=n).step_by(wo) {
                    for c1 in (c0..=n).step_by(wo) {
                        let nc = c1 - c0;
                        let mut col = vec![f32::NAN; d.rows() * nc];
                        d.im2col_range(&x, c0, c1, &mut col).unwrap();
                        for r in 0..d.rows() {
                            assert_eq!(
                                &col[r * nc..(r + 1) * nc],
                                &want[r * n + c0..r * n + c1],
                                "{g:?} [{c},{b},{h},{w}] row {r} cols {c0}..{c1}"
                            );
                        }
                        let rows: Vec<u32> = (0..d.rows() as u32).rev().step_by(2).collect();
                        let mut sel = vec![f32::NAN; rows.len() * nc];
                        d.im2col_rows(&x, &rows, c0, c1, &mut sel).unwrap();
                        for (i, &r) in rows.iter().enumerate() {
                            let r = r as usize;
                            assert_eq!(&sel[i * nc..(i + 1) * nc], &want[r * n + c0..r * n + c1]);
                            let mut one = vec![f32::NAN; nc];
                            d.im2col_row_range(&x, r, c0, c1, &mut one).unwrap();
                            assert_eq!(&one[..], &want[r * n + c0..r * n + c1]);
                        }
                        // Tile by tile, all rows and the selected ones, tiles of 1, 3, 16
                        // and 32 (the last two gathered where AVX-512 is available and the
                        // rows are short).
                        for nr in [1, 3, 16, 32] {
                            let mut tmp = Vec::new();
                            for sel in [None, Some(&rows[..])] {
                                let count = sel.map_or(d.rows(), |r| r.len());
                                let tiles = nc.div_ceil(nr);
                                let mut out = vec![f32::NAN; tiles * nr * count];
                                d.im2col_tiles(&x, sel, c0, c1, nr, &mut out, &mut tmp)
                                    .unwrap();
                                for i in 0..count {
                                    let r = sel.map_or(i, |s| s[i] as usize);
                                    for j in 0..tiles * nr {
                                        let got = out[(j / nr * count + i) * nr + j % nr];
                                        let exp = if j < nc { want[r * n + c0 + j] } else { 0.0 };
                                        assert_eq!(got, exp, "{g:?} tiles {nr} row {r} col {j}");
                                    }
                                }
                                out.push(0.0);
                                assert!(d
                                    .im2col_tiles(&x, sel, c0, c1, nr, &mut out, &mut tmp)
                                    .is_err());
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn even_columns_picks_every_other_value() {
        for n in 0usize..70 {
            for extra in [0, 1] {
                let len = (2 * n).saturating_sub(1) + extra;
                let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
                let mut dst = vec![f32::NAN; n];
                even_columns(&src, &mut dst);
                let want: Vec<f32> = (0..n).map(|j| src[2 * j]).collect();
                assert_eq!(dst, want, "{n} outputs from {len} values");
            }
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // ⟨im2col(x), y⟩ = ⟨x, col2im(y)⟩ for every x, y.
        for g in geometries() {
            let (c, b, h, w) = (2, 2, 6, 5);
            let Ok(d) = ConvDims::new(&[c, b, h, w], g) else {
                continue;
            };
            let x: Vec<f32> = (0..c * b * h * w).map(|i| ((i * 7) % 11) as f32).collect();
            let y: Vec<f32> = (0..d.rows() * d.n())
                .map(|i| ((i * 5) % 13) as f32)
                .collect();
            let col = naive(&x, &d);
            let lhs: f64 = col
                .iter()
                .zip(&y)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            let mut dx = vec![0.0f32; x.len()];
            for (ch, plane) in dx.chunks_mut(b * h * w).enumerate() {
                d.col2im_channel(&y, b, ch, plane).unwrap();
            }
            let rhs: f64 = x
                .iter()
                .zip(&dx)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            assert_eq!(lhs, rhs, "{g:?}");
        }
    }

    #[test]
    fn bad_calls_are_errors() {
        let g = ConvGeometry::square(3, 1, 1);
        assert!(ConvDims::new(&[1, 1, 4], g).is_err());
        assert!(ConvDims::new(&[1, 1, 1, 1], ConvGeometry::square(3, 1, 0)).is_err());
        assert!(ConvDims::new(&[1, 1, 4, 4], ConvGeometry::square(3, 0, 1)).is_err());
        assert!(ConvDims::new(&[usize::MAX, 2, 4, 4], g).is_err());
        let d = ConvDims::new(&[1, 2, 4, 4], g).unwrap();
        let x = vec![0.0; 32];
        let mut col = vec![0.0; 9 * 32];
        assert!(d.im2col_range(&x, 0, 3, &mut col).is_err());
        assert!(d.im2col_range(&x, 0, 36, &mut col).is_err());
        assert!(d.im2col_range(&x[..31], 0, 32, &mut col).is_err());
        assert!(d.im2col_range(&x, 0, 32, &mut col[..10]).is_err());
        assert!(d.im2col_rows(&x, &[9], 0, 4, &mut col).is_err());
        assert_eq!(g.output(4, 4), Some((4, 4)));
        assert_eq!(ConvGeometry::square(2, 2, 0).output(5, 5), Some((2, 2)));
    }
}
