//! Rand-k's subset, marked instead of ranked: the indices the seeded permutation `π`
//! sends below `k` are `π⁻¹(0..k)`, so `k` inverse evaluations
//! (`kiln_dsl::unpermute_index`) find them, where ranking every index by `π(i)` took
//! `n`. They are marked in a bitmap (one bit an element, set with atomic ors: the
//! bitmap is the same whatever the order, so the result stays deterministic); past
//! `k = n/2` the `n − k` untaken ones are marked and the bits read inverted. Then
//! per-cube counts of the marks (a popcount of each unit's four words), the one-cube
//! scan, and one pass over `grad` and `error` that forms `a`, writes the error feedback
//! and the taken `(index, value)` pairs at their slots: the three streams a copy
//! moves, plus a bit an element.
//!
//! The layout is the selections': cube `c` covers elements `c CHUNK ..` (`CHUNK` =
//! `CUBE · PER_UNIT`), unit `u` the `PER_UNIT` = 128 from `c CHUNK + u PER_UNIT`, whose
//! marks are the four words `bitmap[4 (c CUBE + u) ..]`.
// `n` beside the `_n` that cubecl's launch expansion gives the `Size` generic `N`
// (an attribute on the kernel does not reach that expansion).
#![allow(clippy::duplicate_underscore_argument)]
#![allow(clippy::too_many_arguments)]
// Kernel code: `%` is what the emitted code does (cubecl has no `is_multiple_of`).
#![allow(clippy::manual_is_multiple_of)]

use super::candidates::a_of;
use super::compact::store_counts;
use super::*;
use kiln_dsl::lane_of;
use kiln_dsl::unpermute_index;

/// Bitmap words a region (a unit's `PER_UNIT` elements).
const REGION_WORDS: u32 = PER_UNIT / 32;
const _: () = assert!(REGION_WORDS == 4 && PER_UNIT % 32 == 0);

/// The `k` elements `π` sends below `k` (`seed` keys `π`) of `a = error + grad`,
/// compacted in index order with `scale`: see the module doc. `k` in `1..=n`.
pub(crate) fn select_random_subset(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
    seed: u64,
    scale: f32,
) -> Result<Selected> {
    let client = grad.client();
    let n = grad.numel();
    let cubes = n.div_ceil(CHUNK as usize);
    let bitmap = Tensor::empty(client, DType::U32, &[cubes * (CHUNK / 32) as usize])?;
    TopkClearWords::tuned(
        client,
        0.0,
        &TopkClearWordsArgs {
            words: &bitmap,
            cubes: cubes as u32,
        },
    )?;
    // Mark the smaller side: `π⁻¹(0..k)` taken, or past n/2 `π⁻¹(k..n)` not taken.
    let invert = k > n / 2;
    let (first, count) = if invert { (k, n - k) } else { (0, k) };
    let key = crate::random::seed_key(seed);
    if count > 0 {
        TopkSubsetMark::tuned(
            client,
            0.0,
            &TopkSubsetMarkArgs {
                bitmap: &bitmap,
                first: first as u32,
                count: count as u32,
                cubes: count.div_ceil(CUBE as usize) as u32,
                n: n as u32,
                bits: crate::random::permutation_bits(n as u32),
                key0: key[0],
                key1: key[1],
            },
        )?;
    }
    let invert = if invert { u32::MAX } else { 0 };
    let counts = Tensor::empty(client, DType::U32, &[2 * cubes])?;
    let before = Tensor::empty(client, DType::U32, &[cubes * CUBE as usize])?;
    TopkSubsetCount::tuned(
        client,
        0.0,
        &TopkSubsetCountArgs {
            bitmap: &bitmap,
            counts: &counts,
            before: &before,
            n: n as u32,
            cubes: cubes as u32,
            invert,
        },
    )?;
    let offsets = scan_cubes(&counts, cubes)?;
    let a = Tensor::empty(client, DType::F32, &[n.next_multiple_of(4)])?;
    let indices = Tensor::empty(client, DType::I32, &[k])?;
    let values = Tensor::empty(client, DType::F32, &[k])?;
    let residual = Tensor::empty(client, DType::F32, &[cubes])?;
    TopkSubsetWrite::tuned(
        client,
        0.0,
        &TopkSubsetWriteArgs {
            grad,
            error_in: &error_or_placeholder(client, error)?,
            bitmap: &bitmap,
            offsets: &offsets,
            before: &before,
            indices: &indices,
            values: &values,
            error: &a,
            residual: &residual,
            n: n as u32,
            cubes: cubes as u32,
            invert,
            scale,
            has_error: error.is_some(),
            contiguous: contiguous_regions(client) != 0,
        },
    )?;
    Ok(Selected {
        indices,
        values,
        error: a.prefix(n)?,
        residual,
    })
}

