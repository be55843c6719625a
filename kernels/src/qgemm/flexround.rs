//! FlexRound fake quantization (Lee et al., ICML 2023): the element-wise forward and
//! its straight-through backward.
//!
//! `d = s1 S2[o, i] s3[o] s4[i]`, `u = w / d`, `r = round(u)` (ties to even, as
//! `torch.round`), `c = clamp(r, qmin, qmax)`, `wq = s1 c`. With the straight-through
//! estimator (`dr/du = 1`) and `m = [qmin <= r <= qmax]`, for an upstream gradient `g`:
//! `dw = g s1 m / d`; `t = -g s1 m u` gives `dS2 = t / S2`, `ds3[o] = sum_i t / s3[o]`,
//! `ds4[i] = sum_o t / s4[i]`; and `ds1 = sum g (c - m u)`. Reductions are f32.

use crate::launch::{check_input, expect_shape, shape_err};
use cubecl::prelude::*;
use kiln_dsl::{clamp_keep_nan, cube_sum, round_half_even};
use kiln_runtime::{DType, Error, Result, Tensor};

// ---------------------------------------------------------------- host API

/// FlexRound's inputs: `w` and `s2` `[rows, cols]`, `s1` one element, `s3` `[rows]`,
/// `s4` `[cols]`, all of w's dtype; codes are clamped to `[qmin, qmax]`.
#[derive(Clone, Copy)]
pub struct FlexRoundInputs<'a> {
    /// The weight `[rows, cols]` (output channels x input channels).
    pub w: &'a Tensor,
    /// Per-tensor scale, one element.
    pub s1: &'a Tensor,
    /// Per-element divisor `[rows, cols]`.
    pub s2: &'a Tensor,
    /// Per-output-channel divisor `[rows]`.
    pub s3: &'a Tensor,
    /// Per-input-channel divisor `[cols]`.
    pub s4: &'a Tensor,
    /// Smallest code (e.g. -8 for signed 4-bit).
    pub qmin: f64,
    /// Largest code (e.g. 7).
    pub qmax: f64,
}

/// FlexRound's gradients, in w's dtype, each in its parameter's shape.
pub struct FlexRoundGrads {
    /// dL/dw `[rows, cols]`.
    pub dw: Tensor,
    /// dL/ds1, one element (s1's shape).
    pub ds1: Tensor,
    /// dL/dS2 `[rows, cols]`.
    pub ds2: Tensor,
    /// dL/ds3, `rows` elements (s3's shape).
    pub ds3: Tensor,
    /// dL/ds4, `cols` elements (s4's shape).
    pub ds4: Tensor,
}

fn check_flexround(p: &FlexRoundInputs<'_>) -> Result<(usize, usize)> {
    let client = p.w.client();
    check_input("w", p.w, client)?;
    let &[rows, cols] = p.w.shape() else {
        return Err(shape_err("w", "[rows, cols]".into(), p.w.shape()));
    };
    let dt = p.w.dtype();
    for (name, t) in [("s1", p.s1), ("s2", p.s2), ("s3", p.s3), ("s4", p.s4)] {
        check_input(name, t, client)?;
        t.expect_dtype(name, &[dt])?;
    }
    if p.s1.numel() != 1 {
        return Err(shape_err("s1", "one element".into(), p.s1.shape()));
    }
    expect_shape("s2", p.s2, &[rows, cols], "w's shape")?;
    if p.s3.numel() != rows || p.s3.shape().last() != Some(&rows) && rows > 0 {
        return Err(shape_err(
            "s3",
            format!("[{rows}] (rows of w)"),
            p.s3.shape(),
        ));
    }
    if p.s4.numel() != cols || p.s4.shape().last() != Some(&cols) && cols > 0 {
        return Err(shape_err(
            "s4",
            format!("[{cols}] (cols of w)"),
            p.s4.shape(),
        ));
    }
    // Finite also as the f32 the kernels clamp with.
    let finite = |v: f64| v.is_finite() && (v as f32).is_finite();
    if !(finite(p.qmin) && finite(p.qmax) && p.qmin <= p.qmax) {
        return Err(Error::Param {
            param: "qmin, qmax".into(),
            expected: "finite in f32 (|q| < 3.4e38), qmin <= qmax".into(),
            found: format!(
                "{}, {}",
                kiln_runtime::number_str(p.qmin),
                kiln_runtime::number_str(p.qmax)
            ),
        });
    }
    Ok((rows, cols))
}

