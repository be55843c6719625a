//! Self-test cases of the fused optimizers against the f64 reference: a ragged vector
//! and a matrix, step 3 (bias corrections and Adan's gradient difference active), weight
//! decay on.

use super::rules::{Hyper, Rule};
use super::{compress, reference, Subspace};
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

/// `param`, `grad` and the rule's state, `shape`; moments of a few steps' size.
fn inputs(rng: &mut Rng, rule: Rule, shape: &[usize]) -> CaseInputs {
    let n = shape.iter().product();
    let mut v = vec![
        ("param", shape.to_vec(), rng.normals(n, 1.0)),
        ("grad", shape.to_vec(), rng.normals(n, 1.0)),
    ];
    for (j, &s) in rule.state_names().iter().enumerate() {
        let len = rule.state_len(j, n);
        let values = match s {
            "v" | "s" | "n" | "b2" => (0..len).map(|_| 0.05 * rng.uniform()).collect(),
            _ => rng.normals(len, 0.2),
        };
        let shape = if len == n { shape.to_vec() } else { vec![1] };
        v.push((s, shape, values));
    }
    v
}

/// The hyper-parameters of the cases: the rule's defaults with lr 0.01 and wd 0.1.
fn hyper(rule: Rule) -> Hyper {
    Hyper {
        lr: 0.01,
        weight_decay: 0.1,
        ..Hyper::defaults(rule)
    }
}

const PARAMS: &[(&str, &str)] = &[("lr", "0.01"), ("weight_decay", "0.1"), ("step", "3")];

/// `output` after step 3 of `rule` on the inputs.
fn after(i: &BTreeMap<String, HostTensor>, rule: Rule, output: &str) -> Vec<f64> {
    let mut p = i["param"].to_f64();
    let n = p.len();
    let mut state: Vec<Vec<f64>> = rule
        .state_names()
        .iter()
        .enumerate()
        .map(|(j, s)| {
            i.get(*s)
                .map_or(vec![0.0; rule.state_len(j, n)], |t| t.to_f64())
        })
        .collect();
    reference::step(
        rule,
        &hyper(rule),
        3,
        &mut p,
        &i["grad"].to_f64(),
        &mut state,
    );
    match rule.state_names().iter().position(|s| *s == output) {
        Some(k) => state[k].clone(),
        None => p,
    }
}

macro_rules! cases_of {
    ($rule:expr, $op:literal, $second:literal) => {
        [
            Case {
                op: $op,
                what: "37 elements, step 3, lr 0.01, weight decay 0.1",
                inputs: |r| inputs(r, $rule, &[37]),
                params: PARAMS,
                output: "param",
                reference: |i| after(i, $rule, "param"),
                roundings: 1.0,
                ulps: 16.0,
                floor: 1.0,
            },
            Case {
                op: $op,
                what: "a [5, 13] matrix: the state",
                inputs: |r| inputs(r, $rule, &[5, 13]),
                params: PARAMS,
                output: $second,
                reference: |i| after(i, $rule, $second),
                roundings: 1.0,
                ulps: 16.0,
                floor: 1.0,
            },
        ]
    };
}

/// `param + sum_i coeffs[i] z(seeds[i], stream 2)` in f64 from the host generator.
fn perturbed(i: &BTreeMap<String, HostTensor>, seeds: &[u64], coeffs: &[f64]) -> Vec<f64> {
    let p = i["param"].to_f64();
    (0..p.len())
        .map(|e| {
            let dz: f64 = seeds
                .iter()
                .zip(coeffs)
                .map(|(&s, c)| c * crate::random::normal(s, 2, e as u64) as f64)
                .sum();
            p[e] + dz
        })
        .collect()
}

