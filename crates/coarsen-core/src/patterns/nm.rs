//! N:M sparsity along input channels, with the input-channel permutation search of Pool & Yu
//! (NeurIPS 2021) as apex runs it.
//!
//! For a weight `[Cout, Cin, kh, kw]`, each group holds M consecutive input channels at a fixed
//! (output channel, kernel position); for a linear weight, M consecutive columns. Each group keeps
//! its N entries of largest `|w|` under the input mask (never an entry the mask had removed).
//!
//! The permutation search reorders input channels to keep more magnitude: the channels are cut
//! into stripes of M; for every pair of stripes, every way of splitting their 2M channels into two
//! new stripes is tried, the best non-overlapping improvements are applied, and this repeats until
//! nothing improves; then a few random swaps try to escape the local optimum. The best
//! permutation found is kept, so the result never holds less magnitude than no permutation.
//! Wide layers are searched in windows of stripes, dealt again at random (see [`nm_permute`]).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mask::Mask;
use crate::view::MatrixView;

use super::masked_magnitudes;

/// Parameters of N:M.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NmConfig {
    /// Entries kept per group.
    pub n: usize,
    /// Group size.
    pub m: usize,
    /// Search an input-channel permutation.
    pub permute: bool,
    /// Regrow every group to exactly N from the weights (as Refill regrows channels): the
    /// input mask's ones are kept first, then the largest remaining weights of the group.
    pub fill: bool,
    /// Random escapes from a local optimum of the search (apex: 100; here 10: on PP-OCRv4 and
    /// the demo CNN the other 90 add under 0.02 points of magnitude at twice the time).
    pub escape_attempts: usize,
    /// Bound on the rounds of greedy improvement.
    pub max_rounds: usize,
    /// Stripes per window of the search on wide layers (0: every pair of stripes, however
    /// wide). See [`nm_permute`].
    pub window: usize,
}

impl Default for NmConfig {
    fn default() -> Self {
        NmConfig {
            n: 2,
            m: 4,
            permute: false,
            fill: false,
            escape_attempts: 10,
            max_rounds: 500,
            window: 32,
        }
    }
}

impl NmConfig {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.m == 0 || self.n == 0 || self.n > self.m {
            return Err(Error::param(
                "--n/--m",
                format!("{}:{}", self.n, self.m),
                "needs 1 <= N <= M",
            ));
        }
        if self.m > 32 {
            return Err(Error::param(
                "--m",
                self.m,
                "group size above 32 is not supported",
            ));
        }
        Ok(())
    }
}

/// The result of [`nm_prune`].
#[derive(Clone, Debug)]
pub struct NmOutcome {
    /// The new mask, in the original channel order.
    pub mask: Mask,
    /// The input-channel permutation (`perm[new] = old`) when one was searched and applied.
    pub col_perm: Option<Vec<usize>>,
    /// Σ|w| kept with the permutation (equal to `kept_unpermuted` without one).
    pub kept: f64,
    /// Σ|w| kept by N:M without a permutation.
    pub kept_unpermuted: f64,
    /// Why the permutation search was skipped, when asked for but not run.
    pub permute_skipped: Option<String>,
}

/// N:M for one layer of the given view. `weights` rank entries (the mask itself when absent).
pub fn nm_prune(
    mask: &Mask,
    weights: Option<&[f32]>,
    view: MatrixView,
    cfg: &NmConfig,
    seed: u64,
) -> Result<NmOutcome> {
    cfg.validate()?;
    if cfg.fill {
        let w = weights.ok_or_else(|| {
            Error::param(
                "--fill",
                "true",
                "regrowing groups needs the weights (--weights)",
            )
        })?;
        let mut out = nm_prune(
            mask,
            weights,
            view,
            &NmConfig {
                fill: false,
                ..*cfg
            },
            seed,
        )?;
        let perm = out
            .col_perm
            .clone()
            .unwrap_or_else(|| (0..view.in_channels).collect());
        fill_groups(&mut out.mask, w, view, &perm, cfg.n, cfg.m);
        return Ok(out);
    }
    let scores = ChannelScores::new(mask, weights, view);
    let identity: Vec<usize> = (0..view.in_channels).collect();
    let plain = scores.select(&identity, cfg.n, cfg.m);
    let kept_unpermuted = plain.magnitude(&masked_magnitudes(mask, weights));
    if !cfg.permute {
        return Ok(NmOutcome {
            mask: plain,
            col_perm: None,
            kept: kept_unpermuted,
            kept_unpermuted,
            permute_skipped: None,
        });
    }
    let (perm, skipped) = match nm_permute(&scores, cfg, seed) {
        Ok(p) => (p, None),
        Err(reason) => (identity.clone(), Some(reason)),
    };
    let out = scores.select(&perm, cfg.n, cfg.m);
    let kept = out.magnitude(&masked_magnitudes(mask, weights));
    if kept + 1e-9 * kept.abs() < kept_unpermuted {
        // The search only accepts improvements, so this cannot happen; keep the safe result.
        return Ok(NmOutcome {
            mask: plain,
            col_perm: Some(identity),
            kept: kept_unpermuted,
            kept_unpermuted,
            permute_skipped: Some("the search found nothing better".into()),
        });
    }
    Ok(NmOutcome {
        mask: out,
        col_perm: Some(perm),
        kept,
        kept_unpermuted,
        permute_skipped: skipped,
    })
}

