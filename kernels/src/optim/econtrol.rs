//! EControl (Gao, Islamov and Stich, "EControl: Fast Distributed Optimization with
//! Compression and Error Control", ICLR 2024, arXiv 2311.05645, Algorithm 1): error
//! feedback whose strength is controlled by `eta`, with a gradient estimator `h` built
//! from the same compressed message. One worker's step:
//!
//! ```text
//! p  = eta e + g - h          -- what is compressed
//! Δ  = top-k(p)               -- sent as (indices, values)
//! e' = e + g - h - Δ          -- the error, in gradient units
//! h' = h + Δ
//! ```
//!
//! The server keeps the mean of the workers' `h` (adding the mean of the received `Δ`)
//! and steps `x -= lr · mean(h')`. Initial state: `e = 0`; `h` the first gradient
//! (uncompressed) or 0. `e' + h' = e + g`: what is not yet in `h` stays in `e`. Where a
//! coordinate is sent, `e' = (1 - eta) e` exactly as the formula gives it, formed without
//! the formula's cancellation (so a sent ±inf leaves a finite error, not `inf - inf`).
//!
//! Sources: the paper's text could not be read from this machine; the equations are
//! those of three independent implementations that agree term for term (the
//! `ECONTROL` branch of `gen_sgd.py` in IgorSokoloff/Parameter-Agnostic-Error-Feedback-
//! through-Momentum; `pepit_helpers.py` and `lyapunov.py` in
//! DanielBergThomsen/distributed-error-feedback; an `EControl` communicator citing
//! arXiv 2311.05645) and of the ICLR reviews (`eta = δ / 400` in the theory, `δ` the
//! compressor's contraction; tuned in the experiments, where `eta = 0.1` with top-10 %
//! is a released run). See `docs/optim.md`.

use super::topk::{self, Selected};
use crate::launch::absent;
use cubecl::prelude::*;
use kiln_runtime::{DType, Error, Result, Tensor};

/// One worker's EControl step: the message and the new state.
pub struct EControlStep {
    /// `[k]` i32 positions of `Δ` in the flattened gradient, increasing.
    pub indices: Tensor,
    /// `[k]` f32 values of `Δ` there.
    pub values: Tensor,
    /// `[n]` f32 new error `e' = e + g - h - Δ`.
    pub error: Tensor,
    /// `[n]` f32 new estimator `h' = h + Δ`.
    pub h: Tensor,
}

/// EControl's compressor step (see the module doc) of `grad` (any shape,
/// f32/f16/bf16) with the error `error` and estimator `h` (f32, grad's element count;
/// absent = 0), top-`k` of `p = eta e + g - h` (exact, ties to the lower index). `eta`
/// is finite and >= 0 (0 with `h = 0` and no error is plain top-k of the gradient
/// difference: EF21's message).
pub fn econtrol(
    grad: &Tensor,
    error: Option<&Tensor>,
    h: Option<&Tensor>,
    k: usize,
    eta: f32,
) -> Result<EControlStep> {
    let n = super::compress::check(grad, &[("error", error), ("h", h)], k)?;
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(Error::Param {
            param: "eta".into(),
            expected: "a finite value >= 0".into(),
            found: eta.to_string(),
        });
    }
    let (
        p,
        Selected {
            indices,
            values,
            error: rest,
            ..
        },
    ) = topk::select_controlled(grad, error, h, eta, k)?;
    let client = grad.client();
    let new_error = Tensor::empty(client, DType::F32, &[n])?;
    let new_h = Tensor::empty(client, DType::F32, &[n])?;
    let placeholder = absent(client)?;
    EcontrolUpdate::tuned(
        client,
        0.0,
        &EcontrolUpdateArgs {
            grad,
            error: error.unwrap_or(&placeholder),
            h: h.unwrap_or(&placeholder),
            p: &p,
            rest: &rest,
            new_error: &new_error,
            new_h: &new_h,
            n: n as u32,
            eta,
            has_error: error.is_some(),
            has_h: h.is_some(),
        },
    )?;
    Ok(EControlStep {
        indices,
        values,
        error: new_error,
        h: new_h,
    })
}

/// The state update from `p` and the selection's `rest` (0 where taken, `p` elsewhere,
/// bit for bit): where taken, `Δ = p`, `e' = (1 - eta) e` (what `e + g - h - p` is,
/// without its cancellation, and finite where `p` is ±inf) and `h' = h + p`; elsewhere
/// `Δ = 0`, `e' = e + g - h` and `h' = h`. f32, one element per unit.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(n = pow2, dtype),
    grid = cubes(n.div_ceil(UNITS)),
    cube = UNITS
)]
pub fn econtrol_update<F: Float>(
    grad: &Array<F>,
    error: &Array<f32>,
    h: &Array<f32>,
    p: &Array<f32>,
    rest: &Array<f32>,
    new_error: &mut Array<f32>,
    new_h: &mut Array<f32>,
    n: u32,
    eta: f32,
    #[comptime] has_error: bool,
    #[comptime] has_h: bool,
) {
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if i < n {
        let pv = p[i as usize];
        // Not taken: `rest` is `p` bit for bit (±inf and NaN included, where `p - rest`
        // would not be 0). A taken +0 reads as not taken, which is the same step.
        let taken = u32::reinterpret(rest[i as usize]) != u32::reinterpret(pv);
        let mut e = 0.0f32;
        if comptime!(has_error) {
            e = error[i as usize];
        }
        let mut hv = 0.0f32;
        if comptime!(has_h) {
            hv = h[i as usize];
        }
        let g = f32::cast_from(grad[i as usize]);
        new_error[i as usize] = select(taken, (1.0 - eta) * e, g + e - hv);
        new_h[i as usize] = select(taken, hv + pv, hv);
    }
}
