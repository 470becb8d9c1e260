//! Models: MLP, a small VGG-style CNN with BatchNorm, CIFAR VGG-11/16 and ResNet-20/18, with
//! configurable width and input shape. A model is a small program of nodes run over
//! channel-major tensors; parameters carry torchvision-style names, so checkpoints work with
//! `coarsen prune / convert / inspect`.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use coarsen_core::MaskSet;
use coarsen_infer::graph::{self, GraphBuilder, Op};
use coarsen_infer::{Graph, Network, TensorSet};

use crate::error::{Result, TrainError};
use crate::ops::{
    BatchNorm, BatchStats, Conv2d, ConvGeometry, LayerKernel, MaxPool2, WeightMatmul,
};

/// A layer output captured by [`Model::forward_tapped`].
#[derive(Debug)]
pub struct Tap {
    /// The weight's name.
    pub name: String,
    /// The layer's output `[out, ...]`.
    pub output: Tensor,
    /// A zero variable added to the output; its gradient is the output's.
    pub probe: Var,
}

/// A named tensor: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A tensor's shape and values.
pub type ShapedValues = (Vec<usize>, Vec<f32>);

/// The architectures.
pub const MODELS: &[&str] = &["mlp", "cnn", "vgg11", "vgg16", "resnet20", "resnet18"];

/// Which network, how wide, for which inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture: `mlp`, `cnn`, `vgg11`, `vgg16`, `resnet20`, `resnet18`.
    pub name: String,
    /// Width multiplier of every hidden layer (1.0 = the standard widths).
    pub width: f64,
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Output classes.
    pub classes: usize,
}

impl ModelSpec {
    /// The same description as coarsen-infer's export records it.
    pub fn info(&self) -> coarsen_infer::export::ModelInfo {
        coarsen_infer::export::ModelInfo {
            name: self.name.clone(),
            width: self.width,
            input: self.input,
            classes: self.classes,
        }
    }

    /// The description an export records.
    pub fn from_info(m: &coarsen_infer::export::ModelInfo) -> Self {
        ModelSpec {
            name: m.name.clone(),
            width: m.width,
            input: m.input,
            classes: m.classes,
        }
    }
}

/// What a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A convolution weight `[Cout, Cin, k, k]`.
    Conv,
    /// A linear weight `[out, in]`.
    Linear,
    /// A bias or BatchNorm scale/shift (never pruned).
    Other,
}

/// A trainable tensor.
#[derive(Clone, Debug)]
pub struct Param {
    /// torchvision-style name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// The variable.
    pub var: Var,
    /// What it is.
    pub kind: ParamKind,
    /// For conv and linear weights: how the layer multiplies (dense or structured-sparse).
    pub kernel: Option<Arc<LayerKernel>>,
}

impl Param {
    /// Its shape.
    pub fn shape(&self) -> Vec<usize> {
        self.var.as_tensor().dims().to_vec()
    }

    /// Its values.
    pub fn values(&self) -> Result<Vec<f32>> {
        Ok(self.var.as_tensor().flatten_all()?.to_vec1::<f32>()?)
    }

    /// Replaces its values.
    pub fn set_values(&self, v: Vec<f32>) -> Result<()> {
        let t = Tensor::from_vec(v, self.shape(), &Device::Cpu)?;
        self.var.set(&t)?;
        Ok(())
    }
}

/// A non-trained tensor saved with the model (BatchNorm running statistics).
#[derive(Debug)]
pub struct Buffer {
    /// Name, e.g. `bn1.running_mean`.
    pub name: String,
    /// Values.
    pub values: Mutex<Vec<f32>>,
}

#[derive(Debug)]
pub(crate) enum Node {
    Conv {
        w: usize,
        g: ConvGeometry,
    },
    Bn {
        w: usize,
        b: usize,
        mean: usize,
        var: usize,
        stats: Arc<Mutex<BatchStats>>,
        /// A ReLU follows, fused into the normalisation.
        relu: bool,
    },
    Relu,
    MaxPool2,
    GlobalAvgPool,
    Flatten,
    Linear {
        w: usize,
        b: usize,
    },
    Residual {
        body: Vec<Node>,
        shortcut: Vec<Node>,
    },
}

/// A network.
#[derive(Debug)]
pub struct Model {
    /// What it is.
    pub spec: ModelSpec,
    /// Trainable parameters, in order of creation.
    pub params: Vec<Param>,
    /// BatchNorm running statistics.
    pub buffers: Vec<Buffer>,
    pub(crate) nodes: Vec<Node>,
}

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