/// Regrows every group of `m` channels (in `perm`'s order) at every line to exactly `n` ones (or
/// all of a short last group), adding the largest |w| not yet kept (ties by position).
fn fill_groups(mask: &mut Mask, w: &[f32], view: MatrixView, perm: &[usize], n: usize, m: usize) {
    let inner = view.inner.max(1);
    let mut free: Vec<(f32, usize)> = Vec::with_capacity(m);
    for group in perm.chunks(m) {
        for r in 0..view.rows {
            for s in 0..inner {
                let col = |c: usize| c * inner + s;
                let have = group.iter().filter(|&&c| mask.get(r, col(c))).count();
                let want = n.min(group.len());
                if have >= want {
                    continue;
                }
                free.clear();
                free.extend(
                    group
                        .iter()
                        .enumerate()
                        .filter(|&(_, &c)| !mask.get(r, col(c)))
                        .map(|(pos, &c)| (w[r * view.cols + col(c)].abs(), pos)),
                );
                free.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, pos) in free.iter().take(want - have) {
                    mask.set(r, col(group[pos]), true);
                }
            }
        }
    }
}

/// Masked magnitudes laid out channel-major: `data[c·lines + l]` where line `l = r·inner + s`
/// is one (output channel, kernel position).
pub struct ChannelScores {
    channels: usize,
    lines: usize,
    inner: usize,
    cols: usize,
    data: Vec<f32>,
    /// Per channel, a bitset of the lines where its score is nonzero.
    nonzero: Vec<u64>,
    words: usize,
}

impl ChannelScores {
    /// Lays out `|w|⊙mask` of a layer.
    pub fn new(mask: &Mask, weights: Option<&[f32]>, view: MatrixView) -> Self {
        let a = masked_magnitudes(mask, weights);
        let (channels, inner) = (view.in_channels, view.inner);
        let lines = view.rows * inner;
        let mut data = vec![0.0f32; channels * lines];
        for r in 0..view.rows {
            for c in 0..channels {
                for s in 0..inner {
                    data[c * lines + r * inner + s] = a[r * view.cols + c * inner + s];
                }
            }
        }
        let words = lines.div_ceil(64);
        let mut nonzero = vec![0u64; channels * words];
        for c in 0..channels {
            for (l, &v) in data[c * lines..(c + 1) * lines].iter().enumerate() {
                if v > 0.0 {
                    nonzero[c * words + l / 64] |= 1 << (l % 64);
                }
            }
        }
        ChannelScores {
            channels,
            lines,
            inner,
            cols: view.cols,
            data,
            nonzero,
            words,
        }
    }

    fn nonzero_bits(&self, c: usize) -> &[u64] {
        &self.nonzero[c * self.words..(c + 1) * self.words]
    }

    fn channel(&self, c: usize) -> &[f32] {
        &self.data[c * self.lines..(c + 1) * self.lines]
    }

    /// The N:M mask under permutation `perm` (in original channel order).
    fn select(&self, perm: &[usize], n: usize, m: usize) -> Mask {
        let rows = self.lines / self.inner.max(1);
        let mut out = Mask::zeros(rows, self.cols);
        let mut vals: Vec<(f32, usize)> = Vec::with_capacity(m);
        for group in perm.chunks(m) {
            for l in 0..self.lines {
                vals.clear();
                for (pos, &c) in group.iter().enumerate() {
                    let v = self.channel(c)[l];
                    if v > 0.0 {
                        vals.push((v, pos));
                    }
                }
                vals.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let (r, s) = (l / self.inner, l % self.inner);
                for &(_, pos) in vals.iter().take(n) {
                    out.set(r, group[pos] * self.inner + s, true);
                }
            }
        }
        out
    }
}

