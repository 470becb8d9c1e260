//! Integration tests: the real `coarsen` binary on real safetensors files.

use std::path::{Path, PathBuf};

use coarsen_core::patterns::check;
use coarsen_core::{
    LayerStatus, Mask, MaskFile, MaskTensor, MatrixView, Pattern, WeightFile, WeightTensor,
};

mod common;
use common::{coarsen, ok};

/// Runs a command that must fail: non-zero exit, a one-line error holding every `needle`, and no
/// file at `out`.
fn fails(args: &[&str], needles: &[&str], out: &Path) {
    let res = coarsen(args);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "coarsen {args:?} should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error lacks {n:?}: {}", lines[0]);
    }
    assert!(
        !out.exists(),
        "{} must not exist after a failure",
        out.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A small network: two convs, a linear layer and a bias, plus a 70%-sparse mask.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture { dir };
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let tensors = vec![
            WeightTensor::new(
                "conv1.weight",
                vec![32, 8, 3, 3],
                (0..2304).map(val).collect(),
            )
            .unwrap(),
            WeightTensor::new(
                "conv2.weight",
                vec![48, 32, 3, 3],
                (0..13824).map(|i| val(i + 3)).collect(),
            )
            .unwrap(),
            WeightTensor::new(
                "fc.weight",
                vec![10, 48],
                (0..480).map(|i| val(i + 5)).collect(),
            )
            .unwrap(),
            WeightTensor::new("fc.bias", vec![10], vec![0.1; 10]).unwrap(),
        ];
        WeightFile::write_f32(f.path("w.safetensors"), &tensors).unwrap();
        ok(&[
            "prune",
            "--weights",
            f.s("w.safetensors"),
            "--sparsity",
            "0.7",
            "--out",
            f.s("m.safetensors"),
        ]);
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> &str {
        // Leaked once per call in tests only: keeps the argument lists short.
        Box::leak(
            self.path(name)
                .to_string_lossy()
                .into_owned()
                .into_boxed_str(),
        )
    }

    fn write_masks(&self, name: &str, tensors: Vec<MaskTensor>) {
        MaskFile::new(name, tensors).write(self.path(name)).unwrap();
    }

    /// The channel conversion of the fixture's mask, written to `out` with the first kept row
    /// of conv2.weight losing its first entry while the metadata still calls it structured.
    fn broken_channel_mask(&self, out: &str) {
        ok(&[
            "convert",
            "-q",
            "--mask",
            self.s("m.safetensors"),
            "--to",
            "channel",
            "--out",
            self.s("c.safetensors"),
        ]);
        let mut masks = MaskFile::read(self.path("c.safetensors")).unwrap();
        let meta = masks.metadata.take();
        let mut tensors = masks.tensors().to_vec();
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "conv2.weight")
            .unwrap();
        let row = t.data.iter().position(|&b| b == 1).unwrap() / 288;
        t.data[row * 288] = 0;
        let mut broken = MaskFile::new(out, tensors);
        broken.metadata = meta;
        broken.write(self.path(out)).unwrap();
    }
}

fn verify(masks: &MaskFile) {
    let meta = masks
        .metadata
        .as_ref()
        .expect("structured masks carry metadata");
    let pattern = Pattern::from_metadata(&meta.pattern, &meta.params).unwrap();
    for t in masks.tensors() {
        let Some(layer) = meta.layers.get(&t.name) else {
            continue;
        };
        if layer.status == LayerStatus::Unstructured {
            assert!(layer.reason.is_some());
            continue;
        }
        let v = MatrixView::of(&t.shape).unwrap();
        let m = Mask::from_bytes(v.rows, v.cols, t.data.clone()).unwrap();
        check(
            &pattern,
            &m,
            v,
            pattern.max_row_patterns(v.rows),
            layer.col_perm.as_deref(),
        )
        .unwrap_or_else(|e| panic!("{} violates {}: {e}", t.name, meta.pattern));
    }
}

#[test]
fn prune_writes_the_target_sparsity() {
    let f = Fixture::new();
    let m = MaskFile::read(f.path("m.safetensors")).unwrap();
    assert_eq!(m.tensors().len(), 3, "the rank-1 bias is not a layer");
    let (ones, all) = m.tensors().iter().fold((0, 0), |(o, a), t| {
        (
            o + t.data.iter().filter(|&&b| b == 1).count(),
            a + t.data.len(),
        )
    });
    assert_eq!(all - ones, (0.7 * all as f64).round() as usize);
    // Pruning further from that mask.
    ok(&[
        "prune",
        "--weights",
        f.s("w.safetensors"),
        "--mask",
        f.s("m.safetensors"),
        "--sparsity",
        "0.8",
        "--scope",
        "layer",
        "--out",
        f.s("m2.safetensors"),
    ]);
    let m2 = MaskFile::read(f.path("m2.safetensors")).unwrap();
    for (a, b) in m.tensors().iter().zip(m2.tensors()) {
        assert!(
            a.data.iter().zip(&b.data).all(|(&x, &y)| y <= x),
            "pruned weights stay pruned"
        );
    }
}