struct Builder {
    params: Vec<Param>,
    buffers: Vec<Buffer>,
    rng: ChaCha8Rng,
}

impl Builder {
    fn param(
        &mut self,
        name: String,
        shape: Vec<usize>,
        values: Vec<f32>,
        kind: ParamKind,
    ) -> Result<usize> {
        let var = Var::from_vec(values, shape, &Device::Cpu)?;
        let kernel = matches!(kind, ParamKind::Conv | ParamKind::Linear).then(LayerKernel::dense);
        self.params.push(Param {
            name,
            var,
            kind,
            kernel,
        });
        Ok(self.params.len() - 1)
    }

    fn conv(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<Node> {
        // Kaiming normal, fan-out (torchvision's ResNet/VGG initialisation).
        let std = (2.0 / (cout * k * k) as f32).sqrt();
        let normal = Normal::new(0.0f32, std)
            .map_err(|e| TrainError::config("init", name, e.to_string()))?;
        let vals = (0..cout * cin * k * k)
            .map(|_| normal.sample(&mut self.rng))
            .collect();
        let w = self.param(
            format!("{name}.weight"),
            vec![cout, cin, k, k],
            vals,
            ParamKind::Conv,
        )?;
        Ok(Node::Conv {
            w,
            g: ConvGeometry {
                k,
                stride,
                pad: k / 2,
            },
        })
    }

    fn bn(&mut self, name: &str, c: usize) -> Result<Node> {
        let w = self.param(
            format!("{name}.weight"),
            vec![c],
            vec![1.0; c],
            ParamKind::Other,
        )?;
        let b = self.param(
            format!("{name}.bias"),
            vec![c],
            vec![0.0; c],
            ParamKind::Other,
        )?;
        self.buffers.push(Buffer {
            name: format!("{name}.running_mean"),
            values: Mutex::new(vec![0.0; c]),
        });
        self.buffers.push(Buffer {
            name: format!("{name}.running_var"),
            values: Mutex::new(vec![1.0; c]),
        });
        let mean = self.buffers.len() - 2;
        Ok(Node::Bn {
            w,
            b,
            mean,
            var: mean + 1,
            stats: Default::default(),
            relu: false,
        })
    }

    fn linear(&mut self, name: &str, fin: usize, fout: usize) -> Result<Node> {
        // PyTorch's default: uniform in ±1/√fan-in for weight and bias.
        let bound = 1.0 / (fin.max(1) as f32).sqrt();
        let uni = Uniform::new_inclusive(-bound, bound)
            .map_err(|e| TrainError::config("init", name, e.to_string()))?;
        let wv = (0..fout * fin).map(|_| uni.sample(&mut self.rng)).collect();
        let bv = (0..fout).map(|_| uni.sample(&mut self.rng)).collect();
        let w = self.param(
            format!("{name}.weight"),
            vec![fout, fin],
            wv,
            ParamKind::Linear,
        )?;
        let b = self.param(format!("{name}.bias"), vec![fout], bv, ParamKind::Other)?;
        Ok(Node::Linear { w, b })
    }
}

fn scaled(c: usize, width: f64) -> usize {
    ((c as f64 * width).round() as usize).max(1)
}

/// Merges every BatchNorm directly followed by a ReLU into one node.
fn fuse(nodes: Vec<Node>) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::with_capacity(nodes.len());
    for node in nodes {
        match (node, out.last_mut()) {
            (Node::Relu, Some(Node::Bn { relu, .. })) if !*relu => *relu = true,
            (Node::Residual { body, shortcut }, _) => out.push(Node::Residual {
                body: fuse(body),
                shortcut: fuse(shortcut),
            }),
            (n, _) => out.push(n),
        }
    }
    out
}

/// The largest width multiplier a model is built with.
pub const MAX_WIDTH: f64 = 64.0;
/// The largest input channel count, height or width.
pub const MAX_INPUT_SIDE: usize = 4096;
/// The most classes.
pub const MAX_CLASSES: usize = 1 << 20;

