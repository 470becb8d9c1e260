//! Whole runs on a tiny synthetic data set: a run killed mid-epoch and resumed ends bit-identical
//! to an uninterrupted one; reused stages give the same result as recomputed ones; every method
//! runs and reports what it promises.

use std::path::Path;

use coarsen_train::data::{DataSplits, Images};
use coarsen_train::dynamic::{Grow, LinearBlocks};
use coarsen_train::methods::{run, Experiment, RunOptions};
use coarsen_train::train::{load_tensors, Recipe, Silent};

/// Images whose class is written into their pixels (learnable), 1×8×8, 4 classes.
fn images(n: usize, seed: u32) -> Images {
    let mut pixels = Vec::with_capacity(n * 64);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i as u32 * 7 + seed) % 4;
        labels.push(class);
        for p in 0..64u32 {
            let noise = ((i as u32 * 64 + p).wrapping_mul(2_654_435_761) ^ seed) % 1000;
            let signal = if p / 16 == class { 1.0 } else { 0.0 };
            pixels.push(signal + noise as f32 / 2000.0 - 0.25);
        }
    }
    Images {
        n,
        channels: 1,
        height: 8,
        width: 8,
        pixels,
        labels,
    }
}

fn data() -> DataSplits {
    DataSplits {
        name: "synthetic".into(),
        source: "memory".into(),
        train: images(96, 1),
        val: images(16, 2),
        test: images(32, 3),
        classes: 4,
        mean: vec![0.0],
        std: vec![1.0],
    }
}

/// A two-epoch dense run's data and experiment, and a fresh directory for it.
fn short_dense() -> (
    DataSplits,
    Experiment,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let mut exp = experiment("dense");
    exp.recipe.epochs = 2;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    (data(), exp, tmp, dir)
}

fn experiment(method: &str) -> Experiment {
    let mut recipe = Recipe::fashion_mnist();
    recipe.epochs = 3;
    recipe.batch_size = 16;
    recipe.val_split = 16;
    recipe.rewind_epoch = 1;
    Experiment {
        method: method.into(),
        model: "cnn".into(),
        width: 0.5,
        seed: 3,
        recipe,
        ..Experiment::default()
    }
    .tap(|e| {
        e.imp.rounds = 2;
        e.regroup.parts = coarsen_core::patterns::PartCount::Auto;
        e.regroup.row_tile = 8;
        e.regroup.min_rows = 4;
        e.dynamic.block = 4;
        e.dynamic.delta_t = 2;
    })
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}
impl Tap for Experiment {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

fn final_files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let stage = dir.join(r["final_stage"].as_str().unwrap());
    (
        std::fs::read(stage.join("weights.safetensors")).unwrap(),
        std::fs::read(stage.join("masks.safetensors")).unwrap(),
    )
}

#[test]
fn killed_mid_epoch_and_resumed_is_bit_identical() {
    let data = data();
    // dsb-estimate resumes between updates that depend on the tiles the last extraction chose
    // (checkpointed with the dynamics' state) and on the recorded gradient norms.
    for method in ["imp", "dsb", "dsb-estimate"] {
        let exp = match method {
            "dsb-estimate" => experiment("dsb").tap(|e| e.dynamic.grow = Grow::Estimate),
            m => experiment(m),
        };
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        run(&exp, &data, &a, &RunOptions::default(), &Silent)
            .unwrap()
            .unwrap();
        // 6 steps per epoch: stop inside epoch 2 of stage 0, then inside stage 1 (IMP).
        let mut stopped = 0;
        for steps in [8, 9, 7] {
            let opts = RunOptions {
                resume: stopped > 0,
                stop_after_steps: Some(steps),
                ..Default::default()
            };
            if run(&exp, &data, &b, &opts, &Silent).unwrap().is_some() {
                break;
            }
            stopped += 1;
        }
        assert!(stopped >= 1, "{method}: the run was never interrupted");
        let opts = RunOptions {
            resume: true,
            ..Default::default()
        };
        if !b.join("results.json").exists() {
            run(&exp, &data, &b, &opts, &Silent).unwrap().unwrap();
        }
        assert!(
            final_files(&a) == final_files(&b),
            "{method}: resumed run differs"
        );
        let ma = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
        let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
        let strip = |s: &str| -> Vec<serde_json::Value> {
            s.lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().remove("samples_per_s");
                    v
                })
                .collect()
        };
        assert_eq!(strip(&ma), strip(&mb), "{method}: metrics differ");
    }
}

#[test]
fn a_second_run_into_the_same_directory_needs_resume() {
    let data = data();
    let mut exp = experiment("dense");
    exp.recipe.epochs = 2;
    let tmp = tempfile::tempdir().unwrap();
    run(&exp, &data, tmp.path(), &RunOptions::default(), &Silent).unwrap();
    let err = run(&exp, &data, tmp.path(), &RunOptions::default(), &Silent).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    exp.seed += 1;
    let opts = RunOptions {
        resume: true,
        ..Default::default()
    };
    let err = run(&exp, &data, tmp.path(), &opts, &Silent).unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
}

