//! The engine against the reference interpreter: every op, every format, both paths.

mod common;

use coarsen_core::MaskSet;
use coarsen_infer::graph::Op;
use coarsen_infer::{
    reference, Formats, InferOptions, InferenceNet, LayerFormat, Network, Path, TuneCache, Tuning,
};
use common::{deep, exotic, formats, masks_for, plain, pool, residual, wide, Net};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Largest difference between the logits `got` and `want`.
fn max_error(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
}

/// What errors are judged against: the largest logit's magnitude, at least 1.
fn scale_of(want: &[f32]) -> f32 {
    want.iter().fold(1.0f32, |m, v| m.max(v.abs()))
}

/// `net` on every format and path against the reference; `blocks`: some layer of it runs a
/// block kernel in place, or is a dense convolution on an implicit GEMM (so in bfloat16 where
/// the CPU has it).
fn check(label: &str, net: fn() -> Net, blocks: bool) {
    let mut chunked = false;
    let mut bf16_ran = false;
    for (k, fmt) in formats().into_iter().enumerate() {
        let (graph, tensors, weights) = net().finish(7 + k as u64);
        let (masks, formats) = masks_for(&weights, &fmt, 100 * k as u64);
        let network = Network::new(graph, tensors, masks).unwrap();
        let [c, h, w] = network.input();
        let batch = 3;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x: Vec<f32> = (0..batch * c * h * w)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let want = reference::forward_nchw(&network, &x, batch).unwrap();
        let scale = scale_of(&want);
        let tunings = [
            None,
            Some(Tuning::Dense),
            Some(Tuning::Measure),
            Some(Tuning::Packed),
        ];
        for (path, tuning) in tunings
            .iter()
            .map(|&t| (Path::Packed, t))
            .chain([(Path::Dense, None), (Path::Dense, Some(Tuning::Dense))])
        {
            let mut engine = InferenceNet::new(&network, &formats, path).unwrap();
            // With implicit GEMMs instead of Winograd (the default) for the 3×3 convolutions,
            // convolutions in dense blocks through im2col instead of in place, and residual
            // adds as steps of their own, and the pool's threads sleeping between sections,
            // the same function.
            let options = InferOptions {
                winograd: false,
                block_conv: false,
                fuse_residual: false,
                spin_workers: false,
                ..InferOptions::default()
            };
            let other = InferenceNet::with_options(&network, &formats, path, options).unwrap();
            let got = other.forward_nchw(&x, batch).unwrap();
            let err = max_error(&got, &want);
            assert!(
                err <= 1e-4 * scale,
                "{label} {fmt:?} {path:?} implicit GEMMs, blocks through im2col, adds unfused: {err}"
            );
            // The first steps on chunks of 1 and of 2 images (the last chunk of 1).
            for chunk in [1, 1 << 20] {
                let options = InferOptions {
                    prefix_min_floats: 1,
                    prefix_chunk_floats: chunk,
                    ..InferOptions::default()
                };
                let mut e = InferenceNet::with_options(&network, &formats, path, options).unwrap();
                if chunk > 1 {
                    // Chunks of 2 images: twice the largest value per image of the first steps.
                    let Some(c) = e.chunking(batch) else {
                        continue;
                    };
                    let options = InferOptions {
                        prefix_chunk_floats: 2 * c.image_floats,
                        ..options
                    };
                    e = InferenceNet::with_options(&network, &formats, path, options).unwrap();
                    assert_eq!(e.chunking(batch).map(|c| c.images), Some(2), "{label}");
                }
                chunked |= e.chunking(batch).is_some();
                let got = e.forward_nchw(&x, batch).unwrap();
                let err = max_error(&got, &want);
                assert!(
                    err <= 1e-4 * scale,
                    "{label} {fmt:?} {path:?} first steps on chunks ({chunk}): {err}"
                );
                // The chunks one after another, each step shared by the threads, compute
                // the same values as the chunks in parallel (the default).
                assert!(e.options().prefix_parallel);
                let options = InferOptions {
                    prefix_parallel: false,
                    ..e.options()
                };
                let serial = InferenceNet::with_options(&network, &formats, path, options).unwrap();
                assert_eq!(
                    serial.forward_nchw(&x, batch).unwrap(),
                    got,
                    "{label} {fmt:?} {path:?} chunks ({chunk}) in turn against in parallel"
                );
            }
            if let Some(t) = tuning {
                let choices = engine.tune(batch, &mut TuneCache::in_memory(), t).unwrap();
                // Every sparse layer of the packed path has a choice; dense ones have none.
                let sparse = engine
                    .layers()
                    .iter()
                    .filter(|l| !matches!(l.format.as_str(), "dense" | "channel"));
                if path == Path::Packed {
                    assert_eq!(choices.len(), sparse.count(), "{label} {fmt:?}");
                } else {
                    assert!(choices.is_empty());
                }
                for c in &choices {
                    assert_eq!(
                        c.dense,
                        t == Tuning::Dense
                            || (t == Tuning::Measure
                                && (c.dense_ms < c.packed_ms) != c.by_whole_passes)
                    );
                    // Whole passes overturn close calls only.
                    if let (true, Some(p), Some(d)) = (c.by_whole_passes, c.packed_ms, c.dense_ms) {
                        assert!(
                            p.max(d) < coarsen_infer::engine::CLOSE_STEPS * p.min(d),
                            "{c:?}"
                        );
                    }
                    assert_eq!(c.packed_ms.is_some(), t == Tuning::Measure);
                }
            }
            let got = engine.forward_nchw(&x, batch).unwrap();
            assert_eq!(got.len(), want.len());
            let err = max_error(&got, &want);
            assert!(
                err <= 1e-4 * scale,
                "{label} {fmt:?} {path:?} {tuning:?}: max error {err} (scale {scale})"
            );
            // The block kernels in bfloat16 (where the CPU has AVX-512 BF16): within its
            // rounding of the reference (8 significant bits per weight and input, a few
            // layers deep), and the f32 engine's values exactly where no layer runs so.
            if path == Path::Packed && tuning.is_none() {
                let options = InferOptions {
                    bf16: true,
                    ..InferOptions::default()
                };
                let e = InferenceNet::with_options(&network, &formats, path, options).unwrap();
                let names = e.kernel_names(batch);
                let rounded = names.iter().any(|k| k.ends_with(", bf16"));
                // Only block kernels and the implicit GEMMs of dense convolutions change
                // (fused pairs aside, which bfloat16 makes of dense layers too).
                let names32 = engine.kernel_names(batch);
                if names32.len() == names.len() {
                    for (a, b) in names32.iter().zip(&names) {
                        assert!(
                            b == a
                                || *b == format!("{a}, bf16")
                                || (a == "implicit gemm" && b == "implicit gemm, dense, bf16"),
                            "{label} {fmt:?}: {a} in f32, {b} in bf16"
                        );
                    }
                }
                let got16 = e.forward_nchw(&x, batch).unwrap();
                let err = max_error(&got16, &want);
                assert!(
                    err <= 3e-2 * scale,
                    "{label} {fmt:?} bf16: max error {err} (scale {scale})"
                );
                if rounded {
                    bf16_ran = true;
                    assert!(got16 != got, "{label} {fmt:?}: bf16 kernels left no trace");
                } else {
                    assert_eq!(got16, got, "{label} {fmt:?}");
                }
            }
        }
    }
    // Some format ran its first steps on chunks (a cut with one live value was found).
    assert!(chunked, "{label}: no chunked pass");
    // Its group, shuffled-block and BSR layers (and its dense convolutions on implicit
    // GEMMs) ran in bfloat16 where the CPU has it.
    assert_eq!(
        bf16_ran,
        blocks && coarsen_kernels::BlockConv::bf16_available(),
        "{label}"
    );
}

