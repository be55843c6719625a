//! `kiln run` entries of the fused optimizers: out of place (the updated `param` and
//! states come back under their input names), one tensor per call; the Rust API
//! ([`super::MultiTensorStep`]) updates lists of tensors in place.

use super::*;
use crate::launch::shape_err;
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, HostTensor, OpArgs, OpSpec, Outputs, ParamSpec,
    Result, Tensor, TensorSpec,
};

fn run(rule: Rule, client: &Client, a: &OpArgs) -> Result<Outputs> {
    run_step(rule, client, a, |rows, _| Ok(Block::whole(rows)))
}

/// A step of `rule` on `kiln run`'s `param` (`[n]`: one row, or `[out, in]`) for the
/// block `block_of(out, in)` chooses, out of place: `grad`, the states (absent: zeros)
/// and `master` in the block's shape (`[n]` for a whole vector); the updated `param` and
/// states under their input names. Also S²FT's `s2ft_adamw_step`.
pub(crate) fn run_step(
    rule: Rule,
    client: &Client,
    a: &OpArgs,
    block_of: impl FnOnce(usize, usize) -> Result<Block>,
) -> Result<Outputs> {
    let given = a.tensor("param")?;
    let vector = given.rank() == 1;
    let to_2d = |t: &Tensor| -> Result<Tensor> {
        match t.rank() {
            1 => t.reshape(&[1, t.numel()]),
            _ => Ok(t.clone()),
        }
    };
    let back = |t: Tensor| -> Result<Tensor> {
        match vector {
            true => t.reshape(&[t.numel()]),
            false => Ok(t),
        }
    };
    if !matches!(given.rank(), 1 | 2) {
        return Err(shape_err("param", "[n] or [out, in]".into(), given.shape()));
    }
    let p2 = to_2d(given)?;
    let block = block_of(p2.shape()[0], p2.shape()[1])?;
    let defaults = Hyper::defaults(rule);
    let declared = |n: &str| a.spec().params.iter().any(|p| p.name == n);
    let get = |n: &str, d: f64| -> Result<f64> {
        if declared(n) {
            a.param_as(n)
        } else {
            Ok(d)
        }
    };
    let hyper = Hyper {
        lr: a.param_as("lr")?,
        beta1: get("beta1", defaults.beta1)?,
        beta2: get("beta2", defaults.beta2)?,
        beta3: get("beta3", defaults.beta3)?,
        eps: a.param_as("eps")?,
        weight_decay: a.param_as("weight_decay")?,
        no_prox: if declared("no_prox") {
            a.param_as("no_prox")?
        } else {
            false
        },
    };
    let step: u64 = a.param_as("step")?;
    if step == 0 {
        return Err(Error::Param {
            param: "step".into(),
            expected: "the step being taken, >= 1".into(),
            found: "0".into(),
        });
    }
    // Out of place: the update goes into a copy of param.
    let param = crate::rows::slice_rows(&p2, 0, 0, p2.shape()[0], p2.dtype())?;
    let shape = block.shape(p2.shape()[0], p2.shape()[1]);
    let zeros = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::upload(
            client,
            &HostTensor::from_f64(DType::F32, shape.to_vec(), &vec![0.0; n])?,
        )
    };
    // Per-element states in the block's shape; per-tensor scalars (`b2`) as `[1]`.
    let states: Vec<Tensor> = rule
        .state_names()
        .iter()
        .enumerate()
        .map(
            |(j, n)| match (a.optional_tensor(n), j < rule.element_states()) {
                (Some(t), true) => to_2d(t),
                (Some(t), false) => t.reshape(&[t.numel()]),
                (None, true) => zeros(&shape),
                (None, false) => zeros(&[1]),
            },
        )
        .collect::<Result<_>>()?;
    let master = a.optional_tensor("master").map(to_2d).transpose()?;
    let grad = to_2d(a.tensor("grad")?)?;
    let given_state = GivenState {
        tensors: states.iter().collect(),
        master: master.as_ref(),
    };
    let mut opt = MultiTensorStep::with_state(
        rule,
        hyper,
        &[(&param, block)],
        &[Some(given_state)],
        step - 1,
    )?;
    opt.step(&[&param], &[&grad])?;
    let (tensors, master) = opt.state_of(0)?;
    let mut outs: Outputs = vec![("param", back(param)?)];
    for (name, t) in rule.state_names().iter().zip(tensors) {
        outs.push((name, back(t)?));
    }
    if let Some(m) = master {
        outs.push(("master", back(m)?));
    }
    Ok(outs)
}

