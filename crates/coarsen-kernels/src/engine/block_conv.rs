//! Implicit-GEMM convolution over dense blocks: group blocks, shuffled blocks and BSR of a
//! convolution weight, run on the input in place as [`DirectConv`](super::DirectConv) runs a
//! dense one, instead of through a materialised im2col.
//!
//! A block's rows share its columns, and a column of the im2col matrix is one (channel, tap)
//! pair: a shifted view of one input channel. So a block is a small dense implicit GEMM: its
//! columns sorted tap-major (runs of columns that read one tap, hence share one lane mask),
//! its values packed in panels of `MR` rows, and each tile of `NR` output positions accumulated
//! in registers over the block's columns from the tile's halo of input rows (copied once per
//! tile and read by every block). The rows of different blocks are disjoint, so each block
//! writes its rows of the output once, through the epilogue.

use super::blocks::packed_parts;
use super::copy_floats;
use super::direct::{accepts, check_call, in_place_geometry, Epilogue};
use super::direct::{halo_start, tap_place, SplitRows, Taps, MAX_TAPS, MR, NR, NV};
use crate::conv::{ConvDims, ConvGeometry};
use crate::error::{check_len, KernelError, Result};
use crate::formats::Packed;
use crate::simd::Isa;

/// One dense block, packed for the kernel.
#[derive(Clone, Debug)]
struct ConvBlock {
    /// Output rows, at most `cout`.
    rows: Vec<u32>,
    /// Runs `(tap, k0, k1)` of the block's columns `k0 .. k1` that read one tap.
    runs: Vec<(u32, u32, u32)>,
    /// The input channel of every column, in the runs' order.
    chans: Vec<u32>,
    /// The tap of every column, in the runs' order.
    taps: Vec<u8>,
    /// The im2col row (`channel·taps + tap`) of every column, in the runs' order.
    ids: Vec<u32>,
    /// `ceil(rows/MR)` panels of `columns × MR` values (rows past the block's zero).
    panels: Vec<f32>,
    /// The panels in bfloat16 for the bfloat16 kernel (see [`BlockConv::set_bf16`]), empty
    /// until it is asked for: per panel `⌈columns/2⌉` pairs of columns, each `MR` words of
    /// two values (the pair's first column in the low half; a last, odd column paired with 0).
    pairs: Vec<u32>,
    /// Whether its rows are of the second output (a fused 1×1 stride-2 convolution's, see
    /// [`BlockConv::fuse_strided_1x1`]).
    second: bool,
}

impl ConvBlock {
    /// Multiply-adds per output position (padded rows included).
    fn work(&self) -> usize {
        self.rows.len().div_ceil(MR) * MR * self.chans.len().max(1)
    }
}

/// A convolution weight in dense blocks (group blocks, shuffled blocks or BSR), packed for the
/// implicit-GEMM kernel (AVX-512, or AVX2 and FMA; the geometries
/// [`DirectConv`](super::DirectConv) runs).
///
/// ```
/// use coarsen_core::Mask;
/// use coarsen_kernels::conv::{ConvDims, ConvGeometry};
/// use coarsen_kernels::{BlockConv, GroupBlocks, Packed};
///
/// // 4 output channels of a 3×3 convolution of 2 channels; rows 0–1 read channel 0 only.
/// let g = ConvGeometry::square(3, 1, 1);
/// let mask = Mask::from_fn(4, 18, |r, c| r >= 2 || c < 9);
/// let w = vec![1.0f32; 4 * 18];
/// let packed = Packed::Group(GroupBlocks::pack(&mask, &w)?);
/// if let Some(k) = BlockConv::new(g, 2, &packed, None)? {
///     let d = ConvDims::new(&[2, 1, 4, 4], g)?;
///     let x = vec![1.0f32; 2 * 16];
///     let mut y = vec![0.0f32; 4 * 16];
///     k.forward(&x, &d, 0, 16, &mut y)?;
///     // The centre position (1, 1) sees all 9 taps of each channel it reads.
///     assert_eq!((y[5], y[2 * 16 + 5]), (9.0, 18.0));
/// }
/// # Ok::<(), coarsen_kernels::KernelError>(())
/// ```
#[derive(Clone, Debug)]
pub struct BlockConv {
    /// Output channels of the second output of a fused kernel (0 otherwise).
    cout2: usize,
    cout: usize,
    cin: usize,
    g: ConvGeometry,
    /// Whether the in-place kernel runs the geometry (the narrow one runs every geometry).
    in_place: bool,
    /// The kernels' instruction set: AVX-512 (in-place and narrow kernels) or AVX2 (the
    /// in-place kernel only).
    isa: Isa,
    /// Every output row in exactly one block (rows no block of the format writes form one
    /// block without columns, whose output is the epilogue of 0).
    blocks: Vec<ConvBlock>,
    /// Whether the AVX2 kernel runs the geometries it can on padded halos (see
    /// [`set_padded_halos`](Self::set_padded_halos)).
    padded: bool,
    /// Whether the in-place kernel multiplies in bfloat16 (see [`set_bf16`](Self::set_bf16)).
    bf16: bool,
}

