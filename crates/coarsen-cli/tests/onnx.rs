//! `coarsen export --onnx` against ONNX Runtime: for every model family coarsen trains and every
//! pattern, the real binary exports a network (random weights, random BatchNorm statistics,
//! masks made by `coarsen prune` and `coarsen convert`), `coarsen bench --serve` computes its
//! logits on real Fashion-MNIST test images on the packed kernels, and ONNX Runtime must give
//! the same logits within 1e-4 (relative to the largest logit).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use coarsen_train::model::{Model, ModelSpec, ParamKind};
use rand::{Rng, SeedableRng};

mod common;
use common::{ok, python};

/// (family, width): narrower VGG and ResNet keep the debug binary quick.
const FAMILIES: [(&str, f64); 6] = [
    ("mlp", 1.0),
    ("cnn", 1.0),
    ("vgg11", 0.25),
    ("vgg16", 0.25),
    ("resnet20", 0.5),
    ("resnet18", 0.25),
];

/// (label, `coarsen convert` arguments; empty: the pruned mask itself, `None`: no mask).
const PATTERNS: [(&str, Option<&[&str]>); 7] = [
    ("dense", None),
    ("unstructured", Some(&[])),
    ("channel", Some(&["--to", "channel"])),
    ("group", Some(&["--to", "group", "--parts", "auto"])),
    (
        "shuffled-block",
        Some(&["--to", "shuffled-block", "--block", "4"]),
    ),
    ("block", Some(&["--to", "block", "--block", "4x4"])),
    ("nm", Some(&["--to", "nm"])),
];

const IMAGES: usize = 16;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Weights of `family` with random biases and BatchNorm statistics (so that BatchNorm matters
/// and removed channels are non-zero constants).
fn weights(family: &str, width: f64, path: &Path) -> Model {
    let spec = ModelSpec {
        name: family.into(),
        width,
        input: [1, 28, 28],
        classes: 10,
    };
    let model = Model::new(&spec, 3).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for prm in model.params.iter().filter(|p| p.kind == ParamKind::Other) {
        let v = prm
            .values()
            .unwrap()
            .iter()
            .map(|_| rng.random_range(-0.5f32..1.0))
            .collect();
        prm.set_values(v).unwrap();
    }
    for b in &model.buffers {
        let var = b.name.ends_with("running_var");
        let mut v = b.values.lock().unwrap();
        v.iter_mut().for_each(|x| {
            *x = if var {
                rng.random_range(0.5f32..2.0)
            } else {
                rng.random_range(-0.5f32..0.5)
            }
        });
    }
    coarsen_train::train::save_tensors(path, &model.state().unwrap()).unwrap();
    model
}

/// The first test images of the installed Fashion-MNIST, normalised, as an NCHW `.npy`.
fn images(path: &Path) {
    let data = coarsen_train::data::load(Path::new(coarsen_train::data::DEFAULT_DATA_DIR), 0)
        .expect("Fashion-MNIST is installed (scripts/test and .ci/run install it)");
    // One channel: channel-major [1, N, 28, 28] is NCHW already.
    let x = &data.test.pixels[..IMAGES * 28 * 28];
    let mut buf = Vec::new();
    {
        use npyz::WriterBuilder;
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[IMAGES as u64, 1, 28, 28])
            .writer(&mut buf)
            .begin_nd()
            .unwrap();
        w.extend(x.iter().copied()).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(path, buf).unwrap();
}

/// The packed engine's logits of `export` on `input`, by `coarsen bench --serve`.
fn coarsen_logits(export: &Path, input: &Path, out: &Path) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coarsen"))
        .args([
            "bench",
            "--serve",
            &p(export),
            "--path",
            "packed",
            "--input",
            &p(input),
            "--logits-out",
            &p(out),
            "--threads",
            "2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"run 1\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bench --serve {}: {}",
        export.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let ready: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(ready["ready"], true, "{text}");
    // The pass's multiply-adds, the FMA peak and the Winograd layers (bench-peers' roof).
    assert!(ready["macs"].as_u64().unwrap() > 0, "{text}");
    let peak = ready["fma_peak_gflops"].as_f64().unwrap();
    assert!(peak.is_finite() && peak > 0.0, "{text}");
    assert!(ready["winograd_layers"].as_u64().is_some(), "{text}");
    assert!(lines.next().unwrap().contains("times_ms"), "{text}");
}

#[test]
fn onnx_runtime_computes_what_coarsen_computes_for_every_family_and_pattern() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("images.npy");
    images(&x);
    let mut cases = Vec::new();
    for (family, width) in FAMILIES {
        let fdir = dir.path().join(family);
        std::fs::create_dir_all(&fdir).unwrap();
        let w = fdir.join("weights.safetensors");
        let model = weights(family, width, &w);
        let prunable = model.default_prunable();
        let include = format!(
            "^({})$",
            prunable
                .iter()
                .map(|n| n.replace('.', "\\."))
                .collect::<Vec<_>>()
                .join("|")
        );
        let pruned = fdir.join("pruned.safetensors");
        ok(&[
            "prune",
            "-q",
            "--weights",
            &p(&w),
            "--sparsity",
            "0.75",
            "--scope",
            "layer",
            "--include",
            &include,
            "--out",
            &p(&pruned),
        ]);
        for (k, (pattern, convert)) in PATTERNS.iter().enumerate() {
            let mask: Option<PathBuf> = match convert {
                None => None,
                Some([]) => Some(pruned.clone()),
                Some(args) => {
                    let m = fdir.join(format!("{pattern}.safetensors"));
                    let mut a = vec!["convert", "-q", "--weights"];
                    let (ws, ps, ms) = (p(&w), p(&pruned), p(&m));
                    a.extend([ws.as_str(), "--mask", ps.as_str(), "--out", ms.as_str()]);
                    a.extend(args.iter());
                    ok(&a);
                    Some(m)
                }
            };
            let out = fdir.join(pattern);
            let (ws, os, width) = (p(&w), p(&out), width.to_string());
            let mut a = vec![
                "export",
                "-q",
                "--model",
                family,
                "--weights",
                &ws,
                "--input",
                "1,28,28",
                "--width",
                &width,
                "--out",
                &os,
                "--onnx",
            ];
            let ms = mask.as_deref().map(p);
            if let Some(m) = &ms {
                a.extend(["--mask", m.as_str()]);
            }
            // Half the cases fold BatchNorm into the convolutions.
            if k % 2 == 1 {
                a.push("--fold-bn");
            }
            ok(&a);
            let logits = out.join("coarsen-logits.npy");
            coarsen_logits(&out, &x, &logits);
            cases.push(serde_json::json!({
                "label": format!("{family} {pattern}{}", if k % 2 == 1 { " (BatchNorm folded)" } else { "" }),
                "onnx": p(&out.join("model.onnx")),
                "input": p(&x),
                "logits": p(&logits),
            }));
        }
    }
    let list = dir.path().join("cases.json");
    std::fs::write(&list, serde_json::to_vec(&cases).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_check.py");
    let out = Command::new(&py).arg(&script).arg(&list).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ONNX Runtime differs from coarsen:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert_eq!(
        report.lines().count(),
        FAMILIES.len() * PATTERNS.len(),
        "{report}"
    );
}
