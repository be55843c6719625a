//! Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11; Random123's
//! constants) and a standard normal drawn from one of its 32-bit words by integer
//! arithmetic only, so the same (key, counter) gives the same bits on every backend.
//!
//! Why integers: WGSL allows 2.5 ulp for division and `sqrt`, backends differ in `log`
//! and `cos`, and compilers fuse `a * b + c` into an FMA or not as they like, so a
//! Box–Muller transform in f32 cannot promise identical bits. Here a normal value is a
//! lookup with integer interpolation in a quantile table built on the host (the layout
//! is [`gaussian_from_bits()`]'s doc), then one exact conversion to f32.

use cubecl::prelude::*;

/// Philox's multipliers and Weyl key increments (Random123).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// log2 of the nodes per octave of the normal quantile table (and of its direct
/// entries): 256.
pub const GAUSSIAN_NODES_LOG2: u32 = 8;
/// Entries of the table [`gaussian_from_bits()`] reads: 256 direct entries, 23 octaves of
/// 256 nodes, one final node (24 KiB of i32).
pub const GAUSSIAN_TABLE_LEN: usize = 256 + 23 * 256 + 1;
/// Fixed-point scale of the table: a value `q` means `q / 2^20`.
pub const GAUSSIAN_FRACTION_BITS: u32 = 20;
/// Interpolation bits below a table node: the largest difference of neighbouring
/// nodes is below 2^14, so the products stay below 2^31.
pub const GAUSSIAN_INTERP_BITS: u32 = 16;

/// Four 32-bit words of Philox output.
#[derive(CubeType, Clone, Copy)]
pub struct Philox4 {
    /// Word 0.
    pub x0: u32,
    /// Word 1.
    pub x1: u32,
    /// Word 2.
    pub x2: u32,
    /// Word 3.
    pub x3: u32,
}

/// Philox4x32 with 10 rounds of `counter = (c0, c1, c2, c3)` under `key = (k0, k1)`:
/// the same words as Random123's `philox4x32_10` (its known-answer vectors are kiln's
/// tests). `mul_hi` is native on CUDA; in WGSL it is one 64-bit product where the device
/// has 64-bit integers (lavapipe does), else four 16-bit products (cubecl's fallback).
#[cube]
pub fn philox4x32_10(c0: u32, c1: u32, c2: u32, c3: u32, k0: u32, k1: u32) -> Philox4 {
    let mut x0 = c0;
    let mut x1 = c1;
    let mut x2 = c2;
    let mut x3 = c3;
    let mut a = k0;
    let mut b = k1;
    #[unroll]
    for _ in 0..10u32 {
        let hi0 = u32::mul_hi(M0, x0);
        let lo0 = M0 * x0;
        let hi1 = u32::mul_hi(M1, x2);
        let lo1 = M1 * x2;
        x0 = hi1 ^ x1 ^ a;
        x1 = lo1;
        x2 = hi0 ^ x3 ^ b;
        x3 = lo0;
        a += W0;
        b += W1;
    }
    Philox4 { x0, x1, x2, x3 }
}

/// A standard normal value from one uniform 32-bit word `w`, bit-identical everywhere.
///
/// The sign is bit 31; `r` = the low 31 bits is a tail position, `|z| = Q(r / 2^31)`
/// with `Q(p) = Φ⁻¹(1 − p/2)` (the half-normal quantile of the upper-tail mass `p`).
/// With `N = 256` ([`GAUSSIAN_NODES_LOG2`]), the table holds `Q(p)` in fixed point
/// (`q / 2^20`) at `p = (r + ½) / 2^31` of each entry's `r`: entries `0..N` for `r < N`;
/// then for each octave `o` = 8..=30 of `r` (`2^o <= r < 2^(o+1)`), `N` nodes at
/// `r = (N + j) << (o − 8)`; and a last node at `r = 2^31` (`Q = 0`). `pairs[k]` holds
/// entries `k` and `k + 1` ([`GAUSSIAN_TABLE_LEN`] − 1 pairs), so that a value costs one
/// 2-wide load (a CPU adapter runs every load as a loop over its SIMD lanes, a 2-wide one
/// for the price of a scalar one). Between nodes:
/// linear interpolation on the top [`GAUSSIAN_INTERP_BITS`] bits below the node, in i32
/// (arithmetic shift). `|z − Q| < 1.5·10⁻⁶` (kiln's tests); `|z| <= 6.34`, so `q`
/// fits 23 bits and converts to f32 exactly.
#[cube]
pub fn gaussian_from_bits(pairs: &Array<Vector<i32, Const<2>>>, w: u32) -> f32 {
    let r = w & 0x7FFF_FFFFu32;
    let nodes = comptime!(1u32 << GAUSSIAN_NODES_LOG2);
    // Both paths are computed (no divergent branch); `ri` keeps the octave path in range.
    let ri = max(r, nodes);
    let octave = 31u32 - u32::leading_zeros(ri);
    let shift = octave - GAUSSIAN_NODES_LOG2;
    let interp = min(shift, GAUSSIAN_INTERP_BITS);
    // r < N reads entry r itself through the same load (the interpolation weight is 0:
    // `lo` exactly), so each value costs one pair load, a per-lane gather on a CPU.
    let small = r < nodes;
    let k = select(small, r, nodes + shift * nodes + ((ri >> shift) - nodes));
    let below = select(
        small,
        0u32,
        (ri & ((1u32 << shift) - 1u32)) >> (shift - interp),
    );
    let bits = select(small, 0u32, interp);
    let pair = pairs[k as usize];
    let lo = pair[0];
    let hi = pair[1];
    let q = lo + (((hi - lo) * i32::cast_from(below)) >> i32::cast_from(bits));
    let signed = select((w >> 31u32) == 1u32, -q, q);
    // Exact: |q| < 2^23, and a power-of-two scale.
    f32::cast_from(signed) * comptime!(1.0f32 / (1u32 << GAUSSIAN_FRACTION_BITS) as f32)
}
