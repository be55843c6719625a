//! Online softmax: a running (max, sum of exponentials) pair folded one value at a time
//! (one pass over the data, one exponential per value), merged across a cube, and the
//! log-sum-exp that follows from it. What softmax, log-sum-exp and attention-style
//! kernels share.
#![allow(clippy::new_without_default)] // a cube type: built inside kernels, where `Default` is not callable

use crate::{cube_max, cube_sum, exp_diff};
use cubecl::prelude::*;

/// The running state: `max` of the values seen and `sum` of `exp(x - max)` over them.
/// Starts at the lowest finite f32 (not -inf, so `max - v` is never `-inf - -inf`);
/// -inf values then add `exp(-inf) = 0`.
#[derive(CubeType, Clone, Copy)]
pub struct OnlineSoftmax {
    /// Largest value seen (the lowest finite f32 when none or only -inf).
    pub max: f32,
    /// Sum of `exp(x - max)` over the values seen.
    pub sum: f32,
}

#[cube]
impl OnlineSoftmax {
    /// The empty state.
    pub fn new() -> OnlineSoftmax {
        OnlineSoftmax {
            max: f32::min_value(),
            sum: 0.0,
        }
    }

    /// Folds in `v`, with one exponential and no divergent branch: the smaller of the
    /// old max and `v` is rescaled to the larger. `one` is 1.0 opaque to the shader
    /// compiler (see [`exp_diff()`]).
    pub fn push(&mut self, v: f32, one: f32) {
        let hi = max(self.max, v);
        let e = exp_diff(min(self.max, v), hi, one);
        self.sum = select(v > self.max, self.sum * e + 1.0, self.sum + e);
        self.max = hi;
    }

    /// `ln(sum exp(x))`: `-inf` when nothing but -inf was seen.
    pub fn log_sum_exp(&self) -> f32 {
        self.max + f32::ln(self.sum)
    }
}

/// Merges every unit's state over the cube (a max-, then a sum-reduction; see
/// [`crate::cube_reduce()`]): every unit receives the cube's state. All `units` units
/// must call it.
#[cube]
pub fn cube_online_softmax(
    smem: &mut SharedMemory<f32>,
    state: OnlineSoftmax,
    one: f32,
    #[comptime] units: u32,
) -> OnlineSoftmax {
    let m = cube_max(smem, state.max, units);
    let s = cube_sum(smem, state.sum * exp_diff(state.max, m, one), units);
    OnlineSoftmax { max: m, sum: s }
}
