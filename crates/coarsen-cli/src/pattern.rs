//! Building a validated [`Pattern`] from the command-line options of `convert`.

use anyhow::{bail, Context, Result};
use coarsen_core::patterns::{
    parse_block, parse_parts, ChannelCriterion, Fallback, Partitioner,
    PatternOptions as CoreOptions,
};
use coarsen_core::Pattern;

use crate::args::{CriterionArg, FallbackArg, PartitionerArg, PatternArg, PatternOptions};

/// The pattern `to` with `o`'s options; an option that does not apply to `to` is an error.
pub fn build(to: PatternArg, o: &PatternOptions) -> Result<Pattern> {
    let block = o
        .block
        .as_deref()
        .map(|b| parse_block(b).with_context(|| format!("--block {b}")))
        .transpose()?;
    let parts = o
        .parts
        .as_deref()
        .map(|k| parse_parts(k).with_context(|| format!("--parts {k}")))
        .transpose()?;
    let options = CoreOptions {
        criterion: o.criterion.map(|c| match c {
            CriterionArg::Count => ChannelCriterion::Count,
            CriterionArg::L1 => ChannelCriterion::L1,
        }),
        scores: o.scores.is_some(),
        extra: o.extra,
        parts,
        imbalance: o.imbalance,
        min_rows: o.min_rows,
        row_tile: o.row_tile,
        width_ratio: o.width_ratio,
        partitioner: o.partitioner.map(|p| match p {
            PartitionerArg::Random => Partitioner::Random,
            PartitionerArg::Metis => Partitioner::Metis,
            PartitionerArg::Kahypar => Partitioner::Kahypar,
        }),
        fallback: o.fallback.map(|f| match f {
            FallbackArg::Dense => Fallback::Dense,
            FallbackArg::Keep => Fallback::Keep,
        }),
        legacy_regroup: o.legacy_regroup,
        block,
        blocks: o.blocks,
        similarity: o.similarity,
        n: o.n,
        m: o.m,
        permute: o.permute,
        fill: o.fill,
        escape_attempts: o.escape_attempts,
        permute_window: o.permute_window,
        kernels: o.kernels,
    };
    match Pattern::from_options(pattern_name(to), &options) {
        Err(coarsen_core::Error::InapplicableOption {
            option, applies_to, ..
        }) => {
            bail!(
                "--{} applies to --to {applies_to}, not to --to {}",
                option.replace('_', "-"),
                pattern_name(to)
            )
        }
        Err(coarsen_core::Error::InvalidParameter {
            name: "block",
            value,
            reason,
        }) => bail!("--block {value}: {reason}"),
        r => Ok(r?),
    }
}

/// The pattern's name as the command line spells it.
pub fn pattern_name(p: PatternArg) -> &'static str {
    match p {
        PatternArg::Channel => "channel",
        PatternArg::ChannelPlus => "channel+",
        PatternArg::Group => "group",
        PatternArg::ShuffledBlock => "shuffled-block",
        PatternArg::Block => "block",
        PatternArg::Nm => "nm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_per_pattern() {
        let o = PatternOptions::default();
        match build(PatternArg::ChannelPlus, &o).unwrap() {
            Pattern::Channel(c) => assert_eq!(c.extra, 0.1),
            p => panic!("{p:?}"),
        }
        match build(PatternArg::Block, &o).unwrap() {
            Pattern::Block(b) => assert_eq!((b.height, b.width), (16, 16)),
            p => panic!("{p:?}"),
        }
        assert_eq!(build(PatternArg::Group, &o).unwrap().name(), "group");
    }

    #[test]
    fn options_of_other_patterns_are_refused() {
        let o = PatternOptions {
            parts: Some("4".into()),
            ..Default::default()
        };
        let err = build(PatternArg::Channel, &o).unwrap_err().to_string();
        assert!(err.contains("--parts applies to --to group"), "{err}");
        let o = PatternOptions {
            permute: true,
            ..Default::default()
        };
        assert!(build(PatternArg::Block, &o).is_err());
    }

    #[test]
    fn parses_sizes() {
        let o = PatternOptions {
            block: Some("0".into()),
            ..Default::default()
        };
        let err = build(PatternArg::Block, &o).unwrap_err().to_string();
        assert!(err.contains("--block 0"), "{err}");
        let o = PatternOptions {
            parts: Some("auto".into()),
            ..Default::default()
        };
        match build(PatternArg::Group, &o).unwrap() {
            Pattern::Group(g) => {
                assert_eq!(g.parts, coarsen_core::patterns::PartCount::Auto)
            }
            p => panic!("{p:?}"),
        }
        let o = PatternOptions {
            block: Some("16x8".into()),
            ..Default::default()
        };
        assert!(build(PatternArg::ShuffledBlock, &o).is_err());
    }
}
