//! `kiln run` entries of the S²FT family (its kernels register themselves).
//!
//! Longer than most files: one short entry per S²FT operator, kept together so that the
//! `kiln run` tensor and parameter names the family shares read in one place.

use super::*;
use crate::launch::shape_err;
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, HostTensor, OpArgs, OpSpec, Outputs, ParamSpec,
    Result, Tensor, TensorSpec,
};

const PERM: TensorSpec = TensorSpec::new(
    "perm",
    "[U]",
    Dtypes::Fixed(DType::I32),
    false,
    "new unit position -> old unit (s2ft_select's output)",
)
.example(ExampleValues::Permutation);
const W_Q: TensorSpec = TensorSpec::new(
    "w_q",
    "[H hd, d]",
    Dtypes::Float,
    true,
    "query projection (rows by KV group)",
);
const W_K: TensorSpec = TensorSpec::new(
    "w_k",
    "[Hkv hd, d]",
    Dtypes::Float,
    true,
    "key projection (rows by head)",
);
const W_V: TensorSpec = TensorSpec::new(
    "w_v",
    "[Hkv hd, d]",
    Dtypes::Float,
    true,
    "value projection (rows by head)",
);
const W_O: TensorSpec = TensorSpec::new(
    "w_o",
    "[d, H hd]",
    Dtypes::Float,
    true,
    "output projection (columns by KV group)",
);
const W_UP: TensorSpec = TensorSpec::new(
    "w_up",
    "[F, d]",
    Dtypes::Float,
    true,
    "FFN up projection (rows)",
);
const W_GATE: TensorSpec = TensorSpec::new(
    "w_gate",
    "[F, d]",
    Dtypes::Float,
    true,
    "FFN gate projection (rows)",
);
const W_DOWN: TensorSpec = TensorSpec::new(
    "w_down",
    "[d, F]",
    Dtypes::Float,
    true,
    "FFN down projection (columns)",
);

const HEAD_DIM: ParamSpec = ParamSpec::new(
    "head_dim",
    "rows of w_k / U",
    "a divisor of w_k's and w_v's rows",
    "rows per attention head",
);
const BLOCK: ParamSpec = ParamSpec::new(
    "block",
    "rows",
    "rows | columns",
    "the trainable block: W[start:end, :] or W[:, start:end]",
);
const START: ParamSpec = ParamSpec::new(
    "start",
    "0",
    "0 ..= end",
    "first row (rows) or column (columns) of the block",
);
const END: ParamSpec = ParamSpec::new(
    "end",
    "all",
    "start ..= the extent, or all",
    "one past the block's last row or column",
);

fn scalar(client: &Client, v: f64) -> Result<Tensor> {
    Tensor::upload(client, &HostTensor::from_f64(DType::F32, vec![], &[v])?)
}

fn i32s(client: &Client, v: &[usize]) -> Result<Tensor> {
    let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    Tensor::upload(
        client,
        &HostTensor::from_f64(DType::I32, vec![v.len()], &f)?,
    )
}

/// `perm` as a checked permutation.
fn perm_of(a: &OpArgs) -> Result<S2ftPermutation> {
    let t = a.tensor("perm")?;
    t.expect_dtype("perm", &[DType::I32])?;
    if t.rank() != 1 {
        return Err(shape_err("perm", "[U]".into(), t.shape()));
    }
    let v = t.download()?.to_f64();
    if let Some(at) = v.iter().position(|&x| x < 0.0) {
        return Err(Error::Param {
            param: "perm".into(),
            expected: format!("a permutation of 0..{} (U = its length)", v.len()),
            found: format!("{} at index {at}", v[at]),
        });
    }
    S2ftPermutation::from_perm(v.iter().map(|&x| x as usize).collect())
}

/// The block from `block`, `start`, `end` (`all`: to the extent `out` rows or `inp` columns).
fn block_of(a: &OpArgs, out: usize, inp: usize) -> Result<Block> {
    let kind = a.param_choice("block", &["rows", "columns"])?;
    let start: usize = a.param_as("start")?;
    let end = match a.param("end")?.as_str() {
        "all" if kind == "rows" => out,
        "all" => inp,
        _ => a.param_as("end")?,
    };
    let b = Block::parse(&kind, start, end)?;
    b.check("w", out, inp)?;
    Ok(b)
}

