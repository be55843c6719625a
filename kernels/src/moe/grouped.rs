//! The grouped GEMM kernels of the expert FFN: one launch over every expert, a tile
//! never straddling two experts (`grouped_kernel!` declares their shared signature).

use super::routing::NO_ROUTE;
use crate::matmul::{
    activate, activate_vector, clamped_strided, row_first, shift_rows, zero_tile_v4, Activation,
};
use crate::matmul::{cmma_product, dot_k_quad, fma_k_quad, load_v4, pack_v4, plane_rows};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, v4_tile_col, CmmaBlock, V4};

/// Declares a grouped GEMM kernel: the left operand `a` (or `a32` with `a_f32`) holds
/// every expert's rows, expert `e`'s `row_count[e]` rows from `row_start[e]`; `b`
/// `[E, K, N]` (or `[E, N, K]` with `trans_b`) as `Array<$operand>`; `bias` `[E, N]`;
/// `slot_route` and `gates` for the scatter epilogue; the result in `c` (or `c32` with
/// `c_f32`), `bias`, `c` and `c32` as `Array<$out>` / `Array<$out32>`; `n`, `k`, `experts`, `max_rows` (the most rows of any expert); the
/// epilogue's comptime switches, then the kernel's own. One cube per (column tile, row
/// tile, expert), keyed by the shape's power-of-two buckets and the dtype. The caller
/// gives the tunables, requirements, defaults and the body.
macro_rules! grouped_kernel {
    // A register-tiled kernel: `BM x BN` per cube, `TM x TN` per unit.
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident<$($rest:tt)*
    ) => {
        grouped_kernel! {
            @tiles(BM, BN; (BM / TM) * (BN / TN))
            $(#[doc = $doc])*
            #[kernel($($attr)*)]
            $name<$($rest)*
        }
    };
    // Any other tiling: the tile's rows and columns and the cube's shape, as expressions
    // of the tunables.
    (
        @tiles($bm:expr, $bn:expr; $($cube:tt)*)
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident<
            [$($operand:tt)*], [$($operand32:tt)*], [$($out:tt)*], [$($out32:tt)*]
        >($($flags:tt)*)
        $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(
            key(max_rows = pow2, n = pow2, k = pow2, experts = pow2, dtype),
            grid = (n.div_ceil($bn), max_rows.div_ceil($bm), experts),
            cube = $($cube)*,
            $($attr)*
        )]
        pub fn $name<F: Float>(
            a: &Array<$($operand)*>,
            a32: &Array<$($operand32)*>,
            b: &Array<$($operand)*>,
            bias: &Array<$($out)*>,
            row_start: &Array<u32>,
            row_count: &Array<u32>,
            slot_route: &Array<u32>,
            gates: &Array<f32>,
            c: &mut Array<$($out)*>,
            c32: &mut Array<$($out32)*>,
            n: u32,
            k: u32,
            experts: u32,
            max_rows: u32,
            #[comptime] has_bias: bool,
            #[comptime] act: Activation,
            #[comptime] scatter: bool,
            #[comptime] a_f32: bool,
            #[comptime] c_f32: bool,
            $($flags)*
        ) $body
    };
}