#[test]
fn kernel_masks_convert_to_blocks_of_whole_kernels() {
    let f = Fixture::new();
    ok(&[
        "prune",
        "--weights",
        f.s("w.safetensors"),
        "--sparsity",
        "0.75",
        "--scope",
        "layer",
        "--granularity",
        "kernel",
        "--out",
        f.s("k.safetensors"),
    ]);
    let whole = |m: &MaskFile| {
        for t in m.tensors() {
            let taps: usize = t.shape.get(2..).map_or(1, |k| k.iter().product());
            for k in t.data.chunks(taps) {
                assert!(
                    k.iter().all(|&b| b == k[0]),
                    "{}: a kernel cut apart",
                    t.name
                );
            }
        }
    };
    let k = MaskFile::read(f.path("k.safetensors")).unwrap();
    whole(&k);
    for t in k.tensors() {
        let taps: usize = t.shape.get(2..).map_or(1, |k| k.iter().product());
        let kept = t.data.chunks(taps).filter(|c| c[0] == 1).count();
        let all = t.data.len() / taps;
        assert_eq!(
            kept,
            all - (0.75 * all as f64).round() as usize,
            "{}",
            t.name
        );
    }
    for (to, extra) in [("group", "--parts=auto"), ("shuffled-block", "--block=4")] {
        let out = f.s(&format!("k-{to}.safetensors"));
        ok(&[
            "convert",
            "-q",
            "--weights",
            f.s("w.safetensors"),
            "--mask",
            f.s("k.safetensors"),
            "--to",
            to,
            extra,
            "--kernels",
            "--out",
            out,
        ]);
        let m = MaskFile::read(out).unwrap();
        verify(&m);
        whole(&m);
        let meta = m.metadata.as_ref().unwrap();
        assert_eq!(meta.params["kernels"], true, "{to}: the metadata says so");
    }
    fails(
        &[
            "convert",
            "--mask",
            f.s("k.safetensors"),
            "--to",
            "channel",
            "--kernels",
            "--out",
            f.s("k-bad.safetensors"),
        ],
        &["--kernels applies to --to group|shuffled-block"],
        &f.path("k-bad.safetensors"),
    );
    fails(
        &[
            "convert",
            "--mask",
            f.s("k.safetensors"),
            "--to",
            "group",
            "--kernels",
            "--target-density",
            "0.3",
            "--out",
            f.s("k-bad.safetensors"),
        ],
        &["kernels", "density target"],
        &f.path("k-bad.safetensors"),
    );
}

#[test]
fn every_pattern_converts_verifies_and_inspects() {
    let f = Fixture::new();
    let cases: &[(&str, &[&str])] = &[
        ("channel", &[]),
        ("channel+", &["--extra", "0.2"]),
        ("channel", &["--criterion", "count"]),
        (
            "group",
            &["--parts", "auto", "--min-rows", "4", "--row-tile", "8"],
        ),
        ("group", &["--partitioner", "random", "--fallback", "dense"]),
        ("group", &["--legacy-regroup"]),
        ("shuffled-block", &["--block", "8"]),
        ("shuffled-block", &["--block", "8", "--similarity", "0.3"]),
        ("block", &["--block", "4x8"]),
        ("nm", &["--permute"]),
        ("nm", &["--n", "1", "--m", "3"]),
        ("nm", &["--fill"]),
    ];
    for (i, (to, extra)) in cases.iter().enumerate() {
        let out = f.s(&format!("out{i}.safetensors"));
        let report = f.s(&format!("out{i}.json"));
        let mut args = vec![
            "convert",
            "--weights",
            f.s("w.safetensors"),
            "--mask",
            f.s("m.safetensors"),
            "--to",
            to,
            "--out",
            out,
            "--report",
            report,
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        let table = ok(&args);
        assert!(table.contains("total"), "{table}");
        let masks = MaskFile::read(out).unwrap();
        assert_eq!(masks.metadata.as_ref().unwrap().pattern, *to);
        verify(&masks);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        assert_eq!(json["layers"].as_array().unwrap().len(), 3);
        assert!(json["total"]["recall"].as_f64().unwrap() > 0.0);
        // The mask file's sparsity by the one definition: every layer here is selected.
        let prunable = json["sparsity"]["prunable"].as_f64().unwrap();
        let out_density = json["total"]["density_out"].as_f64().unwrap();
        assert!((prunable - (1.0 - out_density)).abs() < 1e-9, "{json}");
        assert_eq!(json["sparsity"]["all_weights"], 2304 + 13824 + 480);
        assert!(
            table.contains(&format!(
                "sparsity {:.2}% of the prunable layers",
                100.0 * prunable
            )),
            "{table}"
        );
        assert!(json["total"]["retained_magnitude"].as_f64().is_some());
        // Beside it, the pattern's naive baseline at the same density, per layer and in total.
        assert!(json["baseline"].as_str().is_some(), "{json}");
        assert!(table.contains("base."), "{table}");
        let structured = json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["status"] == "structured");
        if structured {
            let base = json["total"]["baseline_magnitude"].as_f64().unwrap();
            assert!(base > 0.0 && base.is_finite(), "{json}");
        }
        if extra == &["--fill"] {
            // Every group of 4 holds exactly 2: half the weights.
            assert_eq!(
                json["total"]["density_out"].as_f64().unwrap(),
                0.5,
                "{json}"
            );
        }
        let pngs = f.path(&format!("png{i}"));
        let listing = ok(&[
            "inspect",
            out,
            "--weights",
            f.s("w.safetensors"),
            "--before",
            f.s("m.safetensors"),
            "--png",
            pngs.to_str().unwrap(),
        ]);
        assert!(listing.contains("conv2.weight"), "{listing}");
        assert!(!listing.contains("VIOLATED"), "{listing}");
        assert!(pngs.join("conv2.weight.png").exists());
    }
}

