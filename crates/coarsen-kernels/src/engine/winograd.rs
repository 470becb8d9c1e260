//! Winograd F(2×2, 3×3) and F(4×4, 3×3) convolution: 3×3, stride 1, padding 1 convolutions
//! with 2.25× and 4× fewer multiplications than im2col + GEMM (Lavin & Gray, 2016).
//!
//! Each `T × T` block of outputs (a *tile*) of a channel is
//! `Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`, where `d_c` is the `(T + 2)²` input patch around the
//! tile and `g_c` the 3×3 kernel of channel `c`. Over all tiles and channels the sum is
//! `(T + 2)²` independent products `M_e = U_e · V_e` (`U_e[m, c]`, the transformed weights,
//! `V_e[c, t]`, the transformed patches). With AVX-512 a fused kernel (module `fused`) runs
//! them per block of 48 tiles in cache, for tiles of 2 and 4; with AVX2 and FMA another
//! (module `fused8`) per block of 16 tiles. Elsewhere a portable path runs tiles of 2: rows of
//! tiles transformed separably (along the row, then down the four rows) on contiguous arrays
//! the compiler vectorises, the products on the tiled dense GEMM.

use super::direct::Epilogue;
use super::tiled::Tiled;
use crate::conv::{ConvDims, ConvGeometry};
use crate::error::{check_len, KernelError, Result};
use crate::simd::{run_task, Isa, Simd, SimdTask};

/// A dense 3×3 convolution weight transformed for Winograd F(2×2, 3×3).
#[derive(Clone, Debug)]
pub struct Winograd {
    cout: usize,
    cin: usize,
    /// `U_e` for e = 4·i + j, each `cout × cin`, on the tiled GEMM (the portable path, where
    /// the CPU has neither AVX-512 nor AVX2).
    u: Vec<Tiled>,
    /// With AVX-512 or AVX2: `U_e` in panels of [`panel_rows`] rows for the fused kernel,
    /// `[e][panel][c][i]` (rows past `cout` zero), and `u` is empty.
    panels: Vec<f32>,
    /// Output tile side: 2 (F(2×2, 3×3)) or 4 (F(4×4, 3×3), fused kernels only).
    tile: usize,
    /// The instruction set of the fused kernel (AVX-512 or AVX2), whose panels are
    /// [`panel_rows`] of it high; the portable path's otherwise.
    isa: Isa,
    /// With AVX-512, for a weight whose rows read few input channels (whole 3×3 kernels of
    /// zeros, as group sparsity over kernels leaves): the rows in classes that read the same
    /// channels, whose products read only those (`panels` then holds [`Classes`]' layout).
    classes: Option<Classes>,
}

/// Output rows in classes that read one and the same set of input channels (the channels of
/// their non-zero 3×3 kernels), in panels of [`PANEL_ROWS`] rows of one class each: the
/// products of a panel read the transformed patches of its class's channels only. With `U_e`
/// of each panel `len × MR` (`[e][panel: j][i]`), a weight of density `d` over whole kernels
/// costs about `d` of the dense products; the transforms stay those of the dense layer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Classes {
    /// The panels, in order of their classes (ordered by their first row).
    panels: Vec<ClassPanel>,
    /// The classes' channel lists (ascending), concatenated.
    chans: Vec<u32>,
    /// Per row of the panels (`panel · MR + i`): the output row, or `u32::MAX` for a panel's
    /// padding (past its `rows`).
    slot_rows: Vec<u32>,
    /// Per input channel: whether some class reads it (the others are never transformed).
    used: Vec<bool>,
    /// Values of `U_e` per `e` (the panels' `len · MR` summed).
    per_e: usize,
}

/// One panel of [`Classes`]: its class's channels `chans[c0 .. c0 + len]`, its values at
/// `u` within each `e`'s share, its rows' range (`lo ..= hi`) and how many rows it holds (the
/// first `rows` of its `mr`; the rest are padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClassPanel {
    c0: usize,
    len: usize,
    u: usize,
    lo: u32,
    hi: u32,
    rows: usize,
}

impl Classes {
    /// The classes of the weight `values` (`[cout, cin, 3, 3]`), when its products in panels
    /// of `mr` rows per class come to at most three quarters of the dense panels' (an almost
    /// dense weight, or one whose rows all differ, runs dense); `None` otherwise.
    fn of(cout: usize, cin: usize, values: &[f32], mr: usize) -> Option<Classes> {
        // Rows by the channels they read, the classes in the order of their first rows.
        let mut rows_of: std::collections::HashMap<Vec<u32>, Vec<u32>> =
            std::collections::HashMap::new();
        for m in 0..cout {
            let chans: Vec<u32> = (0..cin)
                .filter(|&c| values[(m * cin + c) * 9..][..9].iter().any(|&v| v != 0.0))
                .map(|c| c as u32)
                .collect();
            rows_of.entry(chans).or_default().push(m as u32);
        }
        let mut classes: Vec<(Vec<u32>, Vec<u32>)> = rows_of.into_iter().collect();
        classes.sort_unstable_by_key(|(_, rows)| rows[0]);
        let cost: usize = classes
            .iter()
            .map(|(c, r)| r.len().div_ceil(mr) * mr * c.len())
            .sum();
        let dense = cout.div_ceil(mr) * mr * cin;
        if 4 * cost > 3 * dense {
            return None;
        }
        let mut out = Classes {
            panels: Vec::new(),
            chans: Vec::new(),
            slot_rows: Vec::new(),
            used: vec![false; cin],
            per_e: 0,
        };
        for (chans, rows) in classes {
            let c0 = out.chans.len();
            for &c in &chans {
                out.used[c as usize] = true;
            }
            out.chans.extend_from_slice(&chans);
            // As many panels as whole panels of `mr` rows would take, the rows shared out
            // evenly (33 rows: 7, 7, 7, 6, 6, not 8, 8, 8, 8, 1): the products run a panel's
            // rows only, so a class's last panel no longer multiplies rows of zeros, and no
            // panel runs on a register tile of one or two rows.
            let np = rows.len().div_ceil(mr);
            let mut rest = rows.as_slice();
            for k in 0..np {
                let n = rest.len().div_ceil(np - k);
                let (part, tail) = rest.split_at(n);
                rest = tail;
                out.panels.push(ClassPanel {
                    c0,
                    len: chans.len(),
                    u: out.per_e,
                    lo: part[0],
                    hi: part[part.len() - 1],
                    rows: part.len(),
                });
                out.per_e += chans.len() * mr;
                out.slot_rows.extend_from_slice(part);
                out.slot_rows.resize(out.panels.len() * mr, u32::MAX);
            }
        }
        Some(out)
    }
}

/// `U = G g Gᵀ` of the 3×3 kernel `k` for tiles of `tile` (2: 4×4 values in f32, `e = 4·i +
/// j`; 4: 6×6 values computed in f64, `e = 6·i + j`), in the first `(tile + 2)²` entries.
fn transformed(k: &[f32], tile: usize) -> [f32; 36] {
    let mut u = [0.0f32; 36];
    if tile == 4 {
        // G·g (6×3) in f64, then (G·g)·Gᵀ (6×6).
        let mut gg = [[0.0f64; 3]; 6];
        for (r, row) in gg.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (0..3).map(|t| G4[r][t] as f64 * k[t * 3 + j] as f64).sum();
            }
        }
        for (r, row) in gg.iter().enumerate() {
            for (j, gj) in G4.iter().enumerate() {
                let v: f64 = (0..3).map(|t| row[t] * gj[t] as f64).sum();
                u[6 * r + j] = v as f32;
            }
        }
    } else {
        // G·g (4×3), then (G·g)·Gᵀ (4×4).
        let mut gg = [[0.0f32; 3]; 4];
        for (i, row) in gg.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (0..3).map(|t| G[i][t] * k[t * 3 + j]).sum();
            }
        }
        for i in 0..4 {
            for j in 0..4 {
                u[4 * i + j] = (0..3).map(|t| gg[i][t] * G[j][t]).sum();
            }
        }
    }
    u
}

/// Rows of a panel of `U_e` for the fused kernel of `isa` (its register tile's height).
fn panel_rows(isa: Isa) -> usize {
    if isa == Isa::Avx512 {
        PANEL_ROWS
    } else {
        AVX2_ROWS
    }
}

/// Whether `isa` has a fused kernel.
fn fused_isa(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && matches!(isa, Isa::Avx512 | Isa::Avx2)
}

