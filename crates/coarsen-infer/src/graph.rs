//! The network description: an explicit graph of nodes, enough to rebuild and run a network
//! without any other knowledge of the model that produced it.
//!
//! A [`Graph`] takes one input, a batch of images `[N, C, H, W]` (NCHW, like PyTorch and
//! ONNX), and runs its [`Node`]s in the order listed. Every node reads earlier values by name
//! ([`INPUT`] is the graph's input, any other name the output of the node of that name) and
//! writes one value named after itself. Every value is a batch of feature maps `[N, C, H, W]`;
//! a flattened or linear value is `[N, F, 1, 1]`. The node named by [`Graph::output`] gives the
//! logits.
//!
//! Parameters live in a [`TensorSet`](crate::TensorSet), referenced by name. The semantics of
//! each operation (what the engine, the ONNX export and the numpy reference loader all compute):
//!
//! | op | computes |
//! |---|---|
//! | `conv` | `y[n,o,i,j] = bias[o] + Σ_{c,ky,kx} w[o,c,ky,kx] · x[n, g·C/G + c, i·sh + ky·dh − pt, j·sw + kx·dw − pl]` (zero padding; `g` the group of `o`) |
//! | `linear` | `y[n,o] = bias[o] + Σ_i w[o,i] · x[n,i]` on a `[N, F, 1, 1]` input |
//! | `batch_norm` | `y = (x − mean[c]) / √(var[c] + epsilon) · scale[c] + bias[c]` |
//! | `relu` | `max(x, 0)` |
//! | `max_pool` | the maximum over the window, padding ignored (floor output size) |
//! | `avg_pool` | the mean over the window; the padding counts when `count_include_pad` |
//! | `global_avg_pool` | the mean over `H × W` → `[N, C, 1, 1]` |
//! | `flatten` | `[N, C, H, W]` → `[N, C·H·W, 1, 1]`, index `c·H·W + y·W + x` (PyTorch's `flatten(1)`) |
//! | `add` | the sum of its two inputs, of equal shapes |

use std::collections::{BTreeMap, HashMap};

use coarsen_kernels::conv::ConvGeometry;
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::tensors::numel;

/// The most values one image's value (the input or a node's output) may hold: 2³¹, 8 GiB of
/// f32 — a bound that keeps a hostile description from making the engine allocate without
/// limit.
pub const MAX_VALUE: usize = 1 << 31;

/// The name of the graph's input value.
pub const INPUT: &str = "input";

/// A network: its input, its nodes in evaluation order, and the node giving the logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// One image: channels, height, width. A batch is `[N, C, H, W]`.
    pub input: [usize; 3],
    /// The nodes, each after every node it reads.
    pub nodes: Vec<Node>,
    /// The node whose output is the logits, `[N, classes, 1, 1]`.
    pub output: String,
}

/// One operation of a [`Graph`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Its name, which is also the name of its output value.
    pub name: String,
    /// The values it reads: [`INPUT`] or earlier nodes' names.
    pub inputs: Vec<String>,
    /// What it computes.
    #[serde(flatten)]
    pub op: Op,
}

/// The operations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// 2-D convolution.
    Conv(Conv),
    /// Fully connected layer on a flattened input.
    Linear(Linear),
    /// Batch normalisation with running statistics (inference mode).
    BatchNorm(BatchNorm),
    /// `max(x, 0)`.
    Relu,
    /// Max pooling.
    MaxPool(Pool),
    /// Average pooling.
    AvgPool(AvgPool),
    /// Mean over all positions of each channel.
    GlobalAvgPool,
    /// `[N, C, H, W]` → `[N, C·H·W, 1, 1]`, channel-major.
    Flatten,
    /// Element-wise sum of two values of the same shape.
    Add,
}

/// A 2-D convolution. Its weight is `[Cout, Cin / groups, kh, kw]` (PyTorch's layout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv {
    /// The weight tensor.
    pub weight: String,
    /// The bias tensor `[Cout]`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// Kernel height and width (the weight's last two dimensions).
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Zero padding: top, left, bottom, right.
    pub padding: [usize; 4],
    /// Dilation along height and width.
    pub dilation: [usize; 2],
    /// Groups: input and output channels are split into this many groups, each convolved on
    /// its own.
    pub groups: usize,
}