const PARAM: TensorSpec = TensorSpec::new(
    "param",
    "[n] or [out, in]",
    Dtypes::Float,
    false,
    "the parameter",
);
const GRAD: TensorSpec = TensorSpec::new(
    "grad",
    "param's shape",
    Dtypes::Like("param"),
    false,
    "its gradient",
);
const MASTER: TensorSpec = TensorSpec::new(
    "master",
    "param's shape",
    Dtypes::Fixed(DType::F32),
    true,
    "f32 master copy of a half-precision param (default: read from param)",
);
const OUT_PARAM: TensorSpec = TensorSpec::new(
    "param",
    "param's shape",
    Dtypes::Like("param"),
    false,
    "the updated parameter",
);
const OUT_MASTER: TensorSpec = TensorSpec::new(
    "master",
    "param's shape",
    Dtypes::Fixed(DType::F32),
    true,
    "the updated master copy (half-precision param)",
);

const fn state(name: &'static str, what: &'static str, example: ExampleValues) -> TensorSpec {
    TensorSpec::new(name, "param's shape", Dtypes::Fixed(DType::F32), true, what).example(example)
}

const fn out_state(name: &'static str, what: &'static str) -> TensorSpec {
    TensorSpec::new(
        name,
        "param's shape",
        Dtypes::Fixed(DType::F32),
        false,
        what,
    )
}

const fn lr(default: &'static str) -> ParamSpec {
    ParamSpec::new("lr", default, "a finite number >= 0", "learning rate")
}
const fn beta(name: &'static str, default: &'static str, what: &'static str) -> ParamSpec {
    ParamSpec::new(name, default, "0 <= beta < 1", what)
}
const fn eps(default: &'static str) -> ParamSpec {
    ParamSpec::new("eps", default, "a finite number > 0", "denominator floor")
}
const fn weight_decay(default: &'static str, what: &'static str) -> ParamSpec {
    ParamSpec::new("weight_decay", default, "a finite number >= 0", what)
}
const STEP: ParamSpec = ParamSpec::new(
    "step",
    "1",
    ">= 1",
    "the step being taken (bias corrections use it)",
);

fn example(dims: &[usize], rule: Rule) -> Result<Vec<(&'static str, Vec<usize>)>> {
    let [n] = *dims else {
        return Err(shape_err("--shape", "N (elements)".into(), dims));
    };
    let mut v = vec![("param", vec![n]), ("grad", vec![n])];
    let names = rule.state_names().iter().enumerate();
    v.extend(names.map(|(j, s)| (*s, vec![rule.state_len(j, n)])));
    Ok(v)
}

/// Bytes an optimizer step touches per element of an f32 parameter: param and state
/// read and written, the gradient read.
fn cost(dims: &[usize], elem: usize, states: usize) -> (f64, f64) {
    let n: usize = dims.iter().product();
    ((12 * n) as f64, (n * (3 * elem + 8 * states)) as f64)
}