#[test]
fn reused_stages_equal_recomputed_ones() {
    let data = data();
    let tmp = tempfile::tempdir().unwrap();
    let imp = tmp.path().join("imp");
    run(
        &experiment("imp"),
        &data,
        &imp,
        &RunOptions::default(),
        &Silent,
    )
    .unwrap()
    .unwrap();
    let refill = experiment("imp-refill");
    let (fresh, reused) = (tmp.path().join("fresh"), tmp.path().join("reused"));
    run(&refill, &data, &fresh, &RunOptions::default(), &Silent)
        .unwrap()
        .unwrap();
    let opts = RunOptions {
        reuse: Some(imp.clone()),
        ..Default::default()
    };
    let r = run(&refill, &data, &reused, &opts, &Silent)
        .unwrap()
        .unwrap();
    assert!(final_files(&fresh) == final_files(&reused));
    assert_eq!(r.stages.len(), 4);
    // Another seed cannot reuse them.
    let mut other = refill.clone();
    other.seed += 1;
    let err = run(&other, &data, &tmp.path().join("x"), &opts, &Silent).unwrap_err();
    assert!(err.to_string().contains("cannot be reused"), "{err}");
    // The message names what differs.
    assert!(err.to_string().contains("seed (3 vs 4)"), "{err}");
    let mut other = refill.clone();
    other.recipe.lr = 0.01;
    let err = run(&other, &data, &tmp.path().join("y"), &opts, &Silent).unwrap_err();
    assert!(err.to_string().contains("recipe.lr: 0.05 vs 0.01"), "{err}");
    // The same data set by another path (here a link to it) is the same data set.
    let real = tmp.path().join("data");
    std::fs::create_dir(&real).unwrap();
    #[cfg(unix)]
    {
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let imp2 = tmp.path().join("imp2");
        let mut e = experiment("imp");
        e.data = real.clone();
        run(&e, &data, &imp2, &RunOptions::default(), &Silent)
            .unwrap()
            .unwrap();
        let mut r = refill.clone();
        r.data = link;
        let opts = RunOptions {
            reuse: Some(imp2),
            ..Default::default()
        };
        run(&r, &data, &tmp.path().join("z"), &opts, &Silent)
            .unwrap()
            .unwrap();
    }
}

#[test]
fn every_method_runs_and_reports_its_structure() {
    let data = data();
    let tmp = tempfile::tempdir().unwrap();
    for method in [
        "dense",
        "one-shot",
        "naive-channel",
        "imp-refill",
        "imp-refill+",
        "imp-regroup",
        "nm",
        "rigl",
        "ssb",
    ] {
        let mut exp = experiment(method);
        exp.recipe.epochs = 2;
        exp.sparsity = 0.5;
        let r = run(
            &exp,
            &data,
            &tmp.path().join(method),
            &RunOptions::default(),
            &Silent,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.stages.len(), exp.stages(), "{method}");
        assert!(r.test_accuracy > 0.0, "{method}");
        let weights = load_tensors(
            &tmp.path()
                .join(method)
                .join(&r.final_stage)
                .join("weights.safetensors"),
        )
        .unwrap();
        for l in &r.layers {
            // Pruned weights are exactly zero in the saved weights.
            let (_, w) = &weights[&l.name];
            let nonzero = w.iter().filter(|v| **v != 0.0).count() as f64 / w.len() as f64;
            assert!(
                nonzero <= l.density + 1e-9,
                "{method} {}: {nonzero} > {}",
                l.name,
                l.density
            );
        }
        let structured = |p: &str| r.layers.iter().any(|l| l.pattern == p);
        match method {
            "dense" => assert_eq!(r.sparsity, 0.0),
            "one-shot" | "rigl" => {
                assert!((r.sparsity - 0.5).abs() < 0.02, "{method}: {}", r.sparsity)
            }
            "naive-channel" | "imp-refill" | "imp-refill+" => {
                assert!(
                    structured("channel") || structured("channel+"),
                    "{method}: {:?}",
                    r.layers
                );
                assert!(r.channel_sparsity > 0.0, "{method}");
            }
            "imp-regroup" => assert!(structured("group"), "{:?}", r.layers),
            "ssb" => assert!(structured("shuffled-block"), "{:?}", r.layers),
            "nm" => {
                assert!(structured("nm"), "{:?}", r.layers);
                assert!(
                    (r.sparsity - 0.5).abs() < 1e-9,
                    "2:4 is half: {}",
                    r.sparsity
                );
            }
            _ => {}
        }
    }
}

