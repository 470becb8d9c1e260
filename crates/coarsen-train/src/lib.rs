//! coarsen-train (in progress)
#![allow(missing_docs)]
pub mod data;
pub mod dynamic;
pub mod error;
pub mod model;
pub mod ops;
pub mod optim;
pub mod sparsity;
pub mod train;
