//! Latency of a packed network against its dense path, interleaved in the same run.

use serde::{Deserialize, Serialize};

use crate::engine::{InferenceNet, LayerChoice, Path, Tuning};
use crate::error::Result;
use crate::format::Formats;
use crate::network::Network;

/// Latency of a packed network against its dense path on the same batch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathTiming {
    /// Median milliseconds of the packed path.
    pub packed_ms: f64,
    /// Median milliseconds of the dense path.
    pub dense_ms: f64,
    /// `1 − packed_ms / dense_ms`.
    pub time_saving: f64,
    /// `1 − packed multiply-adds / dense multiply-adds`: what a perfect kernel would save.
    pub ideal_time_saving: f64,
    /// Whether the two paths were one computation, timed once (saving exactly 0); absent
    /// (false) in what earlier versions wrote.
    #[serde(default)]
    pub one_computation: bool,
}

/// Times `packed` against `dense` on the channel-major batch `x` of `batch` images, `reps`
/// times each (at least once), interleaved; medians. Where the two compute the same network
/// on the same kernels (no sparse layer runs packed, the same layers of the same matrix
/// sizes, the same engine options), they are one computation: it is timed once, `reps`
/// times, and the saving is 0 (two timings of it would differ by noise alone, and show as a
/// saving or a loss).
pub fn time_paths(
    packed: &InferenceNet,
    dense: &InferenceNet,
    x: &[f32],
    batch: usize,
    reps: usize,
) -> Result<PathTiming> {
    let error = std::cell::RefCell::new(None);
    let run = |net: &InferenceNet| {
        if let Err(e) = net.forward(x, batch) {
            error.borrow_mut().get_or_insert(e);
        }
    };
    let same = packed.runs_dense_kernels()
        && dense.runs_dense_kernels()
        && packed.options() == dense.options()
        && packed.layers().len() == dense.layers().len()
        && packed
            .layers()
            .iter()
            .zip(dense.layers())
            .all(|(p, d)| (&p.name, p.matrix) == (&d.name, d.matrix));
    let (packed_ms, dense_ms) = if same {
        let ms = coarsen_kernels::timing::repeated(reps.max(1), || run(dense));
        (ms, ms)
    } else {
        coarsen_kernels::timing::interleaved(reps.max(1), || run(packed), || run(dense))
    };
    if let Some(e) = error.into_inner() {
        return Err(e);
    }
    Ok(PathTiming {
        packed_ms,
        dense_ms,
        time_saving: 1.0 - packed_ms / dense_ms,
        ideal_time_saving: 1.0
            - packed.macs_per_image() as f64 / dense.macs_per_image().max(1) as f64,
        one_computation: same,
    })
}

/// [`time_paths`] for a network that `tuning` tuned layer by layer, with the choice made for
/// the whole network too. Each layer keeps the faster of its two variants as timed in context,
/// but where those differ by little, or for channel-compact layers (which have no dense twin),
/// the tuned network can still run no faster than the dense path as a whole. When the
/// interleaved timing says so (`packed` not faster than `dense`) twice in a row and tuning
/// measured (not forced packed), `packed` becomes the dense path of `network` (every layer on
/// the dense kernels, the same function up to rounding), `choices` mark every layer dense,
/// and that one computation is timed once: a saving of exactly 0, never a loss. (One timing
/// alone let a busy host decide: a burst of another process's work in the packed passes of
/// a network a few percent faster made it run dense.) The returned timing, the last one
/// taken, says whether it fell back.
#[allow(clippy::too_many_arguments)]
pub fn time_tuned(
    (network, formats): (&Network, &Formats),
    packed: &mut InferenceNet,
    choices: &mut [LayerChoice],
    tuning: Tuning,
    dense: &InferenceNet,
    x: &[f32],
    batch: usize,
    reps: usize,
) -> Result<TunedTiming> {
    let settled = settle(tuning, || time_paths(packed, dense, x, batch, reps))?;
    if let Some(timing) = settled {
        return Ok(TunedTiming {
            timing,
            runs_dense: false,
        });
    }
    *packed = InferenceNet::with_options(network, formats, Path::Dense, packed.options())?;
    for c in choices.iter_mut() {
        c.dense = true;
    }
    Ok(TunedTiming {
        timing: time_paths(packed, dense, x, batch, reps)?,
        runs_dense: true,
    })
}

/// Timings to settle on for a tuned network ([`time_tuned`]): the first that has the packed
/// path faster (or, where `tuning` does not measure, the first), or `None` (it runs dense)
/// when two in a row have it no faster.
fn settle(
    tuning: Tuning,
    mut time: impl FnMut() -> Result<PathTiming>,
) -> Result<Option<PathTiming>> {
    /// Timings that must all find the packed path no faster before the network runs dense.
    const AGREE: usize = 2;
    for _ in 0..AGREE {
        let t = time()?;
        // Equal times: one computation, timed once (see `time_paths`).
        if t.packed_ms <= t.dense_ms || !tuning.measures() {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// What [`time_tuned`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedTiming {
    /// The two paths' times (after a fall-back, of the dense path alone: saving 0).
    pub timing: PathTiming,
    /// Whether the tuned network measured no faster than the dense path as a whole, and now
    /// runs dense.
    pub runs_dense: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(packed_ms: f64, dense_ms: f64) -> PathTiming {
        PathTiming {
            packed_ms,
            dense_ms,
            time_saving: 1.0 - packed_ms / dense_ms,
            ideal_time_saving: 0.5,
            one_computation: false,
        }
    }

    /// Runs `settle` on a script of timings: what it settled on, and how many it took.
    fn settle_on(tuning: Tuning, script: &[PathTiming]) -> (Option<PathTiming>, usize) {
        let mut taken = 0;
        let got = settle(tuning, || {
            taken += 1;
            Ok(script[taken - 1])
        })
        .unwrap();
        (got, taken)
    }

    #[test]
    fn a_network_runs_dense_only_when_two_timings_agree() {
        let (faster, slower) = (timing(9.0, 10.0), timing(11.0, 10.0));
        // Faster at once: kept, one timing.
        assert_eq!(settle_on(Tuning::Measure, &[faster]), (Some(faster), 1));
        // One slow timing (a busy host) and then a faster one: kept, on the second.
        assert_eq!(
            settle_on(Tuning::Remeasure, &[slower, faster]),
            (Some(faster), 2)
        );
        // Slower twice: dense.
        assert_eq!(settle_on(Tuning::Measure, &[slower, slower]), (None, 2));
        // Equal (one computation) is settled, never run dense.
        let same = timing(10.0, 10.0);
        assert_eq!(settle_on(Tuning::Measure, &[same]), (Some(same), 1));
        // Forced packed: whatever the timing says.
        assert_eq!(settle_on(Tuning::Packed, &[slower]), (Some(slower), 1));
    }

    #[test]
    fn a_failed_timing_is_an_error() {
        let got = settle(Tuning::Measure, || {
            Err(crate::error::InferError::param("x", "1", "a test"))
        });
        assert!(got.is_err());
    }
}