impl Model {
    /// Builds a model with seeded random initial weights.
    pub fn new(spec: &ModelSpec, seed: u64) -> Result<Model> {
        if !(spec.width > 0.0 && spec.width.is_finite()) {
            return Err(TrainError::config("width", spec.width, "must be positive"));
        }
        // Sizes read from a file (experiment.json, a config, an export) bound the tensors to
        // allocate: far past any real network they are an error, not an overflow or an
        // allocation failure.
        if spec.width > MAX_WIDTH {
            return Err(TrainError::config(
                "width",
                spec.width,
                format!("must be at most {MAX_WIDTH}"),
            ));
        }
        if let Some(d) = spec.input.iter().find(|&&d| d == 0 || d > MAX_INPUT_SIDE) {
            return Err(TrainError::config(
                "input",
                format!("{:?}", spec.input),
                format!("every size must lie in 1..={MAX_INPUT_SIDE} (found {d})"),
            ));
        }
        if spec.classes == 0 || spec.classes > MAX_CLASSES {
            return Err(TrainError::config(
                "classes",
                spec.classes,
                format!("must lie in 1..={MAX_CLASSES}"),
            ));
        }
        let mut b = Builder {
            params: Vec::new(),
            buffers: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        let [cin, h, w] = spec.input;
        let wd = spec.width;
        let nodes = match spec.name.as_str() {
            "mlp" => {
                let (h1, h2) = (scaled(300, wd), scaled(100, wd));
                vec![
                    Node::Flatten,
                    b.linear("fc1", cin * h * w, h1)?,
                    Node::Relu,
                    b.linear("fc2", h1, h2)?,
                    Node::Relu,
                    b.linear("fc3", h2, spec.classes)?,
                ]
            }
            "cnn" => {
                let (c1, c2, c3, f) = (
                    scaled(16, wd),
                    scaled(32, wd),
                    scaled(64, wd),
                    scaled(128, wd),
                );
                let (ho, wo) = (h / 4, w / 4);
                vec![
                    b.conv("conv1", cin, c1, 3, 1)?,
                    b.bn("bn1", c1)?,
                    Node::Relu,
                    b.conv("conv2", c1, c2, 3, 1)?,
                    b.bn("bn2", c2)?,
                    Node::Relu,
                    Node::MaxPool2,
                    b.conv("conv3", c2, c3, 3, 1)?,
                    b.bn("bn3", c3)?,
                    Node::Relu,
                    Node::MaxPool2,
                    Node::Flatten,
                    b.linear("fc1", c3 * ho * wo, f)?,
                    Node::Relu,
                    b.linear("fc2", f, spec.classes)?,
                ]
            }
            "vgg11" | "vgg16" => {
                const M: usize = 0;
                let cfg: &[usize] = if spec.name == "vgg11" {
                    &[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]
                } else {
                    &[
                        64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512,
                        M,
                    ]
                };
                let (mut nodes, mut c, mut idx, mut side) = (Vec::new(), cin, 0, h.min(w));
                for &v in cfg {
                    if v == M {
                        // Pooling stops once the feature map is down to 1×1 (small inputs).
                        if side >= 2 {
                            nodes.push(Node::MaxPool2);
                            side /= 2;
                        }
                        idx += 1;
                        continue;
                    }
                    let out = scaled(v, wd);
                    nodes.push(b.conv(&format!("features.{idx}"), c, out, 3, 1)?);
                    nodes.push(b.bn(&format!("features.{}", idx + 1), out)?);
                    nodes.push(Node::Relu);
                    idx += 3;
                    c = out;
                }
                nodes.push(Node::GlobalAvgPool);
                nodes.push(b.linear("classifier", c, spec.classes)?);
                nodes
            }
            "resnet20" | "resnet18" => {
                let (widths, blocks): (&[usize], &[usize]) = if spec.name == "resnet20" {
                    (&[16, 32, 64], &[3, 3, 3])
                } else {
                    (&[64, 128, 256, 512], &[2, 2, 2, 2])
                };
                let w0 = scaled(widths[0], wd);
                let mut nodes = vec![
                    b.conv("conv1", cin, w0, 3, 1)?,
                    b.bn("bn1", w0)?,
                    Node::Relu,
                ];
                let mut c = w0;
                for (l, (&wl, &nb)) in widths.iter().zip(blocks).enumerate() {
                    let out = scaled(wl, wd);
                    for bi in 0..nb {
                        let stride = if l > 0 && bi == 0 { 2 } else { 1 };
                        let p = format!("layer{}.{}", l + 1, bi);
                        let body = vec![
                            b.conv(&format!("{p}.conv1"), c, out, 3, stride)?,
                            b.bn(&format!("{p}.bn1"), out)?,
                            Node::Relu,
                            b.conv(&format!("{p}.conv2"), out, out, 3, 1)?,
                            b.bn(&format!("{p}.bn2"), out)?,
                        ];
                        let shortcut = if stride != 1 || c != out {
                            vec![
                                b.conv(&format!("{p}.downsample.0"), c, out, 1, stride)?,
                                b.bn(&format!("{p}.downsample.1"), out)?,
                            ]
                        } else {
                            Vec::new()
                        };
                        nodes.push(Node::Residual { body, shortcut });
                        nodes.push(Node::Relu);
                        c = out;
                    }
                }
                nodes.push(Node::GlobalAvgPool);
                nodes.push(b.linear("fc", c, spec.classes)?);
                nodes
            }
            other => {
                return Err(TrainError::config(
                    "model",
                    other,
                    format!("unknown architecture; known: {}", MODELS.join(", ")),
                ))
            }
        };
        Ok(Model {
            spec: spec.clone(),
            params: b.params,
            buffers: b.buffers,
            nodes: fuse(nodes),
        })
    }

    /// The parameter of that name.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Conv and linear weights, in forward order.
    pub fn weights(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.kind != ParamKind::Other)
    }

