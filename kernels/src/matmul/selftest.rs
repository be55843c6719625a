//! Self-test cases of `matmul`: a ragged GEMM with the whole epilogue, a GEMV with `b`
//! transposed, and both again on the tensor-core tiles alone, against the f64 reference.

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

/// a [77, 136] @ b [136, 40] with bias and residual, for the tensor-core tiles (K and N
/// multiples of 8; 77 rows and 40 columns fill no 16 x 16 fragment grid of any tile).
fn tensor_core_inputs(rng: &mut Rng) -> CaseInputs {
    let (m, k, n) = (77, 136, 40);
    vec![
        ("a", vec![m, k], rng.normals(m * k, 1.0)),
        ("b", vec![k, n], rng.normals(k * n, 1.0)),
        ("bias", vec![n], rng.normals(n, 1.0)),
        ("residual", vec![m, n], rng.normals(m * n, 1.0)),
    ]
}

/// a [33, 264] @ b [72, 264]^T: b as it lies, read as column-major fragments.
fn tensor_core_trans_inputs(rng: &mut Rng) -> CaseInputs {
    let (m, k, n) = (33, 264, 72);
    vec![
        ("a", vec![m, k], rng.normals(m * k, 1.0)),
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
            roundings: 1.0,
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
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        // The tensor-core tiles alone (skipped, saying so, where there are none: CPU
        // adapters, f32). Untuned, the first tile (128 x 128, 4 x 4 fragments per plane);
        // with `kiln selftest --tune`, the tile the autotuner picks among them.
        Case {
            op: "matmul",
            params: &[("kernel", "tensor_cores"), ("activation", "gelu")],
            output: "c",
            what: "[77,136]@[136,40], whole epilogue, tensor cores",
            inputs: tensor_core_inputs,
            reference: |i| matmul_reference(i, false, "gelu"),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "matmul",
            params: &[("kernel", "tensor_cores"), ("trans_b", "true")],
            output: "c",
            what: "[33,264]@[72,264]^T, tensor cores",
            inputs: tensor_core_trans_inputs,
            reference: |i| matmul_reference(i, true, "none"),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
    ]
}
