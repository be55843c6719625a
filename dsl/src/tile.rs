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

/// `v` as lane `lane` of the plane holds it, a shuffle per component: with `lane` a
/// constant, a broadcast on a CPU adapter, where a load at a per-lane address is a loop
/// over the SIMD lanes. Every unit of the plane must call it.
#[cube]
pub fn plane_broadcast_v4(v: V4, lane: u32) -> V4 {
    let mut w = V4::new(0.0f32);
    #[unroll]
    for e in 0..4u32 {
        w[e as usize] = plane_shuffle(v[e as usize], lane);
    }
    w
}

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
/// `planes_m x planes_n` planes (32 units each, plane `UNIT_POS / 32`) owns
/// the `16 frags_m planes_m x 16 frags_n planes_n` tile of the output at (`row0`,
/// `col0`), and each plane accumulates a `16 frags_m x 16 frags_n` block of it as
/// `frags_m x frags_n` f32 fragments of 16 x 16. Operands are staged by the caller in
/// shared memory in the operand dtype, as scalars or as vectors of `width` elements
/// (every offset below is in elements; fragment rows start on a vector): X the cube's
/// row-major K slice (element (r, d) at `r x_stride + d`), Y either row-major
/// (element (d, c) at `d y_stride + c`) or, `y_col_major`, one row per output column
/// (element (d, c) at `c y_stride + d`: a `[N, K]` operand staged as it lies). Strides
/// are multiples of 8 elements (wmma's rule for 16-bit operands). Only for devices that
/// report tensor cores (`DeviceReport::tensor_cores`): elsewhere cubecl cannot run it
/// (on wgpu it would silently write nothing), and [`reg_tile_mma()`] is the path. All
/// units of the cube call every method.
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
    /// The accumulators, fragment (i, j) of the plane's block at `i frags_n + j`.
    acc: Sequence<cmma::Matrix<f32>>,
    #[cube(comptime)]
    frags_m: u32,
    #[cube(comptime)]
    frags_n: u32,
}

#[cube]
impl CmmaBlock {
    /// This plane's block of the cube at `CUBE_POS`, its accumulators zero.
    pub fn new(
        #[comptime] planes_m: u32,
        #[comptime] planes_n: u32,
        #[comptime] frags_m: u32,
        #[comptime] frags_n: u32,
    ) -> CmmaBlock {
        // The plane's index in a cube of (32, planes) units or of 32 planes units.
        let plane = UNIT_POS / 32;
        let mut acc = Sequence::<cmma::Matrix<f32>>::new();
        #[unroll]
        for _ in 0..comptime!((frags_m * frags_n) as usize) {
            acc.push(zero_accumulator());
        }
        CmmaBlock {
            row0: CUBE_POS_Y * comptime!(16 * frags_m * planes_m),
            col0: CUBE_POS_X * comptime!(16 * frags_n * planes_n),
            plane_row: plane / planes_n,
            plane_col: plane % planes_n,
            acc,
            frags_m,
            frags_n,
        }
    }

    /// The block += X Y over one staged K slice of `depth` (a multiple of 16), the
    /// operands laid out as the type's documentation says. The caller synchronises the
    /// cube between staging the slices and this call, and again before restaging them.
    #[allow(clippy::too_many_arguments)]
    pub fn mma<F: Float, V: CubePrimitive>(
        &self,
        xs: &SharedMemory<V>,
        #[comptime] x_stride: u32,
        ys: &SharedMemory<V>,
        #[comptime] y_stride: u32,
        #[comptime] y_col_major: bool,
        #[comptime] depth: u32,
        #[comptime] width: u32,
    ) {
        let frags_m = comptime!(self.frags_m);
        let frags_n = comptime!(self.frags_n);
        let y_layout = comptime!(if y_col_major {
            cmma::MatrixLayout::ColMajor
        } else {
            cmma::MatrixLayout::RowMajor
        });
        let x_row0 = self.plane_row * comptime!(16 * frags_m);
        let y_col0 = self.plane_col * comptime!(16 * frags_n);
        #[unroll]
        for kk in 0..comptime!(depth / 16) {
            let d0 = comptime!(kk * 16);
            let mut xf = Sequence::<cmma::Matrix<F>>::new();
            #[unroll]
            for i in 0..comptime!(frags_m as usize) {
                let base = (x_row0 + comptime!(i as u32 * 16)) * x_stride + d0;
                xf.push(operand_fragment::<F, V>(
                    xs,
                    base,
                    cmma::MatrixIdent::A,
                    cmma::MatrixLayout::RowMajor,
                    x_stride,
                    width,
                ));
            }
            #[unroll]
            for j in 0..comptime!(frags_n as usize) {
                let col = y_col0 + comptime!(j as u32 * 16);
                let mut base = d0 * y_stride + col;
                if comptime!(y_col_major) {
                    base = col * y_stride + d0;
                }
                let yf = operand_fragment::<F, V>(
                    ys,
                    base,
                    cmma::MatrixIdent::B,
                    y_layout,
                    y_stride,
                    width,
                );
                #[unroll]
                for i in 0..comptime!(frags_m as usize) {
                    let acc = self.acc.index(comptime!(i * frags_n as usize + j));
                    cmma::execute::<F, F, f32, f32>(xf.index(i), &yf, acc, acc);
                }
            }
        }
    }

