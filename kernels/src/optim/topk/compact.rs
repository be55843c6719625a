//! Compaction of a selection in index order from its candidates alone (every key it can
//! take was kept, in index order per region, by [`topk_radix_compact`] or
//! [`topk_form_candidates`]): per-cube counts (and each region's offset inside its cube),
//! a one-cube scan of the counts, and the write. The error feedback `a − c` is `a`, as
//! the pass that formed it wrote it, overwritten where taken.
// Kernel code: `(a + b - 1) / b` is what the emitted code does, written as such.
#![allow(clippy::manual_div_ceil)]

use super::*;
use kiln_dsl::lane_of;

/// Per cube: how many candidates are above the threshold `T = state[0]` and how many
/// equal it (`counts[2 cube ..]`), and per unit (region) how many of each come before
/// its own in the cube (`before[cube UNITS + unit]`, both in one u32): the write's slots
/// without counting again.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_candidates_count(
    candidates: &Array<Vector<u32, Const<4>>>,
    stored: &Array<u32>,
    state: &Array<u32>,
    counts: &mut Array<u32>,
    before: &mut Array<u32>,
    cubes: u32,
    key_mask: u32,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let t = state[0];
    let region = cube * UNITS + UNIT_POS;
    let mut both = 0u32;
    if cube < cubes {
        // 4-wide, as the candidate histogram passes read them.
        let at = region * comptime!(PER_UNIT / 4);
        let len = stored[region as usize];
        for i in 0..(len + 3u32) / 4u32 {
            let kv = candidates[(at + i) as usize];
            #[unroll]
            for l in 0..4u32 {
                let counted = above_and_ties(kv[l as usize] & key_mask, t);
                both += select(4u32 * i + l < len, counted, 0u32);
            }
        }
    }
    store_counts(both, counts, before, cube, cubes);
}

/// A unit's counts above and at `T` (`both`, from [`above_and_ties`]) to `before` (the
/// counts of the units before it in the cube) and the cube's totals to `counts[2 cube ..]`.
/// Every unit must call it.
#[cube]
pub(super) fn store_counts(
    both: u32,
    counts: &mut Array<u32>,
    before: &mut Array<u32>,
    cube: u32,
    cubes: u32,
) {
    let mut smem = SharedMemory::<u32>::new(comptime!((CUBE + BINS) as usize));
    let mine = cube_exclusive_sum_u32(&mut smem, both);
    if cube < cubes {
        before[(cube * comptime!(CUBE) + UNIT_POS) as usize] = mine;
        if UNIT_POS == comptime!(CUBE - 1) {
            let total = mine + both;
            counts[(2 * cube) as usize] = total & 65535u32;
            counts[(2 * cube + 1) as usize] = total >> 16u32;
        }
    }
}

/// Exclusive prefix sum of a u32 over the cube's `CUBE` units, in unit order (exact):
/// `BINS` units each scan `BINS` consecutive values serially, then one unit the `BINS`
/// group totals. Four barriers, where a Hillis–Steele scan takes eighteen: on a CPU
/// adapter each barrier switches every SIMD slice of the cube. `smem` holds
/// `CUBE + BINS` words; every unit must call it.
#[cube]
pub(super) fn cube_exclusive_sum_u32(smem: &mut SharedMemory<u32>, value: u32) -> u32 {
    let groups = comptime!(CUBE / BINS);
    smem[UNIT_POS as usize] = value;
    sync_cube();
    if UNIT_POS < groups {
        let mut run = 0u32;
        for i in 0..comptime!(BINS) {
            let at = (UNIT_POS * comptime!(BINS) + i) as usize;
            let v = smem[at];
            smem[at] = run;
            run += v;
        }
        smem[(comptime!(CUBE) + UNIT_POS) as usize] = run;
    }
    sync_cube();
    if UNIT_POS == 0 {
        let mut run = 0u32;
        for g in 0..groups {
            let at = (comptime!(CUBE) + g) as usize;
            let v = smem[at];
            smem[at] = run;
            run += v;
        }
    }
    sync_cube();
    let r = smem[UNIT_POS as usize] + smem[(comptime!(CUBE) + UNIT_POS / comptime!(BINS)) as usize];
    sync_cube();
    r
}

/// `1` for a key above `t`, `1 << 16` for a key equal to it: a unit's (or a cube's)
/// counts of both in one u32 (at most `CHUNK` = 32768 each).
#[cube]
fn above_and_ties(key: u32, t: u32) -> u32 {
    select(key > t, 1u32, 0u32) + select(key == t, 65536u32, 0u32)
}

