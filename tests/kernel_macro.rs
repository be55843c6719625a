//! `#[kiln::kernel]` end to end, on the guide's RMSNorm (examples/rms_norm.rs): the
//! generated space, key, validated launch, autotuned launch (against the f64
//! reference, ragged sizes, f32 and f16), and emission without a device.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

#[allow(dead_code)]
#[path = "../examples/rms_norm.rs"]
mod example;

use common::client;
use example::{reference, RmsNorm, RmsNormArgs, RmsNormConfig, RmsNormProblem, RMS_NORM_KERNEL};
use kiln::check::{max_rel_error, Rng};
use kiln::codegen::{emit, Target};
use kiln::runtime::KernelConfig;
use kiln::{DType, Error, HostTensor, Tensor};
use std::collections::BTreeMap;

fn inputs(rows: usize, cols: usize, dtype: DType) -> (HostTensor, HostTensor) {
    let mut rng = Rng::new((rows * 31 + cols) as u64);
    (
        HostTensor::from_f64(dtype, vec![rows, cols], &rng.normals(rows * cols, 2.0)).unwrap(),
        HostTensor::from_f64(dtype, vec![cols], &rng.normals(cols, 1.0)).unwrap(),
    )
}

/// The inputs on the device.
fn upload(xh: &HostTensor, wh: &HostTensor) -> (Tensor, Tensor) {
    (
        Tensor::upload(client(), xh).unwrap(),
        Tensor::upload(client(), wh).unwrap(),
    )
}

/// RMSNorm's arguments for `x` [rows, cols], eps 1e-6.
fn args<'a>(x: &'a Tensor, w: &'a Tensor, out: &'a Tensor) -> RmsNormArgs<'a> {
    RmsNormArgs {
        x,
        w,
        out,
        rows: x.shape()[0] as u32,
        cols: x.shape()[1] as u32,
        eps: 1e-6,
    }
}

fn run(rows: usize, cols: usize, dtype: DType) {
    let (xh, wh) = inputs(rows, cols, dtype);
    let (x, w) = upload(&xh, &wh);
    let out = Tensor::empty(client(), dtype, &[rows, cols]).unwrap();
    let tol = 4.0 * dtype.epsilon();
    RmsNorm::tuned(client(), tol, &args(&x, &w, &out)).unwrap();
    let want = reference(&xh.to_f64(), &wh.to_f64(), cols, 1e-6);
    let err = max_rel_error(&out.download().unwrap().to_f64(), &want, 1e-3);
    let bound = dtype.epsilon() + 1e-5;
    assert!(
        err < bound,
        "{rows}x{cols} {dtype}: {err:.2e} > {bound:.1e}"
    );
}

#[test]
fn tuned_rms_norm_matches_the_reference_on_ragged_sizes() {
    for (rows, cols) in [(1, 1), (3, 7), (37, 1000), (129, 33)] {
        run(rows, cols, DType::F32);
    }
    if !common::refused(DType::F16) {
        run(17, 513, DType::F16);
    }
}

/// `warm_up` (what `tuned` runs before each configuration's first run, to compile it)
/// launches the grid's first cube alone: row 0 of the output is written, as by a
/// launch, and no other; an empty grid launches nothing.
#[test]
fn warm_up_runs_the_first_cube_alone() {
    let (rows, cols) = (5, 40);
    let (xh, wh) = inputs(rows, cols, DType::F32);
    let (x, w) = upload(&xh, &wh);
    let sentinel = HostTensor::from_f32(vec![rows, cols], &vec![7.0; rows * cols]).unwrap();
    let out = Tensor::upload(client(), &sentinel).unwrap();
    let mut args = args(&x, &w, &out);
    let cfg = RmsNormConfig { UNITS: 32 };
    assert!(RmsNorm::warm_up(client(), &cfg, &args).unwrap());
    let got = out.download().unwrap().to_f64();
    let want = reference(&xh.to_f64(), &wh.to_f64(), cols, 1e-6);
    assert!(max_rel_error(&got[..cols], &want[..cols], 1e-3) < 1e-5);
    assert!(
        got[cols..].iter().all(|&v| v == 7.0),
        "only the first cube runs"
    );
    args.rows = 0;
    assert!(!RmsNorm::warm_up(client(), &cfg, &args).unwrap());
}

