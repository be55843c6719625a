//! W4A16: every checkpoint format, dtype and path against f64; zero-point and nibble-order
//! conventions; act order; repacking; PyTorch's packing vectors.

use super::*;

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
        // kiln's layout without `qzeros`: z = 8, as documented.
        (W4Format::Kiln, 44),
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

/// W4A16's and `w8_bits`' `path` (`w4a16_on`, `w8_bits_on`, `kiln run --set path=..`):
/// each CUDA-core path the problem has gives the f64 product; one it lacks is refused
/// by name (the GEMV past 64 rows, the direct kernel where K is not a multiple of 4:
/// `Error::Param`; tensor cores for f32 activations, or on a device without them:
/// `Error::Unsupported`).
#[test]
fn w4a16_and_w8_bits_path_pins_the_kernel_and_refuses_a_missing_one_by_name() {
    use kiln::kernels::qgemm::Path;
    let mut rng = Rng::new(41);
    let (n, k, g) = (40, 256, 32);
    let format = W4Format::Gptq { version: 1 };
    let c = codes(&mut rng, k, n, g, DType::F32);
    let ck = checkpoint(&c, format, DType::F32, true);
    let w = weights(&ck, format, g as i64, None);
    let wd = c.dequantize(None);
    let run = |m: usize, dtype: DType, path: Option<Path>, rng: &mut Rng| {
        let x = rounded(dtype, &rng.normals(m * k, 1.0));
        let y = qgemm::w4a16_on(&up(dtype, &[m, k], &x), &w, path)?;
        let want = qr::matmul(&x, &wd, m, k, n);
        Ok::<_, Error>(mean_rel(&y.download().unwrap().to_f64(), &want))
    };
    for path in [Path::Gemv, Path::Tiled, Path::Direct] {
        let err = run(9, DType::F32, Some(path), &mut rng).unwrap();
        assert!(err < bar(DType::F32), "{path:?}: {err:e}");
    }
    let e = run(70, DType::F32, Some(Path::Gemv), &mut rng)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("path") && e.contains("gemv") && e.contains("M = 70"),
        "{e}"
    );
    // wmma has no f32 fragments: refused on every device.
    let e = run(9, DType::F32, Some(Path::TensorCore), &mut rng).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("f16 or bf16 activations"), "{e}");
    if !client().report().tensor_cores {
        let e = run(9, DType::F16, Some(Path::TensorCore), &mut rng).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("no tensor cores"), "{e}");
    }

    // Through `kiln run`'s parameter.
    let (m, x) = (5, rng.normals(5 * k, 1.0));
    let mut hosts = BTreeMap::new();
    hosts.insert(
        "x".into(),
        HostTensor::from_f64(DType::F32, vec![m, k], &x).unwrap(),
    );
    hosts.insert("qweight".into(), ck.qweight.download().unwrap());
    hosts.insert("scales".into(), ck.scales.download().unwrap());
    hosts.insert(
        "qzeros".into(),
        ck.qzeros.as_ref().unwrap().download().unwrap(),
    );
    let params = |path: &str| {
        [("group_size", "32"), ("path", path)]
            .map(|(p, v)| (p.to_string(), v.to_string()))
            .into()
    };
    let op = kiln::kernels::op("w4a16").unwrap();
    let y = op.call_host(client(), &hosts, params("direct")).unwrap();
    let err = mean_rel(&y["y"].to_f64(), &qr::matmul(&x, &wd, m, k, n));
    assert!(err < bar(DType::F32), "{err:e}");
    let e = op
        .call_host(client(), &hosts, params("fastest"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("path") && e.contains("fastest"), "{e}");

    // `w8_bits` at K = 77: no direct kernel (rows of x do not start on a vector).
    let (m, n, k) = (6, 24, 77);
    let q8 = ints(&mut rng, k * n, -128, 127);
    let s8 = rounded(DType::F32, &vec![0.01; n]);
    let q8i: Vec<i8> = q8.iter().map(|&v| v as i8).collect();
    let want_w = qr::w8_bits_weight(&q8i, &s8, k, n, 6);
    let x = rng.normals(m * k, 1.0);
    let (xt, qt, st) = (
        up(DType::F32, &[m, k], &x),
        up(DType::I8, &[k, n], &q8),
        up(DType::F32, &[n], &s8),
    );
    for path in [Path::Gemv, Path::Tiled] {
        let y = qgemm::w8_bits_on(&xt, &qt, &st, 6, Some(path)).unwrap();
        let err = mean_rel(
            &y.download().unwrap().to_f64(),
            &qr::matmul(&x, &want_w, m, k, n),
        );
        assert!(err < bar(DType::F32), "w8_bits {path:?}: {err:e}");
    }
    let e = qgemm::w8_bits_on(&xt, &qt, &st, 6, Some(Path::Direct))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("path") && e.contains("direct") && e.contains("K = 77"),
        "{e}"
    );
}
