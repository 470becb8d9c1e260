//! Mutation fuzzing of every reader of user files: valid files (a mask file with structure
//! metadata, a weights file, an export's `model.json` and `model.safetensors`, IDX and CIFAR
//! data, a finished training run) are mutated at random — bits flipped, bytes overwritten with
//! boundary values, spans cut, duplicated or inserted, JSON numbers and strings replaced — and
//! read back. Every read must return (an error is fine): no panic, no hang.
//!
//! `COARSEN_FUZZ_CASES` sets the mutations per target (default 150, what CI runs);
//! `scripts/fuzz` runs a long campaign; `COARSEN_FUZZ_SEED` changes the stream.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use coarsen_core::{MaskFile, MaskSet, Pattern, WeightFile};
use coarsen_train::data::{DataSplits, Images};
use coarsen_train::methods::{run, Experiment, RunOptions};
use coarsen_train::model::{Model, ModelSpec};
use coarsen_train::train::{Recipe, Silent};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cases() -> usize {
    std::env::var("COARSEN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

fn seed() -> u64 {
    std::env::var("COARSEN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed)
}

/// One mutation of `bytes`.
fn mutate(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let rounds = 1 + rng.random_range(0..3);
    for _ in 0..rounds {
        let len = b.len().max(1);
        match rng.random_range(0..9) {
            0 => {
                let i = rng.random_range(0..len);
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1 << rng.random_range(0..8);
                }
            }
            1 => {
                let i = rng.random_range(0..len);
                let v = [0u8, 1, 0x7f, 0x80, 0xff, b'-', b'9', b'"', b'{', b']']
                    [rng.random_range(0..10)];
                if let Some(x) = b.get_mut(i) {
                    *x = v;
                }
            }
            2 => b.truncate(rng.random_range(0..len)),
            3 => {
                let i = rng.random_range(0..len);
                let j = (i + rng.random_range(1..64)).min(b.len());
                if i < j {
                    b.drain(i..j);
                }
            }
            4 => {
                let i = rng.random_range(0..len).min(b.len());
                let j = (i + rng.random_range(1..64)).min(b.len());
                let span = b[i..j].to_vec();
                b.splice(i..i, span);
            }
            5 => {
                // The 8-byte header length of a safetensors file, or an IDX dimension.
                let at = [0usize, 4, 8][rng.random_range(0..3)];
                let v = [0u64, 1, 7, u32::MAX as u64, u64::MAX, 1 << 40][rng.random_range(0..6)];
                for (k, x) in v.to_le_bytes().iter().enumerate().take(4) {
                    if let Some(y) = b.get_mut(at + k) {
                        *y = *x;
                    }
                }
            }
            6 => b = replace_number(rng, &b),
            7 => b = replace_string(rng, &b),
            _ => {
                let i = rng.random_range(0..len).min(b.len());
                let n = rng.random_range(1..16);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(i..i, junk);
            }
        }
    }
    b
}

/// Replaces one JSON number (a run of digits) with a boundary value.
fn replace_number(rng: &mut ChaCha8Rng, b: &[u8]) -> Vec<u8> {
    let starts: Vec<usize> = (0..b.len())
        .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return b.to_vec();
    }
    let i = starts[rng.random_range(0..starts.len())];
    let j = (i..b.len())
        .find(|&k| !b[k].is_ascii_digit())
        .unwrap_or(b.len());
    let v = [
        "0",
        "1",
        "-1",
        "3",
        "4294967295",
        "18446744073709551615",
        "1e308",
        "NaN",
        "99",
        "65536",
    ][rng.random_range(0..10)];
    let mut out = b[..i].to_vec();
    out.extend_from_slice(v.as_bytes());
    out.extend_from_slice(&b[j..]);
    out
}

/// Replaces the contents of one JSON string.
fn replace_string(rng: &mut ChaCha8Rng, b: &[u8]) -> Vec<u8> {
    let quotes: Vec<usize> = (0..b.len()).filter(|&i| b[i] == b'"').collect();
    if quotes.len() < 2 {
        return b.to_vec();
    }
    let k = rng.random_range(0..quotes.len() / 2) * 2;
    let (i, j) = (quotes[k] + 1, quotes[k + 1]);
    let v = [
        "",
        "x",
        "conv",
        "dense",
        "nm",
        "group",
        "F32",
        "U8",
        "\\n",
        "a\\u0000b",
    ][rng.random_range(0..10)];
    let mut out = b[..i].to_vec();
    out.extend_from_slice(v.as_bytes());
    out.extend_from_slice(&b[j..]);
    out
}

/// Runs `read` on `cases()` mutations of the file `name` in `dir` (restored afterwards);
/// fails on the first panic or a read slower than 20 s, naming the case.
fn fuzz_file(target: &str, dir: &Path, name: &str, read: &dyn Fn() -> bool) -> (usize, usize) {
    let path = dir.join(name);
    let original = std::fs::read(&path).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed() ^ coarsen_core::stable_hash(target));
    let (mut refused, mut accepted) = (0, 0);
    for case in 0..cases() {
        let bytes = mutate(&mut rng, &original);
        std::fs::write(&path, &bytes).unwrap();
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(read));
        let took = t.elapsed();
        if outcome.is_err() {
            let keep = std::env::temp_dir().join(format!("coarsen-fuzz-{target}-{case}"));
            std::fs::write(&keep, &bytes).unwrap();
            panic!(
                "{target}: case {case} panicked; the input is saved in {}",
                keep.display()
            );
        }
        assert!(
            took < Duration::from_secs(20),
            "{target}: case {case} took {took:?}"
        );
        match outcome {
            Ok(true) => accepted += 1,
            _ => refused += 1,
        }
    }
    std::fs::write(&path, &original).unwrap();
    eprintln!(
        "{target}: {} cases, {refused} refused, {accepted} read",
        cases()
    );
    (refused, accepted)
}