#[test]
fn plain_cnn_equals_the_reference() {
    check("plain", plain, true);
}

/// In bfloat16, the dense first convolution (2 input channels: an implicit GEMM, no Winograd)
/// runs as one block of the bfloat16 kernel where the CPU has it, with its `f32` kernel as a
/// dense twin: tuning measures the two, and forced dense it runs the `f32` engine's values.
#[test]
fn a_dense_convolution_in_bf16_runs_one_block_with_an_f32_twin() {
    let (graph, tensors, weights) = plain().finish(3);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Group, 5);
    let network = Network::new(graph, tensors, masks).unwrap();
    let batch = 2;
    let x: Vec<f32> = (0..batch * 2 * 12 * 12)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let want = reference::forward_nchw(&network, &x, batch).unwrap();
    let options = InferOptions {
        bf16: true,
        ..InferOptions::default()
    };
    let f32_engine = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    let f32_first = f32_engine.kernel_names(batch)[0].clone();
    let available = coarsen_kernels::BlockConv::bf16_available();
    if available {
        assert_eq!(f32_first, "implicit gemm");
    }
    for tuning in [None, Some(Tuning::Measure), Some(Tuning::Dense)] {
        let mut e = InferenceNet::with_options(&network, &formats, Path::Packed, options).unwrap();
        let choices = match tuning {
            Some(t) => e.tune(batch, &mut TuneCache::in_memory(), t).unwrap(),
            None => Vec::new(),
        };
        let first = e.kernel_names(batch)[0].clone();
        // The dense layer has a choice where it runs in bfloat16, and none elsewhere.
        let conv1 = choices.iter().find(|c| c.name == "conv1.weight");
        assert_eq!(conv1.is_some(), available && tuning.is_some(), "{tuning:?}");
        let dense = conv1.is_some_and(|c| c.dense);
        if available && !dense {
            assert_eq!(first, "implicit gemm, dense, bf16", "{tuning:?}");
        } else {
            assert_eq!(first, f32_first, "{tuning:?}");
        }
        let got = e.forward_nchw(&x, batch).unwrap();
        let err = max_error(&got, &want);
        assert!(err <= 3e-2 * scale_of(&want), "{tuning:?}: {err}");
        if tuning == Some(Tuning::Dense) {
            // Every layer on its f32 twin: the f32 engine's values (tuned alike), bit for bit.
            let mut f32_dense = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
            f32_dense
                .tune(batch, &mut TuneCache::in_memory(), Tuning::Dense)
                .unwrap();
            assert_eq!(got, f32_dense.forward_nchw(&x, batch).unwrap());
        } else if available {
            let f32_got = f32_engine.forward_nchw(&x, batch).unwrap();
            assert!(got != f32_got, "{tuning:?}: bfloat16 left no trace");
        }
    }
}

#[test]
fn residual_network_equals_the_reference() {
    check("residual", residual, true);
}

#[test]
fn every_other_op_equals_the_reference() {
    check("exotic", exotic, true);
}

/// A 2×2 max pool over odd sizes (the last row and column are dropped).
fn odd_pool() -> Net {
    let mut n = Net::new([2, 7, 9]);
    n.conv3("conv", 2, 4, 1);
    n.op(Op::MaxPool(pool(2, 2, 0)));
    n.op(Op::Flatten);
    n.linear("fc", 4 * 3 * 4, 3, true);
    n
}

#[test]
fn max_pool_over_odd_sizes_equals_the_reference() {
    check("odd pool", odd_pool, true);
}

/// Every residual `Add` of the residual network (and the ReLU after it) runs in the epilogue of
/// the layer that computes its later operand: a 1×1 stride-2 shortcut through im2col, a dilated
/// convolution, and a stride-1 convolution on the implicit GEMM (dense path) or the block kernel
/// (group blocks). The sums are checked against the reference by `residual_network_…`.
#[test]
fn residual_adds_run_in_the_layers_epilogue() {
    let (graph, tensors, weights) = residual().finish(5);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Group, 3);
    let network = Network::new(graph, tensors, masks).unwrap();
    let [c, h, w] = network.input();
    let batch = 2;
    let x = vec![0.25f32; batch * c * h * w];
    for path in [Path::Dense, Path::Packed] {
        let engine = InferenceNet::new(&network, &formats, path).unwrap();
        let steps = engine.profile(&x, batch, 1).unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.step.as_str()).collect();
        assert!(
            !names.contains(&"add") && !names.contains(&"relu"),
            "{path:?}: {names:?}"
        );
    }
}

/// Layer outputs reuse the buffers earlier steps and passes freed: passes of other batch sizes
/// in turn (buffers larger and smaller than needed, holding old values) still give the
/// reference's logits; so do deep layers at batch 1 (few columns, many im2col rows).
#[test]
fn passes_that_reuse_freed_buffers_equal_the_reference() {
    for (net, seed) in [(residual as fn() -> Net, 9), (deep, 10)] {
        passes_equal_the_reference(net, seed);
    }
}