/// Zeroes `words` (`cubes · CUBE` vectors of four: the bitmap of `cubes` cubes).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_clear_words(words: &mut Array<Vector<u32, Const<4>>>, cubes: u32) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    if cube < cubes {
        words[(cube * UNITS + UNIT_POS) as usize] = Vector::<u32, Const<4>>::new(0u32);
    }
}

/// Sets the bit of `π⁻¹(j)` for `j` in `first .. first + count` (`π` the permutation of
/// `0..n` under `(key0, key1)`, `bits` wide), one `j` a unit. The ors are atomic: two
/// marks may share a word.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_subset_mark(
    bitmap: &mut Array<Atomic<u32>>,
    first: u32,
    count: u32,
    cubes: u32,
    n: u32,
    bits: u32,
    key0: u32,
    key1: u32,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let at = cube * UNITS + UNIT_POS;
    if cube < cubes && at < count {
        // Computed, not loaded: a load costs a loop over the SIMD lanes on a CPU adapter.
        let mut round_keys = Array::<u32>::new(comptime!(PERMUTATION_ROUNDS as usize));
        #[unroll]
        for r in 0..PERMUTATION_ROUNDS {
            round_keys[r as usize] = permutation_round_key(key0, key1, r);
        }
        let i = unpermute_index(first + at, n, bits, &round_keys);
        bitmap[(i / 32u32) as usize].fetch_or(1u32 << (i % 32u32));
    }
}

/// The marks of the 32 elements from `start` that lie below `n`, read through `invert`
/// (all ones where the marked ones are the untaken): the taken ones' bits.
#[cube]
fn taken_bits(word: u32, start: u32, n: u32, invert: u32) -> u32 {
    let inside = select(
        start + 32u32 <= n,
        u32::MAX,
        select(start < n, (1u32 << ((n - start) % 32u32)) - 1u32, 0u32),
    );
    (word ^ invert) & inside
}

/// Per cube how many elements are taken (`counts[2 cube]`; `counts[2 cube + 1]` = 0,
/// the ties [`topk_scan`] also sums), and per unit how many in its cube before its own
/// region (`before`). (One unit a cube summing its regions in turn, with no barriers,
/// took 1.2 ms where this takes 2.8 on 4M elements on lavapipe, but the write pass
/// then pays for the barriers of its in-cube offsets, and on a GPU the serial sums would
/// be latency-bound.)
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_subset_count(
    bitmap: &Array<Vector<u32, Const<4>>>,
    counts: &mut Array<u32>,
    before: &mut Array<u32>,
    n: u32,
    cubes: u32,
    invert: u32,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let region = cube * UNITS + UNIT_POS;
    // An `if`, not a `select`: both sides of a select are evaluated, and cubes past
    // `cubes` (the grid's last row) would read past the bitmap.
    let mut taken = 0u32;
    if cube < cubes {
        taken = region_taken(bitmap, region, n, invert);
    }
    store_counts(taken, counts, before, cube, cubes);
}

/// How many elements of `region` are taken (its four words' taken bits).
#[cube]
fn region_taken(bitmap: &Array<Vector<u32, Const<4>>>, region: u32, n: u32, invert: u32) -> u32 {
    let words = bitmap[region as usize];
    let mut taken = 0u32;
    #[unroll]
    for l in 0..REGION_WORDS {
        let start = region * comptime!(PER_UNIT) + 32u32 * l;
        taken += u32::count_ones(taken_bits(words[l as usize], start, n, invert));
    }
    taken
}

