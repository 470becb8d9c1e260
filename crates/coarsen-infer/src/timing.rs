//! Latency of a packed network against its dense path, interleaved in the same run.

use serde::{Deserialize, Serialize};

use crate::engine::InferenceNet;
use crate::error::Result;

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
}

/// Times `packed` against `dense` on the channel-major batch `x` of `batch` images, `reps`
/// times each (at least once), interleaved; medians.
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
    let (packed_ms, dense_ms) =
        coarsen_kernels::timing::interleaved(reps.max(1), || run(packed), || run(dense));
    if let Some(e) = error.into_inner() {
        return Err(e);
    }
    Ok(PathTiming {
        packed_ms,
        dense_ms,
        time_saving: 1.0 - packed_ms / dense_ms,
        ideal_time_saving: 1.0
            - packed.macs_per_image() as f64 / dense.macs_per_image().max(1) as f64,
    })
}
