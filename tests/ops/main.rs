//! The operator suite in f32 (`suite.rs`, instantiated here per device), tuned as a user's
//! first call is: every operator's first call on a fresh tune cache ranks, compiles,
//! validates and times its finalists. The same suite in f16 and bf16 runs untuned in
//! `ops_half`. Beside it, the operators' edge cases: grids past one dimension, empty and
//! rank-0 tensors, subnormal-range softmax, 32-bit indexing limits, and the errors that
//! name the caller's tensors and parameters.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

#[path = "../common/mod.rs"]
mod common;
#[macro_use]
mod suite;

use common::client;
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::elementwise::{BinaryOp, ElementwiseBinary, ElementwiseBinaryArgs};
use kiln::kernels::{elementwise, rowwise};
use kiln::selftest::cases;
use kiln::{DType, Error, HostTensor, Tensor};
use std::collections::BTreeMap;
use suite::{every_other_op, run_op_on};

testgen_ops!(devices: [wgpu => "wgpu", cuda => "cuda"], dtypes: [f32 => DType::F32]);

/// A test derived from the registry: every registered operator has a self-test case
/// (`every_op_has_a_case`) and is run by the suite, listed or not; the list only names
/// the operators that get a test of their own.
#[test]
fn the_list_names_registered_operators() {
    let names: Vec<&str> = kiln::kernels::ops().iter().map(|o| o.name).collect();
    for listed in TESTED {
        assert!(
            names.contains(listed),
            "`{listed}` in testgen_ops! is not a registered operator"
        );
    }
}

fn upload_f64(shape: Vec<usize>, v: &[f64]) -> Tensor {
    Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::F32, shape, v).unwrap(),
    )
    .unwrap()
}

#[test]
fn every_op_has_a_case() {
    for op in kiln::kernels::ops() {
        assert!(
            cases().iter().any(|c| c.op == op.name),
            "no selftest case for {}",
            op.name
        );
    }
}

#[test]
fn softmax_more_rows_than_one_grid_dimension() {
    // 70 000 rows > 65 535 cubes: the grid wraps into y.
    let (rows, cols) = (70_000, 3);
    let v = Rng::new(3).normals(rows * cols, 3.0);
    let got = rowwise::softmax(&upload_f64(vec![rows, cols], &v))
        .unwrap()
        .download()
        .unwrap();
    let want = rowwise::reference::softmax(
        &HostTensor::from_f64(DType::F32, vec![rows, cols], &v)
            .unwrap()
            .to_f64(),
        cols,
    );
    assert!(max_rel_error(&got.to_f64(), &want, 1e-6) < 2e-6);
}

/// Probabilities just above f32's smallest normal (`x - max` in `[ln 2^-126, -87)`) are
/// computed, not flushed (the cut was at -87 until 2026-12-05); below `ln 2^-126` they
/// flush to 0 (no subnormal results, whatever the backend's denormal mode).
#[test]
fn softmax_keeps_normal_results_down_to_the_smallest_normal() {
    let xs = [-87.0, -87.2, -87.33, -87.4, -100.0];
    let v: Vec<f64> = xs.iter().flat_map(|&x| [0.0, x]).collect();
    let got = rowwise::softmax(&upload_f64(vec![xs.len(), 2], &v))
        .unwrap()
        .download()
        .unwrap()
        .to_f64();
    for (row, &x) in xs.iter().enumerate() {
        let (p, want) = (got[2 * row + 1], (x as f32 as f64).exp());
        if want >= f64::from(f32::MIN_POSITIVE) {
            assert!(
                (p - want).abs() <= 4e-7 * want,
                "x = {x}: {p:e} against {want:e}"
            );
        } else {
            assert_eq!(p, 0.0, "x = {x}");
        }
    }
}