    /// The weights pruned by default (Structure-LTH): every conv but the first, every linear
    /// layer but the classifier (a model without convs keeps all its linear layers but the last).
    pub fn default_prunable(&self) -> Vec<String> {
        let w: Vec<&Param> = self.weights().collect();
        let first_conv = w.iter().position(|p| p.kind == ParamKind::Conv);
        let last = w.len().saturating_sub(1);
        w.iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != first_conv && i != last)
            .map(|(_, p)| p.name.clone())
            .collect()
    }

    /// Logits `[batch, classes]` of a channel-major batch `[C, B, H, W]`. In training mode,
    /// BatchNorm uses batch statistics and updates its running averages.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.run(&self.nodes, x.clone(), train, &mut None)?;
        Ok(y.t()?.contiguous()?)
    }

    /// Logits and, for every conv and linear layer, a zero probe added to its output
    /// (pre-normalisation, channel-major `[out, ...]`), by weight name: feature and saliency
    /// scores of channels are computed from the layer output and the probe's gradient.
    /// The output passes through `+ probe` with a zero variable of its shape, so that
    /// `grads.get(probe)` after a backward pass is the gradient at the layer output (candle keeps
    /// gradients of variables only). Returned: (name, layer output, probe).
    pub fn forward_tapped(&self, x: &Tensor, train: bool) -> Result<(Tensor, Vec<Tap>)> {
        let mut taps = Some(Vec::new());
        let y = self.run(&self.nodes, x.clone(), train, &mut taps)?;
        Ok((y.t()?.contiguous()?, taps.unwrap_or_default()))
    }

    fn run(
        &self,
        nodes: &[Node],
        mut x: Tensor,
        train: bool,
        taps: &mut Option<Vec<Tap>>,
    ) -> Result<Tensor> {
        for node in nodes {
            x = match node {
                Node::Conv { w, g } => {
                    let p = &self.params[*w];
                    let kernel = p.kernel.clone().unwrap_or_else(LayerKernel::dense);
                    let y = p.var.as_tensor().apply_op2(
                        &x.contiguous()?,
                        Conv2d {
                            geometry: *g,
                            kernel,
                            relu: false,
                        },
                    )?;
                    tap(taps, &p.name, y)?
                }
                Node::Bn {
                    w,
                    b,
                    mean,
                    var,
                    stats,
                    relu,
                } => self.batch_norm(&x, (*w, *b, *mean, *var), stats, *relu, train)?,
                Node::Relu => x.relu()?,
                Node::MaxPool2 => x.contiguous()?.apply_op1(MaxPool2)?,
                Node::GlobalAvgPool => x.mean((2, 3))?,
                Node::Flatten => match x.dims().len() {
                    4 => {
                        let &[c, b, h, w] = x.dims() else {
                            unreachable!()
                        };
                        x.permute((0, 2, 3, 1))?
                            .contiguous()?
                            .reshape((c * h * w, b))?
                    }
                    _ => x,
                },
                Node::Linear { w, b } => {
                    let p = &self.params[*w];
                    let kernel = p.kernel.clone().unwrap_or_else(LayerKernel::dense);
                    let y = p
                        .var
                        .as_tensor()
                        .apply_op2(&x.contiguous()?, WeightMatmul(kernel))?;
                    let bias = self.params[*b].var.as_tensor();
                    let y = y.broadcast_add(&bias.reshape((bias.dims()[0], 1))?)?;
                    tap(taps, &p.name, y)?
                }
                Node::Residual { body, shortcut } => {
                    let main = self.run(body, x.clone(), train, taps)?;
                    let side = if shortcut.is_empty() {
                        x
                    } else {
                        self.run(shortcut, x, train, taps)?
                    };
                    (main + side)?
                }
            };
        }
        Ok(x)
    }

    /// `at` holds the indices of γ, β (parameters), running mean and variance (buffers).
    fn batch_norm(
        &self,
        x: &Tensor,
        at: (usize, usize, usize, usize),
        stats: &Arc<Mutex<BatchStats>>,
        relu: bool,
        train: bool,
    ) -> Result<Tensor> {
        let (w, b, mean, var) = at;
        let c = x.dims()[0];
        let m = x.elem_count() / c.max(1);
        let flat = x.contiguous()?.reshape((c, m))?;
        let (gamma, beta) = (
            self.params[w].var.as_tensor(),
            self.params[b].var.as_tensor(),
        );
        let y = if train {
            let op = BatchNorm {
                eps: BN_EPS,
                stats: stats.clone(),
                relu,
            };
            let y = flat.apply_op3(gamma, beta, op)?;
            let st = stats.lock().unwrap_or_else(|p| p.into_inner());
            let unbias = if m > 1 {
                m as f32 / (m - 1) as f32
            } else {
                1.0
            };
            let mut rm = self.buffers[mean]
                .values
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut rv = self.buffers[var]
                .values
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for ch in 0..c {
                rm[ch] = (1.0 - BN_MOMENTUM) * rm[ch] + BN_MOMENTUM * st.mean[ch];
                rv[ch] = (1.0 - BN_MOMENTUM) * rv[ch] + BN_MOMENTUM * st.var[ch] * unbias;
            }
            y
        } else {
            let rm = self.buffers[mean]
                .values
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let rv = self.buffers[var]
                .values
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let g = gamma.to_vec1::<f32>()?;
            let bb = beta.to_vec1::<f32>()?;
            let scale: Vec<f32> = (0..c).map(|i| g[i] / (rv[i] + BN_EPS).sqrt()).collect();
            let shift: Vec<f32> = (0..c).map(|i| bb[i] - rm[i] * scale[i]).collect();
            let s = Tensor::from_vec(scale, (c, 1), &Device::Cpu)?;
            let t = Tensor::from_vec(shift, (c, 1), &Device::Cpu)?;
            let y = flat.broadcast_mul(&s)?.broadcast_add(&t)?;
            if relu {
                y.relu()?
            } else {
                y
            }
        };
        Ok(y.reshape(x.dims())?)
    }

    /// Every parameter and buffer as (name, shape, values), for saving.
    pub fn state(&self) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::with_capacity(self.params.len() + self.buffers.len());
        for p in &self.params {
            out.push((p.name.clone(), p.shape(), p.values()?));
        }
        for bf in &self.buffers {
            let v = bf.values.lock().unwrap_or_else(|p| p.into_inner()).clone();
            out.push((bf.name.clone(), vec![v.len()], v));
        }
        Ok(out)
    }

    /// Loads parameters and buffers by name; every one of the model's must be present with its
    /// shape.
    pub fn load_state(
        &self,
        lookup: &dyn Fn(&str) -> Option<ShapedValues>,
        source: &std::path::Path,
    ) -> Result<()> {
        for p in &self.params {
            let (shape, v) = lookup(&p.name).ok_or_else(|| TrainError::Checkpoint {
                path: source.to_path_buf(),
                reason: format!("no tensor '{}' for the {} model", p.name, self.spec.name),
            })?;
            if shape != p.shape() {
                return Err(TrainError::Checkpoint {
                    path: source.to_path_buf(),
                    reason: format!(
                        "tensor '{}' has shape {:?}, the model needs {:?}",
                        p.name,
                        shape,
                        p.shape()
                    ),
                });
            }
            p.set_values(v)?;
        }
        for bf in &self.buffers {
            let (shape, v) = lookup(&bf.name).ok_or_else(|| TrainError::Checkpoint {
                path: source.to_path_buf(),
                reason: format!("no tensor '{}' for the {} model", bf.name, self.spec.name),
            })?;
            let mut cur = bf.values.lock().unwrap_or_else(|p| p.into_inner());
            // A BatchNorm statistic has one value per channel, neither fewer (it panicked) nor
            // more (they were ignored).
            if shape != [cur.len()] || v.len() != cur.len() {
                return Err(TrainError::Checkpoint {
                    path: source.to_path_buf(),
                    reason: format!(
                        "tensor '{}' has shape {:?}, the model needs [{}]",
                        bf.name,
                        shape,
                        cur.len()
                    ),
                });
            }
            *cur = v;
        }
        Ok(())
    }

    /// The network as coarsen-infer's explicit graph: the same nodes, named after their
    /// weights (`conv1`, `bn1`, `layer1.0.conv1`, …), reading tensors of the same names as the
    /// parameters and buffers.
    pub fn graph(&self) -> Graph {
        let mut g = GraphBuilder::new(self.spec.input);
        self.describe(&self.nodes, &mut g);
        g.finish()
    }

    fn describe(&self, nodes: &[Node], g: &mut GraphBuilder) {
        let stem = |i: usize| {
            let n = &self.params[i].name;
            n.strip_suffix(".weight").unwrap_or(n).to_string()
        };
        for node in nodes {
            match node {
                Node::Conv { w, g: geo } => {
                    g.then(
                        Some(stem(*w)),
                        Op::Conv(graph::Conv {
                            weight: self.params[*w].name.clone(),
                            bias: None,
                            kernel: [geo.k; 2],
                            stride: [geo.stride; 2],
                            padding: [geo.pad; 4],
                            dilation: [1, 1],
                            groups: 1,
                        }),
                    );
                }
                Node::Bn {
                    w,
                    b,
                    mean,
                    var,
                    relu,
                    ..
                } => {
                    g.then(
                        Some(stem(*w)),
                        Op::BatchNorm(graph::BatchNorm {
                            scale: self.params[*w].name.clone(),
                            bias: self.params[*b].name.clone(),
                            mean: self.buffers[*mean].name.clone(),
                            var: self.buffers[*var].name.clone(),
                            epsilon: BN_EPS,
                        }),
                    );
                    if *relu {
                        g.then(None, Op::Relu);
                    }
                }
                Node::Relu => {
                    g.then(None, Op::Relu);
                }
                Node::MaxPool2 => {
                    g.then(
                        None,
                        Op::MaxPool(graph::Pool {
                            kernel: [2, 2],
                            stride: [2, 2],
                            padding: [0; 4],
                        }),
                    );
                }
                Node::GlobalAvgPool => {
                    g.then(None, Op::GlobalAvgPool);
                }
                Node::Flatten => {
                    g.then(None, Op::Flatten);
                }
                Node::Linear { w, b } => {
                    g.then(
                        Some(stem(*w)),
                        Op::Linear(graph::Linear {
                            weight: self.params[*w].name.clone(),
                            bias: Some(self.params[*b].name.clone()),
                        }),
                    );
                }
                Node::Residual { body, shortcut } => {
                    let x = g.current().to_string();
                    self.describe(body, g);
                    let a = g.current().to_string();
                    g.set_current(x.clone());
                    self.describe(shortcut, g);
                    let b = g.current().to_string();
                    g.push(None, vec![a, b], Op::Add);
                }
            }
        }
    }

    /// Every parameter and buffer as named tensors.
    pub fn tensors(&self) -> Result<TensorSet> {
        let mut t = TensorSet::new();
        for (name, shape, values) in self.state()? {
            t.insert_values(name, shape, values)?;
        }
        Ok(t)
    }

    /// The network with its current weights under `masks`, for coarsen-infer.
    pub fn network(&self, masks: &MaskSet) -> Result<Network> {
        Ok(Network::new(self.graph(), self.tensors()?, masks.clone())?)
    }

    /// Loads every parameter and buffer from a weights file (torchvision names, every tensor
    /// of the model present with its shape, every value finite; other tensors are ignored).
    pub fn load_weights(&self, file: &coarsen_core::WeightFile) -> Result<()> {
        for t in file.tensors() {
            t.check_finite(file.path())?;
        }
        let lookup = |n: &str| {
            file.get(n)
                .and_then(|t| t.values().map(|v| (t.shape.clone(), v.to_vec())))
        };
        self.load_state(&lookup, file.path())
    }

    /// Number of conv and linear weights.
    pub fn weight_count(&self) -> usize {
        self.weights()
            .map(|p| p.shape().iter().product::<usize>())
            .sum()
    }
}

