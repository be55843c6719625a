//! `kiln run` entries of the gradient compressors: `topk_ef`, `randk` and `econtrol`.

use super::*;

/// `kiln run topk_ef|randk`: `grad` (any shape), optional `error`; outputs `indices`,
/// `values` and `error` (grad's shape).
fn run_compress(a: &OpArgs, random: bool) -> Result<Outputs> {
    let grad = a.tensor("grad")?;
    let k: usize = a.param_as("k")?;
    let error = a.optional_tensor("error");
    let method = match random {
        true => "random".to_string(),
        false => a.param_choice("method", &["exact", "radix", "threshold"])?,
    };
    // Checked whatever the method (a bad value is an error even where it is unused).
    let seed: u64 = a.param_as("seed")?;
    let out = match method.as_str() {
        "random" => crate::optim::compress::randk(grad, error, k, seed)?,
        "threshold" => {
            let sample = a.param_as("sample")?;
            crate::optim::compress::topk_ef_estimated(grad, error, k, sample, seed)?
        }
        "radix" => {
            a.param_as::<usize>("sample")?;
            crate::optim::compress::topk_ef_every_key(grad, error, k)?
        }
        _ => {
            a.param_as::<usize>("sample")?;
            crate::optim::compress::topk_ef(grad, error, k)?
        }
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

fn compress_example(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    Ok(vec![("grad", dims.to_vec()), ("error", dims.to_vec())])
}

/// Bytes exact top-k moves per element at least: grad and error read, `a` written (it
/// becomes the error), `a` read by the second and third radix passes (the key is its
/// masked bits; the first digit is counted as `a` is formed, the last five and the
/// compaction read the candidates: a few per cent).
fn compress_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let n: usize = dims.iter().product();
    (n as f64 * 12.0, (n * (elem + 4 * 4)) as f64)
}

/// Bytes rand-k moves per element: grad and error read, the error written (its keys
/// come from the index: nothing else is stored or read).
fn randk_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let n: usize = dims.iter().product();
    (n as f64 * 12.0, (n * (elem + 4 * 2)) as f64)
}

/// `topk_ef`: top-k with error feedback (exact device radix select).
pub static TOPK_EF: OpSpec = OpSpec {
    name: "topk_ef",
    summary: "top-k gradient compression with error feedback: a = error + grad; the k largest |a| (exact, by a deterministic device radix select; ties to the lower index, NaN above inf) as (indices, values); error = a - c",
    inputs: COMPRESS_INPUTS,
    outputs: COMPRESS_OUTPUTS,
    params: &[
        K,
        ParamSpec::new("method", "exact", "exact | radix | threshold", "exact: the k largest (past 2^19 elements and k <= n/2 through a seeded sample's bracket); radix: the same k through the radix select over every key (to compare); threshold: every |a| at or above the k-th largest of a seeded sample (about k values)"),
        ParamSpec::new("sample", "65536", ">= 1 (clamped to the elements)", "threshold: sampled positions"),
        ParamSpec::new("seed", "0", "a u64", "threshold: the sample's seed"),
    ],
    run: |_, a| run_compress(a, false),
    problem: "shape of grad",
    example_inputs: compress_example,
    cost: compress_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "topk_ef"),
    in_place: None,
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
    cost: randk_cost,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "randk"),
    in_place: None,
};

/// `kiln run econtrol`: one worker's EControl step out of place.
fn run_econtrol(a: &OpArgs) -> Result<Outputs> {
    let grad = a.tensor("grad")?;
    // Read as f64, so a value past f32 is reported as given, not as `inf`.
    let eta: f64 = a.param_as("eta")?;
    if !(eta as f32).is_finite() {
        return Err(Error::Param {
            param: "eta".into(),
            expected: "a finite value >= 0 (finite in f32)".into(),
            found: kiln_runtime::number_str(eta),
        });
    }
    let step = super::econtrol(
        grad,
        a.optional_tensor("error"),
        a.optional_tensor("h"),
        a.param_as("k")?,
        eta as f32,
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
    example_inputs: |d, _| Ok(vec![("grad", d.to_vec()), ("error", d.to_vec()), ("h", d.to_vec())]),
    cost: |d, e| {
        let (flops, bytes) = compress_cost(d, e);
        let n: usize = d.iter().product();
        // h read twice, p and the rest read and the new error and h written.
        (flops + 4.0 * n as f64, bytes + (n * 4 * 6) as f64)
    },
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "econtrol"),
    in_place: None,
};