/// Lines processed together: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// Σ over lines of the sum of the N largest of `cols[k][line]` — the magnitude a group of
/// channels keeps under N:M.
fn topn_sum(cols: &[&[f32]], n: usize, len: usize) -> f64 {
    let m = cols.len();
    let mut total = 0.0f64;
    let mut v = [[0.0f32; LANES]; 32];
    let mut start = 0;
    while start < len {
        let w = LANES.min(len - start);
        for (dst, col) in v.iter_mut().zip(cols) {
            *dst = [0.0; LANES];
            dst[..w].copy_from_slice(&col[start..start + w]);
        }
        let acc = topn_lanes(&mut v[..m], n);
        total += acc.iter().map(|&x| x as f64).sum::<f64>();
        start += LANES;
    }
    total
}

/// The ways to re-split two stripes' 2M channels into two stripes of M: every M-subset holding
/// position 0 (each unordered split once), or single swaps when those are too many.
fn splits(m: usize) -> Vec<Vec<usize>> {
    fn rec(
        start: usize,
        left: usize,
        total: usize,
        cur: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        if left == 0 {
            out.push(cur.clone());
            return;
        }
        for i in start..=total - left {
            cur.push(i);
            rec(i + 1, left - 1, total, cur, out);
            cur.pop();
        }
    }
    let count = binomial(2 * m - 1, m - 1);
    let mut out = Vec::new();
    if count <= 1024 {
        let mut cur = vec![0];
        rec(1, m - 1, 2 * m, &mut cur, &mut out);
    } else {
        out.push((0..m).collect());
        for a in 0..m {
            for b in m..2 * m {
                let mut s: Vec<usize> = (0..m).filter(|&x| x != a).collect();
                s.push(b);
                s.sort_unstable();
                out.push(s);
            }
        }
    }
    out
}

fn binomial(n: usize, k: usize) -> usize {
    (0..k).fold(1usize, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

/// Bit `i` of the result is set where more than `n` of the `inputs` words have bit `i` set: a
/// bit-sliced counter (one bit plane per power of two) and a comparison with the constant `n`.
fn more_than(inputs: &[u64], n: usize) -> u64 {
    let mut planes = [0u64; 7];
    for &x in inputs {
        let mut carry = x;
        for p in planes.iter_mut() {
            let next = *p & carry;
            *p ^= carry;
            carry = next;
            if carry == 0 {
                break;
            }
        }
    }
    let (mut gt, mut eq) = (0u64, !0u64);
    for (bit, &p) in planes.iter().enumerate().rev() {
        if (n >> bit) & 1 == 0 {
            gt |= eq & p;
            eq &= !p;
        } else {
            eq &= p;
        }
    }
    gt
}

/// Reusable buffers of [`best_split`].
#[derive(Default)]
struct Scratch {
    /// Contested lines, chunk-major: chunk `q`, channel `k` is `chunks[q·2M + k]`.
    chunks: Vec<[f32; LANES]>,
    words: Vec<u64>,
    lines: Vec<usize>,
    sums: Vec<[f32; LANES]>,
    pair_sums: Vec<[f32; LANES]>,
}

/// The splits of two stripes' 2M channels: each split's M positions, their complement's, and
/// (for N = 2) the indices of the position pairs inside each, into the table of all pairs
/// `i < j` of the 2M positions (see [`pair_index`]).
struct SplitTables<'a> {
    splits: &'a [Vec<usize>],
    complements: &'a [Vec<usize>],
    pairs: &'a [(Vec<usize>, Vec<usize>)],
}

/// Index of the pair `i < j` of `k` positions, pairs ordered (0,1), (0,2), …, (1,2), ….
fn pair_index(i: usize, j: usize, k: usize) -> usize {
    i * (2 * k - i - 1) / 2 + (j - i - 1)
}

/// The pair indices inside each split and each complement (for [`accumulate`] with N = 2).
fn pair_tables(
    splits: &[Vec<usize>],
    complements: &[Vec<usize>],
    m2: usize,
) -> Vec<(Vec<usize>, Vec<usize>)> {
    let inside = |set: &[usize]| -> Vec<usize> {
        let mut out = Vec::new();
        for (a, &i) in set.iter().enumerate() {
            for &j in &set[a + 1..] {
                out.push(pair_index(i.min(j), i.max(j), m2));
            }
        }
        out
    };
    splits
        .iter()
        .zip(complements)
        .map(|(s, t)| (inside(s), inside(t)))
        .collect()
}

/// Adds, for every split, the magnitude both halves keep on each chunk of `LANES` contested lines
/// (`chunks[q·m2 + k]`: chunk q, position k) to `sums`. Runs the AVX-512 or AVX2 build of the
/// same code where the CPU has it.
fn accumulate(
    chunks: &[[f32; LANES]],
    m2: usize,
    n: usize,
    t: &SplitTables<'_>,
    pair_sums: &mut Vec<[f32; LANES]>,
    sums: &mut [[f32; LANES]],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { accumulate_avx512(chunks, m2, n, t, pair_sums, sums) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { accumulate_avx2(chunks, m2, n, t, pair_sums, sums) };
            return;
        }
    }
    accumulate_body(chunks, m2, n, t, pair_sums, sums);
}

