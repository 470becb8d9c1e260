//! Measured per-layer kernel choice: a sparse layer runs packed or on the dense kernels,
//! whichever this machine runs faster at the batch size in use.
//!
//! Structure pays only where the kernel beats the dense GEMM on that shape, and that depends
//! on the layer's size, its density, the batch and the CPU: N:M at batch 1, or a small layer
//! at 50% density, can run slower packed than dense. [`InferenceNet::tune`] times both
//! variants of every sparse layer in whole forward passes on a random batch (every layer
//! packed, then every one dense, interleaved) and keeps the faster; where the two step times
//! are close, whole passes with those layers on either side decide. Results are cached per
//! machine (CPU model, instruction set, threads) and engine options in a JSON file, so later
//! runs reuse them; [`Tuning`] forces either side or re-measures.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use coarsen_kernels::conv::ConvGeometry;

use super::run::{Fused, Kind};
use super::{InferOptions, InferenceNet};
use crate::error::{InferError, Result};

/// How [`InferenceNet::tune`] chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tuning {
    /// Measure each sparse layer once (or reuse the cached measurement) and run the faster.
    #[default]
    Measure,
    /// Measure again, replacing cached measurements.
    Remeasure,
    /// Run every layer in its packed format, unmeasured.
    Packed,
    /// Run every sparse layer on the dense kernels, unmeasured.
    Dense,
}

impl Tuning {
    /// Whether it measures (`Measure`, `Remeasure`) rather than forcing either side.
    pub fn measures(self) -> bool {
        matches!(self, Tuning::Measure | Tuning::Remeasure)
    }
}

/// What tuning decided for one sparse layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerChoice {
    /// The weight's name.
    pub name: String,
    /// Its packed format.
    pub format: String,
    /// Median time of the packed variant, ms (`None` when not measured).
    pub packed_ms: Option<f64>,
    /// Median time of the dense variant, ms (`None` when not measured).
    pub dense_ms: Option<f64>,
    /// Whether the layer runs on the dense kernels.
    pub dense: bool,
    /// Whether its dense variant's Winograd kernels multiply only each row class's input
    /// channels (a weight of whole kernels of zeros, as group sparsity over kernels leaves).
    #[serde(default)]
    pub row_classes: bool,
    /// Whether the times came from the cache.
    pub cached: bool,
    /// Whether whole passes overturned the comparison of its step times: its two variants'
    /// steps timed within [`CLOSE_STEPS`] of each other, and the network ran faster as a whole with
    /// this layer (and the others as close, chosen the same way) on its other variant.
    #[serde(default)]
    pub by_whole_passes: bool,
}

/// Layers whose packed and dense steps time within this factor of each other are checked by
/// whole passes. Step times are taken with a timestamp between steps (the prefix's chunks
/// each on its own thread); in the machine's slow phases (minutes) they inflated some kernels more than
/// others (VGG-16's 2×2 Winograd twins of shuffled blocks of whole kernels at 1.6–1.8 ms
/// against 1.3–1.4 ms packed, where a quiet phase gave 0.85 against 1.25), while whole passes
/// barely changed: three layers ran packed, about 1.3 ms a pass slower.
pub const CLOSE_STEPS: f64 = 1.6;

/// Cached measurements, keyed by machine, batch size and layer.
#[derive(Debug, Default)]
pub struct TuneCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
    dirty: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Entry {
    packed_ms: f64,
    dense_ms: f64,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    /// The engine's source the times were measured with ([`SOURCE`]).
    #[serde(default)]
    source: String,
    entries: BTreeMap<String, Entry>,
}

const CACHE_VERSION: u32 = 1;

/// A hash of the engine's source as built (this crate's and `coarsen-kernels`', by
/// `build.rs`): times measured by another build are not reused, since its kernels may differ
/// under the same names.
const SOURCE: &str = env!("COARSEN_ENGINE_SOURCE");

impl TuneCache {
    /// A cache that lives only in memory.
    pub fn in_memory() -> Self {
        TuneCache::default()
    }

