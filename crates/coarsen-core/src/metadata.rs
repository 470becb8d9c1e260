//! The `__metadata__["coarsen"]` object of a structured mask file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Key of the coarsen object in a safetensors file's `__metadata__`.
pub const METADATA_KEY: &str = "coarsen";

/// Version of the metadata layout written by this crate.
pub const METADATA_VERSION: u32 = 1;

/// What became of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerStatus {
    /// The layer's mask satisfies the pattern.
    Structured,
    /// The layer was left as it was (see the reason).
    Unstructured,
    /// The layer is dense (all ones).
    Dense,
}

impl LayerStatus {
    /// The name used in files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerStatus::Structured => "structured",
            LayerStatus::Unstructured => "unstructured",
            LayerStatus::Dense => "dense",
        }
    }
}

/// Per-layer metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// What became of the layer.
    pub status: LayerStatus,
    /// Why a layer is not structured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For N:M: the input-channel permutation, `perm[new] = old`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub col_perm: Option<Vec<usize>>,
}

/// The coarsen object: `{"version": 1, "pattern": "...", "params": {...}, "layers": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoarsenMetadata {
    /// Layout version ([`METADATA_VERSION`]).
    pub version: u32,
    /// The pattern name (`channel`, `channel+`, `group`, `shuffled-block`, `block`, `nm`).
    pub pattern: String,
    /// The pattern's parameters.
    pub params: serde_json::Value,
    /// Per-layer metadata by tensor name.
    pub layers: BTreeMap<String, LayerMeta>,
}