/// `output` of a compressor on the case's `grad` and `error` (a = error + grad in f32,
/// as the kernel forms it), keeping `k` by `keys`, values scaled by `n / k` if `scaled`.
fn compressed(
    i: &BTreeMap<String, HostTensor>,
    k: usize,
    keys: fn(&[f32]) -> Vec<u32>,
    scaled: bool,
    output: &str,
) -> Vec<f64> {
    let g = i["grad"].to_f64();
    let scale = if scaled {
        g.len() as f64 / k as f64
    } else {
        1.0
    };
    let e = i.get("error").map_or(vec![0.0; g.len()], |t| t.to_f64());
    let a: Vec<f32> = g
        .iter()
        .zip(&e)
        .map(|(g, e)| *e as f32 + *g as f32)
        .collect();
    let taken = compress::reference_select(&keys(&a), k);
    match output {
        "indices" => taken.iter().map(|&t| t as f64).collect(),
        "values" => taken.iter().map(|&t| scale * a[t] as f64).collect(),
        _ => {
            let mut err: Vec<f64> = a.iter().map(|&v| v as f64).collect();
            for &t in &taken {
                err[t] *= 1.0 - scale;
            }
            err
        }
    }
}

fn grad_and_error(r: &mut Rng) -> CaseInputs {
    vec![
        ("grad", vec![5000], r.normals(5000, 1.0)),
        ("error", vec![5000], r.normals(5000, 0.3)),
    ]
}

/// Past 2^19 elements: exact top-k takes the sampled bracket (`topk/sampled.rs`).
fn large_grad_and_error(r: &mut Rng) -> CaseInputs {
    let n = 524_291;
    vec![
        ("grad", vec![n], r.normals(n, 1.0)),
        ("error", vec![n], r.normals(n, 0.3)),
    ]
}

fn grad_error_and_h(r: &mut Rng) -> CaseInputs {
    let mut v = grad_and_error(r);
    v.push(("h", vec![5000], r.normals(5000, 0.5)));
    v
}

/// EControl's `output` (`h` or `error`) after one step with k = 700, eta = 0.1.
fn econtrol_after(i: &BTreeMap<String, HostTensor>, output: &str) -> Vec<f64> {
    let (mut e, mut h) = (i["error"].to_f64(), i["h"].to_f64());
    reference::econtrol_step(&i["grad"].to_f64(), &mut e, &mut h, 0.1, 700);
    if output == "h" {
        h
    } else {
        e
    }
}

/// FRUGAL's `output` after step 3 (subspace 0, density 0.25, mid-subspace state
/// given) from the case's inputs.
fn frugal_after(i: &BTreeMap<String, HostTensor>, output: &str, subspace: Subspace) -> Vec<f64> {
    let mut p = i["param"].to_f64();
    let h = hyper(Rule::AdamW);
    let c = super::FrugalConfig {
        lr_free: 0.002,
        seed: 5,
        subspace,
        ..Default::default()
    };
    let shape = i["param"].shape.clone();
    let mut subset = reference::frugal_subset(&c, &shape, 0);
    let (mut m, mut v) = (i["m"].to_f64(), i["v"].to_f64());
    reference::frugal_step(
        &h,
        &c,
        3,
        &shape,
        &mut p,
        &i["grad"].to_f64(),
        &mut subset,
        &mut m,
        &mut v,
    );
    match output {
        "v" => v,
        _ => p,
    }
}

/// `kiln run frugal --set subspace=svd` at `step` (of update_gap 200). At a subspace's
/// first step the projection is the gradient's (f64 one-sided Jacobi here, the device's in
/// f32 there: the same subspace, the sign of each vector aside, which the step does not
/// see) and the moments start at zero; mid-subspace the given projection and moments step
/// on, nothing recomputed.
fn frugal_svd_after(i: &BTreeMap<String, HostTensor>, step: u64) -> Vec<f64> {
    let mut p = i["param"].to_f64();
    let g = i["grad"].to_f64();
    let h = hyper(Rule::AdamW);
    let c = super::FrugalConfig {
        lr_free: 0.002,
        density: 0.4,
        subspace: Subspace::Svd,
        ..Default::default()
    };
    let shape = i["param"].shape.clone();
    let (proj, mut m, mut v) = match step {
        1 => (
            reference::frugal_svd_projection(&c, &shape, &g),
            Vec::new(),
            Vec::new(),
        ),
        _ => (i["projection"].to_f64(), i["m"].to_f64(), i["v"].to_f64()),
    };
    reference::frugal_svd_step(&h, &c, step, &shape, &mut p, &g, &proj, &mut m, &mut v);
    p
}

