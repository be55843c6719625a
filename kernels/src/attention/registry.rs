//! `kiln run` entries of the attention family (its kernels register themselves).

use super::problem::SCALE_RANGE;
use super::*;
use crate::launch::shape_err;
use kiln_runtime::{
    Client, DType, Dtypes, Error, ExampleValues, OpArgs, OpSpec, Outputs, ParamSpec, Result,
    TensorSpec,
};

const Q: TensorSpec = TensorSpec::new("q", "[B, Sq, H, D]", Dtypes::Float, false, "queries");
const K: TensorSpec = TensorSpec::new(
    "k",
    "[B, Sk, Hkv, D]",
    Dtypes::Like("q"),
    false,
    "keys (Hkv divides H: grouped-query attention)",
);
const V: TensorSpec = TensorSpec::new("v", "[B, Sk, Hkv, Dv]", Dtypes::Like("q"), false, "values");
const CU_Q: TensorSpec = TensorSpec::new(
    "cu_seqlens_q",
    "[N + 1]",
    Dtypes::Fixed(DType::I32),
    true,
    "varlen query offsets (0 first, Sq last, non-decreasing; B = 1; with cu_seqlens_k)",
);
const CU_K: TensorSpec = TensorSpec::new(
    "cu_seqlens_k",
    "[N + 1]",
    Dtypes::Fixed(DType::I32),
    true,
    "varlen key offsets (0 first, Sk last, non-decreasing; B = 1; with cu_seqlens_q)",
);
const OUT: TensorSpec = TensorSpec::new(
    "out",
    "[B, Sq, H, Dv]",
    Dtypes::Param("out_dtype"),
    false,
    "attention output (0 for a row that sees no key)",
);
const LSE: TensorSpec = TensorSpec::new(
    "lse",
    "[B, H, Sq]",
    Dtypes::Fixed(DType::F32),
    false,
    "natural log-sum-exp of each row's scores (-inf for a row that sees no key)",
);

/// The parameters every attention operator takes.
pub(super) const PARAMS: [ParamSpec; 7] = [
    ParamSpec::new("scale", "D^-1/2", SCALE_RANGE, "score scale"),
    ParamSpec::new(
        "causal",
        "false",
        "false | true",
        "mask keys after the query (k_offset + j <= q_offset + i)",
    ),
    ParamSpec::new(
        "q_offset",
        "0",
        "0 ..= 2^30 - 1",
        "position of the first query row in the whole sequence",
    ),
    ParamSpec::new(
        "k_offset",
        "0",
        "0 ..= 2^30 - 1",
        "position of the first key in the whole sequence",
    ),
    ParamSpec::new(
        "temperature",
        "1",
        "a finite number > 0",
        "softmax temperature T (APE): softmax(s / T), lse scaled by T",
    ),
    ParamSpec::new(
        "lse_scale",
        "1",
        "a finite number > 0",
        "APE scale S: ln S is added to lse",
    ),
    ParamSpec::new(
        "out_dtype",
        "q",
        "q | f32",
        "dtype of out: q's, or f32 for partial blocks",
    ),
];

/// The options of an attention call from its parameters.
pub(super) fn options(a: &OpArgs) -> Result<AttentionOptions> {
    let scale = match a.param("scale")?.as_str() {
        "D^-1/2" => None,
        _ => Some(a.param_as::<f64>("scale")?),
    };
    // The ring operators place their blocks themselves: no offsets; the backward
    // operators' gradients take q's dtype: no `out_dtype`.
    let declared = |name: &str| a.spec().params.iter().any(|p| p.name == name);
    let out_dtype = match declared("out_dtype") {
        true => match a.param_choice("out_dtype", &["q", "f32"])?.as_str() {
            "f32" => Some(DType::F32),
            _ => None,
        },
        false => None,
    };
    let offset = |name: &str| {
        if declared(name) {
            a.param_as(name)
        } else {
            Ok(0)
        }
    };
    Ok(AttentionOptions {
        scale,
        causal: a.param_as("causal")?,
        q_offset: offset("q_offset")?,
        k_offset: offset("k_offset")?,
        temperature: a.param_as("temperature")?,
        lse_scale: a.param_as("lse_scale")?,
        out_dtype,
    })
}

