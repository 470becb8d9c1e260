//! Layer tables of well-known CIFAR architectures: tensor names and shapes, convolution
//! geometry (for im2col GEMM shapes), and seeded random initialisation of a full weights file.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::error::{Error, Result};
use crate::io::WeightTensor;

/// A 2-D convolution of an architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    /// Weight tensor name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Output channels.
    pub out_channels: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Square kernel side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Input height and width.
    pub input_hw: (usize, usize),
}

impl ConvLayer {
    /// The weight shape `[Cout, Cin, k, k]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.out_channels,
            self.in_channels,
            self.kernel,
            self.kernel,
        ]
    }

    /// Output height and width.
    pub fn output_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.input_hw.0), o(self.input_hw.1))
    }

    /// The im2col GEMM `Y[R×N] = W[R×C]·X[C×N]` at this batch size: `(Cout, Cin·k·k, batch·Ho·Wo)`.
    pub fn gemm_shape(&self, batch: usize) -> (usize, usize, usize) {
        let (h, w) = self.output_hw();
        (
            self.out_channels,
            self.in_channels * self.kernel * self.kernel,
            batch * h * w,
        )
    }
}

/// A network's layer table.
#[derive(Clone, Debug)]
pub struct Architecture {
    /// Its name (`resnet18`, `vgg16`, ...).
    pub name: String,
    /// Convolutions in forward order.
    pub convs: Vec<ConvLayer>,
    /// Linear layers: (weight name, out features, in features); the bias is `…bias`.
    pub linears: Vec<(String, usize, usize)>,
    /// BatchNorm layers: (prefix, channels); tensors are `{prefix}.weight|bias|running_mean|running_var`.
    pub norms: Vec<(String, usize)>,
}

/// The architectures [`by_name`] knows.
pub const ARCHITECTURES: &[&str] = &["resnet18", "resnet20", "vgg11", "vgg16"];

/// The architecture of that name for 32×32 inputs with `num_classes` outputs.
pub fn by_name(name: &str, num_classes: usize) -> Result<Architecture> {
    match name {
        "resnet18" => Ok(resnet_cifar(
            "resnet18",
            &[64, 128, 256, 512],
            &[2, 2, 2, 2],
            num_classes,
        )),
        "resnet20" => Ok(resnet_cifar(
            "resnet20",
            &[16, 32, 64],
            &[3, 3, 3],
            num_classes,
        )),
        "vgg11" => Ok(vgg_cifar("vgg11", &VGG11, num_classes)),
        "vgg16" => Ok(vgg_cifar("vgg16", &VGG16, num_classes)),
        other => Err(Error::param(
            "--model",
            other,
            format!("unknown architecture; known: {}", ARCHITECTURES.join(", ")),
        )),
    }
}

const M: usize = 0;
const VGG11: [usize; 13] = [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M];
const VGG16: [usize; 18] = [
    64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
];

/// CIFAR ResNet with basic blocks, a 3×3 stride-1 stem and no max-pool (torchvision naming:
/// `conv1`, `bn1`, `layerL.B.conv1|conv2|downsample.0`, `fc`).
fn resnet_cifar(name: &str, widths: &[usize], blocks: &[usize], classes: usize) -> Architecture {
    let mut convs = Vec::new();
    let mut norms = Vec::new();
    let conv = |name: String, cin, cout, k, stride, hw| ConvLayer {
        name,
        out_channels: cout,
        in_channels: cin,
        kernel: k,
        stride,
        padding: k / 2,
        input_hw: (hw, hw),
    };
    convs.push(conv("conv1.weight".into(), 3, widths[0], 3, 1, 32));
    norms.push(("bn1".to_string(), widths[0]));
    let (mut cin, mut hw) = (widths[0], 32);
    for (l, (&w, &n)) in widths.iter().zip(blocks).enumerate() {
        for b in 0..n {
            let stride = if l > 0 && b == 0 { 2 } else { 1 };
            let p = format!("layer{}.{}", l + 1, b);
            convs.push(conv(format!("{p}.conv1.weight"), cin, w, 3, stride, hw));
            norms.push((format!("{p}.bn1"), w));
            let out_hw = hw / stride;
            convs.push(conv(format!("{p}.conv2.weight"), w, w, 3, 1, out_hw));
            norms.push((format!("{p}.bn2"), w));
            if stride != 1 || cin != w {
                convs.push(conv(
                    format!("{p}.downsample.0.weight"),
                    cin,
                    w,
                    1,
                    stride,
                    hw,
                ));
                norms.push((format!("{p}.downsample.1"), w));
            }
            cin = w;
            hw = out_hw;
        }
    }
    Architecture {
        name: name.into(),
        convs,
        linears: vec![("fc.weight".into(), classes, cin)],
        norms,
    }
}

