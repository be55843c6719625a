//! Bad input to every quantized operator: each error names the tensor or parameter.

use super::*;

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
    // A packed weight whose public fields disagree with its tensors is refused, not
    // read past its buffers.
    let mut packed = qgemm::w4a16_repack(&weights(&ck, gptq, 64, None)).unwrap();
    packed.k *= 2;
    let x2k = up(DType::F32, &[m, 2 * k], &rng.normals(m * 2 * k, 1.0));
    expect_err(qgemm::w4a16_packed(&x2k, &packed), "PackedW4");
    // AWQ's K must be a multiple of 8 (kiln packs 8 rows a word): not rows dropped.
    let awq100 = Ckpt {
        qweight: up_i32(&[100, 1], &[0; 100]),
        scales: up(DType::F32, &[1, 8], &[1.0; 8]),
        qzeros: None,
    };
    expect_err(
        qgemm::w4a16_repack(&weights(&awq100, W4Format::Awq, -1, None)),
        "K a multiple of 8",
    );
    // W8A8's K is bounded by its exact i32 sums.
    let kbig = qgemm::MAX_W8A8_K;
    expect_err(
        qgemm::w8a8(
            &i8t(&[1, kbig]),
            &f32t(&[1]),
            &i8t(&[1, kbig]),
            &f32t(&[1]),
            None,
            DType::F32,
        ),
        "K < 131072",
    );
    // Errors are values, never panics: the error type says which kind.
    assert!(matches!(
        qgemm::w4a16(&x, &weights(&ck, gptq, 48, None)),
        Err(Error::Param { .. })
    ));
}

#[test]
fn an_empty_k_gives_zeros() {
    // w8_bits with K = 0: y = 0 (the kernels would read x and q8 past their empty ends).
    let x = up(DType::F32, &[3, 0], &[]);
    let q8 = up(DType::I8, &[0, 16], &[]);
    let s8 = up(DType::F32, &[16], &[1.0; 16]);
    let y = qgemm::w8_bits(&x, &q8, &s8, 8).unwrap();
    assert_eq!(y.shape(), &[3, 16]);
    assert_eq!(y.download().unwrap().to_f64(), vec![0.0; 48]);
    // quantize_per_token of empty rows: scale 0, as for an all-zero row.
    let (xq, sx) = qgemm::quantize_per_token(&x).unwrap();
    assert_eq!((xq.shape(), sx.shape()), (&[3, 0][..], &[3][..]));
    assert_eq!(sx.download().unwrap().to_f64(), vec![0.0; 3]);
}
