//! The radix passes: a per-cube histogram of one 4-bit digit over the keys that match
//! the prefix chosen so far (the third pass also keeps the keys that can still be
//! selected), and the one-cube pass that sums the histograms and picks the digit (and,
//! at the last digit, how many ties at the threshold are taken).
// Kernel code: `(a + b - 1) / b` is what the emitted code does, written as such.
#![allow(clippy::manual_div_ceil)]

use super::*;

/// Per-cube histogram of this pass's digit over the keys that match the prefix chosen
/// so far (`(key & high) == (prefix & high)`). `source` says what a cube reads: its
/// `CHUNK` keys, 4-wide (`keys` is `n` rounded up to 4 long; keys past `n` are not
/// counted), or the candidates of `CANDIDATE_GROUPS x UNITS` regions that
/// [`topk_radix_compact`] or [`topk_form_candidates`] stored (a unit
/// `CANDIDATE_GROUPS` of them, `UNITS` apart), so
/// that a pass over few candidates runs few cubes: the reduction costs a cube as much as
/// reading 16K keys on lavapipe; `contiguous` lays a cube's keys over its units
/// ([`super::contiguous_regions`]). A key is the word read `& key_mask` (`0x7FFF_FFFF` reads
/// `a`'s f32 bits as magnitude keys, so they need not be stored).
/// Each unit counts in registers, four 8-bit counters a word (`PER_UNIT` < 256 keys
/// a unit: no overflow), a key adding `1 << 8 (d % 4)` to word `d / 4` by a compare and
/// a select per word: a CPU adapter runs these as vector operations, where a
/// shared-memory counter per key is a gather and a scatter per lane (lavapipe, 4M keys:
/// 20 ms a pass); then [`cube_histogram`]. Over the candidates, whose unit reads up to
/// `CANDIDATE_GROUPS x PER_UNIT` keys, each region's packed counts are added to full
/// counters, summed in u32 ([`cube_histogram_wide`]). No atomics.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_radix_histogram(
    keys: &Array<Vector<u32, Const<4>>>,
    state: &Array<u32>,
    hist: &mut Array<u32>,
    candidates: &Array<Vector<u32, Const<4>>>,
    counts: &Array<u32>,
    n: u32,
    cubes: u32,
    regions: u32,
    shift: u32,
    high: u32,
    key_mask: u32,
    contiguous: u32,
    skip_counted: u32,
    #[comptime] source: RadixSource,
) {
    // The second digit's pass, where the keys pass counted it already (uniform: every
    // unit returns).
    if second_digit_counted(state, skip_counted) {
        terminate!();
    }
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let prefix = state[0] & high;
    let mut packed = Array::<u32>::new(comptime!((BINS / 4) as usize));
    clear_counters(&mut packed);
    if comptime!(source == RadixSource::Candidates) {
        // A unit reads up to CANDIDATE_GROUPS x PER_UNIT keys and a cube 2^19, past the
        // 8-bit counters and the 16-bit cube sums of a full pass (dense ties put them all
        // in one bin): each region's keys (at most PER_UNIT) are counted packed, then
        // added to full counters, summed over the cube in u32.
        let mut wide = Array::<u32>::new(comptime!(BINS as usize));
        #[unroll]
        for d in 0..comptime!(BINS) {
            wide[d as usize] = 0u32;
        }
        #[unroll]
        for g in 0..comptime!(CANDIDATE_GROUPS) {
            let region = (cube * comptime!(CANDIDATE_GROUPS) + g) * UNITS + UNIT_POS;
            let mut len = 0u32;
            if cube < cubes && region < regions {
                len = counts[region as usize];
            }
            // 4-wide: a region's slots start at a multiple of 4; slots past `len` hold
            // stale words and do not count.
            let at = region * comptime!(PER_UNIT / 4);
            for i in 0..(len + 3u32) / 4u32 {
                let kv = candidates[(at + i) as usize];
                #[unroll]
                for l in 0..4u32 {
                    let key = kv[l as usize] & key_mask;
                    let hit = (key & high) == prefix && 4u32 * i + l < len;
                    count_digit(&mut packed, key, hit, shift);
                }
            }
            #[unroll]
            for d in 0..comptime!(BINS) {
                wide[d as usize] += (packed[(d / 4) as usize] >> ((d % 4) * 8)) & 255u32;
            }
            clear_counters(&mut packed);
        }
        cube_histogram_wide(&wide, hist, cube, cubes);
    } else {
        let base = cube * comptime!(CHUNK);
        // The keys this cube reads (uniform: the loop runs as often for every unit).
        let mut len = 0u32;
        if cube < cubes {
            len = min(n - base, comptime!(CHUNK));
        }
        let (unit_step, j_step) = unit_layout(contiguous, comptime!(PER_UNIT / 4), comptime!(CUBE));
        for j in 0..comptime!(PER_UNIT / 4) {
            // The first of the 4 keys this step reads, from the cube's first.
            let first = (UNIT_POS * unit_step + j * j_step) * 4u32;
            if first < len {
                let kv = keys[((base + first) / 4u32) as usize];
                #[unroll]
                for l in 0..4u32 {
                    let key = kv[l as usize] & key_mask;
                    let hit = (key & high) == prefix && first + l < len;
                    count_digit(&mut packed, key, hit, shift);
                }
            }
        }
        cube_histogram(&packed, hist, cube, cubes);
    }
}

