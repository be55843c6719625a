//! The chunkwise-parallel kernels (forward and backward). Every kernel sees the batch
//! as `N` sequences of rows back to back (`[B, T]` flattened, or a varlen batch) cut
//! into chunks of at most `chunk` rows that never cross a sequence boundary; the
//! host's chunk table `chunks` holds `(first row, rows)` per chunk and `seq_chunks` the
//! first chunk of each sequence (`N + 1` entries).
//!
//! Layouts: q, k, g, gc `[rows, H, K]`; v, o, do `[rows, H, V]`; per-chunk states
//! `[chunks, H, K, V]` (f32); scores `[chunks, H, chunk, chunk]` (f32).
//!
//! Numerics (spec, "secondary chunking"): every exponential here has an argument
//! `<= 0` (`b` is a non-increasing cumulative sum of gates <= 0, and only
//! `b_i - b_j` with `j <= i`, `Gamma - b` and `b` itself are exponentiated), so no
//! intermediate overflows whatever the gates; the intra-chunk scores are formed
//! element-wise in f32 ("log space"), never as `exp(b) * exp(-b)`.

use cubecl::prelude::*;
use kiln_dsl::{load_tile, load_tile_v4, reg_tile_mma, reg_tile_mma_v4, v4_tile_col, V4};

/// `gc` = the chunk-local inclusive cumulative sum of `g` over time, in f32 (the `b`
/// of the spec), one cube per (chunk, head).
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(dk = pow2, dtype),
    grid = (n_chunks, heads),
    cube = UNITS,
    name = "gla_cumsum"
)]
pub fn gla_cumsum<F: Float>(
    g: &Array<F>,
    chunks: &Array<u32>,
    gc: &mut Array<f32>,
    n_chunks: u32,
    heads: u32,
    dk: u32,
) {
    let c = CUBE_POS_X;
    let h = CUBE_POS_Y;
    let start = chunks[(2 * c) as usize];
    let len = chunks[(2 * c + 1) as usize];
    let mut kk = UNIT_POS;
    while kk < dk {
        let mut acc = 0.0f32;
        for t in 0..len {
            let i = ((start + t) * heads + h) * dk + kk;
            acc += f32::cast_from(g[i as usize]);
            gc[i as usize] = acc;
        }
        kk += UNITS;
    }
}