#[test]
fn target_density_is_reached_inside_the_structure() {
    let f = Fixture::new();
    // The fixture's mask is at 0.3; every pattern moves to 0.2 per layer (within one point where
    // the structure's units allow, with a note where they do not) or 0.2 for all layers.
    for (i, (to, extra)) in [
        ("channel", &[][..]),
        (
            "group",
            &["--parts", "auto", "--min-rows", "4", "--row-tile", "8"][..],
        ),
        ("shuffled-block", &["--block", "8"][..]),
        ("block", &["--block", "4x8"][..]),
        ("nm", &[][..]),
    ]
    .iter()
    .enumerate()
    {
        for scope in ["layer", "global"] {
            let out = f.s(&format!("t{i}{scope}.safetensors"));
            let report = f.s(&format!("t{i}{scope}.json"));
            let mut args = vec![
                "convert",
                "--weights",
                f.s("w.safetensors"),
                "--mask",
                f.s("m.safetensors"),
                "--to",
                to,
                "--out",
                out,
                "--report",
                report,
                "--target-density",
                "0.2",
                "--target-scope",
                scope,
            ];
            args.extend_from_slice(extra);
            let table = ok(&args);
            assert!(
                table.contains(&format!("target density 0.2 ({scope})")),
                "{table}"
            );
            let masks = MaskFile::read(out).unwrap();
            verify(&masks);
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
            assert_eq!(json["target"]["density"], 0.2, "{json}");
            let reached = json["target"]["reached"].as_f64().unwrap();
            if scope == "global" {
                assert!((reached - 0.2).abs() <= 0.01, "{to}: {json}");
            }
            for l in json["layers"].as_array().unwrap() {
                let d = l["density_out"].as_f64().unwrap();
                let noted = l.get("target_note").is_some();
                if scope == "layer" && l["status"] != "unstructured" {
                    assert!(
                        (d - 0.2).abs() <= 0.01 || noted,
                        "{to} {}: {d} without a note",
                        l["name"]
                    );
                    if noted {
                        assert!(
                            table.contains(l["target_note"].as_str().unwrap()),
                            "{table}"
                        );
                    }
                }
            }
        }
    }
    // The big conv layers have small units: they must reach it.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.path("t0layer.json")).unwrap()).unwrap();
    let conv2 = &json["layers"][1];
    assert_eq!(conv2["name"], "conv2.weight");
    assert!(
        (conv2["density_out"].as_f64().unwrap() - 0.2).abs() <= 0.01,
        "{json}"
    );
    // A density outside (0, 1] is refused before anything is read or written.
    let out = f.path("bad.safetensors");
    fails(
        &[
            "convert",
            "--mask",
            f.s("m.safetensors"),
            "--to",
            "channel",
            "--out",
            out.to_str().unwrap(),
            "--target-density",
            "1.5",
        ],
        &["--target-density", "1.5"],
        &out,
    );
}

#[test]
fn nm_fill_needs_weights() {
    let f = Fixture::new();
    let out = f.path("fill.safetensors");
    fails(
        &[
            "convert",
            "--mask",
            f.s("m.safetensors"),
            "--to",
            "nm",
            "--fill",
            "--out",
            out.to_str().unwrap(),
        ],
        &["--fill", "needs the weights"],
        &out,
    );
}

#[test]
fn conversion_is_deterministic_for_a_seed() {
    let f = Fixture::new();
    for to in ["group", "shuffled-block", "nm"] {
        let run = |name: &str| {
            let mut args = vec![
                "convert",
                "--weights",
                f.s("w.safetensors"),
                "--mask",
                f.s("m.safetensors"),
                "--to",
                to,
                "--out",
                f.s(name),
                "--seed",
                "11",
            ];
            if to == "nm" {
                args.push("--permute");
            }
            ok(&args);
            std::fs::read(f.path(name)).unwrap()
        };
        assert_eq!(run("a.safetensors"), run("b.safetensors"), "{to}");
    }
}