/// An i32 offsets tensor's values (the host builds the tile bounds from them).
pub(super) fn offsets(a: &OpArgs, name: &str) -> Result<Option<Vec<i32>>> {
    let Some(t) = a.optional_tensor(name) else {
        return Ok(None);
    };
    t.expect_dtype(name, &[DType::I32])?;
    if t.rank() != 1 {
        return Err(shape_err(name, "[N + 1]".into(), t.shape()));
    }
    Ok(Some(
        t.download()?
            .to_f64()
            .into_iter()
            .map(|v| v as i32)
            .collect(),
    ))
}

/// The varlen offsets `cu_seqlens_q`, `cu_seqlens_k` of a call (each optional).
type Offsets = (Option<Vec<i32>>, Option<Vec<i32>>);

fn call_offsets(a: &OpArgs) -> Result<Offsets> {
    Ok((offsets(a, "cu_seqlens_q")?, offsets(a, "cu_seqlens_k")?))
}

/// `q`, `k`, `v` and the offsets of a call.
fn call_inputs<'a>(a: &'a OpArgs, (cq, ck): &'a Offsets) -> Result<AttentionInputs<'a>> {
    Ok(AttentionInputs {
        q: a.tensor("q")?,
        k: a.tensor("k")?,
        v: a.tensor("v")?,
        cu_seqlens_q: cq.as_deref(),
        cu_seqlens_k: ck.as_deref(),
    })
}

fn run_attention(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    let offsets = call_offsets(a)?;
    let inputs = call_inputs(a, &offsets)?;
    let r = match ForwardKernel::parse(&a.param("kernel")?)? {
        None => attention(&inputs, &opts)?,
        Some(kernel) => attention_with(&inputs, &opts, kernel)?,
    };
    Ok(vec![("out", r.out), ("lse", r.lse)])
}

/// `attention`'s parameters: the shared ones and the forward kernel.
const ATTENTION_PARAMS: [ParamSpec; 8] = [
    PARAMS[0],
    PARAMS[1],
    PARAMS[2],
    PARAMS[3],
    PARAMS[4],
    PARAMS[5],
    PARAMS[6],
    ParamSpec::new(
        "kernel",
        "auto",
        ForwardKernel::NAMES,
        "the forward kernel: auto (autotuned), staged, rows (D and Dv multiples of 4), tensor_cores (wmma: f16/bf16 on CUDA)",
    ),
];

/// `--shape B x S x H x D` (Hkv = H, Sq = Sk, Dv = D) or `B x S x H x Hkv x D`.
pub(super) fn qkv_shapes(dims: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
    match *dims {
        [b, s, h, d] => Ok((b, s, h, h, d)),
        [b, s, h, hkv, d] => Ok((b, s, h, hkv, d)),
        _ => Err(Error::Param {
            param: "--shape".into(),
            expected: "B x S x H x D or B x S x H x Hkv x D".into(),
            found: format!("{dims:?}"),
        }),
    }
}

pub(super) fn qkv_inputs(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    let (b, s, h, hkv, d) = qkv_shapes(dims)?;
    Ok(vec![
        ("q", vec![b, s, h, d]),
        ("k", vec![b, s, hkv, d]),
        ("v", vec![b, s, hkv, d]),
    ])
}

/// FLOPs of the non-causal forward (`Q K^T` and `P V`: 4 B H S^2 D) and the bytes of
/// q, k, v and out.
pub(super) fn forward_cost(dims: &[usize], elem: usize) -> (f64, f64) {
    let Ok((b, s, h, hkv, d)) = qkv_shapes(dims) else {
        return (0.0, 0.0);
    };
    let (b, s, h, hkv, d) = (b as f64, s as f64, h as f64, hkv as f64, d as f64);
    (
        4.0 * b * h * s * s * d,
        b * s * d * (2.0 * h + 2.0 * hkv) * elem as f64,
    )
}

