//! The fused GEMM: every configuration of the tuning space against the f64 reference
//! on ragged shapes (no tile divides M, N or K), both layouts of b, the whole epilogue,
//! f32 and f16; then bad inputs.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{client, refused};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::matmul::{self, reference, Activation, Epilogue};
use kiln::{DType, Error, HostTensor, Tensor};
use std::collections::BTreeMap;

struct Problem {
    m: usize,
    n: usize,
    k: usize,
    hosts: BTreeMap<&'static str, HostTensor>,
}

fn problem(m: usize, n: usize, k: usize, trans_b: bool, dtype: DType, seed: u64) -> Problem {
    let mut rng = Rng::new(seed);
    let mut t = |shape: Vec<usize>| {
        let len = shape.iter().product();
        HostTensor::from_f64(dtype, shape, &rng.normals(len, 1.0)).unwrap()
    };
    let b_shape = if trans_b { vec![n, k] } else { vec![k, n] };
    let hosts = BTreeMap::from([
        ("a", t(vec![m, k])),
        ("b", t(b_shape)),
        ("bias", t(vec![n])),
        ("residual", t(vec![m, n])),
    ]);
    Problem { m, n, k, hosts }
}

fn up(h: &HostTensor) -> Tensor {
    Tensor::upload(client(), h).unwrap()
}

/// `a`, `b`, `bias` and `residual` on the device.
fn operands(p: &Problem) -> (Tensor, Tensor, Tensor, Tensor) {
    let h = &p.hosts;
    (up(&h["a"]), up(&h["b"]), up(&h["bias"]), up(&h["residual"]))
}

/// The whole epilogue (bias, `activation`, residual).
fn whole<'a>(bias: &'a Tensor, res: &'a Tensor, activation: Activation) -> Epilogue<'a> {
    Epilogue {
        bias: Some(bias),
        activation,
        residual: Some(res),
    }
}

/// A kernel's `*Problem` (what its `space` reads) with the whole SiLU epilogue.
macro_rules! silu_problem {
    ($ty:ident, $m:expr, $n:expr, $k:expr, $trans_b:expr) => {
        $ty {
            m: $m as u32,
            n: $n as u32,
            k: $k as u32,
            trans_b: $trans_b,
            has_bias: true,
            has_residual: true,
            act: Activation::Silu,
        }
    };
}

/// Max error relative to max(|c|, 1): accumulation error scales with the magnitude of
/// the terms, not of the (possibly cancelling) sum. With the whole epilogue (bias, `act`,
/// residual) unless `act` is `"none"`.
fn check(p: &Problem, got: &HostTensor, trans_b: bool, act: &str, dtype: DType, what: &str) {
    let h = &p.hosts;
    let epilogue = act != "none";
    let want = reference::matmul(
        &h["a"].to_f64(),
        &h["b"].to_f64(),
        p.m,
        p.n,
        p.k,
        trans_b,
        epilogue.then(|| h["bias"].to_f64()).as_deref(),
        act,
        epilogue.then(|| h["residual"].to_f64()).as_deref(),
    );
    let err = max_rel_error(&got.to_f64(), &want, 1.0);
    // One rounding of the output, plus f32 accumulation over K terms of size ~1.
    let bound = dtype.epsilon() + 8.0 * f32::EPSILON as f64 * (p.k as f64).sqrt();
    assert!(err <= bound, "{what}: max rel err {err:.2e} > {bound:.2e}");
}

fn every_config(dtype: DType) {
    if refused(dtype) {
        return;
    }
    for trans_b in [false, true] {
        let p = problem(37, 53, 71, trans_b, dtype, 11);
        let (a, b, bias, res) = operands(&p);
        for cfg in &matmul::space(client()) {
            let ep = whole(&bias, &res, Activation::Silu);
            let c = matmul::matmul_with(&a, &b, trans_b, ep, *cfg)
                .unwrap()
                .download()
                .unwrap();
            assert_eq!(c.dtype, dtype);
            check(
                &p,
                &c,
                trans_b,
                "silu",
                dtype,
                &format!("{cfg:?} trans_b={trans_b}"),
            );
        }
    }
}

