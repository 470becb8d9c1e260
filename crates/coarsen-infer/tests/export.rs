//! Export round trips (every format, several graphs), damaged exports refused with clear
//! errors, version-1 files read, and the ONNX writer's structure.

mod common;

use std::path::Path;

use coarsen_core::MaskSet;
use coarsen_infer::export::{self, ExportInfo, Preprocessing, MANIFEST_FILE, TENSORS_FILE};
use coarsen_infer::{InferenceNet, LayerFormat, Network, Path as InferPath};
use common::{exotic, formats, masks_for, plain, residual, Net};
use proptest::prelude::*;

fn build(net: fn() -> Net, fmt: &LayerFormat, seed: u64) -> (Network, coarsen_infer::Formats) {
    let (graph, tensors, weights) = net().finish(seed);
    let (masks, formats) = masks_for(&weights, fmt, seed + 1);
    (Network::new(graph, tensors, masks).unwrap(), formats)
}

fn input(net: &Network, batch: usize) -> Vec<f32> {
    (0..net.input().iter().product::<usize>() * batch)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect()
}

fn info(c: usize) -> ExportInfo {
    ExportInfo {
        preprocessing: Some(Preprocessing {
            mean: vec![0.5; c],
            std: vec![0.25; c],
        }),
        labels: None,
        ..ExportInfo::default()
    }
}

/// Export → load gives the same network: graph, tensors, masks, formats, and bit-identical
/// packed logits.
#[test]
fn round_trip_every_format() {
    for (label, net) in [
        ("plain", plain as fn() -> Net),
        ("residual", residual),
        ("exotic", exotic),
    ] {
        for (k, fmt) in formats().iter().enumerate() {
            let (network, formats) = build(net, fmt, 5 + k as u64);
            let dir = tempfile::tempdir().unwrap();
            let m = export::write(
                &network,
                &formats,
                None,
                info(network.input()[0]),
                dir.path(),
            )
            .unwrap();
            let back = export::load(dir.path()).unwrap();
            assert_eq!(back.manifest, m, "{label} {fmt:?}");
            assert_eq!(back.network.graph(), network.graph());
            assert_eq!(back.network.masks(), network.masks(), "{label} {fmt:?}");
            for (name, t) in network.tensors().iter() {
                assert_eq!(
                    back.network.masked_values(name).unwrap(),
                    network.masked_values(name).unwrap(),
                    "{label} {fmt:?} {name}"
                );
                assert_eq!(back.network.tensors().get(name).unwrap().shape(), t.shape());
            }
            for (name, f) in &formats {
                assert_eq!(&back.formats[name], f, "{label} {name}");
            }
            let x = input(&network, 3);
            let run = |n: &Network, f| {
                InferenceNet::new(n, f, InferPath::Packed)
                    .unwrap()
                    .forward_nchw(&x, 3)
                    .unwrap()
            };
            assert_eq!(
                run(&back.network, &back.formats),
                run(&network, &formats),
                "{label} {fmt:?}"
            );
            if *fmt != LayerFormat::Dense && m.sparsity > 0.5 {
                assert!(m.file_bytes < m.dense_bytes, "{label} {fmt:?}: {m:?}");
            }
        }
    }
}

/// Rewrites `model.json` through `edit` and returns the load error.
fn load_error(dir: &Path, good: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(good).unwrap();
    edit(&mut v);
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&v).unwrap()).unwrap();
    let e = export::load(dir).unwrap_err().to_string();
    std::fs::write(dir.join(MANIFEST_FILE), good).unwrap();
    e
}

