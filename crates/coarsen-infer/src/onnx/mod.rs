//! ONNX export: a [`Network`] as a standard ONNX model (opset [`OPSET`]), so that ONNX Runtime,
//! DeepSparse or any other ONNX engine runs the same function as coarsen.
//!
//! - The input `input` is a float batch `[N, C, H, W]` (`N` symbolic); the output `logits` is
//!   `[N, classes]`.
//! - Weights are dense f32 initializers holding the zeros of their masks (ONNX has no sparse
//!   convolution): sparse engines find the zeros themselves.
//! - BatchNorm is kept as `BatchNormalization` by default; [`OnnxOptions::fold_batch_norm`]
//!   folds a BatchNorm that alone reads a convolution or linear layer into its weights and
//!   bias, as coarsen's engine does (a BatchNorm elsewhere stays a node).
//! - Operators: `Conv` (strides, pads, dilations, group), `Gemm` (`transB = 1`),
//!   `BatchNormalization`, `Relu`, `MaxPool`, `AveragePool`, `GlobalAveragePool`, `Flatten`,
//!   `Add`, and `Reshape` where a flattened value feeds a convolution or pooling again.

mod proto;

use std::collections::{HashMap, HashSet};

use prost::Message;

use crate::error::{InferError, Result};
use crate::graph::{Op, INPUT};
use crate::network::Network;
use proto::*;

/// The ONNX operator set the export uses.
pub const OPSET: i64 = 17;
/// The ONNX IR version written (the one of opset 17).
pub const IR_VERSION: i64 = 8;
/// The name of the ONNX model's input.
pub const INPUT_NAME: &str = INPUT;
/// The name of the ONNX model's output.
pub const OUTPUT_NAME: &str = "logits";

/// How to write the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnnxOptions {
    /// Fold every BatchNorm that alone reads a conv or linear layer into that layer.
    pub fold_batch_norm: bool,
}

/// The network as ONNX protobuf bytes.
pub fn to_onnx(net: &Network, opts: &OnnxOptions) -> Result<Vec<u8>> {
    let mut w = Writer {
        net,
        opts: *opts,
        nodes: Vec::new(),
        inits: Vec::new(),
        init_names: HashSet::new(),
        value: HashMap::new(),
        rank: HashMap::new(),
        reshaped: HashMap::new(),
        fused: HashSet::new(),
    };
    w.value.insert(INPUT.to_string(), INPUT_NAME.to_string());
    w.rank.insert(INPUT_NAME.to_string(), 4);
    let graph = net.graph();
    let consumers = graph.consumers();
    for i in 0..graph.nodes.len() {
        if !w.fused.contains(&i) {
            w.node(i, &consumers)?;
        }
    }
    let last = w.value_of(&graph.output)?;
    let last = w.rank2(&last);
    w.push(
        "Identity",
        &format!("{OUTPUT_NAME}.identity"),
        vec![last],
        OUTPUT_NAME,
        vec![],
    );
    let [c, h, wd] = net.input();
    let tensor_type = |dims: Vec<DimensionValue>| TypeProto {
        tensor_type: Some(TypeTensor {
            elem_type: Some(FLOAT),
            shape: Some(TensorShapeProto {
                dim: dims
                    .into_iter()
                    .map(|d| Dimension { value: Some(d) })
                    .collect(),
            }),
        }),
    };
    let n = || DimensionValue::DimParam("N".into());
    let dim = |v: usize| DimensionValue::DimValue(v as i64);
    let model = ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some("coarsen".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some("exported by coarsen; masked weights hold their zeros".into()),
        graph: Some(GraphProto {
            node: w.nodes,
            name: Some("coarsen".into()),
            initializer: w.inits,
            doc_string: None,
            input: vec![ValueInfoProto {
                name: Some(INPUT_NAME.into()),
                r#type: Some(tensor_type(vec![n(), dim(c), dim(h), dim(wd)])),
            }],
            output: vec![ValueInfoProto {
                name: Some(OUTPUT_NAME.into()),
                r#type: Some(tensor_type(vec![n(), dim(net.classes())])),
            }],
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        metadata_props: vec![StringStringEntryProto {
            key: Some("coarsen.batch_norm".into()),
            value: Some(
                if opts.fold_batch_norm {
                    "folded"
                } else {
                    "kept"
                }
                .into(),
            ),
        }],
    };
    Ok(model.encode_to_vec())
}

struct Writer<'a> {
    net: &'a Network,
    opts: OnnxOptions,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    init_names: HashSet<String>,
    /// Graph value → ONNX value.
    value: HashMap<String, String>,
    /// ONNX value → rank (2 or 4).
    rank: HashMap<String, usize>,
    /// ONNX value → its reshape to the other rank.
    reshaped: HashMap<String, String>,
    fused: HashSet<usize>,
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.iter().map(|&x| x as i64).collect(),
        r#type: Some(ATTR_INTS),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(ATTR_INT),
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(ATTR_FLOAT),
        ..Default::default()
    }
}

