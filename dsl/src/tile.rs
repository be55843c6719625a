//! Tile building blocks: cooperative, bounds-masked tile loads into shared memory and
//! register tiles multiplied from shared memory (the scalar-FMA `mma` path, which runs
//! on every target; lavapipe has no tensor cores).
//!
//! Conventions. A shared tile is f32 whatever the global dtype (accumulation and
//! intermediate scores stay in f32). An operand of a product is stored *depth-major*:
//! element (row `r`, depth `d`) of an `rows`-row operand at `base + d * rows + r`, so
//! that the units of a cube read neighbouring rows at one depth (contiguous SIMD loads
//! on a CPU adapter, no bank conflicts on a GPU).

use cubecl::prelude::*;

/// Loads the `rows x cols` tile whose element (r, c) is
/// `src[src_base + r * row_stride + c]` into `dst` as f32, writing zero where
/// `r >= rows_valid` or `c >= cols_valid` (so products over a ragged edge need no
/// branches). Stored row-major (`dst_base + r * cols + c`) or, with `depth_major`,
/// transposed (`dst_base + c * rows + r`: the layout of a left operand whose depth is
/// `c`). All `units` units of the cube call it; consecutive units read consecutive
/// columns (coalesced). The caller synchronises before reading `dst`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_tile<F: Float>(
    dst: &mut SharedMemory<f32>,
    dst_base: u32,
    src: &Array<F>,
    src_base: u32,
    row_stride: u32,
    rows_valid: u32,
    cols_valid: u32,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] depth_major: bool,
    #[comptime] units: u32,
) {
    let mut idx = UNIT_POS;
    while idx < comptime!(rows * cols) {
        let r = idx / cols;
        let c = idx % cols;
        let mut value = 0.0f32;
        if r < rows_valid && c < cols_valid {
            value = f32::cast_from(src[(src_base + r * row_stride + c) as usize]);
        }
        if comptime!(depth_major) {
            dst[(dst_base + c * rows + r) as usize] = value;
        } else {
            dst[(dst_base + idx) as usize] = value;
        }
        idx += units;
    }
}

/// `acc += X Y` over `depth` for one unit's `tm x tn` register tile, the scalar-FMA
/// `mma`, in any numeric type (f32 for float GEMMs, i32 for int8 ones). `X` is a depth-major `rows`-row operand at `x_base` of `xs` and `Y` a
/// row-major operand with `cols` columns at `y_base` of `ys` (element (d, c) at
/// `y_base + d * cols + c`). The unit owns rows `ty + i * rows / tm` and columns
/// `tx + j * cols / tn`: strided, so neighbouring units touch neighbouring addresses.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn reg_tile_mma<N: Numeric>(
    acc: &mut Array<N>,
    xs: &SharedMemory<N>,
    x_base: u32,
    ys: &SharedMemory<N>,
    y_base: u32,
    ty: u32,
    tx: u32,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] depth: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
) {
    let row_step = comptime!(rows / tm);
    let col_step = comptime!(cols / tn);
    let mut xf = Array::<N>::new(comptime!(tm as usize));
    let mut yf = Array::<N>::new(comptime!(tn as usize));
    // Not unrolled over depth: a 64-deep unrolled 8x8 tile is thousands of
    // instructions, and CPU drivers (llvmpipe) compile each tuning candidate.
    for d in 0..depth {
        #[unroll]
        for i in 0..tm {
            xf[i as usize] = xs[(x_base + d * rows + ty + i * row_step) as usize];
        }
        #[unroll]
        for j in 0..tn {
            yf[j as usize] = ys[(y_base + d * cols + tx + j * col_step) as usize];
        }
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[(i * tn + j) as usize] += xf[i as usize] * yf[j as usize];
            }
        }
    }
}

/// The tensor-core `mma` (cmma; CUDA `wmma`), for one plane of 32 units: the 2 x 2
/// f32 accumulator fragments `c00 c01 / c10 c11` (a 32 x 32 block) += X Y, with X a
/// 32 x 16 row-major operand at `x_base` of `xs` (row stride 16) and Y a 16 x 32
/// row-major operand at `y_base` of `ys` (row stride `y_stride`), both in the operand
/// dtype. Only for devices that report tensor cores (`DeviceReport::tensor_cores`):
/// elsewhere cubecl cannot run it (on wgpu it would silently write nothing), and
/// [`reg_tile_mma`] is the path. All 32 units of the plane call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn cmma_mma_32x32<F: Float>(
    c00: &cmma::Matrix<f32>,
    c01: &cmma::Matrix<f32>,
    c10: &cmma::Matrix<f32>,
    c11: &cmma::Matrix<f32>,
    xs: &SharedMemory<F>,
    x_base: u32,
    ys: &SharedMemory<F>,
    y_base: u32,
    y_stride: u32,
) {
    let x0 = cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &xs.slice(x_base as usize, (x_base + 256) as usize),
        16u32,
    );
    let x1 = cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &xs.slice((x_base + 256) as usize, (x_base + 512) as usize),
        16u32,
    );
    let y0 = cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::B,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &ys.slice(y_base as usize, (y_base + 15 * y_stride + 16) as usize),
        y_stride,
    );
    let y1 = cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::B,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &ys.slice(
            (y_base + 16) as usize,
            (y_base + 15 * y_stride + 32) as usize,
        ),
        y_stride,
    );
    cmma::execute::<F, F, f32, f32>(&x0, &y0, c00, c00);
    cmma::execute::<F, F, f32, f32>(&x0, &y1, c01, c01);
    cmma::execute::<F, F, f32, f32>(&x1, &y0, c10, c10);
    cmma::execute::<F, F, f32, f32>(&x1, &y1, c11, c11);
}

/// A 16 x 16 f32 accumulator fragment of zeros, for [`cmma_mma_32x32`].
#[cube]
pub fn cmma_zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    )
}
