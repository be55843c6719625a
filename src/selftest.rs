//! `kiln selftest`: every operator against its f64 reference at small, ragged sizes,
//! in every float dtype. A dtype the device lacks must be refused with a clear
//! `Unsupported` error (and that refusal is what gets checked).
//!
//! The cases live here once; the integration tests instantiate them per dtype.

use crate::check::{max_rel_error, tolerance, Rng};
use crate::kernels::{
    elementwise::reference as ew, gla::reference as gl, matmul::reference as mm,
    rowwise::reference as rw,
};
use crate::{Client, DType, Error, HostTensor, Result};
use std::collections::BTreeMap;

mod qgemm;

/// One operator case: how to make its inputs, its reference, and its error budget.
pub struct Case {
    /// Operator name (as in `kiln ops`).
    pub op: &'static str,
    /// What the inputs look like.
    pub what: &'static str,
    /// Builds the f64 inputs (named as the operator's inputs) from a generator.
    pub inputs: fn(&mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)>,
    /// Operator parameters.
    pub params: &'static [(&'static str, &'static str)],
    /// The output checked.
    pub output: &'static str,
    /// The f64 reference of that output, from the inputs as rounded to the dtype.
    pub reference: fn(&BTreeMap<String, HostTensor>) -> Vec<f64>,
    /// Allowed error, in units of the dtype's epsilon.
    pub ulps: f64,
    /// Denominator floor of the relative error (absolute error scale near zero).
    pub floor: f64,
}

fn x(inputs: &BTreeMap<String, HostTensor>) -> (Vec<f64>, usize) {
    let t = &inputs["x"];
    (t.to_f64(), *t.shape.last().unwrap_or(&1))
}

/// Values spanning the activations' awkward ranges: tiny, moderate, huge, +-30.
fn activation_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    let mut v = rng.normals(5 * 103, 3.0);
    v[..8].copy_from_slice(&[0.0, -0.0, 30.0, -30.0, 1e-4, -1e-4, 60.0, -60.0]);
    vec![("x", vec![5, 103], v)]
}

/// Rows of 131 with a fully -inf row, a row with -inf entries and a row of large values.
fn row_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
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

fn binary_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    // 3 x 7 x 37: no vector width but 1 divides 37, exercising the scalar path.
    vec![
        ("x", vec![3, 7, 37], rng.normals(3 * 7 * 37, 2.0)),
        ("y", vec![37], rng.normals(37, 2.0)),
    ]
}

fn binary_inputs_vec(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    // [9, 2, 20] with y [2, 20]: 4-wide vectors, a two-dimensional broadcast suffix.
    vec![
        ("x", vec![9, 2, 20], rng.normals(360, 2.0)),
        ("y", vec![1, 2, 20], rng.normals(40, 2.0)),
    ]
}

/// a [77, 130] @ b [130, 45] with bias and residual: no tile divides 77, 130 or 45.
fn matmul_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    let (m, k, n) = (77, 130, 45);
    vec![
        ("a", vec![m, k], rng.normals(m * k, 1.0)),
        ("b", vec![k, n], rng.normals(k * n, 1.0)),
        ("bias", vec![n], rng.normals(n, 1.0)),
        ("residual", vec![m, n], rng.normals(m * n, 1.0)),
    ]
}

/// M = 1 (a GEMV), b given as [N, K].
fn gemv_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
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

/// GLA inputs: B = 2, T = 70 (ragged against every chunk size), H = 2, K = 24, V = 20,
/// gates logsigmoid(randn) with a run at -20; with `step`, one token and a state.
fn gla_case_inputs(
    rng: &mut Rng,
    t: usize,
    step: bool,
) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
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

fn gla_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
    gla_case_inputs(rng, 70, false)
}

fn gla_step_inputs(rng: &mut Rng) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
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
pub fn cases() -> Vec<Case> {
    let mut all = base_cases();
    all.extend(qgemm::cases());
    all
}