impl Conv {
    /// The geometry as coarsen-kernels takes it.
    pub fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        }
    }
}

/// A fully connected layer: weight `[out, in]`, optional bias `[out]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// The weight tensor.
    pub weight: String,
    /// The bias tensor, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
}

/// Batch normalisation in inference mode; every tensor is `[C]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    /// γ.
    pub scale: String,
    /// β.
    pub bias: String,
    /// Running mean.
    pub mean: String,
    /// Running variance.
    pub var: String,
    /// Added to the variance.
    pub epsilon: f32,
}

/// A max-pooling window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Stride along height and width.
    pub stride: [usize; 2],
    /// Padding: top, left, bottom, right (each smaller than the window).
    pub padding: [usize; 4],
}

impl Pool {
    /// The window as a convolution geometry (no dilation).
    pub fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: [1, 1],
        }
    }
}

/// An average-pooling window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AvgPool {
    /// The window.
    #[serde(flatten)]
    pub window: Pool,
    /// Whether padded positions count in the mean's denominator.
    pub count_include_pad: bool,
}

impl Op {
    /// The operation's name as it appears in `model.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "conv",
            Op::Linear(_) => "linear",
            Op::BatchNorm(_) => "batch_norm",
            Op::Relu => "relu",
            Op::MaxPool(_) => "max_pool",
            Op::AvgPool(_) => "avg_pool",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Add => "add",
        }
    }

    /// How many values it reads.
    pub fn arity(&self) -> usize {
        match self {
            Op::Add => 2,
            _ => 1,
        }
    }

    /// The tensors it reads, by role.
    pub fn tensors(&self) -> Vec<(&'static str, &str)> {
        match self {
            Op::Conv(c) => with_bias(&c.weight, c.bias.as_deref()),
            Op::Linear(l) => with_bias(&l.weight, l.bias.as_deref()),
            Op::BatchNorm(b) => vec![
                ("scale", b.scale.as_str()),
                ("bias", b.bias.as_str()),
                ("mean", b.mean.as_str()),
                ("var", b.var.as_str()),
            ],
            _ => Vec::new(),
        }
    }

    /// The weight a kernel multiplies (conv and linear), which a mask may prune.
    pub fn weight(&self) -> Option<&str> {
        match self {
            Op::Conv(c) => Some(&c.weight),
            Op::Linear(l) => Some(&l.weight),
            _ => None,
        }
    }
}

fn with_bias<'a>(w: &'a str, b: Option<&'a str>) -> Vec<(&'static str, &'a str)> {
    let mut v = vec![("weight", w)];
    v.extend(b.map(|b| ("bias", b)));
    v
}

/// Shape of one image's value: channels, height, width.
pub type Shape = [usize; 3];

impl Graph {
    /// The node of that name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every conv and linear weight, in evaluation order: (node, weight tensor).
    pub fn weights(&self) -> Vec<(&str, &str)> {
        self.nodes
            .iter()
            .filter_map(|n| n.op.weight().map(|w| (n.name.as_str(), w)))
            .collect()
    }

