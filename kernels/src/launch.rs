//! Launch plumbing shared by the operator modules: dtype dispatch, grids, and the
//! device-free kernel definition used by `kiln emit`.

use cubecl::prelude::*;
use kiln_runtime::{shape_str, Client, DType, Error, KernelConfig, ParamSpec, Result, Tensor};

pub(crate) use kiln_runtime::with_float;

/// Units per cube of the 1-D element-wise kernels.
pub const ELEMENTWISE_UNITS: u32 = 256;

/// Largest cube count per grid dimension that every backend accepts.
const MAX_CUBES: usize = 65_535;

/// A 2-D grid of at least `cubes` cubes (x first); kernels linearize it as
/// `CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X` and guard the tail. Inputs checked by
/// [`check_input`] never need more than 65 535^2 cubes.
pub fn grid(cubes: usize) -> Result<CubeCount> {
    let cubes = cubes.max(1);
    let x = cubes.min(MAX_CUBES);
    let y = cubes.div_ceil(x);
    if y > MAX_CUBES {
        return Err(Error::Kernel {
            kernel: "launch".into(),
            message: format!("{cubes} cubes exceed the {MAX_CUBES} x {MAX_CUBES} grid"),
        });
    }
    Ok(CubeCount::Static(x as u32, y as u32, 1))
}

/// Units in a grid from [`grid`] with cubes of `units`.
pub fn grid_units(count: &CubeCount, units: u32) -> u64 {
    match count {
        CubeCount::Static(x, y, z) => *x as u64 * *y as u64 * *z as u64 * units as u64,
        CubeCount::Dynamic(_) => 0,
    }
}

/// Widest vector (4, 2 or 1 elements) that divides every length given.
pub fn vector_width(lens: &[usize]) -> usize {
    [4usize, 2, 1]
        .into_iter()
        .find(|w| lens.iter().all(|l| l % w == 0))
        .unwrap_or(1)
}

/// Most elements a kernel input may have: kernels index in 32 bits, and grid-stride
/// offsets may reach twice the length before the bounds check.
pub const MAX_ELEMENTS: usize = i32::MAX as usize;

/// The checks every float operator input gets: a float dtype the device has, lives on
/// `client`'s device, contiguous, and at most [`MAX_ELEMENTS`] elements. Errors name
/// the tensor.
pub fn check_input(name: &str, t: &Tensor, client: &Client) -> Result<()> {
    t.expect_dtype(name, &DType::FLOATS)?;
    client.require_dtype(name, t.dtype())?;
    t.expect_usable(name, client)?;
    if t.numel() > MAX_ELEMENTS {
        return Err(Error::Shape {
            tensor: name.into(),
            expected: format!("at most {MAX_ELEMENTS} elements (32-bit indexing)"),
            found: format!("{} elements, shape {:?}", t.numel(), t.shape()),
        });
    }
    Ok(())
}

/// The configuration knob every emitted kernel has.
pub const DTYPE_PARAM: ParamSpec = ParamSpec {
    name: "dtype",
    default: "f32",
    values: "f32 | f16 | bf16",
    doc: "element type of the tensors",
};

/// The float dtype named in an emission config.
pub fn config_dtype(cfg: &KernelConfig) -> Result<DType> {
    let text = cfg.get::<String>("dtype")?;
    match DType::parse(&text) {
        Ok(d) if d.is_float() => Ok(d),
        _ => Err(Error::Param {
            param: "dtype".into(),
            expected: DTYPE_PARAM.values.into(),
            found: text,
        }),
    }
}

pub(crate) use kiln_runtime::define::{
    begin, finish, input_array, output_array, register_float, scalar_u32,
};

/// `--shape` for operators on one tensor `x`: the shape of `x`.
pub fn x_only(dims: &[usize]) -> Result<Vec<(&'static str, Vec<usize>)>> {
    Ok(vec![("x", dims.to_vec())])
}

/// `--shape` for binary operators: the shape of `x`; `y` is its last dimension.
pub fn x_and_bias(dims: &[usize]) -> Result<Vec<(&'static str, Vec<usize>)>> {
    let d = *dims.last().unwrap_or(&1);
    Ok(vec![("x", dims.to_vec()), ("y", vec![d])])
}

/// Cost of an element-wise operator on `x` of `dims`: `flops_per` per element, x read
/// and out written (a broadcast `y` is negligible).
pub fn elementwise_cost(dims: &[usize], elem: usize, flops_per: f64) -> (f64, f64) {
    let n: usize = dims.iter().product();
    (n as f64 * flops_per, (2 * n * elem) as f64)
}

/// A shape error naming `tensor`.
pub(crate) fn shape_err(tensor: &str, expected: String, found: &[usize]) -> Error {
    Error::Shape {
        tensor: tensor.into(),
        expected,
        found: shape_str(found),
    }
}

/// An error unless `t` has exactly the shape `want` (`what` says where it comes from).
pub(crate) fn expect_shape(name: &str, t: &Tensor, want: &[usize], what: &str) -> Result<()> {
    if t.shape() != want {
        return Err(shape_err(
            name,
            format!("{} ({what})", shape_str(want)),
            t.shape(),
        ));
    }
    Ok(())
}

/// A one-element f32 placeholder bound to a kernel argument that a comptime flag
/// leaves unread (an absent optional input).
pub(crate) fn absent(client: &Client) -> Result<Tensor> {
    Tensor::empty(client, DType::F32, &[1])
}
