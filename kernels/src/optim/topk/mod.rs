//! Exact top-k selection on the device by radix select, the engine of the gradient
//! compressors (`topk_ef` ranks by magnitude; FRUGAL's subspaces by a Philox word;
//! `randk` by a seeded permutation, whose threshold is known: no radix pass).
//!
//! Keys are u32 (`|a|`'s f32 bits, which order like the magnitudes, NaN above +inf; or
//! Philox words). Magnitude keys are not stored: every pass reads `a`'s bits and masks
//! the sign (one stream less to write in the keys pass and to read in the write pass).
//! Eight passes of 4-bit digits, most significant first, find the k-th
//! largest key `T` and how many of the keys equal to `T` are taken: per-cube histograms
//! (each unit counts in its own registers, summed through shared memory: no atomics),
//! then one cube sums them in a fixed order and picks the digit. Ties at `T` go to the
//! lower indices. The selection is then compacted in index order: per-cube counts, a
//! one-cube scan, and a write pass that also forms the error feedback. Everything is
//! integer or exact, so the same input selects the same indices on every run and every
//! backend; no host synchronisation between the passes. The passes over every element
//! read 4-wide (`a` and the keys are stored `n` rounded up to 4 long; nothing past `n`
//! counts). The threshold-estimate variant runs the radix passes over a seeded sample
//! instead and takes every key at or above the sample's quantile, forming `a` and its
//! keys in its count and write passes (two small downloads size its outputs). Rand-k
//! stores nothing either: its keys depend on the index alone, so the count pass reads
//! no memory and the write pass forms `a` (three streams in all, against eight when
//! `a` and the keys were stored).
// `n` beside the `_n` that cubecl's launch expansion gives the `Size` generic `N`
// (an attribute on the kernel does not reach that expansion).
#![allow(clippy::duplicate_underscore_argument)]
#![allow(clippy::assign_op_pattern)] // kernel code: the operand order is the emitted code's

mod compact;
mod radix;

pub use compact::*;
pub use radix::*;

use crate::launch::upload_u32;
use cubecl::prelude::*;
use kiln_dsl::{cube_sum, permutation_round_key, permute_index, philox4x32_10, PERMUTATION_ROUNDS};
use kiln_runtime::{DType, Result, Tensor};

/// Units per cube of the selection kernels (their one configuration, `UNITS = [256]`).
const CUBE: u32 = 256;
/// Elements per unit: a cube covers `UNITS * PER_UNIT` elements (128: on a CPU adapter
/// a cube's fixed costs, its barriers and shared-memory reduction above all, weigh on
/// fewer elements at 16 and 64; 64 -> 128 took top-k on 4M elements from 295-319 to
/// 269-288 ms, every pass a little faster). At most 255 (the histogram's 8-bit counters)
/// and `CHUNK` below 2^16 (the count pass's 16-bit halves).
const PER_UNIT: u32 = 128;
/// Elements per cube.
const CHUNK: u32 = CUBE * PER_UNIT;
/// Candidate regions (one per unit of the full passes) a unit of a candidates pass reads.
const CANDIDATE_GROUPS: u32 = 16;
/// Bits per radix digit, and digits (bins).
const DIGIT_BITS: u32 = 4;
const BINS: u32 = 1 << DIGIT_BITS;
// The histogram's two-step reduction (`CUBE / BINS` groups of `BINS` units), its 8-bit
// counters, and the two 16-bit counts of `above_and_ties`.
const _: () = assert!(CUBE == BINS * BINS && PER_UNIT < 256 && CHUNK < 65536);

kiln_runtime::comptime_enum! {
    /// What a selection ranks by.
    pub enum KeySource {
        /// `|a|` (f32 bits; NaN ranks above +inf).
        Magnitude = "magnitude",
        /// A Philox word of (seed, index): a uniformly random subset.
        Random = "random",
        /// `n - 1 - π(index)`, `π` the seeded permutation of `0..n`
        /// (`kiln_dsl::permutation`): the `k` largest are the indices `π` sends below
        /// `k`, so the threshold `n - k` is known and no radix pass runs.
        Permutation = "permutation",
    }
}

