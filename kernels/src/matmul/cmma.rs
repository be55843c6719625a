//! The tensor-core path of `matmul` (f16 and bf16 operands, f32 accumulation), for
//! devices that report cooperative-matrix support (CUDA `wmma`). Never a candidate
//! elsewhere: its `require(device.has(Capability::TensorCores))` keeps it out of the tuning space, its
//! launch refuses such a device, and `kiln emit` refuses WGSL for it.
//!
//! A cube of `PLANES_M x PLANES_N` planes (32 units each) owns a
//! `16 FRAGS_M PLANES_M x 16 FRAGS_N PLANES_N` tile of `c`; each plane accumulates a
//! `16 FRAGS_M x 16 FRAGS_N` block as f32 fragments of 16 x 16 (`kiln_dsl::CmmaBlock`).
//! `a` and `b` are read as 8-wide vectors (16-byte loads: K, and N unless `trans_b`,
//! multiples of 8). Every K step of `BK` stages a's `[BM][BK]` slice and b's (`[BK][BN]`,
//! or `[BN][BK]` as it lies with `trans_b`, read as column-major fragments) in shared
//! memory in the operand dtype, rows padded by 8 elements, zero past the edges. The
//! next step's vectors are loaded into registers before the current step's products,
//! so the global loads are in flight while the tensor cores work (one barrier pair per
//! step, no second shared buffer). The epilogue goes a fragment at a time through a
//! plane's own 16 x 16 f32 scratch (1 KiB per plane instead of a whole f32 tile:
//! 64 KiB at 128 x 128, past CUDA's 48 KiB of static shared memory), then bias,
//! activation and residual in f32, masked at the edges.
//!
//! The first version (2 x 2 fragments per plane, 64 x 64 at most, K steps of 16 loaded
//! one element per unit) ran the H200's 256 x 16384 x 4096 bf16 product at 45 TFLOP/s
//! (docs/measured/h200-2026-12-04); cubek's pipelines ran 4096^3 f16 at 100.

use super::{store_epilogue, Activation};
use cubecl::prelude::*;
use kiln_dsl::{fetch_tile_v8, stage_tile_v8, CmmaBlock, V8};

matmul_kernel! {
    /// `c = epilogue(a @ b)` on tensor cores, `a` and `b` as 8-wide vectors.
    #[kernel(
        tune((PLANES_M, PLANES_N, FRAGS_M, FRAGS_N, BK) = [
            (2, 2, 4, 4, 32),
            (2, 4, 4, 2, 32),
            (4, 2, 2, 4, 32),
            (2, 2, 4, 2, 32),
            (2, 2, 2, 4, 32),
            (2, 2, 2, 2, 32),
            (2, 4, 4, 4, 32),
            (2, 4, 4, 2, 64),
            // Few rows: one plane row, the planes across N.
            (1, 4, 1, 2, 32),
            (1, 4, 2, 2, 64),
        ]),
        require(
            device.has(Capability::TensorCores),
            device.plane_size.0 == 32,
            k % 8 == 0,
            trans_b || n % 8 == 0,
            // Operand slices (padded rows) and the planes' 1 KiB scratch.
            (((16 * FRAGS_M * PLANES_M + 16 * FRAGS_N * PLANES_N + 8) * (BK + 8) * 2
                + 1024 * PLANES_M * PLANES_N) as usize) <= device.max_shared_memory,
        ),
        grid = (n.div_ceil(16 * FRAGS_N * PLANES_N), m.div_ceil(16 * FRAGS_M * PLANES_M)),
        cube = (32, PLANES_M * PLANES_N),
        // wmma has no 16x16x16 f32 fragment (f32 would need tf32 16x16x8 ones): refused.
        dtypes = [f16, bf16],
    )]
    matmul_cmma<[Vector<F, Const<8>>], [F]> {
        let bm = comptime!(16 * FRAGS_M * PLANES_M);
        let bn = comptime!(16 * FRAGS_N * PLANES_N);
        let units = comptime!(32 * PLANES_M * PLANES_N);
        let block = CmmaBlock::new(PLANES_M, PLANES_N, FRAGS_M, FRAGS_N);
        let (row0, col0) = (block.row0, block.col0);
        cmma_product::<F, F>(&block, a, row0, m - row0, b, 0, col0, n, k, bm, bn, BK, units, trans_b);

        // A fragment at a time through the plane's scratch: 8 elements per unit.
        let mut scratch = SharedMemory::<f32>::new(comptime!((256 * PLANES_M * PLANES_N) as usize));
        let base = (UNIT_POS / 32) * 256;
        #[unroll]
        for i in 0..FRAGS_M {
            #[unroll]
            for j in 0..FRAGS_N {
                let (fr, fc) = block.store_one(&mut scratch, base, i, j);
                sync_plane();
                #[unroll]
                for t in 0..8u32 {
                    let idx = UNIT_POS % 32 + t * 32;
                    let r = row0 + fr + idx / 16;
                    let col = col0 + fc + idx % 16;
                    if r < m && col < n {
                        store_epilogue::<F>(c, bias, residual, scratch[(base + idx) as usize], r, col, n, has_bias, has_residual, act);
                    }
                }
                sync_plane();
            }
        }
    }
}

