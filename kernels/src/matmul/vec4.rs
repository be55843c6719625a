//! The 4-wide vector path of `matmul`, for K and N multiples of 4: `a` and `b` are read
//! straight from global memory as 4-wide vectors (no shared memory), a `TM x TN`
//! register tile per unit.
//!
//! Why: on a CPU adapter (lavapipe) every non-uniform memory access costs a loop over
//! the SIMD lanes whatever its width, so a vector read is four elements for about the
//! price of one. Per four steps of K a unit reads `TM` vectors of `a` (four K of a row)
//! and `TN` vectors of `b` (four N of a K row, or four K of an N row with `trans_b`),
//! and does `TM x TN x 4` FMAs. Rows and columns past the edge are clamped to the last
//! one: computed, never stored, so the main loop has no branch. In both layouts a unit
//! owns four adjacent columns per vector of its tile, so the epilogue reads `bias` and
//! `residual` and writes `c` as vectors too (a quarter of the stores, and a quarter of
//! the code llvmpipe compiles: a 32 x 32 tile with bias, residual and SiLU took 117 s
//! to compile with a scalar epilogue, 19 s with this one, on a slow 2-core machine; with
//! the epilogue a loop over the rows, `shift_rows`, about 1-2 s without LLVM's passes).
//!
//! Which register tile wins depends on the machine: on one 2-core machine (2026-12-02)
//! tiles past 16 x 16 were no faster beyond the noise; on another (a slower 2-core AMD
//! EPYC, the same day) 32 x 32 ran 1.8-1.95x faster than 16 x 16 at 512^3-2048^3 and 16 x 32
//! 1.9x at 16 x 4096 x 4096, where the loads are the cost (a variant reading a quarter
//! of `b`'s vectors ran 1.8x faster). The tuner times both where the problem fills a
//! cube. On CUDA the large tiles spill (kernels/cuda-budget.txt drops them).
//! Taking each accumulator through its four steps of K in a row (loading the tile's
//! `b` vectors first) made no difference on the second machine, where the loads were
//! the cost; on a machine where they are not, it halves the time (below).
//!
//! On a CPU adapter (`local_scalars`) each accumulator goes through the four K of a
//! vector in a row (`fma_k_quad`): llvmpipe blends every loop-carried variable through
//! the lanes' mask on each write and keeps a large tile's accumulators in memory, so
//! one load, blend and store per four products instead of per product ran 1024^3 2.0-2.6x
//! faster on a 2-core Intel Xeon (2026-12-06, docs/performance.md). (Until then the four
//! K were a loop over the components, for LLVM's compile time, and K-major.)

use super::vec4_plane::{plane_rows, LANES};
use super::{clamped_strided, row_first, shift_rows, store_epilogue_v4, Activation};
use cubecl::prelude::*;
use kiln_dsl::{block_boundary, rows_per_block, V4};

matmul_kernel! {
    /// `c = epilogue(a @ b)` with `a`, `b` as 4-wide vectors (`k % 4 == 0`, `n % 4 == 0`).
    #[kernel(
        tune((BM, BN, TM, TN) = [
            (64, 64, 8, 8),
            (64, 128, 8, 16),
            (128, 128, 16, 8),
            (32, 128, 4, 8),
            (16, 64, 4, 4),
            (16, 128, 8, 8),
            (4, 256, 1, 4),
            // Few rows in one unit row: each vector of b serves all 4 or 8 of them.
            (4, 128, 4, 8),
            (4, 256, 4, 16),
            (8, 256, 8, 16),
            (1, 256, 1, 4),
            (1, 256, 1, 8),
            (1, 512, 1, 16),
            (128, 128, 16, 16),
            (64, 256, 8, 32),
            (16, 256, 8, 16),
            (1, 1024, 1, 32),
            // 32 x 32: twice the FMAs per load of 16 x 16 (the loads are what lavapipe
            // pays for), at a longer compile (11 s against 1.4 s on a 2-core machine with
            // an unrolled epilogue; 1.3 s per tuning candidate since): offered only where
            // the problem fills a cube.
            (128, 128, 32, 32),
            (16, 512, 16, 32),
            (8, 512, 8, 32),
            // Few columns (a router's E = 8 experts, a LoRA rank): the whole of N in one
            // column of units, so no unit computes clamped copies of the last column.
            (64, 8, 8, 8),
            (128, 8, 16, 8),
            (64, 16, 8, 16),
            (128, 16, 16, 16),
        ]),
        require(
            BM % TM == 0,
            BN % TN == 0,
            TN % 4 == 0,
            k % 4 == 0,
            n % 4 == 0,
            // Tiles of fewer than 16 rows only where they cover M.
            BM >= 16 || BM >= m.next_power_of_two(),
            // Tiles of fewer than 32 columns only where they cover N.
            BN >= 32 || BN >= n.next_power_of_two(),
            TM * TN <= 256 || (m >= BM && n >= BN),
        ),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = ((BM / TM) * (BN / TN)),
    )]
    matmul_vec4<[Vector<F, Const<4>>], [Vector<F, Const<4>>]> {
        let units_x = comptime!(BN / TN);
        let row_step = comptime!(BM / TM);
        let tnv = comptime!(TN / 4);
        let ty = UNIT_POS / units_x;
        let tx = UNIT_POS % units_x;
        let row0 = CUBE_POS_Y * BM;
        let col0 = CUBE_POS_X * BN;
        let kv = k / 4;
        let nv = n / 4;
        let mut rows = Array::<u32>::new(comptime!(TM as usize));
        clamped_strided(&mut rows, row0 + ty, row_step, m - 1, TM);
        // The unit's columns, in both layouts of b: four adjacent ones per vector jv,
        // vector tx + jv BN / TN of the tile (so the epilogue reads and writes vectors).
        let mut cols = Array::<u32>::new(comptime!(tnv as usize));
        clamped_strided(&mut cols, col0 / 4 + tx, units_x, nv - 1, tnv);
        let mut accv = Array::<V4>::new(comptime!((TM * tnv) as usize));
        vec4_product::<F>(&mut accv, a, b, &rows, &cols, kv, nv, TM, TN, false, trans_b, local_scalars);

        store_tile_v4::<F>(
            c, residual, bias, &mut accv, &cols, row0 + ty, row_step, col0 / 4 + tx, m, nv,
            units_x, TM, tnv, has_bias, has_residual, act, local_scalars,
        );
    }
}