/// A cube's histogram from its units' `BINS` full counters `wide` (the candidates
/// passes': up to 2^19 a bin in a cube), in u32: unit `u` adds bin `u / BINS` over the
/// `BINS` units `BINS (u % BINS) ..`, then units `0..BINS` their bin's partials, in order,
/// to `hist[cube BINS ..]`. Every unit must call it.
#[cube]
fn cube_histogram_wide(wide: &Array<u32>, hist: &mut Array<u32>, cube: u32, cubes: u32) {
    let mut table = SharedMemory::<u32>::new(comptime!((BINS * CUBE) as usize));
    let mut partials = SharedMemory::<u32>::new(comptime!(CUBE as usize));
    #[unroll]
    for d in 0..comptime!(BINS) {
        table[(d * comptime!(CUBE) + UNIT_POS) as usize] = wide[d as usize];
    }
    sync_cube();
    let bin = UNIT_POS / comptime!(BINS);
    let group = UNIT_POS % comptime!(BINS);
    let mut partial = 0u32;
    #[unroll]
    for i in 0..comptime!(BINS) {
        partial += table[(bin * comptime!(CUBE) + group * comptime!(BINS) + i) as usize];
    }
    partials[UNIT_POS as usize] = partial;
    sync_cube();
    if cube < cubes && UNIT_POS < comptime!(BINS) {
        let mut total = 0u32;
        #[unroll]
        for g in 0..comptime!(BINS) {
            total += partials[(UNIT_POS * comptime!(BINS) + g) as usize];
        }
        hist[(cube * comptime!(BINS) + UNIT_POS) as usize] = total;
    }
}