    /// How many nodes read each value ([`INPUT`] included).
    pub fn consumers(&self) -> HashMap<&str, usize> {
        let mut c: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            for i in &n.inputs {
                *c.entry(i.as_str()).or_default() += 1;
            }
        }
        c
    }

    /// The index of the node that alone reads `value`, unless `value` is the graph's output
    /// (`consumers` from [`consumers`](Self::consumers)): such a node can be fused into the
    /// one that writes `value`.
    pub fn sole_reader(&self, value: &str, consumers: &HashMap<&str, usize>) -> Option<usize> {
        if value == self.output || consumers.get(value) != Some(&1) {
            return None;
        }
        self.nodes
            .iter()
            .position(|n| n.inputs.iter().any(|i| i == value))
    }

    /// Checks the graph against the shapes of its tensors (`shape_of` gives a tensor's shape,
    /// `None` when it is missing) and returns the shape of every value, [`INPUT`] included.
    ///
    /// Checked: unique names, every read of an earlier value, arities, every tensor present
    /// with the shape its node needs, geometries that fit their inputs (no size overflows),
    /// and an output of `[classes, 1, 1]`.
    pub fn shapes(
        &self,
        shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<BTreeMap<String, Shape>> {
        let [c, h, w] = self.input;
        if c == 0 || h == 0 || w == 0 || numel(&self.input).is_none_or(|n| n > MAX_VALUE) {
            return Err(InferError::graph(
                INPUT,
                "input",
                format!("{:?} is not a valid image shape", self.input),
            ));
        }
        let mut shapes: BTreeMap<String, Shape> = BTreeMap::new();
        shapes.insert(INPUT.to_string(), self.input);
        for node in &self.nodes {
            let op = node.op.name();
            let err = |reason: String| InferError::graph(&node.name, op, reason);
            if node.name.is_empty() || shapes.contains_key(&node.name) {
                return Err(err(if node.name.is_empty() {
                    "a node needs a name".into()
                } else {
                    "the name is already taken (by the input or an earlier node)".into()
                }));
            }
            if node.inputs.len() != node.op.arity() {
                return Err(err(format!(
                    "reads {} values, the op takes {}",
                    node.inputs.len(),
                    node.op.arity()
                )));
            }
            let ins = node
                .inputs
                .iter()
                .map(|i| {
                    shapes.get(i).copied().ok_or_else(|| {
                        err(format!(
                            "reads '{i}', which is neither the input nor an earlier node"
                        ))
                    })
                })
                .collect::<Result<Vec<Shape>>>()?;
            let tensor = |role: &str, name: &str| -> Result<Vec<usize>> {
                shape_of(name).ok_or_else(|| err(format!("its {role} tensor '{name}' is missing")))
            };
            let out = node_shape(&node.op, &ins, &tensor, &err)?;
            if numel(&out).is_none_or(|n| n > MAX_VALUE) {
                return Err(err(format!(
                    "its output {out:?} per image is larger than {MAX_VALUE} values"
                )));
            }
            shapes.insert(node.name.clone(), out);
        }
        match shapes.get(&self.output) {
            Some(&[_, 1, 1]) => Ok(shapes),
            Some(s) => Err(InferError::graph(
                &self.output,
                "output",
                format!("gives {s:?} per image; logits are [classes, 1, 1]"),
            )),
            None => Err(InferError::graph(
                &self.output,
                "output",
                "no node of that name",
            )),
        }
    }

    /// Number of classes (the output's channels), after [`shapes`](Self::shapes).
    pub fn classes(&self, shapes: &BTreeMap<String, Shape>) -> usize {
        shapes.get(&self.output).map_or(0, |s| s[0])
    }
}