/// With `taps`, records a layer's output `y` and returns `y` plus a zero probe (whose gradient
/// is the gradient of the output); without, returns `y`.
fn tap(taps: &mut Option<Vec<Tap>>, name: &str, y: Tensor) -> Result<Tensor> {
    let Some(t) = taps.as_mut() else {
        return Ok(y);
    };
    let probe = Var::zeros(y.shape(), y.dtype(), y.device())?;
    let out = (&y + probe.as_tensor())?;
    t.push(Tap {
        name: name.to_string(),
        output: y,
        probe,
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, input: [usize; 3]) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            width: 0.25,
            input,
            classes: 10,
        }
    }

    #[test]
    fn every_model_runs_forward_and_backward() {
        for (name, input) in [
            ("mlp", [1, 28, 28]),
            ("cnn", [1, 28, 28]),
            ("vgg11", [3, 32, 32]),
            ("vgg16", [1, 28, 28]),
            ("resnet20", [3, 32, 32]),
            ("resnet18", [1, 28, 28]),
        ] {
            let m = Model::new(&spec(name, input), 1).unwrap();
            let b = 3;
            let x = Tensor::from_vec(
                (0..input[0] * b * input[1] * input[2])
                    .map(|i| (i % 7) as f32 * 0.1)
                    .collect(),
                (input[0], b, input[1], input[2]),
                &Device::Cpu,
            )
            .unwrap();
            let logits = m.forward(&x, true).unwrap();
            assert_eq!(logits.dims(), &[b, 10], "{name}");
            let loss = logits.sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            for p in &m.params {
                assert!(
                    grads.get(p.var.as_tensor()).is_some(),
                    "{name}: no gradient for {}",
                    p.name
                );
            }
            let eval = m.forward(&x, false).unwrap();
            assert_eq!(eval.dims(), &[b, 10]);
            assert!(!m.default_prunable().is_empty());
        }
    }

    #[test]
    fn names_follow_torchvision_and_state_round_trips() {
        let m = Model::new(&spec("resnet18", [3, 32, 32]), 2).unwrap();
        assert!(m.param("layer2.0.downsample.0.weight").is_some());
        assert!(m.param("fc.weight").is_some());
        let prunable = m.default_prunable();
        assert!(!prunable.contains(&"conv1.weight".to_string()));
        assert!(!prunable.contains(&"fc.weight".to_string()));
        let state = m.state().unwrap();
        let other = Model::new(&spec("resnet18", [3, 32, 32]), 3).unwrap();
        let lookup = |n: &str| {
            state
                .iter()
                .find(|s| s.0 == n)
                .map(|s| (s.1.clone(), s.2.clone()))
        };
        other
            .load_state(&lookup, std::path::Path::new("mem"))
            .unwrap();
        assert_eq!(
            other.param("fc.weight").unwrap().values().unwrap(),
            m.param("fc.weight").unwrap().values().unwrap()
        );
        let bad = |n: &str| {
            if n == "fc.weight" {
                Some((vec![1], vec![0.0]))
            } else {
                lookup(n)
            }
        };
        assert!(other.load_state(&bad, std::path::Path::new("mem")).is_err());
        assert!(Model::new(&spec("alexnet", [3, 32, 32]), 0).is_err());
    }

    /// Sizes from a file bound what is allocated: a width of 1.8e19 (found by the fuzzer in
    /// a mutated experiment.json) overflowed a multiplication and panicked.
    #[test]
    fn absurd_sizes_are_errors() {
        let spec = |width: f64, input: [usize; 3], classes: usize| ModelSpec {
            name: "cnn".into(),
            width,
            input,
            classes,
        };
        for s in [
            spec(1.8446744073709552e19, [1, 8, 8], 4),
            spec(f64::NAN, [1, 8, 8], 4),
            spec(1.0, [0, 8, 8], 4),
            spec(1.0, [1, 1 << 40, 8], 4),
            spec(1.0, [1, 8, 8], 0),
        ] {
            assert!(Model::new(&s, 0).is_err(), "{s:?}");
        }
        assert!(Model::new(&spec(0.25, [1, 8, 8], 4), 0).is_ok());
    }
}