/// `G` of F(4×4, 3×3) (interpolation points 0, ±1, ±2), 6×3.
const G4: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

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
    /// with geometry `g` for F(2×2, 3×3); `None` when `g` is not
    /// [`geometry`](Self::geometry).
    pub fn new(g: ConvGeometry, cout: usize, cin: usize, values: &[f32]) -> Result<Option<Self>> {
        Self::with_tile(g, cout, cin, values, 2)
    }

    /// [`new`](Self::new) with output tiles of `tile × tile`: 2, or 4 for F(4×4, 3×3) (4×
    /// fewer multiplications than the direct product instead of 2.25×, 36 products instead
    /// of 16, 4× the weight's size, rounding errors some ten times larger), which only the
    /// fused kernels (AVX-512, AVX2) run: elsewhere it makes tiles of 2.
    pub fn with_tile(
        g: ConvGeometry,
        cout: usize,
        cin: usize,
        values: &[f32],
        tile: usize,
    ) -> Result<Option<Self>> {
        Self::build(g, cout, cin, values, tile, false)
    }

    /// [`with_tile`](Self::with_tile) for a sparse weight: where the CPU has AVX-512 and the
    /// weight's rows fall into few classes that read the same input channels (whole 3×3
    /// kernels of zeros, as group sparsity over kernels leaves; see
    /// [`is_sparse`](Self::is_sparse)), the products of each class read only its channels;
    /// otherwise the dense kernel of `with_tile`.
    pub fn sparse_with_tile(
        g: ConvGeometry,
        cout: usize,
        cin: usize,
        values: &[f32],
        tile: usize,
    ) -> Result<Option<Self>> {
        Self::build(g, cout, cin, values, tile, true)
    }

    /// [`with_tile`](Self::with_tile), on row classes where `sparse` allows and they pay.
    fn build(
        g: ConvGeometry,
        cout: usize,
        cin: usize,
        values: &[f32],
        tile: usize,
        sparse: bool,
    ) -> Result<Option<Self>> {
        if tile != 2 && tile != 4 {
            return Err(KernelError::Param {
                name: "tile",
                value: tile.to_string(),
                reason: "Winograd runs output tiles of 2×2 or 4×4".into(),
            });
        }
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
        if sparse && fused_isa(isa) && isa == Isa::Avx512 {
            if let Some(classes) = Classes::of(cout, cin, values, PANEL_ROWS) {
                return Ok(Some(Self::sparse(cout, cin, values, tile, classes)));
            }
        }
        if fused_isa(isa) && tile == 4 {
            return Ok(Some(Self::fused4(cout, cin, values, isa)));
        }
        let mut ue = vec![vec![0.0f32; cout * cin]; 16];
        for m in 0..cout {
            for c in 0..cin {
                let u = transformed(&values[(m * cin + c) * 9..][..9], 2);
                for (e, ue) in ue.iter_mut().enumerate() {
                    ue[m * cin + c] = u[e];
                }
            }
        }
        if fused_isa(isa) {
            let mr = panel_rows(isa);
            let np = cout.div_ceil(mr);
            let mut panels = vec![0.0f32; 16 * np * cin * mr];
            for (e, u) in ue.iter().enumerate() {
                for m in 0..cout {
                    let (q, i) = (m / mr, m % mr);
                    for c in 0..cin {
                        panels[((e * np + q) * cin + c) * mr + i] = u[m * cin + c];
                    }
                }
            }
            return Ok(Some(Winograd {
                cout,
                cin,
                u: Vec::new(),
                panels,
                tile: 2,
                isa,
                classes: None,
            }));
        }
        let u = ue.iter().map(|v| Tiled::new(isa, cout, cin, v)).collect();
        Ok(Some(Winograd {
            cout,
            cin,
            u,
            panels: Vec::new(),
            tile: 2,
            isa,
            classes: None,
        }))
    }

    /// F(4×4, 3×3) for the fused kernel: `U_e = G g Gᵀ` (6×6, `e = 6·i + j`) in panels.
    fn fused4(cout: usize, cin: usize, values: &[f32], isa: Isa) -> Winograd {
        let mr = panel_rows(isa);
        let np = cout.div_ceil(mr);
        let mut panels = vec![0.0f32; 36 * np * cin * mr];
        for m in 0..cout {
            let (q, i) = (m / mr, m % mr);
            for c in 0..cin {
                let u = transformed(&values[(m * cin + c) * 9..][..9], 4);
                for (e, &v) in u.iter().enumerate() {
                    panels[((e * np + q) * cin + c) * mr + i] = v;
                }
            }
        }
        Winograd {
            cout,
            cin,
            u: Vec::new(),
            panels,
            tile: 4,
            isa,
            classes: None,
        }
    }

    /// The AVX-512 kernel on the row classes of a sparse weight (tiles of `tile`): per `e`,
    /// each panel's `U_e` over its class's channels only.
    fn sparse(cout: usize, cin: usize, values: &[f32], tile: usize, classes: Classes) -> Winograd {
        let mr = PANEL_ROWS;
        let es = (tile + 2) * (tile + 2);
        let mut panels = vec![0.0f32; es * classes.per_e];
        for (q, p) in classes.panels.iter().enumerate() {
            let chans = &classes.chans[p.c0..p.c0 + p.len];
            for i in 0..mr {
                let m = classes.slot_rows[q * mr + i];
                if m == u32::MAX {
                    continue;
                }
                for (j, &c) in chans.iter().enumerate() {
                    let at = (m as usize * cin + c as usize) * 9;
                    let u = transformed(&values[at..at + 9], tile);
                    for (e, &v) in u.iter().enumerate().take(es) {
                        panels[e * classes.per_e + p.u + j * mr + i] = v;
                    }
                }
            }
        }
        Winograd {
            cout,
            cin,
            u: Vec::new(),
            panels,
            tile,
            isa: Isa::Avx512,
            classes: Some(classes),
        }
    }

    /// Whether it runs the row classes of a sparse weight (whole 3×3 kernels of zeros): the
    /// products of each class read only its input channels.
    pub fn is_sparse(&self) -> bool {
        self.classes.is_some()
    }

    /// Whether it runs a fused kernel (the CPU has AVX-512F, or AVX2 and FMA): transforms
    /// and products per block of 48 (16 with AVX2) tiles in cache. Elsewhere it runs the
    /// portable path, whole ranges through the tiled GEMM, which is not faster than the
    /// alternatives there.
    pub fn is_fused(&self) -> bool {
        self.u.is_empty()
    }

    /// Side of its output tiles (2 or 4): calls take whole bands of that many output rows.
    pub fn tile(&self) -> usize {
        self.tile
    }

    /// Output positions of a block of the fused kernel (48 tiles, 16 with AVX2): column
    /// ranges that are multiples of it waste no lanes.
    pub fn block_columns(&self) -> usize {
        let tiles = if self.isa == Isa::Avx512 { 48 } else { 16 };
        self.tile * self.tile * tiles
    }

    /// Output channels.
    pub fn out_dim(&self) -> usize {
        self.cout
    }

    /// Rows of the GEMM's panels: [`forward_rows`](Self::forward_rows) splits rows at
    /// multiples of it. On a sparse weight's row classes ([`is_sparse`](Self::is_sparse)),
    /// whose panels do not follow the rows' order, all the rows: calls take them whole (a
    /// call on fewer runs the panels holding them).
    pub fn row_align(&self) -> usize {
        if self.classes.is_some() {
            return self.cout.max(1);
        }
        self.u
            .first()
            .map_or_else(|| panel_rows(self.isa), Tiled::panel_rows)
    }

    /// Whether it runs convolutions of `d`: its geometry and channels, and height and width
    /// multiples of its tile, or any sizes on the AVX-512 kernel (whose last tiles of a row or
    /// column reach past the image: computed from zeros there, stored only inside it).
    pub fn accepts(&self, d: &ConvDims) -> bool {
        d.g == Self::geometry()
            && d.c == self.cin
            && (self.divides(d.h, d.w) || self.pads())
            && d.h > 0
            && d.w > 0
            // Lane offsets within a block of tiles (at most 48 bands of rows) stay in i32.
            && d.w <= 1 << 20
    }

    /// Columns of the smallest ranges it runs on `H × W` images: whole bands of `T` output rows
    /// (`T·W`, `T` its [`tile`](Self::tile)) where `T` divides `H` and `W`, whole images
    /// (`H·W`) where it does not.
    pub fn column_unit(&self, h: usize, w: usize) -> usize {
        if self.divides(h, w) {
            self.tile * w
        } else {
            h * w
        }
    }

    /// Whether its tile divides `H` and `W`.
    fn divides(&self, h: usize, w: usize) -> bool {
        h.is_multiple_of(self.tile) && w.is_multiple_of(self.tile)
    }

    /// Whether it takes sizes its tile does not divide (the fused kernels, which store only
    /// the outputs inside the image of tiles past it).
    fn pads(&self) -> bool {
        self.is_fused()
    }

    /// Output channels `r0 .. r1` (`r0` a multiple of [`row_align`](Self::row_align)) of the
    /// output columns `c0 .. c1` (multiples of [`column_unit`](Self::column_unit)) of the
    /// batch
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
        let op = "Winograd::forward_rows";
        self.check(op, x, d, ((c0, c1), (r0, r1)), y.len())?;
        if c0 == c1 || r0 == r1 {
            return Ok(());
        }
        // SAFETY: `y` holds the `(r1 − r0) × (c1 − c0)` values checked above.
        unsafe {
            self.run(
                x,
                d,
                ((c0, c1), (r0, r1)),
                (y.as_mut_ptr(), c1 - c0),
                Epilogue::default(),
            )
        };
        Ok(())
    }

    /// [`forward_rows`](Self::forward_rows) storing through `epilogue` (bias, residual,
    /// ReLU) into `y`: the value of output row `r0 + i`, column `c0 + j` at `y[i·ldy + j]`.
    ///
    /// # Safety
    /// `y` must be valid for writes of every position above, and no other thread may access
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
        let op = "Winograd::forward_into";
        // The block's own shape: the caller vouches for `y` and `ldy`.
        let len = r1.saturating_sub(r0) * c1.saturating_sub(c0);
        self.check(op, x, d, ((c0, c1), (r0, r1)), len)?;
        epilogue.check(op, self.cout, (c0, c1), ldy)?;
        if c0 == c1 || r0 == r1 {
            return Ok(());
        }
        // SAFETY: as the caller guarantees, and the epilogue's sizes checked above.
        unsafe { self.run(x, d, ((c0, c1), (r0, r1)), (y, ldy), epilogue) };
        Ok(())
    }

    /// Checks a call's sizes (`y_len`: the values of the block it writes).
    fn check(
        &self,
        op: &'static str,
        x: &[f32],
        d: &ConvDims,
        ((c0, c1), (r0, r1)): ((usize, usize), (usize, usize)),
        y_len: usize,
    ) -> Result<()> {
        super::direct::check_call(
            op,
            d,
            (self.accepts(d), &|| {
                let other = if self.pads() {
                    ""
                } else {
                    " (other sizes need AVX-512, or AVX2 and FMA)"
                };
                format!(
                    "Winograd F({t}x{t}, 3x3) runs 3x3 stride-1 padding-1 convolutions of {} channels on sizes that are multiples of {t}{other}",
                    self.cin,
                    t = self.tile
                )
            }),
            x.len(),
            ((c0, c1), self.column_unit(d.h, d.w)),
            ((r0, r1), self.row_align(), self.cout),
            y_len,
        )
    }

    /// Runs a checked, non-empty call.
    ///
    /// # Safety
    /// As [`forward_into`](Self::forward_into), its sizes checked.
    unsafe fn run(
        &self,
        x: &[f32],
        d: &ConvDims,
        ((c0, c1), (r0, r1)): ((usize, usize), (usize, usize)),
        (y, ldy): (*mut f32, usize),
        epilogue: Epilogue<'_>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.is_fused() {
            let (cols, rows, out) = ((c0, c1), (r0, r1), (y, ldy));
            // SAFETY: `panels` is only made where `isa` was detected; the rest as the
            // caller guarantees.
            unsafe {
                match (self.isa, self.tile) {
                    (Isa::Avx512, 4) => fused::forward::<4>(self, x, d, cols, rows, out, epilogue),
                    (Isa::Avx512, _) => fused::forward::<2>(self, x, d, cols, rows, out, epilogue),
                    (_, 4) => fused8::forward::<4>(self, x, d, cols, rows, out, epilogue),
                    _ => fused8::forward::<2>(self, x, d, cols, rows, out, epilogue),
                }
            };
            return;
        }
        // The portable path computes the block, then stores it through the epilogue.
        let nc = c1 - c0;
        let mut part = vec![0.0f32; (r1 - r0) * nc];
        run_task(
            Isa::detect(),
            Run {
                k: self,
                x,
                d,
                cols: (c0, c1),
                rows: (r0, r1),
                y: &mut part,
            },
        );
        for (i, row) in part.chunks_exact(nc).enumerate() {
            let r = r0 + i;
            let b = epilogue.bias.map_or(0.0, |b| b[r]);
            for (j, &v) in row.iter().enumerate() {
                let res = epilogue
                    .residual
                    .map_or(0.0, |res| res.values[r * res.ld + c0 + j]);
                let v = v + b + res;
                // SAFETY: as the caller guarantees for row i, column j.
                unsafe { *y.add(i * ldy + j) = if epilogue.relu { v.max(0.0) } else { v } };
            }
        }
    }
}

/// Rows of a panel of the fused AVX-512 kernel's `U_e` (its register tile's height).
const PANEL_ROWS: usize = 8;
/// Rows of a panel of the fused AVX2 kernel's `U_e`: a register tile of 6 rows × 16 tiles
/// (12 of the 16 registers).
const AVX2_ROWS: usize = 6;

