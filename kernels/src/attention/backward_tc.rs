//! The tensor-core backward kernels (`attention_bwd_dq_cmma`, `attention_bwd_dkv_cmma`):
//! the FMA backward's math (`backward.rs`) with every product on tensor cores (CUDA
//! `wmma`, f16/bf16 operands, f32 fragments), on devices that report them. With `L`
//! known from the forward there is no online rescaling: the gradients accumulate in
//! fragments that live across the whole loop, which is what `wmma` allows.
//!
//! - dq: a cube of `PLANES` planes owns `16 PLANES` query rows of one head and a `BC`
//!   column tile of dq; per key tile of `BK`: `S = Q K^T` and `dP = dO V^T` (both through
//!   `score_tile`, f32 in shared memory), `dS = P (dP - delta)` element-wise with
//!   `P = exp(c S - L)`, rounded to the operand dtype, then `dQ += dS K`.
//! - dk, dv: a cube owns `16 PLANES` keys of one KV head and a `BC` column tile of both;
//!   per query head of the group and query tile of `BQ`: `S^T = K Q^T`, `dP^T = V dO^T`,
//!   `P^T` and `dS^T` element-wise (written transposed as they are formed, so every
//!   product's left operand is row-major), `dV += P^T dO` and `dK += dS^T Q`.
//!
//! Numerics: scores, `P` and `dS` in f32 as the FMA kernels form them; `P` and `dS`
//! rounded once to f16 or bf16 before their products (FlashAttention-2's choice), so a
//! gradient element moves by about one rounding of the operand dtype times its row's
//! magnitude; the autotuner's tolerance is set for that where these are candidates.
//! Two limits the FMA kernels do not have, as in FlashAttention-2: `dS` past f16's
//! 65504 (`|dP - delta|` that large: `|dO| |V|` around 100 at D = 128) is inf in f16
//! (bf16 keeps f32's range), and `P` (normalised by `L`) of a row of more than about 16k
//! keys falls among f16's subnormals and loses relative precision.

use super::tensor_core::{score_tile, seen, write_block, TokenMajor};
use super::tile::{key_tile, lse_index, query_stats, query_tile, row_lse};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_as, CmmaBlock};