    /// The cache in `path`: its measurements if the file exists and is readable and was
    /// written by a build of the same engine source, else empty (a damaged or foreign file,
    /// or another build's, is ignored and replaced on [`save`](Self::save)); an entry whose
    /// times are not both finite and positive is dropped (measured again).
    pub fn open(path: &FsPath) -> Self {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheFile>(&b).ok())
            .filter(|f| f.version == CACHE_VERSION && f.source == SOURCE)
            .map(|f| {
                f.entries
                    .into_iter()
                    .filter(|(_, e)| {
                        [e.packed_ms, e.dense_ms]
                            .iter()
                            .all(|t| t.is_finite() && *t > 0.0)
                    })
                    .collect()
            })
            .unwrap_or_default();
        TuneCache {
            path: Some(path.to_path_buf()),
            entries,
            dirty: false,
        }
    }

    /// The default cache file: `$COARSEN_TUNE_CACHE`, else `tune.json` in
    /// `$XDG_CACHE_HOME/coarsen` or `~/.cache/coarsen`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("COARSEN_TUNE_CACHE") {
            return Some(PathBuf::from(p));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("coarsen").join("tune.json"))
    }

    /// Writes new measurements back to the file (atomically), if any were made.
    pub fn save(&mut self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let err = |e: std::io::Error| InferError::io(path, e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = CacheFile {
            version: CACHE_VERSION,
            source: SOURCE.to_string(),
            entries: self.entries.clone(),
        };
        let text =
            serde_json::to_vec_pretty(&file).map_err(|e| InferError::file(path, e.to_string()))?;
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })?;
        self.dirty = false;
        Ok(())
    }
}

/// This machine as a cache key: CPU model, instruction set and threads.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "{model}|{}|{} threads",
        coarsen_kernels::Isa::detect().as_str(),
        rayon::current_num_threads()
    )
}

