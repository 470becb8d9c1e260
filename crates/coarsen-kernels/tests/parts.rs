//! Formats built from parts: random, possibly garbage parts are either refused by `from_parts`
//! or give a format whose plan computes exactly what the naive reference computes on its dense
//! matrix. The parts start from a packed random mask and receive random edits (indices moved,
//! swapped, added or dropped, offsets and lengths shifted), or are drawn as garbage outright.

use coarsen_core::{Mask, MatrixView};
use coarsen_kernels::reference::{self, close};
use coarsen_kernels::Result as KResult;
use coarsen_kernels::{
    Block, Bsr, ChannelCompact, Csr, Dense, GroupBlocks, Isa, KernelError, NmCompressed, Packed,
    Plan, RowGroup, ShuffledBlocks, Tile,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PAD: u8 = coarsen_kernels::formats::NM_PAD;

fn values(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A random mask, with shared row patterns half of the time (so that blocks have many rows).
fn mask(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Mask {
    let density = rng.random_range(0.0..1.0);
    if rng.random_bool(0.5) {
        let classes = 1 + rows / 3;
        let of: Vec<usize> = (0..rows).map(|_| rng.random_range(0..classes)).collect();
        let sets: Vec<Vec<bool>> = (0..classes)
            .map(|_| (0..cols).map(|_| rng.random_bool(density)).collect())
            .collect();
        Mask::from_fn(rows, cols, |r, c| sets[of[r]][c])
    } else {
        Mask::from_fn(rows, cols, |_, _| rng.random_bool(density))
    }
}

/// Edits applied to parts: how many, at random (0 keeps them valid).
fn edits(rng: &mut ChaCha8Rng) -> usize {
    [0, 0, 1, 1, 1, 2, 3][rng.random_range(0..7)]
}

/// One random edit of an index list whose entries should be below `bound`.
fn edit_indices(rng: &mut ChaCha8Rng, v: &mut Vec<u32>, bound: usize) {
    let hi = bound as u32 + 1;
    match rng.random_range(0..6) {
        0 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] = rng.random_range(0..=hi);
        }
        1 if v.len() >= 2 => {
            let (i, j) = (rng.random_range(0..v.len()), rng.random_range(0..v.len()));
            v.swap(i, j);
        }
        2 => v.push(rng.random_range(0..=hi)),
        3 => {
            v.pop();
        }
        4 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] = v[i].saturating_add(1);
        }
        5 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] = v[i].saturating_sub(1);
        }
        _ => {}
    }
}

/// One random edit of a length or offset.
fn edit_number(rng: &mut ChaCha8Rng, x: &mut usize) {
    match rng.random_range(0..4) {
        0 => *x += 1,
        1 => *x = x.saturating_sub(1),
        2 => *x = rng.random_range(0..=*x + 4),
        _ => *x = x.saturating_mul(2),
    }
}

/// One random edit of a values array: a value more or less.
fn edit_values(rng: &mut ChaCha8Rng, v: &mut Vec<f32>) {
    if rng.random_bool(0.5) || v.is_empty() {
        v.push(0.5);
    } else {
        v.pop();
    }
}

fn dense(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let (mut r, mut c, mut v) = (rows, cols, values(rng, rows * cols));
    for _ in 0..edits(rng) {
        match rng.random_range(0..3) {
            0 => edit_number(rng, &mut r),
            1 => edit_number(rng, &mut c),
            _ => edit_values(rng, &mut v),
        }
    }
    Dense::from_parts(r, c, v).map(Packed::Dense)
}

fn channel(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let kept: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.5)).collect();
    let m = Mask::from_fn(rows, cols, |r, _| kept[r]);
    let input: Vec<u32> = (0..cols as u32).filter(|_| rng.random_bool(0.6)).collect();
    let input = rng.random_bool(0.5).then_some((input.as_slice(), 1));
    let w = values(rng, rows * cols);
    let (mut r, mut c, mut kr, mut kc, mut v) =
        ChannelCompact::pack(&m, &w, input).unwrap().into_parts();
    for _ in 0..edits(rng) {
        match rng.random_range(0..5) {
            0 => edit_indices(rng, &mut kr, r),
            1 => match &mut kc {
                Some(kc) if rng.random_bool(0.8) => edit_indices(rng, kc, c),
                _ => kc = None,
            },
            2 => edit_values(rng, &mut v),
            3 => edit_number(rng, &mut r),
            _ => edit_number(rng, &mut c),
        }
    }
    ChannelCompact::from_parts(r, c, kr, kc, v).map(Packed::Channel)
}

