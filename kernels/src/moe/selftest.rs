//! Self-test cases of the MoE family against the f64 reference: ragged token counts,
//! exact ties and `-inf` logits in the gate, drops at capacity factor 1, both layer
//! paths and expert parallelism over 2 ranks.

use super::reference::{self as rf, Experts, Routing};
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

/// Tokens, experts, choices and width of the data-movement cases (capacity 14 at cf 1).
const S: usize = 37;
const E: usize = 6;
const K: usize = 2;
const M: usize = 12;

/// Router logits `[S, E]` with exact ties (rows 3..6 all equal, row 7 two-way) and
/// `-inf` entries (row 8 all but one, row 9 all).
fn gate_logits(rng: &mut Rng) -> Vec<f64> {
    let mut l = rng.normals(S * E, 2.0);
    for r in 3..6 {
        l[r * E..(r + 1) * E].fill(0.5);
    }
    l[7 * E + 1] = l[7 * E + 4].max(l[7 * E]);
    l[7 * E + 4] = l[7 * E + 1];
    for j in 0..E {
        if j != 2 {
            l[8 * E + j] = f64::NEG_INFINITY;
        }
        l[9 * E + j] = f64::NEG_INFINITY;
    }
    l
}

fn gate_inputs(rng: &mut Rng) -> CaseInputs {
    vec![("logits", vec![S, E], gate_logits(rng))]
}

fn gate_ref(i: &BTreeMap<String, HostTensor>, cf: f64, prioritized: bool) -> Routing {
    let l = &i["logits"];
    rf::gate(&l.to_f64(), l.shape[1], K, cf, true, prioritized)
}

/// A routing of random logits at cf = 1 (capacity 14, some drops), as the inputs of
/// the data-movement operators: `expert_ids`, `locations`, `gates`.
fn routing_inputs(rng: &mut Rng) -> (Routing, CaseInputs) {
    let r = rf::gate(&rng.normals(S * E, 1.5), E, K, 1.0, true, false);
    let ids = r.ids.iter().map(|&x| x as f64).collect();
    let locs = r.locations.iter().map(|&x| x as f64).collect();
    let gates = r.gates.clone();
    (
        r,
        vec![
            ("expert_ids", vec![S, K], ids),
            ("locations", vec![S, K], locs),
            ("gates", vec![S, K], gates),
        ],
    )
}

/// The routing of a data-movement case's inputs (E and C from the tensor `slots` or
/// the data, as the operator's defaults).
fn routing_of(i: &BTreeMap<String, HostTensor>, slots: Option<&str>) -> Routing {
    let ids = &i["expert_ids"];
    let (s, k) = (ids.shape[0], ids.shape[1]);
    let (e, c) = match slots {
        Some(n) => (i[n].shape[0], i[n].shape[1]),
        // The operator's defaults: 1 + the largest id and location.
        None => {
            let max = |n: &str| i[n].to_f64().into_iter().fold(-1.0f64, f64::max) as i64;
            (
                (max("expert_ids") + 1) as usize,
                (max("locations") + 1) as usize,
            )
        }
    };
    Routing {
        ids: ids.to_f64().iter().map(|&x| x as usize).collect(),
        gates: i.get("gates").map_or(vec![1.0; s * k], |g| g.to_f64()),
        locations: i["locations"].to_f64().iter().map(|&x| x as i64).collect(),
        capacity: c,
        l_aux: 0.0,
        tokens: s,
        experts: e,
        top_k: k,
    }
}

fn rf_capacity() -> usize {
    super::capacity_for(S, E, K, 1.0)
}

fn width(i: &BTreeMap<String, HostTensor>, name: &str) -> usize {
    *i[name].shape.last().unwrap_or(&0)
}

/// Expert FFN inputs: `E' = 3` experts, `C = 9`, `M = 10`, `F = 13`, with biases.
fn ffn_inputs(rng: &mut Rng) -> CaseInputs {
    ffn_inputs_of(rng, (3, 9, 10, 13))
}

/// The tensor-core case's FFN: M and F multiples of 8 (the wmma tiles' K and N), 21
/// slots an expert (ragged against every tile).
fn ffn_tc_inputs(rng: &mut Rng) -> CaseInputs {
    ffn_inputs_of(rng, (3, 21, 24, 40))
}