#[test]
fn space_applies_require_and_device_limits_in_declaration_order() {
    let all: Vec<u32> = RmsNorm::space(
        client(),
        &RmsNormProblem {
            rows: 4,
            cols: 4096,
            eps: 1e-6,
        },
    )
    .iter()
    .map(|c| c.UNITS)
    .collect();
    let limit = client().report().max_units_per_cube;
    let want: Vec<u32> = [32, 64, 128, 256]
        .into_iter()
        .filter(|&u| u <= limit)
        .collect();
    assert_eq!(all, want);
    // require(UNITS <= cols.next_power_of_two().max(32)): a 40-wide row allows 32 and 64.
    let narrow: Vec<u32> = RmsNorm::space(
        client(),
        &RmsNormProblem {
            rows: 4,
            cols: 40,
            eps: 1e-6,
        },
    )
    .iter()
    .map(|c| c.UNITS)
    .collect();
    assert_eq!(narrow, vec![32, 64]);
}

#[test]
fn key_buckets_as_declared() {
    let k = RmsNorm::key(
        DType::F16,
        &RmsNormProblem {
            rows: 300,
            cols: 1000,
            eps: 1e-6,
        },
    );
    assert_eq!(k.kernel, "rms_norm");
    assert_eq!(k.shape, "rows=512;cols=1024;dtype=f16");
    // The cache key covers the kernel's source and the DSL it may call.
    assert_eq!(k.source_hash, RmsNorm::source_hash());
    assert_ne!(k.source_hash, RmsNorm::SOURCE_HASH);
    assert_eq!(
        k.source_hash,
        kiln::runtime::tune::fnv1a_hex(&[RmsNorm::SOURCE_HASH, kiln::dsl::SOURCE_HASH].concat())
    );
}

