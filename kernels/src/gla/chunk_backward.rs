//! The chunkwise-parallel kernels, part 3: the backward (dq, dk from the states and
//! scores; dg from the products of the forward and backward quantities). Layouts and
//! numerics as in `chunk_state`.

use super::chunk_state::chunk_at;
use cubecl::prelude::*;
use kiln_dsl::{lane_of, load_tile_v4, reg_tile_mma_v4, V4};
use kiln_runtime::AdapterType;

/// dq and dk of a chunk's rows for one K tile (one cube per (chunk, head, K tile), a
/// 4 x TN register tile of each per unit, held as 4-wide vectors of consecutive keys),
/// and `dgt = q * dq - k * dk` (f32) for the gate gradient:
/// `dq = scale exp(b) (do h_n^T) + sum_{j <= i} dA_ij k_j exp(b_i - b_j)`,
/// `dk = exp(Gamma - b) (v dh_{n+1}^T) + sum_{i >= j} dA_ij q_i exp(b_i - b_j)`.
/// The intra-chunk sums run in f32 with every exponent <= 0: pairs of sub-chunks below
/// the diagonal as products of factorised tiles (fla's secondary chunking, as
/// `gla_scores` does for the forward), the diagonal pairs element-wise. One shared
/// buffer of vectors ([`V4`]: on a CPU adapter each access with a per-unit address is a
/// loop over the SIMD lanes, so four values an access) serves both phases: the
/// inter-chunk operands, then dA, the q, k, b tiles and the factorised tile.
#[kiln_macros::kernel(
    // BK = 8: half the cube and three quarters of its shared memory (more cubes
    // resident); 32 and 64 (where shared memory allows: chunks of 16 and 32) read do,
    // v and dA once for all of K instead of once per K tile. No form spills on CUDA
    // (docs/cuda-registers.md).
    // TN: a unit's columns, one value per device so the tuning space does not grow:
    // 16 on a CPU adapter (four vectors a row: fewer operand reads per product, every
    // read being a loop over the SIMD lanes there; 580 -> 452 ms at 1 x 4096 x 4 x 64),
    // 4 elsewhere (16 takes 237-254 registers on CUDA, in cubes of 16-32 units).
    tune(BK = [16, 8, 32, 64], TN = [4, 16]),
    require(
        TN == match device.adapter_type == AdapterType::Cpu {
            true => 16,
            false => 4,
        },
        TN <= BK,
        chunk * chunk + 4 * chunk * BK <= device.max_shared_memory as u32 / 4
    ),
    key(n_chunks = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_chunks, heads, dk.div_ceil(BK)),
    cube = (chunk / 4) * (BK / TN),
    domain(chunk = [16, 32, 64]),
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
    let at = chunk_at(chunks);
    let (c, h, start, len) = (at.c, at.h, at.start, at.len);
    let k0 = CUBE_POS_Z * BK;
    let units = comptime!((chunk / 4) * (BK / TN));
    // Vectors in a row of a K tile and of dA; the unit's column vectors are
    // `tx + jv * cstep` for `jv < tnv`.
    let kv = comptime!(BK / 4);
    let cv = comptime!(chunk / 4);
    let tnv = comptime!(TN / 4);
    let cstep = comptime!(BK / TN);
    let row_step = cv;
    let ty = UNIT_POS / cstep;
    let tx = UNIT_POS % cstep;
    let kvalid = dk - min(k0, dk);
    let zero = V4::new(0.0f32);
    let mut sm = SharedMemory::<V4>::new(comptime!((cv * chunk + 4 * chunk * kv) as usize));
    let tile = comptime!(chunk * kv);

    let mut acc_q = Array::<V4>::new(comptime!((4 * tnv) as usize));
    let mut acc_k = Array::<V4>::new(comptime!((4 * tnv) as usize));
    #[unroll]
    for e in 0..4 * tnv {
        acc_q[e as usize] = zero;
        acc_k[e as usize] = zero;
    }

    // Inter-chunk parts: do h_n^T and v dh_{n+1}^T over V in tiles of `bd` = 16 (for
    // every chunk and BK >= 8 these four tiles take no more of the buffer than the
    // intra-chunk phase). do and v as they lie (depth along the vectors); the states
    // transposed, (v, k) with k along them.
    let bd = comptime!(16u32);
    let x2 = comptime!(chunk * bd / 4);
    let y1 = comptime!(chunk * bd / 2);
    let y2 = comptime!(chunk * bd / 2 + bd * kv);
    let state_base = ((c * heads + h) * dk + k0) * dv;
    let mut v0 = 0u32;
    while v0 < dv {
        let row_base = (start * heads + h) * dv + v0;
        let vvalid = dv - v0;
        load_tile_v4::<F>(
            &mut sm,
            0,
            d_o,
            row_base,
            heads * dv,
            1,
            len,
            vvalid,
            chunk,
            bd,
            units,
        );
        load_tile_v4::<F>(
            &mut sm,
            x2,
            v,
            row_base,
            heads * dv,
            1,
            len,
            vvalid,
            chunk,
            bd,
            units,
        );
        load_tile_v4::<f32>(
            &mut sm,
            y1,
            hs,
            state_base + v0,
            1,
            dv,
            vvalid,
            kvalid,
            bd,
            BK,
            units,
        );
        load_tile_v4::<f32>(
            &mut sm,
            y2,
            dhs,
            state_base + v0,
            1,
            dv,
            vvalid,
            kvalid,
            bd,
            BK,
            units,
        );
        sync_cube();
        reg_tile_mma_v4(
            &mut acc_q,
            &sm,
            0,
            &sm,
            y1,
            ty,
            tx,
            chunk,
            BK,
            bd,
            4u32,
            TN,
            local_scalars,
        );
        reg_tile_mma_v4(
            &mut acc_k,
            &sm,
            x2,
            &sm,
            y2,
            ty,
            tx,
            chunk,
            BK,
            bd,
            4u32,
            TN,
            local_scalars,
        );
        sync_cube();
        v0 += bd;
    }

    // Intra-chunk parts: dA [chunk][chunk], then the q, k, b tiles [chunk][BK] and the
    // factorised tile, all as they lie (columns along the vectors).
    let qo = comptime!(cv * chunk);
    let ko = comptime!(cv * chunk + tile);
    let bo = comptime!(cv * chunk + 2 * tile);
    let so = comptime!(cv * chunk + 3 * tile);
    let row_base = (start * heads + h) * dk + k0;
    load_tile_v4::<f32>(
        &mut sm,
        0,
        da,
        (c * heads + h) * chunk * chunk,
        chunk,
        1,
        chunk,
        chunk,
        chunk,
        chunk,
        units,
    );
    load_tile_v4::<F>(
        &mut sm,
        qo,
        q,
        row_base,
        heads * dk,
        1,
        len,
        kvalid,
        chunk,
        BK,
        units,
    );
    load_tile_v4::<F>(
        &mut sm,
        ko,
        k,
        row_base,
        heads * dk,
        1,
        len,
        kvalid,
        chunk,
        BK,
        units,
    );
    load_tile_v4::<f32>(
        &mut sm,
        bo,
        gc,
        row_base,
        heads * dk,
        1,
        len,
        kvalid,
        chunk,
        BK,
        units,
    );
    sync_cube();

    // 1. The inter-chunk parts in their final scale (exponents <= 0; rows past the
    // chunk's end read b = 0 and are never written).
    #[unroll]
    for jv in 0..tnv {
        let col = tx + jv * cstep;
        let gamma = sm[(bo + (max(len, 1u32) - 1) * kv + col) as usize];
        #[unroll]
        for i in 0..4u32 {
            let b_r = sm[(bo + (ty + i * row_step) * kv + col) as usize];
            let e = (i * tnv + jv) as usize;
            acc_q[e] = acc_q[e] * V4::exp(b_r) * V4::new(scale);
            acc_k[e] = acc_k[e] * V4::exp(gamma - b_r);
        }
    }

    // 2. The pairs of sub-chunks below the diagonal (the unit's four rows are one per
    // sub-chunk of `row_step` rows), factorised as fla does ("secondary chunking"): at
    // the boundary before sub-chunk `si`, with `ref = b` at the row before it,
    // `exp(b_i - b_j) = exp(b_i - ref) exp(ref - b_j)` for `j < edge <= i`, both
    // exponents <= 0 (b does not increase), so `k~ = k exp(ref - b)` (rows before the
    // boundary) and `q~ = q exp(b - ref)` (rows from it) are formed once per element
    // into one tile and the pairs are plain products: dq of the rows of `si`, dk of the
    // rows of `si - 1`. A short last chunk takes `ref` at its last row (every later row
    // is 0 in the tile), so no exponent turns positive.
    #[unroll]
    for si in 1..4u32 {
        let edge = comptime!(si * row_step);
        let ref_row = min(edge, len) - 1;
        // The previous boundary's products are done with the tile.
        sync_cube();
        let mut idx = UNIT_POS;
        while idx < tile {
            // No branch (a CPU adapter runs both sides): one operand read at a selected
            // address. The `min` only acts on rows past a short chunk's end, whose
            // operands are 0 and whose b = 0 would give a positive exponent.
            let before = idx / kv < edge;
            let d = sm[(bo + ref_row * kv + idx % kv) as usize] - sm[(bo + idx) as usize];
            let x = sm[(select(before, ko, qo) + idx) as usize];
            sm[(so + idx) as usize] = x * V4::exp(min(select(before, d, zero - d), zero));
            idx += units;
        }
        sync_cube();
        // dq of row `ty + edge`: sum over j < edge of dA_ij k~_j (dA's row four columns
        // a load), times exp(b_i - ref).
        let r = ty + edge;
        let mut sq = Array::<V4>::new(comptime!(tnv as usize));
        let mut sk = Array::<V4>::new(comptime!(tnv as usize));
        #[unroll]
        for jv in 0..tnv {
            sq[jv as usize] = zero;
            sk[jv as usize] = zero;
        }
        for s4 in 0..comptime!(edge / 4) {
            let a = sm[(r * cv + s4) as usize];
            #[unroll]
            for e in 0..4u32 {
                let row = so + (s4 * 4 + e) * kv + tx;
                #[unroll]
                for jv in 0..tnv {
                    sq[jv as usize] += V4::new(a[e as usize]) * sm[(row + jv * cstep) as usize];
                }
            }
        }
        // dk of row `ty + edge - row_step`: sum over i >= edge of dA_ij q~_i, times
        // exp(ref - b_j).
        let rk = r - row_step;
        for s in edge..len {
            let a = V4::new(lane_of(sm[(s * cv + rk / 4) as usize], rk % 4));
            #[unroll]
            for jv in 0..tnv {
                sk[jv as usize] += a * sm[(so + s * kv + tx + jv * cstep) as usize];
            }
        }
        #[unroll]
        for jv in 0..tnv {
            let col = tx + jv * cstep;
            let b_ref = sm[(bo + ref_row * kv + col) as usize];
            let b_q = sm[(bo + r * kv + col) as usize];
            let b_k = sm[(bo + rk * kv + col) as usize];
            acc_q[(si * tnv + jv) as usize] += sq[jv as usize] * V4::exp(b_q - b_ref);
            acc_k[((si - 1) * tnv + jv) as usize] += sk[jv as usize] * V4::exp(b_ref - b_k);
        }
    }

    // 3. The diagonal pairs, element-wise (one exponential per (i, j, d)), and the
    // outputs.
    #[unroll]
    for i in 0..4u32 {
        let r = ty + i * row_step;
        if r < len {
            let lo = comptime!(i * row_step);
            let hi = min(lo + row_step, len);
            // Row r's b and its accumulators, then the sums with each dA element read
            // once for the unit's column vectors.
            let mut b_r = Array::<V4>::new(comptime!(tnv as usize));
            let mut dq_v = Array::<V4>::new(comptime!(tnv as usize));
            let mut dk_v = Array::<V4>::new(comptime!(tnv as usize));
            #[unroll]
            for jv in 0..tnv {
                b_r[jv as usize] = sm[(bo + r * kv + tx + jv * cstep) as usize];
                dq_v[jv as usize] = acc_q[(i * tnv + jv) as usize];
                dk_v[jv as usize] = acc_k[(i * tnv + jv) as usize];
            }
            for s in lo..r + 1 {
                let a = V4::new(lane_of(sm[(r * cv + s / 4) as usize], s % 4));
                #[unroll]
                for jv in 0..tnv {
                    let at = s * kv + tx + jv * cstep;
                    let e = V4::exp(b_r[jv as usize] - sm[(bo + at) as usize]);
                    dq_v[jv as usize] += a * sm[(ko + at) as usize] * e;
                }
            }
            for s in r..hi {
                let a = V4::new(lane_of(sm[(s * cv + r / 4) as usize], r % 4));
                #[unroll]
                for jv in 0..tnv {
                    let at = s * kv + tx + jv * cstep;
                    let e = V4::exp(sm[(bo + at) as usize] - b_r[jv as usize]);
                    dk_v[jv as usize] += a * sm[(qo + at) as usize] * e;
                }
            }
            #[unroll]
            for jv in 0..tnv {
                let col = tx + jv * cstep;
                let (dqv, dkv) = (dq_v[jv as usize], dk_v[jv as usize]);
                let g =
                    sm[(qo + r * kv + col) as usize] * dqv - sm[(ko + r * kv + col) as usize] * dkv;
                #[unroll]
                for j in 0..4u32 {
                    let kk = col * 4 + j;
                    if kk < kvalid {
                        let gi = (row_base + r * heads * dk + kk) as usize;
                        dq[gi] = F::cast_from(dqv[j as usize]);
                        dk_out[gi] = F::cast_from(dkv[j as usize]);
                        dgt[gi] = g[j as usize];
                    }
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
