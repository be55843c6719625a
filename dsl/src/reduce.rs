//! Cube-wide reductions through shared memory.
//!
//! A tree over shared memory rather than plane (warp) operations: cubecl-wgpu turns
//! plane operations off on CPU adapters such as lavapipe, so this path runs everywhere.
//! Every unit of the cube must call these (they contain barriers).

use cubecl::prelude::*;

/// Which combination [`cube_reduce()`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Maximum.
    Max,
}

/// Reduces `value` over the `units` units of the cube (`units` a power of two equal to
/// the cube size, `smem` at least `units` long). Every unit receives the result. The
/// order is fixed, so sums are deterministic run to run.
///
/// Two levels instead of a binary tree: `L = min(units, 16)` leaders each combine the
/// column `leader, leader + L, ...` (conflict-free on GPUs' shared-memory banks), then
/// every unit combines the `L` column results in the same order. Three barriers instead
/// of `log2(units) + 2`: a barrier is cheap on a GPU but, on a CPU adapter (lavapipe),
/// a switch of every SIMD slice of the cube, which made LAMB's norms pass barrier-bound.
#[cube]
pub fn cube_reduce(
    smem: &mut SharedMemory<f32>,
    value: f32,
    #[comptime] units: u32,
    #[comptime] op: ReduceOp,
) -> f32 {
    let leaders = comptime!(if units < 16 { units } else { 16 });
    let per_leader = comptime!({
        assert!(
            units.is_multiple_of(leaders),
            "cube_reduce: units must be a power of two"
        );
        units / leaders
    });
    let u = UNIT_POS as usize;
    smem[u] = value;
    sync_cube();
    if UNIT_POS < leaders {
        let mut acc = smem[u];
        #[unroll]
        for j in 1..per_leader {
            let other = smem[u + (j * leaders) as usize];
            if comptime!(op == ReduceOp::Sum) {
                acc += other;
            } else {
                acc = max(acc, other);
            }
        }
        // Only this leader reads index u < leaders at this level: safe to overwrite.
        smem[u] = acc;
    }
    sync_cube();
    let mut r = smem[0];
    #[unroll]
    for j in 1..leaders {
        let other = smem[j as usize];
        if comptime!(op == ReduceOp::Sum) {
            r += other;
        } else {
            r = max(r, other);
        }
    }
    // Nobody may overwrite smem[0..leaders] until every unit has read it.
    sync_cube();
    r
}

/// Maximum over the cube; see [`cube_reduce()`].
#[cube]
pub fn cube_max(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    cube_reduce(smem, value, units, ReduceOp::Max)
}

/// Sum over the cube; see [`cube_reduce()`].
#[cube]
pub fn cube_sum(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    cube_reduce(smem, value, units, ReduceOp::Sum)
}