/// A 7 x 5 matrix (rank 2 of 5 at density 0.4).
fn frugal_svd_inputs(r: &mut Rng) -> CaseInputs {
    vec![
        ("param", vec![7, 5], r.normals(35, 1.0)),
        ("grad", vec![7, 5], r.normals(35, 1.0)),
    ]
}

/// A 5 x 8 matrix mid-subspace: rank 2 of 5, left side (`P` [2, 5], rows orthonormal by
/// Gram-Schmidt; moments [2, 8]).
fn frugal_svd_mid_inputs(r: &mut Rng) -> CaseInputs {
    let a = r.normals(5, 1.0);
    let mut b = r.normals(5, 1.0);
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let a: Vec<f64> = a.iter().map(|v| v / norm(&a)).collect();
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    b.iter_mut().zip(&a).for_each(|(y, x)| *y -= dot * x);
    let nb = norm(&b);
    let proj = a.into_iter().chain(b.into_iter().map(|v| v / nb)).collect();
    vec![
        ("param", vec![5, 8], r.normals(40, 1.0)),
        ("grad", vec![5, 8], r.normals(40, 1.0)),
        ("projection", vec![2, 5], proj),
        ("m", vec![2, 8], r.normals(16, 0.2)),
        (
            "v",
            vec![2, 8],
            r.normals(16, 0.3).into_iter().map(|x| x * x).collect(),
        ),
    ]
}

const FRUGAL_SVD_MID_PARAMS: &[(&str, &str)] = &[
    ("lr", "0.01"),
    ("weight_decay", "0.1"),
    ("lr_free", "0.002"),
    ("density", "0.4"),
    ("subspace", "svd"),
    ("step", "3"),
];

const FRUGAL_SVD_PARAMS: &[(&str, &str)] = &[
    ("lr", "0.01"),
    ("weight_decay", "0.1"),
    ("lr_free", "0.002"),
    ("density", "0.4"),
    ("subspace", "svd"),
    ("step", "1"),
];

fn frugal_inputs(r: &mut Rng) -> CaseInputs {
    vec![
        ("param", vec![37], r.normals(37, 1.0)),
        ("grad", vec![37], r.normals(37, 1.0)),
        ("m", vec![10], r.normals(10, 0.2)),
        ("v", vec![10], (0..10).map(|_| 0.05 * r.uniform()).collect()),
    ]
}

const FRUGAL_PARAMS: &[(&str, &str)] = &[
    ("lr", "0.01"),
    ("weight_decay", "0.1"),
    ("lr_free", "0.002"),
    ("seed", "5"),
    ("step", "3"),
];

/// A 6 x 7 matrix: 2 of its 7 columns (12 coordinates) have state.
fn frugal_column_inputs(r: &mut Rng) -> CaseInputs {
    vec![
        ("param", vec![6, 7], r.normals(42, 1.0)),
        ("grad", vec![6, 7], r.normals(42, 1.0)),
        ("m", vec![12], r.normals(12, 0.2)),
        ("v", vec![12], (0..12).map(|_| 0.05 * r.uniform()).collect()),
    ]
}

const FRUGAL_COLUMN_PARAMS: &[(&str, &str)] = &[
    ("lr", "0.01"),
    ("weight_decay", "0.1"),
    ("lr_free", "0.002"),
    ("seed", "5"),
    ("step", "3"),
    ("subspace", "columns"),
];

