//! The LLaMA FFN (SwiGLU) that S²FT's FFN units live in: `y = (silu(x W_gate^T) *
//! (x W_up^T)) W_down^T`, and the gated product's forward and backward as one kernel.
//! Used by [`super::s2ft_verify_ffn`], the tests and `examples/s2ft_finetune.rs`.

use crate::launch::{check_input, expect_shape};
use crate::matmul::{matmul, Epilogue};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{Result, Tensor};

/// FFN weights in PyTorch's layout: `w_up`, `w_gate` `[F, d]`, `w_down` `[d, F]`.
#[derive(Clone, Copy)]
pub struct FfnWeights<'a> {
    /// `[F, d]`.
    pub w_up: &'a Tensor,
    /// `[F, d]`.
    pub w_gate: &'a Tensor,
    /// `[d, F]`.
    pub w_down: &'a Tensor,
}

/// What the FFN's backward reads: the pre-activations `gate`, `up` and the hidden `h`,
/// each `[T, F]` in x's dtype.
pub struct FfnActivations {
    /// `x W_gate^T`.
    pub gate: Tensor,
    /// `x W_up^T`.
    pub up: Tensor,
    /// `silu(gate) * up`.
    pub h: Tensor,
}

/// `y = (silu(x W_gate^T) * (x W_up^T)) W_down^T` for `x` `[T, d]`: `y` `[T, d]` and the
/// activations the backward needs.
pub fn ffn_forward(x: &Tensor, w: &FfnWeights<'_>) -> Result<(Tensor, FfnActivations)> {
    let gate = matmul(x, w.w_gate, true, Epilogue::default())?;
    let up = matmul(x, w.w_up, true, Epilogue::default())?;
    let h = swiglu(&gate, &up)?;
    let y = matmul(&h, w.w_down, true, Epilogue::default())?;
    Ok((y, FfnActivations { gate, up, h }))
}

/// `silu(gate) * up`, element-wise (f32 arithmetic, gate's dtype).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (h, _) = swiglu_launch(gate, up, None)?;
    Ok(h)
}

/// The gradients of `h = silu(gate) * up` from `dh`: `(d_gate, d_up)` with `d_gate = dh
/// up s (1 + gate (1 - s))`, `s = sigmoid(gate)`, and `d_up = dh silu(gate)`.
pub fn swiglu_backward(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    swiglu_launch(gate, up, Some(dh))
}

fn swiglu_launch(gate: &Tensor, up: &Tensor, dh: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let client = gate.client();
    check_input("gate", gate, client)?;
    check_input("up", up, client)?;
    up.expect_dtype("up", &[gate.dtype()])?;
    expect_shape("up", up, gate.shape(), "gate's shape")?;
    if let Some(dh) = dh {
        check_input("dh", dh, client)?;
        dh.expect_dtype("dh", &[gate.dtype()])?;
        expect_shape("dh", dh, gate.shape(), "gate's shape")?;
    }
    let out_a = Tensor::empty(client, gate.dtype(), gate.shape())?;
    let out_b = Tensor::empty(client, gate.dtype(), &[1])?;
    let out_b = match dh {
        Some(_) => Tensor::empty(client, gate.dtype(), gate.shape())?,
        None => out_b,
    };
    let len = gate.numel();
    if len > 0 {
        S2ftSwiglu::tuned(
            client,
            0.0,
            &S2ftSwigluArgs {
                gate,
                up,
                dh: dh.unwrap_or(gate),
                out_a: &out_a,
                out_b: &out_b,
                len: len as u32,
                grad: dh.is_some(),
            },
        )?;
    }
    Ok((out_a, out_b))
}

/// Forward: `out_a = silu(gate) up`. With `grad`: `out_a = d_gate`, `out_b = d_up` (see
/// [`swiglu_backward`]). f32 arithmetic; `silu(g) = g sigmoid(g)` with the sigmoid of
/// `-inf`/`+inf` gates exactly 0/1, so a large negative gate gives 0, not NaN.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS,
    defaults(grad = false)
)]
pub fn s2ft_swiglu<F: Float>(
    gate: &Array<F>,
    up: &Array<F>,
    dh: &Array<F>,
    out_a: &mut Array<F>,
    out_b: &mut Array<F>,
    len: u32,
    #[comptime] grad: bool,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut i = linear_unit() as u32;
    while i < len {
        let g = f32::cast_from(gate[i as usize]);
        let u = f32::cast_from(up[i as usize]);
        let s = 1.0f32 / (1.0f32 + f32::exp(-g));
        // silu(g) = g s, with 0 for g = -inf (not -inf x 0 = NaN).
        let silu = select(s == 0.0f32, 0.0f32, g * s);
        if comptime!(grad) {
            let d = f32::cast_from(dh[i as usize]);
            // g (1 - s) -> 0 at both ends (g = -inf: s = 0; g = +inf: 1 - s = 0), not NaN.
            let tail = select(s == 0.0f32 || s == 1.0f32, 0.0f32, g * (1.0f32 - s));
            let dsilu = s * (1.0f32 + tail);
            out_a[i as usize] = F::cast_from(d * u * dsilu);
            out_b[i as usize] = F::cast_from(d * silu);
        } else {
            out_a[i as usize] = F::cast_from(silu * u);
        }
        i = kiln_dsl::grid_stride_next(i, stride, len);
    }
}
