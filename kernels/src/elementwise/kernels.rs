//! The element-wise kernels: one binary (with `y` broadcast), one unary (activations),
//! both on vectors of the widest width dividing every length.

use super::{BinaryOp, UnaryOp};
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, linear_unit, silu as silu_f32};

/// `out[i] = x[i] op y[i mod len(y)]`, in vectors of `N` elements (the widest of 4, 2, 1
/// dividing both lengths; `len`, `y_len` in elements). Each unit handles `PER_UNIT`
/// vectors `stride` apart (coalesced across units) and tracks `i mod y_len`
/// incrementally (`step = stride mod y_len`): an integer division per vector costs as
/// much as the memory traffic on CPU adapters, one per unit does not; with `step` 0 it
/// loads `y[j]` once. The grid wraps past 65 535 cubes into y. `PER_UNIT` is 4 on GPUs
/// (units enough to fill the device) and 16 on CPU adapters, where `y[j]`'s per-lane
/// load, once per unit, cost a sixth of a 4M-element `add` at 4 (25.3 -> 21.7 ms).
#[kiln_macros::kernel(
    tune(UNITS = [256], PER_UNIT = [4, 16]),
    vector = [4, 2, 1],
    key(len = pow2, dtype),
    grid = (
        len.div_ceil(VECTOR * UNITS * PER_UNIT).min(65_535),
        len.div_ceil(VECTOR * UNITS * PER_UNIT).div_ceil(65_535)
    ),
    cube = UNITS,
)]
pub fn elementwise_binary<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    y: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    len: u32,
    y_len: u32,
    #[comptime] op: BinaryOp,
) {
    let width = N::value().comptime() as u32;
    let (len, y_len) = (len / width, y_len / width);
    // Units in the whole grid: the distance between a unit's consecutive vectors.
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let step = stride % y_len;
    let mut i = linear_unit();
    let mut j = i % y_len as usize;
    // `y[j]` loaded once where the stride is a multiple of y's length (`step` 0: a power
    // of two no longer than the grid, the common case), else again per vector: on a CPU
    // adapter every load with a per-lane address is a loop over the SIMD lanes, and a
    // second load per vector cost as much again as the copy it rides on.
    let mut b = y[j];
    #[unroll]
    for _ in 0..PER_UNIT {
        if i < len as usize {
            let a = x[i];
            if comptime!(op == BinaryOp::Add) {
                out[i] = a + b;
            } else {
                out[i] = a * b;
            }
        }
        i += stride as usize;
        if step != 0 {
            j += step as usize;
            if j >= y_len as usize {
                j -= y_len as usize;
            }
            b = y[j];
        }
    }
}

/// `out[i] = act(x[i])` in vectors of `N` elements (`len` in elements), evaluated in
/// f32 whatever F is (f16 would overflow `exp`).
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 2, 1],
    key(len = pow2, dtype),
    grid = (
        len.div_ceil(VECTOR * UNITS).min(65_535),
        len.div_ceil(VECTOR * UNITS).div_ceil(65_535)
    ),
    cube = UNITS,
)]
pub fn elementwise_unary<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    len: u32,
    #[comptime] op: UnaryOp,
) {
    let width = N::value().comptime() as u32;
    let i = linear_unit();
    if i < (len / width) as usize {
        let v = Vector::<f32, N>::cast_from(x[i]);
        if comptime!(op == UnaryOp::Silu) {
            out[i] = Vector::<F, N>::cast_from(silu_f32::<N>(v));
        } else {
            out[i] = Vector::<F, N>::cast_from(gelu_tanh::<N>(v));
        }
    }
}
