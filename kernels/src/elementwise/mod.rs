//! Element-wise operators.
//!
//! Spec: `add` and `mul` compute `out = x (+|*) y` where `y`'s shape is a suffix of
//! `x`'s (leading 1s allowed), i.e. `y` is broadcast over `x`'s leading dimensions
//! (a bias `[D]` over `[..., D]`); `silu(x) = x * sigmoid(x)`; `gelu` is the tanh
//! approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
//! Inputs f32, f16 or bf16 (bf16 where the device has it); the output has `x`'s dtype
//! and shape. Activations are computed in f32 whatever the storage type.
//! Kernels read and write 4-wide vectors where every length allows it.

pub mod selftest;

use crate::launch::{
    begin, check_input, config_dtype, elementwise_cost, finish, grid, grid_units, input_array,
    output_array, register_float, scalar_u32, vector_width, with_float, x_and_bias, x_only,
    DTYPE_PARAM, ELEMENTWISE_UNITS,
};
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, linear_unit, silu as silu_f32};
use kiln_runtime::{
    dispatch, shape_str, Client, Error, KernelConfig, KernelSpec, OpArgs, OpSpec, Outputs,
    ParamSpec, Result, Tensor, TensorSpec,
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
    let w = vector_width(&[x.numel(), y.numel()]);
    // check_input bounds every length by 2^31: these fit in u32.
    let len = (x.numel() / w) as u32;
    let y_len = (y.numel() / w) as u32;
    let per_cube = (ELEMENTWISE_UNITS * BINARY_PER_UNIT) as usize;
    let count = grid((len as usize).div_ceil(per_cube))?;
    // Units in the whole grid (<= len / 4 + 256): the distance between a unit's
    // consecutive vectors.
    let stride = grid_units(&count, ELEMENTWISE_UNITS) as u32;
    let step = stride % y_len;
    dispatch!(client, c => with_float!(x.dtype(), F => {
        // SAFETY: the kernel guards every index of x and out with `len`, and keeps
        // the index of y below `y_len`; both lengths are in vectors of width `w` and
        // match the buffers.
        unsafe {
            binary_kernel::launch_unchecked::<F, _>(
                c,
                count,
                CubeDim::new_1d(ELEMENTWISE_UNITS),
                w,
                ArrayArg::from_raw_parts(x.handle().clone(), x.numel()),
                ArrayArg::from_raw_parts(y.handle().clone(), y.numel()),
                ArrayArg::from_raw_parts(out.handle().clone(), out.numel()),
                len,
                y_len,
                stride,
                step,
                op,
            )
        };
        Ok(())
    }))?;
    Ok(out)
}

fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let client = x.client();
    check_input("x", x, client)?;
    let out = Tensor::empty(client, x.dtype(), x.shape())?;
    if x.numel() == 0 {
        return Ok(out);
    }
    let w = vector_width(&[x.numel()]);
    let len = (x.numel() / w) as u32;
    let count = grid((len as usize).div_ceil(ELEMENTWISE_UNITS as usize))?;
    dispatch!(client, c => with_float!(x.dtype(), F => {
        // SAFETY: every index is guarded by `len` (in vectors of width `w`).
        unsafe {
            unary_kernel::launch_unchecked::<F, _>(
                c,
                count,
                CubeDim::new_1d(ELEMENTWISE_UNITS),
                w,
                ArrayArg::from_raw_parts(x.handle().clone(), x.numel()),
                ArrayArg::from_raw_parts(out.handle().clone(), out.numel()),
                len,
                op,
            )
        };
        Ok(())
    }))?;
    Ok(out)
}

// ---------------------------------------------------------------- kernels

/// Vectors each unit of the binary kernel handles, `stride` apart.
const BINARY_PER_UNIT: u32 = 4;

/// `out[i] = x[i] op y[i mod y_len]`, all in vectors of N elements. Each unit handles
/// `BINARY_PER_UNIT` vectors `stride` apart (coalesced across units) and tracks
/// `i mod y_len` incrementally (`step = stride mod y_len`): an integer division per
/// vector costs as much as the memory traffic on CPU adapters, one per unit does not.
#[cube(launch_unchecked)]
fn binary_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    y: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    len: u32,
    y_len: u32,
    stride: u32,
    step: u32,
    #[comptime] op: BinaryOp,
) {
    let mut i = linear_unit();
    let mut j = i % y_len as usize;
    #[unroll]
    for _ in 0..BINARY_PER_UNIT {
        if i < len as usize {
            let a = x[i];
            let b = y[j];
            if comptime!(op == BinaryOp::Add) {
                out[i] = a + b;
            } else {
                out[i] = a * b;
            }
        }
        i += stride as usize;
        j += step as usize;
        if j >= y_len as usize {
            j -= y_len as usize;
        }
    }
}

/// `out[i] = act(x[i])`, evaluated in f32 whatever F is (f16 would overflow `exp`).
#[cube(launch_unchecked)]
fn unary_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    len: u32,
    #[comptime] op: UnaryOp,
) {
    let i = linear_unit();
    if i < len as usize {
        let v = Vector::<f32, N>::cast_from(x[i]);
        if comptime!(op == UnaryOp::Silu) {
            out[i] = Vector::<F, N>::cast_from(silu_f32::<N>(v));
        } else {
            out[i] = Vector::<F, N>::cast_from(gelu_tanh::<N>(v));
        }
    }
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

const X: TensorSpec = TensorSpec::new("x", "[...]", "f32 | f16 | bf16", false, "input");
const Y: TensorSpec = TensorSpec::new(
    "y",
    "a suffix of x's shape, e.g. [D] for x [..., D]",
    "x's dtype",
    false,
    "second operand, broadcast over x's leading dimensions",
);
const OUT: TensorSpec = TensorSpec::new("out", "x's shape", "x's dtype", false, "result");

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
};

