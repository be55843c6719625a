//! Exact top-k selection on the device by radix select, the engine of the gradient
//! compressors (`topk_ef` ranks by magnitude; FRUGAL's subspaces by a Philox word), and
//! `randk`'s subset, which is marked, not ranked: no radix pass (`subset.rs`).
//!
//! Keys are u32 (`|a|`'s f32 bits, which order like the magnitudes, NaN above +inf; or
//! Philox words). Magnitude keys are not stored: every pass reads `a`'s bits and masks
//! the sign. The keys pass forms and writes `a` and counts the first 4-bit digit; seven
//! more passes, most significant digit first, find the k-th largest key `T` and how
//! many of the keys equal to `T` are taken: per-cube histograms (each unit counts in its
//! own registers, summed through shared memory: no atomics), then one cube sums them in
//! a fixed order and picks the digit. Ties at `T` go to the lower indices. The third
//! digit's pass keeps every key at or above the first two digits' prefix (a few per
//! cent of them) as candidates, in index order ([`Kept`]); the last five passes, and the
//! compaction in index order (per-cube counts, a one-cube scan, a write), read only
//! those. The error feedback `a − c` is `a` as the keys pass wrote it, overwritten where
//! taken: five streams in all with an error (gradient and error read, `a` written, read
//! twice). Everything is integer or exact, so the same input selects the same indices on
//! every run and every backend; no host synchronisation between the passes. The passes
//! over every element read 4-wide (`a` and the keys are stored `n` rounded up to 4 long;
//! nothing past `n` counts). Where the threshold is known before (the threshold
//! estimate, which runs the radix passes over a seeded sample and takes every key at or
//! above the sample's quantile), one pass forms `a`, writes it and keeps the candidates
//! ([`topk_form_candidates`]): the three streams a copy moves, then the compaction (the
//! estimate counts what it took with one small download). Exact top-k by magnitude of
//! many elements (`n >= 2^19`, `k <= n / 2`) bounds the k-th largest from a seeded sample
//! first, so that the same one pass keeps the candidates and all eight radix passes read
//! those alone, exact on every input ([`select_top_k_sampled`], `sampled.rs`). Rand-k's
//! subset is marked, not ranked ([`select_random_subset`], `subset.rs`).
// `n` beside the `_n` that cubecl's launch expansion gives the `Size` generic `N`
// (an attribute on the kernel does not reach that expansion).
#![allow(clippy::duplicate_underscore_argument)]
#![allow(clippy::assign_op_pattern)] // kernel code: the operand order is the emitted code's

mod candidates;
mod compact;
mod estimate;
mod radix;
mod sampled;
mod subset;

pub use candidates::*;
pub use compact::*;
pub use estimate::*;
pub use radix::*;
pub use sampled::*;
pub use subset::*;

use crate::launch::upload_u32;
use cubecl::prelude::*;
use kiln_dsl::{cube_sum, permutation_round_key, philox4x32_10, PERMUTATION_ROUNDS};
use kiln_runtime::{Client, DType, Result, Tensor};

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
// counters and the candidates' 8-bit offsets, and the two 16-bit counts of
// `above_and_ties`.
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
        /// `k`, `π⁻¹(0..k)`, which are marked directly: no key is formed and no radix
        /// pass runs.
        Permutation = "permutation",
    }
}

