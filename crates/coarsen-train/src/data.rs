//! Data sets: MNIST-format IDX files (gzip or raw; Fashion-MNIST by default) and the CIFAR-10
//! binary format, split into train / validation / test, normalised, and served as batches in the
//! channel-major layout the models use, with seeded shuffling and augmentation.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainError};

/// Where Debian's `dataset-fashion-mnist` package puts Fashion-MNIST.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Images with labels, normalised, in `[n, channels, height, width]` order.
#[derive(Clone, Debug)]
pub struct Images {
    /// Number of images.
    pub n: usize,
    /// Channels per image.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Pixels, normalised per channel.
    pub pixels: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
}

impl Images {
    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn take(&self, idx: std::ops::Range<usize>) -> Images {
        let l = self.image_len();
        Images {
            n: idx.len(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            pixels: self.pixels[idx.start * l..idx.end * l].to_vec(),
            labels: self.labels[idx].to_vec(),
        }
    }
}

/// A data set split for training.
#[derive(Clone, Debug)]
pub struct DataSplits {
    /// Its name (`fashion-mnist`, `mnist-format`, `cifar10`).
    pub name: String,
    /// Where it was read from.
    pub source: PathBuf,
    /// Training images.
    pub train: Images,
    /// Validation images (held out from the training file).
    pub val: Images,
    /// Test images.
    pub test: Images,
    /// Number of classes.
    pub classes: usize,
    /// Per-channel mean used for normalisation (of pixels scaled to [0, 1]).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation used for normalisation.
    pub std: Vec<f32>,
}

impl DataSplits {
    /// The same splits with only the first `n` training images.
    pub fn with_train_subset(&self, n: usize) -> DataSplits {
        DataSplits {
            train: self.train.take(0..n.min(self.train.n)),
            ..self.clone()
        }
    }
}

/// Whether `dir` holds Fashion-MNIST, by its name (as the loader names the data set).
pub fn is_fashion(dir: &Path) -> bool {
    dir.to_string_lossy().contains("fashion")
}

/// Whether `dir` holds CIFAR-10 binary batches (directly or in `cifar-10-batches-bin/`).
pub fn is_cifar(dir: &Path) -> bool {
    dir.join("data_batch_1.bin").exists()
        || dir
            .join("cifar-10-batches-bin")
            .join("data_batch_1.bin")
            .exists()
}

/// Loads a data set from `dir`: CIFAR-10 binary files (`data_batch_1.bin` ... `test_batch.bin`,
/// also inside `cifar-10-batches-bin/`) or MNIST-format IDX files (`train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or
/// with `.gz`). The last `val` training images are held out for validation. Pixels are scaled
/// to [0, 1] and normalised with the training split's per-channel mean and deviation.
pub fn load(dir: &Path, val: usize) -> Result<DataSplits> {
    if !dir.is_dir() {
        return Err(TrainError::Data {
            path: dir.to_path_buf(),
            reason: if dir == Path::new(DEFAULT_DATA_DIR) {
                "no such directory; install Fashion-MNIST with `apt-get install dataset-fashion-mnist` or give --data DIR".into()
            } else {
                "no such directory".into()
            },
        });
    }
    let cifar = [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("data_batch_1.bin").exists());
    let (name, mut train, mut test) = match cifar {
        Some(d) => {
            let mut parts = Vec::new();
            for i in 1..=5 {
                parts.push(read_cifar(&d.join(format!("data_batch_{i}.bin")))?);
            }
            let train = concat(parts);
            (
                "cifar10".to_string(),
                train,
                read_cifar(&d.join("test_batch.bin"))?,
            )
        }
        None => {
            let train = read_idx_pair(dir, "train")?;
            let test = read_idx_pair(dir, "t10k")?;
            let name = if is_fashion(dir) {
                "fashion-mnist"
            } else {
                "mnist-format"
            };
            (name.to_string(), train, test)
        }
    };
    if val >= train.n {
        return Err(TrainError::config(
            "validation split",
            val,
            format!("the training set has only {} images", train.n),
        ));
    }
    let classes = classes_of(dir, &train.labels, &test.labels)?;
    let (mean, std) = channel_stats(&train, train.n - val);
    for im in [&mut train, &mut test] {
        normalise(im, &mean, &std);
    }
    let val_set = train.take(train.n - val..train.n);
    let train_set = train.take(0..train.n - val);
    Ok(DataSplits {
        name,
        source: dir.to_path_buf(),
        train: train_set,
        val: val_set,
        test,
        classes,
        mean,
        std,
    })
}

/// The number of classes: the training labels' largest plus one, every class in between
/// present among the training labels, and every test label among them. A corrupted label (a
/// 200 among digits) would otherwise make 201 classes, most of them empty.
fn classes_of(dir: &Path, train: &[u32], test: &[u32]) -> Result<usize> {
    let bad = |reason: String| TrainError::Data {
        path: dir.to_path_buf(),
        reason,
    };
    let Some(&max) = train.iter().max() else {
        return Err(bad("the training set has no images".into()));
    };
    let classes = max as usize + 1;
    let mut count = vec![0usize; classes];
    for &l in train {
        count[l as usize] += 1;
    }
    if let Some(missing) = count.iter().position(|&c| c == 0) {
        let at = train.iter().position(|&l| l == max).unwrap_or(0);
        return Err(bad(format!(
            "the training labels run up to {max} (image {at}) but no image has label {missing}; are the labels corrupted?"
        )));
    }
    if let Some((i, l)) = test
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(bad(format!(
            "test image {i} has label {l}, outside the training set's classes 0..{}",
            classes - 1
        )));
    }
    if test.is_empty() {
        return Err(bad("the test set has no images".into()));
    }
    Ok(classes)
}