/// The main loop of the vector kernels: `accv` (`TM x TN/4` vectors, row-major) =
/// `a[rows] @ b[:, cols]` over all of K, four K a step. `rows` are the unit's `TM` rows
/// of `a`, or with `plane` the `TM / 8` it reads for its plane (see `vec4_plane`);
/// `cols` its `TN / 4` column vectors.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn vec4_product<F: Float>(
    accv: &mut Array<V4>,
    a: &Array<Vector<F, Const<4>>>,
    b: &Array<Vector<F, Const<4>>>,
    rows: &Array<u32>,
    cols: &Array<u32>,
    kv: u32,
    nv: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] plane: bool,
    #[comptime] trans_b: bool,
    #[comptime] local_scalars: bool,
) {
    let tnv = comptime!(tn / 4);
    let mut av = Array::<V4>::new(comptime!(tm as usize));
    let mut mine = Array::<V4>::new(comptime!(if plane { (tm / LANES) as usize } else { 1 }));
    #[unroll]
    for e in 0..tm * tnv {
        accv[e as usize] = V4::new(0.0f32);
    }
    if comptime!(!trans_b) {
        let mut kq = 0u32;
        while kq < kv {
            load_a::<F>(&mut av, &mut mine, a, rows, kv, kq, tm, plane);
            if comptime!(local_scalars) {
                kq += fma_k_quad::<F>(accv, &av, b, cols, kq * 4, nv, kv, tm, tnv);
            } else {
                #[unroll]
                for e in 0..4u32 {
                    fma_k_row::<F>(accv, &av, b, cols, kq * 4 + e, nv, comptime!(e), tm, tnv);
                }
                kq += 1;
            }
        }
    } else {
        // b is [N, K]: column 4 cols[jv] + l is row 4 cols[jv] + l of b, read four K
        // at a time. Each element is one sum through its four K in order (a dot
        // product), kept as a scalar: four partial sums would hold four times the
        // accumulators.
        let mut acc = Array::<f32>::new(comptime!((tm * tn) as usize));
        #[unroll]
        for e in 0..tm * tn {
            acc[e as usize] = 0.0f32;
        }
        let mut kq = 0u32;
        while kq < kv {
            load_a::<F>(&mut av, &mut mine, a, rows, kv, kq, tm, plane);
            if comptime!(local_scalars) {
                // As in `fma_k_quad`: `b`'s vectors loaded first, then each element
                // through its four K in a row (in order), one masked store each.
                let mut bvs = Array::<V4>::new(comptime!(tn as usize));
                #[unroll]
                for j in 0..tn {
                    let col = cols[(j / 4) as usize] * 4 + j % 4;
                    bvs[j as usize] = V4::cast_from(b[(col * kv + kq) as usize]);
                }
                dot_k_quad(&mut acc, &av, &bvs, tm, tn);
            } else {
                #[unroll]
                for j in 0..tn {
                    let col = cols[(j / 4) as usize] * 4 + j % 4;
                    let bv = V4::cast_from(b[(col * kv + kq) as usize]);
                    #[unroll]
                    for i in 0..tm {
                        let x = (i * tn + j) as usize;
                        let p = av[i as usize];
                        let mut s = acc[x];
                        #[unroll]
                        for e in 0..4u32 {
                            s += p[e as usize] * bv[e as usize];
                        }
                        acc[x] = s;
                    }
                }
            }
            kq += 1;
        }
        pack_v4(accv, &acc, tm * tnv);
    }
}