impl InferenceNet {
    /// Chooses, for every sparse layer, its packed format or the dense kernels for batches of
    /// `batch` images, and reports the choices in evaluation order. Structure pays only where
    /// the kernel beats the dense GEMM at that shape, density and batch (N:M at batch 1 does
    /// not), so each such layer is timed in both variants and keeps the faster. The times are
    /// taken in context: whole forward passes on a random batch, every layer to measure
    /// packed, then every one on its dense twin, interleaved (one warm-up each, then 5 to 9
    /// each for about a second), and each layer's median step time compared; where the two
    /// are within [`CLOSE_STEPS`], whole passes with the close layers on either side have the
    /// last word (see [`LayerChoice::by_whole_passes`]). Timed alone, a
    /// layer finds its input and weights in the cache, which flattered kernels that read
    /// more of them (N:M through im2col chose packed where the whole pass ran slower). The
    /// times are cached per machine (CPU model, instruction set, threads), batch size, layer
    /// and engine options. Measurements come from and go to `cache` (call
    /// [`TuneCache::save`] afterwards to keep them). Only the packed path has sparse layers;
    /// a layer found faster dense becomes its dense twin for good (tuning again leaves it as
    /// it is).
    pub fn tune(
        &mut self,
        batch: usize,
        cache: &mut TuneCache,
        tuning: Tuning,
    ) -> Result<Vec<LayerChoice>> {
        if batch == 0 {
            return Err(InferError::param("batch", "0", "must be positive"));
        }
        let machine = machine();
        let options = self.options;
        // Every step with a dense twin: its cache key, its times (from the cache, or measured
        // below) and whether they came from the cache.
        let mut todo: Vec<(usize, String, Option<Entry>, bool)> = Vec::new();
        for (index, step) in self.steps.iter().enumerate() {
            let Kind::Layer(l) = &step.kind else {
                continue;
            };
            if l.dense_twin.is_none() {
                continue;
            }
            // The engine's options change the dense twin's kernels (Winograd) and chunking;
            // the kernels that run each variant are named, so that a new kernel measures
            // again.
            let twin_kernel = l
                .dense_twin
                .as_ref()
                .map_or(String::new(), |t| t.kernel_name(batch, &options));
            let key = format!(
                "{machine}|batch {batch}|{}|{}|{} / {twin_kernel}|{}x{}|{} stored|in {}x{}x{}|{:?}|{options:?}|in context",
                l.name,
                l.plan.format(),
                l.kernel_name(batch, &options),
                l.plan.out_dim(),
                l.plan.in_dim(),
                l.plan.value_count(),
                l.cin,
                l.h,
                l.w,
                l.g
            );
            let known = match tuning {
                Tuning::Measure => cache.entries.get(&key).copied(),
                _ => None,
            };
            todo.push((index, key, known, known.is_some()));
        }
        let measure: Vec<usize> = if tuning.measures() {
            todo.iter()
                .enumerate()
                .filter(|(_, (_, _, known, _))| known.is_none())
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        if !measure.is_empty() {
            let steps: Vec<usize> = measure.iter().map(|&i| todo[i].0).collect();
            let times = self.time_in_context(batch, &steps)?;
            for (&i, e) in measure.iter().zip(times) {
                cache.entries.insert(todo[i].1.clone(), e);
                cache.dirty = true;
                todo[i].2 = Some(e);
            }
        }
        let overturned = if tuning.measures() {
            self.check_by_passes(batch, cache, tuning, &machine, &todo)?
        } else {
            vec![false; todo.len()]
        };
        let mut choices = Vec::new();
        for ((index, _, times, cached), by_whole_passes) in todo.into_iter().zip(overturned) {
            let Kind::Layer(l) = &mut self.steps[index].kind else {
                continue;
            };
            let Some(twin) = l.dense_twin.take() else {
                continue;
            };
            let dense = match (tuning, times) {
                (Tuning::Dense, _) => true,
                (_, Some(e)) => (e.dense_ms < e.packed_ms) != by_whole_passes,
                _ => false,
            };
            choices.push(LayerChoice {
                name: l.name.clone(),
                format: l.plan.format().to_string(),
                packed_ms: times.map(|e| e.packed_ms),
                dense_ms: times.map(|e| e.dense_ms),
                dense,
                row_classes: twin.sparse_winograd(),
                cached,
                by_whole_passes,
            });
            // The variant that does not run is dropped: a layer found faster dense becomes its
            // dense twin.
            if dense {
                **l = *twin;
            }
        }
        self.fuse_downsamples();
        if tuning.measures() {
            self.tune_prefix(batch, cache, tuning, &machine)?;
        }
        Ok(choices)
    }

    /// Which of the layers in `todo` (all with times) whole passes overturn. The close ones
    /// (step times within [`CLOSE_STEPS`]) form two sets, those the step times put packed and
    /// those they put dense; whole passes of `batch` random images, every layer on the side
    /// its step times chose, then with either set on its other side, interleaved (as
    /// [`time_in_context`](Self::time_in_context) times layers), decide: the set whose flip
    /// ran the pass faster, by more than 1% and more than the other's, is overturned. The
    /// pass times are cached beside the layers' (for these entries `packed_ms` is the pass as
    /// the step times chose, `dense_ms` with the set flipped).
    fn check_by_passes(
        &mut self,
        batch: usize,
        cache: &mut TuneCache,
        tuning: Tuning,
        machine: &str,
        todo: &[(usize, String, Option<Entry>, bool)],
    ) -> Result<Vec<bool>> {
        let mut overturned = vec![false; todo.len()];
        // Per layer: whether its step times chose dense.
        let dense: Vec<Option<bool>> = todo
            .iter()
            .map(|(_, _, t, _)| t.map(|e| e.dense_ms < e.packed_ms))
            .collect();
        let close = |e: &Entry| {
            let (a, b) = (e.packed_ms, e.dense_ms);
            a.max(b) < CLOSE_STEPS * a.min(b)
        };
        // Indices into `todo`: the close layers chosen packed, then those chosen dense.
        let mut sets: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
        for (i, ((_, _, times, _), d)) in todo.iter().zip(&dense).enumerate() {
            if let (Some(_), Some(d)) = (times.filter(close), d) {
                sets[usize::from(*d)].push(i);
            }
        }
        if sets.iter().all(Vec::is_empty) {
            return Ok(overturned);
        }
        let prefix = format!("{machine}|batch {batch}|");
        let layers: Vec<String> = todo
            .iter()
            .zip(&dense)
            .map(|((_, key, _, _), d)| {
                let side = d.map_or('?', |d| if d { 'd' } else { 'p' });
                format!("{}:{side}", key.strip_prefix(&prefix).unwrap_or(key))
            })
            .collect();
        let key = format!(
            "{prefix}whole passes|{}|{:?}|flip ",
            layers.join(";"),
            self.options
        );
        let keys = [key.clone() + "packed to dense", key + "dense to packed"];
        // Each set's cached entry (`None` for an empty set), or `None` where one must be
        // measured.
        let known: Option<Vec<Option<Entry>>> = keys
            .iter()
            .zip(&sets)
            .map(|(k, set)| match tuning {
                _ if set.is_empty() => Some(None),
                Tuning::Measure => cache.entries.get(k).map(|&e| Some(e)),
                _ => None,
            })
            .collect();
        let entries = match known {
            Some(entries) => entries,
            None => {
                let base: Vec<usize> = todo
                    .iter()
                    .zip(&dense)
                    .filter(|(_, d)| d.unwrap_or(false))
                    .map(|((s, _, _, _), _)| *s)
                    .collect();
                let flips: Vec<Vec<usize>> = sets
                    .iter()
                    .map(|set| set.iter().map(|&i| todo[i].0).collect())
                    .collect();
                let medians = self.time_flips(batch, &base, &flips)?;
                let mut out = Vec::new();
                for ((k, set), flipped) in keys.iter().zip(&sets).zip(&medians[1..]) {
                    if set.is_empty() {
                        out.push(None);
                        continue;
                    }
                    let e = Entry {
                        packed_ms: medians[0],
                        dense_ms: *flipped,
                    };
                    cache.entries.insert(k.clone(), e);
                    cache.dirty = true;
                    out.push(Some(e));
                }
                out
            }
        };
        let gain = |e: &Option<Entry>| e.map_or(0.0, |e| 1.0 - e.dense_ms / e.packed_ms);
        let best = usize::from(gain(&entries[1]) > gain(&entries[0]));
        if gain(&entries[best]) > 0.01 {
            for &i in &sets[best] {
                overturned[i] = true;
            }
        }
        Ok(overturned)
    }

    /// Swaps every layer of `steps` with its dense twin (twice: back again).
    fn swap_twins(&mut self, steps: &[usize]) {
        for &s in steps {
            if let Kind::Layer(l) = &mut self.steps[s].kind {
                if let Some(mut twin) = l.dense_twin.take() {
                    std::mem::swap(&mut **l, &mut *twin);
                    l.dense_twin = Some(twin);
                }
            }
        }
    }

    /// Median times of whole passes of `batch` random images with the layers of `base` on
    /// their dense twins, then with each of `flips` swapped too, interleaved round by round
    /// (see [`time_rounds`]); the first median is `base`'s, then one per flip (an empty flip
    /// is timed as `base`). The network is left as it was.
    fn time_flips(
        &mut self,
        batch: usize,
        base: &[usize],
        flips: &[Vec<usize>],
    ) -> Result<Vec<f64>> {
        let x = self.timing_input(batch, 0x9);
        let mut times = vec![Vec::new(); flips.len() + 1];
        self.swap_twins(base);
        let result = time_rounds(|| {
            let s = Instant::now();
            self.pass(&x, batch, None)?;
            times[0].push(s.elapsed().as_secs_f64() * 1e3);
            for (t, flip) in times[1..].iter_mut().zip(flips) {
                if flip.is_empty() {
                    continue;
                }
                self.swap_twins(flip);
                let s = Instant::now();
                let r = self.pass(&x, batch, None);
                t.push(s.elapsed().as_secs_f64() * 1e3);
                self.swap_twins(flip);
                r?;
            }
            Ok(())
        });
        self.swap_twins(base);
        result?;
        let base_ms = median_timed(&mut times[0]);
        Ok(times
            .iter_mut()
            .enumerate()
            .map(|(i, t)| {
                if i == 0 || t.is_empty() {
                    base_ms
                } else {
                    median_timed(t)
                }
            })
            .collect())
    }

    /// Chooses by measurement how far a pass's first steps run on chunks of images
    /// ([`InferOptions::prefix_min_floats`](super::InferOptions)): to the cut the options
    /// give, or to the one a stage further (layers of half as many floats per image, e.g.
    /// ResNet-18's and VGG-16's 16×16 stages of 128 channels), whichever ran the whole pass
    /// faster (by at least 1%), in interleaved passes as layers are timed, cached beside the
    /// layers' times. Chunks keep a stage's values in the cache but read its weights once per
    /// chunk: a stage of small sparse weights measured 3–7% faster in chunks, the same stage
    /// of dense or larger group weights up to 4% slower, so neither is the rule. Where both
    /// cuts are the same, or a pass of `batch` images is not chunked, nothing changes.
    fn tune_prefix(
        &mut self,
        batch: usize,
        cache: &mut TuneCache,
        tuning: Tuning,
        machine: &str,
    ) -> Result<()> {
        // The options as set (tuning again chooses between the same two cuts).
        let mut base = self.options;
        base.prefix_min_floats = self.untuned_prefix_min.unwrap_or(base.prefix_min_floats);
        self.untuned_prefix_min = None;
        let further = InferOptions {
            prefix_min_floats: base.prefix_min_floats / 2,
            ..base
        };
        self.options = further;
        let far = super::run::plan_prefix(self);
        self.options = base;
        let near = super::run::plan_prefix(self);
        self.prefix = near;
        if far.is_none() || far == near || super::run::prefix(self, batch).is_none() {
            return Ok(());
        }
        // The network as it runs: every step's operation, layers by weight and kernel.
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|st| match &st.kind {
                Kind::Layer(l) => format!("{}:{}", l.name, l.kernel_name(batch, &base)),
                k => k.op_name().to_string(),
            })
            .collect();
        let key = format!(
            "{machine}|batch {batch}|chunks to {} or {} steps|{}|{base:?}",
            near.map_or(0, |p| p.end),
            far.map_or(0, |p| p.end),
            steps.join(";")
        );
        // For this entry `packed_ms` is the pass with the options' cut, `dense_ms` with the
        // further one.
        let e = match cache.entries.get(&key).copied() {
            Some(e) if tuning == Tuning::Measure => e,
            _ => {
                let e = self.time_prefixes(batch, (near, far))?;
                cache.entries.insert(key, e);
                cache.dirty = true;
                e
            }
        };
        if e.dense_ms < 0.99 * e.packed_ms {
            self.untuned_prefix_min = Some(base.prefix_min_floats);
            self.options = further;
            self.prefix = far;
        }
        Ok(())
    }