/// On AVX2 (16-column tiles) the deep layers' products of 16 columns run as one whole column
/// tile that streams the weights (`gemm, few column tiles`), those of 4 columns on column
/// panels (`gemm, few columns`); their logits are checked above.
#[test]
fn few_column_products_run_the_kernel_their_width_calls_for() {
    if coarsen_kernels::Isa::detect() != coarsen_kernels::Isa::Avx2 {
        return;
    }
    let (graph, tensors, _) = deep().finish(10);
    let network = Network::new(graph, tensors, MaskSet::new()).unwrap();
    let engine = InferenceNet::new(&network, &Formats::new(), Path::Dense).unwrap();
    let [c, h, w] = network.input();
    // conv1 keeps the 4×4 images (16 columns each; 64 at batch 4 run Winograd), the stride-2
    // conv2 halves them (4 columns each).
    for (batch, step, want) in [
        (1, "conv1.weight", "gemm, few column tiles"),
        (1, "conv2.weight", "gemm, few columns"),
        (4, "conv2.weight", "gemm, few column tiles"),
    ] {
        let x = vec![0.5f32; batch * c * h * w];
        let steps = engine.profile(&x, batch, 1).unwrap();
        let kernel = steps
            .iter()
            .find(|s| s.step == step)
            .map(|s| s.kernel.as_str());
        assert_eq!(kernel, Some(want), "batch {batch}, {step}: {steps:?}");
    }
}

fn passes_equal_the_reference(net: fn() -> Net, seed: u64) {
    let (graph, tensors, weights) = net().finish(seed);
    let (masks, formats) = masks_for(&weights, &LayerFormat::ShuffledBlock { block: 4 }, 2);
    let network = Network::new(graph, tensors, masks).unwrap();
    let [c, h, w] = network.input();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for path in [Path::Dense, Path::Packed] {
        let engine = InferenceNet::new(&network, &formats, path).unwrap();
        for batch in [3, 1, 4, 2, 3] {
            let x: Vec<f32> = (0..batch * c * h * w)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let want = reference::forward_nchw(&network, &x, batch).unwrap();
            let got = engine.forward_nchw(&x, batch).unwrap();
            let scale = scale_of(&want);
            let err = max_error(&got, &want);
            assert!(err <= 1e-4 * scale, "{path:?} batch {batch}: {err}");
        }
    }
}

/// Batches whose 3×3 layers run Winograd with tiles of 4 (16 images: 4096 columns) and of 2
/// (3 images: 768 columns, below `F4_MIN_COLS`) give the reference's logits, the residual added in the kernel's epilogue; on
/// AVX-512 the profile names the tile each ran.
#[test]
fn winograd_tiles_of_four_and_two_equal_the_reference() {
    let (graph, tensors, _) = wide().finish(12);
    let network = Network::new(graph, tensors, MaskSet::new()).unwrap();
    let engine = InferenceNet::new(&network, &Formats::new(), Path::Dense).unwrap();
    let [c, h, w] = network.input();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (batch, tile) in [(16, "F(4x4,3x3)"), (3, "F(2x2,3x3)")] {
        let x: Vec<f32> = (0..batch * c * h * w)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let want = reference::forward_nchw(&network, &x, batch).unwrap();
        let got = engine.forward_nchw(&x, batch).unwrap();
        let scale = scale_of(&want);
        let err = max_error(&got, &want);
        assert!(err <= 1e-4 * scale, "batch {batch}: {err} (scale {scale})");
        if coarsen_kernels::Isa::detect() == coarsen_kernels::Isa::Avx512 {
            let steps = engine.profile(&x, batch, 1).unwrap();
            let conv2 = steps.iter().find(|s| s.step == "conv2.weight");
            assert!(
                conv2.is_some_and(|s| s.kernel.contains(tile)),
                "batch {batch}: {:?}",
                conv2.map(|s| &s.kernel)
            );
        }
    }
}

#[test]
fn profile_times_every_step_and_names_the_kernels() {
    let (graph, tensors, _) = plain().finish(3);
    let network = Network::new(graph, tensors, MaskSet::new()).unwrap();
    let engine = InferenceNet::new(&network, &Formats::new(), Path::Dense).unwrap();
    let [c, h, w] = network.input();
    let batch = 2;
    let x = vec![0.5f32; batch * c * h * w];
    let steps = engine.profile(&x, batch, 3).unwrap();
    // Every conv and linear layer once, with its multiply-adds for the batch and a kernel.
    for l in engine.layers() {
        let s: Vec<_> = steps.iter().filter(|s| s.step == l.name).collect();
        assert_eq!(s.len(), 1, "{}", l.name);
        assert_eq!(s[0].macs, l.macs_per_image * batch);
        assert_ne!(s[0].kernel, s[0].step);
    }
    // The other steps name their operation, and do no multiply-adds.
    let others: Vec<_> = steps.iter().filter(|s| s.macs == 0).collect();
    assert_eq!(others.len(), steps.len() - engine.layers().len());
    assert_eq!(others.iter().filter(|s| s.step == "max pool").count(), 2);
    assert!(steps.iter().all(|s| s.ms.is_finite() && s.ms >= 0.0));
    assert!(engine.profile(&x[1..], batch, 3).is_err());
    // `kernel_names` lists the profile's layer kernels, in its order.
    let layer_kernels: Vec<&str> = steps
        .iter()
        .filter(|s| s.macs > 0)
        .map(|s| s.kernel.as_str())
        .collect();
    assert_eq!(engine.kernel_names(batch), layer_kernels);
}

