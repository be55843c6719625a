//! Serving many S²FT fine-tunes over one base weight: a fine-tune of a linear layer is
//! one block delta (`[r, in]` for a row block at rows `start .. start + r`, `[out, e -
//! s]` for a column block at columns `s .. e`), stacked over `A` fine-tunes. A batch
//! mixes tokens of different fine-tunes without merged weights:
//! `y = x W0^T` (the ordinary GEMM, autotuned), then each token adds its own delta:
//! row block `y[t, start + j] += <x[t, :], D[a_t, j, :]>`, column block `y[t, j] +=
//! <x[t, s:e], D[a_t, j, :]>` (one unit per output element, f32 dot products; `a_t =
//! -1` is the base model). `s2ft_merge` adds (or subtracts) one fine-tune's delta into
//! `W0` in place; in floating point an unmerge restores `W0` to rounding, not bitwise.

use super::grads::Block;
use crate::launch::{check_input, shape_err};
use crate::matmul::{matmul, Epilogue};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{DType, Error, Result, Tensor};

/// Checks `deltas` `[A, r, in]` (row block) or `[A, out, e - s]` (column block) against
/// `w0` `[out, in]` and the block's `start`; returns `(A, block)` with its end.
fn check_deltas(w0: &Tensor, deltas: &Tensor, rows: bool, start: usize) -> Result<(usize, Block)> {
    let client = w0.client();
    check_input("w0", w0, client)?;
    check_input("deltas", deltas, client)?;
    deltas.expect_dtype("deltas", &[w0.dtype()])?;
    let &[out, inp] = w0.shape() else {
        return Err(shape_err("w0", "[out, in]".into(), w0.shape()));
    };
    let &[a, d0, d1] = deltas.shape() else {
        let want = match rows {
            true => format!("[A, r, {inp}]"),
            false => format!("[A, {out}, e - s]"),
        };
        return Err(shape_err("deltas", want, deltas.shape()));
    };
    let block = match rows {
        true => {
            if d1 != inp {
                return Err(shape_err(
                    "deltas",
                    format!("[A, r, {inp}] (in of w0)"),
                    deltas.shape(),
                ));
            }
            Block::Rows {
                start,
                end: block_end(start, d0, out)?,
            }
        }
        false => {
            if d0 != out {
                return Err(shape_err(
                    "deltas",
                    format!("[A, {out}, e - s] (out of w0)"),
                    deltas.shape(),
                ));
            }
            Block::Columns {
                start,
                end: block_end(start, d1, inp)?,
            }
        }
    };
    block.check("w0", out, inp)?;
    Ok((a, block))
}

/// `start + len`, where it fits within `limit` rows (columns) of `w0`; else an error naming `start`.
fn block_end(start: usize, len: usize, limit: usize) -> Result<usize> {
    match start.checked_add(len) {
        Some(end) if end <= limit => Ok(end),
        _ => Err(Error::Param {
            param: "start".into(),
            expected: format!("start + {len} (the block) <= {limit} (w0's extent)"),
            found: start.to_string(),
        }),
    }
}