/// The tensors of the rules with Adam's moments (`adamw`, `lamb`).
const ADAM_INPUTS: &[TensorSpec] = &[
    PARAM,
    GRAD,
    state("m", "first moment (default 0)", ExampleValues::Normal),
    state("v", "second moment (default 0)", ExampleValues::Positive),
    MASTER,
];
const ADAM_OUTPUTS: &[TensorSpec] = &[
    OUT_PARAM,
    out_state("m", "first moment"),
    out_state("v", "second moment"),
    OUT_MASTER,
];

/// `adamw`: PyTorch's AdamW step.
pub static ADAMW: OpSpec = OpSpec {
    name: "adamw",
    summary: "AdamW step (PyTorch's: decoupled decay param *= 1 - lr weight_decay, bias-corrected moments), fused; f32 state; multi-tensor through the Rust API",
    inputs: ADAM_INPUTS,
    outputs: ADAM_OUTPUTS,
    params: &[lr("0.001"), beta("beta1", "0.9", "first-moment decay"), beta("beta2", "0.999", "second-moment decay"), eps("1e-8"), weight_decay("0.01", "decoupled: param *= 1 - lr weight_decay"), STEP],
    run: |c, a| run(Rule::AdamW, c, a),
    problem: "N",
    example_inputs: |d| example(d, Rule::AdamW),
    cost: |d, e| cost(d, e, 2),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adamw"),
};

/// `adan`: the Adan step (sail-sg's).
pub static ADAN: OpSpec = OpSpec {
    name: "adan",
    summary: "Adan step (sail-sg: Nesterov momentum of the gradient difference, proximal decay param /= 1 + lr weight_decay unless no_prox), fused; f32 state",
    inputs: &[PARAM, GRAD, state("m", "first moment (default 0)", ExampleValues::Normal), state("d", "moment of the gradient difference (default 0)", ExampleValues::Normal), state("n", "moment of the squared Nesterov gradient (default 0)", ExampleValues::Positive), state("grad_prev", "the previous gradient (unused at step 1)", ExampleValues::Normal), MASTER],
    outputs: &[OUT_PARAM, out_state("m", "first moment"), out_state("d", "difference moment"), out_state("n", "squared moment"), out_state("grad_prev", "this step's gradient"), OUT_MASTER],
    params: &[lr("0.001"), beta("beta1", "0.98", "first-moment decay"), beta("beta2", "0.92", "difference-moment decay"), beta("beta3", "0.99", "squared-moment decay"), eps("1e-8"), weight_decay("0", "proximal: param /= 1 + lr weight_decay"), ParamSpec::new("no_prox", "false", "false | true", "decay first (param *= 1 - lr weight_decay) instead of the proximal division"), STEP],
    run: |c, a| run(Rule::Adan, c, a),
    problem: "N",
    example_inputs: |d| example(d, Rule::Adan),
    cost: |d, e| cost(d, e, 4),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adan"),
};

/// `adabelief`: the AdaBelief step.
pub static ADABELIEF: OpSpec = OpSpec {
    name: "adabelief",
    summary: "AdaBelief step (second moment of g - m plus eps, bias-corrected, decoupled decay), fused; f32 state",
    inputs: &[PARAM, GRAD, state("m", "first moment (default 0)", ExampleValues::Normal), state("s", "belief moment (default 0)", ExampleValues::Positive), MASTER],
    outputs: &[OUT_PARAM, out_state("m", "first moment"), out_state("s", "belief moment"), OUT_MASTER],
    params: &[lr("0.001"), beta("beta1", "0.9", "first-moment decay"), beta("beta2", "0.999", "belief-moment decay"), eps("1e-16"), weight_decay("0", "decoupled: param *= 1 - lr weight_decay"), STEP],
    run: |c, a| run(Rule::AdaBelief, c, a),
    problem: "N",
    example_inputs: |d| example(d, Rule::AdaBelief),
    cost: |d, e| cost(d, e, 2),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adabelief"),
};