/// The pass that also keeps the keys that can still be selected (the third: after two
/// digits, the keys matching the prefix are usually a small part: magnitudes, a factor-4
/// range of `|a|`; random keys, 1/256). Unit `u` of cube `c` reads the `PER_UNIT`
/// consecutive keys from `c CHUNK + u PER_UNIT` (its region, `c UNITS + u`: regions in
/// index order), counts the digit as [`topk_radix_histogram`] does, and stores, in index
/// order, every word whose key is at or above the prefix (those above it are taken
/// whatever the last digits) to its `PER_UNIT` slots of `candidates` (the word as read:
/// `a`'s bits with their sign), their offsets in the region to `positions` (8 bits each,
/// four a word), their number to `counts[region]`, and the sum of `a²` over the others
/// (never taken: the compression error keeps them whole) to `below[region]`. `a` is the
/// word itself with `keys_are_values` (magnitude keys), else read from `values`.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_radix_compact(
    keys: &Array<Vector<u32, Const<4>>>,
    values: &Array<Vector<f32, Const<4>>>,
    state: &Array<u32>,
    hist: &mut Array<u32>,
    candidates: &mut Array<Vector<u32, Const<4>>>,
    positions: &mut Array<u32>,
    counts: &mut Array<u32>,
    below: &mut Array<f32>,
    n: u32,
    cubes: u32,
    shift: u32,
    high: u32,
    key_mask: u32,
    #[comptime] keys_are_values: bool,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let prefix = state[0] & high;
    let mut packed = Array::<u32>::new(comptime!((BINS / 4) as usize));
    clear_counters(&mut packed);
    let region = cube * UNITS + UNIT_POS;
    let at = region * comptime!(PER_UNIT);
    let base = cube * comptime!(CHUNK) + UNIT_POS * comptime!(PER_UNIT);
    let mut kept = Kept::new();
    if cube < cubes {
        // Not unrolled: ptxas spills an unrolled body of this size (see topk_form_candidates).
        for j in 0..comptime!(PER_UNIT / 4) {
            let first = base + 4u32 * j;
            if first < n {
                let kv = keys[(first / 4u32) as usize];
                let av = if comptime!(keys_are_values) {
                    Vector::<f32, Const<4>>::new(0.0f32)
                } else {
                    values[(first / 4u32) as usize]
                };
                let mut mask = 0u32;
                #[unroll]
                for l in 0..4u32 {
                    let word = kv[l as usize];
                    let key = word & key_mask;
                    let inside = first + l < n;
                    count_digit(&mut packed, key, (key & high) == prefix && inside, shift);
                    let v = if comptime!(keys_are_values) {
                        f32::reinterpret(word)
                    } else {
                        av[l as usize]
                    };
                    mask |= kept.see(v, (key & high) >= prefix && inside, inside, l);
                }
                kept.keep(candidates, positions, at, kv, 4u32 * j, mask);
            }
        }
        kept.finish(candidates, positions, counts, below, at, region);
    }
    cube_histogram(&packed, hist, cube, cubes);
}

/// A cube's histogram from its units' packed counters: through shared memory as a
/// `[BINS, UNITS]` table, summed by all units in two steps (16 columns each, then 16
/// partials per bin), to `hist[cube BINS ..]`. Every unit must call it.
#[cube]
pub(super) fn cube_histogram(packed: &Array<u32>, hist: &mut Array<u32>, cube: u32, cubes: u32) {
    let mut table = SharedMemory::<u32>::new(comptime!((BINS * CUBE) as usize));
    cube_histogram_in(packed, comptime!(BINS / 4), &mut table, hist, cube, cubes);
}

/// [`cube_histogram`] of the `words` packed counter words in `packed` (`words / 4`
/// histograms of `BINS` bins) through `table` (shared memory of `BINS * CUBE`), to
/// `hist[cube BINS ..]` (`words` = 4). Every unit must call it.
#[cube]
pub(super) fn cube_histogram_in(
    packed: &Array<u32>,
    #[comptime] words: u32,
    table: &mut SharedMemory<u32>,
    hist: &mut Array<u32>,
    cube: u32,
    cubes: u32,
) {
    reduce_counter_words(packed, words, table);
    write_bins(table, words, 0u32, words, hist, cube, cubes);
}

/// Units whose copies of a packed counter word one unit adds in
/// [`reduce_counter_words`]'s second step, for `words` words a unit: `table` holds the
/// `words · CUBE` copies and then two words per (word, group of that many units).
fn reduce_fan(words: u32) -> u32 {
    if words <= 4 {
        4
    } else {
        8
    }
}
const _: () =
    assert!(8 * 255 < 65536 && CHUNK < 65536 && 12 * CUBE + 2 * 12 * CUBE / 8 <= BINS * CUBE);

