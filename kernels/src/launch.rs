//! Host-side checks and shapes shared by the operator modules: input validation,
//! shape errors, absent optional inputs, and `--shape` helpers for `kiln tune`/`bench`.

use kiln_runtime::{shape_str, Client, DType, Error, HostTensor, Result, Tensor};

/// Most elements a kernel input may have: kernels index in 32 bits, and grid-stride
/// offsets may reach twice the length before the bounds check.
pub const MAX_ELEMENTS: usize = kiln_runtime::MAX_ELEMENTS;

/// The checks every float operator input gets: a float dtype the device has, lives on
/// `client`'s device, contiguous, and at most [`MAX_ELEMENTS`] elements. Errors name
/// the tensor.
pub fn check_input(name: &str, t: &Tensor, client: &Client) -> Result<()> {
    t.expect_dtype(name, &DType::FLOATS)?;
    client.require_dtype(name, t.dtype())?;
    t.expect_usable(name, client)?;
    // Also each dimension: an empty tensor's others must not size host work either.
    kiln_runtime::checked_numel(name, t.shape(), t.dtype())?;
    Ok(())
}

/// `--shape` for operators on one tensor `x`: the shape of `x`.
pub fn x_only(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
    Ok(vec![("x", dims.to_vec())])
}

/// `--shape` for binary operators: the shape of `x`; `y` is its last dimension.
pub fn x_and_bias(
    dims: &[usize],
    _: &kiln_runtime::ExampleParams,
) -> Result<kiln_runtime::InputShapes> {
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

/// The most sequences a uniform batch may have beyond its tensors' element count: the
/// host keeps `B + 1` offsets (8 bytes each), so a batch of empty sequences
/// (`[2^31 - 1, 0, H, D]`) would otherwise size gigabytes for nothing.
pub(crate) const MAX_EMPTY_BATCH: usize = 1 << 20;

/// An error naming `tensor` (of shape `shape`) unless its batch `b` is at most the
/// element count of the call's largest tensor (`largest`) or [`MAX_EMPTY_BATCH`]: only
/// batches of empty sequences are refused.
pub(crate) fn check_batch(tensor: &str, b: usize, largest: usize, shape: &[usize]) -> Result<()> {
    if b <= largest.max(MAX_EMPTY_BATCH) {
        return Ok(());
    }
    Err(shape_err(
        tensor,
        format!("a batch B <= {MAX_EMPTY_BATCH} where its sequences are empty"),
        shape,
    ))
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

/// `t` (a shared handle), or [`absent`]'s placeholder when the optional input is not given.
pub(crate) fn or_absent(client: &Client, t: Option<&Tensor>) -> Result<Tensor> {
    match t {
        Some(t) => Ok(t.clone()),
        None => absent(client),
    }
}

/// `values` as a u32 device tensor named `name` (tables and offsets the host builds).
/// An empty list becomes one 0: a zero-length buffer is not bindable everywhere.
pub(crate) fn upload_u32(client: &Client, name: &str, values: &[u32]) -> Result<Tensor> {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (shape, data) = if values.is_empty() {
        (vec![1], vec![0u8; 4])
    } else {
        (vec![values.len()], data)
    };
    Tensor::upload_named(
        client,
        name,
        &HostTensor::from_bytes(DType::U32, shape, data)?,
    )
}

/// Varlen offsets `cu` (parameter `name`) as row bounds: `N + 1 >= 2` entries, 0 first,
/// `total` (the token count, called `what` in the error) last, non-decreasing.
pub(crate) fn check_offsets(
    name: &str,
    cu: &[i32],
    total: usize,
    what: &str,
) -> Result<Vec<usize>> {
    let bad = |why: &str| Error::Param {
        param: name.into(),
        expected: format!("N + 1 >= 2 offsets from 0 to {what} = {total}, non-decreasing"),
        found: format!("{why}: {cu:?}"),
    };
    if cu.len() < 2 {
        return Err(bad("fewer than 2 entries"));
    }
    if cu[0] != 0 {
        return Err(bad("does not start at 0"));
    }
    if cu.windows(2).any(|w| w[1] < w[0]) {
        return Err(bad("decreasing"));
    }
    if *cu.last().unwrap_or(&0) as usize != total || cu.iter().any(|&c| c < 0) {
        return Err(bad(&format!("does not end at {what}")));
    }
    Ok(cu.iter().map(|&c| c as usize).collect())
}

/// How long a rank run by [`on_local_ranks`] (ring attention, expert parallelism)
/// waits for a peer: the first call
/// of a shape may autotune its kernels (seconds to minutes on a CPU adapter) while the
/// peers wait.
pub const LOCAL_RANK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);

/// Runs `body(rank's communicator)` on `p` ranks in threads sharing `client`'s device (the
/// host-staged communicator); the results in rank order, or the first error.
pub(crate) fn on_local_ranks<T: Send>(
    client: &Client,
    op: &str,
    p: usize,
    body: impl Fn(&kiln_runtime::comm::HostComm) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> =
        kiln_runtime::comm::HostComm::run(vec![client.clone(); p], LOCAL_RANK_TIMEOUT, body)
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|_| {
                    Err(Error::Kernel {
                        kernel: op.into(),
                        message: "a rank's thread panicked".into(),
                    })
                })
            })
            .collect();
    // A rank's own error (bad input, a kernel) before the communication errors its
    // peers saw because it stopped.
    let own = results
        .iter()
        .position(|r| matches!(r, Err(e) if !matches!(e, Error::Comm { .. })));
    let mut out = Vec::with_capacity(p);
    let mut first_err = None;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => out.push(v),
            Err(e) if first_err.is_none() || Some(i) == own => first_err = Some(e),
            Err(_) => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
