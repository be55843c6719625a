//! Cube-wide prefix scans (one value per unit, in unit order) through shared memory:
//! the building block of chunked cumulative sums (GLA's log-decay cumsum, MoE's
//! per-expert offsets). Hillis-Steele over log2(units) steps: a fixed combination
//! order, so results are deterministic run to run. Every unit of the cube must call
//! these (they contain barriers); `units` is a power of two equal to the cube size.

use cubecl::prelude::*;

/// The combination a scan applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScanOp {
    /// `a + b`.
    Sum,
    /// `ln(e^a + e^b)`, stable: `max + ln(1 + e^(min - max))`; two -inf give -inf.
    LogAddExp,
}

/// `ln(e^a + e^b)` without overflow. When `a == b` (both -inf included) the exponent
/// is taken as 0, giving `a + ln 2` (= -inf for -inf) instead of `-inf - -inf` = NaN.
/// A NaN on either side gives NaN (CUDA's fmax and fmin return the other operand).
#[cube]
pub fn log_add_exp(a: f32, b: f32) -> f32 {
    let hi = max(a, b);
    let lo = min(a, b);
    let d = select(hi == lo, 0.0, lo - hi);
    let sum = hi + f32::ln(1.0 + f32::exp(d));
    select(f32::is_nan(a) || f32::is_nan(b), a + b, sum)
}

/// The floor kiln's chunked GLA kernels put under log gates before summing them:
/// `exp(-110)` is 0 in f32 (below the smallest subnormal), so a gate at or below it
/// already means full forgetting, and the floor keeps cumulative sums finite. A gate
/// of `-inf` (the log of a zero decay) would otherwise make `b_i - b_j` of two later
/// positions `-inf - -inf = NaN`; floored, it is exactly the full forgetting the
/// recurrence gives. NaN stays NaN.
pub const LOG_GATE_FLOOR: f32 = -110.0;

/// `max(g, LOG_GATE_FLOOR)` that keeps NaN (see [`LOG_GATE_FLOOR`]).
#[cube]
pub fn floor_log_gate(g: f32) -> f32 {
    select(g < -110.0, -110.0, g)
}

/// [`floor_log_gate()`] on four lanes.
#[cube]
pub fn floor_log_gate_v4(g: Vector<f32, Const<4>>) -> Vector<f32, Const<4>> {
    let floor = Vector::<f32, Const<4>>::new(-110.0);
    select_many(g.less_than(floor), floor, g)
}

#[cube]
fn combine(a: f32, b: f32, #[comptime] op: ScanOp) -> f32 {
    if comptime!(op == ScanOp::Sum) {
        a + b
    } else {
        log_add_exp(a, b)
    }
}

/// Inclusive scan: unit `u` receives `value_0 (op) value_1 (op) ... (op) value_u`.
#[cube]
pub fn cube_inclusive_scan(
    smem: &mut SharedMemory<f32>,
    value: f32,
    #[comptime] units: u32,
    #[comptime] op: ScanOp,
) -> f32 {
    let u = UNIT_POS as usize;
    smem[u] = value;
    sync_cube();
    let mut offset = 1u32.runtime();
    while offset < units {
        let mine = smem[u];
        let mut combined = mine;
        if UNIT_POS >= offset {
            combined = combine(smem[u - offset as usize], mine, op);
        }
        // Everyone reads before anyone writes this step's results.
        sync_cube();
        smem[u] = combined;
        sync_cube();
        offset *= 2;
    }
    let r = smem[u];
    sync_cube();
    r
}

/// Exclusive prefix sum: unit `u` receives `value_0 + ... + value_(u-1)` (0 for unit 0),
/// read from the inclusive scan's neighbour rather than computed as `inclusive - value`
/// (which would not be exact in floating point).
#[cube]
pub fn cube_exclusive_sum(smem: &mut SharedMemory<f32>, value: f32, #[comptime] units: u32) -> f32 {
    let _inclusive = cube_inclusive_scan(smem, value, units, ScanOp::Sum);
    // The scan left every unit's inclusive value in smem (its final barrier ran).
    let u = UNIT_POS as usize;
    let mut r = 0.0f32;
    if UNIT_POS > 0 {
        r = smem[u - 1];
    }
    sync_cube();
    r
}
