//! `kiln run` entries of the MoE family (its kernels register themselves).
//!
//! Longer than most files: one short entry per MoE operator (gate, dispatch, combine, the
//! grouped FFN, the layer and their backward passes), kept together so that the `kiln run`
//! tensor and parameter names the family shares read in one place.

use super::*;
use crate::launch::shape_err;
use crate::matmul::Activation;
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, HostTensor, InputShapes, OpArgs, OpSpec, Outputs,
    ParamSpec, Result, Tensor, TensorSpec,
};

const LOGITS: TensorSpec = TensorSpec::new(
    "logits",
    "[S, E]",
    Dtypes::Float,
    false,
    "router logits (softmax in f32)",
);
const IDS: TensorSpec = TensorSpec::new(
    "expert_ids",
    "[S, k]",
    Dtypes::Fixed(DType::I32),
    false,
    "each route's expert (k distinct per token)",
)
.example(ExampleValues::ExpertIds);
const LOCATIONS: TensorSpec = TensorSpec::new(
    "locations",
    "[S, k]",
    Dtypes::Fixed(DType::I32),
    false,
    "each route's slot at its expert, -1 where dropped",
)
.example(ExampleValues::SlotLocations);
/// The gate's `capacity` output, so that its file feeds `moe_dispatch` as it is.
const CAPACITY_IN: TensorSpec = TensorSpec::new(
    "capacity",
    "[] (one element)",
    Dtypes::Fixed(DType::I32),
    true,
    "slots per expert C, as moe_gate writes it (the `capacity` parameter wins where set)",
);
const GATES: TensorSpec = TensorSpec::new(
    "gates",
    "[S, k]",
    Dtypes::Fixed(DType::F32),
    false,
    "each route's gate weight",
);
const X: TensorSpec = TensorSpec::new("x", "[S, M]", Dtypes::Float, false, "tokens");
const EXPERT_OUT: TensorSpec = TensorSpec::new(
    "expert_out",
    "[E, C, M]",
    Dtypes::Float,
    false,
    "the experts' outputs in the capacity layout",
);
const W1: TensorSpec = TensorSpec::new(
    "w1",
    "[E, M, F]",
    Dtypes::Like("x"),
    false,
    "first expert GEMM",
);
const W2: TensorSpec = TensorSpec::new(
    "w2",
    "[E, F, M]",
    Dtypes::Like("x"),
    false,
    "second expert GEMM",
);
const B1: TensorSpec = TensorSpec::new("b1", "[E, F]", Dtypes::Like("x"), true, "first bias");
const B2: TensorSpec = TensorSpec::new("b2", "[E, M]", Dtypes::Like("x"), true, "second bias");

const TOP_K: ParamSpec = ParamSpec::new("top_k", "2", "1 ..= min(8, E)", "experts per token");
const CF: ParamSpec = ParamSpec::new(
    "capacity_factor",
    "1",
    "a finite number >= 0",
    "capacity k floor(cf ceil(S / E)) per expert; 0: dropless (the busiest expert's count)",
);
const NORMALIZE: ParamSpec = ParamSpec::new(
    "normalize",
    "k > 1",
    "k > 1 | true | false",
    "renormalise the k gates to sum 1 before any drop",
);
const PRIORITIZED: ParamSpec = ParamSpec::new(
    "batch_prioritized",
    "false",
    "false | true",
    "count slots with tokens by descending top-1 probability",
);
const WORLD_SIZE: ParamSpec = ParamSpec::new(
    "world_size",
    "1",
    "1 ..= min(E, 1024) (a divisor of E)",
    "expert-parallel ranks (run in this process on the chosen device)",
);
const ACTIVATION: ParamSpec = ParamSpec::new(
    "activation",
    "silu",
    "silu | gelu | relu | none",
    "the experts' activation after the first GEMM (gelu: tanh form)",
);

