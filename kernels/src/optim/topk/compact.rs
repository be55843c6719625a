//! Compaction of the selection in index order: per-cube counts (and each unit's
//! offset inside its cube), a one-cube scan of the counts, and the write pass that
//! also forms the error feedback.
// Kernel code: `(a + b - 1) / b` is what the emitted code does, written as such.
#![allow(clippy::manual_div_ceil)]
// `n` beside the `_n` that cubecl's launch expansion gives the `Size` generic `N`
// (an attribute on the kernel does not reach that expansion).
#![allow(clippy::duplicate_underscore_argument)]

use super::*;

/// Declares a pass over the selection's elements (the count and the write): `input`
/// (the stored `a`, or the gradient), `error_in` (the error, added to `input` when
/// `has_error`), the stored `keys` (read when `keys_from` is Stored), the radix
/// `state`, the permutation's key and width (`key0`, `key1`, `bits`: read when
/// `keys_from` is Permutation), then the pass's own arguments, all `VECTOR` wide where
/// they are vectors, one cube per `CHUNK` elements; see [`a_of`] and [`keys_at`].
macro_rules! selection_pass {
    (
        $(#[doc = $doc:literal])*
        $name:ident($($own:tt)*) $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(
            tune(UNITS = [256]),
            vector = [4, 1],
            key(n = pow2, dtype),
            grid = cubes(cubes),
            cube = UNITS
        )]
        pub fn $name<F: Float, N: Size>(
            input: &Array<Vector<F, N>>,
            error_in: &Array<Vector<f32, N>>,
            keys: &Array<Vector<u32, N>>,
            state: &Array<u32>,
            key0: u32,
            key1: u32,
            bits: u32,
            $($own)*
            #[comptime] keys_from: KeysFrom,
            #[comptime] has_error: bool,
        ) $body
    };
}

selection_pass! {
    /// Per cube: how many keys are above the threshold `T = state[0]` and how many equal it
    /// (`counts[2 cube ..]`), and per unit how many of each come before its `PER_UNIT`
    /// consecutive keys in the cube (`before[cube UNITS + unit]`, both in one u32: the write
    /// pass's slots without counting again). Keys past `n` are not counted. The keys are
    /// read or formed as `keys_from` says ([`keys_at`]): rand-k's permutation reads no
    /// memory here. Read `VECTOR` wide (4 for stored `a` and keys).
    topk_count(
        counts: &mut Array<u32>,
        before: &mut Array<u32>,
        n: u32,
        cubes: u32,
    ) {
        let nw = N::value().comptime() as u32;
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        let t = state[0];
        let base = cube * comptime!(CHUNK) + UNIT_POS * comptime!(PER_UNIT);
        let mut round_keys = Array::<u32>::new(comptime!(PERMUTATION_ROUNDS as usize));
        round_keys_of(&mut round_keys, key0, key1, keys_from);
        let mut both = 0u32;
        if cube < cubes {
            // Not unrolled: ptxas spilled the unrolled 32 vectors (sm_90a) at 128 a unit.
            for j in 0..comptime!(PER_UNIT / nw) {
                let first = base + nw * j;
                if first < n {
                    let kv = keys_at(
                        input, error_in, keys, &round_keys, first, n, bits, keys_from, has_error,
                    );
                    #[unroll]
                    for l in 0..nw {
                        both += select(first + l < n, above_and_ties(kv[l as usize], t), 0u32);
                    }
                }
            }
        }
        let mut smem = SharedMemory::<u32>::new(comptime!((CUBE + BINS) as usize));
        let mine = cube_exclusive_sum_u32(&mut smem, both);
        if cube < cubes {
            before[(cube * UNITS + UNIT_POS) as usize] = mine;
            if UNIT_POS == comptime!(CUBE - 1) {
                let total = mine + both;
                counts[(2 * cube) as usize] = total & 65535u32;
                counts[(2 * cube + 1) as usize] = total >> 16u32;
            }
        }
    }
}

