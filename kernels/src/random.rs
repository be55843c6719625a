//! The host side of kiln's counter-based generator (`kiln_dsl::random`): the same
//! Philox4x32-10 words and the same normal values as the kernels, bit for bit, so a
//! user can reproduce on the CPU any `z` a kernel drew (and tests compare bits).
//!
//! Keys and counters: a 64-bit `seed` is the key `(low word, high word)`; kiln's
//! element-wise users draw element `i` of stream `s` (a tensor's position in a list)
//! from lane `i % 4` of the block at counter `(i / 4, s, 0, 0)`.
//!
//! Also the seeded index permutation that draws rand-k's subsets (`kiln_dsl::permutation`):
//! [`permute_index`], its definition, which tests rank by, and [`unpermute_index`], the
//! inverse the kernels evaluate.

use kiln_dsl::{
    GAUSSIAN_FRACTION_BITS, GAUSSIAN_INTERP_BITS, GAUSSIAN_NODES_LOG2, GAUSSIAN_TABLE_LEN,
};
use std::sync::OnceLock;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Random123's `philox4x32_10`).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut x0, mut x1, mut x2, mut x3] = counter;
    let [mut a, mut b] = key;
    for _ in 0..10 {
        let p0 = u64::from(M0) * u64::from(x0);
        let p1 = u64::from(M1) * u64::from(x2);
        (x0, x1, x2, x3) = (
            (p1 >> 32) as u32 ^ x1 ^ a,
            p1 as u32,
            (p0 >> 32) as u32 ^ x3 ^ b,
            p0 as u32,
        );
        a = a.wrapping_add(W0);
        b = b.wrapping_add(W1);
    }
    [x0, x1, x2, x3]
}

/// The key of a 64-bit seed: `(low word, high word)`.
pub fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// `kiln_dsl::mix32` on the host.
fn mix32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The bits of the index permutation of `0..n`: `max(2, ceil(log2 n))`.
pub fn permutation_bits(n: u32) -> u32 {
    (32 - n.saturating_sub(1).leading_zeros()).max(2)
}

/// The round keys of the index permutation under `seed` (`kiln_dsl::permutation_round_key`).
pub fn permutation_round_keys(seed: u64) -> [u32; kiln_dsl::PERMUTATION_ROUNDS as usize] {
    let [k0, k1] = seed_key(seed);
    std::array::from_fn(|r| {
        mix32(k0 ^ mix32(k1.wrapping_add((r as u32).wrapping_mul(0x9e37_79b9))))
    })
}

/// The image of `i` (`i < n`) under the seeded permutation of `0..n` (the construction is
/// in `kiln_dsl::permutation`; the kernels evaluate its inverse, `kiln_dsl::unpermute_index`).
pub fn permute_index(seed: u64, n: u32, i: u32) -> u32 {
    assert!(i < n, "index {i} outside 0..{n}");
    let bits = permutation_bits(n);
    let keys = permutation_round_keys(seed);
    let (u, v) = (bits / 2, bits - bits / 2);
    let (mask_u, mask_v) = ((1u32 << u) - 1, (1u32 << v) - 1);
    let mut x = i;
    loop {
        let (mut a, mut b) = (x >> v, x & mask_v);
        for pair in keys.chunks_exact(2) {
            let c = a.wrapping_add(mix32(b ^ pair[0])) & mask_u;
            (a, b) = (b, c);
            let c = a.wrapping_add(mix32(b ^ pair[1])) & mask_v;
            (a, b) = (b, c);
        }
        x = (a << v) | b;
        if x < n {
            return x;
        }
    }
}

