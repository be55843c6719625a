//! Co-permutation: one gather launch per matrix moves whole units (blocks of rows or
//! columns) to their new place, out of place or in place through one scratch copy; and
//! the check that the permuted layer computes the same function.
//!
//! A gather copies bits, so a permuted matrix holds exactly the original values; a GEMM
//! whose output dimension is permuted gives bitwise the permuted output. Only a sum over
//! a permuted dimension (`W_o`'s, `W_down`'s input) changes order, hence "to rounding".

use super::block::{ffn_forward, FfnWeights};
use super::select::S2ftPermutation;
use crate::attention::{attention, AttentionInputs, AttentionOptions};
use crate::launch::{check_input, shape_err, upload_u32};
use crate::matmul::{matmul, Epilogue};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{Error, Result, Tensor};

/// Which dimension of a `[rows, cols]` matrix holds the units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// Units are blocks of rows (`W_q`, `W_k`, `W_v`, `W_up`, `W_gate`).
    Rows,
    /// Units are blocks of columns (`W_o`, `W_down`).
    Columns,
}

/// Attention heads: `heads` query heads over `kv_heads` KV heads of `head_dim` each
/// (grouped-query when `kv_heads < heads`; a unit is one KV group).
#[derive(Clone, Copy, Debug)]
pub struct HeadLayout {
    /// Query heads `H`.
    pub heads: usize,
    /// KV heads `Hkv` (a divisor of `H`).
    pub kv_heads: usize,
    /// Rows per head.
    pub head_dim: usize,
}

impl HeadLayout {
    /// Errors unless `kv_heads` divides `heads` and `head_dim >= 1`.
    pub fn check(&self) -> Result<()> {
        if self.kv_heads == 0 || self.head_dim == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::Param {
                param: "kv_heads".into(),
                expected: format!("a divisor of heads = {} (and head_dim >= 1)", self.heads),
                found: format!("{} (head_dim {})", self.kv_heads, self.head_dim),
            });
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Attention projections in PyTorch's layout: `w_q` `[H hd, d]`, `w_k`, `w_v` `[Hkv hd,
/// d]`, `w_o` `[d, H hd]`.
#[derive(Clone, Copy)]
pub struct AttentionWeights<'a> {
    /// `[H hd, d]`.
    pub w_q: &'a Tensor,
    /// `[Hkv hd, d]`.
    pub w_k: &'a Tensor,
    /// `[Hkv hd, d]`.
    pub w_v: &'a Tensor,
    /// `[d, H hd]`.
    pub w_o: &'a Tensor,
}

/// `w` `[rows, cols]` with its units (blocks of `unit` rows or columns) reordered: new
/// unit `p` is old unit `perm.perm[p]`. One launch; bitwise a copy. `unit_param` names
/// the parameter that set `unit` in errors (`head_dim`, `unit_size`).
pub fn s2ft_permute(
    name: &str,
    w: &Tensor,
    perm: &S2ftPermutation,
    unit: usize,
    axis: Axis,
    unit_param: &str,
) -> Result<Tensor> {
    let (rows, cols) = check_units(name, w, perm, unit, axis, unit_param)?;
    let out = Tensor::empty(w.client(), w.dtype(), w.shape())?;
    gather_units(w, &out, perm, unit, axis, rows, cols)?;
    Ok(out)
}

/// [`s2ft_permute`] in place: `w` is copied once to a scratch buffer and gathered back.
pub fn s2ft_permute_in_place(
    name: &str,
    w: &Tensor,
    perm: &S2ftPermutation,
    unit: usize,
    axis: Axis,
    unit_param: &str,
) -> Result<()> {
    let (rows, cols) = check_units(name, w, perm, unit, axis, unit_param)?;
    let scratch = crate::rows::slice_rows(w, 0, 0, rows, w.dtype())?;
    gather_units(&scratch, w, perm, unit, axis, rows, cols)
}

