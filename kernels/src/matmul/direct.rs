//! The direct register-tiled kernels: every unit reads its fragments straight from
//! global memory, rows and columns past the edge clamped (no shared memory, no
//! barriers: what CPU adapters want); `matmul_direct_v4` keeps 4-wide vector
//! accumulators. Tile layout: see `tiled`.

use super::tiled::{
    clamped_strided, fma_matmul, tile_from_v4, zero_tile_v4, FmaPlan, Fused, MainLoop, TileShape,
    UnitTile,
};
use super::Activation;
use cubecl::prelude::*;

fma_kernel! {
    /// `c = epilogue(a @ b)` with fragments read straight from global memory (no shared
    /// memory, no barriers), 4-wide vector accumulators.
    matmul_direct_v4 = DirectV4,
    tune((BM, BN, TM, TN) = [(64, 64, 8, 8), (32, 128, 4, 8), (4, 256, 1, 4)]),
    require(TN % 4 == 0),
    bk = 0,
}

fma_kernel! {
    /// `c = epilogue(a @ b)` with fragments read straight from global memory (no shared
    /// memory, no barriers).
    matmul_direct = Direct,
    tune((BM, BN, TM, TN) = [
        (32, 32, 4, 4),
        (64, 64, 8, 8),
        (32, 128, 4, 8),
        (4, 256, 1, 4),
        (1, 256, 1, 4),
        (1, 64, 1, 1),
    ]),
    require(),
    bk = 0,
}

/// The direct main loop with 4-wide vector accumulators: a unit reads its `TN / 4`
/// column groups from global memory as one vector per step.
#[cube]
pub(super) fn direct_v4_product<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    acc: &mut Array<f32>,
    unit: &UnitTile,
    #[comptime] plan: FmaPlan,
) {
    let (tm, tn, trans_b) = comptime!((plan.tile.tm, plan.tile.tn, plan.trans_b));
    let (_, rows_of_units, cols_of_units) = comptime!(plan.tile.units());
    let (m, n, k) = (unit.m, unit.n, unit.k);
    let mut a_frag = Array::<f32>::new(comptime!(tm as usize));
    // Direct, with 4-wide vector accumulators: a unit owns TN / 4 groups of 4
    // adjacent columns, reads them from global memory as one vector per step and
    // does TM x TN / 4 vector FMAs. Clamped rows and columns as in the scalar path.
    let tnv = comptime!(tn / 4);
    let mut accv = Array::<Vector<f32, Const<4>>>::new(comptime!((tm * tnv) as usize));
    zero_tile_v4(&mut accv, tm * tnv);
    let mut rows = Array::<u32>::new(comptime!(tm as usize));
    let mut cols = Array::<u32>::new(comptime!(tn as usize));
    clamped_strided(&mut rows, unit.row0 + unit.ty, rows_of_units, m - 1, tm);
    #[unroll]
    for j in 0..tn {
        cols[j as usize] = min(
            unit.col0 + (unit.tx + (j / 4) * cols_of_units) * 4 + j % 4,
            n - 1,
        );
    }
    let mut kk = 0u32;
    while kk < k {
        #[unroll]
        for i in 0..tm {
            a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
        }
        #[unroll]
        for jv in 0..tnv {
            let mut bv = Vector::<f32, Const<4>>::empty();
            #[unroll]
            for e in 0..4u32 {
                let cj = cols[(jv * 4 + e) as usize];
                if comptime!(trans_b) {
                    bv[e as usize] = f32::cast_from(b[(cj * k + kk) as usize]);
                } else {
                    bv[e as usize] = f32::cast_from(b[(kk * n + cj) as usize]);
                }
            }
            #[unroll]
            for i in 0..tm {
                let e = (i * tnv + jv) as usize;
                accv[e] += Vector::new(a_frag[i as usize]) * bv;
            }
        }
        kk += 1;
    }
    tile_from_v4(&accv, acc, tm, tn);
}

/// The direct main loop: each unit reads its fragments from global memory, K exactly
/// (no padding, no zero fill); rows and columns past the edge are clamped.
#[cube]
pub(super) fn direct_product<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    acc: &mut Array<f32>,
    unit: &UnitTile,
    #[comptime] plan: FmaPlan,
) {
    let (tm, tn, trans_b) = comptime!((plan.tile.tm, plan.tile.tn, plan.trans_b));
    let (_, rows_of_units, cols_of_units) = comptime!(plan.tile.units());
    let (m, n, k) = (unit.m, unit.n, unit.k);
    let mut a_frag = Array::<f32>::new(comptime!(tm as usize));
    let mut b_frag = Array::<f32>::new(comptime!(tn as usize));
    // Each unit reads its own fragments from global memory, K exactly (no padding,
    // so no zero fill). Rows and columns past the edge are clamped to the last one:
    // computed, never stored.
    let mut rows = Array::<u32>::new(comptime!(tm as usize));
    let mut cols = Array::<u32>::new(comptime!(tn as usize));
    clamped_strided(&mut rows, unit.row0 + unit.ty, rows_of_units, m - 1, tm);
    clamped_strided(&mut cols, unit.col0 + unit.tx, cols_of_units, n - 1, tn);
    let mut kk = 0u32;
    while kk < k {
        #[unroll]
        for i in 0..tm {
            a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
        }
        #[unroll]
        for j in 0..tn {
            if comptime!(trans_b) {
                b_frag[j as usize] = f32::cast_from(b[(cols[j as usize] * k + kk) as usize]);
            } else {
                b_frag[j as usize] = f32::cast_from(b[(kk * n + cols[j as usize]) as usize]);
            }
        }
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[(i * tn + j) as usize] += a_frag[i as usize] * b_frag[j as usize];
            }
        }
        kk += 1;
    }
}
