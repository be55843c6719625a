//! The host side of kiln's counter-based generator (`kiln_dsl::random`): the same
//! Philox4x32-10 words and the same normal values as the kernels, bit for bit, so a
//! user can reproduce on the CPU any `z` a kernel drew (and tests compare bits).
//!
//! Keys and counters: a 64-bit `seed` is the key `(low word, high word)`; kiln's
//! element-wise users draw element `i` of stream `s` (a tensor's position in a list)
//! from lane `i % 4` of the block at counter `(i / 4, s, 0, 0)`.
//!
//! Also the host mirror of the seeded index permutation (`kiln_dsl::permutation`,
//! [`permute_index`]) that draws rand-k's subsets.

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

/// The image of `i` (`i < n`) under the seeded permutation of `0..n` that the kernels
/// evaluate (`kiln_dsl::permute_index`; the construction is in `kiln_dsl::permutation`).
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

/// The 32-bit word element `index` of stream `stream` draws under `seed`.
pub fn word(seed: u64, stream: u32, index: u64) -> u32 {
    let block = philox4x32_10([(index / 4) as u32, stream, 0, 0], seed_key(seed));
    block[(index % 4) as usize]
}

/// The half-normal quantile `Q(p) = Φ⁻¹(1 − p/2)`, i.e. `erfc(Q/√2) = p`, in f64:
/// bisection on `erfc` (decreasing), then Newton steps.
fn half_normal_quantile(p: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The index permutation is a bijection of `0..n` (ragged sizes, powers of two and
    /// the smallest), differs by seed, and its subsets `{i : π(i) < k}` cover every
    /// index about equally over seeds.
    #[test]
    fn index_permutation_is_a_bijection_and_uniform() {
        for n in [1u32, 2, 3, 5, 64, 100, 1000, 4096, 70_001] {
            for seed in [0u64, 1, u64::MAX] {
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let p = permute_index(seed, n, i);
                    assert!(p < n && !seen[p as usize], "n {n} seed {seed}: {i} -> {p}");
                    seen[p as usize] = true;
                }
            }
        }
        let image = |seed| {
            (0..1000)
                .map(|i| permute_index(seed, 1000, i))
                .collect::<Vec<_>>()
        };
        assert_ne!(image(1), image(2));
        assert_ne!(image(1), (0..1000).collect::<Vec<_>>());
        // 4000 draws of 8 of 64: each index kept 500 times on average (binomial sd 20.9).
        let (n, k) = (64u32, 8u32);
        let mut hits = [0u32; 64];
        for seed in 0..4000u64 {
            for i in 0..n {
                hits[i as usize] += u32::from(permute_index(seed, n, i) < k);
            }
        }
        assert!(hits.iter().all(|&h| (400..=600).contains(&h)), "{hits:?}");
    }

    /// Random123's known-answer vectors (its `kat_vectors`) for Philox4x32-10.
    #[test]
    fn philox_matches_random123() {
        let kat = [
            (
                [0u32; 4],
                [0u32; 2],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (c, k, want) in kat {
            assert_eq!(philox4x32_10(c, k), want);
        }
    }

    /// Closed forms: `Q(1) = 0`, `Q(0.05) = 1.959963984540054` (the two-sided 95%
    /// point), `Q(2^-32)` ≈ 6.3; the table is monotone; interpolated values lie within
    /// 1.5e-6 of the exact quantile in every octave (20 000 positions).
    #[test]
    fn quantile_table_is_accurate() {
        assert_eq!(half_normal_quantile(1.0), 0.0);
        assert!((half_normal_quantile(0.05) - 1.959_963_984_540_054).abs() < 1e-12);
        let t = gaussian_table();
        assert!(t.windows(2).all(|w| w[0] >= w[1]), "not monotone");
        assert!((6.2..6.4).contains(&(t[0] as f64 / 1048576.0)));
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..20_000u64 {
            // SplitMix64 positions spread over the 31 octaves.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = state;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let r = ((x ^ (x >> 31)) as u32 & 0x7FFF_FFFF) >> (i % 31);
            let exact = half_normal_quantile((r as f64 + 0.5) / 2f64.powi(31));
            let got = gaussian_from_bits(r) as f64;
            assert!((got - exact).abs() < 1.5e-6, "r={r}: {got} vs {exact}");
            assert_eq!(gaussian_from_bits(r | 1 << 31), -gaussian_from_bits(r));
        }
    }

    /// Moments of 2^18 draws: mean 0, variance 1, kurtosis 3 (to sampling error), and
    /// the fraction beyond 1.96 is 5%.
    #[test]
    fn draws_are_standard_normal() {
        let n = 1usize << 18;
        let z: Vec<f64> = (0..n as u64).map(|i| normal(42, 0, i) as f64).collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = z.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / var / var;
        let tail = z.iter().filter(|x| x.abs() > 1.959_964).count() as f64 / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
        assert!((tail - 0.05).abs() < 0.002, "tail {tail}");
    }
}