/// `Bᵀ` of F(4×4, 3×3) (interpolation points 0, ±1, ±2); the kernels apply it factored
/// (`transforms::bt4`), the tests check that against it.
#[cfg(test)]
const BT4: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
/// `Aᵀ` of F(4×4, 3×3), applied factored (`transforms::at4`).
#[cfg(test)]
const AT4: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// The transforms of both fused kernels, on vectors of tiles (one tile per lane) of the
/// instruction set `S`.
#[cfg(target_arch = "x86_64")]
mod transforms {
    use crate::simd::Simd;

    /// `Bᵀ d B` of a vector of tiles' 4×4 patches, written as `V_e` at `out + e·stride`.
    ///
    /// # Safety
    /// `S` must be available; `out + e·stride` holds a vector for every `e < 16`.
    #[inline(always)]
    pub(super) unsafe fn input<S: Simd>(d: &[S::V; 16], out: *mut f32, stride: usize) {
        let (sub, add) = (S::sub, S::add);
        // Down the rows.
        let mut t = [S::zero(); 16];
        for j in 0..4 {
            t[j] = sub(d[j], d[8 + j]);
            t[4 + j] = add(d[4 + j], d[8 + j]);
            t[8 + j] = sub(d[8 + j], d[4 + j]);
            t[12 + j] = sub(d[4 + j], d[12 + j]);
        }
        // Along them.
        for i in 0..4 {
            let r = &t[4 * i..4 * i + 4];
            let o = out.add(4 * i * stride);
            S::store(o, sub(r[0], r[2]));
            S::store(o.add(stride), add(r[1], r[2]));
            S::store(o.add(2 * stride), sub(r[2], r[1]));
            S::store(o.add(3 * stride), sub(r[1], r[3]));
        }
    }

    /// `Aᵀ M A` of a vector of tiles (`M_e` = `m(e)`): the outputs at (row, column) (0, 0),
    /// (0, 1), (1, 0), (1, 1).
    ///
    /// # Safety
    /// `S` must be available.
    #[inline(always)]
    pub(super) unsafe fn output<S: Simd>(m: impl Fn(usize) -> S::V) -> [S::V; 4] {
        let (sub, add) = (S::sub, S::add);
        let m: [S::V; 16] = std::array::from_fn(m);
        let mut s = [S::zero(); 8];
        for j in 0..4 {
            s[j] = add(add(m[j], m[4 + j]), m[8 + j]);
            s[4 + j] = sub(sub(m[4 + j], m[8 + j]), m[12 + j]);
        }
        [
            add(add(s[0], s[1]), s[2]),
            sub(sub(s[1], s[2]), s[3]),
            add(add(s[4], s[5]), s[6]),
            sub(sub(s[5], s[6]), s[7]),
        ]
    }

    /// `Bᵀ d` of one column (or row) of six values of F(4×4, 3×3) (`BT4`), with the rows'
    /// common terms shared: 12 operations where the rows of `Bᵀ` one by one took 22.
    #[inline(always)]
    unsafe fn bt4<S: Simd>(d: [S::V; 6]) -> [S::V; 6] {
        let (fma, add, sub, k) = (S::fma, S::add, S::sub, S::splat);
        // d4 − 4·d2 and d3 − 4·d1; d4 − d2 and d3 − d1.
        let p = fma(k(-4.0), d[2], d[4]);
        let q = fma(k(-4.0), d[1], d[3]);
        let r = sub(d[4], d[2]);
        let u = sub(d[3], d[1]);
        [
            fma(k(4.0), d[0], fma(k(-5.0), d[2], d[4])),
            add(p, q),
            sub(p, q),
            fma(k(2.0), u, r),
            fma(k(-2.0), u, r),
            fma(k(4.0), d[1], fma(k(-5.0), d[3], d[5])),
        ]
    }

    /// `Aᵀ m` of one column (or row) of six values of F(4×4, 3×3), with the rows' common
    /// terms shared: 10 operations where the rows of `Aᵀ` ([`AT4`]) one by one took 18.
    #[inline(always)]
    unsafe fn at4<S: Simd>(m: [S::V; 6]) -> [S::V; 4] {
        let (fma, add, sub, k) = (S::fma, S::add, S::sub, S::splat);
        let (a, b) = (add(m[1], m[2]), sub(m[1], m[2]));
        let (c, d) = (add(m[3], m[4]), sub(m[3], m[4]));
        [
            add(add(m[0], a), c),
            fma(k(2.0), d, b),
            fma(k(4.0), c, a),
            add(fma(k(8.0), d, b), m[5]),
        ]
    }

    /// `Bᵀ d B` of a vector of tiles' 6×6 patches, written as `V_e` (`e = 6·i + j`) at
    /// `out + e·stride`.
    ///
    /// # Safety
    /// `S` must be available; `out + e·stride` holds a vector for every `e < 36`.
    #[inline(always)]
    pub(super) unsafe fn input4<S: Simd>(d: &[S::V; 36], out: *mut f32, stride: usize) {
        // Down the columns: t[i][j] = Σ_k Bᵀ[i][k] d[k][j].
        let mut t = [S::zero(); 36];
        for j in 0..6 {
            let col = bt4::<S>(std::array::from_fn(|k| d[6 * k + j]));
            for (i, v) in col.into_iter().enumerate() {
                t[6 * i + j] = v;
            }
        }
        // Along the rows: V[i][j] = Σ_k t[i][k] Bᵀ[j][k].
        for i in 0..6 {
            let row = bt4::<S>(std::array::from_fn(|k| t[6 * i + k]));
            for (j, v) in row.into_iter().enumerate() {
                S::store(out.add((6 * i + j) * stride), v);
            }
        }
    }

    /// `Aᵀ M A` of a vector of tiles (`M_e` = `m(e)`, read where the transform needs it: a
    /// copy of all 36 first cost a 2.3 KB clear of the stack per vector): the 4×4 outputs,
    /// row-major.
    ///
    /// # Safety
    /// `S` must be available.
    #[inline(always)]
    pub(super) unsafe fn output4<S: Simd>(m: impl Fn(usize) -> S::V) -> [S::V; 16] {
        // Down: s[i][j] = Σ_k Aᵀ[i][k] m[k][j].
        let mut s = [S::zero(); 24];
        for j in 0..6 {
            let col = at4::<S>(std::array::from_fn(|k| m(6 * k + j)));
            for (i, v) in col.into_iter().enumerate() {
                s[6 * i + j] = v;
            }
        }
        // Along: y[i][j] = Σ_k s[i][k] Aᵀ[j][k].
        let mut y = [S::zero(); 16];
        for i in 0..4 {
            let row = at4::<S>(std::array::from_fn(|k| s[6 * i + k]));
            y[4 * i..4 * i + 4].copy_from_slice(&row);
        }
        y
    }

    #[cfg(test)]
    mod tests {
        use super::super::{AT4, BT4};
        use super::{at4, bt4};
        use crate::simd::Simd;

        /// The factored one-dimensional transforms are the matrices' products (up to
        /// rounding), on values of mixed sizes and signs.
        #[test]
        fn factored_transforms_multiply_by_the_matrices() {
            type S = crate::simd::Scalar;
            let x: [f32; 6] = [0.75, -1.5, 2.25, -3.0, 0.125, 5.5];
            let v: [<S as Simd>::V; 6] = std::array::from_fn(|k| [x[k]; 4]);
            // SAFETY: the scalar "instruction set" runs anywhere.
            let (b, a) = unsafe { (bt4::<S>(v), at4::<S>(v)) };
            for (i, row) in BT4.iter().enumerate() {
                let want: f32 = row.iter().zip(&x).map(|(c, v)| c * v).sum();
                assert!(
                    (b[i][0] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "Bᵀ row {i}"
                );
            }
            for (i, row) in AT4.iter().enumerate() {
                let want: f32 = row.iter().zip(&x).map(|(c, v)| c * v).sum();
                assert!(
                    (a[i][0] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "Aᵀ row {i}"
                );
            }
        }
    }
}

/// The fused AVX-512 kernel: tiles of `T × T` outputs (2 or 4) are taken in blocks of 48
/// (three vectors of 16, one tile per lane); per block the input transform writes `V_e`
/// (`cin × 48` per `e`, `(T + 2)²` of them) to a per-thread buffer that stays in L2, the
/// products run panel by panel on an `8 × 48` register tile (`U_e`'s panel rows broadcast,
/// `V_e`'s tiles loaded, as the implicit GEMM does) into the panel's `M_e`, and the output
/// transform reads the panel's `M` back and stores its rows' outputs through the epilogue. On
/// row classes ([`Winograd::is_sparse`]) a panel's products read its class's channels only.
/// Lane `l` of vector `v` is tile `48·block + 16·v + l` of the range.
///
/// With tiles of 2 where a pair of output rows holds a multiple of 16 tiles (`W` a multiple
/// of 32), each vector's tiles are consecutive in one pair: the transforms load and store
/// whole rows and split or interleave even and odd positions with permutes. With tiles of 4 on
/// images 8, 16 or 32 wide (each half vector four, two or one band), the input rows of a vector's
/// bands are loaded side by side and its patches picked from them by permutes
/// (`patch_tables`). Otherwise patches are gathered lane by lane, masked where the patch
/// reaches the padding. `V_e`'s planes lie a cache line past a multiple of 4 KiB apart, so the
/// 36 stores of one vector's transform do not compete for one set of the L1 cache. Outside
/// the pairs of rows, each output row of the tiles is transposed tile-major and stored in runs
/// of tiles consecutive in a band (`store_tiles`).
#[cfg(target_arch = "x86_64")]
mod fused {
    use std::arch::x86_64::*;

    use super::transforms::{input, input4, output, output4};
    use super::{Winograd, PANEL_ROWS as MR};
    use crate::conv::ConvDims;
    use crate::engine::micro::rank1;
    use crate::engine::Epilogue;
    use crate::simd::Avx512;

    /// Tiles of a block: three vectors.
    const TB: usize = 48;
    /// How many channels ahead the products over row classes ask for a row of `V_e`
    /// ([`gemm`]).
    const PREFETCH: usize = 8;

