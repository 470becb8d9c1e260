//! Small PNG charts for reports: lines with markers, and bars, with axes, ticks, labels and a
//! legend drawn in the public-domain 8×8 bitmap font of `font8x8`.

use std::path::Path;

use anyhow::{Context, Result};

/// An RGB colour.
pub type Rgb = [u8; 3];

/// Distinct colours for series.
pub const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

const W: usize = 900;
const H: usize = 560;
const LEFT: usize = 90;
const RIGHT: usize = 230;
const TOP: usize = 50;
const BOTTOM: usize = 70;
const SCALE: usize = 2;

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: isize, y: isize, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: isize, y0: isize, x1: isize, y1: isize, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb, thick: isize) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            let (xi, yi) = (x.round() as isize, y.round() as isize);
            self.rect(
                xi - thick / 2,
                yi - thick / 2,
                xi + thick / 2,
                yi + thick / 2,
                c,
            );
        }
    }

    /// Text with its top-left corner at (x, y); `vertical` writes bottom to top.
    fn text(&mut self, x: isize, y: isize, s: &str, c: Rgb, vertical: bool) {
        for (i, ch) in s.chars().enumerate() {
            let code = ch as usize;
            let glyph = if code < 128 {
                font8x8::legacy::BASIC_LEGACY[code]
            } else {
                font8x8::legacy::BASIC_LEGACY[b'?' as usize]
            };
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..8 {
                    if bits >> gx & 1 == 1 {
                        for sy in 0..SCALE {
                            for sx in 0..SCALE {
                                let (dx, dy) =
                                    ((gx * SCALE + sx) as isize, (gy * SCALE + sy) as isize);
                                let off = (i * 8 * SCALE) as isize;
                                if vertical {
                                    self.set(x + dy, y - off - dx, c);
                                } else {
                                    self.set(x + off + dx, y + dy, c);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().context("encoding PNG")?;
            w.write_image_data(&self.px).context("encoding PNG")?;
        }
        coarsen_core::io::write_atomic(path, &bytes)
            .with_context(|| format!("writing {}", path.display()))
    }
}

fn text_width(s: &str) -> usize {
    s.chars().count() * 8 * SCALE
}

/// Tick values: about 5 round steps covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-9 * span {
        out.push(v);
        v += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

/// Plot frame: title, axes, ticks and labels; returns the data → pixel mapping.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64, y: f64) -> (f64, f64) {
        let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
        (
            LEFT as f64 + (x - self.x.0) / (self.x.1 - self.x.0).max(1e-12) * pw,
            (H - BOTTOM) as f64 - (y - self.y.0) / (self.y.1 - self.y.0).max(1e-12) * ph,
        )
    }

    fn draw(&self, c: &mut Canvas, title: &str, xlabel: &str, ylabel: &str, xticks: bool) {
        let grey = [225, 225, 225];
        let black = [0, 0, 0];
        for t in ticks(self.y.0, self.y.1) {
            let (_, py) = self.px(self.x.0, t);
            c.line((LEFT as f64, py), ((W - RIGHT) as f64, py), grey, 1);
            let s = fmt_tick(t);
            c.text(
                LEFT as isize - 8 - text_width(&s) as isize,
                py as isize - 8,
                &s,
                black,
                false,
            );
        }
        if xticks {
            for t in ticks(self.x.0, self.x.1) {
                let (px, _) = self.px(t, self.y.0);
                c.line((px, TOP as f64), (px, (H - BOTTOM) as f64), grey, 1);
                let s = fmt_tick(t);
                c.text(
                    px as isize - text_width(&s) as isize / 2,
                    (H - BOTTOM) as isize + 8,
                    &s,
                    black,
                    false,
                );
            }
        }
        let (x0, y0, x1, y1) = (
            LEFT as f64,
            TOP as f64,
            (W - RIGHT) as f64,
            (H - BOTTOM) as f64,
        );
        c.line((x0, y1), (x1, y1), black, 2);
        c.line((x0, y0), (x0, y1), black, 2);
        c.text(
            (W - text_width(title)) as isize / 2,
            14,
            title,
            black,
            false,
        );
        c.text(
            (LEFT + (W - LEFT - RIGHT) / 2) as isize - text_width(xlabel) as isize / 2,
            (H - 30) as isize,
            xlabel,
            black,
            false,
        );
        c.text(
            12,
            (TOP + (H - TOP - BOTTOM) / 2 + text_width(ylabel) / 2) as isize,
            ylabel,
            black,
            true,
        );
    }
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let pad = ((hi - lo) * 0.08).max(0.5);
    (lo - pad, hi + pad)
}

fn legend(c: &mut Canvas, entries: &[(&str, Rgb)]) {
    for (i, (name, col)) in entries.iter().enumerate() {
        let y = (TOP + 10 + i * 26) as isize;
        let x = (W - RIGHT + 16) as isize;
        c.rect(x, y + 2, x + 14, y + 14, *col);
        c.text(x + 22, y, name, [0, 0, 0], false);
    }
}

/// A line series: name, colour, points (x, y).
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Colour.
    pub color: Rgb,
    /// Points, joined in order.
    pub points: Vec<(f64, f64)>,
}

/// Lines with square markers.
pub fn lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
) -> Result<()> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    let (mut xl, mut xh, mut yl, mut yh) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &all {
        xl = xl.min(x);
        xh = xh.max(x);
        yl = yl.min(y);
        yh = yh.max(y);
    }
    if all.is_empty() {
        (xl, xh, yl, yh) = (0.0, 1.0, 0.0, 1.0);
    }
    let f = Frame {
        x: padded(xl, xh),
        y: padded(yl, yh),
    };
    let mut c = Canvas::new();
    f.draw(&mut c, title, xlabel, ylabel, true);
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| f.px(x, y)).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], s.color, 3);
        }
        for &(x, y) in &pts {
            c.rect(
                x as isize - 5,
                y as isize - 5,
                x as isize + 5,
                y as isize + 5,
                s.color,
            );
        }
    }
    let entries: Vec<(&str, Rgb)> = series.iter().map(|s| (s.name.as_str(), s.color)).collect();
    legend(&mut c, &entries);
    c.save(path)
}

