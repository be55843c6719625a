//! `kiln run frugal`: one FRUGAL step out of place.

use super::*;

/// `kiln run frugal`: one step of FRUGAL out of place (see [`super::super::Frugal`]).
fn run_frugal(a: &OpArgs) -> Result<Outputs> {
    let given = a.tensor("param")?;
    let (mut opt, param) = prepare_frugal(a)?;
    opt.step(&param, a.tensor("grad")?)?;
    let (indices, m, v) = opt.state()?;
    let mut outs: Outputs = vec![("param", param), ("m", m), ("v", v), ("indices", indices)];
    if let Some(master) = opt.master_of(0)? {
        outs.push(("master", master.reshape(given.shape())?));
    }
    Ok(outs)
}

/// `kiln bench`'s form ([`OpSpec::in_place`]): the copy and the optimizer made once,
/// then one in-place step a call (redrawing every `update_gap` steps, as in training).
fn frugal_in_place(a: &OpArgs) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let (mut opt, param) = prepare_frugal(a)?;
    let grad = a.tensor("grad")?.clone();
    Ok(Box::new(move || opt.step(&param, &grad)))
}

/// The optimizer over a copy of `param` (in param's shape), from `kiln run`'s arguments.
fn prepare_frugal(a: &OpArgs) -> Result<(Frugal, Tensor)> {
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
        subspace: a.param_as("subspace")?,
        block_order: a.param_as("block_order")?,
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
    Ok((opt, param))
}

/// `frugal`: FRUGAL's step (Adam on a seeded subset of coordinates, rows or columns,
/// signSGD on the rest).
pub static FRUGAL: OpSpec = OpSpec {
    name: "frugal",
    summary: "FRUGAL step: Adam state on k coordinates (ceil(density n) single ones, whole rows or columns of param seen as [shape[0], rest], or whole tensors of a list) drawn from (seed, step / update_gap) and redrawn (state reset) every update_gap steps, param -= lr_free sign(grad) on the rest, decoupled decay on all; f32 state, f32/f16/bf16 param (with an f32 master copy)",
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
        ParamSpec::new("subspace", "coordinates", "coordinates | rows | columns | blocks", "what the subset is made of: single coordinates (k = ceil(density n)), or ceil(density lines) whole rows or columns of param seen as [shape[0], numel / shape[0]] (a vector is one row); blocks: whole tensors of a list (here a list of one: all of param)"),
        ParamSpec::new("block_order", "random", "random | ascending | descending | mirror", "blocks: the order in which tensors take their turn (a list of one: always param)"),
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
    in_place: Some(|_, a| frugal_in_place(a)),
};
