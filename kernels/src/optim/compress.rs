//! Gradient compressors with error feedback (the selection engine is the private
//! `optim::topk` module: an exact, deterministic device radix select, and rand-k's
//! subset marked by the inverse of a seeded permutation).
//!
//! - [`topk_ef`]: `a = e + g`; `c = top-k(|a|)` (exact: ties to the lower index; NaN
//!   ranks above ±inf); `e = a − c`.
//! - [`topk_ef_estimated`]: the threshold-estimate variant: the threshold from a
//!   seeded sample, every `|a|` above it sent (about k values).
//! - [`randk`]: `a = e + g`; `c = (n/k) a_S` with `S` a uniformly random k-subset drawn
//!   from `seed` (the indices a seeded permutation of `0..n` sends below `k`; every
//!   worker with the same seed picks the same `S`, so the values can be summed across
//!   workers without sending indices); `e = a − c`.
//!
//! The compressed vector travels as `(indices, values)`: `[k]` i32 indices into the
//! flattened gradient in increasing order and `[k]` f32 values, which the
//! communicator's `all_gather` carries as two tensors.

use super::topk::{self, KeySource};
pub use super::topk::{
    bracket_pays, bracket_rank, with_unit_layout, UnitLayout, BRACKET_SAMPLE, BRACKET_SEED,
};
use crate::launch::{check_input, shape_err};
use kiln_runtime::{DType, Error, Result, Tensor};

pub use super::topk::Selected as Compressed;

/// Top-k with error feedback of `grad` (any shape, f32/f16/bf16) and the running error
/// `error` (f32, grad's element count; absent = 0): see the module doc.
pub fn topk_ef(grad: &Tensor, error: Option<&Tensor>, k: usize) -> Result<Compressed> {
    check(grad, &[("error", error)], k)?;
    topk::select_top_k(grad, error, k, KeySource::Magnitude, (0, 0), 1.0)
}

/// [`topk_ef`] through the radix select over every key, never the sampled bracket (the
/// same result; `kiln run topk_ef --set method=radix`, to compare the two on a device).
pub(crate) fn topk_ef_every_key(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
) -> Result<Compressed> {
    check(grad, &[("error", error)], k)?;
    topk::select_top_k_every_key(grad, error, k, 1.0)
}

/// Top-k with error feedback and an estimated threshold (faster, not exact): the
/// threshold is the `round(k · sample / n)`-th largest `|a|` of `sample` positions
/// drawn from `seed`, and every `|a|` at or above it is sent, so about `k` values
/// (their number is the outputs' length). Eight radix passes over the sample instead
/// of over `a`; one small download sizes the outputs.
pub fn topk_ef_estimated(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
    sample: usize,
    seed: u64,
) -> Result<Compressed> {
    check(grad, &[("error", error)], k)?;
    if sample == 0 {
        return Err(Error::Param {
            param: "sample".into(),
            expected: ">= 1".into(),
            found: "0".into(),
        });
    }
    topk::select_above_estimate(grad, error, k, sample, seed)
}

/// Rand-k with error feedback: `k` coordinates drawn from `seed` (shared by all
/// workers), values scaled by `n / k` (unbiased); see the module doc.
pub fn randk(grad: &Tensor, error: Option<&Tensor>, k: usize, seed: u64) -> Result<Compressed> {
    let n = check(grad, &[("error", error)], k)?;
    topk::select_top_k(
        grad,
        error,
        k,
        KeySource::Permutation,
        (seed, 0),
        (n as f64 / k as f64) as f32,
    )
}

