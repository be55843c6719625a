//! The register-tiled direct kernels (int4/int8 dequantizing, W8A8) and the tensor-core
//! W4A16 kernel: every configuration against f64, M and N ragged against every tile.

use super::*;

/// Every configuration of the direct dequantizing kernel offered at `[m, n, k, g]`
/// against `want` (f64), and the tiles past 16 x 16 outputs a unit where the shape
/// reaches them: 133 x 264 the 16 x 32 tile in a 64 x 256 cube and the tall ones that
/// share x's rows across a plane of 8 (lavapipe), 19 x 520 the 16 x 32 tile in a 16 x 512
/// cube and the 16-row shared one.
#[allow(clippy::too_many_arguments)]
fn run_direct(
    x: &Tensor,
    qweight: &Tensor,
    scales: &Tensor,
    zeros: &Tensor,
    g_idx: &Tensor,
    [m, n, k, g]: [usize; 4],
    shift: u32,
    (wkind, act_order, col_words): (kiln::kernels::qgemm::WeightKind, bool, bool),
    want: &[f64],
    what: &str,
    only: &str,
) {
    use kiln::kernels::qgemm::{QgemmDirect, QgemmDirectArgs, QgemmDirectProblem};
    {
        let problem = QgemmDirectProblem {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            group_size: g as u32,
            shift,
            wkind,
            act_order,
            col_words,
        };
        let space: Vec<_> = QgemmDirect::space(client(), &problem)
            .into_iter()
            .filter(|c| QgemmDirect::label(c).contains(only))
            .collect();
        assert!(!space.is_empty(), "{what}: no configuration");
        for cfg in &space {
            let y = Tensor::empty(client(), x.dtype(), &[m, n]).unwrap();
            QgemmDirect::launch(
                client(),
                cfg,
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
                    col_words,
                },
            )
            .unwrap();
            let err = mean_rel(&y.download().unwrap().to_f64(), want);
            assert!(err < bar(x.dtype()), "{what} {cfg:?}: {err:e}");
        }
        // 133 x 264 reaches the 16 x 32 tile in a 64 x 256 cube, 19 x 520 in a 16 x 512 one.
        let ran: Vec<String> = space.iter().map(QgemmDirect::label).collect();
        let large = match n {
            264 => Some("BM=64 BN=256 TM=16 TN=32 SHARE=1"),
            520 => Some("BM=16 BN=512 TM=16 TN=32 SHARE=1"),
            _ => None,
        };
        // On a GPU the register budget (kernels/cuda-budget.txt) drops the tiles that spill.
        let large = large.filter(|l| l.contains(only));
        if let Some(large) = large.filter(|_| crate::common::on_cpu_adapter()) {
            assert!(ran.iter().any(|l| l == large), "{what}: {ran:?}");
        }
        let shared: &[&str] = match n {
            264 => &["BM=64 BN=128 TM=64 TN=16 SHARE=8"],
            520 => &["BM=16 BN=256 TM=16 TN=32 SHARE=8"],
            _ => &[],
        };
        if crate::common::has_planes_of_8() {
            for tile in shared.iter().filter(|t| t.contains(only)) {
                assert!(
                    ran.iter().any(|l| l == tile),
                    "{what}: {tile} not in {ran:?}"
                );
            }
        }
    }
}

// The direct dequantizing kernel (register tiles from global memory), every
// configuration, against f64: int4 in kiln's layout with and without act order (f32 and
// f16 activations) and int8 Double Rounding with K a multiple of 4 but not of 8 (K = 77:
// no configuration); M and N ragged against every tile. One test per group of shapes:
// the large tiles take llvmpipe seconds each to compile without LLVM's passes (the tall
// shared ones 14-16 s).

