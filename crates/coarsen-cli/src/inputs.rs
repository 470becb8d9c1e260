//! Images from the user's files, for `coarsen predict` and `coarsen bench --serve`: IDX
//! (MNIST format, gzip or raw), CIFAR-10 binary batches, NumPy `.npy` arrays and PNG images.
//! Everything is checked against the network's input shape where it enters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use coarsen_infer::export::Preprocessing;
use coarsen_infer::numel;

/// A batch of images for a network.
#[derive(Debug)]
pub struct Inputs {
    /// Images.
    pub n: usize,
    /// Network inputs (normalised), channel-major `[C, N, H, W]`.
    pub pixels: Vec<f32>,
    /// Per image: the file it came from and its index in that file.
    pub origin: Vec<(PathBuf, usize)>,
    /// Labels, when the files carry them (CIFAR-10 batches, IDX with a labels file).
    pub labels: Option<Vec<u32>>,
}

/// How raw values become network inputs.
#[derive(Clone, Copy, Debug)]
pub struct Scaling<'a> {
    /// The network's normalisation of pixels in [0, 1] (none: pixels are used as they are).
    pub preprocessing: Option<&'a Preprocessing>,
    /// Float arrays are network inputs already: neither scaled nor normalised.
    pub normalized: bool,
}

/// The images of one file, image-major `[N, C, H, W]`.
struct Decoded {
    n: usize,
    values: Vec<f32>,
    labels: Option<Vec<u32>>,
    /// Pixels in [0, 1] (to normalise); otherwise network inputs already.
    pixels: bool,
}

/// Reads every file and stacks their images (all of the network's `[C, H, W]` shape).
/// `labels` is an IDX labels file for the images of all files, in order.
pub fn read(
    paths: &[PathBuf],
    labels: Option<&Path>,
    input: [usize; 3],
    classes: usize,
    scaling: Scaling<'_>,
) -> Result<Inputs> {
    if let Some(p) = scaling.preprocessing {
        p.check(input[0])?;
    }
    let hw = input[1] * input[2];
    let mut values: Vec<f32> = Vec::new();
    let mut origin = Vec::new();
    let mut found: Vec<Option<Vec<u32>>> = Vec::new();
    for path in paths {
        let mut d = decode(path, input, scaling.normalized)
            .with_context(|| format!("{}", path.display()))?;
        if let (Some(p), true) = (scaling.preprocessing, d.pixels) {
            for (i, v) in d.values.iter_mut().enumerate() {
                let c = (i / hw) % input[0];
                *v = (*v - p.mean[c]) / p.std[c];
            }
        }
        if let Some(i) = d.values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: holds a non-finite value ({}) at flat index {i}",
                path.display(),
                d.values[i]
            );
        }
        origin.extend((0..d.n).map(|i| (path.clone(), i)));
        values.extend(d.values);
        found.push(d.labels);
    }
    let n = origin.len();
    if n == 0 {
        bail!("no images in {}", list(paths));
    }
    let labels = match labels {
        Some(lp) => {
            let l = idx_labels(lp)?;
            if l.len() != n {
                bail!(
                    "{}: {} labels for the {n} images of {}",
                    lp.display(),
                    l.len(),
                    list(paths)
                );
            }
            Some(l)
        }
        // Labels only when every file has them.
        None => found
            .into_iter()
            .collect::<Option<Vec<Vec<u32>>>>()
            .map(|v| v.concat()),
    };
    if let Some(bad) = labels.iter().flatten().find(|&&c| c as usize >= classes) {
        bail!("label {bad} is out of range: the network has {classes} classes");
    }
    Ok(Inputs {
        n,
        pixels: coarsen_infer::nchw_to_cbhw(&values, n, input),
        origin,
        labels,
    })
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decodes one file by its content (magic bytes); `.bin` files are CIFAR-10 batches.
fn decode(path: &Path, input: [usize; 3], normalized: bool) -> Result<Decoded> {
    let bytes = coarsen_train::data::read_all(path)?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if bytes.starts_with(b"\x93NUMPY") {
        npy(&bytes, input, normalized)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png_image(&bytes, input)
    } else if bytes.starts_with(&[0, 0, 0x08, 3]) {
        idx_images(path, &bytes, input)
    } else if ext == "bin" {
        cifar(path, &bytes, input)
    } else {
        bail!("not a .npy, PNG, IDX (idx3-ubyte) or CIFAR-10 binary (.bin) file");
    }
}

fn fits(what: &str, got: [usize; 3], input: [usize; 3]) -> Result<()> {
    if got != input {
        bail!(
            "{what} are {}x{}x{} (C x H x W); the network takes {}x{}x{}",
            got[0],
            got[1],
            got[2],
            input[0],
            input[1],
            input[2]
        );
    }
    Ok(())
}

