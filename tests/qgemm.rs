//! Quantized GEMMs against dequantize-then-multiply in f64 (the spec's reference), on
//! the checkpoint formats written by the tests' own Python-free packer and by
//! PyTorch's (the conformance vectors); bad input.
//!
//! Bars (Marlin's measure, mean|Y - Y_ref| / mean|Y_ref|): 1e-3 in f16, 1e-5 in f32.
//!
//! Longer than most files on purpose: one suite for the quantized-GEMM family, whose
//! cases share the checkpoint packers and fixtures defined at the top.

mod common;

use common::data;
use kiln::check::Rng;
use kiln::kernels::qgemm::{
    self, reference as qr, reference::W4Codes, FlexRoundInputs, W4Format, W4Weights,
};
use kiln::{load_safetensors, DType, Error, HostTensor, Tensor};
use std::collections::BTreeMap;

/// The device, with autotuning off in this binary: M <= 64 runs the GEMV kernel, larger
/// M the tiled one (`tests/qgemm_tune.rs` tunes and validates every candidate).
fn client() -> &'static kiln::Client {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("KILN_AUTOTUNE", "off"));
    common::client()
}

fn up(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::upload(
        client(),
        &HostTensor::from_f64(dtype, shape.to_vec(), v).unwrap(),
    )
    .unwrap()
}

fn up_i32(shape: &[usize], v: &[i32]) -> Tensor {
    let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    up(DType::I32, shape, &f)
}

fn rounded(dtype: DType, v: &[f64]) -> Vec<f64> {
    HostTensor::from_f64(dtype, vec![v.len()], v)
        .unwrap()
        .to_f64()
}

/// Marlin's error measure.
fn mean_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).abs()).sum();
    let den: f64 = want.iter().map(|w| w.abs()).sum();
    num / den
}

fn bar(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-3
    }
}

/// A random [K, N] weight quantized per group; scales rounded to `dtype` as stored.
fn codes(rng: &mut Rng, k: usize, n: usize, group: usize, dtype: DType) -> W4Codes {
    let w = rng.normals(k * n, 0.05);
    let mut c = W4Codes::quantize(&w, k, n, group);
    c.s = rounded(dtype, &c.s);
    c
}

/// The checkpoint tensors of `c` in `format`.
struct Ckpt {
    qweight: Tensor,
    scales: Tensor,
    qzeros: Option<Tensor>,
}

fn checkpoint(c: &W4Codes, format: W4Format, dtype: DType, zeros: bool) -> Ckpt {
    let groups = c.k / c.group_size;
    let (qweight, qzeros) = match format {
        W4Format::Awq => (
            up_i32(&[c.k, c.n / 8], &c.awq_qweight()),
            zeros.then(|| up_i32(&[groups, c.n / 8], &c.qzeros("awq", 0))),
        ),
        W4Format::Gptq { version } => (
            up_i32(&[c.k / 8, c.n], &c.gptq_qweight()),
            zeros.then(|| up_i32(&[groups, c.n / 8], &c.qzeros("gptq", version))),
        ),
        W4Format::Kiln => (
            up_i32(&[c.k / 8, c.n], &c.gptq_qweight()),
            Some(up(
                DType::F32,
                &[groups, c.n],
                &c.z.iter().map(|&z| z as f64).collect::<Vec<_>>(),
            )),
        ),
    };
    let sdt = if format == W4Format::Kiln {
        DType::F32
    } else {
        dtype
    };
    Ckpt {
        qweight,
        scales: up(sdt, &[groups, c.n], &c.s),
        qzeros,
    }
}

fn weights<'a>(
    ck: &'a Ckpt,
    format: W4Format,
    group: i64,
    g_idx: Option<&'a Tensor>,
) -> W4Weights<'a> {
    W4Weights {
        format,
        qweight: &ck.qweight,
        scales: &ck.scales,
        qzeros: ck.qzeros.as_ref(),
        g_idx,
        group_size: group,
    }
}