/// Expert FFN inputs of `(E, C, M, F)`, with biases.
fn ffn_inputs_of(rng: &mut Rng, (e, c, m, f): (usize, usize, usize, usize)) -> CaseInputs {
    vec![
        ("dispatched", vec![e, c, m], rng.normals(e * c * m, 1.0)),
        ("w1", vec![e, m, f], rng.normals(e * m * f, 0.3)),
        ("w2", vec![e, f, m], rng.normals(e * f * m, 0.3)),
        ("b1", vec![e, f], rng.normals(e * f, 0.3)),
        ("b2", vec![e, m], rng.normals(e * m, 0.3)),
    ]
}

fn experts<'a>(
    i: &'a BTreeMap<String, HostTensor>,
    w: &'a [Vec<f64>; 4],
    activation: &'a str,
) -> Experts<'a> {
    let w1 = &i["w1"].shape;
    Experts {
        w1: &w[0],
        b1: i.contains_key("b1").then_some(&w[1][..]),
        w2: &w[2],
        b2: i.contains_key("b2").then_some(&w[3][..]),
        m: w1[1],
        f: w1[2],
        activation,
    }
}

fn weights_of(i: &BTreeMap<String, HostTensor>) -> [Vec<f64>; 4] {
    let get = |n: &str| i.get(n).map_or(Vec::new(), |t| t.to_f64());
    [get("w1"), get("b1"), get("w2"), get("b2")]
}

/// The absolute error scale of a layer's `y`: each expert output is rounded once to
/// the model's dtype before the gate-weighted sum (as a half-precision PyTorch layer
/// does), so a `y` that cancels carries the rounding of its O(|Y|) terms; with unit
/// normal weights (the property tests) |Y| is a few units.
const LAYER_FLOOR: f64 = 4.0;

/// Layer inputs: `S = 37` tokens of `M = 12`, `E = 6` experts of `F = 10`, biases.
fn layer_inputs(rng: &mut Rng) -> CaseInputs {
    layer_inputs_of(rng, M, 10)
}

/// The tensor-core layer case's: M and F multiples of 8 (the wmma tiles' K and N).
fn layer_tc_inputs(rng: &mut Rng) -> CaseInputs {
    layer_inputs_of(rng, 16, 24)
}

/// A layer's inputs: `S` tokens of width `m`, `E` experts of width `f`, with biases.
fn layer_inputs_of(rng: &mut Rng, m: usize, f: usize) -> CaseInputs {
    vec![
        ("x", vec![S, m], rng.normals(S * m, 1.0)),
        ("w_gate", vec![m, E], rng.normals(m * E, 0.5)),
        ("w1", vec![E, m, f], rng.normals(E * m * f, 0.3)),
        ("w2", vec![E, f, m], rng.normals(E * f * m, 0.3)),
        ("b1", vec![E, f], rng.normals(E * f, 0.3)),
        ("b2", vec![E, m], rng.normals(E * m, 0.3)),
    ]
}

/// The f64 expert FFN of a case's slots with `activation`.
fn ffn_ref(i: &BTreeMap<String, HostTensor>, activation: &str) -> Vec<f64> {
    let w = weights_of(i);
    let e = i["dispatched"].shape[0];
    experts(i, &w, activation).ffn_slots(&i["dispatched"].to_f64(), e)
}

fn layer_ref(i: &BTreeMap<String, HostTensor>, cf: f64, prioritized: bool) -> Vec<f64> {
    let (m, e) = (i["w_gate"].shape[0], i["w_gate"].shape[1]);
    let x = i["x"].to_f64();
    let logits = rf::gate_logits(&x, &i["w_gate"].to_f64(), m, e);
    let r = rf::gate(&logits, e, K, cf, true, prioritized);
    let w = weights_of(i);
    rf::layer_per_token(&x, &r, &experts(i, &w, "silu"))
}

