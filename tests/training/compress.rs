//! Gradient compressors against a host reference written from the definition (sort by
//! key, ties to the lower index): exact indices, bit-exact values and error feedback
//! (`c + e == a` bit for bit), over ragged sizes from 1 to 3·10^6 and k from 1 (0.1 %,
//! 1 %, 50 %) to n; ties, ±inf and NaN; rand-k's
//! shared seed and its uniformity; error feedback's conservation over steps; EControl
//! stepped against its f64 reference; bad input.

use crate::common::{assert_clear, client, down, up};
use kiln::check::{max_abs_error, max_rel_error, Rng};
use kiln::kernels::optim::compress::{
    bracket_pays, bracket_rank, compression_errors, lgreco_plan, magnitude_keys, randk_keys,
    reference_select, with_unit_layout, UnitLayout, BRACKET_SAMPLE, BRACKET_SEED,
};
use kiln::kernels::optim::reference::econtrol_step;
use kiln::kernels::optim::{econtrol, randk, topk_ef, Compressed};
use kiln::{DType, HostTensor, Tensor};

/// `a = error + grad` in f32, as the kernel forms it (`grad` itself without an error:
/// a -0 stays -0).
fn accumulate(g: &[f64], e: Option<&[f64]>) -> Vec<f32> {
    g.iter()
        .enumerate()
        .map(|(i, &g)| match e {
            Some(e) => e[i] as f32 + g as f32,
            None => g as f32,
        })
        .collect()
}

/// A gradient and an error of `n` elements drawn from `seed`, on the device, and their
/// sum `a` as the kernels form it.
fn gradient_and_error(seed: u64, n: usize) -> (Tensor, Tensor, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let g = rng.normals(n, 1.0);
    let e = rng.normals(n, 0.3);
    let a = accumulate(&g, Some(&e));
    (up(DType::F32, &[n], &g), up(DType::F32, &[n], &e), a)
}

fn ints(t: &Tensor) -> Vec<usize> {
    down(t).iter().map(|&v| v as usize).collect()
}

/// Checks `got` against the reference selection of `a` by `keys`, values scaled by
/// `scale`: indices equal, values and error equal bit for bit.
fn check(got: &Compressed, a: &[f32], keys: &[u32], k: usize, scale: f32, what: &str) {
    let want = reference_select(keys, k);
    assert_eq!(ints(&got.indices), want, "{what}: indices");
    let values: Vec<f32> = want.iter().map(|&i| scale * a[i]).collect();
    let got_values: Vec<f32> = down(&got.values).iter().map(|&v| v as f32).collect();
    assert_eq!(
        same_bits(&got_values, &values),
        None,
        "{what}: first differing value"
    );
    // e = a − c in f32 (exactly 0 where top-k takes a value, an infinity too).
    let mut error = a.to_vec();
    for (&i, &c) in want.iter().zip(&values) {
        error[i] = if scale == 1.0 { 0.0 } else { a[i] - c };
    }
    let got_error: Vec<f32> = down(&got.error).iter().map(|&v| v as f32).collect();
    assert_eq!(
        same_bits(&got_error, &error),
        None,
        "{what}: first differing error element"
    );
    // The compression error, summed per cube in f32 on the device.
    let want_norm = error
        .iter()
        .map(|&e| f64::from(e).powi(2))
        .sum::<f64>()
        .sqrt();
    if want_norm.is_finite() {
        let got_norm = got.error_norm().unwrap();
        assert!(
            (got_norm - want_norm).abs() <= 1e-5 * want_norm,
            "{what}: error norm {got_norm} against {want_norm}"
        );
    }
    if scale <= 2.0 {
        // Error feedback conserves a exactly: c + e == a, bit for bit (top-k; rand-k at
        // k >= n/2, where a − c is exact in f32).
        let mut dense = got_error.clone();
        for (&i, v) in want.iter().zip(&got_values) {
            dense[i] += v;
        }
        assert_eq!(same_bits(&dense, a), None, "{what}: c + e differs from a");
    }
}

/// `topk_ef` of the f32 gradient `g` without an error against the reference selection.
fn check_without_error(g: &[f64], k: usize, what: &str) {
    let a = accumulate(g, None);
    let got = topk_ef(&up(DType::F32, &[g.len()], g), None, k).unwrap();
    check(&got, &a, &magnitude_keys(&a), k, 1.0, what);
}