#[test]
fn launch_checks_name_the_argument() {
    let (xh, wh) = inputs(2, 8, DType::F32);
    let (x, w) = upload(&xh, &wh);
    let w16 = Tensor::upload(client(), &wh.cast(DType::F16).unwrap()).unwrap();
    let out = Tensor::empty(client(), DType::F32, &[2, 8]).unwrap();
    let cfg = RmsNormConfig { UNITS: 32 };
    match RmsNorm::launch(client(), &cfg, &args(&x, &w16, &out)) {
        Err(Error::DType {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(
                (tensor.as_str(), expected.as_str(), found.as_str()),
                ("w", "f32", "f16")
            );
        }
        other => panic!("expected a dtype error on w, got {other:?}"),
    }
    // A configuration built by hand with a value the kernel does not declare: named as
    // such, with the declared values (not blamed on the device or `require`).
    let undeclared = RmsNormConfig { UNITS: 4096 };
    match RmsNorm::launch(client(), &undeclared, &args(&x, &w, &out)) {
        Err(Error::Param {
            param,
            expected,
            found,
        }) => assert_eq!(
            (param.as_str(), expected.as_str(), found.as_str()),
            ("UNITS", "32 | 64 | 128 | 256", "4096")
        ),
        other => panic!("expected a parameter error on UNITS, got {other:?}"),
    }
}

#[test]
fn the_registry_entry_emits_both_targets_without_a_device() {
    for (target, marker) in [(Target::Cuda, "__global__"), (Target::Wgsl, "@compute")] {
        let cfg = KernelConfig::new(
            &RMS_NORM_KERNEL,
            BTreeMap::from([("UNITS".to_string(), "64".to_string())]),
        )
        .unwrap();
        let out = emit(&RMS_NORM_KERNEL, target, &cfg).unwrap();
        assert!(out.source.contains(marker));
        assert_eq!(out.manifest.cube_dim, (64, 1, 1));
        assert_eq!(out.manifest.shared_memory_bytes, 64 * 4);
    }
    let bad = KernelConfig::new(
        &RMS_NORM_KERNEL,
        BTreeMap::from([("UNITS".to_string(), "48".to_string())]),
    )
    .unwrap();
    assert!(
        matches!(emit(&RMS_NORM_KERNEL, Target::Wgsl, &bad), Err(Error::Param { param, .. }) if param == "UNITS")
    );
}

/// Joint tunables (a list of configurations) and device requirements, on the library's
/// matmul kernels: the space is the declared list in order, pruned by `require`;
/// emission accepts only a listed combination; a kernel requiring tensor cores has an
/// empty space and refuses to launch where there are none.
#[test]
fn joint_configurations_and_device_requirements() {
    use kiln::kernels::matmul::{
        Activation, MatmulCmma, MatmulCmmaArgs, MatmulCmmaProblem, MatmulStaged,
        MatmulStagedProblem, MATMUL_STAGED_KERNEL,
    };
    let problem = MatmulStagedProblem {
        m: 64,
        n: 64,
        k: 64,
        ..Default::default()
    };
    let space = MatmulStaged::space(client(), &problem);
    let first = space[0];
    assert_eq!(
        (first.BM, first.BN, first.BK, first.TM, first.TN),
        (64, 64, 16, 4, 4)
    );
    assert!(space.len() >= 5, "{} configurations", space.len());
    assert!(space.iter().all(|c| c.BM % c.TM == 0 && c.BN % c.TN == 0));
    // A combination of listed values that is not a listed configuration.
    let values = |v: &[(&str, &str)]| -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, x)| (k.to_string(), x.to_string()))
            .collect()
    };
    let odd = values(&[
        ("BM", "128"),
        ("BN", "64"),
        ("BK", "16"),
        ("TM", "4"),
        ("TN", "4"),
    ]);
    let cfg = KernelConfig::new(&MATMUL_STAGED_KERNEL, odd).unwrap();
    let e = emit(&MATMUL_STAGED_KERNEL, Target::Cuda, &cfg).unwrap_err();
    assert!(e.to_string().contains("declared configurations"), "{e}");
    // Tensor cores: never in the space of a device without them, and refused at launch.
    let cmma = MatmulCmma::space(
        client(),
        &MatmulCmmaProblem {
            m: 64,
            n: 64,
            k: 64,
            trans_b: false,
            has_bias: false,
            has_residual: false,
            act: Activation::None,
        },
    );
    assert_eq!(cmma.is_empty(), !client().report().tensor_cores);
    if !client().report().tensor_cores {
        let t = |s: &[usize]| Tensor::empty(client(), DType::F16, s).unwrap();
        let (a, b, c) = (t(&[16, 16]), t(&[16, 16]), t(&[16, 16]));
        let cfg = kiln::kernels::matmul::MatmulCmmaConfig {
            PLANES_M: 2,
            PLANES_N: 2,
            FRAGS_M: 2,
            FRAGS_N: 2,
            BK: 32,
        };
        if client().supports(DType::F16) {
            let e = MatmulCmma::launch(
                client(),
                &cfg,
                &MatmulCmmaArgs {
                    a: &a,
                    b: &b,
                    bias: &a,
                    residual: &a,
                    c: &c,
                    m: 16,
                    n: 16,
                    k: 16,
                    trans_b: false,
                    has_bias: false,
                    has_residual: false,
                    act: Activation::None,
                },
            )
            .unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        }
    }
}

/// A kernel with 4-wide vector array arguments (`&Array<Vector<F, Const<4>>>`).
mod vector_args {
    use cubecl::prelude::*;
    use kiln::runtime::cubecl;

    /// `out = a x + y`, four elements per access.
    #[kiln::kernel(
        tune(UNITS = [64, 32]),
        grid = (n4.div_ceil(UNITS)),
        cube = UNITS,
        name = "test_axpy_v4"
    )]
    pub fn axpy_v4<F: Float>(
        x: &Array<Vector<F, Const<4>>>,
        y: &Array<Vector<F, Const<4>>>,
        out: &mut Array<Vector<F, Const<4>>>,
        n4: u32,
        a: f32,
    ) {
        let i = ABSOLUTE_POS;
        if i < n4 as usize {
            out[i] = x[i] * Vector::new(F::cast_from(a)) + y[i];
        }
    }
}

/// A kernel whose `require` can fail for a problem: errors name the clause.
mod required {
    use cubecl::prelude::*;
    use kiln::runtime::cubecl;

