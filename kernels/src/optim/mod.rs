//! Fused optimizer steps (the formulas, their sources and the measured numbers are in
//! `docs/optim.md`): memory-bound kernels that read and write every state once.
//!
//! - Rules ([`Rule`]): `adamw` (PyTorch's AdamW), `adan` (sail-sg), `adabelief`,
//!   `adagrad` (PyTorch's), `lamb` and `adagrad_norm` (per-tensor norms: a reducing
//!   pass, then the update), with PyTorch's or the papers' defaults ([`Hyper::defaults`]).
//! - Multi-tensor ([`MultiTensorStep`]): one launch updates up to [`SLOTS`] tensors (or
//!   blocks of tensors: S²FT's submatrices) of different sizes in place, or any number of
//!   views of one flat buffer (`kiln_runtime::FlatLayout`); f32 state
//!   packed in one buffer; f32/f16/bf16 parameters with an f32 master copy of half ones;
//!   the step counter lives on the device (no host synchronisation per step).
//! - Seeded perturbation ([`perturb()`], [`zo_update`]): MeZO's `θ += ε z(seed)` and its update
//!   `θ −= lr Σ pᵢ z(seedᵢ)`, with `z ~ N(0, I)` regenerated in the kernel (Philox),
//!   bit-identical on every backend and on the host.
//! - FRUGAL ([`Frugal`]): Adam state on a seeded, periodically redrawn coordinate
//!   subset, signSGD on the rest; one tensor or a list (six per launch, a subset each).
//!   [`FrugalSvd`]: the SVD projection (Adam on the gradient's leading singular
//!   directions, from the device's Jacobi SVD, [`crate::svd`]).
//! - Gradient compressors ([`topk_ef`], [`randk`], [`econtrol`]): error feedback
//!   (EControl's with a controlled strength and an estimator `h`), exact top-k by a
//!   device radix select (deterministic, no atomics), rand-k's subset marked by `k`
//!   inverse permutation evaluations (integer atomic ors: deterministic too),
//!   `(indices, values)` outputs.
//! - `kiln run adamw|adan|adabelief|adagrad|lamb|adagrad_norm`: one tensor, out of place: inputs `param`,
//!   `grad` and the states by their formula names, outputs the same names.

mod adam;
mod block;
pub mod compress;
mod econtrol;
mod frugal;
mod multi;
mod perturb;
pub mod reference;
mod registry;
mod rules;
pub mod selftest;
mod slots;
mod step;
mod topk;

pub use block::Block;
pub use compress::{randk, topk_ef, topk_ef_estimated, Compressed};
pub use econtrol::{econtrol, EControlStep, EcontrolUpdate, EcontrolUpdateArgs};
pub use frugal::{
    frugal_matrix, BlockOrder, Frugal, FrugalAdamStep, FrugalAdamStepArgs, FrugalConfig,
    FrugalLines, FrugalLinesArgs, FrugalLowRankAdam, FrugalLowRankAdamArgs, FrugalMask,
    FrugalMaskArgs, FrugalProjectedUpdate, FrugalProjectedUpdateArgs, FrugalSignStep,
    FrugalSignStepArgs, FrugalSvd, Subspace, SvdState,
};
pub use multi::{GivenState, MultiTensorStep};
pub use perturb::{
    perturb, perturb_host, perturb_stream, perturb_sum, zo_update, PerturbNormal, PerturbNormalArgs,
};
pub(crate) use registry::run_step;
pub use registry::{ADABELIEF, ADAGRAD, ADAGRAD_NORM, ADAMW, ADAN, LAMB, PERTURB, ZO_UPDATE};
pub use rules::{Hyper, Rule};
pub use slots::SLOTS;
pub use step::{
    OptimAdvanceStep, OptimAdvanceStepArgs, OptimSlotNorms, OptimSlotNormsArgs, OptimStep,
    OptimStepArgs, Phase, Sums,
};
pub use topk::{
    KeySource, RadixSource, TopkCandidatesCount, TopkCandidatesCountArgs, TopkCandidatesShort,
    TopkCandidatesShortArgs, TopkCandidatesWrite, TopkCandidatesWriteArgs, TopkClearWords,
    TopkClearWordsArgs, TopkFormCandidates, TopkFormCandidatesArgs, TopkKeys, TopkKeysArgs,
    TopkRadixChoose, TopkRadixChooseArgs, TopkRadixCompact, TopkRadixCompactArgs,
    TopkRadixHistogram, TopkRadixHistogramArgs, TopkSample, TopkSampleArgs, TopkScan, TopkScanArgs,
    TopkSubsetCount, TopkSubsetCountArgs, TopkSubsetMark, TopkSubsetMarkArgs, TopkSubsetWrite,
    TopkSubsetWriteArgs,
};

/// The name of the `i`-th of `count` listed tensors `what` in errors: `what` alone for a
/// list of one (as `kiln run` passes), `what[i]` otherwise.
fn param_name(count: usize, what: &str, i: usize) -> String {
    match count {
        1 => what.to_string(),
        _ => format!("{what}[{i}]"),
    }
}

/// An error naming the gradient and the weight where a gradient shares elements with a
/// weight the step writes (views of one buffer), other than its own weight's exact
/// elements: the launches would read it while other cubes write it.
fn no_gradient_overlaps_a_weight(
    weights: &[&kiln_runtime::Tensor],
    grads: &[&kiln_runtime::Tensor],
) -> kiln_runtime::Result<()> {
    match kiln_runtime::Tensor::written_overlap(weights, grads) {
        None => Ok(()),
        Some((i, j)) => Err(kiln_runtime::Error::Shape {
            tensor: param_name(grads.len(), "grad", j),
            expected: format!(
                "no element shared with {} (updated in place)",
                param_name(weights.len(), "param", i)
            ),
            found: "a view of the same elements of one buffer".into(),
        }),
    }
}

/// An error naming `params` unless a step got one param and one grad for each of the
/// `count` tensors the optimizer was created with.
fn expect_list(count: usize, params: usize, grads: usize) -> kiln_runtime::Result<()> {
    if params == count && grads == count {
        return Ok(());
    }
    Err(kiln_runtime::Error::Param {
        param: "params".into(),
        expected: format!("{count} params and grads (as created)"),
        found: format!("{params} params, {grads} grads"),
    })
}