/// DSB puts linear layers in shuffled blocks too (unless told to leave them unstructured, as
/// the DSB code does), grows by either criterion, and keeps the unblockable first convolution's
/// mask as it started.
#[test]
fn dsb_blocks_linear_layers_and_keeps_the_first_conv_static() {
    let data = data();
    let tmp = tempfile::tempdir().unwrap();
    for (name, model, linear, grow) in [
        ("mlp", "mlp", LinearBlocks::Blocked, Grow::Estimate),
        (
            "mlp-unstructured",
            "mlp",
            LinearBlocks::Unstructured,
            Grow::Gradient,
        ),
        ("cnn", "cnn", LinearBlocks::Blocked, Grow::Estimate),
    ] {
        let exp = experiment("dsb").tap(|e| {
            e.model = model.into();
            e.dynamic.linear = linear;
            e.dynamic.grow = grow;
            e.sparsity = 0.5;
        });
        let dir = tmp.path().join(name);
        let r = run(&exp, &data, &dir, &RunOptions::default(), &Silent)
            .unwrap()
            .unwrap();
        let blocked: Vec<&str> = r
            .layers
            .iter()
            .filter(|l| l.pattern == "shuffled-block")
            .map(|l| l.name.as_str())
            .collect();
        let linear_blocked = r
            .layers
            .iter()
            .any(|l| l.shape.len() == 2 && l.pattern == "shuffled-block");
        assert_eq!(
            linear_blocked,
            linear == LinearBlocks::Blocked,
            "{name}: {:?}",
            r.layers
        );
        if model == "mlp" && linear == LinearBlocks::Blocked {
            // Both hidden layers (150×64 and 50×150 at width 0.5; not multiples of b = 4 rows);
            // the 4-row output layer is below a block.
            assert_eq!(blocked, ["fc1.weight", "fc2.weight"], "{name}");
        }
        if model == "cnn" {
            assert!(!blocked.is_empty(), "{name}: {:?}", r.layers);
        }
        if model == "cnn" {
            // The first conv (1 input channel < b) is not blocked and never changes: its mask is
            // the one of a run without updates; a blocked layer's mask changed.
            let first = &r.layers[0];
            assert_eq!(first.shape.len(), 4);
            assert_ne!(first.pattern, "shuffled-block");
            let frozen = exp.clone().tap(|e| e.dynamic.delta_t = 1_000_000);
            let fdir = tmp.path().join("cnn-frozen");
            let fr = run(&frozen, &data, &fdir, &RunOptions::default(), &Silent)
                .unwrap()
                .unwrap();
            let masks = |dir: &Path, stage: &str| {
                coarsen_core::MaskSet::read(dir.join(stage).join("masks.safetensors"))
                    .unwrap()
                    .0
            };
            let (moved, still) = (masks(&dir, &r.final_stage), masks(&fdir, &fr.final_stage));
            let same = |n: &str| moved.get(n).unwrap().mask() == still.get(n).unwrap().mask();
            assert!(same(&first.name), "the first conv's mask changed");
            assert!(!same(blocked[0]), "{}: no update changed it", blocked[0]);
        }
    }
}

/// One writer per run directory: while a lock is held (another `train`, `export` or `demo`),
/// a run into the directory stops before writing anything; a directory of other files, or a
/// run of another experiment, is refused unless `force`.
#[test]
fn a_run_directory_has_one_writer_and_holds_only_its_run() {
    let (data, exp, tmp, dir) = short_dense();
    {
        let _held = coarsen_core::DirLock::acquire(&dir, "training").unwrap();
        let err = run(&exp, &data, &dir, &RunOptions::default(), &Silent).unwrap_err();
        assert!(err.to_string().contains("another coarsen process"), "{err}");
        assert!(!dir.join("experiment.json").exists());
    }
    run(&exp, &data, &dir, &RunOptions::default(), &Silent).unwrap();

    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let err = run(&exp, &data, &other, &RunOptions::default(), &Silent).unwrap_err();
    assert!(err.to_string().contains("'notes.txt'"), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(!other.join("experiment.json").exists());
    let force = RunOptions {
        force: true,
        ..Default::default()
    };
    run(&exp, &data, &other, &force, &Silent).unwrap();
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "mine"
    );

    // A finished run of another experiment is not replaced silently.
    let mut second = exp.clone();
    second.seed += 1;
    std::fs::remove_dir_all(dir.join("checkpoint")).ok();
    let err = run(&second, &data, &dir, &RunOptions::default(), &Silent).unwrap_err();
    assert!(err.to_string().contains("another experiment"), "{err}");
}