/// `wq = s1 clamp(round(w / (s1 S2 s3 s4)), qmin, qmax)` (ties to even), w's dtype.
pub fn flexround(p: &FlexRoundInputs<'_>) -> Result<Tensor> {
    let (rows, cols) = check_flexround(p)?;
    let client = p.w.client();
    let wq = Tensor::empty(client, p.w.dtype(), p.w.shape())?;
    if rows * cols > 0 {
        FlexroundForward::tuned(
            client,
            0.0,
            &FlexroundForwardArgs {
                w: p.w,
                s1: p.s1,
                s2: p.s2,
                s3: p.s3,
                s4: p.s4,
                wq: &wq,
                len: (rows * cols) as u32,
                cols: cols as u32,
                qmin: p.qmin as f32,
                qmax: p.qmax as f32,
            },
        )?;
    }
    Ok(wq)
}

/// The straight-through backward of [`flexround`] for the upstream gradient `grad`
/// (w's shape and dtype).
pub fn flexround_backward(p: &FlexRoundInputs<'_>, grad: &Tensor) -> Result<FlexRoundGrads> {
    let (rows, cols) = check_flexround(p)?;
    let client = p.w.client();
    check_input("grad", grad, client)?;
    grad.expect_dtype("grad", &[p.w.dtype()])?;
    expect_shape("grad", grad, p.w.shape(), "w's shape")?;
    let dt = p.w.dtype();
    let g = FlexRoundGrads {
        dw: Tensor::empty(client, dt, &[rows, cols])?,
        ds1: Tensor::empty(client, dt, &[1])?,
        ds2: Tensor::empty(client, dt, &[rows, cols])?,
        ds3: Tensor::empty(client, dt, &[rows])?,
        ds4: Tensor::empty(client, dt, &[cols])?,
    };
    let p1 = Tensor::empty(client, DType::F32, &[rows.max(1)])?;
    let (r, c, lo, hi) = (rows as u32, cols as u32, p.qmin as f32, p.qmax as f32);
    if rows > 0 {
        FlexroundBackwardRows::tuned(
            client,
            1e-4,
            &FlexroundBackwardRowsArgs {
                w: p.w,
                s1: p.s1,
                s2: p.s2,
                s3: p.s3,
                s4: p.s4,
                grad,
                dw: &g.dw,
                ds2: &g.ds2,
                ds3: &g.ds3,
                p1: &p1,
                rows: r,
                cols: c,
                qmin: lo,
                qmax: hi,
            },
        )?;
    }
    if cols > 0 {
        FlexroundBackwardCols::tuned(
            client,
            0.0,
            &FlexroundBackwardColsArgs {
                w: p.w,
                s1: p.s1,
                s2: p.s2,
                s3: p.s3,
                s4: p.s4,
                grad,
                ds4: &g.ds4,
                rows: r,
                cols: c,
                qmin: lo,
                qmax: hi,
            },
        )?;
    }
    FlexroundBackwardTotal::tuned(
        client,
        0.0,
        &FlexroundBackwardTotalArgs {
            p1: &p1,
            ds1: &g.ds1,
            rows: r,
        },
    )?;
    // Each gradient in its parameter's shape (`s1` `[1]` or `[]`, `s3` `[rows]` or
    // `[1, rows]`, ...; the element counts were checked above).
    Ok(FlexRoundGrads {
        ds1: g.ds1.reshape(p.s1.shape())?,
        ds3: g.ds3.reshape(p.s3.shape())?,
        ds4: g.ds4.reshape(p.s4.shape())?,
        ..g
    })
}

// ---------------------------------------------------------------- kernels

/// `wq = s1 clamp(round(w / (s1 S2 s3 s4)), qmin, qmax)` for `w` `[rows, cols]`.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(len.div_ceil(UNITS)), cube = UNITS)]
pub fn flexround_forward<F: Float>(
    w: &Array<F>,
    s1: &Array<F>,
    s2: &Array<F>,
    s3: &Array<F>,
    s4: &Array<F>,
    wq: &mut Array<F>,
    len: u32,
    cols: u32,
    qmin: f32,
    qmax: f32,
) {
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if i < len {
        let a = f32::cast_from(s1[0]);
        let d = a
            * f32::cast_from(s2[i as usize])
            * f32::cast_from(s3[(i / cols) as usize])
            * f32::cast_from(s4[(i % cols) as usize]);
        let c = clamp_keep_nan(
            round_half_even(f32::cast_from(w[i as usize]) / d),
            qmin,
            qmax,
        );
        wq[i as usize] = F::cast_from(a * c);
    }
}