#[test]
fn broadcast_over_several_vectors_a_unit_matches_f64() {
    // Each unit handles 4 (GPUs) or 16 (CPU adapters) vectors a grid apart; both are
    // launched here. y's length divides that distance (y loaded once a unit: 512 x 32,
    // 64 x 2048) or does not (reloaded per vector: 513 x 24, and 700 x 7, one element a
    // vector). f32 and f16: a sum or product of two values of the dtype, rounded once
    // from f64 to it, is what the kernel computes in that dtype.
    let mut rng = Rng::new(11);
    for dtype in [DType::F32, DType::F16] {
        let round = |v: &[f64]| {
            HostTensor::from_f64(dtype, vec![v.len()], v)
                .unwrap()
                .to_f64()
        };
        for (rows, cols) in [(512, 32), (64, 2048), (513, 24), (700, 7)] {
            let (x, y) = (
                round(&rng.normals(rows * cols, 2.0)),
                round(&rng.normals(cols, 2.0)),
            );
            let up = |shape: Vec<usize>, v: &[f64]| {
                Tensor::upload(client(), &HostTensor::from_f64(dtype, shape, v).unwrap()).unwrap()
            };
            let (xt, yt) = (up(vec![rows, cols], &x), up(vec![cols], &y));
            for (name, got, want) in [
                (
                    "add",
                    elementwise::add(&xt, &yt),
                    elementwise::reference::add(&x, &y),
                ),
                (
                    "mul",
                    elementwise::mul(&xt, &yt),
                    elementwise::reference::mul(&x, &y),
                ),
            ] {
                let got = got.unwrap().download().unwrap().to_f64();
                assert_eq!(got, round(&want), "{name} {dtype} {rows} x {cols}");
                // Every declared configuration, whichever the device's own choice is,
                // each into its own output.
                let outs: Vec<Tensor> = (0..2)
                    .map(|_| Tensor::empty(client(), dtype, &[rows, cols]).unwrap())
                    .collect();
                let args = |out| ElementwiseBinaryArgs {
                    x: &xt,
                    y: &yt,
                    out,
                    len: (rows * cols) as u32,
                    y_len: cols as u32,
                    op: if name == "add" {
                        BinaryOp::Add
                    } else {
                        BinaryOp::Mul
                    },
                };
                let space = ElementwiseBinary::space(client(), &args(&outs[0]).problem());
                assert_eq!(space.len(), 2, "PER_UNIT 4 and 16");
                for (cfg, out) in space.iter().zip(&outs) {
                    ElementwiseBinary::launch(client(), cfg, &args(out)).unwrap();
                    let got = out.download().unwrap().to_f64();
                    assert_eq!(got, round(&want), "{name} {dtype} {rows} x {cols} {cfg:?}");
                }
            }
        }
    }
}

#[test]
fn mul_more_elements_than_one_grid_dimension() {
    // 65 535 * 256 + 5 elements, odd: scalar path over a two-dimensional grid.
    let n = 65_535 * 256 + 5;
    let x: Vec<f64> = (0..n).map(|i| (i % 1000) as f64 * 0.5).collect();
    let y = [3.0];
    let got = elementwise::mul(&upload_f64(vec![n], &x), &upload_f64(vec![1], &y))
        .unwrap()
        .download()
        .unwrap()
        .to_f64();
    assert_eq!(got.len(), n);
    assert_eq!(got[n - 1], ((n - 1) % 1000) as f64 * 1.5);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, &g)| g == (i % 1000) as f64 * 1.5));
}

#[test]
fn empty_tensors_give_empty_outputs() {
    let x = upload_f64(vec![0, 5], &[]);
    assert_eq!(rowwise::softmax(&x).unwrap().shape(), &[0, 5]);
    assert_eq!(rowwise::logsumexp(&x).unwrap().shape(), &[0]);
    assert_eq!(elementwise::silu(&x).unwrap().shape(), &[0, 5]);
}

