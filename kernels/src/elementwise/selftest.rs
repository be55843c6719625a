//! Self-test cases of the element-wise operators: ragged shapes (scalar and vector
//! paths, broadcast suffixes) and the activations' awkward ranges, against the f64
//! references.

use super::reference as ew;
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

fn x(inputs: &BTreeMap<String, HostTensor>) -> (Vec<f64>, usize) {
    let t = &inputs["x"];
    (t.to_f64(), *t.shape.last().unwrap_or(&1))
}

/// Values spanning the activations' awkward ranges: tiny, moderate, huge, +-30.
fn activation_inputs(rng: &mut Rng) -> CaseInputs {
    let mut v = rng.normals(5 * 103, 3.0);
    v[..8].copy_from_slice(&[0.0, -0.0, 30.0, -30.0, 1e-4, -1e-4, 60.0, -60.0]);
    vec![("x", vec![5, 103], v)]
}

fn binary_inputs(rng: &mut Rng) -> CaseInputs {
    // 3 x 7 x 37: no vector width but 1 divides 37, exercising the scalar path.
    vec![
        ("x", vec![3, 7, 37], rng.normals(3 * 7 * 37, 2.0)),
        ("y", vec![37], rng.normals(37, 2.0)),
    ]
}

fn binary_inputs_vec(rng: &mut Rng) -> CaseInputs {
    // [9, 2, 20] with y [2, 20]: 4-wide vectors, a two-dimensional broadcast suffix.
    vec![
        ("x", vec![9, 2, 20], rng.normals(360, 2.0)),
        ("y", vec![1, 2, 20], rng.normals(40, 2.0)),
    ]
}

/// The element-wise operators' cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "add",
            params: &[],
            output: "out",
            what: "[3,7,37] + [37]",
            inputs: binary_inputs,
            reference: |i| ew::add(&i["x"].to_f64(), &i["y"].to_f64()),
            roundings: 1.0,
            ulps: 1.0,
            floor: 1e-6,
        },
        Case {
            op: "add",
            params: &[],
            output: "out",
            what: "[9,2,20] + [1,2,20] (vectorized)",
            inputs: binary_inputs_vec,
            reference: |i| ew::add(&i["x"].to_f64(), &i["y"].to_f64()),
            roundings: 1.0,
            ulps: 1.0,
            floor: 1e-6,
        },
        Case {
            op: "mul",
            params: &[],
            output: "out",
            what: "[3,7,37] * [37]",
            inputs: binary_inputs,
            reference: |i| ew::mul(&i["x"].to_f64(), &i["y"].to_f64()),
            roundings: 1.0,
            ulps: 1.0,
            floor: 1e-6,
        },
        Case {
            op: "silu",
            params: &[],
            output: "out",
            what: "[5,103], |x| up to 60",
            inputs: activation_inputs,
            reference: |i| ew::silu(&x(i).0),
            roundings: 1.0,
            ulps: 8.0,
            floor: 1e-6,
        },
        Case {
            op: "gelu",
            params: &[],
            output: "out",
            what: "[5,103], |x| up to 60",
            inputs: activation_inputs,
            reference: |i| ew::gelu(&x(i).0),
            roundings: 1.0,
            ulps: 32.0,
            floor: 1e-6,
        },
    ]
}
