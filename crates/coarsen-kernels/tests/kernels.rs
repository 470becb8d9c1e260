//! Every format × every product × every available instruction set × 1 and 3 threads, against
//! the naive references, over awkward shapes: 0, 1, primes, sizes that are not multiples of the
//! register tiles.

use coarsen_core::{Mask, MatrixView};
use coarsen_kernels::reference::{self, close};
use coarsen_kernels::{
    Bsr, ChannelCompact, Csr, Dense, GroupBlocks, Isa, NmCompressed, Packed, Plan, ShuffledBlocks,
    Threading,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn values(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn random_mask(rng: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Mask {
    Mask::from_fn(rows, cols, |_, _| rng.random_bool(density))
}

/// A mask with planted row classes, so that block formats get real multi-row blocks.
fn class_mask(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Mask {
    let classes = 1 + rows / 6;
    let class_of: Vec<usize> = (0..rows).map(|_| rng.random_range(0..classes)).collect();
    let col_sets: Vec<Vec<bool>> = (0..classes)
        .map(|_| (0..cols).map(|_| rng.random_bool(0.4)).collect())
        .collect();
    Mask::from_fn(rows, cols, |r, c| col_sets[class_of[r]][c])
}

/// An N:M mask (under a random channel permutation) for a `[rows, channels, k, k]` weight.
fn nm_mask(rng: &mut ChaCha8Rng, view: MatrixView, n: usize, m: usize) -> (Mask, Vec<usize>) {
    let mut perm: Vec<usize> = (0..view.in_channels).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    let mut mask = Mask::zeros(view.rows, view.cols);
    for r in 0..view.rows {
        for s in 0..view.inner {
            for group in perm.chunks(m) {
                let keep = rng.random_range(0..=n.min(group.len()));
                let mut pos: Vec<usize> = (0..group.len()).collect();
                for i in (1..pos.len()).rev() {
                    pos.swap(i, rng.random_range(0..=i));
                }
                for &p in &pos[..keep] {
                    mask.set(r, view.col(group[p], s), true);
                }
            }
        }
    }
    (mask, perm)
}

/// Every format packed from masks suited to it, for a `rows × cols` layer.
fn formats(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<Packed> {
    let w = values(rng, rows * cols);
    let mut out = vec![Packed::Dense(Dense::new(rows, cols, w.clone()).unwrap())];
    let kept: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.5)).collect();
    let channel = Mask::from_fn(rows, cols, |r, _| kept[r]);
    out.push(Packed::Channel(
        ChannelCompact::pack(&channel, &w, None).unwrap(),
    ));
    if cols >= 2 {
        let ch: Vec<u32> = (0..cols as u32).filter(|c| c % 3 != 1).collect();
        out.push(Packed::Channel(
            ChannelCompact::pack(&channel, &w, Some((&ch, 1))).unwrap(),
        ));
    }
    let classes = class_mask(rng, rows, cols);
    out.push(Packed::Group(GroupBlocks::pack(&classes, &w).unwrap()));
    let unstructured = random_mask(rng, rows, cols, 0.3);
    out.push(Packed::Group(GroupBlocks::pack(&unstructured, &w).unwrap()));
    out.push(Packed::Shuffled(
        ShuffledBlocks::pack(&classes, &w, 4).unwrap(),
    ));
    out.push(Packed::Shuffled(
        ShuffledBlocks::pack(&unstructured, &w, 3).unwrap(),
    ));
    out.push(Packed::Bsr(
        Bsr::pack(&random_mask(rng, rows, cols, 0.2), &w, 3, 5).unwrap(),
    ));
    out.push(Packed::Bsr(Bsr::pack(&classes, &w, 4, 4).unwrap()));
    out.push(Packed::Csr(Csr::pack(&unstructured, &w).unwrap()));
    let view = MatrixView::matrix(rows, cols);
    let (nm, perm) = nm_mask(rng, view, 2, 4);
    out.push(Packed::Nm(
        NmCompressed::pack(&nm, &w, view, 2, 4, Some(&perm)).unwrap(),
    ));
    out
}

/// The dense weight of the plan's own dimensions (compact for channel-compact).
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

fn check_all(packed: &Packed, n: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (w, rows, cols, mask) = plan_weight(packed);
    let x = values(&mut rng, cols * n);
    let dy = values(&mut rng, rows * n);
    let want_y = reference::forward(&w, rows, cols, &x, n);
    let want_dx = reference::backward_input(&w, rows, cols, &dy, n);
    let want_dw = reference::backward_weight(&dy, &x, n, &mask);
    for isa in Isa::available() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut plan = Plan::with_isa(packed, isa).unwrap();
            // Serial: the sparse engines on the calling thread only.
            for threading in [Threading::Faer, Threading::SplitColumns, Threading::Serial] {
                plan.set_threading(threading);
                let ctx = format!(
                    "{} {rows}x{cols} n={n} {isa:?} threads={threads} {threading:?}",
                    packed.name()
                );
                pool.install(|| {
                    let mut y = vec![f32::NAN; rows * n];
                    plan.forward(&x, &mut y, n).unwrap();
                    close(&y, &want_y, cols, 1.0).unwrap_or_else(|e| panic!("forward {ctx}: {e}"));
                    let mut dx = vec![f32::NAN; cols * n];
                    plan.backward_input(&dy, &mut dx, n).unwrap();
                    close(&dx, &want_dx, rows, 1.0)
                        .unwrap_or_else(|e| panic!("backward_input {ctx}: {e}"));
                    let mut dv = vec![f32::NAN; plan.value_count()];
                    plan.backward_weight(&dy, &x, n, &mut dv).unwrap();
                    close(&dense_grad(packed, &dv), &want_dw, n, 1.0)
                        .unwrap_or_else(|e| panic!("backward_weight {ctx}: {e}"));
                });
            }
        }
    }
}

#[test]
fn every_format_on_awkward_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &(rows, cols) in &[
        (1, 1),
        (1, 9),
        (7, 1),
        (13, 37),
        (16, 64),
        (33, 29),
        (64, 48),
    ] {
        for p in formats(&mut rng, rows, cols) {
            for n in [0, 1, 7, 17, 33, 100] {
                check_all(&p, n, (rows * 1000 + cols * 10 + n) as u64);
            }
        }
    }
}