impl BlockConv {
    /// Packs the blocks of `packed` (group blocks, shuffled blocks or BSR), a convolution
    /// weight of geometry `g` over `cin` input channels whose matrix columns are the im2col
    /// rows `read` (all `cin·kh·kw` of them, in order, when `None`). `None` when this CPU lacks
    /// AVX-512 and AVX2 or the format has no dense blocks. Geometries the in-place kernel does
    /// not run ([`in_place`](Self::in_place)) run on the narrow kernel only, which needs
    /// AVX-512 (with AVX2 such geometries get `None`).
    pub fn new(
        g: ConvGeometry,
        cin: usize,
        packed: &Packed,
        read: Option<&[u32]>,
    ) -> Result<Option<Self>> {
        let isa = Isa::detect();
        let in_place = in_place_geometry(&g);
        // AVX2 has the in-place kernel only.
        if !cfg!(target_arch = "x86_64") || !(isa == Isa::Avx512 || (isa == Isa::Avx2 && in_place))
        {
            return Ok(None);
        }
        let Some(parts) = packed_parts(packed) else {
            return Ok(None);
        };
        let taps = g.taps();
        let (cout, cols) = packed.shape();
        let kk = cin.checked_mul(taps).ok_or_else(|| KernelError::Param {
            name: "cin",
            value: cin.to_string(),
            reason: format!("{cin} channels × {taps} taps overflow usize"),
        })?;
        let want = read.map_or(kk, <[u32]>::len);
        if cols != want {
            return Err(KernelError::Param {
                name: "packed",
                value: format!("{cout} × {cols}"),
                reason: format!(
                    "a convolution of {cin} channels and {taps} taps reading {want} im2col rows \
                     needs {want} columns"
                ),
            });
        }
        if let Some(&bad) = read.and_then(|r| r.iter().find(|&&c| c as usize >= kk)) {
            return Err(KernelError::Param {
                name: "read",
                value: bad.to_string(),
                reason: format!("im2col rows of {cin} channels × {taps} taps are below {kk}"),
            });
        }
        let values = packed.values();
        let mut covered = vec![false; cout];
        let mut blocks = Vec::with_capacity(parts.len() + 1);
        for (rows, cols, map) in parts {
            if rows.is_empty() {
                continue;
            }
            rows.iter().for_each(|&r| covered[r as usize] = true);
            // The block's columns as (tap, channel, position in the block), tap-major.
            let mut order: Vec<(u32, u32, usize)> = cols
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    let row = read.map_or(c, |r| r[c as usize]) as usize;
                    ((row % taps) as u32, (row / taps) as u32, j)
                })
                .collect();
            order.sort_unstable();
            let mut runs: Vec<(u32, u32, u32)> = Vec::new();
            for (k, &(tap, _, _)) in order.iter().enumerate() {
                match runs.last_mut() {
                    Some(run) if run.0 == tap => run.2 += 1,
                    _ => runs.push((tap, k as u32, k as u32 + 1)),
                }
            }
            let nc = cols.len();
            let mut panels = vec![0.0f32; rows.len().div_ceil(MR) * MR * nc];
            for i in 0..rows.len() {
                let panel = &mut panels[(i / MR) * nc * MR..];
                for (k, &(_, _, j)) in order.iter().enumerate() {
                    panel[k * MR + i % MR] = values[map[i * nc + j] as usize];
                }
            }
            blocks.push(ConvBlock {
                rows,
                runs,
                chans: order.iter().map(|&(_, c, _)| c).collect(),
                taps: order.iter().map(|&(t, _, _)| t as u8).collect(),
                ids: order.iter().map(|&(t, c, _)| c * taps as u32 + t).collect(),
                panels,
                pairs: Vec::new(),
                second: false,
            });
        }
        let uncovered: Vec<u32> = (0..cout as u32).filter(|&r| !covered[r as usize]).collect();
        if !uncovered.is_empty() {
            blocks.push(ConvBlock {
                rows: uncovered,
                runs: Vec::new(),
                chans: Vec::new(),
                taps: Vec::new(),
                ids: Vec::new(),
                panels: Vec::new(),
                pairs: Vec::new(),
                second: false,
            });
        }
        Ok(Some(BlockConv {
            cout,
            cout2: 0,
            cin,
            g,
            in_place,
            isa,
            blocks,
            padded: true,
            bf16: false,
        }))
    }

    /// This 3×3 stride-2 convolution (padding 1) fused with `down`, a 1×1 stride-2 one
    /// (padding 0) of the same input (a residual block's downsample beside its first
    /// convolution): one pass over the input computes both outputs
    /// ([`forward_pair_into`](Self::forward_pair_into)). The 1×1 convolution reads exactly
    /// what the centre tap reads, so its blocks become blocks of that tap, writing the second
    /// output: the input is split into its phases once, not twice, and read from memory once.
    /// `None` unless both run in place (AVX-512, or AVX2 and FMA) with these geometries and the
    /// same channels.
    pub fn fuse_strided_1x1(&self, down: &BlockConv) -> Option<BlockConv> {
        let (g3, g1) = (ConvGeometry::square(3, 2, 1), ConvGeometry::square(1, 2, 0));
        let ok = matches!(self.isa, Isa::Avx512 | Isa::Avx2)
            && down.isa == self.isa
            && self.in_place
            && down.in_place
            && self.g == g3
            && down.g == g1
            && self.cin == down.cin
            && self.cout2 == 0
            && down.cout2 == 0;
        if !ok {
            return None;
        }
        // The centre tap (1, 1) of the 3×3 kernel reads input (2·oy, 2·ox), as the 1×1 does.
        let centre = 4u32;
        let taps = g3.taps() as u32;
        let mut blocks = self.blocks.clone();
        blocks.extend(down.blocks.iter().map(|b| ConvBlock {
            rows: b.rows.clone(),
            runs: b.runs.iter().map(|&(_, k0, k1)| (centre, k0, k1)).collect(),
            chans: b.chans.clone(),
            taps: vec![centre as u8; b.taps.len()],
            ids: b.chans.iter().map(|&c| c * taps + centre).collect(),
            panels: b.panels.clone(),
            pairs: b.pairs.clone(),
            second: true,
        }));
        let mut fused = BlockConv {
            cout: self.cout,
            cout2: down.cout,
            cin: self.cin,
            g: self.g,
            in_place: true,
            isa: self.isa,
            blocks,
            padded: self.padded,
            bf16: false,
        };
        fused.set_bf16(self.bf16);
        Some(fused)
    }

    /// Output channels of the second output of a fused kernel
    /// ([`fuse_strided_1x1`](Self::fuse_strided_1x1)); 0 for any other.
    pub fn second_out_dim(&self) -> usize {
        self.cout2
    }

    /// Output channels.
    pub fn out_dim(&self) -> usize {
        self.cout
    }

    /// Number of blocks (the unit of [`forward_into`](Self::forward_into)'s row shares).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// At most `parts` consecutive ranges of blocks of about equal work, covering them all.
    pub fn shares(&self, parts: usize) -> Vec<(usize, usize)> {
        let total: usize = self.blocks.iter().map(ConvBlock::work).sum();
        let parts = parts.clamp(1, self.blocks.len().max(1));
        let mut out = Vec::with_capacity(parts);
        let (mut start, mut done) = (0, 0);
        for (i, b) in self.blocks.iter().enumerate() {
            done += b.work();
            // Close a share once it reaches its fair part of the total.
            if done * parts >= total * (out.len() + 1) && out.len() + 1 < parts {
                out.push((start, i + 1));
                start = i + 1;
            }
        }
        if start < self.blocks.len() || out.is_empty() {
            out.push((start, self.blocks.len()));
        }
        out
    }

    /// Whether the in-place kernel multiplies in bfloat16 (the weights and each tile's inputs
    /// rounded to nearest even, products accumulated in `f32`; AVX-512 BF16's `vdpbf16ps`
    /// multiplies two pairs per lane where an FMA multiplies one) on a CPU that has it; off by
    /// default. Returns whether it is on: `false` where the CPU (or `COARSEN_ISA`) leaves no
    /// AVX-512 BF16. The narrow kernel stays in `f32`. Results differ from the `f32` kernel's
    /// by the rounding: about 2⁻⁹ of each product's magnitude.
    pub fn set_bf16(&mut self, on: bool) -> bool {
        let on = on && self.isa == Isa::Avx512 && Self::bf16_available();
        if on {
            for b in self.blocks.iter_mut().filter(|b| b.pairs.is_empty()) {
                b.pairs = pack_pairs(&b.panels, b.chans.len());
            }
        }
        self.bf16 = on;
        on
    }

    /// Whether this CPU runs the bfloat16 kernel ([`set_bf16`](Self::set_bf16)): AVX-512
    /// (not overridden by `COARSEN_ISA`) with BW, VL and BF16.
    pub fn bf16_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return Isa::detect() == Isa::Avx512 && bf16::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Whether the in-place kernel multiplies in bfloat16 ([`set_bf16`](Self::set_bf16)).
    pub fn bf16(&self) -> bool {
        self.bf16
    }

    /// Whether the AVX2 kernel runs stride-1 convolutions whose taps reach one row and one
    /// column around each position, on rows of at least 16, on halos padded with zeros (no
    /// lane masks; on by default), or on masked halos as every other geometry. For A/B
    /// measurements and tests; the results are the same.
    pub fn set_padded_halos(&mut self, on: bool) {
        self.padded = on;
    }

    /// Whether it runs convolutions of `d` in place (same geometry and channels, output as
    /// large as the input, or half its height and width at stride 2).
    pub fn accepts(&self, d: &ConvDims) -> bool {
        self.in_place && accepts(&self.g, self.cin, d)
    }

    /// Whether the in-place kernel runs this geometry (a stride-1 or stride-2 convolution of
    /// the kinds [`DirectConv`](super::DirectConv) runs); otherwise only the narrow kernel does.
    pub fn in_place(&self) -> bool {
        self.in_place
    }

    /// Whether this CPU runs the narrow kernel ([`forward_narrow_into`](Self::forward_narrow_into)):
    /// AVX-512 only.
    pub fn narrow(&self) -> bool {
        self.isa == Isa::Avx512 && self.cout2 == 0
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
        let nc = c1.saturating_sub(c0);
        let Some(want) = self.cout.checked_mul(nc) else {
            return Err(KernelError::Param {
                name: "columns",
                value: format!("{c0}..{c1}"),
                reason: format!("{} rows × {nc} columns overflow usize", self.cout),
            });
        };
        check_len("BlockConv::forward", "y", y.len(), want, || {
            format!("{} rows × {nc} columns", self.cout)
        })?;
        // SAFETY: `y` holds every row of the output at stride `nc`, checked above.
        unsafe {
            self.forward_into(
                x,
                d,
                (c0, c1),
                (0, self.blocks.len()),
                y.as_mut_ptr(),
                nc,
                Epilogue::default(),
            )
        }
    }

    /// Columns `c0 .. c1` of the output rows of blocks `b0 .. b1` straight into the layer's
    /// output through the epilogue: value `(r, c)` goes to `y[r·ldy + (c − c0)]` as
    /// `act(v + bias[r] + residual[r, c])`. Tasks that share one output write the rows of their own blocks (or
    /// their own columns) in place.
    ///
    /// # Safety
    /// `y` must be valid for writes of every position above for every row `r` of those blocks
    /// (it need not be initialised), and no other thread may access them during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_into(
        &self,
        x: &[f32],
        d: &ConvDims,
        cols: (usize, usize),
        share: (usize, usize),
        y: *mut f32,
        ldy: usize,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        if self.cout2 != 0 {
            return Err(KernelError::Param {
                name: "kernel",
                value: format!("{} + {} output channels", self.cout, self.cout2),
                reason: "BlockConv::forward_into: a fused kernel writes two outputs \
                         (forward_pair_into)"
                    .into(),
            });
        }
        // SAFETY: as the caller guarantees; no block writes a second output.
        unsafe { self.forward_outputs(x, d, cols, share, (y, ldy, epilogue), None) }
    }

    /// [`forward_into`](Self::forward_into) for a fused kernel
    /// ([`fuse_strided_1x1`](Self::fuse_strided_1x1)): the 3×3 convolution's rows of blocks
    /// `b0 .. b1` into `first` (`(y, ldy, epilogue)` as `forward_into` takes them), the 1×1's
    /// into `second` (its own rows, bias and residual; `cout2` rows).
    ///
    /// # Safety
    /// As [`forward_into`](Self::forward_into), for both outputs.
    #[allow(clippy::type_complexity)]
    pub unsafe fn forward_pair_into(
        &self,
        x: &[f32],
        d: &ConvDims,
        cols: (usize, usize),
        share: (usize, usize),
        first: (*mut f32, usize, Epilogue<'_>),
        second: (*mut f32, usize, Epilogue<'_>),
    ) -> Result<()> {
        if self.cout2 == 0 {
            return Err(KernelError::Param {
                name: "kernel",
                value: format!("{} output channels", self.cout),
                reason: "BlockConv::forward_pair_into needs a fused kernel (fuse_strided_1x1)"
                    .into(),
            });
        }
        second
            .2
            .check("BlockConv::forward_pair_into", self.cout2, cols, second.1)?;
        // SAFETY: as the caller guarantees.
        unsafe { self.forward_outputs(x, d, cols, share, first, Some(second)) }
    }

    /// The kernel on columns `c0 .. c1` of blocks `b0 .. b1`, first-output blocks into
    /// `first`, second-output ones into `second` (checked by the callers to exist when the
    /// kernel has such blocks).
    ///
    /// # Safety
    /// As [`forward_into`](Self::forward_into), for each output.
    #[allow(clippy::type_complexity)]
    unsafe fn forward_outputs(
        &self,
        x: &[f32],
        d: &ConvDims,
        (c0, c1): (usize, usize),
        (b0, b1): (usize, usize),
        (y, ldy, epilogue): (*mut f32, usize, Epilogue<'_>),
        second: Option<(*mut f32, usize, Epilogue<'_>)>,
    ) -> Result<()> {
        let op = "BlockConv::forward_into";
        check_call(
            op,
            d,
            (self.accepts(d), &|| {
                format!(
                    "the kernel was packed for {} input channels and {:?}",
                    self.cin, self.g
                )
            }),
            x.len(),
            ((c0, c1), 1),
            ((0, 0), 1, self.cout),
            0,
        )?;
        if b0 > b1 || b1 > self.blocks.len() {
            return Err(KernelError::Param {
                name: "blocks",
                value: format!("{b0}..{b1}"),
                reason: format!("the kernel has {} blocks", self.blocks.len()),
            });
        }
        epilogue.check(op, self.cout, (c0, c1), ldy)?;
        if c0 == c1 || b0 == b1 {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `new` returned `Some` only on a CPU with `isa`; the input's length and the
        // ranges were checked above; `y` (and `second`) as the caller guarantees; the biases
        // (if any) hold `cout` (`cout2`) values, and every block row is below its output's
        // rows.
        unsafe {
            let (cols, share, out) = ((c0, c1), (b0, b1), (y, ldy));
            if self.bf16 {
                bf16::forward(self, x, d, cols, share, out, epilogue, second)
            } else if self.isa == Isa::Avx512 {
                avx512::forward(self, x, d, cols, share, out, epilogue, second)
            } else {
                avx2::forward(self, x, d, cols, share, out, epilogue, second)
            }
        };
        Ok(())
    }
}

impl BlockConv {
    /// Output positions of the in-place kernel's widest tile (narrower ones serve a range's
    /// end).
    pub const TILE: usize = NR;

    /// Most output positions of [`forward_narrow_into`](Self::forward_narrow_into): four
    /// vectors (one 8×8 image).
    pub const NARROW: usize = 64;

    /// The im2col tiles that [`forward_narrow_into`](Self::forward_narrow_into) reads for the
    /// `n ≤ NARROW` output positions of the batch `x` (`[cin, B, H, W]`, sizes `d`): every
    /// im2col row, in tiles of 16 columns (zero past `n`), into `out`
    /// ([`narrow_len`](Self::narrow_len)`(n)` values).
    pub fn narrow_input(&self, x: &[f32], d: &ConvDims, out: &mut [f32]) -> Result<()> {
        self.check_narrow("BlockConv::narrow_input", d)?;
        d.im2col_tiles(x, None, 0, d.n(), 16, out, &mut Vec::new())
    }

    /// Values of [`narrow_input`](Self::narrow_input)'s tiles for `n` output positions.
    pub fn narrow_len(&self, n: usize) -> usize {
        self.cin * self.g.taps() * n.div_ceil(16) * 16
    }

    /// Checks that the narrow kernel runs `d`: this kernel's geometry and channels, at most
    /// `NARROW` output positions.
    fn check_narrow(&self, op: &'static str, d: &ConvDims) -> Result<()> {
        if !self.narrow() {
            return Err(KernelError::Param {
                name: "isa",
                value: self.isa.as_str().into(),
                reason: format!("{op}: the narrow block kernel needs AVX-512"),
            });
        }
        if d.g != self.g || d.c != self.cin || d.n() > Self::NARROW {
            return Err(KernelError::Param {
                name: "dims",
                value: format!("[{}, {}, {}, {}] {:?}", d.c, d.b, d.h, d.w, d.g),
                reason: format!(
                    "{op} runs the kernel's {} input channels and {:?} on at most {} output \
                     positions",
                    self.cin,
                    self.g,
                    Self::NARROW
                ),
            });
        }
        Ok(())
    }

    /// The output rows of blocks `b0 .. b1` for all `n = d.n() ≤ NARROW` output positions,
    /// from [`narrow_input`](Self::narrow_input)'s tiles `xt` (each column of a block one
    /// aligned vector of a tile; a panel's weights read from memory once and from the cache
    /// for the other tiles), into `y` through the epilogue: value `(r, c)` at `y[r·ldy + c]`.
    /// Batch 1's small images, where the in-place kernel's halo loads straddle cache lines and
    /// many of its lanes are idle.
    ///
    /// # Safety
    /// As [`forward_into`](Self::forward_into) with `c0 = 0`, `c1 = n`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_narrow_into(
        &self,
        xt: &[f32],
        d: &ConvDims,
        (b0, b1): (usize, usize),
        y: *mut f32,
        ldy: usize,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        let op = "BlockConv::forward_narrow_into";
        self.check_narrow(op, d)?;
        let n = d.n();
        check_len(op, "xt", xt.len(), self.narrow_len(n), || {
            format!("{} im2col rows × {n}", self.cin * self.g.taps())
        })?;
        if b0 > b1 || b1 > self.blocks.len() {
            return Err(KernelError::Param {
                name: "blocks",
                value: format!("{b0}..{b1}"),
                reason: format!("the kernel has {} blocks", self.blocks.len()),
            });
        }
        epilogue.check(op, self.cout, (0, n), ldy)?;
        if n == 0 || b0 == b1 {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `check_narrow` passed only where `isa` is AVX-512 (detected by `new`); `xt`
        // holds every im2col row (each block's ids are below `cin·taps`), `y` as the caller
        // guarantees.
        unsafe {
            avx512::forward_narrow(self, xt, n, (b0, b1), (y, ldy), epilogue)
        };
        Ok(())
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits; NaN stays NaN.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// A block's panels (`kn` columns of `MR` values each) in the bfloat16 kernel's pairs of
/// columns (see [`ConvBlock::pairs`]).
fn pack_pairs(panels: &[f32], kn: usize) -> Vec<u32> {
    if kn == 0 {
        return Vec::new();
    }
    let np = kn.div_ceil(2);
    let mut out = Vec::with_capacity(panels.len() / kn * np);
    for panel in panels.chunks_exact(kn * MR) {
        for p in 0..np {
            for i in 0..MR {
                let lo = bf16_bits(panel[2 * p * MR + i]);
                let hi = panel.get((2 * p + 1) * MR + i).map_or(0, |&v| bf16_bits(v));
                out.push(u32::from(lo) | (u32::from(hi) << 16));
            }
        }
    }
    out
}

/// Tiles per halo copy of the in-place kernels.
const SPAN: usize = 4;

thread_local! {
    /// Per-thread halo offsets of the in-place kernels' columns.
    static OFFS: std::cell::Cell<Vec<usize>> = const { std::cell::Cell::new(Vec::new()) };
    /// Per-thread halo buffer of the in-place kernels (taken out for a call, so a nested call
    /// on the same thread makes its own).
    static HALO: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Per-thread bfloat16 copy of the halo, for the bfloat16 kernel.
    static HALO16: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// How the bfloat16 kernel's halos are made: `convert(src, dst, n)` rounds `n` values of
/// an input row (stride 1), `split` takes a row pair of the input apart into its phases
/// (stride 2).
#[derive(Clone, Copy)]
struct Bf16Halo {
    convert: unsafe fn(*const f32, *mut u16, usize),
    split: SplitRows<u16>,
}

/// The in-place kernels' walk over output positions `c0 .. c1` for `blocks`, shared by the
/// AVX-512 and AVX2 kernels: the halo offset of every column of the blocks (block after
/// block), then per tile its width, its halo (one copy serves up to `SPAN` tiles: each tile's
/// taps overlap the next tile's, so copying them per tile copied most input values twice or
/// more) and its lane masks per tap, handed to `tile(window, t0, width, masks, offs)`, where
/// `window` is the tile's window of the halo (lane `j` of a column reads `window + offs + j`).
/// With `to_bf16` each halo is made in bfloat16 instead, straight from the input's rows (the
/// `f32` halo is not made, and `window` is null): rounded by its `convert` at stride 1, taken
/// apart into phases and rounded by its `split` at stride 2; the tile's window of it is
/// handed as `window16` (else null), offsets as in `window`.
///
/// # Safety
/// `x` holds `cin × B·H·W` values of a batch `k` accepts, and `c0 ≤ c1 ≤
/// d.n()`; `tile` reads no further into a halo row than its tile's width, rounded up to whole
/// vectors, past its window plus a column's offset; `to_bf16`'s functions write no more
/// values than they are given, and the CPU has what they ask for.
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn walk_tiles(
    k: &BlockConv,
    x: &[f32],
    d: &ConvDims,
    (c0, c1): (usize, usize),
    blocks: &[ConvBlock],
    to_bf16: Option<Bf16Halo>,
    mut tile: impl FnMut(*const f32, *const u16, usize, usize, &[[u16; NV]; MAX_TAPS], &[usize]),
) {
    let t = Taps::new(&k.g, d, SPAN * NR);
    let (cin, stride, lo) = (k.cin, t.stride, t.lo);
    // Where each tap's rows start in the halo: its plane's slot, shifted.
    let mut tap_base = [0usize; MAX_TAPS];
    for (tap, b) in tap_base.iter_mut().enumerate().take(t.places.len()) {
        let slot = t.slot_of[t.places[tap].0];
        *b = slot * cin * stride + (t.shifts[tap] - lo) as usize;
    }
    // Reused per thread and never cleared: lanes that would read what an earlier tile left
    // there are masked off. Room past the last row for vectors beyond a tile's width.
    // The `f32` halo (null where the bfloat16 one is made instead).
    let mut halo = HALO.take();
    let len = t.planes.len() * cin * stride + 32;
    let hp = match to_bf16 {
        Some(_) => std::ptr::null_mut(),
        None => halo_start(&mut halo, len),
    };
    let mut halo16 = HALO16.take();
    let hp16 = match to_bf16 {
        Some(_) => halo_start(&mut halo16, len),
        None => std::ptr::null_mut(),
    };
    // Where every column of the blocks reads in the halo (one flat loop over a block's
    // columns keeps the tile in registers; runs of taps nested in it made LLVM spill).
    let mut offs = OFFS.take();
    offs.clear();
    for b in blocks {
        for &(tap, k0, k1) in &b.runs {
            let base = tap_base[tap as usize];
            offs.extend(
                b.chans[k0 as usize..k1 as usize]
                    .iter()
                    .map(|&c| base + c as usize * stride),
            );
        }
    }
    let mut masks = [[0u16; NV]; MAX_TAPS];
    let mut cache = t.mask_cache();
    let mut t0 = c0;
    let mut s0 = c0;
    while t0 < c1 {
        // 64 positions left (batch 1's 8×8 images, a chunk's end) run as two tiles of 32,
        // not 48 and a one-vector tile of 16 (whose 8 accumulators leave the FMA units
        // waiting on each column's load).
        let width = if c1 - t0 == 64 { 32 } else { NR.min(c1 - t0) };
        // A new halo where the tile would reach past the one copied (every tile of a range
        // reads only positions its halo holds).
        if t0 == c0 || t0 + width > s0 + SPAN * NR {
            s0 = t0;
            let span = (SPAN * NR).min(c1 - s0);
            match (to_bf16, t.halo_rows(cin, (0, cin), s0, span)) {
                (Some(b), Some(rows)) => {
                    for (src, dst, n) in rows {
                        // SAFETY: as the caller guarantees (`x`'s length); the rows lie in
                        // the halo (`halo_rows`).
                        unsafe { (b.convert)(x.as_ptr().add(src), hp16.add(dst), n) };
                    }
                }
                // SAFETY (both): as the caller guarantees; either halo holds every plane's
                // `cin` rows (`len` values, `None` from `halo_rows`: stride 2).
                (Some(b), None) => unsafe {
                    t.copy_phase_halo(x.as_ptr(), (0, cin), s0, span, hp16, b.split)
                },
                (None, _) => unsafe { t.copy_halo(x.as_ptr(), cin, (0, cin), s0, span, hp) },
            }
        }
        cache.masks(&t, t0, width, &mut masks);
        // `t0 − s0 < SPAN·NR` lies inside every halo row.
        let (w, w16) = (window(hp, t0 - s0), window(hp16, t0 - s0));
        tile(w, w16, t0, width, &masks, &offs);
        t0 += width;
    }
    HALO.set(halo);
    HALO16.set(halo16);
    OFFS.set(offs);
}

/// The window of a halo at `p` (null: a halo not made, whose window stays null) that starts
/// `off` values in.
fn window<T>(p: *mut T, off: usize) -> *const T {
    if p.is_null() {
        p
    } else {
        p.wrapping_add(off)
    }
}

/// Where one vector (8 lanes) of a padded tile goes in the output: lanes `0 .. junk` to
/// columns `col ..`, lane `junk` (8: none) a padding column of the halo (not stored), the
/// lanes after it to the columns after those; `n` lanes stored in all.
#[derive(Clone, Copy, Debug, Default)]
struct VecOut {
    /// The output column (of the whole `B·Ho·Wo`) of the vector's first stored lane.
    col: usize,
    /// The lane that falls on a padding column (8: none).
    junk: u8,
    /// Lanes stored.
    n: u8,
}

/// Vectors of a tile.
const TILE_VECS: usize = NR / 8;

/// Rows of output positions from which the AVX2 kernel runs on padded halos: at least 8 (a
/// vector holds at most one padding column), and 16 where the padding column's lanes (one in
/// `w + 1`) cost less than the masks saved. On rows of 8 they cost more: ResNet-18's 8×8
/// layers at batch 1 (one image, 71 halo positions for 64 outputs) ran 0.157–0.162 →
/// 0.185–0.190 ms on them; at batch 8 `examples/ab_block` had them level.
const PADDED_MIN_WIDTH: usize = 16;

/// Whether the AVX2 kernel runs convolutions of `d` on padded halos ([`walk_padded`]):
/// stride 1, every tap's shift within one row and one column, some tap shifted, and rows of at
/// least [`PADDED_MIN_WIDTH`] positions.
fn padded_geometry(g: &ConvGeometry, d: &ConvDims) -> bool {
    const { assert!(PADDED_MIN_WIDTH >= 8) };
    let taps = g.taps();
    let places = (0..taps).map(|t| tap_place(g, t));
    g.stride == [1, 1]
        && g.dilation == [1, 1]
        && d.wo >= PADDED_MIN_WIDTH
        && d.ho >= 1
        && places
            .clone()
            .all(|(_, dy, dx)| dy.abs() <= 1 && dx.abs() <= 1)
        && places.clone().any(|(_, dy, dx)| dy != 0 || dx != 0)
}

/// The in-place walk over output positions `c0 .. c1` on halos laid out as the image padded
/// with zeros, for stride-1 convolutions whose taps reach one row and one column around each
/// position ([`padded_geometry`]): each halo row is an image row followed by one zero (the
/// right padding of its row and the left padding of the next), the rows above and below the
/// image are zero rows, and the output positions are walked in the halo's coordinates, so
/// every tap of every lane reads its input or a zero and no lane needs a mask. The padding
/// column's lanes are computed and not stored: `tile(window, width, outs, offs)` gets, per
/// vector of the tile, where its lanes go ([`VecOut`]). A halo holds whole rows of one image
/// (up to `SPAN·NR` positions).
///
/// # Safety
/// `x` holds `cin × B·H·W` values of a batch `k` accepts at a geometry `padded_geometry`
/// accepts, and `c0 ≤ c1 ≤ d.n()`; `tile` reads no further than 24 lanes past a position of
/// its tile plus a column's offset.
#[inline(always)]
unsafe fn walk_padded(
    k: &BlockConv,
    x: &[f32],
    d: &ConvDims,
    (c0, c1): (usize, usize),
    blocks: &[ConvBlock],
    mut tile: impl FnMut(*const f32, usize, &[VecOut; TILE_VECS], &[usize]),
) {
    let (cin, h, w) = (k.cin, d.ho, d.wo);
    let (hw, ld) = (h * w, d.n());
    // Halo rows `pitch` floats apart; a span's real rows, and the zero rows around them.
    let pitch = w + 1;
    let span_rows = (SPAN * NR / pitch).clamp(1, h);
    let data = (span_rows + 2) * pitch;
    // Room past the last row for a sub-tile's 24 lanes beyond its last position; channels an
    // odd number of cache lines apart (see `Taps::new`).
    let mut lines = (data + 32).div_ceil(16);
    if lines.is_multiple_of(2) {
        lines += 1;
    }
    let cs = lines * 16;
    let mut offs = OFFS.take();
    offs.clear();
    for b in blocks {
        for &(tap, k0, k1) in &b.runs {
            let (_, dy, dx) = tap_place(&k.g, tap as usize);
            // From the window (one row and one column before the tile's first position).
            let base = ((dy + 1) * pitch as isize + dx + 1) as usize;
            offs.extend(
                b.chans[k0 as usize..k1 as usize]
                    .iter()
                    .map(|&c| base + c as usize * cs),
            );
        }
    }
    let mut halo = HALO.take();
    let hp = halo_start(&mut halo, 1 + cin * cs);
    // The float before channel 0's first row is read as the left padding of its first
    // position (other channels read the previous channel's zero tail there).
    *hp = 0.0;
    let hbase = hp.add(1);
    let mut c = c0;
    while c < c1 {
        let (img, r) = (c / hw, c % hw);
        let (y0, xa) = (r / w, r % w);
        let end = (img * hw + (y0 + span_rows).min(h) * w).min(c1);
        let last = end - 1 - img * hw;
        let (y1, xe) = (last / w, last % w + 1);
        let n = y1 - y0 + 1;
        // Halo row `i` is image row `y0 + i − 1` (zero outside the image), then a zero.
        for ch in 0..cin {
            let row0 = hbase.add(ch * cs);
            for i in 0..n + 2 {
                let dst = row0.add(i * pitch);
                let y = (y0 + i).wrapping_sub(1);
                if y < h {
                    // SAFETY: the halo row holds `w` floats and a zero from `dst`.
                    copy_floats(
                        &x[ch * ld + img * hw + y * w..][..w],
                        std::slice::from_raw_parts_mut(dst, w),
                    );
                } else {
                    for j in 0..w {
                        *dst.add(j) = 0.0;
                    }
                }
                *dst.add(w) = 0.0;
            }
            let used = (n + 2) * pitch;
            for j in used..cs {
                *row0.add(j) = 0.0;
            }
        }
        // Positions of the span in halo coordinates: row 1 is image row `y0`.
        let (p0, p1) = (pitch + xa, n * pitch + xe);
        let mut t = p0;
        while t < p1 {
            let width = NR.min(p1 - t);
            let mut outs = [VecOut::default(); TILE_VECS];
            for (j, o) in outs.iter_mut().enumerate().take(width.div_ceil(8)) {
                let q = t + 8 * j;
                let lanes = (width - 8 * j).min(8);
                let (row, col) = (q / pitch, q % pitch);
                // At most one padding column (at `w`) within 8 lanes of a row of ≥ 8.
                let junk = w - col;
                let (junk, first) = if junk >= lanes {
                    (8, (row, col))
                } else if junk == 0 {
                    (0, (row + 1, 0))
                } else {
                    (junk, (row, col))
                };
                let n = lanes - usize::from(junk < 8);
                *o = VecOut {
                    col: img * hw + (y0 + first.0 - 1) * w + first.1,
                    junk: junk as u8,
                    n: n as u8,
                };
            }
            // SAFETY: the window is one row and one column before `t`, inside the halo
            // (`t ≥ pitch`, and the float before row 0, `hp`, is there).
            tile(hp.add(t - pitch), width, &outs, &offs);
            t += width;
        }
        c = end;
    }
    HALO.set(halo);
    OFFS.set(offs);
}

/// The in-place kernel on AVX2 and FMA: the AVX-512 kernel's tiles of up to `NR` positions,
/// halos and lane masks, each tile run as sub-tiles of 24 positions (three vectors of 8) on
/// a register tile of 4 rows × 24 (a panel of `MR` rows in two passes, its loop in assembly);
/// loads are unmasked and ANDed with the tap's lane mask (the halo row holds every position a
/// tile reads), or, on padded halos ([`walk_padded`]: stride-1 layers on rows of at least
/// [`PADDED_MIN_WIDTH`]), not masked at all.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{padded_geometry, walk_padded, walk_tiles, VecOut};
    use super::{BlockConv, ConvBlock, Epilogue, MAX_TAPS, MR, NR, NV};
    use crate::conv::ConvDims;

    /// Positions of a sub-tile: three vectors.
    const SUB: usize = 24;
    /// Sub-tiles of a tile.
    const SUBS: usize = NR.div_ceil(SUB);
    /// Rows of a pass over a panel.
    const HALF: usize = MR / 2;

    /// A padded tile's vector ([`VecOut`]) made ready for the stores of every row: the lane
    /// permutation that squeezes out its padding lane, the mask of its stored lanes, and
    /// whether all 8 lanes may be written (see [`store_row`]).
    #[derive(Clone, Copy)]
    struct PadVec {
        from: __m256i,
        mask: __m256i,
        /// Its first stored lane's column, and that column's place after the call's first.
        col: usize,
        at: usize,
        /// Lanes stored (0: none), and whether 8 lanes may be written.
        n: u8,
        whole: bool,
    }

    impl PadVec {
        /// `o` for a call whose positions are `c0 .. end`.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn new(o: &VecOut, c0: usize, end: usize) -> PadVec {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let one = _mm256_set1_epi32(1);
            let junk = _mm256_set1_epi32(i32::from(o.junk));
            // Lane `l` takes lane `l + 1` from the padding lane on.
            let after = _mm256_cmpgt_epi32(_mm256_add_epi32(lanes, one), junk);
            PadVec {
                from: _mm256_add_epi32(lanes, _mm256_and_si256(after, one)),
                mask: _mm256_cmpgt_epi32(_mm256_set1_epi32(i32::from(o.n)), lanes),
                col: o.col,
                at: o.col.wrapping_sub(c0),
                n: o.n,
                // Lanes past the `n` stored ones that still fall inside the call's range are
                // written whole (a masked store is slow): the positions they hit come later
                // in this thread's walk, which writes them again.
                whole: o.col + 8 <= end,
            }
        }
    }

    /// Lanes `p .. p + 8` (`p` a multiple of 8) of a tile's 16-lane masks, as a vector mask.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lane_mask(m: &[u16; NV], p: usize) -> __m256 {
        let bits = i32::from((m[p / 16] >> (p % 16)) as u8);
        let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let v = _mm256_and_si256(_mm256_set1_epi32(bits), lanes);
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, lanes))
    }

    /// See [`BlockConv::forward_into`] (and [`BlockConv::forward_pair_into`]: the blocks of a
    /// fused kernel's second output write `second`).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; otherwise as the AVX-512 kernel's `forward`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub(super) unsafe fn forward(
        k: &BlockConv,
        x: &[f32],
        d: &ConvDims,
        (c0, c1): (usize, usize),
        (b0, b1): (usize, usize),
        (yp, ldy): (*mut f32, usize),
        epilogue: Epilogue<'_>,
        second: Option<(*mut f32, usize, Epilogue<'_>)>,
    ) {
        let (yp2, ldy2, epilogue2) = second.unwrap_or((yp, ldy, epilogue));
        let ntaps = k.g.taps();
        let blocks = &k.blocks[b0..b1];
        if k.padded && second.is_none() && padded_geometry(&k.g, d) {
            // No lane masks: the halo holds the padding.
            let vm = [[_mm256_setzero_ps(); 3]; MAX_TAPS];
            walk_padded(k, x, d, (c0, c1), blocks, |window, width, outs, offs| {
                let mut pads = [[PadVec::new(&VecOut::default(), 0, 0); 3]; SUBS];
                for (i, o) in outs.iter().enumerate().take(width.div_ceil(8)) {
                    pads[i / 3][i % 3] = PadVec::new(o, c0, c1);
                }
                let mut subs: [Option<Sub<'_>>; SUBS] = [None, None];
                let mut s = 0;
                for (sub, pad) in subs.iter_mut().zip(&pads) {
                    if s >= width {
                        break;
                    }
                    *sub = Some(Sub {
                        offs,
                        hp: window.add(s),
                        vm: &vm,
                        width: SUB.min(width - s),
                        out: (yp, ldy),
                        col: c0,
                        pad: Some(pad),
                        epilogue,
                        out2: (yp2, ldy2),
                        epilogue2,
                    });
                    s += SUB;
                }
                run_tile::<false>(blocks, &subs);
            });
            return;
        }
        walk_tiles(
            k,
            x,
            d,
            (c0, c1),
            blocks,
            None,
            |window, _, t0, width, masks, offs| {
                // The tile's sub-tiles (at most two of 24 positions), each with its lane
                // masks; every panel of every block runs over all of them in turn, so its
                // values stay in L1 while the tile's halo window does.
                let mut vms = [[[_mm256_setzero_ps(); 3]; MAX_TAPS]; SUBS];
                let mut subs: [Option<Sub<'_>>; SUBS] = [None, None];
                let mut s = 0;
                for (vm, sub) in vms.iter_mut().zip(subs.iter_mut()) {
                    if s >= width {
                        break;
                    }
                    let sw = SUB.min(width - s);
                    for (v, m) in vm.iter_mut().zip(masks).take(ntaps) {
                        for (j, vj) in v.iter_mut().enumerate() {
                            if s + 8 * j < width {
                                *vj = lane_mask(m, s + 8 * j);
                            }
                        }
                    }
                    *sub = Some(Sub {
                        offs,
                        hp: window.add(s),
                        vm,
                        width: sw,
                        out: (yp.add(t0 + s - c0), ldy),
                        col: t0 + s,
                        pad: None,
                        epilogue,
                        out2: (yp2.add(t0 + s - c0), ldy2),
                        epilogue2,
                    });
                    s += sw;
                }
                run_tile::<true>(blocks, &subs);
            },
        );
    }

    /// What one sub-tile of output positions shares over every block.
    struct Sub<'a> {
        /// Halo offsets of every column of the blocks, block after block.
        offs: &'a [usize],
        /// The sub-tile's window of the halo.
        hp: *const f32,
        /// Per tap, the lane masks of the sub-tile's vectors.
        vm: &'a [[__m256; 3]; MAX_TAPS],
        /// Positions of the sub-tile (at most 24).
        width: usize,
        /// Where its first position goes in output row 0, and the rows' stride.
        out: (*mut f32, usize),
        /// Its first position's column in the whole output (for the residual).
        col: usize,
        /// On a padded halo: where each vector's lanes go (`out` and `col` are then the
        /// place and column of the call's first position).
        pad: Option<&'a [PadVec; 3]>,
        epilogue: Epilogue<'a>,
        /// Where the blocks of a fused kernel's second output write, and their epilogue.
        out2: (*mut f32, usize),
        epilogue2: Epilogue<'a>,
    }

    /// Every block of `blocks` on a tile's sub-tiles: each half panel (4 rows) over each
    /// sub-tile.
    ///
    /// # Safety
    /// As [`forward`], which made `subs`.
    /// `MASKED`: whether the loads take the taps' lane masks (not on padded halos).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_tile<const MASKED: bool>(blocks: &[ConvBlock], subs: &[Option<Sub<'_>>; SUBS]) {
        let mut first = 0;
        for b in blocks {
            let kn = b.chans.len();
            let taps = b.taps.as_ptr();
            for (q, rows) in b.rows.chunks(MR).enumerate() {
                let panel = b.panels.as_ptr().add(q * kn * MR);
                for (h, rows) in rows.chunks(HALF).enumerate() {
                    for t in subs.iter().flatten() {
                        let ((yp, ldy), epilogue) = if b.second {
                            (t.out2, t.epilogue2)
                        } else {
                            (t.out, t.epilogue)
                        };
                        let h = Half {
                            kn,
                            w: panel.add(h * HALF),
                            offs: t.offs.as_ptr().add(first),
                            taps,
                            rows,
                            out: (yp, ldy),
                            epilogue,
                        };
                        match t.width.div_ceil(8) {
                            1 => half::<1, MASKED>(&h, t),
                            2 => half::<2, MASKED>(&h, t),
                            _ => half::<3, MASKED>(&h, t),
                        }
                    }
                }
            }
            first += kn;
        }
    }

    /// Half a panel of one block on one sub-tile.
    struct Half<'a> {
        /// The block's columns.
        kn: usize,
        /// The half's first value of column 0 (column `kc`'s at `kc·MR`).
        w: *const f32,
        /// The block's columns' halo offsets, and taps.
        offs: *const usize,
        taps: *const u8,
        /// At most `HALF` output rows.
        rows: &'a [u32],
        /// Their output (row 0 of it, and the rows' stride) and its epilogue.
        out: (*mut f32, usize),
        epilogue: Epilogue<'a>,
    }

    /// The register tile of `HALF` rows × `V·8` positions over a block's columns, stored.
    ///
    /// # Safety
    /// As [`forward`], which made `t`; `p` a half panel of one of its blocks.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn half<const V: usize, const MASKED: bool>(p: &Half<'_>, t: &Sub<'_>) {
        let mut acc = [[_mm256_setzero_ps(); V]; HALF];
        if V == 3 {
            let acc = tile_4x24::<MASKED>(p, t);
            let (yp, ldy) = p.out;
            for (a, &r) in acc.iter().zip(p.rows) {
                store_row(a, t, p.epilogue, yp.add(r as usize * ldy), r as usize);
            }
            return;
        }
        for kc in 0..p.kn {
            let row = t.hp.add(*p.offs.add(kc));
            let mut xv = [_mm256_setzero_ps(); V];
            if MASKED {
                let m = &t.vm[*p.taps.add(kc) as usize];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_and_ps(_mm256_loadu_ps(row.add(8 * j)), m[j]);
                }
            } else {
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(row.add(8 * j));
                }
            }
            let wc = p.w.add(kc * MR);
            for (i, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*wc.add(i));
                for (aj, &xj) in a.iter_mut().zip(&xv) {
                    *aj = _mm256_fmadd_ps(wv, xj, *aj);
                }
            }
        }
        let (yp, ldy) = p.out;
        for (a, &r) in acc.iter().zip(p.rows) {
            store_row(a, t, p.epilogue, yp.add(r as usize * ldy), r as usize);
        }
    }

    /// [`half`]'s loop for 3 vectors, in assembly: the 12 accumulators, 3 input vectors and a
    /// broadcast weight are exactly the 16 registers, and the compiler's own loop kept an
    /// accumulator (unmasked) or the loop's bound (masked) on the stack, a store and reload
    /// on an FMA chain, or one load more per column. `MASKED`: each column's 24 lanes ANDed
    /// with its tap's lane masks.
    ///
    /// # Safety
    /// As [`half`]: every column's offset and the 24 lanes from it lie inside the halo, the
    /// half panel holds `kn` columns `MR` floats apart, and (masked) every column's tap has
    /// its masks in `t.vm`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_4x24<const MASKED: bool>(p: &Half<'_>, t: &Sub<'_>) -> [[__m256; 3]; HALF] {
        const { assert!(HALF == 4 && MR == 8) };
        let [[a00, a01, a02], [a10, a11, a12], [a20, a21, a22], [a30, a31, a32]]: [[__m256; 3];
            HALF];
        macro_rules! tile {
            ($($load:literal),+; $($extra:tt)*) => {
                std::arch::asm!(
                    "vxorps {a00}, {a00}, {a00}",
                    "vxorps {a01}, {a01}, {a01}",
                    "vxorps {a02}, {a02}, {a02}",
                    "vxorps {a10}, {a10}, {a10}",
                    "vxorps {a11}, {a11}, {a11}",
                    "vxorps {a12}, {a12}, {a12}",
                    "vxorps {a20}, {a20}, {a20}",
                    "vxorps {a21}, {a21}, {a21}",
                    "vxorps {a22}, {a22}, {a22}",
                    "vxorps {a30}, {a30}, {a30}",
                    "vxorps {a31}, {a31}, {a31}",
                    "vxorps {a32}, {a32}, {a32}",
                    "test {n}, {n}",
                    "jz 3f",
                    "2:",
                    "mov {o}, qword ptr [{offs}]",
                    $($load,)+
                    "vbroadcastss {w}, dword ptr [{wp}]",
                    "vfmadd231ps {a00}, {w}, {x0}",
                    "vfmadd231ps {a01}, {w}, {x1}",
                    "vfmadd231ps {a02}, {w}, {x2}",
                    "vbroadcastss {w}, dword ptr [{wp} + 4]",
                    "vfmadd231ps {a10}, {w}, {x0}",
                    "vfmadd231ps {a11}, {w}, {x1}",
                    "vfmadd231ps {a12}, {w}, {x2}",
                    "vbroadcastss {w}, dword ptr [{wp} + 8]",
                    "vfmadd231ps {a20}, {w}, {x0}",
                    "vfmadd231ps {a21}, {w}, {x1}",
                    "vfmadd231ps {a22}, {w}, {x2}",
                    "vbroadcastss {w}, dword ptr [{wp} + 12]",
                    "vfmadd231ps {a30}, {w}, {x0}",
                    "vfmadd231ps {a31}, {w}, {x1}",
                    "vfmadd231ps {a32}, {w}, {x2}",
                    "add {offs}, 8",
                    "inc {taps}",
                    "add {wp}, 32",
                    "dec {n}",
                    "jnz 2b",
                    "3:",
                    offs = inout(reg) p.offs => _,
                    taps = inout(reg) p.taps => _,
                    wp = inout(reg) p.w => _,
                    n = inout(reg) p.kn => _,
                    hp = in(reg) t.hp,
                    o = out(reg) _,
                    x0 = out(ymm_reg) _,
                    x1 = out(ymm_reg) _,
                    x2 = out(ymm_reg) _,
                    w = out(ymm_reg) _,
                    a00 = out(ymm_reg) a00,
                    a01 = out(ymm_reg) a01,
                    a02 = out(ymm_reg) a02,
                    a10 = out(ymm_reg) a10,
                    a11 = out(ymm_reg) a11,
                    a12 = out(ymm_reg) a12,
                    a20 = out(ymm_reg) a20,
                    a21 = out(ymm_reg) a21,
                    a22 = out(ymm_reg) a22,
                    a30 = out(ymm_reg) a30,
                    a31 = out(ymm_reg) a31,
                    a32 = out(ymm_reg) a32,
                    $($extra)*
                    options(nostack, readonly),
                )
            };
        }
        // SAFETY: as the caller guarantees; the loop reads `kn` offsets (and taps), and per
        // column 24 floats of the halo, 4 weights (and the tap's 3 masks), and writes only
        // the named registers.
        unsafe {
            if MASKED {
                // The tap's masks are 3 vectors (96 bytes) apart per tap.
                tile!(
                    "movzx {m:e}, byte ptr [{taps}]",
                    "lea {m}, [{m} + {m}*2]",
                    "shl {m}, 5",
                    "vmovups {x0}, ymmword ptr [{vm} + {m}]",
                    "vmovups {x1}, ymmword ptr [{vm} + {m} + 32]",
                    "vmovups {x2}, ymmword ptr [{vm} + {m} + 64]",
                    "vandps {x0}, {x0}, ymmword ptr [{hp} + {o}*4]",
                    "vandps {x1}, {x1}, ymmword ptr [{hp} + {o}*4 + 32]",
                    "vandps {x2}, {x2}, ymmword ptr [{hp} + {o}*4 + 64]";
                    vm = in(reg) t.vm.as_ptr(),
                    m = out(reg) _,
                );
            } else {
                tile!(
                    "vmovups {x0}, ymmword ptr [{hp} + {o}*4]",
                    "vmovups {x1}, ymmword ptr [{hp} + {o}*4 + 32]",
                    "vmovups {x2}, ymmword ptr [{hp} + {o}*4 + 64]";
                );
            }
        }
        [
            [a00, a01, a02],
            [a10, a11, a12],
            [a20, a21, a22],
            [a30, a31, a32],
        ]
    }

    /// One row `r` of a sub-tile's accumulators to `out` through the epilogue `e` (of the
    /// row's output): `act(v + bias[r] + residual[r, col ..])`, only the sub-tile's positions
    /// written.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_row<const V: usize>(
        a: &[__m256; V],
        t: &Sub<'_>,
        e: Epilogue<'_>,
        out: *mut f32,
        r: usize,
    ) {
        let bias = _mm256_set1_ps(e.bias.map_or(0.0, |b| *b.get_unchecked(r)));
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        if let Some(pad) = t.pad {
            // Each vector's padding lane (if any) squeezed out, the rest stored in a run.
            for (&v, p) in a.iter().zip(pad) {
                if p.n == 0 {
                    continue;
                }
                let v = _mm256_permutevar8x32_ps(v, p.from);
                let mut v = _mm256_add_ps(v, bias);
                if let Some(res) = e.residual {
                    let src = res.values.as_ptr().add(r * res.ld + p.col);
                    let rv = if p.whole {
                        _mm256_loadu_ps(src)
                    } else {
                        _mm256_maskload_ps(src, p.mask)
                    };
                    v = _mm256_add_ps(v, rv);
                }
                if e.relu {
                    v = _mm256_max_ps(v, _mm256_setzero_ps());
                }
                if p.whole {
                    _mm256_storeu_ps(out.add(p.at), v);
                } else {
                    _mm256_maskstore_ps(out.add(p.at), p.mask, v);
                }
            }
            return;
        }
        for (j, &v) in a.iter().enumerate() {
            let n = t.width.saturating_sub(8 * j).min(8);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
            let mut v = _mm256_add_ps(v, bias);
            if let Some(res) = e.residual {
                let p = res.values.as_ptr().add(r * res.ld + t.col + 8 * j);
                let rv = if n == 8 {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, mask)
                };
                v = _mm256_add_ps(v, rv);
            }
            if e.relu {
                v = _mm256_max_ps(v, _mm256_setzero_ps());
            }
            if n == 8 {
                _mm256_storeu_ps(out.add(8 * j), v);
            } else {
                _mm256_maskstore_ps(out.add(8 * j), mask, v);
            }
        }
    }
}

