//! safetensors input and output: weights (f32, f16, bf16, f64) and masks (U8, BOOL), written
//! atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::metadata::{CoarsenMetadata, METADATA_KEY};

/// One tensor of a weights file. Floating-point tensors carry their values as f32; tensors of
/// other dtypes (e.g. BatchNorm's `num_batches_tracked`) are kept by name and shape only.
#[derive(Clone, Debug)]
pub struct WeightTensor {
    /// The tensor's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype in the file (`F32`, `F16`, ...).
    pub dtype: String,
    values: Option<Vec<f32>>,
}

impl WeightTensor {
    /// A f32 tensor. Fails if `values` does not fill `shape`.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        let name = name.into();
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::BadLength {
                tensor: name,
                shape,
                len: values.len(),
            });
        }
        Ok(WeightTensor {
            name,
            shape,
            dtype: "F32".into(),
            values: Some(values),
        })
    }

    /// The values, converted to f32, or `None` for a tensor that is not floating point.
    pub fn values(&self) -> Option<&[f32]> {
        self.values.as_deref()
    }

    /// Fails with [`Error::NonFinite`] at the first NaN or infinity.
    pub fn check_finite(&self, path: &Path) -> Result<()> {
        if let Some(values) = &self.values {
            if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::NonFinite {
                    path: path.to_path_buf(),
                    tensor: self.name.clone(),
                    shape: self.shape.clone(),
                    value,
                    index,
                });
            }
        }
        Ok(())
    }

    /// The values, or [`Error::UnsupportedDtype`] for a tensor that is not floating point.
    pub fn float_values(&self, path: &Path) -> Result<&[f32]> {
        self.values().ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: self.name.clone(),
            shape: self.shape.clone(),
            dtype: self.dtype.clone(),
            expected: "F32, F16, BF16 or F64",
        })
    }
}

/// The tensors of a safetensors weights file, in natural name order.
#[derive(Clone, Debug)]
pub struct WeightFile {
    path: PathBuf,
    tensors: Vec<WeightTensor>,
    by_name: HashMap<String, usize>,
}

impl WeightFile {
    /// Reads a safetensors file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let mut tensors = Vec::with_capacity(st.len());
        for (name, view) in st.tensors() {
            let values = to_f32(view.dtype(), view.data());
            tensors.push(WeightTensor {
                name,
                shape: view.shape().to_vec(),
                dtype: format!("{:?}", view.dtype()),
                values,
            });
        }
        Ok(Self::from_tensors(path, tensors))
    }

    /// A weights set held in memory; `label` stands for the file name in messages.
    pub fn from_tensors(label: impl Into<PathBuf>, mut tensors: Vec<WeightTensor>) -> Self {
        tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        WeightFile {
            path: label.into(),
            tensors,
            by_name,
        }
    }

    /// The file this came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, in natural name order.
    pub fn tensors(&self) -> &[WeightTensor] {
        &self.tensors
    }

    /// The tensor of that name.
    pub fn get(&self, name: &str) -> Option<&WeightTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Writes f32 tensors as a safetensors file, atomically.
    pub fn write_f32(path: impl AsRef<Path>, tensors: &[WeightTensor]) -> Result<()> {
        let path = path.as_ref();
        let mut bufs = Vec::with_capacity(tensors.len());
        for t in tensors {
            let values = t.float_values(path)?;
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bufs.push((t.name.as_str(), t.shape.clone(), bytes));
        }
        let views = bufs
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (*name, v))
                    .map_err(|e| st_error(path, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = safetensors::serialize(views, None).map_err(|e| st_error(path, e))?;
        write_atomic(path, &out)
    }
}

/// One mask tensor: its name, shape and 0/1 bytes in row-major order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskTensor {
    /// The tensor's name (the same as its weight's).
    pub name: String,
    /// Its shape (the same as its weight's).
    pub shape: Vec<usize>,
    /// Row-major bytes, each 0 or 1.
    pub data: Vec<u8>,
}

/// A safetensors mask file: tensors in natural name order, and the coarsen metadata if present.
#[derive(Clone, Debug)]
pub struct MaskFile {
    path: PathBuf,
    tensors: Vec<MaskTensor>,
    by_name: HashMap<String, usize>,
    /// The coarsen object of a structured mask file.
    pub metadata: Option<CoarsenMetadata>,
}