    /// Stores the block at its place in `tile`, the cube's whole tile in f32 row-major
    /// with rows `stride` apart; the caller synchronises before reading it.
    pub fn store(&self, tile: &mut SharedMemory<f32>, #[comptime] stride: u32) {
        let frags_m = comptime!(self.frags_m);
        let frags_n = comptime!(self.frags_n);
        #[unroll]
        for i in 0..comptime!(frags_m as usize) {
            #[unroll]
            for j in 0..comptime!(frags_n as usize) {
                let (r, c) = self.fragment_origin(comptime!(i as u32), comptime!(j as u32));
                store_fragment(
                    tile,
                    r * stride + c,
                    self.acc.index(comptime!(i * frags_n as usize + j)),
                    stride,
                );
            }
        }
    }

    /// Stores fragment (`i`, `j`) of this plane's block into `scratch` at `base`, 16 x 16
    /// f32 row-major, and returns its origin in the cube's tile (row, column). For an
    /// epilogue that goes a fragment at a time through a plane's own 1 KiB: the caller
    /// calls `sync_plane()` before its units read the fragment, and again before the
    /// next fragment overwrites it.
    pub fn store_one(
        &self,
        scratch: &mut SharedMemory<f32>,
        base: u32,
        #[comptime] i: u32,
        #[comptime] j: u32,
    ) -> (u32, u32) {
        let frags_n = comptime!(self.frags_n);
        store_fragment(
            scratch,
            base,
            self.acc.index(comptime!((i * frags_n + j) as usize)),
            16u32,
        );
        self.fragment_origin(i, j)
    }

    /// Row and column in the cube's tile of fragment (`i`, `j`) of this plane's block.
    fn fragment_origin(&self, #[comptime] i: u32, #[comptime] j: u32) -> (u32, u32) {
        let frags_m = comptime!(self.frags_m);
        let frags_n = comptime!(self.frags_n);
        (
            self.plane_row * comptime!(16 * frags_m) + comptime!(16 * i),
            self.plane_col * comptime!(16 * frags_n) + comptime!(16 * j),
        )
    }
}

/// The 16 x 16 operand fragment of `smem` (scalars, or vectors of `width` elements)
/// whose first element is element `base`, rows (or, column-major, columns) `stride`
/// elements apart.
#[cube]
fn operand_fragment<F: Float, V: CubePrimitive>(
    smem: &SharedMemory<V>,
    base: u32,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] layout: cmma::MatrixLayout,
    #[comptime] stride: u32,
    #[comptime] width: u32,
) -> cmma::Matrix<F> {
    let fragment =
        unsafe { cmma::Matrix::<F>::uninitialized(ident, 16usize, 16usize, 16usize, layout) };
    let start = base / width;
    let end = (base + comptime!(15 * stride + 16 + width - 1)) / width;
    cmma::load(&fragment, &smem.slice(start as usize, end as usize), stride);
    fragment
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

/// Eight elements of an operand: 16 bytes in half precision, the widest global load and
/// the unit of the tensor-core tiles' staging ([`fetch_tile_v8()`], [`stage_tile_v8()`]).
pub type V8<F> = Vector<F, Const<8>>;

/// A unit's share of the `rows x cols` tile (`cols` a multiple of 8) whose element
/// (r, c) is element `c` of row `r` of `src`, a row-major matrix of 8-wide vectors with
/// rows `row_stride` vectors apart, from vector `src_base`: into registers (`regs`,
/// converted from `src`'s element type to `F` where they differ,
/// `ceil(rows cols / 8 / units)` vectors), zero where `r >= rows_valid` or
/// `c >= cols_valid` (row lengths are multiples of 8, so a vector is all in or all out).
/// Consecutive units read consecutive vectors of a row (coalesced). Loading into
/// registers first lets a K loop issue the next slice's loads before multiplying the
/// current one, then [`stage_tile_v8()`] them after the barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fetch_tile_v8<S: Float, F: Float>(
    regs: &mut Array<V8<F>>,
    src: &Array<V8<S>>,
    src_base: u32,
    row_stride: u32,
    rows_valid: u32,
    cols_valid: u32,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] units: u32,
) {
    let colv = comptime!(cols / 8);
    let total = comptime!(rows * cols / 8);
    #[unroll]
    for t in 0..comptime!(total.div_ceil(units)) {
        let v = UNIT_POS + comptime!(t * units);
        let r = v / colv;
        let cv = v % colv;
        let mut value = V8::<F>::new(F::cast_from(0.0f32));
        if v < total && r < rows_valid && cv * 8 < cols_valid {
            value = V8::<F>::cast_from(src[(src_base + r * row_stride + cv) as usize]);
        }
        regs[t as usize] = value;
    }
}

