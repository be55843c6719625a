//! Self-test cases: an operator run on small, ragged inputs against its f64 reference,
//! in every float dtype. A dtype the device lacks must be refused with a clear
//! `Unsupported` error (and that refusal is what gets checked).
//!
//! Each operator's cases live beside it in the operator library (its [`OpSpec`]'s
//! `selftest`); `kiln selftest` and the test suites run them through the registry,
//! exactly as `kiln run` does.

use crate::check::{max_rel_error, tolerance, Rng};
use crate::{Client, DType, Error, HostTensor, OpSpec, Result};
use std::collections::BTreeMap;

/// Named f64 inputs of a case: (name, shape, values), named as the operator's inputs.
pub type CaseInputs = Vec<(&'static str, Vec<usize>, Vec<f64>)>;

/// One operator case: how to make its inputs, its reference, and its error budget.
pub struct Case {
    /// Operator name (as in `kiln ops`).
    pub op: &'static str,
    /// What the inputs look like.
    pub what: &'static str,
    /// Builds the f64 inputs (named as the operator's inputs) from a generator.
    pub inputs: fn(&mut Rng) -> CaseInputs,
    /// Operator parameters.
    pub params: &'static [(&'static str, &'static str)],
    /// The output checked.
    pub output: &'static str,
    /// The f64 reference of that output, from the inputs as rounded to the dtype.
    pub reference: fn(&BTreeMap<String, HostTensor>) -> Vec<f64>,
    /// Roundings to the dtype under test on the output's path, the output's own
    /// included (1 for an operator that computes in f32 and rounds once at the end;
    /// more where intermediates are stored in the dtype, as a half-precision MoE layer
    /// stores them like PyTorch). Each allows one epsilon of the dtype.
    pub roundings: f64,
    /// Allowed error of the f32 arithmetic, in units of f32's epsilon (beyond the
    /// roundings to the dtype).
    pub ulps: f64,
    /// Denominator floor of the relative error (absolute error scale near zero).
    pub floor: f64,
}

/// The cases of `op` among a family's: what an operator's `selftest` returns.
pub fn only(cases: Vec<Case>, op: &str) -> Vec<Case> {
    cases.into_iter().filter(|c| c.op == op).collect()
}

/// Every registered operator's cases, in registry order.
pub fn cases() -> Vec<Case> {
    crate::registered_ops()
        .into_iter()
        .flat_map(|o: &OpSpec| (o.selftest)())
        .collect()
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
    /// The case needs tensor cores the device (or the dtype) does not have, and the
    /// operator said so clearly (`kernel=tensor_cores` cases on a CPU adapter or in f32,
    /// W8A8's `path=tensor_cores` without int8 tensor cores).
    Unavailable(String),
    /// The operator ran but broke its own contract: the case's output is missing, or
    /// in another dtype than its spec says. Never acceptable, also where errors are
    /// (the property tests accept a typed refusal of random inputs, not this).
    Broken(String),
    /// Anything else went wrong.
    Error(String),
}

impl Outcome {
    /// Whether this outcome is acceptable.
    pub fn ok(&self) -> bool {
        matches!(
            self,
            Outcome::Pass(..) | Outcome::Refused(_) | Outcome::Unavailable(_)
        )
    }
}

/// Runs one case in one dtype on `client`.
pub fn run_case(client: &Client, case: &Case, dtype: DType, seed: u64) -> Outcome {
    outcome(client, dtype, try_case(client, case, dtype, seed))
}

/// An error becomes `Refused` when the device lacks the dtype, `Unavailable` when the
/// case needs tensor cores that are not there for it (the device has none, or the dtype
/// is not a half type), else `Error`: on a device with tensor cores, a half-precision
/// case that finds no tensor-core kernel is a failure, not a skip.
fn outcome(client: &Client, dtype: DType, result: Result<Outcome>) -> Outcome {
    // As the tensor-core kernels' `require`: wmma fragments of 32-unit planes.
    let report = client.report();
    let has_tensor_cores = report.tensor_cores
        && report.plane_size.0 == 32
        && matches!(dtype, DType::F16 | DType::BF16);
    // Int8 fragments (W8A8's `path=tensor_cores`) take no float operand: any dtype.
    let has_int8_tensor_cores = report.int8_tensor_cores && report.plane_size.0 == 32;
    match result {
        Ok(o) => o,
        // Before the dtype's refusal: int8 fragments do not depend on it.
        Err(Error::Unsupported { feature, .. })
            if feature.starts_with("int8 tensor cores") && !has_int8_tensor_cores =>
        {
            Outcome::Unavailable(format!("refused: no {feature}"))
        }
        Err(Error::Unsupported { .. }) if !client.supports(dtype) => {
            Outcome::Refused(format!("{dtype} refused: the device has no {dtype}"))
        }
        Err(Error::Unsupported { feature, .. })
            if feature.starts_with("tensor cores") && !has_tensor_cores =>
        {
            Outcome::Unavailable(format!("refused: no {feature}"))
        }
        Err(e) => Outcome::Error(e.to_string()),
    }
}

/// Runs `case`'s operator, parameters and reference on inputs of the caller's (a
/// property test's random shapes and values) in `dtype`; as [`run_case`] otherwise.
pub fn run_case_on(
    client: &Client,
    case: &Case,
    dtype: DType,
    hosts: BTreeMap<String, HostTensor>,
) -> Outcome {
    let result = operator(case).and_then(|op| compare(client, op, case, dtype, hosts));
    outcome(client, dtype, result)
}

fn operator(case: &Case) -> Result<&'static OpSpec> {
    crate::registered_ops()
        .into_iter()
        .find(|o| o.name == case.op)
        .ok_or_else(|| Error::Unknown {
            kind: "operator",
            name: case.op.into(),
            known: crate::join_names(crate::registered_ops().iter().map(|o| o.name)),
        })
}