fn units_list(a: &OpArgs, name: &str) -> Result<Vec<usize>> {
    let raw = a.param(name)?;
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| Error::Param {
                param: name.into(),
                expected: "comma-separated unit indices".into(),
                found: raw.clone(),
            })
        })
        .collect()
}

fn run_select(client: &Client, a: &OpArgs) -> Result<Outputs> {
    let unit_size: usize = a.param_as("unit_size")?;
    let row_w = a.optional_tensor("row_weight");
    let col_w = a.optional_tensor("col_weight");
    let acts = a.optional_tensor("activations");
    let num_units = match a.param("num_units")?.as_str() {
        "from the inputs" => {
            // Units of `unit_size` are the column-side ones (`col_weight`,
            // `activations`); `row_weight`'s units may be shorter (GQA's W_v).
            let n = match (col_w.or(acts), row_w) {
                (Some(t), _) if t.rank() == 2 => t.shape()[1],
                (_, Some(w)) if w.rank() == 2 => w.shape()[0],
                _ => {
                    return Err(Error::Param {
                        param: "num_units".into(),
                        expected: "a count (no weight or activation tensor to infer it from)"
                            .into(),
                        found: "from the inputs".into(),
                    })
                }
            };
            n / unit_size.max(1)
        }
        _ => a.param_as("num_units")?,
    };
    let (units_a, units_b) = (units_list(a, "units_a")?, units_list(a, "units_b")?);
    let need = |name: &'static str, t: Option<&'static str>| -> Error {
        Error::MissingTensor {
            op: "s2ft_select".into(),
            tensor: t.unwrap_or(name).into(),
            expected: format!("the input of strategy={name}"),
        }
    };
    let strategy = match a
        .param_choice(
            "strategy",
            &["random", "weight_norm", "activation", "explicit"],
        )?
        .as_str()
    {
        "random" => Strategy::Random {
            seed: a.param_as("seed")?,
        },
        "weight_norm" => Strategy::WeightNorm {
            row_weight: row_w.ok_or_else(|| need("weight_norm", Some("row_weight")))?,
            col_weight: col_w.ok_or_else(|| need("weight_norm", Some("col_weight")))?,
        },
        "activation" => Strategy::Activation {
            activations: acts.ok_or_else(|| need("activation", Some("activations")))?,
        },
        _ if !a.given("units_a") && !a.given("units_b") => {
            return Err(Error::Param {
                param: "units_a".into(),
                expected: "the units of strategy=explicit (units_a and/or units_b: comma-separated, an empty value for none)".into(),
                found: "neither units_a nor units_b set".into(),
            })
        }
        _ => Strategy::Explicit {
            a: &units_a,
            b: &units_b,
        },
    };
    let (count_a, count_b) = match a.param("strategy")?.as_str() {
        "explicit" => {
            // The lists fix the counts: a count set beside them must agree.
            for (name, units) in [("count_a", &units_a), ("count_b", &units_b)] {
                if a.given(name) && a.param_as::<usize>(name)? != units.len() {
                    return Err(Error::Param {
                        param: name.into(),
                        expected: format!(
                            "unset, or {} (the units listed in units_{})",
                            units.len(),
                            &name[6..]
                        ),
                        found: a.param(name)?,
                    });
                }
            }
            (units_a.len(), units_b.len())
        }
        _ => (a.param_as("count_a")?, a.param_as("count_b")?),
    };
    // The permutation's outputs are [U] i32 (and the host builds tables of U): a U the
    // device cannot hold is refused before any of it is built.
    client.require_buffer("perm", num_units.saturating_mul(4))?;
    let p = s2ft_select(num_units, unit_size, count_a, count_b, &strategy)?;
    let (r, c) = (p.row_block(), p.col_block());
    Ok(vec![
        ("perm", i32s(client, &p.perm)?),
        ("inverse", i32s(client, &p.inverse)?),
        ("row_block", i32s(client, &[r.start, r.end])?),
        ("col_block", i32s(client, &[c.start, c.end])?),
    ])
}