kiln_runtime::comptime_enum! {
    /// Where the count and write passes take an element's ranking key from.
    pub enum KeysFrom {
        /// The stored `keys` (Philox words).
        Stored = "stored",
        /// `|a|`'s bits, `a` as the pass reads or forms it.
        Magnitude = "magnitude",
        /// `n - 1 - π(index)`: the index alone.
        Permutation = "permutation",
    }
}

kiln_runtime::comptime_enum! {
    /// What a radix histogram pass reads.
    pub enum RadixSource {
        /// Every key.
        Keys = "keys",
        /// Every key, and copies those that match the prefix so far to the candidates
        /// (each unit to its own region, with their count per region).
        Compact = "compact",
        /// The candidates only.
        Candidates = "candidates",
    }
}

/// The selected elements, in increasing index order.
pub struct Selected {
    /// `[k]` i32 indices into the flattened input.
    pub indices: Tensor,
    /// `[k]` f32: `scale · a[indices]`.
    pub values: Tensor,
    /// `[n]` f32 error feedback `a − c` (`c` the dense compressed vector): `(1 − scale) a`
    /// where taken (exactly 0 for top-k), `a` elsewhere.
    pub error: Tensor,
    /// `[cubes]` f32 per-cube sums of `error²` (the compression error, summed on the
    /// host in f64 by [`Selected::error_norm`]).
    pub residual: Tensor,
}

impl Selected {
    /// `‖a − c‖₂`, from the per-cube partial sums (one small download).
    pub fn error_norm(&self) -> Result<f64> {
        Ok(self
            .residual
            .download()?
            .to_f64()
            .iter()
            .sum::<f64>()
            .sqrt())
    }
}

/// Selects `k` (1..=n) of `a = error + grad` (flattened; `error` f32, absent = 0) by
/// `source` and compacts them: see the module doc. `(seed, stream)` key the random
/// source (`crate::random::word(seed, stream, i)` of element `i`).
pub(crate) fn select_top_k(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
    source: KeySource,
    seed: (u64, u32),
    scale: f32,
) -> Result<Selected> {
    let n = grad.numel();
    match source {
        // Exactly one key equals each of 0..n: those at or above n - k are the k taken.
        // Nothing is stored: the keys follow from the index, `a` is formed where written.
        KeySource::Permutation => {
            let state = upload_u32(grad.client(), "topk_state", &[(n - k) as u32, u32::MAX])?;
            let source = Source::Formed {
                grad,
                error,
                keys: KeysFrom::Permutation,
                seed: seed.0,
            };
            let (offsets, before, _) = count_and_scan(&source, n, &state, false)?;
            compact(&source, n, &state, &offsets, &before, k, scale)
        }
        KeySource::Magnitude => {
            // Without an error an f32 gradient is `a` itself, and when its length is a
            // multiple of 4 the passes can read it in place (4-wide, never written):
            // no keys pass (three streams fewer; L-GreCo's per-layer errors, a first step).
            let a = match (error, grad.dtype(), n % 4) {
                (None, DType::F32, 0) => grad.prefix(n)?,
                _ => keys_of(grad, error, None, 1.0, source, seed)?.0,
            };
            let state = radix_select(&a.as_words(), MAGNITUDE, n, k)?;
            compact_stored(&a, None, n, &state, k, scale)
        }
        KeySource::Random => {
            let (a, keys) = keys_of(grad, error, None, 1.0, source, seed)?;
            let state = radix_select(&keys, u32::MAX, n, k)?;
            compact_stored(&a, Some(&keys), n, &state, k, scale)
        }
    }
}

/// The mask that makes an f32's bits its magnitude key (the sign cleared).
const MAGNITUDE: u32 = 0x7FFF_FFFF;

