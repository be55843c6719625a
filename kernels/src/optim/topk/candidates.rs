//! Candidates: the keys a selection can still take, kept per region (`PER_UNIT`
//! consecutive elements, a unit's; regions in index order) so that the compaction reads
//! only those. [`topk_radix_compact`] keeps them in the radix select's third pass; where
//! a threshold is known before (the threshold estimate's; exact top-k's sampled bracket,
//! `sampled.rs`), [`topk_form_candidates`] keeps them as it forms `a`, in one pass over
//! the inputs.
// `n` beside the `_n` that cubecl's launch expansion gives the `Size` generic `N`
// (an attribute on the kernel does not reach that expansion).
#![allow(clippy::duplicate_underscore_argument)]
#![allow(clippy::new_without_default)] // a cube type: built inside kernels, where `Default` is not callable
#![allow(clippy::too_many_arguments)]
// Kernel code: `%` is what the emitted code does (cubecl has no `is_multiple_of`).
#![allow(clippy::manual_is_multiple_of)]

use super::*;
use kiln_dsl::lane_of;

/// A unit's candidates as it keeps them: how many, the vector of their words and the word
/// of their 8-bit offsets being filled (both flushed four at a time, `candidates` as one
/// 4-wide store), and the sum of `a²` over the elements not kept (never taken: the
/// compression error keeps them whole).
#[derive(CubeType, Clone, Copy)]
pub(crate) struct Kept {
    /// Candidates kept so far.
    pub(crate) stored: u32,
    /// Words of the last `stored % 4`, in lanes `0..stored % 4`.
    pub(crate) words: Vector<u32, Const<4>>,
    /// Offsets of the last `stored % 4`, 8 bits each.
    pub(crate) offsets: u32,
    /// Sum of `a²` over the elements not kept.
    pub(crate) squares: f32,
}

#[cube]
impl Kept {
    /// None kept.
    pub(crate) fn new() -> Kept {
        Kept {
            stored: 0u32,
            words: Vector::<u32, Const<4>>::new(0u32),
            offsets: 0u32,
            squares: 0.0f32,
        }
    }

    /// Element `v` (its `a`) of a vector: to the squares unless `keep` or outside
    /// (`inside` false: past `n`); returns the bit `l` the caller ors into the vector's
    /// mask for [`Kept::keep`] (0 unless `keep`).
    pub(crate) fn see(&mut self, v: f32, keep: bool, inside: bool, l: u32) -> u32 {
        self.squares += select(inside && !keep, v * v, 0.0f32);
        select(keep, 1u32 << l, 0u32)
    }

    /// The vector's words whose lane bits are set in `mask` (lane `l`: bit `l`), at
    /// offsets `offset + l` of the region whose `PER_UNIT` slots start at `at` (a
    /// multiple of 4): each word to the next slot and its offset to `positions`. A loop
    /// over the set bits, not a conditional store per lane, and the stores four
    /// candidates at a time (one 4-wide store of their words, one of their offsets'
    /// word): a CPU adapter runs every store with a per-unit address as a loop over its
    /// SIMD lanes (taken or not), which cost more than the whole stream when done for
    /// each element (lavapipe: rand-k's pass over 4M 46 -> 43 ms in the profile with
    /// stores four at a time; exact top-k 2-4 % faster in all).
    pub(crate) fn keep<N: Size>(
        &mut self,
        candidates: &mut Array<Vector<u32, Const<4>>>,
        positions: &mut Array<u32>,
        at: u32,
        words: Vector<u32, N>,
        offset: u32,
        mask: u32,
    ) {
        let mut m = mask;
        while m != 0u32 {
            let l = u32::trailing_zeros(m);
            m &= m - 1u32;
            let word = lane_of(words, l);
            let slot = self.stored % 4u32;
            // Lane `slot` of the buffer, by selects (an indexed register write would go
            // through memory).
            #[unroll]
            for i in 0..4u32 {
                self.words[i as usize] = select(slot == i, word, self.words[i as usize]);
            }
            self.offsets |= (offset + l) << (slot * 8u32);
            if slot == 3u32 {
                let quad = ((at + self.stored) / 4u32) as usize;
                candidates[quad] = self.words;
                positions[quad] = self.offsets;
                self.offsets = 0u32;
            }
            self.stored += 1u32;
        }
    }

    /// The last candidates and offsets, the count (`stored[region]`) and the squares
    /// (`below[region]`).
    pub(crate) fn finish(
        &self,
        candidates: &mut Array<Vector<u32, Const<4>>>,
        positions: &mut Array<u32>,
        stored: &mut Array<u32>,
        below: &mut Array<f32>,
        at: u32,
        region: u32,
    ) {
        if self.stored % 4u32 != 0u32 {
            // The lanes past `stored % 4` hold stale words: readers stop at `stored`.
            let quad = ((at + self.stored) / 4u32) as usize;
            candidates[quad] = self.words;
            positions[quad] = self.offsets;
        }
        stored[region as usize] = self.stored;
        below[region as usize] = self.squares;
    }
}