/// Profiling a pass whose first steps run on chunks of images times those steps as they run,
/// the chunks in parallel (each on one thread: a step's time is its chunks' times shared out
/// over the threads) or one after another: every step of the chunks gets a time.
#[test]
fn profiling_times_the_chunked_steps_as_they_run() {
    let (graph, tensors, _) = plain().finish(3);
    let network = Network::new(graph, tensors, MaskSet::new()).unwrap();
    let [c, h, w] = network.input();
    let batch = 6;
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|i| (i % 7) as f32 / 7.0 - 0.5)
        .collect();
    let mut profiles = Vec::new();
    for parallel in [true, false] {
        // Every per-image step on chunks of one image.
        let options = InferOptions {
            prefix_min_floats: 1,
            prefix_chunk_floats: 1,
            prefix_parallel: parallel,
            ..InferOptions::default()
        };
        let engine =
            InferenceNet::with_options(&network, &Formats::new(), Path::Dense, options).unwrap();
        let chunking = engine.chunking(batch).unwrap();
        assert_eq!(chunking.images, 1);
        assert!(chunking.steps >= 3, "{chunking:?}");
        let steps = engine.profile(&x, batch, 2).unwrap();
        assert!(steps.iter().all(|s| s.ms.is_finite() && s.ms >= 0.0));
        for s in &steps[..chunking.steps] {
            assert!(s.ms > 0.0, "parallel {parallel}: {} untimed", s.step);
        }
        profiles.push(steps.iter().map(|s| s.step.clone()).collect::<Vec<_>>());
        // Profiling leaves the pass as it was.
        let logits = engine.forward(&x, batch).unwrap();
        assert_eq!(logits.len(), batch * network.classes());
    }
    assert_eq!(profiles[0], profiles[1]);
}

#[test]
fn channel_sparsity_shrinks_the_next_layer() {
    let (graph, tensors, weights) = plain().finish(3);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Channel, 5);
    let network = Network::new(graph, tensors, masks).unwrap();
    let packed = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    let dense = InferenceNet::new(&network, &formats, Path::Dense).unwrap();
    let conv3 = |n: &InferenceNet| {
        n.layers()
            .iter()
            .find(|l| l.name == "conv3.weight")
            .unwrap()
            .matrix
    };
    let (p, d) = (conv3(&packed), conv3(&dense));
    assert!(p[0] < d[0] && p[1] < d[1], "packed {p:?} vs dense {d:?}");
    assert!(packed.macs_per_image() < dense.macs_per_image());
}

#[test]
fn bad_inputs_are_errors() {
    let (graph, tensors, _) = plain().finish(3);
    let network = Network::new(graph.clone(), tensors.clone(), MaskSet::new()).unwrap();
    let engine = InferenceNet::new(&network, &Formats::new(), Path::Packed).unwrap();
    assert!(engine.forward_nchw(&[0.0; 5], 1).is_err());
    // A mask on a tensor that is no weight, and one of the wrong shape.
    let mut m = MaskSet::new();
    m.insert("bn1.weight", &[8, 1], coarsen_core::Mask::ones(8, 1))
        .unwrap();
    assert!(Network::new(graph.clone(), tensors.clone(), m).is_err());
    let mut m = MaskSet::new();
    m.insert(
        "conv2.weight",
        &[16, 8, 9],
        coarsen_core::Mask::ones(16, 72),
    )
    .unwrap();
    assert!(Network::new(graph.clone(), tensors.clone(), m).is_err());
    // A non-finite value.
    let mut t = tensors;
    t.get_mut("bn2.running_var").unwrap().values_mut()[3] = f32::NAN;
    let e = Network::new(graph, t, MaskSet::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bn2.running_var") && e.contains("NaN"), "{e}");
}

/// Every CSR layer of `net` runs the side tuning chose for it (`choices`): its CSR kernel,
/// or the dense one; profiled on a batch of 2.
fn assert_runs_chosen_csr(net: &InferenceNet, choices: &[coarsen_infer::LayerChoice]) {
    let [c, h, w] = net.input();
    let steps = net.profile(&vec![0.5; 2 * c * h * w], 2, 1).unwrap();
    for choice in choices {
        let step = steps.iter().find(|s| s.step == choice.name).unwrap();
        assert_eq!(
            step.kernel.contains("csr"),
            !choice.dense,
            "{}: {}",
            choice.name,
            step.kernel
        );
    }
}

#[test]
fn tuning_is_cached_per_layer_and_batch() {
    let (graph, tensors, weights) = residual().finish(5);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Csr, 9);
    let network = Network::new(graph, tensors, masks).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sub").join("tune.json");
    let mut cache = TuneCache::open(&file);
    let mut a = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    let first = a.tune(2, &mut cache, Tuning::Measure).unwrap();
    assert!(!first.is_empty() && first.iter().all(|c| !c.cached));
    // Measured in whole passes, every layer swapped to its twin and back: each now runs the
    // side it was given.
    assert_runs_chosen_csr(&a, &first);
    cache.save().unwrap();
    // Read back: the same choices, from the file; another batch size is measured anew.
    let mut cache = TuneCache::open(&file);
    let mut b = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    let again = b.tune(2, &mut cache, Tuning::Measure).unwrap();
    assert!(again.iter().all(|c| c.cached));
    for (x, y) in first.iter().zip(&again) {
        assert_eq!(
            (x.dense, x.packed_ms, x.dense_ms, x.by_whole_passes),
            (y.dense, y.packed_ms, y.dense_ms, y.by_whole_passes)
        );
    }
    let mut c = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    assert!(c
        .tune(3, &mut cache, Tuning::Measure)
        .unwrap()
        .iter()
        .all(|c| !c.cached));
    let mut d = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    assert!(d
        .tune(2, &mut cache, Tuning::Remeasure)
        .unwrap()
        .iter()
        .all(|c| !c.cached));
    // A damaged cache file is ignored, then replaced.
    std::fs::write(&file, b"{ not json").unwrap();
    let mut cache = TuneCache::open(&file);
    let mut e = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    assert!(e
        .tune(2, &mut cache, Tuning::Measure)
        .unwrap()
        .iter()
        .all(|c| !c.cached));
    cache.save().unwrap();
    assert!(TuneCache::open(&file).save().is_ok());
    assert!(e.tune(0, &mut cache, Tuning::Measure).is_err());
    // Times another build of the engine measured (its kernels may differ under the same
    // names) are not reused: the same file, its source hash changed, measures anew.
    let text = std::fs::read_to_string(&file).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let source = doc["source"].as_str().unwrap().to_string();
    assert_eq!(source.len(), 16, "{source}");
    let mut f = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    assert!(f
        .tune(2, &mut TuneCache::open(&file), Tuning::Measure)
        .unwrap()
        .iter()
        .all(|c| c.cached));
    doc["source"] = serde_json::Value::from("another build");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let mut g = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    assert!(g
        .tune(2, &mut TuneCache::open(&file), Tuning::Measure)
        .unwrap()
        .iter()
        .all(|c| !c.cached));
}

