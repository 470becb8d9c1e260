//! # coarsen-kernels
//!
//! Packed structured-sparse formats and CPU kernels that turn structure into speed, next to the
//! strong dense GEMM (faer) they are measured against.
//!
//! - [`formats`]: channel-compact, group blocks, shuffled blocks, BSR, N:M compressed and CSR,
//!   each packed from a [`coarsen_core::Mask`] plus weights and unpacked back, or built from
//!   its parts: `from_parts` checks every invariant, the `unsafe` `from_parts_unchecked` only
//!   in debug builds. Fields are private, so formats are valid by construction.
//! - [`Plan`]: a packed matrix prepared once for an instruction set ([`Isa`]: AVX2/FMA,
//!   AVX-512, NEON or portable, chosen at run time), then run for `Y = W·X`, `dX = Wᵀ·dY` and
//!   the weight gradient restricted to the pattern, multi-threaded with rayon, without
//!   allocating.
//! - [`conv`]: convolution geometry, im2col and col2im over channel-major batches.
//! - [`gemm`]: dense GEMM with transposed operands (faer), for dense layers.
//! - [`mod@reference`]: the naive products every kernel is tested against.
//! - [`mod@team`]: parallel sections whose waiting threads spin, for passes held awake.
//! - [`mod@threads`]: thread pools whose workers are pinned, one per CPU.
//! - [`mod@timing`]: interleaved, repeated timing against the dense baseline.
//! - [`mod@bench`]: the benchmark shapes, random structured masks per format, and measurements.
//!
//! Group blocks, shuffled blocks and BSR run on one gather-GEMM engine (rows of a block share
//! their columns, so each loaded column of `X` feeds a whole register tile of rows); their
//! convolutions can also run in place on the input, one implicit GEMM per block
//! ([`BlockConv`], as [`DirectConv`] runs a dense one); CSR and N:M
//! run row by row on cache-sized column chunks; dense and channel-compact run on faer.

#![warn(missing_docs)]

pub mod bench;
pub mod conv;
mod engine;
mod error;
pub mod formats;
pub mod gemm;
pub mod reference;
pub mod simd;
pub mod team;
pub mod threads;
pub mod timing;

pub use engine::{
    BlockConv, DenseKernel, DirectConv, Epilogue, NmConv, Plan, Residual, Threading, Winograd,
};
pub use error::{KernelError, Result};
pub use formats::{
    Block, Bsr, ChannelCompact, Csr, Dense, GroupBlocks, NmCompressed, Packed, RowGroup,
    ShuffledBlocks, Tile,
};
pub use simd::Isa;