    thread_local! {
        /// Per-thread `V` and `M` of a block (taken out of the slot for a call).
        static BUFS: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// Where the lanes of one block read and write.
    struct Block {
        /// Per vector: patch top-left (input row `−1`, column `−1` of the tile) and output
        /// position of each lane, relative to the block's first band of rows.
        inb: [[i32; 16]; 3],
        out: [[i32; 16]; 3],
        /// Per vector and patch position `A·i + j`: lanes whose input lies in the image.
        masks: [[u16; 36]; 3],
        /// Per vector: lanes that are tiles of the range.
        valid: [u16; 3],
        /// Per vector, for the contiguous path: absolute band and first tile column.
        band: [usize; 3],
        tx0: [usize; 3],
        /// Per vector and lane: output rows of the tile inside the image (`T` but in the last
        /// band of an image whose height `T` does not divide), and output columns from its
        /// first one to the image's right edge (at most 16).
        rows: [[u8; 16]; 3],
        cols: [[u8; 16]; 3],
        /// Per vector and lane: where a run of tiles starts (the first lane of each group of
        /// `16 / T` that the output transposes together, or a tile not next to the lane
        /// before in its band), the number of tiles in the run; 0 elsewhere.
        runs: [[u8; 16]; 3],
        /// Per vector, with tiles of 4 on images 8, 16 or 32 wide: the loads of
        /// [`patch_tables`]' table of four vectors (16 or 8 columns of an input row each).
        loads: [[RowLoad; 8]; 3],
    }

    /// One load of [`patch_tables`]: 16 values (8 on images 8 wide) from the block's first
    /// band plus `at` (row `−1` of the patch; `+ W·i` for patch row `i`), for the patch rows
    /// `i` whose bit is set in `rows` (the others lie in the padding or past the range: zeros).
    #[derive(Clone, Copy, Default)]
    struct RowLoad {
        at: i32,
        rows: u8,
    }

    /// Whether tiles of `t` on images `w` wide take their patches from whole input rows
    /// ([`patch_tables`]): tiles of 4 on images 8, 16 or 32 wide.
    fn row_tables(t: usize, w: usize) -> bool {
        t == 4 && matches!(w, 8 | 16 | 32)
    }

    /// How a range's columns (`[B, H, W]` positions) fall into bands of `t` output rows:
    /// `⌈H / t⌉` bands per image, the last one short where `t` does not divide `H`.
    pub(super) struct Bands {
        pub(super) h: usize,
        pub(super) w: usize,
        pub(super) t: usize,
    }

    impl Bands {
        /// The first column of band `g` (counted from the batch's first image).
        pub(super) fn column(&self, g: usize) -> usize {
            let hb = self.h.div_ceil(self.t);
            g / hb * self.h * self.w + g % hb * self.t * self.w
        }

        /// The band that starts at column `c` (a whole band's or image's first column).
        pub(super) fn index(&self, c: usize) -> usize {
            let hw = self.h * self.w;
            c / hw * self.h.div_ceil(self.t) + c % hw / (self.t * self.w)
        }
    }

    /// Output channels `r0 .. r1` of columns `c0 .. c1` (whole bands of `T` rows) into `y`
    /// (rows `ldy` apart) through `epilogue`, with tiles of `T × T` outputs (2 or 4).
    ///
    /// # Safety
    /// AVX-512F must be available and the sizes checked as [`Winograd::forward_into`] does;
    /// `k.panels` holds the products of tiles of `T`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward<const T: usize>(
        k: &Winograd,
        x: &[f32],
        d: &ConvDims,
        (c0, c1): (usize, usize),
        (r0, r1): (usize, usize),
        (yp, ldy): (*mut f32, usize),
        epilogue: Epilogue<'_>,
    ) {
        // Patch side and products.
        let a = T + 2;
        let es = a * a;
        let (h, w, cin) = (d.h, d.w, k.cin);
        let ld = d.n();
        // Bands of `T` output rows, `tw` tiles each (the last band of an image and the last
        // tile of a band reaching past it where `T` does not divide its sizes: ranges are then
        // whole images).
        let bands = Bands { h, w, t: T };
        let tw = w.div_ceil(T);
        let first_band = bands.index(c0);
        let nt = (bands.index(c1) - first_band) * tw;
        // Panels: those of rows `r0 .. r1`, or every class's panel (skipping those without a
        // row of the range).
        let classes = k.classes.as_ref();
        let (q0, q1) = match classes {
            Some(cl) => (0, cl.panels.len()),
            None => (r0 / MR, r1.div_ceil(MR)),
        };
        let contiguous =
            T == 2 && tw.is_multiple_of(16) && h.is_multiple_of(T) && w.is_multiple_of(T);
        let tables = row_tables(T, w);
        // `V_e` planes `vs` floats apart: one cache line past a multiple of `cin · TB` (a
        // multiple of 4 KiB for 64, 128, ... channels), so that the 36 stores of a tile
        // vector's transform, one per plane, fall in different sets of the L1 cache.
        let vs = cin * TB + 16;
        let (mut vbuf, mut mbuf) = BUFS.take();
        if vbuf.len() < es * vs {
            vbuf.resize(es * vs, 0.0);
        }
        if mbuf.len() < es * MR * TB {
            mbuf.resize(es * MR * TB, 0.0);
        }
        let (vp, mp) = (vbuf.as_mut_ptr(), mbuf.as_mut_ptr());
        let mut tb = 0;
        while tb < nt {
            let nb = TB.min(nt - tb);
            let nv = nb.div_ceil(16);
            let block = block::<T>(tb, nt, first_band, &bands);
            let band0 = first_band + tb / tw;
            // Input transform: V_e[c][lane].
            for c in 0..cin {
                if classes.is_some_and(|cl| !cl.used[c]) {
                    continue;
                }
                let xc = x.as_ptr().add(c * ld);
                for v in 0..nv {
                    let at = vp.add(c * TB + v * 16);
                    if contiguous {
                        input::<Avx512>(&patch_rows(xc, &block, v, h, w), at, vs);
                    } else if tables {
                        let base = xc.wrapping_add(bands.column(band0));
                        input4::<Avx512>(&patch_tables(base, &block, v, w), at, vs);
                    } else {
                        // The block's first band: lanes add their offsets to it (a pointer
                        // only formed, read through valid lanes only).
                        let base = xc.wrapping_add(bands.column(band0));
                        let d = patch_gather::<T>(base, &block, v, w);
                        if T == 2 {
                            input::<Avx512>(&std::array::from_fn(|i| d[i]), at, vs);
                        } else {
                            input4::<Avx512>(&d, at, vs);
                        }
                    }
                }
            }
            let ybase = bands.column(band0) - c0;
            // Output transform of the row of `M` at `m` (products `stride` floats apart) into
            // output row `r`, through the epilogue out to the block's columns.
            let at = Place {
                yp,
                r0,
                ldy,
                ybase,
                c0,
                nv,
                contiguous,
                band0,
                w,
            };
            // Output row of row `i` of panel `q`, where it lies in `r0 .. r1`.
            let row_of = |q: usize, i: usize| {
                let r = match classes {
                    None => q * MR + i,
                    Some(cl) => cl.slot_rows[q * MR + i] as usize,
                };
                (r >= r0 && r < r1).then_some(r)
            };
            // Whether panel `q` holds a row of the range (class panels hold any rows).
            let wanted = |q: usize| {
                classes.is_none_or(|cl| {
                    let p = &cl.panels[q];
                    p.hi as usize >= r0 && (p.lo as usize) < r1
                })
            };
            // Panel by panel: its products into M (`[e][MR][TB]`, in L1/L2), then its rows'
            // output transform, so that M never leaves the cache (V, read once per panel,
            // comes from L2 or L3). Measured faster than all panels' products `e` by `e`
            // (V_e in L1, M of all rows) on ResNet-18's 64- to 256-channel layers and as fast
            // on its 512-channel ones (`ab_wino 64 5 C,C,HW 0.28`, one thread, the orders
            // alternated in one binary).
            for q in (q0..q1).filter(|&q| wanted(q)) {
                for e in 0..es {
                    products(k, q, e, vp.add(e * vs), mp.add(e * MR * TB), nv);
                }
                for i in 0..MR {
                    if let Some(r) = row_of(q, i) {
                        output_row::<T>(&at, &block, &epilogue, r, mp.add(i * TB), MR * TB);
                    }
                }
            }
            tb += nb;
        }
        BUFS.set((vbuf, mbuf));
    }

    /// The lanes of the block of tiles `tb ..` (of `nt`, the range's first band
    /// `first_band`) of the images `bands` cuts.
    fn block<const T: usize>(tb: usize, nt: usize, first_band: usize, bands: &Bands) -> Block {
        let a = T + 2;
        let mut b = Block {
            inb: [[0; 16]; 3],
            out: [[0; 16]; 3],
            masks: [[0; 36]; 3],
            valid: [0; 3],
            band: [0; 3],
            tx0: [0; 3],
            rows: [[0; 16]; 3],
            cols: [[0; 16]; 3],
            runs: [[0; 16]; 3],
            loads: [[RowLoad::default(); 8]; 3],
        };
        let (h, w) = (bands.h, bands.w);
        let (tw, hb) = (w.div_ceil(T), h.div_ceil(T));
        let p0 = tb / tw;
        let col0 = bands.column(first_band + p0);
        let (hi, wi) = (h as isize, w as isize);
        for v in 0..3 {
            let t = tb + 16 * v;
            b.band[v] = first_band + t / tw;
            b.tx0[v] = t % tw;
            for l in 0..16 {
                let t = tb + 16 * v + l;
                if t >= nt {
                    continue;
                }
                b.valid[v] |= 1 << l;
                let (p, tx) = (t / tw, t % tw);
                let ty = (first_band + p) % hb;
                b.rows[v][l] = (h - T * ty).min(T) as u8;
                b.cols[v][l] = (w - T * tx).min(16) as u8;
                let rel = (bands.column(first_band + p) - col0) as isize;
                let txt = (T * tx) as isize;
                // Small: a block spans at most 48 bands of rows (`accepts` bounds W).
                b.inb[v][l] = (rel - wi + txt - 1) as i32;
                b.out[v][l] = (rel + txt) as i32;
                for i in 0..a {
                    let iy = (T * ty) as isize - 1 + i as isize;
                    for j in 0..a {
                        let ix = txt - 1 + j as isize;
                        if iy >= 0 && iy < hi && ix >= 0 && ix < wi {
                            b.masks[v][a * i + j] |= 1 << l;
                        }
                    }
                }
            }
            // Runs of tiles whose rows are consecutive in memory (the next tile of the same
            // band), within each group the output transposes together. A band's last tile
            // ends a run even where the next band's first output follows it in memory (images
            // narrower than a tile).
            let mut start = 0;
            for l in (0..16).filter(|&l| b.valid[v] >> l & 1 == 1) {
                let t = tb + 16 * v + l;
                if l % (16 / T) == 0
                    || t.is_multiple_of(tw)
                    || b.out[v][l] != b.out[v][l - 1] + T as i32
                {
                    start = l;
                }
                b.runs[v][start] += 1;
            }
            if row_tables(T, w) {
                b.loads[v] = row_loads(&b, v, tw);
            }
        }
        b
    }