/// Per row `o`: `dw`, `dS2` element-wise, `ds3[o]`, and `p1[o]`, the row's share of
/// `ds1`. One cube per row.
#[kiln_macros::kernel(
    tune(UNITS = [256, 64]),
    require(UNITS <= cols.next_power_of_two().max(64)),
    key(rows = pow2, cols = pow2, dtype),
    grid = cubes(rows),
    cube = UNITS,
)]
pub fn flexround_backward_rows<F: Float>(
    w: &Array<F>,
    s1: &Array<F>,
    s2: &Array<F>,
    s3: &Array<F>,
    s4: &Array<F>,
    grad: &Array<F>,
    dw: &mut Array<F>,
    ds2: &mut Array<F>,
    ds3: &mut Array<F>,
    p1: &mut Array<f32>,
    rows: u32,
    cols: u32,
    qmin: f32,
    qmax: f32,
) {
    let row = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let live = row < rows;
    let r = select(live, row, 0);
    let a = f32::cast_from(s1[0]);
    let b3 = f32::cast_from(s3[r as usize]);
    let mut sum3 = 0.0f32;
    let mut sum1 = 0.0f32;
    let mut j = UNIT_POS;
    while j < cols {
        let i = r * cols + j;
        let b2 = f32::cast_from(s2[i as usize]);
        let d = a * b2 * b3 * f32::cast_from(s4[j as usize]);
        let u = f32::cast_from(w[i as usize]) / d;
        let q = round_half_even(u);
        let g = f32::cast_from(grad[i as usize]);
        let inside = q >= qmin && q <= qmax;
        let gm = select(inside, g * a, 0.0);
        let t = -gm * u;
        if live {
            dw[i as usize] = F::cast_from(gm / d);
            ds2[i as usize] = F::cast_from(t / b2);
        }
        sum3 += t / b3;
        sum1 += g * (clamp_keep_nan(q, qmin, qmax) - select(inside, u, 0.0));
        j += UNITS;
    }
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let total3 = cube_sum(&mut smem, sum3, UNITS);
    let total1 = cube_sum(&mut smem, sum1, UNITS);
    if UNIT_POS == 0 && live {
        ds3[r as usize] = F::cast_from(total3);
        p1[r as usize] = total1;
    }
}

/// `ds4[i] = sum_o t[o, i] / s4[i]`: one unit per column, rows in order (consecutive
/// units read consecutive columns).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cols.div_ceil(UNITS)), cube = UNITS)]
pub fn flexround_backward_cols<F: Float>(
    w: &Array<F>,
    s1: &Array<F>,
    s2: &Array<F>,
    s3: &Array<F>,
    s4: &Array<F>,
    grad: &Array<F>,
    ds4: &mut Array<F>,
    rows: u32,
    cols: u32,
    qmin: f32,
    qmax: f32,
) {
    let c = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if c < cols {
        let a = f32::cast_from(s1[0]);
        let b4 = f32::cast_from(s4[c as usize]);
        // Summed in blocks of 256 rows, then the blocks: no f32 running sum over more
        // than 256 terms plus one per block (an lm_head's 128k-256k rows summed in one
        // would carry a rounding bound of rows x eps, about 1 %).
        let mut sum = 0.0f32;
        let mut block = 0.0f32;
        for r in 0..rows {
            let i = r * cols + c;
            let d = a * f32::cast_from(s2[i as usize]) * f32::cast_from(s3[r as usize]) * b4;
            let u = f32::cast_from(w[i as usize]) / d;
            let q = round_half_even(u);
            if q >= qmin && q <= qmax {
                block -= f32::cast_from(grad[i as usize]) * a * u;
            }
            if r % 256u32 == 255u32 {
                sum += block;
                block = 0.0f32;
            }
        }
        sum += block;
        ds4[c as usize] = F::cast_from(sum / b4);
    }
}

/// `ds1 = sum(p1)` in one cube.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (1), cube = UNITS)]
pub fn flexround_backward_total<F: Float>(p1: &Array<f32>, ds1: &mut Array<F>, rows: u32) {
    let mut sum = 0.0f32;
    let mut j = UNIT_POS;
    while j < rows {
        sum += p1[j as usize];
        j += UNITS;
    }
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let total = cube_sum(&mut smem, sum, UNITS);
    if UNIT_POS == 0 {
        ds1[0] = F::cast_from(total);
    }
}
