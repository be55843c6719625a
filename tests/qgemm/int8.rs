//! W8A8, per-token quantization and Double-Rounded int8 weights against f64; the
//! rounding mode; NaN and infinities in `quantize_per_token`.

use super::*;

#[test]
fn w8a8_matches_f64_on_ragged_shapes() {
    let mut rng = Rng::new(11);
    // K = 77: rows are not word-aligned; N = 37 and M = 70 are no tile's multiple.
    for (m, n, k) in [(1, 37, 77), (5, 130, 320), (70, 37, 77), (33, 64, 1)] {
        let xq = ints(&mut rng, m * k, -128, 127);
        let wq = ints(&mut rng, n * k, -128, 127);
        let sx: Vec<f64> = (0..m).map(|_| 0.01 + rng.uniform() * 0.02).collect();
        let sw: Vec<f64> = (0..n).map(|_| 0.01 + rng.uniform() * 0.02).collect();
        let bias = rounded(DType::F32, &rng.normals(n, 1.0));
        let (sx, sw) = (rounded(DType::F32, &sx), rounded(DType::F32, &sw));
        for with_bias in [false, true] {
            let want = qr::w8a8(&xq, &sx, &wq, &sw, with_bias.then_some(&bias[..]), m, n, k);
            for out in [DType::F32, DType::F16] {
                let b = up(DType::F32, &[n], &bias);
                let y = qgemm::w8a8(
                    &up(DType::I8, &[m, k], &xq),
                    &up(DType::F32, &[m], &sx),
                    &up(DType::I8, &[n, k], &wq),
                    &up(DType::F32, &[n], &sw),
                    with_bias.then_some(&b),
                    out,
                )
                .unwrap();
                assert_eq!(y.dtype(), out);
                let err = mean_rel(&y.download().unwrap().to_f64(), &want);
                let tol = if out == DType::F32 { 1e-6 } else { 1e-3 };
                assert!(
                    err < tol,
                    "M={m} N={n} K={k} bias={with_bias} {out}: {err:e}"
                );
            }
        }
    }
}

/// `path` pins W8A8's kernel: every path the problem has gives the f64 result (bit for
/// bit the same `y`: the sums are exact and the epilogue is shared); one it does not have
/// is refused by name: the GEMV past 64 rows and the direct kernel on unaligned K as a
/// `path` parameter error listing the paths there are, tensor cores without int8 ones
/// (or K not a multiple of 16) as unsupported, which the self-test reports as a skip.
#[test]
fn w8a8_path_pins_the_kernel_and_refuses_a_missing_one_by_name() {
    use kiln::kernels::qgemm::Path;
    let mut rng = Rng::new(13);
    let run = |m: usize, n: usize, k: usize, path: Option<Path>, rng: &mut Rng| {
        let ops = W8a8Operands::new(rng, m, n, k);
        let y = qgemm::w8a8_on(&ops.xq, &ops.sx, &ops.wq, &ops.sw, None, DType::F32, path)?;
        Ok::<_, kiln::Error>((y.download().unwrap().to_f64(), ops.want(false)))
    };
    let mut outputs = Vec::new();
    for path in [Path::Gemv, Path::Tiled, Path::Direct] {
        let (got, want) = run(9, 40, 96, Some(path), &mut Rng::new(17)).unwrap();
        assert!(mean_rel(&got, &want) < 1e-6, "{path:?}");
        outputs.push(got);
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "paths differ");
    // Missing paths, by name.
    let e = run(70, 8, 16, Some(Path::Gemv), &mut rng)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("path") && e.contains("gemv") && e.contains("tiled"),
        "{e}"
    );
    let e = run(3, 8, 77, Some(Path::Direct), &mut rng)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("path") && e.contains("direct") && e.contains("K = 77"),
        "{e}"
    );
    if !client().report().int8_tensor_cores {
        let e = run(9, 40, 96, Some(Path::TensorCore), &mut rng).unwrap_err();
        assert!(matches!(e, kiln::Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("int8 tensor cores"), "{e}");
    }
    let e = run(9, 40, 84, Some(Path::TensorCore), &mut rng)
        .unwrap_err()
        .to_string();
    assert!(e.contains("K a multiple of 16"), "{e}");
    // Through `kiln run`'s parameter: a name it does not know.
    let e = Path::parse("fastest").unwrap_err().to_string();
    assert!(
        e.contains("path") && e.contains("tensor_cores") && e.contains("fastest"),
        "{e}"
    );
}

