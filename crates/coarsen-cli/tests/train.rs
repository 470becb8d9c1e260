//! Integration tests of `coarsen train`, `coarsen eval` and `coarsen export`: the real binary on a small data set
//! written as real MNIST-format IDX files.

use std::path::Path;
use std::process::Output;

mod common;
use common::{coarsen, ok};

fn err(args: &[&str]) -> String {
    let out = coarsen(args);
    assert!(!out.status.success(), "coarsen {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An IDX file: magic (type 0x08 = u8, rank), big-endian dimensions, data.
fn idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

/// 8×8 images of 4 classes whose class is a bright band, with noise.
fn dataset(dir: &Path) {
    for (prefix, n) in [("train", 160u32), ("t10k", 48)] {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = (i * 5 + 1) % 4;
            labels.push(class as u8);
            for p in 0..64u32 {
                let noise = (i * 64 + p).wrapping_mul(2_654_435_761) % 90;
                pixels.push(if p / 16 == class {
                    160 + noise as u8
                } else {
                    noise as u8
                });
            }
        }
        idx(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &[n, 8, 8],
            &pixels,
        );
        idx(
            &dir.join(format!("{prefix}-labels-idx1-ubyte")),
            &[n],
            &labels,
        );
    }
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        dataset(&dir.path().join("data"));
        std::fs::write(
            dir.path().join("exp.toml"),
            "model = \"cnn\"\nwidth = 0.5\n[recipe]\nval_split = 32\nbatch_size = 16\n[imp]\nrounds = 1\n",
        )
        .unwrap();
        Setup { dir }
    }

    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn train(&self, out: &str, extra: &[&str]) -> Output {
        let (data, cfg, out) = (self.p("data"), self.p("exp.toml"), self.p(out));
        let mut args = vec![
            "train", "-q", "--data", &data, "--config", &cfg, "--epochs", "2", "--out", &out,
        ];
        args.extend_from_slice(extra);
        coarsen(&args)
    }
}

/// The entry named `name` of a JSON list of layers.
fn layer<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no layer {name} in {list}"))
}

fn succeeded(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let s = Setup::new();
    let full = succeeded(&s.train("a", &["--method", "imp"]));
    assert!(full.contains("test accuracy"), "{full}");
    // 8 steps per epoch: stop in the middle of the second epoch of stage 0, then of stage 1.
    let stopped = s.train("b", &["--method", "imp", "--stop-after-steps", "13"]);
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("--resume"));
    assert!(!s.dir.path().join("b/results.json").exists());
    let again = s.train("b", &["--method", "imp", "--stop-after-steps", "17"]);
    assert!(!again.status.success(), "an existing run needs --resume");
    let out = s.p("b");
    let data = s.p("data");
    // Resuming needs only the directory: the settings come from its experiment.json.
    ok(&[
        "train",
        "-q",
        "--out",
        &out,
        "--data",
        &data,
        "--resume",
        "--stop-after-steps",
        "17",
    ]);
    ok(&["train", "-q", "--out", &out, "--data", &data, "--resume"]);
    for f in ["stage-1/weights.safetensors", "stage-1/masks.safetensors"] {
        let a = std::fs::read(s.dir.path().join("a").join(f)).unwrap();
        let b = std::fs::read(s.dir.path().join("b").join(f)).unwrap();
        assert!(a == b, "{f} differs after resuming");
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("a/results.json")).unwrap())
            .unwrap();
    for key in [
        "method",
        "model",
        "test_accuracy",
        "sparsity",
        "layers",
        "experiment",
    ] {
        assert!(results.get(key).is_some(), "results.json lacks {key}");
    }
    assert_eq!(results["method"], "imp");
    assert!((results["sparsity"].as_f64().unwrap() - 0.2).abs() < 1e-3);
    assert!(results["experiment"]["recipe"]["epochs"] == 2);
    // The summary tabulates both runs.
    let table = ok(&["train", "--summary", &s.p("a"), &s.p("b")]);
    assert_eq!(
        table.lines().filter(|l| l.contains("| imp |")).count(),
        2,
        "{table}"
    );
}

