//! Seeded perturbation (MeZO): the kernel's `z` against the host generator bit for bit
//! (f32, f16, and bf16 where the device has it; ragged lengths; 64-bit seeds; several
//! streams), the ±ε walk, a many-seed update against the f64 sum, the statistics of
//! a million draws, a zeroth-order descent that converges, and bad input.

use crate::common::{client, down, up};
use kiln::check::{max_abs_error, Rng};
use kiln::kernels::optim::{perturb, perturb_host, perturb_stream, perturb_sum, zo_update};
use kiln::kernels::random::{normal, word};
use kiln::{DType, HostTensor, Tensor};

fn bits(t: &Tensor) -> Vec<u32> {
    t.download()
        .unwrap()
        .to_f64()
        .iter()
        .map(|&v| (v as f32).to_bits())
        .collect()
}

#[test]
fn z_is_the_host_generators_bit_for_bit() {
    // Words whose low 31 bits are below 256 (the table's first 256 entries, read without
    // interpolation; about one word in 8 million): found by a search over seeds.
    let small = [(402u64, 1900u64), (482, 4083), (1420, 20_331)];
    for &(seed, i) in &small {
        assert!(
            word(seed, 0, i) & 0x7FFF_FFFF < 256,
            "seed {seed} element {i}"
        );
    }
    // theta = 0, eps = 1: the kernel writes z itself (an exact product and sum). Ragged
    // lengths (one element an access) and multiples of 4 (4-wide).
    for (seed, stream, n) in [
        (0u64, 0u32, 1usize),
        (7, 3, 4099),
        (7, 3, 4100),
        (402, 0, 1904),
        (482, 0, 4084),
        (1420, 0, 20_333),
        (u64::MAX, 1 << 31, 1_000_003),
    ] {
        let t = up(DType::F32, &[n], &vec![0.0; n]);
        perturb_stream(&t, stream, &[seed], &[1.0]).unwrap();
        let want: Vec<u32> = (0..n as u64)
            .map(|i| normal(seed, stream, i).to_bits())
            .collect();
        let got = bits(&t);
        let diff = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(
            diff, None,
            "seed {seed} stream {stream} n {n}: first differing element"
        );
    }
}

#[test]
fn perturbed_weights_match_the_host_mirror_bit_for_bit() {
    let mut rng = Rng::new(11);
    let n = 100_003;
    let theta = rng.normals(n, 1.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        if !client().supports(dtype) {
            // Refused by name where the device lacks the dtype.
            let h = HostTensor::from_f64(dtype, vec![2], &[1.0, 2.0]).unwrap();
            let e = Tensor::upload(client(), &h)
                .and_then(|t| perturb(&[&t], 1, 0.1))
                .unwrap_err();
            assert!(e.to_string().contains(&dtype.to_string()), "{e}");
            continue;
        }
        let t = up(dtype, &[7, n / 7 + 1], &{
            let mut v = theta.clone();
            v.resize(7 * (n / 7 + 1), 0.25);
            v
        });
        let mut host: Vec<f32> = down(&t).iter().map(|&v| v as f32).collect();
        perturb_stream(&t, 5, &[0xDEAD_BEEF_0123_4567], &[1e-3]).unwrap();
        perturb_host(&mut host, 5, &[0xDEAD_BEEF_0123_4567], &[1e-3]);
        let want: Vec<u32> = HostTensor::from_f64(
            dtype,
            vec![host.len()],
            &host.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        )
        .unwrap()
        .to_f64()
        .iter()
        .map(|&v| (v as f32).to_bits())
        .collect();
        assert_eq!(bits(&t), want, "{dtype}");
    }
}

#[test]
fn mezo_walk_restores_and_many_seeds_match_the_f64_sum() {
    let mut rng = Rng::new(3);
    let n = 4099;
    let theta = rng.normals(n, 1.0);
    let a = up(DType::F32, &[n], &theta);
    let b = up(DType::F32, &[n], &theta);
    // MeZO's walk: +eps, -2 eps, +eps is theta to within rounding of each step.
    let eps = 1e-3;
    perturb(&[&a, &b], 9, eps).unwrap();
    perturb(&[&a, &b], 9, -2.0 * eps).unwrap();
    perturb(&[&a, &b], 9, eps).unwrap();
    for t in [&a, &b] {
        let err = max_abs_error(&down(t), &theta);
        assert!(err <= 4.0 * f32::EPSILON as f64 * 3.0, "walk: {err:e}");
    }
    // Tensor 1 of a list draws stream 1: different from tensor 0's z.
    perturb(&[&a, &b], 9, 1.0).unwrap();
    assert_ne!(bits(&a), bits(&b));
    // theta -= lr sum p_i z(seed_i) over 12 seeds: the f64 sum to f32 rounding.
    let seeds: Vec<u64> = (0..12).map(|i| 1000 + 77 * i).collect();
    let grads: Vec<f64> = rng.normals(12, 2.0);
    let c = up(DType::F32, &[n], &theta);
    zo_update(&[&c], &seeds, &grads, 0.05).unwrap();
    let got = down(&c);
    for (e, (&g, &w)) in got.iter().zip(&theta).enumerate() {
        let want: f64 = w - 0.05
            * seeds
                .iter()
                .zip(&grads)
                .map(|(&s, p)| p * normal(s, 0, e as u64) as f64)
                .sum::<f64>();
        assert!(
            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "element {e}: {g} vs {want}"
        );
    }
}