/// `y = x W0^T` plus each token's fine-tune delta (see the module doc): `x` `[T, in]`,
/// `w0` `[out, in]`, `deltas` stacked `[A, r, in]` (`rows`) or `[A, out, e - s]`,
/// `adapter_ids` `[T]` i32 in `-1 ..= A - 1` (-1: the base model), `start` the block's
/// first row or column. `y` `[T, out]` in x's dtype.
pub fn s2ft_adapter_forward(
    x: &Tensor,
    w0: &Tensor,
    deltas: &Tensor,
    adapter_ids: &Tensor,
    rows: bool,
    start: usize,
) -> Result<Tensor> {
    let client = x.client();
    check_input("x", x, client)?;
    let (a, block) = check_deltas(w0, deltas, rows, start)?;
    x.expect_dtype("x", &[w0.dtype()])?;
    let (out, inp) = (w0.shape()[0], w0.shape()[1]);
    let &[t, xi] = x.shape() else {
        return Err(shape_err("x", format!("[T, {inp}]"), x.shape()));
    };
    if xi != inp {
        return Err(shape_err("x", format!("[T, {inp}] (in of w0)"), x.shape()));
    }
    adapter_ids.expect_usable("adapter_ids", client)?;
    adapter_ids.expect_dtype("adapter_ids", &[DType::I32])?;
    if adapter_ids.shape() != [t] {
        return Err(shape_err(
            "adapter_ids",
            format!("[{t}] (T of x)"),
            adapter_ids.shape(),
        ));
    }
    let ids = adapter_ids.download()?.to_f64();
    if let Some((tok, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < -1.0 || id >= a as f64)
    {
        return Err(Error::Param {
            param: "adapter_ids".into(),
            expected: format!("-1 (base model) or a fine-tune in 0..{a}"),
            found: format!("{id} at token {tok}"),
        });
    }
    let base = matmul(x, w0, true, Epilogue::default())?;
    let (s, e) = block.range();
    let (nj, depth, x_col, y_col) = match rows {
        true => (e - s, inp, 0, s),
        false => (out, e - s, s, 0),
    };
    let len = t * out;
    if len == 0 || nj == 0 || a == 0 {
        return Ok(base);
    }
    let y = Tensor::empty(client, x.dtype(), &[t, out])?;
    S2ftAdapterDelta::tuned(
        client,
        1e-5,
        &S2ftAdapterDeltaArgs {
            x,
            deltas,
            adapter_ids,
            base: &base,
            y: &y,
            len: len as u32,
            outputs: nj as u32,
            depth: depth as u32,
            x_ld: inp as u32,
            x_col: x_col as u32,
            y_ld: out as u32,
            y_col: y_col as u32,
        },
    )?;
    Ok(y)
}

/// Adds fine-tune `adapter`'s delta into `w0`'s block in place (`unmerge`: subtracts
/// it). `deltas` and `rows`/`start` as in [`s2ft_adapter_forward`].
pub fn s2ft_merge(
    w0: &Tensor,
    deltas: &Tensor,
    adapter: usize,
    rows: bool,
    start: usize,
    unmerge: bool,
) -> Result<()> {
    let (a, block) = check_deltas(w0, deltas, rows, start)?;
    if adapter >= a {
        return Err(Error::Param {
            param: "adapter".into(),
            expected: format!("a fine-tune in 0..{a}"),
            found: adapter.to_string(),
        });
    }
    let [r, c] = block.shape(w0.shape()[0], w0.shape()[1]);
    let len = r * c;
    if len == 0 {
        return Ok(());
    }
    let w_off = match block {
        Block::Rows { start, .. } => start * w0.shape()[1],
        Block::Columns { start, .. } => start,
    };
    S2ftBlockAdd::tuned(
        w0.client(),
        0.0,
        &S2ftBlockAddArgs {
            w: w0,
            d: deltas,
            len: len as u32,
            cols: c as u32,
            ld: w0.shape()[1] as u32,
            w_off: w_off as u32,
            d_off: (adapter * len) as u32,
            sign: if unmerge { -1.0 } else { 1.0 },
        },
    )?;
    Ok(())
}

/// `y[t, n] = base[t, n] + <x[t, x_col ..], deltas[a_t, n - y_col, ..]>` over `depth`
/// terms where `a_t = adapter_ids[t] >= 0` and `y_col <= n < y_col + outputs`, else
/// `base[t, n]`: one unit per output element, grid-stride, f32 sum. Out of place, so
/// the autotuner may run it more than once.
#[kiln_macros::kernel(
    tune(UNITS = [256, 64]),
    key(len = pow2, depth = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS
)]
pub fn s2ft_adapter_delta<F: Float>(
    x: &Array<F>,
    deltas: &Array<F>,
    adapter_ids: &Array<i32>,
    base: &Array<F>,
    y: &mut Array<F>,
    len: u32,
    outputs: u32,
    depth: u32,
    x_ld: u32,
    x_col: u32,
    y_ld: u32,
    y_col: u32,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut at = linear_unit() as u32;
    while at < len {
        let (t, n) = (at / y_ld, at % y_ld);
        let a = adapter_ids[t as usize];
        let mut acc = f32::cast_from(base[at as usize]);
        if a >= 0 && n >= y_col && n - y_col < outputs {
            let j = n - y_col;
            let xb = t * x_ld + x_col;
            let db = (a as u32 * outputs + j) * depth;
            let mut dot = 0.0f32;
            for k in 0..depth {
                dot += f32::cast_from(x[(xb + k) as usize])
                    * f32::cast_from(deltas[(db + k) as usize]);
            }
            acc += dot;
        }
        y[at as usize] = F::cast_from(acc);
        at = kiln_dsl::grid_stride_next(at, stride, len);
    }
}

/// `w[w_off + (e / cols) ld + e % cols] += sign d[d_off + e]` for `e < len` (a block of
/// a row-major weight), f32 arithmetic, one element per unit. In place: one
/// configuration, so the autotuner never runs it twice.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS
)]
pub fn s2ft_block_add<F: Float>(
    w: &mut Array<F>,
    d: &Array<F>,
    len: u32,
    cols: u32,
    ld: u32,
    w_off: u32,
    d_off: u32,
    sign: f32,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut e = linear_unit() as u32;
    while e < len {
        let wi = (w_off + (e / cols) * ld + e % cols) as usize;
        w[wi] =
            F::cast_from(f32::cast_from(w[wi]) + sign * f32::cast_from(d[(d_off + e) as usize]));
        e = kiln_dsl::grid_stride_next(e, stride, len);
    }
}
