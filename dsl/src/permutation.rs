//! A seeded permutation `π` of the indices `0..n`, evaluated one index at a time with no
//! table: what draws a uniformly random k-subset without sorting or selecting anything
//! (the indices `i` with `π(i) < k` are exactly `k` of them: `π⁻¹(0..k)`).
//!
//! The construction is a Feistel network in the shape of NIST's FF1 over the `bits`-bit
//! integers (`bits = max(2, ceil(log2 n))`): the index splits into a high half of
//! `u = bits / 2` bits and a low half of `v = bits - u`, and each of
//! [`PERMUTATION_ROUNDS`] rounds replaces the halves `(a, b)` with
//! `(b, (a + F_r(b)) mod 2^m)`, `m` alternating `u`, `v` (so an unbalanced split stays a
//! bijection). `F_r` is a 32-bit integer mix (lowbias32) of `b` and round `r`'s key.
//! Values past `n` walk the cycle (apply the network again) until they land in `0..n`:
//! fewer than two steps on average, as `2^bits < 2n`. Statistically uniform, not a
//! cryptographic permutation.
//!
//! The forward map is defined on the host (`kiln_kernels::random::permute_index`);
//! kernels evaluate the inverse, [`unpermute_index`] (the rounds run backwards), which
//! finds the subset with `k` evaluations instead of `n`. Integer arithmetic only, so
//! every backend and the host's `unpermute_index` agree; tests compare the device's
//! subsets with the host's forward map.

use cubecl::prelude::*;

/// Rounds of the Feistel network (even, so the halves end where they started).
pub const PERMUTATION_ROUNDS: u32 = 6;

/// The round function's integer mix (Wellons' lowbias32: a bijection of u32 with
/// good avalanche).
#[cube]
pub fn mix32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h *= 0x7feb_352du32;
    h ^= h >> 15;
    h *= 0x846c_a68bu32;
    h ^= h >> 16;
    h
}

/// Round `round`'s key under the 64-bit seed `(key0, key1)` (low, high word).
#[cube]
pub fn permutation_round_key(key0: u32, key1: u32, round: u32) -> u32 {
    mix32(key0 ^ mix32(key1 + round * 0x9e37_79b9u32))
}

/// The preimage of `j` (`j < n`) under the permutation `π` of `0..n` keyed by
/// `round_keys` ([`PERMUTATION_ROUNDS`] of [`permutation_round_key()`]); `bits` =
/// `max(2, ceil(log2 n))`: the rounds undone last to first,
/// `(a, b) -> ((b - F_r(a)) mod 2^m, a)`, walking the cycle backwards until the value
/// lands in `0..n`. (The forward map is defined on the host,
/// `kiln_kernels::random::permute_index`, which tests rank by; kernels need only `π⁻¹`.)
#[cube]
pub fn unpermute_index(j: u32, n: u32, bits: u32, round_keys: &Array<u32>) -> u32 {
    let u = bits / 2;
    let v = bits - u;
    let mask_u = (1u32 << u) - 1;
    let mask_v = (1u32 << v) - 1;
    let mut x = j;
    loop {
        let mut a = x >> v;
        let mut b = x & mask_v;
        #[unroll]
        for r in 0..PERMUTATION_ROUNDS / 2 {
            let q = PERMUTATION_ROUNDS / 2 - 1 - r;
            // Odd round `2q + 1` (v bits), then even round `2q` (u bits); u32
            // subtraction wraps, and the mask takes it mod 2^m.
            let c = (b - mix32(a ^ round_keys[(2 * q + 1) as usize])) & mask_v;
            b = a;
            a = c;
            let c = (b - mix32(a ^ round_keys[(2 * q) as usize])) & mask_u;
            b = a;
            a = c;
        }
        x = (a << v) | b;
        if x < n {
            break;
        }
    }
    x
}
