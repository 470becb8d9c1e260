//! The structured patterns and the algorithms that produce them from an unstructured mask.
//!
//! | pattern | algorithm | property of the result |
//! |---|---|---|
//! | `channel`, `channel+` | [`refill`] (Refill, Refill+) | every row all zeros or all ones |
//! | `group` | [`regroup`] (Regroup) | at most K distinct non-empty row patterns |
//! | `shuffled-block` | [`shuffled_blocks`] (DSB's EXTRACT) | row classes of b rows × b columns |
//! | `block` | [`aligned_blocks`] | every aligned H×W tile all zeros or all ones |
//! | `nm` | [`nm_prune`] with optional [`nm_permute`] | ≤ N ones in every M along input channels |
//!
//! [`check()`] verifies each property from the mask alone.

pub mod block;
pub mod channel;
pub mod check;
pub mod classes;
pub mod group;
pub mod nm;
pub mod options;
pub mod partition;
pub mod shuffled;

pub use block::{aligned_blocks, BlockConfig};
pub use channel::{refill, refill_count, ChannelConfig, ChannelCriterion};
pub use check::check;
pub use classes::{row_classes, RowClass};
pub use group::{regroup, Fallback, GroupBlock, GroupConfig, GroupOutcome, PartCount};
pub use nm::{nm_permute, nm_prune, NmConfig, NmOutcome};
pub use options::{parse_block, parse_parts, PatternOptions, PATTERN_NAMES};
pub use partition::{partition_rows, Partitioner};
pub use shuffled::{shuffled_blocks, ShuffledConfig, ShuffledOutcome};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::mask::Mask;

/// A target structure with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Pattern {
    /// Channel sparsity by Refill (`extra = 0`) or Refill+ (`extra > 0`).
    Channel(ChannelConfig),
    /// Group sparsity by Regroup.
    Group(GroupConfig),
    /// DSB's shuffled blocks.
    ShuffledBlock(ShuffledConfig),
    /// Aligned H×W blocks.
    Block(BlockConfig),
    /// N:M along input channels.
    Nm(NmConfig),
}

impl Pattern {
    /// The pattern's name as files and the CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Pattern::Channel(c) if c.extra > 0.0 => "channel+",
            Pattern::Channel(_) => "channel",
            Pattern::Group(_) => "group",
            Pattern::ShuffledBlock(_) => "shuffled-block",
            Pattern::Block(_) => "block",
            Pattern::Nm(_) => "nm",
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            Pattern::Channel(c) => c.validate(),
            Pattern::Group(c) => c.validate(),
            Pattern::ShuffledBlock(c) => c.validate(),
            Pattern::Block(c) => c.validate(),
            Pattern::Nm(c) => c.validate(),
        }
    }

    /// The pattern a file's metadata describes: its name and parameters as [`Pattern::params`]
    /// wrote them.
    pub fn from_metadata(name: &str, params: &serde_json::Value) -> Result<Pattern> {
        let p = params.clone();
        let bad = |e: serde_json::Error| Error::param("pattern params", name, e.to_string());
        let pattern = match name {
            "channel" | "channel+" => Pattern::Channel(serde_json::from_value(p).map_err(bad)?),
            "group" => Pattern::Group(serde_json::from_value(p).map_err(bad)?),
            "shuffled-block" => Pattern::ShuffledBlock(serde_json::from_value(p).map_err(bad)?),
            "block" => Pattern::Block(serde_json::from_value(p).map_err(bad)?),
            "nm" => Pattern::Nm(serde_json::from_value(p).map_err(bad)?),
            other => return Err(Error::param("pattern", other, "unknown pattern name")),
        };
        pattern.validate()?;
        Ok(pattern)
    }

    /// Whether the pattern works on whole kernels: a convolution's weight `[Cout, Cin, kh, kw]`
    /// is converted in the kernel view `[Cout, Cin]` (a kernel is kept where one of its
    /// weights is, and weighs the root mean square of its kept weights), and every kernel
    /// the result keeps keeps all its `kh·kw` weights. Blocks of whole kernels are blocks of
    /// input channels, which Winograd convolution multiplies with about 4× fewer products
    /// than the direct one; start from a mask pruned by kernels (`prune --granularity
    /// kernel`), since a kernel with one kept weight counts as kept. Group and shuffled-block
    /// patterns only; linear layers and 1×1 convolutions are unchanged by it.
    pub fn kernels(&self) -> bool {
        match self {
            Pattern::Group(g) => g.kernels,
            Pattern::ShuffledBlock(s) => s.kernels,
            _ => false,
        }
    }

    /// The pattern without [`kernels`](Self::kernels) (what runs in the kernel view).
    pub fn on_single_weights(&self) -> Pattern {
        let mut p = self.clone();
        match &mut p {
            Pattern::Group(g) => g.kernels = false,
            Pattern::ShuffledBlock(s) => s.kernels = false,
            _ => {}
        }
        p
    }

    /// The most distinct row patterns a layer of `rows` rows may have under this pattern: the
    /// part count of a group pattern (its bound), or `rows` for the others.
    pub fn max_row_patterns(&self, rows: usize) -> usize {
        match self {
            Pattern::Group(g) => g.parts.resolve(rows, g.row_tile),
            _ => rows,
        }
    }

    /// The parameters as a JSON object (for metadata and reports).
    pub fn params(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The magnitude of each entry under the mask, `|w|·m`, or the mask itself (1.0 per kept entry)
/// when no weights are given.
pub fn masked_magnitudes(mask: &Mask, weights: Option<&[f32]>) -> Vec<f32> {
    match weights {
        Some(w) => mask
            .as_bytes()
            .iter()
            .zip(w)
            .map(|(&m, &w)| if m != 0 { w.abs() } else { 0.0 })
            .collect(),
        None => mask.as_bytes().iter().map(|&m| m as f32).collect(),
    }
}

/// Indices `0..n` sorted by `score` descending, ties by index ascending.
pub(crate) fn argsort_desc<T: Copy + PartialOrd>(
    n: usize,
    score: impl Fn(usize) -> T,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| {
        score(b)
            .partial_cmp(&score(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_through_metadata() {
        let patterns = [
            Pattern::Channel(ChannelConfig::refill_plus()),
            Pattern::Group(GroupConfig {
                parts: PartCount::Auto,
                ..Default::default()
            }),
            Pattern::Group(GroupConfig::default()),
            Pattern::ShuffledBlock(ShuffledConfig {
                block: 8,
                blocks: Some(3),
                similarity: None,
                kernels: false,
            }),
            Pattern::ShuffledBlock(ShuffledConfig {
                kernels: true,
                ..Default::default()
            }),
            Pattern::Group(GroupConfig {
                kernels: true,
                ..Default::default()
            }),
            Pattern::Block(BlockConfig {
                height: 4,
                width: 2,
            }),
            Pattern::Nm(NmConfig {
                permute: true,
                ..Default::default()
            }),
        ];
        for p in patterns {
            assert_eq!(Pattern::from_metadata(p.name(), &p.params()).unwrap(), p);
        }
        assert!(Pattern::from_metadata("triangle", &serde_json::json!({})).is_err());
    }
}
