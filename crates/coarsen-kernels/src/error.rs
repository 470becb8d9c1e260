//! The error type of coarsen-kernels.

/// What can go wrong when packing or running.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer does not have the length its shape needs.
    #[error("{op}: {what} holds {got} values, but {expected} are needed ({shape})")]
    Length {
        /// The operation (`pack`, `forward`, ...).
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the shape needs.
        expected: usize,
        /// The shape, in words.
        shape: String,
    },
    /// The mask does not have the structure the format needs.
    #[error("{format}: the mask is not {structure}: {detail}")]
    Structure {
        /// The format.
        format: &'static str,
        /// The structure it needs.
        structure: String,
        /// The first violation.
        detail: String,
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
    /// The parts given to a format's `from_parts` break one of the format's invariants.
    #[error("invalid {format} parts: {field}: {detail}")]
    Parts {
        /// The format (`Csr`, `GroupBlocks`, ...).
        format: &'static str,
        /// The field at fault (`col_idx`, `blocks.rows`, `values`, ...).
        field: &'static str,
        /// What is wrong, with the offending index, value or shape.
        detail: String,
    },
    /// The requested instruction set is not available on this CPU.
    #[error("instruction set {0} is not available on this CPU")]
    Isa(&'static str),
    /// An operation is not available for this format.
    #[error("{op} is not available for the {format} format")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The format.
        format: &'static str,
    },
}

/// `Result` with [`KernelError`].
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Checks a buffer length.
pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<()> {
    if got != expected {
        return Err(KernelError::Length {
            op,
            what,
            got,
            expected,
            shape: shape(),
        });
    }
    Ok(())
}