#[test]
fn damaged_exports_are_clear_errors() {
    let (network, formats) = build(plain, &LayerFormat::Csr, 3);
    let dir = tempfile::tempdir().unwrap();
    export::write(&network, &formats, None, info(2), dir.path()).unwrap();
    let mpath = dir.path().join(MANIFEST_FILE);
    let good = std::fs::read_to_string(&mpath).unwrap();
    let has = |e: String, want: &str| assert!(e.contains(want), "{e} (wanted {want})");
    has(
        load_error(dir.path(), &good, |v| v["version"] = 9.into()),
        "version 9",
    );
    has(
        load_error(dir.path(), &good, |v| v["format"] = "other".into()),
        "format other",
    );
    has(
        load_error(dir.path(), &good, |v| v["classes"] = 4.into()),
        "says 4 classes",
    );
    has(
        load_error(dir.path(), &good, |v| {
            v["graph"]["nodes"][1]["inputs"][0] = "nowhere".into()
        }),
        "nowhere",
    );
    has(
        load_error(dir.path(), &good, |v| {
            v["layers"][1]["shape"] = serde_json::json!([16, 8, 3, 2])
        }),
        "conv2.weight",
    );
    has(
        load_error(dir.path(), &good, |v| {
            v["layers"][1]["name"] = "bn1.weight".into()
        }),
        "no conv or linear weight",
    );
    has(
        load_error(dir.path(), &good, |v| {
            v["preprocessing"]["std"] = serde_json::json!([0.0, 1.0])
        }),
        "standard deviations positive",
    );
    // The tensor file: a value out of place, a missing tensor, garbage.
    let tpath = dir.path().join(TENSORS_FILE);
    let bytes = std::fs::read(&tpath).unwrap();
    std::fs::write(&tpath, &bytes[..bytes.len() - 4]).unwrap();
    has(
        export::load(dir.path()).unwrap_err().to_string(),
        "model.safetensors",
    );
    std::fs::write(&tpath, b"junk").unwrap();
    has(
        export::load(dir.path()).unwrap_err().to_string(),
        "model.safetensors",
    );
    std::fs::remove_file(&tpath).unwrap();
    assert!(!export::is_export(dir.path()));
    assert!(export::load(dir.path()).is_err());
}