/// The preimage of `j` (`j < n`) under [`permute_index`] with the same `seed`
/// (`kiln_dsl::unpermute_index`: the Feistel rounds undone last to first).
pub fn unpermute_index(seed: u64, n: u32, j: u32) -> u32 {
    assert!(j < n, "index {j} outside 0..{n}");
    let bits = permutation_bits(n);
    let keys = permutation_round_keys(seed);
    let (u, v) = (bits / 2, bits - bits / 2);
    let (mask_u, mask_v) = ((1u32 << u) - 1, (1u32 << v) - 1);
    let mut x = j;
    loop {
        let (mut a, mut b) = (x >> v, x & mask_v);
        for pair in keys.chunks_exact(2).rev() {
            let c = b.wrapping_sub(mix32(a ^ pair[1])) & mask_v;
            (a, b) = (c, a);
            let c = b.wrapping_sub(mix32(a ^ pair[0])) & mask_u;
            (a, b) = (c, a);
        }
        x = (a << v) | b;
        if x < n {
            return x;
        }
    }
}

/// The 32-bit word element `index` of stream `stream` draws under `seed`.
pub fn word(seed: u64, stream: u32, index: u64) -> u32 {
    let block = philox4x32_10([(index / 4) as u32, stream, 0, 0], seed_key(seed));
    block[(index % 4) as usize]
}

/// The half-normal quantile `Q(p) = Φ⁻¹(1 − p/2)`, i.e. `erfc(Q/√2) = p`, in f64:
/// bisection on `erfc` (decreasing), then Newton steps.
pub fn half_normal_quantile(p: f64) -> f64 {
    if p >= 1.0 {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if libm::erfc(mid / std::f64::consts::SQRT_2) > p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut q = 0.5 * (lo + hi);
    for _ in 0..3 {
        // d/dq erfc(q/√2) = -√(2/π) exp(-q²/2).
        let f = libm::erfc(q / std::f64::consts::SQRT_2) - p;
        let df = -(2.0 / std::f64::consts::PI).sqrt() * (-0.5 * q * q).exp();
        q -= f / df;
    }
    q
}

/// The normal quantile table `kiln_dsl::gaussian_from_bits` reads, as pairs of neighbours (its doc gives the
/// layout), built once: `round(Q(p) · 2^20)` at `p = (r + ½) / 2^31` of each entry's `r`.
pub fn gaussian_table() -> &'static [i32] {
    static TABLE: OnceLock<Vec<i32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let scale = f64::from(1u32 << GAUSSIAN_FRACTION_BITS);
        let full = 2f64.powi(31);
        let fixed = |p: f64| (half_normal_quantile(p) * scale).round() as i32;
        let nodes = 1u64 << GAUSSIAN_NODES_LOG2;
        let mut t: Vec<i32> = (0..nodes).map(|r| fixed((r as f64 + 0.5) / full)).collect();
        for shift in 0..31 - GAUSSIAN_NODES_LOG2 {
            for j in 0..nodes {
                t.push(fixed((((nodes + j) << shift) as f64 + 0.5) / full));
            }
        }
        t.push(0);
        assert_eq!(t.len(), GAUSSIAN_TABLE_LEN);
        t
    })
}

/// The standard normal value of word `w`: `kiln_dsl::gaussian_from_bits` on the host,
/// the same integer operations, so the same f32 bits.
pub fn gaussian_from_bits(w: u32) -> f32 {
    let table = gaussian_table();
    let r = w & 0x7FFF_FFFF;
    let nodes = 1u32 << GAUSSIAN_NODES_LOG2;
    let q = if r < nodes {
        table[r as usize]
    } else {
        let octave = 31 - r.leading_zeros();
        let shift = octave - GAUSSIAN_NODES_LOG2;
        let k = (nodes + shift * nodes + ((r >> shift) - nodes)) as usize;
        let bits = shift.min(GAUSSIAN_INTERP_BITS);
        let below = (r & ((1u32 << shift) - 1)) >> (shift - bits);
        let (lo, hi) = (table[k], table[k + 1]);
        lo + (((hi - lo) * below as i32) >> bits)
    };
    let signed = if w >> 31 == 1 { -q } else { q };
    signed as f32 * (1.0 / (1u32 << GAUSSIAN_FRACTION_BITS) as f32)
}

/// `z` of element `index` of stream `stream` under `seed`: what kiln's kernels draw.
pub fn normal(seed: u64, stream: u32, index: u64) -> f32 {
    gaussian_from_bits(word(seed, stream, index))
}