/// One W4A16 case against f64: returns the error.
#[allow(clippy::too_many_arguments)]
fn w4_case(
    format: W4Format,
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    group: i64,
    zeros: bool,
    seed: u64,
) -> f64 {
    let mut rng = Rng::new(seed);
    let g = if group < 0 { k } else { group as usize };
    let mut c = codes(&mut rng, k, n, g, dtype);
    if !zeros {
        c.z.fill(8);
    }
    let x = rounded(dtype, &rng.normals(m * k, 1.0));
    let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
    let ck = checkpoint(&c, format, dtype, zeros);
    let y = qgemm::w4a16(&up(dtype, &[m, k], &x), &weights(&ck, format, group, None)).unwrap();
    assert_eq!(y.dtype(), dtype);
    assert_eq!(y.shape(), &[m, n]);
    mean_rel(&y.download().unwrap().to_f64(), &want)
}

#[test]
fn w4a16_every_format_dtype_and_path_matches_f64() {
    let formats = [
        W4Format::Gptq { version: 1 },
        W4Format::Gptq { version: 2 },
        W4Format::Awq,
        W4Format::Kiln,
    ];
    let mut seed = 1;
    for dtype in [DType::F32, DType::F16] {
        for format in formats {
            // M = 1 and 5 (GEMV), 70 (tiled); N = 72 not a multiple of any tile.
            for (m, n, k, group) in [
                (1, 72, 256, 32),
                (5, 40, 192, 64),
                (70, 72, 256, 128),
                (3, 24, 200, -1),
            ] {
                seed += 1;
                let err = w4_case(format, dtype, m, n, k, group, true, seed);
                assert!(
                    err < bar(dtype),
                    "{format:?} {dtype} M={m} N={n} K={k} G={group}: {err:e}"
                );
            }
        }
    }
}

#[test]
fn w4a16_symmetric_checkpoints_use_zero_point_eight_and_any_n() {
    for (format, n) in [
        (W4Format::Gptq { version: 1 }, 37),
        (W4Format::Awq, 16),
        (W4Format::Gptq { version: 2 }, 130),
    ] {
        for m in [1, 9, 67] {
            let err = w4_case(format, DType::F32, m, n, 128, 64, false, 40 + m as u64);
            assert!(err < 1e-5, "{format:?} N={n} M={m}: {err:e}");
        }
    }
}

/// GPTQ v1 stores z - 1: reading a v2 checkpoint as v1 shifts every zero point by one,
/// and must be visibly wrong (the offset is applied, and applied only to v1).
#[test]
fn gptq_zero_offset_distinguishes_v1_from_v2() {
    let mut rng = Rng::new(5);
    let (m, n, k) = (4, 16, 64);
    let c = codes(&mut rng, k, n, 32, DType::F32);
    let x = rng.normals(m * k, 1.0);
    let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
    let xt = up(DType::F32, &[m, k], &x);
    for (stored, read, ok) in [(1, 1, true), (2, 2, true), (2, 1, false), (1, 2, false)] {
        let ck = checkpoint(&c, W4Format::Gptq { version: stored }, DType::F32, true);
        let y = qgemm::w4a16(
            &xt,
            &weights(&ck, W4Format::Gptq { version: read }, 32, None),
        )
        .unwrap();
        let err = mean_rel(&y.download().unwrap().to_f64(), &want);
        assert_eq!(err < 1e-5, ok, "stored v{stored}, read v{read}: {err:e}");
    }
}

/// AWQ's nibble order: the same codes packed in GPTQ's sequential column order and
/// read as AWQ must be wrong; packed in AWQ's order, right.
#[test]
fn awq_nibble_order_is_applied() {
    let mut rng = Rng::new(6);
    let (m, n, k) = (2, 16, 64);
    let c = codes(&mut rng, k, n, 64, DType::F32);
    let x = rng.normals(m * k, 1.0);
    let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
    let xt = up(DType::F32, &[m, k], &x);
    let ck = checkpoint(&c, W4Format::Awq, DType::F32, true);
    let good = qgemm::w4a16(&xt, &weights(&ck, W4Format::Awq, 64, None)).unwrap();
    assert!(mean_rel(&good.download().unwrap().to_f64(), &want) < 1e-5);
    // Sequential order: pack the transposed problem the GPTQ way along N.
    let seq: Vec<i32> = {
        let mut out = vec![0u32; k * n / 8];
        for r in 0..k {
            for col in 0..n {
                out[r * (n / 8) + col / 8] |= (c.q[r * n + col] as u32) << (4 * (col % 8));
            }
        }
        out.into_iter().map(|w| w as i32).collect()
    };
    let wrong = Ckpt {
        qweight: up_i32(&[k, n / 8], &seq),
        scales: up(DType::F32, &[1, n], &c.s),
        qzeros: ck.qzeros.clone(),
    };
    let bad = qgemm::w4a16(&xt, &weights(&wrong, W4Format::Awq, 64, None)).unwrap();
    assert!(mean_rel(&bad.download().unwrap().to_f64(), &want) > 1e-2);
}