fn group(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let m = mask(rng, rows, cols);
    let w = values(rng, rows * cols);
    let (r, c, blocks, mut v) = GroupBlocks::pack(&m, &w).unwrap().into_parts();
    let mut parts: Vec<_> = blocks.into_iter().map(Block::into_parts).collect();
    for _ in 0..edits(rng) {
        let k = rng.random_range(0..4);
        if k == 3 || parts.is_empty() {
            edit_values(rng, &mut v);
            continue;
        }
        let b = rng.random_range(0..parts.len());
        match k {
            0 => edit_indices(rng, &mut parts[b].0, r),
            1 => edit_indices(rng, &mut parts[b].1, c),
            _ => edit_number(rng, &mut parts[b].2),
        }
    }
    let blocks = parts
        .into_iter()
        .map(|(rows, cols, off)| Block::new(rows, cols, off))
        .collect();
    GroupBlocks::from_parts(r, c, blocks, v).map(Packed::Group)
}

/// A row group's rows and its tiles' (columns, offset).
type GroupParts = (Vec<u32>, Vec<(Vec<u32>, usize)>);

fn shuffled(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let m = mask(rng, rows, cols);
    let w = values(rng, rows * cols);
    let b = rng.random_range(1..5);
    let (r, c, mut b, groups, mut v) = ShuffledBlocks::pack(&m, &w, b).unwrap().into_parts();
    let mut groups: Vec<GroupParts> = groups
        .into_iter()
        .map(|g| {
            let (rows, tiles) = g.into_parts();
            (rows, tiles.into_iter().map(Tile::into_parts).collect())
        })
        .collect();
    for _ in 0..edits(rng) {
        let k = rng.random_range(0..5);
        if k == 4 || groups.is_empty() {
            match rng.random_range(0..3) {
                0 => edit_number(rng, &mut b),
                _ => edit_values(rng, &mut v),
            }
            continue;
        }
        let g = rng.random_range(0..groups.len());
        let (group_rows, tiles) = &mut groups[g];
        match k {
            0 => edit_indices(rng, group_rows, r),
            1 if !tiles.is_empty() => {
                let t = rng.random_range(0..tiles.len());
                edit_indices(rng, &mut tiles[t].0, c);
            }
            2 if !tiles.is_empty() => {
                let t = rng.random_range(0..tiles.len());
                edit_number(rng, &mut tiles[t].1);
            }
            _ if tiles.len() >= 2 => tiles.swap(0, 1),
            _ => {}
        }
    }
    let groups = groups
        .into_iter()
        .map(|(rows, tiles)| {
            let tiles = tiles.into_iter().map(|(c, o)| Tile::new(c, o)).collect();
            RowGroup::new(rows, tiles)
        })
        .collect();
    ShuffledBlocks::from_parts(r, c, b, groups, v).map(Packed::Shuffled)
}

fn bsr(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let m = mask(rng, rows, cols);
    let w = values(rng, rows * cols);
    let (h, wd) = (rng.random_range(1..5), rng.random_range(1..5));
    let (mut r, mut c, mut h, mut wd, mut rp, mut ci, mut v) =
        Bsr::pack(&m, &w, h, wd).unwrap().into_parts();
    for _ in 0..edits(rng) {
        match rng.random_range(0..7) {
            0 => edit_indices(rng, &mut rp, ci.len()),
            1 => edit_indices(rng, &mut ci, c.div_ceil(wd.max(1))),
            2 => edit_values(rng, &mut v),
            3 => edit_number(rng, &mut h),
            4 => edit_number(rng, &mut wd),
            5 => edit_number(rng, &mut r),
            _ => edit_number(rng, &mut c),
        }
    }
    Bsr::from_parts(r, c, h, wd, rp, ci, v).map(Packed::Bsr)
}