/// An ISA build of [`accumulate_body`]: the same code compiled with `$feature` enabled.
macro_rules! accumulate_for {
    ($name:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            chunks: &[[f32; LANES]],
            m2: usize,
            n: usize,
            t: &SplitTables<'_>,
            pair_sums: &mut Vec<[f32; LANES]>,
            sums: &mut [[f32; LANES]],
        ) {
            accumulate_body(chunks, m2, n, t, pair_sums, sums);
        }
    };
}

accumulate_for!(accumulate_avx512, "avx512f");
accumulate_for!(accumulate_avx2, "avx2");

#[inline(always)]
fn lanes_max(a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
    let mut out = [0.0f32; LANES];
    for i in 0..LANES {
        out[i] = if a[i] > b[i] { a[i] } else { b[i] };
    }
    out
}

#[inline(always)]
fn lanes_add(a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
    let mut out = [0.0f32; LANES];
    for i in 0..LANES {
        out[i] = a[i] + b[i];
    }
    out
}

/// Max over `idx` of `table[idx]` (`idx` non-empty).
#[inline(always)]
fn max_of(table: &[[f32; LANES]], idx: &[usize]) -> [f32; LANES] {
    let mut best = table[idx[0]];
    for &i in &idx[1..] {
        best = lanes_max(best, table[i]);
    }
    best
}

#[inline(always)]
fn accumulate_body(
    chunks: &[[f32; LANES]],
    m2: usize,
    n: usize,
    t: &SplitTables<'_>,
    pair_sums: &mut Vec<[f32; LANES]>,
    sums: &mut [[f32; LANES]],
) {
    let m = m2 / 2;
    if n == 1 {
        // The largest of each half.
        for block in chunks.chunks_exact(m2) {
            for ((s, c), sum) in t.splits.iter().zip(t.complements).zip(sums.iter_mut()) {
                *sum = lanes_add(*sum, lanes_add(max_of(block, s), max_of(block, c)));
            }
        }
    } else if n == 2 && m >= 2 {
        // The best pair of each half: one table of every pair's sum per chunk, then a max.
        pair_sums.clear();
        pair_sums.resize(m2 * (m2 - 1) / 2, [0.0; LANES]);
        for block in chunks.chunks_exact(m2) {
            let mut p = 0;
            for i in 0..m2 {
                for j in i + 1..m2 {
                    pair_sums[p] = lanes_add(block[i], block[j]);
                    p += 1;
                }
            }
            for ((ps, pc), sum) in t.pairs.iter().map(|(a, b)| (a, b)).zip(sums.iter_mut()) {
                *sum = lanes_add(
                    *sum,
                    lanes_add(max_of(pair_sums, ps), max_of(pair_sums, pc)),
                );
            }
        }
    } else {
        let mut v = [[0.0f32; LANES]; 32];
        for block in chunks.chunks_exact(m2) {
            for ((s, c), sum) in t.splits.iter().zip(t.complements).zip(sums.iter_mut()) {
                for (dst, &k) in v.iter_mut().zip(s) {
                    *dst = block[k];
                }
                let a = topn_lanes(&mut v[..m], n);
                for (dst, &k) in v.iter_mut().zip(c) {
                    *dst = block[k];
                }
                let b = topn_lanes(&mut v[..m], n);
                *sum = lanes_add(*sum, lanes_add(a, b));
            }
        }
    }
}

/// Lane-wise maximum and minimum. Written as compare-selects (the magnitudes are finite) on
/// arrays held by value, so it compiles to packed max/min.
#[inline(always)]
fn minmax(a: [f32; LANES], b: [f32; LANES]) -> ([f32; LANES], [f32; LANES]) {
    let mut hi = [0.0f32; LANES];
    let mut lo = [0.0f32; LANES];
    for i in 0..LANES {
        hi[i] = if a[i] > b[i] { a[i] } else { b[i] };
        lo[i] = if a[i] > b[i] { b[i] } else { a[i] };
    }
    (hi, lo)
}

