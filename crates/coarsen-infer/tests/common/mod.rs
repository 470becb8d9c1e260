//! Networks for the tests: graphs built together with random tensors, and random masks of
//! every format.

#![allow(dead_code)]

use coarsen_core::{MaskSet, MatrixView};
use coarsen_infer::format::random_nm_mask;
use coarsen_infer::graph::{AvgPool, BatchNorm, Conv, GraphBuilder, Linear, Op, Pool};
use coarsen_infer::{Formats, Graph, LayerFormat, TensorSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Builds graphs and their tensors together.
pub struct Net {
    pub b: GraphBuilder,
    shapes: Vec<(String, Vec<usize>, Kind)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Weight,
    Other,
    Var,
}

impl Net {
    pub fn new(input: [usize; 3]) -> Net {
        Net {
            b: GraphBuilder::new(input),
            shapes: Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 4],
        dilation: [usize; 2],
        groups: usize,
        bias: bool,
    ) {
        let w = format!("{name}.weight");
        self.shapes.push((
            w.clone(),
            vec![cout, cin / groups, kernel[0], kernel[1]],
            Kind::Weight,
        ));
        let bias = bias.then(|| {
            let b = format!("{name}.bias");
            self.shapes.push((b.clone(), vec![cout], Kind::Other));
            b
        });
        self.b.then(
            Some(name.into()),
            Op::Conv(Conv {
                weight: w,
                bias,
                kernel,
                stride,
                padding,
                dilation,
                groups,
            }),
        );
    }

    pub fn conv3(&mut self, name: &str, cin: usize, cout: usize, stride: usize) {
        self.conv(
            name,
            cin,
            cout,
            [3, 3],
            [stride; 2],
            [1; 4],
            [1, 1],
            1,
            false,
        );
    }

    pub fn bn(&mut self, name: &str, c: usize) {
        let t = |s: &str| format!("{name}.{s}");
        for (s, k) in [
            ("weight", Kind::Other),
            ("bias", Kind::Other),
            ("running_mean", Kind::Other),
            ("running_var", Kind::Var),
        ] {
            self.shapes.push((t(s), vec![c], k));
        }
        self.b.then(
            Some(name.into()),
            Op::BatchNorm(BatchNorm {
                scale: t("weight"),
                bias: t("bias"),
                mean: t("running_mean"),
                var: t("running_var"),
                epsilon: 1e-5,
            }),
        );
    }

    pub fn linear(&mut self, name: &str, fin: usize, fout: usize, bias: bool) {
        let w = format!("{name}.weight");
        self.shapes.push((w.clone(), vec![fout, fin], Kind::Weight));
        let bias = bias.then(|| {
            let b = format!("{name}.bias");
            self.shapes.push((b.clone(), vec![fout], Kind::Other));
            b
        });
        self.b
            .then(Some(name.into()), Op::Linear(Linear { weight: w, bias }));
    }

    pub fn op(&mut self, op: Op) {
        self.b.then(None, op);
    }

    pub fn finish(self, seed: u64) -> (Graph, TensorSet, Vec<(String, Vec<usize>)>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t = TensorSet::new();
        let mut weights = Vec::new();
        for (name, shape, kind) in self.shapes {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| match kind {
                    Kind::Weight => rng.random_range(-0.5f32..0.5),
                    Kind::Other => rng.random_range(-0.5f32..1.0),
                    Kind::Var => rng.random_range(0.5f32..2.0),
                })
                .collect();
            if kind == Kind::Weight {
                weights.push((name.clone(), shape.clone()));
            }
            t.insert_values(name, shape, v).unwrap();
        }
        (self.b.finish(), t, weights)
    }
}

pub fn pool(k: usize, s: usize, p: usize) -> Pool {
    Pool {
        kernel: [k, k],
        stride: [s, s],
        padding: [p; 4],
    }
}