/// What one tile of output positions shares over every block, for the AVX-512 kernels (`T`:
/// the halo's values, `f32`, or bfloat16's bits for the bfloat16 kernel).
struct Tile<'a, T> {
    /// Halo offsets of every column of the blocks, block after block.
    offs: &'a [usize],
    /// The tile's window of the halo.
    hp: *const T,
    masks: &'a [[u16; NV]; MAX_TAPS],
    /// Lanes of the tile inside the range.
    full: [u16; NV],
    out: (*mut f32, usize),
    t0: usize,
    c0: usize,
    epilogue: Epilogue<'a>,
    /// Where the blocks of a fused kernel's second output write, and their epilogue.
    out2: (*mut f32, usize),
    epilogue2: Epilogue<'a>,
}

impl<'a, T> Tile<'a, T> {
    /// Where the rows of the first output (or of the second) go, and their epilogue.
    fn output(&self, second: bool) -> ((*mut f32, usize), Epilogue<'a>) {
        if second {
            (self.out2, self.epilogue2)
        } else {
            (self.out, self.epilogue)
        }
    }
}

/// The AVX-512 kernels' walk (see [`BlockConv::forward_into`]): columns `c0 .. c1` of blocks
/// `b0 .. b1`, first-output rows to `out` through `epilogue`, second-output ones to `second`;
/// each tile handed to `run(blocks, tile, V)`, `V` its vectors of 16 positions (tiles
/// narrower than 48, the batch's last columns or batch 1's small images, keep only the
/// vectors they need in registers). With `to_bf16` the halo is bfloat16's (`T` = `u16`),
/// else `f32`'s (`T` = `f32`).
///
/// # Safety
/// As the AVX-512 kernel's `forward`; `run` reads the tile's halo as `T`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
unsafe fn walk_avx512<T>(
    k: &BlockConv,
    x: &[f32],
    d: &ConvDims,
    (c0, c1): (usize, usize),
    (b0, b1): (usize, usize),
    ((yp, ldy), epilogue, second): (
        (*mut f32, usize),
        Epilogue<'_>,
        Option<(*mut f32, usize, Epilogue<'_>)>,
    ),
    to_bf16: Option<Bf16Halo>,
    mut run: impl FnMut(&[ConvBlock], &Tile<'_, T>, usize),
) {
    let (yp2, ldy2, epilogue2) = second.unwrap_or((yp, ldy, epilogue));
    let blocks = &k.blocks[b0..b1];
    let bf16 = to_bf16.is_some();
    walk_tiles(
        k,
        x,
        d,
        (c0, c1),
        blocks,
        to_bf16,
        |window, window16, t0, width, masks, offs| {
            let tile = Tile {
                offs,
                hp: if bf16 {
                    window16.cast::<T>()
                } else {
                    window.cast::<T>()
                },
                masks,
                full: super::direct::lanes(width),
                out: (yp, ldy),
                t0,
                c0,
                epilogue,
                out2: (yp2, ldy2),
                epilogue2,
            };
            run(blocks, &tile, width.div_ceil(16));
        },
    );
}

/// Every panel of every block of `blocks`, in order, as `f(block, q, rows, offs)`: its index
/// `q` in the block, its rows (at most `MR`), and the block's columns' halo offsets, from
/// `offs` (every block's, block after block).
#[inline(always)]
fn each_panel(
    blocks: &[ConvBlock],
    offs: &[usize],
    mut f: impl FnMut(&ConvBlock, usize, &[u32], *const usize),
) {
    let mut first = 0;
    for b in blocks {
        let at = offs.get(first..).map_or(offs.as_ptr(), <[usize]>::as_ptr);
        first += b.chans.len();
        for (q, rows) in b.rows.chunks(MR).enumerate() {
            f(b, q, rows, at);
        }
    }
}

/// `$panel::<V, R>(args)` for the `R = $rows` rows of a panel (`1 ..= MR`) as a constant:
/// a block of one row (Regroup of a layer with few channels, or a block's last rows) runs
/// one row's products, not eight with seven of zeros.
macro_rules! by_rows {
    ($rows:expr, $panel:ident::<$v:ident>($($arg:expr),*)) => {
        match $rows {
            1 => $panel::<$v, 1>($($arg),*),
            2 => $panel::<$v, 2>($($arg),*),
            3 => $panel::<$v, 3>($($arg),*),
            4 => $panel::<$v, 4>($($arg),*),
            5 => $panel::<$v, 5>($($arg),*),
            6 => $panel::<$v, 6>($($arg),*),
            7 => $panel::<$v, 7>($($arg),*),
            _ => $panel::<$v, MR>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod bf16;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{each_panel, walk_avx512, BlockConv, ConvBlock, Epilogue, Tile, MR};

    use crate::conv::ConvDims;
    use crate::engine::direct::avx512::store_row;
    use crate::engine::direct::lanes;
    use crate::engine::micro::rank1;
    use crate::engine::tiled::pairs;
    use crate::simd::Avx512;

    /// See [`BlockConv::forward_into`].
    ///
    /// # Safety
    /// AVX-512F must be available; `x` holds `cin × B·H·W` values, `y` is
    /// valid for columns `0 .. c1 − c0` of every row of blocks `b0 .. b1` at stride `ldy`, and
    /// the bias (if any) holds `cout` values; likewise `second` for the blocks of the second
    /// output, which is `Some` if any of blocks `b0 .. b1` is one.
    #[target_feature(enable = "avx512f")]
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
        walk_avx512::<f32>(
            k,
            x,
            d,
            cols,
            share,
            outs,
            None,
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
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run_tile<const V: usize>(blocks: &[ConvBlock], t: &Tile<'_, f32>) {
        each_panel(blocks, t.offs, |b, q, rows, offs| {
            let p = Panel {
                w: b.panels.as_ptr().add(q * b.chans.len() * MR),
                offs,
                runs: &b.runs,
                rows,
                second: b.second,
            };
            by_rows!(rows.len(), panel::<V>(&p, t));
        });
    }

    /// One panel of a block: its values, the block's columns and the panel's output rows.
    struct Panel<'a> {
        /// `kn × MR` values, column after column (`kn` the block's columns).
        w: *const f32,
        /// The block's columns' halo offsets.
        offs: *const usize,
        /// The block's runs `(tap, k0, k1)` of columns `k0 .. k1` that read one tap.
        runs: &'a [(u32, u32, u32)],
        /// At most `MR` output rows.
        rows: &'a [u32],
        /// Whether they are rows of the second output.
        second: bool,
    }

    /// The first `R` rows (all the panel has) of a panel on one tile of `V·16` positions.
    ///
    /// # Safety
    /// AVX-512F must be available (inlined into the kernel, which enables it); otherwise as
    /// [`forward`], which made `t`; `p.rows` holds `R` rows.
    #[inline(always)]
    unsafe fn panel<const V: usize, const R: usize>(p: &Panel<'_>, t: &Tile<'_, f32>) {
        let ((yp, ldy), epilogue) = t.output(p.second);
        let (masks, hp, w, offs) = (t.masks, t.hp, p.w, p.offs);
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for &(tap, k0, k1) in p.runs {
            // Lane j reads halo position offs + j; masked lanes (padding, or past the range)
            // read nothing. A run's columns read one tap: its masks are loaded once.
            let m = *masks.get_unchecked(tap as usize);
            for kc in k0 as usize..k1 as usize {
                let row = hp.add(*offs.add(kc));
                let mut xv = [_mm512_setzero_ps(); V];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(m[j], row.add(j * 16));
                }
                rank1::<Avx512, R, V>(&mut acc, w.add(kc * MR), &xv);
            }
        }
        // Row by row with constant indices (`R ≤ MR` rows, written out): a loop over the
        // rows, not unrolled with the epilogue inlined, indexed the register tile at run time,
        // so LLVM kept it in a stack copy, zeroed by a `memset` per panel (2% of a
        // shuffled-block network's time).
        macro_rules! store {
            ($($i:literal)*) => {$(
                if $i < R {
                    let r = *p.rows.get_unchecked($i) as usize;
                    let out = yp.add(r * ldy + (t.t0 - t.c0));
                    store_row(&acc[$i], out, t.full, false, epilogue, r, t.t0);
                }
            )*};
        }
        const { assert!(R <= MR && MR == 8) };
        store!(0 1 2 3 4 5 6 7);
    }

    /// See [`BlockConv::forward_narrow_into`]: per block, panels of `MR` rows three at a
    /// time against one vector of a tile per column, tile after tile.
    ///
    /// # Safety
    /// AVX-512F must be available; `xt` holds `⌈n/16⌉` tiles of 16 values per im2col row of
    /// every block's columns, `y` is valid for columns `0 .. n` of every row of blocks `b0 .. b1` at stride
    /// `ldy`, and the bias (if any) holds `cout` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_narrow(
        k: &BlockConv,
        xt: &[f32],
        n: usize,
        (b0, b1): (usize, usize),
        (yp, ldy): (*mut f32, usize),
        epilogue: Epilogue<'_>,
    ) {
        let tile = k.cin * k.g.taps() * 16;
        for b in &k.blocks[b0..b1] {
            let kn = b.ids.len();
            let panels = b.rows.len().div_ceil(MR);
            let mut q = 0;
            while q < panels {
                if n <= 4 {
                    // At most four columns: rows in the lanes, pairs of columns of the block.
                    let group = (panels - q).min(4);
                    let mut out = [[[0.0f32; MR]; 4]; 4];
                    match group {
                        4 => pair_panels::<4>(b, q, kn, xt.as_ptr(), &mut out),
                        3 => pair_panels::<3>(b, q, kn, xt.as_ptr(), &mut out),
                        2 => pair_panels::<2>(b, q, kn, xt.as_ptr(), &mut out),
                        _ => pair_panels::<1>(b, q, kn, xt.as_ptr(), &mut out),
                    }
                    for (g, panel) in out.iter().enumerate().take(group) {
                        let first = (q + g) * MR;
                        for (i, &r) in b.rows[first..].iter().take(MR).enumerate() {
                            let mut v = [0.0f32; 16];
                            for (j, col) in panel.iter().enumerate().take(n) {
                                v[j] = col[i];
                            }
                            let out = yp.add(r as usize * ldy);
                            let r = r as usize;
                            let row = [_mm512_loadu_ps(v.as_ptr())];
                            store_row::<1>(&row, out, lanes(n), false, epilogue, r, 0);
                        }
                    }
                    q += group;
                    continue;
                }
                let group = (panels - q).min(3);
                for t0 in (0..n).step_by(16) {
                    let xp = xt.as_ptr().add(t0 / 16 * tile);
                    let full = lanes((n - t0).min(16));
                    let mut acc = [[_mm512_setzero_ps(); MR]; 3];
                    match group {
                        3 => narrow_panels::<3>(b, q, kn, xp, &mut acc),
                        2 => narrow_panels::<2>(b, q, kn, xp, &mut acc),
                        _ => narrow_panels::<1>(b, q, kn, xp, &mut acc),
                    }
                    for (g, panel) in acc.iter().enumerate().take(group) {
                        let first = (q + g) * MR;
                        for (i, &r) in b.rows[first..].iter().take(MR).enumerate() {
                            let out = yp.add(r as usize * ldy + t0);
                            let r = r as usize;
                            store_row::<1>(&[panel[i]], out, full, false, epilogue, r, t0);
                        }
                    }
                }
                q += group;
            }
        }
    }

    /// `acc[g][i] = Σ_k panel(q + g)[k][i] · xt[ids[k]]` for `P` panels of block `b` from
    /// panel `q` (`kn` columns each).
    ///
    /// # Safety
    /// As [`forward_narrow`]; panels `q .. q + P` exist.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn narrow_panels<const P: usize>(
        b: &ConvBlock,
        q: usize,
        kn: usize,
        xp: *const f32,
        out: &mut [[__m512; MR]; 3],
    ) {
        let mut acc = [[_mm512_setzero_ps(); MR]; P];
        let ids = b.ids.as_ptr();
        let wp = b.panels.as_ptr().add(q * kn * MR);
        for kc in 0..kn {
            if kc % 2 == 0 {
                // The panels stream from memory: fetched 64 columns (2 KiB) ahead.
                for g in 0..P {
                    let ahead = (g * kn + kc + 64) * MR;
                    if kc + 64 < kn {
                        _mm_prefetch::<_MM_HINT_T0>(wp.add(ahead).cast());
                    }
                }
            }
            let xv = _mm512_loadu_ps(xp.add(*ids.add(kc) as usize * 16));
            for (g, panel) in acc.iter_mut().enumerate() {
                let wc = wp.add((g * kn + kc) * MR);
                for (i, a) in panel.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*wc.add(i)), xv, *a);
                }
            }
        }
        out[..P].copy_from_slice(&acc);
    }

    /// `out[g][j][i] = Σ_k panel(q + g)[k][i] · xt[ids[k]][j]` for `P` panels of block `b`
    /// from panel `q` and the first four columns: a panel's 16 values at `k` are its 8 rows at
    /// columns `k` and `k + 1` of the block, multiplied by each column's two inputs permuted
    /// into the halves of a vector (once per pair, shared by the panels); the halves are added
    /// at the end (as the dense narrow kernel's `pairs`).
    ///
    /// # Safety
    /// As [`forward_narrow`]; panels `q .. q + P` exist.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn pair_panels<const P: usize>(
        b: &ConvBlock,
        q: usize,
        kn: usize,
        xp: *const f32,
        out: &mut [[[f32; MR]; 4]; 4],
    ) {
        let idx = pairs::indices();
        let ids = b.ids.as_ptr();
        let wp = b.panels.as_ptr().add(q * kn * MR);
        let mut acc = [[_mm512_setzero_ps(); 4]; P];
        let mut kc = 0;
        while kc < kn {
            let pair = kc + 1 < kn;
            if kc % 16 == 0 && kc + 64 < kn {
                // The panels stream from memory: fetched 64 columns (2 KiB) ahead.
                for g in 0..P {
                    _mm_prefetch::<_MM_HINT_T0>(wp.add((g * kn + kc + 64) * MR).cast());
                    _mm_prefetch::<_MM_HINT_T0>(wp.add((g * kn + kc + 80) * MR).cast());
                }
            }
            let xa = _mm512_loadu_ps(xp.add(*ids.add(kc) as usize * 16));
            let xb = if pair {
                _mm512_loadu_ps(xp.add(*ids.add(kc + 1) as usize * 16))
            } else {
                _mm512_setzero_ps()
            };
            let px: [__m512; 4] = std::array::from_fn(|j| _mm512_permutex2var_ps(xa, idx[j], xb));
            let m: u16 = if pair { u16::MAX } else { 0xff };
            for (g, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_ps(m, wp.add((g * kn + kc) * MR));
                for (aj, &p) in a.iter_mut().zip(&px) {
                    *aj = _mm512_fmadd_ps(wv, p, *aj);
                }
            }
            kc += 2;
        }
        for (g, a) in acc.iter().enumerate() {
            for (j, &v) in a.iter().enumerate() {
                _mm256_storeu_ps(out[g][j].as_mut_ptr(), pairs::add_halves(v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use coarsen_core::Mask;

    use super::*;
    use crate::engine::direct::Residual;
    use crate::formats::test_util::masked;
    use crate::formats::{Bsr, GroupBlocks, ShuffledBlocks};
    use crate::reference;
    use crate::simd::Isa;

    fn rng(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    /// A mask of row groups of `rg` rows, each keeping its own random columns (about
    /// `keep` of them), with some rows left empty: the shape of group and shuffled patterns.
    fn grouped_mask(rows: usize, cols: usize, rg: usize, keep: f32, seed: u64) -> Mask {
        let mut r = rng(seed);
        let picks: Vec<Vec<bool>> = (0..rows.div_ceil(rg))
            .map(|_| (0..cols).map(|_| r() + 0.5 < keep).collect())
            .collect();
        Mask::from_fn(rows, cols, |i, j| i % 7 != 3 && picks[i / rg][j])
    }

    /// The im2col product of the masked weight, `cout × n`.
    fn want(d: &ConvDims, w: &[f32], cout: usize, x: &[f32]) -> Vec<f32> {
        let (k, n) = (d.rows(), d.n());
        let mut col = vec![0.0; k * n];
        d.im2col_range(x, 0, n, &mut col).unwrap();
        reference::forward(w, cout, k, &col, n)
    }

    fn close(a: f32, e: f32) -> bool {
        (a - e).abs() <= 1e-4 * (1.0 + e.abs())
    }

    #[test]
    fn a_fused_downsample_writes_what_the_two_kernels_write() {
        if !matches!(Isa::detect(), Isa::Avx512 | Isa::Avx2) {
            return;
        }
        let (g3, g1) = (ConvGeometry::square(3, 2, 1), ConvGeometry::square(1, 2, 0));
        let mut r = rng(11);
        for &(cout, cout2, cin, b, h, w) in &[
            (8, 8, 3, 2, 6, 4),
            (19, 23, 21, 3, 8, 8),
            (33, 17, 16, 2, 16, 16),
            (12, 40, 9, 1, 4, 40),
            (64, 64, 32, 4, 32, 32),
        ] {
            let d3 = ConvDims::new(&[cin, b, h, w], g3).unwrap();
            let d1 = ConvDims::new(&[cin, b, h, w], g1).unwrap();
            let n = d3.n();
            assert_eq!(n, d1.n());
            let (k3, k1) = (cin * 9, cin);
            let v3: Vec<f32> = (0..cout * k3).map(|_| r()).collect();
            let v1: Vec<f32> = (0..cout2 * k1).map(|_| r()).collect();
            let x: Vec<f32> = (0..cin * b * h * w).map(|_| r()).collect();
            let m3 = grouped_mask(cout, k3, 8, 0.3, cout as u64 + 7);
            let m1 = grouped_mask(cout2, k1, 8, 0.4, cout2 as u64 + 9);
            for (p3, p1) in [
                (
                    Packed::Group(GroupBlocks::pack(&m3, &v3).unwrap()),
                    Packed::Group(GroupBlocks::pack(&m1, &v1).unwrap()),
                ),
                (
                    Packed::Shuffled(ShuffledBlocks::pack(&m3, &v3, 4).unwrap()),
                    Packed::Shuffled(ShuffledBlocks::pack(&m1, &v1, 4).unwrap()),
                ),
            ] {
                for bf16 in [false, true] {
                    let mut a = BlockConv::new(g3, cin, &p3, None).unwrap().unwrap();
                    let mut c = BlockConv::new(g1, cin, &p1, None).unwrap().unwrap();
                    // The bfloat16 kernel where the CPU has it (the fused kernel keeps it).
                    if bf16 && !(a.set_bf16(true) && c.set_bf16(true)) {
                        continue;
                    }
                    // Only a 3×3 stride-2 kernel takes a 1×1 stride-2 one of the same input.
                    assert!(c.fuse_strided_1x1(&a).is_none());
                    assert!(a.fuse_strided_1x1(&a).is_none());
                    let f = a.fuse_strided_1x1(&c).unwrap();
                    assert_eq!(f.bf16(), bf16);
                    assert!(f.fuse_strided_1x1(&c).is_none());
                    assert_eq!((f.out_dim(), f.second_out_dim()), (cout, cout2));
                    assert!(!f.narrow());
                    // A fused kernel writes two outputs or none; another kernel never two.
                    let mut y = vec![0.0; cout * n];
                    assert!(f.forward(&x, &d3, 0, n, &mut y).is_err());
                    let (b1, b2): (Vec<f32>, Vec<f32>) = (
                        (0..cout).map(|_| r()).collect(),
                        (0..cout2).map(|_| r()).collect(),
                    );
                    let res: Vec<f32> = (0..cout2 * n).map(|_| r()).collect();
                    let e1 = Epilogue {
                        bias: Some(&b1),
                        residual: None,
                        relu: true,
                    };
                    let e2 = Epilogue {
                        bias: Some(&b2),
                        residual: Some(Residual {
                            values: &res,
                            ld: n,
                        }),
                        relu: false,
                    };
                    let mut z = vec![0.0; cout2 * n];
                    // SAFETY: both buffers hold every row of all n columns.
                    let refused = unsafe {
                        a.forward_pair_into(
                            &x,
                            &d3,
                            (0, n),
                            (0, a.blocks()),
                            (y.as_mut_ptr(), n, e1),
                            (z.as_mut_ptr(), n, e2),
                        )
                    };
                    assert!(refused.is_err());
                    // The two kernels, each on its own.
                    let (mut w1, mut w2) = (vec![0.0f32; cout * n], vec![0.0f32; cout2 * n]);
                    // SAFETY: as above.
                    unsafe {
                        a.forward_into(&x, &d3, (0, n), (0, a.blocks()), w1.as_mut_ptr(), n, e1)
                            .unwrap();
                        c.forward_into(&x, &d1, (0, n), (0, c.blocks()), w2.as_mut_ptr(), n, e2)
                            .unwrap();
                    }
                    assert!(w1.iter().any(|&v| v > 0.0) && w2.iter().any(|&v| v < 0.0));
                    for parts in [1, 2, 5] {
                        for (c0, c1) in [(0, n), (3, n - n / 4), (n / 2, n)] {
                            let (mut y, mut z) =
                                (vec![f32::NAN; cout * n], vec![f32::NAN; cout2 * n]);
                            for share in f.shares(parts) {
                                // SAFETY: as above; shares write disjoint rows.
                                unsafe {
                                    f.forward_pair_into(
                                        &x,
                                        &d3,
                                        (c0, c1),
                                        share,
                                        (y.as_mut_ptr().add(c0), n, e1),
                                        (z.as_mut_ptr().add(c0), n, e2),
                                    )
                                    .unwrap()
                                };
                            }
                            // The same products in the same order: the same bits.
                            for (got, want, rows) in [(&y, &w1, cout), (&z, &w2, cout2)] {
                                for rr in 0..rows {
                                    for j in 0..n {
                                        let (g, e) = (got[rr * n + j], want[rr * n + j]);
                                        if j < c0 || j >= c1 {
                                            assert!(g.is_nan(), "written outside {c0}..{c1}");
                                        } else {
                                            assert_eq!(
                                                g.to_bits(),
                                                e.to_bits(),
                                                "[{cout}+{cout2},{cin},{b},{h},{w}] {parts} parts \
                                             {c0}..{c1} ({rr}, {j}): {g} vs {e}"
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `v` rounded to bfloat16.
    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|&x| f32::from_bits(u32::from(bf16_bits(x)) << 16))
            .collect()
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        for (x, want) in [
            (1.0f32, 0x3f80u16),
            (-2.5, 0xc020),
            // Halfway between 1 and the next bfloat16 (1 + 2⁻⁷): to the even one, 1.
            (f32::from_bits(0x3f80_8000), 0x3f80),
            // Halfway above an odd one: up to the even one.
            (f32::from_bits(0x3f81_8000), 0x3f82),
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (f32::INFINITY, 0x7f80),
            (f32::MAX, 0x7f80),
            (0.0, 0),
        ] {
            assert_eq!(bf16_bits(x), want, "{x:e}");
        }
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
        // Pairs: a column's values in the low half, the next one's in the high half, a last
        // odd column paired with 0; panel after panel.
        let kn = 3;
        let panels: Vec<f32> = (0..2 * kn * MR).map(|i| i as f32).collect();
        let pairs = pack_pairs(&panels, kn);
        assert_eq!(pairs.len(), 2 * 2 * MR);
        let half = |w: u32, hi: bool| f32::from_bits(if hi { w & 0xffff_0000 } else { w << 16 });
        for q in 0..2 {
            for i in 0..MR {
                let at = |k: usize| panels[q * kn * MR + k * MR + i];
                let w0 = pairs[q * 2 * MR + i];
                let w1 = pairs[q * 2 * MR + MR + i];
                assert_eq!((half(w0, false), half(w0, true)), (at(0), at(1)));
                assert_eq!((half(w1, false), half(w1, true)), (at(2), 0.0));
            }
        }
    }

    /// The stride-2 halos' split into bfloat16: every even and odd value of a row rounded as
    /// `bf16_bits` rounds it, either output alone or both, every length up to three vectors
    /// and a last odd value; nothing written past the `n` positions.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_bf16_split_rounds_each_phase_of_a_row() {
        if !BlockConv::bf16_available() {
            return;
        }
        // Values that need rounding, ties and signs among them.
        let value = |i: usize| {
            let bits = 0x3f80_0000u32 + (i as u32).wrapping_mul(0x9e37) % 0x0001_0000;
            f32::from_bits(bits) * if i.is_multiple_of(3) { -1.5 } else { 1.0 }
        };
        for n in 0..50usize {
            for len in [2 * n, (2 * n).saturating_sub(1)] {
                let src: Vec<f32> = (0..len).map(value).collect();
                for (we, wo) in [(true, true), (true, false), (false, true)] {
                    // A last odd value has no odd partner: odd only with a full row.
                    if wo && len < 2 * n {
                        continue;
                    }
                    let (mut e, mut o) = (vec![0xffffu16; n + 2], vec![0xffffu16; n + 2]);
                    // SAFETY: AVX-512 BF16 is available; `src` holds `len ≥ 2n − 1` values
                    // (`2n` with the odd output) and each output `n` past its first slot.
                    unsafe {
                        bf16::split_pairs(
                            src.as_ptr(),
                            len,
                            n,
                            we.then(|| e.as_mut_ptr().add(1)),
                            wo.then(|| o.as_mut_ptr().add(1)),
                        )
                    };
                    for j in 0..n + 2 {
                        let inside = (1..=n).contains(&j);
                        let want = |on: bool, at: usize| {
                            if on && inside {
                                bf16_bits(src[at])
                            } else {
                                0xffff
                            }
                        };
                        let at = 2 * (j.max(1) - 1);
                        assert_eq!(e[j], want(we, at), "{n} pairs of {len}, even {j}");
                        assert_eq!(o[j], want(wo, at + 1), "{n} pairs of {len}, odd {j}");
                    }
                }
            }
        }
    }

    /// The bfloat16 kernel computes the products of the rounded weights and inputs, summed in
    /// `f32`, for every block format, geometry, range and share (where the CPU has AVX-512
    /// BF16; elsewhere it stays off).
    #[test]
    fn the_bf16_kernel_multiplies_the_rounded_values() {
        let geometries = [
            ConvGeometry::square(3, 1, 1),
            ConvGeometry::square(1, 1, 0),
            ConvGeometry::square(5, 1, 2),
            ConvGeometry::square(3, 2, 1),
            ConvGeometry::square(1, 2, 0),
        ];
        let mut r = rng(17);
        let mut ran = false;
        for g in geometries {
            for &(cout, cin, b, h, w) in &[
                (8, 3, 2, 6, 4),
                (19, 21, 3, 8, 8),
                (17, 5, 1, 1, 1),
                (33, 16, 2, 8, 8),
                (12, 9, 1, 4, 10),
                (10, 6, 3, 10, 12),
                (20, 7, 2, 2, 4),
                (9, 4, 2, 4, 40),
            ] {
                if g.stride == [2, 2] && (h % 2 == 1 || w % 2 == 1) {
                    continue;
                }
                let d = ConvDims::new(&[cin, b, h, w], g).unwrap();
                let kk = cin * g.taps();
                let n = d.n();
                let values: Vec<f32> = (0..cout * kk).map(|_| r()).collect();
                let x: Vec<f32> = (0..cin * b * h * w).map(|_| r()).collect();
                let mask = grouped_mask(cout, kk, 5, 0.3, cout as u64 * 29 + cin as u64);
                let e = want(&d, &masked(&mask, &rounded(&values)), cout, &rounded(&x));
                // What the f32 kernel computes: the rounding shows (this test would fail on
                // a kernel that did not round).
                let e32 = want(&d, &masked(&mask, &values), cout, &x);
                assert!(e.iter().zip(&e32).any(|(a, b)| !close(*a, *b)));
                for packed in [
                    Packed::Group(GroupBlocks::pack(&mask, &values).unwrap()),
                    Packed::Shuffled(ShuffledBlocks::pack(&mask, &values, 4).unwrap()),
                    Packed::Bsr(Bsr::pack(&mask, &values, 4, 3).unwrap()),
                ] {
                    let Some(mut k) = BlockConv::new(g, cin, &packed, None).unwrap() else {
                        continue;
                    };
                    let on = k.set_bf16(true);
                    assert_eq!(on, k.bf16());
                    if !on {
                        #[cfg(target_arch = "x86_64")]
                        assert!(Isa::detect() != Isa::Avx512 || !bf16::available());
                        continue;
                    }
                    ran = true;
                    let name = packed.name();
                    let bias: Vec<f32> = (0..cout).map(|_| r()).collect();
                    let res: Vec<f32> = (0..cout * n).map(|_| r()).collect();
                    let ranges = [(0, n), (1, n), (n / 3, n - n / 5), (n, n)];
                    for (parts, (c0, c1)) in ranges.into_iter().enumerate() {
                        let ep = Epilogue {
                            bias: Some(&bias),
                            residual: (parts % 2 == 1).then_some(Residual {
                                values: &res,
                                ld: n,
                            }),
                            relu: parts % 2 == 0,
                        };
                        let mut y = vec![f32::NAN; cout * n];
                        for share in k.shares(parts + 1) {
                            // SAFETY: every row of n columns lies inside `y`.
                            unsafe {
                                k.forward_into(
                                    &x,
                                    &d,
                                    (c0, c1),
                                    share,
                                    y.as_mut_ptr().add(c0),
                                    n,
                                    ep,
                                )
                            }
                            .unwrap();
                        }
                        for rr in 0..cout {
                            for j in 0..n {
                                let got = y[rr * n + j];
                                if j < c0 || j >= c1 {
                                    assert!(got.is_nan(), "{name} wrote outside {c0}..{c1}");
                                    continue;
                                }
                                let rv = if parts % 2 == 1 { res[rr * n + j] } else { 0.0 };
                                let v = e[rr * n + j] + bias[rr] + rv;
                                let v = if parts % 2 == 0 { v.max(0.0) } else { v };
                                assert!(
                                    close(got, v),
                                    "{name} {g:?} [{cout},{cin},{b},{h},{w}] {c0}..{c1} \
                                     ({rr}, {j}): {got} vs {v}"
                                );
                            }
                        }
                    }
                    // Turned off, the f32 kernel again.
                    assert!(!k.set_bf16(false));
                    let mut y = vec![0.0; cout * n];
                    k.forward(&x, &d, 0, n, &mut y).unwrap();
                    assert!(y.iter().zip(&e32).all(|(a, b)| close(*a, *b)));
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(ran, Isa::detect() == Isa::Avx512 && bf16::available());
    }

    #[test]
    fn matches_im2col_times_the_weight_for_every_block_format() {
        if !matches!(Isa::detect(), Isa::Avx512 | Isa::Avx2) {
            return;
        }
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
            ConvGeometry::square(3, 2, 1),
            // A subsample (1×1, stride 2): one of the input's phases.
            ConvGeometry::square(1, 2, 0),
        ];
        let mut r = rng(5);
        for g in geometries {
            for &(cout, cin, b, h, w) in &[
                (8, 3, 2, 6, 4),
                (19, 21, 3, 7, 7),
                (17, 5, 1, 1, 1),
                (33, 16, 2, 8, 8),
                (5, 3, 2, 2, 2),
                (12, 9, 1, 4, 10),
                // More columns than one halo copy serves (four tiles).
                (10, 6, 3, 10, 12),
                // Batch 1's deep layers: one vector of output positions or less.
                (40, 12, 1, 4, 4),
                (20, 7, 2, 2, 3),
                // Rows of 20 outputs at stride 2 (a vector and a masked tail per row).
                (9, 4, 2, 4, 40),
                // Padded halos (AVX2, stride 1): several halos per image of rows of 33, and
                // the narrowest rows they take.
                (6, 5, 2, 12, 33),
                (7, 4, 3, 3, PADDED_MIN_WIDTH),
            ] {
                if g.stride == [2, 2] && (h % 2 == 1 || w % 2 == 1) {
                    continue;
                }
                let d = ConvDims::new(&[cin, b, h, w], g).unwrap();
                // The 3×3 layers of ResNets and VGGs run on padded halos from rows of 16 on.
                if g == ConvGeometry::square(3, 1, 1) {
                    assert_eq!(padded_geometry(&g, &d), w >= PADDED_MIN_WIDTH);
                }
                let kk = cin * g.taps();
                let n = d.n();
                let values: Vec<f32> = (0..cout * kk).map(|_| r()).collect();
                let x: Vec<f32> = (0..cin * b * h * w).map(|_| r()).collect();
                let mask = grouped_mask(cout, kk, 5, 0.3, cout as u64 * 31 + cin as u64);
                let masked = masked(&mask, &values);
                let e = want(&d, &masked, cout, &x);
                let formats = [
                    Packed::Group(GroupBlocks::pack(&mask, &values).unwrap()),
                    Packed::Shuffled(ShuffledBlocks::pack(&mask, &values, 4).unwrap()),
                    Packed::Bsr(Bsr::pack(&mask, &values, 4, 3).unwrap()),
                ];
                for packed in &formats {
                    let Some(k) = BlockConv::new(g, cin, packed, None).unwrap() else {
                        // AVX2 has the in-place kernel only.
                        assert!(Isa::detect() == Isa::Avx2 && !in_place_geometry(&g));
                        continue;
                    };
                    assert_eq!(k.accepts(&d), k.in_place());
                    let name = packed.name();
                    let ranges = if k.in_place() {
                        let mut r = vec![(0, n), (1, n), (0, n / 2), (n / 3, n - n / 5), (n, n)];
                        // Three full tiles, then 64 positions as two tiles of 32: the last
                        // reaches past the first halo.
                        if n >= 213 {
                            r.extend([(0, 208), (5, 213)]);
                        }
                        r
                    } else {
                        // A geometry only the narrow kernel runs: the in-place one refuses it.
                        let mut y = vec![0.0; cout * n];
                        assert!(k.forward(&x, &d, 0, n, &mut y).is_err());
                        Vec::new()
                    };
                    for (c0, c1) in ranges {
                        let mut y = vec![f32::NAN; cout * (c1 - c0)];
                        k.forward(&x, &d, c0, c1, &mut y).unwrap();
                        for rr in 0..cout {
                            for j in 0..c1 - c0 {
                                let (a, w) = (y[rr * (c1 - c0) + j], e[rr * n + c0 + j]);
                                assert!(
                                    close(a, w),
                                    "{name} {g:?} [{cout},{cin},{b},{h},{w}] {c0}..{c1} \
                                     ({rr}, {j}): {a} vs {w}"
                                );
                            }
                        }
                    }
                    // Shares of blocks, into a wider buffer through bias, a residual (odd
                    // part counts) and ReLU (even ones).
                    let bias: Vec<f32> = (0..cout).map(|_| r()).collect();
                    let ldr = n + 1;
                    let res: Vec<f32> = (0..cout * ldr).map(|_| r()).collect();
                    let ldy = n + 3;
                    for parts in [1, 2, 3, 100] {
                        let shares = k.shares(parts);
                        assert!(shares.len() <= parts.max(1));
                        assert_eq!(shares.first().map(|s| s.0), Some(0));
                        assert_eq!(shares.last().map(|s| s.1), Some(k.blocks()));
                        assert!(shares.windows(2).all(|p| p[0].1 == p[1].0));
                        // Shares write through bias, a residual (odd part counts) and ReLU
                        // (even ones); every value of each row's n columns is checked, and the
                        // rest of the row left alone.
                        let ep = Epilogue {
                            bias: Some(&bias),
                            residual: (parts % 2 == 1).then_some(Residual {
                                values: &res,
                                ld: ldr,
                            }),
                            relu: parts % 2 == 0,
                        };
                        let check = |y: &[f32], what: &str| {
                            for rr in 0..cout {
                                for j in 0..n {
                                    let rv = if parts % 2 == 1 {
                                        res[rr * ldr + j]
                                    } else {
                                        0.0
                                    };
                                    let v = e[rr * n + j] + bias[rr] + rv;
                                    let v = if parts % 2 == 0 { v.max(0.0) } else { v };
                                    assert!(
                                        close(y[rr * ldy + j], v),
                                        "{name} {g:?} {what} share ({rr}, {j})"
                                    );
                                }
                                assert!(y[rr * ldy + n..(rr + 1) * ldy].iter().all(|v| v.is_nan()));
                            }
                        };
                        let mut y = vec![f32::NAN; cout * ldy];
                        if k.in_place() {
                            for &(b0, b1) in &shares {
                                // SAFETY: every row of n columns at stride ldy lies inside `y`.
                                unsafe {
                                    k.forward_into(
                                        &x,
                                        &d,
                                        (0, n),
                                        (b0, b1),
                                        y.as_mut_ptr(),
                                        ldy,
                                        ep,
                                    )
                                }
                                .unwrap();
                            }
                            check(&y, "in-place");
                        }
                        // The narrow kernel on the same shares, from the im2col tile.
                        if n > BlockConv::NARROW || !k.narrow() {
                            let mut t = vec![0.0; k.narrow_len(n)];
                            assert!(k.narrow_input(&x, &d, &mut t).is_err());
                            continue;
                        }
                        let mut t = vec![f32::NAN; k.narrow_len(n)];
                        k.narrow_input(&x, &d, &mut t).unwrap();
                        let mut y2 = vec![f32::NAN; cout * ldy];
                        for &(b0, b1) in &shares {
                            // SAFETY: every row of n columns at stride ldy lies inside `y2`.
                            unsafe {
                                k.forward_narrow_into(&t, &d, (b0, b1), y2.as_mut_ptr(), ldy, ep)
                            }
                            .unwrap();
                        }
                        check(&y2, "narrow");
                        // A short tile is refused.
                        // SAFETY: as above (the call fails its checks before writing).
                        let short = unsafe {
                            k.forward_narrow_into(
                                &t[1..],
                                &d,
                                (0, k.blocks()),
                                y2.as_mut_ptr(),
                                ldy,
                                Epilogue::default(),
                            )
                        };
                        assert!(short.is_err());
                    }
                }
            }
        }
    }

    /// Matrix columns that are a subset of the im2col rows (`read`), as the engine packs group
    /// layers whose other columns no kept weight uses.
    #[test]
    fn reads_a_subset_of_the_im2col_rows() {
        if !matches!(Isa::detect(), Isa::Avx512 | Isa::Avx2) {
            return;
        }
        let g = ConvGeometry::square(3, 1, 1);
        let (cout, cin) = (10, 6);
        let d = ConvDims::new(&[cin, 2, 5, 6], g).unwrap();
        let kk = cin * 9;
        let read: Vec<u32> = (0..kk as u32)
            .filter(|c| c % 4 != 1 && c % 9 != 7)
            .collect();
        let mut r = rng(9);
        let sub: Vec<f32> = (0..cout * read.len()).map(|_| r()).collect();
        let mask = grouped_mask(cout, read.len(), 3, 0.5, 2);
        let mut full = vec![0.0f32; cout * kk];
        for i in 0..cout {
            for (j, &c) in read.iter().enumerate() {
                if mask.get(i, j) {
                    full[i * kk + c as usize] = sub[i * read.len() + j];
                }
            }
        }
        let x: Vec<f32> = (0..cin * d.b * 30).map(|_| r()).collect();
        let e = want(&d, &full, cout, &x);
        let packed = Packed::Group(GroupBlocks::pack(&mask, &sub).unwrap());
        let k = BlockConv::new(g, cin, &packed, Some(&read))
            .unwrap()
            .unwrap();
        let n = d.n();
        let mut y = vec![0.0; cout * n];
        k.forward(&x, &d, 0, n, &mut y).unwrap();
        assert!(y.iter().zip(&e).all(|(a, w)| close(*a, *w)));
        // A matrix whose columns are not the rows read, or a row past the im2col matrix, is
        // refused.
        assert!(BlockConv::new(g, cin, &packed, None).is_err());
        let mut bad = read.clone();
        *bad.last_mut().unwrap() = kk as u32;
        assert!(BlockConv::new(g, cin, &packed, Some(&bad)).is_err());
    }

    /// The halo buffer is never cleared: a NaN input must not leak into the next call, and
    /// calls are checked before they run.
    #[test]
    fn calls_are_checked_and_leave_nothing_behind() {
        if !matches!(Isa::detect(), Isa::Avx512 | Isa::Avx2) {
            return;
        }
        let g = ConvGeometry::square(3, 1, 1);
        let (cout, cin) = (9, 4);
        let d = ConvDims::new(&[cin, 2, 4, 5], g).unwrap();
        let kk = cin * 9;
        let mask = grouped_mask(cout, kk, 4, 0.6, 3);
        let mut r = rng(1);
        let values: Vec<f32> = (0..cout * kk).map(|_| r()).collect();
        let masked = masked(&mask, &values);
        let k = BlockConv::new(
            g,
            cin,
            &Packed::Group(GroupBlocks::pack(&mask, &values).unwrap()),
            None,
        )
        .unwrap()
        .unwrap();
        let n = d.n();
        let x: Vec<f32> = (0..cin * n).map(|_| r()).collect();
        let mut y = vec![0.0; cout * n];
        k.forward(&vec![f32::NAN; x.len()], &d, 0, n, &mut y)
            .unwrap();
        k.forward(&x, &d, 0, n, &mut y).unwrap();
        let e = want(&d, &masked, cout, &x);
        assert!(y.iter().zip(&e).all(|(a, w)| close(*a, *w)));
        // Short output, short input, other sizes, blocks past the end, a short stride.
        assert!(k.forward(&x, &d, 0, n, &mut y[1..]).is_err());
        assert!(k.forward(&x[1..], &d, 0, n, &mut y).is_err());
        let other = ConvDims::new(&[cin + 1, 2, 4, 5], g).unwrap();
        assert!(!k.accepts(&other));
        let wider = vec![0.0; (cin + 1) * n];
        assert!(k.forward(&wider, &other, 0, n, &mut y).is_err());
        let ep = Epilogue::default();
        // SAFETY: refused before anything is written.
        unsafe {
            let p = y.as_mut_ptr();
            assert!(k
                .forward_into(&x, &d, (0, n), (0, k.blocks() + 1), p, n, ep)
                .is_err());
            assert!(k
                .forward_into(&x, &d, (0, n), (0, 1), p, n - 1, ep)
                .is_err());
            let short = Epilogue {
                bias: Some(&[0.0; 3]),
                ..Epilogue::default()
            };
            assert!(k.forward_into(&x, &d, (0, n), (0, 1), p, n, short).is_err());
        }
        // Formats without dense blocks have no kernel; geometries the in-place kernel does not
        // run have the narrow one only, which refuses more than one vector of columns.
        let dense = Packed::Dense(crate::formats::Dense::new(cout, kk, values.clone()).unwrap());
        assert!(BlockConv::new(g, cin, &dense, None).unwrap().is_none());
        let g3 = ConvGeometry::square(3, 3, 1);
        let group = Packed::Group(GroupBlocks::pack(&mask, &values).unwrap());
        let Some(k3) = BlockConv::new(g3, cin, &group, None).unwrap() else {
            // AVX2 has no narrow kernel: no kernel for a geometry only that one runs.
            assert_eq!(Isa::detect(), Isa::Avx2);
            return;
        };
        assert!(!k3.in_place());
        let d3 = ConvDims::new(&[cin, 8, 9, 9], g3).unwrap();
        assert!(!k3.accepts(&d3));
        let mut t = vec![0.0; k3.narrow_len(d3.n())];
        assert!(k3
            .narrow_input(&vec![0.0; cin * 8 * 81], &d3, &mut t)
            .is_err());
    }
}
