//! The tensor-core forward block (`attention_fwd_cmma`): f16/bf16 `q`, `k`, `v` on
//! devices that report cooperative-matrix support (CUDA `wmma`), f32 accumulation. Never
//! a candidate elsewhere: `require(device.has(Capability::TensorCores))` keeps it out of
//! the tuning space, and `kiln emit` refuses WGSL for it.
//!
//! A cube of `PLANES` planes owns `16 PLANES` query rows of one head (and `BV` value
//! columns); plane `p` owns rows `16p..16p + 16`. Two passes over the keys, in tiles of
//! `BK`:
//! 1. Statistics: `S = Q K^T` on tensor cores (f32 fragments, stored to shared memory),
//!    then each row's running max `m` and sum `l` (unit `r` owns row `r`), masked as
//!    the other forward kernels mask. The log-sum-exp comes out of this pass.
//! 2. Output: `S` again, `P = exp(s - m)` with the row's final max (so no rescaling of
//!    the accumulator, which `wmma` fragments do not expose element-wise; the largest
//!    `p` of a row is 1, so long rows stay clear of f16's subnormals), rounded to the
//!    operand dtype, and `O += P V` on tensor cores into fragments that live across the
//!    whole key loop. The fragments go out a 16 x 16 tile at a time through the plane's
//!    part of the scores' shared tile, times `1 / l` in f32.
//!
//! The price of exact statistics is the second `Q K^T` (1.5x the tensor-core products of
//! a one-pass flash attention); the gain is no per-tile rescale through shared memory.
//! `Q` and `K` are staged in depth slices of `BD` (zero past `D`, past the tile's rows
//! and the sequence's keys), `V` in `[BK, BV]` tiles, each as scalars converted to the
//! operand dtype. Numerics: scores and statistics f32 as in the FMA kernels; `P` in
//! `[0, 1]` rounded once to f16 or bf16 before the product, which is the difference from
//! them (an absolute error in `out` of about one rounding of the operand dtype times the
//! row's magnitude; the autotuner's tolerance is set for that where this kernel is a
//! candidate).

use super::tile::{query_tile, write_lse};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_as, CmmaBlock};

