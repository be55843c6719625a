//! `matmul_vec4` with `a`'s rows shared across a plane: the eight units of a plane own
//! the same `TM` rows of `c` (and eight different column groups), so each reads
//! `TM / 8` of the rows' vectors and receives the others from the units that read them
//! with `plane_shuffle` from a constant lane. For devices with planes of exactly 8 and
//! shuffles (`DeviceReport::plane_shuffle`): lavapipe on 256-bit SIMD.
//!
//! Why: on lavapipe a cube's units are SIMD lanes, and every non-uniform read of a
//! storage buffer is a loop over the lanes with a bounds check per element (Mesa 22.3,
//! `emit_load_mem`; an address the same in every lane gets no cheaper inside a loop,
//! where the lanes carry an execution mask), while a shuffle from a constant lane is
//! one vector permute. Per four K a unit of `matmul_vec4` reads `TM + TN` vectors for
//! `4 TM TN` FMAs (64 per 4 096 at 32 x 32); here `TM / 8 + TN` (24 per 4 096 at
//! 64 x 16, 16 per 2 048 at 64 x 8). The sums are `matmul_vec4`'s, in the same order
//! (`fma_k_quad` on CPU adapters), so the two agree bit for bit.

use super::vec4::{store_tile_v4, vec4_product};
use super::{clamped_strided, Activation};
use cubecl::prelude::*;
use kiln_dsl::{plane_broadcast_v4, V4};
use kiln_runtime::DeviceReport;

/// The plane size this kernel is written for (the lanes that share a tile's rows; the
/// kernel's `require` and `cube` spell it 8).
pub(crate) const LANES: u32 = 8;

/// `av[i per_row + h]` = vector `h` of row `i` of a unit's `tm`-row tile, from lane
/// `i % 8` of the plane, which read it into its `mine[(i / 8) per_row + h]`: a shuffle
/// from a constant lane per component (lavapipe permutes scalars; a vector shuffle is
/// not what its compiler expects). Every unit of the plane must call it (uniform control
/// flow).
#[cube]
pub(crate) fn plane_rows(
    av: &mut Array<V4>,
    mine: &Array<V4>,
    #[comptime] tm: u32,
    #[comptime] per_row: u32,
) {
    #[unroll]
    for i in 0..tm {
        #[unroll]
        for h in 0..per_row {
            av[(i * per_row + h) as usize] =
                plane_broadcast_v4(mine[((i / LANES) * per_row + h) as usize], i % LANES);
        }
    }
}

/// Whether a tile whose `share` units share their rows of the left operand (1: none; 8:
/// a plane of 8, by shuffles) fits `device`: sharing needs `plane_shuffle`, planes of
/// exactly 8, the plane one unit row of the cube (`bn = 8 tn`) and `tm` a multiple of 8.
/// The `require` of every kernel with a `SHARE` tunable.
pub(crate) fn shares_rows(device: &DeviceReport, share: u32, bn: u32, tm: u32, tn: u32) -> bool {
    share == 1
        || (share == LANES
            && device.plane_shuffle
            && device.plane_size == (LANES, LANES)
            && bn == LANES * tn
            && tm.is_multiple_of(LANES))
}

matmul_kernel! {
    /// `c = epilogue(a @ b)` with `a`, `b` as 4-wide vectors (`k % 4 == 0`,
    /// `n % 4 == 0`), `a`'s rows read once per plane.
    #[kernel(
        // One cube shape per body: the 128-row cubes of the 64 x 16 and 64 x 8 bodies timed
        // within noise of the 64-row ones (1024^3: 90.9 against 90.9 ms), 128 x 8 never
        // won, and each body costs a first tuning about 2 s of llvmpipe compiling.
        tune((BM, BN, TM, TN) = [
            (64, 128, 64, 16),
            (64, 64, 64, 8),
            (32, 128, 32, 16),
            (16, 128, 16, 16),
            (8, 128, 8, 16),
            (8, 256, 8, 32),
        ]),
        require(
            shares_rows(device, 8, BN, TM, TN),
            BM % TM == 0,
            TN % 4 == 0,
            k % 4 == 0,
            n % 4 == 0,
            // Tiles of fewer than 16 rows only where they cover M.
            BM >= 16 || BM >= m.next_power_of_two(),
            TM * TN <= 256 || (m >= BM && n >= BN),
        ),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = ((BM / TM) * 8),
    )]
    matmul_vec4_plane<[Vector<F, Const<4>>], [Vector<F, Const<4>>]> {
        let row_step = comptime!(BM / TM);
        let tnv = comptime!(TN / 4);
        let shared = comptime!(TM / LANES);
        // The plane is eight consecutive units: one row group `ty`, eight column groups.
        let ty = UNIT_POS / LANES;
        let tx = UNIT_POS % LANES;
        let lane = UNIT_POS_PLANE;
        let row0 = CUBE_POS_Y * BM;
        let col0 = CUBE_POS_X * BN;
        let kv = k / 4;
        let nv = n / 4;
        // Tile rows `lane`, `lane + 8`, ... are the ones this unit reads for the plane.
        let mut own = Array::<u32>::new(comptime!(shared as usize));
        clamped_strided(&mut own, row0 + ty + lane * row_step, LANES * row_step, m - 1, shared);
        let mut cols = Array::<u32>::new(comptime!(tnv as usize));
        clamped_strided(&mut cols, col0 / 4 + tx, LANES, nv - 1, tnv);
        let mut accv = Array::<V4>::new(comptime!((TM * tnv) as usize));
        vec4_product::<F>(&mut accv, a, b, &own, &cols, kv, nv, TM, TN, true, trans_b, local_scalars);
        store_tile_v4::<F>(
            c, residual, bias, &mut accv, &cols, row0 + ty, row_step, col0 / 4 + tx, m, nv,
            LANES, TM, tnv, has_bias, has_residual, act, local_scalars,
        );
    }
}
