//! The tensor-core path of the dequantizing GEMMs (W4A16 and `w8_bits`) for f16 and
//! bf16 activations on devices that report cooperative-matrix support (CUDA `wmma`):
//! every K step dequantizes the weight slice into shared memory in the activation's
//! dtype, then the planes multiply on tensor cores with f32 accumulation (Marlin's
//! shape of the problem, without its hand-scheduled pipeline). Never a candidate
//! elsewhere: `require(device.has(Capability::TensorCores))` keeps it out of the
//! tuning space, and `kiln emit` refuses WGSL for it.
//!
//! A cube of `PLANES_M x PLANES_N` planes (32 units each) owns a
//! `32 PLANES_M x 32 PLANES_N` tile of `y`; each plane accumulates a 32 x 32 block as
//! 2 x 2 fragments of 16 x 16 (`kiln_dsl::CmmaBlock`).

use super::dequant::{stage_weight_tile, WeightKind};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_as, CmmaBlock};

/// Depth of a K step: one fragment (two int4 words per column).
const FRAG: u32 = 16;

qgemm_kernel! {
    /// `y = x @ w` on tensor cores: x's slice `[32 PLANES_M, 16]` and the dequantized
    /// weight slice `[16, 32 PLANES_N]` staged in shared memory in `F` (zero past the
    /// edges), f32 fragments, y written in `F`.
    #[kernel(
        tune(PLANES_M = [2, 1], PLANES_N = [2, 1]),
        require(device.has(Capability::TensorCores), device.plane_size.0 == 32),
        grid = (n.div_ceil(32 * PLANES_N), m.div_ceil(32 * PLANES_M)),
        cube = (32, PLANES_M * PLANES_N),
        // wmma has no 16x16x16 f32 fragment: half precision only.
        dtypes = [f16, bf16],
    )]
    qgemm_cmma() {
        let bm = comptime!(32 * PLANES_M);
        let bn = comptime!(32 * PLANES_N);
        let units = comptime!(32 * PLANES_M * PLANES_N);
        let block = CmmaBlock::new(PLANES_M, PLANES_N, 2u32, 2u32);
        let (row0, col0) = (block.row0, block.col0);

        // x's slice row-major [bm][16], the weight's row-major [16][bn].
        let mut xs = SharedMemory::<F>::new(comptime!((bm * FRAG) as usize));
        let mut ws = SharedMemory::<F>::new(comptime!((FRAG * bn) as usize));
        let mut k0 = 0u32;
        while k0 < k {
            load_tile_as::<F, F>(
                &mut xs,
                0,
                x,
                row0 * k + k0,
                k,
                m - row0,
                k - k0,
                bm,
                FRAG,
                false,
                units,
            );
            stage_weight_tile::<F>(
                &mut ws,
                qweight,
                scales,
                zeros,
                g_idx,
                k0,
                col0,
                n,
                k,
                group_size,
                shift,
                FRAG,
                bn,
                units,
                wkind,
                act_order,
            );
            sync_cube();
            block.mma::<F, F>(&xs, FRAG, &ws, bn, false, FRAG, 1u32);
            sync_cube();
            k0 += FRAG;
        }

        // Accumulators to shared memory, then y over the whole tile.
        let mut ys = SharedMemory::<f32>::new(comptime!((bm * bn) as usize));
        block.store(&mut ys, bn);
        sync_cube();
        let mut idx = UNIT_POS;
        while idx < comptime!(bm * bn) {
            let r = row0 + idx / bn;
            let col = col0 + idx % bn;
            if r < m && col < n {
                y[(r * n + col) as usize] = F::cast_from(ys[idx as usize]);
            }
            idx += units;
        }
    }
}