#[test]
fn eval_reports_accuracy_density_and_pattern() {
    let s = Setup::new();
    succeeded(&s.train("r", &["--method", "imp-refill", "--criterion", "saliency"]));
    let json = s.p("eval.json");
    let out = ok(&["eval", "-q", &s.p("r"), "--json", &json]);
    assert!(out.contains("test accuracy"), "{out}");
    assert!(
        out.contains("conv2.weight") && out.contains("channel"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let conv2 = layer(&v["layers"], "conv2.weight");
    assert_eq!(conv2["pattern"], "channel");
    assert!(conv2["density"].as_f64().unwrap() < 1.0);
    // The report never replaces a file of the network it evaluates.
    let results = std::fs::read(s.dir.path().join("r/results.json")).unwrap();
    let res = coarsen(&["eval", "-q", &s.p("r"), "--json", &s.p("r/results.json")]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("is also"));
    assert_eq!(
        std::fs::read(s.dir.path().join("r/results.json")).unwrap(),
        results
    );
    // A stage directory works too, and gives the same accuracy.
    let stage = ok(&["eval", "-q", &s.p("r/stage-2")]);
    let acc = |t: &str| {
        t.split("test accuracy ")
            .nth(1)
            .unwrap()
            .split('%')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(acc(&out), acc(&stage));

    // Export: safetensors + model.json, loaded back by eval with the same accuracy, and its
    // packed path agrees with the dense path.
    let exp = s.p("export");
    let text = ok(&["export", "-q", &s.p("r"), "--out", &exp]);
    assert!(text.contains("verified"), "{text}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("export/model.json")).unwrap())
            .unwrap();
    assert_eq!(m["format"], "coarsen-export");
    assert_eq!(m["model"]["name"], "cnn");
    let conv2 = layer(&m["layers"], "conv2.weight");
    assert_eq!(conv2["format"], "channel");
    assert!(m["file_bytes"].as_u64().unwrap() < m["dense_bytes"].as_u64().unwrap());
    let ejson = s.p("eval-export.json");
    let back = ok(&[
        "eval", "-q", &exp, "--sparse", "--reps", "1", "--json", &ejson,
    ]);
    assert_eq!(acc(&back), acc(&out), "{back}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ejson).unwrap()).unwrap();
    assert_eq!(
        v["sparse"]["packed_test_accuracy"], v["test_accuracy"],
        "{v}"
    );
    let conv2 = layer(&v["sparse"]["layers"], "conv2.weight");
    assert_eq!(conv2["format"], "channel");
    // One definition of sparsity: train's results, eval of the run and of its export, and the
    // export's manifest give the same two figures (prunable layers; all conv and linear weights).
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("r/results.json")).unwrap())
            .unwrap();
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-9
    };
    for (what, doc, all) in [
        ("eval of the run", &e, "sparsity_all"),
        ("eval of the export", &v, "sparsity_all"),
        ("the export's manifest", &m, "sparsity_all"),
    ] {
        assert!(close(&r["sparsity"], &doc["sparsity"]), "{what}: {doc}");
        assert!(close(&r["sparsity_all"], &doc[all]), "{what}: {doc}");
    }
    // The prunable layers leave out the first conv and the classifier: the two differ.
    assert!(r["sparsity"].as_f64().unwrap() > r["sparsity_all"].as_f64().unwrap());
    let line = format!(
        "sparsity {:.2}% of the prunable layers",
        100.0 * r["sparsity"].as_f64().unwrap()
    );
    assert!(out.contains(&line), "{out}");
    assert!(text.contains(&line), "{text}");
    // An export is not exported again; a damaged one is a clear error.
    let e = err(&["export", &exp, "--out", &s.p("again")]);
    assert!(e.contains("already an export"), "{e}");
    std::fs::write(s.dir.path().join("export/model.safetensors"), b"junk").unwrap();
    let e = err(&["eval", &exp]);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn keep_density_returns_regroup_to_the_imp_density() {
    // One IMP round at rate 0.2 prunes to 80% density; Regroup's dense blocks move the pruned
    // layers away from it, and --keep-density global brings them back within a point.
    let s = Setup::new();
    std::fs::write(
        s.dir.path().join("regroup.toml"),
        "model = \"cnn\"\nwidth = 0.5\n[recipe]\nval_split = 32\nbatch_size = 16\n[imp]\nrounds = 1\n\
         [regroup]\nparts = 2\nmin_rows = 2\nrow_tile = 4\n",
    )
    .unwrap();
    let run = |name: &str, extra: &[&str]| -> f64 {
        let (data, cfg, out) = (s.p("data"), s.p("regroup.toml"), s.p(name));
        let mut args = vec![
            "train",
            "-q",
            "--data",
            &data,
            "--config",
            &cfg,
            "--epochs",
            "1",
            "--out",
            &out,
            "--method",
            "imp-regroup",
        ];
        args.extend_from_slice(extra);
        succeeded(&coarsen(&args));
        let r: serde_json::Value = serde_json::from_slice(
            &std::fs::read(s.dir.path().join(format!("{name}/results.json"))).unwrap(),
        )
        .unwrap();
        r["sparsity"].as_f64().unwrap()
    };
    let drifted = run("plain", &[]);
    assert!(
        (drifted - 0.2).abs() > 0.01,
        "Regroup kept the density: {drifted}"
    );
    let kept = run("kept", &["--keep-density", "global"]);
    assert!((kept - 0.2).abs() <= 0.01, "{kept}");
    let e = err(&[
        "train",
        "--data",
        &s.p("data"),
        "--keep-density",
        "all",
        "--out",
        &s.p("x"),
    ]);
    assert!(e.contains("--keep-density"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let s = Setup::new();
    let e = String::from_utf8_lossy(&s.train("x", &["--method", "lottery"]).stderr).into_owned();
    assert!(e.contains("unknown") && e.contains("imp-refill"), "{e}");
    let e = err(&["train", "-q", "--data", &s.p("nowhere"), "--out", &s.p("y")]);
    assert!(e.contains("nowhere"), "{e}");
    let e = err(&["eval", &s.p("data")]);
    assert!(e.contains("experiment.json"), "{e}");
    let bad = s.p("bad.toml");
    std::fs::write(&bad, "[recipe]\nepochz = 3\n").unwrap();
    let e = err(&[
        "train",
        "-q",
        "--data",
        &s.p("data"),
        "--config",
        &bad,
        "--out",
        &s.p("z"),
    ]);
    assert!(e.contains("epochz"), "{e}");
}

/// The default data set: Fashion-MNIST from Debian's `dataset-fashion-mnist` (installed by
/// `.ci/run`). A short run learns far beyond chance (10%).
#[test]
fn trains_on_the_installed_fashion_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let text = ok(&[
        "train",
        "-q",
        "--method",
        "dense",
        "--epochs",
        "1",
        "--train-subset",
        "4096",
        "--out",
        &out.display().to_string(),
    ]);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["dataset"], "fashion-mnist", "{text}");
    assert!(r["test_accuracy"].as_f64().unwrap() > 0.6, "{text}");
    // Exported, it is read by the numpy reference loader alone, with the accuracy `coarsen
    // eval` gives on the 10,000 test images.
    let exp = dir.path().join("export");
    let exp_s = exp.display().to_string();
    ok(&["export", "-q", &out.display().to_string(), "--out", &exp_s]);
    let eval = ok(&["eval", "-q", &exp_s]);
    let numpy = numpy_reference(&exp, None);
    assert_eq!(accuracy_of(&numpy), accuracy_of(&eval), "{numpy}\n{eval}");
    assert!(numpy.contains("(10000 images)"), "{numpy}");
}

/// `examples/numpy_reference.py` on an export (its test images from `data`, or Fashion-MNIST).
fn numpy_reference(export: &Path, data: Option<&str>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/numpy_reference.py");
    let mut cmd = std::process::Command::new(common::python());
    cmd.arg(script).arg(export);
    if let Some(d) = data {
        cmd.args(["--data", d]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "numpy_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `XX.XX` of `test accuracy XX.XX%`.
fn accuracy_of(text: &str) -> String {
    text.split("test accuracy ")
        .nth(1)
        .and_then(|t| t.split('%').next())
        .unwrap_or_else(|| panic!("no test accuracy in {text}"))
        .to_string()
}

/// The numpy reference loader reads a masked, channel-sparse export of a trained run and
/// computes `coarsen eval`'s accuracy; a damaged export stops it with a one-line error.
#[test]
fn numpy_reference_loader_reproduces_eval() {
    let s = Setup::new();
    succeeded(&s.train("r", &["--method", "imp-refill"]));
    let exp = s.p("export");
    ok(&["export", "-q", &s.p("r"), "--out", &exp]);
    let eval = ok(&["eval", "-q", &exp, "--data", &s.p("data")]);
    let numpy = numpy_reference(Path::new(&exp), Some(&s.p("data")));
    assert_eq!(accuracy_of(&numpy), accuracy_of(&eval), "{numpy}\n{eval}");
    // The same network from its weights and masks files, with the data set's normalisation.
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("r/results.json")).unwrap())
            .unwrap();
    let stage = s
        .dir
        .path()
        .join("r")
        .join(r["final_stage"].as_str().unwrap());
    let (w, m) = (
        stage.join("weights.safetensors").display().to_string(),
        stage.join("masks.safetensors").display().to_string(),
    );
    let exp2 = s.p("from-files");
    ok(&[
        "export",
        "-q",
        "--model",
        "cnn",
        "--width",
        "0.5",
        "--weights",
        &w,
        "--mask",
        &m,
        "--data",
        &s.p("data"),
        "--out",
        &exp2,
    ]);
    let again = numpy_reference(Path::new(&exp2), Some(&s.p("data")));
    assert_eq!(accuracy_of(&again), accuracy_of(&eval), "{again}\n{eval}");
    std::fs::write(s.dir.path().join("export/model.safetensors"), b"junk").unwrap();
    let out = std::process::Command::new(common::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/numpy_reference.py"))
        .arg(&exp)
        .args(["--data", &s.p("data")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.starts_with("error:") && e.lines().count() == 1, "{e}");
}

#[test]
fn demo_writes_the_report_with_plots() {
    let s = Setup::new();
    let (data, cfg, o) = (s.p("data"), s.p("exp.toml"), s.p("demo"));
    let out = s.dir.path().join("demo");
    let args = [
        "demo", "-q", "--data", &data, "--config", &cfg, "--out", &o, "--epochs", "1", "--batch",
        "32", "--reps", "1",
    ];
    let table = ok(&args);
    for method in ["dense", "imp", "imp-refill", "imp-regroup", "nm", "dsb"] {
        assert!(table.contains(&format!("| {method} |")), "{table}");
    }
    for f in [
        "report.md",
        "report.html",
        "results.json",
        "accuracy_vs_sparsity.png",
        "time_saving.png",
        "mask_imp-regroup.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    let regroup = rows.iter().find(|x| x["method"] == "imp-regroup").unwrap();
    // "group: k of n layers", and the n − k others listed with their reasons.
    let structure = regroup["structure"].as_str().unwrap();
    let counts: Vec<usize> = structure
        .trim_start_matches("group: ")
        .trim_end_matches(" layers")
        .split(" of ")
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        structure.starts_with("group: ") && counts.len() == 2,
        "{structure}"
    );
    let left = regroup["unstructured_layers"].as_array().unwrap();
    assert_eq!(counts[1] - counts[0], left.len(), "{regroup}");
    for l in left {
        assert!(table.contains(l.as_str().unwrap()), "{table}");
    }
    // The packed network computes what training evaluated.
    for row in rows {
        let (a, b) = (
            row["test_accuracy"].as_f64().unwrap(),
            row["train_test_accuracy"].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 0.002, "{row}");
        assert!(row["inference"]["packed_ms"].as_f64().unwrap() > 0.0);
    }
    // A second run keeps the finished runs and rewrites the report.
    let again = ok(&args);
    assert_eq!(again.lines().count(), table.lines().count());
}

/// Writes a greyscale PNG.
fn png_gray(path: &Path, w: u32, h: u32, pixels: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(png::ColorType::Grayscale);
    e.set_depth(png::BitDepth::Eight);
    e.write_header().unwrap().write_image_data(pixels).unwrap();
}

/// Writes a `.npy` array.
fn npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], values: &[T]) {
    use npyz::WriterBuilder;
    let mut buf = Vec::new();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut buf)
        .begin_nd()
        .unwrap();
    w.extend(values.iter().copied()).unwrap();
    w.finish().unwrap();
    std::fs::write(path, buf).unwrap();
}

fn probabilities(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// `coarsen predict` on an export: IDX images with their labels reproduce `eval`'s accuracy;
/// the same images as PNG and as a uint8 or normalised float `.npy` give the same
/// probabilities; bad inputs are clear errors.
#[test]
fn predict_reads_every_input_kind() {
    let s = Setup::new();
    succeeded(&s.train("r", &["--method", "dense"]));
    let exp = s.p("export");
    ok(&["export", "-q", &s.p("r"), "--out", &exp]);
    let eval = ok(&["eval", "-q", &exp]);
    let acc = eval
        .split("test accuracy ")
        .nth(1)
        .unwrap()
        .split('%')
        .next()
        .unwrap()
        .to_string();
    let (images, labels) = (
        s.p("data/t10k-images-idx3-ubyte"),
        s.p("data/t10k-labels-idx1-ubyte"),
    );
    let json = s.p("idx.json");
    let text = ok(&[
        "predict", "-q", &exp, "--input", &images, "--labels", &labels, "--path", "dense",
        "--json", &json,
    ]);
    assert!(
        text.contains(&format!("top-1 accuracy {acc}% on 48 labelled images")),
        "{text}\n{eval}"
    );
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let idx_p = probabilities(&idx);
    assert_eq!(idx_p.len(), 48);
    assert!(idx_p
        .iter()
        .all(|p| (p.iter().sum::<f64>() - 1.0).abs() < 1e-5 && p.len() == 4));
    // The same pixels as PNG images and as arrays.
    let raw = std::fs::read(s.dir.path().join("data/t10k-images-idx3-ubyte")).unwrap();
    let pixels = &raw[16..];
    png_gray(&s.dir.path().join("a.png"), 8, 8, &pixels[..64]);
    png_gray(&s.dir.path().join("b.png"), 8, 8, &pixels[64..128]);
    npy(&s.dir.path().join("u8.npy"), &[48, 8, 8], pixels);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("export/model.json")).unwrap())
            .unwrap();
    let (mean, std) = (
        m["preprocessing"]["mean"][0].as_f64().unwrap() as f32,
        m["preprocessing"]["std"][0].as_f64().unwrap() as f32,
    );
    let normalised: Vec<f32> = pixels
        .iter()
        .map(|&v| (v as f32 / 255.0 - mean) / std)
        .collect();
    npy(&s.dir.path().join("f32.npy"), &[48, 1, 8, 8], &normalised);
    for (inputs, normalized) in [
        (vec![s.p("a.png"), s.p("b.png")], false),
        (vec![s.p("u8.npy")], false),
        (vec![s.p("f32.npy")], true),
    ] {
        let json = s.p("other.json");
        let mut args = vec!["predict", "-q", &exp, "--path", "dense", "--json", &json];
        args.push("--input");
        args.extend(inputs.iter().map(String::as_str));
        if normalized {
            args.push("--normalized");
        }
        ok(&args);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let got = probabilities(&v);
        for (i, (a, b)) in got.iter().zip(&idx_p).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{inputs:?} image {i}: {a:?} vs {b:?}");
            }
        }
    }
    // The packed path gives the same top-1 classes.
    let packed = ok(&[
        "predict", "-q", &exp, "--input", &images, "--labels", &labels,
    ]);
    assert!(packed.contains("top-1 accuracy"), "{packed}");
    // Bad inputs.
    png_gray(&s.dir.path().join("big.png"), 9, 8, &[0; 72]);
    let e = err(&["predict", &exp, "--input", &s.p("big.png")]);
    assert!(e.contains("9x8") && e.contains("8x8"), "{e}");
    npy(&s.dir.path().join("bad.npy"), &[2, 3, 8, 8], &[0.5f32; 384]);
    let e = err(&["predict", &exp, "--input", &s.p("bad.npy")]);
    assert!(e.contains("[2, 3, 8, 8]"), "{e}");
    npy(&s.dir.path().join("nan.npy"), &[1, 8, 8], &[f32::NAN; 64]);
    let e = err(&["predict", &exp, "--input", &s.p("nan.npy")]);
    assert!(e.contains("non-finite"), "{e}");
    let e = err(&[
        "predict",
        &exp,
        "--input",
        &images,
        "--labels",
        &s.p("a.png"),
    ]);
    assert!(e.contains("a.png"), "{e}");
    let e = err(&["predict", &exp, "--input", &s.p("nowhere.npy")]);
    assert!(e.contains("nowhere.npy"), "{e}");
}

/// The one-line summary says how many layers carry the method's structure, and every sparse
/// layer left without it is printed with the reason (here DSB's first conv, 1 input channel).
#[test]
fn train_names_the_layers_left_unstructured() {
    let s = Setup::new();
    let out = succeeded(&s.train(
        "d",
        &["--method", "dsb", "--block", "4", "--sparsity", "0.95"],
    ));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("d/results.json")).unwrap())
            .unwrap();
    let layers = r["layers"].as_array().unwrap();
    let sparse = layers.iter().filter(|l| l["pattern"] != "dense").count();
    let blocked = layers
        .iter()
        .filter(|l| l["pattern"] == "shuffled-block")
        .count();
    assert!(blocked > 0 && blocked < sparse, "{r}");
    assert!(
        out.contains(&format!("(shuffled-block: {blocked} of {sparse} layers)")),
        "{out}"
    );
    assert!(
        out.contains("conv1.weight: unstructured (DSB blocks convolutions"),
        "{out}"
    );
    // Two validated epochs: the best one is reported beside the last.
    let best = &r["stages"][0]["best"];
    assert!(best["epoch"].as_u64().unwrap() < 2, "{r}");
    assert!(out.contains("best by validation: epoch"), "{out}");
}