/// Sum of the `n` largest of `v[..m]`, lane by lane (a partial selection network).
#[inline(always)]
fn topn_lanes(v: &mut [[f32; LANES]], n: usize) -> [f32; LANES] {
    let m = v.len();
    let mut acc = [0.0f32; LANES];
    for i in 0..n.min(m) {
        let mut top = v[i];
        for other in &mut v[i + 1..m] {
            let (hi, lo) = minmax(top, *other);
            top = hi;
            *other = lo;
        }
        for (a, t) in acc.iter_mut().zip(top) {
            *a += t;
        }
    }
    acc
}

/// For two stripes, the best re-split: (gain, split index). The gain is computed only on lines
/// where more than N of the 2M entries are nonzero — on all other lines every split keeps
/// everything.
fn best_split(
    scores: &ChannelScores,
    channels: &[usize],
    n: usize,
    split_list: &[Vec<usize>],
    complements: &[Vec<usize>],
    pair_tables: &[(Vec<usize>, Vec<usize>)],
    scratch: &mut Scratch,
) -> (f64, usize) {
    let m2 = channels.len();
    scratch.lines.clear();
    for w in 0..scores.words {
        scratch.words.clear();
        scratch
            .words
            .extend(channels.iter().map(|&c| scores.nonzero_bits(c)[w]));
        let mut hit = more_than(&scratch.words, n);
        while hit != 0 {
            scratch.lines.push(w * 64 + hit.trailing_zeros() as usize);
            hit &= hit - 1;
        }
    }
    if scratch.lines.is_empty() {
        return (0.0, 0);
    }
    let chunks = scratch.lines.len().div_ceil(LANES);
    scratch.chunks.clear();
    scratch.chunks.resize(chunks * m2, [0.0; LANES]);
    for (k, &c) in channels.iter().enumerate() {
        let col = scores.channel(c);
        for (i, &l) in scratch.lines.iter().enumerate() {
            scratch.chunks[(i / LANES) * m2 + k][i % LANES] = col[l];
        }
    }
    // One pass over the chunks accumulates every split's kept magnitude.
    scratch.sums.clear();
    scratch.sums.resize(split_list.len(), [0.0; LANES]);
    let tables = SplitTables {
        splits: split_list,
        complements,
        pairs: pair_tables,
    };
    accumulate(
        &scratch.chunks,
        m2,
        n,
        &tables,
        &mut scratch.pair_sums,
        &mut scratch.sums,
    );
    let values: Vec<f64> = scratch
        .sums
        .iter()
        .map(|s| s.iter().map(|&x| x as f64).sum())
        .collect();
    let base = values[0];
    let mut best = (0.0, 0);
    for (i, &v) in values.iter().enumerate() {
        let gain = v - base;
        if gain > best.0 + 1e-7 * base.abs().max(1e-30) {
            best = (gain, i);
        }
    }
    best
}

/// Searches an input-channel permutation (`perm[new] = old`) that keeps more magnitude under N:M.
/// Fails (with the reason) when the layer does not allow one: channels not a multiple of M, fewer
/// than 2M channels, or nothing to gain.
pub fn nm_permute(
    scores: &ChannelScores,
    cfg: &NmConfig,
    seed: u64,
) -> std::result::Result<Vec<usize>, String> {
    let (n, m, c) = (cfg.n, cfg.m, scores.channels);
    if c % m != 0 {
        return Err(format!("{c} input channels are not a multiple of M = {m}"));
    }
    if c < 2 * m {
        return Err(format!("{c} input channels are fewer than 2M = {}", 2 * m));
    }
    let stripes = c / m;
    let perm: Vec<usize> = (0..c).collect();
    let stripe_value = |perm: &[usize], g: usize| {
        let sel: Vec<&[f32]> = perm[g * m..(g + 1) * m]
            .iter()
            .map(|&ch| scores.channel(ch))
            .collect();
        topn_sum(&sel, n, scores.lines)
    };
    let all: f64 = (0..c)
        .map(|ch| scores.channel(ch).iter().map(|&v| v as f64).sum::<f64>())
        .sum();
    let values: Vec<f64> = (0..stripes).map(|g| stripe_value(&perm, g)).collect();
    let start: f64 = values.iter().sum();
    if all <= 0.0 || (all - start) / all < 1e-3 {
        return Err("N:M already keeps more than 99.9% of the magnitude".into());
    }

    let split_list = splits(m);
    let complements: Vec<Vec<usize>> = split_list
        .iter()
        .map(|s| (0..2 * m).filter(|k| !s.contains(k)).collect())
        .collect();
    let pairs_inside = pair_tables(&split_list, &complements, 2 * m);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut search = Search {
        scores,
        n,
        m,
        split_list: &split_list,
        complements: &complements,
        pair_tables: &pairs_inside,
        perm: (0..c).collect(),
        values,
        best: (start, (0..c).collect()),
        escapes: 0,
        evals: 0,
        rounds: 0,
    };
    // Layers of at most `window` stripes: every pair of stripes, as apex's exhaustive search.
    // Wider layers: the stripes are dealt into windows of `window` and every pair inside a window
    // is searched to convergence; then they are dealt again at random, until a deal improves by
    // less than a thousandth of the gain so far (apex instead halves wide layers and fixes up
    // with a global pass, which costs every pair at least once).
    let window = if cfg.window == 0 {
        stripes
    } else {
        cfg.window.max(2)
    };
    let mut order: Vec<usize> = (0..stripes).collect();
    let mut deals = 0;
    loop {
        let before = search.best.0;
        let pairs: Vec<(usize, usize)> = order
            .chunks(window)
            .flat_map(|w| {
                w.iter()
                    .enumerate()
                    .flat_map(move |(i, &g)| w[i + 1..].iter().map(move |&h| (g.min(h), g.max(h))))
            })
            .collect();
        search.converge(&pairs, cfg, &mut rng);
        deals += 1;
        let gained = search.best.0 - before;
        if stripes <= window
            || deals >= MAX_DEALS
            || search.rounds >= cfg.max_rounds
            || gained <= 1e-3 * (search.best.0 - start)
        {
            break;
        }
        // Deal again: a random order, so that other stripes meet.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
    }
    if std::env::var_os("NM_PROBE").is_some() {
        eprintln!(
            "rounds {} evals {} escapes {} deals {deals} stripes {stripes}",
            search.rounds, search.evals, search.escapes
        );
    }
    Ok(search.best.1)
}

