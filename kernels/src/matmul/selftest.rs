//! Self-test cases of `matmul`: a ragged GEMM with the whole epilogue, and a GEMV with
//! `b` transposed, against the f64 reference.

use super::reference as mm;
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

/// a [77, 130] @ b [130, 45] with bias and residual: no tile divides 77, 130 or 45.
fn matmul_inputs(rng: &mut Rng) -> CaseInputs {
    let (m, k, n) = (77, 130, 45);
    vec![
        ("a", vec![m, k], rng.normals(m * k, 1.0)),
        ("b", vec![k, n], rng.normals(k * n, 1.0)),
        ("bias", vec![n], rng.normals(n, 1.0)),
        ("residual", vec![m, n], rng.normals(m * n, 1.0)),
    ]
}

/// M = 1 (a GEMV), b given as [N, K].
fn gemv_inputs(rng: &mut Rng) -> CaseInputs {
    let (k, n) = (300, 67);
    vec![
        ("a", vec![1, k], rng.normals(k, 1.0)),
        ("b", vec![n, k], rng.normals(n * k, 1.0)),
    ]
}

fn matmul_reference(i: &BTreeMap<String, HostTensor>, trans_b: bool, act: &str) -> Vec<f64> {
    let (a, b) = (&i["a"], &i["b"]);
    let (m, k) = (a.shape[0], a.shape[1]);
    let n = if trans_b { b.shape[0] } else { b.shape[1] };
    let bias = i.get("bias").map(HostTensor::to_f64);
    let res = i.get("residual").map(HostTensor::to_f64);
    mm::matmul(
        &a.to_f64(),
        &b.to_f64(),
        m,
        n,
        k,
        trans_b,
        bias.as_deref(),
        act,
        res.as_deref(),
    )
}

/// `matmul`'s cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "matmul",
            params: &[("activation", "gelu")],
            output: "c",
            what: "[77,130]@[130,45] + bias, gelu, + residual",
            inputs: matmul_inputs,
            reference: |i| matmul_reference(i, false, "gelu"),
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "matmul",
            params: &[("trans_b", "true")],
            output: "c",
            what: "[1,300]@[67,300]^T (GEMV)",
            inputs: gemv_inputs,
            reference: |i| matmul_reference(i, true, "none"),
            ulps: 64.0,
            floor: 1.0,
        },
    ]
}