fn gate_options(a: &OpArgs) -> Result<GateOptions> {
    let top_k = a.param_as("top_k")?;
    let declared = |name: &str| a.spec().params.iter().any(|p| p.name == name);
    Ok(GateOptions {
        top_k,
        capacity_factor: if declared("capacity_factor") {
            a.param_as("capacity_factor")?
        } else {
            1.0
        },
        normalize: match a
            .param_choice("normalize", &["k > 1", "true", "false"])?
            .as_str()
        {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        batch_prioritized: if declared("batch_prioritized") {
            a.param_as("batch_prioritized")?
        } else {
            false
        },
    })
}

fn scalar(client: &Client, dtype: DType, v: f64) -> Result<Tensor> {
    Tensor::upload(client, &HostTensor::from_f64(dtype, vec![], &[v])?)
}

fn run_gate(client: &Client, a: &OpArgs) -> Result<Outputs> {
    let g = moe_gate(a.tensor("logits")?, &gate_options(a)?)?;
    let r = g.routing;
    Ok(vec![
        ("expert_ids", r.expert_ids),
        ("gates", r.gates.expect("moe_gate returns gates")),
        ("locations", r.locations),
        ("capacity", scalar(client, DType::I32, r.capacity as f64)?),
        ("l_aux", g.l_aux),
    ])
}

/// `--shape S x E`.
fn logits_only(dims: &[usize], _: &kiln_runtime::ExampleParams) -> Result<InputShapes> {
    match *dims {
        [s, e] => Ok(vec![("logits", vec![s, e])]),
        _ => Err(shape_arg("S x E", dims)),
    }
}

fn shape_arg(expected: &str, dims: &[usize]) -> Error {
    Error::Param {
        param: "--shape".into(),
        expected: expected.into(),
        found: format!("{dims:?}"),
    }
}

/// `moe_gate`: top-k routing with deterministic slots.
pub static MOE_GATE: OpSpec = OpSpec {
    name: "moe_gate",
    summary: "MoE top-k gate: softmax, top-k (ties to the lower expert), renormalised gates, deterministic slots and capacity, l_aux",
    inputs: &[LOGITS],
    outputs: &[
        TensorSpec::new("expert_ids", "[S, k]", Dtypes::Fixed(DType::I32), false, "chosen experts, best first"),
        TensorSpec::new("gates", "[S, k]", Dtypes::Fixed(DType::F32), false, "gate weights (renormalised before drops)"),
        TensorSpec::new("locations", "[S, k]", Dtypes::Fixed(DType::I32), false, "slot at the expert, -1 where dropped"),
        TensorSpec::new("capacity", "[]", Dtypes::Fixed(DType::I32), false, "slots per expert C"),
        TensorSpec::new("l_aux", "[]", Dtypes::Fixed(DType::F32), false, "load-balancing loss"),
    ],
    params: &[TOP_K, CF, NORMALIZE, PRIORITIZED],
    run: run_gate,
    problem: "S x E",
    example_inputs: logits_only,
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (10.0 * n as f64, (n * (elem + 4)) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_gate"),
    in_place: None,
};

/// An optional f32 scalar input's value (0 when absent).
fn scalar_input(a: &OpArgs, name: &str) -> Result<f64> {
    match a.optional_tensor(name) {
        Some(t) => {
            t.expect_dtype(name, &[DType::F32])?;
            if t.numel() != 1 {
                return Err(shape_err(name, "[] (a scalar)".into(), t.shape()));
            }
            Ok(t.download()?.to_f64()[0])
        }
        None => Ok(0.0),
    }
}

fn run_gate_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let d_l_aux = scalar_input(a, "d_l_aux")?;
    let d = moe_gate_backward(
        a.tensor("logits")?,
        a.tensor("d_gates")?,
        d_l_aux,
        &gate_options(a)?,
    )?;
    Ok(vec![("d_logits", d)])
}

/// `moe_gate_backward`: d_logits through renormalisation, softmax and l_aux.
pub static MOE_GATE_BACKWARD: OpSpec = OpSpec {
    name: "moe_gate_backward",
    summary: "MoE gate backward: d_logits from d_gates and d_l_aux (top-k choice held fixed)",
    inputs: &[
        LOGITS,
        TensorSpec::new(
            "d_gates",
            "[S, k]",
            Dtypes::Fixed(DType::F32),
            false,
            "gradient of the gates (0 for dropped routes)",
        ),
        TensorSpec::new(
            "d_l_aux",
            "[]",
            Dtypes::Fixed(DType::F32),
            true,
            "gradient of l_aux (default 0)",
        ),
    ],
    outputs: &[TensorSpec::new(
        "d_logits",
        "[S, E]",
        Dtypes::Like("logits"),
        false,
        "gradient of the logits",
    )],
    params: &[TOP_K, NORMALIZE],
    run: run_gate_backward,
    problem: "S x E",
    example_inputs: |dims, p| {
        let mut v = logits_only(dims, p)?;
        v.push(("d_gates", vec![dims[0], 2]));
        Ok(v)
    },
    cost: MOE_GATE.cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_gate_backward"),
    in_place: None,
};

/// The routing of a data-movement call: ids and locations, gates when named, E and C
/// from `slots` (`[E, C, M]`) or from the parameters.
/// The routing of a data-movement operator's call: `E` and `C` from the slots tensor
/// `slots` (`(name, [E, C, M])`) where the operator takes one, else from `num_experts`
/// and `capacity` (by default from the ids and locations). Errors name what the caller
/// gave: the slots tensor or `locations` rather than `num_experts`/`capacity` where
/// those come from a shape, `expert_ids` where `num_experts` is its default.
fn routing(a: &OpArgs, slots: Option<(&str, &Tensor)>, with_gates: bool) -> Result<MoeRouting> {
    let from_ids = slots.is_none() && !a.given("num_experts");
    routing_as_given(a, slots, with_gates).map_err(|e| match (e, slots) {
        (Error::Param { param, found, .. }, Some((name, t))) if param == "num_experts" => {
            shape_err(name, format!("[E, C, M] with E >= 1 experts (found E = {found})"), t.shape())
        }
        (Error::Param { param, expected, found }, Some((name, t)))
            if param == "capacity" && expected.starts_with("more than every kept location (") =>
        {
            Error::Param {
                param: "locations".into(),
                expected: format!(
                    "every kept location below C = {found}, the slots per expert of {name} {:?} [E, C, M]",
                    t.shape()
                ),
                found: expected
                    .trim_start_matches("more than every kept location (")
                    .trim_end_matches(')')
                    .to_string(),
            }
        }
        (Error::Param { param, expected, .. }, Some((name, t)))
            if param == "capacity" && expected.starts_with("num_experts x capacity") =>
        {
            shape_err(
                name,
                format!("[E, C, M] with E x C slots at most {}", crate::launch::MAX_ELEMENTS),
                t.shape(),
            )
        }
        (Error::Param { param, expected, found }, None) if param == "capacity" && from_ids && expected.starts_with("num_experts x capacity") => {
            Error::Param {
                param: "expert_ids".into(),
                expected: format!("ids whose 1 + max (num_experts, by default) times capacity fits: {expected}"),
                found: format!("capacity {found}"),
            }
        }
        (e, _) => e,
    })
}

fn routing_as_given(
    a: &OpArgs,
    slots: Option<(&str, &Tensor)>,
    with_gates: bool,
) -> Result<MoeRouting> {
    let (ids, locs) = (a.tensor("expert_ids")?, a.tensor("locations")?);
    let gates = if with_gates {
        Some(a.tensor("gates")?)
    } else {
        None
    };
    let (e, c) = match slots {
        Some((name, t)) => match *t.shape() {
            [e, c, _] => (e, c),
            _ => return Err(shape_err(name, "[E, C, M]".into(), t.shape())),
        },
        None => {
            let max_of = |t: &Tensor| -> Result<usize> {
                Ok(t.download()?
                    .to_f64()
                    .into_iter()
                    .fold(-1.0f64, f64::max)
                    .max(-1.0) as i64 as usize)
            };
            let e = match a.param("num_experts")?.as_str() {
                "1 + max id" => {
                    ids.expect_dtype("expert_ids", &[DType::I32])?;
                    // No id to infer E from (an empty batch, or only negative ids):
                    // named as such rather than as an expert count of 0. With k = 0
                    // there is none either; the routing's check names `k` (below).
                    match max_of(ids)?.checked_add(1) {
                        Some(e) => e,
                        None if ids.shape().get(1) == Some(&0) => 0,
                        _ => {
                            return Err(Error::Param {
                                param: "num_experts".into(),
                                expected: "a number of experts: `expert_ids` holds no id >= 0 \
                                           to infer it from (`--set num_experts=E`)"
                                    .into(),
                                found: format!(
                                    "expert_ids {} without such an id",
                                    kiln_runtime::shape_str(ids.shape())
                                ),
                            })
                        }
                    }
                }
                _ => a.param_as("num_experts")?,
            };
            let c = match (a.param("capacity")?.as_str(), a.optional_tensor("capacity")) {
                ("1 + max location", Some(t)) => {
                    t.expect_dtype("capacity", &[DType::I32])?;
                    match t.download()?.to_f64()[..] {
                        [c] if c >= 0.0 => c as usize,
                        [c] => {
                            return Err(Error::Param {
                                param: "capacity".into(),
                                expected: "a slot count >= 0 (moe_gate's capacity)".into(),
                                found: c.to_string(),
                            })
                        }
                        _ => {
                            return Err(shape_err(
                                "capacity",
                                "one element (moe_gate's capacity)".into(),
                                t.shape(),
                            ))
                        }
                    }
                }
                ("1 + max location", None) => locs
                    .expect_dtype("locations", &[DType::I32])
                    .and_then(|_| max_of(locs))
                    .map(|m| m.wrapping_add(1))?,
                _ => a.param_as("capacity")?,
            };
            (e, c)
        }
    };
    MoeRouting::from_tensors(ids, locs, gates, e, c)
}

/// `--shape S x M x k` for the data-movement operators: E = k experts, C = S slots,
/// every slot full (the example routing).
fn movement_shapes(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match *dims {
        [s, m, k] => Ok((s, m, k)),
        _ => Err(shape_arg("S x M x k", dims)),
    }
}

fn movement_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let Ok((s, m, k)) = movement_shapes(dims) else {
        return (0.0, 0.0);
    };
    ((s * m * k) as f64, (2 * s * m * k * elem) as f64)
}

