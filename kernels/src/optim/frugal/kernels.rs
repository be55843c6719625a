//! FRUGAL's kernels: expanding chosen rows or columns into coordinates, packing a
//! redrawn subset into its sorted indices and bit mask, and
//! the step (Adam on the subset's coordinates, found by binary search; signSGD on the
//! rest), over up to `SLOTS` tensors a launch.

use super::*;
use kiln_dsl::linear_unit;

/// Position of the first of `indices[at .. at + k]` (increasing) that is `>= e`, counted
/// from `at`.
#[cube]
fn lower_bound(indices: &Array<i32>, at: u32, k: u32, e: u32) -> u32 {
    let mut lo = 0u32;
    let mut hi = k;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if u32::cast_from(indices[(at + mid) as usize]) < e {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Packs one tensor's subset: copies `picked[..k]` (sorted) to `indices[indices_at ..]`
/// and writes word `w`'s pair `mask[mask_at + 2 w ..]`: its bits (bit `b` set where
/// `32 w + b` is in the subset) and how many of the subset come before it (its first
/// entry's state slot). Unit `w` finds its word's entries by binary search: one writer
/// per word, no atomics. `units` = `max(words, k)`.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(units.div_ceil(UNITS)), cube = UNITS)]
pub fn frugal_mask(
    picked: &Array<i32>,
    indices: &mut Array<i32>,
    mask: &mut Array<u32>,
    k: u32,
    words: u32,
    units: u32,
    indices_at: u32,
    mask_at: u32,
) {
    let w = linear_unit() as u32;
    if w < units {
        if w < k {
            indices[(indices_at + w) as usize] = picked[w as usize];
        }
        if w < words {
            let mut j = lower_bound(picked, 0, k, w * 32);
            mask[(mask_at + 2 * w + 1) as usize] = j;
            let mut bits = 0u32;
            while j < k {
                let i = u32::cast_from(picked[j as usize]);
                if i >= w * 32 + 32 {
                    break;
                }
                bits |= 1u32 << (i - w * 32);
                j += 1;
            }
            mask[(mask_at + 2 * w) as usize] = bits;
        }
    }
}

/// Expands the `taken` chosen lines (`lines`, increasing) of a `[rows, cols]` matrix into
/// their `k` coordinates, increasing: with `columns`, row `r`'s entry of every chosen
/// column (`k = rows · taken`, position `r · taken + c`); else every entry of each chosen
/// row (`k = taken · cols`). Row-major order keeps the subset sorted, as the mask's
/// binary search wants it.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(k.div_ceil(UNITS)), cube = UNITS)]
pub fn frugal_lines(
    lines: &Array<i32>,
    picked: &mut Array<i32>,
    k: u32,
    taken: u32,
    cols: u32,
    columns: u32,
) {
    let u = linear_unit() as u32;
    if u < k {
        let mut at = 0u32;
        if columns == 1u32 {
            at = (u / taken) * cols + u32::cast_from(lines[(u % taken) as usize]);
        } else {
            at = u32::cast_from(lines[(u / cols) as usize]) * cols + u % cols;
        }
        picked[u as usize] = i32::cast_from(at);
    }
}

slot_kernel! {
    /// One FRUGAL step over up to six tensors (slots; the table's words per slot: first
    /// cube, `n`, `k`, subset, mask and state offsets, two unused), one unit per coordinate, each cube
    /// within one slot: Adam where the mask is set (everywhere when `k = n`, nowhere when
    /// `k = 0`), its state slot the word's count of earlier entries plus the set bits
    /// below it (O(1): no search), signSGD elsewhere; `t = counter[0] + 1` counts from the redraw (at `t = 1` the
    /// moments start from zero). f32 arithmetic; with `master` the slot's f32 master copy
    /// (behind its moments) is the parameter and the weight receives its rounding. In
    /// place: one configuration.
    #[kernel(
        tune(UNITS = [256], PER = [4]),
        vector = [1],
        key(len = pow2, dtype),
        grid = cubes(cubes),
        cube = UNITS,
        domain(slots = 1..=6)
    )]
    pub fn frugal_step(
        mask: &Array<u32>,
        state: &mut Array<f32>,
        table: &Array<u32>,
        counter: &Array<u32>,
        len: u32,
        cubes: u32,
        lr: f32,
        lr_free: f32,
        beta1: f32,
        beta2: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        ln_beta1: f32,
        ln_beta2: f32,
        eps: f32,
        decay: f32,
        #[comptime] master: bool,
        #[comptime] slots: u32,
    ) {
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        // The slot and its constants before any branch (uniform in the cube: loaded once).
        let b = slot_of(table, cube, slots);
        let t = b * comptime!(SLOT_WORDS as u32);
        let first_cube = table[t as usize];
        let n = table[(t + 1) as usize];
        let k = table[(t + 2) as usize];
        let mask_at = table[(t + 4) as usize];
        let state_at = table[(t + 5) as usize];
        let local = counter[0];
        let moments = adam_constants(
            beta1,
            beta2,
            one_minus_beta1,
            one_minus_beta2,
            ln_beta1,
            ln_beta2,
            eps,
            f32::cast_from(local + 1),
        );
        if cube < cubes {
            // Each unit updates PER coordinates, UNITS apart (consecutive units touch
            // consecutive coordinates): the slot lookup and the step's constants (two
            // exponentials) are paid once per PER, not per coordinate.
            #[unroll]
            for rep in 0..PER {
                let e = (cube - first_cube) * comptime!(UNITS * PER) + rep * UNITS + UNIT_POS;
                if e < n {
                    let g = f32::cast_from(select_slot(g0, g1, g2, g3, g4, g5, b, e, slots)[0]);
                    let master_at = state_at + 2 * k + e;
                    let mut p = 0.0f32;
                    if comptime!(master) {
                        p = state[master_at as usize];
                    }
                    if comptime!(!master) {
                        p = f32::cast_from(select_slot(w0, w1, w2, w3, w4, w5, b, e, slots)[0]);
                    }
                    p *= decay;
                    // A whole tensor with state (`k = n`: a density of 1, or an active block)
                    // or none (`k = 0`: an inactive block) needs no mask. Otherwise the
                    // coordinate's word gives both whether it has state and where: the
                    // subset's entries before the word plus the set bits below this one (a
                    // binary search here cost 20 dependent loads a coordinate at k = 10^6).
                    let full = k == n;
                    let mut active = full;
                    let mut j = state_at + e;
                    if !full && k > 0u32 {
                        let at = mask_at + 2 * (e / 32);
                        let bit = e % 32;
                        let word = mask[at as usize];
                        active = ((word >> bit) & 1u32) == 1u32;
                        let below = word & ((1u32 << bit) - 1u32);
                        j = state_at + mask[(at + 1) as usize] + u32::count_ones(below);
                    }
                    if active {
                        if local == 0u32 {
                            // First step of a subspace: the slot held another coordinate's state.
                            state[j as usize] = 0.0;
                            state[(j + k) as usize] = 0.0;
                        }
                        adam_moments(state, j, k, g, moments, false);
                        p -= lr * adam_direction(state, j, k, moments);
                    } else {
                        // sign(0) = 0: a zero gradient leaves the coordinate alone.
                        let s = select(g > 0.0, 1.0f32, select(g < 0.0, -1.0f32, 0.0f32));
                        p -= lr_free * s;
                    }
                    if comptime!(master) {
                        state[master_at as usize] = p;
                    }
                    let out = Vector::<F, N>::new(F::cast_from(p));
                    store_slot(w0, w1, w2, w3, w4, w5, b, e, out, slots);
                }
            }
        }
    }
}