/// The MoE family's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "moe_gate",
            params: &[("top_k", "2"), ("capacity_factor", "1")],
            output: "expert_ids",
            what: "[37,6] top-2 with exact ties and -inf rows",
            inputs: gate_inputs,
            reference: |i| {
                gate_ref(i, 1.0, false)
                    .ids
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            },
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "moe_gate",
            params: &[
                ("top_k", "2"),
                ("capacity_factor", "0.5"),
                ("batch_prioritized", "true"),
            ],
            output: "locations",
            what: "[37,6] top-2, cf 0.5 (drops), batch-prioritized",
            inputs: gate_inputs,
            reference: |i| {
                gate_ref(i, 0.5, true)
                    .locations
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            },
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "moe_gate",
            params: &[("top_k", "2"), ("capacity_factor", "0")],
            output: "gates",
            what: "[37,6] top-2 dropless: renormalised gates",
            inputs: gate_inputs,
            reference: |i| gate_ref(i, 0.0, false).gates,
            roundings: 1.0,
            ulps: 8.0,
            floor: 1e-3,
        },
        Case {
            op: "moe_gate",
            params: &[("top_k", "2"), ("capacity_factor", "1")],
            output: "l_aux",
            what: "[37,6] top-2: load-balancing loss",
            inputs: gate_inputs,
            reference: |i| vec![gate_ref(i, 1.0, false).l_aux],
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "moe_gate_backward",
            params: &[("top_k", "2")],
            output: "d_logits",
            what: "[37,6] top-2 renormalised, d_gates and d_l_aux = 0.7",
            inputs: |rng| {
                vec![
                    ("logits", vec![S, E], rng.normals(S * E, 2.0)),
                    ("d_gates", vec![S, K], rng.normals(S * K, 1.0)),
                    ("d_l_aux", vec![], vec![0.7]),
                ]
            },
            reference: |i| {
                let l = &i["logits"];
                let d = i.get("d_l_aux").map_or(0.0, |t| t.to_f64()[0]);
                rf::gate_backward(&l.to_f64(), l.shape[1], K, true, &i["d_gates"].to_f64(), d)
            },
            roundings: 1.0,
            ulps: 64.0,
            floor: 1e-2,
        },
        Case {
            op: "moe_dispatch",
            params: &[],
            output: "dispatched",
            what: "[37,12] top-2 over 6 experts, cf 1 (drops, empty slots)",
            inputs: |rng| {
                let (_, mut v) = routing_inputs(rng);
                v.truncate(2);
                v.push(("x", vec![S, M], rng.normals(S * M, 1.0)));
                v
            },
            reference: |i| routing_of(i, None).dispatch(&i["x"].to_f64(), width(i, "x")),
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "moe_combine",
            params: &[],
            output: "y",
            what: "[6,14,12] slots into 37 tokens, top-2 with drops",
            inputs: |rng| {
                let (_, mut v) = routing_inputs(rng);
                let c = rf_capacity();
                v.push(("expert_out", vec![E, c, M], rng.normals(E * c * M, 1.0)));
                v
            },
            reference: |i| {
                routing_of(i, Some("expert_out"))
                    .combine(&i["expert_out"].to_f64(), width(i, "expert_out"))
            },
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        Case {
            op: "moe_dispatch_backward",
            params: &[],
            output: "dx",
            what: "[6,14,12] slot gradients into 37 tokens",
            inputs: |rng| {
                let (_, mut v) = routing_inputs(rng);
                v.truncate(2);
                let c = rf_capacity();
                v.push(("d_dispatched", vec![E, c, M], rng.normals(E * c * M, 1.0)));
                v
            },
            reference: |i| {
                routing_of(i, Some("d_dispatched"))
                    .dispatch_backward(&i["d_dispatched"].to_f64(), width(i, "d_dispatched"))
            },
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        Case {
            op: "moe_combine_backward",
            params: &[],
            output: "d_gates",
            what: "[37,12] dy against [6,14,12] expert outputs: d_gates",
            inputs: combine_backward_inputs,
            reference: |i| {
                routing_of(i, Some("expert_out"))
                    .combine_backward(&i["dy"].to_f64(), &i["expert_out"].to_f64(), width(i, "dy"))
                    .1
            },
            roundings: 1.0,
            ulps: 32.0,
            floor: 1.0,
        },
        Case {
            op: "moe_combine_backward",
            params: &[],
            output: "d_expert_out",
            what: "[37,12] dy into [6,14,12] slots: d_expert_out",
            inputs: combine_backward_inputs,
            reference: |i| {
                routing_of(i, Some("expert_out"))
                    .combine_backward(&i["dy"].to_f64(), &i["expert_out"].to_f64(), width(i, "dy"))
                    .0
            },
            roundings: 1.0,
            ulps: 2.0,
            floor: 1.0,
        },
        Case {
            op: "moe_expert_ffn",
            params: &[("activation", "gelu")],
            output: "expert_out",
            what: "3 experts, [9,10] slots, F = 13, biases, gelu",
            inputs: ffn_inputs,
            reference: |i| ffn_ref(i, "gelu"),
            roundings: 1.0,
            ulps: 256.0,
            floor: 1.0,
        },
        // The grouped GEMMs on tensor cores alone (skipped, saying so, where there are
        // none: CPU adapters, f32). The second GEMM stages the f32 hidden activations in
        // the experts' dtype: roundings for that intermediate as well as the output.
        Case {
            op: "moe_expert_ffn",
            params: &[("kernel", "tensor_cores")],
            output: "expert_out",
            what: "3 experts, [21,24] slots, F = 40, biases, silu, tensor cores",
            inputs: ffn_tc_inputs,
            reference: |i| ffn_ref(i, "silu"),
            roundings: 4.0,
            ulps: 256.0,
            floor: 1.0,
        },
        Case {
            op: "moe_layer",
            params: &[("path", "capacity")],
            output: "y",
            what: "[37,12] tokens, 6 experts of F = 10, top-2, cf 1, capacity path",
            inputs: layer_inputs,
            reference: |i| layer_ref(i, 1.0, false),
            // In half precision: each expert's output, then y.
            roundings: 2.0,
            ulps: 512.0,
            floor: LAYER_FLOOR,
        },
        Case {
            op: "moe_layer",
            params: &[("path", "dropless"), ("capacity_factor", "0")],
            output: "y",
            what: "[37,12] tokens, 6 experts, top-2, dropless sorted path",
            inputs: layer_inputs,
            reference: |i| layer_ref(i, 0.0, false),
            // In half precision: each expert's output, then y.
            roundings: 2.0,
            ulps: 512.0,
            floor: LAYER_FLOOR,
        },
        // Mixtral's configuration on tensor cores alone (skipped, saying so, where there
        // are none): the dropless path, whose second grouped GEMM scatters gate-scaled
        // rows from the wmma fragments (the tuner compares plain stores only).
        Case {
            op: "moe_layer",
            params: &[
                ("path", "dropless"),
                ("capacity_factor", "0"),
                ("kernel", "tensor_cores"),
            ],
            output: "y",
            what: "[37,16] tokens, 6 experts of F = 24, top-2, dropless, tensor cores",
            inputs: layer_tc_inputs,
            reference: |i| layer_ref(i, 0.0, false),
            // In half precision: the hidden activations as staged, each expert's output,
            // then y.
            roundings: 4.0,
            ulps: 512.0,
            floor: LAYER_FLOOR,
        },
        // The same experts on tensor cores over two ranks (expert parallel, capacity
        // layout with cf 0: every route kept), each rank's three experts on the wmma
        // tiles.
        Case {
            op: "moe_layer",
            params: &[
                ("capacity_factor", "0"),
                ("kernel", "tensor_cores"),
                ("world_size", "2"),
            ],
            output: "y",
            what: "[37,16] tokens, 6 experts of F = 24, top-2, expert parallel over 2 ranks, tensor cores",
            inputs: layer_tc_inputs,
            reference: |i| layer_ref(i, 0.0, false),
            roundings: 4.0,
            ulps: 512.0,
            floor: LAYER_FLOOR,
        },
        Case {
            op: "moe_layer_backward",
            params: &[],
            output: "d_w1",
            what:
                "13 tokens, M = 6, 4 experts of F = 5, top-2, cf 1: d_w1 against finite differences",
            inputs: layer_backward_inputs,
            reference: |i| layer_grad(i, "w1"),
            // In half precision: the gate-weighted `dy` rows, then d_w1.
            roundings: 2.0,
            ulps: 128.0,
            floor: 1.0,
        },
        Case {
            op: "moe_layer_backward",
            params: &[],
            output: "dx",
            what: "the same: dx (experts and gate, d_l_aux = 0.5) against finite differences",
            inputs: layer_backward_inputs,
            reference: |i| layer_grad(i, "x"),
            // In half precision: the gate-weighted `dy` rows, the experts' input gradients,
            // their combination, the gate's term, then their sum.
            roundings: 5.0,
            ulps: 128.0,
            floor: 1.0,
        },
        Case {
            op: "moe_layer_backward",
            params: &[("world_size", "2")],
            output: "d_w2",
            what: "the same, expert parallel over 2 ranks: d_w2 against finite differences",
            inputs: layer_backward_inputs,
            reference: |i| layer_grad(i, "w2"),
            // In half precision: the gate-weighted `dy` rows, then d_w2.
            roundings: 2.0,
            ulps: 128.0,
            floor: 1.0,
        },
        Case {
            op: "moe_layer",
            params: &[("world_size", "2")],
            output: "y",
            what: "[37,12] tokens, 6 experts, top-2, cf 1, expert parallel over 2 ranks",
            inputs: layer_inputs,
            reference: |i| layer_ref(i, 1.0, false),
            // In half precision: each expert's output, then y.
            roundings: 2.0,
            ulps: 512.0,
            floor: LAYER_FLOOR,
        },
        Case {
            op: "moe_layer",
            params: &[
                ("world_size", "3"),
                ("capacity_factor", "0.5"),
                ("batch_prioritized", "true"),
            ],
            output: "y",
            what: "the same over 3 ranks (13, 12, 12 tokens), cf 0.5, batch-prioritized: drops by top-1 probability over every rank's tokens",
            inputs: layer_inputs,
            reference: |i| layer_ref(i, 0.5, true),
            // In half precision: each expert's output, then y.
            roundings: 2.0,
            ulps: 512.0,
            floor: LAYER_FLOOR,
        },
    ]
}