impl Writer<'_> {
    fn push(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        output: &str,
        attribute: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output.to_string()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute,
        });
    }

    /// An initializer `name` of `shape` (once; later calls with the same name reuse it).
    fn init(&mut self, name: &str, shape: &[usize], values: &[f32]) -> String {
        if self.init_names.insert(name.to_string()) {
            self.inits.push(TensorProto {
                dims: shape.iter().map(|&d| d as i64).collect(),
                data_type: Some(FLOAT),
                name: Some(name.to_string()),
                raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            });
        }
        name.to_string()
    }

    /// An initializer holding tensor `name` as the network stores it.
    fn tensor(&mut self, name: &str) -> Result<String> {
        let t = self.net.tensors().require(name)?;
        let (shape, values) = (t.shape().to_vec(), t.values().to_vec());
        Ok(self.init(name, &shape, &values))
    }

    fn value_of(&self, graph_value: &str) -> Result<String> {
        self.value
            .get(graph_value)
            .cloned()
            .ok_or_else(|| InferError::graph(graph_value, "onnx", "read before it is written"))
    }

    /// `v` as a rank-4 value `[N, F, 1, 1]` (a `Reshape` of a rank-2 value).
    fn rank4(&mut self, v: &str) -> String {
        if self.rank.get(v) == Some(&4) {
            return v.to_string();
        }
        if let Some(r) = self.reshaped.get(v) {
            return r.clone();
        }
        let shape_name = "coarsen.shape_n_f_1_1";
        if self.init_names.insert(shape_name.to_string()) {
            self.inits.push(TensorProto {
                dims: vec![4],
                data_type: Some(INT64),
                name: Some(shape_name.into()),
                raw_data: Some(
                    [0i64, -1, 1, 1]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
            });
        }
        let out = format!("{v}.4d");
        self.push(
            "Reshape",
            &out,
            vec![v.to_string(), shape_name.into()],
            &out,
            vec![],
        );
        self.rank.insert(out.clone(), 4);
        self.reshaped.insert(v.to_string(), out.clone());
        out
    }

    /// `v` as a rank-2 value `[N, C·H·W]` (a `Flatten` of a rank-4 value).
    fn rank2(&mut self, v: &str) -> String {
        if self.rank.get(v) == Some(&2) {
            return v.to_string();
        }
        if let Some(r) = self.reshaped.get(v) {
            return r.clone();
        }
        let out = format!("{v}.2d");
        self.push(
            "Flatten",
            &out,
            vec![v.to_string()],
            &out,
            vec![int("axis", 1)],
        );
        self.rank.insert(out.clone(), 2);
        self.reshaped.insert(v.to_string(), out.clone());
        out
    }

    /// A conv or linear layer's weight and bias initializers, a BatchNorm that alone reads it
    /// folded in when asked; returns (weight, bias, the graph value the layer writes).
    fn weighted(
        &mut self,
        i: usize,
        weight: &str,
        bias: Option<&str>,
        consumers: &HashMap<&str, usize>,
    ) -> Result<(String, Option<String>, String)> {
        let graph = self.net.graph();
        let node = &graph.nodes[i];
        let t = self.net.tensors().require(weight)?;
        let shape = t.shape().to_vec();
        let mut values = self.net.masked_values(weight)?;
        let fold = if self.opts.fold_batch_norm {
            graph
                .sole_reader(&node.name, consumers)
                .and_then(|j| match &graph.nodes[j].op {
                    Op::BatchNorm(b) => Some((j, b)),
                    _ => None,
                })
        } else {
            None
        };
        let Some((j, bn)) = fold else {
            // Masked weights hold their zeros; the stored values are used as they are.
            let w = self.init(weight, &shape, &values);
            let b = bias.map(|b| self.tensor(b)).transpose()?;
            return Ok((w, b, node.name.clone()));
        };
        let rows = shape[0];
        let mut b = match bias {
            Some(b) => self.net.tensors().require(b)?.values().to_vec(),
            None => vec![0.0; rows],
        };
        self.net.fold_batch_norm(bn, &mut values, &mut b)?;
        self.fused.insert(j);
        let w = self.init(&format!("{}.folded_weight", node.name), &shape, &values);
        let bb = self.init(&format!("{}.folded_bias", node.name), &[rows], &b);
        Ok((w, Some(bb), graph.nodes[j].name.clone()))
    }

    fn node(&mut self, i: usize, consumers: &HashMap<&str, usize>) -> Result<()> {
        let node = &self.net.graph().nodes[i];
        let x = self.value_of(&node.inputs[0])?;
        let name = node.name.clone();
        let (out, rank) = match &node.op {
            Op::Conv(cv) => {
                let x = self.rank4(&x);
                let (w, b, out) = self.weighted(i, &cv.weight, cv.bias.as_deref(), consumers)?;
                let mut inputs = vec![x, w];
                inputs.extend(b);
                let attrs = vec![
                    ints("kernel_shape", &cv.kernel),
                    ints("strides", &cv.stride),
                    ints("pads", &cv.padding),
                    ints("dilations", &cv.dilation),
                    int("group", cv.groups as i64),
                ];
                self.push("Conv", &name, inputs, &out, attrs);
                (out, 4)
            }
            Op::Linear(l) => {
                let x = self.rank2(&x);
                let (w, b, out) = self.weighted(i, &l.weight, l.bias.as_deref(), consumers)?;
                let mut inputs = vec![x, w];
                inputs.extend(b);
                self.push("Gemm", &name, inputs, &out, vec![int("transB", 1)]);
                (out, 2)
            }
            Op::BatchNorm(b) => {
                let rank = self.rank.get(&x).copied().unwrap_or(4);
                let inputs = vec![
                    x,
                    self.tensor(&b.scale)?,
                    self.tensor(&b.bias)?,
                    self.tensor(&b.mean)?,
                    self.tensor(&b.var)?,
                ];
                let attrs = vec![float("epsilon", b.epsilon)];
                self.push("BatchNormalization", &name, inputs, &name, attrs);
                (name, rank)
            }
            Op::Relu => {
                let rank = self.rank.get(&x).copied().unwrap_or(4);
                self.push("Relu", &name, vec![x], &name, vec![]);
                (name, rank)
            }
            Op::MaxPool(p) => {
                let x = self.rank4(&x);
                let attrs = vec![
                    ints("kernel_shape", &p.kernel),
                    ints("strides", &p.stride),
                    ints("pads", &p.padding),
                ];
                self.push("MaxPool", &name, vec![x], &name, attrs);
                (name, 4)
            }
            Op::AvgPool(a) => {
                let x = self.rank4(&x);
                let p = &a.window;
                let attrs = vec![
                    ints("kernel_shape", &p.kernel),
                    ints("strides", &p.stride),
                    ints("pads", &p.padding),
                    int("count_include_pad", i64::from(a.count_include_pad)),
                ];
                self.push("AveragePool", &name, vec![x], &name, attrs);
                (name, 4)
            }
            Op::GlobalAvgPool => {
                let x = self.rank4(&x);
                self.push("GlobalAveragePool", &name, vec![x], &name, vec![]);
                (name, 4)
            }
            Op::Flatten => {
                // A rank-2 value is flat already.
                let out = self.rank2(&x);
                self.value.insert(name, out);
                return Ok(());
            }
            Op::Add => {
                let y = self.value_of(&node.inputs[1])?;
                let (rx, ry) = (self.rank.get(&x), self.rank.get(&y));
                let (x, y, rank) = if rx == ry {
                    (x.clone(), y, rx.copied().unwrap_or(4))
                } else {
                    (self.rank2(&x), self.rank2(&y), 2)
                };
                self.push("Add", &name, vec![x, y], &name, vec![]);
                (name, rank)
            }
        };
        self.rank.insert(out.clone(), rank);
        self.value.insert(out.clone(), out.clone());
        // The names of every node a fused layer stands for read the same value.
        self.value.insert(node.name.clone(), out);
        Ok(())
    }
}
