//! Exported models: a trained sparse network as a compact safetensors file plus a JSON
//! architecture file, loadable without the training run that made it (no pickle, no code).
//!
//! An export directory holds:
//!
//! - `model.safetensors`: for every conv and linear weight with a mask, `NAME.mask_bits` (U8,
//!   the mask bit-packed row-major, least significant bit first, `⌈len/8⌉` bytes) and
//!   `NAME.values` (F32, the kept weights in row-major order); weights without a mask as `NAME`
//!   (F32, full shape); every other parameter (biases, BatchNorm scale and shift) and buffer
//!   (BatchNorm running statistics) as `NAME` (F32). BatchNorm is stored unfolded so the
//!   exported network is the trained network itself; the inference engine folds it on load.
//!   A weight costs `len/8` bytes of mask plus 4 bytes per kept value.
//! - `model.json` ([`Manifest`]): the architecture ([`ModelSpec`]), the input normalisation,
//!   every layer's shape, density and packed [`LayerFormat`] (N:M permutations included), the
//!   mask file's coarsen metadata, and the experiment that trained it.
//!
//! [`load`] rebuilds the [`Model`], its masks and formats; an [`InferenceNet`] built from them
//! with [`InferenceNet::with_formats`] computes exactly what the exported network computed.
//!
//! [`InferenceNet`]: crate::infer::InferenceNet
//! [`InferenceNet::with_formats`]: crate::infer::InferenceNet::with_formats

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use coarsen_core::CoarsenMetadata;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::infer::{layer_formats, LayerFormat};
use crate::methods::Experiment;
use crate::model::{Model, ModelSpec, ParamKind};
use crate::optim::Masks;

/// `model.json`'s `format` value.
pub const EXPORT_FORMAT: &str = "coarsen-export";
/// `model.json`'s layout version.
pub const EXPORT_VERSION: u32 = 1;
/// The tensor file of an export directory.
pub const TENSORS_FILE: &str = "model.safetensors";
/// The architecture file of an export directory.
pub const MANIFEST_FILE: &str = "model.json";

/// Per-channel input normalisation: `x ← (x/255 − mean) / std`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Per-channel mean of pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// One conv or linear weight of an export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedLayer {
    /// The weight's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Kept fraction.
    pub density: f64,
    /// Values stored (kept weights).
    pub stored: usize,
    /// Whether it is stored as mask bits + kept values (`false`: dense, no mask).
    pub masked: bool,
    /// How the inference engine runs it.
    #[serde(flatten)]
    pub format: LayerFormat,
}

/// `model.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`EXPORT_FORMAT`].
    pub format: String,
    /// [`EXPORT_VERSION`].
    pub version: u32,
    /// The architecture.
    pub model: ModelSpec,
    /// Input normalisation the network was trained with, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<Preprocessing>,
    /// Conv and linear weights, in forward order.
    pub layers: Vec<ExportedLayer>,
    /// Sparsity over all conv and linear weights.
    pub sparsity: f64,
    /// Bytes of `model.safetensors`.
    pub file_bytes: u64,
    /// Bytes the same tensors take dense in F32.
    pub dense_bytes: u64,
    /// The masks' coarsen metadata (pattern and per-layer structuring), when they had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coarsen: Option<CoarsenMetadata>,
    /// The experiment that trained it, when exported from a `coarsen train` run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<Experiment>,
    /// Where it was exported from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
}

/// What goes into `model.json` besides the network.
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    /// Input normalisation.
    pub preprocessing: Option<Preprocessing>,
    /// The training experiment.
    pub experiment: Option<Experiment>,
    /// The checkpoint exported.
    pub source: Option<PathBuf>,
}

/// A network loaded back from an export directory.
#[derive(Debug)]
pub struct Exported {
    /// `model.json`.
    pub manifest: Manifest,
    /// The network, masks applied.
    pub model: Model,
    /// The masks.
    pub masks: Masks,
    /// Every conv and linear weight's format.
    pub formats: BTreeMap<String, LayerFormat>,
}

/// Whether `dir` is an export directory.
pub fn is_export(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file() && dir.join(TENSORS_FILE).is_file()
}

fn pack_bits(mask: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; mask.len().div_ceil(8)];
    for (i, _) in mask.iter().enumerate().filter(|(_, &b)| b != 0) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