#[test]
fn inspect_catches_a_mask_that_breaks_its_pattern() {
    let f = Fixture::new();
    f.broken_channel_mask("t.safetensors");
    let listing = ok(&["inspect", f.s("t.safetensors")]);
    assert!(listing.contains("VIOLATED"), "{listing}");
}

#[test]
fn missing_file() {
    let f = Fixture::new();
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--mask",
            f.s("nope.safetensors"),
            "--to",
            "group",
            "--out",
            out.to_str().unwrap(),
        ],
        &["nope.safetensors", "No such file"],
        &out,
    );
}

#[test]
fn not_a_safetensors_file() {
    let f = Fixture::new();
    std::fs::write(
        f.path("junk.safetensors"),
        b"this is not a tensor file at all",
    )
    .unwrap();
    let out = f.path("o.safetensors");
    fails(
        &[
            "prune",
            "--weights",
            f.s("junk.safetensors"),
            "--sparsity",
            "0.5",
            "--out",
            out.to_str().unwrap(),
        ],
        &["junk.safetensors", "not a valid safetensors file"],
        &out,
    );
}

#[test]
fn truncated_file() {
    let f = Fixture::new();
    let bytes = std::fs::read(f.path("w.safetensors")).unwrap();
    std::fs::write(f.path("cut.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--weights",
            f.s("cut.safetensors"),
            "--mask",
            f.s("m.safetensors"),
            "--to",
            "nm",
            "--out",
            out.to_str().unwrap(),
        ],
        &["cut.safetensors", "truncated"],
        &out,
    );
}

#[test]
fn mask_names_must_match_the_weights() {
    let f = Fixture::new();
    f.write_masks(
        "odd.safetensors",
        vec![MaskTensor {
            name: "conv9.weight".into(),
            shape: vec![4, 4],
            data: vec![1; 16],
        }],
    );
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--weights",
            f.s("w.safetensors"),
            "--mask",
            f.s("odd.safetensors"),
            "--to",
            "channel",
            "--out",
            out.to_str().unwrap(),
        ],
        &["w.safetensors", "conv9.weight", "[4, 4]", "odd.safetensors"],
        &out,
    );
}

#[test]
fn mask_shapes_must_match_the_weights() {
    let f = Fixture::new();
    f.write_masks(
        "shape.safetensors",
        vec![MaskTensor {
            name: "fc.weight".into(),
            shape: vec![48, 10],
            data: vec![1; 480],
        }],
    );
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--weights",
            f.s("w.safetensors"),
            "--mask",
            f.s("shape.safetensors"),
            "--to",
            "block",
            "--out",
            out.to_str().unwrap(),
        ],
        &["fc.weight", "[48, 10]", "[10, 48]"],
        &out,
    );
}

#[test]
fn nan_and_inf_weights_are_refused() {
    let f = Fixture::new();
    for (name, bad) in [
        ("nan.safetensors", f32::NAN),
        ("inf.safetensors", f32::INFINITY),
    ] {
        let mut values = vec![0.5f32; 480];
        values[123] = bad;
        WeightFile::write_f32(
            f.path(name),
            &[WeightTensor::new("fc.weight", vec![10, 48], values).unwrap()],
        )
        .unwrap();
        let out = f.path("o.safetensors");
        fails(
            &[
                "prune",
                "--weights",
                f.s(name),
                "--sparsity",
                "0.5",
                "--out",
                out.to_str().unwrap(),
            ],
            &[name, "fc.weight", "[10, 48]", "non-finite", "123"],
            &out,
        );
    }
}

#[test]
fn empty_selection() {
    let f = Fixture::new();
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--mask",
            f.s("m.safetensors"),
            "--to",
            "group",
            "--include",
            "^attention",
            "--out",
            out.to_str().unwrap(),
        ],
        &["m.safetensors", "no layer selected", "^attention"],
        &out,
    );
}

#[test]
fn all_zero_mask() {
    let f = Fixture::new();
    f.write_masks(
        "zero.safetensors",
        vec![MaskTensor {
            name: "fc.weight".into(),
            shape: vec![10, 48],
            data: vec![0; 480],
        }],
    );
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--weights",
            f.s("w.safetensors"),
            "--mask",
            f.s("zero.safetensors"),
            "--to",
            "shuffled-block",
            "--out",
            out.to_str().unwrap(),
        ],
        &["zero.safetensors", "fc.weight", "[10, 48]", "all zeros"],
        &out,
    );
}

#[test]
fn sparsity_zero_and_one() {
    let f = Fixture::new();
    let out = f.path("o.safetensors");
    for s in ["0", "1", "1.5"] {
        fails(
            &[
                "prune",
                "--weights",
                f.s("w.safetensors"),
                "--sparsity",
                s,
                "--out",
                out.to_str().unwrap(),
            ],
            &["--sparsity", "strictly between 0 and 1"],
            &out,
        );
    }
}

