//! Exported models: a sparse network as a compact safetensors file plus a JSON file that holds
//! its explicit graph — everything needed to run it, without the run that trained it and
//! without coarsen's source (no pickle, no code).
//!
//! An export directory holds:
//!
//! - `model.safetensors`: every masked conv or linear weight as `NAME.mask_bits` (U8, the mask
//!   bit-packed row-major, least significant bit first, `⌈len/8⌉` bytes, unused bits zero) and
//!   `NAME.values` (F32, the kept weights in row-major order); every other tensor the graph
//!   reads (unmasked weights, biases, BatchNorm scale, shift and running statistics) as `NAME`
//!   (F32, its own shape). BatchNorm is stored unfolded: the file is the trained network
//!   itself.
//! - `model.json` ([`Manifest`], version 2): the [`Graph`], the number of classes and their
//!   labels, the input normalisation, every layer's shape, density and packed [`LayerFormat`]
//!   (N:M permutations included), the mask file's coarsen metadata, and the experiment that
//!   trained it.
//!
//! Version 1 (coarsen before the explicit graph) named an architecture instead of holding a
//! graph; [`load_with`] reads it given a function that builds the graph of an architecture
//! (coarsen-train has one).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use coarsen_core::{CoarsenMetadata, MaskSet};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::format::{Formats, LayerFormat};
use crate::graph::Graph;
use crate::network::Network;
use crate::tensors::{numel, TensorSet};

/// `model.json`'s `format` value.
pub const EXPORT_FORMAT: &str = "coarsen-export";
/// The layout version this coarsen writes.
pub const EXPORT_VERSION: u32 = 2;
/// The tensor file of an export directory.
pub const TENSORS_FILE: &str = "model.safetensors";
/// The description file of an export directory.
pub const MANIFEST_FILE: &str = "model.json";

/// Per-channel input normalisation: `x ← (pixel/255 − mean[c]) / std[c]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Per-channel mean of pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl Preprocessing {
    /// Checks that it fits images of `channels` channels and divides by positive numbers.
    pub fn check(&self, channels: usize) -> Result<()> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(InferError::param(
                "preprocessing",
                format!("{} means, {} stds", self.mean.len(), self.std.len()),
                format!("the network reads {channels} channels"),
            ));
        }
        if let Some(s) = self
            .std
            .iter()
            .chain(&self.mean)
            .find(|v| !v.is_finite())
            .or_else(|| self.std.iter().find(|&&v| v <= 0.0))
        {
            return Err(InferError::param(
                "preprocessing",
                s,
                "means must be finite and standard deviations positive",
            ));
        }
        Ok(())
    }

    /// Normalises a channel-major batch `[C, B, H, W]` of pixels scaled to [0, 1] in place.
    pub fn apply_cbhw(&self, x: &mut [f32]) {
        let c = self.mean.len().max(1);
        let per = x.len() / c;
        for (ch, plane) in x.chunks_mut(per.max(1)).enumerate().take(c) {
            let (m, s) = (self.mean[ch], self.std[ch]);
            plane.iter_mut().for_each(|v| *v = (*v - m) / s);
        }
    }
}

/// The architecture a network was built from, when coarsen built it (version 1's `model`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Architecture: `mlp`, `cnn`, `vgg11`, `vgg16`, `resnet20`, `resnet18`.
    pub name: String,
    /// Width multiplier.
    pub width: f64,
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Output classes.
    pub classes: usize,
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

