//! The `kiln run` entry of `matmul`.

use super::{matmul_among, selftest, Activation, Epilogue, KernelFamily};
use kiln_runtime::{Client, Dtypes, Error, OpArgs, OpSpec, Outputs, ParamSpec, Result, TensorSpec};

fn run_matmul(client: &Client, args: &OpArgs) -> Result<Outputs> {
    let (a, b) = (args.tensor("a")?, args.tensor("b")?);
    a.expect_usable("a", client)?;
    let ep = Epilogue {
        bias: args.optional_tensor("bias"),
        activation: Activation::parse(&args.param("activation")?)?,
        residual: args.optional_tensor("residual"),
    };
    let trans_b = args.param_choice("trans_b", &["false", "true"])? == "true";
    let family = KernelFamily::parse(&args.param("kernel")?)?;
    Ok(vec![("c", matmul_among(a, b, trans_b, ep, family)?)])
}

/// `matmul`: `c = epilogue(a @ b)`.
pub static MATMUL: OpSpec = OpSpec {
    name: "matmul",
    summary: "c = act(a @ b + bias) + residual, f32 accumulation, autotuned tiles",
    inputs: &[
        TensorSpec::new("a", "[M, K]", Dtypes::Float, false, "left operand"),
        TensorSpec::new(
            "b",
            "[K, N] ([N, K] with trans_b)",
            Dtypes::Like("a"),
            false,
            "right operand",
        ),
        TensorSpec::new("bias", "[N]", Dtypes::Like("a"), true, "added to every row"),
        TensorSpec::new(
            "residual",
            "[M, N]",
            Dtypes::Like("a"),
            true,
            "added after the activation",
        ),
    ],
    outputs: &[TensorSpec::new(
        "c",
        "[M, N]",
        Dtypes::Like("a"),
        false,
        "result",
    )],
    params: &[
        ParamSpec {
            name: "activation",
            default: "none",
            values: "none | silu | gelu | relu",
            doc: "applied after the bias",
        },
        ParamSpec {
            name: "trans_b",
            default: "false",
            values: "false | true",
            doc: "b is [N, K]",
        },
        ParamSpec {
            name: "kernel",
            default: "auto",
            values: "auto | tensor_cores | fma",
            doc: "which kernels the autotuner chooses among: all; only the tensor-core tiles (f16/bf16, K and N multiples of 8, a device with tensor cores); only kiln's FMA tiles (kiln's own f32 summation order, no cubek)",
        },
    ],
    run: run_matmul,
    cost: |d, e| match *d {
        [m, n, k] => (
            2.0 * (m * n * k) as f64,
            ((m * k + k * n + m * n) * e) as f64,
        ),
        _ => (0.0, 0.0),
    },
    problem: "M x N x K",
    example_inputs: matmul_inputs,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "matmul"),
    in_place: None,
};

/// `a` `[M, K]` and `b` `[K, N]`, or `[N, K]` with `trans_b=true`.
fn matmul_inputs(
    dims: &[usize],
    params: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    let trans_b = params.get("trans_b").is_some_and(|v| v == "true");
    match *dims {
        [m, n, k] => Ok(vec![
            ("a", vec![m, k]),
            ("b", if trans_b { vec![n, k] } else { vec![k, n] }),
        ]),
        _ => Err(Error::Param {
            param: "--shape".into(),
            expected: "M x N x K".into(),
            found: format!("{dims:?}"),
        }),
    }
}

kiln_runtime::register_op!(MATMUL);