kiln_runtime::comptime_enum! {
    /// What a radix histogram pass reads.
    pub enum RadixSource {
        /// Every key.
        Keys = "keys",
        /// The candidates [`topk_radix_compact`] or [`topk_form_candidates`] kept.
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

/// What a selection by magnitude ranks: `a = eta error + grad - h` (f32; `error` and `h`
/// absent = 0; plain error feedback has `eta = 1` and no `h`), written once, or with
/// `twice` also to a copy (EControl keeps `p` = `a`; the copy becomes the selection's
/// error).
#[derive(Clone, Copy)]
pub(super) struct Formed<'a> {
    pub(super) grad: &'a Tensor,
    pub(super) error: Option<&'a Tensor>,
    pub(super) h: Option<&'a Tensor>,
    pub(super) eta: f32,
    pub(super) twice: bool,
}

impl<'a> Formed<'a> {
    /// Plain error feedback: `a = error + grad`, written once.
    pub(super) fn error_feedback(grad: &'a Tensor, error: Option<&'a Tensor>) -> Self {
        Formed {
            grad,
            error,
            h: None,
            eta: 1.0,
            twice: false,
        }
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
        // The k taken are π⁻¹(0..k): marked, not ranked (no radix pass, no keys).
        KeySource::Permutation => select_random_subset(grad, error, k, seed.0, scale),
        // One pass over the data keeps the candidates a sampled bracket admits.
        KeySource::Magnitude if bracket_pays(n, k) => {
            let formed = Formed::error_feedback(grad, error);
            Ok(select_top_k_sampled(&formed, k, scale)?.1)
        }
        KeySource::Magnitude => select_top_k_every_key(grad, error, k, scale),
        KeySource::Random => {
            let (a, keys, first) = keys_of(grad, error, None, 1.0, source, seed, false)?;
            let kept = radix_select(&keys, Some(&a), u32::MAX, n, k, Some(first), false)?;
            compact_candidates(&a, &kept, n, Some(k), scale)
        }
    }
}

/// Exact top-k of `a = error + grad` by magnitude through the radix select over every
/// key (no sampled bracket, whatever `n` and `k`), compacted with `scale`.
pub(crate) fn select_top_k_every_key(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
    scale: f32,
) -> Result<Selected> {
    let n = grad.numel();
    // `a`'s words are its keys; `a` becomes the error feedback.
    let source = KeySource::Magnitude;
    let (a, _, first) = keys_of(grad, error, None, 1.0, source, (0, 0), false)?;
    let kept = radix_select(&a.as_words(), None, MAGNITUDE, n, k, Some(first), false)?;
    compact_candidates(&a, &kept, n, Some(k), scale)
}

/// How the selections' passes over every element (and FRUGAL's signSGD pass) lay a
/// cube's elements over its units.
/// GPUs want `Coalesced` (neighbouring units read neighbouring vectors); a CPU adapter
/// runs a unit's loads one SIMD lane at a time, and there `Contiguous` is faster
/// (lavapipe, 4M keys: the keys pass 45.5 -> 36 ms, a histogram pass 25.4 -> 20 ms), each
/// lane walking its own cache lines in order. The results do not depend on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnitLayout {
    /// By the adapter type: `Contiguous` on CPU adapters, `Coalesced` elsewhere.
    #[default]
    Auto,
    /// Each unit a contiguous region of its cube's elements.
    Contiguous,
    /// A unit's vectors a cube's width apart.
    Coalesced,
}

thread_local! {
    static LAYOUT: std::cell::Cell<UnitLayout> = const { std::cell::Cell::new(UnitLayout::Auto) };
}

/// Runs `f` with the compressors' selections on this thread laid out as `layout` (the
/// device's own choice otherwise; see [`UnitLayout`]): for tests of the layout a device
/// does not pick, and for devices whose adapter type misleads. The previous layout is
/// restored after `f`, also when it panics.
pub fn with_unit_layout<R>(layout: UnitLayout, f: impl FnOnce() -> R) -> R {
    struct Restore(UnitLayout);
    impl Drop for Restore {
        fn drop(&mut self) {
            LAYOUT.set(self.0);
        }
    }
    let _restore = Restore(LAYOUT.replace(layout));
    f()
}

/// The `contiguous` launch argument (1: [`UnitLayout::Contiguous`]) for `client`.
pub(super) fn contiguous_regions(client: &Client) -> u32 {
    u32::from(match LAYOUT.get() {
        UnitLayout::Auto => client.report().adapter_type == kiln_runtime::AdapterType::Cpu,
        layout => layout == UnitLayout::Contiguous,
    })
}