/// The configurations of a vector kernel (`matmul_vec4`, or with `plane`
/// `matmul_vec4_plane`) offered at M x N x K with the whole SiLU epilogue.
fn vec4_space(
    plane: bool,
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
) -> Vec<matmul::MatmulConfig> {
    use kiln::kernels::matmul::{
        MatmulConfig, MatmulVec4, MatmulVec4Plane, MatmulVec4PlaneProblem, MatmulVec4Problem,
    };
    match plane {
        false => MatmulVec4::space(
            client(),
            &silu_problem!(MatmulVec4Problem, m, n, k, trans_b),
        )
        .into_iter()
        .map(MatmulConfig::Vec4)
        .collect(),
        true => MatmulVec4Plane::space(
            client(),
            &silu_problem!(MatmulVec4PlaneProblem, m, n, k, trans_b),
        )
        .into_iter()
        .map(MatmulConfig::Vec4Plane)
        .collect(),
    }
}

/// Every configuration of a vector kernel (see [`vec4_space`]) offered at one of
/// `shapes` (M x N, and not at an earlier one) whose label contains `only`, for each of
/// `trans`: `count` of them per trans_b where the device offers the kernel.
fn every_vec4_config(
    plane: bool,
    dtype: DType,
    shapes: &[(usize, usize)],
    trans: &[bool],
    only: &str,
    count: usize,
) {
    use kiln::kernels::matmul::{MatmulVec4, MatmulVec4Problem};
    if refused(dtype) {
        return;
    }
    // K and N multiples of 4 (the kernel's requirement), neither a multiple of a tile;
    // M ragged: 37 x 260 for the tiles of 16 rows and more; 3 and 1 rows for the
    // few-row tiles (offered only where they cover M); 133 x 516 for the register tiles
    // past 16 x 16 (offered only where the problem fills a cube). Each configuration is
    // checked once, at the first shape that offers it.
    let k = 68;
    let mut tested: Vec<String> = Vec::new();
    let runs = shapes
        .iter()
        .flat_map(|&(m, n)| trans.iter().map(move |&t| (m, n, t)));
    for (m, n, trans_b) in runs {
        let p = problem(m, n, k, trans_b, dtype, 12);
        let (a, b, bias, res) = operands(&p);
        let space = vec4_space(plane, m, n, k, trans_b);
        // Elsewhere than at 37 x 260, what 37 x 260 offers too is the other tests' part.
        let big: Vec<String> = match (m, n) != (37, 260) {
            true => vec4_space(plane, 37, 260, k, trans_b)
                .iter()
                .map(|c| format!("{} trans_b={trans_b}", c.label()))
                .collect(),
            false => vec![],
        };
        for cfg in space {
            let label = format!("{} trans_b={trans_b}", cfg.label());
            if tested.contains(&label) || big.contains(&label) || !label.contains(only) {
                continue;
            }
            tested.push(label.clone());
            let ep = whole(&bias, &res, Activation::Silu);
            let c = matmul::matmul_with(&a, &b, trans_b, ep, cfg)
                .unwrap()
                .download()
                .unwrap();
            check(&p, &c, trans_b, "silu", dtype, &format!("{label} M={m}"));
        }
    }
    // On a GPU the register budget (kernels/cuda-budget.txt) drops the tiles that spill;
    // the plane kernel is offered on CPU adapters with planes of 8 and shuffles.
    let offered = !plane || common::has_planes_of_8();
    if common::on_cpu_adapter() && offered {
        assert_eq!(tested.len(), trans.len() * count, "{tested:?}");
    }
    // K or N not a multiple of 4: no vector configuration at all.
    assert!(MatmulVec4::space(
        client(),
        &MatmulVec4Problem {
            m: 8,
            n: 8,
            k: 6,
            trans_b: false,
            has_bias: false,
            has_residual: false,
            act: Activation::None,
        },
    )
    .is_empty());
    assert!(MatmulVec4::space(
        client(),
        &MatmulVec4Problem {
            m: 8,
            n: 6,
            k: 8,
            trans_b: true,
            has_bias: false,
            has_residual: false,
            act: Activation::None,
        },
    )
    .is_empty());
}

