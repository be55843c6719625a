//! The fused forward: one cube per (sequence, head, V tile) walks its sequence in
//! chunks of 16 rows with the state in registers, and does everything a chunk needs
//! in shared memory: the gate cumsum, the intra-chunk scores, the output rows and the
//! state update. Nothing goes back to global memory but `o` and the final state: no
//! per-chunk states, no scores, no cumulative gates.
//!
//! It trades parallelism (only `N x H x V / BV` cubes) for memory traffic, which is what
//! a CPU adapter (lavapipe: a few cores, every non-uniform access a loop over SIMD
//! lanes) rewards; a GPU wants the chunk-parallel kernels. The autotuner times both
//! per device ([`super::gla`]), as fla offers `fused_chunk` beside `chunk`.
//!
//! Numerics are those of the chunked kernels (spec, "secondary chunking"): the scores
//! are formed in f32 as `q_i k_j exp(b_i - b_j)` with `j <= i` (exponent `<= 0`),
//! element-wise, or with planes of 8 factorised across the chunk's middle (`i >= 8 > j`:
//! `q_i exp(b_i - b_7)` times `k_j exp(b_7 - b_j)`, both exponents `<= 0`); the
//! inter-chunk weights are `exp(b) <= 1` and `exp(Gamma - b) <= 1`.

use super::chunk_state::{load_state_tile, store_state_tile};
use cubecl::prelude::*;
use kiln_dsl::{
    floor_log_gate_v4, plane_broadcast_v4, reg_tile_mma_v4, reg_tile_mma_v4_outer, v4_tile_col, V4,
};

/// Rows per chunk of the fused kernel.
pub const FUSED_CHUNK: u32 = 16;

/// Shared memory the fused kernel needs, in 4-wide f32 vectors, for keys padded to
/// `kp` and a V tile of `bv`: q and k rows, v rows, the scores, exp(Gamma), and one
/// region that holds b while the scores are formed and the entering state after.
pub fn fused_arena_vectors(kp: u32, bv: u32) -> u32 {
    let (kpv, bvv) = (kp / 4, bv / 4);
    2 * 16 * kpv + 16 * bvv + 64 + kpv + (16 * kpv).max(kp * bvv)
}