/// Every tensor of a run is checked against the architecture when loaded: a BatchNorm
/// statistic of the wrong length (shorter panicked, longer was ignored) or one holding NaN is a
/// clear error naming the tensor.
#[test]
fn a_run_with_damaged_batch_norm_statistics_does_not_load() {
    let (data, exp, _tmp, dir) = short_dense();
    run(&exp, &data, &dir, &RunOptions::default(), &Silent).unwrap();
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let stage = dir.join(results["final_stage"].as_str().unwrap());
    let wpath = stage.join("weights.safetensors");
    // Written by hand, as a tool other than coarsen would (no checksums to catch it first).
    std::fs::remove_file(stage.join("checksums.json")).unwrap();
    let original = coarsen_core::WeightFile::read(&wpath).unwrap();
    let bn = original
        .tensors()
        .iter()
        .find(|t| t.name.ends_with("running_var"))
        .unwrap()
        .name
        .clone();
    let damaged = |edit: &dyn Fn(&mut Vec<f32>)| {
        let tensors: Vec<coarsen_core::WeightTensor> = original
            .tensors()
            .iter()
            .map(|t| {
                let mut v = t.values().unwrap().to_vec();
                let mut shape = t.shape.clone();
                if t.name == bn {
                    edit(&mut v);
                    shape = vec![v.len()];
                }
                coarsen_core::WeightTensor::new(t.name.clone(), shape, v).unwrap()
            })
            .collect();
        coarsen_core::WeightFile::write_f32(&wpath, &tensors).unwrap();
        coarsen_train::run_dir::load(&dir, Some(&data))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    for (what, edit) in [
        (
            "shorter",
            Box::new(|v: &mut Vec<f32>| v.truncate(1)) as Box<dyn Fn(&mut Vec<f32>)>,
        ),
        ("empty", Box::new(|v: &mut Vec<f32>| v.clear())),
        ("longer", Box::new(|v: &mut Vec<f32>| v.push(1.0))),
    ] {
        let err = damaged(&*edit);
        assert!(
            err.contains(&bn) && err.contains("the model needs"),
            "{what}: {err}"
        );
    }
    let err = damaged(&|v: &mut Vec<f32>| v[0] = f32::NAN);
    assert!(err.contains(&bn) && err.contains("NaN"), "{err}");
}

/// A checkpoint records its files' checksums: a flipped bit inside a tensor, or an edited
/// state, is refused on resume instead of resumed silently; a stage's files likewise on load.
#[test]
fn damaged_checkpoints_and_stages_are_refused() {
    let data = data();
    let exp = experiment("imp");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let stop = RunOptions {
        stop_after_steps: Some(8),
        ..Default::default()
    };
    assert!(run(&exp, &data, &dir, &stop, &Silent).unwrap().is_none());
    let ckpt = dir.join("checkpoint");
    assert!(ckpt.join("checksums.json").exists());
    let resume = RunOptions {
        resume: true,
        stop_after_steps: Some(1),
        ..Default::default()
    };
    for (file, at) in [("weights.safetensors", None), ("state.json", Some(b'1'))] {
        let path = ckpt.join(file);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        match at {
            // The last byte of the last tensor's data: a value, not the header.
            None => *bad.last_mut().unwrap() ^= 0x10,
            Some(c) => {
                let i = bad.iter().position(|&b| b == c).unwrap();
                bad[i] = b'9';
            }
        }
        std::fs::write(&path, &bad).unwrap();
        let err = run(&exp, &data, &dir, &resume, &Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{file} is damaged")), "{err}");
        std::fs::write(&path, &good).unwrap();
    }
    let done = RunOptions {
        resume: true,
        ..Default::default()
    };
    run(&exp, &data, &dir, &done, &Silent).unwrap().unwrap();
    coarsen_train::run_dir::load(&dir, Some(&data)).unwrap();
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let stage = dir.join(results["final_stage"].as_str().unwrap());
    let w = stage.join("weights.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01;
    std::fs::write(&w, bytes).unwrap();
    let err = coarsen_train::run_dir::load(&dir, Some(&data))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("weights.safetensors is damaged"), "{err}");
}

/// What a killed process leaves (temporary files of atomic writes, a half-written
/// checkpoint.new) is removed when the run is resumed, and does not stop it.
#[test]
fn leftovers_of_a_killed_run_are_cleaned_on_resume() {
    let (data, exp, _tmp, dir) = short_dense();
    let stop = RunOptions {
        stop_after_steps: Some(8),
        ..Default::default()
    };
    assert!(run(&exp, &data, &dir, &stop, &Silent).unwrap().is_none());
    std::fs::write(dir.join(".coarsen-abc123.tmp"), b"partial").unwrap();
    std::fs::create_dir_all(dir.join("checkpoint.new")).unwrap();
    std::fs::write(dir.join("checkpoint.new/weights.safetensors"), b"half").unwrap();
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    run(&exp, &data, &dir, &resume, &Silent).unwrap().unwrap();
    assert!(!dir.join(".coarsen-abc123.tmp").exists());
    assert!(!dir.join("checkpoint.new").exists());
}
