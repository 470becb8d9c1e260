//! The error type of coarsen-train.

use std::path::PathBuf;

/// What can go wrong while loading data, building models or training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// A data set is missing or malformed.
    #[error("{}: {reason}", path.display())]
    Data {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A parameter or configuration value is invalid.
    #[error("invalid {name} = {value}: {reason}")]
    Config {
        /// The setting.
        name: String,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint is missing, incomplete or does not match the run.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed (shapes, dtypes).
    #[error("tensor operation failed: {}", without_backtrace(.0))]
    Candle(#[from] candle_core::Error),
    /// A mask or pattern operation failed.
    #[error(transparent)]
    Core(#[from] coarsen_core::Error),
    /// A kernel operation failed.
    #[error(transparent)]
    Kernel(#[from] coarsen_kernels::KernelError),
    /// An inference, graph or export operation failed (boxed: it is a large error).
    #[error(transparent)]
    Infer(Box<coarsen_infer::InferError>),
    /// Training diverged (a non-finite loss).
    #[error("training diverged at epoch {epoch}, step {step}: loss is {loss}")]
    Diverged {
        /// Epoch (0-based).
        epoch: usize,
        /// Step within the epoch.
        step: usize,
        /// The loss.
        loss: f32,
    },
}

impl From<coarsen_infer::InferError> for TrainError {
    fn from(e: coarsen_infer::InferError) -> Self {
        TrainError::Infer(Box::new(e))
    }
}

/// `Result` with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// An [`TrainError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            cause,
        }
    }

    /// A [`TrainError::Config`].
    pub fn config(
        name: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        TrainError::Config {
            name: name.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// A candle error's message without the backtrace candle appends when `RUST_BACKTRACE` is set
/// (an error is one line; the backtrace is for a panic).
fn without_backtrace(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(inner),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn candle_errors_are_one_line() {
        // What candle builds when RUST_BACKTRACE is set.
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let shown = super::TrainError::from(e).to_string();
        assert_eq!(shown, "tensor operation failed: shape mismatch");
    }
}