/// `model.json`, version 2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`EXPORT_FORMAT`].
    pub format: String,
    /// [`EXPORT_VERSION`].
    pub version: u32,
    /// The network.
    pub graph: Graph,
    /// Output classes.
    pub classes: usize,
    /// The name of every class, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// The architecture it was built from, when coarsen built it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    /// Input normalisation the network was trained with, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<Preprocessing>,
    /// Conv and linear weights, in evaluation order.
    pub layers: Vec<ExportedLayer>,
    /// Sparsity over the prunable layers (those with a mask; exports written before
    /// `sparsity_all` existed stored the figure over all weights here).
    pub sparsity: f64,
    /// Sparsity over all conv and linear weights (see [`coarsen_core::Sparsity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity_all: Option<f64>,
    /// Bytes of `model.safetensors`.
    pub file_bytes: u64,
    /// Bytes the same tensors take dense in F32.
    pub dense_bytes: u64,
    /// The masks' coarsen metadata (pattern and per-layer structuring), when they had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coarsen: Option<CoarsenMetadata>,
    /// The experiment that trained it (coarsen-train's record), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<serde_json::Value>,
    /// Where it was exported from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// CRC-32 of `model.safetensors` (`crc32:xxxxxxxx`): binds the two files, so that tensors
    /// of one export beside the description of another (a kill between their two writes) are
    /// refused on load. Absent in exports written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors_crc32: Option<String>,
}

/// The checksum [`Manifest::tensors_crc32`] records.
pub fn tensors_crc32(bytes: &[u8]) -> String {
    format!("crc32:{:08x}", crc32fast::hash(bytes))
}

/// `model.json`, version 1: an architecture name instead of a graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestV1 {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// 1.
    pub version: u32,
    /// The architecture.
    pub model: ModelInfo,
    /// Input normalisation.
    #[serde(default)]
    pub preprocessing: Option<Preprocessing>,
    /// Conv and linear weights.
    pub layers: Vec<ExportedLayer>,
    /// Sparsity.
    pub sparsity: f64,
    /// Bytes of `model.safetensors`.
    pub file_bytes: u64,
    /// Dense bytes.
    pub dense_bytes: u64,
    /// Coarsen metadata.
    #[serde(default)]
    pub coarsen: Option<CoarsenMetadata>,
    /// The experiment.
    #[serde(default)]
    pub experiment: Option<serde_json::Value>,
    /// Where it was exported from.
    #[serde(default)]
    pub source: Option<PathBuf>,
}

/// What goes into `model.json` besides the network.
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    /// The architecture, when coarsen built it.
    pub model: Option<ModelInfo>,
    /// Class names.
    pub labels: Option<Vec<String>>,
    /// Input normalisation.
    pub preprocessing: Option<Preprocessing>,
    /// The training experiment.
    pub experiment: Option<serde_json::Value>,
    /// The checkpoint exported.
    pub source: Option<PathBuf>,
}

/// A network loaded back from an export directory.
#[derive(Debug)]
pub struct Exported {
    /// `model.json` (a version-1 file is given in version 2's form).
    pub manifest: Manifest,
    /// The network.
    pub network: Network,
    /// Every conv and linear weight's format.
    pub formats: Formats,
}

/// Whether `dir` is an export directory.
pub fn is_export(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file() && dir.join(TENSORS_FILE).is_file()
}

/// The mask bit-packed, least significant bit first.
pub fn pack_bits(mask: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; mask.len().div_ceil(8)];
    for (i, _) in mask.iter().enumerate().filter(|(_, &b)| b != 0) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// `len` 0/1 bytes from bit-packed `bits` (which must hold `⌈len/8⌉` bytes).