fn base_cases() -> Vec<Case> {
    vec![
        Case {
            op: "add",
            params: &[],
            output: "out",
            what: "[3,7,37] + [37]",
            inputs: binary_inputs,
            reference: |i| ew::add(&i["x"].to_f64(), &i["y"].to_f64()),
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
            ulps: 32.0,
            floor: 1e-6,
        },
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
            ulps: 4.0,
            floor: 1.0,
        },
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
        Case {
            op: "gla",
            params: &[("chunk_size", "16")],
            output: "o",
            what: "[2,70,2,24] chunked (chunk 16), gates down to -20",
            inputs: gla_inputs,
            reference: gla_forward_reference,
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
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "gla_backward",
            params: &[("chunk_size", "32")],
            output: "dg",
            what: "[2,70,2,24] chunked backward (chunk 32), dg",
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
            ulps: 256.0,
            floor: 1.0,
        },
    ]
}

/// Smallest positive normal value of a float dtype: below it precision is absolute.
fn min_normal(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-14),
        DType::BF16 | DType::F32 => f32::MIN_POSITIVE as f64,
        _ => 0.0,
    }
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Within tolerance: (max relative error, tolerance).
    Pass(f64, f64),
    /// Outside tolerance: (max relative error, tolerance).
    Fail(f64, f64),
    /// The device lacks the dtype and said so clearly.
    Refused(String),
    /// Anything else went wrong.
    Error(String),
}

impl Outcome {
    /// Whether this outcome is acceptable.
    pub fn ok(&self) -> bool {
        matches!(self, Outcome::Pass(..) | Outcome::Refused(_))
    }
}

/// Runs one case in one dtype on `client`.
pub fn run_case(client: &Client, case: &Case, dtype: DType, seed: u64) -> Outcome {
    match try_case(client, case, dtype, seed) {
        Ok(o) => o,
        Err(Error::Unsupported { .. }) if !client.supports(dtype) => {
            Outcome::Refused(format!("{dtype} refused: the device has no {dtype}"))
        }
        Err(e) => Outcome::Error(e.to_string()),
    }
}

fn try_case(client: &Client, case: &Case, dtype: DType, seed: u64) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let mut hosts = BTreeMap::new();
    let op = crate::kernels::op(case.op)?;
    // Inputs whose spec names one dtype (f32 states and scales, integer codes) keep it.
    let fixed = |specs: &[crate::runtime::TensorSpec], name: &str| {
        specs
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.fixed_dtype())
    };
    for (name, shape, values) in (case.inputs)(&mut rng) {
        let t = op
            .inputs
            .iter()
            .find(|t| t.name == name)
            .map_or(dtype, |t| t.example_dtype(dtype));
        hosts.insert(name.to_string(), HostTensor::from_f64(t, shape, &values)?);
    }
    let want = (case.reference)(&hosts);
    let params: BTreeMap<String, String> = case
        .params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let outs = op.call_host(client, &hosts, params.clone())?;
    let got = outs.get(case.output).ok_or_else(|| Error::Kernel {
        kernel: case.op.into(),
        message: format!("no `{}`", case.output),
    })?;
    // The output's dtype: fixed by its spec, chosen by a parameter its spec names
    // (w8a8's `out_dtype`), or the dtype under test.
    let out_spec = op.outputs.iter().find(|t| t.name == case.output);
    let by_param = op
        .params
        .iter()
        .find(|p| out_spec.is_some_and(|t| t.dtypes.contains(p.name)));
    let expected = match (fixed(op.outputs, case.output), by_param) {
        (Some(d), _) => d,
        (None, Some(p)) => DType::parse(params.get(p.name).map_or(p.default, |v| v.as_str()))?,
        (None, None) => dtype,
    };
    if got.dtype != expected {
        return Err(Error::DType {
            tensor: case.output.into(),
            expected: expected.name().into(),
            found: got.dtype.name().into(),
        });
    }
    let floor = case.floor.max(min_normal(got.dtype));
    let err = max_rel_error(&got.to_f64(), &want, floor);
    // One rounding of the output to its dtype, plus the case's f32 arithmetic budget.
    let tol = tolerance(got.dtype, 1.0) + tolerance(DType::F32, case.ulps);
    Ok(if err <= tol {
        Outcome::Pass(err, tol)
    } else {
        Outcome::Fail(err, tol)
    })
}