/// The cube's sums of its units' `words` packed counter words (four 8-bit counters each,
/// at most `PER_UNIT` < 256 a counter), left in `table` for [`write_bins`]: each unit
/// stores its words; then the units add `reduce_fan(words)` units' copies of a word as two
/// words of 16-bit lanes (its even and its odd bytes). Two barriers and a fraction of the
/// shared-memory accesses of one counter at a time, which on a CPU adapter are each a
/// loop over the SIMD lanes (`topk_ef` 7-14 % faster at 4M on lavapipe). `table` must
/// not be in use (a caller reusing it lets every unit finish reading it first).
#[cube]
pub(super) fn reduce_counter_words(
    packed: &Array<u32>,
    #[comptime] words: u32,
    table: &mut SharedMemory<u32>,
) {
    #[unroll]
    for w in 0..words {
        table[(w * comptime!(CUBE) + UNIT_POS) as usize] = packed[w as usize];
    }
    sync_cube();
    let fan = comptime!(reduce_fan(words));
    let groups = comptime!(CUBE / fan);
    let tasks = comptime!(words * CUBE / fan);
    // Task t: word t / groups, over units fan (t % groups) ..+ fan.
    #[unroll]
    for r in 0..comptime!(tasks.div_ceil(CUBE)) {
        let t = r * comptime!(CUBE) + UNIT_POS;
        if t < tasks {
            let w = t / groups;
            let g = t % groups;
            let mut even = 0u32;
            let mut odd = 0u32;
            #[unroll]
            for i in 0..fan {
                let x = table[(w * comptime!(CUBE) + g * fan + i) as usize];
                even += x & 0x00FF_00FFu32;
                odd += (x >> 8u32) & 0x00FF_00FFu32;
            }
            // Past the copies, which this step is still reading.
            let out = comptime!(words * CUBE) + 2u32 * t;
            table[out as usize] = even;
            table[(out + 1u32) as usize] = odd;
        }
    }
    sync_cube();
}

/// The bins of words `first ..+ count` of [`reduce_counter_words`]'s sums (of `words` a
/// unit) to `out`: word `first + j`'s four bins are `4 (j % 4) ..+ 4` of histogram `j / 4`,
/// at `out[(j / 4) cubes BINS + cube BINS ..]`. Units `0 .. 2 count` add a word's even or
/// odd lanes over the groups (at most `CHUNK` < 2^16 a lane), two bins each.
#[cube]
pub(super) fn write_bins(
    table: &SharedMemory<u32>,
    #[comptime] words: u32,
    #[comptime] first: u32,
    #[comptime] count: u32,
    out: &mut Array<u32>,
    cube: u32,
    cubes: u32,
) {
    let groups = comptime!(CUBE / reduce_fan(words));
    if cube < cubes && UNIT_POS < comptime!(2 * count) {
        let j = UNIT_POS / 2u32;
        let parity = UNIT_POS % 2u32;
        let w = first + j;
        let mut lanes = 0u32;
        for g in 0..groups {
            lanes += table[(comptime!(words * CUBE) + 2u32 * (w * groups + g) + parity) as usize];
        }
        let at = (j / 4u32) * cubes * comptime!(BINS)
            + cube * comptime!(BINS)
            + 4u32 * (j % 4u32)
            + parity;
        out[at as usize] = lanes & 65535u32;
        out[(at + 2u32) as usize] = lanes >> 16u32;
    }
}

/// The first digits (of magnitude keys: `|a|` in [2^-31, 2) and [2, 2^33)) under which
/// the keys pass also counts the second digit, so that the full pass that would count
/// it is skipped when the first digit chosen is one of them: for gradients it is, the
/// k-th largest magnitude lies there (others run the pass).
pub(super) const SPECULATED: u32 = 3;

/// Adds a key's second digit to the packed 8-bit counters of `spec[at ..]` (8 words:
/// bins `16 (d0 - SPECULATED) + d1`) where its first digit `d0` is `SPECULATED` or the
/// next (and `inside`).
#[cube]
pub(super) fn count_second_digit(
    spec: &mut Array<u32>,
    #[comptime] at: u32,
    key: u32,
    inside: bool,
) {
    let d0 = key >> comptime!(32 - DIGIT_BITS);
    let hit = inside && (d0 == SPECULATED || d0 == comptime!(SPECULATED + 1));
    let second = (key >> comptime!(32 - 2 * DIGIT_BITS)) & comptime!(BINS - 1);
    // Past the 32 bins where missed (a wrapped `d0 - SPECULATED` is not selected).
    let d = select(
        hit,
        ((d0 - SPECULATED) << DIGIT_BITS) | second,
        comptime!(2 * BINS),
    );
    let one = 1u32 << ((d & 3u32) * 8u32);
    let word = d >> 2u32;
    #[unroll]
    for w in 0..comptime!(BINS / 2) {
        spec[(at + w) as usize] += select(word == w, one, 0u32);
    }
}