#[test]
fn broadcast_shape_mismatch_names_y() {
    let x = upload_f64(vec![3, 4], &[0.0; 12]);
    let y = upload_f64(vec![3], &[0.0; 3]);
    match elementwise::add(&x, &y) {
        Err(Error::Shape {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(tensor, "y");
            assert!(expected.contains("[3, 4]"), "{expected}");
            assert_eq!(found, "[3]");
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // y of higher rank than x.
    let y = upload_f64(vec![1, 3, 4], &[0.0; 12]);
    assert!(elementwise::add(&x, &y).is_ok(), "leading 1s are allowed");
    let y = upload_f64(vec![2, 3, 4], &[0.0; 24]);
    assert!(matches!(elementwise::add(&x, &y), Err(Error::Shape { .. })));
}

#[test]
fn dtype_mismatch_names_the_tensor() {
    let x = upload_f64(vec![4], &[1.0; 4]);
    let y16 = Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::F16, vec![4], &[1.0; 4]).unwrap(),
    )
    .unwrap();
    match elementwise::mul(&x, &y16) {
        Err(Error::DType { tensor, found, .. }) => {
            assert_eq!(tensor, "y");
            assert_eq!(found, "f16");
        }
        other => panic!("expected a dtype error, got {other:?}"),
    }
    let xi = Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::I32, vec![2, 2], &[1.0; 4]).unwrap(),
    )
    .unwrap();
    match rowwise::softmax(&xi) {
        Err(Error::DType {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!((tensor.as_str(), found.as_str()), ("x", "i32"));
            assert!(expected.contains("f32"));
        }
        other => panic!("expected a dtype error, got {other:?}"),
    }
}

#[test]
fn rank_zero_rows_are_refused() {
    let x = upload_f64(vec![], &[1.0]);
    assert!(matches!(rowwise::softmax(&x), Err(Error::Shape { tensor, .. }) if tensor == "x"));
}

#[test]
fn empty_last_dimension_follows_pytorch() {
    // softmax over D = 0 is empty; logsumexp of an empty sum is -inf.
    let x = upload_f64(vec![3, 0], &[]);
    assert_eq!(rowwise::softmax(&x).unwrap().shape(), &[3, 0]);
    let lse = rowwise::logsumexp(&x).unwrap().download().unwrap();
    assert_eq!(lse.shape, vec![3]);
    assert!(lse.to_f64().iter().all(|&v| v == f64::NEG_INFINITY));
}

