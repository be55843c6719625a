//! Self-test cases of the GLA family: a ragged chunked forward, the recurrent forward,
//! a decode step and the backward, with gates down to -20, against the f64 reference.

use super::reference as gl;
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

/// GLA inputs: B = 2, T = 70 (ragged against every chunk size), H = 2, K = 24, V = 20,
/// gates logsigmoid(randn) with a run at -20; with `step`, one token and a state.
fn gla_case_inputs(rng: &mut Rng, t: usize, step: bool) -> CaseInputs {
    let (b, h, dk, dv) = (2, 2, 24, 20);
    let nk = b * t * h * dk;
    let mut g: Vec<f64> = rng
        .normals(nk, 1.0)
        .into_iter()
        .map(|x| -(1.0 + (-x).exp()).ln())
        .collect();
    g[..(h * dk).min(nk)].fill(-20.0);
    let mut v = vec![
        ("q", vec![b, t, h, dk], rng.normals(nk, 1.0)),
        ("k", vec![b, t, h, dk], rng.normals(nk, 1.0)),
        ("v", vec![b, t, h, dv], rng.normals(b * t * h * dv, 1.0)),
        ("g", vec![b, t, h, dk], g),
    ];
    if step {
        v.push((
            "state",
            vec![b, h, dk, dv],
            rng.normals(b * h * dk * dv, 1.0),
        ));
    } else {
        v.push(("do", vec![b, t, h, dv], rng.normals(b * t * h * dv, 1.0)));
    }
    v
}

fn gla_inputs(rng: &mut Rng) -> CaseInputs {
    gla_case_inputs(rng, 70, false)
}

fn gla_step_inputs(rng: &mut Rng) -> CaseInputs {
    gla_case_inputs(rng, 1, true)
}

fn gla_dims(i: &BTreeMap<String, HostTensor>) -> (gl::Dims, f64) {
    let (q, v) = (&i["q"].shape, &i["v"].shape);
    let bounds = (0..=q[0]).map(|b| b * q[1]).collect();
    (
        gl::Dims {
            heads: q[2],
            dk: q[3],
            dv: v[3],
            bounds,
        },
        1.0 / (q[3] as f64).sqrt(),
    )
}

fn gla_forward_reference(i: &BTreeMap<String, HostTensor>) -> Vec<f64> {
    let (d, scale) = gla_dims(i);
    let f = |n: &str| i[n].to_f64();
    let h0 = i.get("state").map(HostTensor::to_f64);
    gl::forward(&f("q"), &f("k"), &f("v"), &f("g"), h0.as_deref(), &d, scale).0
}

/// Every case, in `kiln ops` order.
/// The GLA operators' cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "gla",
            params: &[("chunk_size", "16")],
            output: "o",
            what: "[2,70,2,24] chunked (chunk 16), gates down to -20",
            inputs: gla_inputs,
            reference: gla_forward_reference,
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "gla_recurrent",
            params: &[],
            output: "o",
            what: "[2,70,2,24] recurrent, gates down to -20",
            inputs: gla_inputs,
            reference: gla_forward_reference,
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "gla_step",
            params: &[],
            output: "o",
            what: "[2,1,2,24] decode step from a state",
            inputs: gla_step_inputs,
            reference: gla_forward_reference,
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "gla_backward",
            params: &[("chunk_size", "16")],
            output: "dg",
            what: "[2,70,2,24] chunked backward (chunk 16), dg",
            inputs: gla_inputs,
            reference: |i| {
                let (d, scale) = gla_dims(i);
                let f = |n: &str| i[n].to_f64();
                gl::backward(
                    &f("q"),
                    &f("k"),
                    &f("v"),
                    &f("g"),
                    None,
                    &f("do"),
                    None,
                    &d,
                    scale,
                )
                .dg
            },
            roundings: 1.0,
            ulps: 256.0,
            floor: 1.0,
        },
    ]
}
