//! Training: S²FT (structured-sparse fine-tuning) and the fused optimizers, against f64
//! references written from the specs. One test binary for both families (each test
//! binary links all of kiln: fewer binaries, shorter CI).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

#[path = "../common/mod.rs"]
mod common;
mod compress;
mod flat;
mod frugal;
mod frugal_svd;
mod optim;
mod perturb;
mod s2ft;