/// Every cache entry whose key contains `part`, set to `(packed_ms, dense_ms)`; how many.
/// `"|in context"` names the layers' entries only (the whole passes' keys hold every layer's
/// key too).
fn set_entries(file: &std::path::Path, part: &str, packed_ms: f64, dense_ms: f64) -> usize {
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let mut n = 0;
    for (key, e) in doc["entries"].as_object_mut().unwrap() {
        let layer = !key.contains("whole passes");
        if key.contains(part) && (layer || part != "|in context") {
            e["packed_ms"] = packed_ms.into();
            e["dense_ms"] = dense_ms.into();
            n += 1;
        }
    }
    std::fs::write(file, serde_json::to_vec(&doc).unwrap()).unwrap();
    n
}

#[test]
fn whole_passes_overturn_close_step_times() {
    let (graph, tensors, weights) = residual().finish(5);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Csr, 9);
    let network = Network::new(graph, tensors, masks).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tune.json");
    let tune = |tuning| {
        let mut cache = TuneCache::open(&file);
        let mut net = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
        let choices = net.tune(2, &mut cache, tuning).unwrap();
        cache.save().unwrap();
        assert_runs_chosen_csr(&net, &choices);
        choices
    };
    let first = tune(Tuning::Measure);
    assert!(first.len() >= 2, "{first:?}");
    // Every layer's steps timed close, packed ahead: whole passes are timed (and cached).
    let layers = set_entries(&file, "|in context", 1.0, 1.2);
    assert_eq!(layers, first.len());
    let close = tune(Tuning::Measure);
    assert!(close.iter().all(|c| c.cached));
    assert!(set_entries(&file, "flip packed to dense", 1.0, 1.0) >= 1);
    // Flipped, the whole pass ran 1% faster or less: the step times stand.
    set_entries(&file, "whole passes", 10.0, 9.95);
    let stand = tune(Tuning::Measure);
    assert!(
        stand.iter().all(|c| !c.dense && !c.by_whole_passes),
        "{stand:?}"
    );
    // Flipped, it ran faster: every close layer runs dense, chosen by whole passes.
    set_entries(&file, "whole passes", 10.0, 8.0);
    let flipped = tune(Tuning::Measure);
    assert!(
        flipped.iter().all(|c| c.dense && c.by_whole_passes),
        "{flipped:?}"
    );
    assert!(coarsen_infer::describe_choices(&flipped).contains("by whole passes"));
    // Step times far apart are not checked: the cached pass times are not consulted.
    set_entries(&file, "|in context", 1.0, 2.0);
    let apart = tune(Tuning::Measure);
    assert!(
        apart.iter().all(|c| !c.dense && !c.by_whole_passes),
        "{apart:?}"
    );
    // Dense ahead by little: the flip is to packed.
    set_entries(&file, "|in context", 1.2, 1.0);
    tune(Tuning::Measure);
    assert!(set_entries(&file, "flip dense to packed", 10.0, 10.0) >= 1);
    let dense = tune(Tuning::Measure);
    assert!(dense.iter().all(|c| c.dense && !c.by_whole_passes));
    set_entries(&file, "flip dense to packed", 10.0, 8.0);
    let back = tune(Tuning::Measure);
    assert!(
        back.iter().all(|c| !c.dense && c.by_whole_passes),
        "{back:?}"
    );
    // A time of zero, negative or not finite in the file is no measurement: measured anew.
    for t in [0.0, -1.0, f64::INFINITY] {
        set_entries(&file, "|in context", t, 1.0);
        let again = tune(Tuning::Measure);
        assert!(again.iter().all(|c| !c.cached), "{t}: {again:?}");
    }
}

#[test]
fn a_packed_network_on_the_dense_kernels_is_timed_as_the_dense_one() {
    // The demo's `dense` and `imp` rows: nothing runs packed, so the two paths are one
    // computation, timed once (a saving of exactly 0, never noise shown as a loss).
    let (graph, tensors, weights) = residual().finish(6);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Csr, 10);
    let network = Network::new(graph, tensors, masks).unwrap();
    let dense = InferenceNet::new(&network, &formats, Path::Dense).unwrap();
    let mut packed = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    let [c, h, w] = dense.input();
    let x = vec![0.25; 2 * c * h * w];
    assert!(dense.runs_dense_kernels());
    // Untuned, the sparse layers run packed: timed against the dense path.
    assert!(!packed.runs_dense_kernels());
    // Forced onto the dense kernels everywhere: the same network.
    let dir = tempfile::tempdir().unwrap();
    let mut cache = TuneCache::open(&dir.path().join("tune.json"));
    let choices = packed.tune(2, &mut cache, Tuning::Dense).unwrap();
    assert!(!choices.is_empty() && choices.iter().all(|c| c.dense));
    assert!(packed.runs_dense_kernels());
    let t = coarsen_infer::timing::time_paths(&packed, &dense, &x, 2, 3).unwrap();
    assert!(t.one_computation);
    assert_eq!(t.packed_ms, t.dense_ms);
    assert_eq!(t.time_saving, 0.0);
    assert!(t.dense_ms > 0.0);
    // Other options (no Winograd, say) are another computation: timed apart.
    let mut o = InferOptions::default();
    o.winograd = !o.winograd;
    let other = InferenceNet::with_options(&network, &formats, Path::Dense, o).unwrap();
    // (Whether they are told apart, not their times: two medians of a small network can
    // coincide to the nanosecond.)
    let t = coarsen_infer::timing::time_paths(&packed, &other, &x, 2, 3).unwrap();
    assert!(t.packed_ms > 0.0 && t.dense_ms > 0.0);
    assert!(!t.one_computation, "timed as one computation");
}