/// Vertical bars from zero, one per (label, value), labelled with their values.
pub fn bars(path: &Path, title: &str, ylabel: &str, items: &[(String, f64)]) -> Result<()> {
    let lo = items.iter().map(|i| i.1).fold(0.0f64, f64::min);
    let hi = items.iter().map(|i| i.1).fold(0.0f64, f64::max);
    let f = Frame {
        x: (0.0, items.len().max(1) as f64),
        y: (lo.min(0.0), if hi > 0.0 { hi * 1.15 } else { 1.0 }),
    };
    let mut c = Canvas::new();
    f.draw(&mut c, title, "", ylabel, false);
    for (i, (_, v)) in items.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        let (x0, y0) = f.px(i as f64 + 0.2, 0.0);
        let (x1, y1) = f.px(i as f64 + 0.8, *v);
        c.rect(x0 as isize, y0 as isize, x1 as isize, y1 as isize, col);
        let s = format!("{v:.1}");
        let ty = if *v >= 0.0 { y1 - 22.0 } else { y1 + 6.0 };
        c.text(
            ((x0 + x1) / 2.0) as isize - text_width(&s) as isize / 2,
            ty as isize,
            &s,
            [0, 0, 0],
            false,
        );
    }
    let entries: Vec<(&str, Rgb)> = items
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (l.as_str(), PALETTE[i % PALETTE.len()]))
        .collect();
    legend(&mut c, &entries);
    c.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.0, 100.0);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let t = ticks(88.3, 92.6);
        assert!(t.first().unwrap() >= &88.3 && t.last().unwrap() <= &92.6);
        assert!(t.len() >= 3);
    }

    #[test]
    fn charts_are_png_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        lines(
            &p,
            "acc",
            "sparsity %",
            "accuracy %",
            &[Series {
                name: "imp".into(),
                color: PALETTE[0],
                points: vec![(0.0, 92.0), (50.0, 91.5)],
            }],
        )
        .unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[1..4], b"PNG");
        let q = dir.path().join("b.png");
        bars(
            &q,
            "t",
            "saving %",
            &[("group".into(), 55.0), ("nm".into(), -3.0)],
        )
        .unwrap();
        assert_eq!(&std::fs::read(&q).unwrap()[1..4], b"PNG");
    }
}
