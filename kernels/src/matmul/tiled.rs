//! The register tile the FMA `matmul` kernels share (`staged`, `direct`), and the
//! pieces every `matmul` kernel shares: the fused epilogue and clamped strided indices.
//!
//! One cube computes a `BM x BN` tile of `c`; each of its `(BM/TM)(BN/TN)` units keeps
//! a `TM x TN` register tile of f32 accumulators, its rows `ty + i BM/TM` and columns
//! `tx + j BN/TN` strided across units (neighbouring units touch neighbouring
//! addresses). Four main loops, one kernel each, share the signature, the tile
//! origin, the accumulators and the epilogue ([`store_tile`]):
//! - `matmul_staged`: `BK`-deep K slices of `a` (k-major) and `b` staged in shared
//!   memory, zero-filled past the edges (the GPU path); `VEC` consecutive elements per
//!   staging step.
//! - `matmul_staged_v4`: the same with b's slice and the accumulators as 4-wide vectors.
//! - `matmul_direct`: every unit reads its fragments from global memory, rows and
//!   columns past the edge clamped (no shared memory, no barriers: CPU adapters).
//! - `matmul_direct_v4`: the same with 4-wide vector accumulators.

use super::Activation;
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, silu};

/// The epilogue of a register tile: element (i, j) of the unit's accumulators is row
/// `ty + i BM/TM` of the cube's tile and column `tx + j BN/TN`, or with
/// `vector_columns` column `4 (tx + (j / 4) BN/TN) + j % 4`; masked to `m x n`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_tile<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    acc: &Array<f32>,
    m: u32,
    n: u32,
    row0: u32,
    col0: u32,
    ty: u32,
    tx: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
    #[comptime] bm: u32,
    #[comptime] bn: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] vector_columns: bool,
) {
    let cols_of_units = comptime!(bn / tn);
    let rows_of_units = comptime!(bm / tm);
    #[unroll]
    for i in 0..tm {
        let r = row0 + ty + i * rows_of_units;
        #[unroll]
        for j in 0..tn {
            let mut col = col0 + tx + j * cols_of_units;
            if comptime!(vector_columns) {
                col = col0 + (tx + (j / 4) * cols_of_units) * 4 + j % 4;
            }
            if r < m && col < n {
                store_epilogue::<F>(
                    c,
                    bias,
                    residual,
                    acc[(i * tn + j) as usize],
                    r,
                    col,
                    n,
                    has_bias,
                    has_residual,
                    act,
                );
            }
        }
    }
}

/// `idx[i] = min(first + i * step, last)` for `i < count`: a unit's strided rows or
/// columns, clamped to the last valid one (computed, never stored), so the main loops
/// of the direct kernels need no branch.
#[cube]
pub(crate) fn clamped_strided(
    idx: &mut Array<u32>,
    first: u32,
    step: u32,
    last: u32,
    #[comptime] count: u32,
) {
    #[unroll]
    for i in 0..count {
        idx[i as usize] = min(first + i * step, last);
    }
}

/// The fused epilogue of every `matmul` kernel for one element `v` (f32) of row `r`,
/// column `col`: `+ bias[col]`, the activation, `+ residual[r, col]`, then one rounding
/// to F into `c[r, col]`. The caller masks `r < m`, `col < n`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_epilogue<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    v: f32,
    r: u32,
    col: u32,
    n: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += f32::cast_from(bias[col as usize]);
    }
    if comptime!(act == Activation::Silu) {
        v = silu::<Const<1>>(Vector::new(v))[0];
    }
    if comptime!(act == Activation::Gelu) {
        v = gelu_tanh::<Const<1>>(Vector::new(v))[0];
    }
    if comptime!(has_residual) {
        v += f32::cast_from(residual[(r * n + col) as usize]);
    }
    c[(r * n + col) as usize] = F::cast_from(v);
}