/// A tuned network that measures no faster than the dense path as a whole runs dense: the
/// saving is then exactly 0 (one computation, timed once), never a loss. CSR layers at 45%
/// density, forced packed, are far slower than the dense kernels, so the fall-back is what
/// this exercises; where a run ever measured them faster, the saving must be positive.
/// Forced packed by the caller (`Tuning::Packed`), nothing falls back.
#[test]
fn a_tuned_network_no_faster_than_dense_runs_dense() {
    let (graph, tensors, weights) = deep().finish(8);
    let (masks, formats) = masks_for(&weights, &LayerFormat::Csr, 11);
    let network = Network::new(graph, tensors, masks).unwrap();
    let dense = InferenceNet::new(&network, &formats, Path::Dense).unwrap();
    let [c, h, w] = dense.input();
    let batch = 4;
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let want = dense.forward(&x, batch).unwrap();
    let mut cache = TuneCache::in_memory();
    for tuning in [Tuning::Measure, Tuning::Packed] {
        let mut packed = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
        let mut choices = packed.tune(batch, &mut cache, Tuning::Packed).unwrap();
        assert!(!choices.is_empty() && choices.iter().all(|c| !c.dense));
        let settled = coarsen_infer::timing::time_tuned(
            (&network, &formats),
            &mut packed,
            &mut choices,
            tuning,
            &dense,
            &x,
            batch,
            5,
        )
        .unwrap();
        let t = settled.timing;
        if tuning == Tuning::Packed {
            assert!(!settled.runs_dense && !packed.runs_dense_kernels());
            continue;
        }
        if settled.runs_dense {
            assert_eq!(t.time_saving, 0.0);
            assert_eq!(t.packed_ms, t.dense_ms);
            assert!(packed.runs_dense_kernels());
            assert!(choices.iter().all(|c| c.dense));
            let got = packed.forward(&x, batch).unwrap();
            assert!(max_error(&got, &want) <= 1e-5 * scale_of(&want));
        } else {
            assert!(t.packed_ms < t.dense_ms, "{t:?}");
        }
    }
}

/// The demo CNN's shapes at a batch large enough for Winograd F(4×4): its 3×3 convolution on
/// 14×14 images (which tiles of 4 do not divide: the last band and column of tiles reach past
/// each image) and on 10×6, then a flatten and a linear layer over a batch that is no multiple
/// of 16, on the dense path with Winograd on and off, against the reference.
#[test]
fn winograd_tiles_past_the_image_equal_the_reference() {
    let mut net = Net::new([8, 14, 14]);
    net.conv3("conv1", 8, 32, 1);
    net.op(Op::Relu);
    net.op(Op::MaxPool(pool(3, 3, 1)));
    net.conv3("conv2", 32, 40, 1);
    net.op(Op::Flatten);
    net.linear("fc", 40 * 5 * 5, 7, true);
    let mut wide_net = Net::new([8, 10, 6]);
    wide_net.conv3("conv1", 8, 32, 1);
    wide_net.op(Op::Flatten);
    wide_net.linear("fc", 32 * 60, 5, true);
    for (label, net, batch) in [("14x14", net, 11), ("10x6", wide_net, 19)] {
        let (graph, tensors, weights) = net.finish(21);
        let (masks, formats) = masks_for(&weights, &LayerFormat::Dense, 0);
        let network = Network::new(graph, tensors, masks).unwrap();
        let [c, h, w] = network.input();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let x: Vec<f32> = (0..batch * c * h * w)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let want = reference::forward_nchw(&network, &x, batch).unwrap();
        let scale = scale_of(&want);
        for winograd in [true, false] {
            let options = InferOptions {
                winograd,
                ..InferOptions::default()
            };
            let engine =
                InferenceNet::with_options(&network, &formats, Path::Dense, options).unwrap();
            let got = engine.forward_nchw(&x, batch).unwrap();
            let err = max_error(&got, &want);
            assert!(err <= 1e-3 * scale, "{label} winograd {winograd}: {err}");
            let steps = engine.profile(&x, batch, 1).unwrap();
            let f4 = steps.iter().filter(|s| s.kernel.contains("F(4x4")).count();
            // Where the CPU has a fused kernel (AVX-512, or AVX2 and FMA) the 14×14 layer runs
            // F(4×4) (10×6 pads too much).
            if winograd
                && label == "14x14"
                && matches!(
                    coarsen_kernels::simd::Isa::detect(),
                    coarsen_kernels::simd::Isa::Avx512 | coarsen_kernels::simd::Isa::Avx2
                )
            {
                assert_eq!(f4, 1, "{label}: {steps:?}");
            }
            if !winograd || label == "10x6" {
                assert_eq!(f4, 0, "{label}: {steps:?}");
            }
        }
    }
}

/// A group layer of whole kernels (rows in classes, each reading a subset of the input
/// channels, as `prune --granularity kernel` then `convert --kernels` leave): its dense twin
/// runs Winograd over the row classes where the CPU has AVX-512, the same function as the
/// reference, and is no longer "the dense path" for timing.
#[test]
fn group_of_whole_kernels_runs_winograd_over_row_classes() {
    let (graph, tensors, weights) = wide().finish(12);
    let mut masks = MaskSet::new();
    let mut formats = Formats::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, shape) in weights.iter().filter(|(n, _)| n == "conv2.weight") {
        let (cout, cin) = (shape[0], shape[1]);
        // Four classes of channels (about a quarter each); one row in eight empty.
        let sets: Vec<Vec<bool>> = (0..4)
            .map(|_| (0..cin).map(|_| rng.random_bool(0.25)).collect())
            .collect();
        let mut bytes = vec![0u8; cout * cin * 9];
        for m in 0..cout {
            if m % 8 == 7 {
                continue;
            }
            let set = &sets[m % 4];
            for c in (0..cin).filter(|&c| set[c]) {
                bytes[(m * cin + c) * 9..][..9].fill(1);
            }
        }
        masks.insert_bytes(name.clone(), shape, bytes).unwrap();
        formats.insert(name.clone(), LayerFormat::Group);
    }
    let network = Network::new(graph, tensors, masks).unwrap();
    let [c, h, w] = network.input();
    let batch = 4;
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let want = reference::forward_nchw(&network, &x, batch).unwrap();
    let scale = scale_of(&want);
    let mut packed = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
    let choices = packed
        .tune(batch, &mut TuneCache::in_memory(), Tuning::Dense)
        .unwrap();
    assert_eq!(choices.len(), 1);
    // The instruction set the kernels run (`COARSEN_ISA` may lower it).
    let avx512 = coarsen_kernels::simd::Isa::detect() == coarsen_kernels::simd::Isa::Avx512;
    assert_eq!(choices[0].row_classes, avx512);
    if avx512 {
        assert!(!packed.runs_dense_kernels(), "timed as the dense path");
        let steps = packed.profile(&x, batch, 1).unwrap();
        let conv2 = steps.iter().find(|s| s.step == "conv2.weight").unwrap();
        assert!(conv2.kernel.contains("row classes"), "{}", conv2.kernel);
        assert!(coarsen_infer::describe_choices(&choices).contains("row classes"));
    }
    let got = packed.forward_nchw(&x, batch).unwrap();
    let err = max_error(&got, &want);
    assert!(err <= 1e-4 * scale, "max error {err} (scale {scale})");
    // The dense path runs the masked weights on the dense Winograd kernels.
    let dense = InferenceNet::new(&network, &formats, Path::Dense).unwrap();
    let steps = dense.profile(&x, batch, 1).unwrap();
    let conv2 = steps.iter().find(|s| s.step == "conv2.weight").unwrap();
    assert!(!conv2.kernel.contains("row classes"), "{}", conv2.kernel);
}

