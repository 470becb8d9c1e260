//! A [`Pattern`] from a pattern name and loose options, as front ends (the CLI's flags, the
//! Python package's keyword arguments) give them: every front end builds patterns the same way,
//! with the same defaults and the same refusals.
//!
//! ```
//! use coarsen_core::patterns::{PatternOptions, Pattern};
//!
//! let o = PatternOptions { block: Some((8, 8)), ..Default::default() };
//! let p = Pattern::from_options("shuffled-block", &o).unwrap();
//! assert_eq!(p.name(), "shuffled-block");
//! // An option of another pattern is refused, not ignored.
//! let o = PatternOptions { parts: Some(coarsen_core::patterns::PartCount::Auto), ..Default::default() };
//! assert!(Pattern::from_options("channel", &o).is_err());
//! ```

use crate::error::{Error, Result};

use super::{
    BlockConfig, ChannelConfig, ChannelCriterion, Fallback, GroupConfig, NmConfig, PartCount,
    Partitioner, Pattern, ShuffledConfig,
};

/// The pattern names [`Pattern::from_options`] takes.
pub const PATTERN_NAMES: [&str; 6] = [
    "channel",
    "channel+",
    "group",
    "shuffled-block",
    "block",
    "nm",
];

/// The options of every pattern; `None` (or `false`) takes the pattern's default. An option set
/// for a pattern it does not apply to is an error ([`Error::InapplicableOption`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PatternOptions {
    /// channel, channel+: rank rows by ℓ1 magnitude or by count (`Scores` needs `scores`).
    pub criterion: Option<ChannelCriterion>,
    /// channel, channel+: per-layer row scores are given (the criterion becomes `Scores`).
    pub scores: bool,
    /// channel, channel+: Refill+'s extra fraction of rows.
    pub extra: Option<f64>,
    /// group: the number of parts.
    pub parts: Option<PartCount>,
    /// group: the partitioner's imbalance.
    pub imbalance: Option<f64>,
    /// group: the fewest rows a block keeps.
    pub min_rows: Option<usize>,
    /// group: rows per register tile (parts are multiples of it).
    pub row_tile: Option<usize>,
    /// group: the width ratio of a kept column.
    pub width_ratio: Option<f64>,
    /// group: METIS or random.
    pub partitioner: Option<Partitioner>,
    /// group: what a layer without blocks becomes.
    pub fallback: Option<Fallback>,
    /// group: the reference code's Regroup.
    pub legacy_regroup: bool,
    /// shuffled-block (square) and block: the block size as (height, width).
    pub block: Option<(usize, usize)>,
    /// shuffled-block: the number of blocks per layer.
    pub blocks: Option<usize>,
    /// shuffled-block: the row-similarity threshold q of the clustering.
    pub similarity: Option<f64>,
    /// nm: kept per group.
    pub n: Option<usize>,
    /// nm: group size.
    pub m: Option<usize>,
    /// nm: search an input-channel permutation.
    pub permute: bool,
    /// nm: regrow every group to exactly N from the weights.
    pub fill: bool,
    /// nm: escape attempts of the permutation search.
    pub escape_attempts: Option<usize>,
    /// nm: stripes per window of the permutation search (0: every pair).
    pub permute_window: Option<usize>,
    /// Group and shuffled-block: work on whole kernels ([`Pattern::kernels`]).
    pub kernels: bool,
}

