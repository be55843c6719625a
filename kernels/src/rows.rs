//! Row-block copies: a tensor viewed as `[outer, rows, inner]` (e.g. `[B, S, H * D]`,
//! or `[B * H, S, 1]` for a log-sum-exp), a block of its rows copied into another such
//! tensor at another row offset, converting between a float dtype and f32 on the way.
//! What splitting a sequence into ring chunks (and putting the results back) needs.

use crate::launch::check_input;
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{shape_str, DType, Error, Result, Tensor};

/// Rows `[r0, r0 + n)` of `t` along dimension `axis`, as a new contiguous tensor of
/// dtype `to` (t's dtype or f32, or f32 to a float dtype).
pub fn slice_rows(t: &Tensor, axis: usize, r0: usize, n: usize, to: DType) -> Result<Tensor> {
    let mut shape = t.shape().to_vec();
    if axis >= shape.len() || r0 + n > shape[axis] {
        return Err(Error::Shape {
            tensor: "slice".into(),
            expected: format!("rows {r0}..{} of dimension {axis}", r0 + n),
            found: shape_str(t.shape()),
        });
    }
    shape[axis] = n;
    let out = Tensor::empty(t.client(), to, &shape)?;
    copy_rows(t, axis, r0, &out, 0, n)?;
    Ok(out)
}

/// Copies rows `[src_r0, src_r0 + n)` of `src` into rows `[dst_r0, dst_r0 + n)` of
/// `dst` along dimension `axis` (the other dimensions equal), converting the dtype.
/// `dst` is written in place.
pub fn copy_rows(
    src: &Tensor,
    axis: usize,
    src_r0: usize,
    dst: &Tensor,
    dst_r0: usize,
    n: usize,
) -> Result<()> {
    let client = src.client();
    check_input("src", src, client)?;
    check_input("dst", dst, client)?;
    let (ss, ds) = (src.shape(), dst.shape());
    let same_rest = ss.len() == ds.len()
        && axis < ss.len()
        && ss
            .iter()
            .zip(ds)
            .enumerate()
            .all(|(i, (a, b))| i == axis || a == b);
    if !same_rest || src_r0 + n > ss[axis] || dst_r0 + n > ds[axis] {
        return Err(Error::Shape {
            tensor: "dst".into(),
            expected: format!(
                "the shape of src {} but dimension {axis}, rows {dst_r0}..{}",
                shape_str(ss),
                dst_r0 + n
            ),
            found: shape_str(ds),
        });
    }
    let (sd, dd) = (src.dtype(), dst.dtype());
    if !(sd == dd || sd == DType::F32 || dd == DType::F32) {
        return Err(Error::DType {
            tensor: "dst".into(),
            expected: format!("{sd} or f32"),
            found: dd.to_string(),
        });
    }
    let outer: usize = ss[..axis].iter().product();
    let inner: usize = ss[axis + 1..].iter().product();
    let len = outer * n * inner;
    if len == 0 {
        return Ok(());
    }
    // The kernel's F is the non-f32 side (or f32 when both are).
    let (src_f32, dst_f32) = (
        sd == DType::F32 && dd != DType::F32,
        dd == DType::F32 && sd != DType::F32,
    );
    let f = if src_f32 { dd } else { sd };
    let client = src.client();
    let ph_f = Tensor::empty(client, f, &[1])?;
    let ph_32 = Tensor::empty(client, DType::F32, &[1])?;
    let (s, s32) = if src_f32 { (&ph_f, src) } else { (src, &ph_32) };
    let (d, d32) = if dst_f32 { (&ph_f, dst) } else { (dst, &ph_32) };
    CopyRowsKernel::tuned(
        client,
        0.0,
        &CopyRowsKernelArgs {
            src: s,
            src32: s32,
            dst: d,
            dst32: d32,
            len: len as u32,
            rows: n as u32,
            inner: inner as u32,
            src_rows: ss[axis] as u32,
            dst_rows: ds[axis] as u32,
            src_r0: src_r0 as u32,
            dst_r0: dst_r0 as u32,
            src_f32,
            dst_f32,
        },
    )?;
    Ok(())
}

/// `dst[o][dst_r0 + r][i] = src[o][src_r0 + r][i]` for `r < rows`, one element per unit
/// (grid-stride), read from `src` (F) or `src32` and written to `dst` or `dst32`.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, inner = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS,
    name = "copy_rows",
    defaults(src_f32 = false, dst_f32 = false)
)]
fn copy_rows_kernel<F: Float>(
    src: &Array<F>,
    src32: &Array<f32>,
    dst: &mut Array<F>,
    dst32: &mut Array<f32>,
    len: u32,
    rows: u32,
    inner: u32,
    src_rows: u32,
    dst_rows: u32,
    src_r0: u32,
    dst_r0: u32,
    #[comptime] src_f32: bool,
    #[comptime] dst_f32: bool,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut e = linear_unit() as u32;
    while e < len {
        let i = e % inner;
        let r = (e / inner) % rows;
        let o = e / (inner * rows);
        let si = ((o * src_rows + src_r0 + r) * inner + i) as usize;
        let di = ((o * dst_rows + dst_r0 + r) * inner + i) as usize;
        let x = if comptime!(src_f32) {
            src32[si]
        } else {
            f32::cast_from(src[si])
        };
        if comptime!(dst_f32) {
            dst32[di] = x;
        } else {
            dst[di] = F::cast_from(x);
        }
        e = kiln_dsl::grid_stride_next(e, stride, len);
    }
}
