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
    load_tile_as::<F, f32>(
        dst,
        dst_base,
        src,
        src_base,
        row_stride,
        rows_valid,
        cols_valid,
        rows,
        cols,
        depth_major,
        units,
    );
}

/// [`load_tile()`] into shared memory of any float type `T` (the operand dtype itself for
/// tensor-core fragments).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_tile_as<F: Float, T: Float>(
    dst: &mut SharedMemory<T>,
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
        let mut value = T::cast_from(0.0f32);
        if r < rows_valid && c < cols_valid {
            value = T::cast_from(src[(src_base + r * row_stride + c) as usize]);
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

/// One plane's share of a tensor-core tile (cmma; CUDA `wmma`): a cube of
/// `planes_m x planes_n` planes (32 units each, the plane index in `UNIT_POS_Y`) owns
/// the `32 planes_m x 32 planes_n` tile of the output at (`row0`, `col0`), and each
/// plane accumulates a 32 x 32 block of it as 2 x 2 f32 fragments of 16 x 16
/// (`c00 c01 / c10 c11`). Operands are staged by the caller in shared memory in the
/// operand dtype: X the cube's `[32 planes_m][16]` row-major K slice, Y the
/// `[16][32 planes_n]` one. Only for devices that report tensor cores
/// (`DeviceReport::tensor_cores`): elsewhere cubecl cannot run it (on wgpu it would
/// silently write nothing), and [`reg_tile_mma()`] is the path. All units of the cube
/// call every method.
#[derive(CubeType)]
pub struct CmmaBlock {
    /// Output row of the cube's tile's first row.
    pub row0: u32,
    /// Output column of the cube's tile's first column.
    pub col0: u32,
    /// This plane's row of blocks in the cube's tile (`0..planes_m`).
    plane_row: u32,
    /// This plane's column of blocks in the cube's tile (`0..planes_n`).
    plane_col: u32,
    c00: cmma::Matrix<f32>,
    c01: cmma::Matrix<f32>,
    c10: cmma::Matrix<f32>,
    c11: cmma::Matrix<f32>,
    #[cube(comptime)]
    planes_n: u32,
}

#[cube]
impl CmmaBlock {
    /// This plane's block of the cube at `CUBE_POS`, its accumulators zero.
    pub fn new(#[comptime] planes_m: u32, #[comptime] planes_n: u32) -> CmmaBlock {
        let plane = UNIT_POS_Y;
        CmmaBlock {
            row0: CUBE_POS_Y * comptime!(32 * planes_m),
            col0: CUBE_POS_X * comptime!(32 * planes_n),
            plane_row: plane / planes_n,
            plane_col: plane % planes_n,
            c00: zero_accumulator(),
            c01: zero_accumulator(),
            c10: zero_accumulator(),
            c11: zero_accumulator(),
            planes_n,
        }
    }

    /// The block += X Y over one K slice of 16: X `xs` `[32 planes_m][16]`, Y `ys`
    /// `[16][32 planes_n]`, both row-major. The caller synchronises the cube between
    /// staging the slices and this call, and again before restaging them.
    pub fn mma<F: Float>(&self, xs: &SharedMemory<F>, ys: &SharedMemory<F>) {
        let y_stride = comptime!(32 * self.planes_n);
        let x_base = self.plane_row * 512;
        let y_base = self.plane_col * 32;
        let x0 = operand_fragment::<F>(xs, x_base, cmma::MatrixIdent::A, 16u32);
        let x1 = operand_fragment::<F>(xs, x_base + 256, cmma::MatrixIdent::A, 16u32);
        let y0 = operand_fragment::<F>(ys, y_base, cmma::MatrixIdent::B, y_stride);
        let y1 = operand_fragment::<F>(ys, y_base + 16, cmma::MatrixIdent::B, y_stride);
        cmma::execute::<F, F, f32, f32>(&x0, &y0, &self.c00, &self.c00);
        cmma::execute::<F, F, f32, f32>(&x0, &y1, &self.c01, &self.c01);
        cmma::execute::<F, F, f32, f32>(&x1, &y0, &self.c10, &self.c10);
        cmma::execute::<F, F, f32, f32>(&x1, &y1, &self.c11, &self.c11);
    }

    /// Stores the block at its place in `tile`, the cube's whole tile in f32 row-major
    /// `[32 planes_m][32 planes_n]`; the caller synchronises before reading it.
    pub fn store(&self, tile: &mut SharedMemory<f32>) {
        let stride = comptime!(32 * self.planes_n);
        let base = self.plane_row * 32 * stride + self.plane_col * 32;
        store_fragment(tile, base, &self.c00, stride);
        store_fragment(tile, base + 16, &self.c01, stride);
        store_fragment(tile, base + 16 * stride, &self.c10, stride);
        store_fragment(tile, base + 16 * stride + 16, &self.c11, stride);
    }
}

/// The 16 x 16 row-major operand fragment of `smem` whose first element is at `base`,
/// rows `stride` apart.
#[cube]
fn operand_fragment<F: Float>(
    smem: &SharedMemory<F>,
    base: u32,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] stride: u32,
) -> cmma::Matrix<F> {
    cmma::Matrix::<F>::from_slice(
        ident,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &smem.slice(base as usize, (base + 15 * stride + 16) as usize),
        stride,
    )
}

