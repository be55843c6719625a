//! The radix passes: a per-cube histogram of one 4-bit digit over the keys that match
//! the prefix chosen so far, and the one-cube pass that sums the histograms and picks
//! the digit (and, at the last digit, how many ties at the threshold are taken).

use super::*;

/// Per-cube histogram of this pass's digit over the keys that match the prefix chosen
/// so far (`(key & high) == (prefix & high)`), over `CHUNK` keys a cube, read 4-wide
/// (`keys` is `n` rounded up to 4 long; keys past `n` are not counted). A key is the
/// word read `& key_mask` (`0x7FFF_FFFF` reads `a`'s f32 bits as magnitude keys, so
/// they need not be stored; candidates are stored masked).
/// Each unit counts in registers, four 8-bit counters a word (`PER_UNIT` < 256 keys
/// a unit: no overflow), a key adding `1 << 8 (d % 4)` to word `d / 4` by a compare and
/// a select per word: a CPU adapter runs these as vector operations, where a
/// shared-memory counter per key is a gather and a scatter per lane (lavapipe, 4M keys:
/// 20 ms a pass); then the units' counters go through shared memory as a `[BINS, UNITS]`
/// table, summed by all units in two steps (16 columns each, then 16 partials per bin).
/// No atomics. `source` says what a cube reads: its `CHUNK` keys; the same while each
/// unit copies those in the prefix to its own region of `PER_UNIT` slots of
/// `candidates` (their number to `counts[region]`, region = `cube UNITS + unit`); or the
/// candidates of `CANDIDATE_GROUPS x UNITS` regions (a unit `CANDIDATE_GROUPS` of them,
/// `UNITS` apart), so that a pass over few candidates runs few cubes: the reduction
/// above costs a cube as much as reading 16K keys on lavapipe.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(cubes), cube = UNITS)]
pub fn topk_radix_histogram(
    keys: &Array<Vector<u32, Const<4>>>,
    state: &Array<u32>,
    hist: &mut Array<u32>,
    candidates: &mut Array<u32>,
    counts: &mut Array<u32>,
    n: u32,
    cubes: u32,
    regions: u32,
    shift: u32,
    high: u32,
    key_mask: u32,
    #[comptime] source: RadixSource,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let prefix = state[0] & high;
    let mut packed = Array::<u32>::new(comptime!((BINS / 4) as usize));
    #[unroll]
    for w in 0..comptime!(BINS / 4) {
        packed[w as usize] = 0u32;
    }
    if comptime!(source == RadixSource::Candidates) {
        #[unroll]
        for g in 0..comptime!(CANDIDATE_GROUPS) {
            let region = (cube * comptime!(CANDIDATE_GROUPS) + g) * UNITS + UNIT_POS;
            let mut len = 0u32;
            if cube < cubes && region < regions {
                len = counts[region as usize];
            }
            let at = region * comptime!(PER_UNIT);
            for i in 0..len {
                let key = candidates[(at + i) as usize];
                count_digit(&mut packed, key, (key & high) == prefix, shift);
            }
        }
    } else {
        let base = cube * comptime!(CHUNK);
        // The keys this cube reads (uniform: the loop runs as often for every unit).
        let mut len = 0u32;
        if cube < cubes {
            len = min(n - base, comptime!(CHUNK));
        }
        let region = cube * UNITS + UNIT_POS;
        let mut stored = 0u32;
        let mut j = 0u32;
        // Vector `j UNITS + unit` of the cube: PER_UNIT / 4 vectors a unit.
        while j * UNITS * 4u32 < len {
            let first = (j * UNITS + UNIT_POS) * 4u32;
            if first < len {
                let kv = keys[((base + first) / 4u32) as usize];
                #[unroll]
                for l in 0..4u32 {
                    let key = kv[l as usize] & key_mask;
                    let hit = (key & high) == prefix && first + l < len;
                    count_digit(&mut packed, key, hit, shift);
                    if comptime!(source == RadixSource::Compact) {
                        if hit {
                            candidates[(region * comptime!(PER_UNIT) + stored) as usize] = key;
                            stored += 1;
                        }
                    }
                }
            }
            j += 1;
        }
        if comptime!(source == RadixSource::Compact) {
            if cube < cubes {
                counts[region as usize] = stored;
            }
        }
    }
    let mut table = SharedMemory::<u32>::new(comptime!((BINS * CUBE) as usize));
    #[unroll]
    for b in 0..comptime!(BINS) {
        let count = (packed[(b / 4) as usize] >> ((b % 4) * 8)) & 255u32;
        table[(b * UNITS + UNIT_POS) as usize] = count;
    }
    sync_cube();
    // Unit u: bin u % BINS over the 16 columns of group u / BINS.
    let bin = UNIT_POS % comptime!(BINS);
    let group = UNIT_POS / comptime!(BINS);
    let mut partial = 0u32;
    #[unroll]
    for i in 0..comptime!(CUBE / BINS) {
        partial += table[(bin * UNITS + group * comptime!(CUBE / BINS) + i) as usize];
    }
    sync_cube();
    table[UNIT_POS as usize] = partial;
    sync_cube();
    if cube < cubes && UNIT_POS < comptime!(BINS) {
        let mut total = 0u32;
        #[unroll]
        for g in 0..comptime!(CUBE / BINS) {
            total += table[(g * comptime!(BINS) + UNIT_POS) as usize];
        }
        hist[(cube * comptime!(BINS) + UNIT_POS) as usize] = total;
    }
}

/// Adds a key's digit (`(key >> shift) % BINS`) to a unit's packed 8-bit counters
/// (nothing when `hit` is false: a key outside the prefix).
#[cube]
fn count_digit(packed: &mut Array<u32>, key: u32, hit: bool, shift: u32) {
    let d = select(hit, (key >> shift) & comptime!(BINS - 1), comptime!(BINS));
    let one = 1u32 << ((d & 3u32) * 8u32);
    let word = d >> 2u32;
    #[unroll]
    for w in 0..comptime!(BINS / 4) {
        packed[w as usize] += select(word == w, one, 0u32);
    }
}

/// One cube: sums the per-cube histograms per digit (units `0..BINS`, cubes in order),
/// then walks the digits from the largest: the digit where the count of larger keys
/// first reaches `k_rem` joins the prefix, and `k_rem` drops by the keys above it.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (1), cube = UNITS)]
pub fn topk_radix_choose(hist: &Array<u32>, state: &mut Array<u32>, cubes: u32, shift: u32) {
    let mut sums = SharedMemory::<u32>::new(comptime!(BINS as usize));
    if UNIT_POS < comptime!(BINS) {
        let mut total = 0u32;
        for c in 0..cubes {
            total += hist[(c * comptime!(BINS) + UNIT_POS) as usize];
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
        state[1] = k_rem - above;
    }
}
