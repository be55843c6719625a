//! Fused optimizer steps (the formulas, their sources and the measured numbers are in
//! `docs/optim.md`): memory-bound kernels that read and write every state once.
//!
//! - Rules ([`Rule`]): `adamw` (PyTorch's AdamW), `adan` (sail-sg), `adabelief`,
//!   `adagrad` (PyTorch's), with PyTorch's or the papers' defaults ([`Hyper::defaults`]).
//! - Multi-tensor ([`MultiTensorStep`]): one launch updates up to [`SLOTS`] tensors (or
//!   blocks of tensors: S²FT's submatrices) of different sizes in place; f32 state
//!   packed in one buffer; f32/f16/bf16 parameters with an f32 master copy of half ones;
//!   the step counter lives on the device (no host synchronisation per step).
//! - `kiln run adamw|adan|adabelief|adagrad`: one tensor, out of place: inputs `param`,
//!   `grad` and the states by their formula names, outputs the same names.

mod multi;
pub mod reference;
mod registry;
mod rules;
pub mod selftest;

pub use multi::{
    Block, GivenState, MultiTensorStep, OptimAdvanceStep, OptimAdvanceStepArgs, OptimStep,
    OptimStepArgs, SLOTS,
};
pub(crate) use registry::run_step;
pub use registry::{ADABELIEF, ADAGRAD, ADAMW, ADAN};
pub use rules::{Hyper, Rule};
