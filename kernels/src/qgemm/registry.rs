//! `kiln run` entries of the quantized GEMMs (their kernels register themselves).

use super::{
    flexround, flexround_backward, quantize_per_token, w4a16_on, w4a16_repack, w8_bits_on, w8a8_on,
    FlexRoundInputs, Path, W4Format, W4Weights,
};
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, OpArgs, OpSpec, Outputs, ParamSpec, Result,
    TensorSpec,
};

const X: TensorSpec = TensorSpec::new("x", "[M, K]", Dtypes::Float, false, "activations");
const QWEIGHT: TensorSpec = TensorSpec::new(
    "qweight",
    "gptq, kiln: [K/8, N]; awq: [K, N/8]",
    Dtypes::Fixed(DType::I32),
    false,
    "packed 4-bit codes",
);
const SCALES: TensorSpec = TensorSpec::new(
    "scales",
    "[K/G, N]",
    Dtypes::Float,
    false,
    "group scales (f32 in kiln's layout)",
)
.example(ExampleValues::Positive);
const QZEROS: TensorSpec = TensorSpec::new(
    "qzeros",
    "gptq, awq: [K/G, N/8] i32; kiln: [K/G, N] f32",
    Dtypes::OneOf(&[DType::I32, DType::F32]),
    true,
    "zero points (absent: symmetric, z = 8)",
);
const G_IDX: TensorSpec = TensorSpec::new(
    "g_idx",
    "[K]",
    Dtypes::Fixed(DType::I32),
    true,
    "act-order group of each row (absent: k / G)",
);
const FORMAT: ParamSpec =
    ParamSpec::new("format", "gptq", "gptq | awq | kiln", "checkpoint layout");
const GROUP: ParamSpec = ParamSpec::new(
    "group_size",
    "128",
    "32 | 64 | 128 | -1",
    "rows per group (-1: per channel)",
);
const VERSION: ParamSpec = ParamSpec::new(
    "gptq_version",
    "1",
    "1 | 2",
    "GPTQ zero storage: 1 stores z - 1, 2 stores z",
);

/// The dequantizing GEMMs' kernel (W4A16, `w8_bits`; W8A8 has its own, on int8 tensor
/// cores).
const DEQUANT_PATH: ParamSpec = ParamSpec::new(
    "path",
    "auto",
    Path::NAMES,
    "the kernel: auto (autotuned), gemv (M <= 64), tiled, direct (K a multiple of 4), tensor_cores (wmma: f16/bf16 x on CUDA)",
);

fn w4_weights<'a>(a: &'a OpArgs) -> Result<W4Weights<'a>> {
    Ok(W4Weights {
        format: W4Format::parse(&a.param("format")?, a.param_as("gptq_version")?)?,
        qweight: a.tensor("qweight")?,
        scales: a.tensor("scales")?,
        qzeros: a.optional_tensor("qzeros"),
        g_idx: a.optional_tensor("g_idx"),
        group_size: a.param_as("group_size")?,
    })
}

/// `--shape M x N x K`: x and a weight in the `format` and `group_size` given (default
/// GPTQ v1, G = 128), K rounded up to a multiple of the group size (of 8 per channel);
/// zero points where N packs into words (gptq, awq), none in kiln's layout (symmetric).
fn w4_inputs(
    dims: &[usize],
    params: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    let (m, n, k) = mnk(dims)?;
    let format = params.get("format").map_or("gptq", String::as_str);
    let group = match params.get("group_size").map(String::as_str) {
        Some("-1") => None,
        Some(g) => Some(
            g.parse::<usize>()
                .ok()
                .filter(|g| [32, 64, 128].contains(g))
                .ok_or_else(|| Error::Param {
                    param: "group_size".into(),
                    expected: "32 | 64 | 128 | -1".into(),
                    found: g.into(),
                })?,
        ),
        None => Some(128),
    };
    let k = k.div_ceil(group.unwrap_or(8)) * group.unwrap_or(8);
    let groups = group.map_or(1, |g| k / g);
    if format == "awq" && n % 8 != 0 {
        return Err(Error::Param {
            param: "--shape".into(),
            expected: "N a multiple of 8 (format=awq packs 8 columns a word)".into(),
            found: format!("N = {n}"),
        });
    }
    let qweight = match format {
        "awq" => vec![k, n / 8],
        _ => vec![k / 8, n],
    };
    let mut v = vec![
        ("x", vec![m, k]),
        ("qweight", qweight),
        ("scales", vec![groups, n]),
    ];
    if format != "kiln" && n % 8 == 0 {
        v.push(("qzeros", vec![groups, n / 8]));
    }
    Ok(v)
}

fn mnk(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        &[m, n, k] => Ok((m, n, k)),
        _ => Err(Error::Param {
            param: "--shape".into(),
            expected: "M x N x K".into(),
            found: format!("{dims:?}"),
        }),
    }
}

