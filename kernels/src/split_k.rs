//! The split-K reduction of the few-row kernels (`matmul_gemv`, `qgemm_gemv`): a cube's
//! `KS` groups of units each hold partial sums over their slice of K for the same
//! `mt x BN` outputs. They stage them in shared memory (layout `[KS][mt][BN]`: units of
//! neighbouring columns write neighbouring words), and one unit per output adds its `KS`
//! partials in slice order, the same order on every run and backend.

use cubecl::prelude::*;

/// Stores the `mt` partial sums `acc` of unit (`slice`, `col`) in `part` (`KS * mt * bn`
/// words) and waits for the whole cube.
#[cube]
pub(crate) fn stage_partials(
    part: &mut SharedMemory<f32>,
    acc: &Array<f32>,
    slice: u32,
    col: u32,
    #[comptime] mt: u32,
    #[comptime] bn: u32,
) {
    #[unroll]
    for r in 0..mt {
        part[((slice * mt + r) * bn + col) as usize] = acc[r as usize];
    }
    sync_cube();
}

/// The sum of the `ks` partials of output (`row`, `col`) of the cube's tile, in slice
/// order.
#[cube]
pub(crate) fn partials_sum(
    part: &SharedMemory<f32>,
    row: u32,
    col: u32,
    #[comptime] mt: u32,
    #[comptime] bn: u32,
    #[comptime] ks: u32,
) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for j in 0..ks {
        sum += part[((j * mt + row) * bn + col) as usize];
    }
    sum
}