    /// Median times of whole passes of `batch` random images with the first steps chunked to
    /// each of the two cuts, interleaved (as [`time_in_context`](Self::time_in_context) times
    /// layers); the network is left with the first.
    fn time_prefixes(
        &mut self,
        batch: usize,
        (near, far): (Option<super::run::Prefix>, Option<super::run::Prefix>),
    ) -> Result<Entry> {
        let x = self.timing_input(batch, 0x8);
        let mut times = [Vec::new(), Vec::new()];
        let result = time_rounds(|| {
            for (t, p) in times.iter_mut().zip([near, far]) {
                self.prefix = p;
                let s = Instant::now();
                self.pass(&x, batch, None)?;
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
            Ok(())
        });
        self.prefix = near;
        result?;
        let [mut a, mut b] = times;
        Ok(Entry {
            packed_ms: median_timed(&mut a),
            dense_ms: median_timed(&mut b),
        })
    }

    /// `batch` random images (seeded) for the passes tuning times.
    fn timing_input(&self, batch: usize, seed: u64) -> Vec<f32> {
        let [c, h, w] = self.input;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..c * batch * h * w)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect()
    }

    /// Fuses every 1×1 stride-2 layer into a 3×3 stride-2 layer of the same input (a
    /// residual block's downsample beside its first convolution) where both run their block
    /// kernels in place, once tuning has chosen every layer's kind: one step then computes
    /// both values in one pass over the input
    /// ([`BlockConv::fuse_strided_1x1`](coarsen_kernels::BlockConv::fuse_strided_1x1)),
    /// where the 1×1 layer had split its input into phases and read it from memory again on
    /// its own (ResNet-18 at batch 64: 0.8 to 2.3 ms per downsample, of which its products
    /// were a fraction).
    ///
    /// A block's residual `Add` is fused into the layer computing its later operand, which
    /// in an exported ResNet is the downsample: it would then read the block's second
    /// convolution, which reads the first. So the `Add` (and its ReLU) moves to that second
    /// convolution, which reads the downsample's value instead, and writes the slot the
    /// downsample wrote; the downsample writes the slot the convolution wrote, which nothing
    /// else reads.
    pub(super) fn fuse_downsamples(&mut self) {
        if !self.options.fuse_downsample {
            return;
        }
        let mut i = 0;
        while i < self.steps.len() {
            let Some((j, kernel, residual)) = self.downsample_of(i) else {
                i += 1;
                continue;
            };
            if let Some(c) = residual {
                self.move_residual(j, c);
            }
            let b = self.steps.remove(j);
            let Kind::Layer(down) = b.kind else {
                unreachable!("downsample_of finds layer steps only");
            };
            let at = if j < i { i - 1 } else { i };
            // `downsample_of` found a step of the same one input.
            for &slot in &b.inputs {
                self.reads[slot] -= 1;
            }
            let step = &mut self.steps[at];
            if let Kind::Layer(a) = &mut step.kind {
                a.fused = Some(Box::new(Fused {
                    down: *down,
                    kernel,
                }));
                step.also = Some(b.output);
            }
            // The fused step runs where the earlier of the two ran: its input is ready there,
            // and both values are made no later than before.
            if j < i {
                let s = self.steps.remove(at);
                self.steps.insert(j, s);
            }
            i = at.min(j) + 1;
        }
        self.prefix = super::run::plan_prefix(self);
    }