/// Stores the 16 x 16 fragment `c` row-major into `tile` at `base`, rows `stride` apart.
#[cube]
fn store_fragment(
    tile: &mut SharedMemory<f32>,
    base: u32,
    c: &cmma::Matrix<f32>,
    #[comptime] stride: u32,
) {
    cmma::store(
        &mut tile.slice_mut(base as usize, (base + 15 * stride + 16) as usize),
        c,
        stride,
        cmma::MatrixLayout::RowMajor,
    );
}

/// A 16 x 16 f32 accumulator fragment of zeros.
#[cube]
fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    )
}

/// Four f32 lanes: the element of the vector tiles below. On a CPU adapter (lavapipe)
/// every shared or global access whose address differs between invocations costs a
/// loop over the SIMD lanes, so moving four values per access roughly halves the cost
/// of a register-tile product; on a GPU it is one 128-bit shared-memory access.
pub type V4 = Vector<f32, Const<4>>;

/// Loads the `rows x cols` tile whose element (r, c) is
/// `src[src_base + r * row_stride + c * col_stride]` into `dst` as f32 vectors of four
/// consecutive columns: element (r, c) lands in lane `c % 4` of
/// `dst[dst_base + r * cols / 4 + c / 4]`, zero where `r >= rows_valid` or
/// `c >= cols_valid`. A unit stages whole vectors; consecutive units take consecutive
/// vectors of a row. `cols` is a multiple of 4. The caller synchronises before reading.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_tile_v4<F: Float>(
    dst: &mut SharedMemory<V4>,
    dst_base: u32,
    src: &Array<F>,
    src_base: u32,
    row_stride: u32,
    col_stride: u32,
    rows_valid: u32,
    cols_valid: u32,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] units: u32,
) {
    let colv = comptime!(cols / 4);
    let mut idx = UNIT_POS;
    while idx < comptime!(rows * cols / 4) {
        let r = idx / colv;
        let c0 = (idx % colv) * 4;
        let mut v = V4::empty();
        #[unroll]
        for e in 0..4u32 {
            let c = c0 + e;
            let mut value = 0.0f32;
            if r < rows_valid && c < cols_valid {
                value = f32::cast_from(src[(src_base + r * row_stride + c * col_stride) as usize]);
            }
            v[e as usize] = value;
        }
        dst[(dst_base + idx) as usize] = v;
        idx += units;
    }
}

/// `acc += X Y` over `depth` for one unit's `tm x tn` register tile held as `tm x tn / 4`
/// vectors ([`V4`]), both operands in vector tiles as [`load_tile_v4()`] writes them:
/// `X` with `rows` rows and the depth along its vectors (element (r, d) in lane `d % 4`
/// of `xs[x_base + r * depth / 4 + d / 4]`), `Y` with `depth` rows and `cols` columns
/// along its vectors (element (d, c) in lane `c % 4` of `ys[y_base + d * cols / 4 + c / 4]`).
/// The unit owns rows `ty + i * rows / tm` and the column vectors
/// `tx + jv * cols / tn` (`jv < tn / 4`; see [`v4_tile_col()`]). Per four depths: `tm + tn`
/// vector loads and `tm x tn` FMAs (4-wide). `depth`, `cols` and `tn` are multiples of 4.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn reg_tile_mma_v4(
    acc: &mut Array<V4>,
    xs: &SharedMemory<V4>,
    x_base: u32,
    ys: &SharedMemory<V4>,
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
    let colv = comptime!(cols / 4);
    let tnv = comptime!(tn / 4);
    let colv_step = comptime!(cols / tn);
    let depth4 = comptime!(depth / 4);
    let mut xv = Array::<V4>::new(comptime!(tm as usize));
    // The depth loop stays rolled (compile time on CPU drivers, as in reg_tile_mma).
    for d4 in 0..depth4 {
        #[unroll]
        for i in 0..tm {
            xv[i as usize] = xs[(x_base + (ty + i * row_step) * depth4 + d4) as usize];
        }
        #[unroll]
        for e in 0..4u32 {
            #[unroll]
            for jv in 0..tnv {
                let yv = ys[(y_base + (d4 * 4 + e) * colv + tx + jv * colv_step) as usize];
                #[unroll]
                for i in 0..tm {
                    let a = (i * tnv + jv) as usize;
                    acc[a] += V4::new(xv[i as usize][e as usize]) * yv;
                }
            }
        }
    }
}