#[test]
fn w8a8_conformance_vector() {
    let t = load_safetensors(data("w8a8_f32.safetensors")).unwrap();
    let out = kiln::kernels::op("w8a8")
        .unwrap()
        .call_host(client(), &t, BTreeMap::new())
        .unwrap();
    let err = mean_rel(&out["y"].to_f64(), &t["expected_y"].to_f64());
    assert!(err < 1e-6, "{err:e}");
}

#[test]
fn quantize_per_token_matches_the_reference_and_feeds_w8a8() {
    let mut rng = Rng::new(12);
    let (m, k, n) = (6, 203, 45);
    let mut x = rounded(DType::F32, &rng.normals(m * k, 2.0));
    x[k..2 * k].fill(0.0); // an all-zero row: scale 0, codes 0
    x[2 * k + 5] = 1e4; // a row dominated by one outlier
    for dtype in [DType::F32, DType::F16] {
        let xr = rounded(dtype, &x);
        let (xq, sx) = qgemm::quantize_per_token(&up(dtype, &[m, k], &xr)).unwrap();
        assert_eq!((xq.dtype(), sx.dtype()), (DType::I8, DType::F32));
        let xf: Vec<f32> = xr.iter().map(|&v| v as f32).collect();
        let (wq_ref, ws_ref) = qr::quantize_per_token(&xf, m, k);
        let got_q = xq.download().unwrap().to_f64();
        let got_s = sx.download().unwrap().to_f64();
        for i in 0..m {
            assert_eq!(got_s[i], ws_ref[i] as f64, "{dtype} sx[{i}]");
        }
        for i in 0..m * k {
            assert_eq!(
                got_q[i], wq_ref[i] as f64,
                "{dtype} xq[{i}] of x = {}",
                xf[i]
            );
        }
        assert!(got_q.iter().all(|&q| (-127.0..=127.0).contains(&q)));
        // End to end: x @ w^T through int8 stays within int8's resolution.
        let w = rounded(DType::F32, &rng.normals(n * k, 1.0));
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let (wq, sw) = qr::quantize_per_token(&wf, n, k);
        let to64 = |v: &[i8]| v.iter().map(|&q| q as f64).collect::<Vec<_>>();
        let y = qgemm::w8a8(
            &xq,
            &sx,
            &up(DType::I8, &[n, k], &to64(&wq)),
            &up(
                DType::F32,
                &[n],
                &sw.iter().map(|&s| s as f64).collect::<Vec<_>>(),
            ),
            None,
            DType::F32,
        )
        .unwrap();
        let mut wt = vec![0.0; k * n];
        for r in 0..n {
            for c in 0..k {
                wt[c * n + r] = w[r * k + c];
            }
        }
        let exact = qr::matmul(&xr, &wt, m, k, n);
        assert!(mean_rel(&y.download().unwrap().to_f64(), &exact) < 0.03);
    }
}