fn csr(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let m = mask(rng, rows, cols);
    let w = values(rng, rows * cols);
    let (mut r, mut c, mut rp, mut ci, mut v) = Csr::pack(&m, &w).unwrap().into_parts();
    for _ in 0..edits(rng) {
        match rng.random_range(0..5) {
            0 => edit_indices(rng, &mut rp, ci.len()),
            1 => edit_indices(rng, &mut ci, c),
            2 => edit_values(rng, &mut v),
            3 => edit_number(rng, &mut r),
            _ => edit_number(rng, &mut c),
        }
    }
    Csr::from_parts(r, c, rp, ci, v).map(Packed::Csr)
}

fn nm(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    // `cols` input channels of 1 or 2 entries.
    let inner = rng.random_range(1..3);
    let view = MatrixView::of(&[rows, cols, inner]).unwrap();
    let m = rng.random_range(1..6);
    let n = rng.random_range(1..=m);
    let mut perm: Vec<usize> = (0..cols).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    // At most n ones in each group of m channels (after the permutation) at each position.
    let mut mask = Mask::zeros(view.rows, view.cols);
    for r in 0..rows {
        for s in 0..inner {
            for group in perm.chunks(m) {
                for &c in group.iter().take(rng.random_range(0..=n)) {
                    mask.set(r, view.col(c, s), true);
                }
            }
        }
    }
    let w = values(rng, view.len());
    let (mut view, mut n, mut m, mut perm, mut v, mut idx) =
        NmCompressed::pack(&mask, &w, view, n, m, Some(&perm))
            .unwrap()
            .into_parts();
    for _ in 0..edits(rng) {
        match rng.random_range(0..8) {
            0 => edit_indices(rng, &mut perm, view.in_channels),
            1 if !idx.is_empty() => {
                let i = rng.random_range(0..idx.len());
                idx[i] = [0, 1, 2, m as u8, PAD, rng.random()][rng.random_range(0..6)];
            }
            2 if idx.len() >= 2 => {
                let (i, j) = (
                    rng.random_range(0..idx.len()),
                    rng.random_range(0..idx.len()),
                );
                idx.swap(i, j);
            }
            3 => edit_values(rng, &mut v),
            4 => edit_number(rng, &mut n),
            5 => edit_number(rng, &mut m),
            6 => edit_number(rng, &mut view.inner),
            _ => edit_number(rng, &mut view.in_channels),
        }
    }
    NmCompressed::from_parts(view, n, m, perm, v, idx).map(Packed::Nm)
}