#[test]
fn w4a16_act_order_g_idx_matches_f64() {
    let mut rng = Rng::new(8);
    let (n, k, g) = (24, 256, 32);
    let groups = k / g;
    let c = codes(&mut rng, k, n, g, DType::F32);
    // Rows visit groups in a shuffled order, as act-order checkpoints do.
    let g_idx: Vec<usize> = (0..k).map(|r| (r * 5 + r / 7) % groups).collect();
    for m in [1, 3, 80] {
        let x = rng.normals(m * k, 1.0);
        let want = qr::matmul(&x, &c.dequantize(Some(&g_idx)), m, k, n);
        let gi = up_i32(&[k], &g_idx.iter().map(|&v| v as i32).collect::<Vec<_>>());
        for format in [W4Format::Gptq { version: 2 }, W4Format::Awq] {
            let ck = checkpoint(&c, format, DType::F32, true);
            let y = qgemm::w4a16(
                &up(DType::F32, &[m, k], &x),
                &weights(&ck, format, g as i64, Some(&gi)),
            )
            .unwrap();
            let err = mean_rel(&y.download().unwrap().to_f64(), &want);
            assert!(err < 1e-5, "{format:?} M={m}: {err:e}");
        }
    }
}

#[test]
fn repack_once_then_run_packed() {
    let mut rng = Rng::new(9);
    let (m, n, k) = (6, 32, 128);
    let c = codes(&mut rng, k, n, 32, DType::F16);
    let ck = checkpoint(&c, W4Format::Awq, DType::F16, true);
    let packed = qgemm::w4a16_repack(&weights(&ck, W4Format::Awq, 32, None)).unwrap();
    assert_eq!(
        packed.qweight.download().unwrap().to_f64(),
        c.gptq_qweight()
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        packed.qzeros.download().unwrap().to_f64(),
        c.z.iter().map(|&v| v as f64).collect::<Vec<_>>()
    );
    assert_eq!(packed.scales.download().unwrap().to_f64(), c.s);
    let x = rounded(DType::F16, &rng.normals(m * k, 1.0));
    let y = qgemm::w4a16_packed(&up(DType::F16, &[m, k], &x), &packed).unwrap();
    let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
    assert!(mean_rel(&y.download().unwrap().to_f64(), &want) < 1e-3);
    // Leading dimensions of x are kept.
    let y3 = qgemm::w4a16_packed(&up(DType::F16, &[2, 3, k], &x), &packed).unwrap();
    assert_eq!(y3.shape(), &[2, 3, n]);
}

/// PyTorch's vectors (vLLM's and AutoAWQ's packing): our packer writes the same
/// words from the true codes, our reference reproduces expected_y, and so does
/// `kiln run w4a16` through the registry.
#[test]
fn w4a16_conformance_vectors() {
    for (file, format, version, group) in [
        ("w4a16_gptq_v1_g32", "gptq", 1, 32),
        ("w4a16_gptq_v2_g64", "gptq", 2, 64),
        ("w4a16_awq_g128", "awq", 1, 128),
    ] {
        let t = load_safetensors(data(&format!("{file}.safetensors"))).unwrap();
        let (k, n) = (t["unpacked_q"].shape[0], t["unpacked_q"].shape[1]);
        let c = W4Codes {
            k,
            n,
            group_size: group,
            q: t["unpacked_q"].to_f64().iter().map(|&v| v as u8).collect(),
            z: t["unpacked_z"].to_f64().iter().map(|&v| v as u8).collect(),
            s: t["scales"].to_f64(),
        };
        let words = |v: Vec<i32>| v.iter().map(|&w| w as f64).collect::<Vec<_>>();
        let (qw, qz) = match format {
            "awq" => (c.awq_qweight(), c.qzeros("awq", 0)),
            _ => (c.gptq_qweight(), c.qzeros("gptq", version)),
        };
        assert_eq!(words(qw), t["qweight"].to_f64(), "{file}: qweight packing");
        assert_eq!(words(qz), t["qzeros"].to_f64(), "{file}: qzeros packing");
        let x = t["x"].to_f64();
        let m = t["x"].shape[0];
        let want = t["expected_y"].to_f64();
        let ours = qr::matmul(&x, &c.dequantize(None), m, k, n);
        assert!(mean_rel(&ours, &want) < 1e-6, "{file}: reference");
        let params = BTreeMap::from([
            ("format".to_string(), format.to_string()),
            ("group_size".to_string(), group.to_string()),
            ("gptq_version".to_string(), version.to_string()),
        ]);
        let out = kiln::kernels::op("w4a16")
            .unwrap()
            .call_host(client(), &t, params)
            .unwrap();
        assert_eq!(out["y"].dtype, DType::F16);
        let err = mean_rel(&out["y"].to_f64(), &want);
        assert!(err < 1e-3, "{file}: kernel {err:e}");
    }
}