/// A small layer with `dy` and `d_l_aux`: 13 tokens of M = 6, 4 experts of F = 5.
fn layer_backward_inputs(rng: &mut Rng) -> CaseInputs {
    let (s, m, f, e) = (13, 6, 5, 4);
    vec![
        ("x", vec![s, m], rng.normals(s * m, 1.0)),
        ("w_gate", vec![m, e], rng.normals(m * e, 0.5)),
        ("w1", vec![e, m, f], rng.normals(e * m * f, 0.3)),
        ("w2", vec![e, f, m], rng.normals(e * f * m, 0.3)),
        ("b1", vec![e, f], rng.normals(e * f, 0.3)),
        ("b2", vec![e, m], rng.normals(e * m, 0.3)),
        ("dy", vec![s, m], rng.normals(s * m, 1.0)),
        ("d_l_aux", vec![], vec![0.5]),
    ]
}

/// Finite differences of the f64 layer's loss with respect to `which`.
fn layer_grad(i: &BTreeMap<String, HostTensor>, which: &str) -> Vec<f64> {
    let get = |n: &str| i[n].to_f64();
    let (m, e) = (i["w_gate"].shape[0], i["w_gate"].shape[1]);
    let f = i["w1"].shape[2];
    let zeros = |n: usize| vec![0.0; n];
    let inputs = rf::LayerInputs {
        x: get("x"),
        w_gate: get("w_gate"),
        w1: get("w1"),
        b1: i.get("b1").map_or(zeros(e * f), |t| t.to_f64()),
        w2: get("w2"),
        b2: i.get("b2").map_or(zeros(e * m), |t| t.to_f64()),
        m,
        f,
        e,
        k: K,
        cf: 1.0,
        activation: "silu",
    };
    // Two layer evaluations per coordinate: written for small problems (the property
    // tests' random shapes beyond this run the operator without a reference).
    let s = i["x"].shape[0];
    let work = inputs.field_len(which) * s * K * m * f;
    assert!(
        work <= 20_000_000,
        "finite differences of a layer this large: skip"
    );
    // A NaN or infinite input makes every difference NaN, also for weights the loss
    // does not depend on (whose gradient is exactly 0): no reference there.
    assert!(
        i.values().all(|t| t.to_f64().iter().all(|v| v.is_finite())),
        "finite differences need finite inputs"
    );
    let d = i.get("d_l_aux").map_or(0.0, |t| t.to_f64()[0]);
    inputs.grad_fd(which, &get("dy"), d)
}

fn combine_backward_inputs(rng: &mut Rng) -> CaseInputs {
    let (_, mut v) = routing_inputs(rng);
    let c = rf_capacity();
    v.push(("dy", vec![S, M], rng.normals(S * M, 1.0)));
    v.push(("expert_out", vec![E, c, M], rng.normals(E * c * M, 1.0)));
    v
}
