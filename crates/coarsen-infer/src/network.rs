//! A network to run or export: its graph, its tensors and the masks of its weights, checked
//! against each other.

use std::collections::BTreeMap;

use coarsen_core::MaskSet;

use crate::error::{InferError, Result};
use crate::graph::{BatchNorm, Graph, Shape};
use crate::tensors::TensorSet;

/// A network: graph, tensors and masks, checked to fit together.
///
/// Invariants (checked by [`Network::new`]): the graph is valid for the tensors' shapes
/// ([`Graph::shapes`]); every tensor the graph reads holds finite values; every mask belongs to
/// a conv or linear weight of the graph and has its shape.
#[derive(Clone, Debug)]
pub struct Network {
    graph: Graph,
    tensors: TensorSet,
    masks: MaskSet,
    shapes: BTreeMap<String, Shape>,
}

impl Network {
    /// Checks and assembles a network.
    pub fn new(graph: Graph, tensors: TensorSet, masks: MaskSet) -> Result<Self> {
        let shapes = graph.shapes(&|n| tensors.get(n).map(|t| t.shape().to_vec()))?;
        for node in &graph.nodes {
            for (_, name) in node.op.tensors() {
                tensors.require(name)?.check_finite(name)?;
            }
        }
        let weights: BTreeMap<&str, &str> = graph
            .weights()
            .into_iter()
            .map(|(node, w)| (w, node))
            .collect();
        for (name, m) in masks.iter() {
            if !weights.contains_key(name) {
                return Err(InferError::tensor(
                    name,
                    m.shape(),
                    "has a mask but is no conv or linear weight of the graph",
                ));
            }
            let shape = tensors.require(name)?.shape();
            if m.shape() != shape {
                return Err(InferError::tensor(
                    name,
                    shape,
                    format!("its mask has shape {:?}", m.shape()),
                ));
            }
        }
        Ok(Network {
            graph,
            tensors,
            masks,
            shapes,
        })
    }

    /// The graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The tensors.
    pub fn tensors(&self) -> &TensorSet {
        &self.tensors
    }

    /// The masks.
    pub fn masks(&self) -> &MaskSet {
        &self.masks
    }

    /// The shape of every value (per image), the input's included.
    pub fn shapes(&self) -> &BTreeMap<String, Shape> {
        &self.shapes
    }

    /// Images: channels, height, width.
    pub fn input(&self) -> [usize; 3] {
        self.graph.input
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.graph.classes(&self.shapes)
    }

    /// Every conv and linear weight in evaluation order, with its shape.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.graph
            .weights()
            .into_iter()
            .filter_map(|(_, w)| {
                self.tensors
                    .get(w)
                    .map(|t| (w.to_string(), t.shape().to_vec()))
            })
            .collect()
    }

    /// The values of weight `name` with its mask applied (zeros where it is 0).
    pub fn masked_values(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = self.tensors.require(name)?.values().to_vec();
        if let Some(m) = self.masks.get(name) {
            m.apply(name, &mut v)?;
        }
        Ok(v)
    }

    /// Per-channel scale `γ/√(var + ε)` and shift `β − mean·scale` of an inference-mode
    /// BatchNorm: `y = x·scale + shift`.
    pub fn batch_norm_affine(&self, b: &BatchNorm) -> Result<(Vec<f32>, Vec<f32>)> {
        let t = &self.tensors;
        let (gamma, beta) = (t.require(&b.scale)?.values(), t.require(&b.bias)?.values());
        let (mean, var) = (t.require(&b.mean)?.values(), t.require(&b.var)?.values());
        let scale: Vec<f32> = gamma
            .iter()
            .zip(var)
            .map(|(&g, &v)| g / (v + b.epsilon).sqrt())
            .collect();
        let shift = beta
            .iter()
            .zip(mean)
            .zip(&scale)
            .map(|((&be, &m), &s)| be - m * s)
            .collect();
        Ok((scale, shift))
    }

    /// Folds the BatchNorm `b` that reads a layer into the layer's row-major `weights` (one row
    /// per output channel) and `bias`: `W ← W·scale`, `bias ← bias·scale + shift`.
    pub fn fold_batch_norm(
        &self,
        b: &BatchNorm,
        weights: &mut [f32],
        bias: &mut [f32],
    ) -> Result<()> {
        let (scale, shift) = self.batch_norm_affine(b)?;
        let rows = bias.len();
        let per = weights.len() / rows.max(1);
        for r in 0..rows {
            weights[r * per..(r + 1) * per]
                .iter_mut()
                .for_each(|v| *v *= scale[r]);
            bias[r] = bias[r] * scale[r] + shift[r];
        }
        Ok(())
    }

    /// Sparsity over the prunable layers (those with a mask) and over all conv and linear
    /// weights, as every command reports it ([`coarsen_core::Sparsity`]).
    pub fn sparsity(&self) -> coarsen_core::Sparsity {
        let shapes = self.weight_shapes();
        self.masks.sparsity(
            shapes
                .iter()
                .map(|(n, s)| (n.as_str(), s.iter().product::<usize>())),
        )
    }

    /// The parts.
    pub fn into_parts(self) -> (Graph, TensorSet, MaskSet) {
        (self.graph, self.tensors, self.masks)
    }
}