/// The bytes of a file, gunzipped when it is gzip data.
pub fn read_all(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| TrainError::Data {
                path: path.to_path_buf(),
                reason: format!("corrupt gzip data: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn find_idx(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(TrainError::Data {
        path: dir.to_path_buf(),
        reason: format!("missing {stem} (or {stem}.gz): not an MNIST-format or CIFAR-10 directory"),
    })
}

fn read_idx_pair(dir: &Path, prefix: &str) -> Result<Images> {
    let ip = find_idx(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = find_idx(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (dims, pixels) = parse_idx(&ip, &read_all(&ip)?, 3)?;
    let (ldims, labels) = parse_idx(&lp, &read_all(&lp)?, 1)?;
    if dims[0] != ldims[0] {
        return Err(TrainError::Data {
            path: lp,
            reason: format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                ip.display()
            ),
        });
    }
    Ok(Images {
        n: dims[0],
        channels: 1,
        height: dims[1],
        width: dims[2],
        pixels: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: labels.iter().map(|&l| l as u32).collect(),
    })
}

/// Parses an IDX file of unsigned bytes with `rank` dimensions.
pub fn parse_idx(path: &Path, bytes: &[u8], rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |reason: String| TrainError::Data {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 + 4 * rank {
        return Err(bad(format!(
            "{} bytes: too short for an IDX header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != rank {
        return Err(bad(format!(
            "not an IDX file of unsigned bytes with {rank} dimensions (magic {:02x} {:02x} {:02x} {:02x})",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as usize
        })
        .collect();
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        return Err(bad(format!(
            "dimension {i} of {dims:?} is 0; a data set holds at least one image of at least one pixel"
        )));
    }
    let len = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let body = &bytes[4 + 4 * rank..];
    if body.len() != len {
        return Err(bad(format!(
            "dimensions {dims:?} need {len} bytes of data, found {} (truncated?)",
            body.len()
        )));
    }
    Ok((dims, body.to_vec()))
}

/// Reads one CIFAR-10 binary batch: records of 1 label byte and 3072 pixel bytes.
fn read_cifar(path: &Path) -> Result<Images> {
    let bytes = read_all(path).map_err(|e| match e {
        TrainError::Io { path, .. } => TrainError::Data {
            path,
            reason: "missing CIFAR-10 batch file".into(),
        },
        other => other,
    })?;
    parse_cifar(path, &bytes)
}

/// Parses a CIFAR-10 binary batch (`path` names it in errors): records of 1 label byte (0..10)
/// and 3×32×32 pixel bytes; pixels scaled to [0, 1].
pub fn parse_cifar(path: &Path, bytes: &[u8]) -> Result<Images> {
    const REC: usize = 1 + 3 * 32 * 32;
    if bytes.is_empty() || !bytes.len().is_multiple_of(REC) {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes is not a whole number of 3073-byte CIFAR-10 records",
                bytes.len()
            ),
        });
    }
    let n = bytes.len() / REC;
    let mut pixels = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for rec in bytes.chunks_exact(REC) {
        if rec[0] > 9 {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                reason: format!("label {} out of range 0..10", rec[0]),
            });
        }
        labels.push(rec[0] as u32);
        pixels.extend(rec[1..].iter().map(|&p| p as f32 / 255.0));
    }
    Ok(Images {
        n,
        channels: 3,
        height: 32,
        width: 32,
        pixels,
        labels,
    })
}

fn concat(parts: Vec<Images>) -> Images {
    let first = parts[0].clone();
    let mut out = Images {
        n: 0,
        pixels: Vec::new(),
        labels: Vec::new(),
        ..first
    };
    for p in parts {
        out.n += p.n;
        out.pixels.extend(p.pixels);
        out.labels.extend(p.labels);
    }
    out
}

/// Per-channel mean and standard deviation of the first `n` images.
fn channel_stats(im: &Images, n: usize) -> (Vec<f32>, Vec<f32>) {
    let hw = im.height * im.width;
    let mut mean = vec![0.0f64; im.channels];
    let mut sq = vec![0.0f64; im.channels];
    for i in 0..n {
        for c in 0..im.channels {
            let px = &im.pixels[(i * im.channels + c) * hw..(i * im.channels + c + 1) * hw];
            for &p in px {
                mean[c] += p as f64;
                sq[c] += (p as f64) * (p as f64);
            }
        }
    }
    let count = (n * hw).max(1) as f64;
    let m: Vec<f32> = mean.iter().map(|&s| (s / count) as f32).collect();
    let s: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(&q, &s)| ((q / count - (s / count).powi(2)).max(1e-12)).sqrt() as f32)
        .collect();
    (m, s)
}