#[test]
fn options_of_another_pattern_are_refused() {
    let f = Fixture::new();
    let out = f.path("o.safetensors");
    fails(
        &[
            "convert",
            "--mask",
            f.s("m.safetensors"),
            "--to",
            "channel",
            "--parts",
            "4",
            "--out",
            out.to_str().unwrap(),
        ],
        &["--parts applies to --to group"],
        &out,
    );
}

#[test]
fn output_directory_must_exist() {
    let f = Fixture::new();
    let out = f.path("no/such/dir/o.safetensors");
    let res = coarsen(&[
        "convert",
        "--mask",
        f.s("m.safetensors"),
        "--to",
        "group",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("does not exist"));
}

#[test]
fn synth_and_demo_write_their_outputs() {
    let f = Fixture::new();
    let listing = ok(&[
        "synth",
        "--model",
        "resnet20",
        "--out",
        f.s("r20.safetensors"),
        "--seed",
        "4",
    ]);
    assert!(listing.contains("resnet20"));
    let w = WeightFile::read(f.path("r20.safetensors")).unwrap();
    assert_eq!(
        w.get("layer3.2.conv2.weight").unwrap().shape,
        vec![64, 64, 3, 3]
    );
    let dir = f.path("demo");
    let report = ok(&[
        "demo",
        "--synthetic",
        "--model",
        "resnet20",
        "--out",
        dir.to_str().unwrap(),
        "--sparsity",
        "0.7",
    ]);
    assert!(report.contains("| nm-permute |"), "{report}");
    assert!(dir.join("report.md").exists());
    assert!(dir.join("pictures/group.png").exists());
    verify(&MaskFile::read(dir.join("shuffled-block.safetensors")).unwrap());
}

#[test]
fn bench_profile_times_every_layer_of_both_paths() {
    let f = Fixture::new();
    ok(&[
        "synth",
        "--model",
        "resnet20",
        "--out",
        f.s("w.safetensors"),
    ]);
    ok(&[
        "export",
        "-q",
        "--model",
        "resnet20",
        "--weights",
        f.s("w.safetensors"),
        "--out",
        f.s("export"),
    ]);
    let json = f.path("bench.json");
    let out = ok(&[
        "bench",
        "--model",
        f.s("export"),
        "--profile",
        "--batch",
        "2",
        "--reps",
        "1",
        "--threads",
        "2",
        "-q",
        "--json",
        json.to_str().unwrap(),
    ]);
    for path in ["dense", "packed"] {
        assert!(out.contains(&format!("{path} path, batch 2")), "{out}");
    }
    // Every conv of the network, in both profiles, with its kernel.
    let w = WeightFile::read(f.path("w.safetensors")).unwrap();
    let convs: Vec<&str> = w
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.ends_with("conv1.weight") || n.ends_with("conv2.weight"))
        .collect();
    assert!(convs.len() >= 18, "{convs:?}");
    for c in convs {
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{c} ")))
            .collect();
        assert_eq!(lines.len(), 2, "{c}: {out}");
    }
    assert!(
        out.contains("implicit gemm") || out.contains("im2col"),
        "{out}"
    );
    let records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let steps = records[0]["profile"]["dense"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["macs"].as_u64().unwrap() > 0));
    // Each path's roof at the FMA peak measured in the run, the peak in the JSON too.
    let peak = records[0]["profile"]["fma_peak_gflops"].as_f64().unwrap();
    assert!(peak.is_finite() && peak > 0.0, "{peak}");
    let roofs: Vec<&str> = out.lines().filter(|l| l.starts_with("roof: ")).collect();
    assert_eq!(roofs.len(), 2, "{out}");
    assert!(
        roofs
            .iter()
            .all(|l| l.contains(&format!("({peak:.1} GFLOP/s on 2 thread(s)"))),
        "{out}"
    );
    assert!(out.contains("of peak"), "{out}");
    // Profiling, patterns and sparsities need a network.
    for flag in [
        &["--profile"][..],
        &["--pattern", "group"],
        &["--sparsity", "0.5"],
    ] {
        let mut a = vec!["bench", "--shape", "4,4,4", "-q"];
        a.extend(flag);
        let res = coarsen(&a);
        assert!(!res.status.success(), "{flag:?}");
        assert!(
            String::from_utf8_lossy(&res.stderr).contains("goes with --model"),
            "{flag:?}"
        );
    }
}

#[test]
fn bench_bf16_runs_the_block_layers_in_bfloat16_where_the_cpu_has_it() {
    let f = Fixture::new();
    let json = f.path("bench.json");
    let out = ok(&[
        "bench",
        "--model",
        "resnet20",
        "--pattern",
        "group",
        "--bf16",
        "--profile",
        "--tuning",
        "packed",
        "--batch",
        "2",
        "--reps",
        "1",
        "--threads",
        "2",
        "-q",
        "--json",
        json.to_str().unwrap(),
    ]);
    let rounded = out.lines().filter(|l| l.contains(", bf16 ")).count();
    let records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let diff = records[0]["max_abs_diff"].as_f64().unwrap();
    if coarsen_kernels::BlockConv::bf16_available() {
        // ResNet-20's 3×3 layers but the first, in groups: each in bfloat16, whose rounding
        // shows in the packed path's logits (and stays small).
        assert!(rounded >= 17, "{out}");
        assert!(diff > 0.0 && diff < 0.1, "{diff}");
    } else {
        assert_eq!(rounded, 0, "{out}");
    }
}

