//! Activations in the stable forms the specs give, on f32 vectors.

use cubecl::prelude::*;

/// `x * sigmoid(z)` as `x / (1 + exp(-z))`.
///
/// Why this form: for very negative `z`, `exp(-z)` overflows to +inf and the quotient is
/// a clean (signed) zero; for very positive `z`, `exp(-z)` underflows to 0 and the result
/// is `x`. No `1 + tanh(u)` cancellation, no inf/inf.
#[cube]
pub fn mul_sigmoid<N: Size>(x: Vector<f32, N>, z: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(1.0);
    x / (one + Vector::exp(Vector::<f32, N>::new(0.0) - z))
}

/// SiLU (swish): `x * sigmoid(x)`.
#[cube]
pub fn silu<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    mul_sigmoid::<N>(x, x)
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
/// computed through the identity `0.5 (1 + tanh(u)) = sigmoid(2u)`.
#[cube]
pub fn gelu_tanh<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    // 2 * sqrt(2 / pi)
    let two_k = Vector::<f32, N>::new(1.595_769);
    let c = Vector::<f32, N>::new(0.044_715);
    let z = two_k * (x + c * x * x * x);
    mul_sigmoid::<N>(x, z)
}

/// `exp(a - b)` to within a few ulps even when `a - b` is large and negative.
///
/// Why: `exp(a - b)` in plain f32 carries the rounding of `a - b` (relative error
/// `|a - b| * 2^-24`) and, inside most drivers, the rounding of `x * log2(e)` before an
/// `exp2`: about 1.5e-6 relative at `a - b = -17`, which is where softmax's small
/// probabilities live. Here the difference is split exactly (TwoSum), reduced by
/// Cody-Waite (`n ln2` in two parts), and scaled by `2^n` built from its bits, and `exp(r)`
/// with `|r| <= ln2/2` is a polynomial. Results below `2^-126` (`a - b < ln 2^-126`,
/// about -87.3365) flush to 0;
/// `a = -inf` gives 0. `one` must be 1.0, computed at run time (see the body).
/// Contract: `a <= b` with `b` finite (a softmax's `exp(x - max)`): above that the
/// `2^n` scale is built from bits that overflow (`a - b` past about 88 gives garbage),
/// and `a = b = -inf` gives NaN.
#[cube]
pub fn exp_diff(a: f32, b: f32, one: f32) -> f32 {
    // TwoSum: d_hi + d_lo == a - b exactly. `one` is a runtime 1.0: shader compilers
    // that reassociate floats (Mesa's NIR does, without NoContraction) would otherwise
    // simplify d_lo to 0.
    let d_hi = (a - b) * one;
    let bb = (d_hi - a) * one;
    let d_lo = (a - (d_hi - bb)) - (b + bb);
    // ln 2^-126 in f32: below it the result is not a normal f32 (flushed to 0 below);
    // clamping here keeps `n >= -126`, so the `2^n` built from bits is a normal float.
    let floor = -87.336_54f32;
    let d = max(d_hi, floor);
    let n = f32::round(d * std::f32::consts::LOG2_E);
    // ln2 = C1 + C2 with C1 = 355/512 exact in 9 bits, so n * C1 is exact.
    // The constants go through `one` too, or the compiler folds C1 + C2 back into ln2.
    let r = (d - n * (0.693_359_4 * one)) - n * (-2.121_944_4e-4 * one) + d_lo;
    let scale = f32::reinterpret(u32::cast_from(i32::cast_from(n) + 127) << 23);
    // exp(r) by Cephes' expf polynomial (about 1 ulp on |r| <= ln2/2): drivers' exp
    // may be several ulps (Vulkan allows 3 + 2|x|).
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    select(d_hi < floor, 0.0, e * scale)
}

/// Whether `x` is NaN, from its bits: shader compilers may fold `x != x` away, or turn
/// `!(x <= y)` into `x > y`, which NaN tells apart.
#[cube]
pub fn is_nan(x: f32) -> bool {
    (u32::reinterpret(x) & 0x7fff_ffffu32) > 0x7f80_0000u32
}

/// `sign(x)`: 1, -1, 0 for a zero of either sign, and NaN for NaN (as `torch.sign`). The
/// NaN test reads the bits ([`is_nan`]): shader compilers may fold `x * 0` away.
#[cube]
pub fn sign_keep_nan(x: f32) -> f32 {
    let nan = is_nan(x);
    select(
        x > 0.0,
        1.0f32,
        select(x < 0.0, -1.0f32, select(nan, x, 0.0f32)),
    )
}