/// A GEMM's 2 M N K flops; bytes: x, y at `elem` bytes, the weight at `weight_bits`.
fn gemm_cost(dims: &[usize], elem: usize, weight_bits: f64) -> (f64, f64) {
    let Ok((m, n, k)) = mnk(dims) else {
        return (0.0, 0.0);
    };
    let (m, n, k) = (m as f64, n as f64, k as f64);
    (
        2.0 * m * n * k,
        (m * k + m * n) * elem as f64 + k * n * weight_bits / 8.0,
    )
}

fn run_w4a16(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let path = Path::parse(&a.param("path")?)?;
    Ok(vec![(
        "y",
        w4a16_on(a.tensor("x")?, &w4_weights(a)?, path)?,
    )])
}

/// `w4a16`: int4 weight-only GEMM.
pub static W4A16: OpSpec = OpSpec {
    name: "w4a16",
    summary:
        "y = x @ dequant(W) for GPTQ (v1/v2), AWQ or kiln-packed int4 weights, f32 accumulation",
    inputs: &[X, QWEIGHT, SCALES, QZEROS, G_IDX],
    outputs: &[TensorSpec::new(
        "y",
        "[M, N]",
        Dtypes::Like("x"),
        false,
        "the product",
    )],
    params: &[FORMAT, GROUP, VERSION, DEQUANT_PATH],
    run: run_w4a16,
    problem: "M x N x K (a weight in `format` with `group_size`; default GPTQ v1, G = 128)",
    example_inputs: w4_inputs,
    cost: |dims, elem| gemm_cost(dims, elem, 4.0),
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "w4a16"),
    in_place: None,
};

fn run_w4a16_repack(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let p = w4a16_repack(&w4_weights(a)?)?;
    let mut out = vec![
        ("qweight", p.qweight),
        ("scales", p.scales),
        ("qzeros", p.qzeros),
    ];
    if let Some(g) = p.g_idx {
        out.push(("g_idx", g));
    }
    Ok(out)
}

/// `w4a16_repack`: checkpoint -> kiln layout, once per model.
pub static W4A16_REPACK: OpSpec = OpSpec {
    name: "w4a16_repack",
    summary: "convert a GPTQ/AWQ int4 weight to kiln's layout (run w4a16 on it with format=kiln)",
    inputs: &[QWEIGHT, SCALES, QZEROS, G_IDX],
    outputs: &[
        TensorSpec::new(
            "qweight",
            "[K/8, N]",
            Dtypes::Fixed(DType::I32),
            false,
            "codes packed along K",
        ),
        TensorSpec::new(
            "scales",
            "[K/G, N]",
            Dtypes::Fixed(DType::F32),
            false,
            "group scales",
        )
        .example(ExampleValues::Positive),
        TensorSpec::new(
            "qzeros",
            "[K/G, N]",
            Dtypes::Fixed(DType::F32),
            false,
            "true zero points",
        ),
        TensorSpec::new(
            "g_idx",
            "[K]",
            Dtypes::Fixed(DType::I32),
            true,
            "act-order groups, when given",
        ),
    ],
    params: &[FORMAT, GROUP, VERSION],
    run: run_w4a16_repack,
    problem: "N x K (a weight in `format` with `group_size`; default GPTQ v1, G = 128)",
    example_inputs: |dims, p| {
        let &[n, k] = dims else {
            return Err(Error::Param {
                param: "--shape".into(),
                expected: "N x K".into(),
                found: format!("{dims:?}"),
            });
        };
        Ok(w4_inputs(&[1, n, k], p)?.into_iter().skip(1).collect())
    },
    cost: |dims, _| match dims {
        &[n, k] => (0.0, (n * k) as f64),
        _ => (0.0, 0.0),
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "w4a16_repack"),
    in_place: None,
};

fn run_w8a8(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let out = DType::parse(&a.param_choice("out_dtype", &["f32", "f16", "bf16"])?)?;
    let y = w8a8_on(
        a.tensor("xq")?,
        a.tensor("sx")?,
        a.tensor("wq")?,
        a.tensor("sw")?,
        a.optional_tensor("bias"),
        out,
        Path::parse(&a.param("path")?)?,
    )?;
    Ok(vec![("y", y)])
}

