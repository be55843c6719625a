//! Gradient compressors with error feedback (the selection engine is [`super::topk`]).
//!
//! - [`topk_ef`]: `a = e + g`; `c = top-k(|a|)` (exact: ties to the lower index; NaN
//!   ranks above ±inf); `e = a − c`.
//! - [`randk`]: `a = e + g`; `c = (n/k) a_S` with `S` a uniformly random k-subset drawn
//!   from `seed` (Philox; every worker with the same seed picks the same `S`, so the
//!   values can be summed across workers without sending indices); `e = a − c`.
//!
//! The compressed vector travels as `(indices, values)`: `[k]` i32 indices into the
//! flattened gradient in increasing order and `[k]` f32 values, which the
//! communicator's `all_gather` carries as two tensors.

use super::topk::{self, KeySource};
use crate::launch::{check_input, shape_err};
use kiln_runtime::{DType, Error, Result, Tensor};

pub use super::topk::Selected as Compressed;

/// Top-k with error feedback of `grad` (any shape, f32/f16/bf16) and the running error
/// `error` (f32, grad's element count; absent = 0): see the module doc.
pub fn topk_ef(grad: &Tensor, error: Option<&Tensor>, k: usize) -> Result<Compressed> {
    check(grad, error, k)?;
    topk::select_top_k(grad, error, k, KeySource::Magnitude, (0, 0), 1.0)
}

/// Rand-k with error feedback: `k` coordinates drawn from `seed` (shared by all
/// workers), values scaled by `n / k` (unbiased); see the module doc.
pub fn randk(grad: &Tensor, error: Option<&Tensor>, k: usize, seed: u64) -> Result<Compressed> {
    let n = check(grad, error, k)?;
    topk::select_top_k(
        grad,
        error,
        k,
        KeySource::Random,
        (seed, 0),
        (n as f64 / k as f64) as f32,
    )
}

/// Errors name `grad`, `error` or `k`; returns the element count.
fn check(grad: &Tensor, error: Option<&Tensor>, k: usize) -> Result<usize> {
    check_input("grad", grad, grad.client())?;
    let n = grad.numel();
    if let Some(e) = error {
        e.expect_dtype("error", &[DType::F32])?;
        e.expect_usable("error", grad.client())?;
        if e.numel() != n {
            return Err(shape_err(
                "error",
                format!("{n} elements (grad's)"),
                e.shape(),
            ));
        }
    }
    if k == 0 || k > n {
        return Err(Error::Param {
            param: "k".into(),
            expected: format!("1 <= k <= {n} (grad's elements)"),
            found: k.to_string(),
        });
    }
    Ok(n)
}

/// The host reference of a selection: the `k` positions of the largest `keys` (ties
/// to the lower index), in increasing order.
pub fn reference_select(keys: &[u32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&i, &j| keys[j].cmp(&keys[i]).then(i.cmp(&j)));
    let mut taken = order[..k].to_vec();
    taken.sort_unstable();
    taken
}

/// The keys [`topk_ef`] ranks `a` (f32 values) by: `|a|`'s bits.
pub fn magnitude_keys(a: &[f32]) -> Vec<u32> {
    a.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).collect()
}

/// The keys [`randk`] ranks `n` elements by under `seed` (stream 0; FRUGAL's subspace
/// `j` uses stream `j`).
pub fn random_keys(n: usize, seed: u64, stream: u32) -> Vec<u32> {
    (0..n as u64)
        .map(|i| crate::random::word(seed, stream, i))
        .collect()
}