/// The steps, in vectors, between neighbouring units and a unit's consecutive vectors
/// (`per_unit` vectors a unit, `units` units a cube): see [`contiguous_regions`].
#[cube]
pub(super) fn unit_layout(
    contiguous: u32,
    #[comptime] per_unit: u32,
    #[comptime] units: u32,
) -> (u32, u32) {
    let contiguous = contiguous != 0u32;
    (
        select(contiguous, per_unit, 1u32),
        select(contiguous, 1u32, units),
    )
}

/// `error`, or where it is absent a placeholder four long (so that it does not hold a
/// launch's vector width to 1).
fn error_or_placeholder(client: &Client, error: Option<&Tensor>) -> Result<Tensor> {
    match error {
        Some(e) => Ok(e.clone()),
        None => Tensor::empty(client, DType::F32, &[4]),
    }
}

/// The exclusive offsets over the cubes ([`topk_scan`]) of per-cube counts `[2 cubes]`
/// (taken above the threshold, and ties).
fn scan_cubes(counts: &Tensor, cubes: usize) -> Result<Tensor> {
    let client = counts.client();
    let offsets = Tensor::empty(client, DType::U32, &[2 * cubes])?;
    TopkScan::tuned(
        client,
        0.0,
        &TopkScanArgs {
            counts,
            offsets: &offsets,
            cubes: cubes as u32,
        },
    )?;
    Ok(offsets)
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
    let n = grad.numel();
    if bracket_pays(n, k) {
        let formed = Formed {
            grad,
            error,
            h,
            eta,
            twice: true,
        };
        return select_top_k_sampled(&formed, k, 1.0);
    }
    // `p` twice: the update reads it, and its copy becomes the selection's error.
    let (p, rest, first) = keys_of(grad, error, h, eta, KeySource::Magnitude, (0, 0), true)?;
    let kept = radix_select(&rest.as_words(), None, MAGNITUDE, n, k, Some(first), false)?;
    let selected = compact_candidates(&rest, &kept, n, Some(k), 1.0)?;
    Ok((p, selected))
}

/// A selection's threshold and its candidates, on the device (see [`Kept`]).
struct Candidates {
    /// `[2]` u32: `[T, ties of T to take]`.
    state: Tensor,
    /// Per region (`CUBE` a cube, `PER_UNIT` elements each): the candidates' words,
    /// `PER_UNIT` slots a region; their offsets in the region, 8 bits each; how many;
    /// the sum of `a²` over the region's other elements.
    candidates: Tensor,
    positions: Tensor,
    stored: Tensor,
    below: Tensor,
    /// What makes a kept word its key.
    key_mask: u32,
    /// Whether a kept word is `a`'s (magnitude keys), so that it carries its value.
    keys_are_values: bool,
}

impl Candidates {
    /// Room for the candidates of `n` elements, and `state`.
    fn empty(
        client: &Client,
        n: usize,
        state: Tensor,
        key_mask: u32,
        keys_are_values: bool,
    ) -> Result<Self> {
        let regions = n.div_ceil(CHUNK as usize) * CUBE as usize;
        let slots = regions * PER_UNIT as usize;
        Ok(Candidates {
            state,
            candidates: Tensor::empty(client, DType::U32, &[slots])?,
            positions: Tensor::empty(client, DType::U32, &[slots / 4])?,
            stored: Tensor::empty(client, DType::U32, &[regions])?,
            below: Tensor::empty(client, DType::F32, &[regions])?,
            key_mask,
            keys_are_values,
        })
    }
}

/// `a` formed and written (`n` rounded up to 4 long; with `twice` also its copy, else the
/// copy is `a` itself), and the candidates whose magnitude key is at or above the
/// threshold `state[0]` kept in the same pass: see [`topk_form_candidates`].
fn form_candidates(formed: &Formed, state: Tensor) -> Result<(Tensor, Tensor, Candidates)> {
    let client = formed.grad.client();
    let n = formed.grad.numel();
    let a = Tensor::empty(client, DType::F32, &[n.next_multiple_of(4)])?;
    let copy = match formed.twice {
        true => Tensor::empty(client, DType::F32, &[n.next_multiple_of(4)])?,
        false => a.clone(),
    };
    let kept = Candidates::empty(client, n, state, MAGNITUDE, true)?;
    launch_form(formed, &a, &copy, &kept, None)?;
    Ok((a, copy, kept))
}