grouped_kernel! {
    /// One cube per (column tile, row tile, expert): a `BM x BN` tile of expert `e`'s rows
    /// `row_start[e] + CUBE_POS_Y BM ..` (tiles are cut per expert, so none straddles two
    /// and cubes past an expert's last row return at once), K staged through shared memory
    /// as 4-wide vectors (zero past the edges), f32 accumulators in registers. Epilogue:
    /// `+ bias[e]`, the activation, then a plain store (to f32 with `c_f32`: a half
    /// model's hidden activations), or with `scatter` the row's gate times the value into
    /// the row of the route that fills it. `a_f32` reads the left operand from `a32`.
    #[kernel(
        tune((BM, BN, BK, TM, TN) = [
            (32, 64, 16, 4, 8),
            (64, 64, 16, 4, 8),
            (64, 64, 32, 8, 8),
            (16, 64, 16, 2, 8),
            (64, 128, 16, 8, 8),
        ]),
        require(
            BM % TM == 0,
            BN % TN == 0,
            TN % 4 == 0,
            BK % 4 == 0,
            (((BM + BN) * BK * 4) as usize) <= device.max_shared_memory,
        ),
        defaults(
            trans_b = false,
            has_bias = false,
            act = none,
            scatter = false,
            a_f32 = false,
            c_f32 = false,
        ),
    )]
    moe_grouped_matmul<[F], [f32], [F], [f32]>(#[comptime] trans_b: bool) {
        let e = CUBE_POS_Z;
        let count = row_count[e as usize];
        let tile_row = CUBE_POS_Y * BM;
        // Uniform per cube: a cube past its expert's rows skips the barriers together.
        if tile_row < count {
            let units = comptime!((BM / TM) * (BN / TN));
            let cols_of_units = comptime!(BN / TN);
            let row0 = row_start[e as usize] + tile_row;
            let rows_valid = count - tile_row;
            let col0 = CUBE_POS_X * BN;
            let cols_valid = n - col0;
            let (ty, tx) = (UNIT_POS / cols_of_units, UNIT_POS % cols_of_units);
            let mut acc = Array::<V4>::new(comptime!((TM * TN / 4) as usize));
            zero_tile_v4(&mut acc, TM * TN / 4);
            let mut xs = SharedMemory::<V4>::new(comptime!((BM * BK / 4) as usize));
            let mut ys = SharedMemory::<V4>::new(comptime!((BK * BN / 4) as usize));
            let b_base = e * k * n;
            let mut k0 = 0u32;
            while k0 < k {
                let depth = k - k0;
                // a: (row r, depth d) at a[(row0 + r) K + k0 + d].
                if comptime!(a_f32) {
                    load_tile_v4::<f32>(
                        &mut xs,
                        0,
                        a32,
                        row0 * k + k0,
                        k,
                        1,
                        rows_valid,
                        depth,
                        BM,
                        BK,
                        units,
                    );
                } else {
                    load_tile_v4::<F>(
                        &mut xs,
                        0,
                        a,
                        row0 * k + k0,
                        k,
                        1,
                        rows_valid,
                        depth,
                        BM,
                        BK,
                        units,
                    );
                }
                if comptime!(trans_b) {
                    // b[e] is [N, K]: (depth d, column c) at (col0 + c) K + k0 + d.
                    load_tile_v4::<F>(
                        &mut ys,
                        0,
                        b,
                        b_base + col0 * k + k0,
                        1,
                        k,
                        depth,
                        cols_valid,
                        BK,
                        BN,
                        units,
                    );
                } else {
                    load_tile_v4::<F>(
                        &mut ys,
                        0,
                        b,
                        b_base + k0 * n + col0,
                        n,
                        1,
                        depth,
                        cols_valid,
                        BK,
                        BN,
                        units,
                    );
                }
                sync_cube();
                reg_tile_mma_v4(&mut acc, &xs, 0, &ys, 0, ty, tx, BM, BN, BK, TM, TN, local_scalars);
                sync_cube();
                k0 += BK;
            }
            let row_step = comptime!(BM / TM);
            // On a CPU adapter (`local_scalars`) a loop over the rows, not unrolled
            // (`shift_rows`: llvmpipe compiles unrolled stores slowly); on a GPU unrolled.
            #[unroll(!local_scalars)]
            for i in 0..TM {
                let r = ty + i * row_step;
                let first = row_first(i, comptime!(TN / 4), local_scalars);
                store_grouped_row::<F>(c, c32, bias, slot_route, gates, &acc, first, r, rows_valid, row0, col0, cols_valid, tx, e, n, BN, TN, has_bias, act, scatter, c_f32);
                if comptime!(local_scalars) {
                    shift_rows(&mut acc, TM, comptime!(TN / 4));
                }
            }
        }
    }
}