/// Tuning fuses the residual network's 1×1 stride-2 shortcut into the 3×3 stride-2
/// convolution of the same input (both in group blocks, run in place): one step computes both,
/// the residual `Add` (fused into the shortcut, the later operand) moves to the block's second
/// convolution, and the logits stay the reference's, at batch 3 and 1, with the fused kernel
/// and where it falls back to the two layers (block kernels off), on chunks of images, tuned
/// once or twice. With
/// `fuse_downsample` off the two layers stay apart.
#[test]
fn a_downsample_runs_fused_into_the_strided_convolution() {
    if !matches!(
        coarsen_kernels::Isa::detect(),
        coarsen_kernels::Isa::Avx512 | coarsen_kernels::Isa::Avx2
    ) {
        // The fused kernel is AVX-512's and AVX2's.
        return;
    }
    let pair = "body.conv1.weight + short.weight";
    for fmt in [LayerFormat::Group, LayerFormat::ShuffledBlock { block: 4 }] {
        let (graph, tensors, weights) = residual().finish(21);
        let (masks, formats) = masks_for(&weights, &fmt, 5);
        let network = Network::new(graph, tensors, masks).unwrap();
        let [c, h, w] = network.input();
        for fuse in [true, false] {
            let options = InferOptions {
                fuse_downsample: fuse,
                ..InferOptions::default()
            };
            let mut e =
                InferenceNet::with_options(&network, &formats, Path::Packed, options).unwrap();
            for _ in 0..2 {
                e.tune(3, &mut TuneCache::in_memory(), Tuning::Packed)
                    .unwrap();
            }
            // Batches 3 and 1, block kernels off (the fused step runs the two layers), and
            // the first steps (the fused one among them) on chunks of one image.
            for (batch, blocks, chunks) in [(3, true, 0), (1, true, 0), (3, false, 0), (3, true, 1)]
            {
                let mut o = InferOptions {
                    block_conv: blocks,
                    ..options
                };
                if chunks > 0 {
                    o.prefix_min_floats = 1;
                    o.prefix_chunk_floats = chunks;
                }
                e.set_options(o);
                let chunked = e.chunking(batch);
                assert_eq!(chunked.is_some(), chunks > 0);
                assert!(chunked.is_none_or(|c| c.images == 1 && c.steps > 2));
                let mut rng = ChaCha8Rng::seed_from_u64(batch as u64);
                let x: Vec<f32> = (0..batch * c * h * w)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect();
                let want = reference::forward_nchw(&network, &x, batch).unwrap();
                let got = e.forward_nchw(&x, batch).unwrap();
                let err = max_error(&got, &want);
                assert!(
                    err <= 1e-4 * scale_of(&want),
                    "{fmt:?} fuse {fuse} batch {batch} blocks {blocks} chunks {chunks}: {err}"
                );
                let xc = coarsen_infer::nchw_to_cbhw(&x, batch, [c, h, w]);
                let steps = e.profile(&xc, batch, 1).unwrap();
                let fused: Vec<_> = steps.iter().filter(|s| s.step == pair).collect();
                let apart = steps
                    .iter()
                    .filter(|s| s.step == "short.weight" || s.step == "body.conv1.weight")
                    .count();
                assert_eq!(
                    (fused.len(), apart),
                    if fuse { (1, 0) } else { (0, 2) },
                    "{fmt:?} {steps:?}"
                );
                if let Some(s) = fused.first() {
                    // Both layers' multiply-adds; the fused kernel named where it runs.
                    let macs: usize = e
                        .layers()
                        .iter()
                        .filter(|l| l.name == "short.weight" || l.name == "body.conv1.weight")
                        .map(|l| l.macs_per_image * batch)
                        .sum();
                    assert_eq!(s.macs, macs);
                    assert_eq!(s.kernel.ends_with("1x1 fused"), blocks, "{}", s.kernel);
                }
                // The residual adds and ReLUs still run in epilogues.
                assert!(steps.iter().all(|s| s.step != "add" && s.step != "relu"));
            }
        }
    }
}