#[test]
fn w8_bits_every_width_matches_double_rounding_in_f64() {
    let mut rng = Rng::new(13);
    // Every int8 code appears, so every tie of every shift is exercised.
    let (n, k) = (37, 77);
    let mut q8 = ints(&mut rng, k * n, -128, 127);
    for (i, v) in q8.iter_mut().take(256).enumerate() {
        *v = i as f64 - 128.0;
    }
    let s8 = rounded(
        DType::F32,
        &(0..n)
            .map(|_| 0.01 + 0.01 * rng.uniform())
            .collect::<Vec<_>>(),
    );
    let q8i: Vec<i8> = q8.iter().map(|&v| v as i8).collect();
    let qt = up(DType::I8, &[k, n], &q8);
    let st = up(DType::F32, &[n], &s8);
    for bits in [8, 6, 4, 2] {
        let w = qr::w8_bits_weight(&q8i, &s8, k, n, bits);
        for dtype in [DType::F32, DType::F16] {
            for m in [1, 5, 70] {
                let x = rounded(dtype, &rng.normals(m * k, 1.0));
                let want = qr::matmul(&x, &w, m, k, n);
                let y = qgemm::w8_bits(&up(dtype, &[m, k], &x), &qt, &st, bits).unwrap();
                let err = mean_rel(&y.download().unwrap().to_f64(), &want);
                assert!(err < bar(dtype), "bits={bits} {dtype} M={m}: {err:e}");
            }
        }
    }
}

/// Half away from zero instead of ties to even would change these: a test that can
/// fail for the documented rounding mode.
#[test]
fn double_rounding_ties_go_to_even() {
    // q8 = 96 at 2 bits: 96 / 64 = 1.5 -> 2 -> clamped to 1; q8 = 32: 0.5 -> 0 (even),
    // half away would give 1. q8 = -32: -0.5 -> 0.
    let (k, n) = (3, 1);
    let q8 = [32.0, -32.0, 96.0];
    let y = qgemm::w8_bits(
        &up(DType::F32, &[1, k], &[1.0, 10.0, 100.0]),
        &up(DType::I8, &[k, n], &q8),
        &up(DType::F32, &[n], &[1.0]),
        2,
    )
    .unwrap();
    // 1 * 0 * 64 + 10 * 0 * 64 + 100 * 1 * 64
    assert_eq!(y.download().unwrap().to_f64(), vec![6400.0]);
}

#[test]
fn quantize_per_token_propagates_nan_and_keeps_the_sign_of_infinities() {
    // Row 0: a NaN -> scale NaN, codes 0 (the row dequantizes to NaN). Row 1: +inf ->
    // scale inf, code +127 there (not -127), 0 elsewhere. Row 2: -inf -> -127. Row 3:
    // both infinities and a NaN -> NaN scale. Row 4: ordinary values, untouched.
    let (m, k) = (5, 37);
    let mut rng = Rng::new(21);
    let mut x = rounded(DType::F32, &rng.normals(m * k, 1.0));
    x[3] = f64::NAN;
    x[k + 7] = f64::INFINITY;
    x[2 * k + 11] = f64::NEG_INFINITY;
    x[3 * k] = f64::INFINITY;
    x[3 * k + 1] = f64::NEG_INFINITY;
    x[3 * k + 2] = f64::NAN;
    for dtype in [DType::F32, DType::F16] {
        let (xq, sx) = qgemm::quantize_per_token(&up(dtype, &[m, k], &x)).unwrap();
        let xf: Vec<f32> = rounded(dtype, &x).iter().map(|&v| v as f32).collect();
        let (q_ref, s_ref) = qr::quantize_per_token(&xf, m, k);
        let got_q = xq.download().unwrap().to_f64();
        let got_s = sx.download().unwrap().to_f64();
        for i in 0..m {
            let (g, w) = (got_s[i], s_ref[i] as f64);
            assert!(
                g == w || (g.is_nan() && w.is_nan()),
                "{dtype} sx[{i}]: {g} vs {w}"
            );
        }
        assert!(got_s[0].is_nan() && got_s[3].is_nan(), "{dtype}: NaN rows");
        assert!(got_s[1].is_infinite() && got_s[2].is_infinite());
        assert_eq!(got_q[k + 7], 127.0, "{dtype}: +inf keeps its sign");
        assert_eq!(got_q[2 * k + 11], -127.0, "{dtype}: -inf");
        for i in 0..m * k {
            assert_eq!(
                got_q[i], q_ref[i] as f64,
                "{dtype} xq[{i}] of x = {}",
                xf[i]
            );
        }
    }
}