#[test]
fn a_million_device_draws_are_standard_normal_and_reproducible() {
    let n = 1 << 20;
    let t = up(DType::F32, &[n], &vec![0.0; n]);
    perturb(&[&t], 2024, 1.0).unwrap();
    let z = down(&t);
    let mean = z.iter().sum::<f64>() / n as f64;
    let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
    let third = z.iter().map(|x| (x - mean).powi(3)).sum::<f64>() / n as f64;
    let kurt = z.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / var / var;
    assert!(mean.abs() < 5e-3, "mean {mean}");
    assert!((var - 1.0).abs() < 5e-3, "variance {var}");
    assert!(third.abs() < 1.5e-2, "third moment {third}");
    assert!((kurt - 3.0).abs() < 3e-2, "kurtosis {kurt}");
    // Kolmogorov–Smirnov against Φ: sqrt(n) D < 1.63 (1% level).
    let mut s = z.clone();
    s.sort_by(f64::total_cmp);
    assert!(s.iter().all(|x| x.is_finite()), "a non-finite draw");
    let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    let d = s
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = phi(x);
            (f - i as f64 / n as f64)
                .abs()
                .max(((i + 1) as f64 / n as f64 - f).abs())
        })
        .fold(0.0, f64::max);
    assert!(
        (n as f64).sqrt() * d < 1.63,
        "KS: sqrt(n) D = {}",
        (n as f64).sqrt() * d
    );
    // The same seed again: the same bits.
    let u = up(DType::F32, &[n], &vec![0.0; n]);
    perturb(&[&u], 2024, 1.0).unwrap();
    assert_eq!(bits(&t), bits(&u));
}

/// MeZO on a quadratic `f(θ) = ½ |θ − θ*|²`: two-point estimates from `f(θ ± εz)`
/// evaluated on the host from the perturbed weights, updates by `zo_update`. With
/// lr = 1/d the expected squared error shrinks by about 1 − 1/d per step, so 300 steps
/// at d = 32 should cut the loss ~10^4-fold; the test asks for 10x.
#[test]
fn zeroth_order_descent_converges_on_a_quadratic() {
    let d = 32usize;
    let mut rng = Rng::new(5);
    let target = rng.normals(d, 1.0);
    let t = up(DType::F32, &[d], &vec![0.0; d]);
    let loss = |t: &Tensor| -> f64 {
        down(t)
            .iter()
            .zip(&target)
            .map(|(a, b)| 0.5 * (a - b).powi(2))
            .sum()
    };
    let start = loss(&t);
    let (eps, lr) = (1e-2, 1.0 / d as f64);
    for step in 0..300u64 {
        let seed = 10_000 + step;
        perturb(&[&t], seed, eps).unwrap();
        let plus = loss(&t);
        perturb(&[&t], seed, -2.0 * eps).unwrap();
        let minus = loss(&t);
        perturb(&[&t], seed, eps).unwrap();
        let p = (plus - minus) / (2.0 * eps);
        zo_update(&[&t], &[seed], &[p], lr).unwrap();
    }
    let end = loss(&t);
    assert!(end < start / 10.0, "loss {start} -> {end}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let t = up(DType::F32, &[4], &[0.5; 4]);
    let check = crate::common::assert_clear;
    check(
        perturb_sum(&[&t], &[1, 2], &[0.5]).unwrap_err(),
        &["seeds", "2 seeds"],
    );
    check(perturb_sum(&[&t], &[], &[]).unwrap_err(), &["seeds"]);
    check(perturb(&[&t], 1, f64::NAN).unwrap_err(), &["eps", "NaN"]);
    // Finite in f64, infinite as the kernel's f32.
    check(perturb(&[&t], 1, 1e39).unwrap_err(), &["eps", "f32"]);
    check(
        zo_update(&[&t], &[1], &[1.0], -1.0).unwrap_err(),
        &["lr", "-1"],
    );
    let ints = Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::I32, vec![2], &[1.0, 2.0]).unwrap(),
    )
    .unwrap();
    check(perturb(&[&ints], 1, 0.1).unwrap_err(), &["param", "i32"]);
    // Nothing changed by the refused calls.
    assert_eq!(down(&t), vec![0.5; 4]);
}