fn try_case(client: &Client, case: &Case, dtype: DType, seed: u64) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let mut hosts = BTreeMap::new();
    let op = operator(case)?;
    for (name, shape, values) in (case.inputs)(&mut rng) {
        let t = op
            .inputs
            .iter()
            .find(|t| t.name == name)
            .map_or(dtype, |t| t.example_dtype(dtype));
        hosts.insert(name.to_string(), HostTensor::from_f64(t, shape, &values)?);
    }
    compare(client, op, case, dtype, hosts)
}

fn compare(
    client: &Client,
    op: &'static OpSpec,
    case: &Case,
    dtype: DType,
    hosts: BTreeMap<String, HostTensor>,
) -> Result<Outcome> {
    // Inputs whose spec names one dtype (f32 states and scales, integer codes) keep it.
    let fixed = |specs: &[crate::TensorSpec], name: &str| {
        specs
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.fixed_dtype())
    };
    let want = (case.reference)(&hosts);
    let params: BTreeMap<String, String> = case
        .params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // Every case also checks that the operator leaves its inputs as they were.
    let outs = op.call_host_checked(client, &hosts, params.clone())?;
    let Some(got) = outs.get(case.output) else {
        return Ok(Outcome::Broken(format!(
            "`{}` returned no `{}`",
            case.op, case.output
        )));
    };
    // The output's dtype: fixed by its spec, chosen by a parameter its spec names
    // (w8a8's and attention's `out_dtype`), or the dtype under test.
    let out_spec = op.outputs.iter().find(|t| t.name == case.output);
    let by_param = op
        .params
        .iter()
        .find(|p| out_spec.is_some_and(|t| t.dtypes == crate::Dtypes::Param(p.name)));
    let expected = match (fixed(op.outputs, case.output), by_param) {
        (Some(d), _) => d,
        // A value that names no dtype (attention's `out_dtype=q`: q's dtype) means the
        // dtype under test.
        (None, Some(p)) => {
            DType::parse(params.get(p.name).map_or(p.default, |v| v.as_str())).unwrap_or(dtype)
        }
        (None, None) => dtype,
    };
    if got.dtype != expected {
        return Ok(Outcome::Broken(format!(
            "`{}` is {}, its spec says {}",
            case.output,
            got.dtype.name(),
            expected.name()
        )));
    }
    if got.numel() != want.len() {
        return Ok(Outcome::Broken(format!(
            "`{}` has {} elements, the case's reference {} (a reference written for other shapes?)",
            case.output,
            got.numel(),
            want.len()
        )));
    }
    let floor = case.floor.max(min_normal(got.dtype));
    let err = max_rel_error(&got.to_f64(), &want, floor);
    // The roundings to the output's dtype on its path, plus the case's f32 arithmetic
    // budget.
    let tol = tolerance(got.dtype, case.roundings) + tolerance(DType::F32, case.ulps);
    Ok(if err <= tol {
        Outcome::Pass(err, tol)
    } else {
        Outcome::Fail(err, tol)
    })
}