/// Row `r` of a unit's tile in the staged grouped kernel, from the 4-wide accumulators
/// `acc[first ..]`, masked to `rows_valid x cols_valid`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_grouped_row<F: Float>(
    c: &mut Array<F>,
    c32: &mut Array<f32>,
    bias: &Array<F>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    acc: &Array<V4>,
    first: u32,
    r: u32,
    rows_valid: u32,
    row0: u32,
    col0: u32,
    cols_valid: u32,
    tx: u32,
    e: u32,
    n: u32,
    #[comptime] bn: u32,
    #[comptime] tn: u32,
    #[comptime] has_bias: bool,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] c_f32: bool,
) {
    #[unroll]
    for j in 0..tn {
        let col = v4_tile_col(tx, j, bn, tn);
        if r < rows_valid && col < cols_valid {
            let v = acc[(first + j / 4) as usize][(j % 4) as usize];
            store_grouped::<F>(
                c,
                c32,
                bias,
                slot_route,
                gates,
                v,
                row0 + r,
                col0 + col,
                e,
                n,
                has_bias,
                act,
                scatter,
                c_f32,
            );
        }
    }
}

/// The grouped GEMMs' epilogue for one f32 value `v` of row `row` (absolute), column
/// `col` of expert `e`: `+ bias[e, col]`, the activation, then the store: to `c` (or
/// `c32`), or with `scatter` times the gate of the route that fills the row, into that
/// route's row. The caller masks the edges.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_grouped<F: Float>(
    c: &mut Array<F>,
    c32: &mut Array<f32>,
    bias: &Array<F>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    v: f32,
    row: u32,
    col: u32,
    e: u32,
    n: u32,
    #[comptime] has_bias: bool,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] c_f32: bool,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += f32::cast_from(bias[(e * n + col) as usize]);
    }
    v = activate(v, act);
    if comptime!(scatter) {
        let route = slot_route[row as usize];
        if route != comptime!(NO_ROUTE) {
            c[(route * n + col) as usize] = F::cast_from(gates[route as usize] * v);
        }
    } else if comptime!(c_f32) {
        c32[(row * n + col) as usize] = v;
    } else {
        c[(row * n + col) as usize] = F::cast_from(v);
    }
}