/// `attention`: the forward block with its log-sum-exp.
pub static ATTENTION: OpSpec = OpSpec {
    name: "attention",
    summary: "flash attention (GQA, causal with offsets, varlen, APE temperature) returning out and its log-sum-exp",
    inputs: &[Q, K, V, CU_Q, CU_K],
    outputs: &[OUT, LSE],
    params: &ATTENTION_PARAMS,
    run: run_attention,
    problem: "B x S x H x D or B x S x H x Hkv x D (Sq = Sk, Dv = D)",
    example_inputs: qkv_inputs,
    cost: forward_cost,
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "attention"),
    in_place: None,
};

fn run_attention_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    let offsets = call_offsets(a)?;
    let kernel = BackwardKernel::parse(&a.param("kernel")?)?;
    let g = attention_backward_with(&call_inputs(a, &offsets)?, &grad_inputs(a)?, &opts, kernel)?;
    Ok(vec![("dq", g.dq), ("dk", g.dk), ("dv", g.dv)])
}

/// The backward's inputs beyond q, k, v and the offsets.
pub(super) const GRAD_INPUTS: [TensorSpec; 3] = [
    TensorSpec::new(
        "out",
        "[B, Sq, H, Dv]",
        Dtypes::F32OrLike("q"),
        false,
        "the forward's output (the merged whole-sequence one for a block of a ring)",
    ),
    TensorSpec::new(
        "lse",
        "[B, H, Sq]",
        Dtypes::Fixed(DType::F32),
        false,
        "the forward's log-sum-exp (likewise)",
    )
    .example(ExampleValues::LogSumExp),
    TensorSpec::new(
        "do",
        "[B, Sq, H, Dv]",
        Dtypes::Like("q"),
        false,
        "gradient of the loss with respect to out",
    ),
];

/// The gradients' outputs.
pub(super) const GRADS: [TensorSpec; 3] = [
    TensorSpec::new("dq", "[B, Sq, H, D]", Dtypes::Like("q"), false, "dL/dq"),
    TensorSpec::new(
        "dk",
        "[B, Sk, Hkv, D]",
        Dtypes::Like("q"),
        false,
        "dL/dk (summed over each KV head's query group)",
    ),
    TensorSpec::new(
        "dv",
        "[B, Sk, Hkv, Dv]",
        Dtypes::Like("q"),
        false,
        "dL/dv (likewise)",
    ),
];

/// `attention_backward`: dq, dk, dv of the forward block.
pub static ATTENTION_BACKWARD: OpSpec = OpSpec {
    name: "attention_backward",
    summary: "attention backward (FlashAttention-2 recomputation from lse; dk/dv without atomics)",
    inputs: &[
        Q,
        K,
        V,
        GRAD_INPUTS[0],
        GRAD_INPUTS[1],
        GRAD_INPUTS[2],
        CU_Q,
        CU_K,
    ],
    outputs: &GRADS,
    params: &BACKWARD_PARAMS,
    run: run_attention_backward,
    problem: "B x S x H x D or B x S x H x Hkv x D (Sq = Sk, Dv = D)",
    example_inputs: |dims, p| {
        let mut v = qkv_inputs(dims, p)?;
        let (b, s, h, _, d) = qkv_shapes(dims)?;
        v.push(("out", vec![b, s, h, d]));
        v.push(("lse", vec![b, h, s]));
        v.push(("do", vec![b, s, h, d]));
        Ok(v)
    },
    cost: |dims, elem| {
        let (f, b) = forward_cost(dims, elem);
        (2.5 * f, 2.0 * b)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "attention_backward"),
    in_place: None,
};