/// `o` and the final state of the GLA forward, one cube of 16 units per (sequence,
/// head, V tile). The tensors are read and written as 4-wide vectors (K and V must be
/// multiples of 4); `g` is f32; `bounds` holds the `N + 1` sequence offsets; `kp` is
/// the key width rounded up to a multiple of 16 (<= 128). The state starts from `init`
/// when `has_init`, else 0, and ends in `ht` `[N, H, K, V]`.
///
/// Why 16 units: a CPU adapter runs a cube's SIMD groups one after another and
/// executes both sides of every branch under a mask, so a phase that only some units
/// need costs every group; with two groups of 8 lanes, every phase below keeps all 16
/// units busy, and the larger register tiles re-use each loaded vector more.
#[kiln_macros::kernel(
    // SHARE = 8 where planes are 8 lanes with shuffles (lavapipe), one value per device:
    // with BV = 64 the output product's units take two rows and eight column vectors,
    // and a plane of 8 reads each column vector of S and v once (a lane each) and
    // exchanges them by `plane_shuffle` (every read there is a loop over the lanes).
    tune(BV = [64, 32, 16], SHARE = [1, 8]),
    require(
        SHARE == match device.plane_shuffle && device.plane_size == (8, 8) {
            true => 8,
            false => 1,
        },
        kp % 16 == 0,
        kp <= 128,
        kp * BV <= 4096,
        (fused_arena_vectors(kp, BV) * 16) as usize <= device.max_shared_memory
    ),
    key(n_seq = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_seq * heads, dv.div_ceil(BV)),
    cube = 16,
    domain(kp = [16, 32, 48, 64, 80, 96, 112, 128]),
    defaults(kp = 64)
)]
pub fn gla_fused_fwd<F: Float>(
    q: &Array<Vector<F, Const<4>>>,
    k: &Array<Vector<F, Const<4>>>,
    v: &Array<Vector<F, Const<4>>>,
    g: &Array<Vector<f32, Const<4>>>,
    bounds: &Array<u32>,
    init: &Array<f32>,
    o: &mut Array<Vector<F, Const<4>>>,
    ht: &mut Array<f32>,
    n_seq: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    #[comptime] kp: u32,
    #[comptime] has_init: bool,
) {
    let c = comptime!(FUSED_CHUNK);
    let kpv = comptime!(kp / 4);
    let bvv = comptime!(BV / 4);
    let n = CUBE_POS_X / heads;
    let h = CUBE_POS_X % heads;
    let v0 = CUBE_POS_Y * BV;
    let dkv = dk / 4;
    let dvv = dv / 4;
    let v0v = v0 / 4;
    let zero = V4::new(0.0f32);

    // One arena (fused_arena_vectors), so that b and the entering state share space:
    // [t][k / 4] q (then q exp(b) scale) and k (then k exp(Gamma - b)); [t][v / 4] v;
    // the scores [i][j / 4]; exp(Gamma) [k / 4]; then b [t][k / 4] (phases 1-3) or the
    // entering state [k][v / 4] (phase 4).
    let q_at = 0u32;
    let k_at = comptime!(16 * kpv);
    let v_at = comptime!(32 * kpv);
    let a_at = comptime!(32 * kpv + 16 * bvv);
    let gam_at = comptime!(32 * kpv + 16 * bvv + 64);
    let b_at = comptime!(33 * kpv + 16 * bvv + 64);
    let ss_at = b_at;
    let mut arena = SharedMemory::<V4>::new(comptime!(fused_arena_vectors(kp, BV) as usize));

    // The state: a (kp / 4) x (BV / 4) tile per unit (4 x 4 units) in the layout of
    // reg_tile_mma_v4_outer.
    let stm = comptime!(kp / 4);
    let stn = comptime!(BV / 4);
    let stnv = comptime!(stn / 4);
    let sty = UNIT_POS / 4;
    let stx = UNIT_POS % 4;
    let state_base = (n * heads + h) * dk;
    let mut s = Array::<V4>::new(comptime!((stm * stnv) as usize));
    let mut upd = Array::<V4>::new(comptime!((stm * stnv) as usize));
    let mut rows = Array::<u32>::new(comptime!(stm as usize));
    #[unroll]
    for i in 0..stm {
        rows[i as usize] = v4_tile_col(sty, i, kp, stm);
    }
    load_state_tile(
        &mut s, init, state_base, &rows, stx, v0, dk, dv, has_init, stm, BV, stn,
    );

    // The output tile: 4 x (BV / 4) per unit over the chunk's 16 rows (4 x 4 units).
    let otn = comptime!(BV / 4);
    let otnv = comptime!(otn / 4);
    let oty = UNIT_POS / 4;
    let otx = UNIT_POS % 4;
    let mut acc = Array::<V4>::new(comptime!((4 * otnv) as usize));
    // The same 16 vectors as two rows of eight, shared across a plane (SHARE above).
    let plane_shared = comptime!(SHARE == 8 && BV == 64);
    // The scores: a 4 x 4 block per unit (a row a unit with SHARE = 8).
    let si0 = (UNIT_POS / 4) * 4;
    let sj0 = (UNIT_POS % 4) * 4;
    let mut sacc = Array::<V4>::new(16usize);
    let mut qf = Array::<V4>::new(4usize);
    let mut kf = Array::<V4>::new(4usize);
    let mut bi = Array::<V4>::new(4usize);
    let mut bj = Array::<V4>::new(4usize);

    let bos = bounds[n as usize];
    let eos = bounds[(n + 1) as usize];
    let mut t0 = bos;
    while t0 < eos {
        let len = min(eos - t0, c);
        // 1. Stage the chunk: a unit per 4 keys walks the rows, forming b (the inclusive
        //    cumsum of g; rows past the end add 0, so b stays at Gamma there). Every
        //    unit stages v and writes the entering state to shared memory.
        let mut kg = UNIT_POS;
        while kg < kpv {
            let mut b = zero;
            #[unroll]
            for t in 0..c {
                let mut qv = zero;
                let mut kv = zero;
                if t < len && kg < dkv {
                    let i = ((t0 + t) * heads + h) * dkv + kg;
                    qv = V4::cast_from(q[i as usize]);
                    kv = V4::cast_from(k[i as usize]);
                    // Floored: a -inf gate (full forgetting) keeps b finite.
                    b += floor_log_gate_v4(g[i as usize]);
                }
                arena[(q_at + t * kpv + kg) as usize] = qv;
                arena[(k_at + t * kpv + kg) as usize] = kv;
                arena[(b_at + t * kpv + kg) as usize] = b;
            }
            arena[(gam_at + kg) as usize] = V4::exp(b);
            kg += 16u32;
        }
        let mut idx = UNIT_POS;
        while idx < comptime!(c * bvv) {
            let t = idx / bvv;
            let jv = idx % bvv;
            let mut w = zero;
            if t < len && v0v + jv < dvv {
                w = V4::cast_from(v[(((t0 + t) * heads + h) * dvv + v0v + jv) as usize]);
            }
            arena[(v_at + idx) as usize] = w;
            idx += 16u32;
        }
        sync_cube();

        // 2. Scores A[i][j] = scale sum_d q_i k_j exp(b_i - b_j) for j <= i < len, and 0
        //    above the diagonal.
        if comptime!(SHARE == 8) {
            #[unroll]
            for e in 0..16u32 {
                sacc[e as usize] = zero;
            }
            plane_scores(
                &mut sacc, &arena, q_at, &arena, k_at, &arena, b_at, kpv, kpv, true,
            );
            // Lane l of plane p holds row 8 p + l, column j in acc[j].
            let i = UNIT_POS;
            #[unroll]
            for jv in 0..4u32 {
                let mut row = zero;
                #[unroll]
                for jj in 0..4u32 {
                    let p = sacc[(jv * 4 + jj) as usize];
                    if jv * 4 + jj <= i && i < len {
                        row[jj as usize] = (p[0] + p[1] + p[2] + p[3]) * scale;
                    }
                }
                arena[(a_at + i * 4 + jv) as usize] = row;
            }
        } else {
            // A 4 x 4 block of (i, j) per unit, element-wise (the exponent clamped at 0
            // only matters above the diagonal, which is masked).
            #[unroll]
            for e in 0..16u32 {
                sacc[e as usize] = zero;
            }
            for d4 in 0..kpv {
                #[unroll]
                for e in 0..4u32 {
                    qf[e as usize] = arena[(q_at + (si0 + e) * kpv + d4) as usize];
                    kf[e as usize] = arena[(k_at + (sj0 + e) * kpv + d4) as usize];
                    bi[e as usize] = arena[(b_at + (si0 + e) * kpv + d4) as usize];
                    bj[e as usize] = arena[(b_at + (sj0 + e) * kpv + d4) as usize];
                }
                #[unroll]
                for ii in 0..4u32 {
                    #[unroll]
                    for jj in 0..4u32 {
                        sacc[(ii * 4 + jj) as usize] += qf[ii as usize]
                            * kf[jj as usize]
                            * V4::exp(min(bi[ii as usize] - bj[jj as usize], zero));
                    }
                }
            }
            #[unroll]
            for ii in 0..4u32 {
                let i = si0 + ii;
                let mut row = zero;
                #[unroll]
                for jj in 0..4u32 {
                    let p = sacc[(ii * 4 + jj) as usize];
                    if sj0 + jj <= i && i < len {
                        row[jj as usize] = (p[0] + p[1] + p[2] + p[3]) * scale;
                    }
                }
                arena[(a_at + i * 4 + sj0 / 4) as usize] = row;
            }
        }
        sync_cube();

        // 3. In place: q <- q exp(b) scale, k <- k exp(Gamma - b) (exponents <= 0).
        let mut idx = UNIT_POS;
        while idx < comptime!(c * kpv) {
            let b = arena[(b_at + idx) as usize];
            let gamma = arena[(b_at + (c - 1) * kpv + idx % kpv) as usize];
            arena[(q_at + idx) as usize] =
                arena[(q_at + idx) as usize] * V4::exp(b) * V4::new(scale);
            arena[(k_at + idx) as usize] =
                arena[(k_at + idx) as usize] * V4::exp(min(gamma - b, zero));
            idx += 16u32;
        }
        sync_cube();
        // 3b. The entering state to shared memory, over b (read for the last time above).
        #[unroll]
        for i in 0..stm {
            let kk = rows[i as usize];
            #[unroll]
            for jv in 0..stnv {
                arena[(ss_at + kk * bvv + stx + jv * 4) as usize] = s[(i * stnv + jv) as usize];
            }
        }
        sync_cube();

        // 4. o = (q exp(b) scale) S + A v, and S <- diag(exp(Gamma)) S + (k exp(Gamma - b))^T v.
        #[unroll]
        for e in 0..4 * otnv {
            acc[e as usize] = zero;
        }
        if comptime!(plane_shared) {
            // Rows `lane` and `lane + 8`, column vectors `cg * 8 + jv` (jv < 8): the plane
            // shares its columns, each lane reading one of S and of v.
            let lane = UNIT_POS % 8;
            let cg = UNIT_POS / 8;
            plane_shared_product(&mut acc, &arena, q_at, kpv, ss_at, bvv, lane, cg, kpv);
            plane_shared_product(&mut acc, &arena, a_at, 4u32, v_at, bvv, lane, cg, 4u32);
            #[unroll]
            for i in 0..2u32 {
                let r = lane + i * 8;
                #[unroll]
                for jv in 0..8u32 {
                    let colv = v0v + cg * 8 + jv;
                    if r < len && colv < dvv {
                        o[(((t0 + r) * heads + h) * dvv + colv) as usize] =
                            Vector::<F, Const<4>>::cast_from(acc[(i * 8 + jv) as usize]);
                    }
                }
            }
        } else {
            reg_tile_mma_v4(
                &mut acc,
                &arena,
                q_at,
                &arena,
                ss_at,
                oty,
                otx,
                c,
                BV,
                kp,
                4u32,
                otn,
                local_scalars,
            );
            reg_tile_mma_v4(
                &mut acc,
                &arena,
                a_at,
                &arena,
                v_at,
                oty,
                otx,
                c,
                BV,
                c,
                4u32,
                otn,
                local_scalars,
            );
            #[unroll]
            for i in 0..4u32 {
                let r = oty + i * 4;
                #[unroll]
                for jv in 0..otnv {
                    let colv = v0v + otx + jv * 4;
                    if r < len && colv < dvv {
                        o[(((t0 + r) * heads + h) * dvv + colv) as usize] =
                            Vector::<F, Const<4>>::cast_from(acc[(i * otnv + jv) as usize]);
                    }
                }
            }
        }
        #[unroll]
        for e in 0..stm * stnv {
            upd[e as usize] = zero;
        }
        reg_tile_mma_v4_outer(
            &mut upd, &arena, k_at, &arena, v_at, sty, stx, c, kp, BV, stm, stn,
        );
        #[unroll]
        for iv in 0..comptime!(stm / 4) {
            let gv = arena[(gam_at + sty + iv * 4) as usize];
            #[unroll]
            for e in 0..4u32 {
                let d = V4::new(gv[e as usize]);
                #[unroll]
                for jv in 0..stnv {
                    let a = ((iv * 4 + e) * stnv + jv) as usize;
                    s[a] = d * s[a] + upd[a];
                }
            }
        }
        sync_cube();
        t0 += c;
    }

    store_state_tile(&s, ht, state_base, &rows, stx, v0, dk, dv, stm, BV, stn);
}