/// The sequential pass over chunks, parallel over (sequence, head, K tile, V tile);
/// a `TT x TT` register tile of the state per unit, held as 4-wide vectors
/// ([`reg_tile_mma_v4`]). Forward (`reverse = false`, `x = k`, `y = v`):
/// `h_{n+1} = diag(exp(Gamma)) h_n + (k * exp(Gamma - b))^T v`; backward
/// (`reverse = true`, `x = q`, `y = do`, chunks in reverse):
/// `dh_n = diag(exp(Gamma)) dh_{n+1} + scale (q * exp(b))^T do`. `states[c]` receives
/// the state entering chunk `c` (h_n, or dh_{n+1} going backward) and `last` the
/// final one (ht, or dh0). The state starts from `init` when `has_init`, else 0.
#[kiln_macros::kernel(
    tune(BK = [32, 16], BV = [64, 32], TT = [8, 4]),
    key(n_seq = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_seq * heads, dk.div_ceil(BK), dv.div_ceil(BV)),
    cube = (BK / TT) * (BV / TT),
    name = "gla_state_pass",
    defaults(chunk = 64)
)]
pub fn gla_state_pass<F: Float>(
    x: &Array<F>,
    y: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    seq_chunks: &Array<u32>,
    init: &Array<f32>,
    states: &mut Array<f32>,
    last: &mut Array<f32>,
    n_seq: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    #[comptime] chunk: u32,
    #[comptime] reverse: bool,
    #[comptime] has_init: bool,
) {
    let n = CUBE_POS_X / heads;
    let h = CUBE_POS_X % heads;
    let k0 = CUBE_POS_Y * BK;
    let v0 = CUBE_POS_Z * BV;
    let units = comptime!((BK / TT) * (BV / TT));
    let row_step = comptime!(BK / TT);
    let tnv = comptime!(TT / 4);
    let ty = UNIT_POS / comptime!(BV / TT);
    let tx = UNIT_POS % comptime!(BV / TT);
    // xs: the k operand, rows k and the chunk's time along its vectors; ys: [t][v].
    let mut xs = SharedMemory::<V4>::new(comptime!((BK * chunk / 4) as usize));
    let mut ys = SharedMemory::<V4>::new(comptime!((chunk * BV / 4) as usize));
    let mut decay = SharedMemory::<f32>::new(comptime!(BK as usize));

    let seq_base = (n * heads + h) * dk;
    // The state tile: element (i, j) is lane j % 4 of s[i * TT / 4 + j / 4].
    let mut s = Array::<V4>::new(comptime!((TT * tnv) as usize));
    let mut acc = Array::<V4>::new(comptime!((TT * tnv) as usize));
    let mut rows = Array::<u32>::new(comptime!(TT as usize));
    #[unroll]
    for i in 0..TT {
        rows[i as usize] = k0 + ty + i * row_step;
    }
    load_state_tile(
        &mut s, init, seq_base, &rows, tx, v0, dk, dv, has_init, TT, BV, TT,
    );
    let c_first = seq_chunks[n as usize];
    let c_end = seq_chunks[(n + 1) as usize];
    for step in 0..c_end - c_first {
        let mut c = c_first + step;
        if comptime!(reverse) {
            c = c_end - 1 - step;
        }
        let start = chunks[(2 * c) as usize];
        let len = chunks[(2 * c + 1) as usize];
        let last_row = start + len - 1;

        // x weighted by its decay to the chunk's end (forward) or from its start
        // (backward): both exponents <= 0. Zero past the chunk's rows. Consecutive
        // units take consecutive k (coalesced), each four consecutive rows.
        let mut idx = UNIT_POS;
        while idx < comptime!(BK * chunk / 4) {
            let kl = idx % BK;
            let t0 = (idx / BK) * 4;
            let kg = k0 + kl;
            let mut gamma = 0.0f32;
            if comptime!(!reverse) {
                if kg < dk {
                    gamma = gc[((last_row * heads + h) * dk + kg) as usize];
                }
            }
            let mut w = V4::empty();
            #[unroll]
            for e in 0..4u32 {
                let t = t0 + e;
                let mut value = 0.0f32;
                if t < len && kg < dk {
                    let gi = ((start + t) * heads + h) * dk + kg;
                    let b = gc[gi as usize];
                    let xv = f32::cast_from(x[gi as usize]);
                    if comptime!(reverse) {
                        value = xv * f32::exp(b) * scale;
                    } else {
                        value = xv * f32::exp(gamma - b);
                    }
                }
                w[e as usize] = value;
            }
            xs[(kl * comptime!(chunk / 4) + t0 / 4) as usize] = w;
            idx += units;
        }
        load_tile_v4::<F>(
            &mut ys,
            0,
            y,
            (start * heads + h) * dv + v0,
            heads * dv,
            1,
            len,
            dv - min(v0, dv),
            chunk,
            BV,
            units,
        );
        let mut kl = UNIT_POS;
        while kl < BK {
            let kg = k0 + kl;
            let mut d = 1.0f32;
            if kg < dk {
                d = f32::exp(gc[((last_row * heads + h) * dk + kg) as usize]);
            }
            decay[kl as usize] = d;
            kl += units;
        }
        sync_cube();

        store_state_tile(
            &s,
            states,
            (c * heads + h) * dk,
            &rows,
            tx,
            v0,
            dk,
            dv,
            TT,
            BV,
            TT,
        );
        #[unroll]
        for e in 0..TT * tnv {
            acc[e as usize] = V4::new(0.0f32);
        }
        reg_tile_mma_v4(&mut acc, &xs, 0, &ys, 0, ty, tx, BK, BV, chunk, TT, TT);
        #[unroll]
        for i in 0..TT {
            let d = V4::new(decay[(ty + i * row_step) as usize]);
            #[unroll]
            for jv in 0..tnv {
                let e = (i * tnv + jv) as usize;
                s[e] = d * s[e] + acc[e];
            }
        }
        sync_cube();
    }
    store_state_tile(&s, last, seq_base, &rows, tx, v0, dk, dv, TT, BV, TT);
}