/// `w8a8`: int8 x int8 GEMM with per-token and per-channel scales.
pub static W8A8: OpSpec = OpSpec {
    name: "w8a8",
    summary: "y = sx sw (xq @ wq^T) + bias with int8 operands and an exact i32 accumulator",
    inputs: &[
        TensorSpec::new(
            "xq",
            "[M, K]",
            Dtypes::Fixed(DType::I8),
            false,
            "quantized activations",
        ),
        TensorSpec::new(
            "sx",
            "[M]",
            Dtypes::Fixed(DType::F32),
            false,
            "per-token scales",
        )
        .example(ExampleValues::Positive),
        TensorSpec::new(
            "wq",
            "[N, K]",
            Dtypes::Fixed(DType::I8),
            false,
            "quantized weight (out x in)",
        ),
        TensorSpec::new(
            "sw",
            "[N]",
            Dtypes::Fixed(DType::F32),
            false,
            "per-channel scales",
        )
        .example(ExampleValues::Positive),
        TensorSpec::new("bias", "[N]", Dtypes::Fixed(DType::F32), true, "bias"),
    ],
    outputs: &[TensorSpec::new(
        "y",
        "[M, N]",
        Dtypes::Param("out_dtype"),
        false,
        "the product",
    )],
    params: &[
        ParamSpec::new("out_dtype", "f32", "f32 | f16 | bf16", "dtype of y"),
        ParamSpec::new(
            "path",
            "auto",
            Path::NAMES,
            "the kernel: auto (autotuned), gemv (M <= 64), tiled, direct (K a multiple of 4), tensor_cores (int8 wmma: CUDA 7.2+, K a multiple of 16)",
        ),
    ],
    run: run_w8a8,
    problem: "M x N x K",
    example_inputs: |dims, _| {
        let (m, n, k) = mnk(dims)?;
        Ok(vec![
            ("xq", vec![m, k]),
            ("sx", vec![m]),
            ("wq", vec![n, k]),
            ("sw", vec![n]),
        ])
    },
    cost: |dims, _| {
        let Ok((m, n, k)) = mnk(dims) else {
            return (0.0, 0.0);
        };
        (2.0 * (m * n * k) as f64, (m * k + n * k + 4 * m * n) as f64)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "w8a8"),
    in_place: None,
};

fn run_quantize(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let (xq, sx) = quantize_per_token(a.tensor("x")?)?;
    Ok(vec![("xq", xq), ("sx", sx)])
}

/// `quantize_per_token`: float activations -> (xq, sx) for `w8a8`.
pub static QUANTIZE_PER_TOKEN: OpSpec = OpSpec {
    name: "quantize_per_token",
    summary:
        "dynamic per-token int8 quantization: sx = max|x| / 127, xq = round(x / sx) (ties to even)",
    inputs: &[X],
    outputs: &[
        TensorSpec::new(
            "xq",
            "[M, K]",
            Dtypes::Fixed(DType::I8),
            false,
            "codes in -127..=127",
        ),
        TensorSpec::new(
            "sx",
            "[M]",
            Dtypes::Fixed(DType::F32),
            false,
            "per-token scales",
        )
        .example(ExampleValues::Positive),
    ],
    params: &[],
    run: run_quantize,
    problem: "M x K",
    example_inputs: crate::launch::x_only,
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (2.0 * n as f64, (n * (elem + 1)) as f64)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "quantize_per_token"),
    in_place: None,
};

fn run_w8_bits(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let bits = a.param_as("bits")?;
    let path = Path::parse(&a.param("path")?)?;
    let (x, q8, s8) = (a.tensor("x")?, a.tensor("q8")?, a.tensor("s8")?);
    Ok(vec![("y", w8_bits_on(x, q8, s8, bits, path)?)])
}

/// `w8_bits`: one int8 weight served at 8, 6, 4 or 2 bits.
pub static W8_BITS: OpSpec = OpSpec {
    name: "w8_bits",
    summary:
        "y = x @ W_b, the b-bit Double Rounding view of an int8 weight (shift-rounded in the GEMM)",
    inputs: &[
        X,
        TensorSpec::new(
            "q8",
            "[K, N]",
            Dtypes::Fixed(DType::I8),
            false,
            "int8 codes",
        ),
        TensorSpec::new(
            "s8",
            "[N]",
            Dtypes::Fixed(DType::F32),
            false,
            "per-channel scales of the int8 codes",
        )
        .example(ExampleValues::Positive),
    ],
    outputs: &[TensorSpec::new(
        "y",
        "[M, N]",
        Dtypes::Like("x"),
        false,
        "the product",
    )],
    params: &[
        ParamSpec::new(
            "bits",
            "8",
            "8 | 6 | 4 | 2",
            "precision: q_b = clamp(round(q8 / 2^(8-b))) ties to even, s_b = s8 2^(8-b)",
        ),
        DEQUANT_PATH,
    ],
    run: run_w8_bits,
    problem: "M x N x K",
    example_inputs: |dims, _| {
        let (m, n, k) = mnk(dims)?;
        Ok(vec![("x", vec![m, k]), ("q8", vec![k, n]), ("s8", vec![n])])
    },
    cost: |dims, elem| gemm_cost(dims, elem, 8.0),
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "w8_bits"),
    in_place: None,
};