    /// Copies `len` elements; needs `len` to fill at least one cube of `UNITS`.
    #[kiln::kernel(
        tune(UNITS = [64, 32]),
        require(len >= UNITS),
        grid = (len.div_ceil(UNITS)),
        cube = UNITS,
        name = "test_required"
    )]
    pub fn copy_required<F: Float>(x: &Array<F>, out: &mut Array<F>, len: u32) {
        let i = ABSOLUTE_POS;
        if i < len as usize {
            out[i] = x[i];
        }
    }
}

#[test]
fn an_unmet_require_is_named_by_its_clause() {
    use required::*;
    let x = Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::F32, vec![8], &[1.0; 8]).unwrap(),
    )
    .unwrap();
    let out = Tensor::empty(client(), DType::F32, &[8]).unwrap();
    let args = CopyRequiredArgs {
        x: &x,
        out: &out,
        len: 8,
    };
    // No configuration fits len = 8: `tuned` names the first and the clause it fails.
    let e = CopyRequired::tuned(client(), 0.0, &args)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test_required") && e.contains("require(len >= UNITS)") && e.contains("len: 8"),
        "{e}"
    );
    // And `launch` with a hand-built configuration names the same clause.
    let e = CopyRequired::launch(client(), &CopyRequiredConfig { UNITS: 32 }, &args)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("UNITS=32") && e.contains("require(len >= UNITS)"),
        "{e}"
    );
}

/// A grid that is a product of two scalars (as varlen attention's `n_seq * tiles`).
mod grid_product {
    use cubecl::prelude::*;
    use kiln::runtime::cubecl;

    /// Writes 1 to `out[0]` from the first unit; `rows * cols` cubes.
    #[kiln::kernel(
        tune(UNITS = [32]),
        grid = (rows * cols),
        cube = UNITS,
        name = "test_grid_product"
    )]
    pub fn grid_product<F: Float>(out: &mut Array<F>, rows: u32, cols: u32) {
        if ABSOLUTE_POS == 0 {
            out[0] = F::new(1.0);
        }
    }
}

/// The tensor-core kernels' operand staging (`fetch_tile_v8`, `stage_tile_v8`) alone: it
/// runs on every device, so lavapipe checks what the `wmma` kernels stage.
mod staging_v8 {
    use cubecl::prelude::*;
    use kiln::runtime::cubecl;
    use kiln_dsl::{fetch_tile_v8, stage_tile_v8, V8};

    /// A 5 x 16 tile of `src` (f32, rows `row_stride` vectors apart, from vector
    /// `src_base`; 10 vectors over 4 units, the last round partial) fetched as `F`,
    /// staged with rows 24 elements apart, then written to `out` row-major `[5][16]`.
    #[kiln::kernel(
        tune(UNITS = [4]),
        grid = (1),
        cube = UNITS,
        name = "test_stage_v8"
    )]
    pub fn stage_v8<F: Float>(
        src: &Array<Vector<f32, Const<8>>>,
        out: &mut Array<F>,
        src_base: u32,
        row_stride: u32,
        rows_valid: u32,
        cols_valid: u32,
    ) {
        let mut regs = Array::<V8<F>>::new(3usize);
        fetch_tile_v8::<f32, F>(
            &mut regs, src, src_base, row_stride, rows_valid, cols_valid, 5u32, 16u32, UNITS,
        );
        let mut smem = SharedMemory::<V8<F>>::new(15usize);
        stage_tile_v8::<F>(&mut smem, &regs, 5u32, 16u32, UNITS);
        sync_cube();
        if UNIT_POS == 0 {
            for r in 0..5u32 {
                for cv in 0..2u32 {
                    let v = smem[(r * 3 + cv) as usize];
                    #[unroll]
                    for l in 0..8u32 {
                        out[(r * 16 + cv * 8 + l) as usize] = v[l as usize];
                    }
                }
            }
        }
    }
}

