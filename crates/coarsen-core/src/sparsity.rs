//! The one definition of sparsity that every command reports: over the **prunable layers** (the
//! weights that carry a mask), with the sparsity over **all conv and linear weights** (a weight
//! without a mask counts as dense) given beside it. `train`, `eval`, `export`, `bench` and the
//! conversion report all compute it here.

use serde::{Deserialize, Serialize};

/// Sparsity of a network or a mask file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sparsity {
    /// Fraction of the prunable layers' weights masked out.
    pub prunable: f64,
    /// Fraction of all conv and linear weights masked out (equal to `prunable` when only the
    /// masks are known).
    pub all: f64,
    /// Weights in the prunable layers.
    pub prunable_weights: usize,
    /// Conv and linear weights in all (0 when only the masks were known).
    pub all_weights: usize,
}

impl Sparsity {
    /// From the masks as `(name, kept, len)` and every conv and linear weight as `(name, len)`.
    /// With no weights listed, `all` is taken over the masks alone.
    pub fn of<'a>(
        masks: impl IntoIterator<Item = (&'a str, usize, usize)>,
        weights: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Self {
        let masks: std::collections::BTreeMap<&str, (usize, usize)> = masks
            .into_iter()
            .map(|(n, kept, len)| (n, (kept, len)))
            .collect();
        let (kept, len) = masks
            .values()
            .fold((0usize, 0usize), |(k, l), &(a, b)| (k + a, l + b));
        let (mut kept_all, mut len_all, mut any) = (0usize, 0usize, false);
        for (name, n) in weights {
            any = true;
            kept_all += masks.get(name).map_or(n, |&(k, _)| k.min(n));
            len_all += n;
        }
        let frac = |k: usize, l: usize| {
            if l == 0 {
                0.0
            } else {
                1.0 - k as f64 / l as f64
            }
        };
        Sparsity {
            prunable: frac(kept, len),
            all: if any {
                frac(kept_all, len_all)
            } else {
                frac(kept, len)
            },
            prunable_weights: len,
            all_weights: len_all,
        }
    }

    /// `sparsity P% of the prunable layers (A% of all conv and linear weights)`; the
    /// second figure only when the weights were known.
    pub fn describe(&self) -> String {
        if self.all_weights == 0 {
            return format!(
                "sparsity {:.2}% of the prunable layers",
                100.0 * self.prunable
            );
        }
        format!(
            "sparsity {:.2}% of the prunable layers ({:.2}% of all conv and linear weights)",
            100.0 * self.prunable,
            100.0 * self.all
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunable_layers_and_all_weights() {
        // Two masked layers of 100 weights keep 20 each; an unmasked one of 50 is dense.
        let s = Sparsity::of(
            [("a", 20, 100), ("b", 20, 100)],
            [("a", 100), ("b", 100), ("first", 50)],
        );
        assert!((s.prunable - 0.8).abs() < 1e-12);
        assert!((s.all - (1.0 - 90.0 / 250.0)).abs() < 1e-12);
        assert_eq!((s.prunable_weights, s.all_weights), (200, 250));
        assert_eq!(
            s.describe(),
            "sparsity 80.00% of the prunable layers (64.00% of all conv and linear weights)"
        );
        // Without the weights, both are over the masks; without masks, nothing is sparse.
        let m = Sparsity::of([("a", 20, 100)], []);
        assert_eq!(m.prunable, m.all);
        assert_eq!(m.describe(), "sparsity 80.00% of the prunable layers");
        let d = Sparsity::of([], [("a", 100)]);
        assert_eq!((d.prunable, d.all), (0.0, 0.0));
    }
}