fn mask_files(dir: &Path) {
    let w = |i: usize| ((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0) - 1.0;
    let tensors = vec![
        coarsen_core::WeightTensor::new(
            "conv.weight",
            vec![16, 8, 3, 3],
            (0..1152).map(w).collect(),
        )
        .unwrap(),
        coarsen_core::WeightTensor::new(
            "fc.weight",
            vec![10, 16],
            (0..160).map(|i| w(i + 9)).collect(),
        )
        .unwrap(),
    ];
    WeightFile::write_f32(dir.join("w.safetensors"), &tensors).unwrap();
    let weights = WeightFile::read(dir.join("w.safetensors")).unwrap();
    let sel = coarsen_core::Selector::new(None, None).unwrap();
    let (masks, _) = coarsen_core::prune::prune_file(
        &weights,
        None,
        &sel,
        0.7,
        coarsen_core::Scope::Global,
        coarsen_core::Granularity::Weight,
    )
    .unwrap();
    let pattern = Pattern::from_options(
        "nm",
        &coarsen_core::patterns::PatternOptions {
            permute: true,
            ..Default::default()
        },
    )
    .unwrap();
    let inputs = coarsen_core::ConvertInputs {
        masks: &masks,
        weights: Some(&weights),
        scores: None,
        selector: &sel,
        target: None,
    };
    let conv = coarsen_core::convert(&inputs, &pattern, 1, &|_| {}).unwrap();
    conv.masks.write(dir.join("m.safetensors")).unwrap();
}

#[test]
fn mask_and_weight_readers_survive_mutations() {
    let dir = tempfile::tempdir().unwrap();
    mask_files(dir.path());
    let d = dir.path().to_path_buf();
    fuzz_file("masks", dir.path(), "m.safetensors", &|| {
        match MaskFile::read(d.join("m.safetensors")) {
            // What readers do next: sets, formats and inspection of the metadata.
            Ok(f) => MaskSet::from_file(&f).is_ok(),
            Err(_) => false,
        }
    });
    fuzz_file("weights", dir.path(), "w.safetensors", &|| {
        WeightFile::read(d.join("w.safetensors")).is_ok()
    });
}

fn images(n: usize, c: usize, hw: usize, seed: u32) -> Images {
    let pixels = (0..n * c * hw * hw)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32)
        .collect();
    Images {
        n,
        channels: c,
        height: hw,
        width: hw,
        pixels,
        labels: (0..n as u32).map(|i| (i * 7 + seed) % 4).collect(),
    }
}

