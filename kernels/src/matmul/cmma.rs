//! The tensor-core path of `matmul` (f16 and bf16 operands, f32 accumulation), for
//! devices that report cooperative-matrix support (CUDA `wmma`). Never a candidate
//! elsewhere: its `require(device.has(Capability::TensorCores))` keeps it out of the tuning space, its
//! launch refuses such a device, and `kiln emit` refuses WGSL for it.
//!
//! A cube of `PLANES_M x PLANES_N` planes (32 units each) owns a
//! `32 PLANES_M x 32 PLANES_N` tile of `c`; each plane accumulates a 32 x 32 block as
//! 2 x 2 fragments of 16 x 16. Every K step of 16 stages a's and b's slices in shared
//! memory in the operand dtype (zero past the edges), then each plane loads its
//! fragments and multiplies. The accumulators go through shared memory to the fused
//! epilogue (bias, activation, residual in f32, masked at the edges).

use super::{store_epilogue, Activation};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_as, CmmaBlock};

/// Fragment edge (m = n = k = 16, the shape every tensor-core generation has).
const FRAG: u32 = 16;

matmul_kernel! {
    /// `c = epilogue(a @ b)` on tensor cores.
    #[kernel(
        tune(PLANES_M = [2, 1], PLANES_N = [2, 1]),
        require(device.has(Capability::TensorCores), device.plane_size.0 == 32),
        grid = (n.div_ceil(32 * PLANES_N), m.div_ceil(32 * PLANES_M)),
        cube = (32, PLANES_M * PLANES_N),
        // wmma has no 16x16x16 f32 fragment (f32 would need tf32 16x16x8 ones): refused.
        dtypes = [f16, bf16],
    )]
    matmul_cmma<[F], [F]> {
        let bm = comptime!(32 * PLANES_M);
        let bn = comptime!(32 * PLANES_N);
        let units = comptime!(32 * PLANES_M * PLANES_N);
        let block = CmmaBlock::new(PLANES_M, PLANES_N);
        let (row0, col0) = (block.row0, block.col0);

        // a's slice row-major [bm][16], b's row-major [16][bn].
        let mut a_s = SharedMemory::<F>::new(comptime!((bm * FRAG) as usize));
        let mut b_s = SharedMemory::<F>::new(comptime!((FRAG * bn) as usize));
        let mut k0 = 0u32;
        while k0 < k {
            load_tile_as::<F, F>(&mut a_s, 0, a, row0 * k + k0, k, m - row0, k - k0, bm, FRAG, false, units);
            if comptime!(trans_b) {
                // b `[N, K]`: element (kk, cc) of the slice is b[col0 + cc, k0 + kk].
                load_tile_as::<F, F>(&mut b_s, 0, b, col0 * k + k0, k, n - col0, k - k0, bn, FRAG, true, units);
            } else {
                load_tile_as::<F, F>(&mut b_s, 0, b, k0 * n + col0, n, k - k0, n - col0, FRAG, bn, false, units);
            }
            sync_cube();
            block.mma::<F>(&a_s, &b_s);
            sync_cube();
            k0 += FRAG;
        }

        // Accumulators to shared memory, then the epilogue over the whole tile.
        let mut c_s = SharedMemory::<f32>::new(comptime!((bm * bn) as usize));
        block.store(&mut c_s);
        sync_cube();
        let mut idx = UNIT_POS;
        while idx < comptime!(bm * bn) {
            let r = row0 + idx / bn;
            let col = col0 + idx % bn;
            if r < m && col < n {
                store_epilogue::<F>(
                    c,
                    bias,
                    residual,
                    c_s[idx as usize],
                    r,
                    col,
                    n,
                    has_bias,
                    has_residual,
                    act,
                );
            }
            idx += units;
        }
    }
}
