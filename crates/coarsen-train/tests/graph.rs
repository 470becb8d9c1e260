//! The explicit graph of every model, run on coarsen-infer's engine, computes what the candle
//! model computes: for every architecture, every packed format, both paths, with random
//! BatchNorm statistics (so that removed channels are non-zero constants).

use candle_core::{Device, Tensor};
use coarsen_core::MatrixView;
use coarsen_infer::format::{random_masks, random_nm_mask};
use coarsen_infer::{Formats, InferenceNet, LayerFormat, Path};
use coarsen_train::model::{Model, ModelSpec, ParamKind};
use coarsen_train::optim::apply_masks;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn setup(name: &str, input: [usize; 3], width: f64, seed: u64) -> Model {
    let spec = ModelSpec {
        name: name.into(),
        width,
        input,
        classes: 10,
    };
    let model = Model::new(&spec, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for p in &model.params {
        if p.kind == ParamKind::Other {
            let v: Vec<f32> = p
                .values()
                .unwrap()
                .iter()
                .map(|_| rng.random_range(-0.5f32..1.0))
                .collect();
            p.set_values(v).unwrap();
        }
    }
    for b in &model.buffers {
        let mut v = b.values.lock().unwrap();
        let var = b.name.ends_with("running_var");
        v.iter_mut().for_each(|x| {
            *x = if var {
                rng.random_range(0.5f32..2.0)
            } else {
                rng.random_range(-0.5f32..0.5)
            }
        });
    }
    model
}

fn check(name: &str, input: [usize; 3], width: f64) {
    let formats = [
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
    ];
    for (k, fmt) in formats.iter().enumerate() {
        let model = setup(name, input, width, 7 + k as u64);
        let shapes: Vec<(String, Vec<usize>)> = model
            .default_prunable()
            .into_iter()
            .map(|n| {
                let s = model.param(&n).unwrap().shape();
                (n, s)
            })
            .collect();
        let masks = match fmt {
            LayerFormat::Dense => random_masks(&shapes, &LayerFormat::Csr, 0.5, 3).unwrap(),
            LayerFormat::Nm { n, m, .. } => {
                let mut set = coarsen_core::MaskSet::new();
                let mut rng = ChaCha8Rng::seed_from_u64(3);
                for (name, shape) in &shapes {
                    let view = MatrixView::of(shape).unwrap();
                    let mk = random_nm_mask(&mut rng, view, *n, *m, None);
                    set.insert_bytes(name.clone(), shape, mk).unwrap();
                }
                set
            }
            f => random_masks(&shapes, f, 0.45, 3).unwrap(),
        };
        let formats: Formats = masks
            .names()
            .map(|n| (n.to_string(), fmt.clone()))
            .collect();
        let network = model.network(&masks).unwrap();
        let batch = 3;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x: Vec<f32> = (0..input.iter().product::<usize>() * batch)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        apply_masks(&model, &masks).unwrap();
        let [c, h, w] = input;
        let t = Tensor::from_vec(x.clone(), (c, batch, h, w), &Device::Cpu).unwrap();
        let want = model
            .forward(&t, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for path in [Path::Packed, Path::Dense] {
            let engine = InferenceNet::new(&network, &formats, path).unwrap();
            let got = engine.forward(&x, batch).unwrap();
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-4 * scale,
                "{name} {fmt:?} {path:?}: max error {err} (scale {scale})"
            );
        }
    }
}

#[test]
fn cnn_graph_computes_the_model() {
    check("cnn", [1, 12, 12], 0.5);
}

#[test]
fn mlp_graph_computes_the_model() {
    check("mlp", [1, 6, 6], 0.2);
}

#[test]
fn resnet_graphs_compute_the_model() {
    check("resnet20", [3, 8, 8], 0.5);
    check("resnet18", [3, 8, 8], 0.125);
}

#[test]
fn vgg_graphs_compute_the_model() {
    check("vgg11", [3, 8, 8], 0.125);
    check("vgg16", [1, 8, 8], 0.125);
}
