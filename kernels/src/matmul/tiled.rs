//! The register tile the FMA `matmul` kernels share (`staged`, `direct`), and the
//! pieces every `matmul` kernel shares: the fused epilogue and clamped strided indices.
//!
//! One cube computes a `BM x BN` tile of `c`; each of its `(BM/TM)(BN/TN)` units keeps
//! a `TM x TN` register tile of f32 accumulators, its rows `ty + i BM/TM` and columns
//! `tx + j BN/TN` strided across units (neighbouring units touch neighbouring
//! addresses). Four main loops ([`MainLoop`]), one kernel each (declared by
//! `fma_kernel!`), share the signature, the tile origin, the accumulators and the
//! epilogue ([`fma_matmul`], [`store_tile`]):
//! - `matmul_staged`: `BK`-deep K slices of `a` (k-major) and `b` staged in shared
//!   memory, zero-filled past the edges (the GPU path); `VEC` consecutive elements per
//!   staging step.
//! - `matmul_staged_v4`: the same with b's slice and the accumulators as 4-wide vectors.
//! - `matmul_direct`: every unit reads its fragments from global memory, rows and
//!   columns past the edge clamped (no shared memory, no barriers: CPU adapters).
//! - `matmul_direct_v4`: the same with 4-wide vector accumulators.

use super::direct::{direct_product, direct_v4_product};
use super::staged::{staged_product, staged_v4_product};
use super::Activation;
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, silu, V4};

/// The shape of a register tile: `bm x bn` of `c` per cube, `tm x tn` per unit
/// (comptime: one compiled kernel per shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct TileShape {
    pub bm: u32,
    pub bn: u32,
    pub tm: u32,
    pub tn: u32,
}

impl TileShape {
    /// A tile of `bm x bn` per cube, `tm x tn` per unit.
    pub fn new(bm: u32, bn: u32, tm: u32, tn: u32) -> Self {
        TileShape { bm, bn, tm, tn }
    }

    /// Units per cube, rows of units and columns of units.
    pub fn units(&self) -> (u32, u32, u32) {
        let (rows, cols) = (self.bm / self.tm, self.bn / self.tn);
        (rows * cols, rows, cols)
    }
}

/// What the epilogue fuses (comptime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Fused {
    pub has_bias: bool,
    pub has_residual: bool,
    pub act: Activation,
}

impl Fused {
    /// The epilogue of these flags.
    pub fn new(has_bias: bool, has_residual: bool, act: Activation) -> Self {
        Fused {
            has_bias,
            has_residual,
            act,
        }
    }
}

/// The main loop of a register-tiled FMA kernel (comptime; one kernel each, see the
/// module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum MainLoop {
    /// `matmul_staged`.
    Staged,
    /// `matmul_staged_v4`.
    StagedV4,
    /// `matmul_direct`.
    Direct,
    /// `matmul_direct_v4`.
    DirectV4,
}

/// What an FMA kernel's product is specialised on (comptime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FmaPlan {
    /// The main loop.
    pub main: MainLoop,
    /// The register tile.
    pub tile: TileShape,
    /// Depth of a staged K slice (unused by the direct loops).
    pub bk: u32,
    /// `b` is [N, K].
    pub trans_b: bool,
}

/// Where a unit's register tile sits: the problem (`m`, `n`, `k`), the cube's tile
/// origin (`row0`, `col0`) and the unit's place among the cube's units (`ty`, `tx`).
#[derive(CubeType, Clone, Copy)]
pub(super) struct UnitTile {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub row0: u32,
    pub col0: u32,
    pub ty: u32,
    pub tx: u32,
}

/// This unit's [`UnitTile`] in a grid of `bm x bn` tiles of an `m x n x k` product.
#[cube]
pub(super) fn unit_tile(m: u32, n: u32, k: u32, #[comptime] tile: TileShape) -> UnitTile {
    let (bm, bn, cols) = comptime!((tile.bm, tile.bn, tile.bn / tile.tn));
    UnitTile {
        m,
        n,
        k,
        row0: CUBE_POS_Y * bm,
        col0: CUBE_POS_X * bn,
        ty: UNIT_POS / cols,
        tx: UNIT_POS % cols,
    }
}

