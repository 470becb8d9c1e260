//! Density targeting: after conversion, prune or refill *inside the structure* until each layer,
//! or all layers together, reaches a requested density.
//!
//! A converted layer is built of units that the pattern keeps or drops whole ([`Structure`]):
//! rows (channel), aligned tiles (block), a row class's columns (group), a row group's column
//! chunks (shuffled blocks) and single weights under the N:M cap. Removing kept units or adding
//! free ones keeps the pattern's defining property, so targeting never breaks a structure.
//!
//! Units are ranked by their mean score per weight: the dense weights' magnitude when weights
//! are given (adding a unit then *refills* it from the dense or rewound weights, as Refill does),
//! else the share of the unstructured input mask they cover. Pruning drops the lowest first,
//! refilling adds the highest first; a unit is taken only when it brings the count closer to the
//! target, so a layer ends within half its smallest unit of the target when the structure allows.
//! Global scope pools the units of all layers (one ranking, as global magnitude pruning has one
//! threshold). A layer always keeps at least one unit: targeting never removes a layer.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::Mask;
use crate::patterns::row_classes;
use crate::prune::Scope;
use crate::view::MatrixView;

/// How far from the requested density a targeted layer (or, with global scope, the total) may
/// end: one percentage point.
pub const TOLERANCE: f64 = 0.01;

/// A requested density and whether each layer or only all layers together must reach it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DensityTarget {
    /// Fraction of weights kept, in (0, 1].
    pub density: f64,
    /// `Layer`: every layer on its own; `Global`: the selected layers together.
    #[serde(with = "scope_name")]
    pub scope: Scope,
}

mod scope_name {
    use crate::prune::Scope;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Scope, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(super::scope_str(*s))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Scope, D::Error> {
        let s = String::deserialize(de)?;
        super::parse_scope(&s).map_err(serde::de::Error::custom)
    }
}

/// `"layer"` or `"global"`.
pub fn scope_str(s: Scope) -> &'static str {
    match s {
        Scope::Layer => "layer",
        Scope::Global => "global",
    }
}

/// Parses `layer` or `global`.
pub fn parse_scope(s: &str) -> Result<Scope> {
    match s {
        "layer" => Ok(Scope::Layer),
        "global" => Ok(Scope::Global),
        other => Err(Error::param(
            "--target-scope",
            other,
            "expected `layer` or `global`",
        )),
    }
}

impl DensityTarget {
    /// A per-layer target.
    pub fn per_layer(density: f64) -> Self {
        DensityTarget {
            density,
            scope: Scope::Layer,
        }
    }

    /// Checks that the density lies in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::param(
                "--target-density",
                self.density,
                "a density must lie in (0, 1] (sparsity 0.8 is density 0.2)",
            ));
        }
        Ok(())
    }
}

/// What a converted layer is built of: the units that density targeting adds or removes whole.
#[derive(Clone, Debug, PartialEq)]
pub enum Structure {
    /// Whole rows (channel sparsity).
    Rows,
    /// Aligned `height`×`width` tiles (cut by the matrix edge at the end).
    Tiles {
        /// Tile height.
        height: usize,
        /// Tile width.
        width: usize,
    },
    /// The mask's row classes, one column at a time (group sparsity: the number of distinct
    /// row patterns never grows).
    Classes,
    /// DSB's row groups and each group's ranked column chunks.
    Shuffled {
        /// Row groups.
        groups: Vec<Vec<usize>>,
        /// Per group, its columns cut into chunks.
        chunks: Vec<Vec<Vec<usize>>>,
    },
    /// Single weights, at most `n` in every group of `m` input channels after `col_perm`.
    Nm {
        /// N.
        n: usize,
        /// M.
        m: usize,
        /// The layer's matrix view (kernel positions).
        view: MatrixView,
        /// The input-channel permutation, if any.
        col_perm: Option<Vec<usize>>,
    },
}

