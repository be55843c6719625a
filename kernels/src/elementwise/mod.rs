//! Element-wise operators.
//!
//! Spec: `add` and `mul` compute `out = x (+|*) y` where `y`'s shape is a suffix of
//! `x`'s (leading 1s allowed), i.e. `y` is broadcast over `x`'s leading dimensions
//! (a bias `[D]` over `[..., D]`); `silu(x) = x * sigmoid(x)`; `gelu` is the tanh
//! approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
//! Inputs f32, f16 or bf16 (bf16 where the device has it); the output has `x`'s dtype
//! and shape. Activations are computed in f32 whatever the storage type.
//! Kernels read and write 4-wide vectors where every length allows it.

mod kernels;
pub mod selftest;

pub use kernels::{
    ElementwiseBinary, ElementwiseBinaryArgs, ElementwiseBinaryConfig, ElementwiseBinaryProblem,
    ElementwiseUnary, ElementwiseUnaryArgs, ElementwiseUnaryConfig, ElementwiseUnaryProblem,
    ELEMENTWISE_BINARY_KERNEL, ELEMENTWISE_UNARY_KERNEL,
};

use crate::launch::{check_input, elementwise_cost, x_and_bias, x_only};
use kiln_runtime::{
    shape_str, AdapterType, Client, Dtypes, Error, OpArgs, OpSpec, Outputs, Result, Tensor,
    TensorSpec,
};

// ---------------------------------------------------------------- host API

/// `x + y`, with `y` broadcast over `x`'s leading dimensions.
pub fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    binary(x, y, BinaryOp::Add)
}

/// `x * y`, with `y` broadcast over `x`'s leading dimensions.
pub fn mul(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    binary(x, y, BinaryOp::Mul)
}

/// SiLU, `x * sigmoid(x)`, computed in f32.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Silu)
}

/// GELU (tanh approximation), computed in f32.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Gelu)
}

kiln_runtime::comptime_enum! {
    /// The operation of the binary kernel (one compiled variant each).
    pub enum BinaryOp {
        /// `x + y`.
        Add = "add",
        /// `x * y`.
        Mul = "mul",
    }
}

kiln_runtime::comptime_enum! {
    /// The activation of the unary kernel (one compiled variant each).
    pub enum UnaryOp {
        /// `x * sigmoid(x)`.
        Silu = "silu",
        /// GELU, tanh form.
        Gelu = "gelu",
    }
}

/// Checks that `y`'s shape is a suffix of `x`'s (ignoring leading 1s of `y`).
fn check_broadcast(x: &[usize], y: &[usize]) -> Result<()> {
    let core: Vec<usize> = y.iter().copied().skip_while(|&d| d == 1).collect();
    // y = [1, 1, 3, 4] against x = [..., 3, 4] is fine; y = [] or [1] is a scalar.
    let ok = x.ends_with(&core);
    if ok {
        Ok(())
    } else {
        Err(Error::Shape {
            tensor: "y".into(),
            expected: format!(
                "{} or a suffix of it (broadcast over leading dimensions)",
                shape_str(x)
            ),
            found: shape_str(y),
        })
    }
}

fn binary(x: &Tensor, y: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let client = x.client();
    check_input("x", x, client)?;
    check_input("y", y, client)?;
    if y.dtype() != x.dtype() {
        return Err(Error::DType {
            tensor: "y".into(),
            expected: format!("{} (the dtype of x)", x.dtype()),
            found: y.dtype().name().into(),
        });
    }
    check_broadcast(x.shape(), y.shape())?;
    let out = Tensor::empty(client, x.dtype(), x.shape())?;
    if x.numel() == 0 {
        return Ok(out);
    }
    // check_input bounds every length by 2^31: these fit in u32.
    let args = ElementwiseBinaryArgs {
        x,
        y,
        out: &out,
        len: x.numel() as u32,
        y_len: y.numel() as u32,
        op,
    };
    // Nothing to tune: 16 vectors per unit on CPU adapters, 4 on GPUs (kernels.rs).
    let per_unit = if client.report().adapter_type == AdapterType::Cpu {
        16
    } else {
        4
    };
    let space = ElementwiseBinary::space(client, &args.problem());
    let cfg = match space.iter().find(|c| c.PER_UNIT == per_unit) {
        Some(c) => *c,
        None => only_config(space)?,
    };
    ElementwiseBinary::launch(client, &cfg, &args)?;
    Ok(out)
}

fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let client = x.client();
    check_input("x", x, client)?;
    let out = Tensor::empty(client, x.dtype(), x.shape())?;
    if x.numel() == 0 {
        return Ok(out);
    }
    let args = ElementwiseUnaryArgs {
        x,
        out: &out,
        len: x.numel() as u32,
        op,
    };
    let cfg = only_config(ElementwiseUnary::space(client, &args.problem()))?;
    ElementwiseUnary::launch(client, &cfg, &args)?;
    Ok(out)
}

/// The single declared configuration of an element-wise kernel.
fn only_config<C>(space: Vec<C>) -> Result<C> {
    space.into_iter().next().ok_or_else(|| Error::Kernel {
        kernel: "elementwise".into(),
        message: "the device cannot run 256 units per cube".into(),
    })
}