/// `acc[i * 8 + jv] += X[row_i] Y[.., cg * 8 + jv]` over `4 depth4` depths for the rows
/// `lane` and `lane + 8` of X (depth along its vectors, `x_stride` vectors a row, at
/// `x_at`) and Y `[d][bvv]` vectors at `y_at`: lane `l` of the plane reads column vector
/// `cg * 8 + l` at four depths and receives the other seven by a shuffle from a constant
/// lane per component. Each accumulator takes its four depths in order (the sums of
/// `reg_tile_mma_v4` on a CPU adapter). Every unit of a plane of 8 must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn plane_shared_product(
    acc: &mut Array<V4>,
    arena: &SharedMemory<V4>,
    x_at: u32,
    #[comptime] x_stride: u32,
    y_at: u32,
    #[comptime] bvv: u32,
    lane: u32,
    cg: u32,
    #[comptime] depth4: u32,
) {
    let mut mine = Array::<V4>::new(4usize);
    for d4 in 0..depth4 {
        let x0 = arena[(x_at + lane * x_stride + d4) as usize];
        let x1 = arena[(x_at + (lane + 8) * x_stride + d4) as usize];
        #[unroll]
        for e in 0..4u32 {
            mine[e as usize] = arena[(y_at + (d4 * 4 + e) * bvv + cg * 8 + lane) as usize];
        }
        #[unroll]
        for jv in 0..8u32 {
            let mut s0 = acc[jv as usize];
            let mut s1 = acc[(8 + jv) as usize];
            #[unroll]
            for e in 0..4u32 {
                let y = plane_broadcast_v4(mine[e as usize], jv);
                s0 += V4::new(x0[e as usize]) * y;
                s1 += V4::new(x1[e as usize]) * y;
            }
            acc[jv as usize] = s0;
            acc[(8 + jv) as usize] = s1;
        }
    }
}

