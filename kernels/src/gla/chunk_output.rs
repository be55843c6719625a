//! The chunkwise-parallel kernels, part 2: the intra-chunk scores and the chunk output
//! `o = scale q e^b S + A v` (layouts and numerics as in `chunk_state`).

use super::chunk_state::chunk_at;
use super::fused::plane_scores;
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, v4_tile_col, V4};
use kiln_runtime::AdapterType;

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
    // SHARE = 8 where planes are 8 lanes with shuffles (lavapipe), one value per device:
    // chunks of 16 rows then take a row a unit (`plane_scores`, as the fused forward).
    tune(BD = [32, 16], SHARE = [1, 8]),
    require(
        SHARE == match device.plane_shuffle && device.plane_size == (8, 8) {
            true => 8,
            false => 1,
        },
        chunk < 64 || !decay || BD == 16
    ),
    key(n_chunks = pow2, heads = pow2, dd = pow2, dtype),
    grid = (n_chunks, heads),
    cube = (chunk / 4) * (chunk / 4),
    domain(chunk = [16, 32, 64]),
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
    let at = chunk_at(chunks);
    let (c, h, start, len) = (at.c, at.h, at.start, at.len);
    let units = comptime!((chunk / 4) * (chunk / 4));
    let n_sub = comptime!(chunk / 16);
    let factor = comptime!(decay && chunk > 16);
    // A row a unit, broadcasts across planes of 8 (`plane_scores`).
    let plane = comptime!(SHARE == 8 && chunk == 16);
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
        if comptime!(plane) {
            plane_scores(&mut acc, &xs, 0u32, &ys, 0u32, &bs, 0u32, bdv, bdv, decay);
        }
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
        if comptime!(!plane) {
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
        }
        sync_cube();
        d0 += BD;
    }
    let out_base = (c * heads + h) * chunk * chunk;
    if comptime!(plane) {
        // Row UNIT_POS, column j in acc[j].
        let i = UNIT_POS;
        #[unroll]
        for j in 0..16u32 {
            let mut val = 0.0f32;
            if j <= i && i < len {
                let p = acc[j as usize];
                val = (p[0] + p[1] + p[2] + p[3]) * scale;
            }
            a[(out_base + i * chunk + j) as usize] = val;
        }
    } else {
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
}

/// A chunk's rows from a state and the intra-chunk scores, one cube per (chunk, head,
/// V tile), a `TT x TT` register tile per unit held as 4-wide vectors
/// ([`reg_tile_mma_v4`]). Forward (`backward = false`, x = q, y = v, states = h_n,
/// m = A): `o = (scale q * exp(b)) h_n + A v`. Backward (x = k, y = do,
/// states = dh_{n+1}, m = A transposed): `dv = (k * exp(Gamma - b)) dh_{n+1} + A^T do`.
#[kiln_macros::kernel(
    // TT as for `gla_state_pass`: 16 on CPU adapters (155-202 -> 97-126 ms at
    // 1 x 4096 x 4 x 64, chunks of 16-64; 4 units a cube at chunk 16), 4 elsewhere.
    tune(BV = [64, 32], BK = [16, 32], TT = [8, 4, 16]),
    require(
        TT != 16 || device.adapter_type == AdapterType::Cpu,
        TT != 4 || device.adapter_type != AdapterType::Cpu,
        BK <= chunk,
        TT <= chunk,
        chunk * BK + BK * BV <= device.max_shared_memory as u32 / 4
    ),
    key(n_chunks = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_chunks, heads, dv.div_ceil(BV)),
    cube = (chunk / TT) * (BV / TT),
    domain(chunk = [16, 32, 64]),
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
    let at = chunk_at(chunks);
    let (c, h, start, len) = (at.c, at.h, at.start, at.len);
    let v0 = CUBE_POS_Z * BV;
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
        reg_tile_mma_v4(
            &mut acc,
            &xs,
            0,
            &ys,
            0,
            ty,
            tx,
            chunk,
            BV,
            BK,
            TT,
            TT,
            local_scalars,
        );
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
        reg_tile_mma_v4(
            &mut acc,
            &xs,
            0,
            &ys,
            0,
            ty,
            tx,
            chunk,
            BV,
            BK,
            TT,
            TT,
            local_scalars,
        );
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