/// The output shape of one node (inputs already resolved).
fn node_shape(
    op: &Op,
    ins: &[Shape],
    tensor: &dyn Fn(&str, &str) -> Result<Vec<usize>>,
    err: &dyn Fn(String) -> InferError,
) -> Result<Shape> {
    let [c, h, w] = ins[0];
    let want = |role: &str, name: &str, shape: &[usize]| -> Result<()> {
        let got = tensor(role, name)?;
        if got != shape {
            return Err(err(format!(
                "its {role} tensor '{name}' is {got:?}, expected {shape:?}"
            )));
        }
        Ok(())
    };
    Ok(match op {
        Op::Conv(cv) => {
            let ws = tensor("weight", &cv.weight)?;
            let &[cout, cin_g, kh, kw] = ws.as_slice() else {
                return Err(err(format!(
                    "its weight '{}' is {ws:?}; a convolution weight is [Cout, Cin/groups, kh, kw]",
                    cv.weight
                )));
            };
            let g = cv.groups;
            if g == 0 || cout % g != 0 || c % g != 0 || cin_g != c / g {
                return Err(err(format!(
                    "weight {ws:?} with {g} groups does not read the {c} input channels"
                )));
            }
            if [kh, kw] != cv.kernel {
                return Err(err(format!(
                    "kernel {:?} differs from the weight's {:?}",
                    cv.kernel,
                    [kh, kw]
                )));
            }
            if let Some(b) = &cv.bias {
                want("bias", b, &[cout])?;
            }
            let (ho, wo) = cv.geometry().output(h, w).ok_or_else(|| {
                err(format!(
                    "kernel {:?}, stride {:?}, padding {:?}, dilation {:?} does not fit a {h}x{w} input",
                    cv.kernel, cv.stride, cv.padding, cv.dilation
                ))
            })?;
            [cout, ho, wo]
        }
        Op::Linear(l) => {
            if (h, w) != (1, 1) {
                return Err(err(format!(
                    "reads a {c}x{h}x{w} value; a linear layer reads [F, 1, 1] (flatten first)"
                )));
            }
            let ws = tensor("weight", &l.weight)?;
            let &[out, fin] = ws.as_slice() else {
                return Err(err(format!(
                    "its weight '{}' is {ws:?}; a linear weight is [out, in]",
                    l.weight
                )));
            };
            if fin != c {
                return Err(err(format!(
                    "weight {ws:?} reads {fin} features, the input has {c}"
                )));
            }
            if let Some(b) = &l.bias {
                want("bias", b, &[out])?;
            }
            [out, 1, 1]
        }
        Op::BatchNorm(b) => {
            for (role, name) in op.tensors() {
                want(role, name, &[c])?;
            }
            if !(b.epsilon.is_finite() && b.epsilon >= 0.0) {
                return Err(err(format!("epsilon {} must be finite and ≥ 0", b.epsilon)));
            }
            [c, h, w]
        }
        Op::Relu => [c, h, w],
        Op::MaxPool(p) | Op::AvgPool(AvgPool { window: p, .. }) => {
            let pads_fit =
                (0..2).all(|a| p.padding[a] < p.kernel[a] && p.padding[a + 2] < p.kernel[a]);
            if !pads_fit {
                return Err(err(format!(
                    "padding {:?} must be smaller than the window {:?}",
                    p.padding, p.kernel
                )));
            }
            let (ho, wo) = p.geometry().output(h, w).ok_or_else(|| {
                err(format!(
                    "window {:?}, stride {:?}, padding {:?} does not fit a {h}x{w} input",
                    p.kernel, p.stride, p.padding
                ))
            })?;
            [c, ho, wo]
        }
        Op::GlobalAvgPool => [c, 1, 1],
        Op::Flatten => {
            let f = numel(&[c, h, w]).ok_or_else(|| err("the size overflows".into()))?;
            [f, 1, 1]
        }
        Op::Add => {
            if ins[0] != ins[1] {
                return Err(err(format!(
                    "adds {:?} and {:?}; both inputs need the same shape",
                    ins[0], ins[1]
                )));
            }
            ins[0]
        }
    })
}

/// Builds graphs node by node with generated names: the way coarsen's own models describe
/// themselves. Every method appends one node reading the current value and makes it current.
#[derive(Clone, Debug)]
pub struct GraphBuilder {
    graph: Graph,
    current: String,
    counts: HashMap<&'static str, usize>,
}

impl GraphBuilder {
    /// An empty graph reading images of `[C, H, W]`.
    pub fn new(input: [usize; 3]) -> Self {
        GraphBuilder {
            graph: Graph {
                input,
                nodes: Vec::new(),
                output: INPUT.to_string(),
            },
            current: INPUT.to_string(),
            counts: HashMap::new(),
        }
    }

    /// The current value's name.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Makes `value` current (to start a branch).
    pub fn set_current(&mut self, value: impl Into<String>) {
        self.current = value.into();
    }

    /// A fresh name `{base}{k}` not used before.
    fn fresh(&mut self, base: &'static str) -> String {
        loop {
            let k = self.counts.entry(base).or_default();
            *k += 1;
            let name = format!("{base}{k}");
            if self.graph.node(&name).is_none() && name != INPUT {
                return name;
            }
        }
    }

    /// Appends a node named `name` (generated from the op when `None`) reading `inputs`.
    pub fn push(&mut self, name: Option<String>, inputs: Vec<String>, op: Op) -> String {
        let name = name.unwrap_or_else(|| self.fresh(op.name()));
        self.graph.nodes.push(Node {
            name: name.clone(),
            inputs,
            op,
        });
        self.current = name.clone();
        name
    }