    /// The loads of vector `v`'s tiles of 4 on images 8, 16 or 32 wide (bands of `tw` = 2, 4
    /// or 8 tiles): load `z` reads the 16 columns of lanes `4·z .. 4·z + 4` (8 columns of
    /// lanes `2·z .. 2·z + 2` on images 8 wide) from their band's row; a band past the range
    /// loads nothing. Blocks start on a band.
    fn row_loads(b: &Block, v: usize, tw: usize) -> [RowLoad; 8] {
        let mut loads = [RowLoad::default(); 8];
        // Pieces of 16 columns (8 on images 8 wide).
        let per = 4.min(tw);
        for (z, ld) in loads.iter_mut().enumerate().take(16 / per) {
            // The band's first lane, and the columns' offset in its row.
            let (l0, col) = (per * z - per * z % tw, 4 * (per * z % tw));
            if b.valid[v] >> l0 & 1 == 0 {
                continue;
            }
            // Patch row i lies in the image where its column 4·tx (j = 1) does; the band's
            // first patch starts at row −1, column −1.
            *ld = RowLoad {
                at: b.inb[v][l0] + 1 + col as i32,
                rows: (0..6)
                    .filter(|&i| b.masks[v][6 * i + 1] >> l0 & 1 == 1)
                    .fold(0u8, |m, i| m | 1 << i),
            };
        }
        loads
    }

    /// Patch values `d[6·i + j]` of vector `v`'s tiles of 4 on images `w` = 8, 16 or 32 wide
    /// (bands of `tw` = 2, 4 or 8 tiles), from whole input rows: per patch row `i`, the rows of
    /// the vector's bands are loaded side by side into a table of four vectors (tile `l`'s
    /// columns at `4·l .. 4·l + 4`: lanes 0–7 read the first two vectors, 8–15 the last two);
    /// columns `4·tx + r` (`j = r + 1`) are picked by permutes, and columns `4·tx − 1` and
    /// `4·tx + 4` (`j = 0, 5`) are those of the neighbouring tiles (0 at the band's ends,
    /// where the padding is). Measured faster than gathering the 36 vectors lane by lane
    /// (`ab_wino 64 15 C,C,W 0.28` and `... C,C,W 1`, one thread). Images 4 wide keep the
    /// gathers (a table of 16 rows of 4).
    #[target_feature(enable = "avx512f")]
    unsafe fn patch_tables(base: *const f32, b: &Block, v: usize, w: usize) -> [__m512; 36] {
        let tw = w / 4;
        let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let within = _mm512_slli_epi32::<2>(_mm512_and_si512(lane, _mm512_set1_epi32(7)));
        let prev = _mm512_sub_epi32(lane, _mm512_set1_epi32(1));
        let next = _mm512_add_epi32(lane, _mm512_set1_epi32(1));
        // Lanes with a tile before (after) them in their band.
        let (left, right) = match tw {
            8 => (0xFEFE, 0x7F7F),
            4 => (0xEEEE, 0x7777),
            _ => (0xAAAA, 0x5555),
        };
        // Row by row, each built whole (an array cleared first and then filled cost a
        // 2.3 KB clear of the stack per vector).
        let rows: [[__m512; 6]; 6] = std::array::from_fn(|i| {
            let t: [__m512; 4] = if w == 8 {
                std::array::from_fn(|z| {
                    let half = |p: usize| {
                        let ld = b.loads[v][p];
                        if ld.rows >> i & 1 == 1 {
                            _mm256_loadu_pd(base.offset(ld.at as isize + (w * i) as isize).cast())
                        } else {
                            _mm256_setzero_pd()
                        }
                    };
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                        _mm512_castpd256_pd512(half(2 * z)),
                        half(2 * z + 1),
                    ))
                })
            } else {
                std::array::from_fn(|z| {
                    let ld = b.loads[v][z];
                    if ld.rows >> i & 1 == 1 {
                        // Inside the image: row i − 1 of the band, 16 of its columns.
                        _mm512_loadu_ps(base.offset(ld.at as isize + (w * i) as isize))
                    } else {
                        _mm512_setzero_ps()
                    }
                })
            };
            let r: [__m512; 4] = std::array::from_fn(|k| {
                let idx = _mm512_add_epi32(within, _mm512_set1_epi32(k as i32));
                let lo = _mm512_permutex2var_ps(t[0], idx, t[1]);
                let hi = _mm512_permutex2var_ps(t[2], idx, t[3]);
                _mm512_mask_blend_ps(0xFF00, lo, hi)
            });
            [
                _mm512_maskz_permutexvar_ps(left, prev, r[3]),
                r[0],
                r[1],
                r[2],
                r[3],
                _mm512_maskz_permutexvar_ps(right, next, r[0]),
            ]
        });
        std::array::from_fn(|e| rows[e / 6][e % 6])
    }