#[test]
fn host_tensor_bytes_must_match_its_shape() {
    let mut h = HostTensor::from_f32(vec![4], &[1.0; 4]).unwrap();
    h.shape = vec![8];
    match Tensor::upload_named(client(), "x", &h) {
        Err(Error::Shape {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(tensor, "x");
            assert!(
                expected.contains("32 bytes") && found.contains("16 bytes"),
                "{expected} / {found}"
            );
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // A shape whose product overflows, or a zero-size shape with a dimension past
    // 32-bit indexing: refused by name, as `Tensor::empty` refuses them (the product
    // panicked in debug builds, or wrapped to an empty buffer).
    for shape in [vec![1 << 32, 1 << 32], vec![1 << 40, 0]] {
        h.shape = shape.clone();
        h.data = vec![];
        let e = Tensor::upload_named(client(), "x", &h).unwrap_err();
        assert!(e.to_string().contains('x'), "{shape:?}: {e}");
    }
    // Zeros of every dtype.
    for dtype in [DType::F32, DType::I8, DType::U32] {
        let z = Tensor::zeros(client(), dtype, &[3, 5]).unwrap();
        assert_eq!(z.download().unwrap().to_f64(), vec![0.0; 15], "{dtype}");
    }
}

#[test]
fn shapes_past_32_bit_indexing_are_refused_by_name() {
    // Products past usize, counts past i32, and one huge dimension beside a zero one:
    // errors naming the tensor, not an overflow or a huge allocation.
    for shape in [
        vec![1usize << 32, 1 << 32],
        vec![1 << 31, 2],
        vec![1 << 40, 0],
    ] {
        let e = HostTensor::from_bytes(DType::F32, shape.clone(), vec![]).unwrap_err();
        assert!(
            matches!(&e, Error::Shape { tensor, .. } if tensor == "data"),
            "{shape:?}: {e}"
        );
        let e = HostTensor::from_f64(DType::F32, shape.clone(), &[]).unwrap_err();
        assert!(
            matches!(&e, Error::Shape { tensor, .. } if tensor == "values"),
            "{e}"
        );
        let e = Tensor::empty(client(), DType::F32, &shape).err().unwrap();
        assert!(
            matches!(&e, Error::Shape { tensor, .. } if tensor == "output"),
            "{e}"
        );
    }
    let x = upload_f64(vec![2, 3], &[0.0; 6]);
    assert!(matches!(x.reshape(&[1 << 40, 0]), Err(Error::Shape { .. })));
}

#[test]
fn registry_errors_name_what_is_missing() {
    let op = kiln::kernels::op("add").unwrap();
    let mut tensors = BTreeMap::new();
    tensors.insert("x".to_string(), upload_f64(vec![2], &[1.0, 2.0]));
    match op.call(client(), tensors.clone(), BTreeMap::new()) {
        Err(Error::MissingTensor {
            tensor, expected, ..
        }) => {
            assert_eq!(tensor, "y");
            assert!(expected.contains("suffix"), "{expected}");
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    let params = BTreeMap::from([("alpha".to_string(), "2".to_string())]);
    assert!(
        matches!(op.call(client(), tensors, params), Err(Error::UnknownParam { param, .. }) if param == "alpha")
    );
    assert!(
        matches!(kiln::kernels::op("sofmax"), Err(Error::Unknown { name, .. }) if name == "sofmax")
    );
}

#[test]
fn bf16_is_refused_clearly_where_missing() {
    let h = HostTensor::from_f64(DType::BF16, vec![2], &[1.0, 2.0]).unwrap();
    match Tensor::upload(client(), &h) {
        Ok(t) => {
            assert!(client().supports(DType::BF16));
            let out = elementwise::silu(&t).unwrap().download().unwrap().to_f64();
            let want = elementwise::reference::silu(&[1.0, 2.0]);
            assert!(max_rel_error(&out, &want, 1e-6) < 1e-2);
        }
        Err(e) => {
            assert!(!client().supports(DType::BF16));
            let msg = e.to_string();
            assert!(
                matches!(e, Error::Unsupported { .. }) && msg.contains("bf16"),
                "{msg}"
            );
        }
    }
}

/// `kiln run`'s path: named host tensors and `key=value` parameters.
fn run_named(
    op: &str,
    tensors: &[(&str, DType, Vec<usize>, Vec<f64>)],
    params: &[(&str, &str)],
) -> kiln::Result<(BTreeMap<String, HostTensor>, Vec<String>)> {
    let hosts = tensors
        .iter()
        .map(|(n, d, s, v)| {
            (
                n.to_string(),
                HostTensor::from_f64(*d, s.clone(), v).unwrap(),
            )
        })
        .collect();
    let params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    kiln::kernels::op(op)?.call_host_noting(client(), &hosts, params)
}

fn f32s(n: usize) -> Vec<f64> {
    (0..n).map(|i| (i % 7) as f64 * 0.25 - 0.5).collect()
}

/// Errors through `kiln run` name the caller's tensors and parameters (not the names of
/// the functions an operator calls), and what a call did not use is reported.
#[test]
fn kiln_run_errors_name_the_callers_tensors_and_parameters() {
    use DType::{F32, I32};
    let err = |r: kiln::Result<_>| r.expect_err("must fail").to_string();
    let has = |m: &str, words: &[&str]| {
        assert!(!m.contains('\n'), "{m}");
        for w in words {
            assert!(m.contains(w), "`{w}` not in: {m}");
        }
    };
    // Outputs the device cannot hold are refused before a host buffer is built (an
    // empty input with a huge other dimension: K = 0, D = 0), f32 outputs of one more
    // element than the device's largest buffer holds. A device whose largest buffer
    // holds every tensor kiln indexes (i32::MAX elements; a GPU with 32+ GiB) has no
    // such output.
    let huge = |name: &'static str, shape: Vec<usize>| (name, F32, shape, vec![]);
    let rows = (client().report().max_buffer_bytes / 4 + 1) as usize;
    if rows <= kiln::runtime::MAX_ELEMENTS {
        let m = err(run_named(
            "matmul",
            &[huge("a", vec![rows.div_ceil(4), 0]), huge("b", vec![0, 4])],
            &[],
        ));
        has(&m, &["buffer", "output"]);
        let m = err(run_named("logsumexp", &[huge("x", vec![rows, 0])], &[]));
        has(&m, &["buffer", "out"]);
    }
    // MoE: E and C from the slots tensor's shape.
    let routes = |ids: &[f64], locs: &[f64], k: usize| {
        let s = ids.len() / k;
        vec![
            ("expert_ids", I32, vec![s, k], ids.to_vec()),
            ("locations", I32, vec![s, k], locs.to_vec()),
        ]
    };
    let mut t = routes(&[0.0, 1.0], &[0.0, 2.0], 1);
    t.push(("expert_out", F32, vec![2, 2, 3], f32s(12)));
    t.push(("gates", F32, vec![2, 1], vec![1.0, 1.0]));
    has(
        &err(run_named("moe_combine", &t, &[])),
        &["locations", "below C = 2", "expert_out", "slot 2"],
    );
    // E x C past 32-bit indexing (an empty M keeps the tensor itself small): the slots'
    // limit, not a location.
    let mut t = routes(&[0.0], &[0.0], 1);
    t.push(("d_dispatched", F32, vec![50000, 50000, 0], vec![]));
    has(
        &err(run_named("moe_dispatch_backward", &t, &[])),
        &["d_dispatched", "E x C slots at most"],
    );
    let mut t = routes(&[0.0], &[0.0], 1);
    t.push(("d_dispatched", F32, vec![1, 3], f32s(3)));
    has(
        &err(run_named("moe_dispatch_backward", &t, &[])),
        &["d_dispatched", "[E, C, M]"],
    );
    let mut t = routes(&[0.0], &[0.0], 1);
    t.push(("d_dispatched", F32, vec![0, 1, 3], vec![]));
    has(
        &err(run_named("moe_dispatch_backward", &t, &[])),
        &["d_dispatched", "E >= 1"],
    );
    let mut t = routes(&[], &[], 1);
    t[0].2 = vec![3, 0];
    t[1].2 = vec![3, 0];
    t.push(("x", F32, vec![3, 2], f32s(6)));
    has(
        &err(run_named("moe_dispatch", &t, &[])),
        &["expert_ids", "k >= 1"],
    );
    // Perturbation: the parameter the caller set.
    let p = [("param", F32, vec![4], f32s(4))];
    has(
        &err(run_named("perturb", &p, &[("eps", "1e39")])),
        &["`eps`", "1e39"],
    );
    let mut z = p.to_vec();
    z.push(("projected_grads", F32, vec![1], vec![2.0]));
    has(
        &err(run_named("zo_update", &z, &[("lr", "2e38")])),
        &["`lr`", "2e38 x 2"],
    );
    z[1] = ("projected_grads", F32, vec![0], vec![]);
    has(
        &err(run_named("zo_update", &z, &[])),
        &["projected_grads", "at least one"],
    );
    // An optimizer's decoupled decay `1 - lr weight_decay` overflowing f32.
    let step = [
        ("param", F32, vec![4], f32s(4)),
        ("grad", F32, vec![4], f32s(4)),
    ];
    has(
        &err(run_named(
            "adamw",
            &step,
            &[("lr", "1e38"), ("weight_decay", "1e38")],
        )),
        &["lr, weight_decay", "1e38 x 1e38"],
    );
    // FlexRound's bounds are f32 in the kernels.
    let fr = [
        ("w", F32, vec![2, 2], f32s(4)),
        ("s1", F32, vec![1], vec![0.1]),
        ("s2", F32, vec![2, 2], vec![1.0; 4]),
        ("s3", F32, vec![2], vec![1.0; 2]),
        ("s4", F32, vec![2], vec![1.0; 2]),
    ];
    has(
        &err(run_named("flexround", &fr, &[("qmax", "1e40")])),
        &["qmin, qmax", "f32"],
    );
    // A parameter or tensor the call does not use is reported, not silently dropped.
    let ffn = [
        ("perm", I32, vec![2], vec![1.0, 0.0]),
        ("w_up", F32, vec![2, 3], f32s(6)),
        ("w_gate", F32, vec![2, 3], f32s(6)),
        ("w_down", F32, vec![3, 2], f32s(6)),
    ];
    let (_, unused) = run_named("s2ft_permute", &ffn, &[("head_dim", "abc")]).unwrap();
    assert_eq!(unused, vec!["head_dim=abc".to_string()]);
    let (_, unused) = run_named("s2ft_permute", &ffn, &[]).unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    // S²FT: one layer's matrices share the model dimension d (x's too).
    let mut bad = ffn.to_vec();
    bad[2] = ("w_gate", F32, vec![2, 4], f32s(8));
    has(
        &err(run_named("s2ft_permute", &bad, &[])),
        &["w_gate", "d = 3 (w_up's)", "[2, 4]"],
    );
    let mut verify = ffn.to_vec();
    verify.push(("x", F32, vec![2, 3], f32s(6)));
    verify[3] = ("w_down", F32, vec![4, 2], f32s(8));
    has(
        &err(run_named("s2ft_verify", &verify, &[])),
        &["w_down", "d = 3"],
    );
    verify[3] = ("w_down", F32, vec![3, 2], f32s(6));
    verify[4] = ("x", F32, vec![2, 5], f32s(10));
    has(
        &err(run_named("s2ft_verify", &verify, &[])),
        &["`x`", "d = 3"],
    );
    let attn = [
        ("perm", I32, vec![2], vec![1.0, 0.0]),
        ("w_q", F32, vec![6, 3], f32s(18)),
        ("w_k", F32, vec![4, 3], f32s(12)),
        ("w_v", F32, vec![4, 3], f32s(12)),
        ("w_o", F32, vec![3, 6], f32s(18)),
    ];
    // head_dim 2 (w_k's 4 rows / 2 units): w_q's 3 heads are not a multiple of 2 groups.
    has(
        &err(run_named("s2ft_permute", &attn, &[])),
        &["w_q", "hd = 2", "U = 2"],
    );
    has(
        &err(run_named("s2ft_permute", &attn, &[("head_dim", "0")])),
        &["head_dim", ">= 1"],
    );
    // A w_k that is not a matrix: named, not an index past its shape.
    let scalar_k = [attn[0].clone(), ("w_k", F32, vec![], vec![1.0])];
    has(
        &err(run_named("s2ft_permute", &scalar_k, &[("head_dim", "0")])),
        &["w_k", "matrix"],
    );
    let neg = [("perm", I32, vec![3], vec![2.0, -1.0, 0.0]), ffn[1].clone()];
    has(
        &err(run_named("s2ft_permute", &neg, &[])),
        &["perm", "0..3", "-1 at index 1"],
    );
    has(
        &err(run_named(
            "s2ft_select",
            &[],
            &[("strategy", "explicit"), ("num_units", "4")],
        )),
        &["units_a", "neither"],
    );
    has(
        &err(run_named(
            "s2ft_select",
            &[],
            &[
                ("num_units", "2147483647"),
                ("count_a", "0"),
                ("count_b", "0"),
            ],
        )),
        &["buffer", "perm"],
    );
}