/// Four K of a `tm x tn` tile of scalar sums (b read along K, `trans_b`): `acc[i tn + j]
/// += Σ_e av[i][e] bvs[j][e]`, each element through its four K in order (a dot product;
/// one masked store of it per four products on a CPU adapter).
#[cube]
pub(crate) fn dot_k_quad(
    acc: &mut Array<f32>,
    av: &Array<V4>,
    bvs: &Array<V4>,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
) {
    #[unroll]
    for i in 0..tm {
        let p = av[i as usize];
        #[unroll]
        for j in 0..tn {
            let x = (i * tn + j) as usize;
            let q = bvs[j as usize];
            let mut s = acc[x];
            #[unroll]
            for e in 0..4u32 {
                s += p[e as usize] * q[e as usize];
            }
            acc[x] = s;
        }
    }
}

/// `accv[x]` = the scalar sums `acc[4 x .. 4 x + 4]` as a vector, for `x < len`.
#[cube]
pub(crate) fn pack_v4(accv: &mut Array<V4>, acc: &Array<f32>, #[comptime] len: u32) {
    #[unroll]
    for x in 0..len {
        let mut v = V4::new(0.0f32);
        #[unroll]
        for l in 0..4u32 {
            v[l as usize] = acc[(x * 4 + l) as usize];
        }
        accv[x as usize] = v;
    }
}

/// `av[i]` = four K (vector `kq`) of the unit's row `i` of `a`: read directly, or with
/// `plane` shared across the plane (`plane_rows`, `mine` its scratch).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_a<F: Float>(
    av: &mut Array<V4>,
    mine: &mut Array<V4>,
    a: &Array<Vector<F, Const<4>>>,
    rows: &Array<u32>,
    kv: u32,
    kq: u32,
    #[comptime] tm: u32,
    #[comptime] plane: bool,
) {
    if comptime!(plane) {
        load_rows::<F>(mine, a, rows, kv, kq, comptime!(tm / LANES));
        plane_rows(av, mine, tm, 1u32);
    } else {
        load_rows::<F>(av, a, rows, kv, kq, tm);
    }
}

/// The epilogue of a `TM x TN` vector register tile, a vector of four columns at a time:
/// row `i` of the tile is row `r0 + i row_step` of `c`, vector `jv` is column vector
/// `cv0 + jv units_x` (`cols[jv]` clamped, for `bias`). `bias` read once per column
/// vector, one masked store per row and vector (N is a multiple of 4, so a vector is all
/// in or all out). On a CPU adapter (`local_scalars`) a loop over the rows, not unrolled
/// (`shift_rows`: unrolled, a 32 x 32 tile compiled 10x slower on llvmpipe); on a GPU
/// unrolled (NVRTC spilled the loop's register moves).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_tile_v4<F: Float>(
    c: &mut Array<Vector<F, Const<4>>>,
    residual: &Array<Vector<F, Const<4>>>,
    bias: &Array<Vector<F, Const<4>>>,
    accv: &mut Array<V4>,
    cols: &Array<u32>,
    r0: u32,
    #[comptime] row_step: u32,
    cv0: u32,
    m: u32,
    nv: u32,
    #[comptime] units_x: u32,
    #[comptime] tm: u32,
    #[comptime] tnv: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
    #[comptime] local_scalars: bool,
) {
    let mut bias_v = Array::<V4>::new(comptime!(tnv as usize));
    #[unroll]
    for jv in 0..tnv {
        bias_v[jv as usize] = V4::new(0.0f32);
        if comptime!(has_bias) {
            bias_v[jv as usize] = V4::cast_from(bias[cols[jv as usize] as usize]);
        }
    }
    #[unroll(!local_scalars)]
    for i in 0..tm {
        let r = r0 + i * row_step;
        let first = row_first(i, tnv, local_scalars);
        store_row_v4::<F>(
            c,
            residual,
            accv,
            &bias_v,
            first,
            r,
            m,
            cv0,
            nv,
            units_x,
            tnv,
            has_bias,
            has_residual,
            act,
        );
        if comptime!(local_scalars) {
            shift_rows(accv, tm, tnv);
        }
    }
}