/// `adagrad`: PyTorch's Adagrad step.
pub static ADAGRAD: OpSpec = OpSpec {
    name: "adagrad",
    summary: "Adagrad step (PyTorch's: g += weight_decay param, v += g^2, param -= lr g / (sqrt(v) + eps)), fused; f32 state",
    inputs: &[PARAM, GRAD, state("v", "sum of squared gradients (default 0)", ExampleValues::Positive), MASTER],
    outputs: &[OUT_PARAM, out_state("v", "sum of squared gradients"), OUT_MASTER],
    params: &[lr("0.01"), eps("1e-10"), weight_decay("0", "L2: g += weight_decay param"), STEP],
    run: |c, a| run(Rule::AdaGrad, c, a),
    problem: "N",
    example_inputs: |d| example(d, Rule::AdaGrad),
    cost: |d, e| cost(d, e, 1),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adagrad"),
};

/// `param` copied (out of place), perturbed by `f`, in `param`'s shape.
fn run_perturb(a: &OpArgs, f: impl FnOnce(&Tensor, u32) -> Result<()>) -> Result<Outputs> {
    let given = a.tensor("param")?;
    let flat = given.reshape(&[1, given.numel()])?;
    let param = crate::rows::slice_rows(&flat, 0, 0, 1, given.dtype())?;
    f(&param, a.param_as("stream")?)?;
    Ok(vec![("param", param.reshape(given.shape())?)])
}

/// `kiln run`'s `seeds`: comma-separated u64; empty = `0, 1, .., n-1`.
fn seeds_list(a: &OpArgs, n: usize) -> Result<Vec<u64>> {
    let raw = a.param("seeds")?;
    if raw.trim().is_empty() {
        return Ok((0..n as u64).collect());
    }
    let bad = || Error::Param {
        param: "seeds".into(),
        expected: format!("{n} comma-separated u64 seeds (one per projected gradient)"),
        found: raw.clone(),
    };
    let v: Vec<u64> = raw
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if v.len() != n {
        return Err(bad());
    }
    Ok(v)
}

const STREAM: ParamSpec = ParamSpec::new(
    "stream",
    "0",
    "a u32",
    "the tensor's position in its list (the generator's second counter word)",
);

fn perturb_example(dims: &[usize]) -> Result<Vec<(&'static str, Vec<usize>)>> {
    let [n] = *dims else {
        return Err(shape_err("--shape", "N (elements)".into(), dims));
    };
    Ok(vec![("param", vec![n])])
}