/// Rand-k of `grad` with `error` (`a` their f32 sum) against the subset of the host's
/// forward permutation, its values scaled by `n / k` in f32; returns the result.
fn check_randk(
    grad: &Tensor,
    error: Option<&Tensor>,
    a: &[f32],
    k: usize,
    seed: u64,
    what: &str,
) -> Compressed {
    let n = a.len();
    let got = randk(grad, error, k, seed).unwrap();
    let scale = (n as f64 / k as f64) as f32;
    check(&got, a, &randk_keys(n, seed), k, scale, what);
    got
}

/// The first position where `x` and `y` differ in bits (any NaN equals any NaN).
fn same_bits(x: &[f32], y: &[f32]) -> Option<usize> {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
}

#[test]
fn topk_ef_is_exact_over_ragged_sizes_and_every_k() {
    let mut rng = Rng::new(1);
    // Ragged sizes run the keys pass one element a unit, multiples of 4 four-wide; the
    // selection kernels read 4-wide either way, past n in the ragged ones.
    for (n, ks) in [
        (1usize, vec![1usize]),
        (2, vec![1, 2]),
        (3, vec![2]),
        (4096, vec![1, 17, 4095, 4096]),
        (4097, vec![1, 17, 4096, 4097]),
        (100_003, vec![1, 100, 1000, 50_002, 65_537]),
        (262_144, vec![2621, 131_072]),
        (3_000_001, vec![30_000]),
    ] {
        let g = rng.normals(n, 1.0);
        let e = rng.normals(n, 0.3);
        let (gt, et) = (up(DType::F32, &[n], &g), up(DType::F32, &[n], &e));
        for &k in &ks {
            for with_error in [true, false] {
                let a = accumulate(&g, with_error.then_some(&e[..]));
                let got = topk_ef(&gt, with_error.then_some(&et), k).unwrap();
                check(
                    &got,
                    &a,
                    &magnitude_keys(&a),
                    k,
                    1.0,
                    &format!("n {n} k {k} error {with_error}"),
                );
            }
        }
        // Without an error an f32 gradient is read in place: never written.
        let uploaded: Vec<f64> = g.iter().map(|&v| v as f32 as f64).collect();
        assert_eq!(down(&gt), uploaded, "n {n}: the gradient was modified");
    }
}

/// The positions of the sampled bracket's sample over `n` elements (`topk_sample`'s).
fn bracket_positions(n: usize) -> Vec<usize> {
    (0..BRACKET_SAMPLE as u64)
        .map(|j| {
            ((kiln::kernels::random::word(BRACKET_SEED, 1, j) as u64 * n as u64) >> 32) as usize
        })
        .collect()
}

/// How many of `keys` lie at or above the sampled bracket's threshold for `k`: at least
/// `k` where the pass that keeps candidates suffices, fewer where the refill runs.
fn bracket_admits(keys: &[u32], k: usize) -> usize {
    let n = keys.len();
    let mut sampled: Vec<u32> = bracket_positions(n).iter().map(|&p| keys[p]).collect();
    sampled.sort_unstable_by(|x, y| y.cmp(x));
    let threshold = sampled[bracket_rank(n, k, BRACKET_SAMPLE) - 1];
    keys.iter().filter(|&&key| key >= threshold).count()
}