impl MaskFile {
    /// Reads a mask file. U8, I8 and BOOL tensors count any nonzero byte as 1; floating-point
    /// tensors are accepted when every value is exactly 0 or 1.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let mut tensors = Vec::with_capacity(st.len());
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = mask_bytes(path, &name, &shape, view.dtype(), view.data())?;
            tensors.push(MaskTensor { name, shape, data });
        }
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| st_error(path, e))?;
        let metadata = match header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
            None => None,
            Some(json) => Some(serde_json::from_str::<CoarsenMetadata>(json).map_err(|e| {
                Error::Metadata {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?),
        };
        let mut file = Self::new(path, tensors);
        if let Some(m) = &metadata {
            m.validate(path, &file.tensors)?;
        }
        file.metadata = metadata;
        Ok(file)
    }

    /// A mask set held in memory; `label` stands for the file name in messages.
    pub fn new(label: impl Into<PathBuf>, mut tensors: Vec<MaskTensor>) -> Self {
        tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        MaskFile {
            path: label.into(),
            tensors,
            by_name,
            metadata: None,
        }
    }

    /// The file this came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, in natural name order.
    pub fn tensors(&self) -> &[MaskTensor] {
        &self.tensors
    }

    /// The tensors, in natural name order, taken out of the file.
    pub fn into_tensors(self) -> Vec<MaskTensor> {
        self.tensors
    }

    /// The tensor of that name.
    pub fn get(&self, name: &str) -> Option<&MaskTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Writes the masks as U8 tensors with the metadata, atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let views = self
            .tensors
            .iter()
            .map(|t| {
                TensorView::new(Dtype::U8, t.shape.clone(), &t.data)
                    .map(|v| (t.name.as_str(), v))
                    .map_err(|e| st_error(path, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let info = match &self.metadata {
            None => None,
            Some(meta) => {
                meta.validate(path, &self.tensors)?;
                let json = serde_json::to_string(meta).map_err(|e| Error::Metadata {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
                Some(HashMap::from([(METADATA_KEY.to_string(), json)]))
            }
        };
        let out = safetensors::serialize(views, info).map_err(|e| st_error(path, e))?;
        write_atomic(path, &out)
    }
}

/// The lock file [`DirLock`] takes in a directory.
pub const LOCK_FILE: &str = ".coarsen.lock";

/// An exclusive advisory lock on a directory that one command writes (a training run, an
/// export, a demo): a second writer gets [`Error::Locked`] instead of mixing its files with the
/// first one's. The lock is the operating system's (`flock`) on [`LOCK_FILE`], so it ends with
/// the process however the process ends; the file itself stays, empty.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
    dir: PathBuf,
}

impl DirLock {
    /// Creates `dir` if needed and locks it; `what` (e.g. `training`) names the writer in the
    /// error a second one gets.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock {
                _file: file,
                dir: dir.to_path_buf(),
            }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                path: dir.to_path_buf(),
                what: what.to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Name prefix and suffix of [`write_atomic`]'s temporary files.
const TEMP_PREFIX: &str = ".coarsen-";
const TEMP_SUFFIX: &str = ".tmp";

/// Whether a file name is one of [`write_atomic`]'s temporary files (left behind only by a
/// process killed mid-write).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// Temporary files of writes in progress, for [`exit_removing_temporaries`].
static TEMPORARIES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A temporary file listed in [`TEMPORARIES`] while it lives.
struct Temporary(PathBuf);

impl Temporary {
    /// Creates a temporary file in `dir` and lists it, both under the list's lock: a signal's
    /// [`exit_removing_temporaries`] then either finds the file listed or runs before it
    /// exists.
    fn create(dir: &Path) -> std::io::Result<(tempfile::NamedTempFile, Temporary)> {
        let mut list = TEMPORARIES.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(dir)?;
        list.push(tmp.path().to_path_buf());
        let listed = Temporary(tmp.path().to_path_buf());
        Ok((tmp, listed))
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        let mut list = TEMPORARIES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = list.iter().position(|p| *p == self.0) {
            list.swap_remove(i);
        }
    }
}

/// Removes the temporary files of every [`write_atomic`] in progress and exits with `code`:
/// what a process ending on a signal calls, since exiting runs no destructors. The list stays
/// locked until the process is gone, so no write creates a temporary file after the removal
/// (it waits for the lock, which it never gets).
pub fn exit_removing_temporaries(code: i32) -> ! {
    let list = TEMPORARIES.lock().unwrap_or_else(|p| p.into_inner());
    for p in list.iter() {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// failure never leaves a partial file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let (mut tmp, _listed) = Temporary::create(dir).map_err(|e| Error::io(path, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.flush().map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Compares names so that embedded numbers sort by value: `layer2` < `layer10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) if p.is_ascii_digit() && q.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (trim_zeros(&x[..nx]), trim_zeros(&y[..ny]));
                let ord = dx.len().cmp(&dy.len()).then_with(|| dx.cmp(dy));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(p), Some(q)) => {
                if p != q {
                    return p.cmp(q);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| st_error(path, e))?;
    // The header is a JSON object; a name given twice would silently keep the last one.
    if let Some(name) = duplicate_key(header_json(bytes)) {
        return Err(Error::NotSafetensors {
            path: path.to_path_buf(),
            reason: format!("the header names tensor '{}' twice", name.escape_debug()),
        });
    }
    Ok(st)
}

/// The JSON header of a safetensors file whose size the safetensors crate has checked.
fn header_json(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    usize::try_from(n)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .unwrap_or(&[])
}

/// The first key that a JSON object gives twice at its top level.
fn duplicate_key(json: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) && dup.is_none() {
                    dup = Some(key);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de.deserialize_map(Keys).ok().flatten()
}

fn st_error(path: &Path, e: safetensors::SafeTensorError) -> Error {
    use safetensors::SafeTensorError as E;
    let reason = match e {
        E::MetadataIncompleteBuffer | E::InvalidHeaderLength => {
            format!("{e} (is the file truncated?)")
        }
        E::HeaderTooLarge | E::HeaderTooSmall | E::InvalidHeader(_) => {
            format!("{e} (is it a safetensors file at all?)")
        }
        other => other.to_string(),
    };
    Error::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    }
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn mask_bytes(
    path: &Path,
    name: &str,
    shape: &[usize],
    dtype: Dtype,
    data: &[u8],
) -> Result<Vec<u8>> {
    match dtype {
        Dtype::U8 | Dtype::I8 | Dtype::BOOL => Ok(data.iter().map(|&b| u8::from(b != 0)).collect()),
        Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16 => {
            let values = to_f32(dtype, data).unwrap_or_default();
            values
                .iter()
                .enumerate()
                .map(|(index, &v)| match v {
                    0.0 => Ok(0),
                    1.0 => Ok(1),
                    _ => Err(Error::NotBinary {
                        path: path.to_path_buf(),
                        tensor: name.to_string(),
                        shape: shape.to_vec(),
                        value: v as f64,
                        index,
                    }),
                })
                .collect()
        }
        other => Err(Error::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            shape: shape.to_vec(),
            dtype: format!("{other:?}"),
            expected: "U8 or BOOL (or 0/1 floats)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec![
            "layer10.conv",
            "layer2.conv",
            "layer1.conv",
            "fc",
            "layer02",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            vec![
                "fc",
                "layer1.conv",
                "layer02",
                "layer2.conv",
                "layer10.conv"
            ]
        );
    }

    #[test]
    fn weights_round_trip_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let t = WeightTensor::new("a", vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.25]).unwrap();
        WeightFile::write_f32(&p, std::slice::from_ref(&t)).unwrap();
        let back = WeightFile::read(&p).unwrap();
        assert_eq!(back.get("a").unwrap().values(), t.values());

        // f16, bf16 and f64 convert to f32; an I64 tensor is kept without values.
        let f16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = [0.5f32, 4.0]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = [0.25f64, 8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let i64b: Vec<u8> = 7i64.to_le_bytes().to_vec();
        let views = vec![
            ("h", TensorView::new(Dtype::F16, vec![2], &f16).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![2], &bf16).unwrap()),
            ("d", TensorView::new(Dtype::F64, vec![2], &f64b).unwrap()),
            ("n", TensorView::new(Dtype::I64, vec![], &i64b).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(&p, bytes).unwrap();
        let w = WeightFile::read(&p).unwrap();
        assert_eq!(w.get("h").unwrap().values().unwrap(), &[1.5, -2.0]);
        assert_eq!(w.get("b").unwrap().values().unwrap(), &[0.5, 4.0]);
        assert_eq!(w.get("d").unwrap().values().unwrap(), &[0.25, 8.0]);
        assert!(w.get("n").unwrap().values().is_none());
    }

    #[test]
    fn masks_accept_bool_and_binary_floats_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let ok: Vec<u8> = [0.0f32, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let boolb = vec![1u8, 0, 1];
        let views = vec![
            ("f", TensorView::new(Dtype::F32, vec![2], &ok).unwrap()),
            ("b", TensorView::new(Dtype::BOOL, vec![3], &boolb).unwrap()),
        ];
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        let m = MaskFile::read(&p).unwrap();
        assert_eq!(m.get("f").unwrap().data, vec![0, 1]);
        assert_eq!(m.get("b").unwrap().data, vec![1, 0, 1]);

        let bad: Vec<u8> = [0.0f32, 0.3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![("w", TensorView::new(Dtype::F32, vec![2], &bad).unwrap())];
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        let err = MaskFile::read(&p).unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("0.3"), "{err}");
    }

    #[test]
    fn truncated_and_garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let t = WeightTensor::new("a", vec![4], vec![1.0; 4]).unwrap();
        WeightFile::write_f32(&p, &[t]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let err = WeightFile::read(&p).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&p, b"hello, not a tensor file").unwrap();
        let err = WeightFile::read(&p).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
        let err = WeightFile::read(dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
    }

    #[test]
    fn masks_round_trip_with_metadata() {
        use crate::metadata::{LayerMeta, LayerStatus, METADATA_VERSION};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut f = MaskFile::new(
            "mem",
            vec![MaskTensor {
                name: "x".into(),
                shape: vec![2, 2],
                data: vec![1, 0, 0, 1],
            }],
        );
        f.metadata = Some(CoarsenMetadata {
            version: METADATA_VERSION,
            pattern: "nm".into(),
            params: serde_json::json!({"n": 2, "m": 4}),
            layers: [(
                "x".to_string(),
                LayerMeta {
                    status: LayerStatus::Structured,
                    reason: None,
                    col_perm: Some(vec![1, 0]),
                },
            )]
            .into(),
        });
        f.write(&p).unwrap();
        let g = MaskFile::read(&p).unwrap();
        assert_eq!(g.tensors(), f.tensors());
        assert_eq!(g.metadata, f.metadata);
    }
}