#[test]
fn positions_locate_every_value() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for p in formats(&mut rng, 13, 22) {
        let dense = p.unpack();
        let (rows, cols) = p.shape();
        let mut seen = Mask::zeros(rows, cols);
        for (v, pos) in p.values().iter().zip(p.positions()) {
            match pos {
                Some((r, c)) => {
                    let want = match &p {
                        Packed::Channel(f) if f.kept_cols().is_some() => *v,
                        _ => dense[r * cols + c],
                    };
                    assert_eq!(*v, want, "{}", p.name());
                    assert!(!seen.get(r, c), "{}: ({r}, {c}) twice", p.name());
                    seen.set(r, c, true);
                }
                None => assert_eq!(*v, 0.0, "{}: padding holds a value", p.name()),
            }
        }
        assert_eq!(seen, p.mask(), "{}", p.name());
    }
}

#[test]
fn zero_sized_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(rows, cols) in &[(0, 5), (5, 0), (0, 0)] {
        let w = values(&mut rng, rows * cols);
        let m = Mask::zeros(rows, cols);
        for p in [
            Packed::Dense(Dense::new(rows, cols, w.clone()).unwrap()),
            Packed::Group(GroupBlocks::pack(&m, &w).unwrap()),
            Packed::Csr(Csr::pack(&m, &w).unwrap()),
            Packed::Bsr(Bsr::pack(&m, &w, 2, 2).unwrap()),
        ] {
            check_all(&p, 4, 0);
        }
    }
}

#[test]
fn conv_shaped_nm_with_permutation() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for shape in [[8usize, 12, 3, 3], [5, 7, 1, 1], [16, 8, 3, 3]] {
        let view = MatrixView::of(&shape).unwrap();
        for (n, m) in [(2, 4), (1, 3), (4, 8)] {
            let w = values(&mut rng, view.len());
            let (mask, perm) = nm_mask(&mut rng, view, n, m);
            let p = Packed::Nm(NmCompressed::pack(&mask, &w, view, n, m, Some(&perm)).unwrap());
            check_all(&p, 37, 5);
        }
    }
}