    /// Moves the residual `Add` fused into the 1×1 layer of step `j` to the layer of step
    /// `c` that computes its other operand (checked by `downsample_of`): step `c` then reads
    /// the 1×1 layer's value as its residual and writes the sum where step `j` wrote it, and
    /// step `j` writes its plain value where step `c` wrote.
    fn move_residual(&mut self, j: usize, c: usize) {
        let (sj, sc) = (self.steps[j].output, self.steps[c].output);
        let relu = match &mut self.steps[j].kind {
            Kind::Layer(b) => {
                b.residual = false;
                std::mem::replace(&mut b.relu, false)
            }
            _ => return,
        };
        self.steps[j].inputs.truncate(1);
        self.steps[j].output = sc;
        if let Kind::Layer(l) = &mut self.steps[c].kind {
            l.residual = true;
            l.relu = relu;
        }
        self.steps[c].inputs.push(sc);
        self.steps[c].output = sj;
    }

    /// A step `j` whose 1×1 stride-2 layer fuses into the 3×3 stride-2 layer of step `i`, the
    /// fused kernel, and the step (after `i`) whose layer takes over the residual `Add` fused
    /// into the 1×1 layer, if it has one.
    fn downsample_of(
        &self,
        i: usize,
    ) -> Option<(usize, coarsen_kernels::BlockConv, Option<usize>)> {
        let sa = &self.steps[i];
        let Kind::Layer(a) = &sa.kind else {
            return None;
        };
        if sa.also.is_some()
            || sa.inputs.len() != 1
            || a.residual
            || !a.fusable(ConvGeometry::square(3, 2, 1))
        {
            return None;
        }
        let ka = a.blocks.as_ref()?;
        self.steps.iter().enumerate().find_map(|(j, sb)| {
            let Kind::Layer(b) = &sb.kind else {
                return None;
            };
            let fits = j != i
                && sb.inputs.first() == sa.inputs.first()
                && sb.also.is_none()
                && b.fusable(ConvGeometry::square(1, 2, 0))
                && (b.cin, b.h, b.w, b.ho, b.wo) == (a.cin, a.h, a.w, a.ho, a.wo);
            if !fits {
                return None;
            }
            let residual = match sb.inputs[..] {
                [_] if !b.residual => None,
                [_, r] if b.residual => Some(self.residual_taker(i, r, b)?),
                _ => return None,
            };
            Some((j, ka.fuse_strided_1x1(b.blocks.as_ref()?)?, residual))
        })
    }