/// The body of every register-tiled FMA kernel: the unit's tile, the plan's main loop
/// into f32 accumulators, then the fused epilogue (`rows_loop`: see [`store_tile`]).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn fma_matmul<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    c: &mut Array<F>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] plan: FmaPlan,
    #[comptime] fused: Fused,
    #[comptime] rows_loop: bool,
) {
    let tile = comptime!(plan.tile);
    let unit = unit_tile(m, n, k, tile);
    let mut acc = Array::<f32>::new(comptime!((tile.tm * tile.tn) as usize));
    zero_tile(&mut acc, tile.tm * tile.tn);
    let main = comptime!(plan.main);
    if comptime!(main == MainLoop::Staged) {
        staged_product::<F>(a, b, &mut acc, &unit, plan);
    } else if comptime!(main == MainLoop::StagedV4) {
        staged_v4_product::<F>(a, b, &mut acc, &unit, plan);
    } else if comptime!(main == MainLoop::Direct) {
        direct_product::<F>(a, b, &mut acc, &unit, plan);
    } else {
        direct_v4_product::<F>(a, b, &mut acc, &unit, plan);
    }
    let vector_columns = comptime!(matches!(main, MainLoop::StagedV4 | MainLoop::DirectV4));
    store_tile::<F>(
        c,
        bias,
        residual,
        &mut acc,
        &unit,
        fused,
        tile,
        vector_columns,
        rows_loop,
    );
}

/// Sets `len` accumulators to zero.
#[cube]
pub(super) fn zero_tile(acc: &mut Array<f32>, #[comptime] len: u32) {
    #[unroll]
    for i in 0..len {
        acc[i as usize] = 0.0;
    }
}

/// `tm x tn/4` 4-wide accumulators set to zero.
#[cube]
pub(crate) fn zero_tile_v4(accv: &mut Array<Vector<f32, Const<4>>>, #[comptime] len: u32) {
    #[unroll]
    for e in 0..len {
        accv[e as usize] = Vector::new(0.0f32);
    }
}

/// 4-wide accumulators into the scalar layout the epilogue reads: column j of the unit
/// is lane `j % 4` of its group `j / 4`.
#[cube]
pub(super) fn tile_from_v4(
    accv: &Array<Vector<f32, Const<4>>>,
    acc: &mut Array<f32>,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
) {
    let tnv = comptime!(tn / 4);
    #[unroll]
    for i in 0..tm {
        #[unroll]
        for j in 0..tn {
            acc[(i * tn + j) as usize] = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
        }
    }
}

/// The epilogue of a register tile: element (i, j) of the unit's accumulators is row
/// `ty + i bm/tm` of the cube's tile and column `tx + j bn/tn`, or with
/// `vector_columns` column `4 (tx + (j / 4) bn/tn) + j % 4`; masked to `m x n`. With
/// `rows_loop` (a CPU adapter) a loop over the rows that consumes `acc` ([`shift_rows`]),
/// else unrolled (a GPU keeps the tile in registers; NVRTC spilled the loop's moves).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_tile<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    acc: &mut Array<f32>,
    unit: &UnitTile,
    #[comptime] fused: Fused,
    #[comptime] tile: TileShape,
    #[comptime] vector_columns: bool,
    #[comptime] rows_loop: bool,
) {
    let (tm, tn) = comptime!((tile.tm, tile.tn));
    let rows_of_units = comptime!(tile.bm / tile.tm);
    let r0 = unit.row0 + unit.ty;
    #[unroll(!rows_loop)]
    for i in 0..tm {
        store_tile_row::<F>(
            c,
            bias,
            residual,
            acc,
            row_first(i, tn, rows_loop),
            r0 + i * rows_of_units,
            unit,
            fused,
            tile,
            vector_columns,
        );
        if comptime!(rows_loop) {
            shift_rows(acc, tm, tn);
        }
    }
}

/// One row `r` of [`store_tile`], from `acc[first ..]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_tile_row<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    acc: &Array<f32>,
    first: u32,
    r: u32,
    unit: &UnitTile,
    #[comptime] fused: Fused,
    #[comptime] tile: TileShape,
    #[comptime] vector_columns: bool,
) {
    let tn = comptime!(tile.tn);
    let cols_of_units = comptime!(tile.bn / tile.tn);
    let (m, n, col0, tx) = (unit.m, unit.n, unit.col0, unit.tx);
    let (has_bias, has_residual, act) = comptime!((fused.has_bias, fused.has_residual, fused.act));
    #[unroll]
    for j in 0..tn {
        let mut col = col0 + tx + j * cols_of_units;
        if comptime!(vector_columns) {
            col = col0 + (tx + (j / 4) * cols_of_units) * 4 + j % 4;
        }
        if r < m && col < n {
            store_epilogue::<F>(
                c,
                bias,
                residual,
                acc[(first + j) as usize],
                r,
                col,
                n,
                has_bias,
                has_residual,
                act,
            );
        }
    }
}