impl Structure {
    /// Calls `f(rows, cols)` for every tile of a tiled structure, kept or not: the aligned tiles
    /// (cut by the matrix edge), or each row group's column chunks. Nothing for the others.
    pub fn for_each_tile(&self, rows: usize, cols: usize, mut f: impl FnMut(&[usize], &[usize])) {
        match self {
            Structure::Tiles { height, width } => {
                let cut = |len: usize, step: usize| -> Vec<Vec<usize>> {
                    (0..len)
                        .step_by(step.max(1))
                        .map(|i| (i..(i + step.max(1)).min(len)).collect())
                        .collect()
                };
                let col_sets = cut(cols, *width);
                for rs in cut(rows, *height) {
                    for cs in &col_sets {
                        f(&rs, cs);
                    }
                }
            }
            Structure::Shuffled { groups, chunks } => {
                for (members, group_chunks) in groups.iter().zip(chunks) {
                    for chunk in group_chunks {
                        f(members, chunk);
                    }
                }
            }
            Structure::Rows | Structure::Classes | Structure::Nm { .. } => {}
        }
    }

    /// Whether the tile `rows` × `cols` of a tiled structure is kept in `mask` (a tile is all
    /// ones or all zeros, so its first cell says); `None` for an empty tile.
    pub fn tile_kept(mask: &Mask, rows: &[usize], cols: &[usize]) -> Option<bool> {
        Some(mask.get(*rows.first()?, *cols.first()?))
    }
}

/// One layer to target.
#[derive(Debug)]
pub struct TargetLayer<'a> {
    /// Tensor name (for notes).
    pub name: &'a str,
    /// What the converted mask is built of.
    pub structure: &'a Structure,
    /// The converted mask, changed in place.
    pub mask: &'a mut Mask,
    /// The unstructured input mask (scores units when there are no weights).
    pub input: &'a Mask,
    /// Dense weights in matrix view, if known.
    pub weights: Option<&'a [f32]>,
}

/// What targeting did to one layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetOutcome {
    /// Units added (refilled).
    pub added: usize,
    /// Units removed (pruned).
    pub removed: usize,
    /// Why the layer ends more than [`TOLERANCE`] from the target (per-layer scope only).
    pub note: Option<String>,
}

/// A rectangle of cells: `pool[rows]` × `pool[cols]`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    rows: (usize, usize),
    cols: (usize, usize),
    size: usize,
    value: f64,
}

/// The units of one layer on one side (kept, or free to add).
#[derive(Debug, Default)]
struct Units {
    pool: Vec<usize>,
    list: Vec<Unit>,
}

impl Units {
    fn span(&mut self, items: impl IntoIterator<Item = usize>) -> (usize, usize) {
        let start = self.pool.len();
        self.pool.extend(items);
        (start, self.pool.len())
    }

    fn push(&mut self, rows: (usize, usize), cols: (usize, usize), cells: &Cells<'_>) {
        let (rs, cs) = (&self.pool[rows.0..rows.1], &self.pool[cols.0..cols.1]);
        let size = rs.len() * cs.len();
        if size == 0 {
            return;
        }
        let value = rs
            .iter()
            .flat_map(|&r| cs.iter().map(move |&c| (r, c)))
            .map(|(r, c)| cells.score(r, c))
            .sum();
        self.list.push(Unit {
            rows,
            cols,
            size,
            value,
        });
    }

    fn cells(&self, u: &Unit) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (rs, cs) = (
            &self.pool[u.rows.0..u.rows.1],
            &self.pool[u.cols.0..u.cols.1],
        );
        rs.iter()
            .flat_map(move |&r| cs.iter().map(move |&c| (r, c)))
    }
}

/// How a cell scores: its dense weight's magnitude, or whether the input mask had it.
struct Cells<'a> {
    cols: usize,
    weights: Option<&'a [f32]>,
    input: &'a Mask,
}

impl Cells<'_> {
    fn score(&self, r: usize, c: usize) -> f64 {
        match self.weights {
            Some(w) => w.get(r * self.cols + c).map_or(0.0, |v| v.abs() as f64),
            None => f64::from(u8::from(self.input.get(r, c))),
        }
    }
}