/// Loads a unit's `tm x tn` state tile, held as 4-wide vectors (element (i, j) in lane
/// `j % 4` of `s[i * tn / 4 + j / 4]`), from the `[K, V]` state at `src[base * V ..]`
/// (`base` = (sequence or chunk, head) times K): tile row i is state row `rows[i]`,
/// column j is `v0 + v4_tile_col(tx, j, cols, tn)`. Zero outside K x V, or everywhere
/// without `has_init`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn load_state_tile(
    s: &mut Array<V4>,
    src: &Array<f32>,
    base: u32,
    rows: &Array<u32>,
    tx: u32,
    v0: u32,
    dk: u32,
    dv: u32,
    #[comptime] has_init: bool,
    #[comptime] tm: u32,
    #[comptime] cols: u32,
    #[comptime] tn: u32,
) {
    let tnv = comptime!(tn / 4);
    #[unroll]
    for i in 0..tm {
        let kk = rows[i as usize];
        #[unroll]
        for jv in 0..tnv {
            let mut w = V4::new(0.0f32);
            if comptime!(has_init) {
                #[unroll]
                for e in 0..4u32 {
                    let vv = v0 + v4_tile_col(tx, jv * 4 + e, cols, tn);
                    let mut value = 0.0f32;
                    if kk < dk && vv < dv {
                        value = src[((base + kk) * dv + vv) as usize];
                    }
                    w[e as usize] = value;
                }
            }
            s[(i * tnv + jv) as usize] = w;
        }
    }
}

/// Stores a state tile laid out as [`load_state_tile`] reads it, inside K x V only.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_state_tile(
    s: &Array<V4>,
    dst: &mut Array<f32>,
    base: u32,
    rows: &Array<u32>,
    tx: u32,
    v0: u32,
    dk: u32,
    dv: u32,
    #[comptime] tm: u32,
    #[comptime] cols: u32,
    #[comptime] tn: u32,
) {
    let tnv = comptime!(tn / 4);
    #[unroll]
    for i in 0..tm {
        let kk = rows[i as usize];
        #[unroll]
        for j in 0..tn {
            let vv = v0 + v4_tile_col(tx, j, cols, tn);
            if kk < dk && vv < dv {
                dst[((base + kk) * dv + vv) as usize] =
                    s[(i * tnv + j / 4) as usize][(j % 4) as usize];
            }
        }
    }
}