    /// Patch values `d[A·i + j]` (`A = T + 2`) of vector `v`'s tiles, gathered lane by lane
    /// (0 in the padding) from `base` plus each lane's offset.
    #[target_feature(enable = "avx512f")]
    unsafe fn patch_gather<const T: usize>(
        base: *const f32,
        b: &Block,
        v: usize,
        w: usize,
    ) -> [__m512; 36] {
        let a = T + 2;
        let off = _mm512_loadu_si512(b.inb[v].as_ptr().cast());
        let mut d = [_mm512_setzero_ps(); 36];
        for i in 0..a {
            for j in 0..a {
                let idx = _mm512_add_epi32(off, _mm512_set1_epi32((i * w + j) as i32));
                d[a * i + j] = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    b.masks[v][a * i + j],
                    idx,
                    base,
                );
            }
        }
        d
    }

    /// Even positions of the 32 floats `lo, hi`.
    const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    /// Odd positions.
    const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    /// Patch values of vector `v`'s 16 consecutive tiles of one pair of rows (`W` a multiple
    /// of 32), by rows: input row `2·ty − 1 + i` read at columns `2·tx0 − 1 .. 2·tx0 + 33`.
    #[target_feature(enable = "avx512f")]
    unsafe fn patch_rows(xc: *const f32, b: &Block, v: usize, h: usize, w: usize) -> [__m512; 16] {
        let mut d = [_mm512_setzero_ps(); 16];
        if b.valid[v] == 0 {
            return d;
        }
        let (pair, tx0) = (b.band[v], b.tx0[v]);
        let ty = pair % (h / 2);
        let even = _mm512_loadu_si512(EVEN.as_ptr().cast());
        let odd = _mm512_loadu_si512(ODD.as_ptr().cast());
        for i in 0..4 {
            let iy = 2 * ty + i;
            if iy == 0 || iy > h {
                continue;
            }
            // Image row iy − 1 = 2·ty − 1 + i; the pair starts at row 2·ty (so `pair·2W ≥ W`
            // when i = 0 here).
            let at = xc.add(pair * 2 * w + i * w - w + 2 * tx0);
            let lo = _mm512_loadu_ps(at);
            let hi = _mm512_loadu_ps(at.add(16));
            let left = if tx0 > 0 { *at.sub(1) } else { 0.0 };
            let right = if 2 * tx0 + 32 < w { *at.add(32) } else { 0.0 };
            let ev = _mm512_permutex2var_ps(lo, even, hi);
            let od = _mm512_permutex2var_ps(lo, odd, hi);
            d[4 * i] = _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
                _mm512_castps_si512(od),
                _mm512_castps_si512(_mm512_set1_ps(left)),
            ));
            d[4 * i + 1] = ev;
            d[4 * i + 2] = od;
            d[4 * i + 3] = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(_mm512_set1_ps(right)),
                _mm512_castps_si512(ev),
            ));
        }
        d
    }

    /// One output row of a block: where it goes and the epilogue that it goes through.
    struct Out {
        /// The row at the block's first column.
        y: *mut f32,
        bias: __m512,
        /// The residual's row at the same column, if any.
        res: Option<*const f32>,
        relu: bool,
    }

    impl Out {
        /// `act(v + bias + res)`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn apply(&self, v: __m512, res: Option<__m512>) -> __m512 {
            let mut v = _mm512_add_ps(v, self.bias);
            if let Some(r) = res {
                v = _mm512_add_ps(v, r);
            }
            if self.relu {
                v = _mm512_max_ps(v, _mm512_setzero_ps());
            }
            v
        }
    }

    /// `a₀ c₀ a₁ c₁ …`: lanes 0–7 of `a` and `c` interleaved, then lanes 8–15 (the two
    /// columns of tiles of 2, one tile per lane, as each tile's pair of outputs).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn interleave(a: __m512, c: __m512) -> [__m512; 2] {
        const LO: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
        const HI: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
        [
            _mm512_permutex2var_ps(a, _mm512_loadu_si512(LO.as_ptr().cast()), c),
            _mm512_permutex2var_ps(a, _mm512_loadu_si512(HI.as_ptr().cast()), c),
        ]
    }

    /// Interleaves pairs of 16 outputs into the two output rows of vector `v`'s tiles.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_rows(out: &Out, b: &Block, v: usize, pair0: usize, w: usize, o: &[__m512; 4]) {
        if b.valid[v] == 0 {
            return;
        }
        let col = (b.band[v] - pair0) * 2 * w + 2 * b.tx0[v];
        for (row, (a, c)) in [(0, (o[0], o[1])), (w, (o[2], o[3]))] {
            for (half, pair) in [0, 16].into_iter().zip(interleave(a, c)) {
                let at = col + row + half;
                let res = out.res.map(|p| _mm512_loadu_ps(p.add(at)));
                let val = out.apply(pair, res);
                _mm512_storeu_ps(out.y.add(at), val);
            }
        }
    }

    /// Stores vector `v`'s outputs (`o[T·i + j]`: row `i`, column `j` of each lane's tile)
    /// through the epilogue. Each output row's values are first transposed tile-major (`T`
    /// values per tile, `16 / T` tiles per vector), so that each run of tiles consecutive in
    /// one band (`b.runs`, at most `16 / T` of them) is one masked vector store, its residual
    /// one masked load; rows and columns of tiles that reach past the image are left out of
    /// the masks. Scatters and gathers of single lanes cost
    /// several times as much (on Zen 4 a 16-lane scatter is microcoded).
    ///
    /// # Safety
    /// AVX-512F must be available; `out` and `b` as [`forward`] made them.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tiles<const T: usize>(
        out: &Out,
        b: &Block,
        v: usize,
        w: usize,
        o: &[__m512; 16],
    ) {
        if b.valid[v] == 0 {
            return;
        }
        // Tiles per transposed vector.
        let per = 16 / T;
        let mut g = [_mm512_setzero_ps(); 4];
        for i in 0..T {
            if T == 4 {
                // 4 × 4 transposes in each 128-bit lane, then of the lanes across vectors.
                let (o0, o1, o2, o3) = (o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
                let (t0, t1) = (_mm512_unpacklo_ps(o0, o1), _mm512_unpackhi_ps(o0, o1));
                let (t2, t3) = (_mm512_unpacklo_ps(o2, o3), _mm512_unpackhi_ps(o2, o3));
                let u0 = _mm512_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm512_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm512_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm512_shuffle_ps::<0xEE>(t1, t3);
                let a0 = _mm512_shuffle_f32x4::<0x44>(u0, u1);
                let a1 = _mm512_shuffle_f32x4::<0xEE>(u0, u1);
                let a2 = _mm512_shuffle_f32x4::<0x44>(u2, u3);
                let a3 = _mm512_shuffle_f32x4::<0xEE>(u2, u3);
                g[0] = _mm512_shuffle_f32x4::<0x88>(a0, a2);
                g[1] = _mm512_shuffle_f32x4::<0xDD>(a0, a2);
                g[2] = _mm512_shuffle_f32x4::<0x88>(a1, a3);
                g[3] = _mm512_shuffle_f32x4::<0xDD>(a1, a3);
            } else {
                [g[0], g[1]] = interleave(o[2 * i], o[2 * i + 1]);
            }
            for (k, &gk) in g.iter().enumerate().take(T) {
                let mut first = per * k;
                while first < per * (k + 1) {
                    // Valid tiles are the block's first ones: none after a lane without a run.
                    let run = usize::from(b.runs[v][first]);
                    if run == 0 {
                        break;
                    }
                    // A run's tiles share their band: the same rows inside the image.
                    if i < usize::from(b.rows[v][first]) {
                        // The run's lanes of `gk` inside the image, stored from the vector's
                        // start: a pointer only formed (wrapping), written and read through
                        // those lanes only.
                        let lane0 = (first - per * k) * T;
                        let width = (run * T).min(usize::from(b.cols[v][first]));
                        let m = ((1u32 << width) - 1) << lane0;
                        let at = (b.out[v][first] as isize + (i * w) as isize) - lane0 as isize;
                        let res = out
                            .res
                            .map(|p| _mm512_maskz_loadu_ps(m as u16, p.wrapping_offset(at)));
                        let val = out.apply(gk, res);
                        _mm512_mask_storeu_ps(out.y.wrapping_offset(at), m as u16, val);
                    }
                    first += run;
                }
            }
        }
    }

    /// Where a block's output rows go: `y` at `yp` (row `r0` first, rows `ldy` apart), the
    /// block's first column `ybase` past `c0`, its `nv` vectors of tiles stored by rows
    /// (`contiguous`, from band `band0` of images `w` wide) or tile by tile.
    struct Place {
        yp: *mut f32,
        r0: usize,
        ldy: usize,
        ybase: usize,
        c0: usize,
        nv: usize,
        contiguous: bool,
        band0: usize,
        w: usize,
    }

    /// The output transform of the row of `M` at `m` (its products `stride` floats apart)
    /// into output row `r`, through the epilogue.
    ///
    /// # Safety
    /// AVX-512F must be available; the pointers as [`forward`] lays them out.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn output_row<const T: usize>(
        at: &Place,
        block: &Block,
        epilogue: &Epilogue<'_>,
        r: usize,
        m: *const f32,
        stride: usize,
    ) {
        let out = Out {
            y: at.yp.add((r - at.r0) * at.ldy + at.ybase),
            bias: epilogue
                .bias
                .map_or(_mm512_setzero_ps(), |b| _mm512_set1_ps(b[r])),
            // The residual's row at the same column as `y`.
            res: epilogue
                .residual
                .map(|res| res.values.as_ptr().add(r * res.ld + at.c0 + at.ybase)),
            relu: epilogue.relu,
        };
        for v in 0..at.nv {
            let me = |e: usize| _mm512_loadu_ps(m.add(e * stride + v * 16));
            let o = if T == 2 {
                let o2 = output::<Avx512>(me);
                std::array::from_fn(|i| if i < 4 { o2[i] } else { _mm512_setzero_ps() })
            } else {
                output4::<Avx512>(me)
            };
            if at.contiguous {
                store_rows(&out, block, v, at.band0, at.w, &[o[0], o[1], o[2], o[3]]);
            } else {
                store_tiles::<T>(&out, block, v, at.w, &o);
            }
        }
    }

    /// Panel `q` of `U_e` times `V_e` (at `ve`) into `M` (`MR` rows of 48 at `m`), `nv`
    /// vectors of tiles: over all input channels, or the panel's class's.
    ///
    /// # Safety
    /// AVX-512F must be available; `ve` and `m` as [`forward`] lays them out.
    #[target_feature(enable = "avx512f")]
    unsafe fn products(k: &Winograd, q: usize, e: usize, ve: *const f32, m: *mut f32, nv: usize) {
        match &k.classes {
            None => {
                let np = k.cout.div_ceil(MR);
                let u = k.panels.as_ptr().add((e * np + q) * k.cin * MR);
                // Consecutive rows: the hardware prefetcher follows them.
                match nv {
                    1 => gemm::<1, 0, MR>(u, ve, 0..k.cin, |c| c, m),
                    2 => gemm::<2, 0, MR>(u, ve, 0..k.cin, |c| c, m),
                    _ => gemm::<3, 0, MR>(u, ve, 0..k.cin, |c| c, m),
                }
            }
            Some(cl) => {
                let p = &cl.panels[q];
                let u = k.panels.as_ptr().add(e * cl.per_e + p.u);
                let ch = &cl.chans[p.c0..p.c0 + p.len];
                let at = |j: usize| *ch.get_unchecked(j) as usize;
                match nv {
                    1 => class_gemm::<1>(p.rows, u, ve, 0..p.len, at, m),
                    2 => class_gemm::<2>(p.rows, u, ve, 0..p.len, at, m),
                    _ => class_gemm::<3>(p.rows, u, ve, 0..p.len, at, m),
                }
            }
        }
    }

    /// [`gemm`] of a class's panel on a register tile of its `rows` rows only (its other
    /// rows of `M` are left as they were: the output transform skips them).
    ///
    /// # Safety
    /// As [`gemm`]; `rows ≤ MR`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn class_gemm<const V: usize>(
        rows: usize,
        u: *const f32,
        v: *const f32,
        js: std::ops::Range<usize>,
        channel: impl Fn(usize) -> usize,
        m: *mut f32,
    ) {
        const PF: usize = PREFETCH;
        match rows {
            1 => gemm::<V, PF, 1>(u, v, js, channel, m),
            2 => gemm::<V, PF, 2>(u, v, js, channel, m),
            3 => gemm::<V, PF, 3>(u, v, js, channel, m),
            4 => gemm::<V, PF, 4>(u, v, js, channel, m),
            5 => gemm::<V, PF, 5>(u, v, js, channel, m),
            6 => gemm::<V, PF, 6>(u, v, js, channel, m),
            7 => gemm::<V, PF, 7>(u, v, js, channel, m),
            _ => gemm::<V, PF, MR>(u, v, js, channel, m),
        }
    }

    /// The first `R` rows of one panel of `U_e` (`len × MR` for the channels `channel(j)`,
    /// `j` in `0 .. len`, at `u`) times those rows of `V_e` (`cin × 48`, at `v`, `V·16` lanes
    /// used) into the first `R` rows of `M` (`MR` rows of 48 at `m`), asking for the row of
    /// `V_e` `PF` channels ahead (none if 0).
    ///
    /// # Safety
    /// AVX-512F must be available; `channel` must return rows of `V_e`; `R ≤ MR`.
    #[target_feature(enable = "avx512f")]
    unsafe fn gemm<const V: usize, const PF: usize, const R: usize>(
        u: *const f32,
        v: *const f32,
        js: std::ops::Range<usize>,
        channel: impl Fn(usize) -> usize,
        m: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let end = js.end;
        for j in js {
            // A class's channel rows lie at irregular strides, which the hardware prefetcher
            // does not follow: ask for the row `PF` channels ahead (`PREFETCH` measured 4–5%
            // faster on sparse 64- to 256-channel layers, `ab_wino 64 20 C,C,W 0.28`, one
            // thread); 0 asks for none.
            if PF > 0 && j + PF < end {
                let vn = v.add(channel(j + PF) * TB);
                for l in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(vn.add(16 * l).cast());
                }
            }
            let vc = v.add(channel(j) * TB);
            let mut xv = [_mm512_setzero_ps(); V];
            for (l, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(vc.add(16 * l));
            }
            rank1::<Avx512, R, V>(&mut acc, u.add(j * MR), &xv);
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, &val) in a.iter().enumerate() {
                _mm512_storeu_ps(m.add(i * TB + 16 * j), val);
            }
        }
    }
}

/// The fused AVX2 kernel: the AVX-512 kernel's scheme (module `fused`) on vectors of 8 lanes.
/// Tiles of `T × T` outputs (2 or 4) are taken in blocks of 16 (two vectors, one tile per
/// lane); per block the input transform writes `V_e` (`cin × 16` per `e`) to a per-thread
/// buffer, the products run on a `6 × 16` register tile (`U_e`'s panel rows broadcast, `V_e`'s
/// tiles loaded) into `M_e`, and the output transform reads `M` back. Patches are gathered
/// lane by lane (masked where they reach the padding); outputs are transposed so that each
/// tile's row of `T` outputs is one 128-bit (or 64-bit) store through the epilogue.
#[cfg(target_arch = "x86_64")]
mod fused8 {
    use std::arch::x86_64::*;

    use super::fused::Bands;
    use super::transforms::{input, input4, output, output4};
    use super::{Winograd, AVX2_ROWS as MR};
    use crate::conv::ConvDims;
    use crate::engine::Epilogue;
    use crate::simd::Avx2;

    /// Vectors of a block.
    const NV: usize = 2;
    /// Tiles of a block.
    const TB: usize = NV * 8;