    /// The step after `i` that computes slot `r`, the residual of the 1×1 layer `b`, with a
    /// layer that may take over its `Add`: its value read by nothing else, of `b`'s shape,
    /// with no ReLU, residual or fused layer of its own.
    fn residual_taker(&self, i: usize, r: usize, b: &super::run::Layer) -> Option<usize> {
        let c = self.steps.iter().position(|s| s.output == r)?;
        let sc = &self.steps[c];
        let Kind::Layer(l) = &sc.kind else {
            return None;
        };
        let ok = c > i
            && self.reads[r] == 1
            && sc.also.is_none()
            && !l.relu
            && !l.residual
            && l.fused.is_none()
            && l.dense_twin.is_none()
            && (l.cout, l.ho, l.wo) == (b.cout, b.ho, b.wo);
        ok.then_some(c)
    }

    /// Median time of each of `steps` (layers with a dense twin) in whole forward passes on a
    /// random batch, packed and on its dense twin: one warm-up pass of each, then passes of
    /// the two interleaved, 5 to 9 of each for about a second.
    fn time_in_context(&mut self, batch: usize, steps: &[usize]) -> Result<Vec<Entry>> {
        let x = self.timing_input(batch, 0x7);
        let swap = |net: &mut InferenceNet| net.swap_twins(steps);
        let mut packed = vec![Vec::new(); steps.len()];
        let mut dense = vec![Vec::new(); steps.len()];
        let pass = |net: &InferenceNet, into: &mut [Vec<f64>]| -> Result<()> {
            let mut t = vec![0.0f64; net.steps.len()];
            net.pass(&x, batch, Some(&mut t))?;
            for (v, &s) in into.iter_mut().zip(steps) {
                v.push(t[s] * 1e3);
            }
            Ok(())
        };
        time_rounds(|| {
            let r = pass(self, &mut packed);
            swap(self);
            let r = r.and_then(|()| pass(self, &mut dense));
            swap(self);
            r
        })?;
        Ok(packed
            .iter_mut()
            .zip(&mut dense)
            .map(|(p, d)| Entry {
                packed_ms: median_timed(p),
                dense_ms: median_timed(d),
            })
            .collect())
    }