// The 25 declared configurations: 9 of 16 rows or more (offered at 37 x 260), 9 of 1, 4
// and 8 rows (at M = 3 and 1), 3 past 16 x 16 accumulators (at 133 x 516, where they fill
// a cube), 4 of 8 or 16 columns (offered only where they cover N: 2 at N = 12, 2 more at
// N = 4). Each test compiles its own kernels: a large unrolled tile takes seconds to
// compile on lavapipe (the 9 large ones, both layouts of b, in one test took 116 s from a
// cold shader cache; a 32 x 32 tile alone 11 s on a slow 2-core machine, and its f16
// variant with `trans_b` 25-30 s without LLVM's passes), so those have a test each.
macro_rules! vec4_tests {
    ($($name:ident: $plane:expr, $dtype:expr, $shapes:expr, $trans:expr, $only:expr, $count:expr;)*) => {
        $(#[test]
        fn $name() {
            every_vec4_config($plane, $dtype, $shapes, $trans, $only, $count);
        })*
    };
}

const ROWS_16: &[(usize, usize)] = &[(37, 260)];
const FEW_ROWS: &[(usize, usize)] = &[(3, 260), (1, 260)];
const LARGE: &[(usize, usize)] = &[(133, 516)];
// M ragged against 64 and 128 rows, N against 8 and 16 columns.
const FEW_COLUMNS: &[(usize, usize)] = &[(133, 12), (37, 4)];

vec4_tests! {
    every_vec4_config_matches_the_reference_f32: false, DType::F32, ROWS_16, &[false], "", 9;
    every_vec4_config_matches_the_reference_f32_trans_b: false, DType::F32, ROWS_16, &[true], "", 9;
    every_vec4_config_matches_the_reference_f16: false, DType::F16, ROWS_16, &[false], "", 9;
    every_vec4_config_matches_the_reference_f16_trans_b: false, DType::F16, ROWS_16, &[true], "", 9;
    few_row_vec4_configs_match_the_reference_f32: false, DType::F32, FEW_ROWS, &[false, true], "", 9;
    few_row_vec4_configs_match_the_reference_f16: false, DType::F16, FEW_ROWS, &[false, true], "", 9;
    few_column_vec4_configs_match_the_reference_f32: false, DType::F32, FEW_COLUMNS, &[false, true], "", 4;
    few_column_vec4_configs_match_the_reference_f16: false, DType::F16, FEW_COLUMNS, &[false, true], "", 4;
    tile_32x32_vec4_matches_the_reference_f32: false, DType::F32, LARGE, &[false], "TM=32", 1;
    tile_32x32_vec4_matches_the_reference_f32_trans_b: false, DType::F32, LARGE, &[true], "TM=32", 1;
    tile_32x32_vec4_matches_the_reference_f16: false, DType::F16, LARGE, &[false], "TM=32", 1;
    tile_32x32_vec4_matches_the_reference_f16_trans_b: false, DType::F16, LARGE, &[true], "TM=32", 1;
    tile_16x32_vec4_matches_the_reference_f32: false, DType::F32, LARGE, &[false], "TM=16", 1;
    tile_16x32_vec4_matches_the_reference_f32_trans_b: false, DType::F32, LARGE, &[true], "TM=16", 1;
    tile_16x32_vec4_matches_the_reference_f16: false, DType::F16, LARGE, &[false], "TM=16", 1;
    tile_16x32_vec4_matches_the_reference_f16_trans_b: false, DType::F16, LARGE, &[true], "TM=16", 1;
    // matmul_vec4_plane (lavapipe): 2 configurations of 16 rows or more at 37 x 260, 2
    // of 8 rows at M = 3 and 1, 3 past 16 x 16 accumulators at 133 x 516 (32 x 16 above).
    plane_vec4_configs_match_the_reference_f32: true, DType::F32, ROWS_16, &[false, true], "", 2;
    plane_vec4_configs_match_the_reference_f16: true, DType::F16, ROWS_16, &[false, true], "", 2;
    few_row_plane_vec4_configs_match_the_reference: true, DType::F32, FEW_ROWS, &[false, true], "", 2;
    few_row_plane_vec4_configs_match_the_reference_f16: true, DType::F16, FEW_ROWS, &[false, true], "", 2;
    tile_64x16_plane_vec4_matches_the_reference_f32: true, DType::F32, LARGE, &[false, true], "TM=64 TN=16", 1;
    tile_64x8_plane_vec4_matches_the_reference_f32: true, DType::F32, LARGE, &[false, true], "TM=64 TN=8", 1;
    tile_64x16_plane_vec4_matches_the_reference_f16: true, DType::F16, LARGE, &[false, true], "BM=64 BN=128 TM=64", 1;
}

