//! # coarsen-core
//!
//! Masks, patterns and the algorithms that turn unstructured sparsity into structures that
//! kernels can run fast: channel sparsity (Refill, Refill+), group sparsity (Regroup), DSB's
//! shuffled blocks, aligned blocks, and N:M with an input-channel permutation search. No ML
//! framework: weights and masks come from and go to safetensors files.
//!
//! Every weight is seen as a matrix `W[rows, cols]` ([`MatrixView`]): a conv weight
//! `[Cout, Cin, kh, kw]` is `W[Cout, Cin·kh·kw]`. A [`Mask`] holds one layer's 0/1 entries in
//! that view. [`convert`] converts a whole mask file, [`convert_layer`] one layer, and the
//! functions of [`patterns`] are the algorithms themselves.
//!
//! ```
//! use coarsen_core::patterns::{check, refill, ChannelConfig};
//! use coarsen_core::{Mask, MatrixView};
//!
//! // An unstructured mask of a 4×6 layer at density 0.5 …
//! let mask = Mask::from_fn(4, 6, |r, c| (r + c) % 2 == 0 || r == 3);
//! // … becomes channel-sparse: whole rows kept or removed, density kept.
//! let (channel, kept) = refill(&mask, None, None, &ChannelConfig::default()).unwrap();
//! assert_eq!(kept.len(), 3);
//! assert!(coarsen_core::patterns::check::check_channel(&channel).is_ok());
//! # let _ = (check, MatrixView::matrix(4, 6));
//! ```

#![warn(missing_docs)]

pub mod baseline;
mod convert;
mod error;
pub mod io;
mod mask;
mod mask_set;
pub mod metadata;
pub mod patterns;
pub mod prune;
pub mod report;
mod select;
pub mod sparsity;
pub mod target;
mod view;
pub mod zoo;

pub use convert::{
    convert, convert_layer, matching_values, stable_hash, Conversion, ConvertInputs, LayerInput,
    LayerOutcome,
};
pub use error::{Error, Result};
pub use io::{DirLock, MaskFile, MaskTensor, WeightFile, WeightTensor};
pub use mask::{BitRows, Mask};
pub use mask_set::{LayerMask, MaskSet};
pub use metadata::{CoarsenMetadata, LayerMeta, LayerStatus};
pub use patterns::Pattern;
pub use prune::{kernel_prune, magnitude_prune, Granularity, PruneInput, Scope};
pub use report::{LayerReport, Report};
pub use select::Selector;
pub use sparsity::Sparsity;
pub use target::{DensityTarget, Structure};
pub use view::MatrixView;