/// N = 72 with M = 37, 1 and 3 (the few-row tiles: BM = 1, 4, 8), with act order at 37.
#[test]
fn qgemm_direct_every_config_matches_f64() {
    let rows = [
        (37, DType::F32),
        (37, DType::F16),
        (1, DType::F32),
        (3, DType::F16),
    ];
    direct_int4(72, &rows, "");
}

/// 133 x 264 reaches the tiles past 16 x 16 (offered only where M and N fill a cube):
/// those that read their own rows, f32 and f16 activations.
#[test]
fn qgemm_direct_large_tiles_match_f64() {
    direct_int4(264, &[(133, DType::F32), (133, DType::F16)], "SHARE=1");
}

/// The same shape, the tiles that share x's rows across a plane of 8 (lavapipe; their
/// f16 path at N = 72), f32 activations.
#[test]
fn qgemm_direct_shared_tiles_match_f64() {
    direct_int4(264, &[(133, DType::F32)], "SHARE=8");
}

/// 19 x 520 reaches the 16-row tiles of 16 x 32 outputs a unit (act order in the 16 x 512
/// cube).
#[test]
fn qgemm_direct_16_row_tiles_match_f64() {
    direct_int4(520, &[(19, DType::F32)], "");
}

/// int4 GPTQ weights `[256, n]` (G = 32) at each of `rows` (M, activation dtype), the
/// configurations whose label contains `only`; act
/// order (groups visited in a shuffled order) at the first M, except at N = 264 (the
/// same bodies as at 520).
fn direct_int4(n: usize, rows: &[(usize, DType)], only: &str) {
    use kiln::kernels::qgemm::WeightKind;
    let mut rng = Rng::new(21 + n as u64);
    let run = run_direct;
    let (k, g) = (256, 32);
    {
        let c = codes(&mut rng, k, n, g, DType::F32);
        let ck = checkpoint(&c, W4Format::Gptq { version: 2 }, DType::F32, true);
        let w = weights(&ck, W4Format::Gptq { version: 2 }, g as i64, None);
        let packed = qgemm::w4a16_repack(&w).unwrap();
        let words = packed.qweight.as_words();
        for &(m, dtype) in rows {
            let x = rounded(dtype, &rng.normals(m * k, 1.0));
            let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
            let xt = up(dtype, &[m, k], &x);
            let what = format!("int4 M={m} N={n} {dtype}");
            run(
                &xt,
                &words,
                &packed.scales,
                &packed.qzeros,
                &words,
                [m, n, k, g],
                0,
                (WeightKind::Int4, false, false),
                &want,
                &what,
                only,
            );
        }
        // Act order: rows visit the groups in a shuffled order, every tile at N = 72 (the
        // shared 16 x 16 one included); at N = 520 only the 16 x 32 body, in its 16 x 512
        // cube (the act-order loads are the same in every tile; a body compiles in 5-10 s).
        if n == 264 {
            return;
        }
        let only = if n == 520 { "BN=512" } else { only };
        let m = rows[0].0;
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
            (WeightKind::Int4, true, false),
            &want,
            &format!("int4 act order M={m} N={n}"),
            only,
        );
    }
}

