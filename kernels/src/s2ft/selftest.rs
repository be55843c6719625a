//! Self-test cases of the S²FT family against the f64 reference: ragged sizes, grouped-
//! query head units, blocks in the middle of a weight, `-1` adapter ids.

use super::reference as rf;
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

type Inputs = BTreeMap<String, HostTensor>;

fn v(i: &Inputs, n: &str) -> Vec<f64> {
    i[n].to_f64()
}

fn dims(i: &Inputs, n: &str) -> (usize, usize) {
    (i[n].shape[0], i[n].shape[1])
}

/// `v` rounded to the inputs' float dtype (the kernels' intermediate tensors).
fn rounded(like: &HostTensor, v: Vec<f64>) -> Vec<f64> {
    let n = v.len();
    HostTensor::from_f64(like.dtype, vec![n], &v).map_or(v, |h| h.to_f64())
}

fn perm(i: &Inputs) -> Vec<usize> {
    v(i, "perm").iter().map(|&x| x as usize).collect()
}

/// `[r, c]` normals scaled by `1 / sqrt(c)` (O(1) outputs of a product over c).
fn weight(rng: &mut Rng, r: usize, c: usize) -> Vec<f64> {
    rng.normals(r * c, 1.0 / (c as f64).sqrt())
}

fn select_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("row_weight", vec![12, 5], rng.normals(60, 1.0)),
        ("col_weight", vec![4, 12], rng.normals(48, 1.0)),
    ]
}

/// Weight-norm selection with units of 2 rows (columns).
fn select_ref(i: &Inputs) -> Vec<f64> {
    let (r, c) = dims(i, "row_weight");
    let (co, cc) = dims(i, "col_weight");
    let u = r / 2;
    assert!(r == 2 * u && cc == 2 * u, "units of 2");
    let row_norm: Vec<f64> = (0..u)
        .map(|k| {
            v(i, "row_weight")[2 * k * c..(2 * k + 2) * c]
                .iter()
                .map(|x| x * x)
                .sum()
        })
        .collect();
    let cw = v(i, "col_weight");
    let col_norm: Vec<f64> = (0..u)
        .map(|k| {
            (0..co)
                .map(|o| cw[o * cc + 2 * k].powi(2) + cw[o * cc + 2 * k + 1].powi(2))
                .sum()
        })
        .collect();
    let a = super::select::top_units(&row_norm, 2);
    let b = super::select::top_units(&col_norm, 3);
    rf::order(u, &a, &b).iter().map(|&x| x as f64).collect()
}

fn ffn_inputs(rng: &mut Rng) -> CaseInputs {
    let (f, d) = (7, 6);
    vec![
        ("perm", vec![f], vec![3.0, 0.0, 6.0, 4.0, 1.0, 2.0, 5.0]),
        ("w_up", vec![f, d], weight(rng, f, d)),
        ("w_gate", vec![f, d], weight(rng, f, d)),
        ("w_down", vec![d, f], weight(rng, d, f)),
        ("x", vec![9, d], rng.normals(9 * d, 1.0)),
    ]
}

/// H = 4 query heads over Hkv = 2 KV heads of hd = 3, d = 5.
fn attention_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("perm", vec![2], vec![1.0, 0.0]),
        ("w_q", vec![12, 5], weight(rng, 12, 5)),
        ("w_k", vec![6, 5], weight(rng, 6, 5)),
        ("w_v", vec![6, 5], weight(rng, 6, 5)),
        ("w_o", vec![5, 12], weight(rng, 5, 12)),
    ]
}

fn permuted(i: &Inputs, name: &str, unit: usize, columns: bool) -> Vec<f64> {
    let (r, c) = dims(i, name);
    rf::permute(&v(i, name), r, c, &perm(i), unit, columns)
}

/// The FFN on the original weights, intermediates rounded like the kernels'.
fn ffn_ref(i: &Inputs) -> Vec<f64> {
    let (f, d) = dims(i, "w_up");
    let (t, _) = dims(i, "x");
    let x = v(i, "x");
    let like = &i["x"];
    let gate = rounded(like, rf::linear(&x, &v(i, "w_gate"), t, d, f));
    let up = rounded(like, rf::linear(&x, &v(i, "w_up"), t, d, f));
    let h = rounded(
        like,
        gate.iter()
            .zip(&up)
            .map(|(&g, &u)| rf::silu(g) * u)
            .collect(),
    );
    rf::linear(&h, &v(i, "w_down"), t, f, d)
}

