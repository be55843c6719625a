//! kiln's host-side references and generator, checked with no device: the GLA
//! reference's gradients against finite differences and a closed form, the quantized
//! GEMMs' rounding and packing rules, and the Philox generator and normal transform
//! against Random123's known answers and closed-form quantiles.
//!
//! They were `kiln-kernels`' unit tests; that crate builds no unit-test harness
//! (`test = false` in its Cargo.toml: a second compilation of the whole operator
//! library, about 100 s of CI's build, for host-only tests), so they live here, and
//! `kernels_has_no_unit_tests` keeps new ones from being written where they would not run.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod gla {
    use kiln::kernels::gla::reference::*;

    /// A small deterministic generator (tests only).
    fn values(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
            })
            .collect()
    }

    struct Case {
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        g: Vec<f64>,
        h0: Vec<f64>,
        w_o: Vec<f64>,
        w_ht: Vec<f64>,
        d: Dims,
    }

    fn case() -> Case {
        // Two sequences of 5 and 3 rows (varlen), 2 heads, K = 3, V = 2: more than one
        // checkpoint is not exercised here, see `checkpoints_do_not_change_the_result`.
        let d = Dims {
            heads: 2,
            dk: 3,
            dv: 2,
            bounds: vec![0, 5, 8],
        };
        let (r, h) = (d.rows(), d.heads);
        Case {
            q: values(r * h * 3, 1, -1.0, 1.0),
            k: values(r * h * 3, 2, -1.0, 1.0),
            v: values(r * h * 2, 3, -1.0, 1.0),
            g: values(r * h * 3, 4, -3.0, -0.01),
            h0: values(2 * h * 6, 5, -1.0, 1.0),
            w_o: values(r * h * 2, 6, -1.0, 1.0),
            w_ht: values(2 * h * 6, 7, -1.0, 1.0),
            d,
        }
    }

    fn loss(c: &Case, q: &[f64], k: &[f64], v: &[f64], g: &[f64], h0: &[f64]) -> f64 {
        let (o, ht) = forward(q, k, v, g, Some(h0), &c.d, 0.7);
        o.iter().zip(&c.w_o).map(|(a, b)| a * b).sum::<f64>()
            + ht.iter().zip(&c.w_ht).map(|(a, b)| a * b).sum::<f64>()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let c = case();
        let gr = backward(
            &c.q,
            &c.k,
            &c.v,
            &c.g,
            Some(&c.h0),
            &c.w_o,
            Some(&c.w_ht),
            &c.d,
            0.7,
        );
        let eps = 1e-6;
        let check = |which: usize, analytic: &[f64]| {
            let base = [&c.q, &c.k, &c.v, &c.g, &c.h0][which].clone();
            for i in 0..base.len() {
                let mut args = [
                    c.q.clone(),
                    c.k.clone(),
                    c.v.clone(),
                    c.g.clone(),
                    c.h0.clone(),
                ];
                args[which][i] = base[i] + eps;
                let up = loss(&c, &args[0], &args[1], &args[2], &args[3], &args[4]);
                args[which][i] = base[i] - eps;
                let down = loss(&c, &args[0], &args[1], &args[2], &args[3], &args[4]);
                let fd = (up - down) / (2.0 * eps);
                assert!(
                    (fd - analytic[i]).abs() <= 1e-7 * (1.0 + fd.abs()),
                    "input {which} element {i}: finite difference {fd}, analytic {}",
                    analytic[i]
                );
            }
        };
        check(0, &gr.dq);
        check(1, &gr.dk);
        check(2, &gr.dv);
        check(3, &gr.dg);
        check(4, &gr.dh0);
    }

    #[test]
    fn checkpoints_do_not_change_the_result() {
        // 150 rows: three checkpoint segments; compare with the gradient of the same
        // problem split into sequences whose first state is carried over by hand.
        let d = Dims {
            heads: 1,
            dk: 2,
            dv: 2,
            bounds: vec![0, 150],
        };
        let q = values(300, 11, -1.0, 1.0);
        let k = values(300, 12, -1.0, 1.0);
        let v = values(300, 13, -1.0, 1.0);
        let g = values(300, 14, -0.2, 0.0);
        let w = values(300, 15, -1.0, 1.0);
        let full = backward(&q, &k, &v, &g, None, &w, None, &d, 1.0);
        // Central differences on a few gate entries across the segments.
        for &i in &[0usize, 127, 129, 255, 299] {
            let l = |g: &[f64]| {
                let (o, _) = forward(&q, &k, &v, g, None, &d, 1.0);
                o.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
            };
            let mut gp = g.clone();
            gp[i] += 1e-6;
            let mut gm = g.clone();
            gm[i] -= 1e-6;
            let fd = (l(&gp) - l(&gm)) / 2e-6;
            assert!(
                (fd - full.dg[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "dg[{i}]: {fd} vs {}",
                full.dg[i]
            );
        }
    }

    #[test]
    fn closed_form_single_step() {
        // One row, zero state: o = scale * (q . k) v, ht = k^T v.
        let d = Dims {
            heads: 1,
            dk: 2,
            dv: 1,
            bounds: vec![0, 1],
        };
        let (o, ht) = forward(
            &[1.0, 2.0],
            &[3.0, 4.0],
            &[5.0],
            &[-1.0, -2.0],
            None,
            &d,
            0.5,
        );
        assert_eq!(o, vec![0.5 * 11.0 * 5.0]);
        assert_eq!(ht, vec![15.0, 20.0]);
    }
}

mod qgemm {
    use kiln::kernels::qgemm::reference::*;

    #[test]
    fn ties_round_to_even() {
        for (x, r) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, 0.0),
            (-1.5, -2.0),
            (-2.5, -2.0),
            (2.4, 2.0),
            (-2.6, -3.0),
        ] {
            assert_eq!(round_half_even(x), r, "{x}");
        }
        // 2-bit view of 96 = 1.5 * 64 rounds to 2, clamps to 1; -96 rounds to -2.
        assert_eq!(double_round(96, 2), 1);
        assert_eq!(double_round(-96, 2), -2);
        assert_eq!(double_round(-32, 2), 0); // -0.5 -> 0 (even)
        assert_eq!(double_round(-127, 4), -8);
        assert_eq!(double_round(24, 4), 2); // 1.5 -> 2
        assert_eq!(double_round(40, 4), 2); // 2.5 -> 2
        assert_eq!(double_round(77, 8), 77);
    }

    #[test]
    fn packers_round_trip_and_put_nibbles_where_the_formats_say() {
        let (k, n, g) = (64, 16, 32);
        let w: Vec<f64> = (0..k * n)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 17.0)
            .collect();
        let c = W4Codes::quantize(&w, k, n, g);
        // Quantization error is at most half a step.
        let back = c.dequantize(None);
        for i in 0..k * n {
            let s = c.s[(i / n / g) * n + i % n];
            assert!((back[i] - w[i]).abs() <= 0.5 * s + 1e-12, "element {i}");
        }
        let qw = c.gptq_qweight();
        // GPTQ: row 8w + j of column c is nibble j of word (w, c).
        assert_eq!((qw[n + 3] as u32 >> 8) & 15, c.q[10 * n + 3] as u32);
        let aw = c.awq_qweight();
        // AWQ: column 8w + 1 of row r is slot 4 of word (r, w).
        assert_eq!(
            (aw[5 * (n / 8) + 1] as u32 >> 16) & 15,
            c.q[5 * n + 9] as u32
        );
        let z1 = c.qzeros("gptq", 1);
        let z2 = c.qzeros("gptq", 2);
        assert_eq!((z2[0] as u32 >> 4) & 15, c.z[1] as u32);
        assert_eq!(((z1[0] as u32 >> 4) + 1) & 15, c.z[1] as u32 & 15);
    }

    /// The straight-through gradient is the exact gradient of the surrogate
    /// `s1 (c0 + m0 (u - u0))`, with the code `c0`, mask `m0` and `u0` frozen at the
    /// base point: central differences of that surrogate check every formula.
    #[test]
    fn flexround_backward_matches_finite_differences_of_the_surrogate() {
        let (rows, cols) = (3, 5);
        let n = rows * cols;
        let f = FlexRound {
            rows,
            cols,
            w: (0..n).map(|i| ((i * 7 % 11) as f64 - 5.3) * 0.37).collect(),
            s1: 0.21,
            s2: (0..n).map(|i| 0.8 + 0.03 * i as f64).collect(),
            s3: vec![1.1, 0.7, 1.3],
            s4: vec![0.9, 1.2, 1.0, 0.6, 1.4],
            qmin: -4.0,
            qmax: 3.0,
        };
        let g: Vec<f64> = (0..n).map(|i| ((i * 5 % 7) as f64 - 3.0) * 0.5).collect();
        let frozen: Vec<(f64, f64, f64)> = (0..n)
            .map(|i| {
                let u = f.w[i] / f.divisor(i);
                let r = round_half_even(u);
                let m = if r >= f.qmin && r <= f.qmax { 1.0 } else { 0.0 };
                (r.clamp(f.qmin, f.qmax), m, u)
            })
            .collect();
        let loss = |p: &FlexRound| -> f64 {
            (0..n)
                .map(|i| {
                    let (c0, m0, u0) = frozen[i];
                    g[i] * p.s1 * (c0 + m0 * (p.w[i] / p.divisor(i) - u0))
                })
                .sum()
        };
        let grads = f.backward(&g);
        let h = 1e-6;
        let fd = |bump: &dyn Fn(&mut FlexRound, f64)| {
            let (mut a, mut b) = (f.clone(), f.clone());
            bump(&mut a, h);
            bump(&mut b, -h);
            (loss(&a) - loss(&b)) / (2.0 * h)
        };
        let close = |x: f64, y: f64, what: &str| {
            assert!((x - y).abs() < 1e-6 * (1.0 + y.abs()), "{what}: {x} vs {y}")
        };
        close(grads.ds1, fd(&|p, e| p.s1 += e), "ds1");
        for i in 0..n {
            close(grads.dw[i], fd(&|p, e| p.w[i] += e), "dw");
            close(grads.ds2[i], fd(&|p, e| p.s2[i] += e), "ds2");
        }
        for r in 0..rows {
            close(grads.ds3[r], fd(&|p, e| p.s3[r] += e), "ds3");
        }
        for c in 0..cols {
            close(grads.ds4[c], fd(&|p, e| p.s4[c] += e), "ds4");
        }
    }
}

