//! The layer's backward, by recomputation through the capacity layout: the gate and the
//! routing again (deterministic, so the same routes), the expert FFN's pre-activations,
//! then the gradients of every input and weight. The weight gradients are grouped
//! `A_e^T B_e` products summed over each expert's rows (`grouped_matmul_tn`: one
//! cube per output tile and expert, no atomics); the bias gradients are each expert's
//! column sums (`matmul::sum_columns_by_group`).

use super::ffn::{grouped_matmul, ExpertWeights, GroupedKernel, Groups};
use super::gate::{moe_gate, moe_gate_backward};
use super::layer::gate_logits;
use super::movement::{combine_from_layout, gate_grads, gather_into_layout};
use super::routing::RowLayout;
use super::GateOptions;
use crate::launch::{check_input, expect_shape};
use crate::matmul::{
    grouped_tn_product, matmul, sum_columns_by_group, Activation, ColumnWindow, Epilogue,
};
use crate::rows::slice_rows;
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{DType, Result, Tensor};

/// The gradients of [`super::moe_layer`]'s inputs and weights (each in its tensor's
/// dtype; `d_b1`/`d_b2` are what a bias there would receive, given or not).
pub struct LayerGrads {
    /// `[S, M]`: through the experts and through the gate.
    pub dx: Tensor,
    /// `[M, E]`.
    pub d_w_gate: Tensor,
    /// `[E, M, F]`.
    pub d_w1: Tensor,
    /// `[E, F, M]`.
    pub d_w2: Tensor,
    /// `[E, F]`.
    pub d_b1: Tensor,
    /// `[E, M]`.
    pub d_b2: Tensor,
}

/// The backward of [`super::moe_layer`] on one device: from `dy` `[S, M]` (x's dtype)
/// and the gradient of `l_aux` (a number), the gradients of `x`, `w_gate` and the
/// experts' weights. The routing is recomputed (the same as the forward's: it is
/// deterministic) and held fixed, as every MoE implementation does.
pub fn moe_layer_backward(
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    gate: &GateOptions,
    dy: &Tensor,
    d_l_aux: f64,
) -> Result<LayerGrads> {
    let logits = gate_logits(x, w_gate)?;
    let (m, e) = (x.shape()[1], logits.shape()[1]);
    let f = w.check(e, m, x)?;
    check_dy(dy, x)?;
    let routing = moe_gate(&logits, gate)?.routing;
    // Forward recomputation in the capacity layout, then the gradients.
    let d = gather_into_layout(x, &routing, RowLayout::Capacity, false)?;
    let groups = Groups::of(&d, &routing, RowLayout::Capacity)?;
    let fwd = FfnForward::new(&d, &groups, w, m, f)?;
    let d_y = gather_into_layout(dy, &routing, RowLayout::Capacity, true)?;
    let d_gates = gate_grads(dy, &fwd.y_e, &routing, RowLayout::Capacity, false)?;
    let g = fwd.backward(&d, &d_y, &groups, w, m, f, e)?;
    let dx_experts = combine_from_layout(&g.d_d, &routing, RowLayout::Capacity, false, false)?;
    let d_logits = moe_gate_backward(&logits, &d_gates, d_l_aux, gate)?;
    let (dx, d_w_gate) = gate_input_grads(x, w_gate, &dx_experts, &d_logits)?;
    Ok(LayerGrads {
        dx,
        d_w_gate: match x.dtype() {
            DType::F32 => d_w_gate,
            dt => slice_rows(&d_w_gate, 0, 0, m, dt)?,
        },
        d_w1: g.d_w1,
        d_w2: g.d_w2,
        d_b1: g.d_b1,
        d_b2: g.d_b2,
    })
}

/// The expert FFN's forward pieces its backward needs: `pre = D W1 + b1` and
/// `h = act(pre)` (f32 `[R, F]`), and `y_e = h W2 + b2` (`[R, M]`, the model's dtype).
pub(super) struct FfnForward {
    pre: Tensor,
    h: Tensor,
    /// The experts' outputs.
    pub y_e: Tensor,
}

/// The gradients of the FFN: `d_d` `[R, M]` (of its input rows) and of the weights.
pub(super) struct FfnGrads {
    pub d_d: Tensor,
    pub d_w1: Tensor,
    pub d_w2: Tensor,
    pub d_b1: Tensor,
    pub d_b2: Tensor,
}

impl FfnForward {
    /// Recomputes the forward of the FFN on rows `d` `[R, M]` grouped by expert.
    pub(super) fn new(
        d: &Tensor,
        groups: &Groups,
        w: &ExpertWeights<'_>,
        m: usize,
        f: usize,
    ) -> Result<Self> {
        let pre = grouped_matmul(
            d,
            w.w1,
            w.b1,
            Activation::None,
            groups,
            f,
            false,
            None,
            true,
            GroupedKernel::Auto,
        )?;
        let h = activation(&pre, None, w.activation)?;
        let y_e = grouped_matmul(
            &h,
            w.w2,
            w.b2,
            Activation::None,
            groups,
            m,
            false,
            None,
            false,
            GroupedKernel::Auto,
        )?;
        Ok(FfnForward { pre, h, y_e })
    }

