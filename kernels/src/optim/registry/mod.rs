//! `kiln run` entries of the fused optimizers: out of place (the updated `param` and
//! states come back under their input names), one tensor per call; the Rust API
//! ([`super::MultiTensorStep`]) updates lists of tensors in place.

mod compress;
mod frugal;
mod perturb;

pub use compress::{ECONTROL, RANDK, TOPK_EF};
pub use frugal::FRUGAL;
pub use perturb::{PERTURB, ZO_UPDATE};

use super::*;
use crate::launch::shape_err;
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, OpArgs, OpSpec, Outputs, ParamSpec, Result,
    Tensor, TensorSpec,
};

fn run(rule: Rule, client: &Client, a: &OpArgs) -> Result<Outputs> {
    run_step(rule, client, a, |rows, _| Ok(Block::whole(rows)))
}

/// `kiln bench`'s form of a rule's step ([`OpSpec::in_place`]): [`run_step`]'s copies
/// and optimizer made once, then one in-place step a call (the step counter advancing
/// on the device, as in training).
fn in_place(rule: Rule, client: &Client, a: &OpArgs) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let Prepared {
        mut opt,
        param,
        grad,
        ..
    } = prepare_step(rule, client, a, |rows, _| Ok(Block::whole(rows)))?;
    Ok(Box::new(move || opt.step(&[&param], &[&grad])))
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
    let Prepared {
        mut opt,
        param,
        grad,
        vector,
    } = prepare_step(rule, client, a, block_of)?;
    opt.step(&[&param], &[&grad])?;
    let back = |t: Tensor| -> Result<Tensor> {
        match vector {
            true => t.reshape(&[t.numel()]),
            false => Ok(t),
        }
    };
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

/// What a step of `kiln run` works on: the optimizer over a copy of `param` (`[out, in]`,
/// `[1, n]` for a vector), that copy, the gradient in its shape, and whether `param`
/// was a vector.
struct Prepared {
    opt: MultiTensorStep,
    param: Tensor,
    grad: Tensor,
    vector: bool,
}

/// [`run_step`]'s checks and set-up, before the step.
fn prepare_step(
    rule: Rule,
    client: &Client,
    a: &OpArgs,
    block_of: impl FnOnce(usize, usize) -> Result<Block>,
) -> Result<Prepared> {
    let given = a.tensor("param")?;
    // Checked here, so that an error names `param`, not the copy's source.
    crate::launch::check_input("param", given, given.client())?;
    let vector = given.rank() == 1;
    let to_2d = |t: &Tensor| -> Result<Tensor> {
        match t.rank() {
            1 => t.reshape(&[1, t.numel()]),
            _ => Ok(t.clone()),
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
    let zeros = |shape: &[usize]| Tensor::zeros(client, DType::F32, shape);
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
    // grad, the per-element states and master in the block's shape as the user gives
    // it (`[n]` for a vector param), named as given: the step sees them as `[out, in]`
    // and would name `grad[0]` with that shape.
    // The block's `[rows, cols]`, or for a vector param a one-row block as `[cols]` too.
    let fits = |name: &str, t: &Tensor| -> Result<()> {
        let flat = vector && shape[0] == 1 && t.shape() == [shape[1]];
        if flat || t.shape() == shape {
            return Ok(());
        }
        let want = match vector && shape[0] == 1 {
            true => format!("[{}] or {shape:?}", shape[1]),
            false => format!("{shape:?}"),
        };
        Err(shape_err(
            name,
            format!("{want}: the updated block's shape (param's, for a whole tensor)"),
            t.shape(),
        ))
    };
    let grad = a.tensor("grad")?;
    fits("grad", grad)?;
    for (j, n) in rule.state_names().iter().enumerate() {
        if let (Some(t), true) = (a.optional_tensor(n), j < rule.element_states()) {
            fits(n, t)?;
        }
    }
    if let Some(m) = a.optional_tensor("master") {
        fits("master", m)?;
    }
    let master = a.optional_tensor("master").map(to_2d).transpose()?;
    let grad = to_2d(grad)?;
    let given_state = GivenState {
        tensors: states.iter().collect(),
        master: master.as_ref(),
    };
    let opt = MultiTensorStep::with_state(
        rule,
        hyper,
        &[(&param, block)],
        &[Some(given_state)],
        step - 1,
    )?;
    Ok(Prepared {
        opt,
        param,
        grad,
        vector,
    })
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

fn example(dims: &[usize], rule: Rule) -> Result<kiln_runtime::InputShapes> {
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
    example_inputs: |d, _| example(d, Rule::AdamW),
    cost: |d, e| cost(d, e, 2),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adamw"),
    in_place: Some(|c, a| in_place(Rule::AdamW, c, a)),
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
    example_inputs: |d, _| example(d, Rule::Adan),
    cost: |d, e| cost(d, e, 4),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adan"),
    in_place: Some(|c, a| in_place(Rule::Adan, c, a)),
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
    example_inputs: |d, _| example(d, Rule::AdaBelief),
    cost: |d, e| cost(d, e, 2),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adabelief"),
    in_place: Some(|c, a| in_place(Rule::AdaBelief, c, a)),
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
    example_inputs: |d, _| example(d, Rule::AdaGrad),
    cost: |d, e| cost(d, e, 1),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adagrad"),
    in_place: Some(|c, a| in_place(Rule::AdaGrad, c, a)),
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
    example_inputs: |d, _| example(d, Rule::Lamb),
    cost: |d, e| cost(d, e, 2),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "lamb"),
    in_place: Some(|c, a| in_place(Rule::Lamb, c, a)),
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
    example_inputs: |d, _| example(d, Rule::AdaGradNorm),
    cost: |d, e| {
        let n: usize = d.iter().product();
        ((6 * n) as f64, (n * 3 * e) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "adagrad_norm"),
    in_place: Some(|c, a| in_place(Rule::AdaGradNorm, c, a)),
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