fn unpack_bits(bits: &[u8], len: usize) -> Vec<u8> {
    (0..len).map(|i| (bits[i / 8] >> (i % 8)) & 1).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `model` under `masks` to `dir` with the formats [`layer_formats`] chooses from the
/// masks and their coarsen metadata `meta`. See [`export_with_formats`].
pub fn export(
    model: &Model,
    masks: &Masks,
    meta: Option<&CoarsenMetadata>,
    info: ExportInfo,
    dir: &Path,
) -> Result<Manifest> {
    let formats = layer_formats(model, masks, meta)?;
    export_with_formats(model, masks, &formats, meta, info, dir)
}

/// Writes `model` under `masks` to `dir`, recording `formats` (weights missing from it are
/// dense) and `meta`. Each file is written to a temporary name and renamed, so a reader never
/// sees half a file. Returns the manifest written.
pub fn export_with_formats(
    model: &Model,
    masks: &Masks,
    formats: &BTreeMap<String, LayerFormat>,
    meta: Option<&CoarsenMetadata>,
    info: ExportInfo,
    dir: &Path,
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut layers = Vec::new();
    let (mut kept_all, mut len_all, mut dense_bytes) = (0usize, 0usize, 0u64);
    for p in &model.params {
        let shape = p.shape();
        let len: usize = shape.iter().product();
        let values = p.values()?;
        dense_bytes += 4 * len as u64;
        let is_weight = p.kind != ParamKind::Other;
        match masks.get(&p.name).filter(|_| is_weight) {
            Some(m) => {
                if m.len() != len {
                    return Err(TrainError::config(
                        "mask",
                        &p.name,
                        format!("has {} values, the weight {shape:?} has {len}", m.len()),
                    ));
                }
                let kept: Vec<f32> = values
                    .iter()
                    .zip(m)
                    .filter(|(_, &b)| b != 0)
                    .map(|(&v, _)| v)
                    .collect();
                tensors.push((
                    format!("{}.mask_bits", p.name),
                    Dtype::U8,
                    vec![len.div_ceil(8)],
                    pack_bits(m),
                ));
                tensors.push((
                    format!("{}.values", p.name),
                    Dtype::F32,
                    vec![kept.len()],
                    f32_bytes(&kept),
                ));
                kept_all += kept.len();
                len_all += len;
                layers.push(ExportedLayer {
                    name: p.name.clone(),
                    shape,
                    density: kept.len() as f64 / len.max(1) as f64,
                    stored: kept.len(),
                    masked: true,
                    format: formats.get(&p.name).cloned().unwrap_or(LayerFormat::Dense),
                });
            }
            None => {
                if is_weight {
                    kept_all += len;
                    len_all += len;
                    layers.push(ExportedLayer {
                        name: p.name.clone(),
                        shape: shape.clone(),
                        density: 1.0,
                        stored: len,
                        masked: false,
                        format: LayerFormat::Dense,
                    });
                }
                tensors.push((p.name.clone(), Dtype::F32, shape, f32_bytes(&values)));
            }
        }
    }
    for b in &model.buffers {
        let v = b.values.lock().unwrap_or_else(|p| p.into_inner()).clone();
        dense_bytes += 4 * v.len() as u64;
        tensors.push((b.name.clone(), Dtype::F32, vec![v.len()], f32_bytes(&v)));
    }
    let tpath = dir.join(TENSORS_FILE);
    let views = tensors
        .iter()
        .map(|(n, d, s, bytes)| {
            TensorView::new(*d, s.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| st_error(&tpath, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut header = HashMap::new();
    header.insert("format".to_string(), EXPORT_FORMAT.to_string());
    let bytes = safetensors::serialize(views, Some(header)).map_err(|e| st_error(&tpath, e))?;
    crate::train::write_atomic(&tpath, &bytes)?;
    let manifest = Manifest {
        format: EXPORT_FORMAT.into(),
        version: EXPORT_VERSION,
        model: model.spec.clone(),
        preprocessing: info.preprocessing,
        layers,
        sparsity: if len_all > 0 {
            1.0 - kept_all as f64 / len_all as f64
        } else {
            0.0
        },
        file_bytes: bytes.len() as u64,
        dense_bytes,
        coarsen: meta.cloned(),
        experiment: info.experiment,
        source: info.source,
    };
    let mpath = dir.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| TrainError::config("manifest", mpath.display(), e.to_string()))?;
    crate::train::write_atomic(&mpath, &json)?;
    Ok(manifest)
}

fn st_error(path: &Path, e: safetensors::SafeTensorError) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Reads `dir/model.json` alone.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST_FILE);
    let raw = std::fs::read(&mpath).map_err(|e| TrainError::io(&mpath, e))?;
    let manifest: Manifest = serde_json::from_slice(&raw).map_err(|e| TrainError::Checkpoint {
        path: mpath.clone(),
        reason: format!("not a coarsen export manifest: {e}"),
    })?;
    if manifest.format != EXPORT_FORMAT || manifest.version != EXPORT_VERSION {
        return Err(TrainError::Checkpoint {
            path: mpath,
            reason: format!(
                "format {} version {}; this coarsen reads {EXPORT_FORMAT} version {EXPORT_VERSION}",
                manifest.format, manifest.version
            ),
        });
    }
    Ok(manifest)
}

/// Loads an export directory back: the network (masks applied), masks and layer formats.
pub fn load(dir: &Path) -> Result<Exported> {
    let manifest = read_manifest(dir)?;
    let tpath = dir.join(TENSORS_FILE);
    let raw = std::fs::read(&tpath).map_err(|e| TrainError::io(&tpath, e))?;
    let st = SafeTensors::deserialize(&raw).map_err(|e| st_error(&tpath, e))?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: tpath.clone(),
        reason,
    };
    let tensor = |name: &str, dtype: Dtype| -> Result<(Vec<usize>, &[u8])> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("no tensor '{name}'")))?;
        if t.dtype() != dtype {
            return Err(bad(format!(
                "tensor '{name}' is {:?}, expected {dtype:?}",
                t.dtype()
            )));
        }
        Ok((t.shape().to_vec(), t.data()))
    };
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let model = Model::new(&manifest.model, 0)?;
    let mut masks = Masks::new();
    let mut state: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let layer_of: BTreeMap<&str, &ExportedLayer> = manifest
        .layers
        .iter()
        .map(|l| (l.name.as_str(), l))
        .collect();
    for p in &model.params {
        let shape = p.shape();
        let len: usize = shape.iter().product();
        match layer_of.get(p.name.as_str()).filter(|l| l.masked) {
            Some(l) => {
                if l.shape != shape {
                    return Err(bad(format!(
                        "layer '{}' is {:?} in {MANIFEST_FILE}, the {} model has {shape:?}",
                        p.name, l.shape, manifest.model.name
                    )));
                }
                let (_, bits) = tensor(&format!("{}.mask_bits", p.name), Dtype::U8)?;
                if bits.len() != len.div_ceil(8) {
                    return Err(bad(format!(
                        "'{}.mask_bits' has {} bytes, a {shape:?} mask needs {}",
                        p.name,
                        bits.len(),
                        len.div_ceil(8)
                    )));
                }
                let mask = unpack_bits(bits, len);
                let (_, vb) = tensor(&format!("{}.values", p.name), Dtype::F32)?;
                let kept = floats(vb);
                let ones = mask.iter().filter(|&&b| b != 0).count();
                if kept.len() != ones {
                    return Err(bad(format!(
                        "'{}.values' has {} values, its mask keeps {ones}",
                        p.name,
                        kept.len()
                    )));
                }
                let mut it = kept.into_iter();
                let full: Vec<f32> = mask
                    .iter()
                    .map(|&b| {
                        if b != 0 {
                            it.next().unwrap_or(0.0)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                state.insert(p.name.clone(), (shape, full));
                masks.insert(p.name.clone(), mask);
            }
            None => {
                let (s, b) = tensor(&p.name, Dtype::F32)?;
                state.insert(p.name.clone(), (s, floats(b)));
            }
        }
    }
    for b in &model.buffers {
        let (s, v) = tensor(&b.name, Dtype::F32)?;
        let want = b.values.lock().unwrap_or_else(|p| p.into_inner()).len();
        if s.iter().product::<usize>() != want {
            return Err(bad(format!(
                "buffer '{}' has shape {s:?}, the model needs {want} values",
                b.name
            )));
        }
        state.insert(b.name.clone(), (s, floats(v)));
    }
    model.load_state(&|n| state.get(n).cloned(), &tpath)?;
    let formats = manifest
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.format.clone()))
        .collect();
    Ok(Exported {
        manifest,
        model,
        masks,
        formats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::tests::{masks_and_formats, setup, FORMATS};
    use crate::infer::{InferenceNet, Path as InferPath};

    fn input(model: &Model, batch: usize) -> Vec<f32> {
        (0..model.spec.input.iter().product::<usize>() * batch)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect()
    }

    /// Export → load gives the same network: masks, formats, parameters, buffers, and
    /// bit-identical packed logits, for every format on a plain CNN and a ResNet.
    #[test]
    fn round_trip_every_format() {
        for (name, inp, width) in [("cnn", [1, 12, 12], 0.5), ("resnet20", [3, 8, 8], 0.5)] {
            for fmt in FORMATS() {
                let model = setup(name, inp, width, 5);
                let (masks, formats) = masks_and_formats(&model, &fmt, 9);
                crate::optim::apply_masks(&model, &masks).unwrap();
                let dir = tempfile::tempdir().unwrap();
                let info = ExportInfo {
                    preprocessing: Some(Preprocessing {
                        mean: vec![0.5; inp[0]],
                        std: vec![0.25; inp[0]],
                    }),
                    ..ExportInfo::default()
                };
                let m =
                    export_with_formats(&model, &masks, &formats, None, info, dir.path()).unwrap();
                let back = load(dir.path()).unwrap();
                assert_eq!(back.manifest, m);
                assert_eq!(back.masks, masks, "{name} {fmt:?}");
                for (k, f) in &formats {
                    assert_eq!(&back.formats[k], f, "{name} {k}");
                }
                let (a, b) = (model.state().unwrap(), back.model.state().unwrap());
                assert_eq!(a, b, "{name} {fmt:?}: parameters differ");
                let x = input(&model, 3);
                let want = InferenceNet::with_formats(&model, &masks, &formats, InferPath::Packed)
                    .unwrap()
                    .forward(&x, 3)
                    .unwrap();
                let got = InferenceNet::with_formats(
                    &back.model,
                    &back.masks,
                    &back.formats,
                    InferPath::Packed,
                )
                .unwrap()
                .forward(&x, 3)
                .unwrap();
                assert_eq!(got, want, "{name} {fmt:?}: logits differ");
                if fmt != LayerFormat::Dense && m.sparsity > 0.5 {
                    assert!(m.file_bytes < m.dense_bytes, "{name} {fmt:?}: {m:?}");
                }
            }
        }
    }

    #[test]
    fn load_rejects_damaged_exports() {
        let model = setup("cnn", [1, 12, 12], 0.5, 5);
        let fmt = LayerFormat::Channel;
        let (masks, _) = masks_and_formats(&model, &fmt, 9);
        let dir = tempfile::tempdir().unwrap();
        export(&model, &masks, None, ExportInfo::default(), dir.path()).unwrap();
        // A newer layout.
        let mpath = dir.path().join(MANIFEST_FILE);
        let good = std::fs::read_to_string(&mpath).unwrap();
        std::fs::write(&mpath, good.replace("\"version\": 1", "\"version\": 9")).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
        // A manifest whose layer shapes do not match its model.
        std::fs::write(&mpath, good.replace("\"width\": 0.5", "\"width\": 1.0")).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.json") || e.contains("shape"), "{e}");
        // Missing tensor file.
        std::fs::write(&mpath, &good).unwrap();
        std::fs::remove_file(dir.path().join(TENSORS_FILE)).unwrap();
        assert!(!is_export(dir.path()));
        assert!(load(dir.path()).is_err());
    }

    #[test]
    fn bits_round_trip() {
        for len in [0usize, 1, 7, 8, 9, 63, 64, 65] {
            let m: Vec<u8> = (0..len).map(|i| u8::from(i % 3 == 0)).collect();
            let b = pack_bits(&m);
            assert_eq!(b.len(), len.div_ceil(8));
            assert_eq!(unpack_bits(&b, len), m);
        }
        assert_eq!(pack_bits(&[1, 0, 0, 0, 0, 0, 0, 1, 1]), vec![0x81, 0x01]);
    }
}