fn ints(rng: &mut Rng, n: usize, lo: i32, hi: i32) -> Vec<f64> {
    (0..n)
        .map(|_| (lo + (rng.uniform() * (hi - lo + 1) as f64) as i32).min(hi) as f64)
        .collect()
}

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

fn flex_case(rng: &mut Rng, rows: usize, cols: usize, dtype: DType) -> qr::FlexRound {
    let r = |rng: &mut Rng, n: usize, lo: f64, hi: f64| {
        rounded(
            dtype,
            &(0..n)
                .map(|_| lo + (hi - lo) * rng.uniform())
                .collect::<Vec<_>>(),
        )
    };
    qr::FlexRound {
        rows,
        cols,
        w: rounded(dtype, &rng.normals(rows * cols, 1.0)),
        s1: rounded(dtype, &[0.17])[0],
        s2: r(rng, rows * cols, 0.7, 1.3),
        s3: r(rng, rows, 0.8, 1.2),
        s4: r(rng, cols, 0.8, 1.2),
        qmin: -8.0,
        qmax: 7.0,
    }
}

#[test]
fn flexround_forward_and_backward_match_f64() {
    let mut rng = Rng::new(14);
    for (rows, cols) in [(3, 5), (37, 300), (70, 1)] {
        for dtype in [DType::F32, DType::F16] {
            let f = flex_case(&mut rng, rows, cols, dtype);
            let g = rounded(dtype, &rng.normals(rows * cols, 1.0));
            let t = |shape: &[usize], v: &[f64]| up(dtype, shape, v);
            let (w, s1, s2, s3, s4) = (
                t(&[rows, cols], &f.w),
                t(&[1], &[f.s1]),
                t(&[rows, cols], &f.s2),
                t(&[rows], &f.s3),
                t(&[cols], &f.s4),
            );
            let inp = FlexRoundInputs {
                w: &w,
                s1: &s1,
                s2: &s2,
                s3: &s3,
                s4: &s4,
                qmin: -8.0,
                qmax: 7.0,
            };
            let wq = qgemm::flexround(&inp).unwrap().download().unwrap().to_f64();
            let want = f.forward();
            let tol = if dtype == DType::F32 { 1e-6 } else { 2e-3 };
            // Codes must agree exactly; values to one rounding of the dtype.
            for i in 0..rows * cols {
                assert!(
                    (wq[i] - want[i]).abs() <= tol * f.s1 * 8.0,
                    "{dtype} wq[{i}]: {} vs {}",
                    wq[i],
                    want[i]
                );
            }
            let grads = qgemm::flexround_backward(&inp, &t(&[rows, cols], &g)).unwrap();
            let r = f.backward(&g);
            for (name, got, want) in [
                ("dw", &grads.dw, r.dw.clone()),
                ("ds1", &grads.ds1, vec![r.ds1]),
                ("ds2", &grads.ds2, r.ds2.clone()),
                ("ds3", &grads.ds3, r.ds3.clone()),
                ("ds4", &grads.ds4, r.ds4.clone()),
            ] {
                // ds1, ds3 and ds4 are sums of up to 300 terms of both signs.
                let reduced = !matches!(name, "dw" | "ds2");
                let gtol = match (dtype, reduced) {
                    (DType::F32, false) => 1e-5,
                    (DType::F32, true) => 1e-4,
                    _ => 5e-3,
                };
                let err = mean_rel(&got.download().unwrap().to_f64(), &want);
                assert!(err < gtol, "{dtype} [{rows}, {cols}] {name}: {err:e}");
            }
        }
    }
}