/// `perturb`: `param += eps z(seed)`, `z ~ N(0, I)` from Philox, never stored.
pub static PERTURB: OpSpec = OpSpec {
    name: "perturb",
    summary: "MeZO-style seeded perturbation param += eps z, z ~ N(0, I) drawn in the kernel from Philox4x32-10 keyed by (seed, stream, index), bit-identical on every backend and on the host (kiln::kernels::random::normal)",
    inputs: &[TensorSpec::new("param", "any", Dtypes::Float, false, "the parameter")],
    outputs: &[TensorSpec::new("param", "param's shape", Dtypes::Like("param"), false, "the perturbed parameter")],
    params: &[
        ParamSpec::new("seed", "0", "a u64", "the generator's key"),
        ParamSpec::new("eps", "0.001", "a finite number", "the perturbation scale"),
        STREAM,
    ],
    run: |_, a| {
        let (seed, eps): (u64, f64) = (a.param_as("seed")?, a.param_as("eps")?);
        run_perturb(a, |p, stream| perturb::perturb_stream(p, stream, &[seed], &[eps]))
    },
    problem: "N",
    example_inputs: perturb_example,
    cost: |d, e| {
        let n: usize = d.iter().product();
        (n as f64, (2 * n * e) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "perturb"),
};

/// `zo_update`: MeZO's update `param -= lr sum_i projected_grads[i] z(seeds[i])`.
pub static ZO_UPDATE: OpSpec = OpSpec {
    name: "zo_update",
    summary: "MeZO's zeroth-order update param -= lr sum_i projected_grads[i] z(seeds[i]) in one pass (z as in perturb, regenerated, never stored)",
    inputs: &[
        TensorSpec::new("param", "any", Dtypes::Float, false, "the parameter"),
        TensorSpec::new("projected_grads", "[n]", Dtypes::Fixed(DType::F32), false, "the projected gradient of each seed's step"),
    ],
    outputs: &[TensorSpec::new("param", "param's shape", Dtypes::Like("param"), false, "the updated parameter")],
    params: &[
        ParamSpec::new("seeds", "", "comma-separated u64, one per projected gradient (empty: 0, 1, .., n-1)", "each step's seed"),
        lr("0.000001"),
        STREAM,
    ],
    run: |_, a| {
        let p = a.tensor("projected_grads")?;
        p.expect_dtype("projected_grads", &[DType::F32])?;
        if p.rank() != 1 {
            return Err(shape_err("projected_grads", "[n]".into(), p.shape()));
        }
        let grads = p.download()?.to_f64();
        let seeds = seeds_list(a, grads.len())?;
        let coeffs = perturb::zo_coeffs(&grads, a.param_as("lr")?)?;
        run_perturb(a, |t, stream| {
            perturb::perturb_stream(t, stream, &seeds, &coeffs)
        })
    },
    problem: "N",
    example_inputs: |d| {
        let mut v = perturb_example(d)?;
        v.push(("projected_grads", vec![4]));
        Ok(v)
    },
    cost: |d, e| {
        let n: usize = d.iter().product();
        (8.0 * n as f64, (2 * n * e) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "zo_update"),
};

/// `lamb`: the LAMB step (per-tensor trust ratio).
pub static LAMB: OpSpec = OpSpec {
    name: "lamb",
    summary: "LAMB step (r = m_hat / (sqrt(v_hat) + eps) + weight_decay param; param -= lr (||param|| / ||r||) r, trust ratio 1 where either norm is 0): per-tensor norms by a deterministic reduction, then the update; f32 state",
    inputs: ADAM_INPUTS,
    outputs: ADAM_OUTPUTS,
    params: &[lr("0.001"), beta("beta1", "0.9", "first-moment decay"), beta("beta2", "0.999", "second-moment decay"), eps("1e-6"), weight_decay("0.01", "inside the trust-ratio direction r"), STEP],
    run: |c, a| run(Rule::Lamb, c, a),
    problem: "N",
    example_inputs: |d| example(d, Rule::Lamb),
    cost: |d, e| cost(d, e, 2),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "lamb"),
};

/// `adagrad_norm`: AdaGrad-Norm (one adaptive step size per tensor).
pub static ADAGRAD_NORM: OpSpec = OpSpec {
    name: "adagrad_norm",
    summary: "AdaGrad-Norm step (g += weight_decay param; b2 += ||g||^2 over the tensor; param -= lr g / (sqrt(b2) + eps)): the norm by a deterministic reduction, then the update",
    inputs: &[PARAM, GRAD, TensorSpec::new("b2", "[1]", Dtypes::Fixed(DType::F32), true, "sum of squared gradient norms (default 0)").example(ExampleValues::Positive), MASTER],
    outputs: &[OUT_PARAM, TensorSpec::new("b2", "[1]", Dtypes::Fixed(DType::F32), false, "sum of squared gradient norms"), OUT_MASTER],
    params: &[lr("0.01"), eps("1e-10"), weight_decay("0", "L2: g += weight_decay param"), STEP],
    run: |c, a| run(Rule::AdaGradNorm, c, a),
    problem: "N",
    example_inputs: |d| example(d, Rule::AdaGradNorm),
    cost: |d, e| {
        let n: usize = d.iter().product();
        ((6 * n) as f64, (n * 3 * e) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adagrad_norm"),
};

/// `kiln run topk_ef|randk`: `grad` (any shape), optional `error`; outputs `indices`,
/// `values` and `error` (grad's shape).
fn run_compress(a: &OpArgs, random: bool) -> Result<Outputs> {
    let grad = a.tensor("grad")?;
    let k: usize = a.param_as("k")?;
    let error = a.optional_tensor("error");
    let method = match random {
        true => "random".to_string(),
        false => a.param_choice("method", &["exact", "threshold"])?,
    };
    let out = match method.as_str() {
        "random" => compress::randk(grad, error, k, a.param_as("seed")?)?,
        "threshold" => {
            let sample = a.param_as("sample")?;
            compress::topk_ef_estimated(grad, error, k, sample, a.param_as("seed")?)?
        }
        _ => compress::topk_ef(grad, error, k)?,
    };
    Ok(vec![
        ("indices", out.indices),
        ("values", out.values),
        ("error", out.error.reshape(grad.shape())?),
    ])
}

const COMPRESS_INPUTS: &[TensorSpec] = &[
    TensorSpec::new(
        "grad",
        "any",
        Dtypes::Float,
        false,
        "the gradient (flattened)",
    ),
    TensorSpec::new(
        "error",
        "grad's shape",
        Dtypes::Fixed(DType::F32),
        true,
        "the error-feedback state (default 0)",
    ),
];
const COMPRESS_OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new(
        "indices",
        "[k]",
        Dtypes::Fixed(DType::I32),
        false,
        "selected positions in the flattened gradient, increasing",
    ),
    TensorSpec::new(
        "values",
        "[k]",
        Dtypes::Fixed(DType::F32),
        false,
        "the compressed values at those positions",
    ),
    TensorSpec::new(
        "error",
        "grad's shape",
        Dtypes::Fixed(DType::F32),
        false,
        "the new error-feedback state a - c",
    ),
];
const K: ParamSpec = ParamSpec::new(
    "k",
    "1",
    "1 <= k <= grad's elements",
    "how many coordinates are kept",
);

fn compress_example(dims: &[usize]) -> Result<Vec<(&'static str, Vec<usize>)>> {
    Ok(vec![("grad", dims.to_vec()), ("error", dims.to_vec())])
}

/// Bytes a compressor moves per element at least: grad and error read, `a`, the key
/// and the error written, the key read by each of the eight radix passes and the
/// compaction's two.
fn compress_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let n: usize = dims.iter().product();
    (n as f64 * 12.0, (n * (elem + 4 * 4 + 4 * 10)) as f64)
}

/// `topk_ef`: top-k with error feedback (exact device radix select).
pub static TOPK_EF: OpSpec = OpSpec {
    name: "topk_ef",
    summary: "top-k gradient compression with error feedback: a = error + grad; the k largest |a| (exact, by a deterministic device radix select; ties to the lower index, NaN above inf) as (indices, values); error = a - c",
    inputs: COMPRESS_INPUTS,
    outputs: COMPRESS_OUTPUTS,
    params: &[
        K,
        ParamSpec::new("method", "exact", "exact | threshold", "exact: the k largest; threshold: every |a| at or above the k-th largest of a seeded sample (about k values)"),
        ParamSpec::new("sample", "65536", ">= 1 (clamped to the elements)", "threshold: sampled positions"),
        ParamSpec::new("seed", "0", "a u64", "threshold: the sample's seed"),
    ],
    run: |_, a| run_compress(a, false),
    problem: "shape of grad",
    example_inputs: compress_example,
    cost: compress_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "topk_ef"),
};

