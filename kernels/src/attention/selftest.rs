//! Self-test cases of the attention family: a ragged causal GQA block with offsets
//! and the merge of two blocks, against the f64 reference.

use super::reference::{self as rf, Dims};
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

/// B = 2, Sq = 37, Sk = 53 (ragged against every tile), H = 4 over Hkv = 2, D = 24,
/// Dv = 20; queries at positions 16.. of the keys (causal, q_offset = 16).
fn attention_inputs(rng: &mut Rng) -> CaseInputs {
    let (b, sq, sk, h, hkv, d, dv) = (2, 37, 53, 4, 2, 24, 20);
    vec![
        ("q", vec![b, sq, h, d], rng.normals(b * sq * h * d, 1.0)),
        ("k", vec![b, sk, hkv, d], rng.normals(b * sk * hkv * d, 1.0)),
        (
            "v",
            vec![b, sk, hkv, dv],
            rng.normals(b * sk * hkv * dv, 1.0),
        ),
    ]
}

/// [`attention_inputs`] with `do`, and `out`/`lse` from the f64 reference of the
/// unrounded inputs (the reference below uses them as given, as the kernels do).
fn backward_inputs(rng: &mut Rng) -> CaseInputs {
    let mut v = attention_inputs(rng);
    let (b, sq, h, dv) = (2, 37, 4, 20);
    let (out, lse) = rf::forward(&case_dims(), &v[0].2, &v[1].2, &v[2].2);
    v.push(("out", vec![b, sq, h, dv], out));
    v.push(("lse", vec![b, h, sq], lse));
    v.push(("do", vec![b, sq, h, dv], rng.normals(b * sq * h * dv, 1.0)));
    v
}

/// The problem of [`attention_inputs`] with the cases' parameters.
fn case_dims() -> Dims {
    let mut d = Dims::dense(2, 37, 53, 4, 2, 24, 20);
    d.causal = true;
    d.shift = 16;
    d
}

/// One sequence of 53 tokens, H = 4 over Hkv = 2, D = 24, Dv = 20, causal.
fn ring_dims() -> Dims {
    let mut d = Dims::dense(2, 53, 53, 4, 2, 24, 20);
    d.causal = true;
    d
}

fn ring_inputs(rng: &mut Rng) -> CaseInputs {
    let (b, s, h, hkv, d, dv) = (2, 53, 4, 2, 24, 20);
    vec![
        ("q", vec![b, s, h, d], rng.normals(b * s * h * d, 1.0)),
        ("k", vec![b, s, hkv, d], rng.normals(b * s * hkv * d, 1.0)),
        ("v", vec![b, s, hkv, dv], rng.normals(b * s * hkv * dv, 1.0)),
    ]
}

/// The packed sequences of [`packed_ring_inputs`]: 20, 0, 1 and 32 tokens.
const PACKED: [i32; 5] = [0, 20, 20, 21, 53];

/// One row of [`ring_inputs`]' shape holding the sequences of [`PACKED`].
fn packed_ring_inputs(rng: &mut Rng) -> CaseInputs {
    let mut v = ring_inputs(rng);
    for (_, shape, values) in &mut v {
        values.truncate(values.len() / shape[0]);
        shape[0] = 1;
    }
    let cu: Vec<f64> = PACKED.iter().map(|&x| x as f64).collect();
    v.push(("cu_seqlens_q", vec![cu.len()], cu.clone()));
    v.push(("cu_seqlens_k", vec![cu.len()], cu));
    v
}

fn ring_backward_inputs(rng: &mut Rng) -> CaseInputs {
    let mut v = ring_inputs(rng);
    let (b, s, h, dv) = (2, 53, 4, 20);
    let (out, lse) = rf::forward(&ring_dims(), &v[0].2, &v[1].2, &v[2].2);
    v.push(("out", vec![b, s, h, dv], out));
    v.push(("lse", vec![b, h, s], lse));
    v.push(("do", vec![b, s, h, dv], rng.normals(b * s * h * dv, 1.0)));
    v
}

