//! Self-test cases of the fused optimizers against the f64 reference: a ragged vector
//! and a matrix, step 3 (bias corrections and Adan's gradient difference active), weight
//! decay on.

use super::reference;
use super::rules::{Hyper, Rule};
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
    for &s in rule.state_names() {
        let values = match s {
            "v" | "s" | "n" => (0..n).map(|_| 0.05 * rng.uniform()).collect(),
            _ => rng.normals(n, 0.2),
        };
        v.push((s, shape.to_vec(), values));
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
        .map(|s| i.get(*s).map_or(vec![0.0; n], |t| t.to_f64()))
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
                ulps: 16.0,
                floor: 1.0,
            },
        ]
    };
}

/// The optimizer family's cases.
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    v.extend(cases_of!(Rule::AdamW, "adamw", "v"));
    v.extend(cases_of!(Rule::Adan, "adan", "n"));
    v.extend(cases_of!(Rule::AdaBelief, "adabelief", "s"));
    v.extend(cases_of!(Rule::AdaGrad, "adagrad", "v"));
    v
}