/// Intra-chunk scores, one cube per (chunk, head), a 4x4 block of (i, j) per unit:
/// `a[i, j] = scale * sum_d x[i, d] y[j, d] * exp(b[i, d] - b[j, d])` (with
/// `decay`; the forward's A from q, k) or without the exponential (the backward's dA
/// from do, v), for `j <= i < rows of the chunk`, and 0 elsewhere.
///
/// Units are grouped 16 to a pair of 16-row sub-chunks (I, J), so neighbouring units
/// (SIMD lanes, warps) take the same path; pairs above the diagonal skip the
/// arithmetic. With `decay` and chunks longer than 16, the pairs below the diagonal
/// (I > J) are factorised as fla does: with `r = b` at the last row before sub-chunk I,
/// `exp(b_i - b_j) = exp(b_i - r) exp(r - b_j)`, both exponents <= 0 (b decreases), so
/// `x~ = x exp(b - r)` and `y~ = y exp(r - b)` are formed once per element and the
/// block is a plain product; only the diagonal pairs take one exponential per (i, j, d).
#[kiln_macros::kernel(
    tune(BD = [32, 16]),
    require(chunk < 64 || !decay || BD == 16),
    key(n_chunks = pow2, heads = pow2, dd = pow2, dtype),
    grid = (n_chunks, heads),
    cube = (chunk / 4) * (chunk / 4),
    name = "gla_scores",
    defaults(chunk = 64, decay = true)
)]
pub fn gla_scores<F: Float>(
    x: &Array<F>,
    y: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    a: &mut Array<f32>,
    n_chunks: u32,
    heads: u32,
    dd: u32,
    scale: f32,
    #[comptime] chunk: u32,
    #[comptime] decay: bool,
) {
    let c = CUBE_POS_X;
    let h = CUBE_POS_Y;
    let start = chunks[(2 * c) as usize];
    let len = chunks[(2 * c + 1) as usize];
    let units = comptime!((chunk / 4) * (chunk / 4));
    let n_sub = comptime!(chunk / 16);
    let factor = comptime!(decay && chunk > 16);
    // Unit -> (sub-chunk pair, 4x4 block inside it).
    let pair = UNIT_POS / 16;
    let sub_i = pair / n_sub;
    let sub_j = pair % n_sub;
    let q = UNIT_POS % 16;
    let i0 = sub_i * 16 + (q / 4) * 4;
    let j0 = sub_j * 16 + (q % 4) * 4;
    let active = j0 <= i0 + 3;
    let mut factored = false;
    if comptime!(factor) {
        factored = sub_i > sub_j;
    }

    // Tiles of the chunk's rows with the depth along 4-wide vectors: (i, d) is lane
    // d % 4 of [i * BD / 4 + d / 4].
    let bdv = comptime!(BD / 4);
    let mut xs = SharedMemory::<V4>::new(comptime!((chunk * bdv) as usize));
    let mut ys = SharedMemory::<V4>::new(comptime!((chunk * bdv) as usize));
    let mut bs = SharedMemory::<V4>::new(comptime!((chunk * bdv) as usize));
    // x~ (rows of sub-chunks I >= 1) and y~ of each I >= 1 (block I - 1).
    let mut xt = SharedMemory::<V4>::new(comptime!(if factor {
        (chunk * bdv) as usize
    } else {
        1usize
    }));
    let mut yt = SharedMemory::<V4>::new(comptime!(if factor {
        ((n_sub - 1) * chunk * bdv) as usize
    } else {
        1usize
    }));
    // Per (i, j) of the unit's 4x4 block, four partial sums (one per lane), added up
    // at the end.
    let mut acc = Array::<V4>::new(16usize);
    #[unroll]
    for e in 0..16u32 {
        acc[e as usize] = V4::new(0.0f32);
    }
    let mut xf = Array::<V4>::new(4usize);
    let mut yf = Array::<V4>::new(4usize);
    let mut bi = Array::<V4>::new(4usize);
    let mut bj = Array::<V4>::new(4usize);
    let zero = V4::new(0.0f32);

    let row_base = (start * heads + h) * dd;
    let last = max(len, 1) - 1;
    let mut d0 = 0u32;
    while d0 < dd {
        let dvalid = dd - d0;
        load_tile_v4::<F>(
            &mut xs,
            0,
            x,
            row_base + d0,
            heads * dd,
            1,
            len,
            dvalid,
            chunk,
            BD,
            units,
        );
        load_tile_v4::<F>(
            &mut ys,
            0,
            y,
            row_base + d0,
            heads * dd,
            1,
            len,
            dvalid,
            chunk,
            BD,
            units,
        );
        if comptime!(decay) {
            load_tile_v4::<f32>(
                &mut bs,
                0,
                gc,
                row_base + d0,
                heads * dd,
                1,
                len,
                dvalid,
                chunk,
                BD,
                units,
            );
        }
        sync_cube();
        if comptime!(factor) {
            // x~ = x exp(b_i - r_I) for rows i of sub-chunks I >= 1, and y~ of each
            // I >= 1 for the rows j < 16 I; r_I = b at row min(16 I - 1, len - 1).
            // The min(., 0) only matters for padding rows (x, y are 0 there).
            let mut idx = UNIT_POS;
            while idx < comptime!(chunk * bdv) {
                let i = idx / bdv;
                let blk = i / 16;
                if blk > 0 {
                    let r = min(blk * 16 - 1, last);
                    let br = bs[(r * bdv + idx % bdv) as usize];
                    xt[idx as usize] = xs[idx as usize] * V4::exp(min(bs[idx as usize] - br, zero));
                }
                idx += units;
            }
            let mut idx = UNIT_POS;
            while idx < comptime!((n_sub - 1) * chunk * bdv) {
                let blk = 1 + idx / comptime!(chunk * bdv);
                let rem = idx % comptime!(chunk * bdv);
                let j = rem / bdv;
                if j < blk * 16 {
                    let r = min(blk * 16 - 1, last);
                    let br = bs[(r * bdv + rem % bdv) as usize];
                    yt[idx as usize] = ys[rem as usize] * V4::exp(min(br - bs[rem as usize], zero));
                }
                idx += units;
            }
            sync_cube();
        }
        if active {
            if factored {
                let yb = (sub_i - 1) * comptime!(chunk * bdv);
                for d4 in 0..bdv {
                    #[unroll]
                    for e in 0..4u32 {
                        xf[e as usize] = xt[((i0 + e) * bdv + d4) as usize];
                        yf[e as usize] = yt[(yb + (j0 + e) * bdv + d4) as usize];
                    }
                    #[unroll]
                    for ii in 0..4u32 {
                        #[unroll]
                        for jj in 0..4u32 {
                            acc[(ii * 4 + jj) as usize] += xf[ii as usize] * yf[jj as usize];
                        }
                    }
                }
            } else {
                for d4 in 0..bdv {
                    #[unroll]
                    for e in 0..4u32 {
                        xf[e as usize] = xs[((i0 + e) * bdv + d4) as usize];
                        yf[e as usize] = ys[((j0 + e) * bdv + d4) as usize];
                        if comptime!(decay) {
                            bi[e as usize] = bs[((i0 + e) * bdv + d4) as usize];
                            bj[e as usize] = bs[((j0 + e) * bdv + d4) as usize];
                        }
                    }
                    #[unroll]
                    for ii in 0..4u32 {
                        #[unroll]
                        for jj in 0..4u32 {
                            let mut p = xf[ii as usize] * yf[jj as usize];
                            if comptime!(decay) {
                                // Clamped at 0: above the diagonal (masked below) the
                                // difference is positive and could overflow.
                                p *= V4::exp(min(bi[ii as usize] - bj[jj as usize], zero));
                            }
                            acc[(ii * 4 + jj) as usize] += p;
                        }
                    }
                }
            }
        }
        sync_cube();
        d0 += BD;
    }
    let out_base = (c * heads + h) * chunk * chunk;
    #[unroll]
    for ii in 0..4u32 {
        #[unroll]
        for jj in 0..4u32 {
            let i = i0 + ii;
            let j = j0 + jj;
            let mut val = 0.0f32;
            if j <= i && i < len {
                let p = acc[(ii * 4 + jj) as usize];
                val = (p[0] + p[1] + p[2] + p[3]) * scale;
            }
            a[(out_base + i * chunk + j) as usize] = val;
        }
    }
}