/// A small VGG-style CNN.
pub fn plain() -> Net {
    let mut n = Net::new([2, 12, 12]);
    n.conv3("conv1", 2, 8, 1);
    n.bn("bn1", 8);
    n.op(Op::Relu);
    n.conv3("conv2", 8, 16, 1);
    n.bn("bn2", 16);
    n.op(Op::Relu);
    n.op(Op::MaxPool(pool(2, 2, 0)));
    n.conv3("conv3", 16, 16, 1);
    n.bn("bn3", 16);
    n.op(Op::Relu);
    n.op(Op::MaxPool(pool(2, 2, 0)));
    n.op(Op::Flatten);
    n.linear("fc1", 16 * 9, 24, true);
    n.op(Op::Relu);
    n.linear("fc2", 24, 5, true);
    n
}

/// A residual block with a strided body and a 1×1 shortcut, a dilated convolution, global
/// pooling.
pub fn residual() -> Net {
    let mut n = Net::new([3, 10, 10]);
    n.conv3("conv1", 3, 8, 1);
    n.bn("bn1", 8);
    n.op(Op::Relu);
    let x = n.b.current().to_string();
    n.conv3("body.conv1", 8, 16, 2);
    n.bn("body.bn1", 16);
    n.op(Op::Relu);
    n.conv3("body.conv2", 16, 16, 1);
    n.bn("body.bn2", 16);
    let body = n.b.current().to_string();
    n.b.set_current(x);
    n.conv("short", 8, 16, [1, 1], [2, 2], [0; 4], [1, 1], 1, false);
    n.bn("short.bn", 16);
    let short = n.b.current().to_string();
    n.b.push(None, vec![body, short], Op::Add);
    n.op(Op::Relu);
    // A second residual whose shortcut is the identity.
    let x = n.b.current().to_string();
    n.conv("dil", 16, 16, [3, 3], [1, 1], [2; 4], [2, 2], 1, true);
    n.bn("dil.bn", 16);
    let body = n.b.current().to_string();
    n.b.push(None, vec![body, x], Op::Add);
    n.op(Op::Relu);
    // A third whose body is a stride-1 "same" convolution, which runs in place (the implicit
    // GEMMs add the shortcut in their epilogue).
    let x = n.b.current().to_string();
    n.conv3("same", 16, 16, 1);
    n.bn("same.bn", 16);
    let body = n.b.current().to_string();
    n.b.push(None, vec![x, body], Op::Add);
    n.op(Op::Relu);
    n.op(Op::GlobalAvgPool);
    n.linear("fc", 16, 7, true);
    n
}

/// 64-channel 3×3 layers on 16×16 images, one of them with an identity shortcut: at batch
/// 16 their products have 4096 columns, which run Winograd F(4×4, 3×3) (F(2×2, 3×3) below 1024
/// columns: batches of up to 3).
pub fn wide() -> Net {
    let mut n = Net::new([8, 16, 16]);
    n.conv3("conv1", 8, 64, 1);
    n.bn("bn1", 64);
    n.op(Op::Relu);
    let x = n.b.current().to_string();
    n.conv3("conv2", 64, 64, 1);
    n.bn("bn2", 64);
    let body = n.b.current().to_string();
    n.b.push(None, vec![x, body], Op::Add);
    n.op(Op::Relu);
    n.op(Op::GlobalAvgPool);
    n.linear("fc", 64, 5, true);
    n
}

/// Deep layers on small images: at batch 1 their products have 16 and 4 columns and 576
/// im2col rows (one tile of few columns, made in parallel).
pub fn deep() -> Net {
    let mut n = Net::new([64, 4, 4]);
    n.conv3("conv1", 64, 32, 1);
    n.bn("bn1", 32);
    n.op(Op::Relu);
    n.conv3("conv2", 32, 64, 2);
    n.op(Op::Relu);
    n.conv3("conv3", 64, 32, 1);
    n.bn("bn3", 32);
    n.op(Op::Relu);
    n.op(Op::GlobalAvgPool);
    n.linear("fc", 32, 5, true);
    n
}