grouped_kernel! {
    /// The grouped GEMM with both operands read as 4-wide vectors straight from global
    /// memory (K and N multiples of 4; no shared memory, no barriers: the CPU-adapter path,
    /// as `matmul_vec4`): a `TM x TN` register tile per unit, rows clamped to the expert's
    /// last row and columns to the last one (computed, never stored). Grid, groups and
    /// epilogue as `moe_grouped_matmul`'s, the epilogue on 4-wide vectors (a unit owns
    /// four adjacent columns per vector: `bias` read, `c` or `c32` written as vectors).
    /// With `trans_b` (`b` `[E, N, K]`, the backward's data GEMMs) b's vectors run along K.
    #[kernel(
        tune((BM, BN, TM, TN, SHARE) = [
            (64, 64, 8, 8, 1),
            (128, 128, 16, 8, 1),
            (64, 128, 8, 16, 1),
            (128, 128, 16, 16, 1),
            (32, 128, 4, 8, 1),
            (16, 64, 4, 4, 1),
            // As matmul_vec4's: past 16 x 16 accumulators only where the rows and
            // columns fill a cube.
            (128, 128, 32, 32, 1),
            // a's rows shared across a plane of 8 (`SHARE = 8`, lavapipe), as
            // `matmul_vec4_plane`: each unit reads TM / 8 of its tile's rows and gets the
            // others by shuffles, so the tiles can be tall.
            (64, 128, 64, 16, 8),
            (128, 128, 64, 16, 8),
            (32, 128, 32, 16, 8),
            (16, 128, 16, 16, 8),
        ]),
        require(
            BM % TM == 0,
            BN % TN == 0,
            TN % 4 == 0,
            k % 4 == 0,
            n % 4 == 0,
            TM * TN <= 256 || (max_rows >= BM && n >= BN),
            crate::matmul::shares_rows(device, SHARE, BN, TM, TN),
        ),
        defaults(
            trans_b = false,
            has_bias = false,
            act = none,
            scatter = false,
            a_f32 = false,
            c_f32 = false,
        ),
    )]
    moe_grouped_matmul_v4<
        [Vector<F, Const<4>>], [Vector<f32, Const<4>>], [Vector<F, Const<4>>], [Vector<f32, Const<4>>]
    >(#[comptime] trans_b: bool) {
        let e = CUBE_POS_Z;
        let count = row_count[e as usize];
        let tile_row = CUBE_POS_Y * BM;
        if tile_row < count {
            let units_x = comptime!(BN / TN);
            let row_step = comptime!(BM / TM);
            let tnv = comptime!(TN / 4);
            let (ty, tx) = (UNIT_POS / units_x, UNIT_POS % units_x);
            let start = row_start[e as usize];
            let row0 = start + tile_row;
            let col0 = CUBE_POS_X * BN;
            let (kv, nv) = (k / 4, n / 4);
            let b_base = e * k * nv;
            let mut rows = Array::<u32>::new(comptime!(TM as usize));
            clamped_strided(&mut rows, row0 + ty, row_step, start + count - 1, TM);
            let mut cols = Array::<u32>::new(comptime!(tnv as usize));
            clamped_strided(&mut cols, col0 / 4 + tx, units_x, nv - 1, tnv);
            // With `SHARE = 8` (the plane is one unit row: BN / TN = 8), tile rows `lane`,
            // `lane + 8`, ... are the ones this unit reads for its plane.
            let plane = comptime!(SHARE == 8);
            let reads = comptime!(if plane { TM / 8 } else { 1 });
            let mut own = Array::<u32>::new(comptime!(reads as usize));
            if comptime!(plane) {
                let first = row0 + ty + UNIT_POS_PLANE * row_step;
                clamped_strided(&mut own, first, 8 * row_step, start + count - 1, reads);
            }
            let mut mine = Array::<V4>::new(comptime!(reads as usize));
            let mut av = Array::<V4>::new(comptime!(TM as usize));
            let mut accv = Array::<V4>::new(comptime!((TM * tnv) as usize));
            zero_tile_v4(&mut accv, TM * tnv);
            let mut kq = 0u32;
            if comptime!(trans_b) {
                // b is [E, N, K] (the backward's `dY W2^T`, `dPre W1^T`): column `col` of
                // expert e is row `e n + col` of one [E N, K] matrix, read four K at a
                // time. As `matmul_vec4`'s `trans_b` path: each element one sum through
                // its four K in order (a dot product), kept as a scalar.
                let mut acc = Array::<f32>::new(comptime!((TM * TN) as usize));
                #[unroll]
                for x in 0..TM * TN {
                    acc[x as usize] = 0.0f32;
                }
                let mut bvs = Array::<V4>::new(comptime!(TN as usize));
                while kq < kv {
                    grouped_a_tile(&mut av, &mut mine, a, a32, &rows, &own, kv, kq, TM, plane, a_f32);
                    #[unroll]
                    for j in 0..TN {
                        let col = cols[(j / 4) as usize] * 4 + j % 4;
                        bvs[j as usize] = V4::cast_from(b[((e * n + col) * kv + kq) as usize]);
                    }
                    dot_k_quad(&mut acc, &av, &bvs, TM, TN);
                    kq += 1;
                }
                pack_v4(&mut accv, &acc, TM * tnv);
            } else {
                while kq < kv {
                    grouped_a_tile(&mut av, &mut mine, a, a32, &rows, &own, kv, kq, TM, plane, a_f32);
                    if comptime!(local_scalars) {
                        // Accumulator by accumulator on a CPU adapter (see `fma_k_quad`):
                        // expert e's b is rows e K .. (e + 1) K of one [E K, N] matrix.
                        kq += fma_k_quad::<F>(&mut accv, &av, b, &cols, e * k + kq * 4, nv, kv, TM, tnv);
                    } else {
                        #[unroll]
                        for d in 0..4u32 {
                            #[unroll]
                            for jv in 0..tnv {
                                let bv = V4::cast_from(
                                    b[(b_base + (kq * 4 + d) * nv + cols[jv as usize]) as usize],
                                );
                                #[unroll]
                                for i in 0..TM {
                                    let x = (i * tnv + jv) as usize;
                                    accv[x] += V4::new(av[i as usize][d as usize]) * bv;
                                }
                            }
                        }
                        kq += 1;
                    }
                }
            }
            // The epilogue, a vector of four adjacent columns at a time (a unit owns four per
            // vector of its tile; N is a multiple of 4, so a vector is all in or all out):
            // `bias` read once per column vector, one masked store per row and vector.
            // On a CPU adapter a loop over the rows (`shift_rows`), on a GPU unrolled.
            let mut bias_v = Array::<V4>::new(comptime!(tnv as usize));
            #[unroll]
            for jv in 0..tnv {
                bias_v[jv as usize] = V4::new(0.0f32);
                if comptime!(has_bias) {
                    bias_v[jv as usize] =
                        V4::cast_from(bias[(e * nv + cols[jv as usize]) as usize]);
                }
            }
            let cv0 = col0 / 4 + tx;
            #[unroll(!local_scalars)]
            for i in 0..TM {
                let r = ty + i * row_step;
                let first = row_first(i, tnv, local_scalars);
                store_grouped_row_v4::<F>(c, c32, slot_route, gates, &accv, &bias_v, first, r, tile_row, count, row0, cv0, nv, units_x, tnv, act, scatter, c_f32);
                if comptime!(local_scalars) {
                    shift_rows(&mut accv, TM, tnv);
                }
            }
        }
    }
}