pub fn unpack_bits(bits: &[u8], len: usize) -> Vec<u8> {
    (0..len).map(|i| (bits[i / 8] >> (i % 8)) & 1).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes `net` to `dir` with the per-layer `formats` (weights missing from it are dense) and
/// the masks' coarsen metadata `meta`. Each file is written to a temporary name and renamed,
/// so a reader never sees half a file. Returns the manifest written.
pub fn write(
    net: &Network,
    formats: &Formats,
    meta: Option<&CoarsenMetadata>,
    info: ExportInfo,
    dir: &Path,
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| InferError::io(dir, e))?;
    let graph = net.graph();
    let masks = net.masks();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut layers = Vec::new();
    let mut dense_bytes = 0u64;
    let mut written: std::collections::HashSet<&str> = Default::default();
    for node in &graph.nodes {
        let weight = node.op.weight();
        for (_, name) in node.op.tensors() {
            if !written.insert(name) {
                continue;
            }
            let t = net.tensors().require(name)?;
            let shape = t.shape().to_vec();
            dense_bytes += 4 * t.values().len() as u64;
            match masks.get(name).filter(|_| weight == Some(name)) {
                Some(m) => {
                    let kept: Vec<f32> = t
                        .values()
                        .iter()
                        .zip(m.as_bytes())
                        .filter(|(_, &b)| b != 0)
                        .map(|(&v, _)| v)
                        .collect();
                    tensors.push((
                        format!("{name}.mask_bits"),
                        Dtype::U8,
                        vec![m.len().div_ceil(8)],
                        pack_bits(m.as_bytes()),
                    ));
                    tensors.push((
                        format!("{name}.values"),
                        Dtype::F32,
                        vec![kept.len()],
                        f32_bytes(&kept),
                    ));
                    layers.push(ExportedLayer {
                        name: name.to_string(),
                        shape,
                        density: kept.len() as f64 / m.len().max(1) as f64,
                        stored: kept.len(),
                        masked: true,
                        format: formats.get(name).cloned().unwrap_or(LayerFormat::Dense),
                    });
                }
                None => {
                    if weight == Some(name) {
                        layers.push(ExportedLayer {
                            name: name.to_string(),
                            shape: shape.clone(),
                            density: 1.0,
                            stored: t.values().len(),
                            masked: false,
                            format: LayerFormat::Dense,
                        });
                    }
                    tensors.push((name.to_string(), Dtype::F32, shape, f32_bytes(t.values())));
                }
            }
        }
    }
    let tpath = dir.join(TENSORS_FILE);
    let views = tensors
        .iter()
        .map(|(n, d, s, bytes)| {
            TensorView::new(*d, s.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| InferError::file(&tpath, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut header = HashMap::new();
    header.insert("format".to_string(), EXPORT_FORMAT.to_string());
    let bytes = safetensors::serialize(views, Some(header))
        .map_err(|e| InferError::file(&tpath, e.to_string()))?;
    coarsen_core::io::write_atomic(&tpath, &bytes)?;
    let sparsity = net.sparsity();
    let manifest = Manifest {
        format: EXPORT_FORMAT.into(),
        version: EXPORT_VERSION,
        graph: graph.clone(),
        classes: net.classes(),
        labels: info.labels,
        model: info.model,
        preprocessing: info.preprocessing,
        layers,
        sparsity: sparsity.prunable,
        sparsity_all: Some(sparsity.all),
        file_bytes: bytes.len() as u64,
        dense_bytes,
        coarsen: meta.cloned(),
        experiment: info.experiment,
        source: info.source,
        tensors_crc32: Some(tensors_crc32(&bytes)),
    };
    let mpath = dir.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| InferError::file(&mpath, e.to_string()))?;
    coarsen_core::io::write_atomic(&mpath, &json)?;
    Ok(manifest)
}

/// `model.json` of either version.
#[derive(Clone, Debug)]
pub enum AnyManifest {
    /// Version 2 (the explicit graph).
    V2(Box<Manifest>),
    /// Version 1 (an architecture name).
    V1(Box<ManifestV1>),
}

/// Reads `dir/model.json` alone.
pub fn read_manifest(dir: &Path) -> Result<AnyManifest> {
    let mpath = dir.join(MANIFEST_FILE);
    let raw = std::fs::read(&mpath).map_err(|e| InferError::io(&mpath, e))?;
    let bad = |e: serde_json::Error| {
        InferError::file(&mpath, format!("not a coarsen export description: {e}"))
    };
    let head: serde_json::Value = serde_json::from_slice(&raw).map_err(bad)?;
    let format = head.get("format").and_then(|v| v.as_str());
    let version = head.get("version").and_then(|v| v.as_u64());
    match (format, version) {
        (Some(EXPORT_FORMAT), Some(2)) => Ok(AnyManifest::V2(Box::new(
            serde_json::from_value(head).map_err(bad)?,
        ))),
        (Some(EXPORT_FORMAT), Some(1)) => Ok(AnyManifest::V1(Box::new(
            serde_json::from_value(head).map_err(bad)?,
        ))),
        _ => Err(InferError::file(
            &mpath,
            format!(
                "format {} version {}; this coarsen reads {EXPORT_FORMAT} versions 1 and {EXPORT_VERSION}",
                format.unwrap_or("(none)"),
                version.map_or("(none)".into(), |v| v.to_string())
            ),
        )),
    }
}

/// Loads a version-2 export directory: its network (masks included) and layer formats.
pub fn load(dir: &Path) -> Result<Exported> {
    load_with(dir, &|m: &ModelInfo| {
        Err(InferError::file(
            dir.join(MANIFEST_FILE),
            format!(
                "a version-1 export of '{}' names its architecture instead of holding a graph; load it with coarsen (coarsen-train knows the architectures) or re-export it",
                m.name
            ),
        ))
    })
}

/// Loads an export directory of either version; `v1_graph` gives the graph of a version-1
/// file's architecture (its tensors carry the architecture's parameter names).
pub fn load_with(dir: &Path, v1_graph: &dyn Fn(&ModelInfo) -> Result<Graph>) -> Result<Exported> {
    load_tensors(dir, read_manifest_with(dir, v1_graph)?)
}

/// Reads `dir/model.json` of either version in version 2's form; `v1_graph` gives the graph
/// of a version-1 file's architecture.
pub fn read_manifest_with(
    dir: &Path,
    v1_graph: &dyn Fn(&ModelInfo) -> Result<Graph>,
) -> Result<Manifest> {
    let manifest = match read_manifest(dir)? {
        AnyManifest::V2(m) => *m,
        AnyManifest::V1(m) => {
            let graph = v1_graph(&m.model)?;
            Manifest {
                format: m.format,
                version: m.version,
                graph,
                classes: m.model.classes,
                labels: None,
                model: Some(m.model),
                preprocessing: m.preprocessing,
                layers: m.layers,
                sparsity: m.sparsity,
                sparsity_all: None,
                file_bytes: m.file_bytes,
                dense_bytes: m.dense_bytes,
                coarsen: m.coarsen,
                experiment: m.experiment,
                source: m.source,
                tensors_crc32: None,
            }
        }
    };
    if let Some(p) = &manifest.preprocessing {
        p.check(manifest.graph.input[0])
            .map_err(|e| InferError::file(dir.join(MANIFEST_FILE), e.to_string()))?;
    }
    Ok(manifest)
}

/// Loads the tensors of the export directory `dir` described by `manifest` (read from its
/// `model.json`) and checks the network they make.
pub fn load_tensors(dir: &Path, manifest: Manifest) -> Result<Exported> {
    let mpath = dir.join(MANIFEST_FILE);
    let tpath = dir.join(TENSORS_FILE);
    let raw = std::fs::read(&tpath).map_err(|e| InferError::io(&tpath, e))?;
    if let Some(want) = &manifest.tensors_crc32 {
        let got = tensors_crc32(&raw);
        if &got != want {
            return Err(InferError::file(
                &tpath,
                format!(
                    "its checksum is {got}, {MANIFEST_FILE} records {want}: the two files are not of one export (an interrupted export, or a file changed since); export again"
                ),
            ));
        }
    }
    let st = SafeTensors::deserialize(&raw)
        .map_err(|e| InferError::file(&tpath, format!("not a valid safetensors file: {e}")))?;
    let (tensors, masks) = read_tensors(&st, &manifest, &tpath)?;
    let network = Network::new(manifest.graph.clone(), tensors, masks)
        .map_err(|e| InferError::file(&tpath, e.to_string()))?;
    if network.classes() != manifest.classes {
        return Err(InferError::file(
            &mpath,
            format!(
                "says {} classes, its graph gives {}",
                manifest.classes,
                network.classes()
            ),
        ));
    }
    let formats = manifest
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.format.clone()))
        .collect();
    Ok(Exported {
        manifest,
        network,
        formats,
    })
}

/// Every tensor the graph reads, and the masks of masked weights, from `st`.
fn read_tensors(
    st: &SafeTensors<'_>,
    manifest: &Manifest,
    tpath: &Path,
) -> Result<(TensorSet, MaskSet)> {
    let bad = |reason: String| InferError::file(tpath, reason);
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
    let weights: BTreeMap<&str, ()> = manifest
        .graph
        .weights()
        .into_iter()
        .map(|(_, w)| (w, ()))
        .collect();
    let mut layer_of: BTreeMap<&str, &ExportedLayer> = BTreeMap::new();
    for l in &manifest.layers {
        if !weights.contains_key(l.name.as_str()) {
            return Err(bad(format!(
                "{MANIFEST_FILE} lists layer '{}', which is no conv or linear weight of its graph",
                l.name
            )));
        }
        if layer_of.insert(&l.name, l).is_some() {
            return Err(bad(format!(
                "{MANIFEST_FILE} lists layer '{}' twice",
                l.name
            )));
        }
    }
    let mut tensors = TensorSet::new();
    let mut masks = MaskSet::new();
    for node in &manifest.graph.nodes {
        for (_, name) in node.op.tensors() {
            if tensors.get(name).is_some() {
                continue;
            }
            match layer_of.get(name).filter(|l| l.masked) {
                Some(l) => {
                    let len = numel(&l.shape)
                        .ok_or_else(|| bad(format!("layer '{name}' {:?} overflows", l.shape)))?;
                    let (_, bits) = tensor(&format!("{name}.mask_bits"), Dtype::U8)?;
                    if bits.len() != len.div_ceil(8) {
                        return Err(bad(format!(
                            "'{name}.mask_bits' has {} bytes, a {:?} mask needs {}",
                            bits.len(),
                            l.shape,
                            len.div_ceil(8)
                        )));
                    }
                    if len % 8 != 0 && bits.last().is_some_and(|&b| b >> (len % 8) != 0) {
                        return Err(bad(format!(
                            "'{name}.mask_bits' sets bits past the {len} entries of its mask"
                        )));
                    }
                    let mask = unpack_bits(bits, len);
                    let (vshape, vb) = tensor(&format!("{name}.values"), Dtype::F32)?;
                    let kept = floats(vb);
                    finite(&format!("{name}.values"), &kept).map_err(bad)?;
                    let ones = mask.iter().filter(|&&b| b != 0).count();
                    if kept.len() != ones || vshape != [ones] {
                        return Err(bad(format!(
                            "'{name}.values' {vshape:?} holds {} values, its mask keeps {ones}",
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
                    tensors.insert_values(name, l.shape.clone(), full)?;
                    masks.insert_bytes(name, &l.shape, mask)?;
                }
                None => {
                    let (s, b) = tensor(name, Dtype::F32)?;
                    let values = floats(b);
                    finite(name, &values).map_err(bad)?;
                    tensors
                        .insert_values(name, s, values)
                        .map_err(|e| bad(e.to_string()))?;
                }
            }
        }
    }
    Ok((tensors, masks))
}

/// Refuses NaN and infinity in a tensor read from a file (they would turn every output into
/// NaN, which accuracy and comparisons then skip silently).
fn finite(name: &str, values: &[f32]) -> std::result::Result<(), String> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!(
            "tensor '{}' holds {} at index {i}; every value must be finite",
            name.escape_debug(),
            values[i]
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_named() {
        assert!(finite("w", &[1.0, 2.0]).is_ok());
        let e = finite("w", &[1.0, f32::NAN]).unwrap_err();
        assert!(e.contains("'w' holds NaN at index 1"), "{e}");
        assert!(finite("b", &[f32::NEG_INFINITY]).is_err());
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