    thread_local! {
        /// Per-thread `V` and `M` of a block (taken out of the slot for a call).
        static BUFS: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// Where the lanes of one block read and write.
    struct Block {
        /// Per vector: patch top-left (input row `−1`, column `−1` of the tile) and output
        /// position of each lane, relative to the block's first band of rows.
        inb: [[i32; 8]; NV],
        out: [[i32; 8]; NV],
        /// Per vector and patch position `A·i + j`: −1 in lanes whose input lies in the image
        /// (a gather's mask), 0 elsewhere.
        masks: [[[i32; 8]; 36]; NV],
        /// Per vector: lanes that are tiles of the range.
        valid: [u8; NV],
        /// Per vector and lane: output rows and columns of the tile inside the image (`T` but
        /// in the last band and the last tile of a band where `T` does not divide the sizes).
        rows: [[u8; 8]; NV],
        cols: [[u8; 8]; NV],
        /// Whether every tile lies inside its image (`T` divides the sizes): stores then skip
        /// the per-tile checks.
        whole: bool,
    }

    /// See [`super::fused::forward`]; AVX2 and FMA instead of AVX-512F.
    ///
    /// # Safety
    /// AVX2 and FMA must be available and the sizes checked as [`Winograd::forward_into`]
    /// does; `k.panels` holds the products of tiles of `T` in panels of `MR` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward<const T: usize>(
        k: &Winograd,
        x: &[f32],
        d: &ConvDims,
        (c0, c1): (usize, usize),
        (r0, r1): (usize, usize),
        (yp, ldy): (*mut f32, usize),
        epilogue: Epilogue<'_>,
    ) {
        let a = T + 2;
        let es = a * a;
        let (h, w, cin) = (d.h, d.w, k.cin);
        let ld = d.n();
        // Bands of `T` output rows, `tw` tiles each (the last band of an image and the last
        // tile of a band reaching past it where `T` does not divide its sizes: ranges are then
        // whole images).
        let bands = Bands { h, w, t: T };
        let tw = w.div_ceil(T);
        let first_band = bands.index(c0);
        let nt = (bands.index(c1) - first_band) * tw;
        let (q0, q1) = (r0 / MR, r1.div_ceil(MR));
        let np_all = k.cout.div_ceil(MR);
        let rows_pad = (q1 - q0) * MR;
        // `V_e` planes a cache line past `cin · TB` apart (see `fused`).
        let vs = cin * TB + 16;
        let (mut vbuf, mut mbuf) = BUFS.take();
        if vbuf.len() < es * vs {
            vbuf.resize(es * vs, 0.0);
        }
        if mbuf.len() < es * rows_pad * TB {
            mbuf.resize(es * rows_pad * TB, 0.0);
        }
        let (vp, mp) = (vbuf.as_mut_ptr(), mbuf.as_mut_ptr());
        let mut tb = 0;
        while tb < nt {
            let nb = TB.min(nt - tb);
            let nv = nb.div_ceil(8);
            let block = block::<T>(tb, nt, first_band, &bands);
            let band0 = first_band + tb / tw;
            // Input transform: V_e[c][lane].
            for c in 0..cin {
                // The block's first band: lanes add their offsets to it (a pointer only
                // formed, read through valid lanes only).
                let base = x.as_ptr().add(c * ld).wrapping_add(bands.column(band0));
                for v in 0..nv {
                    let at = vp.add(c * TB + v * 8);
                    let d = patch_gather::<T>(base, &block, v, w);
                    if T == 2 {
                        input::<Avx2>(&std::array::from_fn(|i| d[i]), at, vs);
                    } else {
                        input4::<Avx2>(&d, at, vs);
                    }
                }
            }
            // The products, e outer: V_e stays in L1 over the panels.
            for e in 0..es {
                let ve = vp.add(e * vs);
                for q in q0..q1 {
                    let u = k.panels.as_ptr().add((e * np_all + q) * cin * MR);
                    let m = mp.add((e * rows_pad + (q - q0) * MR) * TB);
                    if nv == 1 {
                        gemm::<1>(u, ve, cin, m);
                    } else {
                        gemm::<2>(u, ve, cin, m);
                    }
                }
            }
            // Output transform, through the epilogue out to the block's columns of each row.
            let ybase = bands.column(band0) - c0;
            for r in 0..r1 - r0 {
                let out = Out {
                    y: yp.add(r * ldy + ybase),
                    bias: epilogue.bias.map_or(0.0, |b| b[r0 + r]),
                    res: epilogue
                        .residual
                        .map(|res| res.values.as_ptr().add((r0 + r) * res.ld + c0 + ybase)),
                    relu: epilogue.relu,
                };
                for v in 0..nv {
                    let m = |e: usize| _mm256_loadu_ps(mp.add((e * rows_pad + r) * TB + v * 8));
                    if T == 2 {
                        let o2 = output::<Avx2>(m);
                        let o =
                            std::array::from_fn(
                                |i| if i < 4 { o2[i] } else { _mm256_setzero_ps() },
                            );
                        store_tiles::<2>(&out, &block, v, w, &o);
                    } else {
                        store_tiles::<4>(&out, &block, v, w, &output4::<Avx2>(m));
                    }
                }
            }
            tb += nb;
        }
        BUFS.set((vbuf, mbuf));
    }

    /// The lanes of the block of tiles `tb ..` (of `nt`, the range's first band `first_band`)
    /// of the images `bands` cuts.
    fn block<const T: usize>(tb: usize, nt: usize, first_band: usize, bands: &Bands) -> Block {
        let a = T + 2;
        let mut b = Block {
            inb: [[0; 8]; NV],
            out: [[0; 8]; NV],
            masks: [[[0; 8]; 36]; NV],
            valid: [0; NV],
            rows: [[0; 8]; NV],
            cols: [[0; 8]; NV],
            whole: bands.h.is_multiple_of(T) && bands.w.is_multiple_of(T),
        };
        let (h, w) = (bands.h, bands.w);
        let (tw, hb) = (w.div_ceil(T), h.div_ceil(T));
        let col0 = bands.column(first_band + tb / tw);
        let (hi, wi) = (h as isize, w as isize);
        for v in 0..NV {
            for l in 0..8 {
                let t = tb + 8 * v + l;
                if t >= nt {
                    continue;
                }
                b.valid[v] |= 1 << l;
                let (p, tx) = (t / tw, t % tw);
                let ty = (first_band + p) % hb;
                b.rows[v][l] = (h - T * ty).min(T) as u8;
                b.cols[v][l] = (w - T * tx).min(T) as u8;
                let rel = (bands.column(first_band + p) - col0) as isize;
                let txt = (T * tx) as isize;
                // Small: a block spans at most 16 bands of rows (`accepts` bounds W).
                b.inb[v][l] = (rel - wi + txt - 1) as i32;
                b.out[v][l] = (rel + txt) as i32;
                for i in 0..a {
                    let iy = (T * ty) as isize - 1 + i as isize;
                    for j in 0..a {
                        let ix = txt - 1 + j as isize;
                        if iy >= 0 && iy < hi && ix >= 0 && ix < wi {
                            b.masks[v][a * i + j][l] = -1;
                        }
                    }
                }
            }
        }
        b
    }