/// Forms `a = error + grad` in f32 (as [`topk_keys`] does; no `error` without
/// `has_error`), writes the error feedback `e = a − c` to `error` (`a − scale · a` in f32
/// where taken, exactly 0 for `scale = 1`; `a` elsewhere; `n` rounded up to 4 long), and each taken
/// element's index and `scale · a` at its slot: its cube's `offsets`, then the taken
/// before it in the cube, from the marks (`before` of the region holding its word, and
/// the word's lower bits). `residual[c]`: the cube's sum of error². How the cube's
/// vectors lie over its units follows [`contiguous_regions`]: each unit its own region,
/// whose four words it holds in registers and whose slots it takes in turn
/// (`contiguous`, CPU adapters); or neighbouring units neighbouring vectors (GPUs, and
/// the default that `kiln emit` and the CUDA check compile), which read any word of the
/// cube and its count from shared memory.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(n = pow2, dtype),
    grid = cubes(cubes),
    cube = UNITS
)]
pub fn topk_subset_write<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    error_in: &Array<Vector<f32, N>>,
    bitmap: &Array<Vector<u32, Const<4>>>,
    offsets: &Array<u32>,
    before: &Array<u32>,
    indices: &mut Array<i32>,
    values: &mut Array<f32>,
    error: &mut Array<Vector<f32, N>>,
    residual: &mut Array<f32>,
    n: u32,
    cubes: u32,
    invert: u32,
    scale: f32,
    #[comptime] has_error: bool,
    #[comptime] contiguous: bool,
) {
    let nw = N::value().comptime() as u32;
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let region = cube * UNITS + UNIT_POS;
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    // The region's taken bits and, per word, how many of the cube's are taken before it.
    let mut words = Vector::<u32, Const<4>>::new(0u32);
    let mut word_before = Vector::<u32, Const<4>>::new(0u32);
    if cube < cubes {
        words = bitmap[region as usize];
        // `store_counts` packs ties in the high half (none here): the low half.
        let mut run = before[region as usize] & 65535u32;
        #[unroll]
        for l in 0..REGION_WORDS {
            let start = region * comptime!(PER_UNIT) + 32u32 * l;
            let w = taken_bits(words[l as usize], start, n, invert);
            words[l as usize] = w;
            word_before[l as usize] = run;
            run += u32::count_ones(w);
        }
    }
    // Coalesced, a unit's vectors lie in any region of the cube: every region's words
    // and counts through shared memory (one barrier; none where each unit reads its own).
    // (A placeholder word each where unused.)
    let shared = comptime!(if contiguous {
        1
    } else {
        (CUBE * REGION_WORDS) as usize
    });
    let mut cube_words = SharedMemory::<u32>::new(shared);
    let mut cube_before = SharedMemory::<u32>::new(shared);
    if comptime!(!contiguous) {
        #[unroll]
        for l in 0..REGION_WORDS {
            cube_words[(UNIT_POS * REGION_WORDS + l) as usize] = words[l as usize];
            cube_before[(UNIT_POS * REGION_WORDS + l) as usize] = word_before[l as usize];
        }
        sync_cube();
    }
    let mut squares = 0.0f32;
    if cube < cubes {
        let cube_slot = offsets[(2 * cube) as usize];
        // Contiguous, the slots run in the order the unit walks its region.
        let mut run_slot = cube_slot + word_before[0];
        let (unit_step, j_step) = unit_layout(
            select(contiguous, 1u32, 0u32),
            comptime!(PER_UNIT) / nw,
            UNITS,
        );
        // Not unrolled, as the other passes over every element (ptxas spilled the
        // unrolled form at 128 a unit).
        for j in 0..comptime!(PER_UNIT / nw) {
            // The vector's offset in the cube, and its word (nw divides 32).
            let o = nw * (UNIT_POS * unit_step + j * j_step);
            let first = cube * comptime!(CHUNK) + o;
            if first < n {
                let vi = first / nw;
                let av = a_of(grad, error_in, vi, has_error);
                let w = o / 32u32;
                let bit = o % 32u32;
                let mut word = 0u32;
                let mut slot = run_slot;
                if comptime!(!contiguous) {
                    word = cube_words[w as usize];
                    slot = cube_slot
                        + cube_before[w as usize]
                        + u32::count_ones(word & ((1u32 << bit) - 1u32));
                } else {
                    word = lane_of(words, w % REGION_WORDS);
                }
                let mut taken_lanes = (word >> bit) & ((1u32 << nw) - 1u32);
                let mut ev = av;
                #[unroll]
                for l in 0..nw {
                    let v = av[l as usize];
                    let taken = (taken_lanes >> l) & 1u32 == 1u32;
                    // The spec's `a − c` with `c` the value sent (`scale · a` rounded, as
                    // stored below), so that `c + e = a` exactly where the subtraction
                    // is (Sterbenz: `scale <= 2`, k >= n/2); `(1 − scale) a` missed it by
                    // up to 6e4 ulps of `e` near `scale = 1`. At `scale = 1` (top-k) a
                    // taken value leaves exactly nothing behind, an infinity too.
                    let c = scale * v;
                    let r = select(scale == 1.0, 0.0f32, v - c);
                    let e = select(taken, r, v);
                    ev[l as usize] = e;
                    squares += select(first + l < n, e * e, 0.0f32);
                }
                error[vi as usize] = ev;
                // The stores for the taken lanes alone (a store under a per-lane branch
                // is a loop over the SIMD lanes on a CPU adapter, taken or not).
                while taken_lanes != 0u32 {
                    let l = u32::trailing_zeros(taken_lanes);
                    taken_lanes &= taken_lanes - 1u32;
                    indices[slot as usize] = i32::cast_from(first + l);
                    values[slot as usize] = scale * lane_of(av, l);
                    slot += 1;
                }
                run_slot = slot;
            }
        }
    }
    let total = cube_sum(&mut smem, squares, UNITS);
    if cube < cubes && UNIT_POS == 0 {
        residual[cube as usize] = total;
    }
}