    /// [`tune`](Self::tune) with the cache in [`TuneCache::default_path`], saving new
    /// measurements there. The cache is best effort: one that cannot be read is re-measured,
    /// one that cannot be written is left as it was.
    pub fn tune_cached(&mut self, batch: usize, tuning: Tuning) -> Result<Vec<LayerChoice>> {
        let mut cache = TuneCache::default_path()
            .map(|p| TuneCache::open(&p))
            .unwrap_or_default();
        let choices = self.tune(batch, &mut cache, tuning)?;
        let _ = cache.save();
        Ok(choices)
    }
}

/// Runs `round` (one timed pass of each side) as tuning times passes: round 0 the warm-up,
/// then at least 5 timed rounds, more while under about a second, at most 10 in all (with 3,
/// a disturbance of the machine, another process for a second, that fell on two of one side's
/// passes flipped a choice: a shuffled-block layer 1.3× faster packed was run dense). Stops at
/// the first error.
fn time_rounds(mut round: impl FnMut() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < 10 && (rounds < 6 || start.elapsed().as_secs_f64() < 1.0) {
        round()?;
        rounds += 1;
    }
    Ok(())
}

/// The median of one side's times from [`time_rounds`], the warm-up left out.
fn median_timed(v: &mut [f64]) -> f64 {
    let v = &mut v[1..];
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One line on what tuning chose: how many of the layers with a packed kernel (the sparse
/// ones, and in bfloat16 the dense ones that run as one block) run packed and which run
/// dense.
pub fn describe_choices(choices: &[LayerChoice]) -> String {
    if choices.is_empty() {
        return "no sparse layer to tune".into();
    }
    let dense: Vec<&str> = choices
        .iter()
        .filter(|c| c.dense)
        .map(|c| c.name.as_str())
        .collect();
    let measured = choices.iter().any(|c| c.packed_ms.is_some());
    let overturned = choices.iter().filter(|c| c.by_whole_passes).count();
    let how = match (measured, overturned) {
        (false, _) => "as forced".to_string(),
        (true, 0) => "measured".to_string(),
        (true, n) => format!("measured; {n} chosen by whole passes against their step times"),
    };
    if dense.is_empty() {
        format!(
            "all {} layers with a packed kernel run packed ({how})",
            choices.len()
        )
    } else {
        let shown = dense.len().min(4);
        let more = if dense.len() > shown {
            format!(" and {} more", dense.len() - shown)
        } else {
            String::new()
        };
        let classes = choices.iter().filter(|c| c.dense && c.row_classes).count();
        let classes = if classes > 0 {
            format!(", {classes} of them on Winograd over row classes of whole kernels")
        } else {
            String::new()
        };
        format!(
            "{} of {} layers with a packed kernel run packed, {} on the dense kernels ({how}{classes}): {}{more}",
            choices.len() - dense.len(),
            choices.len(),
            dense.len(),
            dense[..shown].join(", ")
        )
    }
}