attention_grad_kernel! {
    /// dq on tensor cores (see the module docs); the arguments and results of
    /// `attention_bwd_dq`.
    #[kernel(
        tune((PLANES, BK) = [(4, 32), (2, 64), (2, 32)], BC = [64, 128], BD = [32]),
        require(
            device.has(Capability::TensorCores),
            device.plane_size.0 == 32,
            BC <= 64 || dk > 64,
            // (2, 64) with 128 columns spills on sm_80 (ptxas, 2026-12-05).
            BK * BC <= 4096,
            // q/do and k/v depth slices, dS and the K tile in the operand dtype; S and
            // dP in f32; L and delta per row.
            (((16 * PLANES * BD + BK * BD + 16 * PLANES * BK + BK * BC) * 2
                + 2 * 16 * PLANES * BK * 4
                + 16 * PLANES * 8) as usize) <= device.max_shared_memory
        ),
        grid = (n_seq * max_q.div_ceil(16 * PLANES), heads, dk.div_ceil(BC)),
        cube = (32, PLANES),
        dtypes = [f16, bf16],
    )]
    attention_bwd_dq_cmma(dq: &mut Array<F>, dq32: &mut Array<f32>) {
        let bq = comptime!(16 * PLANES);
        let units = comptime!(32 * PLANES);
        let tile = query_tile(bounds_q, bounds_k, max_q, max_k, group, shift, bq, causal);
        let (n, i0, h, hk) = (tile.n, tile.i0, tile.h, tile.hk);
        let (bos_q, bos_k, rows, kmax) = (tile.bos_q, tile.bos_k, tile.rows, tile.kmax);
        let kv_heads = heads / group;
        let c0 = CUBE_POS_Z * BC;
        let cols = select(c0 < dk, min(dk - c0, BC), 0u32);

        // 32-byte aligned, as `wmma` loads and stores require (rows are multiples of 16
        // elements apart).
        let mut xs = SharedMemory::<F>::new_aligned(comptime!((bq * BD) as usize), 32usize);
        let mut ys = SharedMemory::<F>::new_aligned(comptime!((BK * BD) as usize), 32usize);
        let mut ss = SharedMemory::<f32>::new_aligned(comptime!((bq * BK) as usize), 32usize);
        let mut dps = SharedMemory::<f32>::new_aligned(comptime!((bq * BK) as usize), 32usize);
        let mut ds = SharedMemory::<F>::new_aligned(comptime!((bq * BK) as usize), 32usize);
        let mut kc = SharedMemory::<F>::new_aligned(comptime!((BK * BC) as usize), 32usize);
        let mut lrow = SharedMemory::<f32>::new(comptime!(bq as usize));
        let mut drow = SharedMemory::<f32>::new(comptime!(bq as usize));

        // The rows' L (f32::MAX where a row sees no key or lies past the tile: p = 0)
        // and delta, read before the first barrier.
        if UNIT_POS < bq {
            let r = UNIT_POS;
            let at = lse_index(n, heads, h, lse_rows, bos_q, i0 + r, varlen);
            let li = select(r < rows, at, 0u32) as usize;
            lrow[r as usize] = row_lse(lse_n[li], r < rows);
            drow[r as usize] = delta[li];
        }

        let q_base = ((bos_q + i0) * heads + h) * dk;
        let o_base = ((bos_q + i0) * heads + h) * dv;
        let k_row = (bos_k * kv_heads + hk) * dk;
        let v_row = (bos_k * kv_heads + hk) * dv;
        let dq_block = CmmaBlock::new(PLANES, 1u32, 1u32, comptime!(BC / 16));
        let mut k0 = 0u32;
        while k0 < kmax {
            let keys = min(kmax - k0, BK);
            score_tile::<F>(&mut ss, &mut xs, &mut ys, q, q_base, heads * dk, rows, k, k_row + k0 * kv_heads * dk, kv_heads * dk, keys, dk, PLANES, BK, BD);
            score_tile::<F>(&mut dps, &mut xs, &mut ys, d_o, o_base, heads * dv, rows, v, v_row + k0 * kv_heads * dv, kv_heads * dv, keys, dv, PLANES, BK, BD);
            load_tile_as::<F, F>(&mut kc, 0, k, k_row + k0 * kv_heads * dk + c0, kv_heads * dk, keys, cols, BK, BC, false, units);
            sync_cube();
            let mut idx = UNIT_POS;
            while idx < comptime!(bq * BK) {
                let r = idx / BK;
                let j = idx % BK;
                let pos = i32::cast_from(i0 + r) + shift;
                // A masked key: p = 0, where the exponential would give inf or 1.
                let p = f32::exp(ss[idx as usize] * scale - lrow[r as usize]);
                let p = select(seen(j, keys, k0, pos, causal), p, 0.0f32);
                ds[idx as usize] = F::cast_from(p * (dps[idx as usize] - drow[r as usize]));
                idx += units;
            }
            sync_cube();
            dq_block.mma::<F, F>(&ds, BK, &kc, BC, false, BK, 1u32);
            sync_cube();
            k0 += BK;
        }

        // Through the plane's rows of `ss` (16 BK >= 256 floats), times c.
        let dq_at = TokenMajor { token0: bos_q + i0, heads, head: h, width: dk, col0: c0 };
        write_block::<F>(&dq_block, &mut ss, comptime!(16 * BK), dq, dq32, dq_at, rows, cols, scale, &lrow, false, BC, grad_f32);
    }
}