attention_fwd_kernel! {
    /// Attention forward with log-sum-exp on tensor cores (see the module docs); the
    /// same arguments and results as `attention_fwd`.
    #[kernel(
        tune((PLANES, BK) = [(4, 64), (4, 32), (2, 64), (2, 32)], BV = [64, 128], BD = [32]),
        require(
            device.has(Capability::TensorCores),
            device.plane_size.0 == 32,
            BV <= 64 || dv > 64,
            // q and k depth slices, P and the V tile in the operand dtype, the scores in
            // f32, two statistics per row.
            (((16 * PLANES * BD + BK * BD + 16 * PLANES * BK + BK * BV) * 2
                + 16 * PLANES * BK * 4
                + 16 * PLANES * 8) as usize) <= device.max_shared_memory
        ),
        grid = (n_seq * max_q.div_ceil(16 * PLANES), heads, dv.div_ceil(BV)),
        cube = (32, PLANES),
        // wmma has no 16x16x16 f32 fragment: half precision only.
        dtypes = [f16, bf16],
    )]
    attention_fwd_cmma<[F]> {
        let bq = comptime!(16 * PLANES);
        let units = comptime!(32 * PLANES);
        let lowest = f32::min_value();
        let tile = query_tile(bounds_q, bounds_k, max_q, max_k, group, shift, bq, causal);
        let (i0, h, hk) = (tile.i0, tile.h, tile.hk);
        let (bos_q, bos_k, rows, kmax) = (tile.bos_q, tile.bos_k, tile.rows, tile.kmax);
        let kv_heads = heads / group;
        let v0 = CUBE_POS_Z * BV;
        let cols = select(v0 < dv, min(dv - v0, BV), 0u32);

        // Every fragment's first element 32-byte aligned, as `wmma` loads and stores
        // require: the arrays are, and rows are multiples of 16 elements apart.
        let mut qs = SharedMemory::<F>::new_aligned(comptime!((bq * BD) as usize), 32usize);
        let mut ks = SharedMemory::<F>::new_aligned(comptime!((BK * BD) as usize), 32usize);
        let mut ss = SharedMemory::<f32>::new_aligned(comptime!((bq * BK) as usize), 32usize);
        let mut ps = SharedMemory::<F>::new_aligned(comptime!((bq * BK) as usize), 32usize);
        let mut vs = SharedMemory::<F>::new_aligned(comptime!((BK * BV) as usize), 32usize);
        let mut row_max = SharedMemory::<f32>::new(comptime!(bq as usize));
        let mut row_inv = SharedMemory::<f32>::new(comptime!(bq as usize));

        let q_base = ((bos_q + i0) * heads + h) * dk;
        let k_base = (bos_k * kv_heads + hk) * dk;
        let v_base = (bos_k * kv_heads + hk) * dv + v0;
        let key_stride = kv_heads * dk;

        // 1. Statistics of row UNIT_POS (< bq), kept by that unit.
        let mut m_run = lowest;
        let mut l_run = 0.0f32;
        let mut k0 = 0u32;
        while k0 < kmax {
            let keys = min(kmax - k0, BK);
            score_tile::<F>(&mut ss, &mut qs, &mut ks, q, q_base, heads * dk, rows, k, k_base + k0 * key_stride, key_stride, keys, dk, PLANES, BK, BD);
            sync_cube();
            if UNIT_POS < bq {
                let r = UNIT_POS;
                let pos = i32::cast_from(i0 + r) + shift;
                // Row r starts at column r (mod BK): rows are BK floats apart, a
                // multiple of the 32 banks, so in step the lanes of a warp would all read
                // one bank.
                let mut tmax = lowest;
                for t in 0..BK {
                    let j = (t + r) % BK;
                    let s = ss[(r * BK + j) as usize] * scale;
                    if seen(j, keys, k0, pos, causal) {
                        tmax = max(tmax, s);
                    }
                }
                let m_new = max(m_run, tmax);
                let mut sum = 0.0f32;
                for t in 0..BK {
                    let j = (t + r) % BK;
                    let s = ss[(r * BK + j) as usize] * scale;
                    // A NaN score gives NaN p, so l and the row become NaN, as in
                    // PyTorch (`max` may drop NaN, the exponential and the sum do not).
                    sum += select(seen(j, keys, k0, pos, causal), f32::exp(s - m_new), 0.0f32);
                }
                l_run = l_run * f32::exp(m_run - m_new) + sum;
                m_run = m_new;
            }
            // The next tile's scores overwrite `ss`.
            sync_cube();
            k0 += BK;
        }
        // The row's log-sum-exp (an empty row: l = 0, lse = -inf through ln(0)), and its
        // max and 1 / l for pass 2 (an empty row's p are all 0 whatever its factor).
        if UNIT_POS < bq {
            let r = UNIT_POS;
            row_max[r as usize] = m_run;
            row_inv[r as usize] = 1.0f32 / select(l_run == 0.0, 1.0f32, l_run);
            if CUBE_POS_Z == 0 && r < rows {
                write_lse(lse, &tile, r, heads, lse_rows, m_run, l_run, temperature, log_lse_scale, varlen);
            }
        }
        sync_cube();

        // 2. O = sum over key tiles of P V, P with the final statistics.
        let out_block = CmmaBlock::new(PLANES, 1u32, 1u32, comptime!(BV / 16));
        k0 = 0u32;
        while k0 < kmax {
            let keys = min(kmax - k0, BK);
            score_tile::<F>(&mut ss, &mut qs, &mut ks, q, q_base, heads * dk, rows, k, k_base + k0 * key_stride, key_stride, keys, dk, PLANES, BK, BD);
            load_tile_as::<F, F>(&mut vs, 0, v, v_base + k0 * kv_heads * dv, kv_heads * dv, keys, cols, BK, BV, false, units);
            sync_cube();
            let mut idx = UNIT_POS;
            while idx < comptime!(bq * BK) {
                let r = idx / BK;
                let j = idx % BK;
                let pos = i32::cast_from(i0 + r) + shift;
                // exp(s - m) in (0, 1], its largest 1: normal in f16 down to 6e-5 (a
                // normalised p of a long row would be subnormal or 0 in f16); 1 / l is
                // applied to the sums in f32 as they are written.
                let s = ss[idx as usize] * scale;
                let p = f32::exp(s - row_max[r as usize]);
                ps[idx as usize] = F::cast_from(select(seen(j, keys, k0, pos, causal), p, 0.0f32));
                idx += units;
            }
            sync_cube();
            out_block.mma::<F, F>(&ps, BK, &vs, BV, false, BK, 1u32);
            sync_cube();
            k0 += BK;
        }

        // Through the plane's rows of `ss` (16 BK >= 256 floats), times 1 / l.
        let out_at = TokenMajor { token0: bos_q + i0, heads, head: h, width: dv, col0: v0 };
        write_block::<F>(&out_block, &mut ss, comptime!(16 * BK), out, out32, out_at, rows, cols, 1.0f32, &row_inv, true, BV, out_f32);
    }
}