/// [`topk_form_candidates`] into `a` (and `copy` with `twice`) and `kept`; with `short`,
/// the refill, which runs only where `short[0]` is not 0.
fn launch_form(
    formed: &Formed,
    a: &Tensor,
    copy: &Tensor,
    kept: &Candidates,
    short: Option<&Tensor>,
) -> Result<()> {
    let client = formed.grad.client();
    let n = formed.grad.numel();
    let absent = Tensor::empty(client, DType::F32, &[4])?;
    TopkFormCandidates::tuned(
        client,
        0.0,
        &TopkFormCandidatesArgs {
            grad: formed.grad,
            error_in: &error_or_placeholder(client, formed.error)?,
            h: &error_or_placeholder(client, formed.h)?,
            state: &kept.state,
            short: short.unwrap_or(&kept.state),
            a,
            copy: match formed.twice {
                true => copy,
                false => &absent,
            },
            candidates: &kept.candidates,
            positions: &kept.positions,
            stored: &kept.stored,
            below: &kept.below,
            n: n as u32,
            cubes: n.div_ceil(CHUNK as usize) as u32,
            eta: formed.eta,
            has_error: formed.error.is_some(),
            has_h: formed.h.is_some(),
            twice: formed.twice,
            refill: short.is_some(),
        },
    )?;
    Ok(())
}

/// The elements `kept`'s selection takes of the first `n` of `a` (f32, `n` rounded up to
/// 4 long; `k` of them, or `None`: every key at or above `T`, counted with one small
/// download), compacted with `scale`, from the candidates alone; `a` becomes the error
/// feedback (overwritten where taken).
fn compact_candidates(
    a: &Tensor,
    kept: &Candidates,
    n: usize,
    k: Option<usize>,
    scale: f32,
) -> Result<Selected> {
    let client = a.client();
    let cubes = n.div_ceil(CHUNK as usize);
    let counts = Tensor::empty(client, DType::U32, &[2 * cubes])?;
    let before = Tensor::empty(client, DType::U32, &[cubes * CUBE as usize])?;
    TopkCandidatesCount::tuned(
        client,
        0.0,
        &TopkCandidatesCountArgs {
            candidates: &kept.candidates,
            stored: &kept.stored,
            state: &kept.state,
            counts: &counts,
            before: &before,
            cubes: cubes as u32,
            key_mask: kept.key_mask,
        },
    )?;
    let offsets = scan_cubes(&counts, cubes)?;
    let k = match k {
        Some(k) => k,
        None => counts.download()?.to_f64().iter().sum::<f64>() as usize,
    };
    let indices = Tensor::empty(client, DType::I32, &[k])?;
    let values = Tensor::empty(client, DType::F32, &[k])?;
    let residual = Tensor::empty(client, DType::F32, &[cubes])?;
    TopkCandidatesWrite::tuned(
        client,
        0.0,
        &TopkCandidatesWriteArgs {
            candidates: &kept.candidates,
            positions: &kept.positions,
            stored: &kept.stored,
            below: &kept.below,
            state: &kept.state,
            offsets: &offsets,
            before: &before,
            indices: &indices,
            values: &values,
            error: a,
            residual: &residual,
            cubes: cubes as u32,
            key_mask: kept.key_mask,
            scale,
            keep: 1.0 - scale,
            keys_are_values: kept.keys_are_values,
        },
    )?;
    Ok(Selected {
        indices,
        values,
        error: a.prefix(n)?,
        residual,
    })
}