#[test]
fn topk_ef_through_the_sampled_bracket_is_exact() {
    // n >= 2^19 and k <= n / 2 take the bracket: ragged n, k from 1 to n / 2 (and n / 2 + 1,
    // the radix select over every key, beside it).
    let n = 524_291;
    let mut rng = Rng::new(11);
    let (gt, et, a) = gradient_and_error(11, n);
    let keys = magnitude_keys(&a);
    for k in [1, 524, 5_243, n / 2, n / 2 + 1] {
        assert_eq!(bracket_pays(n, k), k <= n / 2, "k {k}");
        if bracket_pays(n, k) {
            assert!(bracket_admits(&keys, k) >= k, "k {k}: the refill would run");
        }
        let got = topk_ef(&gt, Some(&et), k).unwrap();
        check(&got, &a, &keys, k, 1.0, &format!("bracket, k {k}"));
    }
    // Ties: a gradient on a grid of quarters, so that thousands of keys equal the k-th
    // (those taken are the lowest indices); an f16 gradient where the device has f16.
    let dtype = match client().supports(DType::F16) {
        true => DType::F16,
        false => DType::F32,
    };
    let g: Vec<f64> = rng
        .normals(n, 1.0)
        .iter()
        .map(|v| (v * 4.0).round() / 4.0)
        .collect();
    let a = accumulate(&g, None);
    let k = 50_000;
    let got = topk_ef(&up(dtype, &[n], &g), None, k).unwrap();
    check(
        &got,
        &a,
        &magnitude_keys(&a),
        k,
        1.0,
        &format!("bracket, ties, {dtype}"),
    );
    // Data built against the bracket's seed: the sampled positions hold the largest
    // magnitudes, so its threshold admits fewer than k (at most BRACKET_SAMPLE positions)
    // and the refill keeps every element; n a multiple of 4, so that the passes over
    // every element run 4-wide (first a plain case of that width).
    let n = 524_288;
    let (gt, et, a) = gradient_and_error(12, n);
    check(
        &topk_ef(&gt, Some(&et), 5_243).unwrap(),
        &a,
        &magnitude_keys(&a),
        5_243,
        1.0,
        "bracket, 4-wide",
    );
    let mut g = rng.normals(n, 1.0);
    for p in bracket_positions(n) {
        g[p] = 100.0 + g[p].abs();
    }
    let k = n / 4;
    let keys = magnitude_keys(&accumulate(&g, None));
    assert!(bracket_admits(&keys, k) < k, "the refill would not run");
    check_without_error(&g, k, "bracket, refilled");
}

#[test]
fn dense_ties_at_large_n_are_counted_past_eight_bits() {
    // Every key equal but a few: the candidate histogram passes read thousands of keys a
    // unit in one bin (past a unit's 8-bit counters), on both paths (n below 2^19: the
    // radix select over every key; above: the sampled bracket).
    for n in [300_007usize, 600_011] {
        let mut g = vec![1.0f64; n];
        for i in (0..n).step_by(9_973) {
            g[i] = 2.0 + i as f64 / n as f64;
        }
        for k in [1_000, n / 3] {
            check_without_error(&g, k, &format!("dense ties, n {n}, k {k}"));
        }
    }
}

#[test]
fn ties_infinities_and_nan_are_ranked_deterministically() {
    // All equal magnitudes (signs alternate): the first k indices.
    let n = 10_000;
    let g: Vec<f64> = (0..n)
        .map(|i| if i % 2 == 0 { 0.5 } else { -0.5 })
        .collect();
    let got = topk_ef(&up(DType::F32, &[n], &g), None, 4321).unwrap();
    assert_eq!(ints(&got.indices), (0..4321).collect::<Vec<_>>());
    // Blocks of duplicates, +-inf and a NaN: NaN first, then the infinities, then ties
    // by index.
    let mut g: Vec<f64> = (0..n).map(|i| ((i * 7919) % 13) as f64).collect();
    g[77] = f64::INFINITY;
    g[5000] = f64::NEG_INFINITY;
    g[9999] = f64::NAN;
    for k in [1, 2, 3, 500, 777] {
        check_without_error(&g, k, &format!("duplicates k {k}"));
    }
    let got = topk_ef(&up(DType::F32, &[n], &g), None, 3).unwrap();
    assert_eq!(ints(&got.indices), vec![77, 5000, 9999]);
    // Ten runs: the same bits.
    let t = up(DType::F32, &[n], &g);
    let first = down(&topk_ef(&t, None, 999).unwrap().indices);
    for _ in 0..9 {
        assert_eq!(down(&topk_ef(&t, None, 999).unwrap().indices), first);
    }
}