fn expect_err<T: std::fmt::Debug>(r: kiln::Result<T>, needle: &str) {
    let e = r.expect_err("must fail").to_string();
    assert!(e.contains(needle), "`{e}` should mention `{needle}`");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let mut rng = Rng::new(15);
    let (m, n, k) = (2, 16, 128);
    let c = codes(&mut rng, k, n, 64, DType::F32);
    let ck = checkpoint(&c, W4Format::Gptq { version: 1 }, DType::F32, true);
    let x = up(DType::F32, &[m, k], &rng.normals(m * k, 1.0));
    let gptq = W4Format::Gptq { version: 1 };
    // group size not allowed, and K not a multiple of it
    expect_err(
        qgemm::w4a16(&x, &weights(&ck, gptq, 48, None)),
        "group_size",
    );
    let x96 = up(DType::F32, &[m, 96], &rng.normals(m * 96, 1.0));
    let ck96 = Ckpt {
        qweight: up_i32(&[12, n], &vec![0; 12 * n]),
        scales: up(DType::F32, &[1, n], &vec![1.0; n]),
        qzeros: None,
    };
    expect_err(
        qgemm::w4a16(&x96, &weights(&ck96, gptq, 64, None)),
        "multiple of the group size",
    );
    // scales of the wrong shape
    let bad_scales = Ckpt {
        scales: up(DType::F32, &[3, n], &vec![1.0; 3 * n]),
        ..checkpoint(&c, gptq, DType::F32, true)
    };
    expect_err(
        qgemm::w4a16(&x, &weights(&bad_scales, gptq, 64, None)),
        "scales",
    );
    // x's K disagrees with qweight's
    let x_bad = up(DType::F32, &[m, k - 8], &rng.normals(m * (k - 8), 1.0));
    expect_err(
        qgemm::w4a16(&x_bad, &weights(&ck, gptq, 64, None)),
        "tensor `x`",
    );
    // ... also where the group size would not divide x's K: x is named, not group_size
    let x100 = up(DType::F32, &[m, 100], &rng.normals(m * 100, 1.0));
    expect_err(
        qgemm::w4a16(&x100, &weights(&ck, gptq, 64, None)),
        "tensor `x`: expected shape [..., 128]",
    );
    // GPTQ tensors declared as AWQ: the layout is named, not the group size
    expect_err(
        qgemm::w4a16(&x, &weights(&ck, W4Format::Awq, 64, None)),
        "which is GPTQ's [K/8, N] (format gptq)",
    );
    // qzeros of the wrong shape, qweight of the wrong dtype
    let bad_z = Ckpt {
        qzeros: Some(up_i32(&[2, n], &vec![0; 2 * n])),
        ..checkpoint(&c, gptq, DType::F32, true)
    };
    expect_err(qgemm::w4a16(&x, &weights(&bad_z, gptq, 64, None)), "qzeros");
    let bad_q = Ckpt {
        qweight: up(DType::F32, &[k / 8, n], &vec![0.0; k / 8 * n]),
        ..checkpoint(&c, gptq, DType::F32, true)
    };
    expect_err(
        qgemm::w4a16(&x, &weights(&bad_q, gptq, 64, None)),
        "qweight",
    );
    // g_idx out of range
    let gi = up_i32(&[k], &vec![5; k]);
    expect_err(
        qgemm::w4a16(&x, &weights(&ck, gptq, 64, Some(&gi))),
        "g_idx",
    );
    // parameters
    expect_err(W4Format::parse("gptq", 3), "gptq_version");
    expect_err(W4Format::parse("marlin", 1), "format");
    // W8A8: K mismatch, scale shape, dtype
    let i8t = |s: &[usize]| up(DType::I8, s, &vec![1.0; s.iter().product()]);
    let f32t = |s: &[usize]| up(DType::F32, s, &vec![1.0; s.iter().product()]);
    expect_err(
        qgemm::w8a8(
            &i8t(&[2, 8]),
            &f32t(&[2]),
            &i8t(&[3, 9]),
            &f32t(&[3]),
            None,
            DType::F32,
        ),
        "wq",
    );
    expect_err(
        qgemm::w8a8(
            &i8t(&[2, 8]),
            &f32t(&[3]),
            &i8t(&[3, 8]),
            &f32t(&[3]),
            None,
            DType::F32,
        ),
        "sx",
    );
    expect_err(
        qgemm::w8a8(
            &f32t(&[2, 8]),
            &f32t(&[2]),
            &i8t(&[3, 8]),
            &f32t(&[3]),
            None,
            DType::F32,
        ),
        "xq",
    );
    expect_err(
        qgemm::w8a8(
            &i8t(&[2, 8]),
            &f32t(&[2]),
            &i8t(&[3, 8]),
            &f32t(&[3]),
            Some(&f32t(&[4])),
            DType::F32,
        ),
        "bias",
    );
    expect_err(
        qgemm::w8a8(
            &i8t(&[2, 8]),
            &f32t(&[2]),
            &i8t(&[3, 8]),
            &f32t(&[3]),
            None,
            DType::I32,
        ),
        "out_dtype",
    );
    // w8_bits: bits, shapes
    expect_err(
        qgemm::w8_bits(&f32t(&[2, 8]), &i8t(&[8, 3]), &f32t(&[3]), 3),
        "bits",
    );
    expect_err(
        qgemm::w8_bits(&f32t(&[2, 8]), &i8t(&[8, 3]), &f32t(&[4]), 4),
        "s8",
    );
    expect_err(
        qgemm::w8_bits(&f32t(&[2, 7]), &i8t(&[8, 3]), &f32t(&[3]), 4),
        "tensor `x`",
    );
    // flexround: s3 of the wrong length, qmin > qmax
    let (w, s1, s2, s4) = (f32t(&[4, 5]), f32t(&[1]), f32t(&[4, 5]), f32t(&[5]));
    let s3 = f32t(&[3]);
    let inp = FlexRoundInputs {
        w: &w,
        s1: &s1,
        s2: &s2,
        s3: &s3,
        s4: &s4,
        qmin: -8.0,
        qmax: 7.0,
    };
    expect_err(qgemm::flexround(&inp), "s3");
    let s3 = f32t(&[4]);
    let inp = FlexRoundInputs {
        s3: &s3,
        qmin: 3.0,
        qmax: -3.0,
        ..inp
    };
    expect_err(qgemm::flexround(&inp), "qmin");
    // Errors are values, never panics: the error type says which kind.
    assert!(matches!(
        qgemm::w4a16(&x, &weights(&ck, gptq, 48, None)),
        Err(Error::Param { .. })
    ));
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

/// The direct dequantizing kernel (register tiles from global memory), every
/// configuration, against f64: int4 in kiln's layout with and without act order (f32 and
/// f16 activations) and int8 Double Rounding with K a multiple of 4 but not of 8 (K = 77:
/// no configuration); M and N ragged against every tile.
#[test]
fn qgemm_direct_every_config_matches_f64() {
    use kiln::kernels::qgemm::{QgemmDirect, QgemmDirectArgs, QgemmDirectProblem, WeightKind};
    let mut rng = Rng::new(21);
    let run = |x: &Tensor,
               qweight: &Tensor,
               scales: &Tensor,
               zeros: &Tensor,
               g_idx: &Tensor,
               [m, n, k, g]: [usize; 4],
               shift: u32,
               wkind: WeightKind,
               act_order: bool,
               want: &[f64],
               what: &str| {
        let problem = QgemmDirectProblem {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            group_size: g as u32,
            shift,
            wkind,
            act_order,
        };
        let space = QgemmDirect::space(client(), &problem);
        assert!(!space.is_empty(), "{what}: no configuration");
        for cfg in space {
            let y = Tensor::empty(client(), x.dtype(), &[m, n]).unwrap();
            QgemmDirect::launch(
                client(),
                &cfg,
                &QgemmDirectArgs {
                    x,
                    qweight,
                    scales,
                    zeros,
                    g_idx,
                    y: &y,
                    m: m as u32,
                    n: n as u32,
                    k: k as u32,
                    group_size: g as u32,
                    shift,
                    wkind,
                    act_order,
                },
            )
            .unwrap();
            let err = mean_rel(&y.download().unwrap().to_f64(), want);
            assert!(err < bar(x.dtype()), "{what} {cfg:?}: {err:e}");
        }
    };

    let (m, n, k, g) = (37, 72, 256, 32);
    let c = codes(&mut rng, k, n, g, DType::F32);
    let ck = checkpoint(&c, W4Format::Gptq { version: 2 }, DType::F32, true);
    let w = weights(&ck, W4Format::Gptq { version: 2 }, g as i64, None);
    let packed = qgemm::w4a16_repack(&w).unwrap();
    let words = packed.qweight.as_words();
    // M = 1 and 3 reach the few-row tiles (BM = 1, 4).
    for (m, dtype) in [
        (m, DType::F32),
        (m, DType::F16),
        (1, DType::F32),
        (3, DType::F16),
    ] {
        let x = rounded(dtype, &rng.normals(m * k, 1.0));
        let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
        let xt = up(dtype, &[m, k], &x);
        let what = format!("int4 M={m} {dtype}");
        run(
            &xt,
            &words,
            &packed.scales,
            &packed.qzeros,
            &words,
            [m, n, k, g],
            0,
            WeightKind::Int4,
            false,
            &want,
            &what,
        );
    }
    // Act order: rows visit the groups in a shuffled order.
    let groups = k / g;
    let g_idx: Vec<usize> = (0..k).map(|r| (r * 5 + r / 7) % groups).collect();
    let gi = up_i32(&[k], &g_idx.iter().map(|&v| v as i32).collect::<Vec<_>>());
    let x = rng.normals(m * k, 1.0);
    let want = qr::matmul(&x, &c.dequantize(Some(&g_idx)), m, k, n);
    run(
        &up(DType::F32, &[m, k], &x),
        &words,
        &packed.scales,
        &packed.qzeros,
        &gi.as_words(),
        [m, n, k, g],
        0,
        WeightKind::Int4,
        true,
        &want,
        "int4 act order",
    );

    // int8 served at 4 bits (shift 4), K = 84: a multiple of the kernel's vectors of x but
    // not of its steps of 8 (the last step ends half-way).
    let (m, n, k) = (19, 37, 84);
    let q8 = ints(&mut rng, k * n, -128, 127);
    let q8i: Vec<i8> = q8.iter().map(|&v| v as i8).collect();
    let s8 = rounded(
        DType::F32,
        &(0..n)
            .map(|_| 0.01 + 0.01 * rng.uniform())
            .collect::<Vec<_>>(),
    );
    let wq = qr::w8_bits_weight(&q8i, &s8, k, n, 4);
    let x = rng.normals(m * k, 1.0);
    let want = qr::matmul(&x, &wq, m, k, n);
    let (qt, st) = (up(DType::I8, &[k, n], &q8), up(DType::F32, &[n], &s8));
    run(
        &up(DType::F32, &[m, k], &x),
        &qt.as_words(),
        &st,
        &st,
        &qt.as_words(),
        [m, n, k, k],
        4,
        WeightKind::Int8Bits,
        false,
        &want,
        "int8 at 4 bits",
    );
    // K not a multiple of 4 (rows of x not on vectors): no configuration; the host's
    // path choice then has the GEMV and the tiled kernel (`tests/qgemm.rs`' K = 77 cases).
    let problem = QgemmDirectProblem {
        m: 4,
        n: 8,
        k: 77,
        group_size: 77,
        shift: 4,
        wkind: WeightKind::Int8Bits,
        act_order: false,
    };
    assert!(QgemmDirect::space(client(), &problem).is_empty());
}

/// The direct W8A8 kernel (register tiles from global memory, whole words of K), every
/// configuration, against f64: M and N ragged against every tile (M = 1 and 3 reach the
/// few-row tiles), K a multiple of 4 but not of 8, codes over the whole range
/// -128..=127 (exact i32 sums), with and without bias, f32 and f16 outputs.
#[test]
fn w8a8_direct_every_config_matches_f64() {
    use kiln::kernels::qgemm::{W8a8Direct, W8a8DirectProblem};
    let mut rng = Rng::new(23);
    for m in [37, 1, 3] {
        w8a8_direct_case(&mut rng, m);
    }
    // K not a multiple of 4: no configuration (the host does not offer the kernel).
    let problem = W8a8DirectProblem {
        m: 4,
        n: 8,
        k: 77,
        has_bias: false,
    };
    assert!(W8a8Direct::space(client(), &problem).is_empty());
}

/// `w8a8_direct`'s every configuration at M = `m`, N = 72, K = 84 against f64.
fn w8a8_direct_case(rng: &mut Rng, m: usize) {
    use kiln::kernels::qgemm::{W8a8Direct, W8a8DirectArgs, W8a8DirectProblem};
    let (n, k) = (72, 84);
    let xq = ints(rng, m * k, -128, 127);
    let wq = ints(rng, n * k, -128, 127);
    let mut scales = |len: usize| -> Vec<f64> {
        let v: Vec<f64> = (0..len).map(|_| 0.01 + rng.uniform() * 0.02).collect();
        rounded(DType::F32, &v)
    };
    let (sx, sw) = (scales(m), scales(n));
    let bias = rounded(DType::F32, &rng.normals(n, 1.0));
    let (xt, wt) = (up(DType::I8, &[m, k], &xq), up(DType::I8, &[n, k], &wq));
    let (sxt, swt, bt) = (
        up(DType::F32, &[m], &sx),
        up(DType::F32, &[n], &sw),
        up(DType::F32, &[n], &bias),
    );
    for has_bias in [false, true] {
        let want = qr::w8a8(&xq, &sx, &wq, &sw, has_bias.then_some(&bias[..]), m, n, k);
        for out in [DType::F32, DType::F16] {
            let problem = W8a8DirectProblem {
                m: m as u32,
                n: n as u32,
                k: k as u32,
                has_bias,
            };
            let space = W8a8Direct::space(client(), &problem);
            assert!(!space.is_empty(), "M={m}: no configuration");
            for cfg in space {
                let y = Tensor::empty(client(), out, &[m, n]).unwrap();
                W8a8Direct::launch(
                    client(),
                    &cfg,
                    &W8a8DirectArgs {
                        xq: &xt.as_words(),
                        sx: &sxt,
                        wq: &wt.as_words(),
                        sw: &swt,
                        bias: &bt,
                        y: &y,
                        m: m as u32,
                        n: n as u32,
                        k: k as u32,
                        has_bias,
                    },
                )
                .unwrap();
                let err = mean_rel(&y.download().unwrap().to_f64(), &want);
                let tol = if out == DType::F32 { 1e-6 } else { 1e-3 };
                assert!(err < tol, "M={m} {cfg:?} bias={has_bias} {out}: {err:e}");
            }
        }
    }
}

/// The tensor-core W4A16 kernel, every configuration, against f64, where the device
/// has tensor cores (CUDA; elsewhere its tuning space is empty and the test says so
/// and checks only that): f16 activations, M and N ragged against the 32 x 32 blocks,
/// K = 264 with one group per column (K a multiple of 8 but not of the 16-deep step)
/// and K = 256 with G = 32.
#[test]
fn qgemm_cmma_every_config_matches_f64_where_there_are_tensor_cores() {
    use kiln::kernels::qgemm::{QgemmCmma, QgemmCmmaArgs, QgemmCmmaProblem, WeightKind};
    let mut rng = Rng::new(29);
    for (m, n, k, g) in [(37, 72, 264, 264), (70, 40, 256, 32)] {
        let problem = QgemmCmmaProblem {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            group_size: g as u32,
            shift: 0,
            wkind: WeightKind::Int4,
            act_order: false,
        };
        let space = QgemmCmma::space(client(), &problem);
        if space.is_empty() {
            assert!(
                !client().report().tensor_cores,
                "tensor cores reported but no qgemm_cmma configuration"
            );
            eprintln!("qgemm_cmma: no tensor cores on this device, nothing to run");
            return;
        }
        let c = codes(&mut rng, k, n, g, DType::F16);
        let ck = checkpoint(&c, W4Format::Gptq { version: 2 }, DType::F16, true);
        let w = weights(&ck, W4Format::Gptq { version: 2 }, g as i64, None);
        let packed = qgemm::w4a16_repack(&w).unwrap();
        let words = packed.qweight.as_words();
        let x = rounded(DType::F16, &rng.normals(m * k, 1.0));
        let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
        let xt = up(DType::F16, &[m, k], &x);
        for cfg in space {
            let y = Tensor::empty(client(), DType::F16, &[m, n]).unwrap();
            QgemmCmma::launch(
                client(),
                &cfg,
                &QgemmCmmaArgs {
                    x: &xt,
                    qweight: &words,
                    scales: &packed.scales,
                    zeros: &packed.qzeros,
                    g_idx: &words,
                    y: &y,
                    m: m as u32,
                    n: n as u32,
                    k: k as u32,
                    group_size: g as u32,
                    shift: 0,
                    wkind: WeightKind::Int4,
                    act_order: false,
                },
            )
            .unwrap();
            let err = mean_rel(&y.download().unwrap().to_f64(), &want);
            assert!(err < bar(DType::F16), "M={m} N={n} K={k} {cfg:?}: {err:e}");
        }
    }
}