mod random {
    use kiln::kernels::random::*;

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
        // The inverse (rand-k marks `π⁻¹(0..k)`) undoes it, cycle walks included.
        for n in [1u32, 2, 3, 5, 64, 1000, 70_001] {
            for seed in [0u64, 7, u64::MAX] {
                for i in 0..n {
                    let p = permute_index(seed, n, i);
                    assert_eq!(
                        unpermute_index(seed, n, p),
                        i,
                        "n {n} seed {seed}: {i} -> {p}"
                    );
                }
            }
        }
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

/// The host's f64 -> f16 / bf16 conversion (every half-precision upload and reference
/// rounding) against the definition of round-to-nearest-even: the result `r` lies within
/// the two midpoints to its neighbours (exact in f64: half formats carry at most 11
/// bits), on a midpoint only when `r` is even. Values on, just above and just below ties
/// (by one f64 ulp, and by one f32 ulp below bf16's tie, where `half` 2.7 misrounds),
/// subnormals, the overflow threshold, signed zeros.
mod half_rounding {
    use kiln::runtime::{bf16_from_f64, f16_from_f64};

    /// Checks `r = round(v)` for a format whose values widen exactly to f64 through
    /// `to_f64` and whose bits step by one between neighbours of the same sign.
    fn check(what: &str, v: f64, bits: u16, to_f64: impl Fn(u16) -> f64) {
        let r = to_f64(bits);
        if v.is_nan() {
            assert!(r.is_nan(), "{what}({v:e}): {r:e}");
            return;
        }
        let mag = bits & 0x7fff;
        assert_eq!(bits >> 15 == 1, v.is_sign_negative(), "{what}({v:e}): sign");
        let (v, r) = (v.abs(), r.abs());
        let even = mag & 1 == 0;
        if r.is_infinite() {
            // The overflow threshold: the largest finite value plus half its ulp (a tie
            // goes to infinity, whose bits are even).
            let (max, before) = (to_f64(mag - 1), to_f64(mag - 2));
            assert!(v >= max + (max - before) / 2.0, "{what}({v:e}) -> inf");
            return;
        }
        // Neighbours in magnitude; past the largest finite value, its ulp again.
        let down = if mag == 0 {
            -to_f64(1)
        } else {
            to_f64(mag - 1)
        };
        let up = to_f64(mag + 1);
        let up = if up.is_infinite() { r + (r - down) } else { up };
        let (lo_mid, hi_mid) = ((down + r) / 2.0, (r + up) / 2.0);
        let above = if even { v >= lo_mid } else { v > lo_mid };
        let below = if even { v <= hi_mid } else { v < hi_mid };
        assert!(
            above && below,
            "{what}({v:e}) = {r:e} ({bits:#06x}): not the nearest"
        );
    }