#[test]
fn half_gradients_accumulate_in_f32() {
    let mut rng = Rng::new(2);
    let n = 20_011;
    for dtype in [DType::F16, DType::BF16] {
        let g = HostTensor::from_f64(dtype, vec![n], &rng.normals(n, 1.0))
            .unwrap()
            .to_f64();
        let e = HostTensor::from_f64(DType::F32, vec![n], &rng.normals(n, 0.3))
            .unwrap()
            .to_f64();
        let gt = match client().supports(dtype) {
            true => up(dtype, &[n], &g),
            false => {
                let h = HostTensor::from_f64(dtype, vec![n], &g).unwrap();
                let err = Tensor::upload(client(), &h)
                    .and_then(|t| topk_ef(&t, None, 1).map(|_| ()))
                    .unwrap_err();
                assert!(err.to_string().contains(&dtype.to_string()), "{err}");
                continue;
            }
        };
        let a = accumulate(&g, Some(&e));
        let got = topk_ef(&gt, Some(&up(DType::F32, &[n], &e)), 2000).unwrap();
        check(&got, &a, &magnitude_keys(&a), 2000, 1.0, &dtype.to_string());
        // Rand-k on the same half gradient: its subset from the permutation, values
        // scaled in f32.
        let et = up(DType::F32, &[n], &e);
        check_randk(&gt, Some(&et), &a, 2000, 7, &format!("randk {dtype}"));
    }
}

#[test]
fn error_feedback_conserves_the_gradient_sum() {
    // e_T + sum_t c_t = sum_t g_t (to f32 rounding): nothing is lost, only delayed.
    let mut rng = Rng::new(3);
    let (n, k, steps) = (5000usize, 50usize, 20);
    let mut error: Option<Tensor> = None;
    let (mut sent, mut total) = (vec![0.0f64; n], vec![0.0f64; n]);
    for _ in 0..steps {
        let g = rng.normals(n, 1.0);
        for (t, v) in total.iter_mut().zip(&g) {
            *t += (*v as f32) as f64;
        }
        let out = topk_ef(&up(DType::F32, &[n], &g), error.as_ref(), k).unwrap();
        for (i, v) in ints(&out.indices).into_iter().zip(down(&out.values)) {
            sent[i] += v;
        }
        error = Some(out.error);
    }
    let e = down(error.as_ref().unwrap());
    let kept: Vec<f64> = (0..n).map(|i| e[i] + sent[i]).collect();
    let worst = max_abs_error(&kept, &total);
    assert!(worst < 1e-4, "{worst:e}");
}

#[test]
fn randk_uses_the_shared_seed() {
    // A ragged size (keys one element a unit) and a multiple of 4 (four keys a unit).
    for n in [70_001, 70_000] {
        let (gt, et, a) = gradient_and_error(4, n);
        // Past n/2 the untaken are marked and the marks read inverted: both sides of
        // it, and k = n (nothing marked).
        for (k, seed) in [
            (1usize, 0u64),
            (700, 42),
            (n / 2, 3),
            (n / 2 + 1, 3),
            (n - 1, 5),
            (n, u64::MAX),
        ] {
            let what = format!("randk n {n} k {k} seed {seed}");
            let got = check_randk(&gt, Some(&et), &a, k, seed, &what);
            // Another worker with other values and the same seed picks the same subset.
            let other = randk(&et, None, k, seed).unwrap();
            assert_eq!(down(&other.indices), down(&got.indices));
        }
    }
}

#[test]
fn randk_subsets_differ_by_seed_and_are_uniform() {
    let (gt, _, _) = gradient_and_error(4, 70_001);
    assert_ne!(
        down(&randk(&gt, None, 700, 1).unwrap().indices),
        down(&randk(&gt, None, 700, 2).unwrap().indices)
    );
    // Over 400 seeds each of 64 coordinates is kept 400 * 8 / 64 = 50 times on average
    // (binomial sd 6.6): all within 5 sd.
    let (m, k) = (64usize, 8usize);
    let small = up(DType::F32, &[m], &vec![1.0; m]);
    let mut hits = vec![0usize; m];
    for seed in 0..400u64 {
        for i in ints(&randk(&small, None, k, seed).unwrap().indices) {
            hits[i] += 1;
        }
    }
    assert!(hits.iter().all(|&h| (17..=83).contains(&h)), "{hits:?}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let g = up(DType::F32, &[4, 5], &[0.5; 20]);
    let check = crate::common::assert_clear;
    check(
        topk_ef(&g, None, 0).err().unwrap(),
        &["k", "1 <= k <= 20", "0"],
    );
    check(randk(&g, None, 21, 0).err().unwrap(), &["k", "21"]);
    let short = up(DType::F32, &[19], &[0.0; 19]);
    check(
        topk_ef(&g, Some(&short), 3).err().unwrap(),
        &["error", "20 elements"],
    );
    let ints = Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::I32, vec![20], &[1.0; 20]).unwrap(),
    )
    .unwrap();
    check(
        topk_ef(&g, Some(&ints), 3).err().unwrap(),
        &["error", "i32"],
    );
    check(topk_ef(&ints, None, 3).err().unwrap(), &["grad", "i32"]);
    assert_eq!(down(&g), vec![0.5; 20]);
}

