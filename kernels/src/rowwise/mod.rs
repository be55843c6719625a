//! Row-wise operators over the last dimension.
//!
//! Spec: for `x` of shape `[..., D]`, `softmax(x)_j = exp(x_j - m) / sum_k exp(x_k - m)`
//! with `m = max_k x_k` (out: x's shape), and `logsumexp(x) = m + ln(sum_k exp(x_k - m))`
//! (out: x's shape without its last dimension). Accumulation in f32 for every storage
//! dtype. A row that is entirely -inf gives softmax 0 everywhere (not NaN, unlike
//! PyTorch) and logsumexp -inf; an empty last dimension (D = 0) gives an empty
//! softmax and a logsumexp of -inf, as PyTorch does.
//!
//! One cube per row. Each unit keeps an online (max, sum) pair over its strided slice
//! of the row (one read of `x`), the cube merges the pairs with a max- then a
//! sum-reduction, and softmax re-reads `x` once to write. So softmax reads `x` twice
//! and logsumexp once.

pub mod selftest;

use crate::launch::{check_input, elementwise_cost, x_only};
use cubecl::prelude::*;
use kiln_dsl::{cube_online_softmax, cube_sum, exp_diff, linear_cube, OnlineSoftmax};
use kiln_runtime::{
    shape_str, Client, Dtypes, Error, HostTensor, OpArgs, OpSpec, Outputs, Result, Tensor,
    TensorSpec,
};

// ---------------------------------------------------------------- host API

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    rowwise(x, false)
}

/// Log-sum-exp over the last dimension (the output drops that dimension).
pub fn logsumexp(x: &Tensor) -> Result<Tensor> {
    rowwise(x, true)
}

fn rowwise(x: &Tensor, lse: bool) -> Result<Tensor> {
    let client = x.client();
    check_input("x", x, client)?;
    let Some((&cols, lead)) = x.shape().split_last() else {
        return Err(Error::Shape {
            tensor: "x".into(),
            expected: "rank >= 1, [..., D]".into(),
            found: shape_str(x.shape()),
        });
    };
    let rows: usize = lead.iter().product();
    if cols == 0 && lse {
        // As PyTorch: the log of an empty sum is -inf. An output the device cannot
        // hold is refused before the host buffer is built.
        client.require_buffer("out", rows.saturating_mul(x.dtype().size()))?;
        let host = HostTensor::from_f64(x.dtype(), lead.to_vec(), &vec![f64::NEG_INFINITY; rows])?;
        return Tensor::upload_named(client, "out", &host);
    }
    if rows == 0 || cols == 0 {
        let out_shape = if lse { lead } else { x.shape() };
        return Tensor::empty(client, x.dtype(), out_shape);
    }
    let out_shape = if lse { lead } else { x.shape() };
    let out = Tensor::empty(client, x.dtype(), out_shape)?;
    // Candidates differ only in summation order: they agree to a few roundings.
    // check_input bounds rows * cols by 2^31: both fit in u32, as does every index.
    let tolerance = 16.0 * x.dtype().epsilon();
    RowReduce::tuned(
        client,
        tolerance,
        &RowReduceArgs {
            x,
            out: &out,
            rows: rows as u32,
            cols: cols as u32,
            lse,
        },
    )?;
    Ok(out)
}

// ---------------------------------------------------------------- kernels