/// The direct kernel with int8 Double Rounding weights, and where it is not offered.
#[test]
fn qgemm_direct_int8_every_config_matches_f64() {
    use kiln::kernels::qgemm::{QgemmDirect, QgemmDirectProblem, WeightKind};
    let mut rng = Rng::new(22);
    let run = run_direct;
    // int8 served at 4 bits (shift 4), K = 84: a multiple of the kernel's vectors of x but
    // not of its steps of 8 (the last step ends half-way). N = 37: one byte load a weight;
    // N = 72 and 520 (multiples of 4): `col_words`, four columns a word, ragged M and
    // N against every tile, 19 x 520 reaching the 16 x 32 tile (in the 16 x 512 cube; the
    // 64 x 256 one runs the same body, tested above for int4).
    let k = 84;
    for (m, n, col_words) in [(19, 37, false), (19, 72, true), (19, 520, true)] {
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
        let what = format!("int8 at 4 bits M={m} N={n} col_words={col_words}");
        run(
            &up(DType::F32, &[m, k], &x),
            &qt.as_words(),
            &st,
            &st,
            &qt.as_words(),
            [m, n, k, k],
            4,
            (WeightKind::Int8Bits, false, col_words),
            &want,
            &what,
            "",
        );
    }
    // `col_words` needs int8 and N a multiple of 4.
    for (wkind, n) in [(WeightKind::Int8Bits, 37), (WeightKind::Int4, 72)] {
        let problem = QgemmDirectProblem {
            m: 19,
            n,
            k: 256,
            group_size: 32,
            shift: 0,
            wkind,
            act_order: false,
            col_words: true,
        };
        assert!(
            QgemmDirect::space(client(), &problem).is_empty(),
            "col_words offered for {wkind} at N = {n}"
        );
    }
    // K not a multiple of 4 (rows of x not on vectors): no configuration; the host's
    // path choice then has the GEMV and the tiled kernel (K = 77 in `int8.rs`).
    let problem = QgemmDirectProblem {
        m: 4,
        n: 8,
        k: 77,
        group_size: 77,
        shift: 4,
        wkind: WeightKind::Int8Bits,
        act_order: false,
        col_words: false,
    };
    assert!(QgemmDirect::space(client(), &problem).is_empty());
}