/// One cube: exclusive prefix sums over the cubes, in order, of the keys above `T`
/// (`offsets[2c]`) and of the keys equal to it (`offsets[2c + 1]`). Each unit takes a
/// contiguous run of cubes.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (1), cube = UNITS)]
pub fn topk_scan(counts: &Array<u32>, offsets: &mut Array<u32>, cubes: u32) {
    let per = (cubes + UNITS - 1) / UNITS;
    let first = UNIT_POS * per;
    let mut gt = 0u32;
    let mut eq = 0u32;
    for i in 0..per {
        let c = first + i;
        if c < cubes {
            gt += counts[(2 * c) as usize];
            eq += counts[(2 * c + 1) as usize];
        }
    }
    let mut smem = SharedMemory::<u32>::new(comptime!((CUBE + BINS) as usize));
    let mut gt_before = cube_exclusive_sum_u32(&mut smem, gt);
    let mut eq_before = cube_exclusive_sum_u32(&mut smem, eq);
    for i in 0..per {
        let c = first + i;
        if c < cubes {
            offsets[(2 * c) as usize] = gt_before;
            offsets[(2 * c + 1) as usize] = eq_before;
            gt_before += counts[(2 * c) as usize];
            eq_before += counts[(2 * c + 1) as usize];
        }
    }
}

/// The compaction from the candidates: a candidate is taken when its key is above `T`,
/// or equal with fewer than `k_rem = state[1]` equal keys before it; its slot is the
/// number of taken elements before it (`offsets`, `before`). `error` holds `a` (written
/// by the pass that formed it); a taken element's becomes `keep · a` (exactly 0 for top-k's `keep =
/// 0`, even where `a` is ±inf), the rest stay. `a` is the candidate's word itself with
/// `keys_are_values` (magnitude keys, the sign kept), else read from `error`.
/// `residual[c]` is the cube's sum of error²: the units' `below` (the elements no
/// candidate) and their candidates'.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_candidates_write(
    candidates: &Array<Vector<u32, Const<4>>>,
    positions: &Array<u32>,
    stored: &Array<u32>,
    below: &Array<f32>,
    state: &Array<u32>,
    offsets: &Array<u32>,
    before: &Array<u32>,
    indices: &mut Array<i32>,
    values: &mut Array<f32>,
    error: &mut Array<f32>,
    residual: &mut Array<f32>,
    cubes: u32,
    key_mask: u32,
    scale: f32,
    keep: f32,
    #[comptime] keys_are_values: bool,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let region = cube * UNITS + UNIT_POS;
    let t = state[0];
    let k_rem = state[1];
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let mut squares = 0.0f32;
    if cube < cubes {
        squares = below[region as usize];
        let mine = before[region as usize];
        let mut ties = offsets[(2 * cube + 1) as usize] + (mine >> 16u32);
        // Taken ties before this unit: all earlier ties, capped at k_rem.
        let mut slot = offsets[(2 * cube) as usize] + (mine & 65535u32) + min(ties, k_rem);
        // 4-wide, with the word of their four offsets.
        let at = region * comptime!(PER_UNIT / 4);
        let first = cube * comptime!(CHUNK) + UNIT_POS * comptime!(PER_UNIT);
        let len = stored[region as usize];
        for i in 0..(len + 3u32) / 4u32 {
            let kv = candidates[(at + i) as usize];
            let offsets4 = positions[(at + i) as usize];
            // Which lanes are taken, decided in index order (the ties before each), then
            // the stores for those alone: a store per lane under a branch would be a loop
            // over the SIMD lanes on a CPU adapter for every candidate, taken or not.
            let mut taken_lanes = 0u32;
            let mut words = Vector::<u32, Const<4>>::new(0u32);
            #[unroll]
            for l in 0..4u32 {
                let inside = 4u32 * i + l < len;
                let word = kv[l as usize];
                let key = word & key_mask;
                let mut v = 0.0f32;
                if comptime!(keys_are_values) {
                    v = f32::reinterpret(word);
                } else if inside {
                    v = error[(first + ((offsets4 >> (l * 8u32)) & 255u32)) as usize];
                }
                words[l as usize] = u32::reinterpret(v);
                let tie = key == t && inside;
                let taken = inside && (key > t || (tie && ties < k_rem));
                taken_lanes |= select(taken, 1u32 << l, 0u32);
                squares += select(inside && !taken, v * v, 0.0f32);
                ties += select(tie, 1u32, 0u32);
            }
            while taken_lanes != 0u32 {
                let l = u32::trailing_zeros(taken_lanes);
                taken_lanes &= taken_lanes - 1u32;
                let e = first + ((offsets4 >> (l * 8u32)) & 255u32);
                let v = f32::reinterpret(lane_of(words, l));
                indices[slot as usize] = i32::cast_from(e);
                values[slot as usize] = scale * v;
                slot += 1;
                // inf * 0 would be NaN: a taken value leaves exactly nothing behind.
                let r = select(keep == 0.0, 0.0f32, keep * v);
                error[e as usize] = r;
                squares += r * r;
            }
        }
    }
    let total = cube_sum(&mut smem, squares, UNITS);
    if cube < cubes && UNIT_POS == 0 {
        residual[cube as usize] = total;
    }
}