/// EControl's selection: the `k` largest `|p|` of `p = eta error + grad - h` (`error`
/// and `h` f32, absent = 0), compacted unscaled. Returns `p` and the selection, whose
/// `error` is `p - Δ` (`Δ` the dense compressed vector).
pub(crate) fn select_controlled(
    grad: &Tensor,
    error: Option<&Tensor>,
    h: Option<&Tensor>,
    eta: f32,
    k: usize,
) -> Result<(Tensor, Selected)> {
    let (p, _) = keys_of(grad, error, h, eta, KeySource::Magnitude, (0, 0))?;
    let n = grad.numel();
    let state = radix_select(&p.as_words(), MAGNITUDE, n, k)?;
    let selected = compact_stored(&p, None, n, &state, k, 1.0)?;
    Ok((p, selected))
}

/// The `k` elements of `a` whose keys (stored, or `None`: `a`'s magnitudes) the
/// selection `state` takes (of the first `n`), compacted with `scale`.
fn compact_stored(
    a: &Tensor,
    keys: Option<&Tensor>,
    n: usize,
    state: &Tensor,
    k: usize,
    scale: f32,
) -> Result<Selected> {
    let source = Source::Stored { a, keys };
    let (offsets, before, _) = count_and_scan(&source, n, state, false)?;
    compact(&source, n, state, &offsets, &before, k, scale)
}

/// Where the count and write passes read `a` and its ranking keys.
enum Source<'t> {
    /// `a` stored by [`topk_keys`] (`n` rounded up to 4 long; or an f32 gradient of a
    /// multiple of 4 elements read in place, when there is no error), and its keys:
    /// stored beside it, or `None` for its magnitudes.
    Stored {
        a: &'t Tensor,
        keys: Option<&'t Tensor>,
    },
    /// Formed in the pass from the inputs (`a = error + grad`), ranked by magnitude
    /// (the threshold estimate) or by the permutation of `seed` (rand-k), so no `a` or
    /// keys are stored.
    Formed {
        grad: &'t Tensor,
        error: Option<&'t Tensor>,
        keys: KeysFrom,
        seed: u64,
    },
}

/// The count and write kernels' common arguments (see [`Source::pass`]).
struct PassInputs {
    /// `input`, `error_in` and `keys` (absent ones four long, so that they do not hold a
    /// launch to width 1).
    bindings: [Tensor; 3],
    keys_from: KeysFrom,
    has_error: bool,
    /// The permutation's key and width (unused by other sources).
    key: [u32; 2],
    bits: u32,
}

impl Source<'_> {
    /// The count and write kernels' bindings and switches over the first `n` elements.
    fn pass(&self, n: usize) -> Result<PassInputs> {
        let client = match self {
            Source::Stored { a, .. } => a.client(),
            Source::Formed { grad, .. } => grad.client(),
        };
        let absent = |dtype| Tensor::empty(client, dtype, &[4]);
        let bits = crate::random::permutation_bits(n as u32);
        Ok(match *self {
            Source::Stored { a, keys } => PassInputs {
                bindings: [
                    a.clone(),
                    absent(DType::F32)?,
                    keys.map_or_else(|| absent(DType::U32), |k| Ok(k.clone()))?,
                ],
                keys_from: match keys {
                    Some(_) => KeysFrom::Stored,
                    None => KeysFrom::Magnitude,
                },
                has_error: false,
                key: [0, 0],
                bits,
            },
            Source::Formed {
                grad,
                error,
                keys,
                seed,
            } => PassInputs {
                bindings: [
                    grad.clone(),
                    error.map_or_else(|| absent(DType::F32), |e| Ok(e.clone()))?,
                    absent(DType::U32)?,
                ],
                keys_from: keys,
                has_error: error.is_some(),
                key: crate::random::seed_key(seed),
                bits,
            },
        })
    }
}