/// `a = eta error + grad - h` (f32; `eta = 1` and no `h` for plain error feedback) and
/// the ranking keys (`source` Random: Philox words; Magnitude: none, a four-long
/// placeholder), both `n` rounded up to 4 long (see [`topk_keys`]); with `twice`, also a
/// copy of `a`, returned in place of the keys (EControl keeps `p` = `a`, and the copy
/// becomes the selection's error); and the histogram of the keys' top digit (the radix select's
/// first pass).
fn keys_of(
    grad: &Tensor,
    error: Option<&Tensor>,
    h: Option<&Tensor>,
    eta: f32,
    source: KeySource,
    (seed, stream): (u64, u32),
    twice: bool,
) -> Result<(Tensor, Tensor, FirstDigit)> {
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
    let absent_u32 = Tensor::empty(client, DType::U32, &[4])?;
    let copy = match twice {
        true => Tensor::empty(client, DType::F32, &[n.next_multiple_of(4)])?,
        false => absent.clone(),
    };
    let hist = Tensor::empty(
        client,
        DType::U32,
        &[n.div_ceil(CHUNK as usize) * BINS as usize],
    )?;
    // Magnitude keys only: random keys' first digit is rarely one it speculates on.
    let spec = match source {
        KeySource::Magnitude => Some(Tensor::empty(
            client,
            DType::U32,
            &[2 * n.div_ceil(CHUNK as usize) * BINS as usize],
        )?),
        _ => None,
    };
    TopkKeys::tuned(
        client,
        0.0,
        &TopkKeysArgs {
            grad,
            error: error.unwrap_or(&absent),
            h: h.unwrap_or(&absent),
            a: &a,
            copy: &copy,
            keys: &keys,
            hist: &hist,
            spec: spec.as_ref().unwrap_or(&absent_u32),
            n: n as u32,
            cubes: n.div_ceil(CHUNK as usize) as u32,
            eta,
            key0: key[0],
            key1: key[1],
            stream,
            contiguous: contiguous_regions(client),
            source,
            has_error: error.is_some(),
            has_h: h.is_some(),
            twice,
        },
    )?;
    let first = FirstDigit { hist, spec };
    match twice {
        true => Ok((a, copy, first)),
        false => Ok((a, keys, first)),
    }
}

/// What the keys pass counted for the radix select: the first digit's histogram per
/// cube (`[cubes, BINS]`), and for magnitude keys the second digit's under the two
/// first digits it speculates on (`[2, cubes, BINS]`; see `radix::count_second_digit`).
struct FirstDigit {
    hist: Tensor,
    spec: Option<Tensor>,
}

/// The radix select of the `k`-th largest of the first `n` keys `keys & key_mask` (`k`
/// in 1..=n; `keys` `n` rounded up to 4 long; [`MAGNITUDE`] ranks f32 words by
/// magnitude; `values` is `a` where the keys are not its words, read for the sum of
/// squares the compaction reports; `first`, the first pass's histogram where the keys
/// pass counted it; `all_ties`: every key equal to the `k`-th taken, not just enough to
/// make `k`): the selection and its candidates (see [`topk_radix_compact`]).
fn radix_select(
    keys: &Tensor,
    values: Option<&Tensor>,
    key_mask: u32,
    n: usize,
    k: usize,
    first: Option<FirstDigit>,
    all_ties: bool,
) -> Result<Candidates> {
    let client = keys.client();
    let cubes = n.div_ceil(CHUNK as usize);
    let state = upload_u32(client, "topk_state", &[0, k as u32])?;
    let counted = first.is_some();
    let (hist, spec) = match first {
        Some(f) => (f.hist, f.spec),
        None => (
            Tensor::empty(client, DType::U32, &[cubes * BINS as usize])?,
            None,
        ),
    };
    let speculated = spec.is_some();
    let spec = match spec {
        Some(s) => s,
        None => Tensor::empty(client, DType::U32, &[4])?,
    };
    // After two passes (8 bits of the prefix) the keys that can still be the k-th are
    // usually a small part (magnitudes: a factor-4 range of |a|; random keys: 1/256), so
    // the third pass copies them out per unit and the last five read only those.
    let radix = Candidates::empty(client, n, state, key_mask, values.is_none())?;
    let absent = Tensor::empty(client, DType::F32, &[4])?;
    for pass in 0..32 / DIGIT_BITS {
        let (shift, high) = digit_of_pass(pass);
        if pass == 2 {
            TopkRadixCompact::tuned(
                client,
                0.0,
                &TopkRadixCompactArgs {
                    keys,
                    values: values.unwrap_or(&absent),
                    state: &radix.state,
                    hist: &hist,
                    candidates: &radix.candidates,
                    positions: &radix.positions,
                    counts: &radix.stored,
                    below: &radix.below,
                    n: n as u32,
                    cubes: cubes as u32,
                    shift,
                    high,
                    key_mask,
                    keys_are_values: radix.keys_are_values,
                },
            )?;
        } else if pass > 0 || !counted {
            let source = match pass {
                0 | 1 => RadixSource::Keys,
                _ => RadixSource::Candidates,
            };
            let skip_counted = speculated && pass == 1;
            radix_histogram(keys, &radix, &hist, n, pass, skip_counted, source)?;
        }
        let cubes = match pass {
            0..=2 => cubes,
            _ => candidate_cubes(n),
        };
        let use_spec = speculated && pass == 1;
        radix_choose(&hist, &spec, &radix.state, cubes, shift, all_ties, use_spec)?;
    }
    Ok(radix)
}