/// CIFAR VGG with BatchNorm (`features.i` as in torchvision's `vgg*_bn`, one linear
/// `classifier`).
fn vgg_cifar(name: &str, cfg: &[usize], classes: usize) -> Architecture {
    let mut convs = Vec::new();
    let mut norms = Vec::new();
    let (mut idx, mut cin, mut hw) = (0, 3, 32);
    for &c in cfg {
        if c == M {
            idx += 1;
            hw /= 2;
            continue;
        }
        convs.push(ConvLayer {
            name: format!("features.{idx}.weight"),
            out_channels: c,
            in_channels: cin,
            kernel: 3,
            stride: 1,
            padding: 1,
            input_hw: (hw, hw),
        });
        norms.push((format!("features.{}", idx + 1), c));
        idx += 3;
        cin = c;
    }
    Architecture {
        name: name.into(),
        convs,
        linears: vec![("classifier.weight".into(), classes, cin)],
        norms,
    }
}

impl Architecture {
    /// Every tensor of the network with seeded random initial values: convolutions Kaiming
    /// normal (fan-out, as torchvision), linear weights and biases uniform in ±1/√fan-in,
    /// BatchNorm weight 1, bias 0, running mean 0, running variance 1.
    pub fn init(&self, seed: u64) -> Result<Vec<WeightTensor>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for c in &self.convs {
            let fan_out = (c.out_channels * c.kernel * c.kernel) as f32;
            let normal = Normal::new(0.0f32, (2.0 / fan_out).sqrt())
                .map_err(|e| Error::param("init", c.name.clone(), e.to_string()))?;
            let shape = c.weight_shape();
            let n: usize = shape.iter().product();
            out.push(WeightTensor::new(
                c.name.clone(),
                shape,
                (0..n).map(|_| normal.sample(&mut rng)).collect(),
            )?);
        }
        for (name, o, i) in &self.linears {
            let bound = 1.0 / (*i as f32).sqrt();
            let uni = Uniform::new(-bound, bound)
                .map_err(|e| Error::param("init", name.clone(), e.to_string()))?;
            out.push(WeightTensor::new(
                name.clone(),
                vec![*o, *i],
                (0..o * i).map(|_| uni.sample(&mut rng)).collect(),
            )?);
            let bias = name.trim_end_matches("weight").to_string() + "bias";
            out.push(WeightTensor::new(
                bias,
                vec![*o],
                (0..*o).map(|_| uni.sample(&mut rng)).collect(),
            )?);
        }
        for (p, c) in &self.norms {
            for (suffix, v) in [
                ("weight", 1.0),
                ("bias", 0.0),
                ("running_mean", 0.0),
                ("running_var", 1.0),
            ] {
                out.push(WeightTensor::new(
                    format!("{p}.{suffix}"),
                    vec![*c],
                    vec![v; *c],
                )?);
            }
        }
        Ok(out)
    }

    /// Number of convolution and linear weights.
    pub fn prunable_weights(&self) -> usize {
        self.convs
            .iter()
            .map(|c| c.weight_shape().iter().product::<usize>())
            .sum::<usize>()
            + self.linears.iter().map(|(_, o, i)| o * i).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet18_has_the_cifar_shapes() {
        let a = by_name("resnet18", 10).unwrap();
        assert_eq!(a.convs.len(), 20);
        assert_eq!(a.prunable_weights(), 11_159_232 + 5_120);
        let last = a
            .convs
            .iter()
            .find(|c| c.name == "layer4.1.conv2.weight")
            .unwrap();
        assert_eq!(last.gemm_shape(64), (512, 4608, 64 * 16));
        let ds = a
            .convs
            .iter()
            .find(|c| c.name == "layer2.0.downsample.0.weight")
            .unwrap();
        assert_eq!(ds.gemm_shape(1), (128, 64, 256));
    }

    #[test]
    fn vgg16_and_resnet20() {
        let v = by_name("vgg16", 10).unwrap();
        assert_eq!(v.convs.len(), 13);
        assert_eq!(v.convs[12].input_hw, (2, 2));
        assert_eq!(v.convs[1].name, "features.3.weight");
        let r = by_name("resnet20", 10).unwrap();
        assert_eq!(r.convs.len(), 21);
        assert!(by_name("alexnet", 10).is_err());
    }

    #[test]
    fn init_is_seeded() {
        let a = by_name("resnet20", 10).unwrap();
        let x = a.init(1).unwrap();
        let y = a.init(1).unwrap();
        assert_eq!(x[0].values(), y[0].values());
        assert_ne!(x[0].values(), a.init(2).unwrap()[0].values());
    }
}