    fn f64_step(v: f64, ulps: i64) -> f64 {
        f64::from_bits((v.to_bits() as i64 + ulps) as u64)
    }

    #[test]
    fn f64_to_half_precision_is_correctly_rounded() {
        let f16 = |b: u16| kiln::runtime::half::f16::from_bits(b).to_f64();
        let bf16 = |b: u16| kiln::runtime::half::bf16::from_bits(b).to_f64();
        let mut values = vec![
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            1e-300,
        ];
        values.extend([
            65504.0,
            65520.0,
            65519.99,
            3.3895e38,
            3.4e38,
            1e39,
            f64::MAX,
        ]);
        // The case the perturbation test found on the CUDA emulator: the f32 0x3ee88005,
        // five f32 ulps above the bf16 tie between 0x3ee8 and 0x3ee9.
        values.push(f32::from_bits(0x3ee8_8005) as f64);
        // Every tie of both formats around a spread of exponents, and the values next to
        // it: one f64 ulp, one f32 ulp, and 2^-32 relative (below f64's upper 32 bits).
        for bits in (0..0x7c00u16).step_by(37).chain(0x3c00..0x3c40) {
            let high = bits | 0x4000;
            for mid in [
                (f16(bits) + f16(bits + 1)) / 2.0,
                (bf16(bits) + bf16(bits + 1)) / 2.0,
                (bf16(high) + bf16(high + 1)) / 2.0,
            ] {
                for v in [
                    mid,
                    f64_step(mid, 1),
                    f64_step(mid, -1),
                    mid * (1.0 + 2f64.powi(-32)),
                ] {
                    values.extend([v, -v]);
                    let f = mid as f32;
                    for u in [-1i32, 1] {
                        values.push(f32::from_bits((f.to_bits() as i32 + u) as u32) as f64);
                    }
                }
            }
        }
        for v in values {
            check("f16", v, f16_from_f64(v).to_bits(), f16);
            check("bf16", v, bf16_from_f64(v).to_bits(), bf16);
        }
    }

    /// `HostTensor::from_f64` rounds with the same functions (uploads and references
    /// agree bit for bit).
    #[test]
    fn host_tensors_round_with_them() {
        use kiln::{DType, HostTensor};
        let v = f32::from_bits(0x3ee8_8005) as f64;
        let t = HostTensor::from_f64(DType::BF16, vec![1], &[v]).unwrap();
        assert_eq!(t.data, 0x3ee9u16.to_le_bytes());
        let h = HostTensor::from_f64(
            DType::F16,
            vec![1],
            &[1.0 + 2f64.powi(-11) + 2f64.powi(-40)],
        );
        assert_eq!(h.unwrap().data, 0x3c01u16.to_le_bytes());
    }
}

/// `kiln-kernels` builds no unit-test harness (`[lib] test = false`), so a
/// `#[cfg(test)]` module in it would never run: its tests belong in this directory.
#[test]
fn kernels_has_no_unit_tests() {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if text.contains("#[cfg(test)]") || text.contains("#[test]") {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/src");
    let mut found = Vec::new();
    walk(&src, &mut found);
    assert!(
        found.is_empty(),
        "unit tests in kiln-kernels never run (its Cargo.toml: `test = false`); move them \
         to tests/: {found:?}"
    );
}
