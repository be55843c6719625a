//! The merge of two partial attention results over disjoint key sets, in the stable
//! sigmoid form of the spec (ring-flash-attention's `_update_out_and_lse`):
//! `out = out_a - sigmoid(lse_b - lse_a) (out_a - out_b)`,
//! `lse = lse_a - logsigmoid(lse_a - lse_b)`. Every exponential has a non-positive
//! argument; a side with `lse = -inf` (a row that saw no key) contributes nothing.

use crate::launch::{check_input, expect_shape, shape_err};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{DType, Error, Result, Tensor};

/// Merges (`out_b`, `lse_b`) into (`out_a`, `lse_a`) in place: `out_*` `[B, S, H, Dv]`
/// (one float dtype; f32 keeps partial results exact enough to merge many blocks),
/// `lse_*` `[B, H, S]` f32. `out_b` and `lse_b` are not modified.
pub fn attention_merge(
    out_a: &Tensor,
    lse_a: &Tensor,
    out_b: &Tensor,
    lse_b: &Tensor,
) -> Result<()> {
    let client = out_a.client();
    check_input("out_a", out_a, client)?;
    check_input("out_b", out_b, client)?;
    let &[b, s, h, dv] = out_a.shape() else {
        return Err(shape_err("out_a", "[B, S, H, Dv]".into(), out_a.shape()));
    };
    out_b.expect_dtype("out_b", &[out_a.dtype()])?;
    expect_shape("out_b", out_b, out_a.shape(), "out_a's shape")?;
    for (name, t) in [("lse_a", lse_a), ("lse_b", lse_b)] {
        t.expect_usable(name, client)?;
        t.expect_dtype(name, &[DType::F32])?;
        expect_shape(name, t, &[b, h, s], "[B, H, S] of out_a")?;
    }
    let rows = b * s * h;
    if rows == 0 || dv == 0 {
        return Ok(());
    }
    // In place: not autotuned (a candidate run would merge again into out_a); the
    // kernel is bandwidth-bound and one configuration serves every shape.
    let problem = AttentionMergeRowsProblem {
        rows: rows as u32,
        seq: s as u32,
        heads: h as u32,
        dv: dv as u32,
    };
    let cfg = AttentionMergeRows::space(client, &problem)
        .into_iter()
        .next()
        .ok_or_else(|| Error::Kernel {
            kernel: "attention_merge".into(),
            message: "no configuration fits this device".into(),
        })?;
    AttentionMergeRows::launch(
        client,
        &cfg,
        &AttentionMergeRowsArgs {
            out_a,
            lse_a,
            out_b,
            lse_b,
            rows: rows as u32,
            seq: s as u32,
            heads: h as u32,
            dv: dv as u32,
        },
    )?;
    Ok(())
}

/// In-place merge, one unit per (b, s, h) row of `out_a` (row `r` at `r dv`, its lse
/// at `(b H + h) S + s`).
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(rows = pow2, dv = pow2, dtype),
    grid = cubes(rows.div_ceil(UNITS)),
    cube = UNITS,
    name = "attention_merge"
)]
pub fn attention_merge_rows<F: Float>(
    out_a: &mut Array<F>,
    lse_a: &mut Array<f32>,
    out_b: &Array<F>,
    lse_b: &Array<f32>,
    rows: u32,
    seq: u32,
    heads: u32,
    dv: u32,
) {
    let r = linear_unit() as u32;
    if r < rows {
        let b = r / (seq * heads);
        let s = (r / heads) % seq;
        let h = r % heads;
        let li = ((b * heads + h) * seq + s) as usize;
        let la = lse_a[li];
        let lb = lse_b[li];
        let lowest = f32::min_value();
        // -inf on a side: that side saw no key. (NaN is neither and propagates.)
        let a_empty = la < lowest;
        let b_empty = lb < lowest;
        // w = sigmoid(lb - la) with a non-positive exponent either way.
        let d = lb - la;
        let e = f32::exp(-f32::abs(d));
        let mut w = select(d >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e));
        w = select(b_empty, 0.0f32, select(a_empty, 1.0f32, w));
        // lse = max + log1p(exp(-|la - lb|)) = lse_a - logsigmoid(lse_a - lse_b).
        let mut l = max(la, lb) + f32::ln(1.0 + e);
        l = select(b_empty, la, select(a_empty, lb, l));
        let base = r * dv;
        for c in 0..dv {
            let x = out_a[(base + c) as usize];
            let y = out_b[(base + c) as usize];
            let xa = f32::cast_from(x);
            out_a[(base + c) as usize] = F::cast_from(xa - w * (xa - f32::cast_from(y)));
        }
        lse_a[li] = l;
    }
}