/// Moves a `rows x width` register tile up one row (`acc[x] = acc[x + width]`, the last
/// row left as it was), so that a loop over the rows that is not unrolled can always
/// store row 0 with constant indices.
///
/// Why: llvmpipe turns every global load and store with a per-lane address into a
/// loop over the SIMD lanes, and LLVM 15's coroutine split (every llvmpipe compute
/// shader is a coroutine) is superlinear in basic blocks; a dynamic index into the
/// registers is worse (NIR lowers it to a ladder of branches). Unrolled, the stores of
/// a 32 x 32 vector tile with bias and residual were most of its blocks and most of its
/// compile time (perf: 57-76 % in `coro::buildCoroutineFrame`; 12-28 s -> 0.9-2.3 s
/// without LLVM's passes). The moves are registers, once per row.
#[cube]
pub(crate) fn shift_rows<T: CubePrimitive>(
    acc: &mut Array<T>,
    #[comptime] rows: u32,
    #[comptime] width: u32,
) {
    #[unroll]
    for x in 0..(rows - 1) * width {
        acc[x as usize] = acc[(x + width) as usize];
    }
}

/// Where row `i` of a `width`-wide register tile starts in an epilogue's loop over the
/// rows (`#[unroll(!rows_loop)]`): `i width` unrolled (a constant), 0 in a loop that
/// consumes the tile with [`shift_rows`].
#[cube]
pub(crate) fn row_first(i: u32, #[comptime] width: u32, #[comptime] rows_loop: bool) -> u32 {
    if comptime!(rows_loop) {
        u32::new(0)
    } else {
        i * width
    }
}

/// `idx[i] = min(first + i * step, last)` for `i < count`: a unit's strided rows or
/// columns, clamped to the last valid one (computed, never stored), so the main loops
/// of the direct kernels need no branch.
#[cube]
pub(crate) fn clamped_strided(
    idx: &mut Array<u32>,
    first: u32,
    step: u32,
    last: u32,
    #[comptime] count: u32,
) {
    #[unroll]
    for i in 0..count {
        idx[i as usize] = min(first + i * step, last);
    }
}

/// The fused epilogue of every `matmul` kernel for one element `v` (f32) of row `r`,
/// column `col`: `+ bias[col]`, the activation, `+ residual[r, col]`, then one rounding
/// to F into `c[r, col]`. The caller masks `r < m`, `col < n`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_epilogue<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    v: f32,
    r: u32,
    col: u32,
    n: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += f32::cast_from(bias[col as usize]);
    }
    v = activate(v, act);
    if comptime!(has_residual) {
        v += f32::cast_from(residual[(r * n + col) as usize]);
    }
    c[(r * n + col) as usize] = F::cast_from(v);
}

/// [`store_epilogue`] for four adjacent columns at once: `v` holds columns `4 cv ..
/// 4 cv + 3` of row `r`; `bias_v` is `bias`'s vector `cv` (read by the caller, once per
/// column vector of its tile), `nv` the row length in vectors. The caller masks
/// `r < m`, `cv < nv`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_epilogue_v4<F: Float>(
    c: &mut Array<Vector<F, Const<4>>>,
    residual: &Array<Vector<F, Const<4>>>,
    v: V4,
    bias_v: V4,
    r: u32,
    cv: u32,
    nv: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += bias_v;
    }
    v = activate_vector::<Const<4>>(v, act);
    if comptime!(has_residual) {
        v += V4::cast_from(residual[(r * nv + cv) as usize]);
    }
    c[(r * nv + cv) as usize] = Vector::<F, Const<4>>::cast_from(v);
}

/// The epilogue activation of one f32 value (comptime-selected; `None` is the identity).
#[cube]
pub(crate) fn activate(v: f32, #[comptime] act: Activation) -> f32 {
    activate_vector::<Const<1>>(Vector::new(v), act)[0]
}

/// [`activate`] on each lane of a vector of f32.
#[cube]
pub(crate) fn activate_vector<N: Size>(
    v: Vector<f32, N>,
    #[comptime] act: Activation,
) -> Vector<f32, N> {
    let mut v = v;
    if comptime!(act == Activation::Silu) {
        v = silu::<N>(v);
    }
    if comptime!(act == Activation::Gelu) {
        v = gelu_tanh::<N>(v);
    }
    if comptime!(act == Activation::Relu) {
        // A select, not `max(v, 0)`: CUDA's fmaxf returns the operand that is not NaN
        // (and WGSL leaves max with a NaN undefined), so NaN became 0; PyTorch's relu
        // keeps it.
        let zero = Vector::<f32, N>::new(0.0f32);
        v = select_many(v.less_than(zero), zero, v);
    }
    v
}