attention_grad_kernel! {
    /// dk and dv on tensor cores (see the module docs); the arguments and results of
    /// `attention_bwd_dkv`.
    #[kernel(
        // Four planes: with two (a cube of 64 units) every tile spilled on sm_90a or
        // sm_80 (ptxas, 2026-12-05: the two accumulator blocks and the score tile).
        tune(PLANES = [4], BQ = [32], BC = [64, 128], BD = [32]),
        require(
            device.has(Capability::TensorCores),
            device.plane_size.0 == 32,
            BC <= 64 || dk > 64 || dv > 64,
            // k/v and q/do depth slices, P^T, dS^T and the dO/Q tile in the operand
            // dtype; S^T and dP^T in f32; L and delta per query column.
            (((16 * PLANES * BD + BQ * BD + 2 * 16 * PLANES * BQ + BQ * BC) * 2
                + 2 * 16 * PLANES * BQ * 4
                + BQ * 8) as usize) <= device.max_shared_memory
        ),
        grid = (n_seq * max_k.div_ceil(16 * PLANES), heads / group, dk.max(dv).div_ceil(BC)),
        cube = (32, PLANES),
        dtypes = [f16, bf16],
    )]
    attention_bwd_dkv_cmma(
        dk_out: &mut Array<F>,
        dv_out: &mut Array<F>,
        dk32: &mut Array<f32>,
        dv32: &mut Array<f32>
    ) {
        let bk = comptime!(16 * PLANES);
        let units = comptime!(32 * PLANES);
        let tile = key_tile(bounds_q, bounds_k, max_q, max_k, shift, bk, causal);
        let (j0, hk, keys) = (tile.j0, tile.hk, tile.keys);
        let (bos_q, bos_k, qmin, qend) = (tile.bos_q, tile.bos_k, tile.qmin, tile.qend);
        let c0 = CUBE_POS_Z * BC;
        let kv_heads = heads / group;
        let dk_cols = select(c0 < dk, min(dk - c0, BC), 0u32);
        let dv_cols = select(c0 < dv, min(dv - c0, BC), 0u32);

        let mut xs = SharedMemory::<F>::new_aligned(comptime!((bk * BD) as usize), 32usize);
        let mut ys = SharedMemory::<F>::new_aligned(comptime!((BQ * BD) as usize), 32usize);
        let mut ss = SharedMemory::<f32>::new_aligned(comptime!((bk * BQ) as usize), 32usize);
        let mut dps = SharedMemory::<f32>::new_aligned(comptime!((bk * BQ) as usize), 32usize);
        let mut pt = SharedMemory::<F>::new_aligned(comptime!((bk * BQ) as usize), 32usize);
        let mut dst = SharedMemory::<F>::new_aligned(comptime!((bk * BQ) as usize), 32usize);
        let mut yc = SharedMemory::<F>::new_aligned(comptime!((BQ * BC) as usize), 32usize);
        let mut lcol = SharedMemory::<f32>::new(comptime!(BQ as usize));
        let mut dcol = SharedMemory::<f32>::new(comptime!(BQ as usize));

        let k_base = ((bos_k + j0) * kv_heads + hk) * dk;
        let v_base = ((bos_k + j0) * kv_heads + hk) * dv;
        let dk_block = CmmaBlock::new(PLANES, 1u32, 1u32, comptime!(BC / 16));
        let dv_block = CmmaBlock::new(PLANES, 1u32, 1u32, comptime!(BC / 16));
        for g in 0..group {
            let h = hk * group + g;
            let mut i0 = qmin;
            while i0 < qend {
                let qs = min(qend - i0, BQ);
                // The tile's L and delta per query column: written before the first
                // barrier of `score_tile`, read after it (the previous tile's readers
                // passed the barriers that end it).
                query_stats(&mut lcol, &mut dcol, lse_n, delta, &tile, heads, h, lse_rows, i0, qs, BQ, units, varlen);
                let q_base = ((bos_q + i0) * heads + h) * dk;
                let o_base = ((bos_q + i0) * heads + h) * dv;
                score_tile::<F>(&mut ss, &mut xs, &mut ys, k, k_base, kv_heads * dk, keys, q, q_base, heads * dk, qs, dk, PLANES, BQ, BD);
                score_tile::<F>(&mut dps, &mut xs, &mut ys, v, v_base, kv_heads * dv, keys, d_o, o_base, heads * dv, qs, dv, PLANES, BQ, BD);
                load_tile_as::<F, F>(&mut yc, 0, d_o, o_base + c0, heads * dv, qs, dv_cols, BQ, BC, false, units);
                sync_cube();
                let mut idx = UNIT_POS;
                while idx < comptime!(bk * BQ) {
                    let r = idx / BQ;
                    let col = idx % BQ;
                    let mut ok = r < keys && col < qs;
                    if comptime!(causal) {
                        ok = ok && i32::cast_from(j0 + r) <= i32::cast_from(i0 + col) + shift;
                    }
                    let p = f32::exp(ss[idx as usize] * scale - lcol[col as usize]);
                    let p = select(ok, p, 0.0f32);
                    pt[idx as usize] = F::cast_from(p);
                    dst[idx as usize] = F::cast_from(p * (dps[idx as usize] - dcol[col as usize]));
                    idx += units;
                }
                sync_cube();
                // dv += P^T dO, then dk += dS^T Q (the column tile of each).
                dv_block.mma::<F, F>(&pt, BQ, &yc, BC, false, BQ, 1u32);
                sync_cube();
                load_tile_as::<F, F>(&mut yc, 0, q, q_base + c0, heads * dk, qs, dk_cols, BQ, BC, false, units);
                sync_cube();
                dk_block.mma::<F, F>(&dst, BQ, &yc, BC, false, BQ, 1u32);
                sync_cube();
                i0 += BQ;
            }
        }

        // Through the plane's rows of `ss` (16 BQ >= 256 floats): dk times c, dv as it is.
        let dk_at = TokenMajor { token0: bos_k + j0, heads: kv_heads, head: hk, width: dk, col0: c0 };
        let dv_at = TokenMajor { token0: bos_k + j0, heads: kv_heads, head: hk, width: dv, col0: c0 };
        write_block::<F>(&dk_block, &mut ss, comptime!(16 * BQ), dk_out, dk32, dk_at, keys, dk_cols, scale, &lcol, false, BC, grad_f32);
        write_block::<F>(&dv_block, &mut ss, comptime!(16 * BQ), dv_out, dv32, dv_at, keys, dv_cols, 1.0f32, &lcol, false, BC, grad_f32);
    }
}