/// The K loop of the tensor-core GEMMs (`matmul_cmma`, the MoE grouped one): `block` +=
/// the product of a's rows from `a_row0` (`a_rows_valid` of them real, the rest zero)
/// and b's columns from `col0`, b's matrix starting at vector `b_base` (an expert's
/// weights). `a` is `[.., K]` in `S` (`F`, or f32 rounded to `F` as it is staged: the
/// MoE layer's hidden activations), b `[K, N]` or with `trans_b` `[N, K]`, all as 8-wide
/// vectors. Steps of `bk`: the slices are staged in shared memory from registers that
/// were filled during the previous step's products (see the module docs).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn cmma_product<S: Float, F: Float>(
    block: &CmmaBlock,
    a: &Array<V8<S>>,
    a_row0: u32,
    a_rows_valid: u32,
    b: &Array<V8<F>>,
    b_base: u32,
    col0: u32,
    n: u32,
    k: u32,
    #[comptime] bm: u32,
    #[comptime] bn: u32,
    #[comptime] bk: u32,
    #[comptime] units: u32,
    #[comptime] trans_b: bool,
) {
    // b's slice: [bk][bn] row-major, or with trans_b [bn][bk] (one row per column).
    let b_rows = comptime!(if trans_b { bn } else { bk });
    let b_cols = comptime!(if trans_b { bk } else { bn });
    let mut a_regs = Array::<V8<F>>::new(comptime!((bm * bk / 8).div_ceil(units) as usize));
    let mut b_regs = Array::<V8<F>>::new(comptime!((b_rows * b_cols / 8).div_ceil(units) as usize));
    let mut a_s = SharedMemory::<V8<F>>::new(comptime!((bm * (bk + 8) / 8) as usize));
    let mut b_s = SharedMemory::<V8<F>>::new(comptime!((b_rows * (b_cols + 8) / 8) as usize));
    let a_base = a_row0 * (k / 8);
    fetch_operands::<S, F>(
        &mut a_regs,
        &mut b_regs,
        a,
        a_base,
        a_rows_valid,
        b,
        b_base,
        col0,
        0,
        n,
        k,
        bm,
        bn,
        bk,
        units,
        trans_b,
    );
    let mut k0 = 0u32;
    while k0 < k {
        stage_tile_v8::<F>(&mut a_s, &a_regs, bm, bk, units);
        stage_tile_v8::<F>(&mut b_s, &b_regs, b_rows, b_cols, units);
        sync_cube();
        // The next slice's loads go out before this slice's products.
        if k0 + bk < k {
            fetch_operands::<S, F>(
                &mut a_regs,
                &mut b_regs,
                a,
                a_base,
                a_rows_valid,
                b,
                b_base,
                col0,
                k0 + bk,
                n,
                k,
                bm,
                bn,
                bk,
                units,
                trans_b,
            );
        }
        block.mma::<F, V8<F>>(
            &a_s,
            comptime!(bk + 8),
            &b_s,
            comptime!(b_cols + 8),
            trans_b,
            bk,
            8u32,
        );
        sync_cube();
        k0 += bk;
    }
}

/// Loads the K slice from `k0` of the tile's a rows (from vector `a_base`, rows K/8
/// vectors apart) and b columns into the units' registers (see `fetch_tile_v8`):
/// a `[bm][bk]`, b `[bk][bn]` or, with `trans_b`, `[bn][bk]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_operands<S: Float, F: Float>(
    a_regs: &mut Array<V8<F>>,
    b_regs: &mut Array<V8<F>>,
    a: &Array<V8<S>>,
    a_base: u32,
    a_rows_valid: u32,
    b: &Array<V8<F>>,
    b_base: u32,
    col0: u32,
    k0: u32,
    n: u32,
    k: u32,
    #[comptime] bm: u32,
    #[comptime] bn: u32,
    #[comptime] bk: u32,
    #[comptime] units: u32,
    #[comptime] trans_b: bool,
) {
    let kv = k / 8;
    fetch_tile_v8::<S, F>(
        a_regs,
        a,
        a_base + k0 / 8,
        kv,
        a_rows_valid,
        k - k0,
        bm,
        bk,
        units,
    );
    if comptime!(trans_b) {
        fetch_tile_v8::<F, F>(
            b_regs,
            b,
            b_base + col0 * kv + k0 / 8,
            kv,
            n - col0,
            k - k0,
            bn,
            bk,
            units,
        );
    } else {
        let nv = n / 8;
        fetch_tile_v8::<F, F>(
            b_regs,
            b,
            b_base + k0 * nv + col0 / 8,
            nv,
            k - k0,
            n - col0,
            bk,
            bn,
            units,
        );
    }
}