/// The split-K kernel for few rows: every configuration, at M = 1, 3 and 9 (each MT
/// that fits, ragged against it), with N and K ragged against BN and KS (53 x 71), and
/// K and N below them (M = 2, N = 7, K = 5: most units of a cube have no K to walk),
/// both layouts of b, the whole epilogue.
fn every_gemv_config(dtype: DType) {
    use kiln::kernels::matmul::{MatmulConfig, MatmulGemv, MatmulGemvProblem};
    if refused(dtype) {
        return;
    }
    let mut tested = std::collections::BTreeSet::new();
    for (m, n, k) in [(1, 53, 71), (3, 53, 71), (9, 53, 71), (2, 7, 5)] {
        for trans_b in [false, true] {
            let p = problem(m, n, k, trans_b, dtype, 13);
            let (a, b, bias, res) = operands(&p);
            let problem = silu_problem!(MatmulGemvProblem, m, n, k, trans_b);
            let space = MatmulGemv::space(client(), &problem);
            assert!(!space.is_empty(), "M = {m}: no configuration");
            for cfg in space {
                let ep = whole(&bias, &res, Activation::Silu);
                let c = matmul::matmul_with(&a, &b, trans_b, ep, MatmulConfig::Gemv(cfg))
                    .unwrap()
                    .download()
                    .unwrap();
                let what = format!("gemv {cfg:?} trans_b={trans_b} {m}x{n}x{k}");
                check(&p, &c, trans_b, "silu", dtype, &what);
                tested.insert(format!("{cfg:?}"));
            }
        }
    }
    // 4 (BN, KS) pairs x MT in 1, 4, 8.
    assert_eq!(tested.len(), 12, "{tested:?}");
    // The autotuner is offered them up to GEMV_MAX_ROWS rows.
    for (m, offered) in [
        (matmul::GEMV_MAX_ROWS, true),
        (matmul::GEMV_MAX_ROWS + 1, false),
    ] {
        let p = problem(m, 8, 8, false, dtype, 14);
        let (a, b) = (up(&p.hosts["a"]), up(&p.hosts["b"]));
        let cands = matmul::candidates_for(&a, &b, false, Epilogue::default()).unwrap();
        let gemv = cands.iter().any(|c| matches!(c, MatmulConfig::Gemv(_)));
        assert_eq!(gemv, offered, "M = {m}: {cands:?}");
    }
}

/// One test per sweep and dtype.
macro_rules! sweep_tests {
    ($($name:ident: $sweep:ident($dtype:expr);)*) => {
        $(#[test]
        fn $name() {
            $sweep($dtype);
        })*
    };
}

sweep_tests! {
    every_gemv_config_matches_the_reference_f32: every_gemv_config(DType::F32);
    every_gemv_config_matches_the_reference_f16: every_gemv_config(DType::F16);
    every_config_matches_the_reference_f32: every_config(DType::F32);
    every_config_matches_the_reference_f16: every_config(DType::F16);
}

/// Tuned (the tuner compiles each candidate on one tile with a short K before its first
/// run: `warm_up`), with the whole epilogue, both layouts of `b`.
#[test]
fn tuned_matmul_on_skinny_and_edge_shapes() {
    for (m, n, k, trans_b) in [
        (1, 1, 1, false),
        (1, 300, 257, false),
        (2, 3, 1000, false),
        (130, 1, 65, false),
        (65, 129, 33, false),
        (65, 129, 33, true),
        // K and N multiples of 4: the vector kernel competes too.
        (1, 300, 256, false),
        (33, 132, 100, false),
        (33, 132, 100, true),
        // Few columns (a router's 8 experts): the few-column vector tiles compete.
        (130, 8, 68, false),
        (130, 12, 68, true),
    ] {
        let p = problem(m, n, k, trans_b, DType::F32, (m * 1000 + n) as u64);
        let (a, b, bias, res) = operands(&p);
        let ep = whole(&bias, &res, Activation::Gelu);
        let c = matmul::matmul(&a, &b, trans_b, ep)
            .unwrap()
            .download()
            .unwrap();
        assert_eq!(c.shape, vec![m, n]);
        check(
            &p,
            &c,
            trans_b,
            "gelu",
            DType::F32,
            &format!("{m}x{n}x{k} trans_b={trans_b}"),
        );
    }
}

