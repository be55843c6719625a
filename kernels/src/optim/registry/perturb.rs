//! `kiln run` entries of seeded perturbation: `perturb` (`param += eps z(seed)`) and
//! MeZO's `zo_update`.

use super::*;

/// `param` copied (out of place), perturbed by `f`, in `param`'s shape.
fn run_perturb(a: &OpArgs, f: impl FnOnce(&Tensor, u32) -> Result<()>) -> Result<Outputs> {
    let given = a.tensor("param")?;
    let param = flat_copy(given)?;
    f(&param, a.param_as("stream")?)?;
    Ok(vec![("param", param.reshape(given.shape())?)])
}

/// `kiln bench`'s form ([`OpSpec::in_place`]): `param` copied once, then `f` in place on
/// the copy at each call.
fn perturb_in_place(
    a: &OpArgs,
    mut f: impl FnMut(&Tensor, u32) -> Result<()> + 'static,
) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let param = flat_copy(a.tensor("param")?)?;
    let stream = a.param_as("stream")?;
    Ok(Box::new(move || f(&param, stream)))
}

/// A `[1, n]` copy of `param` `t` (checked as `param` first).
fn flat_copy(t: &Tensor) -> Result<Tensor> {
    crate::launch::check_input("param", t, t.client())?;
    crate::rows::slice_rows(&t.reshape(&[1, t.numel()])?, 0, 0, 1, t.dtype())
}

/// `perturb`'s update under `kiln run`'s parameters.
fn perturb_update(a: &OpArgs) -> Result<impl FnMut(&Tensor, u32) -> Result<()> + 'static> {
    let (seed, eps): (u64, f64) = (a.param_as("seed")?, a.param_as("eps")?);
    crate::optim::perturb::check_eps(eps)?;
    Ok(move |p: &Tensor, stream| crate::optim::perturb::perturb_stream(p, stream, &[seed], &[eps]))
}

/// `zo_update`'s update under `kiln run`'s inputs and parameters (the projected gradients
/// downloaded once).
fn zo_update(a: &OpArgs) -> Result<impl FnMut(&Tensor, u32) -> Result<()> + 'static> {
    let p = a.tensor("projected_grads")?;
    p.expect_dtype("projected_grads", &[DType::F32])?;
    if p.rank() != 1 {
        return Err(shape_err("projected_grads", "[n]".into(), p.shape()));
    }
    let grads = p.download()?.to_f64();
    let coeffs = crate::optim::perturb::zo_coeffs(&grads, a.param_as("lr")?)?;
    let seeds = seeds_list(a, grads.len())?;
    Ok(move |t: &Tensor, stream| crate::optim::perturb::perturb_stream(t, stream, &seeds, &coeffs))
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

fn perturb_example(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
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
    run: |_, a| run_perturb(a, perturb_update(a)?),
    problem: "N",
    example_inputs: perturb_example,
    cost: |d, e| {
        let n: usize = d.iter().product();
        (n as f64, (2 * n * e) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "perturb"),
    in_place: Some(|_, a| perturb_in_place(a, perturb_update(a)?)),
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
    run: |_, a| run_perturb(a, zo_update(a)?),
    problem: "N",
    example_inputs: |d, p| {
        let mut v = perturb_example(d, p)?;
        v.push(("projected_grads", vec![4]));
        Ok(v)
    },
    cost: |d, e| {
        let n: usize = d.iter().product();
        (8.0 * n as f64, (2 * n * e) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "zo_update"),
    in_place: Some(|_, a| perturb_in_place(a, zo_update(a)?)),
};
