//! coarsen-train (in progress)
#![allow(missing_docs)]
pub mod data;
pub mod error;
pub mod ops;