/// Top-k with an estimated threshold: the `round(k s / n)`-th largest `|a|` of `sample`
/// positions drawn from `seed` (uniform, with replacement) is the threshold, and every
/// element at or above it is taken (about `k`, not exactly; ties all taken). Radix
/// passes over the sample only, then one count, scan and write over `grad` and `error`
/// (`a` formed in each pass: no `a` or keys stored); two small downloads (the threshold,
/// the count) size the outputs.
pub(crate) fn select_above_estimate(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
    sample: usize,
    seed: u64,
) -> Result<Selected> {
    let client = grad.client();
    let n = grad.numel();
    let sample = sample.clamp(1, n);
    let sampled = Tensor::empty(client, DType::U32, &[sample.next_multiple_of(4)])?;
    let key = crate::random::seed_key(seed);
    TopkSample::tuned(
        client,
        0.0,
        &TopkSampleArgs {
            grad,
            error: &crate::launch::or_absent(client, error)?,
            sampled: &sampled,
            n: n as u32,
            sample: sample as u32,
            key0: key[0],
            key1: key[1],
            has_error: error.is_some(),
        },
    )?;
    let k_sample = ((k as f64 * sample as f64 / n as f64).round() as usize).clamp(1, sample);
    let threshold = radix_select(&sampled, u32::MAX, sample, k_sample)?
        .download()?
        .to_f64()[0] as u32;
    // Every key >= threshold: all ties taken.
    let state = upload_u32(client, "topk_state", &[threshold, u32::MAX])?;
    // At least the sampled element whose key is the threshold is taken.
    let source = Source::Formed {
        grad,
        error,
        keys: KeysFrom::Magnitude,
        seed: 0,
    };
    let (offsets, before, taken) = count_and_scan(&source, n, &state, true)?;
    compact(&source, n, &state, &offsets, &before, taken, 1.0)
}

/// `a = eta error + grad - h` (f32; `eta = 1` and no `h` for plain error feedback) and
/// the ranking keys (`source` Random: Philox words; Magnitude: none, a four-long
/// placeholder), both `n` rounded up to 4 long (see [`topk_keys`]).
fn keys_of(
    grad: &Tensor,
    error: Option<&Tensor>,
    h: Option<&Tensor>,
    eta: f32,
    source: KeySource,
    (seed, stream): (u64, u32),
) -> Result<(Tensor, Tensor)> {
    let client = grad.client();
    let n = grad.numel();
    let key = crate::random::seed_key(seed);
    let stored = match source {
        KeySource::Magnitude => 4,
        _ => n.next_multiple_of(4),
    };
    let keys = Tensor::empty(client, DType::U32, &[stored])?;
    let a = Tensor::empty(client, DType::F32, &[n.next_multiple_of(4)])?;
    // Four long, so that an absent state does not hold the launch to width 1.
    let absent = Tensor::empty(client, DType::F32, &[4])?;
    TopkKeys::tuned(
        client,
        0.0,
        &TopkKeysArgs {
            grad,
            error: error.unwrap_or(&absent),
            h: h.unwrap_or(&absent),
            a: &a,
            keys: &keys,
            n: n as u32,
            eta,
            key0: key[0],
            key1: key[1],
            stream,
            source,
            has_error: error.is_some(),
            has_h: h.is_some(),
        },
    )?;
    Ok((a, keys))
}

