//! Named f32 tensors with their shapes.

use std::collections::BTreeMap;

use crate::error::{InferError, Result};

/// A dense f32 tensor: a shape and its row-major values.
///
/// Invariant: `values.len()` is the product of `shape` (which does not overflow).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// The number of entries of `shape`, or `None` when it overflows.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

impl Tensor {
    /// A tensor of `shape` holding `values` (named `name` in errors).
    pub fn new(name: &str, shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        match numel(&shape) {
            Some(n) if n == values.len() => Ok(Tensor { shape, values }),
            Some(n) => Err(InferError::tensor(
                name,
                &shape,
                format!("{} values do not fill it ({n} needed)", values.len()),
            )),
            None => Err(InferError::tensor(name, &shape, "its size overflows")),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Row-major values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Row-major values, to change in place.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The values.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// Fails at the first NaN or infinity.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        match self.values.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(InferError::tensor(
                name,
                &self.shape,
                format!("holds {} at flat index {i}", self.values[i]),
            )),
        }
    }
}

/// Tensors by name: a network's parameters and statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorSet {
    tensors: BTreeMap<String, Tensor>,
}

impl TensorSet {
    /// No tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor; returns the previous one.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    /// Adds (or replaces) a tensor from its shape and values.
    pub fn insert_values(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        values: Vec<f32>,
    ) -> Result<Option<Tensor>> {
        let name = name.into();
        let t = Tensor::new(&name, shape, values)?;
        Ok(self.insert(name, t))
    }

    /// The tensor of that name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor of that name, to change in place.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    /// The tensor of that name, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| InferError::tensor(name, &[], "missing"))
    }

    /// Tensors by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Fails at the first tensor holding NaN or an infinity.
    pub fn check_finite(&self) -> Result<()> {
        self.iter().try_for_each(|(n, t)| t.check_finite(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_values_are_checked() {
        assert!(Tensor::new("a", vec![2, 3], vec![0.0; 6]).is_ok());
        assert!(Tensor::new("a", vec![2, 3], vec![0.0; 5]).is_err());
        assert!(Tensor::new("a", vec![usize::MAX, 3], vec![]).is_err());
        let t = Tensor::new("a", vec![2], vec![1.0, f32::NAN]).unwrap();
        let e = t.check_finite("a").unwrap_err().to_string();
        assert!(
            e.contains("'a'") && e.contains("NaN") && e.contains("index 1"),
            "{e}"
        );
        let mut s = TensorSet::new();
        s.insert("a", t);
        assert!(s.check_finite().is_err());
        assert!(s.require("b").is_err());
    }
}
