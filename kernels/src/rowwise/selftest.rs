//! Self-test cases of the row-wise operators: ragged rows with -inf entries, a fully
//! -inf row and large offsets, against the f64 references.

use super::reference as rw;
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

fn x(inputs: &BTreeMap<String, HostTensor>) -> (Vec<f64>, usize) {
    let t = &inputs["x"];
    (t.to_f64(), *t.shape.last().unwrap_or(&1))
}

/// Rows of 131 with a fully -inf row, a row with -inf entries and a row of large values.
fn row_inputs(rng: &mut Rng) -> CaseInputs {
    let (rows, cols) = (7, 131);
    let mut v = rng.normals(rows * cols, 4.0);
    v[cols..2 * cols].fill(f64::NEG_INFINITY);
    for j in (0..cols).step_by(3) {
        v[2 * cols + j] = f64::NEG_INFINITY;
    }
    for e in &mut v[3 * cols..4 * cols] {
        *e += 1e3;
    }
    vec![("x", vec![rows, cols], v)]
}

/// The row-wise operators' cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "softmax",
            params: &[],
            output: "out",
            what: "[7,131], an all -inf row, -inf entries, +1e3 offsets",
            inputs: row_inputs,
            reference: |i| {
                let (v, c) = x(i);
                rw::softmax(&v, c)
            },
            roundings: 1.0,
            ulps: 16.0,
            floor: 1e-6,
        },
        Case {
            op: "logsumexp",
            params: &[],
            output: "out",
            what: "[7,131], an all -inf row, -inf entries, +1e3 offsets",
            inputs: row_inputs,
            reference: |i| {
                let (v, c) = x(i);
                rw::logsumexp(&v, c)
            },
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
    ]
}