/// Vector `v` of `a`: `input` (the stored `a`, f32), or formed as `grad + error` in f32
/// from `input` = grad (`error` absent without `has_error`), as `topk_keys` forms it.
#[cube]
fn a_of<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    error: &Array<Vector<f32, N>>,
    v: u32,
    #[comptime] has_error: bool,
) -> Vector<f32, N> {
    let mut a = Vector::<f32, N>::cast_from(input[v as usize]);
    if comptime!(has_error) {
        a = error[v as usize] + a;
    }
    a
}

/// `|a|`'s bits, which order like the magnitudes (NaN above +inf).
#[cube]
fn magnitude_keys<N: Size>(a: Vector<f32, N>) -> Vector<u32, N> {
    let nw = N::value().comptime() as u32;
    let mut kv = Vector::<u32, N>::new(0u32);
    #[unroll]
    for l in 0..nw {
        kv[l as usize] = u32::reinterpret(a[l as usize]) & 0x7FFF_FFFFu32;
    }
    kv
}

/// `n - 1 - π(e)` of the vector's elements `e = first..` (`π` the seeded permutation of
/// `0..n`, `bits` wide, `round_keys` from [`round_keys_of`]).
#[cube]
fn permutation_keys<N: Size>(
    first: u32,
    n: u32,
    bits: u32,
    round_keys: &Array<u32>,
) -> Vector<u32, N> {
    let nw = N::value().comptime() as u32;
    let mut kv = Vector::<u32, N>::new(0u32);
    #[unroll]
    for l in 0..nw {
        // Past n the cycle walk need not end (a cycle of π may lie wholly above n): such
        // lanes rank index 0 instead, and the passes never count them.
        let e = select(first + l < n, first + l, 0u32);
        kv[l as usize] = n - 1 - permute_index(e, n, bits, round_keys);
    }
    kv
}

/// The permutation's round keys, in registers (computed, not loaded: a load costs a
/// loop over the SIMD lanes on a CPU adapter); left unset unless `keys_from` is
/// Permutation.
#[cube]
fn round_keys_of(
    round_keys: &mut Array<u32>,
    key0: u32,
    key1: u32,
    #[comptime] keys_from: KeysFrom,
) {
    if comptime!(keys_from == KeysFrom::Permutation) {
        #[unroll]
        for r in 0..PERMUTATION_ROUNDS {
            round_keys[r as usize] = permutation_round_key(key0, key1, r);
        }
    }
}

/// The ranking keys of the vector whose first element is `first` (a multiple of the
/// width): stored in `keys`, `a`'s magnitudes (`a` from [`a_of`]), or the permutation's.
#[cube]
#[allow(clippy::too_many_arguments)]
fn keys_at<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    error: &Array<Vector<f32, N>>,
    keys: &Array<Vector<u32, N>>,
    round_keys: &Array<u32>,
    first: u32,
    n: u32,
    bits: u32,
    #[comptime] keys_from: KeysFrom,
    #[comptime] has_error: bool,
) -> Vector<u32, N> {
    let v = first / N::value().comptime() as u32;
    if comptime!(keys_from == KeysFrom::Stored) {
        keys[v as usize]
    } else if comptime!(keys_from == KeysFrom::Magnitude) {
        magnitude_keys(a_of(input, error, v, has_error))
    } else {
        permutation_keys(first, n, bits, round_keys)
    }
}