// ---------------------------------------------------------------- reference

/// f64 references, written from the spec (independent of the kernels).
pub mod reference {
    /// `x + y[i mod len(y)]`.
    pub fn add(x: &[f64], y: &[f64]) -> Vec<f64> {
        x.iter()
            .enumerate()
            .map(|(i, a)| a + y[i % y.len()])
            .collect()
    }
    /// `x * y[i mod len(y)]`.
    pub fn mul(x: &[f64], y: &[f64]) -> Vec<f64> {
        x.iter()
            .enumerate()
            .map(|(i, a)| a * y[i % y.len()])
            .collect()
    }
    /// `x / (1 + e^-x)`.
    pub fn silu(x: &[f64]) -> Vec<f64> {
        x.iter().map(|&v| v / (1.0 + (-v).exp())).collect()
    }
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, evaluated as
    /// `x * (1 + tanh(u)) / 2` with `1 + tanh(u) = 2 e^{2u} / (1 + e^{2u})` for u < 0,
    /// which keeps f64 accuracy where `1 + tanh(u)` would cancel.
    pub fn gelu(x: &[f64]) -> Vec<f64> {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        x.iter()
            .map(|&v| {
                let u = k * (v + 0.044715 * v * v * v);
                let half_one_plus_tanh = if u < 0.0 {
                    (2.0 * u).exp() / (1.0 + (2.0 * u).exp())
                } else {
                    0.5 * (1.0 + u.tanh())
                };
                v * half_one_plus_tanh
            })
            .collect()
    }
}

// ---------------------------------------------------------------- registry

const X: TensorSpec = TensorSpec::new("x", "[...]", Dtypes::Float, false, "input");
const Y: TensorSpec = TensorSpec::new(
    "y",
    "a suffix of x's shape, e.g. [D] for x [..., D]",
    Dtypes::Like("x"),
    false,
    "second operand, broadcast over x's leading dimensions",
);
const OUT: TensorSpec = TensorSpec::new("out", "x's shape", Dtypes::Like("x"), false, "result");

fn run_binary(client: &Client, a: &OpArgs, op: BinaryOp) -> Result<Outputs> {
    let (x, y) = (a.tensor("x")?, a.tensor("y")?);
    x.expect_usable("x", client)?;
    Ok(vec![("out", binary(x, y, op)?)])
}
fn run_unary(client: &Client, a: &OpArgs, op: UnaryOp) -> Result<Outputs> {
    let x = a.tensor("x")?;
    x.expect_usable("x", client)?;
    Ok(vec![("out", unary(x, op)?)])
}
fn run_add(c: &Client, a: &OpArgs) -> Result<Outputs> {
    run_binary(c, a, BinaryOp::Add)
}
fn run_mul(c: &Client, a: &OpArgs) -> Result<Outputs> {
    run_binary(c, a, BinaryOp::Mul)
}
fn run_silu(c: &Client, a: &OpArgs) -> Result<Outputs> {
    run_unary(c, a, UnaryOp::Silu)
}
fn run_gelu(c: &Client, a: &OpArgs) -> Result<Outputs> {
    run_unary(c, a, UnaryOp::Gelu)
}

/// `add`: `out = x + y`.
pub static ADD: OpSpec = OpSpec {
    name: "add",
    summary: "out = x + y, y broadcast over x's leading dimensions",
    inputs: &[X, Y],
    outputs: &[OUT],
    params: &[],
    run: run_add,
    cost: |d, e| elementwise_cost(d, e, 1.0),
    problem: "shape of x (y = its last dimension)",
    example_inputs: x_and_bias,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "add"),
    in_place: None,
};
/// `mul`: `out = x * y`.
pub static MUL: OpSpec = OpSpec {
    name: "mul",
    summary: "out = x * y, y broadcast over x's leading dimensions",
    inputs: &[X, Y],
    outputs: &[OUT],
    params: &[],
    run: run_mul,
    cost: |d, e| elementwise_cost(d, e, 1.0),
    problem: "shape of x (y = its last dimension)",
    example_inputs: x_and_bias,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "mul"),
    in_place: None,
};
/// `silu`: `out = x * sigmoid(x)`.
pub static SILU: OpSpec = OpSpec {
    name: "silu",
    summary: "out = x * sigmoid(x), in f32",
    inputs: &[X],
    outputs: &[OUT],
    params: &[],
    run: run_silu,
    cost: |d, e| elementwise_cost(d, e, 4.0),
    problem: "shape of x",
    example_inputs: x_only,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "silu"),
    in_place: None,
};
/// `gelu`: tanh-approximated GELU.
pub static GELU: OpSpec = OpSpec {
    name: "gelu",
    summary: "out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in f32",
    inputs: &[X],
    outputs: &[OUT],
    params: &[],
    run: run_gelu,
    cost: |d, e| elementwise_cost(d, e, 9.0),
    problem: "shape of x",
    example_inputs: x_only,
    selftest: || kiln_runtime::selftest::only(selftest::cases(), "gelu"),
    in_place: None,
};

kiln_runtime::register_op!(ADD, MUL, SILU, GELU);