/// The tensors of a safetensors file: (name, dtype, shape, bytes).
type Raw = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Writes a safetensors file of (name, dtype, shape, bytes), in order.
fn write_tensors(path: &Path, tensors: &Raw) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A mask whose bits or values disagree with the description is refused.
/// Drops the tensors' checksum from an export's model.json, as an export written by another
/// tool would lack it.
fn unbind(dir: &std::path::Path) {
    let mpath = dir.join("model.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("tensors_crc32").is_some());
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn inconsistent_masks_are_refused() {
    let (network, formats) = build(plain, &LayerFormat::Csr, 3);
    let dir = tempfile::tempdir().unwrap();
    export::write(&network, &formats, None, ExportInfo::default(), dir.path()).unwrap();
    let tpath = dir.path().join(TENSORS_FILE);
    let original = std::fs::read(&tpath).unwrap();
    // model.json binds the tensors by their checksum: any edit is refused first by it.
    let mut bytes = original.clone();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&tpath, &bytes).unwrap();
    let e = export::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not of one export"), "{e}");
    std::fs::write(&tpath, &original).unwrap();
    // Without it (an export written by another tool), the checks behind it run.
    unbind(dir.path());
    let st = safetensors::SafeTensors::deserialize(&original).unwrap();
    let all: Raw = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let edit = |f: &dyn Fn(&mut Raw)| {
        let mut t = all.clone();
        f(&mut t);
        write_tensors(&tpath, &t);
        let e = export::load(dir.path()).unwrap_err().to_string();
        std::fs::write(&tpath, &original).unwrap();
        e
    };
    let pos = |t: &Raw, n: &str| t.iter().position(|x| x.0 == n).unwrap();
    // One mask bit more than values.
    let e = edit(&|t| {
        let i = pos(t, "conv2.weight.mask_bits");
        let b = &mut t[i].3;
        let z = b.iter().position(|&x| x != 0xff).unwrap();
        b[z] |= !b[z] & b[z].wrapping_add(1);
    });
    assert!(e.contains("its mask keeps"), "{e}");
    // A bit array of the wrong length.
    let e = edit(&|t| {
        let i = pos(t, "fc2.weight.mask_bits");
        t[i].3.pop();
        t[i].2 = vec![t[i].3.len()];
    });
    assert!(e.contains("mask_bits") && e.contains("bytes"), "{e}");
    // A non-finite kept value.
    let e = edit(&|t| {
        let i = pos(t, "conv3.weight.values");
        t[i].3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(e.contains("conv3.weight") && e.contains("NaN"), "{e}");
    // A dtype other than F32.
    let e = edit(&|t| {
        let i = pos(t, "bn1.running_var");
        t[i].1 = safetensors::Dtype::I32;
    });
    assert!(e.contains("bn1.running_var") && e.contains("I32"), "{e}");
    // Nothing changed for good.
    assert!(export::load(dir.path()).is_ok());

    // Bits set past the end of a mask whose length is not a multiple of 8 (5×27 = 135).
    let mut n = Net::new([1, 3, 3]);
    n.conv3("c", 1, 3, 1);
    n.op(coarsen_infer::Op::Flatten);
    n.linear("fc", 27, 5, true);
    let (graph, tensors, _) = n.finish(1);
    let mut masks = MaskSet::new();
    masks
        .insert_bytes(
            "fc.weight",
            &[5, 27],
            (0..135).map(|i| u8::from(i % 2 == 0)).collect(),
        )
        .unwrap();
    let small = Network::new(graph, tensors, masks).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = coarsen_infer::layer_formats(small.graph(), small.masks(), None).unwrap();
    export::write(&small, &f, None, ExportInfo::default(), dir.path()).unwrap();
    unbind(dir.path());
    let tpath = dir.path().join(TENSORS_FILE);
    let st_bytes = std::fs::read(&tpath).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let mut t: Raw = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let i = t.iter().position(|x| x.0 == "fc.weight.mask_bits").unwrap();
    *t[i].3.last_mut().unwrap() |= 0x80;
    write_tensors(&tpath, &t);
    let e = export::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("past the 135 entries"), "{e}");
}

/// Version 1 named its architecture instead of holding a graph: it loads given the graph of
/// that architecture, and refuses without one.
#[test]
fn version_1_files_load_with_their_architecture() {
    let (network, formats) = build(plain, &LayerFormat::Channel, 9);
    let dir = tempfile::tempdir().unwrap();
    let m = export::write(&network, &formats, None, info(2), dir.path()).unwrap();
    let mut v = serde_json::to_value(&m).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("graph");
    o.remove("classes");
    o.insert("version".into(), 1.into());
    o.insert(
        "model".into(),
        serde_json::json!({"name": "plain", "width": 1.0, "input": [2, 12, 12], "classes": 5}),
    );
    std::fs::write(
        dir.path().join(MANIFEST_FILE),
        serde_json::to_vec(&v).unwrap(),
    )
    .unwrap();
    let e = export::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("version-1") && e.contains("plain"), "{e}");
    let graph = network.graph().clone();
    let back = export::load_with(dir.path(), &|info| {
        assert_eq!(info.name, "plain");
        Ok(graph.clone())
    })
    .unwrap();
    assert_eq!(back.network.masks(), network.masks());
    assert_eq!(back.manifest.version, 1);
    assert_eq!(back.manifest.classes, 5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any masks on the plain network survive the round trip, value for value.
    #[test]
    fn random_masks_round_trip(seed in 0u64..1000, density in 0.0f64..1.0) {
        let (graph, tensors, weights) = plain().finish(seed);
        let mut masks = MaskSet::new();
        for (i, (name, shape)) in weights.iter().enumerate() {
            if (seed >> i) & 1 == 0 {
                continue;
            }
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .map(|j| u8::from((((j as u64 * 2654435761) ^ seed) % 1000) as f64 / 1000.0 < density))
                .collect();
            masks.insert_bytes(name.clone(), shape, bytes).unwrap();
        }
        let network = Network::new(graph, tensors, masks).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let formats = coarsen_infer::layer_formats(network.graph(), network.masks(), None).unwrap();
        export::write(&network, &formats, None, ExportInfo::default(), dir.path()).unwrap();
        let back = export::load(dir.path()).unwrap();
        prop_assert_eq!(back.network.masks(), network.masks());
        for (name, _) in network.tensors().iter() {
            prop_assert_eq!(
                back.network.masked_values(name).unwrap(),
                network.masked_values(name).unwrap()
            );
        }
        prop_assert_eq!(back.formats, formats);
    }
}

/// The ONNX model is a valid protobuf that names every node and initializer it needs: checked
/// structurally here (ONNX Runtime runs it in the CLI's tests).
#[test]
fn onnx_models_decode_and_hold_every_weight() {
    use coarsen_infer::onnx::{to_onnx, OnnxOptions};
    for net in [plain as fn() -> Net, residual, exotic] {
        for fold in [false, true] {
            let (network, _) = build(net, &LayerFormat::Group, 4);
            let bytes = to_onnx(
                &network,
                &OnnxOptions {
                    fold_batch_norm: fold,
                },
            )
            .unwrap();
            assert!(bytes.len() > 1000);
            // Every weight's values appear as raw little-endian floats (masked, unfolded).
            if !fold {
                for (name, _) in network.weight_shapes() {
                    let v = network.masked_values(&name).unwrap();
                    let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    assert!(
                        bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                        "{name} missing"
                    );
                }
            }
        }
    }
}