fn run_dispatch(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let r = routing(a, None, false)?;
    Ok(vec![("dispatched", moe_dispatch(a.tensor("x")?, &r)?)])
}

fn routes_for(dims: &[usize]) -> Result<(usize, usize, usize, InputShapes)> {
    let (s, m, k) = movement_shapes(dims)?;
    Ok((
        s,
        m,
        k,
        vec![("expert_ids", vec![s, k]), ("locations", vec![s, k])],
    ))
}

/// `moe_dispatch`: tokens into the capacity layout.
pub static MOE_DISPATCH: OpSpec = OpSpec {
    name: "moe_dispatch",
    summary: "MoE dispatch: x [S, M] into [E, C, M] slots (a gather through the slot -> route map; empty slots zero)",
    inputs: &[X, IDS, LOCATIONS, CAPACITY_IN],
    outputs: &[TensorSpec::new("dispatched", "[E, C, M]", Dtypes::Like("x"), false, "tokens in their experts' slots")],
    params: &[
        ParamSpec::new("num_experts", "1 + max id", "an integer >= 1", "experts E"),
        ParamSpec::new("capacity", "1 + max location", "an integer >= 0", "slots per expert C (default: the `capacity` input where given, else 1 + the largest location)"),
    ],
    run: run_dispatch,
    problem: "S x M x k (E = k, C = S)",
    example_inputs: |dims, _| {
        let (s, m, _, mut v) = routes_for(dims)?;
        v.push(("x", vec![s, m]));
        Ok(v)
    },
    cost: movement_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_dispatch"),
    in_place: None,
};

