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

impl CoarsenMetadata {
    /// Checks the object against the tensors of its file (read from `path`): a known version,
    /// a pattern with valid parameters, every layer it names present with rank ≥ 2, and an
    /// input-channel permutation only on N:M layers, of exactly the layer's input channels.
    /// Every field read from a file passes here before anything uses it.
    pub fn validate(
        &self,
        path: &std::path::Path,
        tensors: &[crate::io::MaskTensor],
    ) -> crate::Result<()> {
        let bad = |reason: String| crate::Error::Metadata {
            path: path.to_path_buf(),
            reason,
        };
        if self.version == 0 || self.version > METADATA_VERSION {
            return Err(bad(format!(
                "version {}; this coarsen reads version {METADATA_VERSION}",
                self.version
            )));
        }
        // Parameters come from the file, not from flags: the message names them as the file
        // does (`block`, not `--block`).
        let pattern = crate::Pattern::from_metadata(&self.pattern, &self.params).map_err(|e| {
            let e = match e {
                crate::Error::InvalidParameter {
                    name,
                    value,
                    reason,
                } => format!(
                    "params.{} = {value}: {reason}",
                    name.trim_start_matches('-').replace('-', "_")
                ),
                other => other.to_string(),
            };
            bad(format!("pattern '{}': {e}", self.pattern.escape_debug()))
        })?;
        for (name, layer) in &self.layers {
            let shown = name.escape_debug();
            let t = tensors.iter().find(|t| &t.name == name).ok_or_else(|| {
                bad(format!(
                    "names layer '{shown}', which the file does not hold"
                ))
            })?;
            let view = crate::MatrixView::of(&t.shape).ok_or_else(|| {
                bad(format!(
                    "layer '{shown}' {:?} has rank < 2; a structured layer is a matrix",
                    t.shape
                ))
            })?;
            if let Some(perm) = &layer.col_perm {
                if !matches!(pattern, crate::Pattern::Nm(_)) {
                    return Err(bad(format!(
                        "layer '{shown}' has a col_perm, which only N:M layers have"
                    )));
                }
                let mut seen = vec![false; view.in_channels];
                for &c in perm {
                    match seen.get_mut(c) {
                        Some(s) if !*s => *s = true,
                        _ => {
                            return Err(bad(format!(
                                "layer '{shown}' {:?}: col_perm is not a permutation of its {} input channels (entry {c}, length {})",
                                t.shape,
                                view.in_channels,
                                perm.len()
                            )))
                        }
                    }
                }
                if perm.len() != view.in_channels {
                    return Err(bad(format!(
                        "layer '{shown}' {:?}: col_perm has {} entries for {} input channels",
                        t.shape,
                        perm.len(),
                        view.in_channels
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An invalid parameter of a file's metadata is named as the file names it, not as a flag.
    #[test]
    fn parameter_errors_name_the_file_field() {
        let meta = CoarsenMetadata {
            version: METADATA_VERSION,
            pattern: "shuffled-block".into(),
            params: serde_json::json!({"block": 0, "blocks": null}),
            layers: BTreeMap::new(),
        };
        let e = meta
            .validate(std::path::Path::new("m.safetensors"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("params.block = 0"),
            "{e}"
        );
        assert!(!e.contains("--"), "{e}");
    }
}