#[test]
fn k_zero_gives_the_epilogue_of_zero() {
    let a = up(&HostTensor::from_f32(vec![3, 0], &[]).unwrap());
    let b = up(&HostTensor::from_f32(vec![0, 2], &[]).unwrap());
    let bias = up(&HostTensor::from_f32(vec![2], &[1.0, -2.0]).unwrap());
    let ep = Epilogue {
        bias: Some(&bias),
        ..Default::default()
    };
    let c = matmul::matmul(&a, &b, false, ep)
        .unwrap()
        .download()
        .unwrap();
    assert_eq!(c.to_f64(), vec![1.0, -2.0, 1.0, -2.0, 1.0, -2.0]);
}

#[test]
fn relu_keeps_nan_as_pytorch_does() {
    // Row 0 holds a NaN (NaN x 0 is NaN too), row 1 is negative, row 2 positive: relu
    // gives NaN, NaN, 0, 0, 2, 0. A `max(v, 0)` epilogue returned 0 for NaN on CUDA.
    let a = up(&HostTensor::from_f32(vec![3, 2], &[f32::NAN, 0.0, -1.0, 0.0, 2.0, 0.0]).unwrap());
    let b = up(&HostTensor::from_f32(vec![2, 2], &[1.0, 0.0, 0.0, 1.0]).unwrap());
    let ep = Epilogue {
        activation: Activation::Relu,
        ..Default::default()
    };
    let c = matmul::matmul(&a, &b, false, ep)
        .unwrap()
        .download()
        .unwrap()
        .to_f64();
    assert!(c[0].is_nan() && c[1].is_nan(), "{c:?}");
    assert_eq!(&c[2..], &[0.0, 0.0, 2.0, 0.0]);
    assert!(reference::activate(f64::NAN, "relu").is_nan());
    assert_eq!(reference::activate(-3.0, "relu"), 0.0);
}

#[test]
fn bad_inputs_name_the_tensor() {
    let t = |shape: Vec<usize>| {
        let n = shape.iter().product();
        up(&HostTensor::from_f64(DType::F32, shape, &vec![1.0; n]).unwrap())
    };
    let (a, b) = (t(vec![4, 5]), t(vec![5, 6]));
    let shape_err = |r: kiln::Result<Tensor>, name: &str, expected: &str| match r {
        Err(Error::Shape {
            tensor,
            expected: e,
            ..
        }) => {
            assert_eq!(tensor, name);
            assert!(e.contains(expected), "{e}");
        }
        other => panic!("expected a shape error on {name}, got {other:?}"),
    };
    shape_err(
        matmul::matmul(&t(vec![2, 4, 5]), &b, false, Epilogue::default()),
        "a",
        "[M, K]",
    );
    shape_err(
        matmul::matmul(&a, &t(vec![4, 6]), false, Epilogue::default()),
        "b",
        "[5, N]",
    );
    shape_err(
        matmul::matmul(&a, &b, true, Epilogue::default()),
        "b",
        "[N, 5]",
    );
    let bad_bias = t(vec![5]);
    shape_err(
        matmul::matmul(
            &a,
            &b,
            false,
            Epilogue {
                bias: Some(&bad_bias),
                ..Default::default()
            },
        ),
        "bias",
        "[6]",
    );
    let bad_res = t(vec![6, 4]);
    shape_err(
        matmul::matmul(
            &a,
            &b,
            false,
            Epilogue {
                residual: Some(&bad_res),
                ..Default::default()
            },
        ),
        "residual",
        "[4, 6]",
    );
    let b16 = up(&HostTensor::from_f64(DType::F16, vec![5, 6], &[0.5; 30]).unwrap());
    assert!(
        matches!(matmul::matmul(&a, &b16, false, Epilogue::default()), Err(Error::DType { tensor, .. }) if tensor == "b")
    );

    let op = kiln::kernels::op("matmul").unwrap();
    let tensors = BTreeMap::from([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]);
    let params = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    assert!(
        matches!(op.call(client(), tensors.clone(), params("activation", "tanh")), Err(Error::Param { param, .. }) if param == "activation")
    );
    assert!(
        matches!(op.call(client(), tensors.clone(), params("trans_b", "yes")), Err(Error::Param { param, .. }) if param == "trans_b")
    );
    let only_a = BTreeMap::from([("a".to_string(), a)]);
    assert!(
        matches!(op.call(client(), only_a, BTreeMap::new()), Err(Error::MissingTensor { tensor, .. }) if tensor == "b")
    );
}