const VECTOR_PARAM: ParamSpec = ParamSpec {
    name: "vector",
    default: "4",
    values: "1 | 2 | 4",
    doc: "elements per load/store",
};

fn config_vector(cfg: &KernelConfig) -> Result<usize> {
    let v: usize = cfg.get("vector")?;
    if [1, 2, 4].contains(&v) {
        Ok(v)
    } else {
        Err(Error::Param {
            param: "vector".into(),
            expected: VECTOR_PARAM.values.into(),
            found: v.to_string(),
        })
    }
}

/// The operation an element-wise kernel entry emits.
#[derive(Clone, Copy)]
enum Op {
    Binary(BinaryOp),
    Unary(UnaryOp),
}

fn define(builder: KernelBuilder, cfg: &KernelConfig, op: Op) -> Result<KernelDefinition> {
    let dtype = config_dtype(cfg)?;
    let w = config_vector(cfg)?;
    let name = match op {
        Op::Binary(o) => o.to_string(),
        Op::Unary(o) => o.to_string(),
    };
    let entry = format!("kiln_{name}_{dtype}_v{w}");
    with_float!(dtype, F => Ok(match op {
        Op::Binary(o) => define_binary::<F>(builder, w, o, entry),
        Op::Unary(o) => define_unary::<F>(builder, w, o, entry),
    }))
}

fn define_binary<F: Float>(
    mut b: KernelBuilder,
    w: usize,
    op: BinaryOp,
    entry: String,
) -> KernelDefinition {
    type V = Vector<binary_kernel::F, binary_kernel::N>;
    begin(&mut b);
    register_float::<binary_kernel::_F, F>(&mut b);
    b.scope.register_size::<binary_kernel::N>(w.into());
    let x = input_array::<V>(&mut b);
    let y = input_array::<V>(&mut b);
    let out = output_array::<V>(&mut b);
    let len = scalar_u32(&mut b);
    let y_len = scalar_u32(&mut b);
    let stride = scalar_u32(&mut b);
    let step = scalar_u32(&mut b);
    binary_kernel::expand::<binary_kernel::F, binary_kernel::N>(
        &mut b.scope,
        w,
        x,
        y,
        out,
        len,
        y_len,
        stride,
        step,
        op,
    );
    finish(b, entry, ELEMENTWISE_UNITS)
}

fn define_unary<F: Float>(
    mut b: KernelBuilder,
    w: usize,
    op: UnaryOp,
    entry: String,
) -> KernelDefinition {
    type V = Vector<unary_kernel::F, unary_kernel::N>;
    begin(&mut b);
    register_float::<unary_kernel::_F, F>(&mut b);
    b.scope.register_size::<unary_kernel::N>(w.into());
    let x = input_array::<V>(&mut b);
    let out = output_array::<V>(&mut b);
    let len = scalar_u32(&mut b);
    unary_kernel::expand::<unary_kernel::F, unary_kernel::N>(&mut b.scope, w, x, out, len, op);
    finish(b, entry, ELEMENTWISE_UNITS)
}

fn define_add(b: KernelBuilder, c: &KernelConfig) -> Result<KernelDefinition> {
    define(b, c, Op::Binary(BinaryOp::Add))
}
fn define_mul(b: KernelBuilder, c: &KernelConfig) -> Result<KernelDefinition> {
    define(b, c, Op::Binary(BinaryOp::Mul))
}
fn define_silu(b: KernelBuilder, c: &KernelConfig) -> Result<KernelDefinition> {
    define(b, c, Op::Unary(UnaryOp::Silu))
}
fn define_gelu(b: KernelBuilder, c: &KernelConfig) -> Result<KernelDefinition> {
    define(b, c, Op::Unary(UnaryOp::Gelu))
}

const EW_CONFIG: &[ParamSpec] = &[DTYPE_PARAM, VECTOR_PARAM];

/// Emission entry of the `add` kernel.
pub static ADD_KERNEL: KernelSpec = KernelSpec {
    name: "add",
    summary: ADD.summary,
    config: EW_CONFIG,
    define: define_add,
    capabilities: &[],
    source_hash: source_hash,
};
/// Emission entry of the `mul` kernel.
pub static MUL_KERNEL: KernelSpec = KernelSpec {
    name: "mul",
    summary: MUL.summary,
    config: EW_CONFIG,
    define: define_mul,
    capabilities: &[],
    source_hash: source_hash,
};
/// Emission entry of the `silu` kernel.
pub static SILU_KERNEL: KernelSpec = KernelSpec {
    name: "silu",
    summary: SILU.summary,
    config: EW_CONFIG,
    define: define_silu,
    capabilities: &[],
    source_hash: source_hash,
};
/// Emission entry of the `gelu` kernel.
pub static GELU_KERNEL: KernelSpec = KernelSpec {
    name: "gelu",
    summary: GELU.summary,
    config: EW_CONFIG,
    define: define_gelu,
    capabilities: &[],
    source_hash: source_hash,
};

/// Hash of this module's source and the DSL's (the tune-cache key of its kernels).
fn source_hash() -> String {
    kiln_runtime::tune::fnv1a_hex(&[include_str!("mod.rs"), kiln_dsl::SOURCE_HASH].concat())
}

kiln_runtime::register_op!(ADD, MUL, SILU, GELU);
kiln_runtime::register_kernel!(ADD_KERNEL, MUL_KERNEL, SILU_KERNEL, GELU_KERNEL);