impl PatternOptions {
    /// The options that are set, by name (snake_case), with the patterns each applies to.
    fn set(&self) -> Vec<(&'static str, bool, &'static [&'static str])> {
        const CHANNEL: &[&str] = &["channel", "channel+"];
        const GROUP: &[&str] = &["group"];
        const BLOCKS: &[&str] = &["shuffled-block", "block"];
        const SHUFFLED: &[&str] = &["shuffled-block"];
        const NM: &[&str] = &["nm"];
        vec![
            ("criterion", self.criterion.is_some(), CHANNEL),
            ("scores", self.scores, CHANNEL),
            ("extra", self.extra.is_some(), CHANNEL),
            ("parts", self.parts.is_some(), GROUP),
            ("imbalance", self.imbalance.is_some(), GROUP),
            ("min_rows", self.min_rows.is_some(), GROUP),
            ("row_tile", self.row_tile.is_some(), GROUP),
            ("width_ratio", self.width_ratio.is_some(), GROUP),
            ("partitioner", self.partitioner.is_some(), GROUP),
            ("fallback", self.fallback.is_some(), GROUP),
            ("legacy_regroup", self.legacy_regroup, GROUP),
            ("block", self.block.is_some(), BLOCKS),
            ("blocks", self.blocks.is_some(), SHUFFLED),
            ("similarity", self.similarity.is_some(), SHUFFLED),
            ("n", self.n.is_some(), NM),
            ("m", self.m.is_some(), NM),
            ("permute", self.permute, NM),
            ("fill", self.fill, NM),
            ("escape_attempts", self.escape_attempts.is_some(), NM),
            ("permute_window", self.permute_window.is_some(), NM),
            ("kernels", self.kernels, &["group", "shuffled-block"]),
        ]
    }

    /// Every option (snake_case) with the patterns it applies to, as
    /// `criterion, extra (channel, channel+), parts, … (group), …`, leaving out `skip`: for
    /// messages that list what a caller accepts.
    pub fn listing(skip: &[&str]) -> String {
        let all = PatternOptions::default().set();
        let mut out = Vec::new();
        let mut names = Vec::new();
        for (i, &(name, _, applies)) in all.iter().enumerate() {
            if !skip.contains(&name) {
                names.push(name);
            }
            let group_ends = all.get(i + 1).is_none_or(|next| next.2 != applies);
            if group_ends && !names.is_empty() {
                out.push(format!("{} ({})", names.join(", "), applies.join(", ")));
                names.clear();
            }
        }
        out.join(", ")
    }
}

impl Pattern {
    /// The pattern `name` (one of [`PATTERN_NAMES`]) with options `o`, validated.
    pub fn from_options(name: &str, o: &PatternOptions) -> Result<Pattern> {
        let to = PATTERN_NAMES
            .iter()
            .copied()
            .find(|n| *n == name)
            .ok_or_else(|| {
                Error::param(
                    "pattern",
                    name,
                    format!("expected one of {}", PATTERN_NAMES.join(", ")),
                )
            })?;
        for (option, set, applies) in o.set() {
            if set && !applies.contains(&to) {
                return Err(Error::InapplicableOption {
                    option,
                    pattern: to,
                    applies_to: applies.join("|"),
                });
            }
        }
        let pattern = match to {
            "channel" | "channel+" => {
                let base = if to == "channel+" {
                    ChannelConfig::refill_plus()
                } else {
                    ChannelConfig::default()
                };
                let criterion = match (o.scores, o.criterion) {
                    (true, _) => ChannelCriterion::Scores,
                    (false, Some(ChannelCriterion::Scores)) => {
                        return Err(Error::param(
                            "criterion",
                            "scores",
                            "needs per-layer row scores",
                        ))
                    }
                    (false, Some(c)) => c,
                    (false, None) => ChannelCriterion::L1,
                };
                Pattern::Channel(ChannelConfig {
                    criterion,
                    extra: o.extra.unwrap_or(base.extra),
                })
            }
            "group" => {
                let d = GroupConfig::default();
                Pattern::Group(GroupConfig {
                    parts: o.parts.unwrap_or(d.parts),
                    imbalance: o.imbalance.unwrap_or(d.imbalance),
                    min_rows: o.min_rows.unwrap_or(d.min_rows),
                    row_tile: o.row_tile.unwrap_or(d.row_tile),
                    width_ratio: o.width_ratio.unwrap_or(d.width_ratio),
                    partitioner: o.partitioner.unwrap_or(d.partitioner),
                    fallback: o.fallback.unwrap_or(d.fallback),
                    legacy: o.legacy_regroup,
                    kernels: o.kernels,
                })
            }
            "shuffled-block" => {
                let (h, w) = o.block.unwrap_or((16, 16));
                if h != w {
                    return Err(Error::param(
                        "block",
                        format!("{h}x{w}"),
                        "shuffled blocks are square; give one size b",
                    ));
                }
                Pattern::ShuffledBlock(ShuffledConfig {
                    block: h,
                    blocks: o.blocks,
                    similarity: o.similarity,
                    kernels: o.kernels,
                })
            }
            "block" => {
                let d = BlockConfig::default();
                let (height, width) = o.block.unwrap_or((d.height, d.width));
                Pattern::Block(BlockConfig { height, width })
            }
            _ => {
                let d = NmConfig::default();
                Pattern::Nm(NmConfig {
                    n: o.n.unwrap_or(d.n),
                    m: o.m.unwrap_or(d.m),
                    permute: o.permute,
                    fill: o.fill,
                    escape_attempts: o.escape_attempts.unwrap_or(d.escape_attempts),
                    max_rounds: d.max_rounds,
                    window: o.permute_window.unwrap_or(d.window),
                })
            }
        };
        pattern.validate()?;
        Ok(pattern)
    }
}

/// `"16"` → (16, 16); `"16x8"` → (16, 8): a block size as the CLI and the Python package
/// spell it. Sizes must be at least 1.
pub fn parse_block(s: &str) -> Result<(usize, usize)> {
    let parse = |x: &str| -> Result<usize> {
        match x.trim().parse::<usize>() {
            Ok(0) => Err(Error::param("block", s, "sizes must be at least 1")),
            Ok(v) => Ok(v),
            Err(_) => Err(Error::param("block", s, "expected b or HxW")),
        }
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let b = parse(s)?;
            Ok((b, b))
        }
    }
}