/// `av[i]` = four K (vector `kq`) of the unit's tile row `i` in f32: read from `rows`,
/// or with `plane` the unit's `own` rows read and the others shuffled from the plane.
#[cube]
#[allow(clippy::too_many_arguments)]
fn grouped_a_tile<F: Float>(
    av: &mut Array<V4>,
    mine: &mut Array<V4>,
    a: &Array<Vector<F, Const<4>>>,
    a32: &Array<V4>,
    rows: &Array<u32>,
    own: &Array<u32>,
    kv: u32,
    kq: u32,
    #[comptime] tm: u32,
    #[comptime] plane: bool,
    #[comptime] a_f32: bool,
) {
    if comptime!(plane) {
        #[unroll]
        for i in 0..tm / 8 {
            mine[i as usize] = load_v4::<F>(a, a32, own[i as usize] * kv + kq, a_f32);
        }
        plane_rows(av, mine, tm, 1u32);
    } else {
        #[unroll]
        for i in 0..tm {
            av[i as usize] = load_v4::<F>(a, a32, rows[i as usize] * kv + kq, a_f32);
        }
    }
}

/// Row `r` of a unit's tile in the direct grouped kernel, from `accv[first ..]` plus
/// `bias_v`, vector `jv` at column vector `cv0 + jv units_x`, masked to the group's
/// `count` rows and `nv` vectors.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_grouped_row_v4<F: Float>(
    c: &mut Array<Vector<F, Const<4>>>,
    c32: &mut Array<V4>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    accv: &Array<V4>,
    bias_v: &Array<V4>,
    first: u32,
    r: u32,
    tile_row: u32,
    count: u32,
    row0: u32,
    cv0: u32,
    nv: u32,
    #[comptime] units_x: u32,
    #[comptime] tnv: u32,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] c_f32: bool,
) {
    #[unroll]
    for jv in 0..tnv {
        let cv = cv0 + jv * units_x;
        if tile_row + r < count && cv < nv {
            store_grouped_v4::<F>(
                c,
                c32,
                slot_route,
                gates,
                accv[(first + jv) as usize] + bias_v[jv as usize],
                row0 + r,
                cv,
                nv,
                act,
                scatter,
                c_f32,
            );
        }
    }
}

/// [`store_grouped`] for four adjacent columns at once: `v` (bias added) holds columns
/// `4 cv .. 4 cv + 3` of row `row`, `nv` the row length in vectors. The caller masks
/// the edges.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_grouped_v4<F: Float>(
    c: &mut Array<Vector<F, Const<4>>>,
    c32: &mut Array<V4>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    v: V4,
    row: u32,
    cv: u32,
    nv: u32,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] c_f32: bool,
) {
    let v = activate_vector::<Const<4>>(v, act);
    if comptime!(scatter) {
        let route = slot_route[row as usize];
        if route != comptime!(NO_ROUTE) {
            let gate = V4::new(gates[route as usize]);
            c[(route * nv + cv) as usize] = Vector::<F, Const<4>>::cast_from(gate * v);
        }
    } else if comptime!(c_f32) {
        c32[(row * nv + cv) as usize] = v;
    } else {
        c[(row * nv + cv) as usize] = Vector::<F, Const<4>>::cast_from(v);
    }
}