/// The digit pass `pass` (0 first) counts: its shift, and the mask of the bits above it,
/// which must equal the prefix chosen so far.
fn digit_of_pass(pass: u32) -> (u32, u32) {
    let shift = 32 - DIGIT_BITS * (pass + 1);
    let high = match shift + DIGIT_BITS {
        32 => 0,
        s => !((1u32 << s) - 1),
    };
    (shift, high)
}

/// Cubes of a histogram pass over the candidates of `n` elements' regions.
fn candidate_cubes(n: usize) -> usize {
    let regions = n.div_ceil(CHUNK as usize) * CUBE as usize;
    regions.div_ceil(CANDIDATE_GROUPS as usize * CUBE as usize)
}

/// Radix pass `pass`'s per-cube histogram ([`topk_radix_histogram`]) of the first `n`
/// keys (`source` Keys) or of `radix`'s candidates, under `radix.state`'s prefix;
/// `skip_counted`: the keys pass may have counted this digit already.
fn radix_histogram(
    keys: &Tensor,
    radix: &Candidates,
    hist: &Tensor,
    n: usize,
    pass: u32,
    skip_counted: bool,
    source: RadixSource,
) -> Result<()> {
    let client = keys.client();
    let (shift, high) = digit_of_pass(pass);
    let chunks = n.div_ceil(CHUNK as usize);
    TopkRadixHistogram::tuned(
        client,
        0.0,
        &TopkRadixHistogramArgs {
            keys,
            state: &radix.state,
            hist,
            candidates: &radix.candidates,
            counts: &radix.stored,
            n: n as u32,
            cubes: match source {
                RadixSource::Keys => chunks,
                RadixSource::Candidates => candidate_cubes(n),
            } as u32,
            regions: (chunks * CUBE as usize) as u32,
            shift,
            high,
            key_mask: radix.key_mask,
            contiguous: contiguous_regions(client),
            skip_counted: u32::from(skip_counted),
            source,
        },
    )?;
    Ok(())
}

/// [`topk_radix_choose`] over `cubes` histograms: the digit at `shift` joins `state`'s
/// prefix.
fn radix_choose(
    hist: &Tensor,
    spec: &Tensor,
    state: &Tensor,
    cubes: usize,
    shift: u32,
    all_ties: bool,
    use_spec: bool,
) -> Result<()> {
    TopkRadixChoose::tuned(
        hist.client(),
        0.0,
        &TopkRadixChooseArgs {
            hist,
            spec,
            state,
            cubes: cubes as u32,
            shift,
            take_all_ties: u32::from(all_ties),
            use_spec: u32::from(use_spec),
        },
    )?;
    Ok(())
}