/// Softmax (`lse = false`) or log-sum-exp (`lse = true`) of each row, one cube of
/// `UNITS` units per row; see the module docs for the algorithm. Tuned over `UNITS`,
/// largest first (more units than the row rounded up would idle); the grid wraps rows
/// past 65 535 into y.
#[kiln_macros::kernel(
    tune(UNITS = [256, 128, 64, 32]),
    require(UNITS as usize <= cols.next_power_of_two().max(32) as usize),
    key(rows = pow2, cols = pow2, dtype),
    grid = cubes(rows),
    cube = UNITS,
)]
fn row_reduce<F: Float>(
    x: &Array<F>,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    #[comptime] lse: bool,
) {
    let row = linear_cube();
    // `row` is the same for every unit of the cube, so the barriers inside the
    // reductions are reached uniformly.
    if row < rows as usize {
        let base = row * cols as usize;
        let mut smem = SharedMemory::<f32>::new(UNITS as usize);
        // 1.0, but opaque to the shader compiler (cols >= 1): see `exp_diff`.
        let one = f32::cast_from(min(cols, 1u32));

        // Online (max, sum) over this unit's strided slice, merged over the cube.
        let mut state = OnlineSoftmax::new();
        // NaN is summed apart: the online update compares and clamps (`max` drops NaN
        // on some backends), a sum keeps it.
        let mut nan = 0.0f32;
        let mut j = UNIT_POS as usize;
        while j < cols as usize {
            let v = f32::cast_from(x[base + j]);
            nan += select(v.is_nan(), v, 0.0);
            state.push(v, one);
            j += UNITS as usize;
        }
        let nan_sum = cube_sum(&mut smem, nan, UNITS);
        let stats = cube_online_softmax(&mut smem, state, one, UNITS);
        let (row_max, row_sum) = (stats.max, stats.sum);
        // A row holding NaN is NaN throughout, as in PyTorch: `poison` is 0 or NaN. (A
        // row holding +inf has a NaN sum, exp(inf - inf), which the denominator keeps.)
        let poison = nan_sum;

        if comptime!(lse) {
            if UNIT_POS == 0 {
                // An all -inf row has row_sum == 0 and row_max the lowest finite f32,
                // so this is ln(0) = -inf. Written without an infinity literal: WGSL
                // rejects `f32(-inf)`, which is what cubecl emits for NEG_INFINITY.
                out[row] = F::cast_from(stats.log_sum_exp() + poison);
            }
        } else {
            // An all -inf row has row_sum == 0: divide by 1 instead (every exp is 0),
            // writing zeros rather than 0/0. A division, not a reciprocal and a
            // product: one rounding instead of two.
            let denom = select(row_sum == 0.0, 1.0, row_sum) + poison;
            let mut j = UNIT_POS as usize;
            while j < cols as usize {
                let v = f32::cast_from(x[base + j]);
                out[base + j] = F::cast_from(exp_diff(v, row_max, one) / denom);
                j += UNITS as usize;
            }
        }
    }
}

// ---------------------------------------------------------------- reference

/// f64 references over rows of `cols` elements, written from the spec.
pub mod reference {
    fn row_max(row: &[f64]) -> f64 {
        row.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    /// Row-wise softmax; an all -inf row gives zeros.
    pub fn softmax(x: &[f64], cols: usize) -> Vec<f64> {
        x.chunks(cols)
            .flat_map(|row| {
                let m = row_max(row);
                if m == f64::NEG_INFINITY {
                    return vec![0.0; row.len()];
                }
                let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
                row.iter().map(|v| (v - m).exp() / s).collect()
            })
            .collect()
    }
    /// Row-wise log-sum-exp; an all -inf row gives -inf.
    pub fn logsumexp(x: &[f64], cols: usize) -> Vec<f64> {
        x.chunks(cols)
            .map(|row| {
                let m = row_max(row);
                if m == f64::NEG_INFINITY {
                    return f64::NEG_INFINITY;
                }
                m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
            })
            .collect()
    }
}

// ---------------------------------------------------------------- registry

const X: TensorSpec = TensorSpec::new(
    "x",
    "[..., D], rank >= 1",
    Dtypes::Float,
    false,
    "input; the operator works over the last dimension",
);

fn run_rowwise(client: &Client, a: &OpArgs, lse: bool) -> Result<Outputs> {
    let x = a.tensor("x")?;
    x.expect_usable("x", client)?;
    Ok(vec![("out", rowwise(x, lse)?)])
}
fn run_softmax(client: &Client, a: &OpArgs) -> Result<Outputs> {
    run_rowwise(client, a, false)
}
fn run_logsumexp(client: &Client, a: &OpArgs) -> Result<Outputs> {
    run_rowwise(client, a, true)
}

/// `softmax` over the last dimension.
pub static SOFTMAX: OpSpec = OpSpec {
    name: "softmax",
    summary: "softmax over the last dimension (stable; an all -inf row gives zeros)",
    inputs: &[X],
    outputs: &[TensorSpec::new(
        "out",
        "x's shape",
        Dtypes::Like("x"),
        false,
        "probabilities",
    )],
    params: &[],
    run: run_softmax,
    cost: |d, e| elementwise_cost(d, e, 25.0),
    problem: "shape of x",
    example_inputs: x_only,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "softmax"),
    in_place: None,
};
/// `logsumexp` over the last dimension.
pub static LOGSUMEXP: OpSpec = OpSpec {
    name: "logsumexp",
    summary: "log-sum-exp over the last dimension (stable; an all -inf row gives -inf)",
    inputs: &[X],
    outputs: &[TensorSpec::new(
        "out",
        "[...] (x's shape without D)",
        Dtypes::Like("x"),
        false,
        "log-sum-exp of each row",
    )],
    params: &[],
    run: run_logsumexp,
    // Reads x once, writes one value per row.
    cost: |d, e| {
        (
            elementwise_cost(d, e, 12.0).0,
            elementwise_cost(d, e, 0.0).1 / 2.0,
        )
    },
    problem: "shape of x",
    example_inputs: x_only,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "logsumexp"),
    in_place: None,
};

kiln_runtime::register_op!(SOFTMAX, LOGSUMEXP);