#[test]
fn cubek_matmul_is_a_candidate_with_a_plain_epilogue_and_agrees() {
    use matmul::MatmulConfig::Cubek;
    for dtype in [DType::F32, DType::F16] {
        if refused(dtype) {
            continue;
        }
        for trans_b in [false, true] {
            let p = problem(37, 53, 71, trans_b, dtype, 12);
            let (a, b) = (up(&p.hosts["a"]), up(&p.hosts["b"]));
            let plain = Epilogue::default();
            let cands = matmul::candidates_for(&a, &b, trans_b, plain).unwrap();
            let got = matmul::matmul_with(&a, &b, trans_b, plain, Cubek);
            // Where the device has TF32 (NVIDIA from sm_80), cubek would round f32
            // operands to it: refused with that reason, and not a candidate.
            if let Err(e) = &got {
                if dtype == DType::F32 && e.to_string().contains("TF32") {
                    assert!(!cands.contains(&Cubek), "{cands:?}");
                    continue;
                }
            }
            assert!(cands.contains(&Cubek), "{cands:?}");
            let got = got.unwrap().download().unwrap();
            let what = format!("cubek {dtype} trans_b={trans_b}");
            check(&p, &got, trans_b, "none", dtype, &what);
        }
    }
    // With an epilogue it is not offered, and asking for it names the reason.
    let p = problem(8, 8, 8, false, DType::F32, 13);
    let (a, b, bias) = (up(&p.hosts["a"]), up(&p.hosts["b"]), up(&p.hosts["bias"]));
    let ep = Epilogue {
        bias: Some(&bias),
        ..Epilogue::default()
    };
    assert!(!matmul::candidates_for(&a, &b, false, ep)
        .unwrap()
        .contains(&Cubek));
    let e = matmul::matmul_with(&a, &b, false, ep, Cubek).unwrap_err();
    assert!(
        matches!(&e, Error::Param { param, .. } if param == "config"),
        "{e}"
    );
}

/// `kernel` narrows the autotuner's choice: `fma` (kiln's FMA tiles only) matches the
/// f64 reference; `tensor_cores` is refused by name where the device has none, and
/// anywhere for f32 or a K that is not a multiple of 8; a bad value names the parameter.
#[test]
fn kernel_family_narrows_the_choice_or_is_refused_by_name() {
    use kiln::kernels::matmul::{matmul_among, KernelFamily};
    let p = problem(21, 40, 24, false, DType::F32, 11);
    let (a, b, bias, res) = operands(&p);
    let got = matmul_among(
        &a,
        &b,
        false,
        whole(&bias, &res, Activation::Silu),
        KernelFamily::Fma,
    )
    .unwrap();
    check(
        &p,
        &got.download().unwrap(),
        false,
        "silu",
        DType::F32,
        "kernel=fma",
    );
    // f32 never has tensor-core tiles; nor does lavapipe any dtype.
    let refusal = |a: &Tensor, b: &Tensor| {
        matmul_among(a, b, false, Epilogue::default(), KernelFamily::TensorCores).unwrap_err()
    };
    let e = refusal(&a, &b);
    assert!(
        matches!(&e, Error::Unsupported { feature, .. } if feature.starts_with("tensor cores")
            && feature.contains("found f32")),
        "{e}"
    );
    if !client().report().tensor_cores && !refused(DType::F16) {
        let p = problem(16, 16, 16, false, DType::F16, 12);
        let (a, b, _, _) = operands(&p);
        let e = refusal(&a, &b);
        assert!(e.to_string().contains("reports no tensor cores"), "{e}");
    }
    for (value, family) in [
        ("auto", KernelFamily::Auto),
        ("tensor_cores", KernelFamily::TensorCores),
        ("fma", KernelFamily::Fma),
    ] {
        assert_eq!(KernelFamily::parse(value).unwrap(), family);
        assert_eq!(family.name(), value);
    }
    let e = KernelFamily::parse("wmma").unwrap_err();
    assert!(
        matches!(&e, Error::Param { param, .. } if param == "kernel")
            && e.to_string().contains("auto | tensor_cores | fma"),
        "{e}"
    );
}
