//! `kiln run` entries of the GLA family (its kernels register themselves).

use super::{
    gla, gla_backward, gla_recurrent, gla_step, GlaGradInputs, GlaInputs, GlaMode, GlaOptions,
};
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, OpArgs, OpSpec, Outputs, ParamSpec, Result,
    TensorSpec,
};

const Q: TensorSpec = TensorSpec::new("q", "[B, T, H, K]", Dtypes::Float, false, "queries");
const K: TensorSpec = TensorSpec::new("k", "[B, T, H, K]", Dtypes::Like("q"), false, "keys");
const V: TensorSpec = TensorSpec::new("v", "[B, T, H, V]", Dtypes::Like("q"), false, "values");
const G: TensorSpec = TensorSpec::new(
    "g",
    "[B, T, H, K]",
    Dtypes::F32OrLike("q"),
    false,
    "log decays (<= 0), e.g. logsigmoid of a gate projection",
)
.example(ExampleValues::LogDecay);
const H0: TensorSpec = TensorSpec::new(
    "h0",
    "[N, H, K, V]",
    Dtypes::Fixed(DType::F32),
    true,
    "initial states (N = B, or the varlen sequence count)",
);
const CU: TensorSpec = TensorSpec::new(
    "cu_seqlens",
    "[N + 1]",
    Dtypes::Fixed(DType::I32),
    true,
    "varlen row offsets (0 first, T last, non-decreasing; B = 1)",
);
const DO: TensorSpec = TensorSpec::new(
    "do",
    "[B, T, H, V]",
    Dtypes::Like("q"),
    false,
    "gradient of the loss with respect to o",
);
const DHT: TensorSpec = TensorSpec::new(
    "dht",
    "[N, H, K, V]",
    Dtypes::Fixed(DType::F32),
    true,
    "gradient of the loss with respect to ht",
);

const O: TensorSpec = TensorSpec::new("o", "[B, T, H, V]", Dtypes::Like("q"), false, "outputs");
const HT: TensorSpec = TensorSpec::new(
    "ht",
    "[N, H, K, V]",
    Dtypes::Fixed(DType::F32),
    true,
    "final states (with output_final_state=true)",
);

const SCALE: ParamSpec = ParamSpec {
    name: "scale",
    default: "K^-1/2",
    values: super::problem::SCALE_RANGE,
    doc: "score scale",
};
const FINAL: ParamSpec = ParamSpec {
    name: "output_final_state",
    default: "false",
    values: "false | true",
    doc: "also return ht",
};
/// The backward's `output_final_state`: whether the forward returned `ht`, so that a
/// `dht` is its gradient (one parameter set then drives `gla` and `gla_backward`, as the
/// conformance vectors' index gives it).
const FINAL_GRAD: ParamSpec = ParamSpec {
    name: "output_final_state",
    default: "true",
    values: "false | true",
    doc: "whether the forward returned ht: dht (optional) is its gradient; false refuses a dht",
};
const CHUNK: ParamSpec = ParamSpec {
    name: "chunk_size",
    default: "auto",
    values: "auto | 16 | 32 | 64",
    doc: "rows per chunk of the chunked kernels (auto: autotuned among 64, 32, 16)",
};

const MODE: ParamSpec = ParamSpec {
    name: "mode",
    default: "auto",
    values: "auto | chunk | fused_chunk",
    doc: "the forward's algorithm: chunk-parallel kernels, or one fused kernel per sequence (K <= 128; auto: autotuned)",
};

fn scale(a: &OpArgs) -> Result<Option<f64>> {
    let text = a.param("scale")?;
    if text == SCALE.default {
        return Ok(None);
    }
    a.param_as::<f64>("scale").map(Some)
}

/// The options an operator declares: `output_final_state` (forwards; the backward's
/// says whether a `dht` may be given) and
/// `chunk_size` (chunked operators) only where its spec lists them.
fn options(a: &OpArgs) -> Result<GlaOptions> {
    let declared = |name: &str| a.spec().params.iter().any(|p| p.name == name);
    Ok(GlaOptions {
        scale: scale(a)?,
        output_final_state: declared("output_final_state") && a.param_as("output_final_state")?,
        chunk_size: match declared("chunk_size") && a.param("chunk_size")? != "auto" {
            true => Some(a.param_as("chunk_size")?),
            false => None,
        },
        mode: match declared("mode") {
            false => GlaMode::Auto,
            true => match a.param("mode")?.as_str() {
                "auto" => GlaMode::Auto,
                "chunk" => GlaMode::Chunk,
                "fused_chunk" => GlaMode::FusedChunk,
                other => {
                    return Err(Error::Param {
                        param: "mode".into(),
                        expected: MODE.values.into(),
                        found: other.into(),
                    })
                }
            },
        },
    })
}