/// The kept units of a layer (`kept`) or the free ones that may be added. `round` picks the
/// unit kind where there are two: a group layer's class columns on even rounds, its rows on odd
/// ones (a row leaves its class, or an empty row joins the class it scores best in).
fn layer_units(layer: &TargetLayer<'_>, kept: bool, round: usize) -> Units {
    let mask = &*layer.mask;
    let (rows, cols) = (mask.rows(), mask.cols());
    let cells = Cells {
        cols,
        weights: layer.weights,
        input: layer.input,
    };
    let mut u = Units::default();
    match layer.structure {
        Structure::Rows => {
            let all = u.span(0..cols);
            for r in 0..rows {
                if (mask.row_nnz(r) > 0) == kept {
                    let rs = u.span([r]);
                    u.push(rs, all, &cells);
                }
            }
        }
        Structure::Tiles { .. } | Structure::Shuffled { .. } => {
            layer.structure.for_each_tile(rows, cols, |rs, cs| {
                if Structure::tile_kept(mask, rs, cs) == Some(kept) {
                    let rs = u.span(rs.iter().copied());
                    let cs = u.span(cs.iter().copied());
                    u.push(rs, cs, &cells);
                }
            });
        }
        Structure::Classes if round % 2 == 1 => {
            let classes = row_classes(mask);
            if kept {
                for class in &classes {
                    let cs = u.span(class.cols.iter().copied());
                    for &r in &class.rows {
                        let rs = u.span([r]);
                        u.push(rs, cs, &cells);
                    }
                }
            } else {
                let spans: Vec<(usize, usize)> = classes
                    .iter()
                    .map(|class| u.span(class.cols.iter().copied()))
                    .collect();
                for r in (0..rows).filter(|&r| mask.row_nnz(r) == 0) {
                    // The class this row scores best in, by mean score over its columns.
                    let best = classes
                        .iter()
                        .zip(&spans)
                        .map(|(class, &cs)| {
                            let v: f64 = class.cols.iter().map(|&c| cells.score(r, c)).sum();
                            (v / class.cols.len().max(1) as f64, cs)
                        })
                        .max_by(|a, b| a.0.total_cmp(&b.0));
                    if let Some((_, cs)) = best {
                        let rs = u.span([r]);
                        u.push(rs, cs, &cells);
                    }
                }
            }
        }
        Structure::Classes => {
            let singles = u.span(0..cols);
            for class in row_classes(mask) {
                let rs = u.span(class.rows.iter().copied());
                let mut on = vec![false; cols];
                for &c in &class.cols {
                    on[c] = true;
                }
                for (c, &is_on) in on.iter().enumerate() {
                    if is_on == kept {
                        u.push(rs, (singles.0 + c, singles.0 + c + 1), &cells);
                    }
                }
            }
        }
        Structure::Nm {
            n,
            m,
            view,
            col_perm,
        } => {
            let singles_r = u.span(0..rows);
            let singles_c = u.span(0..cols);
            let cell = |r: usize, c: usize| {
                (
                    (singles_r.0 + r, singles_r.0 + r + 1),
                    (singles_c.0 + c, singles_c.0 + c + 1),
                )
            };
            if kept {
                for r in 0..rows {
                    for c in 0..cols {
                        if mask.get(r, c) {
                            let (rs, cs) = cell(r, c);
                            u.push(rs, cs, &cells);
                        }
                    }
                }
            } else {
                let identity: Vec<usize>;
                let perm = match col_perm {
                    Some(p) => p.as_slice(),
                    None => {
                        identity = (0..view.in_channels).collect();
                        &identity
                    }
                };
                for r in 0..rows {
                    for s in 0..view.inner {
                        for group in perm.chunks((*m).max(1)) {
                            let cols_of: Vec<usize> =
                                group.iter().map(|&ch| view.col(ch, s)).collect();
                            let on = cols_of.iter().filter(|&&c| mask.get(r, c)).count();
                            let mut free: Vec<usize> =
                                cols_of.into_iter().filter(|&c| !mask.get(r, c)).collect();
                            free.sort_by(|&a, &b| {
                                cells
                                    .score(r, b)
                                    .total_cmp(&cells.score(r, a))
                                    .then(a.cmp(&b))
                            });
                            for &c in free.iter().take(n.saturating_sub(on)) {
                                let (rs, cs) = cell(r, c);
                                u.push(rs, cs, &cells);
                            }
                        }
                    }
                }
            }
        }
    }
    u
}

/// One candidate of the greedy: its key (mean score per weight), size, layer and unit index.
struct Candidate {
    key: f64,
    size: usize,
    layer: usize,
    unit: usize,
}