/// A chunk's rows from a state and the intra-chunk scores, one cube per (chunk, head,
/// V tile), a `TT x TT` register tile per unit held as 4-wide vectors
/// ([`reg_tile_mma_v4`]). Forward (`backward = false`, x = q, y = v, states = h_n,
/// m = A): `o = (scale q * exp(b)) h_n + A v`. Backward (x = k, y = do,
/// states = dh_{n+1}, m = A transposed): `dv = (k * exp(Gamma - b)) dh_{n+1} + A^T do`.
#[kiln_macros::kernel(
    tune(BV = [64, 32], BK = [16, 32], TT = [8, 4]),
    require(BK <= chunk, TT <= chunk, chunk * BK + BK * BV <= device.max_shared_memory as u32 / 4),
    key(n_chunks = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_chunks, heads, dv.div_ceil(BV)),
    cube = (chunk / TT) * (BV / TT),
    name = "gla_chunk_out",
    defaults(chunk = 64)
)]
pub fn gla_chunk_out<F: Float>(
    x: &Array<F>,
    y: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    states: &Array<f32>,
    m: &Array<f32>,
    out: &mut Array<F>,
    n_chunks: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    #[comptime] chunk: u32,
    #[comptime] backward: bool,
) {
    let c = CUBE_POS_X;
    let h = CUBE_POS_Y;
    let v0 = CUBE_POS_Z * BV;
    let start = chunks[(2 * c) as usize];
    let len = chunks[(2 * c + 1) as usize];
    let last_row = start + len - 1;
    let units = comptime!((chunk / TT) * (BV / TT));
    let tnv = comptime!(TT / 4);
    let ty = UNIT_POS / comptime!(BV / TT);
    let tx = UNIT_POS % comptime!(BV / TT);
    let vvalid = dv - min(v0, dv);

    // xs: the chunk x BK left operand (depth along its vectors); ys: BK x BV.
    let mut xs = SharedMemory::<V4>::new(comptime!((chunk * BK / 4) as usize));
    let mut ys = SharedMemory::<V4>::new(comptime!((BK * BV / 4) as usize));
    let mut acc = Array::<V4>::new(comptime!((TT * tnv) as usize));
    #[unroll]
    for e in 0..TT * tnv {
        acc[e as usize] = V4::new(0.0f32);
    }

    // Inter-chunk part: the weighted x against the state.
    let mut k0 = 0u32;
    while k0 < dk {
        let mut idx = UNIT_POS;
        while idx < comptime!(chunk * BK / 4) {
            let t = idx / comptime!(BK / 4);
            let kb = k0 + (idx % comptime!(BK / 4)) * 4;
            let mut w = V4::empty();
            #[unroll]
            for e in 0..4u32 {
                let kg = kb + e;
                let mut value = 0.0f32;
                if t < len && kg < dk {
                    let gi = ((start + t) * heads + h) * dk + kg;
                    let b = gc[gi as usize];
                    let xv = f32::cast_from(x[gi as usize]);
                    if comptime!(backward) {
                        let gamma = gc[((last_row * heads + h) * dk + kg) as usize];
                        value = xv * f32::exp(gamma - b);
                    } else {
                        value = xv * f32::exp(b) * scale;
                    }
                }
                w[e as usize] = value;
            }
            xs[idx as usize] = w;
            idx += units;
        }
        load_tile_v4::<f32>(
            &mut ys,
            0,
            states,
            ((c * heads + h) * dk + k0) * dv + v0,
            dv,
            1,
            dk - k0,
            vvalid,
            BK,
            BV,
            units,
        );
        sync_cube();
        reg_tile_mma_v4(&mut acc, &xs, 0, &ys, 0, ty, tx, chunk, BV, BK, TT, TT);
        sync_cube();
        k0 += BK;
    }

    // Intra-chunk part: scores (or their transpose) against y, over the chunk's rows.
    let m_base = (c * heads + h) * chunk * chunk;
    let mut s0 = 0u32;
    while s0 < len {
        // xs(r, sl) = A[r, s0 + sl] forward, A[s0 + sl, r] backward.
        if comptime!(backward) {
            load_tile_v4::<f32>(
                &mut xs,
                0,
                m,
                m_base + s0 * chunk,
                1,
                chunk,
                chunk,
                chunk - s0,
                chunk,
                BK,
                units,
            );
        } else {
            load_tile_v4::<f32>(
                &mut xs,
                0,
                m,
                m_base + s0,
                chunk,
                1,
                chunk,
                chunk - s0,
                chunk,
                BK,
                units,
            );
        }
        load_tile_v4::<F>(
            &mut ys,
            0,
            y,
            ((start + s0) * heads + h) * dv + v0,
            heads * dv,
            1,
            len - s0,
            vvalid,
            BK,
            BV,
            units,
        );
        sync_cube();
        reg_tile_mma_v4(&mut acc, &xs, 0, &ys, 0, ty, tx, chunk, BV, BK, TT, TT);
        sync_cube();
        s0 += BK;
    }

    let row_step = comptime!(chunk / TT);
    #[unroll]
    for i in 0..TT {
        let r = ty + i * row_step;
        #[unroll]
        for j in 0..TT {
            let col = v4_tile_col(tx, j, BV, TT);
            if r < len && col < vvalid {
                out[(((start + r) * heads + h) * dv + v0 + col) as usize] =
                    F::cast_from(acc[(i * tnv + j / 4) as usize][(j % 4) as usize]);
            }
        }
    }
}

