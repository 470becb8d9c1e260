//! # coarsen-infer
//!
//! Sparse inference without a training framework: the explicit description of a network
//! ([`Graph`]), its named tensors ([`TensorSet`]) and masks ([`MaskSet`]), the packed format of
//! every layer ([`LayerFormat`]), the inference engine ([`InferenceNet`]) and the export format
//! that carries all of it ([`export`]). It depends on coarsen-core and coarsen-kernels only.
//!
//! - [`graph`]: nodes (conv with stride/padding/dilation/groups, linear, BatchNorm, ReLU,
//!   max/avg pooling, global pooling, flatten, residual add), validated against tensor shapes.
//! - [`mod@format`]: the per-layer format policy, from masks and their coarsen metadata.
//! - [`engine`]: BatchNorm folding, fused ReLU, channel shrinking, packed plans.
//! - [`export`]: `model.safetensors` + `model.json` (version 2 holds the graph; version 1
//!   still loads).
//! - [`onnx`]: the network as a standard ONNX model, for ONNX Runtime, DeepSparse and others.
//! - [`mod@reference`]: the graph's semantics as a naive interpreter, the oracle of the tests.
//! - [`mod@timing`]: packed against dense latency, interleaved.
//!
//! ```no_run
//! use coarsen_infer::{export, InferenceNet, Path};
//!
//! let model = export::load("regroup-model".as_ref())?;
//! let net = InferenceNet::new(&model.network, &model.formats, Path::Packed)?;
//! let [c, h, w] = net.input();
//! let logits = net.forward_nchw(&vec![0.0; c * h * w], 1)?;
//! # Ok::<(), coarsen_infer::InferError>(())
//! ```

#![warn(missing_docs)]

pub mod engine;
mod error;
pub mod export;
pub mod format;
pub mod graph;
mod network;
pub mod onnx;
pub mod reference;
mod tensors;
pub mod timing;

pub use coarsen_core::{LayerMask, MaskSet};
pub use engine::{
    argmax_rows, describe_choices, nchw_to_cbhw, softmax_rows, Chunking, DenseKernel, InferOptions,
    InferenceNet, LayerChoice, LayerInfo, Path, StepTime, TuneCache, Tuning,
};
pub use error::{InferError, Result};
pub use format::{detect_format, layer_formats, Formats, LayerFormat, CSR_MAX_DENSITY};
pub use graph::{Graph, Node, Op};
pub use network::Network;
pub use tensors::{numel, Tensor, TensorSet};