fn run_combine(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let out = a.tensor("expert_out")?;
    let r = routing(a, Some(("expert_out", out)), true)?;
    Ok(vec![("y", moe_combine(out, &r)?)])
}

/// `moe_combine`: gate-weighted sum of each token's expert outputs.
pub static MOE_COMBINE: OpSpec = OpSpec {
    name: "moe_combine",
    summary: "MoE combine: y[s] = sum_i keep_i g_i expert_out[I_i, loc_i] (a gather, f32 sums in choice order)",
    inputs: &[EXPERT_OUT, IDS, LOCATIONS, GATES],
    outputs: &[TensorSpec::new("y", "[S, M]", Dtypes::Like("expert_out"), false, "combined output")],
    params: &[],
    run: run_combine,
    problem: "S x M x k (E = k, C = S)",
    example_inputs: |dims, _| {
        let (s, m, k, mut v) = routes_for(dims)?;
        v.push(("expert_out", vec![k, s, m]));
        v.push(("gates", vec![s, k]));
        Ok(v)
    },
    cost: movement_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_combine"),
    in_place: None,
};

fn run_dispatch_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let d = a.tensor("d_dispatched")?;
    let r = routing(a, Some(("d_dispatched", d)), false)?;
    Ok(vec![("dx", moe_dispatch_backward(d, &r)?)])
}