/// Permutes an attention layer's projections by KV groups (out of place): rows of
/// `w_q` in blocks of `H / Hkv hd`, of `w_k`, `w_v` in blocks of `hd`, columns of `w_o`
/// in blocks of `H / Hkv hd`. `perm` has `Hkv` units. Returns `[w_q, w_k, w_v, w_o]`.
pub fn s2ft_permute_attention(
    w: &AttentionWeights<'_>,
    heads: &HeadLayout,
    perm: &S2ftPermutation,
) -> Result<[Tensor; 4]> {
    heads.check()?;
    let (hd, q_unit) = (heads.head_dim, heads.group() * heads.head_dim);
    Ok([
        s2ft_permute("w_q", w.w_q, perm, q_unit, Axis::Rows, "head_dim")?,
        s2ft_permute("w_k", w.w_k, perm, hd, Axis::Rows, "head_dim")?,
        s2ft_permute("w_v", w.w_v, perm, hd, Axis::Rows, "head_dim")?,
        s2ft_permute("w_o", w.w_o, perm, q_unit, Axis::Columns, "head_dim")?,
    ])
}

/// Permutes an FFN's channels (out of place): rows of `w_up`, `w_gate`, columns of
/// `w_down`. `perm` has `F` units. Returns `[w_up, w_gate, w_down]`.
pub fn s2ft_permute_ffn(w: &FfnWeights<'_>, perm: &S2ftPermutation) -> Result<[Tensor; 3]> {
    Ok([
        s2ft_permute("w_up", w.w_up, perm, 1, Axis::Rows, "unit_size")?,
        s2ft_permute("w_gate", w.w_gate, perm, 1, Axis::Rows, "unit_size")?,
        s2ft_permute("w_down", w.w_down, perm, 1, Axis::Columns, "unit_size")?,
    ])
}

/// The result of a verification: the original layer's output `y`, the permuted layer's
/// `y_permuted`, and how far apart they are.
pub struct VerifyReport {
    /// The original layer on the input.
    pub y: Tensor,
    /// The permuted layer on the same input.
    pub y_permuted: Tensor,
    /// `max |y - y_permuted|`.
    pub max_abs_diff: f64,
    /// What rounding allows: `8 eps sqrt(K) max |y|` (K the permuted sum's length).
    pub bound: f64,
}

impl VerifyReport {
    /// Within rounding.
    pub fn passed(&self) -> bool {
        self.max_abs_diff <= self.bound
    }
    /// The report on two outputs of one layer, the permuted one's products summed over
    /// `inner` terms.
    pub fn of(y: Tensor, y_permuted: Tensor, inner: usize) -> Result<VerifyReport> {
        let (a, b) = (y.download()?.to_f64(), y_permuted.download()?.to_f64());
        // Equal values (the same infinity, or NaN on both sides) agree; a NaN or an
        // infinity on one side only is an infinite difference (`f64::max` alone would
        // skip a NaN and pass).
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| match (x - y).abs() {
                _ if x == y || (x.is_nan() && y.is_nan()) => 0.0,
                d if d.is_nan() => f64::INFINITY,
                d => d,
            })
            .fold(0.0, f64::max);
        let scale = a
            .iter()
            .filter(|x| x.is_finite())
            .map(|x| x.abs())
            .fold(0.0, f64::max);
        let bound = 8.0 * y.dtype().epsilon() * (inner.max(1) as f64).sqrt() * scale;
        Ok(VerifyReport {
            y,
            y_permuted,
            max_abs_diff: diff,
            bound,
        })
    }
}

/// Runs the SwiGLU FFN on `x` `[T, d]` with the original weights and with the weights
/// permuted by `perm`: they must agree to rounding.
pub fn s2ft_verify_ffn(
    w: &FfnWeights<'_>,
    perm: &S2ftPermutation,
    x: &Tensor,
) -> Result<VerifyReport> {
    let [up, gate, down] = s2ft_permute_ffn(w, perm)?;
    let (y, _) = ffn_forward(x, w)?;
    let permuted = FfnWeights {
        w_up: &up,
        w_gate: &gate,
        w_down: &down,
    };
    let (y_p, _) = ffn_forward(x, &permuted)?;
    VerifyReport::of(y, y_p, w.w_up.shape()[0])
}

/// Runs self-attention on `x` `[T, d]` (`q = x W_q^T`, ..., `y = attention(q, k, v)
/// W_o^T`, causal or not) with the original and the permuted projections.
pub fn s2ft_verify_attention(
    w: &AttentionWeights<'_>,
    heads: &HeadLayout,
    perm: &S2ftPermutation,
    x: &Tensor,
    causal: bool,
) -> Result<VerifyReport> {
    let [q, k, v, o] = s2ft_permute_attention(w, heads, perm)?;
    let y = attention_layer(x, w, heads, causal)?;
    let permuted = AttentionWeights {
        w_q: &q,
        w_k: &k,
        w_v: &v,
        w_o: &o,
    };
    let y_p = attention_layer(x, &permuted, heads, causal)?;
    VerifyReport::of(y, y_p, heads.heads * heads.head_dim)
}

