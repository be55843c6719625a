//! `kiln run frugal`: one FRUGAL step out of place.

use super::*;

/// `kiln run frugal`: one step of FRUGAL out of place (see [`super::super::Frugal`] and
/// [`super::super::FrugalSvd`]).
fn run_frugal(a: &OpArgs) -> Result<Outputs> {
    let given = a.tensor("param")?;
    let (mut opt, param) = prepare_frugal(a)?;
    opt.step(&param, a.tensor("grad")?)?;
    let mut outs: Outputs = vec![("param", param)];
    let master = match &opt {
        Prepared::Subset(opt) => {
            let (indices, m, v) = opt.state()?;
            outs.extend([("m", m), ("v", v), ("indices", indices)]);
            opt.master_of(0)?
        }
        Prepared::Svd(opt) => {
            let (projection, m, v) = opt.state_of(0)?;
            outs.extend([("m", m), ("v", v), ("projection", projection)]);
            opt.master_of(0)?
        }
    };
    if let Some(master) = master {
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

/// The optimizer of the subspace asked for.
enum Prepared {
    Subset(Box<Frugal>),
    Svd(Box<FrugalSvd>),
}

impl Prepared {
    fn step(&mut self, param: &Tensor, grad: &Tensor) -> Result<()> {
        match self {
            Prepared::Subset(opt) => opt.step(param, grad),
            Prepared::Svd(opt) => opt.step_multi(&[param], &[grad]),
        }
    }
}

/// The optimizer over a copy of `param` (in param's shape), from `kiln run`'s arguments.
fn prepare_frugal(a: &OpArgs) -> Result<(Prepared, Tensor)> {
    let given = a.tensor("param")?;
    crate::launch::check_input("param", given, given.client())?;
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
    let projection = a.optional_tensor("projection");
    config.check()?;
    let mut opt = if config.subspace == Subspace::Svd {
        let state = match (projection, moments) {
            (Some(p), Some((m, v))) => vec![Some((p, m, v))],
            (None, None) if !(step - 1).is_multiple_of(config.update_gap) => {
                return Err(Error::Param {
                    param: "projection, m, v".into(),
                    expected: format!(
                        "the subspace's projection and moments as inputs at step {step} \
                         (mid-subspace: new ones are taken at steps 1, 1 + update_gap ({}), ...)",
                        config.update_gap
                    ),
                    found: "none".into(),
                })
            }
            (None, None) => vec![],
            _ => {
                return Err(Error::Param {
                    param: "projection, m, v".into(),
                    expected: "all three or none (subspace svd)".into(),
                    found: "some".into(),
                })
            }
        };
        Prepared::Svd(Box::new(FrugalSvd::resume_multi(
            &[&param],
            hyper,
            config,
            step - 1,
            &state,
        )?))
    } else {
        if projection.is_some() {
            return Err(Error::Param {
                param: "projection".into(),
                expected: "only with subspace svd".into(),
                found: config.subspace.to_string(),
            });
        }
        Prepared::Subset(Box::new(Frugal::resume(
            &param,
            hyper,
            config,
            step - 1,
            moments,
        )?))
    };
    if let Some(master) = a.optional_tensor("master") {
        match &mut opt {
            Prepared::Subset(opt) => opt.set_master(0, master)?,
            Prepared::Svd(opt) => opt.set_master(0, master)?,
        }
    }
    Ok((opt, param))
}

/// `frugal`: FRUGAL's step (Adam on a seeded subset of coordinates, rows or columns,
/// signSGD on the rest).
pub static FRUGAL: OpSpec = OpSpec {
    name: "frugal",
    summary: "FRUGAL step: Adam state on k coordinates (ceil(density n) single ones, whole rows or columns of param seen as [shape[0], rest], whole tensors of a list, or the gradient's projection on its leading singular vectors) drawn from (seed, step / update_gap) and redrawn (state reset) every update_gap steps, param -= lr_free sign(grad) on the rest, decoupled decay on all; f32 state, f32/f16/bf16 param (with an f32 master copy)",
    inputs: &[
        TensorSpec::new("param", "any", Dtypes::Float, false, "the parameter"),
        TensorSpec::new("grad", "param's shape", Dtypes::Like("param"), false, "its gradient"),
        TensorSpec::new("m", "[k] (svd: the low-rank gradient's shape)", Dtypes::Fixed(DType::F32), true, "first moment of the subset, in index order (default 0; ignored at a redraw)").example(ExampleValues::Normal),
        TensorSpec::new("v", "[k] (svd: the low-rank gradient's shape)", Dtypes::Fixed(DType::F32), true, "second moment of the subset (default 0; ignored at a redraw)").example(ExampleValues::Positive),
        TensorSpec::new("projection", "[r, cols] (rows >= cols) or [r, rows]", Dtypes::Fixed(DType::F32), true, "svd: the subspace's projection, rows orthonormal (needed with m, v mid-subspace; ignored at a redraw)"),
        MASTER,
    ],
    outputs: &[
        TensorSpec::new("param", "param's shape", Dtypes::Like("param"), false, "the updated parameter"),
        TensorSpec::new("m", "[k] (svd: the low-rank gradient's shape: [rows, r] or [r, cols])", Dtypes::Fixed(DType::F32), false, "first moment of the subset"),
        TensorSpec::new("v", "[k] (svd: as m)", Dtypes::Fixed(DType::F32), false, "second moment of the subset"),
        TensorSpec::new("indices", "[k]", Dtypes::Fixed(DType::I32), true, "the subset (increasing positions; not for svd)"),
        TensorSpec::new("projection", "[r, cols] (rows >= cols) or [r, rows]", Dtypes::Fixed(DType::F32), true, "svd: the leading right (rows >= cols) or left singular vectors of the subspace's first gradient, r = ceil(density min(rows, cols)), rows orthonormal"),
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
        ParamSpec::new("subspace", "coordinates", "coordinates | rows | columns | blocks | svd", "what the subset is made of: single coordinates (k = ceil(density n)), or ceil(density lines) whole rows or columns of param seen as [shape[0], numel / shape[0]] (a vector is one row); blocks: whole tensors of a list (here a list of one: all of param); svd: Adam on the gradient projected on its ceil(density min(rows, cols)) leading singular vectors, signSGD on the residual"),
        ParamSpec::new("block_order", "random", "random | ascending | descending | mirror", "blocks: the order in which tensors take their turn (a list of one: always param; mirror needs an even count, so it is refused here)"),
    ],
    run: |_, a| run_frugal(a),
    problem: "shape of param (a matrix, e.g. 1024,4096, for subspaces rows, columns and svd)",
    example_inputs: |d, _| {
        if d.is_empty() || d.contains(&0) {
            return Err(shape_err("--shape", "param's shape, no zero extent".into(), d));
        }
        Ok(vec![("param", d.to_vec()), ("grad", d.to_vec())])
    },
    cost: |d, e| cost(d, e, 1),
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "frugal"),
    in_place: Some(|_, a| frugal_in_place(a)),
};
