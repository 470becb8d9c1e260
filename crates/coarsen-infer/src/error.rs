//! The error type of coarsen-infer.

use std::path::PathBuf;

/// Everything that can go wrong when describing, loading, exporting or running a network.
///
/// Messages are one line and name the file, node or tensor, and the shapes involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// A file could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// A file is not what it should be (malformed JSON or safetensors, a missing or ill-shaped
    /// tensor, an unknown version, ...).
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The graph is not a valid network: a node reads an unknown value, its tensors have the
    /// wrong shape, its geometry does not fit its input, ...
    #[error("node '{}' ({op}): {reason}", node.escape_debug())]
    Graph {
        /// The node's name (`graph` for the graph as a whole).
        node: String,
        /// Its operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A tensor does not fit its shape or holds non-finite values.
    #[error("tensor '{}' {shape:?}: {reason}", tensor.escape_debug())]
    Tensor {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A parameter is invalid.
    #[error("invalid {name} = {value}: {reason}")]
    Param {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// An error of coarsen-core (masks, metadata, safetensors).
    #[error(transparent)]
    Core(#[from] coarsen_core::Error),
    /// An error of coarsen-kernels (packing, plans).
    #[error("layer '{}': {source}", layer.escape_debug())]
    Kernel {
        /// The weight of the layer.
        layer: String,
        /// What the kernels said.
        source: coarsen_kernels::KernelError,
    },
}

/// `Result` with [`InferError`].
pub type Result<T, E = InferError> = std::result::Result<T, E>;

impl InferError {
    /// An [`InferError::Io`].
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        InferError::Io {
            path: path.into(),
            cause,
        }
    }

    /// An [`InferError::File`].
    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        InferError::File {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`InferError::Graph`].
    pub fn graph(node: impl Into<String>, op: &'static str, reason: impl Into<String>) -> Self {
        InferError::Graph {
            node: node.into(),
            op,
            reason: reason.into(),
        }
    }

    /// An [`InferError::Tensor`].
    pub fn tensor(tensor: impl Into<String>, shape: &[usize], reason: impl Into<String>) -> Self {
        InferError::Tensor {
            tensor: tensor.into(),
            shape: shape.to_vec(),
            reason: reason.into(),
        }
    }

    /// An [`InferError::Param`].
    pub fn param(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        InferError::Param {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`InferError::Kernel`] of layer `layer`.
    pub fn kernel(layer: impl Into<String>, source: coarsen_kernels::KernelError) -> Self {
        InferError::Kernel {
            layer: layer.into(),
            source,
        }
    }
}
