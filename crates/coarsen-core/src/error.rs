//! The error type of coarsen-core.

use std::path::PathBuf;

/// Everything that can go wrong in coarsen-core.
///
/// Every variant names what a user needs to find the problem: the file, the tensor and the shapes
/// involved. Messages are one line, so a CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said (part of the message, not a separate source, so that
        /// the message stays one self-contained line).
        cause: std::io::Error,
    },
    /// The file is not a readable safetensors file (bad header, truncated data, ...).
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What the parser found wrong.
        reason: String,
    },
    /// A tensor has a dtype this operation cannot use.
    #[error("{}: tensor '{}' {shape:?} has dtype {dtype}; expected {expected}", path.display(), tensor.escape_debug())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its dtype as safetensors names it.
        dtype: String,
        /// The dtypes that would be accepted.
        expected: &'static str,
    },
    /// A mask tensor holds a value other than 0 and 1 in a floating-point dtype.
    #[error(
        "{}: mask tensor '{}' {shape:?} holds {value} at flat index {index}; masks hold 0 and 1 (is this a weights file?)", path.display(), tensor.escape_debug())]
    NotBinary {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The offending value.
        value: f64,
        /// Its flat index.
        index: usize,
    },
    /// A weight tensor holds NaN or an infinity.
    #[error(
        "{}: tensor '{}' {shape:?} holds a non-finite value ({value}) at flat index {index}", path.display(), tensor.escape_debug())]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The value (NaN, inf or -inf).
        value: f32,
        /// Its flat index.
        index: usize,
    },
    /// A tensor that another file names is missing.
    #[error("{}: has no tensor '{}' {shape:?} (named in {})", path.display(), tensor.escape_debug(), named_in.display())]
    MissingTensor {
        /// The file that lacks the tensor.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape it has in the other file.
        shape: Vec<usize>,
        /// The file that names it.
        named_in: PathBuf,
    },
    /// The same tensor has different shapes in two files (or in a file and a parameter).
    #[error(
        "tensor '{}': shape {left_shape:?} in {} does not match {right_shape:?} in {}", tensor.escape_debug(), left.display(), right.display())]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// The first file.
        left: PathBuf,
        /// The shape there.
        left_shape: Vec<usize>,
        /// The second file.
        right: PathBuf,
        /// The shape there.
        right_shape: Vec<usize>,
    },
    /// The layer selection is empty.
    #[error("{}: no layer selected ({detail})", path.display())]
    EmptySelection {
        /// The file whose tensors were filtered.
        path: PathBuf,
        /// What was looked for.
        detail: String,
    },
    /// A selected mask is all zeros, so there is nothing to structure.
    #[error(
        "{}: mask of '{}' {shape:?} is all zeros: nothing to structure (leave it out with --exclude)", path.display(), tensor.escape_debug())]
    AllZeroMask {
        /// The mask file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A parameter is out of range or inconsistent.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidParameter {
        /// The parameter (as the CLI spells it, e.g. `--sparsity`).
        name: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// Another process writes the directory.
    #[error("{}: another coarsen process is writing this directory; wait for it to end, or choose another directory (this {what} did not start)", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
        /// What was refused (`training`, `export`, `demo`).
        what: String,
    },
    /// An option was given for a pattern it does not apply to.
    #[error("option {option} applies to {applies_to}, not to {pattern}")]
    InapplicableOption {
        /// The option (snake_case, e.g. `min_rows`).
        option: &'static str,
        /// The pattern it was given for.
        pattern: &'static str,
        /// The patterns it applies to, `|`-separated.
        applies_to: String,
    },
    /// A regular expression did not compile.
    #[error("invalid regular expression for {flag}: {}", one_line(&cause.to_string()))]
    Regex {
        /// The option that carried it.
        flag: &'static str,
        /// The regex crate's error.
        cause: Box<regex::Error>,
    },
    /// The graph partitioner failed on a layer.
    #[error("layer '{}' ({rows}x{cols}): the {partitioner} partitioner failed: {reason}", layer.escape_debug())]
    Partition {
        /// The layer.
        layer: String,
        /// Rows of its matrix view.
        rows: usize,
        /// Columns of its matrix view.
        cols: usize,
        /// Which partitioner.
        partitioner: &'static str,
        /// What it reported.
        reason: String,
    },
    /// The coarsen metadata of a mask file is malformed.
    #[error("{}: malformed coarsen metadata: {reason}", path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A buffer does not fill the shape it is declared with (a programming error of the caller).
    #[error("tensor '{}': {len} values do not fill shape {shape:?}", tensor.escape_debug())]
    BadLength {
        /// The tensor.
        tensor: String,
        /// The declared shape.
        shape: Vec<usize>,
        /// The buffer length.
        len: usize,
    },
    /// A mask does not fit the weight tensor it belongs to.
    #[error("tensor '{}' {shape:?}: {detail}", tensor.escape_debug())]
    MaskShape {
        /// The tensor.
        tensor: String,
        /// The weight's shape.
        shape: Vec<usize>,
        /// What does not fit.
        detail: String,
    },
    /// A structured result failed its own pattern check. This is a bug in coarsen; please report it.
    #[error("internal error: layer '{}' does not satisfy the {pattern} pattern: {violation}", layer.escape_debug())]
    PatternViolated {
        /// The layer.
        layer: String,
        /// The pattern.
        pattern: String,
        /// The failed property.
        violation: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    /// An [`Error::InvalidParameter`].
    pub fn param(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// A multi-line message folded onto one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod name_tests {
    use super::*;

    /// A tensor name read from a file is printed escaped: a newline in it cannot split the
    /// one-line error or forge a second line.
    #[test]
    fn names_are_printed_escaped() {
        let e = Error::MissingTensor {
            path: "w.safetensors".into(),
            tensor: "fc.weight\nerror: forged".into(),
            shape: vec![2, 2],
            named_in: "m.safetensors".into(),
        };
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), 1, "{shown}");
        assert!(shown.contains("'fc.weight\\nerror: forged'"), "{shown}");
    }
}
