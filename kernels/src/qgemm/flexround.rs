//! FlexRound fake quantization (Lee et al., ICML 2023): the element-wise forward and
//! its straight-through backward.
//!
//! `d = s1 S2[o, i] s3[o] s4[i]`, `u = w / d`, `r = round(u)` (ties to even, as
//! `torch.round`), `c = clamp(r, qmin, qmax)`, `wq = s1 c`. With the straight-through
//! estimator (`dr/du = 1`) and `m = [qmin <= r <= qmax]`, for an upstream gradient `g`:
//! `dw = g s1 m / d`; `t = -g s1 m u` gives `dS2 = t / S2`, `ds3[o] = sum_i t / s3[o]`,
//! `ds4[i] = sum_o t / s4[i]`; and `ds1 = sum g (c - m u)`. Reductions are f32.

use cubecl::prelude::*;
use kiln_dsl::{cube_sum, round_half_even};

/// `wq = s1 clamp(round(w / (s1 S2 s3 s4)), qmin, qmax)` for `w` `[rows, cols]`.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535)),
    cube = UNITS,
    name = "flexround_forward"
)]
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
        let c = clamp(
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
    grid = (rows.min(65_535), rows.div_ceil(65_535)),
    cube = UNITS,
    name = "flexround_backward_rows"
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
        sum1 += g * (clamp(q, qmin, qmax) - select(inside, u, 0.0));
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
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    grid = (cols.div_ceil(UNITS).min(65_535), cols.div_ceil(UNITS).div_ceil(65_535)),
    cube = UNITS,
    name = "flexround_backward_cols"
)]
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
        let mut sum = 0.0f32;
        for r in 0..rows {
            let i = r * cols + c;
            let d = a * f32::cast_from(s2[i as usize]) * f32::cast_from(s3[r as usize]) * b4;
            let u = f32::cast_from(w[i as usize]) / d;
            let q = round_half_even(u);
            if q >= qmin && q <= qmax {
                sum -= f32::cast_from(grad[i as usize]) * a * u;
            }
        }
        ds4[c as usize] = F::cast_from(sum / b4);
    }
}

/// `ds1 = sum(p1)` in one cube.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    grid = (1),
    cube = UNITS,
    name = "flexround_backward_total"
)]
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
