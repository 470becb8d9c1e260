//! Building a validated [`Pattern`] from the command-line options of `convert`.

use anyhow::{bail, Context, Result};
use coarsen_core::patterns::{
    BlockConfig, ChannelConfig, ChannelCriterion, Fallback, GroupConfig, NmConfig, PartCount,
    Partitioner, ShuffledConfig,
};
use coarsen_core::Pattern;

use crate::args::{CriterionArg, FallbackArg, PartitionerArg, PatternArg, PatternOptions};

/// The pattern `to` with `o`'s options; an option that does not apply to `to` is an error.
pub fn build(to: PatternArg, o: &PatternOptions) -> Result<Pattern> {
    let given = |name: &str, set: bool, allowed: &[PatternArg]| -> Result<()> {
        if set && !allowed.contains(&to) {
            let names: Vec<&str> = allowed.iter().map(|p| pattern_name(*p)).collect();
            bail!(
                "--{name} applies to --to {}, not to --to {}",
                names.join("|"),
                pattern_name(to)
            );
        }
        Ok(())
    };
    use PatternArg::*;
    let channel = [Channel, ChannelPlus];
    given("criterion", o.criterion.is_some(), &channel)?;
    given("scores", o.scores.is_some(), &channel)?;
    given("extra", o.extra.is_some(), &channel)?;
    for (name, set) in [
        ("parts", o.parts.is_some()),
        ("imbalance", o.imbalance.is_some()),
        ("min-rows", o.min_rows.is_some()),
        ("row-tile", o.row_tile.is_some()),
        ("width-ratio", o.width_ratio.is_some()),
        ("partitioner", o.partitioner.is_some()),
        ("fallback", o.fallback.is_some()),
        ("legacy-regroup", o.legacy_regroup),
    ] {
        given(name, set, &[Group])?;
    }
    given("block", o.block.is_some(), &[ShuffledBlock, Block])?;
    given("blocks", o.blocks.is_some(), &[ShuffledBlock])?;
    for (name, set) in [
        ("n", o.n.is_some()),
        ("m", o.m.is_some()),
        ("permute", o.permute),
        ("escape-attempts", o.escape_attempts.is_some()),
    ] {
        given(name, set, &[Nm])?;
    }

    let pattern = match to {
        Channel | ChannelPlus => {
            let base = if to == ChannelPlus {
                ChannelConfig::refill_plus()
            } else {
                ChannelConfig::default()
            };
            Pattern::Channel(ChannelConfig {
                criterion: match (o.scores.is_some(), o.criterion) {
                    (true, _) => ChannelCriterion::Scores,
                    (false, Some(CriterionArg::Count)) => ChannelCriterion::Count,
                    _ => ChannelCriterion::L1,
                },
                extra: o.extra.unwrap_or(base.extra),
            })
        }
        Group => {
            let d = GroupConfig::default();
            Pattern::Group(GroupConfig {
                parts: match o.parts.as_deref() {
                    None => d.parts,
                    Some("auto") => PartCount::Auto,
                    Some(k) => PartCount::Fixed(
                        k.parse()
                            .with_context(|| format!("--parts {k}: expected a count or `auto`"))?,
                    ),
                },
                imbalance: o.imbalance.unwrap_or(d.imbalance),
                min_rows: o.min_rows.unwrap_or(d.min_rows),
                row_tile: o.row_tile.unwrap_or(d.row_tile),
                width_ratio: o.width_ratio.unwrap_or(d.width_ratio),
                partitioner: match o.partitioner {
                    Some(PartitionerArg::Random) => Partitioner::Random,
                    _ => Partitioner::Metis,
                },
                fallback: match o.fallback {
                    Some(FallbackArg::Dense) => Fallback::Dense,
                    _ => Fallback::Keep,
                },
                legacy: o.legacy_regroup,
            })
        }
        ShuffledBlock => {
            let (h, w) = parse_block(o.block.as_deref().unwrap_or("16"))?;
            if h != w {
                bail!("--block {h}x{w}: shuffled blocks are square; give one size b");
            }
            Pattern::ShuffledBlock(ShuffledConfig {
                block: h,
                blocks: o.blocks,
            })
        }
        Block => {
            let (height, width) = parse_block(o.block.as_deref().unwrap_or("16x16"))?;
            Pattern::Block(BlockConfig { height, width })
        }
        Nm => {
            let d = NmConfig::default();
            Pattern::Nm(NmConfig {
                n: o.n.unwrap_or(d.n),
                m: o.m.unwrap_or(d.m),
                permute: o.permute,
                escape_attempts: o.escape_attempts.unwrap_or(d.escape_attempts),
                max_rounds: d.max_rounds,
            })
        }
    };
    pattern.validate()?;
    Ok(pattern)
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

/// `16` → (16, 16); `16x8` → (16, 8).
fn parse_block(s: &str) -> Result<(usize, usize)> {
    let parse = |x: &str| -> Result<usize> {
        let v: usize = x
            .trim()
            .parse()
            .with_context(|| format!("--block {s}: expected b or HxW"))?;
        if v == 0 {
            bail!("--block {s}: sizes must be at least 1");
        }
        Ok(v)
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let b = parse(s)?;
            Ok((b, b))
        }
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
        assert_eq!(parse_block("16").unwrap(), (16, 16));
        assert_eq!(parse_block("32x8").unwrap(), (32, 8));
        assert!(parse_block("0").is_err());
        assert!(parse_block("ax4").is_err());
        let o = PatternOptions {
            parts: Some("auto".into()),
            ..Default::default()
        };
        match build(PatternArg::Group, &o).unwrap() {
            Pattern::Group(g) => assert_eq!(g.parts, PartCount::Auto),
            p => panic!("{p:?}"),
        }
        let o = PatternOptions {
            block: Some("16x8".into()),
            ..Default::default()
        };
        assert!(build(PatternArg::ShuffledBlock, &o).is_err());
    }
}