/// The radix select of the `k`-th largest of the first `n` keys `keys & key_mask` (`k`
/// in 1..=n; `keys` `n` rounded up to 4 long; [`MAGNITUDE`] ranks f32 words by
/// magnitude): a `[2]` u32 state `[T, ties of T to take]` on the device.
fn radix_select(keys: &Tensor, key_mask: u32, n: usize, k: usize) -> Result<Tensor> {
    let client = keys.client();
    let cubes = n.div_ceil(CHUNK as usize);
    let state = upload_u32(client, "topk_state", &[0, k as u32])?;
    let hist = Tensor::empty(client, DType::U32, &[cubes * BINS as usize])?;
    // After two passes (8 bits of the prefix) the keys that can still be the k-th are
    // usually a small part (magnitudes: a factor-4 range of |a|; random keys: 1/256), so
    // the third pass copies them out per cube and the last five read only those.
    let regions = cubes * CUBE as usize;
    let candidates = Tensor::empty(client, DType::U32, &[regions * PER_UNIT as usize])?;
    let counts = Tensor::empty(client, DType::U32, &[regions])?;
    for pass in 0..32 / DIGIT_BITS {
        let (source, cubes) = match pass {
            0 | 1 => (RadixSource::Keys, cubes),
            2 => (RadixSource::Compact, cubes),
            _ => (
                RadixSource::Candidates,
                regions.div_ceil(CANDIDATE_GROUPS as usize * CUBE as usize),
            ),
        };
        let shift = 32 - DIGIT_BITS * (pass + 1);
        // The bits above this digit, which must equal the prefix chosen so far.
        let high = match shift + DIGIT_BITS {
            32 => 0,
            s => !((1u32 << s) - 1),
        };
        TopkRadixHistogram::tuned(
            client,
            0.0,
            &TopkRadixHistogramArgs {
                keys,
                state: &state,
                hist: &hist,
                candidates: &candidates,
                counts: &counts,
                n: n as u32,
                cubes: cubes as u32,
                regions: regions as u32,
                shift,
                high,
                key_mask,
                source,
            },
        )?;
        TopkRadixChoose::tuned(
            client,
            0.0,
            &TopkRadixChooseArgs {
                hist: &hist,
                state: &state,
                cubes: cubes as u32,
                shift,
            },
        )?;
    }
    Ok(state)
}

/// Per-cube counts above and at `T` and their exclusive scan (`offsets`), each unit's
/// counts before it in its cube (`before`, both in one u32); with `total`, also the number
/// taken (every key above or at `T`: one download of the counts). Over the first `n`
/// keys.
fn count_and_scan(
    source: &Source,
    n: usize,
    state: &Tensor,
    total: bool,
) -> Result<(Tensor, Tensor, usize)> {
    let pass = source.pass(n)?;
    let [input, error, keys] = &pass.bindings;
    let client = input.client();
    let cubes = n.div_ceil(CHUNK as usize);
    let counts = Tensor::empty(client, DType::U32, &[2 * cubes])?;
    let before = Tensor::empty(client, DType::U32, &[cubes * CUBE as usize])?;
    TopkCount::tuned(
        client,
        0.0,
        &TopkCountArgs {
            input,
            error_in: error,
            keys,
            state,
            key0: pass.key[0],
            key1: pass.key[1],
            bits: pass.bits,
            counts: &counts,
            before: &before,
            n: n as u32,
            cubes: cubes as u32,
            keys_from: pass.keys_from,
            has_error: pass.has_error,
        },
    )?;
    let offsets = Tensor::empty(client, DType::U32, &[2 * cubes])?;
    TopkScan::tuned(
        client,
        0.0,
        &TopkScanArgs {
            counts: &counts,
            offsets: &offsets,
            cubes: cubes as u32,
        },
    )?;
    let taken = match total {
        true => counts.download()?.to_f64().iter().sum::<f64>() as usize,
        false => 0,
    };
    Ok((offsets, before, taken))
}

/// The write pass over the first `n` elements: `k` output slots (see [`topk_write`]).
#[allow(clippy::too_many_arguments)]
fn compact(
    source: &Source,
    n: usize,
    state: &Tensor,
    offsets: &Tensor,
    before: &Tensor,
    k: usize,
    scale: f32,
) -> Result<Selected> {
    let pass = source.pass(n)?;
    let [input, error_in, keys] = &pass.bindings;
    let client = input.client();
    let cubes = n.div_ceil(CHUNK as usize);
    let indices = Tensor::empty(client, DType::I32, &[k])?;
    let values = Tensor::empty(client, DType::F32, &[k])?;
    let error = Tensor::empty(client, DType::F32, &[n.next_multiple_of(4)])?;
    let residual = Tensor::empty(client, DType::F32, &[cubes])?;
    TopkWrite::tuned(
        client,
        0.0,
        &TopkWriteArgs {
            input,
            error_in,
            keys,
            state,
            key0: pass.key[0],
            key1: pass.key[1],
            bits: pass.bits,
            offsets,
            before,
            indices: &indices,
            values: &values,
            error: &error,
            residual: &residual,
            n: n as u32,
            cubes: cubes as u32,
            scale,
            // Exact in f32 for 1/2 <= scale <= 2^24 (Sterbenz; then an integer part).
            keep: 1.0 - scale,
            keys_from: pass.keys_from,
            has_error: pass.has_error,
        },
    )?;
    Ok(Selected {
        indices,
        values,
        error: error.prefix(n)?,
        residual,
    })
}