/// Errors name `grad`, the f32 state tensor (`error`, EControl's `h`) or `k`; returns
/// the element count.
pub(crate) fn check(grad: &Tensor, states: &[(&str, Option<&Tensor>)], k: usize) -> Result<usize> {
    check_input("grad", grad, grad.client())?;
    let n = grad.numel();
    for &(name, state) in states {
        let Some(t) = state else { continue };
        t.expect_dtype(name, &[DType::F32])?;
        t.expect_usable(name, grad.client())?;
        if t.numel() != n {
            return Err(shape_err(name, format!("{n} elements (grad's)"), t.shape()));
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

/// Keys that rank `n` elements as [`randk`] selects them under `seed` (the tests'
/// reference, from the forward permutation): `n - 1 - π(i)`, `π` the seeded
/// permutation of `0..n` ([`crate::random::permute_index`]), so the `k` largest are
/// the indices `π` sends below `k`, which `randk` marks as `π⁻¹(0..k)`.
pub fn randk_keys(n: usize, seed: u64) -> Vec<u32> {
    let n32 = n as u32;
    (0..n32)
        .map(|i| n32 - 1 - crate::random::permute_index(seed, n32, i))
        .collect()
}

/// The keys FRUGAL's subspace `j` ranks `n` elements by under `seed`: Philox words of
/// stream `j`.
pub fn random_keys(n: usize, seed: u64, stream: u32) -> Vec<u32> {
    (0..n as u64)
        .map(|i| crate::random::word(seed, stream, i))
        .collect()
}

/// The top-k compression error `‖a − top-k(a)‖₂` of each of `grads` (flattened) at each
/// of `densities` (`k = ceil(density · n)`, at least 1): `errors[layer][level]`, the
/// table L-GreCo's per-layer choice needs ([`lgreco_plan`]). One exact selection per
/// (layer, level) on the device; one small download each.
pub fn compression_errors(grads: &[&Tensor], densities: &[f64]) -> Result<Vec<Vec<f64>>> {
    if let Some(d) = densities.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
        return Err(Error::Param {
            param: "densities".into(),
            expected: "each in (0, 1]".into(),
            found: d.to_string(),
        });
    }
    grads
        .iter()
        .enumerate()
        .map(|(l, g)| {
            check_input(&format!("grads[{l}]"), g, g.client())?;
            let n = g.numel();
            densities
                .iter()
                .map(|d| {
                    if n == 0 {
                        return Ok(0.0);
                    }
                    let k = ((d * n as f64).ceil() as usize).clamp(1, n);
                    topk::select_top_k(g, None, k, KeySource::Magnitude, (0, 0), 1.0)?.error_norm()
                })
                .collect()
        })
        .collect()
}

/// The most table entries (`layers x buckets`) [`lgreco_plan`] takes: 2^26, about 512
/// MiB of choices (a 100-layer model: 671k steps of the budget).
pub const MAX_LGRECO_ENTRIES: usize = 1 << 26;

/// L-GreCo's per-layer choice of compression level (Markov et al., 2024): the level of
/// each layer minimising the total squared error `Σ errors[l][c_l]²` subject to
/// `Σ sizes[l][c_l] <= budget` (sizes in any unit, e.g. elements sent), by dynamic
/// programming over the budget in `buckets` steps (sizes rounded up to a step, so a
/// returned plan always fits; with `buckets >= budget` and integer sizes it is exact).
/// `layers x buckets` is at most [`MAX_LGRECO_ENTRIES`] (the program's tables): past
/// that, fewer buckets give a plan exact to within one step. Errors when no plan fits,
/// the tables disagree in shape, or `buckets` is past the bound.
pub fn lgreco_plan(
    errors: &[Vec<f64>],
    sizes: &[Vec<usize>],
    budget: usize,
    buckets: usize,
) -> Result<Vec<usize>> {
    let bad = |expected: String, found: String| Error::Param {
        param: "lgreco_plan".into(),
        expected,
        found,
    };
    if errors.len() != sizes.len()
        || errors
            .iter()
            .zip(sizes)
            .any(|(e, s)| e.len() != s.len() || e.is_empty())
    {
        return Err(bad(
            "errors and sizes of the same shape, at least one level per layer".into(),
            format!("{} and {} layers", errors.len(), sizes.len()),
        ));
    }
    // A NaN or infinite error (e.g. from a NaN gradient) would make every plan through
    // its layer look impossible: refused by name instead.
    for (l, e) in errors.iter().enumerate() {
        if let Some(c) = e.iter().position(|x| !x.is_finite()) {
            return Err(Error::Param {
                param: "errors".into(),
                expected: "finite compression errors".into(),
                found: format!("{} at layer {l}, level {c}", e[c]),
            });
        }
    }
    let asked = buckets;
    let buckets = buckets.clamp(1, budget.max(1));
    let most = MAX_LGRECO_ENTRIES / errors.len().max(1);
    if buckets > most {
        return Err(Error::Param {
            param: "buckets".into(),
            expected: format!(
                "at most {most} steps of the budget for {} layers (the program's tables \
                 hold layers x buckets entries, at most {MAX_LGRECO_ENTRIES})",
                errors.len()
            ),
            found: asked.to_string(),
        });
    }
    let step = budget.div_ceil(buckets).max(1);
    let cap = budget / step;
    // best[b] = least total error of the layers so far using b steps; choice per layer.
    let mut best = vec![0.0f64; cap + 1];
    let mut choice: Vec<Vec<usize>> = Vec::with_capacity(errors.len());
    for (e, s) in errors.iter().zip(sizes) {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = vec![usize::MAX; cap + 1];
        for b in 0..=cap {
            for (c, (&err, &size)) in e.iter().zip(s).enumerate() {
                let need = size.div_ceil(step);
                if need <= b && best[b - need].is_finite() {
                    let total = best[b - need] + err * err;
                    if total < next[b] {
                        next[b] = total;
                        pick[b] = c;
                    }
                }
            }
        }
        best = next;
        choice.push(pick);
    }
    if !best[cap].is_finite() {
        let least: usize = sizes
            .iter()
            .map(|s| s.iter().copied().min().unwrap_or(0))
            .sum();
        return Err(bad(
            format!("a budget of at least {least} (every layer at its smallest level)"),
            budget.to_string(),
        ));
    }
    // Walk back from the full budget.
    let mut plan = vec![0; errors.len()];
    let mut b = cap;
    for l in (0..errors.len()).rev() {
        let c = choice[l][b];
        plan[l] = c;
        b -= sizes[l][c].div_ceil(step);
    }
    Ok(plan)
}