    /// Patch values `d[A·i + j]` (`A = T + 2`) of vector `v`'s tiles, gathered lane by lane
    /// (0 in the padding) from `base` plus each lane's offset.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn patch_gather<const T: usize>(
        base: *const f32,
        b: &Block,
        v: usize,
        w: usize,
    ) -> [__m256; 36] {
        let a = T + 2;
        let off = _mm256_loadu_si256(b.inb[v].as_ptr().cast());
        let mut d = [_mm256_setzero_ps(); 36];
        for i in 0..a {
            for j in 0..a {
                let e = a * i + j;
                let idx = _mm256_add_epi32(off, _mm256_set1_epi32((i * w + j) as i32));
                let mask = _mm256_loadu_ps(b.masks[v][e].as_ptr().cast());
                d[e] = _mm256_mask_i32gather_ps::<4>(_mm256_setzero_ps(), base, idx, mask);
            }
        }
        d
    }

    /// One output row of a block: where it goes and the epilogue that it goes through.
    struct Out {
        /// The row at the block's first column.
        y: *mut f32,
        bias: f32,
        /// The residual's row at the same column, if any.
        res: Option<*const f32>,
        relu: bool,
    }

    /// The outputs `o[T·i + j]` (row `i`, column `j` of each lane's tile) of vector `v`'s
    /// tiles, stored a tile row at a time (`T` values) through the epilogue.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_tiles<const T: usize>(
        out: &Out,
        b: &Block,
        v: usize,
        w: usize,
        o: &[__m256; 16],
    ) {
        let bias = _mm_set1_ps(out.bias);
        let lanes = _mm_setr_epi32(0, 1, 2, 3);
        // One tile row (T ≤ 4 values in the low lanes of `val`) to `at`, its first `n` values
        // (those inside the image).
        let put = |at: usize, val: __m128, n: usize| {
            let mut val = _mm_add_ps(val, bias);
            let whole = n == T;
            let mask = _mm_cmpgt_epi32(_mm_set1_epi32(n as i32), lanes);
            if let Some(p) = out.res {
                let r = if whole && T == 4 {
                    _mm_loadu_ps(p.add(at))
                } else if whole {
                    _mm_castsi128_ps(_mm_loadl_epi64(p.add(at).cast()))
                } else {
                    _mm_maskload_ps(p.add(at), mask)
                };
                val = _mm_add_ps(val, r);
            }
            if out.relu {
                val = _mm_max_ps(val, _mm_setzero_ps());
            }
            if whole && T == 4 {
                _mm_storeu_ps(out.y.add(at), val);
            } else if whole {
                _mm_storel_epi64(out.y.add(at).cast(), _mm_castps_si128(val));
            } else {
                _mm_maskstore_ps(out.y.add(at), mask, val);
            }
        };
        let valid = b.valid[v];
        for i in 0..T {
            // Tile l's row i: 128-bit half l / 4 of vector l % 4 (T = 4), or 64-bit quarter
            // of one (T = 2), after the transpose.
            let mut rows = [_mm_setzero_ps(); 8];
            if T == 4 {
                let (p, q, r, s) = (o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
                let (t0, t1) = (_mm256_unpacklo_ps(p, q), _mm256_unpackhi_ps(p, q));
                let (t2, t3) = (_mm256_unpacklo_ps(r, s), _mm256_unpackhi_ps(r, s));
                let u = [
                    _mm256_shuffle_ps::<0x44>(t0, t2),
                    _mm256_shuffle_ps::<0xEE>(t0, t2),
                    _mm256_shuffle_ps::<0x44>(t1, t3),
                    _mm256_shuffle_ps::<0xEE>(t1, t3),
                ];
                for (l, &ul) in u.iter().enumerate() {
                    rows[l] = _mm256_castps256_ps128(ul);
                    rows[l + 4] = _mm256_extractf128_ps::<1>(ul);
                }
            } else {
                let (p, q) = (o[2 * i], o[2 * i + 1]);
                let (lo, hi) = (_mm256_unpacklo_ps(p, q), _mm256_unpackhi_ps(p, q));
                for (l0, u) in [(0, lo), (2, hi)] {
                    let (x0, x1) = (_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u));
                    rows[l0] = x0;
                    rows[l0 + 1] = _mm_movehl_ps(x0, x0);
                    rows[l0 + 4] = x1;
                    rows[l0 + 5] = _mm_movehl_ps(x1, x1);
                }
            }
            for (l, &row) in rows.iter().enumerate() {
                if valid & (1 << l) == 0 {
                    continue;
                }
                if b.whole {
                    put(b.out[v][l] as usize + i * w, row, T);
                } else if i < usize::from(b.rows[v][l]) {
                    put(b.out[v][l] as usize + i * w, row, usize::from(b.cols[v][l]));
                }
            }
        }
    }

    /// One panel of `U_e` (`cin × MR`, at `u`) times `V_e` (`cin × 16`, at `v`, `V·8` lanes
    /// used) into `M` (`MR` rows of 16 at `m`).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemm<const V: usize>(u: *const f32, v: *const f32, cin: usize, m: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); V]; MR];
        for c in 0..cin {
            let vc = v.add(c * TB);
            let mut xv = [_mm256_setzero_ps(); V];
            for (j, x) in xv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(vc.add(8 * j));
            }
            let uc = u.add(c * MR);
            for (i, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*uc.add(i));
                for (aj, &xj) in a.iter_mut().zip(&xv) {
                    *aj = _mm256_fmadd_ps(wv, xj, *aj);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, &val) in a.iter().enumerate() {
                _mm256_storeu_ps(m.add(i * TB + 8 * j), val);
            }
        }
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

    /// Uniform values in [−0.5, 0.5) from `seed` (a linear congruential generator).
    fn values(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    #[test]
    fn matches_im2col_times_the_weight() {
        let mut rnd = values(5);
        let g = Winograd::geometry();
        for &(cout, cin, b, h, w) in &[
            (8, 3, 2, 4, 4),
            (9, 70, 3, 6, 8),
            (17, 5, 1, 2, 2),
            (16, 64, 2, 8, 8),
            (3, 2, 4, 2, 34),
            // Pairs of rows of 16 and 32 tiles: the contiguous loads and stores, blocks
            // of 48 tiles across pairs and images, a last block of one vector.
            (20, 7, 2, 4, 32),
            (8, 3, 3, 2, 64),
            (9, 5, 1, 6, 32),
            // Tiles of 4: bands of rows across images, 8×8 and 4×4 images.
            (16, 64, 2, 8, 8),
            (12, 9, 3, 4, 4),
            (8, 3, 1, 12, 16),
            // Runs of 1, 2 and 4 tiles consecutive in a band (3, 6 and 12 tiles per band).
            (5, 4, 2, 4, 12),
            (7, 6, 2, 8, 24),
            // Sizes the tiles do not divide (fused kernels): the last band and the last tile of
            // each band reach past the image; ranges of whole images.
            (8, 3, 2, 14, 14),
            (5, 4, 3, 10, 6),
            (7, 6, 2, 7, 9),
            (9, 5, 2, 5, 5),
            (4, 3, 3, 1, 1),
            (6, 2, 2, 3, 13),
            (16, 32, 2, 6, 22),
            (3, 2, 1, 18, 70),
            (17, 24, 3, 2, 2),
            // Tiles of 4 from whole rows (W dividing 32): several blocks, the last vector
            // partly past the range, heights 4 does not divide.
            (6, 5, 3, 12, 32),
            (5, 3, 50, 4, 4),
            (4, 3, 5, 10, 8),
            (7, 2, 3, 6, 16),
            // Channels whose transformed patches exceed L2 (F(4×4) past 151, F(2×2) past
            // 341).
            (9, 160, 2, 4, 8),
            (8, 350, 1, 4, 4),
        ] {
            let wv: Vec<f32> = (0..cout * cin * 9).map(|_| rnd()).collect();
            check_shape((cout, cin, b, h, w), &wv, &mut rnd, false);
        }
        assert!(Winograd::with_tile(g, 2, 2, &[0.0; 36], 3).is_err());
        let odd = ConvDims::new(&[2, 1, 3, 4], g).unwrap();
        let wg = Winograd::new(g, 2, 2, &[0.0; 36]).unwrap().unwrap();
        assert_eq!(
            wg.accepts(&odd),
            wg.is_fused(),
            "odd sizes on the fused kernels"
        );
        assert_eq!(wg.column_unit(3, 4), 12);
        assert_eq!(wg.column_unit(4, 6), 12);
        assert!(
            Winograd::new(ConvGeometry::square(3, 2, 1), 2, 2, &[0.0; 36])
                .unwrap()
                .is_none()
        );
        assert!(Winograd::new(g, 2, 2, &[0.0; 35]).is_err());
    }

    #[test]
    fn a_class_shares_its_rows_evenly_among_its_panels() {
        // Rows 0..33 read channel 0, rows 33..36 channel 1: classes of 33 and 3 rows.
        let (cout, cin) = (36, 4);
        let mut wv = vec![0.0f32; cout * cin * 9];
        for m in 0..cout {
            wv[(m * cin + usize::from(m >= 33)) * 9 + 4] = 1.0;
        }
        let cl = Classes::of(cout, cin, &wv, 8).unwrap();
        let rows: Vec<usize> = cl.panels.iter().map(|p| p.rows).collect();
        assert_eq!(rows, [7, 7, 7, 6, 6, 3]);
        // Each panel's rows in its first slots, the rest padding; every row once.
        let mut seen = Vec::new();
        for (q, p) in cl.panels.iter().enumerate() {
            let slots = &cl.slot_rows[q * 8..(q + 1) * 8];
            assert!(slots[..p.rows].iter().all(|&r| r != u32::MAX));
            assert!(slots[p.rows..].iter().all(|&r| r == u32::MAX));
            assert_eq!((p.lo, p.hi), (slots[0], slots[p.rows - 1]));
            seen.extend_from_slice(&slots[..p.rows]);
        }
        assert_eq!(seen, (0..cout as u32).collect::<Vec<_>>());
    }

    #[test]
    fn sparse_weights_run_their_row_classes() {
        let mut rnd = values(11);
        // (cout, cin, b, h, w, classes): rows in classes of random channel subsets (about a
        // quarter of the channels each), a share of rows empty (all-zero, bias only) and of
        // taps zero inside kept kernels; classes of more and fewer than one panel of rows,
        // channels no class reads, sizes the tiles do not divide.
        for &(cout, cin, b, h, w, nclass) in &[
            (20, 16, 2, 8, 8, 3),
            (9, 12, 1, 6, 10, 2),
            (33, 40, 2, 4, 4, 4),
            (24, 64, 1, 14, 14, 3),
            (17, 24, 3, 2, 2, 5),
            (48, 32, 2, 8, 32, 2),
            (40, 200, 1, 4, 4, 3),
            (20, 360, 1, 2, 6, 2),
        ] {
            let subsets: Vec<Vec<bool>> = (0..nclass)
                .map(|_| (0..cin).map(|_| rnd() < -0.25).collect())
                .collect();
            let mut wv = vec![0.0f32; cout * cin * 9];
            for m in 0..cout {
                // About one row in eight stays empty.
                let pick = ((rnd() + 0.5) * (nclass as f32 + 1.0 / 7.0)) as usize;
                let Some(set) = subsets.get(pick) else {
                    continue;
                };
                for (c, _) in set.iter().enumerate().filter(|(_, &on)| on) {
                    for t in 0..9 {
                        wv[(m * cin + c) * 9 + t] = if rnd() < -0.4 { 0.0 } else { rnd() };
                    }
                }
            }
            check_shape((cout, cin, b, h, w), &wv, &mut rnd, true);
        }
        // A weight whose rows all differ runs dense panels.
        let (cout, cin) = (16, 16);
        let wv: Vec<f32> = (0..cout * cin * 9)
            .map(|i| {
                if (i / 9) % cin == (i / 9) / cin {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let k = Winograd::sparse_with_tile(Winograd::geometry(), cout, cin, &wv, 2)
            .unwrap()
            .unwrap();
        assert!(!k.is_sparse());
        // An all-zero weight: one class of no channels, outputs the bias alone.
        let x = vec![1.0f32; 3 * 2 * 4 * 4];
        let d = ConvDims::new(&[3, 2, 4, 4], Winograd::geometry()).unwrap();
        for tile in [2, 4] {
            let k = Winograd::sparse_with_tile(Winograd::geometry(), 5, 3, &[0.0; 135], tile)
                .unwrap()
                .unwrap();
            assert_eq!(k.is_sparse(), k.is_fused() && k.isa == Isa::Avx512);
            let mut y = vec![f32::NAN; 5 * 32];
            k.forward_rows(&x, &d, 0, 32, 0, 5, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "tile {tile}");
        }
    }

    /// Runs the kernels of weight `wv` on a random batch of `(cout, cin, b, h, w)` against
    /// im2col times the weight: row and column ranges, the epilogue, malformed calls.
    /// `sparse`: the weight must run on its row classes where the CPU has AVX-512.
    fn check_shape(
        (cout, cin, b, h, w): (usize, usize, usize, usize, usize),
        wv: &[f32],
        rnd: &mut impl FnMut() -> f32,
        sparse: bool,
    ) {
        let g = Winograd::geometry();
        let d = ConvDims::new(&[cin, b, h, w], g).unwrap();
        let k = cin * 9;
        let x: Vec<f32> = (0..cin * b * h * w).map(|_| rnd()).collect();
        let n = d.n();
        let mut col = vec![0.0; k * n];
        d.im2col_range(&x, 0, n, &mut col).unwrap();
        let want = reference::forward(wv, cout, k, &col, n);
        for tile in [2, 4] {
            let wg = if sparse {
                Winograd::sparse_with_tile(g, cout, cin, wv, tile)
            } else {
                Winograd::with_tile(g, cout, cin, wv, tile)
            };
            let wg = wg.unwrap().unwrap();
            let exact = h % wg.tile() == 0 && w % wg.tile() == 0;
            let avx512 = wg.is_fused() && wg.isa == Isa::Avx512;
            assert_eq!(wg.is_sparse(), sparse && avx512, "row classes, tile {tile}");
            assert_eq!(
                wg.accepts(&d),
                exact || wg.is_fused(),
                "[{h}, {w}] tile {tile}"
            );
            if !wg.accepts(&d) {
                continue;
            }
            let a = wg.row_align();
            // F(4×4) rounds some ten times more.
            let tol = if wg.tile() == 4 { 1e-3 } else { 1e-4 };
            let t = wg.tile();
            let unit = wg.column_unit(h, w);
            let pairs = n / unit;
            for (p0, p1) in [(0, pairs), (1, pairs), (0, pairs / 2), (pairs, pairs)] {
                let (c0, c1) = (p0 * unit, p1 * unit);
                for (r0, r1) in [(0, cout), (a.min(cout) / a * a, cout), (0, cout / 2)] {
                    let nc = c1 - c0;
                    let mut y = vec![f32::NAN; (r1 - r0) * nc];
                    wg.forward_rows(&x, &d, c0, c1, r0, r1, &mut y).unwrap();
                    for r in r0..r1 {
                        for j in 0..nc {
                            let (got, e) = (y[(r - r0) * nc + j], want[r * n + c0 + j]);
                            assert!(
                        (got - e).abs() <= tol * (1.0 + e.abs()),
                        "tile {t} [{cout},{cin},{b},{h},{w}] cols {c0}..{c1} rows {r0}..{r1} ({r}, {j}): {got} vs {e}"
                    );
                        }
                    }
                }
            }
            // Through the epilogue: bias, residual and ReLU, into rows `ldy` apart.
            let bias: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let res: Vec<f32> = (0..cout * n).map(|_| rnd()).collect();
            let ldy = n + 3;
            let mut y = vec![f32::NAN; cout * ldy];
            let epilogue = Epilogue {
                bias: Some(&bias),
                residual: Some(crate::engine::Residual {
                    values: &res,
                    ld: n,
                }),
                relu: true,
            };
            // SAFETY: `y` holds `cout` rows of `ldy ≥ n` values.
            unsafe { wg.forward_into(&x, &d, (0, n), (0, cout), y.as_mut_ptr(), ldy, epilogue) }
                .unwrap();
            for r in 0..cout {
                for j in 0..n {
                    let e = (want[r * n + j] + bias[r] + res[r * n + j]).max(0.0);
                    let got = y[r * ldy + j];
                    assert!(
                        (got - e).abs() <= tol * (1.0 + e.abs()),
                        "epilogue, tile {t} [{cout},{cin},{b},{h},{w}] ({r}, {j}): {got} vs {e}"
                    );
                }
            }
            let mut y = vec![0.0; cout * n];
            assert!(wg.forward_rows(&x, &d, 1, n, 0, cout, &mut y).is_err());
            assert!(wg.forward_rows(&x, &d, 0, n, 1, cout, &mut y).is_err());
            assert!(wg.forward_rows(&x[1..], &d, 0, n, 0, cout, &mut y).is_err());
        }
    }
}