fn run_merge(_: &Client, a: &OpArgs) -> Result<Outputs> {
    // Merged into copies: an operator call leaves its inputs as they were (the Rust
    // API merges in place).
    let copy = |t: &kiln_runtime::Tensor| match t.shape().first() {
        Some(&rows) => crate::rows::slice_rows(t, 0, 0, rows, t.dtype()),
        None => Ok(t.clone()),
    };
    let (oa, la) = (a.tensor("out_a")?, a.tensor("lse_a")?);
    crate::launch::check_input("out_a", oa, oa.client())?;
    la.expect_dtype("lse_a", &[DType::F32])?;
    let (out_a, lse_a) = (copy(oa)?, copy(la)?);
    attention_merge(&out_a, &lse_a, a.tensor("out_b")?, a.tensor("lse_b")?)?;
    Ok(vec![("out", out_a), ("lse", lse_a)])
}

/// `attention_merge`: two partial results over disjoint key sets into one.
pub static ATTENTION_MERGE: OpSpec = OpSpec {
    name: "attention_merge",
    summary: "merge two partial attention results by their log-sum-exp (stable sigmoid form)",
    inputs: &[
        TensorSpec::new(
            "out_a",
            "[B, S, H, Dv]",
            Dtypes::Float,
            false,
            "first partial output",
        ),
        TensorSpec::new(
            "lse_a",
            "[B, H, S]",
            Dtypes::Fixed(DType::F32),
            false,
            "its log-sum-exp",
        ),
        TensorSpec::new(
            "out_b",
            "[B, S, H, Dv]",
            Dtypes::Like("out_a"),
            false,
            "second partial output",
        ),
        TensorSpec::new(
            "lse_b",
            "[B, H, S]",
            Dtypes::Fixed(DType::F32),
            false,
            "its log-sum-exp",
        ),
    ],
    outputs: &[
        TensorSpec::new(
            "out",
            "[B, S, H, Dv]",
            Dtypes::Like("out_a"),
            false,
            "merged output",
        ),
        TensorSpec::new(
            "lse",
            "[B, H, S]",
            Dtypes::Fixed(DType::F32),
            false,
            "merged log-sum-exp",
        ),
    ],
    params: &[],
    run: run_merge,
    problem: "B x S x H x Dv",
    example_inputs: |dims, _| {
        let &[b, s, h, dv] = dims else {
            return Err(Error::Param {
                param: "--shape".into(),
                expected: "B x S x H x Dv".into(),
                found: format!("{dims:?}"),
            });
        };
        Ok(vec![
            ("out_a", vec![b, s, h, dv]),
            ("lse_a", vec![b, h, s]),
            ("out_b", vec![b, s, h, dv]),
            ("lse_b", vec![b, h, s]),
        ])
    },
    cost: |dims, elem| {
        let n: usize = dims.iter().product();
        (3.0 * n as f64, (3 * n * elem) as f64)
    },
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "attention_merge"),
    in_place: None,
};

/// The ring operators' varlen offsets: packed sequences, each cut over the ranks as one
/// sequence would be (a ring attends a sequence to itself, so both are the same).
const RING_CU_Q: TensorSpec = TensorSpec::new(
    "cu_seqlens_q",
    "[N + 1]",
    Dtypes::Fixed(DType::I32),
    true,
    "varlen offsets of the packed sequences (0 first, S last, non-decreasing; B = 1; each sequence cut over the ranks as the schedule prescribes)",
);
const RING_CU_K: TensorSpec = TensorSpec::new(
    "cu_seqlens_k",
    "[N + 1]",
    Dtypes::Fixed(DType::I32),
    true,
    "equal to cu_seqlens_q",
);

/// The backward's parameters: the forward's without `out_dtype` (its gradients take q's
/// dtype; `out` is read in whichever dtype it comes).
const BACKWARD_PARAMS: [ParamSpec; 7] = [
    PARAMS[0],
    PARAMS[1],
    PARAMS[2],
    PARAMS[3],
    PARAMS[4],
    PARAMS[5],
    ParamSpec::new(
        "kernel",
        "auto",
        BackwardKernel::NAMES,
        "the gradient kernels: auto (autotuned), fma, tensor_cores (wmma: f16/bf16 on CUDA)",
    ),
];

/// The ring operators' parameters: the attention ones without offsets, and the ring.
const RING_PARAMS: [ParamSpec; 7] = [
    PARAMS[0],
    PARAMS[1],
    PARAMS[4],
    PARAMS[5],
    PARAMS[6],
    RING_WORLD_SIZE,
    RING_SCHEDULE,
];