#[test]
fn bench_shapes_and_mask_layers_with_json() {
    let f = Fixture::new();
    let json = f.path("bench.json");
    let table = ok(&[
        "bench",
        "--shape",
        "64,96,200",
        "--shape",
        "33,40,17",
        "--formats",
        "group,shuffled-block:8,bsr:8x8,channel,nm,csr",
        "--density",
        "0.5",
        "--budget",
        "0.01",
        "--threads",
        "2",
        "--json",
        json.to_str().unwrap(),
        "-q",
    ]);
    assert!(
        table.contains("measured FMA peak") && table.contains("per format"),
        "{table}"
    );
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let list = records.as_array().unwrap();
    assert_eq!(list.len(), 12);
    for r in list {
        for key in [
            "format",
            "shape",
            "density",
            "dense_ms",
            "sparse_ms",
            "speedup",
            "ideal",
            "fraction_of_ideal",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        let ratio = r["speedup"].as_f64().unwrap() / r["ideal"].as_f64().unwrap();
        assert!((ratio - r["fraction_of_ideal"].as_f64().unwrap()).abs() < 1e-9);
    }
    // Every layer of a structured mask file, at its real shape, beside CSR.
    ok(&[
        "convert",
        "--weights",
        f.s("w.safetensors"),
        "--mask",
        f.s("m.safetensors"),
        "--to",
        "shuffled-block",
        "--block",
        "8",
        "--out",
        f.s("sb.safetensors"),
    ]);
    let table = ok(&[
        "bench",
        "--mask",
        f.s("sb.safetensors"),
        "--weights",
        f.s("w.safetensors"),
        "--n",
        "64",
        "--budget",
        "0.01",
        "-q",
    ]);
    assert!(
        table.contains("shuffled-block:8") && table.contains("conv2") && table.contains("csr"),
        "{table}"
    );
    let res = coarsen(&["bench", "--shape", "4,4", "-q"]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("expected three positive sizes"));
}

#[test]
fn help_for_every_subcommand() {
    for sub in [
        "prune", "convert", "inspect", "bench", "synth", "demo", "train", "eval", "export",
        "predict",
    ] {
        let text = ok(&[sub, "--help"]);
        assert!(text.contains("Usage: coarsen"), "{sub}: {text}");
    }
    assert!(ok(&["convert", "--help"]).contains("--permute"));
}

/// Rewrites the coarsen metadata of a mask file in place, as a careless tool or a hostile
/// file would (coarsen's own writer refuses invalid metadata).
fn rewrite_metadata(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let raw = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let meta = header["__metadata__"]["coarsen"]
        .as_str()
        .unwrap()
        .to_string();
    let mut meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    edit(&mut meta);
    header["__metadata__"]["coarsen"] = serde_json::Value::String(meta.to_string());
    let mut head = serde_json::to_vec(&header).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&raw[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Metadata read from a mask file is validated before anything uses it: a permutation out of
/// range or of the wrong length, a permutation on a layer of another pattern, a layer the file
/// does not hold, are one-line errors naming the file and tensor, and `inspect --png` writes no
/// picture (it panicked on an index out of bounds and left PNGs behind).
#[test]
fn malformed_metadata_is_an_error_not_a_panic() {
    let f = Fixture::new();
    ok(&[
        "convert",
        "-q",
        "--mask",
        f.s("m.safetensors"),
        "--to",
        "nm",
        "--permute",
        "--out",
        f.s("nm.safetensors"),
    ]);
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "range",
            Box::new(|m| m["layers"]["conv2.weight"]["col_perm"][0] = 999.into()),
            vec!["conv2.weight", "col_perm is not a permutation"],
        ),
        (
            "length",
            Box::new(|m| {
                m["layers"]["conv2.weight"]["col_perm"] = serde_json::json!([1, 0]);
            }),
            vec![
                "conv2.weight",
                "col_perm has 2 entries for 32 input channels",
            ],
        ),
        (
            "pattern",
            Box::new(|m| m["pattern"] = "channel".into()),
            vec!["malformed coarsen metadata"],
        ),
        (
            "ghost",
            Box::new(|m| {
                let layer = m["layers"]["fc.weight"].clone();
                m["layers"]["ghost\nlayer"] = layer;
            }),
            vec!["ghost\\nlayer", "does not hold"],
        ),
    ];
    for (name, edit, needles) in cases {
        let file = format!("bad-{name}.safetensors");
        std::fs::copy(f.path("nm.safetensors"), f.path(&file)).unwrap();
        rewrite_metadata(&f.path(&file), edit);
        let png = f.path(&format!("png-{name}"));
        let mut needles = needles.clone();
        needles.push(&file);
        fails(
            &["inspect", f.s(&file), "--png", &png.to_string_lossy()],
            &needles,
            &png,
        );
        fails(
            &[
                "convert",
                "--mask",
                f.s(&file),
                "--to",
                "channel",
                "--out",
                f.s("never.safetensors"),
            ],
            &needles,
            &f.path("never.safetensors"),
        );
    }
}

/// An output never replaces an input or another output, nor a symbolic link or a device node;
/// nothing is written and the inputs are intact.
#[test]
fn outputs_never_replace_inputs() {
    let f = Fixture::new();
    let weights = std::fs::read(f.path("w.safetensors")).unwrap();
    let masks = std::fs::read(f.path("m.safetensors")).unwrap();
    let (w, m) = (f.s("w.safetensors"), f.s("m.safetensors"));
    let check = |args: &[&str], needles: &[&str]| {
        let res = coarsen(args);
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{args:?} should fail");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("");
        for n in needles {
            assert!(line.contains(n), "{args:?}: {stderr}");
        }
        assert_eq!(std::fs::read(f.path("w.safetensors")).unwrap(), weights);
        assert_eq!(std::fs::read(f.path("m.safetensors")).unwrap(), masks);
    };
    check(
        &["prune", "--weights", w, "--sparsity", "0.5", "--out", w],
        &["--out", "is also --weights"],
    );
    check(
        &[
            "prune",
            "--weights",
            w,
            "--sparsity",
            "0.8",
            "--mask",
            m,
            "--out",
            m,
        ],
        &["is also --mask"],
    );
    let c = f.s("c.safetensors");
    check(
        &[
            "convert", "--mask", m, "--to", "channel", "--out", c, "--report", c,
        ],
        &["--report", "is also --out"],
    );
    check(
        &[
            "convert",
            "--mask",
            m,
            "--weights",
            w,
            "--to",
            "channel",
            "--out",
            c,
            "--report",
            w,
        ],
        &["is also --weights"],
    );
    // The same file by another spelling.
    let other = format!(
        "{}/./../{}/m.safetensors",
        f.dir.path().display(),
        f.dir.path().file_name().unwrap().to_string_lossy()
    );
    check(
        &["convert", "--mask", m, "--to", "channel", "--out", &other],
        &["is also --mask"],
    );
    std::os::unix::fs::symlink(f.path("elsewhere.safetensors"), f.path("link.safetensors"))
        .unwrap();
    for (out, needle) in [
        (f.s("link.safetensors"), "symbolic link"),
        ("/dev/null", "not a regular file"),
    ] {
        check(
            &["convert", "--mask", m, "--to", "channel", "--out", out],
            &[needle],
        );
    }
    assert!(!f.path("elsewhere.safetensors").exists());
    assert!(!f.path("c.safetensors").exists());
}

/// Inputs that used to run and write something useless, or silently drop data, are errors.
#[test]
fn careless_inputs_are_errors_not_silent_successes() {
    let f = Fixture::new();
    let (w, m) = (f.s("w.safetensors"), f.s("m.safetensors"));
    fails(
        &[
            "prune",
            "--weights",
            w,
            "--sparsity",
            "0.9999999",
            "--out",
            f.s("z.safetensors"),
        ],
        &["--sparsity", "without a single weight"],
        &f.path("z.safetensors"),
    );
    fails(
        &[
            "convert",
            "--mask",
            m,
            "--to",
            "shuffled-block",
            "--blocks",
            "0",
            "--out",
            f.s("z.safetensors"),
        ],
        &["--blocks"],
        &f.path("z.safetensors"),
    );
    fails(
        &[
            "convert",
            "--mask",
            m,
            "--to",
            "shuffled-block",
            "--similarity",
            "1.5",
            "--out",
            f.s("z.safetensors"),
        ],
        &["--similarity", "1.5"],
        &f.path("z.safetensors"),
    );
    // A mask without one of the selected layers of the weights.
    f.write_masks(
        "partial.safetensors",
        MaskFile::read(f.path("m.safetensors"))
            .unwrap()
            .tensors()
            .iter()
            .filter(|t| t.name != "conv2.weight")
            .cloned()
            .collect(),
    );
    fails(
        &[
            "prune",
            "--weights",
            w,
            "--sparsity",
            "0.8",
            "--mask",
            f.s("partial.safetensors"),
            "--out",
            f.s("z.safetensors"),
        ],
        &["conv2.weight", "partial.safetensors"],
        &f.path("z.safetensors"),
    );
    // A header that names a tensor twice (the last one used to win).
    let raw = std::fs::read(f.path("m.safetensors")).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let head = String::from_utf8(raw[8..8 + n].to_vec()).unwrap();
    let entry_start = head.find("\"fc.weight\"").unwrap();
    let entry_end = entry_start + head[entry_start..].find('}').unwrap() + 1;
    let entry = head[entry_start..entry_end].to_string();
    let doubled = head.replacen(&entry, &format!("{entry},{entry}"), 1);
    let mut doubled = doubled.trim_end().to_string();
    while !doubled.len().is_multiple_of(8) {
        doubled.push(' ');
    }
    let mut out = (doubled.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(doubled.as_bytes());
    out.extend_from_slice(&raw[8 + n..]);
    std::fs::write(f.path("dup.safetensors"), out).unwrap();
    fails(
        &["inspect", f.s("dup.safetensors")],
        &["dup.safetensors", "'fc.weight' twice"],
        &f.path("never"),
    );
    for args in [
        vec!["bench", "--n", "0"],
        vec!["bench", "--budget=-1"],
        vec!["bench", "--budget", "NaN"],
        vec!["synth", "--classes", "0", "--out", f.s("z.safetensors")],
    ] {
        let res = coarsen(&args);
        assert_eq!(res.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(
            stderr.contains("error: invalid value"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!f.path("z.safetensors").exists());
}

/// Waits (at most 10 s) until process `pid` has taken SIGINT and SIGTERM over (its main thread
/// blocks them for the thread that `sigwait`s, see `signals.rs`), as `/proc/PID/status` says
/// (`SigBlk`), or has exited.
fn takes_signals(pid: u32) {
    let want = (1u64 << (libc::SIGINT - 1)) | (1u64 << (libc::SIGTERM - 1));
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        match caught {
            Some(bits) if bits & want == want => return,
            // A zombie (exited, not yet reaped) has no mask left.
            _ if status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z')) =>
            {
                return
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    panic!("process {pid} did not take SIGINT and SIGTERM over within 10 s");
}

/// SIGTERM and SIGINT end a command cleanly whenever they arrive: exit status 128 + signal (or
/// success when the work was done first), never a crash, and no temporary file left behind.
/// `convert --to group` partitions with METIS, whose GKlib installs process-wide signal
/// handlers; a SIGTERM landing in one of them segfaulted in 8 of 34 tries.
#[test]
fn signals_end_commands_cleanly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let val = |i: usize| ((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0) - 1.0;
    let tensors: Vec<WeightTensor> = (0..6)
        .map(|l| {
            WeightTensor::new(
                format!("layer{l}.weight"),
                vec![256, 128, 3, 3],
                (0..256 * 1152).map(|i| val(i + 7919 * l)).collect(),
            )
            .unwrap()
        })
        .collect();
    let w = dir.path().join("w.safetensors");
    WeightFile::write_f32(&w, &tensors).unwrap();
    let m = dir.path().join("m.safetensors");
    ok(&[
        "prune",
        "-q",
        "--weights",
        &w.to_string_lossy(),
        "--sparsity",
        "0.8",
        "--out",
        &m.to_string_lossy(),
    ]);
    let out = dir.path().join("g.safetensors");
    let mut interrupted = 0;
    for (i, delay_ms) in [30u64, 80, 150, 250, 400, 20, 120, 300, 60, 200]
        .iter()
        .enumerate()
    {
        let sig = if i % 3 == 2 {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_coarsen"))
            .args(["convert", "-q", "--to", "group", "--parts", "auto"])
            .arg("--mask")
            .arg(&m)
            .arg("--weights")
            .arg(&w)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The delay counts from when the command has taken both signals over: one that lands
        // before `main` does ends the process as it would any program (seen at 20 ms on a
        // loaded machine), which is not what this test is about.
        takes_signals(child.id());
        std::thread::sleep(std::time::Duration::from_millis(*delay_ms));
        // SAFETY: signals a child of this test by its pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
        let res = child.wait_with_output().unwrap();
        assert_eq!(
            res.status.signal(),
            None,
            "killed by signal {:?} after {delay_ms} ms: {}",
            res.status.signal(),
            String::from_utf8_lossy(&res.stderr)
        );
        match res.status.code() {
            Some(0) => {}
            Some(c) if c == 128 + sig => interrupted += 1,
            other => panic!(
                "exit {other:?} after {delay_ms} ms: {}",
                String::from_utf8_lossy(&res.stderr)
            ),
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
        let _ = std::fs::remove_file(&out);
    }
    assert!(
        interrupted > 0,
        "no run was interrupted: the work is too short to test"
    );
}

/// `bench --mask` with a mask whose metadata names a structure the layer does not have: the
/// error names the file and the layer; bench's and predict's outputs never replace an input.
#[test]
fn bench_errors_name_the_layer_and_outputs_spare_inputs() {
    let f = Fixture::new();
    f.broken_channel_mask("b.safetensors");
    let res = coarsen(&["bench", "--mask", f.s("b.safetensors"), "--budget", "0.01"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(
        stderr.contains("b.safetensors: layer 'conv2.weight'") && stderr.contains("channel"),
        "{stderr}"
    );
    let before = std::fs::read(f.path("m.safetensors")).unwrap();
    let res = coarsen(&[
        "bench",
        "--mask",
        f.s("m.safetensors"),
        "--json",
        f.s("m.safetensors"),
    ]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("is also --mask"));
    assert_eq!(std::fs::read(f.path("m.safetensors")).unwrap(), before);
}
