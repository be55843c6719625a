//! The split-K path of `matmul` for few rows (M <= [`GEMV_MAX_ROWS`]): matrix-vector
//! products and their neighbours, where a register tile has nothing to reuse along M.
//!
//! Why: a register-tiled kernel gives each unit a whole column of K to walk, so at
//! M = 1 a 4096 x 4096 product runs on N / BN cubes, each unit looping 4096 times. On an
//! H200 that took 0.72 ms (kiln's untuned tile) and 0.43 ms (cubek's Auto), about 80 GB/s
//! of b (2026-12-04, docs/measured/h200-2026-12-04). Here a cube owns `BN` columns and
//! `MT` rows, and its `KS` groups of `BN` units split K between them. Each group walks
//! every `KS`-th row of b's K (with `trans_b`, every `KS`-th element of each of b's
//! rows). So `KS` times as many units run in parallel, and each reads a `KS`-th of K.
//! The `KS` partial sums of an output are added in shared memory, in a fixed order
//! (`crate::split_k`), before the fused epilogue stores it.
//!
//! Neighbouring units read neighbouring addresses of b in both layouts. Without
//! `trans_b` they take neighbouring columns (a K row of b). With it they take
//! neighbouring K of one of b's rows. Each element of b is read once for all `MT` rows.
//! The `a` values a step needs are the same for every unit of a group (one broadcast
//! load).

use super::{store_epilogue, Activation};
use crate::split_k::{partials_sum, stage_partials};
use cubecl::prelude::*;

/// The most rows `matmul` offers the split-K kernel for: past it, register tiles reuse
/// each value of b across rows, which this kernel does not.
pub const GEMV_MAX_ROWS: usize = 16;

matmul_kernel! {
    /// `c = epilogue(a @ b)` for few rows: a cube owns `BN` columns and `MT` rows, and its
    /// `KS` groups of units split K (partial sums added in shared memory).
    #[kernel(
        tune((BN, KS) = [(32, 32), (64, 16), (128, 8), (32, 8)], MT = [1, 4, 8]),
        require(
            MT <= m.next_power_of_two(),
            (KS * MT * BN * 4) as usize <= device.max_shared_memory
        ),
        grid = (n.div_ceil(BN), m.div_ceil(MT)),
        cube = (BN * KS),
    )]
    matmul_gemv<[F], [F]> {
        // Which column and which K slice this unit takes: neighbouring units take
        // neighbouring columns (b row-major: a K row of b is contiguous along N), or
        // with `trans_b` neighbouring K (b's rows are contiguous along K).
        let mut cl = UNIT_POS % BN;
        let mut kl = UNIT_POS / BN;
        if comptime!(trans_b) {
            cl = UNIT_POS / KS;
            kl = UNIT_POS % KS;
        }
        let col = CUBE_POS_X * BN + cl;
        let row0 = CUBE_POS_Y * MT;
        // Past the edges, the last column and row are computed and not stored: the
        // main loop has no branch.
        let colc = min(col, n - 1);
        let mut acc = Array::<f32>::new(comptime!(MT as usize));
        let mut arow = Array::<u32>::new(comptime!(MT as usize));
        #[unroll]
        for r in 0..MT {
            acc[r as usize] = 0.0;
            arow[r as usize] = min(row0 + r, m - 1) * k;
        }
        let mut kk = kl;
        while kk < k {
            let mut at = kk * n + colc;
            if comptime!(trans_b) {
                at = colc * k + kk;
            }
            let w = f32::cast_from(b[at as usize]);
            #[unroll]
            for r in 0..MT {
                acc[r as usize] += f32::cast_from(a[(arow[r as usize] + kk) as usize]) * w;
            }
            kk += KS;
        }
        // The KS partial sums of each output, added by one unit in slice order.
        let mut part = SharedMemory::<f32>::new(comptime!((KS * MT * BN) as usize));
        stage_partials(&mut part, &acc, kl, cl, MT, BN);
        let mut r = kl;
        while r < MT {
            let sum = partials_sum(&part, r, cl, MT, BN, KS);
            if col < n && row0 + r < m {
                store_epilogue::<F>(
                    c,
                    bias,
                    residual,
                    sum,
                    row0 + r,
                    col,
                    n,
                    has_bias,
                    has_residual,
                    act,
                );
            }
            r += KS;
        }
    }
}