#[test]
fn length_errors_name_the_buffer() {
    let m = Mask::ones(4, 3);
    let p = Plan::new(&Packed::Csr(Csr::pack(&m, &[1.0; 12]).unwrap())).unwrap();
    let err = p
        .forward(&[0.0; 5], &mut [0.0; 8], 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x holds 5 values") && err.contains("6 are needed"),
        "{err}"
    );
    let err = p
        .backward_weight(&[0.0; 8], &[0.0; 6], 2, &mut [0.0; 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("dvalues"), "{err}");
}

/// The tiled kernel's entries (k-blocked tiles, one stream of weights, panels of columns) give
/// the reference's rows on a dense plan and refuse short buffers and misaligned row shares
/// with errors that say which.
#[test]
fn tiled_entries_check_their_buffers() {
    let (m, k, n) = (30, 70, 20);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let w = values(&mut rng, m * k);
    let x = values(&mut rng, k * n);
    let want = reference::forward(&w, m, k, &x, n);
    let p = Plan::new(&Packed::Dense(Dense::new(m, k, w).unwrap())).unwrap();
    let (Some(mr), Some(nr)) = (p.tile_rows(), p.tile_width()) else {
        return; // the faer kernel takes row-major input
    };
    let grouped = |g: usize| {
        let mut v = vec![0.0f32; n.div_ceil(g) * g * k];
        for kk in 0..k {
            for j in 0..n {
                v[(j / g * k + kk) * g + j % g] = x[kk * n + j];
            }
        }
        v
    };
    let tiles = grouped(nr);
    let (r0, r1) = (mr, m);
    for stream in [false, true] {
        let run = |xt: &[f32], y: &mut [f32], r0: usize| {
            if stream {
                p.forward_stream_rows(xt, y, n, r0, r1)
            } else {
                p.forward_tiles_rows(xt, y, n, r0, r1)
            }
        };
        let mut y = vec![f32::NAN; (r1 - r0) * n];
        run(&tiles, &mut y, r0).unwrap();
        close(&y, &want[r0 * n..], k, 1.0).unwrap_or_else(|e| panic!("stream {stream}: {e}"));
        let err = run(&tiles[1..], &mut y, r0).unwrap_err().to_string();
        assert!(err.contains("xt holds"), "{err}");
        let err = run(&tiles, &mut y[1..], r0).unwrap_err().to_string();
        assert!(err.contains("y holds"), "{err}");
        let mut y = vec![0.0; (r1 - 1) * n];
        let err = run(&tiles, &mut y, 1).unwrap_err().to_string();
        assert!(err.contains("multiple of"), "{err}");
    }
    let panels = grouped(mr);
    let mut y = vec![f32::NAN; m * n];
    p.forward_small_rows(&panels, &mut y, n, 0, m).unwrap();
    close(&y, &want, k, 1.0).unwrap();
}

#[test]
fn update_values_changes_the_result() {
    let mask = Mask::from_fn(6, 5, |r, c| (r + c) % 2 == 0);
    let w = vec![1.0f32; 30];
    let packed = Packed::Shuffled(ShuffledBlocks::pack(&mask, &w, 2).unwrap());
    let mut plan = Plan::new(&packed).unwrap();
    let x = vec![1.0f32; 5 * 3];
    let mut y1 = vec![0.0; 18];
    plan.forward(&x, &mut y1, 3).unwrap();
    let doubled: Vec<f32> = packed.values().iter().map(|v| v * 2.0).collect();
    plan.update_values(&doubled).unwrap();
    let mut y2 = vec![0.0; 18];
    plan.forward(&x, &mut y2, 3).unwrap();
    for (a, b) in y1.iter().zip(&y2) {
        assert_eq!(*b, 2.0 * a);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_shapes(rows in 1usize..40, cols in 1usize..40, n in 0usize..70, seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for p in formats(&mut rng, rows, cols) {
            check_all(&p, n, seed);
        }
    }
}