#[test]
fn export_loader_survives_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec {
        name: "cnn".into(),
        width: 0.25,
        input: [1, 8, 8],
        classes: 4,
    };
    let model = Model::new(&spec, 1).unwrap();
    let net = model.network(&MaskSet::new()).unwrap();
    let formats = coarsen_infer::layer_formats(net.graph(), net.masks(), None).unwrap();
    let exp = dir.path().join("export");
    coarsen_infer::export::write(&net, &formats, None, Default::default(), &exp).unwrap();
    let load = || match coarsen_infer::export::load(&exp) {
        Ok(e) => {
            coarsen_infer::InferenceNet::new(&e.network, &e.formats, coarsen_infer::Path::Packed)
                .and_then(|n| n.forward(&vec![0.5; 64], 1))
                .is_ok()
        }
        Err(_) => false,
    };
    fuzz_file("model.json", &exp, "model.json", &load);
    // Without the checksum that binds the two files, mutations reach the tensor reader.
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exp.join("model.json")).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("tensors_crc32");
    std::fs::write(exp.join("model.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    fuzz_file("model.safetensors", &exp, "model.safetensors", &load);
}

#[test]
fn data_readers_survive_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let idx = |dims: &[u32], body: &[u8]| {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    };
    let mnist = dir.path().join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    for prefix in ["train", "t10k"] {
        let px: Vec<u8> = (0..20 * 16).map(|i| (i % 251) as u8).collect();
        let lb: Vec<u8> = (0..20).map(|i| (i % 4) as u8).collect();
        std::fs::write(
            mnist.join(format!("{prefix}-images-idx3-ubyte")),
            idx(&[20, 4, 4], &px),
        )
        .unwrap();
        std::fs::write(
            mnist.join(format!("{prefix}-labels-idx1-ubyte")),
            idx(&[20], &lb),
        )
        .unwrap();
    }
    let load = |d: &Path| coarsen_train::data::load(d, 2).is_ok();
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        fuzz_file(f, &mnist, f, &|| load(&mnist));
    }
    let cifar = dir.path().join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    let rec = |label: u8| {
        let mut r = vec![label];
        r.extend((0..3072).map(|i| (i % 256) as u8));
        r
    };
    for i in 1..=5 {
        std::fs::write(
            cifar.join(format!("data_batch_{i}.bin")),
            [rec(0), rec(1)].concat(),
        )
        .unwrap();
    }
    std::fs::write(cifar.join("test_batch.bin"), rec(1)).unwrap();
    fuzz_file("cifar", &cifar, "test_batch.bin", &|| load(&cifar));
}

#[test]
fn run_loader_survives_mutations() {
    let data = DataSplits {
        name: "synthetic".into(),
        source: "memory".into(),
        train: images(48, 1, 8, 1),
        val: images(16, 1, 8, 2),
        test: images(16, 1, 8, 3),
        classes: 4,
        mean: vec![0.0],
        std: vec![1.0],
    };
    let mut recipe = Recipe::fashion_mnist();
    recipe.epochs = 2;
    recipe.batch_size = 16;
    recipe.val_split = 16;
    recipe.rewind_epoch = 1;
    let exp = Experiment {
        method: "one-shot".into(),
        model: "cnn".into(),
        width: 0.25,
        recipe,
        ..Experiment::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&exp, &data, &out, &RunOptions::default(), &Silent)
        .unwrap()
        .unwrap();
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let stage = out.join(results["final_stage"].as_str().unwrap());
    // Without checksums, so that the mutations reach the readers behind them.
    std::fs::remove_file(stage.join("checksums.json")).unwrap();
    let load = || coarsen_train::run_dir::load(&out, Some(&data)).is_ok();
    fuzz_file("run weights", &stage, "weights.safetensors", &load);
    fuzz_file("run masks", &stage, "masks.safetensors", &load);
    fuzz_file("experiment.json", &out, "experiment.json", &load);
    fuzz_file("results.json", &out, "results.json", &load);
}
