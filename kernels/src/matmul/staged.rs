//! The staged register-tiled kernels: `BK`-deep K slices of `a` (depth-major) and `b`
//! in shared memory, zero-filled past the edges (the GPU path), loaded with the DSL's
//! `load_tile`; `matmul_staged` multiplies with its `reg_tile_mma`, `matmul_staged_v4`
//! holds b's slice and the accumulators as 4-wide vectors. Tile layout: see `tiled`.

use super::tiled::{
    fma_matmul, tile_from_v4, zero_tile_v4, FmaPlan, Fused, MainLoop, TileShape, UnitTile,
};
use super::Activation;
use cubecl::prelude::*;
use kiln_dsl::{load_tile, reg_tile_mma};

fma_kernel! {
    /// `c = epilogue(a @ b)` with K slices staged in shared memory (the GPU path).
    matmul_staged = Staged,
    tune((BM, BN, BK, TM, TN) = [
        (64, 64, 16, 4, 4),
        (64, 64, 8, 8, 8),
        (128, 128, 8, 8, 8),
        (64, 128, 16, 4, 8),
        (16, 64, 32, 1, 4),
    ]),
    require((((BM + BN) * BK * 4) as usize) <= device.max_shared_memory),
    bk = BK,
}

fma_kernel! {
    /// `c = epilogue(a @ b)` with K slices staged in shared memory, b's slice and the
    /// accumulators as 4-wide vectors.
    matmul_staged_v4 = StagedV4,
    tune((BM, BN, BK, TM, TN) = [
        (64, 64, 16, 4, 4),
        (64, 64, 8, 8, 8),
        (128, 128, 8, 8, 8),
        (128, 128, 16, 8, 8),
    ]),
    require(TN % 4 == 0, (((BM + BN) * BK * 4) as usize) <= device.max_shared_memory),
    bk = BK,
}

/// The staged main loop: `BK`-deep slices of `a` (depth-major) and `b` (row-major)
/// loaded into shared memory by the DSL's bounds-masked `load_tile` (zeros past the
/// edges keep the FMAs uniform), multiplied into the unit's register tile by its
/// `reg_tile_mma` (rows and columns strided across units, see `tiled`).
#[cube]
#[allow(clippy::too_many_arguments, unused_variables)]
pub(super) fn staged_product<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    acc: &mut Array<f32>,
    unit: &UnitTile,
    #[comptime] plan: FmaPlan,
) {
    let (tile, trans_b, bk) = comptime!((plan.tile, plan.trans_b, plan.bk));
    let (bm, bn, tm, tn) = comptime!((tile.bm, tile.bn, tile.tm, tile.tn));
    let (units, _, _) = comptime!(tile.units());
    let (m, n, k) = (unit.m, unit.n, unit.k);
    let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
    let mut b_s = SharedMemory::<f32>::new(comptime!((bk * bn) as usize));
    // The grid covers the matrix, so row0 < m and col0 < n.
    let (rows, cols) = (m - unit.row0, n - unit.col0);
    let mut k0 = 0u32;
    while k0 < k {
        let depth = k - k0;
        // a [M, K]: rows row0.., depth k0.., stored depth-major ([bk][bm]).
        load_tile::<F>(
            &mut a_s,
            0,
            a,
            unit.row0 * k + k0,
            k,
            rows,
            depth,
            bm,
            bk,
            true,
            units,
        );
        if comptime!(trans_b) {
            // b [N, K]: its rows are c's columns; depth-major is b_s's [bk][bn].
            load_tile::<F>(
                &mut b_s,
                0,
                b,
                unit.col0 * k + k0,
                k,
                cols,
                depth,
                bn,
                bk,
                true,
                units,
            );
        } else {
            load_tile::<F>(
                &mut b_s,
                0,
                b,
                k0 * n + unit.col0,
                n,
                depth,
                cols,
                bk,
                bn,
                false,
                units,
            );
        }
        sync_cube();
        reg_tile_mma::<f32>(acc, &a_s, 0, &b_s, 0, unit.ty, unit.tx, bm, bn, bk, tm, tn);
        sync_cube();
        k0 += bk;
    }
}

/// The staged main loop with b's slice and the accumulators as 4-wide vectors: a unit
/// owns `TN / 4` groups of 4 adjacent columns (groups strided across units).
#[cube]
#[allow(clippy::too_many_arguments, unused_variables)]
pub(super) fn staged_v4_product<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    acc: &mut Array<f32>,
    unit: &UnitTile,
    #[comptime] plan: FmaPlan,
) {
    let (tile, trans_b, bk) = comptime!((plan.tile, plan.trans_b, plan.bk));
    let (bm, bn, tm, tn) = comptime!((tile.bm, tile.bn, tile.tm, tile.tn));
    let (units, rows_of_units, cols_of_units) = comptime!(tile.units());
    let (m, n, k) = (unit.m, unit.n, unit.k);
    let (row0, col0, ty, tx) = (unit.row0, unit.col0, unit.ty, unit.tx);
    let mut a_frag = Array::<f32>::new(comptime!(tm as usize));
    // Staged, with b's slice and the accumulators as 4-wide vectors: a unit owns
    // TN / 4 groups of 4 adjacent columns (groups strided across units), so each
    // step is one vector load of b and TM x TN / 4 vector FMAs (a's value splat).
    let tnv = comptime!(tn / 4);
    let bnv = comptime!(bn / 4);
    let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
    let mut b_s = SharedMemory::<Vector<f32, Const<4>>>::new(comptime!((bk * bnv) as usize));
    let mut accv = Array::<Vector<f32, Const<4>>>::new(comptime!((tm * tnv) as usize));
    zero_tile_v4(&mut accv, tm * tnv);
    let mut k0 = 0u32;
    while k0 < k {
        // a [M, K]: rows row0.., depth k0.., stored depth-major ([bk][bm]).
        load_tile::<F>(
            &mut a_s,
            0,
            a,
            row0 * k + k0,
            k,
            m - row0,
            k - k0,
            bm,
            bk,
            true,
            units,
        );
        let mut idx = UNIT_POS;
        while idx < comptime!(bk * bnv) {
            let kk = idx / bnv;
            let cv = idx % bnv;
            let gk = k0 + kk;
            let mut v = Vector::<f32, Const<4>>::empty();
            #[unroll]
            for e in 0..4u32 {
                let gc = col0 + cv * 4 + e;
                let mut x = 0.0f32;
                if gk < k && gc < n {
                    if comptime!(trans_b) {
                        x = f32::cast_from(b[(gc * k + gk) as usize]);
                    } else {
                        x = f32::cast_from(b[(gk * n + gc) as usize]);
                    }
                }
                v[e as usize] = x;
            }
            b_s[idx as usize] = v;
            idx += units;
        }
        sync_cube();
        #[unroll]
        for kk in 0..bk {
            #[unroll]
            for i in 0..tm {
                a_frag[i as usize] = a_s[(kk * bm + ty + i * rows_of_units) as usize];
            }
            #[unroll]
            for jv in 0..tnv {
                let bv = b_s[(kk * bnv + tx + jv * cols_of_units) as usize];
                #[unroll]
                for i in 0..tm {
                    let e = (i * tnv + jv) as usize;
                    accv[e] += Vector::new(a_frag[i as usize]) * bv;
                }
            }
        }
        sync_cube();
        k0 += bk;
    }
    tile_from_v4(&accv, acc, tm, tn);
}
