//! The operator suite (`ops/suite.rs`) in f16 and bf16, untuned (`common::UNTUNED`): every
//! kernel its first configuration. The f32 suite in `ops` tunes as a user's first call
//! does; every candidate of every tuned kernel is validated in the `*_tune` binaries, and
//! the families' own suites run their configurations in f16 (`matmul`, `qgemm`), so
//! tuning here again in f16 cost about 100 s of CI's time (2026-12-07) for little more.
//! bf16 must be refused with `Unsupported` where the device lacks it (lavapipe).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;
#[path = "ops/suite.rs"]
#[macro_use]
mod suite;

use kiln::DType;
use suite::{every_other_op, run_op_on};

testgen_ops!(
    devices: [wgpu => "wgpu", cuda => "cuda"],
    dtypes: [f16 => DType::F16, bf16 => DType::BF16]
);