grouped_kernel! {
    @tiles(16 * FRAGS_M * PLANES_M, 16 * FRAGS_N * PLANES_N; (32, PLANES_M * PLANES_N))
    /// The grouped GEMM on tensor cores (half precision on devices that report them; see
    /// `matmul_cmma`, whose K loop it shares: `a` and `b` as 8-wide vectors, K and N
    /// multiples of 8): a `16 FRAGS_M PLANES_M x 16 FRAGS_N PLANES_N` tile of one expert's
    /// rows per cube, the rows past the expert's last zero in the staged slice. The
    /// epilogue goes a fragment at a time through each plane's 16 x 16 f32 scratch into
    /// `store_grouped` (bias, activation, the plain or scattering store). A left operand
    /// in f32 (`a_f32`: the layer's hidden activations between its GEMMs) is rounded to
    /// `F` as it is staged, the precision the tensor cores multiply in.
    #[kernel(
        tune((PLANES_M, PLANES_N, FRAGS_M, FRAGS_N, BK) = [
            (2, 2, 4, 4, 32),
            (2, 4, 4, 2, 32),
            (4, 2, 2, 4, 32),
            (2, 2, 4, 2, 32),
            (2, 2, 2, 4, 32),
            (2, 2, 2, 2, 32),
            (2, 4, 4, 4, 32),
        ]),
        require(
            device.has(Capability::TensorCores),
            device.plane_size.0 == 32,
            k % 8 == 0,
            trans_b || n % 8 == 0,
            (((16 * FRAGS_M * PLANES_M + 16 * FRAGS_N * PLANES_N + 8) * (BK + 8) * 2
                + 1024 * PLANES_M * PLANES_N) as usize) <= device.max_shared_memory,
        ),
        dtypes = [f16, bf16],
        defaults(
            trans_b = false,
            has_bias = false,
            act = none,
            scatter = false,
            a_f32 = false,
            c_f32 = false,
        ),
    )]
    moe_grouped_matmul_cmma<[Vector<F, Const<8>>], [Vector<f32, Const<8>>], [F], [f32]>(#[comptime] trans_b: bool) {
        let e = CUBE_POS_Z;
        let count = row_count[e as usize];
        let bm = comptime!(16 * FRAGS_M * PLANES_M);
        let bn = comptime!(16 * FRAGS_N * PLANES_N);
        let tile_row = CUBE_POS_Y * bm;
        // Uniform per cube: a cube past its expert's rows skips the barriers together.
        if tile_row < count {
            let units = comptime!(32 * PLANES_M * PLANES_N);
            let block = CmmaBlock::new(PLANES_M, PLANES_N, FRAGS_M, FRAGS_N);
            let row0 = row_start[e as usize] + tile_row;
            let rows_valid = count - tile_row;
            let col0 = block.col0;
            // Expert e's matrix starts after e matrices of n k elements, in 8-wide
            // vectors: `k % 8 == 0` always, `n % 8` only without `trans_b` (the backward's
            // `[N, K]` weights may have any N, so not `k (n / 8)`).
            let b_base = e * n * (k / 8);
            if comptime!(a_f32) {
                cmma_product::<f32, F>(&block, a32, row0, rows_valid, b, b_base, col0, n, k, bm, bn, BK, units, trans_b);
            } else {
                cmma_product::<F, F>(&block, a, row0, rows_valid, b, b_base, col0, n, k, bm, bn, BK, units, trans_b);
            }

            // A fragment at a time through the plane's scratch: 8 elements per unit.
            let mut scratch = SharedMemory::<f32>::new(comptime!((256 * PLANES_M * PLANES_N) as usize));
            let base = (UNIT_POS / 32) * 256;
            #[unroll]
            for i in 0..FRAGS_M {
                #[unroll]
                for j in 0..FRAGS_N {
                    let (fr, fc) = block.store_one(&mut scratch, base, i, j);
                    sync_plane();
                    #[unroll]
                    for t in 0..8u32 {
                        let idx = UNIT_POS % 32 + t * 32;
                        let r = fr + idx / 16;
                        let col = col0 + fc + idx % 16;
                        if r < rows_valid && col < n {
                            store_grouped::<F>(c, c32, bias, slot_route, gates, scratch[(base + idx) as usize], row0 + r, col, e, n, has_bias, act, scatter, c_f32);
                        }
                    }
                    sync_plane();
                }
            }
        }
    }
}