/// The dims of the dense inputs `i` with the cases' causal mask at `shift`.
fn case_dims_of(i: &BTreeMap<String, HostTensor>, shift: i64) -> Dims {
    let mut d = dense_dims(i);
    d.causal = true;
    d.shift = shift;
    d
}

/// The dims of dense inputs named q, k, v.
pub fn dense_dims(i: &BTreeMap<String, HostTensor>) -> Dims {
    let (q, k, v) = (&i["q"].shape, &i["k"].shape, &i["v"].shape);
    Dims::dense(q[0], q[1], k[1], q[2], k[2], q[3], v[3])
}

fn attention_reference(i: &BTreeMap<String, HostTensor>) -> Vec<f64> {
    rf::forward(
        &case_dims_of(i, 16),
        &i["q"].to_f64(),
        &i["k"].to_f64(),
        &i["v"].to_f64(),
    )
    .0
}

/// The f64 gradients `(dq, dk, dv)` of the backward cases' inputs.
fn backward_reference(i: &BTreeMap<String, HostTensor>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let f = |n: &str| i[n].to_f64();
    let (q, k, v) = (f("q"), f("k"), f("v"));
    rf::backward_with(
        &case_dims_of(i, 16),
        &q,
        &k,
        &v,
        &f("out"),
        &f("lse"),
        &f("do"),
    )
}

/// Two partial results `[1, 29, 3, 12]` with lse in -3..3 and one row -inf on side b.
fn merge_inputs(rng: &mut Rng) -> CaseInputs {
    let (s, h, dv) = (29, 3, 12);
    let mut lse_b: Vec<f64> = rng.normals(h * s, 3.0);
    lse_b[5] = f64::NEG_INFINITY;
    vec![
        ("out_a", vec![1, s, h, dv], rng.normals(s * h * dv, 1.0)),
        ("lse_a", vec![1, h, s], rng.normals(h * s, 3.0)),
        ("out_b", vec![1, s, h, dv], rng.normals(s * h * dv, 1.0)),
        ("lse_b", vec![1, h, s], lse_b),
    ]
}