/// Parts drawn without any care: short random lists of small indices.
fn garbage(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> KResult<Packed> {
    let mut list = |len: usize, hi: u32| -> Vec<u32> {
        (0..rng.random_range(0..=len))
            .map(|_| rng.random_range(0..=hi))
            .collect()
    };
    let (r, c) = (rows as u32, cols as u32);
    let (a, b, d, e) = (list(4, r), list(4, c), list(4, r), list(4, c));
    let (rp, ci) = (list(rows + 2, 6), list(6, c));
    let len = rng.random_range(0..24);
    let v = values(rng, len);
    let off = rng.random_range(0..8);
    match rng.random_range(0..5) {
        0 => GroupBlocks::from_parts(
            rows,
            cols,
            vec![Block::new(a, b, 0), Block::new(d, e, off)],
            v,
        )
        .map(Packed::Group),
        1 => ShuffledBlocks::from_parts(
            rows,
            cols,
            rng.random_range(0..4),
            vec![
                RowGroup::new(a, vec![Tile::new(b, 0), Tile::new(e, off)]),
                RowGroup::new(d, vec![]),
            ],
            v,
        )
        .map(Packed::Shuffled),
        2 => Csr::from_parts(rows, cols, rp, ci, v).map(Packed::Csr),
        3 => Bsr::from_parts(rows, cols, 2, 2, rp, ci, v).map(Packed::Bsr),
        _ => ChannelCompact::from_parts(rows, cols, a, Some(b), v).map(Packed::Channel),
    }
}

type Maker = fn(&mut ChaCha8Rng, usize, usize) -> KResult<Packed>;

const MAKERS: [(&str, Maker); 8] = [
    ("dense", dense),
    ("channel", channel),
    ("group", group),
    ("shuffled", shuffled),
    ("bsr", bsr),
    ("csr", csr),
    ("nm", nm),
    ("garbage", garbage),
];

/// The dense weight of the plan's own dimensions (compact for channel-compact) and its pattern.
fn plan_weight(p: &Packed) -> (Vec<f32>, usize, usize, Mask) {
    match p {
        Packed::Channel(f) => {
            let (r, c) = (f.kept_rows().len(), f.in_dim());
            (f.values().to_vec(), r, c, Mask::ones(r, c))
        }
        other => {
            let (r, c) = other.shape();
            (other.unpack(), r, c, other.mask())
        }
    }
}

/// The weight gradient in dense form, from the plan's value layout.
fn dense_grad(p: &Packed, dvalues: &[f32]) -> Vec<f32> {
    let mut q = p.clone();
    q.values_mut().copy_from_slice(dvalues);
    match &q {
        Packed::Channel(f) => f.values().to_vec(),
        other => other.unpack(),
    }
}

/// `Ok` when `made` was refused with a parts error or runs exactly like the reference; `Err`
/// says what went wrong. `accepted` tells which.
fn check(made: KResult<Packed>, rng: &mut ChaCha8Rng) -> Result<bool, String> {
    let packed = match made {
        Err(KernelError::Parts { .. }) => return Ok(false),
        Err(e) => return Err(format!("refused with an error of the wrong kind: {e}")),
        Ok(p) => p,
    };
    let (w, rows, cols, mask) = plan_weight(&packed);
    // Every value has one place, and the pattern is where the values are.
    let mut seen = Mask::zeros(mask.rows(), mask.cols());
    if !matches!(packed, Packed::Channel(_)) {
        for (r, c) in packed.positions().into_iter().flatten() {
            if seen.get(r, c) {
                return Err(format!("{}: ({r}, {c}) stored twice", packed.name()));
            }
            seen.set(r, c, true);
        }
        if seen != mask {
            return Err(format!("{}: positions differ from the mask", packed.name()));
        }
    }
    let n = [0, 1, 3, 8, 17, 50][rng.random_range(0..6)];
    let x = values(rng, cols * n);
    let dy = values(rng, rows * n);
    let want_y = reference::forward(&w, rows, cols, &x, n);
    let want_dx = reference::backward_input(&w, rows, cols, &dy, n);
    let want_dw = reference::backward_weight(&dy, &x, n, &mask);
    for isa in Isa::available() {
        let ctx = format!("{} {rows}x{cols} n={n} {isa:?}: {packed:?}", packed.name());
        let plan = Plan::with_isa(&packed, isa).map_err(|e| format!("plan {ctx}: {e}"))?;
        let mut y = vec![f32::NAN; rows * n];
        plan.forward(&x, &mut y, n).map_err(|e| e.to_string())?;
        close(&y, &want_y, cols, 1.0).map_err(|e| format!("forward {ctx}: {e}"))?;
        let mut dx = vec![f32::NAN; cols * n];
        plan.backward_input(&dy, &mut dx, n)
            .map_err(|e| e.to_string())?;
        close(&dx, &want_dx, rows, 1.0).map_err(|e| format!("backward_input {ctx}: {e}"))?;
        let mut dv = vec![f32::NAN; plan.value_count()];
        plan.backward_weight(&dy, &x, n, &mut dv)
            .map_err(|e| e.to_string())?;
        close(&dense_grad(&packed, &dv), &want_dw, n, 1.0)
            .map_err(|e| format!("backward_weight {ctx}: {e}"))?;
    }
    Ok(true)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn parts_are_refused_or_run_like_the_reference(
        rows in 0usize..14,
        cols in 0usize..14,
        which in 0usize..MAKERS.len(),
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (name, make) = MAKERS[which];
        let made = make(&mut rng, rows, cols);
        if let Err(e) = check(made, &mut rng) {
            prop_assert!(false, "{name}: {e}");
        }
    }
}

/// The property above is not vacuous: every maker of edited parts yields both accepted and
/// refused parts (edits sometimes keep the parts valid).
#[test]
fn makers_yield_both_valid_and_invalid_parts() {
    for (name, make) in MAKERS {
        let (mut ok, mut refused) = (0, 0);
        for seed in 0..300u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (rows, cols) = (rng.random_range(0..10), rng.random_range(0..10));
            match make(&mut rng, rows, cols) {
                Ok(_) => ok += 1,
                Err(KernelError::Parts { .. }) => refused += 1,
                Err(e) => panic!("{name}: {e}"),
            }
        }
        // Garbage is nearly always refused; edited parts go both ways.
        let min_ok = if name == "garbage" { 0 } else { 20 };
        assert!(
            ok >= min_ok && refused >= 20,
            "{name}: {ok} accepted, {refused} refused"
        );
        eprintln!("{name}: {ok} accepted, {refused} refused");
    }
}