/// The optimizer family's cases.
pub fn cases() -> Vec<Case> {
    let mut v = vec![
        Case {
            op: "perturb",
            what: "37 elements, seed 7, eps 0.5, stream 2",
            inputs: |r| vec![("param", vec![37], r.normals(37, 1.0))],
            params: &[("seed", "7"), ("eps", "0.5"), ("stream", "2")],
            output: "param",
            reference: |i| perturbed(i, &[7], &[0.5]),
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        Case {
            op: "zo_update",
            what: "a [5, 13] matrix, three seeds, lr 0.1, stream 2",
            inputs: |r| {
                vec![
                    ("param", vec![5, 13], r.normals(65, 1.0)),
                    ("projected_grads", vec![3], vec![1.5, -0.25, 2.0]),
                ]
            },
            params: &[
                ("seeds", "3, 5, 18446744073709551615"),
                ("lr", "0.1"),
                ("stream", "2"),
            ],
            output: "param",
            reference: |i| perturbed(i, &[3, 5, u64::MAX], &[-0.15, 0.025, -0.2]),
            roundings: 1.0,
            ulps: 8.0,
            floor: 1.0,
        },
    ];
    v.extend(cases_of!(Rule::AdamW, "adamw", "v"));
    v.extend(cases_of!(Rule::Adan, "adan", "n"));
    v.extend(cases_of!(Rule::AdaBelief, "adabelief", "s"));
    v.extend([
        Case {
            op: "topk_ef",
            what: "5000 elements over two cubes, k 700: the indices",
            inputs: grad_and_error,
            params: &[("k", "700")],
            output: "indices",
            reference: |i| compressed(i, 700, compress::magnitude_keys, false, "indices"),
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "topk_ef",
            what: "5000 elements, k 700: the error feedback",
            inputs: grad_and_error,
            params: &[("k", "700")],
            output: "error",
            reference: |i| compressed(i, 700, compress::magnitude_keys, false, "error"),
            roundings: 1.0,
            ulps: 1.0,
            floor: 1.0,
        },
        Case {
            op: "topk_ef",
            what: "524 291 elements, k 5243 (the sampled bracket): the indices",
            inputs: large_grad_and_error,
            params: &[("k", "5243")],
            output: "indices",
            reference: |i| compressed(i, 5243, compress::magnitude_keys, false, "indices"),
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "econtrol",
            what: "5000 elements, k 700, eta 0.1: the new estimator h",
            inputs: grad_error_and_h,
            params: &[("k", "700"), ("eta", "0.1")],
            output: "h",
            reference: |i| econtrol_after(i, "h"),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "econtrol",
            what: "5000 elements, k 700, eta 0.1: the new error",
            inputs: grad_error_and_h,
            params: &[("k", "700"), ("eta", "0.1")],
            output: "error",
            reference: |i| econtrol_after(i, "error"),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "randk",
            what: "5000 elements, k 64, seed 9: the scaled values",
            inputs: grad_and_error,
            params: &[("k", "64"), ("seed", "9")],
            output: "values",
            reference: |i| compressed(i, 64, |a| compress::randk_keys(a.len(), 9), true, "values"),
            roundings: 1.0,
            ulps: 2.0,
            floor: 1.0,
        },
    ]);
    v.extend([
        Case {
            op: "frugal",
            what: "37 elements, 10 with state, step 3 of subspace 0",
            inputs: frugal_inputs,
            params: FRUGAL_PARAMS,
            output: "param",
            reference: |i| frugal_after(i, "param", Subspace::Coordinates),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "frugal",
            what: "37 elements, step 3: the second moment of the subset",
            inputs: frugal_inputs,
            params: FRUGAL_PARAMS,
            output: "v",
            reference: |i| frugal_after(i, "v", Subspace::Coordinates),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "frugal",
            what: "a 6 x 7 matrix, 2 columns with state, step 3",
            inputs: frugal_column_inputs,
            params: FRUGAL_COLUMN_PARAMS,
            output: "param",
            reference: |i| frugal_after(i, "param", Subspace::Columns),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "frugal",
            what: "a 7 x 5 matrix, svd: 2 right singular vectors, step 1",
            inputs: frugal_svd_inputs,
            params: FRUGAL_SVD_PARAMS,
            output: "param",
            reference: |i| frugal_svd_after(i, 1),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
        Case {
            op: "frugal",
            what: "a 5 x 8 matrix, svd mid-subspace: projection and moments given, step 3",
            inputs: frugal_svd_mid_inputs,
            params: FRUGAL_SVD_MID_PARAMS,
            output: "param",
            reference: |i| frugal_svd_after(i, 3),
            roundings: 1.0,
            ulps: 16.0,
            floor: 1.0,
        },
    ]);
    v.extend(cases_of!(Rule::AdaGrad, "adagrad", "v"));
    v.extend(cases_of!(Rule::Lamb, "lamb", "v"));
    v.extend(cases_of!(Rule::AdaGradNorm, "adagrad_norm", "b2"));
    v
}