#[test]
fn tensor_core_staging_fetches_masks_converts_and_pads() {
    use staging_v8::{StageV8, StageV8Args};
    // src: 7 rows of 24 f32 (3 vectors); the tile starts at row 1, vector 1; 4 rows and 8
    // columns are real: row 4 and the second vector of each row are zero.
    let (rows, cols) = (7usize, 24usize);
    let src_h: Vec<f64> = (0..rows * cols).map(|i| (i as f64 * 0.37).sin()).collect();
    let src = Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::F32, vec![rows * cols], &src_h).unwrap(),
    )
    .unwrap();
    for dtype in [DType::F32, DType::F16] {
        if common::refused(dtype) {
            continue;
        }
        let out = Tensor::empty(client(), dtype, &[80]).unwrap();
        StageV8::tuned(
            client(),
            0.0,
            &StageV8Args {
                src: &src,
                out: &out,
                src_base: 3 + 1,
                row_stride: 3,
                rows_valid: 4,
                cols_valid: 8,
            },
        )
        .unwrap();
        let got = out.download().unwrap().to_f64();
        for r in 0..5 {
            for c in 0..16 {
                let want = if r < 4 && c < 8 {
                    src_h[(1 + r) * cols + 8 + c]
                } else {
                    0.0
                };
                let g = got[r * 16 + c];
                assert!(
                    (g - want).abs() <= dtype.epsilon() * want.abs(),
                    "{dtype} ({r}, {c}): {g} vs {want}"
                );
            }
        }
    }
}

#[test]
fn vector_array_arguments_run_check_and_emit() {
    use vector_args::{AxpyV4, AxpyV4Args, AxpyV4Problem, AXPY_V4_KERNEL};
    for dtype in [DType::F32, DType::F16] {
        if common::refused(dtype) {
            continue;
        }
        let n = 4 * 37;
        let mut rng = Rng::new(5);
        let (xs, ys) = (rng.normals(n, 1.0), rng.normals(n, 1.0));
        let up = |v: &[f64]| {
            Tensor::upload(client(), &HostTensor::from_f64(dtype, vec![n], v).unwrap()).unwrap()
        };
        let (x, y) = (up(&xs), up(&ys));
        let out = Tensor::empty(client(), dtype, &[n]).unwrap();
        AxpyV4::tuned(
            client(),
            0.0,
            &AxpyV4Args {
                x: &x,
                y: &y,
                out: &out,
                n4: (n / 4) as u32,
                a: 0.5,
            },
        )
        .unwrap();
        let got = out.download().unwrap().to_f64();
        let want: Vec<f64> = x
            .download()
            .unwrap()
            .to_f64()
            .iter()
            .zip(y.download().unwrap().to_f64())
            .map(|(x, y)| 0.5 * x + y)
            .collect();
        let err = max_rel_error(&got, &want, 1e-3);
        assert!(err <= 2.0 * dtype.epsilon(), "{dtype}: {err:.2e}");
    }
    // A length that is not a whole number of vectors is refused, naming the tensor.
    let t6 = Tensor::empty(client(), DType::F32, &[2, 3]).unwrap();
    let t8 = Tensor::empty(client(), DType::F32, &[8]).unwrap();
    let cfg = AxpyV4::space(client(), &AxpyV4Problem { n4: 2, a: 0.5 })[0];
    let e = AxpyV4::launch(
        client(),
        &cfg,
        &AxpyV4Args {
            x: &t6,
            y: &t8,
            out: &t8,
            n4: 2,
            a: 0.5,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "x")
            && e.to_string().contains("divisible by 4"),
        "{e}"
    );
    // A grid past the device's cube count per dimension is refused before the dispatch
    // (wgpu would panic on it), naming the kernel and the limits. The tensors are
    // small: nothing is launched.
    let max_x = client().report().max_cube_count.0;
    if max_x < u32::MAX {
        let n4 = (u64::from(max_x) + 1) * u64::from(cfg.UNITS);
        if let Ok(n4) = u32::try_from(n4) {
            let e = AxpyV4::launch(
                client(),
                &cfg,
                &AxpyV4Args {
                    x: &t8,
                    y: &t8,
                    out: &t8,
                    n4,
                    a: 0.5,
                },
            )
            .unwrap_err();
            assert!(
                matches!(&e, Error::Unsupported { .. })
                    && e.to_string().contains("test_axpy_v4")
                    && e.to_string().contains(&max_x.to_string()),
                "{e}"
            );
        }
    }
    // The emitted WGSL binds the arrays as vectors.
    let cfg = KernelConfig::new(&AXPY_V4_KERNEL, BTreeMap::new()).unwrap();
    let src = emit(&AXPY_V4_KERNEL, Target::Wgsl, &cfg).unwrap().source;
    assert!(src.contains("array<vec4<f32>>"), "{src}");
}