/// `from_parts` of `pack`'s parts gives back the same value, for every format.
#[test]
fn from_parts_of_pack_is_pack() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for &(rows, cols) in &[(0, 0), (1, 1), (0, 4), (5, 0), (7, 13), (16, 9)] {
        let m = mask(&mut rng, rows, cols);
        let w = values(&mut rng, rows * cols);
        let d = Dense::new(rows, cols, w.clone()).unwrap();
        let (a, b, c) = d.clone().into_parts();
        assert_eq!(Dense::from_parts(a, b, c).unwrap(), d);
        let f = GroupBlocks::pack(&m, &w).unwrap();
        let (a, b, c, d) = f.clone().into_parts();
        assert_eq!(GroupBlocks::from_parts(a, b, c, d).unwrap(), f);
        let f = ShuffledBlocks::pack(&m, &w, 3).unwrap();
        let (a, b, c, d, e) = f.clone().into_parts();
        assert_eq!(ShuffledBlocks::from_parts(a, b, c, d, e).unwrap(), f);
        let f = Bsr::pack(&m, &w, 2, 3).unwrap();
        let (a, b, c, d, e, g, h) = f.clone().into_parts();
        assert_eq!(Bsr::from_parts(a, b, c, d, e, g, h).unwrap(), f);
        let f = Csr::pack(&m, &w).unwrap();
        let (a, b, c, d, e) = f.clone().into_parts();
        assert_eq!(Csr::from_parts(a, b, c, d, e).unwrap(), f);
        let rowmask = Mask::from_fn(rows, cols, |r, _| r % 2 == 0);
        let ch: Vec<u32> = (0..cols as u32).step_by(2).collect();
        for input in [None, Some((ch.as_slice(), 1))] {
            let f = ChannelCompact::pack(&rowmask, &w, input).unwrap();
            let (a, b, c, d, e) = f.clone().into_parts();
            assert_eq!(ChannelCompact::from_parts(a, b, c, d, e).unwrap(), f);
        }
        let view = MatrixView::matrix(rows, cols);
        let nm_mask = Mask::from_fn(rows, cols, |r, c| (r + c) % 4 == 0);
        let f = NmCompressed::pack(&nm_mask, &w, view, 1, 4, None).unwrap();
        let (a, b, c, d, e, g) = f.clone().into_parts();
        assert_eq!(NmCompressed::from_parts(a, b, c, d, e, g).unwrap(), f);
    }
}

/// Products whose buffer sizes overflow `usize` are refused, not wrapped around.
#[test]
fn overflowing_batch_is_refused() {
    let p = Packed::Dense(Dense::new(3, 3, vec![1.0; 9]).unwrap());
    let plan = Plan::new(&p).unwrap();
    // 3 × n wraps around to 2: buffers of 2 values must not pass for it.
    let n = usize::MAX / 3 + 1;
    assert_eq!(n.wrapping_mul(3), 2);
    let err = plan.forward(&[0.0; 2], &mut [0.0; 2], n).unwrap_err();
    assert!(err.to_string().contains("more than usize"), "{err}");
    // An empty output needs no work, whatever n is.
    let empty = Plan::new(&Packed::Csr(Csr::pack(&Mask::zeros(0, 0), &[]).unwrap())).unwrap();
    empty.forward(&[], &mut [], usize::MAX).unwrap();
    empty.backward_input(&[], &mut [], usize::MAX).unwrap();
    empty
        .backward_weight(&[], &[], usize::MAX, &mut [])
        .unwrap();
}
