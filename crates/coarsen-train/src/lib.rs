//! # coarsen-train
//!
//! Sparse training on [candle](https://github.com/huggingface/candle): data sets, models, the
//! training loop with exact resume, and the methods of Structure-LTH and DSB. Every mask
//! operation — magnitude pruning, Refill, Regroup, EXTRACT, N:M — is coarsen-core's; every
//! convolution and linear layer runs on coarsen-kernels (dense GEMM, or a packed structured-sparse
//! plan) through coarsen's own candle operations ([`ops`]), which keep candle's autograd.
//!
//! - [`data`]: MNIST-format IDX (Fashion-MNIST by default) and CIFAR-10 binary files, validation
//!   split, normalisation, seeded shuffling and augmentation.
//! - [`model`]: MLP, a small VGG-style CNN, CIFAR VGG-11/16 and ResNet-20/18.
//! - [`optim`]: SGD with momentum, weight decay, schedules, masks.
//! - [`train`]: the recipe, the resumable trainer, checkpoints and metrics.
//! - [`sparsity`], [`dynamic`]: IMP's pruning, post-processing, RigL and DSB/SSB.
//! - [`export`], [`run_dir`]: exported models with what training knows of them; the run and
//!   export directories `eval`, `export` and the demo read back. Inference itself is
//!   coarsen-infer's: [`Model::graph`](model::Model::graph) describes a model to it.
//! - [`methods`]: experiments and their stages, `results.json`.
//! - [`bench`](mod@bench): training-step and throughput measurements.
//!
//! ```no_run
//! use coarsen_train::methods::{run, Experiment, RunOptions};
//! use coarsen_train::train::Silent;
//!
//! let exp = Experiment { method: "imp".into(), ..Experiment::default() };
//! let data = coarsen_train::data::load(&exp.data, exp.recipe.val_split)?;
//! let results = run(&exp, &data, "runs/imp".as_ref(), &RunOptions::default(), &Silent)?;
//! # Ok::<(), coarsen_train::error::TrainError>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod checksum;
pub mod data;
pub mod dynamic;
pub mod error;
pub mod export;
pub mod methods;
pub mod model;
pub mod ops;
pub mod optim;
pub mod run_dir;
pub mod sparsity;
pub mod train;