/// `sampled[j]` = the magnitude key of `a[p_j] = error[p_j] + grad[p_j]` (f32, as
/// [`topk_keys`] forms it; no `error` without `has_error`), `p_j` uniform in `0..n` from
/// Philox word `j` of `seed` (`mul_hi(word, n)`: bias below `n / 2^32`).
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(n = pow2, dtype),
    grid = cubes(sample.div_ceil(UNITS)),
    cube = UNITS
)]
pub fn topk_sample<F: Float>(
    grad: &Array<F>,
    error: &Array<f32>,
    sampled: &mut Array<u32>,
    n: u32,
    sample: u32,
    key0: u32,
    key1: u32,
    #[comptime] has_error: bool,
) {
    let j = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if j < sample {
        let r = philox4x32_10(j / 4, 1u32, 0u32, 0u32, key0, key1);
        let lane = j % 4;
        let w = select(
            lane == 0,
            r.x0,
            select(lane == 1, r.x1, select(lane == 2, r.x2, r.x3)),
        );
        let p = u32::mul_hi(w, n) as usize;
        let mut v = f32::cast_from(grad[p]);
        if comptime!(has_error) {
            v = error[p] + v;
        }
        sampled[j as usize] = u32::reinterpret(v) & 0x7FFF_FFFFu32;
    }
}

/// `a = eta error + grad - h` in f32 (`eta = 1` and no `h` for plain error feedback:
/// `1 * error` is exact, so `a = error + grad` bit for bit) and, for `source` Random, the
/// ranking key of every element: a Philox word of its index (magnitude keys are `a`'s
/// bits, read from `a` by the passes; rand-k's permutation runs no keys pass). 4-wide
/// where `n` is a multiple of 4 (a CPU adapter issues one load per lane and access, so
/// a vector access does four elements' work for one's cost); `a` and `keys` are `n`
/// rounded up to 4 long (the selection kernels read them 4-wide), their tail past `n`
/// is never read.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(n = pow2, dtype),
    grid = cubes(n.div_ceil(VECTOR * UNITS)),
    cube = UNITS
)]
pub fn topk_keys<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    error: &Array<Vector<f32, N>>,
    h: &Array<Vector<f32, N>>,
    a: &mut Array<Vector<f32, N>>,
    keys: &mut Array<Vector<u32, N>>,
    n: u32,
    eta: f32,
    key0: u32,
    key1: u32,
    stream: u32,
    #[comptime] source: KeySource,
    #[comptime] has_error: bool,
    #[comptime] has_h: bool,
) {
    let nw = N::value().comptime() as u32;
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    // The first element of this vector (4-wide only when n % 4 == 0: whole vectors).
    let first = i * nw;
    if first < n {
        let mut v = Vector::<f32, N>::cast_from(grad[i as usize]);
        if comptime!(has_error) {
            v = Vector::<f32, N>::new(eta) * error[i as usize] + v;
        }
        if comptime!(has_h) {
            v -= h[i as usize];
        }
        a[i as usize] = v;
        if comptime!(source == KeySource::Random) {
            // Element e is lane e % 4 of the block at counter (e / 4, stream, 0, 0), as
            // crate::random::word: one block serves a whole 4-wide vector.
            let r = philox4x32_10(first / 4, stream, 0u32, 0u32, key0, key1);
            let mut kv = Vector::<u32, N>::new(0u32);
            #[unroll]
            for l in 0..nw {
                let lane = (first + l) % 4;
                kv[l as usize] = select(
                    lane == 0,
                    r.x0,
                    select(lane == 1, r.x1, select(lane == 2, r.x2, r.x3)),
                );
            }
            keys[i as usize] = kv;
        }
    }
}