/// `moe_dispatch_backward`: the gradient of dispatch.
pub static MOE_DISPATCH_BACKWARD: OpSpec = OpSpec {
    name: "moe_dispatch_backward",
    summary: "MoE dispatch backward: dx[s] = sum_i keep_i d_dispatched[I_i, loc_i]",
    inputs: &[
        TensorSpec::new(
            "d_dispatched",
            "[E, C, M]",
            Dtypes::Float,
            false,
            "gradient of dispatched",
        ),
        IDS,
        LOCATIONS,
    ],
    outputs: &[TensorSpec::new(
        "dx",
        "[S, M]",
        Dtypes::Like("d_dispatched"),
        false,
        "gradient of x",
    )],
    params: &[],
    run: run_dispatch_backward,
    problem: "S x M x k (E = k, C = S)",
    example_inputs: |dims, _| {
        let (s, m, k, mut v) = routes_for(dims)?;
        v.push(("d_dispatched", vec![k, s, m]));
        Ok(v)
    },
    cost: movement_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_dispatch_backward"),
    in_place: None,
};

fn run_combine_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let out = a.tensor("expert_out")?;
    let r = routing(a, Some(("expert_out", out)), true)?;
    let (d_out, d_gates) = moe_combine_backward(a.tensor("dy")?, out, &r)?;
    Ok(vec![("d_expert_out", d_out), ("d_gates", d_gates)])
}

/// `moe_combine_backward`: gradients of combine.
pub static MOE_COMBINE_BACKWARD: OpSpec = OpSpec {
    name: "moe_combine_backward",
    summary:
        "MoE combine backward: d_expert_out = g dy in each kept slot, d_gates = <dy, expert_out>",
    inputs: &[
        TensorSpec::new("dy", "[S, M]", Dtypes::Float, false, "gradient of y"),
        EXPERT_OUT,
        IDS,
        LOCATIONS,
        GATES,
    ],
    outputs: &[
        TensorSpec::new(
            "d_expert_out",
            "[E, C, M]",
            Dtypes::Like("dy"),
            false,
            "gradient of expert_out (zero in empty slots)",
        ),
        TensorSpec::new(
            "d_gates",
            "[S, k]",
            Dtypes::Fixed(DType::F32),
            false,
            "gradient of the gates (zero for dropped routes)",
        ),
    ],
    params: &[],
    run: run_combine_backward,
    problem: "S x M x k (E = k, C = S)",
    example_inputs: |dims, _| {
        let (s, m, k, mut v) = routes_for(dims)?;
        v.push(("dy", vec![s, m]));
        v.push(("expert_out", vec![k, s, m]));
        v.push(("gates", vec![s, k]));
        Ok(v)
    },
    cost: movement_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_combine_backward"),
    in_place: None,
};

fn weights<'a>(a: &'a OpArgs, activation: Activation) -> Result<ExpertWeights<'a>> {
    Ok(ExpertWeights {
        w1: a.tensor("w1")?,
        b1: a.optional_tensor("b1"),
        w2: a.tensor("w2")?,
        b2: a.optional_tensor("b2"),
        activation,
    })
}

fn run_expert_ffn(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let w = weights(a, Activation::parse(&a.param("activation")?)?)?;
    let kernel = GroupedKernel::parse(&a.param("kernel")?)?;
    Ok(vec![(
        "expert_out",
        moe_expert_ffn_on(a.tensor("dispatched")?, &w, kernel)?,
    )])
}

const GROUPED_KERNEL: ParamSpec = ParamSpec::new(
    "kernel",
    "auto",
    "auto | tensor_cores",
    "the grouped GEMMs' kernel: auto (autotuned among all), tensor_cores (wmma tiles only: f16/bf16 experts, M and F multiples of 8, a device with tensor cores)",
);

/// `--shape E x C x M x F` (expert FFN) or `S x M x F x E` (layer).
fn four(dims: &[usize], what: &str) -> Result<(usize, usize, usize, usize)> {
    match *dims {
        [a, b, c, d] => Ok((a, b, c, d)),
        _ => Err(shape_arg(what, dims)),
    }
}