/// `a = eta error + grad - h` in f32 (written twice with `twice`: to `a` and `copy`)
/// (`eta = 1` and no `h` for plain error feedback: `1 * error` is exact, so `a = error +
/// grad` bit for bit) and, for `source` Random, the ranking key of every element: a
/// Philox word of its index (magnitude keys are `a`'s bits, read from `a` by the passes;
/// rand-k's permutation runs no keys pass). With them, the radix select's first pass:
/// the histogram of the keys' top digit per `CHUNK` elements (as
/// [`topk_radix_histogram`] counts it), so that no pass reads the keys for it alone. 4-wide
/// where `n` is a multiple of 4 (a CPU adapter issues one load per lane and access, so a
/// vector access does four elements' work for one's cost); `a` and `keys` are `n`
/// rounded up to 4 long (the selection kernels read them 4-wide), their tail past `n` is
/// never read. `contiguous` lays the cube's elements over its units
/// ([`contiguous_regions`]).
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(n = pow2, dtype),
    grid = cubes(cubes),
    cube = UNITS
)]
pub fn topk_keys<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    error: &Array<Vector<f32, N>>,
    h: &Array<Vector<f32, N>>,
    a: &mut Array<Vector<f32, N>>,
    copy: &mut Array<Vector<f32, N>>,
    keys: &mut Array<Vector<u32, N>>,
    hist: &mut Array<u32>,
    spec: &mut Array<u32>,
    n: u32,
    cubes: u32,
    eta: f32,
    key0: u32,
    key1: u32,
    stream: u32,
    contiguous: u32,
    #[comptime] source: KeySource,
    #[comptime] has_error: bool,
    #[comptime] has_h: bool,
    #[comptime] twice: bool,
) {
    let nw = N::value().comptime() as u32;
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    // The first digit's packed counters, then (magnitude keys) the second digit's under
    // the two speculated first digits: reduced over the cube together.
    let words = comptime!(match source == KeySource::Magnitude {
        true => BINS / 4 + BINS / 2,
        false => BINS / 4,
    });
    let mut packed = Array::<u32>::new(comptime!(words as usize));
    #[unroll]
    for w in 0..words {
        packed[w as usize] = 0u32;
    }
    let (unit_step, j_step) = unit_layout(contiguous, comptime!(PER_UNIT / nw), comptime!(CUBE));
    for j in 0..comptime!(PER_UNIT / nw) {
        let i = cube * comptime!(CHUNK / nw) + UNIT_POS * unit_step + j * j_step;
        // The first element of this vector (4-wide only when n % 4 == 0: whole vectors).
        let first = i * nw;
        if first < n {
            let v = formed(grad, error, h, i, eta, has_error, has_h);
            a[i as usize] = v;
            if comptime!(twice) {
                copy[i as usize] = v;
            }
            let mut kv = Vector::<u32, N>::new(0u32);
            if comptime!(source == KeySource::Random) {
                // Element e is lane e % 4 of the block at counter (e / 4, stream, 0, 0), as
                // crate::random::word: one block serves a whole 4-wide vector.
                let r = philox4x32_10(first / 4, stream, 0u32, 0u32, key0, key1);
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
            } else {
                #[unroll]
                for l in 0..nw {
                    kv[l as usize] = u32::reinterpret(v[l as usize]) & 0x7FFF_FFFFu32;
                }
            }
            #[unroll]
            for l in 0..nw {
                let key = kv[l as usize];
                radix::count_digit(&mut packed, key, first + l < n, comptime!(32 - DIGIT_BITS));
                if comptime!(source == KeySource::Magnitude) {
                    radix::count_second_digit(&mut packed, comptime!(BINS / 4), key, first + l < n);
                }
            }
        }
    }
    // The three histograms in one reduction (two barriers).
    let mut table = SharedMemory::<u32>::new(comptime!((BINS * CUBE) as usize));
    radix::reduce_counter_words(&packed, words, &mut table);
    radix::write_bins(&table, words, 0u32, comptime!(BINS / 4), hist, cube, cubes);
    if comptime!(source == KeySource::Magnitude) {
        radix::write_bins(
            &table,
            words,
            comptime!(BINS / 4),
            comptime!(BINS / 2),
            spec,
            cube,
            cubes,
        );
    }
}