/// The direct W8A8 kernel (register tiles from global memory, whole words of K), every
/// configuration, against f64: M and N ragged against every tile (M = 1 and 3 reach the
/// few-row tiles), K a multiple of 4 but not of 8, codes over the whole range
/// -128..=127 (exact i32 sums), with and without bias, f32 and f16 outputs; 19 x 520 for
/// the 16 x 32 tile in a 16 x 512 cube (offered only where M and N fill it), 133 x 264
/// for the tall tiles that share x's rows across a plane of 8 (lavapipe).
#[test]
fn w8a8_direct_every_config_matches_f64() {
    use kiln::kernels::qgemm::{W8a8Direct, W8a8DirectProblem};
    let mut rng = Rng::new(23);
    let every = [
        (false, DType::F32),
        (true, DType::F32),
        (false, DType::F16),
        (true, DType::F16),
    ];
    for m in [37, 1, 3] {
        w8a8_direct_case(&mut rng, m, 72, &every);
    }
    // The epilogue is the small tiles' (tested above): one variant for the large one.
    let ran = w8a8_direct_case(&mut rng, 19, 520, &[(false, DType::F32)]);
    let large = "BM=16 BN=512 TM=16 TN=32 SHARE=1";
    assert!(
        ran.iter().any(|l| l == large) || !crate::common::on_cpu_adapter(),
        "19 x 520: {ran:?}"
    );
    let mut tall = w8a8_direct_case(&mut rng, 133, 264, &[(true, DType::F16)]);
    tall.extend(ran);
    if crate::common::has_planes_of_8() {
        for tile in [
            "BM=64 BN=128 TM=64 TN=16 SHARE=8",
            "BM=64 BN=64 TM=64 TN=8 SHARE=8",
            "BM=32 BN=256 TM=32 TN=32 SHARE=8",
            "BM=16 BN=256 TM=16 TN=32 SHARE=8",
        ] {
            assert!(tall.iter().any(|l| l == tile), "{tile} not in {tall:?}");
        }
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

/// `w8a8_direct`'s every configuration at M = `m`, N = `n`, K = 84 against f64, for each
/// `(has_bias, output dtype)` of `variants`; returns the labels of the configurations run.
fn w8a8_direct_case(rng: &mut Rng, m: usize, n: usize, variants: &[(bool, DType)]) -> Vec<String> {
    use kiln::kernels::qgemm::{W8a8Direct, W8a8DirectArgs, W8a8DirectProblem};
    let k = 84;
    let mut ran = Vec::new();
    let ops = W8a8Operands::new(rng, m, n, k);
    let (xt, wt) = (ops.xq.as_words(), ops.wq.as_words());
    for &(has_bias, out) in variants {
        let want = ops.want(has_bias);
        let problem = W8a8DirectProblem {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            has_bias,
        };
        let space = W8a8Direct::space(client(), &problem);
        assert!(!space.is_empty(), "M={m}: no configuration");
        for cfg in space {
            ran.push(W8a8Direct::label(&cfg));
            let y = Tensor::empty(client(), out, &[m, n]).unwrap();
            W8a8Direct::launch(
                client(),
                &cfg,
                &W8a8DirectArgs {
                    xq: &xt,
                    sx: &ops.sx,
                    wq: &wt,
                    sw: &ops.sw,
                    bias: &ops.bias,
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
            assert!(
                err < tol,
                "M={m} N={n} {cfg:?} bias={has_bias} {out}: {err:e}"
            );
        }
    }
    ran
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

/// The int8 tensor-core W8A8 kernel, every configuration, against f64, where the device
/// has int8 tensor cores (CUDA, compute capability 7.2 and up; elsewhere its tuning
/// space is empty and the test checks only that): M and N ragged against every tile,
/// K = 96 (a multiple of 16 but not of the 32- and 64-deep steps) and 272, codes over
/// the whole range -128..=127 (exact i32 sums), with and without bias, f32, f16 and
/// bf16 outputs. K not a multiple of 16 has no configuration.
#[test]
fn w8a8_cmma_every_config_matches_f64_where_there_are_int8_tensor_cores() {
    use kiln::kernels::qgemm::{W8a8Cmma, W8a8CmmaArgs, W8a8CmmaProblem};
    let mut rng = Rng::new(31);
    let problem = |m: usize, n: usize, k: usize, has_bias: bool| W8a8CmmaProblem {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        has_bias,
    };
    let report = client().report();
    if W8a8Cmma::space(client(), &problem(37, 72, 96, false)).is_empty() {
        assert!(
            !report.int8_tensor_cores,
            "int8 tensor cores reported but no w8a8_cmma configuration"
        );
        eprintln!("w8a8_cmma: no int8 tensor cores on this device, nothing to run");
        return;
    }
    assert!(W8a8Cmma::space(client(), &problem(37, 72, 84, false)).is_empty());
    for (m, n, k) in [(37, 72, 96), (1, 40, 272), (130, 260, 272)] {
        let ops = W8a8Operands::new(&mut rng, m, n, k);
        let (xt, wt) = (ops.xq.as_words(), ops.wq.as_words());
        for (has_bias, out) in [
            (false, DType::F32),
            (true, DType::F32),
            (true, DType::F16),
            (false, DType::BF16),
        ] {
            if !client().supports(out) {
                continue;
            }
            let want = ops.want(has_bias);
            for cfg in W8a8Cmma::space(client(), &problem(m, n, k, has_bias)) {
                let y = Tensor::empty(client(), out, &[m, n]).unwrap();
                W8a8Cmma::launch(
                    client(),
                    &cfg,
                    &W8a8CmmaArgs {
                        xq: &xt,
                        sx: &ops.sx,
                        wq: &wt,
                        sw: &ops.sw,
                        bias: &ops.bias,
                        y: &y,
                        m: m as u32,
                        n: n as u32,
                        k: k as u32,
                        has_bias,
                    },
                )
                .unwrap();
                let err = mean_rel(&y.download().unwrap().to_f64(), &want);
                // One rounding of y: f16's 2^-11, bf16's 2^-8 at the most.
                let tol = match out {
                    DType::F32 => 1e-6,
                    DType::F16 => 1e-3,
                    _ => 4e-3,
                };
                assert!(
                    err < tol,
                    "M={m} N={n} K={k} {cfg:?} bias={has_bias} {out}: {err:e}"
                );
            }
        }
    }
}