fn backward_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("dy", vec![11, 6], rng.normals(66, 1.0)),
        ("x", vec![11, 5], rng.normals(55, 1.0)),
        ("w", vec![6, 5], rng.normals(30, 1.0)),
    ]
}

fn column_backward_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("dy", vec![11, 6], rng.normals(66, 1.0)),
        ("x", vec![11, 2], rng.normals(22, 1.0)),
        ("w", vec![6, 5], rng.normals(30, 1.0)),
    ]
}

fn row_grad_ref(i: &Inputs) -> Vec<f64> {
    let (t, out) = dims(i, "dy");
    let (_, inp) = dims(i, "x");
    let dy = rf::columns(&v(i, "dy"), t, out, 1, 4);
    rf::weight_grad(&dy, &v(i, "x"), t, 3, inp)
}

fn adamw_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("param", vec![5, 7], rng.normals(35, 1.0)),
        ("grad", vec![5, 7], rng.normals(35, 1.0)),
        ("m", vec![5, 7], rng.normals(35, 0.1)),
        (
            "v",
            vec![5, 7],
            (0..35).map(|_| rng.uniform() * 0.1).collect(),
        ),
    ]
}

fn column_adamw_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("param", vec![5, 7], rng.normals(35, 1.0)),
        ("grad", vec![5, 3], rng.normals(15, 1.0)),
        ("m", vec![5, 3], rng.normals(15, 0.1)),
        (
            "v",
            vec![5, 3],
            (0..15).map(|_| rng.uniform() * 0.1).collect(),
        ),
    ]
}

const ADAMW_CONFIG: super::AdamWConfig = super::AdamWConfig {
    lr: 0.01,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.1,
};

/// `w` after one step (step 3) on its columns `s .. s + grad's width` (all rows).
fn adamw_ref(i: &Inputs, s: usize, output: &str) -> Vec<f64> {
    let (out, inp) = dims(i, "param");
    let (_, bw) = dims(i, "grad");
    let mut w = v(i, "param");
    let mut block = rf::columns(&w, out, inp, s, s + bw);
    let (mut m, mut vv) = (v(i, "m"), v(i, "v"));
    rf::adamw(&mut block, &v(i, "grad"), &mut m, &mut vv, 3, &ADAMW_CONFIG);
    for r in 0..out {
        w[r * inp + s..r * inp + s + bw].copy_from_slice(&block[r * bw..(r + 1) * bw]);
    }
    match output {
        "m" => m,
        _ => w,
    }
}

fn adapter_inputs(rng: &mut Rng, rows: bool) -> CaseInputs {
    let (t, out, inp, a) = (9, 5, 6, 3);
    let deltas = match rows {
        true => ("deltas", vec![a, 2, inp], weight(rng, a * 2, inp)),
        false => ("deltas", vec![a, out, 3], weight(rng, a * out, 3)),
    };
    vec![
        ("x", vec![t, inp], rng.normals(t * inp, 1.0)),
        ("w0", vec![out, inp], weight(rng, out, inp)),
        deltas,
        (
            "adapter_ids",
            vec![t],
            vec![0.0, 2.0, -1.0, 1.0, 1.0, 0.0, 2.0, -1.0, 2.0],
        ),
    ]
}

/// The adapter forward with the base GEMM rounded like the kernel's.
fn adapter_ref(i: &Inputs, rows: bool, start: usize) -> Vec<f64> {
    let (t, inp) = dims(i, "x");
    let (out, _) = dims(i, "w0");
    let d = &i["deltas"].shape;
    let width = if rows { d[1] } else { d[2] };
    let ids: Vec<i64> = v(i, "adapter_ids").iter().map(|&x| x as i64).collect();
    let x = v(i, "x");
    let base = rounded(&i["x"], rf::linear(&x, &v(i, "w0"), t, inp, out));
    let full = rf::adapter_forward(
        &x,
        &v(i, "w0"),
        &v(i, "deltas"),
        &ids,
        t,
        out,
        inp,
        rows,
        start,
        width,
    );
    let plain = rf::linear(&x, &v(i, "w0"), t, inp, out);
    // base (rounded) + the delta part alone.
    base.iter()
        .zip(full.iter().zip(&plain))
        .map(|(b, (f, p))| b + (f - p))
        .collect()
}

fn merge_inputs(rng: &mut Rng) -> CaseInputs {
    vec![
        ("w0", vec![5, 6], rng.normals(30, 1.0)),
        ("deltas", vec![3, 5, 2], rng.normals(30, 1.0)),
    ]
}

