//! The 4-wide vector path of `matmul`, for K and N multiples of 4: `a` and `b` are read
//! straight from global memory as 4-wide vectors (no shared memory), a `TM x TN`
//! register tile per unit.
//!
//! Why: on a CPU adapter (lavapipe) every non-uniform memory access costs a loop over
//! the SIMD lanes whatever its width, so a vector read is four elements for about the
//! price of one. Per four steps of K a unit reads `TM` vectors of `a` (four K of a row)
//! and `TN` vectors of `b` (four N of a K row, or four K of an N row with `trans_b`),
//! and does `TM x TN x 4` FMAs. Rows and columns past the edge are clamped to the last
//! one: computed, never stored, so the main loop has no branch.
//!
//! Measured and not kept (lavapipe, 2026-12-02, alternating runs): register tiles past
//! 16 x 16 and 8 x 32 (16 x 32, 32 x 16, 32 x 32, 16 x 64 in cubes of 64-256 rows) were
//! no faster beyond the machine's noise at 256^3-2048^3 and cost llvmpipe seconds of
//! compilation each; taking each accumulator through its four steps of K in a row
//! (loading the tile's `b` vectors first) ran about 10x slower on llvmpipe.

use super::{clamped_strided, store_epilogue, Activation};
use cubecl::prelude::*;
use kiln_dsl::V4;

matmul_kernel! {
    /// `c = epilogue(a @ b)` with `a`, `b` as 4-wide vectors (`k % 4 == 0`, `n % 4 == 0`).
    #[kernel(
        tune((BM, BN, TM, TN) = [
            (64, 64, 8, 8),
            (64, 128, 8, 16),
            (128, 128, 16, 8),
            (32, 128, 4, 8),
            (16, 64, 4, 4),
            (16, 128, 8, 8),
            (4, 256, 1, 4),
            // Few rows in one unit row: each vector of b serves all 4 or 8 of them.
            (4, 128, 4, 8),
            (4, 256, 4, 16),
            (8, 256, 8, 16),
            (1, 256, 1, 4),
            (1, 256, 1, 8),
            (1, 512, 1, 16),
            (128, 128, 16, 16),
            (64, 256, 8, 32),
            (16, 256, 8, 16),
            (1, 1024, 1, 32),
        ]),
        require(
            BM % TM == 0,
            BN % TN == 0,
            TN % 4 == 0,
            k % 4 == 0,
            n % 4 == 0,
            // Tiles of fewer than 16 rows only where they cover M.
            BM >= 16 || BM >= m.next_power_of_two(),
        ),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = ((BM / TM) * (BN / TN)),
    )]
    matmul_vec4<[Vector<F, Const<4>>]> {
        let units_x = comptime!(BN / TN);
        let row_step = comptime!(BM / TM);
        let tnv = comptime!(TN / 4);
        let ty = UNIT_POS / units_x;
        let tx = UNIT_POS % units_x;
        let row0 = CUBE_POS_Y * BM;
        let col0 = CUBE_POS_X * BN;
        let kv = k / 4;
        let nv = n / 4;
        let mut rows = Array::<u32>::new(comptime!(TM as usize));
        clamped_strided(&mut rows, row0 + ty, row_step, m - 1, TM);
        let mut av = Array::<V4>::new(comptime!(TM as usize));
        // The unit's column of element j of its row: without trans_b, lane j % 4 of the
        // column vector tx + (j / 4) BN / TN of the tile (vectors of 4 N); with trans_b,
        // the strided column tx + j BN / TN (each read as 4 K at a time).
        let mut acc = Array::<f32>::new(comptime!((TM * TN) as usize));
        if comptime!(!trans_b) {
            let mut cols = Array::<u32>::new(comptime!(tnv as usize));
            clamped_strided(&mut cols, col0 / 4 + tx, units_x, nv - 1, tnv);
            let mut accv = Array::<V4>::new(comptime!((TM * tnv) as usize));
            #[unroll]
            for e in 0..TM * tnv {
                accv[e as usize] = V4::new(0.0f32);
            }
            let mut kq = 0u32;
            while kq < kv {
                load_rows::<F>(&mut av, a, &rows, kv, kq, TM);
                #[unroll]
                for e in 0..4u32 {
                    #[unroll]
                    for jv in 0..tnv {
                        let bv = V4::cast_from(b[((kq * 4 + e) * nv + cols[jv as usize]) as usize]);
                        #[unroll]
                        for i in 0..TM {
                            let x = (i * tnv + jv) as usize;
                            accv[x] += V4::new(av[i as usize][e as usize]) * bv;
                        }
                    }
                }
                kq += 1;
            }
            #[unroll]
            for i in 0..TM {
                #[unroll]
                for j in 0..TN {
                    acc[(i * TN + j) as usize] = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
                }
            }
        } else {
            let mut cols = Array::<u32>::new(comptime!(TN as usize));
            clamped_strided(&mut cols, col0 + tx, units_x, n - 1, TN);
            // Four partial sums per element (one per lane of K), added at the end.
            let mut accd = Array::<V4>::new(comptime!((TM * TN) as usize));
            #[unroll]
            for e in 0..TM * TN {
                accd[e as usize] = V4::new(0.0f32);
            }
            let mut kq = 0u32;
            while kq < kv {
                load_rows::<F>(&mut av, a, &rows, kv, kq, TM);
                #[unroll]
                for j in 0..TN {
                    let bv = V4::cast_from(b[(cols[j as usize] * kv + kq) as usize]);
                    #[unroll]
                    for i in 0..TM {
                        accd[(i * TN + j) as usize] += av[i as usize] * bv;
                    }
                }
                kq += 1;
            }
            #[unroll]
            for e in 0..TM * TN {
                let p = accd[e as usize];
                acc[e as usize] = p[0] + p[1] + p[2] + p[3];
            }
        }

        #[unroll]
        for i in 0..TM {
            let r = row0 + ty + i * row_step;
            #[unroll]
            for j in 0..TN {
                let mut col = col0 + tx + j * units_x;
                if comptime!(!trans_b) {
                    col = col0 + (tx + (j / 4) * units_x) * 4 + j % 4;
                }
                if r < m && col < n {
                    store_epilogue::<F>(
                        c,
                        bias,
                        residual,
                        acc[(i * TN + j) as usize],
                        r,
                        col,
                        n,
                        has_bias,
                        has_residual,
                        act,
                    );
                }
            }
        }
    }
}

/// `av[i]` = four K (vector `kq`) of row `rows[i]` of `a` (`kv` vectors per row), in f32.
#[cube]
fn load_rows<F: Float>(
    av: &mut Array<V4>,
    a: &Array<Vector<F, Const<4>>>,
    rows: &Array<u32>,
    kv: u32,
    kq: u32,
    #[comptime] tm: u32,
) {
    #[unroll]
    for i in 0..tm {
        av[i as usize] = V4::cast_from(a[(rows[i as usize] * kv + kq) as usize]);
    }
}