/// Where a tile's rows go in a token-major tensor `[.., tokens, heads, width]`: element
/// (r, c) of the tile at `((token0 + r) heads + head) width + col0 + c`.
#[derive(CubeType, Clone, Copy)]
pub(super) struct TokenMajor {
    pub token0: u32,
    pub heads: u32,
    pub head: u32,
    pub width: u32,
    pub col0: u32,
}

/// Writes a cube's accumulated `[16 planes, cols_max]` tile (`block`, one row of
/// `cols_max / 16` fragments a plane) into `out` (F) or `out32` (`f32_out`) at `at`,
/// rows `< rows` and columns `< cols`, times `factor` and, with `per_row`, times
/// `row_factor[r]`; a fragment at a time through the plane's `plane_floats` of `scratch`
/// (at least 256). The caller synchronised the cube after the last product.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_block<F: Float>(
    block: &CmmaBlock,
    scratch: &mut SharedMemory<f32>,
    #[comptime] plane_floats: u32,
    out: &mut Array<F>,
    out32: &mut Array<f32>,
    at: TokenMajor,
    rows: u32,
    cols: u32,
    factor: f32,
    row_factor: &SharedMemory<f32>,
    #[comptime] per_row: bool,
    #[comptime] cols_max: u32,
    #[comptime] f32_out: bool,
) {
    let base = (UNIT_POS / 32) * plane_floats;
    #[unroll]
    for j in 0..comptime!(cols_max / 16) {
        let (fr, fc) = block.store_one(scratch, base, 0u32, j);
        sync_plane();
        #[unroll]
        for e in 0..8u32 {
            let idx = UNIT_POS % 32 + e * 32;
            let r = fr + idx / 16;
            let c = fc + idx % 16;
            if r < rows && c < cols {
                let o = ((at.token0 + r) * at.heads + at.head) * at.width + at.col0 + c;
                let mut value = scratch[(base + idx) as usize] * factor;
                if comptime!(per_row) {
                    value *= row_factor[r as usize];
                }
                if comptime!(f32_out) {
                    out32[o as usize] = value;
                } else {
                    out[o as usize] = F::cast_from(value);
                }
            }
        }
        sync_plane();
    }
}

/// Whether key `j` of the tile at `k0` (`keys` of them real) is seen by the query at
/// position `pos` (its row plus the causal shift).
#[cube]
pub(super) fn seen(j: u32, keys: u32, k0: u32, pos: i32, #[comptime] causal: bool) -> bool {
    let mut seen = j < keys;
    if comptime!(causal) {
        seen = seen && i32::cast_from(k0 + j) <= pos;
    }
    seen
}

/// `ss` = the cube's `[16 planes, bk]` scores `Q K^T` (unscaled, f32), over depth slices
/// of `bd` staged in `qs` (`rows` real query rows from `q_base`, `q_stride` apart) and
/// `ks` (`keys` real keys from `k_base`, `k_stride` apart, one row per key: the
/// column-major B). The caller synchronises the cube before reading `ss`, and every
/// unit calls this.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn score_tile<F: Float>(
    ss: &mut SharedMemory<f32>,
    qs: &mut SharedMemory<F>,
    ks: &mut SharedMemory<F>,
    q: &Array<F>,
    q_base: u32,
    q_stride: u32,
    rows: u32,
    k: &Array<F>,
    k_base: u32,
    k_stride: u32,
    keys: u32,
    dk: u32,
    #[comptime] planes: u32,
    #[comptime] bk: u32,
    #[comptime] bd: u32,
) {
    let bq = comptime!(16 * planes);
    let units = comptime!(32 * planes);
    let block = CmmaBlock::new(planes, 1u32, 1u32, comptime!(bk / 16));
    let mut d0 = 0u32;
    while d0 < dk {
        load_tile_as::<F, F>(
            qs,
            0,
            q,
            q_base + d0,
            q_stride,
            rows,
            dk - d0,
            bq,
            bd,
            false,
            units,
        );
        load_tile_as::<F, F>(
            ks,
            0,
            k,
            k_base + d0,
            k_stride,
            keys,
            dk - d0,
            bk,
            bd,
            false,
            units,
        );
        sync_cube();
        block.mma::<F, F>(qs, bd, ks, bd, true, bd, 1u32);
        sync_cube();
        d0 += bd;
    }
    block.store(ss, bk);
}