const W: TensorSpec = TensorSpec::new("w", "[rows, cols]", Dtypes::Float, false, "the weight");
const FLEX_INPUTS: [TensorSpec; 5] = [
    W,
    TensorSpec::new("s1", "[1]", Dtypes::Like("w"), false, "per-tensor scale")
        .example(ExampleValues::Positive),
    TensorSpec::new(
        "s2",
        "[rows, cols]",
        Dtypes::Like("w"),
        false,
        "per-element divisor",
    )
    .example(ExampleValues::Positive),
    TensorSpec::new(
        "s3",
        "[rows]",
        Dtypes::Like("w"),
        false,
        "per-output-channel divisor",
    )
    .example(ExampleValues::Positive),
    TensorSpec::new(
        "s4",
        "[cols]",
        Dtypes::Like("w"),
        false,
        "per-input-channel divisor",
    )
    .example(ExampleValues::Positive),
];
const QMIN: ParamSpec = ParamSpec::new("qmin", "-8", "a number <= qmax", "smallest code");
const QMAX: ParamSpec = ParamSpec::new("qmax", "7", "a number >= qmin", "largest code");

fn flex_inputs(a: &OpArgs) -> Result<FlexRoundInputs<'_>> {
    Ok(FlexRoundInputs {
        w: a.tensor("w")?,
        s1: a.tensor("s1")?,
        s2: a.tensor("s2")?,
        s3: a.tensor("s3")?,
        s4: a.tensor("s4")?,
        qmin: a.param_as("qmin")?,
        qmax: a.param_as("qmax")?,
    })
}

fn flex_shapes(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    let &[r, c] = dims else {
        return Err(Error::Param {
            param: "--shape".into(),
            expected: "rows x cols".into(),
            found: format!("{dims:?}"),
        });
    };
    Ok(vec![
        ("w", vec![r, c]),
        ("s1", vec![1]),
        ("s2", vec![r, c]),
        ("s3", vec![r]),
        ("s4", vec![c]),
    ])
}

/// `flexround`: fake quantization forward.
pub static FLEXROUND: OpSpec = OpSpec {
    name: "flexround",
    summary: "FlexRound fake quantization: wq = s1 clamp(round(w / (s1 S2 s3 s4)), qmin, qmax)",
    inputs: &FLEX_INPUTS,
    outputs: &[TensorSpec::new(
        "wq",
        "[rows, cols]",
        Dtypes::Like("w"),
        false,
        "fake-quantized weight",
    )],
    params: &[QMIN, QMAX],
    run: |_, a| Ok(vec![("wq", flexround(&flex_inputs(a)?)?)]),
    problem: "rows x cols",
    example_inputs: flex_shapes,
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (5.0 * n as f64, (3 * n * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "flexround"),
    in_place: None,
};

fn run_flex_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let g = flexround_backward(&flex_inputs(a)?, a.tensor("grad")?)?;
    Ok(vec![
        ("dw", g.dw),
        ("ds1", g.ds1),
        ("ds2", g.ds2),
        ("ds3", g.ds3),
        ("ds4", g.ds4),
    ])
}

/// `flexround_backward`: straight-through gradients.
pub static FLEXROUND_BACKWARD: OpSpec = OpSpec {
    name: "flexround_backward",
    summary: "FlexRound's straight-through backward: gradients for w, s1, S2, s3, s4",
    inputs: &[
        FLEX_INPUTS[0],
        FLEX_INPUTS[1],
        FLEX_INPUTS[2],
        FLEX_INPUTS[3],
        FLEX_INPUTS[4],
        TensorSpec::new("grad", "[rows, cols]", Dtypes::Like("w"), false, "dL/dwq"),
    ],
    outputs: &[
        TensorSpec::new("dw", "[rows, cols]", Dtypes::Like("w"), false, "dL/dw"),
        TensorSpec::new("ds1", "s1's shape", Dtypes::Like("w"), false, "dL/ds1"),
        TensorSpec::new("ds2", "[rows, cols]", Dtypes::Like("w"), false, "dL/dS2"),
        TensorSpec::new("ds3", "s3's shape", Dtypes::Like("w"), false, "dL/ds3"),
        TensorSpec::new("ds4", "s4's shape", Dtypes::Like("w"), false, "dL/ds4"),
    ],
    params: &[QMIN, QMAX],
    run: run_flex_backward,
    problem: "rows x cols",
    example_inputs: |dims, p| {
        let mut v = flex_shapes(dims, p)?;
        v.push(("grad", dims.to_vec()));
        Ok(v)
    },
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (20.0 * n as f64, (8 * n * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "flexround_backward"),
    in_place: None,
};

kiln_runtime::register_op!(
    W4A16,
    W4A16_REPACK,
    W8A8,
    QUANTIZE_PER_TOKEN,
    W8_BITS,
    FLEXROUND,
    FLEXROUND_BACKWARD
);