/// Forms `a = eta error + grad - h` in f32 ([`formed`], as [`topk_keys`] does; no
/// `error` without `has_error`, no `h` without `has_h`) and writes it to `a` (it becomes
/// the error feedback), with `twice` to `copy` as well (EControl keeps `p`), and keeps as
/// candidates the elements whose magnitude key is at or above the known threshold
/// `T = state[0]` (the word kept is `a`'s, sign included): the threshold estimate's one
/// pass. Unit `u` of cube `c` reads its region's `PER_UNIT` elements from
/// `c CHUNK + u PER_UNIT`, `VECTOR` wide; `a` is `n` rounded up to 4 long. With `refill`
/// the pass runs only where `short[0]` is not 0 (exact top-k's sampled bracket kept fewer
/// than `k`: [`topk_candidates_short`] then dropped `T` to 0, so this keeps everything),
/// and every unit returns at once otherwise.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(n = pow2, dtype),
    grid = cubes(cubes),
    cube = UNITS
)]
pub fn topk_form_candidates<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    error_in: &Array<Vector<f32, N>>,
    h: &Array<Vector<f32, N>>,
    state: &Array<u32>,
    short: &Array<u32>,
    a: &mut Array<Vector<f32, N>>,
    copy: &mut Array<Vector<f32, N>>,
    candidates: &mut Array<Vector<u32, Const<4>>>,
    positions: &mut Array<u32>,
    stored: &mut Array<u32>,
    below: &mut Array<f32>,
    n: u32,
    cubes: u32,
    eta: f32,
    #[comptime] has_error: bool,
    #[comptime] has_h: bool,
    #[comptime] twice: bool,
    #[comptime] refill: bool,
) {
    if comptime!(refill) {
        // Uniform: the flag is one word every unit reads.
        if short[0] == 0u32 {
            terminate!();
        }
    }
    let nw = N::value().comptime() as u32;
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let t = state[0];
    let region = cube * UNITS + UNIT_POS;
    let at = region * comptime!(PER_UNIT);
    let base = cube * comptime!(CHUNK) + UNIT_POS * comptime!(PER_UNIT);
    let mut kept = Kept::new();
    if cube < cubes {
        // Not unrolled: ptxas spilled the unrolled 32 vectors (sm_90a) at 128 a unit.
        for j in 0..comptime!(PER_UNIT / nw) {
            let first = base + nw * j;
            if first < n {
                let vi = first / nw;
                let av = formed(grad, error_in, h, vi, eta, has_error, has_h);
                a[vi as usize] = av;
                if comptime!(twice) {
                    copy[vi as usize] = av;
                }
                let kv = magnitude_keys(av);
                let mut words = Vector::<u32, N>::new(0u32);
                let mut mask = 0u32;
                #[unroll]
                for l in 0..nw {
                    let inside = first + l < n;
                    let v = av[l as usize];
                    words[l as usize] = u32::reinterpret(v);
                    mask |= kept.see(v, kv[l as usize] >= t && inside, inside, l);
                }
                kept.keep(candidates, positions, at, words, nw * j, mask);
            }
        }
        kept.finish(candidates, positions, stored, below, at, region);
    }
}

/// Vector `v` of `a`, formed as `grad + error` in f32 from `input` = grad (`error`
/// absent without `has_error`): [`formed`] with `eta = 1` and no `h`.
#[cube]
pub(super) fn a_of<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    error: &Array<Vector<f32, N>>,
    v: u32,
    #[comptime] has_error: bool,
) -> Vector<f32, N> {
    // `error` stands for the `h` that `has_h = false` never reads.
    formed(input, error, error, v, 1.0f32, has_error, false)
}

/// Vector `v` of `a = eta error + grad - h` in f32 from `input` = grad (`error` absent
/// without `has_error`, `h` without `has_h`): what the selections rank, formed alike by
/// every pass that forms it (`1 · error` is exact, so with `eta = 1` this is [`a_of`]
/// bit for bit, fused into an FMA or not).
#[cube]
pub(super) fn formed<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    error: &Array<Vector<f32, N>>,
    h: &Array<Vector<f32, N>>,
    v: u32,
    eta: f32,
    #[comptime] has_error: bool,
    #[comptime] has_h: bool,
) -> Vector<f32, N> {
    let mut a = Vector::<f32, N>::cast_from(input[v as usize]);
    if comptime!(has_error) {
        a = Vector::<f32, N>::new(eta) * error[v as usize] + a;
    }
    if comptime!(has_h) {
        a -= h[v as usize];
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
