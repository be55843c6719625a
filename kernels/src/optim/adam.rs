//! Adam's moments and bias corrections inside a kernel, shared by the fused step (AdamW,
//! AdaBelief, LAMB's `r`, Adan's corrections) and FRUGAL's active coordinates.

use cubecl::prelude::*;

/// `1 - beta^t = -expm1(t ln beta)`: a series below `|x| = 1/2` (ten terms, Horner), so a
/// `beta^t` close to 1 does not cancel; `1 - exp(x)` beyond. `ln beta = -inf` gives 1.
#[cube]
pub(super) fn one_minus_pow(ln_beta: f32, t: f32) -> f32 {
    let x = t * ln_beta;
    let mut r = 1.0f32 - f32::exp(x);
    if x > -0.5f32 {
        let mut s = 1.0f32;
        #[unroll]
        for k in 0..10u32 {
            s = 1.0f32 + x * s / f32::cast_from(11 - k);
        }
        r = -x * s;
    }
    r
}

/// Adam's constants at one step in a kernel: the decays and `1 − β` (from f64 on the
/// host), `eps`, and the bias corrections `1 − β1^t` and `sqrt(1 − β2^t)` (formed once
/// per unit by [`adam_constants`], not per element).
#[derive(CubeType, Clone, Copy)]
pub(super) struct Moments {
    pub beta1: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub bc1: f32,
    pub sqrt_bc2: f32,
}

/// [`Moments`] at step `t` (1-based, as f32) from the decays, `1 − β`, `ln β` and `eps`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn adam_constants(
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    ln_beta1: f32,
    ln_beta2: f32,
    eps: f32,
    t: f32,
) -> Moments {
    Moments {
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        bc1: one_minus_pow(ln_beta1, t),
        sqrt_bc2: f32::sqrt(one_minus_pow(ln_beta2, t)),
    }
}

/// Adam's first and second moments after a step.
#[derive(CubeType, Clone, Copy)]
pub(super) struct AdamMoments<N: Size> {
    pub m: Vector<f32, N>,
    pub v: Vector<f32, N>,
}

/// The moments `m`, `v` advanced by `g`: Adam's `v` of `g²`, or with `belief`
/// AdaBelief's `s` of `(g − m)²` plus `eps`.
#[cube]
pub(super) fn adam_moments_of<N: Size>(
    m: Vector<f32, N>,
    v: Vector<f32, N>,
    g: Vector<f32, N>,
    c: Moments,
    #[comptime] belief: bool,
) -> AdamMoments<N> {
    let m = Vector::<f32, N>::new(c.beta1) * m + Vector::<f32, N>::new(c.one_minus_beta1) * g;
    let mut d = g;
    if comptime!(belief) {
        d = g - m;
    }
    let mut v =
        Vector::<f32, N>::new(c.beta2) * v + Vector::<f32, N>::new(c.one_minus_beta2) * d * d;
    if comptime!(belief) {
        v += Vector::<f32, N>::new(c.eps);
    }
    AdamMoments::<N> { m, v }
}

/// The bias-corrected Adam direction `m̂ / (sqrt(v̂) + eps)` at `c`'s step (AdamW's and
/// AdaBelief's step over `lr`, LAMB's `r` before its decay term, FRUGAL's active
/// coordinates).
#[cube]
pub(super) fn adam_direction_of<N: Size>(
    m: Vector<f32, N>,
    v: Vector<f32, N>,
    c: Moments,
) -> Vector<f32, N> {
    m / Vector::<f32, N>::new(c.bc1)
        / (Vector::sqrt(v) / Vector::<f32, N>::new(c.sqrt_bc2) + Vector::<f32, N>::new(c.eps))
}

/// [`adam_moments_of`] on the vectors `state[s_at]`, `state[s_at + nv]`, in place; returns
/// the new moments.
#[cube]
pub(super) fn advance_moments<N: Size>(
    state: &mut Array<Vector<f32, N>>,
    s_at: u32,
    nv: u32,
    g: Vector<f32, N>,
    c: Moments,
    #[comptime] belief: bool,
) -> AdamMoments<N> {
    let mv = adam_moments_of(
        state[s_at as usize],
        state[(s_at + nv) as usize],
        g,
        c,
        belief,
    );
    state[s_at as usize] = mv.m;
    state[(s_at + nv) as usize] = mv.v;
    mv
}

/// [`adam_moments_of`] on scalar state at `state[s_at]`, `state[s_at + n]`, in place.
#[cube]
pub(super) fn adam_moments(
    state: &mut Array<f32>,
    s_at: u32,
    n: u32,
    g: f32,
    c: Moments,
    #[comptime] belief: bool,
) {
    let mv = adam_moments_of::<Const<1>>(
        Vector::new(state[s_at as usize]),
        Vector::new(state[(s_at + n) as usize]),
        Vector::new(g),
        c,
        belief,
    );
    state[s_at as usize] = mv.m[0];
    state[(s_at + n) as usize] = mv.v[0];
}

/// [`adam_direction_of`] on scalar state at `state[s_at]`, `state[s_at + n]`.
#[cube]
pub(super) fn adam_direction(state: &Array<f32>, s_at: u32, n: u32, c: Moments) -> f32 {
    adam_direction_of::<Const<1>>(
        Vector::new(state[s_at as usize]),
        Vector::new(state[(s_at + n) as usize]),
        c,
    )[0]
}
