//! The graph's semantics, written as plainly as possible: a naive interpreter over NCHW batches
//! in f64, with masks applied to the weights. It is the reference the engine, the ONNX export
//! and the numpy loader are tested against; it is far too slow for anything else.

use std::collections::HashMap;

use crate::error::{InferError, Result};
use crate::graph::{Op, INPUT};
use crate::network::Network;

/// A batch of feature maps `[N, C, H, W]`, row-major.
#[derive(Clone, Debug)]
struct Value {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    v: Vec<f64>,
}

impl Value {
    fn at(&self, n: usize, c: usize, y: usize, x: usize) -> f64 {
        self.v[((n * self.c + c) * self.h + y) * self.w + x]
    }

    fn zeros(n: usize, c: usize, h: usize, w: usize) -> Value {
        Value {
            n,
            c,
            h,
            w,
            v: vec![0.0; n * c * h * w],
        }
    }
}

/// Logits `[batch, classes]` of the NCHW batch `x`, by the definition of every node.
pub fn forward_nchw(net: &Network, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    let [c, h, w] = net.input();
    if x.len() != batch * c * h * w {
        return Err(InferError::param(
            "input",
            format!("{} values", x.len()),
            format!("a batch of {batch} images of [{c}, {h}, {w}]"),
        ));
    }
    let mut vals: HashMap<&str, Value> = HashMap::new();
    vals.insert(
        INPUT,
        Value {
            n: batch,
            c,
            h,
            w,
            v: x.iter().map(|&v| v as f64).collect(),
        },
    );
    let t = |name: &str| -> Result<Vec<f64>> {
        Ok(net.masked_values(name)?.iter().map(|&v| v as f64).collect())
    };
    for node in &net.graph().nodes {
        let a = &vals[node.inputs[0].as_str()];
        let shape = net.shapes()[&node.name];
        let (n, [co, ho, wo]) = (a.n, shape);
        let mut y = Value::zeros(n, co, ho, wo);
        match &node.op {
            Op::Conv(cv) => {
                let wt = t(&cv.weight)?;
                let bias = cv.bias.as_deref().map(t).transpose()?;
                let [kh, kw] = cv.kernel;
                let (cin_g, per_out) = (a.c / cv.groups, co / cv.groups);
                for b in 0..n {
                    for o in 0..co {
                        let g = o / per_out;
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let mut s = bias.as_ref().map_or(0.0, |bv| bv[o]);
                                for ci in 0..cin_g {
                                    for ky in 0..kh {
                                        for kx in 0..kw {
                                            let iy = (oy * cv.stride[0] + ky * cv.dilation[0])
                                                as isize
                                                - cv.padding[0] as isize;
                                            let ix = (ox * cv.stride[1] + kx * cv.dilation[1])
                                                as isize
                                                - cv.padding[1] as isize;
                                            if iy < 0
                                                || ix < 0
                                                || iy >= a.h as isize
                                                || ix >= a.w as isize
                                            {
                                                continue;
                                            }
                                            let wv = wt[((o * cin_g + ci) * kh + ky) * kw + kx];
                                            s += wv
                                                * a.at(b, g * cin_g + ci, iy as usize, ix as usize);
                                        }
                                    }
                                }
                                y.v[((b * co + o) * ho + oy) * wo + ox] = s;
                            }
                        }
                    }
                }
            }
            Op::Linear(l) => {
                let wt = t(&l.weight)?;
                let bias = l.bias.as_deref().map(t).transpose()?;
                for b in 0..n {
                    for o in 0..co {
                        let mut s = bias.as_ref().map_or(0.0, |bv| bv[o]);
                        for i in 0..a.c {
                            s += wt[o * a.c + i] * a.v[b * a.c + i];
                        }
                        y.v[b * co + o] = s;
                    }
                }
            }
            Op::BatchNorm(bn) => {
                let (g, be, m, var) = (t(&bn.scale)?, t(&bn.bias)?, t(&bn.mean)?, t(&bn.var)?);
                for (i, v) in y.v.iter_mut().enumerate() {
                    let ch = (i / (ho * wo)) % co;
                    *v = (a.v[i] - m[ch]) / (var[ch] + bn.epsilon as f64).sqrt() * g[ch] + be[ch];
                }
            }
            Op::Relu => y.v = a.v.iter().map(|&v| v.max(0.0)).collect(),
            Op::MaxPool(p) | Op::AvgPool(crate::graph::AvgPool { window: p, .. }) => {
                let avg = match &node.op {
                    Op::AvgPool(ap) => Some(ap.count_include_pad),
                    _ => None,
                };
                for b in 0..n {
                    for ch in 0..co {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let (mut best, mut sum, mut count) = (f64::NEG_INFINITY, 0.0, 0);
                                let mut padded = 0;
                                for ky in 0..p.kernel[0] {
                                    for kx in 0..p.kernel[1] {
                                        let iy = (oy * p.stride[0] + ky) as isize
                                            - p.padding[0] as isize;
                                        let ix = (ox * p.stride[1] + kx) as isize
                                            - p.padding[1] as isize;
                                        let inside_padded = iy < (a.h + p.padding[2]) as isize
                                            && ix < (a.w + p.padding[3]) as isize;
                                        if inside_padded {
                                            padded += 1;
                                        }
                                        if iy < 0
                                            || ix < 0
                                            || iy >= a.h as isize
                                            || ix >= a.w as isize
                                        {
                                            continue;
                                        }
                                        let v = a.at(b, ch, iy as usize, ix as usize);
                                        best = best.max(v);
                                        sum += v;
                                        count += 1;
                                    }
                                }
                                y.v[((b * co + ch) * ho + oy) * wo + ox] = match avg {
                                    None => best,
                                    Some(true) => sum / padded.max(1) as f64,
                                    Some(false) => sum / count.max(1) as f64,
                                };
                            }
                        }
                    }
                }
            }
            Op::GlobalAvgPool => {
                let hw = a.h * a.w;
                for (i, v) in y.v.iter_mut().enumerate() {
                    *v = a.v[i * hw..(i + 1) * hw].iter().sum::<f64>() / hw as f64;
                }
            }
            Op::Flatten => y.v = a.v.clone(),
            Op::Add => {
                let b = &vals[node.inputs[1].as_str()];
                y.v = a.v.iter().zip(&b.v).map(|(p, q)| p + q).collect();
            }
        }
        vals.insert(&node.name, y);
    }
    let out = &vals[net.graph().output.as_str()];
    Ok(out.v.iter().map(|&v| v as f32).collect())
}