/// `randk`: rand-k with error feedback (a seed shared by all workers picks the subset).
pub static RANDK: OpSpec = OpSpec {
    name: "randk",
    summary: "rand-k gradient compression with error feedback: a = error + grad; k coordinates drawn from seed (the same on every worker and backend), values (n / k) a_S; error = a - c",
    inputs: COMPRESS_INPUTS,
    outputs: COMPRESS_OUTPUTS,
    params: &[K, ParamSpec::new("seed", "0", "a u64", "the subset's seed, shared by all workers")],
    run: |_, a| run_compress(a, true),
    problem: "shape of grad",
    example_inputs: compress_example,
    cost: compress_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "randk"),
};

/// `kiln run econtrol`: one worker's EControl step out of place.
fn run_econtrol(a: &OpArgs) -> Result<Outputs> {
    let grad = a.tensor("grad")?;
    let step = super::econtrol(
        grad,
        a.optional_tensor("error"),
        a.optional_tensor("h"),
        a.param_as("k")?,
        a.param_as("eta")?,
    )?;
    Ok(vec![
        ("indices", step.indices),
        ("values", step.values),
        ("error", step.error.reshape(grad.shape())?),
        ("h", step.h.reshape(grad.shape())?),
    ])
}

/// `econtrol`: EControl's compressor step (error feedback with a controlled strength).
pub static ECONTROL: OpSpec = OpSpec {
    name: "econtrol",
    summary: "EControl (Gao, Islamov, Stich, ICLR 2024) on one worker: p = eta error + grad - h; delta = the k largest |p| (exact device radix select, ties to the lower index) as (indices, values); error = error + grad - h - delta; h = h + delta",
    inputs: &[
        COMPRESS_INPUTS[0],
        COMPRESS_INPUTS[1],
        TensorSpec::new(
            "h",
            "grad's shape",
            Dtypes::Fixed(DType::F32),
            true,
            "the gradient estimator (default 0; the first gradient to start as the paper's code does)",
        ),
    ],
    outputs: &[
        COMPRESS_OUTPUTS[0],
        COMPRESS_OUTPUTS[1],
        TensorSpec::new(
            "error",
            "grad's shape",
            Dtypes::Fixed(DType::F32),
            false,
            "the new error error + grad - h - delta",
        ),
        TensorSpec::new(
            "h",
            "grad's shape",
            Dtypes::Fixed(DType::F32),
            false,
            "the new estimator h + delta",
        ),
    ],
    params: &[
        K,
        ParamSpec::new("eta", "0.1", "finite, >= 0", "the error feedback's strength (the theory's delta / 400; tuned in practice)"),
    ],
    run: |_, a| run_econtrol(a),
    problem: "shape of grad",
    example_inputs: |d| Ok(vec![("grad", d.to_vec()), ("error", d.to_vec()), ("h", d.to_vec())]),
    cost: |d, e| {
        let (flops, bytes) = compress_cost(d, e);
        let n: usize = d.iter().product();
        // h read twice, p and the rest read and the new error and h written.
        (flops + 4.0 * n as f64, bytes + (n * 4 * 6) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "econtrol"),
};

/// `kiln run frugal`: one step of FRUGAL out of place (see [`super::Frugal`]).
fn run_frugal(a: &OpArgs) -> Result<Outputs> {
    let given = a.tensor("param")?;
    let flat = given.reshape(&[1, given.numel()])?;
    let param = crate::rows::slice_rows(&flat, 0, 0, 1, given.dtype())?.reshape(given.shape())?;
    let hyper = Hyper {
        lr: a.param_as("lr")?,
        beta1: a.param_as("beta1")?,
        beta2: a.param_as("beta2")?,
        eps: a.param_as("eps")?,
        weight_decay: a.param_as("weight_decay")?,
        ..Hyper::defaults(Rule::AdamW)
    };
    let config = FrugalConfig {
        density: a.param_as("density")?,
        update_gap: a.param_as("update_gap")?,
        lr_free: a.param_as("lr_free")?,
        seed: a.param_as("seed")?,
    };
    let step: u64 = a.param_as("step")?;
    if step == 0 {
        return Err(Error::Param {
            param: "step".into(),
            expected: "the step being taken, >= 1".into(),
            found: "0".into(),
        });
    }
    let moments = match (a.optional_tensor("m"), a.optional_tensor("v")) {
        (Some(m), Some(v)) => Some((m, v)),
        (None, None) => None,
        _ => {
            return Err(Error::Param {
                param: "m, v".into(),
                expected: "both or neither".into(),
                found: "one".into(),
            })
        }
    };
    let mut opt = Frugal::resume(&param, hyper, config, step - 1, moments)?;
    if let Some(master) = a.optional_tensor("master") {
        opt.set_master(0, master)?;
    }
    opt.step(&param, a.tensor("grad")?)?;
    let (indices, m, v) = opt.state()?;
    let mut outs: Outputs = vec![("param", param), ("m", m), ("v", v), ("indices", indices)];
    if let Some(master) = opt.master_of(0)? {
        outs.push(("master", master.reshape(given.shape())?));
    }
    Ok(outs)
}

/// `frugal`: FRUGAL's step (Adam on a seeded coordinate subset, signSGD on the rest).
pub static FRUGAL: OpSpec = OpSpec {
    name: "frugal",
    summary: "FRUGAL step, random-coordinate variant: Adam state on k = ceil(density n) coordinates drawn from (seed, step / update_gap) and redrawn (state reset) every update_gap steps, param -= lr_free sign(grad) on the rest, decoupled decay on all; f32 state, f32/f16/bf16 param (with an f32 master copy)",
    inputs: &[
        TensorSpec::new("param", "any", Dtypes::Float, false, "the parameter"),
        TensorSpec::new("grad", "param's shape", Dtypes::Like("param"), false, "its gradient"),
        TensorSpec::new("m", "[k]", Dtypes::Fixed(DType::F32), true, "first moment of the subset, in index order (default 0; ignored at a redraw)").example(ExampleValues::Normal),
        TensorSpec::new("v", "[k]", Dtypes::Fixed(DType::F32), true, "second moment of the subset (default 0; ignored at a redraw)").example(ExampleValues::Positive),
        MASTER,
    ],
    outputs: &[
        TensorSpec::new("param", "param's shape", Dtypes::Like("param"), false, "the updated parameter"),
        TensorSpec::new("m", "[k]", Dtypes::Fixed(DType::F32), false, "first moment of the subset"),
        TensorSpec::new("v", "[k]", Dtypes::Fixed(DType::F32), false, "second moment of the subset"),
        TensorSpec::new("indices", "[k]", Dtypes::Fixed(DType::I32), false, "the subset (increasing positions)"),
        OUT_MASTER,
    ],
    params: &[
        lr("0.001"),
        ParamSpec::new("lr_free", "0.001", "a finite number >= 0", "step of the signSGD part"),
        beta("beta1", "0.9", "first-moment decay"),
        beta("beta2", "0.999", "second-moment decay"),
        eps("1e-8"),
        weight_decay("0", "decoupled: param *= 1 - lr weight_decay"),
        STEP,
        ParamSpec::new("density", "0.25", "0 < density <= 1", "fraction of coordinates with Adam state"),
        ParamSpec::new("update_gap", "200", ">= 1", "steps between redraws of the subset"),
        ParamSpec::new("seed", "0", "a u64", "the subsets' seed"),
    ],
    run: |_, a| run_frugal(a),
    problem: "N",
    example_inputs: |d| {
        let [n] = *d else {
            return Err(shape_err("--shape", "N (elements)".into(), d));
        };
        Ok(vec![("param", vec![n]), ("grad", vec![n])])
    },
    cost: |d, e| cost(d, e, 1),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "frugal"),
};

kiln_runtime::register_op!(
    FRUGAL,
    ADAMW,
    ADAN,
    ADABELIEF,
    ADAGRAD,
    LAMB,
    ADAGRAD_NORM,
    PERTURB,
    ZO_UPDATE,
    TOPK_EF,
    RANDK,
    ECONTROL
);