/// Everything else: a standalone BatchNorm on the input, a grouped convolution, a
/// non-square kernel with asymmetric padding, max and average pools with padding, a ReLU read
/// twice, a linear layer without bias.
pub fn exotic() -> Net {
    let mut n = Net::new([4, 9, 11]);
    n.bn("in_bn", 4);
    n.conv("g", 4, 8, [3, 3], [1, 1], [1; 4], [1, 1], 2, true);
    n.op(Op::Relu);
    n.conv("rect", 8, 8, [2, 3], [1, 2], [0, 1, 1, 0], [1, 1], 1, false);
    n.bn("rect.bn", 8);
    n.op(Op::Relu);
    let r = n.b.current().to_string();
    n.op(Op::MaxPool(pool(3, 2, 1)));
    let a = n.b.current().to_string();
    n.b.set_current(r);
    n.op(Op::AvgPool(AvgPool {
        window: pool(3, 2, 1),
        count_include_pad: true,
    }));
    let b = n.b.current().to_string();
    n.b.push(None, vec![a, b], Op::Add);
    n.bn("sum.bn", 8);
    n.op(Op::AvgPool(AvgPool {
        window: pool(2, 1, 0),
        count_include_pad: false,
    }));
    n.op(Op::Relu);
    n.op(Op::Flatten);
    n.linear("fc", 8 * 4 * 2, 6, false);
    n
}

pub fn masks_for(
    weights: &[(String, Vec<usize>)],
    fmt: &LayerFormat,
    seed: u64,
) -> (MaskSet, Formats) {
    let mut masks = MaskSet::new();
    let mut formats = Formats::new();
    // The first weight stays dense, like the first convolution of a pruned network.
    for (i, (name, shape)) in weights.iter().enumerate().skip(1) {
        let s = seed + i as u64;
        let view = MatrixView::of(shape).unwrap();
        let f = match fmt {
            LayerFormat::Nm { n, m, col_perm } => {
                let perm = col_perm.as_ref().map(|_| {
                    let mut r = ChaCha8Rng::seed_from_u64(s);
                    let mut v: Vec<usize> = (0..view.in_channels).collect();
                    for a in 0..v.len() {
                        let b = r.random_range(a..v.len());
                        v.swap(a, b);
                    }
                    v
                });
                let mut rng = ChaCha8Rng::seed_from_u64(s);
                let mk = random_nm_mask(&mut rng, view, *n, *m, perm.as_deref());
                masks.insert_bytes(name.clone(), shape, mk).unwrap();
                LayerFormat::Nm {
                    n: *n,
                    m: *m,
                    col_perm: perm,
                }
            }
            LayerFormat::Dense => {
                let mut rng = ChaCha8Rng::seed_from_u64(s);
                let mk = (0..view.len())
                    .map(|_| u8::from(rng.random_bool(0.6)))
                    .collect();
                masks.insert_bytes(name.clone(), shape, mk).unwrap();
                LayerFormat::Dense
            }
            f => {
                let one = coarsen_infer::format::random_masks(
                    &[(name.clone(), shape.clone())],
                    f,
                    0.45,
                    s,
                )
                .unwrap();
                let l = one.get(name).unwrap().clone();
                masks.insert_layer(name.clone(), l);
                f.clone()
            }
        };
        formats.insert(name.clone(), f);
    }
    (masks, formats)
}

pub fn formats() -> Vec<LayerFormat> {
    vec![
        LayerFormat::Dense,
        LayerFormat::Csr,
        LayerFormat::Channel,
        LayerFormat::Group,
        LayerFormat::ShuffledBlock { block: 4 },
        LayerFormat::Bsr {
            height: 4,
            width: 4,
        },
        LayerFormat::Nm {
            n: 2,
            m: 4,
            col_perm: None,
        },
        LayerFormat::Nm {
            n: 1,
            m: 4,
            col_perm: Some(Vec::new()),
        },
    ]
}