/// Intra-chunk scores of a 16-row chunk with planes of 8 (`SHARE = 8`): lane `l` of
/// plane `p` forms row `i = 8 p + l`, `acc[j] += x_i y_j exp(b_i - b_j)` (`decay`) or
/// `x_i y_j` per depth vector (four partial sums a lane), for `j <= i` (columns past the
/// plane's last row are left alone), over `depth4` depth vectors of the `[row][d / 4]`
/// tiles at `x_at`, `y_at` and `b_at` (rows `row_vectors` apart). Each lane reads its own
/// row of x and b and one row of y and b (two in the second plane), and receives the
/// other rows of y and b by broadcasts from constant lanes: 4 to 6 reads per depth vector
/// where a 4 x 4 block a unit read 16. With `decay`, the second plane's pairs with
/// `j < 8` are factorised at row 7 (`r = b_7`: `exp(b_i - r)` and `exp(r - b_j)`, both
/// exponents <= 0 since b does not increase, and rows past the chunk's end hold b at
/// Gamma or 0 with x, y 0), one exponential each for `x_i` and `y_j`; the pairs inside a
/// plane's 8 rows take one per (i, j, d). Plane-uniform branches: a CPU adapter runs each
/// plane through its own side only. Every unit of the cube (16) must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn plane_scores(
    acc: &mut Array<V4>,
    xs: &SharedMemory<V4>,
    x_at: u32,
    ys: &SharedMemory<V4>,
    y_at: u32,
    bs: &SharedMemory<V4>,
    b_at: u32,
    #[comptime] row_vectors: u32,
    #[comptime] depth4: u32,
    #[comptime] decay: bool,
) {
    let zero = V4::new(0.0f32);
    let lane = UNIT_POS % 8;
    let i = UNIT_POS;
    let stride = comptime!(row_vectors);
    for d4 in 0..depth4 {
        let xi = xs[(x_at + i * stride + d4) as usize];
        // Rows 0-7 of y (and b), a lane each.
        let y_lo = ys[(y_at + lane * stride + d4) as usize];
        let mut bi = zero;
        let mut b_lo = zero;
        if comptime!(decay) {
            bi = bs[(b_at + i * stride + d4) as usize];
            b_lo = bs[(b_at + lane * stride + d4) as usize];
        }
        if UNIT_POS < 8 {
            #[unroll]
            for j in 0..8u32 {
                let mut p = xi * plane_broadcast_v4(y_lo, j);
                if comptime!(decay) {
                    p *= V4::exp(min(bi - plane_broadcast_v4(b_lo, j), zero));
                }
                acc[j as usize] += p;
            }
        } else {
            let mut x_t = xi;
            let mut y_t = y_lo;
            if comptime!(decay) {
                let r = plane_broadcast_v4(b_lo, 7u32);
                x_t = xi * V4::exp(min(bi - r, zero));
                y_t = y_lo * V4::exp(min(r - b_lo, zero));
            }
            #[unroll]
            for j in 0..8u32 {
                acc[j as usize] += x_t * plane_broadcast_v4(y_t, j);
            }
            let y_hi = ys[(y_at + (8 + lane) * stride + d4) as usize];
            let mut b_hi = zero;
            if comptime!(decay) {
                b_hi = bs[(b_at + (8 + lane) * stride + d4) as usize];
            }
            #[unroll]
            for j in 0..8u32 {
                let mut p = xi * plane_broadcast_v4(y_hi, j);
                if comptime!(decay) {
                    p *= V4::exp(min(bi - plane_broadcast_v4(b_hi, j), zero));
                }
                acc[(8 + j) as usize] += p;
            }
        }
    }
}
