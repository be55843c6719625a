//! Integer unpacking, rounding and dequantization for quantized GEMMs.
//!
//! Quantized tensors live in device memory as 32-bit words whatever their logical
//! element type (WGSL has no 8-bit storage): eight 4-bit values or four 8-bit values
//! per word, least-significant first. These helpers read them back as integers and
//! round the way the quantizers do, identically on every backend (WGSL's `round` is
//! half-to-even, CUDA's `roundf` half-away-from-zero, so neither is used).

use cubecl::prelude::*;

/// The 4-bit field `slot` (0..8, least-significant first) of `word`, in 0..16.
#[cube]
pub fn unpack_u4(word: u32, slot: u32) -> u32 {
    (word >> (slot * 4)) & 15
}

/// The signed byte `index` of a byte array stored as 32-bit words (byte `i` is bits
/// `8 (i % 4) ..` of word `i / 4`, little-endian), sign-extended to i32.
#[cube]
pub fn load_i8(words: &Array<u32>, index: u32) -> i32 {
    unpack_i8(words[(index / 4) as usize], index % 4)
}

/// The signed byte `slot` (0..4, least-significant first) of `word`, sign-extended to
/// i32.
#[cube]
pub fn unpack_i8(word: u32, slot: u32) -> i32 {
    // The byte moved to the top, then an arithmetic shift back down: two operations
    // (the bit cast is free), which matters where a GEMM decodes every weight.
    i32::cast_from(word << (24 - slot * 8)) >> 24
}

/// The low byte of `value` (an int in -128..128) as an unsigned byte, for packing.
#[cube]
pub fn i8_bits(value: i32) -> u32 {
    u32::cast_from(value + 256) & 255
}

/// `clamp(x, lo, hi)` that keeps NaN: backends' `min`/`max` return the other operand
/// for NaN (CUDA's fminf/fmaxf, and WGSL leaves it undefined), which would turn an
/// invalid value (`0 / 0`) into a valid-looking code.
#[cube]
pub fn clamp_keep_nan(x: f32, lo: f32, hi: f32) -> f32 {
    select(x.is_nan(), x, clamp(x, lo, hi))
}

/// `x` rounded to the nearest integer, ties to even (IEEE's default; numpy's and
/// PyTorch's `round`). Exact for |x| < 2^22.
#[cube]
pub fn round_half_even(x: f32) -> f32 {
    let r = f32::floor(x + 0.5);
    let mut out = r;
    // A tie rounded up to an odd integer goes back down to the even one.
    if r - x == 0.5 && r - 2.0 * f32::floor(r * 0.5) == 1.0 {
        out = r - 1.0;
    }
    out
}

/// `q / 2^shift` rounded to the nearest integer, ties to even, in integer
/// arithmetic: the Double Rounding step from an int8 code to a coarser one (`shift` <
/// 31, `q` at most `i32::MAX - 2^shift`).
#[cube]
pub fn shift_round_half_even(q: i32, shift: u32) -> i32 {
    // floor((q + 2^(s-1) - 1 + odd) / 2^s), `odd` the low bit of floor(q / 2^s): a tie
    // rounds up only from an odd floor, anything above a tie always. Branch-free, five
    // operations a value once the terms of `shift` alone are hoisted out of a loop
    // (`on` = 0 makes it the identity at `shift` = 0).
    let s = i32::cast_from(shift);
    let on = i32::cast_from(min(shift, 1u32));
    let bias = i32::cast_from((1u32 << shift) >> 1u32) - on;
    (q + bias + ((q >> s) & on)) >> s
}
