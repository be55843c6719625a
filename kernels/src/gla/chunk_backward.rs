//! The chunkwise-parallel kernels, part 3: the backward (dq, dk from the states and
//! scores; dg from the products of the forward and backward quantities). Layouts and
//! numerics as in `chunk_state`.

use super::chunk_state::chunk_at;
use cubecl::prelude::*;
use kiln_dsl::{load_tile, reg_tile_mma};

/// dq and dk of a chunk's rows for one K tile (one cube per (chunk, head, K tile), a
/// 4x4 register tile of each per unit), and `dgt = q * dq - k * dk` (f32) for the gate
/// gradient:
/// `dq = scale exp(b) (do h_n^T) + sum_{j <= i} dA_ij k_j exp(b_i - b_j)`,
/// `dk = exp(Gamma - b) (v dh_{n+1}^T) + sum_{i >= j} dA_ij q_i exp(b_i - b_j)`.
/// The intra-chunk sums are element-wise in f32 (exponents <= 0). One shared buffer
/// serves both phases (the inter-chunk operands, then dA and the q, k, b tiles).
#[kiln_macros::kernel(
    // BK = 8: half the cube, for CUDA's sm_90a, where ptxas spills BK = 16 in half
    // precision (docs/cuda-registers.md).
    tune(BK = [16, 8]),
    key(n_chunks = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_chunks, heads, dk.div_ceil(BK)),
    cube = (chunk / 4) * (BK / 4),
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