/// `s2ft_select`: the units to train and their co-permutation.
pub static S2FT_SELECT: OpSpec = OpSpec {
    name: "s2ft_select",
    summary: "S2FT selection: count_a units for the row block and count_b for the column block (random | weight_norm | activation | explicit), and the co-permutation A-only, shared, B-only, rest",
    inputs: &[
        TensorSpec::new("row_weight", "[U r, in]", Dtypes::Float, true, "weight_norm: the row-block matrix (W_v, W_up), r = its rows / U (head_dim under GQA, unit_size otherwise)"),
        TensorSpec::new("col_weight", "[out, U unit_size]", Dtypes::Float, true, "weight_norm: the column-block matrix (W_o, W_down)"),
        TensorSpec::new("activations", "[T, U unit_size]", Dtypes::Float, true, "activation: a calibration batch of the column-block matrix's input"),
    ],
    outputs: &[
        TensorSpec::new("perm", "[U]", Dtypes::Fixed(DType::I32), false, "new position -> old unit"),
        TensorSpec::new("inverse", "[U]", Dtypes::Fixed(DType::I32), false, "old unit -> new position"),
        TensorSpec::new("row_block", "[2]", Dtypes::Fixed(DType::I32), false, "trained row block, in units: [0, |A|)"),
        TensorSpec::new("col_block", "[2]", Dtypes::Fixed(DType::I32), false, "trained column block, in units: [|A only|, |A| + |B only|)"),
    ],
    params: &[
        ParamSpec::new("strategy", "random", "random | weight_norm | activation | explicit", "how units are picked (ties: the lower unit)"),
        ParamSpec::new("num_units", "from the inputs", "a count >= 0", "units U (KV groups or FFN channels)"),
        ParamSpec::new("unit_size", "1", ">= 1", "rows (columns) per unit: head_dim x heads per KV group, 1 for FFN channels"),
        ParamSpec::new("count_a", "1", "0 ..= U", "units of the row block (W_v, W_up, W_gate)"),
        ParamSpec::new("count_b", "1", "0 ..= U", "units of the column block (W_o, W_down)"),
        ParamSpec::new("seed", "0", "a u64", "random: the generator's seed"),
        ParamSpec::new("units_a", "", "comma-separated units", "explicit: the row block's units"),
        ParamSpec::new("units_b", "", "comma-separated units", "explicit: the column block's units"),
    ],
    run: run_select,
    problem: "U x C",
    example_inputs: |dims, _| match *dims {
        [u, c] => Ok(vec![("row_weight", vec![u, c]), ("col_weight", vec![c, u]), ("activations", vec![c, u])]),
        _ => Err(shape_err("--shape", "U x C".into(), dims)),
    },
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (2.0 * n as f64, (2 * n * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_select"),
    in_place: None,
};

fn run_permute(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let p = perm_of(a)?;
    let mut outs: Outputs = Vec::new();
    let attn = ["w_q", "w_k", "w_v", "w_o"].map(|n| a.optional_tensor(n));
    if attn.iter().any(Option::is_some) {
        let (k_name, k) = match (attn[1], attn[2]) {
            (Some(k), _) => ("w_k", k),
            (None, Some(v)) => ("w_v", v),
            (None, None) => {
                return Err(Error::MissingTensor {
                    op: "s2ft_permute".into(),
                    tensor: "w_k".into(),
                    expected: "w_k or w_v with the attention projections (they fix head_dim)"
                        .into(),
                })
            }
        };
        let q = match (attn[0], attn[3]) {
            (Some(q), _) => Some(("w_q", q, Axis::Rows)),
            (None, Some(o)) => Some(("w_o", o, Axis::Columns)),
            _ => None,
        };
        let layout = head_layout(a, &p, (k_name, k), q)?;
        let head_dim = layout.head_dim;
        let q_unit = layout.group() * head_dim;
        let units = [
            (q_unit, Axis::Rows),
            (head_dim, Axis::Rows),
            (head_dim, Axis::Rows),
            (q_unit, Axis::Columns),
        ];
        for ((name, w), (unit, axis)) in ["w_q", "w_k", "w_v", "w_o"]
            .into_iter()
            .zip(attn)
            .zip(units)
        {
            if let Some(w) = w {
                outs.push((name, s2ft_permute(name, w, &p, unit, axis, "head_dim")?));
            }
        }
    }
    for (name, axis) in [
        ("w_up", Axis::Rows),
        ("w_gate", Axis::Rows),
        ("w_down", Axis::Columns),
    ] {
        if let Some(w) = a.optional_tensor(name) {
            outs.push((name, s2ft_permute(name, w, &p, 1, axis, "unit_size")?));
        }
    }
    // Every matrix given is of one layer: one model dimension d.
    let given: Vec<_> = MATRICES
        .iter()
        .filter_map(|&(n, axis)| a.optional_tensor(n).map(|w| (n, w, axis)))
        .collect();
    model_dim(&given, None)?;
    if outs.is_empty() {
        return Err(Error::MissingTensor {
            op: "s2ft_permute".into(),
            tensor: "w_q, w_k, w_v, w_o, w_up, w_gate or w_down".into(),
            expected: "at least one matrix to permute".into(),
        });
    }
    Ok(outs)
}

/// `s2ft_permute`: co-permutes the given projections, one launch each.
pub static S2FT_PERMUTE: OpSpec = OpSpec {
    name: "s2ft_permute",
    summary: "S2FT co-permutation: rows of w_q/w_k/w_v and columns of w_o by KV group, rows of w_up/w_gate and columns of w_down by channel (each given matrix, one gather launch)",
    inputs: &[PERM, W_Q, W_K, W_V, W_O, W_UP, W_GATE, W_DOWN],
    outputs: &[
        TensorSpec::new("w_q", "[H hd, d]", Dtypes::Like("w_q"), true, "permuted (when given)"),
        TensorSpec::new("w_k", "[Hkv hd, d]", Dtypes::Like("w_k"), true, "permuted (when given)"),
        TensorSpec::new("w_v", "[Hkv hd, d]", Dtypes::Like("w_v"), true, "permuted (when given)"),
        TensorSpec::new("w_o", "[d, H hd]", Dtypes::Like("w_o"), true, "permuted (when given)"),
        TensorSpec::new("w_up", "[F, d]", Dtypes::Like("w_up"), true, "permuted (when given)"),
        TensorSpec::new("w_gate", "[F, d]", Dtypes::Like("w_gate"), true, "permuted (when given)"),
        TensorSpec::new("w_down", "[d, F]", Dtypes::Like("w_down"), true, "permuted (when given)"),
    ],
    params: &[HEAD_DIM],
    run: run_permute,
    problem: "F x d",
    example_inputs: |dims, _| match *dims {
        [f, d] => Ok(vec![("perm", vec![f]), ("w_up", vec![f, d]), ("w_gate", vec![f, d]), ("w_down", vec![d, f])]),
        _ => Err(shape_err("--shape", "F x d".into(), dims)),
    },
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (0.0, (6 * n * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_permute"),
    in_place: None,
};

fn run_verify(client: &Client, a: &OpArgs) -> Result<Outputs> {
    let p = perm_of(a)?;
    let x = a.tensor("x")?;
    crate::launch::check_input("x", x, x.client())?;
    let mats = |names: &[&'static str]| -> Result<Vec<(&'static str, &Tensor, Axis)>> {
        names
            .iter()
            .map(|&n| {
                let axis = MATRICES
                    .iter()
                    .find(|m| m.0 == n)
                    .map_or(Axis::Rows, |m| m.1);
                let w = a.tensor(n)?;
                // The layer runs in x's dtype.
                w.expect_dtype(n, &[x.dtype()])?;
                Ok((n, w, axis))
            })
            .collect()
    };
    let report = if let Some(w_up) = a.optional_tensor("w_up") {
        model_dim(&mats(&["w_up", "w_gate", "w_down"])?, Some(x))?;
        let w = FfnWeights {
            w_up,
            w_gate: a.tensor("w_gate")?,
            w_down: a.tensor("w_down")?,
        };
        s2ft_verify_ffn(&w, &p, x)?
    } else {
        model_dim(&mats(&["w_q", "w_k", "w_v", "w_o"])?, Some(x))?;
        let w = AttentionWeights {
            w_q: a.tensor("w_q")?,
            w_k: a.tensor("w_k")?,
            w_v: a.tensor("w_v")?,
            w_o: a.tensor("w_o")?,
        };
        let heads = head_layout(a, &p, ("w_k", w.w_k), Some(("w_q", w.w_q, Axis::Rows)))?;
        s2ft_verify_attention(&w, &heads, &p, x, a.param_as("causal")?)?
    };
    Ok(vec![
        ("max_abs_diff", scalar(client, report.max_abs_diff)?),
        ("bound", scalar(client, report.bound)?),
        ("y", report.y),
        ("y_permuted", report.y_permuted),
    ])
}

/// `s2ft_verify`: the layer before and after co-permutation on one input.
pub static S2FT_VERIFY: OpSpec = OpSpec {
    name: "s2ft_verify",
    summary: "S2FT check: the SwiGLU FFN (w_up/w_gate/w_down given) or self-attention layer (w_q/w_k/w_v/w_o) on x, before and after permuting by perm; they agree to rounding",
    inputs: &[
        TensorSpec::new("x", "[T, d]", Dtypes::Float, false, "a (random) input"),
        PERM,
        W_Q,
        W_K,
        W_V,
        W_O,
        W_UP,
        W_GATE,
        W_DOWN,
    ],
    outputs: &[
        TensorSpec::new("y", "[T, d]", Dtypes::Like("x"), false, "the original layer's output"),
        TensorSpec::new("y_permuted", "[T, d]", Dtypes::Like("x"), false, "the permuted layer's output"),
        TensorSpec::new("max_abs_diff", "[]", Dtypes::Fixed(DType::F32), false, "max |y - y_permuted|"),
        TensorSpec::new("bound", "[]", Dtypes::Fixed(DType::F32), false, "what rounding allows: 8 eps sqrt(K) max |y|"),
    ],
    params: &[HEAD_DIM, ParamSpec::new("causal", "false", "false | true", "attention: causal mask")],
    run: run_verify,
    problem: "T x d x F",
    example_inputs: |dims, _| match *dims {
        [t, d, f] => Ok(vec![("x", vec![t, d]), ("perm", vec![f]), ("w_up", vec![f, d]), ("w_gate", vec![f, d]), ("w_down", vec![d, f])]),
        _ => Err(shape_err("--shape", "T x d x F".into(), dims)),
    },
    cost: |dims, elem| match *dims {
        [t, d, f] => ((12 * t * d * f) as f64, ((6 * d * f + 4 * t * d) * elem) as f64),
        _ => (0.0, 0.0),
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_verify"),
    in_place: None,
};

fn run_partial_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let (dy, x, w) = (a.tensor("dy")?, a.tensor("x")?, a.optional_tensor("w"));
    if dy.rank() != 2 {
        return Err(shape_err("dy", "[T, out]".into(), dy.shape()));
    }
    let out = dy.shape()[1];
    let inp = match (w, a.param("block")?.as_str()) {
        (Some(w), _) if w.rank() == 2 => w.shape()[1],
        (_, "rows") if x.rank() == 2 => x.shape()[1],
        _ => usize::MAX,
    };
    let block = match (a.param("end")?.as_str(), inp) {
        ("all", usize::MAX) => {
            return Err(Error::Param {
                param: "end".into(),
                expected: "the block's end (a column block without w: in is unknown)".into(),
                found: "all".into(),
            })
        }
        _ => block_of(a, out, inp)?,
    };
    let (d_delta, dx) = s2ft_partial_backward(dy, x, w, block)?;
    let mut outs: Outputs = vec![("d_delta", d_delta)];
    if let Some(dx) = dx {
        outs.push(("dx", dx));
    }
    Ok(outs)
}

/// `s2ft_partial_backward`: a trainable block's gradient (and dX on request).
pub static S2FT_PARTIAL_BACKWARD: OpSpec = OpSpec {
    name: "s2ft_partial_backward",
    summary: "S2FT partial backprop of y = x W^T: row block dDelta = dy[:, start:end]^T x, column block dDelta = dy^T x_slice (only X[:, start:end] saved), dx = dy W when w is given",
    inputs: &[
        TensorSpec::new("dy", "[T, out]", Dtypes::Float, false, "gradient of y"),
        TensorSpec::new("x", "[T, in] (rows), [T, end - start] (columns: the saved slice)", Dtypes::Like("dy"), false, "the layer's input, or its saved slice"),
        TensorSpec::new("w", "[out, in]", Dtypes::Like("dy"), true, "the weight: dx is computed when given"),
    ],
    outputs: &[
        TensorSpec::new("d_delta", "[end - start, in] (rows), [out, end - start] (columns)", Dtypes::Like("dy"), false, "the block's gradient"),
        TensorSpec::new("dx", "[T, in]", Dtypes::Like("dy"), true, "dy W (when w is given)"),
    ],
    params: &[BLOCK, START, END],
    run: run_partial_backward,
    problem: "T x out x in",
    example_inputs: |dims, _| match *dims {
        [t, o, i] => Ok(vec![("dy", vec![t, o]), ("x", vec![t, i]), ("w", vec![o, i])]),
        _ => Err(shape_err("--shape", "T x out x in".into(), dims)),
    },
    cost: |dims, elem| match *dims {
        [t, o, i] => ((4 * t * o * i) as f64, ((t * o + t * i + 2 * o * i + t * i) * elem) as f64),
        _ => (0.0, 0.0),
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_partial_backward"),
    in_place: None,
};

fn run_adamw(client: &Client, a: &OpArgs) -> Result<Outputs> {
    crate::optim::run_step(crate::optim::Rule::AdamW, client, a, |out, inp| {
        block_of(a, out, inp)
    })
}

/// `s2ft_adamw_step`: AdamW on one block of `w` (out of place through `kiln run`).
pub static S2FT_ADAMW_STEP: OpSpec = OpSpec {
    name: "s2ft_adamw_step",
    summary: "S2FT in-place AdamW on W[start:end, :] or W[:, start:end] only (PyTorch's AdamW: decoupled decay, bias correction; f32 state for the block, f32 master copy of a half block)",
    inputs: &[
        TensorSpec::new("param", "[out, in] (or [n]: one row)", Dtypes::Float, false, "the full weight"),
        TensorSpec::new("grad", "[end - start, in] (rows), [out, end - start] (columns)", Dtypes::Like("param"), false, "the block's gradient"),
        TensorSpec::new("m", "the block's shape", Dtypes::Fixed(DType::F32), true, "first moment (default 0)"),
        TensorSpec::new("v", "the block's shape", Dtypes::Fixed(DType::F32), true, "second moment (default 0)").example(ExampleValues::Positive),
        TensorSpec::new("master", "the block's shape", Dtypes::Fixed(DType::F32), true, "f32 master copy of a half-precision block (default: read from w)"),
    ],
    outputs: &[
        TensorSpec::new("param", "[out, in]", Dtypes::Like("param"), false, "the weight with its block updated"),
        TensorSpec::new("m", "the block's shape", Dtypes::Fixed(DType::F32), false, "first moment"),
        TensorSpec::new("v", "the block's shape", Dtypes::Fixed(DType::F32), false, "second moment"),
        TensorSpec::new("master", "the block's shape", Dtypes::Fixed(DType::F32), true, "updated master copy (half-precision w)"),
    ],
    params: &[
        BLOCK,
        START,
        END,
        ParamSpec::new("lr", "0.001", "a finite number >= 0", "learning rate"),
        ParamSpec::new("beta1", "0.9", "0 <= beta1 < 1", "first-moment decay"),
        ParamSpec::new("beta2", "0.999", "0 <= beta2 < 1", "second-moment decay"),
        ParamSpec::new("eps", "1e-8", "a finite number > 0", "denominator floor"),
        ParamSpec::new("weight_decay", "0.01", "a finite number >= 0", "decoupled decay: w *= 1 - lr weight_decay"),
        ParamSpec::new("step", "1", ">= 1", "the step being taken (bias correction 1 - beta^step)"),
    ],
    run: run_adamw,
    problem: "out x in",
    example_inputs: |dims, _| match *dims {
        [o, i] => Ok(vec![("param", vec![o, i]), ("grad", vec![o, i]), ("m", vec![o, i]), ("v", vec![o, i])]),
        _ => Err(shape_err("--shape", "out x in".into(), dims)),
    },
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        ((12 * n) as f64, (n * (3 * elem + 16)) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_adamw_step"),
    in_place: None,
};

fn rows_param(a: &OpArgs) -> Result<bool> {
    Ok(a.param_choice("block", &["rows", "columns"])? == "rows")
}

fn run_adapter(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let y = s2ft_adapter_forward(
        a.tensor("x")?,
        a.tensor("w0")?,
        a.tensor("deltas")?,
        a.tensor("adapter_ids")?,
        rows_param(a)?,
        a.param_as("start")?,
    )?;
    Ok(vec![("y", y)])
}

const W0: TensorSpec = TensorSpec::new("w0", "[out, in]", Dtypes::Float, false, "the base weight");
const DELTAS: TensorSpec = TensorSpec::new(
    "deltas",
    "[A, r, in] (rows), [A, out, e - s] (columns)",
    Dtypes::Like("w0"),
    false,
    "each fine-tune's block delta, stacked",
);
const ADAPTER_START: ParamSpec = ParamSpec::new(
    "start",
    "0",
    "the block's first row or column",
    "where the deltas' block starts in w0",
);

/// `s2ft_adapter_forward`: many fine-tunes in one batch over one base weight.
pub static S2FT_ADAPTER_FORWARD: OpSpec = OpSpec {
    name: "s2ft_adapter_forward",
    summary: "S2FT serving: y = x w0^T plus each token's fine-tune block delta (adapter_ids, -1 = base), without merged weights",
    inputs: &[
        TensorSpec::new("x", "[T, in]", Dtypes::Like("w0"), false, "tokens"),
        W0,
        DELTAS,
        TensorSpec::new("adapter_ids", "[T]", Dtypes::Fixed(DType::I32), false, "each token's fine-tune (-1: the base model)").example(ExampleValues::Zero),
    ],
    outputs: &[TensorSpec::new("y", "[T, out]", Dtypes::Like("w0"), false, "output")],
    params: &[BLOCK, ADAPTER_START],
    run: run_adapter,
    problem: "T x out x in x A",
    example_inputs: |dims, _| match *dims {
        [t, o, i, a] => Ok(vec![("x", vec![t, i]), ("w0", vec![o, i]), ("deltas", vec![a, o, i]), ("adapter_ids", vec![t])]),
        _ => Err(shape_err("--shape", "T x out x in x A".into(), dims)),
    },
    cost: |dims, elem| match *dims {
        [t, o, i, _] => ((4 * t * o * i) as f64, ((t * i + o * i + t * o) * elem) as f64),
        _ => (0.0, 0.0),
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_adapter_forward"),
    in_place: None,
};

fn run_merge(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let w0 = a.tensor("w0")?;
    crate::launch::check_input("w0", w0, w0.client())?;
    if w0.rank() != 2 {
        return Err(shape_err("w0", "[out, in]".into(), w0.shape()));
    }
    // Out of place through `kiln run`: merged into a copy.
    let w = crate::rows::slice_rows(w0, 0, 0, w0.shape()[0], w0.dtype())?;
    s2ft_merge(
        &w,
        a.tensor("deltas")?,
        a.param_as("adapter")?,
        rows_param(a)?,
        a.param_as("start")?,
        a.param_as("unmerge")?,
    )?;
    Ok(vec![("w0", w)])
}

/// `s2ft_merge`: one fine-tune merged into (or taken out of) the base weight.
pub static S2FT_MERGE: OpSpec = OpSpec {
    name: "s2ft_merge",
    summary:
        "S2FT merge: w0's block += deltas[adapter] (unmerge: -=), in place through the Rust API",
    inputs: &[W0, DELTAS],
    outputs: &[TensorSpec::new(
        "w0",
        "[out, in]",
        Dtypes::Like("w0"),
        false,
        "the merged weight",
    )],
    params: &[
        BLOCK,
        ADAPTER_START,
        ParamSpec::new("adapter", "0", "0 ..= A - 1", "the fine-tune to merge"),
        ParamSpec::new(
            "unmerge",
            "false",
            "false | true",
            "subtract instead of add",
        ),
    ],
    run: run_merge,
    problem: "out x in x A",
    example_inputs: |dims, _| match *dims {
        [o, i, a] => Ok(vec![("w0", vec![o, i]), ("deltas", vec![a, o, i])]),
        _ => Err(shape_err("--shape", "out x in x A".into(), dims)),
    },
    cost: |dims, elem| match *dims {
        [o, i, _] => ((o * i) as f64, (3 * o * i * elem) as f64),
        _ => (0.0, 0.0),
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "s2ft_merge"),
    in_place: None,
};

kiln_runtime::register_op!(
    S2FT_SELECT,
    S2FT_PERMUTE,
    S2FT_VERIFY,
    S2FT_PARTIAL_BACKWARD,
    S2FT_ADAMW_STEP,
    S2FT_ADAPTER_FORWARD,
    S2FT_MERGE
);

/// The layer matrices an S²FT operator takes, with the axis their units lie along.
const MATRICES: [(&str, Axis); 7] = [
    ("w_q", Axis::Rows),
    ("w_k", Axis::Rows),
    ("w_v", Axis::Rows),
    ("w_o", Axis::Columns),
    ("w_up", Axis::Rows),
    ("w_gate", Axis::Rows),
    ("w_down", Axis::Columns),
];

/// Checks that the matrices of one layer agree on the model dimension `d`: the columns
/// of those with units along rows (`[_, d]`), the rows of the others (`[d, _]`), and
/// `x` `[T, d]` where given. The error names the first that differs from the first.
fn model_dim(ws: &[(&str, &Tensor, Axis)], x: Option<&Tensor>) -> Result<()> {
    let mut first: Option<(&str, usize)> = None;
    for &(name, w, axis) in ws {
        let &[rows, cols] = w.shape() else {
            return Err(shape_err(name, "a matrix [rows, cols]".into(), w.shape()));
        };
        let (d, layout) = match axis {
            Axis::Rows => (cols, "[_, d]"),
            Axis::Columns => (rows, "[d, _]"),
        };
        match first {
            None => first = Some((name, d)),
            Some((by, want)) if want != d => {
                return Err(shape_err(
                    name,
                    format!("{layout} with the model dimension d = {want} ({by}'s)"),
                    w.shape(),
                ))
            }
            Some(_) => {}
        }
    }
    match (x, first) {
        (Some(x), Some((by, d))) if x.shape().get(1) != Some(&d) || x.rank() != 2 => Err(
            shape_err("x", format!("[T, d] with d = {d} ({by}'s)"), x.shape()),
        ),
        _ => Ok(()),
    }
}

/// The heads of the attention projections given to an S²FT operator: `Hkv` = `perm`'s
/// units, `head_dim` from its parameter (default: rows of `k` / U), `H` from `q`'s rows
/// (`w_q`) or columns (`w_o`), else `Hkv`. Errors name `head_dim` or the projection.
fn head_layout(
    a: &OpArgs,
    p: &S2ftPermutation,
    k: (&str, &Tensor),
    q: Option<(&str, &Tensor, Axis)>,
) -> Result<HeadLayout> {
    let units = p.units();
    let k_rows = matrix_rows(k.0, k.1)?;
    let (head_dim, how) = match a.param("head_dim")?.as_str() {
        "rows of w_k / U" => (
            k_rows / units.max(1),
            format!(" ({}'s {k_rows} rows / U = {units})", k.0),
        ),
        _ => (a.param_as("head_dim")?, String::new()),
    };
    if head_dim == 0 {
        return Err(Error::Param {
            param: "head_dim".into(),
            expected: format!(">= 1 rows per head (perm has U = {units} KV groups)"),
            found: format!("0{how}"),
        });
    }
    let heads = match q {
        None => units,
        Some((name, w, axis)) => {
            let &[rows, cols] = w.shape() else {
                return Err(shape_err(name, "a matrix [rows, cols]".into(), w.shape()));
            };
            let n = if axis == Axis::Rows { rows } else { cols };
            if n % head_dim != 0 || (units > 0 && (n / head_dim) % units != 0) {
                let want = if axis == Axis::Rows {
                    "[H hd, d]"
                } else {
                    "[d, H hd]"
                };
                return Err(shape_err(
                    name,
                    format!(
                        "{want} with hd = {head_dim} and H a multiple of perm's U = {units} KV groups"
                    ),
                    w.shape(),
                ));
            }
            n / head_dim
        }
    };
    let layout = HeadLayout {
        heads,
        kv_heads: units,
        head_dim,
    };
    layout.check()?;
    Ok(layout)
}

/// The rows of `t`, which must be a matrix (an error names it otherwise).
fn matrix_rows(name: &str, t: &Tensor) -> Result<usize> {
    match t.shape() {
        &[rows, _] => Ok(rows),
        shape => Err(shape_err(name, "a matrix [rows, cols]".into(), shape)),
    }
}