/// dq and dk of a chunk's rows for one K tile (one cube per (chunk, head, K tile), a
/// 4x4 register tile of each per unit), and `dgt = q * dq - k * dk` (f32) for the gate
/// gradient:
/// `dq = scale exp(b) (do h_n^T) + sum_{j <= i} dA_ij k_j exp(b_i - b_j)`,
/// `dk = exp(Gamma - b) (v dh_{n+1}^T) + sum_{i >= j} dA_ij q_i exp(b_i - b_j)`.
/// The intra-chunk sums are element-wise in f32 (exponents <= 0). One shared buffer
/// serves both phases (the inter-chunk operands, then dA and the q, k, b tiles).
#[kiln_macros::kernel(
    tune(BK = [16]),
    key(n_chunks = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_chunks, heads, dk.div_ceil(BK)),
    cube = (chunk / 4) * (BK / 4),
    name = "gla_bwd_dqk",
    defaults(chunk = 64)
)]
pub fn gla_bwd_dqk<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    hs: &Array<f32>,
    dhs: &Array<f32>,
    da: &Array<f32>,
    dq: &mut Array<F>,
    dk_out: &mut Array<F>,
    dgt: &mut Array<f32>,
    n_chunks: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    #[comptime] chunk: u32,
) {
    let c = CUBE_POS_X;
    let h = CUBE_POS_Y;
    let k0 = CUBE_POS_Z * BK;
    let start = chunks[(2 * c) as usize];
    let len = chunks[(2 * c + 1) as usize];
    let units = comptime!((chunk / 4) * (BK / 4));
    let ty = UNIT_POS / comptime!(BK / 4);
    let tx = UNIT_POS % comptime!(BK / 4);
    let kvalid = dk - min(k0, dk);
    // The inter phase's depth tile over V equals BK (so both phases fit the buffer).
    let bvi = BK;
    let mut sm = SharedMemory::<f32>::new(comptime!((chunk * chunk + 3 * chunk * BK) as usize));
    let x2 = comptime!(BK * chunk);
    let y1 = comptime!(2 * BK * chunk);
    let y2 = comptime!(2 * BK * chunk + BK * BK);

    let mut acc_q = Array::<f32>::new(16usize);
    let mut acc_k = Array::<f32>::new(16usize);
    #[unroll]
    for e in 0..16u32 {
        acc_q[e as usize] = 0.0;
        acc_k[e as usize] = 0.0;
    }

    // Inter-chunk parts: do h_n^T and v dh_{n+1}^T, over V in tiles of BK.
    let state_base = (c * heads + h) * dk + k0;
    let mut v0 = 0u32;
    while v0 < dv {
        let row_base = (start * heads + h) * dv + v0;
        load_tile::<F>(
            &mut sm,
            0,
            d_o,
            row_base,
            heads * dv,
            len,
            dv - v0,
            chunk,
            BK,
            true,
            units,
        );
        load_tile::<F>(
            &mut sm,
            x2,
            v,
            row_base,
            heads * dv,
            len,
            dv - v0,
            chunk,
            BK,
            true,
            units,
        );
        // (v, k) of the transposed states: rows k of the state, depth-major over v.
        load_tile::<f32>(
            &mut sm,
            y1,
            hs,
            state_base * dv + v0,
            dv,
            kvalid,
            dv - v0,
            BK,
            BK,
            true,
            units,
        );
        load_tile::<f32>(
            &mut sm,
            y2,
            dhs,
            state_base * dv + v0,
            dv,
            kvalid,
            dv - v0,
            BK,
            BK,
            true,
            units,
        );
        sync_cube();
        reg_tile_mma(
            &mut acc_q, &sm, 0, &sm, y1, ty, tx, chunk, BK, BK, 4u32, 4u32,
        );
        reg_tile_mma(
            &mut acc_k, &sm, x2, &sm, y2, ty, tx, chunk, BK, BK, 4u32, 4u32,
        );
        sync_cube();
        v0 += bvi;
    }

    // Intra-chunk parts: dA [chunk][chunk], then q, k, b tiles [chunk][BK].
    let qo = comptime!(chunk * chunk);
    let ko = comptime!(chunk * chunk + chunk * BK);
    let bo = comptime!(chunk * chunk + 2 * chunk * BK);
    let row_base = (start * heads + h) * dk + k0;
    load_tile::<f32>(
        &mut sm,
        0,
        da,
        (c * heads + h) * chunk * chunk,
        chunk,
        chunk,
        chunk,
        chunk,
        chunk,
        false,
        units,
    );
    load_tile::<F>(
        &mut sm,
        qo,
        q,
        row_base,
        heads * dk,
        len,
        kvalid,
        chunk,
        BK,
        false,
        units,
    );
    load_tile::<F>(
        &mut sm,
        ko,
        k,
        row_base,
        heads * dk,
        len,
        kvalid,
        chunk,
        BK,
        false,
        units,
    );
    load_tile::<f32>(
        &mut sm,
        bo,
        gc,
        row_base,
        heads * dk,
        len,
        kvalid,
        chunk,
        BK,
        false,
        units,
    );
    sync_cube();

    let row_step = comptime!(chunk / 4);
    let col_step = comptime!(BK / 4);
    #[unroll]
    for i in 0..4u32 {
        let r = ty + i * row_step;
        if r < len {
            #[unroll]
            for j in 0..4u32 {
                let col = tx + j * col_step;
                let b_r = sm[(bo + r * BK + col) as usize];
                let mut sum_q = 0.0f32;
                for s in 0..r + 1 {
                    let e = f32::exp(b_r - sm[(bo + s * BK + col) as usize]);
                    sum_q += sm[(r * chunk + s) as usize] * sm[(ko + s * BK + col) as usize] * e;
                }
                let mut sum_k = 0.0f32;
                for s in r..len {
                    let e = f32::exp(sm[(bo + s * BK + col) as usize] - b_r);
                    sum_k += sm[(s * chunk + r) as usize] * sm[(qo + s * BK + col) as usize] * e;
                }
                let gamma = sm[(bo + (len - 1) * BK + col) as usize];
                let dq_v = acc_q[(i * 4 + j) as usize] * scale * f32::exp(b_r) + sum_q;
                let dk_v = acc_k[(i * 4 + j) as usize] * f32::exp(gamma - b_r) + sum_k;
                if col < kvalid {
                    let gi = (row_base + r * heads * dk + col) as usize;
                    dq[gi] = F::cast_from(dq_v);
                    dk_out[gi] = F::cast_from(dk_v);
                    dgt[gi] = sm[(qo + r * BK + col) as usize] * dq_v
                        - sm[(ko + r * BK + col) as usize] * dk_v;
                }
            }
        }
    }
}