/// Tuning chooses how far the first steps run on chunks of images: to the options' cut or to
/// the one a stage further, whichever measured faster; the choice is cached (a second network
/// tuned with the same cache makes the same one), forcing a side of the layers
/// (`Tuning::Packed`) leaves the options' cut, and the logits are the reference's either way.
#[test]
fn tuning_chooses_how_far_the_first_steps_run_in_chunks() {
    let (graph, tensors, weights) = residual().finish(8);
    let (masks, formats) = masks_for(&weights, &LayerFormat::ShuffledBlock { block: 4 }, 4);
    let network = Network::new(graph, tensors, masks).unwrap();
    let [c, h, w] = network.input();
    let batch = 4;
    // The first convolution makes 8 × 10 × 10 = 800 floats per image, the rest 400 or
    // fewer: at 800 the chunks end after it, at 400 a residual block further. The downsample
    // stays apart from its strided convolution: whether tuning fuses them depends on which
    // kernels it measured faster, and a fused pair is one step fewer (fused steps in chunks
    // are checked by `a_downsample_runs_fused_into_the_strided_convolution`).
    let options = InferOptions {
        prefix_min_floats: 800,
        prefix_chunk_floats: 800,
        fuse_downsample: false,
        ..InferOptions::default()
    };
    let near = InferenceNet::with_options(&network, &formats, Path::Packed, options)
        .unwrap()
        .chunking(batch)
        .unwrap();
    let far = InferenceNet::with_options(
        &network,
        &formats,
        Path::Packed,
        InferOptions {
            prefix_min_floats: 400,
            ..options
        },
    )
    .unwrap()
    .chunking(batch)
    .unwrap();
    assert!(
        near.steps < far.steps && near.images == 1,
        "{near:?} {far:?}"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let want = reference::forward_nchw(&network, &x, batch).unwrap();
    let mut cache = TuneCache::in_memory();
    let mut chosen = Vec::new();
    for tuning in [Tuning::Measure, Tuning::Measure, Tuning::Packed] {
        let mut e = InferenceNet::with_options(&network, &formats, Path::Packed, options).unwrap();
        e.tune(batch, &mut cache, tuning).unwrap();
        if tuning == Tuning::Measure {
            // Tuned again, it chooses between the same two cuts (not a stage further).
            e.tune(batch, &mut cache, tuning).unwrap();
        }
        let got = e.chunking(batch).unwrap();
        let wider = e.options().prefix_min_floats == 400;
        assert_eq!(got.steps, if wider { far.steps } else { near.steps });
        assert!(wider || e.options().prefix_min_floats == 800);
        chosen.push(got.steps);
        let err = max_error(&e.forward_nchw(&x, batch).unwrap(), &want);
        assert!(err <= 1e-4 * scale_of(&want), "{tuning:?}: {err}");
    }
    assert_eq!(chosen[0], chosen[1], "the cached choice");
    assert_eq!(chosen[2], near.steps, "forced layers measure nothing");
}

/// Convolutions on images of at most 4 positions: 3×3 on 2×2 images (one with an identity
/// shortcut added in its epilogue), and a 3×3 stride-2 one from 2×2 to 1×1.
fn tiny() -> Net {
    let mut n = Net::new([6, 4, 4]);
    n.conv3("conv1", 6, 12, 1);
    n.op(Op::Relu);
    n.op(Op::MaxPool(pool(2, 2, 0)));
    n.conv3("conv2", 12, 16, 1);
    n.bn("bn2", 16);
    n.op(Op::Relu);
    let x = n.b.current().to_string();
    n.conv3("conv3", 16, 16, 1);
    n.bn("bn3", 16);
    let body = n.b.current().to_string();
    n.b.push(None, vec![x, body], Op::Add);
    n.op(Op::Relu);
    n.conv3("conv4", 16, 8, 2);
    n.op(Op::Relu);
    n.op(Op::Flatten);
    n.linear("fc", 8, 5, true);
    n
}

#[test]
fn convolutions_on_tiny_images_run_unrolled() {
    for (k, fmt) in [LayerFormat::Group, LayerFormat::ShuffledBlock { block: 4 }]
        .into_iter()
        .enumerate()
    {
        let (graph, tensors, weights) = tiny().finish(5 + k as u64);
        let (masks, formats) = masks_for(&weights, &fmt, 9 + k as u64);
        let network = Network::new(graph, tensors, masks).unwrap();
        let [c, h, w] = network.input();
        for (residual, bf16) in [(true, false), (false, false), (true, true)] {
            let options = InferOptions {
                fuse_residual: residual,
                bf16,
                ..InferOptions::default()
            };
            let engine =
                InferenceNet::with_options(&network, &formats, Path::Packed, options).unwrap();
            // In bfloat16 (where the CPU has it), the unrolled maps run the block kernel as a
            // 1×1 convolution over the images: within bfloat16's rounding of the reference,
            // and not the f32 engine's values.
            let rounded = bf16 && coarsen_kernels::BlockConv::bf16_available();
            let f32_engine = InferenceNet::new(&network, &formats, Path::Packed).unwrap();
            let tolerance = if rounded { 3e-2 } else { 1e-4 };
            // Below 8 images the layers run their block kernels; from 8 on, unrolled.
            for batch in [2, 9] {
                let mut rng = ChaCha8Rng::seed_from_u64(batch as u64);
                let x: Vec<f32> = (0..batch * c * h * w)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect();
                let want = reference::forward_nchw(&network, &x, batch).unwrap();
                let got = engine.forward_nchw(&x, batch).unwrap();
                let err = max_error(&got, &want);
                assert!(
                    err <= tolerance * scale_of(&want),
                    "{fmt:?} batch {batch}, residual fused {residual}, bf16 {bf16}: {err}"
                );
                if bf16 && batch >= 8 {
                    let f32_got = f32_engine.forward_nchw(&x, batch).unwrap();
                    assert_eq!(got == f32_got, !rounded, "{fmt:?} batch {batch}");
                }
                let steps = engine.profile(&x, batch, 1).unwrap();
                for step in ["conv2.weight", "conv3.weight", "conv4.weight"] {
                    let kernel = steps
                        .iter()
                        .find(|s| s.step == step)
                        .map(|s| s.kernel.clone())
                        .unwrap_or_default();
                    assert_eq!(
                        kernel.starts_with("unrolled"),
                        batch >= 8,
                        "{fmt:?} batch {batch}, {step}: {kernel}"
                    );
                    if batch >= 8 {
                        assert_eq!(
                            kernel.ends_with(", bf16"),
                            rounded,
                            "{fmt:?} batch {batch}, {step}: {kernel}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_network_of_small_values_chunks_from_half_its_largest() {
    // `plain`'s largest value is conv2's, 16 × 12 × 12 = 2304 floats per image, far below the
    // default threshold (64 Ki): its steps chunk from 1152 floats on, conv1's output.
    let (graph, tensors, _) = plain().finish(4);
    let network = Network::new(graph, tensors, MaskSet::new()).unwrap();
    let engine = InferenceNet::new(&network, &Formats::new(), Path::Dense).unwrap();
    let o = engine.options();
    assert!(o.prefix_min_floats > 2304);
    // Chunks of as many images as 2304-float values fill `prefix_chunk_floats`.
    let images = o.prefix_chunk_floats / 2304;
    let batch = images + 3;
    let c = engine.chunking(batch).expect("chunked");
    assert_eq!((c.images, c.image_floats), (images, 2304));
    // conv1 and conv2 (BatchNorm and ReLU folded into them) and the max pool that shrinks
    // conv2's value; conv3 reads and makes 576 floats per image.
    assert_eq!(c.steps, 3, "{c:?}");
    assert!(engine.chunking(images).is_none());
    let [ch, h, w] = network.input();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x: Vec<f32> = (0..batch * ch * h * w)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let want = reference::forward_nchw(&network, &x, batch).unwrap();
    let got = engine.forward_nchw(&x, batch).unwrap();
    assert!(max_error(&got, &want) <= 1e-4 * scale_of(&want));
}