/// The attention family's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "attention",
            params: &[("causal", "true"), ("q_offset", "16")],
            output: "out",
            what: "[2,37,4,24] over [2,53,2,24] causal at offset 16, GQA 2:1",
            inputs: attention_inputs,
            reference: attention_reference,
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        // The tensor-core kernel alone (skipped, saying so, where there are none and
        // for f32): D = 24 and Dv = 20 ragged against its 32-deep slices and 64-wide
        // value tiles; its statistics pass writes `lse`, its second pass `out`.
        Case {
            op: "attention",
            params: &[("causal", "true"), ("q_offset", "16"), ("kernel", "tensor_cores")],
            output: "out",
            what: "[2,37,4,24] over [2,53,2,24] causal at offset 16, GQA 2:1, tensor cores",
            inputs: attention_inputs,
            reference: attention_reference,
            // out's rounding, and P's to the operand dtype before `P V`.
            roundings: 2.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "attention",
            params: &[("causal", "true"), ("q_offset", "16"), ("kernel", "tensor_cores")],
            output: "lse",
            what: "the same, tensor cores: lse",
            inputs: attention_inputs,
            reference: |i| {
                let f = |n: &str| i[n].to_f64();
                rf::forward(&case_dims_of(i, 16), &f("q"), &f("k"), &f("v")).1
            },
            roundings: 0.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "attention_backward",
            params: &[("causal", "true"), ("q_offset", "16")],
            output: "dk",
            what: "[2,37,4,24] over [2,53,2,24] causal at offset 16, GQA 2:1: dk",
            inputs: backward_inputs,
            reference: |i| backward_reference(i).1,
            roundings: 1.0,
            ulps: 256.0,
            floor: 1.0,
        },
        // The tensor-core gradient kernels alone (skipped where there are none and for
        // f32): dq, dk (dS^T Q summed over the query group) and dv (P^T dO).
        Case {
            op: "attention_backward",
            params: &[("causal", "true"), ("q_offset", "16"), ("kernel", "tensor_cores")],
            output: "dk",
            what: "[2,37,4,24] over [2,53,2,24] causal at offset 16, GQA 2:1: dk, tensor cores",
            inputs: backward_inputs,
            reference: |i| backward_reference(i).1,
            // dk's rounding, and P's and dS's to the operand dtype before the products.
            roundings: 3.0,
            ulps: 256.0,
            floor: 1.0,
        },
        Case {
            op: "attention_backward",
            params: &[("causal", "true"), ("q_offset", "16"), ("kernel", "tensor_cores")],
            output: "dq",
            what: "the same: dq, tensor cores",
            inputs: backward_inputs,
            reference: |i| backward_reference(i).0,
            roundings: 3.0,
            ulps: 256.0,
            floor: 1.0,
        },
        Case {
            op: "attention_backward",
            params: &[("causal", "true"), ("q_offset", "16"), ("kernel", "tensor_cores")],
            output: "dv",
            what: "the same: dv, tensor cores",
            inputs: backward_inputs,
            reference: |i| backward_reference(i).2,
            roundings: 2.0,
            ulps: 256.0,
            floor: 1.0,
        },
        Case {
            op: "ring_attention",
            params: &[
                ("causal", "true"),
                ("world_size", "3"),
                ("schedule", "zigzag"),
            ],
            output: "out",
            what: "[2,53,2,24] causal, zigzag over 3 ranks (ragged chunks)",
            inputs: ring_inputs,
            reference: |i| {
                rf::forward(
                    &case_dims_of(i, 0),
                    &i["q"].to_f64(),
                    &i["k"].to_f64(),
                    &i["v"].to_f64(),
                )
                .0
            },
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "ring_attention",
            params: &[
                ("causal", "true"),
                ("world_size", "4"),
                ("schedule", "contiguous"),
            ],
            output: "out",
            what: "[1,53,4,24] packed sequences of 20, 0, 1, 32 tokens, causal, contiguous over 4 ranks",
            inputs: packed_ring_inputs,
            reference: |i| {
                let mut d = case_dims_of(i, 0);
                d.bounds_q = PACKED.iter().map(|&x| x as usize).collect();
                d.bounds_k = d.bounds_q.clone();
                d.varlen = true;
                rf::forward(&d, &i["q"].to_f64(), &i["k"].to_f64(), &i["v"].to_f64()).0
            },
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "ring_attention_backward",
            params: &[
                ("causal", "true"),
                ("world_size", "2"),
                ("schedule", "tokenring"),
            ],
            output: "dk",
            what: "[2,53,2,24] causal, tokenring over 2 ranks: dk",
            inputs: ring_backward_inputs,
            reference: |i| {
                let f = |n: &str| i[n].to_f64();
                let (q, k, v) = (f("q"), f("k"), f("v"));
                rf::backward_with(
                    &case_dims_of(i, 0),
                    &q,
                    &k,
                    &v,
                    &f("out"),
                    &f("lse"),
                    &f("do"),
                )
                .1
            },
            roundings: 1.0,
            ulps: 256.0,
            floor: 1.0,
        },
        Case {
            op: "attention_merge",
            params: &[],
            output: "out",
            what: "[1,29,3,12] two partial blocks, one side -inf in a row",
            inputs: merge_inputs,
            reference: |i| {
                let f = |n: &str| i[n].to_f64();
                let s = &i["out_a"].shape;
                rf::merge(
                    &f("out_a"),
                    &f("lse_a"),
                    &f("out_b"),
                    &f("lse_b"),
                    [s[0], s[1], s[2], s[3]],
                )
                .0
            },
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
    ]
}