    /// From `d_y` (the rows' output gradient, `[R, M]`): `dH = dY W2^T`, `dPre = dH
    /// act'(pre)`, `dD = dPre W1^T`, and the weight and bias gradients summed over each
    /// of the `e` experts' rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        d: &Tensor,
        d_y: &Tensor,
        groups: &Groups,
        w: &ExpertWeights<'_>,
        m: usize,
        f: usize,
        e: usize,
    ) -> Result<FfnGrads> {
        let dtype = d.dtype();
        let d_h = grouped_matmul(
            d_y,
            w.w2,
            None,
            Activation::None,
            groups,
            f,
            true,
            None,
            true,
            GroupedKernel::Auto,
        )?;
        let d_pre = activation(&self.pre, Some(&d_h), w.activation)?;
        Ok(FfnGrads {
            d_d: grouped_matmul(
                &d_pre,
                w.w1,
                None,
                Activation::None,
                groups,
                m,
                true,
                None,
                false,
                GroupedKernel::Auto,
            )?,
            d_w2: grouped_tn(&self.h, d_y, groups, dtype)?.reshape(&[e, f, m])?,
            d_b2: sum_columns_by_group(ColumnWindow::all(d_y), groups, dtype)?,
            d_w1: grouped_tn(d, &d_pre, groups, dtype)?.reshape(&[e, m, f])?,
            d_b1: sum_columns_by_group(ColumnWindow::all(&d_pre), groups, dtype)?,
        })
    }
}

/// `dx = dx_experts + d_logits W_gate^T` (x's dtype) and `d_w_gate = x^T d_logits`
/// (f32 `[M, E]`, summed over this device's tokens), from the gate's f32 `d_logits`.
pub(super) fn gate_input_grads(
    x: &Tensor,
    w_gate: &Tensor,
    dx_experts: &Tensor,
    d_logits: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (s, m) = (x.shape()[0], x.shape()[1]);
    let dtype = x.dtype();
    let w_gate32 = match dtype {
        DType::F32 => w_gate.clone(),
        _ => slice_rows(w_gate, 0, 0, m, DType::F32)?,
    };
    let dx_gate = matmul(d_logits, &w_gate32, true, Epilogue::default())?;
    let dx_gate = match dtype {
        DType::F32 => dx_gate,
        _ => slice_rows(&dx_gate, 0, 0, s, dtype)?,
    };
    let dx = crate::elementwise::add(dx_experts, &dx_gate)?;
    let whole = Groups::new(x, &[0], &[s])?;
    let e = d_logits.shape()[1];
    let x32 = match dtype {
        DType::F32 => x.clone(),
        _ => slice_rows(x, 0, 0, s, DType::F32)?,
    };
    let d_w_gate = grouped_tn(&x32, d_logits, &whole, DType::F32)?.reshape(&[m, e])?;
    Ok((dx, d_w_gate))
}

/// Checks the upstream gradient `dy` against `x` `[S, M]` (shape and dtype).
pub(super) fn check_dy(dy: &Tensor, x: &Tensor) -> Result<()> {
    check_input("dy", dy, x.client())?;
    dy.expect_dtype("dy", &[x.dtype()])?;
    expect_shape("dy", dy, x.shape(), "[S, M] of x")
}

/// `act(pre)` (without `d_h`) or `d_h act'(pre)`, f32 in and out.
fn activation(pre: &Tensor, d_h: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let client = pre.client();
    let out = Tensor::empty(client, DType::F32, pre.shape())?;
    let len = pre.numel();
    if len == 0 {
        return Ok(out);
    }
    let ph = crate::launch::absent(client)?;
    MoeActivation::tuned(
        client,
        0.0,
        &MoeActivationArgs {
            pre,
            d_h: d_h.unwrap_or(&ph),
            out: &out,
            len: len as u32,
            act,
            grad: d_h.is_some(),
        },
    )?;
    Ok(out)
}

/// `out = act(pre)`, or with `grad` `out = d_h act'(pre)` (f32, one element per unit,
/// grid-stride). `act'`: silu `s (1 + x (1 - s))`, gelu (tanh form) `0.5 (1 + t) + 0.5 x
/// (1 - t^2) c (1 + 3 a x^2)` with `t = tanh(c (x + a x^3))`, relu `[x > 0]`, none 1.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS,
    defaults(act = silu, grad = false)
)]
pub fn moe_activation(
    pre: &Array<f32>,
    d_h: &Array<f32>,
    out: &mut Array<f32>,
    len: u32,
    #[comptime] act: Activation,
    #[comptime] grad: bool,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut i = linear_unit() as u32;
    while i < len {
        let x = pre[i as usize];
        if comptime!(grad) {
            let mut dx = 1.0f32;
            if comptime!(act == Activation::Silu) {
                let s = 1.0 / (1.0 + f32::exp(-x));
                dx = s * (1.0 + x * (1.0 - s));
            }
            if comptime!(act == Activation::Gelu) {
                let c = 0.797_884_6f32;
                let u = c * (x + 0.044_715 * x * x * x);
                // tanh(u) = 2 sigmoid(2u) - 1 (no overflow for large |u|).
                let t = 2.0 / (1.0 + f32::exp(-2.0 * u)) - 1.0;
                dx =
                    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044_715 * x * x);
            }
            if comptime!(act == Activation::Relu) {
                dx = select(x > 0.0, 1.0f32, 0.0f32);
            }
            out[i as usize] = d_h[i as usize] * dx;
        } else {
            out[i as usize] = crate::matmul::activate(x, act);
        }
        i = kiln_dsl::grid_stride_next(i, stride, len);
    }
}

/// `c[e] = a_e^T b_e` summed over expert `e`'s rows (`a` `[R, Ka]`, `b` `[R, N]`, each
/// in `dtype` or f32): `[E, Ka, N]` in `dtype`.
fn grouped_tn(a: &Tensor, b: &Tensor, groups: &Groups, dtype: DType) -> Result<Tensor> {
    grouped_tn_product(ColumnWindow::all(a), ColumnWindow::all(b), groups, dtype)
}