/// Row `r` of the vector epilogue from `accv[first ..]`: vector `jv` is column vector
/// `cv0 + jv units_x`, plus `bias_v[jv]`, masked to `r < m`, `cv < nv`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_row_v4<F: Float>(
    c: &mut Array<Vector<F, Const<4>>>,
    residual: &Array<Vector<F, Const<4>>>,
    accv: &Array<V4>,
    bias_v: &Array<V4>,
    first: u32,
    r: u32,
    m: u32,
    cv0: u32,
    nv: u32,
    #[comptime] units_x: u32,
    #[comptime] tnv: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
) {
    #[unroll]
    for jv in 0..tnv {
        let cv = cv0 + jv * units_x;
        if r < m && cv < nv {
            store_epilogue_v4::<F>(
                c,
                residual,
                accv[(first + jv) as usize],
                bias_v[jv as usize],
                r,
                cv,
                nv,
                has_bias,
                has_residual,
                act,
            );
        }
    }
}

/// One K of the tile: `accv[i, jv] += av[i][c] * b[kk, cols[jv]]` (`b` row `kk` of
/// `nv` vectors; `c`: which component of `av` holds that K).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fma_k_row<F: Float>(
    accv: &mut Array<V4>,
    av: &Array<V4>,
    b: &Array<Vector<F, Const<4>>>,
    cols: &Array<u32>,
    kk: u32,
    nv: u32,
    #[comptime] c: u32,
    #[comptime] tm: u32,
    #[comptime] tnv: u32,
) {
    #[unroll]
    for jv in 0..tnv {
        let bv = V4::cast_from(b[(kk * nv + cols[jv as usize]) as usize]);
        #[unroll]
        for i in 0..tm {
            accv[(i * tnv + jv) as usize] += V4::new(av[i as usize][c as usize]) * bv;
        }
    }
}

/// Four K of the tile, accumulator by accumulator: `accv[i, jv] += Σ_e av[i][e] *
/// b[kk + e, cols[jv]]`, the four products added in K order (as `fma_k_row` four times).
///
/// Why this order on a CPU adapter: llvmpipe runs a cube's units as SIMD lanes and
/// writes every variable a loop carries through the lanes' execution mask (a blend),
/// and a 32 x 32 tile's accumulators live in memory, not registers. K-major, each
/// product was a load, multiply, add, blend and store of its accumulator (a profile of
/// 1024^3: 38 % of the samples moves, 10 % blends, 15 % the arithmetic); here each
/// accumulator is loaded, blended and stored once per four products, and `b`'s
/// vectors, read first, are only read.
///
/// Returns 1 (`kv >= 1`, K's vectors), for the caller's step counter: it comes through
/// the [`block_boundary()`]s between the tile's groups of rows (llvmpipe's compile time).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fma_k_quad<F: Float>(
    accv: &mut Array<V4>,
    av: &Array<V4>,
    b: &Array<Vector<F, Const<4>>>,
    cols: &Array<u32>,
    kk: u32,
    nv: u32,
    kv: u32,
    #[comptime] tm: u32,
    #[comptime] tnv: u32,
) -> u32 {
    let mut bq = Array::<V4>::new(comptime!((4 * tnv) as usize));
    #[unroll]
    for e in 0..4u32 {
        #[unroll]
        for jv in 0..tnv {
            bq[(e * tnv + jv) as usize] =
                V4::cast_from(b[((kk + e) * nv + cols[jv as usize]) as usize]);
        }
    }
    let rows = comptime!(rows_per_block(tm, 4 * tnv));
    let mut step = 1u32;
    #[unroll]
    for g in 0..tm / rows {
        #[unroll]
        for r in 0..rows {
            let i = g * rows + r;
            let p = av[i as usize];
            #[unroll]
            for jv in 0..tnv {
                let x = (i * tnv + jv) as usize;
                let mut s = accv[x];
                #[unroll]
                for e in 0..4u32 {
                    s += V4::new(p[e as usize]) * bq[(e * tnv + jv) as usize];
                }
                accv[x] = s;
            }
        }
        if comptime!(g + 1 < tm / rows) {
            step *= block_boundary(kv);
        }
    }
    step
}

/// `av[i]` = four K (vector `kq`) of row `rows[i]` of `a` (`kv` vectors per row), in f32.
#[cube]
fn load_rows<F: Float>(
    av: &mut Array<V4>,
    a: &Array<Vector<F, Const<4>>>,
    rows: &Array<u32>,
    kv: u32,
    kq: u32,
    #[comptime] tm: u32,
) {
    #[unroll]
    for i in 0..tm {
        av[i as usize] = V4::cast_from(a[(rows[i as usize] * kv + kq) as usize]);
    }
}
