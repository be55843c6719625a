//! Host-side checks and shapes shared by the operator modules: input validation,
//! shape errors, absent optional inputs, and `--shape` helpers for `kiln tune`/`bench`.

use kiln_runtime::{shape_str, Client, DType, Error, Result, Tensor};

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