#[test]
fn per_layer_compression_errors_match_the_host() {
    let mut rng = Rng::new(6);
    let sizes = [1usize, 5000, 70_001];
    let densities = [0.001, 0.01, 0.1, 1.0];
    let layers: Vec<Vec<f64>> = sizes.iter().map(|&n| rng.normals(n, 1.0)).collect();
    let tensors: Vec<Tensor> = layers
        .iter()
        .map(|l| up(DType::F32, &[l.len()], l))
        .collect();
    let got = compression_errors(&tensors.iter().collect::<Vec<_>>(), &densities).unwrap();
    for (l, layer) in layers.iter().enumerate() {
        let a = accumulate(layer, None);
        let n = a.len();
        for (j, d) in densities.iter().enumerate() {
            let k = ((d * n as f64).ceil() as usize).clamp(1, n);
            let taken = reference_select(&magnitude_keys(&a), k);
            let mut keep = vec![true; n];
            for i in taken {
                keep[i] = false;
            }
            let want = (0..n)
                .filter(|&i| keep[i])
                .map(|i| (a[i] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let e = (got[l][j] - want).abs() / want.max(1e-30);
            assert!(
                e < 1e-5 || (want == 0.0 && got[l][j] == 0.0),
                "layer {l} density {d}: {} vs {want}",
                got[l][j]
            );
        }
    }
    assert_clear(
        compression_errors(&[&tensors[0]], &[0.0]).unwrap_err(),
        &["densities", "0"],
    );
}

#[test]
fn lgreco_plan_is_the_brute_force_optimum() {
    let mut rng = Rng::new(7);
    for trial in 0..40 {
        let (layers, levels) = (4usize, 3usize);
        let errors: Vec<Vec<f64>> = (0..layers)
            .map(|_| (0..levels).map(|_| rng.uniform()).collect())
            .collect();
        let sizes: Vec<Vec<usize>> = (0..layers)
            .map(|_| {
                (0..levels)
                    .map(|_| 1 + (rng.uniform() * 20.0) as usize)
                    .collect()
            })
            .collect();
        let budget = 10 + trial;
        let least: usize = sizes.iter().map(|s| *s.iter().min().unwrap()).sum();
        // Brute force over all 3^4 plans.
        let mut best: Option<(f64, Vec<usize>)> = None;
        for code in 0..levels.pow(layers as u32) {
            let plan: Vec<usize> = (0..layers)
                .map(|l| code / levels.pow(l as u32) % levels)
                .collect();
            let size: usize = plan.iter().enumerate().map(|(l, &c)| sizes[l][c]).sum();
            let err: f64 = plan
                .iter()
                .enumerate()
                .map(|(l, &c)| errors[l][c].powi(2))
                .sum();
            if size <= budget && best.as_ref().is_none_or(|(b, _)| err < *b) {
                best = Some((err, plan));
            }
        }
        match (lgreco_plan(&errors, &sizes, budget, budget), best) {
            (Ok(plan), Some((want, _))) => {
                let size: usize = plan.iter().enumerate().map(|(l, &c)| sizes[l][c]).sum();
                let err: f64 = plan
                    .iter()
                    .enumerate()
                    .map(|(l, &c)| errors[l][c].powi(2))
                    .sum();
                assert!(size <= budget, "trial {trial}: {size} > {budget}");
                assert!((err - want).abs() < 1e-12, "trial {trial}: {err} vs {want}");
            }
            (Err(e), None) => assert!(least > budget, "trial {trial}: {e}"),
            (got, want) => panic!("trial {trial}: {got:?} vs brute force {want:?}"),
        }
        // Coarse buckets: still within budget.
        if let Ok(plan) = lgreco_plan(&errors, &sizes, budget, 4) {
            let size: usize = plan.iter().enumerate().map(|(l, &c)| sizes[l][c]).sum();
            assert!(size <= budget);
        }
    }
    // Tables past the bound (a budget of usize::MAX in as many buckets would overflow
    // and allocate without end): refused by name.
    let e = lgreco_plan(&[vec![1.0]], &[vec![1]], usize::MAX, usize::MAX).unwrap_err();
    assert_clear(e, &["buckets", "at most"]);
}

#[test]
fn the_threshold_estimate_sends_about_k_and_everything_above_its_threshold() {
    use kiln::kernels::optim::topk_ef_estimated;
    use kiln::kernels::random::word;
    // A ragged size (read one element a unit) and a multiple of 4 (4-wide), with and
    // without an error state, and a half gradient (a = f32(g) + e); the threshold against
    // the host's selection from the same sample.
    let cases = [
        (
            200_003usize,
            true,
            DType::F32,
            vec![
                (2000usize, 20_000usize),
                (20_000, 50_000),
                (1, 1000),
                (5000, 200_003),
            ],
        ),
        (200_000, true, DType::F32, vec![(2000, 20_000), (1, 999)]),
        (200_000, false, DType::F32, vec![(2000, 20_001)]),
        (40_003, true, DType::F16, vec![(400, 4000)]),
        (40_000, false, DType::F16, vec![(400, 4000)]),
    ];
    for (n, with_error, dtype, runs) in cases {
        let mut rng = Rng::new(9);
        // g as the device holds it (rounded to its dtype).
        let g = HostTensor::from_f64(dtype, vec![n], &rng.normals(n, 1.0))
            .unwrap()
            .to_f64();
        let e = rng.normals(n, 0.3);
        let gt = up(dtype, &[n], &g);
        let et = up(DType::F32, &[n], &e);
        let a = accumulate(&g, with_error.then_some(&e[..]));
        let keys = magnitude_keys(&a);
        for (k, sample) in runs {
            let what = format!("n {n} {dtype:?} error {with_error} k {k} sample {sample}");
            let got = topk_ef_estimated(&gt, with_error.then_some(&et), k, sample, 11).unwrap();
            let idx = ints(&got.indices);
            let sent = idx.len();
            // Exactly the elements at or above the smallest key sent: a threshold cut.
            let threshold = idx.iter().map(|&i| keys[i]).min().unwrap();
            // That threshold is the round(k s / n)-th largest key of the seeded sample
            // (position j: the high word of Philox word (seed, stream 1, j) times n).
            let s = sample.min(n);
            let mut sampled: Vec<u32> = (0..s as u64)
                .map(|j| keys[((word(11, 1, j) as u64 * n as u64) >> 32) as usize])
                .collect();
            sampled.sort_unstable_by(|x, y| y.cmp(x));
            let k_sample = ((k as f64 * s as f64 / n as f64).round() as usize).clamp(1, s);
            assert_eq!(threshold, sampled[k_sample - 1], "{what}: threshold");
            let want: Vec<usize> = (0..n).filter(|&i| keys[i] >= threshold).collect();
            assert_eq!(idx, want, "{what}");
            check(&got, &a, &keys, sent, 1.0, &what);
            assert_eq!(reference_select(&keys, sent), want, "{what}");
            // About k: within 4 sd of the sample quantile's spread (sampling with
            // replacement).
            let sd = (k as f64 * (1.0 - k as f64 / n as f64) * n as f64 / sample as f64).sqrt();
            assert!(
                (sent as f64 - k as f64).abs() <= 4.0 * sd + n as f64 / sample as f64 + 1.0,
                "{what}: sent {sent}"
            );
        }
    }
    let (gt, _, _) = gradient_and_error(9, 1000);
    assert_clear(
        topk_ef_estimated(&gt, None, 10, 0, 1).err().unwrap(),
        &["sample"],
    );
}

/// EControl over five steps against the f64 reference (`p = eta e + g - h`,
/// `Δ = top-k(p)`, `e' = e + g - h - Δ`, `h' = h + Δ`), each step from the device's own
/// state (so a near-tie decided differently by an f32 backend cannot make the two runs
/// drift apart), on a ragged size spanning several selection cubes, at k = 1, 0.1 %,
/// 10 % and 50 %, half gradients, `eta` 0 and 1 as well as the papers' 0.1, from
/// `h = g_0` and from no state; and its invariant `e' + h' = e + g`.
#[test]
fn econtrol_steps_match_the_f64_reference() {
    let n = 9_001;
    for (k, eta, dtype, warm) in [
        (1usize, 0.1f32, DType::F32, true),
        (9, 0.1, DType::F32, false),
        (900, 0.1, DType::F16, true),
        (4_500, 1.0, DType::F32, false),
        (900, 0.0, DType::F32, true),
    ] {
        let mut rng = Rng::new(k as u64 + 7);
        let what = format!("k {k} eta {eta} {dtype} warm {warm}");
        let round = |v: Vec<f64>| down(&up(dtype, &[n], &v));
        let (mut e_dev, mut h_dev): (Option<Tensor>, Option<Tensor>) = (None, None);
        if warm {
            // The implementations' start: h = the first gradient, uncompressed.
            h_dev = Some(up(DType::F32, &[n], &round(rng.normals(n, 1.0))));
        }
        for step in 0..5 {
            let g = round(rng.normals(n, 1.0));
            let state = |t: &Option<Tensor>| t.as_ref().map_or(vec![0.0; n], down);
            let (mut e_ref, mut h_ref) = (state(&e_dev), state(&h_dev));
            let e_old = e_ref.clone();
            let out =
                econtrol(&up(dtype, &[n], &g), e_dev.as_ref(), h_dev.as_ref(), k, eta).unwrap();
            let (taken, values) = econtrol_step(&g, &mut e_ref, &mut h_ref, eta as f64, k);
            assert_eq!(ints(&out.indices), taken, "{what} step {step}: indices");
            let close = |got: &[f64], want: &[f64], name: &str| {
                // NaN-aware (a NaN on one side fails), relative above 1.
                let worst = max_rel_error(got, want, 1.0);
                // One step in f32: p and h' are three or four roundings of values up to ~4.
                assert!(worst < 2e-6, "{what} step {step}: {name} off by {worst:e}");
            };
            close(&down(&out.values), &values, "values");
            let (e_new, h_new) = (down(&out.error), down(&out.h));
            close(&e_new, &e_ref, "error");
            close(&h_new, &h_ref, "h");
            // What is not yet in h stays in e.
            let sums: Vec<f64> = (0..n).map(|i| e_old[i] + g[i]).collect();
            let got: Vec<f64> = (0..n).map(|i| e_new[i] + h_new[i]).collect();
            close(&got, &sums, "e' + h' against e + g");
            e_dev = Some(out.error);
            h_dev = Some(out.h);
        }
    }
}

#[test]
fn econtrol_through_the_sampled_bracket_matches_the_f64_reference() {
    // n >= 2^19: EControl's selection takes the sampled bracket. Values on a grid of
    // 2^-10 and eta = 1/2, so that p = eta e + g - h is exact in f32 and the f64
    // reference ranks the same keys (thousands of ties among them, to the lower index).
    let n = 524_291;
    let eta = 0.5f32;
    let grid =
        |v: Vec<f64>| -> Vec<f64> { v.iter().map(|x| (x * 1024.0).round() / 1024.0).collect() };
    let mut rng = Rng::new(17);
    for k in [5_243, n / 2] {
        assert!(bracket_pays(n, k));
        let (mut e_ref, mut h_ref) = (vec![0.0; n], grid(rng.normals(n, 1.0)));
        let (mut e_dev, mut h_dev) = (None::<Tensor>, Some(up(DType::F32, &[n], &h_ref)));
        for step in 0..2 {
            let g = grid(rng.normals(n, 1.0));
            let out = econtrol(
                &up(DType::F32, &[n], &g),
                e_dev.as_ref(),
                h_dev.as_ref(),
                k,
                eta,
            )
            .unwrap();
            let (taken, values) = econtrol_step(&g, &mut e_ref, &mut h_ref, eta as f64, k);
            let what = format!("k {k} step {step}");
            assert_eq!(ints(&out.indices), taken, "{what}: indices");
            for (got, want, name) in [
                (down(&out.values), values, "values"),
                (down(&out.error), e_ref.clone(), "error"),
                (down(&out.h), h_ref.clone(), "h"),
            ] {
                let worst = max_rel_error(&got, &want, 1.0);
                assert!(worst < 2e-6, "{what}: {name} off by {worst:e}");
            }
            // The f32 state carries on, as a training loop's would.
            e_ref = down(&out.error);
            h_ref = down(&out.h);
            e_dev = Some(out.error);
            h_dev = Some(out.h);
        }
    }
}

/// Infinite gradients: a sent +inf moves into `h` and leaves the error finite
/// (`(1 - eta) e`, not `inf - inf`); an unsent one (two infinities, k = 1: the lower
/// index is sent) stays in the error and leaves `h` as it was.
#[test]
fn econtrol_infinities_move_into_h_or_stay_in_the_error() {
    let inf = f64::INFINITY;
    let g = up(DType::F32, &[4], &[inf, inf, 1.0, -2.0]);
    let e = up(DType::F32, &[4], &[0.5, 0.0, 0.0, 0.0]);
    let out = econtrol(&g, Some(&e), None, 1, 0.5).unwrap();
    assert_eq!(ints(&out.indices), vec![0]);
    assert_eq!(down(&out.values), vec![inf]);
    assert_eq!(down(&out.error), vec![0.25, inf, 1.0, -2.0]);
    assert_eq!(down(&out.h), vec![inf, 0.0, 0.0, 0.0]);
}

#[test]
fn econtrol_bad_input_is_one_clear_line() {
    let g = up(DType::F32, &[4, 5], &[0.5; 20]);
    let h = up(DType::F32, &[19], &[0.0; 19]);
    assert_clear(
        econtrol(&g, None, Some(&h), 3, 0.1).err().unwrap(),
        &["h", "20 elements"],
    );
    assert_clear(
        econtrol(&g, None, None, 3, f32::NAN).err().unwrap(),
        &["eta", ">= 0", "NaN"],
    );
    assert_clear(
        econtrol(&g, None, None, 3, -0.5).err().unwrap(),
        &["eta", "-0.5"],
    );
    assert_clear(econtrol(&g, None, None, 0, 0.1).err().unwrap(), &["k", "0"]);
    assert_eq!(down(&g), vec![0.5; 20]);
}

/// Both layouts of the selection passes over every element (`UnitLayout`): a device runs
/// only its own, so each is forced here and checked against the host selection, on
/// multi-cube ragged lengths, one not a multiple of 4 (the 1-wide keys pass), magnitudes
/// near 1 (the keys pass counts the second digit: its pass is skipped) and near 1e12 (a
/// first digit it does not count under: the pass runs), and through the threshold
/// estimate (the passes over its sample).
#[test]
fn both_unit_layouts_select_the_reference_set() {
    use kiln::kernels::optim::topk_ef_estimated;
    use kiln::kernels::random::word;
    for (n, k) in [
        (100_003usize, 1_000usize),
        (100_004, 50_002),
        (70_001, 35_001),
        (65_540, 1),
    ] {
        let scale = if n % 2 == 0 { 1.0 } else { 1e12 };
        let mut rng = Rng::new(n as u64);
        let g = rng.normals(n, scale);
        let e = rng.normals(n, 0.3 * scale);
        let a = accumulate(&g, Some(&e));
        let keys = magnitude_keys(&a);
        let (gt, et) = (up(DType::F32, &[n], &g), up(DType::F32, &[n], &e));
        // The estimate's threshold: the round(k s / n)-th largest key of its sample.
        let (sample, seed) = (9_999usize, 5u64);
        let mut sampled: Vec<u32> = (0..sample as u64)
            .map(|j| keys[((word(seed, 1, j) as u64 * n as u64) >> 32) as usize])
            .collect();
        sampled.sort_unstable_by(|x, y| y.cmp(x));
        let k_sample = ((k * sample) as f64 / n as f64)
            .round()
            .clamp(1.0, sample as f64);
        let threshold = sampled[k_sample as usize - 1];
        let above: Vec<usize> = (0..n).filter(|&i| keys[i] >= threshold).collect();
        for layout in [UnitLayout::Contiguous, UnitLayout::Coalesced] {
            let what = format!("n {n}, k {k}, {layout:?}");
            with_unit_layout(layout, || {
                let got = topk_ef(&gt, Some(&et), k).unwrap();
                check(&got, &a, &keys, k, 1.0, &what);
                let got = topk_ef_estimated(&gt, Some(&et), k, sample, seed).unwrap();
                assert_eq!(ints(&got.indices), above, "{what}: estimate");
                check_randk(&gt, Some(&et), &a, k, seed, &format!("randk {what}"));
            });
        }
    }
}