/// `"auto"` or a count: the `parts` of a group pattern.
pub fn parse_parts(s: &str) -> Result<PartCount> {
    if s.trim() == "auto" {
        return Ok(PartCount::Auto);
    }
    s.trim()
        .parse::<usize>()
        .map(PartCount::Fixed)
        .map_err(|_| Error::param("parts", s, "expected a count or `auto`"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn listing_names_every_option_with_its_patterns() {
        assert_eq!(
            PatternOptions::listing(&["scores"]),
            "criterion, extra (channel, channel+), parts, imbalance, min_rows, row_tile, \
             width_ratio, partitioner, fallback, legacy_regroup (group), block (shuffled-block, \
             block), blocks, similarity (shuffled-block), n, m, permute, fill, escape_attempts, \
             permute_window (nm), kernels (group, shuffled-block)"
        );
    }

    use super::*;

    #[test]
    fn defaults_per_pattern() {
        let o = PatternOptions::default();
        match Pattern::from_options("channel+", &o).unwrap() {
            Pattern::Channel(c) => assert_eq!(c.extra, 0.1),
            p => panic!("{p:?}"),
        }
        match Pattern::from_options("block", &o).unwrap() {
            Pattern::Block(b) => assert_eq!((b.height, b.width), (16, 16)),
            p => panic!("{p:?}"),
        }
        assert_eq!(Pattern::from_options("group", &o).unwrap().name(), "group");
        assert!(Pattern::from_options("diagonal", &o).is_err());
    }

    #[test]
    fn options_of_other_patterns_are_refused() {
        let o = PatternOptions {
            parts: Some(PartCount::Fixed(4)),
            ..Default::default()
        };
        let err = Pattern::from_options("channel", &o).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InapplicableOption {
                    option: "parts",
                    pattern: "channel",
                    ..
                }
            ),
            "{err}"
        );
        let o = PatternOptions {
            permute: true,
            ..Default::default()
        };
        assert!(Pattern::from_options("block", &o).is_err());
        let o = PatternOptions {
            block: Some((16, 8)),
            ..Default::default()
        };
        assert!(Pattern::from_options("shuffled-block", &o).is_err());
        assert!(Pattern::from_options("block", &o).is_ok());
        let o = PatternOptions {
            criterion: Some(ChannelCriterion::Scores),
            ..Default::default()
        };
        assert!(Pattern::from_options("channel", &o).is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_block("16").unwrap(), (16, 16));
        assert_eq!(parse_block("32x8").unwrap(), (32, 8));
        assert!(parse_block("0").is_err());
        assert!(parse_block("ax4").is_err());
        assert_eq!(parse_parts("auto").unwrap(), PartCount::Auto);
        assert_eq!(parse_parts("8").unwrap(), PartCount::Fixed(8));
        assert!(parse_parts("-1").is_err());
    }
}