fn merge_ref(i: &Inputs) -> Vec<f64> {
    let (out, inp) = dims(i, "w0");
    let d = &i["deltas"].shape;
    let (n, width) = (d[1], d[2]);
    let (mut w, deltas) = (v(i, "w0"), v(i, "deltas"));
    assert_eq!(n, out, "column block deltas");
    for r in 0..out {
        for c in 0..width {
            w[r * inp + 3 + c] += deltas[(n + r) * width + c];
        }
    }
    w
}

/// The S²FT family's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "s2ft_select",
            what: "6 units of 2 rows, weight norms: 2 for the row block, 3 for the column block",
            inputs: select_inputs,
            params: &[
                ("strategy", "weight_norm"),
                ("unit_size", "2"),
                ("count_a", "2"),
                ("count_b", "3"),
            ],
            output: "perm",
            reference: select_ref,
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_permute",
            what: "7 FFN channels: w_down's columns",
            inputs: ffn_inputs,
            params: &[],
            output: "w_down",
            reference: |i| permuted(i, "w_down", 1, true),
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_permute",
            what: "4 query heads over 2 KV groups of hd = 3: w_q's rows by group",
            inputs: attention_inputs,
            params: &[("head_dim", "3")],
            output: "w_q",
            reference: |i| permuted(i, "w_q", 6, false),
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_permute",
            what: "the same: w_o's columns by group",
            inputs: attention_inputs,
            params: &[],
            output: "w_o",
            reference: |i| permuted(i, "w_o", 6, true),
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_verify",
            what: "SwiGLU FFN d = 6, F = 7, 9 tokens: the permuted layer against the original",
            inputs: ffn_inputs,
            params: &[],
            output: "y_permuted",
            reference: ffn_ref,
            roundings: 1.0,
            ulps: 1024.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_partial_backward",
            what: "row block 1..4 of [6, 5], 11 tokens",
            inputs: backward_inputs,
            params: &[("block", "rows"), ("start", "1"), ("end", "4")],
            output: "d_delta",
            reference: row_grad_ref,
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_partial_backward",
            what: "column block 1..3 from the saved slice",
            inputs: column_backward_inputs,
            params: &[("block", "columns"), ("start", "1"), ("end", "3")],
            output: "d_delta",
            reference: |i| rf::weight_grad(&v(i, "dy"), &v(i, "x"), 11, 6, 2),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_partial_backward",
            what: "dx = dy W beside a row block",
            inputs: backward_inputs,
            params: &[("block", "rows"), ("start", "1"), ("end", "4")],
            output: "dx",
            reference: |i| rf::input_grad(&v(i, "dy"), &v(i, "w"), 11, 6, 5),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_adamw_step",
            what: "the whole [5, 7] weight as one block, step 3, lr 0.01, wd 0.1",
            inputs: adamw_inputs,
            params: &[("lr", "0.01"), ("weight_decay", "0.1"), ("step", "3")],
            output: "param",
            reference: |i| adamw_ref(i, 0, "w"),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_adamw_step",
            what: "column block 2..5 of [5, 7] (strided, in place)",
            inputs: column_adamw_inputs,
            params: &[
                ("block", "columns"),
                ("start", "2"),
                ("end", "5"),
                ("lr", "0.01"),
                ("weight_decay", "0.1"),
                ("step", "3"),
            ],
            output: "param",
            reference: |i| adamw_ref(i, 2, "w"),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_adamw_step",
            what: "the same: first moment",
            inputs: column_adamw_inputs,
            params: &[
                ("block", "columns"),
                ("start", "2"),
                ("end", "5"),
                ("lr", "0.01"),
                ("weight_decay", "0.1"),
                ("step", "3"),
            ],
            output: "m",
            reference: |i| adamw_ref(i, 2, "m"),
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_adapter_forward",
            what: "3 fine-tunes of rows 2..4 of [5, 6], 9 tokens (two on the base model)",
            inputs: |r| adapter_inputs(r, true),
            params: &[("block", "rows"), ("start", "2")],
            output: "y",
            reference: |i| adapter_ref(i, true, 2),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_adapter_forward",
            what: "3 fine-tunes of columns 1..4",
            inputs: |r| adapter_inputs(r, false),
            params: &[("block", "columns"), ("start", "1")],
            output: "y",
            reference: |i| adapter_ref(i, false, 1),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "s2ft_merge",
            what: "fine-tune 1 of 3 into columns 3..5 of [5, 6]",
            inputs: merge_inputs,
            params: &[("block", "columns"), ("start", "3"), ("adapter", "1")],
            output: "w0",
            reference: merge_ref,
            roundings: 1.0,
            ulps: 2.0,
            floor: 1.0,
        },
    ]
}