/// At most this many deals of stripes into windows (see [`nm_permute`]).
const MAX_DEALS: usize = 64;

/// The state of one permutation search.
struct Search<'a> {
    scores: &'a ChannelScores,
    n: usize,
    m: usize,
    split_list: &'a [Vec<usize>],
    complements: &'a [Vec<usize>],
    pair_tables: &'a [(Vec<usize>, Vec<usize>)],
    perm: Vec<usize>,
    /// Kept magnitude per stripe under `perm`.
    values: Vec<f64>,
    best: (f64, Vec<usize>),
    escapes: usize,
    evals: usize,
    rounds: usize,
}

impl Search<'_> {
    fn stripe_value(&self, g: usize) -> f64 {
        let m = self.m;
        let sel: Vec<&[f32]> = self.perm[g * m..(g + 1) * m]
            .iter()
            .map(|&ch| self.scores.channel(ch))
            .collect();
        topn_sum(&sel, self.n, self.scores.lines)
    }

    fn pair_channels(&self, g: usize, h: usize) -> Vec<usize> {
        let m = self.m;
        self.perm[g * m..(g + 1) * m]
            .iter()
            .chain(&self.perm[h * m..(h + 1) * m])
            .copied()
            .collect()
    }

    /// Greedy rounds over `pairs`: evaluate the pairs whose stripes changed (in parallel), apply
    /// the best non-overlapping improvements, repeat until none is left; then random escapes.
    fn converge(&mut self, pairs: &[(usize, usize)], cfg: &NmConfig, rng: &mut ChaCha8Rng) {
        let (m, stripes) = (self.m, self.values.len());
        let mut gains: Vec<(f64, usize)> = vec![(0.0, 0); pairs.len()];
        let mut dirty = vec![true; stripes];
        while self.rounds < cfg.max_rounds {
            self.rounds += 1;
            let todo: Vec<usize> = (0..pairs.len())
                .filter(|&i| dirty[pairs[i].0] || dirty[pairs[i].1])
                .collect();
            let this = &*self;
            let fresh: Vec<(f64, usize)> = todo
                .par_iter()
                .map_init(Scratch::default, |scratch, &i| {
                    let (g, h) = pairs[i];
                    let chans = this.pair_channels(g, h);
                    best_split(
                        this.scores,
                        &chans,
                        this.n,
                        this.split_list,
                        this.complements,
                        this.pair_tables,
                        scratch,
                    )
                })
                .collect();
            self.evals += todo.len();
            for (&i, g) in todo.iter().zip(fresh) {
                gains[i] = g;
            }
            dirty.iter_mut().for_each(|d| *d = false);

            let mut order: Vec<usize> = (0..pairs.len()).filter(|&i| gains[i].0 > 0.0).collect();
            order.sort_by(|&a, &b| gains[b].0.total_cmp(&gains[a].0).then(a.cmp(&b)));
            let mut applied = 0;
            for i in order {
                let (g, h) = pairs[i];
                if dirty[g] || dirty[h] {
                    continue;
                }
                let chans = self.pair_channels(g, h);
                let split = gains[i].1;
                for (k, &p) in self.split_list[split].iter().enumerate() {
                    self.perm[g * m + k] = chans[p];
                }
                for (k, &p) in self.complements[split].iter().enumerate() {
                    self.perm[h * m + k] = chans[p];
                }
                dirty[g] = true;
                dirty[h] = true;
                applied += 1;
            }
            for (g, _) in dirty.iter().enumerate().filter(|(_, &d)| d) {
                self.values[g] = self.stripe_value(g);
            }
            let total: f64 = self.values.iter().sum();
            if total > self.best.0 {
                self.best = (total, self.perm.clone());
            }
            if applied == 0 {
                if self.escapes >= cfg.escape_attempts {
                    break;
                }
                self.escapes += 1;
                // Escape: swap one random channel between the two stripes of a random pair.
                let (g, h) = pairs[rng.random_range(0..pairs.len())];
                let (i, j) = (
                    g * m + rng.random_range(0..m),
                    h * m + rng.random_range(0..m),
                );
                self.perm.swap(i, j);
                dirty[g] = true;
                dirty[h] = true;
                self.values[g] = self.stripe_value(g);
                self.values[h] = self.stripe_value(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_counts_bits() {
        let inputs = [0b1111u64, 0b0111, 0b0011, 0b0001, 0, 0, 0, 0];
        // Counts per bit: bit0 = 4, bit1 = 3, bit2 = 2, bit3 = 1.
        assert_eq!(more_than(&inputs, 2), 0b0011);
        assert_eq!(more_than(&inputs, 0), 0b1111);
        assert_eq!(more_than(&inputs, 3), 0b0001);
        assert_eq!(more_than(&inputs, 4), 0);
        let all = [!0u64; 40];
        assert_eq!(more_than(&all, 39), !0);
        assert_eq!(more_than(&all, 40), 0);
    }

    #[test]
    fn splits_are_unique_and_balanced() {
        let s = splits(4);
        assert_eq!(s.len(), 35);
        assert!(s.iter().all(|x| x.len() == 4 && x[0] == 0));
        assert_eq!(splits(2).len(), 3);
        assert_eq!(splits(1).len(), 1);
    }

    #[test]
    fn topn_matches_naive() {
        let cols: Vec<Vec<f32>> = (0..4)
            .map(|k| (0..21).map(|l| ((l * 7 + k * 13) % 11) as f32).collect())
            .collect();
        let refs: Vec<&[f32]> = cols.iter().map(|c| c.as_slice()).collect();
        let naive: f64 = (0..21)
            .map(|l| {
                let mut v: Vec<f32> = cols.iter().map(|c| c[l]).collect();
                v.sort_by(|a, b| b.total_cmp(a));
                (v[0] + v[1]) as f64
            })
            .sum();
        assert_eq!(topn_sum(&refs, 2, 21), naive);
    }

    #[test]
    fn windows_keep_most_of_the_full_search_on_a_wide_layer() {
        // 96 channels = 24 stripes of 4; windows of 4 stripes must be dealt again to meet.
        let (rows, cin) = (48, 96);
        let w: Vec<f32> = (0..rows * cin)
            .map(|i| (((i * 7919) % 1009) as f32 / 1009.0).powi(3) + 0.001)
            .collect();
        let mask = Mask::from_fn(rows, cin, |r, c| {
            ((r * 7919 + c * 104_729).wrapping_mul(2_654_435_761) >> 7) % 100 < 60
        });
        let view = MatrixView::matrix(rows, cin);
        let kept = |window: usize| {
            let cfg = NmConfig {
                permute: true,
                window,
                ..Default::default()
            };
            nm_prune(&mask, Some(&w), view, &cfg, 7).unwrap()
        };
        let (full, windowed) = (kept(0), kept(4));
        let plain = full.kept_unpermuted;
        assert!(full.kept > plain);
        assert!(windowed.kept > plain);
        assert!(
            windowed.kept - plain >= 0.9 * (full.kept - plain),
            "windows keep {} of the full search's gain {}",
            windowed.kept - plain,
            full.kept - plain
        );
        crate::patterns::check::check_nm(&windowed.mask, view, 2, 4, windowed.col_perm.as_deref())
            .unwrap();
    }

    #[test]
    fn accumulate_matches_naive_for_every_n() {
        for (n, m) in [(1, 2), (2, 2), (1, 4), (2, 4), (3, 4), (2, 8), (5, 8)] {
            let m2 = 2 * m;
            let split_list = splits(m);
            let complements: Vec<Vec<usize>> = split_list
                .iter()
                .map(|s| (0..m2).filter(|k| !s.contains(k)).collect())
                .collect();
            let pairs = pair_tables(&split_list, &complements, m2);
            let chunks: Vec<[f32; LANES]> = (0..3 * m2)
                .map(|q| std::array::from_fn(|l| ((q * 37 + l * 11) % 23) as f32 * 0.25))
                .collect();
            let t = SplitTables {
                splits: &split_list,
                complements: &complements,
                pairs: &pairs,
            };
            let mut sums = vec![[0.0f32; LANES]; split_list.len()];
            accumulate(&chunks, m2, n, &t, &mut Vec::new(), &mut sums);
            let top = |vals: Vec<f32>| -> f32 {
                let mut v = vals;
                v.sort_by(|a, b| b.total_cmp(a));
                v.iter().take(n).sum()
            };
            for (k, (sp, c)) in split_list.iter().zip(&complements).enumerate() {
                for lane in 0..LANES {
                    let naive: f32 = chunks
                        .chunks_exact(m2)
                        .map(|b| {
                            top(sp.iter().map(|&i| b[i][lane]).collect())
                                + top(c.iter().map(|&i| b[i][lane]).collect())
                        })
                        .sum();
                    assert_eq!(sums[k][lane], naive, "n={n} m={m} split {k} lane {lane}");
                }
            }
        }
    }

    #[test]
    fn plain_nm_keeps_n_per_group() {
        let m = Mask::ones(3, 10);
        let w: Vec<f32> = (0..30).map(|i| (i % 7) as f32 + 0.5).collect();
        let out = nm_prune(
            &m,
            Some(&w),
            MatrixView::matrix(3, 10),
            &NmConfig::default(),
            0,
        )
        .unwrap();
        for r in 0..3 {
            let row = out.mask.row(r);
            assert_eq!(row[..4].iter().filter(|&&b| b != 0).count(), 2);
            assert_eq!(row[4..8].iter().filter(|&&b| b != 0).count(), 2);
            assert_eq!(row[8..].iter().filter(|&&b| b != 0).count(), 2);
        }
    }

    #[test]
    fn permutation_recovers_a_separable_layout() {
        // Channels 0..4 are large and 4..8 small in every row: 2:4 without a permutation keeps
        // 2 large + 2 small; interleaving them keeps all 4 large.
        let w: Vec<f32> = (0..16 * 8)
            .map(|i| if (i % 8) < 4 { 10.0 } else { 1.0 })
            .collect();
        let m = Mask::ones(16, 8);
        let cfg = NmConfig {
            permute: true,
            ..Default::default()
        };
        let out = nm_prune(&m, Some(&w), MatrixView::matrix(16, 8), &cfg, 1).unwrap();
        assert!(out.kept > out.kept_unpermuted);
        assert_eq!(out.kept, 16.0 * 40.0);
        let perm = out.col_perm.unwrap();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn conv_groups_run_along_input_channels() {
        let view = MatrixView::of(&[2, 8, 3, 3]).unwrap();
        let m = Mask::ones(view.rows, view.cols);
        let out = nm_prune(&m, None, view, &NmConfig::default(), 0).unwrap();
        for r in 0..2 {
            for s in 0..9 {
                for g in 0..2 {
                    let n = (0..4)
                        .filter(|k| out.mask.get(r, view.col(g * 4 + k, s)))
                        .count();
                    assert_eq!(n, 2);
                }
            }
        }
    }

    #[test]
    fn skipped_permutation_says_why() {
        let m = Mask::ones(4, 6);
        let cfg = NmConfig {
            permute: true,
            ..Default::default()
        };
        let out = nm_prune(&m, None, MatrixView::matrix(4, 6), &cfg, 0).unwrap();
        assert!(out.permute_skipped.unwrap().contains("multiple"));
    }

    #[test]
    fn fill_needs_weights_and_prefers_the_masks_ones() {
        let view = MatrixView::of(&[1, 4]).unwrap();
        let mask = Mask::from_fn(1, 4, |_, c| c == 3);
        let cfg = NmConfig {
            fill: true,
            ..NmConfig::default()
        };
        let err = nm_prune(&mask, None, view, &cfg, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("weights"), "{err}");
        // Column 3 (in the mask) stays although its weight is the smallest; column 1 fills.
        let w = [0.5f32, 2.0, 1.0, 0.1];
        let out = nm_prune(&mask, Some(&w), view, &cfg, 0).unwrap();
        let kept: Vec<usize> = (0..4).filter(|&c| out.mask.get(0, c)).collect();
        assert_eq!(kept, vec![1, 3]);
    }
}