/// The `cu_seqlens` tensor's values (downloaded: the chunk table is built on the host).
fn cu_seqlens(a: &OpArgs) -> Result<Option<Vec<i32>>> {
    let Some(t) = a.optional_tensor("cu_seqlens") else {
        return Ok(None);
    };
    t.expect_dtype("cu_seqlens", &[DType::I32])?;
    if t.rank() != 1 {
        return Err(Error::Shape {
            tensor: "cu_seqlens".into(),
            expected: "[N + 1]".into(),
            found: kiln_runtime::shape_str(t.shape()),
        });
    }
    Ok(Some(
        t.download()?
            .to_f64()
            .into_iter()
            .map(|v| v as i32)
            .collect(),
    ))
}

fn with_inputs<T>(a: &OpArgs, f: impl FnOnce(&GlaInputs<'_>) -> Result<T>) -> Result<T> {
    let cu = cu_seqlens(a)?;
    let inp = GlaInputs {
        q: a.tensor("q")?,
        k: a.tensor("k")?,
        v: a.tensor("v")?,
        g: a.tensor("g")?,
        h0: a.optional_tensor("h0"),
        cu_seqlens: cu.as_deref(),
    };
    f(&inp)
}

fn forward_outputs(out: super::GlaOutput) -> Outputs {
    let mut v = vec![("o", out.o)];
    if let Some(ht) = out.ht {
        v.push(("ht", ht));
    }
    v
}

fn run_gla(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    with_inputs(a, |inp| gla(inp, &opts)).map(forward_outputs)
}

fn run_gla_recurrent(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    with_inputs(a, |inp| gla_recurrent(inp, &opts)).map(forward_outputs)
}

fn run_gla_step(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let state = a.tensor("state")?;
    let o = gla_step(
        a.tensor("q")?,
        a.tensor("k")?,
        a.tensor("v")?,
        a.tensor("g")?,
        state,
        scale(a)?,
    )?;
    Ok(vec![("o", o), ("state", state.clone())])
}

fn run_gla_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    let dht = a.optional_tensor("dht");
    if dht.is_some() && !opts.output_final_state {
        return Err(Error::Param {
            param: "output_final_state".into(),
            expected: "true with a dht (the gradient of the final state the forward returned)"
                .into(),
            found: "false".into(),
        });
    }
    let grad = GlaGradInputs {
        d_o: a.tensor("do")?,
        dht,
    };
    let g = with_inputs(a, |inp| gla_backward(inp, &grad, &opts))?;
    let mut v = vec![("dq", g.dq), ("dk", g.dk), ("dv", g.dv), ("dg", g.dg)];
    if let Some(dh0) = g.dh0 {
        v.push(("dh0", dh0));
    }
    Ok(v)
}

/// `--shape B x T x H x D` (K = V = D): q, k, v, g of the benchmark shapes.
fn gla_inputs(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    let &[b, t, h, d] = dims else {
        return Err(Error::Param {
            param: "--shape".into(),
            expected: "B x T x H x D".into(),
            found: format!("{dims:?}"),
        });
    };
    let s = vec![b, t, h, d];
    Ok(vec![
        ("q", s.clone()),
        ("k", s.clone()),
        ("v", s.clone()),
        ("g", s),
    ])
}

/// Forward FLOPs of the chunked form at chunk 64: the state pass (2 T K V), the
/// inter-chunk output (2 T K V), the scores and their product with v (T C (K + V)).
fn gla_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let (b, t, h, d) = match dims {
        &[b, t, h, d] => (b as f64, t as f64, h as f64, d as f64),
        _ => return (0.0, 0.0),
    };
    let flops = b * h * (4.0 * t * d * d + t * 64.0 * 2.0 * d);
    (flops, b * t * h * d * 5.0 * elem as f64)
}

fn recurrent_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let (b, t, h, d) = match dims {
        &[b, t, h, d] => (b as f64, t as f64, h as f64, d as f64),
        _ => return (0.0, 0.0),
    };
    (b * h * 4.0 * t * d * d, b * t * h * d * 5.0 * elem as f64)
}

/// `gla`: the chunked forward.
pub static GLA: OpSpec = OpSpec {
    name: "gla",
    summary: "gated linear attention, chunkwise forward (f32 states and scores)",
    inputs: &[Q, K, V, G, H0, CU],
    outputs: &[O, HT],
    params: &[SCALE, FINAL, CHUNK, MODE],
    run: run_gla,
    problem: "B x T x H x D (K = V = D)",
    example_inputs: gla_inputs,
    cost: gla_cost,
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "gla"),
    in_place: None,
};