    /// Appends `op` reading the current value.
    pub fn then(&mut self, name: Option<String>, op: Op) -> String {
        let input = self.current.clone();
        self.push(name, vec![input], op)
    }

    /// Finishes: the current value is the output.
    pub fn finish(mut self) -> Graph {
        self.graph.output = self.current;
        self.graph
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(w: &str, k: usize, pad: usize) -> Op {
        Op::Conv(Conv {
            weight: w.into(),
            bias: None,
            kernel: [k, k],
            stride: [1, 1],
            padding: [pad; 4],
            dilation: [1, 1],
            groups: 1,
        })
    }

    fn small() -> (Graph, BTreeMap<String, Vec<usize>>) {
        let mut b = GraphBuilder::new([1, 4, 4]);
        b.then(Some("c1".into()), conv("c1.weight", 3, 1));
        b.then(None, Op::Relu);
        let r = b.current().to_string();
        b.then(Some("c2".into()), conv("c2.weight", 3, 1));
        let c2 = b.current().to_string();
        b.push(None, vec![r, c2], Op::Add);
        b.then(None, Op::Flatten);
        b.then(
            Some("fc".into()),
            Op::Linear(Linear {
                weight: "fc.weight".into(),
                bias: Some("fc.bias".into()),
            }),
        );
        let shapes: BTreeMap<String, Vec<usize>> = [
            ("c1.weight", vec![2, 1, 3, 3]),
            ("c2.weight", vec![2, 2, 3, 3]),
            ("fc.weight", vec![3, 32]),
            ("fc.bias", vec![3]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        (b.finish(), shapes)
    }

    #[test]
    fn shapes_of_a_small_graph() {
        let (g, t) = small();
        let s = g.shapes(&|n| t.get(n).cloned()).unwrap();
        assert_eq!(s["c1"], [2, 4, 4]);
        assert_eq!(s["flatten1"], [32, 1, 1]);
        assert_eq!(g.classes(&s), 3);
        assert_eq!(g.weights().len(), 3);
        // JSON round trip.
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains("\"op\":\"conv\""), "{json}");
        let back: Graph = serde_json::from_str(&json).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn invalid_graphs_are_refused() {
        let (g, t) = small();
        let check = |g: &Graph, t: &BTreeMap<String, Vec<usize>>, want: &str| {
            let e = g.shapes(&|n| t.get(n).cloned()).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        };
        let mut bad = g.clone();
        bad.nodes[1].inputs = vec!["nowhere".into()];
        check(&bad, &t, "neither the input nor an earlier node");
        let mut bad = g.clone();
        bad.nodes.swap(0, 1);
        check(&bad, &t, "earlier node");
        let mut bad = g.clone();
        bad.nodes[1].name = "c1".into();
        check(&bad, &t, "already taken");
        let mut t2 = t.clone();
        t2.insert("fc.weight".into(), vec![3, 31]);
        check(&g, &t2, "reads 31 features");
        let mut t2 = t.clone();
        t2.remove("c2.weight");
        check(&g, &t2, "'c2.weight' is missing");
        let mut bad = g.clone();
        bad.output = "c1".into();
        check(&bad, &t, "logits are [classes, 1, 1]");
        let mut bad = g.clone();
        if let Op::Conv(c) = &mut bad.nodes[2].op {
            c.padding = [0; 4];
        }
        check(&bad, &t, "adds [2, 4, 4] and [2, 2, 2]");
        let mut bad = g.clone();
        if let Op::Conv(c) = &mut bad.nodes[0].op {
            c.kernel = [9, 9];
        }
        check(&bad, &t, "differs from the weight");
        let mut bad = g.clone();
        bad.nodes[3].inputs.pop();
        check(&bad, &t, "reads 1 values, the op takes 2");
        // A description that would need absurd memory is refused before anything is allocated.
        let mut bad = g.clone();
        bad.input = [1, 1 << 16, 1 << 16];
        check(&bad, &t, "not a valid image shape");
        let mut t2 = t.clone();
        t2.insert("c1.weight".into(), vec![1 << 20, 1, 3, 3]);
        let mut bad = g.clone();
        bad.input = [1, 1 << 6, 1 << 6];
        check(&bad, &t2, "larger than");
    }
}