/// The gate gradient: `dg_t = sum_{t' >= t in its sequence} dgt_t'` plus, from the
/// final state, `rowsum_V(ht * dht)` (with `has_dht`); one unit per (sequence, head,
/// key), walking its sequence backwards. `bounds` holds the `N + 1` sequence bounds.
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(dk = pow2, dtype),
    grid = (n_seq * heads, dk.div_ceil(UNITS)),
    cube = UNITS,
    name = "gla_bwd_dg"
)]
pub fn gla_bwd_dg<F: Float>(
    dgt: &Array<f32>,
    ht: &Array<f32>,
    dht: &Array<f32>,
    bounds: &Array<u32>,
    dg: &mut Array<F>,
    n_seq: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    #[comptime] has_dht: bool,
) {
    let n = CUBE_POS_X / heads;
    let h = CUBE_POS_X % heads;
    let kk = CUBE_POS_Y * UNITS + UNIT_POS;
    if kk < dk {
        let mut acc = 0.0f32;
        if comptime!(has_dht) {
            let base = ((n * heads + h) * dk + kk) * dv;
            for vv in 0..dv {
                acc += ht[(base + vv) as usize] * dht[(base + vv) as usize];
            }
        }
        let bos = bounds[n as usize];
        let mut t = bounds[(n + 1) as usize];
        while t > bos {
            t -= 1;
            let i = ((t * heads + h) * dk + kk) as usize;
            acc += dgt[i];
            dg[i] = F::cast_from(acc);
        }
    }
}