/// `gla_recurrent`: the step-by-step forward.
pub static GLA_RECURRENT: OpSpec = OpSpec {
    name: "gla_recurrent",
    summary: "gated linear attention, recurrent (step-by-step) forward",
    inputs: &[Q, K, V, G, H0, CU],
    outputs: &[O, HT],
    params: &[SCALE, FINAL],
    run: run_gla_recurrent,
    problem: "B x T x H x D (K = V = D)",
    example_inputs: gla_inputs,
    cost: recurrent_cost,
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "gla_recurrent"),
    in_place: None,
};

/// `gla_step`: one decode step, state updated in place.
pub static GLA_STEP: OpSpec = OpSpec {
    name: "gla_step",
    summary: "gated linear attention decode step: one token per sequence, state updated in place",
    inputs: &[
        TensorSpec::new(
            "q",
            "[B, 1, H, K]",
            Dtypes::Float,
            false,
            "queries of one token",
        ),
        TensorSpec::new(
            "k",
            "[B, 1, H, K]",
            Dtypes::Like("q"),
            false,
            "keys of one token",
        ),
        TensorSpec::new(
            "v",
            "[B, 1, H, V]",
            Dtypes::Like("q"),
            false,
            "values of one token",
        ),
        TensorSpec::new(
            "g",
            "[B, 1, H, K]",
            Dtypes::F32OrLike("q"),
            false,
            "log decays (<= 0)",
        )
        .example(ExampleValues::LogDecay),
        TensorSpec::new(
            "state",
            "[B, H, K, V]",
            Dtypes::Fixed(DType::F32),
            false,
            "the recurrent state, updated in place",
        ),
    ],
    outputs: &[
        TensorSpec::new(
            "o",
            "[B, 1, H, V]",
            Dtypes::Like("q"),
            false,
            "outputs of the token",
        ),
        TensorSpec::new(
            "state",
            "[B, H, K, V]",
            Dtypes::Fixed(DType::F32),
            false,
            "the updated state",
        ),
    ],
    params: &[SCALE],
    run: run_gla_step,
    problem: "B x H x D (one token, K = V = D)",
    example_inputs: |dims, _| {
        let &[b, h, d] = dims else {
            return Err(Error::Param {
                param: "--shape".into(),
                expected: "B x H x D".into(),
                found: format!("{dims:?}"),
            });
        };
        Ok(vec![
            ("q", vec![b, 1, h, d]),
            ("k", vec![b, 1, h, d]),
            ("v", vec![b, 1, h, d]),
            ("g", vec![b, 1, h, d]),
            ("state", vec![b, h, d, d]),
        ])
    },
    cost: |dims, elem| match dims {
        &[b, h, d] => (
            (b * h * 4 * d * d) as f64,
            (b * h * d * d * 8 + b * h * d * 4 * elem) as f64,
        ),
        _ => (0.0, 0.0),
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "gla_step"),
    in_place: None,
};

/// `gla_backward`: the chunked backward.
pub static GLA_BACKWARD: OpSpec = OpSpec {
    name: "gla_backward",
    summary: "gated linear attention backward, chunked (gradients in their input's dtype, dh0 f32)",
    inputs: &[Q, K, V, G, H0, DO, DHT, CU],
    outputs: &[
        TensorSpec::new("dq", "[B, T, H, K]", Dtypes::Like("q"), false, "dL/dq"),
        TensorSpec::new("dk", "[B, T, H, K]", Dtypes::Like("q"), false, "dL/dk"),
        TensorSpec::new("dv", "[B, T, H, V]", Dtypes::Like("q"), false, "dL/dv"),
        TensorSpec::new("dg", "[B, T, H, K]", Dtypes::Like("g"), false, "dL/dg"),
        TensorSpec::new(
            "dh0",
            "[N, H, K, V]",
            Dtypes::Fixed(DType::F32),
            true,
            "dL/dh0 (when h0 is given)",
        ),
    ],
    params: &[SCALE, CHUNK, FINAL_GRAD],
    run: run_gla_backward,
    problem: "B x T x H x D (K = V = D)",
    example_inputs: |dims, p| {
        let mut v = gla_inputs(dims, p)?;
        v.push(("do", dims.to_vec()));
        Ok(v)
    },
    cost: |dims, elem| {
        let (f, b) = gla_cost(dims, elem);
        (2.5 * f, 2.0 * b)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "gla_backward"),
    in_place: None,
};

kiln_runtime::register_op!(GLA, GLA_RECURRENT, GLA_STEP, GLA_BACKWARD);
