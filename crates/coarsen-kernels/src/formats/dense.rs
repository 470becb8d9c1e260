//! Dense: the baseline "format", a full row-major matrix.

#[cfg(debug_assertions)]
use super::parts::debug_valid;
use super::parts::{check_count, mul};
use crate::error::Result;

/// A dense matrix `rows × cols`, row-major: the baseline "format".
///
/// # Invariants
///
/// - `values.len() == rows · cols`, and the product does not overflow `usize`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

impl Dense {
    /// A dense matrix from row-major values (the same as [`from_parts`](Self::from_parts)).
    pub fn new(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        Self::from_parts(rows, cols, values)
    }

    /// A dense matrix from its parts, checking the [invariants](Self#invariants).
    pub fn from_parts(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        let d = Dense { rows, cols, values };
        d.check()?;
        Ok(d)
    }

    /// A dense matrix from its parts, checking the invariants only in debug builds.
    ///
    /// # Safety
    ///
    /// The parts must uphold every [invariant](Self#invariants) of the type: a
    /// [`Plan`](crate::Plan) of a value that breaks them may read and write out of bounds.
    pub unsafe fn from_parts_unchecked(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        let d = Dense { rows, cols, values };
        #[cfg(debug_assertions)]
        debug_valid("Dense::from_parts_unchecked", d.check());
        d
    }

    fn check(&self) -> Result<()> {
        let want = mul("Dense", "values", self.rows, self.cols)?;
        check_count("Dense", "values", self.values.len(), want, || {
            format!("a {}x{} matrix", self.rows, self.cols)
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Values, row-major, mutable (their number never changes).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The parts, in the order [`from_parts`](Self::from_parts) takes them.
    pub fn into_parts(self) -> (usize, usize, Vec<f32>) {
        (self.rows, self.cols, self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelError;

    #[test]
    fn parts_round_trip_and_refuse_a_wrong_length() {
        let d = Dense::new(2, 3, vec![1.0; 6]).unwrap();
        let (r, c, v) = d.clone().into_parts();
        assert_eq!(Dense::from_parts(r, c, v).unwrap(), d);
        let err = Dense::from_parts(2, 3, vec![0.0; 5]).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Parts {
                    format: "Dense",
                    field: "values",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("holds 5"), "{err}");
        let err = Dense::from_parts(usize::MAX, 2, vec![]).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