/// An `.npy` array: `[N, C, H, W]`, `[C, H, W]` (one image), `[N, H, W, C]` (channels last, when
/// that is the only reading that fits), or `[N, H, W]` / `[H, W]` for one channel. `uint8` holds
/// pixels 0..255; `float32`/`float64` pixels in [0, 1], or network inputs with `normalized`.
fn npy(bytes: &[u8], input: [usize; 3], normalized: bool) -> Result<Decoded> {
    let mut rest: &[u8] = bytes;
    let file = npyz::NpyFile::new(&mut rest).context("not a readable .npy file")?;
    let header = file.header().clone();
    let data: &[u8] = file.into_inner();
    let dtype = match header.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => bail!(
            "dtype {}: expected uint8, float32 or float64",
            other.descr()
        ),
    };
    let item = match dtype.as_str() {
        "|u1" | "<u1" => 1,
        "<f4" => 4,
        "<f8" => 8,
        other => bail!("dtype {other}: expected uint8, float32 or float64 (little-endian)"),
    };
    if header.order() == npyz::Order::Fortran {
        bail!("Fortran-ordered array: save it with numpy.ascontiguousarray");
    }
    let shape: Vec<usize> = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .context("a dimension does not fit in memory")?;
    let len = numel(&shape).context("the array's size overflows")?;
    if len.checked_mul(item) != Some(data.len()) {
        bail!(
            "shape {shape:?} of {dtype} needs {} bytes of data, the file holds {}",
            len.saturating_mul(item),
            data.len()
        );
    }
    let [c, h, w] = input;
    let (n, channels_last) = match shape[..] {
        [n, a, b, d] if [a, b, d] == [c, h, w] => (n, false),
        [n, b, d, a] if [b, d, a] == [h, w, c] => (n, true),
        [a, b, d] if [a, b, d] == [c, h, w] => (1, false),
        [n, b, d] if c == 1 && [b, d] == [h, w] => (n, false),
        [b, d] if c == 1 && [b, d] == [h, w] => (1, false),
        _ => bail!(
            "shape {shape:?} is not a batch of the network's {c}x{h}x{w} images ([N, C, H, W], [N, H, W, C], [C, H, W]{})",
            if c == 1 { ", [N, H, W] or [H, W]" } else { "" }
        ),
    };
    let header_data = npyz::NpyFile::with_header(header, data);
    let raw: Vec<f32> = match item {
        1 => header_data
            .into_vec::<u8>()?
            .into_iter()
            .map(|v| v as f32 / 255.0)
            .collect(),
        4 => header_data.into_vec::<f32>()?,
        _ => header_data
            .into_vec::<f64>()?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
    };
    let values = if channels_last {
        // [N, H, W, C] → [N, C, H, W].
        let mut v = vec![0.0f32; raw.len()];
        for i in 0..n {
            for p in 0..h * w {
                for ch in 0..c {
                    v[(i * c + ch) * h * w + p] = raw[(i * h * w + p) * c + ch];
                }
            }
        }
        v
    } else {
        raw
    };
    Ok(Decoded {
        n,
        values,
        labels: None,
        pixels: item == 1 || !normalized,
    })
}

/// A PNG image (grey, grey+alpha, RGB, RGBA or palette; 8 or 16 bits), converted to the
/// network's channels: grey → RGB by repetition, RGB → grey by luminance (ITU-R BT.601);
/// alpha is dropped.
fn png_image(bytes: &[u8], input: [usize; 3]) -> Result<Decoded> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().context("not a readable PNG image")?;
    let (w, h) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    let [c, hh, ww] = input;
    // The size is checked before anything as large as the image is allocated.
    if (h, w) != (hh, ww) {
        bail!("the image is {w}x{h} pixels; the network takes {ww}x{hh}");
    }
    let size = reader
        .output_buffer_size()
        .filter(|&n| numel(&[w, h, 4]).is_some_and(|most| n <= most))
        .context("implausible PNG size")?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).context("corrupt PNG data")?;
    let src_channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("palette image left unexpanded"),
    };
    if !matches!(c, 1 | 3) {
        bail!("the network takes {c} channels; PNG images give 1 or 3");
    }
    let stride = frame.line_size;
    let mut values = vec![0.0f32; c * h * w];
    for y in 0..h {
        let row = &buf[y * stride..y * stride + w * src_channels];
        for x in 0..w {
            let px = &row[x * src_channels..(x + 1) * src_channels];
            let rgb = match src_channels {
                1 | 2 => [px[0]; 3],
                _ => [px[0], px[1], px[2]],
            };
            if c == 1 {
                let l = 0.299 * rgb[0] as f32 + 0.587 * rgb[1] as f32 + 0.114 * rgb[2] as f32;
                values[y * w + x] = l / 255.0;
            } else {
                for (ch, &v) in rgb.iter().enumerate() {
                    values[(ch * h + y) * w + x] = v as f32 / 255.0;
                }
            }
        }
    }
    Ok(Decoded {
        n: 1,
        values,
        labels: None,
        pixels: true,
    })
}

/// An IDX file of `[N, H, W]` unsigned bytes (MNIST's images format).
fn idx_images(path: &Path, bytes: &[u8], input: [usize; 3]) -> Result<Decoded> {
    let (dims, data) = coarsen_train::data::parse_idx(path, bytes, 3)?;
    fits("the images", [1, dims[1], dims[2]], input)?;
    Ok(Decoded {
        n: dims[0],
        values: data.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: None,
        pixels: true,
    })
}

/// An IDX file of labels (`[N]` unsigned bytes).
fn idx_labels(path: &Path) -> Result<Vec<u32>> {
    let bytes = coarsen_train::data::read_all(path)?;
    let (_, data) = coarsen_train::data::parse_idx(path, &bytes, 1)?;
    Ok(data.iter().map(|&l| l as u32).collect())
}

/// A CIFAR-10 binary batch: records of one label byte and 3×32×32 pixel bytes.
fn cifar(path: &Path, bytes: &[u8], input: [usize; 3]) -> Result<Decoded> {
    fits("CIFAR-10 images", [3, 32, 32], input)?;
    let im = coarsen_train::data::parse_cifar(path, bytes)?;
    Ok(Decoded {
        n: im.n,
        values: im.pixels,
        labels: Some(im.labels),
        pixels: true,
    })
}

/// Writes a float32 `.npy` array of `shape`, atomically.
pub fn write_npy(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    use npyz::WriterBuilder;
    let mut buf = Vec::new();
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(&mut buf)
        .begin_nd()?;
    w.extend(values.iter().copied())?;
    w.finish()?;
    coarsen_core::io::write_atomic(path, &buf)?;
    Ok(())
}