/// The ring backward's parameters: the ring's without `out_dtype`.
const RING_BACKWARD_PARAMS: [ParamSpec; 6] = [
    PARAMS[0],
    PARAMS[1],
    PARAMS[4],
    PARAMS[5],
    RING_WORLD_SIZE,
    RING_SCHEDULE,
];

const RING_WORLD_SIZE: ParamSpec = ParamSpec::new(
    "world_size",
    "1",
    "1 ..= 1024",
    "ranks of the ring (run in this process on the chosen device)",
);

const RING_SCHEDULE: ParamSpec = ParamSpec::new(
    "schedule",
    "contiguous",
    "contiguous | zigzag | tokenring",
    "how the sequence is cut and what travels (zigzag: 2P chunks, balanced causal work; tokenring: Q travels, partials return)",
);

fn ring_args(a: &OpArgs) -> Result<(usize, RingSchedule)> {
    Ok((
        a.param_as("world_size")?,
        RingSchedule::parse(&a.param("schedule")?)?,
    ))
}

fn run_ring(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    let (p, schedule) = ring_args(a)?;
    let offsets = call_offsets(a)?;
    let r = ring_attention_local_ranks(&call_inputs(a, &offsets)?, p, schedule, &opts)?;
    Ok(vec![("out", r.out), ("lse", r.lse)])
}

/// `out`, `lse` and `do` of a backward call.
fn grad_inputs(a: &OpArgs) -> Result<AttentionGradInputs<'_>> {
    Ok(AttentionGradInputs {
        out: a.tensor("out")?,
        lse: a.tensor("lse")?,
        d_o: a.tensor("do")?,
    })
}

fn run_ring_backward(_: &Client, a: &OpArgs) -> Result<Outputs> {
    let opts = options(a)?;
    let (p, schedule) = ring_args(a)?;
    let offsets = call_offsets(a)?;
    let g = ring_attention_backward_local_ranks(
        &call_inputs(a, &offsets)?,
        &grad_inputs(a)?,
        p,
        schedule,
        &opts,
    )?;
    Ok(vec![("dq", g.dq), ("dk", g.dk), ("dv", g.dv)])
}

/// `ring_attention`: the whole sequence split over `world_size` ranks in this process.
pub static RING_ATTENTION: OpSpec = OpSpec {
    name: "ring_attention",
    summary: "ring attention over world_size ranks in one process (host-staged communicator): whole q, k, v in, whole out and lse out",
    inputs: &[Q, K, V, RING_CU_Q, RING_CU_K],
    outputs: &[OUT, LSE],
    params: &RING_PARAMS,
    run: run_ring,
    problem: "B x S x H x D or B x S x H x Hkv x D",
    example_inputs: qkv_inputs,
    cost: forward_cost,
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "ring_attention"),
    in_place: None,
};

/// `ring_attention_backward`: the ring backward, whole tensors in and out.
pub static RING_ATTENTION_BACKWARD: OpSpec = OpSpec {
    name: "ring_attention_backward",
    summary: "ring attention backward over world_size ranks in one process: dq, dk, dv of the whole sequence",
    inputs: &[Q, K, V, GRAD_INPUTS[0], GRAD_INPUTS[1], GRAD_INPUTS[2], RING_CU_Q, RING_CU_K],
    outputs: &GRADS,
    params: &RING_BACKWARD_PARAMS,
    run: run_ring_backward,
    problem: "B x S x H x D or B x S x H x Hkv x D",
    example_inputs: ATTENTION_BACKWARD.example_inputs,
    cost: ATTENTION_BACKWARD.cost,
    selftest: || kiln_runtime::selftest::only(super::selftest::cases(), "ring_attention_backward"),
    in_place: None,
};

kiln_runtime::register_op!(
    ATTENTION,
    ATTENTION_BACKWARD,
    ATTENTION_MERGE,
    RING_ATTENTION,
    RING_ATTENTION_BACKWARD
);