fn normalise(im: &mut Images, mean: &[f32], std: &[f32]) {
    let hw = im.height * im.width;
    for (k, px) in im.pixels.chunks_mut(hw).enumerate() {
        let c = k % im.channels;
        for p in px {
            *p = (*p - mean[c]) / std[c];
        }
    }
}

/// Data augmentation of training batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Random crop after zero-padding every side by this many pixels (0 = off).
    pub crop_pad: usize,
    /// Random horizontal flips.
    pub flip: bool,
}

/// A batch in channel-major layout `[channels, batch, height, width]` with its labels.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Pixels, `[channels, size, height, width]`.
    pub pixels: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Images in the batch.
    pub size: usize,
}

/// The order of training images in `epoch`: a permutation seeded by `(seed, epoch)` only, so a
/// resumed run sees the same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    ));
    idx
}

/// The batch of images `indices`, augmented with the RNG of `(seed, epoch, batch)` when
/// `augment` is given.
pub fn make_batch(
    im: &Images,
    indices: &[usize],
    augment: Option<(&Augment, &[f32])>,
    rng_key: (u64, usize, usize),
) -> Batch {
    let (c, h, w) = (im.channels, im.height, im.width);
    let b = indices.len();
    let mut pixels = vec![0.0f32; c * b * h * w];
    let mut rng = ChaCha8Rng::seed_from_u64(
        rng_key.0
            ^ (rng_key.1 as u64).rotate_left(20)
            ^ (rng_key.2 as u64).wrapping_mul(0x5851_f42d_4c95_7f2d),
    );
    for (k, &i) in indices.iter().enumerate() {
        let (dy, dx, flip, pad, fill) = match augment {
            Some((a, fill)) => {
                let p = a.crop_pad as i64;
                let dy = if p > 0 { rng.random_range(-p..=p) } else { 0 };
                let dx = if p > 0 { rng.random_range(-p..=p) } else { 0 };
                (dy, dx, a.flip && rng.random_bool(0.5), p, Some(fill))
            }
            None => (0, 0, false, 0, None),
        };
        let _ = pad;
        for ch in 0..c {
            let src = &im.pixels[((i * c) + ch) * h * w..((i * c) + ch + 1) * h * w];
            let dst = &mut pixels[((ch * b) + k) * h * w..((ch * b) + k + 1) * h * w];
            let zero = fill.map_or(0.0, |f| f[ch]);
            for y in 0..h {
                let sy = y as i64 + dy;
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx = xx as i64 + dx;
                    dst[y * w + x] = if sy >= 0 && sy < h as i64 && sx >= 0 && sx < w as i64 {
                        src[sy as usize * w + sx as usize]
                    } else {
                        zero
                    };
                }
            }
        }
    }
    Batch {
        pixels,
        labels: indices.iter().map(|&i| im.labels[i]).collect(),
        size: b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    fn write_mnist(dir: &Path, n: u32, gz: bool) {
        let write = |name: &str, data: Vec<u8>| {
            if gz {
                let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
                let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
                std::io::Write::write_all(&mut e, &data).unwrap();
                e.finish().unwrap();
            } else {
                std::fs::write(dir.join(name), data).unwrap();
            }
        };
        for prefix in ["train", "t10k"] {
            let px: Vec<u8> = (0..n * 16).map(|i| (i % 251) as u8).collect();
            let lb: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
            write(
                &format!("{prefix}-images-idx3-ubyte"),
                idx_bytes(&[n, 4, 4], &px),
            );
            write(&format!("{prefix}-labels-idx1-ubyte"), idx_bytes(&[n], &lb));
        }
    }

    #[test]
    fn reads_idx_raw_and_gzip_with_split_and_normalisation() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_mnist(dir.path(), 30, gz);
            let d = load(dir.path(), 5).unwrap();
            assert_eq!((d.train.n, d.val.n, d.test.n, d.classes), (25, 5, 30, 10));
            assert_eq!(d.train.image_len(), 16);
            let mean: f32 = d.train.pixels.iter().sum::<f32>() / d.train.pixels.len() as f32;
            assert!(mean.abs() < 1e-4, "normalised mean {mean}");
            assert_eq!(d.val.labels[0], 5);
        }
    }

    #[test]
    fn malformed_data_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("nope"), 0).unwrap_err().to_string();
        assert!(err.contains("no such directory"), "{err}");
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
        write_mnist(dir.path(), 10, false);
        let p = dir.path().join("t10k-images-idx3-ubyte");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&p, b"\x00\x00\x0d\x03 twelve bytes").unwrap();
        assert!(load(dir.path(), 0)
            .unwrap_err()
            .to_string()
            .contains("not an IDX file"));
    }

    /// Sizes and labels read from a file are checked: a zero dimension (it panicked), no test
    /// image (it reported 0.00%), a corrupted label (it made more classes), a test label
    /// outside the training classes.
    #[test]
    fn sizes_and_labels_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        write_mnist(dir.path(), 20, false);
        let img = dir.path().join("t10k-images-idx3-ubyte");
        let lab = dir.path().join("t10k-labels-idx1-ubyte");
        std::fs::write(&img, idx_bytes(&[20, 0, 4], &[])).unwrap();
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("dimension 1") && err.contains("is 0"), "{err}");
        std::fs::write(&img, idx_bytes(&[0, 4, 4], &[])).unwrap();
        std::fs::write(&lab, idx_bytes(&[0], &[])).unwrap();
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("is 0"), "{err}");
        // Dimensions whose product overflows.
        std::fs::write(&img, idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[1, 2, 3])).unwrap();
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("overflow") || err.contains("need"), "{err}");
        write_mnist(dir.path(), 20, false);
        let mut labels: Vec<u8> = (0..20).map(|i| (i % 10) as u8).collect();
        labels[7] = 200;
        std::fs::write(&lab, idx_bytes(&[20], &labels)).unwrap();
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("test image 7 has label 200"), "{err}");
        write_mnist(dir.path(), 20, false);
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx_bytes(&[20], &labels),
        )
        .unwrap();
        let err = load(dir.path(), 0).unwrap_err().to_string();
        assert!(
            err.contains("up to 200 (image 7)") && err.contains("label 10"),
            "{err}"
        );
    }

    #[test]
    fn reads_cifar_records() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |label: u8| {
            let mut r = vec![label];
            r.extend((0..3072).map(|i| (i % 256) as u8));
            r
        };
        for i in 1..=5 {
            std::fs::write(
                dir.path().join(format!("data_batch_{i}.bin")),
                [rec(0), rec(1)].concat(),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("test_batch.bin"), rec(1)).unwrap();
        let d = load(dir.path(), 2).unwrap();
        assert_eq!(
            (d.name.as_str(), d.train.n, d.test.n, d.train.channels),
            ("cifar10", 8, 1, 3)
        );
        std::fs::write(dir.path().join("test_batch.bin"), vec![0u8; 100]).unwrap();
        assert!(load(dir.path(), 2)
            .unwrap_err()
            .to_string()
            .contains("3073-byte"));
    }

    #[test]
    fn batches_are_channel_major_and_seeded() {
        let im = Images {
            n: 2,
            channels: 2,
            height: 2,
            width: 2,
            pixels: (0..16).map(|v| v as f32).collect(),
            labels: vec![7, 8],
        };
        let b = make_batch(&im, &[1, 0], None, (0, 0, 0));
        // Channel 0 of image 1, then channel 0 of image 0, then channel 1 of each.
        assert_eq!(&b.pixels[..8], &[8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0]);
        assert_eq!(b.labels, vec![8, 7]);
        let aug = Augment {
            crop_pad: 1,
            flip: true,
        };
        let fill = [0.0, 0.0];
        let x = make_batch(&im, &[0, 1], Some((&aug, &fill)), (1, 2, 3));
        let y = make_batch(&im, &[0, 1], Some((&aug, &fill)), (1, 2, 3));
        assert_eq!(x.pixels, y.pixels);
        assert_eq!(epoch_order(10, 4, 2), epoch_order(10, 4, 2));
        assert_ne!(epoch_order(10, 4, 2), epoch_order(10, 4, 3));
    }
}