/// Writes a unit's share fetched by [`fetch_tile_v8()`] (the same `rows`, `cols`,
/// `units`) into `dst`: row-major, rows `cols + 8` elements apart (the 8 elements of
/// padding spread the rows over the shared-memory banks; the stride stays a multiple of
/// 8, wmma's rule). The caller synchronises before reading `dst`.
#[cube]
pub fn stage_tile_v8<F: Float>(
    dst: &mut SharedMemory<V8<F>>,
    regs: &Array<V8<F>>,
    #[comptime] rows: u32,
    #[comptime] cols: u32,
    #[comptime] units: u32,
) {
    let colv = comptime!(cols / 8);
    let total = comptime!(rows * cols / 8);
    #[unroll]
    for t in 0..comptime!(total.div_ceil(units)) {
        let v = UNIT_POS + comptime!(t * units);
        if v < total {
            dst[((v / colv) * comptime!(colv + 1) + v % colv) as usize] = regs[t as usize];
        }
    }
}

/// Four f32 lanes: the element of the vector tiles below. On a CPU adapter (lavapipe)
/// every shared or global access whose address differs between invocations costs a
/// loop over the SIMD lanes, so moving four values per access roughly halves the cost
/// of a register-tile product; on a GPU it is one 128-bit shared-memory access.
pub type V4 = Vector<f32, Const<4>>;

/// Lane `l` of `v` (`l` known only at run time), by selects: an indexed register read
/// would go through memory.
#[cube]
pub fn lane_of<T: Scalar, N: Size>(v: Vector<T, N>, l: u32) -> T {
    let mut word = v[0];
    #[unroll]
    for i in 1..N::value().comptime() as u32 {
        word = select(l == i, v[i as usize], word);
    }
    word
}

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
/// `per_accumulator` (pass a kernel's `local_scalars`: true on a CPU adapter) orders the
/// products accumulator by accumulator instead of depth by depth; the sums are the same.
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
    #[comptime] per_accumulator: bool,
) {
    reg_tile_mma_v4_rows(
        acc,
        xs,
        x_base,
        ys,
        y_base,
        ty,
        comptime!(rows / tm),
        tx,
        cols,
        depth,
        tm,
        tn,
        per_accumulator,
    );
}

/// [`reg_tile_mma_v4()`] with the unit's rows given outright: rows `first_row + i *
/// row_step` (`i < tm`) of `X`, whose rows are `depth / 4` vectors apart. With
/// `row_step = 1` a unit owns `tm` consecutive rows (kernels whose later phases pair
/// neighbouring rows).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn reg_tile_mma_v4_rows(
    acc: &mut Array<V4>,
    xs: &SharedMemory<V4>,
    x_base: u32,
    ys: &SharedMemory<V4>,
    y_base: u32,
    first_row: u32,
    #[comptime] row_step: u32,
    tx: u32,
    #[comptime] cols: u32,
    #[comptime] depth: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] per_accumulator: bool,
) {
    let colv = comptime!(cols / 4);
    let tnv = comptime!(tn / 4);
    let colv_step = comptime!(cols / tn);
    let depth4 = comptime!(depth / 4);
    let mut xv = Array::<V4>::new(comptime!(tm as usize));
    // The depth loop stays rolled (compile time on CPU drivers, as in reg_tile_mma).
    for d4 in 0..depth4 {
        #[unroll]
        for i in 0..tm {
            xv[i as usize] = xs[(x_base + (first_row + i * row_step) * depth4 + d4) as usize];
        }
        if comptime!(per_accumulator) {
            // Column vector by column vector, each accumulator through its four depths
            // in a row (in depth order, so the same sums): a CPU driver that keeps the
            // accumulators in memory loads and stores each once per four products, not
            // once per product (llvmpipe: the same order halved `matmul_vec4`'s time on a
            // 2-core Intel Xeon). On a GPU the four `y` vectors held at once cost
            // registers (NVRTC spilled in attention's backward), so GPUs keep depth-major.
            #[unroll]
            for jv in 0..tnv {
                let mut yq = Array::<V4>::new(4usize);
                #[unroll]
                for e in 0..4u32 {
                    yq[e as usize] =
                        ys[(y_base + (d4 * 4 + e) * colv + tx + jv * colv_step) as usize];
                }
                #[unroll]
                for i in 0..tm {
                    let a = (i * tnv + jv) as usize;
                    let p = xv[i as usize];
                    let mut s = acc[a];
                    #[unroll]
                    for e in 0..4u32 {
                        s += V4::new(p[e as usize]) * yq[e as usize];
                    }
                    acc[a] = s;
                }
            }
        } else {
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
/// and `xs`/`yt` may be rewritten right after. `per_accumulator` as for
/// [`reg_tile_mma_v4()`].
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
    #[comptime] per_accumulator: bool,
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
        reg_tile_mma_v4(
            acc,
            xs,
            0,
            yt,
            0,
            ty,
            tx,
            rows,
            cols,
            bd,
            tm,
            tn,
            per_accumulator,
        );
        sync_cube();
        d0 += bd;
    }
}