/// The column (within the tile) of element `j < tn` of a unit's row in a
/// [`reg_tile_mma_v4()`] tile: lane `j % 4` of column vector `tx + (j / 4) * cols / tn`.
/// The value itself is `acc[i * tn / 4 + j / 4][j % 4]`.
#[cube]
pub fn v4_tile_col(tx: u32, #[comptime] j: u32, #[comptime] cols: u32, #[comptime] tn: u32) -> u32 {
    (tx + comptime!(j / 4) * comptime!(cols / tn)) * 4 + comptime!(j % 4)
}

/// `acc += X Y` over `depth` for one unit's `tm x tn` register tile, with both operands
/// stored depth-major with 4-wide vectors along their rows and columns: element (r, d)
/// of X in lane `r % 4` of `xs[x_base + d * rows / 4 + r / 4]`, element (d, c) of Y in
/// lane `c % 4` of `ys[y_base + d * cols / 4 + c / 4]` (the layout of a `[time][feature]`
/// tile staged as it lies in memory, as in `k^T v`). The unit owns the row vectors
/// `ty + iv * rows / tm` and the column vectors `tx + jv * cols / tn`; its element
/// (i, j) is lane `j % 4` of `acc[i * tn / 4 + j / 4]`, row `(ty + (i / 4) * rows / tm) * 4
/// + i % 4` (see [`v4_tile_col()`] for both). Per depth: `(tm + tn) / 4` vector loads and
/// `tm x tn` FMAs (4-wide). `rows`, `cols`, `tm` and `tn` are multiples of 4.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn reg_tile_mma_v4_outer(
    acc: &mut Array<V4>,
    xs: &SharedMemory<V4>,
    x_base: u32,
    ys: &SharedMemory<V4>,
    y_base: u32,
    ty: u32,
    tx: u32,
    #[comptime] depth: u32,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
) {
    let rowsv = comptime!(rows / 4);
    let colsv = comptime!(cols / 4);
    let tmv = comptime!(tm / 4);
    let tnv = comptime!(tn / 4);
    let rowv_step = comptime!(rows / tm);
    let colv_step = comptime!(cols / tn);
    let mut xv = Array::<V4>::new(comptime!(tmv as usize));
    let mut yv = Array::<V4>::new(comptime!(tnv as usize));
    for d in 0..depth {
        #[unroll]
        for iv in 0..tmv {
            xv[iv as usize] = xs[(x_base + d * rowsv + ty + iv * rowv_step) as usize];
        }
        #[unroll]
        for jv in 0..tnv {
            yv[jv as usize] = ys[(y_base + d * colsv + tx + jv * colv_step) as usize];
        }
        #[unroll]
        for iv in 0..tmv {
            #[unroll]
            for e in 0..4u32 {
                let x = V4::new(xv[iv as usize][e as usize]);
                #[unroll]
                for jv in 0..tnv {
                    let a = ((iv * 4 + e) * tnv + jv) as usize;
                    acc[a] += x * yv[jv as usize];
                }
            }
        }
    }
}

/// `acc = X Y^T` for one unit's `tm x tn` register tile (the layout of
/// [`reg_tile_mma_v4()`]), with X (`rows x depth`) and Y (`cols x depth`) read straight
/// from global memory, both row-major: row `r` of X at `x[x_base + r * x_stride ..]`,
/// rows `>= x_rows` (and of Y, `>= y_rows`) read as 0. The depth is walked in chunks
/// of `bd`, staged as X `[r][d / 4]` in `xs` (`rows * bd / 4` vectors) and Y transposed
/// as `[d][c / 4]` in `yt` (`bd * cols / 4`). The attention scores `Q K^T` and their
/// gradients `dO V^T` are this product. Contains the barriers of its staging: every
/// unit of the cube must call it; the caller needs no barrier before reading `acc`,
/// and `xs`/`yt` may be rewritten right after.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn tile_product_nt<F: Float>(
    acc: &mut Array<V4>,
    xs: &mut SharedMemory<V4>,
    yt: &mut SharedMemory<V4>,
    x: &Array<F>,
    x_base: u32,
    x_stride: u32,
    x_rows: u32,
    y: &Array<F>,
    y_base: u32,
    y_stride: u32,
    y_rows: u32,
    depth: u32,
    ty: u32,
    tx: u32,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] bd: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] units: u32,
) {
    #[unroll]
    for e in 0..tm * tn / 4 {
        acc[e as usize] = V4::new(0.0f32);
    }
    let mut d0 = 0u32;
    while d0 < depth {
        let valid = min(depth - d0, bd);
        load_tile_v4::<F>(
            xs,
            0,
            x,
            x_base + d0,
            x_stride,
            1,
            x_rows,
            valid,
            rows,
            bd,
            units,
        );
        load_tile_v4::<F>(
            yt,
            0,
            y,
            y_base + d0,
            1,
            y_stride,
            valid,
            y_rows,
            bd,
            cols,
            units,
        );
        sync_cube();
        reg_tile_mma_v4(acc, xs, 0, yt, 0, ty, tx, rows, cols, bd, tm, tn);
        sync_cube();
        d0 += bd;
    }
}