/// `attention(x W_q^T, x W_k^T, x W_v^T) W_o^T` for `x` `[T, d]` (one sequence).
pub(super) fn attention_layer(
    x: &Tensor,
    w: &AttentionWeights<'_>,
    heads: &HeadLayout,
    causal: bool,
) -> Result<Tensor> {
    heads.check()?;
    let &[t, _] = x.shape() else {
        return Err(shape_err("x", "[T, d]".into(), x.shape()));
    };
    let hd = heads.head_dim;
    let proj = |wm: &Tensor, h: usize| -> Result<Tensor> {
        matmul(x, wm, true, Epilogue::default())?.reshape(&[1, t, h, hd])
    };
    let (q, k, v) = (
        proj(w.w_q, heads.heads)?,
        proj(w.w_k, heads.kv_heads)?,
        proj(w.w_v, heads.kv_heads)?,
    );
    let opts = AttentionOptions {
        causal,
        ..AttentionOptions::default()
    };
    let out = attention(&AttentionInputs::new(&q, &k, &v), &opts)?.out;
    let out = out.reshape(&[t, heads.heads * hd])?;
    matmul(&out, w.w_o, true, Epilogue::default())
}

/// Checks `w` `[rows, cols]` against `perm`'s units of `unit` along `axis`.
pub(super) fn check_units(
    name: &str,
    w: &Tensor,
    perm: &S2ftPermutation,
    unit: usize,
    axis: Axis,
    unit_param: &str,
) -> Result<(usize, usize)> {
    check_input(name, w, w.client())?;
    perm.check()?;
    let &[rows, cols] = w.shape() else {
        return Err(shape_err(name, "[rows, cols]".into(), w.shape()));
    };
    let (along, what) = match axis {
        Axis::Rows => (rows, "rows"),
        Axis::Columns => (cols, "columns"),
    };
    if unit == 0 || along % unit != 0 {
        return Err(Error::Param {
            param: unit_param.into(),
            expected: format!("a divisor of {name}'s {along} {what} (its unit is {unit} {what})"),
            found: unit.to_string(),
        });
    }
    if along / unit != perm.units() {
        let want = match axis {
            Axis::Rows => format!(
                "[{} ({} units x {unit}), C]",
                perm.units() * unit,
                perm.units()
            ),
            Axis::Columns => {
                format!(
                    "[R, {} ({} units x {unit})]",
                    perm.units() * unit,
                    perm.units()
                )
            }
        };
        return Err(shape_err(name, want, w.shape()));
    }
    Ok((rows, cols))
}

fn gather_units(
    src: &Tensor,
    out: &Tensor,
    perm: &S2ftPermutation,
    unit: usize,
    axis: Axis,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let len = rows * cols;
    if len == 0 {
        return Ok(());
    }
    let map: Vec<u32> = perm.perm.iter().map(|&u| u as u32).collect();
    let map = upload_u32(src.client(), "perm", &map)?;
    S2ftPermuteUnits::tuned(
        src.client(),
        0.0,
        &S2ftPermuteUnitsArgs {
            src,
            unit_map: &map,
            out,
            len: len as u32,
            cols: cols as u32,
            unit: unit as u32,
            columns: axis == Axis::Columns,
        },
    )?;
    Ok(())
}

/// `out[i, j] = src[map[i / unit] unit + i % unit, j]` (rows), or with `columns` `src[i,
/// map[j / unit] unit + j % unit]`: one element per unit, grid-stride; a pure copy.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, cols = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS,
    defaults(columns = false)
)]
pub fn s2ft_permute_units<F: Float>(
    src: &Array<F>,
    unit_map: &Array<u32>,
    out: &mut Array<F>,
    len: u32,
    cols: u32,
    unit: u32,
    #[comptime] columns: bool,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut at = linear_unit() as u32;
    while at < len {
        let (i, j) = (at / cols, at % cols);
        let (mut si, mut sj) = (i, j);
        if comptime!(columns) {
            sj = unit_map[(j / unit) as usize] * unit + j % unit;
        } else {
            si = unit_map[(i / unit) as usize] * unit + i % unit;
        }
        out[at as usize] = src[(si * cols + sj) as usize];
        at = kiln_dsl::grid_stride_next(at, stride, len);
    }
}