/// `moe_expert_ffn`: the grouped expert FFN in the capacity layout.
pub static MOE_EXPERT_FFN: OpSpec = OpSpec {
    name: "moe_expert_ffn",
    summary: "MoE expert FFN act(D_e W1_e + b1_e) W2_e + b2_e over every expert, one grouped launch per GEMM (capacity layout)",
    inputs: &[
        TensorSpec::new("dispatched", "[E, C, M]", Dtypes::Float, false, "tokens in their experts' slots"),
        TensorSpec::new("w1", "[E, M, F]", Dtypes::Like("dispatched"), false, "first expert GEMM"),
        TensorSpec::new("w2", "[E, F, M]", Dtypes::Like("dispatched"), false, "second expert GEMM"),
        TensorSpec::new("b1", "[E, F]", Dtypes::Like("dispatched"), true, "first bias"),
        TensorSpec::new("b2", "[E, M]", Dtypes::Like("dispatched"), true, "second bias"),
    ],
    outputs: &[TensorSpec::new("expert_out", "[E, C, M]", Dtypes::Like("dispatched"), false, "each slot's expert output")],
    params: &[ACTIVATION, GROUPED_KERNEL],
    run: run_expert_ffn,
    problem: "E x C x M x F",
    example_inputs: |dims, _| {
        let (e, c, m, f) = four(dims, "E x C x M x F")?;
        Ok(vec![("dispatched", vec![e, c, m]), ("w1", vec![e, m, f]), ("w2", vec![e, f, m])])
    },
    cost: |dims, elem| {
        let Ok((e, c, m, f)) = four(dims, "") else {
            return (0.0, 0.0);
        };
        ((4 * e * c * m * f) as f64, ((2 * e * m * f + 2 * e * c * m) * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_expert_ffn"),
    in_place: None,
};

fn run_layer(client: &Client, a: &OpArgs) -> Result<Outputs> {
    let w = weights(a, Activation::parse(&a.param("activation")?)?)?;
    let opts = LayerOptions {
        gate: gate_options(a)?,
        path: MoePath::parse(&a.param("path")?)?,
    };
    let kernel = GroupedKernel::parse(&a.param("kernel")?)?;
    let world_size: usize = a.param_as("world_size")?;
    let (x, w_gate) = (a.tensor("x")?, a.tensor("w_gate")?);
    if world_size == 0 {
        return Err(Error::Param {
            param: "world_size".into(),
            expected: "1 or more ranks (a divisor of E)".into(),
            found: "0".into(),
        });
    }
    let out = moe_layer_local_ranks_on(x, w_gate, &w, &opts, world_size, kernel)?;
    let _ = client;
    Ok(vec![
        ("y", out.y),
        ("l_aux", out.l_aux),
        ("expert_ids", out.routing.expert_ids),
        ("locations", out.routing.locations),
    ])
}

/// `moe_layer`: gate, dispatch, expert FFN, combine; expert-parallel with world_size.
pub static MOE_LAYER: OpSpec = OpSpec {
    name: "moe_layer",
    summary: "MoE layer: top-k gate, dispatch, grouped expert FFN, combine (capacity or dropless path, autotuned); world_size > 1: expert parallel in this process",
    inputs: &[
        X,
        TensorSpec::new("w_gate", "[M, E]", Dtypes::Like("x"), false, "router weights (logits in f32)"),
        W1,
        W2,
        B1,
        B2,
    ],
    outputs: &[
        TensorSpec::new("y", "[S, M]", Dtypes::Like("x"), false, "layer output (dropped routes contribute 0)"),
        TensorSpec::new("l_aux", "[]", Dtypes::Fixed(DType::F32), false, "load-balancing loss"),
        TensorSpec::new("expert_ids", "[S, k]", Dtypes::Fixed(DType::I32), false, "the routing's experts"),
        TensorSpec::new("locations", "[S, k]", Dtypes::Fixed(DType::I32), false, "the routing's slots (-1: dropped)"),
    ],
    params: &[
        TOP_K,
        CF,
        NORMALIZE,
        PRIORITIZED,
        ACTIVATION,
        ParamSpec::new("path", "auto", "auto | capacity | dropless", "expert layout: capacity [E, C, M], dropless (sorted by expert, no padding), or auto (autotuned)"),
        WORLD_SIZE,
        GROUPED_KERNEL,
    ],
    run: run_layer,
    problem: "S x M x F x E",
    example_inputs: |dims, _| {
        let (s, m, f, e) = four(dims, "S x M x F x E")?;
        Ok(vec![
            ("x", vec![s, m]),
            ("w_gate", vec![m, e]),
            ("w1", vec![e, m, f]),
            ("w2", vec![e, f, m]),
        ])
    },
    cost: |dims, elem| {
        let Ok((s, m, f, e)) = four(dims, "") else {
            return (0.0, 0.0);
        };
        // k = 2 routes per token through two GEMMs, plus the gate.
        ((2 * 4 * s * m * f + 2 * s * m * e) as f64, ((2 * e * m * f + 6 * s * m) * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_layer"),
    in_place: None,
};

fn run_layer_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let w = weights(a, Activation::parse(&a.param("activation")?)?)?;
    let d_l_aux = scalar_input(a, "d_l_aux")?;
    let g = moe_layer_backward_local_ranks(
        a.tensor("x")?,
        a.tensor("w_gate")?,
        &w,
        &gate_options(a)?,
        a.tensor("dy")?,
        d_l_aux,
        a.param_as("world_size")?,
    )?;
    Ok(vec![
        ("dx", g.dx),
        ("d_w_gate", g.d_w_gate),
        ("d_w1", g.d_w1),
        ("d_w2", g.d_w2),
        ("d_b1", g.d_b1),
        ("d_b2", g.d_b2),
    ])
}

/// `moe_layer_backward`: gradients of the layer's inputs and weights.
pub static MOE_LAYER_BACKWARD: OpSpec = OpSpec {
    name: "moe_layer_backward",
    summary: "MoE layer backward: dx, d_w_gate, d_w1, d_w2, d_b1, d_b2 from dy and d_l_aux, routing recomputed and held fixed; world_size > 1: expert parallel in this process",
    inputs: &[
        X,
        TensorSpec::new("w_gate", "[M, E]", Dtypes::Like("x"), false, "router weights"),
        W1,
        W2,
        B1,
        B2,
        TensorSpec::new("dy", "[S, M]", Dtypes::Like("x"), false, "gradient of y"),
        TensorSpec::new("d_l_aux", "[]", Dtypes::Fixed(DType::F32), true, "gradient of l_aux (default 0)"),
    ],
    outputs: &[
        TensorSpec::new("dx", "[S, M]", Dtypes::Like("x"), false, "through the experts and the gate"),
        TensorSpec::new("d_w_gate", "[M, E]", Dtypes::Like("x"), false, "router weights' gradient"),
        TensorSpec::new("d_w1", "[E, M, F]", Dtypes::Like("x"), false, "first GEMM's gradient"),
        TensorSpec::new("d_w2", "[E, F, M]", Dtypes::Like("x"), false, "second GEMM's gradient"),
        TensorSpec::new("d_b1", "[E, F]", Dtypes::Like("x"), false, "first bias's gradient"),
        TensorSpec::new("d_b2", "[E, M]", Dtypes::Like("x"), false, "second bias's gradient"),
    ],
    params: &[TOP_K, CF, NORMALIZE, PRIORITIZED, ACTIVATION, WORLD_SIZE],
    run: run_layer_backward,
    problem: "S x M x F x E",
    example_inputs: |dims, p| {
        let mut v = (MOE_LAYER.example_inputs)(dims, p)?;
        v.push(("dy", vec![dims[0], dims[1]]));
        Ok(v)
    },
    cost: |dims, elem| {
        let (f, b) = (MOE_LAYER.cost)(dims, elem);
        (3.0 * f, 2.0 * b)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "moe_layer_backward"),
    in_place: None,
};

kiln_runtime::register_op!(
    MOE_GATE,
    MOE_GATE_BACKWARD,
    MOE_DISPATCH,
    MOE_COMBINE,
    MOE_DISPATCH_BACKWARD,
    MOE_COMBINE_BACKWARD,
    MOE_EXPERT_FFN,
    MOE_LAYER,
    MOE_LAYER_BACKWARD
);