#[test]
fn a_grid_product_past_32_bits_is_refused_not_wrapped() {
    use grid_product::{GridProduct, GridProductArgs, GridProductProblem};
    let out = Tensor::empty(client(), DType::F32, &[1]).unwrap();
    let cfg = GridProduct::space(client(), &GridProductProblem { rows: 1, cols: 1 })[0];
    // 2^16 x 2^16 = 2^32 cubes: in u32 the product wrapped to an empty grid and the
    // launch "succeeded" having run nothing.
    let e = GridProduct::launch(
        client(),
        &cfg,
        &GridProductArgs {
            out: &out,
            rows: 1 << 16,
            cols: 1 << 16,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { .. })
            && e.to_string().contains("test_grid_product")
            && e.to_string().contains("4294967296"),
        "{e}"
    );
    // A grid that fits still runs.
    GridProduct::launch(
        client(),
        &cfg,
        &GridProductArgs {
            out: &out,
            rows: 2,
            cols: 3,
        },
    )
    .unwrap();
    assert_eq!(out.download().unwrap().to_f64(), vec![1.0]);
}

/// A kernel one of whose configurations skips the last element.
mod skips_last {
    use cubecl::prelude::*;
    use kiln::runtime::cubecl;

    /// `out[i] = 2 x[i]` for `i < len + 1 - KEEP`: `KEEP = 2` leaves the last element as
    /// it was.
    #[kiln::kernel(
        tune(UNITS = [32], KEEP = [1, 2]),
        grid = (len.div_ceil(UNITS)),
        cube = UNITS,
        name = "test_skips_last"
    )]
    pub fn skips_last<F: Float>(x: &Array<F>, out: &mut Array<F>, len: u32) {
        let i = ABSOLUTE_POS;
        if i + (KEEP as usize) < len as usize + 1 {
            out[i] = x[i] * F::new(2.0);
        }
    }
}

/// `tuned` checks each candidate in fresh outputs filled with poison: a configuration
/// that leaves an element unwritten fails the check even where the caller's output (or
/// the candidate run before it) already holds the right value there. Checked in the
/// caller's buffers, `KEEP = 2` passed, as a GLA candidate that skipped column 39 did.
#[test]
fn a_configuration_that_skips_an_element_fails_the_tuners_check() {
    use kiln::runtime::tune::{Autotuner, CandidateStatus, TuneEvent, TuneMode};
    use skips_last::{SkipsLast, SkipsLastArgs};
    use std::sync::{Arc, Mutex};
    let dir = std::env::temp_dir().join(format!("kiln-skips-last-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tuner = Autotuner::new(&dir, TuneMode::On);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tuner.observe(move |e| {
        if let TuneEvent::Candidate { label, status } = e {
            log.lock().unwrap().push((label.clone(), status.clone()));
        }
    });
    let len = 100usize;
    let xs: Vec<f64> = (0..len).map(|i| i as f64 - 40.5).collect();
    let want: Vec<f64> = xs.iter().map(|v| 2.0 * v).collect();
    let up = |v: &[f64]| {
        Tensor::upload(
            client(),
            &HostTensor::from_f64(DType::F32, vec![len], v).unwrap(),
        )
        .unwrap()
    };
    // The caller's output already holds the answer: only fresh outputs can tell.
    let (x, out) = (up(&xs), up(&want));
    let args = SkipsLastArgs {
        x: &x,
        out: &out,
        len: len as u32,
    };
    let cfg = SkipsLast::tuned_by(&tuner, client(), 0.0, &args, None).unwrap();
    assert_eq!(cfg.KEEP, 1);
    let seen = seen.lock().unwrap().clone();
    let skipper = seen.iter().find(|(l, _)| l.contains("KEEP=2"));
    assert!(
        matches!(skipper, Some((_, CandidateStatus::Mismatch(_)))),
        "{seen:?}"
    );
    assert_eq!(out.download().unwrap().to_f64(), want);
}
