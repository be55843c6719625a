//! Cube-wide reductions through shared memory.
//!
//! A tree over shared memory rather than plane (warp) operations: cubecl-wgpu turns
//! plane operations off on CPU adapters such as lavapipe, so this path runs everywhere.
//! Every unit of the cube must call these (they contain barriers).

use cubecl::prelude::*;

/// Maximum of `value` over the `units` units of the cube (`units` a power of two equal
/// to the cube size, `smem` at least `units` long). Every unit receives the result.
#[cube]
pub fn cube_max(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    let u = UNIT_POS as usize;
    smem[u] = value;
    sync_cube();
    let mut stride = (units / 2).runtime();
    while stride > 0 {
        if UNIT_POS < stride {
            smem[u] = max(smem[u], smem[u + stride as usize]);
        }
        sync_cube();
        stride /= 2;
    }
    let r = smem[0];
    // Nobody may overwrite smem[0] until every unit has read it.
    sync_cube();
    r
}

/// Sum of `value` over the `units` units of the cube; same contract as [`cube_max`].
/// The tree order is fixed, so the result is deterministic run to run.
#[cube]
pub fn cube_sum(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    let u = UNIT_POS as usize;
    smem[u] = value;
    sync_cube();
    let mut stride = (units / 2).runtime();
    while stride > 0 {
        if UNIT_POS < stride {
            smem[u] += smem[u + stride as usize];
        }
        sync_cube();
        stride /= 2;
    }
    let r = smem[0];
    sync_cube();
    r
}