/// Whether the keys pass counted the second digit under the first digit chosen
/// (`state[0]`'s top digit; `counted`: the keys pass ran with [`count_second_digit`]).
#[cube]
pub(super) fn second_digit_counted(state: &Array<u32>, counted: u32) -> bool {
    let d0 = state[0] >> comptime!(32 - DIGIT_BITS);
    counted != 0u32 && (d0 == SPECULATED || d0 == comptime!(SPECULATED + 1))
}

/// Zeroes a unit's packed 8-bit counters (see [`count_digit`]).
#[cube]
pub(super) fn clear_counters(packed: &mut Array<u32>) {
    #[unroll]
    for w in 0..comptime!(BINS / 4) {
        packed[w as usize] = 0u32;
    }
}

/// Adds a key's digit (`(key >> shift) % BINS`) to a unit's packed 8-bit counters
/// (nothing when `hit` is false: a key outside the prefix).
#[cube]
pub(super) fn count_digit(packed: &mut Array<u32>, key: u32, hit: bool, shift: u32) {
    let d = select(hit, (key >> shift) & comptime!(BINS - 1), comptime!(BINS));
    let one = 1u32 << ((d & 3u32) * 8u32);
    let word = d >> 2u32;
    #[unroll]
    for w in 0..comptime!(BINS / 4) {
        packed[w as usize] += select(word == w, one, 0u32);
    }
}

/// One cube: sums the per-cube histograms per digit (unit `u` the cubes `u / BINS`,
/// `u / BINS + CUBE / BINS`, ... of digit `u % BINS`, then units `0..BINS` those 16
/// partials in order: sixteen times fewer dependent loads than one unit a digit, which
/// a GPU waits on a pass at a time), then walks the digits from the largest: the digit
/// where the count of larger keys first reaches `k_rem` joins the prefix, and `k_rem`
/// drops by the keys above it (`u32::MAX` after the last digit with `take_all_ties`).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (1), cube = UNITS)]
pub fn topk_radix_choose(
    hist: &Array<u32>,
    spec: &Array<u32>,
    state: &mut Array<u32>,
    cubes: u32,
    shift: u32,
    take_all_ties: u32,
    use_spec: u32,
) {
    let groups = comptime!(CUBE / BINS);
    let mut partials = SharedMemory::<u32>::new(comptime!(CUBE as usize));
    let bin = UNIT_POS % comptime!(BINS);
    let mut partial = 0u32;
    let mut c = UNIT_POS / comptime!(BINS);
    // The keys pass's histograms of the second digit under the first digit chosen,
    // where it counted them (see `count_second_digit`).
    if second_digit_counted(state, use_spec) {
        let d0 = state[0] >> comptime!(32 - DIGIT_BITS);
        let at = (d0 - SPECULATED) * cubes * comptime!(BINS);
        while c < cubes {
            partial += spec[(at + c * comptime!(BINS) + bin) as usize];
            c += groups;
        }
    } else {
        while c < cubes {
            partial += hist[(c * comptime!(BINS) + bin) as usize];
            c += groups;
        }
    }
    partials[UNIT_POS as usize] = partial;
    sync_cube();
    let mut sums = SharedMemory::<u32>::new(comptime!(BINS as usize));
    if UNIT_POS < comptime!(BINS) {
        let mut total = 0u32;
        #[unroll]
        for g in 0..groups {
            total += partials[(g * comptime!(BINS) + UNIT_POS) as usize];
        }
        sums[UNIT_POS as usize] = total;
    }
    sync_cube();
    if UNIT_POS == 0 {
        let k_rem = state[1];
        let mut above = 0u32;
        let mut digit = 0u32;
        let mut found = false;
        for i in 0..comptime!(BINS) {
            let d = comptime!(BINS - 1) - i;
            let c = sums[d as usize];
            if !found && above + c >= k_rem {
                digit = d;
                found = true;
            }
            if !found {
                above += c;
            }
        }
        state[0] = state[0] | (digit << shift);
        // After the last digit `state[1]` is how many keys equal to T are taken, or all
        // of them (`u32::MAX`) where the selection takes every key at or above T.
        state[1] = select(
            take_all_ties != 0u32 && shift == 0u32,
            u32::MAX,
            k_rem - above,
        );
    }
}