/// Takes candidates in order while each brings `count` closer to `target`; a layer whose kept
/// units would drop to zero is skipped (and marked in `floored`). Returns the taken (layer,
/// unit) pairs.
fn greedy(
    mut cands: Vec<Candidate>,
    count: &mut usize,
    target: usize,
    adding: bool,
    kept_units: &mut [usize],
    floored: &mut [bool],
) -> Vec<(usize, usize)> {
    let order = |a: &Candidate, b: &Candidate| {
        let k = a.key.total_cmp(&b.key);
        let k = if adding { k.reverse() } else { k };
        k.then((a.layer, a.unit).cmp(&(b.layer, b.unit)))
    };
    cands.sort_by(order);
    let mut taken = Vec::new();
    for c in cands {
        if (adding && *count >= target) || (!adding && *count <= target) {
            break;
        }
        let next = if adding {
            *count + c.size
        } else {
            *count - c.size.min(*count)
        };
        if next.abs_diff(target) >= count.abs_diff(target) {
            continue;
        }
        if !adding {
            if kept_units[c.layer] <= 1 {
                floored[c.layer] = true;
                continue;
            }
            kept_units[c.layer] -= 1;
        }
        *count = next;
        taken.push((c.layer, c.unit));
    }
    taken
}

/// Moves every layer's mask toward `target` inside its structure (see the module docs) and
/// returns, per layer, what changed and why a layer is still off target.
pub fn retarget(
    layers: &mut [TargetLayer<'_>],
    target: &DensityTarget,
) -> Result<Vec<TargetOutcome>> {
    target.validate()?;
    match target.scope {
        Scope::Layer => Ok(layers
            .par_iter_mut()
            .map(|l| retarget_group(std::slice::from_mut(l), target.density, true))
            .collect::<Vec<_>>()
            .into_iter()
            .flatten()
            .collect()),
        Scope::Global => Ok(retarget_group(layers, target.density, false)),
    }
}

/// Targets `layers` together: one count over all of them.
fn retarget_group(layers: &mut [TargetLayer<'_>], density: f64, notes: bool) -> Vec<TargetOutcome> {
    let len: usize = layers.iter().map(|l| l.mask.len()).sum();
    let mut count: usize = layers.iter().map(|l| l.mask.nnz()).sum();
    let target = ((density * len as f64).round() as usize).min(len);
    let adding = count < target;
    let mut outcomes = vec![TargetOutcome::default(); layers.len()];
    let mut floored = vec![false; layers.len()];
    let mut smallest: Option<usize> = None;
    // Rounds alternate the unit kind where a structure has two (group: columns, then rows), and
    // recompute units after each change; they stop when two rounds in a row change nothing.
    let mut idle = 0;
    for round in 0..MAX_ROUNDS {
        if count == target || idle >= 2 {
            break;
        }
        let units: Vec<Units> = layers
            .iter()
            .map(|l| layer_units(l, !adding, round))
            .collect();
        let mut kept_units: Vec<usize> = if adding {
            vec![usize::MAX; layers.len()]
        } else {
            units.iter().map(|u| u.list.len()).collect()
        };
        let cands: Vec<Candidate> = units
            .iter()
            .enumerate()
            .flat_map(|(layer, u)| {
                u.list.iter().enumerate().map(move |(unit, x)| Candidate {
                    key: x.value / x.size as f64,
                    size: x.size,
                    layer,
                    unit,
                })
            })
            .collect();
        if let Some(m) = cands.iter().map(|c| c.size).min() {
            smallest = Some(smallest.map_or(m, |s| s.min(m)));
        }
        let taken = greedy(
            cands,
            &mut count,
            target,
            adding,
            &mut kept_units,
            &mut floored,
        );
        if taken.is_empty() {
            idle += 1;
            continue;
        }
        idle = 0;
        for (layer, unit) in taken {
            let u = &units[layer];
            let x = u.list[unit];
            for (r, c) in u.cells(&x) {
                layers[layer].mask.set(r, c, adding);
            }
            if adding {
                outcomes[layer].added += 1;
            } else {
                outcomes[layer].removed += 1;
            }
        }
    }
    if notes {
        for ((l, o), &floor) in layers.iter().zip(&mut outcomes).zip(&floored) {
            let reached = l.mask.density();
            if within(reached, density) {
                continue;
            }
            let why = match l.structure {
                Structure::Nm { n, m, .. } if adding => {
                    format!("{n}:{m} keeps at most {n} of every {m}")
                }
                Structure::Classes if adding => {
                    "its blocks already span every column and every row the partition kept"
                        .to_string()
                }
                _ if !adding && floor => {
                    "a layer keeps at least one unit of its structure".to_string()
                }
                _ => {
                    let unit = smallest.unwrap_or(0);
                    format!(
                        "its structure moves in units of {unit} weights ({:.1}% of the layer)",
                        100.0 * unit as f64 / l.mask.len().max(1) as f64
                    )
                }
            };
            o.note = Some(format!(
                "reached density {reached:.4}, not {density}: {why}"
            ));
        }
    }
    outcomes
}

/// At most this many rounds of unit selection (see [`retarget_group`]).
const MAX_ROUNDS: usize = 8;

/// Whether a layer at density `reached` meets a target of `density`.
pub fn within(reached: f64, density: f64) -> bool {
    (reached - density).abs() <= TOLERANCE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patterns::check::{
        check_block, check_channel, check_group, check_nm, check_shuffled,
    };

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919) % 101) as f32 / 100.0 + 0.01)
            .collect()
    }

    fn run(
        structure: &Structure,
        mask: &mut Mask,
        input: &Mask,
        w: Option<&[f32]>,
        d: f64,
    ) -> TargetOutcome {
        let mut layers = [TargetLayer {
            name: "l",
            structure,
            mask,
            input,
            weights: w,
        }];
        retarget(&mut layers, &DensityTarget::per_layer(d))
            .unwrap()
            .remove(0)
    }

    #[test]
    fn rows_prune_the_weakest_and_refill_the_strongest() {
        let (r, c) = (40, 10);
        let mut w = weights(r, c);
        // Row 3 is the strongest, row 5 the weakest.
        w[3 * c..4 * c].iter_mut().for_each(|v| *v = 10.0);
        w[5 * c..6 * c].iter_mut().for_each(|v| *v = 1e-3);
        let input = Mask::from_fn(r, c, |i, _| i < 20);
        let mut mask = Mask::from_fn(r, c, |i, _| i < 20 && i != 3);
        let o = run(&Structure::Rows, &mut mask, &input, Some(&w), 0.6);
        assert_eq!(mask.nnz(), 24 * c);
        assert!(mask.get(3, 0), "the strongest free row is refilled");
        assert_eq!(o.added, 5);
        check_channel(&mask).unwrap();
        let o = run(&Structure::Rows, &mut mask, &input, Some(&w), 0.2);
        assert_eq!(mask.nnz(), 8 * c);
        assert!(!mask.get(5, 0), "the weakest kept row goes first");
        assert!(mask.get(3, 0));
        assert_eq!(o.removed, 16);
        assert!(o.note.is_none());
    }

    #[test]
    fn tiles_shuffled_classes_and_nm_keep_their_property() {
        let (r, c) = (32, 24);
        let w = weights(r, c);
        let input = Mask::from_fn(r, c, |i, j| (i * 3 + j * 5) % 7 < 2);
        // Aligned tiles.
        let mut mask = Mask::from_fn(r, c, |i, j| (i / 4 + j / 4) % 3 == 0);
        run(
            &Structure::Tiles {
                height: 4,
                width: 4,
            },
            &mut mask,
            &input,
            Some(&w),
            0.5,
        );
        check_block(&mask, 4, 4).unwrap();
        assert!(within(mask.density(), 0.5));
        // Shuffled: groups of 8 rows, chunks of 8 columns.
        let groups: Vec<Vec<usize>> = (0..4)
            .map(|g| (0..8).map(|k| k * 4 + g).collect())
            .collect();
        let chunks: Vec<Vec<Vec<usize>>> = (0..4)
            .map(|g| {
                (0..3)
                    .map(|k| (0..8).map(|j| (j * 3 + k + g) % 24).collect())
                    .collect()
            })
            .collect();
        let mut mask = Mask::zeros(r, c);
        for &row in &groups[0] {
            for &col in &chunks[0][0] {
                mask.set(row, col, true);
            }
        }
        let s = Structure::Shuffled { groups, chunks };
        let o = run(&s, &mut mask, &input, Some(&w), 0.4);
        check_shuffled(&mask, 8).unwrap();
        assert_eq!(mask.nnz(), 5 * 64, "0.4 · 768 = 307.2 → 5 tiles of 64");
        assert_eq!(o.added, 4);
        // Group: row classes grow and shrink column by column, never more classes.
        let mut mask = Mask::from_fn(r, c, |i, j| {
            (i < 16 && j < 6) || (i >= 16 && (6..10).contains(&j))
        });
        run(&Structure::Classes, &mut mask, &input, Some(&w), 0.3);
        check_group(&mask, 2).unwrap();
        assert!(within(mask.density(), 0.3));
        run(&Structure::Classes, &mut mask, &input, None, 0.1);
        check_group(&mask, 2).unwrap();
        assert!(within(mask.density(), 0.1));
        // N:M: pruning inside groups, refilling up to N.
        let view = MatrixView::matrix(r, c);
        let nm = Structure::Nm {
            n: 2,
            m: 4,
            view,
            col_perm: None,
        };
        let mut mask = Mask::from_fn(r, c, |i, j| (i + j) % 4 == 0);
        run(&nm, &mut mask, &input, Some(&w), 0.4);
        check_nm(&mask, view, 2, 4, None).unwrap();
        assert!(within(mask.density(), 0.4));
        let o = run(&nm, &mut mask, &input, Some(&w), 0.9);
        check_nm(&mask, view, 2, 4, None).unwrap();
        assert_eq!(mask.density(), 0.5);
        assert!(o.note.is_some_and(|n| n.contains("2:4 keeps at most 2")));
    }

    #[test]
    fn global_scope_moves_the_total_and_never_empties_a_layer() {
        let (r, c) = (20, 10);
        let strong = vec![5.0f32; r * c];
        let weak = vec![0.1f32; r * c];
        let input = Mask::ones(r, c);
        let mut a = Mask::from_fn(r, c, |i, _| i < 10);
        let mut b = Mask::from_fn(r, c, |i, _| i < 10);
        let mut layers = [
            TargetLayer {
                name: "a",
                structure: &Structure::Rows,
                mask: &mut a,
                input: &input,
                weights: Some(&strong),
            },
            TargetLayer {
                name: "b",
                structure: &Structure::Rows,
                mask: &mut b,
                input: &input,
                weights: Some(&weak),
            },
        ];
        let t = DensityTarget {
            density: 0.26,
            scope: Scope::Global,
        };
        let o = retarget(&mut layers, &t).unwrap();
        // 0.26 of 400 = 104 weights: the weak layer gives up all but one row, then the strong one.
        assert_eq!(a.nnz() + b.nnz(), 100);
        assert_eq!(b.nnz(), 10, "the weak layer keeps one row");
        assert_eq!(a.nnz(), 90);
        assert_eq!((o[0].removed, o[1].removed), (1, 9));
    }

    #[test]
    fn group_rows_join_their_best_class_when_columns_run_out() {
        let (r, c) = (32, 24);
        let w = weights(r, c);
        let input = Mask::ones(r, c);
        let mut mask = Mask::from_fn(r, c, |i, j| i < 4 && j < 12);
        let o = run(&Structure::Classes, &mut mask, &input, Some(&w), 0.4);
        check_group(&mask, 1).unwrap();
        assert!(within(mask.density(), 0.4), "{}", mask.density());
        assert!(o.note.is_none());
        assert!(mask.nonempty_rows().len() > 4, "rows joined the class");
        // And back down: rows leave, columns go, still one class.
        run(&Structure::Classes, &mut mask, &input, Some(&w), 0.05);
        check_group(&mask, 1).unwrap();
        assert!(within(mask.density(), 0.05), "{}", mask.density());
    }

    #[test]
    fn a_bad_density_is_refused() {
        for d in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(DensityTarget::per_layer(d).validate().is_err());
        }
        assert!(parse_scope("everywhere").is_err());
        assert_eq!(parse_scope("global").unwrap(), Scope::Global);
    }
}