/// Exclusive prefix sum of a u32 over the cube's `CUBE` units, in unit order (exact):
/// `BINS` units each scan `BINS` consecutive values serially, then one unit the `BINS`
/// group totals. Four barriers, where a Hillis–Steele scan takes eighteen: on a CPU
/// adapter each barrier switches every SIMD slice of the cube. `smem` holds
/// `CUBE + BINS` words; every unit must call it.
#[cube]
fn cube_exclusive_sum_u32(smem: &mut SharedMemory<u32>, value: u32) -> u32 {
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
/// counts of both in one u32 (at most `CHUNK` = 16384 each).
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

selection_pass! {
    /// The compaction: unit `u` of cube `c` owns elements `c CHUNK + u PER_UNIT ..` (`PER_UNIT`
    /// in a row, so the count pass's in-cube scan, `before`, orders them). An element is taken when its key
    /// is above `T`, or equal with fewer than `k_rem` equal keys before it. Its slot is the
    /// number of taken elements before it; every element's error is `keep · a` (`keep =
    /// 1 − scale`) if taken — exactly 0 for top-k's `keep = 0`, even where `a` is ±inf —
    /// and `a` otherwise; `residual[c]` is the cube's sum of error².
    /// `a` and its keys are read or formed as [`topk_count`] does, `VECTOR` wide; `error`
    /// is `n` rounded up to 4 long, and elements past `n` are neither taken nor summed.
    topk_write(
        offsets: &Array<u32>,
        before: &Array<u32>,
        indices: &mut Array<i32>,
        values: &mut Array<f32>,
        error: &mut Array<Vector<f32, N>>,
        residual: &mut Array<f32>,
        n: u32,
        cubes: u32,
        scale: f32,
        keep: f32,
    ) {
        let nw = N::value().comptime() as u32;
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        let c = select(cube < cubes, cube, 0u32);
        let t = state[0];
        let k_rem = state[1];
        let base = c * comptime!(CHUNK) + UNIT_POS * comptime!(PER_UNIT);
        let mine = before[(c * UNITS + UNIT_POS) as usize];
        let gt_before = mine & 65535u32;
        let eq_before = mine >> 16u32;
        let mut round_keys = Array::<u32>::new(comptime!(PERMUTATION_ROUNDS as usize));
        round_keys_of(&mut round_keys, key0, key1, keys_from);
        let mut smem = SharedMemory::<f32>::new(UNITS as usize);
        let mut squares = 0.0f32;
        if cube < cubes {
            let mut ties = offsets[(2 * c + 1) as usize] + eq_before;
            // Taken ties before this unit: all earlier ties, capped at k_rem.
            let mut slot = offsets[(2 * c) as usize] + gt_before + min(ties, k_rem);
            for j in 0..comptime!(PER_UNIT / nw) {
                let first = base + nw * j;
                if first < n {
                    let vi = first / nw;
                    let av = a_of(input, error_in, vi, has_error);
                    let kv = if comptime!(keys_from == KeysFrom::Stored) {
                        keys[vi as usize]
                    } else if comptime!(keys_from == KeysFrom::Magnitude) {
                        magnitude_keys(av)
                    } else {
                        permutation_keys(first, n, bits, &round_keys)
                    };
                    let mut rv = Vector::<f32, N>::new(0.0f32);
                    #[unroll]
                    for l in 0..nw {
                        let e = first + l;
                        let inside = e < n;
                        let key = kv[l as usize];
                        let v = av[l as usize];
                        let tie = key == t && inside;
                        let taken = (key > t && inside) || (tie && ties < k_rem);
                        if taken {
                            indices[slot as usize] = i32::cast_from(e);
                            values[slot as usize] = scale * v;
                            slot += 1;
                        }
                        // inf * 0 would be NaN: a taken value leaves exactly nothing behind.
                        let sent_rest = select(keep == 0.0, 0.0f32, keep * v);
                        let r = select(inside, select(taken, sent_rest, v), 0.0f32);
                        rv[l as usize] = r;
                        squares += r * r;
                        ties += select(tie, 1u32, 0u32);
                    }
                    error[vi as usize] = rv;
                }
            }
        }
        let total = cube_sum(&mut smem, squares, UNITS);
        if cube < cubes && UNIT_POS == 0 {
            residual[cube as usize] = total;
        }
    }
}
