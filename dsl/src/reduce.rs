//! Cube-wide reductions through shared memory.
//!
//! A tree over shared memory rather than plane (warp) operations: cubecl-wgpu turns
//! plane operations off on CPU adapters such as lavapipe, so this path runs everywhere.
//! Every unit of the cube must call these (they contain barriers).

use cubecl::prelude::*;

/// Which combination [`cube_reduce`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Maximum.
    Max,
}

/// Reduces `value` over the `units` units of the cube (`units` a power of two equal to
/// the cube size, `smem` at least `units` long). Every unit receives the result. The
/// tree order is fixed, so sums are deterministic run to run.
#[cube]
pub fn cube_reduce(
    smem: &mut SharedMemory<f32>,
    value: f32,
    #[comptime] units: u32,
    #[comptime] op: ReduceOp,
) -> f32 {
    let u = UNIT_POS as usize;
    smem[u] = value;
    sync_cube();
    let mut stride = (units / 2).runtime();
    while stride > 0 {
        if UNIT_POS < stride {
            let other = smem[u + stride as usize];
            if comptime!(op == ReduceOp::Sum) {
                smem[u] += other;
            } else {
                smem[u] = max(smem[u], other);
            }
        }
        sync_cube();
        stride /= 2;
    }
    let r = smem[0];
    // Nobody may overwrite smem[0] until every unit has read it.
    sync_cube();
    r
}

/// Maximum over the cube; see [`cube_reduce`].
#[cube]
pub fn cube_max(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    cube_reduce(smem, value, units, ReduceOp::Max)
}

/// Sum over the cube; see [`cube_reduce`].
#[cube]
pub fn cube_sum(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    cube_reduce(smem, value, units, ReduceOp::Sum)
}
